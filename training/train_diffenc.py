#!/usr/bin/env python
"""Train a VDM or DiffEnc model on 8-bit images with Hugging Face accelerate.

    accelerate launch training/train_diffenc.py --preset digits-diffenc-trainable --output_dir outputs/digits
    python training/train_diffenc.py --preset cifar10-diffenc-32-4 --output_dir out/c10 --mixed_precision bf16
    torchrun --nproc_per_node 2 training/train_diffenc.py --cpu --preset digits-vdm --output_dir outputs/ddp

The model comes from a preset folder (``pipelines/<name>/``) or any folder laid out like one: a diffusers
pipeline folder without weights plus ``training_config.json``, whose keys are training flags (without the
dashes) and set their defaults; flags given on the command line win. The run minimises the per-image negative
ELBO in bits/dim (``DiffEncObjective``) with AdamW, keeps an EMA of every trained parameter (denoiser,
encoder, learned schedule endpoints), writes atomic checkpoints it can resume from exactly, logs to
TensorBoard, and finally saves the EMA pipeline with ``save_pretrained`` into ``--output_dir`` (optionally
pushing it to the Hub).

Determinism: the image order is a stream of permutations seeded by (``--seed``, epoch), read from a position
stored in checkpoints, and everything else random in an update step (flips, t, eps, eps_0, dropout masks) is
drawn from generators seeded by (``--seed``, step, micro-step). So a resumed run continues exactly as the
uninterrupted one would, and the same global batch on 1 or N processes sees the same data and noise (t, eps
and eps_0 are drawn for the whole global batch and each process takes its slice).

See training/README.md for every flag, the checkpoint layout and the outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from diffenc_diffusers import DiffEncObjective, DiffEncPipeline, VDMScheduler  # noqa: E402
from diffenc_diffusers.data import DIGITS_NAME, UInt8ImageDataset, load_image_splits  # noqa: E402

logger = logging.getLogger("train_diffenc")

TRAINING_CONFIG_NAME = "training_config.json"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "checkpoint_complete.json"
CHECKPOINT_FORMAT_VERSION = 1
TEST_BPD_NAME = "test_bpd.json"
MODEL_CARD_NAME = "README.md"
TERM_NAMES = ("bpd", "loss_recon", "loss_klz", "loss_diff")

# Salts that keep the random streams of one step apart.
_SALT_BATCH, _SALT_DROPOUT, _SALT_DATA_ORDER = 1, 2, 3


# ----------------------------------------------------------------------------------------------------
# Flags


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def timesteps_type(text: str) -> int | str:
    """argparse type of --num_timesteps: a positive int T, or 'continuous' (T = infinity)."""
    if text == "continuous":
        return text
    return positive_int(text)


def bool_type(text: str) -> bool:
    """Type of a boolean training_config value given as a string (true/false, 1/0, yes/no)."""
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text}")


MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
LR_SCHEDULER_CHOICES = ("constant_with_warmup", "linear", "cosine", "constant")

# The flags that a preset's training_config.json may set: name -> (type, built-in default, help).
TRAINING_CONFIG_FLAGS: dict[str, tuple[Callable[[str], Any], Any, str]] = {
    "dataset": (
        str,
        None,
        f"'{DIGITS_NAME}' (built in) or a Hugging Face datasets name, e.g. uoft-cs/cifar10.",
    ),
    "resolution": (
        positive_int,
        None,
        "Image height and width; images are never resized.",
    ),
    "train_batch_size": (positive_int, 128, "Images per process per micro-step."),
    "learning_rate": (positive_float, 2e-4, "AdamW learning rate after warm-up."),
    "adam_beta1": (unit_interval, 0.9, "AdamW beta1."),
    "adam_beta2": (unit_interval, 0.99, "AdamW beta2."),
    "adam_weight_decay": (
        non_negative_float,
        0.01,
        "AdamW weight decay (not applied to biases, norms, scalars).",
    ),
    "lr_warmup_steps": (non_negative_int, 100, "Linear learning-rate warm-up, in update steps."),
    "max_train_steps": (positive_int, None, "Update steps to train for."),
    "ema_decay": (
        unit_interval,
        0.9999,
        "Largest EMA decay (EMAModel's warm-up (1 + n) / (10 + n) below it).",
    ),
    "num_timesteps": (timesteps_type, "continuous", "Diffusion loss of training: 'continuous' or T steps."),
    "max_grad_norm": (non_negative_float, 1.0, "Clip the global gradient norm to this (0: no clipping)."),
    "mixed_precision": (str, "no", f"One of {list(MIXED_PRECISION_CHOICES)}; ELBO terms stay fp32."),
    "gradient_accumulation_steps": (positive_int, 1, "Micro-steps per update step."),
    "checkpointing_steps": (positive_int, 5000, "Write a checkpoint every N update steps."),
    "eval_batch_size": (positive_int, 128, "Batch size of test-set bits/dim and sampling."),
    "random_flip": (bool_type, False, "Flip training images horizontally at random (exact, in uint8)."),
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        description="Train a VDM / DiffEnc model (DiffEncObjective, bits/dim) with accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--preset",
        required=True,
        help="A preset name (a folder under pipelines/) or the path of a pipeline config folder holding "
        "model_index.json, component configs and training_config.json.",
    )
    model.add_argument(
        "--dropout",
        type=unit_interval,
        default=None,
        help="Override the dropout of the denoiser and the encoder (None: the preset's).",
    )
    model.add_argument("--gradient_checkpointing", action="store_true", help="Checkpoint the denoiser's blocks.")

    config = parser.add_argument_group("training settings (default: the preset's training_config.json)")
    for name, (kind, default, help_text) in TRAINING_CONFIG_FLAGS.items():
        flags = ["--dataset", "--dataset_name"] if name == "dataset" else [f"--{name}"]
        # Unset flags stay absent (SUPPRESS) so that the preset's value can fill them.
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if kind is bool_type:
            options["action"] = argparse.BooleanOptionalAction
        elif name == "mixed_precision":
            options["choices"] = MIXED_PRECISION_CHOICES
        else:
            options["type"] = kind
        fallback = {
            "dataset": "--train_data_dir is required",
            "resolution": "the denoiser's sample_size",
            "max_train_steps": "required",
        }.get(name, f"default {default}")
        config.add_argument(*flags, help=f"{help_text} (preset's value; else {fallback})", **options)

    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_data_dir", default=None, help="An imagefolder directory to train on (instead of --dataset)."
    )
    data.add_argument("--dataset_config_name", default=None, help="The datasets configuration name, if any.")
    data.add_argument("--image_column", default=None, help="The column holding the images (found if omitted).")
    data.add_argument("--train_split", default="train", help="The split to train on.")
    data.add_argument("--test_split", default="test", help="The held-out split for bits/dim.")
    data.add_argument(
        "--holdout_fraction",
        type=float,
        default=0.05,
        help="Fraction of the train split held out (seeded) when the data has no --test_split.",
    )
    data.add_argument("--cache_dir", default=None, help="datasets cache directory.")
    data.add_argument("--dataloader_num_workers", type=non_negative_int, default=0, help="DataLoader workers.")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="AdamW epsilon.")
    optim.add_argument("--lr_scheduler", choices=LR_SCHEDULER_CHOICES, default="constant_with_warmup")
    optim.add_argument("--seed", type=int, default=0, help="Seed of the model's initialisation and all step noise.")
    optim.add_argument("--cpu", action="store_true", help="Train on CPU even if an accelerator is present.")

    output = parser.add_argument_group("output, checkpoints, logging")
    output.add_argument("--output_dir", required=True, help="Where the pipeline, checkpoints and logs go.")
    output.add_argument(
        "--checkpoints_total_limit",
        type=positive_int,
        default=None,
        help="Keep at most this many checkpoints.",
    )
    output.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (the newest complete checkpoint in --output_dir; start fresh if there is none) or a "
        "checkpoint folder.",
    )
    output.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir.")
    output.add_argument("--report_to", choices=("tensorboard", "none"), default="tensorboard")
    output.add_argument(
        "--validation_steps",
        type=non_negative_int,
        default=1000,
        help="Every N update steps, save an EMA sample grid and log EMA test bits/dim (0: at the end only).",
    )
    output.add_argument("--num_validation_images", type=positive_int, default=64, help="Images in a sample grid.")
    output.add_argument("--num_inference_steps", type=positive_int, default=256, help="Sampling steps of grids.")
    output.add_argument(
        "--eval_num_images", type=positive_int, default=1000, help="Test images of the periodic bits/dim."
    )
    output.add_argument(
        "--final_eval_num_images",
        type=positive_int,
        default=None,
        help="Test images of the final bits/dim (default: the whole test set).",
    )

    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the final EMA pipeline and model card.")
    hub.add_argument("--hub_model_id", default=None, help="Repository id (default: the --output_dir name).")
    hub.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one).")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")
    return parser


def resolve_preset(name_or_path: str) -> Path:
    """The folder of a preset name (under ``pipelines/``) or path; else ``ValueError`` listing presets."""
    from diffenc_diffusers.pipeline_diffenc import resolve_preset as resolve

    try:
        folder = resolve(name_or_path)
    except FileNotFoundError as error:
        raise ValueError(f"--preset {name_or_path!r}: {error}") from None
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--preset {name_or_path!r}: {folder} has no model_index.json, so it is no preset.")
    return folder


def read_training_config(folder: Path) -> dict[str, Any]:
    """The preset's training_config.json (empty if absent), each value checked with its flag's type."""
    path = folder / TRAINING_CONFIG_NAME
    if not path.is_file():
        return {}
    values = json.loads(path.read_text())
    unknown = sorted(set(values) - set(TRAINING_CONFIG_FLAGS))
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; accepted keys: {sorted(TRAINING_CONFIG_FLAGS)}.")
    checked = {}
    for name, value in values.items():
        if value is None:
            continue
        kind = TRAINING_CONFIG_FLAGS[name][0]
        try:
            checked[name] = kind(str(value).lower() if isinstance(value, bool) else str(value))
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise ValueError(f"{path}: {name!r} = {value!r} is invalid: {error}.") from None
    if checked.get("mixed_precision", "no") not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"{path}: 'mixed_precision' must be one of {list(MIXED_PRECISION_CHOICES)}.")
    return checked


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags, fill unset training settings from the preset, and check everything that needs no data.

    Raises ``SystemExit`` (argparse) for malformed flags and ``ValueError`` for inconsistent ones, naming the
    flag, the value and what is accepted.
    """
    args = build_parser().parse_args(argv)
    if args.train_data_dir is not None and hasattr(args, "dataset"):
        raise ValueError(
            f"Give either --dataset ({args.dataset!r}) or --train_data_dir ({args.train_data_dir!r}), not both."
        )
    args.preset_dir = resolve_preset(args.preset)
    preset_config = read_training_config(args.preset_dir)
    for name, (_, default, _) in TRAINING_CONFIG_FLAGS.items():
        if not hasattr(args, name):
            setattr(args, name, preset_config.get(name, default))
    if args.num_timesteps == "continuous":
        args.num_timesteps = None

    if args.train_data_dir is not None:
        if not Path(args.train_data_dir).is_dir():
            raise ValueError(f"--train_data_dir {args.train_data_dir!r} is not a directory.")
        args.dataset = None
    elif args.dataset is None:
        raise ValueError(
            f"No training data: the preset {args.preset!r} names no dataset, so pass --dataset "
            f"('{DIGITS_NAME}' or a datasets name) or --train_data_dir (an image folder)."
        )
    if args.max_train_steps is None:
        raise ValueError(f"--max_train_steps is required (the preset {args.preset!r} does not set it).")
    if not 0.0 < args.holdout_fraction < 1.0:
        raise ValueError(f"--holdout_fraction must be in (0, 1), got {args.holdout_fraction}.")
    args.output_dir = Path(args.output_dir)
    return args


