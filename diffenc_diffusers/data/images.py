"""8-bit images as exact uint8 tensors (C, H, W) with values 0..255, checked against the model's shape.

The objective's discrete decoder defines a likelihood only for 8-bit data, so nothing here is resized, converted
between colour modes or cast: images that are not 8-bit grayscale ("L") or 8-bit RGB ("RGB"), or whose size or
channel count differ from what the model takes, raise an error that names the image and what is accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .labels import check_labels

PIL_MODE_CHANNELS = {"L": 1, "RGB": 3}
"""The PIL modes accepted as 8-bit images, with their channel counts."""

NUM_CHECKED_AT_START = 64
"""How many images :meth:`UInt8ImageDataset.check_first` decodes and checks before training starts."""


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
        """All class labels: int64 (N,). ``ValueError`` if the data has none; :func:`check_labels`' errors for labels
        that are not integers, one per image."""
        if self.labels is None:
            raise ValueError(f"{self.name} has no class labels.")
        labels = list(self.rows[self.labels]) if isinstance(self.labels, str) else self.labels
        return check_labels(labels, None, f"the labels of {self.name}", count=len(self))

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


def check_uint8_batch(batch: Any, shape: Sequence[int], where: str) -> torch.Tensor:
    """``batch`` itself if it is a uint8 tensor (N, C, H, W) with (C, H, W) = ``shape``; else an error naming it."""
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{where} must be a uint8 torch.Tensor of shape (N, C, H, W), got {type(batch).__name__}.")
    if batch.dtype != torch.uint8:
        raise TypeError(
            f"{where} must have dtype torch.uint8 (8-bit values 0..255), got {batch.dtype}. (For torchvision "
            "datasets use transforms.PILToTensor(), not ToTensor(), which rescales to floats.)"
        )
    if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{where} has shape {tuple(batch.shape)}; this model takes uint8 images of shape (N, {shape[0]}, "
            f"{shape[1]}, {shape[2]}) (the denoiser's in_channels and sample_size); images are never resized."
        )
    return batch
