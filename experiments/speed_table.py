"""The speed issue's report in one GPU command: bench.py's rows for the code here and for a
copy of earlier code, every bench in a process of its own, --parallel at a time compiling
together, then timed one at a time (an exclusive lock; each waits after its warm-up until the
others of its wave are warm, or until --wait-s), so that no timed window overlaps another or a
compile. The next wave starts when one has ended. A table last.

    git archive HEAD | tar -x -C .gpu/head          # here, where git is: the code to compare with
    python experiments/speed_table.py --before .gpu/head                # on the GPU machine
    python experiments/speed_table.py --rows define,projective --before .gpu/head --timeout 400

Rows (ROWS below) are bench.py arguments; --row NAME='ARGS' adds or replaces one, where
leading NAME=VALUE words in capitals set that bench's environment (an inductor knob:
--row cd='TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 --config ...'). Each line
of the table: ms/step, tok/s, MFU on bench.py's count (6 N + attention) and, for translation,
on every matmul's count, peak memory (and what the allocator reserved: a CUDA graph's replays
use memory of its pool that the peak misses), and whether the loss after the steps was finite.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = {   # name -> bench.py arguments (the speed issue's targets, PERF.md)
    'txl_base': '--config wt103_txl_base --compile True',
    'define': '--config wt103_txl --embed define n=128 --compile True',
    'projective': '--config wt103_txl --embed projective n=128 --compile True',
    'nmt_base': '--config wmt14_transformer_base max_tokens=25000 --compile True',
    'default': '--model txl --embed define',   # the main command's step: graphs, eager
}

# bench.py of the code in the current folder, its timing made to wait for the others
LOCKED = '''
import fcntl, glob, os, sys, time
sys.path.insert(0, os.getcwd())
import torch, bench
group, n, wait, orig = os.environ['PAR_DIR'], int(os.environ['PAR_N']), float(os.environ['PAR_WAIT']), bench.timed
lock = os.environ['PAR_LOCK']
def timed(step, steps, warmup, device):
    for _ in range(warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    open(f"{group}/ready.{os.getpid()}", "w").close()
    t0 = time.time()
    while len(glob.glob(f"{group}/ready.*")) < n and time.time() - t0 < wait:
        time.sleep(0.5)
    timed.lock = open(lock, "w")   # held until this process exits
    fcntl.flock(timed.lock, fcntl.LOCK_EX)
    return orig(step, steps, 2, device)
bench.timed = timed
sys.argv = ["bench.py"] + sys.argv[1:]
bench.main()
'''
LINE = re.compile(r'\|\s+(?P<tok>\d+) tok/s \|\s+(?P<ms>[\d.]+) ms/step \|\s+MFU\s+(?P<mfu>[\d.na]+)% \|'
                  r' peak\s+(?P<peak>[\d.na]+) GiB(?:, reserved\s+(?P<reserved>[\d.na]+) GiB)? \|'
                  r' loss \S+ \(finite: (?P<finite>\w+)\)')
ENV_WORD = re.compile(r'^[A-Z_][A-Z0-9_]*=')
ALL_MM = re.compile(r'every matmul: .*\| MFU\s+(?P<mfu>[\d.na]+)%')


def split_env(row):
    """A row's leading NAME=VALUE words in capitals -> (environment, bench.py arguments);
    train.py's settings written key=value are lower case and stay arguments."""
    words, env = shlex.split(row), {}
    while words and ENV_WORD.match(words[0]):
        env.update([words.pop(0).split('=', 1)])
    return env, words


