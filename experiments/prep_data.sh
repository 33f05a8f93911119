#!/usr/bin/env bash
# The corpora and their tokenized caches in a git-ignored folder (default .gpu) that a GPU
# machine without network takes along: copied from a local data folder (default ../shared/data,
# laid out as data.py's --data-dir expects), tokenized once here.
#   bash experiments/prep_data.sh [DATA_DIR] [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-../shared/data}; dest=${2:-.gpu}
[ -d "$src/wikitext-2" ] || { echo "error: $src has no wikitext-2/: pass the data folder as the first argument" >&2; exit 1; }
mkdir -p "$dest/data"
for c in ptb wikitext-2 multi30k; do [ -d "$src/$c" ] && cp -r "$src/$c" "$dest/data/"; done
python - "$dest" <<'PY'
import sys, data
d = sys.argv[1]
for name in ('ptb', 'wikitext-2', 'wikitext-2-bpe'):
    c = data.lm_corpus(name, f'{d}/data', f'{d}/cache', download=False)
    print(f'{name}: {len(c.vocab)} types')
c = data.parallel_corpus('multi30k', data_dir=f'{d}/data', cache_dir=f'{d}/cache', download=False)
print(f'multi30k: {len(c.src_vocab)} / {len(c.tgt_vocab)} types')
PY
du -sh "$dest"
