"""Atomic, resumable training checkpoints: folders ``checkpoint-N`` that are either complete or ignored.

A checkpoint folder holds the raw weights of the trained module, their EMA, the optimizer's tensors (all
safetensors) and ``training_state.json`` (step, data position, seed, optimizer hyper-parameters, learning-rate
schedule, EMA counters, grad scaler, the noise process). Nothing is pickled.

Writing is atomic: the files go into ``checkpoint-N.tmp-<pid>``, a marker listing every file with its size and
its sha256 is written last, everything is fsynced and the folder is renamed to ``checkpoint-N``. Only folders
named ``checkpoint-N`` whose marker matches their files count as checkpoints, so a crash at any moment never leaves
a checkpoint that :func:`find_latest_checkpoint` picks. Deleting renames first, so a half-deleted folder never
carries a checkpoint's name.

Resuming trusts nothing: :func:`verify_checkpoint` checks every file against its checksum (any folder, also one
downloaded from elsewhere), :func:`read_checkpoint_state` verifies before it parses, :func:`load_training_state`
refuses non-finite tensors, and :func:`find_resumable_checkpoint` picks the newest checkpoint that passes, with the
reason each newer one was skipped. Checkpoints written before the checksums (a marker with sizes only) are resumed
with a warning: their sizes, safetensors headers, JSON and tensors are still checked, their bytes cannot be.

Typical use in a training loop::

    def write_files(folder):
        save_training_state(folder, model, ema, optimizer, lr_scheduler, None, {"global_step": step})

    path = write_checkpoint(output_dir, step, write_files)
    prune_checkpoints(output_dir, limit=3)
    ...
    latest, state, skipped = find_resumable_checkpoint(output_dir)   # verified; state read once
    load_training_state(latest, state, model, ema, optimizer, lr_scheduler, None)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .step import NonFiniteError, first_non_finite

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "checkpoint_complete.json"
"""Written last into a checkpoint folder: its step, every file with its size (``files``) and its sha256
(``sha256``, hex)."""
CHECKPOINT_FORMAT_VERSION = 1
TRAINING_STATE_NAME = "training_state.json"
MODEL_WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"
OPTIMIZER_STATE_NAME = "optimizer.safetensors"
SAFETENSORS_NAMES = (MODEL_WEIGHTS_NAME, EMA_WEIGHTS_NAME, OPTIMIZER_STATE_NAME)


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed; the message names the folder or file and what is wrong with it."""


def dumps_strict_json(value: Any) -> str:
    """JSON text of ``value``; ``ValueError`` on a NaN or infinity (which JSON has no literal for)."""
    return json.dumps(value, indent=1, allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"it holds the non-JSON constant {name}")


def loads_strict_json(text: str) -> Any:
    """Parse JSON text, refusing the non-standard constants NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_reject_constant)


def sha256_of_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named exactly ``checkpoint-N``, else None."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def checkpoint_leftover_pid(path: Path) -> int | None:
    """The pid in the name of a leftover of a checkpoint write or deletion (``checkpoint-N.tmp-<pid>``,
    ``checkpoint-N.old-<pid>``), else None."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+\.(tmp|old)-(\d+)", path.name)
    return int(match.group(2)) if match else None


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


