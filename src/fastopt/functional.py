"""Functional optimizers over fastopt's C kernels, for code that keeps the state itself.

Two forms, both stepping through the same generic path as the optimizer classes
(``_kernels.update``, one call into C), so their numbers are the classes' bit for bit:

* **torch's functional shape.** ``adam(params, grads, exp_avgs, exp_avg_sqs,
  max_exp_avg_sqs, state_steps, ..., *, amsgrad, beta1, beta2, lr, weight_decay, eps,
  maximize)`` and the same for ``sgd``, ``adagrad``, ``rmsprop``, ``adamw``, ``adadelta``,
  ``adamax``, ``nadam``, ``radam``, ``asgd`` and ``rprop``: torch 2.13's
  ``torch.optim.<module>.<name>`` argument names, order and defaults. They update
  ``params`` and the state lists in place (``state_steps`` are 0-d float32 arrays, advanced
  by 1), as torch's do. ``lion`` has the same shape (torch has no Lion).
* **optax's shape.** ``tx = transformation("adam", lr=1e-3)``; ``state = tx.init(params)``;
  ``updates, state = tx.update(grads, state, params, out=buffers)``: the update is written
  into the caller's ``out`` arrays and not applied (``apply_updates(params, updates)`` adds
  it in place); ``params`` and ``grads`` are pytrees (nested dicts, lists, tuples of arrays,
  in the order of ``fastopt._pytree``).

Arrays are NumPy arrays (torch CPU tensors are taken through ``tensor.numpy()``, sharing
memory; bfloat16 tensors as ``ml_dtypes.bfloat16`` views of their memory) of float32,
float64, float16 or bfloat16 (``ml_dtypes.bfloat16``): 16-bit parameters, gradients and
state (all of one dtype, as torch's functions need) step in float32 arithmetic with each
stored result rounded to the dtype, as the classes step them. Bad input (lists of other
lengths, a missing or None state entry, wrong shapes or dtypes, an ``out`` buffer that does
not fit) raises naming the argument and index (``exp_avgs[2]``, ``out['w']``), and nothing
has changed.
"""
import re
import sys

import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # NumPy < 2
    _byte_bounds = np.byte_bounds  # type: ignore[attr-defined]

from fastopt import _pytree
from fastopt._kernels import check_held
from fastopt.adadelta import Adadelta
from fastopt.adagrad import Adagrad
from fastopt.adam import Adam, AdamW
from fastopt.adamax import Adamax
from fastopt.asgd import ASGD
from fastopt.lion import Lion
from fastopt.nadam import NAdam
from fastopt.optimizer import Optimizer, kernel_optimizers
from fastopt.parameter import Parameter
from fastopt.radam import RAdam
from fastopt.rmsprop import RMSprop
from fastopt.rprop import Rprop
from fastopt.sgd import SGD

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "adadelta", "adamax", "nadam",
           "radam", "asgd", "rprop", "lion", "transformation", "Transformation",
           "TransformationState", "apply_updates"]


# Shared machinery -------------------------------------------------------------------------

def _placeholder():
    # the optimizer a call builds is constructed on this one array (its constructor's checks
    # of the hyperparameters run; the caller's arrays then replace it, and the step checks
    # them): Adagrad's eager state is made for a 1-element array, not for the caller's
    return Parameter(np.zeros(1, np.float32))


def _as_array(x, where):
    """``x`` as an ndarray: itself, or a torch tensor's NumPy view."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        if x.device.type == "cpu" and x.layout is sys.modules["torch"].strided:
            check_held(x, where)  # freed or shrunk: .numpy() would read past it
        try:
            t = x.detach()
            if str(t.dtype) == "torch.bfloat16":
                return _bfloat16_view(t, where)
            return t.numpy()
        except (TypeError, RuntimeError) as e:
            raise TypeError(f"{where}: {e}") from None
    raise TypeError(f"{where} must be a numpy.ndarray, got {type(x).__name__}")


def _bfloat16_view(t, where):
    """The ``ml_dtypes.bfloat16`` array on the memory of the bfloat16 CPU tensor ``t``
    (``tensor.numpy()`` refuses bfloat16; its bits are viewed instead)."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(f"{where}: a bfloat16 tensor is taken as an ml_dtypes.bfloat16 "
                        f"array, and ml_dtypes is not installed (pip install ml_dtypes)"
                        ) from None
    import torch
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def _wrap(x, where):
    """A Parameter sharing the memory of array ``x`` (a new object: ``x.grad`` untouched)."""
    arr = _as_array(x, where)
    try:
        return Parameter(arr.view(np.ndarray))
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


