"""schedule="learned_monotone": the monotone gamma network with exact ends, its config, sampler and training."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_encoder, make_unet

from diffenc_diffusers import DiffEncObjective, DiffEncPipeline, VDMScheduler
from diffenc_diffusers.discretization import uint8_to_grid
from diffenc_diffusers.models import MonotoneSchedule
from diffenc_diffusers.scheduling_vdm import linear_gamma, monotone_gamma

REPO_ROOT = Path(__file__).resolve().parents[1]
# A strongly non-linear interior (steps of width 1/50 and 1/30) next to the default near-linear one.
STRONG = {
    "monotone_l2_weight": [30.0, -5.0, 50.0],
    "monotone_l2_bias": [-3.0, -1.0, -40.0],
    "monotone_l3_weight": [2.0, 0.5, -3.0],
}
IDENTITY = {"monotone_l2_weight": [4.0, 9.0], "monotone_l2_bias": [-1.0, 2.0], "monotone_l3_weight": [0.0, 0.0]}


class SmoothDenoiser(torch.nn.Module):
    """A denoiser smooth in gamma (the U-Net's sinusoidal embedding of 1000 t oscillates), for quadratures."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(sample_size=8, in_channels=1)
        self.scale = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, sample, gamma):
        return SimpleNamespace(sample=torch.tanh(self.scale * sample + 0.1 * gamma[:, None, None, None]))


class SmoothEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, sample, gamma):
        return SimpleNamespace(sample=torch.tanh(self.scale * sample + 0.05 * gamma[:, None, None, None]))


def public_config(scheduler):
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def monotone(encoder_type="none", **kwargs):
    return VDMScheduler(schedule="learned_monotone", encoder_type=encoder_type, **kwargs)


@pytest.mark.parametrize("params", [{}, STRONG, {"monotone_num_features": 64}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gamma_is_increasing_with_exact_ends_and_exact_derivative(params, dtype):
    scheduler = monotone(gamma_min=-12.7, gamma_max=6.3, **params)
    w2, b2, w3 = scheduler.monotone_parameters(dtype=dtype)
    ends = monotone_gamma(torch.tensor([0.0, 1.0], dtype=dtype), -12.7, 6.3, w2, b2, w3)[0]
    assert ends.tolist() == [torch.tensor(-12.7, dtype=dtype).item(), torch.tensor(6.3, dtype=dtype).item()]
    assert scheduler.gamma(0.0).item() == -12.7 and scheduler.gamma(1.0).item() == 6.3

    t = torch.linspace(0, 1, 20_001, dtype=torch.float64, requires_grad=True)
    gamma, derivative = scheduler.gamma_and_derivative(t)
    assert (gamma.diff() > 0).all() and (derivative > 0).all()
    (autograd,) = torch.autograd.grad(gamma.sum(), t)
    torch.testing.assert_close(derivative, autograd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scheduler.gamma_derivative(t), derivative, rtol=0, atol=0)


def test_zero_output_weights_give_the_linear_schedule():
    t = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gamma, derivative = monotone(**IDENTITY).gamma_and_derivative(t)
    torch.testing.assert_close(gamma, linear_gamma(t, -13.3, 5.0), rtol=1e-15, atol=1e-14)
    torch.testing.assert_close(derivative, torch.full_like(t, 18.3), rtol=1e-15, atol=1e-14)


def test_config_is_complete_and_round_trips(tmp_path):
    scheduler = monotone(encoder_type="trainable", learn_endpoints=False, monotone_num_features=5)
    config = dict(scheduler.config)
    assert config["learn_endpoints"] is False and config["monotone_num_features"] == 5
    assert all(type(config[key]) is list and len(config[key]) == 5 for key in STRONG)
    assert (
        not scheduler.learns_endpoints and monotone().learns_endpoints and VDMScheduler().config.learn_endpoints is None
    )

    for kwargs in ({}, STRONG):
        scheduler = monotone(gamma_min=-11.5, **kwargs)
        scheduler.save_pretrained(tmp_path / str(len(kwargs)))
        loaded = VDMScheduler.from_pretrained(tmp_path / str(len(kwargs)))
        assert public_config(loaded) == public_config(scheduler)
        assert public_config(VDMScheduler.from_config(scheduler.config)) == public_config(scheduler)
        t = torch.linspace(0, 1, 101, dtype=torch.float64)
        for a, b in zip(scheduler.gamma_and_derivative(t), loaded.gamma_and_derivative(t), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"monotone_l3_weight": [1.0]}, ValueError, r"`monotone_l2_weight`, `monotone_l2_bias` missing"),
        ({**STRONG, "monotone_l2_bias": [0.0]}, ValueError, r"one length, got"),
        ({**STRONG, "monotone_l3_weight": [1.0, float("inf"), 0.0]}, TypeError, r"`monotone_l3_weight` must be"),
        ({**STRONG, "monotone_l3_weight": []}, TypeError, r"`monotone_l3_weight` must be a non-empty list"),
        ({**STRONG, "monotone_num_features": 4}, ValueError, r"`monotone_num_features` is 4 but .* 3 entries"),
        ({"monotone_num_features": 0}, ValueError, r"`monotone_num_features` must be a positive int"),
        ({"monotone_num_features": 2.0}, TypeError, r"`monotone_num_features` must be a positive int"),
        ({"learn_endpoints": "yes"}, TypeError, r"`learn_endpoints` must be a bool"),
    ],
)
def test_bad_monotone_config_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        monotone(**kwargs)


