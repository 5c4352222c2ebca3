"""Shared fixtures: tiny denoiser / encoder networks and 8-bit test images."""

import pytest
import torch

from diffenc_diffusers import DiffEncEncoderModel, VDMUNetModel

TINY_UNET = {"sample_size": 8, "in_channels": 1, "hidden_channels": 16, "num_layers": 1, "norm_num_groups": 4}
TINY_ENCODER = {
    "sample_size": 8,
    "in_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def pytest_configure(config: pytest.Config) -> None:
    # The test networks are tiny: one intra-op thread is fastest, and stays fast when other jobs share the cores.
    torch.set_num_threads(1)


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter, so that zero-initialised output layers give non-trivial outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def make_unet(dtype: torch.dtype = torch.float32, perturb: bool = True, dropout: float = 0.0, **overrides):
    torch.manual_seed(0)
    unet = VDMUNetModel(**{**TINY_UNET, "dropout": dropout, **overrides}).to(dtype)
    return perturb_(unet, seed=1) if perturb else unet


def make_encoder(dtype: torch.dtype = torch.float32, perturb: bool = True, dropout: float = 0.0, **overrides):
    torch.manual_seed(0)
    encoder = DiffEncEncoderModel(**{**TINY_ENCODER, "dropout": dropout, **overrides}).to(dtype)
    return perturb_(encoder, seed=2) if perturb else encoder


@pytest.fixture
def images() -> torch.Tensor:
    """Four random 8-bit 1x8x8 images."""
    return torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
