"""``miro align``: SRPO training (Hydra overrides) and the FLUX tools (sub-commands).

    miro align [experiment=<name>] key=value ...        SRPO on a MIRO pipeline or FLUX
    miro align flux-embed   --model M --prompts P --out DIR
    miro align flux-generate --model M --items P --out DIR [--lora DIR | --transformer FILE]
    miro align flux-lora    --model M --data P --caption-column Item --out DIR

Configs ship under ``miro/configs/align/`` and are composed with Hydra's compose API (no change of
working directory, no per-rank run folders); training runs on Lightning Fabric.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "align"

HELP = """usage: miro align [experiment=<name>] key=value ... [--print-config] [--dry-run]
       miro align {{flux-embed,flux-generate,flux-lora}} --help

SRPO post-hoc alignment (Direct-Align + semantic relative reward, MIA prompts) of a MIRO
pipeline or FLUX. Configuration is Hydra's; every key of miro/configs/align/config.yaml can be
overridden.

experiments: {experiments}

main keys:
  mode=online|offline           online rollouts of the current policy, or real images (items with image_path)
  inversion=true|false          inversion branch with swapped prompts (false reproduces reward hacking)
  denoise=true|false            denoise branch
  discount_inv=[a,b]            k of the inversion branch, clean -> noisy end (default [0.3,0.01])
  discount_denoise=[c,d]        k of the denoise branch (default [0.1,0.25])
  loss=hinge|maximize           relu(0.7 - r) as published, or -r
  data.prompts=PATH|cure        .json (SRPO list), .jsonl, .txt, .csv, CuRe folder
  target.kind=miro|flux  target.model=NAME|DIR|HUB_ID   lora.enabled=true lora.rank=16
  reward.name=hpsv2_score|pick_a_score_score|clip_score|sciscore_score|shapes_proxy  +reward.kwargs.KEY=VALUE
  schedule.train_timestep=[5,25] | schedule.sigma_range=[0.95,0.7]   schedule.groundtruth_ratio=0.9
  prompts.pos_prompt=... prompts.neg_prompt=... prompts.control_words=false prompts.use_mia=true
  optim.name=adamw|prodigy optim.lr=5e-6   train.max_steps=20 train.out_dir=DIR train.devices=N

options:
  --print-config                print the composed config and exit
  --dry-run                     build target, reward and data, then exit without training
  -h, --help                    show this help
"""


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def _open_kwargs(overrides: list[str]) -> list[str]:
    """``reward.kwargs`` holds load_scorer's arguments, whose keys the config cannot list, and
    Hydra refuses a new key without ``+`` (and an existing one, such as an experiment's
    ``version``, with it). ``++`` adds or replaces, so ``reward.kwargs.KEY=V`` and
    ``+reward.kwargs.KEY=V`` both work."""
    return [re.sub(r"^\+{0,2}(?=reward\.kwargs\.[^=]+=)", "++", o) for o in overrides]


def compose(overrides: list[str], as_dict: bool = True):
    """The composed config for ``overrides``: a plain dict (every ``???`` must be filled) or, with
    ``as_dict=False``, the OmegaConf object."""
    from hydra import compose as h_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = h_compose(config_name="config", overrides=_open_kwargs(list(overrides)))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True) if as_dict else cfg


def load_items(cfg: dict) -> list[dict]:
    from miro.align.datasets import read_cure, read_items

    spec = str(cfg["data"]["prompts"])
    if spec == "cure":
        from miro.eval.prompts import CURE_FILES, CURE_URL, _locate

        items = []
        for name in CURE_FILES:
            url = CURE_URL.format(name=name)
            try:
                path = _locate("cure", f"{name}.csv", url)
            except OSError as e:  # offline: say where the files go instead of a traceback
                raise ConnectionError(
                    f"data.prompts=cure: {name}.csv is not in $MIRO_DATA_DIR/cure/ or the cache and could not be "
                    f"downloaded from {url} ({e.__cause__ or e}); put the CuRe CSVs ({', '.join(CURE_FILES)}) in "
                    f"$MIRO_DATA_DIR/cure/ or pass data.prompts=<folder of CuRe CSVs>") from e
            items += read_cure(path)
    elif spec == "shapes":
        from miro.eval.prompts import load_prompts

        items = [{"caption": p.prompt} for p in load_prompts("shapes")]
    else:
        items = read_items(spec, caption_column=cfg["data"]["caption_column"])
    limit = cfg["data"].get("limit")
    if limit is not None:
        from miro.align.checks import pos_int

        items = items[: pos_int("data.limit", limit)]
    if not items:
        raise ValueError(f"data.prompts={spec!r} gave no items")
    return items


def _base_config() -> dict:
    """config.yaml's own keys and values (its ``defaults`` list dropped)."""
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))
    base.pop("defaults", None)
    return base