def _check_len(name, values, n):
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of arrays, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries, params {n}")


_AT = re.compile(r"param_groups\[0\]\['params'\]\[(\d+)\]")


def _rename(e, name, hyper="hyperparameters"):
    """``e`` with the step's names of parameter ``i`` (``param_groups[0]['params'][i]``, its
    ``.grad``, its ``state['exp_avg']``) replaced by ``name(i, kind, key)``, ``kind`` being
    "grad", "state" or "param"; ``param_groups[0]`` by ``hyper``."""
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    out, pos = [], 0
    for m in _AT.finditer(msg):
        i, rest = int(m.group(1)), msg[m.end():]
        s = re.match(r": state(?: has no |\[)'(\w+)'", rest)
        if rest.startswith(": .grad"):
            label = name(i, "grad", None)
        elif s:
            label = name(i, "state", s.group(1))
        else:
            label = name(i, "param", None)
        out.append(msg[pos:m.start()])
        out.append(label)
        pos = m.end()
    out.append(msg[pos:])
    return type(e)("".join(out).replace("param_groups[0]", hyper))


def _run(cls, hyper, params, grads, state_lists):
    """One step of ``cls`` (built with the keyword arguments ``hyper``) on the caller's
    lists: ``state_lists`` maps each state key to ``(argument name, list)``."""
    n = len(params) if isinstance(params, (list, tuple)) else None
    if n is None:
        raise TypeError(f"params must be a list of arrays, got {type(params).__name__}")
    _check_len("grads", grads, n)
    opt = cls([_placeholder()], **hyper)
    group = opt.param_groups[0]
    try:
        frozen = opt._freeze(group)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise type(e)(f"hyperparameters: {e}") from None
    spec = cls._spec
    needed = [k for k in spec.layout(frozen) if k is not None]
    needed += (["step"] if spec.step_counter else []) + list(spec.scalars)
    lazy = spec.lazy
    for key in needed:
        arg, values = state_lists[key]
        _check_len(arg, values, n)
        if lazy and not isinstance(values, list) and any(v is None for v in values):
            raise TypeError(f"{arg} must be a list: the buffers made for its None entries "
                            f"are stored into it")
    wrapped = [_wrap(p, f"params[{i}]") for i, p in enumerate(params)]
    state = {}
    for i, p in enumerate(wrapped):
        g = grads[i]
        p.grad = g if isinstance(g, np.ndarray) or g is None else _as_array(g, f"grads[{i}]")
        if p.grad is None:
            raise TypeError(f"grads[{i}] is None; pass a gradient for every parameter")
        entry = {}
        for key in needed:
            arg, values = state_lists[key]
            value = values[i]
            if value is None:
                if lazy:
                    continue  # SGD's momentum buffer: created from this gradient
                raise KeyError(f"{arg}[{i}] is None; the step needs it")
            entry[key] = _as_array(value, f"{arg}[{i}]")
        state[p] = entry
    opt.state = state
    group["params"] = wrapped
    try:
        opt._update()
    except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError) as e:
        def name(i, kind, key):
            if kind == "grad":
                return f"grads[{i}]"
            if kind == "state" and key in state_lists:
                return f"{state_lists[key][0]}[{i}]"
            return f"params[{i}]"
        raise _rename(e, name) from None
    if lazy and needed:
        # torch's sgd writes the buffers it creates into momentum_buffer_list
        arg, values = state_lists[needed[0]]
        for i, p in enumerate(wrapped):
            if values[i] is None:
                values[i] = state[p][needed[0]]
    for p in wrapped:
        p.grad = None


def _no_scaling(grad_scale, found_inf):
    if grad_scale is not None or found_inf is not None:
        raise ValueError("grad_scale and found_inf are not supported (torch uses them in its "
                         "fused CUDA/CPU kernels only; unscale the gradients first)")


# torch's functional shape -------------------------------------------------------------------

