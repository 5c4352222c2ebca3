"""torch.compile of the networks: the regional compilation of the repeated blocks (diffusers'
``compile_repeated_blocks``) traces every block in one graph (``fullgraph=True``: no graph break), the encoder's
forward-mode pass included, and gives the eager results. The ``aot_eager`` backend traces forward and backward as
inductor would but runs the traced graphs eagerly, which keeps the test free of C++ compilation.

Slow (tracing takes a minute or more on 2 cores); run with ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch

from diffenc_diffusers import DiffEncEncoderModel, DiffEncObjective, VDMScheduler, VDMUNetModel


@pytest.mark.slow
def test_regionally_compiled_trainable_objective_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = VDMUNetModel(sample_size=8, hidden_channels=16, num_layers=2, norm_num_groups=4, dropout=0.0)
    encoder = DiffEncEncoderModel(sample_size=8, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
    encoder.config.dropout = 0.0
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in [*unet.parameters(), *encoder.parameters()]:
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    objective = DiffEncObjective(unet, VDMScheduler(encoder_type="trainable"), encoder)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=generator)
    draws = {
        "t": torch.tensor([0.2, 0.7], dtype=torch.float64),
        "noise": torch.randn(2, 3, 8, 8, generator=generator),
        "recon_noise": torch.randn(2, 3, 8, 8, generator=generator),
    }

    def step() -> list[torch.Tensor]:
        objective.zero_grad(set_to_none=True)
        output = objective(images, **draws)
        output.loss.backward()
        return [output.bpd.detach(), *(param.grad.clone() for param in objective.parameters())]

    eager = step()
    unet.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    encoder.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    compiled = step()
    for actual, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
