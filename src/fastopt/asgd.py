"""ASGD (averaged stochastic gradient descent)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_nonneg

__all__ = ["ASGD"]


class ASGD(Optimizer):
    r"""Averaged SGD (Polyak and Juditsky 1992), as ``torch.optim.ASGD``.

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + w\theta, \qquad
        \theta \leftarrow \theta (1 - \lambda\eta_t) - \eta_t g \\
        \bar\theta &\leftarrow \bar\theta + \mu_t (\theta - \bar\theta)
            \quad (\bar\theta = \theta \text{ while } \mu_t = 1) \\
        \eta_{t+1} &= \frac{\gamma}{(1 + \lambda\gamma t)^\alpha}, \qquad
        \mu_{t+1} = \frac{1}{\max(1, t - t_0)}

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 1e-2
        Learning rate :math:`\gamma`.
    lambd : float, default 1e-4
        Decay term :math:`\lambda`.
    alpha : float, default 0.75
        Power :math:`\alpha` of the eta update.
    t0 : float, default 1e6
        Step at which averaging starts.
    weight_decay : float, default 0
        L2 penalty :math:`w`.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.
    foreach, capturable, differentiable : optional
        Accepted and ignored, as in :class:`~fastopt.optimizer.Optimizer`.

    Notes
    -----
    As torch: ``eta`` and ``mu`` are float32 0-d arrays (``eta`` starts at float32(lr), so
    the first step uses the rounded lr), the average ``ax`` is kept in state and never
    copied into the parameter, and only ``lr`` and ``weight_decay`` are validated.
    No square root is taken: results are bit-identical to torch's CPU path.
    State: ``step``, ``eta``, ``mu``, ``ax``.
    """

    _kernel = "asgd"
    # lr_tensor is not a group key: the freeze adds it (32 for a float32 torch tensor lr)
    _hyperparameters = ("lr", "lambd", "alpha", "t0", "weight_decay", "maximize",
                        "lr_tensor")
    _state_keys = ("ax",)
    _scalars = ("eta", "mu")
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "capturable": False}

    def __init__(self, params: ParamsT, lr: float = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0, foreach: Optional[bool] = None,
                 maximize: bool = False, differentiable: bool = False,
                 capturable: bool = False) -> None:
        defaults = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay,
                        foreach=foreach, maximize=maximize, differentiable=differentiable,
                        capturable=capturable)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        _check_nonneg(group, "lr", "weight_decay")

    def _init_state(self, state, array, group):
        state["step"] = np.array(0.0, dtype=np.float32)
        state["eta"] = np.array(group["lr"], dtype=np.float32)
        state["mu"] = np.array(1.0, dtype=np.float32)
        state["ax"] = np.zeros_like(array)
