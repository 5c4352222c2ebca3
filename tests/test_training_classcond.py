"""Class-conditional training: labels from the data stream, label dropout to the null class (seeded, drawn after
every earlier draw), and the command line on a conditional preset (labels checked, conditional and
unconditional test bits/dim, exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_unet, write_conditional_preset, write_tiny_preset
from safetensors.torch import load_file
from test_training import FAST, REPO_ROOT, run, tensors_equal, train_command, train_diffenc
from torch.utils.data import DataLoader

from diffenc_diffusers import DiffEncObjective, DiffEncPipeline, VDMScheduler
from diffenc_diffusers.data import load_builtin_dataset, load_digits_uint8
from diffenc_diffusers.training import StreamBatchSampler, TrainingStep, step_randomness
from diffenc_diffusers.training.randomness import _SALT_BATCH, derive_seed


def test_label_dropout_draw_comes_after_and_leaves_the_earlier_draws_unchanged():
    """Runs trained before label dropout existed keep their exact draws: t, eps, eps_0 and flips are the first
    draws of the step's generator, in this order, and the label uniforms come after them."""
    shape = (1, 2, 2)
    generator = torch.Generator().manual_seed(derive_seed(3, 7, 1, _SALT_BATCH))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    expected = {
        "t": torch.remainder(u + torch.arange(6, dtype=torch.float64) / 6, 1.0),
        "noise": torch.randn((6, *shape), generator=generator),
        "recon_noise": torch.randn((6, *shape), generator=generator),
        "flip": torch.rand(6, generator=generator) < 0.5,
        "label_uniform": torch.rand(6, generator=generator),
    }
    draws = step_randomness(3, 7, 1, 6, shape, rank=0, per_rank=6)
    assert draws.keys() == expected.keys()
    assert all(torch.equal(draws[name], value) for name, value in expected.items())
    halves = [step_randomness(3, 7, 1, 6, shape, rank=r, per_rank=3) for r in (0, 1)]
    assert torch.equal(draws["label_uniform"], torch.cat([half["label_uniform"] for half in halves]))


def conditional_objective(null_class: bool = True) -> DiffEncObjective:
    unet = make_unet(num_class_embeds=3, null_class=null_class)
    return DiffEncObjective(unet, VDMScheduler())


def one_step(objective, batches, **options):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prepared, optimizer = accelerator.prepare(objective, optimizer)
    step = TrainingStep(accelerator, prepared, optimizer, lr_scheduler, seed=5, **options)
    return step(iter(batches), 2)


def test_label_dropout_trains_on_the_null_class_exactly_where_drawn(monkeypatch, fresh_accelerator_state):
    seen = []
    forward = DiffEncObjective.forward

    def recording_forward(self, images, *args, class_labels=None, **kwargs):
        seen.append(class_labels.clone())
        return forward(self, images, *args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(DiffEncObjective, "forward", recording_forward)
    images = load_digits_uint8("train")[:16]
    labels = torch.arange(16) % 3
    one_step(conditional_objective(), [(images, labels)], class_dropout_prob=0.5)
    uniform = step_randomness(5, 2, 0, 16, (1, 8, 8), rank=0, per_rank=16)["label_uniform"]
    expected = torch.where(uniform < 0.5, torch.full_like(labels, 3), labels)
    assert torch.equal(seen[0], expected)
    assert 0 < int((seen[0] == 3).sum()) < 16  # both kinds occur in this draw
    one_step(conditional_objective(), [(images, labels)])
    assert torch.equal(seen[1], labels)


def test_unconditional_training_ignores_labels_in_the_stream(fresh_accelerator_state):
    images = load_digits_uint8("train")[:8]
    outputs, states = [], []
    for batch in (images, (images, torch.zeros(8, dtype=torch.long))):
        objective = DiffEncObjective(make_unet(), VDMScheduler())
        outputs.append(one_step(objective, [batch]))
        states.append(objective.state_dict())
    assert outputs[0] == outputs[1]
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


def test_training_step_refuses_what_label_dropout_or_a_conditional_model_cannot_use(fresh_accelerator_state):
    images = load_digits_uint8("train")[:4]
    with pytest.raises(ValueError, match="this model is unconditional"):
        one_step(DiffEncObjective(make_unet(), VDMScheduler()), [images], class_dropout_prob=0.1)
    with pytest.raises(ValueError, match="has no null class"):
        one_step(conditional_objective(null_class=False), [images], class_dropout_prob=0.1)
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="`class_dropout_prob` must be a float in \\[0, 1\\)"):
            one_step(conditional_objective(), [images], class_dropout_prob=bad)
    with pytest.raises(ValueError, match="must yield \\(images, labels\\) pairs"):
        one_step(conditional_objective(), [images])
    with pytest.raises(ValueError, match="must have shape \\(4,\\), got \\(3,\\)"):
        one_step(conditional_objective(), [(images, torch.zeros(3, dtype=torch.long))])
    with pytest.raises(ValueError, match="must be \\(images, labels\\), got 3 elements"):
        one_step(conditional_objective(), [(images, images, images)])


