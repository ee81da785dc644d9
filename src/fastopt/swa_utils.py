"""Stochastic Weight Averaging and EMA for fastopt: torch.optim.swa_utils for NumPy arrays and
for torch modules.

* :class:`AveragedModel` keeps a running average of a model's parameters (SWA's equal
  weights by default, an exponential moving average with :func:`get_ema_multi_avg_fn`, or
  any averaging function).  The float32/float64 updates run in fastopt's C kernels.
* :func:`update_bn` recomputes the BatchNorm statistics of a torch module, as torch's.
* :class:`SWALR` anneals each group's lr to a constant ``swa_lr`` for the averaging phase.

Given a ``torch.nn.Module``, ``AveragedModel`` is torch's (an ``nn.Module`` holding a deep
copy of the model and an ``n_averaged`` buffer, with torch's signature, ``forward``, state
dict and numbers) whose default averaging and the averaging functions of this module run in
the C kernel on the tensors' memory.  Otherwise the "model" is what fastopt optimizes: an
iterable of arrays, or any object with a ``parameters()`` method (and, optionally,
``buffers()``, for non-trained arrays such as running statistics).

Importing this module does not import torch: it looks torch up in ``sys.modules`` and only
uses it for objects that are torch's, which cannot exist before torch was imported.
"""

from __future__ import annotations

import abc
import contextlib
import math
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Union

import numpy as np

from fastopt import _kernels
from fastopt._adapters import TORCH_ADAPTER
from fastopt._kernels import check_held, storage_holds
from fastopt.lr_scheduler import _WARN_GET_LR, LRScheduler, _check_optimizer, _per_group

if TYPE_CHECKING:
    from fastopt.optimizer import Optimizer

__all__ = [
    "SWALR",
    "AveragedModel",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
    "update_bn",
]

_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- kernels


def _kernel_ok(avg):
    return (
        isinstance(avg, np.ndarray)
        and avg.dtype in _KERNEL_DTYPES
        and avg.flags.c_contiguous
        and avg.flags.writeable
        and avg.flags.aligned
    )


def _split(avg_list, cur_list):
    """Pairs the C kernels can update, and the rest (other dtypes or layouts)."""
    fast_a, fast_c, slow = [], [], []
    for a, c in zip(avg_list, cur_list):
        c = np.asarray(c)
        if _kernel_ok(a) and c.dtype == a.dtype and c.shape == a.shape:
            fast_a.append(a)
            fast_c.append(c)
        else:
            slow.append((a, c))
    return fast_a, fast_c, slow


def _lerp_inplace(dst, src, weight):
    """dst <- dst + weight * (src - dst) with ATen's lerp rounding, in C."""
    if dst:
        _kernels.average(dst, src, weight, True)


def _swa_inplace(dst, src, divisor):
    """dst <- dst + (src - dst) / divisor, in C."""
    if dst:
        _kernels.average(dst, src, divisor, False)


def _lerp_numpy(a, c, weight):
    """Fallback for dtypes without a kernel: the lerp in the array's own precision."""
    if np.issubdtype(a.dtype, np.inexact):
        w = a.dtype.type(weight)
        a[...] = a + w * (c - a)
    else:
        a[...] = a * (1 - weight) + c * weight


# --------------------------------------------------------------------------- tensors


def _torch():
    """torch if it was imported, else None."""
    return sys.modules.get("torch")


def _is_module(obj):
    torch = _torch()
    return torch is not None and isinstance(obj, torch.nn.Module)


def _torch_of(arrays):
    """torch when ``arrays`` (a list) holds torch tensors, else None (arrays)."""
    torch = _torch()
    if torch is not None and len(arrays) and isinstance(arrays[0], torch.Tensor):
        return torch
    return None


def _tensor_view(t, torch, dst):
    """The NumPy view of a dense float32/float64 CPU tensor's memory (C-contiguous and usable
    by the kernel when ``dst``), or None."""
    if (not isinstance(t, torch.Tensor) or t.layout is not torch.strided
            or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64)
            or t.is_conj() or t.is_neg() or (dst and not t.is_contiguous())
            or not storage_holds(t)):  # a freed storage: torch's own op takes it
        return None
    view = t.detach().numpy()
    return view if not dst or _kernel_ok(view) else None


