"""Tests of the Hub side of DiffEncPipeline: loading Hub ids through huggingface_hub's real cache code (offline),
a fresh-process round trip, and push_to_hub's model card and exact uploaded file set.

Nothing here touches the network: Hub ids are resolved from a cache laid out like huggingface_hub's
(`models--org--name/refs/<ref>` and `snapshots/<commit>/...`) with downloads disabled, and uploads are
intercepted where diffenc_diffusers.hub looks up `create_repo` and `upload_folder`.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import CommitOperationAdd, ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from test_pipeline import make_pipeline, sample

import diffenc_diffusers.hub as hub
from diffenc_diffusers import DiffEncPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40
TRAINABLE_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "encoder/config.json",
    "encoder/diffusion_pytorch_model.safetensors",
}
"""What from_pretrained loads from a trainable DiffEnc pipeline."""


def upload_of(loaded: set[str]) -> set[str]:
    """The files of an upload: those `from_pretrained` loads, the model card and the code file for diffusers'
    generic loader at the root and in each component's folder."""
    components = {name.split("/")[0] for name in loaded if "/" in name}
    return loaded | {"README.md", "diffenc_pipeline.py"} | {f"{name}/diffenc_pipeline.py" for name in components}


def add_to_cache(cache: Path, repo_id: str, commit: str, pipeline_folder: Path, refs: tuple[str, ...]) -> Path:
    """Lay out `pipeline_folder` as a cached snapshot of `repo_id` at `commit`, with `refs` pointing to it."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    shutil.copytree(pipeline_folder, snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A cache with org/diffenc-tiny: main = a trainable pipeline (seed 0), v1 = another one (seed 7)."""
    root = tmp_path_factory.mktemp("hf")
    main, v1 = make_pipeline("trainable", seed=0), make_pipeline("trainable", seed=7)
    main.save_pretrained(root / "main")
    v1.save_pretrained(root / "v1")
    (root / "main" / "checkpoint-10").mkdir()
    (root / "main" / "checkpoint-10" / "optimizer.bin").write_bytes(b"\0")
    cache = root / "home" / "hub"
    add_to_cache(cache, "org/diffenc-tiny", COMMIT_MAIN, root / "main", ("main",))
    add_to_cache(cache, "org/diffenc-tiny", COMMIT_V1, root / "v1", ("v1",))
    return {"root": root, "cache": cache, "main": main, "v1": v1}


def assert_same_weights(a: DiffEncPipeline, b: DiffEncPipeline) -> None:
    for name in ("unet", "encoder"):
        for (key, x), (_, y) in zip(
            getattr(a, name).state_dict().items(), getattr(b, name).state_dict().items(), strict=True
        ):
            assert torch.equal(x, y), f"{name}.{key}"


# ------------------------------------------------------------------------------------------ loading


def test_hub_id_loads_from_the_cache_by_ref_and_commit(hub_cache):
    options = {"cache_dir": hub_cache["cache"], "local_files_only": True}
    main = DiffEncPipeline.from_pretrained("org/diffenc-tiny", **options)
    assert main.name_or_path == "org/diffenc-tiny"
    assert_same_weights(main, hub_cache["main"])
    assert_same_weights(DiffEncPipeline.from_pretrained("org/diffenc-tiny", revision="v1", **options), hub_cache["v1"])
    by_commit = DiffEncPipeline.from_pretrained("org/diffenc-tiny", revision=COMMIT_V1, **options)
    assert_same_weights(by_commit, hub_cache["v1"])


