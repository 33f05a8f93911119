"""The README's results tables against the logs in results/ they rest on: every mean, spread,
per-seed value and parameter count of the WikiText-2 table is recomputed from the runs'
printed output, so that the README cannot drift from what was measured."""
import re
import shlex
import statistics
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'experiments'))
import run_jobs   # noqa: E402

ROWS = {   # README row (its start) -> log name in results/wt2_8000/ (ROW_sSEED.log)
    '| standard | 256 |': 'std', '| projective | 128 |': 'proj128', '| projective | 64 |': 'proj64',
    '| adaptive (cutoffs 4000, 20000) | 256 |': 'adp',
    '| define (k 1024, m 256, depth 3), no dropout in the unit | 128 |': 'def128',
    "| define, the authors' unit (`variant=define_delight`), no dropout in the unit | 128 |": 'delight128',
    '| define, the preset now: dropout 0.1 on the map and in the unit | 128 |': 'h_drop',
    '| define (k 1024, m 256, depth 3), no dropout in the unit, on an H100 | 64 |': 'def64',
    "| define, the authors' unit (`variant=define_delight`), no dropout in the unit, on an H100 | 64 |": 'delight64',
    # the table of hypotheses: why DeFINE trails a projective table
    '| baseline: DeFINE | none |': 'def128',
    '| the unit overfits | `map_dropout=0.1 unit_dropout=0.1`': 'h_drop',
    "| the unit's output is too small next to a scaled table's | `embed_scale=16`": 'h_scale',
    '| the tied output, n wide, does not see the unit | `tied=False`': 'h_untied',
    "| the paper's text misreads the unit | `variant=define_delight`": 'delight128',
    '| the groups and the skip add nothing here | `variant=lt`': 'h_lt',
    '| the depth-3 stack is the wrong shape (as at the CPU preset\'s size) | `depth=2`': 'h_depth2',
    '| the unit is too wide | `k=512`': 'h_k512',
    "| Reduce to the model's width carries too much | `m=128`": 'h_m128',
    '| the unit learns too fast | `unit_lr=0.1`': 'h_ulr',
    '| LayerNorm in the unit gets in the way | `unit_norm=False`': 'h_nonorm',
    '| the hierarchy starts too fine | `g_max=2`': 'h_g2'}
SEEDS = (1111, 2, 3)


def _readme_row(label, pipes=None, indented=False):
    """The README table line that starts with `label` (after its indent, for a table inside a
    bullet), with `pipes` '|' when given (to tell two tables with the same labels apart)."""
    for l in (ROOT / 'README.md').read_text().splitlines():
        l = l.strip() if indented else l
        if l.startswith(label) and (pipes is None or l.count('|') == pipes):
            return l
    pytest.fail(f"the README has no row {label!r}")


def _readme_prose():   # the README with every run of whitespace one space: quotes across lines
    return re.sub(r'\s+', ' ', (ROOT / 'README.md').read_text())


def _total(log):       # the total parameter count a train.py log printed
    return int(re.search(r'^params .* total=(\d+)', log, re.M).group(1))


def _test_ppl(log):    # the test perplexity of a log's final line, as printed
    return re.search(r'^final \| .*test ppl ([\d.]+)', log, re.M).group(1)


def _runs(logs):
    """[(valid, test, total parameters, training loss)] of seeds 1111 / 2 / 3 of results/LOGS_sSEED.log:
    per word where the corpus is BPE; the loss the mean of the last five logged values."""
    import plot
    out = []
    for seed in SEEDS:
        text = (ROOT / 'results' / f'{logs}_s{seed}.log').read_text()
        final = plot.final_values(text)
        word = ' word' if 'test word ppl' in final else ''
        losses = [float(x) for x in re.findall(r'^step\s+\d+/8000 .*?\| loss ([\d.]+)', text, re.M)]
        out.append((final[f'valid{word} ppl'], final[f'test{word} ppl'], _total(text), statistics.mean(losses[-5:])))
    return out


