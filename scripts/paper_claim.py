"""The paper's central claim at CPU scale: VDM vs non-trainable vs trainable DiffEnc on a built-in dataset.

For ``--dataset D`` (``digits`` or ``mnist5k``), trains each of the three CPU presets ``D-vdm``,
``D-diffenc-nontrainable`` and ``D-diffenc-trainable`` with the same budget (steps, batch, optimiser) for several
seeds with `training/train_diffenc.py`, evaluates every EMA pipeline on D's test split with the evaluation CLI,
and writes what docs/results.md reports:

    docs/results/D_claim.json              per run and per variant: test bits/dim and its terms, mean and s.e.
    docs/results/D_claim_table.md          the same as a markdown table
    docs/results/D_training_curves.png     training and test bits/dim against step, mean over seeds
    docs/results/D_encoder.png             the encoder figure of the first trainable DiffEnc seed
    docs/results/D_samples_<variant>.png   samples of each variant's first seed
    docs/results/D_evaluation_noise.json   with --evaluation_noise: how the evaluation's own noise compares with the
                                           differences between the kinds (first seed; see evaluation_noise)

Run from the repository root (digits: about 45 minutes on 2 CPU cores; mnist5k: see docs/results.md):

    python scripts/paper_claim.py --dataset digits --steps 1000 --seeds 0 1 2 --jobs 2

An interrupted call can simply be repeated: evaluated runs are kept as they are, and training resumes from the
latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = {"vdm": "vdm", "nontrainable": "diffenc-nontrainable", "trainable": "diffenc-trainable"}
"""Each model kind and the suffix of its preset name (the preset of kind k on dataset D is ``D-<suffix>``)."""
SAMPLING_STEPS = {"digits": 1000, "mnist5k": 200}
"""Ancestral sampling steps of each dataset's sample grid (28x28 sampling is the slow part of an evaluation)."""
TERMS = ("bpd", "loss_recon", "loss_klz", "loss_diff")
ROOT = Path(__file__).resolve().parents[1]


def run_parser(description: str, name: str) -> argparse.ArgumentParser:
    """The flags every experiment script here shares; its run folders default to outputs/<dataset>_<name>."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", choices=sorted(SAMPLING_STEPS), default="digits", help="The preset family.")
    parser.add_argument("--steps", type=int, default=1000, help="Training steps of every run (same budget).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="Runs trained at the same time (one thread each).")
    parser.add_argument("--repeats", type=int, default=3, help="Draws of t and noise per test image.")
    parser.add_argument("--out", type=Path, default=None, help=f"Run folders (default: outputs/<dataset>_{name}).")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results", help="Where results are written.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = run_parser(__doc__.split("\n\n")[0], "claim")
    parser.add_argument(
        "--evaluation_noise",
        action="store_true",
        help="Also measure, on the first seed, the standard errors with 1, 3, ... --repeats draws per image and the "
        "paired per-image differences to VDM.",
    )
    return check_run_args(parser, parser.parse_args(argv), "claim")


def check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Exit with a parser error unless --steps, --jobs, --repeats are positive and there are 2+ --seeds; default
    --out to outputs/<dataset>_<name>."""
    if args.steps < 1 or args.jobs < 1 or args.repeats < 1:
        parser.error(f"--steps, --jobs and --repeats must be positive, got {args.steps}, {args.jobs}, {args.repeats}")
    if len(args.seeds) < 2:
        parser.error(f"--seeds needs at least 2 seeds for a standard error, got {args.seeds}")
    if args.out is None:
        args.out = ROOT / "outputs" / f"{args.dataset}_{name}"
    return args


def run_one(variant: str, seed: int, args: argparse.Namespace) -> Path:
    """Train and evaluate the preset of ``variant`` with ``seed`` (:func:`train_and_evaluate`)."""
    run_dir = args.out / f"{variant}-seed{seed}"
    preset = f"{args.dataset}-{VARIANTS[variant]}"
    return train_and_evaluate(preset, run_dir, seed, args, encoder_figure=variant == "trainable")


