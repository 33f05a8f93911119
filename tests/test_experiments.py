"""experiments/: every job row is a valid train.py command, and run_jobs.py stops runs at its
budget so that the next call resumes them, skips finished runs, and reports each."""
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import build
import train
from conftest import ROOT

sys.path.insert(0, str(ROOT / 'experiments'))
import run_jobs   # noqa: E402

ROWS = [(f.name, name, args) for f in sorted((ROOT / 'experiments').glob('*.txt'))
        for name, args in run_jobs.read_jobs(f, [1])]


@pytest.mark.parametrize('file,name,args', ROWS, ids=[f'{f}:{n}' for f, n, _ in ROWS])
def test_every_job_row_builds_a_model(file, name, args):
    cfg = train.get_config(args)
    v = cfg['vocab_size']
    with torch.device('meta'):
        model = build.model(cfg, v, words=[f'w{i}' for i in range(v)])
    assert sum(p.numel() for p in model.parameters()) > 0


# A stand-in for train.py with its contract: a log line per evaluation, ckpt.pt on SIGINT
# (exit 130), --resume DIR continues from it, 'final | ...' at the last step.
FAKE = textwrap.dedent('''
    import signal, sys, time
    from pathlib import Path
    a = sys.argv[1:]
    out = Path(a[a.index('--resume') + 1] if '--resume' in a else a[a.index('--out-dir') + 1])
    out.mkdir(parents=True, exist_ok=True)
    step = int((out / 'ckpt.pt').read_text()) if '--resume' in a else 0
    print('args', ' '.join(a), flush=True)
    def stop(*_):
        (out / 'ckpt.pt').write_text(str(step)); print('interrupted at step', step, flush=True)
        sys.exit(130)
    signal.signal(signal.SIGINT, stop)
    while step < 30:
        time.sleep(0.1); step += 1
        print(f'eval | step {step} | epoch 0 | valid loss 1 | ppl {100 - step}.00', flush=True)
    print(f'final | valid ppl 88.00 | test ppl 80.{step:02d}', flush=True)
''')


def test_queue_stops_at_the_budget_resumes_and_skips_finished_runs(tmp_path, capsys):
    fake = tmp_path / 'fake_train.py'
    fake.write_text(FAKE)
    jobs = tmp_path / 'jobs.txt'
    jobs.write_text('# a comment\nrowa --lr 1\n\nrowb --lr 2\n')
    runs, logs = tmp_path / 'runs', tmp_path / 'logs'
    common = ['--seeds', '1,2', '--parallel', '2', '--runs-dir', str(runs), '--logs', str(logs),
              '--train', str(fake), '--common', '--data-dir somewhere']

    assert run_jobs.main([str(jobs), '--budget', '1.5'] + common) == 0
    out = capsys.readouterr().out
    assert '4 to run, 2 at once' in out and 'budget reached' in out
    for name, state in (('rowa_s1', 'stopped'), ('rowa_s2', 'stopped'), ('rowb_s1', 'waiting')):
        assert f'{name:<28} {state}' in out
    first = int((runs / 'rowa_s1' / 'ckpt.pt').read_text())
    assert 0 < first < 30 and not (runs / 'rowb_s1').exists()
    log = (runs / 'rowa_s1.log').read_text()
    assert '--lr 1 --seed 1 --out-dir' in log and '--data-dir somewhere' in log

    assert run_jobs.main([str(jobs)] + common) == 0
    out = capsys.readouterr().out
    assert 'start rowa_s1 (resumed)\n' in out and 'start rowb_s1\n' in out
    for name in ('rowa_s1', 'rowa_s2', 'rowb_s1', 'rowb_s2'):
        assert f'{name:<28} done' in out
        assert run_jobs.summary(logs / f'{name}.log') == (30, 88.0, 80.30)
    log = (runs / 'rowa_s1.log').read_text()      # both calls' output, the second a resume
    assert f'interrupted at step {first}' in log and f'--resume {runs / "rowa_s1"}' in log
    assert f'eval | step {first + 1} |' in log[log.index('--resume'):]
    # each call's segment ends with its wall time: stopped at the budget, then the rest; the
    # fake's 30 steps sleep 0.1 s each
    segments = [(int(c), float(t)) for c, t in re.findall(r'^# exited (-?\d+) after ([\d.]+) s$', log, re.M)]
    assert [c for c, _ in segments] == [130, 0] and segments[0][1] >= 1
    assert run_jobs.wall_time(runs / 'rowa_s1.log') == sum(t for _, t in segments) >= 2
    assert re.search(rf'rowa_s1 +done +30 +88.0 +80.3 +{sum(t for _, t in segments):.0f}\n', out)

    assert run_jobs.main([str(jobs)] + common) == 0
    assert '4 finished already, 0 to run' in capsys.readouterr().out
    assert run_jobs.main([str(jobs), '--rows', 'rowb'] + common) == 0   # one row of the file
    assert '2 finished already, 0 to run' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_jobs.main([str(jobs), '--rows', 'rowb,rowc'] + common)
    assert "--rows rowc: not in" in capsys.readouterr().err


