"""sample.py on tiny models trained here on the real corpora: seeded sampling, the embedding
cache, Transformer-XL's memory against full recomputation, scoring a text file against
train.py's evaluation, and translating raw text line by line."""
import io
import re
import shutil
import sys

import pytest
import torch

import build
import checkpoint
import nmt
import sample
import train
from conftest import shared_data_dir

# as in test_train.py, with DeFINE embeddings, and evaluation batches large enough that a whole
# split is evaluated in a few dozen windows
EVAL = ['--eval-batch-size', '40', '--test-batch-size', '40', '--eval-tgt-len', '50',
        '--eval-max-tokens', '400']
TINY = dict(
    lstm=['--config', 'ptb_awd_lstm', '--device', 'cpu', '--embed', 'define', '--d-model', '16',
          '--n', '8', '--lstm-hidden', '24', '--k', '32', '--depth', '2', '--batch-size', '4',
          '--bptt', '12', '--lr', '10', '--max-iters', '4', *EVAL],
    txl=['--model', 'txl', '--dataset', 'ptb', '--device', 'cpu', '--embed', 'define', '--d-model', '32',
         '--n-layer', '2', '--n-head', '2', '--d-head', '16', '--d-inner', '64', '--n', '16', '--k', '64',
         '--m', '32', '--batch-size', '4', '--bptt', '12', '--mem-len', '12', '--eval-interval', '0',
         '--lr', '1e-3', '--warmup', '0', '--max-iters', '4', *EVAL],
    nmt=['--config', 'multi30k_transformer', '--device', 'cpu', '--embed', 'define', '--d-model', '32',
         '--n-head', '2', '--d-ff', '64', '--enc-layers', '1', '--dec-layers', '1', '--n', '16', '--k', '64',
         '--m', '32', '--max-tokens', '600', '--eval-max-tokens', '50', '--max-len-b', '5',
         '--max-iters', '2'])
TINY['bpe'] = TINY['txl'] + ['--dataset', 'ptb-bpe']   # the same model over PTB's 8K subwords


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """kind -> the run folder of a tiny model of that kind, trained on first use."""
    data = shared_data_dir()
    if not (data / 'ptb' / 'train.txt').exists():
        pytest.skip(f"real corpora not found at {data}: set DEFINE_TEST_DATA")
    root, runs = tmp_path_factory.mktemp('runs'), {}

    def get(kind):
        if kind not in runs:
            train.main([str(a) for a in TINY[kind] + ['--data-dir', data, '--cache-dir', root / 'cache',
                                                       '--out-dir', root / kind]])
            runs[kind] = root / kind
        return runs[kind]
    return get


def run(argv, capsys, stdin=None, monkeypatch=None):
    """sample.main -> (its result, stdout, stderr)."""
    capsys.readouterr()                          # drop what training printed
    if stdin is not None:
        monkeypatch.setattr(sys, 'stdin', io.StringIO(stdin))
    res = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return res, out, err


# ------------------------------------------------------------------ sampling

@pytest.mark.parametrize('kind', ['lstm', 'txl'])
def test_sampling_is_seeded(kind, trained, capsys):
    argv = ['--resume', trained(kind), '--start', 'the meaning of zzyzx', '--num-samples', '2',
            '--max-new-tokens', '20', '--temperature', '1.0']
    texts, a, err = run(argv + ['--seed', '1'], capsys)
    _, b, _ = run(argv + ['--seed', '1'], capsys)
    _, c, _ = run(argv + ['--seed', '2'], capsys)
    assert a == b and a != c
    assert len(texts) == 2 and a.count('---------------\n') == 2 and 'rebuilt' not in err
    assert '1 of 4 prompt words not in the vocabulary' in err
    for t in texts:                              # the prompt, then 20 words ('<eos>' a line end)
        assert t.startswith('the meaning of <unk>')
        assert len(t.split()) + t.count('\n') == 4 + 20


