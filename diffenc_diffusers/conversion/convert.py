"""Official Flax checkpoints -> `DiffEncPipeline`: the library function behind ``diffenc-convert``."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..hub import MODEL_CARD_NAME, make_model_card, upload_pipeline_folder
from ..models import DiffEncEncoderModel, VDMUNetModel
from ..scheduling_vdm import VDMScheduler
from .flax_msgpack import UndecodedArray, load_flax_msgpack
from .official import (
    BUILTIN_CONFIGS,
    OfficialModel,
    ParameterMapping,
    count_parameters,
    load_official_model,
    to_torch_layout,
)

PARAMETER_SETS = ("ema", "raw")
"""`params` choices: the EMA parameters (`ema_params`, what the official evaluation and sampling use) or the
raw optimised ones (`params`)."""
STATE_KEYS = {"ema": "ema_params", "raw": "params"}
_CHECKPOINT_NAMES = (
    # bemigini/DiffEnc's training pipeline: checkpoints/<date>_<model_name>_<step> (naming.get_file_prefix)
    re.compile(r"^(?P<prefix>\d{4}-\d{2}-\d{2}_.+_)(?P<step>\d+)$"),
    # flax.training.checkpoints' default prefix: [<prefix>]checkpoint_<step>
    re.compile(r"^(?P<prefix>.*checkpoint_)(?P<step>\d+)$"),
    # clu's Checkpoint (google-research/vdm): ckpt-<n>.flax
    re.compile(r"^(?P<prefix>ckpt-)(?P<step>\d+)\.flax$"),
)
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "checkpoint", "default")
"""Entries of an Orbax checkpoint folder (flax >= 0.7 with Orbax checkpointing writes folders, not files)."""


@dataclass
class ConversionResult:
    """What :func:`convert_official_checkpoint` made.

    Attributes:
        pipeline: The converted `DiffEncPipeline` (float32, eval mode).
        model: The official model description it was converted with.
        checkpoint: The checkpoint file read.
        step: The checkpoint's training step (None if the file has none).
        params: "ema" or "raw".
        official_parameter_count: Parameters in the checkpoint's parameter set.
        converted_parameter_count: Parameters of the pipeline (the difference is `model.inert_parameters()`).
        sha256: SHA-256 of the checkpoint file.
    """

    pipeline: Any
    model: OfficialModel
    checkpoint: Path
    step: int | None
    params: str
    official_parameter_count: int
    converted_parameter_count: int
    sha256: str

    def model_card_info(self, license_id: str | None = None) -> dict[str, str]:
        """The rows of the model card's "Source of the weights" section, and the card's license fields."""
        source = self.model.provenance
        inert = self.model.inert_parameters()
        info = {
            "converted from": source["name"],
            "weights": source["weights"],
            "code": source["code"],
            "official model": f"{self.model.model_type}, dataset {self.model.dataset}",
            "checkpoint": f"{self.checkpoint.name} (step {self.step}, sha256 {self.sha256})",
            "parameters": f"{self.params} ({STATE_KEYS[self.params]})",
            "official parameter count": f"{self.official_parameter_count:,}",
            "converted parameter count": f"{self.converted_parameter_count:,}",
            "not converted (inert)": "; ".join(f"{path}: {why}" for path, why in inert.items()) or "none",
            "converter": "diffenc-convert (diffenc-diffusers); verified against the official code, see "
            "docs/conversion.md",
            "license": license_id
            or f"the license under which the weights are published: see {source['license_link']}",
        }
        info["license_id"] = license_id or "other"
        info["license_link"] = source["license_link"]
        return info


def _checkpoint_name(name: str) -> tuple[str, int] | None:
    """(prefix, step) of a checkpoint name the official code writes, else None."""
    for pattern in _CHECKPOINT_NAMES:
        match = pattern.match(name)
        if match:
            return match.group("prefix"), int(match.group("step"))
    return None


def _orbax_error(path: Path) -> IsADirectoryError:
    return IsADirectoryError(
        f"{str(path)!r} is an Orbax checkpoint folder, which is not supported: save with "
        "flax.config.update('flax_use_orbax_checkpointing', False) (flax's msgpack file) or convert it to msgpack "
        "first."
    )


def find_checkpoint_file(path: str | os.PathLike) -> Path:
    """`path` itself if it is a file; in a folder (or its ``checkpoints/`` subfolder, where bemigini/DiffEnc's
    training pipeline writes them), the checkpoint file with the highest step. Names as the official code writes
    them: ``<date>_<model_name>_<step>`` (bemigini/DiffEnc), ``[<prefix>]checkpoint_<step>`` (flax's default) and
    ``ckpt-<n>.flax`` (clu, google-research/vdm).

    Raises:
        FileNotFoundError: no checkpoint file in the folder.
        IsADirectoryError: ``path`` is, or only holds, Orbax checkpoint folders (not supported).
        ValueError: the folder holds checkpoints of several runs (different prefixes); pass the file.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    if any((path / marker).exists() for marker in ORBAX_MARKERS) and _checkpoint_name(path.name) is not None:
        raise _orbax_error(path)
    folders = [path, path / "checkpoints"] if (path / "checkpoints").is_dir() else [path]
    files, orbax = [], []
    for folder in folders:
        for child in sorted(folder.iterdir()):
            name = _checkpoint_name(child.name)
            if name is None:
                continue
            (files if child.is_file() else orbax).append((name[1], name[0], child))
    if not files and orbax:
        raise _orbax_error(max(orbax)[2])
    if not files:
        raise FileNotFoundError(
            f"No checkpoint file in the folder {str(path)!r} (nor in its checkpoints/): expected "
            "<date>_<model_name>_<step> (bemigini/DiffEnc), checkpoint_<step> (flax) or ckpt-<n>.flax (clu); "
            "pass the file."
        )
    prefixes = sorted({prefix for _, prefix, _ in files})
    if len(prefixes) > 1:
        raise ValueError(
            f"The folder {str(path)!r} holds the checkpoints of {len(prefixes)} runs ({', '.join(prefixes)}); pass "
            "the file to convert."
        )
    return max(files)[2]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _step(value: Any) -> int | None:
    """The checkpoint's `step` entry as an int (flax stores a Python int or a 0-d array), or None."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu":
        return int(value.reshape(()))
    return None


def check_parameters(model: OfficialModel, flat: dict[str, Any], where: str) -> None:
    """Raise `ValueError` listing every missing, unknown and mis-shaped parameter (and non-float32 arrays)."""
    expected = model.expected_tree()
    missing = sorted(set(expected) - set(flat))
    unknown = sorted(set(flat) - set(expected))
    problems = []
    for path in sorted(set(expected) & set(flat)):
        value = flat[path]
        if isinstance(value, UndecodedArray):
            problems.append(f"{path}: dtype {value.dtype_name} (float32 expected)")
        elif not isinstance(value, np.ndarray):
            problems.append(f"{path}: a {type(value).__name__}, not an array")
        elif tuple(value.shape) != expected[path]:
            problems.append(f"{path}: shape {tuple(value.shape)}, expected {expected[path]}")
        elif value.dtype != np.float32:
            problems.append(f"{path}: dtype {value.dtype} (float32 expected)")
    if missing or unknown or problems:
        lines = [
            f"The checkpoint's {where} do not match the official {model.model_type} model of this config "
            f"(dataset {model.dataset}, {count_parameters(expected):,} parameters expected, "
            f"{len(flat)} arrays found):"
        ]
        for title, items in (("missing", missing), ("unknown", unknown), ("wrong shape or dtype", problems)):
            if items:
                shown = items if len(items) <= 40 else [*items[:40], f"... and {len(items) - 40} more"]
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        lines.append("Check that --config (and --train-config) are the ones the checkpoint was trained with.")
        raise ValueError("\n".join(lines))


def _state_dict(mapping: dict[str, ParameterMapping], flat: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        key: torch.from_numpy(np.array(to_torch_layout(entry.kind, flat[entry.official_path]), order="C"))
        for key, entry in mapping.items()
    }


def _load_component(model_class: type, config: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    component = model_class(**config)
    for key, value in component.state_dict().items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise AssertionError(f"{key}: converted shape {tuple(state[key].shape)} != {tuple(value.shape)}")
    component.load_state_dict(state, strict=True)
    return component.eval()


def convert_official_checkpoint(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike,
    train_config: str | os.PathLike | None = None,
    params: str = "ema",
) -> ConversionResult:
    r"""
    Convert a checkpoint of the official DiffEnc or VDM code into a `DiffEncPipeline`. No JAX is needed.

    Args:
        checkpoint (`str` or `os.PathLike`): The msgpack file that `flax.training.checkpoints.save_checkpoint`
            (DiffEnc's training pipeline: ``checkpoints/<date>_<model_name>_<step>``) or clu's `Checkpoint`
            (VDM, ``ckpt-<n>.flax``) wrote from the official train state (step, params, ema_params, opt_state); or
            a folder holding such files, directly or in ``checkpoints/`` (the highest step is used; see
            :func:`find_checkpoint_file`).
        config (`str` or `os.PathLike`): The official model config: DiffEnc's config_model_*.json, or a JSON of
            google-research/vdm's ``get_config().to_dict()``, or ``"vdm-cifar10"`` (configs/cifar10.py).
        train_config (`str` or `os.PathLike`, *optional*): DiffEnc's config_train_*.json (required for DiffEnc:
            the dataset gives the image shape and must be an unconditional one).
        params (`str`, defaults to `"ema"`): `"ema"` for the EMA parameters, `"raw"` for the raw ones.

    Returns:
        [`ConversionResult`] with the pipeline and what was converted.

    Raises:
        ValueError: Unsupported config; unreadable, truncated or corrupted checkpoint; missing, unknown or
            mis-shaped parameters (all listed).
        FileNotFoundError: A file does not exist.
        ImportError: `msgpack` is not installed (pip install 'diffenc-diffusers[convert]').
    """
    from ..pipeline_diffenc import DiffEncPipeline

    if params not in PARAMETER_SETS:
        raise ValueError(f"`params` must be one of {list(PARAMETER_SETS)}; got {params!r}.")
    model = load_official_model(config, train_config)
    path = find_checkpoint_file(checkpoint)
    state = load_flax_msgpack(path)
    state_key = STATE_KEYS[params]
    if state_key not in state or not isinstance(state[state_key], dict):
        raise ValueError(
            f"{str(path)!r} is not a checkpoint of the official train state: it has no {state_key!r} map "
            f"(top-level keys: {sorted(state)}); expected step, params, ema_params and opt_state."
        )
    flat = _flatten(state[state_key])
    check_parameters(model, flat, where=state_key)

    scheduler_config = dict(model.scheduler_config)
    if model.learned_schedule:
        # gamma(t) = b + |w| t: gamma(0) = b and gamma(1) = b + |w|, added in float64.
        bias, scale = float(flat["gamma/b"][0]), abs(float(flat["gamma/w"][0]))
        if not (np.isfinite(bias) and np.isfinite(scale) and scale > 0):
            raise ValueError(f"The learned schedule's gamma/b = {bias}, gamma/w = {scale} do not define a schedule.")
        scheduler_config.update(gamma_min=bias, gamma_max=bias + scale)
    components = {
        "unet": _load_component(VDMUNetModel, model.unet_config, _state_dict(model.unet_map, flat)),
        "scheduler": VDMScheduler(**scheduler_config),
    }
    if model.encoder_config is not None:
        encoder_state = _state_dict(model.encoder_map, flat)
        components["encoder"] = _load_component(DiffEncEncoderModel, model.encoder_config, encoder_state)
    pipeline = DiffEncPipeline(**components)
    networks = [components[name] for name in ("unet", "encoder") if name in components]
    converted = sum(p.numel() for network in networks for p in network.parameters())
    return ConversionResult(
        pipeline=pipeline,
        model=model,
        checkpoint=path,
        step=_step(state.get("step")),
        params=params,
        official_parameter_count=sum(v.size for v in flat.values() if isinstance(v, np.ndarray)),
        converted_parameter_count=converted + (2 if model.learned_schedule else 0),
        sha256=_sha256(path),
    )


def check_output_folder(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``output_dir`` as a Path; ``FileExistsError`` if it is a file, or a non-empty folder without
    ``overwrite``."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output {str(output_dir)!r} is a file; expected a folder to write the pipeline into.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--output {str(output_dir)!r} is not empty; choose a new folder, or pass --overwrite to replace it "
            "(its whole content, not only the files a pipeline has)."
        )
    return output_dir


def save_converted(
    result: ConversionResult, output_dir: str | os.PathLike, license_id: str | None = None, overwrite: bool = False
) -> Path:
    """Save the pipeline (safetensors + configs) and its model card (README.md, with the weights' source and
    license) into `output_dir`.

    Everything is written into a temporary sibling folder that then replaces `output_dir` (renamed into place), so
    an interrupted save leaves no half-written pipeline and never mixes with old files. A non-empty `output_dir`
    is refused (`FileExistsError`) unless `overwrite`, which replaces its whole content.
    """
    output_dir = check_output_folder(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    try:
        result.pipeline.save_pretrained(temporary)
        info = result.model_card_info(license_id)
        card = make_model_card(result.pipeline, output_dir.resolve().name, provenance=info)
        card.save(temporary / MODEL_CARD_NAME)
        if output_dir.is_dir() and any(output_dir.iterdir()):
            replaced = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.replace(output_dir, replaced)
            os.replace(temporary, output_dir)
            shutil.rmtree(replaced)
        else:
            os.replace(temporary, output_dir)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return output_dir


def cli(argv: Sequence[str] | None = None) -> int:
    """``diffenc-convert``: official checkpoint -> DiffEncPipeline folder (and optionally a Hub repository)."""
    parser = argparse.ArgumentParser(
        prog="diffenc-convert",
        description="Convert an official DiffEnc (bemigini/DiffEnc) or VDM (google-research/vdm) Flax checkpoint "
        "into a DiffEncPipeline folder: safetensors weights, configs and a model card. No JAX needed.",
    )
    parser.add_argument("checkpoint", help="checkpoint file (checkpoint_<step>, ckpt-<n>.flax) or its folder")
    parser.add_argument(
        "--config", required=True,
        help=f"official model config JSON (DiffEnc config_model_*.json, or a VDM get_config().to_dict() JSON), "
        f"or one of {sorted(BUILTIN_CONFIGS)}",
    )
    parser.add_argument("--train-config", help="DiffEnc only: the config_train_*.json the model was trained with")
    parser.add_argument("--output", required=True, help="folder to write the pipeline into (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument("--params", choices=PARAMETER_SETS, default="ema", help="EMA (default) or raw parameters")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also upload the folder to this Hub model repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--license", dest="license_id", help="Hub license id of the weights (default: 'other', "
                        "with a link to where they are published)")
    args = parser.parse_args(argv)
    try:
        check_output_folder(args.output, args.overwrite)
        result = convert_official_checkpoint(args.checkpoint, args.config, args.train_config, args.params)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, ImportError) as error:
        parser.exit(2, f"diffenc-convert: error: {error}\n")
    folder = save_converted(result, args.output, args.license_id, overwrite=args.overwrite)
    inert = result.model.inert_parameters()
    print(
        f"Converted {result.model.model_type} ({result.params} parameters, step {result.step}) from "
        f"{result.checkpoint} into {folder}: {result.converted_parameter_count:,} of "
        f"{result.official_parameter_count:,} official parameters; not converted (inert, conditioning fixed at "
        f"0): {', '.join(inert) or 'none'}."
    )
    if args.push_to_hub:
        upload_pipeline_folder(
            result.pipeline, folder, args.push_to_hub, private=args.private or None,
            commit_message=f"Convert official {result.model.model_type} checkpoint {result.checkpoint.name}",
            provenance=result.model_card_info(args.license_id),
        )
        print(f"Uploaded the pipeline files of {folder} to the Hub repository {args.push_to_hub}.")
    return 0