@pytest.mark.parametrize("label, row", ROWS.items())
def test_wt2_table_matches_its_logs(label, row):
    line = _readme_row(label)
    runs = _runs(f'wt2_8000/{row}')
    valid, test, total, loss = zip(*runs)
    assert len(set(total)) == 1
    want = [f"{total[0] / 1e6:.2f}M",
            f"{statistics.mean(valid):.2f} ± {statistics.stdev(valid):.2f}",
            f"{statistics.mean(test):.2f} ± {statistics.stdev(test):.2f}",
            ' / '.join(f"{t:.2f}" for t in test), f"{statistics.mean(loss):.3f}"]
    cells = [c.strip().strip('*') for c in line.split('|')[3:-1]]
    assert cells == want
    change = re.search(r'`([^`]+)`', label)   # a hypothesis row's one change, on each log's command
    if change and row != 'h_drop':            # (h_drop is the preset, whose config holds its change)
        for seed in SEEDS:
            first = (ROOT / 'results' / 'wt2_8000' / f'{row}_s{seed}.log').read_text().splitlines()[0]
            assert f" {change.group(1)} " in first, (row, seed)


def test_wt2_gaps_quoted_in_prose_match_the_logs():
    """Every difference the summary and the Results prose quote between WikiText-2 rows: the
    means of the three seeds' test perplexities, from the logs."""
    m = {row: statistics.mean(r[1] for r in _runs(f'wt2_8000/{row}'))
         for row in ('std', 'adp', 'proj128', 'proj64', 'def128', 'delight128', 'def64', 'h_drop')}
    gap = lambda a, b: f"{m[a] - m[b]:.1f}"   # noqa: E731
    text = _readme_prose()
    for quote in (f"on WikiText-2 it is {gap('def128', 'proj128')} test points behind a projective table",
                  f"the authors' own later unit {gap('delight128', 'proj128')}), and still "
                  f"{gap('h_drop', 'proj128')} behind with the dropout",
                  f"at n 64 the gap is {gap('def64', 'proj64')}",
                  f"the adaptive input is best ({gap('std', 'adp')} points ahead of the standard table",
                  f"DeFINE (n 128) ends {gap('def128', 'proj128')} test points behind the projective table",
                  f"and {gap('def128', 'proj64')} behind the projective table of *half* its width",
                  f"The authors' own unit is {gap('def128', 'delight128')} point better",
                  f"ends {gap('def64', 'proj64')} points behind projective n 64",
                  f"halving n costs DeFINE {gap('def64', 'def128')} points and projective {gap('proj64', 'proj128')}",
                  f"Dropout in the unit closes {gap('def128', 'h_drop')} of the {gap('def128', 'proj128')} points"):
        assert quote in text, quote


CPU_1500 = [   # the README's quotes of the CPU preset's own budget -> their logs in cpu_ptb_txl_seeds/
    (r'DeFINE gives test ([\d.]+) / ([\d.]+) and\s+projective n 64 ([\d.]+) / ([\d.]+) \(seeds 1111 / 2',
     ['define_s1111', 'define_s2', 'projective_n64_s1111', 'projective_n64_s2']),
    (r'own 1,500 steps depth 2 gives test ([\d.]+) / ([\d.]+) .*?depth 3.s\s+([\d.]+) / ([\d.]+),',
     ['define_depth2_s1111', 'define_depth2_s2', 'define_s1111', 'define_s2'])]


@pytest.mark.parametrize("pattern, logs", CPU_1500)
def test_cpu_preset_seeds_match_their_logs(pattern, logs):
    """The README's runs at the CPU preset's size: every test perplexity it quotes is a log's,
    and only the depth-2 logs ran with depth=2."""
    quoted = re.search(pattern, (ROOT / 'README.md').read_text(), re.S)
    assert quoted, f"the README has no text matching {pattern!r}"
    for want, name in zip(quoted.groups(), logs):
        text = (ROOT / 'results' / 'cpu_ptb_txl_seeds' / f'{name}.log').read_text()
        assert _test_ppl(text) == want, name
        assert (' depth=2 ' in text.splitlines()[0]) == ('depth2' in name), name


