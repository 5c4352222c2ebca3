"""The DiffEnc encoder network ``y_phi(x, gamma)`` (the ``unet_mult_res`` encoder of bemigini/DiffEnc)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.autograd import forward_ad
from torch.nn import functional as F

from .blocks import (
    AttentionBlock,
    ForwardADConv2d,
    ForwardADConvTranspose2d,
    RegionalCompilationMixin,
    ResnetBlock,
    Tangent,
    UpcastGroupNorm,
    check_dropout,
    check_gamma_range,
    check_group_divisible,
    check_int,
    check_sample,
    conv_and_tangent,
    group_norm_and_tangent,
    silu_and_tangent,
)
from .class_embedding import ClassEmbedding, add_class_embedding, check_class_config
from .embeddings import GammaEmbedding, prepare_gamma

TANGENT_MODES = ("explicit", "autograd")
"""How the encoder computes dy/dgamma under forward-mode AD (see `DiffEncEncoderModel.set_tangent_mode`)."""

DEFAULT_BLOCK_OUT_CHANNELS = [64, 128]
"""`block_out_channels` of the paper's DiffEnc-32-4 CIFAR-10 encoder, used when none are given."""


@dataclass
class DiffEncEncoderOutput(BaseOutput):
    r"""
    Output of [`DiffEncEncoderModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
            ``y = tanh(h)``, values in `(-1, 1)`; exactly 0 at initialisation.
    """

    sample: torch.Tensor


