"""``miro align flux-embed | flux-generate | flux-lora``: FLUX tools around SRPO (argparse)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_FLUX = "black-forest-labs/FLUX.1-dev"


def _dtype(name: str):
    import torch

    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype {name!r}; allowed: {', '.join(table)}")
    return table[name]


def _device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _items(spec: str, caption_column: str = "caption") -> list[dict]:
    """``--items``/``--prompts``: a file, a CuRe folder, or inline JSON (a list of strings or objects)."""
    from miro.align.datasets import normalize_item, read_items

    if spec.lstrip().startswith("["):
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"inline JSON {spec[:80]!r} does not parse ({e}); expected a list of captions or objects") from None
        return [normalize_item({"caption": d} if isinstance(d, str) else d) for d in data]
    return read_items(spec, caption_column=caption_column)


class _WithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except where there is none (required options, None)."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miro align", description="FLUX tools around SRPO alignment")
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = {"formatter_class": _WithDefaults}

    e = sub.add_parser("flux-embed", help="precompute FLUX text embeddings of a prompt dataset (SRPO JSON format)", **fmt)
    e.add_argument("--model", default=DEFAULT_FLUX, help="FLUX pipeline hub id or folder")
    e.add_argument("--prompts", required=True, help="prompt file (.txt/.jsonl/.json/.csv) or CuRe folder")
    e.add_argument("--caption-column", default="caption", help="CSV column holding the caption")
    e.add_argument("--out", "--outdir", dest="out", required=True, help="output folder")
    e.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens")
    e.add_argument("--batch-size", type=int, default=8, help="prompts per encoder call")
    e.add_argument("--dtype", default="bfloat16", help="weight dtype of the text encoders")
    e.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")

    g = sub.add_parser("flux-generate", help="N images per item with a FLUX pipeline, with SRPO transformer weights, a LoRA, or both", **fmt)
    g.add_argument("--model", default=DEFAULT_FLUX, help="FLUX pipeline hub id or folder")
    g.add_argument("--items", required=True, help="item file / CuRe folder, or inline JSON list")
    g.add_argument("--out", "--outdir", dest="out", required=True, help="output folder (resumable)")
    g.add_argument("--transformer", default=None, help="SRPO-tuned transformer state dict (.safetensors / .pt / folder)")
    g.add_argument("--lora", default=None, help="LoRA folder (diffusers format, pytorch_lora_weights.safetensors)")
    g.add_argument("--lora-scale", type=float, default=1.0, help="weight of the LoRA update")
    g.add_argument("--n-samples", "--n", dest="n", type=int, default=8, help="images per item")
    g.add_argument("--steps", type=int, default=28, help="sampling steps")
    g.add_argument("--cfg", "--guidance", dest="guidance", type=float, default=3.5, help="FLUX guidance")
    g.add_argument("--height", type=int, default=1024, help="image height in pixels")
    g.add_argument("--width", type=int, default=1024, help="image width in pixels")
    g.add_argument("--seed", type=int, default=0, help="image j of item i uses seed + 1000*i + j")
    g.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    g.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens")
    g.add_argument("--dtype", default="bfloat16", help="weight dtype")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")

    lo = sub.add_parser("flux-lora", help="LoRA fine-tuning of FLUX on an image-caption dataset (flow matching)", **fmt)
    lo.add_argument("--model", default=DEFAULT_FLUX, help="FLUX pipeline hub id or folder")
    lo.add_argument("--data", required=True, help="items with image_path (.jsonl/.json/.csv)")
    lo.add_argument("--caption-column", default="caption", help="item field used as caption, e.g. Item or generated_caption")
    lo.add_argument("--instance-prompt", default="an image of", help="caption for items without one in --caption-column (SRPO .json, inline JSON, CuRe items; .jsonl and .csv rows must carry their own)")
    lo.add_argument("--out", "--outdir", dest="out", required=True, help="output folder (checkpoints, the LoRA)")
    lo.add_argument("--resolution", type=int, default=1024, help="training image side in pixels")
    lo.add_argument("--rank", type=int, default=16, help="LoRA rank")
    lo.add_argument("--alpha", type=float, default=4.0, help="lora_alpha (the diffusers FLUX DreamBooth value)")
    lo.add_argument("--optimizer", default="prodigy", choices=("prodigy", "adamw"), help="optimiser")
    lo.add_argument("--lr", type=float, default=1.0, help="learning rate; 1.0 for Prodigy")
    lo.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    lo.add_argument("--batch-size", type=int, default=1, help="per device")
    lo.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step; 4 GPUs x 1 x 4 = effective batch 16")
    lo.add_argument("--precision", default="auto", help="Fabric precision; auto = 16-mixed on CUDA (fp16 as published)")
    lo.add_argument("--devices", default="1", help="GPUs (Fabric devices)")
    lo.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (resumable)")
    lo.add_argument("--seed", type=int, default=42, help="seed of the data order and noise")
    lo.add_argument("--dtype", default="float32", help="weight dtype of the frozen parts")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from miro.cli import report_errors

    # 2: missing or malformed prompt/item files, a bad --dtype; 1: a FLUX model neither cached nor
    # reachable, an unwritable --out
    return report_errors(f"miro align {args.cmd}", _run, args)


# integer options that must be >= 1 (checked before a FLUX model, tens of GB, is loaded)
_POSITIVE = ("batch_size", "max_sequence_length", "n", "steps", "height", "width", "resolution", "rank", "grad_accum",
             "checkpoint_every")


def _check_numbers(args: argparse.Namespace) -> None:
    for key in _POSITIVE:
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1; got {value}")
    if getattr(args, "seed", 0) < 0:
        raise ValueError(f"--seed must be >= 0; got {args.seed}")
    for key, strict in (("alpha", True), ("lr", True), ("guidance", False), ("lora_scale", False)):
        value = getattr(args, key, None)
        if value is not None and not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            raise ValueError(f"--{key.replace('_', '-')} must be a finite number {'>' if strict else '>='} 0; got {value}")


def _run(args: argparse.Namespace) -> int:
    # Every input file is read before a FLUX model (tens of GB) is loaded, so a typo fails in a second.
    _check_numbers(args)
    from miro.align import flux_tools
    from miro.extras import require

    if args.cmd == "flux-lora":
        require("lightning", "peft", *(["prodigyopt"] if args.optimizer == "prodigy" else []), extra="align",
                what="miro align flux-lora" + (" --optimizer prodigy" if args.optimizer == "prodigy" else ""))
    elif args.cmd == "flux-generate" and args.lora:  # diffusers loads LoRA folders through peft
        require("peft", extra="align", what="miro align flux-generate --lora")
    if args.cmd == "flux-embed":
        items = _items(args.prompts, args.caption_column)
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(args.model, transformer=None, vae=None, torch_dtype=_dtype(args.dtype)).to(_device(args.device))
        path = flux_tools.precompute_embeddings(pipe, items, args.out, args.max_sequence_length, args.batch_size)
        print(f"wrote {len(items)} embeddings; dataset {path}")
        return 0
    if args.cmd == "flux-generate":
        items = _items(args.items)
        pipe = flux_tools.load_flux_pipeline(args.model, args.transformer, args.lora, args.lora_scale, _dtype(args.dtype), _device(args.device))
        stats = flux_tools.generate_items(pipe, items, args.out, args.n, args.steps, args.guidance, args.height, args.width,
                                          args.seed, args.batch_size, args.max_sequence_length)
        print(f"written {stats['written']}, already present {stats['skipped']} -> {Path(args.out)}")
        return 0
    items = _items(args.data, args.caption_column)
    from miro.align.datasets import OfflineImageDataset

    OfflineImageDataset(items, 1, check=False)  # the image files exist (decoded when training reads them)
    from diffusers import FluxPipeline

    from miro.align.flux_lora_train import (FluxLoraTrainConfig, check_resume, data_fingerprint, finetune_flux_lora,
                                            lora_fabric_kwargs, model_name)
    from miro.align.lora import LoraSettings
    from miro.align.trainer import OptimConfig, check_fabric, make_fabric

    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    cfg = FluxLoraTrainConfig(caption_column=args.caption_column, instance_prompt=args.instance_prompt, resolution=args.resolution,
                              max_train_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                              checkpoint_every=args.checkpoint_every, seed=args.seed, precision=args.precision, devices=devices,
                              out_dir=args.out, lora=LoraSettings(rank=args.rank, alpha=args.alpha),
                              optim=OptimConfig(name=args.optimizer, lr=args.lr, weight_decay=1e-4, max_grad_norm=1.0),
                              model=model_name(args.model), dtype=args.dtype, data=data_fingerprint(args.data))
    _dtype(args.dtype)  # a bad --dtype is named before the checkpoint is compared with it
    check_resume(cfg)  # before the model loads
    kwargs = lora_fabric_kwargs(cfg)
    check_fabric(kwargs, lambda key: f"--{key}")  # a value Fabric refuses, named before it launches
    # Fabric first: launched, each rank is its own process and loads the model onto its own device
    # (every rank loaded it onto cuda, i.e. cuda:0, before)
    fabric = make_fabric(kwargs)
    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=_dtype(args.dtype)).to(fabric.device)
    path = finetune_flux_lora(pipe, items, cfg, fabric=fabric)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
