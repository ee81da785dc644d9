"""What ``python -m fastopt bench`` and ``benchmarks/`` compare, optimizer by optimizer.

Each case gives the fastopt keyword arguments, an in-place NumPy implementation of the same
update (what a NumPy user would write: ufuncs with ``out=``, no temporaries per element
beyond one scratch array), how to build torch's fastest CPU optimizer for it, and the bytes
the update must move per element (the memory-bandwidth floor).
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["BenchCase", "CASES"]


@dataclass
class BenchCase:
    kwargs: dict
    #: numpy_step(params, grads, state, step) updates the float32 arrays in place;
    #: ``state`` is a dict it may fill on first use.
    numpy_step: Callable
    #: (torch optimizer class name, extra kwargs): fused=True where torch has a fused kernel
    torch: tuple
    bytes_per_element: int
    note: str = field(default="")


def _scratch(state, key, p):
    arr = state.get(key)
    if arr is None:
        arr = state[key] = [np.zeros_like(x) for x in p]
    return arr


def _sgd_momentum(lr=0.01, mu=0.9):
    def step(params, grads, state, t):
        bufs = _scratch(state, "buf", params)
        tmp = _scratch(state, "tmp", params)
        for p, g, b, s in zip(params, grads, bufs, tmp):
            np.multiply(b, mu, out=b)
            np.add(b, g, out=b)
            np.multiply(b, lr, out=s)
            np.subtract(p, s, out=p)
    return step


def _adagrad(lr=0.01, eps=1e-10):
    def step(params, grads, state, t):
        sums = _scratch(state, "sum", params)
        tmp = _scratch(state, "tmp", params)
        for p, g, acc, s in zip(params, grads, sums, tmp):
            np.multiply(g, g, out=s)
            np.add(acc, s, out=acc)
            np.sqrt(acc, out=s)
            np.add(s, eps, out=s)
            np.divide(g, s, out=s)
            np.multiply(s, lr, out=s)
            np.subtract(p, s, out=p)
    return step


def _rmsprop(lr=0.01, alpha=0.99, eps=1e-8):
    def step(params, grads, state, t):
        sqs = _scratch(state, "sq", params)
        tmp = _scratch(state, "tmp", params)
        for p, g, sq, s in zip(params, grads, sqs, tmp):
            np.multiply(sq, alpha, out=sq)
            np.multiply(g, g, out=s)
            np.multiply(s, 1 - alpha, out=s)
            np.add(sq, s, out=sq)
            np.sqrt(sq, out=s)
            np.add(s, eps, out=s)
            np.divide(g, s, out=s)
            np.multiply(s, lr, out=s)
            np.subtract(p, s, out=p)
    return step


def _adam(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    def step(params, grads, state, t):
        ms = _scratch(state, "m", params)
        vs = _scratch(state, "v", params)
        tmp = _scratch(state, "tmp", params)
        step_size = lr / (1 - b1 ** t)
        bc2 = (1 - b2 ** t) ** 0.5
        for p, g, m, v, s in zip(params, grads, ms, vs, tmp):
            if wd:
                np.multiply(p, 1 - lr * wd, out=p)
            np.multiply(m, b1, out=m)
            np.multiply(g, 1 - b1, out=s)
            np.add(m, s, out=m)
            np.multiply(v, b2, out=v)
            np.multiply(g, g, out=s)
            np.multiply(s, 1 - b2, out=s)
            np.add(v, s, out=v)
            np.sqrt(v, out=s)
            np.divide(s, bc2, out=s)
            np.add(s, eps, out=s)
            np.divide(m, s, out=s)
            np.multiply(s, step_size, out=s)
            np.subtract(p, s, out=p)
    return step


#: optimizer name -> case. Optimizers added to fastopt.OPTIMIZERS add a case here.
CASES = {
    "SGD": BenchCase(dict(lr=0.01, momentum=0.9), _sgd_momentum(), ("SGD", {"fused": True}),
                     20, "momentum 0.9"),
    "Adagrad": BenchCase(dict(lr=0.01), _adagrad(), ("Adagrad", {"fused": True}), 20),
    "RMSprop": BenchCase(dict(lr=0.01), _rmsprop(), ("RMSprop", {}), 20,
                         "torch has no fused RMSprop: its default for-loop path"),
    "Adam": BenchCase(dict(lr=1e-3), _adam(), ("Adam", {"fused": True}), 28),
    "AdamW": BenchCase(dict(lr=1e-3, weight_decay=1e-2), _adam(wd=1e-2),
                       ("AdamW", {"fused": True}), 28),
}

# issue 4's per-element optimizers (their cases live in fastopt/_bench_cases_extra.py)
from fastopt._bench_cases_extra import EXTRA_CASES  # noqa: E402

CASES.update(EXTRA_CASES)
