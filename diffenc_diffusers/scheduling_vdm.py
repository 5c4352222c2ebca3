"""VDMScheduler: the continuous-time variance-preserving noise schedule of VDM and DiffEnc, and its samplers.

This file is the single source of truth for gamma(t), alpha_t, sigma_t, the map from a network output to the
estimate x_hat, and the ancestral / deterministic reverse steps (DESIGN.md section 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .discretization import grid_to_index, index_to_grid

SCHEDULES = ("fixed_linear", "learned_linear", "learned_monotone")
MONOTONE_KEYS = ("monotone_l2_weight", "monotone_l2_bias", "monotone_l3_weight")
DEFAULT_MONOTONE_FEATURES = 16
PREDICTION_TYPES = ("v_prediction", "epsilon")
ENCODER_TYPES = ("none", "nontrainable", "trainable")


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


def _checked_monotone_config(
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


class _StepCoefficients(NamedTuple):
    """The scalars of one reverse step from t to s < t, computed in float64 by :meth:`VDMScheduler.set_timesteps`.

    Attributes:
        t: the step's start time t_i.
        alpha_t: alpha at t.
        sigma_t: sigma at t.
        x_hat_coefficient: alpha_s (1 - delta sigma_t^2) for DiffEnc, alpha_s for VDM (multiplies x_hat).
        sigma_s: sigma at s.
        c: -expm1(delta), with delta = gamma_s - gamma_t.
    """

    t: float
    alpha_t: float
    sigma_t: float
    x_hat_coefficient: float
    sigma_s: float
    c: float


@dataclass
class VDMSchedulerOutput(BaseOutput):
    """Output of :meth:`VDMScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            z_s, the latent at the next (smaller) time. After the last step it is the decoded image: the grid
            values f_k = 2 (k + 0.5) / 256 - 1 of the decoder's most likely 8-bit value at z_0 / alpha_0.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            x_hat, the network's estimate of the encoded data x_phi(x, t) (of x itself for VDM).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class VDMScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Continuous-time variance-preserving scheduler of VDM (Kingma et al., 2021) and DiffEnc (Nielsen et al., 2024).

    The schedule is gamma(t) = -log SNR(t) = gamma_min + (gamma_max - gamma_min) t for t in [0, 1] (or, for
    `schedule="learned_monotone"`, the monotone network of :func:`monotone_gamma` between the same exact ends), with
    alpha_t^2 = sigmoid(-gamma_t) and sigma_t^2 = sigmoid(gamma_t). Sampling runs the ancestral sampler of the
    generative model from t = 1 to t = 0 on an even time grid and decodes z_0 to 8-bit grid values. For
    DiffEnc, whose forward process runs on an encoding x_phi(x, t) of the data, the step includes the
    correction term that moves the estimate x_hat(t) to x_hat(s); the encoder itself is never needed to sample.

    Args:
        gamma_min (`float`, defaults to -13.3):
            gamma at t = 0 (log-SNR 13.3). For a learned schedule, the trained value.
        gamma_max (`float`, defaults to 5.0):
            gamma at t = 1. Must be larger than `gamma_min`.
        schedule (`str`, defaults to `"fixed_linear"`):
            `"fixed_linear"`, `"learned_linear"` (both endpoints were trained; the trained values are stored
            in `gamma_min` and `gamma_max`, so sampling with either kind is the same computation), or
            `"learned_monotone"` (gamma is the monotone network of :func:`monotone_gamma`, running from exactly
            `gamma_min` to exactly `gamma_max`; its weights are the `monotone_*` entries below).
        prediction_type (`str`, defaults to `"v_prediction"`):
            What the denoiser predicts: `"v_prediction"` (v = alpha_t eps - sigma_t x_phi) or `"epsilon"`.
        encoder_type (`str`, defaults to `"none"`):
            The forward process: `"none"` (VDM, x_phi = x), `"nontrainable"` (DiffEnc with x_phi = alpha_t^2 x)
            or `"trainable"` (DiffEnc with x_phi = alpha_t^2 x + sigma_t^2 y_phi(x, gamma_t)). Any DiffEnc
            kind applies the DiffEnc correction term in :meth:`step`.
        variance_weight (`float`, defaults to 1.0):
            w in DESIGN.md: the generative variance is w times the true posterior variance. 1 is the ELBO-optimal
            ancestral sampler; it must be positive.
        learn_endpoints (`bool`, *optional*):
            `learned_monotone` only: whether training learns `gamma_min` and `gamma_max` (`True`, the default, as
            `learned_linear`) or keeps them at their configured values (`False`).
        monotone_num_features (`int`, *optional*):
            `learned_monotone` only: n, the number of sigmoid features; default 16, or the parameter lists' length.
        monotone_l2_weight, monotone_l2_bias, monotone_l3_weight (`list[float]`, *optional*):
            `learned_monotone` only: w2, b2 and w3 of :func:`monotone_gamma`, n values each (all three or none;
            none gives :func:`default_monotone_parameters`). Training stores its learned values here
            (`DiffEncObjective.export_scheduler`). A constructed scheduler's config always holds all of them.
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        schedule: str = "fixed_linear",
        prediction_type: str = "v_prediction",
        encoder_type: str = "none",
        variance_weight: float = 1.0,
        learn_endpoints: bool | None = None,
        monotone_num_features: int | None = None,
        monotone_l2_weight: list[float] | None = None,
        monotone_l2_bias: list[float] | None = None,
        monotone_l3_weight: list[float] | None = None,
    ):
        for name, value in (("gamma_min", gamma_min), ("gamma_max", gamma_max), ("variance_weight", variance_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"`{name}` must be a finite float, got {value!r}.")
        if gamma_min >= gamma_max:
            raise ValueError(f"`gamma_min` must be smaller than `gamma_max`, got {gamma_min} >= {gamma_max}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"`encoder_type` must be one of {list(ENCODER_TYPES)}, got {encoder_type!r}.")
        if variance_weight <= 0:
            raise ValueError(f"`variance_weight` must be positive, got {variance_weight}.")
        monotone = {
            "monotone_l2_weight": monotone_l2_weight,
            "monotone_l2_bias": monotone_l2_bias,
            "monotone_l3_weight": monotone_l3_weight,
        }
        if schedule == "learned_monotone":
            # The filled-in values are part of the config, not defaults that diffusers may drop in `from_config`.
            values = _checked_monotone_config(learn_endpoints, monotone_num_features, monotone)
            defaults = [key for key in self.config.get("_use_default_values", []) if key not in values]
            self.register_to_config(**values, _use_default_values=defaults)
        else:
            given = [
                name
                for name, value in (
                    ("learn_endpoints", learn_endpoints),
                    ("monotone_num_features", monotone_num_features),
                    *monotone.items(),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"{', '.join(f'`{name}`' for name in given)} only apply to schedule='learned_monotone', "
                    f"got schedule={schedule!r}; leave them unset (None)."
                )

        self.num_inference_steps: int | None = None
        self.time_grid: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._step_index: int | None = None
        self._step_coefficients: list[_StepCoefficients] = []

    @property
    def applies_diffenc_correction(self) -> bool:
        """Whether :meth:`step` and the losses move x_hat(t) to x_hat(s) (any DiffEnc forward process)."""
        return self.config.encoder_type != "none"

    @property
    def step_index(self) -> int | None:
        """Index of the next step into :attr:`timesteps` (``None`` before :meth:`set_timesteps`)."""
        return self._step_index

    def __len__(self) -> int:
        return self.num_inference_steps or 0

    @property
    def learns_endpoints(self) -> bool:
        """Whether training learns gamma_min and gamma_max (`learned_linear`, `learned_monotone` by default)."""
        return self.config.schedule == "learned_linear" or (
            self.config.schedule == "learned_monotone" and self.config.learn_endpoints
        )

    def monotone_parameters(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The monotone schedule's (w2, b2, w3) from the config as tensors of shape (n,) (``None`` for the
        linear schedules); float64 (float32 on MPS) unless ``dtype`` is given."""
        if self.config.schedule != "learned_monotone":
            return None
        dtype = dtype or schedule_dtype(device)
        return tuple(torch.tensor(self.config[key], dtype=dtype, device=device) for key in MONOTONE_KEYS)

    def gamma(self, t: torch.Tensor | float, device: torch.device | str | None = None) -> torch.Tensor:
        """gamma(t) for t in [0, 1], in float64 (float32 on MPS), on the device of ``t`` (or ``device``)."""
        return self.gamma_and_derivative(t, device)[0]

    def gamma_derivative(self, t: torch.Tensor | float, device: torch.device | str | None = None) -> torch.Tensor:
        """d gamma / dt at t (constant gamma_max - gamma_min for the linear schedules), like :meth:`gamma`."""
        return self.gamma_and_derivative(t, device)[1]

    def gamma_and_derivative(
        self, t: torch.Tensor | float, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), d gamma / dt), both of the shape of ``t``, in float64 (float32 on MPS)."""
        t = torch.as_tensor(t, device=device)
        t = t.to(schedule_dtype(t.device))
        gamma_min, gamma_max = self.config.gamma_min, self.config.gamma_max
        monotone = self.monotone_parameters(t.device)
        if monotone is not None:
            return monotone_gamma(t, gamma_min, gamma_max, *monotone)
        return linear_gamma(t, gamma_min, gamma_max), torch.full_like(t, gamma_max - gamma_min)

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """No input scaling: the denoiser takes z_t as it is. Present for diffusers' scheduler interface."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Set the even time grid 1 = t_0 > t_1 > ... > t_N = 0 of ``num_inference_steps`` = N steps.

        :attr:`timesteps` holds the N times t_0 .. t_{N-1} at which the denoiser is evaluated (float32);
        :attr:`time_grid` holds all N + 1 times in float64 (float32 on MPS).
        """
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"`num_inference_steps` must be an int, got {num_inference_steps!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}.")
        device = torch.device(device) if device is not None else torch.device("cpu")
        steps = torch.arange(num_inference_steps, -1, -1, dtype=schedule_dtype(device), device=device)
        self.num_inference_steps = num_inference_steps
        self.time_grid = steps / num_inference_steps
        self.timesteps = self.time_grid[:-1].to(torch.float32)
        self._step_index = 0
        self._step_coefficients = self._coefficients_of_grid(self.time_grid)

    def _coefficients_of_grid(self, time_grid: torch.Tensor) -> list[_StepCoefficients]:
        """Every step's scalars, computed at once in the grid's dtype and brought to the host once.

        :meth:`step` then multiplies tensors by Python floats: no per-step schedule arithmetic on tiny tensors
        and no per-step host-device synchronisation. The arithmetic is the per-step one, in float64 (float32 on
        MPS), done once for the whole grid.
        """
        gamma = self.gamma(time_grid)
        gamma_t, gamma_s = gamma[:-1], gamma[1:]
        delta = gamma_s - gamma_t
        alpha_t, sigma_t = alpha_sigma(gamma_t)
        alpha_s, sigma_s = alpha_sigma(gamma_s)
        x_hat_scale = 1.0 - delta * torch.sigmoid(gamma_t) if self.applies_diffenc_correction else 1.0
        columns = torch.stack([time_grid[:-1], alpha_t, sigma_t, alpha_s * x_hat_scale, sigma_s, -torch.expm1(delta)])
        return [_StepCoefficients(*row) for row in columns.T.tolist()]

    def predict_original_sample(
        self, model_output: torch.Tensor, sample: torch.Tensor, gamma: torch.Tensor
    ) -> torch.Tensor:
        """x_hat from the denoiser's output at z_t = ``sample``: the estimate of x_phi(x, t).

        v prediction: x_hat = alpha_t z_t - sigma_t v_hat.
        Epsilon prediction: x_hat = (z_t - sigma_t eps_hat) / alpha_t.
        ``gamma`` has shape (B,) or (); the result has the dtype of ``sample``.
        """
        alpha, sigma = alpha_sigma(gamma.to(schedule_dtype(gamma.device)))
        alpha = expand_to(alpha, sample).to(sample.dtype)
        sigma = expand_to(sigma, sample).to(sample.dtype)
        return self._x_hat(model_output, sample, alpha, sigma)

    def original_sample_error(
        self,
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
        against float64, docs/conversion.md). ``alpha`` and ``sigma`` broadcast against the samples.
        """
        if self.config.prediction_type == "v_prediction":
            return sigma * ((alpha * noise - sigma * original_samples) - model_output)
        return (sigma / alpha) * (noise - model_output)

    def _x_hat(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        alpha: torch.Tensor | float,
        sigma: torch.Tensor | float,
    ) -> torch.Tensor:
        """x_hat from the network output, with alpha_t and sigma_t given as tensors or Python floats."""
        if self.config.prediction_type == "v_prediction":
            return alpha * sample - sigma * model_output
        return (sample - sigma * model_output) / alpha

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | float
    ) -> torch.Tensor:
        """Sample the forward process: z_t = alpha_t x + sigma_t eps.

        Args:
            original_samples: x, shape (B, C, H, W); for DiffEnc this is the encoding x_phi(x, t).
            noise: eps, same shape.
            timesteps: t in [0, 1], shape (B,) or a scalar.
        """
        gamma = self.gamma(timesteps, device=original_samples.device)
        alpha, sigma = alpha_sigma(gamma)
        alpha = expand_to(alpha, original_samples).to(original_samples.dtype)
        sigma = expand_to(sigma, original_samples).to(original_samples.dtype)
        return alpha * original_samples + sigma * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 1.0,
        return_dict: bool = True,
    ) -> VDMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        r"""One reverse step from t = t_i to s = t_{i+1} of the grid set by :meth:`set_timesteps`.

        With delta = gamma_s - gamma_t < 0, c = -expm1(delta) and x_hat_s = x_hat (1 - delta sigma_t^2) for DiffEnc
        (x_hat_s = x_hat for VDM), the step is the DDIM family on the log-SNR grid:

            z_s = alpha_s x_hat_s + sigma_s sqrt(1 - eta^2 c) eps_hat + eta sigma_s sqrt(w c) eps,
            eps_hat = (z_t - alpha_t x_hat) / sigma_t.

        eta = 1 is the ancestral sampler of DESIGN.md, whose mean equals
        (alpha_s / alpha_t) e^delta z_t - alpha_s expm1(delta) x_hat - [DiffEnc] alpha_s delta sigma_t^2 x_hat;
        eta = 0 is deterministic. After the last step z_0 is decoded: ``prev_sample`` holds the grid value of the
        decoder's most likely 8-bit value at z_0 / alpha_0.

        Args:
            model_output: the denoiser's output at (z_t, gamma_t), v or eps per `prediction_type`.
            timestep: t_i; used only to check that the caller is in step (times are tracked by index).
            sample: z_t, shape (B, C, H, W).
            generator: random generator(s) for the step's noise.
            eta: 1 for ancestral sampling, 0 for the deterministic sampler, in [0, 1].
            return_dict: return a :class:`VDMSchedulerOutput` (True) or a tuple.
        """
        if self.time_grid is None or self._step_index is None:
            raise ValueError("`set_timesteps` must be called before `step`.")
        if self._step_index >= self.num_inference_steps:
            raise ValueError(
                f"`step` was called {self._step_index + 1} times after `set_timesteps({self.num_inference_steps})`;"
                " call `set_timesteps` again to start a new trajectory."
            )
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"`eta` must be in [0, 1], got {eta}.")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"`model_output` shape {tuple(model_output.shape)} does not match `sample` shape {tuple(sample.shape)}."
            )
        coefficients = self._step_coefficients[self._step_index]
        self._check_timestep(timestep, coefficients.t)

        x_hat = self._x_hat(model_output, sample, coefficients.alpha_t, coefficients.sigma_t)
        eps_hat = (sample - coefficients.alpha_t * x_hat) / coefficients.sigma_t
        eps_hat_coefficient = coefficients.sigma_s * math.sqrt(1.0 - eta**2 * coefficients.c)
        prev_sample = coefficients.x_hat_coefficient * x_hat + eps_hat_coefficient * eps_hat
        if eta > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            noise_std = eta * coefficients.sigma_s * math.sqrt(self.config.variance_weight * coefficients.c)
            prev_sample = prev_sample + noise_std * noise

        self._step_index += 1
        if self._step_index == self.num_inference_steps:
            prev_sample = self.decode(prev_sample)

        if not return_dict:
            return prev_sample, x_hat
        return VDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x_hat)

    def _check_timestep(self, timestep: torch.Tensor | float, expected: float) -> None:
        """Raise unless ``timestep`` is the current time ``expected`` (within a quarter of a step).

        An element of :attr:`timesteps` on an accelerator is checked by its position in that tensor: reading its
        value would make every step wait for the device.
        """
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu" and self._is_view_of_timesteps(timestep):
                given_index = timestep.storage_offset() - self.timesteps.storage_offset()
                if given_index == self._step_index:
                    return
                given = self._step_coefficients[given_index].t
            else:
                given = float(timestep.reshape(-1)[0])
        else:
            given = float(timestep)
        if abs(given - expected) > 0.25 / self.num_inference_steps:
            raise ValueError(
                f"`timestep` {given} is not the scheduler's current time {expected} (step {self._step_index} of "
                f"{self.num_inference_steps}); steps must be taken in the order of `timesteps`."
            )

    def _is_view_of_timesteps(self, timestep: torch.Tensor) -> bool:
        """Whether ``timestep`` is one element of :attr:`timesteps` (as iterating over it yields)."""
        timesteps = self.timesteps
        return (
            timestep.numel() == 1
            and timestep.device == timesteps.device
            and timestep.dtype == timesteps.dtype
            and timestep.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr()
            and 0 <= timestep.storage_offset() - timesteps.storage_offset() < timesteps.numel()
        )

    def decode(self, z_0: torch.Tensor) -> torch.Tensor:
        """The decoder's most likely grid value f_k at z_0 / alpha_0, same shape and dtype as ``z_0``.

        The decoder's logits -0.5 ((z_0 / alpha_0 - f_k) e^{-gamma_0 / 2})^2 are largest at the grid point nearest
        to z_0 / alpha_0, so the mode is that point.
        """
        alpha_0, _ = alpha_sigma(self.gamma(0.0, device=z_0.device))
        return index_to_grid(grid_to_index(z_0.to(alpha_0.dtype) / alpha_0), z_0.dtype)
