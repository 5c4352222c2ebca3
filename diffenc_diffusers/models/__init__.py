"""Networks of diffenc_diffusers: the VDM denoiser U-Net and the DiffEnc encoder U-Net."""

from .encoder_diffenc import DiffEncEncoderModel, DiffEncEncoderOutput
from .unet_vdm import VDMUNetModel, VDMUNetOutput

__all__ = ["DiffEncEncoderModel", "DiffEncEncoderOutput", "VDMUNetModel", "VDMUNetOutput"]
