"""Text encoders (FLAN-T5, MiniLM) and autoencoders (SDXL VAE, identity pixel space)."""

from miro.encoders.autoencoder import (
    Codec,
    IdentityCodec,
    SDXLVAECodec,
    load_autoencoder,
    to_uint8,
    to_unit,
)
from miro.encoders.text import (
    FlanT5Encoder,
    MiniLMEncoder,
    TextEncoder,
    embedded_minilm_path,
    load_text_encoder,
)

__all__ = [
    "Codec",
    "FlanT5Encoder",
    "IdentityCodec",
    "MiniLMEncoder",
    "SDXLVAECodec",
    "TextEncoder",
    "embedded_minilm_path",
    "load_autoencoder",
    "load_text_encoder",
    "to_uint8",
    "to_unit",
]
