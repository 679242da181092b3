"""Training-step throughput on one device, GPU or CPU, in the precision a run trains in.

    python benchmarks/bench_gpu.py --config release --batch 64                # the release recipe, per GPU
    python benchmarks/bench_gpu.py --config shapes --batch 256 1024 --optimizer adamw
    python benchmarks/bench_gpu.py --config release --batch 64 --peer /path/to/unpacked/miro   # + published code

One step is the release recipe's (miro_facts §4): the flow loss with self-conditioning 0.9 and text
dropout 0.1 (``flow_loss``), backward, gradient clipping at 2.0, the optimizer (LAMB for the
release, ``--optimizer``), and the EMA update; under ``torch.autocast`` in bf16 (``--precision``),
the weights and the optimizer in fp32 as Lightning's ``bf16-mixed`` keeps them. Inputs are
synthetic (normalised latents, text embeddings with a realistic number of valid tokens, reward
values), so no dataset, VAE or text encoder is involved: this is the model's side of a step.

Printed per batch size: samples/s, ms/step (median, the device synchronised around each step),
peak device memory, model FLOPs of one step (``torch.utils.flop_counter`` over a real step, so
the self-conditioning pass and the backward are counted as they run), achieved TFLOP/s and MFU
against ``--peak-tflops`` (the dense bf16 peak; defaults known for H100/H200/A100). For the
release config the ratio to the paper's throughput: 2.65 it/s x 1024 / 16 H100 = 170 samples/s
per GPU.

``--sample-batch``: also sampling (the model's side of ``MiroPipeline``: ``--sample-steps`` Euler steps
with batched CFG, ``euler_sample``, no text encoder or VAE decode) at these batch sizes: images/s,
peak memory, model FLOPs per image (one step counted, times the steps) and MFU.

``--peer``: also forward + backward of the velocity MSE, ours against the published
implementation with the same weights and inputs (``bench_backbone.Pair``), interleaved, on the
same device and precision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _args import (  # noqa: E402
    ArgumentParser, device as device_arg, nonneg_float, nonneg_int, positive_float, positive_int, run_main)
from bench_backbone import synthetic_inputs  # noqa: E402

from miro.models import CONFIG_NAMES, LossConfig, MiroModel, flow_loss, get_config  # noqa: E402
from miro.io import atomic_write_text  # noqa: E402
from miro.models.sampler import euler_sample  # noqa: E402
from miro.train.ema import EMA  # noqa: E402
from miro.train.optim import OptimizerConfig, build_optimizer  # noqa: E402

PAPER_SAMPLES_PER_GPU = 2.65 * 1024 / 16  # MIRO's release run on 16 H100 (miro_facts §4)
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM data sheets


def default_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def synthetic_batch(cfg: dict, config_name: str, b: int, device: torch.device, seed: int = 0) -> dict:
    """``bench_backbone.synthetic_inputs`` on ``device``: x0 (normalised latents), text, rewards."""
    i = synthetic_inputs(cfg, config_name, b, seed=seed)
    return {"x0": i["y"].to(device), "emb": i["emb"].to(device), "mask": i["mask"].to(device),
            "coh": {k: v.to(device) for k, v in i["coh"].items()}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One training step of ``model`` on a fixed synthetic batch."""

    def __init__(self, model: MiroModel, batch: dict, optimizer: str, precision: str, device: torch.device,
                 foreach: bool | None = None):
        self.model, self.batch, self.device = model.train(), batch, device
        self.opt = build_optimizer(model, OptimizerConfig(name=optimizer, lr=1e-4))
        for group in self.opt.param_groups:  # None: the optimizer's default for the device
            group["foreach"] = foreach
        self.ema = EMA(model, (0.9999,)).to(device)
        self.uncond = torch.randn(1, batch["emb"].shape[-1], device=device)
        self.loss_cfg = LossConfig(self_cond_rate=0.9, cond_drop_rate=0.1)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self.i = 0

    def __call__(self) -> None:
        g = torch.Generator(device=self.device).manual_seed(self.i)
        self.i += 1
        b = self.batch
        with self.autocast:
            loss, _ = flow_loss(self.model, b["x0"], b["emb"], b["mask"], b["coh"], self.uncond, self.loss_cfg, g)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 2.0)
        self.opt.step()
        self.ema.update(self.model)


