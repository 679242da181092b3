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