def train_and_evaluate(preset: str, run_dir: Path, seed: int, args: argparse.Namespace, encoder_figure: bool) -> Path:
    """Train (or resume) one run of ``preset`` for ``args.steps`` steps on ``args.dataset`` (one thread) and
    evaluate its EMA pipeline into ``run_dir/evaluation`` (bpd.json with ``args.repeats`` draws per test image,
    samples.png, and encoder.png if ``encoder_figure``); returns ``run_dir``. A run whose evaluation exists is
    taken as it is (delete its folder to redo it)."""
    figures = run_dir / "evaluation"
    if (figures / "bpd.json").exists():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [
        sys.executable, str(ROOT / "training" / "train_diffenc.py"), "--preset", preset,
        "--seed", str(seed), "--output_dir", str(run_dir), "--max_train_steps", str(args.steps),
        "--resume_from_checkpoint", "latest", "--validation_steps", str(max(args.steps // 4, 1)),
        "--num_validation_images", "16", "--num_inference_steps", "100",
    ]  # fmt: skip
    evaluate = [
        sys.executable, "-m", "diffenc_diffusers.evaluation", "--pipeline", str(run_dir), "--dataset", args.dataset,
        "--repeats", str(args.repeats), "--seed", str(seed), "--output_json", str(figures / "bpd.json"),
        "--sample_grid", str(figures / "samples.png"), "--num_samples", "64",
        "--num_inference_steps", str(SAMPLING_STEPS[args.dataset]),
    ]  # fmt: skip
    if encoder_figure:
        evaluate += ["--encoder_figure", str(figures / "encoder.png")]
    # A finished training run has saved its pipeline (test_bpd.json is written last); it is not run again.
    commands = [evaluate] if (run_dir / "test_bpd.json").exists() else [train, evaluate]
    with open(run_dir / "run.log", "a") as log:
        for command in commands:
            subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir


def run_all(jobs: list[tuple], function: Callable[..., Path], workers: int) -> dict[tuple, Path]:
    """``function(*job)`` for every job, ``workers`` at a time; every job runs even if another fails (the first
    failure is raised after all have ended, so a repeated call has less to redo)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {job: pool.submit(function, *job) for job in jobs}
    failed = [future.exception() for future in futures.values() if future.exception() is not None]
    if failed:
        raise failed[0]
    return {job: future.result() for job, future in futures.items()}


def evaluation_noise(run_dirs: dict[tuple[str, int], Path], args: argparse.Namespace) -> dict:
    """The evaluation's own noise, on the first seed: every kind's per-image bits/dim with the same --repeats draws
    of (t, noise) as its evaluation, summarised for the first 1, 3, ... draws: the mean, its standard error over
    images (se_images) and over draws (se_repeats), and the per-image difference to VDM with its standard error
    over images (a paired comparison: the same images and draws)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from diffenc_diffusers import DiffEncPipeline
    from diffenc_diffusers.data import load_builtin_dataset
    from diffenc_diffusers.evaluation import bits_per_dim_terms, standard_error

    seed = args.seeds[0]
    images = load_builtin_dataset(args.dataset, "test")[0]
    bpd = {}
    for variant in VARIANTS:
        pipe = DiffEncPipeline.from_pretrained(str(run_dirs[(variant, seed)]))
        pipe.set_progress_bar_config(disable=True)
        bpd[variant] = bits_per_dim_terms(pipe, images, seed=seed, repeats=args.repeats)["bpd"]
    result: dict = {"seed": seed, "num_images": len(images), "by_repeats": {}}
    for count in sorted({1, 3, args.repeats} & set(range(1, args.repeats + 1))):
        row: dict = {}
        for variant, values in bpd.items():
            row[variant] = {
                "bpd": float(values[:count].mean()),
                "se_images": standard_error(values[:count].mean(0)),
                "se_repeats": standard_error(values[:count].mean(1)),
            }
        for variant in ("nontrainable", "trainable"):
            difference = (bpd[variant][:count] - bpd["vdm"][:count]).mean(0)
            row[f"{variant}-vdm"] = {"mean": float(difference.mean()), "se_images": standard_error(difference)}
        result["by_repeats"][str(count)] = row
    return result


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def read_curves(run_dir: Path, tags: tuple[str, ...] = ("train/bpd", "test/bpd")) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of each TensorBoard scalar in ``tags`` from the run's events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[tuple[int, float]]] = {tag: [] for tag in tags}
    for events in sorted((run_dir / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in curves:
            if tag in accumulator.Tags()["scalars"]:
                curves[tag] += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return {tag: sorted(dict(points).items()) for tag, points in curves.items()}


def plot_curves(curves: dict[str, list[dict[str, list[tuple[int, float]]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, runs in curves.items():
        train = [np.array(run["train/bpd"]) for run in runs if run["train/bpd"]]
        length = min(len(points) for points in train)
        steps = train[0][:length, 0]
        values = np.stack([points[:length, 1] for points in train])
        window = max(length // 50, 1)
        smooth = np.stack([np.convolve(v, np.ones(window) / window, mode="valid") for v in values])
        axes[0].plot(steps[window - 1 :], smooth.mean(0), label=variant)
        # Test bits/dim at the steps every seed evaluated (a resumed run with another --steps has other ones).
        test = [dict(run["test/bpd"]) for run in runs if run["test/bpd"]]
        test_steps = sorted(set.intersection(*(set(points) for points in test)))
        test_values = np.array([[points[step] for step in test_steps] for points in test])
        error = test_values.std(0, ddof=1) / math.sqrt(len(test))
        axes[1].errorbar(test_steps, test_values.mean(0), yerr=error, marker="o", capsize=3, label=variant)
    title = f"training bits/dim (moving average, mean of {len(train)} seeds)"
    axes[0].set(title=title, xlabel="step", ylabel="bits/dim", yscale="log")
    axes[1].set(title="EMA test bits/dim (mean ± s.e. over seeds)", xlabel="step", ylabel="bits/dim")
    for axis in axes:
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    jobs = [(variant, seed) for seed in args.seeds for variant in VARIANTS]
    run_dirs = run_all(jobs, lambda variant, seed: run_one(variant, seed, args), args.jobs)

    args.docs.mkdir(parents=True, exist_ok=True)
    prefix = f"{args.dataset}_"
    results: dict = {
        "dataset": args.dataset,
        "steps": args.steps,
        "seeds": args.seeds,
        "repeats": args.repeats,
        "runs": {},
        "variants": {},
    }
    curves: dict[str, list] = {variant: [] for variant in VARIANTS}
    for (variant, seed), run_dir in run_dirs.items():
        evaluation = json.loads((run_dir / "evaluation" / "bpd.json").read_text())["continuous"]
        results["runs"][f"{variant}-seed{seed}"] = {term: evaluation[term] for term in TERMS} | {
            "se_images": evaluation["se_images"]
        }
        curves[variant].append(read_curves(run_dir))
    rows = ["| model | test bpd | loss_recon | loss_klz | loss_diff |", "|---|---|---|---|---|"]
    for variant in VARIANTS:
        per_seed = [results["runs"][f"{variant}-seed{seed}"] for seed in args.seeds]
        summary = {term: mean_and_standard_error([run[term] for run in per_seed]) for term in TERMS}
        results["variants"][variant] = {term: {"mean": m, "se": se} for term, (m, se) in summary.items()}
        rows.append(f"| {variant} | " + " | ".join(f"{m:.4f} ± {se:.4f}" for m, se in summary.values()) + " |")
        first_run = run_dirs[(variant, args.seeds[0])]
        shutil.copy(first_run / "evaluation" / "samples.png", args.docs / f"{prefix}samples_{variant}.png")
    # Within a seed every variant is evaluated on the same images with the same draws of t and noise, so the
    # per-seed differences to VDM are paired comparisons.
    rows += [
        "",
        "| difference to VDM (paired by seed) | test bpd | loss_recon | loss_klz | loss_diff |",
        "|---|---|---|---|---|",
    ]
    for variant in ("nontrainable", "trainable"):
        differences = {
            term: mean_and_standard_error(
                [
                    results["runs"][f"{variant}-seed{s}"][term] - results["runs"][f"vdm-seed{s}"][term]
                    for s in args.seeds
                ]
            )
            for term in TERMS
        }
        results["variants"][variant]["difference_to_vdm"] = {
            t: {"mean": m, "se": se} for t, (m, se) in differences.items()
        }
        rows.append(
            f"| {variant} - vdm | " + " | ".join(f"{m:+.4f} ± {se:.4f}" for m, se in differences.values()) + " |"
        )
    shutil.copy(
        run_dirs[("trainable", args.seeds[0])] / "evaluation" / "encoder.png", args.docs / f"{prefix}encoder.png"
    )
    plot_curves(curves, args.docs / f"{prefix}training_curves.png")
    if args.evaluation_noise:
        noise = evaluation_noise(run_dirs, args)
        (args.docs / f"{prefix}evaluation_noise.json").write_text(json.dumps(noise, indent=1) + "\n")
    table = "\n".join(rows) + "\n"
    (args.docs / f"{prefix}claim.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.docs / f"{prefix}claim_table.md").write_text(table)
    print(table)
    print(f"Results in {args.docs}; runs in {args.out}")


if __name__ == "__main__":
    main()
