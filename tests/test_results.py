"""The README's results tables against the logs in results/ they rest on: every mean, spread,
per-seed value and parameter count of the WikiText-2 table is recomputed from the runs'
printed output, so that the README cannot drift from what was measured."""
import re
import statistics

import pytest

from conftest import ROOT

ROWS = {   # README row (its start) -> log name in results/wt2_8000/ (ROW_sSEED.log)
    '| standard | 256 |': 'std', '| projective | 128 |': 'proj128', '| projective | 64 |': 'proj64',
    '| adaptive (cutoffs 4000, 20000) | 256 |': 'adp',
    '| define (k 1024, m 256, depth 3), no dropout in the unit | 128 |': 'def128',
    "| define, the authors' unit (`variant=define_delight`), no dropout in the unit | 128 |": 'delight128',
    '| define, the preset now: dropout 0.1 on the map and in the unit | 128 |': 'h_drop',
    # the table of hypotheses: why DeFINE trails a projective table
    '| baseline: DeFINE | none |': 'def128',
    '| the unit overfits | `map_dropout=0.1 unit_dropout=0.1`': 'h_drop',
    "| the unit's output is too small next to a scaled table's | `embed_scale=16`": 'h_scale',
    '| the tied output, n wide, does not see the unit | `tied=False`': 'h_untied',
    "| the paper's text misreads the unit | `variant=define_delight`": 'delight128'}
SEEDS = (1111, 2, 3)


def _runs(row):
    out = []
    for seed in SEEDS:
        text = (ROOT / 'results' / 'wt2_8000' / f'{row}_s{seed}.log').read_text()
        valid, test = map(float, re.search(r'^final \| valid ppl ([\d.]+) \| test ppl ([\d.]+)',
                                           text, re.M).groups())
        total = int(re.search(r'^params .* total=(\d+)', text, re.M).group(1))
        losses = [float(x) for x in re.findall(r'^step\s+\d+/8000 .*?\| loss ([\d.]+)', text, re.M)]
        out.append((valid, test, total, statistics.mean(losses[-5:])))
    return out


@pytest.mark.parametrize("label, row", ROWS.items())
def test_wt2_table_matches_its_logs(label, row):
    line = next((l for l in (ROOT / 'README.md').read_text().splitlines() if l.startswith(label)), None)
    assert line is not None, f"the README has no row {label!r}"
    runs = _runs(row)
    valid, test, total, loss = zip(*runs)
    assert len(set(total)) == 1
    want = [f"{total[0] / 1e6:.2f}M",
            f"{statistics.mean(valid):.2f} ± {statistics.stdev(valid):.2f}",
            f"{statistics.mean(test):.2f} ± {statistics.stdev(test):.2f}",
            ' / '.join(f"{t:.2f}" for t in test), f"{statistics.mean(loss):.3f}"]
    cells = [c.strip().strip('*') for c in line.split('|')[3:-1]]
    assert cells == want


def test_cpu_preset_seeds_match_their_logs():
    """The README's tie at the CPU preset's size: every test perplexity it quotes is a log's."""
    readme = (ROOT / 'README.md').read_text()
    quoted = re.search(r'DeFINE gives test ([\d.]+) / ([\d.]+) and\s+projective n 64 ([\d.]+) / '
                       r'([\d.]+) \(seeds 1111 / 2', readme)
    assert quoted, "the README's CPU-preset comparison is not where this test looks"
    logs = ['define_s1111', 'define_s2', 'projective_n64_s1111', 'projective_n64_s2']
    for want, name in zip(quoted.groups(), logs):
        text = (ROOT / 'results' / 'cpu_ptb_txl_seeds' / f'{name}.log').read_text()
        assert re.search(r'^final \| .*test ppl ([\d.]+)', text, re.M).group(1) == want, name
