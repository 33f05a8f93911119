"""train.py end to end on CPU: parameter counts of the paper, the loop on real data, exact
resume, DDP against a single process, and the errors a user meets."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import build
import checkpoint
import train
from conftest import ROOT

TINY_LSTM = ['--config', 'ptb_awd_lstm', '--device', 'cpu', '--d-model', '16', '--n', '8',
             '--lstm-hidden', '24', '--k', '32', '--depth', '2', '--batch-size', '4', '--bptt', '12',
             '--eval-batch-size', '4', '--test-batch-size', '4', '--eval-max-tokens', '2000',
             '--log-interval', '5']
TINY_TXL = ['--model', 'txl', '--device', 'cpu', '--d-model', '32', '--n-layer', '2', '--n-head', '2',
            '--d-head', '16', '--d-inner', '64', '--n', '16', '--k', '64', '--m', '32', '--batch-size', '4',
            '--bptt', '12', '--mem-len', '12', '--eval-batch-size', '4', '--test-batch-size', '4',
            '--eval-max-tokens', '1000', '--eval-interval', '0', '--log-interval', '2', '--lr', '1e-3',
            '--warmup', '0']


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('cache'))   # tokenized corpora, shared by this module


def run(argv, capsys=None):
    res = train.main([str(a) for a in argv])
    return res, (capsys.readouterr().out if capsys else None)


def model_tensors(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


# ------------------------------------------------------------------ parameter counts

def params_line(argv, capsys):
    _, out = run(argv + ['--count-params'], capsys)
    line = next(ln for ln in out.splitlines() if ln.startswith('params '))
    return {k: int(v) for k, v in (kv.split('=') for kv in line.split()[1:])}


@pytest.mark.parametrize("argv,want", [
    (['--config', 'ptb_awd_lstm', '--embed', 'standard'], dict(total=24.22)),
    (['--config', 'wt103_lstm', '--embed', 'standard', '--n', '256'], dict(context=23.36, io=68.81, total=92.17)),
    (['--config', 'wt103_lstm', '--embed', 'adaptive', '--n', '256'], dict(context=23.36, io=9.25, total=32.61)),
    (['--config', 'wt103_lstm', '--embed', 'define', '--n', '256'], dict(context=23.36, io=9.25)),
    (['--config', 'wt103_lstm', '--embed', 'define', '--n', '384', '--depth', '7'], dict(context=24.73, io=13.90)),
    (['--config', 'wt103_lstm', '--embed', 'define', '--n', '512', '--depth', '11'], dict(context=26.24, io=18.55)),
    (['--config', 'wt103_txl_base'], dict(context=41.07, io=110.04, total=151.11)),
    (['--config', 'wt103_txl', '--embed', 'projective', '--n', '384'], dict(context=36.25, io=103.08, total=139.33)),
    (['--config', 'wt103_txl', '--embed', 'define', '--n', '256'], dict(context=36.25, io=69.20)),
    (['--config', 'wt103_txl', '--embed', 'define', '--n', '128'], dict(context=36.25, io=34.73)),
    (['--config', 'wt103_txl', '--embed', 'projective', '--n', '64'], dict(context=36.25, io=17.50, total=53.75)),
    (['--config', 'cpu_ptb_txl'], dict(define=0.12, context=0.64, io=0.66, total=1.42)),   # README's CPU run
])
def test_count_params_reproduces_the_paper(argv, want, capsys):
    got = params_line(argv, capsys)
    assert got['total'] == got['define'] + got['context'] + got['io']
    for key, millions in want.items():
        assert round(got[key] / 1e6, 2) == millions, (key, got)


def test_count_params_for_translation(capsys):
    std = params_line(['--config', 'wmt14_transformer_base', '--embed', 'standard'], capsys)
    dfn = params_line(['--config', 'wmt14_transformer_base', '--embed', 'define'], capsys)
    assert dfn['define'] > 0 and dfn['total'] < std['total']


def test_command_line_forms_parse_alike():
    forms = [['--count-params', '--k', '2048', '--depth', '7'],
             ['--count-params', 'k=2048', 'depth=7'],           # a bare flag, then key=value
             ['--count-params=true', '--k=2048', 'depth=7']]
    for argv in forms:
        cfg = train.get_config(argv)
        assert (cfg['count_params'], cfg['k'], cfg['depth']) == (True, 2048, 7), argv
    assert train.get_config(['--compile', 'false'])['compile'] is False
    assert train.get_config(['--cutoffs', '[10, 20]', '--n', 'None'])['cutoffs'] == [10, 20]
    assert train.get_config(['--tied', 'false'])['tied'] is False   # a switch whose default is None
    assert train.get_config(['--data-dir', 'true'])['data_dir'] == 'true'   # a folder's name stays one


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        train.get_config(['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert all('--' + key.replace('_', '-') in out for key in train.DEFAULTS)
    assert 'token representation' in out and 'map width' in out   # DEFAULTS' sections, comments


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("argv,match", [
    (['--model', 'gru'], "--model 'gru' unknown"),
    (['--embed', 'sparse'], "--embed 'sparse' unknown"),
    (['--config', 'nope'], "no preset 'nope'"),
    (['--config', '../config/ptb_awd_lstm'], "no preset"),
    (['--device', 'gpu'], "--device 'gpu' unknown"),
    (['--batch-size', '0'], "--batch-size 0 must be a positive whole number"),
    (['--bptt', '-5'], "--bptt -5 must be a positive"),
    (['--d-model', '0'], "--d-model 0 must be"),
    (['--batch-size', '2.5'], "--batch-size 2.5 is not an int"),
    (['--out-dir', __file__], "is a file"),
    (['--embed', 'adaptive'], "needs --cutoffs"),   # one band would be the projective table
    (['--unit-dropout', '1.5'], "--unit-dropout 1.5 must be at least 0 and below 1"),
    (['--dropout', '-0.1'], "--dropout -0.1 must be at least 0"),
    (['--label-smoothing', '1'], "--label-smoothing 1 must be"),
    (['--grad-clip', '-1'], "--grad-clip -1 must be 0 or more"),
    (['--nonmono', '0'], "--nonmono 0 must be a positive whole number"),
    (['--model', 'nmt', '--avg-last', '5', '--save', 'False'], "--avg-last averages the run's saved"),
    (['--embed-cache', 'True', '--data-dir', '/nonexistent'], "--embed-cache swaps a trained unit"),
    (['--eval-only', 'True'], "--eval-only needs --resume CHECKPOINT"),
    (['--config', 'ptb_awd_lstm', '--schedule', 'cosine'], "--schedule cosine decays over --max-iters"),
    (['--lr', '-0.5'], "--lr -0.5 must be 0 or more"),
    (['--max-iters', '0'], "--max-iters 0 must be a positive whole number"),
    (['--max-epochs', '-2'], "--max-epochs -2 must be above 0"),
    (['--max-epochs', 'abc'], "--max-epochs 'abc' must be a number"),
    (['--eval-interval', 'abc'], "--eval-interval 'abc' must be a whole number"),
    (['--eval-interval', '-5'], "--eval-interval -5 must be 0 or more"),
    (['--tied', 'maybe'], "--tied 'maybe' must be True or False"),
    (['--n', 'True'], "--n True must be a whole number"),
    (['--model', 'nmt', '--embed', 'cnn', '--data-dir', '/nonexistent'], "cnn is for language models"),
])
def test_bad_settings_exit_with_a_message(argv, match):
    with pytest.raises(SystemExit, match=match):
        train.main(argv)


@pytest.mark.parametrize("argv,match", [
    (['--bogus', '1'], "unknown setting --bogus"),
    (['--max-iter', '5'], "unknown setting --max-iter; did you mean --max-iters?"),
    (['--lr', 'abc'], "'abc' is not a float"),
    (['--cutoffs', 'abc'], "'abc' is not a list"),
    (['--compile', 'maybe'], "'maybe' is not a switch value"),
    (['--n'], "expected one argument"),
])
def test_malformed_command_lines_exit_with_usage(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_config(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(SystemExit, match="--dataset 'imdb' unknown.*'ptb'"):
        run(TINY_LSTM + ['--dataset', 'imdb'])


def test_a_checkpoint_goes_into_a_folder_not_made_yet(tmp_path):
    path = tmp_path / 'new' / 'ckpt.pt'
    checkpoint.save(path, dict(model={'w': torch.ones(2)}, config={}))
    assert torch.equal(checkpoint.load(path)['model']['w'], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ['ckpt.pt']   # no temporary file left


def test_corrupt_and_mismatched_checkpoints(data_root, cache, tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint at all')
    args = TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path]
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        run(args + ['--resume', bad, '--max-iters', '1'])
    run(args + ['--max-iters', '1'])
    with pytest.raises(SystemExit, match="lstm_hidden=24; --resume cannot change --lstm-hidden"):
        run(args + ['--resume', tmp_path / 'ckpt.pt', '--lstm-hidden', '20', '--max-iters', '2'])
    ck = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    ck['config']['lstm_hidden'] = 20            # a checkpoint whose weights do not fit its settings
    torch.save(ck, tmp_path / 'odd.pt')
    with pytest.raises(SystemExit, match="does not fit this model"):
        run(['--resume', tmp_path / 'odd.pt', '--max-iters', '2'])


# ------------------------------------------------------------------ the loop

def test_tiny_lstm_learns_real_ptb(data_root, cache, tmp_path, capsys):
    res, out = run(TINY_LSTM + ['--embed', 'define', '--data-dir', data_root, '--cache-dir', cache,
                                '--out-dir', tmp_path, '--max-iters', '60', '--lr', '10'], capsys)
    rows = [json.loads(r) for r in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['train_loss'] for r in rows if 'train_loss' in r]
    assert losses[-1] < losses[0] - 1.0, losses             # from ln(10000) = 9.2 down
    assert math.isfinite(res['test_ppl']) and res['test_ppl'] < 10000
    assert 'params define=' in out and 'settings: ' in out and 'step      60/60 |' in out
    assert {'step', 'tokens', 'train_loss', 'lr', 'tok_s'} <= set(rows[1])


@pytest.mark.parametrize("embed", ['standard', 'projective', 'adaptive', 'define', 'cnn'])
def test_txl_runs_with_every_embedding(embed, data_root, cache, tmp_path):
    extra = ['--cutoffs', '[2000,10000]'] if embed in ('adaptive', 'cnn') else []
    if embed == 'standard':
        extra += ['--n', 'None']
    res, _ = run(TINY_TXL + ['--embed', embed, '--data-dir', data_root, '--cache-dir', cache,
                             '--out-dir', tmp_path, '--max-iters', '3'] + extra)
    assert math.isfinite(res['test_ppl'])
    if embed == 'cnn':   # the checkpoint carries the words the character CNN reads
        ev, _ = run(['--eval-only', '--resume', tmp_path, '--data-dir', data_root,
                     '--cache-dir', cache, '--out-dir', tmp_path / 'eval'])
        assert ev['test_ppl'] == pytest.approx(res['test_ppl'], rel=1e-5)


def test_a_bpe_corpus_reports_word_level_perplexity(data_root, cache, tmp_path):
    """Baevski & Auli's BPE rows: perplexity per subword, and per word (the same total NLL over
    the word count), comparable with the word-level corpora."""
    import data
    res, _ = run(TINY_TXL + ['--embed', 'standard', '--n', 'None', '--dataset', 'wikitext-2-bpe',
                             '--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path,
                             '--max-iters', '2', '--tied', 'False'])
    c = data.lm_corpus('wikitext-2-bpe', data_dir=data_root, cache_dir=cache)
    for split in ('valid', 'test'):
        ratio = len(getattr(c, split)) / c.words_per_split[split]    # subwords per word, > 1
        assert ratio > 1.05
        assert math.log(res[f'{split}_word_ppl']) == pytest.approx(math.log(res[f'{split}_ppl']) * ratio)


def test_eval_with_the_embedding_cache_equals_eval_without(data_root, cache, tmp_path, capsys):
    run(TINY_TXL + ['--embed', 'define', '--data-dir', data_root, '--cache-dir', cache,
                    '--out-dir', tmp_path, '--max-iters', '3'])
    ev = ['--eval-only', 'True', '--resume', tmp_path / 'ckpt.pt', '--data-dir', data_root,
          '--cache-dir', cache, '--out-dir', tmp_path / 'eval', '--save', 'False']
    plain, _ = run(ev, capsys)
    cached, out = run(ev + ['--embed-cache', 'True'], capsys)
    assert 'embedding cache:' in out
    assert cached['test_ppl'] == pytest.approx(plain['test_ppl'], rel=1e-5)
    assert cached['valid_ppl'] == pytest.approx(plain['valid_ppl'], rel=1e-5)
    rows = [json.loads(l) for l in open(tmp_path / 'eval' / 'metrics.jsonl')]   # --save False too
    assert [r['final'] for r in rows] == [True, True] and not list((tmp_path / 'eval').glob('*.pt'))


def test_resume_is_bitwise_exact(data_root, cache, tmp_path):
    # dropout on and variable BPTT: the RNGs, data position and carried state must all resume
    args = TINY_LSTM + ['--embed', 'define', '--data-dir', data_root, '--cache-dir', cache,
                        '--eval-interval', '4', '--unit-dropout', '0.1']
    run(args + ['--max-iters', '10', '--out-dir', tmp_path / 'a'])
    run(args + ['--max-iters', '5', '--out-dir', tmp_path / 'b'])
    run(args + ['--max-iters', '10', '--out-dir', tmp_path / 'b', '--resume', tmp_path / 'b' / 'ckpt.pt'])
    a, b = model_tensors(tmp_path / 'a' / 'ckpt.pt'), model_tensors(tmp_path / 'b' / 'ckpt.pt')
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_across_nt_asgds_start_is_bitwise_exact(data_root, cache, tmp_path, capsys):
    """Stopped at step 10, before validation stalls (step 12 here): the resumed run must start
    averaging at the same evaluation, from the validation history it carries, and end with
    the same weights and the same running mean."""
    args = TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--asgd', 'True',
                        '--nonmono', '1', '--eval-interval', '2']
    _, out = run(args + ['--max-iters', '20', '--out-dir', tmp_path / 'a'], capsys)
    run(args + ['--max-iters', '10', '--out-dir', tmp_path / 'b'])
    _, resumed = run(args + ['--max-iters', '20', '--resume', tmp_path / 'b'], capsys)
    assert 'NT-ASGD' not in out.split('eval | step 10 ')[0] and 'NT-ASGD' in resumed
    a, b = (torch.load(tmp_path / r / 'ckpt.pt', weights_only=True) for r in 'ab')
    assert a['averager']['count'] == b['averager']['count'] > 1
    for x, y in zip(a['averager']['avg'], b['averager']['avg']):
        assert torch.equal(x, y)
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_root, cache, tmp_path, capsys):
    args = TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path]
    run(args + ['--max-iters', '2'])
    good = (tmp_path / 'ckpt.pt').read_bytes()
    with pytest.raises(SystemExit) as e:
        run(args + ['--max-iters', '40', '--resume', tmp_path / 'ckpt.pt', '--lr', '1e38',
                    '--grad-clip', '0', '--eval-interval', '0'])
    assert e.value.code == 2
    assert 'the loss is' in capsys.readouterr().out
    assert (tmp_path / 'ckpt.pt').read_bytes() == good


def strict_json_rows(path):
    def reject(c):
        raise ValueError(f"{c} is not JSON")
    return [json.loads(r, parse_constant=reject) for r in path.read_text().splitlines()]


def test_nan_after_the_last_log_step_writes_no_checkpoint(data_root, cache, tmp_path, capsys):
    """The weights turn non-finite between log steps: the save at step 4 refuses, the good
    checkpoint stays, metrics.jsonl stays strict JSON."""
    args = TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path]
    run(args + ['--max-iters', '2'])
    good = (tmp_path / 'ckpt.pt').read_bytes()
    with pytest.raises(SystemExit) as e:
        run(args + ['--max-iters', '4', '--resume', tmp_path, '--lr', '1e38', '--grad-clip', '0',
                    '--log-interval', '1000', '--save-interval', '4'])
    assert e.value.code == 2 and 'the weights are not finite' in capsys.readouterr().out
    assert (tmp_path / 'ckpt.pt').read_bytes() == good
    strict_json_rows(tmp_path / 'metrics.jsonl')


def test_a_carried_state_of_the_wrong_shape_is_refused(data_root, cache, tmp_path):
    args = TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path]
    run(args + ['--max-iters', '2'])
    with pytest.raises(SystemExit, match="batch_size=4; --resume cannot change --batch-size"):
        run(args + ['--max-iters', '4', '--resume', tmp_path, '--batch-size', '8'])
    ck = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    ck['per_rank'][0]['states'][0] = [(h[:, :3], c[:, :3]) for h, c in ck['per_rank'][0]['states'][0]]
    torch.save(ck, tmp_path / 'ckpt.pt')                 # as if written by another batch size
    with pytest.raises(ValueError, match="carried state has shapes"):
        run(args + ['--max-iters', '4', '--resume', tmp_path])


def test_a_new_run_never_mixes_with_another_runs_files(data_root, cache, tmp_path, capsys):
    args = TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path]
    run(args + ['--max-iters', '2'])
    with pytest.raises(SystemExit, match="holds another run .*--overwrite True replaces it"):
        run(args + ['--max-iters', '2', '--lr', '5'])
    run(args + ['--max-iters', '3', '--overwrite', 'True'])
    rows = strict_json_rows(tmp_path / 'metrics.jsonl')
    assert max(r['step'] for r in rows) == 3 and not [r for r in rows if r['step'] == 2 and 'final' in r]


def test_resume_takes_the_checkpoints_settings_and_best_pt_evaluates(data_root, cache, tmp_path, capsys):
    """--resume DIR alone continues a PTB run (not the default preset's WikiText-2), and
    best.pt serves --eval-only."""
    run(TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path,
                     '--max-iters', '4', '--eval-interval', '2'])
    res, out = run(['--resume', tmp_path, '--max-iters', '6', '--cache-dir', cache,
                    '--data-dir', data_root], capsys)
    assert 'resumed from' in out and "dataset='ptb'" in out and 'step       5/6' in out
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['train']['step'] == 6
    ev, _ = run(['--eval-only', '--resume', tmp_path / 'best.pt', '--cache-dir', cache,
                 '--data-dir', data_root, '--out-dir', tmp_path / 'eval'], capsys)
    assert math.isfinite(ev['test_ppl'])



def test_a_truncated_checkpoint_is_refused_with_one_line(tmp_path):
    """--resume reads the settings without the weights (mmap): a cut file still gets one line."""
    torch.save(dict(model={'w': torch.zeros(1000)}, config={}), tmp_path / 'ckpt.pt')
    whole = (tmp_path / 'ckpt.pt').read_bytes()
    (tmp_path / 'ckpt.pt').write_bytes(whole[:len(whole) // 2])
    for argv in (['--resume', tmp_path], ['--eval-only', '--resume', tmp_path / 'ckpt.pt']):
        with pytest.raises(SystemExit, match='not a readable checkpoint.*it may be truncated'):
            train.main([str(a) for a in argv])


def test_the_steps_after_the_last_evaluation_are_evaluated_too(data_root, cache, tmp_path, capsys):
    """6 steps, an evaluation every 4: the run validates step 6 as well before its final
    evaluation, which takes the better of the two (not step 4's weights by default)."""
    res, out = run(TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path,
                                '--max-iters', '6', '--eval-interval', '4'], capsys)
    evals = {r['step']: r['val_ppl'] for r in strict_json_rows(tmp_path / 'metrics.jsonl')
             if 'val_ppl' in r}
    assert sorted(evals) == [4, 6] and 'eval | step 6 ' in out
    best = min(evals, key=evals.get)
    assert torch.load(tmp_path / 'best.pt', weights_only=True)['train']['step'] == best
    assert res['valid_ppl'] == pytest.approx(evals[best], rel=1e-9)


def _ctrl_c(args, at, sig=signal.SIGINT):
    """(exit code, output) of train.py ARGS given SIG once it prints a line starting `at`."""
    p = subprocess.Popen([sys.executable, str(ROOT / 'train.py')] + [str(a) for a in args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in p.stdout:
        if line.startswith(at):
            break
    p.send_signal(sig)
    out = p.communicate(timeout=120)[0]
    return p.returncode, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])   # Ctrl-C; a scheduler's stop
def test_ctrl_c_finishes_the_step_and_saves(data_root, cache, tmp_path, sig):
    args = TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path,
                        '--log-interval', '1', '--max-iters', '100000']
    code, out = _ctrl_c(args, at='step       3', sig=sig)      # training runs
    assert code == 128 + sig, out
    assert f"{tmp_path / 'ckpt.pt'} written; python train.py --resume {tmp_path}" in out
    step = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['train']['step']
    assert step >= 3 and f'interrupted at step {step}' in out


