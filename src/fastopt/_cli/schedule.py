"""``python -m fastopt schedule NAME --steps N [arguments] [--out lr.png]``.

Prints the learning rate (and cycled momentum) per step of a scheduler from
:mod:`fastopt.lr_scheduler` / :mod:`fastopt.swa_utils` or a schedule function from
:mod:`fastopt.schedules`, as a table; ``--out`` also writes a picture of it. NAME may be
written in any case. The arguments of NAME are its keyword arguments, read from its
signature, so :func:`main` builds the argparse parser once it knows NAME.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import sys

import numpy as np

from fastopt import lr_scheduler, schedules

_OWN_HELP = (
    "  --steps N            number of steps to print (required)\n"
    "  --out FILE           also write a plot (PNG) there; needs fastopt[plot]\n"
    "  --width W --height H size of that picture in pixels (default 800 x 500)\n"
    "  --lr LR              the optimizer's learning rate (default 0.1)\n"
    "  --optimizer NAME     sgd (momentum 0.9) or adam, in any case, for momentum cycling\n"
    "                       (default sgd)\n"
    "  --metrics a,b,...    ReduceLROnPlateau: the metric per step (the last one repeats)\n"
)
# schedulers that need other schedulers, not expressible as command-line values
_EXCLUDED = {"SequentialLR", "ChainedScheduler"}
_SKIPPED_PARAMS = {"optimizer", "last_epoch", "self"}


class UsageError(Exception):
    """Bad command line: ``message``, and the NAME whose arguments the usage should list."""

    def __init__(self, message, name=None):
        super().__init__(message)
        self.message = message
        self.name = name


def _scheduler_classes():
    from fastopt.swa_utils import SWALR

    classes = {k: v for k, v in lr_scheduler.SCHEDULERS.items() if k not in _EXCLUDED}
    classes["SWALR"] = SWALR
    return classes


def _functions():
    return {k: v for k, v in schedules.SCHEDULES.items() if k != "join"}


def _parameters(target):
    sig = inspect.signature(target)
    return [p for name, p in sig.parameters.items() if name not in _SKIPPED_PARAMS]


def _signature_text(target):
    parts = []
    for p in _parameters(target):
        if p.default is inspect.Parameter.empty:
            parts.append(f"--{p.name} VALUE")
        else:
            parts.append(f"[--{p.name} {p.default!r}]")
    return " ".join(parts)


def usage(name=None):
    """The usage text, for one NAME when given."""
    lines = ["usage: python -m fastopt schedule NAME --steps N [arguments] [--out lr.png]", ""]
    if name is not None:
        target = _lookup(name)
        lines += [f"arguments of {name}:", f"  {_signature_text(target)}", ""]
    lines += ["options:", _OWN_HELP.rstrip("\n"), ""]
    lines += ["NAME is one of:"]
    lines += ["  schedulers: " + ", ".join(sorted(_scheduler_classes()))]
    lines += ["  schedule functions: " + ", ".join(sorted(_functions()))]
    lines += [
        "",
        "Values are Python literals (0.1, 30, [30, 80], 'exp_range'); function arguments",
        "(lr_lambda, scale_fn, schedule) take a lambda, e.g. --lr_lambda 'lambda e: 0.95**e'.",
    ]
    return "\n".join(lines)


def _targets():
    return {**_scheduler_classes(), **_functions()}


def _canonical(name):
    """NAME as :mod:`fastopt` spells it, matched in any case."""
    for key in _targets():
        if key.lower() == name.lower():
            return key
    raise UsageError(f"unknown schedule {name!r}")


def _lookup(name):
    return _targets()[_canonical(name)]


_SAFE_MATH = {k: getattr(math, k) for k in dir(math) if not k.startswith("_")}


def _parse_value(key, text):
    text = text.strip()
    if text.startswith("lambda"):
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise UsageError(f"--{key}: not a valid lambda: {text!r}") from exc
        if not isinstance(tree.body, ast.Lambda):
            raise UsageError(f"--{key}: expected a single lambda expression, got {text!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                raise UsageError(f"--{key}: private attributes are not allowed in {text!r}")
        namespace = {"__builtins__": {"min": min, "max": max, "abs": abs, "float": float,
                                      "int": int, "round": round}, "math": math, **_SAFE_MATH}
        return eval(compile(tree, f"--{key}", "eval"), namespace)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as triangular2 or cos


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors raise :class:`UsageError`, so that :func:`main`
    prints the usage of NAME with them."""

    def __init__(self, name):
        super().__init__(prog="python -m fastopt schedule", add_help=False,
                         allow_abbrev=False)
        self.name = name

    def error(self, message):
        raise UsageError(message, self.name)


