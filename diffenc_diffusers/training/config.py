"""The training settings of a preset: the keys of ``training_config.json``, their types and built-in defaults.

A preset folder (``diffenc_diffusers/presets/<name>/``) is a diffusers pipeline folder without weights plus
``training_config.json``, whose keys are ``training/train_diffenc.py``'s flag names without the dashes and set
their defaults (a flag given on the command line wins over the file, which wins over the built-in default).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data import BUILTIN_DATASETS

TRAINING_CONFIG_NAME = "training_config.json"
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def timesteps_type(text: str) -> int | str:
    """argparse type of --num_timesteps: a positive int T, or 'continuous' (T = infinity)."""
    if text == "continuous":
        return text
    return positive_int(text)


def bool_type(text: str) -> bool:
    """Type of a boolean training_config value given as a string (true/false, 1/0, yes/no)."""
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text}")


def mixed_precision_type(text: str) -> str:
    """Type of --mixed_precision: one of :data:`MIXED_PRECISION_CHOICES`."""
    if text not in MIXED_PRECISION_CHOICES:
        raise argparse.ArgumentTypeError(f"must be one of {list(MIXED_PRECISION_CHOICES)}, got {text!r}")
    return text


TRAINING_CONFIG_FLAGS: dict[str, tuple[Callable[[str], Any], Any, str]] = {
    "dataset": (
        str,
        None,
        f"A built-in dataset ({', '.join(sorted(BUILTIN_DATASETS))}) or a Hugging Face datasets name.",
    ),
    "resolution": (positive_int, None, "Image height and width; images are never resized."),
    "train_batch_size": (positive_int, 128, "Images per process per micro-step."),
    "learning_rate": (positive_float, 2e-4, "AdamW learning rate after warm-up."),
    "adam_beta1": (unit_interval, 0.9, "AdamW beta1."),
    "adam_beta2": (unit_interval, 0.99, "AdamW beta2."),
    "adam_weight_decay": (non_negative_float, 0.01, "AdamW weight decay (not applied to biases, norms, scalars)."),
    "lr_warmup_steps": (non_negative_int, 100, "Linear learning-rate warm-up, in update steps."),
    "max_train_steps": (positive_int, None, "Update steps to train for."),
    "ema_decay": (unit_interval, 0.9999, "Largest EMA decay (EMAModel's warm-up (1 + n) / (10 + n) below it)."),
    "num_timesteps": (timesteps_type, "continuous", "Diffusion loss of training: 'continuous' or T steps."),
    "max_grad_norm": (non_negative_float, 1.0, "Clip the global gradient norm to this (0: no clipping)."),
    "mixed_precision": (
        mixed_precision_type,
        None,
        f"One of {list(MIXED_PRECISION_CHOICES)}; ELBO terms stay fp32. Unset: accelerate's setting "
        "(accelerate launch --mixed_precision or its config file; 'no' without a launcher).",
    ),
    "gradient_accumulation_steps": (positive_int, 1, "Micro-steps per update step."),
    "checkpointing_steps": (positive_int, 5000, "Write a checkpoint every N update steps."),
    "eval_batch_size": (positive_int, 128, "Batch size of test-set bits/dim and sampling."),
    "random_flip": (bool_type, False, "Flip training images horizontally at random (exact, in uint8)."),
    "class_dropout_prob": (
        unit_interval,
        0.0,
        "Class-conditional models: train on the null class instead of the label with this probability "
        "(classifier-free guidance; needs null_class).",
    ),
}
"""The keys a preset's training_config.json may set: name -> (type, built-in default, help)."""


def read_training_config(folder: Path) -> dict[str, Any]:
    """The preset's training_config.json (empty if absent), each value checked with its key's type.

    Raises:
        ValueError: unknown keys (the accepted ones are listed) or a value its type rejects.
    """
    path = folder / TRAINING_CONFIG_NAME
    if not path.is_file():
        return {}
    values = json.loads(path.read_text())
    unknown = sorted(set(values) - set(TRAINING_CONFIG_FLAGS))
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; accepted keys: {sorted(TRAINING_CONFIG_FLAGS)}.")
    checked = {}
    for name, value in values.items():
        if value is None:
            continue
        kind = TRAINING_CONFIG_FLAGS[name][0]
        try:
            checked[name] = kind(str(value).lower() if isinstance(value, bool) else str(value))
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise ValueError(f"{path}: {name!r} = {value!r} is invalid: {error}.") from None
    return checked


WEIGHT_FLAGS = (
    *(name for name in TRAINING_CONFIG_FLAGS if name not in ("eval_batch_size", "checkpointing_steps")),
    "adam_epsilon",
    "lr_scheduler",
    "dropout",
)
"""The training flags that shape the weights: a checkpoint records their values per segment of steps (a segment
starts where a resumed run changed one), and the model card shows each value with the steps it applied to."""


def extend_segments(segments: list[dict[str, Any]], from_step: int, flags: dict[str, Any]) -> list[dict[str, Any]]:
    """The segments ``[{"from_step": s, "flags": {...}}, ...]`` of a run resumed at ``from_step`` with ``flags``:
    those before ``from_step`` and this run's (merged into the last one if its flags are the same)."""
    kept = [segment for segment in segments if segment["from_step"] < from_step]
    if kept and kept[-1]["flags"] == flags:
        return kept
    return [*kept, {"from_step": from_step, "flags": dict(flags)}]


def changed_flags(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``--name old -> new`` for each flag whose value differs."""
    return [
        f"--{name} {before.get(name)!r} -> {after.get(name)!r}"
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    ]


def describe_segments(segments: list[dict[str, Any]], last_step: int) -> dict[str, str]:
    """For each flag whose value changed between segments: its values with their steps, e.g.
    ``{"learning_rate": "0.0002 (steps 0-30), 0.005 (steps 30-40)"}``; a segment recorded without flags (a
    checkpoint of an earlier version) reads 'not recorded'."""
    names = sorted({name for segment in segments for name in segment["flags"] or {}})
    described = {}
    for name in names:
        values = [None if segment["flags"] is None else segment["flags"].get(name) for segment in segments]
        if all(value == values[0] for value in values) and segments[0]["flags"] is not None:
            continue
        ends = [segment["from_step"] for segment in segments[1:]] + [last_step]
        described[name] = ", ".join(
            f"{'not recorded' if segment['flags'] is None else value} (steps {segment['from_step']}-{end})"
            for segment, value, end in zip(segments, values, ends, strict=True)
        )
    return described


def check_writable(path: Path, flag: str, folder: bool) -> None:
    """``ValueError`` naming ``flag`` unless ``path`` (a folder if ``folder``, else a file) can be created or
    written: an existing path must be of that kind, and its nearest existing folder must accept a new file (tried
    with a temporary file, which is deleted; nothing else is created)."""
    import tempfile

    kind = "a folder" if folder else "a file"
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{flag} {str(path)!r} must be {kind}, but it exists and is not.")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ValueError(
            f"{flag} {str(path)!r} is not writable: creating a file in {str(parent)!r} fails ({error.strerror}). "
            f"Choose {kind} in a writable location."
        ) from None
