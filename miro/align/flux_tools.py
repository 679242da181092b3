"""FLUX tooling around SRPO: text-embedding precomputation, loading tuned weights, batch generation.

- :func:`precompute_embeddings` writes the SRPO JSON dataset (``read_fork_json`` reads it back):
  per item ``prompt_embed/<i>.pt`` (T5, (L, 4096) for FLUX.1), ``pooled_prompt_embeds/<i>.pt``
  (CLIP pooled, (768,)) and ``text_ids/<i>.pt`` ((L, 3) zeros), all of the *plain caption*.
- :func:`load_flux_pipeline` builds a ``FluxPipeline`` and applies an SRPO-tuned transformer state
  dict (full fine-tune; safetensors or a weights-only torch file) and/or a LoRA folder.
- :func:`generate_items` renders N images per item, one seed per image (``seed + 1000·i + j``), PNGs
  written atomically and skipped when present, so an interrupted run resumes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from miro.hub import atomic_write_json
from miro.io import atomic_write_with


def precompute_embeddings(pipe, items: list[dict], out_dir: str | Path, max_sequence_length: int = 512,
                          batch_size: int = 8, json_name: str = "prompts.json", progress: bool = True) -> Path:
    """Encode every item's caption with ``pipe.encode_prompt`` and write the SRPO JSON dataset.

    Existing embedding files are kept (resume); MIA fields of the items are copied into the JSON.
    """
    out = Path(out_dir)
    subdirs = {k: out / k for k in ("prompt_embed", "pooled_prompt_embeds", "text_ids")}
    for d in subdirs.values():
        d.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.pt" for i in range(len(items))]
    todo = [i for i, n in enumerate(names) if not all((d / n).is_file() for d in subdirs.values())]
    it = range(0, len(todo), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="embed", total=(len(todo) + batch_size - 1) // batch_size)
    for start in it:
        idx = todo[start : start + batch_size]
        with torch.no_grad():
            pe, pooled, tids = pipe.encode_prompt([items[i]["caption"] for i in idx], prompt_2=None,
                                                  max_sequence_length=max_sequence_length)
        for row, i in enumerate(idx):
            for key, tensor in (("prompt_embed", pe[row]), ("pooled_prompt_embeds", pooled[row]), ("text_ids", tids)):
                t = tensor.detach().cpu().clone()
                atomic_write_with(subdirs[key] / names[i], lambda tmp, t=t: torch.save(t, tmp))
    records = []
    for i, item in enumerate(items):
        rec = {"caption": item["caption"], "prompt_embed_path": names[i], "pooled_prompt_embeds_path": names[i], "text_ids": names[i]}
        for src, dst in (("category", "mia_category"), ("region", "mia_region"), ("item", "item"),
                         ("pos_prompt", "pos_prompt"), ("neg_prompt", "neg_prompt"), ("image_path", "image_path")):
            if item.get(src) is not None:
                rec[dst] = item[src]
        if rec.get("image_path"):
            rec["image_path"] = _relative_to(out, rec["image_path"])
        records.append(rec)
    path = out / json_name
    atomic_write_json(path, records)
    return path


def _relative_to(folder: Path, path: str) -> str:
    """An item's ``image_path`` (absolute, or relative to the working directory as the readers
    give it) relative to ``folder``, where read_fork_json resolves the JSON's paths: written as
    given, a relative path named another file (or none) when read back."""
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    except ValueError:  # another drive (Windows): no relative path exists
        return os.path.abspath(path)


def load_transformer_weights(transformer, path: str | Path) -> None:
    """Load an SRPO-tuned transformer state dict (``.safetensors`` or a weights-only ``.pt``/``.bin``);
    every tensor name must match the transformer (``module.``/``transformer.`` prefixes are stripped)."""
    path = Path(path)
    if path.is_dir():
        cands = sorted(path.glob("*.safetensors"))
        if len(cands) != 1:
            raise ValueError(f"{path}: expected one .safetensors file, found {[c.name for c in cands]}")
        path = cands[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {re.sub(r"^(module\.|transformer\.)", "", k): v for k, v in state.items()}
    own = transformer.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the transformer: missing {missing[:5]}, unexpected {unexpected[:5]}")
    transformer.load_state_dict(state, strict=True)


def load_flux_pipeline(model: str = "black-forest-labs/FLUX.1-dev", transformer_weights: str | Path | None = None,
                       lora: str | Path | None = None, lora_scale: float = 1.0, dtype=torch.bfloat16, device=None, **hub_kwargs):
    """A ``FluxPipeline`` with optional SRPO weights (full state dict) and/or a LoRA (diffusers format)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model, torch_dtype=dtype, **hub_kwargs)
    if transformer_weights is not None:
        load_transformer_weights(pipe.transformer, transformer_weights)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="srpo")
        pipe.set_adapters(["srpo"], adapter_weights=[lora_scale])
    if device is not None:
        pipe.to(device)
    return pipe


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    return s[:80] or "item"


def generate_items(pipe, items: list[dict], out_dir: str | Path, n_per_item: int = 8, steps: int = 28, guidance: float = 3.5,
                   height: int = 1024, width: int = 1024, seed: int = 0, batch_size: int = 1, max_sequence_length: int = 512,
                   progress: bool = True) -> dict:
    """Render ``n_per_item`` images per item into ``out_dir/<index>_<slug>/<j>.png``.

    Image j of item i uses ``torch.Generator().manual_seed(seed + 1000·i + j)`` (CPU noise), so
    a resumed run draws the same noise as an uninterrupted one. Returns counts ``{"written", "skipped"}``.
    """
    out = Path(out_dir)
    jobs = []
    for i, item in enumerate(items):
        d = out / f"{i:05d}_{_slug(item.get('item') or item['caption'])}"
        for j in range(n_per_item):
            jobs.append((i, j, d / f"{j:02d}.png", item))
    todo = [job for job in jobs if not job[2].is_file()]
    stats = {"written": 0, "skipped": len(jobs) - len(todo)}
    it = range(0, len(todo), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="generate", total=(len(todo) + batch_size - 1) // batch_size)
    pipe.set_progress_bar_config(disable=True)
    for start in it:
        chunk = todo[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + 1000 * i + j) for i, j, _, _ in chunk]
        images = pipe([c[3]["caption"] for c in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      height=height, width=width, generator=gens, max_sequence_length=max_sequence_length,
                      output_type="pil").images
        for (i, j, path, item), im in zip(chunk, images):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_with(path, lambda tmp, im=im: im.save(tmp, format="PNG"))
            meta = path.parent / "item.json"
            if not meta.is_file():
                atomic_write_json(meta, {k: v for k, v in item.items() if isinstance(v, (str, int, float, type(None)))})
            stats["written"] += 1
    return stats
