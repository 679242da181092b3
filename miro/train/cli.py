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

Pre-flight (:func:`miro.train.preflight.preflight`): every config value, ``data_dir`` and the checkpoint folder are
checked before any data indexing, bin fitting or model building; a bad one is a one-line error
naming the key (exit 2).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from miro.train.preflight import (_max_time, accelerator_problem, accumulation, model_config, open_checkpoint,
                                  per_rank_batch, preflight, remove_stale_temps, replace_old_checkpoints,
                                  uncond_source)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

HELP = """usage: miro train experiment=<name> [key=value ...] [--print-config] [--dry-run] [--write-sbatch FILE]

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
  --dry-run                  build data and model, then exit without training
  --write-sbatch FILE        write an sbatch script that runs this command with srun on
                             computer.num_nodes x computer.devices GPUs (partition, account and time
                             from MIRO_SLURM_PARTITION/ACCOUNT/TIME), then exit; submit it with sbatch
  -h, --help                 show this help
"""


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


def build(cfg: dict, plan: dict | None = None, with_trainer: bool = True):
    """(module, datamodule, trainer, ckpt_path) from a resolved config dict. ``plan``: what
    :func:`preflight` returned for ``cfg`` (run here when not given). ``with_trainer=False`` (a dry
    run) leaves the trainer None, so a GPU config can be checked on a machine without GPUs."""
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
                      # A resumed run keeps its bins; checkpoint.overwrite=true fits the new run's own, and
                      # its dry run leaves the old run's file alone (it deletes nothing).
                      bins_path=None if plan["replace"] and not with_trainer else str(ckpt_dir / "reward_bins.json"),
                      bins_cache="keep" if plan["resume"] else "refit" if plan["replace"] else "reuse",
                      batch_size=per_rank_batch(cfg),
                      seed=int(cfg["seed"]), **d)
    dm = MiroDataModule(dcfg)
    try:
        # trainer.progress_bar=false: no bars in log files
        dm.prepare(progress=bool(cfg["trainer"].get("progress_bar", True)))
    except ValueError as e:  # the datamodule's own name for rewards.keys is reward_keys
        raise ValueError(str(e).replace("`reward_keys`", "`rewards.keys`")) from None
    from miro.encoders import load_text_encoder

    # Built lazily: its weights load only for on-the-fly captions, a testbed without precomputed
    # embeddings, or the empty prompt's embedding when no file holds it (uncond_source).
    text_encoder = load_text_encoder(mc.get("text_encoder", "minilm"), max_length=int(mc.get("max_text_len", 77)))
    uncond = _uncond_embedding(cfg, text_encoder, plan["resume"])
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
    module = MiroLightningModule(hparams, uncond_embedding=uncond)
    ckpt = plan["resume"]
    if cfg.get("init_from") and ckpt is None:  # a resumed run already holds its own weights
        module.init_source = module.load_initial_weights(str(cfg["init_from"]), str(cfg.get("init_weights", "ema")),
                                                         strict=bool(cfg.get("init_strict", True)))
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
    # Kept only where training uses it (on-the-fly captions, a testbed without precomputed
    # embeddings): at full scale it is FLAN-T5-XL, ~5 GB that on_fit_start would move to every GPU
    # for nothing once the empty prompt is encoded (module.text_encoder() loads it again if asked).
    if dm.cfg.text_source != "precomputed" or (il.get("enabled") and embs is None):
        object.__setattr__(module, "_text_encoder", text_encoder)
    if not with_trainer:
        return module, dm, None, plan["resume"]
    logger = _logger(cfg["logger"], ckpt_dir)
    strategy = comp["strategy"]
    accum = accumulation(cfg)
    if strategy == "ddp":
        from miro.train.ddp import StaticGraphDDPStrategy

        # static_graph (published), with or without gradient accumulation (miro/train/ddp.py: a
        # plain static graph breaks under Lightning's no_sync accumulation steps).
        strategy = StaticGraphDDPStrategy(gradient_as_bucket_view=True, bucket_cap_mb=200)
    tr = cfg["trainer"]
    trainer = Trainer(accelerator=comp["accelerator"], devices=comp["devices"], num_nodes=comp["num_nodes"],
                      max_time=_max_time(tr.get("max_time")),
                      precision=comp["precision"], strategy=strategy, max_steps=int(tr["max_steps"]),
                      accumulate_grad_batches=accum,
                      gradient_clip_val=tr.get("gradient_clip_val"), log_every_n_steps=int(tr["log_every_n_steps"]),
                      callbacks=callbacks, logger=logger, use_distributed_sampler=False, default_root_dir=str(ckpt_dir),
                      enable_progress_bar=bool(tr.get("progress_bar", True)), limit_val_batches=0,
                      num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()])
    return module, dm, trainer, ckpt


