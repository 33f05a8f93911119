"""Speed and memory of a training step on synthetic tokens, for any model and embedding.

    python bench.py --config wt103_txl_base --compile True        # one line: tok/s, ms, MFU, memory
    python bench.py --config ptb_awd_lstm --embed define
    python bench.py --what io                                     # the input path alone (DeFINE)
    python bench.py --config ptb_awd_lstm --what graphs           # CUDA-graph step == eager step (also wt2_txl)
    torchrun --standalone --nproc_per_node=2 bench.py --config wt103_txl_base   # DDP, per-GPU batch
    python bench.py --config wt103_txl_base --profile True        # + where the GPU time goes

Settings are train.py's (presets and --key value), plus --steps, --warmup-steps, --what and
--profile (after the timing, three steps under torch.profiler: GPU time per step by kernel
class and the top kernels). The Transformer-XL's layers replay as CUDA graphs, as in train.py
(train.GraphedTrunk; `--cuda-graphs False` without); under torchrun each GPU replays its own
and the gradients are averaged after the backward (train.reduce_grads).
Tokens are drawn from a Zipf distribution over the vocabulary (rank r with probability
~ 1/r), so adaptive-softmax clusters and DeFINE's distinct-token count look like real text.
MFU counts 6 x (non-embedding parameters) per token plus attention (fwd + bwd, full
attention matrices) against PEAK_FLOPS; the output softmax and embeddings are not counted.
"""
import sys
import time
import torch

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
    dev, world = env['device'], env['world']
    torch.manual_seed(cfg['seed'])
    if cfg['model'] == 'nmt':
        V = cfg['vocab_size'] if isinstance(cfg['vocab_size'], list) else [cfg['vocab_size']] * 2
        model = train.build_model(cfg, tuple(V)).to(dev)
    else:
        V = cfg['vocab_size']
        model = train.build_model(cfg, V).to(dev)
    opt = train.make_optimizer(cfg, model, fused=dev.type == 'cuda')
    train.set_lr(opt, train.lr_at(cfg, max(cfg['warmup'] - 1, 0), 0))   # the schedule's peak
    net = train.LossOf(model) if cfg['model'] == 'nmt' else model
    trunk_graphs = train.GraphedTrunk.wanted(cfg, dev, world)
    hooks = train.ddp_hooks(cfg, world, trunk_graphs)
    if hooks:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[env['local_rank']])
    elif world > 1:
        train.broadcast_params(model)
    fwd = train.compiled(net, model) if cfg['compile'] else net
    g = torch.Generator().manual_seed(cfg['seed'] + env['rank'])
    if cfg['model'] == 'nmt':   # sentences of 20-30 tokens filling max_tokens per micro-batch
        L = 25
        B = cfg['max_tokens'] // (L + 2)
        src = zipf(V[0] - 4, (B, L + 1), dev, g) + 4
        tgt = zipf(V[1] - 4, (B, L + 2), dev, g) + 4
        S, T = L + 1, L + 1                    # encoder positions, decoder positions
        tokens, state = B * (S + T), None
        # each source token passes the encoder, each target token the decoder (~half the
        # context parameters each); attention: encoder self, decoder self, cross
        flops = (6 * count_params(model)['context'] * B * T
                 + 12 * cfg['enc_layers'] * cfg['d_model'] * B * (S * S + T * T + S * T))
    else:
        B, T = cfg['batch_size'] // world, cfg['bptt']
        data = [zipf(V, (T + 1, B), dev, g) for _ in range(4)]
        tokens, state = B * T, [None]
        flops = flops_per_token(cfg, model) * tokens
        with torch.no_grad(), env['ctx']:   # carried state from the start: one compiled graph
            state[0] = train.lm_forward(model, data[0][:-1], data[0][1:], None)[2]
    it = [0]
    graphed = None
    if train.GraphedLMStep.wanted(cfg, dev, world):   # as train.py does
        graphed = train.GraphedLMStep(model, env['ctx'], cfg['grad_clip'])
    host = None
    if trunk_graphs:   # as train.py: the step's syncs taken on a host copy, every step
        fwd = graphed = train.GraphedTrunk(model, env['ctx'], cfg['compile'], data[0][:-1])
        host = [d.cpu() for d in data]

    def step():
        if isinstance(graphed, train.GraphedLMStep):
            d = data[it[0] % len(data)]
            _, state[0] = graphed(d[:-1], d[1:], state[0])
            opt.step()
            it[0] += 1
            return
        with env['ctx']:
            if cfg['model'] == 'nmt':
                loss_sum, n = fwd(src, tgt, label_smoothing=cfg['label_smoothing'])
                loss = loss_sum / n
            else:
                i = it[0] % len(data)
                d = data[i]
                hints = train.lm_hints(model, host[i][:-1], host[i][1:], dev) if host else {}
                loss, _, state[0] = train.lm_forward(fwd, d[:-1], d[1:], state[0], **hints)
        loss.backward()
        if world > 1 and not hooks:
            train.reduce_grads(model.parameters(), world)
        if cfg['grad_clip']:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
        opt.step()
        opt.zero_grad(set_to_none=True)
        it[0] += 1

    dt = timed(step, steps, warmup, dev)
    # peak memory of the timed steps, read before the profiler runs
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == 'cuda' else float('nan')
    if prof and dev.type == 'cuda':
        profile_steps(step, env['log'])
    with torch.no_grad(), env['ctx']:          # eager: no extra compiled graph
        if cfg['model'] == 'nmt':
            loss_sum, n = model.loss(src, tgt)
            loss = loss_sum / n
        else:
            loss = train.lm_forward(model, data[0][:-1], data[0][1:], state[0])[1]
    tok_s = tokens * world / dt
    mfu = flops / dt / PEAK_FLOPS if dev.type == 'cuda' else float('nan')
    env['log'](f"bench | {cfg['config'] or cfg['model']} embed={cfg['embed']} n={cfg['n']} "
               f"compile={cfg['compile']}{' graphs' if graphed else ''} ranks={world} | "
               f"{tok_s:10.0f} tok/s | {1000 * dt:7.2f} ms/step | "
               f"MFU {100 * mfu:5.1f}% | peak {mem:6.2f} GiB | loss {loss.item():.3f} (finite: "
               f"{bool(torch.isfinite(loss))})")
    return tok_s


