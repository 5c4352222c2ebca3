"""Tests of the presets in diffenc_diffusers/presets/: every preset builds, and its parameter counts are those of its
README."""

import json
import re

import pytest
import torch

from diffenc_diffusers import DiffEncEncoderModel, DiffEncPipeline
from diffenc_diffusers.presets import PRESETS_DIR, preset_names, resolve_preset

PRESETS = {
    "cifar10-diffenc-32-4": ("trainable", "uoft-cs/cifar10", (3, 32, 32)),
    "cifar10-vdmv-32": ("none", "uoft-cs/cifar10", (3, 32, 32)),
    "mnist-diffenc": ("trainable", "ylecun/mnist", (1, 28, 28)),
    "digits-vdm": ("none", "digits", (1, 8, 8)),
    "digits-vdm-monotone": ("none", "digits", (1, 8, 8)),
    "digits-diffenc-nontrainable": ("nontrainable", "digits", (1, 8, 8)),
    "digits-diffenc-trainable": ("trainable", "digits", (1, 8, 8)),
    "mnist5k-vdm": ("none", "mnist5k", (1, 28, 28)),
    "mnist5k-diffenc-nontrainable": ("nontrainable", "mnist5k", (1, 28, 28)),
    "mnist5k-diffenc-trainable": ("trainable", "mnist5k", (1, 28, 28)),
    "digits-diffenc-trainable-classcond": ("trainable", "digits", (1, 8, 8)),
    "mnist5k-diffenc-trainable-classcond": ("trainable", "mnist5k", (1, 28, 28)),
}
TRAINING_KEYS = {
    "dataset", "resolution", "train_batch_size", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "lr_warmup_steps", "max_train_steps", "ema_decay", "num_timesteps", "max_grad_norm",
    "gradient_accumulation_steps", "checkpointing_steps", "eval_batch_size", "random_flip",
}  # fmt: skip
MODULES = {
    "unet": ["diffenc_diffusers.models.unet_vdm", "VDMUNetModel"],
    "scheduler": ["diffenc_diffusers.scheduling_vdm", "VDMScheduler"],
    "encoder": ["diffenc_diffusers.models.encoder_diffenc", "DiffEncEncoderModel"],
}


def readme_counts(name: str) -> dict[str, int]:
    """The parameter table of a preset's README: {"denoiser": n, "encoder": n, "total": n}."""
    text = (PRESETS_DIR / name / "README.md").read_text()
    rows = re.findall(r"^\| (denoiser|encoder|total)\b[^|]*\| *([\d,]+) *\|$", text, flags=re.MULTILINE)
    return {row: int(count.replace(",", "")) for row, count in rows}


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(parameter.numel() for parameter in module.parameters())


def test_every_preset_is_listed():
    assert preset_names() == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_with_the_parameter_counts_of_its_readme(name):
    encoder_type, dataset, shape = PRESETS[name]
    torch.manual_seed(0)
    pipe = DiffEncPipeline.from_preset(name)
    counts = readme_counts(name)
    assert counts == {"denoiser": count(pipe.unet), "encoder": count(pipe.encoder), "total": count(pipe.unet) +
                      count(pipe.encoder)}  # fmt: skip
    assert pipe.scheduler.config.encoder_type == encoder_type
    assert (pipe.encoder is not None) == (encoder_type == "trainable")
    assert pipe.image_shape == shape
    if pipe.encoder is not None:
        assert shape[1] % pipe.encoder.downsample_factor == 0
        assert pipe.encoder.config.sample_size == shape[1]

    folder = PRESETS_DIR / name
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == "DiffEncPipeline"
    for component in ("unet", "scheduler", "encoder"):
        recorded = model_index.get(component)
        assert recorded == (MODULES[component] if getattr(pipe, component) is not None else [None, None])
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    training = json.loads((folder / "training_config.json").read_text())
    class_conditional = pipe.unet.config.num_class_embeds is not None
    assert set(training) == TRAINING_KEYS | ({"class_dropout_prob"} if class_conditional else set())
    assert training["dataset"] == dataset and training["resolution"] == shape[1]
    assert "arxiv.org/abs/2310.19789" in (folder / "README.md").read_text()