def test_hub_offline_mode_uses_the_cache(hub_cache, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = DiffEncPipeline.from_pretrained("org/diffenc-tiny", cache_dir=hub_cache["cache"])
    assert_same_weights(loaded, hub_cache["main"])
    with pytest.raises(
        OSError,
        match=r"'org/absent' \(revision 'main'\) is not in cache folder .*downloading is "
        r"disabled",
    ):
        DiffEncPipeline.from_pretrained("org/absent", cache_dir=hub_cache["cache"])


def test_repo_missing_from_the_cache_is_a_clear_error(hub_cache):
    with pytest.raises(OSError, match=r"'org/absent' \(revision 'main'\) is not in cache folder"):
        DiffEncPipeline.from_pretrained("org/absent", cache_dir=hub_cache["cache"], local_files_only=True)
    with pytest.raises(OSError, match=r"'org/diffenc-tiny' \(revision 'v2'\) is not in cache folder"):
        DiffEncPipeline.from_pretrained(
            "org/diffenc-tiny", revision="v2", cache_dir=hub_cache["cache"], local_files_only=True
        )


def test_download_fetches_only_pipeline_files(monkeypatch, hub_cache):
    """The arguments reach huggingface_hub, and the snapshot is restricted to the listed components' files."""
    calls = []
    real_index = hub_cache["cache"] / "models--org--diffenc-tiny" / "snapshots" / COMMIT_MAIN / "model_index.json"

    def fake_hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("file", repo_id, filename, kwargs))
        return str(real_index)

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(("snapshot", repo_id, None, kwargs))
        return str(real_index.parent)

    monkeypatch.setattr(hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    DiffEncPipeline.from_pretrained(
        "org/diffenc-tiny", revision="v1", token="hf_x", cache_dir="/c", force_download=True
    )
    expected = {"revision": "v1", "cache_dir": "/c", "token": "hf_x", "local_files_only": False, "force_download": True}
    assert calls[0] == ("file", "org/diffenc-tiny", "model_index.json", expected)
    patterns = calls[1][3].pop("allow_patterns")
    assert calls[1] == ("snapshot", "org/diffenc-tiny", None, expected)
    files = [p.relative_to(real_index.parent).as_posix() for p in real_index.parent.rglob("*") if p.is_file()]
    assert set(filter_repo_objects(files, allow_patterns=patterns)) == TRAINABLE_FILES


def test_fresh_process_loads_local_folder_and_hub_id_offline(hub_cache, tmp_path):
    """A new interpreter that imports only diffenc_diffusers (and torch) loads both, with HF_HUB_OFFLINE=1:
    the same weights and config, and the same samples (in float64, where the sampler's amplification of
    rounding differences cannot move a pixel)."""
    main = hub_cache["main"]
    script = textwrap.dedent(
        """
        import sys
        import torch
        import diffenc_diffusers

        results = []
        for source in (sys.argv[1], "org/diffenc-tiny"):
            pipe = diffenc_diffusers.DiffEncPipeline.from_pretrained(source)
            pipe.set_progress_bar_config(disable=True)
            weights = {name: getattr(pipe, name).state_dict() for name in ("unet", "encoder")}
            config = dict(pipe.scheduler.config)
            generator = torch.Generator().manual_seed(3)
            pipe.to(torch.float64)
            images = pipe(batch_size=2, num_inference_steps=4, output_type="pt", generator=generator).images
            results.append({"weights": weights, "encoder_type": config["encoder_type"], "images": images})
        torch.save(results, sys.argv[2])
        """
    )
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hub_cache["cache"].parent), PYTHONPATH=str(REPO_ROOT))
    env.pop("HF_HUB_CACHE", None)
    output = tmp_path / "results.pt"
    completed = subprocess.run(
        [sys.executable, "-c", script, str(hub_cache["root"] / "main"), str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    expected_weights = {name: getattr(main, name).state_dict() for name in ("unet", "encoder")}
    reference = make_pipeline("trainable", seed=0).to(torch.float64)
    expected_images = sample(reference, seed=3)
    for result in torch.load(output, weights_only=True):
        assert result["encoder_type"] == "trainable"
        for name, state in expected_weights.items():
            assert state.keys() == result["weights"][name].keys()
            assert all(torch.equal(state[key], result["weights"][name][key]) for key in state)
        assert torch.equal(result["images"], expected_images)


# ------------------------------------------------------------------------------------------ uploading


def machine_paths(*extra: Path) -> list[str]:
    """Paths of this machine that no uploaded file may name (found independently of diffenc_diffusers.hub)."""
    paths = {Path.home(), Path.cwd(), Path(tempfile.gettempdir()), REPO_ROOT, *extra}
    return sorted({str(p) for path in paths for p in (path, path.resolve())} - {"/"})


def assert_no_machine_paths(uploaded: dict[str, bytes], *extra: Path) -> None:
    for name, data in uploaded.items():
        for path in machine_paths(*extra):
            assert os.fsencode(path) not in data, f"{name} holds {path}"


@pytest.fixture
def fake_hub(monkeypatch):
    """Intercept huggingface_hub's create_repo / create_commit; record the repository and every uploaded file's
    bytes (read when the commit is made, as huggingface_hub would). Every other upload function fails."""
    record = {"create_repo": [], "commits": []}

    def create_repo(repo_id, **kwargs):
        record["create_repo"].append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def create_commit(repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd)
            content = operation.path_or_fileobj
            files[operation.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()
        record["commits"].append((repo_id, kwargs))
        record["uploaded"] = files
        record["card"] = ModelCard(files["README.md"].decode()) if "README.md" in files else None
        return "commit-info"

    def forbidden(*args, **kwargs):
        raise AssertionError("only create_commit may upload")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "create_commit", create_commit)
    for name in ("upload_folder", "upload_file"):
        monkeypatch.setattr(huggingface_hub, name, forbidden)
    return record


def test_push_to_hub_uploads_exactly_the_pipeline_files_with_a_model_card(fake_hub):
    pipe = make_pipeline("trainable")
    training_info = {"dataset": "uoft-cs/cifar10", "max_train_steps": 1000, "num_timesteps": None}
    result = pipe.push_to_hub("org/diffenc-tiny", private=True, token="hf_x", training_info=training_info, bpd=2.6189)
    assert result == "commit-info"
    assert fake_hub["create_repo"] == [("org/diffenc-tiny", {"exist_ok": True, "private": True, "token": "hf_x"})]
    (commit,) = fake_hub["commits"]
    assert commit == (
        "org/diffenc-tiny",
        {"commit_message": "Upload DiffEnc pipeline", "token": "hf_x", "create_pr": False},
    )
    assert set(fake_hub["uploaded"]) == upload_of(TRAINABLE_FILES)

    card = fake_hub["card"]
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert set(card.data.tags) >= {"diffenc", "vdm", "diffusion", "likelihood", "unconditional-image-generation"}
    assert card.data.datasets == ["uoft-cs/cifar10"]
    text = card.text
    assert "**2.6189 bits/dim**" in text
    assert "| max_train_steps | 1000 |" in text and "| num_timesteps | none (continuous time) |" in text
    assert 'DiffEncPipeline.from_pretrained("org/diffenc-tiny")' in text and "bits_per_dim" in text
    assert "trainable encoder" in text
    assert f"| denoiser parameters | {sum(p.numel() for p in pipe.unet.parameters()):,} |" in text


def plant_strays(folder: Path, outside: Path) -> None:
    """What a user's output folder may hold besides the pipeline: checkpoints, logs, an old experiment's weights,
    weights planted in the scheduler's folder, and symbolic links to a file outside the folder."""
    (folder / "checkpoint-500" / "unet").mkdir(parents=True)
    (folder / "checkpoint-500" / "unet" / "config.json").write_text("{}")
    (folder / "checkpoint-500" / "optimizer.bin").write_bytes(b"\0")
    (folder / "logs").mkdir()
    (folder / "logs" / "events.out").write_text("")
    (folder / "training_args.json").write_text("{}")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(weights, folder / "unet" / "diffusion_pytorch_model.old_experiment.safetensors")
    shutil.copy(weights, folder / "scheduler" / "diffusion_pytorch_model.safetensors")
    (folder / "unet" / "notes.txt").write_text("")
    (folder / "unet" / "diffusion_pytorch_model.linked.safetensors").symlink_to(outside)
    (folder / "secret.json").symlink_to(outside)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside the pipeline folder whose bytes must never be uploaded."""
    path = tmp_path / "outside" / "system-file"
    path.parent.mkdir()
    path.write_bytes(b"SECRET-BYTES-OF-A-SYSTEM-FILE")
    return path


def test_save_pretrained_push_uploads_only_what_from_pretrained_loads(fake_hub, tmp_path, outside):
    pipe = make_pipeline("none")
    folder = tmp_path / "tiny-vdm"
    pipe.save_pretrained(folder)
    plant_strays(folder, outside)
    pipe.save_pretrained(folder, push_to_hub=True, repo_id="tiny-vdm", commit_message="first")
    assert fake_hub["create_repo"][0][0] == "tiny-vdm"
    assert fake_hub["commits"] == [("me/tiny-vdm", {"commit_message": "first", "token": None, "create_pr": False})]
    uploaded = fake_hub["uploaded"]
    assert set(uploaded) == upload_of(
        {
            "model_index.json",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
        }
    )
    for name, data in uploaded.items():
        assert data == (folder / name).read_bytes(), name
        assert b"SECRET-BYTES" not in data
    assert_no_machine_paths(uploaded, tmp_path)
    card = fake_hub["card"]
    assert "Not evaluated yet." in card.text and "Training settings were not recorded." in card.text
    assert "no encoder" in card.text and 'from_pretrained("me/tiny-vdm")' in card.text


@pytest.mark.parametrize(
    "link", ["unet/diffusion_pytorch_model.safetensors", "unet/config.json", "model_index.json", "unet", "README.md"]
)
def test_a_symbolic_link_among_the_pipeline_files_is_refused_before_anything_is_sent(fake_hub, tmp_path, outside, link):
    folder = tmp_path / "pipe"
    make_pipeline("none").save_pretrained(folder)
    target = tmp_path / "moved"
    (folder / link).rename(target) if (folder / link).exists() else target.write_text("")
    (folder / link).symlink_to(target)
    with pytest.raises(ValueError, match="is a symbolic link"):
        hub.upload_pipeline_folder(make_pipeline("none"), folder, "org/x")
    assert fake_hub["create_repo"] == [] and fake_hub["commits"] == []


def test_a_pipeline_folder_reached_through_a_symbolic_link_uploads_normally(fake_hub, tmp_path):
    make_pipeline("none").save_pretrained(tmp_path / "real")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    hub.upload_pipeline_folder(make_pipeline("none"), tmp_path / "alias", "org/x")
    assert "unet/diffusion_pytorch_model.safetensors" in fake_hub["uploaded"]


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_only_the_pushed_variant_is_uploaded(fake_hub, tmp_path, variant):
    folder = tmp_path / "pipe"
    pipe = make_pipeline("trainable")
    pipe.save_pretrained(folder)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    hub.upload_pipeline_folder(pipe, folder, "org/x", variant=variant)
    weights = {name for name in fake_hub["uploaded"] if name.endswith(".safetensors")}
    suffix = "" if variant is None else ".fp16"
    assert weights == {f"{c}/diffusion_pytorch_model{suffix}.safetensors" for c in ("unet", "encoder")}
    for name in weights:
        assert fake_hub["uploaded"][name] == (folder / name).read_bytes()
    with pytest.raises(FileNotFoundError, match="no safetensors weights of the variant 'bf16'"):
        hub.upload_pipeline_folder(pipe, folder, "org/x", variant="bf16")
    with pytest.raises(ValueError, match="`variant` must be letters"):
        hub.upload_pipeline_folder(pipe, folder, "org/x", variant="../fp16")


def test_sharded_weights_upload_the_index_and_its_shards_only(fake_hub, tmp_path):
    folder = tmp_path / "pipe"
    make_pipeline("none").save_pretrained(folder, max_shard_size="10KB")
    shards = sorted(p.name for p in (folder / "unet").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    (folder / "unet" / "diffusion_pytorch_model-00099-of-00099.safetensors").write_bytes(b"stray")
    hub.upload_pipeline_folder(make_pipeline("none"), folder, "org/x")
    assert {name for name in fake_hub["uploaded"] if name.startswith("unet/")} == {
        "unet/config.json",
        "unet/diffenc_pipeline.py",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        *(f"unet/{shard}" for shard in shards),
    }
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"][next(iter(content["weight_map"]))] = "../../outside.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"names the shard '\.\./\.\./outside\.safetensors'"):
        hub.upload_pipeline_folder(make_pipeline("none"), folder, "org/x")


def test_push_of_a_pipeline_loaded_from_a_folder_names_no_local_path(fake_hub, tmp_path):
    make_pipeline("trainable").save_pretrained(tmp_path / "saved")
    loaded = DiffEncPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.unet.config._name_or_path == str(tmp_path / "saved" / "unet")  # diffusers records the folder
    images = tmp_path / "data" / "my-images"
    info = {
        "dataset": str(images),
        "preset": str(tmp_path / "presets" / "tiny"),
        "test set": f"split 'test' of the image folder {str(images)!r} (12 images)",
    }
    loaded.push_to_hub("org/x", training_info=info, bpd=3.5)
    uploaded = fake_hub["uploaded"]
    assert_no_machine_paths(uploaded, tmp_path)
    for name in uploaded:
        if name.endswith(".json"):
            assert "_name_or_path" not in json.loads(uploaded[name]), name
    card = fake_hub["card"]
    assert card.data.datasets is None
    assert "| dataset | my-images |" in card.text and "| preset | tiny |" in card.text
    assert "| test set | split 'test' of the image folder 'my-images' (12 images) |" in card.text


def test_save_pretrained_writes_no_local_path(tmp_path):
    make_pipeline("trainable").save_pretrained(tmp_path / "a")
    DiffEncPipeline.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    for path in (tmp_path / "b").rglob("*.json"):
        assert "_name_or_path" not in json.loads(path.read_text()), path
        assert str(tmp_path) not in path.read_text()


def test_a_local_path_anywhere_in_an_uploaded_file_refuses_the_upload(fake_hub, tmp_path):
    folder = tmp_path / "pipe"
    make_pipeline("none").save_pretrained(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config["notes"] = f"trained from {Path.home() / 'data'}"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"scheduler/scheduler_config.json contains the local path"):
        hub.upload_pipeline_folder(make_pipeline("none"), folder, "org/x")
    assert fake_hub["commits"] == []


def test_trainer_push_uploads_only_the_pipeline_files_and_names_no_local_path(
    fake_hub, tmp_path, outside, fresh_accelerator_state
):
    """--push_to_hub of a run on a local image folder, into an output folder holding planted files."""
    from conftest import write_tiny_preset
    from test_training import FAST, train_diffenc

    preset = write_tiny_preset(tmp_path / "presets" / "tiny")
    images = tmp_path / "data" / "my-images" / "train"
    images.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(40):
        Image.fromarray(generator.integers(0, 256, (8, 8), dtype=np.uint8)).save(images / f"{index}.png")
    output = tmp_path / "run"
    output.mkdir()
    make_pipeline("trainable").save_pretrained(output)  # an earlier experiment's pipeline, then strays
    plant_strays(output, outside)
    train_diffenc.main(
        [
            *("--preset", str(preset), "--output_dir", str(output), *FAST, "--max_train_steps", "1"),
            *("--train_data_dir", str(images.parent)),
            *("--validation_steps", "0", "--report_to", "none", "--push_to_hub", "--hub_model_id", "org/tiny"),
            *("--hub_token", "secret", "--hub_private_repo"),
        ]
    )
    assert fake_hub["create_repo"][0] == ("org/tiny", {"exist_ok": True, "private": True, "token": "secret"})
    ((repo_id, options),) = fake_hub["commits"]
    assert repo_id == "org/tiny" and options["token"] == "secret" and "1 steps" in options["commit_message"]
    uploaded = fake_hub["uploaded"]
    assert set(uploaded) == upload_of(TRAINABLE_FILES)
    for name, data in uploaded.items():
        assert data == (output / name).read_bytes(), name
    assert_no_machine_paths(uploaded, tmp_path, output, preset, images)
    bpd = json.loads((output / "test_bpd.json").read_text())["continuous"]["bpd"]
    card = fake_hub["card"]
    assert f"{bpd:.4f} bits/dim" in card.text and card.data.datasets is None
    assert "image folder 'my-images'" in card.text and "| preset | tiny |" in card.text


@pytest.mark.parametrize("null_class", [True, False])
def test_model_card_of_a_class_conditional_pipeline(null_class):
    from conftest import make_encoder, make_unet

    from diffenc_diffusers import VDMScheduler

    classes = {"num_class_embeds": 10, "null_class": null_class}
    pipe = DiffEncPipeline(
        unet=make_unet(**classes), scheduler=VDMScheduler(encoder_type="trainable"), encoder=make_encoder(**classes)
    )
    card = hub.make_model_card(pipe, "org/digits-conditional", bpd=1.5)
    assert "unconditional-image-generation" not in card.data.tags and "class-conditional" in card.data.tags
    assert card.data.pipeline_tag is None
    text = card.text
    assert "A class-conditional (10 classes) image model" in text
    assert "Conditional negative ELBO -log p(x | c), on the images' labels (an upper bound" in text
    assert "| classes | 10 (class_labels 0 .. 9) |" in text
    assert "class_labels=class_labels" in text and "bits_per_dim(uint8_images, class_labels=class_labels" in text
    if null_class:
        assert "| null class | yes: label 10, the unconditional model" in text
        assert "guidance_scale=3.0" in text and "torch.full_like(class_labels, 10)" in text
    else:
        assert "| null class | no (guidance_scale must be 1) |" in text
        assert "guidance_scale=1.0" in text and "full_like" not in text
    unconditional = hub.make_model_card(make_pipeline("trainable"), "org/plain").text
    assert "An unconditional image model" in unconditional and "class_labels" not in unconditional


# ------------------------------------------------------------------------------------------ diffusers' generic loader


def cache_upload(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay out the files of an upload as the cached snapshot COMMIT_MAIN of `repo_id`, branch main."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT_MAIN
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT_MAIN)
    return snapshot


def run_fresh(script: str, hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `script` in a new interpreter, offline, with `hf_home` as the Hugging Face home (cache and modules)."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_CACHE", "HF_MODULES_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300, cwd=hf_home
    )


GENERIC_LOAD = """
import json
import re
import sys
import types

import torch
from diffusers import DiffusionPipeline

source, output = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    # The online route of diffusers' download: the Hub's file listing (what model_info returns) decides what is
    # fetched and whether each component's code file exists; the files themselves come from the cache.
    import diffusers.pipelines.pipeline_utils
    import diffusers.utils.dynamic_modules_utils

    files = [types.SimpleNamespace(rfilename=name) for name in json.loads(sys.argv[3])]
    listing = types.SimpleNamespace(sha=sys.argv[4], siblings=files)
    diffusers.pipelines.pipeline_utils.model_info = lambda *args, **kwargs: listing
    diffusers.utils.dynamic_modules_utils.model_info = lambda *args, **kwargs: listing
try:
    DiffusionPipeline.from_pretrained(source)
    raise AssertionError("loaded without trust_remote_code")
except ValueError as error:
    assert "trust_remote_code=True" in str(error), error
assert "diffenc_diffusers" not in sys.modules
pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
import diffenc_diffusers

assert type(pipe) is diffenc_diffusers.DiffEncPipeline, type(pipe)
pipe.set_progress_bar_config(disable=True)
weights = {name: getattr(pipe, name).state_dict() for name in ("unet", "encoder")}
pipe.to(torch.float64)
images = pipe(batch_size=2, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(3)).images
torch.save({"weights": weights, "images": images}, output)
"""


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """org/diffenc-generic (a trainable pipeline, seed 0) as pushed by push_to_hub, in an offline Hub cache."""
    root = tmp_path_factory.mktemp("pushed")
    captured = {}

    def create_commit(repo_id, operations, **kwargs):
        for operation in operations:
            content = operation.path_or_fileobj
            captured[operation.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
        patch.setattr(huggingface_hub, "create_commit", create_commit)
        make_pipeline("trainable", seed=0).push_to_hub("org/diffenc-generic")
    cache_upload(root / "home" / "hub", "org/diffenc-generic", captured)
    return {"home": root / "home", "files": captured}


def check_generic_load(output: Path) -> None:
    result = torch.load(output, weights_only=True)
    reference = make_pipeline("trainable", seed=0)
    for name in ("unet", "encoder"):
        expected = getattr(reference, name).state_dict()
        assert expected.keys() == result["weights"][name].keys()
        assert all(torch.equal(expected[key], result["weights"][name][key]) for key in expected)
    assert torch.equal(result["images"], sample(reference.to(torch.float64), seed=3))


def test_generic_diffusers_loader_loads_a_saved_folder_in_a_fresh_interpreter(tmp_path):
    make_pipeline("trainable", seed=0).save_pretrained(tmp_path / "saved")
    completed = run_fresh(GENERIC_LOAD, tmp_path, str(tmp_path / "saved"), str(tmp_path / "out.pt"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    check_generic_load(tmp_path / "out.pt")


@pytest.mark.parametrize("route", ["cache", "hub listing"])
def test_generic_diffusers_loader_loads_a_pushed_repository_in_a_fresh_interpreter(pushed, tmp_path, route):
    """From the offline cache alone, and through diffusers' online route with the Hub's file listing of exactly
    the uploaded files (which requires a code file in every component's folder)."""
    listing = [json.dumps(sorted(pushed["files"])), COMMIT_MAIN] if route == "hub listing" else []
    completed = run_fresh(GENERIC_LOAD, pushed["home"], "org/diffenc-generic", str(tmp_path / "out.pt"), *listing)
    assert completed.returncode == 0, completed.stderr[-3000:]
    check_generic_load(tmp_path / "out.pt")


def test_saved_and_uploaded_layout_names_the_shipped_code_file(pushed, tmp_path):
    make_pipeline("trainable").save_pretrained(tmp_path)
    for model_index in (
        json.loads((tmp_path / "model_index.json").read_text()),
        json.loads(pushed["files"]["model_index.json"]),
    ):
        assert model_index["_class_name"] == ["diffenc_pipeline", "DiffEncPipeline"]
        assert model_index["unet"] == ["diffenc_pipeline", "VDMUNetModel"]
        assert model_index["scheduler"] == ["diffenc_pipeline", "VDMScheduler"]
        assert model_index["encoder"] == ["diffenc_pipeline", "DiffEncEncoderModel"]
    source = (REPO_ROOT / "diffenc_diffusers" / "hub_code.py").read_bytes()
    for name in ("diffenc_pipeline.py", "unet/diffenc_pipeline.py", "scheduler/diffenc_pipeline.py"):
        assert (tmp_path / name).read_bytes() == source and pushed["files"][name] == source


def test_diffenc_from_pretrained_runs_no_code_from_the_folder_and_uploads_the_packages(fake_hub, tmp_path):
    pipe = make_pipeline("trainable")
    pipe.save_pretrained(tmp_path)
    for path in tmp_path.rglob("diffenc_pipeline.py"):
        path.write_text("raise RuntimeError('the folder's code ran')\n")
    assert_same_weights(DiffEncPipeline.from_pretrained(tmp_path), pipe)
    hub.upload_pipeline_folder(pipe, tmp_path, "org/x")
    source = (REPO_ROOT / "diffenc_diffusers" / "hub_code.py").read_bytes()
    assert fake_hub["uploaded"]["encoder/diffenc_pipeline.py"] == source


def test_folders_saved_before_the_code_file_still_load(fake_hub, tmp_path):
    """The earlier layout: components by full module path, "_class_name": "DiffEncPipeline", no code file."""
    pipe = make_pipeline("trainable")
    pipe.save_pretrained(tmp_path / "old")
    index = json.loads((tmp_path / "old" / "model_index.json").read_text())
    index["_class_name"] = "DiffEncPipeline"
    for name, component in pipe.components.items():
        index[name] = [type(component).__module__, type(component).__name__]
    (tmp_path / "old" / "model_index.json").write_text(json.dumps(index))
    for path in (tmp_path / "old").rglob("diffenc_pipeline.py"):
        path.unlink()
    loaded = DiffEncPipeline.from_pretrained(tmp_path / "old")
    assert_same_weights(loaded, pipe)
    hub.upload_pipeline_folder(pipe, tmp_path / "old", "org/x")
    assert set(fake_hub["uploaded"]) == upload_of(TRAINABLE_FILES)
    assert json.loads(fake_hub["uploaded"]["model_index.json"])["unet"] == ["diffenc_pipeline", "VDMUNetModel"]


def test_the_code_file_names_the_package_to_install_when_it_is_missing(monkeypatch):
    import runpy

    import diffenc_diffusers
    from diffenc_diffusers import hub_code

    assert hub_code.__all__ == diffenc_diffusers.__all__ and hub_code.DiffEncPipeline is DiffEncPipeline
    assert all(getattr(hub_code, name) is getattr(diffenc_diffusers, name) for name in hub_code.__all__)
    monkeypatch.setitem(sys.modules, "diffenc_diffusers", None)
    with pytest.raises(ImportError, match=r"needs the diffenc-diffusers package.*not on PyPI.*pip install -e \."):
        runpy.run_path(hub_code.__file__)


# ------------------------------------------------------------------------------------------ model card


def code_blocks(card_text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.DOTALL)


def conditional_pipeline(null_class: bool) -> DiffEncPipeline:
    from conftest import make_encoder, make_unet

    from diffenc_diffusers import VDMScheduler

    classes = {"num_class_embeds": 10, "null_class": null_class}
    return DiffEncPipeline(
        unet=make_unet(**classes), scheduler=VDMScheduler(encoder_type="trainable"), encoder=make_encoder(**classes)
    )


RUN_BLOCKS = """
import json
import sys

for block in json.loads(open(sys.argv[1]).read()):
    exec(compile(block, "<model card>", "exec"), {"__name__": "__main__"})  # each block in a namespace of its own
"""


@pytest.mark.parametrize("kind", ["unconditional", "class-conditional"])
def test_every_code_block_of_the_model_card_runs_as_pasted(fake_hub, tmp_path, monkeypatch, kind):
    """Each block in a namespace of its own, in a new interpreter, its repository id served from an offline cache
    of the upload (the card's sampling steps lowered to 3 to keep the test short)."""
    monkeypatch.setattr(hub, "CARD_SAMPLING_STEPS", 3)
    pipe = make_pipeline("trainable") if kind == "unconditional" else conditional_pipeline(null_class=True)
    pipe.push_to_hub("org/diffenc-card", bpd=3.25)
    cache_upload(tmp_path / "home" / "hub", "org/diffenc-card", fake_hub["uploaded"])
    blocks = code_blocks(fake_hub["card"].text)
    assert len(blocks) == 2 and all('"org/diffenc-card"' in block for block in blocks)
    assert all("num_inference_steps=3" in block for block in blocks)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    completed = run_fresh(RUN_BLOCKS, tmp_path / "home", str(tmp_path / "blocks.json"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(re.findall(r"^tensor\(\d+\.\d+\)$", completed.stdout, flags=re.MULTILINE)) == (
        1 if kind == "unconditional" else 2
    )
    # The card of converted weights differs in its metadata and source section, not in its code.
    provenance = {"converted from": "the official code", "license_id": "other", "license_link": "https://x.org/l"}
    converted = hub.make_model_card(pipe, "org/diffenc-card", bpd=3.25, provenance=provenance)
    assert code_blocks(converted.text) == blocks


def test_model_card_metadata_has_the_license_and_the_test_bits_per_dim(fake_hub):
    make_pipeline("trainable").push_to_hub("org/digits", bpd=1.23456, training_info={"dataset": "digits"})
    data = fake_hub["card"].data
    assert data.license == "apache-2.0" and data.library_name == "diffusers"
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_name) == ("bits-per-dim", 1.2346, "digits")
    assert result.task_type == "unconditional-image-generation" and data.model_name == "digits"
    assert "made with diffenc-diffusers 0.1.0, which is not published on PyPI" in fake_hub["card"].text
    assert "`pip install -e .` in a checkout of diffenc-diffusers" in fake_hub["card"].text
    hub_dataset = hub.make_model_card(
        make_pipeline("none"), "org/c10", bpd=3.0, training_info={"dataset": "uoft-cs/cifar10"}
    )
    assert hub_dataset.data.eval_results[0].dataset_type == "uoft-cs/cifar10"
    assert hub.make_model_card(make_pipeline("none"), "org/c10").data.eval_results is None
    assert hub.make_model_card(make_pipeline("none"), "org/c10", bpd=float("nan")).data.eval_results is None
    provenance = {"license_id": "other", "license_link": "https://x.org/l"}
    assert hub.make_model_card(make_pipeline("none"), "org/c10", provenance=provenance).data.license == "other"


def test_a_component_class_the_package_does_not_export_is_a_clear_error(fake_hub, tmp_path):
    make_pipeline("none").save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"records the component 'scheduler' as 'DDIMScheduler'.*'VDMScheduler'"):
        hub.upload_pipeline_folder(make_pipeline("none"), tmp_path, "org/x")
    assert fake_hub["create_repo"] == []
