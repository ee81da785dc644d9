"""The ``Optimizer`` base class: torch.optim.Optimizer's contract on NumPy arrays.

A per-element optimizer names its C kernel, hyperparameters and state in a few class
attributes and inherits the step, one call into C for all groups (``_kernels.update``);
this module does the bookkeeping: parameter groups, hooks, ``state_dict`` and
``load_state_dict`` in torch's exact format, and the two-phase step (check everything, then
update) that leaves nothing half-updated when an input is bad.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from copy import deepcopy
from itertools import chain
from threading import get_ident
import functools
import math
import warnings
from typing import Any, Dict, Optional, Tuple, Type

import numpy as np

from fastopt import _compressed, _kernels, _pytree
from fastopt._adapters import (TORCH_ADAPTER, _adapter_for, _foreign_arrays, _foreign_param,
                               _foreign_updated)
from fastopt._kernels import guarded_step, update
from fastopt.parameter import Parameter, _is_bfloat16
from fastopt._typing import Closure, Hook, ParamsT, StateDict

__all__ = [
    "Optimizer",
    "required",
    "register_optimizer_step_pre_hook",
    "register_optimizer_step_post_hook",
    "kernel_optimizers",
    "other_optimizers",
]


class _RequiredParameter:
    """Singleton class representing a required parameter for an Optimizer."""

    def __repr__(self):
        return "<required parameter>"


required = _RequiredParameter()

# the step takes a Parameter's array as it is and asks the adapters for the rest
_kernels._parameter_type = Parameter
_kernels._foreign_param = _foreign_param
_kernels._foreign_state = TORCH_ADAPTER.state_view
_kernels._foreign_updated = _foreign_updated
_kernels._tensor_views = TORCH_ADAPTER._views


def _typename(obj):
    t = type(obj)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class RemovableHandle:
    """Returned by the ``register_*_hook`` methods; ``remove()`` unregisters the hook."""

    _next_id = 0

    def __init__(self, hooks_dict: Dict[int, Hook]) -> None:
        self._hooks = hooks_dict
        self.id = RemovableHandle._next_id
        RemovableHandle._next_id += 1

    def remove(self) -> None:
        self._hooks.pop(self.id, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _register(hooks, hook, prepend=False):
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    if prepend:
        hooks.move_to_end(handle.id, last=False)
    return handle


#: the optimizer classes of this package, in definition order (see kernel_optimizers)
_FASTOPT_OPTIMIZERS: list[Type[Optimizer]] = []


def kernel_optimizers() -> Dict[str, Type[Optimizer]]:
    """Every per-element optimizer class of fastopt by name, in the order of their kernels
    in csrc/kernels.def (classes sharing a kernel in definition order)."""
    order = {name: i for i, name in enumerate(_kernels.kernel_names())}
    ranked = sorted(((order[cls._kernel], i, cls) for i, cls in enumerate(_FASTOPT_OPTIMIZERS)
                     if cls._kernel is not None), key=lambda e: e[:2])
    return {cls.__name__: cls for _, _, cls in ranked}


def other_optimizers() -> Dict[str, Type[Optimizer]]:
    """Every fastopt optimizer class that writes its own ``step`` (no C kernel of the
    generic path), by name, in definition order."""
    return {cls.__name__: cls for cls in _FASTOPT_OPTIMIZERS if cls._kernel is None}


_global_step_pre_hooks: OrderedDict[int, Hook] = OrderedDict()
_global_step_post_hooks: OrderedDict[int, Hook] = OrderedDict()


def register_optimizer_step_pre_hook(hook: Hook) -> RemovableHandle:
    """Register a pre-step hook for every optimizer: ``hook(optimizer, args, kwargs)``."""
    return _register(_global_step_pre_hooks, hook)


def register_optimizer_step_post_hook(hook: Hook) -> RemovableHandle:
    """Register a post-step hook for every optimizer: ``hook(optimizer, args, kwargs)``."""
    return _register(_global_step_post_hooks, hook)


def _step_conflict(self, running, func):
    """Raise unless the step ``running`` (a (thread ident, step function) pair) may call
    ``func``: only a step reaching its base class's step through ``super().step()`` may."""
    name = type(self).__name__
    if running[0] != get_ident():
        raise RuntimeError(f"{name}.step() was called while another thread runs a step of the "
                           f"same {name} optimizer; steps of one optimizer must not overlap "
                           f"(call step() from one thread, or hold a lock around it)")
    if running[1] is func:
        raise RuntimeError(f"{name}.step() was called from inside a step of the same {name} "
                           f"optimizer (from its closure or a step hook); call it again after "
                           f"the step returns")