# ----------------------------------------------------------------------------------------------------
# Model


def build_components(args: argparse.Namespace) -> tuple[nn.Module, VDMScheduler, nn.Module | None]:
    """The untrained (unet, scheduler, encoder) of the preset, with --resolution and --dropout applied.

    The weights are initialised from ``torch.manual_seed(args.seed)``, so every process builds the same model.
    Raises ``ValueError`` if the encoder cannot pool --resolution or the preset is inconsistent.
    """
    torch.manual_seed(args.seed)
    pipe = DiffEncPipeline.from_preset(str(args.preset_dir))
    unet, scheduler, encoder = pipe.unet, pipe.scheduler, pipe.encoder
    if args.resolution is None:
        args.resolution = int(unet.config.sample_size)
    if encoder is not None:
        factor = 2 ** len(encoder.config.block_out_channels)
        if args.resolution % factor != 0:
            raise ValueError(
                f"--resolution {args.resolution} cannot be pooled by the preset's encoder, which halves the "
                f"resolution {len(encoder.config.block_out_channels)} times: use a multiple of {factor}."
            )
    overrides: dict[str, Any] = {}
    if unet.config.sample_size != args.resolution:
        overrides["sample_size"] = args.resolution
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    if overrides:
        torch.manual_seed(args.seed)
        unet = type(unet).from_config(unet.config, **overrides)
        if encoder is not None:
            encoder = type(encoder).from_config(encoder.config, **overrides)
    return unet, scheduler, encoder


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices and kernels (ndim >= 2), none on biases, norm scales and
    the scalar schedule endpoints (as VDM)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_pipeline(objective: DiffEncObjective) -> Any:
    """A DiffEncPipeline of the objective's current networks and (learned) schedule, in eval mode."""
    objective.unet.eval()
    if objective.encoder is not None:
        objective.encoder.eval()
    pipe = DiffEncPipeline(unet=objective.unet, scheduler=objective.export_scheduler(), encoder=objective.encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------
# Per-step randomness and data order


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed function of the integer ``keys`` (numpy's SeedSequence hashing)."""
    words = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def step_randomness(
    seed: int, step: int, micro_step: int, global_batch: int, shape: tuple[int, ...], rank: int, per_rank: int
) -> dict[str, torch.Tensor]:
    """t, eps, eps_0 and flips for this process' slice of one global micro-batch.

    They are drawn for the whole global batch of ``global_batch`` images from a generator seeded by
    (seed, step, micro_step), and process ``rank`` takes images ``[rank * per_rank, (rank + 1) * per_rank)``,
    so the values an image gets do not depend on how many processes share the batch. t is low-discrepancy over
    the global batch: t_i = (u + i / global_batch) mod 1 (float64).

    Returns:
        dict with ``t`` (per_rank,) float64, ``noise`` and ``recon_noise`` (per_rank, *shape) float32 and
        ``flip`` (per_rank,) bool.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, step, micro_step, _SALT_BATCH))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    t = torch.remainder(u + torch.arange(global_batch, dtype=torch.float64) / global_batch, 1.0)
    noise = torch.randn((global_batch, *shape), generator=generator)
    recon_noise = torch.randn((global_batch, *shape), generator=generator)
    flip = torch.rand(global_batch, generator=generator) < 0.5
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    return {"t": t[part], "noise": noise[part], "recon_noise": recon_noise[part], "flip": flip[part]}


class StreamBatchSampler(Sampler[list[int]]):
    """This process' index batches from an endless, seeded stream of epochs.

    The stream is the concatenation of permutations of ``range(num_images)``, epoch e's drawn from a generator
    seeded by (seed, e). Global micro-batch j holds stream positions ``[start + j * global_batch, ... +
    global_batch)``; process ``rank`` reads its ``per_rank`` consecutive positions of it. ``start`` (images
    consumed so far) is all a resumed run needs to continue the same order.
    """

    def __init__(self, num_images: int, per_rank: int, num_processes: int, rank: int, seed: int, start: int):
        self.num_images = num_images
        self.per_rank = per_rank
        self.global_batch = per_rank * num_processes
        self.rank = rank
        self.seed = seed
        self.start = start
        self._epoch = -1
        self._order: list[int] = []

    def position(self, index: int) -> int:
        """The image index at stream position ``index``."""
        epoch, offset = divmod(index, self.num_images)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _SALT_DATA_ORDER))
            self._order = torch.randperm(self.num_images, generator=generator).tolist()
            self._epoch = epoch
        return self._order[offset]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            first = position + self.rank * self.per_rank
            yield [self.position(index) for index in range(first, first + self.per_rank)]
            position += self.global_batch


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named exactly ``checkpoint-N``, else None."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint whose writing finished: its marker exists and lists files of the sizes
    written."""
    marker = path / CHECKPOINT_MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete ``checkpoint-N`` folder in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_dir() and is_complete_checkpoint(path):
            found.append((step, path))
    return sorted(found)


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the largest step; partial, temporary and unmarked folders never count."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted checkpoint writes and deletions (``checkpoint-N.tmp-*``,
    ``checkpoint-N.old-*``); returns what was deleted."""
    removed = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+\.(tmp|old)-\d+", path.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_checkpoint(output_dir: Path, step: int, write_files: Callable[[Path], None]) -> Path:
    """Write ``checkpoint-<step>`` atomically.

    ``write_files(folder)`` fills ``checkpoint-<step>.tmp-<pid>``; then the marker (listing every file and its
    size) is written last, everything is fsynced, and the folder is renamed to ``checkpoint-<step>`` with
    ``os.replace``. A crash at any point leaves either no ``checkpoint-<step>`` or a complete one (plus a
    temporary folder that :func:`find_latest_checkpoint` ignores and :func:`remove_partial_checkpoints`
    deletes).
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f"{CHECKPOINT_PREFIX}{step}.tmp-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    write_files(temporary)
    files = {path.name: path.stat().st_size for path in sorted(temporary.iterdir()) if path.is_file()}
    (temporary / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "files": files}, indent=1))
    for name in [*files, CHECKPOINT_MARKER]:
        with open(temporary / name, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(temporary)
    if final.exists():
        _delete_checkpoint(final)
    os.replace(temporary, final)
    _fsync_directory(output_dir)
    return final


def _delete_checkpoint(path: Path) -> None:
    """Rename first (atomic), then delete, so a half-deleted folder never carries a checkpoint's name."""
    doomed = path.with_name(f"{path.name}.old-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def prune_checkpoints(output_dir: Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints until at most ``limit`` remain; ``keep`` (the checkpoint this
    run resumed from) is never deleted and does not count. Returns the deleted folders."""
    if limit is None:
        return []
    keep = keep.resolve() if keep is not None else None
    candidates = [path for _, path in complete_checkpoints(output_dir) if path.resolve() != keep]
    doomed = candidates[: max(0, len(candidates) - limit)]
    for path in doomed:
        _delete_checkpoint(path)
    return doomed


def optimizer_state_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_files`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_training_state(
    folder: Path,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    state: dict[str, Any],
) -> None:
    """Write a checkpoint's files into ``folder``: weights, EMA and optimizer tensors as safetensors, the rest
    (step, data position, learning-rate schedule, EMA counters, grad scaler, flags) as JSON. Nothing is
    pickled."""
    from safetensors.torch import save_file

    names = [name for name, _ in model.named_parameters()]
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        folder / "model.safetensors",
    )
    ema_state = ema.state_dict()
    shadow = ema_state.pop("shadow_params")
    save_file(
        {name: tensor.detach().cpu().contiguous() for name, tensor in zip(names, shadow, strict=True)},
        folder / "ema.safetensors",
    )
    optimizer_tensors, optimizer_meta = optimizer_state_to_files(optimizer.state_dict())
    save_file(optimizer_tensors, folder / "optimizer.safetensors")
    full_state = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        **state,
        "ema": ema_state,
        "optimizer": optimizer_meta,
        "lr_scheduler": lr_scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
    }
    (folder / "training_state.json").write_text(json.dumps(full_state, indent=1))


def load_training_state(
    folder: Path,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into the given objects; returns the JSON state."""
    from safetensors.torch import load_file

    if not is_complete_checkpoint(folder):
        raise ValueError(
            f"--resume_from_checkpoint {str(folder)!r} is not a complete checkpoint (no valid "
            f"{CHECKPOINT_MARKER}; it may have been cut off while being written)."
        )
    state = json.loads((folder / "training_state.json").read_text())
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{folder} has checkpoint format {state.get('format_version')}, not {CHECKPOINT_FORMAT_VERSION}."
        )
    device = next(model.parameters()).device
    try:
        model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    except RuntimeError as error:
        raise ValueError(f"{folder} holds the weights of another model than --preset builds: {error}") from None
    shadow = load_file(folder / "ema.safetensors", device=str(device))
    names = [name for name, _ in model.named_parameters()]
    if sorted(shadow) != sorted(names):
        raise ValueError(f"{folder}/ema.safetensors does not hold this model's parameters.")
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[name] for name in names]})
    optimizer.load_state_dict(
        optimizer_state_from_files(load_file(folder / "optimizer.safetensors"), state["optimizer"])
    )
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["grad_scaler"] is not None:
        scaler.load_state_dict(state["grad_scaler"])
    return state


