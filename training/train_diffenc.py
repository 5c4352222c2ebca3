#!/usr/bin/env python
"""Train a VDM or DiffEnc model on 8-bit images with Hugging Face accelerate.

    accelerate launch training/train_diffenc.py --preset digits-diffenc-trainable --output_dir outputs/digits
    python training/train_diffenc.py --preset cifar10-diffenc-32-4 --output_dir out/c10 --mixed_precision bf16
    torchrun --nproc_per_node 2 training/train_diffenc.py --cpu --preset digits-vdm --output_dir outputs/ddp

The model comes from a preset (``diffenc_diffusers/presets/<name>/``) or any folder laid out like one: a diffusers
pipeline folder without weights plus ``training_config.json``, whose keys set the defaults of the training
flags (``diffenc_diffusers.training.config``); flags given on the command line win. The run minimises the
per-image negative ELBO in bits/dim (``DiffEncObjective``) with AdamW, keeps an EMA of every trained parameter
(denoiser, encoder, learned schedule), writes atomic checkpoints it can resume from exactly, logs to TensorBoard,
and finally saves the EMA pipeline with ``save_pretrained`` into ``--output_dir`` (optionally pushing it to the
Hub).

This file is the command line: flags, data, the accelerator and the loop. One update is
``diffenc_diffusers.training.TrainingStep`` (seeded draws, accumulation, clipping, AdamW, EMA), checkpoints are
``diffenc_diffusers.training.checkpointing``, the seeded data order is ``StreamBatchSampler``; docs/design.md
follows one step through the files. training/README.md lists every flag, the checkpoint layout and the outputs.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from diffenc_diffusers import DiffEncObjective, DiffEncPipeline, VDMScheduler  # noqa: E402
from diffenc_diffusers.data import (  # noqa: E402
    BUILTIN_DATASETS,
    LabeledImageDataset,
    UInt8ImageDataset,
    check_labels,
)
from diffenc_diffusers.training import (  # noqa: E402
    CheckpointError,
    NonFiniteError,
    StreamBatchSampler,
    TrainingStep,
    cpu_has_native_bf16,
    ema_weights,
    find_resumable_checkpoint,
    first_non_finite,
    load_training_state,
    parameter_groups,
    pipeline_from_objective,
    prune_checkpoints,
    read_checkpoint_state,
    remove_partial_checkpoints,
    save_training_state,
    write_checkpoint,
)
from diffenc_diffusers.training.checkpointing import (  # noqa: E402
    checkpoint_leftover_pid,
    complete_checkpoints,
    dumps_strict_json,
    find_latest_checkpoint,
    noise_process_config,
)
from diffenc_diffusers.training.config import (  # noqa: E402
    MIXED_PRECISION_CHOICES,
    TRAINING_CONFIG_FLAGS,
    WEIGHT_FLAGS,
    bool_type,
    changed_flags,
    check_writable,
    describe_segments,
    extend_segments,
    non_negative_int,
    positive_float,
    positive_int,
    read_training_config,
    unit_interval,
)
from diffenc_diffusers.training.lock import OutputFolderLock  # noqa: E402
from diffenc_diffusers.training.step import TERM_NAMES  # noqa: E402
from diffenc_diffusers.training.throughput import bf16_matmul_tflops, objective_flops_per_image  # noqa: E402

logger = logging.getLogger("train_diffenc")

TEST_BPD_NAME = "test_bpd.json"
MODEL_CARD_NAME = "README.md"
LR_SCHEDULER_CHOICES = ("constant_with_warmup", "linear", "cosine", "constant")
PARAMETER_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------------
# Flags


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
        help="A preset name (a folder under diffenc_diffusers/presets/) or the path of a pipeline config folder "
        "holding model_index.json, component configs and training_config.json.",
    )
    model.add_argument(
        "--dropout",
        type=unit_interval,
        default=None,
        help="Override the dropout of the denoiser and the encoder (None: the preset's).",
    )
    model.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Checkpoint the blocks of the denoiser and the encoder (less memory, about a third more time).",
    )
    model.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the networks' repeated blocks (regional compilation; the encoder's forward-mode pass "
        "included). The first steps compile.",
    )
    model.add_argument(
        "--allow_tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="On CUDA GPUs, let float32 matrix products and convolutions use TF32 (--no-allow_tf32: exact float32).",
    )
    model.add_argument(
        "--dtype",
        choices=tuple(PARAMETER_DTYPES),
        default="float32",
        help="The dtype of the parameters and of the computation. float64 is a reference run (several times "
        "slower; needs --mixed_precision no): its rounding is far below AdamW's epsilon, so runs that differ only "
        "in the order of floating-point sums (1 vs N processes) give the same parameters on any CPU.",
    )

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
            "mixed_precision": "accelerate's",
        }.get(name, f"default {default}")
        config.add_argument(*flags, help=f"{help_text} (preset's value; else {fallback})", **options)

    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_data_dir", default=None, help="An imagefolder directory to train on (instead of --dataset)."
    )
    data.add_argument("--dataset_config_name", default=None, help="The datasets configuration name, if any.")
    data.add_argument("--image_column", default=None, help="The column holding the images (found if omitted).")
    data.add_argument(
        "--label_column",
        default=None,
        help="The column holding the class labels of a class-conditional preset (default: the only ClassLabel "
        "column; the built-in datasets have their labels).",
    )
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
        "--checkpoints_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints."
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
    """The folder of a preset name (``diffenc_diffusers/presets/``) or path; else ``ValueError`` listing presets."""
    from diffenc_diffusers.pipeline_diffenc import resolve_preset as resolve

    try:
        folder = resolve(name_or_path)
    except FileNotFoundError as error:
        raise ValueError(f"--preset {name_or_path!r}: {error}") from None
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--preset {name_or_path!r}: {folder} has no model_index.json, so it is no preset.")
    return folder


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
            f"(one of the built-in {sorted(BUILTIN_DATASETS)} or a datasets name) or --train_data_dir (an image "
            "folder)."
        )
    if args.max_train_steps is None:
        raise ValueError(f"--max_train_steps is required (the preset {args.preset!r} does not set it).")
    if not 0.0 < args.holdout_fraction < 1.0:
        raise ValueError(f"--holdout_fraction must be in (0, 1), got {args.holdout_fraction}.")
    args.output_dir = Path(args.output_dir)
    check_writable(args.output_dir, "--output_dir", folder=True)
    return args


# ----------------------------------------------------------------------------------------------------
# Setup: the model, the data and where to resume, all checked before any training


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


def load_data(
    args: argparse.Namespace, shape: tuple[int, int, int]
) -> tuple[UInt8ImageDataset, UInt8ImageDataset, str]:
    """Train and test sets of uint8 images of ``shape``; ``ValueError`` if they cannot be loaded."""
    from diffenc_diffusers.evaluation import load_data_flags

    return load_data_flags(args, shape, train_split=args.train_split, test_split=args.test_split)


@dataclass
class Setup:
    """Everything checked before training starts: the untrained objective, the data (with its class labels, read
    and checked once, for a class-conditional model; None otherwise) and where to resume (with the checkpoint's
    training state, read once)."""

    objective: DiffEncObjective
    shape: tuple[int, int, int]
    train_set: UInt8ImageDataset
    test_set: UInt8ImageDataset
    test_description: str
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    resume_dir: Path | None
    resume_state: dict[str, Any] | None


def prepare(args: argparse.Namespace) -> Setup:
    """Build the model and load and check the data; ``ValueError`` on anything wrong, before any training."""
    resume_dir, resume_state = choose_checkpoint(args)
    unet, scheduler, encoder = build_components(args)
    objective = DiffEncObjective(unet, scheduler, encoder, num_timesteps=args.num_timesteps)
    objective.to(PARAMETER_DTYPES[args.dtype])
    shape = (int(unet.config.in_channels), args.resolution, args.resolution)
    train_set, test_set, test_description = load_data(args, shape)
    train_labels, test_labels = check_class_conditioning(args, objective, train_set, test_set)
    if resume_dir is not None:
        check_resumed_run(resume_dir, resume_state, args, scheduler)
        if resume_state["global_step"] > args.max_train_steps:
            raise ValueError(
                f"--max_train_steps {args.max_train_steps} is below the step of the checkpoint being resumed, "
                f"{str(resume_dir)!r} at step {resume_state['global_step']} (steps {resume_state['global_step']} -> "
                f"{args.max_train_steps}): pass --max_train_steps {resume_state['global_step']} or more (equal only "
                "evaluates and saves the pipeline again)."
            )
    return Setup(
        objective, shape, train_set, test_set, test_description, train_labels, test_labels, resume_dir, resume_state
    )


def choose_checkpoint(args: argparse.Namespace) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume (verified, with its training state read once), or (None, None) for a new run.

    ``latest`` takes the newest checkpoint of --output_dir that passes verification, logging every newer one it
    skips and why; an explicit folder that fails verification is a ``ValueError`` naming the file and the failure.
    """
    if args.resume_from_checkpoint == "latest":
        folder, state, skipped = find_resumable_checkpoint(args.output_dir)
        for path, error in skipped:
            logger.warning("Skipped %s, which cannot be resumed: %s", path.name, error)
        if folder is None and skipped:
            raise ValueError(
                f"--resume_from_checkpoint latest: no checkpoint in {str(args.output_dir)!r} passes verification "
                f"({len(skipped)} skipped, reasons above; the newest: {skipped[0][1]}). Move them away to start a "
                "new run there, or choose another --output_dir."
            )
        if folder is None:
            logger.info("No checkpoint in %s: starting a new run.", args.output_dir)
        elif skipped:
            logger.warning("Resuming %s, the newest checkpoint that passes verification.", folder.name)
        return folder, state
    if args.resume_from_checkpoint is not None:
        folder = Path(args.resume_from_checkpoint)
        if checkpoint_leftover_pid(folder) is not None:
            raise ValueError(
                f"--resume_from_checkpoint {str(folder)!r} is the temporary folder of a checkpoint being written or "
                "deleted (by a run that may still be going, or was cut off), never a checkpoint: resume a "
                "checkpoint-N folder, or 'latest'."
            )
        try:
            return folder, read_checkpoint_state(folder)
        except CheckpointError as error:
            raise ValueError(f"--resume_from_checkpoint {str(folder)!r} cannot be resumed: {error}") from None
    if complete_checkpoints(args.output_dir):
        raise ValueError(
            f"--output_dir {str(args.output_dir)!r} already holds checkpoints of a run; pass "
            "--resume_from_checkpoint latest to continue it, or choose another --output_dir."
        )
    return None, None


