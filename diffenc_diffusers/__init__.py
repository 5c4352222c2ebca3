"""diffenc-diffusers: DiffEnc and continuous-time VDM as a Hugging Face diffusers extension."""

from .models import DiffEncEncoderModel, DiffEncEncoderOutput, VDMUNetModel, VDMUNetOutput
from .objective import DiffEncObjective, DiffEncObjectiveOutput
from .pipeline_diffenc import DiffEncLikelihoodOutput, DiffEncPipeline
from .scheduling_vdm import VDMScheduler, VDMSchedulerOutput

__version__ = "0.1.0"

__all__ = [
    "DiffEncEncoderModel",
    "DiffEncEncoderOutput",
    "DiffEncLikelihoodOutput",
    "DiffEncObjective",
    "DiffEncObjectiveOutput",
    "DiffEncPipeline",
    "VDMScheduler",
    "VDMSchedulerOutput",
    "VDMUNetModel",
    "VDMUNetOutput",
]
