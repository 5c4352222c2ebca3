"""Class-conditional DiffEnc: class_labels in the denoiser and the encoder, the conditional ELBO, guided sampling."""

import json

import pytest
import torch
from conftest import make_encoder, make_unet

from diffenc_diffusers import DiffEncObjective, DiffEncPipeline, VDMScheduler
from diffenc_diffusers.discretization import grid_to_uint8

CONDITIONAL = {"num_class_embeds": 3, "null_class": True}


def conditional_pipeline(dtype=torch.float64, null_class=True):
    classes = {"num_class_embeds": 3, "null_class": null_class}
    unet, encoder = make_unet(dtype, **classes), make_encoder(dtype, **classes)
    pipe = DiffEncPipeline(unet=unet, scheduler=VDMScheduler(encoder_type="trainable"), encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_unconditional_models_are_unchanged_and_fresh_conditional_ones_equal_them():
    sample, gamma = torch.randn(2, 1, 8, 8), torch.tensor([-3.0, 2.0])
    for make in (make_unet, make_encoder):
        unconditional, conditional = make(perturb=False), make(perturb=False, **CONDITIONAL)
        assert unconditional.class_embedding is None and unconditional.config.num_class_embeds is None
        plain, extra = unconditional.state_dict(), conditional.state_dict()
        assert set(extra) - set(plain) == {"class_embedding.embedding.weight"}
        assert all(torch.equal(plain[name], extra[name]) for name in plain)
        # Zero-initialised class vectors: the same output for every label.
        torch.nn.init.normal_(unconditional.conv_out.weight, std=0.1)  # a non-zero output
        conditional.conv_out.load_state_dict(unconditional.conv_out.state_dict())
        reference = unconditional(sample, gamma).sample
        for label in (0, 3):
            torch.testing.assert_close(conditional(sample, gamma, class_labels=torch.tensor(label)).sample, reference)


def test_saved_unconditional_folder_without_the_new_keys_loads_and_gives_identical_outputs(tmp_path, images):
    pipe = DiffEncPipeline(unet=make_unet(), scheduler=VDMScheduler(encoder_type="trainable"), encoder=make_encoder())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    for component in ("unet", "encoder"):  # as written before class conditioning existed
        path = tmp_path / component / "config.json"
        config = json.loads(path.read_text())
        del config["num_class_embeds"], config["null_class"]
        path.write_text(json.dumps(config))
    loaded = DiffEncPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.class_embedding is None and loaded.encoder.class_embedding is None
    outputs = []
    for p in (pipe, loaded):
        samples = p(batch_size=2, num_inference_steps=5, output_type="pt", generator=torch.Generator().manual_seed(0))
        bpd = p.bits_per_dim(images, generator=torch.Generator().manual_seed(0), show_progress=False).bpd
        outputs.append((samples.images, bpd))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize(
    ("config", "kwargs", "error", "match"),
    [
        ({}, {"class_labels": torch.tensor([0, 1])}, ValueError, r"this model is unconditional"),
        (CONDITIONAL, {}, ValueError, r"class-conditional \(`num_class_embeds=3`\): pass `class_labels`"),
        (CONDITIONAL, {"class_labels": torch.tensor([0, 4])}, ValueError, r"labels 0 \.\. 2, or 3 \(the null"),
        ({"num_class_embeds": 3}, {"class_labels": torch.tensor([3, 0])}, ValueError, r"labels 0 \.\. 2; got"),
        (CONDITIONAL, {"class_labels": torch.tensor([0.0, 1.0])}, TypeError, r"integer torch.Tensor"),
        (CONDITIONAL, {"class_labels": [0, 1]}, TypeError, r"integer torch.Tensor"),
        (CONDITIONAL, {"class_labels": torch.tensor([0, 1, 2])}, ValueError, r"shape \(2,\), got \(3,\)"),
    ],
)
def test_bad_class_labels_raise(config, kwargs, error, match):
    for model in (make_unet(perturb=False, **config), make_encoder(perturb=False, **config)):
        with pytest.raises(error, match=match):
            model(torch.randn(2, 1, 8, 8), 0.5, **kwargs)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"num_class_embeds": 0}, ValueError, r"`num_class_embeds` must be an int >= 1"),
        ({"num_class_embeds": 2.0}, TypeError, r"`num_class_embeds` must be an int"),
        ({"null_class": True}, ValueError, r"`null_class=True` needs `num_class_embeds`"),
        ({"num_class_embeds": 2, "null_class": 1}, TypeError, r"`null_class` must be a bool"),
    ],
)
def test_bad_class_config_raises(config, error, match):
    for make in (make_unet, make_encoder):
        with pytest.raises(error, match=match):
            make(perturb=False, **config)


