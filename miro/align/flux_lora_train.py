"""LoRA fine-tuning of FLUX on an image–caption dataset (flow matching), the supervised counterpart
of SRPO used by the "SRPO + MIA" study (its ``flux_lora_train.py`` drove diffusers'
``train_dreambooth_lora_flux.py`` with the settings below).

Loss (diffusers FLUX DreamBooth, ``weighting_scheme="none"``): ``u ~ U(0, 1)`` picks a training
timestep index ``⌊u·T⌋`` of the shifted scheduler σ table, ``x_σ = (1−σ)·x0 + σ·ε`` and
``L = ‖v_θ(x_σ, σ) − (ε − x0)‖²``. Captions come from a chosen column (``caption_column``; e.g.
``Item`` or ``generated_caption``), ``instance_prompt`` for items that lack that column (the readers
refuse a .jsonl or .csv row with an empty caption).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from miro.align.datasets import OfflineImageDataset
from miro.align.flux import FluxTarget, FluxTargetConfig
from miro.align.lora import FLUX_LORA_FILE, LoraSettings, add_flux_lora, save_flux_lora
from miro.align.precision import cast_trainable_params, check_training_precision
from miro.align.trainer import (OptimConfig, _seed, _truncate_metrics, atomic_torch_save, build_optimizer, fabric_kwargs,
                                make_fabric, refuse_past_end, sample_index)
from miro.io import open_append

log = logging.getLogger(__name__)


@dataclass
class FluxLoraTrainConfig:
    caption_column: str = "caption"  # item field used as the training caption (fork: "Item" or "generated_caption")
    instance_prompt: str = "an image of"  # caption of items that lack caption_column (diffusers semantics)
    resolution: int = 1024
    max_train_steps: int = 1000  # the fork's run
    batch_size: int = 1  # per device
    grad_accum: int = 4  # 4 GPUs × 1 × 4 = effective batch 16 (fork)
    guidance: float = 1.0  # guidance embedding during training (`--guidance_scale 1`)
    checkpoint_every: int = 100
    seed: int = 42
    precision: str = "auto"  # fork: fp16 mixed; "auto": 16-mixed on CUDA, 32-true on CPU
    devices: int | str = 1
    strategy: str = "auto"
    max_sequence_length: int = 512
    out_dir: str = "flux-lora-out"
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(rank=16, alpha=4))  # diffusers defaults r16, alpha 4
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="prodigy", lr=1.0, weight_decay=1e-4, max_grad_norm=1.0))
    # What the CLI trains on, recorded in the checkpoint so that a resume on other data, another
    # model or dtype is refused (None: not recorded, as from the Python API): --model (a local
    # folder resolved), --dtype, and --data as data_fingerprint gives it.
    model: str | None = None
    dtype: str | None = None
    data: dict | None = None

    def __post_init__(self) -> None:
        check_training_precision("precision", self.precision)


def _caption(item: dict, cfg: FluxLoraTrainConfig) -> str:
    v = item.get(cfg.caption_column)
    if v is None and cfg.caption_column in ("Item", "item"):
        v = item.get("item")
    return str(v).strip() if v not in (None, "") else cfg.instance_prompt


# Keys a resumed fine-tune may change: how long it runs and where or how it reports, not what a step computes.
RESUME_MAY_CHANGE = {"max_train_steps", "checkpoint_every", "out_dir", "devices", "strategy"}


def data_fingerprint(spec: str) -> dict:
    """``--data`` as the checkpoint records it: the resolved path (or ``inline``) and a SHA-256 of
    the content (a folder's: its files' names and bytes), so other data under the same name is
    refused too."""
    import hashlib
    import os

    h = hashlib.sha256()
    if spec.lstrip().startswith("["):
        h.update(spec.encode("utf-8"))
        return {"path": "inline", "sha256": h.hexdigest()[:16]}
    path = Path(spec).resolve()
    if path.is_dir():  # a folder of CuRe CSVs: the files read_items reads
        for f in sorted(path.glob("*.csv")):
            h.update(os.fsencode(f.name) + b"\0" + f.read_bytes())
    else:
        h.update(path.read_bytes())
    return {"path": str(path), "sha256": h.hexdigest()[:16]}


def model_name(model: str) -> str:
    """A local model folder as its resolved path (hub ids as given)."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def lora_fabric_kwargs(cfg: FluxLoraTrainConfig) -> dict:
    return fabric_kwargs(devices=cfg.devices, strategy=cfg.strategy, precision=cfg.precision, auto_precision="16-mixed")


def check_resume(cfg: FluxLoraTrainConfig) -> None:
    """Refuse to continue ``out_dir``'s checkpoint under other settings (another seed, rank or
    learning rate would splice two runs, or fail on the adapters' shapes mid-load); the CLI calls
    it before the model loads."""
    ckpt = _checkpoint(cfg)
    if ckpt.is_file():
        _refuse_other_settings(torch.load(ckpt, map_location="cpu", weights_only=True), cfg, ckpt)


