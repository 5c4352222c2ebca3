"""Tests of the networks: VDMUNetModel (denoiser) and DiffEncEncoderModel (encoder y_phi)."""

import json
import math

import pytest
import torch

from diffenc_diffusers.models import DiffEncEncoderModel, DiffEncEncoderOutput, VDMUNetModel, VDMUNetOutput
from diffenc_diffusers.models.embeddings import (
    base2_fourier_features,
    normalize_gamma,
    prepare_gamma,
    sinusoidal_embedding,
)

TINY_UNET = {"sample_size": 8, "hidden_channels": 32, "num_layers": 2, "norm_num_groups": 8}
TINY_ENCODER = {"sample_size": 8, "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8}

# Measured with the defaults (the paper presets). The official JAX models have 512 (VDM) and 256 (encoder)
# more: the weights of their time MLP's unused class-conditioning input column.
PAPER_UNET_PARAMETERS = 30_577_667
PAPER_ENCODER_PARAMETERS = 2_743_875


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: intra-op threads only add overhead (and stall badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Adds Gaussian noise to every parameter, so zero-initialised layers stop hiding the computation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_(noise.to(parameter.dtype) * scale)
    return model


def make_unet(**overrides) -> VDMUNetModel:
    torch.manual_seed(0)
    return VDMUNetModel(**{**TINY_UNET, **overrides})


def make_encoder(**overrides) -> DiffEncEncoderModel:
    torch.manual_seed(0)
    return DiffEncEncoderModel(**{**TINY_ENCODER, **overrides})


def data(batch_size: int = 2, channels: int = 3, size: int = 8, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(batch_size, channels, size, size, generator=generator, dtype=dtype) * 2 - 1).to(dtype)


# --------------------------------------------------------------------------------------------- helpers


def test_normalize_gamma_maps_range_to_unit_interval():
    gamma = torch.tensor([-13.3, 5.0, -4.15], dtype=torch.float64)
    torch.testing.assert_close(normalize_gamma(gamma, -13.3, 5.0), torch.tensor([0.0, 1.0, 0.5]).double())


def test_sinusoidal_embedding_matches_vdm_formula():
    timesteps = torch.tensor([0.0, 3.0, 500.0], dtype=torch.float64)
    embedding = sinusoidal_embedding(timesteps, 8)
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(4, dtype=torch.float64) / 3)
    expected = torch.cat(
        [torch.sin(timesteps[:, None] * frequencies), torch.cos(timesteps[:, None] * frequencies)], dim=1
    )
    torch.testing.assert_close(embedding, expected)
    odd = sinusoidal_embedding(timesteps, 9)
    assert odd.shape == (3, 9)
    assert torch.equal(odd[:, :8], embedding)
    assert torch.equal(odd[:, 8], torch.zeros(3, dtype=torch.float64))


def test_base2_fourier_features_layout_and_values():
    sample = torch.tensor([0.1, -0.3], dtype=torch.float64).view(1, 2, 1, 1)
    features = base2_fourier_features(sample, [6, 7])
    assert features.shape == (1, 8, 1, 1)
    arguments = [0.1 * 2**6, 0.1 * 2**7, -0.3 * 2**6, -0.3 * 2**7]
    expected = [math.sin(2 * math.pi * a) for a in arguments] + [math.cos(2 * math.pi * a) for a in arguments]
    torch.testing.assert_close(features.flatten(), torch.tensor(expected, dtype=torch.float64))
    assert base2_fourier_features(sample.float(), [6]).dtype == torch.float32


def test_prepare_gamma_broadcasts_and_widens():
    device = torch.device("cpu")
    assert torch.equal(prepare_gamma(1.5, 3, device, torch.float32), torch.full((3,), 1.5))
    half = prepare_gamma(torch.tensor(2.0, dtype=torch.bfloat16), 3, device, torch.bfloat16)
    assert half.shape == (3,) and half.dtype == torch.float32
    assert prepare_gamma(torch.zeros(3, dtype=torch.float64), 3, device, torch.float32).dtype == torch.float64


# --------------------------------------------------------------------------------------- construction


def test_paper_parameter_counts():
    with torch.device("meta"):
        unet = VDMUNetModel()
        encoder = DiffEncEncoderModel()
    unet_count = sum(p.numel() for p in unet.parameters())
    encoder_count = sum(p.numel() for p in encoder.parameters())
    assert unet_count == PAPER_UNET_PARAMETERS
    assert encoder_count == PAPER_ENCODER_PARAMETERS
    # The official models: about 30.6M (VDM CIFAR-10 denoiser) and 2.7M (DiffEnc-32-4 encoder).
    assert abs(unet_count / 30.6e6 - 1) < 0.01
    assert abs(encoder_count / 2.74e6 - 1) < 0.01


def test_configs_hold_lists_and_resolved_defaults():
    encoder = DiffEncEncoderModel(**{**TINY_ENCODER, "block_out_channels": (16, 32)})
    assert encoder.config.block_out_channels == [16, 32]
    assert isinstance(encoder.config.block_out_channels, list)
    assert DiffEncEncoderModel().config.block_out_channels == [64, 128]
    assert not any(isinstance(v, tuple) for v in make_unet().config.values())


# ----------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention_in_blocks": True}, {"use_fourier_features": False}, {"num_layers": 0}],
)
def test_unet_shape_and_identity_at_init(overrides):
    unet = make_unet(**overrides)
    sample = data()
    output = unet(sample, torch.tensor([-3.0, 2.0]))
    assert isinstance(output, VDMUNetOutput)
    assert output.sample.shape == sample.shape
    assert torch.equal(output.sample, sample)
    (as_tuple,) = unet(sample, 0.5, return_dict=False)
    assert torch.equal(as_tuple, sample)


