"""training/train_diffenc.py: a real (tiny) run, exact resume after SIGKILL, checkpoint safety, two processes,
Hub upload of exactly the pipeline files, and flags that fail before any training.

The runs use a tiny trainable-DiffEnc preset written by the tests (8x8 digits, a few thousand parameters) so
that each takes seconds on one CPU thread.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_conditional_preset, write_tiny_preset
from PIL import Image
from safetensors.torch import load_file
from test_lock import dead_pid, write_lock

from diffenc_diffusers import (
    DiffEncEncoderModel,
    DiffEncPipeline,
)
from diffenc_diffusers.training.checkpointing import (
    CHECKPOINT_MARKER,
    checkpoint_step,
    find_latest_checkpoint,
    is_complete_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "training" / "train_diffenc.py"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(REPO_ROOT),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}
# Short evaluation and sampling, so that the training steps dominate.
FAST = [
    "--num_inference_steps", "3",
    "--num_validation_images", "4",
    "--eval_num_images", "16",
    "--final_eval_num_images", "32",
    "--eval_batch_size", "32",
]  # fmt: skip


def load_script():
    spec = importlib.util.spec_from_file_location("train_diffenc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train_diffenc = load_script()


def train_command(preset: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--preset", str(preset), "--output_dir", str(output), *FAST, *extra]


def run(command: list[str], timeout: float = 300, returncode: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == returncode, result.stderr[-4000:]
    return result


def tensors_equal(first: Path, second: Path) -> bool:
    a, b = load_file(first), load_file(second)
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    return write_tiny_preset(tmp_path_factory.mktemp("preset"))


@pytest.fixture(scope="module")
def base_run(preset, tmp_path_factory) -> Path:
    """6 steps, checkpoints every 2 steps, at most 2 kept, a validation grid at step 3, dropout 0.1 (preset)."""
    output = tmp_path_factory.mktemp("base") / "run"
    run(train_command(preset, output, "--checkpoints_total_limit", "2", "--validation_steps", "3"))
    return output


def test_run_saves_a_loadable_ema_pipeline_with_outputs(base_run):
    pipe = DiffEncPipeline.from_pretrained(str(base_run))
    assert isinstance(pipe.encoder, DiffEncEncoderModel)
    # The saved weights are the EMA weights of the final checkpoint, learned schedule endpoints included.
    ema = load_file(base_run / "checkpoint-6" / "ema.safetensors")
    raw = load_file(base_run / "checkpoint-6" / "model.safetensors")
    unet_state = pipe.unet.state_dict()
    assert all(torch.equal(unet_state[name], ema[f"unet.{name}"]) for name in unet_state)
    assert not all(torch.equal(ema[name], raw[name]) for name in ema)
    assert pipe.scheduler.config.schedule == "learned_linear"
    assert pipe.scheduler.config.gamma_min == pytest.approx(float(ema["gamma_min"]))
    assert pipe.scheduler.config.gamma_max == pytest.approx(float(ema["gamma_max"]))
    assert float(ema["gamma_max"]) != 5.0

    result = json.loads((base_run / "test_bpd.json").read_text())
    continuous = result["continuous"]
    assert result["steps"] == 6 and continuous["num_images"] == 32
    assert continuous["bpd"] == pytest.approx(
        continuous["loss_recon"] + continuous["loss_klz"] + continuous["loss_diff"], rel=1e-6
    )
    assert f"{continuous['bpd']:.4f} bits/dim" in (base_run / "README.md").read_text()
    for grid in ("samples/step-0000003.png", "samples/final.png"):
        assert Image.open(base_run / grid).size[0] > 8


def test_run_logs_every_term_to_tensorboard(base_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [path.parent for path in (base_run / "logs").rglob("events.out.tfevents.*")]
    tags: set[str] = set()
    images: set[str] = set()
    for folder in events:
        accumulator = EventAccumulator(str(folder)).Reload()
        tags |= set(accumulator.Tags()["scalars"])
        images |= set(accumulator.Tags()["images"])
    for name in ("bpd", "loss_recon", "loss_klz", "loss_diff", "grad_norm", "lr", "images_per_second"):
        assert f"train/{name}" in tags
    assert {"test/bpd", "test/loss_diff"} <= tags
    assert "ema_samples" in images


def test_checkpoint_limit_holds(base_run):
    checkpoints = sorted(path.name for path in base_run.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-4", "checkpoint-6"]
    assert all(is_complete_checkpoint(base_run / name) for name in checkpoints)


def test_sigkill_then_resume_ends_with_the_same_parameters(preset, base_run, tmp_path):
    output = tmp_path / "killed"
    process = subprocess.Popen(
        train_command(preset, output, "--checkpoints_total_limit", "2", "--validation_steps", "3"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while find_latest_checkpoint(output) is None and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (output / "model_index.json").exists()
    killed_at = find_latest_checkpoint(output)
    assert checkpoint_step(killed_at) < 6

    # Leftovers of writes cut off mid-way: neither may be resumed from, and the temporary one is cleaned up.
    cut_off = output / "checkpoint-5"
    cut_off.mkdir()
    (cut_off / "model.safetensors").write_bytes(b"partial")
    temporary = output / f"checkpoint-5.tmp-{dead_pid()}"
    temporary.mkdir()
    (temporary / CHECKPOINT_MARKER).write_text(json.dumps({"step": 5, "files": {}}))

    run(train_command(preset, output, "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest"))
    assert not temporary.exists() and cut_off.exists()
    for name in (
        "checkpoint-6/model.safetensors",
        "checkpoint-6/ema.safetensors",
        "checkpoint-6/optimizer.safetensors",
    ):
        assert tensors_equal(base_run / name, output / name), name
    for name in ("unet", "encoder"):
        weights = f"{name}/diffusion_pytorch_model.safetensors"
        assert tensors_equal(base_run / weights, output / weights), weights
    assert json.loads((output / "checkpoint-6" / "training_state.json").read_text())["images_seen"] == 6 * 16


def test_corrupted_newest_checkpoint_is_skipped_and_the_run_redone_exactly(preset, base_run, tmp_path):
    """The issue's scenario: 16 bytes XORed in the middle of the largest tensor of the newest checkpoint's
    model.safetensors (size unchanged). ``latest`` skips it, says why, resumes the one before, and redoes the
    steps to bitwise the uncorrupted run's result; naming it explicitly is an error that names the file."""
    from test_checkpointing import xor_middle_of_largest_tensor

    output = tmp_path / "copied"
    for name in ("checkpoint-4", "checkpoint-6"):
        shutil.copytree(base_run / name, output / name)
    xor_middle_of_largest_tensor(output / "checkpoint-6" / "model.safetensors")
    explicit = ["--resume_from_checkpoint", str(output / "checkpoint-6")]
    with pytest.raises(ValueError, match=r"checkpoint-6/model.safetensors does not match its sha256") as error:
        train_diffenc.main(["--preset", str(preset), "--output_dir", str(output), *explicit])
    assert "latest" not in str(error.value)

    result = run(train_command(preset, output, "--resume_from_checkpoint", "latest", "--validation_steps", "3"))
    assert "Skipped checkpoint-6, which cannot be resumed" in result.stderr
    assert "model.safetensors does not match its sha256 checksum" in result.stderr
    assert "Resumed from" in result.stderr and "checkpoint-4 at step 4" in result.stderr
    for name in ("model", "ema", "optimizer"):
        assert tensors_equal(
            base_run / "checkpoint-6" / f"{name}.safetensors", output / "checkpoint-6" / f"{name}.safetensors"
        )
    assert tensors_equal(
        base_run / "unet" / "diffusion_pytorch_model.safetensors",
        output / "unet" / "diffusion_pytorch_model.safetensors",
    )


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(preset, tmp_path):
    """A learning rate of 1e30 makes the weights ~1e30 after the first update, and the second update's loss NaN:
    the run stops naming update 2, checkpoint-1 stays the latest, and no pipeline is saved."""
    output = tmp_path / "diverged"
    flags = ["--learning_rate", "1e30", "--lr_warmup_steps", "0", "--checkpointing_steps", "1"]
    result = run(train_command(preset, output, *flags, "--validation_steps", "0"), returncode=1)
    assert "NonFiniteError: Update 2: the loss is nan bits/dim" in result.stderr
    assert "the latest checkpoint stays" in result.stderr
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (output / "model_index.json").exists() and not (output / "test_bpd.json").exists()


