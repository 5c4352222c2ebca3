"""Building blocks shared by the VDM denoiser and the DiffEnc encoder, and their argument checks.

The blocks follow VDM (google-research/vdm, ``ResnetBlock`` and ``AttnBlock``): GroupNorm with epsilon
1e-6 (Flax's default) computed in float32 or wider, SiLU, the gamma embedding added after the first
convolution through a bias-free, zero-initialised projection, and zero-initialised last layers, so that
every block is the identity on its residual path at initialisation.
"""

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

GROUP_NORM_EPS = 1e-6
"""GroupNorm epsilon used throughout (Flax's default, as in VDM and DiffEnc)."""


class UpcastGroupNorm(nn.GroupNorm):
    r"""
    `nn.GroupNorm` evaluated in float32 or wider and returned in the input's dtype (epsilon 1e-6 by default).

    Besides the usual numerical reason for normalising in float32, this keeps forward-mode derivatives
    consistent under CPU autocast: `F.group_norm` on a bfloat16 input with float32 affine parameters
    returns a bfloat16 primal but a float32 tangent, which the next autocast convolution rejects inside
    `torch.func.jvp`.

    Args:
        num_groups (`int`): Groups; must divide `num_channels`.
        num_channels (`int`): Channels of the input.
        eps (`float`, defaults to 1e-6): Added to the variance.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = GROUP_NORM_EPS):
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, num_channels, ...)`).

        Returns:
            `torch.Tensor`: Same shape and dtype as `hidden_states`.
        """
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        normalized = F.group_norm(
            hidden_states.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps
        )
        return normalized.to(hidden_states.dtype)


def check_int(name: str, value: object, minimum: int | None = None) -> None:
    """Raises `TypeError` unless `value` is an int (not a bool), `ValueError` unless it is >= `minimum`."""
    accepted = "an int" if minimum is None else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be {accepted}; got {value!r} of type {type(value).__name__}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be {accepted}; got {value}.")


def check_bool(name: str, value: object) -> None:
    """Raises `TypeError` unless `value` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool; got {value!r} of type {type(value).__name__}.")


def check_dropout(name: str, value: object) -> None:
    """Raises unless `value` is a real number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float in [0, 1); got {value!r} of type {type(value).__name__}.")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a float in [0, 1); got {value}.")


def check_gamma_range(gamma_min: object, gamma_max: object) -> None:
    """Raises unless `gamma_min` and `gamma_max` are finite real numbers with ``gamma_min < gamma_max``."""
    for name, value in (("gamma_min", gamma_min), ("gamma_max", gamma_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{name}` must be a finite float; got {value!r} of type {type(value).__name__}.")
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite float; got {value}.")
    if not gamma_min < gamma_max:
        raise ValueError(
            f"`gamma_min` must be smaller than `gamma_max`; got gamma_min={gamma_min}, gamma_max={gamma_max}."
        )


def check_group_divisible(name: str, channels: int, norm_num_groups: int) -> None:
    """Raises `ValueError` unless `channels` is a multiple of `norm_num_groups` (GroupNorm's requirement)."""
    if channels % norm_num_groups != 0:
        raise ValueError(
            f"`{name}` must be a multiple of `norm_num_groups` ({norm_num_groups}); got {channels}."
        )


def check_sample(sample: object, in_channels: int) -> None:
    """Raises unless `sample` is a floating-point tensor of shape ``(batch, in_channels, height, width)``."""
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"`sample` must be a torch.Tensor; got {type(sample).__name__}.")
    if not sample.is_floating_point():
        raise TypeError(f"`sample` must be a floating-point tensor; got dtype {sample.dtype}.")
    if sample.ndim != 4:
        raise ValueError(
            "`sample` must have 4 dimensions (batch, channels, height, width); "
            f"got shape {tuple(sample.shape)}."
        )
    if sample.shape[1] != in_channels:
        raise ValueError(
            f"`sample` must have {in_channels} channels (the model's `in_channels`); "
            f"got shape {tuple(sample.shape)} with {sample.shape[1]} channels."
        )


class ResnetBlock(nn.Module):
    r"""
    VDM's residual block conditioned on the gamma embedding.

    ``h = conv1(SiLU(GN(x))) + W_cond temb``; ``h = conv2(Dropout(SiLU(GN(h))))``; output ``shortcut(x) + h``,
    where the shortcut is a 1x1 convolution when the channel count changes. ``W_cond`` (no bias) and
    ``conv2`` are zero-initialised, so at initialisation the block returns ``shortcut(x)``.

    Args:
        in_channels (`int`): Channels of the input.
        out_channels (`int`): Channels of the output.
        temb_channels (`int`): Width of the gamma embedding.
        dropout (`float`, defaults to 0.0): Dropout probability before the second convolution.
        norm_num_groups (`int`, defaults to 32): Groups of both GroupNorms (must divide both channel counts).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        self.norm1 = UpcastGroupNorm(norm_num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.cond_proj = nn.Linear(temb_channels, out_channels, bias=False)
        self.norm2 = UpcastGroupNorm(norm_num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )
        nn.init.zeros_(self.cond_proj.weight)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`).
            temb (`torch.Tensor` of shape `(batch_size, temb_channels)`): The gamma embedding.

        Returns:
            `torch.Tensor` of shape `(batch_size, out_channels, height, width)`.
        """
        h = self.conv1(F.silu(self.norm1(hidden_states)))
        h = h + self.cond_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states)
        return shortcut + h


class AttentionBlock(nn.Module):
    r"""
    VDM's residual self-attention over all spatial positions, via `F.scaled_dot_product_attention`.

    ``x + proj_out(Attention(q, k, v))`` with ``q, k, v`` linear maps of ``GN(x)``; ``proj_out`` is
    zero-initialised, so at initialisation the block is the identity.

    Args:
        channels (`int`): Channels of input and output.
        num_heads (`int`, defaults to 1): Attention heads (VDM uses 1); must divide `channels`.
        norm_num_groups (`int`, defaults to 32): Groups of the GroupNorm (must divide `channels`).
        forward_ad_compatible (`bool`, defaults to `False`): Restrict `F.scaled_dot_product_attention` to
            its math backend. The fused backends (flash attention on CPU and CUDA, memory-efficient
            attention) have no forward-mode derivative, so a block evaluated under `torch.func.jvp` needs
            this.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        norm_num_groups: int = 32,
        forward_ad_compatible: bool = False,
    ):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"`num_heads` must divide `channels` ({channels}); got {num_heads}.")
        self.num_heads = num_heads
        self.forward_ad_compatible = forward_ad_compatible
        self.norm = UpcastGroupNorm(norm_num_groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, channels, height, width)`).

        Returns:
            `torch.Tensor` of shape `(batch_size, channels, height, width)`.
        """
        batch_size, channels, height, width = hidden_states.shape
        head_dim = channels // self.num_heads
        tokens = self.norm(hidden_states).flatten(2).transpose(1, 2)

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, height * width, self.num_heads, head_dim).transpose(1, 2)

        backend = sdpa_kernel(SDPBackend.MATH) if self.forward_ad_compatible else contextlib.nullcontext()
        with backend:
            attended = F.scaled_dot_product_attention(
                split_heads(self.to_q(tokens)), split_heads(self.to_k(tokens)), split_heads(self.to_v(tokens))
            )
        attended = attended.transpose(1, 2).reshape(batch_size, height * width, channels)
        out = self.proj_out(attended).transpose(1, 2).reshape(batch_size, channels, height, width)
        return hidden_states + out
