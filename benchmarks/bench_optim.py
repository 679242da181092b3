"""LAMB's update alone, one tensor at a time against multi-tensor (``foreach``), on a model's parameters.

    python benchmarks/bench_optim.py --config release --device cpu --threads 2
    python benchmarks/bench_optim.py --config release --device cuda

Random gradients on every parameter of ``MiroModel`` (``--config``), the published two groups
(``build_optimizer``), then median wall ms of ``optimizer.step()`` for each form, interleaved, the
device synchronised around each step (``bench_gpu.time_calls``). ``Lamb(foreach=None)`` picks foreach on CUDA and the loop on
the CPU; this is the measurement behind that choice (docs/benchmarks.md, "One GPU").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _args import ArgumentParser, device as device_arg, positive_int, run_main  # noqa: E402
from bench_gpu import time_calls  # noqa: E402

from miro.models import CONFIG_NAMES, MiroModel, get_config  # noqa: E402
from miro.train.optim import OptimizerConfig, build_optimizer  # noqa: E402


def measure(config: str, device: torch.device, iters: int) -> dict:
    """Median ms of ``optimizer.step()`` for the loop and the foreach form, and the tensor count."""
    torch.manual_seed(0)
    model = MiroModel.from_config(get_config(config)).to(device)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn_like(p)
    opts = {}
    for name, foreach in (("loop", False), ("foreach", True)):
        opts[name] = build_optimizer(model, OptimizerConfig(name="lamb", lr=1e-4))
        for group in opts[name].param_groups:
            group["foreach"] = foreach
    sec = time_calls({name: opt.step for name, opt in opts.items()}, iters, 1, device)  # warm-up allocates state
    return {"tensors": sum(1 for _ in model.parameters()), **{k: 1e3 * v for k, v in sec.items()}}


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIG_NAMES, default="release",
                    help="model config name (release, shapes, tiny)")
    ap.add_argument("--device", type=device_arg, default="cpu")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    ap.add_argument("--iters", type=positive_int, default=5)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    r = measure(args.config, device, args.iters)
    print(f"{args.config} on {device}: {r['tensors']} tensors, LAMB step loop {r['loop']:.1f} ms, "
          f"foreach {r['foreach']:.1f} ms (loop / foreach x{r['loop'] / r['foreach']:.2f})")
    return 0


if __name__ == "__main__":
    run_main(main)
