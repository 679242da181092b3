"""Runs ``miro train`` (``miro.train.cli.main``) with the given arguments and records, per rank,
what the run did, under ``$MIRO_PROBE_DIR``:

* ``keys-rank<r>.jsonl`` — one line per training micro-batch: the optimizer step it belongs to,
  the stream position after it and the keys of its samples (appended and flushed as the run
  goes, so a killed run leaves the batches it consumed);
* ``state-rank<r>.pt`` — at the end of training: model + EMA weights, step counters, the lr
  scheduler's count and this rank's batch size;
* ``writes-rank<r>.json`` — every path this rank opened for writing or renamed into place
  (checkpoints, reward_bins.json, image grids, logs), seen through a Python audit hook.

With ``MIRO_PROBE_KILL_AT=k``, rank 0 SIGKILLs its whole process group (every rank and loader
worker) when the first micro-batch after optimizer step k arrives, i.e. right after step k's
checkpoint. It does so only when it leads its own process group (started with
``start_new_session=True``), so it can never take the test runner with it.

Run as a script (``python tests/_ddp_probe.py train key=value ...``): Lightning's DDP launcher
starts the other ranks by re-running this same command line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

OUT = Path(os.environ["MIRO_PROBE_DIR"])
_writes: list[str] = []
_main_pid = os.getpid()


def _rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))  # one node


def _audit(event, args):
    if os.getpid() != _main_pid:  # DataLoader workers only read
        return
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode = args[1] if isinstance(args[1], str) else ""
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            _writes.append(os.fsdecode(args[0]))
    elif event == "os.rename":
        _writes.append(os.fsdecode(args[1]))
    elif event == "os.mkdir":
        _writes.append(os.fsdecode(args[0]))


def _install() -> None:
    import torch

    from miro.data import datamodule as dmod
    from miro.train import module as mmod

    class KeyCollate(dmod._Collate):
        def __call__(self, samples):
            batch = super().__call__(samples)
            batch["keys"] = [s["key"] for s in samples]
            return batch

    dmod._Collate = KeyCollate
    before = dmod.MiroDataModule.on_before_batch_transfer

    def on_before_batch_transfer(self, batch, dataloader_idx=0):
        keys = batch.pop("keys")
        t = self.trainer
        kill_at = os.environ.get("MIRO_PROBE_KILL_AT")
        if kill_at and t.global_rank == 0 and t.global_step >= int(kill_at) and os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        rec = {"step": int(t.global_step), "position": int(batch["position"]), "keys": keys}
        with open(OUT / f"keys-rank{t.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        return before(self, batch, dataloader_idx)

    dmod.MiroDataModule.on_before_batch_transfer = on_before_batch_transfer

    def on_train_end(self):
        t = self.trainer
        sched = t.lr_scheduler_configs[0].scheduler
        torch.save({"state": {k: v.detach().clone() for k, v in self.state_dict().items()},
                    "global_step": int(t.global_step), "micro_step": int(self.micro_step),
                    "samples_seen": int(self.samples_seen), "sched_count": int(sched.last_epoch),
                    "lr": float(t.optimizers[0].param_groups[0]["lr"]), "world_size": int(t.world_size),
                    "accumulate": int(t.accumulate_grad_batches), "batch_size": int(t.datamodule.cfg.batch_size),
                    "strategy": type(t.strategy).__name__,
                    "static_graph": bool(getattr(t.strategy, "_ddp_kwargs", {}).get("static_graph", False))},
                   OUT / f"state-rank{t.global_rank}.pt")

    mmod.MiroLightningModule.on_train_end = on_train_end


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sys.addaudithook(_audit)
    _install()
    from miro.train.cli import main

    assert sys.argv[1] == "train"
    rc = main(sys.argv[2:])
    (OUT / f"writes-rank{_rank()}.json").write_text(json.dumps(_writes))
    sys.exit(rc)
