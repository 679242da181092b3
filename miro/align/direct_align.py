"""Direct-Align for rectified-flow models (SRPO, arXiv 2509.06942; Tencent-Hunyuan/SRPO
``fastvideo/SRPO.py``).

Convention used throughout ``miro.align``: the FLUX noise level σ. A clean latent ``x0`` and
known noise ``ε`` give ``x_σ = σ·ε + (1−σ)·x0``; the model predicts the velocity
``v = ε − x0`` (so ``dx/dσ = v``) and an Euler step is ``x_{σ'} = x_σ + (σ'−σ)·v``. MIRO's
own models use the signal level γ = 1 − σ with the same velocity (see ``miro/models/flow.py``);
the adapters in ``miro.align.targets`` do the conversion, so this module never sees γ.

Direct-Align re-noises a clean sample with *known* noise at a high σ, takes one model step, and
because ε is known recovers the clean latent in closed form:
``x̂0 = (x_{σ'} − σ'·ε) / (1 − σ')``. The reward is computed on ``x̂0`` and its gradient flows
through that single step into the model. Two branches per sample:

- *denoise*: from ``σ_hi`` step down to ``σ_m`` (σ_hi > σ_m);
- *inversion*: from ``σ_lo`` step up to the same ``σ_m`` (σ_lo < σ_m). Its gradient with respect
  to ``v`` has the opposite sign, which is why the reward prompts are swapped for it.

Timestep selection follows the upstream code: a window of ``timestep_length`` σ values linearly
spaced between two entries of the shifted 50-step grid, a random index ``sel`` and a gap ``K``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The flow-matching time shift on σ: ``s·σ / (1 + (s−1)·σ)`` (FLUX / SD3; upstream ``sd3_time_shift``)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_σ = σ·ε + (1−σ)·x0``. ``sigma`` is a scalar or broadcastable to ``x0``."""
    return sigma * noise + (1 - sigma) * x0


