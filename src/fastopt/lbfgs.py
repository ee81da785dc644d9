"""L-BFGS with an optional strong-Wolfe line search, as ``torch.optim.LBFGS``.

All arithmetic is NumPy on the flattened parameter vector. Scalars derived from vectors (dot
products, ``ro``, ``H_diag``, step lengths once a line search touched them) are NumPy
scalars of the parameter dtype, exactly where torch's are 0-d tensors of that dtype, so the
float32 arithmetic follows the same promotions as torch's; only the summation order inside
dot products and the single rounding of torch's fused ``add_(alpha=)`` differ.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np

from fastopt._adapters import _foreign_among, _foreign_arrays, _foreign_updated, _param_arrays
from fastopt._typing import Closure, ParamsT
from fastopt.optimizer import Optimizer, _check_nonneg
from fastopt.parameter import Parameter, SparseGrad

__all__ = ["LBFGS"]

#: the state keys holding a vector of all parameters' elements, a list of such vectors, a
#: scalar, a list of scalars, an int counter
_VECTORS = ("d", "prev_flat_grad")
_VECTOR_LISTS = ("old_dirs", "old_stps")
_SCALARS = ("t", "H_diag", "prev_loss")
_SCALAR_LISTS = ("ro", "al")
_COUNTERS = ("func_evals", "n_iter")
#: what a step reads once ``n_iter`` > 0
_HISTORY = _VECTORS + _VECTOR_LISTS + _SCALARS + ("ro",)

def _cubic_min(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimiser of the cubic through (x1, f1, g1) and (x2, f2, g2), clipped to ``bounds``
    (default: the interval between x1 and x2); the midpoint if the cubic has no minimum."""
    lo, hi = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    disc = d1 ** 2 - g1 * g2
    if disc < 0:
        return (lo + hi) / 2.0
    d2 = np.sqrt(disc)
    if x1 <= x2:
        x = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        x = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(x, lo), hi)


def _strong_wolfe(evaluate, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9,
                  max_ls=25):
    """Line search for a step t along d satisfying the strong Wolfe conditions (bracketing
    by cubic extrapolation, then zooming by cubic interpolation), torch's algorithm and
    iteration counts. ``evaluate(t)`` returns (loss, flat gradient) at x + t d.
    Returns (loss, gradient, t, number of evaluations)."""
    d_norm = np.abs(d).max()
    g = g.copy()
    f_new, g_new = evaluate(t)
    evals = 1
    gtd_new = g_new.dot(d)
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    it = 0
    # phase 1: find an interval containing a point that satisfies the conditions
    while it < max_ls:
        if f_new > (f + c1 * t * gtd) or (it > 1 and f_new >= f_prev):
            br, br_f, br_g, br_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new.copy()], \
                [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            br, br_f, br_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            br, br_f, br_g, br_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new.copy()], \
                [gtd_prev, gtd_new]
            break
        lo, hi = t + 0.01 * (t - t_prev), t * 10
        t_prev, t = t, _cubic_min(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(lo, hi))
        f_prev, g_prev, gtd_prev = f_new, g_new.copy(), gtd_new
        f_new, g_new = evaluate(t)
        evals += 1
        gtd_new = g_new.dot(d)
        it += 1
    if it == max_ls:
        br, br_f, br_g = [0, t], [f, f_new], [g, g_new]

    # phase 2: zoom into the bracket
    insufficient = False
    low, high = (0, 1) if br_f[0] <= br_f[-1] else (1, 0)
    while not done and it < max_ls:
        if abs(br[1] - br[0]) * d_norm < tolerance_change:
            break
        t = _cubic_min(br[0], br_f[0], br_gtd[0], br[1], br_f[1], br_gtd[1])
        # keep t away from the bracket's ends unless progress stalls twice
        top, bottom = max(br), min(br)
        margin = 0.1 * (top - bottom)
        if min(top - t, t - bottom) < margin:
            if insufficient or t >= top or t <= bottom:
                t = top - margin if abs(t - top) < abs(t - bottom) else bottom + margin
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        f_new, g_new = evaluate(t)
        evals += 1
        gtd_new = g_new.dot(d)
        it += 1
        if f_new > (f + c1 * t * gtd) or f_new >= br_f[low]:
            br[high], br_f[high], br_g[high], br_gtd[high] = t, f_new, g_new.copy(), gtd_new
            low, high = (0, 1) if br_f[0] <= br_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (br[high] - br[low]) >= 0:
                br[high], br_f[high], br_g[high], br_gtd[high] = \
                    br[low], br_f[low], br_g[low], br_gtd[low]
            br[low], br_f[low], br_g[low], br_gtd[low] = t, f_new, g_new.copy(), gtd_new
    return br_f[low], br_g[low], br[low], evals