def _split_tensors(avg_list, cur_list, torch):
    """The pairs of tensors the C kernel can update in place (the views of the averages, of
    the current values, and the average tensors), and the other pairs."""
    fast_a, fast_c, fast_t, slow = [], [], [], []
    for a, c in zip(avg_list, cur_list):
        va = _tensor_view(a, torch, True)
        vc = None
        if va is not None and isinstance(c, torch.Tensor) and c.dtype == a.dtype \
                and c.shape == a.shape:
            vc = _tensor_view(c, torch, False)
        if vc is None:
            slow.append((a, c))
        else:
            fast_a.append(va)
            fast_c.append(vc)
            fast_t.append(a)
    return fast_a, fast_c, fast_t, slow


def _updated(tensors):
    """Bump the autograd version counters of tensors updated through their memory, as an
    in-place torch op does."""
    if tensors:
        TORCH_ADAPTER.updated(tensors)


def _lerp_tensors(avg_list, cur_list, weight, torch):
    """``torch._foreach_lerp_(avg_list, cur_list, weight)``, in the C kernel for the pairs it
    takes (the same rounding as ATen's lerp), torch's op for the others, first."""
    if len(avg_list) != len(cur_list):
        torch._foreach_lerp_(avg_list, cur_list, weight)  # torch's error
    fast_a, fast_c, fast_t, slow = _split_tensors(avg_list, cur_list, torch)
    with torch.no_grad():
        if slow:
            torch._foreach_lerp_([a for a, _ in slow], [c for _, c in slow], weight)
    if fast_a:
        _lerp_inplace(fast_a, fast_c, float(weight))
        _updated(fast_t)


def _inexact(t, torch):
    return torch.is_floating_point(t) or torch.is_complex(t)


# --------------------------------------------------------------------------- averaging fns


def _check_decay(decay):
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")


def get_ema_multi_avg_fn(decay: float = 0.999) -> Callable[[Any, Any, Any], None]:
    """In-place EMA over lists: ``avg <- avg + (1 - decay) * (cur - avg)`` (a lerp).

    The lists hold arrays or torch tensors. For tensors it is torch's function: float and
    complex averages lerp as ``torch._foreach_lerp_`` (the float32/float64 CPU ones in
    fastopt's C kernel, with the same rounding), other dtypes take torch's own code."""
    _check_decay(decay)
    weight = 1 - decay

    def ema_update(avg_list, cur_list, num_averaged):
        torch = _torch_of(avg_list)
        if torch is not None:
            if _inexact(avg_list[0], torch):
                _lerp_tensors(avg_list, cur_list, weight, torch)
            else:
                torch.optim.swa_utils.get_ema_multi_avg_fn(decay)(avg_list, cur_list,
                                                                  num_averaged)
            return
        fast_a, fast_c, slow = _split(avg_list, cur_list)
        _lerp_inplace(fast_a, fast_c, weight)
        for a, c in slow:
            if np.issubdtype(a.dtype, np.inexact):
                _lerp_numpy(a, c, weight)
            else:  # integers: torch's weighted sum, truncated back into the array
                a[...] = a * decay + c * weight

    return ema_update


def get_swa_multi_avg_fn() -> Callable[[Any, Any, Any], None]:
    """In-place equal-weight mean over lists: ``avg <- lerp(avg, cur, 1 / (n + 1))``.

    The lists hold arrays or torch tensors; for tensors it is torch's function (see
    :func:`get_ema_multi_avg_fn`), with the weight computed from ``num_averaged`` as torch
    does (from a tensor: in float32)."""

    def swa_update(avg_list, cur_list, num_averaged):
        torch = _torch_of(avg_list)
        if torch is not None:
            if _inexact(avg_list[0], torch):
                _lerp_tensors(avg_list, cur_list, 1 / (num_averaged + 1), torch)
            else:
                torch.optim.swa_utils.get_swa_multi_avg_fn()(avg_list, cur_list,
                                                             num_averaged)
            return
        # torch computes 1 / (n + 1) from its n_averaged tensor, in float32 (the default
        # dtype), and float64 averages then use that float32 weight widened: so do we.
        weight = float(np.float32(1.0) / np.float32(num_averaged + 1))
        fast_a, fast_c, slow = _split(avg_list, cur_list)
        _lerp_inplace(fast_a, fast_c, weight)
        for a, c in slow:
            if np.issubdtype(a.dtype, np.inexact):
                _lerp_numpy(a, c, weight)
            else:
                a[...] = a + (c - a) * weight

    return swa_update