def test_unet_accepts_non_square_sizes():
    sample = data(size=8)[:, :, :, :6]
    assert make_unet()(sample, 0.0).sample.shape == (2, 3, 8, 6)


def test_encoder_shape_and_zero_at_init():
    encoder = make_encoder()
    sample = data(size=16)
    output = encoder(sample, torch.tensor([-3.0, 2.0]))
    assert isinstance(output, DiffEncEncoderOutput)
    assert output.sample.shape == sample.shape
    assert torch.equal(output.sample, torch.zeros_like(sample))
    (as_tuple,) = encoder(sample, 0.5, return_dict=False)
    assert torch.equal(as_tuple, torch.zeros_like(sample))


@pytest.mark.parametrize("factory", [make_unet, make_encoder])
def test_output_depends_on_gamma_per_sample(factory):
    model = perturb(factory(dropout=0.0)).eval()
    sample = data()
    with torch.no_grad():
        low = model(sample, -5.0).sample
        high = model(sample, 2.0).sample
        mixed = model(sample, torch.tensor([-5.0, 2.0])).sample
        shared = model(sample, torch.tensor(2.0)).sample
    assert (low - high).abs().max() > 1e-3
    torch.testing.assert_close(mixed[0], low[0])
    torch.testing.assert_close(mixed[1], high[1])
    torch.testing.assert_close(shared, high)


def test_encoder_output_is_bounded_by_tanh():
    encoder = perturb(make_encoder(dropout=0.0), scale=1.0).eval()
    with torch.no_grad():
        y = encoder(data(), 0.0).sample
    assert y.abs().max() <= 1.0
    assert y.abs().max() > 0.1


@pytest.mark.parametrize("factory", [make_unet, make_encoder])
def test_dropout_active_only_in_training(factory):
    model = perturb(factory(dropout=0.5))
    sample = data()
    with torch.no_grad():
        model.train()
        first, second = model(sample, 0.0).sample, model(sample, 0.0).sample
        model.eval()
        third, fourth = model(sample, 0.0).sample, model(sample, 0.0).sample
    assert not torch.equal(first, second)
    assert torch.equal(third, fourth)


