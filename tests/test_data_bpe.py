"""Tests for the BPE language-model corpora of data.py (Baevski & Auli's BPE / BPE-T rows): the subwords
spell the word corpus's text back, the BPE is trained deterministically, cached with its model, and
rebuilt when the text or the model changes. Small corpora written under tmp_path; one real-data test."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

import data
from data import BPE_MARK, SPLITS, lm_corpus

_TEXTS = {  # leading / trailing spaces and a blank line as in WikiText; '<unk>' a word of the text
    'train': ' = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : '
             '戦場のヴァルキュリア3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical '
             'role @-@ playing video game '
             '.\n The game began development in 2010 , carrying over a large portion of the work done on Valkyria '
             'Chronicles II .\n' * 3 + ' the <unk> of the games , the chronicles of the playing\n',
    'valid': ' The game of Valkyria <unk> .\n\n unplayed chronicles , 2011 @-@ role\n',
    'test': ' Japanese games outside Japan Ωmega .\n',  # 'Ω' is no letter of train: that word becomes <unk>
}


def _corpus_files(tmp_path, monkeypatch, texts=_TEXTS):
    d = tmp_path / 'src' / 'wikitext-2'
    d.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (d / f'{split}.txt').write_text(texts[split], encoding='utf-8')
    for name in ('wikitext-2', 'wikitext-2-bpe'):  # not the real files: no checksums to hold them to
        monkeypatch.setitem(data.LM_CORPORA, name, dict(data.LM_CORPORA[name], checksums=(None,) * 3))
    return d, dict(data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')


def _words(text):  # what the word corpus reads: whitespace tokens, '<eos>' after every line
    return [w for line in text.splitlines() for w in line.split() + ['<eos>']]


def _check_bpe(c, word):
    assert c.bpe is not None and c.bpe.is_file()
    assert c.train.dtype == np.int32 and len(c.vocab) == len(c.counts) == len(set(c.vocab))
    assert c.vocab[0] == max(c.vocab, key=lambda w: c.counts[c.stoi[w]])  # id 0 the most frequent
    assert (np.diff(c.counts) <= 0).all() and (np.bincount(c.train, minlength=len(c.vocab)) == c.counts).all()
    for split in SPLITS:
        ids = getattr(c, split)
        assert ids.min() >= 0 and ids.max() < len(c.vocab)
        assert c.words_per_split[split] == len(getattr(word, split))  # the word corpus's token count
        assert (ids == c.stoi['<eos>']).sum() == (getattr(word, split) == word.stoi['<eos>']).sum()
    # the specials are whole tokens, never letters merged into other subwords
    assert not [w for w in c.vocab if w not in ('<unk>', '<eos>') and ('<unk' in w or 'eos>' in w)]
    assert all(w.startswith(BPE_MARK) or w in ('<unk>', '<eos>') or BPE_MARK not in w for w in c.vocab)


def test_bpe_spells_the_word_corpus_back(tmp_path, monkeypatch):
    d, kw = _corpus_files(tmp_path, monkeypatch)
    c = lm_corpus('wikitext-2-bpe', bpe_vocab=120, **kw)
    word = lm_corpus('wikitext-2', **kw)
    assert c.name == 'wikitext-2-bpe' and len(c.vocab) <= 120
    _check_bpe(c, word)
    # ids -> subword strings -> words: the text of every split, <eos> lines included
    assert c.decode(c.train) == _words(_TEXTS['train']) == word.decode(word.train)
    assert c.decode(c.valid) == _words(_TEXTS['valid'])  # 'unplayed', '2011': unseen words, spelt in subwords
    assert c.decode(c.test) == [w if w != 'Ωmega' else '<unk>' for w in _words(_TEXTS['test'])]
    assert len(c.train) > c.words_per_split['train']  # rarer words are split
    eos = np.flatnonzero(c.valid == c.stoi['<eos>'])
    pieces = [c.vocab[i] for i in c.valid[eos[-2] + 1:]]  # ' unplayed chronicles , 2011 @-@ role' <eos>
    assert ''.join(pieces) == ''.join(BPE_MARK + w for w in 'unplayed chronicles , 2011 @-@ role'.split()) + '<eos>'
    assert pieces[0].startswith(BPE_MARK) and len(pieces) > 7  # '▁' starts a word's first subword
    assert c.decode(c.valid[:eos[0] + 1]) == ['The', 'game', 'of', 'Valkyria', '<unk>', '.', '<eos>']
    # the vocabulary size is a parameter; the word corpora refuse it
    assert len(lm_corpus('wikitext-2-bpe', bpe_vocab=90, **kw).vocab) == 90
    with pytest.raises(ValueError, match='word-level'):
        lm_corpus('wikitext-2', bpe_vocab=100, **kw)
    # BPE corpora read (and would download) the word corpus's files: no second copy in the cache
    assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == ['wikitext-2', 'wikitext-2-bpe']
    assert word.words_per_split == {s: len(getattr(word, s)) for s in SPLITS}  # word corpora: ratio 1


def test_bpe_encoder_spells_new_text_as_the_corpus_spells_its_own(tmp_path, monkeypatch):
    """sample.py's encoding of text a model has not seen: from the tokenizer alone, each split's
    words give the corpus's ids (built by _build_bpe, independently) and decode back to them."""
    d, kw = _corpus_files(tmp_path, monkeypatch)
    c = lm_corpus('wikitext-2-bpe', bpe_vocab=120, **kw)
    encode = data.bpe_encoder(c.bpe.read_text(encoding='utf-8'), c.vocab)
    for split in SPLITS:
        words = _words(_TEXTS[split])
        pieces = encode(words)
        assert [i for p in pieces for i in p] == getattr(c, split).tolist(), split
        assert data.bpe_words([c.vocab[i] for p in pieces for i in p]) == c.decode(getattr(c, split))
    assert encode(['Ωmega', '<unk>', '<eos>']) == [[c.stoi['<unk>']], [c.stoi['<unk>']], [c.stoi['<eos>']]]


