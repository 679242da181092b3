"""benchmarks/controllability_grid.py on the CPU with tiny sizes: the time-boxed many-process grid
that a lent GPU runs (jobs per reward and setting, summary and pack after each, the budget)."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import controllability_grid as grid  # noqa: E402


def test_parse_setting_splits_like_a_shell_and_names_folders():
    assert grid.parse_setting("ac10=--reward-cfg shapes_alignment=10 --steps 50") == (
        "ac10", ["--reward-cfg", "shapes_alignment=10", "--steps", "50"])
    assert grid.parse_setting("default=") == ("default", [])
    assert grid.parse_setting("ac10+s2=--seed 2") == ("ac10+s2", ["--seed", "2"])
    for bad in ("noequals", "=x", "a/b=--steps 2", "..=x"):
        with pytest.raises(ValueError, match="NAME=ARGS"):
            grid.parse_setting(bad)


@pytest.mark.slow
def test_grid_runs_sweeps_and_tables_then_summarizes_and_packs(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "controllability_grid.py"), "--out", str(out), "--work", str(work),
           "--stride", "150", "--n-samples", "1", "--steps", "1", "--jobs", "2", "--keys", "shapes_sharpness",
           "--setting", "default=", "--setting", "default+s2=--seed 2", "--setting", "iso=--negative isolate --steps 2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["setting"]: row for row in json.loads((out / "settings.json").read_text())}
    assert set(rows) == {"default", "iso"}  # default+s2 pooled into default
    assert rows["default"]["label"] == "w=5 steps=1" and rows["iso"]["label"] == "w=5 steps=2 s-=isolate"
    assert rows["default"]["n"] == {"shapes_sharpness": 4} and rows["iso"]["n"] == {"shapes_sharpness": 2}
    for row in rows.values():
        assert set(row["rho"]) == {"shapes_sharpness"} and len(row["curves"]["shapes_sharpness"]) == 9  # filled
        assert 0 <= row["shapes_eval"] <= 1  # its table job ran (zero s- even for the isolate setting)
    with tarfile.open(out / "grid.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"default/controllability/shapes_sharpness/sweep.json", "iso/table/table.json",
            "summary/iso_controllability.png"} <= names
    assert sorted(p.name for p in out.iterdir()) == ["grid.tar.gz", "log.txt", "settings.json", "settings.md"]
    assert not any(n.endswith(".png") and "/samples/" in n for n in names)  # no images but the grids
    log = (out / "log.txt").read_text()
    assert log.count("done ") == 5 and "0 failed" in log  # no table for the pooled replicate
    # A budget too small for anything: the jobs are killed or never started, and the log says so.
    r = subprocess.run(cmd[:3] + [str(tmp_path / "o2"), "--work", str(tmp_path / "w2"), "--budget-minutes", "0.001"]
                       + cmd[6:], capture_output=True, text=True, timeout=600)
    log = (tmp_path / "o2" / "log.txt").read_text()
    assert "budget spent" in log and "0 jobs done" in log
