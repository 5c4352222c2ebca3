"""diffenc-evaluate: the results JSON (every field, and the numbers it reports), sample grid and encoder figure."""

from __future__ import annotations

import configparser
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_
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


def conditional_pipeline(encoder_type: str = "trainable", null_class: bool = True) -> DiffEncPipeline:
    """An untrained 8x8 pipeline with 10 classes (the digits), every parameter perturbed so that the class
    changes the outputs."""
    classes = {"num_class_embeds": 10, "null_class": null_class}
    torch.manual_seed(0)
    unet = VDMUNetModel(sample_size=8, in_channels=1, hidden_channels=16, num_layers=1, norm_num_groups=8, **classes)
    encoder = None
    if encoder_type == "trainable":
        encoder = DiffEncEncoderModel(
            sample_size=8, in_channels=1, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, **classes
        )
        perturb_(encoder, 0.2, seed=2)
    pipe = DiffEncPipeline(
        unet=perturb_(unet, seed=1), scheduler=VDMScheduler(encoder_type=encoder_type), encoder=encoder
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
        "continuous", "discrete", "sample_grid", "sampling", "encoder_figure", "seconds", "class_conditional",
        "num_classes", "guidance_scale", "unconditional", "class_gain",
    } <= set(written)  # fmt: skip
    assert written["class_conditional"] is False and written["num_classes"] is None
    assert written["guidance_scale"] is None and written["unconditional"] is None and written["class_gain"] is None
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


def test_evaluate_reports_the_unconditional_elbo_and_the_class_gain_of_a_conditional_model():
    pipe = conditional_pipeline()
    images, labels = load_builtin_dataset("digits", "test")
    images, labels = images[:12], labels[:12]
    results = evaluation.evaluate(
        pipe, images, [5], repeats=2, batch_size=6, seed=1, t_grid_points=2, t_grid_num_images=4, class_labels=labels
    )
    assert set(results) == {"continuous", "discrete", "unconditional", "class_gain"}
    assert pipe.unet.training and pipe.encoder.training  # evaluated in eval mode (no dropout), modes restored
    assert set(results["unconditional"]) >= RESULT_FIELDS

    def draws(class_labels):
        return np.stack(
            [
                pipe.bits_per_dim(
                    images,
                    batch_size=6,
                    class_labels=class_labels,
                    generator=torch.Generator().manual_seed(evaluation.repeat_seed(1, repeat)),
                    show_progress=False,
                )
                .bpd.double()
                .numpy()
                for repeat in range(2)
            ]
        )

    conditional, unconditional = draws(labels), draws(torch.full((12,), 10))
    assert results["continuous"]["bpd"] == pytest.approx(conditional.mean(), rel=1e-6)
    assert results["unconditional"]["bpd"] == pytest.approx(unconditional.mean(), rel=1e-6)
    difference = conditional.mean(axis=0) - unconditional.mean(axis=0)
    assert np.abs(difference).min() > 1e-6  # the class matters to this model
    gain = results["class_gain"]
    assert gain["bpd_difference"] == pytest.approx(difference.mean(), rel=1e-6)
    assert gain["se"] == pytest.approx(difference.std(ddof=1) / np.sqrt(12), rel=1e-6)
    assert gain["max_gain"] == pytest.approx(math.log2(10) / 64)
    assert gain["num_images"] == 12 and gain["repeats"] == 2
    # The per-t curve of the conditional model uses the labels: it differs from the null label's.
    per_t = evaluation.diffusion_bpd_per_t(
        pipe, images[:4], [0.25, 0.75], batch_size=6, seed=1, class_labels=labels[:4]
    )
    assert [row["loss_diff"] for row in per_t] == [row["loss_diff"] for row in results["continuous"]["bpd_per_t"]]
    assert per_t != results["unconditional"]["bpd_per_t"]

    without_null = evaluation.evaluate(
        conditional_pipeline(null_class=False), images, [], batch_size=6, t_grid_points=1, class_labels=labels
    )
    assert set(without_null) == {"continuous", "discrete"}
    with pytest.raises(ValueError, match="class-conditional: pass `class_labels`"):
        evaluation.evaluate(pipe, images, [], batch_size=6, t_grid_points=1)


def test_conditional_evaluation_end_to_end(tmp_path):
    conditional_pipeline().save_pretrained(tmp_path / "pipe")
    output = evaluation.main(
        [
            *("--pipeline", str(tmp_path / "pipe"), "--dataset", "digits", "--num_images", "30", "--repeats", "2"),
            *("--num_timesteps", "5", "--batch_size", "15", "--t_grid_points", "2", "--t_grid_num_images", "6"),
            *("--output_json", str(tmp_path / "eval.json"), "--sample_grid", str(tmp_path / "grid.png")),
            *("--num_samples", "12", "--num_inference_steps", "2", "--guidance_scale", "2"),
            *("--encoder_figure", str(tmp_path / "encoder.png"), "--encoder_figure_t", "0.5", "1"),
        ]
    )
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written == json.loads(json.dumps(output))
    assert written["class_conditional"] is True and written["num_classes"] == 10
    assert written["guidance_scale"] == 2.0
    assert set(written["unconditional"]) >= RESULT_FIELDS and written["unconditional"]["num_images"] == 30
    assert set(written["class_gain"]) == {"bpd_difference", "se", "max_gain", "num_images", "repeats"}
    assert written["class_gain"]["bpd_difference"] == pytest.approx(
        written["continuous"]["bpd"] - written["unconditional"]["bpd"], rel=1e-6
    )
    # The conditional ELBO with the test labels, as bits_per_dim computes it.
    pipe = DiffEncPipeline.from_pretrained(str(tmp_path / "pipe"))
    images, labels = load_builtin_dataset("digits", "test")
    draws = [
        pipe.bits_per_dim(
            images[:30], batch_size=15, class_labels=labels[:30], generator=torch.Generator().manual_seed(seed),
            show_progress=False,
        ).bpd
        for seed in written["seeds"]
    ]  # fmt: skip
    assert written["continuous"]["bpd"] == pytest.approx(torch.stack(draws).double().mean().item(), rel=1e-6)
    # 12 samples of classes 0..9, 0, 1: one class per column, 10 columns of 8x8 enlarged 4x.
    assert Image.open(tmp_path / "grid.png").size == (10 * 33 + 1, 2 * 33 + 1)
    # The per-class figure: the first 30 test images hold 9 of the 10 classes, one row each; 1 + 2 t x 3 panels.
    figure = Image.open(tmp_path / "encoder.png")
    assert written["encoder_figure"] == str(tmp_path / "encoder.png")
    assert figure.size == (round(1.3 * 7 * 120), round(1.4 * 9 * 120))


