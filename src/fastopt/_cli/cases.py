"""What ``python -m fastopt bench`` and ``benchmarks/`` compare, optimizer by optimizer.

Each case gives the fastopt keyword arguments, an in-place NumPy implementation of the same
update (what a NumPy user would write: ufuncs with ``out=``, no temporaries per element
beyond one scratch array), how to build torch's fastest CPU optimizer for it, and the bytes
the update must move per element (the memory-bandwidth floor). torch has a fused CPU kernel
for SGD, Adagrad, Adam and AdamW only; for the others it runs its default for-loop path.
Lion is not in torch: the bench compares it with NumPy only.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CASES", "BenchCase"]


@dataclass
class BenchCase:
    kwargs: dict
    #: numpy_step(params, grads, state, step) updates the float32 arrays in place;
    #: ``state`` is a dict it may fill on first use.
    numpy_step: Callable
    #: (torch optimizer class name, keyword arguments added for torch): fused=True where
    #: torch has a fused kernel; a class name of None where torch lacks the optimizer
    torch: tuple
    bytes_per_element: int
    note: str = field(default="")


def _scratch(state, key, p):
    arr = state.get(key)
    if arr is None:
        arr = state[key] = [np.zeros_like(x) for x in p]
    return arr


def _ema(m, g, beta, tmp):
    """m = beta m + (1 - beta) g in place, as three NumPy operations (tmp is scratch)."""
    np.multiply(m, beta, out=m)
    np.multiply(g, 1 - beta, out=tmp)
    np.add(m, tmp, out=m)


def _ema_sq(v, g, beta, tmp):
    """v = beta v + (1 - beta) g^2 in place, as four NumPy operations (tmp is scratch)."""
    np.multiply(v, beta, out=v)
    np.multiply(g, g, out=tmp)
    np.multiply(tmp, 1 - beta, out=tmp)
    np.add(v, tmp, out=v)


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
            _ema_sq(sq, g, alpha, s)
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
            _ema(m, g, b1, s)
            _ema_sq(v, g, b2, s)
            np.sqrt(v, out=s)
            np.divide(s, bc2, out=s)
            np.add(s, eps, out=s)
            np.divide(m, s, out=s)
            np.multiply(s, step_size, out=s)
            np.subtract(p, s, out=p)
    return step


def _adadelta(lr=1.0, rho=0.9, eps=1e-6):
    def step(params, grads, state, t):
        sqs = _scratch(state, "sq", params)
        accs = _scratch(state, "acc", params)
        tmp = _scratch(state, "tmp", params)
        tmp2 = _scratch(state, "tmp2", params)
        for p, g, sq, acc, s, d in zip(params, grads, sqs, accs, tmp, tmp2):
            _ema_sq(sq, g, rho, s)
            np.add(sq, eps, out=s)
            np.sqrt(s, out=s)
            np.add(acc, eps, out=d)
            np.sqrt(d, out=d)
            np.divide(d, s, out=d)
            np.multiply(d, g, out=d)
            np.multiply(acc, rho, out=acc)
            np.multiply(d, d, out=s)
            np.multiply(s, 1 - rho, out=s)
            np.add(acc, s, out=acc)
            np.multiply(d, lr, out=d)
            np.subtract(p, d, out=p)
    return step


def _adamax(lr=2e-3, b1=0.9, b2=0.999, eps=1e-8):
    def step(params, grads, state, t):
        ms = _scratch(state, "m", params)
        us = _scratch(state, "u", params)
        tmp = _scratch(state, "tmp", params)
        clr = lr / (1 - b1 ** t)
        for p, g, m, u, s in zip(params, grads, ms, us, tmp):
            _ema(m, g, b1, s)
            np.multiply(u, b2, out=u)
            np.abs(g, out=s)
            np.add(s, eps, out=s)
            np.maximum(u, s, out=u)
            np.divide(m, u, out=s)
            np.multiply(s, clr, out=s)
            np.subtract(p, s, out=p)
    return step


def _nadam(lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, psi=4e-3):
    def step(params, grads, state, t):
        ms = _scratch(state, "m", params)
        vs = _scratch(state, "v", params)
        tmp = _scratch(state, "tmp", params)
        tmp2 = _scratch(state, "tmp2", params)
        mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
        prod = state["prod"] = state.get("prod", 1.0) * mu
        bc2 = 1 - b2 ** t
        c1 = lr * (1 - mu) / (1 - prod)
        c2 = lr * mu_next / (1 - prod * mu_next)
        for p, g, m, v, s, d in zip(params, grads, ms, vs, tmp, tmp2):
            _ema(m, g, b1, s)
            _ema_sq(v, g, b2, s)
            np.divide(v, bc2, out=d)
            np.sqrt(d, out=d)
            np.add(d, eps, out=d)
            np.divide(g, d, out=s)
            np.multiply(s, c1, out=s)
            np.subtract(p, s, out=p)
            np.divide(m, d, out=s)
            np.multiply(s, c2, out=s)
            np.subtract(p, s, out=p)
    return step


def _radam(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    rho_inf = 2 / (1 - b2) - 1

    def step(params, grads, state, t):
        ms = _scratch(state, "m", params)
        vs = _scratch(state, "v", params)
        tmp = _scratch(state, "tmp", params)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        rho_t = rho_inf - 2 * t * b2 ** t / bc2
        for p, g, m, v, s in zip(params, grads, ms, vs, tmp):
            _ema(m, g, b1, s)
            _ema_sq(v, g, b2, s)
            if rho_t > 5:
                rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                        / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
                np.sqrt(v, out=s)
                np.add(s, eps, out=s)
                np.divide(m, s, out=s)
                np.multiply(s, lr / bc1 * bc2 ** 0.5 * rect, out=s)
            else:
                np.multiply(m, lr / bc1, out=s)
            np.subtract(p, s, out=p)
    return step


def _asgd(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6):
    def step(params, grads, state, t):
        axs = _scratch(state, "ax", params)
        tmp = _scratch(state, "tmp", params)
        eta = state.get("eta", lr)
        mu = state.get("mu", 1.0)
        for p, g, ax, s in zip(params, grads, axs, tmp):
            np.multiply(p, 1 - lambd * eta, out=p)
            np.multiply(g, eta, out=s)
            np.subtract(p, s, out=p)
            if mu != 1:
                np.subtract(p, ax, out=s)
                np.multiply(s, mu, out=s)
                np.add(ax, s, out=ax)
            else:
                np.copyto(ax, p)
        state["eta"] = lr / (1 + lambd * lr * t) ** alpha
        state["mu"] = 1 / max(1, t - t0)
    return step


def _rprop(lr=1e-2, etas=(0.5, 1.2), sizes=(1e-6, 50)):
    def step(params, grads, state, t):
        prevs = _scratch(state, "prev", params)
        if "ss" not in state:
            state["ss"] = [np.full_like(p, lr) for p in params]
        tmp = _scratch(state, "tmp", params)
        for p, g, prev, ss, s in zip(params, grads, prevs, state["ss"], tmp):
            np.multiply(g, prev, out=s)
            np.sign(s, out=s)
            flip = s < 0
            s[s > 0] = etas[1]
            s[flip] = etas[0]
            s[s == 0] = 1
            np.multiply(ss, s, out=ss)
            np.clip(ss, sizes[0], sizes[1], out=ss)
            np.copyto(prev, g)
            prev[flip] = 0
            np.sign(prev, out=s)
            np.multiply(s, ss, out=s)
            np.subtract(p, s, out=p)
    return step


def _lion(lr=1e-4, b1=0.9, b2=0.99):
    def step(params, grads, state, t):
        ms = _scratch(state, "m", params)
        tmp = _scratch(state, "tmp", params)
        tmp2 = _scratch(state, "tmp2", params)
        for p, g, m, s, c in zip(params, grads, ms, tmp, tmp2):
            np.multiply(m, b1, out=c)
            np.multiply(g, 1 - b1, out=s)
            np.add(c, s, out=c)
            np.sign(c, out=c)
            np.multiply(c, lr, out=c)
            np.subtract(p, c, out=p)
            _ema(m, g, b2, s)
    return step


_LOOP = "torch has no fused kernel: its default for-loop path"

#: optimizer name -> case, one per optimizer in ``fastopt.OPTIMIZERS``.
CASES = {
    "SGD": BenchCase({"lr": 0.01, "momentum": 0.9}, _sgd_momentum(), ("SGD", {"fused": True}),
                     20, "momentum 0.9"),
    "Adagrad": BenchCase({"lr": 0.01}, _adagrad(), ("Adagrad", {"fused": True}), 20),
    "RMSprop": BenchCase({"lr": 0.01}, _rmsprop(), ("RMSprop", {}), 20,
                         "torch has no fused RMSprop: its default for-loop path"),
    "Adam": BenchCase({"lr": 1e-3}, _adam(), ("Adam", {"fused": True}), 28),
    "AdamW": BenchCase({"lr": 1e-3, "weight_decay": 1e-2}, _adam(wd=1e-2),
                       ("AdamW", {"fused": True}), 28),
    "Adadelta": BenchCase({"lr": 1.0}, _adadelta(), ("Adadelta", {}), 28, _LOOP),
    "Adamax": BenchCase({"lr": 2e-3}, _adamax(), ("Adamax", {}), 28, _LOOP),
    "NAdam": BenchCase({"lr": 2e-3}, _nadam(), ("NAdam", {}), 28, _LOOP),
    "RAdam": BenchCase({"lr": 1e-3}, _radam(), ("RAdam", {}), 28, _LOOP),
    "ASGD": BenchCase({"lr": 1e-2}, _asgd(), ("ASGD", {}), 16,
                      _LOOP + "; before t0 the average is a copy (no read of ax)"),
    "Rprop": BenchCase({"lr": 1e-2}, _rprop(), ("Rprop", {}), 28, _LOOP),
    # Lion has no torch twin (torch=None): compared with NumPy only
    "Lion": BenchCase({"lr": 1e-4}, _lion(), (None, {}), 20, "not in torch"),
}