def _env_with_sitecustomize(tmp_path, code, **extra):
    """os.environ for a child Python that runs `code` at start-up (a sitecustomize.py)."""
    site = tmp_path / 'site'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(code)
    return dict(os.environ, **extra,
                PYTHONPATH=os.pathsep.join([str(site), os.environ.get('PYTHONPATH', '')]))


def test_out_of_memory_is_one_line_that_names_the_fix(data_root, cache, tmp_path):
    """The optimizer's first step runs out of memory (raised as a GPU would): one error line,
    no traceback, a non-zero exit."""
    env = _env_with_sitecustomize(
        tmp_path, "import torch\n"
                  "def full(self, *a, **k):\n"
                  "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')\n"
                  "torch.optim.SGD.step = full\n")
    r = subprocess.run([sys.executable, str(ROOT / 'train.py')] + [str(a) for a in TINY_LSTM] +
                       ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path / 'r',
                        '--max-iters', '3'], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith('error: out of memory (CUDA out of memory.')
    assert 'Lower --batch-size or --bptt' in r.stderr


def test_entry_points_turn_bad_input_and_memory_into_one_line():
    """settings.run, which train.py and sample.py run under: a ValueError or running out of
    memory is one error line; any other error keeps its traceback."""
    import settings

    def raising(e):
        def main():
            raise e
        return main
    with pytest.raises(SystemExit, match="^error: vocab_size=1 must be at least 2$"):
        settings.run(raising(ValueError('vocab_size=1 must be at least 2')))
    with pytest.raises(SystemExit, match=r"^error: out of memory \(CUDA out of memory\.\); try less$"):
        settings.run(raising(torch.OutOfMemoryError('CUDA out of memory.')), memory_hint='; try less')
    with pytest.raises(RuntimeError, match='shape mismatch'):
        settings.run(raising(RuntimeError('shape mismatch')))
    assert settings.run(lambda: 7) == 7


