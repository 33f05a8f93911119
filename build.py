"""From settings to the objects of a run: the model (each model's constructor, the TokenIO of
--embed), a trained model from its checkpoint, and the corpus with its training and evaluation
batches. train.py, sample.py, figures.py and bench.py all build through here, so a setting
means the same thing everywhere. `cfg` is a settings dict (train.DEFAULTS' keys); `env` is
train.setup's (rank, world, device, log).
"""
import sys

import checkpoint
import data as D
import evaluation as E
from define import TokenIO, count_params


# ------------------------------------------------------------------------------ the model

def token_io(cfg, vocab_size, d_model, d_hidden=None, init_std=None, output=True, words=None):
    """The TokenIO of the settings' --embed for one vocabulary, d_model wide."""
    e = cfg['embed']
    # Transformers scale a table lookup by sqrt(d) (its rows start with std ~ d^-1/2 or 0.02);
    # a DeFINE unit ends in a Reduce of LayerNorm-ed features, already O(1): scaling it too
    # made it ~16x the position signal and broke bf16 training of the translation model
    scale = d_model ** 0.5 if cfg['model'] in ('txl', 'nmt') and e not in ('define', 'cnn') else 1.0
    scale = scale if cfg['embed_scale'] is None else cfg['embed_scale']
    kw = dict(cutoffs=cfg['cutoffs'], d_hidden=d_hidden, init_std=init_std, embed_scale=scale,
              factor=None if e == 'standard' else cfg['factor'], output=output)
    kw.update(tied=cfg['tied'], out_factor=cfg['out_factor'])   # untied outputs (define.TokenIO)
    if e == 'define':
        kw.update(n=cfg['n'], k=cfg['k'], m=cfg['m'] or d_model, depth=cfg['depth'],
                  g_max=cfg['g_max'], variant=cfg['variant'],
                  unit_dropout=cfg['unit_dropout'], map_dropout=cfg['map_dropout'],
                  unit_norm=cfg['unit_norm'], dedup=cfg['dedup'])
    elif e != 'standard':
        kw.update(n=cfg['n'], words=words)
    return TokenIO(e, vocab_size, d_model, **kw)


def model(cfg, vocab, words=None):
    """The model the settings describe. vocab: an int, or (src, tgt) sizes for translation;
    words: the vocabulary's strings (the character CNN reads them)."""
    if cfg['embed'] == 'cnn' and (cfg['model'] == 'nmt' or words is None):
        sys.exit("error: --embed cnn needs a language model and its corpus's words (they are "
                 "read when training and stored in its checkpoints)")
    if cfg['model'] == 'lstm':
        from lstm_lm import AWDLSTM
        d = cfg['d_model'] or cfg['n']
        n = d if cfg['embed'] == 'standard' or cfg['n'] is None else cfg['n']
        # the last LSTM layer is as wide as the tied table: n for DeFINE, d otherwise
        io = token_io(cfg, vocab, d, d_hidden=n if cfg['embed'] == 'define' else d, words=words)
        return AWDLSTM(io, cfg['lstm_hidden'], cfg['lstm_layers'], cfg['dropout'],
                       cfg['dropouth'], cfg['dropouti'], cfg['dropoute'], cfg['wdrop'],
                       cfg['alpha'], cfg['beta'], cfg['rnn_fp32'])
    if cfg['model'] == 'txl':
        from txl_lm import TransformerXL
        io = token_io(cfg, vocab, cfg['d_model'], init_std=0.02, words=words)   # published init
        return TransformerXL(io, cfg['n_layer'], cfg['n_head'], cfg['d_head'], cfg['d_inner'],
                             cfg['dropout'], cfg['dropatt'], cfg['mem_len'], cfg['clamp_len'],
                             cfg['same_length'], cfg['pre_norm'])
    from nmt import Transformer
    src_v, tgt_v = vocab
    if cfg['share_embed'] and src_v != tgt_v:
        sys.exit("error: --share-embed needs one vocabulary: add --joint-vocab True")
    if cfg['enc_layers'] != cfg['dec_layers']:
        sys.exit("error: enc_layers and dec_layers must be equal in this implementation")
    tgt_io = token_io(cfg, tgt_v, cfg['d_model'])
    src_io = tgt_io if cfg['share_embed'] else token_io(cfg, src_v, cfg['d_model'], output=False)
    return Transformer(src_io, tgt_io, cfg['enc_layers'], cfg['n_head'], cfg['d_ff'],
                       cfg['dropout'], cfg['dropatt'], pre_norm=cfg['pre_norm'],
                       label_smoothing=cfg['label_smoothing'])


