"""What the three benchmark scripts share: model presets, command-line options, timing, peak memory, output.

Timing runs the measured functions round-robin (one call of each per round, after warm-up, in reverse order every
other round), so that load from other processes on a shared machine falls on all of them alike, and reports
medians; a ratio of two functions is the median of their per-round ratios, given with its interquartile range. On
CPU it records both the wall-clock time and the process's CPU time; with ``--threads 1`` the CPU time is the compute
time of the step, which other jobs on the same cores disturb less than the wall clock, so ``--clock cpu`` gives the
steadier ratios there.

Peak memory is the high-water mark of live tensor memory during one call, above what was live before it: from
``torch.cuda.max_memory_allocated`` on CUDA and from the allocation events of torch.profiler's memory profile on
CPU (tracemalloc does not see tensor memory; a process's resident set size keeps what the allocator caches).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch.profiler import ProfilerActivity, profile

from diffenc_diffusers import DiffEncEncoderModel, VDMUNetModel
from diffenc_diffusers.training import cpu_has_native_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Names accepted by ``--dtype``."""


@dataclass(frozen=True)
class Preset:
    """Model sizes and batch of a benchmark run.

    Attributes:
        description: One line for the table title.
        image_size: Height and width of the images.
        channels: Image channels.
        batch_size: Default batch size (``--batch-size`` overrides it).
        unet: Keyword arguments of `VDMUNetModel` besides `sample_size` and `in_channels`.
        encoder: Keyword arguments of `DiffEncEncoderModel` besides `sample_size` and `in_channels`.
        targets_apply: Whether the issue's speed targets are stated for models of this size.
    """

    description: str
    image_size: int
    channels: int
    batch_size: int
    unet: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)
    targets_apply: bool = True