def test_second_run_on_a_locked_output_dir_is_refused(preset, base_run, tmp_path, fresh_accelerator_state):
    """A live run holds the lock: a second start fails before touching anything (the live run's temporary
    checkpoint folder stays); explicitly resuming such a temporary folder is refused."""
    output = tmp_path / "live"
    shutil.copytree(base_run / "checkpoint-6", output / "checkpoint-6")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_lock(output, pid=live.pid)
        in_flight = output / f"checkpoint-8.tmp-{live.pid}"
        in_flight.mkdir()
        resume = ["--preset", str(preset), "--output_dir", str(output), "--resume_from_checkpoint"]
        with pytest.raises(RuntimeError, match=rf"in use by another training run: process {live.pid} on this host"):
            train_diffenc.main([*resume, "latest", "--max_train_steps", "8", "--report_to", "none"])
        assert in_flight.is_dir()
        with pytest.raises(ValueError, match=r"checkpoint-8.tmp-\d+' is the temporary folder of a checkpoint"):
            train_diffenc.main([*resume, str(in_flight)])
    finally:
        live.kill()
        live.wait()


def test_output_json_files_hold_no_bare_nan(base_run):
    def reject(name: str) -> None:
        raise AssertionError(f"a JSON file holds {name}")

    for path in base_run.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=reject)


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_two_processes_train_like_one(preset, tmp_path, conditional):
    """Global batch 16: one process with 16 images, or two with 8 each (gloo), give the same parameters; for a
    class-conditional preset too, where each process' labels and label dropout must be its slice of the global
    batch's.

    The two runs differ only in the order of floating-point sums (per-process batch reductions, then the
    all-reduce). In float32 that rounding, about 1e-7 of a gradient, is turned into full-size steps by AdamW
    wherever a gradient is mathematically zero (rounding / (|rounding| + eps) is O(1) for eps = 1e-8), by an
    amount that depends on the CPU's kernels. The runs are therefore made in float64 (--dtype float64): rounding
    of about 1e-16 of a gradient moves a parameter by at most lr * 1e-16 / eps = 1e-11 per step whatever the
    kernels, so 1e-9 is a bound on any CPU, and it is far below what the steps move the parameters (checked).
    """
    # The class vectors start at zero and move only from the fourth step on (the zero-initialised layers in
    # between must move first), so the conditional run is longer.
    steps, atol = (6, 1e-9) if conditional else (3, 1e-9)
    if conditional:
        preset = write_conditional_preset(tmp_path / "preset")
    common = ["--dropout", "0", "--max_train_steps", str(steps), "--checkpointing_steps", str(steps)]
    common += ["--validation_steps", "0", "--dtype", "float64", "--mixed_precision", "no"]
    one, two = tmp_path / "one", tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two_command = train_command(preset, two, "--cpu", "--train_batch_size", "8", "--report_to", "none", *common)
    two_command[0:1] = launcher
    run(two_command)
    run(train_command(preset, one, "--cpu", "--train_batch_size", "16", "--report_to", "none", *common))
    checkpoint = f"checkpoint-{steps}"
    assert json.loads((two / checkpoint / "training_state.json").read_text())["num_processes"] == 2
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(one / checkpoint / name), load_file(two / checkpoint / name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == torch.float64, key
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)
    trained, other = (
        load_file(one / checkpoint / "model.safetensors"),
        load_file(two / checkpoint / "model.safetensors"),
    )
    if conditional:
        # Labels given to the wrong images would move the class vectors differently, by their own size.
        for key in ("unet.class_embedding.embedding.weight", "encoder.class_embedding.embedding.weight"):
            size = trained[key].abs().max().item()
            assert size > 1e-3 and (trained[key] - other[key]).abs().max().item() < 0.01 * size, key
    # The tolerance is far below what the steps move the parameters.
    initial = DiffEncPipeline.from_preset(str(preset)).unet.state_dict()
    assert max((trained[f"unet.{k}"] - v.double()).abs().max().item() for k, v in initial.items()) > 1e6 * atol