def check_graphs(cfg, env):
    """GPU check of train.GraphedLMStep: the AWD-LSTM trained for a few steps of varying
    length (dropouts off, float32) eagerly and by graph replays must end with equal weights."""
    import copy
    from contextlib import nullcontext
    if env['device'].type != 'cuda':
        sys.exit("error: --what graphs checks CUDA graphs and needs a GPU")
    if cfg['model'] == 'txl':
        return check_trunk_graphs(cfg, env)
    cfg = dict(cfg, dropout=0, dropouth=0, dropouti=0, dropoute=0, wdrop=0)
    torch.manual_seed(cfg['seed'])
    a = train.build_model(cfg, cfg['vocab_size']).to(env['device'])
    b = copy.deepcopy(a)
    oa, ob = (torch.optim.SGD(m.parameters(), lr=cfg['lr']) for m in (a, b))
    graphed = train.GraphedLMStep(b, nullcontext(), cfg['grad_clip'])
    ids = torch.randint(0, cfg['vocab_size'], (400, cfg['batch_size']), device=env['device'])
    sa = sb = None
    pos = 0
    for T in [70, 65, 70, 35, 70, 65]:
        x, y = ids[pos:pos + T], ids[pos + 1:pos + T + 1]
        pos += T
        loss, _, sa = train.lm_forward(a, x, y, sa)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(a.parameters(), cfg['grad_clip'])
        oa.step()
        oa.zero_grad(set_to_none=True)
        _, sb = graphed(x, y, sb)
        ob.step()
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    env['log'](f"graphs | {len(graphed.graphs)} CUDA graphs, 6 steps: max |eager - graphed| "
               f"weight difference {diff:.3e} ({'PASS' if diff < 1e-5 else 'FAIL'})")


