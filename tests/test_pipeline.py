"""Tests of DiffEncPipeline: sampling, bits_per_dim, save/load, dtypes and bad input.

Modelled on diffusers' PipelineTesterMixin (components, save/load equivalence, dict vs tuple outputs, batch
consistency, determinism, dtype), with tiny networks so that the whole file runs in seconds on a CPU.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import perturb_
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

from diffenc_diffusers import DiffEncObjective, DiffEncPipeline, VDMScheduler
from diffenc_diffusers.models import DiffEncEncoderModel, VDMUNetModel
from diffenc_diffusers.pipeline_diffenc import DiffEncLikelihoodOutput

CHANNELS, SIZE = 1, 4
ENCODER_TYPES = ["none", "nontrainable", "trainable"]


def make_components(encoder_type: str = "trainable", seed: int = 0, channels: int = CHANNELS, dropout=0.0):
    torch.manual_seed(seed)
    unet = VDMUNetModel(
        sample_size=SIZE, in_channels=channels, hidden_channels=8, num_layers=1, norm_num_groups=4, dropout=dropout
    )
    components = {"unet": perturb_(unet, seed=seed), "scheduler": VDMScheduler(encoder_type=encoder_type)}
    if encoder_type == "trainable":
        encoder = DiffEncEncoderModel(
            sample_size=SIZE,
            in_channels=channels,
            block_out_channels=[8],
            layers_per_block=1,
            norm_num_groups=4,
            dropout=dropout,
        )
        components["encoder"] = perturb_(encoder, seed=seed + 1)
    return components


def make_pipeline(encoder_type: str = "trainable", **kwargs) -> DiffEncPipeline:
    pipe = DiffEncPipeline(**make_components(encoder_type, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: DiffEncPipeline, seed: int = 0, **kwargs):
    options = {"batch_size": 2, "num_inference_steps": 4, "output_type": "pt"}
    options.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **options).images


def uint8_images(count: int = 5, seed: int = 3, channels: int = CHANNELS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, channels, SIZE, SIZE), generator=generator, dtype=torch.uint8)


def bpd(pipe: DiffEncPipeline, images, seed: int = 0, **kwargs) -> DiffEncLikelihoodOutput:
    return pipe.bits_per_dim(images, generator=torch.Generator().manual_seed(seed), show_progress=False, **kwargs)


def public_config(component) -> dict:
    """A component's config without diffusers' bookkeeping entries (names starting with "_")."""
    return {key: value for key, value in component.config.items() if not key.startswith("_")}


def assert_same_likelihood(a: DiffEncLikelihoodOutput, b: DiffEncLikelihoodOutput) -> None:
    for name in ("bpd", "loss_recon", "loss_klz", "loss_diff"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ components


def test_components_and_optional_encoder():
    pipe = make_pipeline("trainable")
    assert set(pipe.components) == {"unet", "scheduler", "encoder"}
    assert pipe.model_cpu_offload_seq == "unet"
    assert pipe.image_shape == (CHANNELS, SIZE, SIZE)
    vdm = make_pipeline("none")
    assert vdm.encoder is None
    assert vdm.config.encoder == (None, None)


def test_constructor_rejects_inconsistent_components():
    components = make_components("trainable")
    with pytest.raises(TypeError, match="VDMScheduler"):
        DiffEncPipeline(components["unet"], object())
    with pytest.raises(TypeError, match=r"VDMSchedulerMixin.*DDIMScheduler"):
        DiffEncPipeline(components["unet"], DDIMScheduler())
    with pytest.raises(ValueError, match="encoder_type"):
        DiffEncPipeline(components["unet"], VDMScheduler(encoder_type="nontrainable"), components["encoder"])
    other = make_components("trainable", channels=3)["encoder"]
    with pytest.raises(ValueError, match="3 channels"):
        DiffEncPipeline(components["unet"], components["scheduler"], other)


# ------------------------------------------------------------------------------------------ sampling


def test_output_types_hold_exact_8bit_values():
    pipe = make_pipeline("trainable")
    pt = sample(pipe, output_type="pt")
    assert pt.shape == (2, CHANNELS, SIZE, SIZE) and pt.dtype == torch.float32
    assert pt.min() >= 0.0 and pt.max() <= 1.0
    k = (pt * 255).round()
    assert torch.equal(k / 255, pt)
    np_images = sample(pipe, output_type="np")
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, SIZE, SIZE, CHANNELS)
    np.testing.assert_array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())
    pil = sample(pipe, output_type="pil")
    assert len(pil) == 2 and all(isinstance(image, Image.Image) and image.mode == "L" for image in pil)
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in pil]), k[:, 0].numpy().astype(np.uint8))


def test_sampler_matches_reference_ancestral_and_deterministic_steps():
    """The pipeline's loop against DESIGN.md's sampler written out here, in float64, for eta = 1 and 0."""
    pipe = make_pipeline("trainable").to(torch.float64)
    steps = 3
    for eta in (1.0, 0.0):
        generator = torch.Generator().manual_seed(5)
        z = torch.randn((2, CHANNELS, SIZE, SIZE), generator=generator, dtype=torch.float64)
        for i in range(steps):
            gamma_t = torch.tensor(-13.3 + 18.3 * (steps - i) / steps, dtype=torch.float64)
            gamma_s = torch.tensor(-13.3 + 18.3 * (steps - i - 1) / steps, dtype=torch.float64)
            alpha_t, sigma_t = torch.sigmoid(-gamma_t).sqrt(), torch.sigmoid(gamma_t).sqrt()
            alpha_s, sigma_s = torch.sigmoid(-gamma_s).sqrt(), torch.sigmoid(gamma_s).sqrt()
            v_hat = pipe.unet(z, gamma_t.expand(2)).sample
            x_hat = alpha_t * z - sigma_t * v_hat
            delta = gamma_s - gamma_t
            if eta == 1.0:
                mean = (
                    alpha_s / alpha_t * torch.exp(delta) * z
                    - alpha_s * torch.expm1(delta) * x_hat
                    - alpha_s * delta * sigma_t**2 * x_hat
                )
                noise = torch.randn(z.shape, generator=generator, dtype=torch.float64)
                z = mean + sigma_s * torch.sqrt(-torch.expm1(delta)) * noise
            else:
                eps_hat = (z - alpha_t * x_hat) / sigma_t
                z = alpha_s * x_hat * (1 - delta * sigma_t**2) + sigma_s * eps_hat
        alpha_0 = torch.sigmoid(torch.tensor(13.3, dtype=torch.float64)).sqrt()
        expected = torch.floor((z / alpha_0 + 1) * 128).clamp(0, 255) / 255
        images = sample(pipe, seed=5, num_inference_steps=steps, eta=eta)
        assert images.dtype == torch.float32
        torch.testing.assert_close(images, expected.float(), rtol=0, atol=0)


def test_dict_and_tuple_outputs_are_equal():
    pipe = make_pipeline("nontrainable")
    as_dict = sample(pipe)
    as_tuple = pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=4,
        output_type="pt",
        return_dict=False,
    )
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_dict, as_tuple[0])


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_same_generator_same_images_and_other_seed_differs(eta):
    pipe = make_pipeline("trainable")
    first = sample(pipe, seed=1, eta=eta, output_type="np")
    np.testing.assert_array_equal(first, sample(pipe, seed=1, eta=eta, output_type="np"))
    assert not np.array_equal(first, sample(pipe, seed=2, eta=eta, output_type="np"))


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_batch_equals_images_sampled_one_by_one(eta):
    # float64: the sampler divides by sigma_t, so with an untrained network the float32 rounding differences
    # of batched and single convolutions (~1e-7) can move a pixel across a grid boundary.
    pipe = make_pipeline("trainable").to(torch.float64)
    generators = [torch.Generator().manual_seed(seed) for seed in (10, 11)]
    batch = pipe(batch_size=2, generator=generators, num_inference_steps=4, output_type="pt", eta=eta).images
    for index, seed in enumerate((10, 11)):
        single = sample(pipe, seed=seed, batch_size=1, eta=eta)
        torch.testing.assert_close(batch[index : index + 1], single, rtol=0, atol=0)


def test_deterministic_sampler_uses_no_step_noise():
    """eta = 0: the image is a function of z_1 alone; extra draws from the generator change nothing."""
    pipe = make_pipeline("trainable")
    generator = torch.Generator().manual_seed(4)
    first = pipe(batch_size=2, generator=generator, num_inference_steps=4, output_type="pt", eta=0.0).images
    drawn = torch.Generator().manual_seed(4)
    latents = torch.randn((2, CHANNELS, SIZE, SIZE), generator=drawn)
    assert torch.equal(generator.get_state(), drawn.get_state())
    assert latents.shape == first.shape == (2, CHANNELS, SIZE, SIZE)


def test_bad_sampling_arguments_raise_clear_errors():
    pipe = make_pipeline("none")
    for batch_size in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
            pipe(batch_size=batch_size, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"`output_type` must be one of \['pil', 'np', 'pt'\], got 'latent'"):
        pipe(num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="`eta` must be a float in"):
        pipe(num_inference_steps=1, eta=1.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(num_inference_steps=0)
    with pytest.raises(ValueError, match="generators"):
        pipe(batch_size=2, generator=[torch.Generator()], num_inference_steps=1)


def test_a_generator_that_is_not_one_is_refused_before_any_work(monkeypatch):
    pipe = make_pipeline("none")
    monkeypatch.setattr(pipe.scheduler, "set_timesteps", lambda *args, **kwargs: pytest.fail("work started"))
    for generator in ("seed", 0, [torch.Generator(), 3]):
        with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator, a list .* got"):
            pipe(batch_size=2, generator=generator, num_inference_steps=1)


def test_a_diffusers_scheduler_is_refused_at_assignment():
    """DDIMScheduler has no gamma(t): accepting it failed later, inside sampling, with AttributeError 'gamma'."""
    pipe = make_pipeline("trainable")
    scheduler = pipe.scheduler
    for other in (DDIMScheduler.from_config(pipe.scheduler.config), DDPMScheduler()):
        with pytest.raises(TypeError, match=f"needs a scheduler of diffenc_diffusers .* got .*{type(other).__name__}"):
            pipe.scheduler = other
        with pytest.raises(TypeError, match="needs a scheduler of diffenc_diffusers"):
            pipe.register_modules(scheduler=other)
    assert pipe.scheduler is scheduler
    pipe.scheduler = VDMScheduler.from_config(scheduler.config)
    assert pipe.scheduler is not scheduler and pipe.scheduler.config == scheduler.config


class DeterministicVDMScheduler(VDMScheduler):
    """A sampler whose `step` takes no `eta` and no `generator` (as a deterministic ODE solver's would)."""

    def step(self, model_output, timestep, sample, return_dict=True):
        return super().step(model_output, timestep, sample, eta=0.0, return_dict=return_dict)


def test_the_pipeline_passes_step_only_the_arguments_it_takes():
    pipe = make_pipeline("nontrainable")
    reference = sample(pipe, eta=0.0)
    pipe.scheduler = DeterministicVDMScheduler.from_config(pipe.scheduler.config)
    assert torch.equal(sample(pipe), reference)
    with pytest.raises(ValueError, match=r"`eta` is 0\.5, but the scheduler DeterministicVDMScheduler's `step` takes"):
        sample(pipe, eta=0.5)


# ------------------------------------------------------------------------------------------ dtype, device


def test_bfloat16_keeps_schedule_in_float64_and_samples_grid_values(tmp_path):
    pipe = make_pipeline("trainable")
    images = uint8_images()
    fp32_bpd = bpd(pipe, images).bpd
    pipe.save_pretrained(tmp_path)

    pipe.to(torch.bfloat16)
    assert pipe.unet.dtype == pipe.encoder.dtype == torch.bfloat16
    assert pipe.scheduler.gamma(0.25).dtype == torch.float64
    out = sample(pipe)
    assert out.dtype == torch.float32 and torch.equal((out * 255).round() / 255, out)
    low = bpd(pipe, images)
    assert torch.isfinite(low.bpd).all() and low.bpd.dtype == torch.float32
    assert ((low.bpd - fp32_bpd).abs() / fp32_bpd).max() < 0.25  # bf16 networks: a loose check

    loaded = DiffEncPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16 and loaded.encoder.dtype == torch.bfloat16
    assert public_config(loaded.scheduler) == public_config(pipe.scheduler)
    assert loaded.scheduler.gamma(torch.tensor(0.5)).dtype == torch.float64


def test_bfloat16_denoiser_gets_float32_latent_under_autocast():
    """Sampling with bf16 networks: z_t reaches the denoiser in float32 under autocast, so its Fourier features
    (frequencies up to 2^7 2 pi) and its `+ z` skip stay accurate; casting z_t to bf16 first would ruin them."""
    pipe = make_pipeline("none")
    calls = []
    pipe.to(torch.bfloat16)
    forward = pipe.unet.forward

    def spy(sample, gamma, **kwargs):
        calls.append((sample.dtype, torch.is_autocast_enabled("cpu")))
        return forward(sample, gamma, **kwargs)

    pipe.unet.forward = spy
    sample(pipe, num_inference_steps=2)
    assert calls == [(torch.float32, True)] * 2  # one call per step

    z = torch.randn(2, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    gamma = torch.tensor([-8.0, 2.0])
    exact = make_pipeline("none").unet(z, gamma).sample
    with pipe._network_autocast(torch.device("cpu")):
        low = forward(z, gamma).sample.float()
    naive = forward(z.to(torch.bfloat16), gamma).sample.float()
    assert (low - exact).abs().max() < 0.5 * (naive - exact).abs().max()


def test_to_device_and_cpu_offload_needs_an_accelerator():
    pipe = make_pipeline("trainable")
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="accelerator"):
            pipe.enable_model_cpu_offload()


# ------------------------------------------------------------------------------------------ bits_per_dim


def test_bits_per_dim_equals_the_objective_on_the_same_batches():
    pipe = make_pipeline("trainable")
    images = uint8_images(5)
    result = bpd(pipe, images, batch_size=2)
    assert isinstance(result, DiffEncLikelihoodOutput)
    objective = DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = [objective(images[i : i + 2], generator=generator) for i in range(0, 5, 2)]
    for name in ("bpd", "loss_recon", "loss_klz", "loss_diff"):
        value = getattr(result, name)
        assert value.shape == (5,) and value.dtype == torch.float32 and value.device.type == "cpu"
        torch.testing.assert_close(value, torch.cat([getattr(e, name) for e in expected]), rtol=0, atol=0)
    torch.testing.assert_close(result.bpd, result.loss_recon + result.loss_klz + result.loss_diff)
    as_tuple = bpd(pipe, images, batch_size=2, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4 and torch.equal(as_tuple[0], result.bpd)


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_bits_per_dim_is_seedable_and_discrete_time_differs(encoder_type):
    pipe = make_pipeline(encoder_type)
    images = uint8_images(3)
    first = bpd(pipe, images)
    assert_same_likelihood(first, bpd(pipe, images))
    assert not torch.equal(first.loss_diff, bpd(pipe, images, seed=1).loss_diff)
    discrete = bpd(pipe, images, num_timesteps=10)
    assert torch.isfinite(discrete.bpd).all() and not torch.equal(discrete.loss_diff, first.loss_diff)
    torch.testing.assert_close(discrete.loss_klz, first.loss_klz)


def test_bits_per_dim_runs_in_eval_mode_and_restores_train_mode():
    pipe = make_pipeline("trainable", dropout=0.5)
    pipe.unet.train()
    pipe.encoder.eval()
    images = uint8_images(3)
    first = bpd(pipe, images)
    assert pipe.unet.training and not pipe.encoder.training
    assert_same_likelihood(first, bpd(pipe, images))


def test_bits_per_dim_accepts_dataloaders_and_datasets():
    datasets = pytest.importorskip("datasets")
    pipe = make_pipeline("trainable")
    images = uint8_images(5)
    expected = bpd(pipe, images, batch_size=2)

    loader = torch.utils.data.DataLoader(images, batch_size=2)
    assert_same_likelihood(bpd(pipe, loader), expected)
    labelled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(5)), batch_size=2)
    assert_same_likelihood(bpd(pipe, labelled), expected)
    as_dicts = torch.utils.data.DataLoader([{"pixel_values": x, "label": 0} for x in images], batch_size=2)
    assert_same_likelihood(bpd(pipe, as_dicts), expected)

    pil = [Image.fromarray(x[0].numpy(), mode="L") for x in images]
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")})
    pil_dataset = datasets.Dataset.from_dict({"picture": pil, "label": [0] * 5}, features=features)
    assert_same_likelihood(bpd(pipe, pil_dataset, batch_size=2), expected)
    arrays = datasets.Dataset.from_dict(
        {"x": images.numpy()}, features=datasets.Features({"x": datasets.Array3D((1, SIZE, SIZE), "uint8")})
    )
    assert_same_likelihood(bpd(pipe, arrays, batch_size=2), expected)


