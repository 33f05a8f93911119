"""Optional speed machinery for train.py and bench.py. Nothing here changes what is computed:
a reader learning the method can skip this file. train.py imports it only with --compile, or
with --cuda-graphs (the default) on a GPU. What each trick buys is measured in PERF.md.

compiled(module, model, shapes='fixed')
    torch.compile with inductor options for `model`:
    - where a weight has a side that is not a multiple of 8 (the published Transformer-XL is
      410 wide, 10 heads of 41, FF 2100; vocabularies rarely are), every matmul operand is
      padded to one: an unaligned bf16 matmul runs at a fraction of the aligned rate, and the
      pad is a cheap copy inside the graph. Where all are aligned, inductor pads only where
      its own timing says so: forced, it would pad the token count too, the inner size of
      every weight gradient, and copy the logits' gradient for it;
    - reductions of up to 1,024 elements run in one pass over memory even where inductor
      cannot see the row as contiguous (the relative-attention softmax reads its position
      term through the shift);
    - shapes: 'fixed' (the language models: one input shape); 'buckets' (translation batches
      padded to a few fixed shapes, data.token_batches(bucket=...)): each shape compiles once,
      static, and the recompile limit (8) is raised so that none falls back to eager; 'vary'
      (translation without buckets: a new shape most steps): dynamic shapes from the second
      shape on, with inductor's coalescing analysis off, since torch 2.11's fails an
      assertion there (tiling_utils.get_pw_red_splits). On a CPU only: on a GPU that
      compile did not finish in minutes (PERF.md), and train.py refuses it;
    - the full softmax's NLL (define.softmax_nll, F.cross_entropy) is replaced by the same
      value written out, logsumexp(z) - z_t: inductor fuses it into one pass over the logits
      and keeps only them and their log-sum-exp for the backward, where F.cross_entropy
      keeps the (N, V) float32 log-probabilities (2.2 GiB of translation's 50k-way step).
      Eager, the written-out form is the slower one (several passes over the logits), so
      define.py keeps F.cross_entropy.
graphed_step(model, env, accum, compile_it, shape, shapes='fixed') -> step(x, y, state) or None
    The forward and backward of a training micro-batch as CUDA graph replays, where that
    applies (one micro-batch per step):
    - AWD-LSTM on one GPU: 3 layers x 70 time steps are about 700 small kernels per step, and
      launching them from Python takes longer than running them. One graph per sequence
      length replays them all at once (GraphedStep).
    - Translation on one GPU, eager, in a few fixed shapes (shapes 'fixed' or 'buckets', not
      'vary'): one graph per batch shape (GraphedStep). Multi30k's small model launches
      thousands of kernels a step, each shorter than its launch. Not compiled translation:
      there a graph gains 1% (the step is the kernels' time), and replays of compiled steps
      captured for several shapes gave wrong gradients from the third shape on (PERF.md).
    - Transformer-XL with a memory, on any number of GPUs: the layers' forward and backward as
      two graphs (GraphedTrunk). The embedding and the adaptive softmax, whose shapes change
      with the tokens, run outside the graphs. Eager, they take the batch on the host, so
      DeFINE's distinct tokens and the softmax's cluster sizes are found there (define.TokenIO
      takes host ids) and the host never waits for the GPU. Compiled (--compile), the
      embedding's input path (map, unit) and the loss are compiled; the input path takes
      DeFINE's distinct ids padded to a multiple of 512 rows (padded_rows), so that a few
      fixed counts compile statically. The compiled full softmax takes the targets on the
      GPU (compiled code that took host tensors made the step slower); the adaptive softmax
      takes them on the host and plans its clusters there, eagerly (AdaptiveSoftmax._plan
      runs outside the compiled graphs), so that no step waits for the GPU. With
      several GPUs the step does not go through DDP's forward, so its hooks never fire: one
      all-reduce averages the gradients after the backward instead.
    Dropout masks are drawn inside the graphs from the CUDA generator, which every replay
    advances as an eager step would; captures restore the generator, so they draw nothing.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import define

DISTINCT_ROWS = 512   # padded_rows' multiple (a 60 x 150 WikiText-103 batch: ~4,300 distinct ids)


def compiled(module, model, shapes='fixed'):
    """torch.compile(module) with the options above, chosen by `model`'s weights."""
    import torch._inductor.config as inductor
    options = {'force_shape_pad': any(s % 8 for p in model.parameters() if p.dim() >= 2
                                      for s in p.shape[-2:])}
    if shapes == 'vary' and hasattr(inductor.triton, 'coalesce_tiling_analysis'):
        options['triton.coalesce_tiling_analysis'] = False
    if shapes == 'buckets':
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    _one_pass_rows()
    define.softmax_nll = written_out_nll
    if not hasattr(define.AdaptiveSoftmax._plan, 'eager'):   # host work, run as written
        define.AdaptiveSoftmax._plan = torch.compiler.disable(define.AdaptiveSoftmax._plan)
        define.AdaptiveSoftmax._plan.eager = True
    return torch.compile(module, options=options, dynamic=False if shapes == 'buckets' else None)


