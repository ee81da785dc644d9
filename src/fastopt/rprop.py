"""Rprop (resilient backpropagation)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_nonneg

__all__ = ["Rprop"]


class Rprop(Optimizer):
    r"""Rprop, as ``torch.optim.Rprop``: a per-element step size that grows by
    :math:`\eta_+` while the gradient keeps its sign and shrinks by :math:`\eta_-` when it
    flips.

    .. math::
        s &= \operatorname{sign}(g\,g_{prev}) \mapsto \eta_+ (>0),\ \eta_- (<0),\ 1 (=0) \\
        \Delta &\leftarrow \operatorname{clamp}(\Delta s, \Delta_{min}, \Delta_{max}), \qquad
        g \leftarrow 0 \text{ where } s = \eta_- \\
        \theta &\leftarrow \theta - \operatorname{sign}(g)\,\Delta, \qquad g_{prev} \leftarrow g

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 1e-2
        Initial step size (only read when a parameter's state is created: as in torch, a
        learning-rate scheduler has no effect afterwards).
    etas : (float, float), default (0.5, 1.2)
        :math:`(\eta_-, \eta_+)` with :math:`0 < \eta_- < 1 < \eta_+`.
    step_sizes : (float, float), default (1e-6, 50)
        Bounds of the step size.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.
    foreach, capturable, differentiable : optional
        Accepted and ignored, as in :class:`~fastopt.optimizer.Optimizer`.

    Notes
    -----
    No weight decay (torch has none). ``sign`` of NaN is 0, as ``torch.sign`` on CPU.
    Bit-identical to torch. State: ``step``, ``prev``, ``step_size``.
    """

    _kernel = "rprop"
    _hyperparameters = ("etas", "step_sizes", "maximize")
    _state_keys = ("prev", "step_size")
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "capturable": False}

    def __init__(self, params: ParamsT, lr: float = 1e-2, etas: Tuple[float, float] = (0.5, 1.2),
                 step_sizes: Tuple[float, float] = (1e-6, 50), *, capturable: bool = False,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 differentiable: bool = False) -> None:
        defaults = dict(lr=lr, etas=etas, step_sizes=step_sizes, foreach=foreach,
                        maximize=maximize, differentiable=differentiable,
                        capturable=capturable)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        _check_nonneg(group, "lr")
        etas = group["etas"]
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
        lo, hi = group["step_sizes"]
        if not all(isinstance(v, (int, float, np.integer, np.floating)) for v in (lo, hi)):
            raise TypeError(f"step_sizes must be two numbers, got {group['step_sizes']!r}")

    def _init_state(self, state, array, group):
        state["step"] = np.array(0.0, dtype=np.float32)
        state["prev"] = np.zeros_like(array)
        state["step_size"] = np.full_like(array, group["lr"])
