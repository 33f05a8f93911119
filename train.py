"""The one entry point: train, evaluate or count any model with any token representation.

    python train.py --model txl --embed define              # small Transformer-XL on WikiText-2
    python train.py --config ptb_awd_lstm --embed define     # a preset from config/
    python train.py --config wt103_txl --embed define --n 128 --count-params
    python train.py --config multi30k_transformer --max-iters 2000
    torchrun --standalone --nproc_per_node=2 train.py --config ptb_awd_lstm   # DDP
    python train.py --model nmt --translate --resume out/ckpt.pt < sentences.txt

Every setting is a key of DEFAULTS below. A preset (config/NAME.py, plain assignments)
overrides them, and `--key value` on the command line overrides both. Without --config the
model's default preset is used (DEFAULT_PRESET). The resolved config is printed at start and
stored in every checkpoint.
"""
import ast
import json
import math
import os
import runpy
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from define import DeFINE, TokenIO, count_params

ROOT = Path(__file__).resolve().parent
DEFAULT_PRESET = dict(lstm='ptb_awd_lstm', txl='wt2_txl', nmt='multi30k_transformer')
DEFAULTS = dict(
    # --- what to run
    model='txl',              # lstm | txl | nmt
    embed='define',           # standard | projective | adaptive | define
    config=None,              # preset in config/ (default: DEFAULT_PRESET[model])
    dataset='wikitext-2',     # ptb | wikitext-2 | wikitext-103 | multi30k | wmt14_en_de
    data_dir=None,            # a local copy of the corpora (DIR/<dataset>/...)
    cache_dir=None,           # downloads and tokenized arrays (default ~/.cache/define)
    out_dir='out',            # checkpoints and metrics.jsonl
    vocab_size=None,          # presets carry it so that --count-params needs no data
    device='auto',            # auto | cpu | cuda
    dtype='bfloat16',         # GPU autocast dtype: bfloat16 | float32 (no autocast); CPU: float32
    compile=False,            # torch.compile the model
    cuda_graphs=True,         # AWD-LSTM's step (one GPU), Transformer-XL's trunk as CUDA graphs
    ddp_hooks=True,           # LMs on several GPUs: reduce gradients during backward (DDP), or
                              # once after it (False; always so with the Transformer-XL graphs)
    seed=1111,
    # --- token representation (define.TokenIO)
    d_model=410,              # model width (LSTM: embedding width m; None = n)
    n=None,                   # map width (None = d_model)
    k=1024, m=None, depth=3, g_max=4,   # DeFINE: expand width, output width, depth, groups
    variant='define',         # DeFINE ablation, see define.VARIANTS
    cutoffs=[],               # adaptive input / softmax band edges
    factor=None,              # band width divisor (None: 4 for adaptive, else 1)
    unit_dropout=0.0,         # dropout inside the DeFINE unit
    unit_norm=True,           # LayerNorm in each unit layer (the LSTM presets turn it off)
    unit_lr=1.0,              # the DeFINE unit's learning rate, as a multiple of lr
    dedup=True,               # run DeFINE once per distinct token of a batch
    # --- language-model batching
    batch_size=20,            # streams (columns) in a global batch
    micro_batch=None,         # streams per rank per micro-step (None: batch_size / ranks)
    bptt=70,                  # tokens per stream per step (TXL: tgt_len)
    variable_bptt=False,      # AWD-LSTM's random sequence lengths
    eval_batch_size=10, test_batch_size=1,
    # --- AWD-LSTM
    lstm_hidden=1150, lstm_layers=3,
    dropout=0.4, dropouth=0.25, dropouti=0.4, dropoute=0.1, wdrop=0.5,
    alpha=2.0, beta=1.0,      # activation and temporal activation regularisation
    rnn_fp32=False,           # keep the LSTM recurrence in float32 under bf16 autocast
    asgd=False, nonmono=5,    # NT-ASGD: average once validation stalls for nonmono evals
    # --- Transformer-XL
    n_layer=16, n_head=10, d_head=41, d_inner=2100, dropatt=0.0,
    mem_len=150, clamp_len=-1, same_length=False,
    pre_norm=False, attn_impl='math',   # also the translation model's (math | sdpa)
    eval_tgt_len=None, eval_mem_len=None, eval_clamp_len=None, eval_same_length=None,
    # --- translation
    src_lang='en', tgt_lang='de', joint_vocab=False, max_vocab=None, corpus_variant='tok',
    share_embed=False,        # one table for source, target and output (needs joint_vocab)
    enc_layers=6, dec_layers=6, d_ff=2048, label_smoothing=0.1,
    max_tokens=4096,          # tokens per rank per micro-batch
    batch_tokens=None,        # tokens per optimizer step (None: max_tokens x ranks)
    beam=4, lenpen=0.6, max_len_b=50, bleu_tokenize='none', avg_last=0,
    translate=False,          # read sentences on stdin, print translations
    # --- optimisation
    optimizer='sgd',          # sgd | adam
    lr=30.0, weight_decay=1.2e-6, beta1=0.9, beta2=0.999, grad_clip=0.25,
    schedule='constant',      # constant | cosine | step | noam
    warmup=0, min_lr=0.0, lr_decay=0.1, lr_decay_epochs=[],
    max_epochs=None, max_iters=None,   # stop at whichever comes first
    # --- logging, evaluation, checkpoints
    log_interval=50, eval_interval=None,   # steps (None: evaluate once per epoch)
    eval_max_tokens=None,     # cap tokens per validation pass (None: the whole split)
    eval_only=False, resume=None, count_params=False,
    save=True,                # checkpoints (metrics.jsonl is always written)
    embed_cache=False,        # --eval-only: replace the input path by its lookup table first
)


# ------------------------------------------------------------------------------ config

def get_config(argv):
    """DEFAULTS <- preset <- command line: `--key value`, `--key=value`, `--flag`, or `key=value`
    (under torchrun, whose own options swallow abbreviations like --n and --m, use n=128)."""
    args, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith('--') and '=' not in a:
            sys.exit(f"error: unexpected argument {a!r}; settings are given as --key value")
        key, _, val = a.lstrip('-').partition('=')
        key = key.replace('-', '_')
        if key not in DEFAULTS:
            sys.exit(f"error: unknown setting --{key.replace('_', '-')}; the settings are the keys "
                     f"of DEFAULTS in train.py")
        nxt = argv[i + 1] if i + 1 < len(argv) else '--'
        if not _ and (nxt.startswith('--') or nxt.partition('=')[0].replace('-', '_') in DEFAULTS):
            val = 'True'                             # a bare flag (next: a setting of its own)
        elif not _:
            val, i = argv[i + 1], i + 1
        args[key] = val
        i += 1
    cfg = dict(DEFAULTS)
    model = args.get('model', DEFAULTS['model'])
    preset = args.get('config') or DEFAULT_PRESET.get(model)
    if preset:
        path = ROOT / 'config' / f'{preset}.py'
        if not path.exists():
            known = sorted(p.stem for p in (ROOT / 'config').glob('*.py'))
            sys.exit(f"error: no preset {preset!r}; choose one of {known}")
        for key, val in runpy.run_path(str(path)).items():
            if not key.startswith('_'):
                if key not in DEFAULTS:
                    sys.exit(f"error: preset {path.name} sets unknown key {key!r}")
                cfg[key] = val
        cfg['config'] = preset
    for key, val in args.items():
        cfg[key] = _parse(val, DEFAULTS[key])
    for key, choices in [('model', ('lstm', 'txl', 'nmt')),
                         ('embed', ('standard', 'projective', 'adaptive', 'define')),
                         ('optimizer', ('sgd', 'adam')),
                         ('schedule', ('constant', 'cosine', 'step', 'noam'))]:
        if cfg[key] not in choices:
            sys.exit(f"error: --{key} {cfg[key]!r} unknown; choose one of {choices}")
    import data as D
    known = D.PARALLEL_CORPORA if cfg['model'] == 'nmt' else D.LM_CORPORA
    if cfg['dataset'] not in known:
        sys.exit(f"error: --dataset {cfg['dataset']!r} unknown for --model {cfg['model']}; "
                 f"choose one of {sorted(known)}")
    return cfg