# ----------------------------------------------------------------------------------------------------
# Hub


def training_info(args: argparse.Namespace, steps: int, world: int, test_set: str) -> dict[str, Any]:
    """The training settings shown in the model card."""
    info = {name: getattr(args, name) for name in TRAINING_CONFIG_FLAGS}
    info.update(
        {
            "dataset": args.dataset or f"image folder {Path(args.train_data_dir).name}",
            "preset": str(args.preset),
            "steps": steps,
            "processes": world,
            "seed": args.seed,
            "test set": test_set,
            "weights": "EMA",
        }
    )
    return info


# ----------------------------------------------------------------------------------------------------
# Training


def load_data(
    args: argparse.Namespace, shape: tuple[int, int, int]
) -> tuple[UInt8ImageDataset, UInt8ImageDataset, str]:
    """Train and test sets of uint8 images of ``shape``; ``ValueError`` if they cannot be loaded."""
    try:
        train, test, description = load_image_splits(
            dataset_name=args.dataset,
            data_dir=args.train_data_dir,
            shape=shape,
            image_column=args.image_column,
            config_name=args.dataset_config_name,
            cache_dir=args.cache_dir,
            train_split=args.train_split,
            test_split=args.test_split,
            holdout_fraction=args.holdout_fraction,
        )
    except ValueError:
        raise
    except Exception as error:
        source = f"--dataset {args.dataset!r}" if args.dataset else f"--train_data_dir {args.train_data_dir!r}"
        raise ValueError(f"{source} could not be loaded: {type(error).__name__}: {error}") from error
    return train, test, description


