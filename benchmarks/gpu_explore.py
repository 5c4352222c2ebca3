"""A matrix of speed options for the paper-size training step and sampling step, in one time-capped run.

Built for a short GPU lease: every variant runs under its own time limit (a variant that times out or fails is
recorded with its reason and the run goes on), the run stops starting variants when the total cap is near, and the
table and the JSON (``OUT_DIR/gpu_explore.json``) are rewritten after every variant, so a killed run still leaves
its numbers.

Models: the ``cifar10-vdmv-32`` (VDM) and ``cifar10-diffenc-32-4`` (trainable DiffEnc) preset folders' networks,
32x32x3 images, batch 128. A training step is what the trainer does per batch: `DiffEncObjective` on a uint8 batch,
``loss.backward()``, an AdamW step, ``zero_grad``; bf16 is ``torch.autocast`` over fp32 weights, as in training.

Options a variant combines (``+`` in its name):

- ``cl``: channels_last weights and input;
- ``tf32``: TF32 for fp32 matrix products and convolutions (``torch.backends.*.allow_tf32``);
- ``ckpt``: ``enable_gradient_checkpointing()`` of every network that supports it;
- ``fusedadam``: ``AdamW(fused=True)``;
- ``cunet`` / ``cenc``: regional compilation of the denoiser / encoder (diffusers' ``compile_repeated_blocks``: each
  ResNet and attention block class compiled once, the encoder's forward-mode path included); ``cunetfull``:
  ``unet.compile()`` of the whole denoiser; ``cobj``: ``torch.compile`` of the objective;
- ``tangent=NAME``: the encoder's forward-mode derivative implementation, where the library offers a choice
  (``DiffEncEncoderModel.set_tangent_mode``); the variant is recorded as unsupported otherwise.

Sampling rows: the bare denoiser forward (no_grad, float32 input under bf16 autocast as the pipeline runs it; bf16
weights, or fp32 weights) and one
`DiffEncPipeline` step (a ``num_inference_steps``-step call divided by the steps), each eager, channels_last and
compiled; the 1000-step ancestral sampling time of the batch is 1000 pipeline steps.

Achieved TFLOP/s: the FLOPs of one step counted once per model kind with ``torch.utils.flop_counter`` (matrix
products and convolutions, forward and backward, the encoder's tangent included) over the median step time; the
fraction is of a bf16 8192^3 matrix product measured at the start (the ceiling bf16 code can reach on this chip).

Examples::

    PYTHONPATH=. python benchmarks/gpu_explore.py --out-dir /tmp/explore --dry-run        # CPU, tiny, seconds
    PYTHONPATH=. python benchmarks/gpu_explore.py --out-dir "$OUT" --total-seconds 200   # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import signal
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffenc_diffusers import DiffEncEncoderModel, DiffEncObjective, DiffEncPipeline, VDMScheduler, VDMUNetModel
from diffenc_diffusers.presets import resolve_preset
from diffenc_diffusers.training.throughput import bf16_matmul_tflops, count_flops

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIRS = {
    "vdm": resolve_preset("cifar10-vdmv-32"),
    "trainable": resolve_preset("cifar10-diffenc-32-4"),
}
"""Model kind -> the preset folder its networks and scheduler come from."""

DRY_RUN_UNET = {"hidden_channels": 32, "num_layers": 2, "norm_num_groups": 8, "sample_size": 16}
DRY_RUN_ENCODER = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "norm_out_num_groups": 8,
    "mid_block_norm_num_groups": 8,
    "sample_size": 16,
}
"""Network overrides of ``--dry-run`` (16x16 images)."""

VARIANTS = [
    # The baselines and the likely winners first: the run may be cut short by its total cap.
    "vdm/bf16",
    "trainable/bf16",
    "trainable/bf16+tangent=autograd",
    "vdm/bf16+cl",
    "trainable/bf16+cl",
    "forward/bf16w",
    "step/bf16w",
    "vdm/fp32",
    "trainable/fp32",
    "vdm/bf16+cl+cunet",
    "trainable/bf16+cl+cunet+cenc",
    "trainable/bf16+ckpt",
    "vdm/bf16+ckpt",
    "vdm/fp32+tf32",
    "trainable/fp32+tf32",
    "forward/autocast",
    "forward/bf16w+cl",
    "step/bf16w+cl",
    "vdm/bf16+cl+fusedadam",
    "trainable/bf16+cenc",
    "forward/bf16w+cl+cunet",
    "step/bf16w+cl+cunet",
    "likelihood/bf16w",
    "likelihood/fp32",
    "vdm/bf16+cobj",
]
"""Default variants, in the order they run: ``kind/dtype[+option...]``. Training kinds: ``vdm``, ``trainable``
(dtype ``bf16`` autocast or ``fp32``). Sampling kinds: ``forward`` (bare denoiser) or ``step`` (pipeline step), dtype
``bf16w`` (bf16 weights) or ``autocast`` (fp32 weights); both run under bf16 autocast, as the pipeline does.
``likelihood``: ``pipe.bits_per_dim`` of the trainable DiffEnc over 4 batches (``bf16w`` or ``fp32``); its "ms" is
per batch."""

OPTIONS = {"cl", "tf32", "ckpt", "fusedadam", "cunet", "cunetfull", "cenc", "cobj"}


class VariantTimeout(Exception):
    """Raised by the alarm when a variant outlives its limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `VariantTimeout` in the main thread after ``seconds`` (SIGALRM; Python code is interrupted between
    bytecodes, a running kernel at its return)."""

    def handler(signum: int, frame: object) -> None:
        raise VariantTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Spec:
    """A parsed variant name."""

    name: str
    kind: str
    dtype: str
    options: set[str] = field(default_factory=set)
    tangent: str | None = None

    @classmethod
    def parse(cls, name: str) -> Spec:
        kind, _, rest = name.partition("/")
        dtype, *options = rest.split("+")
        dtypes = {"vdm": ("bf16", "fp32"), "trainable": ("bf16", "fp32"), "forward": ("bf16w", "autocast")}
        dtypes.update(step=dtypes["forward"], likelihood=("bf16w", "fp32"))
        if dtype not in dtypes.get(kind, ()):
            raise ValueError(
                f"variant {name!r}: expected vdm|trainable/bf16|fp32, forward|step/bf16w|autocast or "
                "likelihood/bf16w|fp32, then +options"
            )
        spec = cls(name, kind, dtype)
        for option in options:
            if option.startswith("tangent="):
                spec.tangent = option.split("=", 1)[1]
            elif option in OPTIONS:
                spec.options.add(option)
            else:
                raise ValueError(f"unknown option {option!r} in variant {name!r}; known: {sorted(OPTIONS)}, tangent=")
        return spec


class Unsupported(Exception):
    """The library offers no such option (recorded, not an error of the run)."""


def device_synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_networks(kind: str, dry_run: bool) -> tuple[VDMUNetModel, DiffEncEncoderModel | None, VDMScheduler]:
    """The preset's denoiser, encoder (trainable DiffEnc) and scheduler, freshly initialised (seed 0)."""
    folder = PRESET_DIRS[kind]
    torch.manual_seed(0)
    unet = VDMUNetModel.from_config(VDMUNetModel.load_config(folder / "unet"), **(DRY_RUN_UNET if dry_run else {}))
    encoder = None
    if (folder / "encoder").is_dir():
        config = DiffEncEncoderModel.load_config(folder / "encoder")
        encoder = DiffEncEncoderModel.from_config(config, **(DRY_RUN_ENCODER if dry_run else {}))
    scheduler = VDMScheduler.from_config(VDMScheduler.load_config(folder / "scheduler"))
    return unet, encoder, scheduler


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_network_options(spec: Spec, unet: torch.nn.Module, encoder: torch.nn.Module | None) -> None:
    """Layout, checkpointing, tangent mode and per-network compilation of ``spec``, in place."""
    networks = [net for net in (unet, encoder) if net is not None]
    if "cl" in spec.options:
        for net in networks:
            net.to(memory_format=torch.channels_last)
    if "ckpt" in spec.options:
        for net in networks:
            if getattr(net, "_supports_gradient_checkpointing", False):
                net.enable_gradient_checkpointing()
    if spec.tangent is not None:
        if encoder is None or not hasattr(encoder, "set_tangent_mode"):
            raise Unsupported(f"tangent={spec.tangent}: this library has no DiffEncEncoderModel.set_tangent_mode")
        encoder.set_tangent_mode(spec.tangent)
    for option, network in (("cunet", unet), ("cenc", encoder)):
        if option not in spec.options:
            continue
        if network is None:
            raise Unsupported(f"{option}: this kind has no encoder")
        # Regional compilation: each repeated block class is compiled once and reused by all its instances (the
        # encoder's blocks compile their forward-mode path too); the whole 32-block denoiser took over 60 s.
        if getattr(network, "_repeated_blocks", None):
            network.compile_repeated_blocks()
        else:
            network.compile()
    if "cunetfull" in spec.options:
        unet.compile()


