"""MIRO flow models (``MiroPipeline``) as an SRPO target.

Our models use the signal level γ (``miro/models/flow.py``): ``x_γ = γ·x0 + (1−γ)·ε`` and the
network predicts the same velocity ``v = ε − x0``. With σ = 1 − γ this is exactly the FLUX form
Direct-Align is written in, so :meth:`MiroTarget.velocity` only calls the model at
``γ = 1 − σ``. MIRO's guidance is ``(1+w)·v(text, r+) − w·v(null text, r−)`` with reward targets
``r+`` (default 1.0 for every reward key) and ``r−`` (default 0.0); rollouts and, by default, the
training forward use it, so SRPO tunes the velocity the sampler actually follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from miro.align.precision import autocast, weight_dtype
from miro.models.flow import cfg_combine, flux_shift_to_gamma_shift, sigma_to_gamma


@dataclass
class MiroTargetConfig:
    guidance_scale: float = 7.0  # MIRO CFG w of rollouts ((1+w) convention; published default 7)
    train_guidance: float | None = None  # w of the training forward; None = guidance_scale (costs a 2B forward)
    reward_targets: dict = field(default_factory=dict)  # r+ per key; missing keys 1.0 (published)
    negative_reward_targets: dict = field(default_factory=dict)  # r− per key; missing keys 0.0
    decoder_checkpointing: bool = True  # recompute the VAE decoder in backward (no-op for pixel space)


class MiroTarget:
    """SRPO adapter around a :class:`miro.MiroPipeline` (full fine-tune or LoRA of ``pipe.model``)."""

    def __init__(self, pipe, config: MiroTargetConfig | None = None):
        self.pipe = pipe
        self.config = config or MiroTargetConfig()
        self.model = pipe.model
        net = pipe.config["network"]
        self.res = int(pipe.config.get("data_resolution", net["data_size"]))
        self.channels = int(net["num_input_channels"])
        codec = pipe.autoencoder
        self.height = self.width = self.res * int(getattr(codec, "downsample", 1))
        self.keys = tuple(pipe.coherence_keys)
        self.pos = pipe._targets(self.config.reward_targets, 1.0, "reward_targets")
        self.neg = pipe._targets(self.config.negative_reward_targets, 0.0, "negative_reward_targets")
        # SRPO trains a deterministic velocity: eval mode switches off the network's coherence
        # dropout and stochastic depth (gradients still flow).
        self.model.eval()
        # Full fine-tune unless LoRA adapters were added (then only they train). Loaded pipelines
        # come frozen for inference.
        if not any("lora_" in n for n, _ in self.model.named_parameters()):
            self.model.requires_grad_(True)
            # The EDM2 log-variance head only reweights the pretraining loss; SRPO never calls it,
            # and a trainable parameter without a gradient stops DDP ("did not receive grad").
            logvar = getattr(self.model.preconditioning, "logvar_proj", None)
            if logvar is not None:
                logvar.requires_grad_(False)
        # The dtype the weights were loaded in (`target.dtype`): forwards and rollouts run under
        # autocast to it, since the trainer keeps the trained weights in float32 (miro.align.precision).
        self.compute_dtype = weight_dtype(self.model)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.height, self.width)

    # -- the trainer interface -------------------------------------------------------------
    @property
    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def set_trainable_module(self, module: torch.nn.Module) -> None:
        self.model = module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.channels, self.res, self.res)

    @torch.no_grad()
    def encode_condition(self, captions: list[str]) -> dict:
        emb, mask = self.pipe.text_encoder.encode(list(captions))
        emb, mask = emb.to(self.device, torch.float32), mask.to(self.device)
        unc = self.pipe.uncond_embedding.to(self.device, torch.float32)
        from miro.models.sampler import build_cfg_text

        ce, cm, ue, um = build_cfg_text(emb, mask, unc, None)
        return {"emb": emb, "mask": mask, "cfg": (ce, cm, ue, um)}

    def _rewards(self, table: dict, b: int, device) -> dict:
        return {k: torch.full((b,), v, device=device) for k, v in table.items()}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, guidance: float | None = None) -> torch.Tensor:
        """Guided ``v = ε − x0`` at noise level σ (model called at γ = 1 − σ)."""
        w = self.config.train_guidance if guidance is None else guidance
        w = self.config.guidance_scale if w is None else float(w)
        b = x.shape[0]
        gamma = sigma_to_gamma(sigma.to(x.device, torch.float32))
        if w <= 0:
            with autocast(x.device, self.compute_dtype):
                v, _ = self.model(x, gamma, cond["emb"], cond["mask"], self._rewards(self.pos, b, x.device), None)
            return v.float()
        ce, cm, ue, um = cond["cfg"]
        coh = {k: torch.cat([torch.full((b,), self.pos[k]), torch.full((b,), self.neg[k])]).to(x.device) for k in self.keys}
        with autocast(x.device, self.compute_dtype):
            v2, _ = self.model(torch.cat([x, x]), torch.cat([gamma, gamma]), torch.cat([ce, ue]), torch.cat([cm, um]), coh, None)
        v_c, v_u = v2.float().chunk(2)
        return cfg_combine(v_c, v_u, w)

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, cond: dict, num_steps: int = 25, shift: float | None = None, progress: bool = False) -> torch.Tensor:
        """The model's own Euler CFG sampler (``euler_sample``) from ``noise``. ``shift`` is a σ-shift
        (FLUX convention, converted to our γ-shift); None samples on the pipeline's own grid
        (its config's ``scheduler``, read as published)."""
        from miro.models.flow import Scheduler
        from miro.models.sampler import euler_sample

        if shift is None:
            grid = dict(scheduler=Scheduler.from_config(self.pipe.config.get("scheduler")))
        else:
            grid = dict(shift=flux_shift_to_gamma_shift(shift))
        ce, cm, ue, um = cond["cfg"]
        module = getattr(self.model, "module", self.model)  # the sampler needs the bare MiroModel API
        return euler_sample(module, noise, cond["emb"], cond["mask"], ue, um, reward_targets=self.pos,
                            negative_reward_targets=self.neg, num_steps=num_steps, guidance_scale=self.config.guidance_scale,
                            autocast=self.compute_dtype != torch.float32, progress=progress, **grid)

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        # the codec's decode keeps the caller's grad mode, so the reward's gradient reaches z through it
        return self.pipe.autoencoder.decode(z).float()

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Normalised latents → images (B, 3, H, W) in [0, 1], differentiable."""
        z = self.pipe.model.postprocess(x0)
        if self.config.decoder_checkpointing and torch.is_grad_enabled() and hasattr(self.pipe.autoencoder, "vae"):
            img = checkpoint(self._decode_latents, z, use_reentrant=False)
        else:
            img = self._decode_latents(z)
        return (img.float() * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] → clean normalised latents (the training-data path ``preprocess``)."""
        if images.shape[-2:] != (self.height, self.width):
            raise ValueError(f"images must be {self.height}x{self.width}; got {tuple(images.shape[-2:])}")
        mean, std = self.pipe.autoencoder.encode(images.to(self.device))
        return self.pipe.model.preprocess(mean.to(self.device), std.to(self.device), generator=generator).float()