def test_ctrl_c_outside_the_loop_exits_as_a_stopped_run(data_root, cache, tmp_path):
    """Ctrl-C during set-up (before the loop's handler) exits 130 too, with one line and no
    traceback: a job runner tells a stopped run from a failed one by that code."""
    args = TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path,
                        '--max-iters', '100000']
    code, out = _ctrl_c(args, at='settings:')          # set-up has begun
    assert code == 130 and 'Traceback' not in out, out
    assert 'interrupted' in out


def test_learning_rate_schedules():
    """lr_at against the schedules' values written out at chosen steps."""
    cfg = lambda **kw: dict(dict(lr=1.0, warmup=0, schedule='constant', max_iters=None,   # noqa: E731
                                 min_lr=0.0, lr_decay=0.1, lr_decay_epochs=[], d_model=16), **kw)
    at = lambda c, steps, epoch=0: [round(train.lr_at(c, s, epoch), 12) for s in steps]   # noqa: E731
    assert at(cfg(), [0, 50, 10 ** 6]) == [1.0, 1.0, 1.0]
    assert at(cfg(warmup=4), [0, 1, 2, 3, 4, 99]) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # cosine from lr at the end of warmup to min_lr at max_iters: half-way is the mean
    c = cfg(schedule='cosine', warmup=2, max_iters=12, min_lr=0.1)
    assert at(c, [0, 1, 2, 7, 12, 20]) == [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]
    assert at(c, [4]) == [round(0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)), 12)]
    c = cfg(schedule='step', lr_decay_epochs=[2, 4])   # x0.1 at each listed epoch
    assert [round(train.lr_at(c, 0, e), 12) for e in range(6)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    # noam: rises linearly to its peak lr / sqrt(d_model * warmup) at step `warmup`, then ~ 1/sqrt
    c = cfg(schedule='noam', warmup=4, lr=2.0)
    assert at(c, [0, 1, 2, 3]) == [0.0625, 0.125, 0.1875, 0.25]      # 2 / sqrt(16 * 4) = 0.25
    assert at(c, [15, 63]) == [0.125, 0.0625]                          # 0.25 * sqrt(4 / s)


def test_nt_asgd_starts_when_validation_stalls(data_root, cache, tmp_path, capsys):
    """Merity et al.'s trigger, read from the run's own validation history: averaging starts
    after the first evaluation worse than the best of all but the last `nonmono` before it;
    from then on evaluations (and best.pt) use the running mean of the weights."""
    _, out = run(TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path,
                              '--asgd', 'True', '--nonmono', '1', '--eval-interval', '2',
                              '--max-iters', '30'], capsys)
    rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    evals = [(r['step'], r['val_ppl']) for r in rows if 'val_ppl' in r and not r.get('final')]
    ppl = [v for _, v in evals]
    trigger = next(i for i in range(2, len(ppl)) if ppl[i] > min(ppl[:i - 1]))
    assert 'note: scored on the first 2,000 tokens of each split' in out   # TINY_LSTM's cap
    lines = [ln for ln in out.splitlines() if ln.startswith(('eval |', 'NT-ASGD'))]
    start = lines.index(next(ln for ln in lines if ln.startswith('NT-ASGD')))
    assert start == trigger + 1 and lines[start - 1].startswith(f'eval | step {evals[trigger][0]} ')
    assert all(('averaged weights' in ln) == (i > start) for i, ln in enumerate(lines) if ln.startswith('eval'))
    ck = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ck['averager']['count'] == 30 - evals[trigger][0] + 1    # started, then once a step
    best = torch.load(tmp_path / 'best.pt', weights_only=True)
    names = [n for n, _ in build.model(ck['config'], 10000).named_parameters()]
    again, _ = run(['--eval-only', '--resume', tmp_path / 'ckpt.pt', '--device', 'cpu',
                    '--data-dir', data_root, '--cache-dir', cache], capsys)   # the mean, too
    assert again['valid_ppl'] == pytest.approx(evals[-1][1], rel=1e-9)
    if best['train']['step'] == 30:   # the last evaluation was the best: best.pt holds the mean
        for name, mean in zip(names, ck['averager']['avg']):
            assert torch.equal(best['model'][name], mean), name
            assert not torch.equal(ck['model'][name], mean) or mean.dim() == 0, name


