"""Evaluation of a trained or training model: its mean NLL over a split (perplexity is the
exp), the final validation and test report (translation: BLEU of beam search), Transformer-XL's
evaluation lengths, and DeFINE's inference cache switched in. train.py, sample.py and
figures.py all evaluate through these functions, so their numbers agree.

Batches are (x, y, n_targets) on the host, as data.lm_eval_batches and
data.translation_eval_batches give them; env is train.setup's (device, autocast, log, metrics).
"""
import math
import time
from contextlib import contextmanager

import torch

import data as D
from define import TokenIO, to_device


@torch.no_grad()
def nll(model, batches, env):
    """Mean loss per target (in eval mode: the NLL) over (x, y, n_targets) batches, the state
    carried from one batch to the next."""
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    for x, y, n in batches:
        with env.ctx:   # from page-locked memory: no wait for the GPU
            loss, state = model(to_device(x, env.device), to_device(y, env.device), state)
        total, count = total + loss.float() * n, count + n
    model.train(was_training)
    return (total / max(count, 1)).item()


@contextmanager
def eval_lengths(model, cfg):
    """Transformer-XL's evaluation memory (mem_len, clamp_len, same_length), then back."""
    saved = {k: getattr(model, k) for k in ('mem_len', 'clamp_len', 'same_length') if hasattr(model, k)}
    for k, v in saved.items():
        setattr(model, k, v if cfg['eval_' + k] is None else cfg['eval_' + k])
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(model, k, v)


def final(cfg, env, model, corpus, eval_batches, step):
    """Validation and test perplexity (translation: and the BLEU of beam search), logged."""
    res, t0 = {}, time.time()
    with eval_lengths(model, cfg):
        for split in ('valid', 'test'):
            nll_ = nll(model, eval_batches(split), env)
            res[f'{split}_ppl'] = math.exp(nll_)
            if getattr(corpus, 'bpe', None):    # per word, comparable with the word-level corpora
                res[f'{split}_word_ppl'] = math.exp(
                    nll_ * len(getattr(corpus, split)) / corpus.words_per_split[split])
            if cfg['model'] == 'nmt':
                res[f'{split}_bleu'] = bleu(cfg, env, model, corpus, split)
    env.log('final | ' + ' | '.join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in res.items())
            + f' | {time.time() - t0:.1f} s')
    if cfg['eval_max_tokens']:   # a quick run's numbers must not pass for the splits' own
        env.log(f"note: scored on the first {cfg['eval_max_tokens']:,} tokens of each split "
                f"(--eval-max-tokens), not on the whole splits")
    env.metrics(step=step, final=True, **res)
    return res


def bleu(cfg, env, model, corpus, split):
    import nmt
    (src, _), refs = corpus.head(split, cfg['eval_max_tokens'])
    model.eval()
    with env.ctx:
        hyps = model.translate(src, cfg['beam'], cfg['lenpen'], cfg['max_len_b'])
    score, sig = nmt.bleu([D.detokenize(h, corpus.tgt_vocab) for h in hyps], refs,
                          tokenize=cfg['bleu_tokenize'])
    env.log(f"BLEU {split} {score:.2f} on {len(refs)} sentences (sacreBLEU {sig}; against the "
            f"{cfg['corpus_variant']} reference files as written)")
    return score


def use_embed_cache(model, log):
    """DeFINE's inference cache: every TokenIO's input path becomes one (V, d) table."""
    model.eval()
    for io in {id(m): m for m in model.modules() if isinstance(m, TokenIO)}.values():
        info = io.cache()
        log(f"embedding cache: {info['rows']} x {info['width']} table ({info['bytes'] / 2**20:.1f} "
            f"MiB) replaces {info['input_path_params']} input-path parameters")
