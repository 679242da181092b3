"""Atomic writes (miro.io): round trips, file mode, cleanup on failure, parent creation."""

import json
import os
import stat

import numpy as np
import pytest

from miro.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_write_with


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_round_trips(tmp_path):
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\xffabc")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xffabc"
    atomic_write_text(tmp_path / "t.txt", "déjà vu\nline 2\n")
    assert (tmp_path / "t.txt").read_bytes() == "déjà vu\nline 2\n".encode("utf-8")
    obj = {"b": [1, 2.5, None], "a": "é"}
    atomic_write_json(tmp_path / "j.json", obj)
    raw = (tmp_path / "j.json").read_text(encoding="utf-8")
    assert raw == json.dumps(obj, indent=2) + "\n" and json.loads(raw) == obj
    atomic_write_json(tmp_path / "k.json", obj, indent=None, sort_keys=True, ensure_ascii=False)
    assert (tmp_path / "k.json").read_text(encoding="utf-8") == '{"a": "é", "b": [1, 2.5, null]}\n'
    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    with atomic_path(tmp_path / "a.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    assert np.array_equal(np.load(tmp_path / "a.npy"), arr)
    atomic_write_with(tmp_path / "w.txt", lambda name: open(name, "w").write("by name"), fsync=True)
    assert (tmp_path / "w.txt").read_text() == "by name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.bin", "j.json", "k.json", "t.txt", "w.txt"]


def test_replaces_an_existing_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    atomic_write_text(target, "new", fsync=True)
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_mode_is_0644_whatever_the_umask(tmp_path):
    old = os.umask(0o077)  # would give 0600 to a plain open()
    try:
        atomic_write_bytes(tmp_path / "a", b"1")
        with atomic_path(tmp_path / "b") as tmp:
            assert _mode(tmp) == 0o644  # already while the body writes
            tmp.write_bytes(b"2")
        # a writer that swaps in a file of its own (download to a temp name, then move)
        def swap(name):
            other = tmp_path / "other"
            other.write_bytes(b"3")
            os.chmod(other, 0o600)
            os.replace(other, name)
        atomic_write_with(tmp_path / "c", swap)
    finally:
        os.umask(old)
    assert [_mode(tmp_path / n) for n in "abc"] == [0o644] * 3
    assert (tmp_path / "c").read_bytes() == b"3"


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_writer_leaves_target_untouched_and_no_temp(tmp_path, exc):
    target = tmp_path / "data.json"
    target.write_text("original")
    seen = []
    with pytest.raises(type(exc)):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            assert tmp.parent == tmp_path and tmp.name.startswith(".data.json.") and tmp.name.endswith(".tmp")
            tmp.write_text("partial")
            raise exc
    assert target.read_text() == "original"
    assert not seen[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_failed_writer_that_removed_its_temp_still_raises_its_error(tmp_path):
    with pytest.raises(ValueError, match="bad"):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.unlink()
            raise ValueError("bad")
    assert list(tmp_path.iterdir()) == []


def test_parent_folders_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(target, "deep")
    assert target.read_text() == "deep"
    assert [p.name for p in target.parent.iterdir()] == ["c.txt"]


def test_hub_and_eval_reexports_keep_their_formats(tmp_path):
    from miro.eval.folder import atomic_write_json as eval_json
    from miro.hub import atomic_write_bytes as hub_bytes
    from miro.hub import atomic_write_json as hub_json

    obj = {"prompt": "café"}
    hub_json(tmp_path / "h.json", obj)
    assert (tmp_path / "h.json").read_text() == '{\n  "prompt": "caf\\u00e9"\n}\n'
    eval_json(tmp_path / "e.json", obj)
    assert (tmp_path / "e.json").read_text(encoding="utf-8") == '{\n  "prompt": "café"\n}\n'
    hub_bytes(tmp_path / "b", b"xyz")
    assert (tmp_path / "b").read_bytes() == b"xyz" and _mode(tmp_path / "b") == 0o644


def test_cache_root_reads_the_environment_at_call_time(tmp_path, monkeypatch):
    from pathlib import Path

    from miro.io import cache_root

    monkeypatch.delenv("MIRO_CACHE_DIR", raising=False)
    monkeypatch.delenv("MIRO_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "miro"
    monkeypatch.setenv("MIRO_CACHE", str(tmp_path / "old"))  # the older name still works
    assert cache_root() == tmp_path / "old"
    monkeypatch.setenv("MIRO_CACHE_DIR", str(tmp_path / "new"))  # and the documented one wins
    assert cache_root() == tmp_path / "new"


def test_dotenv_does_not_set_variables_that_choose_the_code_run(tmp_path, monkeypatch, capsys):
    from miro.io import load_dotenv

    names = ("LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONSTARTUP", "DYLD_INSERT_LIBRARIES", "BASH_ENV")
    for name in (*names, "MIRO_IO_TEST"):
        monkeypatch.delenv(name, raising=False)
    env = tmp_path / ".env"
    env.write_text("".join(f"{n}={tmp_path}/x\n" for n in names) + "export PATH=/tmp/x\nMIRO_IO_TEST=1\n")
    path = os.environ.get("PATH")
    assert load_dotenv(env) == {"MIRO_IO_TEST": "1"}
    assert os.environ.get("PATH") == path and not any(n in os.environ for n in names)
    err = capsys.readouterr().err
    assert "ignoring LD_PRELOAD=" in err and "ignoring PYTHONPATH=" in err and "ignoring PATH=" not in err


def test_every_command_reads_dotenv_once(tmp_path, monkeypatch, capsys):
    """`miro <command>` reads ./.env once (miro/cli.py): a skipped key is said once, and a value set
    from it reaches the command."""
    from miro.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MIRO_IO_ONCE", raising=False)
    (tmp_path / ".env").write_text("LD_PRELOAD=/x/evil.so\nMIRO_IO_ONCE=1\n")
    assert main(["train", "experiment=nope"]) == 2
    assert capsys.readouterr().err.count("ignoring LD_PRELOAD=") == 1
    assert os.environ.get("MIRO_IO_ONCE") == "1"
    monkeypatch.delenv("MIRO_IO_ONCE")


def test_logs_are_not_appended_through_a_symbolic_link(tmp_path):
    # a link planted in a shared output folder must not send log lines to its target
    from miro.eval.folder import JsonlAppender
    from miro.io import open_append

    with open_append(tmp_path / "log.jsonl") as f:
        f.write("a\n")
    with open_append(tmp_path / "log.jsonl") as f:
        f.write("b\n")
    assert (tmp_path / "log.jsonl").read_text() == "a\nb\n"
    target = tmp_path / "victim.txt"
    target.write_text("keep\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "judge.jsonl").symlink_to(target)
    with pytest.raises(OSError, match=r"judge.jsonl is a symbolic link \(to .*victim.txt\)"):
        open_append(tmp_path / "out" / "judge.jsonl")
    with pytest.raises(OSError, match="symbolic link"):
        JsonlAppender(tmp_path / "out" / "judge.jsonl")
    assert target.read_text() == "keep\n"
