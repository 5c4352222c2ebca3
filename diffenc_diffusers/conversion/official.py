"""The official DiffEnc (bemigini/DiffEnc) and VDM (google-research/vdm) models in terms of this package.

`OfficialModel` describes one official model: which of our components it becomes, their configs, and where
each of our parameters lives in the official Flax parameter tree (and how its layout differs). Everything is
derived from the official config; the checkpoint is then checked against it (nothing missing, nothing unknown,
every shape as expected) by :mod:`.convert`.

Layout rules (Flax -> PyTorch): a `Conv` kernel (kh, kw, in, out) becomes a `Conv2d` weight (out, in, kh, kw);
a `ConvTranspose` kernel (kh, kw, in, out) becomes a `ConvTranspose2d` weight (in, out, kh, kw) with both
spatial axes flipped (Flax's transposed convolution does not flip its kernel, PyTorch's does); a `Dense`
kernel (in, out) becomes a `Linear` weight (out, in), or a 1x1 `Conv2d` weight for the ResNet shortcut
(`nin_shortcut`); GroupNorm `scale` is the weight.

The one official parameter without a counterpart is the last input row of each time-embedding MLP's first
layer (`dense0`): both official codes concatenate a `conditioning` scalar to the gamma embedding. For the
models converted here that scalar is always 0 (DiffEnc's `*_unconditional` datasets and VDM's `cifar10`
pipeline feed zeros, in training, evaluation and sampling), so the row multiplies 0 and never changes an
output. The converter requires that condition (a conditional or augmented dataset is refused) and reports
the dropped rows.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..forward_processes import forward_process
from ..models import DiffEncEncoderModel, VDMUNetModel

DIFFENC_MODEL_TYPES = {
    # ddpm_type: (prediction_type, encoder_type)
    "VDM2_V": ("v_prediction", "none"),
    "VDM2": ("epsilon", "none"),
    "S4V_NT": ("v_prediction", "nontrainable"),
    "S3VA": ("v_prediction", "trainable"),
}
DIFFENC_DATASETS = {
    # dataset_name (conditioning fixed at 0): (channels, height, width)
    "cifar10_unconditional": (3, 32, 32),
    "mnist_unconditional": (1, 28, 28),
    "imagenet32_unconditional": (3, 32, 32),
    "imagenet64_unconditional": (3, 64, 64),
}
VDM_DATASETS = {"cifar10": (3, 32, 32)}
"""google-research/vdm datasets whose pipeline feeds conditioning = 0 (`cifar10_aug*` feeds an augmentation flag)."""

OFFICIAL_GROUPS = 32
"""Flax's default GroupNorm group count, which the official blocks use wherever no count is passed."""

DIFFENC_SOURCE = {
    "name": "bemigini/DiffEnc (Nielsen et al., DiffEnc, ICLR 2024)",
    "code": "https://github.com/bemigini/DiffEnc (Apache-2.0)",
    "weights": "https://doi.org/10.11583/DTU.c.7065284.v1 (DTU Data)",
    "license_link": "https://doi.org/10.11583/DTU.c.7065284.v1",
}
VDM_SOURCE = {
    "name": "google-research/vdm (Kingma et al., Variational Diffusion Models, NeurIPS 2021)",
    "code": "https://github.com/google-research/vdm (Apache-2.0)",
    "weights": "gs://gresearch/vdm/cifar10/checkpoint-final (linked from the google-research/vdm README)",
    "license_link": "https://github.com/google-research/vdm/blob/main/LICENSE",
}

VDM_CIFAR10_CONFIG: dict[str, Any] = {
    "data": {"dataset": "cifar10"},
    "model": {
        "vocab_size": 256,
        "sample_softmax": False,
        "antithetic_time_sampling": True,
        "with_fourier_features": True,
        "with_attention": False,
        "gamma_type": "learnable_scalar",
        "gamma_min": -13.3,
        "gamma_max": 5.0,
        "sm_n_timesteps": 0,
        "sm_n_embd": 128,
        "sm_n_layer": 32,
        "sm_pdrop": 0.1,
    },
}
"""The values of google-research/vdm's configs/cifar10.py (the `data` and `model` parts), usable as
``--config vdm-cifar10``."""
BUILTIN_CONFIGS = {"vdm-cifar10": VDM_CIFAR10_CONFIG}

