"""define.py against independent oracles: dense block-diagonal matrices, the paper's
parameter formulas, torch.nn.AdaptiveLogSoftmaxWithLoss, naive per-token loops."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT
from define import (KINDS, VARIANTS, WORD_KINDS, AdaptiveInput, AdaptiveSoftmax, CharCNN,
                    DeFINE, GroupLinear, TokenIO, count_params)

WT103_V, WT103_CUTOFFS = 267_735, [20000, 40000, 200000]


# ---------------------------------------------------------------- group linear transform

@pytest.mark.parametrize("d_in,d_out,g", [(12, 8, 4), (16, 32, 2), (6, 9, 3), (5, 7, 1)])
def test_group_linear_equals_block_diagonal_dense(d_in, d_out, g):
    glt = GroupLinear(d_in, d_out, g).double()
    with torch.no_grad():
        glt.bias.normal_()
    dense = nn.Linear(d_in, d_out).double()
    with torch.no_grad():   # the oracle: a (d_out, d_in) matrix, zero off the diagonal blocks
        dense.weight.zero_()
        a, b = d_in // g, d_out // g
        for j in range(g):
            dense.weight[j * b:(j + 1) * b, j * a:(j + 1) * a] = glt.weight[j].t()
        dense.bias.copy_(glt.bias)
    x = torch.randn(3, 5, d_in, dtype=torch.double, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = glt(x), dense(x2)
    torch.testing.assert_close(y, y2)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(glt.bias.grad, dense.bias.grad)
    for j in range(g):   # the weight gradient is the dense one's diagonal blocks
        torch.testing.assert_close(glt.weight.grad[j],
                                   dense.weight.grad[j * b:(j + 1) * b, j * a:(j + 1) * a].t())
    # grouped input (..., g, d_in/g), as DeFINE's split-and-mix feeds it: the same function
    torch.testing.assert_close(glt(x.detach().unflatten(-1, (g, -1)), grouped=True),
                               y2.detach().unflatten(-1, (g, -1)))


def test_group_linear_rejects_indivisible_widths():
    with pytest.raises(ValueError, match="divisible by groups=4"):
        GroupLinear(10, 8, 4)


# ---------------------------------------------------------------- the DeFINE unit

def test_split_and_mix_routes_chunk_j_to_group_j():
    n, k, m, depth, g_max = 16, 64, 8, 3, 4
    unit = DeFINE(n, k, m, depth, g_max).double().eval()
    seen = {}
    layer2 = unit.layers[1]
    g = layer2.glt.groups                       # 2 groups in layer 2
    k1 = unit.layers_plan[0][1]                 # width of layer 1's output
    layer2.glt.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    for j in range(g):
        # previous output and input both zero except chunk j (forced through a hook)
        h = torch.zeros(1, k1, dtype=torch.double)
        h[0, j * k1 // g:(j + 1) * k1 // g] = torch.randn(k1 // g, dtype=torch.double)
        e = torch.zeros(1, n, dtype=torch.double)
        e[0, j * n // g:(j + 1) * n // g] = torch.randn(n // g, dtype=torch.double)
        handle = unit.layers[0].register_forward_hook(lambda mod, args, out: h.clone())
        unit(e)
        handle.remove()
        x = seen['x']                            # (1, g, (k1 + n) / g), as group j sees it
        assert x.shape == (1, g, (k1 + n) // g)
        for jj in range(g):
            want_h = h[0, jj * k1 // g:(jj + 1) * k1 // g]
            want_e = e[0, jj * n // g:(jj + 1) * n // g]
            torch.testing.assert_close(x[0, jj], torch.cat([want_h, want_e]))
            assert (x[0, jj].abs().sum() > 0) == (jj == j)


def _paper_widths(n, k, depth):   # exact cases only: k_l = n + l (k - n) / N
    assert (k - n) % depth == 0
    return [n + l * (k - n) // depth for l in range(1, depth + 1)]


@pytest.mark.parametrize("n,k,m,depth,g_max", [
    (128, 1024, 400, 7, 4), (64, 512, 256, 4, 4), (64, 512, 256, 4, 8),
    (256, 1024, 256, 3, 4), (128, 3200, 384, 3, 16), (32, 64, 32, 1, 2)])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != 'define_delight'])
def test_unit_parameter_count_matches_formula(n, k, m, depth, g_max, variant):
    unit = DeFINE(n, k, m, depth, g_max, variant=variant)
    if variant == 'lt':
        groups = [1] * depth
    elif variant.startswith('glt'):
        groups = [g_max] * depth
    else:
        groups = [max(g_max // 2 ** (l - 1), 1) for l in range(1, depth + 1)]
    widths = [k // 2] * depth if variant == 'hgt_residual' else _paper_widths(n, k, depth)
    skip = variant.startswith('define')
    # P = sum_l d_in_l * k_l / g_l + k * m (weights), d_in_1 = n, d_in_l = k_{l-1} (+ n with skip)
    weights = sum((n if l == 0 else widths[l - 1] + (n if skip else 0)) * widths[l] // groups[l]
                  for l in range(depth))
    if variant != 'define_noreduce':
        weights += widths[-1] * m
    extra = sum(2 * w + w for w in widths)      # GLT bias + LayerNorm weight and bias
    extra += 0 if variant == 'define_noreduce' else m   # Reduce bias
    assert sum(p.numel() for p in unit.parameters()) == weights + extra
    assert [w for _, w, _ in unit.layers_plan] == widths
    assert [g for _, _, g in unit.layers_plan] == groups


def test_widths_round_up_to_the_groups_that_touch_them():
    plan = DeFINE.plan(96, 1000, 3, g_max=8)    # k_l = 397.3, 698.7 -> multiples of 8 and 4
    assert [w for _, w, _ in plan] == [400, 700, 1000]
    assert [g for _, _, g in plan] == [8, 4, 2]


def test_default_unit_is_nonlinear_and_linear_without_norm_and_act():
    torch.set_default_dtype(torch.double)
    try:
        a, b = torch.randn(4, 16), torch.randn(4, 16)
        z = torch.zeros(1, 16)
        f = DeFINE(16, 64, 16, 3).eval()
        assert (f(a) + f(b) - f(a + b) - f(z)).abs().max() > 1e-3
        lin = DeFINE(16, 64, 16, 3, norm=False, act=None).eval()
        torch.testing.assert_close(lin(a) + lin(b), lin(a + b) + lin(z))
    finally:
        torch.set_default_dtype(torch.float)


@pytest.mark.parametrize("variant", ['define', 'define_delight'])
@pytest.mark.parametrize("act", ['gelu', 'relu', None])
def test_unit_without_norm_keeps_the_token_spread_at_init(act, variant):
    # without LayerNorm the init must carry the table's variation across tokens through all
    # layers (nn.Linear's range let a depth-7 unit shrink it ~18x: 0.088 -> 0.005 on PTB), and
    # define_delight must not scale the map by sqrt(n) then (11x here; under SGD at lr 30 the
    # PTB model's unit then collapsed to one vector for every token)
    torch.manual_seed(0)
    e = torch.randn(4096, 128) * 128 ** -0.5               # rows of a table, std n^-1/2
    unit = DeFINE(128, 1024, 400, 7, g_max=4, variant=variant, norm=False, act=act).eval()
    with torch.no_grad():
        ratio = unit(e).std(0).mean() / e.std(0).mean()
    assert 0.5 < ratio < 2, f"spread across tokens changed {ratio:.3f}x through the unit"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains(variant):
    unit = DeFINE(16, 64, 16, 3, g_max=4, variant=variant, dropout=0.1)
    x, target = torch.randn(32, 16), torch.randn(32, unit.d_out)
    opt = torch.optim.Adam(unit.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(unit(x), target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unit.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=10, k=64, m=8, depth=3, g_max=4), "n=10 is not divisible"),
    (dict(n=16, k=64, m=8, depth=0), "depth=0"),
    (dict(n=64, k=32, m=8, depth=2), "k=32 < n=64"),
    (dict(n=16, k=66, m=8, depth=1, g_max=4), "k=66 is not divisible"),
    (dict(n=16, k=64, m=8, depth=2, variant='dense'), "variant='dense' unknown"),
    (dict(n=16, k=64, m=8, depth=2, act='tanh'), "act='tanh' unknown"),
    (dict(n=16, k=64, m=12, depth=3, variant='define_delight'), r"m // 2 = 6 is not divisible"),
    (dict(n=16, k=64, m=16, depth=1, variant='define_delight'), "depth >= 2"),
])
def test_bad_unit_configurations_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeFINE(**kwargs)


# ---------------------------------------------------------------- the authors' later unit

def _delight_oracle(unit, e):
    """define_delight written out with the unit's weights: a loop over groups, plain matmuls,
    LayerNorm (when the unit has it; then the map is scaled by sqrt(n)) and GELU by formula.
    e: (N, n) float64 -> (N, m)."""
    norm = isinstance(unit.layers[0].norm, torch.nn.LayerNorm)
    def chunks(v, g):
        c = v.shape[-1] // g
        return [v[:, j * c:(j + 1) * c] for j in range(g)]

    def layer(block, pieces):          # pieces[j]: what group j sees, (N, d_in / g)
        w, b = block.glt.weight, block.glt.bias          # (g, d_in/g, d_out/g), (d_out,)
        c, outs = w.shape[2], []
        for j, p in enumerate(pieces):
            y = p @ w[j] + b[j * c:(j + 1) * c]
            if norm:
                y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(
                    y.var(-1, unbiased=False, keepdim=True) + 1e-5)
                y = y * block.norm.weight + block.norm.bias  # one (d_out/g,) affine for all groups
            outs.append(0.5 * y * (1 + torch.erf(y / 2 ** 0.5)))
        return torch.cat(outs, -1)

    x = layer(unit.layers[0], [e * e.shape[-1] ** 0.5 if norm else e])   # dense input, n -> m/2
    h = layer(unit.layers[1], chunks(x, unit.layers[1].glt.weight.shape[0]))
    for block in unit.layers[2:]:                        # group j: [x_j, h_j]
        g = block.glt.weight.shape[0]
        h = layer(block, [torch.cat([xj, hj], -1) for xj, hj in zip(chunks(x, g), chunks(h, g))])
    return h


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("n,k,m,depth,g_max", [
    (16, 96, 32, 4, 4), (32, 256, 64, 5, 16), (16, 128, 24, 7, 4), (8, 40, 16, 2, 2)])
def test_delight_equals_per_group_loop(n, k, m, depth, g_max, norm):
    unit = DeFINE(n, k, m, depth, g_max, variant='define_delight', norm=norm).double().eval()
    with torch.no_grad():   # zero biases and unit affines at init would hide their mistakes
        for p in unit.parameters():
            p.normal_(0, 0.5)
    assert len(unit.layers) == depth + 2
    e = torch.randn(2, 3, n, dtype=torch.double)
    y = unit(e)
    assert y.shape == (2, 3, m)
    torch.testing.assert_close(y.reshape(-1, m), _delight_oracle(unit, e.reshape(-1, n)))


def _counting_groups(depth, g_max):   # 1, 2, 4, ... while <= g_max, then from 1 again; reversed
    seq, g = [], 1
    while len(seq) < depth:
        seq.append(g)
        g = 2 * g if 2 * g <= g_max else 1
    return seq[::-1]


@pytest.mark.parametrize("depth,g_max,groups", [
    (7, 4, [1, 4, 2, 1, 4, 2, 1]), (3, 4, [4, 2, 1]), (4, 4, [1, 4, 2, 1]),
    (5, 8, [1, 8, 4, 2, 1]), (6, 2, [2, 1, 2, 1, 2, 1]), (5, 6, [2, 1, 4, 2, 1]),
    (2, 1, [1, 1]), (11, 4, [2, 1, 4, 2, 1, 4, 2, 1, 4, 2, 1])])
def test_delight_group_schedule(depth, g_max, groups):
    assert _counting_groups(depth, g_max) == groups
    plan = DeFINE.plan(64, 1024, depth, g_max, 'define_delight', m=128)
    assert [g for _, _, g in plan] == [1] + groups + [1]   # dense input and output layers


@pytest.mark.parametrize("args,want", [
    ((128, 1024, 7, 4, 400), [(128, 200, 1), (200, 344, 1), (544, 480, 4), (680, 616, 2),
                              (816, 752, 1), (952, 888, 4), (1088, 1024, 2), (1224, 400, 1),
                              (600, 400, 1)]),                      # PTB: n 128, k 1024, N 7
    ((128, 4096, 3, 4, 384), [(128, 192, 1), (192, 2144, 4), (2336, 4096, 2), (4288, 384, 1),
                              (576, 384, 1)]),                      # Transformer-XL, WT-103
    ((32, 256, 5, 16, 64), [(32, 32, 1), (32, 96, 16), (128, 144, 8), (176, 200, 4),
                            (232, 256, 2), (288, 64, 1), (96, 64, 1)])])
def test_delight_plan_and_parameter_count(args, want):
    n, k, depth, g_max, m = args
    unit = DeFINE(n, k, m, depth, g_max, variant='define_delight')
    assert unit.layers_plan == want and unit.d_out == m
    # per layer: weights d_in d_out / g, bias d_out, one LayerNorm of d_out / g for all groups
    assert sum(p.numel() for p in unit.parameters()) == sum(
        i * o // g + o + 2 * o // g for i, o, g in want)


@pytest.mark.parametrize("n,k,m", [(128, 1024, 400), (128, 4096, 384), (256, 1024, 256),
                                   (64, 1000, 96), (96, 200, 128)])
def test_delight_plan_follows_the_authors_rule(n, k, m):
    # widths: np.linspace(m/2, k, N)[1:] truncated to int, each rounded up to a multiple of
    # max(its groups, the next layer's, 8); the last group layer maps to m
    h = m // 2
    for depth in range(2, 13):
        for g_max in (1, 2, 3, 4, 8, 16):
            groups = _counting_groups(depth, g_max)
            if any(h % g for g in groups):
                with pytest.raises(ValueError, match="not divisible"):
                    DeFINE.plan(n, k, depth, g_max, 'define_delight', m)
                continue
            lin = np.linspace(h, k, depth).astype(int).tolist()[1:]
            step = [max(groups[i], groups[i + 1], 8) for i in range(depth - 1)]
            widths = [-(-w // s) * s for w, s in zip(lin, step)] + [m]
            ins = [h] + [w + h for w in widths[:-1]]
            want = [(n, h, 1)] + list(zip(ins, widths, groups)) + [(h + m, m, 1)]
            assert DeFINE.plan(n, k, depth, g_max, 'define_delight', m) == want, (depth, g_max)


# ---------------------------------------------------------------- maps and outputs

def test_adaptive_input_equals_per_token_loop():
    inp = AdaptiveInput(100, 16, 12, cutoffs=[10, 40], factor=2).double()
    ids = torch.randint(0, 100, (7, 3))
    out = inp(ids)
    for t, i in enumerate(ids.flatten().tolist()):
        band = 0 if i < 10 else 1 if i < 40 else 2
        lo = [0, 10, 40][band]
        row = inp.tables[band][i - lo]
        want = row if inp.projs[band] is None else inp.projs[band] @ row
        torch.testing.assert_close(out.flatten(0, 1)[t], want)
    assert [t.shape[1] for t in inp.tables] == [16, 8, 4]


def test_embedding_dropout_drops_whole_rows():
    inp = AdaptiveInput(50, 8, 8)
    ids = torch.tensor([[3, 3, 5, 5, 7, 7]])
    y = inp(ids, drop=0.5)[0]
    for a, b in [(0, 1), (2, 3), (4, 5)]:   # the same token is dropped everywhere or nowhere
        torch.testing.assert_close(y[a], y[b])
    for t, i in enumerate(ids[0].tolist()):
        assert torch.allclose(y[t], 0 * y[t]) or torch.allclose(y[t], 2 * inp.tables[0][i])


def test_adaptive_softmax_matches_torch_adaptive_log_softmax():
    d, V, cutoffs = 32, 300, [20, 100]
    ref = nn.AdaptiveLogSoftmaxWithLoss(d, V, cutoffs, div_value=4.0, head_bias=False).double()
    # untied: a map used only as the holder of the output tables and projections
    inp = AdaptiveInput(V, d, d, cutoffs, factor=4).double()
    ours = AdaptiveSoftmax(inp, d, bias=False).double()
    with torch.no_grad():
        inp.tables[0].copy_(ref.head.weight[:20])
        ours.cluster.weight.copy_(ref.head.weight[20:])
        for i, tail in enumerate(ref.tail, 1):
            proj, out = tail[0], tail[1]          # Linear(d, d/4^i), Linear(d/4^i, V_i)
            inp.projs[i].copy_(proj.weight.t())  # ours is (d, w_i), used transposed
            inp.tables[i].copy_(out.weight)
    h = torch.randn(50, d, dtype=torch.double)
    target = torch.randint(0, V, (50,))
    target[:3] = torch.tensor([5, 50, 250])       # every cluster present
    torch.testing.assert_close(ours.log_probs(h, inp), ref.log_prob(h))
    torch.testing.assert_close(ours.loss(h, target, inp), ref(h, target).loss)


# 120 made-up words of 1..9 letters, some longer than the cap of 6 characters
WORDS = [''.join(chr(97 + (i * 7 + j * 3) % 26) for j in range(1 + i % 9)) for i in range(120)]


def _io(kind, **kw):
    args = dict(vocab_size=120, d_model=24, n=16, cutoffs=[10, 40], k=32, depth=2, g_max=2)
    if kind == 'standard':
        args['n'] = 24
    if kind == 'cnn':
        args.update(words=WORDS, char_dim=3, char_filters=((1, 4), (2, 6), (3, 6)), max_chars=6)
    args.update(kw)
    return TokenIO(kind, **args).double()


CONFIGS = [dict(), dict(cutoffs=[]), dict(d_hidden=8), dict(cutoffs=[], d_hidden=16),
           dict(factor=2), dict(embed_scale=3.0)]


@pytest.mark.parametrize("kind", KINDS + WORD_KINDS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_log_probs_normalised_and_loss_is_their_nll(kind, cfg):
    if kind == 'standard' and cfg.get('factor'):
        cfg = {}
    io = _io(kind, **cfg)
    with torch.no_grad():
        for p in io.out.parameters():   # zero-initialised cluster logits and biases: randomise
            p.normal_()
    h = torch.randn(6, 5, io.d_hidden, dtype=torch.double)
    y = torch.randint(0, 120, (6, 5))
    lp = io.log_probs(h)
    assert lp.shape == (6, 5, 120)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(6, 5, dtype=torch.double))
    nll = -lp.gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(io.loss(h, y, reduction='none'), nll.flatten())
    torch.testing.assert_close(io.loss(h, y), nll.mean())
    y[0, :2] = -100   # ignored positions count nowhere
    keep = y.flatten() != -100
    torch.testing.assert_close(io.loss(h, y, reduction='sum'), nll.flatten()[keep].sum())


@pytest.mark.parametrize("reduction", ['mean', 'sum', 'none'])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_full_softmax_loss_equals_cross_entropy_of_tied_logits(eps, reduction):
    """The full softmax's logits are h @ table^T + bias: its loss is torch's cross entropy
    of them (label smoothing, ignored targets), and so are the gradients."""
    io = _io('standard', cutoffs=[])
    with torch.no_grad():
        io.out.bias.normal_()
    h = torch.randn(4, 6, 24, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 120, (4, 6))
    y[0] = 7                                   # the ignored index, also a real class
    args = dict(ignore_index=7, label_smoothing=eps, reduction=reduction)
    got = io.loss(h, y, **args)
    logits = h @ io.map.tables[0].T + io.out.bias
    want = F.cross_entropy(logits.reshape(-1, 120), y.reshape(-1), **args)
    torch.testing.assert_close(got, want)
    params, g = [h, io.map.tables[0], io.out.bias], torch.randn_like(want, dtype=torch.double)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b)


def test_compiled_loss_equals_eager():
    """torch.compile of the tied output's loss (as fast.compiled runs it): the same loss and
    gradients as eager, for a full softmax with label smoothing and an adaptive softmax."""
    for io, eps in [(_io('standard', cutoffs=[]).float(), 0.1), (_io('define').float(), 0.0)]:
        with torch.no_grad():
            for p in io.out.parameters():
                p.normal_()
        h, y = torch.randn(5, 7, io.d_hidden), torch.randint(0, 120, (5, 7))
        y[0] = 3
        h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
        want = io.loss(h1, y, ignore_index=3, label_smoothing=eps)
        got = torch.compile(io.loss)(h2, y, ignore_index=3, label_smoothing=eps)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, h2)[0], torch.autograd.grad(want, h1)[0])


@pytest.mark.parametrize("kind", KINDS + WORD_KINDS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_cache_reproduces_embed_for_every_token(kind, cfg):
    if kind == 'standard' and cfg.get('factor'):
        cfg = {}
    io = _io(kind, unit_dropout=0.3, **cfg).float().eval()
    ids = torch.arange(120)
    want = io.embed(ids)
    info = io.cache()
    assert info['bytes'] == 120 * io.d_embed * 4
    assert (io.embed(ids) - want).abs().max() <= 1e-6
    io.train()                                   # training again drops the frozen table
    assert io.cached is None


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cutoffs", [[], [10, 40]])
def test_cache_reproduces_embed_for_every_variant(variant, cutoffs):
    io = _io('define', variant=variant, cutoffs=cutoffs, unit_dropout=0.3).float().eval()
    ids = torch.arange(120)
    want = io.embed(ids)
    assert io.cache()['bytes'] == 120 * io.d_embed * 4
    assert (io.embed(ids) - want).abs().max() <= 1e-6
    assert count_params(io)['define'] == sum(p.numel() for p in io.unit.parameters())


def test_cache_needs_eval_mode():
    with pytest.raises(RuntimeError, match="eval"):
        _io('define').cache()


@pytest.mark.parametrize("kind,cutoffs", [('define', []), ('define', [10, 40]), ('cnn', [])])
def test_dedup_is_the_same_function_and_gradient(kind, cutoffs):
    a = _io(kind, cutoffs=cutoffs)
    b = _io(kind, cutoffs=cutoffs, dedup=True)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 30, (9, 4))           # many repeats
    ya, yb = a.embed(ids), b.embed(ids)
    torch.testing.assert_close(ya, yb)
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None or pb.grad.abs().max() == 0, name
        else:
            torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_empty_tail_clusters_still_get_gradients():
    # DDP needs every parameter to take part in every step, even with no token in a cluster
    io = _io('adaptive')
    h = torch.randn(5, io.d_hidden, dtype=torch.double)
    io.loss(h, torch.tensor([1, 2, 3, 4, 5])).backward()   # head tokens only
    assert all(p.grad is not None for p in io.out.parameters())
    assert all(t.grad is not None for t in io.map.tables)


def test_noreduce_embeds_k_wide():
    io = _io('define', variant='define_noreduce')
    assert io.d_embed == 32 and io.embed(torch.tensor([1, 2])).shape == (2, 32)


def test_bad_tokenio_configurations_raise_value_error():
    with pytest.raises(ValueError, match="kind='dense' unknown"):
        TokenIO('dense', 100, 16)
    with pytest.raises(ValueError, match="standard embedding has n = d_model"):
        TokenIO('standard', 100, 16, n=8)
    with pytest.raises(ValueError, match="cutoffs"):
        TokenIO('adaptive', 100, 16, cutoffs=[50, 20])
    with pytest.raises(ValueError, match="too narrow"):
        TokenIO('adaptive', 100, 16, cutoffs=[10, 20, 30], factor=4)
    with pytest.raises(ValueError, match="label smoothing"):
        io = TokenIO('adaptive', 100, 16, cutoffs=[10])
        io.loss(torch.randn(2, 16), torch.tensor([1, 50]), label_smoothing=0.1)


# ---------------------------------------------------------------- the paper's I/O counts

@pytest.mark.parametrize("n,want", [(256, 9.25), (384, 13.90), (512, 18.55)])
@pytest.mark.parametrize("kind", ['adaptive', 'define'])
def test_lstm_wt103_io_counts(n, want, kind):
    io = TokenIO(kind, WT103_V, n, n=n, cutoffs=WT103_CUTOFFS, factor=4, k=1024, depth=3)
    c = count_params(io)
    assert round(c['io'] / 1e6, 2) == want
    assert (c['define'] > 0) == (kind == 'define')


@pytest.mark.parametrize("n,want", [(384, 103.08), (256, 69.20), (128, 34.73), (64, 17.50)])
@pytest.mark.parametrize("kind", ['projective', 'define'])
def test_txl_wt103_io_counts(n, want, kind):
    io = TokenIO(kind, WT103_V, 384, n=n, cutoffs=WT103_CUTOFFS, k=4096, depth=3, m=384)
    # V n + V (softmax bias) + 3 n + 3 (cluster logits) + 4 * 384 * n (projections, n != 384)
    exact = WT103_V * n + WT103_V + 3 * n + 3 + (4 * 384 * n if n != 384 else 0)
    assert count_params(io)['io'] == exact
    assert round(exact / 1e6, 2) == want


def test_txl_base_io_count():
    io = TokenIO('standard', WT103_V, 410, cutoffs=WT103_CUTOFFS)
    assert round(count_params(io)['io'] / 1e6, 2) == 110.04


def test_count_params_splits_a_model():
    io = _io('define')
    model = nn.ModuleDict(dict(io=io, rnn=nn.LSTM(24, 8)))
    c = count_params(model)
    assert c['define'] == sum(p.numel() for p in io.unit.parameters())
    assert c['context'] == sum(p.numel() for p in model['rnn'].parameters())
    assert c['total'] == c['define'] + c['io'] + c['context']


def test_docstring_example_runs_with_define_py_alone(tmp_path):
    shutil.copy(ROOT / "define.py", tmp_path / "define.py")
    r = subprocess.run([sys.executable, "-m", "doctest", "define.py"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_define_py_imports_torch_only():
    src = (ROOT / "define.py").read_text()
    imports = {line.split()[1].split('.')[0] for line in src.splitlines()
               if line.startswith(('import ', 'from '))}
    assert imports <= {'math', 'torch'}, imports


def test_input_only_token_io_embeds_and_refuses_to_predict():
    io = _io('define', output=False)
    assert io.out is None and io.embed(torch.tensor([[1, 50]])).shape == (1, 2, 24)
    assert count_params(io)['io'] < count_params(_io('define'))['io']
    with pytest.raises(RuntimeError, match="output=False"):
        io.loss(torch.randn(2, 24, dtype=torch.double), torch.tensor([1, 2]))


# ---------------------------------------------------------------- untied outputs (Baevski & Auli)

def _copy_torch_adaptive_softmax(ref, io):
    """ref's weights into an untied TokenIO's own tables: head = band 0 + cluster logits,
    tail i = Linear(d, d/4^i) (our band projection, transposed) then Linear(d/4^i, V_i)."""
    with torch.no_grad():
        c0 = io.out_map.bounds[1]
        io.out_map.tables[0].copy_(ref.head.weight[:c0])
        io.out.cluster.weight.copy_(ref.head.weight[c0:])
        for i, tail in enumerate(ref.tail, 1):
            io.out_map.projs[i].copy_(tail[0].weight.t())
            io.out_map.tables[i].copy_(tail[1].weight)


def _words(v):
    return [''.join(chr(97 + (i * 5 + j) % 26) for j in range(1 + i % 7)) + str(i) for i in range(v)]


@pytest.mark.parametrize("kind,kw", [('adaptive', {}),                     # ADP
                                     ('standard', dict(out_factor=4)),     # ASM
                                     ('cnn', dict(words=_words(300), char_filters=((1, 4), (2, 4))))])
def test_untied_adaptive_softmax_matches_torch_adaptive_log_softmax(kind, kw):
    d, V, cutoffs = 32, 300, [20, 100]
    io = TokenIO(kind, V, d, cutoffs=cutoffs, tied=False, out_bias=False, **kw).double()
    ref = nn.AdaptiveLogSoftmaxWithLoss(d, V, cutoffs, div_value=4.0, head_bias=False).double()
    _copy_torch_adaptive_softmax(ref, io)
    h = torch.randn(50, d, dtype=torch.double)
    target = torch.randint(0, V, (50,))
    target[:3] = torch.tensor([5, 50, 250])       # every cluster present
    torch.testing.assert_close(io.log_probs(h), ref.log_prob(h))
    torch.testing.assert_close(io.loss(h, target), ref(h, target).loss)


@pytest.mark.parametrize("reduction", ['mean', 'none'])
@pytest.mark.parametrize("kind", ['standard', 'projective'])
def test_untied_full_softmax_equals_cross_entropy_of_its_own_table(kind, reduction):
    io = _io(kind, cutoffs=[], tied=False)           # SM; projective: an n-wide table, n -> d
    with torch.no_grad():
        io.out.bias.normal_()
    h = torch.randn(4, 6, 24, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 120, (4, 6))
    got = io.loss(h, y, reduction=reduction)
    table, proj = io.out_map.tables[0], io.out_map.projs[0]
    logits = (h if proj is None else h @ proj) @ table.T + io.out.bias
    want = F.cross_entropy(logits.reshape(-1, 120), y.reshape(-1), reduction=reduction)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(io.log_probs(h), F.log_softmax(logits, -1))
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [h, table], g), torch.autograd.grad(want, [h, table], g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tied", [True, False])
def test_untied_output_neither_reads_nor_trains_the_input_tables(kind, tied):
    io = _io(kind, tied=tied)
    assert (io.out_map is None) == tied
    h = torch.randn(9, io.d_hidden, dtype=torch.double)
    y = torch.randint(0, 120, (9,))
    y[:3] = torch.tensor([1, 20, 100])              # every band present
    before = io.log_probs(h)
    with torch.no_grad():
        for t in io.map.tables:
            t.add_(torch.randn_like(t))
    assert torch.allclose(io.log_probs(h), before) != tied
    io.loss(h, y).backward()
    assert all(t.grad is None for t in io.map.tables) != tied
    if not tied:
        assert all(p.grad is not None for p in io.out_map.parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cutoffs", [[], [10, 40]])
def test_untied_count_adds_exactly_the_output_tables(kind, cutoffs):
    tied, untied = _io(kind, cutoffs=cutoffs), _io(kind, cutoffs=cutoffs, tied=False)
    n, factor = (24, 1) if kind == 'standard' else (16, 4 if kind == 'adaptive' else 1)
    d_map = 16 if kind == 'define' else 24
    bounds = [0] + cutoffs + [120]
    widths = [n // factor ** i for i in range(len(bounds) - 1)]
    own = sum((hi - lo) * w + (w * d_map if w != d_map else 0)    # table, band projection
              for lo, hi, w in zip(bounds, bounds[1:], widths))
    assert own == sum(p.numel() for p in untied.out_map.parameters())
    assert count_params(untied)['io'] - count_params(tied)['io'] == own


def test_asm_wt103_count():
    """Embedding input + untied adaptive softmax (bands d, d/4, d/16 over Baevski & Auli's
    cutoffs, no bias): every table and projection written out."""
    V, d, C = WT103_V, 1024, [20000, 60000]
    with torch.device('meta'):
        io = TokenIO('standard', V, d, cutoffs=C, tied=False, out_factor=4)
    want = (V * d                                                   # input table
            + 20000 * d + 40000 * 256 + (V - 60000) * 64            # output tables
            + 256 * d + 64 * d + 2 * d)                             # tail projections, clusters
    assert count_params(io)['io'] == want


def test_char_cnn_count_is_its_formula():
    """Baevski & Auli's CNN row at its defaults (char embedding 4, widths 1-7 with 1,408
    filters, 2 highway layers) over a word list, and its untied adaptive softmax (bands d,
    d/4, no bias): every weight written out."""
    words = ['the', 'cat', 'sat', 'on', 'a', 'mat'] * 20
    words = [w + str(i) for i, w in enumerate(words)]              # 120 distinct words
    V, d, C = len(words), 32, [40]
    io = TokenIO('cnn', V, d, cutoffs=C, words=words)
    chars = len(set(''.join(words))) + 3                            # + pad, begin, end
    F_ = sum(f for _, f in CharCNN.FILTERS)
    assert F_ == 1408
    want = (chars * 4                                               # character embedding
            + sum(f * 4 * w + f for w, f in CharCNN.FILTERS)        # convolutions
            + 2 * (F_ * 2 * F_ + 2 * F_)                            # highway: transform, gate
            + F_ * d + d                                            # projection to d
            + 40 * d + (V - 40) * (d // 4) + (d // 4) * d          # output tables, tail projection
            + d * 1)                                                # the cluster logit, no bias
    assert count_params(io)['io'] == want and count_params(io)['define'] == 0


def test_untied_and_cnn_configurations_raise_value_error():
    with pytest.raises(ValueError, match="pass words="):
        TokenIO('cnn', 4, 8)
    with pytest.raises(ValueError, match="pass words="):
        TokenIO('cnn', 4, 8, words=['a', 'b'])
    with pytest.raises(ValueError, match="no table to tie"):
        TokenIO('cnn', 2, 8, words=['a', 'b'], tied=True)
    with pytest.raises(ValueError, match="tied=False"):
        TokenIO('standard', 100, 8, cutoffs=[10], out_factor=4)


# ---------------------------------------------------------------- character CNN (Kim et al.)

def _cnn_oracle(cnn, words, cap):
    """Per word, written out: spell it (0 pad, 1 begin, 2 end, 3.. the sorted characters of
    the cut words), zero-pad to the longest, every window of every filter, ReLU, max over
    time, highway layers (rows [:F] transform, [F:] gate), the projection."""
    alphabet = sorted(set(''.join(w[:cap] for w in words)))
    rows = [[1] + [3 + alphabet.index(c) for c in w[:cap]] + [2] for w in words]
    L = max(max(map(len, rows)), max(conv.kernel_size[0] for conv in cnn.convs))
    out = []
    for row in rows:
        E = torch.cat([cnn.char_emb.weight[row], cnn.char_emb.weight.new_zeros(L - len(row),
                                                                              cnn.char_emb.weight.shape[1])])
        feats = []
        for conv in cnn.convs:
            W, b, w = conv.weight, conv.bias, conv.kernel_size[0]      # W: (f, c, w)
            windows = [(W * E[t:t + w].T).sum((1, 2)) + b for t in range(L - w + 1)]
            feats.append(torch.stack(windows).relu().max(0).values)
        y = torch.cat(feats)
        for hw in cnn.highway:
            f = y.numel()
            h = torch.relu(hw.weight[:f] @ y + hw.bias[:f])
            t = torch.sigmoid(hw.weight[f:] @ y + hw.bias[f:])
            y = t * h + (1 - t) * y
        out.append(cnn.proj.weight @ y + cnn.proj.bias)
    return torch.stack(out)


def test_char_cnn_equals_per_word_loop():
    words = ['the', 'a', 'cat', 'supercalifragilistic', '<unk>', 'é', 'cats', 'x']
    io = TokenIO('cnn', len(words), 7, words=words, char_dim=5, char_filters=((1, 3), (2, 4), (4, 5)),
                 char_highway=2, max_chars=8).double()
    with torch.no_grad():                           # biases away from their init constants
        for p in io.map.parameters():
            p.add_(0.3 * torch.randn_like(p))
        io.map.char_emb.weight[0] = 0               # the pad row stays zero (padding_idx)
    want = _cnn_oracle(io.map, words, 8)
    torch.testing.assert_close(io.map(torch.arange(len(words))), want)
    ids = torch.randint(0, len(words), (5, 3))      # (T, B)
    torch.testing.assert_close(io.embed(ids), want[ids])


def test_char_cnn_cuts_words_at_max_chars():
    words = ['abcdefghij', 'abcdefghXY', 'abcdefgXij', 'ab']
    cnn = CharCNN(words, 6, char_dim=3, filters=((1, 2), (3, 2)), max_chars=8).double()
    assert cnn.chars.shape == (4, 8 + 2)           # begin + 8 characters + end
    y = cnn(torch.arange(4))
    torch.testing.assert_close(y[0], y[1])          # they differ only after character 8
    assert not torch.allclose(y[0], y[2])           # character 8 differs


@pytest.mark.parametrize("kind,kw", [('cnn', {}), ('cnn', dict(cutoffs=[])),
                                     ('standard', dict(cutoffs=[], tied=False)),
                                     ('standard', dict(tied=False, out_factor=4)),
                                     ('adaptive', dict(tied=False)), ('define', dict(tied=False))])
def test_tiny_model_trains(kind, kw):
    io = _io(kind, **kw).float()
    ctx = nn.Linear(io.d_embed, io.d_hidden)        # a bigram model
    opt = torch.optim.Adam([*io.parameters(), *ctx.parameters()], lr=1e-2)
    ids = torch.randint(0, 120, (16, 4))
    losses = []
    for _ in range(40):
        loss = io.loss(torch.tanh(ctx(io.embed(ids[:-1], drop=0.1))), ids[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::10]


def test_map_dropout_drops_the_maps_output_before_the_unit():
    # oracle: the unit applied by hand to the map's output, dropped out with the same seed
    # (no dedup: one draw per position)
    io = _io('define', cutoffs=[], map_dropout=0.5, dedup=False)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.manual_seed(7)
    got = io.embed(ids)
    torch.manual_seed(7)
    e = io.map(ids, 0.0)
    want = io.unit(F.dropout(e, 0.5, True))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, io.unit(e))   # it did drop something
    io.eval()
    torch.testing.assert_close(io.embed(ids), io.unit(io.map(ids, 0.0)))   # off in eval
