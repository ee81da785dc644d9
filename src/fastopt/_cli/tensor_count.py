"""The cost of a step as a function of the number of parameter tensors: Adam (float32, one
thread) over N tensors of E elements, for fastopt with NumPy parameters, fastopt.torch with
a model's tensors, torch.optim (``fused=True``, ``foreach=True`` and the default
single-tensor loop) and DeepSpeed's CPU Adam when it is installed and builds.

    python -m fastopt bench --tensor-count [--quick] [--rounds 5] [--json FILE]
    python benchmarks/bench_tensor_count.py [--counts 1,10,100,1000,10000] [--elements 1,1000]
                                            [--rounds 5] [--optimizer Adam] [--json FILE]
                                            [--impls fastopt,fastopt.torch] [--cpu-time]
                                            [--grads backward]

Every step gets new gradient arrays (as a backward with ``zero_grad(set_to_none=True)``
makes them), assigned outside the timed region; each step is timed alone. The cases run
interleaved, round after round, so that the noise of a shared machine hits them alike; a case's
time is the median over its rounds of the median step of the round. The fit is the plane
``a + b N + c N E`` over all (N, E), by least squares of the relative error: ``a`` is the fixed
cost of a step, ``b`` the cost per tensor, ``c`` the cost per element. The tables per E also
give ``(t(N) - t(1)) / (N - 1)`` at each count, the cost per tensor there (element work
included), so that growth with N shows.

``--cpu-time`` times each step by the CPU time of the calling thread instead of the wall
clock: every case steps on that one thread, and on a machine shared with other processes a
step of many tensors (milliseconds) is otherwise timed with the time slices it waited for a
core. ``--impls`` runs some of the cases only.

``--grads backward`` makes the torch cases' gradients as a backward pass does (in C++, with
no Python object until ``.grad`` is first read) instead of assigning them from Python: then
every implementation's first read of a ``.grad`` in the step creates torch's Python object
for that tensor, which the default (assigned) gradients have already. That is the cost a
training loop with ``zero_grad(set_to_none=True)`` pays, torch.optim's own steps included.
The NumPy case is the same in both.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np

import fastopt

IMPLS = ("fastopt", "fastopt.torch", "torch fused", "torch foreach", "torch for-loop",
         "DeepSpeed CPU Adam")


def _counts(text):
    return [int(float(x)) for x in text.split(",") if x]


def _maybe_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _deepspeed_adam():
    """DeepSpeed's CPU Adam class, or None with the reason on stderr."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as e:  # not installed, or its import fails on this machine
        print(f"DeepSpeed CPU Adam left out: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return DeepSpeedCPUAdam


class Case:
    """One optimizer over ``n`` tensors of ``e`` elements, with ``k`` sets of gradients that
    it cycles through (a new set before every step)."""

    def __init__(self, impl, name, n, e, torch=None, ds_cls=None, k=3, backward=False):
        rng = np.random.default_rng(0)
        data = [rng.standard_normal(e).astype(np.float32) * 0.1 for _ in range(n)]
        self.grads = [[rng.standard_normal(e).astype(np.float32) * 0.01 for _ in range(n)]
                      for _ in range(k)]
        kw = {"lr": 1e-3}
        if impl == "fastopt":
            self.params = [fastopt.Parameter(d) for d in data]
            self.opt = getattr(fastopt, name)(self.params, **kw)
        else:
            self.params = [torch.nn.Parameter(torch.from_numpy(d.copy())) for d in data]
            self.grads = [[torch.from_numpy(g) for g in gs] for gs in self.grads]
            if impl == "fastopt.torch":
                import fastopt.torch as ft
                self.opt = getattr(ft, name)(self.params, **kw)
            elif impl == "torch fused":
                self.opt = getattr(torch.optim, name)(self.params, fused=True, **kw)
            elif impl == "torch foreach":
                self.opt = getattr(torch.optim, name)(self.params, foreach=True, **kw)
            elif impl == "torch for-loop":
                self.opt = getattr(torch.optim, name)(self.params, foreach=False, **kw)
            else:
                self.opt = ds_cls(self.params, **kw)
        self.k = 0
        self.clone = impl != "fastopt"
        self.backward = backward and self.clone
        self.torch = torch
        for _ in range(3):  # past the steps that create state
            self.feed()
            self.opt.step()

    def feed(self):
        gs = self.grads[self.k % len(self.grads)]
        self.k += 1
        if self.backward:  # made in C++ by the backward pass: no Python object yet
            for p in self.params:
                p.grad = None
            self.torch.autograd.backward(self.params, gs)
        elif self.clone:  # a new tensor per step, as autograd makes
            for p, g in zip(self.params, gs):
                p.grad = g.clone()
        else:
            for p, g in zip(self.params, gs):
                p.grad = g.copy()

    def round(self, steps, clock=time.perf_counter):
        """The median time of ``steps`` steps, each after new gradients, by ``clock``."""
        times = []
        for _ in range(steps):
            self.feed()
            t0 = clock()
            self.opt.step()
            times.append(clock() - t0)
        return statistics.median(times)


def _steps_for(n, e):
    # about 20 ms of stepping per round, at least 3 steps
    work = n * (e * 1.5e-9 + 1e-6)
    return max(3, min(200, int(0.02 / max(work, 1e-7))))


def fit(points):
    """``a + b N + c N E`` fitted to (N, E, time) points by least squares of the relative
    error (so that the few-tensor points, which fix ``a``, weigh as much as the large ones):
    the fixed cost, the cost per tensor and the cost per element."""
    x = np.array([[1.0, n, n * e] for n, e, _ in points])
    y = np.array([t for _, _, t in points])
    w = 1.0 / y
    (a, b, c), *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    return a, b, c


def run(counts, elements, rounds, name="Adam", impls=IMPLS, out=print, cpu_time=False,
        backward=False):
    torch = _maybe_torch()
    ds_cls = _deepspeed_adam() if "DeepSpeed CPU Adam" in impls and name == "Adam" else None
    impls = [i for i in impls if i == "fastopt" or (torch is not None and (
        i != "DeepSpeed CPU Adam" or ds_cls is not None))]
    before = fastopt.get_num_threads(), torch.get_num_threads() if torch is not None else None
    fastopt.set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)
    try:
        results = _measure(counts, elements, rounds, name, impls, torch, ds_cls,
                           time.thread_time if cpu_time else time.perf_counter, backward)
    finally:
        fastopt.set_num_threads(before[0])
        if torch is not None:
            torch.set_num_threads(before[1])
    _report(results, counts, elements, rounds, name, impls, out, cpu_time, backward)
    return {f"{i}|{e}|{n}": v for (i, e, n), v in results.items()}


