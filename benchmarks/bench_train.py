"""Training throughput of the `shapes_miro` recipe on CPU, and data-loading throughput alone.

    python benchmarks/bench_train.py [--data DIR] [--steps 20] [--threads 2] [--device cuda] [HYDRA_OVERRIDE ...]

Without ``--data`` a 1,000-sample Shapes dataset is written to a temporary folder first
(``miro shapes make-dataset``). Training = one full optimizer step of the LightningModule
(text encoding on the fly when the shards carry no embeddings, flow loss with self-conditioning,
backward, clipping, AdamW, EMA), timed after warm-up steps, on batches already in memory.
Loading = the training DataLoader (indexed tar reads, PNG decode, reward binning, collate)
with the recipe's worker count and with none. The loader must outpace training by >= 2x.
``--device cuda``: the step on the GPU under bf16 autocast (what ``bf16-mixed`` runs), batches
moved to it inside the timed step, the device synchronised around it; beside ``bench_gpu.py``
(the model's step on synthetic inputs) it tells what the module adds, on-the-fly text encoding
first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import torch

from _args import ArgumentParser, device as device_arg, nonneg_int, positive_int, run_main  # beside this script


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="Shapes dataset folder (default: make 1,000 samples)")
    ap.add_argument("--steps", type=positive_int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=nonneg_int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--load-batches", type=positive_int, default=60)
    ap.add_argument("--device", type=device_arg, default="cpu", help="where the step runs (cuda: bf16 autocast)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe, e.g. "
                    "+model.overrides.network.patch_size=2")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    data = args.data
    if data is None:
        data = f"{tmp.name}/shapes"
        subprocess.run([sys.executable, "-m", "miro.cli", "shapes", "make-dataset", "--out", data,
                        "--num-samples", "1000", "--shard-size", "250", "--no-progress"], check=True)
    from omegaconf import OmegaConf

    from miro.train import cli

    cfg = OmegaConf.to_container(cli.compose([
        "experiment=shapes_miro", f"data_dir={data}", f"root_dir={tmp.name}/run", "image_logger.enabled=false",
        "logger=none", f"computer.threads={args.threads}", *args.overrides]), resolve=True)
    module, dm, trainer, _ = cli.build(cfg)
    dm.prepare()
    bs = dm.cfg.batch_size

    # ---- data loading alone
    results = {}
    for workers in sorted({0, dm.cfg.num_workers}):
        dm.cfg.num_workers = workers
        it = iter(dm.train_dataloader())
        next(it)  # worker start-up excluded
        t0 = time.perf_counter()
        for _ in range(args.load_batches):
            next(it)
        results[workers] = args.load_batches * bs / (time.perf_counter() - t0)
        del it

    # ---- training step (module compute only; batches pre-loaded)
    dm.cfg.num_workers = 0
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(args.steps + args.warmup)]
    device = torch.device(args.device)
    module.to(device)
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i, b in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        b = module.transfer_batch_to_device(b, device, 0)
        g = torch.Generator(device=device).manual_seed(i)
        with autocast:
            loss, _ = module.compute_loss(b, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 2.0)
        opt.step()
        module.ema.update(module.model)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    train_sps = bs * len(times) / sum(times)
    n_params = sum(p.numel() for p in module.model.parameters())
    print(f"shapes_miro {' '.join(args.overrides)}: {n_params / 1e6:.2f}M params, batch {bs}, "
          f"text {dm.cfg.text_source}, threads {args.threads}, device {device}")
    print(f"training: {train_sps:.1f} samples/s ({1000 * sum(times) / len(times):.0f} ms/step)")
    for w, sps in results.items():
        print(f"data loading, {w} workers: {sps:.1f} samples/s ({sps / train_sps:.1f}x training)")
    best = max(results.values())
    print(f"loader/training ratio: {best / train_sps:.1f}x (target >= 2x): {'OK' if best >= 2 * train_sps else 'LOW'}")


if __name__ == "__main__":
    run_main(main)
