"""Command-line arguments that cannot work fail before any work with a message naming the argument, the value and
what is accepted: the trainer's --output_dir, diffenc-evaluate's --dataset, --eta and output paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluation import tiny_pipeline
from test_training import train_diffenc

from diffenc_diffusers import evaluation

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "pipe"
    tiny_pipeline().save_pretrained(folder)
    return folder


def unwritable_paths(tmp_path: Path) -> list[tuple[Path, str]]:
    """Paths no process can create (a file as a parent folder; /proc accepts no new files, even for root)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    return [(a_file / "sub", "is a file, not a folder"), (Path("/proc/diffenc-test/sub"), "is not writable")]


def test_training_refuses_an_unwritable_output_dir_before_any_work(preset_for_cli, tmp_path):
    for path, message in unwritable_paths(tmp_path):
        with pytest.raises(ValueError, match=f"--output_dir '{path}' .*{message}"):
            train_diffenc.parse_args(["--preset", str(preset_for_cli), "--output_dir", str(path)])
    a_file = tmp_path / "a-file"
    with pytest.raises(ValueError, match=f"--output_dir '{a_file}' must be a folder, but it exists and is not"):
        train_diffenc.parse_args(["--preset", str(preset_for_cli), "--output_dir", str(a_file)])


@pytest.fixture(scope="module")
def preset_for_cli(tmp_path_factory) -> Path:
    from conftest import write_tiny_preset

    return write_tiny_preset(tmp_path_factory.mktemp("preset"))


def test_evaluate_checks_eta_and_output_paths_before_evaluating(pipeline_folder, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the arguments were checked")

    monkeypatch.setattr(evaluation, "load_pipeline", no_work)
    base = ["--pipeline", str(pipeline_folder), "--dataset", "digits", "--output_json"]
    with pytest.raises(ValueError, match=r"`--eta` must be in \[0, 1\] .*got 2.0"):
        evaluation.main([*base, str(tmp_path / "o.json"), "--eta", "2"])
    for path, message in unwritable_paths(tmp_path):
        with pytest.raises(ValueError, match=f"--output_json '{path}/o.json' .*{message}"):
            evaluation.main([*base, str(path / "o.json")])
        with pytest.raises(ValueError, match=f"--sample_grid '{path}/grid.png' .*{message}"):
            evaluation.main([*base, str(tmp_path / "o.json"), "--sample_grid", str(path / "grid.png")])
    with pytest.raises(ValueError, match=f"--output_json '{tmp_path}' must be a file"):
        evaluation.main([*base, str(tmp_path)])


def test_evaluate_names_an_unknown_dataset_offline(pipeline_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "diffenc_diffusers.evaluation", "--pipeline", str(pipeline_folder)]
    command += ["--dataset", "bogus", "--output_json", str(tmp_path / "o.json")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: --dataset 'bogus' could not be loaded"), result.stderr[-2000:]
    assert "Accepted: a built-in dataset (digits, mnist5k)" in last
    assert not (tmp_path / "o.json").exists()
