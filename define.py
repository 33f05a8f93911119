"""DeFINE: Deep Factorized Input Token Embeddings (Mehta et al., ICLR 2020), and every token
representation it is compared with, in one file that imports torch only: copy it anywhere.

Public API
----------
GroupLinear(d_in, d_out, groups, bias=True)
    Group linear transform (GLT): chunk j of the input times its own matrix. One weight
    tensor [g, d_in/g, d_out/g], one batched matmul.
DeFINE(n, k, m, depth, g_max=4, variant='define', bias=True, norm=True, act='gelu', dropout=0.)
    The Map-Expand-Reduce unit, (..., n) -> (..., m): a hierarchical group transform whose
    widths grow from n to k with g_max, g_max/2, ... groups, the split-and-mix skip before
    every layer after the first, and a dense Reduce k -> m. `variant` builds the paper's
    ablations and 'define_delight', the authors' own later unit (VARIANTS below; the DeFINE
    docstring lists how it differs). `DeFINE.plan(...)` returns the layer plan without building.
AdaptiveInput(vocab_size, n, d, cutoffs=(), factor=1)
    The map: frequency-sorted vocabulary cut into bands at `cutoffs`, band i a table of
    width n // factor**i, projected (bias-free) to d where it is not already d.
    factor=4 is Baevski & Auli's adaptive input, factor=1 Transformer-XL's projective
    embedding, no cutoffs and n == d a standard embedding.
AdaptiveSoftmax(inp, d_hidden, bias=True)
    Output layer over the tables and projections of an AdaptiveInput `inp`, passed at call
    time (the input's map when tied, a map of the output's own when untied): a full softmax
    with one band, Grave et al.'s adaptive softmax with several. Works in the map's space:
    the hidden state is projected to it when d_hidden differs (one projection per band,
    Transformer-XL style).
CharCNN(words, d, char_dim=4, filters=CharCNN.FILTERS, highway=2, max_chars=50)
    Kim et al.'s character-aware word vectors, (...,) ids -> (..., d), from the spelling of
    `words` (index = token id): convolutions, max over time, highway layers, a projection.
TokenIO(kind, vocab_size, d_model, n=None, ..., output=True, tied=None, words=None)
    The seam every model uses. kind in KINDS = ('standard', 'projective', 'adaptive',
    'define') or WORD_KINDS = ('cnn',), which needs words=. .embed(ids) -> (..., d_embed);
    .loss(hidden, targets) -> NLL; .log_probs(hidden) -> (..., V); .cache() swaps the input
    path for one lookup table. tied=False gives the output tables of its own (Baevski &
    Auli's untied rows; TokenIO's docstring lists every row's arguments).
    output=False builds the input side alone (a translation model's source vocabulary).
    ids and targets may stay on the host while the parameters are on a GPU: the
    bookkeeping that depends on their values (DeFINE's distinct tokens, the adaptive
    softmax's cluster sizes) then runs on the host, and the GPU never waits for it.
count_params(model) -> dict(define=, io=, context=, total=)
    The split of the paper's tables: DeFINE units, TokenIO (maps, projections, outputs), rest.
to_device(t, device) -> t on device, a host tensor copied from page-locked memory (no wait)

Example
-------
>>> import torch
>>> from define import TokenIO, count_params
>>> _ = torch.manual_seed(0)
>>> io = TokenIO('define', vocab_size=1000, d_model=64, n=16, k=128, depth=3, g_max=4)
>>> ids = torch.randint(0, 1000, (5, 8))                 # (T, B) token ids
>>> io.embed(ids).shape                                   # (T, B, d_model)
torch.Size([5, 8, 64])
>>> hidden = torch.randn(5, 8, 64)                        # what a context model returns
>>> io.loss(hidden, ids).shape, io.log_probs(hidden).shape
(torch.Size([]), torch.Size([5, 8, 1000]))
>>> _ = io.eval(); x = io.embed(ids)
>>> info = io.cache()                                     # V x d_model table replaces the unit
>>> bool((io.embed(ids) - x).abs().max() < 1e-6), info['bytes']
(True, 256000)
>>> sorted(count_params(io))
['context', 'define', 'io', 'total']
>>> cnn = TokenIO('cnn', 3, 16, words=['the', 'cat', 'sat'])   # spelled; untied output
>>> cnn.embed(torch.tensor([[0, 2]])).shape, cnn.tied
(torch.Size([1, 2, 16]), False)

Choices the paper leaves open (see README): each HGT layer is GLT + bias -> LayerNorm ->
GELU -> dropout (the authors' code; without a nonlinearity the unit collapses to one linear
map); Reduce is a plain Linear; g_max defaults to 4 (the paper's figures).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ('standard', 'projective', 'adaptive', 'define')   # built from the vocabulary size
WORD_KINDS = ('cnn',)                                      # need the word strings too (words=)
VARIANTS = (
    'define',           # HGT + split-and-mix skip + Reduce (the paper's unit)
    'define_nomix',     # skip concatenates the whole input to h, no per-group split
    'define_noreduce',  # no Reduce: the context model takes k-wide vectors
    'lt',               # linear transforms, g = 1 everywhere, widths n -> k
    'glt',              # g_max groups in every layer
    'glt_shuffle',      # glt + channel shuffle between layers (ShuffleNet)
    'hgt',              # decreasing groups, no skip
    'hgt_residual',     # decreasing groups, fixed width k/2, identity skips
    'define_delight',   # the authors' later unit (DeLighT repository), see DeFINE's docstring
)
ACTS = {'gelu': nn.GELU, 'swish': nn.SiLU, 'relu': nn.ReLU, None: nn.Identity}
GAINS = {'gelu': 2.0, 'swish': 2.0, 'relu': 2 ** 0.5, None: 1.0}   # init without LayerNorm


# ----------------------------------------------------------------------------------------
# Group linear transform and the DeFINE unit

class GroupLinear(nn.Module):
    """Split the last dim into `groups` contiguous chunks; chunk j @ weight[j] (paper Eq. 2)."""

    def __init__(self, d_in, d_out, groups, bias=True):
        super().__init__()
        if groups < 1 or d_in % groups or d_out % groups:
            raise ValueError(f"GroupLinear: d_in={d_in} and d_out={d_out} must both be divisible "
                             f"by groups={groups}; pick widths that are multiples of {groups}")
        self.d_in, self.d_out, self.groups = d_in, d_out, groups
        fan_in = d_in // groups
        self.weight = nn.Parameter(torch.empty(groups, fan_in, d_out // groups).uniform_(
            -fan_in ** -0.5, fan_in ** -0.5))   # nn.Linear's default range, per group
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x, grouped=False):
        """(..., d_in) -> (..., d_out); with grouped=True (..., g, d_in/g) -> (..., g, d_out/g)."""
        if self.groups == 1:   # a plain Linear (grouped: (..., 1, d_in)), not a bmm of one
            return F.linear(x, self.weight[0].t(), self.bias)
        if not grouped:
            return self(x.unflatten(-1, (self.groups, -1)), grouped=True).flatten(-2)
        lead = x.shape[:-2]
        x = x.reshape(-1, self.groups, x.shape[-1]).transpose(0, 1)  # (g, N, d_in/g)
        y = torch.bmm(x, self.weight)
        y = y.transpose(0, 1).reshape(*lead, self.groups, -1)        # (..., g, d_out/g)
        if self.bias is not None:
            y = y + self.bias.view(self.groups, -1)
        return y

    def extra_repr(self):
        return f"{self.d_in}, {self.d_out}, groups={self.groups}, bias={self.bias is not None}"


class GLTBlock(nn.Module):
    """One HGT layer: GLT (+ bias) -> LayerNorm -> activation -> dropout."""

    def __init__(self, d_in, d_out, groups, bias=True, norm=True, act='gelu', dropout=0.0,
                 group_norm=False):
        super().__init__()
        self.glt = GroupLinear(d_in, d_out, groups, bias)
        # group_norm (define_delight): each group normalised on its own, one affine for all
        self.norm_groups = groups if group_norm else 1
        self.norm = nn.LayerNorm(d_out // self.norm_groups) if norm else nn.Identity()
        if not norm:
            # nothing restores the scale between layers then, so keep it at init: GELU and
            # swish are ~x/2 on the small values a table gives (gain 2), ReLU halves the
            # variance (gain sqrt 2). nn.Linear's range shrinks the output ~3.5x a layer: on
            # PTB the depth-7 unit's output varied 10x less across tokens than the AWD table's
            # rows, and the LSTM barely saw which token came in
            fan_in = self.glt.weight.shape[1]
            nn.init.normal_(self.glt.weight, std=GAINS[act] * fan_in ** -0.5)
        self.act = ACTS[act]()
        self.drop = nn.Dropout(dropout)

    def forward(self, x, grouped=False):   # (..., d_in), or (..., g, d_in/g) if grouped
        y = self.glt(x, grouped=True).flatten(-2) if grouped else self.glt(x)   # (..., d_out)
        y = self.norm(y.unflatten(-1, (self.norm_groups, -1))).flatten(-2)
        return self.drop(self.act(y))


def _upcast(x):   # softmax statistics in float32 at least (bf16 logits lose too much)
    return x if x.dtype == torch.float64 else x.float()


def to_device(t, device):   # from page-locked memory the host does not wait for the copy
    if t.device.type == 'cpu' and device.type == 'cuda':
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def softmax_nll(z, target, ignore_index=-100, label_smoothing=0.0):
    """-log softmax(z)[target] per row: (N, V) logits, (N,) targets -> (N,), 0 where ignored.
    That is logsumexp(z) - z_t; with label smoothing eps, (1 - eps) of it plus eps times the
    mean of -log p_j over the vocabulary, logsumexp(z) - mean(z)."""
    return F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction='none')


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


class DeFINE(nn.Module):
    """Map-Expand-Reduce unit: (..., n) -> (..., m), or (..., k) for 'define_noreduce'.

    variant='define_delight' is the one DeFINE unit the authors published: their later
    DeLighT code (sacmehta/delight, fairseq/delight_modules/dextra_unit.py, --define-iclr).
    k is its widest width (their width_multiplier x n); depth counts its group layers. It
    differs from the paper's text in these ways:
    1. a dense input layer n -> m/2 (bias, LayerNorm, activation, dropout) comes first; its
       output x, not the map's e, is what every later layer is mixed with;
    2. groups count up 1, 2, 4, ... to the largest power of two <= g_max, restart at 1, and
       the list is reversed (depth 7, g_max 4: 1 4 2 1 4 2 1), not g_max, g_max/2, ..., 1;
    3. widths run linearly from m/2 (not n) to k, reached by layer N-1; layer N maps to m
       (it is the Expand's last step and the first Reduce). Each width is truncated, then
       rounded up to a multiple of max(its groups, the next layer's, 8);
    4. LayerNorm works per group (over d_out/g features; one affine shared by the groups);
    5. every layer after the first gets [x_j, h_j] in group j (x's chunk first), and so does
       the layer after the last group layer: with one group, the whole [x, h_N];
    6. that last layer is a dense Reduce over [x, h_N], m/2 + m -> m, with LayerNorm,
       activation and dropout (the paper: a plain Linear k -> m);
    7. a standard map is scaled by sqrt(n) before the unit (in_scale; the authors skip it for
       an adaptive map: set unit.in_scale = 1. for one).
    Not followed: their dense ends always have a bias (ours follow `bias`), their Xavier init;
    and with norm=False (which they never use) the map is not scaled: no LayerNorm divides the
    scale out again, so under SGD it multiplies the map's step's effect on the unit by n.
    """

    def __init__(self, n, k, m, depth, g_max=4, variant='define', bias=True, norm=True,
                 act='gelu', dropout=0.0):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"act={act!r} unknown; choose one of {list(ACTS)}")
        self.n, self.k, self.variant = n, k, variant
        self.layers_plan = self.plan(n, k, depth, g_max, variant, m)
        delight = variant == 'define_delight'
        self.layers = nn.ModuleList(GLTBlock(d_in, d_out, g, bias, norm, act, dropout, delight)
                                    for d_in, d_out, g in self.layers_plan)
        # without LayerNorm the init keeps the map's scale through the unit instead (PTB at
        # lr 30: scaled by sqrt(n), the output grew a vector shared by every token within 200
        # steps, and the LSTM learnt a unigram model)
        self.in_scale = math.sqrt(n) if delight and norm else 1.0
        k_out = self.layers_plan[-1][1]
        if variant in ('define_noreduce', 'define_delight'):   # delight: its last layer reduces
            self.reduce, self.d_out = nn.Identity(), k_out
        else:
            self.reduce, self.d_out = nn.Linear(k_out, m, bias=bias), m
            if not norm:   # and the Reduce passes the scale on too (std 1/sqrt(fan_in), no offset)
                nn.init.normal_(self.reduce.weight, std=k_out ** -0.5)
                if bias:
                    nn.init.zeros_(self.reduce.bias)

    @staticmethod
    def plan(n, k, depth, g_max=4, variant='define', m=None):
        """[(d_in, d_out, groups)] per layer; raises ValueError for what cannot be built.
        define_delight needs m, and lists its dense input and output layers too (depth + 2)."""
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} unknown; choose one of {VARIANTS}")
        if depth < 1:
            raise ValueError(f"depth={depth}: the unit needs at least one layer (depth >= 1)")
        if n < 1 or k < n:
            raise ValueError(f"k={k} < n={n}: the expand width k must be at least the map width n")
        if g_max < 1:
            raise ValueError(f"g_max={g_max} must be >= 1")
        if variant == 'define_delight':   # see the class docstring, points 1-3 and 6
            if depth < 2 or m is None or m < 2:
                raise ValueError(f"define_delight needs depth >= 2 (got {depth}) and m >= 2 "
                                 f"(got {m})")
            h = m // 2                                    # the input layer's width
            groups = [2 ** (l % g_max.bit_length()) for l in range(depth)][::-1]
            if any(h % g for g in groups):
                raise ValueError(f"m // 2 = {h} is not divisible by the groups {groups}; use "
                                 f"an m that is a multiple of {2 * max(groups)}")
            # point l of linspace(h, k, depth), l = 1 .. N-1, floored (exact integers here)
            widths = [_round_up((h * (depth - 1) + l * (k - h)) // (depth - 1),
                                max(groups[l - 1], groups[l], 8)) for l in range(1, depth)]
            ins = [h] + [w + h for w in widths]           # later layers also get x
            return [(n, h, 1), *zip(ins, widths + [m], groups), (h + m, m, 1)]
        if variant == 'lt':
            groups = [1] * depth
        elif variant in ('glt', 'glt_shuffle'):
            groups = [g_max] * depth
        else:   # the hierarchy: g_l = max(g_max / 2^(l-1), 1)
            groups = [max(g_max // 2 ** l, 1) for l in range(depth)]
        skip = variant in ('define', 'define_nomix', 'define_noreduce')
        for g in set(groups) if skip else groups[:1]:
            if n % g:
                raise ValueError(f"n={n} is not divisible by {g} groups (g_max={g_max}, "
                                 f"variant={variant!r}); use an n that is a multiple of {g_max} "
                                 f"or a smaller g_max")
        if variant == 'hgt_residual':   # a residual needs one width: k/2, fitted to every g
            w = _round_up(k // 2, math.lcm(*groups))
            widths = [w] * depth
        else:   # k_l = n + l (k - n) / N, rounded up so that layer l and l+1 can split it
            widths = [_round_up(-(-(n * depth + l * (k - n)) // depth),
                                math.lcm(groups[l - 1], groups[min(l, depth - 1)]))
                      for l in range(1, depth)] + [k]
            if k % groups[-1]:
                raise ValueError(f"k={k} is not divisible by the last layer's {groups[-1]} "
                                 f"groups; use a k that is a multiple of {groups[-1]}")
        plan = []
        for l in range(depth):
            d_in = n if l == 0 else widths[l - 1] + (n if skip else 0)
            plan.append((d_in, widths[l], groups[l]))
        return plan

    def forward(self, e):                  # (..., n) -> (..., m)
        if self.variant == 'define_delight':
            x = self.layers[0](e * self.in_scale)         # (..., m/2): mixed into every layer
            h = self.layers[1](x)
            for layer in self.layers[2:]:                 # group layers 2..N, then the Reduce
                g = layer.glt.groups                      # group j gets [x_j, h_j]
                h = layer(torch.cat([x.unflatten(-1, (g, -1)), h.unflatten(-1, (g, -1))], -1),
                          grouped=True)                   # in: (..., g, (m/2 + k_{l-1}) / g)
            return h                                      # (..., m)
        h = self.layers[0](e)              # layer 1 sees e alone
        for prev, layer in zip(self.layers[:-1], self.layers[1:]):
            g = layer.glt.groups
            if self.variant in ('define', 'define_noreduce'):
                # split-and-mix: group j of this layer gets chunk j of h next to chunk j of e
                x = torch.cat([h.unflatten(-1, (g, -1)), e.unflatten(-1, (g, -1))], -1)
                h = layer(x, grouped=True)         # x: (..., g, (k_{l-1} + n) / g)
            elif self.variant == 'define_nomix':
                h = layer(torch.cat([h, e], -1))
            elif self.variant == 'hgt_residual':
                h = h + layer(h)
            elif self.variant == 'glt_shuffle':   # (..., g, c) -> (..., c, g): mix the groups
                gp = prev.glt.groups
                h = layer(h.unflatten(-1, (gp, -1)).transpose(-1, -2).flatten(-2))
            else:
                h = layer(h)
        return self.reduce(h)


# ----------------------------------------------------------------------------------------
# Maps (input) and the tied output

class AdaptiveInput(nn.Module):
    """Bands of the frequency-sorted vocabulary; band i: table (V_i, n // factor**i) and a
    bias-free projection to d unless that width is d already. (..., ) ids -> (..., d)."""

    def __init__(self, vocab_size, n, d, cutoffs=(), factor=1, init_std=None):
        super().__init__()
        cutoffs = list(cutoffs)
        if cutoffs != sorted(set(cutoffs)) or (cutoffs and not 0 < cutoffs[0] <= cutoffs[-1] < vocab_size):
            raise ValueError(f"cutoffs={cutoffs} must be increasing and within (0, vocab_size="
                             f"{vocab_size}); e.g. [20000, 40000, 200000] for WikiText-103")
        if factor < 1:
            raise ValueError(f"factor={factor} must be >= 1")
        self.vocab_size, self.n, self.d, self.factor = vocab_size, n, d, factor
        self.bounds = [0] + cutoffs + [vocab_size]
        self.widths = [n // factor ** i for i in range(len(self.bounds) - 1)]
        if min(self.widths) < 1:
            raise ValueError(f"n={n} is too narrow for {len(self.widths)} bands with factor "
                             f"{factor}: band widths {self.widths}; use fewer cutoffs or a larger n")
        std = init_std if init_std is not None else n ** -0.5
        self.tables = nn.ParameterList(
            nn.Parameter(torch.randn(hi - lo, w) * std)
            for lo, hi, w in zip(self.bounds, self.bounds[1:], self.widths))
        # (d, w) like nn.Linear(w, d).weight; std w^-1/2 keeps the projected scale ~ the table's
        self.projs = nn.ParameterList(
            nn.Parameter(torch.randn(d, w) * w ** -0.5) if w != d else None for w in self.widths)

    def forward(self, ids, drop=0.0):       # (...,) -> (..., d)
        out = None
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            table, proj = self.tables[i], self.projs[i]
            local = ids if len(self.widths) == 1 else (ids - lo).clamp(0, hi - lo - 1)
            y = F.embedding(local, table)
            if drop > 0:   # embedding (word-type) dropout: whole rows of the table, per step
                keep = torch.empty(hi - lo, 1, device=table.device).bernoulli_(1 - drop) / (1 - drop)
                y = y * F.embedding(local, keep)
            if proj is not None:
                y = F.linear(y, proj)
            if len(self.widths) == 1:
                return y
            # every band sees every token (no data-dependent shapes, so no host sync);
            # tokens outside the band are discarded here and get zero gradient
            inb = ((ids >= lo) & (ids < hi)).unsqueeze(-1)
            out = torch.where(inb, y, 0.0 if out is None else out)
        return out


class AdaptiveSoftmax(nn.Module):
    """log p(w | h) over an AdaptiveInput's tables: full softmax for one band, else adaptive softmax
    (Grave et al. 2017): head = band 0 plus one logit per tail cluster; a tail token's
    log-prob = head log-prob of its cluster + its log-softmax within the cluster, computed
    only for the tokens of that cluster. Holds only what the output adds: per-band hidden
    projections (when d_hidden != inp.d), the output bias, the cluster logits. `inp` is the
    input's map (tied) or a map that only the output uses (untied: TokenIO(tied=False))."""

    def __init__(self, inp, d_hidden, bias=True, cluster_bias=None):
        super().__init__()
        self.bounds, self.widths = list(inp.bounds), list(inp.widths)
        self.vocab_size, self.n_tail = inp.vocab_size, len(inp.widths) - 1
        self.out_projs = nn.ParameterList(
            nn.Parameter(torch.randn(inp.d, d_hidden) * d_hidden ** -0.5) for _ in inp.widths
        ) if d_hidden != inp.d else None
        self.bias = nn.Parameter(torch.zeros(inp.vocab_size)) if bias else None
        cluster_bias = bias if cluster_bias is None else cluster_bias
        self.cluster = nn.Linear(inp.widths[0], self.n_tail, bias=cluster_bias) if self.n_tail else None
        if self.cluster is not None:
            nn.init.zeros_(self.cluster.weight)

    def _in_band(self, h, i, inp):          # (N, d_hidden) -> (N, width of band i)
        if self.out_projs is not None:
            h = F.linear(h, self.out_projs[i])
        if inp.projs[i] is not None:        # the tied projection, transposed: d -> w_i
            h = h @ inp.projs[i]
        return h

    def _logits(self, h, i, inp):           # (N, d_hidden) -> (N, V_i [+ clusters if i == 0])
        lo, hi = self.bounds[i], self.bounds[i + 1]
        h = self._in_band(h, i, inp)
        logits = F.linear(h, inp.tables[i], None if self.bias is None else self.bias[lo:hi])
        if i == 0 and self.cluster is not None:
            logits = torch.cat([logits, self.cluster(h).to(logits.dtype)], -1)
        return _upcast(logits)

    def log_probs(self, h, inp):            # (..., d_hidden) -> (..., V) float32
        lead, h = h.shape[:-1], h.reshape(-1, h.shape[-1])
        head = F.log_softmax(self._logits(h, 0, inp), -1)
        c0 = self.bounds[1]
        parts = [head[:, :c0]]
        for i in range(1, self.n_tail + 1):
            tail = F.log_softmax(self._logits(h, i, inp), -1)
            parts.append(tail + head[:, c0 + i - 1:c0 + i])
        return torch.cat(parts, -1).view(*lead, self.vocab_size)

    def _plan(self, target, ignore_index, device):
        """(N,) targets -> valid mask, targets (ignored -> 0), cluster of each (0 = head), the
        order that sorts them by cluster, all on `device`, and the cluster sizes (a list).
        The sizes are the loss's one host sync, none at all where the targets are on the host."""
        valid = target != ignore_index
        target = torch.where(valid, target, 0)
        band = torch.bucketize(target, torch.tensor(self.bounds[1:-1], device=target.device),
                               right=True)                      # (N,) cluster, 0 = head
        order = torch.argsort(band, stable=True)
        counts = torch.bincount(band, minlength=self.n_tail + 1).tolist()
        return (*(to_device(t, device) for t in (valid, target, band, order)), counts)

    def loss(self, h, target, inp, reduction='mean', ignore_index=-100, label_smoothing=0.0):
        """Negative log-likelihood of `target` (...,) given h (..., d_hidden): a scalar, or
        (N,) for reduction='none'. target may be on the host (see TokenIO)."""
        h, target = h.reshape(-1, h.shape[-1]), target.reshape(-1)
        if self.n_tail == 0:
            z, target = self._logits(h, 0, inp), to_device(target, h.device)
            valid = target != ignore_index
            nll = softmax_nll(z, target, ignore_index, label_smoothing)  # (N,), 0 where ignored
            if reduction == 'none':
                return nll
            return nll.sum() if reduction == 'sum' else nll.sum() / valid.sum()
        if label_smoothing:
            raise ValueError("label smoothing needs a full softmax; pass no cutoffs")
        valid, target, band, order, counts = self._plan(target, ignore_index, h.device)
        c0 = self.bounds[1]
        head = F.log_softmax(self._logits(h, 0, inp), -1)
        head_idx = torch.where(band == 0, target, c0 + band - 1)
        nll = -head.gather(1, head_idx[:, None]).squeeze(1)     # (N,)
        for i, idx in enumerate(order.split(counts)[1:], 1):    # empty clusters still run, so
            lo = self.bounds[i]                                  # DDP sees every parameter used
            tail = F.log_softmax(self._logits(h[idx], i, inp), -1)
            nll = nll.index_add(0, idx, -tail.gather(1, (target[idx] - lo)[:, None]).squeeze(1))
        nll = nll * valid
        if reduction == 'none':
            return nll
        return nll.sum() if reduction == 'sum' else nll.sum() / valid.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------
# Character-CNN input (Kim et al. 2016), Baevski & Auli's CNN row

class CharCNN(nn.Module):
    """Word vectors from characters: (...,) ids -> (..., d). Each word is its characters cut
    to max_chars, between begin- and end-of-word markers, zero-padded to one length L; a
    convolution per (width, filters) over it, ReLU, max over time; highway layers; a Linear to
    d. Defaults: fairseq's character embedder, which Baevski & Auli's CNN row used (char
    embedding 4, widths 1-7 with 64..256 filters = 1408 features, 2 highway layers, 50 chars).
    Kim et al. used tanh after the convolutions and 15-wide characters."""
    FILTERS = ((1, 64), (2, 128), (3, 192), (4, 256), (5, 256), (6, 256), (7, 256))

    def __init__(self, words, d, char_dim=4, filters=FILTERS, highway=2, max_chars=50):
        super().__init__()
        spelled = [list(w)[:max_chars] for w in words]
        index = {c: i for i, c in enumerate(sorted({c for w in spelled for c in w}), 3)}
        seqs = [[1] + [index[c] for c in w] + [2] for w in spelled]   # 0 pad, 1 begin, 2 end
        L = max(max(map(len, seqs)), max(w for w, _ in filters))      # every width fits once
        chars = torch.zeros(len(words), L, dtype=torch.long)
        chars[torch.arange(L) < torch.tensor([len(s) for s in seqs])[:, None]] = torch.tensor(
            [c for s in seqs for c in s])
        self.register_buffer('chars', chars, persistent=False)        # (V, L), from `words`
        self.vocab_size, self.max_chars = len(words), max_chars
        self.char_emb = nn.Embedding(len(index) + 3, char_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(char_dim, f, w) for w, f in filters)
        width = sum(f for _, f in filters)
        self.highway = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(highway))
        for hw in self.highway:   # gate bias -1: mostly carry at init (fairseq; Kim: -2)
            nn.init.constant_(hw.bias[width:], -1.0)
        self.proj = nn.Linear(width, d)

    def forward(self, ids, drop=0.0):      # (...,) -> (..., d)
        x = self.char_emb(self.chars[ids])                     # (..., L, char_dim)
        x = x.reshape(-1, *x.shape[-2:]).transpose(1, 2)       # (N, char_dim, L)
        y = torch.cat([F.relu(conv(x)).amax(-1) for conv in self.convs], -1)   # (N, 1408)
        for hw in self.highway:            # y <- t * relu(W_h y) + (1 - t) * y
            h, t = hw(y).chunk(2, -1)
            t = torch.sigmoid(t)
            y = t * F.relu(h) + (1 - t) * y
        y = self.proj(y).view(*ids.shape, -1)                  # (..., d)
        if drop > 0:   # word-type dropout, as AdaptiveInput's: one draw per word per step
            keep = torch.empty(self.vocab_size, 1, device=y.device).bernoulli_(1 - drop) / (1 - drop)
            y = y * F.embedding(ids, keep.to(y.dtype))
        return y


# ----------------------------------------------------------------------------------------
# The seam: one object per vocabulary

class TokenIO(nn.Module):
    """Token representations for one vocabulary: embed(ids), loss(hidden, targets),
    log_probs(hidden), cache(). Models take a TokenIO and never look at its kind.

    kind        'standard'   table V x d_model (n = d_model), tied full softmax with bias
                'projective' table of width n, per-band projections n -> d_model (TXL)
                'adaptive'   adaptive input (bands n / factor^i) + tied adaptive softmax
                'define'     a map of width n (standard, or adaptive with cutoffs) + DeFINE
                             n -> k -> m, + a projection m -> d_model if they differ
                'cnn'        CharCNN over the spelling of `words` -> d_model (Kim et al.);
                             always untied: the output is the one tied=False builds below,
                             its tables n wide (n = d_model by default) in bands n / factor^i
                             (factor 4 by default: Baevski & Auli's adaptive softmax)
    tied        True: the output layer reuses the map's tables and band projections (the
                default; 'cnn' has none to reuse and needs False). False: the output layer
                tied=True would build, over a map of its own, AdaptiveInput(V, n, d_map,
                cutoffs, out_factor) (d_map = n for 'define', else d_model): own tables,
                and own band projections where a band is narrower than d_map. For 'define'
                that is: hidden -> n per band (when d_hidden != n), -> n / factor^i through
                the band's own projection, -> logits over its own table (+ bias); the unit
                stays on the input side alone. The cache() still replaces only the input.
    out_factor  band width divisor of an untied output (default: factor). kind='standard'
                with cutoffs, tied=False, out_factor=4 is an embedding input with Baevski &
                Auli's adaptive softmax (their ASM row).
    words       the vocabulary's strings, index = token id: what 'cnn' spells (required).
    char_dim, char_filters, char_highway, max_chars: the CharCNN (see its docstring).
    d_hidden    width of the hidden state given to loss/log_probs (default d_model); it is
                projected to the map's space when it differs (AWD-LSTM instead makes its
                last layer n wide, so none is needed).
    cutoffs     band edges of the frequency-sorted vocabulary (adaptive input / softmax).
    factor      band width divisor: 1 for standard/projective/define, 4 for adaptive.
    out_bias    output bias (V) and cluster-logit bias; default: present iff the output's
                factor is 1 (Transformer-XL's softmax has one, Baevski & Auli's adaptive
                softmax not; fairseq's full softmax has none either: pass out_bias=False).
    embed_scale multiplies the embedding (sqrt(d_model) in Transformers).
    unit_dropout, map_dropout  define: dropout inside the unit's layers, and on the map's
                output before the unit (the authors' later code uses both).
    dedup       define and cnn: run the unit once per distinct token of the batch, then
                gather (same function and gradients, less work; dropout inside the unit
                and on the map is then drawn per token type).
    output      False: no output layer (a vocabulary that is read, never predicted).

    Baevski & Auli's Table 3 rows (C = their cutoffs, d = d_model):
        SM     TokenIO('standard', V, d, tied=False)               embedding, full softmax
        SM-T   TokenIO('standard', V, d)                           the same, tied
        ASM    TokenIO('standard', V, d, cutoffs=C, tied=False, out_factor=4)
        CNN    TokenIO('cnn', V, d, cutoffs=C, words=vocab)        untied, out_factor 4
        ADP    TokenIO('adaptive', V, d, cutoffs=C, tied=False)    factor 4 both sides
        ADP-T  TokenIO('adaptive', V, d, cutoffs=C)
    BPE and BPE-T are SM and SM-T over a BPE vocabulary (a data-side change, not this one).
    """

    def __init__(self, kind, vocab_size, d_model, n=None, d_hidden=None, cutoffs=(),
                 factor=None, out_bias=None, embed_scale=1.0, init_std=None,
                 k=1024, m=None, depth=3, g_max=4, variant='define', unit_bias=True,
                 unit_norm=True, unit_act='gelu', unit_dropout=0.0, map_dropout=0.0,
                 dedup=False, output=True,
                 tied=None, out_factor=None, words=None, char_dim=4,
                 char_filters=CharCNN.FILTERS, char_highway=2, max_chars=50):
        super().__init__()
        if kind not in KINDS + WORD_KINDS:
            raise ValueError(f"kind={kind!r} unknown; choose one of {KINDS + WORD_KINDS}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} must be at least 2")
        n = d_model if n is None else n
        if kind == 'standard' and n != d_model:
            raise ValueError(f"a standard embedding has n = d_model ({d_model}), got n={n}; "
                             f"use kind='projective' or 'define' for a narrower table")
        if kind == 'standard' and factor not in (None, 1):
            raise ValueError(f"a standard embedding has one width (factor 1), got factor={factor}; "
                             f"use kind='adaptive' for bands of decreasing width")
        if kind == 'cnn' and (words is None or len(words) != vocab_size):
            raise ValueError(f"kind='cnn' spells the words: pass words= (vocab_size={vocab_size} "
                             f"strings, index = token id), got {None if words is None else len(words)}")
        if kind == 'cnn' and tied:
            raise ValueError("a character CNN has no table to tie the output to; use tied=False")
        tied = kind != 'cnn' if tied is None else tied
        factor = (4 if kind in ('adaptive', 'cnn') else 1) if factor is None else factor
        if tied and out_factor not in (None, factor):
            raise ValueError(f"out_factor={out_factor} != factor={factor}: a tied output has the "
                             f"input's bands; pass tied=False for bands of their own")
        out_factor = factor if out_factor is None else out_factor
        self.kind, self.vocab_size, self.d_model, self.n = kind, vocab_size, d_model, n
        self.embed_scale, self.dedup, self.tied = embed_scale, dedup, tied
        self.map_drop = nn.Dropout(map_dropout)
        d_map = n if kind == 'define' else d_model     # width the map's bands project to
        if kind == 'cnn':
            self.map = CharCNN(words, d_model, char_dim, char_filters, char_highway, max_chars)
        else:
            self.map = AdaptiveInput(vocab_size, n, d_map, cutoffs, factor, init_std)
        self.unit, self.in_proj, self.d_embed = None, None, d_model
        if kind == 'define':
            m = d_model if m is None else m
            self.unit = DeFINE(n, k, m, depth, g_max, variant, unit_bias, unit_norm,
                               unit_act, unit_dropout)
            if variant == 'define_noreduce':
                self.d_embed = self.unit.d_out      # the context model takes k-wide input
            elif m != d_model:
                self.in_proj = nn.Linear(m, d_model, bias=False)
        self.d_hidden = d_model if d_hidden is None else d_hidden
        # untied: the output's own tables (and band projections), the same shapes as tied
        self.out_map = None if tied or not output else AdaptiveInput(
            vocab_size, n, d_map, cutoffs, out_factor, init_std)
        out_bias = out_factor == 1 if out_bias is None else out_bias
        self.out = AdaptiveSoftmax(self._out_map(), self.d_hidden, bias=out_bias) if output else None
        self.cached = None                          # (V, d_embed) table once cache() ran

    def embed(self, ids, drop=0.0):                 # (...) ids -> (..., d_embed)
        """`drop`: embedding dropout on the rows of the map tables (AWD-LSTM's dropoute)."""
        dev = next(self.map.parameters()).device
        if self.cached is not None and not self.training:
            return F.embedding(ids.to(dev), self.cached)
        if self.dedup and (self.unit is not None or self.kind == 'cnn'):   # once per distinct token
            uniq, inv = torch.unique(ids, return_inverse=True)    # uniq[inv] == ids
            return self._input_path(to_device(uniq, dev), drop)[to_device(inv, dev)]
        return self._input_path(to_device(ids, dev), drop)

    forward = embed

    def _input_path(self, ids, drop):
        x = self.map(ids, drop)                     # (..., n or d_model)
        if self.unit is not None:
            x = self.unit(self.map_drop(x))         # (..., m)
        if self.in_proj is not None:
            x = self.in_proj(x)                     # (..., d_model)
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    def loss(self, hidden, targets, reduction='mean', ignore_index=-100, label_smoothing=0.0):
        """NLL of targets (...,) under hidden (..., d_hidden): a scalar, or (N,) for 'none'."""
        return self._output().loss(hidden, targets, self._out_map(), reduction, ignore_index,
                                   label_smoothing)

    def log_probs(self, hidden):                    # (..., d_hidden) -> (..., V) float32
        return self._output().log_probs(hidden, self._out_map())

    def _output(self):
        if self.out is None:
            raise RuntimeError("this TokenIO was built with output=False: it embeds, it does not predict")
        return self.out

    def _out_map(self):                             # the tables the output reads
        return self.map if self.out_map is None else self.out_map

    @torch.no_grad()
    def cache(self, chunk=8192):
        """Replace the input path by one (V, d_embed) lookup table, computed once in eval mode.
        Returns its size; train() drops it (the weights it froze may change)."""
        if self.training:
            raise RuntimeError("cache() freezes eval-mode outputs: call .eval() first")
        self.cached = None
        dev = next(self.parameters()).device
        rows = [self._input_path(torch.arange(s, min(s + chunk, self.vocab_size), device=dev), 0.0)
                for s in range(0, self.vocab_size, chunk)]
        self.cached = torch.cat(rows).float()
        return dict(rows=self.vocab_size, width=self.cached.shape[1],
                    bytes=self.cached.numel() * self.cached.element_size(),
                    input_path_params=sum(p.numel() for p in self._input_params()))

    def _input_params(self):
        mods = [self.map, self.unit, self.in_proj]
        return [p for mod in mods if mod is not None for p in mod.parameters()]

    def train(self, mode=True):
        if mode:
            self.cached = None
        return super().train(mode)


def count_params(model):
    """Split parameters as the paper's tables do: DeFINE units, input-output (TokenIO:
    maps, projections, softmax), context (everything else). Shared tensors count once."""
    def unique(mods):
        return {id(p): p.numel() for mod in mods for p in mod.parameters()}
    define = unique(m for m in model.modules() if isinstance(m, DeFINE))
    io = unique(m for m in model.modules() if isinstance(m, TokenIO))
    total = sum(unique([model]).values())
    d, i = sum(define.values()), sum(v for k, v in io.items() if k not in define)
    return dict(define=d, io=i, context=total - d - i, total=total)
