"""``miro train experiment=<name> [key=value ...]``: Hydra-composed, Lightning-run training.

The configs ship as package data (``miro/configs/``); they are composed with Hydra's compose API
(no working-directory change, no per-rank run folders under DDP), resolved to plain containers,
and turned into a :class:`~miro.train.module.MiroLightningModule`, a
:class:`~miro.data.datamodule.MiroDataModule` and a Lightning ``Trainer``. Site values come from
the environment (``MIRO_DATA_DIR``, ``MIRO_ROOT_DIR``, ...); a ``.env`` file in the working
directory is read first (variables already set win).

Resume: with ``resume=auto`` (default) a run whose checkpoint folder holds ``last.ckpt``
continues from it: weights, EMA, optimizer, scheduler, step and the exact data position.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

HELP = """usage: miro train experiment=<name> [key=value ...] [--print-config] [--dry-run]

Train a MIRO model. Configuration is Hydra's: pick an experiment and override any key.

experiments (published variant in brackets):
{experiments}

common overrides:
  data_dir=PATH              folder of enriched *.tar shards (env MIRO_DATA_DIR)
  root_dir=PATH              output root; checkpoints in ROOT/miro/checkpoints/EXPERIMENT/ (env MIRO_ROOT_DIR)
  experiment_name=NAME       run name (checkpoint folder)
  computer=cpu|gpu1|gpu8|slurm_2x8   hardware; computer.devices=N computer.num_nodes=N computer.precision=P
  trainer.max_steps=N        optimizer steps; data.global_batch_size=N; seed=N
  resume=auto|null|PATH      continue from last.ckpt (auto), start fresh (null) or from a given .ckpt
  init_from=CKPT|PIPELINE    warm start a fresh run from a checkpoint's weights (init_weights=ema|raw)
                             or a pipeline (built-in name, folder, hub id); fresh optimizer and data;
                             a finer patch (a divisor of the source's) gets resized patch tensors;
                             init_strict=false keeps tensors the source lacks at their initialisation
  ema_warmup=true            EMA decay min(d, (1+n)/(10+n)) at step n (short runs)
  position_init=sincos       start the learned patch-position table from a 2-D sine-cosine table
  rewards.ties=RULE          tied reward scores: midrank (release) or spread; or one rule per reward,
                             'rewards.ties={{shapes_counting:spread,shapes_position:spread}}' (others midrank)

options:
  --print-config             print the composed config and exit
  --dry-run                  build data, model and trainer, then exit without training
  -h, --help                 show this help
"""


def load_dotenv(path: str | os.PathLike = ".env") -> dict[str, str]:
    """Read ``KEY=VALUE`` lines into ``os.environ`` (existing variables win). Returns what was set."""
    p = Path(path)
    if not p.is_file():
        return {}
    set_ = {}
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key, value = key.strip().removeprefix("export ").strip(), value.strip().strip("'\"")
        if key and key not in os.environ:
            os.environ[key] = value
            set_[key] = value
    return set_


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def compose(overrides: list[str]):
    """The composed (unresolved) OmegaConf config for ``overrides``."""
    from hydra import compose as h_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return h_compose(config_name="config", overrides=list(overrides))


def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def model_config(cfg: dict) -> dict:
    """The pipeline config dict: named model config + overrides + the experiment's reward keys."""
    from miro.models import get_config

    mc = _deep_update(get_config(cfg["model"]["name"]), dict(cfg["model"].get("overrides") or {}))
    keys = list(cfg["rewards"]["keys"])
    if not keys:
        raise ValueError("rewards.keys is empty: the network needs at least one reward token; for a baseline "
                         "keep the keys and set rewards.uninformative=true")
    mc["network"]["coherence_keys"] = keys
    mc["coherence_keys"] = keys
    if cfg["data"].get("max_text_len"):
        mc["max_text_len"] = int(cfg["data"]["max_text_len"])
    return mc


def per_rank_batch(cfg: dict) -> int:
    c = cfg["computer"]
    world = int(c["devices"]) * int(c["num_nodes"])
    accum = int(cfg["trainer"].get("accumulate_grad_batches", 1))
    gbs = int(cfg["data"]["global_batch_size"])
    if gbs % (world * accum):
        raise ValueError(f"data.global_batch_size={gbs} is not divisible by devices x nodes x accumulation "
                         f"= {world} x {accum}")
    return gbs // (world * accum)


def _int_key(cfg: dict, key: str) -> int:
    """The integer at dotted ``key`` (``trainer.max_steps``); a ValueError naming the key otherwise."""
    value = cfg
    for part in key.split("."):
        value = value[part]
    if isinstance(value, float) and value.is_integer():  # 1e5 on the command line is a float to Hydra
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise ValueError(f"{key}={value!r} is not an integer")


def check_schedule(cfg: dict) -> None:
    """Fail before any data or model work when the LR schedule cannot run (WarmupCosineDecayLR would
    only raise inside ``trainer.fit``): warm-up must be shorter than the schedule, whose length
    (``scheduler.total_steps``) is ``trainer.max_steps`` unless set on its own."""
    max_steps = _int_key(cfg, "trainer.max_steps")
    warmup, total = _int_key(cfg, "scheduler.warmup_steps"), _int_key(cfg, "scheduler.total_steps")
    if max_steps < 1:
        raise ValueError(f"trainer.max_steps={max_steps} must be >= 1")
    if warmup < 0:
        raise ValueError(f"scheduler.warmup_steps={warmup} must be >= 0")
    if warmup >= total:
        length = "trainer.max_steps" if total == max_steps else "scheduler.total_steps"
        raise ValueError(f"scheduler.warmup_steps={warmup} must be below {length}={total} (the LR schedule's length); "
                         f"set scheduler.warmup_steps=N with N < {total} (e.g. {total // 10}) or raise {length}")


def build(cfg: dict):
    """(module, datamodule, trainer, ckpt_path) from a resolved config dict."""
    import torch
    from lightning.pytorch import Trainer

    from miro.data.datamodule import DataConfig, MiroDataModule
    from miro.train.callbacks import (AtomicCheckpointIO, NonFiniteGuard, TestbedImageLogger, Throughput,
                                      checkpoint_callback)
    from miro.train.module import MiroLightningModule

    check_schedule(cfg)
    comp = cfg["computer"]
    if comp.get("threads"):
        torch.set_num_threads(int(comp["threads"]))
    ckpt_dir = Path(cfg["checkpoint_dir"])
    mc = model_config(cfg)
    d = dict(cfg["data"])
    d.pop("global_batch_size", None)
    from dataclasses import fields

    allowed = {f.name for f in fields(DataConfig)} - {"data_dir", "reward_keys", "num_bins", "bin_ties", "bins_sample_size",
                                                       "bins_path", "batch_size", "seed"}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"unknown data keys {unknown}; allowed: {sorted(allowed | {'global_batch_size'})}")
    uninformative = bool(cfg["rewards"].get("uninformative", False))
    dcfg = DataConfig(data_dir=str(cfg["data_dir"]), reward_keys=[] if uninformative else list(cfg["rewards"]["keys"]),
                      num_bins=int(cfg["rewards"]["num_bins"]), bin_ties=cfg["rewards"].get("ties", "midrank"),
                      bins_sample_size=int(cfg["rewards"]["bins_sample_size"]),
                      bins_path=str(ckpt_dir / "reward_bins.json"), batch_size=per_rank_batch(cfg),
                      seed=int(cfg["seed"]), **d)
    dm = MiroDataModule(dcfg)
    dm.prepare(progress=bool(cfg["trainer"].get("progress_bar", True)))  # trainer.progress_bar=false: no bars in log files
    from miro.encoders import load_text_encoder

    # Needed for the null-text embedding (text dropout, CFG) and for on-the-fly captions.
    text_encoder = load_text_encoder(mc.get("text_encoder", "minilm"), max_length=int(mc.get("max_text_len", 77)))
    hparams = {
        "model_config": mc,
        "loss": dict(cfg["loss"]),
        "optimizer": dict(cfg["optimizer"]),
        "scheduler": dict(cfg["scheduler"]),
        "ema_decays": list(cfg["ema_decays"]),
        "ema_warmup": bool(cfg.get("ema_warmup", False)),
        "position_init": str(cfg.get("position_init", "published")),
        "seed": int(cfg["seed"]),
        "compile": bool(cfg.get("compile", False)),
        "uninformative_rewards": uninformative,
        "experiment_name": cfg["experiment_name"],
        "variant_name": cfg.get("variant_name"),
        "data": {k: v for k, v in dcfg.__dict__.items()},
    }
    module = MiroLightningModule(hparams, uncond_embedding=text_encoder.uncond_embedding().cpu())
    ckpt = _resume_path(cfg.get("resume"), ckpt_dir)
    if cfg.get("init_from") and ckpt is None:  # a resumed run already holds its own weights
        module.init_source = module.load_initial_weights(str(cfg["init_from"]), str(cfg.get("init_weights", "ema")),
                                                         strict=bool(cfg.get("init_strict", True)))
    object.__setattr__(module, "_text_encoder", text_encoder)
    callbacks = [checkpoint_callback(str(ckpt_dir), cfg["checkpoint"]["every_n_steps"],
                                     cfg["checkpoint"].get("keep_periodic", True)),
                 NonFiniteGuard(cfg["nonfinite"]["max_consecutive"]), Throughput()]
    il = cfg.get("image_logger") or {}
    if il.get("enabled"):
        from miro.train.testbed import load_testbed

        prompts, embs = load_testbed(il["testbed"], il.get("embeddings_dir"), mc.get("text_encoder", "minilm"))
        callbacks.append(TestbedImageLogger(prompts, str(ckpt_dir / "images"), il["every_n_steps"], il["num_steps"],
                                            il["guidance_scale"], int(cfg["seed"]), il["max_prompts"], embs,
                                            list(il.get("score_rewards") or []),
                                            None if il.get("weights", "ema") == "raw" else 0))
    logger = _logger(cfg["logger"], ckpt_dir)
    strategy = comp["strategy"]
    accum = int(cfg["trainer"].get("accumulate_grad_batches", 1))
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        if accum == 1:
            # static_graph (published): flow_loss builds the same autograd graph every step (the
            # self-conditioning pass runs under no_grad and is masked; dropout is torch.where), and
            # unused parameters (logvar_proj without reweighting) are handled once.
            strategy = DDPStrategy(static_graph=True, gradient_as_bucket_view=True, bucket_cap_mb=200)
        else:
            # static_graph trips an internal DDP assert under no_sync (Lightning's accumulation
            # steps; verified on torch 2.13 gloo), so accumulation uses find_unused_parameters.
            strategy = DDPStrategy(find_unused_parameters=True, gradient_as_bucket_view=True, bucket_cap_mb=200)
    tr = cfg["trainer"]
    trainer = Trainer(accelerator=comp["accelerator"], devices=comp["devices"], num_nodes=comp["num_nodes"],
                      max_time=_max_time(tr.get("max_time")),
                      precision=comp["precision"], strategy=strategy, max_steps=int(tr["max_steps"]),
                      accumulate_grad_batches=int(tr.get("accumulate_grad_batches", 1)),
                      gradient_clip_val=tr.get("gradient_clip_val"), log_every_n_steps=int(tr["log_every_n_steps"]),
                      callbacks=callbacks, logger=logger, use_distributed_sampler=False, default_root_dir=str(ckpt_dir),
                      enable_progress_bar=bool(tr.get("progress_bar", True)), limit_val_batches=0,
                      num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()])
    return module, dm, trainer, ckpt