def verify_checkpoint(folder: Path) -> bool:
    """Check every file of a checkpoint folder against its marker; the folder's name does not matter (a
    ``checkpoint-N`` of a run, or a copy downloaded from elsewhere).

    Returns:
        True if the marker has checksums and every file matches its sha256; False for a checkpoint written before
        the checksums, whose files match the recorded sizes (their bytes cannot be verified).

    Raises:
        CheckpointError: no or an invalid marker, a file listed in it missing, of another size, or with other
            bytes than were written; the message names the file.
    """
    marker_path = folder / CHECKPOINT_MARKER
    if not folder.exists():
        raise CheckpointError(f"{str(folder)!r} does not exist.")
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a folder.")
    if not marker_path.is_file():
        raise CheckpointError(
            f"{str(folder)!r} has no {CHECKPOINT_MARKER}: it is not a complete checkpoint (it may have been cut off "
            "while being written)."
        )
    try:
        marker = loads_strict_json(marker_path.read_text())
        sizes = {str(name): int(size) for name, size in marker["files"].items()}
        digests = marker.get("sha256")
        if digests is not None and (not isinstance(digests, dict) or set(digests) != set(sizes)):
            raise ValueError("its sha256 entries do not list the same files as its sizes")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{marker_path} is not a valid checkpoint marker: {error}.") from None
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (the checkpoint's marker lists it).")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{path} has {path.stat().st_size} bytes, the checkpoint's marker recorded {size} (truncated or "
                "replaced)."
            )
        if digests is not None and sha256_of_file(path) != digests[name]:
            raise CheckpointError(
                f"{path} does not match its sha256 checksum: its bytes changed after the checkpoint was written."
            )
    return digests is not None


def find_resumable_checkpoint(
    output_dir: Path,
) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, CheckpointError]]]:
    """The newest ``checkpoint-N`` of ``output_dir`` that passes :func:`read_checkpoint_state` (checksums, JSON,
    format, safetensors headers), its state, and every newer ``checkpoint-N`` skipped with the reason, newest first.
    (None, None, skipped) when no checkpoint passes."""
    skipped = []
    candidates = [(checkpoint_step(path), path) for path in output_dir.iterdir()] if output_dir.is_dir() else []
    for _, path in sorted(((step, path) for step, path in candidates if step is not None), reverse=True):
        try:
            return path, read_checkpoint_state(path), skipped
        except CheckpointError as error:
            skipped.append((path, error))
    return None, None, skipped


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted checkpoint writes and deletions (``checkpoint-N.tmp-<pid>``,
    ``checkpoint-N.old-<pid>``) of this process or of processes that no longer run on this host; a live
    process' folder is left alone. Returns what was deleted."""
    from .lock import process_is_alive

    removed = []
    if output_dir.is_dir():
        for path in sorted(output_dir.iterdir()):
            pid = checkpoint_leftover_pid(path)
            if pid is None or not path.is_dir():
                continue
            if pid != os.getpid() and process_is_alive(pid):
                logger.info("Kept %s: process %d, which wrote it, still runs.", path, pid)
                continue
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

    ``write_files(folder)`` fills ``checkpoint-<step>.tmp-<pid>``; then the marker (listing every file with its
    size and sha256) is written last, everything is fsynced, and the folder is renamed to ``checkpoint-<step>`` with
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
    digests = {}
    for name in files:
        with open(temporary / name, "rb") as handle:
            os.fsync(handle.fileno())
        digests[name] = sha256_of_file(temporary / name)
    marker = {"step": step, "files": files, "sha256": digests}
    (temporary / CHECKPOINT_MARKER).write_text(dumps_strict_json(marker))
    with open(temporary / CHECKPOINT_MARKER, "rb") as handle:
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
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ema_state = ema.state_dict()
    shadow = ema_state.pop("shadow_params")
    averages = {name: tensor.detach().cpu().contiguous() for name, tensor in zip(names, shadow, strict=True)}
    for file_name, tensors in ((MODEL_WEIGHTS_NAME, weights), (EMA_WEIGHTS_NAME, averages)):
        bad = first_non_finite(tensors)
        if bad is not None:
            raise NonFiniteError(f"Not writing a checkpoint: {bad!r} of its {file_name} holds non-finite values.")
    save_file(weights, folder / MODEL_WEIGHTS_NAME)
    save_file(averages, folder / EMA_WEIGHTS_NAME)
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
    (folder / TRAINING_STATE_NAME).write_text(dumps_strict_json(full_state))


def read_checkpoint_state(folder: Path) -> dict[str, Any]:
    """The ``training_state.json`` of a checkpoint that passes :func:`verify_checkpoint`, of this format, whose
    safetensors files have valid headers. A checkpoint written before the checksums is accepted with a warning.

    Raises:
        CheckpointError: ``folder`` fails verification (no valid marker, e.g. cut off while being written; a file
            missing, truncated or changed), its state is no valid JSON object, it was written in another
            checkpoint format, or a safetensors file's header is damaged. The message names the file.
    """
    from safetensors import safe_open

    if not verify_checkpoint(folder):
        logger.warning(
            "%s was written before checkpoints carried checksums: its file sizes match, but its bytes cannot be "
            "verified (its JSON, safetensors headers and tensors are still checked).",
            folder,
        )
    state_path = folder / TRAINING_STATE_NAME
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing.")
    try:
        state = loads_strict_json(state_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{state_path} is not valid JSON: {error}.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path} holds a {type(state).__name__}, not a JSON object.")
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path} has checkpoint format {state.get('format_version')}, not {CHECKPOINT_FORMAT_VERSION}."
        )
    for name in SAFETENSORS_NAMES:
        try:
            with safe_open(folder / name, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
            raise CheckpointError(f"{folder / name} is no readable safetensors file: {error}.") from None
    return state


def _load_finite(path: Path, device: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ``CheckpointError`` naming the file if it cannot be read or holds a
    non-finite value."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device=device)
    except Exception as error:  # SafetensorError and friends: the message names the file instead of a traceback
        raise CheckpointError(f"{path} is no readable safetensors file: {error}.") from None
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{path} holds non-finite values in {bad!r}: it cannot be resumed.")
    return tensors


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
        CheckpointError: a safetensors file cannot be read or holds a non-finite value.
    """
    device = str(next(model.parameters()).device)
    weights = _load_finite(folder / MODEL_WEIGHTS_NAME, device)
    shadow = _load_finite(folder / EMA_WEIGHTS_NAME, device)
    optimizer_tensors = _load_finite(folder / OPTIMIZER_STATE_NAME, "cpu")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"{folder} holds the weights of another model than the one being trained: {error}") from None
    names = [name for name, _ in model.named_parameters()]
    if sorted(shadow) != sorted(names):
        raise ValueError(f"{folder}/{EMA_WEIGHTS_NAME} does not hold this model's parameters.")
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[name] for name in names]})
    optimizer.load_state_dict(optimizer_state_from_files(optimizer_tensors, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["grad_scaler"] is not None:
        scaler.load_state_dict(state["grad_scaler"])


def noise_process_config(scheduler: Any) -> dict[str, Any]:
    """The scheduler settings that define a run's objective: its config without diffusers' bookkeeping keys."""
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
