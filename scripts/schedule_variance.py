"""Variance of the continuous-time loss estimate of a trained pipeline under its schedule and the linear one.

The continuous-time ELBO depends on the schedule only through its ends, so a pipeline's networks give the same
expected bits/dim under its (learned monotone) schedule and under the linear schedule between the same ends; the
schedules differ in the variance of the one-sample estimate. This script draws, for every test image, ``--draws``
independent (t ~ U(0, 1), eps, eps_0) and evaluates both schedules on the same draws (common random numbers).

    python3 scripts/schedule_variance.py --pipeline outputs/digits-vdm-monotone --output_json variance.json

With ``--fit_steps N`` and a pipeline whose schedule is linear, a monotone schedule with the same (fixed) ends
is first fitted to the frozen networks: N Adam steps on the variance gradient, on the digits training split.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from diffenc_diffusers import DiffEncObjective, DiffEncPipeline, VDMScheduler
from diffenc_diffusers.data import load_digits_uint8

LINEAR_OVERRIDES = {
    "schedule": "fixed_linear",
    "learn_endpoints": None,
    "monotone_num_features": None,
    "monotone_l2_weight": None,
    "monotone_l2_bias": None,
    "monotone_l3_weight": None,
}


def fit_monotone(pipe: DiffEncPipeline, steps: int, lr: float, batch_size: int, seed: int) -> VDMScheduler:
    """A learned_monotone scheduler with the pipeline's ends, its interior fitted to the frozen networks."""
    scheduler = VDMScheduler.from_config(
        pipe.scheduler.config, **{**LINEAR_OVERRIDES, "schedule": "learned_monotone", "learn_endpoints": False}
    )
    objective = DiffEncObjective(pipe.unet, scheduler, pipe.encoder).eval()
    objective.requires_grad_(False)
    objective.monotone_schedule.requires_grad_(True)
    optimizer = torch.optim.Adam(objective.monotone_schedule.parameters(), lr=lr)
    train = load_digits_uint8("train")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = train[torch.randint(len(train), (batch_size,), generator=generator)]
        optimizer.zero_grad()
        objective(batch, generator=generator).loss.backward()
        optimizer.step()
    return objective.export_scheduler()


@torch.no_grad()
def draw_terms(objective: DiffEncObjective, images: torch.Tensor, draws: int, seed: int) -> dict[str, torch.Tensor]:
    """loss_diff and bpd of every image for ``draws`` iid draws of (t, eps, eps_0): shape (draws, N) each."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"loss_diff": [], "bpd": []}
    for _ in range(draws):
        t = torch.rand(len(images), generator=generator, dtype=torch.float64)
        noise = torch.randn(images.shape, generator=generator)
        recon_noise = torch.randn(images.shape, generator=generator)
        out = objective(images, t=t, noise=noise, recon_noise=recon_noise)
        for term in rows:
            rows[term].append(getattr(out, term).double())
    return {term: torch.stack(values) for term, values in rows.items()}


def summary(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    bpd, diff = terms["bpd"], terms["loss_diff"]
    return {
        "bpd": bpd.mean().item(),
        "bpd_se": (bpd.std() / math.sqrt(bpd.numel())).item(),
        # the variance of one image's one-sample estimate, averaged over images (bits/dim squared)
        "var_per_image": diff.var(dim=0).mean().item(),
        # the variance of the estimate over images and draws together
        "var_total": bpd.var().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a saved DiffEncPipeline folder")
    parser.add_argument("--num_images", type=int, default=300, help="digits test images (at most 300)")
    parser.add_argument("--draws", type=int, default=64, help="independent draws per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit_steps", type=int, default=0, help="fit a monotone schedule to a linear pipeline")
    parser.add_argument("--fit_lr", type=float, default=0.01)
    parser.add_argument("--output_json", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(1)
    pipe = DiffEncPipeline.from_pretrained(args.pipeline)
    if args.fit_steps:
        if pipe.scheduler.config.schedule == "learned_monotone":
            raise ValueError("--fit_steps needs a pipeline with a linear schedule; this one is learned_monotone.")
        monotone = fit_monotone(pipe, args.fit_steps, args.fit_lr, 64, args.seed)
    elif pipe.scheduler.config.schedule == "learned_monotone":
        monotone = pipe.scheduler
    else:
        raise ValueError("The pipeline's schedule is linear: pass --fit_steps N to fit a monotone one.")
    linear = VDMScheduler.from_config(monotone.config, **LINEAR_OVERRIDES)
    images = load_digits_uint8("test")[: args.num_images]

    terms = {}
    for name, scheduler in (("monotone", monotone), ("linear", linear)):
        objective = DiffEncObjective(pipe.unet, scheduler, pipe.encoder).eval()
        terms[name] = draw_terms(objective, images, args.draws, args.seed + 1)
    difference = terms["monotone"]["bpd"] - terms["linear"]["bpd"]
    result = {
        "pipeline": args.pipeline,
        "gamma_min": monotone.config.gamma_min,
        "gamma_max": monotone.config.gamma_max,
        "num_images": len(images),
        "draws": args.draws,
        "fit_steps": args.fit_steps,
        **{name: summary(values) for name, values in terms.items()},
        "bpd_difference": difference.mean().item(),
        "bpd_difference_se": (difference.std() / math.sqrt(difference.numel())).item(),
    }
    result["variance_ratio_linear_over_monotone"] = (
        result["linear"]["var_per_image"] / result["monotone"]["var_per_image"]
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_json:
        args.output_json.write_text(text + "\n")


if __name__ == "__main__":
    main()
