"""The one entry point: train, evaluate or count any model with any token representation.

    python train.py --model txl --embed define              # small Transformer-XL on WikiText-2
    python train.py --config ptb_awd_lstm --embed define     # a preset from config/
    python train.py --config wt103_txl --embed define --n 128 --count-params
    torchrun --standalone --nproc_per_node=2 train.py --config ptb_awd_lstm   # DDP
    python train.py --resume out                             # continue a run, its own settings
    python train.py --eval-only --resume out/best.pt

sample.py uses a trained checkpoint: samples text, scores a file, translates raw text.

Every setting is a key of DEFAULTS below; a preset (config/NAME.py, plain assignments; without
--config the model's own, DEFAULT_PRESET) overrides them, and the command line overrides both
(settings.py reads and checks them). The settings that differ from DEFAULTS are printed at
start; all are stored in every checkpoint, and --resume takes them from there. build.py turns
settings into the model and the batches, checkpoint.py writes and reads the files (atomically,
with one clear line on error; restore() for --resume), evaluation.py measures a model
(perplexity, BLEU).

Read top to bottom: settings -> optimisation -> train(): set-up, data and model, ONE loop for
all three models, the final evaluation. Every model is called the same way,
`loss, state = model(x, y, state)` (state: the LSTM's hidden state, Transformer-XL's memory,
nothing for translation). fast.py (CUDA graphs, compile) is
imported only with --cuda-graphs (on a GPU) or --compile; the loop is the same either way.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import build
import checkpoint
import evaluation as E
import settings
from define import DeFINE, to_device

ROOT = Path(__file__).resolve().parent
DEFAULT_PRESET = dict(lstm='ptb_awd_lstm', txl='wt2_txl', nmt='multi30k_transformer')
DEFAULTS = dict(
    # --- what to run
    model='txl',              # lstm | txl | nmt
    embed='define',           # standard | projective | adaptive | define | cnn (characters)
    config=None,              # preset in config/ (default: DEFAULT_PRESET[model])
    dataset='wikitext-2',     # ptb | wikitext-2 | wikitext-103 | multi30k | wmt14_en_de
    data_dir=None,            # a local copy of the corpora (DIR/<dataset>/...)
    cache_dir=None,           # downloads and tokenized arrays (default ~/.cache/define)
    out_dir='out',            # checkpoints and metrics.jsonl
    vocab_size=None,          # presets carry it so that --count-params needs no data
    device='auto',            # auto | cpu | cuda
    dtype='bfloat16',         # GPU autocast dtype: bfloat16 | float32 (no autocast); CPU: float32
    compile=False,            # torch.compile the model (fast.py)
    cuda_graphs=True,         # on a GPU: replay the AWD-LSTM step, translation's (in shape buckets),
                              # Transformer-XL's layers (fast.py)
    seed=1111,
    # --- token representation (define.TokenIO)
    d_model=410,              # model width (LSTM: embedding width m; None = n)
    n=None,                   # map width (None = d_model)
    k=1024, m=None, depth=3, g_max=4,   # DeFINE: expand width, output width, depth, groups
    variant='define',         # DeFINE ablation, see define.VARIANTS
    cutoffs=[],               # adaptive input / softmax band edges
    factor=None,              # band width divisor (None: 4 for adaptive, else 1)
    unit_dropout=0.0,         # dropout inside the DeFINE unit
    map_dropout=0.0,          # dropout on the map's output, before the DeFINE unit
    unit_norm=True,           # LayerNorm in each unit layer (the LSTM presets turn it off)
    unit_lr=1.0,              # the DeFINE unit's learning rate, as a multiple of lr
    dedup=True,               # run DeFINE once per distinct token of a batch
    embed_scale=None,         # multiplies the embedding (None: sqrt(d_model) for Transformers'
                              # tables, 1 for DeFINE's and the CNN's outputs: build.token_io)
    tied=None,                # output reuses the input tables (None: yes; False: tables of its own)
    out_factor=None,          # untied output's band divisor (None: factor; standard + 4 = ASM)
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
    # --- Transformer-XL (dropatt and pre_norm also the translation model's)
    n_layer=16, n_head=10, d_head=41, d_inner=2100, dropatt=0.0,
    mem_len=150, clamp_len=-1, same_length=False, pre_norm=False,
    eval_tgt_len=None, eval_mem_len=None, eval_clamp_len=None, eval_same_length=None,
    # --- translation
    src_lang='en', tgt_lang='de', joint_vocab=False, max_vocab=None, corpus_variant='tok',
    share_embed=False,        # one table for source, target and output (needs joint_vocab)
    enc_layers=6, dec_layers=6, d_ff=2048, label_smoothing=0.1,
    max_tokens=4096,          # tokens per rank per micro-batch
    bucket=None,              # >0: batches padded to widths of multiples of this, a few fixed
                              # shapes that compile once each or replay a CUDA graph each
                              # (None: 8 with --compile, or with CUDA graphs on one GPU and
                              # one micro-batch a step; else 0)
    batch_tokens=None,        # tokens per optimizer step (None: max_tokens x ranks)
    beam=4, lenpen=0.6, max_len_b=50, bleu_tokenize='none', avg_last=0,
    # --- optimisation
    optimizer='sgd',          # sgd | adam
    lr=30.0, weight_decay=1.2e-6, beta1=0.9, beta2=0.999, grad_clip=0.25,
    schedule='constant',      # constant | cosine | step | noam
    warmup=0, min_lr=0.0, lr_decay=0.1, lr_decay_epochs=[],
    max_epochs=None, max_iters=None,   # stop at whichever comes first
    # --- logging, evaluation, checkpoints
    log_interval=50, eval_interval=None,   # steps (eval None or 0: each epoch; the last always)
    eval_max_tokens=None,     # cap tokens per valid/test pass, final included (None: whole)
    eval_only=False, count_params=False,
    resume=None,              # a checkpoint or its folder: continue it with its own settings
    save=True,                # checkpoints (metrics.jsonl is always written)
    save_interval=None,       # steps between checkpoints (None: at every evaluation)
    overwrite=False,          # a new run may replace the run in out_dir
    embed_cache=False,        # --eval-only: replace the input path by its cached table
)
CHOICES = dict(model=('lstm', 'txl', 'nmt'),
               embed=('standard', 'projective', 'adaptive', 'define', 'cnn'),
               device=('auto', 'cpu', 'cuda'), dtype=('bfloat16', 'float32'),
               optimizer=('sgd', 'adam'), schedule=('constant', 'cosine', 'step', 'noam'))


# ------------------------------------------------------------------------------ settings

def get_config(argv):
    """DEFAULTS <- preset <- command line (or, with --resume, the checkpoint's settings <- the
    command line), every value checked: settings.py."""
    return settings.load(argv, DEFAULTS, CHOICES, DEFAULT_PRESET, __doc__, Path(__file__))


def checkpoint_config(ck, **override):
    """The settings a checkpoint was written with; those added to DEFAULTS since, at theirs."""
    return settings.from_checkpoint(ck, DEFAULTS, **override)


# ------------------------------------------------------------------------------ optimisation

def make_optimizer(cfg, model, fused=False):
    # two groups: the DeFINE units' parameters run at unit_lr x the learning rate (lr_scale)
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
        g['lr'] = lr * g['lr_scale']


def lr_at(cfg, step, epoch):
    """Learning rate at optimizer step `step` (0-based) in epoch `epoch` (0-based)."""
    lr, warm = cfg['lr'], cfg['warmup']
    if cfg['schedule'] == 'noam':   # lr * d^-1/2 * min(s^-1/2, s warmup^-3/2) (Vaswani et al.)
        s = step + 1
        return lr * cfg['d_model'] ** -0.5 * min(s ** -0.5, s * max(warm, 1) ** -1.5)
    if step < warm:
        return lr * (step + 1) / warm
    if cfg['schedule'] == 'cosine':
        t = min(1.0, (step - warm) / max(1, (cfg['max_iters'] or 1) - warm))
        return cfg['min_lr'] + 0.5 * (lr - cfg['min_lr']) * (1 + math.cos(math.pi * t))
    if cfg['schedule'] == 'step':
        return lr * cfg['lr_decay'] ** sum(epoch >= e for e in cfg['lr_decay_epochs'])
    return lr


class Averager:
    """The averaging of NT-ASGD (Merity et al. 2018): from start() on, the running mean of the
    weights after every step; evaluate and save with the mean (swap)."""

    def __init__(self, params):
        self.params, self.avg, self.count = list(params), None, 0

    def start(self):
        self.avg, self.count = [p.detach().clone() for p in self.params], 1

    def update(self):
        if self.avg is not None:
            self.count += 1
            torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1.0 / self.count)

    def swap(self):   # exchange weights and their average (call twice to undo)
        for p, a in zip(self.params, self.avg or []):
            tmp = p.detach().clone()
            p.data.copy_(a)
            a.copy_(tmp)

    def state_dict(self):
        return dict(avg=self.avg, count=self.count)

    def load_state_dict(self, s):
        self.count = s['count']
        self.avg = s['avg'] and [a.to(p.device) for a, p in zip(s['avg'], self.params)]


# ------------------------------------------------------------------------------ training

def setup(cfg):
    """Devices, DDP (started by torchrun: RANK and WORLD_SIZE set), autocast, log, metrics."""
    want = cfg['device'] if cfg['device'] != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    if want == 'cuda' and cfg['compile'] and cfg['model'] == 'nmt' and not cfg['bucket'] \
            and not cfg['eval_only']:   # (evaluation runs eager)
        sys.exit("error: --compile True --bucket 0 on a GPU: translation's dynamic-shape compile "
                 "did not finish in minutes (PERF.md); keep --bucket 8, or drop --compile")
    if want == 'cuda' and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is visible; use --device cpu")
    rank, world, local_rank = 0, 1, 0
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        dist.init_process_group('nccl' if want == 'cuda' else 'gloo')
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ['LOCAL_RANK'])
    device = torch.device(f'cuda:{local_rank}' if want == 'cuda' else 'cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = device.type == 'cuda' and cfg['dtype'] == 'bfloat16'
    out, master = Path(cfg['out_dir']), rank == 0

    def log(msg):
        if master:
            print(msg, flush=True)

    def metrics(**row):   # one JSON line per log and evaluation, for plots and tables
        if master:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / 'metrics.jsonl', 'a') as f:
                row = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in row.items()}   # strict JSON: no NaN or Infinity
                f.write(json.dumps(dict(time=round(time.time(), 3), **row), allow_nan=False) + '\n')

    return SimpleNamespace(rank=rank, world=world, local_rank=local_rank, device=device,
                           master=master, log=log, metrics=metrics,
                           ctx=torch.autocast('cuda', dtype=torch.bfloat16) if bf16 else nullcontext())


def accumulation(cfg, world):
    """Micro-batches per rank per optimizer step: the batch is stated globally (llm.c-style)."""
    nmt = cfg['model'] == 'nmt'
    total = (cfg['batch_tokens'] or cfg['max_tokens'] * world) if nmt else cfg['batch_size']
    micro = cfg['max_tokens'] if nmt else cfg['micro_batch'] or cfg['batch_size'] // world
    accum, unit = total // max(micro * world, 1), 'tokens' if nmt else f"streams of {cfg['bptt']}"
    if micro < 1 or accum < 1 or accum * micro * world != total:
        sys.exit(f"error: a batch of {total} {unit} must be {micro} per micro-batch x {world} "
                 f"ranks x a whole number of accumulation steps")
    return accum, f"{total} {unit} per step = {world} ranks x {accum} micro-batches x {micro}"


def forward_backward(fwd, x, y, state, env, accum=1):
    """Forward and backward of one micro-batch (x, y on the host) -> (its loss, the state to
    carry on); the gradient is scaled for `accum` micro-batches per step."""
    with env.ctx:
        loss, state = fwd(to_device(x, env.device), to_device(y, env.device), state)
    (loss / accum).backward()
    return loss.detach(), state


def train(cfg, env):
    # ---- data, model, optimizer; rank 0 downloads and tokenizes while the others wait
    accum, batch_note = accumulation(cfg, env.world)
    checkpoint.claim_out_dir(cfg, env.master)
    if env.world > 1 and not env.master:
        dist.barrier()
    corpus, vocab, batches, eval_batches = build.data(cfg, env, accum)
    if env.world > 1 and env.master:
        dist.barrier()
    if cfg['vocab_size'] not in (None, vocab) and cfg['model'] != 'nmt':
        env.log(f"note: the preset's vocab_size {cfg['vocab_size']} != the corpus's {vocab}: "
                f"using {vocab}")
    cfg['vocab_size'] = vocab
    torch.manual_seed(cfg['seed'])              # the same initial weights on every rank
    words = corpus.vocab if cfg['model'] != 'nmt' else None   # the strings (the character CNN)
    model = build.model(cfg, vocab, words).to(env.device)
    # checkpoints carry the vocabulary (and a BPE corpus's tokenizer), so that sample.py needs no corpus
    vocabulary = dict(words=words, bpe=corpus.bpe and corpus.bpe.read_text(encoding='utf-8')) if words \
        else dict(vocab=dict(src=corpus.src_vocab, tgt=corpus.tgt_vocab))
    build.print_params(model, env.log)
    env.log(f"batch: {batch_note}")
    opt = make_optimizer(cfg, model, fused=env.device.type == 'cuda')
    avg = Averager(model.parameters())
    st = dict(step=0, tokens=0, best_val=float('inf'), val_history=[], evaluated=None)
    states = [None] * accum                     # carried (detached) state per micro-batch
    torch.manual_seed(cfg['seed'] + env.rank)   # dropout masks differ between ranks
    if cfg['resume']:
        states = checkpoint.restore(cfg, env, model, opt, avg, batches, st, accum) or states
    ddp = DDP(model, device_ids=[env.local_rank] if env.device.type == 'cuda' else None) \
        if env.world > 1 else model
    fwd, graphed = ddp, None
    if cfg['compile'] or (cfg['cuda_graphs'] and env.device.type == 'cuda'):
        import fast                             # the optional speed machinery
        shapes = 'fixed' if cfg['model'] != 'nmt' else ('buckets' if cfg['bucket'] else 'vary')
        if cfg['compile']:
            fwd = fast.compiled(ddp, model, shapes)
        if cfg['cuda_graphs']:
            graphed = fast.graphed_step(model, env, accum, cfg['compile'],
                                        (cfg['bptt'], cfg['batch_size'] // env.world // accum), shapes)
            if graphed is not None:
                env.log(f"CUDA graphs: {type(graphed).__name__} (fast.py)")

    def step(x, y, state):   # fast.graphed_step does the same by replaying CUDA graphs
        return graphed(x, y, state) if graphed else forward_backward(fwd, x, y, state, env, accum)

    def save(name='ckpt.pt'):
        """Every rank's random and carried state is gathered; rank 0 writes. Non-finite
        weights are never written: the run stops and the last good checkpoint stays."""
        if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
            env.log(f"error: the weights are not finite at step {st['step']}; nothing written, "
                    f"the last good checkpoint is kept: resume from it with a lower --lr or --grad-clip")
            raise SystemExit(2)
        mine = dict(rng_cpu=torch.get_rng_state(), states=[checkpoint.to(s, 'cpu') for s in states],
                    rng_cuda=torch.cuda.get_rng_state() if env.device.type == 'cuda' else None)
        per_rank = [mine] * env.world
        if env.world > 1:
            dist.all_gather_object(per_rank, mine)
        if env.master and cfg['save']:
            checkpoint.save(Path(cfg['out_dir']) / name, dict(
                model=model.state_dict(), optimizer=opt.state_dict(), averager=avg.state_dict(),
                batches=batches.state_dict(), train=st, per_rank=per_rank, config=cfg, **vocabulary))

    def evaluate_and_save():
        st['evaluated'] = st['step']
        avg.swap()                              # NT-ASGD evaluates the averaged weights
        with E.eval_lengths(model, cfg):
            v = E.nll(model, eval_batches('valid'), env)
        best = v < st['best_val']
        if best and env.master and cfg['save']:
            checkpoint.save(Path(cfg['out_dir']) / 'best.pt', dict(
                model=model.state_dict(), config=cfg, train=st, **vocabulary))
        avg.swap()
        check_finite(v, st['step'], env.log)
        env.log(f"eval | step {st['step']} | epoch {batches.epoch} | valid loss {v:.3f} | "
                f"ppl {math.exp(v):.2f}{' (best)' if best else ''}"
                f"{' | averaged weights' if avg.avg is not None else ''}")
        env.metrics(step=st['step'], epoch=batches.epoch, val_ppl=math.exp(v))
        hist, nm = st['val_history'], cfg['nonmono']
        # NT-ASGD: start averaging once validation is worse than the best of all but the
        # last `nonmono` evaluations (the non-monotone trigger of Merity et al.)
        if cfg['asgd'] and avg.avg is None and len(hist) > nm and v > min(hist[:-nm]):
            env.log(f"NT-ASGD: validation stalled for {nm} evaluations; averaging weights from now on")
            avg.start()
        hist.append(v)
        st['best_val'] = min(st['best_val'], v)
        if cfg['avg_last']:                     # numbered copies to average at the end
            save(f"ckpt{st['step']}.pt")
        save()

    def share_done():   # of the run, by whichever stop point comes first
        shares = [0.0]
        if cfg['max_iters']:
            shares.append(st['step'] / cfg['max_iters'])
        if cfg['max_epochs']:
            shares.append((batches.epoch + batches.progress) / cfg['max_epochs'])
        return max(shares)

    # ---- the loop: every model, `accum` micro-batches per optimizer step
    # Ctrl-C or a scheduler's SIGTERM: finish the step, save, exit; a second one stops at once.
    # One process only: DDP ranks could stop at different steps.
    stop, handlers = [], {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if env.world == 1:
        for s in handlers:
            signal.signal(s, lambda sig, _: (stop.append(sig), signal.signal(sig, handlers[sig])))
    model.train()
    t0 = t_epoch = t_run = time.time()
    done0, loss_sum, n_steps, tokens = share_done(), torch.zeros((), device=env.device), 0, 0
    while not (stop or (cfg['max_iters'] is not None and st['step'] >= cfg['max_iters']) or
               (cfg['max_epochs'] is not None and batches.epoch >= cfg['max_epochs'])):
        batch = batches.next()
        if batch is None:                       # the end of an epoch
            states = [None] * accum             # the carried state starts afresh
            env.log(f"epoch {batches.epoch} done in {time.time() - t_epoch:.1f} s")
            t_epoch = time.time()
            if not cfg['eval_interval']:
                evaluate_and_save()
            continue
        lr = lr_at(cfg, st['step'], batches.epoch) * batch.lr_scale
        set_lr(opt, lr)
        for j, (x, y) in enumerate(batch.micro):
            # DDP averages the gradients in the last micro-batch's backward only
            with ddp.no_sync() if env.world > 1 and j < accum - 1 else nullcontext():
                loss, states[j] = step(x, y, states[j])
            loss_sum += loss.float() / accum
        if cfg['grad_clip']:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg.update()
        st['step'], st['tokens'] = st['step'] + 1, st['tokens'] + batch.tokens * env.world
        n_steps, tokens = n_steps + 1, tokens + batch.tokens * env.world
        # a line every log_interval steps, and at least once a minute on one slow machine (not
        # under DDP: ranks' clocks could disagree on the step, and the all-reduces mismatch)
        if st['step'] % cfg['log_interval'] == 0 or st['step'] == 1 or (
                env.world == 1 and time.time() - t0 > 60):
            if env.world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            train_loss, dt, done = loss_sum.item() / n_steps, time.time() - t0, share_done()
            check_finite(train_loss, st['step'], env.log)
            eta = (time.time() - t_run) * (1 - done) / (done - done0) if done > done0 else None
            env.log(f"step {st['step']:>7}{'/' + str(cfg['max_iters']) if cfg['max_iters'] else ''} | "
                    f"epoch {batches.epoch + 1} {batches.progress:4.0%} | loss {train_loss:.3f} | "
                    f"lr {lr:.3g} | {1000 * dt / n_steps:6.1f} ms/step | {tokens / dt:8.0f} tok/s"
                    + (f" | eta {eta / 60:.1f} min" if eta is not None else ''))
            env.metrics(step=st['step'], tokens=st['tokens'], train_loss=train_loss, lr=lr,
                        tok_s=tokens / dt)
            t0, n_steps, tokens = time.time(), 0, 0
            loss_sum.zero_()
        if cfg['eval_interval'] and st['step'] % cfg['eval_interval'] == 0:
            evaluate_and_save()
        elif cfg['save_interval'] and st['step'] % cfg['save_interval'] == 0:
            save()
    for s, h in handlers.items():
        signal.signal(s, h)
    if not stop and st['evaluated'] != st['step']:
        evaluate_and_save()   # the steps since the last evaluation count too (best.pt may be them)
    else:
        save()
    out = Path(cfg['out_dir'])
    if stop:
        env.log(f"interrupted at step {st['step']}: " + (
            f"{out / 'ckpt.pt'} written; python train.py --resume {out} continues the run"
            if cfg['save'] else "nothing written (--save False)"))
        raise SystemExit(128 + stop[0])   # 130 for Ctrl-C, 143 for SIGTERM, as the shell has it

    # ---- the final evaluation: of averaged checkpoints, else of the best validated weights
    if cfg['avg_last'] and cfg['save']:
        import nmt
        paths = sorted(out.glob('ckpt[0-9]*.pt'), key=lambda p: int(p.stem[4:]))[-cfg['avg_last']:]
        model.load_state_dict(nmt.average_checkpoints(paths))
        env.log(f"averaged {len(paths)} checkpoints: {[p.name for p in paths]}")
    elif cfg['save'] and (out / 'best.pt').exists():
        model.load_state_dict(checkpoint.load(out / 'best.pt')['model'])
    else:
        avg.swap()
    res = E.final(cfg, env, model, corpus, eval_batches, st['step'])
    env.log(f"wrote {', '.join(str(p) for pat in checkpoint.RUN_FILES for p in sorted(out.glob(pat)))}")
    return res


def check_finite(loss, step, log):
    if not math.isfinite(loss):
        log(f"error: the loss is {loss} at step {step}; stopped. The last good checkpoint is "
            f"kept: resume from it with a lower --lr or --grad-clip.")
        raise SystemExit(2)


# ------------------------------------------------------------------------------ other entries

def eval_only(cfg, env):
    ck = checkpoint.load(cfg['resume'])
    model = build.trained(ck, cfg, env)
    corpus, _, _, eval_batches = build.data(cfg, env)
    return E.final(cfg, env, model, corpus, eval_batches, ck['train']['step'])


def count_only(cfg):
    v = cfg['vocab_size']
    if v is None:
        sys.exit("error: --count-params needs --vocab-size (presets carry it)")
    if cfg['model'] == 'nmt':
        v = (v, v) if isinstance(v, int) else tuple(v)
    torch.manual_seed(cfg['seed'])
    with torch.device('meta'):                  # shapes only: no memory, no time
        return build.print_params(build.model(cfg, v))


def main(argv=None):
    cfg = get_config(sys.argv[1:] if argv is None else argv)
    if cfg['count_params']:
        return count_only(cfg)
    env = setup(cfg)
    env.log('settings: ' + ' '.join(f'{k}={v!r}' for k, v in cfg.items() if v != DEFAULTS[k]))
    try:
        return eval_only(cfg, env) if cfg['eval_only'] else train(cfg, env)
    finally:
        if env.world > 1:
            dist.destroy_process_group()


if __name__ == '__main__':
    settings.run(main, "interrupted: checkpoints already written are intact (they are written "
                       "whole or not at all)",
                 "; checkpoints already written are intact. Lower --batch-size or --bptt (language "
                 "models) or --max-tokens (translation), or keep the batch with --micro-batch / "
                 "--batch-tokens")
