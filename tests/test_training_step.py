"""diffenc_diffusers.training: the seeded per-step draws and data order, and TrainingStep in a loop of one's own."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_preset
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from diffenc_diffusers import DiffEncObjective, DiffEncObjectiveOutput, DiffEncPipeline
from diffenc_diffusers.data import load_digits_uint8
from diffenc_diffusers.training import StreamBatchSampler, TrainingStep, parameter_groups, step_randomness
from diffenc_diffusers.training.step import TERM_NAMES


def test_objective_survives_accelerates_mixed_precision_wrapper(preset):
    """accelerate wraps a prepared module's forward in autocast and converts its outputs to float32; the
    objective's output (per-image bits/dim) must be rebuilt intact, stay float32 and carry gradients."""
    from accelerate.utils import convert_outputs_to_fp32

    pipe = DiffEncPipeline.from_preset(str(preset))
    objective = DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder)
    forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(objective.forward))
    draws = step_randomness(0, 0, 0, 4, (1, 8, 8), rank=0, per_rank=4)
    terms = forward(
        load_digits_uint8("train")[:4], t=draws["t"], noise=draws["noise"], recon_noise=draws["recon_noise"]
    )
    assert isinstance(terms, DiffEncObjectiveOutput)
    assert set(terms) == {"loss", "t", *TERM_NAMES}
    assert all(terms[name].dtype == torch.float32 for name in ("loss", *TERM_NAMES))
    assert terms.bpd.shape == (4,)
    terms.loss.backward()
    assert objective.unet.conv_out.weight.grad.abs().sum() > 0


def test_step_randomness_is_keyed_by_global_position():
    whole = step_randomness(0, 5, 1, 8, (1, 2, 2), rank=0, per_rank=8)
    halves = [step_randomness(0, 5, 1, 8, (1, 2, 2), rank=r, per_rank=4) for r in (0, 1)]
    for name in ("t", "noise", "recon_noise", "flip"):
        assert torch.equal(whole[name], torch.cat([half[name] for half in halves]))
    t = whole["t"].sort().values
    assert torch.allclose(t[1:] - t[:-1], torch.full((7,), 1 / 8, dtype=torch.float64))
    assert not torch.equal(whole["noise"], step_randomness(0, 6, 1, 8, (1, 2, 2), 0, 8)["noise"])


