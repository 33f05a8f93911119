"""AWD-LSTM against a hand-written LSTM loop and full recomputation."""
import pytest
import torch
import torch.nn.functional as F

from define import KINDS, TokenIO
from lstm_lm import AWDLSTM, locked_dropout


def _model(kind='standard', **kw):
    n = 12 if kind == 'standard' else 16
    io = TokenIO(kind, 50, 12, n=None if kind == 'standard' else n, d_hidden=n,
                 cutoffs=[10, 30] if kind in ('adaptive', 'projective') else (), k=32, depth=2, g_max=2)
    args = dict(n_hidden=16, n_layer=3, dropout=0.0, dropouth=0.0, dropouti=0.0, dropoute=0.0,
                wdrop=0.0, alpha=0.0, beta=0.0)
    args.update(kw)
    return AWDLSTM(io, **args).double()


def _naive_lstm(x, w_ih, w_hh, b_ih, b_hh, h, c):   # the LSTM equations, one step at a time
    outs = []
    for t in range(x.shape[0]):
        i, f, g, o = (x[t] @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def test_dropconnect_equals_naive_lstm_with_the_dropped_matrix():
    model = _model(wdrop=0.5).train()
    ids, y = torch.randint(0, 50, (6, 3)), torch.randint(0, 50, (6, 3))
    torch.manual_seed(7)
    loss, _ = model(ids, y)          # alpha = beta = 0: the loss is the NLL
    torch.manual_seed(7)     # the same draws, in the same order: one mask per layer
    x = model.io.embed(ids)
    for rnn in model.rnns:
        w_hh = F.dropout(rnn.weight_hh_l0, 0.5, training=True)
        assert (w_hh == 0).float().mean().item() == pytest.approx(0.5, abs=0.15)
        h0 = torch.zeros(3, rnn.hidden_size, dtype=torch.double)
        x, _, _ = _naive_lstm(x, rnn.weight_ih_l0, w_hh, rnn.bias_ih_l0, rnn.bias_hh_l0, h0, h0)
    torch.testing.assert_close(loss, model.io.loss(x, y))
    loss.backward()
    assert all(r.weight_hh_l0.grad.abs().sum() > 0 for r in model.rnns)


def test_dropconnect_survives_train_eval_switches():
    model = _model(wdrop=0.5)
    ids = torch.randint(0, 50, (5, 2))
    for _ in range(3):
        model.eval()
        model(ids, ids)
        model.train()
        loss, _ = model(ids, ids)
        loss.backward()
    names = {n for n, _ in model.named_parameters()}
    assert {f'rnns.{i}.weight_hh_l0' for i in range(3)} <= names
    eval_out = model.eval()(ids, ids)[0]
    torch.testing.assert_close(eval_out, model(ids, ids)[0])   # no dropout at all in eval


def test_carried_state_equals_one_pass_over_both_chunks():
    model = _model().eval()
    ids, y = torch.randint(0, 50, (10, 3)), torch.randint(0, 50, (10, 3))
    whole, _ = model(ids, y)
    a, state = model(ids[:4], y[:4])
    b, _ = model(ids[4:], y[4:], state)
    torch.testing.assert_close((4 * a + 6 * b) / 10, whole)
    assert all(not s.requires_grad for hc in state for s in hc)


def test_ar_and_tar_are_the_l2_penalties():
    model = _model(alpha=2.0, beta=1.0).train()   # dropouts 0: the dropped output is the raw one
    ids, y = torch.randint(0, 50, (6, 2)), torch.randint(0, 50, (6, 2))
    outs = {}
    model.rnns[-1].register_forward_hook(lambda m, a, out: outs.update(raw=out[0]))
    loss, _ = model(ids, y)
    raw = outs['raw']                               # (T, B, n)
    want = 2.0 * raw.pow(2).mean() + 1.0 * (raw[1:] - raw[:-1]).pow(2).mean()
    torch.testing.assert_close(loss - model.io.loss(raw, y), want)
    model.eval()
    loss_e, _ = model(ids, y)                       # no penalties outside training
    torch.testing.assert_close(loss_e, model.io.loss(outs['raw'], y))


def test_locked_dropout_shares_one_mask_over_time():
    x = torch.ones(7, 4, 5)
    y = locked_dropout(x, 0.5, True)
    assert torch.equal(y, y[:1].expand_as(y))
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert locked_dropout(x, 0.5, False) is x


@pytest.mark.parametrize("kind", KINDS)
def test_every_embedding_kind_trains(kind):
    model = _model(kind, dropoute=0.1, dropouti=0.2, dropouth=0.2, dropout=0.2, wdrop=0.3,
                   alpha=2.0, beta=1.0).float()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = torch.randint(0, 50, (8, 4))
    first = None
    for _ in range(30):
        loss, _ = model(ids[:-1], ids[1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        first = first or loss.item()
    assert loss.item() < first
    assert model.rnns[-1].hidden_size == model.io.d_hidden   # tied: the last layer is n wide
