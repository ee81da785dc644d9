"""RAdam."""
from __future__ import annotations

from typing import Optional, Tuple

from fastopt import _compressed
from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_betas, _check_nonneg

__all__ = ["RAdam"]


class RAdam(Optimizer):
    r"""RAdam (rectified Adam, Liu et al. 2020), as ``torch.optim.RAdam``.

    .. math::
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
        \hat m = m / (1 - \beta_1^t) \\
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        \rho_t > 5:&\quad \theta \leftarrow \theta - \gamma \hat m \,
            \frac{\sqrt{1 - \beta_2^t}}{\sqrt v + \epsilon}
            \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
                       {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}} \\
        \text{else}:&\quad \theta \leftarrow \theta - \gamma \hat m

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 1e-3
        Learning rate :math:`\gamma`.
    betas : (float, float), default (0.9, 0.999)
        Decay rates, each in [0, 1).
    eps : float, default 1e-8
        Added after the square root.
    weight_decay : float, default 0
        Weight decay (L2, or decoupled).
    decoupled_weight_decay : bool, default False
        Decay the weights directly (RAdamW) instead of adding an L2 term to the gradient.
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
    While :math:`\rho_t \le 5` (the first 5 steps with :math:`\beta_2 = 0.999`) the step is
    the un-adapted SGD-with-momentum step. State: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    _kernel = "radam"
    # lr_tensor is not a group key: the freeze adds it (32 for a float32 torch tensor lr)
    _hyperparameters = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay",
                        "maximize", "lr_tensor")
    _state_keys = ("exp_avg", "exp_avg_sq")
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "decoupled_weight_decay": False, "capturable": False}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, decoupled_weight_decay: bool = False,
                 *, foreach: Optional[bool] = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False,
                 state_dtype: Optional[str] = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        decoupled_weight_decay=decoupled_weight_decay,
                        differentiable=differentiable)
        self._check_group(defaults)
        super().__init__(params, defaults)
        _compressed.set_options(self, state_dtype=state_dtype, master_weights=master_weights,
                                stochastic_rounding=stochastic_rounding,
                                rounding_seed=rounding_seed, min_8bit_size=min_8bit_size)

    def _check_group(self, group):
        _check_nonneg(group, "lr", "eps")
        _check_betas(group["betas"])
        _check_nonneg(group, "weight_decay")
