"""SparseAdam: Adam for row-sparse gradients (``fastopt.SparseGrad``)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from fastopt import _kernels
from fastopt._adapters import _foreign_among, _foreign_updated, _param_arrays, _where
from fastopt._numpy_step import check_state_array, commit_state, freeze
from fastopt._typing import Closure, ParamsT
from fastopt.optimizer import Optimizer, _check_betas
from fastopt.parameter import SparseGrad

__all__ = ["SparseAdam", "SparseGrad"]


class SparseAdam(Optimizer):
    r"""Adam for row-sparse gradients, as ``torch.optim.SparseAdam``: only the rows in the
    gradient have their moments and values updated (lazy Adam).

    For each touched row, with :math:`g` the gradient rows (duplicates summed) and
    :math:`t` the number of steps taken:

    .. math::
        m \leftarrow m + (1 - \beta_1)(g - m), \quad
        v \leftarrow v + (1 - \beta_2)(g^2 - v), \quad
        \theta \leftarrow \theta - \gamma \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
            \frac{m}{\sqrt v + \epsilon}

    Parameters
    ----------
    params : iterable
        Dense float32/float64 parameters (at least 1-D); their ``.grad`` must be a
        :class:`SparseGrad` (a dense array raises RuntimeError, as torch).
    lr : float, default 1e-3
        Must be > 0.
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
        Must be > 0; added to the *uncorrected* :math:`\sqrt v` (unlike Adam).
    maximize : bool, default False

    Notes
    -----
    The update runs in C over the touched rows only (threads split the rows). As torch,
    ``state['step']`` is a Python int, incremented for every parameter with a gradient even
    when the gradient has no rows.
    """

    _flag_defaults = {"maximize": False}
    _scalar_state_keys = frozenset()

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        if not 0.0 < group["lr"]:
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        if not 0.0 < group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        _check_betas(group["betas"])

    def _cast_state(self, param, array, value, key, where):
        if key == "step" and not isinstance(value, dict):
            if hasattr(value, "item"):
                value = value.item()
            try:
                step = int(value)
            except (TypeError, ValueError, OverflowError):
                step = None
            if step is None or isinstance(value, bool) or step != value or step < 0:
                raise TypeError(f"{where}: state['step'] must be an int >= 0, got {value!r}")
            return step
        # (named, not super(): fastopt.torch.SparseAdam reuses this method)
        return Optimizer._cast_state(self, param, array, value, key, where)

    def _init_state(self, state, array, group):
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(array)
        state["exp_avg_sq"] = np.zeros_like(array)

    def _check_existing_state(self, st, arr, where):
        # load_state_dict checks a loaded state as the step checks the state it finds
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key not in st:
                raise KeyError(f"{where}: state has no {key!r}")
        self._check_state(st, arr, where)

    @staticmethod
    def _check_state(st, arr, where):
        step = st.get("step")
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise TypeError(f"{where}: state['step'] must be an int >= 0, got {step!r}")
        for key in ("exp_avg", "exp_avg_sq"):
            check_state_array(st.get(key), arr.shape, arr.dtype, where, key)
            if not st[key].flags.c_contiguous:
                raise ValueError(f"{where}: state[{key!r}] must be C-contiguous")

    def step(self, closure: Optional[Closure] = None) -> Any:
        """Perform one optimization step; returns ``closure()``'s value when given."""
        loss = None
        if closure is not None:
            loss = closure()
        # phase 1: check everything, coalesce the gradients, create new state (not stored)
        frozen = [freeze(self, gi, group) for gi, group in enumerate(self.param_groups)]
        work = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                arr, g = _param_arrays(p, gi, pi, mark=False)
                if g is None:
                    continue
                where = _where(gi, pi)
                if not isinstance(g, SparseGrad):
                    if type(g).__module__.startswith("torch") and getattr(g, "is_sparse", False):
                        g = SparseGrad.from_torch(g)
                    else:
                        raise RuntimeError(f"{where}: SparseAdam does not support dense "
                                           f"gradients, please consider Adam instead")
                _kernels.check_param(arr, gi, pi)
                if arr.ndim < 1:
                    raise ValueError(f"{where}: SparseAdam needs parameters with at least "
                                     f"one dimension")
                vals = g.values
                if vals.dtype != arr.dtype or vals.shape[1:] != arr.shape[1:]:
                    raise ValueError(f"{where}: sparse gradient values of dtype {vals.dtype} "
                                     f"and shape {vals.shape} do not fit rows of a "
                                     f"{arr.dtype} parameter of shape {arr.shape}")
                if g.indices.size and (g.indices.min() < 0 or g.indices.max() >= arr.shape[0]):
                    raise IndexError(f"{where}: sparse gradient row index out of range "
                                     f"[0, {arr.shape[0]})")
                st = self.state.get(p)
                if st is not None and not isinstance(st, dict):
                    raise TypeError(f"{where}: optimizer.state entry must be a dict, got "
                                    f"{type(st).__name__}")
                if st:
                    self._check_state(st, arr, where)
                g = g.coalesce()
                work.append((gi, p, arr, np.ascontiguousarray(g.indices),
                             np.ascontiguousarray(g.values, dtype=arr.dtype)))
        created: Dict[int, Any] = {}
        for gi, p, arr, _, _ in work:
            if not self.state.get(p) and id(p) not in created:
                fresh: Dict[str, Any] = {}
                self._init_state(fresh, arr, frozen[gi])
                created[id(p)] = (p, fresh)
        # the step sizes, computed before any counter moves (a parameter listed twice
        # counts twice, as torch)
        steps: Dict[int, Any] = {}
        items_of: Dict[int, Any] = {}
        for gi, p, arr, rows, vals in work:
            st = created[id(p)][1] if id(p) in created else self.state[p]
            t = steps[id(p)] = steps.get(id(p), st["step"]) + 1
            beta1, beta2 = frozen[gi]["betas"]
            step_size = frozen[gi]["lr"] * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            items_of.setdefault(gi, []).append(
                (arr, rows, vals, st["exp_avg"], st["exp_avg_sq"], float(step_size)))
        # phase 2: store the new state (zeros at step 0: as good as none if the step stops
        # here), then one compiled call sets the counters and updates all groups, with no
        # point in between where a signal handler could stop it
        commit_state(self, created)
        counters = [(self.state[p], steps[id(p)]) for _, p, _, _, _ in work]
        _kernels.run_sparse_adam([(items, *frozen[gi]["betas"], frozen[gi]["eps"],
                                   frozen[gi]["maximize"]) for gi, items in items_of.items()],
                                 counters)
        foreign = _foreign_among([p for _, p, _, _, _ in work])
        if foreign:  # after the update: a step that raised left the version counters alone
            _foreign_updated(foreign)
        return loss
