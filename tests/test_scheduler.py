"""VDMScheduler: the DESIGN formulas, computed independently here, and diffusers' scheduler contract."""

import math

import pytest
import torch

from diffenc_diffusers import VDMScheduler
from diffenc_diffusers.discretization import grid_values
from diffenc_diffusers.scheduling_vdm import alpha_sigma

SHAPE = (3, 2, 4, 4)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def design_ancestral_mean(z_t, x_hat, gamma_t, gamma_s, diffenc):
    """mu_P of DESIGN.md, written out in float64 scalars."""
    alpha_t, alpha_s = math.sqrt(sigmoid(-gamma_t)), math.sqrt(sigmoid(-gamma_s))
    delta = gamma_s - gamma_t
    mean = (alpha_s / alpha_t) * math.exp(delta) * z_t - alpha_s * math.expm1(delta) * x_hat
    if diffenc:
        mean = mean - alpha_s * delta * sigmoid(gamma_t) * x_hat
    return mean


def run_one_step(scheduler, model_output, z_t, noise_seed=0, eta=1.0, num_steps=10, step_index=3):
    scheduler.set_timesteps(num_steps)
    for _ in range(step_index):  # advance with dummy steps; only the index matters
        scheduler.step(torch.zeros_like(z_t), scheduler.timesteps[scheduler.step_index], z_t, eta=0.0)
    t = scheduler.timesteps[step_index]
    generator = torch.Generator().manual_seed(noise_seed)
    return scheduler.step(model_output, t, z_t, generator=generator, eta=eta)


@pytest.mark.parametrize("encoder_type", ["none", "nontrainable", "trainable"])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_step_equals_design_formula(encoder_type, prediction_type):
    scheduler = VDMScheduler(encoder_type=encoder_type, prediction_type=prediction_type, variance_weight=0.7)
    z_t = torch.randn(SHAPE, dtype=torch.float64)
    model_output = torch.randn(SHAPE, dtype=torch.float64)
    out = run_one_step(scheduler, model_output, z_t, noise_seed=5)

    t, s = 1.0 - 3 / 10, 1.0 - 4 / 10
    gamma_t, gamma_s = -13.3 + 18.3 * t, -13.3 + 18.3 * s
    alpha_t, sigma_t = math.sqrt(sigmoid(-gamma_t)), math.sqrt(sigmoid(gamma_t))
    if prediction_type == "v_prediction":
        x_hat = alpha_t * z_t - sigma_t * model_output
    else:
        x_hat = (z_t - sigma_t * model_output) / alpha_t
    c = -math.expm1(gamma_s - gamma_t)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean = design_ancestral_mean(z_t, x_hat, gamma_t, gamma_s, encoder_type != "none")
    expected = mean + math.sqrt(sigmoid(gamma_s)) * math.sqrt(0.7 * c) * noise

    torch.testing.assert_close(out.pred_original_sample, x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-10, atol=1e-10)


def test_step_without_diffenc_term_is_vdm_ancestral_step():
    """google-research/vdm's eps-form step: sqrt(a_s^2 / a_t^2) (z_t - sigma_t c eps_hat) + sqrt((1 - a_s^2) c) eps."""
    scheduler = VDMScheduler(prediction_type="epsilon")
    z_t = torch.randn(SHAPE, dtype=torch.float64)
    eps_hat = torch.randn(SHAPE, dtype=torch.float64)
    out = run_one_step(scheduler, eps_hat, z_t, noise_seed=1, step_index=6)
    t, s = 1.0 - 6 / 10, 1.0 - 7 / 10
    gamma_t, gamma_s = -13.3 + 18.3 * t, -13.3 + 18.3 * s
    c = -math.expm1(gamma_s - gamma_t)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = math.sqrt(sigmoid(-gamma_s) / sigmoid(-gamma_t)) * (z_t - math.sqrt(sigmoid(gamma_t)) * c * eps_hat)
    expected = expected + math.sqrt((1 - sigmoid(-gamma_s)) * c) * noise
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-10, atol=1e-10)


def test_diffenc_term_changes_the_step():
    z_t, v = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    vdm = run_one_step(VDMScheduler(), v, z_t, eta=0.0).prev_sample
    diffenc = run_one_step(VDMScheduler(encoder_type="nontrainable"), v, z_t, eta=0.0).prev_sample
    assert (vdm - diffenc).abs().max() > 1e-4


