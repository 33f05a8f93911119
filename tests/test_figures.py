"""figures.py's wiring against the real module: a finite-difference Jacobian of DeFINE's forward
(float64, GELU and bias kept, hooks on its layers), and the group counts of DeFINE.plan.
wiring(...)[l]['inputs'] maps a source ('e', or an earlier layer's index) to a (G_src, g_l) matrix."""
import sys

import pytest
import torch

from define import VARIANTS, DeFINE
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
