"""Figures of the DeFINE unit drawn from define.py itself, never from a hand-written table.

    python figures.py architecture --out results/define_architecture.png
    python figures.py architecture --n 8 --k 32 --depth 4 --g-max 4 --out results/arch_depth4.png

architecture: LT, GLT, GLT + shuffle, HGT and DeFINE (split and mix) side by side, from
DeFINE.plan of a small unit. Rows are the unit's tensors, the map's output e at the bottom and
layer l's output h_l above it; blocks are groups, cells are features. A line joins a group of a
layer's input to a group of its output wherever the real forward connects them: `wiring()`
builds the unit in float64 and reads each layer's Jacobian, so the picture follows the code.
Each block is striped with the colours of the chunks of e that it depends on (its receptive
field); hatched blocks are e read again by a later layer (the skip).

matplotlib is optional for the project: `pip install matplotlib` if it is missing.
"""
import argparse
import math
import sys

import torch

from define import DeFINE

PANELS = (('lt', 'LT'), ('glt', 'GLT'), ('glt_shuffle', 'GLT + shuffle'), ('hgt', 'HGT'),
          ('define', 'DeFINE (split and mix)'))


# ----------------------------------------------------------------------------------------
# Wiring, read off the module (no matplotlib)

def jacobians(n, k, depth, g_max=4, variant='define', m=None, norm=False, seed=0):
    """Feature-level wiring of the real unit, one dict per layer module: {source: (d_out, d_src)
    bool}, source 'e' (the map's output) or j (the output of layer j < this one), True where a
    feature of this layer's output reads a feature of the source directly. Every earlier layer's
    output is made a free variable (forward hooks) and forward runs as is, so whatever it does
    between layers (shuffle, split and mix, residual) is in the Jacobian. The unit is float64
    without bias or activation: a nonzero entry is a weight path; norm=True keeps LayerNorm,
    whose mean and variance couple the features it normalizes together."""
    m = n if m is None else m
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unit = DeFINE(n, k, m, depth, g_max, variant, bias=False, norm=norm, act=None).double().eval()
        e = torch.randn(n, dtype=torch.float64)
        ys = [torch.randn(layer.glt.d_out, dtype=torch.float64) for layer in unit.layers]
    out = []
    for i, layer in enumerate(unit.layers):
        def run(e, *ys):                        # layer i's output from e and free y_0 .. y_{i-1}
            got = []
            hooks = [unit.layers[j].register_forward_hook(lambda mod, args, y, j=j: ys[j]) for j in range(i)]
            hooks.append(layer.register_forward_hook(lambda mod, args, y: got.append(y)))
            try:
                unit(e)
            finally:
                for hook in hooks:
                    hook.remove()
            return got[0]
        J = torch.autograd.functional.jacobian(run, (e, *ys[:i]))
        out.append({src: j != 0 for src, j in zip(['e', *range(i)], J) if (j != 0).any()})
    return unit.layers_plan, out