@pytest.mark.parametrize("schedule", ["fixed_linear", "learned_linear"])
def test_monotone_options_are_refused_for_linear_schedules(schedule):
    with pytest.raises(ValueError, match=r"`learn_endpoints`, `monotone_l3_weight` only apply to schedule="):
        VDMScheduler(schedule=schedule, learn_endpoints=True, monotone_l3_weight=[1.0])


@pytest.mark.parametrize("learn_endpoints", [True, False])
def test_objective_matches_the_scheduler_and_exports_trained_values(learn_endpoints):
    # Float32-exact ends: the trainable endpoints are float32 parameters.
    scheduler = monotone("trainable", gamma_min=-12.5, learn_endpoints=learn_endpoints, **STRONG)
    objective = DiffEncObjective(make_unet(), scheduler, make_encoder())
    names = {name for name, _ in objective.named_parameters() if not name.startswith(("unet.", "encoder."))}
    interior = {"monotone_schedule.l2_weight", "monotone_schedule.l2_bias", "monotone_schedule.l3_weight"}
    assert names == interior | ({"gamma_min", "gamma_max"} if learn_endpoints else set())
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(objective.gamma(t), scheduler.gamma(t), rtol=0, atol=0)
    torch.testing.assert_close(objective.gamma_derivative(t), scheduler.gamma_derivative(t), rtol=0, atol=0)

    with torch.no_grad():
        for param in objective.monotone_schedule.parameters():
            param.mul_(1.5)
        if learn_endpoints:
            objective.gamma_min.fill_(-11.0)
    exported = objective.export_scheduler()
    assert exported.config.monotone_l3_weight == [3.0, 0.75, -4.5]
    assert exported.config.gamma_min == (-11.0 if learn_endpoints else -12.5)
    assert exported.config.learn_endpoints is learn_endpoints
    torch.testing.assert_close(objective.gamma(t), exported.gamma(t), rtol=0, atol=0)
    assert MonotoneSchedule.from_scheduler(exported).config_values()["monotone_l3_weight"] == [3.0, 0.75, -4.5]
    with pytest.raises(ValueError, match="schedule='learned_monotone'"):
        MonotoneSchedule.from_scheduler(VDMScheduler())


@pytest.mark.parametrize("encoder_type", ["none", "trainable"])
def test_continuous_loss_does_not_depend_on_the_interior(encoder_type, images):
    """Fixed networks, image and eps: the midpoint rule over t of L(t) is the same for three schedules with the
    same ends (the ELBO is an integral over gamma), within the quadrature's error."""
    num_points = 4000
    x = uint8_to_grid(images[:1], torch.float64).expand(num_points, -1, -1, -1)
    noise = torch.randn(x.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(1)).expand_as(x)
    t = (torch.arange(num_points, dtype=torch.float64) + 0.5) / num_points
    integrals = []
    for scheduler in (
        VDMScheduler(encoder_type=encoder_type),
        monotone(encoder_type),
        monotone(encoder_type, **STRONG),
    ):
        encoder = SmoothEncoder() if encoder_type == "trainable" else None
        objective = DiffEncObjective(SmoothDenoiser(), scheduler, encoder)
        with torch.no_grad():
            integrals.append(objective.continuous_diffusion_nats(x, t, noise).mean().item())
    assert integrals[0] == pytest.approx(integrals[1], rel=1e-6) == pytest.approx(integrals[2], rel=1e-6)