def test_conditional_elbo_is_per_image_and_trains_both_class_embeddings(images):
    pipe = conditional_pipeline()
    objective = DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder)
    draws = torch.Generator().manual_seed(0)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    noise, recon_noise = (torch.randn(images.shape, generator=draws, dtype=torch.float64) for _ in range(2))
    labels = torch.tensor([0, 1, 2, 3])
    out = objective(images, t=t, noise=noise, recon_noise=recon_noise, class_labels=labels)
    for i in range(len(images)):
        alone = objective(
            images[i : i + 1], t=t[i : i + 1], noise=noise[i : i + 1], recon_noise=recon_noise[i : i + 1],
            class_labels=labels[i : i + 1],
        )  # fmt: skip
        torch.testing.assert_close(alone.bpd, out.bpd[i : i + 1])
    other = objective(images, t=t, noise=noise, recon_noise=recon_noise, class_labels=labels.flip(0))
    assert (other.bpd - out.bpd).abs().min() > 1e-6
    out.loss.backward()
    for model in (objective.unet, objective.encoder):
        grad = model.class_embedding.embedding.weight.grad
        assert grad is not None and (grad.abs().sum(dim=1) > 0).all()

    discrete = DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder, num_timesteps=10)
    steps = [
        discrete(images, t=t, noise=noise, recon_noise=recon_noise, class_labels=c).bpd
        for c in (labels, labels.flip(0))
    ]
    assert torch.isfinite(steps[0]).all() and (steps[0] - steps[1]).abs().min() > 1e-6

    with pytest.raises(ValueError, match="pass `class_labels` of shape \\(4,\\)"):
        objective(images)
    unconditional = DiffEncObjective(make_unet(), VDMScheduler())
    with pytest.raises(ValueError, match="neither the denoiser nor the encoder is class-conditional"):
        unconditional(images, class_labels=labels)


def test_bits_per_dim_with_class_labels_equals_the_objective(images):
    pipe = conditional_pipeline()
    labels = torch.tensor([2, 0, 1, 1])
    result = pipe.bits_per_dim(images, batch_size=3, class_labels=labels, generator=torch.Generator().manual_seed(4))
    objective = DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        expected = torch.cat(
            [
                objective(images[:3], generator=generator, class_labels=labels[:3]).bpd,
                objective(images[3:], generator=generator, class_labels=labels[3:]).bpd,
            ]
        )
    torch.testing.assert_close(result.bpd, expected.float())
    with pytest.raises(ValueError, match="pass `class_labels`, one label per image"):
        pipe.bits_per_dim(images)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        pipe.bits_per_dim(images, class_labels=labels[:2])
    loader = torch.utils.data.DataLoader(images, batch_size=2)
    with pytest.raises(TypeError, match="as a uint8 tensor"):
        pipe.bits_per_dim(loader, class_labels=labels)


def likelihood(pipe, source, seed=4, **kwargs):
    return pipe.bits_per_dim(source, generator=torch.Generator().manual_seed(seed), show_progress=False, **kwargs)