def uint8_batch(batch: int, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator).to(device)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def training_step_function(
    spec: Spec, device: torch.device, batch: int, size: int, dry_run: bool
) -> tuple[Callable[[], torch.Tensor], DiffEncObjective]:
    """A training step of ``spec`` (its own networks and optimizer) and its objective."""
    unet, encoder, scheduler = load_networks(spec.kind, dry_run)
    unet.to(device)
    if encoder is not None:
        encoder.to(device)
    apply_network_options(spec, unet, encoder)
    objective = DiffEncObjective(unet, scheduler, encoder).to(device)
    call = torch.compile(objective) if "cobj" in spec.options else objective
    fused = {"fused": True} if "fusedadam" in spec.options else {}
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4, **fused)
    images = uint8_batch(batch, size, device, "cl" in spec.options)

    def step() -> torch.Tensor:
        with autocast(device, spec.dtype):
            output = call(images)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return output.loss.detach()

    return step, objective


def sampling_function(spec: Spec, device: torch.device, batch: int, size: int, dry_run: bool, steps: int) -> Callable:
    """A bare denoiser forward or one pipeline step (a ``steps``-step call; the caller divides by ``steps``)."""
    unet, _, scheduler = load_networks("vdm", dry_run)
    unet.to(device=device, dtype=torch.bfloat16 if spec.dtype == "bf16w" else torch.float32)
    apply_network_options(spec, unet, None)
    if spec.kind == "forward":
        sample = torch.randn(batch, 3, size, size, device=device)
        if "cl" in spec.options:
            sample = sample.contiguous(memory_format=torch.channels_last)
        gamma = torch.full((batch,), -2.0, device=device)

        @torch.no_grad()
        def forward() -> torch.Tensor:
            # As the pipeline calls it: float32 input under bf16 autocast.
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return unet(sample, gamma).sample

        return forward
    pipe = DiffEncPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def sample_call() -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        return pipe(batch_size=batch, num_inference_steps=steps, generator=generator, output_type="pt").images

    return sample_call


