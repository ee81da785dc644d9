"""fastopt's optimizers as ``torch.optim`` optimizers, for PyTorch models on the CPU.

Porting a torch training loop is a one-line change::

    import fastopt.torch
    opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3)   # was torch.optim.AdamW

Each class here subclasses its ``torch.optim`` namesake (``fastopt.torch.Adam`` is a
``torch.optim.Adam``), so every tool that takes a torch optimizer takes it: torch's
schedulers and ``swa_utils.SWALR``, ``GradScaler``, Lightning, the transformers ``Trainer``,
accelerate. Construction, argument checks and their errors, ``param_groups``, ``state``,
``state_dict``, ``zero_grad``, ``add_param_group``, hooks and ``repr`` are torch's own code.
Only ``step`` is fastopt's, updating the parameters in place through their memory:

* the per-element optimizers (``ASGD``, ``Adadelta``, ``Adagrad``, ``Adam``, ``AdamW``,
  ``Adamax``, ``NAdam``, ``RAdam``, ``RMSprop``, ``Rprop``, ``SGD``, and ``Lion``, which
  torch lacks and which subclasses ``torch.optim.Optimizer``) step with fastopt's C kernels:
  one call into C for all groups, the GIL released (held through a step of at most 4 MiB
  of parameters whose gradients backward made: those are read without making their Python
  objects, and the GIL keeps them alive, about a millisecond at most);
* ``SparseAdam`` steps with fastopt's row-sparse C kernel, one call for all groups;
* ``LBFGS``, ``Adafactor`` and ``Muon``, which are not per-element, step with the NumPy code
  of :class:`fastopt.LBFGS`, :class:`fastopt.Adafactor` and :class:`fastopt.Muon` on NumPy
  views of the tensors. Muon's Newton-Schulz iteration is torch's bfloat16 one, emulated
  operation by operation (its matrix products sum in another order, so an update differs
  from torch's by up to a few percent of its RMS); its ``ns_dtype`` attribute
  (``"float32"``, ``"float64"``) works here too.

The state holds torch tensors, as torch's does (``exp_avg``, ``exp_avg_sq``, a float32
0-d ``step`` tensor, ...; SparseAdam's ``step`` is an int and LBFGS's history has torch's
types, as theirs), which share their memory with what the steps update: nothing is copied
per step. ``state_dict()`` returns tensors, so ``torch.save`` and
``torch.load(weights_only=True)`` round trip, a ``torch.optim`` state dict loads and
continues here, and the reverse. ``load_state_dict`` checks everything before it changes
anything (shapes, dtypes, layouts, finite non-negative steps, ids that match the groups,
LBFGS's history) and raises naming the key path (``state[3]['exp_avg']``), as fastopt's
NumPy optimizers do; it also takes the state dicts keyed by parameter names that
``torch.distributed.checkpoint`` passes. ``SparseAdam``'s state (an int ``step``, dense
contiguous moments of the parameter's dtype and shape) is checked so at load, and again by
its step before it changes anything.

Rules beyond torch's:

* parameters of the per-element optimizers are float32, float64, complex64, complex128,
  float16 or bfloat16 CPU tensors (the 16-bit ones stepped in float32 arithmetic, their
  state in their dtype, as torch keeps it), dense: contiguous or in another axis order
  (channels_last), not a view with gaps such as a strided slice (``add_param_group`` refuses others, naming the parameter).
  The kernels run over a tensor's memory block: a gradient laid out otherwise than its
  parameter is copied into the parameter's layout for the step (the ``.grad`` itself is
  left alone), and state is made and loaded in the parameter's layout (state set by hand in
  another layout is refused by the step). Complex parameters step as their
  ``torch.view_as_real`` views, their state is complex, as torch's;
* parameters of ``SparseAdam``, ``LBFGS``, ``Adafactor`` and ``Muon`` are contiguous float32
  or float64 CPU tensors (Muon's: matrices, as torch's). As torch's, ``SparseAdam`` refuses
  complex parameters at construction (ValueError), ``Adafactor`` and ``Muon`` at the step
  (RuntimeError, naming the parameter), and ``LBFGS`` steps with contiguous complex64 and
  complex128 ones as their real views;
* gradients are dense tensors of the parameter's dtype and shape, with torch's exceptions
  for sparse COO gradients (``Embedding(sparse=True)``): ``SGD`` and ``Adagrad`` take them
  with torch's rules (SGD's momentum buffer of a sparse gradient is a sparse tensor; weight
  decay with a sparse gradient raises as torch's does, and unlike torch, Adagrad's refused
  step leaves ``step`` as it was; a sparse gradient of a complex parameter is refused);
  ``SparseAdam`` takes only them, of any ``sparse_dim``, coalesced or not, and refuses a
  dense one with torch's RuntimeError; every other optimizer refuses them at ``step()``
  with torch's RuntimeError (``Adam does not support sparse gradients, ...``) naming the
  parameter, ``LBFGS`` too (torch's makes them dense);
* ``differentiable=True`` is refused: the update runs in C or NumPy, outside autograd;
* ``capturable=True`` is refused at ``step()`` with the AssertionError torch raises on the
  CPU, naming the group;
* a tensor ``lr`` (or, for ``Adam`` and ``AdamW``, tensor ``betas``) steps as torch's:
  torch computes the step scalars derived from it in 0-d tensor arithmetic of its dtype
  (for a float32 ``lr``: Adam's and Adamax's ``lr / (1 - beta1^t)``, Adagrad's decayed lr,
  NAdam's step sizes, ASGD's ``eta``, the decoupled decay ``1 - lr * weight_decay``; for
  tensor betas, Adam's bias corrections), also for float64 parameters, and so do the
  kernels. A float64 ``lr`` computes as a float does; a tensor ``lr`` of another dtype, and
  betas of two dtypes, are read as their values in double. ``LBFGS`` uses a tensor ``lr``
  as a 0-d tensor of its dtype, as torch;
* ``foreach`` and ``fused`` are accepted and change nothing (the step is one fused pass
  either way); a ``GradScaler`` unscales the gradients itself before ``step()``, as it does
  for torch's non-fused optimizers;
* after a step the autograd version counter of each updated parameter is bumped, as an
  in-place torch op would; a step that raises changes nothing, version counters included
  (``LBFGS`` puts the parameters and its history back when its closure raises mid-step);
* a second ``step()`` of the same optimizer while one runs (from another thread, or from
  the closure) raises RuntimeError.

As torch, a step reads the group values as they are: a scheduler may set a momentum or
``betas[0]`` the constructor would refuse, and the step uses it. Where torch's step would
fail on a value (``betas[0] == 1`` in Adam's bias correction: ZeroDivisionError), fastopt
raises the same error before anything changes; a ``betas[1]`` outside [0, 1) is a ValueError
(torch computes NaN or fails on a complex number).

Importing this module imports torch; ``import fastopt`` alone never does.
"""
import functools
import inspect
import math

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer_module
from torch.optim import Optimizer as _TorchOptimizer

