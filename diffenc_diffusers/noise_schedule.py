"""The noise schedule gamma(t) = -log SNR(t) of VDM and DiffEnc: its one home (DESIGN.md section 2, "Notation").

Fixed linear, learned linear and the learned monotone network, their learned endpoints, and alpha_t / sigma_t.
The scheduler (:class:`~diffenc_diffusers.scheduling_vdm.VDMScheduler`, from its config, in float64) and the
objective (:class:`~diffenc_diffusers.objective.DiffEncObjective`, from its trainable parameters) both compute gamma
with :func:`gamma_and_derivative`; :class:`MonotoneSchedule` holds the monotone network's weights while they train.

The networks' configs (`VDMUNetModel`, `DiffEncEncoderModel`) also hold a `gamma_min` / `gamma_max`: that is the
range of their gamma EMBEDDING (the affine map of gamma to t = (gamma - gamma_min) / (gamma_max - gamma_min)
before the sinusoidal features), a fixed part of the trained network, not the schedule. A learned schedule moves
its ends away from it during training, and a converted checkpoint keeps VDM's embedding range with its own schedule,
so the two need not be equal; see :func:`check_embedding_range` for what is checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

SCHEDULES = ("fixed_linear", "learned_linear", "learned_monotone")
MONOTONE_KEYS = ("monotone_l2_weight", "monotone_l2_bias", "monotone_l3_weight")
DEFAULT_MONOTONE_FEATURES = 16


def schedule_dtype(device: torch.device | str | None) -> torch.dtype:
    """float64 for schedule math, except on devices without float64 (MPS), where float32 is used."""
    return torch.float32 if torch.device(device if device is not None else "cpu").type == "mps" else torch.float64


def linear_gamma(t: torch.Tensor, gamma_min: torch.Tensor | float, gamma_max: torch.Tensor | float) -> torch.Tensor:
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t, the fixed and the learned linear schedule."""
    return gamma_min + (gamma_max - gamma_min) * t


def monotone_gamma(
    t: torch.Tensor,
    gamma_min: torch.Tensor | float,
    gamma_max: torch.Tensor | float,
    l2_weight: torch.Tensor,
    l2_bias: torch.Tensor,
    l3_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(gamma(t), d gamma / dt) of the learned monotone schedule, whose ends are exactly gamma_min and gamma_max.

    A monotone network in the manner of VDM's NNet schedule, l(t) = t + sum_j |w3_j| sigmoid(|w2_j| t + b2_j)
    (positive weights; the first layer's affine map of t is absorbed by the normalisation below, which leaves
    only its scale relative to w3, fixed here at 1), is normalised to run from 0 to 1:

        u(t) = (l(t) - l(0)) / (l(1) - l(0)),   gamma(t) = gamma_min + (gamma_max - gamma_min) u(t),
        d gamma / dt = (gamma_max - gamma_min) l'(t) / (l(1) - l(0)),  l'(t) = 1 + sum_j |w3_j| |w2_j| s_j (1 - s_j).

    l' >= 1, so gamma is strictly increasing. The differences l(t) - l(0) and l(1) - l(t) are sums of per-feature
    differences of identical sigmoid evaluations at the ends, so gamma(0) = gamma_min and gamma(1) = gamma_max hold
    exactly, in any dtype (for t <= the midpoint gamma is computed from gamma_min, beyond it from gamma_max).
    Zero w3 gives the linear schedule.

    Args:
        t: times in [0, 1], any shape S.
        gamma_min, gamma_max: the ends, floats or tensors broadcasting against S.
        l2_weight, l2_bias, l3_weight: w2, b2, w3 of shape (n,), or S + (n,) for per-sample copies.

    Returns:
        gamma and its time derivative, each of shape S.
    """
    w2, w3 = l2_weight.abs(), l3_weight.abs()
    s_t = torch.sigmoid(w2 * t.unsqueeze(-1) + l2_bias)
    s_0, s_1 = torch.sigmoid(l2_bias), torch.sigmoid(w2 + l2_bias)
    rise = t + (w3 * (s_t - s_0)).sum(-1)  # l(t) - l(0)
    remaining = (1.0 - t) + (w3 * (s_1 - s_t)).sum(-1)  # l(1) - l(t)
    total = 1.0 + (w3 * (s_1 - s_0)).sum(-1)  # l(1) - l(0)
    slope = 1.0 + (w3 * w2 * s_t * (1.0 - s_t)).sum(-1)  # l'(t)
    span = gamma_max - gamma_min
    gamma = torch.where(rise <= remaining, gamma_min + span * (rise / total), gamma_max - span * (remaining / total))
    return gamma, span * slope / total


def default_monotone_parameters(num_features: int) -> dict[str, list[float]]:
    """The initial w2, b2, w3 of the monotone schedule: n sigmoid steps of slope 10 centred at (j + 1/2) / n,
    weighted 1 / n (a near-linear start). Values are rounded to float32, the dtype of the trainable copies, so
    that a fresh scheduler and the objective built from it give the same gamma."""
    centres = (torch.arange(num_features, dtype=torch.float64) + 0.5) / num_features
    weight = torch.full((num_features,), 10.0, dtype=torch.float64)
    values = (weight, -weight * centres, torch.full((num_features,), 1.0 / num_features, dtype=torch.float64))
    return {key: value.to(torch.float32).tolist() for key, value in zip(MONOTONE_KEYS, values, strict=True)}


def alpha_sigma_squared(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t^2, sigma_t^2) = (sigmoid(-gamma), sigmoid(gamma)): the variance-preserving pair for gamma."""
    return torch.sigmoid(-gamma), torch.sigmoid(gamma)


def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(sigmoid(-gamma)), sqrt(sigmoid(gamma)))."""
    alpha_sq, sigma_sq = alpha_sigma_squared(gamma)
    return alpha_sq.sqrt(), sigma_sq.sqrt()


def expand_to(coefficient: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient of shape (B,) or () to broadcast against ``reference`` (B, ...)."""
    if coefficient.ndim == 0:
        return coefficient
    return coefficient.reshape(coefficient.shape + (1,) * (reference.ndim - coefficient.ndim))