def check_trunk_graphs(cfg, env):
    """GPU check of train.GraphedTrunk: Transformer-XL trained for a few segments with memory
    (dropouts off, float32, SGD), eagerly and with the trunk replayed, must give equal losses
    and end with equal weights. A short segment in the middle takes the plain path."""
    import copy
    from contextlib import nullcontext
    cfg = dict(cfg, dropout=0, dropatt=0)
    torch.manual_seed(cfg['seed'])
    a = train.build_model(cfg, cfg['vocab_size']).to(env['device'])
    b = copy.deepcopy(a)
    oa, ob = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    T, B = cfg['bptt'], cfg['batch_size']
    fill = -(-cfg['mem_len'] // T)           # segments until the memory is full: then replays
    lengths = [T] * (fill + 2) + [T // 2, T, T]
    ids = zipf(cfg['vocab_size'], (sum(lengths) + 1, B), env['device'], torch.Generator().manual_seed(0))
    graphed = train.GraphedTrunk(b, nullcontext(), False, ids[:T])
    mems, pos, worst = [None, None], 0, 0.0
    for t in lengths:
        x, y = ids[pos:pos + t], ids[pos + 1:pos + t + 1]
        pos += t
        losses = []
        for i, (fwd, opt) in enumerate(((a, oa), (graphed, ob))):
            loss, mems[i] = fwd(x, y, mems[i])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        worst = max(worst, abs(losses[0] - losses[1]))
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    ok = diff < 1e-4 and worst < 1e-4
    env['log'](f"graphs | Transformer-XL trunk, {len(lengths)} segments (one short): max |loss difference| "
               f"{worst:.3e}, max |weight difference| {diff:.3e} ({'PASS' if ok else 'FAIL'})")
    # dropout on (and compiled with --compile True): every replay must draw fresh masks
    cfg = dict(cfg, dropout=0.1, dropatt=0.1)
    torch.manual_seed(cfg['seed'])
    c = train.build_model(cfg, cfg['vocab_size']).to(env['device'])
    g = train.GraphedTrunk(c, env['ctx'], cfg['compile'], ids[:T])
    mems = None
    with torch.no_grad(), env['ctx']:
        while mems is None or mems[0].size(0) < c.mem_len:
            mems = c(ids[:T], ids[1:T + 1], mems)[1]
    losses = []
    for _ in range(2):
        loss, _ = g(ids[:T], ids[1:T + 1], mems)
        loss.backward()
        losses.append(loss.item())
    env['log'](f"graphs | dropout 0.1{' compiled' if cfg['compile'] else ''}: two replays of one "
               f"segment: losses {losses[0]:.6f} {losses[1]:.6f} "
               f"({'PASS: fresh masks' if losses[0] != losses[1] else 'FAIL: the same masks'})")


def bench_io(env, steps, warmup):
    """Issue-2 measurement: the input path (fwd + bwd) of DeFINE vs the projective embedding
    on a 60 x 150 Zipf batch over WikiText-103's vocabulary, dedup on/off, and the cache."""
    dev, V, C = env['device'], 267_735, [20000, 40000, 200000]
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
            with env['ctx']:
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
    env['log'](f"input path, 60 x 150 Zipf ids over V={V} ({uniq} distinct in a batch)")
    for name, ms in rows:
        env['log'](f"  {name:<34} {ms:8.3f} ms  ({'fwd' if 'look' in name or 'nn.' in name else 'fwd+bwd'})")


def main():
    argv, steps, warmup, what, prof = list(sys.argv[1:]), 20, 5, 'model', False
    for flag in ('--steps', '--warmup-steps', '--what', '--profile'):
        if flag in argv:
            i = argv.index(flag)
            val = argv[i + 1]
            del argv[i:i + 2]
            if flag == '--steps':
                steps = int(val)
            elif flag == '--warmup-steps':
                warmup = int(val)
            elif flag == '--profile':
                prof = val.lower() in ('1', 'true', 'yes')
            else:
                what = val
    cfg = train.get_config(argv)
    env = train.setup(dict(cfg, save=False))
    try:
        if what == 'io':
            bench_io(env, steps, warmup)
        elif what == 'graphs':
            check_graphs(cfg, env)
        else:
            bench_model(cfg, env, steps, warmup, prof)
    finally:
        if env['world'] > 1:
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
