"""Hugging Face Hub helpers of DiffEncPipeline: the files of a pipeline, download, model card, upload.

A saved pipeline is `model_index.json` plus one folder per component, holding that component's config
(`config.json` or `scheduler_config.json`) and, for networks, its safetensors weights. These are the only
files that are downloaded and uploaded: training checkpoints, optimizer states, logs, other weight variants
or anything else that shares a folder with a pipeline never leave the machine. An upload is one commit of an
explicit list of files (:func:`pipeline_files`), each a regular file inside the folder (never a symbolic
link), its JSON files without diffusers' local `_name_or_path`, and nothing in it names a local path of this
machine (:func:`check_no_local_paths`).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

import huggingface_hub
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    EvalResult,
    ModelCard,
    ModelCardData,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

from .objective import network_classes

MODEL_INDEX_NAME = "model_index.json"
MODEL_CARD_NAME = "README.md"
WEIGHTS_PREFIX = "diffusion_pytorch_model"
CONFIG_NAMES = ("config.json", "scheduler_config.json")
MODEL_CARD_TAGS = ["diffenc", "vdm", "diffusion", "likelihood", "unconditional-image-generation"]
CLASS_CONDITIONAL_TAG = "class-conditional"
"""The tag of a class-conditional model's card, which replaces "unconditional-image-generation"."""


DEFAULT_LICENSE = "apache-2.0"
"""The license a model card declares unless told otherwise (the license of diffenc-diffusers)."""

CARD_SAMPLING_STEPS = 1000
"""`num_inference_steps` in the model card's usage snippets."""

PIPELINE_CLASS_NAME = "DiffEncPipeline"
HUB_CODE_NAME = "diffenc_pipeline"
"""The module name under which :mod:`diffenc_diffusers.hub_code` is saved with a pipeline (`diffenc_pipeline.py`
at its root and in each component's folder) and named in model_index.json, for diffusers' generic loader."""
HUB_CODE_FILE = f"{HUB_CODE_NAME}.py"

LOCAL_PATH_KEYS = ("_name_or_path",)
"""Config entries diffusers fills with the local folder a component was loaded from; never saved or uploaded."""

