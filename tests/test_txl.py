"""txl_lm.py against independent oracles: a naive loop over the four terms of Dai et al.'s
relative attention score, the full forward over concatenated segments (the equivalent
attention mask of segment recurrence), and a real WikiText-2 slice to overfit."""
import math

import pytest
import torch

from define import TokenIO
from txl_lm import TransformerXL, rel_shift

F64 = torch.float64


def tiny(kind='standard', V=50, d=16, n_layer=2, n_head=2, d_head=5, dropout=0.0, **kw):
    """A tiny float64 model; d_head = 5 is odd on purpose."""
    io_kw = {k: kw.pop(k) for k in ('n', 'cutoffs', 'k', 'depth', 'g_max', 'dedup') if k in kw}
    io = TokenIO(kind, V, d, **io_kw)
    return TransformerXL(io, n_layer=n_layer, n_head=n_head, d_head=d_head, d_inner=24,
                         dropout=dropout, **kw).double()


# ---------------------------------------------------------------- relative attention

def sinusoid(dist, d):
    """The oracle's own position code: [sin(dist f_0..f_{d/2-1}), cos(...)], f_k = 1e4^(-2k/d)."""
    f = [10000 ** (-2 * k / d) for k in range(d // 2)]
    return torch.tensor([math.sin(dist * fk) for fk in f] + [math.cos(dist * fk) for fk in f],
                        dtype=F64)


def naive_attention(attn, x, mem, u, v, mem_len, clamp_len, same_length):
    """Loop over batch, head, query i, key j; the four terms of the score written out.
    x (B, Q, d) this segment's layer input; mem (B, M, d) the memory of that layer."""
    x, mem, u, v = x.detach(), mem.detach(), u.detach(), v.detach()
    B, Q, d = x.shape
    M, H, D = mem.size(1), attn.n_head, attn.d_head
    K = M + Q
    c = torch.cat([mem, x], 1)
    W = attn.qkv.weight
    Wq, Wk, Wv = W[:H * D], W[H * D:2 * H * D], W[2 * H * D:]
    WR, Wo = attn.r_net.weight, attn.o_net.weight
    mask_len = K - mem_len     # the published same_length rule, as written there
    shift = Q - mask_len if mask_len > 0 else Q
    out = torch.zeros(B, Q, H * D, dtype=F64)
    for b in range(B):
        for h in range(H):
            hs = slice(h * D, (h + 1) * D)
            for i in range(Q):
                q_i = Wq[hs] @ x[b, i]
                scores, values = [], []
                for j in range(K):
                    hidden = j > i + M or (same_length and j <= i - shift)
                    dist = i + M - j
                    if clamp_len > 0:
                        dist = min(dist, clamp_len)
                    k_j, r_ij = Wk[hs] @ c[b, j], WR[hs] @ sinusoid(dist, d)
                    a, bb, cc, dd = q_i @ k_j, q_i @ r_ij, u[h] @ k_j, v[h] @ r_ij
                    scores.append(-math.inf if hidden else float(a + bb + cc + dd) / math.sqrt(D))
                    values.append(Wv[hs] @ c[b, j])
                p = torch.softmax(torch.tensor(scores, dtype=F64), 0)
                out[b, i, hs] = sum(p[j] * values[j] for j in range(K))
    return out @ Wo.t()


@pytest.mark.parametrize("mem_len,clamp_len,same_length", [
    (7, -1, False),      # plain causal mask over memory + segment
    (6, -1, True),       # same_length with mem_len < klen: a sliding window of 6 keys
    (3, -1, True),       # a window narrower than the segment
    (7, 3, False),       # distances clamped below klen
    (6, 4, True)])
def test_relative_attention_equals_naive_four_terms(mem_len, clamp_len, same_length):
    B, Q, M, d = 2, 5, 7, 16
    model = tiny(n_layer=1, d=d, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length).eval()
    attn = model.layers[0].attn
    with torch.no_grad():   # scores of order 1 (not the near-uniform init), u and v non-zero
        for p in [*attn.parameters(), model.r_w_bias, model.r_r_bias]:
            p.normal_(0, 0.25)
    got = {}
    attn.register_forward_hook(lambda mod, args, out: got.update(out=out))
    ids = torch.randint(0, 50, (Q, B))
    mems = [torch.randn(M, B, d, dtype=F64) for _ in range(2)]
    model(ids, mems=mems)
    x = model.io.embed(ids).transpose(0, 1)          # (B, Q, d)
    with torch.no_grad():
        want = naive_attention(attn, x, mems[0].transpose(0, 1), model.r_w_bias, model.r_r_bias,
                               mem_len, clamp_len, same_length)
    torch.testing.assert_close(got['out'], want)


def test_rel_shift_moves_distance_columns_into_key_columns():
    Q, K = 4, 9
    x = torch.randn(2, Q, K, dtype=F64)
    y = rel_shift(x)
    for i in range(Q):
        for j in range(K - Q + i + 1):           # every visible key
            assert y[1, i, j] == x[1, i, j + Q - 1 - i]


# ---------------------------------------------------------------- segment recurrence

@pytest.mark.parametrize("pre_norm", [False, True])
def test_recurrence_equals_full_forward_over_concatenation(pre_norm):
    model = tiny(pre_norm=pre_norm, mem_len=100).eval()
    lens, B = (6, 5, 4), 3
    ids = torch.randint(0, 50, (sum(lens), B))
    mems, outs = None, []
    for seg in ids.split(lens):
        h, mems = model(seg, mems=mems)
        outs.append(h)
    model.mem_len = 0
    full, empty = model(ids)
    assert all(m.shape == (0, B, 16) for m in empty)
    # segments 2 and 3 attend to all of the previous ones and causally to themselves
    torch.testing.assert_close(torch.cat(outs), full)


def test_memory_window_equals_full_forward_with_same_length():
    """With memory mem_len (= T) and same_length, every query sees exactly mem_len keys:
    the same as a full forward with a sliding window of mem_len keys."""
    T, B = 4, 2
    model = tiny(mem_len=T, same_length=True).eval()
    ids = torch.randint(0, 50, (3 * T, B))
    mems, outs = None, []
    for seg in ids.split(T):
        h, mems = model(seg, mems=mems)
        outs.append(h)
    full, _ = model(ids)    # klen = 3T > mem_len: a window of T keys for every query
    torch.testing.assert_close(torch.cat(outs), full)


# ---------------------------------------------------------------- memory

def test_memory_shapes_content_and_mem_len_attribute():
    B, T, M, d = 3, 5, 4, 16
    model = tiny(n_layer=3).eval()
    ids = torch.randint(0, 50, (T, B))
    mems = [torch.randn(M, B, d, dtype=F64) for _ in range(4)]
    outs = {}
    for mem_len in (0, 2, 7, 9, 100):
        model.mem_len = mem_len
        h, new = model(ids, mems=mems)
        assert len(new) == 4
        assert all(m.shape == (min(mem_len, M + T), B, d) and m.dtype == F64 for m in new)
        outs[mem_len] = (h, new)
    h, new = outs[100]
    for mem_len, (h2, new2) in outs.items():
        torch.testing.assert_close(h2, h, rtol=0, atol=0)     # mem_len only trims the memory
        for a, b in zip(new2, new):
            torch.testing.assert_close(a, b[len(b) - len(a):], rtol=0, atol=0)
    # content: the older memory, then this segment's layer inputs; the first is the
    # scaled embedding, the last the last layer's output (= the hidden state, post-norm)
    for a, b in zip(new, mems):
        torch.testing.assert_close(a[:M], b)
    torch.testing.assert_close(new[0][M:], model.io.embed(ids))
    torch.testing.assert_close(new[-1][M:], h)
    # zero-length memory and None are the same thing
    model.mem_len = 3
    h0, new0 = model(ids, mems=[torch.zeros(0, B, d, dtype=F64)] * 4)
    h1, new1 = model(ids)
    assert model.init_mems() is None
    torch.testing.assert_close(h0, h1)
    assert all(a.shape == (3, B, d) for a in new0 + new1)


def test_embed_then_trunk_is_the_forward():
    # the seam fast.GraphedTrunk cuts at: forward = loss(trunk(embed(ids)))
    model = tiny('define', V=60, n=8, k=16, depth=2, cutoffs=[10, 30], dedup=True).eval()
    ids, y = torch.randint(0, 60, (2, 5, 3))
    _, mems = model(ids)
    h, new = model.trunk(model.embed(ids), mems)
    loss, new2 = model(ids, y, mems)
    torch.testing.assert_close(model.io.loss(h, y.t()), loss, rtol=0, atol=0)
    for a, b in zip(new, new2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_memory_is_detached():
    model = tiny(dropout=0.1).train()
    ids = torch.randint(0, 50, (10, 2))
    fired = []

    def watch(name):   # a tensor hook on layer 0's output of each segment
        def hook(mod, args, out):
            out.register_hook(lambda g: fired.append(name))
        return hook

    handle = model.layers[0].register_forward_hook(watch('segment 1'))
    _, mems = model(ids[:5], ids[1:6])
    handle.remove()
    assert all(not m.requires_grad and m.grad_fn is None for m in mems)
    model.layers[0].register_forward_hook(watch('segment 2'))
    loss, _ = model(ids[5:9], ids[6:10], mems)
    loss.backward()
    assert fired == ['segment 2']     # the gradient stops at the segment boundary


def test_compiled_equals_eager_and_keeps_memory_detached():
    """torch.compile from an empty memory, three segments with backward, adaptive softmax:
    the losses of eager, and the memory never requires grad
    (compiled, the first memory came back attached to the graph until it was detached
    explicitly, and the third backward failed)."""
    torch.manual_seed(0)
    io = TokenIO('projective', 500, 32, n=32, cutoffs=[50, 200])
    model = TransformerXL(io, n_layer=2, n_head=2, d_head=16, d_inner=64, mem_len=8, dropout=0.0)
    fast = torch.compile(model)
    ids = torch.randint(0, 500, (9, 4, 3))
    me = mc = None
    for i in range(3):
        x, y = ids[:8, :, i], ids[1:, :, i]
        le, me = model(x, y, me)
        lc, mc = fast(x, y, mc)
        assert not any(m.requires_grad for m in mc)
        torch.testing.assert_close(lc, le)
        le.backward()
        lc.backward()


def test_bf16_autocast_memory_dtype_and_finite():
    model = tiny(same_length=True, mem_len=6, dropout=0.1).float()
    ids = torch.randint(0, 50, (12, 3))
    model.eval()
    ref, _ = model(ids[6:], ids[6:], model(ids[:6])[1])
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, mems = model(ids[:6], ids[1:7])
        loss, mems = model(ids[6:11], ids[7:12], mems)
    assert all(m.dtype == torch.bfloat16 for m in mems)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, _ = model(ids[6:], ids[6:], model(ids[:6])[1])
    assert abs(got.item() - ref.item()) < 0.05 * ref.item()


def test_same_length_never_empties_a_row():
    model = tiny(same_length=True, mem_len=0).eval()   # the published mask would be empty
    h, mems = model(torch.randint(0, 50, (5, 2)))
    assert torch.isfinite(h).all() and mems[0].shape == (0, 2, 16)


# ---------------------------------------------------------------- embeddings, init, errors

@pytest.mark.parametrize("kind,kw", [
    ('standard', {}),
    ('projective', dict(n=8, cutoffs=[20, 35])),
    ('adaptive', dict(n=16, cutoffs=[20, 35])),
    ('define', dict(n=8, k=32, depth=2, g_max=2))])
def test_every_token_io_kind_trains(kind, kw):
    model = tiny(kind, dropout=0.1, dropatt=0.1, mem_len=4,
                 pre_norm=kind == 'define', **kw).train()
    ids = torch.arange(50).roll(7).view(10, 5)    # every band of the vocabulary appears
    loss1, mems = model(ids[:5], ids[1:6])
    loss2, _ = model(ids[5:9], ids[6:10], mems)
    assert torch.isfinite(loss1) and torch.isfinite(loss2)
    (loss1 + loss2).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_init_as_published_and_token_io_untouched():
    torch.manual_seed(1)
    io = TokenIO('projective', 100, 64, n=32)
    before = {k: v.clone() for k, v in io.state_dict().items()}
    model = TransformerXL(io, n_layer=2, n_head=4, d_head=16, d_inner=256)
    for k, v in io.state_dict().items():
        assert torch.equal(v, before[k]), k
    attn, ff, ln = model.layers[0].attn, model.layers[0].ff, model.layers[1].ln2
    for w in (attn.qkv.weight, attn.r_net.weight, ff[0].weight, model.r_w_bias):
        assert abs(w.std().item() - 0.02) < 0.004 and abs(w.mean().item()) < 0.004
    assert torch.equal(ff[0].bias, torch.zeros(256)) and torch.equal(ln.bias, torch.zeros(64))
    assert abs(ln.weight.mean().item() - 1) < 0.01 and 0.01 < ln.weight.std().item() < 0.03


@pytest.mark.parametrize("io_kw,kw,match", [
    (dict(kind='define', n=16, variant='define_noreduce', k=64), {}, "d_embed"),
    (dict(d_hidden=16), {}, "d_hidden"),
    (dict(d_model=33), {}, "even"),
    ({}, dict(n_head=0), "n_head"),
    ({}, dict(d_head=0), "d_head"),
    ({}, dict(mem_len=-1), "mem_len")])
def test_rejects_what_does_not_fit(io_kw, kw, match):
    io_kw = dict(dict(kind='standard', vocab_size=50, d_model=32), **io_kw)
    with pytest.raises(ValueError, match=match):
        TransformerXL(TokenIO(**io_kw), n_layer=1, **kw)


def test_rejects_memory_of_the_wrong_depth():
    model = tiny()
    with pytest.raises(ValueError, match="n_layer \\+ 1"):
        model(torch.zeros(3, 2, dtype=torch.long), mems=[torch.zeros(1, 2, 16, dtype=F64)] * 2)


# ---------------------------------------------------------------- real data

def test_overfits_a_wikitext2_slice(data_root):
    tokens = []
    with open(data_root / 'wikitext-2' / 'train.txt', encoding='utf-8') as f:
        for line in f:
            tokens += line.split() + ['<eos>']
            if len(tokens) >= 2000:
                break
    vocab = {w: i for i, w in enumerate(sorted(set(tokens)))}
    data = torch.tensor([vocab[w] for w in tokens])
    B, T = 10, 50
    data = data[:len(data) // B * B].view(B, -1).t()          # (L, B) streams, time-major
    model = TransformerXL(TokenIO('standard', len(vocab), 64), n_layer=2, n_head=4, d_head=16,
                          d_inner=128, dropout=0.0, mem_len=T)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)      # tiny ops: one thread is fastest, and immune to a busy CPU
    try:
        for epoch in range(30):   # 4 segments of (T, B) per epoch, the memory carried along
            mems = None
            for s in range(0, len(data) - T, T):
                loss, mems = model(data[s:s + T], data[s + 1:s + 1 + T], mems)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 120 and losses[0] > 0.9 * math.log(len(vocab))
    assert sum(losses[-5:]) / 5 < 0.5 * math.log(len(vocab)), losses[-5:]
