"""ShapesEval: a GenEval-style benchmark of the Shapes world, scored by the exact detector.

* **Prompts**: 300 GenEval-metadata lines over the six categories (single_object 40,
  two_object 55, counting 45, colors 50, position 55, color_attr 55), built once by
  :func:`build_prompt_set` from a fixed seed and shipped as ``data/shapes_eval_metadata.jsonl``.
  With five classes some categories have few distinct prompts (5 single objects, 15 counting
  prompts); they repeat, and each repeat gets its own seeds (seed + 1000·i + j).
* **Generation**: GenEval's folder layout (``<dir>/<00000>/metadata.jsonl``,
  ``samples/<0000>.png``), resumable, via :mod:`miro.eval.generate`.
* **Scoring**: the Shapes detector + GenEval's rules (:mod:`miro.eval.geneval_rules`) with
  :data:`SHAPES_EVAL_OPTIONS`; ``results.jsonl`` in GenEval's format and a summary whose overall
  score is the mean of the six category accuracies.

:class:`GroundTruthPipeline` renders each prompt's ground truth behind the pipeline call API,
which gives the benchmark's ceiling (``miro shapes eval-generate --model ground-truth``).
"""

from __future__ import annotations

import itertools
import json
import os
from importlib import resources
from pathlib import Path

from miro.eval.generate import GROUND_TRUTH
from miro.eval.geneval_rules import GenEvalOptions, format_summary, validate_metadata
from miro.io import atomic_write_text
from miro.shapes import world as W
from miro.shapes.captions import canonical, caption_from_metadata, parse_caption
from miro.shapes.scene import SceneConfig, rng_for, scene_from_metadata

PROMPT_SET_SEED = 2023  # fixed: the prompt set never changes
CATEGORY_SIZES = {"single_object": 40, "two_object": 55, "counting": 45, "colors": 50, "position": 55, "color_attr": 55}
METADATA_FILE = "shapes_eval_metadata.jsonl"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "shapes_eval_summary.json"
# GenEval's thresholds are for Mask2Former confidences; the Shapes detector's score is a shape-fit
# quality (clean renders ~0.95) with no duplicate detections, so one threshold of 0.5 serves both
# tags (it rejects specks and shapeless blobs). Position tolerance and caps stay GenEval's.
SHAPES_EVAL_OPTIONS = GenEvalOptions(threshold=0.5, counting_threshold=0.5, max_objects=16, max_overlap=1.0, position_threshold=0.1)


def _cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def build_prompt_set() -> list[dict]:
    """The ShapesEval metadata lines (canonical, with GenEval-template prompts)."""
    rng = rng_for(PROMPT_SET_SEED)
    C, K = list(W.CLASSES), list(W.COLORS)
    pairs = list(itertools.permutations(C, 2))
    lines: list[dict] = []

    def add(tag: str, includes: list[list[dict]]):
        assert len(includes) == CATEGORY_SIZES[tag], tag
        for inc in includes:
            md = canonical({"include": inc})
            assert md["tag"] == tag, (md, tag)
            lines.append({**md, "prompt": caption_from_metadata(md)})

    add("single_object", _cycle([[{"class": c, "count": 1}] for c in C], CATEGORY_SIZES["single_object"]))
    add("two_object", _cycle([[{"class": a, "count": 1}, {"class": b, "count": 1}] for a, b in pairs], CATEGORY_SIZES["two_object"]))
    add("counting", _cycle([[{"class": c, "count": n}] for n in (2, 3, 4) for c in C], CATEGORY_SIZES["counting"]))
    add("colors", [[{"class": c, "count": 1, "color": k}] for k in K for c in C])
    pos = [[{"class": b, "count": 1}, {"class": a, "count": 1, "position": [r, 0]}] for r in W.RELATIONS for a, b in pairs]
    add("position", [pos[i] for i in sorted(rng.choice(len(pos), CATEGORY_SIZES["position"], replace=False))])
    attr = [(a, b, ka, kb) for a, b in pairs for ka, kb in itertools.permutations(K, 2)]
    pick = sorted(rng.choice(len(attr), CATEGORY_SIZES["color_attr"], replace=False))
    add("color_attr", [[{"class": a, "count": 1, "color": ka}, {"class": b, "count": 1, "color": kb}] for a, b, ka, kb in (attr[i] for i in pick)])
    return lines