@pytest.mark.parametrize('kind', ['lstm', 'txl'])
def test_the_embedding_cache_samples_the_same_tokens(kind, trained, capsys):
    argv = ['--resume', trained(kind), '--start', 'the stock market', '--num-samples', '3',
            '--max-new-tokens', '30', '--temperature', '1.0', '--top-k', '0', '--seed', '7']
    plain, out, err = run(argv, capsys)
    cached, out_cached, err_cached = run(argv + ['--embed-cache'], capsys)
    assert 'embedding cache:' in err_cached and 'embedding cache:' not in err
    assert cached == plain and out_cached == out


@pytest.mark.parametrize('kind', ['lstm', 'txl'])
def test_greedy_sampling_takes_the_most_likely_word(kind, trained, capsys):
    """--temperature 0, and --top-k 1 at any temperature, pick the most likely word each step:
    the words of greedy decoding by full recomputation over the growing prefix."""
    argv = ['--resume', trained(kind), '--start', 'the stock market', '--num-samples', '2',
            '--max-new-tokens', '6']
    greedy, _, _ = run(argv + ['--temperature', '0'], capsys)
    top1, _, _ = run(argv + ['--temperature', '1.5', '--top-k', '1', '--seed', '3'], capsys)
    assert greedy[0] == greedy[1] and top1 == greedy

    class Args:
        resume, device, embed_cache = trained(kind), 'cpu', False
    ck, _, _, model = sample.load(Args, lambda msg: None)
    words = ck['words']
    ids = [words.index(w) for w in ['<eos>', 'the', 'stock', 'market']]
    with torch.no_grad():
        for _ in range(6):
            lp = sample.step(model, torch.tensor(ids)[:, None], None)[0]   # the whole prefix again
            ids.append(int(lp[0].argmax()))
    want = ' '.join('\n' if words[i] == '<eos>' else words[i] for i in ids[1:])
    assert greedy[0] == re.sub(r' ?\n ?', '\n', want)


def test_txl_step_by_step_with_memory_equals_full_recomputation(trained):
    class Args:
        resume, device, embed_cache = trained('txl'), 'cpu', False
    _, cfg, _, model = sample.load(Args, lambda msg: None)
    M = model.mem_len                            # 12
    ids = torch.randint(0, cfg['vocab_size'], (M + 8, 2))   # (T, B)

    def incremental(prefix):                     # as sample() decodes: 3 words, then one at a time
        lp, state = sample.step(model, prefix[:3], None)
        for t in range(3, len(prefix)):
            lp, state = sample.step(model, prefix[t:t + 1], state)
        return lp

    with torch.no_grad():
        full = sample.step(model, ids[:M + 1], None)[0]   # one forward over the whole prefix
        torch.testing.assert_close(incremental(ids[:M + 1]), full, atol=1e-5, rtol=1e-5)
        # a longer prefix is more than the memory covers: then the two differ
        assert (incremental(ids) - sample.step(model, ids, None)[0]).abs().max() > 1e-4


# ------------------------------------------------------------------ scoring a file

def test_eval_file_reports_perplexity_and_the_oov_rate(trained, capsys, tmp_path):
    lines = (shared_data_dir() / 'ptb' / 'valid.txt').read_text().splitlines()[:6]
    lines.append('the florble of the glarbix market')          # two made-up words
    (tmp_path / 'mine.txt').write_text('\n'.join(lines) + '\n')
    res, out, _ = run(['--resume', trained('lstm'), '--eval-file', tmp_path / 'mine.txt'], capsys)
    tokens = sum(len(ln.split()) + 1 for ln in lines)           # an '<eos>' per line
    assert res['tokens'] == tokens and res['oov'] == 2 and res['oov_rate'] == 2 / tokens
    assert out == f"ppl {res['ppl']:.4f} | tokens {tokens} | oov 2 | oov rate {2 / tokens:.6f}\n"
    assert 1 < res['ppl'] < 1e6


