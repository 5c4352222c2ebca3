"""The VDM denoiser: the ``ScoreUNet`` of google-research/vdm as a diffusers model."""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .blocks import (
    AttentionBlock,
    RegionalCompilationMixin,
    ResnetBlock,
    UpcastGroupNorm,
    check_bool,
    check_dropout,
    check_gamma_range,
    check_group_divisible,
    check_int,
    check_sample,
)
from .class_embedding import ClassEmbedding, add_class_embedding, check_class_config
from .embeddings import GammaEmbedding, base2_fourier_features, prepare_gamma


@dataclass
class VDMUNetOutput(BaseOutput):
    r"""
    Output of [`VDMUNetModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
            The network's prediction (``v`` or ``eps``, depending on the objective it is trained with),
            ``net(z) + z``.
    """

    sample: torch.Tensor


class VDMUNetModel(RegionalCompilationMixin, ModelMixin, ConfigMixin):
    r"""
    The VDM score network (``ScoreUNet`` of Kingma et al. 2021): a U-Net without down-sampling, conditioned
    on gamma (= -log SNR), whose output adds its input (``pred = net(z) + z``, VDM's base measure).

    Layout: the input and its base-2 Fourier features are concatenated and projected by a 3x3 convolution to
    `hidden_channels`; `num_layers` ResNet blocks go "down" (each output kept as a skip, as is the input
    projection); the middle is ResNet, self-attention, ResNet; `num_layers + 1` ResNet blocks go "up", each
    consuming ``concat(h, skip)``; GroupNorm, SiLU and a zero-initialised 3x3 convolution map back to
    `in_channels`. At initialisation the output equals the input exactly. All resolutions are kept, so any
    height and width are accepted.

    The defaults are VDM's CIFAR-10 denoiser (128 channels, 32 layers per side, middle attention only,
    dropout 0.1, Fourier exponents 6 and 7): 30,577,667 parameters (VDM's JAX model has 30,578,179; the 512
    missing are the weights of VDM's unused class-conditioning input column).

    Args:
        sample_size (`int`, defaults to 32): Height and width of the images the model is meant for (used by
            pipelines to size samples; the network itself accepts any size).
        in_channels (`int`, defaults to 3): Channels of the input and of the output.
        hidden_channels (`int`, defaults to 128): Width of every block; also the width of the sinusoidal
            gamma embedding, which the embedding MLP widens to `4 * hidden_channels`. Must be >= 4 and a
            multiple of `norm_num_groups`.
        num_layers (`int`, defaults to 32): ResNet blocks on the way down (`num_layers + 1` on the way up).
        dropout (`float`, defaults to 0.1): Dropout probability inside every ResNet block, in `[0, 1)`.
        attention_in_blocks (`bool`, defaults to `False`): Add a self-attention block after every down and up
            ResNet block (VDM's `with_attention`; off for CIFAR-10). The middle attention is always present.
        use_fourier_features (`bool`, defaults to `True`): Concatenate base-2 Fourier features of the input.
        fourier_features_start (`int`, defaults to 6): First exponent ``n`` of the features
            ``sin/cos(2**n * 2 pi z)``.
        fourier_features_stop (`int`, defaults to 8): Exponents stop before this value (as in `range`).
        fourier_features_step (`int`, defaults to 1): Step between exponents (positive).
        norm_num_groups (`int`, defaults to 32): Groups of every GroupNorm.
        gamma_min (`float`, defaults to -13.3): The gamma mapped to ``t = 0`` by the gamma embedding: the
            embedding's range, fixed with the trained network, not the noise schedule (the scheduler's
            `gamma_min`/`gamma_max`, which a learned schedule moves; see `diffenc_diffusers.noise_schedule`).
        gamma_max (`float`, defaults to 5.0): The gamma mapped to ``t = 1`` by the gamma embedding (as `gamma_min`).
        num_class_embeds (`int`, *optional*): Number of classes K of a class-conditional model (labels
            0 .. K - 1 in `forward`'s `class_labels`); `None` (default) for an unconditional model, which has no
            class parameters. A learned, zero-initialised vector per class is added to the gamma embedding.
        null_class (`bool`, defaults to `False`): Add the null class, label K, that stands for "no label"
            (the unconditional model of classifier-free guidance; needs `num_class_embeds`).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        hidden_channels: int = 128,
        num_layers: int = 32,
        dropout: float = 0.1,
        attention_in_blocks: bool = False,
        use_fourier_features: bool = True,
        fourier_features_start: int = 6,
        fourier_features_stop: int = 8,
        fourier_features_step: int = 1,
        norm_num_groups: int = 32,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        num_class_embeds: int | None = None,
        null_class: bool = False,
    ):
        super().__init__()
        check_int("sample_size", sample_size, 1)
        check_int("in_channels", in_channels, 1)
        check_int("hidden_channels", hidden_channels, 4)
        check_int("num_layers", num_layers, 0)
        check_dropout("dropout", dropout)
        check_bool("attention_in_blocks", attention_in_blocks)
        check_bool("use_fourier_features", use_fourier_features)
        check_int("fourier_features_start", fourier_features_start)
        check_int("fourier_features_stop", fourier_features_stop)
        check_int("fourier_features_step", fourier_features_step, 1)
        check_int("norm_num_groups", norm_num_groups, 1)
        check_group_divisible("hidden_channels", hidden_channels, norm_num_groups)
        check_gamma_range(gamma_min, gamma_max)
        check_class_config(num_class_embeds, null_class)

        self.fourier_exponents: list[int] = []
        if use_fourier_features:
            self.fourier_exponents = list(
                range(fourier_features_start, fourier_features_stop, fourier_features_step)
            )
            if not self.fourier_exponents:
                raise ValueError(
                    "`fourier_features_start` must be smaller than `fourier_features_stop` when "
                    f"`use_fourier_features` is True; got start={fourier_features_start}, "
                    f"stop={fourier_features_stop}."
                )

        temb_channels = 4 * hidden_channels
        self.time_embedding = GammaEmbedding(hidden_channels, gamma_min, gamma_max)
        # The exponents as a tensor that follows the model to its device (int64: `.to(dtype)` leaves it alone).
        self.register_buffer(
            "fourier_exponents_tensor", torch.tensor(self.fourier_exponents, dtype=torch.int64), persistent=False
        )
        conv_in_channels = in_channels * (1 + 2 * len(self.fourier_exponents))
        self.conv_in = nn.Conv2d(conv_in_channels, hidden_channels, kernel_size=3, padding=1)

        def resnet(channels_in: int) -> ResnetBlock:
            return ResnetBlock(channels_in, hidden_channels, temb_channels, dropout, norm_num_groups)

        def attention() -> AttentionBlock:
            return AttentionBlock(hidden_channels, num_heads=1, norm_num_groups=norm_num_groups)

        self.down_blocks = nn.ModuleList([resnet(hidden_channels) for _ in range(num_layers)])
        self.mid_block_1 = resnet(hidden_channels)
        self.mid_attention = attention()
        self.mid_block_2 = resnet(hidden_channels)
        self.up_blocks = nn.ModuleList([resnet(2 * hidden_channels) for _ in range(num_layers + 1)])
        self.down_attentions = (
            nn.ModuleList([attention() for _ in range(num_layers)]) if attention_in_blocks else None
        )
        self.up_attentions = (
            nn.ModuleList([attention() for _ in range(num_layers + 1)]) if attention_in_blocks else None
        )
        self.norm_out = UpcastGroupNorm(norm_num_groups, hidden_channels)
        self.conv_out = nn.Conv2d(hidden_channels, in_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

        # Created last, so that an unconditional config draws the same initial weights as before.
        self.class_embedding = (
            ClassEmbedding(num_class_embeds, temb_channels, null_class) if num_class_embeds is not None else None
        )
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """Applies `block`, through the gradient-checkpointing function when checkpointing is on."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        sample: torch.Tensor,
        gamma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> VDMUNetOutput | tuple[torch.Tensor]:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                The noisy sample ``z_t`` (floating point; roughly unit scale, as ``alpha_t x + sigma_t eps``).
            gamma (`torch.Tensor` of shape `(batch_size,)` or `()`, or `float`):
                ``gamma_t = -log SNR(t)`` of each sample (a 0-d tensor or a Python float is shared by the
                batch). Normalised with the config's `gamma_min`/`gamma_max` in float32 or wider.
            class_labels (`torch.Tensor` of shape `(batch_size,)` or `()`, *optional*): Integer class labels
                of a class-conditional model (`num_class_embeds` set): 0 .. K - 1, or K for the null class. Must
                be `None` for an unconditional model.
            return_dict (`bool`, defaults to `True`): Return a [`VDMUNetOutput`] instead of a tuple.

        Returns:
            [`VDMUNetOutput`] or `tuple`: The prediction ``net(z) + z``, of the same shape as `sample`.

        Raises:
            TypeError: If `sample` is not a floating-point tensor, or `gamma` is not a float tensor or number.
            ValueError: If `sample` is not 4-D with `in_channels` channels, or `gamma` has the wrong shape.
        """
        check_sample(sample, self.config.in_channels)
        gamma = prepare_gamma(gamma, sample.shape[0], sample.device, sample.dtype)
        temb = add_class_embedding(self.class_embedding, self.time_embedding(gamma), class_labels)

        h = sample
        if self.fourier_exponents:
            h = torch.cat([sample, base2_fourier_features(sample, self.fourier_exponents_tensor)], dim=1)
        h = self.conv_in(h)

        skips = [h]
        for index, block in enumerate(self.down_blocks):
            h = self._run(block, h, temb)
            if self.down_attentions is not None:
                h = self._run(self.down_attentions[index], h)
            skips.append(h)

        h = self._run(self.mid_block_1, h, temb)
        h = self._run(self.mid_attention, h)
        h = self._run(self.mid_block_2, h, temb)

        for index, block in enumerate(self.up_blocks):
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), temb)
            if self.up_attentions is not None:
                h = self._run(self.up_attentions[index], h)

        prediction = self.conv_out(self.norm_out.forward_silu(h)) + sample
        if not return_dict:
            return (prediction,)
        return VDMUNetOutput(sample=prediction)