def written_out_nll(z, target, ignore_index=-100, label_smoothing=0.0):
    """define.softmax_nll's value, logsumexp(z) - z_t (smoothed: minus eps (mean(z) - z_t)),
    for compiled code; nll_loss(z, t) = -z_t picks the target's logit (0 where ignored)."""
    eps = label_smoothing
    nll = z.logsumexp(-1) + (1 - eps) * F.nll_loss(z, target, reduction='none',
                                                    ignore_index=ignore_index)
    if eps:
        nll = nll - eps * z.mean(-1)
    return nll * (target != ignore_index)


def _one_pass_rows():
    """Inductor keeps a reduction's row in registers (one pass over memory) up to 1024
    elements only where it sees the row contiguous, else up to 64. Set on the class, so that
    it holds in autograd's thread too (which compiles the backward)."""
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.virtualized import V
    except ImportError:         # another inductor: its own heuristic, a little slower
        return
    base = InductorChoices.should_use_persistent_reduction
    if getattr(base, 'one_pass_rows', False):
        return

    def rule(features, cooperative_reduction):
        import torch._inductor.config as inductor
        return base(features, cooperative_reduction) or (
            inductor.triton.persistent_reductions and not cooperative_reduction
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, 1024))
    rule.one_pass_rows = True
    InductorChoices.should_use_persistent_reduction = staticmethod(rule)


def graphed_step(model, env, accum, compile_it, shape, shapes='fixed'):
    """A graphed replacement for train.py's step where one applies, else None. shape: the
    (T, B) of a micro-batch (Transformer-XL captures its layers for it); shapes: as compiled's
    (translation: a graph per shape, so not 'vary')."""
    from lstm_lm import AWDLSTM
    from nmt import Transformer
    from txl_lm import TransformerXL
    if env.device.type != 'cuda' or accum != 1:
        return None
    if isinstance(model, AWDLSTM) and env.world == 1 and not compile_it:
        return GraphedStep(model, env.ctx, carry=True)
    if isinstance(model, Transformer) and env.world == 1 and not compile_it and shapes != 'vary' \
            and all(io.out is None or io.out.n_tail == 0 for io in (model.src_io, model.tgt_io)):
        return GraphedStep(model, env.ctx)
    if isinstance(model, TransformerXL) and model.mem_len > 0:
        return GraphedTrunk(model, env.ctx, compile_it, shape, env.world)
    return None


def _capture_ctx(ctx):
    """The autocast context `ctx` with its weight-cast cache off, as graph captures require."""
    if isinstance(ctx, torch.autocast):
        return torch.autocast(ctx.device, dtype=ctx.fast_dtype, cache_enabled=False)
    return ctx


class GraphedStep:
    """A micro-batch's forward and backward replayed from one graph per input shape: the
    AWD-LSTM's sequence lengths (carry=True: its (h, c) state goes in and out), translation's
    batch shapes. fwd: what runs the forward, the model unless given (a compiled model is
    not graphed: see graphed_step on translation; a test keeps that case).

    The graphs share one memory pool (about 60 lengths occur; a pool each would reserve
    much more), which is safe because they never run concurrently and each graph's outputs
    stay allocated as long as the graph does. Inputs, the carried state and the gradients
    live in static buffers: a replay zeroes the gradients and writes them, and the call
    hands them to the parameters' .grad. DeFINE runs on every token (no torch.unique, which
    would wait for the host: the same outputs and gradients)."""

    def __init__(self, model, ctx, fwd=None, carry=False):
        self.model, self.ctx, self.carry = model, _capture_ctx(ctx), carry
        self.fwd = model if fwd is None else fwd
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.graphs, self.state, self.pool = {}, None, torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()   # warm-ups and captures on one side stream
        for io in {m for m in model.modules() if isinstance(m, define.TokenIO)}:
            io.dedup = False

    def _fwd_bwd(self, x, y, state):
        torch._foreach_zero_(self.grads)
        with self.ctx:
            loss, new = self.fwd(x, y, state)
        loss.backward()
        return loss.detach(), new

    def _capture(self, x, y):
        rng = torch.cuda.get_rng_state()
        for p, g in zip(self.params, self.grads):   # the backward accumulates into these
            p.grad = g
        if self.carry and self.state is None:       # static state (zeros = a fresh start)
            with torch.no_grad(), self.ctx:
                new = self.model(x, y, None)[1]
            self.state = [tuple(torch.zeros_like(s) for s in hc) for hc in new]
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # warm-up of this shape (cuDNN plans, autograd;
            self._fwd_bwd(x, y, self.state)   # compiled: the compile)
        g = torch.cuda.CUDAGraph()
        sx, sy = x.clone(), y.clone()
        with torch.cuda.graph(g, pool=self.pool, stream=self.stream):
            loss, new = self._fwd_bwd(sx, sy, self.state)
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.set_rng_state(rng)
        return g, sx, sy, loss, new

    def __call__(self, x, y, state):        # x, y on the host -> (loss, new state or None)
        key = (x.shape, y.shape)
        if key not in self.graphs:
            dev = self.grads[0].device
            self.graphs[key] = self._capture(x.to(dev), y.to(dev))
        g, sx, sy, loss, new = self.graphs[key]
        sx.copy_(x.pin_memory(), non_blocking=True)    # (a no-op where already page-locked)
        sy.copy_(y.pin_memory(), non_blocking=True)
        if self.carry:                      # the state in (None: zeros, a fresh start)
            for hc, src in zip(self.state, state or [None] * len(self.state)):
                for s, v in zip(hc, src or [None, None]):
                    s.copy_(v) if v is not None else s.zero_()
        g.replay()
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        return loss, new


