"""Transformer encoder-decoder for translation (Vaswani et al. 2017) whose token embeddings and
output softmax come from define.py (standard, projective, adaptive or DeFINE, one switch),
with batched greedy and beam search, checkpoint averaging and corpus BLEU.

Public API
----------
Transformer(src_io, tgt_io, n_layer=6, n_head=8, d_ff=2048, dropout=0.1, attn_dropout=0.0,
            act_dropout=0.0, pre_norm=False, label_smoothing=0.0, max_len=1024, pad=0, bos=2,
            eos=3)
    src_io, tgt_io: define.TokenIO (pass one object twice to share the vocabulary: source
    and target embeddings and the output layer are then a single table; a separate source
    TokenIO is built with output=False, since the source is never predicted).
  .forward(src (B, S), tgt (B, T + 2), state=None) -> (loss, None)   tgt = <s> ... </s> pad*
      mean cross entropy of tgt[:, 1:] given tgt[:, :-1] over the non-pad targets, label-
      smoothed in training mode; the state is what the language models carry (none here)
  .hidden(src, tgt_in (B, T)) -> decoder output (B, T, d)     batch-first, pad-padded
  .encode(src) -> (memory (B, S, d), src_pad_mask (B, S), True at pads)
  .decode(tgt_in, memory, src_pad_mask) -> (B, T, d)
  .init_cache(memory, src_pad_mask) -> cache     .decode_step(tokens (N,), cache) -> (N, V)
  Transformer.reorder_cache(cache, index) -> cache      (index_select on the N rows)
  .greedy(src, max_len_a=1.0, max_len_b=50) -> [[token ids]]
  .beam_search(src, beam=4, lenpen=0.6, max_len_a=1.0, max_len_b=50, return_scores=False)
      -> [[token ids]], or ([[token ids]], scores (B,)) with return_scores=True
  .translate(sentences, beam=4, lenpen=0.6, max_len_b=50, batch_size=64) -> [[token ids]]
      lists of source ids (no specials) in, hypotheses out in the same order
average_checkpoints(paths) -> state_dict          element-wise mean of checkpoints' 'model'
bleu(hyps, refs, tokenize='none') -> (score, signature)     sacreBLEU corpus BLEU

Choices
-------
- Base model as published: 6 + 6 layers, ReLU FFN, post-norm; pre_norm=True gives pre-norm
  blocks and a final LayerNorm after the encoder and after the decoder. io.embed(ids) comes
  scaled by the TokenIO (embed_scale: sqrt(d) for a table, as published; 1 for DeFINE, whose
  output is already O(1)), plus fixed sinusoids.
- Attention is written out (scores, softmax in float32, weighted sum): translation
  sentences are short (about 27 tokens), too short for fused attention kernels to pay.
- Dropout: `dropout` on embeddings + positions and on every sublayer output before its
  residual add; `attn_dropout` on attention weights; `act_dropout` after the ReLU.
- Decoding lengths: L = max_len_a * (source length without pads) + max_len_b per sentence
  (truncated to an integer) is the most tokens a hypothesis has before </s>; at step L only
  </s> may be chosen. <pad> and <s> are never generated.
- Beam score (GNMT length penalty): sum of log-probs / ((5 + len) / 6) ** lenpen, len =
  generated tokens counting </s>. Live beams are ranked by the raw sum; a sentence stops
  once it has `beam` finished hypotheses or reaches L; the best finished one is returned.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Transformer', 'average_checkpoints', 'bleu']


def _xavier(lin, parts=1):
    """Xavier-uniform weight, zero bias; a fused projection is `parts` stacked projections,
    each initialised as if it were its own d x d Linear."""
    for w in lin.weight.chunk(parts, 0):
        nn.init.xavier_uniform_(w)
    nn.init.zeros_(lin.bias)
    return lin


def sinusoids(max_len, d):          # (max_len, d): sin on even, cos on odd channels
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    angle = pos / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    pe = torch.zeros(max_len, d, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle[:, :d // 2])
    return pe.float()


def attend(q, k, v, mask, causal, dropout):
    """q (B, H, T, D), k, v (B, H, S, D); mask (B, 1, 1, S) bool, True = may attend; causal:
    query i sees keys up to S - T + i. -> (B, H, T, D)"""
    s = q @ k.transpose(-1, -2)                                             # (B, H, T, S)
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * q.size(-1) ** -0.5   # bf16 -> f32
    if mask is not None:
        s = s.masked_fill(~mask, float('-inf'))   # every row keeps a key (Transformer._keys)
    if causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=s.device).triu(S - T + 1),
                          float('-inf'))
    return F.dropout(s.softmax(-1), dropout).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head attention (see attend). Self-attention: one fused qkv projection.
    Cross-attention: q from the decoder, fused kv from the encoder memory (computed once per
    sentence when decoding step by step)."""

    def __init__(self, d, n_head, dropout, cross=False):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        if cross:
            self.q, self.kv = _xavier(nn.Linear(d, d)), _xavier(nn.Linear(d, 2 * d), 2)
        else:
            self.qkv = _xavier(nn.Linear(d, 3 * d), 3)
        self.proj = _xavier(nn.Linear(d, d))

    def heads(self, x, parts):       # (B, T, parts * d) -> parts x (B, H, T, d / H)
        return x.unflatten(-1, (parts, self.n_head, -1)).permute(2, 0, 3, 1, 4).unbind(0)

    def memory_kv(self, memory):     # (B, S, d) -> k, v (B, H, S, d / H)
        return self.heads(self.kv(memory), 2)

    def forward(self, x, mask=None, causal=False, past=None, kv=None):
        """Self-attention (kv None; past = cached (k, v) to extend) or cross-attention over
        kv = memory_kv(memory). mask: (B, 1, 1, S) bool, True where a key may be seen.
        Returns the output (B, T, d) and the (k, v) attended to (the new cache entry)."""
        if kv is None:
            q, k, v = self.heads(self.qkv(x), 3)
            if past is not None:     # step decoding: the new token sees every earlier one
                k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        else:
            (q,), (k, v) = self.heads(self.q(x), 1), kv
        y = attend(q, k, v, mask, causal, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).flatten(2)), (k, v)    # (B, T, d)