def test_bits_per_dim_progress_bar(capsys):
    pipe = DiffEncPipeline(**make_components("none"))
    pipe.bits_per_dim(uint8_images(2), show_progress=False)
    assert capsys.readouterr().err == ""
    pipe.bits_per_dim(uint8_images(2))
    assert "1/1" in capsys.readouterr().err


def test_trainable_pipeline_without_encoder_samples_but_has_no_likelihood(tmp_path):
    components = make_components("trainable")
    encoder = components.pop("encoder")
    pipe = DiffEncPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    with_encoder = make_pipeline("trainable")
    assert torch.equal(sample(pipe), sample(with_encoder))
    with pytest.raises(ValueError, match=r"no `encoder` component.*cannot compute a likelihood"):
        pipe.bits_per_dim(uint8_images())

    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["encoder"] == [None, None]
    assert not (tmp_path / "encoder").exists()
    loaded = DiffEncPipeline.from_pretrained(tmp_path)
    assert loaded.encoder is None
    given = DiffEncPipeline.from_pretrained(tmp_path, encoder=encoder)
    given.set_progress_bar_config(disable=True)
    assert_same_likelihood(bpd(given, uint8_images()), bpd(with_encoder, uint8_images()))


def test_bad_likelihood_inputs_raise_clear_errors():
    datasets = pytest.importorskip("datasets")
    pipe = make_pipeline("trainable")
    images = uint8_images(2)
    with pytest.raises(TypeError, match=r"dtype torch.uint8 \(8-bit values 0..255\), got torch.float32"):
        pipe.bits_per_dim(images.float() / 255)
    with pytest.raises(
        ValueError, match=r"shape \(2, 3, 4, 4\); this model takes uint8 images of shape \(N, 1, 4, 4\)"
    ):
        pipe.bits_per_dim(uint8_images(2, channels=3))
    with pytest.raises(ValueError, match=r"has shape \(1, 4, 4\)"):
        pipe.bits_per_dim(images[0])
    with pytest.raises(TypeError, match="got list"):
        pipe.bits_per_dim([images])
    with pytest.raises(ValueError, match="holds no images"):
        pipe.bits_per_dim(images[:0])
    with pytest.raises(ValueError, match="`batch_size` must be a positive int, got 0"):
        pipe.bits_per_dim(images, batch_size=0)
    with pytest.raises(TypeError, match=r"single torch\.Generator"):
        pipe.bits_per_dim(images, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="num_timesteps"):
        pipe.bits_per_dim(images, num_timesteps=0)
    loader = torch.utils.data.DataLoader(uint8_images(3, channels=3), batch_size=2)
    with pytest.raises(ValueError, match="batch 0 of the DataLoader has shape"):
        pipe.bits_per_dim(loader)

    rgb = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (SIZE, SIZE))]}, features=datasets.Features({"image": datasets.Image()})
    )
    with pytest.raises(ValueError, match=r"image 0 of the dataset has 3 channel\(s\) but the model takes 1"):
        pipe.bits_per_dim(rgb)
    big = datasets.Dataset.from_dict(
        {"image": [Image.new("L", (8, 8))]}, features=datasets.Features({"image": datasets.Image()})
    )
    with pytest.raises(ValueError, match=r"is 8x8 \(height x width\) but the model takes 4x4.*never resized"):
        pipe.bits_per_dim(big)
    wide = datasets.Dataset.from_dict({"x": np.zeros((1, 1, SIZE, SIZE), dtype=np.int64)})
    with pytest.raises(TypeError, match="column 'x' holds int64 values"):
        pipe.bits_per_dim(wide)
    two = datasets.Dataset.from_dict({"a": [[0]], "b": [[0]]})
    with pytest.raises(ValueError, match="pass `image_column`"):
        pipe.bits_per_dim(two)
    with pytest.raises(ValueError, match="`image_column` 'c' is not among"):
        pipe.bits_per_dim(two, image_column="c")


