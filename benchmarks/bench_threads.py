"""fastopt's threads: on a loaded machine, against a bare C loop, at the threshold, and in
training loops that share the machine with BLAS.

    python benchmarks/bench_threads.py sweep [--no-load] [--quick] [--sizes 1e5,1e6]
    python benchmarks/bench_threads.py bare [--threads 2] [--sizes 1e5,1e6,1e7,1e8]
    python benchmarks/bench_threads.py threshold
    python benchmarks/bench_threads.py training [--rounds 5]

``sweep``      one step with 1 thread against 2 threads while a background process keeps one
               core busy (``python -m fastopt bench --thread-sweep``, same options).
``bare``       fo_run (fastopt's threads: shares, chunks, waiting workers) against a bare loop
               over the same kernel with the same thread count: helper threads that spin all
               the time and one equal static piece each, the least any threading costs. Also
               one thread. Needs a C compiler with OpenMP (``CC``, else cc): it compiles
               threads_bare.c next to this file and calls it through ctypes.
``threshold``  one thread against fastopt's threads forced on 2 (no threshold) at sizes around
               the threshold, with steps back to back (workers awake) and with other work
               between steps (workers asleep), and the bare loop as the ideal: where two
               threads start to pay, which is how fastopt's threshold was chosen.
``training``   the digits MLP loop of examples/digits_mlp.py (NumPy, OpenBLAS at its default
               threads), the same with a hidden layer of 1024 (large enough for fastopt's
               threads), and a torch CPU training step (fastopt.torch.Adam, torch at its
               default threads), each with fastopt's default threads against one fastopt
               thread (set around the step alone, so BLAS and torch keep theirs).

Every timing interleaves its variants in rounds (ABBA in ``training``) and reports the
ratio's median and min..max over the rounds: on a shared machine, read the spread first.

Reading ``bare`` on a shared machine. The bare loop is the ideal of an idle machine, and it
gets there by means fastopt refuses: its helper threads spin without ever giving up their
core, and its calling thread waits for them at every repetition (a barrier). fastopt's
workers spin for a few microseconds and then yield the core at every turn (and sleep after
100 us), and its calling thread never waits for a worker that has not joined (see
csrc/dispatch.c). When other processes want the cores (more threads want to run than there
are cores), a yielding worker gets its core back only after their time slice, milliseconds,
so fastopt runs most repetitions of a small job on the calling thread alone, at the
one-thread time, while the bare helper keeps its core and is two threads fast in the median
(and hundreds of times slower in the rounds where it was descheduled: the ``0.00`` minima).
A ratio near ``1 thread/bare`` in such a run measures the scheduler, not fastopt's threads;
the smallest jobs (SGD at 1e5 elements: 4 microseconds on two threads) show it first.
``bare`` counts the threads of other processes that run or wait for a core around each row
and flags the rows where they and its own threads exceed the cores by more than half a
thread. On the 2-core development machine rows with none of them gave 1.13 for SGD at 1e5
elements and 0.94 to 1.04 for every other row from 1e5 to 1e8; loaded rows gave up to the
one-thread ratio. (Before fastopt woke its workers away from the calling thread's CPU, see
csrc/dispatch.c, an idle machine gave the one-thread ratio too in most rows of SGD at 1e5:
the rows after the bare loop's two busy threads, when Linux woke the worker on the caller's
CPU.) No OpenMP parallel region runs in this comparison (fastopt's
workers and the bare helpers are plain pthreads; libgomp starts no thread), so
``GOMP_SPINCOUNT`` does not enter it; ``OMP_WAIT_POLICY=passive`` only turns fastopt's own
spin off.
"""
import argparse
import ctypes
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import fastopt
from fastopt import _kernels

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

#: float32 kernels for the bare comparison, with their hyperparameter doubles in the order of
#: the kernel's struct (csrc/<name>.c); the step counter stays 1
KERNELS = {
    "sgd": [1e-3, 0, 0, 0, 0, 0],
    "adam": [1e-3, 0.9, 0.999, 1e-8, 0, 0, 0, 0],
    "rmsprop": [1e-2, 0.99, 1e-8, 0, 0, 0, 0],
}


