"""Training building blocks: atomic checkpoints and resume, seeded per-step randomness, one update step.

``training/train_diffenc.py`` (the command line) is a loop over these; a loop of your own can use them the same
way (see :mod:`diffenc_diffusers.training.step`). Nothing here imports accelerate: the accelerator is passed in.
"""

from .checkpointing import (
    CheckpointError,
    find_latest_checkpoint,
    find_resumable_checkpoint,
    is_complete_checkpoint,
    load_training_state,
    prune_checkpoints,
    read_checkpoint_state,
    remove_partial_checkpoints,
    save_training_state,
    verify_checkpoint,
    write_checkpoint,
)
from .precision import cpu_has_native_bf16
from .randomness import StreamBatchSampler, step_randomness
from .step import (
    NonFiniteError,
    TrainingStep,
    TrainingStepOutput,
    ema_weights,
    first_non_finite,
    parameter_groups,
    pipeline_from_objective,
)

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "StreamBatchSampler",
    "TrainingStep",
    "TrainingStepOutput",
    "cpu_has_native_bf16",
    "ema_weights",
    "find_latest_checkpoint",
    "find_resumable_checkpoint",
    "first_non_finite",
    "is_complete_checkpoint",
    "load_training_state",
    "parameter_groups",
    "pipeline_from_objective",
    "prune_checkpoints",
    "read_checkpoint_state",
    "remove_partial_checkpoints",
    "save_training_state",
    "step_randomness",
    "verify_checkpoint",
    "write_checkpoint",
]
