"""The MIRO LightningModule: flow loss, EMA, LAMB/AdamW + warmup-cosine, reproducible randomness.

Hyper-parameters are one plain dict (``save_hyperparameters``), so checkpoints load with
``torch.load(weights_only=True)``:

* ``model_config`` — the pipeline ``config.json`` dict (``miro.models.get_config(name)`` with
  the experiment's ``coherence_keys``);
* ``loss`` — :class:`miro.models.flow.LossConfig` fields;
* ``optimizer`` / ``scheduler`` — :class:`~miro.train.optim.OptimizerConfig` /
  :class:`~miro.train.optim.SchedulerConfig` fields;
* ``ema_decays`` (list, first = exported), ``ema_warmup`` (see :mod:`miro.train.ema`),
  ``position_init`` (``published`` or ``sincos``, :meth:`miro.models.RIN.init_position_table`), ``seed``, ``compile`` (torch.compile the model);
* ``uninformative_rewards`` — baselines: feed U(0, 1) noise instead of the sample's rewards.

Randomness: every micro-batch draws its time, noise, dropout and VAE-sampling randomness from a
``torch.Generator`` seeded with (seed, rank, micro-step), so a resumed run repeats exactly the
draws of an uninterrupted one without saving any RNG state.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import fields

import torch
from lightning.pytorch import LightningModule

from miro.encoders.text import pad_token_rows
from miro.models import LossConfig, MiroModel, flow_loss
from miro.models.patch_resize import patch_size_of, resize_patch_tensors
from miro.train.ema import EMA
from miro.train.optim import OptimizerConfig, SchedulerConfig, WarmupCosineDecayLR, build_optimizer


def _dataclass_from(cls, d: dict | None, section: str):
    d = dict(d or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; allowed: {sorted(names)}")
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    return cls(**d)


def _config_diff(a, b, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r} vs now {b!r}"]


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed that is a pure function of (seed, rank, micro-step)."""
    h = (int(seed) * 0x9E3779B97F4A7C15 + int(rank) * 0xBF58476D1CE4E5B9 + int(step) * 0x94D049BB133111EB)
    return h % (2**63 - 1)


