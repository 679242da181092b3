"""Generate evaluation images in GenEval's folder layout, resumably.

Layout (djghosh13/geneval ``generation/diffusers_generate.py``)::

    <outdir>/generation.json            # how the images were made (checked on resume)
    <outdir>/00000/metadata.jsonl       # the prompt's metadata line
    <outdir>/00000/samples/0000.png     # sample j of prompt i, seed = seed + 1000*i + j

Every file is written to a temporary name and renamed, so a killed run leaves only complete
files; a rerun skips complete prompts and makes the missing samples with the same seeds, so a
resumed run draws the same noise as an uninterrupted one (its images equal up to float rounding:
another batch shape may sum in another order).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from miro.eval.prompts import PromptItem
from miro.io import atomic_path, atomic_write_text

# Seeds are seed + SEED_STRIDE * prompt_index + sample_index (shared CLI contract), so at most
# SEED_STRIDE samples per prompt keep seeds unique.
SEED_STRIDE = 1000
MAX_SEED = 2**62  # leaves room for SEED_STRIDE x any prompt count below 2^63
RUN_FILE = "generation.json"
GROUND_TRUTH = "ground-truth"  # the Shapes renderer (ShapesEval's ceiling), which has no sampler
# What the ground-truth renderer takes and ignores: left out of its run record, so the record
# claims nothing that did not shape the images and a rerun with other values reuses them.
SAMPLER_FIELDS = ("steps", "cfg", "reward_cfg", "reward_direction", "reward_targets", "negative_reward_targets")


@dataclass
class GenerateConfig:
    """How a folder of evaluation images is generated."""

    model: str = "shapes"  # built-in name, folder, hub id or Lightning .ckpt
    variant: str | None = None  # subfolder of a multi-variant repository (e.g. miro-only-aesthetic)
    n_samples: int = 4  # images per prompt (GenEval uses 4)
    steps: int = 50  # Euler steps (published default)
    cfg: float = 7.0  # guidance scale w in (1+w)*cond - w*uncond (published default)
    reward_cfg: float | dict[str, float] | None = None  # reward direction's own scale, or one per reward (None: cfg)
    reward_direction: str = "prompt"  # the third branch: (prompt, r-) or "null": (null, r+)
    seed: int = 0  # base seed; sample j of prompt i uses seed + 1000*i + j
    reward_targets: dict[str, float] = field(default_factory=dict)  # positive reward targets
    negative_reward_targets: dict[str, float] = field(default_factory=dict)  # negative branch
    batch_size: int = 8  # images per pipeline call (the noise is per image; pixels equal up to float rounding)

    def __post_init__(self):
        if not 1 <= self.n_samples <= SEED_STRIDE:
            raise ValueError(f"n_samples must be in [1, {SEED_STRIDE}]; got {self.n_samples}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        # per-image seeds are seed + 1000*i + j, which torch.manual_seed must take (< 2^63)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2^62]; got {self.seed!r}")
        # checked here, before a folder is touched or a model loaded (the pipeline would refuse it later)
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"cfg must be a finite number >= 0; got {self.cfg}")
        for k, w in (self.reward_cfg.items() if isinstance(self.reward_cfg, dict) else [("", self.reward_cfg)]):
            if w is not None and not (math.isfinite(w) and w >= 0):
                name = f"reward_cfg[{k!r}]" if k else "reward_cfg"
                raise ValueError(f"{name} must be a finite number >= 0 or None; got {w}")
        if self.reward_direction not in ("prompt", "null"):
            raise ValueError(f"reward_direction must be 'prompt' or 'null'; got {self.reward_direction!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        for name, targets in (("reward", self.reward_targets), ("negative reward", self.negative_reward_targets)):
            for k, v in targets.items():
                if not 0.0 <= float(v) <= 1.0:
                    raise ValueError(f"{name} target {k}={v} is outside [0, 1]")

    def identity(self) -> dict:
        """The fields that determine the images (batch size does not)."""
        d = asdict(self)
        d.pop("batch_size")
        if self.model == GROUND_TRUTH:
            return {k: v for k, v in d.items() if k not in SAMPLER_FIELDS}
        if self.reward_cfg is None:  # one scale: the direction has no effect (and older folders lack both)
            d.pop("reward_cfg")
            d.pop("reward_direction")
        return d


def reward_dict(pairs: Iterable[tuple[str, float]], flag: str = "--reward") -> dict[str, float]:
    """``[(key, value), ...]`` -> a dict; a key given twice is an error naming it (the last value
    silently winning hides a typo such as ``--reward a=0.2 --reward a=0.8`` meant for two rewards)."""
    out: dict[str, float] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{flag} {key!r} is given twice ({out[key]:g} and {value:g}); give each reward once")
        out[key] = value
    return out


def parse_reward_args(pairs: list[str] | None, flag: str = "--reward") -> dict[str, float]:
    """``["aesthetic_score=0.5", ...]`` -> ``{"aesthetic_score": 0.5}`` (a clear error, naming ``flag``, otherwise)."""
    parsed: list[tuple[str, float]] = []
    for p in pairs or []:
        key, sep, val = p.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {p!r}: expected KEY=VALUE, e.g. aesthetic_score=0.8")
        try:
            parsed.append((key.strip(), float(val)))
        except ValueError:
            raise ValueError(f"{flag} {p!r}: value {val!r} is not a number") from None
    return reward_dict(parsed, flag)


def parse_reward_cfg(text: str) -> float | dict[str, float]:
    """``--reward-cfg``: one scale (``"7.5"``) or one per reward (``"shapes_alignment=15,shapes_counting=15"``;
    rewards left out keep ``--cfg``). An argparse ``type``: a bad value names itself and the forms allowed."""
    import argparse

    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number (e.g. 7.5) or KEY=SCALE pairs separated by "
                                         "commas (e.g. shapes_alignment=15,shapes_counting=15)")
    try:
        return parse_reward_args([p for p in text.split(",") if p.strip()], "--reward-cfg")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    return seed + SEED_STRIDE * prompt_index + sample_index


def prompt_dir(outdir: str | Path, i: int) -> Path:
    return Path(outdir) / f"{i:05d}"


def sample_path(outdir: str | Path, i: int, j: int) -> Path:
    return prompt_dir(outdir, i) / "samples" / f"{j:04d}.png"


def atomic_save_image(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def load_pipeline(model: str, variant: str | None = None, device: str | None = None):
    """Load a pipeline from a built-in name, folder, hub id or Lightning ``.ckpt`` (as ``miro generate``).

    ``"ground-truth"`` is the Shapes world's renderer behind the same call (ShapesEval's ceiling).
    """
    if model == GROUND_TRUTH:
        from miro.shapes.eval import GroundTruthPipeline

        return GroundTruthPipeline()
    from miro.generate_cli import load_pipeline as _load

    return _load(model, variant=variant, device=device)


def model_reward_keys(model: str, variant: str | None = None) -> list[str] | None:
    """``--model``'s reward keys where reading them is local and cheap: a built-in's or a folder's
    ``config.json``, the ``reward_bins.json`` beside a Lightning ``.ckpt``; None otherwise (a hub id
    is not fetched for this, a bad path is left to the loader to report)."""
    from miro.hub import BUILTIN_DIR, resolve_pipeline_dir

    name = str(model)
    try:
        if name.endswith(".ckpt"):
            bins = Path(name).parent / "reward_bins.json"
            return list(json.loads(bins.read_text(encoding="utf-8"))["edges"]) if bins.is_file() else None
        if ("/" not in name and (BUILTIN_DIR / name).is_dir()) or Path(name).expanduser().is_dir():
            config = json.loads(resolve_pipeline_dir(name, variant)["config.json"].read_text(encoding="utf-8"))
            keys = config.get("coherence_keys") or config.get("network", {}).get("coherence_keys")
            return list(keys) if keys else None
    except (ValueError, KeyError, OSError):
        return None
    return None


def check_local_model(model: str, variant: str | None = None) -> None:
    """Refuse a local ``--model`` that cannot load (a missing ``.ckpt``, folder or built-in name)
    with the loader's own message, before anything else runs; a hub id is left to the loader
    (checking it would mean fetching it)."""
    from miro.hub import check_local_pipeline

    name = str(model)
    if name == GROUND_TRUTH:
        return
    if name.endswith(".ckpt"):
        if not Path(name).is_file():
            raise ValueError(f"checkpoint {name!r} does not exist")
    else:
        check_local_pipeline(name, variant)  # reads no weights


def is_shapes_run(reward_keys: list[str] | None, model: str | None = None, prompts: str | None = None) -> bool:
    """Whether a model (or a folder it generated) belongs to the Shapes world: its reward keys are
    all ``shapes_*``; without known keys (a hub id, older folders, the ground-truth renderer) a
    Shapes name or the ShapesEval prompt set decides."""
    if reward_keys:
        return all(k.startswith("shapes_") for k in reward_keys)
    return "shapes" in str(model or "") or model == GROUND_TRUTH or prompts == "shapes"


def has_samples(outdir: str | Path) -> bool:
    """Whether ``outdir`` holds any sample PNG (``<00000>/samples/<0000>.png``)."""
    return any(Path(outdir).glob("[0-9]*/samples/[0-9]*.png"))


def _check_run_file(outdir: Path, cfg: GenerateConfig, n_prompts: int, prompts_spec: str | None,
                    reward_keys: list[str] | None = None) -> dict:
    """Refuse to mix images made with different settings in one folder; returns the run record
    to write once every other check has passed (a refused run leaves the folder as it was).

    The record only protects images: one beside no image (left by a run that failed before its
    first image, e.g. on a bad reward key) is replaced, so the corrected rerun is not blocked.
    """
    path = outdir / RUN_FILE
    ident = cfg.identity()
    old = {}
    if path.is_file() and has_samples(outdir):
        old = json.loads(path.read_text(encoding="utf-8"))
        before = old.get("config", {})
        # a setting dropped counts as changed, but for the sampler's in a ground-truth folder
        # (records before they were left out hold them)
        ignored = SAMPLER_FIELDS if ident.get("model") == GROUND_TRUTH else ()
        keys = list(ident) + [k for k in before if k not in ident and k not in ignored]
        diff = {k: (before.get(k), ident.get(k)) for k in keys if before.get(k) != ident.get(k)}
        if diff:
            raise ValueError(
                f"{outdir} holds images made with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                "use another --outdir"
            )
    return {"config": ident, "prompts": prompts_spec, "n_prompts": n_prompts,
            # the model's reward keys: lets `--scorers auto` pick Shapes or full-scale rewards
            "reward_keys": reward_keys if reward_keys is not None else old.get("reward_keys")}


def _check_no_prompts_past(outdir: Path, n_prompts: int) -> None:
    """Refuse a folder holding images of prompts past the ``n_prompts`` asked for (an earlier run
    with more prompts, or no ``--limit``): every scorer reads the whole folder, so they would be
    scored with this run's and its record would claim fewer prompts."""
    past = sorted(d.name for d in outdir.glob("[0-9]*") if d.name.isdigit() and int(d.name) >= n_prompts
                  and any((d / "samples").glob("[0-9]*.png")))
    if past:
        raise ValueError(f"{outdir} holds images of {len(past)} prompt(s) past the {n_prompts} asked for (e.g. "
                         f"{past[0]}/), which scoring the folder would count; use another --outdir, or the "
                         "earlier run's --limit")


