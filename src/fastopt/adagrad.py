"""Adagrad."""
from __future__ import annotations

from typing import Optional

import numpy as np

from fastopt._adapters import _foreign_arrays
from fastopt import _compressed
from fastopt._typing import ParamsT
from fastopt.optimizer import Optimizer, _check_impl_flags, _check_nonneg

__all__ = ["Adagrad"]


class Adagrad(Optimizer):
    r"""Adagrad, as ``torch.optim.Adagrad``.

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta, \qquad
        \tilde\gamma = \gamma / (1 + (t - 1)\,\eta) \\
        s &\leftarrow s + g^2, \qquad
        \theta \leftarrow \theta - \tilde\gamma\, g / (\sqrt{s} + \epsilon)

    Parameters
    ----------
    params : iterable
        Parameters or parameter-group dicts.
    lr : float, default 1e-2
        Learning rate :math:`\gamma`.
    lr_decay : float, default 0
        Learning-rate decay :math:`\eta`.
    weight_decay : float, default 0
        L2 penalty :math:`\lambda`.
    initial_accumulator_value : float, default 0
        Starting value of the sum of squares :math:`s`.
    eps : float, default 1e-10
        Added to the square root of :math:`s`.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.
    foreach, differentiable, fused : optional
        Accepted and ignored, as in :class:`~fastopt.optimizer.Optimizer`.
    state_dtype, master_weights, stochastic_rounding, rounding_seed, min_8bit_size : optional
        Keyword-only, fastopt's own: how the state and 16-bit parameters are stored
        (bfloat16 or 8-bit block-wise state, float32 master weights, stochastic rounding);
        see :ref:`compressed-state`. At their defaults the state is torch's.

    Notes
    -----
    As torch, the state (``step`` and ``sum``) is created by the constructor for every
    parameter. Parameters added later with ``add_param_group`` are started lazily from the
    *constructor's* ``initial_accumulator_value``; a per-group value is never used (torch's
    behaviour, kept for parity).
    """

    _kernel = "adagrad"
    # lr_tensor is not a group key: the freeze adds it (32 for a float32 torch tensor lr)
    _hyperparameters = ("lr", "lr_decay", "weight_decay", "eps", "maximize", "lr_tensor")
    _state_keys = ("sum",)
    # a negative lr_decay can make 1 + (step - 1) * lr_decay zero; torch then raises
    # ZeroDivisionError halfway through a step, fastopt refuses before it
    _nonneg_at_step = ("lr_decay",)
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "fused": None}

    def __init__(self, params: ParamsT, lr: float = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: Optional[bool] = None, *, maximize: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 state_dtype: Optional[str] = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096) -> None:
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, fused=fused)
        self._check_group(defaults)
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        _check_impl_flags(defaults)
        _compressed.set_options(self, state_dtype=state_dtype, master_weights=master_weights,
                                stochastic_rounding=stochastic_rounding,
                                rounding_seed=rounding_seed, min_8bit_size=min_8bit_size)

    def _check_group(self, group):
        _check_nonneg(group, "lr", "lr_decay", "weight_decay", "initial_accumulator_value",
                      "eps")

    def _on_new_group(self, group):
        if getattr(self, "_constructing", False):
            value = self.defaults["initial_accumulator_value"]
            for p in group["params"]:
                array = np.asarray(p) if isinstance(p, np.ndarray) else _foreign_arrays(p)
                state = self.state[p]
                if len(state) == 0:
                    self._fill(state, array, value)

    @staticmethod
    def _fill(state, array, value):
        state["step"] = np.array(0.0, dtype=np.float32)
        state["sum"] = np.full(array.shape, value, dtype=array.dtype)

    def _init_state(self, state, array, group):
        self._fill(state, array, self.defaults["initial_accumulator_value"])

