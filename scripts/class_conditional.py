"""Class-conditional vs unconditional trainable DiffEnc on a built-in dataset's labels, over seeds.

For ``--dataset D`` (``digits`` or ``mnist5k``), trains the presets ``D-diffenc-trainable-classcond`` (denoiser and
encoder conditioned on the digit class, null class for classifier-free guidance, labels dropped with probability
0.1) and ``D-diffenc-trainable`` (the same networks without class embeddings) with the same budget for several
seeds, evaluates every EMA pipeline on D's test split with ``diffenc-evaluate`` (the conditional model on the test
labels, and on the null class: its own unconditional ELBO), and writes what docs/results.md reports:

    docs/results/D_classcond.json          per run and per model: test bits/dim and its terms, mean and s.e.
    docs/results/D_classcond_table.md      the same as a markdown table, with the differences paired by seed
    docs/results/D_classcond_encoder.png   the per-class encoder figure of the first conditional seed
    docs/results/D_classcond_gain.png      the conditional - null class EMA test bits/dim of each conditional seed
                                           against the training step, read from the runs' TensorBoard logs
    docs/results/D_classcond_samples_guidance<s>.png
                                           samples of the first conditional seed, one class per column (10 rows),
                                           with classifier-free guidance scale s (each of --guidance_scales)

Run from the repository root (digits: about 40 minutes on 2 CPU cores):

    python scripts/class_conditional.py --dataset digits --steps 1000 --seeds 0 1 2 --jobs 2

An interrupted call can simply be repeated: evaluated runs are kept, and training resumes from the latest
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_claim import (
    ROOT,
    SAMPLING_STEPS,
    TERMS,
    check_run_args,
    mean_and_standard_error,
    read_curves,
    run_all,
    run_parser,
    train_and_evaluate,
)

MODELS = {"conditional": "diffenc-trainable-classcond", "unconditional": "diffenc-trainable"}
"""Each model and the suffix of its preset name (the preset of model m on dataset D is ``D-<suffix>``)."""
ROWS = {
    "conditional": "class-conditional, -log p(x \\| c)",
    "null_class": "class-conditional, null class, -log p(x)",
    "unconditional": "unconditional, -log p(x)",
}
"""The rows of the table: the conditional model on the true labels and on the null class, and the unconditional
model."""
DIFFERENCES = {
    "conditional - unconditional": ("conditional", "unconditional"),
    "conditional - null class (same model)": ("conditional", "null_class"),
    "null class - unconditional": ("null_class", "unconditional"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = run_parser(__doc__.split("\n\n")[0], "classcond")
    parser.add_argument(
        "--guidance_scales", type=float, nargs="+", default=[1.0, 3.0], help="Guidance scales of the sample grids."
    )
    return check_run_args(parser, parser.parse_args(argv), "classcond")


def run_one(model: str, seed: int, args: argparse.Namespace) -> Path:
    """Train and evaluate ``model``'s preset with ``seed``; the conditional one with its per-class encoder figure."""
    preset = f"{args.dataset}-{MODELS[model]}"
    return train_and_evaluate(
        preset, args.out / f"{model}-seed{seed}", seed, args, encoder_figure=model == "conditional"
    )


def read_run(model: str, run_dir: Path) -> dict[str, dict[str, float]]:
    """The table rows of one run: its continuous-time test terms (and, for the conditional model, those of its
    null class), from diffenc-evaluate's bpd.json."""
    evaluation = json.loads((run_dir / "evaluation" / "bpd.json").read_text())
    rows = {model: {term: evaluation["continuous"][term] for term in TERMS}}
    if model == "conditional":
        rows["null_class"] = {term: evaluation["unconditional"][term] for term in TERMS}
        rows["class_gain"] = evaluation["class_gain"]
    return rows