def _parse(text, default):
    if isinstance(default, str):
        return text
    if isinstance(default, bool):       # 'false' must not turn a switch on
        low = text.lower()
        if low not in ('true', 'false', '1', '0', 'yes', 'no'):
            sys.exit(f"error: {text!r} is not a switch value; use True or False")
        return low in ('true', '1', 'yes')
    try:
        return ast.literal_eval(text)     # numbers, True/False/None, lists
    except (ValueError, SyntaxError):
        return text


# ------------------------------------------------------------------------------ building

def build_io(cfg, vocab_size, d_model, d_hidden=None, init_std=None):
    e = cfg['embed']
    # Transformers scale a table lookup by sqrt(d) (its rows start with std ~ d^-1/2 or 0.02);
    # a DeFINE unit ends in a Reduce of LayerNorm-ed features, already O(1): scaling it too
    # made it ~16x the position signal and broke bf16 training of the translation model
    scale = d_model ** 0.5 if cfg['model'] in ('txl', 'nmt') and e != 'define' else 1.0
    kw = dict(cutoffs=cfg['cutoffs'], d_hidden=d_hidden, init_std=init_std, embed_scale=scale,
              factor=None if e == 'standard' else cfg['factor'])
    if e == 'define':
        kw.update(n=cfg['n'], k=cfg['k'], m=cfg['m'] or d_model, depth=cfg['depth'],
                  g_max=cfg['g_max'], variant=cfg['variant'],
                  unit_dropout=cfg['unit_dropout'], unit_norm=cfg['unit_norm'], dedup=cfg['dedup'])
    elif e != 'standard':
        kw.update(n=cfg['n'])
    return TokenIO(e, vocab_size, d_model, **kw)


def build_model(cfg, vocab):
    """vocab: an int, or (src, tgt) sizes for translation."""
    if cfg['model'] == 'lstm':
        from lstm_lm import AWDLSTM
        d = cfg['d_model'] or cfg['n']
        n = d if cfg['embed'] == 'standard' or cfg['n'] is None else cfg['n']
        # the last LSTM layer is as wide as the tied table: n for DeFINE, d otherwise
        io = build_io(cfg, vocab, d, d_hidden=n if cfg['embed'] == 'define' else d)
        return AWDLSTM(io, cfg['lstm_hidden'], cfg['lstm_layers'], cfg['dropout'],
                       cfg['dropouth'], cfg['dropouti'], cfg['dropoute'], cfg['wdrop'],
                       cfg['alpha'], cfg['beta'], cfg['rnn_fp32'])
    if cfg['model'] == 'txl':
        from txl_lm import TransformerXL
        io = build_io(cfg, vocab, cfg['d_model'], init_std=0.02)   # the published init
        return TransformerXL(io, cfg['n_layer'], cfg['n_head'], cfg['d_head'], cfg['d_inner'],
                             cfg['dropout'], cfg['dropatt'], cfg['mem_len'], cfg['clamp_len'],
                             cfg['same_length'], cfg['pre_norm'], cfg['attn_impl'])
    from nmt import Transformer
    src_v, tgt_v = vocab
    tgt_io = build_io(cfg, tgt_v, cfg['d_model'])
    if cfg['share_embed']:
        if src_v != tgt_v:
            sys.exit("error: --share-embed needs one vocabulary: add --joint-vocab True")
        src_io = tgt_io
    else:
        src_io = build_io(cfg, src_v, cfg['d_model'])
    if cfg['enc_layers'] != cfg['dec_layers']:
        sys.exit("error: enc_layers and dec_layers must be equal in this implementation")
    return Transformer(src_io, tgt_io, cfg['enc_layers'], cfg['n_head'], cfg['d_ff'],
                       cfg['dropout'], cfg['dropatt'], pre_norm=cfg['pre_norm'],
                       attn_impl=cfg['attn_impl'])


def print_params(model, out=print):
    c = count_params(model)
    out(f"params define={c['define']} context={c['context']} io={c['io']} total={c['total']}")
    out(f"  {'DeFINE unit':<14}{c['define'] / 1e6:>9.2f}M\n  {'context':<14}{c['context'] / 1e6:>9.2f}M"
        f"\n  {'input-output':<14}{c['io'] / 1e6:>9.2f}M\n  {'total':<14}{c['total'] / 1e6:>9.2f}M")
    return c


def make_optimizer(cfg, model, fused):
    # two groups: the DeFINE units' parameters run at unit_lr x the learning rate (lr_scale;
    # the training loops set each group's lr to the schedule's value times its scale)
    unit = {id(p) for m in model.modules() if isinstance(m, DeFINE) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if id(p) not in unit], lr_scale=1.0),
              dict(params=[p for p in params if id(p) in unit], lr_scale=cfg['unit_lr'])]
    groups = [g for g in groups if g['params']]
    if cfg['optimizer'] == 'sgd':
        opt = torch.optim.SGD(groups, lr=cfg['lr'], weight_decay=cfg['weight_decay'])
    else:
        opt = torch.optim.AdamW(groups, lr=cfg['lr'], betas=(cfg['beta1'], cfg['beta2']),
                                weight_decay=cfg['weight_decay'], fused=fused)
    set_lr(opt, cfg['lr'])
    return opt


def set_lr(opt, lr):
    for g in opt.param_groups:
        g['lr'] = lr * g.get('lr_scale', 1.0)


def lr_at(cfg, step, epoch):
    """Learning rate at optimizer step `step` (0-based) in epoch `epoch` (0-based)."""
    lr, warm = cfg['lr'], cfg['warmup']
    if cfg['schedule'] == 'noam':   # lr * d^-1/2 * min(s^-1/2, s warmup^-3/2) (Vaswani et al.)
        s = step + 1
        return lr * cfg['d_model'] ** -0.5 * min(s ** -0.5, s * max(warm, 1) ** -1.5)
    if step < warm:
        return lr * (step + 1) / warm
    if cfg['schedule'] == 'cosine':
        total = cfg['max_iters'] or 1
        t = min(1.0, (step - warm) / max(1, total - warm))
        return cfg['min_lr'] + 0.5 * (lr - cfg['min_lr']) * (1 + math.cos(math.pi * t))
    if cfg['schedule'] == 'step':
        return lr * cfg['lr_decay'] ** sum(epoch >= e for e in cfg['lr_decay_epochs'])
    return lr


