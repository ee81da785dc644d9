"""Lion (EvoLved Sign Momentum), which torch.optim does not have."""
from __future__ import annotations

from typing import Optional, Tuple

from fastopt import _compressed
from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_betas, _check_nonneg

__all__ = ["Lion"]


class Lion(Optimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Alg. 2).

    .. math::
        c &= \beta_1 m + (1 - \beta_1) g, \qquad
        \theta \leftarrow \theta(1 - \gamma\lambda) - \gamma \operatorname{sign}(c) \\
        m &\leftarrow \beta_2 m + (1 - \beta_2) g

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 1e-4
        Learning rate :math:`\gamma` (the paper suggests 3-10x smaller than AdamW's).
    betas : (float, float), default (0.9, 0.99)
        :math:`\beta_1` (interpolation for the update) and :math:`\beta_2` (momentum
        decay), each in [0, 1).
    weight_decay : float, default 0
        Decoupled weight decay :math:`\lambda` (the paper suggests 3-10x larger than AdamW's).
    maximize : bool, default False
        Maximize the objective instead of minimizing it.
    state_dtype, master_weights, stochastic_rounding, rounding_seed, min_8bit_size : optional
        Keyword-only, fastopt's own: how the state and 16-bit parameters are stored
        (bfloat16 or 8-bit block-wise state, float32 master weights, stochastic rounding);
        see :ref:`compressed-state`. At their defaults the state is torch's.

    Notes
    -----
    ``sign(0) = 0``: where the interpolant :math:`c` is exactly zero the parameter only
    decays (as ``jnp.sign`` in optax and ``torch.sign``). ``sign(NaN)`` is NaN, as
    ``jnp.sign``, so a NaN gradient shows up in the parameter instead of being hidden
    (``torch.sign`` returns 0 for NaN on CPU, which would silently skip the element). The
    weight decay is applied as a separate multiplication before the signed step (the paper's
    :math:`\theta - \gamma(\operatorname{sign}(c) + \lambda\theta)` regrouped, as the
    authors' PyTorch code does), and the interpolations round as ``torch.lerp``.
    State: ``exp_avg`` (:math:`m`); there is no step counter.
    """

    _kernel = "lion"
    _hyperparameters = ("lr", "betas", "weight_decay", "maximize")
    _state_keys = ("exp_avg",)
    _step_counter = False
    _flag_defaults = {"maximize": False}

    def __init__(self, params: ParamsT, lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 state_dtype: Optional[str] = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        self._check_group(defaults)
        super().__init__(params, defaults)
        _compressed.set_options(self, state_dtype=state_dtype, master_weights=master_weights,
                                stochastic_rounding=stochastic_rounding,
                                rounding_seed=rounding_seed, min_8bit_size=min_8bit_size)

    def _check_group(self, group):
        _check_nonneg(group, "lr")
        _check_betas(group["betas"])
        _check_nonneg(group, "weight_decay")
