"""Speed and memory of a training step on synthetic tokens, for any model and embedding.

    python bench.py --config wt103_txl_base --compile True        # one line: tok/s, ms, MFU, memory
    python bench.py --config ptb_awd_lstm --embed define
    python bench.py --what io                                     # the input path alone (DeFINE)
    torchrun --standalone --nproc_per_node=2 bench.py --config wt103_txl_base   # DDP, per-GPU batch
    python bench.py --config wt103_txl_base --profile True        # + where the GPU time goes

Settings are train.py's (presets and --key value), plus --steps, --warmup-steps, --what and
--profile (after the timing, three steps under torch.profiler: GPU time per step by kernel
class, the top kernels and the idle gaps). The step is train.py's: the batch comes from the
host, the speed machinery is fast.py's (CUDA graphs by default, --compile), the gradients
are clipped and the optimizer steps.
Tokens are drawn from a Zipf distribution over the vocabulary (rank r with probability
~ 1/r), so adaptive-softmax clusters and DeFINE's distinct-token count look like real text.
MFU counts 6 x (non-embedding parameters) per token plus attention (fwd + bwd, full
attention matrices) against PEAK_FLOPS; the output softmax and embeddings are not counted.
Translation also prints MFU on the count of nanoGPT, Megatron and Chinchilla: every matrix
multiply, the output layer included, forward and backward (nmt_matmul_flops, its parts).
"""
import argparse
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import build
import fast
import train
from define import TokenIO, count_params

PEAK_FLOPS = 790e12   # bf16 dense matmul measured on the H100/H200 machines (device/KINDS.md)


def zipf(V, shape, device, gen=None):
    p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    return torch.multinomial((p / p.sum()).float(), int(torch.tensor(shape).prod()), True,
                             generator=gen).view(shape).to(device)


def flops_per_token(cfg, model):
    """6 N (non-embedding) + attention, forward and backward."""
    c = count_params(model)
    n = c['context'] + (0 if cfg['dedup'] else c['define'])
    f = 6 * n
    if cfg['model'] == 'txl':
        klen = cfg['bptt'] + cfg['mem_len']
        f += 3 * 3 * 2 * cfg['n_layer'] * cfg['n_head'] * cfg['d_head'] * klen   # QK, QR, AV
    return f


def nmt_matmul_flops(cfg, B, S, T, V):
    """Every matrix multiply of one translation step, forward (2 FLOPs a multiply-add) and
    backward (twice that): B sentence pairs, S source and T target positions, V target words,
    a full softmax tied to a d-wide table (the standard embedding). -> dict(layers=,
    attention=, output=) in FLOPs; tests/test_bench.py checks it against torch's counter."""
    d, f = cfg['d_model'], cfg['d_ff']
    enc = S * (4 * d * d + 2 * d * f)                 # q, k, v, out projections; feed-forward
    dec = T * (4 * d * d + 2 * d * d + 2 * d * f) + S * 2 * d * d   # self, cross (q, out; k, v)
    att_enc, att_dec = 2 * S * S * d, 2 * T * T * d + 2 * T * S * d   # scores and weighted sums
    macs = dict(layers=cfg['enc_layers'] * enc + cfg['dec_layers'] * dec,
                attention=cfg['enc_layers'] * att_enc + cfg['dec_layers'] * att_dec,
                output=T * d * V)
    return {k: 6 * B * v for k, v in macs.items()}


def timed(step, steps, warmup, device):
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


KERNEL_CLASSES = [   # (class, substrings of CUDA kernel names), first match wins
    ('matmul', ('gemm', 'nvjet', 'cutlass', 'sm90_xmma', 'cublas', 'splitk')),
    ('attention', ('flash', 'fmha', 'attention', 'efficient')),
    ('rnn (cuDNN)', ('rnn', 'lstm', 'persist', 'cudnn')),
    ('compiled (triton)', ('triton',)),
    ('copy / cast', ('copy', 'cat', 'pad', 'cast', 'memcpy', 'memset', 'fill')),
    ('optimizer', ('multi_tensor', 'foreach', 'adam', 'sgd', 'lerp')),
    ('reduce / softmax / norm', ('reduce', 'softmax', 'norm', 'nll', 'cross_entropy', 'sum')),
]


