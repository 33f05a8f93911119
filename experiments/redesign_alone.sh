#!/usr/bin/env bash
# The readable-core redesign's numbers to hold, each run alone on the GPU: the main command
# (with the unit's dropout off, as the code before had it) and PTB for 2 epochs, the code
# before the redesign (commit 0aec6a8, unpacked into .gpu/before by `prep`) against now.
#   bash experiments/redesign_alone.sh prep     # here, where git is: once
#   bash experiments/redesign_alone.sh          # on the GPU machine; a table last
#   bash experiments/redesign_alone.sh ptb_after main_after ...   # only these, in this order
set -euo pipefail
cd "$(dirname "$0")/.."
D=.gpu; OUT=${OUT:-/tmp/redesign}; mkdir -p "$OUT"
if [ "${1:-}" = prep ]; then
    rm -rf $D/before && mkdir -p $D/before && git archive 0aec6a8 | tar -x -C $D/before
    exit 0
fi
[ -f $D/before/train.py ] || { echo "error: no $D/before: run 'bash $0 prep' first" >&2; exit 1; }
common="--data-dir $PWD/$D/data --cache-dir $PWD/$D/cache ${EXTRA:-}"   # the old code has no --overwrite
one() {  # name dir args...: one run alone, its wall time and last lines
    local name=$1 dir=$2; shift 2
    rm -rf /tmp/redesign_runs/$name; local t0=$(date +%s.%N)
    (cd "$dir" && python train.py "$@" $common --out-dir /tmp/redesign_runs/$name) > "$OUT/$name.log" 2>&1
    echo "$name $(awk "BEGIN{print $(date +%s.%N) - $t0}")" >> "$OUT/walls.txt"
}
rm -f "$OUT/walls.txt"
for name in ${@:-main_before main_after ptb_before ptb_after}; do
    case $name in
        main_before) one main_before $D/before --model txl --embed define ;;
        main_after) one main_after . --model txl --embed define map_dropout=0 unit_dropout=0 ;;
        ptb_before) one ptb_before $D/before --config ptb_awd_lstm --max-epochs 2 ;;
        ptb_after) one ptb_after . --config ptb_awd_lstm --max-epochs 2 ;;
        *) echo "error: no run $name (main_before, main_after, ptb_before, ptb_after)" >&2; exit 1 ;;
    esac
done
printf '\n%-12s %8s  %-44s %s\n' run wall_s final/valid 'epoch times'
while read name wall; do
    printf '%-12s %8.1f  %-44s %s\n' $name $wall \
        "$(grep -h '^final' $OUT/$name.log | cut -c1-44)$(grep -h 'valid loss' $OUT/$name.log | grep -o 'ppl [0-9.]*' | tr '\n' ' ')" \
        "$(grep -ho 'done in [0-9.]* s' $OUT/$name.log | tr '\n' ' ')"
done < "$OUT/walls.txt"
