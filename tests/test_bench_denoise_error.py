"""benchmarks/denoise_error.py: its ODE probe against a closed form."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from denoise_error import ode_error  # noqa: E402


class _Oracle(torch.nn.Module):
    """Knows x0: returns the straight path's velocity v = (x - x0) / (1 - gamma) (+ a constant
    offset), and counts the self-conditioning latents it is handed back."""

    coherence_keys = ("r",)

    def __init__(self, x0, offset=0.0):
        super().__init__()
        self.x0, self.offset, self.seen = x0, offset, []

    def preprocess(self, x):
        return x

    def postprocess(self, x):
        return x

    def forward(self, x, gamma, emb, mask, coherence, prev):
        self.seen.append(prev)
        g = gamma[:, None, None, None]
        return (x - self.x0[: x.shape[0]]) / (1 - g) + self.offset, torch.ones(x.shape[0], 2, 3)


def test_ode_error_is_exact_for_the_straight_path_and_carries_latents():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    texts = [(slice(0, 4), (torch.zeros(4, 1, 5), torch.ones(4, 1, dtype=torch.bool)))]
    oracle = _Oracle(x0)
    # Euler is exact on a straight line: every step lands on the path, the end point is x0.
    assert ode_error(oracle, x0, x0, eps, texts, 0.3, 7) < 1e-10
    assert oracle.seen[0] is None and all(p is not None for p in oracle.seen[1:])
    # A constant velocity error c: e = x - x0 follows e' = e (1 - g') / (1 - g) - h c per step, and
    # the last step (to gamma = 1) multiplies e by 0, so the end point is off by exactly -c h_last.
    err = ode_error(_Oracle(x0, offset=0.5), x0, x0, eps, texts, 0.2, 5)
    assert abs(err - (0.5 * 0.8 / 5) ** 2) < 1e-6