def conditional_pipeline() -> DiffEncPipeline:
    """A tiny class-conditional VDM pipeline: 3 classes and the null class."""
    torch.manual_seed(0)
    unet = VDMUNetModel(
        sample_size=SIZE, in_channels=CHANNELS, hidden_channels=8, num_layers=1, norm_num_groups=4,
        num_class_embeds=3, null_class=True,
    )  # fmt: skip
    pipe = DiffEncPipeline(unet=perturb_(unet, seed=0), scheduler=VDMScheduler(encoder_type="none"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_class_labels_of_bits_per_dim_are_checked_by_value_before_any_work(monkeypatch):
    """`class_labels=["3"]` names the argument, the value and what is accepted, before a network runs; a list of
    ints is accepted and gives exactly the result of the same labels as a tensor."""
    pipe = conditional_pipeline()
    images = uint8_images(2)
    expected = bpd(pipe, images, class_labels=torch.tensor([2, 0]))
    assert_same_likelihood(bpd(pipe, images, class_labels=[2, 0]), expected)
    assert_same_likelihood(bpd(pipe, images, class_labels=(2, 3)), bpd(pipe, images, class_labels=torch.tensor([2, 3])))

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran before the inputs were checked")

    monkeypatch.setattr(pipe.unet, "forward", no_network)
    with pytest.raises(TypeError, match=r"`class_labels` must be integer class labels.* list of ints\); got \['3'\]"):
        pipe.bits_per_dim(images[:1], class_labels=["3"])
    with pytest.raises(TypeError, match=r"`class_labels` must be integer class labels.*got \[1, 2\.0\]"):
        pipe.bits_per_dim(images, class_labels=[1, 2.0])
    with pytest.raises(TypeError, match=r"`class_labels` must be an integer torch.Tensor .*got str '3'"):
        pipe.bits_per_dim(images[:1], class_labels="3")
    with pytest.raises(ValueError, match=r"`class_labels` must hold labels 0 \.\. 2, or 3 \(the null class\)"):
        pipe.bits_per_dim(images, class_labels=[0, 4])
    with pytest.raises(ValueError, match=r"`class_labels` must be a tensor of shape \(2,\), one label per image"):
        pipe.bits_per_dim(images, class_labels=[0])


def test_an_empty_dataset_is_refused_by_name_before_any_work():
    """An empty datasets.Dataset is refused as such, typed or not (an untyped one was "holds null values");
    an empty tensor too."""
    datasets = pytest.importorskip("datasets")
    pipe = make_pipeline("none")
    typed = datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()}))
    for empty in (typed, datasets.Dataset.from_dict({"image": []})):
        with pytest.raises(ValueError, match=r"`images` is a datasets.Dataset with no rows \(columns \['image'\]\)"):
            pipe.bits_per_dim(empty)
    with pytest.raises(ValueError, match=r"`images` holds no images \(shape \(0, 1, 4, 4\)\)"):
        pipe.bits_per_dim(uint8_images(2)[:0])