CPU_4500 = {   # README row of the longer CPU-preset table -> log name in results/cpu_ptb_txl_4500/
    '| projective n 64 |': 'projective_n64', '| define, no dropout in the unit (the preset) |': 'define',
    '| define, dropout 0.1 on the map and in the unit |': 'define_drop',
    # experiments/cpu_ptb_hypotheses.txt: one change each against the preset's unit
    '| define, the unit at a tenth of the learning rate (`unit_lr=0.1`) |': 'c_ulr',
    '| define, a plain linear unit (`variant=lt`) |': 'c_lt',
    "| define, the authors' unit (`variant=define_delight`) |": 'c_delight',
    '| define, depth 2 (`depth=2`) |': 'c_depth2',
    '| define, no LayerNorm in the unit (`unit_norm=False`) |': 'c_nonorm',
    '| define, at most 2 groups (`g_max=2`) |': 'c_g2',
    "| define, Reduce to 64 instead of the model's 128 (`m=64`) |": 'c_m64',
    '| define, half as wide (`k=128`) |': 'c_k128'}


@pytest.mark.parametrize("label, row", CPU_4500.items())
def test_cpu_preset_4500_steps_match_their_logs(label, row):
    """Seeds 1111 / 2 side by side, the training loss their mean of the last five logged values."""
    line = _readme_row(label, indented=True)
    runs = []
    for seed in (1111, 2):
        text = (ROOT / 'results' / 'cpu_ptb_txl_4500' / f'{row}_s{seed}.log').read_text()
        assert "max_iters=4500" in text
        change = re.search(r'`([^`]+)`', label)   # the row's one change, on the log's command line
        assert change is None or f" {change.group(1)} " in text.splitlines()[0], (row, seed)
        valid, test = re.search(r'^final \| valid ppl ([\d.]+) \| test ppl ([\d.]+)', text, re.M).groups()
        total = _total(text)
        losses = [float(x) for x in re.findall(r'^step\s+\d+/4500 .*?\| loss ([\d.]+)', text, re.M)]
        runs.append((valid, test, total, statistics.mean(losses[-5:])))
    (v1, t1, n1, l1), (v2, t2, n2, l2) = runs
    assert n1 == n2
    cells = [c.strip() for c in line.split('|')[2:-1]]
    assert cells == [f"{n1 / 1e6:.2f}M", f"{v1} / {v2}", f"{t1} / {t2}", f"{(l1 + l2) / 2:.3f}"]


PTB_SEEDS = {'| standard | 24.22M |': 'std', '| define (n 128, k 1024, depth 7, g_max 4) | 23.28M |': 'def'}


@pytest.mark.parametrize("label, row", PTB_SEEDS.items())
def test_ptb_two_seeds_match_their_logs(label, row):
    """The README's PTB rows of two seeds: each value is its log's validation after epoch 18,
    and the log's parameter count is the row's."""
    line = _readme_row(label, pipes=4)   # the 3-column table, not the 68-epoch one
    got = []
    for seed in (141, 2):
        text = (ROOT / 'results' / 'ptb_seeds' / f'{row}_s{seed}.log').read_text()
        got.append(re.search(r'^eval \| step \d+ \| epoch 18 \| .*?ppl ([\d.]+)', text, re.M).group(1))
        assert f"| {_total(text) / 1e6:.2f}M |" in line
    assert line.endswith(f"| {got[0]} / {got[1]} |"), line


PTB_68 = {'| standard | 24.22M |': 'ptb_standard', '| define (n 128, k 1024, depth 7, g_max 4) | 23.28M |':
          'ptb_define', "| define, the authors' unit (`variant=define_delight`": 'ptb_define_delight'}


@pytest.mark.parametrize("label, log", PTB_68.items())
def test_ptb_68_epochs_match_their_logs(label, log):
    """The README's 68-epoch PTB rows: parameters, the validation after each quoted epoch (its
    log's printed value rounded half up to 0.1), the final test, and the command's settings."""
    from decimal import ROUND_HALF_UP, Decimal
    line = _readme_row(label, pipes=6)
    text = (ROOT / 'results' / f'{log}.log').read_text()
    ev = dict(re.findall(r'^eval \| step \d+ \| epoch (\d+) \| valid loss [\d.]+ \| ppl ([\d.]+)', text, re.M))
    curve = ' / '.join(str(Decimal(ev[str(e)]).quantize(Decimal('0.1'), ROUND_HALF_UP))
                       for e in (1, 2, 4, 6, 10, 20, 35, 50, 68))
    cells = [c.strip() for c in line.split('|')[2:-1]]
    assert cells[:3] == [f"{_total(text) / 1e6:.2f}M", curve, _test_ppl(text)], line
    assert len(ev) == 68 and ('define_delight' in text.splitlines()[0]) == ('delight' in log)


