"""How close a training step comes to the chip: FLOPs of a step, and the bf16 matrix-product rate it is compared to.

Used by the trainer's TensorBoard logs (``train/tflops``, ``train/fraction_of_bf16_peak`` on CUDA) and by
``benchmarks/gpu_explore.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(function: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``function`` (``torch.utils.flop_counter``: matrix products and
    convolutions, forward and backward, a forward-mode tangent included), counted on whatever device it runs on."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def bf16_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """The measured rate, in TFLOP/s, of ``size``^3 bf16 matrix products of random data on ``device`` (the mean of
    ``repeats`` after 3 warm-ups): the ceiling that bf16 training on this device can approach."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def objective_flops_per_image(objective: torch.nn.Module, image_shape: tuple[int, ...], device: torch.device) -> float:
    """FLOPs of one training step's forward and backward pass per image of `DiffEncObjective` ``objective`` (counted on
    a batch of 2 random uint8 images of ``image_shape`` on ``device``; the count is linear in the batch). The
    gradients it leaves are cleared. Count before compiling or checkpointing (the count would include recomputation).
    """
    batch_size = 2
    images = torch.randint(0, 256, (batch_size, *image_shape), dtype=torch.uint8, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device) if objective.is_class_conditional else None
    flops = count_flops(lambda: objective(images, class_labels=labels).loss.backward())
    objective.zero_grad(set_to_none=True)
    return flops / batch_size
