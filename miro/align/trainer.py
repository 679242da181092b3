"""The SRPO training loop on Lightning Fabric: distributed, mixed precision, gradient accumulation,
atomic checkpoints and exact resume after a kill.

Determinism: every random draw of optimiser step ``s`` comes from generators seeded by
``(seed, s, micro-batch, rank)``, and the data order of an epoch is a permutation seeded by
``(seed, epoch)``. A run resumed from the checkpoint at step ``s`` therefore performs exactly the
updates the uninterrupted run would have performed.

Upstream correspondences (``fastvideo/SRPO.py``): online noise is shared by every rank
(``shared_noise``, "it is important to make all device generate with the same latent") while the
timestep index is drawn per rank (Python ``random`` seeded with seed + rank); offline noise is
drawn per rank ("otherwise all cards' images are identical", SRPO #10).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from miro.align import checks as C
from miro.align.datasets import OfflineImageDataset
from miro.align.precision import cast_trainable_params, check_training_precision
from miro.align.relative_reward import SemanticRelativeReward
from miro.align.step import StepConfig, srpo_step
from miro.io import atomic_path, atomic_write_text, open_append

log = logging.getLogger(__name__)


OPTIMIZERS = ("adamw", "prodigy")


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw" or "prodigy" (optional dependency `prodigyopt`)
    lr: float = 5e-6  # upstream FLUX-HPS full fine-tune; Prodigy wants 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4  # upstream SRPO AdamW
    max_grad_norm: float = 0.1  # upstream clip_grad_norm
    warmup_steps: int = 0  # linear warm-up, then constant (upstream constant_with_warmup, 0 warm-up)

    def __post_init__(self) -> None:
        C.choice("optim.name", self.name, OPTIMIZERS)
        self.lr = C.number("optim.lr", self.lr, 0.0, strict=True)
        self.betas = C.pair("optim.betas", self.betas)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1); got {list(self.betas)}")
        self.eps = C.number("optim.eps", self.eps, 0.0, strict=True)
        self.weight_decay = C.number("optim.weight_decay", self.weight_decay, 0.0)
        self.max_grad_norm = C.number("optim.max_grad_norm", self.max_grad_norm, 0.0, allow_none=True)
        C.pos_int("optim.warmup_steps", self.warmup_steps, 0)


@dataclass
class TrainConfig:
    max_steps: int = 20  # optimiser steps; upstream trains 19 then only visualises (checkpointing_steps 20)
    batch_size: int = 1  # samples per device per micro-batch (upstream 1)
    grad_accum: int = 1  # micro-batches per optimiser step (each runs both branches)
    seed: int = 42  # upstream seed
    shared_noise: bool = True  # online: identical ε on every rank (upstream broadcast from rank 0)
    checkpoint_every: int = 10  # steps between atomic checkpoints (and at the end)
    log_every: int = 1
    out_dir: str = "srpo-out"  # checkpoints/, metrics.jsonl, the exported weights
    resume: bool = True  # continue from out_dir/checkpoints/last.pt when present
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp" across GPUs; FSDP is not wired here (use LoRA for 12B models)
    precision: str = "auto"  # "auto": bf16-mixed on CUDA, 32-true on CPU
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "num_nodes"):
            C.pos_int(f"train.{key}", getattr(self, key))
        C.pos_int("train.seed", self.seed, 0)
        for key in ("shared_noise", "resume", "progress"):
            C.boolean(f"train.{key}", getattr(self, key))
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ValueError(f"train.out_dir must be a non-empty path; got {self.out_dir!r}")
        d = self.devices
        if isinstance(d, bool) or not (isinstance(d, str) and d.strip() or isinstance(d, int) and (d >= 1 or d == -1)):
            raise ValueError(f"train.devices must be an integer >= 1, -1 (all) or a string such as auto; got {d!r}")
        for key in ("accelerator", "strategy"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"train.{key} must be a non-empty string; got {getattr(self, key)!r}")
        check_training_precision("train.precision", self.precision)


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: freeze nothing or add LoRA adapters")
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ModuleNotFoundError as e:
            raise ValueError("optimizer 'prodigy' needs the optional package prodigyopt: pip install prodigyopt") from e
        # Defaults of diffusers' train_dreambooth_lora_flux.py: decouple, bias correction, safeguard warm-up.
        return Prodigy(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                       decouple=True, use_bias_correction=True, safeguard_warmup=True)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose 'adamw' or 'prodigy'")


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 0x100000001B3 + int(p) + 1) % (2**63 - 1)
    return h


def sample_index(seed: int, flat: int, n: int) -> int:
    """The item of the ``flat``-th sample drawn from ``n`` items: position ``flat mod n`` of epoch
    ``flat // n``'s permutation, so every item is seen exactly once per epoch."""
    epoch, pos = divmod(flat, n)
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch)))[pos])