class Layer(nn.Module):
    """Encoder layer (self-attention, FFN) or decoder layer (+ cross-attention between them),
    post-norm LayerNorm(x + dropout(f(x))) or pre-norm x + dropout(f(LayerNorm(x)))."""

    def __init__(self, d, n_head, d_ff, dropout, attn_dropout, act_dropout, pre_norm, cross):
        super().__init__()
        self.dropout, self.act_dropout, self.pre_norm = dropout, act_dropout, pre_norm
        self.attn = Attention(d, n_head, attn_dropout)
        self.cross = Attention(d, n_head, attn_dropout, cross=True) if cross else None
        self.ff1, self.ff2 = _xavier(nn.Linear(d, d_ff)), _xavier(nn.Linear(d_ff, d))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3 if cross else 2))

    def _pre(self, x, i):            # pre-norm: normalise what goes into sublayer i
        return self.norms[i](x) if self.pre_norm else x

    def _post(self, x, h, i):        # residual; post-norm: normalise the sum
        x = x + F.dropout(h, self.dropout, self.training)
        return x if self.pre_norm else self.norms[i](x)

    def forward(self, x, mask=None, causal=False, past=None, memory_kv=None, memory_mask=None):
        h, kv = self.attn(self._pre(x, 0), mask, causal, past)
        x = self._post(x, h, 0)
        if self.cross is not None:
            h, _ = self.cross(self._pre(x, 1), memory_mask, kv=memory_kv)
            x = self._post(x, h, 1)
        h = F.dropout(F.relu(self.ff1(self._pre(x, -1))), self.act_dropout, self.training)
        return self._post(x, self.ff2(h), -1), kv


