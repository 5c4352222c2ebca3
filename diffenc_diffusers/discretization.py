"""The 8-bit data grid and the discrete decoder p(x | z_0) of VDM / DiffEnc.

An 8-bit value k in 0..255 is represented by the grid point f_k = 2 (k + 0.5) / 256 - 1, a grid of 256 values
strictly inside [-1, 1] (DESIGN.md section 2, "Data"). The decoder puts a Gaussian of standard deviation
exp(gamma_0 / 2) around the rescaled latent z_0 / alpha_0 and normalises it over the 256 grid values.
"""

from __future__ import annotations

import math

import torch

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


def decoder_log_probs(z0_rescaled: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the 256 grid values under the decoder p(x | z_0), in nats.

    Args:
        z0_rescaled: z_0 / alpha_0, shape (...), any float dtype (computed in at least float32).
        gamma_0: gamma at t = 0, broadcastable to ``z0_rescaled``.

    Returns:
        Tensor of shape (..., 256); ``logsumexp`` over the last axis is 0. The logits
        -0.5 ((z0r - f_k) exp(-gamma_0 / 2))^2 have scale ~e^13, so they are normalised with ``log_softmax``.
    """
    dtype = torch.promote_types(z0_rescaled.dtype, torch.float32)
    z = z0_rescaled.to(dtype).unsqueeze(-1)
    inv_std = torch.exp(-0.5 * torch.as_tensor(gamma_0, device=z.device).to(dtype)).unsqueeze(-1)
    logits = -0.5 * ((z - grid_values(z.device, dtype)) * inv_std) ** 2
    return torch.log_softmax(logits, dim=-1)


def decoder_nll(images_grid: torch.Tensor, z0_rescaled: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """-log p(x | z_0) per element, in nats, shape of ``images_grid``.

    Args:
        images_grid: the true data as grid values f (see :func:`uint8_to_grid`).
        z0_rescaled: z_0 / alpha_0, same shape.
        gamma_0: gamma at t = 0, broadcastable.
    """
    log_probs = decoder_log_probs(z0_rescaled, gamma_0)
    index = grid_to_index(images_grid).unsqueeze(-1)
    return -torch.gather(log_probs, -1, index).squeeze(-1)


def nats_to_bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Convert per-image nats summed over ``num_dims`` dimensions into bits per dimension."""
    return nats / (num_dims * math.log(2.0))