def fabric_kwargs(accelerator: str = "auto", devices: int | str = 1, num_nodes: int = 1, strategy: str = "auto",
                  precision: str = "auto", auto_precision: str = "bf16-mixed") -> dict:
    """Fabric's arguments, ``precision="auto"`` resolved (``auto_precision`` on CUDA, 32-true on CPU)."""
    if precision == "auto":
        precision = auto_precision if torch.cuda.is_available() else "32-true"
    return {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "strategy": strategy,
            "precision": precision}


def check_fabric(kwargs: dict, name: Callable[[str], str]):
    """Construct Fabric (not launched: no process starts) with ``kwargs`` added one at a time, so a
    value this machine cannot run (``train.accelerator=gpu`` without a GPU) is refused by the
    setting's ``name`` before any model loads, not in a traceback after. Returns that Fabric."""
    from lightning.fabric import Fabric

    from miro.io import one_line

    given: dict = {}
    for key, value in kwargs.items():
        given[key] = value
        try:
            fabric = Fabric(**given)
        except Exception as e:  # noqa: BLE001 - Lightning raises ValueError, TypeError, RuntimeError, ...
            raise ValueError(f"{name(key)}={value!r} cannot run here: {one_line(e)}") from None
    return fabric


def make_fabric(kwargs: dict):
    """A launched Fabric: with several devices each rank is its own process from here on, so the
    models must be built after this call, on ``fabric.device``."""
    from lightning.fabric import Fabric

    fabric = Fabric(**kwargs)
    fabric.launch()
    return fabric


def train_fabric_kwargs(cfg: "TrainConfig") -> dict:
    return fabric_kwargs(cfg.accelerator, cfg.devices, cfg.num_nodes, cfg.strategy, cfg.precision)


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class SRPOTrainer:
    """Run SRPO on a target with a relative reward over a list of items (dicts with ``caption``)."""

    def __init__(self, target, reward: SemanticRelativeReward, items: list[dict], step_cfg: StepConfig | None = None,
                 optim_cfg: OptimConfig | None = None, train_cfg: TrainConfig | None = None,
                 callback: Callable[[int, dict], None] | None = None, fabric=None, run_settings: dict | None = None):
        # run_settings: what else decides the run (the CLI's target, reward, data and lora sections),
        # saved with each checkpoint so that a resume under other values is refused like other settings.
        self.run_settings = dict(run_settings or {})
        self.target, self.reward, self.items = target, reward, list(items)
        self.step_cfg = step_cfg or StepConfig()
        self.optim_cfg = optim_cfg or OptimConfig()
        self.cfg = train_cfg or TrainConfig()
        self.callback = callback
        if not self.items:
            raise ValueError("SRPO needs at least one prompt item")
        if self.step_cfg.mode == "offline":
            self.images = OfflineImageDataset(self.items, target.image_size)
            self.items = self.images.items
            if self.images.skipped:
                log.warning("offline dataset: skipped %d items without a readable image", self.images.skipped)
        self.fabric = fabric or self._make_fabric()
        self.out = Path(self.cfg.out_dir)
        self.ckpt_path = self.out / "checkpoints" / "last.pt"

    def _make_fabric(self):
        return make_fabric(train_fabric_kwargs(self.cfg))

    # -- data ------------------------------------------------------------------------------
    def _indices(self, step: int, micro: int) -> list[int]:
        n, bs, world, rank = len(self.items), self.cfg.batch_size, self.fabric.world_size, self.fabric.global_rank
        per_step = self.cfg.grad_accum * world * bs
        return [sample_index(self.cfg.seed, step * per_step + (micro * world + rank) * bs + b, n) for b in range(bs)]

    def _batch(self, step: int, micro: int) -> dict:
        idx = self._indices(step, micro)
        batch = {"items": [self.items[i] for i in idx], "images": None, "cond": None}
        if hasattr(self.target, "cond_from_embeddings") and all(it.get("prompt_embed_path") for it in batch["items"]):
            # precomputed text embeddings (SRPO JSON dataset): the text encoders need not be loaded
            from miro.align.datasets import load_fork_embeddings

            embs = [load_fork_embeddings(it) for it in batch["items"]]
            batch["cond"] = self.target.cond_from_embeddings(embs, self.fabric.device)
        if self.step_cfg.mode == "offline":
            batch["images"] = torch.stack([self.images[i][0] for i in idx]).to(self.fabric.device)
        return batch

    # -- checkpoints -----------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self._module.named_parameters() if p.requires_grad}

    def _settings(self) -> dict:
        out = {"step": asdict(self.step_cfg), "optim": asdict(self.optim_cfg), "train": asdict(self.cfg)}
        return {**out, "run": self.run_settings} if self.run_settings else out

    def save_checkpoint(self, step: int) -> None:
        if self.fabric.global_rank == 0:
            state = {"step": step, "trainable": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                     "config": self._settings()}
            atomic_torch_save(state, self.ckpt_path)
        self.fabric.barrier()

    def load_checkpoint(self) -> int:
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        changed = settings_changes(state.get("config"), self._settings())
        if changed:  # exact resume replays the run's own steps; other settings would splice two runs
            raise ValueError(f"{self.ckpt_path} was trained with other settings ({'; '.join(changed[:4])}"
                             f"{'; ...' if len(changed) > 4 else ''}): resume with them, write this run to another "
                             f"train.out_dir, or start over there with train.resume=false")
        refuse_past_end(int(state["step"]), self.cfg.max_steps, "train.max_steps", self.ckpt_path)
        params = dict(self._module.named_parameters())
        missing = [n for n in state["trainable"] if n not in params]
        if missing:
            raise ValueError(f"checkpoint {self.ckpt_path} has parameters the model lacks: {missing[:5]}")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t.to(params[n]))
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    # -- loop ------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to ``max_steps``; returns the metrics of the steps run in this call."""
        fabric, cfg = self.fabric, self.cfg
        module = self.target.trainable_module
        # float32 master weights (full fine-tune or LoRA adapters) whatever dtype the model was loaded
        # in; the target's forward autocasts to that dtype (miro.align.precision, facts §5).
        cast_trainable_params(module)
        self.optimizer = build_optimizer(module.parameters(), self.optim_cfg)
        wrapped, self.optimizer = fabric.setup(module, self.optimizer)
        self._module = module
        self.target.set_trainable_module(wrapped)
        warm = max(0, self.optim_cfg.warmup_steps)
        base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        start = 0
        if cfg.resume and self.ckpt_path.is_file():
            start = self.load_checkpoint()
            log.info("resumed from %s at step %d", self.ckpt_path, start)
        metrics_path = self.out / "metrics.jsonl"
        if fabric.global_rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_path, start)
        history = []
        bar = None
        if cfg.progress and fabric.global_rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=start, desc="srpo")
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            for g, lr in zip(self.optimizer.param_groups, base_lrs):  # linear warm-up, then constant
                g["lr"] = lr * min(1.0, (step + 1) / warm) if warm else lr
            agg: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                rank = 0 if (cfg.shared_noise and self.step_cfg.mode == "online") else fabric.global_rank
                gen = torch.Generator().manual_seed(_seed(cfg.seed, step, micro, rank))
                tgen = torch.Generator().manual_seed(_seed(cfg.seed + 1, step, micro, fabric.global_rank))
                last = micro == cfg.grad_accum - 1
                with fabric.no_backward_sync(wrapped, enabled=not last):
                    m = srpo_step(self.target, self.reward, self.step_cfg, self._batch(step, micro), gen, step,
                                  backward=fabric.backward, loss_scale=1.0 / cfg.grad_accum, timestep_generator=tgen)
                for k, v in m.items():
                    agg[k] = agg.get(k, 0.0) + v / cfg.grad_accum
            if self.optim_cfg.max_grad_norm and self.optim_cfg.max_grad_norm > 0:
                agg["grad_norm"] = float(fabric.clip_gradients(wrapped, self.optimizer, max_norm=self.optim_cfg.max_grad_norm))
            self.optimizer.step()
            agg.update(step=step + 1, lr=float(self.optimizer.param_groups[0]["lr"]), seconds=time.perf_counter() - t0)
            history.append(agg)
            if fabric.global_rank == 0:
                logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
                if logged:  # metrics.jsonl and the bar's rewards every log_every steps, and at the end
                    with open_append(metrics_path) as f:
                        f.write(json.dumps(agg) + "\n")
                if bar is not None:
                    bar.update(1)
                    if logged:
                        bar.set_postfix({k: f"{v:.3f}" for k, v in agg.items() if k.endswith("/reward")})
            if self.callback is not None:
                self.callback(step + 1, agg)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps:
                self.save_checkpoint(step + 1)
        if bar is not None:
            bar.close()
        self.target.set_trainable_module(module)
        return history