def test_averager_is_the_mean_of_the_iterates():
    p = torch.nn.Parameter(torch.zeros(3))
    avg = train.Averager([p])
    seen = []
    for step in range(5):
        with torch.no_grad():
            p.add_(torch.randn(3))
        if step == 1:
            avg.start()
        else:
            avg.update()
        if step >= 1:
            seen.append(p.detach().clone())
    torch.testing.assert_close(avg.avg[0], torch.stack(seen).mean(0))
    before = p.detach().clone()
    avg.swap()
    torch.testing.assert_close(p.detach(), torch.stack(seen).mean(0))
    avg.swap()
    assert torch.equal(p.detach(), before)


NO_DROPOUT = dict(lstm=TINY_LSTM + ['--dropout', '0', '--dropouth', '0', '--dropouti', '0',
                                    '--dropoute', '0', '--wdrop', '0', '--eval-interval', '0'],
                  txl=TINY_TXL + ['--embed', 'define', '--dropout', '0', '--dropatt', '0',
                                  '--unit-dropout', '0', '--map-dropout', '0',
                                  # SGD, unclipped: a wrong gradient scale shows
                                  '--optimizer', 'sgd', '--lr', '0.5', '--grad-clip', '0'])


def _for_torchrun(args):
    """train.py's arguments for torchrun, whose own parser takes --n, --m, --k as abbreviations
    of its options: those written n=8."""
    short, args = {'--n', '--m', '--k'}, [str(a) for a in args]
    return [f'{a[2:]}={args[i + 1]}' if a in short else a for i, a in enumerate(args)
            if i == 0 or args[i - 1] not in short]


