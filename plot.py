"""Validation perplexity against steps (or epochs) from the metrics.jsonl of training runs.

    python plot.py results/wt2_*/ --out results/wt2_txl.png --title "WikiText-2, Transformer-XL"
    python plot.py results/ptb_* --x epoch --out results/ptb_lstm.png
    python plot.py --final results/wt2_8000/*.log --out results/wt2_rows.png   # one point a row

--final: test perplexity (mean and spread over seeds) against parameters, one point per row,
from train.py's printed output: NAME_sSEED.log files of one NAME are the seeds of one row.
Where the corpus is BPE the point is the word-level perplexity (`test word ppl`), so that
subword and word rows compare.

Each argument is a run folder (or its metrics.jsonl), or a file of train.py's printed output
(*.log: its `eval | step S | epoch E | valid loss L | ppl P` lines); the legend is the folder
or file name. train.py writes one JSON line per log and per evaluation; the evaluation lines
carry val_ppl.
matplotlib is optional for the project: `pip install matplotlib` if it is missing.
"""
import argparse
import json
import re
import statistics
import sys
from pathlib import Path


def read(path):
    path = Path(path)
    path = path / 'metrics.jsonl' if path.is_dir() else path
    if not path.exists():
        sys.exit(f"error: {path} not found; pass run folders written by train.py (--out-dir)")
    text = read_text(path)
    lines = text.splitlines()[:None if text.endswith('\n') else -1]   # not a line still being written
    if path.suffix == '.log':                 # train.py's output: the eval lines
        rows = []
        for line in lines:
            f = [x.split() for x in line.split('|')]
            if f[0] == ['eval'] and len(f) >= 5:
                rows.append(dict(step=int(f[1][1]), epoch=int(f[2][1]), val_ppl=float(f[4][1])))
        return path.stem, rows
    try:
        rows = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as e:
        sys.exit(f"error: {path} is not a metrics.jsonl written by train.py ({e})")
    return path.parent.name, [r for r in rows if 'val_ppl' in r and not r.get('final')]


def read_text(path):
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read {path} ({e}); pass train.py's logs or run folders")


def final_values(text):
    """The perplexities of a log's `final | valid ppl V | test ppl T | ...` line, by name
    ('valid ppl', 'test ppl'; BPE runs also 'valid word ppl', 'test word ppl'), or None."""
    final = re.search(r'^final \|(.*)$', text, re.M)
    return final and {k: float(v) for k, v in (c.strip().rsplit(' ', 1)
                                                 for c in final.group(1).split('|') if 'ppl' in c)}


def finals(paths):
    """NAME_sSEED.log files -> {NAME: dict(params=, test=[per seed], word=bool)}, in order."""
    rows = {}
    for path in map(Path, paths):
        log = read_text(path)
        cells = final_values(log)
        params = re.search(r'^params .*total=(\d+)', log, re.M)
        if not (cells and params):
            sys.exit(f"error: {path} has no 'params' or 'final' line: pass logs of finished runs")
        word = 'test word ppl' in cells
        row = rows.setdefault(re.sub(r'_s\d+$', '', path.stem),
                              dict(params=int(params.group(1)), test=[], word=word))
        row['test'].append(cells['test word ppl' if word else 'test ppl'])
    return rows


def plot_finals(ax, rows):
    for i, (name, r) in enumerate(rows.items()):
        mean = statistics.mean(r['test'])
        spread = statistics.stdev(r['test']) if len(r['test']) > 1 else 0.0
        ax.errorbar(r['params'] / 1e6, mean, yerr=spread, fmt='os^Dv<>p'[i % 8], color=f'C{i % 10}',
                    capsize=3, ms=5, label=f"{name}{' (per word)' if r['word'] else ''}: "
                    f"{mean:.2f} ± {spread:.2f} ({len(r['test'])} seeds)")
    ax.set_xlabel('parameters (millions)')
    ax.set_ylabel('test perplexity, mean ± standard deviation')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('runs', nargs='+')
    ap.add_argument('--final', action='store_true',
                    help='test perplexity against parameters, one point per NAME of NAME_sSEED.log')
    ap.add_argument('--x', default='step', choices=['step', 'epoch'])
    ap.add_argument('--out', default='val_ppl.png')
    ap.add_argument('--title', default='')
    ap.add_argument('--ymax', type=float, default=None)
    ap.add_argument('--x-from', type=float, default=None,
                    help='leave out the points before this step (or epoch): the early, steep part '
                         'would squeeze the end, where the runs differ')
    ap.add_argument('--log-y', action='store_true', help='logarithmic perplexity axis')
    args = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plot.py needs matplotlib: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(9.6 if args.final else 7.2, 4.5), dpi=120)
    if args.final:
        plot_finals(ax, finals(args.runs))
        args.runs = []
    styles = [(ls, mk) for ls in ('-', '--', ':') for mk in ('o', 's', '^', 'D')]
    for i, run in enumerate(args.runs):   # a line style and marker each: close curves stay apart
        name, rows = read(run)
        if not rows:
            sys.exit(f"error: {run} has no evaluation yet (no 'eval' line or val_ppl row): "
                     f"nothing to plot for it")
        rows = [r for r in rows if args.x_from is None or r[args.x] >= args.x_from]
        if rows:
            ls, mk = styles[i % len(styles)]
            last = rows[-1]['val_ppl']
            ax.plot([r[args.x] for r in rows], [r['val_ppl'] for r in rows], ls=ls, marker=mk,
                    ms=3, lw=1.2, label=f'{name} ({last:.1f})', color=f'C{i % 10}')
    if not args.final:
        ax.set_xlabel(args.x)
        ax.set_ylabel('validation perplexity')
    if args.log_y:
        ax.set_yscale('log')
    if args.ymax:
        ax.set_ylim(top=args.ymax)
    ax.set_title(args.title)
    ax.grid(True, which='both', alpha=0.3)
    if args.final:   # one entry a row, beside the axes: inside, it would hide the points
        ax.legend(fontsize=7, title='row: test ppl', title_fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))
    else:
        ax.legend(fontsize=7, title='run (last value)', title_fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
