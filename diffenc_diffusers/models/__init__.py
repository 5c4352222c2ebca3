"""Networks of diffenc_diffusers: the VDM denoiser U-Net, the DiffEnc encoder U-Net, the learned schedule's weights."""

from .encoder_diffenc import DiffEncEncoderModel, DiffEncEncoderOutput
from .schedule_monotone import MonotoneSchedule
from .unet_vdm import VDMUNetModel, VDMUNetOutput

__all__ = ["DiffEncEncoderModel", "DiffEncEncoderOutput", "MonotoneSchedule", "VDMUNetModel", "VDMUNetOutput"]
