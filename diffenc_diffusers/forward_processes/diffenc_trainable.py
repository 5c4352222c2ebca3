"""The trainable DiffEnc forward process (`encoder_type="trainable"`): x_phi = alpha_t^2 x + sigma_t^2 y_phi(x, t)."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad

from ..noise_schedule import alpha_sigma_squared, expand_to
from .base import Encoding
from .diffenc_nontrainable import NonTrainableDiffEncForwardProcess


class TrainableDiffEncForwardProcess(NonTrainableDiffEncForwardProcess):
    r"""
    x_phi(x, t) = alpha_t^2 x + sigma_t^2 y, y = y_phi(x, gamma_t) the encoder network, and

        d x_phi / d gamma = sigma^2 alpha^2 (y - x) + sigma^2 dy / dgamma.

    d y / d gamma comes with y from one evaluation of the encoder in forward-mode AD (`torch.autograd.forward_ad`,
    tangent 1 on gamma); gradients flow through both into the encoder's parameters. The generative model is the
    non-trainable kind's (its x_hat drift sigma_t^2): sampling never calls the encoder.
    """

    encoder_type = "trainable"
    needs_encoder = True
    description = "a DiffEnc model with a trainable encoder x_phi(x, t) = alpha_t^2 x + sigma_t^2 y_phi(x, t)"

    def encode(
        self,
        x: torch.Tensor,
        gamma: torch.Tensor,
        with_derivative: bool = False,
        encoder: nn.Module | None = None,
        **encoder_kwargs: torch.Tensor,
    ) -> Encoding:
        if encoder is None:
            raise ValueError("The trainable DiffEnc forward process needs its `encoder` network y_phi.")
        alpha_sq, sigma_sq = (expand_to(v, x).to(x.dtype) for v in alpha_sigma_squared(gamma))
        gamma_in = gamma.to(x.dtype)
        if with_derivative:
            with forward_ad.dual_level():
                dual_gamma = forward_ad.make_dual(gamma_in, torch.ones_like(gamma_in))
                y, dy = forward_ad.unpack_dual(encoder(x, dual_gamma, **encoder_kwargs).sample)
            y = y.to(x.dtype)
            # An encoder whose output does not depend on gamma has no tangent: dy / dgamma = 0.
            dy = torch.zeros_like(y) if dy is None else dy.to(x.dtype)
            derivative = sigma_sq * alpha_sq * (y - x) + sigma_sq * dy
        else:
            y = encoder(x, gamma_in, **encoder_kwargs).sample.to(x.dtype)
            derivative = None
        return Encoding(alpha_sq * x + sigma_sq * y, derivative, y)
