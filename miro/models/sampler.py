"""Euler ODE sampler with multi-reward classifier-free guidance (published ``FlowEulerSampler``).

Convention (``miro.models.flow``): gamma runs from 1e-9 (noise) to 1 (data) on the published fp32
grid; x <- x - v_hat * (gamma' - gamma); v_hat = (1 + w) v(x, text, r+) - w v(x, null text, r-).
By default cond and uncond run as one 2B batch, the conditional half first, exactly as published
(spec §5.3-5.4): the uncond text is zero-padded to the cond length with a mask that is True on its
own tokens only (or the cond side is padded when the uncond text is longer). The self-conditioning
latents of each branch are carried to that branch's next step. ``batched_cfg=False`` runs the two
halves as separate forwards (mathematically equal, not bitwise, trap 17).

Dtypes: on CUDA the steps run under bf16 autocast by default (fp16 where bf16 is unsupported), as
published; ``autocast=False`` gives a true fp32 run. On CPU everything is fp32 unless
``autocast=True`` (CPU bf16 autocast). The Euler update and CFG are always fp32.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from miro.models.flow import Scheduler, cfg_combine, time_grid

__all__ = ["euler_sample", "build_cfg_text", "reward_values", "reward_scale_groups"]


def is_real(x: object) -> bool:
    """A real number: Python or numpy int/float (numpy registers them as ``numbers.Real``), not a
    bool (``True`` is an int). The one number rule of the sampler and the pipeline."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def reward_values(
    keys: tuple[str, ...],
    targets: Mapping[str, float | Tensor | None] | None,
    default: float,
    batch_size: int,
    device,
) -> dict[str, Tensor]:
    """Per-key fp32 (B,) values. Keys not given get ``default``; a key given as ``None`` is left
    out (the network then uses the zero embedding: reward dropped). Unknown keys raise."""
    targets = dict(targets or {})
    unknown = set(targets) - set(keys)
    if unknown:
        raise ValueError(f"unknown reward keys {sorted(unknown)}; this model uses {list(keys)}")
    out: dict[str, Tensor] = {}
    for k in keys:
        v = targets.get(k, default)
        if v is None:
            continue
        t = torch.as_tensor(v, dtype=torch.float32, device=device)
        if t.dim() == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"reward {k!r}: expected a scalar or shape ({batch_size},), got {tuple(t.shape)}")
        out[k] = t
    return out


def reward_scale_groups(
    keys: tuple[str, ...], scales: float | Mapping[str, float], default: float
) -> list[tuple[tuple[str, ...], float]]:
    """The chain of reward guidance: ``[(keys, w_j), ...]``, the rewards the j-th step turns to
    their negative targets and its scale.

    A number is one step over every key. A mapping ``{key: w_k}`` takes its keys in the order
    given, then the keys it leaves out at ``default`` (w); neighbours with equal scales share a
    step (exact: the chain telescopes). Unknown keys, and scales that are not finite numbers >= 0,
    raise naming the value.
    """
    if not isinstance(scales, Mapping):
        return [(tuple(keys), float(scales))]
    unknown = [k for k in scales if k not in keys]
    if unknown:
        raise ValueError(f"reward_guidance_scale: unknown reward keys {unknown}; this model uses {list(keys)}")
    groups: list[tuple[tuple[str, ...], float]] = []
    for k in [*scales, *(k for k in keys if k not in scales)]:
        w = scales.get(k, default)
        if not is_real(w) or not math.isfinite(w) or w < 0:
            raise ValueError(f"reward_guidance_scale[{k!r}] = {w!r}; a reward's scale must be a finite number >= 0")
        if groups and groups[-1][1] == float(w):
            groups[-1] = (groups[-1][0] + (k,), groups[-1][1])
        else:
            groups.append(((k,), float(w)))
    return groups


