"""NAdam."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from fastopt import _compressed
from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_betas, _check_nonneg

__all__ = ["NAdam"]


class NAdam(Optimizer):
    r"""NAdam (Adam with Nesterov momentum, Dozat 2016), as ``torch.optim.NAdam``.

    .. math::
        \mu_t &= \beta_1 (1 - \tfrac12 \, 0.96^{t\psi}), \qquad
        \Pi_t = \Pi_{t-1}\mu_t \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
        d = \sqrt{v / (1 - \beta_2^t)} + \epsilon \\
        \theta &\leftarrow \theta - \gamma \frac{1 - \mu_t}{1 - \Pi_t} \frac{g}{d}
            - \gamma \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} \frac{m}{d}

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 2e-3
        Learning rate :math:`\gamma`.
    betas : (float, float), default (0.9, 0.999)
        Decay rates, each in [0, 1).
    eps : float, default 1e-8
        Added after the square root.
    weight_decay : float, default 0
        Weight decay :math:`\lambda` (L2, or decoupled).
    momentum_decay : float, default 4e-3
        :math:`\psi` of the momentum schedule.
    decoupled_weight_decay : bool, default False
        Decay the weights directly, :math:`\theta \leftarrow \theta(1 - \gamma\lambda)`
        (NAdamW), instead of adding :math:`\lambda\theta` to the gradient.
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
    The running product :math:`\Pi_t` is kept as torch keeps it: a float32 0-d array
    ``state['mu_product']`` (starting at 1.0) rounded to float32 at every step. The bias
    correction of :math:`v` is applied inside the square root, unlike Adam.
    State: ``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``.
    """

    _kernel = "nadam"
    _hyperparameters = ("lr", "betas", "eps", "weight_decay", "momentum_decay",
    # lr_tensor is not a group key: the freeze adds it (32 for a float32 torch tensor lr)
                        "decoupled_weight_decay", "maximize", "lr_tensor")
    _state_keys = ("exp_avg", "exp_avg_sq")
    _scalars = ("mu_product",)
    _flag_defaults = {"maximize": False, "foreach": None, "capturable": False,
                      "differentiable": False, "decoupled_weight_decay": False}

    def __init__(self, params: ParamsT, lr: float = 2e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: Optional[bool] = None,
                 maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False,
                 state_dtype: Optional[str] = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable)
        self._check_group(defaults)
        super().__init__(params, defaults)
        _compressed.set_options(self, state_dtype=state_dtype, master_weights=master_weights,
                                stochastic_rounding=stochastic_rounding,
                                rounding_seed=rounding_seed, min_8bit_size=min_8bit_size)

    def _check_group(self, group):
        _check_nonneg(group, "lr", "eps")
        _check_betas(group["betas"])
        _check_nonneg(group, "weight_decay", "momentum_decay")

    def _init_state(self, state, array, group):
        state["step"] = np.array(0.0, dtype=np.float32)
        state["mu_product"] = np.array(1.0, dtype=np.float32)
        state["exp_avg"] = np.zeros_like(array)
        state["exp_avg_sq"] = np.zeros_like(array)
