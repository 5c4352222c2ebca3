"""Class labels: the one check of the package's data layer (pipeline inputs, training and evaluation data).

A class-conditional model with ``num_class_embeds=K`` takes the labels 0 .. K - 1, and K (the null class of
classifier-free guidance) when it has ``null_class=True``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def check_labels(
    labels: Any,
    num_classes: int | None,
    where: str,
    count: int | None = None,
    null_class: bool = False,
) -> torch.Tensor:
    """The labels as an int64 tensor of shape (N,), or an error naming them (``where``), the value and what is
    accepted.

    Args:
        labels: an integer torch.Tensor (N,), an integer numpy array (N,), or a list/tuple of ints. Nothing is cast
            from another type: floats, bools and strings are refused.
        num_classes: K, the model's ``num_class_embeds``; ``None`` to check only the type and shape.
        where: how the labels are named in messages, e.g. "`class_labels`" or "the labels of batch 3 of the
            DataLoader".
        count: the number of images the labels go with (N); ``None`` for any.
        null_class: the model has the null class, so K is a valid label too.

    Raises:
        TypeError: not integer labels.
        ValueError: the wrong shape, or a label outside 0 .. K - 1 (0 .. K with a null class).
    """
    shape = f"({count},)" if count is not None else "(N,)"
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu":
        labels = torch.from_numpy(labels)
    elif isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
        if not all(isinstance(label, numbers.Integral) and not isinstance(label, bool) for label in labels):
            raise TypeError(
                f"{where} must be integer class labels, one per image (a torch.Tensor of shape {shape} or a list of "
                f"ints); got {_shown(labels)}."
            )
        labels = torch.tensor(list(labels), dtype=torch.int64)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"{where} must be an integer torch.Tensor of shape {shape} or a list of ints, one label per image; got "
            f"{type(labels).__name__} {_shown(labels)}."
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{where} must be integer class labels, got a tensor of dtype {labels.dtype}.")
    if labels.ndim != 1 or (count is not None and labels.shape[0] != count):
        raise ValueError(f"{where} must be a tensor of shape {shape}, one label per image; got {tuple(labels.shape)}.")
    if num_classes is not None:
        limit = num_classes + int(null_class)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= limit):
            null = f", or {num_classes} (the null class)" if null_class else ""
            raise ValueError(
                f"{where} must hold labels 0 .. {num_classes - 1}{null} (the model's num_class_embeds={num_classes}); "
                f"got values in [{int(labels.min())}, {int(labels.max())}]."
            )
    return labels.long()