def get_ema_avg_fn(decay: float = 0.999) -> Callable[[Any, Any, Any], Any]:
    """Per-array (or tensor, without autograd) EMA returning the new average:
    ``decay * avg + (1 - decay) * cur``."""
    _check_decay(decay)

    def ema_update(avg, cur, num_averaged):
        with _no_grad(avg):
            return decay * avg + (1 - decay) * cur

    return ema_update


def get_swa_avg_fn() -> Callable[[Any, Any, Any], Any]:
    """Per-array (or tensor, without autograd) SWA mean returning the new average:
    ``avg + (cur - avg) / (n + 1)``."""

    def swa_update(avg, cur, num_averaged):
        with _no_grad(avg):
            return avg + (cur - avg) / (num_averaged + 1)

    return swa_update


def _no_grad(value):
    """``torch.no_grad()`` for a tensor (as torch's averaging functions run), else nothing."""
    torch = _torch_of([value])
    return torch.no_grad() if torch is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------- AveragedModel


def _arrays(model, what):
    """The parameter (``what='parameters'``) or buffer arrays of ``model``."""
    method = getattr(model, what, None)
    if callable(method):
        items = list(method())
    elif what == "buffers":
        items = []
    elif isinstance(model, np.ndarray):
        raise TypeError(
            "AveragedModel expects an iterable of arrays or an object with parameters(); "
            "got a single array (wrap it in a list)"
        )
    else:
        try:
            items = list(model)
        except TypeError:
            raise TypeError(
                "AveragedModel expects an iterable of arrays or an object with parameters(), "
                f"got {type(model).__name__}"
            ) from None
    for i, a in enumerate(items):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{what}[{i}] is a {type(a).__name__}, expected a numpy array")
    return items


class _AssertionValueError(ValueError, AssertionError):
    """torch raises AssertionError here; a ValueError is what the rest of fastopt raises."""