def _checkpoint(cfg: FluxLoraTrainConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints" / "last.pt"


def _refuse_other_settings(state: dict, cfg: FluxLoraTrainConfig, ckpt: Path) -> None:
    from miro.align.trainer import settings_changes

    current = json.loads(json.dumps(asdict(cfg), default=str))
    changed = [c for c in settings_changes(state.get("config"), current) if c.split(":")[0] not in RESUME_MAY_CHANGE]
    if changed:
        raise ValueError(f"{ckpt} was trained with other settings ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}): resume with them, or write this run to another --out")
    refuse_past_end(int(state["step"]), cfg.max_train_steps, "--steps", ckpt)


def batch_indices(cfg: FluxLoraTrainConfig, step: int, micro: int, world: int, rank: int, n: int) -> list[int]:
    """Items of one micro-batch: sample ``flat·batch_size + b`` of the run, each at its own epoch's
    position (a batch that straddles an epoch boundary takes its later samples from the new epoch)."""
    flat = (step * cfg.grad_accum + micro) * world + rank
    return [sample_index(cfg.seed, flat * cfg.batch_size + b, n) for b in range(cfg.batch_size)]


def finetune_flux_lora(pipe, items: list[dict], cfg: FluxLoraTrainConfig, fabric=None) -> Path:
    """Train a LoRA on ``pipe.transformer`` from items with ``image_path``; resumable; returns the
    diffusers-format LoRA file. ``fabric``: a launched Fabric, made before ``pipe`` was built on its
    device (made here otherwise)."""
    # The checkpoint is read once, and its settings checked before the pipeline is touched.
    ckpt = _checkpoint(cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=True) if ckpt.is_file() else None
    if state is not None:
        _refuse_other_settings(state, cfg, ckpt)
    fabric = fabric or make_fabric(lora_fabric_kwargs(cfg))
    fabric.launch()  # a no-op for a launched Fabric (the CLI launches it before the model loads)
    target = FluxTarget.from_pipeline(pipe, FluxTargetConfig(height=cfg.resolution, width=cfg.resolution,
                                                             max_sequence_length=cfg.max_sequence_length, quantize_timestep=False))
    data = OfflineImageDataset(items, cfg.resolution)
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.requires_grad_(False)
    add_flux_lora(pipe.transformer, cfg.lora)
    cast_trainable_params(pipe.transformer)  # float32 adapters over bf16 weights (diffusers' cast_training_params)
    opt = build_optimizer(pipe.transformer.parameters(), cfg.optim)
    wrapped, opt = fabric.setup(pipe.transformer, opt)
    target.set_trainable_module(wrapped)
    # The shifted σ table of a fresh FlowMatchEulerDiscreteScheduler (T entries; a used scheduler's
    # table was replaced by set_timesteps).
    sigmas = type(pipe.scheduler).from_config(pipe.scheduler.config).sigmas.float()
    n_t = int(pipe.scheduler.config.num_train_timesteps)
    out = Path(cfg.out_dir)
    start = 0
    named = dict(pipe.transformer.named_parameters())
    if state is not None:
        with torch.no_grad():
            for k, v in state["trainable"].items():
                named[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    world, rank = fabric.world_size, fabric.global_rank
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out / "metrics.jsonl", start)
    for step in range(start, cfg.max_train_steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            g = torch.Generator().manual_seed(_seed(cfg.seed, step, micro, rank))
            idx = batch_indices(cfg, step, micro, world, rank, len(data))
            images = torch.stack([data[i][0] for i in idx]).to(fabric.device)
            cond = target.encode_condition([_caption(data.items[i], cfg) for i in idx])
            x0 = target.encode_images(images, generator=g)
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            u = torch.rand(x0.shape[0], generator=g)
            sig = sigmas[(u * n_t).long().clamp(max=n_t - 1)].to(x0.device)
            x_t = (1 - sig[:, None, None]) * x0 + sig[:, None, None] * noise
            with fabric.no_backward_sync(wrapped, enabled=micro < cfg.grad_accum - 1):
                v = target.velocity(x_t, sig, cond, guidance=cfg.guidance)
                loss = ((v - (noise - x0)) ** 2).mean() / cfg.grad_accum
                fabric.backward(loss)
            total += float(loss.detach())
        if cfg.optim.max_grad_norm:
            fabric.clip_gradients(wrapped, opt, max_norm=cfg.optim.max_grad_norm)
        opt.step()
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            with open_append(out / "metrics.jsonl") as f:
                f.write(json.dumps({"step": step + 1, "loss": total, "seconds": time.perf_counter() - t0}) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_train_steps:
            if rank == 0:
                trainable = {k: p.detach().cpu().clone() for k, p in named.items() if p.requires_grad}
                atomic_torch_save({"step": step + 1, "trainable": trainable, "optimizer": opt.state_dict(),
                                   "config": json.loads(json.dumps(asdict(cfg), default=str))}, ckpt)
            fabric.barrier()
    target.set_trainable_module(pipe.transformer)
    try:
        if rank == 0:  # one writer (atomically)
            save_flux_lora(pipe.transformer, out)
    finally:
        fabric.barrier()  # every rank returns once the file is written (or its writing failed)
    return out / FLUX_LORA_FILE
