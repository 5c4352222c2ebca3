"""8-bit data loading: the built-in digits, image folders, and the refusal of anything that is not 8-bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffenc_diffusers.data import (
    DIGITS_NUM_TEST,
    UInt8ImageDataset,
    find_image_column,
    holdout_indices,
    image_to_uint8,
    load_digits_uint8,
    load_image_splits,
)


def rows_as_bytes(images: torch.Tensor) -> list[bytes]:
    return sorted(image.numpy().tobytes() for image in images)


def test_digits_are_exact_uint8_with_a_fixed_disjoint_split():
    from sklearn.datasets import load_digits

    train, test, everything = load_digits_uint8("train"), load_digits_uint8("test"), load_digits_uint8("all")
    assert train.dtype == test.dtype == torch.uint8
    assert train.shape == (1797 - DIGITS_NUM_TEST, 1, 8, 8) and test.shape == (DIGITS_NUM_TEST, 1, 8, 8)
    expected = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    assert np.array_equal(everything[:, 0].numpy(), expected)
    assert {0, 128, 255} <= set(everything.unique().tolist())
    # train and test partition the 1797 images (as a multiset of rows) ...
    assert rows_as_bytes(torch.cat([train, test])) == rows_as_bytes(everything)
    # ... and the split does not change between calls.
    assert torch.equal(load_digits_uint8("test"), test)
    with pytest.raises(ValueError, match="split"):
        load_digits_uint8("validation")


def test_holdout_indices_partition_and_are_fixed():
    train, test = holdout_indices(20, 3)
    assert len(test) == 3 and sorted(train + test) == list(range(20))
    assert holdout_indices(20, 3) == (train, test)
    with pytest.raises(ValueError):
        holdout_indices(5, 5)


def write_folder(root: Path, arrays: list[np.ndarray], mode: str | None = None) -> None:
    folder = root / "train" / "class0"
    folder.mkdir(parents=True)
    for index, array in enumerate(arrays):
        Image.fromarray(array, mode=mode).save(folder / f"{index:03d}.png")


def test_image_folder_without_test_split_holds_out_exact_images(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(20)]
    write_folder(tmp_path, arrays)
    train, test, description = load_image_splits(data_dir=str(tmp_path), shape=(1, 8, 8), holdout_fraction=0.1)
    assert len(train) == 18 and len(test) == 2 and "held out" in description
    loaded = torch.cat([train.to_tensor(), test.to_tensor()])
    assert loaded.dtype == torch.uint8 and loaded.shape == (20, 1, 8, 8)
    assert rows_as_bytes(loaded) == rows_as_bytes(torch.from_numpy(np.stack(arrays))[:, None])


def test_image_folder_with_test_split_and_rgb(tmp_path):
    rng = np.random.default_rng(1)
    for split, count in (("train", 3), ("test", 2)):
        folder = tmp_path / split / "a"
        folder.mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    train, test, description = load_image_splits(data_dir=str(tmp_path), shape=(3, 4, 4))
    assert (len(train), len(test)) == (3, 2) and "split 'test'" in description
    assert test[0].shape == (3, 4, 4) and test[0].dtype == torch.uint8


@pytest.mark.parametrize(
    ("arrays", "mode", "shape", "message"),
    [
        ([np.zeros((8, 8, 4), np.uint8)] * 3, "RGBA", (3, 8, 8), "mode 'RGBA'"),
        ([np.full((8, 8), 1000, np.uint16)] * 3, None, (1, 8, 8), "only 8-bit"),
        ([np.zeros((8, 8), np.uint8)] * 3, None, (1, 16, 16), "never resized"),
        ([np.zeros((8, 8, 3), np.uint8)] * 3, None, (1, 8, 8), "never converted between grayscale and RGB"),
    ],
)
def test_image_folder_refuses_what_is_not_the_models_8_bit_images(tmp_path, arrays, mode, shape, message):
    write_folder(tmp_path, arrays, mode)
    with pytest.raises(ValueError, match=message):
        load_image_splits(data_dir=str(tmp_path), shape=shape)


def test_image_to_uint8_accepts_arrays_and_refuses_other_dtypes():
    array = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert torch.equal(image_to_uint8(array, "x"), torch.from_numpy(array).permute(2, 0, 1))
    assert image_to_uint8(np.zeros((2, 2), np.uint8), "x").shape == (1, 2, 2)
    with pytest.raises(ValueError, match="float32"):
        image_to_uint8(np.zeros((2, 2), np.float32), "Image 3")
    with pytest.raises(ValueError, match="only uint8"):
        image_to_uint8(torch.zeros(1, 2, 2), "Image 3")


def test_dataset_checks_every_image_it_reads():
    images = [np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((6, 6), np.uint8)]
    dataset = UInt8ImageDataset(images, shape=(1, 8, 8), name="my data")
    dataset.check_first(2)
    with pytest.raises(ValueError, match="Image 2 of my data is 6x6"):
        dataset[2]


def test_find_image_column():
    from datasets import Image as ImageFeature
    from datasets import Value

    assert find_image_column({"img": ImageFeature(), "label": Value("int64")}, None, "d") == "img"
    with pytest.raises(ValueError, match=r"no column of type datasets\.Image"):
        find_image_column({"label": Value("int64")}, None, "d")
    with pytest.raises(ValueError, match="several image columns"):
        find_image_column({"a": ImageFeature(), "b": ImageFeature()}, None, "d")
    with pytest.raises(ValueError, match="is not a column"):
        find_image_column({"a": ImageFeature()}, "b", "d")