def check_keys(cfg: dict, base: dict | None = None, section: str = "") -> None:
    """Refuse a key that config.yaml does not have, in every section and at the top level. Hydra
    refuses ``target.dtyp=bfloat16`` but suggests ``+target.dtyp=bfloat16``, which it then accepts;
    the run would ignore it and train in float32. A mapping that is empty in config.yaml
    (``reward.kwargs``, ``target.reward_targets``) is open: its keys are the user's."""
    base = _base_config() if base is None else base
    unknown = sorted(k for k in cfg if k not in base)
    if unknown:
        where = f"keys of {section}" if section else "top-level keys"
        raise ValueError(f"unknown key {section + '.' if section else ''}{unknown[0]}; allowed {where}: {', '.join(base)}")
    for key, sub in base.items():
        if isinstance(sub, dict) and sub and isinstance(cfg.get(key), dict):
            check_keys(cfg[key], sub, f"{section}.{key}" if section else key)


TARGET_KINDS = ("miro", "flux")
DTYPES = ("float32", "bfloat16")


def check_target(cfg: dict) -> None:
    """The target and reward keys that must be right before any model loads."""
    from miro.align import checks as C

    t = cfg["target"]
    C.choice("target.kind", t["kind"], TARGET_KINDS)
    if t.get("dtype") is not None:
        C.choice("target.dtype", t["dtype"], DTYPES + ("null",))
    if not isinstance(t.get("model"), str) or not t["model"].strip():
        raise ValueError(f"target.model must be a name, folder or hub id; got {t.get('model')!r}")
    # Checked here, not where the target is built: a bad value would fail only after the model
    # loaded (or, for the switches, read any word as true).
    C.number("target.guidance_scale", t["guidance_scale"], 0.0)
    C.number("target.train_guidance", t.get("train_guidance"), 0.0, allow_none=True)
    for key in ("flux_train_guidance", "flux_rollout_guidance"):
        C.number(f"target.{key}", t[key], 0.0)
    for key in ("height", "width", "max_sequence_length"):
        C.pos_int(f"target.{key}", t[key])
    for key in ("quantize_timestep", "decoder_checkpointing", "gradient_checkpointing"):
        C.boolean(f"target.{key}", t[key])
    for key in ("reward_targets", "negative_reward_targets"):
        if not isinstance(t[key], dict):
            raise ValueError(f"target.{key} must be a mapping {{reward: value}}; got {t[key]!r}")


def check_lora(cfg: dict) -> None:
    from miro.align import checks as C

    lc = cfg["lora"]
    if C.boolean("lora.enabled", lc["enabled"]):
        C.pos_int("lora.rank", lc["rank"])
        C.number("lora.alpha", lc["alpha"], 0.0, strict=True, allow_none=True)
        if not 0.0 <= C.number("lora.dropout", lc["dropout"], 0.0) < 1.0:
            raise ValueError(f"lora.dropout must lie in [0, 1); got {lc['dropout']!r}")
        mods = lc["target_modules"]
        if isinstance(mods, str) or not all(isinstance(m, str) and m for m in mods):
            raise ValueError(f"lora.target_modules must be a list of module names (empty: the defaults); got {mods!r}")