@pytest.mark.parametrize("model", ['lstm', 'txl'])
def test_ddp_two_processes_equal_one(model, data_root, cache, tmp_path):
    # dropouts off: two gloo ranks with half the streams each = one process with all of them
    args = NO_DROPOUT[model] + ['--data-dir', data_root, '--cache-dir', cache, '--max-iters', '6',
                                '--eval-max-tokens', '200']
    args = _for_torchrun(args)
    run(args + ['--out-dir', tmp_path / 'one'])
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc_per_node=2', str(ROOT / 'train.py')] + args +
                       ['--out-dir', str(tmp_path / 'two')], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = model_tensors(tmp_path / 'one' / 'ckpt.pt'), model_tensors(tmp_path / 'two' / 'ckpt.pt')
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def test_ddp_ranks_log_at_the_same_steps_whatever_their_clocks(data_root, cache, tmp_path):
    """Rank 1's clock jumps a minute at every reading. Were the once-a-minute log line decided
    per rank, rank 1's loss all-reduce would meet rank 0's gradient all-reduce and fail."""
    env = _env_with_sitecustomize(
        tmp_path, "import os, time\n"
                  "if os.environ.get('RANK') == '1':\n"
                  "    real, reads = time.time, [0]\n"
                  "    def ahead():\n"
                  "        reads[0] += 1\n"
                  "        return real() + 61 * reads[0]\n"
                  "    time.time = ahead\n", OMP_NUM_THREADS='1')
    args = _for_torchrun(TINY_LSTM + ['--data-dir', data_root, '--cache-dir', cache])
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc_per_node=2', str(ROOT / 'train.py')] + args +
                       ['--max-iters', '6', '--log-interval', '1000', '--out-dir', str(tmp_path / 'r')],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert [ln.split('|')[0].split()[1] for ln in r.stdout.splitlines() if ln.startswith('step ')] == ['1/6']