def sgd(params, d_p_list, momentum_buffer_list, has_sparse_grad=False, foreach=None,
        fused=None, grad_scale=None, found_inf=None, *, weight_decay, momentum, lr, dampening,
        nesterov, maximize):
    """SGD, as ``torch.optim.sgd.sgd``: one step of :class:`fastopt.SGD` on the lists.

    ``momentum_buffer_list`` holds each parameter's buffer or None; a None entry is
    created from the gradient on this step and stored into the list, as torch does. With
    ``momentum == 0`` the list is not read. ``has_sparse_grad``, ``foreach`` and ``fused``
    are accepted and ignored; ``grad_scale`` and ``found_inf`` must be None (torch's
    single-tensor path asserts it). The hyperparameters are checked as the class checks
    them (torch's function checks none)."""
    _no_scaling(grad_scale, found_inf)
    _run(SGD, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                   nesterov=nesterov, maximize=maximize),
         params, d_p_list, {"momentum_buffer": ("momentum_buffer_list", momentum_buffer_list)})


def adagrad(params, grads, state_sums, state_steps, fused=None, grad_scale=None,
            found_inf=None, has_sparse_grad=False, foreach=None, differentiable=False,
            has_complex=False, *, lr, weight_decay, lr_decay, eps, maximize):
    """Adagrad, as ``torch.optim.adagrad.adagrad`` (see :class:`fastopt.Adagrad`)."""
    _no_scaling(grad_scale, found_inf)
    _run(Adagrad, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                       maximize=maximize),
         params, grads, {"sum": ("state_sums", state_sums),
                         "step": ("state_steps", state_steps)})


def rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps,
            foreach=None, maximize=False, differentiable=False, capturable=False,
            has_complex=False, *, lr, alpha, eps, weight_decay, momentum, centered):
    """RMSprop, as ``torch.optim.rmsprop.rmsprop`` (see :class:`fastopt.RMSprop`).
    ``grad_avgs`` is read only when ``centered``, ``momentum_buffer_list`` only when
    ``momentum > 0`` (torch's class passes empty lists otherwise)."""
    _run(RMSprop, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                       momentum=momentum, centered=centered, maximize=maximize),
         params, grads, {"square_avg": ("square_avgs", square_avgs),
                         "grad_avg": ("grad_avgs", grad_avgs),
                         "momentum_buffer": ("momentum_buffer_list", momentum_buffer_list),
                         "step": ("state_steps", state_steps)})


def _betas(beta1, beta2):
    return (float(beta1), float(beta2))


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, foreach=None,
         capturable=False, differentiable=False, fused=None, grad_scale=None, found_inf=None,
         has_complex=False, decoupled_weight_decay=False, *, amsgrad, beta1, beta2, lr,
         weight_decay, eps, maximize):
    """Adam, as ``torch.optim.adam.adam`` (see :class:`fastopt.Adam`).
    ``max_exp_avg_sqs`` is read only with ``amsgrad`` (torch's class passes an empty list
    otherwise); ``lr``, ``beta1`` and ``beta2`` may be numbers or 1-element arrays."""
    _no_scaling(grad_scale, found_inf)
    _run(Adam, dict(lr=float(lr), betas=_betas(beta1, beta2), eps=eps,
                    weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                    decoupled_weight_decay=decoupled_weight_decay),
         params, grads, _adam_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps))


def _adam_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
    return {"exp_avg": ("exp_avgs", exp_avgs), "exp_avg_sq": ("exp_avg_sqs", exp_avg_sqs),
            "max_exp_avg_sq": ("max_exp_avg_sqs", max_exp_avg_sqs),
            "step": ("state_steps", state_steps)}


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, foreach=None,
          capturable=False, differentiable=False, fused=None, grad_scale=None, found_inf=None,
          has_complex=False, *, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize):
    """AdamW, as ``torch.optim.adamw.adamw``: :func:`adam` with decoupled weight decay."""
    _no_scaling(grad_scale, found_inf)
    _run(AdamW, dict(lr=float(lr), betas=_betas(beta1, beta2), eps=eps,
                     weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize),
         params, grads, _adam_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps))