import fastopt
from fastopt import _compressed, _kernels, _numpy_step
from fastopt._adapters import TORCH_ADAPTER, _foreign_param, _numpy_of, _where
from fastopt.muon import _check_ns_dtype
from fastopt.optimizer import Optimizer as _Optimizer, _run_step_hooks

__all__ = ["ASGD", "Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "Lion", "NAdam", "RAdam",
           "RMSprop", "Rprop", "SGD", "SparseAdam"]


def _with_step_hooks(func):
    """``func`` (a ``step``) running torch's step hooks around it exactly as torch's own
    wrapper (``Optimizer.profile_hook_step``) does: the global and then the optimizer's pre
    hooks (one may return new ``(args, kwargs)``), the step, ``_optimizer_step_code``, the
    optimizer's and then the global post hooks. The profiler's ``record_function`` range is
    opened only while a profiler runs (it costs ~10 us a step otherwise). Marked ``hooked``,
    so torch does not wrap it a second time."""
    profiling = torch._C._autograd._profiler_enabled
    hooks = _torch_optimizer_module

    def run(func, self, args, kwargs):
        return _run_step_hooks(func, args, kwargs, hooks._global_optimizer_pre_hooks,
                              hooks._global_optimizer_post_hooks, self._optimizer_step_code)

    @functools.wraps(func)
    def step(*args, **kwargs):
        self = args[0]
        if not (hooks._global_optimizer_pre_hooks or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks or hooks._global_optimizer_post_hooks
                or profiling()):
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            return out
        if profiling():
            name = f"Optimizer.step#{type(self).__name__}.step"
            with torch.autograd.profiler.record_function(name):
                return run(func, self, args, kwargs)
        return run(func, self, args, kwargs)

    step.hooked = True
    return step


def _to_tensor(value):
    """A state value made by fastopt's NumPy code, as a tensor sharing its memory."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


class _KernelStep:
    """What a ``torch.optim`` optimizer needs to step with a fastopt C kernel.

    A subclass names the fastopt class whose kernel and state layout it uses in
    ``_fastopt``, and lists the torch optimizer class after this one among its bases."""

    _fastopt = None

    # fastopt's bookkeeping, shared with the NumPy optimizers: the hyperparameter kinds,
    # freezing a group for a step, and the checks and casts of load_state_dict
    _hyper_kinds = _Optimizer._hyper_kinds
    _freeze = _Optimizer._freeze
    _backfill = _Optimizer._backfill
    _loaded_groups = staticmethod(_Optimizer._loaded_groups)
    _load_stored = _Optimizer._load_stored
    _check_loaded_state = None  # set per class (see __init_subclass__)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = cls._fastopt
        for name in ("_kernel", "_hyperparameters", "_state_keys", "_step_counter",
                     "_scalars", "_lazy_state", "_nonneg_at_step", "_flag_defaults",
                     "_scalar_state_keys", "_beta1_division"):
            setattr(cls, name, getattr(base, name))
        # the state is made by the fastopt class's own code (zeros, Adagrad's initial
        # sum, Rprop's step sizes), then handed over as tensors
        for name, value in _fastopt_helpers(base).items():
            setattr(cls, name, value)
        spec = _kernels.Spec(base._kernel, tuple(base._hyperparameters),
                             tuple(base._state_keys), base._step_counter,
                             tuple(base._scalars), base._lazy_state, tuple(base._nonneg_at_step),
                             base._beta1_division)
        spec.wide = True  # channels_last and other dense layouts, complex parameters
        cls._spec = spec
        torch_init = next(c for c in cls.__mro__ if issubclass(c, _TorchOptimizer)
                          and c.__module__.startswith("torch.")).__init__
        if "__init__" not in cls.__dict__:
            @functools.wraps(torch_init)
            def __init__(self, *args, **kw):
                torch_init(self, *args, **kw)
                self._after_init()
            if "state_dtype" in inspect.signature(base.__init__).parameters:
                # fastopt's compressed-state options, keyword-only after torch's arguments
                __init__ = _compressed.with_options(__init__)
            cls.__init__ = __init__

    def _after_init(self):
        # the step does its own unscaling-free work: a GradScaler unscales the gradients
        # itself and skips the step on inf, as for torch's non-fused optimizers
        self._step_supports_amp_scaling = False

    _check_step = _Optimizer._check_step

    # -- groups -----------------------------------------------------------------------------

    def add_param_group(self, param_group):
        """``torch.optim.Optimizer.add_param_group``, and then fastopt's checks: every
        parameter a dense float32, float64, complex64, complex128, float16 or bfloat16 CPU
        tensor (contiguous or dense in another axis order, as channels_last; not a view
        with gaps such as a strided slice), and no ``differentiable=True``. A refused group
        is not added."""
        if isinstance(param_group, dict) and param_group.get("differentiable"):
            raise ValueError(f"{type(self).__name__}: differentiable=True is not supported by "
                             f"fastopt.torch (the update runs in C, outside autograd); use "
                             f"torch.optim for a differentiable step")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            if group.get("differentiable"):
                raise ValueError(f"{type(self).__name__}: differentiable=True is not "
                                 f"supported by fastopt.torch (the update runs in C, outside "
                                 f"autograd); use torch.optim for a differentiable step")
            for pi, p in enumerate(group["params"]):
                TORCH_ADAPTER.check(p, gi, pi, group, wide=True, low=True)
        except BaseException:
            self.param_groups.pop()
            raise

    # -- the step ---------------------------------------------------------------------------

    def step(self, closure=None):
        """One optimization step for all groups; returns ``closure()``'s value when given.

        Every group's values and every tensor are checked before the first element changes:
        bad input raises (naming the group or parameter) with nothing changed."""
        return _kernels.claimed_update(self, closure, torch.enable_grad, _capturable_message,
                                       _SPARSE_GENERIC, _sparse_message)

    step = _with_step_hooks(step)

    # new state: made by the fastopt class's code (Optimizer._create_state, all or none),
    # as tensors in the parameter's layout
    _create_state = _Optimizer._create_state

    def _state_value(self, param, array, value):
        return _state_tensor(param, array, value)

    def _store_state(self, state, param, array, master, formats):
        # the new state tensors in the formats of the group's state_dtype (see
        # fastopt._compressed), in the parameter's layout; master weights as a float32 copy
        dtypes = {"float32": torch.float32, "float16": torch.float16,
                  "bfloat16": torch.bfloat16}
        for key, fmt in formats.items():
            value = state[key]
            if fmt in dtypes:
                if value.dtype is not dtypes[fmt]:
                    state[key] = value.to(dtypes[fmt])
                continue
            made = _compressed.stored(value.detach().to(torch.float32).numpy(), fmt, key)
            state.update({k: torch.from_numpy(v) for k, v in made.items()})
        if master and state.get(_compressed.MASTER_KEY) is None:
            state[_compressed.MASTER_KEY] = param.detach().to(torch.float32, copy=True)

    def _fresh_state(self, state, param, array, frozen):
        arrays = {}
        # a tensor lr as its value (ASGD's eta starts at lr): NumPy warns when it converts a
        # tensor itself
        values = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                  for k, v in frozen.items()}
        if param.dtype is torch.bfloat16:
            # the int16 view of the parameter holds no bfloat16 values: the state is made in
            # float32, in the parameter's layout, and its arrays rounded as torch rounds
            self._init_state(arrays, np.empty_like(array, dtype=np.float32), values)
            keys = {k for k in self._spec.layout(frozen) if k is not None}
            state.update({k: (torch.from_numpy(v).to(torch.bfloat16) if k in keys
                              else _state_tensor(param, array, v)) for k, v in arrays.items()})
            return
        self._init_state(arrays, array, values)
        state.update({k: _state_tensor(param, array, v) for k, v in arrays.items()})

    # -- loading ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict):
        """``torch.optim.Optimizer.load_state_dict``, checked first: a state dict of
        ``torch.optim`` or of fastopt (tensors or NumPy arrays) loads and continues; a
        malformed one raises naming the key path (``state[3]['exp_avg']``,
        ``param_groups[1]['lr']``) and leaves the optimizer as it was. The loaded state
        holds tensors of each parameter's dtype (torch's cast policy, ``step`` float32).

        The ids are ints, as ``state_dict()`` writes them, or all strings: the parameter names
        that ``torch.distributed.checkpoint``'s ``set_optimizer_state_dict`` passes. Names
        are matched to the parameters by their position in the groups, as torch matches any
        id, and then read as the ints of those positions (the load_state_dict pre-hooks see
        the ints); a state entry under a name that no group lists is a KeyError."""
        _Optimizer.load_state_dict(self, _named_ids_as_ints(state_dict))

    def _cast_state(self, param, array, value, key, where):
        if isinstance(value, torch.Tensor) and value.layout is torch.sparse_coo:
            return _cast_sparse_state(param, value, key, where)
        if (param.dtype is torch.bfloat16 and key not in self._scalar_state_keys
                and isinstance(value, (torch.Tensor, np.ndarray))
                and tuple(value.shape) == tuple(param.shape)):
            value = _bfloat16_bits(value, key, where)
        if (isinstance(value, torch.Tensor) and param.is_complex() and value.is_complex()
                and value.shape == param.shape):
            value = torch.view_as_real(value.detach().resolve_conj().to(param.dtype))
        out = _Optimizer._cast_state(self, param, array, value, key, where)
        if (isinstance(out, np.ndarray) and out.shape == array.shape and out.ndim
                and not _same_layout(out, array)):
            laid = np.empty_like(array)  # the parameter's layout, as the step needs
            np.copyto(laid, out)
            out = laid
        return _state_tensor(param, array, out)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._after_init()


def _bfloat16_bits(value, key, where):
    """A saved state array or tensor for a bfloat16 parameter: rounded to bfloat16 as torch
    rounds, as the int16 view of its bits that the kernels step."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype is torch.bool:
            raise TypeError(f"{where}: state[{key!r}] has dtype {value.dtype}; expected "
                            f"floating point")
        value = value.detach().to(device="cpu")
    else:
        if value.dtype.name == "bfloat16" and value.dtype.itemsize == 2:
            value = value.astype(np.float32)  # ml_dtypes' bfloat16: exact in float32
        if value.dtype.kind not in "iuf":
            raise TypeError(f"{where}: state[{key!r}] has dtype {value.dtype}; expected "
                            f"floating point")
        value = torch.from_numpy(np.ascontiguousarray(value))
    return value.to(torch.bfloat16).view(torch.int16).numpy()