@dataclass
class Setup:
    """Everything checked before training starts: the untrained components, the data and where to resume."""

    unet: nn.Module
    scheduler: VDMScheduler
    encoder: nn.Module | None
    shape: tuple[int, int, int]
    train_set: UInt8ImageDataset
    test_set: UInt8ImageDataset
    test_description: str
    resume_dir: Path | None


def prepare(args: argparse.Namespace) -> Setup:
    """Build the model and load and check the data; ``ValueError`` on anything wrong, before any training."""
    unet, scheduler, encoder = build_components(args)
    shape = (int(unet.config.in_channels), args.resolution, args.resolution)
    train_set, test_set, test_description = load_data(args, shape)
    resume_dir = None
    if args.resume_from_checkpoint == "latest":
        resume_dir = find_latest_checkpoint(args.output_dir)
        if resume_dir is None:
            logger.info("No complete checkpoint in %s: starting a new run.", args.output_dir)
    elif args.resume_from_checkpoint is not None:
        resume_dir = Path(args.resume_from_checkpoint)
        if not is_complete_checkpoint(resume_dir):
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a complete checkpoint "
                f"(it needs {CHECKPOINT_MARKER}; use 'latest' to pick the newest complete one)."
            )
    elif complete_checkpoints(args.output_dir):
        raise ValueError(
            f"--output_dir {str(args.output_dir)!r} already holds checkpoints of a run; pass "
            "--resume_from_checkpoint latest to continue it, or choose another --output_dir."
        )
    if resume_dir is not None:
        check_resumed_run(resume_dir, args, scheduler)
    return Setup(unet, scheduler, encoder, shape, train_set, test_set, test_description, resume_dir)


