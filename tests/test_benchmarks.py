"""benchmarks/: every script runs (tiny models, one round) and writes the numbers its tables show.

No timing is asserted: only that each script measures what it says, and the checks that are exact (the bf16
bits/dim comparison and the identical work of DiffEnc and VDM sampling).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("benchmarks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "run.sh"), "smoke", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert {path.name for path in out.iterdir()} == {
        f"{name}.{suffix}" for name in ("training", "sampling", "likelihood") for suffix in ("json", "md")
    }
    return {name: json.loads((out / f"{name}.json").read_text()) for name in ("training", "sampling", "likelihood")}


def test_training_benchmark_measures_every_kind_and_precision(smoke_results):
    training = smoke_results["training"]
    rows = {(row["kind"], row["dtype"]): row for row in training["rows"]}
    assert set(rows) == {(kind, dtype) for kind in ("none", "nontrainable", "trainable") for dtype in ("fp32", "bf16")}
    for (kind, dtype), row in rows.items():
        assert row["cpu_median_ms"] > 0 and row["images_per_second"] > 0 and row["peak_memory_mib"] > 0
        assert (row["over_vdm"]["median"] == 1.0) == (kind == "none")
        assert (row["bf16_speedup"] is None) == (dtype == "fp32")
    # The trainable DiffEnc step also trains the encoder and runs it three times: it holds more memory.
    assert rows["trainable", "fp32"]["peak_memory_mib"] > rows["none", "fp32"]["peak_memory_mib"]
    assert {check["kind"] for check in training["bpd_check"]} == {"none", "nontrainable", "trainable"}
    for check in training["bpd_check"]:
        assert check["relative_difference"] < 0.01 and check["bpd_fp32"] != check["bpd_bf16"]


def test_sampling_benchmark_finds_diffenc_and_vdm_do_the_same_work(smoke_results):
    (record,) = smoke_results["sampling"]["results"]
    # 2 steps: only operations on the 3 schedule values of `set_timesteps` may differ.
    assert record["largest_differing_input_elements"] <= 3
    assert record["aten_operations"]["VDM"] > 100
    assert record["denoiser_share"]["median"] > 0
    assert set(record["images_per_second"]) == {"VDM", "DiffEnc"}


def test_likelihood_benchmark_reports_throughput(smoke_results):
    likelihood = smoke_results["likelihood"]
    assert likelihood["num_images"] == 4
    assert {row["kind"] for row in likelihood["rows"]} == {"none", "nontrainable", "trainable"}
    assert all(row["images_per_second"] > 0 for row in likelihood["rows"])


def run_gpu_explore(out: Path, *extra: str) -> dict:
    result = subprocess.run(
        ["python", str(REPO_ROOT / "benchmarks" / "gpu_explore.py"), "--out-dir", str(out), "--dry-run", *extra],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "gpu_explore.json").read_text())


def test_gpu_explore_dry_run_measures_every_variant(tmp_path):
    payload = run_gpu_explore(tmp_path)
    records = {record["variant"]: record for record in payload["records"]}
    assert (tmp_path / "gpu_explore.md").read_text().count("\n") == len(records) + 2
    assert payload["bf16_matmul_tflops"] > 0
    assert set(payload["flops_per_step"]) == {"vdm", "trainable", "forward"}
    # The encoder adds FLOPs to the step (its three evaluations, the tangent and their backward).
    assert payload["flops_per_step"]["trainable"] > payload["flops_per_step"]["vdm"]
    measured = [name for name, record in records.items() if record["status"] == "ok"]
    expected = {"vdm/bf16", "trainable/bf16", "vdm/fp32+tf32", "trainable/bf16+ckpt", "forward/bf16w", "step/bf16w"}
    assert expected | {"trainable/bf16+tangent=autograd", "likelihood/bf16w"} <= set(measured)
    for name in measured:
        record = records[name]
        assert record["ms"] > 0 and record["images_per_s"] > 0
        # Likelihood rows give throughput only (its FLOPs are not counted).
        assert name.startswith("likelihood/") or record["peak_fraction"] > 0
        if "/" in name and name.split("/")[0] in ("vdm", "trainable"):
            assert math.isfinite(record["loss"])
        if name.startswith("step/"):
            assert record["sampling_1000_steps_s"] == pytest.approx(record["ms"])
    # Same weights, batch and draws: the layout does not change the first step's loss beyond rounding.
    assert records["vdm/bf16+cl"]["loss"] == pytest.approx(records["vdm/bf16"]["loss"], rel=1e-2)
    assert records["vdm/fp32"]["loss"] == pytest.approx(records["vdm/fp32+tf32"]["loss"], rel=1e-5)
    for name, record in records.items():
        assert record["status"] == "ok" or record["status"].startswith(("skipped: dry run", "unsupported")), name


def test_gpu_explore_records_a_timeout_and_goes_on(tmp_path):
    payload = run_gpu_explore(
        tmp_path, "--variants", "vdm/fp32", "forward/autocast", "--variant-seconds", "0.0001"
    )
    assert [record["status"][:8] for record in payload["records"]] == ["timeout:", "timeout:"]