# ------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path, obj):
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        sys.exit(f"error: checkpoint {path} not found")
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or unsafe pickle
        sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                 f"it may be truncated: use an earlier checkpoint or start without --resume")
    if not isinstance(ck, dict) or 'model' not in ck or 'config' not in ck:
        sys.exit(f"error: {path} is not a checkpoint written by train.py (no model/config)")
    return ck


def load_model_state(model, ck, cfg):
    try:
        model.load_state_dict(ck['model'])
    except RuntimeError as e:
        old = ck['config']
        diff = {k: (old.get(k), cfg.get(k)) for k in cfg if k in old and old[k] != cfg[k]
                and k not in ('resume', 'eval_only', 'max_iters', 'out_dir', 'data_dir')}
        sys.exit(f"error: the checkpoint does not fit this model; settings that differ "
                 f"(checkpoint, now): {diff or 'none'}\n{str(e)[:600]}")


# ------------------------------------------------------------------------------ helpers

def to_device(tree, device):
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(t, device) for t in tree)
    return tree


def gather_objects(obj, world):
    """Every rank's `obj` as a list on every rank (for per-rank state in checkpoints)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(x, world):
    if world > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG)
    return x


def reduce_grads(params, world):
    """Data parallelism without DDP's hooks, which cannot fire inside a CUDA-graph replay:
    every rank's gradients, averaged in one all-reduce after the backward (a parameter that
    got no gradient on some rank counts as zeros there). The start must be equal on every
    rank (broadcast_params)."""
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def ddp_hooks(cfg, world, trunk_graphs):
    """Whether several ranks reduce gradients through DDP's hooks during the backward (else
    reduce_grads after it): translation always; language models unless --ddp-hooks False or
    the Transformer-XL trunk replays as CUDA graphs, where hooks cannot fire."""
    return world > 1 and not trunk_graphs and (cfg['ddp_hooks'] or cfg['model'] == 'nmt')


def broadcast_params(model):
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, 0)


def rank0_first(fn, env):
    """Rank 0 downloads and tokenizes while the others wait, then they read its cache."""
    if env['world'] > 1 and not env['master']:
        dist.barrier()
    out = fn()
    if env['world'] > 1 and env['master']:
        dist.barrier()
    return out


def compiled(fn, model, varying=False):
    """torch.compile. Where one of `model`'s weights has a side that is not a multiple of 8
    (the published Transformer-XL is 410 wide: 10 heads of 41, FF 2100; vocabularies rarely
    are), every matmul operand is padded to one: an unaligned bf16 matmul runs at a third of
    the aligned rate, and the pad is a cheap copy inside the graph. Where all are aligned,
    inductor pads only where its timing says so: forced, it pads the token count too, the
    inner size of every weight gradient (a translation batch of 24,050 target tokens), and
    copies the 24k x 50k logits' gradient and each layer's activations for it (Transformer
    base on an H200: 38.8 ms of kernels per step unforced, 45.2 forced)."""
    import torch._inductor.config
    options = {'force_shape_pad': unaligned(model)}
    if varying and hasattr(torch._inductor.config.triton, 'coalesce_tiling_analysis'):
        # shapes that change every step (translation batches) compile dynamic from the
        # second step on, and there the coalescing analysis of torch 2.11's GPU code fails
        # an assertion (tiling_utils.get_pw_red_splits); it is meant for static shapes
        options['triton.coalesce_tiling_analysis'] = False
    _one_pass_rows()
    return torch.compile(fn, options=options)


def unaligned(model):
    """Whether a weight matrix of `model` has a side that is not a multiple of 8."""
    return any(s % 8 for p in model.parameters() if p.dim() >= 2 for s in p.shape[-2:])


def _one_pass_rows():
    """Inductor keeps a reduction's row in registers (one pass over memory) up to 1024
    elements only where it sees the row contiguous, else up to 64. The relative attention
    reads its position term through the shift (pad + reshape), so its softmax over 300 keys
    read the scores in three passes: 2.8 ms per step of the base model, 1.5 ms in one pass.
    Set on the class, so that it holds in autograd's thread too (which compiles backwards)."""
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.virtualized import V
    except ImportError:         # another inductor: its own heuristic, a little slower
        return
    base = InductorChoices.should_use_persistent_reduction
    if getattr(base, 'one_pass_rows', False):
        return

    def rule(features, cooperative_reduction):
        return base(features, cooperative_reduction) or (
            torch._inductor.config.triton.persistent_reductions and not cooperative_reduction
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, 1024))
    rule.one_pass_rows = True
    InductorChoices.should_use_persistent_reduction = staticmethod(rule)


def lm_forward(model, x, y, state, **hints):
    """(loss to minimise, mean NLL, new state) for the LSTM (3 outputs) and TXL (2); hints:
    what lm_hints returned (Transformer-XL only)."""
    out = model(x, y, state, **hints)
    return out if len(out) == 3 else (out[0], out[0], out[1])


def lm_hints(model, x_host, y_host, device):
    """What a Transformer-XL step would otherwise sync the GPU for, taken from host copies of
    its batch (T, B): the adaptive softmax's cluster sizes (io.loss_counts) and DeFINE's
    distinct tokens (io.distinct, copied over without waiting). Keys with None are left out."""
    io = model.io
    hints = dict(counts=io.loss_counts(y_host), distinct=io.distinct(x_host))
    if hints['distinct'] is not None:
        hints['distinct'] = tuple(t.pin_memory().to(device, non_blocking=True)
                                  if device.type == 'cuda' else t for t in hints['distinct'])
    return {k: v for k, v in hints.items() if v is not None}


