"""Side-by-side timing of ``MiroPipeline.__call__``: ours vs the published ``miro-t2i`` 0.1.4.

Both pipelines hold the same weights (the parity fixture folder ``tests/fixtures/pipeline``:
seven rewards, self-conditioning, cond RIN blocks, tiny T5 and AutoencoderKL stand-ins), run
eager fp32 on the CPU with the same thread count, and get the same call (prompts, n images,
steps, CFG, seed). Each configuration is timed ``--repeats`` times after one warm-up call; the
median is reported, together with a check that both return identical uint8 images.

    python benchmarks/bench_pipeline.py --steps 20 --n 8 --threads 1

Needs the renamed copy of the published package made by ``make_parity_fixture.load_peer``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
FIX = HERE.parent / "tests" / "fixtures" / "pipeline"
sys.path.insert(0, str(HERE))
from _args import ArgumentParser, positive_int, run_main  # noqa: E402


def build_peer(peer: Path, scratch: Path):
    sys.path.insert(0, str(HERE))
    from make_parity_fixture import load_peer

    CADRINTextCond, FlowPrecond, _, _, LinearScheduler = load_peer(peer, scratch)
    from diffusers import AutoencoderKL
    from miro_peer.models.postprocessing import VAEDecoderPostProcessing
    from miro_peer.models.preprocessing import PrecomputedSDLatentPreconditioning
    from miro_peer.pipeline import MiroPipeline as PeerPipeline
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, T5EncoderModel

    cfg = json.loads((FIX / "published" / "config.json").read_text())
    state = load_file(str(FIX / "published" / "model.safetensors"))

    def part(prefix):
        return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}

    net = CADRINTextCond(**cfg["network"])
    net.load_state_dict(part("network"))
    pre = FlowPrecond(**cfg["preconditioning"])
    pre.load_state_dict(part("preconditioning"))
    dpre = PrecomputedSDLatentPreconditioning(**cfg["data_preprocessing"])
    dpre.load_state_dict(part("data_preprocessing"), strict=False)
    post = VAEDecoderPostProcessing(vae=AutoencoderKL.from_pretrained(FIX / "vae"), **cfg["postprocessing"])
    post.load_state_dict(part("postprocessing"), strict=False)
    uncond = torch.from_numpy(np.load(FIX / "published" / "uncond_embedding.npy"))
    return PeerPipeline(net, pre, dpre, post, LinearScheduler(**cfg["scheduler"]), uncond, cfg,
                        text_encoder=T5EncoderModel.from_pretrained(FIX / "t5").eval(),
                        tokenizer=AutoTokenizer.from_pretrained(FIX / "t5"))


def timed(fn, repeats: int):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", type=Path, default=Path("/tmp/peer/unpacked/miro"))
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/miro_scratch"))
    ap.add_argument("--steps", type=positive_int, default=20)
    ap.add_argument("--n", type=positive_int, default=8, help="images per prompt (2 prompts)")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--repeats", type=positive_int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from make_parity_fixture import check_peer

    check_peer(args.peer)  # before loading anything: one line, exit 2, when it is missing
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    from miro.pipeline import MiroPipeline

    ours = MiroPipeline.from_pretrained(FIX / "published", text_encoder=str(FIX / "t5"), vae=str(FIX / "vae"))
    ours.set_progress_bar_config(disable=True)
    peer = build_peer(args.peer, args.scratch)
    prompts = ["two red circles above a blue square", "a green star"]
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.0, num_images_per_prompt=args.n,
              output_type="numpy", reward_targets={"aesthetic_score": 0.625})
    t_ours, a = timed(lambda: ours(prompts, generator=torch.Generator().manual_seed(0), **kw), args.repeats)
    t_peer, b = timed(lambda: peer(prompts, generator=torch.Generator().manual_seed(0), **kw), args.repeats)
    n_img = len(prompts) * args.n
    print(f"{n_img} images x {args.steps} steps, batched CFG, {args.threads} thread(s), median of {args.repeats}")
    print(f"ours      {t_ours:.3f} s  ({n_img * args.steps / t_ours:.1f} image-steps/s)")
    print(f"published {t_peer:.3f} s  ({n_img * args.steps / t_peer:.1f} image-steps/s)")
    print(f"ratio published/ours = {t_peer / t_ours:.2f}; identical uint8 images: {np.array_equal(a, b)}")
    return 0


if __name__ == "__main__":
    run_main(main)