def test_class_encoder_figure_draws_the_first_image_of_each_class(tmp_path, monkeypatch):
    pipe = conditional_pipeline()
    images, labels = load_builtin_dataset("digits", "test")
    images, labels = images[:30], labels[:30]
    drawn = {}
    draw = evaluation._draw_encoder_figure

    def record(objective, rows, row_labels, t_values, path, class_difference):
        drawn.update(images=rows, labels=row_labels, class_difference=class_difference)
        return draw(objective, rows, row_labels, t_values, path, class_difference)

    monkeypatch.setattr(evaluation, "_draw_encoder_figure", record)
    assert evaluation.save_class_encoder_figure(pipe, images, labels, [0.5], tmp_path / "c.png").is_file()
    first = [labels.tolist().index(c) for c in sorted(set(labels.tolist()))]
    assert drawn["labels"].tolist() == sorted(set(labels.tolist())) and 3 not in drawn["labels"].tolist()
    assert torch.equal(drawn["images"], images[first]) and drawn["class_difference"] is True
    no_null = conditional_pipeline(null_class=False)
    evaluation.save_class_encoder_figure(no_null, images, labels, [0.5], tmp_path / "n.png")
    assert drawn["class_difference"] is False
    nontrainable = conditional_pipeline("nontrainable")
    evaluation.save_class_encoder_figure(nontrainable, images, labels, [0.5], tmp_path / "t.png")
    assert drawn["class_difference"] is False and len(drawn["labels"]) == 9
    assert (
        evaluation.save_class_encoder_figure(conditional_pipeline("none"), images, labels, [0.5], tmp_path / "v.png")
        is None
    )

    evaluation.save_encoder_figure(pipe, images[:2], [0.5], tmp_path / "e.png", class_labels=labels[:2])
    assert drawn["labels"].tolist() == labels[:2].tolist() and drawn["class_difference"] is False
    with pytest.raises(ValueError, match=r"encoder is class-conditional \(num_class_embeds=10\): pass `class_labels`"):
        evaluation.save_encoder_figure(pipe, images[:2], [0.5], tmp_path / "e.png")
    with pytest.raises(ValueError, match="this pipeline's models are unconditional"):
        evaluation.save_encoder_figure(tiny_pipeline(), images[:2], [0.5], tmp_path / "e.png", class_labels=labels[:2])
    with pytest.raises(ValueError, match="needs a class-conditional pipeline"):
        evaluation.save_class_encoder_figure(tiny_pipeline(), images, labels, [0.5], tmp_path / "e.png")
    with pytest.raises(ValueError, match=r"labels 0 \.\. 9; got values in \[0, 10\]"):
        evaluation.save_class_encoder_figure(pipe, images[:2], torch.tensor([0, 10]), [0.5], tmp_path / "e.png")


def test_conditional_evaluation_errors(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "plain")
    conditional_pipeline(null_class=False).save_pretrained(tmp_path / "no_null")
    base = ["--dataset", "digits", "--output_json", str(tmp_path / "o.json"), "--num_images", "2"]
    with pytest.raises(ValueError, match=r"`--guidance_scale 2.0` needs .* this one is unconditional"):
        evaluation.main(["--pipeline", str(tmp_path / "plain"), *base, "--guidance_scale", "2"])
    with pytest.raises(ValueError, match=r"this one is class-conditional without a null class"):
        evaluation.main(["--pipeline", str(tmp_path / "no_null"), *base, "--guidance_scale", "2"])
    with pytest.raises(ValueError, match=r"`--guidance_scale` must be finite"):
        evaluation.main(["--pipeline", str(tmp_path / "no_null"), *base, "--guidance_scale", "nan"])


def test_conditional_pipeline_on_unlabelled_data_names_label_column(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(20):
        Image.fromarray(np.full((8, 8), index * 10, dtype=np.uint8), mode="L").save(folder / f"{index}.png")
    conditional_pipeline().save_pretrained(tmp_path / "pipe")
    args = ["--pipeline", str(tmp_path / "pipe"), "--train_data_dir", str(folder), "--output_json", "o.json"]
    with pytest.raises(
        ValueError, match=r"class-conditional \(num_class_embeds=10\) but .* has no class labels.*--label_column"
    ):
        evaluation.main([*args, "--cache_dir", str(tmp_path / "cache")])