def likelihood_function(
    spec: Spec, device: torch.device, batch: int, size: int, dry_run: bool
) -> tuple[Callable, int]:
    """``pipe.bits_per_dim`` of the trainable DiffEnc over 4 batches (bf16 weights or fp32), and the image count."""
    unet, encoder, scheduler = load_networks("trainable", dry_run)
    apply_network_options(spec, unet, encoder)
    pipe = DiffEncPipeline(unet=unet, scheduler=scheduler, encoder=encoder)
    pipe.to(device=device, dtype=torch.bfloat16 if spec.dtype == "bf16w" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = uint8_batch(4 * batch, size, device, "cl" in spec.options)

    def call() -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        return pipe.bits_per_dim(images, batch_size=batch, generator=generator).bpd

    return call, images.shape[0]


def time_calls(function: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """First-call time, median and minimum of ``repeats`` timed calls after ``warmup`` more, and peak memory."""
    device_synchronize(device)
    start = time.perf_counter()
    value = function()
    first_value = float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None
    first = time.perf_counter() - start
    for _ in range(warmup):
        function()
    if device.type == "cuda":
        device_synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        device_synchronize(device)
        start = time.perf_counter()
        function()
        device_synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "first_value": first_value,
        "first_s": first,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_gib": peak,
    }


def release_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_row(record: dict[str, Any]) -> list[str]:
    def number(key: str, digits: int) -> str:
        value = record.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    return [
        record["variant"],
        record["status"],
        number("first_s", 1),
        number("ms", 1),
        number("images_per_s", 0),
        number("tflops", 1),
        number("peak_fraction", 3),
        number("peak_gib", 2),
        number("loss", 4),
    ]


def write_outputs(out_dir: Path, payload: dict[str, Any]) -> None:
    """The JSON and the Markdown table, rewritten after every variant."""
    header = ["variant", "status", "first (s)", "ms", "images/s", "TFLOP/s", "of bf16 peak", "peak GiB", "loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_row(record)) + " |" for record in payload["records"]]
    (out_dir / "gpu_explore.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / "gpu_explore.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="where gpu_explore.json and .md are written")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny networks, batch 2, one timed call each")
    parser.add_argument("--dry-run-compile", action="store_true", help="also the compiling variants in a dry run")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu (cpu for --dry-run)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (2 for --dry-run)")
    parser.add_argument("--total-seconds", type=float, default=200.0, help="no variant starts after this")
    parser.add_argument("--variant-seconds", type=float, default=40.0, help="limit of an eager variant")
    parser.add_argument("--compile-seconds", type=float, default=120.0, help="limit of a variant that compiles")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 8; 1 dry)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 2; 0 dry)")
    parser.add_argument("--sampling-steps", type=int, default=None, help="steps of a timed pipeline call")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="variants to measure, in order")
    args = parser.parse_args()

    started = time.perf_counter()
    dry = args.dry_run
    device = torch.device(args.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda"))
    batch = args.batch_size or (2 if dry else 128)
    size = 16 if dry else 32
    repeats = args.repeats or (1 if dry else 8)
    warmup = args.warmup if args.warmup is not None else (0 if dry else 2)
    sampling_steps = args.sampling_steps or (2 if dry else 10)
    specs = [Spec.parse(name) for name in args.variants]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64  # recompile_limit's older name, which newer torch keeps
    default_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    peak_tflops = bf16_matmul_tflops(device, size=256 if dry else 8192)
    payload: dict[str, Any] = {
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dry_run": dry,
            "batch_size": batch,
            "image_size": size,
            "repeats": repeats,
            "warmup": warmup,
            "sampling_steps": sampling_steps,
        },
        "bf16_matmul_tflops": peak_tflops,
        "flops_per_step": {},
        "records": [],
    }
    print(f"bf16 matmul peak: {peak_tflops:.1f} TFLOP/s on {device}", flush=True)

    for spec in specs:
        training = spec.kind in PRESET_DIRS
        compiles = bool({"cunet", "cunetfull", "cenc", "cobj"} & spec.options)
        limit = args.compile_seconds if compiles else args.variant_seconds
        left = args.total_seconds - (time.perf_counter() - started)
        record: dict[str, Any] = {"variant": spec.name, "status": "ok", "limit_s": limit}
        if left < min(limit, 10.0):
            record["status"] = "skipped: total cap"
        elif dry and compiles and not args.dry_run_compile:
            record["status"] = "skipped: dry run (--dry-run-compile)"
        else:
            set_tf32("tf32" in spec.options)
            try:
                with time_limit(min(limit, left)):
                    if training:
                        if spec.kind not in payload["flops_per_step"] and not compiles:
                            counted, _ = training_step_function(spec, device, batch, size, dry)
                            payload["flops_per_step"][spec.kind] = count_flops(counted)
                            counted = None
                            release_memory(device)
                        function, _ = training_step_function(spec, device, batch, size, dry)
                        torch.manual_seed(0)
                        result = time_calls(function, device, warmup, repeats)
                        record["loss"] = result.pop("first_value")
                        per_call, flops = result["median_s"], payload["flops_per_step"].get(spec.kind)
                    elif spec.kind == "likelihood":
                        function, num_images = likelihood_function(spec, device, batch, size, dry)
                        result = time_calls(function, device, warmup, repeats)
                        result.pop("first_value")
                        per_call, flops = result["median_s"] * batch / num_images, None
                    else:
                        function = sampling_function(spec, device, batch, size, dry, sampling_steps)
                        result = time_calls(function, device, warmup, repeats)
                        result.pop("first_value")
                        per_call = result["median_s"] / (sampling_steps if spec.kind == "step" else 1)
                        flops = payload["flops_per_step"].get("forward")
                        if flops is None and spec.kind == "forward" and not compiles:
                            flops = payload["flops_per_step"]["forward"] = count_flops(function)
                    record.update(result)
                    record["ms"] = 1e3 * per_call
                    record["images_per_s"] = batch / per_call
                    if flops is not None:
                        record["tflops"] = flops / per_call / 1e12
                        record["peak_fraction"] = record["tflops"] / peak_tflops
                    if spec.kind == "step":
                        record["sampling_1000_steps_s"] = 1000 * per_call
            except Unsupported as error:
                record["status"] = f"unsupported: {error}"
            except VariantTimeout as error:
                record["status"] = f"timeout: {error}"
            except Exception as error:  # a failing variant is recorded, the run goes on
                record["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                record["traceback"] = traceback.format_exc()[-3000:]
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = default_tf32
                function = None
                release_memory(device)
        payload["records"].append(record)
        write_outputs(args.out_dir, payload)
        print(" | ".join(format_row(record)), flush=True)

    payload["total_s"] = time.perf_counter() - started
    write_outputs(args.out_dir, payload)
    flops = ", ".join(f"{kind} {value / batch / 1e9:.1f}" for kind, value in payload["flops_per_step"].items())
    print(f"\nGFLOP per image: {flops}; bf16 matmul peak {peak_tflops:.1f} TFLOP/s; total {payload['total_s']:.0f} s")
    print((args.out_dir / "gpu_explore.md").read_text())


if __name__ == "__main__":
    main()