def test_bpe_with_every_word_one_subword_is_the_word_corpus(tmp_path, monkeypatch):
    """A BPE vocabulary large enough to keep every training word whole: the same token stream
    as the word corpus (renumbered), so its word-level perplexity formula has ratio 1."""
    texts = {s: ' '.join(w for w in _TEXTS['train'].split()) + '\n' for s in SPLITS}
    d, kw = _corpus_files(tmp_path / 'whole', monkeypatch, texts)
    c, word = lm_corpus('wikitext-2-bpe', bpe_vocab=5000, **kw), lm_corpus('wikitext-2', **kw)
    for s in SPLITS:
        assert len(getattr(c, s)) == c.words_per_split[s] == len(getattr(word, s))
        assert c.decode(getattr(c, s)) == word.decode(getattr(word, s))


def test_bpe_defaults_and_names():
    for base, size in (('ptb', 8_000), ('wikitext-2', 8_000), ('wikitext-103', 32_000)):
        spec = data.LM_CORPORA[f'{base}-bpe']
        assert spec['bpe'] == size and spec['base'] == base and spec['files'] == data.LM_CORPORA[base]['files']


_BUILD = """
import sys, hashlib, data
for n in ('wikitext-2', 'wikitext-2-bpe'):
    data.LM_CORPORA[n] = dict(data.LM_CORPORA[n], checksums=(None,) * 3)
c = data.lm_corpus('wikitext-2-bpe', bpe_vocab=120, data_dir=sys.argv[1], cache_dir=sys.argv[2])
print(c.bpe.parent.name, hashlib.sha256(c.bpe.read_bytes() + c.train.tobytes() + c.test.tobytes()).hexdigest())
"""