def time_calls(fns: dict, iters: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median wall seconds per call for each of ``fns``, interleaved, the device synchronised."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def step_flops(step: Step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return float(fc.get_total_flops())


def measure(config: str, batch: int, optimizer: str, precision: str, device: torch.device, iters: int,
            warmup: int, peak_tflops: float | None, foreach: bool | None = None) -> dict:
    cfg = get_config(config)
    torch.manual_seed(0)
    model = MiroModel.from_config(cfg).to(device)
    step = Step(model, synthetic_batch(cfg, config, batch, device), optimizer, precision, device, foreach)
    flops = step_flops(step)  # also the first warm-up step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = time_calls({"step": step}, iters, warmup, device)["step"]
    out = {"config": config, "batch": batch, "optimizer": optimizer, "foreach": foreach, "precision": precision,
           "device": str(device),
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "ms_per_step": 1e3 * sec,
           "samples_per_s": batch / sec, "tflop_per_step": flops / 1e12, "achieved_tflops": flops / sec / 1e12}
    if device.type == "cuda":
        out["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    if peak_tflops:
        out["mfu"] = out["achieved_tflops"] / peak_tflops
    if config == "release":
        out["vs_paper_per_gpu"] = out["samples_per_s"] / PAPER_SAMPLES_PER_GPU
    return out


def measure_sampling(config: str, batch: int, steps: int, cfg_scale: float, precision: str, device: torch.device,
                     iters: int, warmup: int, peak_tflops: float | None) -> dict:
    """Images/s of ``steps`` Euler steps with batched CFG (2B rows a step), as the pipeline samples."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_config(config)
    torch.manual_seed(0)
    model = MiroModel.from_config(cfg).to(device).eval()
    b = synthetic_batch(cfg, config, batch, device)
    uncond = torch.randn(1, b["emb"].shape[-1], device=device)
    noise = torch.randn_like(b["x0"])

    def run(n: int = steps):
        with torch.no_grad():
            return euler_sample(model, noise, b["emb"], b["mask"], uncond, None, num_steps=n,
                                guidance_scale=cfg_scale, autocast=precision == "bf16")

    with FlopCounterMode(display=False) as fc:  # one step: every step runs the same forwards
        run(1)
    flops = float(fc.get_total_flops()) * steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = time_calls({"sample": run}, iters, warmup, device)["sample"]
    out = {"config": config, "mode": "sample", "batch": batch, "steps": steps, "cfg": cfg_scale,
           "precision": precision, "device": str(device), "sec_per_batch": sec, "images_per_s": batch / sec,
           "tflop_per_image": flops / batch / 1e12, "achieved_tflops": flops / sec / 1e12}
    if device.type == "cuda":
        out["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    if peak_tflops:
        out["mfu"] = out["achieved_tflops"] / peak_tflops
    return out


def measure_peer(config: str, batch: int, precision: str, device: torch.device, iters: int, warmup: int,
                 peer: Path, scratch: Path) -> dict:
    """fwd+bwd of the velocity MSE, published code against ours, same weights, inputs and device."""
    from bench_backbone import Pair, load_peer

    pair = Pair(config, load_peer(peer, scratch), full_text=False)
    for m in (pair.peer_net, pair.peer_pre, pair.ours):
        m.to(device)
    i = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
         for k, v in pair.inputs(batch).items()}
    auto = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(which):
        with auto:
            return pair.fwd_bwd(which, i)

    sec = time_calls({"peer": lambda: run("peer"), "ours": lambda: run("ours")}, iters, warmup, device)
    return {"config": config, "batch": batch, "precision": precision, "peer_ms": 1e3 * sec["peer"],
            "ours_ms": 1e3 * sec["ours"], "speedup": sec["peer"] / sec["ours"]}


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIG_NAMES, default="release",
                    help="model config name (release, shapes, tiny)")
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[64], help="per-device batch sizes")
    ap.add_argument("--optimizer", default=None, help="lamb or adamw (default: lamb for release, else adamw)")
    ap.add_argument("--loop-optimizer", action="store_true",
                    help="the optimizer one tensor at a time (default: multi-tensor on CUDA, as torch.optim)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", type=device_arg, default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--iters", type=positive_int, default=20)
    ap.add_argument("--warmup", type=nonneg_int, default=3)
    ap.add_argument("--peak-tflops", type=positive_float, default=None, help="dense peak for MFU (default: known GPUs)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    ap.add_argument("--sample-batch", type=positive_int, nargs="*", default=[],
                    help="also time sampling at these batches")
    ap.add_argument("--sample-steps", type=positive_int, default=50, help="Euler steps per sample")
    ap.add_argument("--sample-iters", type=positive_int, default=3, help="timed samples per batch size")
    ap.add_argument("--cfg", type=nonneg_float, default=7.0, help="guidance scale of the sampling rows")
    ap.add_argument("--peer", type=Path, default=None, help="unpacked published package: also fwd+bwd against it")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/miro_scratch"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.peer:  # checked now, not after the other measurements: one line, exit 2, when it is missing
        from make_parity_fixture import check_peer

        check_peer(args.peer)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    optimizer = args.optimizer or ("lamb" if args.config == "release" else "adamw")
    peak = args.peak_tflops or default_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {args.precision}, optimizer {optimizer}")
    results: list[dict] = []

    def record(r: dict, line: str) -> None:  # printed and saved row by row: a later failure keeps what ran
        results.append(r)
        if "mfu" in r:
            line += f", MFU {100 * r['mfu']:.1f} %"
        if "peak_mem_GiB" in r:
            line += f", peak {r['peak_mem_GiB']:.2f} GiB"
        if "vs_paper_per_gpu" in r:
            line += f"; x{r['vs_paper_per_gpu']:.2f} the paper's {PAPER_SAMPLES_PER_GPU:.0f} samples/s per H100"
        print(line, flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps(results, indent=1))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for b in args.batch:
        r = measure(args.config, b, optimizer, args.precision, device, args.iters, args.warmup, peak,
                    False if args.loop_optimizer else None)
        record(r, f"{args.config} batch {b}: {r['samples_per_s']:.1f} samples/s ({r['ms_per_step']:.1f} ms/step), "
                  f"{1e3 * r['tflop_per_step']:.4g} GFLOP/step, {r['achieved_tflops']:.3g} TFLOP/s")
    for b in args.sample_batch:
        r = measure_sampling(args.config, b, args.sample_steps, args.cfg, args.precision, device, args.sample_iters,
                             1, peak)
        record(r, f"{args.config} sampling batch {b} ({args.sample_steps} steps, CFG {args.cfg:g}): "
                  f"{r['images_per_s']:.2f} images/s ({r['sec_per_batch']:.2f} s/batch), "
                  f"{1e3 * r['tflop_per_image']:.4g} GFLOP/image, {r['achieved_tflops']:.3g} TFLOP/s")
    for b in args.batch if args.peer else []:  # last: the published code is the likeliest to fail somewhere new
        p = measure_peer(args.config, b, args.precision, device, args.iters, args.warmup, args.peer, args.scratch)
        record(p, f"{args.config} batch {b}: fwd+bwd vs published: {p['peer_ms']:.1f} ms vs ours "
                  f"{p['ours_ms']:.1f} ms (x{p['speedup']:.2f})")
    return 0


if __name__ == "__main__":
    run_main(main)
