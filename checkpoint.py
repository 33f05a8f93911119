"""A run's files: checkpoints written whole or not at all and read back with one clear line on
error, and a run folder that never mixes two runs. Nothing here is about the method; train.py's
save decides what a checkpoint holds (model, optimizer, averager, batches, every rank's random
and carried state, settings, vocabulary), and restore reads that back for --resume.
"""
import os
import sys
from pathlib import Path

import torch

RUN_FILES = ('ckpt*.pt', 'best.pt', 'metrics.jsonl')   # what a run writes in its out_dir


def save(path, obj):
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = Path(path).with_name(f'{Path(path).name}.tmp{os.getpid()}')   # no two writers collide
    tmp.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def file(path):
    """A checkpoint, or a run folder: its ckpt.pt."""
    path = Path(path)
    return path / 'ckpt.pt' if path.is_dir() else path


def load(path, mmap=False):
    """A checkpoint written by train.py, on the CPU; a missing, truncated or foreign file
    exits with one line that says so. mmap=True: tensors are read from the file only when
    used (for the settings alone, without reading the weights)."""
    if not Path(path).is_file():
        sys.exit(f"error: checkpoint {path} not found")
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # truncated file, not a checkpoint, or unsafe pickle
        sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                 f"it may be truncated: use an earlier checkpoint or start without --resume")
    if not isinstance(ck, dict) or 'model' not in ck or 'config' not in ck:
        sys.exit(f"error: {path} is not a checkpoint written by train.py (no model/config)")
    return ck


def load_model_state(model, ck, cfg):
    """ck's weights into model; a mismatch names the settings that differ."""
    try:
        model.load_state_dict(ck['model'])
    except RuntimeError as e:
        old = ck['config']
        diff = {k: (old.get(k), cfg.get(k)) for k in cfg if k in old and old[k] != cfg[k]
                and k not in ('resume', 'eval_only', 'max_iters', 'out_dir', 'data_dir')}
        sys.exit(f"error: the checkpoint does not fit this model; settings that differ "
                 f"(checkpoint, now): {diff or 'none'}\n{str(e)[:600]}")


def restore(cfg, env, model, opt, avg, batches, st, accum):
    """The inverse of train.py's save: --resume's checkpoint into the model, optimizer,
    averager, batches, training state `st` and this rank's random state; -> this rank's
    carried states, or None (they start afresh: a different number of ranks or micro-batches)."""
    ck = load(cfg['resume'])
    load_model_state(model, ck, cfg)
    try:
        opt.load_state_dict(ck['optimizer'])
    except ValueError as e:   # e.g. one parameter group, written before unit_lr existed
        sys.exit(f"error: the optimizer state in {cfg['resume']} does not fit this model's "
                 f"({e}); it was written by an older train.py. Evaluate it with --eval-only "
                 f"True, or start the run afresh")
    avg.load_state_dict(ck['averager'])
    batches.load_state_dict(ck['batches'])
    st.update(ck['train'])
    env.log(f"resumed from {cfg['resume']} at step {st['step']}")
    if len(ck['per_rank']) != env.world:
        env.log(f"note: checkpoint written by {len(ck['per_rank'])} ranks, now {env.world}: "
                f"random and carried state start afresh")
        return None
    mine = ck['per_rank'][env.rank]
    torch.set_rng_state(mine['rng_cpu'])
    if mine['rng_cuda'] is not None and env.device.type == 'cuda':
        torch.cuda.set_rng_state(mine['rng_cuda'])
    return to(mine['states'], env.device) if len(mine['states']) == accum else None


def to(tree, device):   # a carried state: None, or tensors in nested lists and tuples
    if isinstance(tree, (list, tuple)):
        return type(tree)(to(t, device) for t in tree)
    return None if tree is None else tree.to(device)


def claim_out_dir(cfg, master):
    """A new run never mixes with another run's files: it refuses a folder that holds one,
    or (--overwrite True) deletes them first (rank 0 only). A resumed run writes beside its
    checkpoint."""
    out = Path(cfg['out_dir'])
    if cfg['resume'] and out.resolve() == Path(cfg['resume']).resolve().parent:
        return
    found = sorted(p.name for pat in RUN_FILES for p in out.glob(pat))
    if found and not cfg['overwrite']:
        sys.exit(f"error: {out} holds another run ({', '.join(found[:4])}); --resume {out} "
                 f"continues it, --out-dir DIR starts elsewhere, --overwrite True replaces it")
    if found and master:
        for name in found:
            (out / name).unlink()
