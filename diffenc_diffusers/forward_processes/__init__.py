"""The forward processes of VDM and DiffEnc, one class per file, and the registry that maps a scheduler config's
`encoder_type` to its class. A new parameterisation of the encoder is a new file here (a
:class:`ForwardProcess` subclass) registered in :data:`FORWARD_PROCESSES`, plus a preset in `pipelines/`."""

from __future__ import annotations

from .base import Encoding, ForwardProcess
from .diffenc_nontrainable import NonTrainableDiffEncForwardProcess
from .diffenc_trainable import TrainableDiffEncForwardProcess
from .vdm import VDMForwardProcess

FORWARD_PROCESSES: dict[str, type[ForwardProcess]] = {
    process.encoder_type: process
    for process in (VDMForwardProcess, NonTrainableDiffEncForwardProcess, TrainableDiffEncForwardProcess)
}
"""`encoder_type` (the scheduler config's value) -> forward-process class."""

ENCODER_TYPES = tuple(FORWARD_PROCESSES)
"""The accepted `encoder_type` values."""


def forward_process(encoder_type: str) -> ForwardProcess:
    """The forward process named ``encoder_type`` (a scheduler config's `encoder_type`).

    Raises:
        ValueError: An unknown name; the message lists :data:`ENCODER_TYPES`.
    """
    if not isinstance(encoder_type, str) or encoder_type not in FORWARD_PROCESSES:
        raise ValueError(f"`encoder_type` must be one of {list(ENCODER_TYPES)}, got {encoder_type!r}.")
    return FORWARD_PROCESSES[encoder_type]()


__all__ = [
    "ENCODER_TYPES",
    "FORWARD_PROCESSES",
    "Encoding",
    "ForwardProcess",
    "NonTrainableDiffEncForwardProcess",
    "TrainableDiffEncForwardProcess",
    "VDMForwardProcess",
    "forward_process",
]