def _state_tensor(param, base, value):
    """A state value of a C-kernel optimizer made or cast for ``param`` (whose kernel array
    is ``base``) as a tensor: complex, as torch's, for a per-element array of a complex
    parameter; bfloat16 for an array of the int16 view of a bfloat16 one. (The NumPy steps'
    counterpart is ``_numpy_state_tensor``.)"""
    if (isinstance(value, np.ndarray) and param.is_complex() and value.shape == base.shape
            and value.dtype == base.dtype):
        return torch.view_as_complex(torch.from_numpy(value))
    if (isinstance(value, np.ndarray) and param.dtype is torch.bfloat16
            and value.dtype == np.int16 and value.shape == base.shape):
        return torch.from_numpy(value).view(torch.bfloat16)
    return _to_tensor(value)


def _same_layout(a, b):
    """Arrays of one shape whose memory blocks match element for element."""
    return all(n == 1 or x == y for n, x, y in zip(a.shape, a.strides, b.strides))


def _cast_sparse_state(param, value, key, where):
    """A saved sparse COO state tensor (SGD's momentum buffer of sparse gradients, as
    torch's) for ``param``: the parameter's shape, cast to its dtype."""
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{where}: state[{key!r}] is a sparse tensor of shape "
                         f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")
    if value.is_complex() or not value.is_floating_point():
        raise TypeError(f"{where}: state[{key!r}] is a sparse tensor of dtype {value.dtype}; "
                        f"expected floating point")
    return value.detach().to(device="cpu", dtype=param.dtype).coalesce()


def _fastopt_helpers(base):
    """The methods of the fastopt class ``base`` that make and check its state."""
    out = {"_init_state": _own(base, "_init_state"),
           "_check_loaded_state": _check_loaded_tensors(_own(base, "_check_loaded_state"))}
    for name in ("_fill",):
        for klass in base.__mro__:
            if name in klass.__dict__:
                out[name] = klass.__dict__[name]
                break
    return out


def _own(base, name):
    for klass in base.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    raise AttributeError(name)


def _check_loaded_tensors(check):
    """``check`` (fastopt's check of a loaded state, on arrays) applied to tensor state."""
    def _check_loaded_state(self, state, array, group, where):
        viewed = {k: (_numpy_of(torch.view_as_real(v.detach()) if v.is_complex()
                                else v.detach())
                      if isinstance(v, torch.Tensor) and v.device.type == "cpu"
                      and v.layout is torch.strided else v) for k, v in state.items()
                  # SGD's sparse momentum buffer (checked by _cast_sparse_state); a sparse
                  # tensor elsewhere is refused by ``check``
                  if not (self._lazy_state and isinstance(v, torch.Tensor)
                          and v.layout is torch.sparse_coo)}
        return check(self, viewed, array, group, where)
    return _check_loaded_state


