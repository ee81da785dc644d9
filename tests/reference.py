"""Pure-NumPy reference of fastopt's update rules, op by op in the kernels' order.

Each rule follows torch 2.13's single-tensor path (see the kernel files in csrc/): every
Python scalar is rounded to the array dtype before use, and the operations that ATen fuses
(add with alpha, addcmul, lerp) are computed with one rounding by ``fma`` below. All other
operations are single IEEE operations in the array dtype, so the kernels and this reference
agree to the last bit.

``fma`` is exact for float32 (the product of two float32 values is exact in float64; the sum
is formed in float64 with round-to-odd, then rounded once to float32, which is correct
because float64 carries more than 24 + 2 bits). For float64 it works with exact rationals,
which is slow: use float64 on small arrays only.
"""
from fractions import Fraction

import numpy as np


def _round_to_odd_sum(p, c):
    """p + c in float64 rounded to odd (p, c float64 arrays)."""
    with np.errstate(all="ignore"):
        s = p + c
        bb = s - p
        err = (p - (s - bb)) + (c - bb)
        bits = s.view(np.int64)
        fix = np.isfinite(s) & (err != 0) & ((bits & 1) == 0)
        toward = np.where(err > 0, np.inf, -np.inf)
        return np.where(fix, np.nextafter(s, toward), s)


def _fma64_exact(a, b, c):
    out = np.empty(np.broadcast(a, b, c).shape, dtype=np.float64)
    a, b, c = np.broadcast_arrays(a, b, c)
    for i in np.ndindex(out.shape):
        x, y, z = float(a[i]), float(b[i]), float(c[i])
        if all(map(np.isfinite, (x, y, z))):
            exact = Fraction(x) * Fraction(y) + Fraction(z)
            try:
                out[i] = float(exact)
            except OverflowError:
                out[i] = np.inf if exact > 0 else -np.inf
            if exact == 0:  # the sign of an exact zero follows IEEE addition
                out[i] = x * y + z
        else:
            out[i] = x * y + z
    return out


def fma(a, b, c):
    """a * b + c with one rounding, in the dtype of the (same-typed) operands."""
    a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
    dtype = np.result_type(a, b, c)
    if dtype == np.float32:
        with np.errstate(all="ignore"):
            p = a.astype(np.float64) * b.astype(np.float64)
            return _round_to_odd_sum(p, np.broadcast_to(c.astype(np.float64), p.shape)
                                     ).astype(np.float32)
    return _fma64_exact(a.astype(np.float64), b.astype(np.float64), c.astype(np.float64))


def lerp(s, e, w):
    """torch.lerp(s, e, w) with ATen's rounding (w a scalar of the arrays' dtype)."""
    T = s.dtype.type
    w = T(w)
    if abs(w) < 0.5:
        return fma(w, e - s, s)
    return fma(w - T(1), e - s, e)


def maximum(a, b):
    return np.maximum(a, b)  # propagates NaN, as torch.maximum


def sgd(p, g, buf, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
        maximize=False):
    """One SGD step. ``buf`` None means the buffer is created now. Returns (p, buf)."""
    T = p.dtype.type
    g = -g if maximize else g
    if weight_decay != 0:
        g = fma(p, T(weight_decay), g)
    if momentum != 0:
        if buf is None:
            buf = g.copy()
        else:
            buf = fma(g, T(1.0 - dampening), buf * T(momentum))
        g = fma(buf, T(momentum), g) if nesterov else buf
    return fma(g, T(-lr), p), buf


def adagrad(p, g, state, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False):
    """One Adagrad step; ``state`` holds float ``step`` and array ``sum``. Returns p."""
    T = p.dtype.type
    state["step"] = float(np.float32(state["step"] + 1))
    g = -g if maximize else g
    if weight_decay != 0:
        g = fma(p, T(weight_decay), g)
    clr = lr / (1 + (state["step"] - 1) * lr_decay)
    state["sum"] = fma(g, g, state["sum"])
    std = np.sqrt(state["sum"]) + T(eps)
    return p + (T(-clr) * g) / std


