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

correlation, compression, approximation: the paper's further analyses of trained language
models, from train.py checkpoints (ckpt.pt or best.pt); see each function's docstring and the
README for what they measure:

    python figures.py correlation CKPT_standard CKPT_projective CKPT_define --out results/wt2_correlation.png
    python figures.py compression CKPT_standard CKPT_define --data-dir DIR --out results/wt2_compression.png
    python figures.py approximation CKPT_standard --data-dir DIR --out results/wt2_approximation.png

The numbers are pure functions (no matplotlib) and tested; matplotlib only draws them.
matplotlib is optional for the project: `pip install matplotlib` if it is missing.
"""
import argparse
import math
import sys

from contextlib import nullcontext

import torch

from define import DeFINE, TokenIO

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


# ----------------------------------------------------------------------------------------
# The paper's further analyses of trained models (numbers: no matplotlib)
#
# Every analysis works on the input table as the model sees it, `input_table(io)`: row i is
# what io.embed gives token i in eval mode (TokenIO.cache()), so one code path serves every
# kind. It is installed back the same way, as io.cached: only io.embed reads the cache, the
# output layer (tied to the map's table) keeps the trained weights. Compressing or replacing
# a table therefore touches the input side alone.

def load_lm(path, device='cpu', **override):
    """(model in eval mode, its TokenIO, settings, env) from a train.py checkpoint (ckpt.pt or
    best.pt, or a run folder: its ckpt.pt). `override` replaces settings that do not change the weights (data_dir,
    eval_max_tokens, ...); env is train.setup's (device, autocast, log)."""
    import build
    import checkpoint
    import train
    path = checkpoint.file(path)
    ck = checkpoint.load(path)
    cfg = train.checkpoint_config(ck, device=device, embed_cache=False, **override)
    if cfg['model'] == 'nmt':
        sys.exit(f"error: {path} is a translation model; these analyses take language models")
    env = train.setup(cfg)
    model = build.trained(ck, cfg, env)
    return model, model.io, cfg, env


def label(cfg):
    e = cfg['embed']
    return {'standard': 'standard', 'projective': f"projective (n={cfg['n']})", 'adaptive': 'adaptive',
            'define': f"DeFINE (n={cfg['n']}, k={cfg['k']}, N={cfg['depth']})"}.get(e, e)


@torch.no_grad()
def input_table(io):
    """(V, d) float32, row i = io.embed(i) in eval mode: standard, the table times its
    embed_scale; projective, the table through its projection (times embed_scale); DeFINE,
    map -> unit -> Reduce (-> projection), i.e. TokenIO.cache(). Leaves io in eval mode with
    that cache installed."""
    io.eval()
    io.cache()
    return io.cached.clone()


def correlation_map(W, center=True):
    """(d, d) correlation of the embedding dimensions of a table W (V, d): each column (one
    dimension, its V tokens the samples) is centred (center=True: Pearson's r; False: cosine)
    and scaled to unit length, then C = W^T W. Symmetric, unit diagonal, entries in [-1, 1];
    the paper's maps are of this kind (d x d). Float64."""
    W = W.double()
    if center:
        W = W - W.mean(0)
    W = W / W.norm(dim=0).clamp_min(1e-300)
    C = W.t() @ W
    C.diagonal().fill_(1.0)                     # 1 up to rounding; also for a constant column
    return C


def spectrum(C):
    """Eigenvalues of a correlation map, descending, divided by d (they sum to 1)."""
    return torch.linalg.eigvalsh(C.double()).flip(0) / C.shape[0]


def spectral_distance(C, C_ref):
    """How far correlation map C is from C_ref: ||lambda(C) - lambda(C_ref)||_2 / ||lambda(C_ref)||_2
    over their eigenvalues, sorted and divided by d (the shorter list padded with zeros). 0 for
    a map against itself. Dimensions of two separately trained models are not aligned (any
    permutation, sign flip or rescaling of them gives the same model), so an entry-by-entry
    distance between their maps measures the arbitrary order of the dimensions, not their
    correlation. The spectrum does not depend on it: it is invariant to permuting, flipping
    and rescaling dimensions (and to any orthogonal change of basis of the map), and it says
    what the map shows: all eigenvalues equal (1/d) for uncorrelated dimensions, a few large
    ones when the dimensions move together (the table is effectively of low rank)."""
    a, b = spectrum(C), spectrum(C_ref)
    pad = max(len(a), len(b))
    a, b = (torch.cat([x, x.new_zeros(pad - len(x))]) for x in (a, b))
    return float((a - b).norm() / b.norm())


