"""figures.py's wiring against the real module: a finite-difference Jacobian of DeFINE's forward
(float64, GELU and bias kept, hooks on its layers), and the group counts of DeFINE.plan.
wiring(...)[l]['inputs'] maps a source ('e', or an earlier layer's index) to a (G_src, g_l) matrix."""
import math
import sys

import pytest
import torch

from define import VARIANTS, DeFINE, TokenIO
import figures
from figures import receptive, wiring

N, K, DEPTH, G_MAX, M = 8, 32, 3, 4, 16   # M: define_delight's m (m/2 splits in 4)


def outputs(unit, e, fixed=None, add=None):
    """Every layer module's output in the real forward; those of layers in `fixed` replaced,
    add=(j, d) adds d to layer j's output (so whatever forward does with it sees the change)."""
    out = []

    def hook(mod, args, y):
        i = len(out)
        y = (fixed or {}).get(i, y)
        y = y + add[1] if add is not None and add[0] == i else y
        out.append(y)
        return y
    handles = [layer.register_forward_hook(hook) for layer in unit.layers]
    try:
        unit(e)
    finally:
        for h in handles:
            h.remove()
    return out


def groups_of(mask, n_in, n_out):   # (d_out, d_in) features -> (n_in, n_out), by loops
    d_out, d_in = mask.shape
    a, b = d_in // n_in, d_out // n_out
    return torch.tensor([[bool(mask[j * b:(j + 1) * b, i * a:(i + 1) * a].any()) for j in range(n_out)]
                         for i in range(n_in)])


def fd(unit, e, i, source, eps=1e-3):
    """(d_out, d_source): which features of layer i's output move when one feature of `source`
    ('e', or the output of an earlier layer j) moves by eps, every earlier layer held fixed."""
    base = outputs(unit, e)
    fixed = {j: base[j] for j in range(i)}
    width = e.numel() if source == 'e' else base[source].numel()
    cols = []
    for f in range(width):
        d = torch.zeros(width, dtype=torch.float64)
        d[f] = eps
        if source == 'e':
            moved = outputs(unit, e + d, fixed=fixed)
        else:
            moved = outputs(unit, e, fixed=fixed, add=(source, d))
        cols.append((moved[i] - base[i]).abs() > 1e-9)
    return torch.stack(cols, 1)


def unit_for(variant, norm=False, n=N, k=K, depth=DEPTH, g_max=G_MAX):
    return DeFINE(n, k, M, depth, g_max, variant, norm=norm).double().eval()


def test_lt_is_all_to_all_in_every_layer():
    w = wiring(N, K, DEPTH, G_MAX, 'lt')
    assert list(w[0]['inputs']) == ['e'] and w[0]['inputs']['e'].shape == (G_MAX, 1)
    for l, layer in enumerate(w):
        (src, mat), = layer['inputs'].items()
        assert src == ('e' if l == 0 else l - 1) and mat.all()


@pytest.mark.parametrize("g_max", [2, 4, 8])
def test_glt_is_block_diagonal(g_max):
    w = wiring(N, K, DEPTH, g_max, 'glt')
    eye = torch.eye(g_max, dtype=torch.bool)
    for l, layer in enumerate(w):
        assert list(layer['inputs']) == ['e' if l == 0 else l - 1]
        assert torch.equal(layer['inputs']['e' if l == 0 else l - 1], eye)
    assert torch.equal(receptive(w)[-1], eye)   # no group ever sees another's chunk of e


def test_shuffle_lets_every_group_see_every_chunk():
    w = wiring(N, K, DEPTH, G_MAX, 'glt_shuffle')
    assert torch.equal(w[0]['inputs']['e'], torch.eye(G_MAX, dtype=torch.bool))
    for l, layer in enumerate(w[1:], 1):
        assert list(layer['inputs']) == [l - 1] and layer['inputs'][l - 1].all()
    dens = wiring(N, K, DEPTH, G_MAX, 'glt_shuffle', density=True)[1]['inputs'][0]
    torch.testing.assert_close(dens, torch.full((G_MAX, G_MAX), 1 / G_MAX, dtype=torch.float64))
    assert receptive(w)[1].all()


