#!/usr/bin/env bash
# The GPU tests and benchmarks in one go, for a lent GPU machine (see docs/benchmarks.md).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # on the GPU machine, from the repo root
#   QUICK=1 OUT=/tmp/check bash benchmarks/gpu_check.sh  # tiny sizes: a dry run on any machine
#   PICK='fused' PYTEST_K=fused OUT=... bash benchmarks/gpu_check.sh   # only what matches
#
# PICK: an extended regex; only the benchmarks whose command line matches it run. PYTEST_K: passed
# to pytest -k. Both let a short lease rerun just what changed since the last full run.
#
# Installs the wheels carried in .whl/ (hydra-core, omegaconf, antlr4: the GPU image lacks them),
# runs the GPU tests, then the benchmarks, each under its own time limit so that one stuck step
# cannot eat the machine's time. Writes $OUT/results.jsonl (one JSON line per benchmark),
# $OUT/pytest.log, $OUT/run.log and $OUT/gpu.txt; prints a summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
PY=${PY:-python3}
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

(nvidia-smi || echo "no nvidia-smi") >"$OUT/gpu.txt" 2>&1
$PY -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, 'cuda', torch.cuda.is_available())"

# bench SECONDS SCRIPT ARGS...: one benchmark, its JSON line appended to results.jsonl.
bench() {
    local limit=$1
    shift
    if [ -n "${PICK:-}" ] && ! echo "$*" | grep -Eq -- "$PICK"; then
        return
    fi
    echo "== $*"
    local started=$SECONDS
    timeout "$limit" $PY "$@" 2>"$OUT/last_stderr.txt" | tail -n 1 | tee -a "$RESULTS"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        echo "   exit $status after $((SECONDS - started)) s; stderr tail:"
        tail -n 5 "$OUT/last_stderr.txt"
        echo "{\"benchmark\": \"failed\", \"command\": \"$*\", \"exit\": $status}" >>"$RESULTS"
    fi
}

if [ -n "${QUICK:-}" ]; then
    ITEMS_LARGE=20000 ITEMS_HUGE=50000 USERS=2000 TP_ITEMS=2000 TP_USERS=500 TP_LEN=50 STEPS=4 WARM=2 WARM_EPOCHS=1 EPOCHS=1 ACCEL=auto
else
    ITEMS_LARGE=1000000 ITEMS_HUGE=10000000 USERS=10000 TP_ITEMS=100000 TP_USERS=50000 TP_LEN=200 STEPS=40 WARM=10 WARM_EPOCHS=1 EPOCHS=3 ACCEL=gpu
fi

# Training throughput, 100k-item synthetic catalogue, length 200 (target: 2M target tokens/s).
# One whole epoch of warm-up first, so that every batch width has been planned for once (the
# figures of runs 1-4 did not have it: BENCHMARKS.md).
TP="--items $TP_ITEMS --users $TP_USERS --max-len $TP_LEN --steps $STEPS --warmup $WARM --warmup-epochs $WARM_EPOCHS"

# Most important first: a run cut short still has them.
echo "== GPU tests"
timeout 180 $PY -m pytest tests/models/test_gpu.py tests/test_fused_cross_entropy.py tests/training/test_static_step.py \
    -p no:cacheprovider -n 0 ${PYTEST_K:+-k "$PYTEST_K"} >"$OUT/pytest.log" 2>&1
echo "   pytest exit $? ($(tail -n 1 "$OUT/pytest.log"))"

# The static step (data.static_shapes: a handful of batch shapes, no host sync) compiled whole and
# replayed as CUDA graphs, against the same run without it (issue 31's targets: 2M target tokens/s
# at 100k items and length 200; under 0.5 s per Beauty epoch at batch 128). A step's torch.profiler
# table goes to $OUT/profiles.tgz with the others below.
mkdir -p /tmp/profiles
STATIC="--static-shapes --compile --cuda-graphs"
bench 150 benchmarks/train_throughput.py --model sasrec $TP --fused $STATIC
bench 150 benchmarks/epoch_time.py --accelerator $ACCEL --precision bf16-mixed --epochs $EPOCHS --fused $STATIC
bench 150 benchmarks/train_throughput.py --model sasrec $TP --steps 10 --warmup 3 --fused $STATIC --profile /tmp/profiles/static_throughput
bench 150 benchmarks/train_throughput.py --model hstu $TP --fused $STATIC
bench 150 benchmarks/train_throughput.py --model bert4rec $TP --fused $STATIC
# The whole `make train` run on the GPU with the static step (target: under 30 s of training),
# its train_seconds, best_epoch and test NDCG@10 in the JSON line.
if [ -z "${PICK:-}" ] || echo "make_train_static" | grep -Eq -- "$PICK"; then
    echo "== make train, static step"
    rm -rf /tmp/make_train_static  # a finished run directory is refused: a rerun starts afresh
    started=$SECONDS
    timeout 240 $PY train.py trainer=gpu logger=csv data.static_shapes=true compile=reduce-overhead \
        loss.fused=auto hydra.run.dir=/tmp/make_train_static >"$OUT/make_train_static.log" 2>&1
    if ! $PY -c "import json; m = json.load(open('/tmp/make_train_static/metrics.json')); print(json.dumps({'benchmark': 'make_train_static', 'wall_seconds': $((SECONDS - started)), **{k: m[k] for k in ('train_seconds', 'best_epoch', 'epochs', 'test/ndcg@10') if k in m}}))" \
        | tee -a "$RESULTS"; then
        echo "   failed; the tail of $OUT/make_train_static.log:"
        tail -n 3 "$OUT/make_train_static.log"
    fi