class AveragedModel(metaclass=abc.ABCMeta):
    """Running average of a model's parameters (SWA by default, or EMA).

    Given a ``torch.nn.Module``, ``AveragedModel(model, device=None, avg_fn=None,
    multi_avg_fn=None, use_buffers=False)`` (torch's signature) returns torch's
    ``AveragedModel``: an ``nn.Module``, also an instance of this class and of
    ``torch.optim.swa_utils.AveragedModel``, holding a deep copy of the model in ``module``
    and the count in the ``n_averaged`` buffer, with torch's ``forward``, ``state_dict``
    and numbers (bit for bit). Its default update and the averaging functions of this
    module run in fastopt's C kernel on the memory of float32/float64 CPU tensors; custom
    functions are called as torch calls them; ``load_state_dict`` is torch's, except that
    a state dict it refuses leaves the average unchanged (torch has copied the entries
    that fit when it raises). The rest of this docstring is the array version.

    Parameters
    ----------
    model : iterable of numpy arrays, or an object with ``parameters()`` (and ``buffers()``)
        The arrays to average; they are copied (C-contiguous) at construction.
    avg_fn : callable ``(avg, cur, num_averaged) -> new_avg``, optional
        Per-array averaging function (see :func:`get_ema_avg_fn`).
    multi_avg_fn : callable ``(avg_list, cur_list, num_averaged)``, optional
        In-place averaging of lists of arrays of one dtype (see :func:`get_ema_multi_avg_fn`).
    use_buffers : bool, default False
        Average the buffers too; otherwise buffers are copied from the model at every update.

    The first ``update_parameters`` copies the model; each later one applies the averaging
    function, by default ``avg + (cur - avg) / (n + 1)`` (torch's CPU rule, computed in C).
    ``params`` and ``buffers`` hold the averages, ``n_averaged`` the number of updates.
    """

    def __new__(cls, model=None, *args, **kwargs):
        if cls is AveragedModel and _is_module(model):
            return _module_class()(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: Any, avg_fn: Optional[Callable[[Any, Any, Any], Any]] = None,
                 multi_avg_fn: Optional[Callable[[Any, Any, Any], None]] = None,
                 use_buffers: bool = False) -> None:
        if avg_fn is not None and multi_avg_fn is not None:
            raise _AssertionValueError("Only one of avg_fn and multi_avg_fn may be given")
        self.params = [np.array(p, copy=True, order="C") for p in _arrays(model, "parameters")]
        self.buffers = [np.array(b, copy=True, order="C") for b in _arrays(model, "buffers")]
        self.n_averaged = 0
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers

    def parameters(self) -> Any:
        """The averaged parameter arrays (updated in place)."""
        return list(self.params)

    def update_parameters(self, model: Any) -> None:
        """Fold the current arrays of ``model`` into the average."""
        cur = _arrays(model, "parameters")
        cur_buffers = _arrays(model, "buffers")
        avg = list(self.params)
        if self.use_buffers:
            avg += self.buffers
            cur += cur_buffers
        if len(cur) != len(avg):
            raise ValueError(
                f"model has {len(cur)} arrays to average, the average holds {len(avg)}"
            )
        for i, (a, c) in enumerate(zip(avg, cur)):
            if a.shape != c.shape:
                raise ValueError(f"array {i} has shape {c.shape}, its average {a.shape}")
        if not self.use_buffers and len(cur_buffers) != len(self.buffers):
            raise ValueError(
                f"model has {len(cur_buffers)} buffers, the average holds {len(self.buffers)}"
            )
        n = self.n_averaged
        if n == 0:
            for a, c in zip(avg, cur):
                a[...] = c
        elif self.avg_fn is not None:
            for a, c in zip(avg, cur):
                a[...] = self.avg_fn(a, c, n)
        else:
            for a_list, c_list in self._by_dtype(avg, cur):
                if self.multi_avg_fn is not None:
                    self.multi_avg_fn(a_list, c_list, n)
                else:
                    self._swa_mean(a_list, c_list, n)
        if not self.use_buffers:
            for b, c in zip(self.buffers, cur_buffers):
                b[...] = c
        self.n_averaged += 1

    @staticmethod
    def _by_dtype(avg, cur):
        groups = {}
        for a, c in zip(avg, cur):
            lists = groups.setdefault(a.dtype, ([], []))
            lists[0].append(a)
            lists[1].append(np.asarray(c, dtype=a.dtype) if c.dtype != a.dtype else c)
        return list(groups.values())

    @staticmethod
    def _swa_mean(avg, cur, n):
        fast_a, fast_c, slow = _split(avg, cur)
        _swa_inplace(fast_a, fast_c, float(n + 1))
        for a, c in slow:
            if np.issubdtype(a.dtype, np.inexact):
                a[...] = a + (c - a) / a.dtype.type(n + 1)
            else:
                a[...] = a + (c - a) / (n + 1)

    def state_dict(self) -> Any:
        """Copies of the averages and the update count."""
        return {
            "params": [p.copy() for p in self.params],
            "buffers": [b.copy() for b in self.buffers],
            "n_averaged": self.n_averaged,
        }

    def load_state_dict(self, state_dict: Any) -> Any:
        """Restore from ``state_dict()``; checks everything before changing anything.

        ``params`` and ``buffers`` must be lists holding one array (or tensor, or nested
        list of numbers) per average, of its shape and of a dtype that casts to the
        average's (``same_kind``: float64 into float32, not floats into an integer buffer);
        ``n_averaged`` an int >= 0. Anything else raises TypeError or ValueError naming the
        entry (RuntimeError for a tensor whose storage was freed or shrunk), and the average
        is left as it was.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"params", "buffers", "n_averaged"} - set(state_dict)
        if missing:
            raise ValueError(f"AveragedModel state_dict is missing keys {sorted(missing)}")
        new = []
        for name, mine in (("params", self.params), ("buffers", self.buffers)):
            theirs = state_dict[name]
            if not isinstance(theirs, (list, tuple)):
                raise TypeError(f"state_dict[{name!r}] must be a list of arrays, got "
                                f"{type(theirs).__name__}")
            if len(theirs) != len(mine):
                raise ValueError(f"state_dict[{name!r}] holds {len(theirs)} arrays, expected "
                                 f"{len(mine)}")
            for i, (a, b) in enumerate(zip(mine, theirs)):
                new.append((a, _loaded_array(a, b, f"state_dict[{name!r}][{i}]")))
        n = state_dict["n_averaged"]
        if type(n).__module__.startswith("torch") and hasattr(n, "item"):
            n = n.item()  # torch keeps n_averaged as a tensor
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n_averaged must be a non-negative integer, got {n!r}")
        for a, b in new:
            a[...] = b
        self.n_averaged = int(n)


def _loaded_array(avg, value, path):
    """``value`` as an array that can be copied into ``avg`` (checked, not copied yet)."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.layout is sys.modules["torch"].strided:
            check_held(value, path)  # freed or shrunk: .numpy() would read past it
        value = value.numpy()
    if isinstance(value, (str, bytes, dict)) or value is None:
        raise TypeError(f"{path} must be an array, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{path} must be an array: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{path} has dtype {arr.dtype}; expected numbers")
    if arr.shape != avg.shape:
        raise ValueError(f"{path} has shape {arr.shape}, expected {avg.shape}")
    if not np.can_cast(arr.dtype, avg.dtype, casting="same_kind"):
        raise TypeError(f"{path} has dtype {arr.dtype}, which does not cast to the "
                        f"average's {avg.dtype}")
    return arr