def adadelta(params, grads, square_avgs, acc_deltas, state_steps, capturable=False,
             foreach=None, differentiable=False, has_complex=False, *, lr, rho, eps,
             weight_decay, maximize):
    """Adadelta, as ``torch.optim.adadelta.adadelta`` (see :class:`fastopt.Adadelta`)."""
    _run(Adadelta, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                        maximize=maximize),
         params, grads, {"square_avg": ("square_avgs", square_avgs),
                         "acc_delta": ("acc_deltas", acc_deltas),
                         "step": ("state_steps", state_steps)})


def adamax(params, grads, exp_avgs, exp_infs, state_steps, foreach=None, maximize=False,
           differentiable=False, capturable=False, has_complex=False, *, eps, beta1, beta2,
           lr, weight_decay):
    """Adamax, as ``torch.optim.adamax.adamax`` (see :class:`fastopt.Adamax`)."""
    _run(Adamax, dict(lr=lr, betas=_betas(beta1, beta2), eps=eps, weight_decay=weight_decay,
                      maximize=maximize),
         params, grads, {"exp_avg": ("exp_avgs", exp_avgs), "exp_inf": ("exp_infs", exp_infs),
                         "step": ("state_steps", state_steps)})


def nadam(params, grads, exp_avgs, exp_avg_sqs, mu_products, state_steps,
          decoupled_weight_decay=False, foreach=None, capturable=False, differentiable=False,
          has_complex=False, maximize=False, *, beta1, beta2, lr, weight_decay, momentum_decay,
          eps):
    """NAdam, as ``torch.optim.nadam.nadam`` (see :class:`fastopt.NAdam`);
    ``mu_products`` are 0-d float32 arrays, updated in place."""
    _run(NAdam, dict(lr=lr, betas=_betas(beta1, beta2), eps=eps, weight_decay=weight_decay,
                     momentum_decay=momentum_decay,
                     decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
         params, grads, {"exp_avg": ("exp_avgs", exp_avgs),
                         "exp_avg_sq": ("exp_avg_sqs", exp_avg_sqs),
                         "mu_product": ("mu_products", mu_products),
                         "step": ("state_steps", state_steps)})


def radam(params, grads, exp_avgs, exp_avg_sqs, state_steps, decoupled_weight_decay=False,
          foreach=None, differentiable=False, capturable=False, has_complex=False,
          maximize=False, *, beta1, beta2, lr, weight_decay, eps):
    """RAdam, as ``torch.optim.radam.radam`` (see :class:`fastopt.RAdam`)."""
    _run(RAdam, dict(lr=lr, betas=_betas(beta1, beta2), eps=eps, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
         params, grads, {"exp_avg": ("exp_avgs", exp_avgs),
                         "exp_avg_sq": ("exp_avg_sqs", exp_avg_sqs),
                         "step": ("state_steps", state_steps)})


def asgd(params, grads, axs, mus, etas, state_steps, foreach=None, maximize=False,
         differentiable=False, capturable=False, has_complex=False, *, lambd, lr, t0, alpha,
         weight_decay):
    """ASGD, as ``torch.optim.asgd.asgd`` (see :class:`fastopt.ASGD`); ``mus`` and ``etas``
    are 0-d float32 arrays, updated in place."""
    _run(ASGD, dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay,
                    maximize=maximize),
         params, grads, {"ax": ("axs", axs), "mu": ("mus", mus), "eta": ("etas", etas),
                         "step": ("state_steps", state_steps)})


def rprop(params, grads, prevs, step_sizes, state_steps, foreach=None, capturable=False,
          maximize=False, differentiable=False, has_complex=False, *, step_size_min,
          step_size_max, etaminus, etaplus):
    """Rprop, as ``torch.optim.rprop.rprop`` (see :class:`fastopt.Rprop`); ``step_sizes``
    are the per-element step sizes (the class starts them at ``lr``)."""
    _run(Rprop, dict(etas=(float(etaminus), float(etaplus)),
                     step_sizes=(step_size_min, step_size_max), maximize=maximize),
         params, grads, {"prev": ("prevs", prevs), "step_size": ("step_sizes", step_sizes),
                         "step": ("state_steps", state_steps)})


def lion(params, grads, exp_avgs, foreach=None, maximize=False, *, lr, beta1, beta2,
         weight_decay):
    """Lion in the shape of torch's functions (torch has no Lion; see
    :class:`fastopt.Lion`). Lion keeps no step counter."""
    _run(Lion, dict(lr=lr, betas=_betas(beta1, beta2), weight_decay=weight_decay,
                    maximize=maximize),
         params, grads, {"exp_avg": ("exp_avgs", exp_avgs)})


# optax's shape ----------------------------------------------------------------------------

class TransformationState:
    """The state of a :class:`Transformation`, kept by the caller.

    Attributes
    ----------
    hyperparams : dict
        The hyperparameters of the next update (a parameter group without ``params``:
        ``lr``, ``betas``, ...); set them between updates to schedule them.
    state : list of dict
        Per parameter leaf, in the pytree order, the state a class optimizer keeps in
        ``optimizer.state[p]`` (``step``, ``exp_avg``, ...), updated in place.
    """

    __slots__ = ("hyperparams", "state", "_treedef", "_paths", "_opt", "_outs", "_wrapped")

    def __init__(self, hyperparams, state, treedef, paths):
        self.hyperparams = hyperparams
        self.state = state
        self._treedef = treedef
        self._paths = paths
        self._opt = self._outs = self._wrapped = None

    def __repr__(self):
        return (f"TransformationState(hyperparams={self.hyperparams!r}, "
                f"{len(self.state)} parameters)")


class Transformation:
    """An optimizer as optax's ``init`` / ``update`` pair (made by :func:`transformation`).

    Parameters
    ----------
    optimizer : str or Optimizer subclass
        A per-element fastopt optimizer (``fastopt.OPTIMIZERS``), by name in any case.
    **hyperparameters
        The class's constructor arguments (``lr``, ``betas``, ...), checked as it checks
        them.
    """

    def __init__(self, optimizer, **hyperparameters):
        cls = _kernel_class(optimizer)
        self.optimizer = cls
        self.hyperparameters = dict(hyperparameters)
        self._template = cls([_placeholder()], **hyperparameters)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return f"transformation({self.optimizer.__name__!r}{', ' if args else ''}{args})"

    def init(self, params):
        """The state of parameters ``params`` (a pytree of float32, float64, float16 or
        bfloat16 arrays) before their first update: a :class:`TransformationState`, made
        as the class makes it (zeros; Adagrad's ``initial_accumulator_value``, Rprop's
        ``lr``, ...), its arrays of each parameter's dtype."""
        paths, leaves, treedef = _pytree.flatten_with_paths(params)
        opt = self._template
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        frozen = opt._freeze(opt.param_groups[0])
        state = []
        for leaf, path in zip(leaves, paths):
            where = _pytree.path_str("params", path)
            arr = _wrap(leaf, where).view(np.ndarray)
            entry = {}
            if not self.optimizer._lazy_state:
                opt._init_state(entry, arr, frozen)
            state.append(entry)
        return TransformationState(group, state, treedef, paths)

    def update(self, grads, state, params, *, out=None):
        """``(updates, state)``: the change one step of the optimizer makes to ``params``
        with gradients ``grads``, without applying it, and the state after that step.

        ``grads``, ``params`` and ``out`` are pytrees of ``params``'s structure at
        :meth:`init`. The updates are written into ``out`` (arrays of the parameters'
        shapes and dtypes, C-contiguous and writable, not overlapping them), which is
        returned: with ``out`` given nothing is allocated per step (without it, new arrays
        are). ``state`` is updated in place and returned.

        The kernel writes the new parameter values into ``out`` and then subtracts
        ``params``, so ``updates`` is exactly ``new - params`` as the class computes
        ``new``, and ``params + updates`` gives the class's ``new`` whenever that
        subtraction is exact (always when ``new`` and ``params`` are within a factor 2 of
        each other, the usual case for small steps). Bad input raises naming the argument
        and its path before anything changes; the one exception is a memory overlap that
        only the step detects (``grads`` or state arrays sharing memory with ``out``),
        which leaves ``params``'s values in ``out`` and the state unchanged.
        """
        if not isinstance(state, TransformationState):
            raise TypeError(f"state must be a TransformationState from init(), got "
                            f"{type(state).__name__}")
        treedef, paths = state._treedef, state._paths
        pleaves = _pytree.flatten_like(treedef, params, "params")
        gleaves = _pytree.flatten_like(treedef, grads, "grads", "params")
        if len(state.state) != len(pleaves):
            raise ValueError(f"state.state has {len(state.state)} entries, params "
                             f"{len(pleaves)}")
        oleaves = (None if out is None
                   else _pytree.flatten_like(treedef, out, "out", "params"))
        group = dict(self._template.param_groups[0])
        group.update(state.hyperparams)
        try:
            frozen = self._template._freeze(group)
        except (TypeError, ValueError, ZeroDivisionError, KeyError) as e:
            raise type(e)(f"state.hyperparams: {e}") from None
        spec = self.optimizer._spec
        needed = () if spec.lazy else tuple(k for k in spec.layout(frozen) if k is not None)
        needed += (("step",) if spec.step_counter else ()) + tuple(spec.scalars)
        parrs, garrs = [], []
        for i, path in enumerate(paths):
            p = _as_array(pleaves[i], _pytree.path_str("params", path))
            g = _as_array(gleaves[i], _pytree.path_str("grads", path))
            if g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(f"{_pytree.path_str('grads', path)} has dtype {g.dtype} and "
                                 f"shape {g.shape}; params{_tail(path)} has {p.dtype} "
                                 f"{p.shape}")
            _check_entry(state.state[i], p, i, path, self.optimizer, needed)
            if oleaves is not None:
                _check_out(oleaves[i], p, path)
            parrs.append(p)
            garrs.append(g)
        if oleaves is None:
            oleaves = [np.empty_like(p, order="C") for p in parrs]
        else:
            _check_overlaps(oleaves, parrs, garrs, state.state, paths)
        opt = self._bind(state, oleaves)
        opt.param_groups[0].update(state.hyperparams)
        wrapped = state._wrapped
        for w, o, p, g, entry in zip(wrapped, oleaves, parrs, garrs, state.state):
            np.copyto(o, p)
            w.grad = g
            if opt.state.get(w) is not entry:
                opt.state[w] = entry

        def name(i, kind, key):
            if kind == "grad":
                return _pytree.path_str("grads", paths[i])
            if kind == "state":
                return f"state.state[{i}]"
            return _pytree.path_str("out", paths[i])
        try:
            opt._update()
        except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError) as e:
            raise _rename(e, name, hyper="state.hyperparams") from None
        finally:
            for w in wrapped:
                w.grad = None
        for o, p in zip(oleaves, parrs):
            np.subtract(o, p, out=o)
        if out is None:
            out = _pytree.unflatten(treedef, oleaves)
        return out, state

    def _bind(self, state, oleaves):
        """The optimizer that steps ``state``'s parameters in the ``out`` arrays: the one
        of the previous update when ``out`` holds the same arrays."""
        outs = state._outs
        if (state._opt is not None and len(outs) == len(oleaves)
                and all(a is b for a, b in zip(outs, oleaves))):
            return state._opt
        opt = self.optimizer([_placeholder()], **self.hyperparameters)
        wrapped = [Parameter(o.view(np.ndarray)) for o in oleaves]
        opt.param_groups[0]["params"] = wrapped
        opt.state = dict(zip(wrapped, state.state))
        state._opt, state._outs, state._wrapped = opt, tuple(oleaves), wrapped
        return opt