def noise_process_config(scheduler: VDMScheduler) -> dict[str, Any]:
    """The scheduler settings that define a run's objective (its config without diffusers' bookkeeping keys)."""
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def check_resumed_run(folder: Path, args: argparse.Namespace, scheduler: VDMScheduler) -> None:
    """``ValueError`` unless the checkpoint's run had this run's ``--seed`` and noise process (scheduler config).

    Either would change silently from the resumed step on: the seed keys every later draw and the data order,
    and a preset with the same networks but another ``encoder_type`` or schedule loads the same weights into
    another objective.
    """
    state = json.loads((folder / "training_state.json").read_text())
    problems = []
    if state["seed"] != args.seed:
        problems.append(f"--seed is {args.seed}, the checkpoint's run used {state['seed']}")
    saved, current = state.get("scheduler_config"), noise_process_config(scheduler)
    if saved is None:
        logger.warning("%s predates the record of its scheduler config: the noise process is not checked.", folder)
    else:
        for key in sorted(saved.keys() | current.keys()):
            if saved.get(key) != current.get(key):
                problems.append(
                    f"the scheduler's {key!r} is {current.get(key)!r}, the checkpoint's {saved.get(key)!r}"
                )
    if problems:
        raise ValueError(
            f"--resume_from_checkpoint {str(folder)!r} belongs to another run: "
            + "; ".join(problems)
            + ". Resume with the same --preset and --seed, or start a new --output_dir."
        )