# --------------------------------------------------------------------------- torch modules


def _module_class():
    """The class of ``AveragedModel(module)``, defined (importing torch) on first use."""
    cls = globals().get("_TorchAveragedModel")
    if cls is None:
        cls = _define_module_class()
        AveragedModel.register(cls)
        globals()["_TorchAveragedModel"] = cls
    return cls


def __getattr__(name):
    # pickle finds the class of a pickled AveragedModel module here
    if name == "_TorchAveragedModel":
        return _module_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_module_class():
    """``torch.optim.swa_utils.AveragedModel`` with its averaging in fastopt's C kernel.

    torch's constructor, ``forward`` and state dict; ``update_parameters`` computes what
    torch's computes, bit for bit: without ``avg_fn`` and ``multi_avg_fn`` on CPU tensors
    torch updates every average by ``avg + (cur - avg) / (n_averaged + 1)``, which the C
    kernel computes with the same roundings on the tensors' memory for float32/float64
    averages and current values of the same dtype and shape (the average contiguous);
    other pairs take torch's formula. An ``avg_fn`` or ``multi_avg_fn`` is called as torch
    calls it (``n_averaged`` a tensor); this module's :func:`get_ema_multi_avg_fn` and
    :func:`get_swa_multi_avg_fn` then run in the kernel. Averages on another device, a
    first update (a copy) and models whose parameter or buffer count differs from the
    average's take torch's code as it is.
    """
    import torch
    from torch.optim import swa_utils as torch_swa

    class _TorchAveragedModel(torch_swa.AveragedModel):
        __doc__ = _define_module_class.__doc__

        def update_parameters(self, model):
            """Fold the current parameters (and buffers) of ``model`` into the average."""
            if self.avg_fn is not None or self.multi_avg_fn is not None \
                    or not self._update_in_c(model):
                super().update_parameters(model)

        def _update_in_c(self, model):
            """torch's default update, in the C kernel; False (nothing done) where torch's
            own code must run."""
            count = self.n_averaged
            if count.device.type != "cpu" or int(count) == 0:
                return False
            if self.use_buffers:
                mine = [*self.module.parameters(), *self.module.buffers()]
                theirs = [*model.parameters(), *model.buffers()]
                synced = []
            else:
                mine, theirs = list(self.parameters()), list(model.parameters())
                synced = list(self.module.buffers())
                if len(synced) != len(list(model.buffers())):
                    return False
            if len(mine) != len(theirs) or any(a.device.type != "cpu" for a in mine):
                return False
            fast_a, fast_c, fast_t, slow = _split_tensors(mine, theirs, torch)
            swa = torch_swa.get_swa_avg_fn()
            for a, c in slow:  # first: they may raise, as in torch
                a.detach().copy_(swa(a.detach(), c.detach().to(a.device), count))
            if fast_a:
                _swa_inplace(fast_a, fast_c, float(int(count) + 1))
                _updated(fast_t)
            for b_avg, b_model in zip(synced, model.buffers()):
                b_avg.detach().copy_(b_model.detach().to(b_avg.device))
            self.n_averaged += 1
            return True

        def load_state_dict(self, state_dict, strict=True, assign=False):
            """torch's ``Module.load_state_dict``, all or nothing: where torch raises
            (a missing or unexpected key with ``strict``, a shape that differs) after
            copying the entries that fit, the module is restored as it was before the
            error is raised again."""
            before = self.state_dict(keep_vars=True)
            if not assign:
                before = {k: v.detach().clone() for k, v in before.items()}
            try:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
            except BaseException:
                super().load_state_dict(before, strict=False, assign=assign)
                raise

    _TorchAveragedModel.__name__ = "AveragedModel"
    _TorchAveragedModel.__qualname__ = "_TorchAveragedModel"
    return _TorchAveragedModel