def _make(name, torch_base):
    cls = type(name, (_KernelStep, torch_base), {
        "_fastopt": getattr(fastopt, name),
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": (f"``torch.optim.{name}`` stepping with fastopt's C kernel (see "
                    f":mod:`fastopt.torch`); arguments, defaults, errors and state are "
                    f"torch's.\n\n" + (torch_base.__doc__ or "")),
    })
    return cls


ASGD = _make("ASGD", torch.optim.ASGD)
Adadelta = _make("Adadelta", torch.optim.Adadelta)
Adagrad = _make("Adagrad", torch.optim.Adagrad)
Adam = _make("Adam", torch.optim.Adam)
AdamW = _make("AdamW", torch.optim.AdamW)
Adamax = _make("Adamax", torch.optim.Adamax)
NAdam = _make("NAdam", torch.optim.NAdam)
RAdam = _make("RAdam", torch.optim.RAdam)
RMSprop = _make("RMSprop", torch.optim.RMSprop)
Rprop = _make("Rprop", torch.optim.Rprop)
SGD = _make("SGD", torch.optim.SGD)


class Lion(_KernelStep, _TorchOptimizer):
    r"""Lion (sign of an interpolated momentum) as a ``torch.optim.Optimizer``; torch has no
    Lion. Arguments and numbers as :class:`fastopt.Lion`:

    .. math::
        \theta \leftarrow \theta(1 - \gamma\lambda) - \gamma\,
            \operatorname{sign}(\beta_1 m + (1 - \beta_1) g), \qquad
        m \leftarrow \beta_2 m + (1 - \beta_2) g

    Parameters
    ----------
    params : iterable
        Tensors or parameter-group dicts.
    lr : float or Tensor, default 1e-4
    betas : (float, float), default (0.9, 0.99)
    weight_decay : float, default 0
        Decoupled weight decay :math:`\lambda`.
    maximize : bool, default False
    """

    _fastopt = fastopt.Lion

    @_compressed.with_options
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 maximize=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        fastopt.Lion._check_group(None, {**defaults, "lr": float(lr)})
        super().__init__(params, defaults)
        self._after_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)


# -- torch's texts for what a step refuses ---------------------------------------------------

# the end of the kernels' error for a sparse gradient; the step replaces it by torch's text
# (SGD and Adagrad step with sparse gradients: see ``_sparse_step`` below)
_SPARSE_GENERIC = ("this optimizer does not support sparse gradients, please consider "
                   "SparseAdam instead")


def _sparse_message(opt):
    """torch's error for a sparse gradient given to ``opt`` (an AdamW says ``Adam``, as
    torch's does)."""
    name = opt._fastopt.__name__
    if name in ("Adam", "AdamW"):
        return "Adam does not support sparse gradients, please consider SparseAdam instead"
    return f"{name} does not support sparse gradients"


def _capturable_message(opt, gi):
    return (f"param_groups[{gi}]: capturable=True needs the parameters and state steps on a "
            f"CUDA or XPU device, and fastopt.torch updates CPU tensors (torch.optim's "
            f"{opt._fastopt.__name__} raises this AssertionError on the CPU too); use "
            f"capturable=False")


def _named_ids_as_ints(state_dict):
    """``state_dict`` with the parameter ids of its groups and state renumbered 0, 1, ... in
    the order of the groups, when every id is a string (a parameter name); otherwise
    ``state_dict`` itself, for the checked loader to take or refuse."""
    from collections.abc import Mapping
    if not isinstance(state_dict, Mapping):
        return state_dict
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if (not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping)
            or not all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple))
                       for g in groups)):
        return state_dict
    ids = [k for group in groups for k in group["params"]]
    if not ids or not all(isinstance(k, str) for k in ids):
        return state_dict
    number = {}
    for k in ids:
        number.setdefault(k, len(number))
    renamed = {}
    for k, value in state.items():
        if not isinstance(k, str) or k not in number:
            shown = list(number) if len(number) <= 6 else list(number)[:6] + ["..."]
            raise KeyError(f"state[{k!r}]: no parameter of the saved param_groups is named "
                           f"{k!r} (their names: {shown})")
        renamed[number[k]] = value
    out = dict(state_dict)
    out["state"] = renamed
    out["param_groups"] = [dict(group, params=[number[k] for k in group["params"]])
                           for group in groups]
    return out


# -- optimizers whose step is fastopt's NumPy code ------------------------------------------

