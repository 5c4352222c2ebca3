"""Conditioning and input-feature helpers shared by the VDM denoiser and the DiffEnc encoder.

Both networks are conditioned on ``gamma = -log SNR`` (not on an integer timestep). ``gamma`` is mapped to
``t = (gamma - gamma_min) / (gamma_max - gamma_min)``, which lies in ``[0, 1]`` on the schedule's range, and
``1000 * t`` is embedded with the sinusoidal embedding of VDM (Kingma et al. 2021). All of this runs in
float32 or wider, whatever the network's dtype; only the finished embedding is cast to the network's dtype.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import silu_and_tangent

GAMMA_EMBEDDING_SCALE = 1000.0
"""Factor applied to the normalised gamma ``t`` in ``[0, 1]`` before the sinusoidal embedding (as in VDM)."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Returns ``dtype`` widened to at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def prepare_gamma(
    gamma: torch.Tensor | float, batch_size: int, device: torch.device, sample_dtype: torch.dtype
) -> torch.Tensor:
    r"""
    Checks a ``gamma`` (= -log SNR) argument and broadcasts it to one value per sample.

    Args:
        gamma (`torch.Tensor` or `float`):
            A floating-point tensor of shape `(batch_size,)` or `()`, or a Python number. Integer tensors are
            rejected: the networks are conditioned on the log noise level, not on an integer timestep.
        batch_size (`int`): The batch size of the sample the networks are applied to.
        device (`torch.device`): The sample's device; a tensor `gamma` is moved there.
        sample_dtype (`torch.dtype`): The sample's dtype; a Python number is materialised in this dtype
            widened to at least float32.

    Returns:
        `torch.Tensor`: Shape `(batch_size,)`, dtype float32 or float64 (never narrower than float32).

    Raises:
        TypeError: If `gamma` is neither a floating-point tensor nor a real Python number.
        ValueError: If a tensor `gamma` has a shape other than `(batch_size,)` or `()`.
    """
    if isinstance(gamma, torch.Tensor):
        if not gamma.is_floating_point():
            raise TypeError(
                f"`gamma` must be a floating-point tensor holding -log SNR (not an integer timestep); "
                f"got a tensor of dtype {gamma.dtype}."
            )
        if gamma.ndim == 0:
            gamma = gamma.expand(batch_size)
        elif gamma.ndim != 1 or gamma.shape[0] != batch_size:
            raise ValueError(
                f"`gamma` must have shape ({batch_size},) (one value per sample) or () (shared by the "
                f"batch); got shape {tuple(gamma.shape)}."
            )
        return gamma.to(device=device, dtype=_compute_dtype(gamma.dtype))
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(
            f"`gamma` must be a floating-point tensor of shape ({batch_size},) or (), or a Python float; "
            f"got {type(gamma).__name__}."
        )
    return torch.full((batch_size,), float(gamma), dtype=_compute_dtype(sample_dtype), device=device)


def normalize_gamma(gamma: torch.Tensor, gamma_min: float, gamma_max: float) -> torch.Tensor:
    r"""
    Maps gamma linearly to ``t = (gamma - gamma_min) / (gamma_max - gamma_min)``.

    Args:
        gamma (`torch.Tensor`): Any shape; float32 or wider.
        gamma_min (`float`): The gamma mapped to 0.
        gamma_max (`float`): The gamma mapped to 1 (must exceed `gamma_min`).

    Returns:
        `torch.Tensor`: Same shape and dtype as `gamma`; in `[0, 1]` for gamma in `[gamma_min, gamma_max]`.
    """
    return (gamma - gamma_min) / (gamma_max - gamma_min)