def _measure(counts, elements, rounds, name, impls, torch, ds_cls, clock, backward=False):
    results = {}
    for e in elements:
        for n in counts:
            cases = {i: Case(i, name, n, e, torch, ds_cls, backward=backward) for i in impls}
            steps = _steps_for(n, e)
            per = {i: [] for i in impls}
            for _ in range(rounds):
                for i in impls:
                    per[i].append(cases[i].round(steps, clock))
            for i in impls:
                results[(i, e, n)] = (statistics.median(per[i]), min(per[i]), max(per[i]))
            del cases
    return results


def _report(results, counts, elements, rounds, name, impls, out, cpu_time=False,
            backward=False):
    what = "CPU time of the thread, " if cpu_time else ""
    grads = "; torch gradients made by backward" if backward else ""
    out(f"{name}, float32, 1 thread; step time in us ({what}median over {rounds} rounds) for N "
        f"tensors of E elements, fitted as a + b N + c N E{grads}")
    out("")
    out(f"{'':20s} {'a (us)':>8s} {'b (us)':>8s} {'c (ns)':>8s}")
    for i in impls:
        a, b, c = fit([(n, e, results[(i, e, n)][0] * 1e6) for e in elements for n in counts])
        out(f"{i:20s} {a:8.2f} {b:8.3f} {c * 1e3:8.3f}")
    for e in elements:
        out("")
        out(f"E = {e}: step time (us) at each N; then (t(N) - t(1)) / (N - 1), the cost per "
            f"tensor there (us)")
        out(f"{'':20s} " + " ".join(f"{'N=' + str(n):>10s}" for n in counts))
        for i in impls:
            ts = [results[(i, e, n)][0] * 1e6 for n in counts]
            marg = [(ts[j] - ts[0]) / (n - 1) for j, n in enumerate(counts) if n > 1]
            out(f"{i:20s} " + " ".join(f"{t:10.1f}" for t in ts) + "   "
                + " ".join(f"{m:.2f}" for m in marg))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=_counts, default=[1, 10, 100, 1000, 10000])
    ap.add_argument("--elements", type=_counts, default=[1, 1000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--optimizer", default="Adam")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--impls", type=lambda t: tuple(x for x in t.split(",") if x),
                    default=IMPLS, help=f"a comma-separated choice of {', '.join(IMPLS)}")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time steps by the thread's CPU time (a shared machine)")
    ap.add_argument("--grads", choices=("assign", "backward"), default="assign",
                    help="torch gradients assigned from Python (default) or made by a "
                         "backward pass")
    args = ap.parse_args(argv)
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        ap.error(f"unknown --impls {', '.join(sorted(unknown))}; choose from {', '.join(IMPLS)}")
    res = run(args.counts, args.elements, args.rounds, args.optimizer, impls=args.impls,
              cpu_time=args.cpu_time, backward=args.grads == "backward")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
