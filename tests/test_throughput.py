"""diffenc_diffusers.training.throughput: the FLOPs per image of a training step (what the trainer's
train/tflops_per_gpu log divides by the step time) and the bf16 matrix-product rate it is compared with."""

from __future__ import annotations

import torch

from diffenc_diffusers import DiffEncEncoderModel, DiffEncObjective, VDMScheduler, VDMUNetModel
from diffenc_diffusers.training.throughput import bf16_matmul_tflops, count_flops, objective_flops_per_image

UNET = {"sample_size": 8, "in_channels": 1, "hidden_channels": 16, "num_layers": 1, "norm_num_groups": 4}
ENCODER = {
    "sample_size": 8,
    "in_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def test_count_flops_of_a_matrix_product():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7


def test_flops_per_image_of_each_kind_and_gradients_cleared():
    per_image = {}
    for kind in ("none", "trainable"):
        torch.manual_seed(0)
        encoder = DiffEncEncoderModel(**ENCODER) if kind == "trainable" else None
        objective = DiffEncObjective(VDMUNetModel(**UNET), VDMScheduler(encoder_type=kind), encoder)
        per_image[kind] = objective_flops_per_image(objective, (1, 8, 8), torch.device("cpu"))
        assert all(param.grad is None for param in objective.parameters())
    # The denoiser's forward and backward: about 3 forward passes (the backward computes the gradients of the
    # weights and of the inputs, except the input gradient of the first convolution).
    unet = VDMUNetModel(**UNET)
    forward = count_flops(lambda: unet(torch.randn(1, 1, 8, 8), torch.zeros(1)))
    assert 2.5 * forward <= per_image["none"] <= 3 * forward
    # The trainable kind adds the encoder's three evaluations, its tangent and their backward.
    assert per_image["trainable"] > per_image["none"]


def test_bf16_matmul_rate_is_measured():
    assert bf16_matmul_tflops(torch.device("cpu"), size=64, repeats=2) > 0