def _with_step_hooks(func):
    """Wrap a subclass's ``step`` with the global and instance step hooks, in torch's order:
    global pre, instance pre, step, instance post, global post.

    The wrapper also refuses overlapping steps of one optimizer: a second ``step()`` while
    one runs, from another thread or from the closure or a hook of the running one, raises
    RuntimeError before anything changes (torch has no such guard; there the two steps race
    on the state). A subclass's step may still call ``super().step()``."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return guarded_step(func, args, kwargs, _hooked_step, _step_conflict,
                            _global_step_pre_hooks, _global_step_post_hooks)

    wrapper._fastopt_hooked = True
    return wrapper


def _hooked_step(func, args, kwargs):
    """``func(*args, **kwargs)`` with the global and instance step hooks around it."""
    self = args[0]
    if not (_global_step_pre_hooks or _global_step_post_hooks
            or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks):
        return func(*args, **kwargs)
    return _run_step_hooks(func, args, kwargs, _global_step_pre_hooks, _global_step_post_hooks)


def _run_step_hooks(func, args, kwargs, global_pre, global_post, after=None):
    """``func(*args, **kwargs)`` (a step; ``args[0]`` the optimizer) in torch's hook order:
    the hooks of ``global_pre``, then the optimizer's pre hooks (one may return new ``(args,
    kwargs)``), the step, ``after()`` when given, the optimizer's post hooks, then those of
    ``global_post``. fastopt.torch passes torch's global hooks."""
    self = args[0]
    # as torch: hooks see args with the optimizer first, and may replace args and kwargs
    for hook in chain(global_pre.values(), self._optimizer_step_pre_hooks.values()):
        result = hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{func} must return None or a tuple of "
                                   f"(new_args, new_kwargs), but got {result}.")
    out = func(*args, **kwargs)
    if after is not None:
        after()
    for hook in chain(self._optimizer_step_post_hooks.values(), global_post.values()):
        hook(self, args, kwargs)
    return out


