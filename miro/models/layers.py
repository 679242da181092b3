"""Building blocks of the RIN backbone: norms, attention, feed-forwards, Fourier time embedders.

Tensor names and numerics follow the published MIRO checkpoint format (``miro-t2i`` 0.1.4,
``miro/models/networks/{transformers,positional_embeddings,rin}.py``); the behaviour is
specified op by op in ``miro_numerics_spec.md`` §1. Speed comes from the implementation only:
fused kernels (``F.rms_norm``, ``F.scaled_dot_product_attention``), views instead of copies for
the head split, key-only (broadcast) attention masks instead of materialised (B, Nq, Nk) ones.

Randomness used in training (dropout, stochastic depth) accepts an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RMSNorm",
    "swiglu_hidden_dim",
    "SwiGLU",
    "FusedMLP",
    "Attention",
    "SelfAttentionBlock",
    "CrossAttentionBlock",
    "FourierEmbedding",
    "TimeEmbedder",
    "stochastic_depth",
    "dropout",
]

NORM_EPS = 1e-6  # every norm in the published network uses eps = 1e-6 (spec §1.1-1.2)
_SQRT2 = math.sqrt(2.0)


def dropout(x: Tensor, p: float, training: bool, generator: torch.Generator | None = None) -> Tensor:
    """Inverted dropout with an optional explicit generator (identity in eval or when p = 0)."""
    if not training or p <= 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * keep / (1.0 - p)


def stochastic_depth(
    x: Tensor, p: float, training: bool, generator: torch.Generator | None = None
) -> Tensor:
    """Per-sample branch drop as published: mask = floor(U[0,1) + (1-p)) / (1-p), shape (B,1,1)."""
    if not training or p <= 0.0:
        return x
    survival = 1.0 - p
    u = torch.rand(x.shape[0], 1, 1, device=x.device, dtype=torch.float32, generator=generator)
    mask = (u + survival).floor_()
    if survival > 0:
        mask = mask / survival
    return x * mask


class _RMSNormFn(torch.autograd.Function):
    """fp32 RMSNorm with an analytic backward: saves x and the (N, 1) inverse rms only, instead of
    the five intermediates of the composite op (less memory, fewer passes in backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return x * rstd * weight

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xn = x * rstd
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (grad * xn).reshape(-1, x.shape[-1]).sum(0)
        gx = None
        if ctx.needs_input_grad[0]:
            gxn = grad * weight
            gx = rstd * (gxn - xn * (gxn * xn).mean(-1, keepdim=True))
        return gx, gw, None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype *before* the weight multiply.

    This is not ``torch.nn.RMSNorm`` (which normalises in the input dtype): under bf16 autocast the
    published ``data_ln`` rounds the normalised patches to bf16 and then multiplies by the fp32
    weight (spec §1.1, trap 1). For fp32 inputs the fused ``F.rms_norm`` kernel does all of it.
    """

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNormFn.apply(x, self.weight, self.eps)
            if not torch.is_autocast_enabled(x.device.type):
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Reference composite (also under autocast, whose op lists must not touch the fp32 math):
        # normalise in fp32, round to the input dtype, then multiply by the weight.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def swiglu_hidden_dim(dim: int, multiplier: float) -> int:
    """SwiGLU width: int(m*D*2/3) (float division, truncated), rounded *up* to a multiple of 256."""
    hidden = int(multiplier * dim * 2 / 3)
    if hidden % 256:
        hidden += 256 - hidden % 256
    return hidden


class SwiGLU(nn.Module):
    """``linear_packed`` D->2H, x1 * SiLU(x2) with the *second* half as gate, ``linear_out`` H->D."""

    def __init__(self, dim: int, multiplier: float = 4, dropout_p: float = 0.0, bias: bool = True):
        super().__init__()
        hidden = swiglu_hidden_dim(dim, multiplier)
        self.hidden = hidden
        self.dropout_p = dropout_p
        self.linear_packed = nn.Linear(dim, 2 * hidden, bias=bias)
        self.linear_out = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        h = self.linear_packed(x)
        x1, x2 = h.split(self.hidden, dim=-1)
        h = F.silu(x2).mul_(x1) if not torch.is_grad_enabled() else x1 * F.silu(x2)
        h = dropout(h, self.dropout_p, self.training, generator)
        return self.linear_out(h)


class FusedMLP(nn.Module):
    """``linear_1`` D->mD, exact (erf) GELU, dropout, ``linear_2`` mD->D."""

    def __init__(self, dim: int, multiplier: int = 4, dropout_p: float = 0.0, bias: bool = True):
        super().__init__()
        self.dropout_p = dropout_p
        self.linear_1 = nn.Linear(dim, dim * multiplier, bias=bias)
        self.linear_2 = nn.Linear(dim * multiplier, dim, bias=bias)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        h = F.gelu(self.linear_1(x))
        h = dropout(h, self.dropout_p, self.training, generator)
        return self.linear_2(h)


class Attention(nn.Module):
    """Multi-head attention with the published projection layout.

    Self-attention: one fused ``qkv`` (contiguous q | k | v blocks). Cross-attention: ``q`` and
    a fused ``kv`` (k | v). Heads are head-major (feature = head * d + j). Optional per-head
    QK-LayerNorm *with bias* (``q_norm``/``k_norm``, size head_dim) after the head split; v is not
    normalised. ``out`` always has a bias. Spec §1.3, traps 2-3.
    """

    def __init__(
        self,
        attention_dim: int,
        num_heads: int,
        dim_q: int,
        dim_kv: int,
        is_sa: bool,
        use_qkv_biases: bool = False,
        use_qk_norm: bool = True,
    ):
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(
                f"attention width {attention_dim} is not divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.attention_dim = attention_dim
        self.is_sa = is_sa
        self.scale = 1.0 / math.sqrt(self.head_dim)
        if is_sa:
            self.qkv = nn.Linear(dim_q, 3 * attention_dim, bias=use_qkv_biases)
        else:
            self.q = nn.Linear(dim_q, attention_dim, bias=use_qkv_biases)
            self.kv = nn.Linear(dim_kv, 2 * attention_dim, bias=use_qkv_biases)
        self.out = nn.Linear(attention_dim, dim_q, bias=True)
        self.use_qk_norm = use_qk_norm
        if use_qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=NORM_EPS)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=NORM_EPS)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, N, dim_q); context (B, M, dim_kv) for cross-attention; mask bool, broadcastable to
        (B, heads, N, M), True = may attend."""
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        if self.is_sa:
            q, k, v = self.qkv(x).view(b, n, 3, h, d).unbind(2)
        else:
            m = context.shape[1]
            q = self.q(x).view(b, n, h, d)
            k, v = self.kv(context).view(b, m, 2, h, d).unbind(2)
        if self.use_qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.scale
        )
        return self.out(o.transpose(1, 2).reshape(b, n, h * d))


