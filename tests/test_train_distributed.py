"""`miro train` under real DDP (two gloo ranks on the CPU) and resume with DataLoader workers.

The DDP runs go through `tests/_ddp_probe.py`, which runs `miro.train.cli.main` and records, per
rank, the sample keys of every micro-batch, the final weights and every file the rank wrote.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from miro.train import cli
from tests._train_helpers import tiny_overrides, train_until_then_sigkill, write_tiny_shards

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "_ddp_probe.py"
N = 6  # optimizer steps of a DDP run
DDP = ["computer.devices=2", "computer.strategy=ddp", "trainer.accumulate_grad_batches=2", "data.num_workers=2",
       f"scheduler.total_steps={N}"]
# 8 x 4 = 32 samples; global batch 8 = 2 ranks x 2 micro-batches x 2 samples: one epoch is 4 steps.
N_SAMPLES, PER_RANK_BATCH = 32, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), n_shards=8, per=4)


def _probe(root: Path, shards, extra=(), kill_at: int | None = None, timeout=150):
    """Run the probe (2 DDP ranks) into ``root``; returns ``(returncode, probe dir)``."""
    out = root / "probe"
    cmd = [sys.executable, str(PROBE), "train",
           *tiny_overrides(shards, root, steps=N, every=2, extra=[*DDP, *extra])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MIRO_PROBE_DIR": str(out), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("MIRO_PROBE_KILL_AT", None)
    if kill_at is not None:
        env["MIRO_PROBE_KILL_AT"] = str(kill_at)
    # Its own process group: the kill takes every rank and loader worker, and nothing outlives the test.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if kill_at is None:
        assert proc.returncode == 0, err[-3000:]
    return proc.returncode, out


def _batches(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"keys-rank{rank}.jsonl").read_text().splitlines()]


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def _state(out: Path, rank: int) -> dict:
    return torch.load(out / f"state-rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def ddp_indexed(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # image grids and CSV logs on, to see which rank writes them
    _, out = _probe(root, shards, extra=["image_logger.enabled=true", "image_logger.every_n_steps=2",
                                         "image_logger.num_steps=2", "image_logger.max_prompts=4", "logger=csv"])
    return root, out


@pytest.mark.slow  # two DDP ranks x two loader workers on the CPU (gloo)
def test_ddp_ranks_split_each_epoch_and_stay_in_step(ddp_indexed):
    root, out = ddp_indexed
    b = {r: _batches(out, r) for r in (0, 1)}
    # global batch 8 = 2 ranks x 2 accumulated micro-batches x 2 samples; N optimizer steps
    for r in (0, 1):
        assert [len(x["keys"]) for x in b[r]] == [PER_RANK_BATCH] * (2 * N)
        assert [x["step"] for x in b[r]] == [s for s in range(N) for _ in range(2)]
    # every epoch (16 samples per rank) is split into disjoint halves whose union is the data
    per_epoch = N_SAMPLES // 2
    k = {r: _keys(b[r]) for r in (0, 1)}
    epoch0 = {r: k[r][:per_epoch] for r in (0, 1)}
    assert len(set(epoch0[0])) == len(set(epoch0[1])) == per_epoch  # no duplicate within a rank
    assert not set(epoch0[0]) & set(epoch0[1])
    assert len(set(epoch0[0]) | set(epoch0[1])) == N_SAMPLES
    epoch1 = {r: k[r][per_epoch:] for r in (0, 1)}  # the next epoch has begun, disjoint again
    assert epoch1[0] and not set(epoch1[0]) & set(epoch1[1])
    s = {r: _state(out, r) for r in (0, 1)}
    for r in (0, 1):
        assert s[r]["static_graph"]  # the published DDP setting, accumulation or not
        assert s[r]["world_size"] == 2 and s[r]["accumulate"] == 2 and s[r]["batch_size"] == PER_RANK_BATCH
        # the schedule counts optimizer steps, not micro-batches
        assert s[r]["global_step"] == N and s[r]["sched_count"] == N and s[r]["micro_step"] == 2 * N
        assert s[r]["samples_seen"] * 2 == N * 8
    # DDP keeps the ranks' weights (and so their EMA copies) bit for bit identical
    assert s[0]["lr"] == s[1]["lr"]
    for name, w in s[0]["state"].items():
        assert torch.equal(w, s[1]["state"][name]), name


@pytest.mark.slow
def test_only_rank_zero_writes(ddp_indexed):
    root, out = ddp_indexed
    ckdir = root / "miro" / "checkpoints" / "shapes_miro"
    mine = {r: {Path(p) for p in json.loads((out / f"writes-rank{r}.json").read_text())
                if str(root) in p and str(out) not in p} for r in (0, 1)}
    assert mine[1] == set(), sorted(mine[1])
    names = {p.relative_to(ckdir).as_posix() for p in mine[0] if p.is_relative_to(ckdir) and p.is_file()}
    assert {"last.ckpt", "step=2.ckpt", f"step={N}.ckpt", "reward_bins.json", "images/step_00000002.png",
            "logs/version_0/metrics.csv"} <= names
    assert not (ckdir / "logs" / "version_1").exists()
    ck = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert ck["global_step"] == N and ck["MiroDataModule"]["position"] == 2 * N * PER_RANK_BATCH
    # rank 0's own count is what it resumes from; the curves' x axis counts both ranks' samples
    assert ck["miro"]["samples_seen"] == N * 4 and ck["miro"]["samples_seen_global"] == N * 8


@pytest.mark.slow
def test_ddp_resampled_streams_differ_across_ranks(shards, tmp_path):
    _, out = _probe(tmp_path, shards, extra=["data.mode=resampled", "data.shuffle_buffer=4"])
    k = {r: _keys(_batches(out, r)) for r in (0, 1)}
    assert len(k[0]) == len(k[1]) == 2 * N * PER_RANK_BATCH
    # shards are drawn with replacement, so ranks may meet the same sample; but each rank (and
    # each of its workers) draws its own stream: never the same sequence on two ranks
    assert k[0] != k[1]
    assert sum(a == b for a, b in zip(k[0], k[1])) < len(k[0]) // 2
    s = {r: _state(out, r) for r in (0, 1)}
    for name, w in s[0]["state"].items():
        assert torch.equal(w, s[1]["state"][name]), name


@pytest.mark.slow
def test_ddp_sigkill_then_resume_continues_the_data_and_the_weights(ddp_indexed, shards, tmp_path):
    _, full = ddp_indexed
    root = tmp_path / "k"
    rc, out = _probe(root, shards, kill_at=4)
    assert rc == -signal.SIGKILL
    ckdir = root / "miro" / "checkpoints" / "shapes_miro"
    ck = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 4 and ck["MiroDataModule"]["position"] == 4 * 2 * PER_RANK_BATCH
    before = {r: _batches(out, r) for r in (0, 1)}
    for f in out.glob("keys-rank*.jsonl"):
        f.unlink()
    _probe(root, shards)  # the same command again: resume=auto
    after = {r: _batches(out, r) for r in (0, 1)}
    for r in (0, 1):
        assert [x["step"] for x in after[r]] == [4, 4, 5, 5]
        # the killed run's batches up to step 4, then the resumed run's: the uninterrupted order
        got = [x["keys"] for x in before[r] if x["step"] < 4] + [x["keys"] for x in after[r]]
        assert got == [x["keys"] for x in _batches(full, r)]
    s, ref = {r: _state(out, r) for r in (0, 1)}, _state(full, 0)
    assert s[0]["global_step"] == N and s[0]["sched_count"] == N and s[0]["micro_step"] == 2 * N
    for name, w in ref["state"].items():
        assert torch.equal(s[0]["state"][name], s[1]["state"][name]), name
        # The first step after a restart all-reduces every micro-batch (miro/train/ddp.py) where
        # the uninterrupted run accumulated locally: the sums differ in rounding only, which
        # Adam amplifies for the few parameters whose gradient is ~0 (key-norm biases).
        torch.testing.assert_close(s[0]["state"][name], w, rtol=1e-4, atol=5e-5, msg=name)  # measured: 6e-6


# -- one process, DataLoader workers -------------------------------------------------------------

def _run(overrides):
    cfg = OmegaConf.to_container(cli.compose(overrides), resolve=True)
    module, dm, trainer, ckpt = cli.build(cfg)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module, dm, trainer


def _assert_same_weights(a, b):
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_with_loader_workers_equals_uninterrupted(shards, tmp_path):
    sched = ["scheduler.total_steps=6"]
    workers = ["data.num_workers=2", *sched]
    # the reference reads in the main process: workers must not change what is read, or in which order
    full, _, _ = _run(tiny_overrides(shards, tmp_path / "a", steps=6, every=3, extra=sched))
    part, _, t = _run(tiny_overrides(shards, tmp_path / "b", steps=3, every=3, extra=workers))
    assert t.global_step == 3
    res, dm, t2 = _run(tiny_overrides(shards, tmp_path / "b", steps=6, every=3, extra=workers))  # resume=auto
    assert t2.global_step == 6 and res.micro_step == 6 and dm.position == 6 * 8
    assert t2.lr_scheduler_configs[0].scheduler.last_epoch == 6
    _assert_same_weights(full, res)


@pytest.mark.slow
def test_sigkill_with_loader_workers_then_resume(shards, tmp_path):
    root = tmp_path / "k"
    ckdir = root / "miro" / "checkpoints" / "shapes_miro"
    extra = ["scheduler.total_steps=200", "data.num_workers=2"]
    train_until_then_sigkill(tiny_overrides(shards, root, steps=100, every=2, extra=extra), ckdir / "step=4.ckpt")
    ck = torch.load(ckdir / "last.ckpt", weights_only=True)
    k = int(ck["global_step"])
    assert k >= 2 and k % 2 == 0 and ck["MiroDataModule"]["position"] == 8 * k
    res, dm, t = _run(tiny_overrides(shards, root, steps=k + 2, every=2, extra=extra))
    assert t.global_step == k + 2 and dm.position == 8 * (k + 2)
    full, _, _ = _run(tiny_overrides(shards, tmp_path / "full", steps=k + 2, every=1000,
                                     extra=["scheduler.total_steps=200"]))
    _assert_same_weights(full, res)
