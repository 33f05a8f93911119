"""Transformer-XL's relative attention as one FlexAttention call, against txl_lm.RelAttention
as --compile runs it: the same output and gradients, and the time of one layer's attention
forward and backward at the base model's shapes (wt103_txl_base: batch 60, 150 queries, 150
memory positions, 10 heads of 41, d_model 410). A probe for the speed issue, not used by
train.py: the explicit attention takes about 8 ms of the base step's 42 on an H100 (PERF.md).

    python experiments/flex_probe.py                 # on the GPU machine: a table last
    python experiments/flex_probe.py --device cpu --batch 2 --queries 6 --memory 5 --d-model 32 --heads 2

The position term (b) + (d) = (q + v)^T W_{k,R} R is computed against every distance as in
RelAttention, and the score_mod reads it at the shifted column (rel_shift as an index), adds
it to (a) + (c) = (q + u)^T k, and hides the masked keys, so that the scores are never
written out. The table gives the wall time of one call (forward and backward of the layer's
attention with its projections) and its GPU kernel time, the number that counts inside the
graphed step. Needs dropatt = 0 (FlexAttention has no attention dropout), as the base model
has. On a CPU, torch's FlexAttention has no backward: there the probe checks the forward only.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import fast  # noqa: E402
from txl_lm import RelAttention  # noqa: E402


class FlexRelAttention(nn.Module):
    """RelAttention's function (its own parameters) with the scores inside FlexAttention."""

    def __init__(self, att):
        super().__init__()
        if att.dropatt:
            raise ValueError("FlexAttention has no attention dropout: dropatt must be 0")
        self.att = att

    def forward(self, x, c, pos, r_w_bias, r_r_bias, mask):
        from torch.nn.attention.flex_attention import flex_attention
        a = self.att
        B, Q, _ = x.shape
        K, H, D = c.size(1), a.n_head, a.d_head
        w = a.qkv.weight
        q = F.linear(x, w[:H * D]).view(B, Q, H, D).transpose(1, 2)               # (B, H, Q, D)
        k, v = F.linear(c, w[H * D:]).view(B, K, 2, H, D).permute(2, 0, 3, 1, 4)  # (B, H, K, D)
        r = F.linear(pos, a.r_net.weight).view(K, H, D).permute(1, 2, 0)          # (H, D, K)
        bd = (q + r_r_bias.to(q.dtype)[:, None]) @ r    # (B, H, Q, K) against distances K-1..0

        def score(s, b, h, i, j):   # s = (q_i + u)^T k_j * scale
            pos_term = bd[b, h, i, (j + Q - 1 - i).clamp(0, K - 1)]   # rel_shift as an index
            return torch.where(mask[i, j], -float('inf'), s + pos_term * a.scale)

        o = flex_attention(q + r_w_bias.to(q.dtype)[:, None], k, v, score_mod=score, scale=a.scale)
        return a.drop(a.o_net(o.to(x.dtype).transpose(1, 2).reshape(B, Q, H * D)))


def inputs(args, device, g):
    B, Q, M, d = args.batch, args.queries, args.memory, args.d_model
    K = Q + M
    x = torch.randn(B, Q, d, device=device, generator=g)
    c = torch.cat([torch.randn(B, M, d, device=device, generator=g), x], 1)
    pos = torch.randn(K, d, device=device, generator=g)
    u, v = (torch.randn(args.heads, args.d_head, device=device, generator=g) for _ in range(2))
    mask = torch.triu(torch.ones(Q, K, dtype=torch.bool, device=device), diagonal=1 + M)
    return x, c, pos, u, v, mask


def run(fn, params, inp, ctx, grad):
    """One forward (and backward against a fixed random cotangent): output, gradients."""
    x, c, *rest = inp
    x = x.clone().requires_grad_(grad)
    with ctx, torch.set_grad_enabled(grad):
        out = fn(x, torch.cat([c[:, :-x.size(1)], x], 1), *rest)
    if not grad:
        return out.float(), []
    g = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(1))
    grads = torch.autograd.grad(out.float(), [x] + params, g)
    return out.float(), [t.float() for t in grads]


def kernel_ms(call, steps):
    """GPU kernel time per call (the wall time of one layer alone is the host's, not the GPU's)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            call()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA) / steps / 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--batch', type=int, default=60)
    ap.add_argument('--queries', type=int, default=150)
    ap.add_argument('--memory', type=int, default=150)
    ap.add_argument('--d-model', type=int, default=410)
    ap.add_argument('--heads', type=int, default=10)
    ap.add_argument('--d-head', type=int, default=41)
    ap.add_argument('--layers', type=int, default=16, help='the step has this many attentions')
    ap.add_argument('--steps', type=int, default=50)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    att = RelAttention(args.d_model, args.heads, args.d_head, 0.0, 0.0).to(dev)
    params = list(att.parameters())
    inp = inputs(args, dev, torch.Generator(dev).manual_seed(0))
    cuda = dev.type == 'cuda'
    ctx = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else torch.autocast('cpu', enabled=False)
    variants = {'explicit': fast.compiled(att, att), 'flex': fast.compiled(FlexRelAttention(att), att)}
    if not cuda:   # FlexAttention's CPU path has no backward: check the forward, eager too
        variants['flex eager'] = FlexRelAttention(att)
    want = None
    print(f"{'variant':<12} {'wall ms':>10} {'kernel ms':>10} {'x layers':>9} {'peak GiB':>9} "
          f"{'out diff':>9} {'grad diff':>9}")
    for name, fn in variants.items():
        t0 = time.time()
        out, grads = run(fn, params, inp, ctx, cuda)    # compiles
        compile_s = time.time() - t0
        if want is None:
            want = (out, grads)
        scale = want[0].abs().max().item()
        diff = (out - want[0]).abs().max().item() / scale
        gdiff = max([((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                     for a, b in zip(grads, want[1])], default=float('nan'))
        ms = peak = kernels = float('nan')
        if cuda:
            for _ in range(3):
                run(fn, params, inp, ctx, True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run(fn, params, inp, ctx, True)
            torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t0) / args.steps
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            kernels = kernel_ms(lambda: run(fn, params, inp, ctx, True), args.steps)
        print(f"{name:<12} {ms:10.3f} {kernels:10.3f} {kernels * args.layers:9.2f} {peak:9.2f} "
              f"{diff:9.2e} {gdiff:9.2e}"
              f"   (first call {compile_s:.0f} s)", flush=True)


if __name__ == '__main__':
    main()
