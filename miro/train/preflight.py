"""The pre-flight of ``miro train``: every check that needs no data indexing, bin fitting or model
building, so that a bad config value is a one-line error naming its key (exit 2) before any work,
``--dry-run`` included; and the checkpoint folder's plan (resume, refuse, or replace).

:func:`preflight` runs them in order: the LR schedule, the ``data`` section, the optimisation
sections, the model config, ``data_dir``, then :func:`check_checkpoint_dir`.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path


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


def accumulation(cfg: dict) -> int:
    """Gradient-accumulation steps: ``trainer.accumulate_grad_batches`` when set, else derived from
    ``trainer.micro_batch_size`` (the most samples one device takes per forward, a property of the
    model's memory): the per-device share of ``data.global_batch_size`` over it, which must divide
    the share; 1 without either."""
    tr = cfg["trainer"]
    if tr.get("accumulate_grad_batches") is not None:
        return _int_key(cfg, "trainer.accumulate_grad_batches", 1)
    if tr.get("micro_batch_size") is None:
        return 1
    micro = _int_key(cfg, "trainer.micro_batch_size", 1)
    devices, nodes = _int_key(cfg, "computer.devices", 1), _int_key(cfg, "computer.num_nodes", 1)
    gbs = _int_key(cfg, "data.global_batch_size", 1)
    ranks = devices * nodes
    if gbs % ranks or gbs // ranks <= micro:  # (an uneven split is per_rank_batch's error)
        return 1
    if (gbs // ranks) % micro:
        raise ValueError(f"data.global_batch_size={gbs} over {ranks} device(s) does not split into micro-batches "
                         f"of trainer.micro_batch_size={micro}; pick a micro-batch that divides {gbs // ranks}, "
                         f"or set trainer.accumulate_grad_batches")
    return gbs // ranks // micro


def per_rank_batch(cfg: dict) -> int:
    """Samples per device per forward: ``data.global_batch_size`` / (devices x nodes x accumulation)."""
    devices, nodes = _int_key(cfg, "computer.devices", 1), _int_key(cfg, "computer.num_nodes", 1)
    accum = accumulation(cfg)
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




LOGGERS = ("csv", "tensorboard", "none")  # _logger


# data keys filled in from other sections (rewards.*, data_dir, seed) or derived (batch_size)
_DERIVED_DATA_KEYS = {"data_dir", "reward_keys", "num_bins", "bin_ties", "bins_sample_size", "bins_path", "bins_cache",
                      "batch_size", "seed"}


_STEP_CKPT = re.compile(r"^step=(\d+)\.ckpt$")  # checkpoint_callback's file name


def _bool_key(cfg: dict, key: str) -> bool:
    value = _lookup(cfg, key)
    if not isinstance(value, bool):
        raise ValueError(f"{key}={_show(value)} is not a boolean; expected true or false")
    return value


def check_data(cfg: dict) -> None:
    """The ``data`` section: known keys, types, ranges and choices."""
    from dataclasses import fields

    from miro.data.datamodule import DataConfig, check_config

    d = dict(cfg["data"])
    allowed = {f.name for f in fields(DataConfig)} - _DERIVED_DATA_KEYS
    unknown = sorted(set(d) - allowed - {"global_batch_size"})
    if unknown:
        raise ValueError(f"unknown data keys {unknown}; allowed: {sorted(allowed | {'global_batch_size'})}")
    per_rank_batch(cfg)  # data.global_batch_size >= 1 and divisible by devices x nodes x accumulation
    # The value rules of DataConfig are the datamodule's own: one rule set for the CLI and the Python API.
    try:
        check_config(DataConfig(**{k: v for k, v in d.items() if k in allowed}))
    except ValueError as e:
        raise ValueError(f"data.{e}") from None
    if "num_workers" in d:
        _int_key(cfg, "data.num_workers", 0)
    for key in ("hflip", "shuffle", "pad_to_max_text_len"):
        if key in d:
            _bool_key(cfg, f"data.{key}")


def check_optimization(cfg: dict) -> None:
    """``optimizer``, ``scheduler``, ``loss``, ``ema_decays``, ``rewards`` and the trainer's numbers."""
    from miro.models import LossConfig
    from miro.rewards.binning import TIE_RULES, check_tie_rules
    from miro.train.module import _dataclass_from
    from miro.train.optim import OPTIMIZERS, OptimizerConfig, SchedulerConfig

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
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={_show(name)} must be one of {list(OPTIMIZERS)}")
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


# Sections whose keys config.yaml lists in full: a key it lacks can only come from a `+key=`
# override, which Hydra suggests for any typo (`+trainer.max_stepz=3`), and would be ignored.
_CLOSED_SECTIONS = ("trainer", "checkpoint", "nonfinite", "image_logger")
POSITION_INITS = ("published", "sincos")  # miro.models.RIN.init_position_table
INIT_WEIGHTS = ("ema", "raw")  # MiroLightningModule.load_initial_weights
LOGGER_WEIGHTS = ("ema", "raw")  # TestbedImageLogger: the first EMA copy or the training weights


def _root_defaults() -> dict:
    import yaml

    from miro.train.cli import CONFIG_DIR

    return yaml.safe_load((CONFIG_DIR / "config.yaml").read_text(encoding="utf-8"))


def check_run_options(cfg: dict) -> None:
    """The keys around the optimisation: switches, warm start, the image logger, and keys that
    config.yaml does not know (a ``+`` typo), so that none fails only after the data is indexed
    and the bins fitted, or is silently ignored."""
    root = _root_defaults()
    groups = {k for d in root["defaults"] if isinstance(d, dict) for k in d}  # model, data, computer, ...
    known = (set(root) | groups) - {"defaults", "experiment"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; allowed: {sorted(known)}")
    for section in _CLOSED_SECTIONS:
        extra = sorted(set(cfg.get(section) or {}) - set(root[section]))
        if extra:
            raise ValueError(f"unknown {section} key(s) {extra}; allowed: {sorted(root[section])}")
    for key in ("ema_warmup", "compile", "init_strict"):
        if key in cfg:
            _bool_key(cfg, key)
    for key, allowed in (("position_init", POSITION_INITS), ("init_weights", INIT_WEIGHTS)):
        if cfg.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{key}={_show(cfg[key])} is not one of {', '.join(allowed)}")
    if cfg.get("compile") is True:
        # torch.compile(fullgraph=True) cannot trace the torch.Generator these draws take
        # (Dynamo: "Failed to convert args/kwargs to proxy ... Generator").
        from miro.models.configs import RANDOM_DROPS

        net = model_config(cfg).get("network", {})
        drawn = [f"network.{k}={net[k]}" for k in RANDOM_DROPS if net.get(k)]
        if drawn:
            raise ValueError(f"compile=true cannot trace the seeded random draws of {', '.join(drawn)}; "
                             f"set compile=false, or those to 0")
    if cfg.get("logger") == "tensorboard":
        import importlib.util

        if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
            raise ValueError("logger=tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or use logger=csv)")
    opt = cfg["optimizer"]
    if str(opt.get("name", "")).lower() == "adamw" and opt.get("decouple") is True:
        raise ValueError("optimizer.decouple=true applies to lamb only: AdamW's weight decay is always its own "
                         "decoupled, lr-scaled one (leave optimizer.decouple=false)")
    il = cfg.get("image_logger") or {}
    if "enabled" in il:
        _bool_key(cfg, "image_logger.enabled")
    if not il.get("enabled"):
        return
    for key in ("every_n_steps", "num_steps", "max_prompts"):
        _int_key(cfg, f"image_logger.{key}", 1)
    _float_key(cfg, "image_logger.guidance_scale", 0.0)
    if il.get("weights", "ema") not in LOGGER_WEIGHTS:
        raise ValueError(f"image_logger.weights={_show(il['weights'])} is not one of {', '.join(LOGGER_WEIGHTS)}")
    from miro.rewards import available
    from miro.train.testbed import testbed_dir

    names = il.get("score_rewards") or []
    bad = [n for n in names if n not in available()] if isinstance(names, (list, tuple)) else [names]
    if bad:
        raise ValueError(f"image_logger.score_rewards: {_show(bad)} not among the rewards ({', '.join(available())})")
    try:
        testbed_dir(str(il.get("testbed")))
    except ValueError as e:
        raise ValueError(f"image_logger.{e}") from None


def _check_init_source(source: str) -> None:
    """``init_from`` of a fresh run: an existing ``.ckpt``, or a pipeline found locally (a hub id is
    fetched when the module loads it)."""
    from miro.hub import check_local_pipeline

    if source.endswith(".ckpt"):
        if not Path(source).is_file():
            raise ValueError(f"init_from={source} does not exist; give a miro train .ckpt or a pipeline "
                             "(built-in name, folder, hub id)")
    else:
        try:
            check_local_pipeline(source)
        except ValueError as e:
            raise ValueError(f"init_from={source}: {e}") from None


def step_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(k, path)`` of the ``step=<k>.ckpt`` files in ``ckpt_dir``, by step."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_CKPT.match(p.name)) and p.is_file()]
    return sorted(found)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint was saved at (:func:`open_checkpoint`)."""
    return int(open_checkpoint(path).get("global_step", 0))


def open_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint read with ``mmap`` (tensors stay on disk, so this costs milliseconds
    even for the release model); a file that does not load that way goes through
    :func:`miro.train.convert.load_checkpoint`, whose ValueError names the file."""
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
    return ckpt


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
            head = open_checkpoint(ckpt)
        except ValueError as e:
            others = [p for _, p in steps if p.resolve() != Path(ckpt).resolve()]
            if others:
                hint = (f"resume from a step checkpoint instead: {_override('resume', others[-1])} "
                        f"(step checkpoints here: {', '.join(p.name for p in others)})")
            else:
                hint = (f"{ckpt_dir} holds no step=<k>.ckpt to fall back on: give the run a new experiment_name, "
                        f"or start over in this folder with resume=null checkpoint.overwrite=true")
            raise ValueError(f"resume={_show(resume)}: {e}; {hint}") from None
        # The module refuses another architecture too, but only inside trainer.fit, after the data
        # is indexed and the bins fitted: the checkpoint records its model config, so compare now.
        from miro.train.module import _config_diff

        saved = (head.get("miro") or {}).get("model_config")
        diff = _config_diff(saved, model_config(cfg)) if saved is not None else []
        if diff:
            raise ValueError(f"resume={_show(resume)}: {ckpt} was trained with another model config ("
                             + "; ".join(diff[:3]) + "); resume with the original config, give this run its own "
                             "experiment_name, or start over here with resume=null checkpoint.overwrite=true")
        # Lightning restores the optimizer's groups (lr, weight decay, betas...) with its state, so a
        # changed optimizer.* would be ignored while the run's hparams claimed it.
        saved_opt = (head.get("hyper_parameters") or {}).get("optimizer")
        now_opt = dict(cfg.get("optimizer") or {})
        # keys both know: a key added to the config since the checkpoint (at its default) is no change
        changed = [k for k in sorted(set(saved_opt or {}) & set(now_opt)) if saved_opt[k] != now_opt[k]]
        if changed:
            k = changed[0]
            raise ValueError(f"resume={_show(resume)}: {ckpt} was trained with optimizer.{k}={saved_opt.get(k)!r}, "
                             f"not {now_opt.get(k)!r} (a resumed run restores its optimizer's settings with its "
                             f"state, so the change would be ignored); resume with the original value, or start a "
                             f"new run from these weights with init_from={ckpt} (a fresh optimizer)")
        _check_time_left(head, cfg, ckpt)
        return {"resume": ckpt, "resume_step": int(head.get("global_step", 0)), "replace": []}
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
        if last.is_file():  # (resume=null: resume=auto would find it)
            cont = "continue it with resume=auto (the default)"
        else:  # no last.ckpt for resume=auto to continue from: the newest snapshot
            cont = f"continue it with {_override('resume', steps[-1][1])}" if steps else "continue it with resume=PATH"
        raise ValueError(f"resume={_show(resume)} would start a fresh run in {ckpt_dir}, which already holds "
                         f"{' and '.join(found) or 'checkpoints'}: {cont}, give this run its own experiment_name=NAME, "
                         f"or replace the old checkpoints with checkpoint.overwrite=true")
    return {"resume": None, "resume_step": None, "replace": old}


def uncond_source(cfg: dict) -> Path | None:
    """The file holding the empty prompt's embedding for a fresh run: ``text_uncond`` when set, else
    the testbed's ``uncond.<schema>_embeddings.npy`` in ``image_logger.embeddings_dir`` (written by
    ``miro testbed precompute``) when there is one; None: the text encoder computes it, which loads
    the encoder (FLAN-T5-XL at full scale) into the training job."""
    import numpy as np

    from miro.data.schema import text_embedding_name

    mc = model_config(cfg)
    if cfg.get("text_uncond"):
        path = Path(str(cfg["text_uncond"]))
        if not path.is_file():
            raise ValueError(f"text_uncond={_show(cfg['text_uncond'])} is not a file; give the .npy of the empty "
                             "prompt's embedding (e.g. the uncond file of `miro testbed precompute`) or null")
    else:
        il = cfg.get("image_logger") or {}
        if not il.get("embeddings_dir"):
            return None
        path = Path(str(il["embeddings_dir"])) / f"uncond.{text_embedding_name(mc.get('text_encoder', 'minilm'))}"
        if not path.is_file():
            return None
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npy file ({e})") from None
    width = int(mc["network"]["label_dim"])
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or shape[1] != width or shape[0] < 1:
        raise ValueError(f"{path} holds an array of shape {tuple(shape)}; the empty prompt's embedding must be "
                         f"(tokens, {width}) for this model's text width (label_dim)")
    return path


def accelerator_problem(cfg: dict) -> str | None:
    """Why this machine cannot run ``computer``'s accelerator (no CUDA device for ``gpu``), or None."""
    comp = cfg["computer"]
    if str(comp.get("accelerator")) in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            return (f"computer.accelerator={comp['accelerator']} ({comp['devices']} GPU(s) x {comp['num_nodes']} "
                    f"node(s)) but this machine has no CUDA device; use computer=cpu here")
    return None


def preflight(cfg: dict, dry_run: bool = False) -> dict:
    """Every check that needs no data indexing, bin fitting or model building, in that order:
    config values, ``data_dir``, the accelerator (not under ``dry_run``: a login node may check a
    GPU config), then the checkpoint folder (:func:`check_checkpoint_dir`, whose plan it
    returns). Raises ValueError with a one-line message naming the key."""
    check_schedule(cfg)
    check_data(cfg)
    check_optimization(cfg)
    check_run_options(cfg)
    model_config(cfg)  # the model name and rewards.keys
    uncond_source(cfg)
    data_dir = cfg.get("data_dir")
    if not data_dir or not Path(str(data_dir)).exists():
        raise ValueError(f"data_dir={_show(data_dir)} does not exist (set data_dir= or MIRO_DATA_DIR)")
    problem = None if dry_run else accelerator_problem(cfg)
    if problem:
        raise ValueError(problem)
    plan = check_checkpoint_dir(cfg)
    if cfg.get("init_from") and plan["resume"] is None:  # a resumed run keeps its own weights
        _check_init_source(str(cfg["init_from"]))
    return plan


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


def _check_time_left(head: dict, cfg: dict, ckpt) -> None:
    """Refuse a resume whose ``trainer.max_time`` the checkpoint has already spent: Lightning's timer
    restores its clock, so the run would stop at once, train nothing and exit 0 (a restart loop
    would go round for ever)."""
    from datetime import timedelta

    budget = _max_time((cfg.get("trainer") or {}).get("max_time"))
    if isinstance(budget, str):  # "DD:HH:MM:SS"
        d, h, m, sec = (int(x) for x in budget.split(":"))
        budget = timedelta(days=d, hours=h, minutes=m, seconds=sec)
    spent = (((head.get("callbacks") or {}).get("Timer") or {}).get("time_elapsed") or {}).get("train")
    if budget is not None and isinstance(spent, (int, float)) and spent >= budget.total_seconds():
        raise ValueError(f"{ckpt} has trained for {spent / 60:.1f} minutes, which trainer.max_time="
                         f"{cfg['trainer']['max_time']} allows in all (the clock is saved in the checkpoint and counts "
                         f"across resumes): raise trainer.max_time, or set it to null, to continue")


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