def test_ptb_68_epoch_gaps_match_their_logs():
    """The summary's and the Results' PTB gaps to the standard model, in test perplexity."""
    test = {n: float(_test_ppl((ROOT / 'results' / f'ptb_{n}.log').read_text()))
            for n in ('standard', 'define', 'define_delight')}
    text = _readme_prose()
    gap, delight = (f"{test[n] - test['standard']:.2f}" for n in ('define', 'define_delight'))
    assert f"on PTB {gap} test points behind the standard AWD-LSTM" in text
    assert f"and the authors' unit {delight}, on" in text
    assert f"(test: {test['define']:.2f} against {test['standard']:.2f}, {gap})" in text
    assert f"still {delight} behind the standard model" in text


def test_ptb_authors_unit_scale_quotes_match_their_logs():
    """The README's 200-step PTB runs of the authors' unit with the map scaled by sqrt(n) and
    without, and the text's unit: training loss at step 200 and validation perplexity."""
    text = _readme_prose()
    q = re.search(r"the training loss was ([\d.]+) against ([\d.]+) \(the text's unit: ([\d.]+)\) "
                  r"and the validation perplexity (\d+) against (\d+) \(the text's: (\d+)\)", text)
    assert q, "the README no longer quotes the 200-step PTB runs"
    for i, name in enumerate(['delight_scaled', 'delight', 'define']):
        log = (ROOT / 'results' / 'ptb_delight_scale' / f'{name}.log').read_text()
        loss = re.search(r'^step\s+200/200 .*?\| loss ([\d.]+)', log, re.M).group(1)
        valid = float(re.search(r'^final \| valid ppl ([\d.]+)', log, re.M).group(1))
        assert f"{float(loss):.2f}" == q.group(1 + i) and f"{valid:.0f}" == q.group(4 + i), name
        assert ('variant=define_delight' in log.splitlines()[0]) == name.startswith('delight')


def test_ptb_authors_unit_first_epochs_match_their_logs():
    """The README's first two PTB epochs of the fixed authors' unit against the text's unit
    (CPU) and the scaled unit (GPU): each quoted validation perplexity is its log's."""
    text = _readme_prose()
    q = re.search(r"it reaches valid ([\d.]+) / ([\d.]+) after epochs 1 / 2 against the text's "
                  r"unit's ([\d.]+) / ([\d.]+) \(the scaled unit on the GPU: ([\d.]+) / ([\d.]+);", text)
    assert q, "the README no longer quotes the first PTB epochs of the authors' unit"
    for i, log in enumerate(['ptb_delight_scale/epochs_delight', 'ptb_delight_scale/epochs_def',
                             'ptb_seeds/delight_s141']):
        got = re.findall(r'^eval \| step \d+ \| epoch [12] \| .*?ppl ([\d.]+)',
                         (ROOT / 'results' / f'{log}.log').read_text(), re.M)
        assert got == [q.group(2 * i + 1), q.group(2 * i + 2)], log


IO_ROWS = {   # README row of Baevski & Auli's rows at the CPU preset's size -> its logs in results/
    '| SM |': 'cpu_ptb_io/c_sm', '| SM-T |': 'cpu_ptb_io/c_sm_t', '| ASM |': 'cpu_ptb_io/c_asm',
    '| CNN |': 'cpu_ptb_io/c_cnn', '| ADP |': 'cpu_ptb_io/c_adp', '| ADP-T |': 'cpu_ptb_io/c_adp_t',
    '| BPE |': 'cpu_ptb_io/c_bpe', '| BPE-T |': 'cpu_ptb_io/c_bpe_t',
    '| projective n 64 |': 'cpu_ptb_txl_seeds/projective_n64', '| DeFINE n 64 |': 'cpu_ptb_txl_seeds/define',
    '| DeFINE n 64 over an adaptive map |': 'cpu_ptb_io/c_adpdef'}


