"""FLUX as an SRPO target (diffusers ``FluxPipeline`` / ``FluxTransformer2DModel``).

FLUX already uses the σ convention of ``miro.align.direct_align``: ``x_σ = σ·ε + (1−σ)·x0`` and
the transformer predicts ``v = ε − x0`` for ``timestep = σ`` (the pipeline passes ``t/1000``).
Latents are the VAE latents ``(z − shift_factor)·scaling_factor`` (0.1159 / 0.3611 for
FLUX.1), packed into 2×2 patches: (B, C, H, W) → (B, H/2·W/2, 4C).

:class:`FluxTarget` exposes what the SRPO trainer needs: ``encode_condition``, ``velocity``,
``rollout``, ``decode`` (differentiable, optional decoder checkpointing) and ``encode_images``
(offline mode). Full-scale use: ``FluxTarget.from_pretrained("black-forest-labs/FLUX.1-dev")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from miro.align.direct_align import euler_step, rollout_sigmas
from miro.align.precision import autocast, weight_dtype


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C), the FLUX 2×2 patch packing (``FluxPipeline._pack_latents``)."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width; got {h}x{w}")
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latent height ``h`` and width ``w``."""
    b, n, c4 = x.shape
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise ValueError(f"packed latents {tuple(x.shape)} do not match a {h}x{w} latent grid")
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2·w/2, 3) RoPE position ids of the packed latent grid (row, column in channels 1, 2)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass
class FluxTargetConfig:
    height: int = 720  # training / rollout resolution (upstream 720×720)
    width: int = 720
    train_guidance: float = 3.5  # guidance embedding of the training forward (upstream hard-codes 3.5)
    rollout_guidance: float = 1.0  # guidance of the online rollout (`--train_guidence`: 1 HPS, 2 PickScore)
    quantize_timestep: bool = True  # upstream feeds int(σ·1000)/1000 to the transformer
    max_sequence_length: int = 512  # T5 tokens (upstream preprocessing)
    decoder_checkpointing: bool = True  # recompute the VAE decoder in backward (README: checkpoint before the reward)
    vae_tiling: bool = False  # upstream enables VAE tiling at 720² on GPU


