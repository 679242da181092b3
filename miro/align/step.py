"""One SRPO update on one micro-batch: clean latents → Direct-Align branches → relative reward → backward.

A *target* (``miro.align.flux.FluxTarget``, ``miro.align.miro_target.MiroTarget``) is any object
with ``latent_shape(B)``, ``encode_condition(captions)``, ``velocity(x, σ, cond)`` (gradients into
the trained weights), ``rollout(noise, cond, num_steps, shift)`` (no grad), ``decode(x0)``
(differentiable, images in [0, 1]) and ``encode_images(images, generator)`` (offline mode).

Branch order and scaling follow upstream ``SRPO_train``: the denoise branch runs first, each
enabled branch back-propagates ``loss / n_branches`` on its own (so only one graph lives at a
time), and one optimiser step follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from miro.align import checks as C
from miro.align.direct_align import DirectAlignSchedule, direct_align_branch, discount_schedule
from miro.align.prompts import PromptConfig, build_reward_prompts
from miro.align.relative_reward import LOSSES, SemanticRelativeReward, srpo_loss

MODES = ("online", "offline")


@dataclass
class StepConfig:
    mode: str = "online"  # "online": rollouts of the current policy; "offline": clean latents of real images
    denoise: bool = True  # run the denoise branch
    inversion: bool = True  # run the inversion branch (swapped prompts); off reproduces reward hacking (SRPO #22)
    discount_inv: tuple[float, float] = (0.3, 0.01)  # k schedule of the inversion branch (HPS script)
    discount_denoise: tuple[float, float] = (0.1, 0.25)  # k schedule of the denoise branch (`--discount_pos`, HPS)
    loss: str = "hinge"  # "hinge": relu(margin − r) (upstream); "maximize": −r
    hinge_margin: float = 0.7  # upstream ReFL-style margin
    rollout_steps: int = 25  # Euler steps of the online rollout (`--sampling_steps 25`)
    rollout_shift: float | None = 3.0  # σ shift of the rollout grid (`--shift 3`); None: the target's own
    reuse_rollout_noise: bool = True  # online: Direct-Align noise = the rollout's starting noise (upstream)
    schedule: DirectAlignSchedule = field(default_factory=DirectAlignSchedule)
    prompts: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        C.boolean("denoise", self.denoise)
        C.boolean("inversion", self.inversion)
        C.boolean("reuse_rollout_noise", self.reuse_rollout_noise)
        if not (self.denoise or self.inversion):
            raise ValueError("at least one of denoise / inversion must be enabled")
        C.choice("loss", self.loss, LOSSES)
        self.hinge_margin = C.number("hinge_margin", self.hinge_margin)
        C.pos_int("rollout_steps", self.rollout_steps)
        self.rollout_shift = C.number("rollout_shift", self.rollout_shift, 0.0, strict=True, allow_none=True)
        if isinstance(self.schedule, dict):
            self.schedule = C.from_section(DirectAlignSchedule, self.schedule, "schedule")
        if isinstance(self.prompts, dict):
            self.prompts = C.from_section(PromptConfig, self.prompts, "prompts")
        self.discount_inv = C.pair("discount_inv", self.discount_inv)  # type: ignore[assignment]
        self.discount_denoise = C.pair("discount_denoise", self.discount_denoise)  # type: ignore[assignment]


def clean_latents(target, cfg: StepConfig, cond, batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ε) for one micro-batch.

    Online: ε ~ N(0, I) from ``generator``, x0 = rollout(ε) of the current policy (no grad); with
    ``reuse_rollout_noise`` the same ε re-noises x0, as upstream. Offline: x0 = encoded real
    images and ε drawn fresh from ``generator``, independent of the image (the "SRPO + MIA" fork
    instead replaced the noise by the image latent).
    """
    n = len(batch["items"])
    shape = target.latent_shape(n)
    if cfg.mode == "online":
        noise = torch.randn(shape, generator=generator).to(target.device)
        with torch.no_grad():
            x0 = target.rollout(noise, cond, num_steps=cfg.rollout_steps, shift=cfg.rollout_shift)
        if not cfg.reuse_rollout_noise:
            noise = torch.randn(shape, generator=generator).to(target.device)
        return x0.detach().float(), noise.float()
    if batch.get("images") is None:
        raise ValueError("offline mode needs real images in the batch (items with image_path)")
    with torch.no_grad():
        x0 = target.encode_images(batch["images"], generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    return x0.detach().float(), noise.float()


def srpo_step(
    target,
    reward: SemanticRelativeReward,
    cfg: StepConfig,
    batch: dict,
    generator: torch.Generator,
    step: int,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    loss_scale: float = 1.0,
    cond=None,
    timestep_generator: torch.Generator | None = None,
) -> dict:
    """Run both Direct-Align branches on one micro-batch and back-propagate.

    ``batch``: ``{"items": [dict, ...], "images": tensor or None, "cond": precomputed or None}``.
    ``loss_scale`` divides the loss for gradient accumulation. ``timestep_generator`` (default
    ``generator``) draws the window index; upstream draws it per rank while the noise is shared.
    Returns float metrics.
    """
    items = batch["items"]
    if cond is None:
        cond = batch.get("cond") or target.encode_condition([it["caption"] for it in items])
    x0, noise = clean_latents(target, cfg, cond, batch, generator)
    sched = cfg.schedule
    sel = sched.sample_index(timestep_generator or generator)
    pairs = [build_reward_prompts(it, cfg.prompts, step) for it in items]
    pos, neg = [p for p, _ in pairs], [q for _, q in pairs]
    n_branches = int(cfg.denoise) + int(cfg.inversion)
    vel = lambda x, s: target.velocity(x, s, cond)  # noqa: E731
    metrics: dict = {"sel": float(sel)}

    def run(name, sigma_from, sigma_to, swapped, k):
        x0_hat = direct_align_branch(vel, x0, noise, sigma_from, sigma_to)
        images = target.decode(x0_hat)
        out = reward(images, *((neg, pos) if swapped else (pos, neg)), k)
        loss = srpo_loss(out["reward"], cfg.loss, cfg.hinge_margin).mean() / n_branches * loss_scale
        backward(loss)
        # s_pos / s_neg: the similarity to the item's p+ / p− in both branches, whichever one the
        # (swapped) inversion reward puts first.
        s_pos, s_neg = (out["s_neg"], out["s_pos"]) if swapped else (out["s_pos"], out["s_neg"])
        metrics.update({
            f"{name}/reward": float(out["reward"].detach().mean()),
            f"{name}/s_pos": float(s_pos.detach().mean()),
            f"{name}/s_neg": float(s_neg.detach().mean()),
            f"{name}/loss": float(loss.detach()) / loss_scale,
            f"{name}/sigma_from": sigma_from,
            f"{name}/sigma_to": sigma_to,
            f"{name}/k": float(k),
        })

    n = sched.timestep_length
    if cfg.denoise:
        s_hi, s_m = sched.denoise_sigmas(sel)
        run("denoise", s_hi, s_m, False, discount_schedule(cfg.discount_denoise, n)[sel])
    if cfg.inversion:
        s_lo, s_m, j = sched.inversion_sigmas(sel)
        # Swapped prompts: the inversion step's gradient w.r.t. v has the opposite sign (SRPO #20).
        run("inversion", s_lo, s_m, True, discount_schedule(cfg.discount_inv, n)[j])
    return metrics