class LossOf(nn.Module):
    """The translation model's loss as a forward, so that DDP and compile can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src, tgt, label_smoothing=0.0):
        return self.model.loss(src, tgt, label_smoothing=label_smoothing)


class Averager:
    """The averaging of NT-ASGD (Merity et al. 2018): from the switch on, keep the running
    mean of the weights after every step; evaluate and save with the mean."""

    def __init__(self, params):
        self.params, self.avg, self.count = list(params), None, 0

    def start(self):
        self.avg, self.count = [p.detach().clone() for p in self.params], 1

    def update(self):
        if self.avg is not None:
            self.count += 1
            torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1.0 / self.count)

    def swap(self):   # exchange weights and their average (call twice to undo)
        if self.avg is not None:
            for p, a in zip(self.params, self.avg):
                tmp = p.detach().clone()
                p.data.copy_(a)
                a.copy_(tmp)

    def state_dict(self):
        return dict(avg=self.avg, count=self.count)

    def load_state_dict(self, s):
        self.count = s['count']
        self.avg = None if s['avg'] is None else [a.to(p.device) for a, p in zip(s['avg'], self.params)]


def capture_ctx(ctx):
    """The autocast context `ctx` with its weight-cast cache off, as CUDA graph captures
    require (any other context as it is)."""
    if isinstance(ctx, torch.autocast):
        return torch.autocast(ctx.device, dtype=ctx.fast_dtype, cache_enabled=False)
    return ctx


class GraphedLMStep:
    """The stateful LM's forward + backward (+ gradient clipping) as CUDA graphs, one per
    sequence length, captured on first use.

    AWD-LSTM on PTB does 1,400 tokens per step but about 700 small kernels (3 layers x 70
    time steps, forward and backward, plus the regularisers): launching them from Python
    takes longer than running them, and a replay launches them all at once. The graphs share
    one memory pool (about 60 lengths occur; a pool each would reserve ~0.3 GB each), which is
    safe because they never run concurrently and each graph's outputs stay allocated as long
    as the graph does. Inputs, the carried state and the gradients live in static buffers: a
    replay zeroes the gradients and writes them (so the loop must not set them to None), and
    the caller's state is copied in. Dropout masks are drawn inside the graph from the CUDA
    generator, which replays advance as eager steps do; the generator state is restored after
    each capture, so capturing draws nothing. Host syncs cannot be captured: DeFINE runs on
    every token (no torch.unique; the same outputs and gradients)."""

    def __init__(self, model, ctx, clip):
        self.model, self.ctx, self.clip = model, capture_ctx(ctx), clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs, self.state, self.pool = {}, None, torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()   # warm-ups and captures on one side stream
        if getattr(model.io, 'dedup', False):
            model.io.dedup = False

    @staticmethod
    def wanted(cfg, device, world, accum=1):
        """Graphs serve the LSTM on one GPU, one micro-batch per step, not compiled."""
        return (cfg['cuda_graphs'] and cfg['model'] == 'lstm' and device.type == 'cuda'
                and world == 1 and accum == 1 and not cfg['compile'])

    def _fwd_bwd(self, x, y, state):
        torch._foreach_zero_([p.grad for p in self.params])
        with self.ctx:
            loss, nll, new = lm_forward(self.model, x, y, state)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        return nll.detach(), new

    def _capture(self, x, y):
        rng = torch.cuda.get_rng_state()
        if self.state is None:      # static state (zeros = a fresh start) and gradients
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            with torch.no_grad(), self.ctx:
                _, _, new = lm_forward(self.model, x, y, None)
            self.state = [tuple(torch.zeros_like(s) for s in hc) for hc in new]
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # warm-up of this shape (cuDNN plans, autograd)
            self._fwd_bwd(x, y, self.state)
        g = torch.cuda.CUDAGraph()
        sx, sy = x.clone(), y.clone()
        with torch.cuda.graph(g, pool=self.pool, stream=self.stream):
            nll, new = self._fwd_bwd(sx, sy, self.state)
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.set_rng_state(rng)
        return g, sx, sy, nll, new

    def __call__(self, x, y, state):   # -> (nll, new state); gradients in p.grad
        if x.shape not in self.graphs:
            self.graphs[x.shape] = self._capture(x, y)
        g, sx, sy, nll, new = self.graphs[x.shape]
        sx.copy_(x)
        sy.copy_(y)
        for hc, src in zip(self.state, state or [None] * len(self.state)):
            for s, v in zip(hc, src or [None, None]):
                s.copy_(v) if v is not None else s.zero_()
        g.replay()
        return nll, new


class _Flat(nn.Module):   # a trunk for make_graphed_callables: tensors in, tensors out
    def __init__(self, model, trunk):
        super().__init__()
        self.model, self.trunk = model, trunk   # model: its parameters are the graph's inputs

    def forward(self, x, *mems):
        x, new = self.trunk(x, list(mems))
        return (x, *new)


class GraphedTrunk:
    """Transformer-XL's forward with its layers (model.trunk) replayed as CUDA graphs: one
    for their forward, one for their backward (torch.cuda.make_graphed_callables), captured
    when constructed, for segments shaped like `ids` (T, B) with a full memory (mem_len
    positions). The embedding and the adaptive softmax run outside the graphs: DeFINE once
    per distinct token (torch.unique) and the softmax's tail clusters both have shapes that
    change every step. Same call and result as the model: (ids, targets, mems) -> (loss,
    new_mems).

    Compiled, the published base step has 36 ms of kernels in 40-54 ms of wall time: the
    host cannot launch the trunk's ~1,000 kernels per step as fast as the GPU runs them,
    and a replay launches them at once. The step's host syncs (the softmax's cluster sizes,
    DeFINE's distinct tokens) are taken before the replay is queued, while the GPU has
    little left to do, not after it; train.py takes both from its host copy of the tokens
    (lm_hints) and passes them in, which needs no sync at all. Other shapes (the first segment,
    with no memory yet; a short last segment) and evaluation run the plain model. new_mems
    are the graph's output buffers, detached: the next call copies them into its inputs
    before the replay overwrites them. Dropout masks come from the CUDA generator, which
    every replay advances; the capture draws nothing (the generator is restored after it).

    Capture before the first training step: while an earlier step's autograd graph is alive
    (its loss still referenced), the parameters' gradient accumulators belong to the default
    stream, and capturing the backward fails (cudaErrorStreamCaptureImplicit)."""

    def __init__(self, model, ctx, compile_it, ids):
        self.model, self.ctx = model, ctx
        # compiled, the shapes that change (tail clusters, distinct tokens) turn dynamic after
        # one recompile; the rest stay static, so that unaligned matmuls get padded (compiled)
        self.embed = compiled(model.embed, model) if compile_it else model.embed
        self.loss_fn = compiled(model.io.loss, model) if compile_it else model.io.loss
        rng, was = torch.cuda.get_rng_state(), model.training
        model.eval()                                # a full memory to capture with
        mems = None
        with torch.no_grad(), ctx:
            x = model.embed(ids)
            while mems is None or mems[0].size(0) < model.mem_len:
                mems = model.trunk(x, mems)[1]
        model.train(was)
        trunk = compiled(model.trunk, model) if compile_it else model.trunk
        with capture_ctx(ctx):
            self.graphed = torch.cuda.make_graphed_callables(
                _Flat(model, trunk), (x.clone().requires_grad_(), *mems), allow_unused_input=True)
        self.shapes = (ids.shape, *(m.shape for m in mems))
        torch.cuda.set_rng_state(rng)

    @staticmethod
    def wanted(cfg, device, world, accum=1):
        """The Transformer-XL with a memory on GPUs, one micro-batch per step (under DDP the
        gradients are averaged after the backward: reduce_grads)."""
        return (cfg['cuda_graphs'] and cfg['model'] == 'txl' and cfg['mem_len'] > 0
                and device.type == 'cuda' and accum == 1)

    def __call__(self, ids, targets, mems=None, counts=None, distinct=None):
        """counts, distinct: lm_hints from a host copy of the batch, so that the GPU never
        waits for the host (else taken here, with a sync)."""
        shapes = (ids.shape, *(m.shape for m in mems or []))
        if not (self.model.training and shapes == self.shapes):   # eager: rare, not worth
            return self.model(ids, targets, mems, counts, distinct)   # a compile
        if counts is None:
            counts = self.model.io.loss_counts(targets)  # host syncs first (see above)
        if distinct is None:
            distinct = self.model.io.distinct(ids)
        with self.ctx:
            x = self.embed(ids, distinct)              # (B, T, d)
        out = self.graphed(x, *mems)
        with self.ctx:
            loss = self.loss_fn(out[0], targets.t(), counts=counts)
        return loss, [m.detach() for m in out[1:]]


# ------------------------------------------------------------------------------ LM loops

@torch.no_grad()
def evaluate_lm(model, data, seq_len, ctx, max_tokens=None):
    """Mean NLL over a (T, B) token grid, state carried across chunks."""
    import data as D
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    for i in range(0, data.size(0) - 1, seq_len):
        x, y = D.lm_batch(data, i, seq_len)
        with ctx:
            _, nll, state = lm_forward(model, x, y, state)
        total += nll.float() * y.numel()
        count += y.numel()
        if max_tokens and count >= max_tokens:
            break
    model.train(was_training)
    return (total / max(count, 1)).item()


class eval_lengths:
    """Transformer-XL's evaluation context (tgt_len, mem_len, clamp_len, same_length)."""

    def __init__(self, model, cfg):
        self.model, self.cfg, self.saved = model, cfg, None

    def __enter__(self):
        m, c = self.model, self.cfg
        if hasattr(m, 'mem_len'):
            self.saved = (m.mem_len, m.clamp_len, m.same_length)
            for attr in ('mem_len', 'clamp_len', 'same_length'):
                if c['eval_' + attr] is not None:
                    setattr(m, attr, c['eval_' + attr])
        return self

    def __exit__(self, *exc):
        if self.saved:
            self.model.mem_len, self.model.clamp_len, self.model.same_length = self.saved