class Trainer:
    """One training run: the prepared objective, optimizer, learning-rate schedule, EMA and data stream."""

    def __init__(self, args: argparse.Namespace, setup: Setup):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.args = args
        self.setup = setup
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(args.output_dir), logging_dir=str(args.output_dir / args.logging_dir)
            ),
            cpu=args.cpu,
        )
        accelerator = self.accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        if (
            args.mixed_precision == "bf16"
            and accelerator.device.type == "cpu"
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        ):
            logger.warning(
                "--mixed_precision bf16 on a CPU without native bf16 instructions (AVX512-BF16 or AMX): oneDNN "
                "emulates bf16 there, and a training step is many times slower than in float32 (14-17x measured "
                "on an AVX2-only CPU, benchmarks/README.md). Use --mixed_precision no on this machine."
            )
        self.repo_id = None
        if accelerator.is_main_process:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            for path in remove_partial_checkpoints(args.output_dir):
                logger.info("Deleted %s, left by an interrupted checkpoint write.", path)
            if args.push_to_hub:
                import huggingface_hub

                self.repo_id = huggingface_hub.create_repo(
                    repo_id=args.hub_model_id or args.output_dir.name,
                    exist_ok=True,
                    private=args.hub_private_repo,
                    token=args.hub_token,
                ).repo_id
        accelerator.wait_for_everyone()

        objective = DiffEncObjective(setup.unet, setup.scheduler, setup.encoder, num_timesteps=args.num_timesteps)
        if args.gradient_checkpointing:
            objective.unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(
            parameter_groups(objective, args.adam_weight_decay),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        # Stepped by hand once per update (not prepared: accelerate would step it once per process).
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=args.max_train_steps,
        )
        # One prepared module, so DDP syncs the denoiser, the encoder and the learned schedule endpoints together.
        self.prepared_objective, self.optimizer = accelerator.prepare(objective, optimizer)
        self.objective: DiffEncObjective = accelerator.unwrap_model(self.prepared_objective)
        self.parameters = list(self.objective.parameters())
        self.ema = EMAModel(self.parameters, decay=args.ema_decay)
        self.ema.to(accelerator.device)

        self.global_step, self.images_seen = 0, 0
        self.global_batch = args.train_batch_size * self.world
        if setup.resume_dir is not None:
            state = load_training_state(
                setup.resume_dir,
                self.objective,
                self.ema,
                self.optimizer.optimizer,
                self.lr_scheduler,
                accelerator.scaler,
            )
            self.global_step, self.images_seen = state["global_step"], state["images_seen"]
            logger.info(
                "Resumed from %s at step %d (%d images seen).", setup.resume_dir, self.global_step, self.images_seen
            )
            if (state["global_batch"], state["num_processes"]) != (self.global_batch, self.world):
                logger.warning(
                    "Resuming with %d processes x %d images per micro-step; the checkpoint's run used %d processes "
                    "and a global micro-batch of %d. Training continues from the same data position, but not as "
                    "the original run would have.",
                    self.world,
                    args.train_batch_size,
                    state["num_processes"],
                    state["global_batch"],
                )

        sampler = StreamBatchSampler(
            len(setup.train_set), args.train_batch_size, self.world, self.rank, args.seed, self.images_seen
        )
        self.batches = iter(
            DataLoader(
                setup.train_set,
                batch_sampler=sampler,
                num_workers=args.dataloader_num_workers,
                collate_fn=torch.stack,
            )
        )
        self.test_images = setup.test_set.to_tensor() if accelerator.is_main_process else None
        if accelerator.is_main_process:
            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
            config.pop("hub_token")
            accelerator.init_trackers("train_diffenc", config=config)

    def train_step(self) -> dict[str, float]:
        """One update: ``--gradient_accumulation_steps`` micro-batches, clipping, AdamW, schedule and EMA.

        Returns the logged values: mean terms over the global batch (bits/dim), grad norm, lr, images/s.
        """
        args, accelerator = self.args, self.accelerator
        device = accelerator.device
        started = time.perf_counter()
        totals = torch.zeros(5, dtype=torch.float64, device=device)
        max_grad_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
        grad_norm = torch.tensor(float("nan"))
        for micro_step in range(args.gradient_accumulation_steps):
            images = next(self.batches).to(device)
            draws = step_randomness(
                args.seed,
                self.global_step,
                micro_step,
                self.global_batch,
                self.setup.shape,
                self.rank,
                args.train_batch_size,
            )
            draws = {name: value.to(device) for name, value in draws.items()}
            if args.random_flip:
                images = torch.where(draws["flip"].view(-1, 1, 1, 1), images.flip(-1), images)
            torch.manual_seed(derive_seed(args.seed, self.global_step, micro_step, self.rank, _SALT_DROPOUT))
            with accelerator.accumulate(self.prepared_objective):
                terms = self.prepared_objective(
                    images, t=draws["t"], noise=draws["noise"], recon_noise=draws["recon_noise"]
                )
                accelerator.backward(terms.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(self.prepared_objective.parameters(), max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            sums = [terms[name].detach().double().sum() for name in TERM_NAMES]
            totals += torch.stack([*sums, torch.tensor(float(len(images)), dtype=torch.float64, device=device)])
        self.lr_scheduler.step()
        self.ema.step(self.parameters)
        self.global_step += 1
        self.images_seen += self.global_batch * args.gradient_accumulation_steps

        totals = accelerator.reduce(totals, reduction="sum")
        logs = {f"train/{name}": (totals[i] / totals[4]).item() for i, name in enumerate(TERM_NAMES)}
        logs.update(
            {
                "train/grad_norm": float(grad_norm),
                "train/lr": self.lr_scheduler.get_last_lr()[0],
                "train/images_per_second": totals[4].item() / (time.perf_counter() - started),
                "train/ema_decay": self.ema.cur_decay_value or 0.0,
                "train/epoch": self.images_seen / len(self.setup.train_set),
            }
        )
        accelerator.log(logs, step=self.global_step)
        return logs

    def save_checkpoint(self) -> None:
        """Write ``checkpoint-<step>`` atomically (main process), then apply --checkpoints_total_limit."""
        args = self.args
        if self.accelerator.is_main_process:
            state = {
                "global_step": self.global_step,
                "images_seen": self.images_seen,
                "seed": args.seed,
                "global_batch": self.global_batch,
                "num_processes": self.world,
                "preset": str(args.preset),
                "scheduler_config": noise_process_config(self.setup.scheduler),
            }

            def write_files(folder: Path) -> None:
                save_training_state(
                    folder,
                    self.objective,
                    self.ema,
                    self.optimizer.optimizer,
                    self.lr_scheduler,
                    self.accelerator.scaler,
                    state,
                )

            path = write_checkpoint(args.output_dir, self.global_step, write_files)
            logger.info("Saved %s.", path)
            limit = args.checkpoints_total_limit
            for removed in prune_checkpoints(args.output_dir, limit, keep=self.setup.resume_dir):
                logger.info("Deleted %s (--checkpoints_total_limit %d).", removed, limit)
        self.accelerator.wait_for_everyone()

    def evaluate_ema(self, num_images: int | None, grid_path: Path) -> dict[str, Any]:
        """EMA test bits/dim (continuous time) and an EMA sample grid, on the main process; the raw weights
        are restored afterwards. Logged as test/* and the image ema_samples."""
        from diffenc_diffusers.evaluation import bits_per_dim_terms, save_sample_grid, summarize_terms

        args = self.args
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            pipe = make_pipeline(self.objective)
            images = self.test_images if num_images is None else self.test_images[:num_images]
            terms = bits_per_dim_terms(pipe, images, batch_size=args.eval_batch_size, seed=args.seed)
            summary = summarize_terms(terms)
            grid = save_sample_grid(
                pipe,
                grid_path,
                num_images=args.num_validation_images,
                seed=args.seed,
                num_inference_steps=args.num_inference_steps,
                batch_size=args.eval_batch_size,
            )
        finally:
            self.objective.train()
            self.ema.restore(self.parameters)
        self.accelerator.log({f"test/{name}": summary[name] for name in TERM_NAMES}, step=self.global_step)
        if args.report_to == "tensorboard":
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("ema_samples", grid, self.global_step, dataformats="HWC")
        return summary

    def finish(self) -> None:
        """Save the EMA pipeline, its test bits/dim (test_bpd.json) and model card; push it if asked."""
        from diffenc_diffusers.hub import make_model_card, upload_pipeline_folder

        args = self.args
        if self.accelerator.is_main_process:
            summary = self.evaluate_ema(args.final_eval_num_images, args.output_dir / "samples" / "final.png")
            self.ema.copy_to(self.parameters)
            pipe = make_pipeline(self.objective)
            pipe.save_pretrained(str(args.output_dir))
            result = {
                "pipeline": str(args.output_dir),
                "preset": str(args.preset),
                "encoder_type": self.objective.encoder_type,
                "steps": self.global_step,
                "test_set": self.setup.test_description,
                "continuous": summary,
            }
            (args.output_dir / TEST_BPD_NAME).write_text(json.dumps(result, indent=1))
            info = training_info(args, self.global_step, self.world, self.setup.test_description)
            info["test images"] = summary["num_images"]
            name = self.repo_id or args.output_dir.name
            make_model_card(pipe, name, training_info=info, bpd=summary["bpd"]).save(args.output_dir / MODEL_CARD_NAME)
            logger.info("Saved the EMA pipeline to %s (test %.4f bits/dim).", args.output_dir, summary["bpd"])
            if self.repo_id is not None:
                upload_pipeline_folder(
                    pipe,
                    args.output_dir,
                    self.repo_id,
                    commit_message=f"EMA pipeline after {self.global_step} steps ({summary['bpd']:.4f} test bits/dim)",
                    private=args.hub_private_repo,
                    token=args.hub_token,
                    training_info=info,
                    bpd=summary["bpd"],
                )
                logger.info("Uploaded the pipeline files to https://huggingface.co/%s.", self.repo_id)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def run(self) -> None:
        """Train to --max_train_steps with checkpoints and periodic EMA evaluation, then :meth:`finish`."""
        from tqdm.auto import tqdm

        args = self.args
        if self.accelerator.is_main_process:
            logger.info(
                "Training %s on %d images (test: %s): %d process(es), global batch %d x %d accumulated, "
                "steps %d -> %d.",
                args.preset,
                len(self.setup.train_set),
                self.setup.test_description,
                self.world,
                self.global_batch,
                args.gradient_accumulation_steps,
                self.global_step,
                args.max_train_steps,
            )
        progress = tqdm(
            total=args.max_train_steps,
            initial=self.global_step,
            disable=not self.accelerator.is_local_main_process,
            desc="steps",
        )
        self.prepared_objective.train()
        while self.global_step < args.max_train_steps:
            logs = self.train_step()
            progress.update(1)
            progress.set_postfix(bpd=f"{logs['train/bpd']:.3f}", lr=f"{logs['train/lr']:.2e}")
            step = self.global_step
            if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
                self.save_checkpoint()
            if args.validation_steps and step % args.validation_steps == 0 and step < args.max_train_steps:
                if self.accelerator.is_main_process:
                    summary = self.evaluate_ema(
                        args.eval_num_images, args.output_dir / "samples" / f"step-{step:07d}.png"
                    )
                    logger.info("Step %d: EMA test %.4f bits/dim.", step, summary["bpd"])
                self.accelerator.wait_for_everyone()
        progress.close()
        self.finish()


def main(argv: list[str] | None = None) -> Path:
    """Run training from command-line flags; returns the output folder holding the saved EMA pipeline."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    setup = prepare(args)
    Trainer(args, setup).run()
    return args.output_dir


if __name__ == "__main__":
    main()
