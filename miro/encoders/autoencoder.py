"""Autoencoders ("codecs"): images in [-1, 1] <-> the space the flow model works in.

- :class:`SDXLVAECodec` — diffusers ``AutoencoderKL`` (default ``stabilityai/sdxl-vae``), run
  in float32 as published. ``encode`` returns the latent distribution's moments (mean, std):
  the published shards store exactly these as ``vae_embeddings_{mean,std}_{256,512}.npy`` and
  the model's ``data_preprocessing`` normalises them (sampling mean + std·ε when
  ``vae_sample``). ``decode`` runs ``vae.decode(z).sample`` in chunks of at most 64 images with
  no extra scaling factor — the model's ``postprocessing`` buffers already hold it (spec §4.3).
- :class:`IdentityCodec` — pixel space: latents are the images themselves, std is zero.

:func:`to_uint8` is the published image conversion (clamp(x/2 + 1/2) · 255, then a *truncating*
cast to uint8, miro-t2i `miro/models/postprocessing.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

SDXL_VAE = "stabilityai/sdxl-vae"
# Published decode chunk (miro-t2i `VAEDecoderPostProcessing(max_batch_size=64)`).
MAX_DECODE_BATCH = 64

_SDXL_NAMES = ("sdxl", "sdxl-vae", "sdxl_vae", SDXL_VAE)
_IDENTITY_NAMES = ("identity", "pixel", "pixels", "none")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] to [0, 1], clamped (float, same layout)."""
    return torch.clamp(images * 0.5 + 0.5, 0, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), truncating as published (no rounding)."""
    u8 = (to_unit(images) * 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


class Codec:
    """Interface: ``encode(images) -> (mean, std)``, ``decode(latents) -> images``.

    Attributes:
        downsample: spatial factor between images and latents (8 for SDXL, 1 for pixels).
        latent_channels: channels of the latents (4 for SDXL, 3 for pixels).
        spec: the string written into a pipeline's ``config.json`` under ``autoencoder``.
    """

    downsample: int
    latent_channels: int
    spec: str

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Codec":
        return self


def _check_images(images: torch.Tensor, channels: int = 3) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, {channels}, H, W) tensor in [-1, 1]; got {shape}")


class IdentityCodec(Codec):
    """Pixel space: the model denoises RGB images in [-1, 1] directly."""

    downsample = 1
    latent_channels = 3
    spec = "identity"

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_images(images)
        return images.clone(), torch.zeros_like(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_images(latents)
        return latents.clone()

    def __repr__(self) -> str:
        return "IdentityCodec()"


class SDXLVAECodec(Codec):
    """diffusers ``AutoencoderKL`` loaded lazily from a hub id or a diffusers-format folder.

    ``downsample`` and ``latent_channels`` are read from the loaded VAE's config (8 and 4 for
    SDXL). ``encode``/``decode`` follow the caller's grad mode (the VAE's own parameters are
    frozen), so gradients reach the latents when a reward is back-propagated through decoding."""

    def __init__(
        self,
        name_or_path: str | os.PathLike = SDXL_VAE,
        max_batch_size: int = MAX_DECODE_BATCH,  # images per VAE call (published: 64)
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,  # published: fp32 (bf16 only after pipe.to(bf16))
        spec: str | None = None,
        **hub_kwargs: Any,  # revision, cache_dir, local_files_only, token, subfolder
    ):
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size!r}")
        self.name_or_path = str(name_or_path)
        self.max_batch_size = int(max_batch_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self.spec = spec or self.name_or_path
        self.hub_kwargs = hub_kwargs
        self.vae = None
        self._latent_channels: int | None = None
        self._downsample: int | None = None

    def load(self) -> "SDXLVAECodec":
        if self.vae is not None:
            return self
        from diffusers import AutoencoderKL

        from miro.hub import clean_hub_kwargs
        from miro.io import one_line

        try:
            vae = AutoencoderKL.from_pretrained(self.name_or_path, **clean_hub_kwargs(**self.hub_kwargs))
        except (OSError, EnvironmentError) as e:
            raise OSError(
                f"could not load the autoencoder {self.name_or_path!r} ({one_line(e)}). Without network "
                "access, pass a local diffusers AutoencoderKL folder or a name already cached."
            ) from e
        vae.eval().requires_grad_(False)
        vae.to(self.device)
        self.vae = vae
        if vae.dtype != self.compute_dtype:  # cast only when asked: diffusers warns on every .to(dtype)
            vae.to(dtype=self.compute_dtype)
        self._latent_channels = int(vae.config.latent_channels)
        self._downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        return self

    @property
    def latent_channels(self) -> int:  # type: ignore[override]
        if self._latent_channels is None:
            self.load()
        return int(self._latent_channels)

    @property
    def downsample(self) -> int:  # type: ignore[override]
        if self._downsample is None:
            self.load()
        return int(self._downsample)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the VAE runs in: ``dtype``, but float32 for float16 when the VAE's config asks
        for it (``force_upcast``, set by the SDXL VAE, whose activations overflow float16 into
        NaN, i.e. black images; diffusers' SDXL pipelines upcast the same way). bfloat16 has
        float32's range and is kept."""
        if self.dtype == torch.float16 and self.vae is not None and getattr(self.vae.config, "force_upcast", False):
            return torch.float32
        return self.dtype

    def to(self, device=None, dtype=None) -> "SDXLVAECodec":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        if self.vae is not None:
            self.vae.to(self.device)
            if self.vae.dtype != self.compute_dtype:
                self.vae.to(dtype=self.compute_dtype)
        return self

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> latent (mean, std), each (B, C, H/8, W/8), float32."""
        _check_images(images)
        self.load()
        means, stds = [], []
        for chunk in images.split(self.max_batch_size):
            dist = self.vae.encode(chunk.to(self.device, self.compute_dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> images in (about) [-1, 1], decoded in chunks of ``max_batch_size``."""
        self.load()
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w); got {tuple(latents.shape)}"
            )
        out = [
            self.vae.decode(chunk.to(self.device, self.compute_dtype)).sample
            for chunk in latents.split(self.max_batch_size)
        ]
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"SDXLVAECodec({self.name_or_path!r})"