def resume_state(cfg, env, model, opt, extra):
    """Load a checkpoint into model/optimizer; returns it (train state, per-rank state)."""
    ck = load_checkpoint(cfg['resume'])
    load_model_state(model, ck, cfg)
    try:
        opt.load_state_dict(ck['optimizer'])
    except ValueError as e:   # e.g. one parameter group, written before unit_lr existed
        sys.exit(f"error: the optimizer state in {cfg['resume']} does not fit this model's "
                 f"({e}); it was written by an older train.py. Evaluate it with --eval-only "
                 f"True, or start the run afresh")
    for name, obj in extra.items():
        obj.load_state_dict(ck[name])
    per_rank = ck['per_rank']
    mine = per_rank[env['rank']] if len(per_rank) == env['world'] else None
    if mine is None:
        env['log'](f"note: checkpoint written by {len(per_rank)} ranks, now {env['world']}: "
                   f"random and carried state start afresh")
    else:
        torch.set_rng_state(mine['rng_cpu'])
        if env['device'].type == 'cuda' and mine.get('rng_cuda') is not None:
            torch.cuda.set_rng_state(mine['rng_cuda'])
    env['log'](f"resumed from {cfg['resume']} at step {ck['train']['step']}")
    return ck['train'], mine


def write_checkpoint(cfg, env, model, opt, train_state, per_rank, name='ckpt.pt', **extra):
    """Every rank's RNG (and carried state) is gathered; rank 0 writes."""
    per_rank = gather_objects(dict(
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state() if env['device'].type == 'cuda' else None,
        **per_rank), env['world'])
    if env['master'] and cfg['save']:
        Path(cfg['out_dir']).mkdir(parents=True, exist_ok=True)
        save_checkpoint(Path(cfg['out_dir']) / name, dict(
            model=model.state_dict(), optimizer=opt.state_dict(), train=dict(train_state),
            per_rank=per_rank, config=cfg, **extra))


