"""benchmarks/: every script runs (tiny models, one round) and writes the numbers its tables show.

No timing is asserted: only that each script measures what it says, and the checks that are exact (the bf16
bits/dim comparison and the identical work of DiffEnc and VDM sampling).
"""

from __future__ import annotations

import json
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
