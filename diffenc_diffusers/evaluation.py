"""Likelihood evaluation, sample grids and the encoder figure for DiffEnc / VDM pipelines.

The console command ``diffenc-evaluate`` (also ``python training/evaluate_diffenc.py``) runs :func:`main`:

    diffenc-evaluate --pipeline outputs/digits --dataset digits --num_timesteps 10 100 --repeats 3 \\
        --output_json outputs/digits/eval.json --sample_grid outputs/digits/samples.png \\
        --encoder_figure outputs/digits/encoder.png

``--dataset`` is a built-in dataset (``digits``, ``mnist5k``; see :data:`diffenc_diffusers.data.BUILTIN_DATASETS`),
a Hugging Face datasets name, or, with ``--train_data_dir``, an image folder.

It writes a JSON file with the test-set negative ELBO in bits per dimension, in continuous time and for each
requested number of steps T (mean, standard error over images, standard error over repeated draws of t and
the noise, and the mean of each term), plus the mean diffusion term at each t of a grid, which shows where the
loss comes from. training/README.md documents every field.

For a class-conditional pipeline the test split's labels are used (the conditional ELBO -log p(x | c)); with a
null class the same model's unconditional ELBO and the per-image gain from knowing the class are reported too,
sample grids cycle through the classes (``--guidance_scale``), and the encoder figure shows one image per class.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import BUILTIN_DATASETS
from .discretization import uint8_to_grid
from .models.class_embedding import check_class_labels
from .objective import DiffEncObjective, network_classes, networks_in_eval_mode

TERMS = ("bpd", "loss_recon", "loss_klz", "loss_diff")
"""The per-image terms, in bits/dim: the total and its reconstruction, prior and diffusion parts."""


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed of repeat ``repeat``'s generator (a fixed function of both, so repeats are independent)."""
    words = np.random.SeedSequence([seed, repeat]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _objective(pipe: Any, num_timesteps: int | None) -> DiffEncObjective:
    """The ELBO of the pipeline's networks and schedule, with T = ``num_timesteps`` (None: continuous)."""
    return DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder, num_timesteps=num_timesteps)


def _device(pipe: Any) -> torch.device:
    return next(pipe.unet.parameters()).device


def _encoder_is_conditional(pipe: Any) -> bool:
    """Whether the pipeline has an encoder network that takes class labels."""
    return network_classes(getattr(pipe, "encoder", None))[0] is not None