def test_a_bpe_runs_final_line_counts_as_finished(tmp_path):
    log = tmp_path / 'bpe_s1.log'
    log.write_text('eval | step 8000 | epoch 15 | valid loss 4.1 | ppl 60.34 (best)\n'
                   'final | valid ppl 60.34 | valid word ppl 140.20 | test ppl 58.10 | '
                   'test word ppl 131.70 | 5.0 s\n')
    assert run_jobs.summary(log) == (8000, 60.34, 58.10)
    assert run_jobs.summary(tmp_path / 'missing.log') == (None, None, None)


def test_queue_reports_a_failed_run_and_a_bad_job_file(tmp_path, capsys):
    jobs = tmp_path / 'jobs.txt'
    jobs.write_text('bad --lr 1\n')
    fail = tmp_path / 'fail.py'
    fail.write_text('import sys; print("error: no such corpus"); sys.exit(1)\n')
    rc = run_jobs.main([str(jobs), '--seeds', '5', '--runs-dir', str(tmp_path / 'r'),
                        '--train', str(fail)])
    assert rc == 1 and 'bad_s5                       exit 1' in capsys.readouterr().out
    late = tmp_path / 'late.py'       # finished, then killed on its way out (the budget's SIGINT)
    late.write_text('import os, signal; print("final | valid ppl 9.00 | test ppl 8.00", flush=True); '
                    'os.kill(os.getpid(), signal.SIGKILL)\n')
    rc = run_jobs.main([str(jobs), '--seeds', '6', '--runs-dir', str(tmp_path / 'r'),
                        '--train', str(late)])
    assert rc == 0 and 'bad_s6                       done' in capsys.readouterr().out
    jobs.write_text('no/slash --lr 1\n')
    with pytest.raises(SystemExit, match='row name'):
        run_jobs.read_jobs(jobs, [1])
    r = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'run_jobs.py'), 'missing.txt'],
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'no job file missing.txt' in r.stderr


def test_compile_probe_reports_a_variant_stopped_at_its_limit(capsys):
    import compile_probe
    times, status = compile_probe.probe('nopad', timeout=1)   # a cold compile takes far longer
    assert times == [] and status == 'stopped at 1 s'
    with pytest.raises(SystemExit):
        compile_probe.main(['--variants', 'fast,bogus'])
    assert '--variants: bogus unknown' in capsys.readouterr().err


