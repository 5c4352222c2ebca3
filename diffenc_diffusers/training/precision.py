"""Which low precision is fast where: the one probe for native bf16 on the CPU."""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX). Without them it emulates bf16, and
    a bf16 training step is many times slower than float32 (14-17x measured on an AVX2-only CPU)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
