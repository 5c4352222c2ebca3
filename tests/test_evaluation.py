"""diffenc-evaluate: the results JSON (every field, and the numbers it reports), sample grid and encoder figure."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffenc_diffusers import DiffEncEncoderModel, DiffEncPipeline, VDMScheduler, VDMUNetModel, evaluation
from diffenc_diffusers.data import load_builtin_dataset, load_digits_uint8

REPO_ROOT = Path(__file__).resolve().parents[1]
SUMMARY_FIELDS = {"bpd", "se_images", "se_repeats", "loss_recon", "loss_klz", "loss_diff", "num_images", "repeats"}
RESULT_FIELDS = SUMMARY_FIELDS | {"bpd_per_t", "bpd_per_t_mean", "bpd_per_t_num_images", "seconds"}


def tiny_pipeline(encoder_type: str = "trainable", size: int = 8) -> DiffEncPipeline:
    """An untrained size x size pipeline; the last layers are randomised so that the networks are not the
    identity."""
    torch.manual_seed(0)
    unet = VDMUNetModel(sample_size=size, in_channels=1, hidden_channels=16, num_layers=1, norm_num_groups=8)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    encoder = None
    if encoder_type == "trainable":
        encoder = DiffEncEncoderModel(
            sample_size=size, in_channels=1, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8
        )
        torch.nn.init.normal_(encoder.conv_out.weight, std=0.2)
    return DiffEncPipeline(unet=unet, scheduler=VDMScheduler(encoder_type=encoder_type), encoder=encoder)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("eval")
    tiny_pipeline().save_pretrained(folder / "pipe")
    output = evaluation.main(
        [
            *("--pipeline", str(folder / "pipe"), "--dataset", "digits", "--num_images", "24"),
            *("--num_timesteps", "5", "50", "--repeats", "2", "--batch_size", "12", "--seed", "3"),
            *("--t_grid_points", "4", "--t_grid_num_images", "8", "--output_json", str(folder / "eval.json")),
            *("--sample_grid", str(folder / "grid.png"), "--num_samples", "5", "--num_inference_steps", "3"),
            *("--encoder_figure", str(folder / "encoder.png"), "--encoder_figure_images", "2"),
            *("--encoder_figure_t", "0", "0.5", "1"),
        ]
    )
    return folder, output


def test_json_has_every_field(evaluated):
    folder, output = evaluated
    written = json.loads((folder / "eval.json").read_text())
    assert written == json.loads(json.dumps(output))
    assert {
        "pipeline", "encoder_type", "dataset", "split", "test_set", "num_images", "repeats", "seed", "seeds",
        "continuous", "discrete", "sample_grid", "sampling", "encoder_figure", "seconds",
    } <= set(written)  # fmt: skip
    assert written["num_images"] == 24 and written["repeats"] == 2 and len(written["seeds"]) == 2
    assert written["test_set"].startswith("the first 24 images of digits split 'test' (300 of 1797 images")
    assert set(written["discrete"]) == {"5", "50"}
    for result in [written["continuous"], *written["discrete"].values()]:
        assert set(result) >= RESULT_FIELDS
        assert result["num_images"] == 24 and result["bpd_per_t_num_images"] == 8
        assert result["bpd"] == pytest.approx(result["loss_recon"] + result["loss_klz"] + result["loss_diff"])
        assert result["se_images"] > 0 and result["se_repeats"] > 0
        assert [row["t"] for row in result["bpd_per_t"]] == [0.125, 0.375, 0.625, 0.875]
        assert all(row["loss_diff"] > 0 and row["se"] > 0 for row in result["bpd_per_t"])
    assert written["continuous"]["bpd"] != written["discrete"]["5"]["bpd"]


def test_reported_bpd_is_the_pipelines_likelihood(evaluated):
    """The JSON mean and standard errors are those of pipe.bits_per_dim with the listed seeds."""
    folder, output = evaluated
    pipe = DiffEncPipeline.from_pretrained(str(folder / "pipe"))
    images = load_digits_uint8("test")[:24]
    draws = []
    for seed in output["seeds"]:
        generator = torch.Generator().manual_seed(seed)
        draws.append(pipe.bits_per_dim(images, batch_size=12, generator=generator, show_progress=False).bpd)
    bpd = torch.stack(draws).double().numpy()
    continuous = output["continuous"]
    assert continuous["bpd"] == pytest.approx(bpd.mean(), rel=1e-6)
    assert continuous["se_images"] == pytest.approx(bpd.mean(0).std(ddof=1) / np.sqrt(24), rel=1e-6)
    assert continuous["se_repeats"] == pytest.approx(bpd.mean(1).std(ddof=1) / np.sqrt(2), rel=1e-6)


def test_mnist5k_evaluation_scores_its_test_split(tmp_path):
    tiny_pipeline(size=28).save_pretrained(tmp_path / "pipe")
    output = evaluation.main(
        [
            *("--pipeline", str(tmp_path / "pipe"), "--dataset", "mnist5k", "--num_images", "6", "--repeats", "2"),
            *("--batch_size", "6", "--seed", "1", "--t_grid_points", "2", "--t_grid_num_images", "2"),
            *("--output_json", str(tmp_path / "eval.json"), "--sample_grid", str(tmp_path / "grid.png")),
            *("--num_samples", "2", "--num_inference_steps", "2"),
        ]
    )
    assert output["test_set"].startswith("the first 6 images of mnist5k split 'test' (500 of 5000 images, seed 0)")
    pipe = DiffEncPipeline.from_pretrained(str(tmp_path / "pipe"))
    images = load_builtin_dataset("mnist5k", "test")[0][:6]
    draws = [
        pipe.bits_per_dim(images, batch_size=6, generator=torch.Generator().manual_seed(seed), show_progress=False).bpd
        for seed in output["seeds"]
    ]
    assert output["continuous"]["bpd"] == pytest.approx(torch.stack(draws).double().mean().item(), rel=1e-6)
    # 2 samples of 28x28 enlarged 2x, side by side with 1-pixel gaps.
    assert Image.open(tmp_path / "grid.png").size == (2 * 57 + 1, 57 + 1)


def test_bpd_per_t_is_the_diffusion_term_at_fixed_t():
    """In continuous time the diffusion term is an average over t ~ U(0, 1) of its value at t: on a fine
    grid the per-t curve's mean matches the sampled estimate."""
    pipe = tiny_pipeline("nontrainable")
    images = load_digits_uint8("test")[:16]
    curve = evaluation.diffusion_bpd_per_t(pipe, images, evaluation.t_grid(64), batch_size=16)
    sampled = evaluation.bits_per_dim_terms(pipe, images, batch_size=16, repeats=8)["loss_diff"].mean()
    grid_mean = np.mean([row["loss_diff"] for row in curve])
    assert grid_mean == pytest.approx(sampled, rel=0.05)