@pytest.mark.parametrize("label, logs", IO_ROWS.items())
def test_cpu_io_rows_match_their_logs(label, logs):
    """Seeds 1111 / 2 / 3 of each row: parameters, valid and test perplexity (per word where
    the corpus is BPE: only those rows' logs have word perplexities), the tests' mean and
    spread; each log ran its job row's arguments (experiments/cpu_ptb_io_rows.txt)."""
    import plot
    line = _readme_row(label, pipes=8)
    jobs = dict(l.split(None, 1) for l in (ROOT / 'experiments' / 'cpu_ptb_io_rows.txt').read_text()
                .splitlines() if l.strip() and not l.startswith('#'))
    runs = []
    for seed in (1111, 2, 3):
        text = (ROOT / 'results' / f'{logs}_s{seed}.log').read_text()
        final = plot.final_values(text)
        word = ' word' if 'test word ppl' in final else ''
        assert bool(word) == ('BPE' in label)
        name = logs.split('/')[1]
        if name in jobs:
            assert f" {shlex.join(shlex.split(jobs[name]))} --seed {seed} " in text.splitlines()[0], (name, seed)
        assert 'max_iters=1500' in text and (f' seed={seed} ' in text) == (seed != 1111)   # 1111: the default
        runs.append((final[f'valid{word} ppl'], final[f'test{word} ppl'], _total(text)))
    valid, test, total = zip(*runs)
    assert len(set(total)) == 1
    cells = [c.strip() for c in line.split('|')[4:-1]]
    assert cells == [f"{total[0] / 1e6:.2f}M", ' / '.join(f"{v:.2f}" for v in valid),
                     ' / '.join(f"{t:.2f}" for t in test),
                     f"{statistics.mean(test):.2f} ± {statistics.stdev(test):.2f}"]


def test_cpu_io_prose_quotes_the_table():
    """Each 'ROW d behind ROW' of the section's prose is the difference of the two rows' means."""
    text = _readme_prose()
    start = text.index("### Baevski & Auli's input and output layers, at the CPU preset's size")
    section = text[start:text.index('## ', start + 4)]
    quotes = re.findall(r'\b([A-Z][A-Z-]*[A-Z]) ([\d.]+) behind ([A-Z][A-Z-]*[A-Z])\b', section)
    assert len(quotes) == 7, quotes
    mean = {l: float(_readme_row(f'| {l} |', pipes=8).split('|')[-2].split('±')[0])
            for q in quotes for l in (q[0], q[2])}
    for a, d, b in quotes:
        assert f"{mean[a] - mean[b]:.1f}" == d, (a, d, b)
    q = re.search(r"\(ASM ([\d.]+) against SM ([\d.]+), ", section)
    assert q and [float(x) for x in q.groups()] == [mean['ASM'], mean['SM']]


def test_cpu_tying_quotes_match_their_logs():
    """The tying gap at 4,500 steps (valid gap at each evaluation, final tests) and the tied
    model without the input scale: each quoted number is its log's."""
    text = _readme_prose()
    q = re.search(r"the validation gap between SM-T and SM shrinks from ([\d.]+) at step 750 to "
                  r"([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+) and ([\d.]+) at step 4,500 \(seed 1111; seed 2: "
                  r"from ([\d.]+) to ([\d.]+)\), test ([\d.]+) / ([\d.]+) against ([\d.]+) / ([\d.]+)\.", text)
    assert q, "the README no longer quotes the 4,500-step tying runs"
    gaps, tests = [], []
    for seed in (1111, 2):
        logs = {n: (ROOT / 'results' / 'cpu_ptb_txl_4500' / f'{n}_s{seed}.log').read_text() for n in ('sm', 'sm_t')}
        assert (' tied=False ' in logs['sm'].splitlines()[0]) and 'tied' not in logs['sm_t'].splitlines()[0]
        valid = {n: [float(v) for v in re.findall(r'^eval \| .*?ppl ([\d.]+)', t, re.M)] for n, t in logs.items()}
        gaps.append([f"{a - b:.2f}" for a, b in zip(valid['sm_t'], valid['sm'])])
        tests.append([_test_ppl(logs[n]) for n in ('sm_t', 'sm')])
    assert gaps[0] == list(q.groups()[:6]) and [gaps[1][0], gaps[1][-1]] == list(q.groups()[6:8])
    assert [tests[0][0], tests[1][0], tests[0][1], tests[1][1]] == list(q.groups()[8:])
    q = re.search(r"\(`embed_scale=1`\) the tied model ends worse, test ([\d.]+) against ([\d.]+)", text)
    for want, name in zip(q.groups(), ['sm_t_scale1_s1111', 'c_sm_t_s1111']):
        log = (ROOT / 'results' / 'cpu_ptb_io' / f'{name}.log').read_text()
        assert _test_ppl(log) == want, name
        assert ('embed_scale=1.0' in log.splitlines()[0]) == ('scale1' in name)


