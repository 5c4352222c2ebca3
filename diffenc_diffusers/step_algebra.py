"""The algebra of one reverse step on the log-SNR grid, as small pure functions (DESIGN.md section 2).

With gamma = -log SNR, a step from t to s < t has delta = gamma_s - gamma_t < 0 and c = -expm1(delta) in (0, 1]:
the posterior q(z_s | z_t, x) has variance sigma_s^2 c. These functions are shared by the samplers
(:class:`~diffenc_diffusers.scheduling_vdm.VDMScheduler`) and the discrete-time ELBO
(:meth:`~diffenc_diffusers.objective.DiffEncObjective.discrete_diffusion_nats`); the forward process' part (the x_hat
correction) is :meth:`~diffenc_diffusers.forward_processes.ForwardProcess.x_hat_shift`. Coefficients are tensors
broadcasting against the samples, or Python floats.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .noise_schedule import alpha_sigma

PREDICTION_TYPES = ("v_prediction", "epsilon")
"""What a denoiser predicts: v = alpha_t eps - sigma_t x_phi, or eps."""


def x_hat_from_output(
    prediction_type: str,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
) -> torch.Tensor:
    """x_hat, the estimate of x_phi(x, t), from the network output at z_t = ``sample``.

    v prediction: x_hat = alpha_t z_t - sigma_t v_hat; epsilon prediction: x_hat = (z_t - sigma_t eps_hat) / alpha_t.
    """
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    return (sample - sigma * model_output) / alpha


def x_hat_error_from_output(
    prediction_type: str,
    model_output: torch.Tensor,
    original_samples: torch.Tensor,
    noise: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
) -> torch.Tensor:
    """x_hat - x for the network output at z_t = alpha_t x + sigma_t eps, formed from the prediction error.

    v prediction: sigma_t (v - v_hat) with v = alpha_t eps - sigma_t x; epsilon prediction:
    (sigma_t / alpha_t)(eps - eps_hat). Mathematically equal to x_hat - x, but computed without subtracting two
    nearly equal values: at small t, x_hat - x in float32 moved the diffusion loss by ~1e-5 relative (measured
    against float64, docs/conversion.md).
    """
    if prediction_type == "v_prediction":
        return sigma * ((alpha * noise - sigma * original_samples) - model_output)
    return (sigma / alpha) * (noise - model_output)


def eps_from_x_hat(
    sample: torch.Tensor, x_hat: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float
) -> torch.Tensor:
    """eps_hat = (z_t - alpha_t x_hat) / sigma_t, the noise estimate that goes with x_hat at z_t = ``sample``."""
    return (sample - alpha * x_hat) / sigma


def posterior_variance_fraction(delta: torch.Tensor) -> torch.Tensor:
    """c = -expm1(delta) = 1 - SNR_t / SNR_s, in (0, 1] for delta = gamma_s - gamma_t < 0: the posterior
    q(z_s | z_t, x) has variance sigma_s^2 c."""
    return -torch.expm1(delta)


class StepCoefficients(NamedTuple):
    """The scalars of one reverse step from t to s < t (see :func:`step_coefficients`).

    Attributes:
        t: the step's start time t_i.
        alpha_t: alpha at t.
        sigma_t: sigma at t.
        x_hat_coefficient: alpha_s (1 - kappa), kappa the forward process' x_hat shift (alpha_s for VDM).
        sigma_s: sigma at s.
        c: -expm1(delta), with delta = gamma_s - gamma_t.
    """

    t: float
    alpha_t: float
    sigma_t: float
    x_hat_coefficient: float
    sigma_s: float
    c: float


def step_coefficients(
    time_grid: torch.Tensor, gamma_grid: torch.Tensor, x_hat_shift: torch.Tensor | None
) -> list[StepCoefficients]:
    """Every step's scalars of a decreasing grid t_0 > ... > t_N, computed at once in the grid's dtype and brought
    to the host once (a sampler then multiplies tensors by Python floats).

    Args:
        time_grid: the N + 1 times, float64 (float32 on MPS).
        gamma_grid: gamma at those times.
        x_hat_shift: kappa of each of the N steps (:meth:`ForwardProcess.x_hat_shift`), or None (VDM).
    """
    gamma_t, gamma_s = gamma_grid[:-1], gamma_grid[1:]
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    x_hat_scale = 1.0 if x_hat_shift is None else 1.0 - x_hat_shift
    c = posterior_variance_fraction(gamma_s - gamma_t)
    columns = torch.stack([time_grid[:-1], alpha_t, sigma_t, alpha_s * x_hat_scale, sigma_s, c])
    return [StepCoefficients(*row) for row in columns.T.tolist()]


def ddim_step(
    x_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    coefficients: StepCoefficients,
    eta: float,
    variance_weight: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    r"""z_s of the DDIM family on the log-SNR grid, with x_hat_s = x_hat (1 - kappa):

        z_s = alpha_s x_hat_s + sigma_s sqrt(1 - eta^2 c) eps_hat + eta sigma_s sqrt(w c) eps.

    eta = 1 is the ancestral sampler of the generative model (variance weight w); eta = 0 is deterministic
    (``noise`` may then be None).
    """
    eps_hat_coefficient = coefficients.sigma_s * math.sqrt(1.0 - eta**2 * coefficients.c)
    prev_sample = coefficients.x_hat_coefficient * x_hat + eps_hat_coefficient * eps_hat
    if eta > 0:
        noise_std = eta * coefficients.sigma_s * math.sqrt(variance_weight * coefficients.c)
        prev_sample = prev_sample + noise_std * noise
    return prev_sample