def rmsprop(p, g, state, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False, maximize=False):
    """One RMSprop step; state: step, square_avg[, momentum_buffer][, grad_avg]."""
    T = p.dtype.type
    state["step"] = float(np.float32(state["step"] + 1))
    g = -g if maximize else g
    if weight_decay != 0:
        g = fma(p, T(weight_decay), g)
    sq = fma(T(1 - alpha) * g, g, state["square_avg"] * T(alpha))
    state["square_avg"] = sq
    if centered:
        ga = lerp(state["grad_avg"], g, 1 - alpha)
        state["grad_avg"] = ga
        avg = np.sqrt(fma(-ga, ga, sq))
    else:
        avg = np.sqrt(sq)
    avg = avg + T(eps)
    if momentum > 0:
        buf = state["momentum_buffer"] * T(momentum) + g / avg
        state["momentum_buffer"] = buf
        return fma(buf, T(-lr), p)
    return p + (T(-lr) * g) / avg


def adam(p, g, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled_weight_decay=False):
    """One Adam/AdamW step; state: step, exp_avg, exp_avg_sq[, max_exp_avg_sq]."""
    T = p.dtype.type
    beta1, beta2 = betas
    state["step"] = float(np.float32(state["step"] + 1))
    t = state["step"]
    g = -g if maximize else g
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * T(1 - lr * weight_decay)
        else:
            g = fma(p, T(weight_decay), g)
    state["exp_avg"] = lerp(state["exp_avg"], g, 1 - beta1)
    state["exp_avg_sq"] = fma(T(1 - beta2) * g, g, state["exp_avg_sq"] * T(beta2))
    step_size = lr / (1 - beta1 ** t)
    bc2_sqrt = (1 - beta2 ** t) ** 0.5
    v = state["exp_avg_sq"]
    if amsgrad:
        state["max_exp_avg_sq"] = maximum(state["max_exp_avg_sq"], v)
        v = state["max_exp_avg_sq"]
    denom = np.sqrt(v) / T(bc2_sqrt) + T(eps)
    return p + (T(-step_size) * state["exp_avg"]) / denom


def new_state(name, p, group):
    """Fresh reference state for optimizer ``name`` (as the optimizer creates it)."""
    z = np.zeros_like(p)
    if name == "SGD":
        return {"momentum_buffer": None}
    if name == "Adagrad":
        return {"step": 0.0, "sum": np.full_like(p, group.get("initial_accumulator_value", 0))}
    if name == "RMSprop":
        st = {"step": 0.0, "square_avg": z.copy()}
        if group.get("momentum", 0) > 0:
            st["momentum_buffer"] = z.copy()
        if group.get("centered", False):
            st["grad_avg"] = z.copy()
        return st
    if name in ("Adam", "AdamW"):
        st = {"step": 0.0, "exp_avg": z.copy(), "exp_avg_sq": z.copy()}
        if group.get("amsgrad", False):
            st["max_exp_avg_sq"] = z.copy()
        return st
    raise KeyError(name)


def step(name, p, g, state, group):
    """One step of optimizer ``name`` with hyperparameters ``group`` (torch's defaults for
    what it leaves out). Returns the new p; updates ``state`` in place."""
    if name == "SGD":
        kw = {k: group[k] for k in ("momentum", "dampening", "weight_decay", "nesterov",
                                    "maximize") if k in group}
        p, state["momentum_buffer"] = sgd(p, g, state["momentum_buffer"],
                                          lr=group.get("lr", 1e-3), **kw)
        return p
    if name == "Adagrad":
        kw = {k: group[k] for k in ("lr", "lr_decay", "weight_decay", "eps", "maximize")
              if k in group}
        kw.setdefault("lr", 1e-2)
        return adagrad(p, g, state, **kw)
    if name == "RMSprop":
        kw = {k: group[k] for k in ("lr", "alpha", "eps", "weight_decay", "momentum",
                                    "centered", "maximize") if k in group}
        kw.setdefault("lr", 1e-2)
        return rmsprop(p, g, state, **kw)
    if name in ("Adam", "AdamW"):
        kw = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad",
                                    "maximize") if k in group}
        kw.setdefault("lr", 1e-3)
        if name == "AdamW":
            kw.setdefault("weight_decay", 1e-2)
            kw["decoupled_weight_decay"] = True
        else:
            kw["decoupled_weight_decay"] = group.get("decoupled_weight_decay", False)
        return adam(p, g, state, **kw)
    raise KeyError(name)
