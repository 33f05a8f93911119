"""Use a trained model: sample text from a language model, score a text file under it, or
translate with a translation model. The checkpoint is one written by train.py (ckpt.pt or
best.pt, or the run folder: folder/ckpt.pt) and brings its own settings.

    python sample.py --resume out/ --start "the meaning of" --num-samples 2 --max-new-tokens 50
    python sample.py --resume out/best.pt --eval-file my_text.txt      # perplexity, OOV rate
    python sample.py --resume out/ --translate < sentences.en > sentences.de
    python sample.py --resume out/ --translate --keep-tokenized < raw/test_2016_flickr.en > hyp.tok
    python sample.py --resume out/ --export-table vectors.txt   # every word's input vector

Text goes to stdout, everything else to stderr. The model is built, loaded and evaluated as
train.py does it (build.py, evaluation.py); --embed-cache swaps DeFINE's input path for its cached table (the
same outputs). Translation reads raw text: it is tokenized as the training corpus was (Moses,
escaped, lowercased for Multi30k's tok files) and the output detokenized, unless
--keep-tokenized (the form of the tok reference files, for sacreBLEU with --tokenize none).
--export-table writes the vector the model's first layer receives for every vocabulary entry
(for DeFINE its cached table, the V x m lookup that replaces the unit after training) in
word2vec's text format, which gensim and most embedding tools read.
"""
import argparse
import os
import re
import sys
from itertools import islice

import numpy as np
import torch

import build
import checkpoint
import data as D
import evaluation as E
import settings
import train