def test_redesign_speed_rows_match_their_logs():
    """The README's Speed rows of the old and new loop, each run alone: wall times (walls.txt),
    ms/step at the last step, epoch-2 times and validation perplexities, from the logs."""
    d = ROOT / 'results' / 'redesign_alone_h100'
    wall = {n: float(t) for n, t in (l.split() for l in (d / 'walls.txt').read_text().splitlines())}
    log = {n: (d / f'{n}.log').read_text() for n in wall}
    ms = {n: re.findall(r'^step\s+8000\S* \|.*?([\d.]+) ms/step', log[n], re.M)[0]
          for n in ('main_before', 'main_after')}
    epoch2 = {n: re.findall(r'^epoch 2 done in ([\d.]+) s', log[n], re.M)[0] for n in ('ptb_before', 'ptb_after')}
    valid = {n: re.findall(r'^eval .*?ppl ([\d.]+)', log[n], re.M) for n in ('ptb_before', 'ptb_after')}
    main = _readme_row('| default Transformer-XL + DeFINE, WikiText-2 |')
    assert (f"the redesigned loop {wall['main_after']:.1f} s ({ms['main_after']} ms/step), the old code "
            f"{wall['main_before']:.1f} s ({ms['main_before']} ms/step): "
            f"{100 * (wall['main_after'] / wall['main_before'] - 1):+.1f}%") in main
    assert f"test {_test_ppl(log['main_after'])} against {_test_ppl(log['main_before'])}" in main
    ptb = _readme_row('| PTB AWD-LSTM, two epochs |')
    assert (f"epoch 2 in {epoch2['ptb_after']} s, the old code {epoch2['ptb_before']} s "
            f"({100 * (float(epoch2['ptb_after']) / float(epoch2['ptb_before']) - 1):+.0f}%") in ptb
    assert f"valid {', '.join(valid['ptb_after'])} against {', '.join(valid['ptb_before'])}" in ptb

WT2_IO_ROWS = {   # README row of Baevski & Auli's rows on WikiText-2 -> its logs in results/
    '| SM |': 'wt2_io_rows_h100/sm', '| SM-T |': 'wt2_8000/std', '| ASM |': 'wt2_io_rows_h100/asm',
    '| CNN |': 'wt2_io_rows_h100/cnn', '| ADP |': 'wt2_io_rows_h100/adp_untied', '| ADP-T |': 'wt2_8000/adp',
    '| BPE |': 'wt2_io_rows_h100/bpe', '| BPE-T |': 'wt2_io_rows_h100/bpe_t',
    '| DeFINE n 128 (the preset) |': 'wt2_8000/h_drop', '| DeFINE n 64 (the preset) |': 'wt2_io_rows_h100/drop64',
    '| DeFINE n 128, adaptive map |': 'wt2_io_rows_h100/adpdef128',
    '| DeFINE n 64, adaptive map |': 'wt2_io_rows_h100/adpdef64'}
BAEVSKI_AULI = {'SM': 24.92, 'BPE': 24.25, 'BPE-T': 23.45, 'SM-T': 23.38, 'ASM': 22.18, 'CNN': 21.79,
                'ADP': 21.74, 'ADP-T': 20.51}   # their Table 3, test perplexity on WikiText-103