# ------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_save_load_local_round_trip_is_exact(tmp_path, encoder_type):
    pipe = make_pipeline(encoder_type)
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    # Classes named through the shipped code file, for diffusers' generic loader (see test_hub.py).
    assert model_index["_class_name"] == ["diffenc_pipeline", "DiffEncPipeline"]
    assert model_index["unet"] == ["diffenc_pipeline", "VDMUNetModel"]
    assert model_index["scheduler"] == ["diffenc_pipeline", "VDMScheduler"]
    expected_encoder = ["diffenc_pipeline", "DiffEncEncoderModel"]
    assert model_index["encoder"] == (expected_encoder if encoder_type == "trainable" else [None, None])
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]

    loaded = DiffEncPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert public_config(loaded.scheduler) == public_config(pipe.scheduler)
    for name in ("unet", "encoder"):
        original, reloaded = getattr(pipe, name), getattr(loaded, name)
        assert (original is None) == (reloaded is None)
        if original is not None:
            assert public_config(original) == public_config(reloaded)
            for (key, a), (_, b) in zip(original.state_dict().items(), reloaded.state_dict().items(), strict=True):
                assert torch.equal(a, b), key
    assert torch.equal(sample(pipe), sample(loaded))
    assert_same_likelihood(bpd(pipe, uint8_images()), bpd(loaded, uint8_images()))


