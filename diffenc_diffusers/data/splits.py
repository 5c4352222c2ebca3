"""Train and test splits of a built-in dataset, a Hugging Face ``datasets`` dataset or a local image folder, as
checked 8-bit images (:class:`UInt8ImageDataset`) with their class labels where the source has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .builtin import BUILTIN_DATASETS, load_builtin_dataset
from .columns import find_image_column, find_label_column
from .images import UInt8ImageDataset

HOLDOUT_SEED = 0
"""Seed of the permutation that holds out test images from a dataset without a test split."""


COMMON_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tiff")
"""The image extensions named in messages (datasets' imagefolder reads more)."""


def image_folder_extensions() -> tuple[str, ...]:
    """The file extensions (lower case, with the dot) that datasets' ``imagefolder`` builder reads as images."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return tuple(ImageFolder.EXTENSIONS)


def check_image_folder(data_dir: str | Path) -> None:
    """``ValueError`` naming ``--train_data_dir`` unless ``data_dir`` is a folder holding at least one image file
    (searched recursively, as datasets' ``imagefolder`` does), before datasets reads it."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ValueError(f"`--train_data_dir` {str(data_dir)!r} is not a directory.")
    extensions = image_folder_extensions()
    files = (path for path in folder.rglob("*") if path.is_file())
    if any(path.suffix.lower() in extensions for path in files):
        return
    found = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    shown = f"{len(found)} other file(s): {found[:5]}{' ...' if len(found) > 5 else ''}" if found else "no files"
    raise ValueError(
        f"`--train_data_dir` {str(data_dir)!r} holds no image file ({shown}). An image folder holds images "
        f"({', '.join(ext for ext in COMMON_IMAGE_EXTENSIONS if ext in extensions)} or another extension datasets' "
        "imagefolder reads), optionally in train/ and test/ "
        "sub-folders and in one sub-folder per class."
    )


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
        check_image_folder(data_dir)
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
        columns = dict(rows.features)
        column = find_image_column(columns, image_column, f"the columns of {name}", "`--image_column`")
        labels = find_label_column(columns, label_column, f"the columns of {name}", "`--label_column`")
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
