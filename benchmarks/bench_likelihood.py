"""Likelihood throughput: images per second of `DiffEncPipeline.bits_per_dim` for VDM and DiffEnc.

Each kind gets a pipeline with the same denoiser (and, for the trainable DiffEnc, the preset's encoder, whose
dy/dgamma the continuous-time ELBO needs); ``pipe.bits_per_dim(images, batch_size=...)`` runs over the same uint8
images (round-robin, medians). In fp16/bf16 the networks are cast to that dtype and the pipeline runs them under
autocast.

Examples::

    PYTHONPATH=. python benchmarks/bench_likelihood.py --preset cpu --threads 1 --clock cpu
    PYTHONPATH=. python benchmarks/bench_likelihood.py --preset cifar10 --device cuda --num-images 1024 --dtype bf16
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict

import torch
from common import (
    DTYPES,
    PRESETS,
    add_common_arguments,
    batch_size,
    build_encoder,
    build_unet,
    environment,
    paired_ratio,
    print_table,
    random_images,
    setup,
    time_interleaved,
    write_json,
)

from diffenc_diffusers import DiffEncPipeline, VDMScheduler
from diffenc_diffusers.forward_processes import forward_process

KINDS = {"none": "VDM", "nontrainable": "DiffEnc non-trainable", "trainable": "DiffEnc trainable"}
"""Scheduler `encoder_type` -> label."""


def likelihood_function(
    args: argparse.Namespace, kind: str, dtype: torch.dtype, images: torch.Tensor, device: torch.device
) -> Callable[[], object]:
    """``pipe.bits_per_dim`` over ``images`` for one model kind."""
    preset = PRESETS[args.preset]
    encoder = build_encoder(preset, args.seed + 1) if forward_process(kind).needs_encoder else None
    pipe = DiffEncPipeline(
        unet=build_unet(preset, args.seed), scheduler=VDMScheduler(encoder_type=kind), encoder=encoder
    )
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    batch = batch_size(args)

    def call() -> object:
        generator = torch.Generator(device).manual_seed(args.seed)
        return pipe.bits_per_dim(images, batch_size=batch, num_timesteps=args.num_timesteps, generator=generator)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_repeats=5, default_dtypes=["fp32"])
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="model kinds")
    parser.add_argument("--num-images", type=int, default=None, help="images per call (default: 4 batches)")
    parser.add_argument("--num-timesteps", type=int, default=None, help="T of the diffusion loss (default: continuous)")
    args = parser.parse_args()
    device = setup(args)
    preset = PRESETS[args.preset]
    batch = batch_size(args)
    num_images = args.num_images if args.num_images is not None else 4 * batch
    images = random_images(preset, num_images, args.seed, device)

    functions = {
        f"{kind}/{dtype_name}": likelihood_function(args, kind, DTYPES[dtype_name], images, device)
        for dtype_name in args.dtype
        for kind in args.kinds
    }
    timings = time_interleaved(functions, args.repeats, args.warmup, device)

    rows, records = [], []
    for name, timing in timings.items():
        kind, dtype_name = name.split("/")
        seconds = timing.median(args.clock)
        vdm = timings.get(f"none/{dtype_name}")
        over_vdm = paired_ratio(timing, vdm, args.clock) if vdm is not None else None
        records.append(
            {
                "kind": kind,
                "dtype": dtype_name,
                "images_per_second": num_images / seconds,
                "over_vdm": None if over_vdm is None else asdict(over_vdm),
                **timing.summary(),
            }
        )
        rows.append(
            [
                KINDS[kind],
                dtype_name,
                f"{num_images / seconds:.1f}",
                f"{1e3 * seconds / num_images:.1f}",
                "-" if over_vdm is None else str(over_vdm),
            ]
        )
    diffusion = "continuous time" if args.num_timesteps is None else f"T = {args.num_timesteps}"
    title = (
        f"bits_per_dim, preset {args.preset} ({preset.description}), {num_images} images in batches of {batch}, "
        f"{diffusion}, {device}, {torch.get_num_threads()} threads, median of {args.repeats} ({args.clock} time)"
    )
    print_table(title, ["model", "dtype", "images/s", "ms/image", "time vs VDM"], rows)
    write_json(
        args.json,
        {"environment": environment(args, device), "batch_size": batch, "num_images": num_images, "rows": records},
    )


if __name__ == "__main__":
    main()