# Kinds of parameter layout changes (see the module docstring).
VECTOR, CONV, CONV_TRANSPOSE, DENSE, DENSE_TO_CONV1X1, TIME_DENSE0 = (
    "vector", "conv", "conv_transpose", "dense", "dense_to_conv1x1", "time_dense0"
)


@dataclass(frozen=True)
class ParameterMapping:
    """Where one of our parameters comes from: the official path ('/'-joined) and the layout change."""

    official_path: str
    kind: str


@dataclass
class OfficialModel:
    """One official model described in this package's terms.

    Attributes:
        source: "diffenc" or "vdm".
        model_type: The official model class (`ddpm_type` of DiffEnc, or "VDM").
        dataset: The official dataset name (its conditioning is 0).
        image_shape: (channels, height, width).
        unet_config / encoder_config / scheduler_config: Our components' configs (no encoder: None); a learned
            schedule's endpoints are filled in from the checkpoint.
        learned_schedule: Whether the checkpoint holds `gamma/w` and `gamma/b` (gamma(t) = b + |w| t).
        unet_map / encoder_map: our state-dict key -> `ParameterMapping`.
        official_config: The official config as read.
    """

    source: str
    model_type: str
    dataset: str
    image_shape: tuple[int, int, int]
    unet_config: dict[str, Any]
    encoder_config: dict[str, Any] | None
    scheduler_config: dict[str, Any]
    learned_schedule: bool
    official_config: dict[str, Any]
    unet_map: dict[str, ParameterMapping] = field(default_factory=dict)
    encoder_map: dict[str, ParameterMapping] = field(default_factory=dict)

    @property
    def provenance(self) -> dict[str, str]:
        """Where such weights come from (for the model card)."""
        return dict(DIFFENC_SOURCE if self.source == "diffenc" else VDM_SOURCE)

    def schedule_paths(self) -> dict[str, tuple[int, ...]]:
        """Official paths and shapes of the noise schedule's parameters (empty for a fixed schedule)."""
        return {"gamma/b": (1,), "gamma/w": (1,)} if self.learned_schedule else {}

    def expected_tree(self) -> dict[str, tuple[int, ...]]:
        """Every official parameter path with its shape, as the official code builds it for this config."""
        tree = dict(self.schedule_paths())
        for model_class, config, mapping in self._components():
            for key, shape in _state_shapes(model_class, config).items():
                entry = mapping[key]
                tree[entry.official_path] = official_shape(entry.kind, shape)
        return tree

    def inert_parameters(self) -> dict[str, str]:
        """Official parameter (slices) that are provably inert and therefore not converted, with the reason."""
        reason = (
            f"input row of the conditioning scalar, which the official `{self.dataset}` pipeline fixes at 0"
        )
        return {
            entry.official_path + "[-1, :]": reason
            for _, _, mapping in self._components()
            for entry in mapping.values()
            if entry.kind == TIME_DENSE0
        }

    def inert_parameter_count(self) -> int:
        """How many official parameters `inert_parameters` covers."""
        tree = self.expected_tree()
        return sum(tree[path.removesuffix("[-1, :]")][1] for path in self.inert_parameters())

    def _components(self) -> list[tuple[type, dict[str, Any], dict[str, ParameterMapping]]]:
        components = [(VDMUNetModel, self.unet_config, self.unet_map)]
        if self.encoder_config is not None:
            components.append((DiffEncEncoderModel, self.encoder_config, self.encoder_map))
        return components


