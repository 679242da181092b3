"""Shared fixtures. Public data files are read from ``../shared/data`` (never copied here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    env = os.environ.get("MIRO_SHARED_DATA")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"public data folder not found at {SHARED_DATA}; set MIRO_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # No network in tests: any hub access must fail fast instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny test models gain nothing from intra-op threads, and on a busy machine two threads stall
    # at every op's barrier (measured: 3.5 s vs 0.05 s for one tiny pipeline step). Restored after
    # each test, so a test that changes the thread count cannot leak it into the next one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if ``miro align`` tries to load a model (checks must come before)."""
    from miro.align import cli

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "build_target", boom)
    monkeypatch.setattr(cli, "build_reward", boom)


@pytest.fixture
def save_file_killed_midway(monkeypatch):
    """safetensors' ``save_file`` that writes a few bytes under the name it is given, then fails
    (a full disk): a writer must leave the previous file in place, and no temporary."""
    import safetensors.torch

    def killed_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", killed_midway)