fi

bench 120 benchmarks/train_throughput.py --model sasrec $TP --fused
# The same with batch widths rounded up to a multiple of 8 (data.width_multiple): 25 shapes instead
# of 200 for the GPU to plan for; compare warmup_seconds and step_ms with the line above.
bench 120 benchmarks/train_throughput.py --model sasrec $TP --fused --width-multiple 8
bench 60 benchmarks/loss.py --items $ITEMS_LARGE --tokens 4096 --impl fused --precision bf16
bench 100 benchmarks/epoch_time.py --accelerator $ACCEL --precision bf16-mixed --epochs $EPOCHS --fused
bench 150 benchmarks/train_throughput.py --model sasrec --items $ITEMS_HUGE --users 20000 --max-len 50 --batch-size 128 --steps 5 --warmup 2 --fused
bench 90 benchmarks/loss.py --items $ITEMS_HUGE --tokens 4096 --impl fused --precision bf16
bench 60 benchmarks/loss.py --items $ITEMS_LARGE --tokens 4096 --impl fused
bench 120 benchmarks/train_throughput.py --model bert4rec $TP --fused
bench 120 benchmarks/train_throughput.py --model hstu $TP --fused
# Where an epoch's time goes (Lightning's hooks) and a step's (torch.profiler's kernels): packed
# into $OUT/profiles.tgz.
bench 100 benchmarks/epoch_time.py --accelerator $ACCEL --precision bf16-mixed --epochs 2 --fused --profile /tmp/profiles/epoch
bench 120 benchmarks/train_throughput.py --model sasrec $TP --steps 10 --warmup 3 --fused --profile /tmp/profiles/throughput
tar -czf "$OUT/profiles.tgz" -C /tmp/profiles . 2>/dev/null
# Compiled network (the launch-bound Beauty epoch is what compiling can shorten): a minute or two each.
bench 150 benchmarks/epoch_time.py --accelerator $ACCEL --precision bf16-mixed --epochs $EPOCHS --fused --compile
bench 120 benchmarks/train_throughput.py --model sasrec $TP --fused --compile
# The PyTorch losses: the same figures without the Triton kernels.
bench 120 benchmarks/train_throughput.py --model sasrec $TP
# SASRec on amazon_beauty (the shipped copy), batch 128 as in the presets (target: < 1 s/epoch).
bench 100 benchmarks/epoch_time.py --accelerator $ACCEL --precision bf16-mixed --epochs $EPOCHS
# A 10M-item catalogue trains end to end with the chunked loss (item chunks, no OOM).
bench 150 benchmarks/train_throughput.py --model sasrec --items $ITEMS_HUGE --users 20000 --max-len 50 --batch-size 128 --steps 5 --warmup 2
# Full vs chunked cross-entropy at 1M items and 4,096 target positions; chunked at 10M.
bench 60 benchmarks/loss.py --items $ITEMS_LARGE --tokens 4096 --impl full
bench 60 benchmarks/loss.py --items $ITEMS_LARGE --tokens 4096 --impl chunked
bench 90 benchmarks/loss.py --items $ITEMS_HUGE --tokens 4096 --impl chunked
# Full-ranking evaluation: 10k users over 1M items, the models' chunked path.
bench 90 benchmarks/ranking.py --items $ITEMS_LARGE --users $USERS
# Attention at the Amazon settings in bf16: SASRec's (causal) and BERT4Rec's (padding mask).
bench 45 benchmarks/attention.py --precision bf16
bench 45 benchmarks/attention.py --padding --heads 2 --precision bf16
bench 120 benchmarks/train_throughput.py --model bert4rec $TP
bench 120 benchmarks/train_throughput.py --model sasrec $TP --compile

rm -f "$OUT/last_stderr.txt"
echo "== summary"
$PY - "$RESULTS" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    keep = {k: v for k, v in r.items() if k not in ("config", "torch", "date", "device", "seconds", "epoch_seconds")}
    cfg = r.get("config", {})
    short = {k: cfg[k] for k in ("model", "items", "impl", "precision", "padding", "compile", "batch_size") if k in cfg}
    print(json.dumps({**short, **keep}))
EOF