class _NumpyStep:
    """What a ``torch.optim`` optimizer needs to step with fastopt's NumPy code (the
    optimizers that are not per-element; ``_KernelStep`` is the C-kernel sibling).

    A subclass names the fastopt class in ``_fastopt`` and, in ``_borrowed``, the methods of
    that class its step and state checks run (taken as they are: the parameters reach them
    as NumPy views through the tensor adapter), lists the torch optimizer class after this
    one among its bases and implements ``_numpy_step(closure)``. The state holds tensors; a
    step works on NumPy views of them and stores what it made as tensors sharing its memory,
    only once its checks passed."""

    _fastopt = None
    _borrowed = ()
    # fastopt's bookkeeping, as in _KernelStep: groups frozen and checked, and the checked
    # load_state_dict (no kernel: the loaded state is checked by the class's own checks)
    _kernel = None
    _nonneg_at_step = ()
    _beta1_division = False
    _lazy_state = False  # no sparse state tensor is kept (see _check_loaded_tensors)
    #: complex parameters are taken by add_param_group and refused by the step, as torch's
    #: step refuses them (Adafactor); otherwise add_param_group refuses them
    _complex_at_step = False
    #: complex parameters are taken and stepped as their ``torch.view_as_real`` views
    #: (LBFGS, as torch's); they must be contiguous, as the real ones
    _complex_steps = False
    _hyper_kinds = _Optimizer._hyper_kinds
    _freeze = _Optimizer._freeze
    _check_step = _Optimizer._check_step
    _backfill = _Optimizer._backfill
    _loaded_groups = staticmethod(_Optimizer._loaded_groups)
    _load_stored = _Optimizer._load_stored
    _check_loaded_state = _check_loaded_tensors(_Optimizer._check_loaded_state)
    load_state_dict = _KernelStep.load_state_dict

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("_flag_defaults", "_scalar_state_keys") + tuple(cls._borrowed):
            setattr(cls, name, _own(cls._fastopt, name))

    def add_param_group(self, param_group):
        """``torch.optim.Optimizer.add_param_group``, and then fastopt's checks: every
        parameter a dense, contiguous float32 or float64 CPU tensor (or, where torch's step
        refuses complex parameters, ``_complex_at_step``, a dense complex one: the step
        raises torch's error), and no ``differentiable=True``. A refused group is not
        added."""
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        try:
            if group.get("differentiable"):
                raise ValueError(f"{type(self).__name__}: differentiable=True is not "
                                 f"supported by fastopt.torch (the update runs in NumPy, "
                                 f"outside autograd); use torch.optim for a differentiable "
                                 f"step")
            for pi, p in enumerate(group["params"]):
                complex_ = isinstance(p, torch.Tensor) and p.is_complex()
                TORCH_ADAPTER.check(p, gi, pi, group, wide=complex_ and (
                    self._complex_at_step or self._complex_steps))
                if complex_ and self._complex_steps and not p.is_contiguous():
                    raise ValueError(f"{_where(gi, pi)}: the tensor is not contiguous "
                                     f"(strides {tuple(p.stride())} for shape "
                                     f"{tuple(p.shape)}); pass a contiguous tensor")
        except BaseException:
            self.param_groups.pop()
            raise

    def step(self, closure=None):
        """One optimization step; returns ``closure()``'s value when given. A step that
        raises leaves the parameters, the state and the version counters as they were."""
        _kernels.claim_step(self)
        try:
            return self._numpy_step(closure)
        finally:
            del self.__dict__["_fastopt_step"]

    step = _with_step_hooks(step)

    def __setstate__(self, state):
        # torch's __setstate__ adds ``differentiable=False`` to the defaults, a key that the
        # groups lack where the torch class takes no such argument (Adafactor, Muon): the
        # step's hyperparameters stay those of the constructor
        saved = state.get("defaults")
        added = isinstance(saved, dict) and "differentiable" not in saved
        super().__setstate__(state)
        if added:
            defaults = self.defaults
            self.defaults = {k: v for k, v in defaults.items() if k != "differentiable"}
            try:
                self.__dict__.pop("_kinds", None)
                self._hyper_kinds()
            finally:
                self.defaults = defaults

    def _in_place_step(self, closure, *args):
        """The step of Adafactor and Muon: their NumPy code (``_prepare_step``, which checks
        everything, then ``_update_groups(frozen, groups, views, *args)``) on NumPy views of
        the tensor state, which it updates in place; the state it makes for new parameters
        becomes tensors. Complex parameters with a gradient raise torch's RuntimeError first.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and p.is_complex():
                    raise RuntimeError(f"{_where(gi, pi)}: {name} does not support complex "
                                       f"parameters")
        back = {}
        views = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                st = self.state.get(p)
                if p.grad is None or p in views or st is None:
                    continue
                views[p] = {k: _state_view(v, (gi, pi), (k,), back, False)
                            for k, v in st.items()} if isinstance(st, dict) else st
        frozen, groups = self._prepare_step(views)  # raises with nothing changed
        try:
            self._update_groups(frozen, groups, views, *args)
        finally:
            # the state made for new parameters, as tensors (the rest was updated in place
            # and stays the tensors it was)
            for p, st in views.items():
                self.state[p].update({k: _numpy_state_tensor(v, back) for k, v in st.items()})
            _numpy_step.mark_updated(groups)
        return loss


def _state_view(value, where, path, back, scalars):
    """``value``, a state entry, for fastopt's NumPy code: a tensor as a NumPy view of its
    memory (0-d ones, with ``scalars``, as NumPy scalars of their dtype), lists item by
    item, anything else as it is. Each view is recorded in ``back`` (id -> (view, tensor))
    so that an entry the step left alone is stored back as the very tensor it was. A tensor
    without a view raises TypeError naming it: ``where`` is the parameter's (group, index),
    ``path`` the keys down to the entry (made text only then)."""
    if isinstance(value, torch.Tensor):
        try:
            array = value.numpy()  # a dense CPU tensor outside autograd: the usual case
        except (TypeError, RuntimeError):
            try:
                array = TORCH_ADAPTER.state_view(value)[0]
            except (TypeError, RuntimeError) as e:
                keys = "".join(f"[{k!r}]" for k in path)
                raise TypeError(f"param_groups[{where[0]}]['params'][{where[1]}]: "
                                f"state{keys}: {e}") from None
        if scalars and array.ndim == 0:
            array = array[()]
        back[id(array)] = (array, value)
        return array
    if isinstance(value, list):
        return [_state_view(v, where, path + (i,), back, scalars)
                for i, v in enumerate(value)]
    return value


def _dense_saved_state(value, key, where):
    """Refuse a saved state tensor that is not dense (a sparse one), or has no data (on the
    meta device), naming the key: the NumPy steps keep torch's dense state."""
    if isinstance(value, torch.Tensor) and value.layout is not torch.strided:
        raise TypeError(f"{where}: state[{key!r}] is a tensor with layout {value.layout}; "
                        f"this optimizer's state is dense, as torch's")
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise TypeError(f"{where}: state[{key!r}] is a tensor on the meta device, which "
                        f"holds no values")


def _numpy_state_tensor(value, back):
    """The inverse of ``_state_view``: what the step left alone as the tensor it was, a new
    array as a tensor sharing its memory, a NumPy float scalar as a 0-d tensor of its dtype
    (torch's derived scalars are 0-d tensors), lists item by item."""
    if isinstance(value, list):
        return [_numpy_state_tensor(v, back) for v in value]
    seen = back.get(id(value))
    if seen is not None and seen[0] is value:
        return seen[1]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.floating):
        return torch.from_numpy(np.array(value))
    return value