def _ratio(xs):
    return f"{statistics.median(xs):5.2f} ({min(xs):.2f}..{max(xs):.2f})"


# ---- the bare loop ----------------------------------------------------------------------------

def _compile_bare():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("no C compiler found (set CC)")
    out = pathlib.Path(tempfile.mkdtemp(prefix="fastopt-bare-")) / "threads_bare.so"
    cmd = [cc, "-O2", "-fopenmp", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}",
           str(HERE / "threads_bare.c"), "-o", str(out), "-ldl", "-lpthread"]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(out))
    lib.fo_bare_bench.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int64, ctypes.POINTER(ctypes.c_double),
                                  ctypes.c_double, ctypes.POINTER(ctypes.c_double)]
    return lib


def bare_rounds(lib, kernel, n, nthr, rounds, gap_us=0.0):
    """rounds x (one, bare, fo_run, fo_run_threads) ns per element."""
    hyper = (ctypes.c_double * 16)(*KERNELS[kernel])
    out = (ctypes.c_double * (4 * rounds))()
    rc = lib.fo_bare_bench(_kernels.__file__.encode(), kernel.encode(), nthr, rounds, n,
                           hyper, gap_us, out)
    if rc != 0:
        sys.exit(f"fo_bare_bench failed for {kernel}")
    return np.array(out[:]).reshape(rounds, 4)


def _others_running(samples=20, every=0.005):
    """How many threads of other processes were running or waiting for a core, on average
    over ``samples`` looks (Linux's ``procs_running``, less this thread; the benchmark's own
    threads are idle meanwhile), or None where the system does not say."""
    seen = []
    for _ in range(samples):
        try:
            with open("/proc/stat") as f:
                line = next(x for x in f if x.startswith("procs_running"))
        except (OSError, StopIteration):
            return None
        seen.append(int(line.split()[1]) - 1)
        time.sleep(every)
    return statistics.mean(seen)


def cmd_bare(args):
    lib = _compile_bare()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    print(f"fo_run with {args.threads} threads against a bare {args.threads}-thread loop over "
          f"the same float32 kernel; ns per element, median over {args.rounds} rounds; "
          f"ratios median (min..max)")
    cores = os.cpu_count() or 1
    print(f"{'kernel':<8} {'size':>6} {'1 thread':>9} {'bare':>8} {'fastopt':>8} "
          f"{'fastopt/bare':>20} {'1 thread/bare':>20} {'others':>7}")
    for kernel in args.kernels.split(","):
        for n in sizes:
            before = _others_running()
            r = bare_rounds(lib, kernel, n, args.threads, args.rounds)
            after = _others_running()
            load = "" if before is None else f"{(before + after) / 2:7.1f}"
            # more threads than cores for a good part of the time
            flag = (" (loaded)" if before is not None
                    and (before + after) / 2 + args.threads > cores + 0.5 else "")
            print(f"{kernel:<8} {n:>6.0e} {np.median(r[:, 0]):9.3f} {np.median(r[:, 1]):8.3f} "
                  f"{np.median(r[:, 2]):8.3f} {_ratio(r[:, 2] / r[:, 1]):>20} "
                  f"{_ratio(r[:, 0] / r[:, 1]):>20} {load}{flag}", flush=True)
    print(f"others: threads of other processes running or waiting for a core, on average "
          f"before and after the row ({cores} cores); (loaded): with the benchmark's "
          f"{args.threads} they exceed the cores by more than 0.5, see the module docstring")


def cmd_threshold(args):
    lib = _compile_bare()
    grain = _kernels.build_info()["grain"]
    print(f"fastopt runs one thread below {2 * grain} elements. 1 thread / fastopt's threads "
          f"forced on 2 threads (fo_run_threads; above 1: two threads are faster), median "
          f"(min..max) over {args.rounds} rounds; steps back to back, and with "
          f"{args.gap:g} us of other work between steps")
    print(f"{'kernel':<6} {'size':>7} {'back to back':>20} {'with gaps':>20} "
          f"{'ideal (bare loop)':>20}")
    for kernel in args.kernels.split(","):
        for n in (8192, 16384, 32768, 49152, 65536, 98304, 131072, 262144):
            r = bare_rounds(lib, kernel, n, 2, args.rounds)
            g = bare_rounds(lib, kernel, n, 2, args.rounds, args.gap)
            print(f"{kernel:<6} {n:>7} {_ratio(r[:, 0] / r[:, 3]):>20} "
                  f"{_ratio(g[:, 0] / g[:, 3]):>20} {_ratio(r[:, 0] / r[:, 1]):>20}",
                  flush=True)