def check_class_conditioning(
    args: argparse.Namespace, objective: DiffEncObjective, train_set: UInt8ImageDataset, test_set: UInt8ImageDataset
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (train, test) class labels of a class-conditional preset, (None, None) for an unconditional one;
    ``ValueError`` unless the data has labels in the model's classes and --class_dropout_prob is used only with
    a null class."""
    if objective.num_classes is None:
        if args.class_dropout_prob > 0:
            raise ValueError(
                f"--class_dropout_prob {args.class_dropout_prob} needs a class-conditional preset (networks with "
                f"num_class_embeds and null_class); {args.preset!r} is unconditional."
            )
        return None, None
    if args.class_dropout_prob > 0 and objective.null_label is None:
        raise ValueError(
            f"--class_dropout_prob {args.class_dropout_prob} trains the null class, but the networks of "
            f"{args.preset!r} have null_class=False: use --class_dropout_prob 0 or a preset with a null class."
        )
    labels = []
    for dataset in (train_set, test_set):
        if not dataset.has_labels:
            raise ValueError(
                f"The preset {args.preset!r} is class-conditional (num_class_embeds={objective.num_classes}), but "
                f"{dataset.name} has no class labels: name their column with --label_column."
            )
        labels.append(dataset.labels_tensor())
        check_labels(labels[-1], objective.num_classes, dataset.name)
    return labels[0], labels[1]


def check_resumed_run(folder: Path, state: dict[str, Any], args: argparse.Namespace, scheduler: VDMScheduler) -> None:
    """``ValueError`` unless the checkpoint's run had this run's ``--seed``, ``--dtype`` and noise process (scheduler
    config).

    Either would change silently from the resumed step on: the seed keys every later draw and the data order,
    and a preset with the same networks but another ``encoder_type`` or schedule loads the same weights into
    another objective.
    """
    problems = []
    if state["seed"] != args.seed:
        problems.append(f"--seed is {args.seed}, the checkpoint's run used {state['seed']}")
    if state.get("dtype", "float32") != args.dtype:
        problems.append(f"--dtype is {args.dtype}, the checkpoint's run used {state.get('dtype', 'float32')}")
    saved, current = state.get("scheduler_config"), noise_process_config(scheduler)
    if saved is None:
        logger.warning("%s predates the record of its scheduler config: the noise process is not checked.", folder)
    else:
        for key in sorted(saved.keys() | current.keys()):
            if saved.get(key) != current.get(key):
                problems.append(f"the scheduler's {key!r} is {current.get(key)!r}, the checkpoint's {saved.get(key)!r}")
    if problems:
        raise ValueError(
            f"--resume_from_checkpoint {str(folder)!r} belongs to another run: "
            + "; ".join(problems)
            + ". Resume with the same --preset and --seed, or start a new --output_dir."
        )


# ----------------------------------------------------------------------------------------------------
# The run


def weight_flags(args: argparse.Namespace) -> dict[str, Any]:
    """This run's values of the flags that shape the weights (:data:`WEIGHT_FLAGS`)."""
    return {name: getattr(args, name) for name in WEIGHT_FLAGS}


def apply_optimizer_flags(optimizer: torch.optim.Optimizer, lr_scheduler: Any, hyper_parameters: list[dict]) -> None:
    """After a checkpoint's optimizer and schedule state are loaded, put back this run's hyper-parameters (betas,
    eps, weight decay, base learning rate; ``hyper_parameters`` are the param groups' before loading) and set each
    group's learning rate to base x the schedule's factor at the restored step: exactly the checkpoint's value
    when the flags are the same, the new flags' value otherwise (warm-up, schedule kind and length are this run's
    already, as the schedule's function is not stored)."""
    lr_scheduler.base_lrs = [fresh["initial_lr"] for fresh in hyper_parameters]
    for group, fresh, factor in zip(optimizer.param_groups, hyper_parameters, lr_scheduler.lr_lambdas, strict=True):
        group.update({key: fresh[key] for key in ("betas", "eps", "weight_decay", "initial_lr")})
        group["lr"] = fresh["initial_lr"] * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def training_info(
    args: argparse.Namespace, steps: int, world: int, test_set: str, segments: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The training settings shown in the model card; a flag that a resumed run changed (``segments``, see
    :func:`~diffenc_diffusers.training.config.describe_segments`) is shown with each value and its steps."""
    info = {name: getattr(args, name) for name in TRAINING_CONFIG_FLAGS}
    info.update(
        {
            "dataset": args.dataset or f"image folder {Path(args.train_data_dir).name}",
            "preset": str(args.preset),
            "steps": steps,
            "processes": world,
            "seed": args.seed,
            "dtype": args.dtype,
            "test set": test_set,
            "weights": "EMA",
        }
    )
    info.update(describe_segments(segments or [], steps))
    return info


class Trainer:
    """One training run: the accelerator, the prepared objective, optimizer, learning-rate schedule, EMA, the
    update step and the data stream, restored from a checkpoint when resuming."""

    def __init__(self, args: argparse.Namespace, setup: Setup):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.args = args
        self.setup = setup
        # mixed_precision None: accelerate's own setting (the launcher's flag or config file; "no" without one).
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(args.output_dir), logging_dir=str(args.output_dir / args.logging_dir)
            ),
            cpu=args.cpu,
        )
        args.mixed_precision = accelerator.mixed_precision
        if args.dtype == "float64" and args.mixed_precision != "no":
            raise ValueError(
                f"--dtype float64 trains in float64 and needs --mixed_precision no, got {args.mixed_precision!r} "
                "(from the flag, the training config or accelerate's setting)."
            )
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.global_batch = args.train_batch_size * self.world
        if self.global_batch > len(setup.train_set):
            raise ValueError(
                f"--train_batch_size {args.train_batch_size} x {self.world} process(es) = a global batch of "
                f"{self.global_batch} images, more than the {len(setup.train_set)} training images: every batch "
                f"would hold images twice. Use --train_batch_size {len(setup.train_set) // self.world} or less."
            )
        if accelerator.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32
        if args.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning(
                "--mixed_precision bf16 on a CPU without native bf16 instructions (AVX512-BF16 or AMX): oneDNN "
                "emulates bf16 there, and a training step is many times slower than in float32 (14-17x measured "
                "on an AVX2-only CPU, benchmarks/README.md). Use --mixed_precision no on this machine."
            )
        self.repo_id = None
        # Only the main process writes into --output_dir, so only it holds the folder's lock (see close()).
        self.lock = OutputFolderLock(args.output_dir).acquire() if accelerator.is_main_process else None
        if accelerator.is_main_process:
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

        objective = setup.objective
        # On CUDA: FLOPs per image and the chip's bf16 matrix rate, for the train/tflops_per_gpu logs (counted
        # before checkpointing and compiling).
        self.flops_per_image = self.peak_tflops = None
        if accelerator.device.type == "cuda":
            image_shape = (objective.unet.config.in_channels, args.resolution, args.resolution)
            objective.to(accelerator.device)
            self.flops_per_image = objective_flops_per_image(objective, image_shape, accelerator.device)
            self.peak_tflops = bf16_matmul_tflops(accelerator.device)
        networks = [net for net in (objective.unet, objective.encoder) if net is not None]
        for network in networks:
            if args.gradient_checkpointing:
                network.enable_gradient_checkpointing()
            if args.compile:
                network.compile_repeated_blocks()
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
        # One prepared module, so DDP syncs the denoiser, the encoder and the learned schedule together.
        self.prepared_objective, self.optimizer = accelerator.prepare(objective, optimizer)
        self.objective: DiffEncObjective = accelerator.unwrap_model(self.prepared_objective)
        self.ema = EMAModel(self.objective.parameters(), decay=args.ema_decay)
        self.ema.to(accelerator.device)
        self.step = TrainingStep(
            accelerator,
            self.prepared_objective,
            self.optimizer,
            self.lr_scheduler,
            self.ema,
            seed=args.seed,
            max_grad_norm=args.max_grad_norm or None,
            random_flip=args.random_flip,
            class_dropout_prob=args.class_dropout_prob,
        )
        self.parameters = self.step.parameters

        self.global_step, self.images_seen = 0, 0
        self.segments = extend_segments([], 0, weight_flags(args))
        if setup.resume_dir is not None:
            self.resume(setup.resume_dir, setup.resume_state)

        sampler = StreamBatchSampler(
            len(setup.train_set), args.train_batch_size, self.world, self.rank, args.seed, self.images_seen
        )
        if objective.is_class_conditional:
            # (image, label) pairs, collated to (images, labels) batches.
            loader = DataLoader(
                LabeledImageDataset(setup.train_set, setup.train_labels),
                batch_sampler=sampler,
                num_workers=args.dataloader_num_workers,
                pin_memory=accelerator.device.type == "cuda",
            )
        else:
            loader = DataLoader(
                setup.train_set,
                batch_sampler=sampler,
                num_workers=args.dataloader_num_workers,
                collate_fn=torch.stack,
                pin_memory=accelerator.device.type == "cuda",
            )
        self.batches = iter(loader)
        self.test_images = setup.test_set.to_tensor() if accelerator.is_main_process else None
        if accelerator.is_main_process:
            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
            config.pop("hub_token")
            accelerator.init_trackers("train_diffenc", config=config)

    def close(self) -> None:
        """Release --output_dir's lock (main process); the run's outputs stay."""
        if self.lock is not None:
            self.lock.release()

    def resume(self, folder: Path, state: dict[str, Any]) -> None:
        """Restore weights, EMA, optimizer, schedule and data position from a checkpoint's files and state, then
        apply this run's optimizer, learning-rate and EMA flags (a checkpoint would otherwise bring back its own);
        every flag that differs from the checkpoint's run is logged and recorded as a new segment."""
        args = self.args
        optimizer = self.optimizer.optimizer
        hyper_parameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        load_training_state(
            folder, state, self.objective, self.ema, optimizer, self.lr_scheduler, self.accelerator.scaler
        )
        self.global_step, self.images_seen = state["global_step"], state["images_seen"]
        apply_optimizer_flags(optimizer, self.lr_scheduler, hyper_parameters)
        self.ema.decay = args.ema_decay
        logger.info("Resumed from %s at step %d (%d images seen).", folder, self.global_step, self.images_seen)
        segments = state.get("segments")
        if segments is None:
            logger.warning(
                "%s predates the record of its training flags: changed flags cannot be detected, and the model "
                "card shows steps 0-%d as 'not recorded'.",
                folder,
                self.global_step,
            )
            segments = [{"from_step": 0, "flags": None}]
        elif segments[-1]["flags"] != weight_flags(args):
            logger.warning(
                "Resuming %s with changed flags, applied from step %d on (the model card lists each value with its "
                "steps): %s.",
                folder.name,
                self.global_step,
                "; ".join(changed_flags(segments[-1]["flags"], weight_flags(args))),
            )
        self.segments = extend_segments(segments, self.global_step, weight_flags(args))
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

    def train_step(self) -> dict[str, float]:
        """One update (:class:`TrainingStep`); returns and logs the mean terms (bits/dim), grad norm, lr, images/s."""
        started = time.perf_counter()
        output = self.step(self.batches, self.global_step)
        elapsed = time.perf_counter() - started
        self.global_step += 1
        self.images_seen += output.num_images
        logs = {f"train/{name}": getattr(output, name) for name in TERM_NAMES}
        logs.update(
            {
                "train/grad_norm": output.grad_norm,
                "train/lr": self.lr_scheduler.get_last_lr()[0],
                "train/images_per_second": output.num_images / elapsed,
                "train/ema_decay": self.ema.cur_decay_value or 0.0,
                "train/epoch": self.images_seen / len(self.setup.train_set),
            }
        )
        if self.flops_per_image is not None:
            tflops = self.flops_per_image * output.num_images / self.world / elapsed / 1e12
            logs.update({"train/tflops_per_gpu": tflops, "train/fraction_of_bf16_peak": tflops / self.peak_tflops})
        self.accelerator.log(logs, step=self.global_step)
        return logs

    def save_checkpoint(self) -> None:
        """Write ``checkpoint-<step>`` atomically (main process), then apply --checkpoints_total_limit."""
        args = self.args
        if self.accelerator.is_main_process:
            state = {
                "global_step": self.global_step,
                "images_seen": self.images_seen,
                "seed": args.seed,
                "dtype": args.dtype,
                "global_batch": self.global_batch,
                "num_processes": self.world,
                "preset": str(args.preset),
                "scheduler_config": noise_process_config(self.setup.objective.scheduler),
                "segments": self.segments,
            }
            path = write_checkpoint(
                args.output_dir,
                self.global_step,
                lambda folder: save_training_state(
                    folder,
                    self.objective,
                    self.ema,
                    self.optimizer.optimizer,
                    self.lr_scheduler,
                    self.accelerator.scaler,
                    state,
                ),
            )
            logger.info("Saved %s.", path)
            limit = args.checkpoints_total_limit
            for removed in prune_checkpoints(args.output_dir, limit, keep=self.setup.resume_dir):
                logger.info("Deleted %s (--checkpoints_total_limit %d).", removed, limit)
        self.accelerator.wait_for_everyone()

    def evaluate_ema(self, num_images: int | None, grid_path: Path) -> dict[str, Any]:
        """EMA test bits/dim (continuous time) and an EMA sample grid, on the main process; the raw weights
        are restored afterwards. Logged as test/* and the image ema_samples.

        A class-conditional model is evaluated on the test labels (the conditional ELBO) and its grid has one
        class per column; with a null class, the unconditional ELBO of the same weights and draws is added under
        ``"unconditional"`` (logged as test_unconditional/*) and their paired difference under ``"class_gain"``
        (:func:`~diffenc_diffusers.evaluation.class_gain`)."""
        from diffenc_diffusers.evaluation import bits_per_dim_terms, class_gain, save_sample_grid, summarize_terms

        args = self.args
        objective = self.objective
        images = self.test_images if num_images is None else self.test_images[:num_images]
        labels = None if self.setup.test_labels is None else self.setup.test_labels[: len(images)]
        grid_labels = None
        if objective.num_classes is not None:
            grid_labels = torch.arange(args.num_validation_images) % objective.num_classes
        try:
            with ema_weights(self.ema, self.parameters):
                pipe = pipeline_from_objective(objective)

                def test_bpd(class_labels: torch.Tensor | None) -> dict[str, Any]:
                    return bits_per_dim_terms(
                        pipe, images, batch_size=args.eval_batch_size, seed=args.seed, class_labels=class_labels
                    )

                terms = test_bpd(labels)
                summary = summarize_terms(terms)
                if objective.null_label is not None:
                    null_terms = test_bpd(torch.full_like(labels, objective.null_label))
                    summary["unconditional"] = summarize_terms(null_terms)
                    num_dims = int(images[0].numel())
                    summary["class_gain"] = class_gain(terms["bpd"], null_terms["bpd"], objective.num_classes, num_dims)
                grid = save_sample_grid(
                    pipe,
                    grid_path,
                    num_images=args.num_validation_images,
                    seed=args.seed,
                    num_inference_steps=args.num_inference_steps,
                    batch_size=args.eval_batch_size,
                    class_labels=grid_labels,
                    columns=objective.num_classes,
                )
        finally:
            objective.train()
        logs = {f"test/{name}": summary[name] for name in TERM_NAMES}
        if "unconditional" in summary:
            logs.update({f"test_unconditional/{name}": summary["unconditional"][name] for name in TERM_NAMES})
        self.accelerator.log(logs, step=self.global_step)
        if args.report_to == "tensorboard":
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("ema_samples", grid, self.global_step, dataformats="HWC")
        return summary

    def finish(self) -> None:
        """Save the EMA pipeline, its test bits/dim (test_bpd.json) and model card; push it if asked."""
        from diffenc_diffusers.hub import make_model_card, save_model_card, upload_pipeline_folder

        args = self.args
        if self.accelerator.is_main_process:
            summary = self.evaluate_ema(args.final_eval_num_images, args.output_dir / "samples" / "final.png")
            self.ema.copy_to(self.parameters)
            bad = first_non_finite(dict(self.objective.named_parameters()))
            if bad is not None or not math.isfinite(summary["bpd"]):
                what = f"{bad!r} holds non-finite values" if bad else f"the test bits/dim are {summary['bpd']}"
                raise NonFiniteError(
                    f"The EMA pipeline after {self.global_step} steps is not finite ({what}): it is neither saved "
                    "nor uploaded."
                )
            pipe = pipeline_from_objective(self.objective)
            pipe.save_pretrained(str(args.output_dir))
            result = {
                "pipeline": str(args.output_dir),
                "preset": str(args.preset),
                "encoder_type": self.objective.encoder_type,
                "num_classes": self.objective.num_classes,
                "steps": self.global_step,
                "test_set": self.setup.test_description,
                "continuous": summary,
            }
            (args.output_dir / TEST_BPD_NAME).write_text(dumps_strict_json(result))
            info = training_info(args, self.global_step, self.world, self.setup.test_description, self.segments)
            info["test images"] = summary["num_images"]
            if "unconditional" in summary:
                info["test bits/dim of the null class, -log p(x)"] = round(summary["unconditional"]["bpd"], 4)
            name = self.repo_id or args.output_dir.name
            save_model_card(make_model_card(pipe, name, training_info=info, bpd=summary["bpd"]), args.output_dir)
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
            try:
                logs = self.train_step()
            except NonFiniteError as error:
                latest = find_latest_checkpoint(args.output_dir)
                kept = f"the latest checkpoint stays {str(latest)!r}" if latest else "no checkpoint was written"
                raise NonFiniteError(
                    f"{error} Training stopped; nothing of this update is saved and {kept}. Resume from it with a "
                    "smaller --learning_rate or --max_grad_norm, or check the data."
                ) from None
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
    trainer = Trainer(args, setup)
    try:
        trainer.run()
    finally:
        trainer.close()
    return args.output_dir


if __name__ == "__main__":
    main()
