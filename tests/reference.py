"""Pure-NumPy reference of fastopt's update rules, op by op in the kernels' order.

Each per-element rule follows torch 2.13's single-tensor path (csrc/<name>.c states it per
kernel): every Python scalar is rounded to the array dtype before use, the operations that ATen
fuses (add with alpha, addcmul, lerp) are computed with one rounding by :func:`fma`, and every
other operation is a single IEEE operation in the array dtype. With IEEE ``np.sqrt`` the kernels
and this reference agree to the last bit.

How the single-rounding ``fma`` is emulated:

* float32: the product of two float32 values is exact in float64; the float64 sum is rounded to
  odd (an error-free TwoSum tells whether it was inexact, then the last bit is forced to 1), and
  rounding that to float32 is the correctly rounded fma, because float64 carries more than
  24 + 2 significant bits.
* float64: exact rational arithmetic (``fractions.Fraction``), element by element. This is slow:
  use float64 on small arrays (or a sample of elements) only.

Entry points: :func:`new_state` (the state a fresh optimizer creates) and :func:`step` (one
step of the optimizer named, with its constructor keyword arguments). :func:`sparse_adam` and
:func:`lion_paper` are used directly by their tests.
"""
from fractions import Fraction

import numpy as np


# ---- rounding primitives ----------------------------------------------------------------------

def _sum_round_to_odd(a, b):
    """a + b for float64 arrays, rounded to odd."""
    with np.errstate(all="ignore"):
        s = a + b
        bv = s - a
        err = (a - (s - bv)) + (b - bv)
        inexact = np.isfinite(s) & (err != 0) & ((s.view(np.int64) & 1) == 0)
        return np.where(inexact, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)


def fma(a, b, c):
    """a * b + c rounded once, in the common dtype of the operands (which broadcast)."""
    a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
    dtype = np.result_type(a, b, c)
    shape = np.broadcast_shapes(a.shape, b.shape, c.shape)
    if dtype == np.float32:
        with np.errstate(all="ignore"):
            prod = a.astype(np.float64) * b.astype(np.float64)
            s = _sum_round_to_odd(np.broadcast_to(prod, shape),
                                  np.broadcast_to(c.astype(np.float64), shape))
        return s.astype(np.float32)
    a, b, c = (np.broadcast_to(x.astype(np.float64), shape) for x in (a, b, c))
    out = np.empty(shape, dtype=np.float64)
    for i in np.ndindex(shape):
        x, y, z = float(a[i]), float(b[i]), float(c[i])
        if np.isfinite(x) and np.isfinite(y) and np.isfinite(z):
            exact = Fraction(x) * Fraction(y) + Fraction(z)
            if exact == 0:
                out[i] = x * y + z  # the sign of an exact zero as IEEE addition gives it
            else:
                try:
                    out[i] = float(exact)
                except OverflowError:
                    out[i] = np.inf if exact > 0 else -np.inf
        else:
            out[i] = x * y + z
    return out


def lerp(s, e, w):
    """torch.lerp(s, e, w) as ATen's vectorised kernel rounds it (w a Python scalar)."""
    T = s.dtype.type
    w = T(w)
    if abs(w) < 0.5:
        return fma(w, e - s, s)
    return fma(w - T(1), e - s, e)


def _grad(p, g, maximize, weight_decay):
    """The gradient after ``maximize`` and coupled (L2) weight decay."""
    T = p.dtype.type
    g = -g if maximize else g
    if weight_decay != 0:
        g = fma(p, T(weight_decay), g)
    return g


def _tick(state):
    """Advance the float32 step counter; returns the new value as a Python float."""
    state["step"] = float(np.float32(state["step"] + 1))
    return state["step"]


# ---- one rule per optimizer ---------------------------------------------------------------------
# Each takes (p, g, state, **constructor kwargs), returns the new p and updates ``state``; its
# @rule line names the optimizer and gives the state a fresh optimizer creates,
# init(p, constructor kwargs).

#: optimizer name -> (rule, init)
RULES = {}


def rule(name, init):
    def register(fn):
        RULES[name] = (fn, init)
        return fn
    return register


