"""VDMSchedulerMixin: what every scheduler of this package provides, whatever its sampling algorithm.

A scheduler of this package is a diffusers scheduler (`SchedulerMixin`, `ConfigMixin`) whose config holds the noise
schedule, the prediction type and the forward process (the keys of :class:`~diffenc_diffusers.VDMScheduler`'s
config), so that ``OtherScheduler.from_config(pipe.scheduler.config)`` switches the sampler and keeps the model.
This mixin gives it, from that config: gamma(t) and its derivative, alpha_t / sigma_t, the forward process, x_hat
from a network output, the ODE's data prediction, `add_noise` and the decoder's mode. A sampler adds
`set_timesteps(num_inference_steps, device)`, `timesteps` and `step(model_output, timestep, sample, ...)`
returning `prev_sample`; :class:`~diffenc_diffusers.DiffEncPipeline` passes `step` only the keyword arguments its
signature names (`generator`, `eta`) and decodes z_0 after the loop. A new sampler is one file: a class with
`VDMSchedulerMixin, SchedulerMixin, ConfigMixin`, an `__init__` with the config keys of `VDMScheduler` (plus its own,
with defaults) that calls :meth:`VDMSchedulerMixin._check_and_register_schedule`, `set_timesteps` and `step`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .discretization import grid_to_index, index_to_grid
from .forward_processes import ForwardProcess, forward_process
from .noise_schedule import (
    MONOTONE_KEYS,
    SCHEDULES,
    alpha_sigma,
    check_monotone_config,
    expand_to,
    gamma_and_derivative,
    learns_endpoints,
    schedule_dtype,
)
from .step_algebra import PREDICTION_TYPES, x_hat_error_from_output, x_hat_from_output


class VDMSchedulerMixin:
    """Mixin of the schedulers of this package: the schedule and the model kind, read from the config.

    The config must hold `gamma_min`, `gamma_max`, `schedule`, `prediction_type`, `encoder_type`,
    `variance_weight` and the `learned_monotone` keys (`learn_endpoints`, `monotone_num_features`, `monotone_*`).
    """

    config: Any

    def _check_and_register_schedule(
        self,
        gamma_min: float,
        gamma_max: float,
        schedule: str,
        prediction_type: str,
        encoder_type: str,
        variance_weight: float,
        learn_endpoints: bool | None,
        monotone_num_features: int | None,
        monotone: dict[str, list[float] | None],
    ) -> None:
        """Check the shared config keys (call from ``__init__`` under ``@register_to_config``); fill in the
        monotone schedule's defaults as config entries; set :attr:`forward_process`."""
        for name, value in (("gamma_min", gamma_min), ("gamma_max", gamma_max), ("variance_weight", variance_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"`{name}` must be a finite float, got {value!r}.")
        if gamma_min >= gamma_max:
            raise ValueError(f"`gamma_min` must be smaller than `gamma_max`, got {gamma_min} >= {gamma_max}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")
        self._forward_process = forward_process(encoder_type)
        if variance_weight <= 0:
            raise ValueError(f"`variance_weight` must be positive, got {variance_weight}.")
        if schedule == "learned_monotone":
            # The filled-in values are part of the config, not defaults that diffusers may drop in `from_config`.
            values = check_monotone_config(learn_endpoints, monotone_num_features, monotone)
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

    @property
    def forward_process(self) -> ForwardProcess:
        """The forward process of the config's `encoder_type` (:mod:`diffenc_diffusers.forward_processes`)."""
        return self._forward_process

    @property
    def learns_endpoints(self) -> bool:
        """Whether training learns gamma_min and gamma_max (`learned_linear`, `learned_monotone` by default)."""
        return learns_endpoints(self.config)

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
        return gamma_and_derivative(t, self.config.gamma_min, self.config.gamma_max, self.monotone_parameters(t.device))

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """No input scaling: the denoiser takes z_t as it is. Present for diffusers' scheduler interface."""
        return sample

    def predict_original_sample(
        self, model_output: torch.Tensor, sample: torch.Tensor, gamma: torch.Tensor
    ) -> torch.Tensor:
        """x_hat from the denoiser's output at z_t = ``sample``: the estimate of x_phi(x, t)
        (:func:`~diffenc_diffusers.step_algebra.x_hat_from_output`). ``gamma`` has shape (B,) or (); the result
        has the dtype of ``sample``."""
        alpha, sigma = alpha_sigma(gamma.to(schedule_dtype(gamma.device)))
        alpha = expand_to(alpha, sample).to(sample.dtype)
        sigma = expand_to(sigma, sample).to(sample.dtype)
        return x_hat_from_output(self.config.prediction_type, model_output, sample, alpha, sigma)

    def original_sample_error(
        self,
        model_output: torch.Tensor,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        alpha: torch.Tensor | float,
        sigma: torch.Tensor | float,
    ) -> torch.Tensor:
        """x_hat - x for the network output at z_t = alpha_t x + sigma_t eps, free of cancellation
        (:func:`~diffenc_diffusers.step_algebra.x_hat_error_from_output`). ``alpha`` and ``sigma`` broadcast
        against the samples."""
        return x_hat_error_from_output(self.config.prediction_type, model_output, original_samples, noise, alpha, sigma)

    def data_prediction(self, x_hat: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """x_tilde of the probability-flow ODE dz/dlambda = -alpha^2 z + alpha x_tilde (lambda = -gamma / 2) for
        the estimate x_hat at gamma (:meth:`ForwardProcess.data_prediction`): what a multistep ODE solver
        extrapolates in place of DPM-Solver++'s x_0."""
        return self.forward_process.data_prediction(x_hat, gamma)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | float
    ) -> torch.Tensor:
        """Sample the forward process: z_t = alpha_t x + sigma_t eps.

        Args:
            original_samples: x, shape (B, C, H, W); for DiffEnc this is the encoding x_phi(x, t).
            noise: eps, same shape.
            timesteps: t in [0, 1] (continuous time, not diffusers' integer timesteps), a float tensor of shape
                (B,) or (), or a float.

        Raises:
            TypeError: Integer or boolean timesteps.
            ValueError: Times outside [0, 1] or not finite.
        """
        check_times(timesteps, "timesteps")
        gamma = self.gamma(timesteps, device=original_samples.device)
        alpha, sigma = alpha_sigma(gamma)
        alpha = expand_to(alpha, original_samples).to(original_samples.dtype)
        sigma = expand_to(sigma, original_samples).to(original_samples.dtype)
        return alpha * original_samples + sigma * noise

    def decode(self, z_0: torch.Tensor) -> torch.Tensor:
        """The decoder's most likely grid value f_k at z_0 / alpha_0, same shape and dtype as ``z_0``.

        The decoder's logits -0.5 ((z_0 / alpha_0 - f_k) e^{-gamma_0 / 2})^2 are largest at the grid point nearest
        to z_0 / alpha_0, so the mode is that point. The pipeline applies it to the sampler's z_0.
        """
        alpha_0, _ = alpha_sigma(self.gamma(0.0, device=z_0.device))
        return index_to_grid(grid_to_index(z_0.to(alpha_0.dtype) / alpha_0), z_0.dtype)


def check_times(timesteps: object, name: str) -> None:
    """Raise unless ``timesteps`` are continuous times in [0, 1]: a float, or a floating-point tensor.

    Integer timesteps (diffusers' 0 .. 999 convention) are refused rather than read as times: t = 10 would give
    pure noise silently.
    """
    if isinstance(timesteps, torch.Tensor):
        if not timesteps.is_floating_point():
            raise TypeError(
                f"`{name}` must be continuous times in [0, 1] as a floating-point tensor, got dtype "
                f"{timesteps.dtype}; this scheduler has no integer timesteps (divide diffusers-style indices by "
                "their number, e.g. t = timesteps / 1000)."
            )
        values = timesteps.detach()
        if values.numel() and (not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any()):
            raise ValueError(
                f"`{name}` must hold times in [0, 1], got values in [{values.min().item()}, {values.max().item()}]."
            )
        return
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, float)):
        raise TypeError(f"`{name}` must be a float or a float tensor of times in [0, 1], got {timesteps!r}.")
    if isinstance(timesteps, int) and timesteps not in (0, 1):
        raise TypeError(
            f"`{name}` must be a continuous time in [0, 1], got the integer {timesteps}; this scheduler has no "
            "integer timesteps."
        )
    if not 0.0 <= timesteps <= 1.0:
        raise ValueError(f"`{name}` must be a time in [0, 1], got {timesteps}.")


def check_scheduler(scheduler: object, owner: str) -> None:
    """Raise a ``TypeError`` unless ``scheduler`` is a scheduler of this package (a :class:`VDMSchedulerMixin`
    with `set_timesteps` and `step`), naming ``owner`` (who needs it) and what is accepted."""
    if not isinstance(scheduler, VDMSchedulerMixin) or not all(
        callable(getattr(scheduler, name, None)) for name in ("set_timesteps", "step")
    ):
        raise TypeError(
            f"{owner} needs a scheduler of diffenc_diffusers (a VDMSchedulerMixin with `set_timesteps` and `step`, "
            f"e.g. VDMScheduler), got {type(scheduler).__module__}.{type(scheduler).__name__}. diffusers' integer-"
            "timestep schedulers (DDPMScheduler, DDIMScheduler, ...) do not know gamma(t): use "
            "VDMScheduler.from_config(pipe.scheduler.config)."
        )
