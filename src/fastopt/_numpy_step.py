"""The parts shared by the optimizers whose step is written in NumPy (Adafactor, Muon, and
SparseAdam's checks): phase 1 of a step, which checks every hyperparameter, parameter,
gradient and state array and raises before anything is modified, and torch's ``lerp``."""
import numpy as np

from fastopt._adapters import _param_arrays, _where
from fastopt.parameter import SparseGrad

__all__ = ["check_groups", "check_state_array", "check_step", "freeze", "gather", "lerp_"]


def gather(opt, name):
    """Per group, the list of (param index, param object, array, grad array) of the
    parameters with a grad.

    Every parameter must be a float32/float64 array (Parameter or adapted tensor) and its
    grad a dense array of the same shape and dtype; anything else raises TypeError,
    ValueError or (sparse gradients, as torch) RuntimeError naming group and parameter."""
    out = []
    for gi, group in enumerate(opt.param_groups):
        items = []
        for pi, p in enumerate(group["params"]):
            arr, g = _param_arrays(p, gi, pi)
            if g is None:
                continue
            if isinstance(g, SparseGrad):
                raise RuntimeError(f"{_where(gi, pi)}: {name} does not support sparse "
                                   f"gradients")
            if not isinstance(g, np.ndarray):
                raise TypeError(f"{_where(gi, pi)}: .grad must be a numpy.ndarray or None, "
                                f"got {type(g).__name__}")
            if arr.dtype not in (np.float32, np.float64):
                raise TypeError(f"{_where(gi, pi)}: {name} optimizes float32 and float64 "
                                f"arrays, got {arr.dtype}")
            if g.dtype != arr.dtype:
                raise TypeError(f"{_where(gi, pi)}: .grad has dtype {g.dtype}, the parameter "
                                f"{arr.dtype}")
            if g.shape != arr.shape:
                raise ValueError(f"{_where(gi, pi)}: .grad has shape {g.shape}, the parameter "
                                 f"{arr.shape}")
            if not arr.flags.writeable:
                raise ValueError(f"{_where(gi, pi)}: the parameter's array is read-only")
            items.append((pi, p, arr, g))
        out.append(items)
    return out


def freeze(opt, gi, group):
    """Check the types of ``group``'s hyperparameters (``opt._freeze``), the error naming
    the group. Ranges are checked when groups are made."""
    try:
        opt._freeze(group)
    except (ValueError, TypeError, OverflowError) as e:
        raise type(e)(f"param_groups[{gi}]: {e}") from None


def check_groups(opt, name, check_state):
    """Phase 1 of a step of the optimizer ``opt`` called ``name``: ``gather``, then per
    group ``freeze`` and ``check_state(state, array, where)`` for every parameter with a
    grad and a non-empty state. Returns ``gather``'s lists."""
    groups = gather(opt, name)
    for gi, (group, items) in enumerate(zip(opt.param_groups, groups)):
        freeze(opt, gi, group)
        for pi, p, arr, _ in items:
            st = opt.state.get(p)
            if st:
                check_state(st, arr, _where(gi, pi))
    return groups


def check_state_array(value, shape, dtype, where, key):
    """Raise ValueError unless ``value`` is a writable ``dtype`` array of ``shape``."""
    if not isinstance(value, np.ndarray) or value.shape != tuple(shape) or value.dtype != dtype \
            or not value.flags.writeable:
        desc = (f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray)
                else type(value).__name__)
        raise ValueError(f"{where}: state[{key!r}] must be a writable {dtype} array of shape "
                         f"{tuple(shape)}, got {desc}")


def check_step(value, where):
    """Raise TypeError unless ``value`` is a writable float32 array of one element."""
    if not (isinstance(value, np.ndarray) and value.dtype == np.float32 and value.size == 1
            and value.flags.writeable):
        raise TypeError(f"{where}: state['step'] must be a writable 0-d float32 array, got "
                        f"{value!r}")


def lerp_(s, e, w):
    """In place s = lerp(s, e, w), with torch's two formulas (split at w = 0.5)."""
    if abs(w) < 0.5:
        s += w * (e - s)
    else:
        s[...] = e - (e - s) * (type(w)(1) - w)