PRESETS = {
    "tiny": Preset(
        "smoke test: 16x16x3, denoiser 32 ch x 2 layers, encoder [8, 16] x 1",
        image_size=16,
        channels=3,
        batch_size=4,
        unet={"hidden_channels": 32, "num_layers": 2, "norm_num_groups": 8},
        encoder={"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8},
        targets_apply=False,
    ),
    "cpu": Preset(
        "CPU-sized, paper's size ratio: 32x32x3, denoiser 64 ch x 7 layers, encoder [16, 32] x 2",
        image_size=32,
        channels=3,
        batch_size=8,
        unet={"hidden_channels": 64, "num_layers": 7, "norm_num_groups": 8},
        encoder={"block_out_channels": [16, 32], "layers_per_block": 2, "norm_num_groups": 8},
    ),
    "cifar10": Preset(
        "the paper's CIFAR-10 models: 32x32x3, denoiser 128 ch x 32 layers, encoder [64, 128] x 2",
        image_size=32,
        channels=3,
        batch_size=128,
    ),
}
"""`cifar10` is the paper's DiffEnc-32-4 (the models' defaults, 30.6M and 2.7M parameters); `cpu` keeps its
denoiser/encoder parameter ratio (2.01M / 0.17M = 11.6 against the paper's 11.1) at a size a CPU trains in about two
seconds per step; `tiny` only checks that a script runs (its timings mean nothing)."""


def add_common_arguments(
    parser: argparse.ArgumentParser,
    default_repeats: int,
    default_dtypes: Sequence[str],
    dtype_choices: Sequence[str] = tuple(DTYPES),
) -> None:
    """Options every benchmark script takes."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model sizes and batch")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the preset's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype", nargs="+", choices=list(dtype_choices), default=list(default_dtypes), help="network precisions"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="the time that ratios use: wall clock, or process CPU time (CPU only; steadier on a shared machine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")


def setup(args: argparse.Namespace) -> torch.device:
    """Check the options, set the thread count, and return the device."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here.")
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures CPU time and applies only to --device cpu.")
    for name in ("repeats", "warmup", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {value}.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device


def batch_size(args: argparse.Namespace) -> int:
    """``--batch-size``, or the preset's batch size."""
    return args.batch_size if args.batch_size is not None else PRESETS[args.preset].batch_size


def build_unet(preset: Preset, seed: int) -> VDMUNetModel:
    """The preset's denoiser, initialised from ``seed``."""
    torch.manual_seed(seed)
    return VDMUNetModel(sample_size=preset.image_size, in_channels=preset.channels, **preset.unet)


def build_encoder(preset: Preset, seed: int) -> DiffEncEncoderModel:
    """The preset's encoder, initialised from ``seed``."""
    torch.manual_seed(seed)
    return DiffEncEncoderModel(sample_size=preset.image_size, in_channels=preset.channels, **preset.encoder)


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Add seeded noise to every parameter, so that the zero-initialised output layers have an effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(scale * noise.to(device=param.device, dtype=param.dtype))
    return module


def num_parameters(module: torch.nn.Module | None) -> int:
    """Parameter count (0 for ``None``)."""
    return 0 if module is None else sum(param.numel() for param in module.parameters())


def random_images(preset: Preset, batch: int, seed: int, device: torch.device) -> torch.Tensor:
    """A seeded batch of uint8 images of the preset's shape."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, preset.channels, preset.image_size, preset.image_size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-call times of one measured function, in seconds."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median(self, clock: str = "wall") -> float:
        """Median of the ``clock`` ("wall" or "cpu") times."""
        return statistics.median(self.times(clock))

    def minimum(self, clock: str = "wall") -> float:
        """Smallest of the ``clock`` times."""
        return min(self.times(clock))

    def times(self, clock: str = "wall") -> list[float]:
        """The ``clock`` ("wall" or "cpu") times, one per round."""
        return self.wall if clock == "wall" else self.cpu

    def summary(self) -> dict[str, float]:
        """Medians and minima, in milliseconds, for the JSON output."""
        return {
            "wall_median_ms": 1e3 * self.median("wall"),
            "wall_min_ms": 1e3 * self.minimum("wall"),
            "cpu_median_ms": 1e3 * self.median("cpu"),
            "repeats": len(self.wall),
        }


def time_interleaved(
    functions: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, Timing]:
    """Time each function ``repeats`` times, one call of each per round, after ``warmup`` untimed rounds.

    Odd rounds call the functions in reverse order, so that none is always first or last in a round.
    """
    timings = {name: Timing() for name in functions}
    for round_index in range(warmup + repeats):
        order = list(functions.items())
        for name, function in order if round_index % 2 == 0 else reversed(order):
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            function()
            synchronize(device)
            if round_index >= warmup:
                timings[name].wall.append(time.perf_counter() - wall)
                timings[name].cpu.append(time.process_time() - cpu)
    return timings


@dataclass(frozen=True)
class Ratio:
    """Ratio of two functions' times: the median and quartiles of their per-round ratios."""

    median: float
    lower_quartile: float
    upper_quartile: float

    def __str__(self) -> str:
        return f"{self.median:.3f} (IQR {self.lower_quartile:.3f}-{self.upper_quartile:.3f})"


def paired_ratio(numerator: Timing, denominator: Timing, clock: str) -> Ratio:
    """numerator / denominator over the rounds of `time_interleaved` (each pair timed in the same round).

    Pairing cancels the slow changes of a shared machine's load that a ratio of two medians keeps; the quartiles
    show how much the ratio moved from round to round.
    """
    ratios = [top / bottom for top, bottom in zip(numerator.times(clock), denominator.times(clock), strict=True)]
    if len(ratios) == 1:
        return Ratio(ratios[0], ratios[0], ratios[0])
    lower, _, upper = statistics.quantiles(ratios, n=4, method="inclusive")
    return Ratio(statistics.median(ratios), lower, upper)


def peak_memory_bytes(function: Callable[[], object], device: torch.device) -> int:
    """High-water mark of tensor memory allocated during one call of ``function``, above what was live before."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"Peak memory is measured on cpu and cuda only, not on {device.type}.")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Versions, hardware and options, for the JSON output."""
    info: dict[str, Any] = {
        "command_options": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "preset": asdict(PRESETS[args.preset]),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_native_bf16": cpu_has_native_bf16(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max(len(str(name)), *(len(row[index]) for row in cells)) for index, name in enumerate(header)]
    print(f"\n{title}\n")
    print("| " + " | ".join(name.ljust(width) for name, width in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in cells:
        print("| " + " | ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)) + " |")


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (if given) as indented JSON."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


def print_targets(preset: Preset, lines: Sequence[str]) -> None:
    """Print the targets' outcomes, or say that the preset is too small for them."""
    if not preset.targets_apply:
        print("\nTargets: not evaluated for this smoke-test preset (use --preset cpu or cifar10).")
        return
    print("\nTargets:\n" + "\n".join(f"  {line}" for line in lines))


def verdict(passed: bool) -> str:
    """The outcome of a target: "met" or "NOT met"."""
    return "met" if passed else "NOT met"