def test_continuous_loss_is_unchanged_in_expectation_with_the_unet(images):
    """The real U-Net, random t and eps: the mean loss of two schedules with the same ends agrees within 4 s.e."""
    num_draws = 2048
    x = images.repeat(num_draws // 4, 1, 1, 1)
    means = []
    for scheduler in (VDMScheduler(), monotone(**STRONG)):
        objective = DiffEncObjective(make_unet(), scheduler)
        with torch.no_grad():
            loss = objective(x, generator=torch.Generator().manual_seed(0)).loss_diff.double()
        means.append((loss.mean().item(), loss.std().item() / num_draws**0.5))
    (mean_a, se_a), (mean_b, se_b) = means
    assert abs(mean_a - mean_b) < 4 * (se_a**2 + se_b**2) ** 0.5


def test_interior_gets_the_variance_gradient_and_the_rest_the_elbo_gradient(images):
    """Finite differences (float64 networks): w2, b2, w3 get d/dw mean(loss_diff^2), the endpoints and the U-Net
    d/dtheta mean(bpd); the noise, times and images are fixed."""
    objective = DiffEncObjective(make_unet(torch.float64), monotone(**STRONG))
    t = torch.tensor([0.05, 0.3, 0.55, 0.9], dtype=torch.float64)
    draws = torch.Generator().manual_seed(2)
    noise, recon_noise = (torch.randn(images.shape, generator=draws, dtype=torch.float64) for _ in range(2))

    def evaluate():
        return objective(images, t=t, noise=noise, recon_noise=recon_noise)

    evaluate().loss.backward()
    unet_weight = objective.unet.conv_in.weight
    checks = [
        (objective.monotone_schedule.l3_weight, 0, lambda out: (out.loss_diff**2).mean()),
        (objective.monotone_schedule.l2_weight, 2, lambda out: (out.loss_diff**2).mean()),
        (objective.monotone_schedule.l2_bias, 1, lambda out: (out.loss_diff**2).mean()),
        (objective.gamma_max, (), lambda out: out.loss),
        (objective.gamma_min, (), lambda out: out.loss),
        (unet_weight, (0, 0, 1, 1), lambda out: out.loss),
    ]
    h = 1e-3
    for param, index, target in checks:
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                param[index] += sign * h
                values.append(target(evaluate()).item())
                param[index] -= sign * h
        finite_difference = (values[0] - values[1]) / (2 * h)
        assert param.grad[index].item() == pytest.approx(finite_difference, rel=2e-3, abs=1e-6)


def test_variance_training_lowers_the_loss_variance(images):
    """60 Adam steps on the interior alone (fixed smooth denoiser, fixed ends) cut the variance of L(t) by > 2x."""
    objective = DiffEncObjective(SmoothDenoiser(), monotone(learn_endpoints=False))
    objective.unet.scale.requires_grad_(False)
    num_points = 512
    x = images.repeat(num_points, 1, 1, 1)
    t = ((torch.arange(num_points, dtype=torch.float64) + 0.5) / num_points).repeat_interleave(len(images))
    noise = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss_variance():
        with torch.no_grad():
            return objective.continuous_diffusion_nats(uint8_to_grid(x, torch.float64), t, noise).var().item()

    before = loss_variance()
    optimizer = torch.optim.Adam(objective.monotone_schedule.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        optimizer.zero_grad()
        objective(images, generator=generator).loss.backward()
        optimizer.step()
    assert loss_variance() < 0.5 * before


@pytest.mark.parametrize("encoder_type", ["none", "trainable"])
def test_discrete_loss_converges_to_continuous_with_a_monotone_schedule(encoder_type, images):
    scheduler = monotone(encoder_type, **STRONG)
    encoder = make_encoder(torch.float64) if encoder_type == "trainable" else None
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    draws = torch.Generator().manual_seed(0)
    noise, recon_noise = (torch.randn(images.shape, generator=draws, dtype=torch.float64) for _ in range(2))
    unet = make_unet(torch.float64)
    continuous = DiffEncObjective(unet, scheduler, encoder)(images, t=t, noise=noise, recon_noise=recon_noise)
    errors = []
    for num_steps in (100, 1000, 10_000, 100_000):
        objective = DiffEncObjective(unet, scheduler, encoder, num_timesteps=num_steps)
        out = objective(images, t=t - 0.5 / num_steps, noise=noise, recon_noise=recon_noise)
        errors.append(((out.loss_diff - continuous.loss_diff).abs() / continuous.loss_diff).max().item())
    for coarse, fine in itertools.pairwise(errors):
        assert fine < 0.3 * coarse, errors
    assert errors[-1] < 1e-3, errors
    # In discrete time the loss depends on the interior: its weights get the loss' own gradient.
    objective.zero_grad()
    objective(images, t=t, noise=noise, recon_noise=recon_noise).loss.backward()
    assert objective.monotone_schedule.l3_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_with_an_identity_interior_equals_the_linear_sampler(eta):
    """scheduler.step with w3 = 0 is the linear schedule's (the U-Net's Fourier features would amplify the ulp
    differences of gamma chaotically over the steps, so a smooth denoiser is used)."""
    denoiser = SmoothDenoiser()
    z_1 = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    trajectories = []
    for scheduler in (VDMScheduler(encoder_type="nontrainable"), monotone("nontrainable", **IDENTITY)):
        scheduler.set_timesteps(20)
        generator = torch.Generator().manual_seed(1)
        z, trajectory = z_1, []
        with torch.no_grad():
            for t in scheduler.timesteps:
                v = denoiser(z, scheduler.gamma(t).expand(3)).sample
                z = scheduler.step(v, t, z, generator=generator, eta=eta).prev_sample
                trajectory.append(z)
        trajectories.append(torch.stack(trajectory[:-1]))
        trajectories.append(scheduler.decode(trajectory[-1]))
    torch.testing.assert_close(trajectories[0], trajectories[2], rtol=1e-12, atol=1e-12)
    assert torch.equal(trajectories[1], trajectories[3])


def test_pipeline_with_a_monotone_schedule_saves_loads_samples_and_scores(tmp_path, images):
    pipe = DiffEncPipeline(unet=make_unet(), scheduler=monotone("trainable", **STRONG), encoder=make_encoder())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = DiffEncPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert public_config(loaded.scheduler) == public_config(pipe.scheduler)
    samples = [
        p(batch_size=2, num_inference_steps=10, output_type="pt", generator=torch.Generator().manual_seed(1)).images
        for p in (pipe, loaded)
    ]
    assert torch.equal(samples[0], samples[1])
    bpd = [
        p.bits_per_dim(images, generator=torch.Generator().manual_seed(0), show_progress=False).bpd
        for p in (pipe, loaded)
    ]
    assert torch.isfinite(bpd[0]).all() and torch.equal(bpd[0], bpd[1])


def test_variance_script_fits_and_compares_on_a_saved_pipeline(tmp_path):
    DiffEncPipeline(unet=make_unet(), scheduler=VDMScheduler()).save_pretrained(tmp_path / "pipe")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "schedule_variance.py"),
        "--pipeline",
        str(tmp_path / "pipe"),
    ]
    options = ["--num_images", "8", "--draws", "3", "--output_json", str(tmp_path / "out.json")]
    result = subprocess.run([*command, *options, "--fit_steps", "2"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["num_images"] == 8 and out["draws"] == 3 and out["fit_steps"] == 2
    for name in ("monotone", "linear"):
        assert set(out[name]) == {"bpd", "bpd_se", "var_per_image", "var_total"}
    assert out["variance_ratio_linear_over_monotone"] > 0
    refused = subprocess.run([*command, *options], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "pass --fit_steps N" in refused.stderr