def _tail(path):
    return _pytree.path_str("", path)


def _check_entry(entry, p, i, path, cls, needed):
    """The state of leaf ``i`` holds the ``needed`` entries, its arrays of its parameter's
    shape and dtype."""
    if not isinstance(entry, dict):
        raise TypeError(f"state.state[{i}] (params{_tail(path)}) must be a dict, got "
                        f"{type(entry).__name__}")
    for key in needed:
        if key not in entry:
            raise KeyError(f"state.state[{i}] (params{_tail(path)}) has no {key!r}, which "
                           f"the update needs")
    scalars = cls._scalar_state_keys
    for key, value in entry.items():
        if key in scalars:
            continue
        if not isinstance(value, np.ndarray):
            raise TypeError(f"state.state[{i}][{key!r}] (params{_tail(path)}) must be an "
                            f"array, got {type(value).__name__}")
        if value.shape != p.shape or value.dtype != p.dtype:
            raise ValueError(f"state.state[{i}][{key!r}] has dtype {value.dtype} and shape "
                             f"{value.shape}; params{_tail(path)} has {p.dtype} {p.shape}")


def _check_out(o, p, path):
    where = _pytree.path_str("out", path)
    if not isinstance(o, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(o).__name__}")
    if o.shape != p.shape or o.dtype != p.dtype:
        raise ValueError(f"{where} has dtype {o.dtype} and shape {o.shape}; "
                         f"params{_tail(path)} has {p.dtype} {p.shape}")
    if not (o.flags.c_contiguous and o.flags.aligned and o.flags.writeable
            and o.dtype.isnative):
        raise ValueError(f"{where} must be C-contiguous, aligned and writable")