class FluxTarget:
    """SRPO adapter around a FLUX transformer, VAE and (optionally) its text encoders."""

    def __init__(self, transformer, vae, config: FluxTargetConfig | None = None, text_pipe=None):
        self.transformer = transformer
        self.vae = vae
        self.config = config or FluxTargetConfig()
        self.text_pipe = text_pipe  # a FluxPipeline (text encoders only needed) for encode_condition
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        c = self.config
        if c.height % (2 * self.vae_scale) or c.width % (2 * self.vae_scale):
            raise ValueError(f"height/width must be multiples of {2 * self.vae_scale}; got {c.height}x{c.width}")
        self.lh, self.lw = c.height // self.vae_scale, c.width // self.vae_scale
        self.vae.requires_grad_(False)
        # Full fine-tune unless LoRA adapters were added (then only they train).
        if not any("lora_" in n for n, _ in transformer.named_parameters()):
            transformer.requires_grad_(True)
        # The dtype the weights were loaded in (bf16 for FLUX.1-dev on CUDA): the forward runs under
        # autocast to it, since the trainer keeps the trained weights in float32 (miro.align.precision).
        self.compute_dtype = weight_dtype(transformer)
        if c.vae_tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()

    @classmethod
    def from_pipeline(cls, pipe, config: FluxTargetConfig | None = None) -> "FluxTarget":
        return cls(pipe.transformer, pipe.vae, config, text_pipe=pipe)

    @classmethod
    def from_pretrained(cls, model: str = "black-forest-labs/FLUX.1-dev", config: FluxTargetConfig | None = None, dtype=torch.bfloat16, **kw) -> "FluxTarget":
        from diffusers import FluxPipeline

        return cls.from_pipeline(FluxPipeline.from_pretrained(model, torch_dtype=dtype, **kw), config)

    # -- the trainer interface -------------------------------------------------------------
    @property
    def trainable_module(self) -> torch.nn.Module:
        return self.transformer

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.height, self.config.width)

    def set_trainable_module(self, module: torch.nn.Module) -> None:
        """Swap in the wrapped (Fabric / DDP) transformer; ``velocity`` then calls it."""
        self.transformer = module

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, (self.lh // 2) * (self.lw // 2), self.vae.config.latent_channels * 4)

    @torch.no_grad()
    def encode_condition(self, captions: list[str]) -> dict:
        """Text embeddings of the *base* captions (the generator never sees the reward prompts)."""
        if self.text_pipe is None:
            raise ValueError("FluxTarget has no text encoders; pass text_pipe or use precomputed embeddings (cond_from_embeddings)")
        pe, pooled, tids = self.text_pipe.encode_prompt(
            captions, prompt_2=None, device=self.device, max_sequence_length=self.config.max_sequence_length
        )
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "text_ids": tids}

    @staticmethod
    def cond_from_embeddings(embeds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], device=None) -> dict:
        """Batch the ``(prompt_embeds, pooled, text_ids)`` of precomputed items (``load_fork_embeddings``)."""
        pe = torch.stack([e[0] for e in embeds]).to(device)
        pooled = torch.stack([e[1] for e in embeds]).to(device)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "text_ids": embeds[0][2].to(device)}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, guidance: float | None = None) -> torch.Tensor:
        """``v = ε − x0`` predicted by the transformer at noise level ``sigma`` (B,)."""
        t = torch.floor(sigma * 1000) / 1000 if self.config.quantize_timestep else sigma
        g = self.config.train_guidance if guidance is None else guidance
        # Not self.transformer.dtype: Fabric's wrapper reports float32 whatever the weights are.
        dtype = self.compute_dtype
        kw = {}
        if self.transformer.config.guidance_embeds:
            kw["guidance"] = torch.full((x.shape[0],), float(g), device=x.device, dtype=torch.float32)
        with autocast(x.device, dtype):
            out = self.transformer(
                hidden_states=x.to(dtype),
                timestep=t.to(device=x.device, dtype=dtype),
                pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                txt_ids=cond["text_ids"],
                img_ids=latent_image_ids(self.lh, self.lw, x.device, dtype),
                return_dict=False,
                **kw,
            )[0]
        return out.float()

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, cond: dict, num_steps: int = 25, shift: float | None = 3.0, progress: bool = False) -> torch.Tensor:
        """Deterministic Euler ODE from ``noise`` over ``σ_i = shift(1 − i/N)`` (upstream ``run_sample_step``;
        ``shift`` None means the upstream 3)."""
        sig = rollout_sigmas(num_steps, 3.0 if shift is None else shift).tolist()
        x = noise.float()
        it = range(num_steps)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="rollout", leave=False)
        for i in it:
            s = torch.full((x.shape[0],), sig[i], device=x.device)
            v = self.velocity(x, s, cond, guidance=self.config.rollout_guidance)
            x = euler_step(x, v, sig[i], sig[i + 1])
        return x

    def _decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Packed latents → images (B, 3, H, W) in [0, 1], differentiable through the frozen VAE."""
        z = unpack_latents(x0, self.lh, self.lw)
        z = z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        z = z.to(self.vae.dtype)
        if self.config.decoder_checkpointing and torch.is_grad_enabled():
            img = checkpoint(self._decode_latent, z, use_reentrant=False)
        else:
            img = self._decode_latent(z)
        return (img.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) → packed clean latents, ``(z − shift)·scale`` of a VAE sample."""
        if images.shape[-2:] != (self.config.height, self.config.width):
            raise ValueError(f"images must be {self.config.height}x{self.config.width}; got {tuple(images.shape[-2:])}")
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dist.mean.device)
        z = (z.float() - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor
        return pack_latents(z)
