"""Building blocks shared by the VDM denoiser and the DiffEnc encoder, and their argument checks.

The blocks follow VDM (google-research/vdm, ``ResnetBlock`` and ``AttnBlock``): GroupNorm with epsilon
1e-6 (Flax's default) computed in float32 or wider, SiLU, the gamma embedding added after the first
convolution through a bias-free, zero-initialised projection, and zero-initialised last layers, so that
every block is the identity on its residual path at initialisation.
"""

import math

import torch
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.nn import functional as F

GROUP_NORM_EPS = 1e-6
"""GroupNorm epsilon used throughout (Flax's default, as in VDM and DiffEnc)."""


def _centered_and_rstd(
    hidden_states: torch.Tensor, num_groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x - mean`` of shape (batch, groups, n) and ``(var + eps)^(-1/2)`` of shape (batch, groups, 1), per group.

    Written with sums scaled afterwards, not means, because reverse mode through a mean divides a full-size tensor.
    """
    grouped = hidden_states.reshape(hidden_states.shape[0], num_groups, -1)
    inv_size = 1.0 / grouped.shape[-1]
    centered = grouped - grouped.sum(-1, keepdim=True) * inv_size
    return centered, torch.rsqrt(centered.square().sum(-1, keepdim=True) * inv_size + eps)


def _normalization_jacobian_product(
    centered: torch.Tensor, rstd: torch.Tensor, vector: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    r"""``scale * J v``, with J the Jacobian of the normalisation ``x -> (x - mean) * rstd`` of each group.

    ``J v = rstd * (v - mean(v) - centered * rstd^2 * mean(centered * v))``; J is symmetric, so this is also the
    vector-Jacobian product. It is evaluated as two fused multiply-adds with per-(sample, channel) coefficients.

    Args:
        centered: ``x - mean``, shape (batch, groups, n).
        rstd: shape (batch, groups, 1).
        vector: ``v``, the shape of ``x`` (batch, channels, ...).
        scale: per-channel factor of shape (channels,) (the GroupNorm weight, or ones).
    """
    batch_size, channels = vector.shape[:2]
    groups = centered.shape[1]
    inv_size = 1.0 / centered.shape[-1]
    grouped = vector.reshape(batch_size, groups, -1)
    flat_shape = (batch_size, channels, -1)

    def per_channel(per_group: torch.Tensor) -> torch.Tensor:
        """(batch, groups, 1) coefficients times ``scale``, as (batch, channels, 1)."""
        return (per_group * scale.view(1, groups, -1)).reshape(batch_size, channels, 1)

    covariance = (centered * grouped).sum(-1, keepdim=True) * inv_size
    mean_shift = -grouped.sum(-1, keepdim=True) * (inv_size * rstd)
    product = torch.addcmul(per_channel(mean_shift), per_channel(rstd), vector.reshape(flat_shape))
    product = torch.addcmul(product, per_channel(-covariance * rstd**3), centered.reshape(flat_shape))
    return product.reshape(vector.shape)


class _GroupNormFunction(torch.autograd.Function):
    r"""
    Group normalisation with a hand-written forward-mode derivative (used in forward-mode AD).

    Forward and backward are PyTorch's fused kernels (`native_group_norm` and `native_group_norm_backward`).
    For an input tangent ``dx`` the tangent is ``weight * J dx`` (see `_normalization_jacobian_product`), plus
    ``normalized * dweight + dbias`` for tangents of the affine parameters. PyTorch's built-in forward-mode
    formula for group norm composes many more full-size operations, and training through the tangent runs
    reverse mode through all of them. The tangent is built from differentiable operations on the saved input,
    so reverse mode through it is exact. A backward that must itself be differentiable (``create_graph=True``)
    uses the same formula, since the fused backward kernel has no derivative. Tangents that do not exist (the
    affine parameters' in forward mode with respect to gamma) are not materialised as zeros, so they cost
    nothing.
    """

    @staticmethod
    def forward(
        hidden_states: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch_size, channels = hidden_states.shape[:2]
        return torch.native_group_norm(
            hidden_states, weight, bias, batch_size, channels, math.prod(hidden_states.shape[2:]), num_groups, eps
        )

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        hidden_states, num_groups, weight, _, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(hidden_states, weight, mean, rstd)
        ctx.save_for_forward(hidden_states, weight)
        ctx.set_materialize_grads(False)
        ctx.num_groups = num_groups
        ctx.eps = eps

    @staticmethod
    def backward(
        ctx: FunctionCtx,
        grad_output: torch.Tensor | None,
        _grad_mean: torch.Tensor | None,
        _grad_rstd: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, torch.Tensor | None, None]:
        if grad_output is None:
            return None, None, None, None, None
        hidden_states, weight, mean, rstd = ctx.saved_tensors
        batch_size, channels = hidden_states.shape[:2]
        if torch.is_grad_enabled():
            centered, group_rstd = _centered_and_rstd(hidden_states, ctx.num_groups, ctx.eps)
            channel_shape = (1, channels) + (1,) * (hidden_states.ndim - 2)
            grad_input = _normalization_jacobian_product(
                centered, group_rstd, grad_output * weight.view(channel_shape), torch.ones_like(weight)
            )
            normalized = (centered * group_rstd).reshape(hidden_states.shape)
            reduce_dims = [0, *range(2, hidden_states.ndim)]
            return grad_input, None, (grad_output * normalized).sum(reduce_dims), grad_output.sum(reduce_dims), None
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            grad_output.contiguous(),
            hidden_states,
            mean,
            rstd,
            weight,
            batch_size,
            channels,
            math.prod(hidden_states.shape[2:]),
            ctx.num_groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]],
        )
        return grad_input, None, grad_weight, grad_bias, None

    @staticmethod
    def jvp(
        ctx: FunctionCtx,
        hidden_states_tangent: torch.Tensor | None,
        _num_groups_tangent: None,
        weight_tangent: torch.Tensor | None,
        bias_tangent: torch.Tensor | None,
        _eps_tangent: None,
    ) -> tuple[torch.Tensor, None, None]:
        hidden_states, weight = ctx.saved_tensors
        centered, rstd = _centered_and_rstd(hidden_states, ctx.num_groups, ctx.eps)
        tangent = None
        if hidden_states_tangent is not None:
            tangent = _normalization_jacobian_product(centered, rstd, hidden_states_tangent, weight)
        channel_shape = (-1,) + (1,) * (hidden_states.ndim - 2)
        if weight_tangent is not None:
            normalized = (centered * rstd).reshape(hidden_states.shape)
            term = normalized * weight_tangent.view(channel_shape)
            tangent = term if tangent is None else tangent + term
        if bias_tangent is not None:
            term = bias_tangent.view(channel_shape)
            tangent = term.expand(hidden_states.shape) if tangent is None else tangent + term
        return tangent, None, None


class _ConvolutionFunction(torch.autograd.Function):
    r"""
    ``aten.convolution`` (what `F.conv2d` and `F.conv_transpose2d` run) with a forward-mode derivative that uses
    only the tangents that exist.

    PyTorch's forward-mode formula for a convolution is ``conv(dx, w) + conv(x, dw) + db``, and an input without
    a tangent gets a materialised tensor of zeros. In forward mode with respect to gamma the weights never
    have one, so every convolution cost a second full convolution with a zero kernel, and reverse mode through
    the tangent differentiated that one too. Here the tangent is ``conv(dx, w)`` alone, plus the other terms
    only for tangents that exist. Forward and backward are PyTorch's (``convolution_backward`` is differentiable,
    so double backward works). Use it through `_forward_ad_convolution`, which applies autocast.
    """

    @staticmethod
    def forward(
        hidden_states: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        transposed: bool,
        output_padding: tuple[int, ...],
        groups: int,
    ) -> torch.Tensor:
        return torch.ops.aten.convolution(
            hidden_states, weight, bias, stride, padding, dilation, transposed, output_padding, groups
        )

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        hidden_states, weight, bias, *conv_args = inputs
        ctx.save_for_backward(hidden_states, weight)
        ctx.save_for_forward(hidden_states, weight)
        ctx.set_materialize_grads(False)
        ctx.conv_args = conv_args
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.output_shape = output.shape

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if grad_output is None:
            return (None,) * 9
        hidden_states, weight = ctx.saved_tensors
        output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grads = torch.ops.aten.convolution_backward(
            grad_output, hidden_states, weight, ctx.bias_sizes, *ctx.conv_args, output_mask
        )
        return (*grads, *(None,) * 6)

    @staticmethod
    def jvp(
        ctx: FunctionCtx,
        hidden_states_tangent: torch.Tensor | None,
        weight_tangent: torch.Tensor | None,
        bias_tangent: torch.Tensor | None,
        *_conv_args_tangents: None,
    ) -> torch.Tensor:
        hidden_states, weight = ctx.saved_tensors
        tangent = None
        if hidden_states_tangent is not None:
            tangent = torch.ops.aten.convolution(hidden_states_tangent, weight, None, *ctx.conv_args)
        if weight_tangent is not None:
            term = torch.ops.aten.convolution(hidden_states, weight_tangent, None, *ctx.conv_args)
            tangent = term if tangent is None else tangent + term
        if bias_tangent is not None:
            term = bias_tangent.view((-1,) + (1,) * (hidden_states.ndim - 2))
            tangent = term.expand(ctx.output_shape) if tangent is None else tangent + term
        return tangent


def _forward_ad_convolution(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_args: tuple,
) -> torch.Tensor:
    """`_ConvolutionFunction` with autocast's cast for convolutions applied first.

    ``aten.convolution`` is not on CPU autocast's list (``F.conv2d`` is), so the operands are cast to the autocast
    dtype here, as autocast would (float64 is left alone), with the casts recorded for autograd.
    """
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_states, weight, bias = (
            tensor.to(dtype) if tensor is not None and tensor.dtype in (torch.float32, torch.float16, torch.bfloat16)
            else tensor
            for tensor in (hidden_states, weight, bias)
        )
    return _ConvolutionFunction.apply(hidden_states, weight, bias, *conv_args)


class _ForwardADConvolution:
    """What `ForwardADConv2d` and `ForwardADConvTranspose2d` add to their `torch.nn` base class: a check that the
    padding is what `_ConvolutionFunction` implements, and a forward through it. The base class's own attributes
    (`transposed`, `output_padding`, ...) give the convolution's arguments."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(
                f"{type(self).__name__} supports padding_mode='zeros' with integer padding only; got "
                f"padding_mode={self.padding_mode!r}, padding={self.padding!r}."
            )

    use_custom_jvp = True
    """Whether to run through `_ConvolutionFunction` (set by the owning model's tangent mode); `False`: the base
    class's forward, the same values, traceable by `torch.compile`, with PyTorch's own forward-mode formula."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`).

        Returns:
            `torch.Tensor` of shape `(batch_size, out_channels, height_out, width_out)`.
        """
        if not self.use_custom_jvp:
            return super().forward(hidden_states)
        conv_args = (self.stride, self.padding, self.dilation, self.transposed, self.output_padding, self.groups)
        return _forward_ad_convolution(hidden_states, self.weight, self.bias, conv_args)