def mean_abs_offdiag(C):
    """Mean |C_ij| over i != j: 0 for uncorrelated dimensions, 1 for identical ones."""
    d = C.shape[0]
    return float((C.abs().sum() - C.diagonal().abs().sum()) / max(d * (d - 1), 1))


def linear_cka(X, Y):
    """Linear CKA (Kornblith et al. 2019) of two tables whose rows are the same tokens:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred. 1 for a table against
    itself; invariant to orthogonal maps (so to permutations of dimensions) and to scaling of
    either table, defined for different widths. A second number beside spectral_distance: it
    compares the tokens' geometry, where the spectrum compares the dimensions' correlation."""
    X, Y = X.double() - X.double().mean(0), Y.double() - Y.double().mean(0)
    return float((Y.t() @ X).norm() ** 2 / ((X.t() @ X).norm() * (Y.t() @ Y).norm()))


def correlation_stats(tables, ref=0):
    """[dict(map=C, spectral_distance=, cka=, offdiag=)] for tables (V, d_i), against tables[ref]."""
    maps = [correlation_map(W) for W in tables]
    return [dict(map=C, spectral_distance=spectral_distance(C, maps[ref]),
                 cka=linear_cka(W, tables[ref]), offdiag=mean_abs_offdiag(C))
            for W, C in zip(tables, maps)]


# compression: a table's storage (bytes) against the perplexity it gives

