"""LAMB's update alone, one tensor at a time against multi-tensor (``foreach``), on a model's parameters.

    python benchmarks/bench_optim.py --config release --device cpu --threads 2
    python benchmarks/bench_optim.py --config release --device cuda

Random gradients on every parameter of ``MiroModel`` (``--config``), the published two groups
(``build_optimizer``), then median wall ms of ``optimizer.step()`` for each form, interleaved, the
device synchronised around each step. ``Lamb(foreach=None)`` picks foreach on CUDA and the loop on
the CPU; this is the measurement behind that choice (docs/benchmarks.md, "One GPU").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from miro.models import MiroModel, get_config
from miro.train.optim import OptimizerConfig, build_optimizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="release", help="model config name (release, shapes, tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MiroModel.from_config(get_config(args.config)).to(device)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn_like(p)
    opts = {}
    for name, foreach in (("loop", False), ("foreach", True)):
        opts[name] = build_optimizer(model, OptimizerConfig(name="lamb", lr=1e-4))
        for group in opts[name].param_groups:
            group["foreach"] = foreach
        opts[name].step()  # state allocated outside the timing
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.iters):
        for name, opt in opts.items():
            sync()
            t = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    n = sum(1 for _ in model.parameters())
    print(f"{args.config} on {device}: {n} tensors, LAMB step loop {ms['loop']:.1f} ms, foreach {ms['foreach']:.1f} ms "
          f"(loop / foreach x{ms['loop'] / ms['foreach']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