class _Once(argparse.Action):
    """Store the value; a second occurrence of the option is an error, as a repeated
    keyword argument would be."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"--{self.dest} given twice")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _metrics(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("must be numbers separated by commas") from None
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value")
    return values


def _optimizer(text):
    name = text.lower()
    if name not in ("sgd", "adam"):
        raise argparse.ArgumentTypeError(f"must be sgd or adam, got {text!r}")
    return name


def build_parser(name):
    """The parser of the words after NAME: the command's options and NAME's arguments.

    Each parameter of NAME is an option ``--param`` (also ``--pa-ram`` for ``pa_ram``)
    taking one value, kept as text for :func:`_parse_value`.
    """
    parser = _Parser(name)
    own = [("--steps", _positive_int, None), ("--out", str, None),
           ("--width", _positive_int, 800), ("--height", _positive_int, 500),
           ("--lr", _number, 0.1), ("--optimizer", _optimizer, "sgd"),
           ("--metrics", _metrics, None)]
    for flag, kind, default in own:
        parser.add_argument(flag, type=kind, default=default, action=_Once)
    parser.add_argument("-h", "--help", action="store_true")
    taken = {flag[2:] for flag, _, _ in own} | {"help"}
    for p in _parameters(_lookup(name)):
        if p.name in taken or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        flags = dict.fromkeys(["--" + p.name, "--" + p.name.replace("_", "-")])
        parser.add_argument(*flags, dest=p.name, default=argparse.SUPPRESS, action=_Once)
    return parser


def _parse(argv):
    """``(NAME, parsed options, NAME's keyword arguments as text)`` from the words."""
    if not argv:
        raise UsageError("NAME is missing")
    if argv[0] in ("-h", "--help"):
        return None, argparse.Namespace(help=True), {}
    if argv[0].startswith("-"):
        raise UsageError("NAME must come first")
    name = _canonical(argv[0])
    parser = build_parser(name)
    args, rest = parser.parse_known_args(argv[1:])
    if rest:
        options = [word.split("=", 1)[0] for word in rest if word.startswith("-")]
        if options:
            raise UsageError(f"unknown argument(s) for {name}: " + ", ".join(options), name)
        raise UsageError(f"unexpected argument {rest[0]!r}", name)
    own = {"steps", "out", "width", "height", "lr", "optimizer", "metrics", "help", "_given"}
    texts = {k: v for k, v in vars(args).items() if k not in own}
    if not args.help and args.steps is None:
        raise UsageError("--steps N is required", name)
    return name, args, texts


def _build(name, texts, args):
    import fastopt

    target = _lookup(name)
    kwargs = {k: _parse_value(k, v) for k, v in texts.items()}
    missing = [p.name for p in _parameters(target)
               if p.default is inspect.Parameter.empty and p.name not in kwargs
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise UsageError(f"{name} needs " + ", ".join("--" + m for m in missing), name)
    if isinstance(target, type):
        param = fastopt.Parameter(np.zeros(1))
        if args.optimizer == "adam":
            opt = fastopt.Adam([param], lr=args.lr)
        else:
            opt = fastopt.SGD([param], lr=args.lr, momentum=0.9)
        try:
            return target(opt, **kwargs)
        except (TypeError, ValueError, KeyError) as exc:
            raise UsageError(f"{name}: {exc}", name) from None
    try:
        return target(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name}: {exc}", name) from None


def _print_usage(name, out):
    try:
        text = usage(name)
    except UsageError:  # an unknown NAME: list everything
        text = usage()
    print(text, file=out)


def main(argv):
    """Run the ``schedule`` command on the words after ``schedule``.

    Returns
    -------
    int
        The exit status: 0, 2 for a usage error (with the usage on stderr), 1 when
        ``--out`` cannot draw (no matplotlib).
    """
    from fastopt.plot import lr_curve, lr_trace

    try:
        name, args, texts = _parse(list(argv))
        if args.help:
            print(usage(name))
            return 0
        sched = _build(name, texts, args)
        metrics = args.metrics
        if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            if metrics is None:
                raise UsageError("ReduceLROnPlateau needs --metrics a,b,...", name)
            metrics = metrics + [metrics[-1]] * max(0, args.steps - len(metrics))
        try:
            trace = lr_trace(sched, args.steps, metrics=metrics)
        except ValueError as exc:  # e.g. OneCycleLR stepped past total_steps
            raise UsageError(f"{name}: {exc}", name) from None
    except UsageError as err:
        print(f"error: {err.message}", file=sys.stderr)
        _print_usage(err.name, sys.stderr)
        return 2

    header = ["step", "lr"]
    if trace["momentum"] is not None:
        header.append("momentum")
    print(f"# {name}")
    print("\t".join(header))
    for t, row in enumerate(trace["lr"]):
        cells = [str(t), repr(row[0])]
        if trace["momentum"] is not None:
            cells.append(repr(trace["momentum"][t][0]))
        print("\t".join(cells))
    if args.out is not None:
        try:
            lr_curve(sched, steps=args.steps, labels=[name], metrics=metrics,
                     path=args.out, width=args.width, height=args.height)
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"# wrote {args.out}", file=sys.stderr)
    return 0
