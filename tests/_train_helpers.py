"""Tiny Shapes-like shards and tiny training configs shared by the training tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from miro.data import schema

SHAPES_KEYS = ["shapes_alignment", "shapes_counting", "shapes_position", "shapes_sharpness", "shapes_contrast"]


def write_tiny_shards(out, n_shards=2, per=16, res=8, seed=0):
    """Flat-colour images whose colour is a function of the reward (so there is signal to learn)."""
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        samples = []
        for j in range(per):
            i = s * per + j
            r = float(rng.uniform())
            img = np.zeros((res, res, 3), np.uint8)
            img[:] = (int(255 * r), 40, 200)
            meta = {"synthetic_caption": f"synthetic {i}"}
            for k in SHAPES_KEYS:
                meta[k] = r
                meta["synthetic_" + k] = r
            samples.append({"__key__": f"k{i:05d}", "png": Image.fromarray(img), "txt": "a photo of a red circle",
                            "json": meta,
                            "minilm_embeddings.npy": rng.standard_normal((3 + i % 3, 384)).astype(np.float16),
                            "synthetic_minilm_embeddings.npy": rng.standard_normal((2, 384)).astype(np.float16)})
        schema.write_shard(f"{out}/shard-{s:05d}.tar", samples)
    return out


def tiny_overrides(data_dir, root_dir, steps=6, every=3, extra=()):
    return [
        "experiment=shapes_miro", "model=tiny", f"data_dir={data_dir}", f"root_dir={root_dir}",
        "data.image_size=8", "data.global_batch_size=8", "data.num_workers=0", f"trainer.max_steps={steps}",
        "scheduler.warmup_steps=2", f"checkpoint.every_n_steps={every}", "image_logger.enabled=false",
        "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "logger=none", "computer.threads=1",
        "++model.overrides={network: {num_blocks: 1, num_text_registers: 2}}", *extra,
    ]


def train_until_then_sigkill(overrides, checkpoint: Path, timeout: float = 120.0) -> None:
    """Run ``miro train OVERRIDES`` in a process group of its own until ``checkpoint`` exists, then
    SIGKILL the whole group (the trainer and its loader workers), as a node failure would."""
    cmd = [sys.executable, "-m", "miro.cli", "train", *overrides]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not checkpoint.exists():
            assert proc.poll() is None, "training exited early"
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
