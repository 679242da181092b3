"""Tiny randomly initialised encoders saved in their real on-disk formats.

They exercise exactly the full-scale loading paths (``T5EncoderModel.from_pretrained(dir)``,
``AutoTokenizer.from_pretrained(dir)``, ``AutoencoderKL.from_pretrained(dir)``) with no network,
which is what tests and smoke runs need. The tokenizers are word-level, built with the
``tokenizers`` library; they lower-case and split on whitespace/punctuation, and every word
outside the small vocabulary maps to the unknown token.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Words of the Shapes-like prompts used in tests and smoke runs.
TINY_WORDS = (
    "a an the one two three four five six of and above below left right to on photo "
    "red green blue yellow orange purple black white pink brown "
    "circle circles square squares triangle triangles star stars"
).split()


def word_level_tokenizer(specials: list[str], unk: str, template: str, lowercase: bool = True,
                         words=TINY_WORDS):
    """A ``tokenizers.Tokenizer`` whose vocabulary is ``specials + words`` (ids in that order),
    splitting on whitespace/punctuation; ``template`` is the single-sequence post-processor
    (e.g. ``"<s> $A </s>"``). Returns ``(tokenizer, vocabulary size)``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(list(specials) + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [s for s in specials if s in template.split()]
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in used]
    )
    return tok, len(vocab)


def save_tiny_t5(path: str | Path, d_model: int = 32, seed: int = 0) -> Path:
    """A 2-layer T5 encoder + tokenizer (pad 0, eos ``</s>`` appended) saved to ``path``."""
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    path = Path(path)
    tok, vocab_size = word_level_tokenizer(["<pad>", "</s>", "<unk>"], "<unk>", "$A </s>", True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    cfg = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    # Seeded inside fork_rng so the caller's global RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        T5EncoderModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def save_tiny_bert(path: str | Path, hidden: int = 24, seed: int = 0) -> Path:
    """A 1-layer BERT encoder + tokenizer (``[CLS] ... [SEP]``, pad 0) saved to ``path``."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = Path(path)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok, vocab_size = word_level_tokenizer(specials, "[UNK]", "[CLS] $A [SEP]", True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def save_tiny_autoencoder_kl(path: str | Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """A tiny two-level diffusers ``AutoencoderKL`` (downsample 2) saved to ``path``."""
    from diffusers import AutoencoderKL

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, latent_channels=latent_channels,
            block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
    vae.save_pretrained(path)
    return path


def tiny_pipeline(root: str | Path, text: str = "bert", codec: str = "identity", seed: int = 0,
                  config_name: str = "tiny", reward_bins=None):
    """A randomly initialised ``MiroPipeline`` on the ``tiny`` model config, whose encoders are
    tiny real-format models saved under ``root`` (so ``save_pretrained`` records their folders).

    Args:
        root: folder for the encoder files (``root/text``, ``root/vae``).
        text: ``"bert"`` (tiny BERT, 24-d), ``"t5"`` (tiny T5, 32-d, one-token uncond as
            published) or ``"minilm"`` (the embedded 384-d MiniLM).
        codec: ``"identity"`` (pixels, 3 channels) or ``"vae"`` (tiny AutoencoderKL, 4 latent
            channels, downsample 2, SDXL latent normalisation constants).
        seed: seeds the model initialisation (through a local generator).
    """
    from miro.encoders.text import load_text_encoder
    from miro.models import MiroModel, get_config
    from miro.pipeline import MiroPipeline

    root = Path(root)
    cfg = get_config(config_name)
    if text == "bert":
        spec, dim = str(save_tiny_bert(root / "text")), 24
    elif text == "t5":
        spec, dim = str(save_tiny_t5(root / "text")), 32
    elif text == "minilm":
        spec, dim = "minilm", 384
    else:
        raise ValueError(f"text must be 'bert', 't5' or 'minilm'; got {text!r}")
    cfg["network"]["label_dim"] = dim
    cfg["text_encoder"] = spec
    if codec == "vae":
        cfg["autoencoder"] = str(save_tiny_autoencoder_kl(root / "vae"))
        cfg["network"]["num_input_channels"] = 4
        cfg["data_preprocessing"] = {"model_type": "sdxl", "channel_wise_normalisation": True}
        cfg["postprocessing"] = {"model_type": "sdxl", "channel_wise_normalisation": True}
    elif codec != "identity":
        raise ValueError(f"codec must be 'identity' or 'vae'; got {codec!r}")
    model = MiroModel.from_config(cfg, generator=torch.Generator().manual_seed(seed))
    enc = load_text_encoder(spec, max_length=int(cfg["max_text_len"]))
    pipe = MiroPipeline(model, enc, cfg["autoencoder"], cfg, enc.uncond_embedding(), reward_bins=reward_bins)
    pipe.set_progress_bar_config(disable=True)
    return pipe