def check_reward(cfg: dict) -> None:
    """The reward keys, before any model loads: a reward SRPO cannot use (not a differentiable
    embedding model) is refused here, not at its first call mid-run."""
    import math

    from miro.align import checks as C
    from miro.align.relative_reward import SIMILARITIES, check_embedding_scorer

    r = cfg["reward"]
    C.choice("reward.similarity", r["similarity"], SIMILARITIES)
    if not math.isfinite(C.number("reward.logit_divisor", r["logit_divisor"], 0.0, strict=True)):
        raise ValueError(f"reward.logit_divisor must be a finite number > 0; got {r['logit_divisor']!r}")
    if r["name"] == "shapes_proxy":
        if not r.get("path"):
            raise ValueError("reward.name=shapes_proxy needs reward.path=<trained proxy folder>")
        return
    from miro.rewards import load_scorer

    # load_scorer builds the scorer without its weights (they load on first use), so this is cheap.
    check_embedding_scorer(load_scorer(r["name"], **dict(r.get("kwargs") or {})), r["name"])


def check_reward_prompts(items: list[dict], prompts) -> None:
    """Resolve every item's reward prompts as the run does (step 0), so a dataset the reward
    prompts cannot be built for fails before any model loads."""
    from miro.align.prompts import build_reward_prompts

    for it in items:
        build_reward_prompts(it, prompts, 0)


def build_reward(cfg: dict, device):
    from miro.align.relative_reward import RelativeRewardConfig, SemanticRelativeReward

    r = cfg["reward"]
    if r["name"] == "shapes_proxy":
        from miro.align.proxy_reward import ProxyRewardModel

        if not r.get("path"):
            raise ValueError("reward.name=shapes_proxy needs reward.path=<trained proxy folder>")
        scorer = ProxyRewardModel.load(r["path"]).to(device)
    else:
        from miro.rewards import load_scorer

        scorer = load_scorer(r["name"], **dict(r.get("kwargs") or {}))
        scorer = scorer.to(device) or scorer
    return SemanticRelativeReward(scorer, RelativeRewardConfig(similarity=r["similarity"], logit_divisor=float(r["logit_divisor"])))


def _lora_settings(cfg: dict):
    from miro.align.lora import LoraSettings

    lc = cfg["lora"]
    return LoraSettings(rank=int(lc["rank"]), alpha=lc["alpha"], dropout=float(lc["dropout"]), target_modules=list(lc["target_modules"]))