def parse(text):
    """bench.py's output -> dict(ms, tok, mfu, mfu_all, peak, reserved, finite), or None if it
    has no result (reserved: '-' from a bench.py that did not print it)."""
    m = LINE.search(text)
    if not m:
        return None
    out = dict(m.groupdict())
    a = ALL_MM.search(text)
    out['mfu_all'] = a['mfu'] if a else '-'
    out['reserved'] = out['reserved'] or '-'
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', default=','.join(ROWS), help="names of ROWS, comma-separated (default: all)")
    ap.add_argument('--row', action='append', default=[], metavar="NAME='ARGS'",
                    help='add or replace a row: bench.py arguments')
    ap.add_argument('--before', help='a folder with earlier code: its rows are measured too')
    ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--parallel', type=int, default=6,
                    help='benches compiling at once (10 at once ran out of an 80 GB GPU\'s memory)')
    ap.add_argument('--timeout', type=float, default=540, help='seconds for the whole command')
    ap.add_argument('--wait-s', type=float, default=330, help='longest wait for the others after warm-up')
    ap.add_argument('--logs', help='a folder for each bench\'s output')
    args = ap.parse_args(argv)
    rows = dict(ROWS)
    for r in args.row:
        name, sep, bench_args = r.partition('=')
        if not sep or not name:
            ap.error(f"--row {r!r}: write NAME='bench.py arguments'")
        rows[name] = bench_args
    names = [n for n in args.rows.split(',') if n]
    unknown = [n for n in names if n not in rows]
    if unknown or not names:
        ap.error(f"--rows: unknown {unknown}; choose from {sorted(rows)} or add one with --row")
    sides = [('now', ROOT)]
    if args.before:
        before = Path(args.before).resolve()
        if not (before / 'bench.py').exists():
            ap.error(f"--before {args.before}: no bench.py there; unpack the code to compare with "
                     f"(git archive COMMIT | tar -x -C {args.before})")
        sides.insert(0, ('before', before))
    logs = Path(args.logs or tempfile.mkdtemp(prefix='speed_table_'))
    logs.mkdir(parents=True, exist_ok=True)
    lock = Path(tempfile.mkdtemp(prefix='speed_lock_'), 'lock')
    jobs = [(name, side, folder) for name in names for side, folder in sides]
    procs, t0 = [], time.time()
    for w in range(0, len(jobs), max(args.parallel, 1)):   # a row's two codes in one wave
        wave, group = [], tempfile.mkdtemp(prefix='speed_wave_')
        env = dict(os.environ, PAR_DIR=group, PAR_N=str(len(jobs[w:w + args.parallel])),
                   PAR_WAIT=str(args.wait_s), PAR_LOCK=str(lock))
        for name, side, folder in jobs[w:w + args.parallel]:
            log = open(logs / f'{name}_{side}.log', 'w')
            own, words = split_env(rows[name])
            cmd = [sys.executable, '-c', LOCKED] + words + ['--steps', str(args.steps)]
            wave.append((name, side, log, subprocess.Popen(cmd, cwd=folder, env={**env, **own}, stdout=log,
                                                            stderr=subprocess.STDOUT)))
        procs += wave
        while wave:   # a bench that ended counts as ready, so that no other waits for it
            time.sleep(0.5)
            late = time.time() - t0 > args.timeout
            for job in list(wave):
                name, side, log, p = job
                if late and p.poll() is None:
                    p.kill()
                if p.poll() is not None:
                    Path(group, f'ready.{p.pid}').touch()   # the name its own ready file has
                    log.close()
                    wave.remove(job)
                    print(f"{time.time() - t0:6.0f} s  {name} ({side}) exited {p.returncode}", flush=True)
    print(f"\n{'row':<12} {'code':<7} {'ms/step':>8} {'tok/s':>8} {'MFU':>6} {'MFU all':>8} "
          f"{'peak GiB':>9} {'reserved':>9}  finite  bench.py arguments")
    for name, side, _, p in procs:
        r = parse((logs / f'{name}_{side}.log').read_text())
        if r is None:
            print(f"{name:<12} {side:<7} {'no result (exit ' + str(p.returncode) + ')':>33}  see "
                  f"{logs / f'{name}_{side}.log'}")
            continue
        print(f"{name:<12} {side:<7} {r['ms']:>8} {r['tok']:>8} {r['mfu']:>5}% {r['mfu_all']:>7}"
              f"{'%' if r['mfu_all'] != '-' else ' '} {r['peak']:>9} {r['reserved']:>9}  "
              f"{r['finite']:<6}  {rows[name]}")
    return 0 if all(p.returncode == 0 for *_, p in procs) else 1


if __name__ == '__main__':
    sys.exit(main())
