"""Muon: momentum orthogonalised by a Newton-Schulz iteration (NumPy, 2-D parameters)."""
from __future__ import annotations

import math
import operator
from typing import Any, Optional, Tuple

import numpy as np

from fastopt import _kernels
from fastopt._numpy_step import check_state_array, mark_updated, prepare, signals_deferred
from fastopt._typing import Closure, ParamsT
from fastopt.optimizer import Optimizer

__all__ = ["Muon"]

EPS = 1e-7
DEFAULT_A, DEFAULT_B, DEFAULT_C = 3.4445, -4.7750, 2.0315
DEFAULT_NS_STEPS = 5
#: the precisions the Newton-Schulz iteration can run in (``ns_dtype``)
NS_DTYPES = ("bfloat16", "float32", "float64")

# float64 values whose sum with a bfloat16-times-float64 product is rounded once: x86's
# 80-bit long double holds such a product exactly (61 significant bits)
_WIDE64 = np.longdouble if np.finfo(np.longdouble).nmant >= 63 else np.float64


def _round_bf16(x):
    """Round the float32 array ``x`` in place to the nearest bfloat16 value (ties to even),
    as torch converts float to bfloat16; returns ``x``. NaNs must have a quiet payload of
    the form NumPy and the CPU produce (``_to_bf16`` makes them so)."""
    u = x.view(np.uint32)
    lsb = u >> np.uint32(16)
    lsb &= np.uint32(1)
    u += np.uint32(0x7FFF)
    u += lsb
    u &= np.uint32(0xFFFF0000)
    return x


def _to_bf16(g):
    """A float32 copy of ``g`` rounded to bfloat16, as torch's ``Tensor.bfloat16()`` (float64
    through float32, NaN as the canonical quiet NaN)."""
    x = np.array(g, dtype=np.float32, order="C")
    nan = np.isnan(x)
    if nan.any():
        x[nan] = np.nan
    return _round_bf16(x)