def test_ddp_resume_is_bitwise_exact(data_root, cache, tmp_path):
    """Two gloo ranks, dropout and variable lengths on: 24 steps at once equal 4 steps and a
    resume, and equal a run whose rank was killed mid-run and resumed from its last checkpoint
    (every rank's random state, carried state and data position come back)."""
    args = _for_torchrun(TINY_LSTM + ['--embed', 'define', '--data-dir', data_root,
                                      '--cache-dir', cache, '--eval-interval', '4'])

    def torchrun(*extra):
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                            '--nproc_per_node=2', str(ROOT / 'train.py')] + args + list(map(str, extra)),
                           capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS='1'))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    torchrun('--max-iters', 24, '--out-dir', tmp_path / 'a')
    torchrun('--max-iters', 4, '--out-dir', tmp_path / 'b')
    torchrun('--max-iters', 24, '--resume', tmp_path / 'b')
    # a rank killed mid-run (torchrun then stops the other): the last checkpoint resumes
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                          '--nproc_per_node=2', str(ROOT / 'train.py')] + args +
                         ['--max-iters', '100000', '--save-interval', '2', '--log-interval', '1',
                          '--out-dir', str(tmp_path / 'c')], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    for line in p.stdout:
        if line.startswith('step       5'):
            break
    pattern = f'train.py.*{tmp_path / "c"}'
    ranks = [int(r) for r in subprocess.run(['pgrep', '-f', pattern], capture_output=True,
                                            text=True).stdout.split() if int(r) != p.pid]
    os.kill(max(ranks), signal.SIGKILL)                         # a worker, not torchrun itself
    p.communicate(timeout=120)
    subprocess.run(['pkill', '-9', '-f', pattern])              # no worker outlives the test
    assert p.returncode != 0
    assert 4 <= torch.load(tmp_path / 'c' / 'ckpt.pt', weights_only=True)['train']['step'] < 24
    torchrun('--max-iters', 24, '--resume', tmp_path / 'c')
    a, b, c = (model_tensors(tmp_path / r / 'ckpt.pt') for r in 'abc')
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k