@pytest.mark.parametrize("factory", [make_unet, make_encoder])
def test_save_load_round_trip(factory, tmp_path):
    model = perturb(factory()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["_class_name"] == type(model).__name__
    loaded = type(model).from_pretrained(tmp_path)

    def public(config):
        return {key: value for key, value in config.items() if not key.startswith("_")}

    assert public(loaded.config) == public(model.config)
    sample = data()
    with torch.no_grad():
        expected = model(sample, torch.tensor([-1.0, 1.0])).sample
        assert torch.equal(loaded(sample, torch.tensor([-1.0, 1.0])).sample, expected)


def test_unet_gradient_checkpointing_matches():
    sample = data()
    gamma = torch.tensor([-2.0, 1.0])
    reference = perturb(make_unet(dropout=0.0, attention_in_blocks=True))
    checkpointed = perturb(make_unet(dropout=0.0, attention_in_blocks=True))
    calls = []

    def counting_checkpoint(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    checkpointed.enable_gradient_checkpointing(gradient_checkpointing_func=counting_checkpoint)
    assert checkpointed.is_gradient_checkpointing

    outputs = []
    for model in (reference, checkpointed):
        out = model(sample, gamma).sample
        (out**2).sum().backward()
        outputs.append(out.detach())
    # 2 down + 3 middle + 3 up ResNet/attention pairs in the tiny config.
    assert calls.count("ResnetBlock") == 2 + 2 + 3
    assert calls.count("AttentionBlock") == 2 + 1 + 3
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for (name, p_ref), (_, p_ckpt) in zip(reference.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(p_ckpt.grad, p_ref.grad, msg=name)

    calls.clear()
    with torch.no_grad():
        checkpointed(sample, gamma)
    assert calls == []


def test_encoder_jvp_matches_finite_difference_and_tangent_backpropagates():
    encoder = perturb(make_encoder(dropout=0.0)).double()
    sample = data(dtype=torch.float64)
    gamma = torch.tensor([-4.0, 1.5], dtype=torch.float64)

    def y_of_gamma(g: torch.Tensor) -> torch.Tensor:
        return encoder(sample, g).sample

    y, dy = torch.func.jvp(y_of_gamma, (gamma,), (torch.ones_like(gamma),))
    step = 1e-5
    with torch.no_grad():
        central = (y_of_gamma(gamma + step) - y_of_gamma(gamma - step)) / (2 * step)
    relative_error = (dy.detach() - central).norm() / central.norm()
    assert central.norm() > 1e-3
    assert relative_error < 1e-6

    torch.testing.assert_close(y.detach(), y_of_gamma(gamma).detach())
    dy.sum().backward()
    time_mlp_grad = encoder.time_embedding.linear_1.weight.grad
    assert time_mlp_grad is not None and time_mlp_grad.abs().sum() > 0
    assert encoder.conv_out.weight.grad.abs().sum() > 0
    assert encoder.down_blocks[0].resnets[0].cond_proj.weight.grad.abs().sum() > 0


def test_encoder_jvp_under_bf16_autocast():
    encoder = perturb(make_encoder(dropout=0.0)).eval()
    sample = data()
    gamma = torch.tensor([-4.0, 1.5])

    def y_of_gamma(g: torch.Tensor) -> torch.Tensor:
        return encoder(sample, g).sample

    _, dy_float32 = torch.func.jvp(y_of_gamma, (gamma,), (torch.ones_like(gamma),))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, dy = torch.func.jvp(y_of_gamma, (gamma,), (torch.ones_like(gamma),))
    assert torch.isfinite(dy).all()
    assert (dy.float() - dy_float32).norm() / dy_float32.norm() < 0.1
    dy.float().square().sum().backward()
    assert encoder.time_embedding.linear_2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("factory", [make_unet, make_encoder])
def test_bf16_autocast_forward_is_finite(factory):
    model = perturb(factory()).eval()
    sample = data()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(sample, torch.tensor([-10.0, 4.0])).sample
    assert output.shape == sample.shape
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("factory", [make_unet, make_encoder])
def test_float64_forward(factory):
    model = perturb(factory()).double().eval()
    with torch.no_grad():
        output = model(data(dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)).sample
    assert output.dtype == torch.float64


# --------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("factory", [make_unet, make_encoder])
@pytest.mark.parametrize(
    ("sample", "gamma", "error", "match"),
    [
        (torch.zeros(2, 4, 8, 8), 0.0, ValueError, r"`sample` must have 3 channels.*\(2, 4, 8, 8\)"),
        (torch.zeros(3, 8, 8), 0.0, ValueError, r"`sample` must have 4 dimensions.*\(3, 8, 8\)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), 0.0, TypeError, r"`sample` must be a floating.*int64"),
        ([[0.0]], 0.0, TypeError, r"`sample` must be a torch.Tensor; got list"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(3), ValueError, r"`gamma` must have shape \(2,\).*\(3,\)"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 1), ValueError, r"`gamma` must have shape.*\(2, 1\)"),
        (torch.zeros(2, 3, 8, 8), torch.tensor([1, 2]), TypeError, r"`gamma` must be a floating.*int64"),
        (torch.zeros(2, 3, 8, 8), "0.5", TypeError, r"`gamma` must be .*got str"),
        (torch.zeros(2, 3, 8, 8), True, TypeError, r"`gamma` must be .*got bool"),
    ],
)
def test_bad_forward_inputs_raise(factory, sample, gamma, error, match):
    with pytest.raises(error, match=match):
        factory()(sample, gamma)


def test_encoder_rejects_spatial_size_not_divisible_by_pooling_factor():
    encoder = make_encoder()
    assert encoder.downsample_factor == 4
    with pytest.raises(ValueError, match=r"`sample` height and width must be divisible by 4.*\(2, 3, 8, 6\)"):
        encoder(torch.zeros(2, 3, 8, 6), 0.0)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"gamma_min": 5.0, "gamma_max": -13.3}, ValueError, r"`gamma_min` must be smaller.*gamma_min=5.0"),
        ({"gamma_min": 1.0, "gamma_max": 1.0}, ValueError, r"`gamma_min` must be smaller"),
        ({"gamma_max": float("inf")}, ValueError, r"`gamma_max` must be a finite float; got inf"),
        ({"gamma_min": "low"}, TypeError, r"`gamma_min` must be a finite float; got 'low'"),
        ({"in_channels": 0}, ValueError, r"`in_channels` must be an int >= 1; got 0"),
        ({"in_channels": 3.0}, TypeError, r"`in_channels` must be an int >= 1; got 3.0 of type float"),
        ({"hidden_channels": -32}, ValueError, r"`hidden_channels` must be an int >= 4; got -32"),
        ({"hidden_channels": 36}, ValueError, r"`hidden_channels` must be a multiple of .*\(8\)"),
        ({"num_layers": -1}, ValueError, r"`num_layers` must be an int >= 0; got -1"),
        ({"dropout": 1.0}, ValueError, r"`dropout` must be a float in \[0, 1\); got 1.0"),
        ({"norm_num_groups": 0}, ValueError, r"`norm_num_groups` must be an int >= 1; got 0"),
        ({"attention_in_blocks": 1}, TypeError, r"`attention_in_blocks` must be a bool; got 1"),
        ({"fourier_features_step": 0}, ValueError, r"`fourier_features_step` must be an int >= 1; got 0"),
        ({"fourier_features_start": 8}, ValueError, r"`fourier_features_start` must be.*start=8, stop=8"),
    ],
)
def test_bad_unet_config_raises(overrides, error, match):
    with pytest.raises(error, match=match):
        make_unet(**overrides)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"gamma_min": 5.0, "gamma_max": 0.0}, ValueError, r"`gamma_min` must be smaller"),
        ({"block_out_channels": []}, ValueError, r"`block_out_channels` must be a non-empty list"),
        ({"block_out_channels": 16}, TypeError, r"`block_out_channels` must be a non-empty list.*got 16"),
        ({"block_out_channels": [16, 0]}, ValueError, r"`block_out_channels\[1\]` must be an.*got 0"),
        ({"block_out_channels": [16, 20]}, ValueError, r"`block_out_channels\[1\]` must be a multiple"),
        ({"block_out_channels": [2], "norm_num_groups": 1}, ValueError, r"`block_out_channels\[0\]`.*>= 4"),
        ({"layers_per_block": 0}, ValueError, r"`layers_per_block` must be an int >= 1; got 0"),
        ({"dropout": -0.1}, ValueError, r"`dropout` must be a float in \[0, 1\); got -0.1"),
        ({"sample_size": 6}, ValueError, r"`sample_size` must be divisible by .* = 4; got 6"),
        ({"in_channels": -3}, ValueError, r"`in_channels` must be an int >= 1; got -3"),
    ],
)
def test_bad_encoder_config_raises(overrides, error, match):
    with pytest.raises(error, match=match):
        make_encoder(**overrides)


