"""``python -m fastopt COMMAND``: bench, schedule, demo, config."""
import sys

USAGE = """usage: python -m fastopt COMMAND [ARGS]

commands:
  bench      compare fastopt with the NumPy reference and torch's fused kernels
  schedule   print (and plot) a learning-rate schedule
  demo       run the optimizer comparisons and write the pictures
  config     show the build and runtime configuration

'python -m fastopt COMMAND --help' describes a command's arguments."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        from fastopt._bench import main as run
    elif cmd == "schedule":
        from fastopt._schedule_cli import main as run
    elif cmd == "demo":
        from fastopt._demo import main as run
    elif cmd == "config":
        from fastopt import show_config
        show_config()
        return 0
    else:
        print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
