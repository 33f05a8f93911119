"""Many training runs at once on one GPU: how the README's multi-seed tables were made.

A job file has one row per line: a NAME, then train.py's arguments. Each row runs once per seed
as NAME_sSEED (the log names plot.py --final groups by), PARALLEL at a time; with the MPS
daemon running (`nvidia-cuda-mps-control -d`) their kernels share the GPU. Nothing is lost to
a time limit: at --budget seconds every run still going gets SIGINT, on which train.py writes
its checkpoint and stops, and the next call resumes it (a run whose log holds its final test is
skipped). Logs are appended under --runs-dir and copied to --logs, each call's segment ending
with '# exited CODE after SECONDS s' (a run's wall time: the sum of its segments); a table is
printed last.

    nvidia-cuda-mps-control -d
    python experiments/run_jobs.py experiments/wt2_n64.txt --parallel 6 --budget 540 \\
        --common "--data-dir data --cache-dir .cache"
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import plot   # noqa: E402  (train.py's log lines, read as plot.py reads them)


def read_jobs(path, seeds):
    """[(name, args)]: every row of the job file once per seed."""
    jobs = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith('#'):
            name, *args = shlex.split(line)
            if not re.fullmatch(r'[\w.=-]+', name):
                sys.exit(f"error: {path}:{i}: the row name {name!r} must be letters, digits, _ . = -")
            jobs += [(f'{name}_s{s}', args + ['--seed', str(s)]) for s in seeds]
    return jobs


def wall_time(log):
    """Seconds a run's processes ran, over every call: the sum of its log's 'exited' lines
    (0 for a run not started)."""
    log = Path(log)
    text = log.read_text() if log.exists() else ''
    return sum(float(t) for t in re.findall(r'^# exited -?\d+ after ([\d.]+) s$', text, re.M))


def summary(log):
    """(last step, last valid ppl, test ppl or None) read from a train.py log."""
    if not log.exists():
        return None, None, None
    evals = plot.read(log)[1]
    last = evals[-1] if evals else {}
    final = plot.final_values(log.read_text()) or {}
    return last.get('step'), final.get('valid ppl', last.get('val_ppl')), final.get('test ppl')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('jobs', nargs='+', help='job files: NAME train.py-arguments, one row a line')
    p.add_argument('--seeds', default='1111,2,3', help='comma-separated (default 1111,2,3)')
    p.add_argument('--rows', default=None, help='comma-separated row names: only these rows')
    p.add_argument('--parallel', type=int, default=6, help='runs at once (default 6)')
    p.add_argument('--budget', type=float, default=None, help='seconds, then checkpoint and stop')
    p.add_argument('--common', default='', help="arguments for every run, e.g. '--data-dir data'")
    p.add_argument('--runs-dir', default='.runs', help='checkpoints and logs (default .runs)')
    p.add_argument('--logs', default=None, help='also copy the logs here (e.g. $OUT)')
    p.add_argument('--threads', type=int, default=2, help='OMP_NUM_THREADS of each run')
    p.add_argument('--train', default=str(ROOT / 'train.py'), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.parallel < 1:
        p.error('--parallel must be at least 1')
    try:
        seeds = [int(s) for s in a.seeds.split(',')]
    except ValueError:
        p.error(f'--seeds must be comma-separated integers, not {a.seeds!r}')
    for f in a.jobs:
        if not Path(f).is_file():
            p.error(f'no job file {f}')
    jobs = [j for f in a.jobs for j in read_jobs(f, seeds)]
    if a.rows:   # a few rows of a long file: those one GPU call has time for
        rows = a.rows.split(',')
        names = {name.rsplit('_s', 1)[0] for name, _ in jobs}
        if set(rows) - names:
            p.error(f"--rows {','.join(sorted(set(rows) - names))}: not in {' '.join(a.jobs)}; "
                    f"its rows: {', '.join(sorted(names))}")
        jobs = [j for j in jobs if j[0].rsplit('_s', 1)[0] in rows]
    runs = Path(a.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    t0, waiting, running, codes, stopping = time.time(), [], {}, {}, False
    for name, args in jobs:
        if summary(runs / f'{name}.log')[2] is None:
            waiting.append((name, args))
    print(f'{len(jobs)} runs, {len(jobs) - len(waiting)} finished already, '
          f'{len(waiting)} to run, {a.parallel} at once', flush=True)

    def stop(*_):                               # a run stopped by SIGINT writes its checkpoint
        nonlocal stopping
        stopping = True
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGINT)
    signal.signal(signal.SIGINT, stop)
    while running or (waiting and not stopping):
        while waiting and len(running) < a.parallel and not stopping:
            name, args = waiting.pop(0)
            resume = (runs / name / 'ckpt.pt').exists()
            cmd = [sys.executable, a.train] + (['--resume', str(runs / name)] if resume else
                                               args + ['--out-dir', str(runs / name), '--overwrite', 'True'])
            cmd += shlex.split(a.common)
            log = open(runs / f'{name}.log', 'a')
            log.write(f'# {shlex.join(cmd)}\n')
            log.flush()
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True), log, time.time())
            print(f'{time.time() - t0:6.0f} s  start {name}' + (' (resumed)' if resume else ''),
                  flush=True)
        time.sleep(0.5)
        if a.budget and time.time() - t0 > a.budget and not stopping:
            print(f'{time.time() - t0:6.0f} s  budget reached: checkpointing {len(running)} runs',
                  flush=True)
            stop()
        for name, (proc, log, started) in list(running.items()):
            if proc.poll() is not None:   # the segment's wall time, for the tables' time column
                log.write(f'# exited {proc.returncode} after {time.time() - started:.0f} s\n')
                log.close()
                codes[name] = proc.returncode
                del running[name]
                print(f'{time.time() - t0:6.0f} s  {name} exited {proc.returncode}', flush=True)
    if a.logs:
        Path(a.logs).mkdir(parents=True, exist_ok=True)
        for name, _ in jobs:
            if (runs / f'{name}.log').exists():
                shutil.copy(runs / f'{name}.log', Path(a.logs) / f'{name}.log')
    print(f'\n{"run":<28} {"state":<12} {"step":>6} {"valid ppl":>10} {"test ppl":>9} {"wall s":>7}')
    failed = False
    for name, _ in jobs:
        step, valid, test = summary(runs / f'{name}.log')
        state = 'done' if test is not None else ('stopped' if codes.get(name) == 130 else
                                                 f'exit {codes[name]}' if name in codes else 'waiting')
        # a run that logged its final test and was then hit by the budget's SIGINT on its way
        # out (exit -2) is done, not failed
        failed |= codes.get(name, 0) not in (0, 130) and test is None
        wall = wall_time(runs / f'{name}.log')
        print(f'{name:<28} {state:<12} {step or "-":>6} {valid or "-":>10} {test or "-":>9} '
              f'{f"{wall:.0f}" if wall else "-":>7}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