TINY_NMT = ['--config', 'multi30k_transformer', '--device', 'cpu', '--d-model', '32', '--n-head', '2',
            '--d-ff', '64', '--enc-layers', '1', '--dec-layers', '1', '--n', '16', '--k', '64', '--m', '32',
            '--max-tokens', '600', '--eval-max-tokens', '150', '--log-interval', '2', '--max-len-b', '5']


@pytest.mark.parametrize("embed", ['standard', 'projective', 'adaptive', 'define'])
def test_nmt_runs_with_every_embedding_and_translates(embed, data_root, cache, tmp_path, capsys,
                                                      monkeypatch):
    extra = ['--cutoffs', '[1000,4000]'] if embed == 'adaptive' else []
    if embed == 'adaptive':
        extra += ['--label-smoothing', '0']   # an adaptive softmax has no full distribution to smooth
    res, out = run(TINY_NMT + ['--embed', embed, '--data-dir', data_root, '--cache-dir', cache,
                               '--out-dir', tmp_path, '--max-iters', '3'] + extra, capsys)
    assert math.isfinite(res['test_ppl']) and 0 <= res['test_bleu'] <= 100
    assert 'BLEU test' in out and 'tok:none' in out
    if embed == 'define':   # sample.py translates: one line out per line in
        import io
        import sample
        outs = []
        for cache_flag in ([], ['--embed-cache']):
            monkeypatch.setattr(sys, 'stdin', io.StringIO("a man rides a bike .\ntwo dogs play\n"))
            sample.main(['--resume', str(tmp_path), '--device', 'cpu', '--translate']
                        + cache_flag)
            outs.append(capsys.readouterr().out.splitlines())
        # in eval mode (dropout off), with and without the embedding cache it is the same
        # function: the same translations
        assert len(outs[0]) == 2 and outs[1] == outs[0]


def test_compiled_translation_without_buckets_is_refused_on_a_gpu():
    """--compile True --bucket 0 on a GPU: one line naming the fix, before any GPU or data is
    touched (PERF.md: that compile did not finish in minutes); not for --eval-only, which
    runs eager (nor sample.py, which loads with compile=False)."""
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--config', 'multi30k_transformer',
                        '--device', 'cuda', '--compile', 'True', '--bucket', '0'],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["error: --compile True --bucket 0 on a GPU: translation's "
                                             "dynamic-shape compile did not finish in minutes (PERF.md); "
                                             "keep --bucket 8, or drop --compile"]
    cfg = dict(train.get_config(['--config', 'multi30k_transformer', '--device', 'cuda', '--compile',
                                 'True', '--bucket', '0']), eval_only=True)   # evaluation is eager
    if torch.cuda.is_available():
        assert train.setup(cfg).device.type == 'cuda'
    else:   # past the refusal, to the next check
        with pytest.raises(SystemExit, match='no GPU is visible'):
            train.setup(cfg)


