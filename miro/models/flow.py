"""THE flow convention of this project, stated once. Every other module imports it from here.

Signal level and interpolation
    gamma in [0, 1] is the *signal level*: gamma = 1 is data, gamma = 0 is pure noise.
    A noisy sample is  x_gamma = gamma * x0 + (1 - gamma) * eps,  eps ~ N(0, I).
    The network sees the raw gamma (no c_noise transform, no x1000).

Time and scheduler
    Training draws t in (0, 1) (logit-normal t = sigmoid(N(mu, std)) by default, or uniform)
    and sets gamma = sched(t) = clamp(shift(1 - t), min=1e-9). So t is the *noise* time.
    shift(gamma; s) = s * gamma / (1 + (s - 1) * gamma); its inverse is
    gamma = g / (s - (s - 1) * g). s > 1 pushes gamma towards the data end (published
    ``LinearScheduler``; the published class silently ignores s <= 1, here any s > 0 applies).

Velocity
    The network (after preconditioning) predicts v = eps - x0, the velocity d x / d t = -d x / d gamma.
    From (x_gamma, v):  x0 = x_gamma - (1 - gamma) * v,  eps = x_gamma + gamma * v.
    Loss: mean over all elements of (v_hat - (eps - x0))^2 (optionally EDM2 log-variance
    reweighting  l / exp(u(gamma)) + u(gamma)).

Sampling (Euler)
    Grid, computed in fp32 exactly as published: s_i = 1 - i / N (an fp32 arange divided by N),
    gamma_i = sched(s_i), i = 0..N, so gamma_0 = 1e-9 (clamped) and gamma_N = 1: noise -> data.
    Step:  x <- x - v_hat * (gamma_{i+1} - gamma_i).

Classifier-free guidance
    v_hat = (1 + w) * v(x, text, r+) - w * v(x, null text, r-)   (the "(1 + w)" convention:
    w = 7 equals s = 8 in the uncond + s * (cond - uncond) form). r+ defaults to 1.0 for every
    reward and r- to 0.0.

Preconditioning (``FlowPrecond``)
    c_in = 1 / sqrt((gamma * sigma_d)^2 + (1 - gamma)^2),  c_out = sqrt(1 + sigma_d^2),
    v_hat = c_out * F(c_in * x_gamma, gamma, ...), sigma_d = 0.5 (published ``noise_driven``).
    ``skip`` (this project's extension, EDM's c_skip carried over to v; Karras et al. 2022, §5 and
    App. B.6): v_hat = c_skip * x_gamma + c_out * F(c_in * x_gamma), with c_skip = Cov(v, x_gamma) /
    Var(x_gamma) = ((1 - gamma) - gamma * sigma_d^2) * c_in^2 and c_out = sigma_d * c_in, the std of
    the residual v - c_skip x_gamma (for x0 of std sigma_d independent of eps), so F's target has unit
    variance at every gamma. Near pure noise (c_skip -> 1) the skip carries the noise and F predicts
    only -x0 / sigma_d; ``noise_driven`` must instead copy its whole input through the network.

FLUX / diffusers convention (used by SRPO)
    sigma = 1 - gamma is the *noise* level: x_sigma = (1 - sigma) * x0 + sigma * eps. The velocity
    is the same quantity v = eps - x0, and the Euler step reads x + v * (sigma_next - sigma).
    gamma = 1 - sigma and sigma = 1 - gamma (``gamma_to_sigma`` / ``sigma_to_gamma``). FLUX's shift
    acts on sigma: sigma' = m * sigma / (1 + (m - 1) * sigma); it equals our gamma-shift with
    s = 1 / m (``flux_shift_to_gamma_shift``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from miro.models.layers import FourierEmbedding

__all__ = [
    "CLIP_MIN",
    "interpolate",
    "velocity_target",
    "x0_from_velocity",
    "noise_from_velocity",
    "euler_step",
    "cfg_combine",
    "shift_gamma",
    "unshift_gamma",
    "Scheduler",
    "time_grid",
    "sample_time_uniform",
    "sample_time_logit_normal",
    "gamma_to_sigma",
    "sigma_to_gamma",
    "flux_shift_to_gamma_shift",
    "FlowPrecond",
]

CLIP_MIN = 1e-9  # published LinearScheduler clip_min: gamma never reaches exactly 0


def _bcast(gamma: Tensor | float, like: Tensor) -> Tensor:
    g = torch.as_tensor(gamma, device=like.device)
    if g.dim() == 0:
        return g
    return g.reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: Tensor, noise: Tensor, gamma: Tensor | float) -> Tensor:
    """x_gamma = gamma * x0 + (1 - gamma) * noise, gamma scalar or (B,)."""
    g = _bcast(gamma, x0)
    return g * x0 + (1 - g) * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = noise - x0."""
    return noise - x0