def score_valid_both_ways(run_dir, capsys, tmp_path):
    """PTB's valid file scored by sample.py --eval-file, and the valid split by train.py
    --eval-only: (sample's result, its stdout, train's result)."""
    shutil.copy(shared_data_dir() / 'ptb' / 'valid.txt', tmp_path / 'copy.txt')
    res, out, _ = run(['--resume', run_dir, '--eval-file', tmp_path / 'copy.txt'], capsys)
    ref = train.main([str(a) for a in ['--eval-only', 'True', '--resume', run_dir / 'ckpt.pt',
                                       '--eval-max-tokens', 'None', '--save', 'False',
                                       '--out-dir', tmp_path / 'eval']])
    return res, out, ref


def test_eval_file_of_the_valid_split_equals_train_eval_only(trained, capsys, tmp_path):
    # Transformer-XL: its memory carried across windows, as train.py's evaluation does
    res, _, ref = score_valid_both_ways(trained('txl'), capsys, tmp_path)
    assert res['oov'] == 0 and res['tokens'] == 73760
    assert res['ppl'] == pytest.approx(ref['valid_ppl'], rel=1e-4)


def test_a_bpe_model_reads_and_writes_words(trained, capsys, tmp_path):
    # a file and a prompt are words, spelt in subwords as the model's corpus was (the file's
    # perplexity per subword and per word as train.py evaluates the valid split); samples are
    # printed as words
    res, out, ref = score_valid_both_ways(trained('bpe'), capsys, tmp_path)
    assert res['oov'] == 0 and res['words'] == 73760 and res['tokens'] > 73760
    assert res['ppl'] == pytest.approx(ref['valid_ppl'], rel=1e-4)
    assert res['word_ppl'] == pytest.approx(ref['valid_word_ppl'], rel=1e-4)
    assert out.endswith(f" | word ppl {res['word_ppl']:.4f} | words 73760\n")
    texts, out, err = run(['--resume', trained('bpe'), '--start', 'the meaning of',
                           '--max-new-tokens', '30', '--temperature', '1.0'], capsys)
    assert 'not in the vocabulary' not in err
    # (the next subword may go on with 'of': an untrained model's word, but a word)
    assert texts[0].startswith('the meaning of') and '\u2581' not in out


@pytest.mark.parametrize('kind', ['txl', 'nmt'])
def test_export_table_holds_each_words_input_vector(kind, trained, capsys, tmp_path):
    # word2vec's text format, read back by hand: a 'V d' line, then each word and the vector
    # the unit itself gives it in eval mode (translation: the source side), to 6 digits
    run_dir = trained(kind)
    _, _, err = run(['--resume', run_dir, '--export-table', tmp_path / 'vectors.txt'], capsys)
    lines = (tmp_path / 'vectors.txt').read_text(encoding='utf-8').splitlines()
    V, d = map(int, lines[0].split())
    ck = checkpoint.load(run_dir / 'ckpt.pt')
    words = ck['vocab']['src'] if kind == 'nmt' else ck['words']
    assert V == len(words) == len(lines) - 1 and d == 32 and f"wrote {tmp_path / 'vectors.txt'}" in err
    assert [ln.split(' ', 1)[0] for ln in lines[1:]] == words
    cfg = train.checkpoint_config(ck, device='cpu')
    model = build.trained(ck, cfg, train.setup(dict(cfg, save=False)))
    io = model.src_io if kind == 'nmt' else model.io
    ids = [0, 1, 7, V // 2, V - 1]
    with torch.no_grad():
        want = io.embed(torch.tensor(ids))                       # (5, d): the unit, no cache
    got = torch.tensor([[float(v) for v in lines[1 + i].split()[1:]] for i in ids])
    assert io.cached is None and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):   # one task a call
        sample.get_args(['--resume', str(run_dir), '--export-table', 'v.txt', '--eval-file', 'f.txt'])
    assert '--export-table is a task of its own' in capsys.readouterr().err


# ------------------------------------------------------------------ translation