def build_target(cfg: dict, device, items: list[dict] | None = None):
    import torch

    t = cfg["target"]
    check_target(cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(t.get("dtype"))
    if t["kind"] == "miro":
        from miro.align.miro_target import MiroTarget, MiroTargetConfig
        from miro.generate_cli import load_pipeline

        pipe = load_pipeline(t["model"], device=device, dtype=dtype)
        if cfg["lora"]["enabled"]:
            from miro.align.lora import add_miro_lora

            add_miro_lora(pipe.model, _lora_settings(cfg))
        return MiroTarget(pipe, MiroTargetConfig(guidance_scale=float(t["guidance_scale"]), train_guidance=t["train_guidance"],
                                                 reward_targets=dict(t["reward_targets"]),
                                                 negative_reward_targets=dict(t["negative_reward_targets"]),
                                                 decoder_checkpointing=bool(t["decoder_checkpointing"])))
    if t["kind"] == "flux":
        from diffusers import FluxPipeline

        from miro.align.flux import FluxTarget, FluxTargetConfig

        kw = {}
        if items and all(it.get("prompt_embed_path") for it in items):
            kw = {"text_encoder": None, "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}  # precomputed embeddings
        pipe = FluxPipeline.from_pretrained(t["model"], torch_dtype=dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32), **kw)
        pipe.to(device)
        for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
            if m is not None:
                m.requires_grad_(False)
        if cfg["lora"]["enabled"]:
            from miro.align.lora import add_flux_lora

            add_flux_lora(pipe.transformer, _lora_settings(cfg))
        if t.get("gradient_checkpointing"):
            pipe.transformer.enable_gradient_checkpointing()
        return FluxTarget.from_pipeline(pipe, FluxTargetConfig(
            height=int(t["height"]), width=int(t["width"]), train_guidance=float(t["flux_train_guidance"]),
            rollout_guidance=float(t["flux_rollout_guidance"]), quantize_timestep=bool(t["quantize_timestep"]),
            max_sequence_length=int(t["max_sequence_length"]), decoder_checkpointing=bool(t["decoder_checkpointing"])))
    raise ValueError(f"target.kind={t['kind']!r}; allowed: miro, flux")


def export(cfg: dict, target, out: Path) -> Path:
    """Write the tuned weights: a LoRA (diffusers format for FLUX, peft layout for MIRO), a MIRO
    pipeline folder (LoRA merged), or the FLUX transformer state dict (safetensors)."""
    from safetensors.torch import save_file

    from miro.align import lora as L

    if cfg["target"]["kind"] == "flux":
        if cfg["lora"]["enabled"]:
            return L.save_flux_lora(target.transformer, out / "lora")
        from miro.io import atomic_write_with

        sd = {k: v.detach().cpu().contiguous() for k, v in target.transformer.state_dict().items()}
        # atomic: a killed export leaves the previous file or none, never a truncated one
        atomic_write_with(out / "transformer" / "diffusion_pytorch_model.safetensors", lambda tmp: save_file(sd, tmp))
        return out / "transformer"
    pipe = target.pipe
    if cfg["lora"]["enabled"]:
        L.save_miro_lora(pipe.model, out / "lora", _lora_settings(cfg))
        from miro.pipeline import MiroPipeline

        merged = MiroPipeline(_fresh_model(pipe, L.merge_lora_state_dict(pipe.model)), pipe.text_encoder, pipe.autoencoder,
                              pipe.config, pipe.uncond_embedding.detach().float().cpu().numpy(), reward_bins=pipe.reward_bins)
        return merged.save_pretrained(out / "pipeline")
    return pipe.save_pretrained(out / "pipeline")


def _fresh_model(pipe, state):
    from miro.models.model import MiroModel

    m = MiroModel.from_config(pipe.config)
    m.load_state_dict_checked(state)
    return m


def validate(cfg: dict):
    """Every config check that needs no model: (step, optim, train, items, fabric), ``fabric``
    constructed but not launched (what a dry run uses). ``ValueError`` names the key."""
    from miro.align.checks import from_section
    from miro.align.step import StepConfig
    from miro.align.trainer import OptimConfig, TrainConfig, check_fabric, train_fabric_kwargs

    check_keys(cfg)
    step = StepConfig(mode=cfg["mode"], denoise=cfg["denoise"], inversion=cfg["inversion"], discount_inv=cfg["discount_inv"],
                      discount_denoise=cfg["discount_denoise"], loss=cfg["loss"], hinge_margin=cfg["hinge_margin"],
                      rollout_steps=cfg["rollout_steps"], rollout_shift=cfg["rollout_shift"],
                      reuse_rollout_noise=cfg["reuse_rollout_noise"], schedule=dict(cfg["schedule"]), prompts=dict(cfg["prompts"]))
    optim = from_section(OptimConfig, cfg["optim"], "optim")
    train = from_section(TrainConfig, cfg["train"], "train")
    check_target(cfg)
    fabric = check_fabric(train_fabric_kwargs(train), lambda key: f"train.{key}")
    target_device(cfg, fabric)
    check_lora(cfg)
    check_reward(cfg)
    if optim.name == "prodigy":  # an optional package: named before any model loads
        from miro.extras import require

        require("prodigyopt", extra="align", what="optim.name=prodigy")
    items = load_items(cfg)
    check_reward_prompts(items, step.prompts)
    if step.mode == "offline":
        from miro.align.datasets import OfflineImageDataset

        try:  # the trainer's own filter (files not opened): at least one item with an image file
            OfflineImageDataset(items, 1, check=False)
        except ValueError as e:
            raise ValueError(f"mode=offline, data.prompts={cfg['data']['prompts']}: {e}") from None
    return step, optim, train, items, fabric


def target_device(cfg: dict, fabric):
    """The device this process builds the target, VAE, text encoders and reward on: Fabric's
    (``cuda:<local rank>`` with several GPUs; every rank used ``cuda``, i.e. cuda:0, before).
    ``target.device``, when set, must name that device: the frozen models there and the trained
    module on Fabric's would meet only in a device-mismatch error mid-step."""
    import torch

    dev, want = fabric.device, cfg["target"].get("device")
    if want is None:
        return dev
    try:
        asked = torch.device(want)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"target.device={want!r} is not a device ({e}); leave it null (Fabric's device)") from None
    if asked.type != dev.type or (asked.index is not None and asked.index != (dev.index or 0)):
        t = cfg["train"]
        raise ValueError(f"target.device={want!r} but Fabric runs this process on {dev} (train.accelerator={t['accelerator']}, "
                         f"train.devices={t['devices']}); leave target.device null (Fabric's device) or choose the "
                         f"device with train.accelerator")
    return dev