def _bool_buffer(shape: tuple[int, ...]) -> Tensor:
    return torch.ones(*shape, dtype=torch.bool)


class SelfAttentionBlock(nn.Module):
    """Pre-norm self-attention block (spec §1.6): ``initial_ln``, ``sa``, ``middle_ln``, ``ffn``,
    optional ``layer_scale_{1,2}``, and the stored bool ``attention_mask_dummy`` (1, 1).

    Only keys are masked; every query row is computed.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_multiplier: int = 4,
        dropout_p: float = 0.0,
        stochastic_depth_p: float = 0.0,
        use_layer_scale: bool = False,
        layer_scale_value: float = 0.1,
        use_qkv_biases: bool = False,
        use_qk_norm: bool = True,
        use_swiglu: bool = True,
        layer_norm: bool = False,
    ):
        super().__init__()
        norm = (lambda: nn.LayerNorm(dim, eps=NORM_EPS)) if layer_norm else (lambda: RMSNorm(dim))
        self.initial_ln = norm()
        self.sa = Attention(dim, num_heads, dim, dim, True, use_qkv_biases, use_qk_norm)
        self.middle_ln = norm()
        ffn = SwiGLU if use_swiglu else FusedMLP
        self.ffn = ffn(dim, mlp_multiplier, dropout_p)
        self.sd_p = stochastic_depth_p
        self.use_layer_scale = use_layer_scale
        self.layer_scale_value = layer_scale_value
        if use_layer_scale:
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(layer_scale_value)))
            self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(layer_scale_value)))
        self.register_buffer("attention_mask_dummy", _bool_buffer((1, 1)))

    def forward(
        self, tokens: Tensor, token_mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        mask = None
        if token_mask is not None:
            # mask[b, i, j] = token_mask[b, j] AND dummy, kept as a broadcast (B, 1, 1, N) bool.
            mask = (token_mask & self.attention_mask_dummy)[:, None, None, :]
        a = self.sa(self.initial_ln(tokens), mask=mask)
        if self.use_layer_scale:
            a = self.layer_scale_1 * a
        tokens = tokens + stochastic_depth(a, self.sd_p, self.training, generator)
        f = self.ffn(self.middle_ln(tokens), generator)
        if self.use_layer_scale:
            f = self.layer_scale_2 * f
        return tokens + stochastic_depth(f, self.sd_p, self.training, generator)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block (spec §1.7): ``initial_to_ln`` on the queries only (the
    key/value tokens are *not* normalised), ``ca`` with width min(dim_q, dim_kv), ``middle_ln``,
    SwiGLU ``ffn``, bool ``attention_mask_dummy``. No layer scale."""

    def __init__(
        self,
        dim_q: int,
        dim_kv: int,
        num_heads: int,
        mlp_multiplier: int = 4,
        dropout_p: float = 0.0,
        stochastic_depth_p: float = 0.0,
    ):
        super().__init__()
        self.initial_to_ln = RMSNorm(dim_q)
        self.ca = Attention(min(dim_q, dim_kv), num_heads, dim_q, dim_kv, False)
        self.middle_ln = RMSNorm(dim_q)
        self.ffn = SwiGLU(dim_q, mlp_multiplier, dropout_p)
        self.sd_p = stochastic_depth_p
        self.register_buffer("attention_mask_dummy", _bool_buffer((1, 1)))

    def forward(
        self,
        to_tokens: Tensor,
        from_tokens: Tensor,
        to_mask: Tensor | None = None,
        from_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        mask = None
        if to_mask is not None or from_mask is not None:
            # A missing side is the stored dummy expanded to its length (published semantics).
            key = from_mask if from_mask is not None else self.attention_mask_dummy
            key = key & self.attention_mask_dummy
            if to_mask is None:
                mask = key[:, None, None, :]  # key-only mask, broadcast over heads and queries
            else:
                mask = (key[:, None, :] & to_mask[:, :, None])[:, None]
        a = self.ca(self.initial_to_ln(to_tokens), from_tokens, mask=mask)
        to_tokens = to_tokens + stochastic_depth(a, self.sd_p, self.training, generator)
        f = self.ffn(self.middle_ln(to_tokens), generator)
        return to_tokens + stochastic_depth(f, self.sd_p, self.training, generator)


class FourierEmbedding(nn.Module):
    """EDM2-style Fourier features: sqrt(2) * cos(x * freqs + phases), cos only.

    ``freqs`` = 2*pi*N(0,1)*bandwidth and ``phases`` = 2*pi*U(0,1) are random persistent fp32
    buffers: load them from a checkpoint, never re-draw them (spec §1.8, trap 7). Computed in
    fp32, returned in the input dtype.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.bandwidth = bandwidth
        self.register_buffer("freqs", torch.empty(num_channels, dtype=torch.float32))
        self.register_buffer("phases", torch.empty(num_channels, dtype=torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.freqs.normal_(generator=generator).mul_(2 * math.pi * self.bandwidth)
        self.phases.uniform_(generator=generator).mul_(2 * math.pi)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs) + self.phases
        return (y.cos() * _SQRT2).to(x.dtype)


class TimeEmbedder(nn.Module):
    """Scalar (gamma or a reward value) -> (B, 4*dim) vector (spec §1.8).

    Fourier(dim) features, standardised over channels with the *unbiased* std and no eps, then
    ``map_time_input`` (dim -> 4 dim), SiLU, ``map_time_output`` (4 dim -> 4 dim).
    """

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        self.encode_time = FourierEmbedding(dim)
        self.map_time_input = nn.Linear(dim, dim * expansion)
        self.map_time_output = nn.Linear(dim * expansion, dim * expansion)

    def forward(self, t: Tensor) -> Tensor:
        f = self.encode_time(t * 1.0)
        f = (f - f.mean(dim=-1, keepdim=True)) / f.std(dim=-1, keepdim=True)
        return self.map_time_output(F.silu(self.map_time_input(f)))