def _max_time(value):
    """``trainer.max_time``: null, minutes (a number) or Lightning's "DD:HH:MM:SS" string."""
    if value in (None, "null", "none"):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"trainer.max_time={value!r}: minutes must be > 0")
        from datetime import timedelta

        return timedelta(minutes=float(value))
    parts = str(value).split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise ValueError(f"trainer.max_time={value!r}: expected minutes or \"DD:HH:MM:SS\" (e.g. 00:00:30:00)")
    return str(value)


def _logger(name, ckpt_dir: Path):
    if name in (None, "none", False):
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        # one version_<n>/ per (re)start: Lightning's CSV logger would overwrite an existing file
        return CSVLogger(str(ckpt_dir), name="logs")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(str(ckpt_dir), name="tb", version="")
    raise ValueError(f"logger must be csv, tensorboard or none; got {name!r}")


def _resume_path(resume, ckpt_dir: Path) -> str | None:
    if resume in (None, "null", "none", False):
        return None
    if resume == "auto":
        # last.ckpt, or a newer SLURM pre-emption checkpoint (Lightning writes hpc_ckpt_<n>.ckpt into
        # default_root_dir on SIGUSR1 before requeueing).
        cands = [p for p in [ckpt_dir / "last.ckpt", *ckpt_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        return str(max(cands, key=lambda p: p.stat().st_mtime)) if cands else None
    p = Path(str(resume))
    if not p.is_file():
        raise ValueError(f"resume={resume!r}: no such checkpoint file")
    return str(p)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        lines = []
        for name in experiments():
            from omegaconf import OmegaConf

            raw = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml")
            v = raw.get("variant_name")
            lines.append(f"  {name}" + (f"  [{v}]" if v else ""))
        print(HELP.format(experiments="\n".join(lines)))
        return 0
    p = argparse.ArgumentParser(prog="miro train", add_help=False)
    p.add_argument("--print-config", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("--")]
    if bad:
        print(f"miro train: unknown option(s) {bad}; see --help", file=sys.stderr)
        return 2
    load_dotenv()
    from omegaconf import OmegaConf

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"miro train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    cfg = OmegaConf.to_container(cfg, resolve=True)
    import warnings

    # Expected here: the EMA copies are in eval mode, and a resumed run reuses its checkpoint folder.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    try:
        module, dm, trainer, ckpt = build(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"miro train: error: {e}", file=sys.stderr)
        return 2
    print(f"miro train: experiment {cfg['experiment_name']} -> {cfg['checkpoint_dir']}; {len(dm.data):,} samples; "
          f"{'resuming from ' + ckpt if ckpt else 'starting fresh'}"
          + (f" from the weights of {module.init_source}" if getattr(module, "init_source", None) else ""), flush=True)
    if args.dry_run:
        print(f"dry run: {len(dm.data)} samples, {sum(p.numel() for p in module.model.parameters()):,} parameters, "
              f"resume from {ckpt}")
        return 0
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return 0
