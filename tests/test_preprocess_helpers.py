"""Tiny raw shards and closed-form stand-in scorers for the ``miro preprocess`` tests.

The stand-in rewards are registered under ``ptest_*`` names (never a published key) and compute
values that the tests can predict exactly from the image and the caption they were given.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from miro.data.schema import write_shard
from miro.rewards.base import REGISTRY, Scorer, register


CALLS: dict[str, int] = {}  # scorer name -> number of score() calls
CRASH: dict[str, int] = {}  # scorer name -> raise KeyboardInterrupt at this call number
PROMPTS_SEEN: dict[str, list[str]] = {}


class _Closed(Scorer):
    name = ""
    synthetic_caption = None

    def score(self, images, prompts):
        CALLS[self.name] = CALLS.get(self.name, 0) + 1
        if CRASH.get(self.name) == CALLS[self.name]:
            raise KeyboardInterrupt(f"simulated crash in {self.name}")
        PROMPTS_SEEN.setdefault(self.name, []).extend(prompts)
        return torch.tensor([self.value(im, p) for im, p in zip(images, prompts)], dtype=torch.float32)


class Redness(_Closed):
    """Mean red channel in [0, 1]; stored as raw / 2; image-only (synthetic value copied)."""

    name, keys, synthetic_caption = "ptest_red", ("ptest_red",), "copy"

    def value(self, im, p):
        return float(np.asarray(im, dtype=np.float64)[..., 0].mean() / 255.0)

    def normalize(self, raw):
        return raw / 2


class Words(_Closed):
    """Number of words of the prompt; stored as raw / 100; reads the long synthetic caption."""

    name, keys = "ptest_words", ("ptest_words",)

    def load(self):  # stands for loading weights (counted: finished shards must not load models)
        CALLS["ptest_words.load"] = CALLS.get("ptest_words.load", 0) + 1
        return self

    def value(self, im, p):
        return float(len(p.split()))

    def normalize(self, raw):
        return raw / 100


class Chars(_Closed):
    """Characters of the prompt; reads the short synthetic caption; fails on 13-px-wide images."""

    name, keys, synthetic_caption = "ptest_chars", ("ptest_chars",), "short"

    def value(self, im, p):
        if im.size[0] == 13:
            raise RuntimeError("this scorer cannot read 13-px-wide images")
        return float(len(p))


class Vqa(_Closed):
    """1 if the word 'red' is in the prompt: the VQA stand-in (long caption)."""

    name, keys = "ptest_vqa", ("ptest_vqa",)

    def value(self, im, p):
        return 1.0 if "red" in p.lower().split() else 0.0


class Broken(_Closed):
    name, keys = "ptest_broken", ("ptest_broken",)

    def value(self, im, p):
        raise RuntimeError("always broken")


for _cls in (Redness, Words, Chars, Vqa, Broken):
    if _cls.name not in REGISTRY:
        register(_cls.name)(_cls)

SCORERS = "ptest_red,ptest_words,ptest_chars"


def reset() -> None:
    CALLS.clear()
    CRASH.clear()
    PROMPTS_SEEN.clear()


def image(seed: int, size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


CAPTIONS = ["two red circles", "a blue square above a <PERSON> star", "one green triangle",
            "three yellow stars left of a square"]


def make_raw_shards(folder: Path, n_shards: int = 2, per_shard: int = 3, json_captions: bool = True) -> list[Path]:
    """Shards ``{i:05d}.tar`` with keys ``s{i}k{j}``; half the samples carry JSON synthetic captions."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_shards):
        samples = []
        for j in range(per_shard):
            n = i * per_shard + j
            meta = {"url": f"http://example.org/{n}.jpg", "width": 24}
            if json_captions and j % 2 == 0:
                meta["synthetic_caption"] = f"a long synthetic caption number {n} with red"
                meta["short_synthetic_caption"] = f"short {n}"
            samples.append({"__key__": f"s{i}k{j}", "jpg": jpeg_bytes(image(n)),
                            "txt": CAPTIONS[n % len(CAPTIONS)], "json": meta})
        paths.append(folder / f"{i:05d}.tar")
        write_shard(paths[-1], samples)
    return paths


def save_tiny_clip(path: Path) -> Path:
    """A tiny random transformers ``CLIPModel`` (32 px, patch 16) + word-level tokenizer."""
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    from miro.encoders.tiny import word_level_tokenizer

    words = sorted({w.lower() for c in CAPTIONS for w in c.replace("<PERSON>", "").split()})
    tok, n_vocab = word_level_tokenizer(["<|endoftext|>", "<|startoftext|>", "<unk>"], "<unk>",
                                        "<|startoftext|> $A <|endoftext|>", words=words)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=77)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos, pad_token_id=eos,
                         bos_token_id=tok.token_to_id("<|startoftext|>")),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path
