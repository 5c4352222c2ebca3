"""Training-step time and peak memory: VDM, non-trainable and trainable DiffEnc; fp32 and bf16; torch.compile.

One step is what training does per batch: `DiffEncObjective` on a uint8 batch (continuous-time ELBO; t, noise and
the reconstruction noise drawn inside), ``loss.backward()``, an AdamW step and ``zero_grad``. The three model kinds
use the same denoiser; the trainable DiffEnc adds the encoder (its dy/dgamma by forward-mode AD). bf16 runs the
networks under ``torch.autocast`` (the ELBO terms stay in float32). With ``--compile on`` the denoiser is compiled
(``unet.compile()``, default mode); its first step, which compiles, is reported separately. The encoder stays eager:
dynamo cannot trace its custom forward-mode GroupNorm and convolution (graph breaks), and compiling the whole
jvp-and-backward of the encoder failed in torch 2.13 ("ZeroTensors are immutable" in the compiled backward of the
attention) after a quarter of an hour of compiling on CPU.

The bpd check evaluates the same perturbed models on the same batch and the same draws in fp32 and under bf16
autocast, and reports the relative difference of the mean bits/dim.

Examples::

    PYTHONPATH=. python benchmarks/bench_training.py --preset cpu --threads 1 --clock cpu
    PYTHONPATH=. python benchmarks/bench_training.py --preset cifar10 --batch-size 2 --dtype fp32 --compile off
    PYTHONPATH=. python benchmarks/bench_training.py --preset cifar10 --device cuda --compile off on
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from common import (
    DTYPES,
    PRESETS,
    Ratio,
    Timing,
    add_common_arguments,
    batch_size,
    build_encoder,
    build_unet,
    environment,
    num_parameters,
    paired_ratio,
    peak_memory_bytes,
    perturb_,
    print_table,
    print_targets,
    random_images,
    setup,
    synchronize,
    time_interleaved,
    verdict,
    write_json,
)

from diffenc_diffusers import DiffEncObjective, VDMScheduler
from diffenc_diffusers.forward_processes import forward_process

KINDS = {"none": "VDM", "nontrainable": "DiffEnc non-trainable", "trainable": "DiffEnc trainable"}
"""Scheduler `encoder_type` -> label."""

TRAINABLE_OVER_VDM_TARGET = 1.35
BF16_SPEEDUP_TARGET = 1.5
BPD_RELATIVE_DIFFERENCE_TARGET = 0.01


@dataclass
class Variant:
    """One measured configuration and its step function."""

    kind: str
    dtype: str
    compiled: bool
    step: Callable[[], None]
    num_params: int
    first_step_s: float = 0.0

    @property
    def name(self) -> str:
        """Key of the variant in timings and JSON."""
        return f"{self.kind}/{self.dtype}/{'compiled' if self.compiled else 'eager'}"


def on_off(flag: bool) -> str:
    """The table's word for a flag: on or off."""
    return "on" if flag else "off"


