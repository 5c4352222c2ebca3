"""The inputs of ``DiffEncPipeline.bits_per_dim`` as checked batches of uint8 images and their class labels.

Accepted: a uint8 tensor (N, C, H, W) with its labels as ``class_labels``; a ``torch.utils.data.DataLoader`` of
such tensors, (images, labels) tuples or lists, or dicts; a ``datasets.Dataset`` with a column of PIL images or of
uint8 arrays (C, H, W) and a label column. Every batch is checked against the model's (C, H, W) and classes
before it is used; nothing is resized, converted or cast. A new kind of input is one more branch of
:func:`likelihood_batches`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .columns import INTEGER_DTYPES, feature_dtype, find_image_column, find_label_column
from .images import check_image_shape, check_uint8_batch, image_to_uint8
from .labels import check_labels

Batch = tuple[torch.Tensor, torch.Tensor | None]
"""One batch of the likelihood: uint8 images (B, C, H, W) and their int64 labels (B,), or None (unconditional)."""

CONDITIONAL = "This pipeline is class-conditional"


class SizedBatches:
    """An iterable of batches with a known length (so that progress bars show a total)."""

    def __init__(self, batches: Iterable[Batch], length: int):
        self._batches = batches
        self._length = length

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._batches)

    def __len__(self) -> int:
        return self._length


def likelihood_batches(
    images: Any,
    batch_size: int,
    shape: tuple[int, int, int],
    num_classes: int | None,
    null_class: bool,
    class_labels: Any = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> Iterable[Batch]:
    """Checked (images, labels) batches of ``bits_per_dim``'s ``images``; the labels are None for an unconditional
    model (whatever the data holds).

    Args:
        images: a uint8 tensor (N, C, H, W), a DataLoader or a ``datasets.Dataset`` (see the module docstring).
        batch_size: images per batch for a tensor or a dataset (a DataLoader keeps its own batches).
        shape: the model's (C, H, W).
        num_classes: K of a class-conditional model, or None.
        null_class: the model has the null class (label K).
        class_labels: the labels of a tensor of images (integer tensor (N,) or list of ints).
        image_column, label_column: the dict key / dataset column of the images and of the labels.

    Raises:
        TypeError / ValueError: before any batch is computed for everything that can be checked up front (the
            argument combination, a tensor and its labels, a dataset's columns and size); a DataLoader's batches
            when they are read.
    """
    conditional = num_classes is not None
    if class_labels is not None:
        if not conditional:
            raise ValueError("`class_labels` were given, but this pipeline's models are unconditional.")
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                "`class_labels` go with the images as a uint8 tensor (N, C, H, W); a DataLoader or a "
                "datasets.Dataset brings its own labels (the second element of its (images, labels) batches, "
                f"or the dict key / dataset column `label_column`). Got images of type {type(images).__name__}."
            )
    if isinstance(images, torch.Tensor):
        return _tensor_batches(images, batch_size, shape, num_classes, null_class, class_labels, label_column)
    if isinstance(images, torch.utils.data.DataLoader):
        batches = (
            _loader_batch(item, index, image_column, label_column, shape, num_classes, null_class)
            for index, item in enumerate(images)
        )
        try:
            return SizedBatches(batches, len(images))
        except TypeError:
            return batches
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(images, datasets.Dataset):
        return _dataset_batches(images, batch_size, image_column, label_column, shape, num_classes, null_class)
    raise TypeError(
        "`images` must be a uint8 torch.Tensor of shape (N, C, H, W), a torch.utils.data.DataLoader of such "
        f"batches, or a datasets.Dataset; got {type(images).__name__}."
    )


def _tensor_batches(
    images: torch.Tensor,
    batch_size: int,
    shape: tuple[int, int, int],
    num_classes: int | None,
    null_class: bool,
    class_labels: Any,
    label_column: str | None,
) -> SizedBatches:
    if label_column is not None:
        raise ValueError(
            f"`label_column` ({label_column!r}) names a dict key of a DataLoader's batches or a column of a "
            "datasets.Dataset; with the images as a tensor pass their labels as `class_labels`."
        )
    images = check_uint8_batch(images, shape, "`images`")
    if images.shape[0] == 0:
        raise ValueError(f"`images` holds no images (shape {tuple(images.shape)}); pass at least one image.")
    labels = None
    if num_classes is not None:
        if class_labels is None:
            raise ValueError("This pipeline is class-conditional: pass `class_labels`, one label per image.")
        labels = check_labels(class_labels, num_classes, "`class_labels`", images.shape[0], null_class)
    starts = range(0, images.shape[0], batch_size)
    batches = (
        (images[start : start + batch_size], None if labels is None else labels[start : start + batch_size])
        for start in starts
    )
    return SizedBatches(batches, len(starts))


def _loader_batch(
    item: Any,
    index: int,
    image_column: str | None,
    label_column: str | None,
    shape: tuple[int, int, int],
    num_classes: int | None,
    null_class: bool,
) -> Batch:
    what = f"batch {index} of the DataLoader"
    images = check_uint8_batch(_batch_images(item, image_column), shape, what)
    conditional = num_classes is not None
    labels = _batch_labels(item, label_column, what, required=conditional)
    if not conditional:
        return images, None
    return images, check_labels(labels, num_classes, f"the labels of {what}", images.shape[0], null_class)


def _batch_images(item: Any, image_column: str | None) -> Any:
    """The images of one DataLoader batch: the batch itself, its first element, or a dict entry."""
    if isinstance(item, Mapping):
        return item[find_image_column(dict.fromkeys(item), image_column, "the keys of the DataLoader's dicts")]
    if isinstance(item, (list, tuple)) and item:
        return item[0]
    return item


def _batch_labels(item: Any, label_column: str | None, what: str, required: bool) -> Any:
    """The labels of one DataLoader batch: the second element of a tuple or list, or a dict entry (see
    :func:`find_label_column`); None when there are none and none are required."""
    if isinstance(item, Mapping):
        required_by = CONDITIONAL if required else None
        key = find_label_column(dict.fromkeys(item), label_column, f"the keys of {what}", required_by=required_by)
        return None if key is None else item[key]
    if label_column is not None:
        raise ValueError(
            f"`label_column` ({label_column!r}) names a key of dict batches, but {what} is a "
            f"{type(item).__name__}; (images, labels) tuples and lists carry the labels as their second element."
        )
    if isinstance(item, (list, tuple)) and len(item) >= 2:
        return item[1]
    if required:
        raise ValueError(
            f"{CONDITIONAL}, but {what} holds no class labels: the DataLoader must yield (images, labels) tuples or "
            f"lists, or dicts with the labels under `label_column`; got a "
            f"{type(item).__name__}{f' of length {len(item)}' if isinstance(item, (list, tuple)) else ''}."
        )
    return None


def _dataset_batches(
    dataset: Any,
    batch_size: int,
    image_column: str | None,
    label_column: str | None,
    shape: tuple[int, int, int],
    num_classes: int | None,
    null_class: bool,
) -> SizedBatches:
    datasets = sys.modules["datasets"]
    features = dataset.features
    among = "the dataset's columns"
    if len(dataset) == 0:
        raise ValueError(
            f"`images` is a datasets.Dataset with no rows (columns {list(dataset.column_names)}); bits_per_dim needs "
            "at least one image."
        )
    conditional = num_classes is not None
    label_name = find_label_column(features, label_column, among, required_by=CONDITIONAL if conditional else None)
    labels_of = _dataset_labels(dataset, label_name, num_classes, null_class) if conditional else None
    column = find_image_column(features, image_column, among)
    convert: Callable[[Any, int], torch.Tensor]
    if isinstance(features[column], datasets.Image):
        source = dataset.with_format(None)

        def convert(examples: Any, start: int) -> torch.Tensor:
            return torch.stack(
                [
                    _checked_image(image, shape, f"image {start + offset} of the dataset")
                    for offset, image in enumerate(examples)
                ]
            )

    else:
        dtype = feature_dtype(features[column])
        if dtype != "uint8":
            raise TypeError(
                f"The dataset column {column!r} holds {dtype} values; bits_per_dim needs 8-bit images: a "
                "column of PIL images (datasets.Image) or of uint8 arrays of shape (C, H, W)."
            )
        source = dataset.with_format("torch", columns=[column])

        def convert(examples: Any, start: int) -> torch.Tensor:
            # The column is declared uint8, so every value is in 0..255 (the torch format widens it to int64).
            tensors = [tensor.to(torch.uint8) for tensor in examples]
            for offset, tensor in enumerate(tensors):
                check_uint8_batch(tensor.unsqueeze(0), shape, f"image {start + offset} of the dataset")
            return torch.stack(tensors)

    starts = range(0, len(dataset), batch_size)
    batches = (
        (
            convert(source[start : start + batch_size][column], start),
            None if labels_of is None else labels_of(start, min(start + batch_size, len(dataset))),
        )
        for start in starts
    )
    return SizedBatches(batches, len(starts))


def _dataset_labels(
    dataset: Any, column: str, num_classes: int, null_class: bool
) -> Callable[[int, int], torch.Tensor]:
    """A function (start, stop) -> the checked int64 labels of those examples of the column."""
    dtype = feature_dtype(dataset.features[column])
    if dtype not in INTEGER_DTYPES:
        raise TypeError(
            f"The dataset column {column!r} holds {dtype} values; class labels must be integers (a "
            "datasets.ClassLabel or an integer datasets.Value column)."
        )
    source = dataset.select_columns([column]).with_format(None)

    def labels_of(start: int, stop: int) -> torch.Tensor:
        what = f"the labels of examples {start} .. {stop - 1} of the dataset (column {column!r})"
        values = list(source[start:stop][column])
        if any(value is None for value in values):
            raise ValueError(f"{what} include missing values (None); every image needs a class label.")
        return check_labels(values, num_classes, what, stop - start, null_class)

    return labels_of


def _checked_image(image: Any, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """A PIL image of a dataset as an exact uint8 tensor (C, H, W) of the model's shape."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} must be a PIL image, got {type(image).__name__}.")
    tensor = image_to_uint8(image, what)
    check_image_shape(tensor, shape, what)
    return tensor