def _zeros(*keys, step=True):
    """init for a state of a step counter (unless step=False) and zero arrays."""
    def init(p, group):
        st = {"step": 0.0} if step else {}
        st.update((k, np.zeros_like(p)) for k in keys)
        return st
    return init


def _rmsprop_state(p, group):
    keys = ["square_avg"]
    if group.get("momentum", 0) > 0:
        keys.append("momentum_buffer")
    if group.get("centered", False):
        keys.append("grad_avg")
    return _zeros(*keys)(p, group)


def _adam_state(p, group):
    return _zeros("exp_avg", "exp_avg_sq",
                  *(["max_exp_avg_sq"] if group.get("amsgrad", False) else []))(p, group)

@rule("SGD", lambda p, group: {"momentum_buffer": None})
def sgd(p, g, st, *, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
        maximize=False):
    """SGD; state: momentum_buffer (None until the first step with momentum)."""
    T = p.dtype.type
    g = _grad(p, g, maximize, weight_decay)
    if momentum != 0:
        buf = st["momentum_buffer"]
        if buf is None:
            buf = g.copy()
        else:
            buf = fma(g, T(1.0 - dampening), buf * T(momentum))
        st["momentum_buffer"] = buf
        g = fma(buf, T(momentum), g) if nesterov else buf
    return fma(g, T(-lr), p)


@rule("Adagrad", lambda p, group: {
    "step": 0.0, "sum": np.full_like(p, group.get("initial_accumulator_value", 0))})
def adagrad(p, g, st, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
            initial_accumulator_value=0.0):
    """Adagrad; state: step, sum (``initial_accumulator_value`` only seeds the state)."""
    T = p.dtype.type
    _tick(st)
    g = _grad(p, g, maximize, weight_decay)
    clr = lr / (1 + (st["step"] - 1) * lr_decay)
    st["sum"] = fma(g, g, st["sum"])
    std = np.sqrt(st["sum"]) + T(eps)
    return p + (T(-clr) * g) / std


@rule("RMSprop", _rmsprop_state)
def rmsprop(p, g, st, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False, maximize=False):
    """RMSprop; state: step, square_avg[, momentum_buffer][, grad_avg]."""
    T = p.dtype.type
    _tick(st)
    g = _grad(p, g, maximize, weight_decay)
    sq = fma(T(1 - alpha) * g, g, st["square_avg"] * T(alpha))
    st["square_avg"] = sq
    if centered:
        ga = lerp(st["grad_avg"], g, 1 - alpha)
        st["grad_avg"] = ga
        avg = np.sqrt(fma(-ga, ga, sq))
    else:
        avg = np.sqrt(sq)
    avg = avg + T(eps)
    if momentum > 0:
        buf = st["momentum_buffer"] * T(momentum) + g / avg
        st["momentum_buffer"] = buf
        return fma(buf, T(-lr), p)
    return p + (T(-lr) * g) / avg


@rule("Adam", _adam_state)
def adam(p, g, st, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled_weight_decay=False):
    """Adam; state: step, exp_avg, exp_avg_sq[, max_exp_avg_sq]."""
    T = p.dtype.type
    beta1, beta2 = betas
    t = _tick(st)
    g = -g if maximize else g
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * T(1 - lr * weight_decay)
        else:
            g = fma(p, T(weight_decay), g)
    st["exp_avg"] = lerp(st["exp_avg"], g, 1 - beta1)
    st["exp_avg_sq"] = fma(T(1 - beta2) * g, g, st["exp_avg_sq"] * T(beta2))
    step_size = lr / (1 - beta1 ** t)
    bc2_sqrt = (1 - beta2 ** t) ** 0.5
    v = st["exp_avg_sq"]
    if amsgrad:
        st["max_exp_avg_sq"] = np.maximum(st["max_exp_avg_sq"], v)  # NaN propagates (torch)
        v = st["max_exp_avg_sq"]
    denom = np.sqrt(v) / T(bc2_sqrt) + T(eps)
    return p + (T(-step_size) * st["exp_avg"]) / denom