@pytest.mark.parametrize("label, logs", WT2_IO_ROWS.items())
def test_wt2_io_rows_match_their_logs(label, logs):
    """Every cell of the WikiText-2 table of Baevski & Auli's rows from its logs: parameters,
    valid and test perplexity (per word only for the BPE rows), per-seed tests, training loss,
    seed 3's wall time (walls_s3.txt); each H100 log ran its job row's arguments and seed."""
    line = _readme_row(label, pipes=10)
    runs = _runs(logs)
    valid, test, total, loss = zip(*runs)
    assert len(set(total)) == 1
    folder, name = logs.split('/')
    if folder == 'wt2_io_rows_h100':
        jobs = dict(l.split(None, 1) for l in (ROOT / 'experiments' / 'wt2_seed_rows.txt').read_text()
                    .splitlines() if l.strip() and not l.startswith('#'))
        for seed in SEEDS:
            first = (ROOT / 'results' / f'{logs}_s{seed}.log').read_text().splitlines()[0]
            assert f" {shlex.join(shlex.split(jobs[name]))} --seed {seed} " in first, (name, seed)
        walls = dict(l.split() for l in (ROOT / 'results' / folder / 'walls_s3.txt').read_text().splitlines())
        time = f"{walls[f'{name}_s3']} s"
        exited = run_jobs.wall_time(ROOT / 'results' / f'{logs}_s3.log')   # 0: a log from before
        assert exited in (0, float(walls[f'{name}_s3'])), (name, exited)  # run_jobs wrote the lines
    else:
        time = '-'
    assert ('BPE' in label) == ('wikitext-2-bpe' in (ROOT / 'results' / f'{logs}_s1111.log').read_text())
    cells = [c.strip().strip('*') for c in line.split('|')[4:-1]]
    assert cells == [f"{total[0] / 1e6:.2f}M", f"{statistics.mean(valid):.2f} ± {statistics.stdev(valid):.2f}",
                     f"{statistics.mean(test):.2f} ± {statistics.stdev(test):.2f}",
                     ' / '.join(f"{t:.2f}" for t in test), f"{statistics.mean(loss):.3f}", time]


def test_wt2_io_prose_quotes_the_table_and_baevski_auli():
    """Each 'ROW d ahead of / behind ROW (theirs d' ahead / behind)' of the section: d the
    difference of the two rows' test means, d' the same in Baevski & Auli's Table 3; and the
    parameter differences and DeFINE's gaps it quotes."""
    text = _readme_prose()
    start = text.index("### Baevski & Auli's input and output layers on WikiText-2")
    section = text[start:text.index('### ', start + 4)]
    row = r'([A-Z][A-Z-]*[A-Z])'
    quotes = re.findall(row + r'(?: is| ends)? ([\d.]+) (ahead of|behind) ' + row +
                        r' \(theirs ([\d.]+) (ahead|behind)\)', section)
    assert len(quotes) == 9, quotes
    runs = {l.strip('| '): _runs(logs) for l, logs in WT2_IO_ROWS.items()}
    mean = {k: statistics.mean(r[1] for r in v) for k, v in runs.items()}
    for a, d, side, b, theirs, their_side in quotes:
        sign = 1 if side == 'behind' else -1
        assert f"{sign * (mean[a] - mean[b]):.1f}" == d, (a, d, side, b)
        their = BAEVSKI_AULI[a] - BAEVSKI_AULI[b]
        assert (their_side == 'behind') == (their > 0) and f"{abs(their):.1f}" == theirs, (a, b)
    params = {k: v[0][2] for k, v in runs.items()}
    assert f"with {(params['ASM'] - params['ADP']) / 1e6:.2f}M fewer parameters" in section
    assert f"though with {(params['SM'] - params['ASM']) / 1e6:.2f}M fewer parameters" in section
    define = 'DeFINE n 128 (the preset)'
    assert (f"is {mean[define] - mean['ADP-T']:.1f} behind ADP-T and {mean[define] - mean['SM-T']:.1f} "
            f"behind SM-T") in section
    adp128, adp64, d64 = 'DeFINE n 128, adaptive map', 'DeFINE n 64, adaptive map', 'DeFINE n 64 (the preset)'
    assert f"At n 64 it is {mean[d64] - mean[define]:.1f} behind n 128" in section
    assert (f"{mean[adp128] - mean[define]:.1f} behind DeFINE over the standard map at n 128, "
            f"{mean[adp64] - mean[d64]:.1f} at n 64, and {mean[adp128] - mean['ADP-T']:.1f} behind ADP-T") in section
    assert f"as the paper pairs them, ends {mean[adp128] - mean['ADP-T']:.1f} behind the adaptive input alone" in text
    assert (f"helps the word-level rows (by {mean['SM'] - mean['SM-T']:.1f} and "   # the summary
            f"{mean['ADP'] - mean['ADP-T']:.1f} test points") in text
    loss = {k: f"{statistics.mean(r[3] for r in v):.3f}" for k, v in runs.items()}
    assert (f"training loss: SM's {loss['SM']} against SM-T's {loss['SM-T']}, ADP's {loss['ADP']} "
            f"against ADP-T's {loss['ADP-T']})") in section