def train_lm(cfg, env):
    import data as D
    rank, world, device, log = env['rank'], env['world'], env['device'], env['log']
    corpus = rank0_first(lambda: D.lm_corpus(cfg['dataset'], data_dir=cfg['data_dir'],
                                             cache_dir=cfg['cache_dir']), env)
    V = len(corpus.vocab)
    if cfg['vocab_size'] and cfg['vocab_size'] != V:
        log(f"note: the preset's vocab_size {cfg['vocab_size']} != the corpus's {V}; using {V}")
    cfg['vocab_size'] = V
    torch.manual_seed(cfg['seed'])              # the same initial weights on every rank
    model = build_model(cfg, V).to(device)
    print_params(model, log)
    micro = cfg['micro_batch'] or cfg['batch_size'] // world
    accum = cfg['batch_size'] // (micro * world)
    if micro < 1 or accum * micro * world != cfg['batch_size']:
        sys.exit(f"error: batch_size {cfg['batch_size']} must be micro_batch ({micro}) x ranks "
                 f"({world}) x a whole number of accumulation steps")
    log(f"batch: {cfg['batch_size']} streams x {cfg['bptt']} tokens = "
        f"{cfg['batch_size'] * cfg['bptt']} tokens/step = {world} ranks x {accum} "
        f"accumulation steps x {micro} streams")
    train = D.batchify(corpus.train, cfg['batch_size'], rank, world)   # (T, B/ranks)
    trunk_graphs = GraphedTrunk.wanted(cfg, device, world, accum)
    train_host, train = (train if trunk_graphs else None), train.to(device)
    val = D.batchify(corpus.valid, cfg['eval_batch_size']).to(device)
    opt = make_optimizer(cfg, model, fused=device.type == 'cuda')
    avg = Averager(model.parameters())
    rng = np.random.default_rng(cfg['seed'])    # sequence lengths: the same on every rank
    st = dict(step=0, epoch=0, pos=0, best_val=float('inf'), val_history=[])
    states = [None] * accum                     # carried (detached) state per micro-batch
    torch.manual_seed(cfg['seed'] + rank)       # dropout masks differ between ranks
    if cfg['resume']:
        loaded, mine = resume_state(cfg, env, model, opt, dict(averager=avg))
        st.update(loaded)
        rng.bit_generator.state = st.pop('rng_bptt')
        if mine is not None and len(mine['states']) == accum:
            states = to_device(mine['states'], device)
    hooks = ddp_hooks(cfg, world, trunk_graphs)  # else reduce_grads
    ddp = model if not hooks else DDP(
        model, device_ids=[env['local_rank']] if device.type == 'cuda' else None)
    if world > 1 and not hooks:
        broadcast_params(model)
    graphed = None
    if GraphedLMStep.wanted(cfg, device, world, accum):
        graphed = GraphedLMStep(model, env['ctx'], cfg['grad_clip'])
        log("CUDA graphs: each training step replays a graph captured per sequence length")
    if trunk_graphs:                            # compiles the trunk itself
        fwd = GraphedTrunk(model, env['ctx'], cfg['compile'], train[:cfg['bptt']])
        log("CUDA graphs: each full-memory segment replays the trunk's forward and backward")
    else:
        fwd = compiled(ddp, model) if cfg['compile'] else ddp
    eval_len = cfg['eval_tgt_len'] or cfg['bptt']

    def save(name='ckpt.pt'):
        write_checkpoint(cfg, env, model, opt, dict(st, rng_bptt=rng.bit_generator.state),
                         dict(states=to_device(states, 'cpu')), name, averager=avg.state_dict())

    def evaluate_and_save():
        avg.swap()                              # NT-ASGD evaluates the averaged weights
        with eval_lengths(model, cfg):
            v = evaluate_lm(model, val, eval_len, env['ctx'], cfg['eval_max_tokens'])
        best = v < st['best_val']
        if best and env['master'] and cfg['save']:
            save_checkpoint(Path(cfg['out_dir']) / 'best.pt', model.state_dict())
        avg.swap()
        check_finite(v, st['step'], log)
        log(f"eval | step {st['step']} | epoch {st['epoch']} | valid loss {v:.3f} | "
            f"ppl {math.exp(v):.2f}{' (best)' if best else ''}"
            f"{' | averaged weights' if avg.avg is not None else ''}")
        env['metrics'](step=st['step'], epoch=st['epoch'], val_ppl=math.exp(v))
        hist, nm = st['val_history'], cfg['nonmono']
        # NT-ASGD: start averaging once validation is worse than the best of all but the
        # last `nonmono` evaluations (the non-monotone trigger of Merity et al.)
        if cfg['asgd'] and avg.avg is None and len(hist) > nm and v > min(hist[:-nm]):
            log(f"NT-ASGD: validation stalled for {nm} evaluations; averaging weights from now on")
            avg.start()
        hist.append(v)
        st['best_val'] = min(st['best_val'], v)
        save()

    model.train()
    rows, t0, tokens, loss_acc, n_acc = train.size(0), time.time(), 0, torch.zeros((), device=device), 0
    t_epoch = t0
    while not ((cfg['max_iters'] is not None and st['step'] >= cfg['max_iters']) or
               (cfg['max_epochs'] is not None and st['epoch'] >= cfg['max_epochs'])):
        if st['pos'] >= rows - 2:               # end of an epoch: state starts afresh
            st['epoch'], st['pos'], states = st['epoch'] + 1, 0, [None] * accum
            log(f"epoch {st['epoch']} done in {time.time() - t_epoch:.1f} s" + (
                f" ({len(graphed.graphs)} CUDA graphs, {torch.cuda.memory_reserved() / 2**30:.1f} "
                f"GiB reserved)" if graphed else ""))
            t_epoch = time.time()
            if not cfg['eval_interval']:
                evaluate_and_save()
            continue
        seq_len = D.variable_bptt(rng, cfg['bptt']) if cfg['variable_bptt'] else cfg['bptt']
        lr = lr_at(cfg, st['step'], st['epoch'])
        if cfg['variable_bptt']:                # AWD-LSTM: shorter sequences, smaller steps
            lr *= seq_len / cfg['bptt']
        set_lr(opt, lr)
        x, y = D.lm_batch(train, st['pos'], seq_len)                       # (T, B/ranks)
        hints = {}                              # the step's syncs, taken on the host copy
        if trunk_graphs:
            hints = lm_hints(model, *D.lm_batch(train_host, st['pos'], seq_len), device)
        if graphed is not None:                 # the same step, replayed (clipping included)
            nll, states[0] = graphed(x, y, states[0])
            loss_acc += nll.float()
            opt.step()                          # the replay overwrites the gradients
        else:
            for j in range(accum):
                cols = slice(j * micro, (j + 1) * micro)
                sync = not hooks or j == accum - 1      # decided before the forward (DDP)
                with (nullcontext() if sync else ddp.no_sync()), env['ctx']:
                    loss, nll, states[j] = lm_forward(fwd, x[:, cols], y[:, cols], states[j],
                                                      **hints)
                (loss / accum).backward()
                loss_acc += nll.detach().float() / accum
            if world > 1 and not hooks:
                reduce_grads(model.parameters(), world)
            if cfg['grad_clip']:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
            opt.step()
            opt.zero_grad(set_to_none=True)
        avg.update()
        st['step'], st['pos'], n_acc = st['step'] + 1, st['pos'] + seq_len, n_acc + 1
        tokens += y.numel() * world
        # a line every log_interval steps, and at least once a minute on slow machines
        if st['step'] % cfg['log_interval'] == 0 or st['step'] == 1 or time.time() - t0 > 60:
            loss_val = mean_over_ranks(loss_acc / n_acc, world).item()
            check_finite(loss_val, st['step'], log)
            dt = time.time() - t0
            log(f"step {st['step']:>7} | epoch {st['epoch'] + 1} {st['pos'] / rows:4.0%} | "
                f"loss {loss_val:.3f} | ppl {math.exp(min(loss_val, 50)):9.2f} | lr {lr:.3g} | "
                f"{1000 * dt / n_acc:6.1f} ms/step | {tokens / dt:8.0f} tok/s")
            env['metrics'](step=st['step'], tokens=st['step'] * cfg['batch_size'] * cfg['bptt'],
                           train_loss=loss_val, lr=lr, tok_s=tokens / dt)
            t0, tokens, loss_acc, n_acc = time.time(), 0, torch.zeros((), device=device), 0
        if cfg['eval_interval'] and st['step'] % cfg['eval_interval'] == 0:
            evaluate_and_save()
    save()
    best = Path(cfg['out_dir']) / 'best.pt'
    if cfg['save'] and best.exists():           # test the best validated weights
        model.load_state_dict(torch.load(best, map_location=device, weights_only=True))
    else:
        avg.swap()
    return final_lm_eval(cfg, env, model, corpus, st['step'])


def final_lm_eval(cfg, env, model, corpus, step):
    import data as D
    dev, eval_len = env['device'], cfg['eval_tgt_len'] or cfg['bptt']
    val = D.batchify(corpus.valid, cfg['eval_batch_size']).to(dev)
    test = D.batchify(corpus.test, cfg['test_batch_size']).to(dev)
    t0 = time.time()
    with eval_lengths(model, cfg):
        v = evaluate_lm(model, val, eval_len, env['ctx'], cfg['eval_max_tokens'])
        t = evaluate_lm(model, test, eval_len, env['ctx'], cfg['eval_max_tokens'])
    env['log'](f"final | valid ppl {math.exp(v):.2f} | test ppl {math.exp(t):.2f} | "
               f"{time.time() - t0:.1f} s")
    env['metrics'](step=step, val_ppl=math.exp(v), test_ppl=math.exp(t), final=True)
    return dict(valid_ppl=math.exp(v), test_ppl=math.exp(t))


def check_finite(loss, step, log):
    if not math.isfinite(loss):
        log(f"error: the loss is {loss} at step {step}; stopped. The last good checkpoint is "
            f"kept: resume from it with a lower --lr or --grad-clip.")
        raise SystemExit(2)


# ------------------------------------------------------------------------------ translation

def nmt_corpus(cfg):
    import data as D
    return D.parallel_corpus(cfg['dataset'], cfg['src_lang'], cfg['tgt_lang'],
                             joint_vocab=cfg['joint_vocab'] or cfg['share_embed'],
                             max_vocab=cfg['max_vocab'], variant=cfg['corpus_variant'],
                             data_dir=cfg['data_dir'], cache_dir=cfg['cache_dir'])


def translate_ids(model, sents, cfg, device, bs=64):
    """Beam search over lists of source ids (no specials), batched by length."""
    order = sorted(range(len(sents)), key=lambda i: len(sents[i]))
    out = [None] * len(sents)
    for s in range(0, len(order), bs):
        idx = order[s:s + bs]
        L = max(len(sents[i]) for i in idx) + 1
        src = torch.full((len(idx), L), model.pad, dtype=torch.long)
        for r, i in enumerate(idx):
            src[r, :len(sents[i]) + 1] = torch.tensor(list(sents[i]) + [model.eos])
        hyps = model.beam_search(src.to(device), beam=cfg['beam'], lenpen=cfg['lenpen'],
                                 max_len_b=cfg['max_len_b'])
        for r, i in enumerate(idx):
            out[i] = hyps[r]
    return out


