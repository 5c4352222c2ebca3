"""Seeded randomness of training: the image order and every draw of an update step.

Everything random in update step n is a fixed function of (seed, n, micro-step), so a resumed run continues
exactly as the uninterrupted one would, and the same global batch on 1 or N processes sees the same data and
noise:

- the image order is an endless stream of permutations, epoch e's drawn from a generator seeded by (seed, e),
  read from a position (images consumed) that a checkpoint stores (:class:`StreamBatchSampler`);
- t, eps, eps_0, flips and class-label dropout are drawn for the whole global micro-batch and each process
  takes its slice (:func:`step_randomness`);
- dropout masks come from the global torch generator reseeded per (seed, step, micro-step, process)
  (:func:`dropout_seed`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

# Salts that keep the random streams of one step apart.
_SALT_BATCH, _SALT_DROPOUT, _SALT_DATA_ORDER = 1, 2, 3


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed function of the integer ``keys`` (numpy's SeedSequence hashing)."""
    words = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def dropout_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """The seed of the global torch generator (dropout masks) for one micro-step of one process."""
    return derive_seed(seed, step, micro_step, rank, _SALT_DROPOUT)


def step_randomness(
    seed: int, step: int, micro_step: int, global_batch: int, shape: tuple[int, ...], rank: int, per_rank: int
) -> dict[str, torch.Tensor]:
    """t, eps, eps_0, flips and label-dropout uniforms for this process' slice of one global micro-batch.

    They are drawn for the whole global batch of ``global_batch`` images from a generator seeded by
    (seed, step, micro_step), and process ``rank`` takes images ``[rank * per_rank, (rank + 1) * per_rank)``,
    so the values an image gets do not depend on how many processes share the batch. t is low-discrepancy over
    the global batch: t_i = (u + i / global_batch) mod 1 (float64).

    Returns:
        dict with ``t`` (per_rank,) float64, ``noise`` and ``recon_noise`` (per_rank, *shape) float32, ``flip``
        (per_rank,) bool and ``label_uniform`` (per_rank,) float32 in [0, 1) (an image's label is dropped to the
        null class when its uniform is below the dropout probability). Each is drawn after the ones before it,
        so adding a draw at the end leaves the earlier ones, and runs made before it, unchanged.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, step, micro_step, _SALT_BATCH))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    t = torch.remainder(u + torch.arange(global_batch, dtype=torch.float64) / global_batch, 1.0)
    noise = torch.randn((global_batch, *shape), generator=generator)
    recon_noise = torch.randn((global_batch, *shape), generator=generator)
    flip = torch.rand(global_batch, generator=generator) < 0.5
    label_uniform = torch.rand(global_batch, generator=generator)
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    draws = {"t": t, "noise": noise, "recon_noise": recon_noise, "flip": flip, "label_uniform": label_uniform}
    return {name: value[part] for name, value in draws.items()}


class StreamBatchSampler(Sampler[list[int]]):
    """This process' index batches from an endless, seeded stream of epochs.

    The stream is the concatenation of permutations of ``range(num_images)``, epoch e's drawn from a generator
    seeded by (seed, e). Global micro-batch j holds stream positions ``[start + j * global_batch, ... +
    global_batch)``; process ``rank`` reads its ``per_rank`` consecutive positions of it. ``start`` (images
    consumed so far) is all a resumed run needs to continue the same order.
    """

    def __init__(self, num_images: int, per_rank: int, num_processes: int, rank: int, seed: int, start: int):
        self.num_images = num_images
        self.per_rank = per_rank
        self.global_batch = per_rank * num_processes
        self.rank = rank
        self.seed = seed
        self.start = start
        self._epoch = -1
        self._order: list[int] = []

    def position(self, index: int) -> int:
        """The image index at stream position ``index``."""
        epoch, offset = divmod(index, self.num_images)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _SALT_DATA_ORDER))
            self._order = torch.randperm(self.num_images, generator=generator).tolist()
            self._epoch = epoch
        return self._order[offset]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            first = position + self.rank * self.per_rank
            yield [self.position(index) for index in range(first, first + self.per_rank)]
            position += self.global_batch
