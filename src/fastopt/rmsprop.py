"""RMSprop, plain, centered and with momentum."""
from __future__ import annotations

from typing import Optional

from fastopt import _compressed
from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_impl_flags, _check_nonneg

__all__ = ["RMSprop"]


class RMSprop(Optimizer):
    r"""RMSprop, as ``torch.optim.RMSprop``.

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta, \qquad
        v \leftarrow \alpha v + (1 - \alpha) g^2 \\
        \bar g &\leftarrow \alpha \bar g + (1 - \alpha) g, \quad
        d = \sqrt{v - \bar g^2} + \epsilon \text{ (centered) else } \sqrt{v} + \epsilon \\
        b &\leftarrow \mu b + g / d, \quad \theta \leftarrow \theta - \gamma b
        \quad (\mu > 0) \text{ else } \theta \leftarrow \theta - \gamma g / d

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 1e-2
        Learning rate :math:`\gamma`.
    alpha : float, default 0.99
        Smoothing constant :math:`\alpha`.
    eps : float, default 1e-8
        Added outside the square root.
    weight_decay : float, default 0
        L2 penalty :math:`\lambda`.
    momentum : float, default 0
        Momentum factor :math:`\mu`.
    centered : bool, default False
        Normalise by an estimate of the gradient's variance.
    capturable, foreach, differentiable : optional
        Accepted and ignored, as in :class:`~fastopt.optimizer.Optimizer`.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.
    state_dtype, master_weights, stochastic_rounding, rounding_seed, min_8bit_size : optional
        Keyword-only, fastopt's own: how the state and 16-bit parameters are stored
        (bfloat16 or 8-bit block-wise state, float32 master weights, stochastic rounding);
        see :ref:`compressed-state`. At their defaults the state is torch's.

    Notes
    -----
    As torch, ``alpha`` is only checked to be non-negative (``alpha > 1`` is accepted), and
    state is ``step``, ``square_avg`` and, when used, ``momentum_buffer`` and ``grad_avg``.
    """

    _kernel = "rmsprop"
    _hyperparameters = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered",
                        "maximize")
    _state_keys = ("square_avg", ("momentum_buffer", "momentum", "positive"),
                   ("grad_avg", "centered"))
    _flag_defaults = {"momentum": 0, "centered": False, "foreach": None, "maximize": False,
                      "differentiable": False, "capturable": False}

    def __init__(self, params: ParamsT, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: Optional[bool] = None, maximize: bool = False,
                 differentiable: bool = False,
                 *, state_dtype: Optional[str] = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096) -> None:
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable)
        self._check_group(defaults)
        super().__init__(params, defaults)
        _check_impl_flags(defaults)
        _compressed.set_options(self, state_dtype=state_dtype, master_weights=master_weights,
                                stochastic_rounding=stochastic_rounding,
                                rounding_seed=rounding_seed, min_8bit_size=min_8bit_size)

    def _check_group(self, group):
        _check_nonneg(group, "lr", "eps", "momentum", "weight_decay", "alpha")
