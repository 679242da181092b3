"""Typed model configs and the named pipeline configs (``config.json`` dicts).

``NetworkConfig`` fields are the published ``network`` keys of a MIRO ``config.json``
(``miro-t2i`` 0.1.4 ``CADRINTextCond`` kwargs), with the published defaults, plus two extensions
of this project, ``data_norm``, ``data_mixer`` and ``pixel_unet``, each written to ``config.json`` only when it
is not the published value (``"rms"``, ``"none"``, 0). ``get_config(name)``
returns a full pipeline config for ``release`` (the published 360.4M model; the values marked
"inferred" reproduce its parameter count, see ``miro_facts.md`` §1.4), ``shapes`` (the embedded
pixel-space Shapes world model) and ``tiny`` (tests).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

from miro import REWARD_KEYS
from miro.models.pixel_unet import check_pixel_unet

__all__ = [
    "NetworkConfig",
    "PreconditioningConfig",
    "SHAPES_REWARD_KEYS",
    "CONFIG_NAMES",
    "get_config",
    "PIPELINE_KEYS",
    "check_network_kwargs",
    "DROPOUT_STRATEGIES",
    "NETWORK_EXTENSIONS",
]

DROPOUT_STRATEGIES = ("binomial", "uniform", "none")  # published reward-dropout rules (spec §7)
DATA_NORMS = ("rms", "none")  # patch-embedding norm: published RMSNorm, or none (keeps patch scale)
DATA_MIXERS = ("none", "conv", "conv_attn")  # data tokens after each write: published (none), a 3x3 depthwise conv, or the conv then self-attention
# This project's network keys and the value that means "as published" (not written to config.json).
NETWORK_EXTENSIONS = {"data_norm": "rms", "data_mixer": "none", "pixel_unet": 0}
# The network's training-time random draws (probabilities; each takes the loss's torch.Generator)
RANDOM_DROPS = ("compute_dropout", "rw_stochastic_depth", "compute_stochastic_depth", "coherence_dropout")
COND_HEADS = 16  # the cond-mapping transformer uses 16 heads whatever the config (spec §2.3)

# Reward keys of the Shapes world, in `coherence_keys` order (fixed for the whole project).
SHAPES_REWARD_KEYS: tuple[str, ...] = (
    "shapes_alignment",
    "shapes_counting",
    "shapes_position",
    "shapes_sharpness",
    "shapes_contrast",
)


@dataclass
class NetworkConfig:
    """The ``network`` section of ``config.json`` (kwargs of ``RIN``)."""

    data_size: int  # latent (or pixel) side S of the network input
    data_dim: int  # width of the data (patch) tokens
    num_input_channels: int  # C of the network input
    num_latents: int  # number of latent tokens N_l
    latents_dim: int  # width of the latent tokens D_l
    label_dim: int  # text-encoder embedding width E
    num_processing_layers: int  # self-attention layers per RIN block
    num_blocks: int  # RIN blocks
    patch_size: int  # patch side p
    num_cond_tokens: int  # cond tokens concatenated to latents (only with concat_cond_token_to_latents)
    read_write_heads: int = 16  # heads of the read/write/retrieve-cond cross-attentions
    compute_heads: int = 16  # heads of the latent self-attentions
    latent_mlp_multiplier: int = 4  # SwiGLU multiplier on the latent side
    data_mlp_multiplier: int = 4  # SwiGLU multiplier of the write block
    compute_dropout: float = 0.0  # FFN dropout of the latent self-attentions
    rw_stochastic_depth: float = 0.0  # stochastic depth of the cross-attention blocks
    compute_stochastic_depth: float = 0.0  # stochastic depth of the self-attention blocks
    use_cond_rin_block: bool = False  # latents cross-attend to the cond tokens in every block
    concat_cond_token_to_latents: bool = True  # append time + cond tokens to the latents instead
    use_self_conditioning: bool = False  # latent self-conditioning path (ln_previous_*, linear_previous)
    num_text_registers: int = 16  # learned register tokens in the cond mapping
    coherence_keys: list[str] = field(default_factory=lambda: list(REWARD_KEYS))  # reward keys, order fixed
    coherence_dropout: float = 0.0  # per-reward embedding dropout in training
    dropout_strategy: str = "binomial"  # "binomial", "uniform" or "none"
    # Extension (not a published key): "rms" = the published data_ln RMSNorm on the patch
    # embedding; "none" = no norm there, so a token keeps its patch's scale (docs/training.md).
    data_norm: str = "rms"
    # Extension: "none" = published (data tokens meet only through the latents); "conv" = a
    # residual 3x3 depthwise conv over the token grid after every write (miro.models.rin).
    data_mixer: str = "none"
    # Extension: 0 = published; C > 0 = a convolutional encoder/decoder of width C around the RIN,
    # zero-initialised so it starts as the published network (miro.models.pixel_unet).
    pixel_unet: int = 0

    def __post_init__(self) -> None:
        kw = asdict(self)
        kw.pop("use_self_conditioning")
        check_network_kwargs(**kw)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        return _from_dict(cls, d, "network")

    def to_dict(self) -> dict:
        d = asdict(self)
        # A published-architecture config.json stays exactly published.
        for key, published in NETWORK_EXTENSIONS.items():
            if d[key] == published:
                del d[key]
        return d


@dataclass
class PreconditioningConfig:
    """The ``preconditioning`` section of ``config.json`` (kwargs of ``FlowPrecond``)."""

    num_latents: int = 256  # N_l of the zero previous latents
    latents_dim: int = 512  # D_l of the zero previous latents
    do_normalization: str = "noise_driven"  # c_in/c_out scaling (published); "skip" adds c_skip (miro.models.flow); False/"none" disables it
    sigma_data: float = 0.5  # sigma_d of c_in and c_out
    do_gradnorm_reweighting: bool = True  # build logvar_proj (used by the loss when enabled there)
    logvar_channels: int = 128  # Fourier channels of logvar_proj
    logvar_mlp_layers: int = 0  # hidden Linear+SiLU layers of logvar_proj

    @classmethod
    def from_dict(cls, d: dict) -> "PreconditioningConfig":
        return _from_dict(cls, d, "preconditioning")

    def to_dict(self) -> dict:
        return asdict(self)


def _from_dict(cls, d: dict, section: str):
    if not isinstance(d, dict):
        raise ValueError(f"config[{section!r}] must be a dict, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; allowed: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as exc:  # missing required fields
        raise ValueError(f"bad {section} config: {exc}") from None


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_network_kwargs(
    *,
    data_size, data_dim, num_input_channels, num_latents, latents_dim, label_dim, num_processing_layers,
    num_blocks, patch_size, num_cond_tokens, read_write_heads, compute_heads, latent_mlp_multiplier,
    data_mlp_multiplier, compute_dropout, rw_stochastic_depth, compute_stochastic_depth, use_cond_rin_block,
    concat_cond_token_to_latents, num_text_registers, coherence_keys, coherence_dropout, dropout_strategy,
    data_norm="rms", data_mixer="none", pixel_unet=0,
) -> int:
    """Validate ``RIN`` kwargs (ValueError naming the bad value); returns the learned latent count."""
    for name, value in [
        ("data_size", data_size),
        ("data_dim", data_dim),
        ("num_input_channels", num_input_channels),
        ("num_latents", num_latents),
        ("latents_dim", latents_dim),
        ("label_dim", label_dim),
        ("num_processing_layers", num_processing_layers),
        ("num_blocks", num_blocks),
        ("patch_size", patch_size),
        ("read_write_heads", read_write_heads),
        ("compute_heads", compute_heads),
        ("latent_mlp_multiplier", latent_mlp_multiplier),
        ("data_mlp_multiplier", data_mlp_multiplier),
        ("num_text_registers", num_text_registers),
    ]:
        _check_positive(name, value)
    if data_size % patch_size:
        raise ValueError(f"data_size={data_size} is not divisible by patch_size={patch_size}")
    if latents_dim % COND_HEADS or latents_dim % 4:
        raise ValueError(
            f"latents_dim={latents_dim} must be divisible by 16 (cond-mapping heads) and 4 "
            "(time embedder width)"
        )
    if latents_dim % compute_heads:
        raise ValueError(f"latents_dim={latents_dim} not divisible by compute_heads={compute_heads}")
    for width in {latents_dim if use_cond_rin_block else None, min(latents_dim, data_dim)} - {None}:
        if width % read_write_heads:
            raise ValueError(
                f"attention width {width} not divisible by read_write_heads={read_write_heads}"
            )
    for name in RANDOM_DROPS:
        _check_prob(name, {"compute_dropout": compute_dropout, "rw_stochastic_depth": rw_stochastic_depth,
                            "compute_stochastic_depth": compute_stochastic_depth,
                            "coherence_dropout": coherence_dropout}[name])
    if data_norm not in DATA_NORMS:
        raise ValueError(f"data_norm={data_norm!r}; allowed: {', '.join(DATA_NORMS)}")
    if data_mixer not in DATA_MIXERS:
        raise ValueError(f"data_mixer={data_mixer!r}; allowed: {', '.join(DATA_MIXERS)}")
    check_pixel_unet(pixel_unet, patch_size)
    if dropout_strategy not in DROPOUT_STRATEGIES:
        raise ValueError(
            f"dropout_strategy={dropout_strategy!r}; allowed: {', '.join(DROPOUT_STRATEGIES)}"
        )
    if isinstance(coherence_keys, str) or len(coherence_keys) == 0:
        raise ValueError(f"coherence_keys must be a non-empty list of reward keys, got {coherence_keys!r}")
    if len(set(coherence_keys)) != len(coherence_keys):
        raise ValueError(f"coherence_keys contains duplicates: {list(coherence_keys)}")
    if not isinstance(num_cond_tokens, int) or num_cond_tokens < 0:
        raise ValueError(f"num_cond_tokens must be a non-negative integer, got {num_cond_tokens!r}")
    n_learned = num_latents - num_cond_tokens - 1 if concat_cond_token_to_latents else num_latents
    if n_learned <= 0:
        raise ValueError(
            f"num_latents={num_latents} leaves no learned latents with num_cond_tokens="
            f"{num_cond_tokens} and concat_cond_token_to_latents=True"
        )

    return n_learned


# Keys of a pipeline config.json (published ones, then ours: text_encoder, autoencoder).
PIPELINE_KEYS = (
    "network",
    "preconditioning",
    "data_preprocessing",
    "postprocessing",
    "scheduler",
    "data_resolution",
    "max_text_len",
    "coherence_keys",
    "text_encoder",
    "autoencoder",
)


def _release() -> dict:
    net = NetworkConfig(
        data_size=32,  # 256 px through the SDXL VAE (x8)
        data_dim=512,  # inferred: reproduces 360,413,712 parameters
        num_input_channels=4,
        num_latents=256,
        latents_dim=1024,
        label_dim=2048,  # FLAN-T5-XL
        num_processing_layers=4,
        num_blocks=4,
        patch_size=2,
        num_cond_tokens=0,
        read_write_heads=16,
        compute_heads=16,
        use_cond_rin_block=True,
        concat_cond_token_to_latents=False,
        use_self_conditioning=True,
        coherence_keys=list(REWARD_KEYS),
    )
    return {
        "network": net.to_dict(),
        "preconditioning": PreconditioningConfig(num_latents=256, latents_dim=1024).to_dict(),
        # Channel-wise normalisation (latents of std ~0.5 = sigma_d) and VAE sampling follow CAD's
        # precomputed_resample setup; the released config.json was not seen (miro_facts §2.2).
        "data_preprocessing": {
            "input_key_mean": "vae_embeddings_mean",
            "input_key_std": "vae_embeddings_std",
            "output_key_root": "x_0",
            "vae_sample": True,
            "channel_wise_normalisation": True,
            "model_type": "sdxl",
        },
        "postprocessing": {"channel_wise_normalisation": True, "model_type": "sdxl"},
        "scheduler": {"start": 1, "end": 0, "shift": 1.0, "clip_min": 1e-9},
        "data_resolution": 32,
        "max_text_len": 77,
        "coherence_keys": list(REWARD_KEYS),
        "text_encoder": "flan_t5_xl",
        "autoencoder": "sdxl_vae",
    }


def _shapes() -> dict:
    # Pixel space 32x32x3 with MiniLM text, ~5.3M parameters like the published 5M measurement
    # (patch 2, 32 latents x 192). Cost per sample is cut by patch 4 (64 data tokens instead of
    # 256), SwiGLU multiplier 2 (hidden 256 for 192-d latents: the rounding up to multiples of
    # 256 makes multiplier 4 cost 512) and 8 registers: 0.40 GFLOPs per forward against 0.63
    # for a patch-2 model of the same size; measured x1.9 less CPU time per training step
    # (docs/benchmarks.md, "Backbone").
    net = NetworkConfig(
        data_size=32,
        data_dim=128,
        num_input_channels=3,
        num_latents=32,
        latents_dim=192,
        label_dim=384,  # all-MiniLM-L6-v2 token embeddings
        num_processing_layers=2,
        num_blocks=3,
        patch_size=4,
        num_cond_tokens=0,
        read_write_heads=4,
        compute_heads=4,
        latent_mlp_multiplier=2,
        data_mlp_multiplier=2,
        use_cond_rin_block=True,
        concat_cond_token_to_latents=False,
        use_self_conditioning=True,
        num_text_registers=8,
        coherence_keys=list(SHAPES_REWARD_KEYS),
        # Two extensions with which this small from-scratch model draws object-sized blobs instead
        # of 4x4-patch mosaics (docs/training.md, "Data tokens that see their neighbours"): no
        # patch norm, and a 3x3 depthwise conv over the token grid after every write.
        data_norm="none",
        data_mixer="conv",
        # The RIN as the bottleneck of a small conv encoder/decoder: convolutions learn edges and
        # corners from the few samples a CPU gives (docs/training.md, "A convolutional encoder").
        pixel_unet=32,
    )
    return {
        "network": net.to_dict(),
        # EDM's skip for the velocity (miro.models.flow): F need not copy the noise through the net.
        "preconditioning": PreconditioningConfig(num_latents=32, latents_dim=192, do_normalization="skip").to_dict(),
        "data_preprocessing": {"model_type": "identity", "scale": 1.0, "bias": 0.0, "vae_sample": False},
        "postprocessing": {"model_type": "identity", "scale": 1.0, "bias": 0.0},
        "scheduler": {"start": 1, "end": 0, "shift": 1.0, "clip_min": 1e-9},
        "data_resolution": 32,
        "max_text_len": 32,
        "coherence_keys": list(SHAPES_REWARD_KEYS),
        "text_encoder": "minilm",
        "autoencoder": "identity",
    }


def _tiny() -> dict:
    net = NetworkConfig(
        data_size=8,
        data_dim=32,
        num_input_channels=3,
        num_latents=8,
        latents_dim=32,
        label_dim=384,
        num_processing_layers=1,
        num_blocks=2,
        patch_size=2,
        num_cond_tokens=0,
        read_write_heads=2,
        compute_heads=2,
        latent_mlp_multiplier=2,
        data_mlp_multiplier=2,
        use_cond_rin_block=True,
        concat_cond_token_to_latents=False,
        use_self_conditioning=True,
        num_text_registers=4,
        coherence_keys=list(REWARD_KEYS),
    )
    return {
        "network": net.to_dict(),
        "preconditioning": PreconditioningConfig(num_latents=8, latents_dim=32, logvar_channels=16).to_dict(),
        "data_preprocessing": {"model_type": "identity", "scale": 1.0, "bias": 0.0, "vae_sample": False},
        "postprocessing": {"model_type": "identity", "scale": 1.0, "bias": 0.0},
        "scheduler": {"start": 1, "end": 0, "shift": 1.0, "clip_min": 1e-9},
        "data_resolution": 8,
        "max_text_len": 8,
        "coherence_keys": list(REWARD_KEYS),
        "text_encoder": "minilm",
        "autoencoder": "identity",
    }


_CONFIGS = {"release": _release, "shapes": _shapes, "tiny": _tiny}
CONFIG_NAMES = tuple(_CONFIGS)


def get_config(name: str) -> dict:
    """A fresh (deep-copied) pipeline config dict: ``release``, ``shapes`` or ``tiny``."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown config {name!r}; available: {', '.join(CONFIG_NAMES)}")
    return copy.deepcopy(_CONFIGS[name]())
