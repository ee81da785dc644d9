"""Adam and AdamW."""
from __future__ import annotations

from typing import Optional, Tuple

from fastopt import _compressed
from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_betas, _check_impl_flags, _check_nonneg

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    r"""Adam, as ``torch.optim.Adam``.

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta \quad
            (\text{decoupled: } \theta \leftarrow \theta(1 - \gamma\lambda) \text{ instead}) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \theta &\leftarrow \theta - \frac{\gamma}{1 - \beta_1^t} \,
            \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 1e-3
        Learning rate :math:`\gamma`.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moments; both must be floats in [0, 1).
    eps : float, default 1e-8
        Added to the bias-corrected square root of :math:`v`.
    weight_decay : float, default 0
        Weight decay :math:`\lambda` (an L2 penalty, or decoupled as in AdamW).
    amsgrad : bool, default False
        Use the running maximum of :math:`v` (AMSGrad).
    maximize : bool, default False
        Maximize the objective instead of minimizing it.
    decoupled_weight_decay : bool, default False
        Decay the weights directly (AdamW) instead of adding an L2 term to the gradient.
    foreach, capturable, differentiable, fused : optional
        Accepted and ignored, as in :class:`~fastopt.optimizer.Optimizer`.
    state_dtype, master_weights, stochastic_rounding, rounding_seed, min_8bit_size : optional
        Keyword-only, fastopt's own: how the state and 16-bit parameters are stored
        (bfloat16 or 8-bit block-wise state, float32 master weights, stochastic rounding);
        see :ref:`compressed-state`. At their defaults the state is torch's.

    Notes
    -----
    eps is added after the bias correction of :math:`\sqrt{v}`, as torch does (not the
    paper's :math:`\hat\epsilon` form). As torch, ``betas`` given as ints (``(0, 0.99)``) are
    a ValueError. The step counter is a float32 0-d array (torch's float32 ``step`` tensor),
    so it stops growing at 2**24 steps, as torch's does.

    As torch, a step uses the ``betas[0]`` its group holds, also outside [0, 1) (a
    scheduler cycling momentum writes it: ``OneCycleLR(max_momentum=...)``); ``betas[0]``
    equal to 1 raises torch's ZeroDivisionError, before anything changes (torch raises it
    after updating ``exp_avg``). ``betas[1]`` outside [0, 1) is a ValueError at the step
    (torch computes NaN or fails on a complex bias correction).
    """

    _kernel = "adam"
    # lr_tensor and betas_tensor are not group keys: the freeze adds them (their dtypes'
    # bits where they are torch tensors)
    _hyperparameters = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                        "decoupled_weight_decay", "lr_tensor", "betas_tensor")
    _state_keys = ("exp_avg", "exp_avg_sq", ("max_exp_avg_sq", "amsgrad"))
    _beta1_division = True
    _flag_defaults = {"amsgrad": False, "maximize": False, "foreach": None,
                      "capturable": False, "differentiable": False,
                      "decoupled_weight_decay": False, "fused": None}

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 decoupled_weight_decay: bool = False,
                 state_dtype: Optional[str] = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        self._check_group(defaults)
        if not (isinstance(betas[0], float) and isinstance(betas[1], float)):
            raise ValueError("betas must be either both floats or both Tensors")
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)
        _check_impl_flags(defaults)
        _compressed.set_options(self, state_dtype=state_dtype, master_weights=master_weights,
                                stochastic_rounding=stochastic_rounding,
                                rounding_seed=rounding_seed, min_8bit_size=min_8bit_size)

    def _check_group(self, group):
        _check_nonneg(group, "lr", "eps")
        _check_betas(group["betas"])
        _check_nonneg(group, "weight_decay")



class AdamW(Adam):
    r"""AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay,
    :math:`\theta \leftarrow \theta (1 - \gamma\lambda)` before the Adam update.

    Same parameters as :class:`Adam` with ``weight_decay=1e-2`` by default and
    ``decoupled_weight_decay`` always True (also after ``load_state_dict``).
    The compressed-state options too (``state_dtype`` and the others): see
    :ref:`compressed-state`.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 state_dtype: Optional[str] = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)
        _compressed.set_options(self, state_dtype=state_dtype, master_weights=master_weights,
                                stochastic_rounding=stochastic_rounding,
                                rounding_seed=rounding_seed, min_8bit_size=min_8bit_size)

    def _backfill(self, groups):
        super()._backfill(groups)
        for group in groups:
            group["decoupled_weight_decay"] = True
