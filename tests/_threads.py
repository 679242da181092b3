"""The one-thread fixture shared by the tests of tiny models (import it into a test module)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a shared, oversubscribed machine two threads
    stall at every op's barrier (measured: 3.5 s vs 0.05 s for one tiny pipeline step).
    The previous setting is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
