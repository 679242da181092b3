"""Controllability of one model over a grid of sampler settings, time-boxed, many jobs at once.

The issue's bar is Spearman rho >= 0.9 between target and measured reward for every reward, over
>= 9 targets (docs/benchmarks.md, "Controllability with more images per target, on a GPU"). The
rewards of the shipped Shapes model move by as little as 0.1 over a sweep, so their order wants
600-1,800 images per target, and a CPU sweep of one setting at 100-300 images already takes 25-55
minutes. This runs the sweeps of many settings at once (one process per reward and
setting, `shapes_training_study.py controllability`, plus one `table` per setting for ShapesEval
at every target 1.0), on a GPU where one is lent, in priority order until ``--budget-minutes``;
after every finished job it rewrites ``settings.md`` / ``settings.json`` (`shapes_training_study.py
summarize`) and packs every sweep's ``sweep.json`` and grid image, and each setting's curves, into
``OUT/grid.tar.gz``, so a run cut short still returns what it finished, in four files. The
detector-based scorers (numpy, ~46 ms per generated image on one core), not the GPU, set the pace: give each
job one thread and run about as many jobs as cores.

    python benchmarks/controllability_grid.py --out OUT --device cuda --jobs 8 --budget-minutes 6
    python benchmarks/controllability_grid.py --out OUT --setting 'ac10=--reward-cfg shapes_alignment=10,shapes_counting=10' \
        --setting 'ac10+s2=--reward-cfg shapes_alignment=10,shapes_counting=10 --seed 2'

Settings are ``NAME=ARGS``: extra `shapes_training_study.py` flags (split like a shell line, never run
through one). Every setting shares ``--stride``, ``--n-samples``, ``--steps``, ``--cfg`` (a setting may
override them) and ``--targets`` (default ``filled``: nine targets per reward). Settings named
``NAME+SUFFIX`` (e.g. another ``--seed``) are pooled into ``NAME`` target by target and get no table
of their own.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUDY = HERE / "shapes_training_study.py"
sys.path.insert(0, str(HERE))
from _args import ArgumentParser, device as device_arg, nonneg_float, nonneg_int, positive_int, run_main  # noqa: E402
import shapes_training_study as study  # noqa: E402
KEYS = ("shapes_alignment", "shapes_counting", "shapes_position", "shapes_sharpness", "shapes_contrast")
AC = "shapes_alignment={w},shapes_counting={w}"
# Priority order. What the GPU run of 2026-12-04 found (docs/benchmarks.md, "Controllability with more
# images per target, on a GPU"): at 600 images per target the settings differ by less than the noise,
# and the default passes four of five over nine targets (counting dips at an untrained target). So:
# the default with more seeds first, then the two per-reward pushes that kept counting's order, each
# with a second seed. NAME+SUFFIX folders are pooled into NAME (other seeds of one setting).
DEFAULT_SETTINGS = {
    "default": "",
    "default+s2": "--seed 2",
    "ac10": "--reward-cfg " + AC.format(w=10),
    "ac10+s2": "--reward-cfg " + AC.format(w=10) + " --seed 2",
    "c10": "--reward-cfg shapes_counting=10",
    "c10+s2": "--reward-cfg shapes_counting=10 --seed 2",
    "default+s4": "--seed 4",
    "ac7.5": "--reward-cfg " + AC.format(w=7.5),
}


def parse_setting(spec: str) -> tuple[str, list[str]]:
    name, sep, rest = spec.partition("=")
    if not sep or not name or "/" in name or name.startswith("."):
        raise ValueError(f"--setting {spec!r}: expected NAME=ARGS with NAME a plain folder name")
    return name, shlex.split(rest)


def jobs_for(name: str, extra: list[str], args) -> list[tuple[str, list[str]]]:
    """The setting's jobs: one controllability sweep per reward, then its ShapesEval table."""
    common = ["--stride", str(args.stride), "--n-samples", str(args.n_samples), "--steps", str(args.steps),
              "--cfg", str(args.cfg), "--batch-size", str(args.batch_size)]
    if args.device:
        common += ["--device", args.device]
    out = str(Path(args.work) / name)
    jobs = [(f"{name}/{key}", [sys.executable, str(STUDY), "controllability", "--model", args.model, "--targets",
                               args.targets, "--keys", key, "--out", out, *common, *extra]) for key in args.keys]
    if not args.no_table and "+" not in name:  # one ShapesEval per pooled setting
        table_extra = [a for a in extra if a not in ("--negative", "isolate")]  # the table's s- stays zeros
        jobs.append((f"{name}/table", [sys.executable, str(STUDY), "table", "--model", f"{name}={args.model}",
                                       "--out", out, *common, *table_extra]))
    return jobs