def svd_compress(W, r, svd=None):
    """Best rank-r approximation of W (V, d) (Eckart-Young: truncated SVD), stored as two
    float32 factors U_r S_r (V, r) and V_r^T (r, d): -> (W_r float32, bytes = r (V + d) 4).
    svd: torch.linalg.svd(W.double(), full_matrices=False), to reuse over several ranks."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False) if svd is None else svd
    return ((U[:, :r] * S[:r]) @ Vh[:r]).float(), r * (W.shape[0] + W.shape[1]) * 4


def quantize_rows(W, bits=8):
    """Symmetric per-row quantisation: row i stored as integers q = round(W_i / s_i) in
    [-(2^(bits-1) - 1), 2^(bits-1) - 1] and one float32 scale s_i = max_j |W_ij| / (2^(bits-1) - 1).
    -> (dequantised q s (V, d) float32, bytes = V d bits / 8 + 4 V, scales (V, 1)).
    Rounding errs by at most half a step: |W_ij - q_ij s_i| <= s_i / 2."""
    qmax = 2 ** (bits - 1) - 1
    W = W.float()
    s = W.abs().amax(1, keepdim=True) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))          # an all-zero row: any scale is exact
    q = torch.round(W / s).clamp(-qmax, qmax)
    return q * s, W.shape[0] * W.shape[1] * bits // 8 + 4 * W.shape[0], s


def relative_error(A, T):
    """||A - T||_F / ||T||_F."""
    return float((A.double() - T.double()).norm() / T.double().norm())


def perplexity_with_table(model, io, table, batches, env, cfg=None):
    """exp(mean NLL) of `model` over batches() (evaluation.nll; Transformer-XL's evaluation
    lengths from cfg, as evaluation.final uses them) with `table` (V, d) installed as io's
    inference cache: only io.embed reads it, the (tied) output layer is untouched.
    table=None: the uncached input path. Leaves the model in eval mode with that cache."""
    import evaluation as E
    model.eval()
    io.cached = None if table is None else table.to(next(io.parameters()).device, torch.float32)
    with E.eval_lengths(model, cfg) if cfg is not None else nullcontext():
        return math.exp(E.nll(model, batches(), env))


def default_ranks(d):
    return sorted({max(1, d // 2 ** i) for i in (5, 4, 3, 2, 1)} | {3 * d // 4})


def compression_points(model, io, batches, env, ranks, bits=8, cfg=None):
    """Perplexity against bytes of io's input table compressed each way, installed as its
    cache (perplexity_with_table): rows dict(method, bytes, rel_err, ppl) for 'float32' (the
    table as is), 'rank r' (svd_compress) for r in ranks below min(V, d), 'int8 per row'
    (quantize_rows), and for DeFINE 'input path' (no cache: map + unit parameters, float32).
    Leaves the full table installed as the cache."""
    T = input_table(io)
    rows = [dict(method='float32', bytes=T.numel() * 4, rel_err=0.0,
                 ppl=perplexity_with_table(model, io, T, batches, env, cfg))]
    svd = torch.linalg.svd(T.double(), full_matrices=False)
    for r in sorted(set(ranks)):
        if r < min(T.shape):
            Wr, nbytes = svd_compress(T, r, svd)
            rows.append(dict(method=f'rank {r}', bytes=nbytes, rel_err=relative_error(Wr, T),
                             ppl=perplexity_with_table(model, io, Wr, batches, env, cfg)))
    Wq, nbytes, _ = quantize_rows(T, bits)
    rows.append(dict(method=f'int{bits} per row', bytes=nbytes, rel_err=relative_error(Wq, T),
                     ppl=perplexity_with_table(model, io, Wq, batches, env, cfg)))
    if io.unit is not None:
        rows.append(dict(method='input path', bytes=4 * sum(p.numel() for p in io._input_params()),
                         rel_err=0.0, ppl=perplexity_with_table(model, io, None, batches, env, cfg)))
    io.cached = T.to(io.cached.device if io.cached is not None else T.device)
    return rows


# approximation: can a DeFINE unit stand in for a trained table?

def svd_rank_for(params, V, d):
    """The rank r whose two factors hold about `params` numbers: r (V + d) ~= params, rounded
    to the nearest, at least 1 and at most min(V, d) (where the SVD is exact)."""
    return max(1, min(round(params / (V + d)), V, d))


def fit_define(table, n, k, depth, g_max=4, steps=500, batch=1024, lr=3e-3, seed=0,
               variant='define', log=None):
    """Fit a DeFINE input path, TokenIO('define', V, d, n, k, m=d, depth, g_max, output=False),
    so that its embedding of token i regresses onto row i of table (V, d): loss
    mean ||f(i) - T_i||^2 / mean ||T_i||^2 (relative MSE) over minibatches of `batch` token ids
    drawn uniformly (every token weighs the same), Adam at lr with cosine decay, `steps` steps.
    Its embed_scale is the table's RMS, so the unit fits rows of unit scale whatever the
    table's. -> (the TokenIO in eval mode with its cache() computed, relative_error of the
    cache against the table, its parameter count: map + unit)."""
    V, d = table.shape
    T = table.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        io = TokenIO('define', V, d, n=n, k=k, m=d, depth=depth, g_max=g_max, variant=variant,
                     output=False, embed_scale=float(T.pow(2).mean().sqrt()))
        io.to(T.device).train()
        opt = torch.optim.Adam(io.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        ms = T.pow(2).mean()
        for step in range(steps):
            ids = torch.randint(0, V, (min(batch, V),), device=T.device)
            loss = (io.embed(ids) - T[ids]).pow(2).mean() / ms
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log and (step % 100 == 0 or step == steps - 1):
                log(f"  fit step {step:4d} relative MSE {loss.item():.4f}")
    io.eval()
    io.cache()
    return io, relative_error(io.cached, T), sum(p.numel() for p in io.parameters())


def approximation_rows(model, io, batches, env, units, steps=500, batch=1024, lr=3e-3,
                       g_max=4, cfg=None, log=None):
    """For each (n, k, depth) in units: a DeFINE unit fitted to io's input table (fit_define)
    and the truncated SVD with as many parameters (svd_rank_for), each installed as io's cache:
    rows dict(method, params, rel_err, ppl), after the table's own ('table'). Leaves the
    table installed."""
    T = input_table(io)
    V, d = T.shape
    rows = [dict(method='table', params=T.numel(), rel_err=0.0,
                 ppl=perplexity_with_table(model, io, T, batches, env, cfg))]
    svd = torch.linalg.svd(T.double(), full_matrices=False)
    for n, k, depth in units:
        unit, err, params = fit_define(T, n, k, depth, g_max, steps, batch, lr, log=log)
        rows.append(dict(method=f'DeFINE n={n} k={k} N={depth}', params=params, rel_err=err,
                         ppl=perplexity_with_table(model, io, unit.cached, batches, env, cfg)))
        r = svd_rank_for(params, V, d)
        Wr, _ = svd_compress(T, r, svd)
        rows.append(dict(method=f'SVD rank {r}', params=r * (V + d), rel_err=relative_error(Wr, T),
                         ppl=perplexity_with_table(model, io, Wr, batches, env, cfg)))
    io.cached = T.to(next(io.parameters()).device)
    return rows


def markdown(rows, cols):
    """rows of dicts -> a markdown table of the given (key, header, format) columns."""
    out = ['| ' + ' | '.join(h for _, h, _ in cols) + ' |', '|' + '---|' * len(cols)]
    out += ['| ' + ' | '.join(format(r[k], f) for k, _, f in cols) + ' |' for r in rows]
    return '\n'.join(out)


# ----------------------------------------------------------------------------------------
# Their figures

def _pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: figures.py needs matplotlib: pip install matplotlib")
    return plt


def _eval_batches(path, args):
    """A checkpoint's model, TokenIO, settings, env and batches() of the validation split
    (build.data's, capped at --max-tokens targets)."""
    import build
    model, io, cfg, env = load_lm(path, args.device, data_dir=args.data_dir,
                                  eval_max_tokens=args.max_tokens)
    _, vocab, _, eval_batches = build.data(cfg, env)
    if vocab != cfg['vocab_size']:
        sys.exit(f"error: {path} was trained on a vocabulary of {cfg['vocab_size']}, the corpus "
                 f"under {args.data_dir} has {vocab}")
    return model, io, cfg, env, lambda: eval_batches('valid')


def correlation(args):
    tables, names = [], []
    for path in args.ckpts:
        _, io, cfg, _ = load_lm(path, args.device)
        tables.append(input_table(io).cpu())
        names.append(label(cfg))
    ref = next((i for i, p in enumerate(args.ckpts) if names[i] == 'standard'), 0)
    stats = correlation_stats(tables, ref)
    print(f"against {names[ref]} ({args.ckpts[ref]})")
    print(markdown([dict(model=nm, d=W.shape[1], **s) for nm, W, s in zip(names, tables, stats)],
                   [('model', 'model', 's'), ('d', 'd', 'd'), ('offdiag', 'mean abs. off-diagonal', '.3f'),
                    ('spectral_distance', 'spectral distance', '.3f'), ('cka', 'linear CKA', '.3f')]))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(4.6 * len(tables), 4.9), dpi=130, squeeze=False)
    for ax, nm, s in zip(axes[0], names, stats):
        im = ax.imshow(s['map'].numpy(), cmap='RdBu_r', vmin=-1, vmax=1, interpolation='nearest')
        ax.set_title(f"{nm}\nmean |off-diagonal| {s['offdiag']:.3f}\nspectral distance {s['spectral_distance']:.3f}, "
                     f"linear CKA {s['cka']:.3f}", fontsize=9)
        ax.set_xlabel('dimension')
        ax.set_ylabel('dimension')
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="Pearson correlation")
    fig.suptitle("Correlation of the input embedding's dimensions (table as the model sees it); "
                 f"distance and CKA against {names[ref]}", fontsize=10, y=1.02)
    fig.savefig(args.out, bbox_inches='tight')
    print(f"wrote {args.out}")


