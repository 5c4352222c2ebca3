"""Check diffenc-convert against the official JAX code, number for number.

For each official model (DiffEnc's VDM2_V, S4V_NT and S3VA, and google-research/vdm's eps-prediction VDM), at a
small config and at the paper's CIFAR-10 config, this script

1. initialises the official Flax model, perturbs every parameter (the zero-initialised layers would otherwise
   make the outputs trivial) and gives the EMA parameters a different perturbation than the raw ones;
2. saves the train state as the official code does (`flax.training.checkpoints.save_checkpoint` of DiffEnc's
   `EMATrainState`, legacy msgpack format; `flax.serialization.to_bytes` of VDM's `TrainState`, which is what
   clu's `Checkpoint` writes to ckpt-<n>.flax);
3. converts that file with `diffenc_diffusers.conversion.convert_official_checkpoint` (no JAX involved);
4. compares, on the same inputs: the score network output (EMA and raw parameters), the encoder output y, each
   ELBO term (reconstruction, prior, diffusion) with the same t, eps and eps_0, and every ancestral sampling step
   of a T-step chain with the same noise (the last one including the decoding of z_0).

It imports the official code from checkouts given on the command line and contains none of it. Run it in an
environment with jax, flax, optax, chex and jaxtyping besides this package's requirements:

    python scripts/verify_official.py --diffenc /path/to/DiffEnc --vdm /path/to/vdm --sizes small paper \
        --json docs/results/conversion_check.json --markdown docs/results/conversion_check.md

`--record-trees FILE` writes the official parameter trees (names and shapes, no values) of the released configs
and of the small ones, which tests/test_conversion.py uses without JAX.

Relative difference of a quantity: max |ours - official| / max |official| over all its elements (per image for the
ELBO terms, then the largest over the batch).

Shim: the official DiffEnc code targets Python 3.9; on Python >= 3.11 `dataclasses` rejects the unhashable
default `jnp.zeros(1)` of its `VDMOutput.inv_loss`. While the official modules are imported, such a default is
turned into a `default_factory` returning the same array (nothing else is changed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

DIFFENC_CONFIGS = {
    # name: (model config, training config)
    "VDM2_V": (
        "config_model_VDM2_V_fixed_-13_3_5_0_unet_32_simple.json", "config_train_cifar10_unconditional_1_128.json"
    ),
    "S4V_NT": ("config_model_S4V_NT_fixed_-13_3_5_0_unet_32_nt.json", "config_train_cifar10_unconditional_1_128.json"),
    "S3VA (mult_res_4)": (
        "config_model_S3VA_fixed_-13_3_5_0_unet_32_unet_mult_res_4_m1_to_1.json",
        "config_train_cifar10_unconditional_1_128.json",
    ),
    "S3VA (unet_8, unet_2, train_scalar)": (
        "config_model_S3VA_train_scalar_-13_3_5_0_unet_8_unet_2_m1_to_1.json",
        "config_train_cifar10_unconditional_1_128.json",
    ),
}
SMALL_SCORE = {"n_embd": 32, "n_layer": 2}
SMALL_ENCODER = {"n_embd": 32}
SMALL_VDM = {"sm_n_embd": 32, "sm_n_layer": 2}
VDM_CIFAR10_MODEL = {
    "vocab_size": 256, "sample_softmax": False, "antithetic_time_sampling": True, "with_fourier_features": True,
    "with_attention": False, "gamma_type": "learnable_scalar", "gamma_min": -13.3, "gamma_max": 5.0,
    "sm_n_timesteps": 0, "sm_n_embd": 128, "sm_n_layer": 32, "sm_pdrop": 0.1,
}
T_SAMPLE = 4
IMAGE_SHAPE = (32, 32, 3)
OFFICIAL_MODULES: list = []
"""The imported official modules that define `dot_product_attention` / `get_timestep_embedding`."""


@contextlib.contextmanager
def python311_dataclass_shim():
    """Accept jax-array dataclass defaults (see the module docstring) while the official code is imported."""
    import jax

    original = dataclasses._get_field

    def get_field(cls, name, annotation, kw_only):
        default = cls.__dict__.get(name, dataclasses.MISSING)
        if isinstance(default, jax.Array):
            setattr(cls, name, dataclasses.field(default_factory=lambda value=default: value))
        return original(cls, name, annotation, kw_only)

    dataclasses._get_field = get_field
    try:
        yield
    finally:
        dataclasses._get_field = original


def import_official(diffenc_root: Path, vdm_root: Path):
    """The official modules, imported from the checkouts."""
    sys.path.insert(0, str(diffenc_root))
    sys.path.insert(0, str(vdm_root.parent))
    with python311_dataclass_shim():
        from src.basic_ddpm.vdm import VDM2
        from src.basic_ddpm.vdm_v import VDM2V
        from src.file_handling import save_load_config
        from src.learned_encoder.sigma3_v_approx_model import Sigma3VA
        from src.learned_encoder.sigma4_v_nontrainable_enc_model import Sigma4VNT
        from src.training.train_state import EMATrainState
    vdm_package = importlib_module(vdm_root.name)
    OFFICIAL_MODULES[:] = [
        importlib_module(name)
        for name in ("src.nn_models.nn_blocks", "src.nn_models.time_embedding", "src.nn_models.time_embedding_t",
                     f"{vdm_package.__name__}.model_vdm")
    ]
    return {
        "classes": {"VDM2_V": VDM2V, "VDM2": VDM2, "S3VA": Sigma3VA, "S4V_NT": Sigma4VNT},
        "save_load_config": save_load_config,
        "EMATrainState": EMATrainState,
        "model_vdm": importlib_module(f"{vdm_package.__name__}.model_vdm"),
        "vdm_train_state": importlib_module(f"{vdm_package.__name__}.train_state"),
    }


def importlib_module(name: str):
    import importlib

    return importlib.import_module(name)


class RandomRecorder:
    """Records the arrays `jax.random.normal` and `jax.random.uniform` return (the official models draw their
    eps, eps_0, t and sampling noise with them), so that the same values can be given to our code."""

    def __init__(self):
        self.normal: list = []
        self.uniform: list = []

    @contextlib.contextmanager
    def recording(self):
        import jax

        normal, uniform = jax.random.normal, jax.random.uniform
        self.normal, self.uniform = [], []

        def record_normal(*args, **kwargs):
            value = normal(*args, **kwargs)
            self.normal.append(np.asarray(value))
            return value

        def record_uniform(*args, **kwargs):
            value = uniform(*args, **kwargs)
            self.uniform.append(np.asarray(value))
            return value

        with mock.patch.object(jax.random, "normal", record_normal), \
                mock.patch.object(jax.random, "uniform", record_uniform):
            yield self

    @contextlib.contextmanager
    def replaying(self, normal: list, uniform: list):
        """Make `jax.random.normal` / `uniform` return these arrays, in order (float64 re-evaluation)."""
        import jax
        import jax.numpy as jnp

        normal, uniform = list(normal), list(uniform)

        def replay(queue):
            def draw(key, shape=(), dtype=None, *args, **kwargs):
                value = queue.pop(0)
                if tuple(value.shape) != tuple(shape):
                    raise AssertionError(f"replayed draw of shape {value.shape}, asked for {shape}")
                return jnp.asarray(value, jnp.float64)
            return draw

        with mock.patch.object(jax.random, "normal", replay(normal)), \
                mock.patch.object(jax.random, "uniform", replay(uniform)):
            yield


def diffenc_config(official, config_dir: Path, model_file: str, size: str):
    """The official DDPMConfig of a released config file, shrunk for `size == "small"`."""
    raw = json.loads((config_dir / model_file).read_text())
    if size == "small":
        raw["score_model_config"].update(SMALL_SCORE)
        if raw["encoder_config"].get("nn_config"):
            raw["encoder_config"]["nn_config"].update(SMALL_ENCODER)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / model_file
        path.write_text(json.dumps(raw))
        config = official["save_load_config"].load_ddpm_config(model_file, folder)
    return raw, config


def perturb(params, key, scale: float):
    """Every parameter plus scale * N(0, 1) noise (the learned schedule's w and b by 0.01 * scale only)."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), leaf_key in zip(leaves, keys, strict=True):
        names = [getattr(p, "key", str(p)) for p in path]
        factor = 0.01 if names[0] == "gamma" else 1.0
        out.append(leaf + factor * scale * jax.random.normal(leaf_key, leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def flat_shapes(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            out.update(flat_shapes(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = list(value.shape)
    return out


def relative_difference(ours: np.ndarray, official: np.ndarray, per_row: bool = False) -> float:
    ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
    if ours.shape != official.shape:
        raise AssertionError(f"shape mismatch {ours.shape} vs {official.shape}")
    if per_row:
        return float(np.max(np.abs(ours - official) / np.maximum(np.abs(official), 1e-30)))
    return float(np.max(np.abs(ours - official)) / max(np.max(np.abs(official)), 1e-30))


def nhwc_to_nchw(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))


def check_model(official, name: str, kind: str, size: str, args, record: RandomRecorder) -> dict:
    """Build, save, convert and compare one official model; returns its row of the table."""
    import flax
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import checkpoints

    from diffenc_diffusers import DiffEncObjective
    from diffenc_diffusers.conversion import convert_official_checkpoint
    from diffenc_diffusers.discretization import uint8_to_grid

    flax.config.update("flax_use_orbax_checkpointing", False)
    batch = 4 if size == "small" else 2
    key = jax.random.PRNGKey(args.seed)
    keys = jax.random.split(key, 12)
    images = jax.random.randint(keys[0], (batch, *IMAGE_SHAPE), 0, 256).astype(jnp.uint8)
    conditioning = jnp.zeros((batch,))
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if kind == "diffenc":
            model_file, train_file = DIFFENC_CONFIGS[name]
            raw_config, config = diffenc_config(official, args.diffenc / "config", model_file, size)
            model = official["classes"][config.ddpm_type](config, IMAGE_SHAPE)
            variables = model.init(
                {"params": keys[1], "sample": keys[2], "dropout": keys[3]}, images=images, conditioning=conditioning
            )
            state = official["EMATrainState"].create(
                apply_fn=model.apply, variables=variables, optax_optimizer=lambda lr: optax.adamw(lr)
            )
            config_path = folder / model_file
            config_path.write_text(json.dumps(raw_config))
            train_path = args.diffenc / "config" / train_file
        else:
            model_config = dict(VDM_CIFAR10_MODEL, **(SMALL_VDM if size == "small" else {}))
            config = official["model_vdm"].VDMConfig(**model_config)
            model = official["model_vdm"].VDM(config)
            variables = model.init({"params": keys[1], "sample": keys[2]}, images=images, conditioning=conditioning)
            state = official["vdm_train_state"].TrainState.create(
                apply_fn=model.apply, variables=variables, optax_optimizer=lambda lr: optax.adamw(lr)
            )
            config_path = folder / "vdm_config.json"
            config_path.write_text(json.dumps({"data": {"dataset": "cifar10"}, "model": model_config}))
            train_path = None
        params = perturb(state.params, keys[4], 0.01)
        ema_params = perturb(state.params, keys[5], 0.01)
        state = state.replace(step=1234, params=params, ema_params=ema_params)
        if kind == "diffenc":
            checkpoint = Path(checkpoints.save_checkpoint(folder / "checkpoints", state, 1234, prefix="official_"))
        else:
            checkpoint = folder / "ckpt-1234.flax"
            checkpoint.write_bytes(flax.serialization.to_bytes(state))
        result = convert_official_checkpoint(checkpoint, config_path, train_path, params="ema")
        raw_result = convert_official_checkpoint(checkpoint, config_path, train_path, params="raw")
        file_size = checkpoint.stat().st_size

    pipe = result.pipeline
    ema = {"params": ema_params}
    rows, references = {}, {}
    t = np.array([0.03, 0.35, 0.62, 0.97][:batch], dtype=np.float32)
    z = jax.random.normal(keys[6], (batch, *IMAGE_SHAPE))
    g_t = model.apply(ema, jnp.asarray(t), method=model.get_gamma if kind == "diffenc" else lambda m, u: m.gamma(u))
    gamma_torch = torch.from_numpy(np.asarray(g_t, np.float32))
    with torch.no_grad():
        for label, variables_, converted in (("ema", ema, pipe), ("raw", {"params": params}, raw_result.pipeline)):
            if kind == "diffenc":
                official_out = model.apply(variables_, z, g_t, conditioning, True, method=model.score)
            else:
                official_out = model.apply(
                    variables_, z, g_t, conditioning, True, method=lambda m, *a: m.score_model(*a)
                )
            ours = converted.unet(nhwc_to_nchw(z), gamma_torch).sample
            official_nchw = nhwc_to_nchw(official_out).numpy()
            rows[f"score network output ({label})"] = relative_difference(ours.numpy(), official_nchw)

        x_grid = uint8_to_grid(nhwc_to_nchw(images))
        if pipe.encoder is not None:
            official_y = model.apply(ema, images, jnp.asarray(t), conditioning, True, method=model.inner_encode)
            ours_y = pipe.encoder(x_grid, gamma_torch).sample
            rows["encoder output y"] = relative_difference(ours_y.numpy(), nhwc_to_nchw(official_y).numpy())

    # ELBO terms with the same t, eps_0 and eps.
    with record.recording():
        if kind == "diffenc":
            output = model.apply(ema, images, conditioning, deterministic=True, ts=jnp.asarray(t),
                                 rngs={"sample": keys[7]})
            eps_0, eps = record.normal
            t_used = t
        else:
            output = model.apply(ema, images, conditioning, deterministic=True, rngs={"sample": keys[7]})
            eps_0, eps = record.normal
            (t0,) = record.uniform
            t_used = np.asarray(jnp.mod(t0 + jnp.arange(0.0, 1.0, step=1.0 / batch), 1.0), np.float32)
    objective = DiffEncObjective(pipe.unet, pipe.scheduler, pipe.encoder)
    with torch.no_grad():
        ours_elbo = objective(
            nhwc_to_nchw(images), t=torch.from_numpy(t_used.astype(np.float64)),
            noise=nhwc_to_nchw(eps), recon_noise=nhwc_to_nchw(eps_0),
        )
    nats_per_bpd = math.prod(IMAGE_SHAPE) * math.log(2.0)
    official_64, ours_64 = float64_elbo(model, ema, images, conditioning, t, kind, record, pipe, keys[7])
    for term in ("loss_recon", "loss_klz", "loss_diff"):
        official_term = np.asarray(getattr(output, term), np.float64).reshape(batch)
        ours_term = getattr(ours_elbo, term).double().numpy() * nats_per_bpd
        rows[f"ELBO {term} (nats)"] = relative_difference(ours_term, official_term, per_row=True)
        reference = official_64[term]
        references[f"ELBO {term}: official float32 vs official float64"] = relative_difference(
            official_term, reference, per_row=True
        )
        references[f"ELBO {term}: ours float32 vs official float64"] = relative_difference(
            ours_term, reference, per_row=True
        )
        references[f"ELBO {term}: ours float64 vs official float64"] = relative_difference(
            ours_64[term], reference, per_row=True
        )

    # Every step of a T-step ancestral chain: both sides start each step from the official z_t.
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(T_SAMPLE)
    z_t = jax.random.normal(keys[8], (batch, *IMAGE_SHAPE))
    worst = 0.0
    for i, timestep in enumerate(scheduler.timesteps):
        with record.recording():
            z_s = model.apply(ema, i, T_SAMPLE, z_t, conditioning, keys[9], method=model.sample)
            (noise,) = record.normal
        with torch.no_grad():
            v = pipe.unet(nhwc_to_nchw(z_t), pipe.scheduler.gamma(timestep).float().expand(batch)).sample
            with mock.patch("diffenc_diffusers.scheduling_vdm.randn_tensor", return_value=nhwc_to_nchw(noise)):
                ours = scheduler.step(v, timestep, nhwc_to_nchw(z_t)).prev_sample
        if i == T_SAMPLE - 1:
            decoded = model.apply(ema, z_s, method=model.generate_x, rngs={"sample": keys[10]})
            official_grid = 2.0 * (np.asarray(decoded, np.float64) + 0.5) / 256.0 - 1.0
            differing = np.abs(ours.double().numpy() - nhwc_to_nchw(official_grid).numpy()) > 1e-9
            rows[f"sampling: decoded x after step {i + 1}/{T_SAMPLE} (fraction of values differing)"] = float(
                differing.mean()
            )
            # A differing value is a tie: z_0 / alpha_0 within float32 rounding of a decision boundary.
            alpha_0 = float(pipe.scheduler.gamma(0.0).neg().sigmoid().sqrt())
            scaled = np.asarray(z_s, np.float64).transpose(0, 3, 1, 2) / alpha_0
            boundary_distance = np.abs((scaled + 1.0) * 128.0 - np.round((scaled + 1.0) * 128.0)) / 128.0
            rows["sampling: distance of differing values to a decision boundary (max)"] = float(
                boundary_distance[differing].max() if differing.any() else 0.0
            )
        else:
            worst = max(worst, relative_difference(ours.numpy(), nhwc_to_nchw(z_s).numpy()))
        z_t = z_s
    rows[f"sampling: z_s of steps 1-{T_SAMPLE - 1} of {T_SAMPLE} (worst)"] = worst
    return {
        "model": name,
        "size": size,
        "official parameters": result.official_parameter_count,
        "converted parameters": result.converted_parameter_count,
        "inert (conditioning row)": result.model.inert_parameter_count(),
        "checkpoint bytes": file_size,
        "seconds": round(time.time() - started, 1),
        "quantities": rows,
        "float64 references": references,
    }


def float64_elbo(model, variables, images, conditioning, t, kind, record, pipe, key):
    """The ELBO terms (nats) of the official code and of ours, both evaluated in float64 on the float32 run's
    draws (replayed), to show which side float32 rounding moves where the two float32 results differ.

    The official attention and sinusoidal embedding hard-code float32 as their compute dtype; for this reference
    only, they are called with dtype float64 (everything else runs unchanged on float64 inputs).
    """
    import jax
    import jax.numpy as jnp

    from diffenc_diffusers import DiffEncObjective

    draws_normal, draws_uniform = list(record.normal), list(record.uniform)
    batch = images.shape[0]
    conditioning_64 = jnp.asarray(conditioning, jnp.float64)
    jax.config.update("jax_enable_x64", True)
    try:
        with contextlib.ExitStack() as patches:
            for module in OFFICIAL_MODULES:
                for function_name in ("dot_product_attention", "get_timestep_embedding"):
                    if hasattr(module, function_name):
                        wide = functools.partial(getattr(module, function_name), dtype=jnp.float64)
                        patches.enter_context(mock.patch.object(module, function_name, wide))
            patches.enter_context(record.replaying(draws_normal, draws_uniform))
            variables_64 = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), variables)
            if kind == "diffenc":
                t_64 = np.asarray(t, np.float64)
                output = model.apply(variables_64, images, conditioning_64, deterministic=True,
                                     ts=jnp.asarray(t_64), rngs={"sample": key})
            else:
                output = model.apply(variables_64, images, conditioning_64, deterministic=True, rngs={"sample": key})
                t0 = jnp.asarray(draws_uniform[0], jnp.float64)
                t_64 = np.asarray(jnp.mod(t0 + jnp.arange(0.0, 1.0, step=1.0 / batch), 1.0))
            official = {term: np.asarray(getattr(output, term), np.float64).reshape(batch)
                        for term in ("loss_recon", "loss_klz", "loss_diff")}
    finally:
        jax.config.update("jax_enable_x64", False)
    pipe_64 = copy.deepcopy(pipe).to(torch.float64)
    objective = DiffEncObjective(pipe_64.unet, pipe_64.scheduler, pipe_64.encoder)
    eps_0, eps = draws_normal
    with torch.no_grad():
        out = objective(nhwc_to_nchw(images), t=torch.from_numpy(t_64), noise=nhwc_to_nchw(eps).double(),
                        recon_noise=nhwc_to_nchw(eps_0).double())
    nats_per_bpd = math.prod(IMAGE_SHAPE) * math.log(2.0)
    ours = {term: getattr(out, term).double().numpy() * nats_per_bpd for term in official}
    return official, ours


def record_trees(official, args) -> None:
    """Official parameter trees (names, shapes, count) of every released DiffEnc model config (with the image
    shape of its dataset), the VDM CIFAR-10 config, and the small configs used above."""
    import jax
    import jax.numpy as jnp

    trees = {}
    config_dir = args.diffenc / "config"
    shapes = {"cifar10": (32, 32, 3), "imagenet32": (32, 32, 3), "mnist": (28, 28, 1)}
    for path in sorted(config_dir.glob("config_model_*.json")):
        dataset = "imagenet32" if "ImageNet" in path.name else "cifar10"
        for size in ("paper", "small"):
            raw, config = diffenc_config(official, config_dir, path.name, size)
            if config.ddpm_type not in official["classes"]:
                continue
            shape = shapes[dataset]
            model = official["classes"][config.ddpm_type](config, shape)
            images = jnp.zeros((2, *shape), jnp.uint8)
            variables = jax.eval_shape(lambda m=model, x=images: m.init(
                {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)},
                images=x, conditioning=jnp.zeros((2,))))
            tree = flat_shapes(variables["params"])
            trees[f"{path.name}:{size}"] = {
                "model_config": raw,
                "dataset_name": f"{dataset}_unconditional",
                "count": int(sum(math.prod(s) for s in tree.values())),
                "params": tree,
            }
    for size in ("paper", "small"):
        model_config = dict(VDM_CIFAR10_MODEL, **(SMALL_VDM if size == "small" else {}))
        model = official["model_vdm"].VDM(official["model_vdm"].VDMConfig(**model_config))
        variables = jax.eval_shape(lambda m=model: m.init(
            {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)},
            images=jnp.zeros((2, 32, 32, 3), jnp.uint8), conditioning=jnp.zeros((2,))))
        tree = flat_shapes(variables["params"])
        trees[f"vdm-cifar10:{size}"] = {
            "vdm_config": {"data": {"dataset": "cifar10"}, "model": model_config},
            "count": int(sum(math.prod(s) for s in tree.values())),
            "params": tree,
        }
    args.record_trees.write_text(json.dumps(trees, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {len(trees)} official parameter trees to {args.record_trees}")


def markdown_table(results: list[dict]) -> str:
    lines = ["| model | size | quantity | relative difference |", "| --- | --- | --- | --- |"]
    for result in results:
        for quantity, value in result["quantities"].items():
            lines.append(f"| {result['model']} | {result['size']} | {quantity} | {value:.2e} |")
    lines += ["", "| model | size | float64 reference | relative difference |", "| --- | --- | --- | --- |"]
    for result in results:
        for quantity, value in result["float64 references"].items():
            lines.append(f"| {result['model']} | {result['size']} | {quantity} | {value:.2e} |")
    lines += ["", "| model | size | official parameters | converted | inert (conditioning row) | seconds |",
              "| --- | --- | --- | --- | --- | --- |"]
    for result in results:
        lines.append(
            f"| {result['model']} | {result['size']} | {result['official parameters']:,} | "
            f"{result['converted parameters']:,} | {result['inert (conditioning row)']:,} | {result['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffenc", type=Path, required=True, help="checkout of bemigini/DiffEnc")
    parser.add_argument("--vdm", type=Path, required=True, help="checkout of google-research/vdm (its folder)")
    parser.add_argument("--sizes", nargs="+", choices=["small", "paper"], default=["small"])
    parser.add_argument("--models", nargs="+", default=[*DIFFENC_CONFIGS, "VDM (google-research/vdm)"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write the results as a markdown table")
    parser.add_argument("--record-trees", type=Path, help="write the official parameter trees and exit")
    args = parser.parse_args()
    official = import_official(args.diffenc.resolve(), args.vdm.resolve())
    if args.record_trees:
        record_trees(official, args)
        return 0
    torch.set_num_threads(1)
    record = RandomRecorder()
    results = []
    for size in args.sizes:
        for name in args.models:
            kind = "diffenc" if name in DIFFENC_CONFIGS else "vdm"
            result = check_model(official, name, kind, size, args, record)
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    worst = max(v for r in results for k, v in r["quantities"].items() if "decod" not in k)
    decoded = max(v for r in results for k, v in r["quantities"].items() if "fraction" in k)
    print(f"worst relative difference: {worst:.2e} (target 1e-5); largest fraction of decoded values differing: "
          f"{decoded:.2e}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
