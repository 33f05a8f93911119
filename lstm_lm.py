"""AWD-LSTM language model (Merity, Keskar & Socher, ICLR 2018) on the define.py seam.

Stacked single-layer LSTMs, time-major (T, B). The regularisers of the paper:
- embedding dropout (dropoute): whole rows of the map table dropped per step; with DeFINE
  it drops rows of the n-wide map, before the unit.
- locked (variational) dropout: one mask per sequence, shared over time, on the embedding
  (dropouti), between layers (dropouth) and on the output (dropout).
- DropConnect (wdrop) on each hidden-to-hidden matrix, drawn once per forward. The LSTM is
  then called as a function of its weights with the dropped matrix in place of W_hh
  (torch.lstm, the op behind nn.LSTM), so the Parameter itself is never replaced and
  train/eval switches cannot break it (the reference WeightDrop does).
- AR (alpha: L2 of the dropped last-layer output) and TAR (beta: L2 of the difference of
  consecutive raw last-layer outputs), added to the loss in training only.
The last LSTM layer is as wide as the output side (io.d_hidden) so the softmax can be tied to
the table: 400 for the standard PTB model, n = 128 with DeFINE.

forward(ids, targets, state) -> (loss, state): loss is the mean negative log-likelihood, plus
AR and TAR in training mode (what training minimises); state the detached (h, c) per layer.
Without targets: (hidden (T, B, d_hidden), state), for sampling.
"""
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F


def locked_dropout(x, p, training):   # x (T, B, d): one mask per sequence, shared over time
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - p) / (1 - p)
    return x * mask


class AWDLSTM(nn.Module):
    def __init__(self, io, n_hidden=1150, n_layer=3, dropout=0.4, dropouth=0.25,
                 dropouti=0.4, dropoute=0.1, wdrop=0.5, alpha=2.0, beta=1.0, rnn_fp32=False):
        super().__init__()
        if n_layer < 1:
            raise ValueError(f"n_layer={n_layer}: an LSTM LM needs at least one layer")
        self.io = io
        self.dropout, self.dropouth, self.dropouti, self.dropoute = dropout, dropouth, dropouti, dropoute
        self.wdrop, self.alpha, self.beta, self.rnn_fp32 = wdrop, alpha, beta, rnn_fp32
        sizes = [io.d_embed] + [n_hidden] * (n_layer - 1) + [io.d_hidden]
        self.rnns = nn.ModuleList(nn.LSTM(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        for rnn in self.rnns:   # AWD-LSTM's range, U(-1/sqrt(h), 1/sqrt(h)), is nn.LSTM's own
            rnn.flatten_parameters()

    def _run(self, rnn, x, hc):           # one LSTM layer: x (T, B, d_in) -> y (T, B, d_out), (h, c)
        # autocast runs cuDNN's recurrence in bf16; rnn_fp32 keeps it in float32 (TF32)
        fp32 = self.rnn_fp32 and torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if fp32 else nullcontext():
            if fp32:
                x, hc = x.float(), hc and tuple(s.float() for s in hc)
            if not (self.training and self.wdrop > 0):
                return rnn(x, hc)
            # DropConnect: the same LSTM called as a function of [W_ih, dropped W_hh, b_ih,
            # b_hh]. Handing nn.LSTM a replaced weight would make it re-flatten, i.e. move
            # its Parameters into newly allocated memory, on every call
            w = [rnn.weight_ih_l0, F.dropout(rnn.weight_hh_l0, self.wdrop, training=True),
                 rnn.bias_ih_l0, rnn.bias_hh_l0]
            if hc is None:
                z = x.new_zeros(1, x.size(1), rnn.hidden_size)
                hc = (z, z)
            y, h, c = torch.lstm(x, hc, w, True, 1, 0.0, True, False, False)
            return y, (h, c)

    def forward(self, ids, targets=None, state=None):   # ids, targets: (T, B)
        """-> (loss, new state); without targets (hidden (T, B, d_hidden), new state)."""
        if state is not None:   # torch.lstm checks no sizes: a wrong state would crash the process
            shapes = [[tuple(s.shape) for s in hc] for hc in state]
            if len(state) != len(self.rnns) or any(
                    sh != [(1, ids.size(1), rnn.hidden_size)] * 2 for sh, rnn in zip(shapes, self.rnns)):
                raise ValueError(f"the carried state has shapes {shapes}; a batch of {ids.size(1)} "
                                 f"streams needs {len(self.rnns)} (h, c) pairs (1, {ids.size(1)}, "
                                 f"hidden): pass None to start afresh")
        x = self.io.embed(ids, drop=self.dropoute if self.training else 0.0)   # (T, B, d_embed)
        x = locked_dropout(x, self.dropouti, self.training)
        new_state = []
        for l, rnn in enumerate(self.rnns):
            x, hc = self._run(rnn, x, None if state is None else state[l])
            new_state.append(tuple(s.detach() for s in hc))   # truncated BPTT
            raw = x
            last = l == len(self.rnns) - 1
            x = locked_dropout(x, self.dropout if last else self.dropouth, self.training)
        if targets is None:
            return x, new_state
        loss = self.io.loss(x, targets)                         # x: (T, B, d_hidden)
        if self.training:
            if self.alpha:
                loss = loss + self.alpha * x.float().pow(2).mean()
            if self.beta:
                loss = loss + self.beta * (raw[1:] - raw[:-1]).float().pow(2).mean()
        return loss, new_state
