"""Converting the official DiffEnc (bemigini/DiffEnc) and VDM (google-research/vdm) Flax checkpoints into
`DiffEncPipeline` folders, without JAX (``pip install 'diffenc-diffusers[convert]'``; see docs/conversion.md)."""

from .convert import ConversionResult, check_parameters, cli, convert_official_checkpoint, save_converted
from .flax_msgpack import load_flax_msgpack, save_flax_msgpack
from .official import OfficialModel, diffenc_model, load_official_model, vdm_model

__all__ = [
    "ConversionResult",
    "OfficialModel",
    "check_parameters",
    "cli",
    "convert_official_checkpoint",
    "diffenc_model",
    "load_flax_msgpack",
    "load_official_model",
    "save_converted",
    "save_flax_msgpack",
    "vdm_model",
]
