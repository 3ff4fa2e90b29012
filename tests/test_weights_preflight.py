"""A run's weights checked before any work (align.setup.preflight): every missing one listed in one message with
the command that fetches them (align.fetch); hub weights downloaded into the Hugging Face cache on first use when
online and read from the cache only with HF_HUB_OFFLINE=1, with huggingface_hub mocked where align calls it."""
from __future__ import annotations

import os

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from align.core.weights import WeightSpec, WeightsError, resolve
from tests.helpers.cli import align_run, run_main

ALIGN_WEIGHT_VARS = ("ALIGN_CLIP_FEATURES_WEIGHTS", "ALIGN_AESTHETIC_CLIP_WEIGHTS", "ALIGN_AESTHETIC_HEAD_WEIGHTS",
                     "ALIGN_HPSV2_WEIGHTS", "ALIGN_PICKSCORE_MODEL", "ALIGN_PICKSCORE_PROCESSOR")


@pytest.fixture(autouse=True)
def _empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no weight environment variables: a machine that has downloaded nothing."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in ALIGN_WEIGHT_VARS:
        monkeypatch.delenv(var, raising=False)


def _no_network(*args, **kwargs):
    raise AssertionError(f"the hub was asked for {args} {kwargs} although HF_HUB_OFFLINE=1")


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_network)


def _online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