def test_translation_tokenizes_raw_text_and_detokenizes_its_output(trained, capsys, monkeypatch):
    ck = checkpoint.load(trained('nmt') / 'ckpt.pt')
    src, tgt = ck['vocab']['src'], ck['vocab']['tgt']
    fed = []

    def spy(self, sentences, *args, **kw):        # what the model reads; a fixed German reply
        fed.extend(' '.join(src[i] for i in s) for s in sentences)
        return [[tgt.index(w) for w in 'ein mann mit &quot; hut &quot; .'.split()]] * len(sentences)
    monkeypatch.setattr(nmt.Transformer, 'translate', spy)
    argv = ['--resume', trained('nmt'), '--translate']
    text = "A man's bicycle.\n\nTwo dogs, running!\n"
    _, out, err = run(argv, capsys, text, monkeypatch)
    assert fed == ['a man &apos;s bicycle .', 'two dogs , running !']
    assert out == 'ein mann mit "hut".\n\nein mann mit "hut".\n'      # an empty line stays empty
    assert '3 lines; 0 of 10 source tokens unknown' in err
    _, out, _ = run(argv + ['--keep-tokenized'], capsys, text, monkeypatch)
    assert out == 'ein mann mit &quot; hut &quot; .\n\nein mann mit &quot; hut &quot; .\n'


def test_translation_goes_on_past_a_very_long_line(trained, capsys, monkeypatch):
    run_dir = trained('nmt')                     # trained before the patches below
    # a model of 128 positions (the sinusoids are not saved), so that the cut line decodes fast
    init = nmt.Transformer.__init__
    monkeypatch.setattr(nmt.Transformer, '__init__',
                        lambda self, *a, **kw: init(self, *a, **{**kw, 'max_len': 128}))
    real, fed = nmt.Transformer.translate, []

    def spy(self, sentences, *args, **kw):
        fed.extend(map(len, sentences))
        return real(self, sentences, *args, **kw)
    monkeypatch.setattr(nmt.Transformer, 'translate', spy)
    text = 'A dog runs.\n' + ' '.join(['dog'] * 2000) + '\nTwo men zzyzx.\n'
    _, out, err = run(['--resume', run_dir, '--translate', '--batch-lines', '2', '--verbose'],
                      capsys, text, monkeypatch)
    lines = out.split('\n')
    assert len(lines) == 4 and lines[-1] == ''          # one line out per line in
    assert 'warning: line 2 has 2000 tokens; translating its first 121' in err
    assert sorted(fed) == [4, 4, 128 - 5 - 2]     # max_len - max_len_b - 2 source words fit
    assert 'line 3: 1 unknown: zzyzx' in err and '3 lines; 1 of 129 source tokens unknown' in err


def test_a_mode_the_model_has_not_is_one_error_line(trained, capsys):
    with pytest.raises(SystemExit, match='holds an AWD-LSTM model: --translate is for translation'):
        run(['--resume', trained('lstm'), '--translate'], capsys)
    with pytest.raises(SystemExit, match='holds a translation model: translate with --translate'):
        run(['--resume', trained('nmt')], capsys)
    with pytest.raises(SystemExit, match='not found'):
        run(['--resume', trained('lstm') / 'missing.pt'], capsys)


@pytest.mark.parametrize('kind', ['lstm', 'nmt', 'bpe'])
def test_a_checkpoint_without_a_vocabulary_rebuilds_it(kind, trained, capsys, monkeypatch, tmp_path):
    # older LM checkpoints hold no words, and a translation model's best.pt no vocab: the
    # corpus gives the same vocabulary back
    ck = checkpoint.load(trained(kind) / 'ckpt.pt')
    torch.save({k: ck[k] for k in ('model', 'config', 'train')}, tmp_path / 'best.pt')
    argv = ['--translate'] if kind == 'nmt' else ['--start', 'the market', '--max-new-tokens', '9']
    text = 'Two dogs play in the snow.\nA woman reads.\n'
    _, want, _ = run(['--resume', trained(kind), *argv], capsys, text, monkeypatch)
    _, got, err = run(['--resume', tmp_path / 'best.pt', *argv], capsys, text, monkeypatch)
    assert got == want and len(want.split()) > 5
    sizes = {'nmt': '10,214 + 18,726', 'lstm': '10,000', 'bpe': '8,000'}[kind]
    unit = 'subwords' if kind == 'bpe' else 'words'
    assert f"vocabulary: {sizes} {unit} rebuilt from the {ck['config']['dataset']} training" in err