class LBFGS(_NumpyStep, torch.optim.LBFGS):
    """``torch.optim.LBFGS`` stepping with :class:`fastopt.LBFGS`'s NumPy code (see
    :mod:`fastopt.torch`); arguments, defaults, errors and state are torch's.

    The state (under the first parameter) has torch's keys and types: ``func_evals`` and
    ``n_iter`` ints, ``d`` and ``prev_flat_grad`` vectors of all parameters' elements,
    ``old_dirs`` and ``old_stps`` lists of such vectors, ``ro`` and ``al`` lists of 0-d
    tensors (``al`` holds None where unused), ``t`` and ``H_diag`` a number or a 0-d
    tensor, ``prev_loss`` a float. Beyond torch:

    * a step that raises (in the closure, or on a bad gradient) puts the parameters and the
      state back as they were before it (torch leaves the parameters moved and its state
      half-written); the version counters move only when a step moved the parameters;
    * the state is checked at every step and by ``load_state_dict`` (types, lengths, and
      vectors of the parameters' total size), which raise naming the key;
    * an unsupported ``line_search_fn`` raises before the closure runs (torch evaluates it
      once first);
    * gradients are dense tensors of the parameters' dtype and shape; a sparse one is
      refused naming its parameter (torch densifies it).

    Complex parameters (contiguous) step as torch's: as the real and imaginary parts of
    their ``torch.view_as_real`` views, which make the flat vectors of the history (real,
    of the parameters' real dtype; complex64 goes with float32, complex128 with float64).

    A tensor ``lr`` is used as a 0-d tensor of its dtype, as torch uses it; the state then
    holds copies of it, never the group's ``lr`` itself (torch stores that tensor as ``t``).

    """

    _fastopt = fastopt.LBFGS
    _borrowed = ("_run", "_step", "_flat_grad", "_add", "_snapshot", "_restore",
                 "_check_history")
    _complex_steps = True

    def _arrays(self):
        # (array, gradient array or None) of each parameter, a complex one as the real view
        # torch's LBFGS flattens (its re, im pairs); not marked updated (``_run`` does that)
        return [_foreign_param(p, 0, pi, False, wide=p.is_complex())
                for pi, p in enumerate(self._params)]

    def _numpy_step(self, closure):
        if closure is None:
            raise TypeError("LBFGS.step() missing 1 required positional argument: 'closure'")
        closure = torch.enable_grad()(closure)
        key = self._params[0]
        current = self.state.get(key)
        back = {}
        work = {}
        where = "param_groups[0]['params'][0]"
        if current is not None and not isinstance(current, dict):
            raise TypeError(f"{where}: optimizer.state entry must be a dict, got "
                            f"{type(current).__name__}")
        if current:
            work = {k: _state_view(v, (0, 0), (k,), back, True) for k, v in current.items()}
            self._check_history(work, TORCH_ADAPTER.data(key).dtype, where)
        loss = self._run(closure, work)
        new = {k: _numpy_state_tensor(v, back) for k, v in work.items()}
        if isinstance(current, dict):
            current.clear()
            current.update(new)
        else:
            self.state[key] = new
        return loss

    def _cast_state(self, param, array, value, key, where):
        # fastopt's cast and history check on arrays, then the whole state as tensors
        _dense_saved_state(value, key, where)
        out = fastopt.LBFGS._cast_state(self, param, array, value, key, where)
        if key is None and isinstance(out, dict):
            return {k: _numpy_state_tensor(v, {}) for k, v in out.items()}
        return out


LBFGS.__doc__ += torch.optim.LBFGS.__doc__ or ""


class Adafactor(_NumpyStep, torch.optim.Adafactor):
    """``torch.optim.Adafactor`` stepping with :class:`fastopt.Adafactor`'s NumPy code (see
    :mod:`fastopt.torch`); arguments, defaults, errors and state are torch's (``step`` a
    float32 0-d tensor, ``row_var`` and ``col_var`` or ``variance``), updated in place.

    Beyond torch: every parameter, gradient and state tensor of every group is checked
    before anything changes (a bad one raises naming it, with nothing changed), and a
    parameter with no elements raises ValueError (torch divides by its size after updating
    the parameters before it). As torch, a complex parameter is taken by the constructor and
    refused by a step that has its gradient (RuntimeError, torch's text, naming it), and a
    sparse gradient raises RuntimeError.

    """

    _fastopt = fastopt.Adafactor
    _borrowed = ("_prepare_step", "_update_groups", "_check_existing_state", "_check_frozen",
                 "_check_param", "_init_state", "_update_one", "_factor_shapes")
    _complex_at_step = True

    def _numpy_step(self, closure):
        return self._in_place_step(closure)

    def _cast_state(self, param, array, value, key, where):
        _dense_saved_state(value, key, where)
        return _to_tensor(fastopt.Adafactor._cast_state(self, param, array, value, key, where))


Adafactor.__doc__ += torch.optim.Adafactor.__doc__ or ""

__all__ += ["Adafactor", "LBFGS"]

# -- sparse gradients ------------------------------------------------------------------------
#
# torch's SGD and Adagrad take sparse COO gradients (an ``Embedding(sparse=True)``'s). The
# step's one C call leaves those parameters out and hands them to ``_sparse_step``, which
# checks all of them (raising before anything changes) and returns the function that updates
# them, on the touched elements only, after the dense update.

def _coalesced(grad, param, where):
    """(sparse_dim, index tuple, values) of the sparse COO gradient of ``param``, duplicate
    indices summed (torch's ``coalesce``), every index checked to be in range."""
    if tuple(grad.shape) != tuple(param.shape):
        raise ValueError(f"{where}: the sparse .grad has shape {tuple(grad.shape)}, the "
                         f"parameter {tuple(param.shape)}")
    c = grad.detach().coalesce()
    k = c.sparse_dim()
    idx = c.indices().numpy()
    if idx.shape[1]:
        low, high = idx.min(axis=1), idx.max(axis=1)
        bad = [d for d in range(k) if low[d] < 0 or high[d] >= param.shape[d]]
        if bad:
            raise IndexError(f"{where}: the sparse .grad has an index out of range "
                             f"[0, {param.shape[bad[0]]}) in dimension {bad[0]}")
    return k, tuple(idx), c.values().numpy()


def _linear(idx, shape):
    return np.ravel_multi_index(idx, shape) if len(idx[0]) else np.zeros(0, np.int64)


def _sparse_tensor(lin, vals, param, k):
    """A coalesced sparse COO tensor of ``param``'s shape: ``vals`` at the linear indices
    ``lin`` (sorted, unique) of its first ``k`` dimensions."""
    idx = np.stack(np.unravel_index(lin, tuple(param.shape[:k]))).astype(np.int64)
    return torch.sparse_coo_tensor(torch.from_numpy(idx.reshape(k, -1)),
                                   torch.from_numpy(np.ascontiguousarray(vals)),
                                   tuple(param.shape), is_coalesced=True,
                                   check_invariants=False)


def _merge(lin_a, vals_a, lin_b, vals_b, alpha_a, alpha_b):
    """alpha_a a + alpha_b b of two sparse tensors given as (sorted unique linear indices,
    values): their union of indices and its values (torch's sparse add)."""
    lin = np.union1d(lin_a, lin_b)
    out = np.zeros((lin.size,) + vals_b.shape[1:], dtype=vals_b.dtype)
    out[np.searchsorted(lin, lin_a)] = vals_a * alpha_a if alpha_a != 1 else vals_a
    out[np.searchsorted(lin, lin_b)] += vals_b * alpha_b if alpha_b != 1 else vals_b
    return lin, out


def _dense_state(value, param, where, key):
    """The NumPy view of a dense state tensor, checked to fit ``param``."""
    if not (isinstance(value, torch.Tensor) and value.layout is torch.strided
            and value.device.type == "cpu"):
        raise TypeError(f"{where}: state[{key!r}] must be a dense CPU tensor, got "
                        f"{type(value).__name__}"
                        + (f" with layout {value.layout}" if isinstance(value, torch.Tensor)
                           else ""))
    if value.dtype != param.dtype or value.shape != param.shape:
        raise ValueError(f"{where}: state[{key!r}] has dtype {value.dtype} and shape "
                         f"{tuple(value.shape)}; the parameter has {param.dtype} "
                         f"{tuple(param.shape)}")
    return value.detach().numpy()


