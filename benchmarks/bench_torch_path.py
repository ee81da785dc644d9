"""The cost of a step on torch tensors: fastopt.torch's optimizers (torch.optim subclasses,
tensor state), fastopt's NumPy optimizers given the same tensors, and torch.optim with
``fused=True``.

    python benchmarks/bench_torch_path.py [--repeats 7] [--threads 1] [--clock thread]

Each case times the three side by side, interleaved round after round so that the noise of
a shared machine hits them alike; it prints the median time per step and the ratios of
fastopt.torch to the other two as median (min to max over the rounds). ``--clock thread``
counts the CPU time of the stepping thread (with one thread, what a step costs, without the
time the thread waits while other processes run), ``wall`` (default) the elapsed time.
"""
import argparse
import statistics
import time

import torch

import fastopt
import fastopt.torch
from fastopt import _kernels

CASES = [("Adam", {"lr": 1e-3}), ("SGD", {"lr": 1e-2, "momentum": 0.9})]
SHAPES = {"1e5": [100_000], "100x1000": [1000] * 100, "1000x100": [100] * 1000}


def _tensors(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=g) * 0.1) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.01
    return params


def _steppers(name, kwargs, sizes):
    out = {}
    out["fastopt.torch"] = getattr(fastopt.torch, name)(_tensors(sizes), **kwargs).step
    out["fastopt"] = getattr(fastopt, name)(_tensors(sizes), **kwargs).step
    out["torch fused"] = getattr(torch.optim, name)(_tensors(sizes), fused=True, **kwargs).step
    return out


def _time(step, clock, target_s=0.05):
    step()
    n, t = 1, 0.0
    while True:
        t0 = clock()
        for _ in range(n):
            step()
        t = clock() - t0
        if t >= target_s:
            return t / n
        n *= 2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    fastopt.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, fastopt {fastopt.__version__}, "
          f"{args.threads} thread(s), ISA {_kernels.get_isa()}, {args.repeats} rounds, "
          f"{args.clock} clock")
    print(f"{'case':<14} {'fastopt.torch':>14} {'fastopt':>10} {'torch fused':>12} "
          f"{'vs fastopt':>20} {'vs torch fused':>20}")
    for name, kwargs in CASES:
        for label, sizes in SHAPES.items():
            steps = _steppers(name, kwargs, sizes)
            times = {k: [] for k in steps}
            for _ in range(args.repeats):
                for k, step in steps.items():
                    times[k].append(_time(step, clock))
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = []
            for other in ("fastopt", "torch fused"):
                r = [a / b for a, b in zip(times["fastopt.torch"], times[other])]
                cells.append(f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")
            print(f"{name + ' ' + label:<14} {med['fastopt.torch'] * 1e6:>11.1f} us "
                  f"{med['fastopt'] * 1e6:>7.1f} us {med['torch fused'] * 1e6:>9.1f} us "
                  f"{cells[0]:>20} {cells[1]:>20}")


if __name__ == "__main__":
    main()
