"""The RIN backbone with text and multi-reward conditioning (``RIN``).

One class, weight-compatible with the published ``CADRINTextCond`` (``miro-t2i`` 0.1.4,
``miro/models/networks/rin.py``): it accepts exactly the published ``network`` kwargs of
``config.json`` and uses the published tensor names and shapes, bool masks included (held as
persistent bool buffers). Behaviour: ``miro_numerics_spec.md`` §2; init: §2.6.

Forward, in order: patchify (features ordered (p1, p2, c)) -> ``patch_extractor`` ->
``data_ln`` + position table [+ ``pixel_unet`` encoder]; time token; conditioning tokens [rewards + position vectors,
registers, mapped text] through two fixed 16-head LayerNorm/GELU/layer-scale blocks; latents +
time; cond sequence [time, rewards, registers, text] with a key-only mask; self-conditioning
``z += ln_previous_2(P + linear_previous(ln_previous_1(P)))``; ``num_blocks`` RIN blocks
(retrieve_cond, read, process, write[, data_mixer]); head; unpatchify [+ ``pixel_unet`` decoder
residual]. The bracketed parts are this project's extensions, off in the published network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from miro.models.configs import COND_HEADS, DROPOUT_STRATEGIES, check_network_kwargs
from miro.models.pixel_unet import PixelUNet
from miro.models.layers import (
    CrossAttentionBlock,
    FusedMLP,
    RMSNorm,
    SelfAttentionBlock,
    TimeEmbedder,
)

__all__ = ["RIN", "RINBlock", "TokenGridMixer", "DROPOUT_STRATEGIES", "sincos_2d_table"]



class TokenGridMixer(nn.Module):
    """Residual 3x3 depthwise conv over the (grid x grid) data tokens: x + conv(norm(x)).

    Not in the published network (``data_mixer="conv"`` turns it on). In RIN the data tokens meet
    only through the latents, so a small from-scratch model decides each patch from its own noisy
    pixels and learns late that neighbours agree (Shapes samples: mosaics of 4x4 patches). The
    conv is the locality prior of a ConvNeXt block (Liu et al. 2022) at 11*D parameters per
    block; zero-initialised, it leaves the network unchanged at step 0.
    """

    def __init__(self, dim: int, grid: int, attn_heads: int = 0, mlp_multiplier: int = 2):
        super().__init__()
        self.grid = grid
        self.norm = RMSNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        # ``conv_attn``: then a self-attention block over all data tokens, so a token can learn
        # where it sits in an object (the shape), not only what its neighbours hold. Its layer
        # scales start at 0 (a no-op at init), so a ``conv`` model warm-starts into it exactly.
        self.attn = (SelfAttentionBlock(dim, attn_heads, mlp_multiplier, use_layer_scale=True, layer_scale_value=0.0)
                     if attn_heads else None)

    def reset_parameters(self) -> None:
        self.norm.weight.data.fill_(1.0)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.norm(x).transpose(1, 2).reshape(b, d, self.grid, self.grid)
        x = x + self.conv(h).reshape(b, d, n).transpose(1, 2)
        return x if self.attn is None else self.attn(x)


class RINBlock(nn.Module):
    """One RIN block: [``retrieve_cond``] -> ``retriever_ca`` -> ``processer_sa.*`` -> ``writer_ca``."""

    def __init__(
        self,
        data_dim: int,
        latents_dim: int,
        num_processing_layers: int,
        read_write_heads: int,
        compute_heads: int,
        latent_mlp_multiplier: int,
        data_mlp_multiplier: int,
        compute_dropout: float,
        rw_stochastic_depth: float,
        compute_stochastic_depth: float,
        use_cond: bool,
        mixer_grid: int | None = None,
        mixer_attn_heads: int = 0,
    ):
        super().__init__()
        # Registration order follows the published module (read, process, write, then cond).
        self.retriever_ca = CrossAttentionBlock(
            latents_dim, data_dim, read_write_heads, latent_mlp_multiplier, 0.0, rw_stochastic_depth
        )
        self.processer_sa = nn.ModuleList(
            SelfAttentionBlock(
                latents_dim,
                compute_heads,
                latent_mlp_multiplier,
                compute_dropout,
                compute_stochastic_depth,
            )
            for _ in range(num_processing_layers)
        )
        self.writer_ca = CrossAttentionBlock(
            data_dim, latents_dim, read_write_heads, data_mlp_multiplier, 0.0, rw_stochastic_depth
        )
        if use_cond:
            self.retrieve_cond = CrossAttentionBlock(
                latents_dim,
                latents_dim,
                read_write_heads,
                latent_mlp_multiplier,
                0.0,
                rw_stochastic_depth,
            )
        else:
            self.retrieve_cond = None
        # Extension, registered last so the published tensors keep their order.
        self.data_mixer = (TokenGridMixer(data_dim, mixer_grid, mixer_attn_heads, data_mlp_multiplier)
                           if mixer_grid else None)

    def forward(
        self,
        x: Tensor,
        z: Tensor,
        cond: Tensor,
        cond_mask: Tensor,
        generator: torch.Generator | None = None,
        write: bool = True,
    ) -> tuple[Tensor, Tensor]:
        if self.retrieve_cond is not None:
            z = self.retrieve_cond(z, cond, from_mask=cond_mask, generator=generator)
        z = self.retriever_ca(z, x, generator=generator)
        for sa in self.processer_sa:
            z = sa(z, generator=generator)
        if write:
            x = self.writer_ca(x, z, generator=generator)
            if self.data_mixer is not None:
                x = self.data_mixer(x)
        return x, z


def sincos_2d_table(grid: int, dim: int) -> Tensor:
    """(grid*grid, dim) 2-D sine-cosine positions in the style of MAE/DiT, tokens row-major: the
    first half of the channels from the row index, the second half from the column, each half
    [sin | cos] over dim/4 frequencies 1/10000^(k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4; got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * omega[None]  # (grid, dim/4)
    axis = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, dim/2)
    rows = axis[:, None, :].expand(grid, grid, dim // 2)
    cols = axis[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


def _trunc_normal_published(p: Tensor, generator: torch.Generator | None) -> None:
    """The published init of the learned tables: trunc-normal, std 0.02, bounds +-0.04 (spec §2.6)."""
    nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04, generator=generator)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class RIN(nn.Module):
    """Reward- and text-conditioned RIN (published ``CADRINTextCond`` kwargs and tensor names)."""

    # Drop trailing text columns that are padding in every sample (exact; one host sync per call).
    trim_text_padding: bool = True

    def __init__(
        self,
        data_size: int,
        data_dim: int,
        num_input_channels: int,
        num_latents: int,
        latents_dim: int,
        label_dim: int,
        num_processing_layers: int,
        num_blocks: int,
        patch_size: int,
        num_cond_tokens: int,
        read_write_heads: int = 16,
        compute_heads: int = 16,
        latent_mlp_multiplier: int = 4,
        data_mlp_multiplier: int = 4,
        compute_dropout: float = 0.0,
        rw_stochastic_depth: float = 0.0,
        compute_stochastic_depth: float = 0.0,
        use_cond_rin_block: bool = False,
        concat_cond_token_to_latents: bool = True,
        use_self_conditioning: bool = False,
        num_text_registers: int = 16,
        coherence_keys: Sequence[str] = (),
        coherence_dropout: float = 0.0,
        dropout_strategy: str = "binomial",
        data_norm: str = "rms",
        data_mixer: str = "none",
        pixel_unet: int = 0,
    ):
        super().__init__()
        n_learned = check_network_kwargs(
            data_size=data_size, data_dim=data_dim, num_input_channels=num_input_channels, num_latents=num_latents,
            latents_dim=latents_dim, label_dim=label_dim, num_processing_layers=num_processing_layers,
            num_blocks=num_blocks, patch_size=patch_size, num_cond_tokens=num_cond_tokens,
            read_write_heads=read_write_heads, compute_heads=compute_heads,
            latent_mlp_multiplier=latent_mlp_multiplier, data_mlp_multiplier=data_mlp_multiplier,
            compute_dropout=compute_dropout, rw_stochastic_depth=rw_stochastic_depth,
            compute_stochastic_depth=compute_stochastic_depth, use_cond_rin_block=use_cond_rin_block,
            concat_cond_token_to_latents=concat_cond_token_to_latents, num_text_registers=num_text_registers,
            coherence_keys=coherence_keys, coherence_dropout=coherence_dropout, dropout_strategy=dropout_strategy,
            data_norm=data_norm, data_mixer=data_mixer, pixel_unet=pixel_unet,
        )
        self.data_size = data_size
        self.patch_size = patch_size
        self.num_input_channels = num_input_channels
        self.num_latents = num_latents
        self.latents_dim = latents_dim
        self.label_dim = label_dim
        self.use_cond_rin_block = use_cond_rin_block
        self.concat_cond_token_to_latents = concat_cond_token_to_latents
        self.use_self_conditioning = use_self_conditioning
        self.num_text_registers = num_text_registers
        self.coherence_keys = tuple(coherence_keys)  # base names, config order
        self.coherence_dropout = float(coherence_dropout)
        self.dropout_strategy = dropout_strategy
        k = len(self.coherence_keys)
        grid = data_size // patch_size
        patch_features = num_input_channels * patch_size * patch_size

        # --- data path
        self.patch_extractor = nn.Linear(patch_features, data_dim)
        self.data_pos_embedding = nn.Parameter(torch.empty(grid * grid, data_dim))
        # Published: RMSNorm over the patch embedding. It divides out each patch's scale (up to
        # the extractor's bias), so the net cannot tell a faint patch from a strong one of the
        # same direction, nor reproduce the noise it must remove (v = eps - x0); "none" keeps it.
        self.data_ln = RMSNorm(data_dim) if data_norm == "rms" else None
        # --- latents and time
        self.latents = nn.Parameter(torch.empty(n_learned, latents_dim))
        self.time_embedder = TimeEmbedder(latents_dim // 4)
        # --- conditioning mapping (fixed settings, spec §2.3)
        self.transformers_blocks = nn.ModuleList(
            SelfAttentionBlock(
                latents_dim,
                COND_HEADS,
                mlp_multiplier=4,
                use_layer_scale=True,
                layer_scale_value=0.1,
                use_qkv_biases=True,
                use_qk_norm=False,
                use_swiglu=False,
                layer_norm=True,
            )
            for _ in range(2)
        )
        self.coherence_embedder = nn.ModuleDict(
            {f"{key}_coherence": TimeEmbedder(latents_dim // 4) for key in self.coherence_keys}
        )
        self.coherence_positional_embedding = nn.Parameter(torch.empty(k, latents_dim))
        self.map_text_tokens = nn.Linear(label_dim, latents_dim)
        self.text_registers = nn.Parameter(torch.empty(num_text_registers, latents_dim))
        # --- self-conditioning
        if use_self_conditioning:
            self.ln_previous_1 = nn.LayerNorm(latents_dim, eps=1e-6)
            self.linear_previous = FusedMLP(latents_dim, latent_mlp_multiplier)
            self.ln_previous_2 = nn.LayerNorm(latents_dim, eps=1e-6)
        # --- blocks and head
        self.rin_blocks = nn.ModuleList(
            RINBlock(
                data_dim,
                latents_dim,
                num_processing_layers,
                read_write_heads,
                compute_heads,
                latent_mlp_multiplier,
                data_mlp_multiplier,
                compute_dropout,
                rw_stochastic_depth,
                compute_stochastic_depth,
                use_cond_rin_block,
                mixer_grid=grid if data_mixer in ("conv", "conv_attn") else None,
                mixer_attn_heads=read_write_heads if data_mixer == "conv_attn" else 0,
            )
            for _ in range(num_blocks)
        )
        self.map_tokens_to_patches = nn.Sequential(RMSNorm(data_dim), nn.Linear(data_dim, patch_features))
        # Bool masks, published as requires_grad=False parameters: persistent bool buffers here.
        self.register_buffer("registers_coherence_mask", torch.ones(num_text_registers + k, dtype=torch.bool))
        self.register_buffer("cond_mask", torch.ones(num_text_registers + k + 1, dtype=torch.bool))
        # Extension, registered last: a convolutional encoder/decoder around the RIN (0 = off).
        self.pixel_unet = (PixelUNet(pixel_unet, num_input_channels, patch_size, data_dim, latents_dim)
                           if pixel_unet else None)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Published initialisation (spec §2.6), optionally from an explicit generator."""
        from miro.models.layers import FourierEmbedding

        own = set(self.pixel_unet.modules()) if self.pixel_unet is not None else set()
        for m in self.modules():
            if m in own:
                continue  # initialised last, below
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, FourierEmbedding):
                m.reset_parameters(generator)
            elif isinstance(m, SelfAttentionBlock) and m.use_layer_scale:
                m.layer_scale_1.fill_(m.layer_scale_value)
                m.layer_scale_2.fill_(m.layer_scale_value)
            elif isinstance(m, TokenGridMixer):
                m.reset_parameters()  # zeros: no draw, so the published draw order is unchanged
        self.init_position_table("published", generator)  # first: the published draw order
        for p in (self.latents, self.text_registers, self.coherence_positional_embedding):
            _trunc_normal_published(p, generator)
        if self.use_self_conditioning:
            # Zero weight *and* bias: self-conditioning is a no-op at init only (spec §2.2, §2.6).
            self.ln_previous_2.weight.zero_()
            self.ln_previous_2.bias.zero_()
        for name, buf in self.named_buffers():
            if buf.dtype == torch.bool:
                buf.fill_(True)
        if self.pixel_unet is not None:
            self.pixel_unet.reset_parameters(generator)  # last: the published draws come first

    @torch.no_grad()
    def init_position_table(self, kind: str = "published", generator: torch.Generator | None = None) -> None:
        """(Re)initialise ``data_pos_embedding``: ``published`` (trunc-normal, std 0.02) or ``sincos``
        (:func:`sincos_2d_table`, only as the *starting point* of the learned table).

        The published table starts 50x smaller than the ``data_ln`` output it is added to, so small
        from-scratch runs learn position last: samples are patch mosaics whose patches pick colours
        independently (docs/training.md). Tensor names and shapes are unchanged; the release recipe
        keeps ``published``.
        """
        if kind == "published":
            _trunc_normal_published(self.data_pos_embedding, generator)
        elif kind == "sincos":
            grid = self.data_size // self.patch_size
            self.data_pos_embedding.copy_(sincos_2d_table(grid, self.data_pos_embedding.shape[1]))
        else:
            raise ValueError(f"position table init must be 'published' or 'sincos'; got {kind!r}")

    # ------------------------------------------------------------------ helpers
    def patchify(self, y: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, (S/p)^2, p*p*C); token row-major, features (p1, p2, c) c fastest."""
        b, c, h, w = y.shape
        p = self.patch_size
        y = y.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return y.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        b = x.shape[0]
        p, c = self.patch_size, self.num_input_channels
        x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def coherence_dropout_mask(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, K) float mask of kept reward embeddings (training only), published rules (spec §7).

        binomial: Bernoulli(1-p) per entry, an all-zero row replaced by a one-hot at a uniform
        index (draw order: bernoulli, then randint). uniform: drop n ~ U{0..K-1} rewards chosen by
        the ranks of rand(B, K) (draw order: randint, then rand). none: all ones.
        """
        k = len(self.coherence_keys)
        if self.dropout_strategy == "none" or (self.dropout_strategy == "binomial" and self.coherence_dropout == 0):
            # p = 0 keeps every reward; skipping the draws changes no value.
            return torch.ones(batch_size, k, device=device)
        if self.dropout_strategy == "binomial":
            probs = torch.full((batch_size, k), 1.0 - self.coherence_dropout, device=device)
            mask = torch.bernoulli(probs, generator=generator)
            idx = torch.randint(0, k, (batch_size,), device=device, generator=generator)
            fallback = torch.zeros_like(mask).scatter_(1, idx[:, None], 1.0)
            return torch.where(mask.sum(1, keepdim=True) == 0, fallback, mask)
        n_drop = torch.randint(0, k, (batch_size,), device=device, generator=generator)
        scores = torch.rand(batch_size, k, device=device, generator=generator)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        return (ranks >= n_drop[:, None]).float()

    def _coherence_value(self, value, batch_size: int, device: torch.device) -> Tensor:
        v = torch.as_tensor(value, device=device)
        if v.dim() == 0:
            v = v.expand(batch_size)
        if v.shape != (batch_size,):
            raise ValueError(f"reward values must be scalars or shape ({batch_size},), got {tuple(v.shape)}")
        return v

    def cond_mapping(
        self,
        text_tokens_embeddings: Tensor,
        text_tokens_mask: Tensor,
        coherence: Mapping[str, Tensor | float] | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """(B, K + R + L, D_l) tokens [rewards + position vectors, registers, mapped text]."""
        coherence = dict(coherence or {})
        unknown = set(coherence) - set(self.coherence_keys)
        if unknown:
            raise ValueError(
                f"unknown reward keys {sorted(unknown)}; this model was trained on {list(self.coherence_keys)}"
            )
        t = self.map_text_tokens(text_tokens_embeddings.float())
        b, device, dtype = t.shape[0], t.device, t.dtype
        embs = []
        for key in self.coherence_keys:
            embedder = self.coherence_embedder[f"{key}_coherence"]
            if key in coherence:
                v = self._coherence_value(coherence[key], b, device)
                if self.training:
                    v = torch.nan_to_num(v, nan=0.0)  # training: a NaN reward is embedded as value 0
                embs.append(embedder(v.to(dtype)))
            elif self.training:
                # A missing reward in training is a NaN reward, i.e. value 0 (spec §2.3, trap 20).
                embs.append(embedder(torch.zeros(b, device=device, dtype=dtype)))
            else:
                embs.append(None)  # eval: zero embedding (trap 11)
        ref = next((e for e in embs if e is not None), None)
        zeros = torch.zeros(b, self.latents_dim, device=device, dtype=ref.dtype if ref is not None else dtype)
        r = torch.stack([zeros if e is None else e for e in embs], dim=1)
        if self.training:
            r = r * self.coherence_dropout_mask(b, device, generator)[..., None]
        else:
            r = torch.nan_to_num(r, nan=0.0)  # a NaN value at eval gives a zero embedding
        seq = torch.cat(
            [
                r + self.coherence_positional_embedding,
                self.text_registers.expand(b, -1, -1),
                t,
            ],
            dim=1,
        )
        mask = torch.cat([self.registers_coherence_mask.expand(b, -1), text_tokens_mask.bool()], dim=1)
        for block in self.transformers_blocks:
            seq = block(seq, token_mask=mask)
        return seq

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        y: Tensor,
        gamma: Tensor,
        text_tokens_embeddings: Tensor,
        text_tokens_mask: Tensor,
        coherence: Mapping[str, Tensor | float] | None = None,
        previous_latents: Tensor | None = None,
        generator: torch.Generator | None = None,
        latents_only: bool = False,
    ) -> tuple[Tensor | None, Tensor]:
        """y (B, C, S, S) already scaled by c_in; gamma (B,) raw signal level; text (B, L, E) and
        bool mask (B, L); coherence: base reward key -> (B,) values (missing key: zero embedding in
        eval, value 0 in training); previous_latents (B, N_l, D_l) or None (path skipped).
        ``generator`` drives training-time randomness (reward dropout, dropout, stochastic depth).
        ``latents_only`` skips the last write block and the head (z does not depend on them) and
        returns (None, z): the self-conditioning first pass needs only z.
        Returns (F (B, C, S, S), z (B, N_l, D_l))."""
        b, c, h, w = y.shape
        if c != self.num_input_channels or h != self.data_size or w != self.data_size:
            raise ValueError(
                f"y has shape {tuple(y.shape)}; expected (B, {self.num_input_channels}, "
                f"{self.data_size}, {self.data_size})"
            )
        if text_tokens_embeddings.dim() != 3 or text_tokens_embeddings.shape[-1] != self.label_dim:
            raise ValueError(
                f"text_tokens_embeddings has shape {tuple(text_tokens_embeddings.shape)}; expected "
                f"(B, L, {self.label_dim})"
            )
        if text_tokens_mask.shape != text_tokens_embeddings.shape[:2]:
            raise ValueError(
                f"text_tokens_mask shape {tuple(text_tokens_mask.shape)} != embeddings (B, L) "
                f"{tuple(text_tokens_embeddings.shape[:2])}"
            )
        gamma = torch.as_tensor(gamma, device=y.device)
        if gamma.dim() == 0:
            gamma = gamma.expand(b)
        gamma = gamma.reshape(b)

        if self.trim_text_padding and not self.concat_cond_token_to_latents and not _compiling():
            # Text columns masked in every sample are only ever masked keys: dropping them leaves
            # every output unchanged (exp(-inf) = 0) and saves their cond-mapping compute.
            valid = text_tokens_mask.bool().any(0).nonzero()
            n = max(int(valid.max()) + 1, 1) if valid.numel() else 1
            if n < text_tokens_mask.shape[1]:
                text_tokens_embeddings = text_tokens_embeddings[:, :n]
                text_tokens_mask = text_tokens_mask[:, :n]

        e = self.time_embedder(gamma)  # (B, D_l)
        x = self.patch_extractor(self.patchify(y))
        if self.data_ln is not None:
            x = self.data_ln(x)
        x = x + self.data_pos_embedding
        if self.pixel_unet is not None:
            add, skips = self.pixel_unet.encode(y, e)
            x = x + add
        m = self.cond_mapping(text_tokens_embeddings, text_tokens_mask, coherence, generator)
        if self.concat_cond_token_to_latents:
            z = torch.cat([self.latents.expand(b, -1, -1), e[:, None], m], dim=1)
        else:
            z = self.latents + e[:, None]
        cond = torch.cat([e[:, None], m], dim=1)  # cat promotes a bf16 time token to fp32
        cond_mask = torch.cat([self.cond_mask.expand(b, -1), text_tokens_mask.bool()], dim=1)
        if self.use_self_conditioning and previous_latents is not None:
            p = previous_latents
            if p.dtype != self.ln_previous_1.weight.dtype:
                # Weights cast to bf16/fp16 meet the fp32 zero latents of the first step: CPU
                # LayerNorm refuses mixed dtypes (CUDA autocast would upcast; zeros are exact).
                p = p.to(self.ln_previous_1.weight.dtype)
            z = z + self.ln_previous_2(p + self.linear_previous(self.ln_previous_1(p)))
        last = len(self.rin_blocks) - 1
        for i, block in enumerate(self.rin_blocks):
            x, z = block(x, z, cond, cond_mask, generator, write=not (latents_only and i == last))
        if latents_only:
            return None, z
        out = self.unpatchify(self.map_tokens_to_patches(x), h, w)
        if self.pixel_unet is not None:
            out = out + self.pixel_unet.decode(x, skips, e)
        return out, z
