"""plot.py reads validation curves from metrics.jsonl and from train.py's printed output."""
import json

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
    name_a, a = plot.read(run)
    name_b, b = plot.read(log)
    assert (name_a, name_b) == ('run_a', 'run_b')
    assert [(r['step'], r['epoch'], r['val_ppl']) for r in a] == [(20, 1, 150.5), (40, 2, 120.25)]
    assert [(r['step'], r['epoch'], r['val_ppl']) for r in b] == [(20, 1, 150.5), (40, 2, 120.25)]