class LBFGS(Optimizer):
    r"""L-BFGS (Nocedal and Wright, Alg. 7.4/7.5), as ``torch.optim.LBFGS``.

    Parameters
    ----------
    params : iterable
        Parameters (one group only), all of one dtype.
    lr : float or 1-element tensor, default 1
        Step length (the first iteration of the first step uses
        :math:`\min(1, 1/\|g\|_1) \cdot lr`). A tensor (or array) lr is used as a 0-d value
        of its dtype, as torch uses it.
    max_iter : int, default 20
        Iterations per ``step()``.
    max_eval : int, optional
        Closure evaluations per ``step()``; default ``max_iter * 5 // 4``.
    tolerance_grad : float, default 1e-7
        Stop when :math:`\max|g| \le` this.
    tolerance_change : float, default 1e-9
        Stop when the loss or the step changes by less than this.
    history_size : int, default 100
        Number of (s, y) pairs kept.
    line_search_fn : None or "strong_wolfe"
        Fixed steps of length lr, or a strong-Wolfe line search.

    Notes
    -----
    ``step(closure)`` requires a closure that sets every parameter's ``.grad`` and returns
    the loss; it returns the loss of the first evaluation. A parameter whose grad is None
    counts as a zero gradient. All state lives under the first parameter, with torch's keys:
    ``func_evals``, ``n_iter`` (ints), ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``,
    ``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``. Unlike torch, an unsupported
    ``line_search_fn`` raises before the closure runs (torch evaluates once first).

    A step that raises (in the closure or anywhere else) puts the parameters and the state
    back as they were before it, so the next step runs as if it had not been called (torch
    leaves the parameters moved and its state unusable). ``load_state_dict`` checks the
    history (types, lengths, and vectors of the parameters' total size) and raises, naming
    the key, before anything changes. When ``history_size`` is lowered below the number of
    pairs kept, the next update drops the oldest pairs down to it. Tensors given as
    parameters have their autograd version counters bumped once by a step that moved them,
    never by a step that raised.
    """

    _flag_defaults = {}
    _scalar_state_keys = frozenset()

    def __init__(self, params: ParamsT, lr: float = 1, max_iter: int = 20,
                 max_eval: Optional[int] = None, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: Optional[str] = None) -> None:
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                        tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                        history_size=history_size, line_search_fn=line_search_fn)
        _check_nonneg(defaults, "lr")
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._params = self.param_groups[0]["params"]

    def _check_group(self, group):
        _check_nonneg(group, "lr")

    # flat views ---------------------------------------------------------------------------

    def _arrays(self):
        # not marked updated here: ``_run`` does that once the step succeeded
        return [_param_arrays(p, 0, pi, mark=False) for pi, p in enumerate(self._params)]

    def _flat_grad(self):
        arrays = self._arrays()
        dtype = arrays[0][0].dtype
        parts = []
        for pi, (a, g) in enumerate(arrays):
            if a.dtype != dtype:
                raise TypeError(f"param_groups[0]['params'][{pi}]: LBFGS needs parameters of "
                                f"one dtype, got {a.dtype} and {dtype}")
            if g is None:
                parts.append(np.zeros(a.size, dtype))
                continue
            if isinstance(g, SparseGrad) or getattr(g, "is_sparse", False) is True:
                raise RuntimeError(f"param_groups[0]['params'][{pi}]: LBFGS does not support "
                                   f"sparse gradients (torch.optim.LBFGS makes them dense); "
                                   f"pass a dense gradient")
            if not isinstance(g, np.ndarray) or g.shape != a.shape or g.dtype != a.dtype:
                raise ValueError(f"param_groups[0]['params'][{pi}]: .grad must be an array of "
                                 f"shape {a.shape} and dtype {a.dtype}, got "
                                 f"{getattr(g, 'shape', type(g).__name__)} "
                                 f"{getattr(g, 'dtype', '')}")
            parts.append(g.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def _add(self, t, d):
        off = 0
        for a, _ in self._arrays():
            n = a.size
            a += (t * d[off:off + n]).astype(a.dtype, copy=False).reshape(a.shape)
            off += n

    def _snapshot(self):
        return [a.copy() for a, _ in self._arrays()]

    def _restore(self, saved):
        for (a, _), s in zip(self._arrays(), saved):
            a[...] = s

    # state dicts: the history vectors are not shaped like a parameter -------------------

    def _cast_state(self, param, array, value, key, where):
        if key is None and isinstance(value, dict):
            out = {k: self._cast_state(param, array, v, k, where) for k, v in value.items()}
            if self._params and param is self._params[0]:
                self._check_history(out, array.dtype, where)
            return out
        if isinstance(value, dict):
            return {k: self._cast_state(param, array, v, k, where) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast_state(param, array, v, key, where) for v in value)
        if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
            if value.ndim == 0:
                value = value[()]
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            value = np.array(value, dtype=array.dtype)
            return value[()] if value.ndim == 0 else value
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
            return value[()]
        if isinstance(value, np.floating):
            return array.dtype.type(value)
        return value

    def _numel(self):
        return sum(int(np.size(p if isinstance(p, Parameter) else _foreign_arrays(p)))
                   for p in self._params)

    def _check_history(self, st, dtype, where):
        """Raise (TypeError or ValueError naming the key) unless the loaded state ``st`` of
        the first parameter is a history a step can continue from; lists are made lists."""
        n = self._numel()

        def scalar(v):
            return isinstance(v, (numbers.Real, np.floating, np.integer)) and not isinstance(
                v, (bool, np.bool_))

        def vector(v, path):
            if not (isinstance(v, np.ndarray) and v.dtype == dtype and v.shape == (n,)):
                desc = (f"{v.dtype} array of shape {v.shape}" if isinstance(v, np.ndarray)
                        else repr(v) if v is None or isinstance(v, str)
                        else type(v).__name__)
                raise ValueError(f"{where}: {path} must be a {dtype} vector of {n} elements "
                                 f"(the parameters' total size), got {desc}")

        for key in _COUNTERS:
            if key in st:
                v = st[key]
                if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) \
                        or v < 0:
                    raise TypeError(f"{where}: state[{key!r}] must be an int >= 0, got {v!r}")
                st[key] = int(v)
        if st.get("n_iter", 0) > 0:
            for key in _HISTORY:
                if key not in st:
                    raise KeyError(f"{where}: state has n_iter = {st['n_iter']} but no "
                                   f"{key!r}")
        for key in _VECTORS:
            if key in st:
                vector(st[key], f"state[{key!r}]")
        for key in _SCALARS:
            if key in st and not scalar(st[key]):
                raise TypeError(f"{where}: state[{key!r}] must be a real number, got "
                                f"{st[key]!r}")
        for key in _VECTOR_LISTS + _SCALAR_LISTS:
            if key not in st:
                continue
            v = st[key]
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"{where}: state[{key!r}] must be a list, got "
                                f"{type(v).__name__}")
            for i, item in enumerate(v):
                if key in _VECTOR_LISTS:
                    vector(item, f"state[{key!r}][{i}]")
                elif not (scalar(item) or (key == "al" and item is None)):
                    raise TypeError(f"{where}: state[{key!r}][{i}] must be a real number"
                                    f"{' or None' if key == 'al' else ''}, got {item!r}")
            st[key] = list(v)
        lengths = {key: len(st[key]) for key in _VECTOR_LISTS + ("ro",) if key in st}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{where}: state['old_dirs'], state['old_stps'] and state['ro'] "
                             f"must have one length, got {lengths}")

    # the step -------------------------------------------------------------------------------

    def step(self, closure: Closure) -> Any:  # type: ignore[override]  # as torch's
        """Run up to ``max_iter`` L-BFGS iterations; returns the first loss. When it raises,
        the parameters and the state are as they were before the call."""
        key = self._params[0] if self._params else None
        current = self.state.get(key)
        # the step works on a copy of the history (its lists copied: it appends to them),
        # stored only when it succeeded
        work = {k: (list(v) if isinstance(v, list) else v)
                for k, v in current.items()} if current else {}
        loss = self._run(closure, work)
        if isinstance(current, dict):
            current.clear()
            current.update(work)
        else:
            self.state[key] = work
        return loss

    def _run(self, closure, state):
        """``_step`` on ``state`` (a working copy of the first parameter's state); when it
        raises, the parameters are put back. The foreign parameters (tensors) are marked
        updated once, when the step succeeded and moved them."""
        x0 = self._snapshot()
        try:
            loss, moved = self._step(closure, state)
        except BaseException:
            self._restore(x0)
            raise
        if moved:
            foreign = _foreign_among(self._params)
            if foreign:
                _foreign_updated(foreign)
        return loss

    def _step(self, closure, state):
        """The iterations of one ``step`` on the history ``state``; returns (the first loss,
        whether the parameters moved)."""
        if len(self.param_groups) != 1:
            raise ValueError(f"LBFGS needs exactly one param_group, got "
                             f"{len(self.param_groups)}")
        group = self.param_groups[0]
        lr = _lr_scalar(group["lr"])
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        line_search, history = group["line_search_fn"], group["history_size"]
        if line_search not in (None, "strong_wolfe"):
            raise RuntimeError("only 'strong_wolfe' is supported")

        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss = closure()
        loss = _as_float(orig_loss)
        evals = 1
        state["func_evals"] += 1
        g = self._flat_grad()
        if np.abs(g).max(initial=0) <= tol_grad:
            return orig_loss, False

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        h_diag = state.get("H_diag")
        prev_g, prev_loss = state.get("prev_flat_grad"), state.get("prev_loss")

        n_iter = 0
        moved = False
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:
                d = -g
                old_dirs, old_stps, ro = [], [], []
                h_diag = 1
            else:
                # curvature pair from the last step; skipped unless y.s is clearly positive
                y = g - prev_g
                s = d * t
                ys = y.dot(s)
                if ys > 1e-10:
                    if len(old_dirs) >= history:
                        # one pair (torch); more when history_size was lowered
                        drop = len(old_dirs) - history + 1
                        del old_dirs[:drop], old_stps[:drop], ro[:drop]
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    h_diag = ys / y.dot(y)
                # two-loop recursion: d = -H g
                al = state.setdefault("al", [None] * history)
                if len(al) < len(old_dirs):
                    al.extend([None] * (len(old_dirs) - len(al)))
                q = -g
                for i in range(len(old_dirs) - 1, -1, -1):
                    al[i] = old_stps[i].dot(q) * ro[i]
                    q = q + (-al[i]) * old_dirs[i]
                d = r = q * h_diag
                for i in range(len(old_dirs)):
                    be_i = old_dirs[i].dot(r) * ro[i]
                    r += (al[i] - be_i) * old_stps[i]
            prev_g = g.copy()
            prev_loss = loss

            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / np.abs(g).sum()) * lr
            else:
                t = lr
            gtd = g.dot(d)
            if gtd > -tol_change:
                break

            ls_evals = 0
            if line_search is not None:
                x0 = self._snapshot()

                def evaluate(step_len):
                    self._add(step_len, d)
                    try:
                        f_val = _as_float(closure())
                        grad = self._flat_grad()
                    finally:
                        self._restore(x0)
                    return f_val, grad

                loss, g, t, ls_evals = _strong_wolfe(evaluate, t, d, loss, g, gtd,
                                                     max_ls=max_eval - evals)
                self._add(t, d)
                moved = True
                opt_cond = np.abs(g).max(initial=0) <= tol_grad
            else:
                self._add(t, d)
                moved = True
                opt_cond = False
                if n_iter != max_iter:
                    loss = _as_float(closure())
                    g = self._flat_grad()
                    opt_cond = np.abs(g).max(initial=0) <= tol_grad
                    ls_evals = 1
            evals += ls_evals
            state["func_evals"] += ls_evals

            if n_iter == max_iter or evals >= max_eval or opt_cond:
                break
            if np.abs(d * t).max(initial=0) <= tol_change:
                break
            if abs(loss - prev_loss) < tol_change:
                break

        state["d"], state["t"] = d, t
        state["old_dirs"], state["old_stps"], state["ro"] = old_dirs, old_stps, ro
        state["H_diag"] = h_diag
        state["prev_flat_grad"], state["prev_loss"] = prev_g, prev_loss
        return orig_loss, moved


def _lr_scalar(lr):
    """The lr a step computes with: a number as it is; a 1-element array or tensor (torch
    allows a tensor lr) as a NumPy scalar of its dtype, so that the step lengths made from
    it take that dtype's precision, as torch's 0-d tensor arithmetic does."""
    if isinstance(lr, numbers.Real):
        return lr
    detach = getattr(lr, "detach", None)
    value = np.asarray(lr.detach().cpu().numpy() if callable(detach) else lr)
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise TypeError(f"param_groups[0]['lr'] must be a real number or a 1-element array, "
                        f"got {lr!r}")
    return value.reshape(())[()]


def _as_float(value):
    """float() of a closure's loss; a torch tensor is detached first (no autograd warning)."""
    detach = getattr(value, "detach", None)
    return float(detach() if callable(detach) else value)
