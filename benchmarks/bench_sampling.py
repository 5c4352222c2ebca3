"""Sampling time per step: `DiffEncPipeline` against the bare denoiser, and DiffEnc against VDM sampling.

Four things are timed on the same batch and the same denoiser (round-robin, medians):

- ``denoiser``: ``num_inference_steps`` forward passes of the denoiser alone, at the steps' gammas, no_grad;
- ``VDM pipeline`` / ``DiffEnc pipeline``: ``pipe(batch_size=, num_inference_steps=, generator=, output_type="pt")``
  with a VDM scheduler (``encoder_type="none"``) and a trainable-DiffEnc scheduler (no encoder is needed to
  sample); per step = the call's time / ``num_inference_steps``;
- ``scheduler.step``: the scheduler's steps alone on a fixed network output.

The scheduler overhead of a pipeline step is (pipeline step - denoiser step) / pipeline step, and, measured
directly, scheduler.step / pipeline step. DiffEnc sampling costs the same as VDM sampling by construction (the
DiffEnc step differs by one scalar coefficient), which the DiffEnc / VDM ratio checks.

Examples::

    PYTHONPATH=. python benchmarks/bench_sampling.py --preset cpu --threads 1 --clock cpu
    PYTHONPATH=. python benchmarks/bench_sampling.py --preset cifar10 --device cuda --dtype fp32 bf16
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import (
    DTYPES,
    PRESETS,
    add_common_arguments,
    batch_size,
    build_unet,
    environment,
    print_table,
    print_targets,
    setup,
    time_interleaved,
    verdict,
    write_json,
)

from diffenc_diffusers import DiffEncPipeline, VDMScheduler, VDMUNetModel

SCHEDULER_OVERHEAD_TARGET = 0.03
DIFFENC_OVER_VDM_TARGET = 0.02


def sampling_functions(
    args: argparse.Namespace, unet: VDMUNetModel, batch: int, device: torch.device
) -> dict[str, Callable[[], object]]:
    """The four measured functions for one denoiser (already on ``device`` in its dtype)."""
    steps = args.num_inference_steps
    pipelines = {
        "VDM pipeline": DiffEncPipeline(unet=unet, scheduler=VDMScheduler(encoder_type="none")),
        "DiffEnc pipeline": DiffEncPipeline(unet=unet, scheduler=VDMScheduler(encoder_type="trainable")),
    }
    for pipe in pipelines.values():
        pipe.set_progress_bar_config(disable=True)

    scheduler = VDMScheduler(encoder_type="trainable")
    scheduler.set_timesteps(steps, device=device)
    latent_dtype = torch.promote_types(unet.dtype, torch.float32)
    shape = (batch, *pipelines["VDM pipeline"].image_shape)
    generator = torch.Generator(device).manual_seed(args.seed)
    sample = torch.randn(shape, generator=generator, device=device, dtype=latent_dtype)
    gammas = [scheduler.gamma(t).to(latent_dtype).expand(batch) for t in scheduler.timesteps]
    model_output = torch.randn(shape, generator=generator, device=device, dtype=latent_dtype)

    @torch.no_grad()
    def denoiser() -> None:
        for gamma in gammas:
            unet(sample.to(unet.dtype), gamma)

    def scheduler_steps() -> None:
        scheduler.set_timesteps(steps, device=device)
        latent = sample
        for t in scheduler.timesteps:
            latent = scheduler.step(model_output, t, latent, generator=generator, eta=args.eta).prev_sample

    def pipeline_call(pipe: DiffEncPipeline) -> Callable[[], object]:
        def call() -> object:
            return pipe(
                batch_size=batch,
                num_inference_steps=steps,
                generator=torch.Generator(device).manual_seed(args.seed),
                output_type="pt",
                eta=args.eta,
            )

        return call

    return {
        "denoiser": denoiser,
        **{name: pipeline_call(pipe) for name, pipe in pipelines.items()},
        "scheduler.step": scheduler_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_repeats=5, default_dtypes=["fp32"])
    parser.add_argument("--num-inference-steps", type=int, default=20, help="reverse steps per sampling call")
    parser.add_argument("--eta", type=float, default=1.0, help="1: ancestral sampler, 0: deterministic")
    args = parser.parse_args()
    device = setup(args)
    preset = PRESETS[args.preset]
    batch = batch_size(args)
    steps = args.num_inference_steps

    rows, records, targets = [], [], []
    for dtype_name in args.dtype:
        unet = build_unet(preset, args.seed).to(device=device, dtype=DTYPES[dtype_name]).eval()
        timings = time_interleaved(sampling_functions(args, unet, batch, device), args.repeats, args.warmup, device)
        per_step = {name: timing.median(args.clock) / steps for name, timing in timings.items()}
        vdm_step = per_step["VDM pipeline"]
        difference_overhead = (vdm_step - per_step["denoiser"]) / vdm_step
        scheduler_share = per_step["scheduler.step"] / vdm_step
        diffenc_over_vdm = per_step["DiffEnc pipeline"] / vdm_step
        for name, timing in timings.items():
            rows.append(
                [
                    dtype_name,
                    name,
                    f"{1e3 * timing.median('wall') / steps:.2f}",
                    f"{1e3 * timing.median('cpu') / steps:.2f}" if device.type == "cpu" else "-",
                    f"{100 * per_step[name] / vdm_step:.1f}%",
                ]
            )
        records.append(
            {
                "dtype": dtype_name,
                "per_step_ms": {name: 1e3 * value for name, value in per_step.items()},
                "timings": {name: timing.summary() for name, timing in timings.items()},
                "pipeline_minus_denoiser_share": difference_overhead,
                "scheduler_step_share": scheduler_share,
                "diffenc_over_vdm": diffenc_over_vdm,
            }
        )
        overhead = max(difference_overhead, scheduler_share)
        targets += [
            f"scheduler overhead of a sampling step ({dtype_name}): pipeline - denoiser "
            f"{100 * difference_overhead:.2f}%, scheduler.step {100 * scheduler_share:.2f}% <= 3%: "
            f"{verdict(overhead <= SCHEDULER_OVERHEAD_TARGET)}",
            f"DiffEnc sampling / VDM sampling ({dtype_name}): {diffenc_over_vdm:.3f}, within 2%: "
            f"{verdict(abs(diffenc_over_vdm - 1.0) <= DIFFENC_OVER_VDM_TARGET)}",
        ]

    title = (
        f"Sampling, preset {args.preset} ({preset.description}), batch {batch}, {steps} steps, eta {args.eta}, "
        f"{device}, {torch.get_num_threads()} threads, median of {args.repeats}; shares use {args.clock} time"
    )
    print_table(title, ["dtype", "measured", "wall ms/step", "cpu ms/step", "of a VDM pipeline step"], rows)
    print_targets(preset, targets)
    write_json(
        args.json,
        {"environment": environment(args, device), "batch_size": batch, "results": records, "targets": targets},
    )


if __name__ == "__main__":
    main()