def _fake_snapshots(root, calls):
    """A snapshot_download that 'downloads' a repo into ``root``: for each allowed folder pattern ``f/*`` a config,
    a scheduler config and a weight file (what a diffusers component folder holds), recording each call."""
    def snapshot_download(repo_id, allow_patterns=(), local_files_only=False, **_):
        calls.append((repo_id, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("no cached snapshot")
        folder = root / repo_id.replace("/", "--")
        for pattern in allow_patterns:
            sub = folder / pattern.rsplit("/", 1)[0] if "/" in pattern else folder
            sub.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "scheduler_config.json", "model.safetensors", "vocab.json"):
                (sub / name).write_text("{}")
        return str(folder)
    return snapshot_download


# ---- one message for every missing weight ----------------------------------------------------------------------
def test_first_run_lists_every_missing_weight_and_the_fetch_command(tmp_path, monkeypatch):
    """`align.run algo=vggflow reward=aesthetic` offline on a machine without weights: one attempt names all five
    (metric features, SD3 checkpoint, TAESD3, the aesthetic reward's CLIP tower and head) and the fetch command,
    exits 2 without a traceback and leaves no run directory."""
    _offline(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshots(tmp_path, []))
    result = align_run("algo=vggflow", "reward=aesthetic", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("align: 5 weights this run needs are missing")
    numbered = [line for line in result.stderr.splitlines() if line.startswith("  ")]
    for i, key in enumerate(("model.features.weights", "model.pretrained", "model.taesd3_path",
                             "reward.clip_weights", "reward.head_weights"), 1):
        assert numbered[i - 1].startswith(f"  {i}. ") and f"`{key}=" in numbered[i - 1], numbered[i - 1]
    assert "python -m align.fetch algo=vggflow reward=aesthetic" in result.stderr
    assert not (tmp_path / "run").exists()


def test_features_message_names_every_other_feature_kind(monkeypatch):
    """Missing CLIP metric features (any reward, e.g. reward=callable): the message names model.features.kind=pixels
    (no weights) and the other kinds as ways forward, beside the key and environment variable of the file."""
    from align.metrics.features import build_features

    _offline(monkeypatch)
    with pytest.raises(WeightsError) as err:
        build_features({"kind": "clip", "model_name": "ViT-L-14"})
    message = str(err.value)
    for way in ("model.features.kind=pixels", "model.features.kind=dreamsim", "model.features.kind=inception",
                "model.features.weights=<path>", "ALIGN_CLIP_FEATURES_WEIGHTS", "diversity and FID"):
        assert way in message, way


def test_a_run_with_pixel_features_needs_no_feature_weights(tmp_path, monkeypatch):
    """model.features.kind=pixels takes the metric features out of the list (four left, none of them features)."""
    from align.setup.compose import compose_config
    from align.setup.preflight import missing_weights, weight_needs

    _offline(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshots(tmp_path, []))
    errors = missing_weights(weight_needs(compose_config(["reward=aesthetic", "model.features.kind=pixels"])))
    assert len(errors) == 4
    assert not any("model.features" in str(e).split(". Get ")[0] for e in errors)


# ---- hub weights: downloaded when online, the cache only offline ---------------------------------------------------
HEAD = WeightSpec(what="a head", filename="head.pth", config_key="reward.head_weights", hub_repo="owner/heads",
                  hub_files=("head.safetensors", "head.pth"))


def test_online_hub_weight_downloads_into_the_cache_on_first_use(tmp_path, monkeypatch):
    """Online, a hub weight not in the cache is downloaded (the first of its file names the repo has)."""
    _online(monkeypatch)
    asked = []

    def hf_hub_download(repo_id, filename, **_):
        asked.append((repo_id, filename))
        if filename == "head.safetensors":
            raise EntryNotFoundError("no such file in the repo")
        path = tmp_path / filename
        path.write_bytes(b"weights")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert resolve(HEAD) == str(tmp_path / "head.pth")
    assert asked == [("owner/heads", "head.safetensors"), ("owner/heads", "head.pth")]


def test_online_download_failure_names_the_repo_and_the_way_forward(monkeypatch):
    _online(monkeypatch)

    def hf_hub_download(repo_id, filename, **_):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(WeightsError, match=r"downloading 'owner/heads' .* failed \(OSError: network is unreachable"
                                           r"\).*`reward.head_weights=<path>`"):
        resolve(HEAD)


def test_offline_hub_weight_is_not_requested_and_is_reported_missing(monkeypatch):
    """HF_HUB_OFFLINE=1: the hub is not asked (the mock fails the test if it is); the message says why."""
    _offline(monkeypatch)
    with pytest.raises(WeightsError, match=r"HF_HUB_OFFLINE=1: not downloaded.*Get head.pth"):
        resolve(HEAD)


@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_snapshot_reads_the_cache_only_offline(tmp_path, monkeypatch, offline):
    """A hub id (model.pretrained=owner/name) is a snapshot_download: local_files_only exactly when offline."""
    (_offline if offline else _online)(monkeypatch)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshots(tmp_path, calls))
    spec = WeightSpec(what="a checkpoint", filename="a diffusers directory", config_key="model.pretrained",
                      is_dir=True, required=(("transformer/config.json",),), hub_ids=True)
    if offline:
        with pytest.raises(WeightsError, match="HF_HUB_OFFLINE=1: not downloaded"):
            resolve(spec, "owner/model")
    else:
        assert resolve(spec, "owner/model") == str(tmp_path / "owner--model")
    assert calls == [("owner/model", offline)]


# ---- python -m align.fetch ------------------------------------------------------------------------------------------
def _fetch(*argv):
    from align.fetch import main

    return run_main(main, argv)


def test_fetch_downloads_every_hub_weight_of_the_run(tmp_path, monkeypatch):
    """Online, align.fetch with a run's overrides downloads the checkpoint, TAESD3, the HPSv2 file and the CLIP
    metric features, prints each path and exits 0."""
    _online(monkeypatch)
    snapshots, files = [], []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshots(tmp_path, snapshots))

    def hf_hub_download(repo_id, filename, **_):
        files.append((repo_id, filename))
        path = tmp_path / "files" / filename
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weights")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    result = _fetch("reward=hpsv2", "algo=vggflow")
    assert result.returncode == 0, result.stderr
    assert [repo for repo, _ in snapshots] == ["stabilityai/stable-diffusion-3-medium-diffusers",
                                               "madebyollin/taesd3"]
    assert files == [("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"),
                     ("xswu/HPSv2", "HPS_v2.1_compressed.pt")]
    assert str(tmp_path / "files" / "HPS_v2.1_compressed.pt") in result.stdout
    assert "all 4 weights of this run are available" in result.stdout


def test_fetch_offline_lists_the_missing_weights_and_exits_2(tmp_path, monkeypatch):
    _offline(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshots(tmp_path, []))
    result = _fetch("reward=pickscore", "model.features.kind=pixels")
    assert result.returncode == 2
    assert result.stderr.startswith("align: 4 weights this run needs are missing")
    assert "`reward.model=<path>`" in result.stderr and "`reward.processor=<path>`" in result.stderr
    assert "python -m align.fetch reward=pickscore model.features.kind=pixels model=sd3" in result.stderr


def test_fetch_of_a_run_without_downloadable_weights(monkeypatch):
    _offline(monkeypatch)
    result = _fetch("model=gmm", "reward=linear")
    assert result.returncode == 0, result.stderr
    assert "needs no weights" in result.stdout
    assert os.path.isdir(constants.HF_HUB_CACHE) is False     # nothing was written to the cache
