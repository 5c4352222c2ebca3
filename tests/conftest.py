"""Shared fixtures: tiny denoiser / encoder networks and 8-bit test images."""

import json
from pathlib import Path

import pytest
import torch

from diffenc_diffusers import DiffEncEncoderModel, DiffEncPipeline, VDMScheduler, VDMUNetModel

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


def write_tiny_preset(folder: Path, **training: object) -> Path:
    """A tiny trainable-DiffEnc preset with a learned schedule: configs only (no weights) + training_config.json.

    ``training`` overrides its settings; the value "omit" leaves a key out."""
    unet = VDMUNetModel(sample_size=8, in_channels=1, hidden_channels=16, num_layers=1, norm_num_groups=8)
    encoder = DiffEncEncoderModel(
        sample_size=8, in_channels=1, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8
    )
    scheduler = VDMScheduler(encoder_type="trainable", schedule="learned_linear")
    DiffEncPipeline(unet=unet, scheduler=scheduler, encoder=encoder).save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    config = {
        "dataset": "digits",
        "resolution": 8,
        "train_batch_size": 16,
        "learning_rate": 2e-3,
        "lr_warmup_steps": 2,
        "max_train_steps": 6,
        "ema_decay": 0.9,
        "num_timesteps": None,
        "max_grad_norm": 1.0,
        "mixed_precision": "no",
        "gradient_accumulation_steps": 1,
        "checkpointing_steps": 2,
        "eval_batch_size": 32,
        "random_flip": True,
    }
    config.update(training)
    (folder / "training_config.json").write_text(json.dumps({k: v for k, v in config.items() if v != "omit"}))
    return folder


def write_conditional_preset(folder: Path, num_classes: int = 10, **training: object) -> Path:
    """The tiny preset of test_training with 10-class denoiser and encoder (null class), label dropout 0.2."""
    write_tiny_preset(folder, class_dropout_prob=0.2, **training)
    for component in ("unet", "encoder"):
        path = folder / component / "config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "num_class_embeds": num_classes, "null_class": True}))
    return folder


@pytest.fixture
def fresh_accelerator_state():
    """An Accelerator's settings are process-wide: start a test that builds one in-process from none, and leave
    none behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
