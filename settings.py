"""The settings of train.py, read and checked: argparse built from its DEFAULTS dict, so that
every setting is `--key value`, `--key=value`, `--flag` or `key=value`, typed like its default,
listed by --help under DEFAULTS' section headers with its comment; presets (config/NAME.py);
a resumed run's settings from its checkpoint; one clear line for a value that would fail later,
or silently. Nothing here is about the method.

    settings.load(argv, defaults, choices, default_preset, doc, source) -> the checked settings
    settings.parse(argv, defaults, doc, source) -> {key: value} of the settings given
    settings.run(main, interrupted, memory_hint) -> main(), its errors as one line
"""
import argparse
import ast
import difflib
import os
import re
import runpy
import sys
from pathlib import Path

import torch

import checkpoint
import data


# settings a resumed run may change; the others (model shape, batching, optimizer, data) would
# break it, and --resume takes them from the checkpoint
RESUMABLE = {'max_epochs', 'max_iters', 'log_interval', 'eval_interval', 'save_interval',
             'eval_max_tokens', 'eval_batch_size', 'test_batch_size', 'eval_tgt_len',
             'eval_mem_len', 'eval_clamp_len', 'eval_same_length', 'data_dir', 'cache_dir',
             'out_dir', 'device', 'dtype', 'compile', 'cuda_graphs', 'save', 'embed_cache',
             'beam', 'lenpen', 'max_len_b', 'bleu_tokenize', 'avg_last', 'lr', 'grad_clip',
             'eval_only', 'count_params', 'resume', 'overwrite', 'config'}
POSITIVE = ('batch_size', 'micro_batch', 'bptt', 'd_model', 'n', 'k', 'm', 'depth', 'g_max',
            'lstm_hidden', 'lstm_layers', 'n_layer', 'n_head', 'd_head', 'd_inner', 'enc_layers',
            'dec_layers', 'd_ff', 'max_tokens', 'batch_tokens', 'eval_batch_size',
            'test_batch_size', 'eval_max_tokens', 'beam', 'log_interval', 'save_interval',
            'max_iters', 'eval_tgt_len', 'max_vocab', 'factor', 'out_factor', 'nonmono')
NONNEGATIVE = ('lr', 'grad_clip', 'weight_decay', 'warmup', 'min_lr', 'alpha', 'beta',
               'eval_mem_len', 'bucket', 'eval_interval', 'avg_last', 'mem_len', 'max_len_b',
               'lr_decay', 'lenpen')   # 0: off, or none
# the settings whose default is None: what each takes when it is set
OPTIONAL = dict(vocab_size=((int, list, tuple), 'a whole number (translation: a pair)'),
                embed_scale=((int, float), 'a number'), max_epochs=((int, float), 'a number'),
                tied=(bool, 'True or False'), eval_same_length=(bool, 'True or False'),
                **{k: (int, 'a whole number') for k in (
                    'n', 'm', 'factor', 'out_factor', 'micro_batch', 'eval_tgt_len', 'eval_mem_len',
                    'eval_clamp_len', 'max_vocab', 'bucket', 'batch_tokens', 'max_iters',
                    'eval_interval', 'eval_max_tokens', 'save_interval')})
PROBABILITY = ('dropout', 'dropouth', 'dropouti', 'dropoute', 'wdrop', 'dropatt', 'unit_dropout',
               'map_dropout', 'label_smoothing')   # each in [0, 1)


def load(argv, defaults, choices, default_preset, doc, source):
    """defaults <- preset <- command line (under torchrun, whose own options swallow
    abbreviations like --n and --m, use n=128). With --resume, the checkpoint's settings
    replace defaults and the preset. source: the file of `defaults`, beside config/."""
    args = parse(argv, defaults, doc, source)
    if args.get('resume'):
        return check(_resumed(args, defaults), defaults, choices)
    cfg = dict(defaults)
    preset = args.get('config') or default_preset.get(args.get('model', cfg['model']))
    if preset:
        folder = Path(source).resolve().parent / 'config'
        path = folder / f'{preset}.py'
        if not path.exists() or '/' in preset or '\\' in preset:
            sys.exit(f"error: no preset {preset!r}; choose one of "
                     f"{sorted(p.stem for p in folder.glob('*.py'))}")
        for key, val in runpy.run_path(str(path)).items():
            if not key.startswith('_'):
                if key not in defaults:
                    sys.exit(f"error: preset {path.name} sets unknown key {key!r}")
                cfg[key] = val
    cfg.update(args, config=preset)
    if cfg['model'] == 'nmt' and cfg['bucket'] is None:   # stored: a resumed run keeps its batches
        # a few fixed shapes: each compiles once, or replays a CUDA graph where fast.graphed_step
        # gives one (eager, one GPU, one micro-batch a step); elsewhere padding only costs
        gpu = cfg['device'] == 'cuda' or (cfg['device'] == 'auto' and torch.cuda.is_available())
        one = int(os.environ.get('WORLD_SIZE', 1)) == 1 and cfg['batch_tokens'] in (None, cfg['max_tokens'])
        cfg['bucket'] = 8 if cfg['compile'] or (cfg['cuda_graphs'] and gpu and one) else 0
    return check(cfg, defaults, choices)


