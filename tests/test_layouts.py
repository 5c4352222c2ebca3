"""Every network path accepts any input layout, and hands CUDA's layout-strict kernels the layout they require.

CUDA's group-norm kernels (``native_group_norm`` and its backward) accept only the plain contiguous layout
(``X.is_contiguous()``; ATen checks ``memory_format = Contiguous`` on every device but the CPU), while the CPU kernels
also take channels_last, so a layout bug passes every CPU test and crashes on a GPU (issue 16: a channels_last
activation reached ``native_group_norm`` through the encoder in the final evaluation). Here a dispatch-mode spy checks
CUDA's rule on every call of those kernels while the networks run on CPU inputs of every layout: non-contiguous
slices, channels_last, permutations, the halves of a ``cat``/``split``, broadcast (stride-0) batches, channels_last
weights; in train and eval mode, under no_grad, in forward-mode AD (both tangent modes of the encoder) and reverse
mode through the tangent, under bf16 autocast, and class-conditional. Each result must equal the one of contiguous
inputs: in float64 up to summation order (1e-10 of the norm), in bf16 up to a few bf16 roundings (3e-2).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import TorchDispatchMode

from diffenc_diffusers import DiffEncEncoderModel, DiffEncObjective, VDMScheduler, VDMUNetModel

aten = torch.ops.aten

LAYOUT_STRICT_KERNELS = {
    aten.native_group_norm.default: ("input",),
    aten.native_group_norm_backward.default: ("grad_out", "input"),
}
"""Kernels whose CUDA implementation refuses a tensor that is not plain contiguous, and those tensors' arguments."""


class CudaLayoutSpy(TorchDispatchMode):
    """Records every call of a `LAYOUT_STRICT_KERNELS` kernel and each argument that breaks CUDA's layout rule."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LAYOUT_STRICT_KERNELS:
            name = func.__name__
            self.calls[name] = self.calls.get(name, 0) + 1
            schema_names = [argument.name for argument in func._schema.arguments]
            for argument in LAYOUT_STRICT_KERNELS[func]:
                index = schema_names.index(argument)
                tensor = args[index] if index < len(args) else kwargs[argument]
                if not tensor.is_contiguous():
                    self.violations.append(f"{name}({argument}): shape {tuple(tensor.shape)} stride {tensor.stride()}")
        return func(*args, **kwargs)


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as ``x`` (B, C, H, W) in non-contiguous layouts."""
    batch, channels, height, width = x.shape
    wide = torch.zeros(batch, channels, height, 2 * width, dtype=x.dtype)
    wide[..., ::2] = x
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    first_half, _ = torch.cat([channels_last, channels_last]).split(batch)
    _, second_half = torch.cat([x.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)], dim=3).split(channels, dim=3)
    return {
        "channels_last": channels_last,
        "slice": wide[..., ::2],
        "transposed": transposed,
        "cat_split_channels_last": first_half,
        "permuted_split": second_half.permute(0, 3, 1, 2),
    }


