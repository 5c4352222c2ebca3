"""DiffEncObjective: the negative ELBO of VDM and DiffEnc, per image, in bits per dimension.

ELBO terms (named as in google-research/vdm):
    loss_recon  reconstruction, -log p(x | z_0)                       DESIGN.md "Reconstruction"
    loss_klz    prior, KL(q(z_1 | x) || N(0, I))                       DESIGN.md "Prior"
    loss_diff   diffusion, continuous time (T = infinity) or T steps   DESIGN.md "Continuous/Discrete-time ..."
gamma lives in :mod:`noise_schedule` (this module holds the learned schedule's parameters), x_phi(x, t) in the
forward process of the scheduler's `encoder_type` (:mod:`forward_processes`), the step algebra shared with the
samplers in :mod:`step_algebra`; this module owns the three loss terms.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .discretization import decoder_nll, nats_to_bits_per_dim, validate_images
from .forward_processes import Encoding, ForwardProcess
from .noise_schedule import (
    MonotoneSchedule,
    alpha_sigma,
    alpha_sigma_squared,
    endpoint_parameters,
    expand_to,
    gamma_and_derivative,
    schedule_dtype,
)
from .scheduling_utils import VDMSchedulerMixin, check_scheduler
from .step_algebra import posterior_variance_fraction

__all__ = ["DiffEncObjective", "DiffEncObjectiveOutput", "Encoding", "network_classes", "networks_in_eval_mode"]


@dataclass
class DiffEncObjectiveOutput(BaseOutput):
    """Output of :class:`DiffEncObjective`. Every per-image term is in bits per dimension.

    Args:
        loss (`torch.Tensor`, scalar): mean of `bpd` over the batch; what training minimises.
        bpd (`torch.Tensor` of shape `(batch_size,)`): the negative ELBO, loss_recon + loss_klz + loss_diff.
        loss_recon (`torch.Tensor` of shape `(batch_size,)`): reconstruction term -log p(x | z_0).
        loss_klz (`torch.Tensor` of shape `(batch_size,)`): prior term KL(q(z_1 | x) || N(0, I)).
        loss_diff (`torch.Tensor` of shape `(batch_size,)`): diffusion term (a one-sample estimate).
        t (`torch.Tensor` of shape `(batch_size,)`): the times used for the diffusion term (float64); in discrete
            time the end t_i = (i + 1) / T of the sampled step.
    """

    # `None` defaults, as in diffusers' outputs, let accelerate rebuild the output after its fp32 conversion.
    loss: torch.Tensor = None
    bpd: torch.Tensor = None
    loss_recon: torch.Tensor = None
    loss_klz: torch.Tensor = None
    loss_diff: torch.Tensor = None
    t: torch.Tensor = None


class DiffEncObjective(nn.Module):
    r"""
    The negative ELBO of a VDM (`encoder_type="none"`), a non-trainable DiffEnc (`"nontrainable"`) or a trainable
    DiffEnc (`"trainable"`, with an encoder network), as set by the scheduler's `encoder_type`.

    The module holds the denoiser, the encoder (if any), for `schedule="learned_linear"` (and `"learned_monotone"`
    with `learn_endpoints`) the two trainable schedule endpoints `gamma_min` and `gamma_max`, and for
    `"learned_monotone"` the schedule's weights `monotone_schedule` (float32 parameters; gamma itself is computed
    in float64). In continuous time the monotone weights are trained to minimise the variance of the loss
    estimate (see :meth:`continuous_diffusion_nats`); in discrete time, where the loss depends on them, by the loss.
    Calling it on a batch of 8-bit images returns per-image bits per dimension; ``output.loss.backward()``
    trains every part, including the encoder through d y_phi / d gamma (a forward-mode derivative).

    Args:
        unet (`VDMUNetModel`): the denoiser, called as ``unet(z_t, gamma_t).sample``.
        scheduler (`VDMScheduler`, or another scheduler of this package): the noise schedule, prediction type,
            forward process (`encoder_type`) and variance weight w.
        encoder (`DiffEncEncoderModel`, *optional*): y_phi(x, gamma); required iff the forward process needs an
            encoder (`encoder_type="trainable"`).
        num_timesteps (`int`, *optional*): T for the discrete-time diffusion loss; `None` for continuous time.
            A variance weight w != 1 (scheduler config `variance_weight`) needs a finite T.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: VDMSchedulerMixin,
        encoder: nn.Module | None = None,
        num_timesteps: int | None = None,
    ):
        super().__init__()
        check_scheduler(scheduler, "DiffEncObjective")
        process = scheduler.forward_process
        if process.needs_encoder and encoder is None:
            raise ValueError(
                f"The scheduler's `encoder_type` is {process.encoder_type!r}, whose forward process needs an "
                "`encoder` network, but none was given: the likelihood of this model needs it."
            )
        if not process.needs_encoder and encoder is not None:
            raise ValueError(
                f"An `encoder` was given but the scheduler's `encoder_type` is {process.encoder_type!r}, whose "
                "forward process has no encoder network; use a scheduler with encoder_type='trainable'."
            )
        if num_timesteps is not None and (
            isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1
        ):
            raise ValueError(f"`num_timesteps` must be a positive int or None (continuous), got {num_timesteps!r}.")
        if num_timesteps is None and scheduler.config.variance_weight != 1.0:
            raise ValueError(
                f"The scheduler's `variance_weight` is {scheduler.config.variance_weight}; a weighted loss (w != 1) is "
                "infinite in continuous time, so pass a finite `num_timesteps`."
            )
        conditional = {
            name: network_classes(model)
            for name, model in (("denoiser", unet), ("encoder", encoder))
            if _num_classes(model) is not None
        }
        if len(set(conditional.values())) > 1:
            raise ValueError(
                "The class-conditional denoiser and encoder must agree on the classes, (num_class_embeds, "
                f"null_class); got {conditional}."
            )
        self.unet = unet
        self.encoder = encoder
        self.scheduler = scheduler
        self.num_timesteps = num_timesteps
        # State-dict keys `gamma_min`, `gamma_max`, `monotone_schedule.*` (training checkpoints) stay as they are.
        self.gamma_min, self.gamma_max = endpoint_parameters(scheduler.config)
        is_monotone = scheduler.config.schedule == "learned_monotone"
        self.monotone_schedule = MonotoneSchedule.from_scheduler(scheduler) if is_monotone else None

    @property
    def forward_process(self) -> ForwardProcess:
        """The forward process of the scheduler's `encoder_type` (:mod:`diffenc_diffusers.forward_processes`)."""
        return self.scheduler.forward_process

    @property
    def encoder_type(self) -> str:
        """`"none"`, `"nontrainable"` or `"trainable"` (the scheduler's `encoder_type`)."""
        return self.scheduler.config.encoder_type

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """gamma(t) in float64 (float32 on MPS), shape of ``t``: :func:`noise_schedule.gamma_and_derivative` with the
        current (learned) schedule parameters, differentiable in them."""
        return self._gamma_and_derivative(t)[0]

    def gamma_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """d gamma / dt at t, like :meth:`gamma`."""
        return self._gamma_and_derivative(t)[1]

    def _gamma_and_derivative(
        self, t: torch.Tensor, per_sample: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(gamma(t), d gamma / dt, the monotone schedule's weights as used, or ``None``) in float64.

        Without trainable schedule parameters this is the scheduler's own computation. ``per_sample`` expands the
        monotone weights to one copy per element of ``t`` (see :meth:`MonotoneSchedule.forward`).
        """
        if self.gamma_min is None and self.monotone_schedule is None:
            return (*self.scheduler.gamma_and_derivative(t), None)
        dtype = schedule_dtype(t.device)
        t = t.to(dtype)
        if self.gamma_min is None:
            gamma_min, gamma_max = self.scheduler.config.gamma_min, self.scheduler.config.gamma_max
        else:
            gamma_min, gamma_max = self.gamma_min.to(dtype), self.gamma_max.to(dtype)
        if self.monotone_schedule is not None:
            return self.monotone_schedule(t, gamma_min, gamma_max, per_sample=per_sample)
        return (*gamma_and_derivative(t, gamma_min, gamma_max), None)

    def export_scheduler(self) -> VDMSchedulerMixin:
        """A copy of the scheduler whose config holds the current (learned) schedule parameters: the endpoints
        `gamma_min` / `gamma_max` and, for `learned_monotone`, the `monotone_*` weights."""
        overrides = {}
        if self.gamma_min is not None:
            overrides.update(gamma_min=float(self.gamma_min.detach()), gamma_max=float(self.gamma_max.detach()))
        if self.monotone_schedule is not None:
            overrides.update(self.monotone_schedule.config_values())
        return type(self.scheduler).from_config(self.scheduler.config, **overrides)

    def variance_gradient_parameters(self) -> list[nn.Parameter]:
        """The parameters that ``loss.backward()`` gives the gradient of the loss variance instead of the loss: the
        interior weights of a learned monotone schedule in continuous time (see :meth:`continuous_diffusion_nats`);
        empty otherwise. That gradient is far larger than the others, so training loops clip it apart."""
        if self.monotone_schedule is None or self.num_timesteps is not None:
            return []
        return list(self.monotone_schedule.parameters())

    @property
    def is_class_conditional(self) -> bool:
        """Whether the denoiser or the encoder takes class labels (their config's `num_class_embeds` is set)."""
        return self.num_classes is not None

    @property
    def num_classes(self) -> int | None:
        """The number of classes K of a class-conditional model (labels 0 .. K - 1); None for an unconditional one."""
        return network_classes(self.unet, self.encoder)[0]

    @property
    def null_label(self) -> int | None:
        """The label K of the null class ("no label": the unconditional model of classifier-free guidance) when
        the class-conditional networks have one (`null_class=True`); None otherwise."""
        num_classes, null_class = network_classes(self.unet, self.encoder)
        return num_classes if null_class else None

    def encode(
        self,
        x: torch.Tensor,
        gamma: torch.Tensor,
        with_derivative: bool = False,
        class_labels: torch.Tensor | None = None,
    ) -> Encoding:
        """The encoded data x_phi(x, t) at gamma = gamma_t, and optionally d x_phi / d gamma.

        The formulas are the forward process' (:meth:`ForwardProcess.encode`):

        none:          x_phi = x,                       d x_phi / d gamma = 0
        nontrainable:  x_phi = alpha^2 x,               d x_phi / d gamma = -sigma^2 alpha^2 x
        trainable:     x_phi = alpha^2 x + sigma^2 y,   d x_phi / d gamma = sigma^2 alpha^2 (y - x) + sigma^2 dy/dgamma
                       with y = y_phi(x, gamma) (a forward-mode derivative through the encoder)

        Args:
            x: data as grid values in (-1, 1), shape (B, C, H, W).
            gamma: shape (B,), float64.
            with_derivative: also return d x_phi / d gamma (``None`` for VDM, where it is 0).
            class_labels: shape (B,), for a class-conditional encoder (ignored by an unconditional one).
        """
        encoder_kwargs = _labels_for(self.encoder, class_labels) if self.encoder is not None else {}
        return self.forward_process.encode(x, gamma, with_derivative, self.encoder, **encoder_kwargs)

    def forward(
        self,
        images: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        recon_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> DiffEncObjectiveOutput:
        """Per-image negative ELBO in bits per dimension.

        Args:
            images: uint8 images (B, C, H, W) with values 0..255, or a float tensor of the same shape holding
                exactly the grid values 2 (k + 0.5) / 256 - 1 (see ``discretization.uint8_to_grid``). C, H and W
                must match the denoiser's `in_channels` and `sample_size`.
            t: times in [0, 1) for the diffusion term, shape (B,). Default: low-discrepancy t_i = (u + i / B) mod 1
                with u ~ U(0, 1). In discrete time, t selects the step i = floor(t T), from (i + 1) / T to i / T.
            noise: eps for z_t, shape of ``images``; default standard normal.
            recon_noise: eps_0 for the reconstruction term's z_0, shape of ``images``; default standard normal.
            generator: random generator for whatever of ``t``, ``noise`` and ``recon_noise`` is not given.
            class_labels: integer labels of shape (B,) for a class-conditional model (the denoiser's or the
                encoder's `num_class_embeds` set), giving the conditional ELBO -log p(x | c); label K is the
                null class of a model with `null_class`. Must be None for an unconditional model.
        """
        x = self._check_images(images)
        batch = x.shape[0]
        device = x.device
        t = self._check_or_sample_t(t, batch, device, generator)
        noise = self._check_or_sample_noise(noise, "noise", x, generator)
        recon_noise = self._check_or_sample_noise(recon_noise, "recon_noise", x, generator)
        class_labels = self._check_class_labels(class_labels, batch, device)
        num_dims = x[0].numel()

        loss_recon, loss_klz = self.recon_and_prior_nats(x, recon_noise, class_labels)
        if self.num_timesteps is None:
            loss_diff = self.continuous_diffusion_nats(x, t, noise, class_labels)
        else:
            t, loss_diff = self.discrete_diffusion_nats(x, t, noise, class_labels)

        loss_recon, loss_klz, loss_diff = (
            nats_to_bits_per_dim(v, num_dims).to(x.dtype) for v in (loss_recon, loss_klz, loss_diff)
        )
        bpd = loss_recon + loss_klz + loss_diff
        return DiffEncObjectiveOutput(
            loss=bpd.mean(), bpd=bpd, loss_recon=loss_recon, loss_klz=loss_klz, loss_diff=loss_diff, t=t
        )

    def recon_and_prior_nats(
        self, x: torch.Tensor, recon_noise: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction -log p(x | z_0) and prior KL(q(z_1 | x) || N(0, I)), per image, in nats.

        Reconstruction: z0r = z_0 / alpha_0 = x_phi(x, 0) + exp(gamma_0 / 2) eps_0, decoded over the 256 grid values.
        Prior: 0.5 sum(alpha_1^2 x_phi(x, 1)^2 + sigma_1^2 - log sigma_1^2 - 1).
        """
        batch = x.shape[0]
        ends = torch.cat([torch.zeros(batch, device=x.device), torch.ones(batch, device=x.device)])
        gamma_ends = self.gamma(ends)
        encoding = self.encode(torch.cat([x, x]), gamma_ends, class_labels=_twice(class_labels))
        x_phi_0, x_phi_1 = encoding.x_phi.split(batch)
        gamma_0, gamma_1 = gamma_ends[0], gamma_ends[-1]

        z0_rescaled = x_phi_0 + torch.exp(0.5 * gamma_0).to(x.dtype) * recon_noise
        loss_recon = decoder_nll(x, z0_rescaled, gamma_0).flatten(1).sum(1)

        alpha_sq_1, sigma_sq_1 = alpha_sigma_squared(gamma_1)
        mean_sq = (x_phi_1.flatten(1) ** 2).sum(1)
        num_dims = x[0].numel()
        loss_klz = 0.5 * (alpha_sq_1 * mean_sq + num_dims * (sigma_sq_1 - F.logsigmoid(gamma_1) - 1.0))
        return loss_recon, loss_klz

    def continuous_diffusion_nats(
        self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Continuous-time (T = infinity) diffusion loss per image, in nats:

        L = 0.5 gamma'(t) e^{-gamma_t} || x_hat - x_phi + d x_phi / d gamma + sigma_t^2 x_hat ||^2,
        with the last two terms absent for VDM (where it equals 0.5 gamma' || eps - eps_hat ||^2).

        Learned monotone schedule: E_t[L] depends on gamma only through its ends, so the weights of its interior
        get no ELBO gradient but the variance gradient, d/dw mean_i(L_i^2) (L_i in bits/dim): gradient hooks on
        their per-image copies scale image i's gradient by 2 L_i (VDM paper, Appendix on variance minimisation).
        The endpoints and the networks keep the gradient of the loss itself.
        """
        variance_gradient = self.monotone_schedule is not None and torch.is_grad_enabled()
        gamma_t, dgamma_dt, interior = self._gamma_and_derivative(t, per_sample=variance_gradient)
        encoding = self.encode(x, gamma_t, with_derivative=True, class_labels=class_labels)
        x_hat, residual = self._denoise(encoding.x_phi, noise, gamma_t, class_labels)
        if encoding.dx_phi_dgamma is not None:
            residual = residual + encoding.dx_phi_dgamma
        drift = self.forward_process.x_hat_drift(gamma_t)
        if drift is not None:
            residual = residual + expand_to(drift, x).to(x.dtype) * x_hat
        weight = 0.5 * dgamma_dt * torch.exp(-gamma_t)
        loss = weight * (residual.flatten(1) ** 2).sum(1)
        if variance_gradient:
            scale = 2.0 * nats_to_bits_per_dim(loss.detach(), x[0].numel())
            for param in interior:
                if param.requires_grad:
                    param.register_hook(lambda grad: grad * expand_to(scale, grad).to(grad.dtype))
        return loss

    def discrete_diffusion_nats(
        self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T-step diffusion loss per image, in nats: T times the KL of one step, from t_i = (i + 1) / T to s = i / T.

        KL_i = e^{-gamma_s} || (m_s - x_hat_s) - e^{delta} (m_t - x_hat_t) ||^2 / (-2 expm1(delta)),
        with delta = gamma_s - gamma_t, m = x_phi(x, .), and x_hat_s = x_hat_t (1 - delta sigma_t^2) for DiffEnc
        (x_hat_s = x_hat_t for VDM). With the variance weight w, KL_i becomes (D / 2)(log w + 1 / w - 1) + KL_i / w.

        Returns:
            (t_i, loss): the step ends used, and the loss, both of shape (B,).
        """
        num_steps = self.num_timesteps
        batch = x.shape[0]
        step = torch.floor(t * num_steps).clamp(max=num_steps - 1)
        t_end = (step + 1) / num_steps
        gamma_both = self.gamma(torch.cat([t_end, step / num_steps]))
        gamma_t, gamma_s = gamma_both.split(batch)
        m_t, m_s = self.encode(torch.cat([x, x]), gamma_both, class_labels=_twice(class_labels)).x_phi.split(batch)
        x_hat_t, x_hat_error = self._denoise(m_t, noise, gamma_t, class_labels)

        delta = gamma_s - gamma_t
        c = posterior_variance_fraction(delta)
        # (m_s - x_hat_s) - e^delta (m_t - x_hat_t), arranged so that no two O(1) terms cancel when T is large:
        # e^delta - 1 = -c, and x_hat_t - x_hat_s = kappa x_hat_t with kappa the forward process' x_hat shift.
        mean_gap = (m_s - m_t) - expand_to(c, x).to(x.dtype) * x_hat_error
        x_hat_shift = self.forward_process.x_hat_shift(gamma_t, delta)
        if x_hat_shift is not None:
            mean_gap = mean_gap + expand_to(x_hat_shift, x).to(x.dtype) * x_hat_t
        kl = torch.exp(-gamma_s) * (mean_gap.flatten(1) ** 2).sum(1) / (2.0 * c)
        w = self.scheduler.config.variance_weight
        num_dims = x[0].numel()
        kl = 0.5 * num_dims * (math.log(w) + 1.0 / w - 1.0) + kl / w
        return t_end, num_steps * kl

    def _denoise(
        self, x_phi: torch.Tensor, noise: torch.Tensor, gamma_t: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_hat at z_t = alpha_t x_phi + sigma_t eps, from the denoiser (run in its own, possibly autocast, dtype),
        and its error x_hat - x_phi (:meth:`VDMScheduler.original_sample_error`, free of cancellation at small t).
        """
        alpha, sigma = (expand_to(v, x_phi).to(x_phi.dtype) for v in alpha_sigma(gamma_t))
        z_t = alpha * x_phi + sigma * noise
        labels = _labels_for(self.unet, class_labels)
        model_output = self.unet(z_t, gamma_t.to(x_phi.dtype), **labels).sample.to(x_phi.dtype)
        x_hat = self.scheduler.predict_original_sample(model_output, z_t, gamma_t)
        return x_hat, self.scheduler.original_sample_error(model_output, x_phi, noise, alpha, sigma)

    def _compute_dtype(self) -> torch.dtype:
        param = next(self.unet.parameters(), None)
        return torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        x = validate_images(images).to(self._compute_dtype())
        config = self.unet.config
        size = config.sample_size
        expected = (config.in_channels, *((size, size) if isinstance(size, int) else tuple(size)))
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"`images` have shape {tuple(images.shape)}; this model takes (batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) (the denoiser's `in_channels` and `sample_size`)."
            )
        return x

    def _check_or_sample_t(
        self, t: torch.Tensor | None, batch: int, device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor:
        dtype = schedule_dtype(device)
        if t is None:
            u = torch.rand((), generator=generator, device=generator.device if generator else device, dtype=dtype)
            return torch.remainder(u.to(device) + torch.arange(batch, device=device, dtype=dtype) / batch, 1.0)
        t = torch.as_tensor(t, device=device).to(dtype)
        if t.shape != (batch,):
            raise ValueError(f"`t` must have shape ({batch},), got {tuple(t.shape)}.")
        if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
            raise ValueError(f"`t` must hold times in [0, 1], got values in [{t.min().item()}, {t.max().item()}].")
        return t

    def _check_class_labels(
        self, class_labels: torch.Tensor | None, batch: int, device: torch.device
    ) -> torch.Tensor | None:
        if not self.is_class_conditional:
            if class_labels is not None:
                raise ValueError(
                    "`class_labels` were given, but neither the denoiser nor the encoder is class-conditional "
                    "(their `num_class_embeds` is None)."
                )
            return None
        if class_labels is None:
            raise ValueError(
                "This model is class-conditional (`num_class_embeds` is set): pass `class_labels` of shape "
                f"({batch},) for the conditional ELBO."
            )
        if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (batch,):
            shape = tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__
            raise ValueError(f"`class_labels` must be an integer tensor of shape ({batch},), got {shape}.")
        return class_labels.to(device)

    @staticmethod
    def _check_or_sample_noise(
        noise: torch.Tensor | None, name: str, x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        if noise is None:
            return randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if noise.shape != x.shape:
            raise ValueError(f"`{name}` must have the images' shape {tuple(x.shape)}, got {tuple(noise.shape)}.")
        return noise.to(x.dtype)


def _num_classes(model: nn.Module | None) -> int | None:
    """The `num_class_embeds` of a model's config (None: unconditional, or no such config)."""
    return getattr(getattr(model, "config", None), "num_class_embeds", None)


def network_classes(*models: nn.Module | None) -> tuple[int | None, bool]:
    """(K, whether there is a null class) of the first class-conditional network among ``models`` (a config with
    `num_class_embeds`); (None, False) if none is. :class:`DiffEncObjective` requires its conditional networks to
    agree on both."""
    for model in models:
        if _num_classes(model) is not None:
            return int(_num_classes(model)), bool(model.config.get("null_class", False))
    return None, False


@contextlib.contextmanager
def networks_in_eval_mode(objective: DiffEncObjective) -> Iterator[None]:
    """The objective's denoiser and encoder in eval mode (no dropout) within the block; afterwards each is back
    in the mode it had."""
    networks = [module for module in (objective.unet, objective.encoder) if module is not None]
    modes = [module.training for module in networks]
    try:
        for module in networks:
            module.eval()
        yield
    finally:
        for module, training in zip(networks, modes, strict=True):
            module.train(training)


def _labels_for(model: nn.Module, class_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"class_labels": labels}`` for a class-conditional model, ``{}`` for an unconditional one."""
    return {"class_labels": class_labels} if _num_classes(model) is not None else {}


def _twice(class_labels: torch.Tensor | None) -> torch.Tensor | None:
    """The labels of a batch concatenated with itself (the two-time evaluations), or None."""
    return None if class_labels is None else torch.cat([class_labels, class_labels])
