"""The 8-bit data grid and the discrete decoder p(x | z_0) of VDM / DiffEnc.

An 8-bit value k in 0..255 is represented by the grid point f_k = 2 (k + 0.5) / 256 - 1, a grid of 256 values
strictly inside [-1, 1] (DESIGN.md section 2, "Data"). The decoder puts a Gaussian of standard deviation
exp(gamma_0 / 2) around the rescaled latent z_0 / alpha_0 and normalises it over the 256 grid values.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import FunctionCtx

NUM_GRID_VALUES = 256
"""Number of values an 8-bit channel can take."""


def index_to_grid(index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Grid point f_k = 2 (k + 0.5) / 256 - 1 of each 8-bit value k, same shape, in ``dtype``."""
    return 2.0 * (index.to(dtype) + 0.5) / NUM_GRID_VALUES - 1.0


def grid_values(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 256 grid points f_0 < ... < f_255, shape (256,), inside (-1, 1)."""
    return index_to_grid(torch.arange(NUM_GRID_VALUES, device=device), dtype)


def uint8_to_grid(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 images (values 0..255) to their grid points f, same shape, in ``dtype``."""
    if images.dtype != torch.uint8:
        raise TypeError(f"`images` must have dtype torch.uint8, got {images.dtype}.")
    return index_to_grid(images, dtype)


def grid_to_index(values: torch.Tensor) -> torch.Tensor:
    """Index k (int64) of the grid point nearest to each value; values outside the grid map to 0 or 255.

    This is the mode of the decoder (the most likely grid value given z_0 / alpha_0), so mapping values outside
    [-1, 1] to the end points is the decoder's own answer, not a clamp of user data.
    """
    index = torch.floor((values.to(torch.float64) + 1.0) * (NUM_GRID_VALUES / 2))
    return index.clamp_(0, NUM_GRID_VALUES - 1).to(torch.int64)


def grid_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """uint8 image of the grid point nearest to each value (the inverse of :func:`uint8_to_grid` on the grid)."""
    return grid_to_index(values).to(torch.uint8)


def validate_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Check a batch of images and return it as float32 grid values f, shape (B, C, H, W).

    Accepted: a uint8 tensor (values 0..255), or a floating tensor whose every value is a grid point f_k
    (as made by :func:`uint8_to_grid`; equality within 1e-5 of the grid spacing 2/256). Anything else (other
    dtypes, NaN, values between grid points or outside (-1, 1)) raises, because the likelihood of a
    non-8-bit image under a discrete decoder is not defined.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(images).__name__}.")
    if images.ndim != 4:
        raise ValueError(f"`{name}` must have shape (batch, channels, height, width), got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        return uint8_to_grid(images)
    if not images.is_floating_point():
        raise TypeError(
            f"`{name}` must be uint8 (0..255) or a float tensor of grid values 2 (k + 0.5) / 256 - 1, "
            f"got dtype {images.dtype}."
        )
    values = images.detach().to(torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    nearest = index_to_grid(grid_to_index(values), torch.float64)
    off_grid = (values - nearest).abs().max().item()
    if off_grid > 1e-5 * 2.0 / NUM_GRID_VALUES or values.abs().max().item() >= 1.0:
        raise ValueError(
            f"`{name}` holds float values that are not 8-bit grid values 2 (k + 0.5) / 256 - 1 (largest distance "
            f"to the grid: {off_grid:.3g}); pass uint8 images or `uint8_to_grid(images)`."
        )
    return images.to(torch.float32)


def _decoder_distances_and_logits(
    z0_rescaled: torch.Tensor, gamma_0: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z0r - f_k`` and the decoder's logits ``-0.5 (z0r - f_k)^2 exp(-gamma_0)``, shape (..., 256), in at least
    float32. (Two full-size operations for the logits: each (..., 256) temporary costs more to allocate on CPU
    than to compute.)"""
    dtype = torch.promote_types(z0_rescaled.dtype, torch.float32)
    z = z0_rescaled.to(dtype).unsqueeze(-1)
    neg_half_inv_var = -0.5 * torch.exp(-torch.as_tensor(gamma_0, device=z.device).to(dtype)).unsqueeze(-1)
    distances = z - grid_values(z.device, dtype)
    return distances, distances.square() * neg_half_inv_var


def decoder_log_probs(z0_rescaled: torch.Tensor, gamma_0: torch.Tensor | float) -> torch.Tensor:
    """Log-probabilities of the 256 grid values under the decoder p(x | z_0), in nats.

    Args:
        z0_rescaled: z_0 / alpha_0, shape (...), any float dtype (computed in at least float32).
        gamma_0: gamma at t = 0, broadcastable to ``z0_rescaled``.

    Returns:
        Tensor of shape (..., 256); ``logsumexp`` over the last axis is 0. The logits
        -0.5 (z0r - f_k)^2 exp(-gamma_0) have scale ~e^13, so they are normalised with ``log_softmax``.
    """
    return torch.log_softmax(_decoder_distances_and_logits(z0_rescaled, gamma_0)[1], dim=-1)


def _plain_decoder_nll(
    z0_rescaled: torch.Tensor, gamma_0: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """-log p(x | z_0) per element read off :func:`decoder_log_probs` (autograd differentiates it to any order)."""
    return -torch.gather(decoder_log_probs(z0_rescaled, gamma_0), -1, index.unsqueeze(-1)).squeeze(-1)


def _decoder_nll_and_gradient_factors(
    z0_rescaled: torch.Tensor, gamma_0: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""-log p(x | z_0) per element and the two factors of its gradient, all of the shape of ``z0_rescaled``.

    With d_k = z0r - f_k, logits l_k = -0.5 d_k^2 e^{-gamma_0} and p = softmax(l), the NLL is -l_x + logsumexp(l), so

        d NLL / d z0r     = e^{-gamma_0} (d_x - E_p[d])
        d NLL / d gamma_0 = l_x - E_p[l]

    Both expectations are sums of p_k times the distance or logit itself, never differences of O(1) means, so they
    keep float32 precision where z0r sits next to the true value (the gradient is then ~e^{13} times small). p
    comes from ``softmax``, not from exponentiating the log-probabilities, most of which underflow (a slow path of
    ``exp`` on CPU). Not differentiable: the (..., 256) temporaries are reused in place.
    """
    distances, logits = _decoder_distances_and_logits(z0_rescaled, gamma_0)
    index = index.unsqueeze(-1)
    nll = -torch.gather(torch.log_softmax(logits, dim=-1), -1, index).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    distance_gap = torch.gather(distances, -1, index).squeeze(-1)
    distance_gap -= distances.mul_(probs).sum(-1)
    logit_gap = torch.gather(logits, -1, index).squeeze(-1)
    logit_gap -= logits.mul_(probs).sum(-1)
    return nll, distance_gap, logit_gap


class _DecoderNLLFunction(torch.autograd.Function):
    r"""
    -log p(x | z_0) per element, differentiable in z0r and gamma_0, without keeping (..., 256) tensors for backward.

    Autograd through ``log_softmax`` keeps several tensors 256 times the size of the batch until the backward pass
    (25 MB each for a batch of eight 32x32x3 images) and differentiates each of them. The gradient has a closed
    form (see `_decoder_nll_and_gradient_factors`), so the forward pass reduces it to two per-element factors and
    the backward pass is two products. A backward pass that must itself be differentiable (``create_graph=True``)
    differentiates :func:`decoder_log_probs` with autograd instead.
    """

    @staticmethod
    def forward(
        z0_rescaled: torch.Tensor, gamma_0: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _decoder_nll_and_gradient_factors(z0_rescaled, gamma_0, index)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        z0_rescaled, gamma_0, index = inputs
        _, distance_gap, logit_gap = output
        ctx.mark_non_differentiable(distance_gap, logit_gap)
        ctx.save_for_backward(z0_rescaled, gamma_0, index, distance_gap, logit_gap)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_nll: torch.Tensor | None, _grad_distance_gap: None, _grad_logit_gap: None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        if grad_nll is None:
            return None, None, None
        z0_rescaled, gamma_0, index, distance_gap, logit_gap = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = (z0_rescaled, gamma_0)
            needed = [tensor for tensor, needs in zip(inputs, ctx.needs_input_grad[:2], strict=True) if needs]
            nll = _plain_decoder_nll(z0_rescaled, gamma_0, index)
            grads = iter(torch.autograd.grad(nll, needed, grad_nll, create_graph=True))
            return (*(next(grads) if needs else None for needs in ctx.needs_input_grad[:2]), None)
        grad_z = grad_gamma = None
        if ctx.needs_input_grad[0]:
            inv_var = torch.exp(-gamma_0.to(distance_gap.dtype))
            grad_z = (grad_nll * inv_var * distance_gap).to(z0_rescaled.dtype)
        if ctx.needs_input_grad[1]:
            grad_gamma = (grad_nll * logit_gap).sum_to_size(gamma_0.shape).to(gamma_0.dtype)
        return grad_z, grad_gamma, None


def decoder_nll(
    images_grid: torch.Tensor, z0_rescaled: torch.Tensor, gamma_0: torch.Tensor | float
) -> torch.Tensor:
    """-log p(x | z_0) per element, in nats, shape of ``images_grid`` (float32, or float64 for float64 inputs).

    Differentiable in ``z0_rescaled`` and ``gamma_0`` through a closed-form gradient (`_DecoderNLLFunction`).

    Args:
        images_grid: the true data as grid values f (see :func:`uint8_to_grid`).
        z0_rescaled: z_0 / alpha_0, same shape.
        gamma_0: gamma at t = 0, broadcastable.
    """
    index = grid_to_index(images_grid)
    gamma_0 = torch.as_tensor(gamma_0, device=z0_rescaled.device)
    if torch.is_grad_enabled() and (z0_rescaled.requires_grad or gamma_0.requires_grad):
        return _DecoderNLLFunction.apply(z0_rescaled, gamma_0, index)[0]
    return _plain_decoder_nll(z0_rescaled, gamma_0, index)


def nats_to_bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Convert per-image nats summed over ``num_dims`` dimensions into bits per dimension."""
    return nats / (num_dims * math.log(2.0))
