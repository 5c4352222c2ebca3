"""Does bf16 autocast training reach the bits/dim of float32 training? Train the same preset twice, compare.

Each preset is trained by ``training/train_diffenc.py`` with ``--mixed_precision no`` and ``--mixed_precision bf16``,
with the same seed (so the same initial weights, data order, t, noise and dropout draws) and the same number of
steps, on CPU. Both runs' EMA pipelines are then evaluated by the training script's final evaluation, in float32,
on the same test images with the same draws, so the two test bits/dim are paired. The table gives the wall time of
each run (training plus the same float32 final evaluation in both), the test bits/dim with its standard error over
images, and bf16's relative difference. ``bench_training.py`` compares the two precisions on the same weights; this
compares where training ends.

Examples::

    PYTHONPATH=. python benchmarks/bench_bf16_training.py --presets digits-vdm --steps 300
    PYTHONPATH=. python benchmarks/bench_bf16_training.py --presets digits-vdm digits-diffenc-trainable --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import print_table, verdict, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "training" / "train_diffenc.py"
PRECISIONS = ("no", "bf16")
BPD_RELATIVE_DIFFERENCE_TARGET = 0.01


def train(preset: str, precision: str, args: argparse.Namespace) -> dict[str, float]:
    """One training run; returns its wall time and the final test bits/dim (float32 evaluation of the EMA)."""
    output = args.output_dir / preset / precision
    if (output / "test_bpd.json").exists():
        raise SystemExit(f"{output} already holds a finished run; remove it or choose another --output-dir.")
    command = [
        sys.executable,
        str(TRAIN_SCRIPT),
        *("--preset", preset, "--output_dir", str(output), "--mixed_precision", precision),
        *("--max_train_steps", str(args.steps), "--seed", str(args.seed), "--cpu", "--report_to", "none"),
        *("--checkpointing_steps", str(args.steps), "--validation_steps", str(args.steps)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO_ROOT)}
    print(f"== {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    result = json.loads((output / "test_bpd.json").read_text())["continuous"]
    return {"seconds": seconds, "bpd": result["bpd"], "se": result["se_images"], "num_images": result["num_images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["digits-vdm"], help="presets to train (built-in digits)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training runs")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "bf16_training")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 1:
        raise SystemExit("--steps and --threads must be positive.")

    records, rows, targets = [], [], []
    for preset in args.presets:
        runs = {precision: train(preset, precision, args) for precision in PRECISIONS}
        difference = (runs["bf16"]["bpd"] - runs["no"]["bpd"]) / runs["no"]["bpd"]
        records.append({"preset": preset, "steps": args.steps, "runs": runs, "relative_difference": difference})
        for precision, run in runs.items():
            rows.append(
                [
                    preset,
                    "fp32" if precision == "no" else precision,
                    f"{run['seconds']:.0f}",
                    f"{run['bpd']:.4f} +- {run['se']:.4f}",
                    "-" if precision == "no" else f"{100 * difference:+.2f}%",
                ]
            )
        speedup = runs["no"]["seconds"] / runs["bf16"]["seconds"]
        targets += [
            f"bf16 test bpd within 1% of fp32 ({preset}, {args.steps} steps): {100 * difference:+.2f}%: "
            f"{verdict(abs(difference) <= BPD_RELATIVE_DIFFERENCE_TARGET)}",
            f"bf16 run / fp32 run wall time ({preset}): {1 / speedup:.2f}x (speedup {speedup:.2f})",
        ]
    print_table(
        f"bf16 autocast against float32 training: {args.steps} steps, seed {args.seed}, CPU, "
        f"{args.threads} threads; test bits/dim of the EMA pipeline (float32 evaluation, same draws)",
        ["preset", "training", "run (s)", "test bpd +- s.e.", "bf16 vs fp32"],
        rows,
    )
    print("\nTargets:\n" + "\n".join(f"  {line}" for line in targets))
    write_json(args.json, {"results": records, "targets": targets})


if __name__ == "__main__":
    main()
