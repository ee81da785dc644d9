"""Adadelta."""
from __future__ import annotations

from typing import Optional

from fastopt import _compressed
from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_nonneg

__all__ = ["Adadelta"]


class Adadelta(Optimizer):
    r"""Adadelta, as ``torch.optim.Adadelta``.

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta, \qquad
        v \leftarrow \rho v + (1 - \rho) g^2 \\
        \Delta &= \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}}\, g, \qquad
        u \leftarrow \rho u + (1 - \rho) \Delta^2, \qquad
        \theta \leftarrow \theta - \gamma \Delta

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 1.0
        Scale :math:`\gamma` of the step.
    rho : float, default 0.9
        Decay rate :math:`\rho` of both running averages, in [0, 1].
    eps : float, default 1e-6
        Added inside both square roots.
    weight_decay : float, default 0
        L2 penalty :math:`\lambda`.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.
    foreach, capturable, differentiable : optional
        Accepted and ignored, as in :class:`~fastopt.optimizer.Optimizer`.
    state_dtype, master_weights, stochastic_rounding, rounding_seed, min_8bit_size : optional
        Keyword-only, fastopt's own: how the state and 16-bit parameters are stored
        (bfloat16 or 8-bit block-wise state, float32 master weights, stochastic rounding);
        see :ref:`compressed-state`. At their defaults the state is torch's.

    Notes
    -----
    State: ``step`` (float32 0-d), ``square_avg`` (:math:`v`), ``acc_delta`` (:math:`u`).
    """

    _kernel = "adadelta"
    _hyperparameters = ("lr", "rho", "eps", "weight_decay", "maximize")
    _state_keys = ("square_avg", "acc_delta")
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "capturable": False}

    def __init__(self, params: ParamsT, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0, foreach: Optional[bool] = None, *,
                 capturable: bool = False, maximize: bool = False,
                 differentiable: bool = False,
                 state_dtype: Optional[str] = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096) -> None:
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, capturable=capturable, foreach=foreach,
                        differentiable=differentiable)
        self._check_group(defaults)
        super().__init__(params, defaults)
        _compressed.set_options(self, state_dtype=state_dtype, master_weights=master_weights,
                                stochastic_rounding=stochastic_rounding,
                                rounding_seed=rounding_seed, min_8bit_size=min_8bit_size)

    def _check_group(self, group):
        _check_nonneg(group, "lr")
        if not 0.0 <= group["rho"] <= 1.0:
            raise ValueError(f"Invalid rho value: {group['rho']}")
        _check_nonneg(group, "eps", "weight_decay")