def build_objective(args: argparse.Namespace, kind: str, device: torch.device) -> DiffEncObjective:
    """The preset's denoiser (and encoder for the trainable kind) in a `DiffEncObjective`, on ``device``."""
    preset = PRESETS[args.preset]
    encoder = build_encoder(preset, args.seed + 1) if forward_process(kind).needs_encoder else None
    objective = DiffEncObjective(build_unet(preset, args.seed), VDMScheduler(encoder_type=kind), encoder)
    return objective.to(device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype``, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_variant(
    args: argparse.Namespace, kind: str, dtype_name: str, compiled: bool, images: torch.Tensor, device: torch.device
) -> Variant:
    """A training step (objective forward, backward, AdamW step) with its own models and optimizer."""
    objective = build_objective(args, kind, device)
    if compiled:
        objective.unet.compile()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    dtype = DTYPES[dtype_name]

    def step() -> None:
        with autocast(device, dtype):
            output = objective(images)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Variant(kind, dtype_name, compiled, step, num_parameters(objective))


def bpd_check(args: argparse.Namespace, images: torch.Tensor, device: torch.device) -> list[dict[str, float | str]]:
    """Mean bits/dim of the same perturbed models and draws in fp32 and under bf16 autocast, per kind."""
    results = []
    for kind in args.kinds:
        objective = build_objective(args, kind, device).eval()
        perturb_(objective, args.seed + 2)
        bpd = {}
        for dtype_name in ("fp32", "bf16"):
            generator = torch.Generator(device).manual_seed(args.seed + 3)
            with torch.no_grad(), autocast(device, DTYPES[dtype_name]):
                bpd[dtype_name] = objective(images, generator=generator).bpd.mean().item()
        difference = abs(bpd["bf16"] - bpd["fp32"]) / abs(bpd["fp32"])
        results.append(
            {"kind": kind, "bpd_fp32": bpd["fp32"], "bpd_bf16": bpd["bf16"], "relative_difference": difference}
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_repeats=5, default_dtypes=["fp32", "bf16"], dtype_choices=["fp32", "bf16"])
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="model kinds")
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"], help="torch.compile")
    parser.add_argument("--no-bpd-check", action="store_true", help="skip the fp32 / bf16 bits/dim comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    args = parser.parse_args()
    device = setup(args)
    preset = PRESETS[args.preset]
    batch = batch_size(args)
    images = random_images(preset, batch, args.seed, device)

    variants = [
        make_variant(args, kind, dtype_name, mode == "on", images, device)
        for mode in args.compile
        for dtype_name in args.dtype
        for kind in args.kinds
    ]
    for variant in variants:
        synchronize(device)
        start = time.perf_counter()
        variant.step()
        synchronize(device)
        variant.first_step_s = time.perf_counter() - start
    timings: dict[str, Timing] = time_interleaved(
        {variant.name: variant.step for variant in variants}, args.repeats, args.warmup, device
    )
    peaks = {} if args.no_memory else {variant.name: peak_memory_bytes(variant.step, device) for variant in variants}

    def timing_of(kind: str, dtype_name: str, compiled: bool) -> Timing | None:
        return timings.get(f"{kind}/{dtype_name}/{'compiled' if compiled else 'eager'}")

    rows, records = [], []
    for variant in variants:
        timing = timings[variant.name]
        vdm = timing_of("none", variant.dtype, variant.compiled)
        fp32 = timing_of(variant.kind, "fp32", variant.compiled)
        over_vdm = paired_ratio(timing, vdm, args.clock) if vdm is not None else None
        bf16_speedup = paired_ratio(fp32, timing, args.clock) if variant.dtype == "bf16" and fp32 is not None else None
        peak = peaks.get(variant.name)
        records.append(
            {
                "kind": variant.kind,
                "dtype": variant.dtype,
                "compiled": variant.compiled,
                "parameters": variant.num_params,
                "first_step_s": variant.first_step_s,
                **timing.summary(),
                "images_per_second": batch / timing.median(args.clock),
                "over_vdm": None if over_vdm is None else asdict(over_vdm),
                "bf16_speedup": None if bf16_speedup is None else asdict(bf16_speedup),
                "peak_memory_mib": None if peak is None else peak / 2**20,
            }
        )
        rows.append(
            [
                KINDS[variant.kind],
                variant.dtype,
                on_off(variant.compiled),
                f"{variant.num_params / 1e6:.2f}",
                f"{variant.first_step_s:.1f}",
                f"{1e3 * timing.median('wall'):.0f}",
                f"{1e3 * timing.median('cpu'):.0f}" if device.type == "cpu" else "-",
                f"{batch / timing.median(args.clock):.1f}",
                "-" if over_vdm is None else str(over_vdm),
                "-" if bf16_speedup is None else str(bf16_speedup),
                "-" if peak is None else f"{peak / 2**20:.0f}",
            ]
        )
    title = (
        f"Training step, preset {args.preset} ({preset.description}), batch {batch}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}; ratios use {args.clock} time"
    )
    header = ["model", "dtype", "compile", "params (M)", "first step (s)", "wall (ms)", "cpu (ms)", "images/s"]
    print_table(title, [*header, "vs VDM", "bf16 speedup", "peak (MiB)"], rows)

    bpd = [] if args.no_bpd_check or "bf16" not in args.dtype else bpd_check(args, images, device)
    if bpd:
        print_table(
            "Same models, batch and draws: mean bits/dim in fp32 and under bf16 autocast",
            ["model", "fp32 bpd", "bf16 bpd", "relative difference"],
            [
                [
                    KINDS[r["kind"]],
                    f"{r['bpd_fp32']:.4f}",
                    f"{r['bpd_bf16']:.4f}",
                    f"{100 * r['relative_difference']:.3f}%",
                ]
                for r in bpd
            ],
        )

    targets = []
    for record in records:
        if forward_process(record["kind"]).needs_encoder and record["over_vdm"] is not None:
            ratio = Ratio(**record["over_vdm"])
            targets.append(
                f"trainable DiffEnc step / VDM step ({record['dtype']}, compile {on_off(record['compiled'])}): "
                f"{ratio} <= {TRAINABLE_OVER_VDM_TARGET}: {verdict(ratio.median <= TRAINABLE_OVER_VDM_TARGET)}"
            )
        if record["bf16_speedup"] is not None:
            ratio = Ratio(**record["bf16_speedup"])
            targets.append(
                f"bf16 speedup over fp32 ({KINDS[record['kind']]}, compile {on_off(record['compiled'])}): "
                f"{ratio} >= {BF16_SPEEDUP_TARGET}: {verdict(ratio.median >= BF16_SPEEDUP_TARGET)}"
            )
    for r in bpd:
        passed = r["relative_difference"] <= BPD_RELATIVE_DIFFERENCE_TARGET
        targets.append(
            f"bf16 bpd within 1% of fp32 ({KINDS[r['kind']]}): {100 * r['relative_difference']:.3f}%: {verdict(passed)}"
        )
    print_targets(preset, targets)
    env = environment(args, device)
    if device.type == "cpu" and "bf16" in args.dtype and not env["cpu_native_bf16"]:
        print("  note: this CPU has no native bf16 instructions (no AVX512-BF16/AMX); oneDNN emulates bf16.")
    write_json(
        args.json, {"environment": env, "batch_size": batch, "rows": records, "bpd_check": bpd, "targets": targets}
    )


if __name__ == "__main__":
    main()