@torch.no_grad()
def evaluate_nmt(cfg, env, model, corpus, split, bleu=False):
    """(mean token NLL without smoothing, BLEU or None) on a split."""
    import data as D
    import nmt
    was_training = model.training
    model.eval()
    src, tgt = corpus.splits[split]
    refs = corpus.text(split)
    if cfg['eval_max_tokens']:      # a quick look: the first sentences up to the cap
        n = int(np.searchsorted(np.cumsum([len(t) for t in tgt]), cfg['eval_max_tokens'])) + 1
        src, tgt, refs = src[:n], tgt[:n], refs[:n]
    total, count = 0.0, 0
    lens = [len(s) for s in src], [len(t) for t in tgt]
    for b in D.token_batches(*lens, cfg['max_tokens'], shuffle=False):
        s, t = D.collate((src, tgt), b)
        with env['ctx']:
            loss_sum, n = model.loss(s.to(env['device']), t.to(env['device']), label_smoothing=0.0)
        total, count = total + loss_sum.float(), count + n
    nll = (total / count).item()
    score = None
    if bleu:
        with env['ctx']:
            hyps = translate_ids(model, src, cfg, env['device'])
        hyp_txt = [D.detokenize(h, corpus.tgt_vocab) for h in hyps]
        score, sig = nmt.bleu(hyp_txt, refs, tokenize=cfg['bleu_tokenize'])
        env['log'](f"BLEU {split} {score:.2f} on {len(refs)} sentences (sacreBLEU {sig}; against "
                   f"the {cfg['corpus_variant']} reference files as written)")
    model.train(was_training)
    return nll, score


def train_nmt(cfg, env):
    import data as D
    rank, world, device, log = env['rank'], env['world'], env['device'], env['log']
    corpus = rank0_first(lambda: nmt_corpus(cfg), env)
    sizes = len(corpus.src_vocab), len(corpus.tgt_vocab)
    cfg['vocab_size'] = list(sizes)
    torch.manual_seed(cfg['seed'])
    model = build_model(cfg, sizes).to(device)
    print_params(model, log)
    batch_tokens = cfg['batch_tokens'] or cfg['max_tokens'] * world
    accum = batch_tokens // (cfg['max_tokens'] * world)
    if accum < 1 or accum * cfg['max_tokens'] * world != batch_tokens:
        sys.exit(f"error: batch_tokens {batch_tokens} must be max_tokens ({cfg['max_tokens']}) x "
                 f"ranks ({world}) x a whole number of accumulation steps")
    log(f"batch: up to {batch_tokens} tokens/step = {world} ranks x {accum} accumulation steps "
        f"x {cfg['max_tokens']} tokens")
    train = corpus.splits['train']
    lens = corpus.lengths('train')
    opt = make_optimizer(cfg, model, fused=device.type == 'cuda')
    st = dict(step=0, epoch=0, batch=0, best_val=float('inf'))
    torch.manual_seed(cfg['seed'] + rank)
    if cfg['resume']:
        st.update(resume_state(cfg, env, model, opt, {})[0])
    wrapped = LossOf(model)     # DDP all-reduces only what runs inside its forward
    ddp = DDP(wrapped, device_ids=[env['local_rank']] if device.type == 'cuda' else None) if world > 1 else wrapped
    loss_fn = compiled(ddp, model, varying=True) if cfg['compile'] else ddp
    vocab = dict(src=corpus.src_vocab, tgt=corpus.tgt_vocab)

    def save(name='ckpt.pt'):
        write_checkpoint(cfg, env, model, opt, st, {}, name, vocab=vocab)

    def evaluate_and_save():
        v, _ = evaluate_nmt(cfg, env, model, corpus, 'valid')
        check_finite(v, st['step'], log)
        best = v < st['best_val']
        log(f"eval | step {st['step']} | epoch {st['epoch']} | valid loss {v:.3f} | ppl "
            f"{math.exp(v):.2f}{' (best)' if best else ''}")
        env['metrics'](step=st['step'], epoch=st['epoch'], val_ppl=math.exp(v))
        if best:
            st['best_val'] = v
            if env['master'] and cfg['save']:
                save_checkpoint(Path(cfg['out_dir']) / 'best.pt', model.state_dict())
        if cfg['avg_last']:                     # numbered copies to average at the end
            save(f"ckpt{st['step']}.pt")
        save()

    model.train()
    t0, tokens, loss_acc, n_acc = time.time(), torch.zeros((), device=device), torch.zeros((), device=device), 0
    batches = D.token_batches(*lens, cfg['max_tokens'], seed=cfg['seed'], epoch=st['epoch'], rank=rank, world_size=world)
    while not ((cfg['max_iters'] is not None and st['step'] >= cfg['max_iters']) or
               (cfg['max_epochs'] is not None and st['epoch'] >= cfg['max_epochs'])):
        if st['batch'] + accum > len(batches):      # end of an epoch
            st['epoch'], st['batch'] = st['epoch'] + 1, 0
            batches = D.token_batches(*lens, cfg['max_tokens'], seed=cfg['seed'],
                                      epoch=st['epoch'], rank=rank, world_size=world)
            if not cfg['eval_interval']:
                evaluate_and_save()
            continue
        lr = lr_at(cfg, st['step'], st['epoch'])
        set_lr(opt, lr)
        for j in range(accum):
            s, t = D.collate(train, batches[st['batch'] + j])
            s, t = s.to(device, non_blocking=True), t.to(device, non_blocking=True)
            sync = world == 1 or j == accum - 1
            with (nullcontext() if sync else ddp.no_sync()), env['ctx']:
                loss_sum, n = loss_fn(s, t, label_smoothing=cfg['label_smoothing'])
            (loss_sum / n / accum).backward()
            loss_acc += loss_sum.detach().float() / n / accum
            tokens += n + (s != model.pad).sum()
        if cfg['grad_clip']:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
        opt.step()
        opt.zero_grad(set_to_none=True)
        st['step'], st['batch'], n_acc = st['step'] + 1, st['batch'] + accum, n_acc + 1
        # a line every log_interval steps, and at least once a minute on slow machines
        if st['step'] % cfg['log_interval'] == 0 or st['step'] == 1 or time.time() - t0 > 60:
            loss_val = mean_over_ranks(loss_acc / n_acc, world).item()
            check_finite(loss_val, st['step'], log)
            dt, tok = time.time() - t0, tokens.item() * world
            log(f"step {st['step']:>7} | epoch {st['epoch'] + 1} | loss {loss_val:.3f} | lr {lr:.3g} | "
                f"{1000 * dt / n_acc:6.1f} ms/step | {tok / dt:8.0f} tok/s (source + target)")
            env['metrics'](step=st['step'], train_loss=loss_val, lr=lr, tok_s=tok / dt)
            t0, tokens, loss_acc, n_acc = time.time(), tokens * 0, loss_acc * 0, 0
        if cfg['eval_interval'] and st['step'] % cfg['eval_interval'] == 0:
            evaluate_and_save()
    save()
    return final_nmt_eval(cfg, env, model, corpus, st['step'])


