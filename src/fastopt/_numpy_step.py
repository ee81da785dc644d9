"""The parts shared by the optimizers whose step is written in NumPy (Adafactor, Muon, and
SparseAdam's checks): phase 1 of a step, which checks every hyperparameter, parameter,
gradient and state array and creates the state of new parameters, raising before anything
is modified, and torch's ``lerp``.

Parameters that are foreign arrays (torch tensors) are marked updated (their autograd
version counter bumped) only once the checks passed, never by a step that raises in them."""
import contextlib
import numbers
import signal
import threading

import numpy as np

from fastopt._adapters import (_adapter_for, _foreign_among, _foreign_updated, _param_arrays,
                               _where)
from fastopt.parameter import Parameter, SparseGrad

__all__ = ["check_groups", "check_state_array", "check_step", "commit_state", "freeze",
           "gather", "lerp_", "mark_updated", "new_state", "prepare", "real",
           "signals_deferred"]


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
            if (not isinstance(p, Parameter) and getattr(p, "grad", 0) is None
                    and _adapter_for(p) is not None):
                continue  # a tensor without a gradient is not read (torch's steps skip it)
            arr, g = _param_arrays(p, gi, pi, mark=False)
            if g is None:
                continue
            if isinstance(g, SparseGrad) or getattr(g, "is_sparse", False) is True:
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


def freeze(opt, gi, group, check=None):
    """``opt._freeze(group)``, the frozen copy of ``group`` (hyperparameters as floats and
    bools), after ``check(frozen, group)`` when given; errors name the group. Ranges are
    checked when groups are made."""
    try:
        frozen = opt._freeze(group)
        if check is not None:
            check(frozen, group)
    except (ValueError, TypeError, OverflowError) as e:
        raise type(e)(f"param_groups[{gi}]: {e}") from None
    return frozen


def real(value, key):
    """``value`` as a float: a real number or a 1-element array, else TypeError naming
    ``key`` (the rule of ``Optimizer._freeze``)."""
    if type(value) is float:
        return value
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise TypeError(f"{key} must be a number or a 1-element array, got an array of "
                            f"shape {value.shape}")
        value = value.reshape(())[()]
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{key} must be a real number, got {value!r}")
    return float(value)


def check_groups(opt, name, check_state, check_group=None, check_param=None, state=None):
    """The checks of phase 1 of a step of the optimizer ``opt`` called ``name``: ``gather``,
    ``freeze`` every group (with ``check_group(frozen, group)``), then for every parameter with a
    grad ``check_param(frozen, array, where)`` and, when its state is not empty,
    ``check_state(state, array, where)``. Every group is checked before any state is.
    ``state`` is the mapping of parameter states to check (default ``opt.state``).
    Returns (the frozen groups, ``gather``'s lists)."""
    state = opt.state if state is None else state
    groups = gather(opt, name)
    frozen = [freeze(opt, gi, group, check_group) for gi, group in enumerate(opt.param_groups)]
    for gi, items in enumerate(groups):
        for pi, p, arr, _ in items:
            where = _where(gi, pi)
            if check_param is not None:
                check_param(frozen[gi], arr, where)
            st = state.get(p)
            if st is not None and not isinstance(st, dict):
                raise TypeError(f"{where}: optimizer.state entry must be a dict, got "
                                f"{type(st).__name__}")
            if st:
                check_state(st, arr, where)
    return frozen, groups


def new_state(opt, frozen, groups, needs_state, check_state, state=None):
    """The state of the parameters that step for the first time, created but not stored:
    ``{id(param): (param, dict)}`` filled by ``opt._init_state(dict, array, frozen group)``
    for every parameter whose state (in ``state``, default ``opt.state``) ``needs_state``,
    each checked with ``check_state``. An error here (a MemoryError) leaves the state as it
    was; ``commit_state`` stores it."""
    state = opt.state if state is None else state
    out = {}
    for gi, items in enumerate(groups):
        for pi, p, arr, _ in items:
            if id(p) in out:  # listed twice: one state
                continue
            st = state.get(p)
            if st is None or needs_state(st):
                fresh = {}
                opt._init_state(fresh, arr, frozen[gi])
                check_state({**(st or {}), **fresh}, arr, _where(gi, pi))
                out[id(p)] = (p, fresh)
    return out


def commit_state(opt, created, state=None):
    """Store ``new_state``'s dicts in ``state`` (default ``opt.state``): merged into the
    parameter's state dict (kept if one exists). Only dict updates, which cannot fail
    halfway."""
    state = opt.state if state is None else state
    for p, fresh in created.values():
        state.setdefault(p, {}).update(fresh)


def prepare(opt, name, check_state, needs_state, check_group=None, check_param=None, *,
            state=None, mark=True):
    """Phase 1 of a step: ``check_groups``, then the state of new parameters created for
    all of them or for none (``new_state``, ``commit_state``), in ``state`` (default
    ``opt.state``). Nothing is modified when it raises.

    With ``mark`` the foreign parameters with a gradient are then marked updated (the
    update that follows runs to its end, signals deferred); with ``mark=False`` the caller
    calls ``mark_updated`` after its update. Returns (the frozen groups, ``gather``'s
    lists)."""
    frozen, groups = check_groups(opt, name, check_state, check_group, check_param, state)
    commit_state(opt, new_state(opt, frozen, groups, needs_state, check_state, state), state)
    if mark:
        mark_updated(groups)
    return frozen, groups


def mark_updated(groups):
    """Mark the foreign parameters of ``gather``'s lists as updated in place, in one call
    (torch tensors: their autograd version counters are bumped)."""
    foreign = _foreign_among([p for items in groups for _, p, _, _ in items])
    if foreign:
        _foreign_updated(foreign)


def check_state_array(value, shape, dtype, where, key):
    """Raise ValueError unless ``value`` is a writable ``dtype`` array of ``shape``."""
    if not isinstance(value, np.ndarray) or value.shape != tuple(shape) or value.dtype != dtype \
            or not value.flags.writeable:
        desc = (f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray)
                else type(value).__name__)
        raise ValueError(f"{where}: state[{key!r}] must be a writable {dtype} array of shape "
                         f"{tuple(shape)}, got {desc}")


def check_step(value, where):
    """Raise TypeError unless ``value`` is a writable 0-d float32 array (torch's counter)."""
    if not (isinstance(value, np.ndarray) and value.dtype == np.float32 and value.ndim == 0
            and value.flags.writeable):
        raise TypeError(f"{where}: state['step'] must be a writable 0-d float32 array, got "
                        f"{value!r}")


def lerp_(s, e, w):
    """In place s = lerp(s, e, w), with torch's two formulas (split at w = 0.5)."""
    if abs(w) < 0.5:
        s += w * (e - s)
    else:
        s[...] = e - (e - s) * (type(w)(1) - w)


@contextlib.contextmanager
def signals_deferred():
    """Hold back Python signal handlers (Ctrl-C's KeyboardInterrupt included) while the
    block runs, and run the held ones, in order, when it ends: an update written in NumPy
    is then never stopped half-way through its groups by an exception from a handler.

    Python runs signal handlers only in the main thread, so elsewhere this does nothing.
    Signals whose handler is not a Python function (ignored, default, set from C) are left
    alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held, saved = [], {}

    def hold(signum, frame):
        held.append((signum, frame))

    try:
        for sig in signal.valid_signals():
            handler = signal.getsignal(sig)
            if callable(handler):
                saved[sig] = handler
                signal.signal(sig, hold)
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for signum, frame in held:
            saved[signum](signum, frame)