def check_monotone_config(
    learn_endpoints: bool | None, num_features: int | None, parameters: dict[str, list[float] | None]
) -> dict:
    """The complete config of a learned monotone schedule: the given values, checked, with defaults filled in.

    ``learn_endpoints`` defaults to True; the three parameter lists are all given (equal lengths, finite numbers)
    or all None, then :func:`default_monotone_parameters` of ``num_features`` (default 16) features.
    """
    if learn_endpoints is None:
        learn_endpoints = True
    if not isinstance(learn_endpoints, bool):
        raise TypeError(f"`learn_endpoints` must be a bool or None, got {learn_endpoints!r}.")
    if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)):
        raise TypeError(f"`monotone_num_features` must be a positive int or None, got {num_features!r}.")
    if num_features is not None and num_features < 1:
        raise ValueError(f"`monotone_num_features` must be a positive int or None, got {num_features}.")
    missing = [name for name, value in parameters.items() if value is None]
    if len(missing) == len(parameters):
        num_features = num_features or DEFAULT_MONOTONE_FEATURES
        parameters = default_monotone_parameters(num_features)
    elif missing:
        raise ValueError(
            f"{', '.join(f'`{name}`' for name in missing)} missing: the monotone schedule's parameters "
            f"{list(MONOTONE_KEYS)} are given all together, or none of them (a fresh initialisation)."
        )
    else:
        for name, value in parameters.items():
            if (
                not isinstance(value, (list, tuple))
                or not value
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            ):
                raise TypeError(f"`{name}` must be a non-empty list of finite floats, got {value!r}.")
        lengths = {name: len(value) for name, value in parameters.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"The monotone schedule's parameter lists must have one length, got {lengths}.")
        length = len(parameters["monotone_l2_weight"])
        if num_features is not None and num_features != length:
            raise ValueError(
                f"`monotone_num_features` is {num_features} but the parameter lists have {length} entries."
            )
        num_features = length
        parameters = {name: [float(v) for v in value] for name, value in parameters.items()}
    return {"learn_endpoints": learn_endpoints, "monotone_num_features": num_features, **parameters}


