"""``MiroModel``: network + preconditioning + latent (de)normalisation, one state dict.

Its ``state_dict()`` is exactly the key set of a published ``model.safetensors``: ``network.*``,
``preconditioning.*``, ``data_preprocessing.{scale,bias}`` and ``postprocessing.{scale,bias}``
(each (1, C, 1, 1)). Normalisation: x0 = z * scale + bias; z = (x - bias) / scale (a true
division, spec §4.3). SDXL constants from ``miro/models/{pre,post}processing.py`` of the
published package; ``identity`` (pixel space) takes ``scale``/``bias`` from the config.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from miro.models.configs import NetworkConfig, PreconditioningConfig
from miro.models.flow import FlowPrecond
from miro.models.rin import RIN

__all__ = ["MiroModel", "LatentNormalization", "normalization_constants"]

# SDXL VAE latent statistics (published VAE_STATS["sdxl"]): scalar scaling factor, and the
# per-channel mean / std used by the channel-wise mode.
SDXL_SCALING_FACTOR = 0.13025
SDXL_CHANNEL_MEAN = (-0.3480, 0.3754, 0.0419, 2.4331)
SDXL_CHANNEL_STD = (7.8518, 5.8465, 6.8716, 5.3140)
MODEL_TYPES = ("sdxl", "identity")
_PRE_KEYS = {
    "input_key_mean",
    "input_key_std",
    "output_key_root",
    "vae_sample",
    "channel_wise_normalisation",
    "model_type",
    "scale",
    "bias",
}


def _per_channel(value, channels: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device="cpu").flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} must be a scalar or {channels} values, got {t.numel()}")
    return t.clone()


# Published ``VAEDecoderPostProcessing`` also takes these; they set how to decode, not the
# constants: the pipeline applies ``max_batch_size`` to its VAE, and places the VAE with ``.to()``.
_DECODE_KEYS = {"max_batch_size", "device"}


def normalization_constants(cfg: Mapping, channels: int) -> tuple[Tensor, Tensor]:
    """(scale, bias), each (1, C, 1, 1) fp32, from a data_preprocessing/postprocessing dict."""
    unknown = set(cfg) - _PRE_KEYS - _DECODE_KEYS
    if unknown:
        raise ValueError(f"unknown normalisation keys {sorted(unknown)}; allowed: {sorted(_PRE_KEYS | _DECODE_KEYS)}")
    model_type = cfg.get("model_type", "sdxl")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; allowed: {', '.join(MODEL_TYPES)}")
    if model_type == "sdxl":
        if channels != 4:
            raise ValueError(f"model_type='sdxl' needs 4 latent channels, the network has {channels}")
        # constants are built on the CPU, also under a meta-device context
        if cfg.get("channel_wise_normalisation", False):
            scale = 0.5 / torch.tensor(SDXL_CHANNEL_STD, device="cpu")
            bias = -torch.tensor(SDXL_CHANNEL_MEAN, device="cpu") * scale
        else:
            scale = 1.0 / torch.full((4,), SDXL_SCALING_FACTOR, device="cpu")
            bias = -torch.zeros(4, device="cpu") * scale
    else:
        scale = _per_channel(cfg.get("scale", 1.0), channels, "scale")
        bias = _per_channel(cfg.get("bias", 0.0), channels, "bias")
        if (scale == 0).any():
            raise ValueError("normalisation scale must be non-zero")
    return scale.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)


class LatentNormalization(nn.Module):
    """Holds the persistent ``scale`` and ``bias`` buffers (1, C, 1, 1)."""

    def __init__(self, scale: Tensor, bias: Tensor):
        super().__init__()
        self.register_buffer("scale", scale.clone())
        self.register_buffer("bias", bias.clone())


class MiroModel(nn.Module):
    """The MIRO model container (see module docstring)."""

    def __init__(
        self,
        network: RIN,
        preconditioning: FlowPrecond,
        data_preprocessing: LatentNormalization,
        postprocessing: LatentNormalization,
        config: dict | None = None,
    ):
        super().__init__()
        self.network = network
        self.preconditioning = preconditioning
        self.data_preprocessing = data_preprocessing
        self.postprocessing = postprocessing
        self.config = copy.deepcopy(config) if config is not None else {}
        pre = self.config.get("data_preprocessing", {})
        self.vae_sample = bool(pre.get("vae_sample", False))

    @classmethod
    def from_config(cls, config: Mapping, generator: torch.Generator | None = None) -> "MiroModel":
        """Build from a pipeline ``config.json`` dict (``get_config(name)`` or a loaded file).

        Initialisation is the published one; ``generator`` makes it reproducible.
        """
        if not isinstance(config, Mapping) or "network" not in config:
            raise ValueError("config must be a dict with a 'network' section")
        net_cfg = NetworkConfig.from_dict(dict(config["network"]))
        pre_cfg = PreconditioningConfig.from_dict(dict(config.get("preconditioning", {})))
        top_keys = config.get("coherence_keys")
        if top_keys is not None and list(top_keys) != list(net_cfg.coherence_keys):
            raise ValueError(
                f"config coherence_keys {list(top_keys)} differ from network coherence_keys "
                f"{list(net_cfg.coherence_keys)}"
            )
        if (pre_cfg.num_latents, pre_cfg.latents_dim) != (net_cfg.num_latents, net_cfg.latents_dim):
            raise ValueError(
                "preconditioning num_latents/latents_dim "
                f"({pre_cfg.num_latents}, {pre_cfg.latents_dim}) must match the network "
                f"({net_cfg.num_latents}, {net_cfg.latents_dim})"
            )
        network = RIN(**net_cfg.to_dict())
        precond = FlowPrecond(**pre_cfg.to_dict())
        c = net_cfg.num_input_channels
        pre = LatentNormalization(*normalization_constants(config.get("data_preprocessing", {"model_type": "sdxl"}), c))
        post = LatentNormalization(*normalization_constants(config.get("postprocessing", {"model_type": "sdxl"}), c))
        model = cls(network, precond, pre, post, dict(config))
        if generator is not None:
            model.reset_parameters(generator)
        return model

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Published init of the network, default init of ``logvar_proj`` (both from ``generator``)."""
        self.network.reset_parameters(generator)
        if self.preconditioning.do_gradnorm_reweighting:
            for m in self.preconditioning.logvar_proj:
                if isinstance(m, nn.Linear):
                    # PyTorch's default Linear init: kaiming_uniform(a=sqrt(5)) weights, U(+-1/sqrt(fan_in)) bias
                    nn.init.kaiming_uniform_(m.weight, a=5**0.5, generator=generator)
                    bound = 1 / m.weight.shape[1] ** 0.5
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
                elif hasattr(m, "reset_parameters"):
                    m.reset_parameters(generator)

    # ------------------------------------------------------------------ properties
    @property
    def coherence_keys(self) -> tuple[str, ...]:
        return self.network.coherence_keys

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        n = self.network
        return (n.num_input_channels, n.data_size, n.data_size)

    # ------------------------------------------------------------------ compute
    def forward(
        self,
        y: Tensor,
        gamma: Tensor,
        text_tokens_embeddings: Tensor,
        text_tokens_mask: Tensor,
        coherence: Mapping[str, Tensor | float] | None = None,
        previous_latents: Tensor | None = None,
        return_logvar: bool = False,
        generator: torch.Generator | None = None,
        latents_only: bool = False,
    ):
        """Velocity prediction v_hat ~ eps - x0 for the noisy input y at signal level gamma.

        Returns (v_hat, z) or (v_hat, z, logvar (B,1,1,1)). ``previous_latents`` None means zeros.
        ``latents_only`` returns (None, z) without the last write block and head.
        """
        return self.preconditioning(
            self.network,
            y,
            gamma,
            text_tokens_embeddings,
            text_tokens_mask,
            coherence,
            previous_latents,
            return_logvar=return_logvar,
            generator=generator,
            latents_only=latents_only,
        )

    def preprocess(self, x: Tensor, std: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Data (VAE latent mean, or pixels for identity) -> normalised latents x0 = z*scale + bias.

        With ``vae_sample`` in the config and ``std`` given, z = mean + std * randn (generator).
        """
        if self.vae_sample and std is not None:
            x = x + std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x * self.data_preprocessing.scale + self.data_preprocessing.bias

    def postprocess(self, x: Tensor) -> Tensor:
        """Normalised latents -> codec latents (or pixels): (x - bias) / scale."""
        return (x - self.postprocessing.bias) / self.postprocessing.scale

    # ------------------------------------------------------------------ loading
    def check_state_dict(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Validate names, shapes and bool-ness against this model; raise ValueError naming the
        first missing / unexpected / mis-shaped tensor. ``postprocessing.vae.*`` (VAE weights some
        exports carry) is dropped. Returns the filtered dict."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith(("postprocessing.vae.", "data_preprocessing.vae."))}
        own = self.state_dict(keep_vars=True)
        for k in own:
            if k not in sd:
                raise ValueError(f"missing tensor {k!r} (expected shape {tuple(own[k].shape)})")
        for k in sd:
            if k not in own:
                raise ValueError(f"unexpected tensor {k!r} with shape {tuple(sd[k].shape)}")
        for k, ref in own.items():
            v = sd[k]
            if tuple(v.shape) != tuple(ref.shape):
                raise ValueError(f"tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
            if (v.dtype == torch.bool) != (ref.dtype == torch.bool) or (v.is_floating_point() != ref.is_floating_point()):
                raise ValueError(f"tensor {k!r} has dtype {v.dtype}, expected {ref.dtype}")
        return sd

    def load_state_dict_checked(self, state_dict: Mapping[str, Tensor], assign: bool = False):
        """Strict load after ``check_state_dict`` (``assign=True`` for meta-device models)."""
        sd = self.check_state_dict(state_dict)
        return self.load_state_dict(sd, strict=True, assign=assign)