def recover_x0(x_sigma: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Invert :func:`add_noise` with the known noise: ``x0 = (x_σ − σ·ε) / (1 − σ)``."""
    if isinstance(sigma, float) and sigma >= 1.0:
        raise ValueError(f"cannot recover x0 at sigma={sigma} (pure noise)")
    return (x_sigma - sigma * noise) / (1 - sigma)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
    """One Euler step along σ: ``x_{σ'} = x_σ + (σ'−σ)·v`` (deterministic; upstream ``flux_step``)."""
    return x + (sigma_next - sigma) * v


def direct_align_branch(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
) -> torch.Tensor:
    """One Direct-Align branch: re-noise ``x0`` at ``sigma_from`` (no gradient), one model step to
    ``sigma_to``, closed-form recovery of x̂0 at ``sigma_to``.

    ``velocity_fn(x_σ, σ)`` returns ``v`` with the model's gradients. ``sigma_from > sigma_to``
    is the denoise branch, ``sigma_from < sigma_to`` the inversion branch.
    Returns x̂0 with the shape of ``x0``; gradients reach only what ``velocity_fn`` uses.

    ``sigma_from = 1`` is valid: ``x_1 = ε`` is where every rollout starts, and only the recovery
    divides, by ``1 − sigma_to``; so a window reaching σ = 1 (``sigma_range=[1, b]``,
    ``train_timestep=[0, b]``) gives ``σ_hi = 1`` for the noisiest indices and works.
    """
    if not (0.0 <= sigma_from <= 1.0 and 0.0 <= sigma_to < 1.0):
        raise ValueError(f"need 0 <= sigma_from <= 1 and 0 <= sigma_to < 1; got sigma_from={sigma_from}, sigma_to={sigma_to}")
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    with torch.no_grad():
        x_from = add_noise(x0.detach(), noise, sigma_from)
    sigma_t = torch.full((x0.shape[0],), float(sigma_from), dtype=torch.float32, device=x0.device)
    v = velocity_fn(x_from, sigma_t)
    x_to = euler_step(x_from, v.to(x_from.dtype), sigma_from, sigma_to)
    return recover_x0(x_to, noise, sigma_to)


@dataclass
class DirectAlignSchedule:
    """Training-time σ window, index sampling and gap (upstream ``SRPO_train`` and its shell scripts)."""

    shift: float = 3.0  # time shift s on σ (FLUX release script `--shift 3`)
    vis_sampling_steps: int = 50  # the shifted grid S has this many steps + 1 (upstream default 50)
    train_timestep: tuple[int, int] = (5, 25)  # window ends as indices into S; HPS script (5, 25), PickScore (5, 30)
    sigma_range: tuple[float, float] | None = None  # explicit (noisy, clean) σ window; overrides train_timestep
    timestep_length: int = 1000  # number of σ values in the window (`--timestep_length 1000`)
    groundtruth_ratio: float = 0.9  # gap K = int((1 − ratio)·length) + 1 (ratio 0.9 → K = 100)
    sel_margin: int = 5  # sel is drawn uniformly from [margin, length − margin] (upstream randint(5, 995))

    def __post_init__(self) -> None:
        from miro.align import checks as C

        # Every key checked here, named as the config writes it: a bad one fails before any model
        # loads, not at the first step after the rollout.
        self.shift = C.number("schedule.shift", self.shift, 0.0, strict=True)
        for key in ("vis_sampling_steps", "timestep_length"):
            C.pos_int(f"schedule.{key}", getattr(self, key))
        C.pos_int("schedule.sel_margin", self.sel_margin, 2)
        self.groundtruth_ratio = C.number("schedule.groundtruth_ratio", self.groundtruth_ratio, 0.0)
        pair = C.pair("schedule.train_timestep", self.train_timestep)
        if not all(float(i).is_integer() for i in pair):
            raise ValueError(f"schedule.train_timestep must be two grid indices [a, b]; got {self.train_timestep!r}")
        self.train_timestep = tuple(int(i) for i in pair)  # type: ignore[assignment]
        if self.sigma_range is not None:
            self.sigma_range = C.pair("schedule.sigma_range", self.sigma_range)
            hi, lo = self.sigma_range
            if not (1.0 >= hi > lo >= 0.0):
                raise ValueError(f"schedule.sigma_range must be [noisy, clean] with 1 >= noisy > clean >= 0; "
                                 f"got {list(self.sigma_range)}")
        a, b = self.train_timestep
        if not (0 <= a < b <= self.vis_sampling_steps):
            raise ValueError(f"schedule.train_timestep must satisfy 0 <= a < b <= schedule.vis_sampling_steps="
                             f"{self.vis_sampling_steps}; got {list(self.train_timestep)}")
        if self.timestep_length < 4 * self.sel_margin:
            raise ValueError(f"schedule.timestep_length={self.timestep_length} is too small for "
                             f"schedule.sel_margin={self.sel_margin} (need at least 4 x the margin)")
        if not (0.0 <= self.groundtruth_ratio < 1.0):
            raise ValueError(f"schedule.groundtruth_ratio must lie in [0, 1); got {self.groundtruth_ratio}")

    @property
    def gap(self) -> int:
        # int() of the float product, as upstream: (1 − 0.9)·1000 = 99.99… → 99, +1 → 100.
        return int((1 - self.groundtruth_ratio) * self.timestep_length) + 1

    def sigmas(self) -> torch.Tensor:
        """The ``timestep_length`` training σ values, noisiest first (upstream ``sigmas_l``), float64."""
        if self.sigma_range is not None:
            hi, lo = self.sigma_range
        else:
            grid = torch.linspace(1, 0, self.vis_sampling_steps + 1, dtype=torch.float64)
            grid = shift_sigma(grid, self.shift)
            hi, lo = float(grid[self.train_timestep[0]]), float(grid[self.train_timestep[1]])
        return torch.linspace(hi, lo, self.timestep_length, dtype=torch.float64)

    def sample_index(self, generator: torch.Generator | None = None) -> int:
        """Draw ``sel`` uniformly from [margin, length − margin]; larger ``sel`` means noisier."""
        n = self.timestep_length
        return int(torch.randint(self.sel_margin, n - self.sel_margin + 1, (1,), generator=generator))

    def clipped_gap(self, sel: int) -> int:
        # Upstream clips K to min(K, length − sel, sel) and then j = max(sel − K, 1), which in the
        # corner sel <= K puts the inversion mid-point one grid step away from the denoise one.
        # Clipping at sel − 1 keeps both branches on exactly the same σ_m.
        return max(1, min(self.gap, self.timestep_length - sel, sel - 1))

    def denoise_sigmas(self, sel: int) -> tuple[float, float]:
        """(σ_hi, σ_m) for the denoise branch: ``sigmas[L − sel − K]`` and ``sigmas[L − sel]``."""
        s, n, k = self.sigmas(), self.timestep_length, self.clipped_gap(sel)
        return float(s[n - sel - k]), float(s[n - sel])

    def inversion_sigmas(self, sel: int) -> tuple[float, float, int]:
        """(σ_lo, σ_m, j) for the inversion branch: ``j = sel − K``, ``sigmas[L − j]`` and ``sigmas[L − j − K]``.

        ``j`` indexes the inversion discount schedule, as upstream.
        """
        s, n, k = self.sigmas(), self.timestep_length, self.clipped_gap(sel)
        j = sel - k
        return float(s[n - j]), float(s[n - j - k]), j


def discount_schedule(ends: tuple[float, float] | list[float], length: int = 1000) -> torch.Tensor:
    """``linspace(a, b, length)``: the ``k`` of the relative reward per window index.

    Index 0 is the cleanest end of the window and ``length − 1`` the noisiest (the index is
    ``sel`` for the denoise branch and ``j`` for the inversion branch, as upstream). Published
    defaults (HPS script): ``discount_inv = (0.3, 0.01)``, ``discount_denoise = (0.1, 0.25)``.
    """
    ends = tuple(float(e) for e in ends)
    if len(ends) != 2:
        raise ValueError(f"a discount schedule needs two ends [start, end]; got {ends}")
    return torch.linspace(ends[0], ends[1], length, dtype=torch.float64)


def rollout_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The online rollout grid ``σ_i = shift(1 − i/N)``, i = 0..N (upstream ``sd3_time_shift`` on linspace)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    return shift_sigma(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift)