def load_autoencoder(spec: Any = SDXL_VAE, device: str | torch.device = "cpu", **hub_kwargs: Any) -> Codec:
    """Build a codec from ``"identity"``, ``"sdxl"``/``"stabilityai/sdxl-vae"``, a diffusers
    ``AutoencoderKL`` folder (checked via its ``config.json`` ``_class_name``), another hub id
    (loaded lazily as an ``AutoencoderKL``), or an object with ``encode``/``decode``."""
    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "encode") and hasattr(spec, "decode"):
            return spec
        raise ValueError(
            f"autoencoder must be a name, a folder, a hub id or a codec object; got {spec!r}"
        )
    name = str(spec)
    if name.lower() in _IDENTITY_NAMES:
        return IdentityCodec()
    if name.lower() in _SDXL_NAMES:
        return SDXLVAECodec(SDXL_VAE, device=device, spec=SDXL_VAE, **hub_kwargs)
    path = Path(name)
    if path.is_dir():
        cfg = path / "config.json"
        cls_name = json.loads(cfg.read_text()).get("_class_name") if cfg.is_file() else None
        if cls_name != "AutoencoderKL":
            raise ValueError(
                f"autoencoder folder {name!r} is not a diffusers AutoencoderKL "
                f"(config.json _class_name={cls_name!r}); supported: 'AutoencoderKL', or the "
                f"names {', '.join(_IDENTITY_NAMES + _SDXL_NAMES)}"
            )
        return SDXLVAECodec(name, device=device, **hub_kwargs)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return SDXLVAECodec(name, device=device, **hub_kwargs)
    raise ValueError(
        f"unknown autoencoder {name!r}: not a folder, not a hub id; built-in names: "
        f"{', '.join(_IDENTITY_NAMES + _SDXL_NAMES)}"
    )
