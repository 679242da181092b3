"""`miro download`: listing, name resolution, dry runs and a clear error offline."""

from __future__ import annotations

import pytest

from miro import download as D


def test_list_and_dry_run(capsys):
    assert D.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "nicolas-dufour/miro" in out and "stabilityai/sdxl-vae" in out and "google/flan-t5-xl" in out
    assert D.main(["pipeline", "text-encoder", "vae", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["nicolas-dufour/miro", "google/flan-t5-xl", "stabilityai/sdxl-vae"]
    assert D.main(["ablations", "--variant", "miro-only-aesthetic", "--dry-run"]) == 0
    assert "miro-only-aesthetic/*" in capsys.readouterr().out
    # the 15 published subfolders, named when a variant is not one of them or has no `ablations` to select from
    assert len(D.ABLATION_VARIANTS) == 15 and len(set(D.ABLATION_VARIANTS)) == 15
    assert D.main(["ablations", "--variant", "miro-no-nothing", "--dry-run"]) == 2
    assert "miro-no-nothing" in (err := capsys.readouterr().err) and "miro-only-vqa" in err
    assert D.main(["pipeline", "--variant", "miro-no-clip", "--dry-run"]) == 2
    assert "miro download ablations --variant miro-no-clip" in capsys.readouterr().err
    # an empty variant is not "all 15"; --list with names would ignore them
    assert D.main(["ablations", "--variant", "", "--dry-run"]) == 2
    assert "--variant '' is not a published ablation" in capsys.readouterr().err
    assert D.main(["--list", "extra"]) == 2
    assert "--list takes no names (got extra)" in capsys.readouterr().err


def test_groups_deduplicate_shared_repositories():
    repos = [r for r, _, _ in D.resolve(["rewards"])]
    assert len(repos) == len(set((r, tuple(p) if p else None) for r, p, _ in D.resolve(["rewards"])))
    assert "yuvalkirstain/PickScore_v1" in repos and "xswu/HPSv2" in repos and "Jialuo21/SciScore" in repos
    assert len(D.resolve(["aesthetic_score", "geneval"])) == 3  # the shared CLIP-L/14 entry once
    with pytest.raises(ValueError, match="unknown download 'dalle'"):
        D.resolve(["dalle"])


def test_offline_is_a_clear_error(capsys):
    # tests run with HF_HUB_OFFLINE=1 (conftest)
    assert D.main(["vae"]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert D.main([]) == 2
    assert D.main(["nothing-like-this"]) == 2


def test_ablation_variants_are_the_training_recipes_variant_names():
    from pathlib import Path

    import yaml

    configs = Path(D.__file__).parent / "configs" / "experiment"
    names = {yaml.safe_load(f.read_text()).get("variant_name") for f in configs.glob("*.yaml")}
    assert names - {None, "miro"} == set(D.ABLATION_VARIANTS)


def test_an_unreachable_hub_stops_at_the_first_repository(capsys, monkeypatch):
    from huggingface_hub.utils import LocalEntryNotFoundError

    calls = []

    def unreachable(repo, **kw):
        calls.append(repo)
        raise LocalEntryNotFoundError("Got: ConnectError: name not known\nAn error happened while trying to locate")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    assert D.main(["pipeline", "text-encoder", "vae"]) == 1
    assert calls == ["nicolas-dufour/miro"]  # not once per repository, each failing alike
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("miro download: the hub could not be reached (Got: ConnectError")
    assert "3 of 3 repositories not fetched" in err