def _check_overlaps(outs, params, grads, states, paths):
    """Raise ValueError when an ``out`` array's memory span meets another ``out`` array's or
    that of a parameter, gradient or state array (all of them: the update writes ``out``
    before the step's own checks run). One sort of the spans, O(n log n)."""
    spans = []
    for i, o in enumerate(outs):
        spans.append((*_byte_bounds(o), True, i, "out", None))
    for kind, arrays in (("params", params), ("grads", grads)):
        for i, a in enumerate(arrays):
            spans.append((*_byte_bounds(a), False, i, kind, None))
    for i, entry in enumerate(states):
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                spans.append((*_byte_bounds(value), False, i, "state", key))
    spans = [s for s in spans if s[1] > s[0]]
    spans.sort(key=lambda s: s[0])

    def label(s):
        if s[4] == "state":
            return f"state.state[{s[3]}][{s[5]!r}]"
        return _pytree.path_str(s[4], paths[s[3]])

    last_out = last_any = None
    for s in spans:
        other = last_any if s[2] else last_out
        if other is not None and other[1] > s[0]:
            first, second = (s, other) if s[2] else (other, s)
            raise ValueError(f"{label(first)} shares memory with {label(second)}; the update "
                             f"is written to out without touching the other arrays")
        if last_any is None or s[1] > last_any[1]:
            last_any = s
        if s[2] and (last_out is None or s[1] > last_out[1]):
            last_out = s