def build_cfg_text(
    text_emb: Tensor, text_mask: Tensor, uncond_emb: Tensor, uncond_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad cond and uncond text to a common length as published (spec §5.3).

    ``uncond_emb``: (E,), (L_u, E) or (B, L_u, E); ``uncond_mask``: None (all True), (L_u,) or
    (B, L_u). Returns (cond_emb, cond_mask, uncond_emb, uncond_mask), all with the same L.
    """
    b, length, dim = text_emb.shape
    u = uncond_emb.to(device=text_emb.device, dtype=torch.float32)
    if u.dim() == 1:
        u = u[None]
    if u.dim() == 2:
        u = u[None].expand(b, -1, -1)
    if u.dim() != 3 or u.shape[0] != b or u.shape[-1] != dim:
        raise ValueError(f"uncond embedding must be (L_u, {dim}) or ({b}, L_u, {dim}), got {tuple(uncond_emb.shape)}")
    lu = u.shape[1]
    if uncond_mask is None:
        um = torch.ones(b, lu, dtype=torch.bool, device=text_emb.device)
    else:
        um = uncond_mask.to(text_emb.device).bool()
        if um.dim() == 1:
            um = um[None].expand(b, -1)
        if um.shape != (b, lu):
            raise ValueError(f"uncond mask must be ({lu},) or ({b}, {lu}), got {tuple(uncond_mask.shape)}")
    cm = text_mask.bool()
    ce = text_emb.float()
    if length > lu:
        um = torch.cat([um, torch.zeros(b, length - lu, dtype=torch.bool, device=um.device)], dim=1)
        u = torch.cat([u, u.new_zeros(b, length - lu, dim)], dim=1)
    elif length < lu:
        cm = torch.cat([cm, torch.zeros(b, lu - length, dtype=torch.bool, device=cm.device)], dim=1)
        ce = torch.cat([ce, ce.new_zeros(b, lu - length, dim)], dim=1)
    return ce, cm, u, um


def _autocast_ctx(device: torch.device, autocast: bool | None):
    if autocast is None:
        autocast = device.type == "cuda"
    if not autocast:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def euler_sample(
    model,
    noise: Tensor,
    text_emb: Tensor,
    text_mask: Tensor,
    uncond_emb: Tensor | None,
    uncond_mask: Tensor | None,
    reward_targets: Mapping[str, float | Tensor | None] | None = None,
    negative_reward_targets: Mapping[str, float | Tensor | None] | None = None,
    num_steps: int = 50,
    guidance_scale: float = 7.0,
    batched_cfg: bool = True,
    shift: float = 1.0,
    scheduler: Scheduler | None = None,
    autocast: bool | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    progress: bool = False,
    reward_guidance_scale: float | Mapping[str, float] | None = None,
    reward_direction: str = "prompt",
) -> Tensor:
    """Integrate from ``noise`` (B, C, S, S) to x0 in the model's normalised latent space.

    ``model``: a ``MiroModel`` (run in eval mode; its mode is restored afterwards).
    ``reward_targets`` / ``negative_reward_targets``: base key -> value in [0, 1] (float or (B,));
    defaults 1.0 and 0.0 for every key; ``None`` as a value drops that reward (zero embedding).
    ``guidance_scale`` w <= 0 disables CFG (one B-sized forward per step).
    ``reward_guidance_scale`` w_r (None: w, the published single scale) guides the text and the
    rewards separately through a third branch, as two-condition CFG does (InstructPix2Pix, Brooks
    et al. 2023, eq. 3). Both factorisations are offered, as the order matters:
    ``reward_direction="prompt"``: v = v(t, r+) + w_r [v(t, r+) - v(t, r-)] + w [v(t, r-) - v(null, r-)];
    ``reward_direction="null"``: v = v(t, r+) + w [v(t, r+) - v(null, r+)] + w_r [v(null, r+) - v(null, r-)]
    (w_r = 0 there is text-only guidance at the positive targets). Either is the published
    combination when w_r = w; 3B per step instead of 2B.
    A mapping ``{key: w_k}`` gives each reward its own scale (keys not given: w). The reward
    direction becomes a chain r+ = r_0 -> r_1 -> ... -> r_m = r-, step j turning its rewards to
    their negative targets (the mapping's keys in the order given, then the rest; neighbours with
    equal scales share a step, ``reward_scale_groups``):
    ``"prompt"``: v = v(t, r_0) + sum_j w_j [v(t, r_j-1) - v(t, r_j)] + w [v(t, r-) - v(null, r-)];
    ``"null"``: v = v(t, r+) + w [v(t, r+) - v(null, r+)] + sum_j w_j [v(null, r_j-1) - v(null, r_j)].
    The sum telescopes, so a number w_r is the one-step chain above and every w_j = w is the
    published combination; the order of the steps matters only where the scales differ (the
    network is not additive in its rewards). (m+2)B per step.
    ``scheduler`` replaces the published grid (and ``shift``), e.g. ``Scheduler(end=g0)`` integrates
    from gamma = g0 when ``noise`` is a partly noised x_g0 (SDEdit).
    ``callback(step, gamma_next, x)`` is called after every step. Deterministic: the only
    randomness is ``noise``. Returns fp32 x0 (B, C, S, S).
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not (is_real(guidance_scale) and math.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    guidance_scale = float(guidance_scale)  # numpy scalars in, Python floats in the arithmetic
    if reward_guidance_scale is not None and not isinstance(reward_guidance_scale, Mapping) and not (
            is_real(reward_guidance_scale) and math.isfinite(reward_guidance_scale)):
        raise ValueError(f"reward_guidance_scale must be a finite number or a mapping, got {reward_guidance_scale!r}")
    device = noise.device
    b = noise.shape[0]
    if text_emb.shape[0] != b or text_mask.shape != text_emb.shape[:2]:
        raise ValueError(
            f"text batch {tuple(text_emb.shape)} / mask {tuple(text_mask.shape)} do not match noise batch {b}"
        )
    keys = tuple(model.coherence_keys)
    pos = reward_values(keys, reward_targets, 1.0, b, device)
    use_cfg = guidance_scale > 0
    if reward_direction not in ("prompt", "null"):
        raise ValueError(f"reward_direction must be 'prompt' or 'null'; got {reward_direction!r}")
    groups = [] if reward_guidance_scale is None else reward_scale_groups(keys, reward_guidance_scale, guidance_scale)
    # Every reward at w: the chain telescopes to the published combination; take its 2B path.
    two_scales = bool(groups) and not (len(groups) == 1 and groups[0][1] == guidance_scale)
    by_null = two_scales and reward_direction == "null"
    if (use_cfg or by_null) and uncond_emb is None:
        raise ValueError("guidance_scale > 0 (or reward_direction='null') needs an unconditional text "
                         "embedding (uncond_emb)")
    if use_cfg or by_null:
        ce, cm, ue, um = build_cfg_text(text_emb.to(device), text_mask.to(device), uncond_emb, uncond_mask)
    else:
        ce, cm = text_emb.to(device).float(), text_mask.to(device).bool()
    neg = reward_values(keys, negative_reward_targets, 0.0, b, device) if (use_cfg or two_scales) else pos
    # Branches, conditional first as published. One scale: (text, r+), (null, r-). Two scales: the
    # chain r+ = r_0 -> r_1 -> ... -> r_m = r-, step j turning its rewards to their negative targets;
    # "prompt": (text, r_0..r_m) [, (null, r-)]; "null": (text, r+), (null, r_0..r_m).
    branches = [(ce, cm, pos)]
    if two_scales:
        chain, r = [pos], dict(pos)
        for group, _ in groups:
            for k in group:
                if k in r:  # a reward dropped from r+ stays dropped
                    r.pop(k)
                    if k in neg:
                        r[k] = neg[k]
            chain.append(dict(r))
        side = (ue, um) if by_null else (ce, cm)
        branches = branches[:1] + [(*side, c) for c in (chain if by_null else chain[1:])]
        if use_cfg and not by_null:
            branches.append((ue, um, neg))
    elif use_cfg:
        branches.append((ue, um, neg))
    n_br = len(branches)
    if batched_cfg and n_br > 1:
        emb_all = torch.cat([e for e, _, _ in branches])
        mask_all = torch.cat([m for _, m, _ in branches])
        # A reward dropped in some branches only: NaN there, which the network in eval mode
        # embeds as zeros (RIN.cond_mapping), exactly what leaving the key out gives.
        dropped = torch.full((b,), float("nan"), device=device)
        coh_all = {k: torch.cat([r.get(k, dropped) for _, _, r in branches])
                   for k in keys if any(k in r for _, _, r in branches)}
    scales = [w_j for _, w_j in groups]

    def combine(vs: list[Tensor]) -> Tensor:
        if n_br == 1:
            return vs[0]
        if not two_scales:
            return cfg_combine(vs[0], vs[1], guidance_scale)
        if by_null:  # vs: (text, r+), (null, r_0), ..., (null, r_m)
            v = vs[0] + guidance_scale * (vs[0] - vs[1])
            return v + sum(w_j * (vs[j] - vs[j + 1]) for j, w_j in enumerate(scales, start=1))
        # vs: (text, r_0), ..., (text, r_m) [, (null, r_m)]
        v = vs[0] + sum(w_j * (vs[j] - vs[j + 1]) for j, w_j in enumerate(scales))
        return v + guidance_scale * (vs[-2] - vs[-1]) if use_cfg else v

    gammas = time_grid(num_steps, shift=shift, device=device, scheduler=scheduler)
    x = noise.to(torch.float32)
    zs: list[Tensor | None] = [None] * n_br  # self-conditioning latents, carried per branch
    was_training = model.training
    model.eval()
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    try:
        for i in steps:
            g, g_next = gammas[i], gammas[i + 1]
            with _autocast_ctx(device, autocast):
                if batched_cfg and n_br > 1:
                    prev = None if zs[0] is None else torch.cat(zs)
                    v_all, z_all = model(torch.cat([x] * n_br), g.expand(n_br * b), emb_all, mask_all, coh_all, prev)
                    vs, zs = list(v_all.chunk(n_br)), list(z_all.chunk(n_br))
                else:
                    vs = []
                    for j, (e, m, r) in enumerate(branches):
                        v_j, zs[j] = model(x, g.expand(b), e, m, r, zs[j])
                        vs.append(v_j)
                v = combine(vs)
            x = x - v.float() * (g_next - g)
            if callback is not None:
                callback(i, g_next, x)
    finally:
        model.train(was_training)
    return x.to(torch.float32)