def write_16_bit_folder(root: Path) -> Path:
    folder = root / "train" / "a"
    folder.mkdir(parents=True)
    for index in range(3):
        Image.fromarray(np.full((8, 8), 1000 * index, np.uint16)).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train_data_dir", "/no/such/folder"], "--train_data_dir '/no/such/folder' is not a directory"),
        (["--dataset", "digits", "--train_data_dir", "."], "either --dataset"),
        (["--resolution", "6"], "--resolution 6 cannot be pooled by the preset's encoder.*multiple of 4"),
        (["--resolution", "12"], "is 8x8 .* but the model takes 12x12 .*never resized"),
        (
            ["--resume_from_checkpoint", "/no/such/checkpoint-2"],
            "--resume_from_checkpoint '/no/such/checkpoint-2' cannot be resumed: '/no/such/checkpoint-2' does not",
        ),
        (["--train_split", "validation"], "digits dataset has the splits"),
    ],
)
def test_bad_flags_fail_before_training(preset, tmp_path, flags, message):
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        train_diffenc.main(["--preset", str(preset), "--output_dir", str(output), *flags])
    assert not output.exists()


def test_bad_data_and_presets_fail_before_training(preset, tmp_path, capsys):
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"PIL mode 'I;16'; only 8-bit images"):
        train_diffenc.main(
            [
                "--preset",
                str(preset),
                "--output_dir",
                str(output),
                "--train_data_dir",
                str(write_16_bit_folder(tmp_path)),
            ]
        )
    with pytest.raises(ValueError, match=r"--preset 'no-such-preset'.*available presets"):
        train_diffenc.main(["--preset", "no-such-preset", "--output_dir", str(output)])
    no_data = write_tiny_preset(tmp_path / "no-data", dataset="omit")
    with pytest.raises(ValueError, match=r"No training data.*--dataset.*--train_data_dir"):
        train_diffenc.main(["--preset", str(no_data), "--output_dir", str(output)])
    typo = write_tiny_preset(tmp_path / "typo", learning_rte=1.0)
    with pytest.raises(ValueError, match="unknown keys \\['learning_rte'\\]"):
        train_diffenc.main(["--preset", str(typo), "--output_dir", str(output)])
    assert not output.exists()
    for flags in (["--mixed_precision", "fp8"], ["--learning_rate", "-1"], ["--num_timesteps", "0"]):
        with pytest.raises(SystemExit):
            train_diffenc.main(["--preset", str(preset), "--output_dir", str(output), *flags])
    assert "--mixed_precision: invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["digits-vdm", "digits-diffenc-nontrainable", "digits-diffenc-trainable"])
