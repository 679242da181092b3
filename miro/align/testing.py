"""Tiny, randomly initialised stand-ins for the full-scale SRPO components.

- :func:`save_tiny_flux_pipeline` writes a real ``FluxPipeline`` folder (transformer, VAE, CLIP
  and T5 text encoders with word-level tokenizers, scheduler) of a few hundred kilobytes, so the
  FLUX code paths (``FluxPipeline.from_pretrained``, LoRA save/load, state-dict loading) run
  offline exactly as they do on ``black-forest-labs/FLUX.1-dev``.
- :class:`HashEmbeddingScorer` is a small differentiable embedding reward (frozen random image
  projection, hashed bag-of-words text embedding) with the ``Scorer`` embedding interface; it is
  what tests and CPU benchmarks optimise when no trained reward model is at hand.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from miro.rewards.base import Scorer

_WORDS = (
    "a an the of and image photo one two three red green blue yellow circle square triangle "
    "natural lighting detail detailed real concept art painting anime flat oil dish rice food"
).split()


def _word_tokenizer(specials: list[str], template: str, max_len: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [s for s in specials if s in template.split()]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, vocab[s]) for s in used])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=max_len)
    return fast, len(vocab)


def tiny_flux_transformer(seed: int = 0, in_channels: int = 16, guidance_embeds: bool = True):
    """A 1+1-block ``FluxTransformer2DModel`` (2 heads × 8, joint dim 32) for ``in_channels/4``-channel latents."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        )


def save_tiny_flux_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``FluxPipeline`` to ``path`` (VAE 4 latent channels, downsample 2)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    tok1, n1 = _word_tokenizer(["<pad>", "<s>", "</s>", "<unk>"], "<s> $A </s>", 16)
    tok2, n2 = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=n1, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
            projection_dim=32, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ))
        t5 = T5EncoderModel(T5Config(vocab_size=n2, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1))
        vae = AutoencoderKL(
            sample_size=16, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8),
            layers_per_block=1, norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip, tokenizer=tok1,
        text_encoder_2=t5, tokenizer_2=tok2, transformer=tiny_flux_transformer(seed, in_channels=16),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _hash_vector(word: str, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class HashEmbeddingScorer(Scorer):
    """Differentiable toy embedding reward: image → 4×4 average pool → frozen random projection;
    text → mean of per-word hashed Gaussian vectors; similarity = cosine."""

    keys = ("hash_embedding",)
    differentiable = True
    score_range = (-1.0, 1.0)

    def __init__(self, dim: int = 32, seed: int = 0, pool: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.pool = pool
        self.dim = dim
        self.proj = torch.randn(3 * pool * pool, dim, generator=g) / (3 * pool * pool) ** 0.5
        self.bias = torch.randn(dim, generator=g) * 0.1

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float() * 2 - 1, self.pool).flatten(1)
        return x @ self.proj.to(x.device) + self.bias.to(x.device)

    def embed_text(self, prompts) -> torch.Tensor:
        out = []
        for p in prompts:
            words = p.lower().replace(".", " ").replace(",", " ").split() or [""]
            out.append(torch.stack([_hash_vector(w, self.dim) for w in words]).mean(0))
        return torch.stack(out)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return (F.normalize(image_emb, dim=-1) * F.normalize(text_emb.to(image_emb), dim=-1)).sum(-1)

    def score(self, images, prompts) -> torch.Tensor:
        from miro.rewards.base import check_prompts, images_to_tensor

        x = images_to_tensor(images, size=None)
        return self.similarity(self.embed_image(x), self.embed_text(check_prompts(prompts, x.shape[0])))
