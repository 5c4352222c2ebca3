"""diffenc-convert without JAX: official parameter trees, msgpack checkpoints written here, errors.

tests/fixtures/official_param_trees.json holds the parameter trees (names and shapes, no values) that the
official code builds for every released DiffEnc model config, google-research/vdm's CIFAR-10 config, and small
versions of them; it was written by ``scripts/verify_official.py --record-trees`` from the official code. The
numerical agreement with the official code is checked by that script (docs/conversion.md), not here.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch

pytest.importorskip("msgpack")

from diffenc_diffusers import DiffEncPipeline, hub
from diffenc_diffusers.conversion import (
    cli,
    convert_official_checkpoint,
    diffenc_model,
    load_flax_msgpack,
    save_converted,
    save_flax_msgpack,
    vdm_model,
)
from diffenc_diffusers.conversion.official import count_parameters

TREES = json.loads((Path(__file__).parent / "fixtures" / "official_param_trees.json").read_text())
SMALL = {
    "VDM2_V": "config_model_VDM2_V_fixed_-13_3_5_0_unet_32_simple.json:small",
    "S4V_NT": "config_model_S4V_NT_fixed_-13_3_5_0_unet_32_nt.json:small",
    "S3VA mult_res_4": "config_model_S3VA_fixed_-13_3_5_0_unet_32_unet_mult_res_4_m1_to_1.json:small",
    "S3VA unet_2 train_scalar": "config_model_S3VA_train_scalar_-13_3_5_0_unet_8_unet_2_m1_to_1.json:small",
    "VDM": "vdm-cifar10:small",
}


def official_model(name: str):
    entry = TREES[name]
    if "vdm_config" in entry:
        return vdm_model(entry["vdm_config"])
    return diffenc_model(entry["model_config"], {"dataset_name": entry["dataset_name"]})


def write_configs(tmp_path: Path, name: str) -> tuple[Path, Path | None]:
    entry = TREES[name]
    if "vdm_config" in entry:
        path = tmp_path / "vdm_config.json"
        path.write_text(json.dumps(entry["vdm_config"]))
        return path, None
    model_path, train_path = tmp_path / "config_model.json", tmp_path / "config_train.json"
    model_path.write_text(json.dumps(entry["model_config"]))
    train_path.write_text(json.dumps({"dataset_name": entry["dataset_name"], "seed": 1}))
    return model_path, train_path


def nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def random_params(name: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {path: rng.standard_normal(shape).astype(np.float32) for path, shape in TREES[name]["params"].items()}
    if "gamma/b" in params:
        params["gamma/b"] = np.array([-13.1], np.float32)
        params["gamma/w"] = np.array([-18.0], np.float32)  # the official schedule uses |w|
    return params


def write_checkpoint(path: Path, ema: dict[str, np.ndarray], raw: dict[str, np.ndarray] | None = None) -> Path:
    """A checkpoint laid out as flax.serialization.to_bytes writes the official train state."""
    raw = raw if raw is not None else ema
    state = {
        "step": np.int32(4000),
        "params": nest(raw),
        "ema_params": nest(ema),
        "opt_state": {"0": {"count": np.int32(4000), "mu": nest(raw), "nu": nest(raw)}, "1": {}},
    }
    save_flax_msgpack(path, state)
    return path


@pytest.mark.parametrize("name", sorted(TREES))
def test_expected_tree_and_count_equal_the_official_ones(name):
    model = official_model(name)
    recorded = {path: tuple(shape) for path, shape in TREES[name]["params"].items()}
    assert model.expected_tree() == recorded
    assert count_parameters(model.expected_tree()) == TREES[name]["count"]


@pytest.mark.parametrize(
    "name",
    [
        "config_model_VDM2_V_fixed_-13_3_5_0_unet_32_simple.json:paper",
        "config_model_S4V_NT_fixed_-13_3_5_0_unet_32_nt.json:paper",
        "config_model_S3VA_fixed_-13_3_5_0_unet_32_unet_mult_res_4_m1_to_1.json:paper",
        "config_model_S3VA_fixed_-13_3_5_0_unet_8_unet_2_m1_to_1.json:paper",
        "vdm-cifar10:paper",
    ],
)
def test_converted_paper_models_have_the_official_parameter_count(name):
    model = official_model(name)
    with torch.device("meta"):
        from diffenc_diffusers import DiffEncEncoderModel, VDMUNetModel

        ours = sum(p.numel() for p in VDMUNetModel(**model.unet_config).parameters())
        if model.encoder_config is not None:
            ours += sum(p.numel() for p in DiffEncEncoderModel(**model.encoder_config).parameters())
    schedule = 2 if model.learned_schedule else 0
    # Every official parameter is converted except the inert conditioning rows, which are reported.
    assert ours + schedule + model.inert_parameter_count() == TREES[name]["count"]
    assert model.inert_parameter_count() == model.unet_config["hidden_channels"] * 4 + (
        model.encoder_config["block_out_channels"][0] * 4 if model.encoder_config else 0
    )


def test_paper_diffenc_32_4_encoder_layout():
    model = official_model("config_model_S3VA_fixed_-13_3_5_0_unet_32_unet_mult_res_4_m1_to_1.json:paper")
    assert model.encoder_config == {
        "sample_size": 32,
        "in_channels": 3,
        "block_out_channels": [64, 128],
        "layers_per_block": 2,
        "dropout": 0.1,
        "norm_num_groups": 32,
        "gamma_min": -13.3,
        "gamma_max": 5.0,
        "norm_out_num_groups": 16,
        "mid_block_norm_num_groups": 32,
    }
    unet_2 = official_model("config_model_S3VA_fixed_-13_3_5_0_unet_8_unet_2_m1_to_1.json:paper")
    assert unet_2.encoder_config["layers_per_block"] == 1 and unet_2.encoder_config["mid_block_norm_num_groups"] == 16
    imagenet = official_model("config_model_S3VA_fixed_-13_3_5_0_unet_32_unet_mult_res_8_m1_to_1_ImageNet.json:paper")
    assert imagenet.encoder_config["block_out_channels"] == [64, 128]
    assert imagenet.encoder_config["layers_per_block"] == 4


@pytest.mark.parametrize("label", sorted(SMALL))
def test_small_checkpoint_converts_with_the_official_layout(label, tmp_path):
    name = SMALL[label]
    ema, raw = random_params(name, 0), random_params(name, 1)
    checkpoint = write_checkpoint(tmp_path / "official_checkpoint_4000", ema, raw)
    config, train_config = write_configs(tmp_path, name)
    result = convert_official_checkpoint(checkpoint, config, train_config)
    pipe = result.pipeline
    assert result.step == 4000 and result.params == "ema"
    assert result.official_parameter_count == TREES[name]["count"]
    assert result.converted_parameter_count + result.model.inert_parameter_count() == TREES[name]["count"]

    top = "score_model/"
    blocks = "score_model/" if label == "VDM" else "score_model/VDMUNet_0/"
    embedding = "score_model/" if label == "VDM" else "score_model/TimeEmbedding_0/"
    unet = pipe.unet.state_dict()
    np.testing.assert_array_equal(unet["conv_in.weight"].numpy(), ema[f"{top}conv_in/kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(unet["norm_out.weight"].numpy(), ema[f"{top}GroupNorm_0/scale"])
    np.testing.assert_array_equal(
        unet["time_embedding.linear_1.weight"].numpy(), ema[f"{embedding}dense0/kernel"][:-1].T
    )
    np.testing.assert_array_equal(
        unet["up_blocks.0.conv_shortcut.weight"].numpy()[:, :, 0, 0], ema[f"{blocks}up.block_0/nin_shortcut/kernel"].T
    )
    np.testing.assert_array_equal(unet["mid_attention.to_q.weight"].numpy(), ema[f"{blocks}mid.attn_1/q/kernel"].T)
    np.testing.assert_array_equal(
        unet["down_blocks.1.cond_proj.weight"].numpy(), ema[f"{blocks}down.block_1/cond_proj/kernel"].T
    )

    scheduler = pipe.scheduler.config
    if result.model.learned_schedule:
        assert scheduler.schedule == "learned_linear"
        assert scheduler.gamma_min == pytest.approx(-13.1) and scheduler.gamma_max == pytest.approx(-13.1 + 18.0)
    else:
        assert scheduler.schedule == "fixed_linear" and (scheduler.gamma_min, scheduler.gamma_max) == (-13.3, 5.0)
    assert scheduler.prediction_type == ("epsilon" if label == "VDM" else "v_prediction")
    assert scheduler.encoder_type == {"S4V_NT": "nontrainable", "VDM2_V": "none", "VDM": "none"}.get(label, "trainable")

    if pipe.encoder is not None:
        encoder = pipe.encoder.state_dict()
        prefix = "encdec/inner_encoder/enc_model/"
        # Flax's transposed convolution does not flip its kernel; PyTorch's does.
        np.testing.assert_array_equal(
            encoder["up_blocks.0.upsample.weight"].numpy(),
            ema[f"{prefix}up_blocks_0/conv_trans/kernel"][::-1, ::-1].transpose(2, 3, 0, 1),
        )
        last = "up_0_resnet_block0" if "mult_res" in label else "up_0_resnet_block"
        levels = len(pipe.encoder.config.block_out_channels)
        np.testing.assert_array_equal(
            encoder[f"up_blocks.{levels - 1}.resnets.0.conv1.weight"].numpy(),
            ema[f"{prefix}up_blocks_{levels - 1}/{last}/conv1/kernel"].transpose(3, 2, 0, 1),
        )

    raw_pipe = convert_official_checkpoint(checkpoint, config, train_config, params="raw").pipeline
    np.testing.assert_array_equal(raw_pipe.unet.state_dict()["conv_out.bias"].numpy(), raw[f"{top}conv_out/bias"])

    z = torch.randn(2, *result.model.image_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe.unet(z, torch.tensor([-5.0, 2.0])).sample
    assert torch.isfinite(out).all() and out.shape == z.shape


def test_saved_folder_loads_and_its_card_names_source_and_license(tmp_path):
    name = SMALL["S3VA mult_res_4"]
    checkpoint = write_checkpoint(tmp_path / "official_checkpoint_4000", random_params(name, 0))
    config, train_config = write_configs(tmp_path, name)
    result = convert_official_checkpoint(checkpoint, config, train_config)
    folder = save_converted(result, tmp_path / "converted")
    loaded = DiffEncPipeline.from_pretrained(folder)
    for component in ("unet", "encoder"):
        for key, value in getattr(result.pipeline, component).state_dict().items():
            torch.testing.assert_close(getattr(loaded, component).state_dict()[key], value, rtol=0, atol=0)
    assert loaded.encoder.config.norm_out_num_groups == 16
    card = hub.ModelCard((folder / "README.md").read_text())
    assert card.data.license == "other" and card.data.license_link == "https://doi.org/10.11583/DTU.c.7065284.v1"
    assert "## Source of the weights" in card.text and "bemigini/DiffEnc" in card.text
    assert result.sha256 in card.text and "inert" in card.text and "dense0/kernel[-1, :]" in card.text


def test_cli_writes_the_folder_and_pushes_with_the_card(tmp_path, monkeypatch, capsys):
    name = SMALL["VDM"]
    write_checkpoint(tmp_path / "ckpt-7.flax", random_params(name, 0))
    config, _ = write_configs(tmp_path, name)
    uploads = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))

    def create_commit(repo_id, operations, **kwargs):
        files = {operation.path_in_repo: operation.path_or_fileobj for operation in operations}
        uploads.update(repo_id=repo_id, files=set(files), card=files["README.md"].decode())
        return "commit"

    monkeypatch.setattr(huggingface_hub, "create_commit", create_commit)
    out = tmp_path / "vdm-cifar10"
    code = cli(
        [
            str(tmp_path),
            "--config",
            str(config),
            "--output",
            str(out),
            "--push_to_hub",
            "org/vdm",
            "--license",
            "apache-2.0",
        ]
    )
    assert code == 0 and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert uploads["repo_id"] == "org/vdm" and "README.md" in uploads["files"]
    assert "license: apache-2.0" in uploads["card"] and "google-research/vdm" in uploads["card"]
    assert "ckpt-7.flax (step 4000" in uploads["card"]
    assert "not converted (inert" in capsys.readouterr().out


def test_builtin_vdm_config_describes_the_paper_model():
    from diffenc_diffusers.conversion import load_official_model

    model = load_official_model("vdm-cifar10")
    assert model.expected_tree() == {k: tuple(v) for k, v in TREES["vdm-cifar10:paper"]["params"].items()}


# ------------------------------------------------------------------------------------------ errors


@pytest.fixture
def small_checkpoint(tmp_path):
    name = SMALL["VDM2_V"]
    config, train_config = write_configs(tmp_path, name)
    return write_checkpoint(tmp_path / "official_checkpoint_1", random_params(name, 0)), config, train_config


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_checkpoint_is_a_clear_error(small_checkpoint, cut):
    checkpoint, config, train_config = small_checkpoint
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"not a readable flax msgpack checkpoint.*truncated or corrupted"):
        convert_official_checkpoint(checkpoint, config, train_config)


def test_corrupted_and_empty_files_are_clear_errors(small_checkpoint, tmp_path):
    _, config, train_config = small_checkpoint
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xc1" * 64)
    with pytest.raises(ValueError, match="not a readable flax msgpack checkpoint"):
        convert_official_checkpoint(garbage, config, train_config)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        convert_official_checkpoint(empty, config, train_config)
    not_a_map = tmp_path / "list"
    save_flax_msgpack(not_a_map, {"x": 1})
    not_a_map.write_bytes(b"\x93\x01\x02\x03")
    with pytest.raises(ValueError, match="not a map"):
        convert_official_checkpoint(not_a_map, config, train_config)
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        convert_official_checkpoint(tmp_path / "empty-folder-that-does-not-exist", config, train_config)


def test_orbax_folder_and_folder_without_checkpoint(tmp_path):
    from diffenc_diffusers.conversion.convert import find_checkpoint_file

    (tmp_path / "checkpoint_5").mkdir()
    with pytest.raises(IsADirectoryError, match="Orbax"):
        load_flax_msgpack(tmp_path / "checkpoint_5")
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        find_checkpoint_file(tmp_path / "checkpoint_5")


def test_wrong_model_lists_missing_and_unknown_parameters(small_checkpoint, tmp_path):
    checkpoint, _, _ = small_checkpoint
    config, train_config = write_configs(tmp_path, SMALL["S3VA mult_res_4"])
    with pytest.raises(ValueError) as error:
        convert_official_checkpoint(checkpoint, config, train_config)
    message = str(error.value)
    assert "do not match the official S3VA model" in message
    assert "missing (" in message and "encdec/inner_encoder/conv_in/kernel" in message

    s3va = write_checkpoint(tmp_path / "s3va_checkpoint_1", random_params(SMALL["S3VA mult_res_4"], 0))
    vdm_config, vdm_train = write_configs(tmp_path / "..", SMALL["VDM2_V"])
    with pytest.raises(ValueError, match=r"unknown \(\d+\): encdec/inner_encoder"):
        convert_official_checkpoint(s3va, vdm_config, vdm_train)


def test_mis_shaped_and_non_float32_parameters_are_listed(tmp_path):
    name = SMALL["VDM2_V"]
    params = random_params(name, 0)
    params["score_model/conv_in/kernel"] = params["score_model/conv_in/kernel"][:, :, :, :16]
    params["score_model/conv_out/bias"] = params["score_model/conv_out/bias"].astype(np.float16)
    checkpoint = write_checkpoint(tmp_path / "checkpoint_1", params)
    config, train_config = write_configs(tmp_path, name)
    with pytest.raises(ValueError) as error:
        convert_official_checkpoint(checkpoint, config, train_config)
    message = str(error.value)
    assert "wrong shape or dtype (2)" in message
    assert "score_model/conv_in/kernel: shape (3, 3, 15, 16), expected (3, 3, 15, 32)" in message
    assert "score_model/conv_out/bias: dtype float16 (float32 expected)" in message


def test_not_a_train_state_and_bad_params_choice(small_checkpoint, tmp_path):
    _, config, train_config = small_checkpoint
    bare = tmp_path / "bare"
    save_flax_msgpack(bare, nest(random_params(SMALL["VDM2_V"], 0)))
    with pytest.raises(ValueError, match=r"no 'ema_params' map.*top-level keys: \['score_model'\]"):
        convert_official_checkpoint(bare, config, train_config)
    with pytest.raises(ValueError, match="`params` must be one of \\['ema', 'raw'\\]; got 'best'"):
        convert_official_checkpoint(bare, config, train_config, params="best")


def test_configs_whose_conditioning_is_used_or_unsupported_are_refused(tmp_path):
    entry = TREES[SMALL["S3VA mult_res_4"]]
    with pytest.raises(ValueError, match=r"cifar10_conditional.*conditioning input is not fixed at 0"):
        diffenc_model(entry["model_config"], {"dataset_name": "cifar10_conditional"})
    changed = json.loads(json.dumps(entry["model_config"]))
    changed["encoder_config"]["id_at_zero"] = True
    with pytest.raises(ValueError, match=r"id_at_zero is True; only False is supported"):
        diffenc_model(changed, {"dataset_name": "cifar10_unconditional"})
    vdm = json.loads(json.dumps(TREES["vdm-cifar10:paper"]["vdm_config"]))
    vdm["data"]["dataset"] = "cifar10_aug"
    with pytest.raises(ValueError, match=r"cifar10_aug.*augmentation flag"):
        vdm_model(vdm)
    vdm["data"]["dataset"], vdm["model"]["gamma_type"] = "cifar10", "learnable_nnet"
    with pytest.raises(ValueError, match="learnable_nnet"):
        vdm_model(vdm)
    model_path, _ = write_configs(tmp_path, SMALL["VDM2_V"])
    from diffenc_diffusers.conversion import load_official_model

    with pytest.raises(ValueError, match="needs its training config"):
        load_official_model(model_path)


def test_msgpack_reader_decodes_chunked_arrays_and_scalars(tmp_path):
    chunked = {
        "__msgpack_chunked_array__": True,
        "shape": {"0": 2, "1": 3},
        "chunks": {"0": np.arange(4, dtype=np.float32), "1": np.arange(4, 6, dtype=np.float32)},
    }
    path = tmp_path / "tree"
    save_flax_msgpack(path, {"a": chunked, "b": np.float32(1.5), "c": {"0": np.int64(3)}, "d": "text"})
    tree = load_flax_msgpack(path)
    np.testing.assert_array_equal(tree["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert tree["b"] == np.float32(1.5) and tree["c"]["0"] == 3 and tree["d"] == "text"
    assert math.isclose(float(tree["b"]), 1.5)


# bemigini/DiffEnc's training pipeline: <output>/checkpoints/<date>_<model_name>_<step> (naming.get_file_prefix).
OFFICIAL_RUN = "2023-05-02_S3VA_fixed_-13_3_5_0_v_unet_32_unet_mult_res_4_cifar10_128_adamw_0002"


def test_folder_mode_finds_the_official_training_pipelines_checkpoints(tmp_path):
    from diffenc_diffusers.conversion.convert import find_checkpoint_file

    checkpoints = tmp_path / "output" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (4000, 12000, 8000):
        (checkpoints / f"{OFFICIAL_RUN}_{step}").write_bytes(b"x")
    (checkpoints / f"{OFFICIAL_RUN}_tmp").write_bytes(b"x")  # flax's temporary file while it writes
    newest = checkpoints / f"{OFFICIAL_RUN}_12000"
    assert find_checkpoint_file(tmp_path / "output") == newest
    assert find_checkpoint_file(checkpoints) == newest
    (checkpoints / "2023-06-01_VDM2_V_fixed_-13_3_5_0_v_unet_32_simple_cifar10_128_adamw_0002_500").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds the checkpoints of 2 runs"):
        find_checkpoint_file(checkpoints)


def test_orbax_checkpoint_folders_get_the_orbax_message(tmp_path):
    name = SMALL["VDM2_V"]
    config, train_config = write_configs(tmp_path, name)
    orbax = tmp_path / "output" / "checkpoints" / f"{OFFICIAL_RUN}_8000"
    orbax.mkdir(parents=True)
    (orbax / "_METADATA").write_text("{}")
    for path in (tmp_path / "output", orbax):
        with pytest.raises(IsADirectoryError, match="is an Orbax checkpoint folder, which is not supported"):
            convert_official_checkpoint(path, config, train_config)


def test_output_folder_is_written_whole_and_never_mixed(tmp_path, capsys):
    name = SMALL["VDM"]
    checkpoint = write_checkpoint(tmp_path / "ckpt-7.flax", random_params(name, 0))
    config, _ = write_configs(tmp_path, name)
    output = tmp_path / "converted"
    output.mkdir()
    (output / "old_experiment.safetensors").write_bytes(b"old")
    arguments = [str(checkpoint), "--config", str(config), "--output", str(output)]
    with pytest.raises(SystemExit) as exit_info:
        cli(arguments)
    assert exit_info.value.code == 2
    assert "is not empty; choose a new folder, or pass --overwrite" in capsys.readouterr().err
    assert sorted(path.name for path in output.iterdir()) == ["old_experiment.safetensors"]

    assert cli([*arguments, "--overwrite"]) == 0
    assert not (output / "old_experiment.safetensors").exists()
    assert (output / "model_index.json").is_file() and (output / "README.md").is_file()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
    result = convert_official_checkpoint(checkpoint, config)
    with pytest.raises(FileExistsError, match="is not empty"):
        save_converted(result, output)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (save_converted(result, empty) / "unet" / "config.json").is_file()
