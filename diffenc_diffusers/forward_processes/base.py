"""ForwardProcess: the base class of a forward process q(z_t | x) = N(alpha_t x_phi(x, t), sigma_t^2 I).

One subclass per kind of encoding x_phi (DESIGN.md section 2, "Encoder"), one file each in this package, registered
under its scheduler-config name `encoder_type` in :mod:`diffenc_diffusers.forward_processes`. A subclass owns
everything that differs between the kinds:

- whether it needs an encoder network (:attr:`ForwardProcess.needs_encoder`);
- the encoding x_phi(x, t) and its derivative d x_phi / d gamma (:meth:`ForwardProcess.encode`);
- the generative model's drift of the estimate x_hat in gamma (:meth:`ForwardProcess.x_hat_drift`), from which
  follow the x_hat correction of the reverse step and of the discrete-time ELBO (:meth:`ForwardProcess.x_hat_shift`)
  and the data prediction of the probability-flow ODE (:meth:`ForwardProcess.data_prediction`);
- its description for model cards (:attr:`ForwardProcess.description`).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ..noise_schedule import expand_to


class Encoding(NamedTuple):
    """The forward process' data term at gamma: x_phi(x, t), optionally d x_phi / d gamma, and y_phi."""

    x_phi: torch.Tensor
    dx_phi_dgamma: torch.Tensor | None
    y: torch.Tensor | None


class ForwardProcess:
    r"""
    One parameterisation of the forward process. Stateless: the encoder network (if any) is passed to
    :meth:`encode`, so one instance serves every model of its kind.

    Attributes:
        encoder_type (`str`): the name in the scheduler config (`encoder_type`) and the registry.
        needs_encoder (`bool`): whether :meth:`encode` needs an encoder network y_phi (a pipeline's optional
            `encoder` component; required for the likelihood, never for sampling).
        has_encoding (`bool`): whether x_phi(x, t) differs from x (False for VDM: no encoding to show).
        description (`str`): one line for model cards ("a Variational Diffusion Model ...").
    """

    encoder_type: ClassVar[str]
    needs_encoder: ClassVar[bool] = False
    has_encoding: ClassVar[bool] = True
    description: ClassVar[str]

    def encode(
        self,
        x: torch.Tensor,
        gamma: torch.Tensor,
        with_derivative: bool = False,
        encoder: nn.Module | None = None,
        **encoder_kwargs: torch.Tensor,
    ) -> Encoding:
        """x_phi(x, t) at gamma = gamma_t, and with ``with_derivative`` also d x_phi / d gamma.

        Args:
            x: data as grid values in (-1, 1), shape (B, C, H, W).
            gamma: shape (B,), float64 (float32 on MPS).
            with_derivative: also return d x_phi / d gamma (``None`` where it is 0).
            encoder: the encoder network y_phi(x, gamma) of a kind with :attr:`needs_encoder`.
            encoder_kwargs: passed to the encoder (``class_labels`` of a class-conditional one).

        Returns:
            The :class:`Encoding`, each tensor of the shape and dtype of ``x``.
        """
        raise NotImplementedError

    def x_hat_drift(self, gamma_t: torch.Tensor) -> torch.Tensor | None:
        r"""r(gamma_t) with d x_hat / d gamma = -r x_hat: how the generative model moves its estimate x_hat of
        x_phi(x, t) between times without calling any encoder. ``None`` where x_hat does not move (VDM).

        Shape and dtype of ``gamma_t``. DiffEnc: r = sigma_t^2, exact for x_phi = alpha_t^2 x (whose
        d x_phi / d gamma = -sigma^2 x_phi) and used by the generative model of the trainable kind as well.
        """
        return None

    def x_hat_shift(self, gamma_t: torch.Tensor, delta: torch.Tensor) -> torch.Tensor | None:
        r"""kappa = delta r(gamma_t) with x_hat_s = x_hat_t (1 - kappa), delta = gamma_s - gamma_t: the x_hat
        correction of one reverse step from t to s (DESIGN.md, "Ancestral sampler" and "Discrete-time diffusion
        loss"). ``None`` where x_hat_s = x_hat_t (VDM). Shape and dtype of ``delta``."""
        drift = self.x_hat_drift(gamma_t)
        return None if drift is None else delta * drift

    def data_prediction(self, x_hat: torch.Tensor, gamma_t: torch.Tensor) -> torch.Tensor:
        r"""x_tilde, the data prediction of the probability-flow ODE in lambda = -gamma / 2:

            dz / dlambda = -alpha^2 z + alpha x_tilde,   x_tilde = (1 + 2 r(gamma_t)) x_hat

        (DESIGN.md, "Probability-flow ODE": x_tilde = x_hat for VDM, (1 + 2 sigma_t^2) x_hat for DiffEnc), so
        DPM-Solver++'s data-prediction updates apply with x_tilde in place of x_0.

        Args:
            x_hat: the estimate of x_phi(x, t), shape (B, ...).
            gamma_t: shape (B,) or ().

        Returns:
            x_tilde, the shape and dtype of ``x_hat``.
        """
        drift = self.x_hat_drift(gamma_t)
        if drift is None:
            return x_hat
        return (1.0 + 2.0 * expand_to(drift, x_hat).to(x_hat.dtype)) * x_hat

    def __repr__(self) -> str:
        return f"{type(self).__name__}(encoder_type={self.encoder_type!r})"