def _check_pipeline_inputs(pipe, cfg: GenerateConfig) -> None:
    """Let a MIRO pipeline refuse bad targets and scales before the folder is written to (its
    call would, after the run record and the prompts' metadata are on disk)."""
    from miro.pipeline import MiroPipeline

    if not isinstance(pipe, MiroPipeline):  # other pipelines: their call reports bad input
        return
    pipe.check_reward_targets(cfg.reward_targets or None)
    pipe.check_reward_targets(cfg.negative_reward_targets or None, 0.0, "negative_reward_targets")
    pipe.check_inputs("-", num_inference_steps=cfg.steps, guidance_scale=cfg.cfg, num_images_per_prompt=1,
                      output_type="pil", generator=None, reward_guidance_scale=cfg.reward_cfg,
                      reward_direction=cfg.reward_direction)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with


def png_is_whole(path: Path) -> bool:
    """Whether ``path`` starts and ends like a PNG: a zero-byte or cut file does not (20 bytes read,
    not the pixels, so a resume over thousands of images stays quick; scorers still skip and count
    damage inside a file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(0, 2)
            if f.tell() < len(PNG_SIGNATURE) + len(PNG_END):
                return False
            f.seek(-len(PNG_END), 2)
            return head == PNG_SIGNATURE and f.read() == PNG_END
    except OSError:
        return False


def pending_samples(outdir: str | Path, items: list[PromptItem], n_samples: int) -> list[tuple[int, int]]:
    """(prompt index, sample index) pairs whose PNG is not on disk yet, or is not a whole PNG.

    This command writes whole files only, so a cut or empty one was damaged afterwards (a copy
    stopped midway, a full disk): it is made again from its seed (:func:`generate_folder` warns,
    counting them) rather than kept and skipped by every scorer on every run.
    """
    return [(i, j) for i in range(len(items)) for j in range(n_samples) if not png_is_whole(sample_path(outdir, i, j))]


def generate_folder(pipe, items: list[PromptItem], outdir: str | Path, cfg: GenerateConfig,
                    prompts_spec: str | None = None, progress: bool = True) -> dict:
    """Generate every missing sample of ``items`` into ``outdir``; returns counts."""
    import torch
    from tqdm.auto import tqdm

    outdir = Path(outdir)
    if pipe is not None:
        _check_pipeline_inputs(pipe, cfg)
    outdir.mkdir(parents=True, exist_ok=True)
    keys = getattr(pipe, "coherence_keys", None) if pipe is not None else None
    fresh = not has_samples(outdir)  # metadata beside no image (a failed run's) may be replaced
    run = _check_run_file(outdir, cfg, len(items), prompts_spec, list(keys) if isinstance(keys, (list, tuple)) else None)
    _check_no_prompts_past(outdir, len(items))
    metadata = []  # (path, line) still to write, once every prompt has been checked
    for i, item in enumerate(items):
        meta_path = prompt_dir(outdir, i) / "metadata.jsonl"
        line = json.dumps(item.metadata, ensure_ascii=False) + "\n"
        if not meta_path.is_file() or meta_path.read_text(encoding="utf-8") != line:
            if meta_path.is_file() and not fresh:
                raise ValueError(f"{meta_path} holds another prompt than {item.prompt!r}; use another --outdir")
            metadata.append((meta_path, line))
    atomic_write_text(outdir / RUN_FILE, json.dumps(run, indent=2))
    for meta_path, line in metadata:
        atomic_write_text(meta_path, line)
    todo = pending_samples(outdir, items, cfg.n_samples)
    damaged = [sample_path(outdir, i, j) for i, j in todo if sample_path(outdir, i, j).exists()]
    if damaged:
        warnings.warn(f"{len(damaged)} sample PNG(s) under {outdir} are empty or cut (e.g. {damaged[0]}); "
                      "generating them again from their seeds")
    total = len(items) * cfg.n_samples
    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not progress)
    # only MIRO pipelines take a reward scale; left out, any diffusers-like pipeline works
    extra = {} if cfg.reward_cfg is None else {"reward_guidance_scale": cfg.reward_cfg,
                                               "reward_direction": cfg.reward_direction}
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start : start + cfg.batch_size]
        prompts = [items[i].prompt for i, _ in chunk]
        # CPU generators: the noise (hence the image) of a seed is the same on every device
        gens = [torch.Generator().manual_seed(sample_seed(cfg.seed, i, j)) for i, j in chunk]
        # one generator per image: row k of the noise is drawn as a batch of one from gens[k]
        images = pipe(
            prompts,
            reward_targets=cfg.reward_targets or None,
            negative_reward_targets=cfg.negative_reward_targets or None,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.cfg,
            num_images_per_prompt=1,
            generator=gens,
            output_type="pil",
            **extra,
        )
        images = getattr(images, "images", images)
        if len(images) != len(chunk):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(chunk)} prompts")
        for (i, j), im in zip(chunk, images):
            atomic_save_image(im, sample_path(outdir, i, j))
        bar.update(len(chunk))
    bar.close()
    return {"prompts": len(items), "images": total, "generated": len(todo), "skipped": total - len(todo)}
