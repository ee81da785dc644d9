"""Adam with compressed state: fastopt's float32, bfloat16 and 8-bit block-wise state against
torch's fused Adam and the CPU 8-bit Adams of bitsandbytes and torchao (when installed), at
1e6, 1e7 and 1e8 elements, 1 thread and all threads: see ``fastopt._cli.low_precision``,
which ``python -m fastopt bench --low-precision`` runs too.

    python benchmarks/bench_low_precision.py [--sizes 1e6,1e7,1e8] [--configs fp32,int8,...]
                                             [--threads 1,2] [--rounds 5] [--quick]
                                             [--json FILE]

It prints the table (ns per element, bytes moved per element, state bytes per parameter, the
memory peak of a step above the persistent state, the ratio to float32 state), the CPU and
its ISA, and which of the project's targets the run meets.
"""
import argparse
import sys

from fastopt._cli import low_precision as lp


def _sizes(text):
    return [(s.strip(), int(float(s))) for s in text.split(",") if s.strip()]


def _counts(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_sizes, default=None,
                    help=f"default {','.join(lp.DEFAULT_SIZES)} "
                         f"({','.join(lp.QUICK_SIZES)} with --quick)")
    ap.add_argument("--configs", type=lp.parse_configs, default=None,
                    help=f"a subset of {','.join(lp.CONFIGS)} (default all)")
    ap.add_argument("--threads", type=_counts, default=None,
                    help="thread counts (default 1 and every CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="default 5 (3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small sizes, short rounds")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    sizes = args.sizes or _sizes(",".join(lp.QUICK_SIZES if args.quick else lp.DEFAULT_SIZES))
    return lp.main(sizes, args.configs, args.threads, args.rounds or (3 if args.quick else 5),
                   args.quick, args.json,
                   log=lambda text: print(text, file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
