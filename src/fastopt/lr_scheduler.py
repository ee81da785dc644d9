"""Learning-rate schedulers for fastopt optimizers, with torch.optim.lr_scheduler's contract.

Every class here has the name, signature and numbers of its PyTorch 2.13 counterpart.
Scheduler arithmetic is plain Python doubles.  Most schedulers have two forms, which round
differently in the last bits, so both are kept exactly as torch evaluates them:

* the *chainable* form used by ``step()``: the new lr is computed from the **current**
  ``group["lr"]``, so several schedulers (and user edits) compose multiplicatively;
* the *closed* form used by the deprecated ``step(epoch)``: a function of ``base_lrs`` and
  ``last_epoch`` only.

A scheduler writes ``initial_lr`` into each param group the first time one is built on an
optimizer, keeps ``base_lrs``, and performs one initial step while constructing (so
``last_epoch`` is 0 afterwards).  It replaces the optimizer's ``step`` attribute with a
wrapper that records the call, to warn when ``scheduler.step()`` comes first.

``FunctionLR`` drives an optimizer with any function of the step, such as those in
:mod:`fastopt.schedules`.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import types
import warnings
import weakref
from bisect import bisect_right
from collections import Counter
from typing import (Any, Callable, Dict, Iterable, List, Optional, Sequence, SupportsFloat, Tuple,
                    Union)

import numpy as np

from fastopt.optimizer import Optimizer

__all__ = [
    "EPOCH_DEPRECATION_WARNING",
    "SCHEDULERS",
    "ChainedScheduler",
    "ConstantLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "ExponentialLR",
    "FunctionLR",
    "LRScheduler",
    "LambdaLR",
    "LinearLR",
    "MultiStepLR",
    "MultiplicativeLR",
    "OneCycleLR",
    "PolynomialLR",
    "ReduceLROnPlateau",
    "SequentialLR",
    "StepLR",
    "_LRScheduler",
]

# Key added to every state_dict so that a dict from another scheduler class is refused.
# Dicts without it (for example written by torch) are accepted when their keys match.
_CLASS_KEY = "_scheduler_class"

# The texts of the warnings and errors are torch's, word for word: filters such as
# ``warnings.filterwarnings(message=...)`` and ``pytest.raises(match=...)`` written against
# torch.optim.lr_scheduler apply to these schedulers unchanged.

#: The warning of the deprecated ``step(epoch)``.
EPOCH_DEPRECATION_WARNING = (
    "The epoch parameter in `scheduler.step()` was not necessary and is being "
    "deprecated where possible. Please use `scheduler.step()` to step the "
    "scheduler. During the deprecation, if epoch is different from None, the "
    "closed form is used instead of the new chainable form, where available. "
    "Please open an issue if you are unable to replicate your use case: "
    "https://github.com/pytorch/pytorch/issues/new/choose."
)
_WARN_ORDER = (
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`. "
    "In PyTorch 1.1.0 and later, you should call them in the opposite order: "
    "`optimizer.step()` before `lr_scheduler.step()`.  Failure to do this "
    "will result in PyTorch skipping the first value of the learning rate schedule. "
    "See more details at "
    "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate"
)
_WARN_OVERRIDDEN = (
    "Seems like `optimizer.step()` has been overridden after learning rate scheduler "
    "initialization. Please, make sure to call `optimizer.step()` before "
    "`lr_scheduler.step()`. See more details at "
    "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate"
)
_WARN_GET_LR = (
    "To get the last learning rate computed by the scheduler, please use `get_last_lr()`."
)


# --------------------------------------------------------------------------- helpers


def _copy_value(value):
    """A copy of a group value that cannot alias the group (0-d array lrs)."""
    return value.copy() if isinstance(value, np.ndarray) else value


def _group_values(optimizer, key):
    return [_copy_value(group[key]) for group in optimizer.param_groups]


def _set_group_value(group, key, value):
    """Write ``value`` into ``group[key]``; an array lr is filled in place, keeping identity."""
    current = group[key]
    if isinstance(current, np.ndarray):
        current[...] = value
    else:
        group[key] = value


def _per_group(name, optimizer, value):
    """``value`` broadcast to one entry per param group, or checked when it is a sequence."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"{name} must have the same length as optimizer.param_groups. "
                f"{name} has {len(value)} values, param_groups has {n}."
            )
        return [_copy_value(v) for v in value]
    return [_copy_value(value)] * n


def _pairs(groups, values, what="learning rates"):
    """``zip(groups, values)``, or ValueError with the text of torch's ``zip(strict=True)``
    (and what the lists are) when their lengths differ."""
    groups = list(groups)
    values = list(values)
    if len(groups) != len(values):
        raise ValueError(
            f"zip() argument 2 is {'shorter' if len(values) < len(groups) else 'longer'} than "
            f"argument 1: the scheduler computed {len(values)} {what} for {len(groups)} param "
            "groups; param groups added after the scheduler was built are not known to it"
        )
    return zip(groups, values)


def _require_real(name, value):
    """TypeError naming ``name`` unless ``value`` is a real number: torch compares such
    arguments with a number before it checks their type, and the comparison fails."""
    if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {_shown(value)}")


def _check_optimizer(optimizer):
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")


def _callables_state(fns):
    """torch's rule: plain functions (lambdas) are not saved, callable objects' __dict__ is."""
    return [
        None if isinstance(fn, types.FunctionType) else copy.deepcopy(fn.__dict__) for fn in fns
    ]


def _check_callables_state(saved, key):
    for i, state in enumerate(saved):
        if state is not None and not isinstance(state, dict):
            raise TypeError(f"state_dict[{key!r}][{i}] must be None or the __dict__ of a "
                            f"callable object, got {type(state).__name__}")


def _restore_callables(fns, saved):
    for fn, state in zip(fns, saved):
        if state is not None:
            fn.__dict__.update(copy.deepcopy(state))


def _mark_optimizer_step(optimizer):
    """Replace the instance's ``step`` by a wrapper setting ``optimizer._opt_called = True``.

    Done once per optimizer (the wrapper carries ``_wrapped_by_lr_sched``).  The wrapper holds
    the optimizer weakly so the optimizer and its scheduler do not form a cycle through it.
    """
    original = optimizer.step
    if hasattr(original, "_wrapped_by_lr_sched"):
        return
    unbound = getattr(original, "__func__", None)
    opt_ref = weakref.ref(optimizer)

    if unbound is not None:

        def call(opt, args, kwargs):
            return unbound(opt, *args, **kwargs)

    else:  # already a plain callable stored on the instance

        def call(opt, args, kwargs):
            return original(*args, **kwargs)

    def step(*args, **kwargs):
        opt = opt_ref()
        opt._opt_called = True
        return call(opt, args, kwargs)

    functools.update_wrapper(step, unbound if unbound is not None else original)
    step._wrapped_by_lr_sched = True
    optimizer.step = step


