"""Which column of a dataset, or which key of a DataLoader's dict batches, holds the images and which the labels.

One finder for each, used by the likelihood inputs of ``DiffEncPipeline.bits_per_dim`` and by the training and
evaluation data (:func:`~diffenc_diffusers.data.load_image_splits`). ``columns`` maps each name to its
``datasets`` feature (``None`` for the keys of a dict batch, which have no declared type).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IMAGE_KEYS = ("image", "img", "images", "pixel_values")
"""Columns / dict keys taken to hold the images when `image_column` is not given and no column is typed
``datasets.Image``."""

LABEL_KEYS = ("label", "labels", "class_labels")
"""Columns / dict keys taken to hold the class labels when `label_column` is not given and no column is typed
``datasets.ClassLabel``."""

INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
"""datasets value dtypes accepted for a column of class labels (a `datasets.ClassLabel` is int64)."""


def _typed(columns: Mapping[str, Any], feature_name: str) -> list[str]:
    """The columns whose feature is ``datasets.<feature_name>`` (``"Image"``, ``"ClassLabel"``)."""
    if all(feature is None for feature in columns.values()):
        return []
    import datasets

    feature_class = getattr(datasets, feature_name)
    return [name for name, feature in columns.items() if isinstance(feature, feature_class)]


def _existing(name: str, columns: Mapping[str, Any], among: str, argument: str) -> str:
    """``name`` if it is one of the columns; else a ``ValueError`` naming the argument and listing the columns."""
    if name not in columns:
        raise ValueError(f"{argument} {name!r} is not among {among}: {list(columns)}.")
    return name


def find_image_column(
    columns: Mapping[str, Any], image_column: str | None, among: str, argument: str = "`image_column`"
) -> str:
    """The column holding the images: ``image_column`` if given (it must exist); else the only ``datasets.Image``
    column; else the only column named as in :data:`IMAGE_KEYS`; else the only column.

    Args:
        columns: column name -> datasets feature (``None`` for dict keys).
        image_column: the column the user named, or ``None`` to find it.
        among: what the names are, for messages (e.g. "the dataset's columns", "the keys of batch 0 of the
            DataLoader").
        argument: how the user names the column (e.g. "`image_column`", "`--image_column`").

    Raises:
        ValueError: ``image_column`` is not a column, or no single column can be told to hold the images.
    """
    if image_column is not None:
        return _existing(image_column, columns, among, argument)
    names = list(columns)
    typed = _typed(columns, "Image")
    if len(typed) > 1:
        raise ValueError(
            f"Cannot tell which of {among} {names} holds the images: several image columns {typed}; choose one "
            f"with {argument}."
        )
    named = [name for name in names if name in IMAGE_KEYS]
    candidates = typed or named or (names if len(names) == 1 else [])
    if len(candidates) != 1:
        raise ValueError(
            f"Cannot tell which of {among} {names} holds the images: none is a datasets.Image column and "
            f"{'several' if named else 'none'} is named as in {list(IMAGE_KEYS)}; pass {argument}."
        )
    return candidates[0]


def find_label_column(
    columns: Mapping[str, Any],
    label_column: str | None,
    among: str,
    argument: str = "`label_column`",
    required_by: str | None = None,
) -> str | None:
    """The column holding the class labels: ``label_column`` if given (it must exist); else the only
    ``datasets.ClassLabel`` column; else the only column named as in :data:`LABEL_KEYS`; else ``None``.

    Args:
        columns, among, argument: as for :func:`find_image_column`.
        label_column: the column the user named, or ``None`` to find it.
        required_by: why labels are needed (e.g. "This pipeline is class-conditional"): then finding none is a
            ``ValueError`` that starts with it; ``None`` when unlabelled data is fine.
    """
    if label_column is not None:
        return _existing(label_column, columns, among, argument)
    names = list(columns)
    typed = _typed(columns, "ClassLabel")
    named = [name for name in names if name in LABEL_KEYS]
    candidates = typed if typed else named
    if len(candidates) == 1:
        return candidates[0]
    if required_by is not None:
        typed_columns = any(feature is not None for feature in columns.values())
        kind = f"{'a datasets.ClassLabel column or ' if typed_columns else ''}named as in {list(LABEL_KEYS)}"
        count = f"several of {among} {names} are" if candidates else f"none of {among} {names} is"
        raise ValueError(
            f"{required_by}, and {count} {kind}, so it cannot tell which holds the class labels; pass {argument}."
        )
    return None


def feature_dtype(feature: Any) -> str | None:
    """The value dtype of a datasets feature (arrays, sequences and lists of values), or None."""
    while feature is not None:
        dtype = getattr(feature, "dtype", None)
        if isinstance(dtype, str):
            return dtype
        feature = getattr(feature, "feature", None)
    return None