def update_bn(loader: Iterable[Any], model: Any, device: Any = None) -> None:
    """Recompute the running statistics of the BatchNorm layers of ``model`` (a
    ``torch.nn.Module``, an :class:`AveragedModel` of one included) with one pass over
    ``loader``: torch's ``torch.optim.swa_utils.update_bn``, which this calls.

    Each batch is a tensor or a list or tuple whose first element is the input; with
    ``device`` the input is moved there first. The statistics are reset, the layers'
    momentum set to None (a cumulative average) for the pass and restored after it, and
    the model's training mode restored.
    """
    if not _is_module(model):
        raise TypeError(f"update_bn needs a torch.nn.Module, got {type(model).__name__}")
    from torch.optim.swa_utils import update_bn as torch_update_bn

    torch_update_bn(loader, model, device)


# --------------------------------------------------------------------------- SWALR


def _cos_anneal(t):
    return (1 - math.cos(math.pi * t)) / 2


def _linear_anneal(t):
    return t


class SWALR(LRScheduler):
    """Anneal each group's lr to ``swa_lr`` over ``anneal_epochs`` epochs, then hold it.

    ``lr_t = swa_lr * a(t) + lr_0 * (1 - a(t))`` with ``t = min(epoch / anneal_epochs, 1)`` and
    ``a(t) = (1 - cos(pi t)) / 2`` (``'cos'``) or ``t`` (``'linear'``).  As in torch, ``lr_0`` is
    recovered from the current lr each step, so the schedule composes with changes to the lr.
    The errors are torch's, except for an ``optimizer`` that is not an Optimizer: TypeError,
    as the other schedulers raise (torch's SWALR raises AttributeError reading its
    ``param_groups``); a failed check leaves the param groups unchanged.
    """

    def __init__(self, optimizer: Optimizer, swa_lr: Union[float, List[float]],
                 anneal_epochs: int = 10, anneal_strategy: str = "cos",
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        # torch's checks, in its order and with its texts; the groups change only after them
        swa_lrs = _per_group("swa_lr", optimizer, swa_lr)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                "anneal_strategy must be one of 'cos' or 'linear', instead got "
                f"{anneal_strategy}"
            )
        if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(
                f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}"
            )
        for lr, group in zip(swa_lrs, optimizer.param_groups):
            group["swa_lr"] = lr
        self._anneal_strategy = anneal_strategy
        self.anneal_epochs = anneal_epochs
        super().__init__(optimizer, last_epoch)

    def anneal_func(self, t: float) -> float:
        return _cos_anneal(t) if self._anneal_strategy == "cos" else _linear_anneal(t)

    def get_lr(self):
        if not self._get_lr_called_within_step:
            warnings.warn(_WARN_GET_LR, UserWarning, stacklevel=2)
        step = self._step_count - 1
        if self.anneal_epochs == 0:
            step = max(1, step)
        span = max(1, self.anneal_epochs)
        prev_alpha = self.anneal_func(max(0, min(1, (step - 1) / span)))
        groups = self.optimizer.param_groups
        # the lr before annealing, solved from lr = swa * a + lr0 * (1 - a)
        starts = [
            g["swa_lr"] if prev_alpha == 1
            else (g["lr"] - prev_alpha * g["swa_lr"]) / (1 - prev_alpha)
            for g in groups
        ]
        alpha = self.anneal_func(max(0, min(1, step / span)))
        return [g["swa_lr"] * alpha + lr0 * (1 - alpha) for g, lr0 in zip(groups, starts)]
