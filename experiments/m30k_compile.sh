#!/usr/bin/env bash
# Translation training with shape buckets (compiled, or eager replaying a CUDA graph per shape)
# against eager, each run alone on the GPU: Multi30k's whole preset run (3,000 steps, then the
# BLEU of beam search), wall time and BLEU.
#   bash experiments/m30k_compile.sh eager b8       # one GPU command (about 5 min)
#   bash experiments/m30k_compile.sh e8 n8          # eager in buckets of 8: graphs, no graphs
#   bash experiments/m30k_compile.sh b16 b4         # (b0, no buckets: train.py refuses it on a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/m30k}; mkdir -p "$OUT"
common="--config multi30k_transformer --data-dir .gpu/data --cache-dir .gpu/cache --overwrite True ${EXTRA:-}"
for mode in "$@"; do
    case $mode in
        eager) args="";;
        b*) args="--compile True --bucket ${mode#b}";;
        e*) args="--bucket ${mode#e}";;
        n*) args="--bucket ${mode#n} --cuda-graphs False";;
        *) echo "error: modes are eager, bN (compiled), eN (eager), nN (eager, no CUDA graphs);" \
                "N: the bucket width" >&2; exit 1;;
    esac
    t0=$(date +%s.%N)
    python train.py $common $args --out-dir /tmp/m30k_runs/$mode > "$OUT/m30k_$mode.log" 2>&1
    echo "$mode $(awk "BEGIN{print $(date +%s.%N) - $t0}")" >> "$OUT/walls.txt"
done
printf '\n%-6s %8s  %s\n' mode wall_s final
for mode in "$@"; do
    printf '%-6s %8.1f  %s\n' $mode "$(grep "^$mode " "$OUT/walls.txt" | tail -1 | cut -d' ' -f2)" \
        "$(grep -h '^final' "$OUT/m30k_$mode.log" | cut -c1-90)"
done