@pytest.mark.parametrize("encoder_type", ["none", "trainable"])
def test_deterministic_step_is_ddim_on_log_snr_grid(encoder_type):
    """eta = 0: z_s = alpha_s x_hat_s + sigma_s eps_hat, no noise, and independent of the generator."""
    scheduler = VDMScheduler(encoder_type=encoder_type)
    z_t, v = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    out_a = run_one_step(scheduler, v, z_t, noise_seed=0, eta=0.0)
    out_b = run_one_step(scheduler, v, z_t, noise_seed=1, eta=0.0)
    torch.testing.assert_close(out_a.prev_sample, out_b.prev_sample, rtol=0, atol=0)
    t, s = 0.7, 0.6
    gamma_t, gamma_s = -13.3 + 18.3 * t, -13.3 + 18.3 * s
    alpha_t, sigma_t = math.sqrt(sigmoid(-gamma_t)), math.sqrt(sigmoid(gamma_t))
    x_hat = alpha_t * z_t - sigma_t * v
    eps_hat = (z_t - alpha_t * x_hat) / sigma_t
    x_hat_s = x_hat * (1 - (gamma_s - gamma_t) * sigma_t**2) if encoder_type != "none" else x_hat
    expected = math.sqrt(sigmoid(-gamma_s)) * x_hat_s + math.sqrt(sigmoid(gamma_s)) * eps_hat
    torch.testing.assert_close(out_a.prev_sample, expected, rtol=1e-10, atol=1e-10)


def test_last_step_returns_z_0_and_decode_gives_the_decoder_mode():
    """One step from t = 1 to 0: z_0 by the DESIGN formula (the step does not decode); `decode` then gives the grid
    point nearest to z_0 / alpha_0."""
    scheduler = VDMScheduler()
    scheduler.set_timesteps(1)
    z_1 = torch.randn(SHAPE, dtype=torch.float64)
    v = 0.1 * torch.randn(SHAPE, dtype=torch.float64)
    last = scheduler.step(v, 1.0, z_1, generator=torch.Generator().manual_seed(0)).prev_sample
    final = scheduler.decode(last)

    gamma_t, gamma_s = 5.0, -13.3
    x_hat = math.sqrt(sigmoid(-gamma_t)) * z_1 - math.sqrt(sigmoid(gamma_t)) * v
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = -math.expm1(gamma_s - gamma_t)
    z_0 = design_ancestral_mean(z_1, x_hat, gamma_t, gamma_s, False) + math.sqrt(sigmoid(gamma_s) * c) * noise
    grid = grid_values(dtype=torch.float64)
    nearest = grid[(z_0.unsqueeze(-1) / math.sqrt(sigmoid(-gamma_s)) - grid).abs().argmin(-1)]
    torch.testing.assert_close(last, z_0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, nearest, rtol=0, atol=0)


def test_set_timesteps_grid_and_index_tracking():
    scheduler = VDMScheduler()
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.dtype == torch.float32
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([1.0, 0.75, 0.5, 0.25]))
    torch.testing.assert_close(scheduler.time_grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert len(scheduler) == 4 and scheduler.step_index == 0
    z = torch.randn(SHAPE)
    for i, t in enumerate(scheduler.timesteps):
        assert scheduler.step_index == i
        z = scheduler.step(torch.zeros_like(z), t, z).prev_sample
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros_like(z), 0.0, z)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(torch.zeros_like(z), 0.5, z)  # out of order: the current time is 1.0


def test_schedule_math_is_float64_and_variance_preserving():
    scheduler = VDMScheduler()
    t = torch.linspace(0, 1, 11, dtype=torch.float32)
    gamma = scheduler.gamma(t)
    assert gamma.dtype == torch.float64
    torch.testing.assert_close(gamma[0], torch.tensor(-13.3, dtype=torch.float64))
    torch.testing.assert_close(gamma[-1], torch.tensor(5.0, dtype=torch.float64))
    assert (gamma.diff() > 0).all()
    torch.testing.assert_close(scheduler.gamma_derivative(t), torch.full((11,), 18.3, dtype=torch.float64))


def test_add_noise_is_forward_process_and_keeps_dtype_and_device():
    scheduler = VDMScheduler()
    x = torch.randn(SHAPE)
    noise = torch.randn(SHAPE)
    t = torch.tensor([0.0, 0.5, 1.0])
    z = scheduler.add_noise(x, noise, t)
    assert z.dtype == x.dtype and z.device == x.device
    for i, ti in enumerate(t.tolist()):
        gamma = -13.3 + 18.3 * ti
        expected = math.sqrt(sigmoid(-gamma)) * x[i] + math.sqrt(sigmoid(gamma)) * noise[i]
        torch.testing.assert_close(z[i], expected)