def test_saving_pickle_weights_is_refused(tmp_path):
    pipe = make_pipeline("none")
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path, safe_serialization=False)
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors weights only"):
        DiffEncPipeline.from_pretrained(tmp_path, use_safetensors=False)
    with pytest.raises(TypeError, match="push_to_hub"):
        pipe.save_pretrained(tmp_path, repo_id="org/name")


@pytest.fixture(scope="module")
def saved_trainable(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    make_pipeline("trainable").save_pretrained(folder)
    return folder


def damaged_copy(saved, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    return folder


def test_folder_missing_a_component_names_it(saved_trainable, tmp_path):
    folder = damaged_copy(saved_trainable, tmp_path)
    shutil.rmtree(folder / "encoder")
    with pytest.raises(FileNotFoundError, match=r"missing the component 'encoder'.*no encoder/ folder"):
        DiffEncPipeline.from_pretrained(folder)
    os.remove(folder / "unet" / "config.json")
    with pytest.raises(FileNotFoundError, match=r"component 'unet'.*has no config file"):
        DiffEncPipeline.from_pretrained(folder, encoder=make_components()["encoder"])


def test_folder_without_model_index_or_weights(saved_trainable, tmp_path):
    folder = damaged_copy(saved_trainable, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"component 'unet'.*no safetensors weights.*pickle files"):
        DiffEncPipeline.from_pretrained(folder)
    os.remove(folder / "model_index.json")
    with pytest.raises(FileNotFoundError, match=r"not a diffusers pipeline folder: it has no model_index\.json"):
        DiffEncPipeline.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="neither an existing pipeline folder nor a Hub repository id"):
        DiffEncPipeline.from_pretrained(str(tmp_path / "does" / "not" / "exist"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_weights_file_is_named(saved_trainable, tmp_path, damage):
    folder = damaged_copy(saved_trainable, tmp_path)
    weights = folder / "encoder" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file")
    with pytest.raises(
        OSError,
        match=r"weights file .*encoder.diffusion_pytorch_model\.safetensors of component "
        r"'encoder' is truncated or corrupted",
    ):
        DiffEncPipeline.from_pretrained(folder)