def pack(out: Path, work: Path, names: list[str], log) -> None:
    """settings.md/json of what is finished, and every sweep's small files, into out (atomically)."""
    settings: dict[str, list[Path]] = {}
    for n in names:
        if (work / n).is_dir():
            settings.setdefault(n.partition("+")[0], []).append(work / n)
    if not settings:
        return
    summary = work / "summary"  # the plots go in the tarball: a GPU box returns only a few files
    summary.mkdir(exist_ok=True)
    try:
        study.write_summary(settings, out, plots=summary)
    except (ValueError, OSError, KeyError) as e:  # a report that fails must not stop the grid
        log(f"summarize failed: {e!r}")
    tmp = out / "grid.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(summary.glob("*.png")):
            tar.add(f, arcname=f"summary/{f.name}")
        for n in names:
            for pattern in ("controllability/*/sweep.json", "controllability/*/grid.png", "table/table.json",
                            "controllability/*/target_*/generation.json"):
                for f in sorted((work / n).glob(pattern)):
                    tar.add(f, arcname=str(f.relative_to(work)))
    os.replace(tmp, out / "grid.tar.gz")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where settings.md, settings.json, grid.tar.gz and log.txt go")
    p.add_argument("--work", default="", help="image folders (resumable; default OUT/work)")
    p.add_argument("--model", default="shapes", help=".ckpt, pipeline folder or built-in name")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=ARGS",
                   help="a sampler setting (repeatable; default: the built-in grid, in priority order)")
    p.add_argument("--keys", nargs="+", default=list(KEYS), choices=KEYS, help="rewards to sweep")
    p.add_argument("--targets", default="filled", choices=("grid", "trained", "score", "filled"),
                   help="target grid of every sweep (filled: the score-spaced targets topped up to 9)")
    p.add_argument("--stride", type=positive_int, default=1, help="every k-th ShapesEval prompt (1: all 300)")
    p.add_argument("--n-samples", type=positive_int, default=2, help="images per prompt and target")
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--cfg", type=nonneg_float, default=5.0)
    p.add_argument("--batch-size", type=positive_int, default=300, help="images per pipeline call")
    p.add_argument("--device", type=device_arg, default=None, help="generate on this device (default: CPU)")
    p.add_argument("--jobs", type=positive_int, default=1, help="processes at once")
    p.add_argument("--threads", type=nonneg_int, default=0,
                   help="torch threads per process (default, 0: cores / jobs)")
    p.add_argument("--budget-minutes", type=nonneg_float, default=0,
                   help="stop starting and kill jobs after this (0: none)")
    p.add_argument("--no-table", action="store_true", help="skip ShapesEval per setting")
    args = p.parse_args(argv)
    try:
        settings = dict(map(parse_setting, args.setting)) if args.setting else {
            k: shlex.split(v) for k, v in DEFAULT_SETTINGS.items()}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    args.work = str(work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S', time.gmtime())}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    queue = [j for name, extra in settings.items() for j in jobs_for(name, extra, args)]
    deadline = time.monotonic() + 60 * args.budget_minutes if args.budget_minutes > 0 else float("inf")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done = failed = 0
    log(f"{len(settings)} settings, {len(queue)} jobs, {args.jobs} at once, {threads} threads each, "
        f"device {args.device or 'cpu'}")
    while queue or running:
        while queue and len(running) < args.jobs and time.monotonic() < deadline:
            tag, cmd = queue.pop(0)
            with open(work / "logs" / (tag.replace("/", "__") + ".log"), "w", encoding="utf-8") as fh:
                running[tag] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                                 start_new_session=True), time.monotonic())
        if time.monotonic() >= deadline:
            for tag, (proc, _) in running.items():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    log(f"killed {tag} at the budget")
            log(f"budget spent; {len(queue)} jobs not started")
            running.clear()
            break
        time.sleep(0.5)
        for tag in [t for t, (proc, _) in running.items() if proc.poll() is not None]:
            proc, t0 = running.pop(tag)
            if proc.returncode:
                failed += 1
                tail = (work / "logs" / (tag.replace("/", "__") + ".log")).read_text(encoding="utf-8")[-800:]
                log(f"FAILED {tag} (exit {proc.returncode}) after {time.monotonic() - t0:.0f} s:\n{tail}")
            else:
                done += 1
                log(f"done {tag} in {time.monotonic() - t0:.0f} s")
            pack(out, work, list(settings), log)
    pack(out, work, list(settings), log)
    log(f"{done} jobs done, {failed} failed")
    if (out / "settings.md").is_file():
        print((out / "settings.md").read_text(encoding="utf-8"), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