def gamma_and_derivative(
    t: torch.Tensor,
    gamma_min: torch.Tensor | float,
    gamma_max: torch.Tensor | float,
    monotone: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma(t), d gamma / dt) of a linear schedule (``monotone`` None) or of the monotone network with weights
    ``monotone`` = (w2, b2, w3) (:func:`monotone_gamma`), computed in the dtype of ``t``, shape of ``t``.

    The ends are floats (a scheduler's config) or tensors (the objective's trainable endpoints, differentiable).
    """
    if monotone is not None:
        return monotone_gamma(t, gamma_min, gamma_max, *monotone)
    span = gamma_max - gamma_min
    derivative = span.expand(t.shape) if isinstance(span, torch.Tensor) else torch.full_like(t, span)
    return linear_gamma(t, gamma_min, gamma_max), derivative


def learns_endpoints(config: Mapping[str, Any]) -> bool:
    """Whether training learns gamma_min and gamma_max of a scheduler config: `learned_linear`, and
    `learned_monotone` with `learn_endpoints` (its default)."""
    schedule = config["schedule"]
    return schedule == "learned_linear" or (schedule == "learned_monotone" and bool(config.get("learn_endpoints")))


def endpoint_parameters(config: Mapping[str, Any]) -> tuple[nn.Parameter, nn.Parameter] | tuple[None, None]:
    """The trainable endpoints (gamma_min, gamma_max) of a scheduler config that learns them (float32 scalars
    initialised from the config), else (None, None)."""
    if not learns_endpoints(config):
        return None, None
    return (
        nn.Parameter(torch.tensor(float(config["gamma_min"]))),
        nn.Parameter(torch.tensor(float(config["gamma_max"]))),
    )


class MonotoneSchedule(nn.Module):
    r"""
    The interior of a learned monotone schedule: w2 (`l2_weight`), b2 (`l2_bias`) and w3 (`l3_weight`) of
    :func:`monotone_gamma`, each of shape (n,), float32 parameters, while :class:`DiffEncObjective` trains them.
    The endpoints gamma_min and gamma_max are not part of it (see :func:`endpoint_parameters`).

    Args:
        l2_weight, l2_bias, l3_weight (`list[float]`): initial values, n each (a scheduler config's `monotone_*`).
    """

    def __init__(self, l2_weight: list[float], l2_bias: list[float], l3_weight: list[float]):
        super().__init__()
        self.l2_weight = nn.Parameter(torch.tensor(l2_weight, dtype=torch.float32))
        self.l2_bias = nn.Parameter(torch.tensor(l2_bias, dtype=torch.float32))
        self.l3_weight = nn.Parameter(torch.tensor(l3_weight, dtype=torch.float32))

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> MonotoneSchedule:
        """The module holding a scheduler's `monotone_*` values (its schedule must be `learned_monotone`)."""
        if scheduler.config.schedule != "learned_monotone":
            raise ValueError(
                "MonotoneSchedule needs a scheduler with schedule='learned_monotone', "
                f"got {scheduler.config.schedule!r}."
            )
        return cls(*(scheduler.config[key] for key in MONOTONE_KEYS))

    def config_values(self) -> dict[str, list[float]]:
        """The current weights as scheduler config entries (`monotone_l2_weight`, ...), lists of floats."""
        params = (self.l2_weight, self.l2_bias, self.l3_weight)
        return {key: param.detach().cpu().tolist() for key, param in zip(MONOTONE_KEYS, params, strict=True)}

    def forward(
        self,
        t: torch.Tensor,
        gamma_min: torch.Tensor | float,
        gamma_max: torch.Tensor | float,
        per_sample: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """(gamma(t), d gamma / dt, the weights used), computed in the dtype of ``t`` (float64 in the objective).

        With ``per_sample=True`` (``t`` of shape (B,)), the weights are expanded to one copy per sample, (B, n),
        so that a gradient hook on them sees each sample's contribution separately (the variance gradient of
        :class:`DiffEncObjective`). The values are the same either way.
        """
        params = tuple(p.to(t.dtype) for p in (self.l2_weight, self.l2_bias, self.l3_weight))
        if per_sample:
            params = tuple(p.expand(*t.shape, p.shape[0]) for p in params)
        gamma, derivative = gamma_and_derivative(t, gamma_min, gamma_max, params)
        return gamma, derivative, params