def from_checkpoint(ck, defaults, **override):
    """The settings a checkpoint was written with; those added to defaults since, at theirs."""
    return {**defaults, **{k: v for k, v in ck['config'].items() if k in defaults}, **override}


def _resumed(args, defaults):
    """The checkpoint's settings, with those of the command line that may change."""
    path = checkpoint.file(args['resume'])
    ck = checkpoint.load(path, mmap=True)      # its settings: the weights are read later, once
    old = ck['config']
    fixed = {k: v for k, v in args.items() if k not in RESUMABLE and old.get(k, v) != v}
    if fixed:
        sys.exit(f"error: {path} was trained with " + ', '.join(f"{k}={old[k]!r}" for k in fixed)
                 + f"; --resume cannot change {', '.join('--' + k.replace('_', '-') for k in fixed)}"
                 f" (start a new run in another --out-dir instead)")
    cfg = from_checkpoint(ck, defaults, out_dir=str(path.parent), save_interval=None, overwrite=False)
    return {**cfg, **args, 'resume': str(path)}


def check(cfg, defaults, choices):   # one clear line for a value that would fail later, or silently
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            sys.exit(f"error: --{key} {cfg[key]!r} unknown; choose one of {allowed}")
    for key, val in cfg.items():
        want = type(defaults[key])
        if val is not None and defaults[key] is not None and not isinstance(val, want) and not (
                want is float and isinstance(val, int)) and not (want is list and isinstance(val, tuple)):
            sys.exit(f"error: --{key.replace('_', '-')} {val!r} is not a{'n' if want is int else ''} "
                     f"{want.__name__} (default: {defaults[key]!r})")
    for key, (want, words) in OPTIONAL.items():   # True is an int to Python, not here
        val = cfg[key]
        if want is bool and str(val).lower() in ('true', 'false'):   # --tied false
            val = cfg[key] = str(val).lower() == 'true'
        if val is not None and not (isinstance(val, want) and (want is bool) == isinstance(val, bool)):
            sys.exit(f"error: --{key.replace('_', '-')} {val!r} must be {words}")
    for key in POSITIVE:
        if cfg[key] is not None and not (isinstance(cfg[key], int) and cfg[key] > 0):
            sys.exit(f"error: --{key.replace('_', '-')} {cfg[key]!r} must be a positive whole number")
    for key in NONNEGATIVE:   # a negative clip norm would flip the gradient's sign, silently
        if cfg[key] is not None and not (isinstance(cfg[key], (int, float)) and cfg[key] >= 0):
            sys.exit(f"error: --{key.replace('_', '-')} {cfg[key]!r} must be 0 or more")
    if cfg['max_epochs'] is not None and cfg['max_epochs'] <= 0:
        sys.exit(f"error: --max-epochs {cfg['max_epochs']!r} must be above 0")
    if cfg['eval_only'] and not cfg['resume']:
        sys.exit("error: --eval-only needs --resume CHECKPOINT")
    if cfg['embed_cache'] and not cfg['eval_only']:   # training needs the unit itself
        sys.exit("error: --embed-cache swaps a trained unit for its table: use it with --eval-only "
                 "--resume CHECKPOINT, or sample.py --embed-cache")
    if cfg['avg_last'] and not cfg['save']:
        sys.exit("error: --avg-last averages the run's saved checkpoints: it needs --save True")
    if cfg['schedule'] == 'cosine' and not cfg['max_iters']:   # else it ends after one step
        sys.exit("error: --schedule cosine decays over --max-iters steps: set --max-iters, or "
                 "use --schedule constant or step with --max-epochs")
    for key in PROBABILITY:
        if not (isinstance(cfg[key], (int, float)) and 0 <= cfg[key] < 1):
            sys.exit(f"error: --{key.replace('_', '-')} {cfg[key]!r} must be at least 0 and below 1")
    for key in ('out_dir', 'cache_dir', 'data_dir'):
        if cfg[key] is not None and Path(cfg[key]).exists() and not Path(cfg[key]).is_dir():
            sys.exit(f"error: --{key.replace('_', '-')} {cfg[key]} is a file; name a folder")
    if cfg['embed'] == 'adaptive' and not cfg['cutoffs']:   # one band: the projective table
        sys.exit("error: --embed adaptive needs --cutoffs (band edges of the frequency-sorted "
                 "vocabulary, e.g. cutoffs=[4000,20000] on WikiText-2); without them it is "
                 "--embed projective")
    if cfg['embed'] == 'cnn' and cfg['model'] == 'nmt':   # before any data is fetched
        sys.exit("error: --embed cnn is for language models (--model lstm or txl): it reads the "
                 "words of one vocabulary; translation takes another --embed")
    known = data.PARALLEL_CORPORA if cfg['model'] == 'nmt' else data.LM_CORPORA
    if cfg['dataset'] not in known:
        sys.exit(f"error: --dataset {cfg['dataset']!r} unknown for --model {cfg['model']}; "
                 f"choose one of {sorted(known)}")
    return cfg


