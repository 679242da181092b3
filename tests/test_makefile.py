"""``make demo``: the PROMPT variable reaches ``miro generate`` as one argument, never as shell text."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_demo_prompt_is_not_shell_text(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").write_text("#!/bin/sh\n")
    # a stand-in miro that writes its arguments one per line
    (bin_ / "miro").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {tmp_path}/args\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.touch()  # newer than pyproject.toml: nothing is installed
    prompt = f'a "red" `touch {tmp_path}/ran`; touch {tmp_path}/ran2 \' end'
    subprocess.run(["make", "-s", "-C", str(ROOT), "demo", f"BIN={bin_}", f"STAMP={stamp}", f"PROMPT={prompt}"],
                   check=True, timeout=60, capture_output=True)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:2] == ["generate", prompt]
    assert not (tmp_path / "ran").exists() and not (tmp_path / "ran2").exists()
