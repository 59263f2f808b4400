#!/usr/bin/env bash
# The GPU figures of the README, in one run (about 8 minutes on one H100 with 16 cores; the
# steps run in order of importance, and those that do not fit in BUDGET_S are skipped).
#
#   OUT=/tmp/gpu bash benchmarks/run_gpu_checks.sh          # logs and JSON files land in $OUT
#   ONLY="e2e profile e2e_workers" bash benchmarks/run_gpu_checks.sh    # some steps only (what is left of issue 6)
#
# Run from the repository root; needs torch with CUDA, torchvision, timm, scikit-learn,
# simplejpeg (--decode turbo) and (for the open_clip peer) open_clip_torch. Every step has its own time limit, and the
# optional ones are skipped when less than their limit is left of BUDGET_S seconds.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
BUDGET_S=${BUDGET_S:-500}
export PYTHONUNBUFFERED=1
start=$(date +%s)
mkdir -p "$OUT"

left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

step() {  # step NAME LIMIT_S COMMAND...: run it if LIMIT_S fits in what is left, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then
        return
    fi
    if (( $(left) < limit )); then
        echo "== $name skipped: $(left) s left, it needs $limit s" | tee -a "$OUT/summary.log"
        return
    fi
    echo "== $name ($(left) s left)" | tee -a "$OUT/summary.log"
    local t0=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "cores: $(nproc)"
    python3 -c "import sys, torch, torchvision, PIL; print(sys.version.split()[0], 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'Pillow', PIL.__version__)"
} 2>&1 | tee "$OUT/machine.log"

# Issue 6: files on disk to embeddings (12,288 = 24 batches of 512, no ragged last batch).
step e2e 300 python3 -m benchmarks.bench_throughput --skip-model --precision fp16 --no-compile \
    --num-images 12288 --decode exact device-resize turbo --json "$OUT/e2e.json"
# Where the input pipelines spend their time (per image, per batch, the loader alone).
step profile 120 python3 -m benchmarks.profile_pipeline --count 2048
# Issue 6: turbo with fewer workers than cores (the main process and the pinning thread need some).
step e2e_workers 120 python3 -m benchmarks.bench_throughput --skip-model --precision fp16 --no-compile \
    --num-images 12288 --workers 12 --published-workers 8 --decode turbo --json "$OUT/e2e_workers.json"
# Issue 6: the model alone, ViT-B/32 then ViT-L/14 (ours eager and compiled; peers eager).
step model_b32 200 python3 -m benchmarks.bench_throughput --skip-e2e --precision fp16 amp-fp16 \
    --json "$OUT/model_b32.json"
step model_l14 200 python3 -m benchmarks.bench_throughput --skip-e2e --model ViT-L/14 --batch 256 \
    --precision fp16 --iters 10 --json "$OUT/model_l14.json"
# Optional: GPU figures of the search, kNN and Partial FC benchmarks.
step search_inat 60 python3 -m benchmarks.bench_search --preset inat --scale 0.25 --device cuda --skip-faiss --repeats 2
step partial_fc 90 python3 -m benchmarks.bench_partial_fc --classes 1000000 --device cuda --steps 10
step knn 150 python3 -m benchmarks.bench_knn --scale 1 --device cuda --skip-faiss
step kmeans_assign 90 python3 -m benchmarks.bench_kmeans --device cuda --skip kmeans extract
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.log"