class Transformer(nn.Module):
    """Encoder-decoder Transformer over two TokenIOs (or one shared). Batch-first (B, T)."""

    def __init__(self, src_io, tgt_io, n_layer=6, n_head=8, d_ff=2048, dropout=0.1,
                 attn_dropout=0.0, act_dropout=0.0, pre_norm=False, label_smoothing=0.0,
                 max_len=1024, pad=0, bos=2, eos=3):
        super().__init__()
        d = tgt_io.d_model
        for side, io in (('src_io', src_io), ('tgt_io', tgt_io)):
            if io.d_model != d or io.d_embed != d:
                raise ValueError(f"{side}: d_model={io.d_model}, d_embed={io.d_embed}, but the "
                                 f"Transformer needs both equal to tgt_io.d_model={d}; build both "
                                 f"TokenIOs with the same d_model (and no 'define_noreduce')")
        if tgt_io.d_hidden != d:
            raise ValueError(f"tgt_io.d_hidden={tgt_io.d_hidden} must equal d_model={d}")
        if d % n_head:
            raise ValueError(f"d_model={d} is not divisible by n_head={n_head}")
        if pad == eos:
            raise ValueError(f"pad and eos must be different ids (both {pad})")
        if src_io is not tgt_io and src_io.out is not None:
            raise ValueError("a separate source TokenIO is never predicted: build it with "
                             "output=False (or pass one TokenIO twice to share the vocabulary)")
        self.src_io, self.tgt_io = src_io, tgt_io   # one object twice = one shared table
        self.d, self.max_len, self.dropout = d, max_len, dropout
        self.label_smoothing, self.pad, self.bos, self.eos = label_smoothing, pad, bos, eos
        args = (d, n_head, d_ff, dropout, attn_dropout, act_dropout, pre_norm)
        self.encoder = nn.ModuleList(Layer(*args, cross=False) for _ in range(n_layer))
        self.decoder = nn.ModuleList(Layer(*args, cross=True) for _ in range(n_layer))
        self.enc_norm = nn.LayerNorm(d) if pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(d) if pre_norm else nn.Identity()
        self.register_buffer('pe', sinusoids(max_len, d), persistent=False)

    def _embed(self, io, ids, start=0):    # (B, T) -> (B, T, d), positions start.. start+T-1
        if start + ids.size(1) > self.max_len:
            raise ValueError(f"sequence of {start + ids.size(1)} tokens exceeds max_len="
                             f"{self.max_len}; build the Transformer with a larger max_len")
        x = io.embed(ids) + self.pe[start:start + ids.size(1)]   # io applies embed_scale
        return F.dropout(x, self.dropout, self.training)

    @staticmethod
    def _keys(src_pad_mask):           # (B, S) True at pads -> (B, 1, 1, S) True = may attend
        keep = ~src_pad_mask
        # an all-pad source would leave a row with no key, and a softmax over -inf alone is
        # NaN: let such a row see every key instead (finite garbage that nothing reads)
        return (keep | ~keep.any(1, keepdim=True))[:, None, None, :]

    def encode(self, src):             # (B, S) -> memory (B, S, d), src_pad_mask (B, S)
        src_pad_mask = src == self.pad
        mask = self._keys(src_pad_mask)   # pad keys masked; pad query rows stay finite
        x = self._embed(self.src_io, src)
        for layer in self.encoder:
            x, _ = layer(x, mask)
        return self.enc_norm(x), src_pad_mask

    def decode(self, tgt_in, memory, src_pad_mask):    # (B, T) -> (B, T, d)
        mask, x = self._keys(src_pad_mask), self._embed(self.tgt_io, tgt_in)
        for layer in self.decoder:
            # causal alone is enough: target pads only follow the real tokens, so no real
            # position can see one; pad rows see pads but are never scored (ignore_index)
            x, _ = layer(x, causal=True, memory_kv=layer.cross.memory_kv(memory),
                         memory_mask=mask)
        return self.dec_norm(x)

    def hidden(self, src, tgt_in):     # (B, S), (B, T) -> (B, T, d)
        return self.decode(tgt_in, *self.encode(src))

    def forward(self, src, tgt, state=None):
        """tgt (B, T + 2) = <s> ... </s> pad*: predict tgt[:, 1:] from tgt[:, :-1]. Returns the
        cross entropy averaged over the non-pad targets (label-smoothed in training mode), and
        None: the state of the language models' calling convention, which a translation
        model does not carry."""
        eps = self.label_smoothing if self.training else 0.0
        loss = self.tgt_io.loss(self.hidden(src, tgt[:, :-1]), tgt[:, 1:], ignore_index=self.pad,
                                label_smoothing=eps)
        return loss, state

    # ------------------------------------------------------------------------------------
    # Incremental decoding

    def init_cache(self, memory, src_pad_mask):
        """Per decoder layer: cross-attention k, v from the memory (once) and self-attention
        k, v (None until the first step, then one more position per step)."""
        return dict(step=0, mask=self._keys(src_pad_mask), self_kv=[None] * len(self.decoder),
                    memory_kv=[layer.cross.memory_kv(memory) for layer in self.decoder])

    def decode_step(self, tokens, cache):   # (N,) last tokens -> (N, V) log-probs; cache grows
        x = self._embed(self.tgt_io, tokens[:, None], start=cache['step'])   # (N, 1, d)
        for i, layer in enumerate(self.decoder):
            x, cache['self_kv'][i] = layer(x, past=cache['self_kv'][i], memory_mask=cache['mask'],
                                           memory_kv=cache['memory_kv'][i])
        cache['step'] += 1
        return self.tgt_io.log_probs(self.dec_norm(x[:, 0]))

    @staticmethod
    def reorder_cache(cache, index):         # rows of every cached tensor picked by index (N',)
        def pick(kv):
            return None if kv is None else tuple(t.index_select(0, index) for t in kv)
        return dict(step=cache['step'], mask=cache['mask'].index_select(0, index),
                    self_kv=[pick(kv) for kv in cache['self_kv']],
                    memory_kv=[pick(kv) for kv in cache['memory_kv']])

    def _start(self, src, max_len_a, max_len_b):
        memory, src_pad_mask = self.encode(src)
        L = int(max_len_a * src.size(1) + max_len_b)     # longest hypothesis of the batch
        if L + 1 > self.max_len:
            raise ValueError(f"decoding up to {L + 1} positions exceeds max_len={self.max_len}; "
                             f"lower max_len_a/max_len_b or build with a larger max_len")
        limit = (max_len_a * (~src_pad_mask).sum(1) + max_len_b).long().clamp(max=L)   # (B,)
        return self.init_cache(memory, src_pad_mask), limit, L

    def _next(self, tokens, cache, t, limit):   # step t's log-probs, what may not be chosen -inf
        lp = self.decode_step(tokens, cache)     # (N, V)
        ids = torch.arange(lp.size(-1), device=lp.device)
        never = (ids == self.pad) | ((ids == self.bos) & (self.bos != self.eos))
        force = (t >= limit)[:, None] & (ids != self.eos)   # at the limit only </s>
        return lp.masked_fill(never | force, float('-inf'))

    def _strip(self, seqs):                  # (B, L + 1) ids -> lists cut at </s>, no pads
        out = []
        for row in seqs.tolist():
            row = row[:row.index(self.eos)] if self.eos in row else row
            out.append([w for w in row if w != self.pad])
        return out

    @torch.no_grad()
    def greedy(self, src, max_len_a=1.0, max_len_b=50):
        cache, limit, L = self._start(src, max_len_a, max_len_b)
        tokens = torch.full_like(limit, self.bos)
        seqs = src.new_full((src.size(0), L + 1), self.pad)
        done = torch.zeros_like(limit, dtype=torch.bool)
        for t in range(L + 1):
            tok = self._next(tokens, cache, t, limit).argmax(-1).masked_fill(done, self.pad)
            seqs[:, t] = tokens = tok
            done |= tok == self.eos
            if done.all():
                break
        return self._strip(seqs)

    @torch.no_grad()
    def beam_search(self, src, beam=4, lenpen=0.6, max_len_a=1.0, max_len_b=50,
                    return_scores=False):
        """All B sentences x `beam` hypotheses as B * beam rows at once. Scores: see Choices."""
        if beam < 1:
            raise ValueError(f"beam={beam}: the beam must hold at least one hypothesis")
        B, K, dev, inf = src.size(0), beam, src.device, float('-inf')
        cache, limit, L = self._start(src, max_len_a, max_len_b)
        cache = self.reorder_cache(cache, torch.arange(B, device=dev).repeat_interleave(K))
        row_limit = limit.repeat_interleave(K)                 # (B * K,)
        first_row = torch.arange(B, device=dev)[:, None] * K   # (B, 1)
        rank = torch.arange(2 * K, device=dev)
        tokens = src.new_full((B * K,), self.bos)
        seqs = src.new_full((B, K, L + 1), self.pad)            # live hypotheses
        dtype = torch.float64 if self.pe.dtype == torch.float64 else torch.float32
        scores = torch.full((B, K), inf, device=dev, dtype=dtype)
        scores[:, 0] = 0.0           # one live beam at first: K copies of <s> would tie
        fin_seqs, fin_scores = seqs.clone(), scores.new_full((B, K), inf)
        done = torch.zeros(B, dtype=torch.bool, device=dev)

        def pick(x, i):              # rows i (B, k') of sequences x (B, k, L + 1)
            return x.gather(1, i[..., None].expand(-1, -1, L + 1))

        for t in range(L + 1):
            lp = self._next(tokens, cache, t, row_limit)      # (B * K, V)
            V = lp.size(-1)
            cand = scores[..., None] + lp.view(B, K, V)
            top, idx = cand.view(B, K * V).topk(2 * K)          # (B, 2K): >= K do not end
            parent, tok = idx // V, idx % V
            hyp = pick(seqs, parent)                            # (B, 2K, L + 1)
            hyp[..., t] = tok
            ended = tok == self.eos
            # an </s> among a sentence's K best candidates finishes a hypothesis of t + 1
            # tokens (</s> counted); keep the K best finished by length-penalised score
            pen = ((5 + t + 1) / 6) ** lenpen
            new = torch.where(ended & (rank < K) & ~done[:, None], top / pen, inf)
            fin_scores, best = torch.cat([fin_scores, new], 1).topk(K)
            fin_seqs = pick(torch.cat([fin_seqs, hyp], 1), best)
            done |= (fin_scores[:, -1] > inf) | (t >= limit)
            if done.all():
                break
            # the K best candidates that did not end live on (non-</s> first, in rank order)
            keep = (ended * 2 * K + rank).argsort(1)[:, :K]    # (B, K)
            scores, tokens = top.gather(1, keep), tok.gather(1, keep).view(-1)
            seqs = pick(hyp, keep)
            cache = self.reorder_cache(cache, (first_row + parent.gather(1, keep)).view(-1))
        hyps = self._strip(fin_seqs[:, 0])
        return (hyps, fin_scores[:, 0]) if return_scores else hyps


    @torch.no_grad()
    def translate(self, sentences, beam=4, lenpen=0.6, max_len_b=50, batch_size=64):
        """Beam search over lists of source ids (no specials), batched by length (less
        padding); the hypotheses come back in the order of `sentences`."""
        dev = self.pe.device
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = [None] * len(sentences)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            src = torch.full((len(idx), max(len(sentences[i]) for i in idx) + 1), self.pad)
            for row, i in enumerate(idx):                    # w1 ... wn </s> pad*
                src[row, :len(sentences[i]) + 1] = torch.tensor([*sentences[i], self.eos])
            hyps = self.beam_search(src.to(dev), beam=beam, lenpen=lenpen, max_len_b=max_len_b)
            for row, i in enumerate(idx):
                out[i] = hyps[row]
        return out