def test_objective_refuses_networks_that_disagree_on_the_classes():
    from conftest import make_encoder

    scheduler = VDMScheduler(encoder_type="trainable")
    with pytest.raises(ValueError, match="must agree on the classes"):
        DiffEncObjective(make_unet(num_class_embeds=3), scheduler, make_encoder(num_class_embeds=4))
    with pytest.raises(ValueError, match="must agree on the classes"):
        DiffEncObjective(make_unet(num_class_embeds=3, null_class=True), scheduler, make_encoder(num_class_embeds=3))
    objective = DiffEncObjective(make_unet(), scheduler, make_encoder(num_class_embeds=3, null_class=True))
    assert (objective.num_classes, objective.null_label) == (3, 3)
    assert DiffEncObjective(make_unet(num_class_embeds=3), VDMScheduler()).null_label is None
    assert DiffEncObjective(make_unet(), VDMScheduler()).num_classes is None


@pytest.fixture(scope="module")
def conditional_preset(tmp_path_factory) -> Path:
    return write_conditional_preset(tmp_path_factory.mktemp("conditional"))


def test_conditional_run_learns_the_classes_and_reports_both_elbos(conditional_preset, tmp_path):
    output = tmp_path / "run"
    run(train_command(conditional_preset, output, "--validation_steps", "3", "--checkpointing_steps", "3"))
    result = json.loads((output / "test_bpd.json").read_text())
    assert result["num_classes"] == 10
    conditional, unconditional = result["continuous"], result["continuous"]["unconditional"]
    assert conditional["num_images"] == unconditional["num_images"] == 32
    card = (output / "README.md").read_text()
    assert "Conditional negative ELBO" in card and "test bits/dim of the null class" in card
    pipe = DiffEncPipeline.from_pretrained(str(output))
    assert pipe.unet.config.num_class_embeds == 10 and pipe.encoder.config.null_class
    assert pipe.unet.class_embedding.embedding.weight.abs().max() > 0
    assert pipe.encoder.class_embedding.embedding.weight.abs().max() > 0
    # The saved pipeline's ELBO on the test labels (and on the null class) is what the run reported.
    images, labels = load_builtin_dataset("digits", "test")
    from diffenc_diffusers.evaluation import bits_per_dim_terms, summarize_terms

    for class_labels, reported in ((labels[:32], conditional), (torch.full((32,), 10), unconditional)):
        summary = summarize_terms(bits_per_dim_terms(pipe, images[:32], 32, class_labels=class_labels))
        assert summary["bpd"] == pytest.approx(reported["bpd"], rel=1e-5)
    assert conditional["bpd"] != unconditional["bpd"]
    gain = conditional["class_gain"]
    assert gain["bpd_difference"] == pytest.approx(conditional["bpd"] - unconditional["bpd"], abs=1e-9)
    assert gain["max_gain"] == pytest.approx(torch.log2(torch.tensor(10.0)).item() / 64)

    # Resumed from step 3, the run ends with the same parameters: the labelled data stream and the label dropout
    # continue exactly.
    resumed = tmp_path / "resumed"
    run(train_command(conditional_preset, resumed, "--max_train_steps", "3", "--checkpointing_steps", "3"))
    run(train_command(conditional_preset, resumed, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "3"))
    for name in (
        "checkpoint-6/model.safetensors",
        "checkpoint-6/ema.safetensors",
        "checkpoint-6/optimizer.safetensors",
    ):
        assert tensors_equal(output / name, resumed / name), name