@torch.no_grad()
def bits_per_dim_terms(
    pipe: Any,
    images: torch.Tensor,
    batch_size: int = 128,
    num_timesteps: int | None = None,
    seed: int = 0,
    repeats: int = 1,
    class_labels: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Per-image negative ELBO terms in bits/dim, for ``repeats`` independent draws of t and the noise.

    Draw r uses a generator seeded with :func:`repeat_seed` (seed, r), passed through
    ``pipe.bits_per_dim``. Within a batch t is low-discrepancy, as in training.

    Args:
        pipe: a DiffEncPipeline (its unet, scheduler and encoder are used).
        images: uint8 (N, C, H, W).
        batch_size: images per forward pass.
        num_timesteps: T of the diffusion loss; None for continuous time.
        seed: base seed of the draws.
        repeats: number of independent draws.
        class_labels: int (N,) labels of a class-conditional pipeline (the conditional ELBO; the null label
            gives its unconditional model's); None for an unconditional one.

    Returns:
        ``{term: array of shape (repeats, N)}`` for each of :data:`TERMS`, float64, bits/dim.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"`images` must be uint8 (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)}.")
    device = _device(pipe)
    results: dict[str, list[np.ndarray]] = {term: [] for term in TERMS}
    for repeat in range(repeats):
        generator = torch.Generator(device=device).manual_seed(repeat_seed(seed, repeat))
        output = pipe.bits_per_dim(
            images,
            batch_size=batch_size,
            num_timesteps=num_timesteps,
            generator=generator,
            show_progress=False,
            class_labels=class_labels,
        )
        for term in TERMS:
            results[term].append(torch.as_tensor(getattr(output, term)).double().cpu().numpy())
    return {term: np.stack(values) for term, values in results.items()}


def standard_error(values: np.ndarray) -> float | None:
    """Standard error of the mean of a 1-D sample (None for fewer than two values)."""
    if values.size < 2:
        return None
    return float(values.std(ddof=1) / math.sqrt(values.size))


def summarize_terms(terms: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean and standard errors of per-image terms of shape (repeats, N).

    Returns a dict with ``bpd`` (the mean over images and draws), ``se_images`` (standard error over the N
    images of each image's mean over draws), ``se_repeats`` (standard error over the draws of each draw's mean
    over images; None for one draw), the mean of each term (``loss_recon``, ``loss_klz``, ``loss_diff``),
    ``num_images`` and ``repeats``. All values are bits/dim.
    """
    bpd = terms["bpd"]
    summary = {
        "bpd": float(bpd.mean()),
        "se_images": standard_error(bpd.mean(axis=0)),
        "se_repeats": standard_error(bpd.mean(axis=1)),
    }
    summary.update({term: float(terms[term].mean()) for term in TERMS[1:]})
    summary.update({"num_images": int(bpd.shape[1]), "repeats": int(bpd.shape[0])})
    return summary


@torch.no_grad()
def diffusion_bpd_per_t(
    pipe: Any,
    images: torch.Tensor,
    t_values: list[float],
    num_timesteps: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    class_labels: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """The diffusion term at fixed times t, averaged over images: where the loss comes from.

    In continuous time the diffusion term of one image is an expectation over t ~ U(0, 1) of the value at t,
    so the mean over an even grid of t (midpoints) estimates the diffusion bits/dim. With T steps, t selects
    the step from (i + 1) / T to i / T with i = floor(t T). ``class_labels`` (N,) are the labels of the images
    for a class-conditional pipeline (None for an unconditional one).

    Returns:
        one dict per t: ``t``, ``loss_diff`` (mean over images, bits/dim) and ``se`` (its standard error
        over images).
    """
    objective = _objective(pipe, num_timesteps)
    device = _device(pipe)
    rows = []
    with networks_in_eval_mode(objective):
        for index, t_value in enumerate(t_values):
            generator = torch.Generator(device=device).manual_seed(repeat_seed(seed, 1_000_003 + index))
            values = []
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(device)
                labels = None if class_labels is None else class_labels[start : start + batch_size].to(device)
                t = torch.full((len(batch),), float(t_value), dtype=torch.float64, device=device)
                output = objective(batch, t=t, generator=generator, class_labels=labels)
                values.append(output.loss_diff.double().cpu())
            per_image = torch.cat(values).numpy()
            rows.append({"t": float(t_value), "loss_diff": float(per_image.mean()), "se": standard_error(per_image)})
    return rows


def t_grid(num_points: int) -> list[float]:
    """Midpoints (k + 0.5) / K of K = ``num_points`` equal intervals of [0, 1]."""
    return [(k + 0.5) / num_points for k in range(num_points)]


def make_grid(images: np.ndarray, min_cell: int = 32, columns: int | None = None) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) row by row into a grid (uint8, H', W', C) with 1-pixel gaps: ``columns``
    wide, or near-square when None.

    Small images are enlarged by an integer factor (nearest neighbour) so each cell is at least ``min_cell``
    pixels high; this is for display only.
    """
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise ValueError(f"`columns` must be a positive int or None (near-square), got {columns!r}.")
    count, height, width, channels = images.shape
    scale = max(1, math.ceil(min_cell / height))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = height * scale, width * scale
    columns = math.ceil(math.sqrt(count)) if columns is None else min(columns, count)
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * (height + 1) + 1, columns * (width + 1) + 1, channels), dtype=np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = 1 + row * (height + 1), 1 + column * (width + 1)
        grid[top : top + height, left : left + width] = images[index]
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Save a uint8 image (H, W, 1 or 3) as PNG, creating the folder."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path


def generate_samples(
    pipe: Any,
    num_images: int,
    seed: int = 0,
    num_inference_steps: int = 256,
    batch_size: int = 128,
    eta: float = 1.0,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> np.ndarray:
    """``num_images`` samples as uint8 (N, H, W, C), drawn with one generator seeded with ``seed``; for a
    class-conditional pipeline, of the classes ``class_labels`` (N,) with classifier-free ``guidance_scale``."""
    device = _device(pipe)
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    for start in range(0, num_images, batch_size):
        size = min(batch_size, num_images - start)
        conditioning = {}
        if class_labels is not None:
            conditioning = {"class_labels": class_labels[start : start + size], "guidance_scale": guidance_scale}
        output = pipe(
            batch_size=size,
            generator=generator,
            num_inference_steps=num_inference_steps,
            output_type="np",
            eta=eta,
            **conditioning,
        )
        chunks.append(np.asarray(output.images))
    images = np.concatenate(chunks)
    if images.ndim == 3:
        images = images[..., None]
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_sample_grid(
    pipe: Any,
    path: str | Path,
    num_images: int = 64,
    seed: int = 0,
    num_inference_steps: int = 256,
    batch_size: int = 128,
    eta: float = 1.0,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    columns: int | None = None,
) -> np.ndarray:
    """Sample ``num_images`` images (of the classes ``class_labels``, for a class-conditional pipeline) and save
    them as one grid PNG at ``path``, ``columns`` wide (near-square if None; with labels arange(N) % K and
    ``columns=K`` column k holds class k); returns the grid (H, W, C)."""
    samples = generate_samples(
        pipe, num_images, seed, num_inference_steps, batch_size, eta, class_labels, guidance_scale
    )
    grid = make_grid(samples, columns=columns)
    save_png(grid, path)
    return grid


@torch.no_grad()
def save_encoder_figure(
    pipe: Any,
    images: torch.Tensor,
    t_values: list[float],
    path: str | Path,
    class_labels: torch.Tensor | None = None,
) -> Path | None:
    """The encoder figure of the DiffEnc paper: for each image (a row), x, then x_phi(x, t) - x and
    y_phi(x, t) at each t.

    Each difference and y panel is scaled to its own symmetric range (shown in its title) with a diverging
    colour map for grayscale, or mapped to [0, 1] per panel for RGB. A non-trainable DiffEnc has no y panels
    (x_phi - x = -sigma_t^2 x). A VDM has no encoder (x_phi = x): nothing is drawn and None is returned.

    Args:
        pipe: the pipeline.
        images: uint8 (N, C, H, W), a few test images.
        t_values: times in [0, 1].
        path: where the PNG goes.
        class_labels: int (N,) labels of the images, for a class-conditional pipeline: a conditional encoder
            encodes each row with its label (required there), and each row's first title names the class.
            Refused for an unconditional pipeline.
    """
    objective = _objective(pipe, None)
    labels = _figure_labels(objective, _encoder_is_conditional(pipe), class_labels, len(images))
    if not objective.forward_process.has_encoding:
        return None
    return _draw_encoder_figure(objective, images, labels, t_values, path, class_difference=False)


@torch.no_grad()
def save_class_encoder_figure(
    pipe: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    t_values: list[float],
    path: str | Path,
) -> Path | None:
    """The per-class encoder figure of a class-conditional pipeline: the first image of each class present in
    ``labels`` (a row per class, in class order), drawn as :func:`save_encoder_figure` draws a row, each encoded
    with its label. For a conditional encoder with a null class each t also gets the panel
    y_phi(x, t, c) - y_phi(x, t, null): what knowing the class changes in the encoding.

    Args:
        pipe: a class-conditional pipeline.
        images: uint8 (N, C, H, W), e.g. the test set.
        labels: int (N,) class labels 0 .. K - 1 of ``images``.
        t_values: times in [0, 1].
        path: where the PNG goes.

    Returns:
        The path, or None for a VDM (no encoder, nothing drawn).
    """
    objective = _objective(pipe, None)
    if objective.num_classes is None:
        raise ValueError("`save_class_encoder_figure` needs a class-conditional pipeline; this one is unconditional.")
    if images.ndim != 4 or labels.shape != (len(images),):
        raise ValueError(
            f"`images` (N, C, H, W) and `labels` (N,) must describe the same images; got shapes "
            f"{tuple(images.shape)} and {tuple(labels.shape)}."
        )
    labels = check_class_labels(labels, len(images), objective.num_classes, False)
    if not objective.forward_process.has_encoding:
        return None
    classes = sorted(set(labels.tolist()))
    first = torch.tensor([int((labels == label).nonzero()[0]) for label in classes])
    with_difference = _encoder_is_conditional(pipe) and objective.null_label is not None
    return _draw_encoder_figure(objective, images[first], labels[first], t_values, path, with_difference)


def _figure_labels(
    objective: DiffEncObjective, encoder_is_conditional: bool, class_labels: torch.Tensor | None, count: int
) -> torch.Tensor | None:
    """The checked labels of an encoder figure's rows (None without labels)."""
    if class_labels is None:
        if encoder_is_conditional:
            raise ValueError(
                f"The encoder is class-conditional (num_class_embeds={objective.num_classes}): pass "
                "`class_labels`, one label per image."
            )
        return None
    if objective.num_classes is None:
        raise ValueError("`class_labels` were given, but this pipeline's models are unconditional.")
    return check_class_labels(class_labels, count, objective.num_classes, objective.null_label is not None)


def _draw_encoder_figure(
    objective: DiffEncObjective,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    t_values: list[float],
    path: str | Path,
    class_difference: bool,
) -> Path:
    """Rows of x, then per t: x_phi - x, y_phi (trainable) and y_phi(c) - y_phi(null) (``class_difference``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(objective.unet.parameters()).device
    x = uint8_to_grid(images.to(device))
    labels = None if labels is None else labels.to(device)
    null = None if labels is None or objective.null_label is None else torch.full_like(labels, objective.null_label)
    panels = []  # per t: [(title, values (N, C, H, W))]
    with networks_in_eval_mode(objective):
        for t_value in t_values:
            gamma = objective.gamma(torch.full((len(x),), float(t_value), device=device))
            encoding = objective.encode(x, gamma, class_labels=labels)
            row = [(f"x_phi - x, t={t_value:.2f}", encoding.x_phi - x)]
            if encoding.y is not None:
                row.append((f"y_phi, t={t_value:.2f}", encoding.y))
            if class_difference:
                unconditional = objective.encode(x, gamma, class_labels=null)
                row.append((f"y(c) - y(null), t={t_value:.2f}", encoding.y - unconditional.y))
            panels.append(row)
    columns = 1 + sum(len(row) for row in panels)
    figure, axes = plt.subplots(len(x), columns, figsize=(1.3 * columns, 1.4 * len(x)), squeeze=False)

    def show(axis: Any, value: torch.Tensor, title: str, signed: bool) -> None:
        array = value.float().cpu().permute(1, 2, 0).numpy()
        if array.shape[-1] == 1:
            limit = float(np.abs(array).max()) if signed else 1.0
            axis.imshow(array[..., 0], cmap="RdBu_r" if signed else "gray", vmin=-limit or -1, vmax=limit or 1)
        else:
            low, high = float(array.min()), float(array.max())
            axis.imshow((array - low) / (high - low) if high > low else np.zeros_like(array))
        axis.set_title(title, fontsize=6)
        axis.set_xticks([])
        axis.set_yticks([])

    for row in range(len(x)):
        if labels is None:
            title = "x"
        elif int(labels[row]) == objective.null_label:
            title = "x, null class"
        else:
            title = f"x, class {int(labels[row])}"
        show(axes[row, 0], x[row], title, signed=False)
        column = 1
        for t_panels in panels:
            for name, values in t_panels:
                scale = float(values[row].abs().max())
                show(axes[row, column], values[row], f"{name}\n|max| {scale:.2g}", signed=True)
                column += 1
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def load_pipeline(name_or_path: str, device: str | None = None) -> Any:
    """A DiffEncPipeline from a local folder or a Hub id on ``device`` (default: cuda if present)."""
    from .pipeline_diffenc import DiffEncPipeline

    pipe = DiffEncPipeline.from_pretrained(name_or_path)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(
    pipe: Any,
    images: torch.Tensor,
    num_timesteps: list[int],
    repeats: int = 1,
    batch_size: int = 128,
    seed: int = 0,
    t_grid_points: int = 20,
    t_grid_num_images: int | None = 256,
    class_labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Test-set bits/dim in continuous time and for each T in ``num_timesteps``.

    Returns a dict with ``continuous`` and ``discrete`` (T as a string -> result); each result is
    :func:`summarize_terms`' dict plus ``bpd_per_t`` (:func:`diffusion_bpd_per_t` on ``t_grid_points``
    midpoints, over the first ``t_grid_num_images`` images, all if None), ``bpd_per_t_mean`` (the mean of that
    curve, an estimate of ``loss_diff``) and ``seconds``.

    A class-conditional pipeline needs ``class_labels`` (N,), the labels of the images: the results are then the
    conditional ELBO -log p(x | c). If its networks have a null class, the dict also holds ``unconditional``, the
    continuous-time result of the same model with every label the null label (its unconditional ELBO, on the
    same draws of t and the noise), and ``class_gain``, :func:`class_gain` of the two.
    """
    grid = t_grid(t_grid_points)
    grid_count = len(images) if t_grid_num_images is None else min(t_grid_num_images, len(images))

    def run(steps: int | None, labels: torch.Tensor | None) -> tuple[dict[str, Any], np.ndarray]:
        started = time.perf_counter()
        terms = bits_per_dim_terms(pipe, images, batch_size, steps, seed, repeats, labels)
        summary = summarize_terms(terms)
        grid_labels = None if labels is None else labels[:grid_count]
        per_t = diffusion_bpd_per_t(pipe, images[:grid_count], grid, steps, batch_size, seed, grid_labels)
        summary["bpd_per_t"] = per_t
        summary["bpd_per_t_mean"] = float(np.mean([row["loss_diff"] for row in per_t]))
        summary["bpd_per_t_num_images"] = grid_count
        summary["seconds"] = time.perf_counter() - started
        return summary, terms["bpd"]

    continuous, conditional_bpd = run(None, class_labels)
    results: dict[str, Any] = {
        "continuous": continuous,
        "discrete": {str(steps): run(steps, class_labels)[0] for steps in num_timesteps},
    }
    objective = _objective(pipe, None)
    if objective.null_label is not None and class_labels is not None:
        unconditional, unconditional_bpd = run(None, torch.full_like(class_labels, objective.null_label))
        results["unconditional"] = unconditional
        num_dims = int(np.prod(images.shape[1:]))
        results["class_gain"] = class_gain(conditional_bpd, unconditional_bpd, objective.num_classes, num_dims)
    return results


def class_gain(
    conditional: np.ndarray, unconditional: np.ndarray, num_classes: int, num_dims: int
) -> dict[str, float | int | None]:
    """The paired per-image difference of the conditional and the unconditional negative ELBO of one model.

    Args:
        conditional: bits/dim of shape (repeats, N), -log p(x | c) per draw and image.
        unconditional: the same with the null label, -log p(x), on the same draws.
        num_classes: K.
        num_dims: D = C H W.

    Returns:
        ``bpd_difference`` (the mean over images of each image's conditional minus unconditional bits/dim,
        averaged over draws; negative when knowing the class helps), ``se`` (its standard error over images),
        ``max_gain`` (log2(K) / D: for exact likelihoods the expected gain, unconditional minus conditional, is
        the mutual information I(x; c) / D <= H(c) / D <= log2(K) / D bits/dim), ``num_images`` and ``repeats``.
    """
    if conditional.shape != unconditional.shape or conditional.ndim != 2:
        raise ValueError(
            f"`conditional` and `unconditional` must have the same shape (repeats, N), got {conditional.shape} "
            f"and {unconditional.shape}."
        )
    difference = conditional.mean(axis=0) - unconditional.mean(axis=0)
    return {
        "bpd_difference": float(difference.mean()),
        "se": standard_error(difference),
        "max_gain": math.log2(num_classes) / num_dims,
        "num_images": int(difference.size),
        "repeats": int(conditional.shape[0]),
    }


def build_parser() -> argparse.ArgumentParser:
    """The ``diffenc-evaluate`` command line."""
    parser = argparse.ArgumentParser(
        prog="diffenc-evaluate",
        description="Test-set bits/dim (continuous and T-step), a sample grid and the encoder figure of a "
        "DiffEnc / VDM pipeline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pipeline", required=True, help="A saved pipeline folder or a Hub model id.")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--dataset",
        "--dataset_name",
        dest="dataset",
        help=f"A built-in dataset ({', '.join(map(repr, BUILTIN_DATASETS))}) or a datasets name.",
    )
    data.add_argument("--train_data_dir", help="An imagefolder directory (its test split or held-out part).")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--image_column", default=None)
    parser.add_argument(
        "--label_column",
        default=None,
        help="The column of integer class labels, for a class-conditional pipeline (default: the dataset's only "
        "ClassLabel column; the built-in datasets have their labels).",
    )
    parser.add_argument("--split", default="test", help="The split to evaluate.")
    parser.add_argument(
        "--holdout_fraction",
        type=float,
        default=0.05,
        help="As in training: the held-out fraction of 'train' when the data has no --split.",
    )
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--num_images", type=int, default=None, help="Evaluate the first N images (default all).")
    parser.add_argument("--num_timesteps", type=int, nargs="*", default=[], help="T values of discrete-time bpd.")
    parser.add_argument("--repeats", type=int, default=1, help="Independent draws of t and the noise per image.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--t_grid_points", type=int, default=20, help="Points of the per-t diffusion curve.")
    parser.add_argument("--t_grid_num_images", type=int, default=256, help="Images of the per-t curve.")
    parser.add_argument("--output_json", required=True, help="Where the results JSON goes.")
    parser.add_argument("--sample_grid", default=None, help="PNG path for a sample grid (omit: no sampling).")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--num_inference_steps", type=int, default=256)
    parser.add_argument("--eta", type=float, default=1.0, help="1: ancestral sampler, 0: deterministic.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="Classifier-free guidance of a class-conditional pipeline's sample grid (1: the conditional model; "
        "other values need a null class).",
    )
    parser.add_argument(
        "--encoder_figure",
        default=None,
        help="PNG path for the encoder figure (DiffEnc only; one test image per class for a conditional encoder).",
    )
    parser.add_argument(
        "--encoder_figure_images", type=int, default=4, help="Rows of the encoder figure (not the per-class one)."
    )
    parser.add_argument("--encoder_figure_t", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
    return parser


def non_finite_to_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts and lists) replaced by None, so that the JSON
    written holds ``null`` where JSON has no literal."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: non_finite_to_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [non_finite_to_null(item) for item in value]
    return value


def load_data_flags(
    args: argparse.Namespace, shape: tuple[int, int, int], train_split: str | None, test_split: str
) -> tuple[Any, Any, str]:
    """:func:`~diffenc_diffusers.data.load_image_splits` of the data flags that ``diffenc-evaluate`` and the
    trainer share (--dataset or --train_data_dir, --dataset_config_name, --image_column, --label_column,
    --cache_dir, --holdout_fraction). A failure of the datasets library (an unknown name offline:
    ConnectionError, ...) becomes a ``ValueError`` naming the flag, its value and what is accepted."""
    from .data import load_image_splits

    try:
        return load_image_splits(
            dataset_name=args.dataset,
            data_dir=args.train_data_dir,
            shape=shape,
            image_column=args.image_column,
            config_name=args.dataset_config_name,
            cache_dir=args.cache_dir,
            train_split=train_split,
            test_split=test_split,
            holdout_fraction=args.holdout_fraction,
            label_column=args.label_column,
        )
    except ValueError:
        raise
    except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        source = f"--dataset {args.dataset!r}" if args.dataset else f"--train_data_dir {args.train_data_dir!r}"
        raise ValueError(
            f"{source} could not be loaded ({type(error).__name__}: {error}). Accepted: a built-in dataset "
            f"({', '.join(sorted(BUILTIN_DATASETS))}), a Hugging Face datasets name (downloaded, or in the cache "
            "when offline) or an image folder (--train_data_dir)."
        ) from error


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ValueError(f"`--{name}` must be a positive integer, got {value!r}.")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``diffenc-evaluate``; returns the result dict that is also written to ``--output_json``."""
    from .data import check_labels
    from .training.config import check_writable

    args = build_parser().parse_args(argv)
    for name in ("repeats", "batch_size", "t_grid_points", "num_samples", "num_inference_steps"):
        _check_positive(name, getattr(args, name))
    for name in ("num_images", "t_grid_num_images"):
        _check_positive(name, getattr(args, name), allow_none=True)
    for steps in args.num_timesteps:
        _check_positive("num_timesteps", steps)
    if any(not 0.0 <= t <= 1.0 for t in args.encoder_figure_t):
        raise ValueError(f"`--encoder_figure_t` values must be in [0, 1], got {args.encoder_figure_t}.")

    if not math.isfinite(args.guidance_scale):
        raise ValueError(f"`--guidance_scale` must be finite, got {args.guidance_scale}.")
    if not 0.0 <= args.eta <= 1.0:
        raise ValueError(f"`--eta` must be in [0, 1] (1: ancestral, 0: deterministic), got {args.eta}.")
    if not 0.0 < args.holdout_fraction < 1.0:
        raise ValueError(f"`--holdout_fraction` must be in (0, 1), got {args.holdout_fraction}.")
    check_writable(Path(args.output_json), "--output_json", folder=False)
    for name in ("sample_grid", "encoder_figure"):
        if getattr(args, name) is not None:
            check_writable(Path(getattr(args, name)), f"--{name}", folder=False)

    started = time.perf_counter()
    pipe = load_pipeline(args.pipeline, args.device)
    objective = _objective(pipe, None)
    num_classes = objective.num_classes
    if args.guidance_scale != 1.0 and objective.null_label is None:
        kind = "unconditional" if num_classes is None else "class-conditional without a null class"
        raise ValueError(
            f"`--guidance_scale {args.guidance_scale}` needs a class-conditional pipeline with a null class; this "
            f"one is {kind}. Use --guidance_scale 1."
        )
    config = pipe.unet.config
    shape = (int(config.in_channels), int(config.sample_size), int(config.sample_size))
    _, test, description = load_data_flags(args, shape, train_split=None, test_split=args.split)
    images = test.to_tensor()
    labels = None
    if num_classes is not None:
        if not test.has_labels:
            raise ValueError(
                f"The pipeline is class-conditional (num_class_embeds={num_classes}) but {description} has no "
                "class labels: name the column that holds them with --label_column."
            )
        labels = test.labels_tensor()
    if args.num_images is not None and args.num_images < len(images):
        images = images[: args.num_images]
        labels = None if labels is None else labels[: args.num_images]
        description = f"the first {len(images)} images of {description}"
    if labels is not None:
        check_labels(labels, num_classes, description)

    results = evaluate(
        pipe,
        images,
        args.num_timesteps,
        repeats=args.repeats,
        batch_size=args.batch_size,
        seed=args.seed,
        t_grid_points=args.t_grid_points,
        t_grid_num_images=args.t_grid_num_images,
        class_labels=labels,
    )
    output: dict[str, Any] = {
        "pipeline": args.pipeline,
        "encoder_type": pipe.scheduler.config.encoder_type,
        "dataset": args.dataset or args.train_data_dir,
        "split": args.split,
        "test_set": description,
        "num_images": len(images),
        "repeats": args.repeats,
        "seed": args.seed,
        "seeds": [repeat_seed(args.seed, repeat) for repeat in range(args.repeats)],
        "class_conditional": num_classes is not None,
        "num_classes": num_classes,
        "guidance_scale": args.guidance_scale if num_classes is not None else None,
        "continuous": results["continuous"],
        "discrete": results["discrete"],
        "unconditional": results.get("unconditional"),
        "class_gain": results.get("class_gain"),
        "sample_grid": None,
        "sampling": None,
        "encoder_figure": None,
    }
    if args.sample_grid is not None:
        sampling_started = time.perf_counter()
        sample_labels = None if num_classes is None else torch.arange(args.num_samples) % num_classes
        save_sample_grid(
            pipe,
            args.sample_grid,
            args.num_samples,
            args.seed,
            args.num_inference_steps,
            args.batch_size,
            args.eta,
            class_labels=sample_labels,
            guidance_scale=args.guidance_scale,
            columns=num_classes,
        )
        output["sample_grid"] = str(args.sample_grid)
        output["sampling"] = {
            "num_samples": args.num_samples,
            "num_inference_steps": args.num_inference_steps,
            "eta": args.eta,
            "seconds": time.perf_counter() - sampling_started,
        }
    if args.encoder_figure is not None:
        if _encoder_is_conditional(pipe):
            figure = save_class_encoder_figure(pipe, images, labels, args.encoder_figure_t, args.encoder_figure)
        else:
            count = args.encoder_figure_images
            figure = save_encoder_figure(
                pipe,
                images[:count],
                args.encoder_figure_t,
                args.encoder_figure,
                class_labels=None if labels is None else labels[:count],
            )
        output["encoder_figure"] = str(figure) if figure is not None else None
    output["seconds"] = time.perf_counter() - started

    path = Path(args.output_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(non_finite_to_null(output), indent=1, allow_nan=False))
    continuous = output["continuous"]
    kind = "continuous time" if num_classes is None else "continuous time, conditional on the class"
    if output["unconditional"] is not None:
        kind += f"; unconditional {output['unconditional']['bpd']:.4f}"
    print(f"{description}: {continuous['bpd']:.4f} bits/dim ({kind}), written to {path}")
    return output


def cli() -> None:
    """The ``diffenc-evaluate`` console command: :func:`main` on ``sys.argv``, exiting 0 on success (a console
    script passes its function's return value to ``sys.exit``, so this returns nothing)."""
    main()


if __name__ == "__main__":
    cli()
