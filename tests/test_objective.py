"""DiffEncObjective: every ELBO term against an independent computation of DESIGN.md section 2."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_encoder, make_unet

from diffenc_diffusers import DiffEncObjective, VDMScheduler
from diffenc_diffusers.discretization import uint8_to_grid

ENCODER_TYPES = ["none", "nontrainable", "trainable"]
D = 64  # 1 x 8 x 8
NATS_PER_BPD = D * math.log(2.0)


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def make_objective(encoder_type, dtype=torch.float64, num_timesteps=None, **scheduler_kwargs):
    scheduler = VDMScheduler(encoder_type=encoder_type, **scheduler_kwargs)
    encoder = make_encoder(dtype) if encoder_type == "trainable" else None
    return DiffEncObjective(make_unet(dtype), scheduler, encoder, num_timesteps=num_timesteps)


def fixed_draws(batch=4, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)[:batch]
    noise = torch.randn(batch, 1, 8, 8, generator=generator, dtype=dtype)
    recon_noise = torch.randn(batch, 1, 8, 8, generator=generator, dtype=dtype)
    return t, noise, recon_noise


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_discrete_loss_converges_to_continuous_loss(encoder_type, images):
    """Same (x, eps), same fixed network: |L_T - L_inf| shrinks like 1/T and is tiny at T = 1e5."""
    t, noise, recon_noise = fixed_draws()
    continuous = make_objective(encoder_type)(images, t=t, noise=noise, recon_noise=recon_noise).loss_diff
    assert (continuous > 0).all()
    errors = []
    for num_steps in (100, 1000, 10_000, 100_000):
        objective = make_objective(encoder_type, num_timesteps=num_steps)
        # t - 0.5 / T selects the step that ends exactly at t
        out = objective(images, t=t - 0.5 / num_steps, noise=noise, recon_noise=recon_noise)
        torch.testing.assert_close(out.t, t)
        errors.append(((out.loss_diff - continuous).abs() / continuous).max().item())
    for coarse, fine in itertools.pairwise(errors):
        assert fine < 0.3 * coarse, errors  # first order: about 0.1
    assert errors[-1] < 1e-3, errors


def test_discrete_kl_equals_gaussian_kl_of_posteriors(images):
    """One T-step KL computed from q(z_s | z_t, x) and p(z_s | z_t) written out from scratch (DiffEnc, T = 10)."""
    num_steps = 10
    objective = make_objective("nontrainable", num_timesteps=num_steps)
    t, noise, recon_noise = fixed_draws()
    out = objective(images, t=t, noise=noise, recon_noise=recon_noise)

    x = uint8_to_grid(images, torch.float64)
    expected = []
    for i in range(4):
        step = math.floor(t[i].item() * num_steps)
        ti, si = (step + 1) / num_steps, step / num_steps
        g_t, g_s = -13.3 + 18.3 * ti, -13.3 + 18.3 * si
        a_t, s_t = math.sqrt(sigmoid(-g_t)), math.sqrt(sigmoid(g_t))
        a_s, s_s = math.sqrt(sigmoid(-g_s)), math.sqrt(sigmoid(g_s))
        m_t, m_s = a_t**2 * x[i], a_s**2 * x[i]
        z_t = a_t * m_t + s_t * noise[i]
        with torch.no_grad():
            v = objective.unet(z_t[None], torch.tensor([g_t], dtype=torch.float64)).sample[0]
        x_hat_t = a_t * z_t - s_t * v
        x_hat_s = x_hat_t * (1 - (g_s - g_t) * s_t**2)
        a_ts = a_t / a_s
        var_ts = s_t**2 - a_ts**2 * s_s**2
        coef = a_ts * s_s**2 / s_t**2
        mu_q = a_s * m_s + coef * (z_t - a_t * m_t)
        mu_p = a_s * x_hat_s + coef * (z_t - a_t * x_hat_t)
        var_q = var_ts * s_s**2 / s_t**2
        expected.append(num_steps * ((mu_q - mu_p) ** 2).sum().item() / (2 * var_q))
    torch.testing.assert_close(
        out.loss_diff.detach() * NATS_PER_BPD, torch.tensor(expected, dtype=torch.float64), rtol=1e-8, atol=1e-10
    )


def test_vdm_continuous_loss_is_eps_error(images):
    """For VDM with eps-prediction, L = 0.5 gamma' ||eps - eps_hat||^2."""
    objective = make_objective("none", prediction_type="epsilon")
    t, noise, recon_noise = fixed_draws()
    out = objective(images, t=t, noise=noise, recon_noise=recon_noise)
    x = uint8_to_grid(images, torch.float64)
    gamma = -13.3 + 18.3 * t
    alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    z_t = alpha[:, None, None, None] * x + sigma[:, None, None, None] * noise
    with torch.no_grad():
        eps_hat = objective.unet(z_t, gamma).sample
    expected = 0.5 * 18.3 * ((noise - eps_hat) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(out.loss_diff.detach() * NATS_PER_BPD, expected)


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_prior_and_reconstruction_terms_equal_closed_forms(encoder_type, images):
    objective = make_objective(encoder_type)
    t, noise, recon_noise = fixed_draws()
    out = objective(images, t=t, noise=noise, recon_noise=recon_noise)
    x = uint8_to_grid(images, torch.float64)
    g0, g1 = torch.tensor([-13.3] * 4, dtype=torch.float64), torch.tensor([5.0] * 4, dtype=torch.float64)
    x_phi_1 = objective.encode(x, g1).x_phi.detach()
    a1_sq, s1_sq = sigmoid(-5.0), sigmoid(5.0)
    kl_per_dim = 0.5 * (a1_sq * x_phi_1**2 + s1_sq - math.log(s1_sq) - 1.0)
    torch.testing.assert_close(out.loss_klz.detach() * NATS_PER_BPD, kl_per_dim.flatten(1).sum(1))

    x_phi_0 = objective.encode(x, g0).x_phi.detach()
    z0r = x_phi_0 + math.exp(-13.3 / 2) * recon_noise
    grid = uint8_to_grid(torch.arange(256, dtype=torch.uint8), torch.float64)
    logits = -0.5 * ((z0r[..., None] - grid) * math.exp(13.3 / 2)) ** 2
    log_p = torch.log_softmax(logits, -1).gather(-1, images.long()[..., None]).squeeze(-1)
    torch.testing.assert_close(out.loss_recon.detach() * NATS_PER_BPD, -log_p.flatten(1).sum(1))
    torch.testing.assert_close(out.bpd, out.loss_recon + out.loss_klz + out.loss_diff)


@pytest.mark.parametrize("num_timesteps", [None, 20])
def test_trainable_encoder_at_init_equals_nontrainable(num_timesteps, images):
    unet = make_unet(torch.float64)
    t, noise, recon_noise = fixed_draws()
    fixed = DiffEncObjective(unet, VDMScheduler(encoder_type="nontrainable"), num_timesteps=num_timesteps)
    trainable = DiffEncObjective(
        unet,
        VDMScheduler(encoder_type="trainable"),
        make_encoder(torch.float64, perturb=False),
        num_timesteps=num_timesteps,
    )
    a = fixed(images, t=t, noise=noise, recon_noise=recon_noise)
    b = trainable(images, t=t, noise=noise, recon_noise=recon_noise)
    for name in ("bpd", "loss_recon", "loss_klz", "loss_diff"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12)


@pytest.mark.parametrize("encoder_type", ["nontrainable", "trainable"])
def test_encoding_derivative_matches_finite_difference(encoder_type, images):
    objective = make_objective(encoder_type)
    x = uint8_to_grid(images, torch.float64)
    gamma = torch.tensor([-10.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    encoding = objective.encode(x, gamma, with_derivative=True)
    h = 1e-6  # the gamma embedding has frequencies up to ~1000 / 18.3 per unit gamma: keep h small
    finite = (objective.encode(x, gamma + h).x_phi - objective.encode(x, gamma - h).x_phi) / (2 * h)
    torch.testing.assert_close(encoding.dx_phi_dgamma, finite, rtol=1e-6, atol=1e-8)
    if encoder_type == "trainable":
        assert encoding.y.abs().max() > 1e-3  # the perturbed encoder is not trivial


def test_encoder_gradient_flows_through_dy_dgamma(images):
    """The gradient of a loss on dy/dgamma (from jvp) equals the one from reverse-over-reverse differentiation."""
    encoder = make_encoder(torch.float64)
    x = uint8_to_grid(images, torch.float64)
    gamma = torch.tensor([-10.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    objective = DiffEncObjective(make_unet(torch.float64), VDMScheduler(encoder_type="trainable"), encoder)
    encoding = objective.encode(x, gamma, with_derivative=True)
    sigma_sq = torch.sigmoid(gamma)[:, None, None, None]
    dy = (encoding.dx_phi_dgamma - sigma_sq * (1 - sigma_sq) * (encoding.y - x)) / sigma_sq
    grads_jvp = torch.autograd.grad((weights * dy).sum(), list(encoder.parameters()))

    gamma_req = gamma.clone().requires_grad_(True)
    y = encoder(x, gamma_req).sample
    probe = torch.ones_like(y, requires_grad=True)
    (vjp,) = torch.autograd.grad(y, gamma_req, probe, create_graph=True)
    (dy_ref,) = torch.autograd.grad(vjp, probe, torch.ones_like(gamma), create_graph=True)
    grads_ref = torch.autograd.grad((weights * dy_ref).sum(), list(encoder.parameters()))

    assert any(g.abs().max() > 0 for g in grads_jvp)
    for g_jvp, g_ref in zip(grads_jvp, grads_ref, strict=True):
        torch.testing.assert_close(g_jvp, g_ref, rtol=1e-7, atol=1e-10)


def test_encoder_that_ignores_gamma_has_zero_derivative(images):
    """A user's encoder need not depend on gamma; then d y / d gamma = 0 (forward-mode AD gives no tangent)."""

    class GammaFree(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, sample, gamma):
            return SimpleNamespace(sample=torch.tanh(self.scale * sample))

    objective = DiffEncObjective(make_unet(torch.float64), VDMScheduler(encoder_type="trainable"), GammaFree())
    x = uint8_to_grid(images, torch.float64)
    gamma = torch.tensor([-10.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    encoding = objective.encode(x, gamma, with_derivative=True)
    alpha_sq, sigma_sq = (v[:, None, None, None] for v in (torch.sigmoid(-gamma), torch.sigmoid(gamma)))
    y = torch.tanh(0.5 * x)
    torch.testing.assert_close(encoding.dx_phi_dgamma, sigma_sq * alpha_sq * (y - x))
    objective(images).loss.backward()
    assert objective.encoder.scale.grad is not None


def test_weighted_loss_matches_formula(images):
    t, noise, recon_noise = fixed_draws()
    w = 2.5
    elbo = make_objective("nontrainable", num_timesteps=50)(images, t=t, noise=noise, recon_noise=recon_noise)
    weighted = make_objective("nontrainable", num_timesteps=50, variance_weight=w)(
        images, t=t, noise=noise, recon_noise=recon_noise
    )
    expected = 50 * (0.5 * D * (math.log(w) + 1 / w - 1)) / NATS_PER_BPD + elbo.loss_diff / w
    torch.testing.assert_close(weighted.loss_diff, expected)
    torch.testing.assert_close(weighted.loss_klz, elbo.loss_klz)


def test_weighted_loss_needs_finite_t():
    with pytest.raises(ValueError, match="num_timesteps"):
        make_objective("none", variance_weight=2.0)


def test_learned_schedule_endpoints_get_gradients_and_export(images):
    objective = make_objective("trainable", schedule="learned_linear")
    assert {name for name, _ in objective.named_parameters()} >= {"gamma_min", "gamma_max"}
    objective(images, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert objective.gamma_min.grad is not None and objective.gamma_min.grad != 0
    assert objective.gamma_max.grad is not None and objective.gamma_max.grad != 0
    assert all(p.grad is not None for p in objective.encoder.parameters() if p.requires_grad)
    with torch.no_grad():
        objective.gamma_min.fill_(-11.0)
        objective.gamma_max.fill_(6.5)
    exported = objective.export_scheduler()
    assert exported.config.gamma_min == -11.0 and exported.config.gamma_max == 6.5
    assert exported.config.schedule == "learned_linear" and exported.config.encoder_type == "trainable"
    torch.testing.assert_close(objective.gamma(torch.tensor([0.5])), exported.gamma(torch.tensor([0.5])))


def test_low_discrepancy_times_and_seeding(images):
    objective = make_objective("trainable")
    out_a = objective(images, generator=torch.Generator().manual_seed(7))
    out_b = objective(images, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out_a.bpd, out_b.bpd, rtol=0, atol=0)
    offsets = torch.remainder(out_a.t - out_a.t[0], 1.0)
    torch.testing.assert_close(offsets, torch.arange(4, dtype=torch.float64) / 4)


def test_accepts_grid_floats_like_uint8(images):
    objective = make_objective("nontrainable")
    t, noise, recon_noise = fixed_draws()
    a = objective(images, t=t, noise=noise, recon_noise=recon_noise)
    b = objective(uint8_to_grid(images), t=t, noise=noise, recon_noise=recon_noise)
    torch.testing.assert_close(a.bpd, b.bpd)


def test_bf16_autocast_keeps_terms_in_fp32(images):
    objective = make_objective("trainable", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(images, generator=torch.Generator().manual_seed(0))
    reference = objective(images, generator=torch.Generator().manual_seed(0))
    assert out.bpd.dtype == torch.float32 and torch.isfinite(out.bpd).all()
    torch.testing.assert_close(out.loss_klz, reference.loss_klz, rtol=2e-2, atol=1e-3)
    assert ((out.bpd - reference.bpd).abs() / reference.bpd).max() < 0.05


@pytest.mark.parametrize(
    ("images", "kwargs", "error", "match"),
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), {}, ValueError, "in_channels"),
        (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), {}, ValueError, "sample_size"),
        (torch.rand(2, 1, 8, 8), {}, ValueError, "grid"),
        (torch.full((2, 1, 8, 8), float("nan")), {}, ValueError, "NaN"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.int32), {}, TypeError, "uint8"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), {"t": torch.tensor([0.5])}, ValueError, "`t`"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), {"t": torch.tensor([0.5, 1.5])}, ValueError, "`t`"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), {"noise": torch.zeros(2, 1, 4, 4)}, ValueError, "noise"),
    ],
)
def test_bad_input_raises(images, kwargs, error, match):
    objective = make_objective("trainable", dtype=torch.float32)
    with pytest.raises(error, match=match):
        objective(images, **kwargs)


def test_bad_construction_raises():
    unet = make_unet()
    with pytest.raises(ValueError, match="encoder"):
        DiffEncObjective(unet, VDMScheduler(encoder_type="trainable"))
    with pytest.raises(ValueError, match="encoder_type"):
        DiffEncObjective(unet, VDMScheduler(encoder_type="none"), make_encoder())
    with pytest.raises(ValueError, match="num_timesteps"):
        DiffEncObjective(unet, VDMScheduler(), num_timesteps=0)
    with pytest.raises(TypeError, match="scheduler"):
        DiffEncObjective(unet, object())


@pytest.mark.parametrize("encoder_type", ["none", "trainable"])
def test_tiny_model_learns_digits(encoder_type):
    """A hundred Adam steps on a fixed batch of real digits lower the ELBO clearly."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:32]
    images = torch.from_numpy((digits * 255.0 / 16.0).round()).to(torch.uint8)[:, None]
    torch.manual_seed(0)
    scheduler = VDMScheduler(encoder_type=encoder_type)
    encoder = make_encoder(perturb=False) if encoder_type == "trainable" else None
    objective = DiffEncObjective(make_unet(perturb=False), scheduler, encoder)
    t, noise, recon_noise = (
        torch.linspace(0.01, 0.99, 32, dtype=torch.float64),
        torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
        torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2)),
    )

    def evaluate():
        objective.eval()
        with torch.no_grad():
            return objective(images, t=t, noise=noise, recon_noise=recon_noise).loss.item()

    before = evaluate()
    objective.train()
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        optimizer.zero_grad()
        objective(images, generator=generator).loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.75 * before, (before, after)
