"""scripts/gpu_check.sh --dry-run: the GPU check's every section runs on CPU at tiny sizes and writes its tables.

The real check runs on a GPU (see benchmarks/README.md); this dry run is what CI can verify: the commands, their
arguments and the outputs the coordinator's one GPU call relies on (a file count the device tool returns).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": "python"}
    env.pop("OUT", None)
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def test_outputs_fit_what_the_device_tool_returns(dry_run):
    files = [path for path in dry_run.rglob("*") if path.is_file()]
    assert len(files) <= 8 and all(path.parent == dry_run for path in files)
    assert {"summary.md", "gpu_check.log", "train_eval.json", "compare.json", "gpu_explore.json"} <= {
        path.name for path in files
    }


def test_training_and_evaluation_section(dry_run):
    (row,) = json.loads((dry_run / "train_eval.json").read_text())
    assert row["preset"] == "digits-diffenc-trainable-classcond"
    assert row["train_exit"] == "0" and row["pipeline_saved"] == "yes" and row["evaluate_exit"] == "0"
    assert float(row["test_bpd"]) > 0 and row["sample_grid"] == "yes"
    summary = (dry_run / "summary.md").read_text()
    assert "|digits-diffenc-trainable-classcond|0|yes|" in summary


def test_device_comparison_section(dry_run):
    compare = json.loads((dry_run / "compare.json").read_text())
    assert compare["passed"] and compare["device"] == "cpu"
    quantities = {row["quantity"] for row in compare["rows"]}
    assert {"objective continuous bpd", "objective T=1000 loss_diff", "pipe.bits_per_dim bpd"} <= quantities
    assert {"scheduler.step eta=1", "scheduler.step eta=0"} <= quantities


def test_benchmark_section(dry_run):
    payload = json.loads((dry_run / "gpu_explore.json").read_text())
    records = {record["variant"]: record for record in payload["records"]}
    assert all(record["status"] == "ok" for record in records.values()), records
    assert records["step/bf16w"]["sampling_1000_steps_s"] > 0 and records["likelihood/bf16w"]["images_per_s"] > 0
    summary = (dry_run / "summary.md").read_text()
    assert "## (c) Paper-size benchmarks" in summary and "1000-step ancestral sampling" in summary
