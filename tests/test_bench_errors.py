"""Benchmark scripts: clean one-line errors (exit 2) instead of tracebacks on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import shapes_training_study as study  # noqa: E402


def _run(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd or REPO)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_peer_package_is_one_line(tmp_path):
    missing = tmp_path / "no_such_peer"
    proc = _run("make_parity_fixture.py", "--peer", str(missing), "--scratch", str(tmp_path / "s"),
                "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert line == (f"error: published package not found at {missing}; pass --peer DIR "
                    "(see make_parity_fixture.py)")
    assert not (tmp_path / "s").exists()


def test_load_peer_raises_clear_error(tmp_path):
    from make_parity_fixture import load_peer

    with pytest.raises(FileNotFoundError, match="published package not found at .*; pass --peer DIR"):
        load_peer(tmp_path / "missing", tmp_path / "scratch")


@pytest.mark.parametrize("script, value", [("bench_eval.py", "x"), ("bench_eval.py", "1,0"),
                                           ("bench_align.py", "0")])
def test_bad_batch_sizes_named(script, value):
    proc = _run(script, "--batch-sizes", value)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--batch-sizes" in proc.stderr and repr(value) in proc.stderr, proc.stderr


def test_x0_from_noise_per_prompt_must_be_positive():
    proc = _run("x0_from_noise.py", "shapes", "--per-prompt", "0")
    assert proc.returncode == 2
    assert "--per-prompt" in proc.stderr and "Traceback" not in proc.stderr


def test_positive_int_list():
    assert study.positive_int_list("1,4, 16") == [1, 4, 16]
    for bad in ("x", "", "1,,2", "0", "2,-1"):
        with pytest.raises(Exception, match="integers >= 1"):
            study.positive_int_list(bad)


def test_srpo_arms_typo_rejected():
    proc = _run("srpo_shapes_study.py", "--arms", "with_invresion", "--redraw")
    assert proc.returncode == 2
    assert "--arms" in proc.stderr and "with_invresion" in proc.stderr and "Traceback" not in proc.stderr


def test_run_main_turns_errors_into_one_line(capsys):
    def bad_value():
        raise ValueError("--model must be a pipeline")

    def missing():
        raise FileNotFoundError(2, "No such file or directory", "/nowhere/data")

    for fn, msg in ((bad_value, "error: --model must be a pipeline"),
                    (missing, "error: No such file or directory: /nowhere/data")):
        with pytest.raises(SystemExit) as e:
            study.run_main(fn)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == msg
    with pytest.raises(SystemExit) as e:
        study.run_main(lambda: 0)
    assert e.value.code == 0


def test_bad_folder_is_one_line(tmp_path):
    proc = _run("bench_rewards.py", "--suite", "shapes", "--n", "2", "--folder", str(tmp_path / "missing"))
    assert proc.returncode == 2, proc.stderr
    assert _one_error_line(proc).startswith("error: ")


def test_table_model_without_name(monkeypatch, tmp_path):
    """``table --model shapes`` (no NAME=) names the row by its source instead of failing."""
    seen = []

    def fake_load(src, weights, device=None):
        seen.append(src)
        raise RuntimeError("stop after the name is parsed")

    monkeypatch.setattr(study, "load", fake_load)
    monkeypatch.setattr(study, "eval_items", lambda stride: [])
    monkeypatch.setattr(study, "_scorers", lambda: {})
    with pytest.raises(RuntimeError, match="stop after"):
        study.main(["table", "--model", "shapes", "--out", str(tmp_path)])
    assert seen == ["shapes"]


@pytest.mark.parametrize("spec, name", [("shapes", "shapes"), ("runs/a/last.ckpt", "last"),
                                        ("runs/b/", "b"), ("base=shapes", "base")])
def test_table_row_names(monkeypatch, tmp_path, spec, name):
    rows = []

    def fake_eval_row(pipe, items, outdir, gcfg, scorers, counts):
        rows.append(outdir.name)
        raise RuntimeError("stop")

    monkeypatch.setattr(study, "load", lambda src, weights, device=None: object())
    monkeypatch.setattr(study, "eval_items", lambda stride: [])
    monkeypatch.setattr(study, "_scorers", lambda: {})
    monkeypatch.setattr(study, "eval_row", fake_eval_row)
    with pytest.raises(RuntimeError, match="stop"):
        study.main(["table", "--model", spec, "--out", str(tmp_path)])
    assert rows == [name]


def test_help_shows_whole_docstring():
    for script in ("bench_demo.py", "bench_optim.py", "make_untrained_shapes.py"):
        proc = _run(script, "--help")
        assert proc.returncode == 0, proc.stderr
        doc_lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        assert len(doc_lines) > 5
