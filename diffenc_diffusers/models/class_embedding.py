"""ClassEmbedding: the class-label conditioning shared by the denoiser and the encoder (diffusers' `class_labels`).

A learned vector per class is added to the gamma embedding, as in diffusers' UNet2DModel (`num_class_embeds`);
an optional extra "null" class stands for "no label", the unconditional model of classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import check_bool, check_int


def check_class_config(num_class_embeds: object, null_class: object) -> None:
    """``ValueError``/``TypeError`` unless `num_class_embeds` is None or an int >= 1 and `null_class` a bool that is
    True only with classes."""
    if num_class_embeds is not None:
        check_int("num_class_embeds", num_class_embeds, 1)
    check_bool("null_class", null_class)
    if null_class and num_class_embeds is None:
        raise ValueError("`null_class=True` needs `num_class_embeds` (the number of classes); got None.")


class ClassEmbedding(nn.Module):
    r"""
    One learned vector per class label, zero-initialised (a fresh conditional model computes what the
    unconditional model with the same other weights computes).

    Args:
        num_classes (`int`): Number of classes K; labels are 0 .. K - 1.
        embedding_dim (`int`): Width of the vectors (the width of the gamma embedding they are added to).
        null_class (`bool`): Add the null class, label K, for classifier-free guidance.
    """

    def __init__(self, num_classes: int, embedding_dim: int, null_class: bool):
        super().__init__()
        self.num_classes = num_classes
        self.null_class = null_class
        self.embedding = nn.Embedding(num_classes + int(null_class), embedding_dim)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, class_labels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """
        Args:
            class_labels (`torch.Tensor` of shape `(batch_size,)` or `()`): Integer labels in 0 .. K - 1, or K
                (the null class) when the model has one. A 0-d tensor is shared by the batch.
            batch_size (`int`): The batch size of the sample.

        Returns:
            `torch.Tensor` of shape `(batch_size, embedding_dim)` in the dtype of the embedding.
        """
        labels = check_class_labels(class_labels, batch_size, self.num_classes, self.null_class)
        return self.embedding(labels.to(self.embedding.weight.device))


def check_class_labels(class_labels: object, batch_size: int, num_classes: int, null_class: bool) -> torch.Tensor:
    """The labels as an int64 tensor of shape (batch_size,), or a ``TypeError``/``ValueError`` that names them."""
    if not isinstance(class_labels, torch.Tensor) or class_labels.dtype.is_floating_point or class_labels.is_complex():
        raise TypeError(
            "`class_labels` must be an integer torch.Tensor of shape (batch_size,), got "
            f"{class_labels.dtype if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__}."
        )
    if class_labels.dtype == torch.bool:
        raise TypeError("`class_labels` must be an integer torch.Tensor, got a bool tensor.")
    if class_labels.ndim == 0:
        class_labels = class_labels.expand(batch_size)
    if class_labels.shape != (batch_size,):
        raise ValueError(f"`class_labels` must have shape ({batch_size},), got {tuple(class_labels.shape)}.")
    num_labels = num_classes + int(null_class)
    if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= num_labels):
        accepted = f"0 .. {num_classes - 1}" + (f", or {num_classes} (the null class)" if null_class else "")
        raise ValueError(
            f"`class_labels` must hold labels {accepted}; got values in "
            f"[{int(class_labels.min())}, {int(class_labels.max())}]."
        )
    return class_labels.long()


def add_class_embedding(
    class_embedding: ClassEmbedding | None, temb: torch.Tensor, class_labels: torch.Tensor | None
) -> torch.Tensor:
    """The gamma embedding ``temb`` (B, D) plus the class embedding of `class_labels` for a conditional model;
    ``temb`` itself for an unconditional one. Labels must be given exactly when the model is conditional."""
    if class_embedding is None:
        if class_labels is not None:
            raise ValueError("`class_labels` were given, but this model is unconditional (`num_class_embeds=None`).")
        return temb
    if class_labels is None:
        raise ValueError(
            f"This model is class-conditional (`num_class_embeds={class_embedding.num_classes}`): pass `class_labels`"
            + (f" (label {class_embedding.num_classes} is the null class)." if class_embedding.null_class else ".")
        )
    return temb + class_embedding(class_labels, temb.shape[0]).to(temb.dtype)
