"""``python -m fastopt``: the command line (fastopt._cli)."""
from fastopt._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