class _Flag:
    """Set a boolean attribute for the duration of a ``with`` block."""

    def __init__(self, obj, name):
        self.obj = obj
        self.name = name

    def __enter__(self):
        setattr(self.obj, self.name, True)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, False)


# --------------------------------------------------------------------------- state checks


def _is_real(value):
    """A real number: int, float or NumPy number, or a 1-element numeric array (bools and
    strings are not)."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    return (isinstance(value, np.ndarray) and value.size == 1
            and value.dtype.kind in "iuf")


def _shown(value):
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _check_real(value, path, finite=True, integer=False, minimum=None):
    """Raise TypeError unless ``value`` is a real number (an int with ``integer``), and
    ValueError for NaN (with ``finite``, for infinities too) or a value below ``minimum``."""
    if integer:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{path} must be an int, got {_shown(value)}")
    elif not _is_real(value):
        raise TypeError(f"{path} must be a real number, got {_shown(value)}")
    x = float(np.asarray(value).reshape(()))
    if x != x or (finite and not math.isfinite(x)):
        raise ValueError(f"{path} must be finite, got {x}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{path} must be >= {minimum}, got {value!r}")


#: state entries that hold one value per param group
_PER_GROUP = frozenset({"base_lrs", "_last_lr", "max_lrs", "base_momentums", "max_momentums",
                        "min_lrs"})
#: counters and positions in the schedule: finite numbers (ints where marked)
_COUNTERS = {"last_epoch": {}, "_step_count": {"integer": True, "minimum": 0},
             "T_cur": {}, "T_i": {}, "T_0": {"integer": True, "minimum": 1},
             "T_mult": {"integer": True, "minimum": 1},
             "total_steps": {"integer": True, "minimum": 1},
             "total_size": {}, "step_ratio": {}, "anneal_epochs": {"integer": True, "minimum": 0},
             "cooldown_counter": {"minimum": 0}, "num_bad_epochs": {"minimum": 0}}
#: entries that may be None where the scheduler holds a value, and the other way round
_NULLABLE = frozenset({"default_min_lr"})
#: string entries with a fixed set of values
_CHOICES = {"mode": None, "threshold_mode": ("rel", "abs"), "scale_mode": ("cycle", "iterations"),
            "_anneal_func_type": ("cos", "linear"), "_anneal_strategy": ("cos", "linear")}


def _check_like(current, value, key, path, n_groups):
    """Raise TypeError or ValueError unless the saved ``value`` of entry ``key`` can stand
    where the scheduler now holds ``current``: the same kind of value, finite counters, and in
    the per-group lists finite numbers, from one up to one per param group of the optimizer.

    A per-group list may be shorter than the optimizer's param groups: a scheduler built
    before ``add_param_group`` holds values only for the groups it was made for, and torch
    loads its state into a scheduler built over all the groups. Where ``step()`` pairs a list
    one to one with the groups, :meth:`LRScheduler._check_paired` asks for more. A list that
    is empty or longer than the optimizer's groups cannot come from a scheduler of this
    optimizer (groups are only ever added), so it is refused, unless it has the length the
    scheduler holds now (its own state always loads back)."""
    if key in _COUNTERS:
        _check_real(value, path, **_COUNTERS[key])
        return
    if key in _PER_GROUP:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{path} must be a list with one value per param group, got "
                            f"{_shown(value)}")
        own = len(current) if isinstance(current, (list, tuple)) else None
        if not 1 <= len(value) <= n_groups and len(value) != own:
            raise ValueError(f"{path} has {len(value)} values, the optimizer has {n_groups} "
                             f"param groups (a scheduler holds one value per group it was "
                             f"made for: 1 to {n_groups} values)")
        for i, v in enumerate(value):
            _check_real(v, f"{path}[{i}]")
        return
    if current is None or (value is None and key in _NULLABLE):
        return
    if isinstance(current, (bool, np.bool_)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{path} must be a bool, got {_shown(value)}")
    elif _is_real(current):
        _check_real(value, path, finite=False)
    elif isinstance(current, str):
        if not isinstance(value, str):
            raise TypeError(f"{path} must be a str, got {_shown(value)}")
        choices = _CHOICES.get(key)
        if choices is not None and value not in choices:
            raise ValueError(f"{path} must be one of {choices}, got {value!r}")
    elif isinstance(current, dict):
        if not isinstance(value, dict):
            raise TypeError(f"{path} must be a dict, got {_shown(value)}")
    elif isinstance(current, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{path} must be a list, got {_shown(value)}")


class _StateDictKeyError(ValueError, KeyError):
    """A state_dict without a key the scheduler needs, or with one it does not know.

    A ValueError, and a KeyError as torch's ``load_state_dict`` raises for the keys it pops
    (``lr_lambdas``, ``_schedulers``, ``_scale_fn_custom``); its text is not quoted."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class _StateDictIndexError(ValueError, IndexError):
    """More entries in a state_dict list than the scheduler has callables or sub-schedulers
    (a ValueError, and an IndexError as torch raises indexing its own list)."""


def _check_entries(state_dict, key, n, what):
    """Raise unless ``state_dict[key]`` is a list of ``n`` entries: TypeError for no list,
    ``_StateDictIndexError`` for a longer one (torch fails indexing its own list),
    ValueError for a shorter one (torch leaves the last ones as they were)."""
    saved = state_dict[key]
    if not isinstance(saved, (list, tuple)):
        raise TypeError(f"state_dict[{key!r}] must be a list of {n} {what}, got "
                        f"{_shown(saved)}")
    if len(saved) != n:
        error = _StateDictIndexError if len(saved) > n else ValueError
        raise error(f"state_dict[{key!r}] must hold {n} {what}, got {len(saved)}")