def _blocks(mask, n_in, n_out, density):   # (d_out, d_in) features -> (n_in, n_out) groups
    d_out, d_in = mask.shape
    m = mask.double().reshape(n_out, d_out // n_out, n_in, d_in // n_in)
    return (m.mean((1, 3)) if density else m.amax((1, 3)) > 0).t()


def wiring(n, k, depth, g_max=4, variant='define', m=None, norm=False, density=False):
    """Which groups of each layer's inputs feed which of its output groups, read off the real
    module: per layer module, dict(d_in, d_out, groups, inputs={source: (G_src, g) bool}) with
    source 'e' or the index j of an earlier layer (j = l-1: the previous one), True where any
    feature of the source group reaches the output group (density=True: the fraction of their
    feature pairs that are connected). A layer's output is cut into its groups; e into g_max
    chunks (or as finely as the layers that read it cut it), the same chunks everywhere."""
    plan, J = jacobians(n, k, depth, g_max, variant, m, norm)
    readers = [g for (_, _, g), srcs in zip(plan, J) if 'e' in srcs]
    chunks = math.lcm(g_max, *readers)
    chunks = chunks if n % chunks == 0 else math.lcm(*readers)
    return [dict(d_in=d_in, d_out=d_out, groups=g,
                 inputs={src: _blocks(mask, chunks if src == 'e' else plan[src][2], g, density)
                         for src, mask in srcs.items()})
            for (d_in, d_out, g), srcs in zip(plan, J)]


def receptive(w):
    """[(chunks of e, g) bool] per layer: which chunks of e each of its output groups depends
    on through every path below it (the boolean product of the layers' wiring)."""
    chunks = len(w[0]['inputs']['e'])
    rf = []
    for layer in w:
        r = torch.zeros(chunks, layer['groups'], dtype=torch.bool)
        for src, mat in layer['inputs'].items():
            r |= (mat > 0) if src == 'e' else (rf[src].double() @ (mat > 0).double()) > 0
        rf.append(r)
    return rf


# ----------------------------------------------------------------------------------------
# The architecture figure

def draw_panel(ax, n, k, depth, g_max, variant, name, cell=1.0, gap=0.8, row_h=3.2, block_h=1.0):
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle
    import matplotlib.pyplot as plt
    w = wiring(n, k, depth, g_max, variant, density=True)
    depth = len(w)                              # layer modules, as the unit builds them
    for l, layer in enumerate(w):
        if set(layer['inputs']) - {'e', l - 1}:
            raise NotImplementedError(f"{variant}: layer {l + 1} reads {sorted(map(str, layer['inputs']))}; "
                                      "the drawing knows e and the previous layer only")
    rf = receptive(w)
    chunks = len(w[0]['inputs']['e'])
    colours = plt.get_cmap('tab10').colors[:chunks]
    # row 0: e; row l: h_l, with e's chunks beside it where layer l+1 reads them again,
    # each placed next to the groups it feeds (order of the first output group reached)
    rows = [[('e', b, n // chunks) for b in range(chunks)]]
    for l, layer in enumerate(w, 1):
        g, d = layer['groups'], layer['d_out']
        items = [((0, 0, j), ('h', j, d // g)) for j in range(g)]
        if l < depth:
            nxt = w[l]['inputs']
            items = [((int(nxt[l - 1][j].nonzero()[0]), 0, j), it) for (_, _, j), it in items]
            if 'e' in nxt:
                items += [((int(nxt['e'][b].nonzero()[0]), 1, b), ('skip', b, n // chunks))
                          for b in range(chunks)]
        rows.append([it for _, it in sorted(items)])
    pos = []                                    # per row: {(kind, index): (x0, x1)}
    for r, row in enumerate(rows):
        width = sum(f for _, _, f in row) * cell + gap * (len(row) - 1)
        x, spans = -width / 2, {}
        for kind, i, f in row:
            spans[(kind, i)] = (x, x + f * cell)
            x += f * cell + gap
        pos.append(spans)
    # connections of layer l: row l-1 (h_{l-1} and e read again) -> row l
    segs, lws, cols = [], [], []
    for l, layer in enumerate(w, 1):
        y0, y1 = (l - 1) * row_h + block_h, l * row_h
        srcs = []
        for src, mat in layer['inputs'].items():
            kind = 'h' if src != 'e' else 'e' if l == 1 else 'skip'
            srcs += [((kind, i), mat[i]) for i in range(len(mat))]
        for src, dens in srcs:
            xa = sum(pos[l - 1][src]) / 2
            pure = src[0] != 'h' or rf[l - 2][:, src[1]].sum() == 1
            c = colours[src[1] if src[0] != 'h' else int(rf[l - 2][:, src[1]].nonzero()[0])] if pure else '0.3'
            for j in range(layer['groups']):
                if dens[j] > 0:
                    segs.append([(xa, y0), (sum(pos[l][('h', j)]) / 2, y1)])
                    lws.append(0.5 + 2.5 * float(dens[j]))
                    cols.append(c)
    ax.add_collection(LineCollection(segs, linewidths=lws, colors=cols, alpha=0.75, zorder=1))
    # blocks: horizontal stripes in the colours of the chunks of e each one depends on
    sep = []
    for r, row in enumerate(rows):
        y = r * row_h
        for kind, i, f in row:
            x0, x1 = pos[r][(kind, i)]
            fill = [i] if kind != 'h' else rf[r - 1][:, i].nonzero()[:, 0].tolist()
            for s, c in enumerate(fill):
                hs = block_h / len(fill)
                ax.add_patch(Rectangle((x0, y + block_h - (s + 1) * hs), x1 - x0, hs, color=colours[c],
                                       alpha=0.45 if kind == 'skip' else 0.9, lw=0, zorder=2))
            ax.add_patch(Rectangle((x0, y), x1 - x0, block_h, fill=False, lw=1.0, zorder=4,
                                   hatch='////' if kind == 'skip' else None,
                                   ec='0.35' if kind == 'skip' else 'black'))
            sep += [[(x0 + c * cell, y), (x0 + c * cell, y + block_h)] for c in range(1, f)]
    ax.add_collection(LineCollection(sep, colors='white', linewidths=0.6, zorder=3))
    half = max(-min(s[0] for p in pos for s in p.values()), max(s[1] for p in pos for s in p.values()))
    for r in range(depth + 1):                  # the row's width and groups, at its right end
        x1 = max(s[1] for s in pos[r].values())
        if r == 0:
            txt = f"e: {n}"
        else:
            layer = w[r - 1]
            txt = f"h{r}: {layer['d_out']} = {layer['groups']}\u00d7{layer['d_out'] // layer['groups']}"
            txt += f"\n+ e: {n}" if any(kind == 'skip' for kind, _, _ in rows[r]) else ''
        ax.text(x1 + 0.8, r * row_h + block_h / 2, txt, va='center', fontsize=9)
    ax.set_xlim(-half - 1, half + 11)
    ax.set_ylim(-0.6, depth * row_h + block_h + 0.4)
    ax.set_title(f"{name}\nvariant='{variant}', groups {[lay['groups'] for lay in w]}", fontsize=11)
    ax.axis('off')


def architecture(args):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: figures.py needs matplotlib: pip install matplotlib")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.7 * len(PANELS), 1.4 * args.depth + 2.8), dpi=130)
    for ax, (variant, name) in zip(axes, PANELS):
        draw_panel(ax, args.n, args.k, args.depth, args.g_max, variant, name)
    fig.suptitle(f"The unit's expand layers from DeFINE.plan(n={args.n}, k={args.k}, depth={args.depth}, "
                 f"g_max={args.g_max}), wired as define.py's forward wires them (read off its Jacobian)",
                 fontsize=12)
    fig.text(0.5, 0.015, "rows: e (the map's output) at the bottom, then each layer's output h_l; "
             "blocks: groups, cells: features; line: input group feeds output group "
             "(width: share of its feature pairs connected); colour stripes: the chunks of e a group "
             "depends on; hatched: e read again (skip).\nDrawn without LayerNorm: with it (the default) "
             "every feature of a layer also depends on all the others through the mean and variance. "
             "The dense Reduce k -> m above the top row is not drawn.", ha='center', fontsize=9.5)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95), w_pad=0.5)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='figure', required=True)
    a = sub.add_parser('architecture', help="LT, GLT, GLT + shuffle, HGT, DeFINE wired from the code")
    a.add_argument('--n', type=int, default=8, help="map width")
    a.add_argument('--k', type=int, default=32, help="expand width")
    a.add_argument('--depth', type=int, default=3)
    a.add_argument('--g-max', type=int, default=4)
    a.add_argument('--out', default='results/define_architecture.png')
    args = ap.parse_args()
    {'architecture': architecture}[args.figure](args)


if __name__ == '__main__':
    main()