def x0_from_velocity(x: Tensor, v: Tensor, gamma: Tensor | float) -> Tensor:
    """x0 = x_gamma - (1 - gamma) * v."""
    return x - (1 - _bcast(gamma, x)) * v


def noise_from_velocity(x: Tensor, v: Tensor, gamma: Tensor | float) -> Tensor:
    """eps = x_gamma + gamma * v."""
    return x + _bcast(gamma, x) * v


def euler_step(x: Tensor, v: Tensor, gamma: Tensor | float, gamma_next: Tensor | float) -> Tensor:
    """x <- x - v * (gamma_next - gamma)."""
    return x - v * (torch.as_tensor(gamma_next) - torch.as_tensor(gamma)).to(x.device)


def cfg_combine(cond: Tensor, uncond: Tensor, w: float) -> Tensor:
    """(1 + w) * cond - w * uncond, written as published (cond * (1 + w) - uncond * w)."""
    return cond * (1 + w) - uncond * w


def _check_shift(shift: float) -> None:
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")


def shift_gamma(gamma: Tensor, shift: float) -> Tensor:
    """s * gamma / (1 + (s - 1) * gamma); identity for s = 1."""
    _check_shift(shift)
    if shift == 1.0:
        return gamma
    return shift * gamma / (1 + (shift - 1) * gamma)


def unshift_gamma(gamma_shifted: Tensor, shift: float) -> Tensor:
    """Inverse of ``shift_gamma``: g / (s - (s - 1) * g)."""
    _check_shift(shift)
    if shift == 1.0:
        return gamma_shifted
    return gamma_shifted / (shift - (shift - 1) * gamma_shifted)


@dataclass
class Scheduler:
    """Published ``LinearScheduler`` (config keys ``start``, ``end``, ``shift``, ``clip_min``):
    gamma = clamp(shift((end - start) * t + start), min=clip_min)."""

    start: float = 1.0  # gamma at t = 0
    end: float = 0.0  # gamma at t = 1
    shift: float = 1.0  # gamma-shift s (s > 1: more steps near the data end)
    clip_min: float = CLIP_MIN  # lower clamp of gamma

    def __post_init__(self) -> None:
        _check_shift(self.shift)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "Scheduler":
        """A pipeline ``config.json``'s ``scheduler`` section, read as the published pipeline reads it
        (``LinearScheduler(**config["scheduler"])``, spec §4.2): every key used, and a shift applied
        only when > 1 (a shift <= 1 there is ignored, not an error). Unknown keys are named."""
        section = dict(section or {})
        unknown = sorted(set(section) - {"start", "end", "shift", "clip_min"})
        if unknown:
            raise ValueError(f"config.json scheduler has unknown keys {unknown}; allowed: start, end, shift, clip_min")
        vals = {}
        for key in ("start", "end", "shift", "clip_min"):
            if key in section:
                v = section[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"config.json scheduler.{key} must be a finite number; got {v!r}")
                vals[key] = float(v)
        if vals.get("shift", 1.0) <= 1.0:
            if vals.get("shift", 1.0) < 1.0:  # Scheduler(shift=s) and time_grid apply any s > 0
                warnings.warn(f"config.json scheduler.shift={vals['shift']:g} is read as 1 (no shift), as the "
                              "published loader does; only shifts above 1 apply")
            vals["shift"] = 1.0
        return cls(**vals)

    def __call__(self, t: Tensor) -> Tensor:
        g = (self.end - self.start) * t + self.start
        g = shift_gamma(g, self.shift)
        return torch.clamp(g, min=self.clip_min)


