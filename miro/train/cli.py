"""``miro train experiment=<name> [key=value ...]``: Hydra-composed, Lightning-run training.

The configs ship as package data (``miro/configs/``); they are composed with Hydra's compose API
(no working-directory change, no per-rank run folders under DDP), resolved to plain containers,
and turned into a :class:`~miro.train.module.MiroLightningModule`, a
:class:`~miro.data.datamodule.MiroDataModule` and a Lightning ``Trainer``. Site values come from
the environment (``MIRO_DATA_DIR``, ``MIRO_ROOT_DIR``, ...); a ``.env`` file in the working
directory is read first (variables already set win).

Resume: with ``resume=auto`` (default) a run whose checkpoint folder holds ``last.ckpt``
continues from it: weights, EMA, optimizer, scheduler, step and the exact data position.
``resume=null`` starts fresh, and refuses to start where the checkpoint folder already holds checkpoints
unless ``checkpoint.overwrite=true`` (which deletes them first).

Pre-flight (:func:`preflight`): every config value, ``data_dir`` and the checkpoint folder are
checked before any data indexing, bin fitting or model building; a bad one is a one-line error
naming the key (exit 2).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
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
  resume=auto|null|PATH      continue from last.ckpt (auto), start fresh (null) or from a given .ckpt;
                             a fresh start where checkpoints exist needs checkpoint.overwrite=true (deletes them)
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
    devices, nodes = _int_key(cfg, "computer.devices", 1), _int_key(cfg, "computer.num_nodes", 1)
    accum = _int_key(cfg, "trainer.accumulate_grad_batches", 1) if "accumulate_grad_batches" in cfg["trainer"] else 1
    gbs = _int_key(cfg, "data.global_batch_size", 1)
    if gbs % (devices * nodes * accum):
        raise ValueError(f"data.global_batch_size={gbs} is not divisible by devices x nodes x accumulation "
                         f"= {devices} x {nodes} x {accum} = {devices * nodes * accum}")
    return gbs // (devices * nodes * accum)


def _lookup(cfg: dict, key: str):
    value = cfg
    for part in key.split("."):
        value = value[part]
    return value


def _show(value) -> str:
    """A value as it is written on the command line (``abc``, ``-1``, ``[0.9, x]``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _int_key(cfg: dict, key: str, minimum: int | None = None) -> int:
    """The integer at dotted ``key`` (``trainer.max_steps``); a ValueError naming the key otherwise."""
    value = _lookup(cfg, key)
    if isinstance(value, float) and value.is_integer():  # 1e5 on the command line is a float to Hydra
        out = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        out = value
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        out = int(value)
    else:
        raise ValueError(f"{key}={value!r} is not an integer" + (f"; expected an integer >= {minimum}"
                                                                 if minimum is not None else ""))
    if minimum is not None and out < minimum:
        raise ValueError(f"{key}={out} must be >= {minimum}")
    return out


def _float_key(cfg: dict, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               hi_open: bool = False, example: str | None = None) -> float:
    """The finite number at dotted ``key`` within [lo, hi] (open ends when asked); a ValueError naming
    the key, the value and the allowed range otherwise."""
    value = _lookup(cfg, key)
    rng = ""
    if lo is not None and hi is not None:
        rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f"{'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        rng = f"{'<' if hi_open else '<='} {hi:g}"
    hint = f" (e.g. {key}={example})" if example else ""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ValueError(f"{key}={_show(value)} is not a number; expected a number {rng}{hint}".rstrip())
    v = float(value)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
        raise ValueError(f"{key}={_show(value)} must be {rng}{hint}")
    return v


def _choice_key(cfg: dict, key: str, allowed) -> str:
    value = _lookup(cfg, key)
    if value not in allowed:
        raise ValueError(f"{key}={_show(value)} is not one of {', '.join(map(str, allowed))}")
    return value


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


# Values the datamodule checks with literals of its own (miro.data.datamodule exports no constant
# for them): MiroDataModule.train_dataloader (mode), MiroSampleDecoder (image_source, text_source;
# "auto" is resolved in MiroDataModule.prepare).
DATA_CHOICES = {"mode": ("indexed", "resampled"), "image_source": ("latents", "pixels"),
                "text_source": ("precomputed", "on_the_fly", "auto")}
LOGGERS = ("csv", "tensorboard", "none")  # _logger
# data keys filled in from other sections (rewards.*, data_dir, seed) or derived (batch_size)
_DERIVED_DATA_KEYS = {"data_dir", "reward_keys", "num_bins", "bin_ties", "bins_sample_size", "bins_path", "batch_size",
                      "seed"}
_STEP_CKPT = re.compile(r"^step=(\d+)\.ckpt$")  # checkpoint_callback's file name


def _bool_key(cfg: dict, key: str) -> bool:
    value = _lookup(cfg, key)
    if not isinstance(value, bool):
        raise ValueError(f"{key}={_show(value)} is not a boolean; expected true or false")
    return value


def check_data(cfg: dict) -> None:
    """The ``data`` section: known keys, types, ranges and choices."""
    from dataclasses import fields

    from miro.data.datamodule import DataConfig

    d = dict(cfg["data"])
    allowed = {f.name for f in fields(DataConfig)} - _DERIVED_DATA_KEYS
    unknown = sorted(set(d) - allowed - {"global_batch_size"})
    if unknown:
        raise ValueError(f"unknown data keys {unknown}; allowed: {sorted(allowed | {'global_batch_size'})}")
    per_rank_batch(cfg)  # data.global_batch_size >= 1 and divisible by devices x nodes x accumulation
    for key, choices in DATA_CHOICES.items():
        if key in d:
            _choice_key(cfg, f"data.{key}", choices)
    if d.get("image_size") is not None:
        v = d["image_size"]
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"data.image_size={_show(v)} must be an integer >= 1 (pixels) or null")
    for key, minimum in (("num_workers", 0), ("max_text_len", 1), ("shuffle_buffer", 1), ("max_corrupt_retries", 0),
                         ("latent_resolution", 1)):
        if key in d:
            _int_key(cfg, f"data.{key}", minimum)
    if "synthetic_caption_rate" in d:
        _float_key(cfg, "data.synthetic_caption_rate", 0.0, 1.0, example="0.5")
    for key in ("hflip", "shuffle", "pad_to_max_text_len"):
        if key in d:
            _bool_key(cfg, f"data.{key}")