def test_add_noise_refuses_integer_timesteps_and_times_outside_the_unit_interval():
    """diffusers-style integer timesteps (or t > 1) gave pure noise silently; they are refused."""
    scheduler = VDMScheduler()
    x, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for timesteps in (torch.tensor([10, 500]), torch.tensor([0, 1]), 10, torch.tensor([True, False])):
        with pytest.raises(TypeError, match="`timesteps` must be"):
            scheduler.add_noise(x, noise, timesteps)
    for timesteps in (1.5, -0.1, torch.tensor([0.5, 1.5]), torch.tensor([float("nan"), 0.5]), float("inf")):
        with pytest.raises(ValueError, match=r"`timesteps` must (hold times|be a time) in \[0, 1\]"):
            scheduler.add_noise(x, noise, timesteps)
    with pytest.raises(TypeError, match="`timesteps` must be"):
        scheduler.add_noise(x, noise, "0.5")
    for timesteps in (0, 1, 0.25, torch.tensor(0.5, dtype=torch.float64)):
        scheduler.add_noise(x, noise, timesteps)


def test_step_dict_and_tuple_outputs_match():
    z, v = torch.randn(SHAPE), torch.randn(SHAPE)
    scheduler = VDMScheduler(encoder_type="trainable")
    scheduler.set_timesteps(5)
    out = scheduler.step(v, scheduler.timesteps[0], z, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(5)
    prev, x_hat = scheduler.step(
        v, scheduler.timesteps[0], z, generator=torch.Generator().manual_seed(0), return_dict=False
    )
    torch.testing.assert_close(out.prev_sample, prev, rtol=0, atol=0)
    torch.testing.assert_close(out.pred_original_sample, x_hat, rtol=0, atol=0)


def test_save_load_round_trip_gives_identical_steps(tmp_path):
    scheduler = VDMScheduler(
        gamma_min=-12.0,
        gamma_max=6.0,
        schedule="learned_linear",
        prediction_type="epsilon",
        encoder_type="trainable",
        variance_weight=0.5,
    )
    scheduler.save_pretrained(tmp_path)
    loaded = VDMScheduler.from_pretrained(tmp_path)
    # diffusers' bookkeeping key `_use_default_values` (the unset learned_monotone options) is not saved.
    public = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in (loaded, scheduler)]
    assert public[0] == public[1]
    z, v = torch.randn(SHAPE), torch.randn(SHAPE)
    outs = []
    for sched in (scheduler, loaded):
        sched.set_timesteps(7)
        outs.append(sched.step(v, sched.timesteps[0], z, generator=torch.Generator().manual_seed(3)).prev_sample)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma_min": 5.0, "gamma_max": 5.0}, "gamma_min"),
        ({"gamma_min": 6.0}, "gamma_min"),
        ({"gamma_max": float("nan")}, "gamma_max"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"schedule": "cosine"}, "schedule"),
        ({"encoder_type": "learned"}, "encoder_type"),
        ({"variance_weight": 0.0}, "variance_weight"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        VDMScheduler(**kwargs)


@pytest.mark.parametrize("steps", [0, -3])
def test_bad_num_inference_steps_raises(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        VDMScheduler().set_timesteps(steps)


def test_non_int_num_inference_steps_raises():
    with pytest.raises(TypeError, match="num_inference_steps"):
        VDMScheduler().set_timesteps(2.5)


def test_bad_eta_and_shape_raise():
    scheduler = VDMScheduler()
    scheduler.set_timesteps(3)
    z = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="eta"):
        scheduler.step(z, scheduler.timesteps[0], z, eta=1.5)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(z[:1], scheduler.timesteps[0], z)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_original_sample_error_is_x_hat_minus_x(prediction_type):
    scheduler = VDMScheduler(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    x, noise, output = (torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    gamma = torch.tensor([-12.0, 0.0, 4.0], dtype=torch.float64)
    alpha, sigma = (v.view(3, 1, 1, 1) for v in alpha_sigma(gamma))
    z_t = alpha * x + sigma * noise
    expected = scheduler.predict_original_sample(output, z_t, gamma) - x
    torch.testing.assert_close(scheduler.original_sample_error(output, x, noise, alpha, sigma), expected)
