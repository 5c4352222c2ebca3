"""Atomic, resumable training checkpoints: folders ``checkpoint-N`` that are either complete or ignored.

A checkpoint folder holds the raw weights of the trained module, their EMA, the optimizer's tensors (all
safetensors) and ``training_state.json`` (step, data position, seed, optimizer hyper-parameters, learning-rate
schedule, EMA counters, grad scaler, the noise process). Nothing is pickled.

Writing is atomic: the files go into ``checkpoint-N.tmp-<pid>``, a marker listing every file and its size is
written last, everything is fsynced and the folder is renamed to ``checkpoint-N``. Only folders named
``checkpoint-N`` whose marker matches their files count as checkpoints, so a crash at any moment never leaves a
checkpoint that :func:`find_latest_checkpoint` picks. Deleting renames first, so a half-deleted folder never
carries a checkpoint's name.

Typical use in a training loop::

    def write_files(folder):
        save_training_state(folder, model, ema, optimizer, lr_scheduler, None, {"global_step": step})

    path = write_checkpoint(output_dir, step, write_files)
    prune_checkpoints(output_dir, limit=3)
    ...
    latest = find_latest_checkpoint(output_dir)
    state = read_checkpoint_state(latest)          # read once: check it, then restore from it
    load_training_state(latest, state, model, ema, optimizer, lr_scheduler, None)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "checkpoint_complete.json"
"""Written last into a checkpoint folder: its step and every file with its size."""
CHECKPOINT_FORMAT_VERSION = 1
TRAINING_STATE_NAME = "training_state.json"
MODEL_WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"
OPTIMIZER_STATE_NAME = "optimizer.safetensors"


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named exactly ``checkpoint-N``, else None."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint whose writing finished: its marker exists and lists files of the sizes
    written."""
    marker = path / CHECKPOINT_MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete ``checkpoint-N`` folder in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_dir() and is_complete_checkpoint(path):
            found.append((step, path))
    return sorted(found)


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the largest step; partial, temporary and unmarked folders never count."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted checkpoint writes and deletions (``checkpoint-N.tmp-*``,
    ``checkpoint-N.old-*``); returns what was deleted."""
    removed = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+\.(tmp|old)-\d+", path.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_checkpoint(output_dir: Path, step: int, write_files: Callable[[Path], None]) -> Path:
    """Write ``checkpoint-<step>`` atomically; returns its path.

    ``write_files(folder)`` fills ``checkpoint-<step>.tmp-<pid>``; then the marker (listing every file and its
    size) is written last, everything is fsynced, and the folder is renamed to ``checkpoint-<step>`` with
    ``os.replace``. A crash at any point leaves either no ``checkpoint-<step>`` or a complete one (plus a
    temporary folder that :func:`find_latest_checkpoint` ignores and :func:`remove_partial_checkpoints`
    deletes).
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f"{CHECKPOINT_PREFIX}{step}.tmp-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    write_files(temporary)
    files = {path.name: path.stat().st_size for path in sorted(temporary.iterdir()) if path.is_file()}
    (temporary / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "files": files}, indent=1))
    for name in [*files, CHECKPOINT_MARKER]:
        with open(temporary / name, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(temporary)
    if final.exists():
        _delete_checkpoint(final)
    os.replace(temporary, final)
    _fsync_directory(output_dir)
    return final


def _delete_checkpoint(path: Path) -> None:
    """Rename first (atomic), then delete, so a half-deleted folder never carries a checkpoint's name."""
    doomed = path.with_name(f"{path.name}.old-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def prune_checkpoints(output_dir: Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints until at most ``limit`` remain; ``keep`` (the checkpoint this
    run resumed from) is never deleted and does not count. Returns the deleted folders."""
    if limit is None:
        return []
    keep = keep.resolve() if keep is not None else None
    candidates = [path for _, path in complete_checkpoints(output_dir) if path.resolve() != keep]
    doomed = candidates[: max(0, len(candidates) - limit)]
    for path in doomed:
        _delete_checkpoint(path)
    return doomed


def optimizer_state_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and the JSON-able rest."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_files`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_training_state(
    folder: Path,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    state: Mapping[str, Any],
) -> None:
    """Write a checkpoint's files into ``folder`` (use it as :func:`write_checkpoint`'s ``write_files``).

    Args:
        folder: an existing, empty folder.
        model: the trained module (its ``state_dict`` goes to ``model.safetensors``).
        ema: diffusers' ``EMAModel`` of ``model.parameters()`` (its shadow goes to ``ema.safetensors``, keyed by
            parameter name; its counters to the JSON).
        optimizer: the (unwrapped) optimizer; its tensors go to ``optimizer.safetensors``.
        lr_scheduler: anything with ``state_dict()``.
        scaler: the fp16 grad scaler, or None.
        state: JSON-able run information (step, data position, seed, ...), stored in ``training_state.json``.
    """
    from safetensors.torch import save_file

    names = [name for name, _ in model.named_parameters()]
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / MODEL_WEIGHTS_NAME)
    ema_state = ema.state_dict()
    shadow = ema_state.pop("shadow_params")
    save_file(
        {name: tensor.detach().cpu().contiguous() for name, tensor in zip(names, shadow, strict=True)},
        folder / EMA_WEIGHTS_NAME,
    )
    optimizer_tensors, optimizer_meta = optimizer_state_to_files(optimizer.state_dict())
    save_file(optimizer_tensors, folder / OPTIMIZER_STATE_NAME)
    full_state = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        **state,
        "ema": ema_state,
        "optimizer": optimizer_meta,
        "lr_scheduler": lr_scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
    }
    (folder / TRAINING_STATE_NAME).write_text(json.dumps(full_state, indent=1))


def read_checkpoint_state(folder: Path) -> dict[str, Any]:
    """The ``training_state.json`` of a complete checkpoint of this format.

    Raises:
        ValueError: ``folder`` is not a complete checkpoint (no valid marker; it may have been cut off while
            being written), or was written in another checkpoint format.
    """
    if not is_complete_checkpoint(folder):
        raise ValueError(
            f"{str(folder)!r} is not a complete checkpoint (it needs a valid {CHECKPOINT_MARKER}; it may have been "
            "cut off while being written)."
        )
    state = json.loads((folder / TRAINING_STATE_NAME).read_text())
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{folder} has checkpoint format {state.get('format_version')}, not {CHECKPOINT_FORMAT_VERSION}."
        )
    return state


def load_training_state(
    folder: Path,
    state: Mapping[str, Any],
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
) -> None:
    """Restore what :func:`save_training_state` wrote into the given objects.

    ``state`` is the checkpoint's :func:`read_checkpoint_state`, read (and checked) once by the caller.

    Raises:
        ValueError: the weights or the EMA are not those of ``model``.
    """
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    try:
        model.load_state_dict(load_file(folder / MODEL_WEIGHTS_NAME, device=str(device)))
    except RuntimeError as error:
        raise ValueError(f"{folder} holds the weights of another model than the one being trained: {error}") from None
    shadow = load_file(folder / EMA_WEIGHTS_NAME, device=str(device))
    names = [name for name, _ in model.named_parameters()]
    if sorted(shadow) != sorted(names):
        raise ValueError(f"{folder}/{EMA_WEIGHTS_NAME} does not hold this model's parameters.")
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[name] for name in names]})
    optimizer.load_state_dict(optimizer_state_from_files(load_file(folder / OPTIMIZER_STATE_NAME), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["grad_scaler"] is not None:
        scaler.load_state_dict(state["grad_scaler"])


def noise_process_config(scheduler: Any) -> dict[str, Any]:
    """The scheduler settings that define a run's objective: its config without diffusers' bookkeeping keys."""
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