def check_optimization(cfg: dict) -> None:
    """``optimizer``, ``scheduler``, ``loss``, ``ema_decays``, ``rewards`` and the trainer's numbers."""
    import torch

    from miro.models import LossConfig
    from miro.rewards.binning import TIE_RULES, check_tie_rules
    from miro.train.module import _dataclass_from
    from miro.train.optim import OptimizerConfig, SchedulerConfig, build_optimizer

    for cls, section in ((OptimizerConfig, "optimizer"), (SchedulerConfig, "scheduler"), (LossConfig, "loss")):
        _dataclass_from(cls, cfg.get(section), section)  # unknown keys, named
    opt = cfg["optimizer"]
    if "lr" in opt:
        _float_key(cfg, "optimizer.lr", 0.0, example="5e-4")
    for key in ("weight_decay", "eps"):
        if key in opt:
            _float_key(cfg, f"optimizer.{key}", 0.0)
    if "betas" in opt:
        b = opt["betas"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x < 1.0 for x in b)):
            raise ValueError(f"optimizer.betas={_show(b)} must be two numbers in [0, 1) "
                             f"(e.g. optimizer.betas=[0.9,0.999])")
    if "decouple" in opt:
        _bool_key(cfg, "optimizer.decouple")
    name = opt.get("name", OptimizerConfig.name)
    try:  # the factory is the authority on optimizer names: ask it, with a one-parameter model
        build_optimizer(torch.nn.Linear(1, 1), OptimizerConfig(name=str(name)))
    except (ValueError, AttributeError) as e:
        raise ValueError(f"optimizer.name={_show(name)}: {re.sub(r';? got .*$', '', str(e))}") from None
    if "rate" in cfg["scheduler"]:
        _float_key(cfg, "scheduler.rate", 0.0)
    decays = cfg.get("ema_decays")
    values = decays if isinstance(decays, (list, tuple)) else [decays]
    if not values or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x < 1.0
                             for x in values) or len(set(values)) != len(values):
        raise ValueError(f"ema_decays={_show(decays)} must be a list of distinct decays in [0, 1), the first exported "
                         f"(e.g. ema_decays=[0.999,0.9999])")
    rw = cfg["rewards"]
    keys = rw.get("keys")
    if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"rewards.keys={_show(keys)} must be a list of reward names (e.g. rewards.keys=[clip_score])")
    _int_key(cfg, "rewards.num_bins", 2)
    _int_key(cfg, "rewards.bins_sample_size", 1)
    if "uninformative" in rw:
        _bool_key(cfg, "rewards.uninformative")
    ties = rw.get("ties", "midrank")
    if isinstance(ties, str) and ties not in TIE_RULES:
        raise ValueError(f"rewards.ties={ties} is not one of {', '.join(TIE_RULES)} "
                         f"(or one rule per reward: 'rewards.ties={{{keys[0] if keys else 'key'}:spread}}')")
    try:
        check_tie_rules(ties, [] if rw.get("uninformative") else list(keys))
    except ValueError as e:
        raise ValueError(f"rewards.ties={_show(ties)}: {e}") from None
    tr = cfg["trainer"]
    _int_key(cfg, "trainer.log_every_n_steps", 1)
    if tr.get("gradient_clip_val") is not None:
        _float_key(cfg, "trainer.gradient_clip_val", 0.0)
    _max_time(tr.get("max_time"))
    _int_key(cfg, "checkpoint.every_n_steps", 1)
    for key in ("keep_periodic", "overwrite"):
        if key in cfg["checkpoint"]:
            _bool_key(cfg, f"checkpoint.{key}")
    _int_key(cfg, "nonfinite.max_consecutive", 1)
    _int_key(cfg, "seed")
    if cfg["computer"].get("threads") is not None:
        _int_key(cfg, "computer.threads", 1)
    logger = cfg.get("logger")
    if logger not in (None, False) and logger not in LOGGERS:
        raise ValueError(f"logger={_show(logger)} is not one of {', '.join(LOGGERS)}")