def final_nmt_eval(cfg, env, model, corpus, step):
    import nmt
    out = Path(cfg['out_dir'])
    if cfg['avg_last'] and cfg['save']:         # average the last N periodic checkpoints
        paths = sorted(out.glob('ckpt[0-9]*.pt'), key=lambda p: int(p.stem[4:]))[-cfg['avg_last']:]
        model.load_state_dict(nmt.average_checkpoints([str(p) for p in paths]))
        env['log'](f"averaged {len(paths)} checkpoints: {[p.name for p in paths]}")
    elif cfg['save'] and (out / 'best.pt').exists():
        model.load_state_dict(torch.load(out / 'best.pt', map_location=env['device'], weights_only=True))
    res = {}
    for split in ('valid', 'test'):
        nll, score = evaluate_nmt(cfg, env, model, corpus, split, bleu=True)
        res[split] = dict(ppl=math.exp(nll), bleu=score)
    env['log'](f"final | valid ppl {res['valid']['ppl']:.2f} BLEU {res['valid']['bleu']:.2f} | "
               f"test ppl {res['test']['ppl']:.2f} BLEU {res['test']['bleu']:.2f}")
    env['metrics'](step=step, val_ppl=res['valid']['ppl'], val_bleu=res['valid']['bleu'],
                   test_ppl=res['test']['ppl'], test_bleu=res['test']['bleu'], final=True)
    return res


def translate_stdin(cfg, env):
    if not cfg['resume']:
        sys.exit("error: --translate needs --resume CHECKPOINT")
    ck = load_checkpoint(cfg['resume'])
    if 'vocab' not in ck:
        sys.exit(f"error: {cfg['resume']} holds no vocabulary: it is not a translation checkpoint")
    mcfg = dict(ck['config'], beam=cfg['beam'], lenpen=cfg['lenpen'], max_len_b=cfg['max_len_b'])
    src_vocab, tgt_vocab = ck['vocab']['src'], ck['vocab']['tgt']
    model = build_model(mcfg, (len(src_vocab), len(tgt_vocab)))
    load_model_state(model, ck, mcfg)
    model.to(env['device']).eval()
    if cfg['embed_cache']:
        use_embed_cache(model, env['log'])
    stoi = {w: i for i, w in enumerate(src_vocab)}
    lower = mcfg['corpus_variant'] == 'tok'     # the official Multi30k files are lowercased
    lines = [ln.strip() for ln in sys.stdin]
    sents = [[stoi.get(w, 1) for w in (ln.lower() if lower else ln).split()] for ln in lines]
    with env['ctx']:
        hyps = translate_ids(model, sents, mcfg, env['device'])
    specials = {model.pad, model.bos, model.eos}
    for h in hyps:
        print(' '.join(tgt_vocab[i] for i in h if i not in specials))


# ------------------------------------------------------------------------------ main

def setup(cfg):
    ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ      # started by torchrun
    want = cfg['device'] if cfg['device'] != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    if want == 'cuda' and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is visible; use --device cpu")
    rank, world, local_rank = 0, 1, 0
    if ddp:
        dist.init_process_group('nccl' if want == 'cuda' else 'gloo')
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ['LOCAL_RANK'])
    device = torch.device(f'cuda:{local_rank}' if want == 'cuda' else 'cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    out = Path(cfg['out_dir'])
    if master and cfg['save']:
        out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        if master:
            print(msg, flush=True)

    def metrics(**row):   # one JSON line per log / eval, for plots and tables
        if master:   # on every run: --save False skips only the checkpoints
            out.mkdir(parents=True, exist_ok=True)
            with open(out / 'metrics.jsonl', 'a') as f:
                f.write(json.dumps(dict(time=round(time.time(), 3), **row)) + '\n')

    if cfg['dtype'] not in ('bfloat16', 'float32'):
        sys.exit(f"error: --dtype {cfg['dtype']!r} unknown; choose bfloat16 or float32")
    bf16 = device.type == 'cuda' and cfg['dtype'] == 'bfloat16'
    ctx = torch.autocast('cuda', dtype=torch.bfloat16) if bf16 else nullcontext()
    return dict(rank=rank, world=world, local_rank=local_rank, device=device, master=master,
                ctx=ctx, log=log, metrics=metrics)


def count_only(cfg, log):
    v = cfg['vocab_size']
    if v is None:
        sys.exit("error: --count-params needs --vocab-size (presets carry it)")
    if cfg['model'] == 'nmt' and isinstance(v, int):
        v = (v, v)
    torch.manual_seed(cfg['seed'])
    with torch.device('meta'):                  # shapes only: no memory, no time
        model = build_model(cfg, tuple(v) if cfg['model'] == 'nmt' else v)
    return print_params(model, log)


def use_embed_cache(model, log):
    """DeFINE's inference cache: every TokenIO's input path becomes one (V, d) table."""
    model.eval()
    for io in {id(m): m for m in model.modules() if isinstance(m, TokenIO)}.values():
        info = io.cache()
        log(f"embedding cache: {info['rows']} x {info['width']} table ({info['bytes'] / 2**20:.1f} "
            f"MiB) replaces {info['input_path_params']} input-path parameters")


def eval_only(cfg, env):
    ck = load_checkpoint(cfg['resume'])
    overrides = {k: cfg[k] for k in ('data_dir', 'cache_dir', 'eval_tgt_len', 'eval_mem_len',
                                     'eval_clamp_len', 'eval_same_length', 'eval_batch_size',
                                     'test_batch_size', 'beam', 'lenpen', 'out_dir', 'save')}
    mcfg = dict(ck['config'], **overrides)
    if mcfg['model'] == 'nmt':
        corpus = nmt_corpus(mcfg)
        model = build_model(mcfg, (len(corpus.src_vocab), len(corpus.tgt_vocab)))
    else:
        import data as D
        corpus = D.lm_corpus(mcfg['dataset'], data_dir=mcfg['data_dir'], cache_dir=mcfg['cache_dir'])
        model = build_model(mcfg, len(corpus.vocab))
    load_model_state(model, ck, mcfg)
    model.to(env['device'])
    if cfg['embed_cache']:
        use_embed_cache(model, env['log'])
    if mcfg['model'] == 'nmt':
        return final_nmt_eval(dict(mcfg, avg_last=0, save=False), env, model, corpus, ck['train']['step'])
    return final_lm_eval(mcfg, env, model, corpus, ck['train']['step'])


def main(argv=None):
    cfg = get_config(sys.argv[1:] if argv is None else argv)
    if cfg['count_params']:
        return count_only(cfg, print)
    env = setup(cfg)
    env['log']('config ' + json.dumps(cfg, sort_keys=True))
    try:
        if cfg['translate']:
            return translate_stdin(cfg, env)
        if cfg['eval_only']:
            if not cfg['resume']:
                sys.exit("error: --eval-only needs --resume CHECKPOINT")
            return eval_only(cfg, env)
        return (train_nmt if cfg['model'] == 'nmt' else train_lm)(cfg, env)
    finally:
        if env['world'] > 1:
            dist.destroy_process_group()


if __name__ == '__main__':
    import data
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: the last checkpoint in the output folder is intact (--resume it)")
    except (data.DataError, ValueError) as e:     # bad input: the message names the fix
        sys.exit(f"error: {e}")