@rule("AdamW", _adam_state)
def adamw(p, g, st, *, weight_decay=1e-2, **kwargs):
    """AdamW: Adam with decoupled weight decay (always on) and weight_decay 0.01 by default."""
    kwargs["decoupled_weight_decay"] = True
    return adam(p, g, st, weight_decay=weight_decay, **kwargs)


@rule("Adadelta", _zeros("square_avg", "acc_delta"))
def adadelta(p, g, st, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False):
    """Adadelta; state: step, square_avg, acc_delta."""
    T = p.dtype.type
    _tick(st)
    g = _grad(p, g, maximize, weight_decay)
    sq = fma(T(1 - rho) * g, g, st["square_avg"] * T(rho))
    st["square_avg"] = sq
    std = np.sqrt(sq + T(eps))
    delta = np.sqrt(st["acc_delta"] + T(eps)) / std
    delta = delta * g
    st["acc_delta"] = fma(T(1 - rho) * delta, delta, st["acc_delta"] * T(rho))
    return fma(delta, T(-lr), p)


@rule("Adamax", _zeros("exp_avg", "exp_inf"))
def adamax(p, g, st, *, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
           maximize=False):
    """Adamax; state: step, exp_avg, exp_inf."""
    T = p.dtype.type
    t = _tick(st)
    g = _grad(p, g, maximize, weight_decay)
    st["exp_avg"] = lerp(st["exp_avg"], g, 1 - betas[0])
    st["exp_inf"] = np.maximum(st["exp_inf"] * T(betas[1]), np.abs(g) + T(eps))
    clr = lr / (1 - betas[0] ** t)
    return p + (T(-clr) * st["exp_avg"]) / st["exp_inf"]