class _AllOrNothing:
    """What a scheduler's ``step()`` may change, to restore when it raises: the attributes
    of the scheduler and of its sub-schedulers, and the entries of the optimizer's param
    groups (arrays, such as 0-d lrs, restored in place)."""

    def __init__(self, sched):
        self.scheds = []
        self._take(sched)
        opt = sched.__dict__.get("optimizer")
        groups = getattr(opt, "param_groups", None) or ()
        self.groups = [(g, dict(g), {k: v.copy() for k, v in g.items()
                                     if isinstance(v, np.ndarray)}) for g in groups]

    def _take(self, sched):
        self.scheds.append((sched, dict(sched.__dict__)))
        for sub in sched.__dict__.get("_schedulers", ()):
            if hasattr(sub, "__dict__"):
                self._take(sub)

    def restore(self):
        for sched, saved in self.scheds:
            sched.__dict__.clear()
            sched.__dict__.update(saved)
        for group, saved, arrays in self.groups:
            group.clear()
            group.update(saved)
            for key, copy_ in arrays.items():
                saved[key][...] = copy_


def _all_or_nothing(step):
    """Wrap a scheduler's ``step`` so that an exception leaves the scheduler and the
    optimizer's param groups as they were before it."""

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        saved = _AllOrNothing(self)
        try:
            return step(self, *args, **kwargs)
        except BaseException:
            saved.restore()
            raise

    wrapper._all_or_nothing = True
    return wrapper


# --------------------------------------------------------------------------- base class


class LRScheduler:
    """Base class: adjusts ``group["lr"]`` of every param group once per ``step()``.

    Parameters
    ----------
    optimizer : fastopt.optimizer.Optimizer
    last_epoch : int, default -1
        Index of the last epoch done.  -1 starts fresh (writing ``initial_lr`` into every group);
        ``k >= 0`` resumes, and then every group must already hold ``initial_lr``.

    Subclasses implement ``get_lr()`` (chainable form) and optionally
    ``_get_closed_form_lr()`` (used by the deprecated ``step(epoch)``).
    """

    _get_lr_called_within_step = False
    _is_initial = False
    # attributes never written to a state_dict
    _not_saved: Tuple[str, ...] = ("optimizer",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "_all_or_nothing", False):
            cls.step = _all_or_nothing(step)

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", _copy_value(group["lr"]))
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param 'initial_lr' is not specified in param_groups[{i}] when "
                        "resuming scheduler with last_epoch >= 0.\n"
                        "This typically happens when:\n"
                        "1. You're trying to resume training from a checkpoint but haven't "
                        "properly loaded the optimizer state\n"
                        "2. You're using last_epoch >= 0 for a fresh training run (not "
                        "recommended)"
                    )
        self.base_lrs = _group_values(optimizer, "initial_lr")
        self.last_epoch = last_epoch
        _mark_optimizer_step(optimizer)
        self._initial_step()

    def _initial_step(self):
        self._step_count = 0
        with _Flag(self, "_is_initial"):
            self.step()

    # -- stepping

    def get_lr(self) -> List[float]:
        """Learning rates for the current ``last_epoch`` (chainable form)."""
        raise NotImplementedError(f"{type(self).__name__} does not define get_lr()")

    def _warn_outside_step(self):
        # reported at the line of get_lr() here, as torch reports it in its own module
        if not self._get_lr_called_within_step:
            warnings.warn(_WARN_GET_LR, UserWarning, stacklevel=2)

    def get_last_lr(self) -> List[float]:
        """The learning rates written by the last ``step()``, one per param group."""
        return self._last_lr

    def step(self, epoch: Optional[float] = None) -> None:
        """Advance one epoch (or jump to ``epoch``, deprecated) and write the new lrs.

        All or nothing, in every scheduler class: when it raises (an ``lr_lambda`` that
        fails, a OneCycleLR stepped past ``total_steps``), the counters, ``get_last_lr()``
        and the optimizer's param groups are left as they were (torch has already advanced
        ``last_epoch``). State kept by the user's own callables is not restored."""
        # stacklevel 3: reported at the caller of step(), past the all-or-nothing wrapper
        if self._step_count == 1:
            if not hasattr(self.optimizer.step, "_wrapped_by_lr_sched"):
                warnings.warn(_WARN_OVERRIDDEN, UserWarning, stacklevel=3)
            elif not getattr(self.optimizer, "_opt_called", False):
                warnings.warn(_WARN_ORDER, UserWarning, stacklevel=3)
        self._step_count += 1
        if epoch is not None:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=3)
        self._update_lr(epoch)

    def _update_lr(self, epoch=None):
        with _Flag(self, "_get_lr_called_within_step"):
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed = getattr(self, "_get_closed_form_lr", None)
                values = closed() if closed is not None else self.get_lr()
        for group, lr in _pairs(self.optimizer.param_groups, values):
            _set_group_value(group, "lr", lr)
        self._last_lr = _group_values(self.optimizer, "lr")

    # -- checkpointing

    def _state_items(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._not_saved}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume, as a plain dict (the optimizer is not included).

        The keys are those of torch's scheduler of the same name, plus ``"_scheduler_class"``.
        """
        state = copy.deepcopy(self._state_items())
        state[_CLASS_KEY] = type(self).__name__
        return state

    def _check_state_dict(self, state_dict):
        """Raise if ``state_dict`` cannot be loaded; changes nothing."""
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"state_dict must be a dict, got {type(state_dict).__name__}"
            )
        name = type(self).__name__
        source = state_dict.get(_CLASS_KEY, name)
        if source != name:
            raise ValueError(
                f"cannot load a state_dict saved by {source} into {name}"
            )
        expected = set(self.state_dict())
        given = set(state_dict) | {_CLASS_KEY}
        missing = sorted(expected - given)
        unexpected = sorted(given - expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise _StateDictKeyError(
                f"state_dict does not match {name}: " + "; ".join(parts)
            )
        n_groups = len(self.optimizer.param_groups)
        for key, value in state_dict.items():
            if key not in self._not_checked:
                _check_like(self.__dict__.get(key), value, key, f"state_dict[{key!r}]",
                            n_groups)
        self._check_paired(state_dict, n_groups)

    #: per-group lists that ``step()`` pairs one to one with the param groups, or with each
    #: other: torch zips them with ``strict=True`` and fails at a later step, after its
    #: counters have moved, when their lengths differ
    _paired: Tuple[str, ...] = ()

    def _paired_lengths(self, n_groups):
        """The lengths the lists of ``_paired`` may have, and what they are paired with: the
        optimizer's param groups, or the length the scheduler holds now (a scheduler built
        before ``add_param_group``, which cannot step the added group in torch either)."""
        own = self.__dict__.get(self._paired[0])
        own = len(own) if isinstance(own, (list, tuple)) else n_groups
        return {n_groups, own}, f"the optimizer's {n_groups} param groups"

    def _check_paired(self, state_dict, n_groups):
        """Raise ValueError unless the saved lists of ``_paired`` have one length that
        ``_paired_lengths`` allows."""
        keys = [key for key in self._paired if key in state_dict]
        if not keys:
            return
        allowed, what = self._paired_lengths(n_groups)
        name = type(self).__name__
        for key in keys:
            if len(state_dict[key]) not in allowed:
                raise ValueError(
                    f"state_dict[{key!r}] has {len(state_dict[key])} values, but {name} pairs "
                    f"it one to one with {what} (torch loads such a state and fails at a "
                    "later step)")
        first = keys[0]
        for key in keys[1:]:
            if len(state_dict[key]) != len(state_dict[first]):
                raise ValueError(
                    f"state_dict[{key!r}] has {len(state_dict[key])} values and "
                    f"state_dict[{first!r}] {len(state_dict[first])}: {name} pairs them one to "
                    "one (torch loads such a state and fails at a later step)")

    #: entries that ``_check_state_dict`` of a subclass checks itself
    _not_checked = (_CLASS_KEY, "lr_lambdas", "schedules", "_schedulers", "_scale_fn_custom")

    def _apply_state_dict(self, state_dict):
        for key, value in state_dict.items():
            if key != _CLASS_KEY:
                self.__dict__[key] = copy.deepcopy(value)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict()`` of the same class.

        Everything is checked before anything changes: ``ValueError`` for a dict from
        another scheduler class or with missing or unexpected keys (a ``KeyError`` too, as
        torch raises for a missing ``lr_lambdas``, ``_schedulers`` or ``_scale_fn_custom``;
        a ``mode`` or ``threshold_mode`` of ReduceLROnPlateau that does not exist has torch's
        text), ``TypeError`` or
        ``ValueError`` naming the entry for a value that is not what the scheduler holds
        there: counters (``last_epoch``, ``_step_count``, ...) that are no finite numbers,
        per-group lists (``base_lrs``, ``_last_lr``, ...) that hold no finite numbers, a
        string, bool, list or dict where the scheduler holds another kind of value, a mode
        that does not exist. torch loads all of these, and its next ``step()`` writes
        ``lr = nan`` or fails after its counters have moved.

        A per-group list may hold fewer values than the optimizer has param groups, as the
        state of a scheduler built before ``add_param_group`` does: it loads, as in torch,
        and the next steps are torch's (a chainable ``step()`` follows every group; the
        deprecated ``step(epoch)``, whose closed form reads ``base_lrs``, raises
        ``ValueError`` and changes nothing, where torch raises after writing the first
        groups). Refused with ``ValueError``, as lists no scheduler of this optimizer holds:
        an empty list, or one longer than the optimizer's param groups (torch loads these).
        Where ``step()`` pairs a list one to one with the param groups (``base_lrs`` of
        CosineAnnealingLR and CosineAnnealingWarmRestarts; ``base_lrs``, ``max_lrs`` and the
        momenta of CyclicLR) or with the ``lr_lambdas`` (LambdaLR), it must have that length
        or the one the scheduler holds now: torch loads any other and fails at a later step.
        The scheduler's own ``state_dict()`` always loads back.
        """
        self._check_state_dict(state_dict)
        self._apply_state_dict(state_dict)

    def __repr__(self):
        return f"{type(self).__name__}(last_epoch={getattr(self, 'last_epoch', None)})"