def test_paper_presets_follow_the_official_settings():
    for name in ("cifar10-diffenc-32-4", "cifar10-vdmv-32", "mnist-diffenc"):
        folder = PRESETS_DIR / name
        training = json.loads((folder / "training_config.json").read_text())
        assert training["learning_rate"] == 2e-4 and training["train_batch_size"] == 128
        assert (training["adam_beta1"], training["adam_beta2"], training["adam_weight_decay"]) == (0.9, 0.99, 0.01)
        assert training["ema_decay"] == 0.9999 and training["num_timesteps"] is None
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert (scheduler["gamma_min"], scheduler["gamma_max"]) == (-13.3, 5.0)
        assert scheduler["schedule"] == "fixed_linear" and scheduler["prediction_type"] == "v_prediction"
        unet = json.loads((folder / "unet" / "config.json").read_text())
        assert unet["hidden_channels"] == 128 and unet["dropout"] == 0.1
        if name != "cifar10-vdmv-32":
            # The official unet_mult_res encoder: Flax's default 32 groups, the config's 16 in the output norm.
            encoder = DiffEncEncoderModel.from_config(json.loads((folder / "encoder" / "config.json").read_text()))
            groups = [module.num_groups for module in encoder.modules() if isinstance(module, torch.nn.GroupNorm)]
            assert encoder.norm_out.num_groups == 16 and groups.count(16) == 1 and set(groups) == {16, 32}
    assert json.loads((PRESETS_DIR / "cifar10-diffenc-32-4" / "unet" / "config.json").read_text())["num_layers"] == 32


def test_cpu_presets_share_the_denoiser_and_the_trainable_encoder_has_the_papers_size_ratio():
    """Within a CPU family the three kinds differ only in the encoder; the mnist5k encoder is sized like the
    paper's (DiffEnc-32-4: 2,743,875 encoder / 30,577,667 denoiser parameters, 9.0%)."""
    for family in ("digits", "mnist5k"):
        folders = [PRESETS_DIR / f"{family}-{kind}" for kind in ("vdm", "diffenc-nontrainable", "diffenc-trainable")]
        unets = [json.loads((folder / "unet" / "config.json").read_text()) for folder in folders]
        trainings = [json.loads((folder / "training_config.json").read_text()) for folder in folders]
        assert unets[0] == unets[1] == unets[2] and trainings[0] == trainings[1] == trainings[2]
    counts = readme_counts("mnist5k-diffenc-trainable")
    assert counts["encoder"] / counts["denoiser"] == pytest.approx(2_743_875 / 30_577_667, abs=0.01)


def test_from_preset_by_path_and_digits_preset_samples_and_scores():
    by_path = DiffEncPipeline.from_preset(PRESETS_DIR / "digits-diffenc-trainable")
    assert by_path.name_or_path == str(PRESETS_DIR / "digits-diffenc-trainable")
    by_path.set_progress_bar_config(disable=True)
    images = by_path(batch_size=2, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8)
    digits = (images * 255).round().to(torch.uint8)
    result = by_path.bits_per_dim(digits, show_progress=False)
    assert result.bpd.shape == (2,) and torch.isfinite(result.bpd).all()


def test_unknown_preset_lists_the_available_ones(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"'cifar100' is neither a preset folder nor a preset name; available "
        r"presets: \['cifar10-diffenc-32-4'",
    ):
        DiffEncPipeline.from_preset("cifar100")
    assert resolve_preset("digits-vdm") == PRESETS_DIR / "digits-vdm"
    (tmp_path / "model_index.json").write_text((PRESETS_DIR / "digits-vdm" / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match="lists the component 'scheduler' but has no scheduler/ folder"):
        DiffEncPipeline.from_preset(tmp_path)


def test_a_model_index_that_is_not_an_object_is_refused_by_name(tmp_path):
    """A model_index.json holding a JSON list gets a message naming the file and what it must hold (today an
    AttributeError from inside the reader), for from_preset and from_pretrained alike."""
    import shutil

    folder = tmp_path / "preset"
    shutil.copytree(PRESETS_DIR / "digits-vdm", folder)
    (folder / "model_index.json").write_text('["DiffEncPipeline", "unet"]')
    expected = r"model_index.json holds a JSON list; a model_index.json is a JSON object"
    with pytest.raises(ValueError, match=expected):
        DiffEncPipeline.from_preset(folder)
    with pytest.raises(ValueError, match=expected):
        DiffEncPipeline.from_pretrained(folder)


def test_every_preset_file_is_package_data():
    """setup.cfg's package_data globs cover every file of every preset, so an installed wheel has them all (the
    wheel itself is built and used in tests/test_wheel.py)."""
    import configparser
    from fnmatch import fnmatch

    config = configparser.ConfigParser()
    config.read(PRESETS_DIR.parents[1] / "setup.cfg")
    patterns = config["options.package_data"]["diffenc_diffusers.presets"].split()
    files = [path.relative_to(PRESETS_DIR).as_posix() for path in PRESETS_DIR.rglob("*") if path.is_file()]
    data = [name for name in files if not name.endswith((".py", ".pyc"))]
    assert {f"{name}/model_index.json" for name in PRESETS} <= set(data)
    unmatched = [name for name in data if not any(fnmatch(name, pattern) and name.count("/") == pattern.count("/")
                                                  for pattern in patterns)]  # fmt: skip
    assert unmatched == []