def time_grid(num_steps: int, shift: float = 1.0, device=None, scheduler: Scheduler | None = None) -> Tensor:
    """(N + 1,) fp32 gammas from ~0 (noise) to 1 (data), computed exactly as published."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    sched = scheduler if scheduler is not None else Scheduler(shift=shift)
    steps = 1 - torch.arange(num_steps + 1, dtype=torch.float32, device=device) / num_steps
    return sched(steps)


def sample_time_uniform(batch_size: int, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> Tensor:
    """t ~ U[0, 1)."""
    return torch.rand(batch_size, device=device, dtype=dtype, generator=generator)


def sample_time_logit_normal(
    batch_size: int,
    mu: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """t = sigmoid(N(mu, std)) (the same draw as ``torch.normal(mu, std, ...)``)."""
    n = torch.empty(batch_size, device=device).normal_(mu, std, generator=generator)
    return torch.sigmoid(n).to(dtype)


def gamma_to_sigma(gamma):
    """Our signal level -> FLUX noise level: sigma = 1 - gamma."""
    return 1 - gamma


def sigma_to_gamma(sigma):
    """FLUX noise level -> our signal level: gamma = 1 - sigma."""
    return 1 - sigma


def flux_shift_to_gamma_shift(mu_shift: float) -> float:
    """A FLUX sigma-shift m equals our gamma-shift 1/m (and vice versa)."""
    _check_shift(mu_shift)
    return 1.0 / mu_shift


class FlowPrecond(nn.Module):
    """Flow preconditioning with a learned log-variance (published kwargs and tensor names).

    ``logvar_proj`` = Sequential(FourierEmbedding(C), [Linear(C, C), SiLU] * n, Linear(C, 1));
    present only when ``do_gradnorm_reweighting``. Its Linear layers keep PyTorch's default init.
    """

    def __init__(
        self,
        num_latents: int = 256,
        latents_dim: int = 512,
        do_normalization: str | bool = "noise_driven",
        sigma_data: float = 0.5,
        do_gradnorm_reweighting: bool = True,
        logvar_channels: int = 128,
        logvar_mlp_layers: int = 0,
    ):
        super().__init__()
        if do_normalization not in ("noise_driven", "skip", True, False, None, "none"):
            raise ValueError(
                f"do_normalization={do_normalization!r}; allowed: 'noise_driven', 'skip', True, False, 'none'"
            )
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        for name, v in (("num_latents", num_latents), ("latents_dim", latents_dim), ("logvar_channels", logvar_channels)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(logvar_mlp_layers, int) or logvar_mlp_layers < 0:
            raise ValueError(f"logvar_mlp_layers must be a non-negative integer, got {logvar_mlp_layers!r}")
        self.num_latents = num_latents
        self.latents_dim = latents_dim
        self.normalize = do_normalization in ("noise_driven", "skip", True)
        self.use_skip = do_normalization == "skip"
        self.sigma_data = float(sigma_data)
        self.do_gradnorm_reweighting = bool(do_gradnorm_reweighting)
        if self.do_gradnorm_reweighting:
            layers: list[nn.Module] = [FourierEmbedding(logvar_channels)]
            for _ in range(logvar_mlp_layers):
                layers += [nn.Linear(logvar_channels, logvar_channels), nn.SiLU()]
            layers.append(nn.Linear(logvar_channels, 1))
            self.logvar_proj = nn.Sequential(*layers)

    def scalings(self, gamma: Tensor, ndim: int = 4) -> tuple[Tensor, Tensor, Tensor]:
        """(c_in, c_out, c_skip), each shaped (B, 1, ..., 1) with ``ndim`` dims (module docstring)."""
        shape = (-1,) + (1,) * (ndim - 1)
        if not self.normalize:
            ones = torch.ones_like(gamma).reshape(shape)
            return ones, ones, torch.zeros_like(ones)
        s2 = self.sigma_data**2
        g = gamma.reshape(shape)
        c_in = 1 / torch.sqrt(g**2 * s2 + (1 - g) ** 2)
        if self.use_skip:
            return c_in, self.sigma_data * c_in, ((1 - g) - g * s2) * c_in**2
        c_out = torch.ones_like(c_in) * math.sqrt(1 + s2)
        return c_in, c_out, torch.zeros_like(c_in)

    def logvar(self, gamma: Tensor) -> Tensor:
        """u(gamma), shape (B, 1)."""
        if not self.do_gradnorm_reweighting:
            raise ValueError("this preconditioning has no logvar_proj (do_gradnorm_reweighting=False)")
        return self.logvar_proj(gamma.flatten())

    def forward(
        self,
        network: nn.Module,
        y: Tensor,
        gamma: Tensor,
        text_tokens_embeddings: Tensor,
        text_tokens_mask: Tensor,
        coherence=None,
        previous_latents: Tensor | None = None,
        return_logvar: bool = False,
        generator: torch.Generator | None = None,
        latents_only: bool = False,
    ):
        """(v_hat, z[, logvar (B,1,1,1)]). Missing previous latents become fp32 zeros (B, N_l, D_l):
        the self-conditioning path always runs (published). ``latents_only``: (None, z)."""
        b = y.shape[0]
        gamma = torch.as_tensor(gamma, device=y.device)
        if gamma.dim() == 0:
            gamma = gamma.expand(b)
        c_in, c_out, c_skip = self.scalings(gamma, y.dim())
        if previous_latents is None:
            previous_latents = torch.zeros(b, self.num_latents, self.latents_dim, device=y.device, dtype=torch.float32)
        f, z = network(
            y * c_in,
            gamma,
            text_tokens_embeddings,
            text_tokens_mask,
            coherence,
            previous_latents,
            generator=generator,
            latents_only=latents_only,
        )
        if latents_only:
            return None, z
        out = f * c_out
        if self.use_skip:
            out = out + c_skip * y.to(out.dtype)
        if return_logvar:
            return out, z, self.logvar(gamma).reshape(-1, *([1] * (y.dim() - 1)))
        return out, z


# --------------------------------------------------------------------------- training loss

TIME_SAMPLINGS = ("logit_normal", "uniform")


@dataclass
class LossConfig:
    """Flow-matching loss settings; defaults are the published ``FlowMatchingLoss`` class defaults."""

    self_cond_rate: float = 0.9  # probability a sample is fed its first-pass latents
    cond_drop_rate: float = 0.0  # text dropout (-> uncond text, every reward NaN -> value 0)
    do_gradnorm_reweighting: bool = False  # EDM2 reweighting l / exp(u) + u (needs logvar_proj)
    time_sampling: str = "logit_normal"  # "logit_normal" (t = sigmoid(N(mu_t, std_t))) or "uniform"
    mu_t: float = 0.0  # logit-normal location
    std_t: float = 1.0  # logit-normal scale
    shift: float = 1.0  # gamma-shift of the training scheduler
    clip_min: float = CLIP_MIN  # lower clamp of gamma

    def __post_init__(self) -> None:
        for name in ("self_cond_rate", "cond_drop_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling={self.time_sampling!r}; allowed: {', '.join(TIME_SAMPLINGS)}")
        if not self.std_t > 0:
            raise ValueError(f"std_t must be > 0, got {self.std_t!r}")
        _check_shift(self.shift)


def drop_text(
    emb: Tensor,
    mask: Tensor,
    coherence: dict[str, Tensor],
    drop: Tensor,
    uncond_embedding: Tensor,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Replace the text of samples where ``drop`` (B,) is True by the unconditional embedding.

    ``uncond_embedding`` (L_u, E) fills the first min(L_u, L) tokens (a single token is broadcast
    over all L positions, as published); the mask becomes True on those L_u' tokens only; every
    reward of a dropped sample becomes NaN (embedded as value 0 in training). Not in place.
    """
    b, length, dim = emb.shape
    u = uncond_embedding.to(device=emb.device, dtype=emb.dtype)
    if u.dim() == 1:
        u = u[None]
    if u.dim() != 2 or u.shape[-1] != dim:
        raise ValueError(f"uncond_embedding must be (L_u, {dim}), got {tuple(uncond_embedding.shape)}")
    n = min(u.shape[0], length)
    if u.shape[0] == 1:
        row = u.expand(length, dim)
    else:
        row = torch.zeros(length, dim, device=emb.device, dtype=emb.dtype)
        row[:n] = u[:n]
    row_mask = torch.arange(length, device=mask.device) < n
    d3 = drop[:, None, None]
    emb = torch.where(d3, row, emb)
    mask = torch.where(drop[:, None], row_mask, mask.bool())
    nan = torch.tensor(float("nan"))
    coherence = {
        k: torch.where(drop, nan.to(v.device, v.dtype), v) for k, v in coherence.items()
    }
    return emb, mask, coherence