def _remove_if_empty(path: Path) -> None:
    """Remove ``path`` (made by this run) when it holds no file, only (nested) empty folders."""
    if not path.is_dir() or any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
        return
    for d in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    path.rmdir()


def run(cfg: dict, dry_run: bool = False) -> Path | None:
    from miro.align.trainer import SRPOTrainer, make_fabric, train_fabric_kwargs

    step, optim, train, items, checked = validate(cfg)  # before any model loads, in a dry run too
    # Fabric first: launched, each rank is its own process and builds its frozen models on its own
    # device (a dry run launches nothing and uses the first rank's device).
    fabric = checked if dry_run else make_fabric(train_fabric_kwargs(train))
    device = target_device(cfg, fabric)
    target = build_target(cfg, device, items)
    reward = build_reward(cfg, device)
    if dry_run:
        print(f"dry run: {len(items)} items, target {cfg['target']['kind']}:{cfg['target']['model']}, reward {cfg['reward']['name']}")
        return None
    if cfg["reward"]["name"] != "shapes_proxy":  # a reward model neither cached nor reachable: one line naming it
        from miro.rewards.base import load_weights

        load_weights(reward.scorer, cfg["reward"]["name"])
    out = Path(train.out_dir)
    existed = out.exists()
    trainer = SRPOTrainer(target, reward, items, step, optim, train, fabric=fabric,
                          run_settings={k: cfg[k] for k in ("target", "reward", "data", "lora")})
    try:
        trainer.fit()
    except BaseException:
        if not existed and trainer.fabric.global_rank == 0:
            _remove_if_empty(out)  # leave nothing behind when the run failed before writing anything
        raise
    path = None
    try:
        if trainer.fabric.global_rank == 0:  # one writer
            path = export(cfg, target, out)
            print(f"saved {path}")
    finally:
        trainer.fabric.barrier()  # every rank ends once the export is written (or has failed)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("flux-embed", "flux-generate", "flux-lora"):
        from miro.align.flux_cli import main as flux_main

        return flux_main(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(HELP.format(experiments=", ".join(experiments())))
        return 0
    if any(a in ("-m", "--multirun") for a in argv):  # a second job in the same out_dir would resume the first
        print("miro align: -m/--multirun is not supported (a sweep is one command per value, each with its own "
              "train.out_dir=DIR)", file=sys.stderr)
        return 2
    flags = [a for a in argv if a.startswith("--")]
    bad = [f for f in flags if f not in ("--print-config", "--dry-run")]
    if bad:
        print(f"miro align: unknown option {bad[0]}; options are --print-config, --dry-run (config keys take key=value)", file=sys.stderr)
        return 2
    overrides = [a for a in argv if not a.startswith("--")]
    from miro.extras import require

    require("lightning", "hydra", "omegaconf", extra="align", what="miro align")
    try:
        if "--print-config" in flags:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(compose(overrides, as_dict=False)))
            return 0
        cfg = compose(overrides)
    except Exception as e:  # hydra's errors (unknown key, missing value) as one clear line
        print(f"miro align: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    from miro.cli import report_errors

    def _run() -> int:
        if cfg["lora"]["enabled"] is True:
            require("peft", extra="align", what="miro align lora.enabled=true")
        run(cfg, dry_run="--dry-run" in flags)
        return 0

    # One line each: a value the config cannot work with exits 2; the environment (no network for
    # data.prompts=cure, a model neither cached nor reachable, an unwritable out_dir) exits 1.
    return report_errors("miro align", _run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