LRScheduler.step = _all_or_nothing(LRScheduler.step)
_LRScheduler = LRScheduler


# --------------------------------------------------------------------------- lambda-based


class _LambdaBase(LRScheduler):
    _not_saved = ("optimizer", "lr_lambdas")

    def __init__(self, optimizer: Optimizer,
                 lr_lambda: Union[Callable[[int], float], List[Callable[[int], float]]],
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"Expected {n} lr_lambdas, but got {len(lr_lambda)}")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * n
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(
                    f"lr_lambda should be a function, but got {type(fn).__name__}"
                )
        super().__init__(optimizer, last_epoch)

    def state_dict(self):
        state = super().state_dict()
        state["lr_lambdas"] = _callables_state(self.lr_lambdas)
        return state

    def _check_state_dict(self, state_dict):
        super()._check_state_dict(state_dict)
        _check_entries(state_dict, "lr_lambdas", len(self.lr_lambdas), "entries")
        _check_callables_state(state_dict["lr_lambdas"], "lr_lambdas")

    def _apply_state_dict(self, state_dict):
        rest = {k: v for k, v in state_dict.items() if k != "lr_lambdas"}
        super()._apply_state_dict(rest)
        _restore_callables(self.lr_lambdas, state_dict["lr_lambdas"])


class LambdaLR(_LambdaBase):
    """``lr = base_lr * lr_lambda(epoch)`` for each group.

    ``lr_lambda`` is a function of the epoch or a list of them, one per group.  In
    ``state_dict()`` plain functions are stored as ``None``; callable objects keep their
    ``__dict__``.  An ``optimizer`` that is not an Optimizer raises torch's TypeError of the
    other classes (torch's LambdaLR and MultiplicativeLR raise AttributeError reading its
    ``param_groups``), and an ``lr_lambda`` that is not callable raises TypeError at once
    (torch's LambdaLR raises it calling the lambda in its initial step).
    """

    _paired = ("base_lrs",)

    def _paired_lengths(self, n_groups):
        n = len(self.lr_lambdas)
        return {n}, f"its {n} lr_lambdas"

    def get_lr(self):
        self._warn_outside_step()
        return [
            base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)
        ]


class MultiplicativeLR(_LambdaBase):
    """``lr = lr * lr_lambda(epoch)`` at every step after the initial one."""

    def get_lr(self):
        self._warn_outside_step()
        if self._is_initial:
            return _group_values(self.optimizer, "lr")
        return [
            group["lr"] * fn(self.last_epoch)
            for fn, group in zip(self.lr_lambdas, self.optimizer.param_groups)
        ]


# --------------------------------------------------------------------------- step decays


