"""Sampling time per step: `DiffEncPipeline` against the bare denoiser, and DiffEnc against VDM sampling.

Five things are timed on the same batch and the same denoiser (round-robin, medians):

- ``denoiser``: ``num_inference_steps`` forward passes of the denoiser alone, at the steps' gammas, no_grad;
- ``VDM pipeline`` / ``DiffEnc pipeline``: ``pipe(batch_size=, num_inference_steps=, generator=, output_type="pt")``
  with a VDM scheduler (``encoder_type="none"``) and a trainable-DiffEnc scheduler (no encoder is needed to
  sample); per step = the call's time / ``num_inference_steps``;
- ``VDM scheduler.step`` / ``DiffEnc scheduler.step``: the scheduler's steps alone on a fixed network output.

The scheduler overhead of a pipeline step is (pipeline step - denoiser step) / pipeline step, and, measured
directly, scheduler.step / pipeline step. DiffEnc sampling costs the same as VDM sampling by construction (the
DiffEnc step differs by one scalar coefficient), which the DiffEnc / VDM ratio checks. Both ratios are medians of
per-round ratios (see `common.paired_ratio`). On a shared machine one denoiser call's time moves by several percent
from round to round, more than the 2% to be resolved, so the script also compares the two pipelines' work
exactly: the ATen operations one call of each runs, in order, with their input shapes (torch.profiler). The only
ones allowed to differ are those on per-step schedule scalars (tensors of at most num_inference_steps + 1
elements: `set_timesteps` computes the DiffEnc step's extra coefficient once per call); every operation on
images is the same.

Examples::

    PYTHONPATH=. python benchmarks/bench_sampling.py --preset cpu --threads 1 --clock cpu
    PYTHONPATH=. python benchmarks/bench_sampling.py --preset cifar10 --device cuda --dtype fp32 bf16
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable
from dataclasses import asdict

import torch
from common import (
    DTYPES,
    PRESETS,
    add_common_arguments,
    batch_size,
    build_unet,
    environment,
    paired_ratio,
    perturb_,
    print_table,
    print_targets,
    setup,
    time_interleaved,
    verdict,
    write_json,
)
from torch.profiler import ProfilerActivity, profile

from diffenc_diffusers import DiffEncPipeline, VDMScheduler, VDMUNetModel

KINDS = {"VDM": "none", "DiffEnc": "trainable"}
"""Label -> scheduler `encoder_type` (every DiffEnc kind samples with the same step)."""

SCHEDULER_OVERHEAD_TARGET = 0.03
DIFFENC_OVER_VDM_TARGET = 0.02


def sampling_functions(
    args: argparse.Namespace, unet: VDMUNetModel, batch: int, device: torch.device
) -> dict[str, Callable[[], object]]:
    """The measured functions for one denoiser (already on ``device`` in its dtype)."""
    steps = args.num_inference_steps
    schedulers = {kind: VDMScheduler(encoder_type=encoder_type) for kind, encoder_type in KINDS.items()}
    pipelines = {kind: DiffEncPipeline(unet=unet, scheduler=VDMScheduler(encoder_type=kind)) for kind in KINDS.values()}
    for pipe in pipelines.values():
        pipe.set_progress_bar_config(disable=True)

    latent_dtype = torch.promote_types(unet.dtype, torch.float32)
    shape = (batch, *pipelines["none"].image_shape)
    generator = torch.Generator(device).manual_seed(args.seed)
    sample = torch.randn(shape, generator=generator, device=device, dtype=latent_dtype)
    model_output = torch.randn(shape, generator=generator, device=device, dtype=latent_dtype)
    schedulers["VDM"].set_timesteps(steps, device=device)
    gammas = [schedulers["VDM"].gamma(t).to(latent_dtype).expand(batch) for t in schedulers["VDM"].timesteps]

    @torch.no_grad()
    def denoiser() -> None:
        for gamma in gammas:
            unet(sample.to(unet.dtype), gamma)

    def scheduler_steps(scheduler: VDMScheduler) -> Callable[[], object]:
        def call() -> object:
            scheduler.set_timesteps(steps, device=device)
            latent = sample
            for t in scheduler.timesteps:
                latent = scheduler.step(model_output, t, latent, generator=generator, eta=args.eta).prev_sample
            return latent

        return call

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
        **{f"{kind} pipeline": pipeline_call(pipelines[encoder_type]) for kind, encoder_type in KINDS.items()},
        **{f"{kind} scheduler.step": scheduler_steps(scheduler) for kind, scheduler in schedulers.items()},
    }


def operation_trace(function: Callable[[], object]) -> list[tuple[str, tuple[tuple[int, ...], ...]]]:
    """The ATen operations one call of ``function`` runs, in order, each with the shapes of its tensor inputs."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        function()
    events = sorted(prof.events(), key=lambda event: event.time_range.start)
    return [
        (event.name, tuple(tuple(shape) for shape in event.input_shapes if shape))
        for event in events
        if event.name.startswith("aten::")
    ]


