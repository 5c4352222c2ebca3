"""MonotoneSchedule: the trainable weights of the learned monotone noise schedule (`schedule="learned_monotone"`).

The formula is :func:`diffenc_diffusers.scheduling_vdm.monotone_gamma` (the scheduler's, from its config, in float64);
this module holds its weights w2, b2, w3 as parameters while :class:`DiffEncObjective` trains them, and writes them
back into a scheduler config. The endpoints gamma_min and gamma_max are not part of it (the objective holds them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..scheduling_vdm import MONOTONE_KEYS, VDMScheduler, monotone_gamma


class MonotoneSchedule(nn.Module):
    r"""
    The interior of a learned monotone schedule: w2 (`l2_weight`), b2 (`l2_bias`) and w3 (`l3_weight`), each of
    shape (n,), float32 parameters.

    Args:
        l2_weight, l2_bias, l3_weight (`list[float]`): initial values, n each (a scheduler config's `monotone_*`).
    """

    def __init__(self, l2_weight: list[float], l2_bias: list[float], l3_weight: list[float]):
        super().__init__()
        self.l2_weight = nn.Parameter(torch.tensor(l2_weight, dtype=torch.float32))
        self.l2_bias = nn.Parameter(torch.tensor(l2_bias, dtype=torch.float32))
        self.l3_weight = nn.Parameter(torch.tensor(l3_weight, dtype=torch.float32))

    @classmethod
    def from_scheduler(cls, scheduler: VDMScheduler) -> MonotoneSchedule:
        """The module holding the scheduler's `monotone_*` values (its schedule must be `learned_monotone`)."""
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
        gamma, derivative = monotone_gamma(t, gamma_min, gamma_max, *params)
        return gamma, derivative, params