def sinusoidal_embedding(timesteps: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    r"""
    The sinusoidal embedding of VDM (Fairseq / tensor2tensor layout: all sines, then all cosines).

    Frequency ``k`` of ``half = embedding_dim // 2`` is ``exp(-log(10000) * k / (half - 1))``; an odd
    `embedding_dim` gets one zero column at the end.

    Args:
        timesteps (`torch.Tensor` of shape `(batch_size,)`): Real-valued positions (VDM uses `1000 * t`).
        embedding_dim (`int`): Output width, at least 4.

    Returns:
        `torch.Tensor` of shape `(batch_size, embedding_dim)` in the dtype of `timesteps`; values in
        `[-1, 1]`.
    """
    if embedding_dim < 4:
        raise ValueError(f"`embedding_dim` must be an int >= 4; got {embedding_dim}.")
    if timesteps.ndim != 1:
        raise ValueError(f"`timesteps` must have shape (batch_size,); got shape {tuple(timesteps.shape)}.")
    arguments = timesteps[:, None] * sinusoidal_frequencies(embedding_dim, timesteps)[None, :]
    embedding = torch.cat([torch.sin(arguments), torch.cos(arguments)], dim=1)
    if embedding_dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def sinusoidal_frequencies(embedding_dim: int, like: torch.Tensor) -> torch.Tensor:
    """The ``embedding_dim // 2`` frequencies of `sinusoidal_embedding`, in the dtype and on the device of `like`."""
    half_dim = embedding_dim // 2
    exponent = torch.arange(half_dim, dtype=like.dtype, device=like.device)
    return torch.exp(exponent * (-math.log(10000.0) / (half_dim - 1)))


def base2_fourier_features(sample: torch.Tensor, exponents: Sequence[int] | torch.Tensor) -> torch.Tensor:
    r"""
    VDM's base-2 Fourier features of the input: ``sin`` and ``cos`` of ``sample * 2**n * 2 * pi`` for each
    ``n`` in `exponents`.

    Channel layout (as in VDM): all sines, then all cosines; within each, channel ``c * len(exponents) + j``
    holds input channel ``c`` at exponent ``exponents[j]``. The features are computed in float32 or wider and
    returned in the dtype of `sample`.

    Args:
        sample (`torch.Tensor` of shape `(batch_size, channels, height, width)`): Typically in `[-1, 1]`.
        exponents (`Sequence[int]` or an integer `torch.Tensor`): Non-empty; VDM uses `[6, 7]`. A tensor on the
            sample's device avoids a host-to-device copy per call.

    Returns:
        `torch.Tensor` of shape `(batch_size, 2 * channels * len(exponents), height, width)`; values in
        `[-1, 1]`.
    """
    if len(exponents) == 0:
        raise ValueError("`exponents` must hold at least one exponent; got an empty sequence.")
    compute_dtype = _compute_dtype(sample.dtype)
    channels = sample.shape[1]
    if not isinstance(exponents, torch.Tensor):
        exponents = torch.tensor(list(exponents), dtype=torch.int64)
    # 2 pi 2^n, made where the sample is from integer exponents already there (an int64 buffer of the denoiser): a
    # tensor made on the host would be copied to the GPU on every call, and that copy waits for the queued work.
    # Scaling by 2^n is exact, so these are the correctly rounded 2^(n+1) pi.
    exponents = exponents.to(sample.device)
    two_pi = torch.full(exponents.shape, 2.0 * math.pi, dtype=compute_dtype, device=sample.device)
    frequencies = torch.ldexp(two_pi, exponents).repeat(channels)
    arguments = sample.to(compute_dtype).repeat_interleave(len(exponents), dim=1)
    arguments = arguments * frequencies[None, :, None, None]
    return torch.cat([torch.sin(arguments), torch.cos(arguments)], dim=1).to(sample.dtype)


class GammaEmbedding(nn.Module):
    r"""
    Embeds gamma (= -log SNR): normalisation to ``t`` in ``[0, 1]``, sinusoidal embedding of ``1000 * t``,
    then ``Linear -> SiLU -> Linear -> SiLU`` to ``4 * embedding_dim`` (VDM's ``dense0``/``dense1``, both
    followed by swish; the ResNet blocks project the result without a further non-linearity).

    Args:
        embedding_dim (`int`): Width of the sinusoidal embedding (at least 4); the output has 4 times this.
        gamma_min (`float`): The gamma mapped to ``t = 0``.
        gamma_max (`float`): The gamma mapped to ``t = 1``.
    """

    def __init__(self, embedding_dim: int, gamma_min: float, gamma_max: float):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.gamma_min = gamma_min
        self.gamma_max = gamma_max
        self.linear_1 = nn.Linear(embedding_dim, 4 * embedding_dim)
        self.linear_2 = nn.Linear(4 * embedding_dim, 4 * embedding_dim)

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            gamma (`torch.Tensor` of shape `(batch_size,)`): float32 or wider (see [`prepare_gamma`]).

        Returns:
            `torch.Tensor` of shape `(batch_size, 4 * embedding_dim)` in the dtype of the module's weights.
        """
        t = normalize_gamma(gamma, self.gamma_min, self.gamma_max)
        embedding = sinusoidal_embedding(t * GAMMA_EMBEDDING_SCALE, self.embedding_dim)
        embedding = embedding.to(self.linear_1.weight.dtype)
        return F.silu(self.linear_2(F.silu(self.linear_1(embedding))))

    def forward_and_tangent(
        self, gamma: torch.Tensor, gamma_tangent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""`forward` and its derivative along `gamma_tangent`, in plain differentiable operations.

        Args:
            gamma (`torch.Tensor` of shape `(batch_size,)`): float32 or wider.
            gamma_tangent (`torch.Tensor` of shape `(batch_size,)`): The tangent of `gamma` (ones for d/dgamma).

        Returns:
            `tuple`: The embedding and its tangent, both of shape `(batch_size, 4 * embedding_dim)` in the dtype of
            the module's weights.
        """
        scale = GAMMA_EMBEDDING_SCALE / (self.gamma_max - self.gamma_min)
        t = normalize_gamma(gamma, self.gamma_min, self.gamma_max)
        embedding = sinusoidal_embedding(t * GAMMA_EMBEDDING_SCALE, self.embedding_dim)
        frequencies = sinusoidal_frequencies(self.embedding_dim, embedding)
        arguments = (t * GAMMA_EMBEDDING_SCALE)[:, None] * frequencies[None, :]
        arguments_tangent = (gamma_tangent.to(embedding.dtype) * scale)[:, None] * frequencies[None, :]
        tangent = torch.cat([torch.cos(arguments) * arguments_tangent, -torch.sin(arguments) * arguments_tangent], 1)
        tangent = F.pad(tangent, (0, embedding.shape[1] - tangent.shape[1]))
        dtype = self.linear_1.weight.dtype
        hidden, tangent = embedding.to(dtype), tangent.to(dtype)
        for linear in (self.linear_1, self.linear_2):
            hidden, tangent = silu_and_tangent(linear(hidden), F.linear(tangent, linear.weight))
        return hidden, tangent
