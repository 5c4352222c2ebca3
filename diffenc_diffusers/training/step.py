"""One training update of :class:`~diffenc_diffusers.DiffEncObjective` with accelerate, and what a loop needs
around it: AdamW parameter groups, EMA weights swapped in for evaluation, a pipeline of the trained networks.

A complete loop of your own (the command line ``training/train_diffenc.py`` is this plus data, checkpoints,
logging and evaluation)::

    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from diffenc_diffusers import DiffEncObjective, DiffEncPipeline
    from diffenc_diffusers.training import TrainingStep, parameter_groups, pipeline_from_objective

    pipe = DiffEncPipeline.from_preset("digits-diffenc-trainable")
    accelerator = Accelerator()
    objective = DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder)
    optimizer = torch.optim.AdamW(parameter_groups(objective, weight_decay=0.01), lr=1e-3, betas=(0.9, 0.99))
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=100)
    prepared, optimizer = accelerator.prepare(objective, optimizer)
    ema = EMAModel(objective.parameters(), decay=0.999)
    step = TrainingStep(accelerator, prepared, optimizer, lr_scheduler, ema, seed=0, max_grad_norm=1.0)
    for global_step in range(1000):
        output = step(batches, global_step)          # batches: an iterator of uint8 (B, C, H, W) tensors
    ema.copy_to(objective.parameters())
    pipeline_from_objective(objective).save_pretrained("my-model")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..objective import DiffEncObjective
from ..pipeline_diffenc import DiffEncPipeline
from .randomness import dropout_seed, step_randomness

TERM_NAMES = ("bpd", "loss_recon", "loss_klz", "loss_diff")
"""The per-image terms of the objective that a step reports, in bits/dim."""


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or an infinity (in the loss, the gradient or the weights); the message names where."""


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


@dataclass
class TrainingStepOutput:
    """What one update reports. The terms are means over every image of the update (all processes, all
    micro-steps), in bits/dim.

    Args:
        bpd: the negative ELBO (the loss that was minimised).
        loss_recon: reconstruction term.
        loss_klz: prior term.
        loss_diff: diffusion term.
        grad_norm: the global gradient norm before clipping (NaN if no gradient was synchronised).
        num_images: images of the update, over all processes and micro-steps.
    """

    bpd: float
    loss_recon: float
    loss_klz: float
    loss_diff: float
    grad_norm: float
    num_images: int