def test_own_conditional_loop_matches_the_command_line(conditional_preset, tmp_path, fresh_accelerator_state):
    """A loop over TrainingStep with the labelled data stream reaches the command line's parameters bit for bit."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler

    flags = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "0", "--report_to", "none"]
    train_diffenc.main(
        ["--preset", str(conditional_preset), "--output_dir", str(tmp_path / "cli"), *FAST, *flags, "--cpu"]
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    pipe = DiffEncPipeline.from_preset(str(conditional_preset))
    accelerator = Accelerator(cpu=True)
    objective = DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder)
    from diffenc_diffusers.training import parameter_groups

    optimizer = torch.optim.AdamW(parameter_groups(objective, 0.01), lr=2e-3, betas=(0.9, 0.99), eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=2)
    prepared, optimizer = accelerator.prepare(objective, optimizer)
    step = TrainingStep(
        accelerator, prepared, optimizer, lr_scheduler, seed=0, max_grad_norm=1.0, random_flip=True,
        class_dropout_prob=0.2,
    )  # fmt: skip
    images, labels = load_builtin_dataset("digits", "train")
    pairs = torch.utils.data.TensorDataset(images, labels)
    batches = iter(DataLoader(pairs, batch_sampler=StreamBatchSampler(len(images), 16, 1, 0, 0, 0)))
    prepared.train()
    for number in range(2):
        step(batches, number)
    saved = load_file(tmp_path / "cli" / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(saved[name], value) for name, value in objective.state_dict().items())


@pytest.mark.parametrize(
    "flags, preset_kind, message",
    [
        (["--class_dropout_prob", "0.1"], "unconditional", "needs a class-conditional preset"),
        ([], "five classes", "num_class_embeds=5"),
        (["--dataset", "digits", "--label_column", "label"], "conditional", "comes with its labels"),
    ],
)
def test_conditional_flags_and_data_fail_before_training(flags, preset_kind, message, tmp_path):
    if preset_kind == "unconditional":
        preset = write_tiny_preset(tmp_path / "preset")
    else:
        preset = write_conditional_preset(tmp_path / "preset", num_classes=5 if preset_kind == "five classes" else 10)
    with pytest.raises(ValueError, match=message):
        train_diffenc.prepare(train_diffenc.parse_args(train_command(preset, tmp_path / "out", *flags)[2:]))


def test_conditional_preset_on_data_without_labels_names_the_label_column(conditional_preset, tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(20):
        pixels = torch.randint(0, 256, (8, 8), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    data = ["--train_data_dir", str(tmp_path / "images")]
    args = train_diffenc.parse_args(["--preset", str(conditional_preset), "--output_dir", str(tmp_path / "out"), *data])
    with pytest.raises(ValueError, match="has no class labels: name their column with --label_column"):
        train_diffenc.prepare(args)


def test_conditional_presets_build_and_differ_from_their_unconditional_ones_only_by_classes():
    for dataset in ("digits", "mnist5k"):
        folder = REPO_ROOT / "diffenc_diffusers" / "presets"
        conditional = json.loads(
            (folder / f"{dataset}-diffenc-trainable-classcond" / "training_config.json").read_text()
        )
        unconditional = json.loads((folder / f"{dataset}-diffenc-trainable" / "training_config.json").read_text())
        assert conditional == {**unconditional, "class_dropout_prob": 0.1}
        for component in ("unet", "encoder"):
            with_classes = json.loads(
                (folder / f"{dataset}-diffenc-trainable-classcond" / component / "config.json").read_text()
            )
            without = json.loads((folder / f"{dataset}-diffenc-trainable" / component / "config.json").read_text())
            assert with_classes == {**without, "num_class_embeds": 10, "null_class": True}
