"""The non-trainable DiffEnc forward process (`encoder_type="nontrainable"`): x_phi(x, t) = alpha_t^2 x."""

from __future__ import annotations

import torch
from torch import nn

from ..noise_schedule import alpha_sigma_squared, expand_to
from .base import Encoding, ForwardProcess


class NonTrainableDiffEncForwardProcess(ForwardProcess):
    r"""
    x_phi(x, t) = alpha_t^2 x, d x_phi / d gamma = -sigma_t^2 alpha_t^2 x. The generative model moves x_hat with
    d x_hat / d gamma = -sigma_t^2 x_hat (exact for this encoding), which gives the reverse step's correction
    x_hat_s = x_hat_t (1 - delta sigma_t^2) and the ODE's data prediction (1 + 2 sigma_t^2) x_hat.
    """

    encoder_type = "nontrainable"
    needs_encoder = False
    description = "a DiffEnc model with the non-trainable encoder x_phi(x, t) = alpha_t^2 x"

    def encode(
        self,
        x: torch.Tensor,
        gamma: torch.Tensor,
        with_derivative: bool = False,
        encoder: nn.Module | None = None,
        **encoder_kwargs: torch.Tensor,
    ) -> Encoding:
        alpha_sq, sigma_sq = (expand_to(v, x).to(x.dtype) for v in alpha_sigma_squared(gamma))
        derivative = -sigma_sq * alpha_sq * x if with_derivative else None
        return Encoding(alpha_sq * x, derivative, None)

    def x_hat_drift(self, gamma_t: torch.Tensor) -> torch.Tensor:
        """sigma_t^2 = sigmoid(gamma_t)."""
        return torch.sigmoid(gamma_t)