def get_args(argv):
    ap = argparse.ArgumentParser(prog='sample.py', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a('--resume', required=True, help='a checkpoint written by train.py, or its run folder')
    a('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    a('--seed', type=int, default=1337)
    a('--embed-cache', action='store_true', help="DeFINE's input path replaced by its cached table")
    a('--data-dir', help="the corpus, for a checkpoint without vocabulary (default: its own)")
    a('--cache-dir', help="data.py's cache of tokenized corpora (default: the checkpoint's)")
    a('--start', default='', help='sampling: the prompt, words separated by spaces')
    a('--num-samples', type=int, default=1)
    a('--max-new-tokens', type=int, default=50)
    a('--temperature', type=float, default=0.8, help='0: always the most likely word')
    a('--top-k', type=int, default=200, help='sample among the k most likely words (0: all)')
    a('--eval-file', help="LMs: the perplexity of this text file's words ('<eos>' per line)")
    a('--translate', action='store_true', help='translation models: stdin -> stdout, line by line')
    a('--keep-tokenized', action='store_true', help='print translations tokenized and escaped')
    a('--batch-lines', type=int, default=16, help='lines translated together (1 at a terminal)')
    a('--verbose', action='store_true', help='unknown words per line')
    a('--export-table', metavar='FILE', help="write every word's input vector (translation: the "
                                            "source side's) to FILE, word2vec's text format")
    args = ap.parse_args(argv)
    for key in ('num_samples', 'batch_lines'):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        ap.error('--max-new-tokens, --temperature and --top-k cannot be negative')
    if args.export_table and (args.translate or args.eval_file):
        ap.error('--export-table is a task of its own: run it without --translate or --eval-file')
    return args


def load(args, log):
    path = checkpoint.file(args.resume)
    ck = checkpoint.load(path)      # one error line if missing or unreadable
    cfg = train.checkpoint_config(ck, device=args.device, resume=str(path),
                                  embed_cache=args.embed_cache, compile=False)   # runs eager
    env = train.setup(cfg)                # device and autocast
    env.log = log                         # stdout holds the text alone
    steps = ck.get('train', {}).get('step', '?')
    log(f"{path}: {cfg['model']}, {cfg['embed']} embeddings, step {steps}")
    model = build.trained(ck, cfg, env)
    return ck, cfg, env, model


def vocabulary(ck, cfg, args, log):
    """-> (vocab, bpe). LMs: id -> word (a BPE model's: subword) and, for a BPE corpus, its
    tokenizer's JSON; translation: dict(src=[...], tgt=[...]) and None."""
    key = 'vocab' if cfg['model'] == 'nmt' else 'words'
    bpe = cfg['model'] != 'nmt' and 'bpe' in D.LM_CORPORA[cfg['dataset']]
    if ck.get(key) is not None and (not bpe or ck.get('bpe')):
        return ck[key], ck.get('bpe')
    # older LM checkpoints hold none, nor does a translation model's best.pt: rebuild it as
    # training built it (ids sorted by training counts)
    c = build.corpus(dict(cfg, data_dir=args.data_dir or cfg['data_dir'],
                               cache_dir=args.cache_dir or cfg['cache_dir']))
    if cfg['model'] == 'nmt':
        vocab, want = dict(src=c.src_vocab, tgt=c.tgt_vocab), list(cfg['vocab_size'])
    else:
        vocab, want = c.vocab, [cfg['vocab_size']]
    size = [len(v) for v in vocab.values()] if cfg['model'] == 'nmt' else [len(vocab)]
    if size != want:
        sys.exit(f"error: the {cfg['dataset']} corpus found has vocabularies of {size} words, "
                 f"the model {want}; point --data-dir at the copy it was trained on")
    log(f"vocabulary: {' + '.join(f'{n:,}' for n in size)} {'sub' * bpe}words rebuilt from the "
        f"{cfg['dataset']} training split (the checkpoint holds none)")
    return vocab, c.bpe.read_text(encoding='utf-8') if bpe else None


def to_ids(words, stoi):   # words -> ids and how many were unknown (mapped to <unk>)
    unk = stoi.get('<unk>')
    unknown = sum(w not in stoi for w in words)
    if unknown and unk is None:
        sys.exit("error: the vocabulary has no '<unk>' for words it does not know: "
                 + ', '.join(w for w in words if w not in stoi)[:200])
    return [stoi.get(w, unk) for w in words], unknown


def codec(vocab, bpe):
    """A language model's -> encode(words) -> (ids, unknown words), decode(ids) -> words: through
    the vocabulary, or for a BPE model through its subwords (each word spelt as its corpus's)."""
    stoi = {w: i for i, w in enumerate(vocab)}
    if bpe is None:
        return (lambda words: to_ids(words, stoi)), (lambda ids: [vocab[i] for i in ids])
    spell, unk = D.bpe_encoder(bpe, vocab), stoi['<unk>']

    def encode(words):
        pieces = spell(words)
        return ([i for p in pieces for i in p],
                sum(p == [unk] and w != '<unk>' for w, p in zip(words, pieces)))
    return encode, lambda ids: D.bpe_words([vocab[i] for i in ids])


def step(model, x, state):
    """x (T, B) ids -> log-probs of the next word (B, V) and the carried state: the AWD-LSTM's
    (h, c) per layer, or Transformer-XL's memory (its last mem_len positions per layer)."""
    h, state = model(x, None, state)      # no targets: the hidden states (T, B, d)
    return model.io.log_probs(h[-1]), state


@torch.no_grad()
def sample(model, cfg, env, prompt, args):
    """prompt ids -> num_samples lists of ids (prompt included), the columns of one batch."""
    x = torch.tensor(prompt, device=env.device)[:, None].repeat(1, args.num_samples)   # (T, B)
    out, state = [x], None
    with env.ctx, E.eval_lengths(model, cfg):
        for _ in range(args.max_new_tokens):    # the prompt once, then one word at a time
            lp, state = step(model, x, state)
            if args.temperature == 0:
                nxt = lp.argmax(-1)
            else:
                lp = lp / args.temperature
                if args.top_k:
                    kth = lp.topk(min(args.top_k, lp.size(-1))).values[:, -1:]
                    lp = lp.masked_fill(lp < kth, float('-inf'))
                nxt = torch.multinomial(lp.softmax(-1), 1)[:, 0]
            x = nxt[None]                                # (1, B)
            out.append(x)
    return torch.cat(out).t().tolist()


def score(model, cfg, env, encode, path, log, bpe=False):
    """Perplexity of a file tokenized as the LM corpora are (whitespace, '<eos>' per line), in
    windows carrying the state like train.py's evaluation, with its eval batch size; a BPE
    model's per subword and per word (as train.py reports it)."""
    ids, unknown, words = [], 0, 0
    try:
        with open(path, encoding='utf-8') as f:    # universal newlines, as data.py reads
            for line in f:
                line_ids, n = encode(line.split() + ['<eos>'])
                ids += line_ids
                unknown, words = unknown + n, words + len(line.split()) + 1
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read --eval-file {path}: {e}")
    if len(ids) < 2:
        sys.exit(f"error: {path} holds {len(ids)} tokens; scoring needs at least 2")
    # train.py's eval batch size gives its valid numbers; a file too short to give each stream
    # a window is one stream (all of it in context)
    T = cfg['eval_tgt_len'] or cfg['bptt']
    B = cfg['eval_batch_size'] if len(ids) > cfg['eval_batch_size'] * T else 1
    log(f"scoring {B} stream{'s' * (B > 1)} of {len(ids) // B:,} tokens in windows of {T}")
    batches = D.lm_eval_batches(np.array(ids), B, T)
    with E.eval_lengths(model, cfg):
        nll = E.nll(model, batches, env)
    res = dict(ppl=float(np.exp(nll)), tokens=len(ids), oov=unknown, oov_rate=unknown / words)
    if bpe:       # comparable with a word-level model's: the NLL of the file over its words
        res.update(word_ppl=float(np.exp(nll * len(ids) / words)), words=words)
    print(f"ppl {res['ppl']:.4f} | tokens {len(ids)} | oov {unknown} | oov rate {res['oov_rate']:.6f}"
          + (f" | word ppl {res['word_ppl']:.4f} | words {words}" if bpe else ''))
    return res


def tokenizers(cfg, src_vocab, keep_tokenized=False):
    """-> tokenize(raw line) -> source words as in the training corpus; detokenize(target words)."""
    if cfg['corpus_variant'] == 'raw':      # data.py splits the raw files on whitespace only
        return str.split, lambda s: s
    try:
        from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer
    except ImportError:
        sys.exit("error: translating raw text needs sacremoses: pip install sacremoses")
    norm, tok, detok = (MosesPunctNormalizer(cfg['src_lang']), MosesTokenizer(cfg['src_lang']),
                        MosesDetokenizer(cfg['tgt_lang']))
    # Multi30k's tok files: lowercased, then punctuation-normalised, Moses-tokenized and escaped
    # (&apos; &quot;); in this order all 29,000 training sources come out as in the file
    lower = all(w == w.lower() for w in src_vocab)
    return (lambda s: tok.tokenize(norm.normalize(s.lower() if lower else s), escape=True),
            (lambda s: s) if keep_tokenized else
            lambda s: detok.detokenize(s.split(), unescape=True))


def translate(model, cfg, env, vocab, args, log):
    stoi = {w: i for i, w in enumerate(vocab['src'])}
    tokenize, detokenize = tokenizers(cfg, vocab['src'], args.keep_tokenized)
    # beam search runs up to len(source) + 1 + max_len_b positions (nmt.Transformer._start)
    longest = model.max_len - cfg['max_len_b'] - 2
    lines = iter(sys.stdin.readline, '')    # as they come: each answered before the next is read
    per = 1 if sys.stdin.isatty() else args.batch_lines
    n_line = n_tok = n_unk = 0
    while batch := list(islice(lines, per)):
        sents = []
        for line in batch:
            n_line, words = n_line + 1, tokenize(line.strip())
            if len(words) > longest:
                log(f"warning: line {n_line} has {len(words)} tokens; translating its first "
                    f"{longest}, as many as the model's {model.max_len} positions allow")
                words = words[:longest]
            ids, unknown = to_ids(words, stoi)
            n_tok, n_unk = n_tok + len(words), n_unk + unknown
            if args.verbose and unknown:
                log(f"line {n_line}: {unknown} unknown: "
                    + ' '.join(w for w in words if w not in stoi))
            sents.append(ids)
        todo = [i for i, s in enumerate(sents) if s]   # an empty line stays empty
        with env.ctx:
            hyps = model.translate([sents[i] for i in todo], cfg['beam'], cfg['lenpen'],
                                   cfg['max_len_b'])
        out = [''] * len(sents)
        for i, h in zip(todo, hyps):
            out[i] = detokenize(D.detokenize(h, vocab['tgt']))
        print('\n'.join(out), flush=True)
    log(f"{n_line} lines; {n_unk} of {n_tok} source tokens unknown (translated as <unk>)")


@torch.no_grad()
def export_table(model, cfg, vocab, path, log):
    """The input path's output for every vocabulary entry, as io.cache() computes it (eval mode,
    the embedding scale included), in word2vec's text format: a line 'V d', then a line
    'word v1 ... vd' per entry, in id order. Written whole or not at all."""
    io, words = (model.src_io, vocab['src']) if cfg['model'] == 'nmt' else (model.io, vocab)
    if io.cached is None:
        io.cache()
    table = io.cached.cpu().numpy()                  # (V, d) float32
    if any(not w or any(c.isspace() for c in w) for w in words):
        sys.exit("error: a vocabulary entry is empty or holds white space; word2vec's text "
                 "format cannot hold it")
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(f'{table.shape[0]} {table.shape[1]}\n')
            for w, row in zip(words, table):
                f.write(w + ' ' + ' '.join(f'{v:.6g}' for v in row) + '\n')
        os.replace(tmp, path)
    except OSError as e:
        sys.exit(f"error: cannot write --export-table {path}: {e}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"wrote {path}: {table.shape[0]:,} vectors of {table.shape[1]} "
        f"({cfg['embed']} input{', the source side' if cfg['model'] == 'nmt' else ''})")
    return table


def main(argv=None):
    args = get_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    ck, cfg, env, model = load(args, log)
    torch.manual_seed(args.seed)
    if args.export_table:
        return export_table(model, cfg, vocabulary(ck, cfg, args, log)[0], args.export_table, log)
    if (cfg['model'] == 'nmt') != args.translate:
        kind = dict(lstm='an AWD-LSTM', txl='a Transformer-XL', nmt='a translation')[cfg['model']]
        sys.exit(f"error: {cfg['resume']} holds {kind} model: " + (
            "translate with --translate (sentences on stdin)" if cfg['model'] == 'nmt' else
            "--translate is for translation models; sample, or score with --eval-file"))
    vocab, bpe = vocabulary(ck, cfg, args, log)
    if args.translate:
        return translate(model, cfg, env, vocab, args, log)
    encode, decode = codec(vocab, bpe)
    if args.eval_file:
        return score(model, cfg, env, encode, args.eval_file, log, bpe=bpe is not None)
    # a prompt starts where a line of the corpus starts: after an '<eos>'
    words = args.start.split()
    prompt, unknown = encode(['<eos>'] + words)
    if unknown:
        log(f"{unknown} of {len(words)} prompt words not in the vocabulary: read as <unk>")
    texts = []
    for ids in sample(model, cfg, env, prompt, args):
        text = ' '.join('\n' if w == '<eos>' else w for w in decode(ids)[1:])
        texts.append(re.sub(r' ?\n ?', '\n', text))      # '<eos>' ends a line, as in the corpus
        print(texts[-1], '---------------', sep='\n', flush=True)
    return texts


if __name__ == '__main__':
    settings.run(main, memory_hint=': lower --num-samples or --batch-lines, or use --device cpu')