# ---- training loops -------------------------------------------------------------------------

class _OneThreadStep:
    """opt.step with one fastopt thread; OpenMP's setting is restored after it, so BLAS and
    torch run their own count."""

    def __init__(self, opt):
        self.opt = opt

    def __call__(self):
        before = fastopt.get_num_threads()
        fastopt.set_num_threads(1)
        try:
            self.opt.step()
        finally:
            fastopt.set_num_threads(before)


def _digits(hidden):
    sys.path.insert(0, str(ROOT / "examples"))
    import digits_mlp
    Xtr, ytr, _, _ = digits_mlp.load_data(0)
    params = digits_mlp.init_params(0, sizes=(64, hidden, 10))
    opt = fastopt.Adam(params, lr=1e-3)
    rng = np.random.default_rng(1)
    batches = [rng.permutation(len(ytr))[:32] for _ in range(200)]

    def epoch(step):
        for idx in batches:
            _, grads = digits_mlp.loss_and_grads(params, Xtr[idx], ytr[idx])
            for p, g in zip(params, grads):
                p.grad = np.asarray(g, dtype=np.float32)
            step()
    return opt, epoch


def _torch_step():
    import torch
    import fastopt.torch as ft
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    opt = ft.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def epoch(step):
        for _ in range(10):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            step()
    return opt, epoch


def cmd_training(args):
    cases = [("digits MLP 64-128-10 (NumPy)", lambda: _digits(128)),
             ("digits MLP 64-1024-10 (NumPy)", lambda: _digits(1024))]
    try:
        import torch
        cases.append((f"torch MLP 784-1024-1024-10, batch 64 (torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads)", _torch_step))
    except ImportError:
        print("torch is not installed: the torch case is left out", file=sys.stderr)
    try:
        from threadpoolctl import threadpool_info
        blas = [f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info()
                if i["user_api"] == "blas"]
    except ImportError:
        blas = ["(threadpoolctl not installed)"]
    print(f"fastopt default threads ({fastopt.get_num_threads()}) against one fastopt thread; "
          f"BLAS threads: {', '.join(blas)}; ms per loop (median), ratio default/one "
          f"median (min..max) over {args.rounds} rounds")
    for label, make in cases:
        opt, epoch = make()
        variants = {"default": opt.step, "one": _OneThreadStep(opt)}
        epoch(opt.step)  # warm up: state, caches, threads
        samples = {k: [] for k in variants}
        for r in range(args.rounds):
            for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):  # ABBA
                step = variants[k]
                t0 = time.perf_counter()
                epoch(step)
                samples[k].append(time.perf_counter() - t0)
        ratios = [a / b for a, b in zip(samples["default"], samples["one"])]
        print(f"{label}: default {statistics.median(samples['default']) * 1e3:.1f} ms, "
              f"one thread {statistics.median(samples['one']) * 1e3:.1f} ms, "
              f"default/one {_ratio(ratios)}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("sweep", add_help=False)
    bare = sub.add_parser("bare")
    bare.add_argument("--threads", type=int, default=2)
    bare.add_argument("--sizes", default="1e5,1e6,1e7,1e8")
    bare.add_argument("--kernels", default="sgd,adam,rmsprop")
    bare.add_argument("--rounds", type=int, default=5)
    thr = sub.add_parser("threshold")
    thr.add_argument("--rounds", type=int, default=3)
    thr.add_argument("--gap", type=float, default=500.0,
                     help="microseconds of other work between steps (default 500)")
    thr.add_argument("--kernels", default="sgd,adam")
    tr = sub.add_parser("training")
    tr.add_argument("--rounds", type=int, default=5)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        from fastopt._cli import main as cli
        return cli(["bench", "--thread-sweep", *argv[1:]])
    args = ap.parse_args(argv)
    {"bare": cmd_bare, "threshold": cmd_threshold, "training": cmd_training}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
