"""VDM's forward process (`encoder_type="none"`): no encoding, x_phi(x, t) = x."""

from __future__ import annotations

import torch
from torch import nn

from .base import Encoding, ForwardProcess


class VDMForwardProcess(ForwardProcess):
    r"""
    x_phi(x, t) = x, d x_phi / d gamma = 0; x_hat estimates x itself and does not move between times, so the
    reverse step has no correction and the ODE's data prediction is x_hat.
    """

    encoder_type = "none"
    needs_encoder = False
    has_encoding = False
    description = "a Variational Diffusion Model (VDM, Kingma et al. 2021; no encoder)"

    def encode(
        self,
        x: torch.Tensor,
        gamma: torch.Tensor,
        with_derivative: bool = False,
        encoder: nn.Module | None = None,
        **encoder_kwargs: torch.Tensor,
    ) -> Encoding:
        return Encoding(x, None, None)
