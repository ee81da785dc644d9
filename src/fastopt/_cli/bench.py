"""``python -m fastopt bench``: fastopt against in-place NumPy and torch's fastest CPU path.

Every implementation runs the same update on the same float32 data; rounds are interleaved
(fastopt, NumPy, torch, fastopt, ...) so that the noise of a shared machine hits them alike,
and the table reports medians and ratios.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import fastopt
from fastopt._cli import threads
from fastopt._cli.cases import CASES

DEFAULT_SIZES = ["1e4", "1e5", "1e6", "1e7", "100x1000"]
QUICK_SIZES = ["1e4", "1e5", "1e6", "100x1000"]


def parse_size(text):
    """'1e6' -> [1000000]; '100x1000' -> 100 tensors of 1000 elements."""
    text = text.strip().lower()
    if "x" in text:
        count, each = text.split("x", 1)
        count, each = int(float(count)), int(float(each))
        if count < 1 or each < 1:
            raise ValueError(text)
        return [each] * count
    n = int(float(text))
    if n < 1:
        raise ValueError(text)
    return [n]


def _make_fastopt(name, case, arrays, grads):
    params = [fastopt.Parameter(a) for a in arrays]
    for p, g in zip(params, grads):
        p.grad = g
    opt = fastopt.OPTIMIZERS[name](params, **case.kwargs)
    return opt.step


def _make_numpy(case, arrays, grads):
    state = {}
    counter = [0]

    def step():
        counter[0] += 1
        case.numpy_step(arrays, grads, state, counter[0])
    return step


def _make_torch(torch, case, arrays, grads):
    cls_name, torch_kwargs = case.torch
    tensors = [torch.from_numpy(a).requires_grad_() for a in arrays]
    for t, g in zip(tensors, grads):
        t.grad = torch.from_numpy(g)
    opt = getattr(torch.optim, cls_name)(tensors, **dict(case.kwargs, **torch_kwargs))
    return opt.step


def _calibrate(fn, target):
    fn()
    reps, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= target / 4 or reps >= 1 << 16:
            break
        reps *= 4
    return max(1, int(reps * target / max(elapsed, 1e-9)))


def measure(name, sizes, impls, rounds, target, torch=None):
    """Median seconds per step for each implementation, interleaved."""
    case = CASES[name]
    rng = np.random.default_rng(0)
    steps = {}
    for impl in impls:
        arrays = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in sizes]
        grads = [(rng.standard_normal(n) * 0.01).astype(np.float32) for n in sizes]
        if impl == "torch" and case.torch[0] is None:
            continue  # torch has no such optimizer
        if impl == "fastopt":
            steps[impl] = _make_fastopt(name, case, arrays, grads)
        elif impl == "numpy":
            steps[impl] = _make_numpy(case, arrays, grads)
        else:
            steps[impl] = _make_torch(torch, case, arrays, grads)
    reps = {impl: _calibrate(fn, target) for impl, fn in steps.items()}
    samples = {impl: [] for impl in steps}
    for _ in range(rounds):
        for impl, fn in steps.items():
            k = reps[impl]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[impl].append((time.perf_counter() - t0) / k)
    return {impl: statistics.median(s) for impl, s in samples.items()}


def _fmt(x, spec):
    if x is None:
        return "-".rjust(int(spec.split(".")[0]))
    return format(x, spec)


def format_table(rows, threads):
    head = (f"{'optimizer':<9} {'size':>9} {'fastopt':>9} {'numpy':>9} {'torch':>9} "
            f"{'GB/s':>6} {'x numpy':>8} {'x torch':>8} {'step us':>9}")
    out = [(f"float32, {threads} thread(s); times are ns per element (median of interleaved "
            f"rounds); GB/s is fastopt's effective bandwidth; step us is fastopt's time per step"),
           head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['optimizer']:<9} {r['size']:>9} {_fmt(r['fastopt_ns'], '9.3f')} "
                   f"{_fmt(r.get('numpy_ns'), '9.3f')} {_fmt(r.get('torch_ns'), '9.3f')} "
                   f"{_fmt(r['fastopt_gbs'], '6.1f')} {_fmt(r.get('speedup_numpy'), '8.1f')} "
                   f"{_fmt(r.get('speedup_torch'), '8.2f')} {_fmt(r['fastopt_step_us'], '9.1f')}")
    return "\n".join(out)


DESCRIPTION = ("Time one optimizer step of fastopt, in-place NumPy and torch (fused=True "
               "where torch has a fused CPU kernel, else its default loop) on the same float32 "
               "data, interleaved, and print ns/element, GB/s and speedups.")


def optimizer_names(text):
    """'adam, SGD' -> ['Adam', 'SGD']: names of ``CASES`` in any case, spelled canonically."""
    canonical = {name.lower(): name for name in CASES}
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n.lower() not in canonical]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    return [canonical[n.lower()] for n in names]


def _sizes(text):
    if not text:
        return []  # the default sizes
    try:
        return [(s.strip(), parse_size(s)) for s in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"bad size {e}; use N (like 1e6) or COUNTxN (like 100x1000)") from None


def _threads(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--threads must be at least 1")
    return n


def _rank_counts(text):
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rank counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("--ranks takes positive process counts, like 1,2,3")
    return counts


def configure(ap):
    """Add the arguments of ``bench`` to the parser ``ap``; ``run`` is its action."""
    ap.add_argument("--optimizers", type=optimizer_names, default=None,
                    help="comma-separated names, in any case (default: all of "
                         f"{', '.join(CASES)})")
    ap.add_argument("--sizes", type=_sizes, default=None,
                    help="comma-separated sizes: N elements ('1e6') or COUNTxN tensors "
                         f"('100x1000'); default {','.join(DEFAULT_SIZES)}")
    ap.add_argument("--threads", type=_threads, default=1,
                    help="threads for fastopt and torch (default 1)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds (default 5; 3 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer sizes (no 1e7), fewer and shorter rounds")
    ap.add_argument("--no-torch", action="store_true", help="leave torch out")
    ap.add_argument("--no-numpy", action="store_true", help="leave NumPy out")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--tensor-count", action="store_true",
                    help="instead: the step time of Adam over 1 to 10000 tensors (1 to 1000 "
                         "with --quick), fitted as fixed cost + per tensor + per element")
    ap.add_argument("--thread-sweep", action="store_true",
                    help="instead: fastopt with 1 thread against --threads threads (2 unless "
                         "more are given) while another process keeps one core busy; default "
                         f"optimizers {','.join(threads.SWEEP_OPTIMIZERS)}, sizes "
                         f"{','.join(threads.SWEEP_SIZES)} ({','.join(threads.QUICK_SIZES)} "
                         "with --quick)")
    ap.add_argument("--no-load", action="store_true",
                    help="with --thread-sweep: no background process")
    ap.add_argument("--distributed", action="store_true",
                    help="instead: data-parallel Adam over MPI (mpiexec -n K for each of "
                         "--ranks), plain and ZeroOptimizer: state per rank, communication "
                         "and update times; default sizes 1e6,1e7 (1e5,1e6 with --quick)")
    ap.add_argument("--ranks", type=_rank_counts, default=[1, 2, 3],
                    help="with --distributed: comma-separated process counts (default 1,2,3)")
    ap.add_argument("--low-precision", action="store_true",
                    help="instead: Adam with float32, bfloat16 and 8-bit state (and torch, "
                         "bitsandbytes, torchao) at 1e6, 1e7, 1e8 elements (1e5, 1e6 with "
                         "--quick), 1 thread and all threads (or 1 and --threads)")
    ap.add_argument("--configs", type=_low_precision_configs, default=None,
                    help="with --low-precision: a comma-separated subset of "
                         "fp32,bf16,int8,torch,bnb,torchao (default all)")
    ap.set_defaults(run=run)
    return ap


def _low_precision_configs(text):
    from fastopt._cli import low_precision
    return low_precision.parse_configs(text)


def run_low_precision(args):
    """``--low-precision``: the table of fastopt._cli.low_precision."""
    from fastopt._cli import low_precision
    sizes = args.sizes or _sizes(",".join(low_precision.QUICK_SIZES if args.quick
                                          else low_precision.DEFAULT_SIZES))
    if any(len(shape) != 1 for _, shape in sizes):
        print("--low-precision times one tensor per size: give N, not COUNTxN",
              file=sys.stderr)
        return 2
    counts = sorted({1, args.threads if args.threads > 1 else (os.cpu_count() or 1)})
    return low_precision.main([(label, shape[0]) for label, shape in sizes], args.configs,
                              counts, args.rounds or (3 if args.quick else 5), args.quick,
                              args.json, log=lambda text: print(text, file=sys.stderr,
                                                                flush=True))


def run_thread_sweep(args):
    """``--thread-sweep``: the table of fastopt.threads.sweep."""
    names = args.optimizers or threads.SWEEP_OPTIMIZERS
    sizes = args.sizes or _sizes(",".join(threads.QUICK_SIZES if args.quick
                                          else threads.SWEEP_SIZES))
    n = args.threads if args.threads > 1 else 2
    rounds = args.rounds or (3 if args.quick else 5)
    print(f"fastopt {fastopt.__version__}: thread sweep, 1 against {n} threads, "
          f"{'one core kept busy' if not args.no_load else 'no added load'}", file=sys.stderr)
    rows = threads.sweep(names, sizes, threads=n, rounds=rounds, load=not args.no_load,
                         log=lambda text: print(text, file=sys.stderr, flush=True))
    print(threads.format_sweep(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": fastopt.show_config(print_=False), "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def run(args):
    """Run the benchmark from the parsed arguments; returns the exit status."""
    if args.tensor_count:
        from fastopt._cli import tensor_count
        counts = [1, 10, 100, 1000] if args.quick else [1, 10, 100, 1000, 10000]
        name = args.optimizers[0] if args.optimizers else "Adam"
        res = tensor_count.run(counts, [1, 1000], args.rounds or (3 if args.quick else 5), name)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    if args.thread_sweep:
        return run_thread_sweep(args)
    if args.distributed:
        from fastopt._cli import distributed
        sizes = [sum(shape) for _, shape in args.sizes] if args.sizes else (
            [100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000])
        distributed.run(sizes, args.ranks, args.rounds or (3 if args.quick else 7),
                        json_path=args.json)
        return 0
    if args.low_precision:
        return run_low_precision(args)
    names = list(CASES) if args.optimizers is None else args.optimizers
    sizes = args.sizes or _sizes(",".join(QUICK_SIZES if args.quick else DEFAULT_SIZES))
    rounds = args.rounds or (3 if args.quick else 5)
    target = 0.01 if args.quick else 0.015

    impls = ["fastopt"] + ([] if args.no_numpy else ["numpy"])
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
            impls.append("torch")
        except ImportError:
            print("torch is not installed: comparing with NumPy only "
                  "(pip install torch for the torch column)", file=sys.stderr)
    before = fastopt.get_num_threads()
    fastopt.set_num_threads(args.threads)
    cfg = fastopt.show_config(print_=False)
    print(f"fastopt {fastopt.__version__}: isa={cfg['isa']} openmp={cfg['openmp']} "
          f"threads={args.threads}" + (f"; torch {torch.__version__}" if torch else ""),
          file=sys.stderr)
    rows = []
    total = len(names) * len(sizes)
    try:
        for name in names:
            for label, shape in sizes:
                print(f"[{len(rows) + 1}/{total}] {name} {label} ...", file=sys.stderr,
                      flush=True)
                res = measure(name, shape, impls, rounds, target, torch)
                n = sum(shape)
                row = {"optimizer": name, "size": label, "elements": n,
                       "tensors": len(shape), "threads": args.threads}
                for impl, sec in res.items():
                    row[f"{impl}_ns"] = sec / n * 1e9
                row["fastopt_step_us"] = res["fastopt"] * 1e6
                row["fastopt_gbs"] = CASES[name].bytes_per_element * n / res["fastopt"] / 1e9
                for impl in ("numpy", "torch"):
                    if impl in res:
                        row[f"speedup_{impl}"] = res[impl] / res["fastopt"]
                rows.append(row)
    finally:
        fastopt.set_num_threads(before)
    print(format_table(rows, args.threads))
    notes = [f"{n}: {CASES[n].note}" for n in names if CASES[n].note]
    if notes:
        print("notes: " + "; ".join(notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "torch": getattr(torch, "__version__", None),
                       "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0
