"""GPU pitfalls that a CPU run can see: a training step and a denoiser call make no tensor from host data (on a GPU,
each is a host-to-device copy that waits for the queued work) and read no tensor value on the host (``.item()``,
``float(tensor)``, a Python branch on a tensor: a host sync). A dispatch-mode spy records the ATen operations that
do either: ``lift_fresh`` (``torch.tensor(data)``) and ``_local_scalar_dense`` (a tensor's value read on the host).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffenc_diffusers import DiffEncEncoderModel, DiffEncObjective, VDMScheduler, VDMUNetModel

HOST_OPERATIONS = {
    torch.ops.aten.lift_fresh.default: "tensor from host data",
    torch.ops.aten.lift_fresh_copy.default: "tensor from host data",
    torch.ops.aten._local_scalar_dense.default: "value read on the host",
}


class HostOperationSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_OPERATIONS:
            self.seen.append(HOST_OPERATIONS[func])
        return func(*args, **(kwargs or {}))


def networks(encoder_type: str) -> DiffEncObjective:
    torch.manual_seed(0)
    unet = VDMUNetModel(sample_size=8, hidden_channels=16, num_layers=1, norm_num_groups=4)
    encoder = (
        DiffEncEncoderModel(sample_size=8, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
        if encoder_type == "trainable"
        else None
    )
    return DiffEncObjective(unet, VDMScheduler(encoder_type=encoder_type), encoder)


@pytest.mark.parametrize("encoder_type", ["none", "nontrainable", "trainable"])
@pytest.mark.parametrize("autocast", [False, True])
def test_training_step_has_no_host_copy_or_sync(encoder_type, autocast):
    objective = networks(encoder_type)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    spy = HostOperationSpy()
    with spy, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        objective(images).loss.backward()
    assert spy.seen == []


def test_denoiser_call_has_no_host_copy_or_sync():
    unet = networks("none").unet
    sample, gamma = torch.randn(2, 3, 8, 8), torch.full((2,), -3.0)
    spy = HostOperationSpy()
    with spy, torch.no_grad():
        unet(sample, gamma)
    assert spy.seen == []


def test_the_spy_sees_a_host_made_tensor_and_a_host_read():
    spy = HostOperationSpy()
    with spy:
        value = torch.tensor([1.0, 2.0]).sum().item()
    assert value == 3.0 and spy.seen == ["tensor from host data", "value read on the host"]