def official_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the official array that becomes one of our parameters of shape `shape`."""
    if kind == VECTOR:
        return tuple(shape)
    if kind in (CONV, CONV_TRANSPOSE):
        first, second, height, width = shape
        # Conv2d (out, in, kh, kw) and ConvTranspose2d (in, out, kh, kw) both come from (kh, kw, in, out).
        return (height, width, second, first) if kind == CONV else (height, width, first, second)
    if kind == DENSE:
        return (shape[1], shape[0])
    if kind == DENSE_TO_CONV1X1:
        return (shape[1], shape[0])
    if kind == TIME_DENSE0:
        return (shape[1] + 1, shape[0])
    raise ValueError(f"unknown parameter kind {kind!r}")


def to_torch_layout(kind: str, array: np.ndarray) -> np.ndarray:
    """The official array rearranged into our layout (see the module docstring)."""
    if kind == VECTOR:
        return array
    if kind == CONV:
        return array.transpose(3, 2, 0, 1)
    if kind == CONV_TRANSPOSE:
        return array[::-1, ::-1].transpose(2, 3, 0, 1)
    if kind == DENSE:
        return array.T
    if kind == DENSE_TO_CONV1X1:
        return array.T[:, :, None, None]
    if kind == TIME_DENSE0:
        return array[:-1].T
    raise ValueError(f"unknown parameter kind {kind!r}")


def _state_shapes(model_class: type, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of our model with this config, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = model_class(**config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


_LEAF_NAMES = {("norm", "weight"): "scale", ("norm", "bias"): "bias", ("", "weight"): "kernel", ("", "bias"): "bias"}
_RESNET_PARTS = {
    "norm1": ("GroupNorm_0", VECTOR),
    "norm2": ("GroupNorm_1", VECTOR),
    "conv1": ("conv1", CONV),
    "conv2": ("conv2", CONV),
    "cond_proj": ("cond_proj", DENSE),
    "conv_shortcut": ("nin_shortcut", DENSE_TO_CONV1X1),
}
_ATTENTION_PARTS = {
    "norm": ("GroupNorm_0", VECTOR),
    "to_q": ("q", DENSE),
    "to_k": ("k", DENSE),
    "to_v": ("v", DENSE),
    "proj_out": ("proj_out", DENSE),
}
_TOP_PARTS = {
    "conv_in": ("conv_in", CONV),
    "conv_out": ("conv_out", CONV),
    "norm_out": ("GroupNorm_0", VECTOR),
}


def _leaf(module_kind: str, official_module: str, kind: str, leaf: str) -> ParameterMapping:
    """The mapping of a `weight`/`bias` leaf of a GroupNorm, convolution or linear layer."""
    is_norm = module_kind == "norm"
    name = _LEAF_NAMES[("norm" if is_norm else "", leaf)]
    if leaf == "bias" or is_norm:
        kind = VECTOR
    return ParameterMapping(f"{official_module}/{name}", kind)


def _block_leaf(parts: dict[str, tuple[str, str]], block_path: str, rest: list[str]) -> ParameterMapping:
    part, leaf = rest
    official_part, kind = parts[part]
    return _leaf("norm" if official_part.startswith("GroupNorm") else "", f"{block_path}/{official_part}", kind, leaf)


def unet_parameter_map(
    config: dict[str, Any], embedding_prefix: str, blocks_prefix: str, top_prefix: str
) -> dict[str, ParameterMapping]:
    """Our `VDMUNetModel` state-dict keys -> official paths, for the official `ScoreUNet`.

    DiffEnc nests the time embedding in `TimeEmbedding_0/` and the blocks in `VDMUNet_0/` under `score_model/`;
    google-research/vdm has both directly under `score_model/`.
    """
    mapping = {}
    for key in _state_shapes(VDMUNetModel, config):
        parts = key.split(".")
        if parts[0] == "time_embedding":
            layer = {"linear_1": "dense0", "linear_2": "dense1"}[parts[1]]
            kind = TIME_DENSE0 if layer == "dense0" and parts[2] == "weight" else DENSE
            mapping[key] = _leaf("", f"{embedding_prefix}{layer}", kind, parts[2])
        elif parts[0] in _TOP_PARTS:
            official, kind = _TOP_PARTS[parts[0]]
            mapping[key] = _leaf("norm" if parts[0] == "norm_out" else "", f"{top_prefix}{official}", kind, parts[1])
        elif parts[0] in ("down_blocks", "up_blocks"):
            block = f"{blocks_prefix}{parts[0].split('_')[0]}.block_{parts[1]}"
            mapping[key] = _block_leaf(_RESNET_PARTS, block, parts[2:])
        elif parts[0] in ("down_attentions", "up_attentions"):
            block = f"{blocks_prefix}{parts[0].split('_')[0]}.attn_{parts[1]}"
            mapping[key] = _block_leaf(_ATTENTION_PARTS, block, parts[2:])
        elif parts[0] in ("mid_block_1", "mid_block_2"):
            mapping[key] = _block_leaf(_RESNET_PARTS, f"{blocks_prefix}mid.block_{parts[0][-1]}", parts[1:])
        elif parts[0] == "mid_attention":
            mapping[key] = _block_leaf(_ATTENTION_PARTS, f"{blocks_prefix}mid.attn_1", parts[1:])
        else:
            raise AssertionError(f"unmapped VDMUNetModel parameter {key}")
    return mapping


def encoder_parameter_map(config: dict[str, Any], indexed_resnets: bool) -> dict[str, ParameterMapping]:
    """Our `DiffEncEncoderModel` state-dict keys -> official paths under `encdec/inner_encoder/`.

    `indexed_resnets`: the `unet_mult_res` encoder names its ResNet blocks `..._resnet_block{j}`; the `unet`
    encoder has one per level, named `..._resnet_block`.
    """
    prefix = "encdec/inner_encoder/"
    levels = len(config["block_out_channels"])
    mapping = {}

    def resnet_name(side: str, level: int, index: str) -> str:
        return f"{side}_{level}_resnet_block{index if indexed_resnets else ''}"

    for key in _state_shapes(DiffEncEncoderModel, config):
        parts = key.split(".")
        if parts[0] == "time_embedding":
            layer = {"linear_1": "dense0", "linear_2": "dense1"}[parts[1]]
            kind = TIME_DENSE0 if layer == "dense0" and parts[2] == "weight" else DENSE
            mapping[key] = _leaf("", f"{prefix}time_embedding/{layer}", kind, parts[2])
        elif parts[0] in _TOP_PARTS:
            official, kind = _TOP_PARTS[parts[0]]
            mapping[key] = _leaf("norm" if parts[0] == "norm_out" else "", f"{prefix}{official}", kind, parts[1])
        elif parts[0] == "down_blocks":
            level = int(parts[1])
            block = f"{prefix}enc_model/down_blocks_{level}/{resnet_name('down', level, parts[3])}"
            mapping[key] = _block_leaf(_RESNET_PARTS, block, parts[4:])
        elif parts[0] == "up_blocks":
            position = int(parts[1])
            level = levels - 1 - position
            folder = f"{prefix}enc_model/up_blocks_{position}"
            if parts[2] == "upsample":
                mapping[key] = _leaf("", f"{folder}/conv_trans", CONV_TRANSPOSE, parts[3])
            else:
                block = f"{folder}/{resnet_name('up', level, parts[3])}"
                mapping[key] = _block_leaf(_RESNET_PARTS, block, parts[4:])
        elif parts[0] in ("mid_block_1", "mid_block_2"):
            mapping[key] = _block_leaf(_RESNET_PARTS, f"{prefix}enc_model/mid_resnet_{parts[0][-1]}", parts[1:])
        elif parts[0] == "mid_attention":
            mapping[key] = _block_leaf(_ATTENTION_PARTS, f"{prefix}enc_model/mid_attn_1", parts[1:])
        else:
            raise AssertionError(f"unmapped DiffEncEncoderModel parameter {key}")
    return mapping


def _require(config: dict[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise ValueError(f"The official config {where} has no {key!r}; keys present: {sorted(config)}.")
    return config[key]


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise ValueError(message + " This converter reproduces the released configurations only.")


def _score_unet_config(nn_config: dict[str, Any], gamma_min: float, gamma_max: float, image_shape) -> dict:
    where = "score_model_config"
    m_type = _require(nn_config, "m_type", where)
    _refuse(m_type != "unet", f"score_model_config.m_type is {m_type!r}; only 'unet' (ScoreUNet) is supported.")
    groups = _require(nn_config, "num_groups_groupnorm", where)
    _refuse(
        groups != OFFICIAL_GROUPS,
        f"score_model_config.num_groups_groupnorm is {groups}; the official ScoreUNet's blocks always use "
        f"{OFFICIAL_GROUPS} groups and only its output GroupNorm uses this value, which VDMUNetModel supports "
        f"only when both are {OFFICIAL_GROUPS}.",
    )
    channels, height, _ = image_shape
    return {
        "sample_size": height,
        "in_channels": channels,
        "hidden_channels": int(_require(nn_config, "n_embd", where)),
        "num_layers": int(_require(nn_config, "n_layer", where)),
        "dropout": float(_require(nn_config, "p_dropout", where)),
        "attention_in_blocks": bool(_require(nn_config, "with_attention", where)),
        "use_fourier_features": bool(_require(nn_config, "with_fourier_features", where)),
        "fourier_features_start": 6,
        "fourier_features_stop": 8,
        "fourier_features_step": 1,
        "norm_num_groups": OFFICIAL_GROUPS,
        "gamma_min": float(gamma_min),
        "gamma_max": float(gamma_max),
    }


def encoder_levels(m_type: str, n_layer: int, height: int) -> tuple[int, int]:
    """(resolution levels, ResNet blocks per level) of the official encoder U-Net for images of this height.

    `unet`: `n_layer` levels of one block. `unet_mult_res`: levels are added while the pooled height stays an
    even number above 8 (the level that reaches an odd height or at most 8 is the last); the `n_layer` blocks
    are then shared out evenly (rounded down) over the levels, or one per level when every level was built.
    """
    if m_type == "unet":
        return n_layer, 1
    levels = n_layer
    for index in range(n_layer):
        pooled = height / 2 ** (index + 1)
        if pooled % 2 == 1 or pooled <= 8:
            levels = index + 1
            break
    return levels, (n_layer // levels if levels != n_layer else 1)


def _diffenc_encoder_config(encoder_config: dict[str, Any], gamma_min, gamma_max, image_shape) -> dict:
    where = "encoder_config"
    defaults = {"k": 1.0, "init_var": 0.0, "min_var": 0.0, "use_x_var": False, "gamma_reg": False,
                "end_reg": False, "end_half_reg": False, "id_at_zero": False}
    for key, default in defaults.items():
        value = encoder_config.get(key, default)
        _refuse(value != default, f"encoder_config.{key} is {value!r}; only {default!r} is supported.")
    _refuse(
        not encoder_config.get("m1_to_1", False),
        "encoder_config.m1_to_1 is false (no tanh on the encoder output); DiffEncEncoderModel always applies tanh.",
    )
    nn_config = _require(encoder_config, "nn_config", where)
    m_type = _require(nn_config, "m_type", "encoder_config.nn_config")
    _refuse(m_type not in ("unet", "unet_mult_res"), f"encoder nn_config.m_type is {m_type!r}; 'unet' and "
            "'unet_mult_res' are supported.")
    _refuse(not nn_config["pooling"] or nn_config["down_conv"], "encoder nn_config must pool (pooling=true, "
            f"down_conv=false); got pooling={nn_config['pooling']}, down_conv={nn_config['down_conv']}.")
    channels, height, _ = image_shape
    levels, per_level = encoder_levels(m_type, int(nn_config["n_layer"]), height)
    width = int(nn_config["n_embd"])
    scaling = nn_config["channel_scaling"]
    _refuse(scaling not in ("double", "same"), f"encoder nn_config.channel_scaling is {scaling!r}.")
    groups = int(nn_config["num_groups_groupnorm"])
    return {
        "sample_size": height,
        "in_channels": channels,
        "block_out_channels": [width * 2**level if scaling == "double" else width for level in range(levels)],
        "layers_per_block": per_level,
        "dropout": float(nn_config["p_dropout"]),
        "norm_num_groups": OFFICIAL_GROUPS,
        "gamma_min": float(gamma_min),
        "gamma_max": float(gamma_max),
        "norm_out_num_groups": groups,
        "mid_block_norm_num_groups": groups if m_type == "unet" else OFFICIAL_GROUPS,
    }


def diffenc_model(model_config: dict[str, Any], train_config: dict[str, Any]) -> OfficialModel:
    """The `OfficialModel` of a bemigini/DiffEnc model config (config_model_*.json) and training config
    (config_train_*.json, for the dataset)."""
    ddpm_type = _require(model_config, "ddpm_type", "(model)")
    if ddpm_type not in DIFFENC_MODEL_TYPES:
        raise ValueError(f"ddpm_type {ddpm_type!r} is not supported; supported: {sorted(DIFFENC_MODEL_TYPES)}.")
    dataset = _require(train_config, "dataset_name", "(training)")
    if dataset not in DIFFENC_DATASETS:
        raise ValueError(
            f"dataset_name {dataset!r} is not supported: its conditioning input is not fixed at 0 (or its image "
            f"shape is unknown), so the official time embedding's conditioning row would not be inert. "
            f"Supported: {sorted(DIFFENC_DATASETS)}."
        )
    image_shape = DIFFENC_DATASETS[dataset]
    gamma_type = _require(model_config, "gamma_type", "(model)")
    _refuse(gamma_type not in ("fixed", "train_scalar"), f"gamma_type is {gamma_type!r}; 'fixed' and "
            "'train_scalar' are supported.")
    _refuse(model_config.get("sample_softmax", False), "sample_softmax is true; our sampler decodes the mode.")
    _refuse(model_config.get("vocab_size", 256) != 256, f"vocab_size is {model_config.get('vocab_size')}.")
    gamma_min, gamma_max = float(model_config["gamma_min"]), float(model_config["gamma_max"])
    prediction_type, encoder_type = DIFFENC_MODEL_TYPES[ddpm_type]
    unet_config = _score_unet_config(model_config["score_model_config"], gamma_min, gamma_max, image_shape)
    encoder_config = None
    encoder_map: dict[str, ParameterMapping] = {}
    if forward_process(encoder_type).needs_encoder:
        official_encoder = model_config["encoder_config"]
        _refuse("trainable" not in official_encoder.get("enc_type", ""), "S3VA needs a trainable enc_type.")
        encoder_config = _diffenc_encoder_config(official_encoder, gamma_min, gamma_max, image_shape)
        indexed = official_encoder["nn_config"]["m_type"] == "unet_mult_res"
        encoder_map = encoder_parameter_map(encoder_config, indexed_resnets=indexed)
    return OfficialModel(
        source="diffenc",
        model_type=ddpm_type,
        dataset=dataset,
        image_shape=image_shape,
        unet_config=unet_config,
        encoder_config=encoder_config,
        scheduler_config={
            "gamma_min": gamma_min,
            "gamma_max": gamma_max,
            "schedule": "learned_linear" if gamma_type == "train_scalar" else "fixed_linear",
            "prediction_type": prediction_type,
            "encoder_type": encoder_type,
        },
        learned_schedule=gamma_type == "train_scalar",
        official_config={"model": model_config, "train": train_config},
        unet_map=unet_parameter_map(unet_config, "score_model/TimeEmbedding_0/", "score_model/VDMUNet_0/",
                                    "score_model/"),
        encoder_map=encoder_map,
    )


def vdm_model(config: dict[str, Any]) -> OfficialModel:
    """The `OfficialModel` of a google-research/vdm config: ``get_config().to_dict()`` of configs/*.py (at least
    its `data.dataset` and `model` entries), e.g. :data:`VDM_CIFAR10_CONFIG`."""
    model = _require(config, "model", "(VDM)")
    dataset = _require(_require(config, "data", "(VDM)"), "dataset", "data")
    if dataset not in VDM_DATASETS:
        raise ValueError(
            f"data.dataset {dataset!r} is not supported: only {sorted(VDM_DATASETS)} feeds conditioning = 0 "
            "(cifar10_aug feeds an augmentation flag, so the conditioning row of the time embedding is used)."
        )
    image_shape = VDM_DATASETS[dataset]
    gamma_type = _require(model, "gamma_type", "model")
    _refuse(gamma_type not in ("fixed", "learnable_scalar"), f"model.gamma_type is {gamma_type!r}; 'fixed' and "
            "'learnable_scalar' are supported.")
    _refuse(model.get("sample_softmax", False), "model.sample_softmax is true; our sampler decodes the mode.")
    _refuse(model.get("sm_n_timesteps", 0) != 0, "model.sm_n_timesteps is not 0 (discrete-time training).")
    gamma_min, gamma_max = float(model["gamma_min"]), float(model["gamma_max"])
    nn_config = {
        "m_type": "unet",
        "num_groups_groupnorm": OFFICIAL_GROUPS,
        "n_embd": model["sm_n_embd"],
        "n_layer": model["sm_n_layer"],
        "p_dropout": model["sm_pdrop"],
        "with_attention": model["with_attention"],
        "with_fourier_features": model["with_fourier_features"],
    }
    unet_config = _score_unet_config(nn_config, gamma_min, gamma_max, image_shape)
    return OfficialModel(
        source="vdm",
        model_type="VDM",
        dataset=dataset,
        image_shape=image_shape,
        unet_config=unet_config,
        encoder_config=None,
        scheduler_config={
            "gamma_min": gamma_min,
            "gamma_max": gamma_max,
            "schedule": "learned_linear" if gamma_type == "learnable_scalar" else "fixed_linear",
            "prediction_type": "epsilon",
            "encoder_type": "none",
        },
        learned_schedule=gamma_type == "learnable_scalar",
        official_config=config,
        unet_map=unet_parameter_map(unet_config, "score_model/", "score_model/", "score_model/"),
    )


def _read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} at {str(path)!r}.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"The {what} {str(path)!r} is not valid JSON ({error}).") from error
    if not isinstance(value, dict):
        raise ValueError(f"The {what} {str(path)!r} holds a {type(value).__name__}, not a JSON object.")
    return value


def load_official_model(config: str | os.PathLike, train_config: str | os.PathLike | None = None) -> OfficialModel:
    """The `OfficialModel` of an official config: a DiffEnc config_model_*.json (with its config_train_*.json
    as `train_config`), a JSON of a google-research/vdm config, or a built-in name (`"vdm-cifar10"`)."""
    builtin = BUILTIN_CONFIGS.get(str(config))
    parsed = builtin if builtin is not None else _read_json(config, "official config")
    if "ddpm_type" in parsed:
        if train_config is None:
            raise ValueError(
                "A DiffEnc model config needs its training config (config_train_*.json, `train_config` / "
                "--train-config): its dataset_name gives the image shape and shows that conditioning is 0."
            )
        return diffenc_model(parsed, _read_json(train_config, "official training config"))
    if "model" in parsed and "sm_n_embd" in parsed.get("model", {}):
        if train_config is not None:
            raise ValueError("A google-research/vdm config holds its dataset; do not pass `train_config`.")
        return vdm_model(parsed)
    raise ValueError(
        f"{str(config)!r} is neither a DiffEnc model config (with 'ddpm_type') nor a google-research/vdm config "
        f"(with model.sm_n_embd), nor one of {sorted(BUILTIN_CONFIGS)}; its keys: {sorted(parsed)}."
    )


def count_parameters(tree: dict[str, tuple[int, ...]]) -> int:
    """Total number of values in a {path: shape} tree."""
    return sum(math.prod(shape) for shape in tree.values())
