"""VDMScheduler: the ancestral and deterministic (DDIM-family) samplers of VDM and DiffEnc on an even time grid.

The schedule gamma(t) lives in :mod:`~diffenc_diffusers.noise_schedule`, the step's algebra in
:mod:`~diffenc_diffusers.step_algebra`, the forward process' x_hat correction in
:mod:`~diffenc_diffusers.forward_processes`, and what every scheduler of this package shares (gamma from the config,
x_hat from a network output, `add_noise`) in :class:`~diffenc_diffusers.scheduling_utils.VDMSchedulerMixin`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .forward_processes import ENCODER_TYPES
from .noise_schedule import (
    DEFAULT_MONOTONE_FEATURES,
    MONOTONE_KEYS,
    SCHEDULES,
    alpha_sigma,
    alpha_sigma_squared,
    default_monotone_parameters,
    expand_to,
    linear_gamma,
    monotone_gamma,
    schedule_dtype,
)
from .scheduling_utils import VDMSchedulerMixin
from .step_algebra import (
    PREDICTION_TYPES,
    StepCoefficients,
    ddim_step,
    eps_from_x_hat,
    step_coefficients,
    x_hat_from_output,
)

__all__ = [
    # Re-exported from their homes (noise_schedule, step_algebra, forward_processes): the names this module had.
    "DEFAULT_MONOTONE_FEATURES",
    "ENCODER_TYPES",
    "MONOTONE_KEYS",
    "PREDICTION_TYPES",
    "SCHEDULES",
    "VDMScheduler",
    "VDMSchedulerOutput",
    "alpha_sigma",
    "alpha_sigma_squared",
    "default_monotone_parameters",
    "expand_to",
    "linear_gamma",
    "monotone_gamma",
    "schedule_dtype",
]


@dataclass
class VDMSchedulerOutput(BaseOutput):
    """Output of :meth:`VDMScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            z_s, the latent at the next (smaller) time; after the last step z_0 (the pipeline decodes it with
            :meth:`VDMScheduler.decode`).
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            x_hat, the network's estimate of the encoded data x_phi(x, t) (of x itself for VDM).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class VDMScheduler(VDMSchedulerMixin, SchedulerMixin, ConfigMixin):
    r"""
    Continuous-time variance-preserving scheduler of VDM (Kingma et al., 2021) and DiffEnc (Nielsen et al., 2024).

    The schedule is gamma(t) = -log SNR(t) = gamma_min + (gamma_max - gamma_min) t for t in [0, 1] (or, for
    `schedule="learned_monotone"`, the monotone network of :func:`monotone_gamma` between the same exact ends), with
    alpha_t^2 = sigmoid(-gamma_t) and sigma_t^2 = sigmoid(gamma_t). Sampling runs the ancestral sampler of the
    generative model (or the deterministic one) from t = 1 to t = 0 on an even time grid, ending at z_0. For
    DiffEnc, whose forward process runs on an encoding x_phi(x, t) of the data, the step includes the forward
    process' correction that moves the estimate x_hat(t) to x_hat(s); the encoder itself is never needed to sample.

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
            or `"trainable"` (DiffEnc with x_phi = alpha_t^2 x + sigma_t^2 y_phi(x, gamma_t)): the name of a class
            of :mod:`diffenc_diffusers.forward_processes` (:attr:`forward_process`), which gives :meth:`step` its
            x_hat correction.
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
        monotone = {
            "monotone_l2_weight": monotone_l2_weight,
            "monotone_l2_bias": monotone_l2_bias,
            "monotone_l3_weight": monotone_l3_weight,
        }
        self._check_and_register_schedule(
            gamma_min,
            gamma_max,
            schedule,
            prediction_type,
            encoder_type,
            variance_weight,
            learn_endpoints,
            monotone_num_features,
            monotone,
        )
        self.num_inference_steps: int | None = None
        self.time_grid: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._step_index: int | None = None
        self._step_coefficients: list[StepCoefficients] = []

    @property
    def step_index(self) -> int | None:
        """Index of the next step into :attr:`timesteps` (``None`` before :meth:`set_timesteps`)."""
        return self._step_index

    def __len__(self) -> int:
        return self.num_inference_steps or 0

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

    def _coefficients_of_grid(self, time_grid: torch.Tensor) -> list[StepCoefficients]:
        """Every step's scalars (:func:`~diffenc_diffusers.step_algebra.step_coefficients`), computed once per grid
        in float64 (float32 on MPS): :meth:`step` then multiplies tensors by Python floats, with no per-step schedule
        arithmetic on tiny tensors and no per-step host-device synchronisation."""
        gamma = self.gamma(time_grid)
        x_hat_shift = self.forward_process.x_hat_shift(gamma[:-1], gamma[1:] - gamma[:-1])
        return step_coefficients(time_grid, gamma, x_hat_shift)

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
        (x_hat_s = x_hat for VDM; :meth:`ForwardProcess.x_hat_shift`), the step is the DDIM family on the log-SNR
        grid (:func:`~diffenc_diffusers.step_algebra.ddim_step`):

            z_s = alpha_s x_hat_s + sigma_s sqrt(1 - eta^2 c) eps_hat + eta sigma_s sqrt(w c) eps,
            eps_hat = (z_t - alpha_t x_hat) / sigma_t.

        eta = 1 is the ancestral sampler of DESIGN.md, whose mean equals
        (alpha_s / alpha_t) e^delta z_t - alpha_s expm1(delta) x_hat - [DiffEnc] alpha_s delta sigma_t^2 x_hat;
        eta = 0 is deterministic. After the last step ``prev_sample`` is z_0; decoding it to 8-bit values is the
        caller's (the pipeline applies :meth:`decode`).

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

        x_hat = x_hat_from_output(
            self.config.prediction_type, model_output, sample, coefficients.alpha_t, coefficients.sigma_t
        )
        eps_hat = eps_from_x_hat(sample, x_hat, coefficients.alpha_t, coefficients.sigma_t)
        noise = None
        if eta > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = ddim_step(x_hat, eps_hat, coefficients, eta, self.config.variance_weight, noise)
        self._step_index += 1

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
