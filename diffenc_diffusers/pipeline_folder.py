"""What a DiffEncPipeline folder holds, and the checks run on one before anything is built from it.

A pipeline folder (written by `save_pretrained`, downloaded from the Hub, or a preset without weights) has a
model_index.json naming each component and its class, and one sub-folder per component with its config and,
for the networks, safetensors weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers.models.modeling_utils import ModelMixin
from safetensors import SafetensorError, safe_open

from .hub import CONFIG_NAMES, WEIGHTS_PREFIX, read_model_index, saved_components
from .models import DiffEncEncoderModel, VDMUNetModel
from .scheduling_vdm import VDMScheduler

COMPONENT_CLASSES: dict[str, type] = {
    "unet": VDMUNetModel,
    "scheduler": VDMScheduler,
    "encoder": DiffEncEncoderModel,
}
"""The class of each pipeline component, as recorded in a folder's model_index.json."""

REQUIRED_COMPONENTS = ("unet", "scheduler")
"""The components every DiffEncPipeline has (the encoder is optional)."""


def check_required_components(components: Mapping[str, Any], folder: str | os.PathLike) -> None:
    """``ValueError`` unless `components` (names -> anything) holds every name of :data:`REQUIRED_COMPONENTS`."""
    for name in REQUIRED_COMPONENTS:
        if name not in components:
            raise ValueError(f"{os.fspath(folder)!r}: model_index.json does not list the required component {name!r}.")


def component_configs(folder: str | os.PathLike) -> dict[str, tuple[type, Path]]:
    """The components of a preset folder: name -> (class, sub-folder holding its config).

    Raises:
        ValueError: model_index.json lists a component DiffEncPipeline does not have, records another class,
            or misses a required component.
        FileNotFoundError: a listed component has no sub-folder.
    """
    root = Path(folder)
    model_index = read_model_index(root)
    components = {}
    for name in saved_components(model_index):
        component_class = COMPONENT_CLASSES.get(name)
        if component_class is None:
            raise ValueError(
                f"The preset {str(root)!r} lists a component {name!r}; DiffEncPipeline's components "
                f"are {list(COMPONENT_CLASSES)}."
            )
        if model_index[name][1] != component_class.__name__:
            raise ValueError(
                f"The preset {str(root)!r} records {name!r} as {model_index[name][1]!r}; expected "
                f"{component_class.__name__!r}."
            )
        component_folder = root / name
        if not component_folder.is_dir():
            raise FileNotFoundError(f"The preset {str(root)!r} lists the component {name!r} but has no {name}/ folder.")
        components[name] = (component_class, component_folder)
    check_required_components(components, root)
    return components


def check_pipeline_folder(folder: str | os.PathLike, passed: set[str]) -> None:
    """Check that every component of a saved pipeline (except those passed in) is complete and readable: its
    sub-folder, its config, and for a network safetensors weights whose header reads (nothing is unpickled).

    Raises:
        FileNotFoundError: a listed component's folder, config or weights are missing.
        OSError: a weights file is truncated or corrupted.
        ValueError: model_index.json is not a JSON object or misses a required component.
    """
    root = Path(folder)
    listed = saved_components(read_model_index(root))
    check_required_components(dict.fromkeys(listed + sorted(passed)), root)
    for name in listed:
        if name in passed:
            continue
        component_folder = root / name
        if not component_folder.is_dir():
            raise FileNotFoundError(
                f"The pipeline folder {str(root)!r} is missing the component {name!r}: model_index.json "
                f"lists it, but there is no {name}/ folder. Copy the complete folder, or pass `{name}=` to "
                "from_pretrained."
            )
        if not any((component_folder / config_name).is_file() for config_name in CONFIG_NAMES):
            raise FileNotFoundError(
                f"The component {name!r} of {str(root)!r} has no config file ({' or '.join(CONFIG_NAMES)})."
            )
        component_class = COMPONENT_CLASSES.get(name)
        if component_class is None or not issubclass(component_class, ModelMixin):
            continue
        weights = sorted(component_folder.glob(f"{WEIGHTS_PREFIX}*.safetensors"))
        if not weights:
            pickled = sorted(path.name for path in component_folder.glob(f"{WEIGHTS_PREFIX}*.bin"))
            hint = f" It holds {pickled}, which are pickle files and are never loaded." if pickled else ""
            raise FileNotFoundError(
                f"The component {name!r} of {str(root)!r} has no safetensors weights "
                f"({WEIGHTS_PREFIX}.safetensors).{hint}"
            )
        for path in weights:
            try:
                with safe_open(path, framework="pt"):
                    pass
            except SafetensorError as error:
                raise OSError(
                    f"The weights file {path} of component {name!r} is truncated or corrupted ({error}); "
                    "save or download the pipeline again."
                ) from error