# --------------------------------------------------------------------------------------------- tangent modes


def forward_ad_y_dy(encoder: DiffEncEncoderModel, sample: torch.Tensor, gamma: torch.Tensor, **kwargs):
    """y and dy/dgamma the way the objective gets them: forward-mode AD with tangent 1 on gamma."""
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(gamma, torch.ones_like(gamma))
        return torch.autograd.forward_ad.unpack_dual(encoder(sample, dual, **kwargs).sample)


def encoder_training_signal(encoder: DiffEncEncoderModel, mode: str, sample, gamma, **kwargs) -> list[torch.Tensor]:
    """y, dy/dgamma and the parameter gradients of a loss of both, in tangent mode ``mode``."""
    encoder.set_tangent_mode(mode)
    encoder.zero_grad(set_to_none=True)
    y, dy = forward_ad_y_dy(encoder, sample, gamma, **kwargs)
    (y.square().sum() + (y * dy).sum() + dy.square().sum()).backward()
    return [y.detach(), dy.detach(), *(param.grad.clone() for param in encoder.parameters())]


@pytest.mark.parametrize("class_conditional", [False, True])
def test_explicit_tangent_mode_equals_forward_mode_autograd(class_conditional):
    """`forward_and_tangent` (the default "explicit" mode) against PyTorch's forward-mode AD through the network with
    the hand-written GroupNorm and convolution rules: the same y, dy/dgamma and gradients through both, in float64 up
    to summation order (the two compute the same sums in different orders)."""
    encoder = perturb(make_encoder(dropout=0.0, num_class_embeds=3 if class_conditional else None)).double()
    sample, gamma = data(dtype=torch.float64), torch.tensor([-4.0, 1.5], dtype=torch.float64)
    labels = {"class_labels": torch.tensor([0, 2])} if class_conditional else {}
    explicit = encoder_training_signal(encoder, "explicit", sample, gamma, **labels)
    autograd = encoder_training_signal(encoder, "autograd", sample, gamma, **labels)
    assert torch.equal(explicit[0], autograd[0])
    for actual, expected in zip(explicit[1:], autograd[1:], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * explicit[1].abs().max().item())


