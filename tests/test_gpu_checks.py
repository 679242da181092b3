"""benchmarks/gpu_checks.sh end to end on the CPU with tiny sizes: the one-run GPU script's glue
(data -> bench -> module bench -> warm-started training sized by the bench -> fp16 export ->
sensitivity) works before a GPU is ever lent to it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_checks_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pack_minilm

    pack_minilm.pack(tmp_path / "minilm_pack", samples=40, data=[])  # the path taken without the MiniLM wheel
    env = dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work"), PY=sys.executable, TRAIN_MINUTES="2",
               NUM_SAMPLES="48", BATCH="8", STEPS="2", RELEASE_BATCH="0", BENCH_ITERS="1", SENS_IMAGES="4", MODULE_STEPS="1",
               WORKERS="1", TEXT_PACK=str(tmp_path / "minilm_pack"))
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (out / "log.txt").read_text()
    # data, unpack, bench, module bench, train, convert, sensitivity
    assert "exit 1" not in log and log.count("exit 0") == 7, log[-3000:]
    assert "loader/training ratio" in log
    assert "MIRO_MINILM_DIR" not in os.environ and (tmp_path / "work" / "minilm" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "log.txt", "metrics.csv", "pipeline"]
    (bench,) = json.loads((out / "bench.json").read_text())
    assert bench["config"] == "shapes" and bench["batch"] == 8 and bench["precision"] == "fp32"
    state = load_file(str(out / "pipeline" / "model.safetensors"))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert "trained" in log and "init" in log  # both models' caption-sensitivity rows
    from miro.pipeline import MiroPipeline

    pipe = MiroPipeline.from_pretrained(str(out / "pipeline"))
    shipped = MiroPipeline.from_pretrained("shapes")
    ref = shipped.model.state_dict()
    changed = sum(int((v != ref[k].half().float()).sum()) for k, v in pipe.model.state_dict().items() if v.is_floating_point())
    total = sum(v.numel() for v in ref.values() if v.is_floating_point())
    assert changed > 0.5 * total, (changed, total)  # trained weights, not the fp16-rounded warm start


@pytest.mark.slow
def test_gpu_checks_pair_and_specialists_on_cpu(tmp_path):
    # PAIR=1 SPECIALISTS=1: MIRO and the baseline from scratch (two seeds each, the default) and a
    # specialist beside the warm run, the pair's checkpoints on ShapesEval with each recipe's seeds
    # pooled, and every model's rewards in one packed study (one specialist and tiny evaluations keep
    # it short; the five are the same loop)
    import tarfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pack_minilm

    out = tmp_path / "out"
    pack_minilm.pack(tmp_path / "minilm_pack", samples=40, data=[])
    env = dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work"), PY=sys.executable, TRAIN_MINUTES="3",
               NUM_SAMPLES="48", BATCH="8", STEPS="2", PAIR="1", PAIR_POINTS="1", SPECIALISTS="1", BUDGET_MINUTES="30",
               SPECIALIST_REWARDS="counting", INIT="none", EVAL_STRIDE="300", EVAL_STEPS="2", EVAL_THREADS="1",
               RELEASE_BATCH="0", BENCH_ITERS="1", SENS_IMAGES="0", MODULE_STEPS="0", WORKERS="1",
               TEXT_PACK=str(tmp_path / "minilm_pack"))
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "exit 1" not in log, log[-3000:]
    assert "experiment=shapes_only_counting" in log and "shapes_only_alignment" not in log
    with tarfile.open(out / "study.tar.gz") as tar:
        table = json.load(tar.extractfile("./table.json"))
        members = set(tar.getnames())
        conv = tar.extractfile("./convergence/convergence.csv").read().decode().splitlines()
        md = tar.extractfile("./convergence/convergence.md").read().decode()
    assert sorted(row["model"] for row in table) == ["only_counting", "pair_baseline_s1", "pair_baseline_s2",
                                                     "pair_miro_s1", "pair_miro_s2", "warm"]
    assert all(0.0 <= row["shapes_counting"] <= 1.0 for row in table)
    import csv

    points = list(csv.DictReader(conv))
    # PAIR_POINTS=1: one checkpoint per run, told apart by the seed's folder
    assert sorted((row["run"], row["replicate"]) for row in points) == [
        ("baseline", "pair_baseline_s1"), ("baseline", "pair_baseline_s2"), ("miro", "pair_miro_s1"),
        ("miro", "pair_miro_s2")]
    assert all(0.0 <= float(row["shapes_contrast"]) <= 1.0 for row in points)  # every reward, per checkpoint
    assert {"./convergence/convergence.md", "./convergence/convergence_rewards.png"} <= members
    # the pooled pass joined the points scored per checkpoint (--rows-from) and generated nothing
    assert not any(m.startswith("./convergence/convergence/") for m in members)
    assert any(m.startswith("./points/miro_s2_") for m in members)
    assert {"./metrics_spec_counting.csv", "./metrics_pair_miro_s2.csv", "./metrics_pair_baseline_s1.csv"} <= members
    assert md.startswith("Seeds (means over): miro: pair_miro_s1, pair_miro_s2; baseline: pair_baseline_s1")
    rows = json.loads((out / "bench.json").read_text())
    assert len(rows) == 6 and {row["processes_sharing_the_device"] for row in rows} == {6}