def _kernel_class(optimizer):
    opts = kernel_optimizers()
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        cls = optimizer
    elif isinstance(optimizer, str):
        cls = {name.lower(): c for name, c in opts.items()}.get(optimizer.lower())
        if cls is None:
            raise ValueError(f"unknown optimizer {optimizer!r}; one of {list(opts)}")
    else:
        raise TypeError(f"optimizer must be a name or an Optimizer subclass, got "
                        f"{type(optimizer).__name__}")
    if cls._kernel is None:
        raise ValueError(f"{cls.__name__} has no per-element kernel; a transformation takes "
                         f"one of {list(opts)}")
    return cls


def transformation(optimizer, **hyperparameters):
    """An optax-style ``init`` / ``update`` pair for a per-element fastopt optimizer.

    Examples
    --------
    >>> tx = fastopt.functional.transformation("adam", lr=1e-2)
    >>> params = {"w": np.ones(3, np.float32), "b": np.zeros(1, np.float32)}
    >>> state = tx.init(params)
    >>> buf = {k: np.empty_like(v) for k, v in params.items()}
    >>> grads = {"w": 2 * params["w"], "b": np.ones(1, np.float32)}
    >>> updates, state = tx.update(grads, state, params, out=buf)
    >>> params = fastopt.functional.apply_updates(params, updates)
    """
    return Transformation(optimizer, **hyperparameters)


def apply_updates(params, updates):
    """Add ``updates`` to ``params`` in place (pytrees of one structure); returns
    ``params``. Nothing is allocated."""
    pleaves, treedef = _pytree.flatten(params)
    uleaves = _pytree.flatten_like(treedef, updates, "updates", "params")
    for i, (p, u) in enumerate(zip(pleaves, uleaves)):
        if not isinstance(p, np.ndarray) or not isinstance(u, np.ndarray) \
                or p.shape != u.shape:
            raise ValueError(f"apply_updates: leaf {i} of params and updates must be arrays "
                             f"of one shape")
    for p, u in zip(pleaves, uleaves):
        np.add(p, u, out=p)
    return params