def test_forward_and_tangent_equals_jvp_and_the_forward():
    encoder = perturb(make_encoder(dropout=0.0)).double().eval()
    sample, gamma = data(dtype=torch.float64), torch.tensor([-4.0, 1.5], dtype=torch.float64)
    y, dy = encoder.forward_and_tangent(sample, gamma, torch.tensor([1.0, -2.0], dtype=torch.float64))
    encoder.set_tangent_mode("autograd")
    y_ref, dy_ref = torch.func.jvp(lambda g: encoder(sample, g).sample, (gamma,), (torch.tensor([1.0, -2.0]).double(),))
    assert torch.equal(y, encoder(sample, gamma).sample)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dy, dy_ref, rtol=1e-10, atol=1e-12)


def test_explicit_mode_under_bf16_autocast_matches_autograd_mode():
    encoder = perturb(make_encoder(dropout=0.0))
    sample, gamma = data(), torch.tensor([-4.0, 1.5])
    results = []
    for mode in ("explicit", "autograd"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(encoder_training_signal(encoder, mode, sample, gamma))
    scale = max(tensor.float().norm() for tensor in results[1])
    for actual, expected in zip(*results, strict=True):
        assert actual.dtype == expected.dtype
        # bf16 operands: the two orders of summation differ by a few roundings of 2^-8 of the terms summed, which
        # for a gradient that is mathematically zero (a bias before a GroupNorm) are of the size of the others.
        bound = 5e-2 * max(expected.float().norm(), scale / 10)
        assert (actual.float() - expected.float()).norm() <= bound


def test_explicit_mode_with_gradient_checkpointing_and_dropout():
    """Checkpointed blocks recompute the same dropout masks (the checkpoint restores the RNG state): the same values
    and gradients as without checkpointing, from the same seed."""
    encoder = perturb(make_encoder(dropout=0.3)).double().train()
    sample, gamma = data(dtype=torch.float64), torch.tensor([-4.0, 1.5], dtype=torch.float64)
    torch.manual_seed(5)
    plain = encoder_training_signal(encoder, "explicit", sample, gamma)
    encoder.enable_gradient_checkpointing()
    torch.manual_seed(5)
    checkpointed = encoder_training_signal(encoder, "explicit", sample, gamma)
    for actual, expected in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    encoder.disable_gradient_checkpointing()


def test_explicit_mode_falls_back_when_the_sample_has_a_tangent():
    """A tangent on the sample (not only on gamma) is beyond `forward_and_tangent`: forward-mode AD with PyTorch's own
    formulas handles it, and agrees with the hand-written ones of the "autograd" mode."""
    encoder = perturb(make_encoder(dropout=0.0)).double()
    sample, gamma = data(dtype=torch.float64), torch.tensor([-4.0, 1.5], dtype=torch.float64)
    sample_tangent = torch.randn_like(sample)
    tangents = []
    for mode in ("explicit", "autograd"):
        encoder.set_tangent_mode(mode)
        with torch.autograd.forward_ad.dual_level():
            dual_sample = torch.autograd.forward_ad.make_dual(sample, sample_tangent)
            dual_gamma = torch.autograd.forward_ad.make_dual(gamma, torch.ones_like(gamma))
            tangents.append(torch.autograd.forward_ad.unpack_dual(encoder(dual_sample, dual_gamma).sample).tangent)
    # PyTorch's forward-mode formulas against the hand-written ones: the same sums in another order.
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        encoder.set_tangent_mode("fast")
