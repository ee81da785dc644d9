"""``python -m fastopt schedule NAME --steps N [arguments] [--out lr.png]``.

Prints the learning rate (and cycled momentum) per step of a scheduler from
:mod:`fastopt.lr_scheduler` / :mod:`fastopt.swa_utils` or a schedule function from
:mod:`fastopt.schedules`, as a table; ``--out`` also writes a picture of it.
``fastopt/__main__.py`` calls :func:`main` with the arguments after ``schedule``.
"""

from __future__ import annotations

import ast
import inspect
import math
import sys

import numpy as np

from fastopt import lr_scheduler, schedules

# options of the command itself, with their defaults
_OWN = {"steps": None, "out": None, "lr": 0.1, "optimizer": "sgd", "metrics": None,
        "width": 800, "height": 500}
_OWN_HELP = (
    "  --steps N            number of steps to print (required)\n"
    "  --out FILE           also write a plot (PNG) there; needs fastopt[plot]\n"
    "  --width W --height H size of that picture in pixels (default 800 x 500)\n"
    "  --lr LR              the optimizer's learning rate (default 0.1)\n"
    "  --optimizer NAME     sgd (momentum 0.9) or adam, for momentum cycling (default sgd)\n"
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


class HelpRequested(Exception):
    """``--help``: print the usage (for ``name`` when given) and exit 0."""

    def __init__(self, name=None):
        super().__init__(name)
        self.name = name


def _scheduler_classes():
    from fastopt.swa_utils import SWALR

    classes = {k: v for k, v in lr_scheduler.SCHEDULERS.items() if k not in _EXCLUDED}
    classes["SWALR"] = SWALR
    return classes


def _functions():
    return {k: v for k, v in schedules.SCHEDULES.items() if k != "join"}


def _accepted_names():
    return sorted(_scheduler_classes()) + sorted(_functions())


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


def _lookup(name):
    table = {**_scheduler_classes(), **_functions()}
    if name in table:
        return table[name]
    folded = {k.lower(): v for k, v in table.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    raise UsageError(f"unknown schedule {name!r}")


def _canonical(name):
    for k in _accepted_names():
        if k == name or k.lower() == name.lower():
            return k
    return name


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


def _parse_args(argv):
    if not argv:
        raise UsageError("NAME is missing")
    if argv[0] in ("-h", "--help"):
        raise HelpRequested()
    name, rest = argv[0], argv[1:]
    if name.startswith("-"):
        raise UsageError("NAME must come first")
    opts = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-h", "--help"):
            raise HelpRequested(name)
        if not arg.startswith("--") or len(arg) == 2:
            raise UsageError(f"unexpected argument {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(rest):
                raise UsageError(f"--{key} needs a value")
            i += 1
            value = rest[i]
        key = key.replace("-", "_")
        if key in opts:
            raise UsageError(f"--{key} given twice")
        opts[key] = value
        i += 1
    return name, opts


def _own_options(opts):
    own = dict(_OWN)
    for key in list(opts):
        if key in _OWN:
            own[key] = opts.pop(key)
    if own["steps"] is None:
        raise UsageError("--steps N is required")
    try:
        own["steps"] = int(own["steps"])
        if own["steps"] < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--steps must be a positive integer, got {own['steps']!r}") from None
    for key in ("width", "height"):
        try:
            own[key] = int(own[key])
            if own[key] < 1:
                raise ValueError
        except ValueError:
            raise UsageError(f"--{key} must be a positive integer, got {own[key]!r}") from None
    try:
        own["lr"] = float(own["lr"])
    except ValueError:
        raise UsageError(f"--lr must be a number, got {own['lr']!r}") from None
    if own["optimizer"] not in ("sgd", "adam"):
        raise UsageError(f"--optimizer must be sgd or adam, got {own['optimizer']!r}")
    if own["metrics"] is not None:
        try:
            own["metrics"] = [float(v) for v in str(own["metrics"]).split(",") if v.strip()]
        except ValueError:
            raise UsageError("--metrics must be numbers separated by commas") from None
        if not own["metrics"]:
            raise UsageError("--metrics needs at least one value")
    return own


def _build(name, opts, own):
    import fastopt

    target = _lookup(name)
    accepted = {p.name for p in _parameters(target)}
    unknown = sorted(set(opts) - accepted)
    if unknown:
        raise UsageError(f"unknown argument(s) for {_canonical(name)}: "
                         + ", ".join("--" + u for u in unknown), name)
    kwargs = {k: _parse_value(k, v) for k, v in opts.items()}
    missing = [p.name for p in _parameters(target)
               if p.default is inspect.Parameter.empty and p.name not in kwargs
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise UsageError(f"{_canonical(name)} needs " + ", ".join("--" + m for m in missing),
                         name)
    if isinstance(target, type):
        param = fastopt.Parameter(np.zeros(1))
        if own["optimizer"] == "adam":
            opt = fastopt.Adam([param], lr=own["lr"])
        else:
            opt = fastopt.SGD([param], lr=own["lr"], momentum=0.9)
        try:
            return target(opt, **kwargs)
        except (TypeError, ValueError, KeyError) as exc:
            raise UsageError(f"{_canonical(name)}: {exc}", name) from None
    try:
        return target(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{_canonical(name)}: {exc}", name) from None


def _print_usage(name, out):
    try:
        text = usage(name)
    except UsageError:  # an unknown NAME: list everything
        text = usage()
    print(text, file=out)


def main(argv):
    """Run the ``schedule`` command; returns the exit code (2 for usage errors)."""
    from fastopt.plot import lr_curve, lr_trace

    try:
        name, opts = _parse_args(list(argv))
        _lookup(name)
        own = _own_options(opts)
        sched = _build(name, opts, own)
        metrics = own["metrics"]
        if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            if metrics is None:
                raise UsageError("ReduceLROnPlateau needs --metrics a,b,...", name)
            metrics = metrics + [metrics[-1]] * max(0, own["steps"] - len(metrics))
        try:
            trace = lr_trace(sched, own["steps"], metrics=metrics)
        except ValueError as exc:  # e.g. OneCycleLR stepped past total_steps
            raise UsageError(f"{_canonical(name)}: {exc}", name) from None
    except HelpRequested as req:
        _print_usage(req.name, sys.stdout)
        return 0
    except UsageError as err:
        print(f"error: {err.message}", file=sys.stderr)
        _print_usage(err.name, sys.stderr)
        return 2

    label = _canonical(name)
    header = ["step", "lr"]
    if trace["momentum"] is not None:
        header.append("momentum")
    print(f"# {label}")
    print("\t".join(header))
    for t, row in enumerate(trace["lr"]):
        cells = [str(t), repr(row[0])]
        if trace["momentum"] is not None:
            cells.append(repr(trace["momentum"][t][0]))
        print("\t".join(cells))
    if own["out"] is not None:
        try:
            lr_curve(sched, steps=own["steps"], labels=[label], metrics=metrics,
                     path=own["out"], width=own["width"], height=own["height"])
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"# wrote {own['out']}", file=sys.stderr)
    return 0
