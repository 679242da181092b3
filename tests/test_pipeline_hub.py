"""Pipeline resolution: built-in names first, hub repos restricted to the variant's files,
offline errors, push_to_hub (hub client replaced by a recorder; no network)."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

import miro.hub as hub
from miro.encoders.tiny import tiny_pipeline
from miro.pipeline import MiroPipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return tiny_pipeline(root / "enc", text="bert").save_pretrained(root / "pipe")


def test_offline_unknown_repo_fails_fast_with_clear_error():
    t0 = time.perf_counter()
    with pytest.raises(OSError, match=r"could not fetch pipeline 'nobody/no-such-miro'.*offline"):
        MiroPipeline.from_pretrained("nobody/no-such-miro")
    assert time.perf_counter() - t0 < 10  # HF_HUB_OFFLINE read at call time: no network retries


def test_not_a_name_folder_or_repo():
    with pytest.raises(ValueError, match=r"'no/such/thing' is not a built-in pipeline \(\["):
        MiroPipeline.from_pretrained("no/such/thing")
    for missing_file in ("runs/last.ckpt", "out/model.safetensors"):  # a typo'd path is not sent to the hub
        with pytest.raises(ValueError, match="is not a built-in pipeline"):
            MiroPipeline.from_pretrained(missing_file)


def test_a_dot_in_a_hub_name_goes_to_the_hub(saved, tmp_path, monkeypatch):
    seen = {}

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        seen["repo_id"] = repo_id
        return str(saved)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    MiroPipeline.from_pretrained("someone/miro-v1.5")
    assert seen["repo_id"] == "someone/miro-v1.5"


def test_builtin_names_resolve_before_the_hub(saved, tmp_path, monkeypatch):
    builtin = tmp_path / "pipelines"
    shutil.copytree(saved, builtin / "mini")
    monkeypatch.setattr(hub, "BUILTIN_DIR", builtin)

    def no_hub(*a, **k):
        raise AssertionError("the hub must not be consulted for a built-in name")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    assert hub.builtin_pipelines() == ["mini"]
    pipe = MiroPipeline.from_pretrained("mini")
    assert pipe.source == str(builtin / "mini")


@pytest.mark.parametrize("variant", [None, "miro-no-clip"])
def test_hub_download_is_restricted_to_variant_files(saved, tmp_path, monkeypatch, variant):
    snap = tmp_path / "snapshot"
    shutil.copytree(saved, snap / variant if variant else snap)
    seen = {}

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns, **kw)
        return str(snap)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    pipe = MiroPipeline.from_pretrained("someone/miro-ablations", variant=variant, revision="abc",
                                        cache_dir=str(tmp_path / "cache"))
    prefix = f"{variant}/" if variant else ""
    assert seen["repo_id"] == "someone/miro-ablations" and seen["revision"] == "abc"
    assert sorted(seen["allow_patterns"]) == sorted(
        prefix + f for f in ("config.json", "model.safetensors", "uncond_embedding.npy", "reward_bins.json"))
    assert seen["local_files_only"] is True  # HF_HUB_OFFLINE=1 in tests
    assert seen["cache_dir"] == str(tmp_path / "cache")
    ref = MiroPipeline.from_pretrained(saved)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], v)


def test_hub_variant_missing_is_named(saved, tmp_path, monkeypatch):
    snap = tmp_path / "snapshot"
    snap.mkdir()
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: str(snap))
    with pytest.raises(ValueError, match="variant 'miro-only-x' not found in 'someone/repo'"):
        MiroPipeline.from_pretrained("someone/repo", variant="miro-only-x")


def test_variant_name_cannot_escape_the_folder(saved):
    with pytest.raises(ValueError, match="plain subfolder name"):
        MiroPipeline.from_pretrained(saved, variant="../p")


def test_push_to_hub_uploads_the_saved_folder(saved, tmp_path, monkeypatch):
    pipe = MiroPipeline.from_pretrained(saved)
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None, revision=None,
                          delete_patterns=None):
            calls["upload"] = (repo_id, path_in_repo, commit_message)
            calls["delete"] = delete_patterns
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return "https://hub.example/commit/1"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = pipe.push_to_hub("me/my-miro", variant="miro-x", private=True, token="t")
    assert url == "https://hub.example/commit/1"
    assert calls["create"] == ("me/my-miro", True, True)
    assert calls["upload"][:2] == ("me/my-miro", "miro-x")
    # what this pipeline lacks is deleted where it goes, by exact name (never another variant's files)
    assert pipe.reward_bins is None and calls["delete"] == ["reward_bins.json", "init.json"]
    with pytest.raises(ValueError, match="variant must be a plain subfolder name; got '../evil'"):
        pipe.push_to_hub("me/my-miro", variant="../evil")
    up = MiroPipeline.from_pretrained(tmp_path / "uploaded")
    up.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np")
    assert np.array_equal(up("a red circle", generator=torch.Generator().manual_seed(0), **kw),
                          pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw))
    # the stored dtype reaches the upload (miro convert --dtype float16 --push-to-hub)
    shutil.rmtree(tmp_path / "uploaded")
    pipe.push_to_hub("me/my-miro", dtype="float16")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "uploaded" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} - {torch.bool} == {torch.float16}
    # a pipeline with bins keeps them: only what it lacks is deleted
    from miro.rewards.binning import RewardBins

    shutil.rmtree(tmp_path / "uploaded")
    pipe.reward_bins = RewardBins(4, {pipe.coherence_keys[0]: [0.0, 0.1, 0.2, 0.3, 0.4]})
    pipe.push_to_hub("me/my-miro", variant="miro-x")
    assert calls["delete"] == ["init.json"] and (tmp_path / "uploaded" / "reward_bins.json").is_file()


def test_save_is_atomic_per_file(saved, tmp_path, monkeypatch):
    """A failing write leaves no partial file and no temp file behind."""
    pipe = MiroPipeline.from_pretrained(saved)
    import safetensors.torch as st

    def boom(state, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        pipe.save_pretrained(out)
    assert list(out.iterdir()) == []


def test_half_precision_weights_load_as_float32(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    half = tmp_path / "half"
    shutil.copytree(saved, half)
    state = load_file(str(half / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(half / "model.safetensors"))
    pipe = MiroPipeline.from_pretrained(str(half))
    loaded = pipe.model.state_dict()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype, k  # float32 (bool masks stay bool)
        torch.testing.assert_close(loaded[k], v.half().to(v.dtype) if v.is_floating_point() else v, rtol=0, atol=0)
    assert MiroPipeline.from_pretrained(str(half), dtype=torch.bfloat16).model.network.latents.dtype == torch.bfloat16


def test_a_local_pipeline_folder_shadows_a_builtin_of_its_name(saved, tmp_path, monkeypatch):
    builtin = tmp_path / "pipelines"
    shutil.copytree(saved, builtin / "mini")
    monkeypatch.setattr(hub, "BUILTIN_DIR", builtin)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mini").mkdir()  # a folder of that name without a pipeline: the built-in still loads
    assert MiroPipeline.from_pretrained("mini").source == str(builtin / "mini")
    shutil.rmtree(tmp_path / "mini")
    shutil.copytree(saved, tmp_path / "mini")  # what save_pretrained("mini") wrote: that loads, with a warning
    with pytest.warns(UserWarning, match="not the built-in"):
        assert MiroPipeline.from_pretrained("mini").source == "mini"


def test_save_then_load_reproduces_the_images_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    pipe = tiny_pipeline(tmp_path / "enc", text="t5", codec="vae")
    again = MiroPipeline.from_pretrained(str(pipe.save_pretrained(tmp_path / "p")))
    # load_file's tensors sit at the file's byte offsets; the loaded weights are aligned copies
    assert any(v.data_ptr() % 64 for v in load_file(str(tmp_path / "p" / "model.safetensors")).values())
    assert all(p.data_ptr() % 64 == 0 for p in again.model.parameters())
    kw = dict(num_inference_steps=3, output_type="pt")
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)
    b = again("a red circle", generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)))


def test_save_warns_when_the_config_points_at_local_encoder_folders(tmp_path):
    pipe = tiny_pipeline(tmp_path / "enc", text="bert")  # its encoders are local folders
    with pytest.warns(UserWarning, match="local encoder folders"):
        pipe.save_pretrained(tmp_path / "p")


def test_the_config_scheduler_and_decode_chunk_are_used_as_published(saved, tmp_path):
    import json

    folder = tmp_path / "pipe"
    shutil.copytree(saved, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["scheduler"] = {"start": 0.9, "end": 0.1, "shift": 0.5, "clip_min": 0.3}
    cfg.setdefault("postprocessing", {})["max_batch_size"] = 3  # VAEDecoderPostProcessing's argument
    (folder / "config.json").write_text(json.dumps(cfg))
    pipe = MiroPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent",
         callback=lambda i, g, x: seen.append(float(g)))
    # gammas after each step: max(0.1 + 0.8 i/N, 0.3), the shift of 0.5 ignored as published
    np.testing.assert_allclose(seen, [max(0.1 + 0.8 * i / 4, 0.3) for i in range(1, 5)], rtol=1e-6)
    lazy_vae = MiroPipeline.from_pretrained(folder, vae="stabilityai/sdxl-vae").autoencoder  # weights load on use
    assert lazy_vae.max_batch_size == 3
    cfg["postprocessing"]["max_batch_size"] = 0
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="postprocessing.max_batch_size must be an integer >= 1; got 0"):
        MiroPipeline.from_pretrained(folder, vae="stabilityai/sdxl-vae")


def test_hub_errors_are_one_line(saved, monkeypatch):
    def unreachable(*a, **k):
        raise OSError("Got: ConnectError: name not known\nAn error happened while trying to locate the files")

    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    with pytest.raises(OSError, match="could not fetch pipeline 'someone/repo'.*name not known An error happened") as e:
        MiroPipeline.from_pretrained("someone/repo")
    assert "\n" not in str(e.value)

    class Offline:
        def __init__(self, token=None):
            pass

        def create_repo(self, *a, **k):
            raise RuntimeError("ConnectError: [Errno -2] Name or service not known")  # the hub client's own type

    monkeypatch.setattr("huggingface_hub.HfApi", Offline)
    with pytest.raises(OSError, match=r"could not upload to the hub repo 'me/my-miro' \(RuntimeError: ConnectError"):
        MiroPipeline.from_pretrained(saved).push_to_hub("me/my-miro")
