"""diffenc_diffusers.training.checkpointing: atomic checkpoint folders, pruning, and the training-state files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from diffenc_diffusers.training.checkpointing import (
    CHECKPOINT_MARKER,
    TRAINING_STATE_NAME,
    complete_checkpoints,
    find_latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    read_checkpoint_state,
    remove_partial_checkpoints,
    save_training_state,
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