def parse(argv, defaults, doc, source):
    """The settings given in argv (those left out are absent). source: the file that defines
    `defaults`, read for --help's sections and comments."""
    ap = argparse.ArgumentParser(prog=source.name, description=doc, allow_abbrev=False,
                                 usage=f'{source.name} [--key value | --key=value | key=value ...]',
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    groups, comments = _comments(source)
    sections = {g: ap.add_argument_group(g) for g in dict.fromkeys(groups.values())}
    for key, default in defaults.items():
        flag = isinstance(default, bool)
        sections[groups[key]].add_argument(
            '--' + key.replace('_', '-'), dest=key, default=argparse.SUPPRESS, type=_parser(default),
            nargs='?' if flag else None, const=True if flag else None,
            metavar='BOOL' if flag else 'VALUE', help=f"{comments.get(key, '')} (default: {default!r})")
    argv = [_option(a, defaults) for a in argv]
    for a in argv:   # a typo gets a suggestion, not argparse's list of everything it missed
        name = a[2:].partition('=')[0].replace('-', '_')
        if a.startswith('--') and name not in defaults and name != 'help':
            near = difflib.get_close_matches(name, defaults, 1)
            ap.error(f"unknown setting {a.partition('=')[0]}" +
                     (f"; did you mean --{near[0].replace('_', '-')}?" if near else
                      f"; python {source.name} --help lists them all"))
    return vars(ap.parse_args(argv))


def _comments(source):
    """--help's groups and texts: the section headers and comments of `DEFAULTS = dict(...)`."""
    groups, comments, group = {}, {}, None
    src = Path(source).read_text().split('DEFAULTS = dict(\n', 1)[1].split('\n)', 1)[0]
    for line in src.splitlines():
        code, _, note = line.partition('#')
        if not code.strip() and note.startswith(' ---'):
            group = note.strip(' -')
            continue
        for key in re.findall(r'(\w+)=', code):
            comments[key], groups[key] = note.strip(), group
    return groups, comments


def _option(arg, defaults):   # key=value and --some_key -> --some-key (argparse's spelling)
    name, eq, value = arg.lstrip('-').partition('=')
    if arg.startswith('--') or (eq and name.replace('-', '_') in defaults):
        return '--' + name.replace('_', '-') + eq + value
    return arg


def _parser(default):
    def parse(text):
        if isinstance(default, bool):         # 'false' must not turn a switch on
            if text.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
                raise argparse.ArgumentTypeError(f"{text!r} is not a switch value; use True or False")
            return text.lower() in ('true', '1', 'yes')
        if isinstance(default, str):
            return text
        try:                                  # numbers, lists, None
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if default is None:               # a name (a path, a preset)
                return text
            raise argparse.ArgumentTypeError(f"{text!r} is not a {type(default).__name__}")
    return parse


def run(main, interrupted=None, memory_hint=''):
    """Run an entry point's main() so that bad input, running out of memory and Ctrl-C end with
    one line and a non-zero exit instead of a traceback (the loop handles its own Ctrl-C)."""
    try:
        return main()
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        sys.exit(130)               # as the loop's: a stopped run, not a failed one
    except (data.DataError, ValueError) as e:     # bad input: the message names the fix
        sys.exit(f"error: {e}")
    except RuntimeError as e:   # torch.OutOfMemoryError on a GPU; the CPU allocator's own error
        if 'out of memory' not in str(e) and "can't allocate memory" not in str(e):
            raise
        sys.exit(f"error: out of memory ({str(e).splitlines()[0][:200]}){memory_hint}")