def compression(args):
    results = []
    for path in args.ckpts:
        model, io, cfg, env, batches = _eval_batches(path, args)
        d = io.d_embed
        rows = compression_points(model, io, batches, env, args.ranks or default_ranks(d), args.bits, cfg)
        results.append((label(cfg), rows))
        del model, io
    print(markdown([dict(model=nm, MiB=r['bytes'] / 2 ** 20, **r) for nm, rows in results for r in rows],
                   [('model', 'model', 's'), ('method', 'input table', 's'), ('MiB', 'MiB', '.3f'),
                    ('rel_err', 'rel. error', '.4f'), ('ppl', 'valid ppl', '.2f')]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=130)
    for (nm, rows), c in zip(results, plt.get_cmap('tab10').colors):
        svd = sorted((r for r in rows if r['method'].startswith('rank') or r['method'] == 'float32'),
                     key=lambda r: r['bytes'])
        ax.plot([r['bytes'] / 2 ** 20 for r in svd], [r['ppl'] for r in svd], 'o-', color=c,
                label=f"{nm}: truncated SVD, float32")
        for r in svd:
            ax.annotate(r['method'].replace('rank ', 'r'), (r['bytes'] / 2 ** 20, r['ppl']), fontsize=7,
                        xytext=(3, 3), textcoords='offset points', color=c)
        for r in rows:
            if r['method'].startswith('int'):
                ax.plot(r['bytes'] / 2 ** 20, r['ppl'], 's', color=c, ms=8, label=f"{nm}: {r['method']}")
            if r['method'] == 'input path':
                ax.plot(r['bytes'] / 2 ** 20, r['ppl'], '*', color=c, ms=11, label=f"{nm}: uncached map + unit")
    from matplotlib.ticker import FuncFormatter, LogLocator
    ax.set_xscale('log')
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel('input table storage (MiB)')
    ax.set_ylabel(f"validation perplexity ({args.max_tokens or 'all'} tokens)")
    ax.set_title("Input table compressed, output layer untouched", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


def approximation(args):
    model, io, cfg, env, batches = _eval_batches(args.ckpt, args)
    d = io.d_embed
    n0 = max(args.g_max, d // 4 // args.g_max * args.g_max)
    units = [tuple(int(x) for x in u.split(',')) for u in args.unit] or [(n0, 2 * d, 3)]
    rows = approximation_rows(model, io, batches, env, units, args.steps, args.batch, args.lr,
                              args.g_max, cfg, log=print)
    print(markdown([dict(r, M=r['params'] / 1e6) for r in rows],
                   [('method', 'input table', 's'), ('M', 'params (M)', '.3f'),
                    ('rel_err', 'rel. error', '.4f'), ('ppl', 'valid ppl', '.2f')]))
    if not args.out:
        return
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=130)
    base = rows[0]
    for ax, key, name in ((a1, 'rel_err', 'relative error ||A - T||/||T||'), (a2, 'ppl', 'validation perplexity')):
        for kind, mk, c in (('DeFINE', 'o', 'C1'), ('SVD', 's', 'C0')):
            sel = [r for r in rows if r['method'].startswith(kind)]
            ax.plot([r['params'] / 1e6 for r in sel], [r[key] for r in sel], mk, color=c, ms=8,
                    label='fitted DeFINE unit' if kind == 'DeFINE' else 'truncated SVD, same parameters')
            for r in sel:
                ax.annotate(r['method'], (r['params'] / 1e6, r[key]), fontsize=7, xytext=(4, 3),
                            textcoords='offset points')
        if key == 'ppl':
            ax.axhline(base['ppl'], color='0.4', ls='--', label=f"trained table ({base['params'] / 1e6:.2f}M)")
        ax.set_xlabel('parameters (M)')
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{label(cfg)} table approximated, input side only ({args.steps} Adam steps)", fontsize=10)
    fig.tight_layout()
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
    c = sub.add_parser('correlation', help="correlation maps of trained input tables")
    c.add_argument('ckpts', nargs='+', help="train.py checkpoints; distances against the standard one")
    c.add_argument('--out', default='results/wt2_correlation.png')
    c.add_argument('--device', default='cpu')
    for name, hlp in (('compression', "perplexity against bytes of compressed input tables"),
                      ('approximation', "a DeFINE unit fitted to a trained table, against SVD")):
        p = sub.add_parser(name, help=hlp)
        if name == 'compression':
            p.add_argument('ckpts', nargs='+', help="train.py checkpoints (e.g. standard, DeFINE)")
            p.add_argument('--ranks', type=int, nargs='+', help="SVD ranks (default: d/32 .. 3d/4)")
            p.add_argument('--bits', type=int, default=8, help="per-row quantisation bits")
            p.add_argument('--out', default='results/wt2_compression.png')
        else:
            p.add_argument('ckpt', help="a train.py checkpoint (a standard table)")
            p.add_argument('--unit', action='append', default=[], metavar='N,K,DEPTH',
                           help="a unit to fit (repeatable; default d/4, 2d, 3)")
            p.add_argument('--g-max', type=int, default=4)
            p.add_argument('--steps', type=int, default=500)
            p.add_argument('--batch', type=int, default=1024, help="table rows per step")
            p.add_argument('--lr', type=float, default=3e-3)
            p.add_argument('--out', default=None, help="a figure too (default: the table only)")
        p.add_argument('--data-dir', required=True, help="corpora folder (DIR/wikitext-2/...)")
        p.add_argument('--max-tokens', type=int, default=None, help="cap validation targets")
        p.add_argument('--device', default='cpu')
    args = ap.parse_args()
    {'architecture': architecture, 'correlation': correlation, 'compression': compression,
     'approximation': approximation}[args.figure](args)


if __name__ == '__main__':
    main()