# ----------------------------------------------------------------------------------------
# Checkpoint averaging and BLEU

def average_checkpoints(paths):
    """Element-wise mean of the 'model' state dicts saved by torch.save({'model': ..., ...}).
    Floating tensors are averaged in float64 and cast back; others come from the first file."""
    paths = list(paths)
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint path")
    total = None
    for path in paths:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        if not isinstance(ckpt, dict) or 'model' not in ckpt:
            raise ValueError(f"{path} has no 'model' entry; save checkpoints as "
                             f"torch.save({{'model': model.state_dict(), ...}}, path)")
        sd = ckpt['model']
        if total is None:
            first, ref = path, sd
            total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in sd.items()}
            continue
        if sd.keys() != total.keys():
            diff = sorted(set(sd) ^ set(total))
            raise ValueError(f"{path} and {first} hold different keys (e.g. {diff[:3]}): "
                             f"average checkpoints of the same model")
        for k, v in sd.items():
            if v.shape != total[k].shape:
                raise ValueError(f"{k} has shape {tuple(v.shape)} in {path} but "
                                 f"{tuple(total[k].shape)} in {first}: average checkpoints "
                                 f"of the same model")
            if v.is_floating_point():
                total[k] += v.double()
    return {k: (v / len(paths)).to(ref[k].dtype) if ref[k].is_floating_point() else v
            for k, v in total.items()}


def bleu(hyps, refs, tokenize='none'):
    """Corpus BLEU of hypotheses against one reference each: strings, or token lists (joined
    with spaces). tokenize='none' for already tokenized text (e.g. Multi30k's tok files),
    '13a' for detokenized text. Returns (score, sacreBLEU signature)."""
    try:
        from sacrebleu.metrics import BLEU
    except ImportError as e:
        raise ImportError("bleu() needs sacreBLEU: pip install sacrebleu") from e
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references; give one each")
    text = [[s if isinstance(s, str) else ' '.join(map(str, s)) for s in side]
            for side in (hyps, refs)]
    metric = BLEU(tokenize=tokenize)
    return float(metric.corpus_score(text[0], [text[1]]).score), str(metric.get_signature())