def test_bpe_is_deterministic_across_processes(tmp_path, monkeypatch):
    """tokenizers' BpeTrainer breaks ties by symbol ids; ids given in hash-map order (a suffix like '</w>')
    differ between processes (huggingface/tokenizers#1794). Two fresh processes must agree to the byte."""
    _, kw = _corpus_files(tmp_path, monkeypatch)
    c = lm_corpus('wikitext-2-bpe', bpe_vocab=120, **kw)
    digest = hashlib.sha256(c.bpe.read_bytes() + c.train.tobytes() + c.test.tobytes()).hexdigest()
    for k in range(2):
        out = subprocess.run([sys.executable, '-c', _BUILD, str(kw['data_dir']), str(tmp_path / f'cache{k}')],
                             capture_output=True, text=True, check=True, cwd=data.__file__.rsplit('/', 1)[0])
        assert out.stdout.split() == [c.bpe.parent.name, digest]
    again = lm_corpus('wikitext-2-bpe', bpe_vocab=120, data_dir=kw['data_dir'], cache_dir=tmp_path / 'cache9')
    assert again.vocab == c.vocab and (again.counts == c.counts).all()
    assert all(np.array_equal(getattr(again, s), getattr(c, s)) for s in SPLITS)


def test_bpe_cache_is_reused_and_follows_text_and_model(tmp_path, monkeypatch, capsys):
    d, kw = _corpus_files(tmp_path, monkeypatch)
    good = lm_corpus('wikitext-2-bpe', bpe_vocab=120, **kw)
    out = good.bpe.parent
    assert {'tokenizer.json', 'meta.json', 'vocab.txt'} <= set(json.loads((out / 'manifest.json').read_text()))
    builds, real = [], data._build_bpe
    monkeypatch.setattr(data, '_build_bpe', lambda *a, **k: builds.append(1) or real(*a, **k))
    again = lm_corpus('wikitext-2-bpe', bpe_vocab=120, **kw)  # from the cache
    assert builds == [] and again.vocab == good.vocab and again.words_per_split == good.words_per_split
    # a damaged or swapped BPE model: one log line, rebuilt, the same result
    (out / 'tokenizer.json').write_text((out / 'tokenizer.json').read_text().replace('Valk', 'Walk'))
    capsys.readouterr()
    again = lm_corpus('wikitext-2-bpe', bpe_vocab=120, **kw)
    assert builds == [1] and 'tokenizer.json' in capsys.readouterr().err
    assert again.vocab == good.vocab and np.array_equal(again.train, good.train)
    # another training text: another entry, another BPE
    (d / 'train.txt').write_text(_TEXTS['train'] + ' Valkyria Valkyria Valkyria Valkyria Valkyria\n' * 20)
    new = lm_corpus('wikitext-2-bpe', bpe_vocab=120, **kw)
    assert builds == [1, 1] and new.bpe.parent != out
    assert '▁Valkyria' in new.vocab and new.vocab != good.vocab
    assert new.words_per_split['train'] == good.words_per_split['train'] + 20 * 6
    # another vocabulary size: another entry as well
    assert lm_corpus('wikitext-2-bpe', bpe_vocab=100, **kw).bpe.parent not in (out, new.bpe.parent)
    assert not list((tmp_path / 'cache' / 'wikitext-2-bpe').glob('.*'))  # nothing left aside


def test_train_accepts_bpe_datasets():
    import train
    for name in ('wikitext-2-bpe', 'wikitext-103-bpe', 'ptb-bpe'):
        cfg = train.get_config(['--model', 'txl', '--dataset', name, '--device', 'cpu'])
        assert cfg['dataset'] == name


def test_real_wikitext2_bpe(data_root, tmp_path):
    if not (data_root / 'wikitext-2').is_dir():
        pytest.skip(f'no wikitext-2 in {data_root}')
    c = lm_corpus('wikitext-2-bpe', data_dir=data_root, cache_dir=tmp_path)
    word = lm_corpus('wikitext-2', data_dir=data_root, cache_dir=tmp_path)
    assert c.words_per_split == dict(train=2_088_628, valid=217_646, test=245_569)
    assert len(c.vocab) == 8_000
    _check_bpe(c, word)
    for split in ('valid', 'test'):  # a closed vocabulary: the very same words
        assert c.decode(getattr(c, split)) == word.decode(getattr(word, split))