def test_presets_training_configs_are_flags(name, tmp_path):
    args = train_diffenc.parse_args(["--preset", name, "--output_dir", str(tmp_path), "--learning_rate", "0.5"])
    config = json.loads((REPO_ROOT / "diffenc_diffusers" / "presets" / name / "training_config.json").read_text())
    assert args.learning_rate == 0.5 and args.dataset == config["dataset"] == "digits"
    assert args.max_train_steps == config["max_train_steps"] and args.num_timesteps is None


def test_existing_run_needs_resume_flag(preset, base_run):
    with pytest.raises(ValueError, match=r"already holds checkpoints.*--resume_from_checkpoint latest"):
        train_diffenc.main(["--preset", str(preset), "--output_dir", str(base_run)])


def test_resume_refuses_another_seed_or_noise_process(preset, base_run, tmp_path):
    resume = ["--output_dir", str(base_run), "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=r"--seed is 1, the checkpoint's run used 0"):
        train_diffenc.main(["--preset", str(preset), *resume, "--seed", "1"])
    # Same networks and weights, another noise process: the schedule's upper end moved in a copy of the preset.
    other = tmp_path / "preset"
    DiffEncPipeline.from_preset(str(preset)).save_pretrained(other)
    (other / "training_config.json").write_text((preset / "training_config.json").read_text())
    scheduler_config = other / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_config.read_text())
    scheduler_config.write_text(json.dumps({**config, "gamma_max": 6.0}))
    with pytest.raises(ValueError, match=r"scheduler's 'gamma_max' is 6.0, the checkpoint's 5.0"):
        train_diffenc.prepare(train_diffenc.parse_args(["--preset", str(other), *resume]))