@rule("NAdam", lambda p, group: {"step": 0.0, "mu_product": np.float32(1.0),
                                 "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)})
def nadam(p, g, st, *, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
          momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False):
    """NAdam; state: step, mu_product (a float32 scalar), exp_avg, exp_avg_sq."""
    T = p.dtype.type
    beta1, beta2 = betas
    t = _tick(st)
    bc2 = 1 - beta2 ** t
    g = -g if maximize else g
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * T(1 - lr * weight_decay)
        else:
            g = fma(p, T(weight_decay), g)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    st["mu_product"] = np.float32(np.float32(st["mu_product"]) * np.float32(mu))
    prod = float(st["mu_product"])
    st["exp_avg"] = lerp(st["exp_avg"], g, 1 - beta1)
    st["exp_avg_sq"] = fma(T(1 - beta2) * g, g, st["exp_avg_sq"] * T(beta2))
    denom = np.sqrt(st["exp_avg_sq"] / T(bc2)) + T(eps)
    p = p + (T(-lr * (1.0 - mu) / (1.0 - prod)) * g) / denom
    return p + (T((-lr * mu_next) / (1.0 - prod * mu_next)) * st["exp_avg"]) / denom


@rule("RAdam", _zeros("exp_avg", "exp_avg_sq"))
def radam(p, g, st, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
          decoupled_weight_decay=False, maximize=False):
    """RAdam; state: step, exp_avg, exp_avg_sq."""
    T = p.dtype.type
    beta1, beta2 = betas
    t = _tick(st)
    g = -g if maximize else g
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * T(1 - lr * weight_decay)
        else:
            g = fma(p, T(weight_decay), g)
    st["exp_avg"] = lerp(st["exp_avg"], g, 1 - beta1)
    st["exp_avg_sq"] = fma(T(1 - beta2) * g, g, st["exp_avg_sq"] * T(beta2))
    bc1 = 1 - beta1 ** t
    bc2 = 1 - beta2 ** t
    upd = (st["exp_avg"] / T(bc1)) * T(lr)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * (beta2 ** t) / bc2
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        a = (T(1) / (np.sqrt(st["exp_avg_sq"]) + T(eps))) * T(bc2 ** 0.5)
        upd = (upd * a) * T(rect)
    return p - upd


@rule("ASGD", lambda p, group: {"step": 0.0, "eta": np.float32(group.get("lr", 1e-2)),
                                "mu": np.float32(1.0), "ax": np.zeros_like(p)})
def asgd(p, g, st, *, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
         maximize=False):
    """ASGD; state: step, eta and mu (float32 scalars), ax."""
    T = p.dtype.type
    t = _tick(st)
    g = _grad(p, g, maximize, weight_decay)
    eta = float(st["eta"])
    p = p * T(1 - lambd * eta)
    p = fma(g, T(-eta), p)
    if float(st["mu"]) != 1:
        st["ax"] = st["ax"] + (p - st["ax"]) * T(float(st["mu"]))
    else:
        st["ax"] = p.copy()
    st["eta"] = np.float32(lr / ((1 + lambd * lr * t) ** alpha))
    st["mu"] = np.float32(1 / max(1, t - t0))
    return p


@rule("Rprop", lambda p, group: {"step": 0.0, "prev": np.zeros_like(p),
                                 "step_size": np.full_like(p, group.get("lr", 1e-2))})
def rprop(p, g, st, *, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), maximize=False):
    """Rprop; state: step, prev, step_size (``lr`` only seeds step_size)."""
    T = p.dtype.type
    _tick(st)
    g = -g if maximize else g
    s = np.sign(g * st["prev"])
    s = np.where(s > 0, T(etas[1]), np.where(s < 0, T(etas[0]), T(1))).astype(p.dtype)
    ss = np.minimum(np.maximum(st["step_size"] * s, T(step_sizes[0])), T(step_sizes[1]))
    st["step_size"] = ss
    g = np.where(s == T(etas[0]), T(0), g).astype(p.dtype)
    sg = np.sign(np.nan_to_num(g, nan=0.0)).astype(p.dtype)  # torch.sign(NaN) is 0
    st["prev"] = g
    return fma(-sg, ss, p)


@rule("Lion", _zeros("exp_avg", step=False))
def lion(p, g, st, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
    """Lion; state: exp_avg (no step counter)."""
    T = p.dtype.type
    g = -g if maximize else g
    if weight_decay != 0:
        p = p * T(1 - lr * weight_decay)
    c = lerp(st["exp_avg"], g, 1 - betas[0])
    p = fma(np.sign(c), T(-lr), p)
    st["exp_avg"] = lerp(st["exp_avg"], g, 1 - betas[1])
    return p


def new_state(name, p, group):
    """The state a fresh optimizer ``name`` with constructor kwargs ``group`` creates for ``p``
    (reference side, in the dtype of ``p``)."""
    return RULES[name][1](p, group)


def step(name, p, g, state, group):
    """One step of optimizer ``name`` with constructor kwargs ``group`` (torch's defaults for
    what it leaves out). Returns the new p; updates ``state`` in place."""
    return RULES[name][0](p, g, state, **group)


# ---- rules with no kernel-order twin ------------------------------------------------------------

def sparse_adam(p, rows, vals, st, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
    """One SparseAdam step; ``rows`` unique, ``vals`` of shape (len(rows),) + p.shape[1:]."""
    T = p.dtype.type
    st["step"] += 1
    t = st["step"]
    g = -vals if maximize else vals
    m0 = st["exp_avg"][rows]
    v0 = st["exp_avg_sq"][rows]
    dm = (g - m0) * T(1 - betas[0])
    dv = (g * g - v0) * T(1 - betas[1])
    st["exp_avg"][rows] = m0 + dm
    st["exp_avg_sq"][rows] = v0 + dv
    denom = np.sqrt(dv + v0) + T(eps)
    step_size = lr * np.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
    p = p.copy()
    p[rows] = p[rows] + T(-step_size) * ((dm + m0) / denom)
    return p


def lion_paper(p, g, m, *, lr, beta1, beta2, weight_decay):
    """Lion as written in the paper (Chen et al. 2023, Algorithm 2), in float64:
    c = b1 m + (1 - b1) g; theta -= lr (sign(c) + wd theta); m = b2 m + (1 - b2) g."""
    c = beta1 * m + (1 - beta1) * g
    p = p - lr * (np.sign(c) + weight_decay * p)
    m = beta2 * m + (1 - beta2) * g
    return p, m