def test_sample_grid_and_encoder_figure(evaluated):
    folder, output = evaluated
    grid = Image.open(folder / "grid.png")
    # 5 samples of 8x8 enlarged 4x, on a 3 x 2 grid with 1-pixel gaps.
    assert grid.size == (3 * 33 + 1, 2 * 33 + 1) and grid.mode == "L"
    assert output["sampling"]["num_samples"] == 5
    assert output["encoder_figure"] == str(folder / "encoder.png")
    figure = Image.open(folder / "encoder.png")
    assert figure.size[0] > figure.size[1] > 100


def test_encoder_figure_needs_an_encoding(tmp_path):
    images = load_digits_uint8("test")[:2]
    assert evaluation.save_encoder_figure(tiny_pipeline("none"), images, [0.5], tmp_path / "vdm.png") is None
    assert not (tmp_path / "vdm.png").exists()
    path = evaluation.save_encoder_figure(tiny_pipeline("nontrainable"), images, [0.0, 1.0], tmp_path / "nt.png")
    assert path.is_file()


def test_bad_arguments_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="--repeats"):
        evaluation.main(["--pipeline", "x", "--dataset", "digits", "--output_json", "o.json", "--repeats", "0"])
    with pytest.raises(ValueError, match="--encoder_figure_t"):
        evaluation.main(
            ["--pipeline", "x", "--dataset", "digits", "--output_json", "o.json", "--encoder_figure_t", "2"]
        )
    with pytest.raises(SystemExit):
        evaluation.main(["--pipeline", "x", "--output_json", "o.json"])
    with pytest.raises(FileNotFoundError, match="neither"):
        evaluation.main(["--pipeline", str(tmp_path / "none"), "--dataset", "digits", "--output_json", "o.json"])


def test_console_script_exits_zero(evaluated, tmp_path):
    """The console command exits 0 after a successful run: it is run here as pip's console-script wrapper runs
    it, `sys.exit(entry_point())`, with the entry point named in setup.cfg."""
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    scripts = config["options.entry_points"]["console_scripts"].strip().splitlines()
    entry = dict(line.replace(" ", "").split("=") for line in scripts)["diffenc-evaluate"]
    module, function = entry.split(":")
    folder, _ = evaluated
    args = ["--pipeline", str(folder / "pipe"), "--dataset", "digits", "--num_images", "4", "--t_grid_points", "2"]
    args += ["--t_grid_num_images", "4", "--output_json", str(tmp_path / "cli.json")]
    wrapper = f"import sys; from {module} import {function}; sys.argv[0] = 'diffenc-evaluate'; sys.exit({function}())"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *args], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "cli.json").read_text())["num_images"] == 4
