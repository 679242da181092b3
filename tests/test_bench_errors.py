"""Benchmark scripts: clean one-line errors (exit 2) instead of tracebacks on bad input."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import _args  # noqa: E402
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


# what a script needs in front of the bad option (sub-command, positionals); required options come later
# The required arguments of each script, so that the option under test is what argparse reports
PREFIX = {"pack_minilm": ["pack", "out"], "x0_from_noise": ["shapes"],
          "shapes_training_study": ["table", "--out", "out", "--model", "shapes"],
          "caption_sensitivity": ["--model", "m=shapes"], "controllability_grid": ["--out", "out"],
          "denoise_error": ["--data", "d", "--model", "m=shapes"], "probe_peers": ["--peer", "dit", "--out", "out"],
          "single_object_probe": ["--out", "out"]}


class _Accepted(Exception):
    pass


def _parse_error(monkeypatch, capsys, script: str, args: list[str], prefix: list[str] | None = None) -> str:
    """``main(args)`` of ``script``, in this process, must stop in argparse: exit 2 and one line on stderr,
    returned. ``parse_args`` is guarded: arguments wrongly accepted fail the test instead of starting work."""
    def guarded(self, *a, **k):
        ns = real(self, *a, **k)
        raise _Accepted(f"{script} {' '.join(args)} was accepted: {ns}")

    real = _args.ArgumentParser.parse_args
    monkeypatch.setattr(_args.ArgumentParser, "parse_args", guarded)
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{script}.py")])  # the parser's prog, as when run as a file
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        module.main([*(PREFIX.get(script, []) if prefix is None else prefix), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{script}.py"), err
    return err.strip()


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


@pytest.mark.parametrize("script, value", [("bench_eval", "x"), ("bench_eval", "1,0"), ("bench_align", "0")])
def test_bad_batch_sizes_named(monkeypatch, capsys, script, value):
    err = _parse_error(monkeypatch, capsys, script, ["--batch-sizes", value])
    assert "--batch-sizes" in err and repr(value) in err, err


def test_x0_from_noise_per_prompt_must_be_positive(monkeypatch, capsys):
    assert "--per-prompt" in _parse_error(monkeypatch, capsys, "x0_from_noise", ["--per-prompt", "0"])


def test_positive_int_list():
    assert _args.positive_int_list("1,4, 16") == [1, 4, 16]
    assert study.positive_int_list is _args.positive_int_list and study.run_main is _args.run_main
    for bad in ("x", "", "1,,2", "0", "2,-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="integers >= 1"):
            _args.positive_int_list(bad)


def test_srpo_arms_typo_rejected(monkeypatch, capsys):
    err = _parse_error(monkeypatch, capsys, "srpo_shapes_study", ["--arms", "with_invresion", "--redraw"])
    assert "--arms" in err and "with_invresion" in err, err


def test_srpo_bad_base_refused_before_the_proxy_trains(tmp_path):
    proc = _run("srpo_shapes_study.py", "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "missing" in _one_error_line(proc)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("flag, value", [("--n", "9"), ("--steps", "201")])
def test_demo_bench_refuses_what_the_demo_refuses(flag, value):
    from miro.demo.handlers import DemoLimits

    assert (DemoLimits().max_images, DemoLimits().max_steps) == (8, 200)
    proc = _run("bench_demo.py", flag, value)  # before the fix: minutes of direct generation, then a 400
    assert proc.returncode == 2, proc.stderr
    err = _one_error_line(proc)
    assert flag in err and value in err and "limit" in err, err


def test_run_main_turns_errors_into_one_line(capsys):
    def bad_value():
        raise ValueError("--model must be a pipeline")

    def missing():
        raise FileNotFoundError(2, "No such file or directory", "/nowhere/data")

    for fn, msg in ((bad_value, "error: --model must be a pipeline"),
                    (missing, "error: No such file or directory: /nowhere/data")):
        with pytest.raises(SystemExit) as e:
            _args.run_main(fn)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == msg
    with pytest.raises(SystemExit) as e:
        _args.run_main(lambda: 0)
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


def test_help_shows_whole_docstring(capsys):
    for script in ("bench_demo", "bench_optim", "make_untrained_shapes"):
        with pytest.raises(SystemExit) as e:
            importlib.import_module(script).main(["--help"])
        assert e.value.code == 0
        doc_lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
        assert len(doc_lines) > 5


# ---------------------------------------------------------------- bad values, every script, in argparse
# Each case fails in argparse (the shared types of benchmarks/_args.py), before any model is loaded: the
# scripts' ``main(argv)`` is called in this process with ``parse_args`` guarded, so a value wrongly
# accepted fails the test instead of starting the benchmark.

SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.name.startswith("_"))
# scripts with --threads: 0 is refused (torch.set_num_threads raised a RuntimeError)
THREADS = ["bench_align", "bench_backbone", "bench_demo", "bench_eval", "bench_gpu", "bench_optim",
           "bench_pipeline", "bench_preprocess", "bench_rewards", "bench_train", "caption_sensitivity",
           "denoise_error", "make_untrained_shapes", "probe_peers", "single_object_probe"]
# script -> [(option, value)]: counts below 1 (or 0), non-numbers, nan, bad devices, unknown names
BAD = {
    "bench_align": [("--steps", "0"), ("--rollout-steps", "-1"), ("--batch-sizes", "x")],
    "bench_backbone": [("--iters", "-1"), ("--release-iters", "0"), ("--configs", "tiny,x"), ("--only", "x")],
    "bench_data_scale": [("--samples", "0"), ("--shards", "-1"), ("--bins-sample", "x")],
    "bench_demo": [("--repeats", "0"), ("--n", "-1"), ("--steps", "x")],
    "bench_eval": [("--images", "-1"), ("--steps", "0"), ("--batch-sizes", "nan")],
    "bench_gpu": [("--batch", "-1"), ("--device", "x"), ("--device", "0"), ("--device", "-1"), ("--device", "nan"),
                  ("--iters", "0"), ("--warmup", "-1"), ("--sample-batch", "0"), ("--cfg", "nan"),
                  ("--peak-tflops", "0"), ("--config", "x")],
    "bench_optim": [("--device", "x"), ("--device", "0"), ("--device", "nan"), ("--iters", "0"), ("--config", "x")],
    "bench_pipeline": [("--steps", "0"), ("--n", "-1"), ("--repeats", "x")],
    "bench_preprocess": [("--samples", "0"), ("--batch-size", "-1")],
    "bench_rewards": [("--n", "0"), ("--batch", "-1")],
    "bench_shapes": [("--n", "-1"), ("--resolution", "0"), ("--resolution", "65")],
    "bench_train": [("--steps", "0"), ("--warmup", "-1"), ("--load-batches", "x"), ("--device", "x")],
    "caption_sensitivity": [("--gammas", "nan"), ("--gammas", "0"), ("--num-images", "-1"), ("--seed", "-1"),
                            ("--model", "x"), ("--model", "=shapes")],
    "controllability_grid": [("--threads", "-1"), ("--jobs", "0"), ("--stride", "0"), ("--device", "x"),
                             ("--cfg", "nan"), ("--budget-minutes", "-1")],
    "denoise_error": [("--gammas", "nan"), ("--ode-from", "-1"), ("--ode-steps", "0"), ("--batch-size", "-1"),
                      ("--model", "shapes")],
    "make_parity_fixture": [],
    "make_pipeline_parity_fixture": [],
    "make_untrained_shapes": [("--n", "-1"), ("--steps", "0"), ("--seed", "-1")],
    "pack_minilm": [("--samples", "-1")],
    "probe_peers": [("--steps", "0"), ("--patch", "-1"), ("--patch", "5"), ("--lr", "nan"), ("--eval-every", "0")],
    "shapes_training_study": [("--stride", "0"), ("--n-samples", "-1"), ("--n-samples", "1001"), ("--cfg", "nan"),
                              ("--device", "x"), ("--batch-size", "0"), ("--seed", "-1")],
    "single_object_probe": [("--batch", "-1"), ("--eval-every", "0"), ("--lr", "nan"), ("--config", "x")],
    "srpo_shapes_study": [("--steps", "0"), ("--batch-size", "-1"), ("--lr", "nan"), ("--guidance", "nan"),
                          ("--eval-seeds", "0"), ("--discount-inv", "nan")],
    "x0_from_noise": [("--per-prompt", "-1"), ("--gammas", "nan"), ("--seed", "-1")],
}
NARGS2 = {"--discount-inv"}  # options that take two values


def test_every_script_is_listed():
    assert sorted(BAD) == SCRIPTS
    with_threads = sorted(s for s in SCRIPTS if '"--threads"' in (BENCH / f"{s}.py").read_text())
    assert sorted([*THREADS, "controllability_grid"]) == with_threads  # the grid's --threads 0 means cores / jobs


@pytest.mark.parametrize("script", THREADS)
def test_zero_threads_refused(monkeypatch, capsys, script):
    err = _parse_error(monkeypatch, capsys, script, ["--threads", "0"])
    assert err.endswith("error: argument --threads: expected an integer >= 1; got '0'"), err


@pytest.mark.parametrize("script, option, value", [(s, o, v) for s, cases in BAD.items() for o, v in cases])
def test_bad_value_refused(monkeypatch, capsys, script, option, value):
    values = [value] * (2 if option in NARGS2 else 1)
    err = _parse_error(monkeypatch, capsys, script, [option, *values])
    assert f"argument {option}" in err and (repr(value) in err or f"invalid choice: {value} " in err), err
    assert "expected" in err or "use cpu, cuda, cuda:N or mps" in err or "choose from" in err, err


@pytest.mark.parametrize("sub, option, value", [
    ("convergence", "--at-steps", "500,x"), ("convergence", "--every", "0"), ("convergence", "--max-step", "-1"),
    ("data", "--limit", "-1"), ("controllability", "--others", "1.5"), ("guidance", "--steps", "0"),
    ("guidance", "--cfgs", "1,nan"), ("guidance", "--steps-list", "25,0"), ("guidance", "--shifts", "0"),
    ("guidance", "--reward-cfgs", "-1")])
def test_study_sub_commands(monkeypatch, capsys, sub, option, value):
    err = _parse_error(monkeypatch, capsys, "shapes_training_study", [option, value], prefix=[sub])
    assert err.startswith(f"shapes_training_study.py {sub}: error: argument {option}: expected "), err
    assert repr(value) in err, err


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_one_line(monkeypatch, capsys, script):
    """Every script's parser (and sub-command parser) is the shared one: no usage block, one line."""
    err = _parse_error(monkeypatch, capsys, script, ["--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in err, err


@pytest.mark.parametrize("text, ok", [("1", 1), ("12", 12), ("0", None), ("-1", None), ("x", None), ("nan", None),
                                      ("1.5", None), ("", None)])
def test_positive_int(text, ok):
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected an integer >= 1; got {text!r}"):
            _args.positive_int(text)
    else:
        assert _args.positive_int(text) == ok
    assert _args.nonneg_int("0") == 0


@pytest.mark.parametrize("fn, good, bad", [
    (_args.finite_float, ["-1", "0", "2.5"], ["nan", "inf", "x"]),
    (_args.nonneg_float, ["0", "7"], ["-1", "nan", "-inf"]),
    (_args.positive_float, ["1e-4"], ["0", "-1", "nan"]),
    (_args.unit_float, ["0", "0.5", "1"], ["-0.1", "1.5", "nan"]),
    (_args.open_unit_float, ["0.5"], ["0", "1", "nan"]),
])
def test_float_types(fn, good, bad):
    for text in good:
        assert fn(text) == float(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected .*; got {text!r}"):
            fn(text)


def test_list_types():
    assert _args.nonneg_float_list("0, 7.5") == [0.0, 7.5] and _args.positive_float_list("0.5,2") == [0.5, 2.0]
    assert _args.comma_choices(["tiny", "shapes"])("shapes, tiny") == "shapes,tiny"
    for fn, bad in ((_args.nonneg_float_list, "1,-1"), (_args.positive_float_list, "0"),
                    (_args.comma_choices(["tiny"]), "tiny,x"), (_args.int_in(32, 64), "65"),
                    (_args.name_eq_source, "shapes"), (_args.name_eq_source, "a=")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^expected .*; got {bad!r}$"):
            fn(bad)


def test_device_type():
    import torch

    assert _args.device("cpu") == "cpu"
    for bad in ("x", "0", "-1", "nan", "", "meta"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{bad!r} is not (a device|supported); use cpu"):
            _args.device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="^'cuda': CUDA is not available"):
            _args.device("cuda")


@pytest.mark.parametrize("script, args, cwd", [
    ("bench_eval.py", ["--threads", "0"], None),
    ("bench_eval.py", ["--threads", "-1"], "tmp"),  # run from another folder
    ("shapes_training_study.py", ["data", "--data", "d", "--limit", "-1"], "tmp"),  # a sub-command
])
def test_script_run_as_a_file(tmp_path, script, args, cwd):
    """``python benchmarks/<script>.py``: the shared module is found beside the script, from any folder."""
    proc = _run(script, *args, cwd=tmp_path if cwd else None)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert f"argument {args[-2]}: expected an integer >= " in line and repr(args[-1]) in line, line