def _sgd_sparse_step(self, items, work):
    """SGD's step of the parameters with sparse gradients, as torch's: without momentum
    ``p -= lr g`` on the gradient's elements; with momentum the buffer of a sparse gradient
    is a sparse tensor (torch clones the first gradient) over the union of the indices seen;
    weight decay raises, as torch's ``add(sparse, dense)`` does."""
    todo = []
    for gi, pi, p, arr, g in items:
        frozen = work[gi][0]
        where = _where(gi, pi)
        k, idx, vals = _coalesced(g, p, where)
        if frozen["weight_decay"] != 0:
            raise RuntimeError(f"{where}: add(sparse, dense) is not supported. Use add(dense, "
                               f"sparse) instead (torch.optim.SGD cannot add weight_decay to "
                               f"a sparse gradient)")
        momentum = frozen["momentum"]
        buf_kind = None
        if momentum != 0:
            st = self.state.get(p)
            buf = st.get("momentum_buffer") if isinstance(st, dict) else None
            if isinstance(buf, torch.Tensor) and buf.layout is torch.sparse_coo:
                if tuple(buf.shape) != tuple(p.shape) or buf.dtype != p.dtype:
                    raise ValueError(f"{where}: state['momentum_buffer'] has dtype "
                                     f"{buf.dtype} and shape {tuple(buf.shape)}; the "
                                     f"parameter has {p.dtype} {tuple(p.shape)}")
                if buf.sparse_dim() != k:
                    raise RuntimeError(f"{where}: state['momentum_buffer'] has "
                                       f"{buf.sparse_dim()} sparse dimensions, the gradient "
                                       f"{k}")
                buf_kind = "sparse"
            elif buf is not None:
                _dense_state(buf, p, where, "momentum_buffer")
                if frozen["nesterov"]:
                    raise RuntimeError(f"{where}: add(sparse, dense) is not supported. Use "
                                       f"add(dense, sparse) instead (torch.optim.SGD with "
                                       f"nesterov, a dense momentum buffer and a sparse "
                                       f"gradient)")
                buf_kind = "dense"
        todo.append((p, arr, k, idx, vals, frozen, buf_kind))

    def commit():
        for p, arr, k, idx, vals, frozen, buf_kind in todo:
            lr, momentum = frozen["lr"], frozen["momentum"]
            if frozen["maximize"]:
                vals = -vals
            lin = _linear(idx, p.shape[:k])
            step_lin, step_vals = lin, vals
            if momentum != 0:
                st = self.state[p]
                if buf_kind == "dense":
                    b = st["momentum_buffer"].detach().numpy()
                    b *= momentum
                    b[idx] += vals * (1 - frozen["dampening"])
                    arr += b * -lr
                    continue
                if st.get("momentum_buffer") is None:
                    blin, bvals = lin, vals.copy()
                else:
                    old = st["momentum_buffer"].coalesce()
                    blin, bvals = _merge(_linear(tuple(old.indices().numpy()), p.shape[:k]),
                                         old.values().numpy(), lin, vals, momentum,
                                         1 - frozen["dampening"])
                st["momentum_buffer"] = _sparse_tensor(blin, bvals, p, k)
                if frozen["nesterov"]:
                    step_lin, step_vals = _merge(lin, vals, blin, bvals, 1, momentum)
                else:
                    step_lin, step_vals = blin, bvals
            if step_lin.size:
                at = np.unravel_index(step_lin, tuple(p.shape[:k]))
                arr[at] += step_vals * -lr
    return commit


def _adagrad_sparse_step(self, items, work):
    """Adagrad's step of the parameters with sparse gradients, as torch's: the gradient is
    coalesced, the sum of squares and the parameter change on its elements only;
    weight decay raises RuntimeError (torch's message). Unlike torch, the failed step leaves
    ``state['step']`` as it was."""
    todo = []
    for gi, pi, p, arr, g in items:
        frozen = work[gi][0]
        where = _where(gi, pi)
        if frozen["weight_decay"] != 0:
            raise RuntimeError(f"{where}: weight_decay option is not compatible with sparse "
                               f"gradients")
        k, idx, vals = _coalesced(g, p, where)
        st = self.state.get(p)
        if st:
            _dense_state(st.get("sum"), p, where, "sum")
            step = st.get("step")
            if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32
                    and step.numel() == 1 and step.layout is torch.strided):
                raise TypeError(f"{where}: state['step'] must be a 0-d float32 tensor, got "
                                f"{step!r}")
        todo.append((p, arr, idx, vals, frozen))

    def commit():
        for p, arr, idx, vals, frozen in todo:
            st = self.state.get(p)
            if not st:
                fresh = {}
                self._init_state(fresh, arr, frozen)
                self.state[p] = st = {key: _to_tensor(v) for key, v in fresh.items()}
            step = st["step"].detach().numpy()
            step += np.float32(1)
            clr = frozen["lr"] / (1 + (float(step) - 1) * frozen["lr_decay"])
            if frozen["maximize"]:
                vals = -vals
            total = st["sum"].detach().numpy()
            total[idx] += vals * vals
            std = np.sqrt(total[idx])
            std += frozen["eps"]
            arr[idx] += (vals / std) * -clr
    return commit


SGD._sparse_step = _sgd_sparse_step
SGD._spec.sparse_ok = True
Adagrad._sparse_step = _adagrad_sparse_step
Adagrad._spec.sparse_ok = True


class SparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` stepping with fastopt's C kernel for row-sparse gradients
    (see :mod:`fastopt.torch`); arguments, defaults, errors and state (a Python int
    ``step``, ``exp_avg`` and ``exp_avg_sq`` tensors) are torch's.

    Gradients are sparse COO tensors, as an ``Embedding(sparse=True)`` makes: uncoalesced
    (duplicates are summed, as torch coalesces) and of any ``sparse_dim`` (the sparse
    dimensions index the rows, the dense ones make each row). Parameters are contiguous
    float32 or float64 CPU tensors (a non-contiguous one is refused by ``add_param_group``
    naming it); a dense gradient raises RuntimeError, as torch. A step checks every
    parameter, gradient and state entry before it changes anything, and so does
    ``load_state_dict`` with the state it loads (a torch.optim.SparseAdam state dict loads,
    and the reverse).

    """ + "\n" + (torch.optim.SparseAdam.__doc__ or "")

    # fastopt's checked load_state_dict, as the other classes': the loaded state is checked
    # by fastopt.SparseAdam's state check (an int step, moments of the parameter's dtype
    # and shape), the one its step makes
    _kernel = None
    _nonneg_at_step = ()
    _beta1_division = False
    _lazy_state = False
    _flag_defaults = fastopt.SparseAdam._flag_defaults
    _scalar_state_keys = fastopt.SparseAdam._scalar_state_keys
    _hyper_kinds = _Optimizer._hyper_kinds
    _freeze = _Optimizer._freeze
    _check_step = _Optimizer._check_step
    _backfill = _Optimizer._backfill
    _loaded_groups = staticmethod(_Optimizer._loaded_groups)
    _load_stored = _Optimizer._load_stored
    _check_loaded_state = _check_loaded_tensors(_Optimizer._check_loaded_state)
    _check_existing_state = fastopt.SparseAdam._check_existing_state
    _check_state = staticmethod(fastopt.SparseAdam._check_state)
    load_state_dict = _KernelStep.load_state_dict

    def _cast_state(self, param, array, value, key, where):
        _dense_saved_state(value, key, where)
        return _to_tensor(fastopt.SparseAdam._cast_state(self, param, array, value, key, where))

    def add_param_group(self, param_group):
        """``torch.optim.Optimizer.add_param_group``, and then fastopt's checks (a complex or
        sparse parameter raises torch's ValueError). A refused group is not added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            for pi, p in enumerate(group["params"]):
                if isinstance(p, torch.Tensor) and p.is_sparse:
                    raise ValueError(f"Sparse params at indices [[{gi}, {pi}]]: SparseAdam "
                                     f"requires dense parameter tensors")
                if isinstance(p, torch.Tensor) and p.is_complex():
                    raise ValueError(f"Complex params at indices [[{gi}, {pi}]]: SparseAdam "
                                     f"does not support complex parameters")
                TORCH_ADAPTER.check(p, gi, pi, group)
        except BaseException:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure=None):
        """One SparseAdam step of all groups; returns ``closure()``'s value when given."""
        _kernels.claim_step(self)
        try:
            return self._sparse_adam_step(closure)
        finally:
            del self.__dict__["_fastopt_step"]

    def _sparse_adam_step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups, touched, created, steps = [], [], {}, {}
        for gi, group in enumerate(self.param_groups):
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            items = []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = _where(gi, pi)
                items.append(self._item(p, g, where, gi, pi, created, steps, lr, beta1,
                                        beta2))
                touched.append(p)
            groups.append((items, beta1, beta2, float(group["eps"]),
                           bool(group.get("maximize", False))))
        # everything is checked: store the new state, then one C call sets the counters
        # and updates every group
        for p, fresh in created.values():
            self.state[p] = fresh
        counters = [(self.state[p], steps[id(p)]) for p in touched]
        _kernels.run_sparse_adam(groups, counters)
        if touched:
            TORCH_ADAPTER.updated(touched)
        return loss

    def _item(self, p, g, where, gi, pi, created, steps, lr, beta1, beta2):
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{where}: .grad must be a tensor or None, got {type(g).__name__}")
        if g.layout is torch.strided:
            raise RuntimeError(f"{where}: SparseAdam does not support dense gradients, please "
                               f"consider Adam instead")
        if g.layout is not torch.sparse_coo or g.device.type != "cpu":
            raise RuntimeError(f"{where}: the gradient must be a sparse COO CPU tensor, got "
                               f"layout {g.layout} on {g.device}")
        if g.dtype != p.dtype:
            raise TypeError(f"{where}: .grad has dtype {g.dtype}, the parameter {p.dtype}")
        arr = TORCH_ADAPTER.data(p, gi, pi)
        _kernels.check_param(arr, gi, pi)
        k, idx, vals = _coalesced(g, p, where)
        rows = np.ascontiguousarray(_linear(idx, p.shape[:k]), dtype=np.int64)
        vals = np.ascontiguousarray(vals.reshape(rows.size, -1) if rows.size else vals)
        entry = created.get(id(p))
        st = entry[1] if entry is not None else self.state.get(p)
        if st:
            step = st.get("step")
            if (not isinstance(step, int) or isinstance(step, bool)) or step < 0:
                raise TypeError(f"{where}: state['step'] must be an int >= 0, got {step!r}")
            for key in ("exp_avg", "exp_avg_sq"):
                view = _dense_state(st.get(key), p, where, key)
                if not view.flags.c_contiguous:
                    raise ValueError(f"{where}: state[{key!r}] must be contiguous")
        else:
            st = {"step": 0, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            created[id(p)] = (p, st)
        t = steps[id(p)] = steps.get(id(p), st["step"]) + 1
        step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        return (arr, rows, vals, st["exp_avg"].detach().numpy(),
                st["exp_avg_sq"].detach().numpy(), step_size)


class Muon(_NumpyStep, torch.optim.Muon):
    """``torch.optim.Muon`` stepping with :class:`fastopt.Muon`'s NumPy code (see
    :mod:`fastopt.torch`); arguments, defaults, errors and state (a ``momentum_buffer``
    tensor, updated in place) are torch's.

    The Newton-Schulz iteration is torch's bfloat16 one, emulated operation by operation:
    torch's numbers but for the order in which a matrix product sums in float32, which the
    iteration amplifies (see :class:`fastopt.Muon`); the momentum buffers and the lerps
    round as torch's. ``ns_dtype`` (an attribute, as :class:`fastopt.Muon`'s, default
    ``"bfloat16"``; ``"float32"`` or ``"float64"`` orthogonalise more accurately) is kept by
    pickling and copies, and is not part of ``defaults``, the groups or ``state_dict()``.

    Beyond torch: every parameter, gradient and state tensor of every group is checked
    before anything changes (a bad one raises naming it, with nothing changed; torch updates
    the groups before it), and with ``adjust_lr_fn`` None or ``"original"`` a parameter with
    no columns raises ValueError (torch raises ZeroDivisionError after updating the
    parameters before it). As torch, the constructor takes 2-D parameters only, a complex
    parameter is taken by it and refused by a step that has its gradient (RuntimeError,
    torch's text, naming it), and a sparse gradient raises RuntimeError.

    """

    _fastopt = fastopt.Muon
    _borrowed = ("_prepare_step", "_update_groups", "_check_existing_state", "_check_frozen",
                 "_check_param", "_init_state")
    _complex_at_step = True
    #: precision of the Newton-Schulz iteration (see :class:`fastopt.Muon`)
    ns_dtype = fastopt.Muon.ns_dtype

    def __getstate__(self):
        return {**super().__getstate__(), "ns_dtype": self.ns_dtype}

    def _numpy_step(self, closure):
        ns_dtype = self.ns_dtype
        _check_ns_dtype(ns_dtype)
        return self._in_place_step(closure, ns_dtype)

    def _cast_state(self, param, array, value, key, where):
        _dense_saved_state(value, key, where)
        return _to_tensor(_Optimizer._cast_state(self, param, array, value, key, where))


Muon.__doc__ += torch.optim.Muon.__doc__ or ""

__all__ += ["Muon"]
