"""diffenc_diffusers.training.checkpointing: atomic checkpoint folders, pruning, and the training-state files."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from diffenc_diffusers.training import NonFiniteError
from diffenc_diffusers.training.checkpointing import (
    CHECKPOINT_MARKER,
    TRAINING_STATE_NAME,
    CheckpointError,
    complete_checkpoints,
    find_latest_checkpoint,
    find_resumable_checkpoint,
    load_training_state,
    prune_checkpoints,
    read_checkpoint_state,
    remove_partial_checkpoints,
    save_training_state,
    sha256_of_file,
    verify_checkpoint,
    write_checkpoint,
)


def test_cut_off_checkpoint_is_never_picked(tmp_path):
    def write(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"x" * 100)

    def crash(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"x" * 10)
        raise KeyboardInterrupt

    first = write_checkpoint(tmp_path, 2, write)
    assert find_latest_checkpoint(tmp_path) == first
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 4, crash)
    assert not (tmp_path / "checkpoint-4").exists()
    assert find_latest_checkpoint(tmp_path) == first
    # A folder with a checkpoint's name but a file shorter than its marker says (e.g. copied while written).
    truncated = write_checkpoint(tmp_path, 6, write)
    (truncated / "model.safetensors").write_bytes(b"x" * 50)
    assert find_latest_checkpoint(tmp_path) == first
    assert [p.name for p in remove_partial_checkpoints(tmp_path)] == [f"checkpoint-4.tmp-{os.getpid()}"]
    # Pruning keeps the newest complete ones and never the checkpoint resumed from.
    for step in (8, 10):
        write_checkpoint(tmp_path, step, write)
    deleted = prune_checkpoints(tmp_path, 1, keep=first)
    assert sorted(p.name for p in deleted) == ["checkpoint-8"]
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 10]


def make_run(seed: int) -> tuple[torch.nn.Module, EMAModel, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=5)
    return model, EMAModel(model.parameters(), decay=0.9), optimizer, lr_scheduler


def train(model, ema, optimizer, lr_scheduler, steps: int) -> None:
    for step in range(steps):
        loss = model(torch.full((2, 3), float(step + 1))).square().sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        lr_scheduler.step()
        ema.step(model.parameters())


def write_state(folder: Path, run, step: int) -> Path:
    return write_checkpoint(folder, step, lambda path: save_training_state(path, *run, None, {"global_step": step}))


def test_saved_state_restores_weights_ema_optimizer_and_schedule_exactly(tmp_path):
    reference = make_run(0)
    train(*reference, steps=3)
    checkpoint = write_state(tmp_path, reference, 3)
    train(*reference, steps=2)

    resumed = make_run(1)
    state = read_checkpoint_state(checkpoint)
    assert state["global_step"] == 3
    load_training_state(checkpoint, state, *resumed, None)
    train(*resumed, steps=2)
    for a, b in zip(reference[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(reference[1].shadow_params, resumed[1].shadow_params, strict=True):
        assert torch.equal(a, b)
    assert reference[3].get_last_lr() == resumed[3].get_last_lr()
    assert reference[1].optimization_step == resumed[1].optimization_step


def test_state_of_incomplete_or_foreign_checkpoints_is_refused(tmp_path):
    run = make_run(0)
    checkpoint = write_state(tmp_path, run, 1)
    (checkpoint / CHECKPOINT_MARKER).unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        read_checkpoint_state(checkpoint)

    checkpoint = write_state(tmp_path, run, 2)
    state = read_checkpoint_state(checkpoint)
    other = torch.nn.Linear(3, 2)
    other_run = (other, EMAModel(other.parameters()), torch.optim.AdamW(other.parameters()), run[3])
    with pytest.raises(ValueError, match="weights of another model"):
        load_training_state(checkpoint, state, *other_run, None)

    def old_format(folder: Path) -> None:
        save_training_state(folder, *run, None, {})
        state_file = folder / TRAINING_STATE_NAME
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "format_version": 0}))

    with pytest.raises(ValueError, match="checkpoint format 0, not 1"):
        read_checkpoint_state(write_checkpoint(tmp_path, 3, old_format))


def test_nothing_is_pickled(tmp_path):
    checkpoint = write_state(tmp_path, make_run(0), 1)
    names = sorted(path.name for path in checkpoint.iterdir())
    weights = ["ema.safetensors", "model.safetensors", "optimizer.safetensors"]
    assert names == sorted([CHECKPOINT_MARKER, *weights, TRAINING_STATE_NAME])


def xor_middle_of_largest_tensor(path: Path, count: int = 16) -> None:
    """Flip ``count`` bytes in the middle of the largest tensor of a safetensors file; its size stays the same."""
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    start, end = max(
        (entry["data_offsets"] for name, entry in header.items() if name != "__metadata__"),
        key=lambda offsets: offsets[1] - offsets[0],
    )
    middle = 8 + header_length + (start + end) // 2
    for index in range(middle, middle + count):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_same_size(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert len(old) == len(new) and old in text
    path.write_text(text.replace(old, new, 1))


def damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:10] = b"[{"
    path.write_bytes(bytes(data))


def two_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    run = make_run(0)
    train(*run, steps=1)
    older = write_state(tmp_path, run, 1)
    train(*run, steps=1)
    return older, write_state(tmp_path, run, 2)


CORRUPTIONS = {
    "model bytes": (lambda c: xor_middle_of_largest_tensor(c / "model.safetensors"), "model.safetensors.*sha256"),
    "ema bytes": (lambda c: xor_middle_of_largest_tensor(c / "ema.safetensors"), "ema.safetensors.*sha256"),
    "optimizer bytes": (
        lambda c: xor_middle_of_largest_tensor(c / "optimizer.safetensors"),
        "optimizer.safetensors.*sha256",
    ),
    "state edit": (
        lambda c: edit_same_size(c / TRAINING_STATE_NAME, '"global_step": 2', '"global_step": 7'),
        "training_state.*sha256",
    ),
    "truncated": (
        lambda c: (c / "ema.safetensors").write_bytes((c / "ema.safetensors").read_bytes()[:-7]),
        r"ema.safetensors has \d+ bytes, the checkpoint's marker recorded",
    ),
    "deleted": (lambda c: (c / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    "header": (lambda c: damage_header(c / "model.safetensors"), "model.safetensors.*sha256"),
    "marker": (lambda c: (c / CHECKPOINT_MARKER).write_text("{"), "checkpoint_complete.json is not a valid"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_checkpoint_is_refused_and_latest_falls_back(tmp_path, corruption):
    damage, message = CORRUPTIONS[corruption]
    older, newest = two_checkpoints(tmp_path)
    damage(newest)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint_state(newest)
    folder, state, skipped = find_resumable_checkpoint(tmp_path)
    assert folder == older and state["global_step"] == 1
    assert [path for path, _ in skipped] == [newest]
    assert re.search(message, str(skipped[0][1]))


def test_verification_does_not_depend_on_the_folder_name(tmp_path):
    """A checkpoint copied elsewhere (e.g. downloaded from the Hub) verifies by its own marker."""
    _, newest = two_checkpoints(tmp_path / "run")
    copy = tmp_path / "downloaded" / "last-checkpoint"
    shutil.copytree(newest, copy)
    assert verify_checkpoint(copy) is True
    assert read_checkpoint_state(copy)["global_step"] == 2
    xor_middle_of_largest_tensor(copy / "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"last-checkpoint/ema.safetensors does not match its sha256"):
        verify_checkpoint(copy)


def strip_checksums(folder: Path) -> None:
    """Make ``folder`` look like a checkpoint of the version before checksums (a marker with sizes only)."""
    marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    del marker["sha256"]
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(marker))


def test_checkpoint_without_checksums_resumes_with_a_warning_and_checks(tmp_path, caplog):
    older, newest = two_checkpoints(tmp_path)
    strip_checksums(newest)
    with caplog.at_level("WARNING"):
        read_checkpoint_state(newest)
    assert verify_checkpoint(newest) is False
    assert "before checkpoints carried checksums" in caplog.text
    # What can still be checked is: the safetensors header, the JSON, the tensors' values.
    damage_header(newest / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is no readable safetensors file"):
        read_checkpoint_state(newest)
    assert find_resumable_checkpoint(tmp_path)[0] == older
    strip_checksums(older)
    from safetensors.torch import load_file, save_file

    tensors = load_file(older / "ema.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, older / "ema.safetensors")
    marker = json.loads((older / CHECKPOINT_MARKER).read_text())
    marker["files"]["ema.safetensors"] = (older / "ema.safetensors").stat().st_size
    (older / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    run = make_run(1)
    with pytest.raises(CheckpointError, match=f"ema.safetensors holds non-finite values in '{name}'"):
        load_training_state(older, read_checkpoint_state(older), *run, None)


def test_non_finite_weights_or_state_are_never_written(tmp_path):
    run = make_run(0)
    with torch.no_grad():
        run[0][0].bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"'0.bias' of its model.safetensors"):
        write_state(tmp_path, run, 1)
    run = make_run(0)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_checkpoint(tmp_path, 2, lambda path: save_training_state(path, *run, None, {"loss": float("nan")}))
    assert complete_checkpoints(tmp_path) == []
    # A state file holding a bare NaN (written by hand) is refused on reading.
    checkpoint = write_state(tmp_path, run, 3)
    state_file = checkpoint / TRAINING_STATE_NAME
    state_file.write_text(state_file.read_text().replace('"global_step": 3', '"global_step": NaN'))
    marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    marker["files"][TRAINING_STATE_NAME] = state_file.stat().st_size
    marker["sha256"][TRAINING_STATE_NAME] = sha256_of_file(state_file)
    (checkpoint / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"training_state.json is not valid JSON.*NaN"):
        read_checkpoint_state(checkpoint)