class Optimizer:
    """Base class of all fastopt optimizers, with torch.optim.Optimizer's interface.

    Parameters
    ----------
    params : iterable or dict
        ``fastopt.Parameter`` objects, ``(name, Parameter)`` pairs, or dicts defining
        parameter groups (a ``"params"`` entry plus per-group hyperparameters). A dict of
        parameters (``{"w": w, "b": b}``), or a group's ``"params"`` given as one, names
        them as ``named_parameters()`` does: ``param_names`` in the groups and the state
        dict. Nested dicts, lists and tuples of parameters are flattened: a dict's values by
        sorted keys (an ``OrderedDict``'s in its own order), sequences in order, as
        ``autograd.misc.flatten`` and jax do; a leaf under a dict is named by its path
        joined with dots (``"enc.w"``, ``"layers.0.b"``). A list of dicts none of which has
        a ``"params"`` entry and whose values are all parameters or containers is such a
        nested container, not a list of groups.
    defaults : dict
        Default hyperparameters, used by groups that do not set them.

    Notes
    -----
    The optimizers accept torch.optim's implementation switches (``foreach``, ``fused``,
    ``capturable``, ``differentiable``) where torch has them, with torch's conflicts between
    them, and ignore them otherwise: every step runs the same C kernel.

    fastopt checks the hyperparameters of every group (torch checks only the constructor's
    arguments), and before a step changes anything it checks every parameter, gradient and
    state array of every group, so a failing step leaves the optimizer and the parameters
    exactly as they were.
    """

    # Subclass interface ------------------------------------------------------------------
    # A per-element optimizer declares its C kernel with a few class attributes and inherits
    # the whole step (``_kernels.update``); see ``_kernels.Spec`` for their exact meaning.

    #: name of the C kernel (a line of csrc/kernels.def); None for an optimizer that writes
    #: its own ``step``
    _kernel: Optional[str] = None
    _spec: Any  # the kernel's _kernels.Spec, made by __init_subclass__ when _kernel is set
    #: group keys in the order of the kernel's hyperparameter struct (tuples such as betas
    #: give one double per entry, flags 0 or 1)
    _hyperparameters: Tuple[str, ...] = ()
    #: the per-element state arrays in the kernel's state[] order: a key, or (key, flag) for
    #: one that exists only while the group's flag is true, or (key, flag, "positive") for
    #: one that exists only while it is > 0
    _state_keys: Tuple[Any, ...] = ()
    #: whether the state holds torch's float32 ``step`` counter
    _step_counter = True
    #: 0-d float32 state entries that the kernel's prepare reads and updates
    _scalars: Tuple[str, ...] = ()
    #: SGD's rule for its momentum buffer: created when missing, takes the gradient as is
    _lazy_state = False
    #: group keys that must be >= 0 at every step (``betas[1]`` is always checked)
    _nonneg_at_step: Tuple[str, ...] = ()
    #: whether the update divides by 1 - betas[0] ** step (Adam's bias correction), so that
    #: betas[0] == 1 is torch's ZeroDivisionError
    _beta1_division = False
    #: group flags back-filled with these values when a state dict lacks them (torch's
    #: ``__setstate__`` does the same with hard-coded values).
    _flag_defaults: Dict[str, Any] = {}
    #: state entries that are scalars (never shaped like the parameter); derived from
    #: ``_step_counter`` and ``_scalars`` for a kernel optimizer
    _scalar_state_keys: frozenset[str] = frozenset({"step"})

    def _check_group(self, group):
        """Raise ValueError for invalid hyperparameters in ``group``."""

    def _check_step(self, frozen):
        """Checks made before every step on the frozen group (see ``_freeze``): only what
        the update cannot run without. Ranges are checked when a group is created, not here:
        torch does the same, and schedules legitimately drive lr a rounding error below
        zero (LinearLR to 0, OneCycleLR's last step), and cycle momentum outside the
        constructor's range (``OneCycleLR(max_momentum=...)`` writes ``betas[0]``). What is
        checked is what would break the arithmetic: ``betas[1]`` in [0, 1), ``betas[0]`` not 1
        where it divides (``_beta1_division``), and ``_nonneg_at_step``."""
        _kernels.check_frozen(frozen, self._nonneg_at_step, self._beta1_division)

    def _hyper_kinds(self):
        kinds = self.__dict__.get("_kinds")
        if kinds is None:
            numeric, flags, pairs = [], [], []
            for key, default in self.defaults.items():
                if key in _compressed.GROUP_KEYS:
                    continue  # how the state is stored: read by the step itself
                # a flag given as None or 0 is still a flag (torch tests its truth)
                if isinstance(default, bool) or isinstance(self._flag_defaults.get(key), bool):
                    flags.append(key)
                elif isinstance(default, (int, float)):
                    numeric.append(key)
                elif (isinstance(default, (tuple, list)) and default
                      and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                              for x in default)):
                    pairs.append((key, len(default)))
            kinds = self._kinds = (tuple(numeric), tuple(flags), tuple(pairs))
        return kinds

    def _freeze(self, group):
        """A copy of ``group`` with every hyperparameter converted once to a Python float
        or bool (tuples such as betas to tuples of floats): the step reads only this copy,
        so its checks and its kernel calls see the same values. Raises TypeError or
        ValueError for values that are not numbers (or 1-element arrays) of those kinds."""
        kinds = self.__dict__.get("_kinds") or self._hyper_kinds()
        frozen = _kernels.freeze(group, *kinds)
        self._check_step(frozen)
        return frozen

    def _init_state(self, state, array, group):
        """Fill the empty dict ``state`` for a parameter whose data is ``array``: the step
        counter, then zeros for every state array the group uses. Optimizers whose state
        starts elsewhere (Adagrad's sum, Rprop's step sizes) or that keep ``_scalars``
        override it."""
        if self._step_counter:
            state["step"] = np.array(0.0, dtype=np.float32)
        for key in self._spec.layout(group):
            if key is not None:
                state[key] = np.zeros_like(array)

    # -------------------------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "_fastopt_hooked", False):
            cls.step = _with_step_hooks(step)
        if cls.__module__.startswith("fastopt."):
            _FASTOPT_OPTIMIZERS.append(cls)
        if cls._kernel is not None:
            cls._spec = _kernels.Spec(cls._kernel, tuple(cls._hyperparameters),
                                      tuple(cls._state_keys), cls._step_counter,
                                      tuple(cls._scalars), cls._lazy_state,
                                      tuple(cls._nonneg_at_step), cls._beta1_division)
            cls._spec.custom_check = cls._check_step is not Optimizer._check_step
            if "_scalar_state_keys" not in cls.__dict__:
                cls._scalar_state_keys = frozenset(
                    (("step",) if cls._step_counter else ()) + tuple(cls._scalars))

    def __init__(self, params: ParamsT, defaults: Dict[str, Any]) -> None:
        self.defaults = defaults
        self._init_hooks()
        if isinstance(params, np.ndarray) or _adapter_for(params) is not None:
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {_typename(params)}")
        self.state = defaultdict(dict)
        self.param_groups = []
        if isinstance(params, Mapping):
            # a dict of named parameters (nested containers allowed): one group
            if len(params) == 0:
                raise ValueError("optimizer got an empty parameter list")
            param_groups: list[Any] = [{"params": params}]
        else:
            param_groups = list(params)
            if len(param_groups) == 0:
                raise ValueError("optimizer got an empty parameter list")
            if not isinstance(param_groups[0], dict) or _is_tree_of_dicts(param_groups):
                param_groups = [{"params": param_groups}]
        for group in param_groups:
            self.add_param_group(group)

    def _init_hooks(self):
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    def __getstate__(self):
        return {"defaults": self.defaults, "state": self.state,
                "param_groups": self.param_groups}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_hooks()
        self.defaults.setdefault("differentiable", False)
        self._backfill(self.param_groups)

    def _backfill(self, groups):
        for group in groups:
            for key, value in self._flag_defaults.items():
                group.setdefault(key, value)

    def __repr__(self):
        text = self.__class__.__name__ + " ("
        for i, group in enumerate(self.param_groups):
            text += "\n"
            text += f"Parameter Group {i}\n"
            for key in sorted(group.keys()):
                if key != "params":
                    text += f"    {key}: {group[key]}\n"
        text += ")"
        return text

    # Parameter groups --------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group, torch's rules: a dict with ``"params"``; missing
        hyperparameters are taken from ``defaults``; a parameter already in another group is
        a ValueError. On error the optimizer and the dict are left unchanged."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, Parameter) or _adapter_for(params) is not None:
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs. "
                            "Please use a list instead.")
        elif isinstance(params, np.ndarray):
            raise TypeError("optimizer can only optimize fastopt.Parameter objects, but the "
                            "params entry is a numpy.ndarray; wrap it: fastopt.Parameter(x)")
        tensors, names = _flat_params(params)
        if names and len(names) != len(tensors):
            raise ValueError("all optimizer params should be with/without names. "
                             "Some param names are missing")

        gi = len(self.param_groups)
        for pi, p in enumerate(tensors):
            if isinstance(p, Parameter):
                _kernels.check_param(p, gi, pi, self._kernel is not None)
                continue
            adapter = _adapter_for(p)
            if adapter is not None:
                adapter.check(p, gi, pi, self.defaults, low=self._kernel is not None)
                continue
            if isinstance(p, np.ndarray):
                raise TypeError("optimizer can only optimize fastopt.Parameter objects, but "
                                f"param_groups[{gi}]['params'][{pi}] is a numpy.ndarray; wrap "
                                "it: fastopt.Parameter(x)")
            raise TypeError("optimizer can only optimize Tensors, but one of the params is "
                            + _typename(p) + (f" (param_names[{pi}] {names[pi]!r})"
                                              if names else ""))

        group = dict(param_group)
        group["params"] = tensors
        if names:
            group["param_names"] = names
        for name, default in self.defaults.items():
            if default is required and name not in group:
                raise ValueError("parameter group didn't specify a value of required "
                                 f"optimization parameter {name}")
            group.setdefault(name, default)
        try:
            self._check_group(group)
        except ValueError as e:
            raise ValueError(f"param_groups[{gi}]: {e}") from None

        param_set = set()
        for other in self.param_groups:
            param_set.update(map(id, other["params"]))
            if ("param_names" in group) != ("param_names" in other):
                txt = "with names" if "param_names" in group else "without names"
                raise ValueError("all optimizer param groups should be with/without names. "
                                 f"cannot add param group {txt} to the optimizer")
        if not param_set.isdisjoint(map(id, tensors)):
            raise ValueError("some parameters appear in more than one parameter group")
        if len(set(map(id, tensors))) != len(tensors):
            warnings.warn("optimizer contains a parameter group with duplicate parameters; "
                          "in future, this will cause an error; see "
                          "github.com/pytorch/pytorch/issues/40967 for more information "
                          "(the duplicate is updated twice per step)", stacklevel=3)

        param_group.clear()
        param_group.update(group)
        self.param_groups.append(param_group)
        self._on_new_group(param_group)

    def _on_new_group(self, group):
        """Called after a group was added (Adagrad creates its state eagerly here)."""

    # Gradients ---------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all parameters: to None (default, as torch) or to zeros."""
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p, Parameter):
                    if p.grad is None:
                        continue
                    if set_to_none:
                        p.grad = None
                    elif isinstance(p.grad, np.ndarray) and p.grad.flags.writeable:
                        p.grad.fill(0)
                    else:
                        p.grad = np.zeros_like(p)
                else:
                    adapter = _adapter_for(p)
                    if adapter is not None:
                        adapter.zero_grad(p, set_to_none)

    # Stepping ----------------------------------------------------------------------------

    def step(self, closure: Optional[Closure] = None) -> Any:
        """Perform one optimization step; returns ``closure()``'s value when given.

        Bad input raises before anything changes; among it, ValueError when an array the
        step writes (a parameter, a state array, a step counter) shares memory with another
        array of the step (a parameter listed twice, and parameters over overlapping memory,
        are fine: they update in list order). RuntimeError when another step of this
        optimizer is running, in another thread or around this call (from its closure or a
        step hook)."""
        loss = None
        if closure is not None:
            loss = closure()
        self._update()
        return loss

    def _update(self):
        # check everything and freeze each group's values (nothing is modified), create
        # state for parameters stepping for the first time, then one call into C for all
        # groups; in Cython (_kernels.update) to keep a step's fixed cost low
        update(self, self.__dict__.get("_kinds") or self._hyper_kinds(), self._spec)

    def _create_state(self, missing, work):
        """Called by ``_kernels.update`` with the parameters that step for the first time,
        as (plan, slot, param, array, group index, index in group), and per group its
        (frozen group, state keys, init mode). The state is made in fresh dicts and stored
        only when every one was made and bound: an error (a MemoryError) leaves
        ``self.state`` as it was."""
        made = {}  # id(param) -> (param, fresh state): a parameter listed twice gets one
        for plan, slot, obj, array, gi, pi in missing:
            frozen, keys, mode = work[gi]
            entry = made.get(id(obj))
            if entry is None:
                base = array.view(np.ndarray)  # state arrays are plain arrays
                old = self.state.get(obj)
                fresh = dict(old) if isinstance(old, dict) else {}
                before = set(fresh)
                if mode == 1:
                    # SGD: the buffer takes the gradient as is on this step (torch clones it)
                    if fresh.get(keys[0]) is None:
                        fresh[keys[0]] = self._state_value(obj, base, np.zeros_like(base))
                elif len(fresh) == 0:
                    self._fresh_state(fresh, obj, base, frozen)
                master, formats = plan.formats(slot)
                if formats is not None:
                    # the group's state_dtype and master_weights: the new arrays as stored
                    self._store_state(fresh, obj, base, master,
                                      {k: f for k, f in formats.items() if k not in before})
                entry = made[id(obj)] = (obj, fresh)
            plan.bind(slot, entry[1], mode == 1, array, gi, pi)
        for obj, fresh in made.values():
            current = self.state.get(obj)
            if isinstance(current, dict):
                current.update(fresh)
            else:
                self.state[obj] = fresh

    def _store_state(self, state, param, array, master, formats):
        """Store the new state arrays of ``formats`` ({key: format name}) in their formats
        (see ``_compressed``), and add the master weights if ``master`` and missing."""
        for key, fmt in formats.items():
            value = state[key]
            if value.dtype == _FORMAT_DTYPES.get(fmt):
                continue
            state.update(_compressed.stored(value, fmt, key))
        if master and state.get(_compressed.MASTER_KEY) is None:
            state[_compressed.MASTER_KEY] = np.array(
                param if array is None else array, dtype=np.float32)

    def _state_value(self, param, array, value):
        """A new state array ``value`` for ``param`` (whose data is ``array``) as the state
        holds it: the array itself (fastopt.torch: a tensor sharing its memory)."""
        return value

    def _fresh_state(self, state, param, array, frozen):
        """Fill the empty dict ``state`` of ``param`` (``_init_state``'s work)."""
        self._init_state(state, array, frozen)

    # Hooks -------------------------------------------------------------------------------

    def register_step_pre_hook(self, hook: Hook) -> RemovableHandle:
        """``hook(optimizer, args, kwargs) -> None or (args, kwargs)`` before each step."""
        return _register(self._optimizer_step_pre_hooks, hook)

    def register_step_post_hook(self, hook: Hook) -> RemovableHandle:
        """``hook(optimizer, args, kwargs) -> None`` after each step."""
        return _register(self._optimizer_step_post_hooks, hook)

    def register_state_dict_pre_hook(self, hook: Hook, prepend: bool = False) -> RemovableHandle:
        """``hook(optimizer) -> None`` before ``state_dict()`` builds the dict."""
        return _register(self._optimizer_state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(self, hook: Hook, prepend: bool = False) -> RemovableHandle:
        """``hook(optimizer, state_dict) -> state_dict or None`` after ``state_dict()``."""
        return _register(self._optimizer_state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Hook,
                                          prepend: bool = False) -> RemovableHandle:
        """``hook(optimizer, state_dict) -> state_dict or None`` before loading."""
        return _register(self._optimizer_load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Hook,
                                          prepend: bool = False) -> RemovableHandle:
        """``hook(optimizer) -> None`` after loading."""
        return _register(self._optimizer_load_state_dict_post_hooks, hook, prepend)

    # State dicts -------------------------------------------------------------------------

    def state_dict(self) -> StateDict:
        """The optimizer's state in torch's format.

        ``{"state": {index: {key: value}}, "param_groups": [{..., "params": [index, ...]}]}``:
        parameters are numbered group after group; ``state`` follows the order in which
        parameters first got state. Arrays are the live state arrays, not copies (as torch).
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        mapping = {}
        start = 0
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            # as torch: ids new to this group are assigned together, so within a group the
            # last occurrence of a repeated parameter gives its id
            mapping.update({id(p): i for i, p in enumerate(group["params"], start)
                            if id(p) not in mapping})
            packed["params"] = [mapping[id(p)] for p in group["params"]]
            start += len(packed["params"])
            groups.append(packed)
        state = {}
        for k, v in self.state.items():
            if isinstance(k, Parameter) or _adapter_for(k) is not None:
                if id(k) in mapping:
                    state[mapping[id(k)]] = v
            else:
                state[k] = v
        sd = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _cast_state(self, param, array, value, key, where):
        """A saved state value made ready for ``param`` (torch's policy: tensors cast to the
        parameter's dtype, ``step`` kept as a float32 0-d array).

        ``load_state_dict`` has already checked the value's structure (no container that
        holds itself, bounded nesting) and the saved ``step`` (a finite number >= 0), so an
        override inherits those checks; an error it raises should start with ``where``."""
        if isinstance(value, dict):
            return {k: self._cast_state(param, array, v, k, where) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast_state(param, array, v, key, where) for v in value)
        value = _from_torch(value)
        if key == "step" or key in self._scalar_state_keys:
            arr = _as_number_array(value)
            if arr is None:
                raise TypeError(f"{where}: state[{key!r}] must be a number or a 1-element "
                                f"array, got {_describe(value)}")
            if arr.size != 1:
                raise ValueError(f"{where}: state[{key!r}] must be a scalar, got shape "
                                 f"{arr.shape}")
            if arr.dtype == np.float32 and arr.ndim == 0 and arr.flags.writeable:
                return arr
            return np.array(float(arr.reshape(())), dtype=np.float32)
        if isinstance(value, np.ndarray):
            if value.shape != array.shape:
                raise ValueError(f"{where}: state[{key!r}] has shape {value.shape}, the "
                                 f"parameter {array.shape}")
            if value.dtype.kind not in "biuf" and not _is_bfloat16(value.dtype):
                raise TypeError(f"{where}: state[{key!r}] has dtype {value.dtype}; expected "
                                f"floating point")
            out = np.asarray(value, dtype=array.dtype)
            if not (out.flags.c_contiguous and out.flags.aligned and out.flags.writeable
                    and out.dtype.isnative):
                out = np.array(out, dtype=array.dtype, order="C", copy=True)
            return out
        return value

    def _load_stored(self, param, array, saved, group, stored, where):
        """The saved state ``saved`` of ``param`` converted to the formats ``stored``
        ((master weights?, {key: format}) of ``_compressed.formats``; None formats: the
        parameter's dtype), from any of them: 8-bit codes are decoded, bfloat16 and float16
        widened, master weights kept (or made from the parameter)."""
        master, fmts = stored
        plain, saved_master = _compressed.decoded(saved, tuple(param.shape), where)
        if fmts is None:
            cast = self._cast_state(param, array, plain, None, where)
            if cast:
                self._check_loaded_state(cast, array, group, where)
            return cast
        cast = self._cast_state(param, array, {k: v for k, v in plain.items()
                                               if k not in fmts}, None, where)
        layout = self._spec.layout(group)
        for key in fmts:
            value = plain.get(key)
            if value is None:
                if self._lazy_state and layout[0] == key:
                    continue  # SGD's momentum buffer is created by the next step
                raise KeyError(f"{where}: state has no {key!r}, which the loaded group's "
                               f"settings need")
            cast[key] = self._state_value(param, array,
                                          _compressed.as_float32(value, array, key, where))
        if master:
            src = param if saved_master is None else saved_master
            cast[_compressed.MASTER_KEY] = self._state_value(
                param, array, _compressed.as_float32(src, array, _compressed.MASTER_KEY,
                                                     where))
        self._store_state(cast, param, array, False, {k: f for k, f in fmts.items()
                                                      if k in cast})
        for key in (("step",) if self._step_counter else ()) + tuple(self._scalars):
            if key not in cast:
                raise KeyError(f"{where}: state has no {key!r}")
        return cast

    def _check_loaded_state(self, state, array, group, where):
        """Raise TypeError, ValueError or KeyError (the message starting with ``where``)
        unless the cast, non-empty ``state`` of a parameter whose data is ``array`` is what
        a step of the loaded, frozen ``group`` needs.

        A per-element optimizer checks the arrays of the group's state layout (present, of
        the parameter's dtype and shape), ``step`` and its 0-d scalars, as its step would.
        An optimizer without a kernel is checked by its ``_check_existing_state(state,
        array, where)`` (the state check of its own step) when it has one."""
        if self._kernel is None:
            check = getattr(self, "_check_existing_state", None)
            if check is not None:
                check(state, array, where)
            return
        for j, key in enumerate(self._spec.layout(group)):
            if key is None:
                continue
            value = state.get(key)
            if value is None and self._lazy_state and j == 0:
                continue  # SGD's momentum buffer is created by the next step
            if value is None:
                raise KeyError(f"{where}: state has no {key!r}, which the loaded group's "
                               f"settings need")
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{where}: state[{key!r}] must be an array, got "
                                f"{_describe(value)}")
            if value.shape != array.shape or value.dtype != array.dtype:
                raise ValueError(f"{where}: state[{key!r}] has dtype {value.dtype} and shape "
                                 f"{value.shape}; the parameter has {array.dtype} "
                                 f"{array.shape}")
        for key in (("step",) if self._step_counter else ()) + tuple(self._scalars):
            value = state.get(key)
            if value is None:
                raise KeyError(f"{where}: state has no {key!r}")
            if not (isinstance(value, np.ndarray) and value.dtype == np.float32
                    and value.size == 1):
                raise TypeError(f"{where}: state[{key!r}] must be a 0-d float32 array, got "
                                f"{_describe(value)}")

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a state dict made by ``state_dict()`` (of this library or, with tensors turned
        into arrays, of torch.optim). Hyperparameters come from the saved groups, state arrays
        are cast to each parameter's dtype.

        Everything is checked before anything changes: a malformed dict raises TypeError,
        ValueError or KeyError naming the key path (``state[3]['exp_avg']``,
        ``param_groups[1]['lr']``) and leaves the optimizer as it was. Beyond torch, which
        loads these and fails later or computes NaN:

        * the ids of ``state`` must be ids of the saved ``param_groups``: an unknown id is a
          KeyError (torch keeps it as a key of ``optimizer.state`` and the parameter starts
          from empty state). Ids written as strings of digits (after a JSON round trip) are
          read as the same ints; keys that are neither ints nor digit strings are not
          parameter state and are kept as they are, as torch keeps them (their values must
          be dicts, as every entry of ``state``). A parameter without
          saved state is fine: its state is created at its next step, as in torch;
        * a saved ``step`` must be a finite number >= 0 (ValueError): torch loads -1, -5.5,
          NaN or inf, and its next step raises ZeroDivisionError or an error about complex
          numbers, or writes NaN into the parameters;
        * the state of a parameter must hold the arrays its loaded group steps with, of the
          parameter's shape, and numeric hyperparameters must not be NaN.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {_describe(state_dict)}")
        # the cached step holds the state it stepped with: let go of it before the new state
        # is made
        _kernels.forget(self)
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {_describe(state_dict)} (from a "
                            f"load_state_dict pre-hook)")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise KeyError(f"state_dict has no {key!r} entry")
        groups = self.param_groups
        saved_groups = self._loaded_groups(state_dict["param_groups"])
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError(f"state_dict['state'] must be a dict of parameter states, got "
                            f"{_describe(saved_state)}")
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match "
                             "the size of optimizer's group")
        id_map, where_of, saved_at = {}, {}, {}
        for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
            for pi, (k, p) in enumerate(zip(saved["params"], group["params"])):
                where_of.setdefault(id(p), f"param_groups[{gi}]['params'][{pi}]")
                if k in id_map and id_map[k] is not p:
                    raise ValueError(f"param_groups[{gi}]['params'][{pi}]: id {k} is also at "
                                     f"{saved_at[k]}, which holds a different parameter in "
                                     f"this optimizer")
                id_map[k] = p
                saved_at.setdefault(k, f"param_groups[{gi}]['params'][{pi}]")

        # the new groups, frozen once to check them (types, and no NaN)
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            new_groups.append(saved)
        self._backfill(new_groups)
        for group, saved in zip(groups, new_groups):
            # how the state is stored is this optimizer's choice: the loaded state is
            # converted to it (the saved rounding_step continues)
            for key in _compressed.OPTIONS:
                if key in group:
                    saved[key] = group[key]
                else:
                    saved.pop(key, None)
        frozen_of, group_of = {}, {}
        numeric, _, pairs = self.__dict__.get("_kinds") or self._hyper_kinds()
        kinds = numeric + tuple(key for key, _ in pairs)
        for gi, group in enumerate(new_groups):
            # types only, as at a step: torch checks nothing here, and a run that ended on a
            # schedule a hair below zero must load
            try:
                frozen = self._freeze(group)
            except KeyError as e:
                raise KeyError(f"loaded param_groups[{gi}] has no {_message(e)!r} entry, "
                               f"which the optimizer needs") from None
            except (ValueError, TypeError, OverflowError) as e:
                raise type(e)(f"loaded param_groups[{gi}]: {e}") from None
            _check_no_nan(frozen, gi, kinds)
            for p in group["params"]:
                frozen_of.setdefault(id(p), frozen)
                group_of.setdefault(id(p), group)

        state = defaultdict(dict)
        seen = {}
        for k, v in saved_state.items():
            pid = _state_id(k)
            path = f"state[{k!r}]"
            if pid is None:
                # not a parameter's state: kept as torch keeps it, but a dict as every entry
                if not isinstance(v, dict):
                    raise TypeError(f"{path} must be a dict, got {_describe(v)}")
                _check_tree(v, path)
                state[k] = v
                continue
            if pid in seen:
                raise KeyError(f"{path}: id {pid} is given twice (as {seen[pid]!r} and {k!r})")
            seen[pid] = k
            if pid not in id_map:
                known = sorted(id_map)
                shown = (f"{known[0]}..{known[-1]}" if known == list(range(known[0],
                         known[-1] + 1)) and len(known) > 2 else str(known)) if known else "none"
                raise KeyError(f"{path}: no parameter of the saved param_groups has id {pid} "
                               f"(their ids: {shown})")
            param = id_map[pid]
            array = param if isinstance(param, Parameter) else _foreign_arrays(param)
            where = where_of[id(param)] + f" (saved id {k!r})"
            if not isinstance(v, dict):
                raise TypeError(f"{where}: saved state must be a dict, got "
                                f"{type(v).__name__}")
            _check_tree(v, path)
            if "step" in v:
                _check_saved_step(v["step"], f"{path}['step'] ({where_of[id(param)]})")
            try:
                stored = (False, None)
                if self._kernel is not None:
                    stored = _compressed.formats(
                        group_of[id(param)], _compressed.param_format(param),
                        int(np.prod(param.shape)),
                        self._spec.layout(frozen_of[id(param)]))
                if stored[1] is not None or _compressed.is_stored(v):
                    cast = self._load_stored(param, array, v, frozen_of[id(param)], stored,
                                             where)
                else:
                    cast = self._cast_state(param, array, v, None, where)
                    if cast:
                        self._check_loaded_state(cast, array, frozen_of[id(param)], where)
            except (TypeError, ValueError, KeyError, OverflowError, AttributeError,
                    IndexError) as e:
                raise _located(e, where) from e
            state[param] = cast
        self.state = state
        self.param_groups = new_groups
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    @staticmethod
    def _loaded_groups(saved_groups):
        """Copies of the saved groups, checked to be dicts with a list of int ids."""
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError(f"state_dict['param_groups'] must be a list of dicts, got "
                            f"{_describe(saved_groups)}")
        out = []
        for gi, saved in enumerate(saved_groups):
            if not isinstance(saved, Mapping):
                raise TypeError(f"param_groups[{gi}] must be a dict, got {_describe(saved)}")
            if "params" not in saved:
                raise KeyError(f"param_groups[{gi}] has no 'params' entry")
            ids = saved["params"]
            if not isinstance(ids, (list, tuple)):
                raise TypeError(f"param_groups[{gi}]['params'] must be a list of ids, got "
                                f"{_describe(ids)}")
            for pi, k in enumerate(ids):
                if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                    raise TypeError(f"param_groups[{gi}]['params'][{pi}] must be an int id, "
                                    f"got {k!r}")
            try:
                copied = deepcopy(dict(saved))
            except Exception as e:
                raise TypeError(f"param_groups[{gi}] cannot be copied: {e}") from None
            copied["params"] = [int(k) for k in ids]
            out.append(copied)
        return out

Optimizer.step = _with_step_hooks(Optimizer.step)


# Parameters given as pytrees --------------------------------------------------------------

_FORMAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


def _is_container(obj):
    return isinstance(obj, (list, tuple, Mapping))


def _is_tree_of_dicts(items):
    """Whether a list of dicts is a pytree of parameters rather than parameter groups:
    no dict has a ``"params"`` entry and every value is an array, a tensor or a container
    (a group holds hyperparameters: numbers, flags)."""
    return all(isinstance(d, dict) and "params" not in d
               and all(isinstance(v, np.ndarray) or _is_container(v)
                       or _adapter_for(v) is not None for v in d.values())
               for d in items)


def _is_named_pair(item):
    """``(name, param)`` as ``named_parameters()`` yields it: a 2-tuple whose first entry
    is no parameter and no container."""
    return (isinstance(item, tuple) and len(item) == 2 and not _is_container(item[0])
            and not isinstance(item[0], np.ndarray) and _adapter_for(item[0]) is None)


def _flat_params(params):
    """The parameters of a group's ``params`` entry as ``(tensors, names)``.

    ``params`` is a dict, or an iterable of parameters, ``(name, param)`` pairs and nested
    containers (dicts, lists, tuples), flattened in the order of ``fastopt._pytree``: a
    dict's values by sorted keys, sequences in order. A leaf under a dict is named by its
    path joined with dots (``"enc.w"``; a leaf at ``params[1]['b']`` of a list is
    ``"1.b"``), as torch names a module's parameters; leaves of lists and tuples without a
    dict above them have no names. ``names`` is empty when no parameter has one."""
    if isinstance(params, Mapping):
        paths, tensors, _ = _pytree.flatten_with_paths(params)
        return tensors, [_pytree.dotted(path) for path in paths]
    tensors, names = [], []
    for i, p in enumerate(params):
        if _is_named_pair(p):
            name, value = p
            if _is_container(value):
                paths, leaves, _ = _pytree.flatten_with_paths(value, f"params[{i}]")
                tensors.extend(leaves)
                names.extend(f"{name}.{_pytree.dotted(path)}" if path else name
                             for path in paths)
            else:
                names.append(name)
                tensors.append(value)
        elif _is_container(p):
            paths, leaves, treedef = _pytree.flatten_with_paths(p, f"params[{i}]")
            tensors.extend(leaves)
            if _pytree.has_mapping(treedef):
                names.extend(_pytree.dotted((i,) + path) for path in paths)
        else:
            tensors.append(p)
    return tensors, names


# Loading state dicts ---------------------------------------------------------------------

#: containers in a saved parameter state may nest this deep (LBFGS's lists of arrays: 2)
_MAX_STATE_DEPTH = 32


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    text = repr(value)
    return f"{_typename(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def _message(e):
    return e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)


def _located(e, where):
    """``e`` as a TypeError, ValueError or KeyError whose message names ``where``."""
    msg = _message(e)
    if "state[" not in msg and "param_groups[" not in msg:
        msg = f"{where}: {msg}"
    for kind in (KeyError, TypeError, ValueError):
        if isinstance(e, kind):
            return kind(msg)
    return (TypeError if isinstance(e, AttributeError) else ValueError)(msg)


def _from_torch(value):
    """A torch tensor as a NumPy array; a bfloat16 one (NumPy has no bfloat16 of its own) as
    an ml_dtypes.bfloat16 array of its bits, or widened to float32 (exactly) without
    ml_dtypes."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            try:
                import ml_dtypes
            except ImportError:
                return value.float().numpy()
            import torch
            return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return value


def _as_number_array(value):
    """``value`` as a numeric (bool excluded) array, or None when it is no number."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (np.ndarray, np.generic, int, float)):
        return None
    arr = np.asarray(value)
    if _is_bfloat16(arr.dtype):
        return arr.astype(np.float32)  # a 0-d bfloat16 tensor's value (exact)
    return arr if arr.dtype.kind in "iuf" else None


def _state_id(key):
    """The parameter id that a key of a saved ``state`` stands for: an int, or a string of
    digits (JSON turns int keys into strings); None for a key that names no parameter."""
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"state[{key!r}]: state ids must be ints, got a bool")
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    if isinstance(key, (float, complex, np.number)):
        raise TypeError(f"state[{key!r}]: state ids must be ints, got {_typename(key)}")
    return None


def _check_tree(value, path, active=None):
    """Raise ValueError for a container that holds itself or nests too deeply (where a
    recursive cast would hit Python's recursion limit)."""
    if not isinstance(value, (dict, list, tuple)):
        return
    if active is None:
        active = set()
    if id(value) in active:
        raise ValueError(f"{path} contains itself")
    if len(active) >= _MAX_STATE_DEPTH:
        raise ValueError(f"{path}: containers nested more than {_MAX_STATE_DEPTH} deep")
    active.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        _check_tree(v, f"{path}[{k!r}]", active)
    active.discard(id(value))


def _check_saved_step(value, path):
    """A saved step counter must be a finite number >= 0 (any numeric type or 1-element
    array: SparseAdam's is an int, the others' a float32 0-d array)."""
    arr = _as_number_array(_from_torch(value))
    if arr is None:
        raise TypeError(f"{path} must be a number, got {_describe(value)}")
    if arr.size != 1:
        raise ValueError(f"{path} must be a single number, got shape {arr.shape}")
    step = float(arr.reshape(()))
    if not (math.isfinite(step) and step >= 0):
        raise ValueError(f"{path} is {step}: a step count must be a finite number >= 0")


def _check_no_nan(frozen, gi, keys):
    """Raise ValueError for a NaN among the numeric hyperparameters ``keys`` of a frozen
    loaded group (a NaN lr or beta turns every parameter into NaN at the next step)."""
    for key in keys:
        value = frozen.get(key)
        values = value if isinstance(value, tuple) else (value,)
        for j, v in enumerate(values):
            if type(v) is float and v != v:
                at = f"[{j}]" if isinstance(value, tuple) else ""
                raise ValueError(f"loaded param_groups[{gi}][{key!r}]{at} is nan")

def _check_betas(betas):
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


def _check_nonneg(group, *keys):
    """torch's ``if not 0.0 <= x`` checks (also reject NaN), with torch's messages."""
    names = {"lr": "learning rate", "eps": "epsilon value"}
    for key in keys:
        value = group[key]
        if not 0.0 <= value:
            label = names.get(key, f"{key} value")
            raise ValueError(f"Invalid {label}: {value}")


def _check_impl_flags(defaults):
    """foreach/fused/differentiable are accepted and ignored, with torch's conflicts."""
    if defaults.get("fused"):
        if defaults.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