def evaluation_metadata() -> list[dict]:
    """The shipped ShapesEval prompt set (one dict per prompt, GenEval metadata)."""
    text = resources.files("miro.shapes").joinpath("data", METADATA_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_prompt_set(path: str | os.PathLike) -> None:
    """Write :func:`build_prompt_set` as JSONL (how the shipped file is made)."""
    from miro.io import atomic_write_text

    lines = "".join(json.dumps(md) + "\n" for md in build_prompt_set())
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as render does
    atomic_write_text(Path(path), lines)


def render_prompt(prompt: str | dict, seed: int = 0, resolution: int = W.DEFAULT_RESOLUTION,
                  scene_config: SceneConfig | None = None):
    """A clean ground-truth render (PIL) of a caption or metadata line."""
    from miro.shapes.render import render_pil

    md = parse_caption(prompt) if isinstance(prompt, str) else validate_metadata(prompt)
    scene = scene_from_metadata(md, rng_for(seed), scene_config or SceneConfig())
    return render_pil(scene, resolution)


class GroundTruthPipeline:
    """Renders the ground truth of each prompt behind :class:`miro.MiroPipeline`'s call API.

    Like the real pipeline it makes one random draw per image (:meth:`prepare_noise`, here a
    scene seed instead of a noise tensor) from the caller's generator, or from ``generator[k]``
    for image k when given a list, so the evaluation layout's per-sample seeding applies. Steps, guidance and reward targets are accepted and
    ignored.
    """

    def __init__(self, resolution: int = W.DEFAULT_RESOLUTION):
        self.resolution = W.check_resolution(resolution)

    def prepare_noise(self, batch_size: int, generator=None):
        """One scene seed per image; a list of generators gives row k from ``generator[k]``."""
        import torch

        if isinstance(generator, (list, tuple)):
            return torch.cat([self.prepare_noise(1, g) for g in generator])
        return torch.randint(0, 2**62, (batch_size,), generator=generator, dtype=torch.int64)

    def __call__(self, prompt, reward_targets=None, negative_reward_targets=None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.0, num_images_per_prompt: int = 1, generator=None, output_type: str = "pil"):
        import torch

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = len(prompts) * num_images_per_prompt
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        if any(g is not None and not isinstance(g, torch.Generator) for g in gens):
            raise ValueError(f"generator must be a torch.Generator, a list of them (one per image) or None; got {generator!r}")
        if isinstance(generator, (list, tuple)) and len(gens) != n:
            raise ValueError(f"got {len(gens)} generators for {n} images")
        if output_type != "pil":
            raise ValueError(f"GroundTruthPipeline supports output_type='pil' only; got {output_type!r}")
        seeds = self.prepare_noise(n, generator).tolist()
        return [render_prompt(prompts[k // num_images_per_prompt], int(s), self.resolution) for k, s in enumerate(seeds)]


def eval_generate(model, outdir: str | os.PathLike, n_samples: int = 4, steps: int = 50, cfg: float = 7.0, seed: int = 0,
                  reward_targets: dict | None = None, batch_size: int = 8, limit: int | None = None, progress: bool = True) -> dict:
    """Generate ShapesEval images into ``outdir`` (GenEval layout, resumable).

    ``model`` is a pipeline object with the :class:`miro.MiroPipeline` call API, a name/folder
    for ``MiroPipeline.from_pretrained``, or ``"ground-truth"``. ``limit`` keeps the first N prompts.
    """
    from miro.eval.generate import GenerateConfig, generate_folder, load_pipeline
    from miro.eval.prompts import PromptItem

    if limit is not None and limit < 1:  # a slice would take "all but the last" (-1) or nothing (0)
        raise ValueError(f"limit must be >= 1; got {limit}")
    name = model if isinstance(model, str) else type(model).__name__
    gcfg = GenerateConfig(model=name, n_samples=n_samples, steps=steps, cfg=cfg, seed=seed,
                          reward_targets=dict(reward_targets or {}), batch_size=batch_size)
    if isinstance(model, str):
        pipe = GroundTruthPipeline() if model == GROUND_TRUTH else load_pipeline(model)
    else:
        pipe = model
    items = [PromptItem(m["prompt"], m) for m in evaluation_metadata()[:limit]]
    return generate_folder(pipe, items, outdir, gcfg, prompts_spec="shapes", progress=progress)


def check_shapes_prompt(md: dict, where: str) -> None:
    """The Shapes detector sees the Shapes classes only: a prompt asking for anything else (a
    GenEval prompt's COCO "bench") would score 0 without a word, so it is refused, named."""
    from miro.shapes.world import CLASSES

    asked = [o.get("class") for o in [*md.get("include", []), *md.get("exclude", [])]]
    unknown = sorted({c for c in asked if c not in CLASSES}, key=str)
    if unknown:
        raise ValueError(f"{where}: asks for {unknown}, which the Shapes detector cannot see (it knows "
                         f"{', '.join(CLASSES)}); score these prompts with a GenEval detector "
                         f"(miro eval geneval DIR --detector <Mask2Former id>)")


def score_folder(root: str | os.PathLike, options: GenEvalOptions | None = None, progress: bool = True) -> dict:
    """Score a GenEval-layout folder with the Shapes detector; returns the summary.

    The same scoring as ``miro eval geneval DIR --detector shapes`` (:func:`miro.eval.geneval.evaluate_folder`):
    ``results.jsonl`` records the settings with each verdict, so either command resumes the other's
    run and rescores what was scored with other options. Besides ``geneval_summary.json`` it writes
    ``shapes_eval_summary.json`` (atomically).
    """
    from miro.eval.geneval import GenEvalLike, GenEvalLikeConfig, ShapesWorldDetector, evaluate_folder

    root = Path(root)
    options = options or SHAPES_EVAL_OPTIONS
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of generated images")
    evaluator = GenEvalLike(GenEvalLikeConfig(detector="shapes", options=options), detector=ShapesWorldDetector())
    summary = evaluate_folder(root, root / RESULTS_FILE, evaluator, progress=progress)
    summary["corrupt_images"] = len(summary["corrupt"])
    summary["options"] = vars(options).copy()
    atomic_write_text(root / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary


__all__ = ["SHAPES_EVAL_OPTIONS", "GroundTruthPipeline", "build_prompt_set", "check_shapes_prompt", "eval_generate",
           "evaluation_metadata", "format_summary", "render_prompt", "score_folder"]
