"""The command line of train.py: argparse built from its DEFAULTS dict, so that every setting
is `--key value`, `--key=value`, `--flag` or `key=value`, typed like its default, listed by
--help under DEFAULTS' section headers with its comment. Nothing here is about the method.

    settings.parse(argv, defaults, doc, source) -> {key: value} of the settings given
"""
import argparse
import ast
import difflib
import re
from pathlib import Path


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
