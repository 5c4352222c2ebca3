"""The forward processes (diffenc_diffusers.forward_processes): the registry, the x_hat correction shared by the
sampler and the discrete ELBO, and the probability-flow ODE's data prediction."""

import math

import pytest
import torch

from diffenc_diffusers import VDMScheduler
from diffenc_diffusers.forward_processes import (
    ENCODER_TYPES,
    FORWARD_PROCESSES,
    NonTrainableDiffEncForwardProcess,
    TrainableDiffEncForwardProcess,
    VDMForwardProcess,
    forward_process,
)
from diffenc_diffusers.noise_schedule import alpha_sigma


def test_registry_maps_each_encoder_type_to_its_class():
    assert ENCODER_TYPES == ("none", "nontrainable", "trainable")
    expected = {
        "none": VDMForwardProcess,
        "nontrainable": NonTrainableDiffEncForwardProcess,
        "trainable": TrainableDiffEncForwardProcess,
    }
    assert expected == FORWARD_PROCESSES
    for name, cls in FORWARD_PROCESSES.items():
        process = forward_process(name)
        assert type(process) is cls and process.encoder_type == name
        assert VDMScheduler(encoder_type=name).forward_process.encoder_type == name
    assert [forward_process(name).needs_encoder for name in ENCODER_TYPES] == [False, False, True]
    assert [forward_process(name).has_encoding for name in ENCODER_TYPES] == [False, True, True]
    with pytest.raises(ValueError, match=r"`encoder_type` must be one of \['none', 'nontrainable', 'trainable'\]"):
        forward_process("learned")
    with pytest.raises(ValueError, match="`encoder_type` must be one of"):
        VDMScheduler(encoder_type="learned")


def test_trainable_encode_needs_the_encoder():
    with pytest.raises(ValueError, match="needs its `encoder`"):
        forward_process("trainable").encode(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_x_hat_shift_is_delta_sigma_squared_for_diffenc_and_none_for_vdm(encoder_type):
    gamma_t = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64)
    delta = torch.tensor([-0.1, -0.2, -1.5], dtype=torch.float64)
    shift = forward_process(encoder_type).x_hat_shift(gamma_t, delta)
    if encoder_type == "none":
        assert shift is None
    else:
        values = [d / (1 + math.exp(-g)) for g, d in zip(gamma_t.tolist(), delta.tolist(), strict=True)]
        torch.testing.assert_close(shift, torch.tensor(values, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_deterministic_step_has_the_ode_of_the_data_prediction_as_its_limit(encoder_type):
    """The eta = 0 step from t to t - h moves z by dz/dlambda (lambda_s - lambda_t) + O(h^2), with DESIGN.md's
    dz/dlambda = -alpha^2 z + alpha x_tilde and x_tilde = `data_prediction(x_hat)` ((1 + 2 sigma^2) x_hat for
    DiffEnc): the first-order error shrinks by ~10 for a step 10 times shorter (float64)."""
    scheduler = VDMScheduler(encoder_type=encoder_type)
    generator = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=generator)
    v = 0.3 * torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=generator)
    t = 0.6
    gamma_t = scheduler.gamma(torch.tensor(t, dtype=torch.float64))
    alpha_t, _ = alpha_sigma(gamma_t)
    x_hat = scheduler.predict_original_sample(v, z_t, gamma_t)
    derivative = -(alpha_t**2) * z_t + alpha_t * scheduler.data_prediction(x_hat, gamma_t)
    errors = []
    for steps in (100, 1000):
        # A grid whose step at t is h = 1 / steps; a constant v is the network output at z_t.
        scheduler.set_timesteps(steps)
        index = round((1 - t) * steps)
        scheduler._step_index = index
        z_s = scheduler.step(v, scheduler.timesteps[index], z_t, eta=0.0).prev_sample
        gamma_s = scheduler.gamma(torch.tensor(t - 1 / steps, dtype=torch.float64))
        lambda_step = -(gamma_s - gamma_t) / 2
        errors.append(float((z_s - z_t - derivative * lambda_step).abs().max() / lambda_step))
    assert errors[1] < errors[0] / 8
    if encoder_type != "none":
        # The data prediction is not x_hat itself: with x_tilde = x_hat the limit is wrong by O(1).
        wrong = -(alpha_t**2) * z_t + alpha_t * x_hat
        assert float((derivative - wrong).abs().max()) > 100 * errors[1]
