"""The named presets: pipeline folders without weights, shipped inside the package (``presets/<name>/``).

Each folder beside this file holds model_index.json, each component's config, training_config.json (the
defaults of the training command's flags) and a README.md. They are package data, read with
``importlib.resources``, so names resolve the same in a checkout, an editable install and an installed wheel.
README.md in this folder lists them.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from ..pipeline_folder import component_configs

MODEL_INDEX_NAME = "model_index.json"


def _presets_dir() -> Path:
    folder = resources.files(__name__)
    if not isinstance(folder, Path):
        raise RuntimeError(
            f"The presets of diffenc_diffusers are not on the file system here ({folder!r}, e.g. a zipped "
            "install); install the package as a regular folder (pip install diffenc-diffusers)."
        )
    return folder


PRESETS_DIR: Path = _presets_dir()
"""The folder holding the named presets (inside the installed package)."""


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted (e.g. ``"digits-vdm"``, ``"cifar10-diffenc-32-4"``)."""
    return sorted(path.name for path in PRESETS_DIR.iterdir() if (path / MODEL_INDEX_NAME).is_file())


def resolve_preset(name_or_path: str | os.PathLike) -> Path:
    """The folder of a preset given by path (any existing folder) or by name (one of :func:`preset_names`).

    Raises:
        FileNotFoundError: Neither a folder nor a preset name; the message lists the presets.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    candidate = PRESETS_DIR / name
    if "/" not in name and os.sep not in name and (candidate / MODEL_INDEX_NAME).is_file():
        return candidate
    raise FileNotFoundError(
        f"{name!r} is neither a preset folder nor a preset name; available presets: {preset_names()}."
    )


def build_preset_components(name_or_path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The preset's folder and its freshly initialised components (name -> model or scheduler), each built with
    ``Class.from_config(Class.load_config(folder / name))``; no weights are read."""
    folder = resolve_preset(name_or_path)
    components = {
        name: component_class.from_config(component_class.load_config(component_folder))
        for name, (component_class, component_folder) in component_configs(folder).items()
    }
    return folder, components