def test_data_stream_splits_global_batches_across_processes():
    one = iter(StreamBatchSampler(10, 4, 1, 0, seed=3, start=0))
    two = [iter(StreamBatchSampler(10, 2, 2, rank, seed=3, start=0)) for rank in (0, 1)]
    batches = [next(one) for _ in range(5)]
    assert all(batch == next(two[0]) + next(two[1]) for batch in batches)
    # Every epoch is a permutation; resuming at position 8 continues the same stream.
    stream = [index for batch in batches for index in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    resumed = iter(StreamBatchSampler(10, 4, 1, 0, seed=3, start=8))
    assert next(resumed) == stream[8:12]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return write_tiny_preset(tmp_path_factory.mktemp("preset"))


def test_own_loop_with_training_step_matches_the_command_line(preset, tmp_path, monkeypatch, fresh_accelerator_state):
    """TrainingStep is what train_diffenc.py runs: a hand-written accelerate loop over it, with the same data
    stream, reaches bit for bit the parameters of the command line's checkpoint."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    path = Path(__file__).resolve().parents[1] / "training" / "train_diffenc.py"
    spec = importlib.util.spec_from_file_location("train_diffenc_for_step_test", path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)
    spec.loader.exec_module(script)
    flags = ["--max_train_steps", "3", "--checkpointing_steps", "3", "--validation_steps", "0", "--report_to", "none"]
    flags += ["--final_eval_num_images", "8", "--num_validation_images", "2", "--num_inference_steps", "2", "--cpu"]
    script.main(["--preset", str(preset), "--output_dir", str(tmp_path / "cli"), *flags])
    AcceleratorState._reset_state(reset_partial_state=True)

    torch.manual_seed(0)
    pipe = DiffEncPipeline.from_preset(str(preset))
    accelerator = Accelerator(cpu=True)
    objective = DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder)
    optimizer = torch.optim.AdamW(parameter_groups(objective, 0.01), lr=2e-3, betas=(0.9, 0.99), eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=2)
    prepared, optimizer = accelerator.prepare(objective, optimizer)
    ema = EMAModel(list(objective.parameters()), decay=0.9)
    step = TrainingStep(
        accelerator, prepared, optimizer, lr_scheduler, ema, seed=0, max_grad_norm=1.0, random_flip=True
    )
    train = load_digits_uint8("train")
    batches = iter(
        DataLoader(train, batch_sampler=StreamBatchSampler(len(train), 16, 1, 0, 0, 0), collate_fn=torch.stack)
    )
    prepared.train()
    outputs = [step(batches, number) for number in range(3)]
    assert all(output.num_images == 16 for output in outputs)
    assert all(
        output.bpd == pytest.approx(output.loss_recon + output.loss_klz + output.loss_diff) for output in outputs
    )

    saved = load_file(tmp_path / "cli" / "checkpoint-3" / "model.safetensors")
    state = objective.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[name], state[name]) for name in saved)
    shadow = load_file(tmp_path / "cli" / "checkpoint-3" / "ema.safetensors")
    names = [name for name, _ in objective.named_parameters()]
    assert all(torch.equal(shadow[name], value) for name, value in zip(names, ema.shadow_params, strict=True))


def test_training_step_refuses_other_modules_and_bad_clipping(fresh_accelerator_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="must be a DiffEncObjective"):
        TrainingStep(accelerator, module, optimizer, None)
    pipe = DiffEncPipeline.from_preset("digits-vdm")
    objective = DiffEncObjective(pipe.unet, pipe.scheduler)
    with pytest.raises(ValueError, match="`max_grad_norm` must be positive or None"):
        TrainingStep(accelerator, objective, optimizer, None, max_grad_norm=0.0)


def test_monotone_schedule_interior_is_clipped_apart_from_the_networks(fresh_accelerator_state):
    """The interior's variance gradient is far larger than the networks' ELBO gradient; each group is clipped to
    the norm on its own (SGD with lr 1, so an update is minus the clipped gradient)."""
    from accelerate import Accelerator

    from diffenc_diffusers import VDMScheduler, VDMUNetModel
    from diffenc_diffusers.training.randomness import dropout_seed

    def build() -> DiffEncObjective:
        torch.manual_seed(0)
        unet = VDMUNetModel(sample_size=8, in_channels=1, hidden_channels=16, num_layers=1, norm_num_groups=8)
        torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
        return DiffEncObjective(unet, VDMScheduler(schedule="learned_monotone"))

    images = load_digits_uint8("train")[:8]
    reference = build()
    draws = step_randomness(0, 0, 0, 8, (1, 8, 8), rank=0, per_rank=8)
    torch.manual_seed(dropout_seed(0, 0, 0, 0))
    reference(images, t=draws["t"], noise=draws["noise"], recon_noise=draws["recon_noise"]).loss.backward()
    groups = {
        interior: [
            p.grad for name, p in reference.named_parameters() if name.startswith("monotone_schedule.") == interior
        ]
        for interior in (False, True)
    }
    norms = {
        interior: torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) for interior, grads in groups.items()
    }
    assert norms[True] > 10 * norms[False]

    max_norm = float(norms[False]) / 2
    objective = build()
    before = {name: p.detach().clone() for name, p in objective.named_parameters()}
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(objective.parameters(), lr=1.0)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prepared, optimizer = accelerator.prepare(objective, optimizer)
    output = TrainingStep(accelerator, prepared, optimizer, lr_scheduler, max_grad_norm=max_norm)(iter([images]), 0)
    assert output.grad_norm == pytest.approx(float(norms[False]), rel=1e-5)
    for interior in (False, True):
        names = [name for name, _ in objective.named_parameters() if name.startswith("monotone_schedule.") == interior]
        update = torch.linalg.vector_norm(
            torch.stack([(before[name] - dict(objective.named_parameters())[name]).norm() for name in names])
        )
        assert float(update) == pytest.approx(max_norm, rel=1e-4)