def test_speed_table_rows_set_environment_and_read_both_bench_lines():
    """A row's leading capitals NAME=VALUE words become its environment, train.py's key=value
    settings stay arguments; bench.py's line parses with and without the reserved memory."""
    import speed_table
    env, words = speed_table.split_env("TORCHINDUCTOR_X=1 A_B='c d' --config wt103_txl n=128 K=2")
    assert env == {'TORCHINDUCTOR_X': '1', 'A_B': 'c d'} and words == ['--config', 'wt103_txl', 'n=128', 'K=2']
    line = ("bench | x embed=define n=128 compile=True graphs ranks=1 |     212354 tok/s |   42.38 ms/step"
            " | MFU   7.6% | peak   3.97 GiB{} | loss 8.154 (finite: True)")
    new, old = speed_table.parse(line.format(", reserved   9.50 GiB")), speed_table.parse(line.format(""))
    assert new['peak'] == old['peak'] == '3.97' and new['reserved'] == '9.50' and old['reserved'] == '-'
    assert new['ms'] == '42.38' and new['finite'] == 'True' and new['mfu_all'] == '-'


def test_speed_table_runs_each_bench_for_both_codes_and_reports_a_failed_one(tmp_path, capsys):
    """Two tiny CPU benches (a Transformer-XL and a translation model) for the code here and
    for --before (here, the same code), and one that fails: every result in the table, the
    failed one named with its log, exit 1, and nobody waits --wait-s for the failed one. Four
    at a time: two waves, the second (bad, for both codes) started when the first has ended."""
    import time
    import speed_table
    tiny = {'lm': '--model txl --embed define --device cpu n_layer=1 d_model=32 n=16 k=64 m=32 '
                  'd_inner=64 n_head=2 d_head=16 batch_size=4 bptt=8 mem_len=8 vocab_size=500',
            'mt': '--model nmt --device cpu d_model=32 enc_layers=1 dec_layers=1 d_ff=64 n_head=2 '
                  'max_tokens=200 vocab_size=300',
            'bad': '--model nope'}
    t0 = time.time()
    rc = speed_table.main(['--rows', 'lm,mt,bad', '--before', str(ROOT), '--steps', '2', '--wait-s', '120',
                           '--parallel', '4',
                           '--logs', str(tmp_path)] + [f'--row={k}={v} --warmup-steps 1' for k, v in tiny.items()])
    assert rc == 1 and time.time() - t0 < 60
    out = capsys.readouterr().out
    exits = [line.split()[2] for line in out.splitlines() if ' exited ' in line]
    assert sorted(exits[:4]) == ['lm', 'lm', 'mt', 'mt'] and exits[4:] == ['bad', 'bad']
    table = out.split('bench.py arguments\n')[1].splitlines()
    assert [line.split()[:2] for line in table] == [[r, s] for r in ('lm', 'mt', 'bad') for s in ('before', 'now')]
    for line in table[:4]:
        ms, tok = line.split()[2:4]
        assert float(ms) > 0 and int(tok) > 0 and ' True ' in line
        assert (line.split()[5] == 'nan%') == line.startswith('mt')   # every-matmul MFU: translation's
    assert all(f"no result (exit 1)  see {tmp_path / f'bad_{s}.log'}" in line for s, line in zip(('before', 'now'), table[4:]))
    with pytest.raises(SystemExit):
        speed_table.main(['--before', str(tmp_path)])
    assert 'no bench.py there' in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")   # the eager row
def test_flex_probe_computes_rel_attention_inside_flex_attention(capsys):
    """experiments/flex_probe.py on the CPU (no FlexAttention backward there: the forward only):
    the relative shift read as an index inside the score_mod gives RelAttention's output, both
    compiled and eager."""
    import flex_probe
    flex_probe.main(['--device', 'cpu', '--batch', '2', '--queries', '6', '--memory', '5',
                     '--d-model', '32', '--heads', '2', '--d-head', '9'])
    rows = {line[:12].strip(): line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert sorted(rows) == ['explicit', 'flex', 'flex eager']
    assert all(float(rows[v][-6]) < 1e-5 for v in ('flex', 'flex eager'))
    with pytest.raises(ValueError, match='dropatt must be 0'):
        flex_probe.FlexRelAttention(flex_probe.RelAttention(32, 2, 9, 0.0, 0.1))