def test_resume_accepts_checkpoints_written_before_the_scheduler_record(preset, base_run, tmp_path, caplog):
    old = tmp_path / "old-run"
    checkpoint = find_latest_checkpoint(base_run)
    shutil.copytree(checkpoint, old / checkpoint.name)
    state_file = old / checkpoint.name / "training_state.json"
    state = json.loads(state_file.read_text())
    del state["scheduler_config"]
    state_file.write_text(json.dumps(state))
    marker_file = old / checkpoint.name / CHECKPOINT_MARKER
    marker = json.loads(marker_file.read_text())
    marker["files"]["training_state.json"] = state_file.stat().st_size
    del marker["sha256"]  # such checkpoints also predate the checksums
    marker_file.write_text(json.dumps(marker))
    resume = ["--output_dir", str(old), "--resume_from_checkpoint", "latest"]
    args = train_diffenc.parse_args(["--preset", str(preset), *resume])
    with caplog.at_level("WARNING"):
        setup = train_diffenc.prepare(args)
    assert setup.resume_dir == old / checkpoint.name
    assert "noise process is not checked" in caplog.text


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(
    preset, tmp_path, monkeypatch, caplog, fresh_accelerator_state, native_bf16
):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native_bf16)
    args = train_diffenc.parse_args(
        ["--preset", str(preset), "--output_dir", str(tmp_path / "run"), "--mixed_precision", "bf16", "--cpu"]
    )
    with caplog.at_level("WARNING"):
        train_diffenc.Trainer(args, train_diffenc.prepare(args)).close()
    assert ("oneDNN emulates bf16" in caplog.text) != native_bf16


@pytest.mark.parametrize(("batch_size", "warned"), [(16, False), (8, True)])
def test_resume_with_another_batch_size_warns(preset, base_run, caplog, fresh_accelerator_state, batch_size, warned):
    resume = ["--output_dir", str(base_run), "--resume_from_checkpoint", "latest", "--cpu", "--report_to", "none"]
    args = train_diffenc.parse_args(["--preset", str(preset), *resume, "--train_batch_size", str(batch_size)])
    with caplog.at_level("WARNING"):
        trainer = train_diffenc.Trainer(args, train_diffenc.prepare(args))
    trainer.close()
    assert trainer.global_step == 6
    assert ("the checkpoint's run used 1 processes and a global micro-batch of 16" in caplog.text) == warned


@pytest.mark.parametrize(
    ("launcher", "flag", "expected"), [(None, None, "no"), ("bf16", None, "bf16"), ("bf16", "no", "no")]
)
def test_mixed_precision_defaults_to_the_launchers(
    tmp_path, monkeypatch, fresh_accelerator_state, launcher, flag, expected
):
    """Unset in flags and preset, --mixed_precision is accelerate's (the launcher exports its setting as
    ACCELERATE_MIXED_PRECISION); a flag overrides it."""
    preset = write_tiny_preset(tmp_path / "preset", mixed_precision="omit")
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    flags = ["--preset", str(preset), "--output_dir", str(tmp_path / "run"), "--cpu", "--report_to", "none"]
    args = train_diffenc.parse_args([*flags, *(["--mixed_precision", flag] if flag else [])])
    trainer = train_diffenc.Trainer(args, train_diffenc.prepare(args))
    trainer.close()
    assert trainer.accelerator.mixed_precision == expected and args.mixed_precision == expected