def step_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(k, path)`` of the ``step=<k>.ckpt`` files in ``ckpt_dir``, by step."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_CKPT.match(p.name)) and p.is_file()]
    return sorted(found)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint was saved at. Read with ``mmap`` (tensors stay on disk, so
    this costs milliseconds even for the release model); a file that does not load that way goes
    through :func:`miro.train.convert.load_checkpoint`, whose ValueError names the file."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - truncated or foreign bytes; or a legacy (non-zip) file that loads without mmap
        from miro.train.convert import load_checkpoint

        try:
            ckpt = load_checkpoint(path)
        except ValueError as e:
            cause = e.__cause__
            if cause is None:
                raise
            first = re.split(r"(?<=\.)\s", (str(cause).strip().splitlines() or [""])[0])[0][:160]
            raise ValueError(f"{path} is not a readable checkpoint (truncated or damaged: "
                             f"{type(cause).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict); was it written by `miro train`?")
    return int(ckpt.get("global_step", 0))


def _override(key: str, value) -> str:
    """``key=value`` as typed in a shell: quoted for Hydra when the value holds '=' (step=<k>.ckpt)."""
    text = str(value)
    return f"\"{key}='{text}'\"" if re.search(r"[=\s,:\[\]{}()'\\]", text) else f"{key}={text}"


