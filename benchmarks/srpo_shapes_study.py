"""SRPO reward-hacking study in the Shapes world: proxy reward vs exact reward over SRPO steps.

1. Train (or load) the learned Shapes proxy reward (``miro.align.proxy_reward``), a small
   text-conditioned differentiable model of the exact ``shapes_alignment``.
2. Run online SRPO on a Shapes MIRO base model with the proxy as reward, twice: with the
   inversion branch and without it (the configuration SRPO's authors name for reproducing
   reward hacking). Reward prompts are the MIA analogue: p+ = caption + attribute phrase
   (object count and colours, implied by the caption), p− = caption; the generator sees only
   the caption.
3. Every ``--eval-every`` steps, generate fixed prompts × seeds and score them with the proxy
   (predicted alignment) and the exact ``shapes_alignment`` (detector-based).
4. Write ``results.json``, ``table.md``, ``plot.png`` and ``samples.png`` (one row per model:
   the base, then each arm's final weights; same prompts and seeds) to ``--out``.

    python benchmarks/srpo_shapes_study.py --out /tmp/srpo-study               # defaults
    python benchmarks/srpo_shapes_study.py --steps 4 --proxy-samples 200 ...    # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _args import (  # beside this script
    ArgumentParser, finite_float, nonneg_float, nonneg_int, positive_float, positive_int, run_main)


def shapes_items(n: int, seed: int = 0) -> list[dict]:
    """ShapesEval prompts as SRPO items; MIA analogue attributes from the metadata."""
    from miro.shapes.eval import evaluation_metadata

    md = evaluation_metadata()
    rng = np.random.default_rng(seed)
    items = []
    for i in rng.permutation(len(md))[:n]:
        m = md[int(i)]
        count = sum(int(c.get("count", 1)) for c in m["include"])
        colours = sorted({c["color"] for c in m["include"] if c.get("color")})
        items.append({"caption": m["prompt"], "category": f"{count} object" + ("s" if count > 1 else ""),
                      "region": " and ".join(colours) or None, "tag": m.get("tag")})
    return items


def evaluate(target, proxy, items: list[dict], seeds: list[int], steps: int) -> dict:
    """Proxy score s(x, caption), the optimised relative term s(x, p+) − s(x, p−), and the exact rewards."""
    from miro.align import mia_prompts
    from miro.shapes.rewards import score_all

    prompts = [it["caption"] for it in items]
    caps = [p for p in prompts for _ in seeds]
    pairs = [mia_prompts(it["caption"], it.get("category"), it.get("region")) for it in items for _ in seeds]
    noise = torch.cat([torch.randn(target.latent_shape(1), generator=torch.Generator().manual_seed(s)) for _ in prompts for s in seeds])
    with torch.no_grad():
        images = target.decode(target.rollout(noise.to(target.device), target.encode_condition(caps), num_steps=steps, shift=None))
        proxy_scores = proxy.score(images, caps).float().cpu()
        img_emb = proxy.embed_image(images)
        relative = (proxy.similarity(img_emb, proxy.embed_text([p for p, _ in pairs]))
                    - proxy.similarity(img_emb, proxy.embed_text([q for _, q in pairs]))).float().cpu()
    exact = score_all(images.cpu(), caps, ("shapes_alignment", "shapes_sharpness", "shapes_contrast"))
    return {"proxy": float(proxy_scores.mean()), "proxy_relative": float(relative.mean()), "exact_alignment": float(exact["shapes_alignment"].mean()),
            "exact_sharpness": float(exact["shapes_sharpness"].mean()), "exact_contrast": float(exact["shapes_contrast"].mean())}


def run_arm(name: str, args, proxy, items, eval_items) -> list[dict]:
    from miro.align.miro_target import MiroTarget, MiroTargetConfig
    from miro.align.prompts import PromptConfig
    from miro.align.relative_reward import SemanticRelativeReward
    from miro.align.step import StepConfig
    from miro.align.trainer import OptimConfig, SRPOTrainer, TrainConfig
    from miro.generate_cli import load_pipeline

    pipe = load_pipeline(args.base)
    target = MiroTarget(pipe, MiroTargetConfig(guidance_scale=args.guidance))
    seeds = list(range(args.eval_seeds))
    log = []

    def record(step, metrics=None):
        t0 = time.perf_counter()
        row = {"arm": name, "step": step, **evaluate(target, proxy, eval_items, seeds, args.rollout_steps)}
        if metrics:
            row["train_denoise_reward"] = metrics.get("denoise/reward")
        row["eval_seconds"] = time.perf_counter() - t0
        log.append(row)
        print(json.dumps(row), flush=True)

    record(0)
    step_cfg = StepConfig(inversion=(name == "with_inversion"), rollout_steps=args.rollout_steps, rollout_shift=None,
                          loss=args.loss, discount_denoise=tuple(args.discount_denoise), discount_inv=tuple(args.discount_inv),
                          prompts=PromptConfig(control_words=False))
    trainer = SRPOTrainer(target, SemanticRelativeReward(proxy), items, step_cfg,
                          OptimConfig(lr=args.lr, max_grad_norm=args.max_grad_norm),
                          TrainConfig(max_steps=args.steps, batch_size=args.batch_size, seed=args.seed, checkpoint_every=args.steps,
                                      out_dir=str(Path(args.out) / name), resume=False, progress=False),
                          callback=lambda s, m: record(s, m) if s % args.eval_every == 0 or s == args.steps else None)
    trainer.fit()
    # the tuned model as a pipeline folder, for ShapesEval next to shapes_miro:
    # python benchmarks/shapes_training_study.py table --model srpo=OUT/<arm>/pipeline --model miro=...
    pipe.save_pretrained(Path(args.out) / name / "pipeline")
    return log


def write_outputs(out: Path, rows: list[dict], proxy_metrics: dict, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "proxy": proxy_metrics, "rows": rows}, indent=1))
    lines = ["| arm | step | proxy s(x, caption) | proxy s(x,p+) − s(x,p−) | exact alignment | exact sharpness | exact contrast |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['step']} | {r['proxy']:.3f} | {r['proxy_relative']:.4f} | {r['exact_alignment']:.3f} "
                     f"| {r['exact_sharpness']:.3f} | {r['exact_contrast']:.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    from miro.eval.plots import _plt, _save

    fig, ax = _plt().subplots(1, 3, figsize=(14, 4))
    panels = (("proxy_relative", "optimised: proxy s(x,p+) − s(x,p−)", "relative reward"),
              ("proxy", "proxy s(x, caption) (learned)", "predicted alignment"),
              ("exact_alignment", "truth: exact shapes_alignment", "alignment"))
    for arm, style in (("with_inversion", "-"), ("without_inversion", "--")):
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        steps = [r["step"] for r in rs]
        for a, (key, _, _) in zip(ax, panels):
            a.plot(steps, [r[key] for r in rs], style, marker="o", label=arm)
    for a, (_, title, ylabel) in zip(ax, panels):
        a.set(title=title, xlabel="SRPO step", ylabel=ylabel)
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out / "plot.png")
    print((out / "table.md").read_text())


def write_grid(out: Path, args, eval_items: list[dict], n: int = 8, cell: int = 96) -> Path:
    """``samples.png``: the base and every finished arm on the same prompts and noise."""
    from PIL import Image

    from miro.generate_cli import load_pipeline

    sources = [args.base] + [str(out / arm / "pipeline") for arm in args.arms if (out / arm / "pipeline").is_dir()]
    prompts = [it["caption"] for it in eval_items[:n]]
    grid = Image.new("RGB", (cell * len(prompts), cell * len(sources)), "white")
    for r, src in enumerate(sources):
        pipe = load_pipeline(src)
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        images = pipe(prompts, num_inference_steps=args.rollout_steps, guidance_scale=args.guidance, generator=gens,
                      output_type="pil")
        for c, im in enumerate(getattr(images, "images", images)):
            grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, r * cell))
    grid.save(out / "samples.png")
    return out / "samples.png"


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="srpo-shapes-study", help="output folder")
    p.add_argument("--base", default="shapes", help="Shapes pipeline to align (the study uses the shapes_baseline "
                   "checkpoint): built-in name, folder or .ckpt")
    p.add_argument("--proxy", default=None, help="trained proxy folder (else one is trained into OUT/proxy)")
    p.add_argument("--proxy-samples", type=positive_int, default=4000,
                   help="web-like samples for the proxy (3 pairs each)")
    p.add_argument("--proxy-epochs", type=positive_int, default=30)
    p.add_argument("--steps", type=positive_int, default=60, help="SRPO steps per arm")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW lr (upstream 5e-6 is for 12B FLUX; a 5M model needs more)")
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    p.add_argument("--loss", default="maximize", choices=("hinge", "maximize"))
    p.add_argument("--discount-denoise", type=finite_float, nargs=2, default=(0.1, 0.25))
    p.add_argument("--discount-inv", type=finite_float, nargs=2, default=(0.3, 0.01))
    p.add_argument("--guidance", type=nonneg_float, default=3.0, help="MIRO CFG w of rollouts")
    p.add_argument("--rollout-steps", type=positive_int, default=20)
    p.add_argument("--prompts", type=positive_int, default=64, help="training prompts (ShapesEval subset)")
    p.add_argument("--eval-prompts", type=positive_int, default=16)
    p.add_argument("--eval-seeds", type=positive_int, default=2)
    p.add_argument("--eval-every", type=positive_int, default=10)
    p.add_argument("--arms", nargs="+", choices=["with_inversion", "without_inversion"],
                   default=["with_inversion", "without_inversion"], help="arms to run (only with_inversion inverts)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--redraw", action="store_true", help="only redraw table.md, plot.png and samples.png from "
                   "OUT/results.json and the finished arms")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.redraw:
        saved = json.loads((out / "results.json").read_text())
        write_outputs(out, saved["rows"], saved["proxy"], argparse.Namespace(**saved["args"]))
        print(write_grid(out, args, shapes_items(args.eval_prompts, args.seed + 1)))
        return 0
    from miro.align.proxy_reward import ProxyRewardModel, ProxyTrainConfig, make_pairs, train_proxy
    from miro.generate_cli import load_pipeline

    load_pipeline(args.base)  # a bad --base fails now, in one line, not after the proxy has trained
    if args.proxy:
        proxy, proxy_metrics = ProxyRewardModel.load(args.proxy), {"loaded": args.proxy}
    else:
        t0 = time.perf_counter()
        pairs = make_pairs(args.proxy_samples, seed=args.seed, progress=True)
        proxy, proxy_metrics = train_proxy(pairs, train=ProxyTrainConfig(epochs=args.proxy_epochs, seed=args.seed), progress=True)
        proxy_metrics["seconds"] = time.perf_counter() - t0
        proxy.save(out / "proxy")
        print("proxy:", json.dumps(proxy_metrics), flush=True)
    items = shapes_items(args.prompts, args.seed)
    eval_items = shapes_items(args.eval_prompts, args.seed + 1)
    rows = []
    for arm in args.arms:
        rows += run_arm(arm, args, proxy, items, eval_items)
    write_outputs(out, rows, proxy_metrics, args)
    write_grid(out, args, eval_items)
    return 0


if __name__ == "__main__":
    run_main(main)