class StepLR(LRScheduler):
    """Multiply lr by ``gamma`` every ``step_size`` epochs:
    ``base * gamma**(epoch // step_size)``."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        e = self.last_epoch
        if e == 0 or e % self.step_size != 0:
            return _group_values(self.optimizer, "lr")
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base * self.gamma ** (self.last_epoch // self.step_size) for base in self.base_lrs]


class MultiStepLR(LRScheduler):
    """Multiply lr by ``gamma`` at each milestone (a milestone listed twice counts twice)."""

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.milestones = Counter(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        e = self.last_epoch
        if e not in self.milestones:
            return _group_values(self.optimizer, "lr")
        factor = self.gamma ** self.milestones[e]
        return [group["lr"] * factor for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [base * self.gamma**passed for base in self.base_lrs]


class ConstantLR(LRScheduler):
    """lr scaled by ``factor`` for the first ``total_iters`` epochs, then back to base."""

    def __init__(self, optimizer: Optimizer, factor: float = 1.0 / 3, total_iters: int = 5,
                 last_epoch: int = -1) -> None:
        if factor > 1.0 or factor < 0:
            raise ValueError("Constant multiplicative factor expected to be between 0 and 1. "
                             f"Got factor={factor!r}.")
        self.factor = factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        e = self.last_epoch
        groups = self.optimizer.param_groups
        if e == 0:
            return [group["lr"] * self.factor for group in groups]
        if e != self.total_iters:
            return _group_values(self.optimizer, "lr")
        return [group["lr"] * (1.0 / self.factor) for group in groups]

    def _get_closed_form_lr(self):
        reached = self.last_epoch >= self.total_iters
        return [base * (self.factor + reached * (1 - self.factor)) for base in self.base_lrs]


class LinearLR(LRScheduler):
    """lr factor moving linearly from ``start_factor`` to ``end_factor`` over ``total_iters``."""

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1) -> None:
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError(
                "Starting multiplicative factor expected to be greater than 0 and less or "
                f"equal to 1. Got start_factor={start_factor!r}."
            )
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1. "
                             f"Got end_factor={end_factor!r}.")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        e = self.last_epoch
        groups = self.optimizer.param_groups
        if e == 0:
            return [group["lr"] * self.start_factor for group in groups]
        if self._is_initial or e > self.total_iters:
            return _group_values(self.optimizer, "lr")
        span = self.end_factor - self.start_factor
        # ratio of the factor at e to the factor at e - 1
        ratio = 1.0 + span / (self.total_iters * self.start_factor + (e - 1) * span)
        return [group["lr"] * ratio for group in groups]

    def _get_closed_form_lr(self):
        span = self.end_factor - self.start_factor
        done = min(self.total_iters, self.last_epoch)
        return [
            base * (self.start_factor + span * done / self.total_iters) for base in self.base_lrs
        ]


class ExponentialLR(LRScheduler):
    """``lr = base * gamma**epoch``."""

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self._is_initial:
            return _group_values(self.optimizer, "lr")
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base * self.gamma**self.last_epoch for base in self.base_lrs]


class PolynomialLR(LRScheduler):
    """``lr = base * (1 - min(epoch, total_iters) / total_iters) ** power``."""

    def __init__(self, optimizer: Optimizer, total_iters: int = 5, power: float = 1.0,
                 last_epoch: int = -1) -> None:
        self.total_iters = total_iters
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        e = self.last_epoch
        if self._is_initial or e > self.total_iters:
            return _group_values(self.optimizer, "lr")
        t = self.total_iters
        factor = ((1.0 - e / t) / (1.0 - (e - 1) / t)) ** self.power
        return [group["lr"] * factor for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        t = self.total_iters
        left = 1.0 - min(t, self.last_epoch) / t
        return [base * left**self.power for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """Cosine from base lr down to ``eta_min`` over ``T_max`` epochs (and back up after).

    Closed form ``eta_min + (base - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``; ``step()``
    uses the recursive form, which also follows any other change to the group's lr.
    """

    _paired = ("base_lrs",)

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        e, t, eta = self.last_epoch, self.T_max, self.eta_min
        groups = self.optimizer.param_groups
        if self._is_initial:
            return _group_values(self.optimizer, "lr")
        if self._step_count == 1 and e > 0:
            return [eta + (base - eta) * (1 + math.cos(e * math.pi / t)) / 2
                    for base in self.base_lrs]
        if (e - 1 - t) % (2 * t) == 0:
            # the step out of the minimum, where the ratio below would divide by zero
            return [
                group["lr"] + (base - eta) * (1 - math.cos(math.pi / t)) / 2
                for base, group in zip(self.base_lrs, groups)
            ]
        ratio_num = 1 + math.cos(math.pi * e / t)
        ratio_den = 1 + math.cos(math.pi * (e - 1) / t)
        return [ratio_num / ratio_den * (group["lr"] - eta) + eta for group in groups]

    def _get_closed_form_lr(self):
        eta = self.eta_min
        c = 1 + math.cos(math.pi * self.last_epoch / self.T_max)
        return [eta + (base - eta) * c / 2 for base in self.base_lrs]


class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine annealing restarted every ``T_i`` epochs, ``T_i`` growing by ``T_mult``.

    ``step(epoch)`` accepts fractional epochs and issues no deprecation warning.
    """

    _paired = ("base_lrs",)

    def __init__(self, optimizer: Optimizer, T_0: int, T_mult: int = 1, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        if not isinstance(T_0, int) or T_0 <= 0:
            _require_real("T_0", T_0)
            raise ValueError(f"Expected positive integer T_0, but got {T_0}")
        if not isinstance(T_mult, int) or T_mult < 1:
            _require_real("T_mult", T_mult)
            raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
        if not isinstance(eta_min, (float, int)):
            raise ValueError(  # noqa: TRY004 (torch raises ValueError)
                f"Expected float or int eta_min, but got {eta_min} of type {type(eta_min)}"
            )
        self.T_0 = T_0
        self.T_i = T_0
        self.T_mult = T_mult
        self.eta_min = eta_min
        self.T_cur: float = last_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        eta = self.eta_min
        c = 1 + math.cos(math.pi * self.T_cur / self.T_i)
        return [eta + (base - eta) * c / 2 for base in self.base_lrs]

    def step(self, epoch: Optional[float] = None) -> None:
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        else:
            if epoch < 0:
                raise ValueError(f"Expected non-negative epoch, but got {epoch}")
            if epoch < self.T_0:
                self.T_i = self.T_0
                self.T_cur = epoch
            elif self.T_mult == 1:
                self.T_cur = epoch % self.T_0
            else:
                m = self.T_mult
                # number of whole periods before `epoch`: T_0 (m^n - 1)/(m - 1) <= epoch
                n = int(math.log(epoch / self.T_0 * (m - 1) + 1, m))
                self.T_cur = epoch - self.T_0 * (m**n - 1) / (m - 1)
                self.T_i = self.T_0 * m**n
        self.last_epoch = math.floor(epoch)
        with _Flag(self, "_get_lr_called_within_step"):
            values = self.get_lr()
        for group, lr in _pairs(self.optimizer.param_groups, values):
            _set_group_value(group, "lr", lr)
        self._last_lr = _group_values(self.optimizer, "lr")


# --------------------------------------------------------------------------- cyclic


def _momentum_key_check(optimizer):
    defaults = optimizer.defaults
    if "momentum" not in defaults and "betas" not in defaults:
        raise ValueError(
            "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
        )
    return "betas" in defaults


def _write_momentum(group, value, use_beta1):
    if use_beta1:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group["momentum"] = value


class CyclicLR(LRScheduler):
    """Cyclical learning rate (Smith 2017) between ``base_lr`` and ``max_lr``.

    One cycle is ``step_size_up`` steps up and ``step_size_down`` steps down.  With
    ``cycle_momentum`` the optimizer's ``momentum`` (or Adam's ``betas[0]``) moves the opposite
    way between ``max_momentum`` and ``base_momentum``.  Step it after every batch.

    Modes: ``triangular`` (amplitude constant), ``triangular2`` (halved every cycle),
    ``exp_range`` (scaled by ``gamma**iteration``), or a custom ``scale_fn`` evaluated on the
    cycle number or the iteration (``scale_mode``).
    """

    _not_saved = ("optimizer", "_scale_fn_custom")
    _paired = ("base_lrs", "max_lrs", "base_momentums", "max_momentums")

    def __init__(self, optimizer: Optimizer, base_lr: Union[float, List[float]],
                 max_lr: Union[float, List[float]], step_size_up: int = 2000,
                 step_size_down: Optional[int] = None, mode: str = "triangular", gamma: float = 1.0,
                 scale_fn: Optional[Callable[[float], float]] = None, scale_mode: str = "cycle",
                 cycle_momentum: bool = True, base_momentum: Union[float, List[float]] = 0.8,
                 max_momentum: Union[float, List[float]] = 0.9, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        # torch's checks in its order; the groups are written only once all have passed
        base_lrs = _per_group("base_lr", optimizer, base_lr)
        self.max_lrs = _per_group("max_lr", optimizer, max_lr)
        up = float(step_size_up)
        down = float(step_size_down) if step_size_down is not None else up
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        if mode not in ("triangular", "triangular2", "exp_range") and scale_fn is None:
            raise ValueError(
                f"mode is invalid and scale_fn is None: mode={mode!r}, expected 'triangular', "
                "'triangular2' or 'exp_range' (or a scale_fn)"
            )
        self.mode = mode
        self.gamma = gamma
        self._scale_fn_custom = scale_fn
        self.scale_mode = scale_mode
        self._init_scale_fn()
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1 = _momentum_key_check(optimizer)
            self.base_momentums = _per_group("base_momentum", optimizer, base_momentum)
            self.max_momentums = _per_group("max_momentum", optimizer, max_momentum)
        if last_epoch == -1:
            for lr, group in zip(base_lrs, optimizer.param_groups):
                _set_group_value(group, "lr", lr)
            if cycle_momentum:
                for hi, lo, group in zip(
                    self.max_momentums, self.base_momentums, optimizer.param_groups
                ):
                    _write_momentum(group, hi, self.use_beta1)
                    group["max_momentum"] = hi
                    group["base_momentum"] = lo
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def _init_scale_fn(self):
        # the built-in modes fix the argument their scale function takes
        if self._scale_fn_custom is None:
            self.scale_mode = "iterations" if self.mode == "exp_range" else "cycle"

    def scale_fn(self, x: float) -> float:
        """Amplitude multiplier for cycle number (or iteration) ``x``."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma**x

    def get_lr(self):
        self._warn_outside_step()
        e = self.last_epoch
        cycle = math.floor(1 + e / self.total_size)
        x = 1.0 + e / self.total_size - cycle
        if x <= self.step_ratio:
            position = x / self.step_ratio
        else:
            position = (x - 1) / (self.step_ratio - 1)
        scale = self.scale_fn(cycle if self.scale_mode == "cycle" else e)
        lrs = [
            base + (top - base) * position * scale
            for base, top in zip(self.base_lrs, self.max_lrs)
        ]
        if self.cycle_momentum:
            momenta = [
                top - (top - low) * position * scale
                for low, top in zip(self.base_momentums, self.max_momentums)
            ]
            for group, m in _pairs(self.optimizer.param_groups, momenta, "momenta"):
                _write_momentum(group, m, self.use_beta1)
        return lrs

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        fn = self._scale_fn_custom
        state["_scale_fn_custom"] = (
            None if fn is None or isinstance(fn, types.FunctionType) else copy.deepcopy(fn.__dict__)
        )
        return state

    def _check_state_dict(self, state_dict):
        super()._check_state_dict(state_dict)
        mode = state_dict["mode"]
        if self._scale_fn_custom is None and mode not in ("triangular", "triangular2",
                                                          "exp_range"):
            raise ValueError(f"state_dict['mode'] must be 'triangular', 'triangular2' or "
                             f"'exp_range' without a scale_fn, got {mode!r}")
        saved_fn = state_dict["_scale_fn_custom"]
        if saved_fn is not None and not isinstance(saved_fn, dict):
            raise TypeError(f"state_dict['_scale_fn_custom'] must be None or a dict, got "
                            f"{_shown(saved_fn)}")

    def _apply_state_dict(self, state_dict):
        saved_fn = state_dict["_scale_fn_custom"]
        super()._apply_state_dict(
            {k: v for k, v in state_dict.items() if k != "_scale_fn_custom"}
        )
        if saved_fn is not None and self._scale_fn_custom is not None:
            self._scale_fn_custom.__dict__.update(copy.deepcopy(saved_fn))
        self._init_scale_fn()


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin 2018): warm up to ``max_lr``, then anneal far below.

    lr starts at ``max_lr / div_factor``, reaches ``max_lr`` after ``pct_start`` of
    ``total_steps`` and ends at ``initial_lr / final_div_factor``; ``three_phase`` returns to the
    initial lr before the final annealing.  Momentum (or ``betas[0]``) cycles inversely.
    Stepping beyond ``total_steps`` raises ``ValueError``.
    """

    def __init__(self, optimizer: Optimizer, max_lr: Union[float, List[float]],
                 total_steps: Optional[int] = None, epochs: Optional[int] = None,
                 steps_per_epoch: Optional[int] = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: Union[float, List[float]] = 0.85,
                 max_momentum: Union[float, List[float]] = 0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False,
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        if total_steps is not None:
            if not isinstance(total_steps, int) or total_steps <= 0:
                _require_real("total_steps", total_steps)
                raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
            self.total_steps = total_steps
        elif epochs is not None and steps_per_epoch is not None:
            if not isinstance(epochs, int) or epochs <= 0:
                raise ValueError(f"Expected positive integer epochs, but got {epochs}")
            if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
                raise ValueError(
                    f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}"
                )
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError(
                "You must define either total_steps OR (epochs AND steps_per_epoch)"
            )
        n = self.total_steps
        warm_end = float(pct_start * n) - 1
        if three_phase:
            self._schedule_phases = [
                self._phase(warm_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                self._phase(
                    float(2 * pct_start * n) - 2,
                    "max_lr",
                    "initial_lr",
                    "base_momentum",
                    "max_momentum",
                ),
                self._phase(n - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
            ]
        else:
            self._schedule_phases = [
                self._phase(warm_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                self._phase(n - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"),
            ]
        if not isinstance(pct_start, float) or pct_start < 0 or pct_start > 1:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                "anneal_strategy must be one of 'cos' or 'linear', instead got "
                f"{anneal_strategy}"
            )
        self._anneal_func_type = anneal_strategy
        # torch's checks in its order; the groups are written only once all have passed
        max_lrs = _per_group("max_lr", optimizer, max_lr)
        if last_epoch == -1:
            initial_lrs = [top / div_factor for top in max_lrs]
            min_lrs = [lr / final_div_factor for lr in initial_lrs]
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1 = _momentum_key_check(optimizer)
            highs = _per_group("max_momentum", optimizer, max_momentum)
            lows = _per_group("base_momentum", optimizer, base_momentum)
        if last_epoch == -1:
            for group, top, lr, low_lr in zip(optimizer.param_groups, max_lrs, initial_lrs,
                                              min_lrs):
                group["initial_lr"] = lr
                group["max_lr"] = top
                group["min_lr"] = low_lr
            if cycle_momentum:
                for hi, lo, group in zip(highs, lows, optimizer.param_groups):
                    _write_momentum(group, hi, self.use_beta1)
                    group["max_momentum"] = hi
                    group["base_momentum"] = lo
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _phase(end_step, start_lr, end_lr, start_momentum, end_momentum):
        return {
            "end_step": end_step,
            "start_lr": start_lr,
            "end_lr": end_lr,
            "start_momentum": start_momentum,
            "end_momentum": end_momentum,
        }

    def _anneal(self, start, end, pct):
        if self._anneal_func_type == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self):
        self._warn_outside_step()
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(
                f"Tried to step {step} times. The specified number of total steps is "
                f"{self.total_steps}"
            )
        phases = self._schedule_phases
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for i, phase in enumerate(phases):
                end = phase["end_step"]
                if step <= end or i == len(phases) - 1:
                    pct = (step - start) / (end - start)
                    break
                start = end
            lrs.append(self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct))
            if self.cycle_momentum:
                m = self._anneal(group[phase["start_momentum"]], group[phase["end_momentum"]], pct)
                _write_momentum(group, m, self.use_beta1)
        return lrs


# --------------------------------------------------------------------------- plateau


class ReduceLROnPlateau(LRScheduler):
    """Multiply lr by ``factor`` when a metric has stopped improving for ``patience`` epochs.

    ``step(metrics)`` takes the monitored value.  Improvement is strict: in ``min`` mode with
    ``rel`` threshold, ``metric < best * (1 - threshold)`` (``abs``: ``metric < best -
    threshold``); ``max`` mode mirrors it.  After a reduction, ``cooldown`` epochs are ignored.
    A group's lr never goes below its ``min_lr``, and reductions smaller than ``eps`` are skipped.
    """

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: Union[float, List[float]] = 0,
                 eps: float = 1e-8) -> None:
        if factor >= 1.0:
            raise ValueError(f"Factor should be < 1.0. Got factor={factor!r}.")
        self.factor = factor
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        n = len(optimizer.param_groups)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != n:
                raise ValueError(f"expected {n} min_lrs, got {len(min_lr)} (min_lr has one value "
                                 "per param group)")
            self.default_min_lr = None
            self.min_lrs = list(min_lr)
        else:
            self.default_min_lr = min_lr
            self.min_lrs = [min_lr] * n
        self.patience = patience
        self.cooldown = cooldown
        self.eps = eps
        self.last_epoch = 0
        self._last_lr = _group_values(optimizer, "lr")
        self._init_is_better(mode, threshold, threshold_mode)
        self._reset()

    @staticmethod
    def _check_modes(mode, threshold_mode, saved=False):
        """Raise ValueError, with torch's text, for a mode or threshold_mode that does not
        exist (TypeError for one that is no string, where torch fails building its text)."""
        for name, value, choices in (("mode", mode, ("min", "max")),
                                     ("threshold_mode", threshold_mode, ("rel", "abs"))):
            if value not in choices:
                path = f"state_dict[{name!r}]" if saved else name
                if not isinstance(value, str):
                    raise TypeError(f"{path} must be one of {choices}, got {_shown(value)}")
                raise ValueError(f"{name.replace('_', ' ')} {value} is unknown! ({path} must "
                                 f"be one of {choices})")

    def _init_is_better(self, mode, threshold, threshold_mode):
        self._check_modes(mode, threshold_mode)
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode

    def _reset(self):
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def is_better(self, a: float, best: float) -> bool:
        """Whether metric ``a`` improves on ``best`` by more than the threshold."""
        thr = self.threshold
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return a < best * (1.0 - thr)
            return a < best - thr
        if self.threshold_mode == "rel":
            return a > best * (thr + 1.0)
        return a > best + thr

    def step(self, metrics: SupportsFloat,  # type: ignore[override]
             epoch: Optional[int] = None) -> None:
        current = float(metrics)
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=3)
        self.last_epoch = epoch
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs during cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = _group_values(self.optimizer, "lr")

    def _reduce_lr(self):
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    "The number of param groups in the `optimizer` "
                    f"({len(groups)}) differs "
                    f"from when `ReduceLROnPlateau` was initialized "
                    f"({len(self.min_lrs)}), usually due to a new "
                    "param group being added to the optimizer. Please "
                    "modify the `min_lrs` field to match the length "
                    "of the `optimizer` param groups."
                )
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, floor in zip(groups, self.min_lrs):
            old = float(group["lr"])
            new = max(old * self.factor, floor)
            if old - new > self.eps:
                _set_group_value(group, "lr", new)

    def _check_state_dict(self, state_dict):
        if isinstance(state_dict, dict):
            # torch's load_state_dict refuses these modes, with the constructor's texts
            self._check_modes(state_dict.get("mode", self.mode),
                              state_dict.get("threshold_mode", self.threshold_mode),
                              saved=True)
        super()._check_state_dict(state_dict)

    def _apply_state_dict(self, state_dict):
        super()._apply_state_dict(state_dict)
        self._init_is_better(self.mode, self.threshold, self.threshold_mode)


# --------------------------------------------------------------------------- compositions


def _check_members(owner, optimizer, schedulers):
    for i, sched in enumerate(schedulers):
        if not hasattr(sched, "optimizer"):
            raise TypeError(
                f"{owner} at index {i} should have `optimizer` as its attribute."
            )
        if isinstance(sched, ReduceLROnPlateau):
            raise ValueError(  # noqa: TRY004 (torch raises ValueError)
                f"{owner} does not support `ReduceLROnPlateau` scheduler as it requires "
                "additional kwargs to be specified when calling `step`, but got one at index "
                f"{i} in the given schedulers sequence."
            )
        if sched.optimizer is not optimizer:
            raise ValueError(
                f"{owner} expects all schedulers to belong to the same optimizer, but got "
                f"scheduler {type(sched).__name__} at index {i} has {sched.optimizer}, which "
                f"is different from {type(optimizer).__name__}."
            )


class _Composite(LRScheduler):
    """Shared state_dict handling for schedulers made of sub-schedulers."""

    _not_saved = ("optimizer", "_schedulers")

    def state_dict(self):
        state = super().state_dict()
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def _check_state_dict(self, state_dict):
        super()._check_state_dict(state_dict)
        _check_entries(state_dict, "_schedulers", len(self._schedulers), "scheduler states")
        subs = state_dict["_schedulers"]
        for i, (sched, sub) in enumerate(zip(self._schedulers, subs)):
            try:
                sched._check_state_dict(sub)
            except (TypeError, ValueError) as e:
                raise type(e)(f"state_dict['_schedulers'][{i}]: {e}") from None

    def _apply_state_dict(self, state_dict):
        super()._apply_state_dict({k: v for k, v in state_dict.items() if k != "_schedulers"})
        for sched, sub in zip(self._schedulers, state_dict["_schedulers"]):
            sched._apply_state_dict(sub)


class SequentialLR(_Composite):
    """Run ``schedulers`` one after another, switching at each of ``milestones``.

    At a milestone the next scheduler restarts from its own epoch 0 (its ``base_lrs``).
    """

    def __init__(self, optimizer: Optimizer, schedulers: Sequence[LRScheduler],
                 milestones: Sequence[int], last_epoch: int = -1) -> None:
        if len(schedulers) < 1:
            raise ValueError(
                f"{type(self).__name__} expects at least one scheduler, but got no scheduler."
            )
        _check_members(type(self).__name__, optimizer, schedulers)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                "Sequential Schedulers expects number of schedulers provided to be one more "
                f"than the number of milestone points, but got number of schedulers "
                f"{len(schedulers)} and the number of milestones to be equal to "
                f"{len(milestones)}"
            )
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            _set_group_value(group, "lr", group["initial_lr"])
        # undo the initial step every sub-scheduler took when it was built
        self._undo_initial_steps(self)
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def _undo_initial_steps(self, sched):
        if hasattr(sched, "_schedulers"):
            for sub in sched._schedulers:
                self._undo_initial_steps(sub)
        elif hasattr(sched, "last_epoch"):
            sched.last_epoch -= 1

    def step(self) -> None:  # type: ignore[override]
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        sched = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            sched._update_lr(0)
        else:
            sched.step()
        self._last_lr = sched.get_last_lr()