_VARIANT = re.compile(r"[A-Za-z0-9_-]+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:[A-Za-z]:[\\/]|~/|/)[^\s'\"|,;()\[\]{}<>]+")


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed `model_index.json` of a pipeline folder; a clear error if it is missing or not JSON."""
    path = Path(folder) / MODEL_INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a diffusers pipeline folder: it has no {MODEL_INDEX_NAME}. Save a "
            "pipeline with `save_pretrained`, or pass the folder that holds model_index.json."
        )
    try:
        model_index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(model_index, dict):
        raise ValueError(
            f"{path} holds a JSON {type(model_index).__name__}; a model_index.json is a JSON object mapping "
            '"_class_name" and each component name to [library, class].'
        )
    return model_index


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


def component_class(model_index: Mapping[str, Any], name: str) -> type:
    """The class model_index.json records for the component `name`: one of the configurable classes (models,
    schedulers) that diffenc_diffusers exports in its `__all__`, which the shipped code file re-exports;
    ValueError otherwise."""
    import diffenc_diffusers

    exported = {n: getattr(diffenc_diffusers, n) for n in diffenc_diffusers.__all__}
    classes = {n: value for n, value in exported.items() if isinstance(value, type) and issubclass(value, ConfigMixin)}
    class_name = model_index[name][1]
    if class_name not in classes:
        raise ValueError(
            f"model_index.json records the component {name!r} as {class_name!r}; a DiffEnc pipeline's components "
            f"are classes of diffenc_diffusers: {sorted(classes)}."
        )
    return classes[class_name]


def pipeline_files(folder: str | os.PathLike, variant: str | None = None) -> list[str]:
    """Relative paths (POSIX) of exactly the files `from_pretrained(folder, variant=variant)` loads.

    These are model_index.json and, per component it lists, its config (`config.json` or
    `scheduler_config.json`) and, for networks, its safetensors weights of that variant:
    `diffusion_pytorch_model[.<variant>].safetensors`, or the shard index
    `diffusion_pytorch_model.safetensors.index[.<variant>].json` and the shards it names. Nothing else in the
    folder is listed (other variants, checkpoints, logs, stray files). The model card is not included.

    Raises:
        FileNotFoundError: model_index.json, a listed component's config or its weights of `variant` are missing.
        ValueError: A listed file is a symbolic link (or lies under one) or is not a regular file; a
            component's class is not a DiffEnc class; a shard index names a file outside its folder;
            `variant` is not a plain name.
    """
    if variant is not None and not _VARIANT.fullmatch(variant):
        raise ValueError(f"`variant` must be letters, digits, '-' and '_' such as 'fp16'; got {variant!r}.")
    root = Path(folder)
    check_regular_file(root, MODEL_INDEX_NAME)
    model_index = read_model_index(root)
    files = [MODEL_INDEX_NAME]
    for name in saved_components(model_index):
        cls = component_class(model_index, name)
        files.append(check_regular_file(root, f"{name}/{cls.config_name}"))
        if issubclass(cls, ModelMixin):
            files += _weights_files(root, name, variant)
    return files


def check_regular_file(root: Path, relative: str) -> str:
    """`relative` if `root / relative` is a regular file and neither it nor a folder between it and `root` is a
    symbolic link (so it lies inside `root`); FileNotFoundError if it is missing, ValueError otherwise."""
    path = root
    for part in PurePath(relative).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"The pipeline folder {str(root)!r} has no {relative}.") from None
        if stat.S_ISLNK(mode):
            raise ValueError(
                f"{str(path)!r} is a symbolic link; only regular files inside the pipeline folder are uploaded. "
                f"Replace it with a copy of the file it points to ({os.path.realpath(path)!r}) if that is intended."
            )
    if not stat.S_ISREG(mode):
        raise ValueError(f"{str(path)!r} is not a regular file.")
    return relative


def _with_variant(filename: str, variant: str | None) -> str:
    """diffusers' variant file name: the variant before the last extension (`a.safetensors` -> `a.fp16.safetensors`)."""
    if variant is None:
        return filename
    stem, extension = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def _weights_files(root: Path, name: str, variant: str | None) -> list[str]:
    single = f"{name}/{_with_variant(f'{WEIGHTS_PREFIX}.safetensors', variant)}"
    index = f"{name}/{_with_variant(f'{WEIGHTS_PREFIX}.safetensors.index.json', variant)}"
    if os.path.lexists(root / index):
        check_regular_file(root, index)
        try:
            shards = sorted(set(json.loads((root / index).read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as error:
            raise ValueError(f"{root / index} is not a safetensors shard index ({error}).") from error
        for shard in shards:
            if not isinstance(shard, str) or PurePath(shard).name != shard or shard in (".", ".."):
                raise ValueError(f"{root / index} names the shard {shard!r}, which is not a file of {name}/.")
        return [index, *(check_regular_file(root, f"{name}/{shard}") for shard in shards)]
    if os.path.lexists(root / single):
        return [check_regular_file(root, single)]
    which = "" if variant is None else f" of the variant {variant!r}"
    raise FileNotFoundError(
        f"The component {name!r} of {str(root)!r} has no safetensors weights{which} ({single} or {index})."
    )


def public_json(data: bytes, name: str) -> bytes:
    """A config or model_index.json as uploaded: without the local entries of :data:`LOCAL_PATH_KEYS`, in
    diffusers' layout (sorted keys, two-space indent)."""
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{name} is not valid JSON ({error}).") from error
    if not isinstance(config, dict):
        raise ValueError(f"{name} must hold a JSON object, got {type(config).__name__}.")
    for key in LOCAL_PATH_KEYS:
        config.pop(key, None)
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def hub_model_index(model_index: Mapping[str, Any]) -> dict[str, Any]:
    """model_index.json as saved and uploaded: the pipeline and each component it lists are named by the code
    file shipped with them, `["diffenc_pipeline", "DiffEncPipeline"]`, `["diffenc_pipeline", "VDMUNetModel"]`,
    ..., which diffusers' `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` resolves (locally
    and from the Hub). Every other entry is kept."""
    converted = dict(model_index)
    converted["_class_name"] = [HUB_CODE_NAME, PIPELINE_CLASS_NAME]
    for name in saved_components(model_index):
        converted[name] = [HUB_CODE_NAME, component_class(model_index, name).__name__]
    return converted


def package_model_index(model_index: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`hub_model_index`, as `DiffEncPipeline.from_pretrained` reads a folder: entries that
    name the shipped code file become the installed package's classes (`"DiffEncPipeline"`, `[module path, class
    name]`), so loading never runs code from the folder. A folder saved before the code file (full module paths,
    `"_class_name": "DiffEncPipeline"`) reads unchanged."""
    converted = dict(model_index)
    if converted.get("_class_name") == [HUB_CODE_NAME, PIPELINE_CLASS_NAME]:
        converted["_class_name"] = PIPELINE_CLASS_NAME
    for name in saved_components(model_index):
        if model_index[name][0] == HUB_CODE_NAME:
            cls = component_class(model_index, name)
            converted[name] = [cls.__module__, cls.__name__]
    return converted


def hub_code() -> bytes:
    """The bytes of the code file shipped with every pipeline (the source of :mod:`diffenc_diffusers.hub_code`)."""
    return (Path(__file__).parent / "hub_code.py").read_bytes()


def public_contents(folder: str | os.PathLike, variant: str | None = None) -> dict[str, bytes | str]:
    """Every file of a pipeline's upload except the model card, path in the repository -> content: the files of
    :func:`pipeline_files` (JSON rewritten by :func:`public_json`, model_index.json also by
    :func:`hub_model_index`; weights as their local path) and the code file :data:`HUB_CODE_FILE` at the root
    and in each component's folder (from the installed package, whatever the folder holds)."""
    root = Path(folder)
    files = pipeline_files(root, variant)
    model_index = read_model_index(root)
    contents: dict[str, bytes | str] = {}
    for relative in files:
        path = root / relative
        if relative == MODEL_INDEX_NAME:
            contents[relative] = public_json(json.dumps(hub_model_index(model_index)).encode("utf-8"), str(path))
        elif relative.endswith(".json"):
            contents[relative] = public_json(path.read_bytes(), str(path))
        else:
            contents[relative] = str(path)
    for name in ["", *(f"{component}/" for component in saved_components(model_index))]:
        contents[f"{name}{HUB_CODE_FILE}"] = hub_code()
    return contents


def write_hub_layout(folder: str | os.PathLike, variant: str | None = None) -> None:
    """Rewrite a saved pipeline folder as it is uploaded (:func:`public_contents`): model_index.json naming the
    shipped code file, configs without local paths, and the code file at the root and in each component's
    folder (an existing file or symbolic link of that name is replaced, never written through)."""
    root = Path(folder)
    for relative, content in public_contents(root, variant).items():
        if isinstance(content, bytes):
            path = root / relative
            path.unlink(missing_ok=True)
            path.write_bytes(content)


def local_paths(*extra: str | os.PathLike) -> list[str]:
    """Absolute paths of this machine that no uploaded file may contain: the home, working and temporary
    folders, the folder this package is installed in, and `extra` (each as given and resolved; the file
    system root is left out). Longest first."""
    package_parent = Path(__file__).resolve().parents[1]
    candidates = [Path.home(), Path.cwd(), Path(tempfile.gettempdir()), package_parent, *map(Path, extra)]
    paths = set()
    for candidate in candidates:
        for form in (os.path.abspath(candidate), os.path.realpath(candidate)):
            if Path(form).parent != Path(form):
                paths.add(form)
    return sorted(paths, key=len, reverse=True)


def check_no_local_paths(name: str, data: bytes, paths: Iterable[str]) -> None:
    """ValueError if the bytes of the file `name` contain one of the local `paths` (as a whole path name)."""
    for path in paths:
        if re.search(rb"(?<![\w.-])" + re.escape(os.fsencode(path)) + rb"(?![\w.-])", data):
            raise ValueError(
                f"Refusing to upload: {name} contains the local path {path!r} of this machine. Nothing was uploaded."
            )


def safetensors_header(path: str | os.PathLike) -> bytes:
    """The JSON header of a safetensors file (the only part of it that can hold text)."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        if size > os.fstat(file.fileno()).st_size - 8:
            raise ValueError(f"{path} is not a safetensors file (header size {size} exceeds the file).")
        return file.read(size)


def public_text(text: str) -> str:
    """`text` with every absolute file path replaced by its last component (a local image folder
    `/home/me/data/digits` becomes `digits`), for the model card."""
    return _ABSOLUTE_PATH.sub(lambda match: PurePath(match.group(0).replace("\\", "/")).name, text)


def hub_dataset_id(dataset: Any) -> str | None:
    """`dataset` if it is a Hub dataset id ("org/name") and not a local path; otherwise None."""
    if not isinstance(dataset, str) or dataset.count("/") != 1 or os.path.exists(dataset):
        return None
    try:
        validate_repo_id(dataset)
    except HFValidationError:
        return None
    return dataset


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
    license_id: str = DEFAULT_LICENSE,
) -> ModelCard:
    """The model card (README.md) of a DiffEnc pipeline pushed to `repo_id`.

    The metadata says `library_name: diffusers` with the tags of :data:`MODEL_CARD_TAGS` (and the training
    dataset, when `training_info["dataset"]` is a Hub dataset id); the text describes the model (kind, image
    shape, parameter counts, noise schedule), its negative ELBO in bits/dim when `bpd` is given, how it was
    trained (every entry of `training_info`), and how to use it. Converted weights pass `provenance` (see
    `diffenc_diffusers.conversion.ConversionResult.model_card_info`): its `license_id` and `license_link`
    become the card's license metadata (instead of `license_id`), every other entry a row of a "Source of the
    weights" section. With a finite `bpd` the metadata also holds a model-index entry (huggingface_hub's
    `EvalResult`): the negative ELBO in bits/dim on the test set of the training dataset.

    The usage section says where diffenc-diffusers comes from and holds two runnable code blocks: loading with
    `DiffEncPipeline.from_pretrained`, sampling and the likelihood of 8-bit images; and loading with diffusers'
    generic `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`. Absolute paths in
    `training_info` are shortened to their last component (:func:`public_text`).

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
        datasets=[hub_dataset_id(dataset)] if hub_dataset_id(dataset) else None,
        license=license_id,
    )
    if bpd is not None and math.isfinite(float(bpd)):
        card_data.model_name = repo_id.split("/")[-1]
        card_data.eval_results = [_bpd_result(float(bpd), dataset, num_classes is not None)]
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
    can_evaluate = not pipeline.scheduler.forward_process.needs_encoder or pipeline.encoder is not None
    usage = _usage(repo_id, num_classes, null_class, can_evaluate)
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
            _install_line(),
            "",
            usage,
            "",
        ]
    )
    return ModelCard(content)


def save_model_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    """Write `card` to `folder/README.md` (UTF-8, exactly the bytes uploaded) and return the path; a
    README.md that is a symbolic link is refused rather than written through."""
    path = Path(folder) / MODEL_CARD_NAME
    if path.is_symlink():
        raise ValueError(f"{str(path)!r} is a symbolic link; refusing to write the model card through it.")
    path.write_bytes(card.content.encode("utf-8"))
    return path


def upload_pipeline_folder(
    pipeline: DiffusionPipeline,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    variant: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    training_info: Mapping[str, Any] | None = None,
    bpd: float | None = None,
    provenance: Mapping[str, str] | None = None,
) -> CommitInfo:
    """Upload exactly the files `from_pretrained` loads from `folder` (:func:`pipeline_files` of `variant`),
    the shipped code file (:data:`HUB_CODE_FILE`, for diffusers' generic loader) and a model card, in one commit
    to `repo_id` (created if needed). Returns huggingface_hub's `CommitInfo`.

    The files are checked before anything is created or sent: each is a regular file inside `folder` (a
    symbolic link is refused), JSON files are sent without `_name_or_path` (:func:`public_contents`), and no
    file (nor a weights file's header, nor the card) may contain a local path of this machine
    (:func:`local_paths`). The card is also written to `folder/README.md`.

    Raises:
        FileNotFoundError / ValueError: As :func:`pipeline_files`; a file holds a local path.
    """
    root = Path(folder)
    guard = local_paths(root)
    contents = public_contents(root, variant)
    for relative, content in contents.items():
        check_no_local_paths(relative, content if isinstance(content, bytes) else safetensors_header(content), guard)
    if (root / MODEL_CARD_NAME).is_symlink():
        raise ValueError(f"{str(root / MODEL_CARD_NAME)!r} is a symbolic link; the model card is written there.")
    repo_id = huggingface_hub.create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    card = make_model_card(pipeline, repo_id, training_info=training_info, bpd=bpd, provenance=provenance)
    contents[MODEL_CARD_NAME] = card.content.encode("utf-8")
    check_no_local_paths(MODEL_CARD_NAME, contents[MODEL_CARD_NAME], guard)
    save_model_card(card, root)
    return huggingface_hub.create_commit(
        repo_id,
        [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in contents.items()],
        commit_message=commit_message or "Upload DiffEnc pipeline",
        token=token,
        create_pr=create_pr,
    )


def _bpd_result(bpd: float, dataset: Any, conditional: bool) -> EvalResult:
    """The model-index entry of the test negative ELBO."""
    name = hub_dataset_id(dataset) or (public_text(str(dataset)) if dataset else "unknown")
    return EvalResult(
        task_type="image-generation" if conditional else "unconditional-image-generation",
        task_name="Class-conditional image generation" if conditional else "Unconditional image generation",
        dataset_type=name,
        dataset_name=name,
        dataset_split="test",
        metric_type="bits-per-dim",
        metric_name=f"{'Conditional n' if conditional else 'N'}egative ELBO (bits/dim, upper bound on the NLL)",
        metric_value=round(bpd, 4),
    )


def _install_line() -> str:
    from . import __version__

    return (
        f"This model was made with diffenc-diffusers {__version__}, which is not published on PyPI: install it "
        "from its source repository (`pip install -e .` in a checkout of diffenc-diffusers, which also installs "
        "its requirements, diffusers 0.42 among them), then:"
    )


def _usage(repo_id: str, num_classes: int | None, null_class: bool, can_evaluate: bool) -> str:
    """The usage section's code blocks (each runs as pasted) and notes."""
    labels = "" if num_classes is None else ", class_labels=class_labels"
    guidance = 3.0 if null_class else 1.0
    steps = CARD_SAMPLING_STEPS
    lines = [
        "```python",
        "import torch",
        "from diffenc_diffusers import DiffEncPipeline",
        "",
        f'pipe = DiffEncPipeline.from_pretrained("{repo_id}")',
        "generator = torch.Generator().manual_seed(0)",
    ]
    if num_classes is None:
        lines.append(f"images = pipe(batch_size=4, num_inference_steps={steps}, generator=generator).images  # PIL")
    else:
        lines += [
            f"class_labels = torch.arange(4) % {num_classes}  # one class per image",
            f"images = pipe(batch_size=4, num_inference_steps={steps}, generator=generator{labels},",
            f"    guidance_scale={guidance}).images  # PIL images",
        ]
    if can_evaluate:
        what = "negative ELBO" if num_classes is None else "conditional negative ELBO -log p(x | c)"
        lines += [
            "",
            f"# The {what} in bits/dim of 8-bit images: a uint8 tensor (N, C, H, W)"
            + ("," if num_classes is None else "\n# with labels (N,),"),
            "# a DataLoader of such batches, or a datasets.Dataset of images. Here: new samples, as uint8.",
            f"samples = pipe(batch_size=4, num_inference_steps={steps}, generator=generator{labels},",
            '    output_type="pt").images  # floats k / 255',
            "uint8_images = (samples * 255).round().to(torch.uint8)",
            f"likelihood = pipe.bits_per_dim(uint8_images{labels}, generator=generator)",
            "print(likelihood.bpd.mean())",
        ]
        if null_class:
            lines += [
                f"# The unconditional ELBO -log p(x) of the same model: the null label {num_classes}",
                f"null_labels = torch.full_like(class_labels, {num_classes})",
                "print(pipe.bits_per_dim(uint8_images, class_labels=null_labels, generator=generator).bpd.mean())",
            ]
    lines += [
        "```",
        "",
        "With diffusers' generic loader (diffenc-diffusers installed): `trust_remote_code=True` lets it run the "
        f"repository's `{HUB_CODE_FILE}`, which holds no model code and only imports the installed package's classes.",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)',
        f"image = pipe(num_inference_steps={steps}{'' if num_classes is None else ', class_labels=[0]'}).images[0]",
        "```",
    ]
    if null_class:
        lines += [
            "",
            "`guidance_scale` s samples with out(null) + s (out(c) - out(null)); s = 1 is the conditional model (one "
            "network call per step).",
        ]
    return "\n".join(lines)


def _format_value(key: str, value: Any) -> str:
    if value is None:
        return "none (continuous time)" if key == "num_timesteps" else "none"
    return public_text(str(value)).replace("|", "\\|")


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)
