"""Hugging Face Hub helpers of DiffEncPipeline: the files of a pipeline, download, model card, upload.

A saved pipeline is `model_index.json` plus one folder per component, holding that component's config
(`config.json` or `scheduler_config.json`) and, for networks, its safetensors weights. These are the only
files that are downloaded and uploaded: training checkpoints, optimizer states or logs that share a folder
with a pipeline never leave the machine.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from huggingface_hub import (
    CommitInfo,
    ModelCard,
    ModelCardData,
    create_repo,
    hf_hub_download,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import LocalEntryNotFoundError

from .objective import network_classes

MODEL_INDEX_NAME = "model_index.json"
MODEL_CARD_NAME = "README.md"
WEIGHTS_PREFIX = "diffusion_pytorch_model"
CONFIG_NAMES = ("config.json", "scheduler_config.json")
MODEL_CARD_TAGS = ["diffenc", "vdm", "diffusion", "likelihood", "unconditional-image-generation"]
CLASS_CONDITIONAL_TAG = "class-conditional"
"""The tag of a class-conditional model's card, which replaces "unconditional-image-generation"."""


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed `model_index.json` of a pipeline folder; a clear error if it is missing or not JSON."""
    path = Path(folder) / MODEL_INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a diffusers pipeline folder: it has no {MODEL_INDEX_NAME}. Save a "
            "pipeline with `save_pretrained`, or pass the folder that holds model_index.json."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error


def saved_components(model_index: Mapping[str, Any]) -> list[str]:
    """Names of the components a `model_index.json` records with a class (optional components saved as
    `[null, null]` are left out)."""
    return [
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    ]


def pipeline_file_patterns(components: Iterable[str]) -> list[str]:
    """`fnmatch` patterns (as used by huggingface_hub's `allow_patterns`) of every file of a pipeline with
    these components: model_index.json, the model card, and each component's config and safetensors weights
    (single file, variants and shards with their index)."""
    patterns = [MODEL_INDEX_NAME, MODEL_CARD_NAME]
    for name in components:
        patterns += [f"{name}/{config_name}" for config_name in CONFIG_NAMES]
        patterns += [
            f"{name}/{WEIGHTS_PREFIX}*.safetensors",
            f"{name}/{WEIGHTS_PREFIX}*.safetensors.index*.json",
        ]
    return patterns


def pipeline_files(folder: str | os.PathLike) -> list[str]:
    """Relative paths (POSIX, sorted) of the pipeline files in a saved pipeline folder; nothing else in it."""
    root = Path(folder)
    patterns = pipeline_file_patterns(saved_components(read_model_index(root)))
    files = (path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
    return sorted(f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in patterns))


def download_pipeline(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """Fetch the pipeline files of a Hub repository into the Hugging Face cache; return the snapshot folder.

    `model_index.json` is fetched first; it names the components, and only their configs and safetensors
    weights are fetched next. With `local_files_only=True` (or `HF_HUB_OFFLINE=1`) only the cache is used.

    Raises:
        OSError: The repository (at that revision) is not in the cache and downloading is disabled.
        huggingface_hub.errors.RepositoryNotFoundError / RevisionNotFoundError: Online, the repository or
            revision does not exist (or is private and no valid token was given).
    """
    options = {
        "revision": revision,
        "cache_dir": cache_dir,
        "token": token,
        "local_files_only": local_files_only,
        "force_download": force_download,
    }
    try:
        index_path = hf_hub_download(repo_id, MODEL_INDEX_NAME, **options)
        components = saved_components(read_model_index(Path(index_path).parent))
        return snapshot_download(repo_id, allow_patterns=pipeline_file_patterns(components), **options)
    except LocalEntryNotFoundError as error:
        where = f"cache folder {os.fspath(cache_dir)!r}" if cache_dir is not None else "the Hugging Face cache"
        raise OSError(
            f"The pipeline {repo_id!r} (revision {revision or 'main'!r}) is not in {where}, and downloading "
            "is disabled (local_files_only=True or HF_HUB_OFFLINE=1). Download it once with network access, "
            "or pass the path of a saved pipeline folder."
        ) from error


def make_model_card(
    pipeline: DiffusionPipeline,
    repo_id: str,
    training_info: Mapping[str, Any] | None = None,
    bpd: float | None = None,
    provenance: Mapping[str, str] | None = None,
) -> ModelCard:
    """The model card (README.md) of a DiffEnc pipeline pushed to `repo_id`.

    The metadata says `library_name: diffusers` with the tags of :data:`MODEL_CARD_TAGS` (and the training
    dataset, when `training_info["dataset"]` is a Hub dataset id); the text describes the model (kind, image
    shape, parameter counts, noise schedule), its negative ELBO in bits/dim when `bpd` is given, how it was
    trained (every entry of `training_info`), and how to use it. Converted weights pass `provenance` (see
    `diffenc_diffusers.conversion.ConversionResult.model_card_info`): its `license_id` and `license_link`
    become the card's license metadata, every other entry a row of a "Source of the weights" section.

    A class-conditional pipeline (a network with `num_class_embeds`) gets the tag "class-conditional" instead of
    "unconditional-image-generation" and no `pipeline_tag` (the Hub has no class-conditional task); the card
    states the number of classes and whether there is a null class (classifier-free guidance, the unconditional
    ELBO), and the usage snippet passes `class_labels=` (and `guidance_scale=` with a null class).
    """
    scheduler = pipeline.scheduler.config
    unet = pipeline.unet.config
    size = unet.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    dataset = (training_info or {}).get("dataset")
    num_classes, null_class = network_classes(pipeline.unet, getattr(pipeline, "encoder", None))
    tags = list(MODEL_CARD_TAGS)
    if num_classes is not None:
        tags[tags.index("unconditional-image-generation")] = CLASS_CONDITIONAL_TAG
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation" if num_classes is None else None,
        tags=tags,
        datasets=[dataset] if isinstance(dataset, str) and "/" in dataset else None,
    )
    source_section = []
    if provenance:
        rows = {key: value for key, value in provenance.items() if key not in ("license_id", "license_link")}
        card_data.license = provenance.get("license_id", "other")
        if card_data.license == "other":
            card_data.license_name = "see-source"
            card_data.license_link = provenance.get("license_link")
        source_section = [
            "## Source of the weights",
            "",
            _table(("", ""), [(k, _format_value(k, v)) for k, v in rows.items()]),
            "",
        ]
    encoder_parameters = (
        f"{sum(p.numel() for p in pipeline.encoder.parameters()):,}" if pipeline.encoder is not None else "none"
    )
    model_rows = [
        ("model", pipeline.scheduler.forward_process.description),
        ("images", f"{unet.in_channels} x {height} x {width}, 8 bit"),
        ("denoiser parameters", f"{sum(p.numel() for p in pipeline.unet.parameters()):,}"),
        ("encoder parameters", encoder_parameters),
        (
            "noise schedule",
            f"{scheduler.schedule}, gamma(t) from {scheduler.gamma_min} to {scheduler.gamma_max}",
        ),
        ("prediction", scheduler.prediction_type),
    ]
    if num_classes is not None:
        model_rows.append(("classes", f"{num_classes} (class_labels 0 .. {num_classes - 1})"))
        model_rows.append(
            (
                "null class",
                f"yes: label {num_classes}, the unconditional model (classifier-free guidance, the unconditional ELBO)"
                if null_class
                else "no (guidance_scale must be 1)",
            )
        )
    if bpd is None:
        likelihood = "Not evaluated yet."
    else:
        elbo = (
            "Negative ELBO" if num_classes is None else "Conditional negative ELBO -log p(x | c), on the images' labels"
        )
        likelihood = f"{elbo} (an upper bound on the negative log-likelihood): **{float(bpd):.4f} bits/dim**."
    if training_info:
        training = _table(("setting", "value"), [(str(k), _format_value(k, v)) for k, v in training_info.items()])
    else:
        training = "Training settings were not recorded."
    loading = (
        "```python\n"
        "import torch\n"
        "from diffenc_diffusers import DiffEncPipeline\n\n"
        f'pipe = DiffEncPipeline.from_pretrained("{repo_id}")\n'
        "generator = torch.Generator().manual_seed(0)\n"
    )
    if num_classes is None:
        usage = (
            loading + "images = pipe(batch_size=4, num_inference_steps=1000, generator=generator).images\n\n"
            "# Negative ELBO in bits/dim of uint8 images of shape (N, C, H, W)\n"
            "likelihood = pipe.bits_per_dim(uint8_images, generator=generator)\n"
            "print(likelihood.bpd.mean())\n"
            "```"
        )
    else:
        guidance = 3.0 if null_class else 1.0
        usage = (
            loading + f"class_labels = torch.arange(4) % {num_classes}  # one class per image\n"
            "images = pipe(\n"
            "    batch_size=4, num_inference_steps=1000, generator=generator, class_labels=class_labels,\n"
            f"    guidance_scale={guidance},\n"
            ").images\n\n"
            "# Conditional negative ELBO -log p(x | c) in bits/dim of uint8 images (N, C, H, W) with labels (N,)\n"
            "likelihood = pipe.bits_per_dim(uint8_images, class_labels=labels, generator=generator)\n"
            "print(likelihood.bpd.mean())\n"
        )
        if null_class:
            usage += (
                f"# The unconditional ELBO -log p(x) of the same model: the null label {num_classes}\n"
                f"null = pipe.bits_per_dim(uint8_images, class_labels=torch.full_like(labels, {num_classes}))\n"
            )
        usage += "```"
        if null_class:
            usage += (
                "\n\n`guidance_scale` s samples with out(null) + s (out(c) - out(null)); s = 1 is the conditional "
                "model (one network call per step)."
            )
    if pipeline.scheduler.forward_process.needs_encoder:
        usage += "\n\nSampling never uses the encoder; `bits_per_dim` needs it."
    content = "\n".join(
        [
            "---",
            card_data.to_yaml(),
            "---",
            "",
            f"# {repo_id.split('/')[-1]}",
            "",
            f"{'An unconditional' if num_classes is None else f'A class-conditional ({num_classes} classes)'} "
            f"image model: {pipeline.scheduler.forward_process.description}, made with "
            "diffenc-diffusers, a diffusers implementation of [DiffEnc: Variational Diffusion with a Learned "
            "Encoder](https://arxiv.org/abs/2310.19789) (Nielsen et al., ICLR 2024).",
            "",
            "## Model",
            "",
            _table(("", ""), model_rows),
            "",
            *source_section,
            "## Likelihood",
            "",
            likelihood,
            "",
            "## Training",
            "",
            training,
            "",
            "## Usage",
            "",
            "Install `diffenc-diffusers`, then:",
            "",
            usage,
            "",
        ]
    )
    return ModelCard(content)


def upload_pipeline_folder(
    pipeline: DiffusionPipeline,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    training_info: Mapping[str, Any] | None = None,
    bpd: float | None = None,
    provenance: Mapping[str, str] | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed, write the model card into `folder` and upload the pipeline files of
    `folder` (and nothing else in it). Returns huggingface_hub's `CommitInfo`."""
    repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    card = make_model_card(pipeline, repo_id, training_info=training_info, bpd=bpd, provenance=provenance)
    card.save(Path(folder) / MODEL_CARD_NAME)
    return upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=pipeline_files(folder),
        commit_message=commit_message or "Upload DiffEnc pipeline",
        token=token,
        create_pr=create_pr,
    )


def _format_value(key: str, value: Any) -> str:
    if value is None:
        return "none (continuous time)" if key == "num_timesteps" else "none"
    return str(value).replace("|", "\\|")


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)
