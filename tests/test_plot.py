"""plot.py reads validation curves from metrics.jsonl and from train.py's printed output."""
import json

import pytest

import plot


def test_reads_metrics_and_printed_logs_alike(tmp_path):
    run = tmp_path / 'run_a'
    run.mkdir()
    rows = [dict(step=10, train_loss=5.0), dict(step=20, epoch=1, val_ppl=150.5),
            dict(step=40, epoch=2, val_ppl=120.25), dict(step=40, val_ppl=119.0, test_ppl=110.0, final=True)]
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    log = tmp_path / 'run_b.log'
    log.write_text('config {"model": "txl"}\n'
                   'step      20 | epoch 1  50% | loss 5.011 | ppl 150.00 | lr 0.0005\n'
                   'eval | step 20 | epoch 1 | valid loss 5.014 | ppl 150.50 (best)\n'
                   'eval | step 40 | epoch 2 | valid loss 4.790 | ppl 120.25\n'
                   'final | valid ppl 119.00 | test ppl 110.00 | 2.0 s\n')
    with open(run / 'metrics.jsonl', 'a') as f:   # a run still writing: its last line is cut
        f.write('{"step": 60, "val_p')
    with open(log, 'a') as f:
        f.write('eval | step 60 | epoch 3 | valid loss 4.1 | pp')
    name_a, a = plot.read(run)
    name_b, b = plot.read(log)
    assert (name_a, name_b) == ('run_a', 'run_b')
    assert [(r['step'], r['epoch'], r['val_ppl']) for r in a] == [(20, 1, 150.5), (40, 2, 120.25)]
    assert [(r['step'], r['epoch'], r['val_ppl']) for r in b] == [(20, 1, 150.5), (40, 2, 120.25)]


def test_final_points_group_seeds_and_take_word_perplexity_for_bpe(tmp_path):
    logs = {'std_s1': (13678590, 'final | valid ppl 96.86 | test ppl 92.05 | 10.1 s'),
            'std_s2': (13678590, 'final | valid ppl 97.00 | test ppl 93.05 | 10.0 s'),
            'bpe_s1': (9000000, 'final | valid ppl 40.00 | valid word ppl 120.50 | test ppl 38.00 '
                                '| test word ppl 110.25 | 9.0 s')}
    for name, (total, final) in logs.items():
        (tmp_path / f'{name}.log').write_text(f'params define=0 context=1 io=2 total={total}\n'
                                              f'step 1 | loss 5.0\n{final}\n')
    rows = plot.finals(sorted(tmp_path.glob('*.log')))
    assert list(rows) == ['bpe', 'std']
    assert rows['std'] == dict(params=13678590, test=[92.05, 93.05], word=False)
    assert rows['bpe'] == dict(params=9000000, test=[110.25], word=True)
    (tmp_path / 'cut_s1.log').write_text('params define=0 context=1 io=2 total=5\nstep 1 | loss 5.0\n')
    with pytest.raises(SystemExit, match="no 'params' or 'final' line"):
        plot.finals([tmp_path / 'cut_s1.log'])


def test_unreadable_inputs_exit_with_one_line(tmp_path, monkeypatch):
    (tmp_path / 'binary.log').write_bytes(b'\xff\xfe not text')
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'metrics.jsonl').write_text('{"step": 1, "val_ppl"\n')
    (tmp_path / 'none.log').write_text('step 1 | loss 5.0\n')
    for argv, match in (([str(tmp_path / 'binary.log')], 'cannot read'),
                        (['--final', str(tmp_path / 'binary.log')], 'cannot read'),
                        ([str(tmp_path / 'run')], 'not a metrics.jsonl'),
                        ([str(tmp_path / 'none.log')], 'no evaluation yet')):
        monkeypatch.setattr('sys.argv', ['plot.py', *argv, '--out', str(tmp_path / 'p.png')])
        with pytest.raises(SystemExit, match=match):
            plot.main()
    assert not (tmp_path / 'p.png').exists()