def differing_operations(
    first: list[tuple[str, tuple[tuple[int, ...], ...]]], second: list[tuple[str, tuple[tuple[int, ...], ...]]]
) -> list[tuple[str, tuple[tuple[int, ...], ...]]]:
    """The operations that one trace has and the other has not (aligned as in a diff)."""
    matcher = difflib.SequenceMatcher(a=first, b=second, autojunk=False)
    return [
        operation
        for tag, a_start, a_end, b_start, b_end in matcher.get_opcodes()
        if tag != "equal"
        for operation in (*first[a_start:a_end], *second[b_start:b_end])
    ]


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
        unet = perturb_(build_unet(preset, args.seed), args.seed + 1).to(device=device, dtype=DTYPES[dtype_name])
        functions = sampling_functions(args, unet.eval(), batch, device)
        traces = {kind: operation_trace(functions[f"{kind} pipeline"]) for kind in KINDS}
        differing = differing_operations(traces["VDM"], traces["DiffEnc"])
        largest_differing = max((math.prod(shape) for _, shapes in differing for shape in shapes), default=0)
        same_image_work = largest_differing <= steps + 1
        timings = time_interleaved(functions, args.repeats, args.warmup, device)
        per_step = {name: timing.median(args.clock) / steps for name, timing in timings.items()}
        vdm_step = per_step["VDM pipeline"]
        denoiser_share = paired_ratio(timings["denoiser"], timings["VDM pipeline"], args.clock)
        pipeline_overhead = 1.0 - denoiser_share.median
        scheduler_share = {kind: per_step[f"{kind} scheduler.step"] / vdm_step for kind in KINDS}
        diffenc_over_vdm = paired_ratio(timings["DiffEnc pipeline"], timings["VDM pipeline"], args.clock)
        for name, timing in timings.items():
            rows.append(
                [
                    dtype_name,
                    name,
                    f"{1e3 * timing.median('wall') / steps:.2f}",
                    f"{1e3 * timing.median('cpu') / steps:.2f}" if device.type == "cpu" else "-",
                    f"{100 * per_step[name] / vdm_step:.2f}%",
                    f"{batch / (steps * per_step[name]):.2f}" if name.endswith("pipeline") else "-",
                ]
            )
        records.append(
            {
                "dtype": dtype_name,
                "per_step_ms": {name: 1e3 * value for name, value in per_step.items()},
                "images_per_second": {kind: batch / (steps * per_step[f"{kind} pipeline"]) for kind in KINDS},
                "timings": {name: timing.summary() for name, timing in timings.items()},
                "denoiser_share": asdict(denoiser_share),
                "pipeline_minus_denoiser_share": pipeline_overhead,
                "scheduler_step_share": scheduler_share,
                "diffenc_over_vdm": asdict(diffenc_over_vdm),
                "aten_operations": {kind: len(trace) for kind, trace in traces.items()},
                "differing_operations": [name for name, _ in differing],
                "largest_differing_input_elements": largest_differing,
            }
        )
        targets += [
            f"scheduler overhead of a sampling step ({dtype_name}): (pipeline - denoiser) / pipeline "
            f"{100 * pipeline_overhead:.2f}% (IQR {100 * (1 - denoiser_share.upper_quartile):.2f}% to "
            f"{100 * (1 - denoiser_share.lower_quartile):.2f}%; scheduler.step alone: "
            f"VDM {100 * scheduler_share['VDM']:.2f}%, DiffEnc {100 * scheduler_share['DiffEnc']:.2f}%) <= 3%: "
            f"{verdict(pipeline_overhead <= SCHEDULER_OVERHEAD_TARGET)}",
            f"DiffEnc sampling / VDM sampling ({dtype_name}): {diffenc_over_vdm}, within 2%: "
            f"{verdict(abs(diffenc_over_vdm.median - 1.0) <= DIFFENC_OVER_VDM_TARGET)}",
            f"DiffEnc and VDM pipelines run the same ATen operations on images ({dtype_name}; of "
            f"{len(traces['VDM'])} and {len(traces['DiffEnc'])} operations, {len(differing)} differ, on inputs of at "
            f"most {largest_differing} elements): {'yes' if same_image_work else 'NO'}",
        ]

    title = (
        f"Sampling, preset {args.preset} ({preset.description}), batch {batch}, {steps} steps, eta {args.eta}, "
        f"{device}, {torch.get_num_threads()} threads, median of {args.repeats}; shares use {args.clock} time"
    )
    print_table(title, ["dtype", "measured", "wall ms/step", "cpu ms/step", "of a VDM pipeline step", "images/s"], rows)
    print_targets(preset, targets)
    write_json(
        args.json,
        {"environment": environment(args, device), "batch_size": batch, "results": records, "targets": targets},
    )


if __name__ == "__main__":
    main()