def _uncond_embedding(cfg: dict, text_encoder, resume=None):
    """The empty prompt's embedding (L, E) float32: a resumed run's own (its checkpoint holds it,
    and computing it would load the text encoder, FLAN-T5-XL at full scale, for nothing), else
    :func:`uncond_source`'s file, else encoded."""
    import numpy as np
    import torch

    if resume is not None:
        saved = open_checkpoint(resume)["state_dict"].get("uncond_embedding")
        if saved is not None:
            return saved.detach().float().clone()
    path = uncond_source(cfg)  # shape checked there, in the pre-flight
    if path is None:
        return text_encoder.uncond_embedding().float().cpu()
    arr = np.load(path, allow_pickle=False)
    return torch.from_numpy(arr.reshape(arr.shape[-2:]).astype(np.float32))


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        import yaml  # not OmegaConf: --help works on a base install, without the train extra

        lines = []
        for name in experiments():
            raw = yaml.safe_load((CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()) or {}
            v = raw.get("variant_name")
            lines.append(f"  {name}" + (f"  [{v}]" if v else ""))
        print(HELP.format(experiments="\n".join(lines)))
        return 0
    p = argparse.ArgumentParser(prog="miro train", add_help=False)
    p.add_argument("--print-config", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--write-sbatch", metavar="FILE")
    args, overrides = p.parse_known_args(argv)
    if any(o in ("-m", "--multirun") for o in argv):
        print(f"miro train: error: -m/--multirun is not supported{MULTIRUN}", file=sys.stderr)
        return 2
    bad = [o for o in overrides if o.startswith("--")]
    if bad:
        print(f"miro train: unknown option(s) {bad}; see --help", file=sys.stderr)
        return 2
    from miro.extras import require

    require("lightning", "hydra", "omegaconf", extra="train", what="miro train")
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
    if args.write_sbatch:
        from miro.train.slurm import write_sbatch

        try:
            model_config(cfg)  # the model name and rewards.keys, before a script is written
            per_rank_batch(cfg)
            path = write_sbatch(args.write_sbatch, cfg, overrides)
        except (ValueError, OSError) as e:
            print(f"miro train: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {path}: {cfg['computer']['num_nodes']} node(s) x {cfg['computer']['devices']} task(s); "
              f"submit with: sbatch {shlex.quote(str(path))}")
        return 0
    if not _names_experiment(overrides):
        print(f"miro train: no experiment= given: using the root config (the release recipe, experiment_name="
              f"{cfg['experiment_name']}, {len(cfg['rewards']['keys'])} rewards); choose one with experiment=NAME "
              f"(miro train --help lists them)", file=sys.stderr, flush=True)
    import warnings

    # Expected here: the EMA copies are in eval mode, and a resumed run reuses its checkpoint folder.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        plan = preflight(cfg, dry_run=args.dry_run)
        module, dm, trainer, ckpt = build(cfg, plan, with_trainer=not args.dry_run)
    except (ValueError, FileNotFoundError, MisconfigurationException) as e:  # Lightning's: e.g. a precision
        print(f"miro train: error: {e}", file=sys.stderr)                     # this hardware lacks
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
        problem = accelerator_problem(cfg)
        if problem:
            print(f"dry run: note: {problem}")
        return 0
    ckpt_dir = Path(cfg["checkpoint_dir"])
    from miro.data.datamodule import launch_rank

    # One rank tidies the folder, as one writes in it: another rank's cleanup could delete the temp
    # file of rank 0's reward_bins.json, still being written in its build(), under its rename.
    if launch_rank() == 0:
        removed = remove_stale_temps(ckpt_dir)
        if removed:
            print(f"miro train: removed {removed} stale temp file(s) (.*.tmp) that an interrupted save left in "
                  f"{ckpt_dir}", flush=True)
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
    if "Ambiguous value for argument" in text:  # Hydra's hint names --multirun, which one run per command lacks
        text = text.replace(" 3. To sweep over it, add --multirun to your command line", "") + MULTIRUN
    return text


# Sweeps are one command per setting: Hydra's multirun would put every job in one checkpoint folder,
# where the second would resume the first.
MULTIRUN = (" (a sweep is one command per value, each with its own experiment_name=NAME, e.g. a shell loop "
            "or a SLURM job array)")