def test_hgt_group_counts_follow_plan():
    n, k, depth, g_max = 8, 64, 4, 8
    plan = DeFINE.plan(n, k, depth, g_max, 'hgt')
    w = wiring(n, k, depth, g_max, 'hgt')
    assert [layer['groups'] for layer in w] == [g for _, _, g in plan] == [8, 4, 2, 1]
    assert [(layer['d_in'], layer['d_out']) for layer in w] == [(a, b) for a, b, _ in plan]
    for l, ((_, _, gp), (_, _, g), layer) in enumerate(zip(plan, plan[1:], w[1:]), 1):
        r = gp // g                             # each output group merges r neighbouring groups
        want = torch.tensor([[i // r == j for j in range(g)] for i in range(gp)])
        assert list(layer['inputs']) == [l - 1] and torch.equal(layer['inputs'][l - 1], want)


def test_define_splits_e_into_each_layers_groups():
    w = wiring(N, K, DEPTH, G_MAX, 'define')
    for l, layer in enumerate(w):
        g, c = layer['groups'], G_MAX // layer['groups']
        want = torch.tensor([[b // c == j for j in range(g)] for b in range(G_MAX)])
        assert torch.equal(layer['inputs']['e'], want)     # chunk j of e goes to group j
        assert set(layer['inputs']) == ({'e', l - 1} if l else {'e'})


@pytest.mark.parametrize("variant", VARIANTS)
def test_wiring_matches_numerical_jacobian(variant):
    w = wiring(N, K, DEPTH, G_MAX, variant, m=M)
    unit = unit_for(variant)
    e = torch.randn(N, dtype=torch.float64)
    chunks = len(w[0]['inputs']['e'])
    assert len(w) == len(unit.layers)
    for i, layer in enumerate(w):
        for src in ['e', *range(i)]:
            n_in = chunks if src == 'e' else w[src]['groups']
            got = groups_of(fd(unit, e, i, src), n_in, layer['groups'])
            want = layer['inputs'].get(src, torch.zeros(n_in, layer['groups'], dtype=torch.bool))
            assert torch.equal(got, want), (i, src, got, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_receptive_fields_match_end_to_end_jacobian(variant):
    w = wiring(N, K, DEPTH, G_MAX, variant, m=M)
    unit = unit_for(variant)
    e = torch.randn(N, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: torch.cat(outputs(unit, x)), e)
    rows = 0
    for layer, rf in zip(w, receptive(w)):
        block = jac[rows:rows + layer['d_out']]
        rows += layer['d_out']
        assert torch.equal(groups_of(block != 0, len(rf), layer['groups']), rf)


def test_layernorm_couples_every_group():
    # the default unit normalizes each layer over all its features: the groups are not
    # independent there, which is why the figure draws the weight paths (norm=False)
    w = wiring(N, K, DEPTH, G_MAX, 'glt', norm=True)
    assert all(mat.all() for layer in w for mat in layer['inputs'].values())
    unit, e = unit_for('glt', norm=True), torch.randn(N, dtype=torch.float64)
    assert fd(unit, e, 0, 'e').all() and fd(unit, e, 1, 0).all()


def test_architecture_command_writes_png(tmp_path, monkeypatch):
    pytest.importorskip('matplotlib', reason="figures.py draws with matplotlib (optional): pip install matplotlib")
    out = tmp_path / 'arch.png'
    monkeypatch.setattr(sys, 'argv', ['figures.py', 'architecture', '--depth', '4', '--out', str(out)])
    figures.main()
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ----------------------------------------------------------------------------------------
# The further analyses: correlation maps, compression, approximation (no matplotlib)

def test_svd_of_rank_r_table_is_exact_and_counts_its_factors():
    V, d, r = 50, 12, 3
    W = torch.randn(V, r) @ torch.randn(r, d)
    Wr, nbytes = figures.svd_compress(W, r)
    torch.testing.assert_close(Wr, W, atol=1e-4, rtol=1e-4)
    assert nbytes == r * (V + d) * 4
    W1, _ = figures.svd_compress(W, 1)            # a lower rank cannot be exact
    assert figures.relative_error(W1, W) > 0.05


def test_int8_per_row_error_within_half_a_step():
    W = torch.randn(40, 16) * torch.logspace(-3, 2, 40)[:, None]   # rows of very different scales
    W[3] = 0.0
    Wq, nbytes, s = figures.quantize_rows(W, 8)
    assert nbytes == 40 * 16 + 4 * 40
    torch.testing.assert_close(s[:, 0][W.abs().amax(1) > 0], W.abs().amax(1)[W.abs().amax(1) > 0] / 127)
    assert ((W - Wq).abs() <= s / 2 * (1 + 1e-5)).all()
    assert torch.equal(Wq[3], W[3])
    levels = Wq / s                                 # integers in [-127, 127]
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.abs().max() <= 127 + 1e-4


def test_correlation_map_matches_loop():
    W = torch.randn(30, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) + 3.0
    C = figures.correlation_map(W)
    assert torch.equal(C, C.t()) or torch.allclose(C, C.t(), atol=1e-12)
    torch.testing.assert_close(C.diagonal(), torch.ones(6, dtype=torch.float64))
    d = W.shape[1]
    want = torch.empty(d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            a, b = W[:, i] - W[:, i].mean(), W[:, j] - W[:, j].mean()
            want[i, j] = (a * b).sum() / ((a * a).sum().sqrt() * (b * b).sum().sqrt())
    torch.testing.assert_close(C, want)
    torch.testing.assert_close(C, torch.corrcoef(W.t()))   # and numpy's definition


def test_closeness_is_zero_to_itself_and_blind_to_dimension_order():
    W = torch.randn(100, 8) @ torch.randn(8, 8)
    perm = torch.randperm(8)
    P = W[:, perm] * torch.tensor([1., -1., 2., 1., 0.5, 1., -3., 1.])   # permuted, flipped, scaled
    C = figures.correlation_map(W)
    assert figures.spectral_distance(C, C) == pytest.approx(0, abs=1e-12)
    assert figures.spectral_distance(figures.correlation_map(P), C) == pytest.approx(0, abs=1e-6)
    assert figures.linear_cka(W, W) == pytest.approx(1)
    assert figures.linear_cka(W[:, perm], W) == pytest.approx(1)
    # and it does see a different correlation: independent dimensions vs the correlated ones
    assert figures.spectral_distance(figures.correlation_map(torch.randn(100, 8)), C) > 0.1
    assert figures.linear_cka(torch.randn(100, 8), W) < 0.5
    s = figures.correlation_stats([W, P, torch.randn(100, 8)])
    assert s[0]['spectral_distance'] == 0 and s[1]['spectral_distance'] < 1e-6 and s[2]['spectral_distance'] > 0.1


def test_parameter_matched_svd_rank():
    assert figures.svd_rank_for(10 * (1000 + 32), 1000, 32) == 10
    assert figures.svd_rank_for(10 * (1000 + 32) + 400, 1000, 32) == 10   # nearest
    assert figures.svd_rank_for(10 * (1000 + 32) + 600, 1000, 32) == 11
    assert figures.svd_rank_for(5, 1000, 32) == 1
    assert figures.svd_rank_for(10 ** 9, 1000, 32) == 32                 # the SVD is exact there


def test_fit_recovers_a_table_made_by_a_define_unit():
    V, d, n, k, depth = 96, 16, 8, 32, 2
    gen = TokenIO('define', V, d, n=n, k=k, m=d, depth=depth, g_max=2, output=False)
    gen.eval()
    T = figures.input_table(gen) * 5.0              # the fit must not depend on the table's scale
    io, err, params = figures.fit_define(T, n, k, depth, g_max=2, steps=600, batch=V, lr=1e-2)
    assert params == sum(p.numel() for p in gen.parameters())
    assert io.cached.shape == (V, d) and not io.training
    torch.testing.assert_close(torch.tensor(err), torch.tensor(figures.relative_error(io.cached, T)))
    assert err < 0.1, err
    r = figures.svd_rank_for(params, V, d)
    assert r == min(round(params / (V + d)), d)


def tiny_txl(embed):
    import build
    import train
    cfg = dict(train.DEFAULTS, model='txl', embed=embed, d_model=16, n_layer=1, n_head=2, d_head=8,
               d_inner=32, n=8, k=32, m=16, depth=2, g_max=2, mem_len=6, dropout=0.0, dropatt=0.0,
               cutoffs=[], vocab_size=50, device='cpu')
    return build.model(cfg, 50).eval(), cfg, train.setup(cfg)


@pytest.mark.parametrize("embed", ['standard', 'define'])
def test_compression_end_to_end_on_a_tiny_model(embed):
    import data as D
    import evaluation as E
    model, cfg, env = tiny_txl(embed)
    io = model.io
    tokens = torch.randint(0, 50, (400,))
    batches = lambda: D.lm_eval_batches(tokens, 4, 6)   # noqa: E731
    full = math.exp(E.nll(model, batches(), env))    # the model as built
    out_w = io.map.tables[0].detach().clone()
    rows = figures.compression_points(model, io, batches, env, ranks=[1, 4, 16, 99], cfg=cfg)
    got = {r['method']: r for r in rows}
    assert 'rank 16' not in got and 'rank 99' not in got        # full rank: no compression
    assert got['float32']['ppl'] == pytest.approx(full, rel=1e-5)
    assert got['float32']['bytes'] == 50 * 16 * 4 and got['rank 4']['bytes'] == 4 * 66 * 4
    assert got['int8 per row']['bytes'] == 50 * 16 + 4 * 50
    assert got['rank 1']['rel_err'] > got['rank 4']['rel_err'] > 0
    assert got['rank 1']['ppl'] != pytest.approx(full, rel=1e-6)   # the compressed table is used
    assert got['int8 per row']['ppl'] == pytest.approx(full, rel=1e-2)
    assert ('input path' in got) == (embed == 'define')
    if embed == 'define':
        assert got['input path']['ppl'] == pytest.approx(full, rel=1e-5)
    assert torch.equal(io.map.tables[0], out_w)           # the tied output table is untouched
    torch.testing.assert_close(io.cached, figures.input_table(io))   # the full table is back


def test_approximation_rows_on_a_tiny_model():
    import data as D
    model, cfg, env = tiny_txl('standard')
    tokens = torch.randint(0, 50, (300,))
    rows = figures.approximation_rows(model, model.io, lambda: D.lm_eval_batches(tokens, 4, 6), env,
                                      units=[(4, 16, 2)], steps=20, batch=50, g_max=2, cfg=cfg)
    assert [r['method'] for r in rows][0] == 'table' and rows[1]['method'].startswith('DeFINE')
    svd = rows[2]
    assert svd['params'] == figures.svd_rank_for(rows[1]['params'], 50, 16) * (50 + 16)
    assert all(math.isfinite(r['ppl']) for r in rows)


def test_load_lm_takes_a_run_folder_or_its_checkpoint(tmp_path):
    model, cfg, _ = tiny_txl('define')
    (tmp_path / 'run').mkdir()
    torch.save(dict(model=model.state_dict(), config=cfg), tmp_path / 'run' / 'ckpt.pt')
    for path in (tmp_path / 'run', tmp_path / 'run' / 'ckpt.pt'):
        loaded = figures.load_lm(path)[0].state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
