"""A base install (no extras): the commands that need one fail first, in one line naming it."""

import re
import sys
import tomllib
from pathlib import Path

import pytest

import miro.extras as extras
from miro.cli import main as miro_main

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name where they differ
DIST = {"hydra": "hydra-core"}


def _extras() -> dict[str, set[str]]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {k: {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in v} for k, v in meta.items()}


def test_extra_of_matches_pyproject():
    ex = _extras()
    for module, extra in extras.EXTRA_OF.items():
        assert DIST.get(module, module) in ex[extra], (module, extra)
    # alignment composes Hydra configs and trains on Fabric: its extra carries them
    assert {"lightning", "hydra-core", "omegaconf", "peft"} <= ex["align"]


@pytest.fixture
def without(monkeypatch):
    """Pretend the named import packages are not installed (for the checks and for imports)."""
    def hide(*names):
        real = extras.find_spec
        monkeypatch.setattr(extras, "find_spec", lambda n, *a: None if n in names else real(n, *a))
        for n in names:
            monkeypatch.setitem(sys.modules, n, None)  # `import n` raises ModuleNotFoundError
    return hide


@pytest.mark.parametrize("argv, extra, missing", [
    (["train", "experiment=shapes_miro", "--dry-run"], "train", "'omegaconf'"),
    (["align", "--dry-run"], "align", "'hydra'"),
    (["eval", "report", "."], "eval", "'matplotlib'"),
    (["eval", "all", "--outdir", "never-written", "--limit", "1"], "eval", "'matplotlib'"),
    (["align", "flux-lora", "--model", "m", "--data", "d.csv", "--out", "o"], "align", "'peft'"),
])
def test_missing_extra_is_one_line_before_work(argv, extra, missing, without, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    without("lightning", "hydra", "omegaconf", "matplotlib", "peft")
    assert miro_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"pip install 'miro[{extra}]'" in err and missing in err
    assert not (tmp_path / "never-written").exists()  # refused before any generation


def test_help_needs_no_extra(without, capsys):
    without("lightning", "hydra", "omegaconf")
    assert miro_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "shapes_miro" in out and "multi_cad_synth  [miro]" in out  # variant names still listed
    assert miro_main(["align", "--help"]) == 0


def test_lora_alignment_needs_peft(without, capsys):
    without("peft")
    assert miro_main(["align", "lora.enabled=true", "data.prompts=p.txt", "--dry-run"]) == 2  # before the file is read
    assert "pip install 'miro[align]'" in capsys.readouterr().err


def test_runtime_import_of_an_extra_is_named(monkeypatch, capsys):
    """A lazy import deep inside a command (not covered by a check) still ends in one line."""
    import miro.eval.cli as ev

    def boom(argv):
        raise ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")

    monkeypatch.setattr(ev, "main", boom)
    assert miro_main(["eval", "summary", "x"]) == 2
    assert capsys.readouterr().err.strip() == "miro eval needs the optional package 'matplotlib': pip install 'miro[eval]'"


def test_missing_module_of_miro_is_a_bug_not_a_hint(monkeypatch):
    import miro.eval.cli as ev

    def boom(argv):
        raise ModuleNotFoundError("No module named 'miro.nope'", name="miro.nope")

    monkeypatch.setattr(ev, "main", boom)
    with pytest.raises(ModuleNotFoundError):
        miro_main(["eval", "summary", "x"])


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    import miro.generate_cli as G

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "main", interrupted)
    assert miro_main(["generate", "a red circle"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("miro generate: interrupted") and "Traceback" not in err and "\n" not in err