class TrainingStep:
    r"""
    One update of a prepared :class:`~diffenc_diffusers.DiffEncObjective`: `gradient_accumulation_steps` (the
    accelerator's) micro-batches, each with its exact seeded draws, backward, gradient clipping, the optimizer,
    the learning-rate schedule and the EMA.

    The draws of micro-step m of update n (t low-discrepancy over the global batch, eps, eps_0, flips) come from
    :func:`~diffenc_diffusers.training.randomness.step_randomness` keyed by (`seed`, n, m) for the whole global
    batch, of which this process takes its slice; dropout is reseeded per (`seed`, n, m, process). So an update
    is a function of the seed, the step number and the images alone: resuming reproduces it bit for bit, and one
    process with batch 2B computes what two with batch B compute, up to reduction order.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        objective: the objective as returned by `accelerator.prepare` (possibly DDP-wrapped).
        optimizer: the prepared optimizer.
        lr_scheduler: stepped once per update (not prepared: accelerate would step it once per process).
        ema (`diffusers.training_utils.EMAModel`, *optional*): the EMA of every parameter of the objective.
        seed (`int`): the run's seed.
        max_grad_norm (`float`, *optional*): clip the global gradient norm to this; None for no clipping (the norm
            is still computed and reported). The objective's `variance_gradient_parameters()` (a learned monotone
            schedule's interior in continuous time), trained on the gradient of the loss variance, are clipped to
            the same norm on their own, so that their far larger gradient does not shrink the others' (the reported
            norm is that of the others).
        random_flip (`bool`): flip each training image horizontally with probability 1/2 (exact, on uint8).
        class_dropout_prob (`float`): for a class-conditional objective, train each image on the null class
            instead of its label with this probability in [0, 1) (classifier-free guidance, as in Ho & Salimans
            2022: one network learns the conditional and the unconditional model). Needs networks with
            `null_class=True`; 0 trains on the labels only.

    A non-finite loss, or a non-finite gradient norm without a grad scaler (with fp16's scaler such an update is
    skipped and the scale lowered, by design), raises :class:`NonFiniteError` naming the update; the caller must
    then not save the parameters, which the optimizer may already have moved.
    """

    def __init__(
        self,
        accelerator: Any,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        ema: Any = None,
        *,
        seed: int = 0,
        max_grad_norm: float | None = None,
        random_flip: bool = False,
        class_dropout_prob: float = 0.0,
    ):
        if not isinstance(accelerator.unwrap_model(objective), DiffEncObjective):
            raise TypeError(
                f"`objective` must be a DiffEncObjective (as returned by accelerator.prepare), got "
                f"{type(objective).__name__}."
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"`max_grad_norm` must be positive or None (no clipping), got {max_grad_norm!r}.")
        unwrapped = accelerator.unwrap_model(objective)
        if isinstance(class_dropout_prob, bool) or not (
            isinstance(class_dropout_prob, (int, float)) and 0.0 <= class_dropout_prob < 1.0
        ):
            raise ValueError(f"`class_dropout_prob` must be a float in [0, 1), got {class_dropout_prob!r}.")
        if class_dropout_prob > 0 and unwrapped.null_label is None:
            kind = "has no null class (`null_class=False`)" if unwrapped.is_class_conditional else "is unconditional"
            raise ValueError(
                f"`class_dropout_prob={class_dropout_prob}` replaces labels by the null class, but this model {kind}. "
                "Use class_dropout_prob=0, or networks with num_class_embeds and null_class=True."
            )
        self.accelerator = accelerator
        self.objective = objective
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.ema = ema
        self.seed = seed
        self.max_grad_norm = math.inf if max_grad_norm is None else max_grad_norm
        self.random_flip = random_flip
        self.class_dropout_prob = float(class_dropout_prob)
        self.null_label = unwrapped.null_label
        self.is_class_conditional = unwrapped.is_class_conditional
        self.parameters = list(unwrapped.parameters())
        # Parameters trained on the gradient of the loss variance (a monotone schedule's interior) have gradients
        # orders of magnitude above the ELBO gradient's: clipped together, they would shrink the networks' steps.
        variance = {id(p) for p in unwrapped.variance_gradient_parameters()}
        groups = (
            [p for p in self.parameters if id(p) not in variance],
            [p for p in self.parameters if id(p) in variance],
        )
        self._clip_groups = [group for group in groups if group]

    def __call__(self, batches: Iterator[torch.Tensor], step: int) -> TrainingStepOutput:
        """Run update number ``step`` on the next `gradient_accumulation_steps` batches of ``batches``.

        Args:
            batches: yields this process' uint8 images (B, C, H, W), or (images, labels) pairs with int labels
                (B,) (required for a class-conditional objective, ignored by an unconditional one); every process
                must use the same B.
            step: the update's number (0 for the first), which keys its random draws.
        """
        accelerator = self.accelerator
        device = accelerator.device
        rank, world = accelerator.process_index, accelerator.num_processes
        totals = torch.zeros(len(TERM_NAMES) + 1, dtype=torch.float64, device=device)
        grad_norm = torch.tensor(float("nan"))
        synchronised = False
        for micro_step in range(accelerator.gradient_accumulation_steps):
            images, labels = self._images_and_labels(next(batches))
            images = images.to(device, non_blocking=True)
            per_rank = len(images)
            draws = step_randomness(
                self.seed, step, micro_step, per_rank * world, tuple(images.shape[1:]), rank, per_rank
            )
            draws = {name: value.to(device) for name, value in draws.items()}
            if self.random_flip:
                images = torch.where(draws["flip"].view(-1, 1, 1, 1), images.flip(-1), images)
            if labels is not None:
                labels = labels.to(device, non_blocking=True)
                if self.class_dropout_prob > 0:
                    dropped = draws["label_uniform"] < self.class_dropout_prob
                    labels = torch.where(dropped, torch.full_like(labels, self.null_label), labels)
            torch.manual_seed(dropout_seed(self.seed, step, micro_step, rank))
            with accelerator.accumulate(self.objective):
                terms = self.objective(
                    images,
                    t=draws["t"],
                    noise=draws["noise"],
                    recon_noise=draws["recon_noise"],
                    class_labels=labels,
                )
                accelerator.backward(terms.loss)
                if accelerator.sync_gradients:
                    norms = [accelerator.clip_grad_norm_(group, self.max_grad_norm) for group in self._clip_groups]
                    grad_norm, synchronised = norms[0], True
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            # In place, with the image count as a Python number: no tensor made on the host and copied per step.
            totals[:-1] += torch.stack([terms[name].detach().double().sum() for name in TERM_NAMES])
            totals[-1] += per_rank
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.parameters)
        totals = accelerator.reduce(totals, reduction="sum")
        means = {name: (totals[index] / totals[-1]).item() for index, name in enumerate(TERM_NAMES)}
        grad_norm = float(grad_norm)
        if not math.isfinite(means["bpd"]):
            raise NonFiniteError(f"Update {step + 1}: the loss is {means['bpd']} bits/dim (not finite).")
        if synchronised and not math.isfinite(grad_norm) and accelerator.scaler is None:
            raise NonFiniteError(f"Update {step + 1}: the gradient norm is {grad_norm} (not finite).")
        return TrainingStepOutput(**means, grad_norm=grad_norm, num_images=int(totals[-1].item()))

    def _images_and_labels(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, labels) of one batch: labels are None for an unconditional objective, required otherwise."""
        if isinstance(batch, (tuple, list)) and len(batch) != 2:
            raise ValueError(f"A batch given as a sequence must be (images, labels), got {len(batch)} elements.")
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if not self.is_class_conditional:
            return images, None
        if labels is None:
            raise ValueError(
                "This objective is class-conditional: `batches` must yield (images, labels) pairs, got a batch "
                f"of type {type(batch).__name__} without labels."
            )
        if not isinstance(labels, torch.Tensor) or labels.shape != (len(images),):
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(
                f"The labels of a batch of {len(images)} images must have shape ({len(images)},), got {shape}."
            )
        return images, labels


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices and kernels (ndim >= 2), none on biases, norm scales and
    the scalar schedule parameters (as VDM)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextlib.contextmanager
def ema_weights(ema: Any, parameters: list[nn.Parameter]) -> Iterator[None]:
    """Within the block, ``parameters`` hold the EMA's averages; afterwards their own values again."""
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def pipeline_from_objective(objective: DiffEncObjective) -> DiffEncPipeline:
    """A :class:`DiffEncPipeline` of the objective's networks (shared, not copied; switched to eval mode) and
    its current schedule (:meth:`DiffEncObjective.export_scheduler`, so learned endpoints are written back), with
    the progress bar off."""
    objective.unet.eval()
    if objective.encoder is not None:
        objective.encoder.eval()
    pipe = DiffEncPipeline(unet=objective.unet, scheduler=objective.export_scheduler(), encoder=objective.encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
