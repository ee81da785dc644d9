"""``python -m fastopt bench --thread-sweep``: 1 thread against N threads on a loaded machine.

While a background process keeps one core busy (started and stopped here: ``--no-load``
leaves it out), one fastopt step of each optimizer and size is timed with 1 thread and with
``--threads`` threads (default 2), in interleaved rounds. Each round times single steps and
keeps their median; the table reports the medians over the rounds and the ratio N threads /
1 thread as its median and min..max over the rounds (above 1: the threads cost time).
benchmarks/bench_threads.py runs the same sweep, and the comparison with a bare C loop.
"""
import contextlib
import statistics
import subprocess
import sys
import time

import numpy as np

import fastopt
from fastopt._cli.cases import CASES

__all__ = ["busy_core", "sweep", "format_sweep"]

SWEEP_OPTIMIZERS = ["SGD", "Adam", "RMSprop"]
SWEEP_SIZES = ["1e4", "1e5", "1e6", "1e7", "1e8"]
QUICK_SIZES = ["1e4", "1e5", "1e6", "1e7"]

#: what the background process runs: a loop that never sleeps
_SPIN = "while True:\n    pass\n"


@contextlib.contextmanager
def busy_core(on=True):
    """Keep one core busy with a child process while the block runs (nothing if not ``on``)."""
    if not on:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.2)  # let it start spinning
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _optimizer(name, shape, rng):
    params = []
    for n in shape:
        p = fastopt.Parameter((rng.standard_normal(n) * 0.1).astype(np.float32))
        p.grad = (rng.standard_normal(n) * 0.01).astype(np.float32)
        params.append(p)
    return fastopt.OPTIMIZERS[name](params, **CASES[name].kwargs)


def _round(step, reps):
    """The median time of one step over reps steps."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sweep(names, sizes, threads=2, rounds=5, target=0.01, load=True, log=None):
    """Time 1 and ``threads`` threads for every optimizer and size (``(label, tensor sizes)``
    pairs, as ``bench.parse_size`` makes them).

    Returns rows of dicts: optimizer, size, elements, threads, load, ns_1 and ns_n (median
    ns per element), ratio (median of the per-round ratios n/1), ratio_min, ratio_max.
    """
    rows = []
    before = fastopt.get_num_threads()
    try:
        with busy_core(load):
            for name in names:
                for label, shape in sizes:
                    if log:
                        log(f"{name} {label} ...")
                    n = sum(shape)
                    opt = _optimizer(name, shape, np.random.default_rng(0))
                    fastopt.set_num_threads(1)
                    opt.step()  # state created
                    t0 = time.perf_counter()
                    opt.step()
                    reps = max(3, min(2000, int(target / max(time.perf_counter() - t0, 1e-7))))
                    samples = {1: [], threads: []}
                    for _ in range(rounds):
                        for k in samples:
                            fastopt.set_num_threads(k)
                            samples[k].append(_round(opt.step, reps))
                    ratios = [b / a for a, b in zip(samples[1], samples[threads])]
                    rows.append({"optimizer": name, "size": label, "elements": n,
                                 "threads": threads, "load": bool(load),
                                 "ns_1": statistics.median(samples[1]) / n * 1e9,
                                 "ns_n": statistics.median(samples[threads]) / n * 1e9,
                                 "ratio": statistics.median(ratios),
                                 "ratio_min": min(ratios), "ratio_max": max(ratios)})
                    del opt
    finally:
        fastopt.set_num_threads(before)
    return rows


def format_sweep(rows):
    if not rows:
        return ""
    n, load = rows[0]["threads"], rows[0]["load"]
    head = (f"{'optimizer':<9} {'size':>6} {'1 thread':>9} {f'{n} threads':>10} "
            f"{f'{n}/1 median':>11} {'min..max':>13}")
    out = [f"float32, ns per element (median over rounds); "
           f"{'one core kept busy by another process' if load else 'no added load'}",
           head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['optimizer']:<9} {r['size']:>6} {r['ns_1']:9.3f} {r['ns_n']:10.3f} "
                   f"{r['ratio']:11.2f} {r['ratio_min']:6.2f}..{r['ratio_max']:<5.2f}")
    return "\n".join(out)