def assert_same(actual: torch.Tensor, expected: torch.Tensor, scale: float, what: str) -> None:
    """``actual == expected`` up to the rounding of a different summation order.

    A layout changes only the order in which the kernels sum (float64: about 1e-16 per operation, a few dozen
    operations deep; bf16 autocast: a few roundings of 2^-8 of the operands). The error is bounded relative to the
    tensor's norm, or to a tenth of ``scale`` (the largest norm among the compared outputs) for tensors that are
    mathematically zero (the gradient of a bias followed by a GroupNorm) and hold only rounding noise of the size of
    the terms that cancel in them.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    tolerance = 1e-10 if expected.dtype == torch.float64 else 3e-2
    error = (actual.double() - expected.double()).norm()
    bound = tolerance * max(expected.double().norm(), scale / 10)
    assert error <= bound, f"{what}: error {error:.3g} > {bound:.3g}"


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def tiny_unet(**overrides) -> VDMUNetModel:
    torch.manual_seed(0)
    config = {"sample_size": 8, "hidden_channels": 16, "num_layers": 1, "norm_num_groups": 4, "dropout": 0.0}
    return perturbed(VDMUNetModel(**{**config, **overrides}).double())


def tiny_encoder(**overrides) -> DiffEncEncoderModel:
    torch.manual_seed(0)
    config = {"sample_size": 8, "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
    return perturbed(DiffEncEncoderModel(**{**config, "dropout": 0.0, **overrides}).double())


def sample(batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1


def results_of(run: Callable[[torch.Tensor], list[torch.Tensor | None]], x: torch.Tensor) -> dict[str, list]:
    """``run`` on ``x`` contiguous and in every other layout, under the spy (which must see the kernels called and
    no violation)."""
    results = {}
    for name, variant in {"contiguous": x, **layouts(x)}.items():
        torch.testing.assert_close(variant, x, rtol=0, atol=0)
        spy = CudaLayoutSpy()
        with spy:
            results[name] = run(variant)
        assert spy.calls.get("native_group_norm.default", 0) > 0, name
        assert not spy.violations, f"{name}: {spy.violations[:3]}"
    return results


def check_all_layouts(run: Callable[[torch.Tensor], list[torch.Tensor | None]], x: torch.Tensor) -> None:
    results = results_of(run, x)
    reference = results.pop("contiguous")
    scale = max(float(tensor.double().norm()) for tensor in reference)
    for name, values in results.items():
        for index, (actual, expected) in enumerate(zip(values, reference, strict=True)):
            assert_same(actual, expected, scale, f"{name}, output {index}")


def gradients(model: torch.nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return [param.grad.clone() for param in model.parameters() if param.grad is not None] + [
        tensor.grad.clone() for tensor in inputs if tensor.grad is not None
    ]


@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
@pytest.mark.parametrize("class_conditional", [False, True])
def test_denoiser_any_layout(mode, class_conditional):
    unet = tiny_unet(num_class_embeds=3 if class_conditional else None)
    unet.train(mode == "train")
    gamma = torch.tensor([-3.0, 2.0], dtype=torch.float64)
    labels = torch.tensor([2, 5, 0, 7])[::2] if class_conditional else None  # a non-contiguous label tensor

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        if mode == "no_grad":
            with torch.no_grad():
                return [unet(x, gamma, class_labels=labels).sample]
        x = x.detach().requires_grad_()
        out = unet(x, gamma, class_labels=labels).sample
        out.square().sum().backward()
        return [out.detach(), *gradients(unet, x)]

    check_all_layouts(run, sample())


@pytest.mark.parametrize("tangent_mode", ["explicit", "autograd"])
@pytest.mark.parametrize("class_conditional", [False, True])
def test_encoder_forward_mode_and_reverse_through_the_tangent_any_layout(tangent_mode, class_conditional):
    encoder = tiny_encoder(num_class_embeds=3 if class_conditional else None)
    encoder.set_tangent_mode(tangent_mode)
    gamma = torch.tensor([-3.0, 2.0], dtype=torch.float64)
    labels = torch.tensor([1, 2]) if class_conditional else None

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        encoder.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_()
        with forward_ad.dual_level():
            dual = encoder(x, forward_ad.make_dual(gamma, torch.ones_like(gamma)), class_labels=labels).sample
            y, dy = forward_ad.unpack_dual(dual)
        (y.square().sum() + dy.square().sum()).backward()
        return [y.detach(), dy.detach(), *gradients(encoder, x)]

    check_all_layouts(run, sample())


@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_encoder_plain_forward_any_layout(mode):
    encoder = tiny_encoder()
    encoder.train(mode == "train")

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        encoder.zero_grad(set_to_none=True)
        if mode == "no_grad":
            with torch.no_grad():
                return [encoder(x, -1.0).sample]
        x = x.detach().requires_grad_()
        y = encoder(x, -1.0).sample
        y.square().sum().backward()
        return [y.detach(), *gradients(encoder, x)]

    check_all_layouts(run, sample())


def test_forward_and_tangent_any_layout_and_channels_last_weights():
    encoder = tiny_encoder()

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        y, dy = encoder.forward_and_tangent(x, torch.tensor([0.5, -4.0], dtype=torch.float64))
        return [y, dy]

    reference = run(sample())
    check_all_layouts(run, sample())
    encoder.to(memory_format=torch.channels_last)
    scale = max(float(tensor.norm()) for tensor in reference)
    for actual, expected in zip(results_of(run, sample())["channels_last"], reference, strict=True):
        assert_same(actual, expected, scale, "channels_last weights and input")


@pytest.mark.parametrize("encoder_type", ["none", "trainable"])
@pytest.mark.parametrize("dtype", ["fp64", "bf16"])
def test_objective_any_image_layout(encoder_type, dtype):
    """The path of the reported crash: the objective's three encoder evaluations (``torch.cat([x, x])`` among them),
    training step and evaluation, on image batches of every layout."""
    unet = tiny_unet()
    encoder = tiny_encoder() if encoder_type == "trainable" else None
    objective = DiffEncObjective(unet, VDMScheduler(encoder_type=encoder_type), encoder)
    if dtype == "bf16":
        objective.float()
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=generator)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    noise = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    recon_noise = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    if dtype == "bf16":
        noise, recon_noise = noise.float(), recon_noise.float()

    def run(batch: torch.Tensor) -> list[torch.Tensor]:
        objective.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            output = objective(batch, t=t, noise=noise, recon_noise=recon_noise)
        output.loss.backward()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            evaluation = objective.eval()(batch, t=t, noise=noise, recon_noise=recon_noise).bpd
        objective.train()
        return [output.bpd.detach(), evaluation, *gradients(objective)]

    check_all_layouts(run, images)


def test_the_spy_catches_a_channels_last_tensor_handed_to_group_norm():
    """The check is real: ``native_group_norm`` called directly on a channels_last tensor (what the encoder did before
    the fix) is reported, though the CPU kernel computes it."""
    x = sample().contiguous(memory_format=torch.channels_last)
    weight, bias = torch.ones(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype)
    spy = CudaLayoutSpy()
    with spy:
        torch.native_group_norm(x, weight, bias, 2, 3, 64, 1, 1e-6)
    assert spy.violations and "native_group_norm.default(input)" in spy.violations[0]
