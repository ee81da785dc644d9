"""``python -m fastopt COMMAND``: the command-line tools.

Commands: ``bench`` (fastopt against NumPy and torch), ``schedule`` (print or plot a
learning-rate schedule), ``demo`` (the optimizer comparisons of ``examples/``, with pictures)
and ``config`` (how fastopt was built). ``python -m fastopt COMMAND --help`` describes a
command's arguments; usage errors exit with status 2, as argparse does.
"""
import argparse

import fastopt
from fastopt._cli import bench, demo, schedule

__all__ = ["build_parser", "main"]


def _config(args):
    fastopt.show_config()
    return 0


def _schedule(args):
    return schedule.main(args.words)


def build_parser():
    """The parser of ``python -m fastopt``, one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m fastopt",
        description="fastopt's command-line tools.",
        epilog="'python -m fastopt COMMAND --help' describes a command's arguments.")
    parser.add_argument("--version", action="version", version=f"fastopt {fastopt.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench.configure(commands.add_parser(
        "bench", help="compare fastopt with the NumPy reference and torch's fused kernels",
        description=bench.DESCRIPTION))
    # The arguments of `schedule` depend on its NAME, so schedule.main parses them once it
    # knows NAME. A prefix character that no word starts with makes this parser hand every
    # word after `schedule` (--help included) on unchanged.
    words = commands.add_parser("schedule", help="print (and plot) a learning-rate schedule",
                                add_help=False, prefix_chars="+")
    words.add_argument("words", nargs="*")
    words.set_defaults(run=_schedule)
    demo.configure(commands.add_parser(
        "demo", help="run the optimizer comparisons and write the pictures",
        description=demo.DESCRIPTION))
    commands.add_parser("config", help="show the build and runtime configuration",
                        description="Print how fastopt was built and what it runs: "
                                    "fastopt.show_config().").set_defaults(run=_config)
    return parser


def main(argv=None):
    """Run ``python -m fastopt`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success and for ``--help`` and ``--version``, 2 for a usage
        error, 1 when a command could not finish (such as ``--out`` without matplotlib).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2)
        return exc.code
    return args.run(args)
