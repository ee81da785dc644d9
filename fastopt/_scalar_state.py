"""Checks of 0-d scalar state (NAdam's mu_product, ASGD's eta and mu) before a step."""
from fastopt import _kernels

__all__ = ["check_scalar_state"]


def check_scalar_state(opt, keys):
    """Raise before any update if a parameter about to step has unusable scalar state."""
    _kernels.check_scalar_state(opt.param_groups, opt.state, tuple(keys))
