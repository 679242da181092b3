"""Seconds per SRPO step and peak memory on CPU for the Shapes config.

One SRPO step = an online rollout (no grad) + the denoise and inversion Direct-Align branches
(one guided model forward, pixel decode and reward each, with backward) + the optimiser step.
The reward is the Shapes proxy model (architecture of ``miro.align.proxy_reward``; its weights
do not change the cost). Peak memory is the process's maximum resident set size.

    python benchmarks/bench_align.py                      # batch 1 and 4, 20 rollout steps
    python benchmarks/bench_align.py --batch-sizes 1 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile

import torch

from _args import ArgumentParser, positive_int, run_main  # beside this script


def _rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def bench(batch: int, steps: int, rollout_steps: int, inversion: bool, lora: bool, model: str) -> dict:
    from miro.align.miro_target import MiroTarget, MiroTargetConfig
    from miro.align.prompts import PromptConfig
    from miro.align.proxy_reward import ProxyRewardModel
    from miro.align.relative_reward import SemanticRelativeReward
    from miro.align.step import StepConfig
    from miro.align.trainer import OptimConfig, SRPOTrainer, TrainConfig
    from miro.generate_cli import load_pipeline

    pipe = load_pipeline(model)
    if lora:
        from miro.align.lora import LoraSettings, add_miro_lora

        add_miro_lora(pipe.model, LoraSettings(rank=16))
    target = MiroTarget(pipe, MiroTargetConfig(guidance_scale=3.0))
    proxy = ProxyRewardModel(text_encoder=pipe.text_encoder).eval().requires_grad_(False)
    items = [{"caption": c, "category": "2 objects", "region": "red"} for c in
             ("a photo of a red circle and a blue square", "a photo of two green triangles", "a photo of a cross")]
    cfg = StepConfig(inversion=inversion, rollout_steps=rollout_steps, rollout_shift=None, prompts=PromptConfig(control_words=False))
    with tempfile.TemporaryDirectory() as tmp:
        tr = SRPOTrainer(target, SemanticRelativeReward(proxy), items, cfg, OptimConfig(lr=1e-5),
                         TrainConfig(max_steps=steps + 1, batch_size=batch, out_dir=tmp, checkpoint_every=10**9, progress=False))
        before = _rss_mb()
        hist = tr.fit()
    secs = [h["seconds"] for h in hist[1:]]  # the first step includes one-off setup
    return {"batch": batch, "rollout_steps": rollout_steps, "inversion": inversion, "lora": lora,
            "sec_per_step": sum(secs) / len(secs), "min_sec_per_step": min(secs), "peak_rss_mb": _rss_mb(),
            "rss_before_mb": before, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4], help="batch sizes (integers >= 1)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--rollout-steps", type=positive_int, default=20)
    p.add_argument("--model", default="shapes", help="Shapes pipeline (default falls back to shapes-untrained)")
    p.add_argument("--no-inversion", action="store_true")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--threads", type=positive_int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for b in args.batch_sizes:
        print(json.dumps(bench(b, args.steps, args.rollout_steps, not args.no_inversion, args.lora, args.model)), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
