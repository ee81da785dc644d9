"""Adamax."""
from __future__ import annotations

from typing import Optional, Tuple

from fastopt import _compressed
from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_betas, _check_nonneg

__all__ = ["Adamax"]


class Adamax(Optimizer):
    r"""Adamax (Adam with the infinity norm), as ``torch.optim.Adamax``.

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta, \qquad
        m \leftarrow \beta_1 m + (1 - \beta_1) g \\
        u &\leftarrow \max(\beta_2 u, |g| + \epsilon), \qquad
        \theta \leftarrow \theta - \frac{\gamma}{1 - \beta_1^t} \frac{m}{u}

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 2e-3
        Learning rate :math:`\gamma`.
    betas : (float, float), default (0.9, 0.999)
        Decay rates, each in [0, 1) (ints are accepted, as in torch).
    eps : float, default 1e-8
        Added to :math:`|g|` inside the maximum (not to a denominator).
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
    No square root is taken, so results are bit-identical to torch's CPU for-loop path
    (with its AVX2 fused multiply-adds). The maximum propagates NaN, as ``torch.maximum``.
    State: ``step``, ``exp_avg``, ``exp_inf``. As torch, a step uses any ``betas[0]`` its
    group holds (a scheduler cycling momentum may leave [0, 1)); 1 raises torch's
    ZeroDivisionError, before anything changes.
    """

    _kernel = "adamax"
    # lr_tensor is not a group key: the freeze adds it (32 for a float32 torch tensor lr)
    _hyperparameters = ("lr", "betas", "eps", "weight_decay", "maximize", "lr_tensor")
    _state_keys = ("exp_avg", "exp_inf")
    _beta1_division = True
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "capturable": False}

    def __init__(self, params: ParamsT, lr: float = 2e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, foreach: Optional[bool] = None, *,
                 maximize: bool = False, differentiable: bool = False,
                 capturable: bool = False,
                 state_dtype: Optional[str] = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        foreach=foreach, maximize=maximize, differentiable=differentiable,
                        capturable=capturable)
        self._check_group(defaults)
        super().__init__(params, defaults)
        _compressed.set_options(self, state_dtype=state_dtype, master_weights=master_weights,
                                stochastic_rounding=stochastic_rounding,
                                rounding_seed=rounding_seed, min_8bit_size=min_8bit_size)

    def _check_group(self, group):
        _check_nonneg(group, "lr", "eps")
        _check_betas(group["betas"])
        _check_nonneg(group, "weight_decay")
