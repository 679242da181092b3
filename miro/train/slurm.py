"""``miro train --write-sbatch FILE``: an sbatch script for the composed run.

Lightning reads ranks from the SLURM environment (``SLURMEnvironment``) when ``srun`` starts one
task per GPU, so the script only has to ask for ``computer.num_nodes`` nodes with
``computer.devices`` tasks and GPUs each (Lightning's SLURM guide: ``--ntasks-per-node`` must
equal ``devices``), and run the same ``miro train`` command under ``srun``. Resubmitting it resumes from
``last.ckpt`` (``resume=auto``); ``--signal=SIGUSR1@120`` lets Lightning save before a time-out.

Partition, account, time limit and memory come from ``MIRO_SLURM_PARTITION``, ``MIRO_SLURM_ACCOUNT``,
``MIRO_SLURM_TIME`` and ``MIRO_SLURM_MEM`` (``.env``; variables already set win), written into the script so ``sbatch``
needs no environment. Slurm does not create the ``--output`` folder, so it is made here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from miro.io import atomic_write_text

SLURM_ENV = {"partition": "MIRO_SLURM_PARTITION", "account": "MIRO_SLURM_ACCOUNT", "time": "MIRO_SLURM_TIME",
             "mem": "MIRO_SLURM_MEM"}


def sbatch_script(cfg: dict, overrides: list[str], workdir: str | os.PathLike, env=os.environ) -> str:
    """The script's text: #SBATCH lines from ``cfg["computer"]`` and the environment, then
    ``srun miro train`` with ``overrides`` (each shell-quoted) from ``workdir``."""
    comp = cfg["computer"]
    devices, nodes = int(comp["devices"]), int(comp["num_nodes"])
    gpu = str(comp.get("accelerator")) in ("gpu", "cuda")
    logs = log_dir(cfg, workdir)
    # #SBATCH lines are not shell-parsed: a value there must be one plain word
    if re.search(r"\s", str(logs)):
        raise ValueError(f"the job's log folder {str(logs)!r} (root_dir={cfg['root_dir']!r}) contains whitespace, "
                         "which an #SBATCH --output line cannot hold; choose a root_dir without spaces")
    job = re.sub(r"[^A-Za-z0-9_.-]", "_", f"miro-{cfg['experiment_name']}")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={devices}"]
    if gpu:
        lines.append(f"#SBATCH --gpus-per-node={devices}")
    # each rank's loader workers need cores of their own (many sites give a task one by default);
    # srun no longer inherits it from sbatch (Slurm 22.05+), hence SRUN_CPUS_PER_TASK below
    cpus = int(cfg.get("data", {}).get("num_workers") or 0) + 1
    lines.append(f"#SBATCH --cpus-per-task={cpus}")
    for key, var in SLURM_ENV.items():
        value = env.get(var)
        if value:
            if not re.fullmatch(r"[A-Za-z0-9_.:,@+=/-]+", value):
                raise ValueError(f"{var}={value!r} is not a plain Slurm value (letters, digits and _.:,@+=/-)")
            lines.append(f"#SBATCH --{key}={value}")
    lines += ["#SBATCH --signal=SIGUSR1@120", f"#SBATCH --output={logs}/%x-%j.out",
              "set -euo pipefail", f"cd {shlex.quote(str(Path(workdir).resolve()))}",
              "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # compute nodes read the cache, not the hub",
              f"export SRUN_CPUS_PER_TASK={cpus}  # the loader workers' cores, for srun too",
              f"srun {shlex.quote(miro_executable())} train " + " ".join(shlex.quote(o) for o in overrides)
              + " trainer.progress_bar=false", ""]
    return "\n".join(lines)


def log_dir(cfg: dict, workdir: str | os.PathLike) -> Path:
    """Where Slurm writes the job's output: absolute, since Slurm resolves a relative ``--output``
    against the folder ``sbatch`` is run from, not the one the job ``cd``s to."""
    return (Path(workdir) / str(cfg["root_dir"])).resolve() / "miro" / "logs"


def miro_executable() -> str:
    """The ``miro`` of this environment (beside the running interpreter, else on PATH), so the job
    runs the same installation whatever the compute node's PATH."""
    here = Path(sys.executable).parent / "miro"
    return str(here) if here.is_file() else (shutil.which("miro") or "miro")


def write_sbatch(path: str | os.PathLike, cfg: dict, overrides: list[str], workdir: str | os.PathLike = ".") -> Path:
    """Write :func:`sbatch_script` to ``path`` (atomically, executable) and create its log folder."""
    text = sbatch_script(cfg, [o for o in overrides if not o.startswith("trainer.progress_bar=")], workdir)
    log_dir(cfg, workdir).mkdir(parents=True, exist_ok=True)
    path = Path(path)
    atomic_write_text(path, text)
    path.chmod(0o755)
    return path