def check_checkpoint_dir(cfg: dict) -> dict:
    """What the run does with its checkpoint folder, refused when it would lose or cannot read a
    checkpoint: ``{"resume": path | None, "resume_step": k | None, "replace": [old files]}``.

    * resuming (``resume=auto`` finding ``last.ckpt``, or ``resume=PATH``): the file must load;
    * starting fresh in a folder that already holds ``last.ckpt`` or ``step=<k>.ckpt`` files would
      overwrite some of them and leave the others beside the new run: refused unless
      ``checkpoint.overwrite=true``, which removes them first (``replace``)."""
    ckpt_dir = Path(cfg["checkpoint_dir"])
    resume = cfg.get("resume")
    steps = step_checkpoints(ckpt_dir)
    ckpt = _resume_path(resume, ckpt_dir)
    if ckpt is not None:
        try:
            step = checkpoint_step(ckpt)
        except ValueError as e:
            others = [p for _, p in steps if p.resolve() != Path(ckpt).resolve()]
            if others:
                hint = (f"resume from a step checkpoint instead: {_override('resume', others[-1])} "
                        f"(step checkpoints here: {', '.join(p.name for p in others)})")
            else:
                hint = (f"{ckpt_dir} holds no step=<k>.ckpt to fall back on: give the run a new experiment_name, "
                        f"or start over in this folder with resume=null checkpoint.overwrite=true")
            raise ValueError(f"resume={_show(resume)}: {e}; {hint}") from None
        return {"resume": ckpt, "resume_step": step, "replace": []}
    last = ckpt_dir / "last.ckpt"
    old = ([last] if last.is_file() else []) + sorted(ckpt_dir.glob("hpc_ckpt_*.ckpt")) + [p for _, p in steps]
    if old and not cfg["checkpoint"].get("overwrite", False):
        found = []
        if last.is_file():
            try:
                found.append(f"last.ckpt at step {checkpoint_step(last)}")
            except ValueError:
                found.append("an unreadable last.ckpt")
        if steps:
            found.append(f"step={'/'.join(str(k) for k, _ in steps)}.ckpt")
        if resume in (None, "null", "none", False):
            cont = "continue it with resume=auto (the default)"
        else:  # resume=auto without last.ckpt
            cont = f"continue it with {_override('resume', steps[-1][1])}" if steps else "continue it with resume=PATH"
        raise ValueError(f"resume={_show(resume)} would start a fresh run in {ckpt_dir}, which already holds "
                         f"{' and '.join(found) or 'checkpoints'}: {cont}, give this run its own experiment_name=NAME, "
                         f"or replace the old checkpoints with checkpoint.overwrite=true")
    return {"resume": None, "resume_step": None, "replace": old}


def preflight(cfg: dict) -> dict:
    """Every check that needs no data indexing, bin fitting or model building, in that order:
    config values, ``data_dir``, then the checkpoint folder (:func:`check_checkpoint_dir`, whose
    plan it returns). Raises ValueError with a one-line message naming the key."""
    check_schedule(cfg)
    check_data(cfg)
    check_optimization(cfg)
    model_config(cfg)  # the model name and rewards.keys
    data_dir = cfg.get("data_dir")
    if not data_dir or not Path(str(data_dir)).exists():
        raise ValueError(f"data_dir={_show(data_dir)} does not exist (set data_dir= or MIRO_DATA_DIR)")
    return check_checkpoint_dir(cfg)


def remove_stale_temps(ckpt_dir: Path) -> int:
    """Delete the temp files that a run killed inside an atomic save left in its checkpoint folder
    (``.{name}.<random>.tmp``, :func:`miro.io.atomic_path`): checkpoints, reward bins, image grids."""
    from miro.data.shard_files import remove_stale_temps as remove

    if not ckpt_dir.is_dir():
        return 0
    n = remove(ckpt_dir, "*.ckpt") + remove(ckpt_dir, "reward_bins.json")
    if (ckpt_dir / "images").is_dir():
        n += remove(ckpt_dir / "images", "*.png")
    return n