class ChainedScheduler(_Composite):
    """Step every scheduler in ``schedulers`` at each ``step()``; their effects compose."""

    def __init__(self, schedulers: Sequence[LRScheduler],
                 optimizer: Optional[Optimizer] = None) -> None:
        if len(schedulers) < 1:
            raise ValueError(
                f"{type(self).__name__} expects at least one scheduler to be chained, but got "
                "no scheduler."
            )
        optimizer = optimizer if optimizer is not None else schedulers[0].optimizer
        _check_members(type(self).__name__, optimizer, schedulers)
        self._schedulers = schedulers
        self.optimizer = optimizer
        self._last_lr = _group_values(optimizer, "lr")

    def step(self) -> None:  # type: ignore[override]
        for sched in self._schedulers:
            sched.step()
        self._last_lr = _group_values(self.optimizer, "lr")


# --------------------------------------------------------------------------- functions


class FunctionLR(LRScheduler):
    """Set each group's lr to ``schedule(epoch)``, for any function of the step.

    ``schedule`` is a callable (or a list, one per group) returning the learning rate itself,
    as the functions of :mod:`fastopt.schedules` and TensorFlow/optax schedules do; the
    optimizer's own lr is only kept as ``initial_lr``.  The chainable and closed forms coincide.
    In ``state_dict()`` a schedule object keeps its ``__dict__`` (its parameters); a plain
    function or lambda is stored as ``None`` and must be supplied again when resuming.
    """

    _not_saved = ("optimizer", "schedules")

    def __init__(self, optimizer: Optimizer,
                 schedule: Union[Callable[[int], float], List[Callable[[int], float]]],
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.schedules = _per_group("schedule", optimizer, schedule)
        for fn in self.schedules:
            if not callable(fn):
                raise TypeError(f"schedule should be callable, but got {type(fn).__name__}")
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self):
        return [float(fn(self.last_epoch)) for fn in self.schedules]

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["schedules"] = _callables_state(self.schedules)
        return state

    def _check_state_dict(self, state_dict):
        super()._check_state_dict(state_dict)
        saved = state_dict["schedules"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.schedules):
            raise ValueError(f"state_dict['schedules'] must hold {len(self.schedules)} entries")
        _check_callables_state(saved, "schedules")

    def _apply_state_dict(self, state_dict):
        super()._apply_state_dict({k: v for k, v in state_dict.items() if k != "schedules"})
        _restore_callables(self.schedules, state_dict["schedules"])


#: Every scheduler class by name (tests and the ``schedule`` command parametrise over it).
SCHEDULERS = {
    cls.__name__: cls
    for cls in (
        LambdaLR,
        MultiplicativeLR,
        StepLR,
        MultiStepLR,
        ConstantLR,
        LinearLR,
        ExponentialLR,
        PolynomialLR,
        CosineAnnealingLR,
        CosineAnnealingWarmRestarts,
        CyclicLR,
        OneCycleLR,
        ReduceLROnPlateau,
        SequentialLR,
        ChainedScheduler,
        FunctionLR,
    )
}