def _max_pool_and_tangent(hidden_states: torch.Tensor, tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 max-pool, and the tangent taken at each window's maximum (the element the pool selects)."""
    pooled, indices = F.max_pool2d(hidden_states, kernel_size=2, return_indices=True)
    pooled_tangent = tangent.flatten(2).gather(2, indices.flatten(2)).view(pooled.shape)
    return pooled, pooled_tangent


def _checkpointed(owner: nn.Module, function: Callable, *args: object) -> object:
    """``function(*args)``, through the owner's gradient-checkpointing function when its checkpointing is on (set
    by [`~DiffEncEncoderModel.enable_gradient_checkpointing`]) and gradients are being recorded."""
    if torch.is_grad_enabled() and owner.gradient_checkpointing:
        return owner._gradient_checkpointing_func(function, *args)
    return function(*args)


class EncoderDownBlock(nn.Module):
    r"""
    One resolution level of the encoder's contracting path: `num_layers` ResNet blocks, then a 2x2 max-pool.

    Args:
        in_channels (`int`): Channels of the input.
        out_channels (`int`): Channels of the level (all its ResNet blocks output this many).
        temb_channels (`int`): Width of the gamma embedding.
        num_layers (`int`): ResNet blocks in the level (at least 1).
        dropout (`float`): Dropout probability inside the ResNet blocks.
        norm_num_groups (`int`): Groups of every GroupNorm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        dropout: float,
        norm_num_groups: int,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(
                    in_channels if index == 0 else out_channels,
                    out_channels,
                    temb_channels,
                    dropout,
                    norm_num_groups,
                    forward_ad_compatible=True,
                )
                for index in range(num_layers)
            ]
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`).
            temb (`torch.Tensor` of shape `(batch_size, temb_channels)`).

        Returns:
            `tuple`: The pooled output, shape `(batch_size, out_channels, height // 2, width // 2)`, and the
            skip connection before pooling, shape `(batch_size, out_channels, height, width)`.
        """
        for resnet in self.resnets:
            hidden_states = _checkpointed(self, resnet, hidden_states, temb)
        return F.max_pool2d(hidden_states, kernel_size=2), hidden_states

    def forward_and_tangent(
        self, hidden_states: torch.Tensor, tangent: Tangent, temb: torch.Tensor, temb_tangent: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        r"""`forward` and its forward-mode derivative (see [`ResnetBlock.forward_and_tangent`]).

        Returns:
            `tuple`: (pooled output, its tangent) and (skip connection, its tangent).
        """
        for resnet in self.resnets:
            hidden_states, tangent = _checkpointed(self, resnet, hidden_states, temb, tangent, temb_tangent)
        return _max_pool_and_tangent(hidden_states, tangent), (hidden_states, tangent)


class EncoderUpBlock(nn.Module):
    r"""
    One resolution level of the encoder's expanding path: a stride-2 transposed convolution, concatenation
    with the level's skip connection, then `num_layers` ResNet blocks.

    Args:
        in_channels (`int`): Channels of the (lower-resolution) input.
        out_channels (`int`): Channels of the level (and of its skip connection).
        temb_channels (`int`): Width of the gamma embedding.
        num_layers (`int`): ResNet blocks in the level (at least 1).
        dropout (`float`): Dropout probability inside the ResNet blocks.
        norm_num_groups (`int`): Groups of every GroupNorm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        dropout: float,
        norm_num_groups: int,
    ):
        super().__init__()
        self.upsample = ForwardADConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(
                    2 * out_channels if index == 0 else out_channels,
                    out_channels,
                    temb_channels,
                    dropout,
                    norm_num_groups,
                    forward_ad_compatible=True,
                )
                for index in range(num_layers)
            ]
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, in_channels, height // 2, width // 2)`).
            skip (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`).
            temb (`torch.Tensor` of shape `(batch_size, temb_channels)`).

        Returns:
            `torch.Tensor` of shape `(batch_size, out_channels, height, width)`.
        """
        hidden_states = torch.cat([self.upsample(hidden_states), skip], dim=1)
        for resnet in self.resnets:
            hidden_states = _checkpointed(self, resnet, hidden_states, temb)
        return hidden_states

    def forward_and_tangent(
        self,
        hidden_states: torch.Tensor,
        tangent: torch.Tensor,
        skip: tuple[torch.Tensor, torch.Tensor],
        temb: torch.Tensor,
        temb_tangent: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""`forward` and its forward-mode derivative (see [`ResnetBlock.forward_and_tangent`]); `skip` is the
        skip connection and its tangent."""
        upsampled, upsampled_tangent = conv_and_tangent(self.upsample, hidden_states, tangent)
        hidden_states = torch.cat([upsampled, skip[0]], dim=1)
        tangent = torch.cat([upsampled_tangent, skip[1]], dim=1)
        for resnet in self.resnets:
            hidden_states, tangent = _checkpointed(self, resnet, hidden_states, temb, tangent, temb_tangent)
        return hidden_states, tangent


class DiffEncEncoderModel(RegionalCompilationMixin, ModelMixin, ConfigMixin):
    r"""
    The DiffEnc encoder network ``y_phi(x, gamma) = tanh(h)``, with ``h`` a small multi-resolution U-Net
    conditioned on gamma (= -log SNR). The trainable DiffEnc encoding is
    ``x_phi(x, t) = alpha_t^2 x + sigma_t^2 y_phi(x, gamma_t)``; that combination is the objective's job.

    Layout (as the official ``unet_mult_res`` encoder): a 3x3 convolution to ``block_out_channels[0]``; per
    level ``i``, `layers_per_block` ResNet blocks with ``block_out_channels[i]`` channels followed by a 2x2
    max-pool (every level pools, the last included); a middle ResNet, self-attention, ResNet at
    ``block_out_channels[-1]`` channels and ``1 / 2**len(block_out_channels)`` of the input resolution; per
    level, deepest first, a stride-2 transposed convolution, concatenation with the level's pre-pool output,
    and `layers_per_block` ResNet blocks; GroupNorm, SiLU, a zero-initialised 3x3 convolution to
    `in_channels`, and tanh. At initialisation the output is exactly 0. The input is not given Fourier
    features (the official encoder does not use them either).

    The gamma embedding is the same as the denoiser's: sinusoidal embedding of width ``block_out_channels[0]``
    of ``1000 * (gamma - gamma_min) / (gamma_max - gamma_min)``, then an MLP to ``4 * block_out_channels[0]``.
    The network works in forward-mode AD with respect to gamma (`torch.autograd.forward_ad`, or
    `torch.func.jvp`), with reverse mode through the tangent afterwards, which is how the objective obtains
    ``dy / dgamma`` and trains through it: it has no in-place operations, and the middle attention is written out
    instead of calling `F.scaled_dot_product_attention`. Its GroupNorms and convolutions carry hand-written
    forward-mode derivatives that are much cheaper to train through than PyTorch's built-in ones.

    The defaults are the paper's DiffEnc-32-4 CIFAR-10 encoder (official config ``n_embd=64, n_layer=4``,
    ``unet_mult_res``, which for 32x32 inputs builds two levels of 64 and 128 channels with two ResNet
    blocks each): 2,743,875 parameters (the official JAX encoder has 2,744,131; the 256 missing are the
    weights of its unused class-conditioning input column).

    Args:
        sample_size (`int`, defaults to 32): Height and width of the images the model is meant for; must be
            divisible by ``2**len(block_out_channels)``. The network accepts any such size.
        in_channels (`int`, defaults to 3): Channels of the input and of the output.
        block_out_channels (`list[int]`, *optional*, defaults to `[64, 128]`): Channels of each resolution
            level, highest resolution first (the official encoder doubles per level). Each must be a
            multiple of `norm_num_groups`; the first must be >= 4 (it is the gamma embedding's width).
        layers_per_block (`int`, defaults to 2): ResNet blocks per level on each path.
        dropout (`float`, defaults to 0.1): Dropout probability inside every ResNet block, in `[0, 1)`.
        norm_num_groups (`int`, defaults to 32): Groups of every GroupNorm, except those that the next two
            arguments set.
        gamma_min (`float`, defaults to -13.3): The gamma mapped to ``t = 0`` by the gamma embedding: the
            embedding's range, fixed with the trained network, not the noise schedule (the scheduler's
            `gamma_min`/`gamma_max`, which a learned schedule moves; see `diffenc_diffusers.noise_schedule`).
        gamma_max (`float`, defaults to 5.0): The gamma mapped to ``t = 1`` by the gamma embedding (as `gamma_min`).
        num_class_embeds (`int`, *optional*): Number of classes K of a class-conditional model (labels
            0 .. K - 1 in `forward`'s `class_labels`); `None` (default) for an unconditional model, which has no
            class parameters. A learned, zero-initialised vector per class is added to the gamma embedding.
        null_class (`bool`, defaults to `False`): Add the null class, label K, that stands for "no label"
            (the unconditional model of classifier-free guidance; needs `num_class_embeds`).
        norm_out_num_groups (`int`, *optional*): Groups of the output GroupNorm (before the last convolution);
            defaults to `norm_num_groups`. The official encoder uses its config's `num_groups_groupnorm` (16)
            here and 32 groups elsewhere; converted official checkpoints set it (see docs/conversion.md).
        mid_block_norm_num_groups (`int`, *optional*): Groups of the GroupNorms of the two middle ResNet blocks;
            defaults to `norm_num_groups` (the official ``unet`` encoder uses `num_groups_groupnorm` there, the
            ``unet_mult_res`` one 32).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        block_out_channels: list[int] | None = None,
        layers_per_block: int = 2,
        dropout: float = 0.1,
        norm_num_groups: int = 32,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        num_class_embeds: int | None = None,
        null_class: bool = False,
        norm_out_num_groups: int | None = None,
        mid_block_norm_num_groups: int | None = None,
    ):
        super().__init__()
        if block_out_channels is None:
            block_out_channels = list(DEFAULT_BLOCK_OUT_CHANNELS)
        if not isinstance(block_out_channels, (list, tuple)):
            raise TypeError(
                f"`block_out_channels` must be a non-empty list of ints; got {block_out_channels!r} of type "
                f"{type(block_out_channels).__name__}."
            )
        if len(block_out_channels) == 0:
            raise ValueError("`block_out_channels` must be a non-empty list of ints; got an empty list.")
        block_out_channels = list(block_out_channels)
        self.register_to_config(block_out_channels=block_out_channels)

        check_int("sample_size", sample_size, 1)
        check_int("in_channels", in_channels, 1)
        check_int("layers_per_block", layers_per_block, 1)
        check_dropout("dropout", dropout)
        check_int("norm_num_groups", norm_num_groups, 1)
        for index, channels in enumerate(block_out_channels):
            check_int(f"block_out_channels[{index}]", channels, 4 if index == 0 else 1)
            check_group_divisible(f"block_out_channels[{index}]", channels, norm_num_groups)
        check_gamma_range(gamma_min, gamma_max)
        check_class_config(num_class_embeds, null_class)
        out_groups = norm_num_groups if norm_out_num_groups is None else norm_out_num_groups
        mid_groups = norm_num_groups if mid_block_norm_num_groups is None else mid_block_norm_num_groups
        check_int("norm_out_num_groups", out_groups, 1)
        check_group_divisible("block_out_channels[0]", block_out_channels[0], out_groups)
        check_int("mid_block_norm_num_groups", mid_groups, 1)
        check_group_divisible("block_out_channels[-1]", block_out_channels[-1], mid_groups)
        downsample_factor = 2 ** len(block_out_channels)
        if sample_size % downsample_factor != 0:
            raise ValueError(
                f"`sample_size` must be divisible by 2**len(block_out_channels) = {downsample_factor}; "
                f"got {sample_size}."
            )

        temb_channels = 4 * block_out_channels[0]
        self.time_embedding = GammaEmbedding(block_out_channels[0], gamma_min, gamma_max)
        self.conv_in = ForwardADConv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)

        level_inputs = [block_out_channels[0], *block_out_channels[:-1]]
        self.down_blocks = nn.ModuleList(
            [
                EncoderDownBlock(
                    channels_in, channels, temb_channels, layers_per_block, dropout, norm_num_groups
                )
                for channels_in, channels in zip(level_inputs, block_out_channels, strict=True)
            ]
        )

        mid_channels = block_out_channels[-1]
        self.mid_block_1 = ResnetBlock(
            mid_channels, mid_channels, temb_channels, dropout, mid_groups, forward_ad_compatible=True
        )
        self.mid_attention = AttentionBlock(
            mid_channels, num_heads=1, norm_num_groups=norm_num_groups, forward_ad_compatible=True
        )
        self.mid_block_2 = ResnetBlock(
            mid_channels, mid_channels, temb_channels, dropout, mid_groups, forward_ad_compatible=True
        )

        up_inputs = [*block_out_channels[1:], mid_channels]
        self.up_blocks = nn.ModuleList(
            [
                EncoderUpBlock(
                    channels_in, channels, temb_channels, layers_per_block, dropout, norm_num_groups
                )
                for channels_in, channels in reversed(list(zip(up_inputs, block_out_channels, strict=True)))
            ]
        )

        self.norm_out = UpcastGroupNorm(out_groups, block_out_channels[0], forward_ad_compatible=True)
        self.conv_out = ForwardADConv2d(block_out_channels[0], in_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # Created last, so that an unconditional config draws the same initial weights as before.
        self.class_embedding = (
            ClassEmbedding(num_class_embeds, temb_channels, null_class) if num_class_embeds is not None else None
        )
        self.gradient_checkpointing = False
        self.set_tangent_mode("explicit")

    def set_tangent_mode(self, mode: str) -> None:
        r"""
        Choose how `forward` computes ``dy / dgamma`` when `gamma` carries a tangent of `torch.autograd.forward_ad`
        (how [`DiffEncObjective`] calls it). Either way the values and all derivatives are the same (up to
        rounding).

        - `"explicit"` (default): [`~DiffEncEncoderModel.forward_and_tangent`], which computes the output and its
          tangent with plain operations, so that reverse mode runs through both, `torch.compile` traces it and
          gradient checkpointing applies. Used when gamma alone carries the tangent; any other forward-mode use
          (a tangent on `sample` or on a parameter, `torch.func.jvp`) gets PyTorch's own formulas, and the plain
          forward pass uses no custom autograd function (it traces without graph breaks).
        - `"autograd"`: PyTorch's forward-mode AD through the network, with the hand-written rules of the
          GroupNorms and convolutions (`torch.compile` breaks the graph at each of them; gradient checkpointing is
          not applied to a forward-mode pass).

        Args:
            mode (`str`): `"explicit"` or `"autograd"`.
        """
        if mode not in TANGENT_MODES:
            raise ValueError(f"`mode` must be one of {list(TANGENT_MODES)}; got {mode!r}.")
        self.tangent_mode = mode
        for module in self.modules():
            if isinstance(module, (UpcastGroupNorm, ForwardADConv2d, ForwardADConvTranspose2d)):
                module.use_custom_jvp = mode == "autograd"

    @property
    def downsample_factor(self) -> int:
        """The total pooling factor ``2**len(block_out_channels)``; input height and width must be multiples
        of it."""
        return 2 ** len(self.config.block_out_channels)

    def forward(
        self,
        sample: torch.Tensor,
        gamma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DiffEncEncoderOutput | tuple[torch.Tensor]:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                Clean data, scaled to `[-1, 1]`; `height` and `width` divisible by
                [`~DiffEncEncoderModel.downsample_factor`].
            gamma (`torch.Tensor` of shape `(batch_size,)` or `()`, or `float`):
                ``gamma_t = -log SNR(t)`` of each sample (a 0-d tensor or a Python float is shared by the
                batch). Normalised with the config's `gamma_min`/`gamma_max` in float32 or wider.
            class_labels (`torch.Tensor` of shape `(batch_size,)` or `()`, *optional*): Integer class labels
                of a class-conditional model (`num_class_embeds` set): 0 .. K - 1, or K for the null class. Must
                be `None` for an unconditional model.
            return_dict (`bool`, defaults to `True`): Return a [`DiffEncEncoderOutput`] instead of a tuple.

        Returns:
            [`DiffEncEncoderOutput`] or `tuple`: ``y = tanh(h)``, same shape as `sample`, values in `(-1, 1)`.

        Raises:
            TypeError: If `sample` is not a floating-point tensor, or `gamma` is not a float tensor or number.
            ValueError: If `sample` is not 4-D with `in_channels` channels and height and width divisible by
                the downsample factor, or `gamma` has the wrong shape.
        """
        self._check_sample(sample)
        gamma_tangent = self._explicit_gamma_tangent(sample, gamma)
        if gamma_tangent is not None:
            y, dy = self.forward_and_tangent(sample, forward_ad.unpack_dual(gamma).primal, gamma_tangent, class_labels)
            y = forward_ad.make_dual(y, dy)
            return DiffEncEncoderOutput(sample=y) if return_dict else (y,)

        gamma = prepare_gamma(gamma, sample.shape[0], sample.device, sample.dtype)
        temb = add_class_embedding(self.class_embedding, self.time_embedding(gamma), class_labels)

        h = self.conv_in(sample)
        skips = []
        for down_block in self.down_blocks:
            h, skip = down_block(h, temb)
            skips.append(skip)

        h = _checkpointed(self, self.mid_block_1, h, temb)
        h = _checkpointed(self, self.mid_attention, h)
        h = _checkpointed(self, self.mid_block_2, h, temb)

        for up_block in self.up_blocks:
            h = up_block(h, skips.pop(), temb)

        y = torch.tanh(self.conv_out(F.silu(self.norm_out(h))))
        if not return_dict:
            return (y,)
        return DiffEncEncoderOutput(sample=y)

    def forward_and_tangent(
        self,
        sample: torch.Tensor,
        gamma: torch.Tensor | float,
        gamma_tangent: torch.Tensor | float = 1.0,
        class_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        ``y = y_phi(x, gamma)`` and its directional derivative ``(dy / dgamma) * gamma_tangent``, computed together
        with plain differentiable operations: reverse mode runs through both (how the objective trains through
        ``dy / dgamma``), `torch.compile` traces it, and gradient checkpointing applies. The values are those of
        `forward` and of forward-mode AD through it.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): As in `forward`.
            gamma (`torch.Tensor` of shape `(batch_size,)` or `()`, or `float`): As in `forward`.
            gamma_tangent (`torch.Tensor` of shape `(batch_size,)` or `()`, or `float`, defaults to 1.0): The
                tangent of gamma; 1 gives ``dy / dgamma``.
            class_labels (`torch.Tensor` of shape `(batch_size,)` or `()`, *optional*): As in `forward`.

        Returns:
            `tuple`: ``y`` and its tangent, both of the shape of `sample` (the tangent in y's dtype).
        """
        self._check_sample(sample)
        batch_size = sample.shape[0]
        gamma = prepare_gamma(gamma, batch_size, sample.device, sample.dtype)
        gamma_tangent = prepare_gamma(gamma_tangent, batch_size, sample.device, gamma.dtype)
        temb, temb_tangent = self.time_embedding.forward_and_tangent(gamma, gamma_tangent)
        temb = add_class_embedding(self.class_embedding, temb, class_labels)

        h, dh = self.conv_in(sample), None
        skips = []
        for down_block in self.down_blocks:
            (h, dh), skip = down_block.forward_and_tangent(h, dh, temb, temb_tangent)
            skips.append(skip)

        h, dh = _checkpointed(self, self.mid_block_1, h, temb, dh, temb_tangent)
        h, dh = _checkpointed(self, self.mid_attention, h, dh)
        h, dh = _checkpointed(self, self.mid_block_2, h, temb, dh, temb_tangent)

        for up_block in self.up_blocks:
            h, dh = up_block.forward_and_tangent(h, dh, skips.pop(), temb, temb_tangent)

        h, dh = group_norm_and_tangent(self.norm_out, h, dh)
        h, dh = conv_and_tangent(self.conv_out, *silu_and_tangent(h, dh))
        y = torch.tanh(h)
        return y, (1 - y.square()) * dh

    def _check_sample(self, sample: torch.Tensor) -> None:
        check_sample(sample, self.config.in_channels)
        factor = self.downsample_factor
        if sample.shape[2] % factor != 0 or sample.shape[3] % factor != 0:
            raise ValueError(
                f"`sample` height and width must be divisible by {factor} (2**len(block_out_channels), the "
                f"encoder's pooling factor); got shape {tuple(sample.shape)}."
            )

    def _explicit_gamma_tangent(self, sample: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor | None:
        """The tangent of `gamma` under `torch.autograd.forward_ad` when `forward` should compute its derivative
        with `forward_and_tangent`: tangent mode "explicit", and no other input or parameter has a tangent."""
        if self.tangent_mode != "explicit" or not isinstance(gamma, torch.Tensor):
            return None
        tangent = forward_ad.unpack_dual(gamma).tangent
        if tangent is None:
            return None
        others = (sample, *self.parameters())
        if any(forward_ad.unpack_dual(tensor).tangent is not None for tensor in others):
            return None
        return tangent