def save_guided_grids(run_dir: Path, args: argparse.Namespace) -> list[Path]:
    """Sample grids of the conditional pipeline in ``run_dir``: 10 samples of each class, class c in column c, one
    grid per guidance scale (the same seed for every scale)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from diffenc_diffusers import DiffEncPipeline
    from diffenc_diffusers.evaluation import generate_samples, make_grid, save_png

    pipe = DiffEncPipeline.from_pretrained(str(run_dir))
    pipe.set_progress_bar_config(disable=True)
    num_classes = pipe.unet.config.num_class_embeds
    labels = torch.arange(10 * num_classes) % num_classes
    paths = []
    for scale in args.guidance_scales:
        samples = generate_samples(
            pipe, len(labels), args.seeds[0], SAMPLING_STEPS[args.dataset], len(labels), 1.0, labels, scale
        )
        path = args.docs / f"{args.dataset}_classcond_samples_guidance{scale:g}.png"
        paths.append(save_png(make_grid(samples), path))
    return paths


def plot_gain_curves(run_dirs: list[Path], names: list[str], bound: float, path: Path) -> None:
    """The periodic EMA test bits/dim of each conditional run minus its null class's (the same images and draws)
    against the step, one line per run, with the exact-likelihood bound -log2(K)/D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for run_dir, name in zip(run_dirs, names, strict=True):
        curves = read_curves(run_dir, ("test/bpd", "test_unconditional/bpd"))
        null = dict(curves["test_unconditional/bpd"])
        steps = [step for step, _ in curves["test/bpd"] if step in null]
        gain = [value - null[step] for step, value in curves["test/bpd"] if step in null]
        axis.plot(steps, gain, marker="o", label=name)
    axis.axhline(-bound, color="grey", linestyle="--", label="-log2(K)/D (exact likelihoods)")
    axis.axhline(0.0, color="black", linewidth=0.5)
    axis.set(xlabel="step", ylabel="bits/dim", title="-log p(x | c) minus null class, EMA test ELBO")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    jobs = [(model, seed) for seed in args.seeds for model in MODELS]
    run_dirs = run_all(jobs, lambda model, seed: run_one(model, seed, args), args.jobs)

    runs: dict[int, dict[str, dict[str, float]]] = {seed: {} for seed in args.seeds}
    for (model, seed), run_dir in run_dirs.items():
        runs[seed].update(read_run(model, run_dir))
    results: dict = {"dataset": args.dataset, "steps": args.steps, "seeds": args.seeds, "repeats": args.repeats}
    results["runs"] = {f"{row}-seed{seed}": runs[seed][row] for seed in args.seeds for row in ROWS}
    # diffenc-evaluate's per-image paired conditional - null class difference of each conditional run.
    results["class_gain"] = {f"seed{seed}": runs[seed]["class_gain"] for seed in args.seeds}
    results["models"], results["differences"] = {}, {}
    table = ["| model | test bpd | loss_recon | loss_klz | loss_diff |", "|---|---|---|---|---|"]
    for row, title in ROWS.items():
        summary = {term: mean_and_standard_error([runs[seed][row][term] for seed in args.seeds]) for term in TERMS}
        results["models"][row] = {term: {"mean": m, "se": se} for term, (m, se) in summary.items()}
        table.append(f"| {title} | " + " | ".join(f"{m:.4f} ± {se:.4f}" for m, se in summary.values()) + " |")
    # Within a seed every row is evaluated on the same test images with the same draws of t and noise, so the
    # per-seed differences are paired comparisons.
    table += [
        "",
        "| difference (paired by seed) | test bpd | loss_recon | loss_klz | loss_diff |",
        "|---|---|---|---|---|",
    ]
    for name, (first, second) in DIFFERENCES.items():
        differences = {
            term: mean_and_standard_error([runs[s][first][term] - runs[s][second][term] for s in args.seeds])
            for term in TERMS
        }
        results["differences"][name] = {term: {"mean": m, "se": se} for term, (m, se) in differences.items()}
        table.append(f"| {name} | " + " | ".join(f"{m:+.4f} ± {se:.4f}" for m, se in differences.values()) + " |")

    args.docs.mkdir(parents=True, exist_ok=True)
    prefix = f"{args.dataset}_classcond"
    first = run_dirs[("conditional", args.seeds[0])] / "evaluation"
    shutil.copy(first / "encoder.png", args.docs / f"{prefix}_encoder.png")
    save_guided_grids(run_dirs[("conditional", args.seeds[0])], args)
    gains = [results["class_gain"][f"seed{seed}"] for seed in args.seeds]
    table += [
        "",
        "Per-image conditional - null class difference of each conditional run (mean ± s.e. over test images): "
        + ", ".join(
            f"seed {s} {g['bpd_difference']:+.4f} ± {g['se']:.4f}" for s, g in zip(args.seeds, gains, strict=True)
        )
        + f"; the bound for exact likelihoods is -log2(K)/D = {-gains[0]['max_gain']:.4f} bits/dim.",
    ]
    conditional_runs = [run_dirs[("conditional", seed)] for seed in args.seeds]
    names = [f"seed {seed}" for seed in args.seeds]
    plot_gain_curves(conditional_runs, names, gains[0]["max_gain"], args.docs / f"{prefix}_gain.png")
    text = "\n".join(table) + "\n"
    (args.docs / f"{prefix}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.docs / f"{prefix}_table.md").write_text(text)
    print(text)
    print(f"Results in {args.docs}; runs in {args.out}")


if __name__ == "__main__":
    main()