def profile_steps(step, log, n=3, top=16):
    """GPU kernel time per step, grouped by KERNEL_CLASSES, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    groups = {}
    for e in ev:
        name = e.key.lower()
        cls = next((c for c, keys in KERNEL_CLASSES if any(k in name for k in keys)), 'elementwise / other')
        groups[cls] = groups.get(cls, 0.0) + e.self_device_time_total / n / 1000
    total = sum(groups.values())
    log(f"profile | wall {1000 * wall:.2f} ms/step (under the profiler) | GPU kernels {total:.2f} ms/step")
    for cls, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        log(f"  {cls:<26} {ms:8.2f} ms  {100 * ms / max(total, 1e-9):5.1f}%")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:top]:
        log(f"    {e.self_device_time_total / n / 1000:7.3f} ms x{e.count // n:<4} {e.key[:90]}")
    # idle GPU time: the gaps between kernels (all streams merged), and the widest ones with
    # the kernels on either side (a host sync, a launch-bound stretch, the optimizer's loop)
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps, (end, last) = [], spans[0][1:] if spans else (0, '')
    for s, e, name in spans[1:]:
        if s > end:
            gaps.append((s - end, last, name))
        if e > end:
            end, last = e, name
    idle = sum(g for g, _, _ in gaps) / n / 1000
    log(f"  idle between kernels {idle:.2f} ms/step in {len(gaps) // n} gaps; the widest:")
    for g, a, b in sorted(gaps, reverse=True)[:6]:
        log(f"    {g / 1000:7.3f} ms after {a[:45]} before {b[:45]}")


def bench_model(cfg, env, steps, warmup, prof=False):
    dev, world = env.device, env.world
    torch.manual_seed(cfg['seed'])
    V = cfg['vocab_size']
    if cfg['model'] == 'nmt':
        V = tuple(V) if isinstance(V, (list, tuple)) else (V, V)
    model = build.model(cfg, V).to(dev)
    opt = train.make_optimizer(cfg, model, fused=dev.type == 'cuda')
    train.set_lr(opt, train.lr_at(cfg, max(cfg['warmup'] - 1, 0), 0))   # the schedule's peak
    ddp = DDP(model, device_ids=[env.local_rank] if dev.type == 'cuda' else None) if world > 1 else model
    fwd = fast.compiled(ddp, model) if cfg['compile'] else ddp
    g = torch.Generator().manual_seed(cfg['seed'] + env.rank)
    if cfg['model'] == 'nmt':   # sentences of 25 tokens + </s> filling max_tokens per micro-batch
        L = 25
        B = cfg['max_tokens'] // (L + 2)
        data = [(zipf(V[0] - 4, (B, L + 1), 'cpu', g) + 4, zipf(V[1] - 4, (B, L + 2), 'cpu', g) + 4)]
        S, T = L + 1, L + 1                    # encoder positions, decoder positions
        tokens = B * (S + T)
        # each source token passes the encoder, each target token the decoder (~half the
        # context parameters each); attention: encoder self, decoder self, cross
        flops = (6 * count_params(model)['context'] * B * T
                 + 12 * cfg['enc_layers'] * cfg['d_model'] * B * (S * S + T * T + S * T))
        parts = nmt_matmul_flops(cfg, B, S, T, V[1])
    else:
        B, T = cfg['batch_size'] // world, cfg['bptt']
        data = [(d[:-1], d[1:]) for d in (zipf(V, (T + 1, B), 'cpu', g) for _ in range(4))]
        tokens = B * T
        flops = flops_per_token(cfg, model) * tokens
        parts = None
    if dev.type == 'cuda':                  # page-locked host batches, as train.py's
        data = [(x.pin_memory(), y.pin_memory()) for x, y in data]
    graphed = fast.graphed_step(model, env, 1, cfg['compile'], (T, B)) if cfg['cuda_graphs'] else None
    state, it = [None], [0]
    if cfg['model'] != 'nmt':               # carried state from the start: one compiled graph
        with torch.no_grad(), env.ctx:
            state[0] = model(*(t.to(dev) for t in data[0]), None)[1]

    def step():                             # train.py's step and optimizer update
        x, y = data[it[0] % len(data)]
        if graphed is not None:
            _, state[0] = graphed(x, y, state[0])
        else:
            _, state[0] = train.forward_backward(fwd, x, y, state[0], env)
        if cfg['grad_clip']:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
        opt.step()
        opt.zero_grad(set_to_none=True)
        it[0] += 1

    dt = timed(step, steps, warmup, dev)
    # peak memory of the timed steps, read before the profiler runs: what tensors held, which
    # misses what a CUDA graph's replay uses inside its pool, and what the allocator reserved
    cuda = dev.type == 'cuda'
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float('nan')
    reserved = torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else float('nan')
    if prof and cuda:
        profile_steps(step, env.log)
    with torch.no_grad(), env.ctx:          # eager: no extra compiled graph
        model.eval()
        loss = model(*(t.to(dev) for t in data[0]), state[0])[0]
    tok_s = tokens * world / dt
    mfu = flops / dt / PEAK_FLOPS if dev.type == 'cuda' else float('nan')
    env.log(f"bench | {cfg['config'] or cfg['model']} embed={cfg['embed']} n={cfg['n']} "
            f"compile={cfg['compile']}{' graphs' if graphed else ''} ranks={world} | "
            f"{tok_s:10.0f} tok/s | {1000 * dt:7.2f} ms/step | "
            f"MFU {100 * mfu:5.1f}% | peak {mem:6.2f} GiB, reserved {reserved:6.2f} GiB | "
            f"loss {loss.item():.3f} (finite: {bool(torch.isfinite(loss))})")
    if parts is not None:
        all_mm = sum(parts.values())
        assumed = '' if cfg['embed'] == 'standard' else '; standard output assumed'
        env.log(f"bench | every matmul: {all_mm / 1e12:.2f} TFLOP/step (layers "
                f"{parts['layers'] / 1e12:.2f}, attention {parts['attention'] / 1e12:.2f}, output "
                f"{parts['output'] / 1e12:.2f}{assumed})"
                f" | MFU {100 * mfu * all_mm / flops:5.1f}% (above: 6N + attention, "
                f"{flops / 1e12:.2f} TFLOP/step)")
    return tok_s


def bench_io(env, steps, warmup):
    """The input path alone (fwd + bwd): DeFINE against the projective embedding
    on a 60 x 150 Zipf batch over WikiText-103's vocabulary, dedup on/off, and the cache."""
    dev, V, C = env.device, 267_735, [20000, 40000, 200000]
    ids = [zipf(V, (150, 60), dev) for _ in range(4)]
    rows = []
    cases = [('projective n=128 d=384', dict(kind='projective', n=128)),
             ('define n=128 k=4096 m=384 N=3', dict(kind='define', n=128, dedup=False)),
             ('define ... dedup', dict(kind='define', n=128, dedup=True))]
    for name, kw in cases:
        kind = kw.pop('kind')
        io = TokenIO(kind, V, 384, cutoffs=C, k=4096, m=384, depth=3, **kw).to(dev)
        grad = torch.randn(150, 60, 384, device=dev)
        it = [0]

        def step():
            with env.ctx:
                y = io.embed(ids[it[0] % 4])
            (y.float() * grad).sum().backward()
            it[0] += 1

        rows.append((name, 1000 * timed(step, steps, warmup, dev)))
    io.eval()
    io.cache()
    table = torch.nn.Embedding(V, 384).to(dev)
    for name, fn in [('cache lookup (V x 384)', lambda i: io.embed(i)),
                     ('nn.Embedding (V x 384)', lambda i: table(i))]:
        with torch.no_grad():
            rows.append((name, 1000 * timed(lambda: fn(ids[0]), steps, warmup, dev)))
    uniq = torch.unique(ids[0]).numel()
    env.log(f"input path, 60 x 150 Zipf ids over V={V} ({uniq} distinct in a batch)")
    for name, ms in rows:
        env.log(f"  {name:<34} {ms:8.3f} ms  ({'fwd' if 'look' in name or 'nn.' in name else 'fwd+bwd'})")


def parse(argv):
    """bench's own flags -> args; the rest are train.py's settings -> cfg."""
    ap = argparse.ArgumentParser(prog='bench.py', add_help=False, allow_abbrev=False)
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--warmup-steps', type=int, default=5)
    ap.add_argument('--what', choices=('model', 'io'), default='model')
    ap.add_argument('--profile', type=lambda v: v.lower() in ('1', 'true', 'yes'), default=False)
    args, rest = ap.parse_known_args(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        ap.error('--steps must be at least 1 and --warmup-steps at least 0')
    return train.get_config(rest), args


def main(argv=None):
    cfg, args = parse(sys.argv[1:] if argv is None else argv)
    steps, warmup, what, prof = args.steps, args.warmup_steps, args.what, args.profile
    env = train.setup(dict(cfg, save=False))
    try:
        if what == 'io':
            bench_io(env, steps, warmup)
        else:
            bench_model(cfg, env, steps, warmup, prof)
    finally:
        if env.world > 1:
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
