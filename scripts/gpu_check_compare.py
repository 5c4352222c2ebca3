"""CPU against CUDA on the same weights, inputs and noise: the objective's terms, bits/dim and one sampling step.

Section (b) of ``scripts/gpu_check.sh``. The paper's trainable DiffEnc-32-4 networks
(``pipelines/cifar10-diffenc-32-4``, freshly initialised and perturbed so that the zero-initialised output layers
matter) are copied to both devices in float32 with TF32 off. The draws (t, the noises, the sampler's noise) are made
on the CPU and handed to both, so any difference is the devices' arithmetic: a relative difference above
``--tolerance`` (1e-4) fails the check.

Compared: the four per-image terms and bits/dim of `DiffEncObjective` in continuous time and with T = 1000 (training
mode, dropout off), ``pipe.bits_per_dim`` with a CPU generator, the denoiser's output, and one ancestral
(``eta = 1``) and one deterministic (``eta = 0``) `VDMScheduler` step from the same z_t.

    PYTHONPATH=. python scripts/gpu_check_compare.py --json out.json [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from diffenc_diffusers import DiffEncEncoderModel, DiffEncObjective, DiffEncPipeline, VDMScheduler, VDMUNetModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_explore import DRY_RUN_ENCODER, DRY_RUN_UNET, PRESET_DIRS

PRESET = PRESET_DIRS["trainable"]


def relative_difference(cpu: torch.Tensor, cuda: torch.Tensor) -> float:
    """``||cuda - cpu|| / ||cpu||`` in float64 (0 for two zero tensors)."""
    cpu, cuda = cpu.detach().double().cpu(), cuda.detach().double().cpu()
    scale = cpu.norm().item()
    return (cuda - cpu).norm().item() / scale if scale > 0 else (cuda - cpu).norm().item()


def networks(dry_run: bool) -> tuple[VDMUNetModel, DiffEncEncoderModel, VDMScheduler]:
    torch.manual_seed(0)
    unet = VDMUNetModel.from_config(
        VDMUNetModel.load_config(PRESET / "unet"), dropout=0.0, **(DRY_RUN_UNET if dry_run else {})
    )
    encoder = DiffEncEncoderModel.from_config(
        DiffEncEncoderModel.load_config(PRESET / "encoder"), dropout=0.0, **(DRY_RUN_ENCODER if dry_run else {})
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in [*unet.parameters(), *encoder.parameters()]:
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return unet, encoder, VDMScheduler.from_config(VDMScheduler.load_config(PRESET / "scheduler"))


def evaluate(device: torch.device, dry_run: bool, batch: int) -> dict[str, torch.Tensor]:
    """Every compared quantity, computed on ``device`` from CPU-made weights and draws."""
    unet, encoder, scheduler = networks(dry_run)
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    draws = {
        "t": torch.rand(batch, generator=generator, dtype=torch.float64),
        "noise": torch.randn(batch, 3, size, size, generator=generator),
        "recon_noise": torch.randn(batch, 3, size, size, generator=generator),
    }
    on_device = {name: value.to(device) for name, value in draws.items()}
    results: dict[str, torch.Tensor] = {}
    unet, encoder = unet.to(device), encoder.to(device)
    for label, num_timesteps in (("continuous", None), ("T=1000", 1000)):
        objective = DiffEncObjective(unet, scheduler, encoder, num_timesteps=num_timesteps)
        output = objective(images.to(device), **on_device)
        for term in ("loss_recon", "loss_klz", "loss_diff", "bpd"):
            results[f"objective {label} {term}"] = getattr(output, term)
    pipe = DiffEncPipeline(unet=unet, scheduler=scheduler, encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    try:
        likelihood = pipe.bits_per_dim(images, batch_size=batch, generator=torch.Generator().manual_seed(3))
        results["pipe.bits_per_dim bpd"] = likelihood.bpd
    except (RuntimeError, TypeError, ValueError) as error:  # recorded as missing: the CPU generator on CUDA
        print(f"pipe.bits_per_dim with a CPU generator on {device}: {type(error).__name__}: {error}", file=sys.stderr)
    z_1 = torch.randn(batch, 3, size, size, generator=generator).to(device)
    with torch.no_grad():
        for eta in (1.0, 0.0):
            # The first step of a 10-step sampler, from t = 1 to t = 0.9; the step's noise comes from a CPU generator.
            scheduler.set_timesteps(10, device=device)
            t = scheduler.timesteps[0]
            model_output = unet(z_1, scheduler.gamma(t).to(torch.float32).expand(batch)).sample
            results["denoiser output"] = model_output
            step = scheduler.step(model_output, t, z_1, generator=torch.Generator().manual_seed(4), eta=eta)
            results[f"scheduler.step eta={eta:g}"] = step.prev_sample
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where the table's numbers go")
    parser.add_argument("--dry-run", action="store_true", help="tiny networks, and the CPU against itself")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    other = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if other.type == "cpu" and not args.dry_run:
        raise SystemExit("CUDA is not available: nothing to compare the CPU with (use --dry-run to test the script).")
    cpu = evaluate(torch.device("cpu"), args.dry_run, args.batch_size)
    device = evaluate(other, args.dry_run, args.batch_size)
    rows: list[dict[str, Any]] = []
    for name, value in cpu.items():
        if name not in device:
            rows.append({"quantity": name, "relative_difference": None, "passed": False})
            continue
        difference = relative_difference(value, device[name])
        rows.append({"quantity": name, "relative_difference": difference, "passed": difference <= args.tolerance})
    passed = all(row["passed"] for row in rows)
    print(f"\nCPU against {other} (fp32, TF32 off), ||a - b|| / ||a||, tolerance {args.tolerance:g}\n")
    print("| quantity | relative difference | within tolerance |\n|---|---|---|")
    for row in rows:
        difference = "missing" if row["relative_difference"] is None else f"{row['relative_difference']:.2e}"
        print(f"| {row['quantity']} | {difference} | {'yes' if row['passed'] else 'NO'} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"device": str(other), "tolerance": args.tolerance, "passed": passed, "rows": rows}, indent=2)
    )
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
