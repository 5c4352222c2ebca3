"""The 8-bit grid and the discrete decoder p(x | z_0)."""

import math

import pytest
import torch

from diffenc_diffusers.discretization import (
    decoder_log_probs,
    decoder_nll,
    grid_to_uint8,
    grid_values,
    nats_to_bits_per_dim,
    uint8_to_grid,
    validate_images,
)


def test_grid_is_design_formula_and_round_trips():
    k = torch.arange(256, dtype=torch.uint8)
    f = uint8_to_grid(k, torch.float64)
    torch.testing.assert_close(f, torch.tensor([2 * (i + 0.5) / 256 - 1 for i in range(256)], dtype=torch.float64))
    assert f.min() > -1 and f.max() < 1
    assert torch.equal(grid_to_uint8(f), k)
    # nearest-grid rounding: a value just under the midpoint between f_10 and f_11 goes to 10
    midpoint = (f[10] + f[11]) / 2
    assert grid_to_uint8(midpoint - 1e-9).item() == 10 and grid_to_uint8(midpoint + 1e-9).item() == 11


@pytest.mark.parametrize("gamma_0", [-13.3, -5.0, 0.0, 3.0])
def test_decoder_probabilities_sum_to_one(gamma_0):
    z = torch.linspace(-1.5, 1.5, 101, dtype=torch.float64)
    log_probs = decoder_log_probs(z, torch.tensor(gamma_0, dtype=torch.float64))
    assert log_probs.shape == (101, 256)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(101, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(log_probs).all()


def test_decoder_matches_normalised_gaussian_and_mode_is_nearest_grid_value():
    gamma_0 = torch.tensor(-4.0, dtype=torch.float64)
    z = torch.tensor([0.1234, -0.77], dtype=torch.float64)
    grid = grid_values(dtype=torch.float64)
    std = math.exp(-2.0)
    density = torch.exp(-0.5 * ((z[:, None] - grid) / std) ** 2)
    expected = torch.log(density / density.sum(-1, keepdim=True))
    torch.testing.assert_close(decoder_log_probs(z, gamma_0), expected)
    assert torch.equal(decoder_log_probs(z, gamma_0).argmax(-1), (z[:, None] - grid).abs().argmin(-1))


def test_decoder_nll_is_minus_log_prob_of_true_value():
    gamma_0 = torch.tensor(-6.0, dtype=torch.float64)
    x = uint8_to_grid(torch.tensor([0, 17, 255], dtype=torch.uint8), torch.float64)
    z = x + torch.tensor([0.01, -0.003, 0.2], dtype=torch.float64)
    nll = decoder_nll(x, z, gamma_0)
    log_probs = decoder_log_probs(z, gamma_0)
    expected = -log_probs[torch.arange(3), torch.tensor([0, 17, 255])]
    torch.testing.assert_close(nll, expected)
    assert (nll >= 0).all()


def reference_nll(x: torch.Tensor, z: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """-log p(x | z_0) by autograd through log_softmax (what `decoder_nll` computes in closed form)."""
    index = torch.floor((x + 1.0) * 128).long()
    return -decoder_log_probs(z, gamma_0).gather(-1, index.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("gamma_shape", [(), (3, 1)])
def test_decoder_nll_gradients_are_exact_to_second_order(gamma_shape):
    torch.manual_seed(0)
    x = uint8_to_grid(torch.randint(0, 256, (3, 5), dtype=torch.uint8), torch.float64)
    z = (x + 0.02 * torch.randn(3, 5, dtype=torch.float64)).requires_grad_()
    gamma_0 = torch.full(gamma_shape, -7.0, dtype=torch.float64).add(0.1 * torch.randn(gamma_shape)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, g: decoder_nll(x, z, g), (z, gamma_0))
    assert torch.autograd.gradgradcheck(lambda z, g: decoder_nll(x, z, g), (z, gamma_0))
    weights = torch.rand(3, 5, dtype=torch.float64)
    ours = torch.autograd.grad((weights * decoder_nll(x, z, gamma_0)).sum(), (z, gamma_0))
    expected = torch.autograd.grad((weights * reference_nll(x, z, gamma_0)).sum(), (z, gamma_0))
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_decoder_nll_float32_gradient_near_the_true_value_at_gamma_min():
    """At gamma_0 = -13.3 the gradient is e^13.3 times a small gap; float32 must keep it (checked against float64)."""
    torch.manual_seed(1)
    x = uint8_to_grid(torch.randint(0, 256, (4, 64), dtype=torch.uint8), torch.float64)
    z32 = (x + math.exp(-13.3 / 2) * torch.randn(4, 64, dtype=torch.float64)).float().requires_grad_()
    gamma_0 = torch.tensor(-13.3, dtype=torch.float64, requires_grad=True)
    decoder_nll(x.float(), z32, gamma_0).sum().backward()
    z64 = z32.detach().double().requires_grad_()  # the same point, exactly
    exact_z, exact_gamma = torch.autograd.grad(reference_nll(x, z64, gamma_0).sum(), (z64, gamma_0))
    assert (z32.grad.double() - exact_z).abs().max() < 1e-6 * exact_z.abs().max()
    torch.testing.assert_close(gamma_0.grad, exact_gamma, rtol=1e-5, atol=0.0)
    assert gamma_0.grad.dtype == torch.float64 and z32.grad.dtype == torch.float32


def test_decoder_nll_keeps_nothing_256_times_the_batch_for_backward():
    x = uint8_to_grid(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    z = (x + 0.01 * torch.randn(2, 3, 8, 8)).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        nll = decoder_nll(x, z, torch.tensor(-10.0))
    assert saved and max(saved) <= z.numel()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        reference_nll(x, z, torch.tensor(-10.0))
    assert max(saved) == 256 * z.numel()  # what autograd through log_softmax keeps
    nll.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_bits_per_dim_conversion():
    torch.testing.assert_close(nats_to_bits_per_dim(torch.tensor(math.log(2.0) * 12), 3), torch.tensor(4.0))


def test_validate_images_accepts_uint8_and_grid_floats():
    images = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(validate_images(images), uint8_to_grid(images))
    torch.testing.assert_close(validate_images(uint8_to_grid(images, torch.float64)), uint8_to_grid(images))


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.zeros(2, 1, 4, 4), ValueError, "not 8-bit grid values"),
        (torch.full((2, 1, 4, 4), float("nan")), ValueError, "NaN"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64), TypeError, "uint8"),
        (torch.zeros(1, 4, 4, dtype=torch.uint8), ValueError, "shape"),
        (torch.full((1, 1, 2, 2), 1.0 - 1 / 256 + 2 / 256), ValueError, "grid"),
        (torch.zeros(1, 1, 2, 2).numpy(), TypeError, "torch.Tensor"),
    ],
)
def test_validate_images_rejects_bad_input(images, error, match):
    with pytest.raises(error, match=match):
        validate_images(images)