def replace_old_checkpoints(plan: dict) -> int:
    """``checkpoint.overwrite=true``: remove the previous run's checkpoints before the fresh one starts."""
    n = 0
    for p in plan.get("replace") or []:
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def build(cfg: dict, plan: dict | None = None):
    """(module, datamodule, trainer, ckpt_path) from a resolved config dict. ``plan``: what
    :func:`preflight` returned for ``cfg`` (run here when not given)."""
    import torch
    from lightning.pytorch import Trainer

    from miro.data.datamodule import DataConfig, MiroDataModule
    from miro.train.callbacks import (AtomicCheckpointIO, NonFiniteGuard, TestbedImageLogger, Throughput,
                                      checkpoint_callback)
    from miro.train.module import MiroLightningModule

    if plan is None:
        plan = preflight(cfg)
    comp = cfg["computer"]
    if comp.get("threads"):
        torch.set_num_threads(int(comp["threads"]))
    ckpt_dir = Path(cfg["checkpoint_dir"])
    mc = model_config(cfg)
    d = dict(cfg["data"])
    d.pop("global_batch_size", None)
    uninformative = bool(cfg["rewards"].get("uninformative", False))
    dcfg = DataConfig(data_dir=str(cfg["data_dir"]), reward_keys=[] if uninformative else list(cfg["rewards"]["keys"]),
                      num_bins=int(cfg["rewards"]["num_bins"]), bin_ties=cfg["rewards"].get("ties", "midrank"),
                      bins_sample_size=int(cfg["rewards"]["bins_sample_size"]),
                      bins_path=str(ckpt_dir / "reward_bins.json"), batch_size=per_rank_batch(cfg),
                      seed=int(cfg["seed"]), **d)
    dm = MiroDataModule(dcfg)
    try:
        # trainer.progress_bar=false: no bars in log files
        dm.prepare(progress=bool(cfg["trainer"].get("progress_bar", True)))
    except ValueError as e:  # the datamodule's own name for rewards.keys is reward_keys
        raise ValueError(str(e).replace("`reward_keys`", "`rewards.keys`")) from None
    from miro.encoders import load_text_encoder

    # Needed for the null-text embedding (text dropout, CFG) and for on-the-fly captions.
    text_encoder = load_text_encoder(mc.get("text_encoder", "minilm"), max_length=int(mc.get("max_text_len", 77)))
    hparams = {
        "model_config": mc,
        "loss": dict(cfg["loss"]),
        "optimizer": dict(cfg["optimizer"]),
        "scheduler": dict(cfg["scheduler"]),
        "ema_decays": [float(d) for d in (cfg["ema_decays"] if isinstance(cfg["ema_decays"], (list, tuple))
                                          else [cfg["ema_decays"]])],
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
    ckpt = plan["resume"]
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
        print(f"miro train: error: {hydra_message(e)}", file=sys.stderr)
        return 2
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    try:
        cfg = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        print(f"miro train: error: {hydra_message(e)}", file=sys.stderr)
        return 2
    if not _names_experiment(overrides):
        print(f"miro train: no experiment= given: using the root config (the release recipe, experiment_name="
              f"{cfg['experiment_name']}, {len(cfg['rewards']['keys'])} rewards); choose one with experiment=NAME "
              f"(miro train --help lists them)", file=sys.stderr, flush=True)
    import warnings

    # Expected here: the EMA copies are in eval mode, and a resumed run reuses its checkpoint folder.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    try:
        plan = preflight(cfg)
        module, dm, trainer, ckpt = build(cfg, plan)
    except (ValueError, FileNotFoundError) as e:
        print(f"miro train: error: {e}", file=sys.stderr)
        return 2
    if ckpt:
        start = f"resuming from {ckpt} at step {plan['resume_step']}"
    elif plan["replace"]:
        start = (f"starting fresh, replacing {len(plan['replace'])} checkpoint(s) of the previous run "
                 f"(checkpoint.overwrite=true)")
    else:
        start = "starting fresh"
    print(f"miro train: experiment {cfg['experiment_name']} -> {cfg['checkpoint_dir']}; {len(dm.data):,} samples; "
          f"{start}"
          + (f" from the weights of {module.init_source}" if getattr(module, "init_source", None) else ""), flush=True)
    if args.dry_run:
        print(f"dry run: {len(dm.data)} samples, {sum(p.numel() for p in module.model.parameters()):,} parameters, "
              f"resume from {ckpt}" + (f" (step {plan['resume_step']})" if ckpt else ""))
        return 0
    ckpt_dir = Path(cfg["checkpoint_dir"])
    removed = remove_stale_temps(ckpt_dir)
    if removed:
        print(f"miro train: removed {removed} stale temp file(s) (.*.tmp) that an interrupted save left in {ckpt_dir}",
              flush=True)
    replace_old_checkpoints(plan)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return 0


def _names_experiment(overrides: list[str]) -> bool:
    """Whether the command line picks an experiment (``experiment=``, ``+experiment=``, not ``~experiment``)."""
    return any(o.split("=", 1)[0].lstrip("+") == "experiment" and "=" in o for o in overrides)


def hydra_message(e: Exception) -> str:
    """Hydra's or OmegaConf's error on one line, without the config search path; an unknown config
    group choice (``experiment=nope``) lists the valid names."""
    text = str(e)
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m and (CONFIG_DIR / m.group(1)).is_dir():
        group, name = m.groups()
        names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        return f"{group}={name}: no such config; choose from {', '.join(names)}"
    text = text.split("Config search path:")[0]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if "mismatched input '='" in text:
        text += " (a value that holds '=' must be quoted: \"resume='path/step=4.ckpt'\")"
    return text