class _Flat(torch.nn.Module):   # the layers for make_graphed_callables: tensors in, tensors out
    def __init__(self, model, trunk):
        super().__init__()
        self.model, self.trunk = model, trunk   # model: its parameters are the graph's inputs

    def forward(self, x, *mems):
        x, new = self.trunk(x, list(mems))
        return (x, *new)


class GraphedTrunk:
    """Transformer-XL's step with its layers' forward and backward replayed from two graphs.

    Captured when constructed (torch.cuda.make_graphed_callables), for segments of `shape`
    (T, B) with a full memory (mem_len positions); other segments (the first ones, before
    the memory is full; a short last one) run the plain model. The new memory is the graph's
    output buffers, detached: the next call copies them into its inputs before the replay
    overwrites them. Capture before the first training step: while an earlier step's
    autograd graph is alive, the parameters' gradient accumulators belong to the default
    stream, and capturing the backward fails."""

    def __init__(self, model, ctx, compile_it, shape, world=1):
        self.model, self.ctx, self.world, self.compile_it = model, ctx, world, compile_it
        self.loss = compiled(model.io.loss, model) if compile_it else model.io.loss
        if compile_it:   # the embedding stays eager around a compiled input path (map, unit),
            # so that DeFINE's distinct tokens are found in the host batch, without a sync
            model.io._input_path = padded_rows(compiled(model.io._input_path, model, 'buckets'))
        rng, was = torch.cuda.get_rng_state(), model.training
        ids = torch.zeros(shape, dtype=torch.long)
        model.eval()                                # a full memory to capture with
        mems = None
        with torch.no_grad(), ctx:
            x = model.embed(ids)
            while mems is None or mems[0].size(0) < model.mem_len:
                mems = model.trunk(x, mems)[1]
        model.train(was)
        trunk = compiled(model.trunk, model) if compile_it else model.trunk
        with _capture_ctx(ctx):
            self.graphed = torch.cuda.make_graphed_callables(
                _Flat(model, trunk), (x.clone().requires_grad_(), *mems), allow_unused_input=True)
        self.shapes = (ids.shape, *(m.shape for m in mems))
        torch.cuda.set_rng_state(rng)

    def __call__(self, ids, targets, mems):     # ids, targets (T, B) on the host
        if (ids.shape, *(m.shape for m in mems or [])) == self.shapes:
            targets = targets.t().reshape(-1)       # (B * T,), the order of the layers' rows
            if self.compile_it and self.model.io.out.n_tail == 0:   # the compiled full
                targets = define.to_device(targets, mems[0].device)   # softmax: targets on the GPU
            with self.ctx:
                x = self.model.embed(ids)           # (B, T, d)
            out = self.graphed(x, *mems)
            with self.ctx:
                loss = self.loss(out[0], targets)
            mems = [m.detach() for m in out[1:]]
        else:
            with self.ctx:
                loss, mems = self.model(ids, targets, mems)
        loss.backward()
        if self.world > 1:
            all_reduce_grads(self.model.parameters(), self.world)
        return loss.detach(), mems


def padded_rows(input_path, multiple=DISTINCT_ROWS):
    """TokenIO._input_path for a 1-D list of distinct ids (DeFINE's dedup) padded with id 0 to
    a multiple of `multiple` rows and cut back after: the count changes every batch, and a
    few fixed counts compile statically (matmuls padded to aligned widths, as fixed shapes
    are) where a dynamic count would not. Each row is computed on its own (the unit has no
    cross-row step), so the padding changes no output and gets no gradient."""
    def call(ids, drop=0.0):
        if ids.dim() != 1:
            return input_path(ids, drop)
        n = ids.numel()
        return input_path(F.pad(ids, (0, -n % multiple)), drop)[:n]
    return call


def all_reduce_grads(params, world):
    """Every rank's gradients averaged in one all-reduce (a parameter that got no gradient on
    some rank counts as zeros there); the start must be equal on every rank (DDP's
    constructor broadcasts it)."""
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)