def assert_same(a, b):
    for name in ("bpd", "loss_recon", "loss_klz", "loss_diff"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def labelled_dataset(images, labels, label_feature):
    """A datasets.Dataset of PIL images with a label column "digit" of the given feature type."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    features = datasets.Features({"picture": datasets.Image(), "digit": label_feature})
    rows = {"picture": [Image.fromarray(x[0].numpy(), mode="L") for x in images], "digit": labels.tolist()}
    return datasets.Dataset.from_dict(rows, features=features)


def test_bits_per_dim_reads_the_labels_of_dataloaders_and_datasets(images):
    datasets = pytest.importorskip("datasets")
    pipe = conditional_pipeline()
    labels = torch.tensor([2, 0, 3, 1])  # 3 is the null class
    expected = likelihood(pipe, images, batch_size=2, class_labels=labels)
    assert (expected.bpd - likelihood(pipe, images, batch_size=2, class_labels=labels.flip(0)).bpd).abs().min() > 0

    pairs = torch.utils.data.TensorDataset(images, labels)
    assert_same(likelihood(pipe, torch.utils.data.DataLoader(pairs, batch_size=2)), expected)
    as_lists = torch.utils.data.DataLoader(
        pairs, batch_size=2, collate_fn=lambda b: [torch.stack(c) for c in zip(*b, strict=True)]
    )
    assert_same(likelihood(pipe, as_lists), expected)
    for key in ("label", "labels", "class_labels"):
        dicts = [{"image": x, key: int(c), "index": i} for i, (x, c) in enumerate(zip(images, labels, strict=True))]
        assert_same(likelihood(pipe, torch.utils.data.DataLoader(dicts, batch_size=2)), expected)
    dicts = [{"image": x, "y": int(c), "label": 0} for x, c in zip(images, labels, strict=True)]
    assert_same(likelihood(pipe, torch.utils.data.DataLoader(dicts, batch_size=2), label_column="y"), expected)

    class_label = labelled_dataset(images, labels.clamp(max=2), datasets.ClassLabel(num_classes=3))
    assert_same(
        likelihood(pipe, class_label, batch_size=2),
        likelihood(pipe, images, batch_size=2, class_labels=labels.clamp(max=2)),
    )
    integers = labelled_dataset(images, labels, datasets.Value("int32"))
    assert_same(likelihood(pipe, integers, batch_size=2, label_column="digit"), expected)
    with pytest.raises(
        ValueError,
        match=r"none of the dataset's columns \['picture', 'digit'\] is a datasets.ClassLabel.*pass `label_column`",
    ):
        likelihood(pipe, integers, batch_size=2)


def test_unconditional_pipeline_ignores_the_labels_of_a_loader_but_refuses_class_labels(images):
    datasets = pytest.importorskip("datasets")
    pipe = DiffEncPipeline(unet=make_unet(), scheduler=VDMScheduler(encoder_type="trainable"), encoder=make_encoder())
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([2, 0, 9, 1])  # not checked: never read
    expected = likelihood(pipe, images, batch_size=2)
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=2)
    assert_same(likelihood(pipe, pairs), expected)
    dicts = torch.utils.data.DataLoader(
        [{"image": x, "y": int(c)} for x, c in zip(images, labels, strict=True)], batch_size=2
    )
    assert_same(likelihood(pipe, dicts, label_column="y"), expected)
    dataset = labelled_dataset(images, labels, datasets.ClassLabel(num_classes=10))
    assert_same(likelihood(pipe, dataset, batch_size=2), expected)
    with pytest.raises(ValueError, match="`class_labels` were given, but this pipeline's models are unconditional"):
        likelihood(pipe, images, class_labels=labels)
    with pytest.raises(ValueError, match="`label_column` 'z' is not among the keys of batch 0 of the DataLoader"):
        likelihood(pipe, dicts, label_column="z")


def test_labels_missing_or_wrong_in_a_loader_or_dataset_raise(images):
    datasets = pytest.importorskip("datasets")
    pipe = conditional_pipeline()
    loader = torch.utils.data.DataLoader
    with pytest.raises(ValueError, match=r"batch 0 of the DataLoader holds no class labels.*got a Tensor"):
        likelihood(pipe, loader(images, batch_size=2))
    with pytest.raises(ValueError, match=r"holds no class labels.*got a list of length 1"):
        likelihood(pipe, loader(torch.utils.data.TensorDataset(images), batch_size=2))
    with pytest.raises(
        ValueError, match=r"several of the keys .* \['image', 'label', 'labels'\] are named .* pass `label_column`"
    ):
        likelihood(pipe, loader([{"image": x, "label": 0, "labels": 1} for x in images], batch_size=2))
    with pytest.raises(
        ValueError, match=r"labels of batch 1 of the DataLoader must hold labels 0 \.\. 2, or 3 \(the null"
    ):
        likelihood(pipe, loader(torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2, 4])), batch_size=2))
    with pytest.raises(TypeError, match=r"labels of batch 0 of the DataLoader must be integer class labels.*float32"):
        likelihood(pipe, loader(torch.utils.data.TensorDataset(images, torch.zeros(4)), batch_size=2))
    with pytest.raises(ValueError, match=r"`label_column` \('y'\) names a key of dict batches, but batch 0"):
        likelihood(pipe, loader(torch.utils.data.TensorDataset(images, torch.zeros(4)), batch_size=2), label_column="y")
    with pytest.raises(
        ValueError, match=r"`label_column` \('y'\) names a dict key .* pass their labels as `class_labels`"
    ):
        likelihood(pipe, images, label_column="y", class_labels=torch.zeros(4, dtype=torch.long))
    floats = labelled_dataset(images, torch.zeros(4), datasets.Value("float32"))
    with pytest.raises(TypeError, match=r"column 'digit' holds float32 values; class labels must be integers"):
        likelihood(pipe, floats, label_column="digit")
    with pytest.raises(ValueError, match=r"`label_column` 'y' is not among the dataset's columns"):
        likelihood(pipe, floats, label_column="y")
    out_of_range = labelled_dataset(images, torch.tensor([0, 1, 5, 0]), datasets.ClassLabel(num_classes=6))
    with pytest.raises(ValueError, match=r"labels of examples 2 \.\. 3 of the dataset \(column 'digit'\) must hold"):
        likelihood(pipe, out_of_range, batch_size=2)


def reference_guided_samples(pipe, labels, guidance_scale, steps, seed):
    """The guided sampler written out: out(null) + s (out(c) - out(null)) with separate network calls."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((len(labels), 1, 8, 8), generator=generator, dtype=torch.float64)
    null = torch.full_like(labels, pipe.unet.config.num_class_embeds)
    with torch.no_grad():
        for t in scheduler.timesteps:
            gamma = scheduler.gamma(t).expand(len(labels))
            conditional = pipe.unet(sample, gamma, class_labels=labels).sample
            unconditional = pipe.unet(sample, gamma, class_labels=null).sample
            output = unconditional + guidance_scale * (conditional - unconditional)
            sample = scheduler.step(output, t, sample, generator=generator).prev_sample
    return sample


@pytest.mark.parametrize("guidance_scale", [1.0, 0.0, 3.0])
def test_guided_sampling_matches_the_written_out_sampler(guidance_scale):
    pipe = conditional_pipeline()
    labels = torch.tensor([0, 2, 1])
    generator = torch.Generator().manual_seed(5)
    images = pipe(
        batch_size=3, num_inference_steps=4, output_type="pt", generator=generator, class_labels=labels,
        guidance_scale=guidance_scale,
    ).images  # fmt: skip
    expected = reference_guided_samples(pipe, labels, guidance_scale, 4, seed=5)
    assert torch.equal(images, grid_to_uint8(expected).to(torch.float32) / 255.0)
    if guidance_scale == 1.0:
        generator = torch.Generator().manual_seed(5)
        listed = pipe(
            batch_size=3, num_inference_steps=4, output_type="pt", generator=generator, class_labels=[0, 2, 1]
        )
        assert torch.equal(listed.images, images)


def test_sampling_errors_name_the_argument():
    pipe = conditional_pipeline(null_class=False)
    with pytest.raises(ValueError, match=r"pass `class_labels`, one label per image \(2\)"):
        pipe(batch_size=2, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"shape \(2,\); got \(3,\)\. Pass batch_size=len"):
        pipe(batch_size=2, num_inference_steps=2, class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"needs a denoiser with a null class"):
        pipe(batch_size=2, num_inference_steps=2, class_labels=[0, 1], guidance_scale=2.0)
    with pytest.raises(TypeError, match=r"`guidance_scale` must be a float"):
        pipe(batch_size=2, num_inference_steps=2, class_labels=[0, 1], guidance_scale="2")
    unconditional = DiffEncPipeline(unet=make_unet(), scheduler=VDMScheduler())
    with pytest.raises(ValueError, match=r"need a class-conditional denoiser"):
        unconditional(batch_size=2, num_inference_steps=2, class_labels=[0, 1])


def test_conditional_pipeline_round_trips(tmp_path):
    pipe = conditional_pipeline(torch.float32)
    pipe.save_pretrained(tmp_path)
    loaded = DiffEncPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.config.num_class_embeds == 3 and loaded.encoder.config.null_class is True
    samples = [
        p(
            batch_size=2, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0),
            class_labels=[1, 2], guidance_scale=2.0,
        ).images
        for p in (pipe, loaded)
    ]  # fmt: skip
    assert torch.equal(samples[0], samples[1])