def test_resume_applies_changed_flags_and_records_them(preset, base_run, tmp_path, caplog, fresh_accelerator_state):
    """--learning_rate, --adam_beta2 and --ema_decay given at resume are applied (the checkpoint would bring back
    its own), logged, recorded as a new segment in the next checkpoint and shown per segment in the model card."""
    output = tmp_path / "changed"
    shutil.copytree(base_run / "checkpoint-6", output / "checkpoint-6")
    flags = ["--preset", str(preset), "--output_dir", str(output), "--resume_from_checkpoint", "latest", *FAST]
    flags += ["--cpu", "--report_to", "none", "--max_train_steps", "7", "--validation_steps", "0"]
    args = train_diffenc.parse_args([*flags, "--learning_rate", "0.005", "--adam_beta2", "0.9", "--ema_decay", "0.5"])
    with caplog.at_level("WARNING"):
        trainer = train_diffenc.Trainer(args, train_diffenc.prepare(args))
    try:
        # constant_with_warmup after its 2 warm-up steps: the factor is 1.
        assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.005, 0.005]
        assert all(group["betas"] == (0.9, 0.9) for group in trainer.optimizer.param_groups)
        assert trainer.ema.decay == 0.5
        assert "--learning_rate 0.002 -> 0.005" in caplog.text and "--ema_decay 0.9 -> 0.5" in caplog.text
        trainer.run()
    finally:
        trainer.close()
    state = json.loads((output / "checkpoint-7" / "training_state.json").read_text())
    assert [segment["from_step"] for segment in state["segments"]] == [0, 6]
    assert state["segments"][1]["flags"]["learning_rate"] == 0.005
    card = (output / "README.md").read_text()
    assert "0.002 (steps 0-6), 0.005 (steps 6-7)" in card


def test_resume_with_unchanged_flags_keeps_the_checkpoints_optimizer_exactly(preset, base_run, fresh_accelerator_state):
    resume = ["--output_dir", str(base_run), "--resume_from_checkpoint", "latest", "--cpu", "--report_to", "none"]
    trainer = train_diffenc.Trainer(
        *(lambda a: (a, train_diffenc.prepare(a)))(train_diffenc.parse_args(["--preset", str(preset), *resume]))
    )
    trainer.close()
    saved = json.loads((base_run / "checkpoint-6" / "training_state.json").read_text())
    for group, saved_group in zip(trainer.optimizer.param_groups, saved["optimizer"]["param_groups"], strict=True):
        assert group["lr"] == saved_group["lr"] and list(group["betas"]) == saved_group["betas"]
    assert trainer.lr_scheduler.state_dict()["_last_lr"] == saved["lr_scheduler"]["_last_lr"]


def test_resume_past_max_steps_or_a_batch_above_the_data_is_refused(preset, base_run, fresh_accelerator_state):
    resume = ["--preset", str(preset), "--output_dir", str(base_run), "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=r"--max_train_steps 4 is below .* at step 6 \(steps 6 -> 4\)"):
        train_diffenc.main([*resume, "--max_train_steps", "4"])
    args = train_diffenc.parse_args([*resume, "--train_batch_size", "5000", "--cpu", "--report_to", "none"])
    with pytest.raises(
        ValueError,
        match=r"--train_batch_size 5000 x 1 process\(es\) = a global batch of 5000 .*"
        r"more than the 1497 training images",
    ):
        train_diffenc.Trainer(args, train_diffenc.prepare(args))


def test_resumed_run_reads_its_state_once(preset, base_run, monkeypatch, fresh_accelerator_state):
    reads = []
    read_text = Path.read_text

    def counting_read_text(self, *args, **kwargs):
        if self.name == "training_state.json":
            reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    resume = ["--output_dir", str(base_run), "--resume_from_checkpoint", "latest", "--cpu", "--report_to", "none"]
    args = train_diffenc.parse_args(["--preset", str(preset), *resume])
    trainer = train_diffenc.Trainer(args, train_diffenc.prepare(args))
    trainer.close()
    assert trainer.global_step == 6 and len(reads) == 1