# Keys a resumed run may change (train.* by their short name): how long it runs, how it reports and
# which launcher or device runs it, not what each step computes (seed, batch, ranks, precision)
RESUME_MAY_CHANGE = {"max_steps", "checkpoint_every", "log_every", "out_dir", "resume", "progress", "accelerator",
                     "strategy", "run.target.device"}


def settings_changes(saved: dict | None, current: dict) -> list[str]:
    """``section.key: saved -> current`` for every setting of ``current`` that a checkpoint written
    with ``saved`` settings was not trained with (none for a checkpoint without settings)."""
    if not saved:
        return []

    def flat(d: dict, prefix: str = "") -> dict:  # nested sections (step.schedule, step.prompts) as dotted keys
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = (flat(json.loads(json.dumps(d, default=str))) for d in (saved, current))  # tuples as lists
    return [f"{key}: {old[key]!r} -> {value!r}" for key, value in new.items()
            if key in old and old[key] != value and key.removeprefix("train.") not in RESUME_MAY_CHANGE]


def refuse_past_end(step: int, max_steps: int, key: str, ckpt: Path) -> None:
    """A checkpoint past the run's end would be exported as if it were the run's last step."""
    if step > max_steps:
        raise ValueError(f"{ckpt} is at step {step}, past {key}={max_steps}: resume with {key} >= {step}, or "
                         f"start over in another output folder")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be re-run)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", math.inf) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    atomic_write_text(path, "".join(k + "\n" for k in keep))