def print_params(model, log=print):
    c = count_params(model)
    log(f"params define={c['define']} context={c['context']} io={c['io']} total={c['total']}")
    for name, key in [('DeFINE unit', 'define'), ('context', 'context'), ('input-output', 'io'),
                      ('total', 'total')]:
        log(f"  {name:<14}{c[key] / 1e6:>9.2f}M")
    return c


def trained(ck, cfg, env):
    """The model of checkpoint ck (ckpt.pt or best.pt; cfg: its settings) on env.device, in
    eval mode, with DeFINE's cached table if cfg['embed_cache']. A ckpt.pt written after
    NT-ASGD began gives the averaged weights (best.pt holds them already)."""
    net = model(cfg, cfg['vocab_size'], ck.get('words'))
    checkpoint.load_model_state(net, ck, cfg)
    mean = (ck.get('averager') or {}).get('avg')
    if mean:   # NT-ASGD had begun: the run evaluated the running mean, so this is the model
        for p, m in zip(net.parameters(), mean):
            p.data.copy_(m)
        env.log("weights: NT-ASGD's running mean, as the run evaluated them")
    net.to(env.device).eval()
    if cfg['embed_cache']:
        E.use_embed_cache(net, env.log)
    return net


# ------------------------------------------------------------------------------ data

def corpus(cfg):   # data.LMCorpus, or data.ParallelCorpus for translation
    if cfg['model'] == 'nmt':
        return D.parallel_corpus(cfg['dataset'], cfg['src_lang'], cfg['tgt_lang'],
                                 joint_vocab=cfg['joint_vocab'] or cfg['share_embed'],
                                 max_vocab=cfg['max_vocab'], variant=cfg['corpus_variant'],
                                 data_dir=cfg['data_dir'], cache_dir=cfg['cache_dir'])
    return D.lm_corpus(cfg['dataset'], data_dir=cfg['data_dir'], cache_dir=cfg['cache_dir'])


def data(cfg, env, accum=1):
    """-> the corpus, its vocabulary size (translation: source and target), the training
    steps (data.LMBatches or TranslationBatches), and eval(split) -> batches (x, y,
    n_targets) of 'valid' or 'test'."""
    c = corpus(cfg)
    if cfg['model'] == 'nmt':
        batches = D.TranslationBatches(c.splits['train'], cfg['max_tokens'], accum,
                                       cfg['seed'], env.rank, env.world, bucket=cfg['bucket'] or 0)
        return c, (len(c.src_vocab), len(c.tgt_vocab)), batches, \
            lambda split: D.translation_eval_batches(c.head(split, cfg['eval_max_tokens'])[0],
                                                     cfg['max_tokens'])
    train = D.batchify(c.train, cfg['batch_size'], env.rank, env.world)    # (T, B/ranks)
    if env.device.type == 'cuda':   # page-locked: copies of its slices to the GPU run async
        train = train.pin_memory()
    batches = D.LMBatches(train, cfg['bptt'], accum, cfg['variable_bptt'], cfg['seed'])
    size = dict(valid=cfg['eval_batch_size'], test=cfg['test_batch_size'])
    return c, len(c.vocab), batches, lambda split: D.lm_eval_batches(
        getattr(c, split), size[split], cfg['eval_tgt_len'] or cfg['bptt'], cfg['eval_max_tokens'])