class MiroLightningModule(LightningModule):
    """Trains a :class:`miro.models.MiroModel` with the published flow-matching loss."""

    def __init__(self, hparams: dict, uncond_embedding: torch.Tensor | None = None, init_seed: int | None = None):
        super().__init__()
        self.save_hyperparameters(dict(hparams))
        hp = self.hparams
        if "model_config" not in hp:
            raise ValueError("hparams need 'model_config' (a pipeline config.json dict)")
        self.loss_config = _dataclass_from(LossConfig, hp.get("loss"), "loss")
        self.optimizer_config = _dataclass_from(OptimizerConfig, hp.get("optimizer"), "optimizer")
        self.scheduler_config = _dataclass_from(SchedulerConfig, hp.get("scheduler"), "scheduler")
        seed = int(hp.get("seed", 0))
        g = torch.Generator().manual_seed(seed if init_seed is None else init_seed)
        self.model = MiroModel.from_config(dict(hp["model_config"]), generator=g)
        if hp.get("position_init", "published") != "published":
            # Before the EMA copies are taken, so that they start from the same table.
            self.model.network.init_position_table(str(hp["position_init"]))
        self.ema = EMA(self.model, list(hp.get("ema_decays", [0.9999])), warmup=bool(hp.get("ema_warmup", False)))
        if uncond_embedding is None:
            uncond_embedding = torch.zeros(1, self.model.network.label_dim)
        # The null-text embedding used for text dropout and CFG; saved with the weights so that
        # `miro convert` can export it as uncond_embedding.npy.
        self.register_buffer("uncond_embedding", uncond_embedding.detach().float().clone())
        self.micro_step = 0  # micro-batches trained (saved in checkpoints)
        self.samples_seen = 0  # samples of this rank trained on
        self.corrupt_seen = 0  # samples the data pipeline replaced because they were corrupt
        self.reward_bins: dict | None = None  # RewardBins.to_dict(), saved in checkpoints
        self._text_encoder = None
        self._compiled = None

    # ------------------------------------------------------------------ model access
    @property
    def train_model(self) -> torch.nn.Module:
        """The model used for the loss (compiled when ``compile`` is set; weights shared)."""
        if self.hparams.get("compile", False):
            if self._compiled is None:
                # fullgraph as published (miro_facts §4); kept out of the module tree so state_dict
                # names do not change.
                object.__setattr__(self, "_compiled", torch.compile(self.model, fullgraph=True))
            return self._compiled
        return self.model

    def ema_model(self, index: int = 0) -> MiroModel:
        return self.ema.model(index)

    @torch.no_grad()
    def load_initial_weights(self, source: str, weights: str = "ema", strict: bool = True) -> str:
        """Warm start: copy weights into the model and every EMA copy before training.

        ``source``: a ``miro train`` checkpoint (``*.ckpt``; ``weights`` = ``ema`` for the exported
        EMA copy or ``raw`` for the training weights) or a pipeline (built-in name, folder or hub
        id: its ``model.safetensors``). Optimizer, schedule and data position start fresh; the
        architectures must match tensor for tensor, except the patch size, which may be a divisor
        of the source's (:mod:`miro.models.patch_resize`). ``strict=False`` lets tensors the source
        lacks keep their fresh initialisation (a module added to a trained model, e.g. the
        zero-scaled attention of ``data_mixer: conv_attn``); extra or mis-shaped tensors are still
        refused. Returns a one-line description.
        """
        if weights not in ("ema", "raw"):
            raise ValueError(f"init_weights must be 'ema' or 'raw'; got {weights!r}")
        if str(source).endswith(".ckpt"):
            from miro.train.convert import checkpoint_weights

            _, state, _ = checkpoint_weights(source, 0 if weights == "ema" else None)
            what = f"{source} ({weights} weights)"
        else:
            from safetensors.torch import load_file

            from miro.hub import resolve_pipeline_dir

            files = resolve_pipeline_dir(source)
            if "model.safetensors" not in files:
                raise ValueError(f"init_from={source!r}: the pipeline has no trained weights (model.safetensors)")
            state, what = load_file(str(files["model.safetensors"])), f"pipeline {source}"
        net = self.model.network
        try:
            src_patch = patch_size_of(state, net.num_input_channels)
            if src_patch != net.patch_size:  # a finer patch warm-starts from a coarser one (patch_resize)
                state = resize_patch_tensors(state, net.patch_size, net.num_input_channels)
                what += f", patch {src_patch} -> {net.patch_size} resized"
            if not strict:
                fresh = {k: v for k, v in self.model.state_dict().items() if k not in state}
                if fresh:
                    state = {**state, **fresh}
                    what += f", {len(fresh)} new tensors kept at their initialisation"
            self.model.load_state_dict_checked(state)
        except ValueError as e:
            raise ValueError(f"init_from={source!r} does not fit this experiment's model: {e}") from None
        self.ema.copy_from(self.model)
        return what

    def text_encoder(self):
        """Frozen text encoder for on-the-fly captions (loaded lazily, never trained or saved)."""
        if self._text_encoder is None:
            from miro.encoders import load_text_encoder

            cfg = self.hparams["model_config"]
            enc = load_text_encoder(cfg.get("text_encoder", "minilm"), max_length=int(cfg.get("max_text_len", 77)),
                                    device=self.device)
            object.__setattr__(self, "_text_encoder", enc)
        return self._text_encoder

    def on_fit_start(self) -> None:
        if self._text_encoder is not None:  # built on CPU by `miro train`; run it where the model is
            self._text_encoder.to(self.device)

    # ------------------------------------------------------------------ training
    def _text(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "text_emb" in batch:
            return batch["text_emb"].float(), batch["text_mask"].bool()
        return self.encode_captions(list(batch["captions"]))

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """On-the-fly text embeddings, trimmed to the mask, stored as float16 exactly like the
        precomputed shard members, and cached per caption (LRU of ``text_cache_size`` entries):
        Shapes captions repeat, and cached and fresh values are identical (both fp16-rounded)."""
        cache = self.__dict__.setdefault("_text_cache", OrderedDict())
        size = int(self.hparams.get("text_cache_size", 20000))
        missing = list(dict.fromkeys(c for c in captions if c not in cache))
        if missing:
            emb, mask = self.text_encoder().encode(missing)
            # one device-to-host copy for the batch: a copy per caption is a sync per caption on a GPU
            emb, mask = emb.to("cpu", torch.float16), mask.to("cpu").bool()
            for c, e, m in zip(missing, emb, mask):
                cache[c] = e[m]
        rows = []
        for c in captions:
            cache.move_to_end(c)
            rows.append(cache[c])
        while len(cache) > size:
            cache.popitem(last=False)
        out, mask = pad_token_rows(rows)
        return out.to(self.device), mask.to(self.device)

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None):
        """The flow loss of one batch (used by training and by tests)."""
        if "image" in batch:
            x0 = self.model.preprocess(batch["image"].float())
        else:
            x0 = self.model.preprocess(batch["latent_mean"].float(), batch["latent_std"].float(), generator=generator)
        emb, mask = self._text(batch)
        rewards = batch.get("rewards", {})
        b = x0.shape[0]
        coherence = {}
        for k in self.model.coherence_keys:
            if self.hparams.get("uninformative_rewards", False):
                # Baseline: the reward tokens carry i.i.d. U(0, 1) values unrelated to the sample, so
                # the model learns to ignore them (same network and compute as MIRO; any inference
                # target stays in distribution and has no effect).
                coherence[k] = torch.rand(b, device=x0.device, generator=generator)
                continue
            v = rewards.get(k)
            coherence[k] = v.float() if v is not None else torch.full((b,), math.nan, device=x0.device)
        return flow_loss(self.train_model, x0, emb, mask, coherence, self.uncond_embedding, self.loss_config, generator)

    def training_step(self, batch: dict, batch_idx: int):
        g = torch.Generator(device=self.device).manual_seed(step_seed(self.hparams.get("seed", 0), self.global_rank,
                                                                       self.micro_step))
        loss, logs = self.compute_loss(batch, g)
        self.micro_step += 1
        b = int(batch["synthetic"].shape[0]) if "synthetic" in batch else 0
        self.samples_seen += b
        self.corrupt_seen += int(batch.get("n_corrupt", 0))
        self.log("train/loss", loss.detach(), prog_bar=True)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]))
        for k, v in logs.items():
            self.log(f"train/{k}", v)
        if "synthetic" in batch:
            self.log("train/synthetic_frac", batch["synthetic"].float().mean())
        self.log("train/samples_seen", float(self.samples_seen * self.trainer.world_size))
        self.log("train/corrupt_samples", float(self.corrupt_seen))
        return loss

    def optimizer_step(self, *args, **kwargs):
        step = int(self.global_step)  # optimizer steps before this one: this step's 0-based index
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model, step=step)

    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.optimizer_config)
        sc = self.scheduler_config
        sch = WarmupCosineDecayLR(opt, sc.warmup_steps, sc.total_steps, sc.rate)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        bins = getattr(dm, "bins", None)
        if bins is not None:
            self.reward_bins = bins.to_dict()
        checkpoint["miro"] = {
            "micro_step": int(self.micro_step),
            "samples_seen": int(self.samples_seen),  # this rank's: restored per rank on resume
            # all ranks' (every rank trains on batches of one size), what a convergence curve's x axis counts
            "samples_seen_global": int(self.samples_seen) * (self.trainer.world_size
                                                             if self._trainer is not None else 1),
            "corrupt_seen": int(self.corrupt_seen),
            "reward_bins": self.reward_bins,
            "model_config": dict(self.hparams["model_config"]),
            "ema_decays": [float(d) for d in self.ema.decays],
            "variant_name": self.hparams.get("variant_name"),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("miro", {})
        old = state.get("model_config")
        if old is not None:
            diff = _config_diff(old, dict(self.hparams["model_config"]))
            if diff:
                raise ValueError("the checkpoint was trained with a different model config ("
                                 + "; ".join(diff[:5]) + "); resume with the original config, or start a fresh run "
                                 "under a new experiment_name (or here with resume=null checkpoint.overwrite=true)")
        self.micro_step = int(state.get("micro_step", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.corrupt_seen = int(state.get("corrupt_seen", 0))
        self.reward_bins = state.get("reward_bins")