def flow_loss(
    model: nn.Module,
    x0: Tensor,
    text_tokens_embeddings: Tensor,
    text_tokens_mask: Tensor,
    coherence: dict[str, Tensor] | None = None,
    uncond_embedding: Tensor | None = None,
    config: LossConfig | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One flow-matching loss evaluation (published ``FlowMatchingLoss``; spec §7).

    ``model`` is a ``MiroModel`` (anything with ``forward(y, gamma, emb, mask, coherence,
    previous_latents, return_logvar, generator, latents_only)``), normally in train mode; ``x0`` normalised
    latents (B, C, H, W); ``coherence`` base reward key -> (B,) stored values (NaN = missing).

    Random draws from ``generator``, in the published order: text drop rand(B); t; noise randn;
    [first pass: in-network draws]; self-cond keep rand(B,1,1); [main pass: in-network draws].
    Self-conditioning: the first pass (same t and noise, zero previous latents) always runs under
    ``no_grad`` when ``self_cond_rate`` > 0 and its latents are multiplied by the keep mask, so the
    autograd graph of the step never depends on the random draws (static-graph DDP safe).

    Returns (scalar loss = mean over all elements, logs of detached scalars).
    """
    cfg = config or LossConfig()
    b = x0.shape[0]
    device, dtype = x0.device, x0.dtype
    coh: dict[str, Tensor] = {}
    for k, v in (coherence or {}).items():
        v = torch.as_tensor(v, device=device)
        coh[k] = v.expand(b) if v.dim() == 0 else v
    coherence = coh
    emb, mask = text_tokens_embeddings, text_tokens_mask
    logs: dict[str, Tensor] = {}
    if cfg.cond_drop_rate > 0:
        if uncond_embedding is None:
            raise ValueError("cond_drop_rate > 0 needs uncond_embedding (L_u, E)")
        drop = torch.rand(b, device=device, generator=generator) < cfg.cond_drop_rate
        emb, mask, coherence = drop_text(emb, mask, coherence, drop, uncond_embedding)
        logs["text_drop_frac"] = drop.float().mean()
    if cfg.time_sampling == "logit_normal":
        t = sample_time_logit_normal(b, cfg.mu_t, cfg.std_t, generator, device, dtype)
    else:
        t = sample_time_uniform(b, generator, device, dtype)
    noise = torch.randn(x0.shape, device=device, dtype=dtype, generator=generator)
    gamma = Scheduler(shift=cfg.shift, clip_min=cfg.clip_min)(t)
    y = interpolate(x0, noise, gamma)

    previous = None
    if cfg.self_cond_rate > 0:
        with torch.no_grad():
            _, z = model(y, gamma, emb, mask, coherence, None, generator=generator, latents_only=True)
        keep = torch.rand(b, *([1] * (z.dim() - 1)), device=z.device, generator=generator) > 1 - cfg.self_cond_rate
        previous = z * keep.to(z.dtype)
        logs["self_cond_frac"] = keep.float().mean()

    if cfg.do_gradnorm_reweighting:
        v_hat, _, logvar = model(y, gamma, emb, mask, coherence, previous, return_logvar=True, generator=generator)
    else:
        v_hat, _ = model(y, gamma, emb, mask, coherence, previous, generator=generator)
    elem = (v_hat - velocity_target(x0, noise)) ** 2
    logs["raw_loss"] = elem.mean().detach()
    if cfg.do_gradnorm_reweighting:
        elem = elem / logvar.exp() + logvar
        logs["loss_gradnorm_reweighted"] = elem.mean().detach()
        logs["logvar"] = logvar.mean().detach()
    return elem.mean(), logs