class ForwardADConv2d(_ForwardADConvolution, nn.Conv2d):
    r"""
    `nn.Conv2d` (zero padding) whose forward-mode derivative skips the parameters' absent tangents (see
    `_ConvolutionFunction`): in forward mode with respect to an input it costs one convolution, not two.
    Same arguments, parameters, state dict and values as `nn.Conv2d`.
    """


class ForwardADConvTranspose2d(_ForwardADConvolution, nn.ConvTranspose2d):
    r"""
    `nn.ConvTranspose2d` (zero padding, no `output_size` argument) whose forward-mode derivative skips the
    parameters' absent tangents, as [`ForwardADConv2d`]. Same arguments, parameters, state dict and values as
    `nn.ConvTranspose2d`.
    """


def _group_norm_silu_reference(
    hidden_states: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``silu(group_norm(x))`` as `UpcastGroupNorm` followed by `F.silu` computes it: the normalisation in float32 or
    wider, rounded to the input's dtype, then SiLU."""
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    upcast = hidden_states.to(dtype).contiguous()
    normalized = F.group_norm(upcast, num_groups, weight.to(dtype), bias.to(dtype), eps)
    return F.silu(normalized.to(hidden_states.dtype))


class _GroupNormSiLUFunction(torch.autograd.Function):
    r"""
    ``silu(group_norm(x))``, with the values and gradients of `_group_norm_silu_reference`, holding only ``x`` and the
    per-group statistics for the backward pass.

    Autograd through the reference keeps three full-size tensors per call: the float32 copy of ``x`` that the
    normalisation saves, and the normalised values that SiLU saves (besides the output, which the next convolution
    keeps anyway). Here the backward pass recomputes the normalised values from ``x`` with the same kernel, so the
    forward values and the gradients are bit for bit those of the reference, and a block holds about half the
    activation memory under bf16 autocast. A backward that must itself be differentiable (``create_graph=True``)
    differentiates the reference instead.
    """

    @staticmethod
    def forward(
        hidden_states: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normalized, mean, rstd = _GroupNormSiLUFunction._normalize(hidden_states, num_groups, weight, bias, eps)
        return F.silu(normalized), mean, rstd

    @staticmethod
    def _normalize(
        hidden_states: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The normalised values in the input's dtype, and the float32 (or wider) mean and rstd per group."""
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        upcast = hidden_states.to(dtype).contiguous()
        batch_size, channels = upcast.shape[:2]
        normalized, mean, rstd = torch.native_group_norm(
            upcast, weight.to(dtype), bias.to(dtype), batch_size, channels, math.prod(upcast.shape[2:]),
            num_groups, eps,
        )
        return normalized.to(hidden_states.dtype), mean, rstd

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        hidden_states, num_groups, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(hidden_states, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.num_groups = num_groups
        ctx.eps = eps

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_output: torch.Tensor | None, _grad_mean: None, _grad_rstd: None
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, torch.Tensor | None, None]:
        if grad_output is None:
            return None, None, None, None, None
        hidden_states, weight, bias, mean, rstd = ctx.saved_tensors
        needed = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        if torch.is_grad_enabled():
            inputs = [tensor for tensor, need in zip((hidden_states, weight, bias), needed, strict=True) if need]
            output = _group_norm_silu_reference(hidden_states, ctx.num_groups, weight, bias, ctx.eps)
            grads = iter(torch.autograd.grad(output, inputs, grad_output, create_graph=True))
            grad_input, grad_weight, grad_bias = (next(grads) if need else None for need in needed)
            return grad_input, None, grad_weight, grad_bias, None
        normalized, _, _ = _GroupNormSiLUFunction._normalize(hidden_states, ctx.num_groups, weight, bias, ctx.eps)
        dtype = mean.dtype
        grad_normalized = torch.ops.aten.silu_backward(grad_output, normalized).to(dtype).contiguous()
        upcast = hidden_states.to(dtype).contiguous()
        batch_size, channels = upcast.shape[:2]
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            grad_normalized, upcast, mean, rstd, weight.to(dtype), batch_size, channels,
            math.prod(upcast.shape[2:]), ctx.num_groups, needed,
        )
        return (
            None if grad_input is None else grad_input.to(hidden_states.dtype),
            None,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
        )


class UpcastGroupNorm(nn.GroupNorm):
    r"""
    `nn.GroupNorm` evaluated in float32 or wider and returned in the input's dtype (epsilon 1e-6 by default).

    Besides the usual numerical reason for normalising in float32, this keeps forward-mode derivatives
    consistent under CPU autocast: `F.group_norm` on a bfloat16 input with float32 affine parameters
    returns a bfloat16 primal but a float32 tangent, which the next autocast convolution rejects in forward-mode
    AD.

    Args:
        num_groups (`int`): Groups; must divide `num_channels`.
        num_channels (`int`): Channels of the input.
        eps (`float`, defaults to 1e-6): Added to the variance.
        forward_ad_compatible (`bool`, defaults to `False`): Optimise for evaluation under forward-mode AD
            (`torch.autograd.forward_ad` or `torch.func.jvp`): the tangent comes from a hand-written formula (see
            `_GroupNormFunction`) that is much cheaper than PyTorch's built-in one once reverse mode runs through
            it. The values and all
            derivatives are those of `F.group_norm`. `torch.compile` cannot trace a custom forward-mode formula
            and leaves such a GroupNorm to eager mode (a graph break); the attribute `use_custom_jvp` (set by
            [`DiffEncEncoderModel.set_tangent_mode`]) switches the formula off, leaving PyTorch's.
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = GROUP_NORM_EPS, forward_ad_compatible: bool = False
    ):
        super().__init__(num_groups, num_channels, eps=eps)
        self.forward_ad_compatible = forward_ad_compatible
        self.use_custom_jvp = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, num_channels, ...)`).

        Returns:
            `torch.Tensor`: Same shape and dtype as `hidden_states`.
        """
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        # CUDA's group-norm kernels take only the plain contiguous layout (the CPU ones also channels_last).
        upcast = hidden_states.to(dtype).contiguous()
        args = (upcast, self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        custom = self.forward_ad_compatible and self.use_custom_jvp
        normalized = _GroupNormFunction.apply(*args)[0] if custom else F.group_norm(*args)
        return normalized.to(hidden_states.dtype)

    def forward_silu(self, hidden_states: torch.Tensor) -> torch.Tensor:
        r"""
        ``silu(self(hidden_states))``. When gradients are recorded, outside forward-mode AD, it runs through a
        function that keeps only the input and the group statistics for the backward pass and recomputes the rest
        there (same values and gradients, bit for bit; about half the activation memory of a ResNet block).

        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, num_channels, ...)`).

        Returns:
            `torch.Tensor`: Same shape and dtype as `hidden_states`.
        """
        if self.forward_ad_compatible or not torch.is_grad_enabled():
            return F.silu(self(hidden_states))
        return _GroupNormSiLUFunction.apply(hidden_states, self.num_groups, self.weight, self.bias, self.eps)[0]


Tangent = torch.Tensor | None
"""A forward-mode tangent carried beside its primal by the ``*_and_tangent`` functions; ``None`` stands for zero."""


def group_norm_and_tangent(norm: UpcastGroupNorm, hidden_states: torch.Tensor, tangent: Tangent):
    r"""``norm(hidden_states)`` and its tangent ``weight * J tangent`` (see `_normalization_jacobian_product`),
    written with plain differentiable operations (no custom autograd function), so that reverse mode runs through
    the tangent and `torch.compile` traces it. Both are computed in float32 or wider and returned in the input's
    dtype, as `UpcastGroupNorm` does."""
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    upcast = hidden_states.to(dtype).contiguous()
    weight, bias = norm.weight.to(dtype), norm.bias.to(dtype)
    normalized = F.group_norm(upcast, norm.num_groups, weight, bias, norm.eps).to(hidden_states.dtype)
    if tangent is None:
        return normalized, None
    centered, rstd = _centered_and_rstd(upcast, norm.num_groups, norm.eps)
    normalized_tangent = _normalization_jacobian_product(centered, rstd, tangent.to(dtype), weight)
    return normalized, normalized_tangent.to(hidden_states.dtype)


def silu_and_tangent(hidden_states: torch.Tensor, tangent: Tangent) -> tuple[torch.Tensor, Tangent]:
    r"""``silu(x)`` and ``silu'(x) dx`` with ``silu'(x) = s (1 + x (1 - s))``, ``s = sigmoid(x)``."""
    if tangent is None:
        return F.silu(hidden_states), None
    sigmoid = torch.sigmoid(hidden_states)
    return F.silu(hidden_states), tangent * (sigmoid * (1 + hidden_states * (1 - sigmoid)))


def conv_and_tangent(conv: nn.Conv2d | nn.ConvTranspose2d, hidden_states: torch.Tensor, tangent: Tangent):
    r"""``conv(x)`` and ``conv_without_bias(dx)`` for a zero-padded `nn.Conv2d` or `nn.ConvTranspose2d` (also the
    ``ForwardAD*`` subclasses, whose values these are)."""
    if conv.transposed:

        def apply(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return F.conv_transpose2d(
                x, conv.weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation
            )
    else:

        def apply(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    return apply(hidden_states, conv.bias), None if tangent is None else apply(tangent, None)


def dropout_and_tangent(dropout: nn.Dropout, hidden_states: torch.Tensor, tangent: Tangent):
    r"""Dropout of the primal and the same mask on the tangent."""
    if tangent is None or not dropout.training or dropout.p == 0.0:
        return dropout(hidden_states), tangent
    mask = F.dropout(torch.ones_like(hidden_states), dropout.p, training=True)
    return hidden_states * mask, tangent * mask


def add_tangents(*tangents: Tangent) -> Tangent:
    """The sum of the tangents that exist (``None`` when none does)."""
    present = [tangent for tangent in tangents if tangent is not None]
    if not present:
        return None
    total = present[0]
    for tangent in present[1:]:
        total = total + tangent
    return total


REGIONAL_RECOMPILE_LIMIT = 64
"""Dynamo's recompile limit while the networks' blocks are compiled regionally (see `RegionalCompilationMixin`)."""


class RegionalCompilationMixin:
    """What the denoiser and the encoder add to diffusers' `ModelMixin.compile_repeated_blocks` (regional compilation:
    each ResNet and attention block compiled, the compiled code shared by every block of the same class)."""

    _repeated_blocks = ("ResnetBlock", "AttentionBlock")

    def compile_repeated_blocks(self, *args: object, **kwargs: object) -> None:
        """diffusers' regional compilation, with dynamo's recompile limit raised to `REGIONAL_RECOMPILE_LIMIT`: one
        block class serves blocks of several widths and options (in the encoder also with and without the tangent),
        each a graph of its own, and past dynamo's default limit of 8 the rest would silently stay eager."""
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(config, name, max(getattr(config, name), REGIONAL_RECOMPILE_LIMIT))
        super().compile_repeated_blocks(*args, **kwargs)


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
        forward_ad_compatible (`bool`, defaults to `False`): Build the GroupNorms and convolutions for fast
            evaluation under forward-mode AD (see [`UpcastGroupNorm`] and [`ForwardADConv2d`]); the block
            computes the same function either way.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        forward_ad_compatible: bool = False,
    ):
        super().__init__()
        self.norm1 = UpcastGroupNorm(norm_num_groups, in_channels, forward_ad_compatible=forward_ad_compatible)
        conv = ForwardADConv2d if forward_ad_compatible else nn.Conv2d
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1)
        self.cond_proj = nn.Linear(temb_channels, out_channels, bias=False)
        self.norm2 = UpcastGroupNorm(norm_num_groups, out_channels, forward_ad_compatible=forward_ad_compatible)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = conv(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        nn.init.zeros_(self.cond_proj.weight)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        tangent: Tangent = None,
        temb_tangent: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`).
            temb (`torch.Tensor` of shape `(batch_size, temb_channels)`): The gamma embedding.
            tangent, temb_tangent (*optional*): With `temb_tangent` given, the block returns
                [`~ResnetBlock.forward_and_tangent`] instead (through `forward`, so that a compiled block compiles
                both).

        Returns:
            `torch.Tensor` of shape `(batch_size, out_channels, height, width)`, or the output and its tangent.
        """
        if temb_tangent is not None:
            return self.forward_and_tangent(hidden_states, tangent, temb, temb_tangent)
        h = self.conv1(self.norm1.forward_silu(hidden_states))
        h = h + self.cond_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2.forward_silu(h)))
        shortcut = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states)
        return shortcut + h

    def forward_and_tangent(
        self, hidden_states: torch.Tensor, tangent: Tangent, temb: torch.Tensor, temb_tangent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""`forward` and its forward-mode derivative, in plain differentiable operations.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`).
            tangent (`torch.Tensor` of the same shape, or `None` for zero): The tangent of `hidden_states`.
            temb (`torch.Tensor` of shape `(batch_size, temb_channels)`): The gamma embedding.
            temb_tangent (`torch.Tensor` of shape `(batch_size, temb_channels)`): Its tangent.

        Returns:
            `tuple`: The output and its tangent, both of shape `(batch_size, out_channels, height, width)`.
        """
        h, dh = group_norm_and_tangent(self.norm1, hidden_states, tangent)
        h, dh = silu_and_tangent(h, dh)
        h, dh = conv_and_tangent(self.conv1, h, dh)
        h = h + self.cond_proj(temb)[:, :, None, None]
        cond_tangent = F.linear(temb_tangent, self.cond_proj.weight)[:, :, None, None]
        dh = cond_tangent.expand(h.shape) if dh is None else dh + cond_tangent
        h, dh = group_norm_and_tangent(self.norm2, h, dh)
        h, dh = silu_and_tangent(h, dh)
        h, dh = dropout_and_tangent(self.dropout, h, dh)
        h, dh = conv_and_tangent(self.conv2, h, dh)
        if self.conv_shortcut is None:
            shortcut, shortcut_tangent = hidden_states, tangent
        else:
            shortcut, shortcut_tangent = conv_and_tangent(self.conv_shortcut, hidden_states, tangent)
        return shortcut + h, add_tangents(shortcut_tangent, dh)


def _attention_for_forward_ad(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    r"""``softmax(q k^T / sqrt(d)) v``, written out so that forward-mode AD and reverse mode through its tangent work.

    `F.scaled_dot_product_attention`'s fused kernels have no forward-mode derivative, and its math path, like
    `torch.softmax`'s forward-mode formula, updates in place a tensor that reverse mode through the tangent needs
    (checked with torch 2.13 under `torch.autograd.forward_ad`). The scores and the softmax are computed in float32
    or wider (also under autocast).

    Args:
        query, key, value: shape `(batch_size, heads, tokens, head_dim)`.
    """
    scores = (query @ key.transpose(-2, -1)).to(torch.promote_types(query.dtype, torch.float32))
    scores = scores * query.shape[-1] ** -0.5
    weights = torch.exp(scores - scores.amax(-1, keepdim=True).detach())
    weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(value.dtype) @ value


class AttentionBlock(nn.Module):
    r"""
    VDM's residual self-attention over all spatial positions, via `F.scaled_dot_product_attention`.

    ``x + proj_out(Attention(q, k, v))`` with ``q, k, v`` linear maps of ``GN(x)``; ``proj_out`` is
    zero-initialised, so at initialisation the block is the identity.

    Args:
        channels (`int`): Channels of input and output.
        num_heads (`int`, defaults to 1): Attention heads (VDM uses 1); must divide `channels`.
        norm_num_groups (`int`, defaults to 32): Groups of the GroupNorm (must divide `channels`).
        forward_ad_compatible (`bool`, defaults to `False`): Compute the attention with plain operations
            (`_attention_for_forward_ad`) instead of `F.scaled_dot_product_attention`, whose kernels do not
            support forward-mode AD followed by reverse mode, and build the GroupNorm for fast evaluation under
            forward-mode AD (see [`UpcastGroupNorm`]). Same values either way.
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
        self.norm = UpcastGroupNorm(norm_num_groups, channels, forward_ad_compatible=forward_ad_compatible)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self, hidden_states: torch.Tensor, tangent: Tangent = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, channels, height, width)`).
            tangent (`torch.Tensor` of the same shape, *optional*): With it, the block returns
                [`~AttentionBlock.forward_and_tangent`] instead (through `forward`, so that a compiled block compiles
                both).

        Returns:
            `torch.Tensor` of shape `(batch_size, channels, height, width)`, or the output and its tangent.
        """
        if tangent is not None:
            return self.forward_and_tangent(hidden_states, tangent)
        batch_size, channels, height, width = hidden_states.shape
        head_dim = channels // self.num_heads
        tokens = self.norm(hidden_states).flatten(2).transpose(1, 2)

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, height * width, self.num_heads, head_dim).transpose(1, 2)

        attention = _attention_for_forward_ad if self.forward_ad_compatible else F.scaled_dot_product_attention
        attended = attention(
            split_heads(self.to_q(tokens)), split_heads(self.to_k(tokens)), split_heads(self.to_v(tokens))
        )
        attended = attended.transpose(1, 2).reshape(batch_size, height * width, channels)
        out = self.proj_out(attended).transpose(1, 2).reshape(batch_size, channels, height, width)
        return hidden_states + out

    def forward_and_tangent(self, hidden_states: torch.Tensor, tangent: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        r"""`forward` (with the written-out attention of `_attention_for_forward_ad`) and its forward-mode
        derivative, in plain differentiable operations.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, channels, height, width)`).
            tangent (`torch.Tensor` of the same shape, or `None` for zero).

        Returns:
            `tuple`: The output and its tangent (`None` when `tangent` is), of the input's shape.
        """
        batch_size, channels, height, width = hidden_states.shape
        head_dim = channels // self.num_heads
        normalized, normalized_tangent = group_norm_and_tangent(self.norm, hidden_states, tangent)
        if normalized_tangent is None:
            return self.forward(hidden_states), None

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, height * width, self.num_heads, head_dim).transpose(1, 2)

        def project(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = normalized.flatten(2).transpose(1, 2)
            tokens_tangent = normalized_tangent.flatten(2).transpose(1, 2)
            return split_heads(linear(tokens)), split_heads(F.linear(tokens_tangent, linear.weight))

        (query, dquery), (key, dkey), (value, dvalue) = (project(lin) for lin in (self.to_q, self.to_k, self.to_v))
        score_dtype = torch.promote_types(query.dtype, torch.float32)
        scale = head_dim**-0.5
        scores = (query @ key.transpose(-2, -1)).to(score_dtype) * scale
        scores_tangent = (dquery @ key.transpose(-2, -1) + query @ dkey.transpose(-2, -1)).to(score_dtype) * scale
        weights = torch.exp(scores - scores.amax(-1, keepdim=True).detach())
        weights = weights / weights.sum(-1, keepdim=True)
        # d softmax = P * (dS - sum_j P_j dS_j).
        weights_tangent = weights * (scores_tangent - (weights * scores_tangent).sum(-1, keepdim=True))
        weights, weights_tangent = weights.to(value.dtype), weights_tangent.to(value.dtype)
        attended = weights @ value
        attended_tangent = weights_tangent @ value + weights @ dvalue

        def merge(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch_size, height * width, channels)

        def to_image(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch_size, channels, height, width)

        out = to_image(self.proj_out(merge(attended)))
        out_tangent = to_image(F.linear(merge(attended_tangent), self.proj_out.weight))
        return hidden_states + out, add_tangents(tangent, out_tangent)