def test_translation_buckets_follow_compile_and_are_stored(data_root, cache, tmp_path):
    """Fixed batch shapes (data.token_batches(bucket=...)) by default only for a compiled
    step or one replayed as CUDA graphs (on one GPU, one micro-batch a step: not the WMT
    preset's four); the value is resolved once and stored, so a resumed run keeps its batches."""
    nmt = ['--model', 'nmt']
    assert train.get_config(nmt + ['--device', 'cpu'])['bucket'] == 0
    assert train.get_config(nmt + ['--device', 'cuda'])['bucket'] == 8
    assert train.get_config(nmt + ['--device', 'cuda', '--cuda-graphs', 'False'])['bucket'] == 0
    assert train.get_config(['--config', 'wmt14_transformer_base', '--device', 'cuda'])['bucket'] == 0
    assert train.get_config(['--config', 'wmt14_transformer_base', '--device', 'cuda', 'max_tokens=25000'])['bucket'] == 8
    assert train.get_config(nmt)['bucket'] == (8 if torch.cuda.is_available() else 0)
    assert train.get_config(nmt + ['--compile', 'True'])['bucket'] == 8
    assert train.get_config(nmt + ['--compile', 'True', '--bucket', '4'])['bucket'] == 4
    assert train.get_config(['--model', 'txl'])['bucket'] is None     # language models: no use
    with pytest.raises(SystemExit, match="--bucket -1 must be 0 or more"):
        train.get_config(nmt + ['--bucket', '-1'])
    res, _ = run(TINY_NMT + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path,
                             '--max-iters', '2', '--bucket', '8', '--max-len-b', '2'])
    assert math.isfinite(res['test_ppl'])
    ck = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ck['config']['bucket'] == 8
    assert train.get_config(['--resume', str(tmp_path), '--compile', 'True'])['bucket'] == 8


def test_last_checkpoints_averaged_for_the_final_test(data_root, cache, tmp_path, capsys):
    """--avg-last N: the final evaluation is of the mean of the last N numbered checkpoints,
    the same as --eval-only of a checkpoint holding that mean."""
    res, out = run(TINY_NMT + ['--data-dir', data_root, '--cache-dir', cache, '--out-dir', tmp_path,
                               '--max-iters', '3', '--eval-interval', '1', '--avg-last', '2'], capsys)
    assert "averaged 2 checkpoints: ['ckpt2.pt', 'ckpt3.pt']" in out
    two = [torch.load(tmp_path / f'ckpt{s}.pt', weights_only=True) for s in (2, 3)]
    mean = {k: (two[0]['model'][k].double() + two[1]['model'][k].double()).div(2).to(v.dtype)
            for k, v in two[1]['model'].items()}
    torch.save(dict(two[1], model=mean), tmp_path / 'mean.pt')
    again, _ = run(['--eval-only', '--resume', tmp_path / 'mean.pt', '--device', 'cpu',
                    '--data-dir', data_root, '--cache-dir', cache], capsys)
    assert again['test_ppl'] == pytest.approx(res['test_ppl'], rel=1e-6)
    assert again['test_bleu'] == res['test_bleu']


@pytest.mark.parametrize("optimizer", ['sgd', 'adam'])
def test_unit_lr_scales_only_the_units_parameters(optimizer):
    cfg = train.get_config(TINY_LSTM[:2] + ['--embed', 'define', 'unit_lr=0.1', f'optimizer={optimizer}'])
    model = build.model(cfg, 50)
    opt = train.make_optimizer(cfg, model, fused=False)
    train.set_lr(opt, 20.0)
    lr_of = {id(p): g['lr'] for g in opt.param_groups for p in g['params']}
    assert sorted(map(id, model.parameters())) == sorted(lr_of)    # each parameter once
    unit = {id(p) for p in model.io.unit.parameters()}
    assert unit and all(lr_of[i] == pytest.approx(2.0) for i in unit)
    assert all(lr == 20.0 for i, lr in lr_of.items() if i not in unit)



@pytest.mark.parametrize("embed, default", [('projective', 16 ** 0.5), ('define', 1.0)])
def test_embed_scale_multiplies_what_enters_the_model(embed, default):
    # the TXL default scales a table lookup by sqrt(d_model) and DeFINE's output not at all;
    # embed_scale=c replaces either: the embedding is then c / default times the default one
    args = ['--model', 'txl', '--embed', embed, 'd_model=16', 'n=8', 'k=16', 'n_layer=1', 'n_head=2',
            'd_head=8', 'd_inner=16', 'vocab_size=50']
    ids = torch.arange(50)
    out = []
    for extra in ([], ['embed_scale=2.5']):
        torch.manual_seed(0)
        io = build.model(train.get_config(args + extra), 50).io.eval()
        out.append(io.embed(ids))
    assert io.embed_scale == 2.5
    torch.testing.assert_close(out[1], out[0] * (2.5 / default))

def test_resume_with_a_foreign_optimizer_state_says_what_to_do(data_root, cache, tmp_path):
    args = TINY_LSTM + ['--embed', 'define', '--data-dir', data_root, '--cache-dir', cache,
                        '--out-dir', tmp_path, '--max-iters', '2']
    cfg = train.get_config([str(a) for a in args])
    model = build.model(cfg, 10000)
    one_group = torch.optim.SGD(model.parameters(), lr=1.0)   # as before unit_lr
    torch.save(dict(model=model.state_dict(), config=cfg, optimizer=one_group.state_dict()),
               tmp_path / 'old.pt')
    with pytest.raises(SystemExit, match='older train.py'):
        run(args + ['--resume', tmp_path / 'old.pt'])
