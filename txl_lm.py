"""Transformer-XL language model (Dai et al., ACL 2019), the published WikiText-103 base model.

A stack of decoder blocks over a segment of T tokens that also attends to a memory of the M
previous positions of every layer (segment-level recurrence; the memory is detached, so no
gradient crosses a segment boundary). Position enters only through relative attention
(Dai et al. Sec. 3.3): with E_x the layer input, R_{i-j} the sinusoid of the distance i - j,
W_{k,E} the key projection and W_{k,R} the projection of the position embeddings,

    A_ij = q_i^T k_j  +  q_i^T W_{k,R} R_{i-j}  +  u^T k_j  +  v^T W_{k,R} R_{i-j}
           (a) content    (b) content-position     (c) global     (d) global position
                                                       content

with q_i = W_q E_{x_i}, k_j = W_{k,E} E_{x_j}, and u, v (r_w_bias, r_r_bias) shared by all
layers. (a) + (c) = (q_i + u)^T k_j is one matmul; (b) + (d) = (q_i + v)^T W_{k,R} R is computed
against every distance once and moved into place by a relative shift (pad and reshape).
Token embeddings and the output softmax come from a define.TokenIO, so the embedding kind
(standard, projective, adaptive, DeFINE) is a switch, never a fork in this file.

Layout: time-major (T, B, ...) at the interface (ids, targets, memory), batch-first inside:
(B, T, d), and (B, H, T, d_head) views of the projections for attention.

    model = TransformerXL(TokenIO('projective', V, 410, n=410, cutoffs=[20000, 40000, 200000]))
    mems = None
    for ids, targets in stream:                      # (T, B) each
        loss, mems = model(ids, targets, mems)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['TransformerXL', 'RelAttention', 'Block', 'rel_shift']

INIT_STD = 0.02     # the published init: N(0, 0.02) weights, N(1, 0.02) LayerNorm gains


def _upcast(x):     # softmax statistics in float32 at least (bf16 scores lose too much)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rel_shift(x):
    """(..., Q, K) scores against distances K-1, K-2, ... (column p <-> distance K-1-p) ->
    out[..., i, j] = x[..., i, j + Q-1-i]: the entry for key j of query i. Entries of keys
    j > i + K - Q (the future) are garbage and must be masked. Pad one zero column on the
    left, read the flat buffer Q elements later: views only, one copy (the pad)."""
    *lead, Q, K = x.shape
    x = F.pad(x, (1, 0)).flatten(-2)            # (..., Q * (K + 1))
    return x[..., Q:].view(*lead, Q, K)


class RelAttention(nn.Module):
    """Multi-head attention with relative positions (the four terms of Sec. 3.3)."""

    def __init__(self, d_model, n_head, d_head, dropout, dropatt):
        super().__init__()
        self.n_head, self.d_head, self.dropatt = n_head, d_head, dropatt
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)    # rows: q | k | v
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)      # W_{k,R}
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop, self.drop_att = nn.Dropout(dropout), nn.Dropout(dropatt)
        self.scale = d_head ** -0.5

    def forward(self, x, c, pos, r_w_bias, r_r_bias, mask):
        """x (B, Q, d) queries; c (B, K, d) keys/values: memory + x; pos (K, d) sinusoids
        of distances K-1, K-2, ..., 0; mask (Q, K) bool, True = hidden."""
        B, Q, _ = x.shape
        K, H, D = c.size(1), self.n_head, self.d_head
        w = self.qkv.weight
        q = F.linear(x, w[:H * D]).view(B, Q, H, D).transpose(1, 2)            # (B, H, Q, D)
        k, v = F.linear(c, w[H * D:]).view(B, K, 2, H, D).permute(2, 0, 3, 1, 4)  # (B, H, K, D)
        r = F.linear(pos, self.r_net.weight).view(K, H, D).permute(1, 2, 0)    # (H, D, K)
        ac = (q + r_w_bias.to(q.dtype)[:, None]) @ k.transpose(-1, -2)         # (a) + (c)
        bd = rel_shift((q + r_r_bias.to(q.dtype)[:, None]) @ r)                # (b) + (d)
        s = (_upcast(ac) + bd) * self.scale                                    # (B, H, Q, K)
        s = s.masked_fill(mask, torch.finfo(s.dtype).min)     # finite: a row is never NaN
        o = self.drop_att(s.softmax(-1)).to(v.dtype) @ v                       # (B, H, Q, D)
        return self.drop(self.o_net(o.transpose(1, 2).reshape(B, Q, H * D)))


class Block(nn.Module):
    """Relative attention + position-wise FF, post-norm as published (or pre-norm)."""

    def __init__(self, d_model, n_head, d_head, d_inner, dropout, dropatt, pre_norm):
        super().__init__()
        self.attn = RelAttention(d_model, n_head, d_head, dropout, dropatt)
        self.ff = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(), nn.Dropout(dropout),
                                nn.Linear(d_inner, d_model), nn.Dropout(dropout))
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, x, c, pos, r_w_bias, r_r_bias, mask):   # (B, Q, d) -> (B, Q, d)
        if self.pre_norm:                 # the memory holds the un-normalized residual stream
            cn = self.ln1(c)
            x = x + self.attn(cn[:, -x.size(1):], cn, pos, r_w_bias, r_r_bias, mask)
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x, c, pos, r_w_bias, r_r_bias, mask))
        return self.ln2(x + self.ff(x))


class TransformerXL(nn.Module):
    """forward(ids, targets=None, mems=None) -> (loss or hidden, new_mems); see forward.

    mem_len, clamp_len and same_length are plain attributes: the published evaluation sets
    mem_len = 640, clamp_len = 400, same_length = True (tgt_len 64)."""

    def __init__(self, io, n_layer=16, n_head=10, d_head=41, d_inner=2100, dropout=0.1,
                 dropatt=0.0, mem_len=150, clamp_len=-1, same_length=False, pre_norm=False):
        super().__init__()
        d = io.d_model
        if io.d_embed != d:
            raise ValueError(f"TransformerXL needs io.d_embed == io.d_model ({io.d_embed} != {d}): "
                             f"the 'define_noreduce' ablation feeds k-wide vectors and only fits "
                             f"the LSTM; use a DeFINE variant with a Reduce step")
        if io.d_hidden != d:
            raise ValueError(f"TransformerXL's hidden state is d_model={d} wide, but io.d_hidden="
                             f"{io.d_hidden}; build the TokenIO with d_hidden=None")
        if d % 2:
            raise ValueError(f"d_model={d} must be even (sin and cos halves of the position code)")
        if n_layer < 1 or n_head < 1 or d_head < 1 or d_inner < 1:
            raise ValueError(f"n_layer={n_layer}, n_head={n_head}, d_head={d_head}, d_inner="
                             f"{d_inner} must all be >= 1")
        if mem_len < 0:
            raise ValueError(f"mem_len={mem_len} must be >= 0 (0: no memory)")
        self.io, self.d_model, self.n_layer = io, d, n_layer
        self.mem_len, self.clamp_len, self.same_length = mem_len, clamp_len, same_length
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(Block(d, n_head, d_head, d_inner, dropout, dropatt, pre_norm)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d) if pre_norm else None   # pre-norm needs a final norm
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head))   # u, shared by all layers
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head))   # v, shared by all layers
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):              # the TokenIO initializes itself: leave it alone
        for mod in [*self.layers.modules(), self.ln_f]:
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, 0.0, INIT_STD)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.normal_(mod.weight, 1.0, INIT_STD)
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.r_w_bias, 0.0, INIT_STD)
        nn.init.normal_(self.r_r_bias, 0.0, INIT_STD)

    def init_mems(self):
        return None                       # empty memory; forward starts one

    def _positions(self, qlen, mlen, dtype, device):
        """Sinusoids of distances klen-1, ..., 0, clamped at clamp_len, (klen, d); and the
        (qlen, klen) mask, True = hidden."""
        klen = mlen + qlen
        f32 = torch.promote_types(dtype, torch.float32)    # angles are not for bf16
        dist = torch.arange(klen - 1, -1, -1, device=device, dtype=f32)
        if self.clamp_len > 0:
            dist = dist.clamp(max=self.clamp_len)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.d_model, 2, device=device, dtype=f32)
                                   / self.d_model)
        ang = dist[:, None] * inv_freq                                       # (klen, d/2)
        pos = torch.cat([ang.sin(), ang.cos()], -1).to(dtype)                # (klen, d)
        d_ij = (torch.arange(qlen, device=device)[:, None] + mlen
                - torch.arange(klen, device=device))                         # query - key
        mask = d_ij < 0                                                      # causal
        if self.same_length:   # every query sees the last mem_len keys (at least itself)
            mask = mask | (d_ij >= max(min(self.mem_len, klen), 1))
        return pos, mask

    def forward(self, ids, targets=None, mems=None):
        """ids, targets: (T, B) token ids, time-major. mems: None or a list of n_layer + 1
        tensors (M, B, d_model): the input of every layer (the embedding output first, the
        last layer's output last) at the M previous positions; M may be 0.
        Returns (loss, new_mems): loss = mean NLL of the T*B targets (io.loss), or the hidden
        states (T, B, d_model) when targets is None; new_mems: the last min(mem_len, M + T)
        positions of [mems, this segment] per layer, detached, contiguous (L, B, d_model), in
        the compute dtype (the autocast dtype under autocast, else the hidden dtype)."""
        x, new_mems = self.trunk(self.embed(ids), mems)
        if targets is None:
            return x.transpose(0, 1), new_mems
        return self.io.loss(x, targets.t()), new_mems    # mean over tokens: order is irrelevant

    def embed(self, ids):                 # (T, B) ids -> (B, T, d_model), dropped out
        # io.embed is already scaled: TokenIO's embed_scale is sqrt(d_model) for a table, as
        # published, and 1 for DeFINE, whose output is O(1) by construction
        return self.drop(self.io.embed(ids.t()))

    def trunk(self, x, mems=None):
        """The layers: x (B, T, d_model) the embedded segment -> (B, T, d_model), new_mems."""
        B, T, _ = x.shape
        if mems is not None and len(mems) != self.n_layer + 1:
            raise ValueError(f"mems must hold n_layer + 1 = {self.n_layer + 1} tensors, "
                             f"got {len(mems)}; pass None or what the last forward returned")
        mems = mems or [None] * (self.n_layer + 1)
        mlen = 0 if mems[0] is None else mems[0].size(0)
        pos, mask = self._positions(T, mlen, x.dtype, x.device)
        pos = self.drop(pos)              # one dropout of the position code, all layers
        cats = []                         # each layer's keys/values input: [memory, x]
        for layer, mem in zip(self.layers, mems):
            cats.append(self._cat(mem, x))
            x = layer(x, cats[-1], pos, self.r_w_bias, self.r_r_bias, mask)
        with torch.no_grad():
            cats.append(self._cat(mems[-1], x))
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            keep = max(self.mem_len, 0)
            # detach() although under no_grad: compiled, an output that is a copy of the
            # embedding (no memory yet) came back requiring grad, tying segments together
            new_mems = [c[:, c.size(1) - min(keep, c.size(1)):].transpose(0, 1).to(dtype)
                        .contiguous().detach() for c in cats]               # (L, B, d)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return self.drop(x), new_mems     # dropout before the softmax, as published

    @staticmethod
    def _cat(mem, x):                     # (M, B, d) or None, (B, T, d) -> (B, M + T, d)
        if mem is None or mem.size(0) == 0:
            return x
        return torch.cat([mem.transpose(0, 1).to(x.dtype), x], 1)
