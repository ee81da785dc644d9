"""Adafactor: factored second moments for matrices (NumPy, not per-element)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from fastopt._numpy_step import (check_state_array, check_step, lerp_, mark_updated, prepare,
                                 real, signals_deferred)
from fastopt._typing import Closure, ParamsT
from fastopt.optimizer import Optimizer

__all__ = ["Adafactor"]


class Adafactor(Optimizer):
    r"""Adafactor (Shazeer and Stern 2018), as ``torch.optim.Adafactor``.

    For a parameter with ``ndim >= 2`` the second moment is kept as a row factor
    :math:`R` (shape with the last dim 1) and a column factor :math:`C` (dim -2 of size 1);
    otherwise as a full ``variance``:

    .. math::
        \hat\beta_t &= 1 - t^{\tau}, \quad \rho_t = \min(\gamma, 1/\sqrt t), \quad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta))\,\rho_t, \quad
        \theta \leftarrow \theta (1 - \gamma\lambda) \\
        R &\leftarrow \mathrm{lerp}(R, \mathrm{mean}_{-1}(G^2), t^\tau), \quad
        C \leftarrow \mathrm{lerp}(C, \mathrm{mean}_{-2}(G^2), t^\tau), \quad
        \hat V = \frac{R\,C}{\max(\mathrm{mean}_{-2}(R), \epsilon_1)} \\
        U &= G / \sqrt{\max(\hat V, \epsilon_1^2)}, \quad
        \theta \leftarrow \theta - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U)/d)}\, U

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts (float32 or float64).
    lr : float, default 1e-2
        Upper bound of the relative step size :math:`\rho_t`, and the weight-decay scale.
    beta2_decay : float, default -0.8
        :math:`\tau`; must be <= 0.
    eps : (float or None, float), default (None, 1e-3)
        :math:`\epsilon_1` (None: the machine epsilon of the parameter dtype) and
        :math:`\epsilon_2`.
    d : float, default 1.0
        Clipping threshold of the update's RMS; must be >= 1.
    weight_decay : float, default 0.0
        Decoupled weight decay :math:`\lambda`.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.
    foreach : optional
        Accepted for compatibility; changes nothing.

    Notes
    -----
    Defaults are torch 2.13's code, not its docstring: the docstring says
    ``weight_decay`` defaults to 1e-2 (the code uses 0.0) and lists no default for ``d``
    (1.0). As torch's for-loop path, when ``eps[0]`` is None the machine epsilon of the
    *first* parameter with a gradient in a group is used for the whole group. Row and column
    means are computed as torch does, as the squared 2-norm divided by the length.
    State: ``step`` (float32 0-d) and ``row_var``, ``col_var`` or ``variance``.

    A parameter with no elements raises ValueError before anything changes (torch divides
    by its size and raises ZeroDivisionError after updating the parameters before it).
    """

    _flag_defaults = {"foreach": None, "maximize": False}

    def __init__(self, params: ParamsT, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: Tuple[Optional[float], float] = (None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, *, foreach: Optional[bool] = None,
                 maximize: bool = False) -> None:
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                        weight_decay=weight_decay, foreach=foreach, maximize=maximize)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        lr, eps = group["lr"], group["eps"]
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= group["beta2_decay"]:
            raise ValueError(f"beta2_decay should be <= 0 but is: {group['beta2_decay']}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= group["d"]:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {group['d']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"weight_decay should be >= 0 but is: {group['weight_decay']}")

    def _cast_state(self, param, array, value, key, where):
        # the factors are shaped (..., m, 1) and (..., 1, n), not like the parameter
        if key in ("row_var", "col_var") and not isinstance(value, (dict, list, tuple)):
            if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            want = self._factor_shapes(array.shape)[key == "col_var"] if array.ndim > 1 \
                else None
            value = np.asarray(value)
            if want is None or value.shape != want:
                raise ValueError(f"{where}: state[{key!r}] has shape {value.shape}, expected "
                                 f"{want} for a parameter of shape {array.shape}")
            return np.array(value, dtype=array.dtype, order="C")
        # (named, not super(): fastopt.torch.Adafactor reuses this method)
        value = Optimizer._cast_state(self, param, array, value, key, where)
        if key == "step":
            check_step(value, where)
        return value

    @staticmethod
    def _factor_shapes(shape):
        row, col = list(shape), list(shape)
        row[-1] = 1
        col[-2] = 1
        return tuple(row), tuple(col)

    def _check_existing_state(self, st, arr, where):
        check_step(st.get("step"), where)
        if arr.ndim > 1:
            row, col = self._factor_shapes(arr.shape)
            check_state_array(st.get("row_var"), row, arr.dtype, where, "row_var")
            check_state_array(st.get("col_var"), col, arr.dtype, where, "col_var")
        else:
            check_state_array(st.get("variance"), arr.shape, arr.dtype, where, "variance")

    @staticmethod
    def _check_frozen(frozen, group):
        # eps holds None, so _freeze leaves it as it is
        eps = frozen["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"eps must be a pair (epsilon1 or None, epsilon2), got {eps!r}")
        frozen["eps"] = (None if eps[0] is None else real(eps[0], "eps[0]"),
                         real(eps[1], "eps[1]"))

    @staticmethod
    def _check_param(frozen, arr, where):
        if arr.size == 0:
            raise ValueError(f"{where}: Adafactor cannot step a parameter with no elements "
                             f"(shape {arr.shape})")

    def _init_state(self, state, array, group):
        state["step"] = np.array(0.0, dtype=np.float32)
        if array.ndim > 1:
            row, col = self._factor_shapes(array.shape)
            state["row_var"] = np.zeros(row, array.dtype)
            state["col_var"] = np.zeros(col, array.dtype)
        else:
            state["variance"] = np.zeros_like(array)

    def step(self, closure: Optional[Closure] = None) -> Any:
        """Perform one optimization step; returns ``closure()``'s value when given."""
        loss = None
        if closure is not None:
            loss = closure()
        frozen, groups = self._prepare_step(self.state)
        try:
            self._update_groups(frozen, groups, self.state)
        finally:
            mark_updated(groups)
        return loss

    def _prepare_step(self, state):
        """Phase 1 of a step over the parameter states ``state``: every check, and the state
        of new parameters created in ``state``; raises before anything changes."""
        return prepare(self, "Adafactor", self._check_existing_state, lambda st: len(st) == 0,
                       self._check_frozen, self._check_param, state=state, mark=False)

    def _update_groups(self, frozen, groups, state):
        """Phase 2: the update of every parameter of ``_prepare_step``'s lists."""
        with signals_deferred():  # every group is updated, or (the checks failed) none
            for group, items in zip(frozen, groups):
                lr, wd, d = group["lr"], group["weight_decay"], group["d"]
                eps1, eps2 = group["eps"]
                for _, p, arr, g in items:
                    self._update_one(arr, g, state[p], lr, wd, d, eps1, eps2, group)
                    if eps1 is None:
                        eps1 = float(np.finfo(arr.dtype).eps)

    @staticmethod
    def _update_one(arr, g, st, lr, wd, d, eps1, eps2, group):
        T = arr.dtype.type
        if eps1 is None:
            eps1 = float(np.finfo(arr.dtype).eps)
        if group["maximize"]:
            g = -g
        st["step"] += np.float32(1)
        t = float(st["step"])
        w = t ** group["beta2_decay"]
        rho = min(lr, 1 / (t ** 0.5))
        alpha = max(eps2, float(np.linalg.norm(arr.reshape(-1))) / (arr.size ** 0.5)) * rho
        if wd != 0:
            arr *= T(1 - lr * wd)
        if g.ndim > 1:
            row_mean = np.sqrt(np.sum(g * g, axis=-1, keepdims=True))
            row_mean = (row_mean * row_mean) / T(g.shape[-1])
            lerp_(st["row_var"], row_mean, T(w))
            col_mean = np.sqrt(np.sum(g * g, axis=-2, keepdims=True))
            col_mean = (col_mean * col_mean) / T(g.shape[-2])
            lerp_(st["col_var"], col_mean, T(w))
            var = st["row_var"] @ st["col_var"]
            var /= np.maximum(st["row_var"].mean(axis=-2, keepdims=True), T(eps1))
        else:
            lerp_(st["variance"], g * g, T(w))
            var = st["variance"].copy()
        upd = T(1) / np.sqrt(np.maximum(var, T(eps1 * eps1)))
        upd *= g
        denom = max(1.0, float(np.linalg.norm(upd.reshape(-1))) / ((upd.size ** 0.5) * d))
        arr += T(-alpha / denom) * upd
