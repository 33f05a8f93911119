"""Where a dynamic-shape compile of translation spends its time: the small Transformer that
tests/test_fast.py compiles in shape buckets (once a test of shapes='vary' too, removed when
train.py came to refuse that on a GPU: PERF.md), compiled by
fast.compiled(shapes='vary') with one inductor option changed per variant, each variant in a
process of its own (a cold compile) with a time limit. Prints the seconds of each batch shape's
first forward + backward, the compile included, and a table last.

    python experiments/compile_probe.py --timeout 150                # on a GPU: every variant
    python experiments/compile_probe.py --variants nopad --timeout 60

Variants: 'fast' (fast.compiled's options as they are), 'nopad' (force_shape_pad off),
'static' (dynamic=False: every shape compiles statically). PERF.md says why these two suspects.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = dict(fast={}, nopad=dict(options={'force_shape_pad': False}), static=dict(dynamic=False))
SHAPES = [(8, 11, 13), (6, 17, 9), (10, 7, 21)]   # (B, S, T): the test's, a new shape each

CHILD = '''
import json, sys, time
import torch
sys.path.insert(0, ROOT)
import fast
from define import TokenIO
from nmt import Transformer
change = json.loads(CHANGE)
compile_ = torch.compile
def patched(module, options=None, dynamic=None, **kw):   # fast.compiled's call, one thing changed
    options = {**(options or {}), **change.get('options', {})}
    return compile_(module, options=options, dynamic=change.get('dynamic', dynamic), **kw)
torch.compile = patched
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
torch.manual_seed(0)
model = Transformer(TokenIO('standard', 100, 32, output=False, embed_scale=32 ** 0.5),
                    TokenIO('standard', 120, 32, embed_scale=32 ** 0.5), n_layer=2, n_head=4,
                    d_ff=64, dropout=0.0, label_smoothing=0.1).to(dev)
fwd = fast.compiled(model, model, shapes='vary')
ctx = torch.autocast(dev, dtype=torch.bfloat16) if dev == 'cuda' else torch.autocast('cpu', enabled=False)
for B, S, T in SHAPES:
    src, tgt = torch.randint(4, 100, (B, S), device=dev), torch.randint(4, 120, (B, T), device=dev)
    tgt[:, 0] = 2
    t0 = time.time()
    with ctx:
        loss = fwd(src, tgt)[0]
    loss.backward()
    if dev == 'cuda':
        torch.cuda.synchronize()
    print(json.dumps(dict(shape=[B, S, T], seconds=round(time.time() - t0, 1), loss=loss.item())), flush=True)
'''


def probe(name, timeout):
    """-> (seconds per shape, status) of one variant in a fresh process."""
    code = (CHILD.replace('ROOT', repr(str(ROOT))).replace('CHANGE', repr(json.dumps(VARIANTS[name])))
            .replace('SHAPES', repr(SHAPES)))
    t0, times = time.time(), []
    cache = tempfile.mkdtemp(prefix='inductor-')   # cold: no kernels of an earlier variant
    try:
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                             timeout=timeout, env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)).stdout
        status = 'done'
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ''
        status = f'stopped at {timeout:.0f} s'
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for line in out.splitlines():
        if line.startswith('{'):
            times.append(json.loads(line)['seconds'])
    if status == 'done' and len(times) < len(SHAPES):
        status = 'failed (run the child code by hand for its traceback)'
    print(f'{name}: {times} s per shape, {status}, {time.time() - t0:.0f} s in all', flush=True)
    return times, status


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--variants', default=','.join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument('--timeout', type=float, default=150, help='seconds per variant (default 150)')
    a = p.parse_args(argv)
    names = a.variants.split(',')
    if set(names) - set(VARIANTS):
        p.error(f"--variants: {', '.join(sorted(set(names) - set(VARIANTS)))} unknown; known: {', '.join(VARIANTS)}")
    rows = {n: probe(n, a.timeout) for n in names}
    print(f'\n{"variant":<8} ' + ' '.join(f'{"x".join(map(str, s)):>10}' for s in SHAPES) + '  status')
    for n, (times, status) in rows.items():
        cells = [f'{t:10.1f}' for t in times] + [f'{"-":>10}'] * (len(SHAPES) - len(times))
        print(f'{n:<8} ' + ' '.join(cells) + f'  {status}')
    return rows


if __name__ == '__main__':
    main()