def newton_schulz(g, coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), steps=DEFAULT_NS_STEPS,
                  eps=EPS, dtype="bfloat16"):
    """Approximate orthogonalisation of the matrix ``g`` (the U V^T of its SVD, with
    singular values pushed into roughly [0.7, 1.2]) by the quintic iteration
    X <- a X + (b A + c A^2) X, A = X X^T, on the wide orientation of g after scaling it to
    unit Frobenius norm.

    ``dtype`` is the precision of the iteration. ``"bfloat16"`` (torch's): every operation
    rounds its result to bfloat16 as torch's bfloat16 CPU operations do (matrix products
    accumulate the exact products of bfloat16 values in float32, ``addmm`` rounds
    ``beta * C + alpha * (A @ B)`` once); the result is a float32 array of bfloat16 values.
    ``"float32"`` and ``"float64"``: the iteration in that dtype, and the result in it."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if g.ndim != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    if dtype not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {dtype!r}")
    a, b, c = coefficients
    if dtype == "bfloat16":
        T = np.float32
        x = _to_bf16(g)
        rnd = _round_bf16
    else:
        T = np.dtype(dtype).type
        x = np.array(g, dtype=T)

        def rnd(y):
            return y
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    with np.errstate(all="ignore"):  # NaN and inf propagate silently, as in torch
        norm = T(np.sqrt(np.sum(np.square(x, dtype=np.float64))))
        if dtype == "bfloat16":
            norm = rnd(np.array(norm))[()]
            eps = rnd(np.array(eps, np.float32))[()]
        x = rnd(x / max(norm, T(eps)))
        a, b, c = T(a), T(b), T(c)
        for _ in range(steps):
            gram = rnd(x @ x.T)
            poly = gram @ gram  # addmm(gram, gram, gram, beta=b, alpha=c): one rounding
            poly *= c
            poly += b * gram
            rnd(poly)
            y = poly @ x  # addmm(x, poly, x, beta=a)
            y += a * x
            x = rnd(y)
    return np.ascontiguousarray(x.T if tall else x)


def _adjusted_lr(lr, fn, shape):
    rows, cols = shape[:2]
    if fn is None or fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class Muon(Optimizer):
    r"""Muon (Jordan et al. 2024), as ``torch.optim.Muon``.

    .. math::
        B &\leftarrow \mu B + (1 - \mu) G \;(\text{torch's lerp form}), \qquad
        U = \mathrm{lerp}(G, B, \mu) \text{ (nesterov) or } B \\
        O &= \mathrm{NS}^{(a,b,c)}_k(U), \qquad
        \theta \leftarrow \theta (1 - \gamma\lambda) - \mathrm{adjust}(\gamma)\, O

    Parameters
    ----------
    params : iterable
        2-D parameters only (biases, embeddings etc. belong to another optimizer).
    lr : float, default 1e-3
    weight_decay : float, default 0.1
        Decoupled: :math:`\theta \leftarrow \theta(1 - \gamma\lambda)` with the unadjusted lr
        (torch's docstring calls it an L2 penalty; the code decays the weights directly).
    momentum : float, default 0.95
    nesterov : bool, default True
    ns_coefficients : (float, float, float), default (3.4445, -4.775, 2.0315)
    eps : float, default 1e-7
        Lower bound of the norm the update is divided by.
    ns_steps : int, default 5
        Newton-Schulz iterations (< 100).
    adjust_lr_fn : None, "original" or "match_rms_adamw"
        ``original`` (and None): :math:`\gamma\sqrt{\max(1, A/B)}`; ``match_rms_adamw``:
        :math:`0.2\gamma\sqrt{\max(A, B)}` for an A x B parameter.

    Attributes
    ----------
    ns_dtype : {"bfloat16", "float32", "float64"}, default "bfloat16"
        Precision of the Newton-Schulz iteration, for every group. ``"bfloat16"`` is
        torch's: every operation of the iteration rounds to bfloat16 as torch's CPU
        operations do (see :func:`newton_schulz`). ``"float32"`` or ``"float64"``
        orthogonalise more accurately, which torch does not offer: set it after
        construction, ``opt.ns_dtype = "float32"``. It is an attribute, not a constructor
        argument or a group key, so that the signature, ``defaults``, ``param_groups`` and
        ``state_dict()`` stay torch's; pickling and copies keep it, checked at every step.

    Notes
    -----
    The momentum lerps and the parameter update round as torch's CPU kernels (one rounding
    for ``lerp`` and for ``add`` with ``alpha``), and with ``ns_dtype="bfloat16"`` each
    operation of the iteration gives torch's bfloat16 result up to the order in which a
    matrix product sums in float32: torch's and NumPy's products then round differently to
    bfloat16 for a few elements in ten thousand, which the iteration amplifies. Matrices of
    a few dozen rows and columns usually come out bit for bit as torch's; on 64 x 200 or
    256 x 512 ones one update differs by about 0.5 % of its RMS (``"float32"``: about 2 %,
    bfloat16's resolution). State: ``momentum_buffer``.

    With ``adjust_lr_fn`` None or ``"original"`` a parameter with no columns raises
    ValueError before anything changes (torch divides by the column count and raises
    ZeroDivisionError after updating the parameters before it).
    """

    _flag_defaults = {}
    #: precision of the Newton-Schulz iteration (see the class docstring)
    ns_dtype = "bfloat16"
    _scalar_state_keys = frozenset()

    def __init__(self, params: ParamsT, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: Tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
                 eps: float = EPS, ns_steps: int = DEFAULT_NS_STEPS,
                 adjust_lr_fn: Optional[str] = None) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_coefficients=ns_coefficients, eps=eps,
                        ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def __getstate__(self):
        return {**super().__getstate__(), "ns_dtype": self.ns_dtype}

    def _check_group(self, group):
        if not 0.0 <= group["lr"]:
            raise ValueError(f"Learning rate should be >= 0 but is: {group['lr']}")
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"momentum should be >= 0 but is: {group['momentum']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"weight decay should be >= 0 but is: {group['weight_decay']}")
        fn = group["adjust_lr_fn"]
        if fn is not None and fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {fn} is not supported")
        if group["ns_steps"] >= 100:
            raise ValueError("Number of steps must be less than 100 for computational "
                             "efficiency")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        for p in group.get("params", ()):
            if np.ndim(p) != 2:
                raise ValueError("Muon only supports 2D parameters whereas we found a "
                                 f"parameter with size: {np.shape(p)}")

    @staticmethod
    def _check_existing_state(st, arr, where):
        if "momentum_buffer" in st:
            check_state_array(st["momentum_buffer"], arr.shape, arr.dtype, where,
                              "momentum_buffer")

    @staticmethod
    def _check_frozen(frozen, group):
        # what newton_schulz and _adjusted_lr would reject in the middle of a step
        # (_freeze made ns_steps a float)
        try:
            steps = operator.index(group["ns_steps"])
        except TypeError:
            raise TypeError(f"ns_steps must be an int, got {group['ns_steps']!r}") from None
        if steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational "
                             "efficiency")
        frozen["ns_steps"] = steps
        fn = frozen["adjust_lr_fn"]
        if fn is not None and fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {fn} is not supported")

    @staticmethod
    def _check_param(frozen, arr, where):
        if arr.ndim != 2:
            raise ValueError(f"{where}: Muon only supports 2D parameters whereas we found a "
                             f"parameter with size: {arr.shape}")
        if arr.shape[1] == 0 and frozen["adjust_lr_fn"] in (None, "original"):
            raise ValueError(f"{where}: a parameter with no columns (shape {arr.shape}); "
                             f"the learning rate adjustment 'original' divides by their "
                             f"number")

    def _init_state(self, state, array, group):
        state["momentum_buffer"] = np.zeros_like(array)

    def step(self, closure: Optional[Closure] = None) -> Any:
        """Perform one optimization step; returns ``closure()``'s value when given."""
        loss = None
        if closure is not None:
            loss = closure()
        ns_dtype = self.ns_dtype
        _check_ns_dtype(ns_dtype)
        frozen, groups = self._prepare_step(self.state)
        try:
            self._update_groups(frozen, groups, self.state, ns_dtype)
        finally:
            mark_updated(groups)
        return loss

    def _prepare_step(self, state):
        """Phase 1 of a step over the parameter states ``state``: every check, and the state
        of new parameters created in ``state``; raises before anything changes."""
        return prepare(self, "Muon", self._check_existing_state,
                       lambda st: "momentum_buffer" not in st, self._check_frozen,
                       self._check_param, state=state, mark=False)

    @staticmethod
    def _update_groups(frozen, groups, state, ns_dtype):
        """Phase 2: the update of every parameter of ``_prepare_step``'s lists, the
        Newton-Schulz iteration in ``ns_dtype``."""
        with signals_deferred():  # every group is updated, or (the checks failed) none
            for group, items in zip(frozen, groups):
                lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
                for _, p, arr, g in items:
                    T = arr.dtype.type
                    buf = state[p]["momentum_buffer"]
                    _lerp(buf, g, 1 - mu)
                    if group["nesterov"]:
                        upd = np.array(g, order="C")
                        _lerp(upd, buf, mu)
                    else:
                        upd = buf
                    o = newton_schulz(upd, group["ns_coefficients"], group["ns_steps"],
                                      group["eps"], ns_dtype)
                    arr *= T(1 - lr * wd)
                    _add_scaled(arr, -_adjusted_lr(lr, group["adjust_lr_fn"], arr.shape), o)

def _check_ns_dtype(value):
    if not isinstance(value, str) or value not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {value!r}")


def _lerp(s, e, w):
    """In place ``s = torch.lerp(s, e, w)`` with ATen's rounding (fastopt's C kernel); ``s``
    a writable float32/float64 array, ``e`` one of its dtype and shape."""
    if s.flags.c_contiguous and s.flags.aligned and s.dtype.isnative:
        _kernels.average([s], [e], float(w), True)
    else:
        tmp = np.array(s, dtype=s.dtype.newbyteorder("="), order="C")
        _kernels.average([tmp], [e], float(w), True)
        s[...] = tmp


def _add_scaled(arr, alpha, o):
    """In place ``arr += alpha * o`` rounded once, as torch's ``add_(o, alpha=alpha)``
    (alpha in the parameter's dtype; for float32 the product and the sum are exact or
    rounded once in float64, for float64 in the 80-bit long double where there is one)."""
    wide = np.float64 if arr.dtype == np.float32 else _WIDE64
    tmp = np.asarray(o, dtype=wide) * wide(arr.dtype.type(alpha))
    tmp += arr
    arr[...] = tmp
