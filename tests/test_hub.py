"""Tests of the Hub side of DiffEncPipeline: loading Hub ids through huggingface_hub's real cache code (offline),
a fresh-process round trip, and push_to_hub's model card and exact uploaded file set.

Nothing here touches the network: Hub ids are resolved from a cache laid out like huggingface_hub's
(`models--org--name/refs/<ref>` and `snapshots/<commit>/...`) with downloads disabled, and uploads are
intercepted where diffenc_diffusers.hub looks up `create_repo` and `upload_folder`.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from test_pipeline import make_pipeline, sample

import diffenc_diffusers.hub as hub
from diffenc_diffusers import DiffEncPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40
TRAINABLE_FILES = {
    "README.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "encoder/config.json",
    "encoder/diffusion_pytorch_model.safetensors",
}


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
    assert set(filter_repo_objects(files, allow_patterns=patterns)) == TRAINABLE_FILES - {"README.md"}


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


@pytest.fixture
def fake_hub(monkeypatch):
    """Intercept create_repo / upload_folder; record the repo, the model card and the files that would go up."""
    record = {}

    class RepoUrl:
        def __init__(self, repo_id):
            self.repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"

    def create_repo(repo_id, **kwargs):
        record["create_repo"] = (repo_id, kwargs)
        return RepoUrl(repo_id)

    def upload_folder(*, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        record["uploaded"] = set(
            filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        record["card"] = ModelCard((folder / "README.md").read_text())
        record["upload"] = (repo_id, kwargs)
        return "commit-info"

    monkeypatch.setattr(hub, "create_repo", create_repo)
    monkeypatch.setattr(hub, "upload_folder", upload_folder)
    return record


def test_push_to_hub_uploads_exactly_the_pipeline_files_with_a_model_card(fake_hub):
    pipe = make_pipeline("trainable")
    training_info = {"dataset": "uoft-cs/cifar10", "max_train_steps": 1000, "num_timesteps": None}
    result = pipe.push_to_hub("org/diffenc-tiny", private=True, token="hf_x", training_info=training_info, bpd=2.6189)
    assert result == "commit-info"
    assert fake_hub["create_repo"] == ("org/diffenc-tiny", {"exist_ok": True, "private": True, "token": "hf_x"})
    assert fake_hub["upload"][0] == "org/diffenc-tiny" and fake_hub["upload"][1]["token"] == "hf_x"
    assert fake_hub["uploaded"] == TRAINABLE_FILES

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


def test_save_pretrained_push_leaves_checkpoints_and_other_files_behind(fake_hub, tmp_path):
    pipe = make_pipeline("none")
    (tmp_path / "checkpoint-500" / "unet").mkdir(parents=True)
    (tmp_path / "checkpoint-500" / "unet" / "config.json").write_text("{}")
    (tmp_path / "checkpoint-500" / "optimizer.bin").write_bytes(b"\0")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "events.out").write_text("")
    (tmp_path / "training_args.json").write_text("{}")
    pipe.save_pretrained(tmp_path, push_to_hub=True, repo_id="tiny-vdm", commit_message="first")
    assert fake_hub["create_repo"][0] == "tiny-vdm"
    assert fake_hub["upload"] == ("me/tiny-vdm", {"commit_message": "first", "token": None, "create_pr": False})
    assert fake_hub["uploaded"] == {
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }
    card = fake_hub["card"]
    assert "Not evaluated yet." in card.text and "Training settings were not recorded." in card.text
    assert "no encoder" in card.text and 'from_pretrained("me/tiny-vdm")' in card.text


def test_pipeline_files_lists_only_the_components_of_model_index(tmp_path):
    make_pipeline("trainable").save_pretrained(tmp_path)
    (tmp_path / "encoder" / "notes.txt").write_text("")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "config.json").write_text("{}")
    assert set(hub.pipeline_files(tmp_path)) == TRAINABLE_FILES - {"README.md"}


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
    assert "class_labels=class_labels" in text and "bits_per_dim(uint8_images, class_labels=labels" in text
    if null_class:
        assert "| null class | yes: label 10, the unconditional model" in text
        assert "guidance_scale=3.0" in text and "torch.full_like(labels, 10)" in text
    else:
        assert "| null class | no (guidance_scale must be 1) |" in text
        assert "guidance_scale=1.0" in text and "full_like" not in text
    unconditional = hub.make_model_card(make_pipeline("trainable"), "org/plain").text
    assert "An unconditional image model" in unconditional and "class_labels" not in unconditional
