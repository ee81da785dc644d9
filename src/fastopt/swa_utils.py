"""Stochastic Weight Averaging and EMA for fastopt: torch.optim.swa_utils for NumPy arrays.

* :class:`AveragedModel` keeps a running average of a list of parameter arrays (SWA's equal
  weights by default, an exponential moving average with :func:`get_ema_multi_avg_fn`, or
  any averaging function).  The float32/float64 updates run in fastopt's C kernels.
* :class:`SWALR` anneals each group's lr to a constant ``swa_lr`` for the averaging phase.

torch's ``AveragedModel`` wraps an ``nn.Module``; here the "model" is what fastopt optimizes:
an iterable of arrays, or any object with a ``parameters()`` method (and, optionally,
``buffers()``, for non-trained arrays such as running statistics).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np

from fastopt import _kernels
from fastopt.lr_scheduler import _WARN_GET_LR, LRScheduler, _check_optimizer, _per_group

__all__ = [
    "SWALR",
    "AveragedModel",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
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


# --------------------------------------------------------------------------- averaging fns


def _check_decay(decay):
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")


def get_ema_multi_avg_fn(decay=0.999):
    """In-place EMA over lists: ``avg <- avg + (1 - decay) * (cur - avg)`` (a lerp)."""
    _check_decay(decay)
    weight = 1 - decay

    def ema_update(avg_list, cur_list, num_averaged):
        fast_a, fast_c, slow = _split(avg_list, cur_list)
        _lerp_inplace(fast_a, fast_c, weight)
        for a, c in slow:
            if np.issubdtype(a.dtype, np.inexact):
                _lerp_numpy(a, c, weight)
            else:  # integers: torch's weighted sum, truncated back into the array
                a[...] = a * decay + c * weight

    return ema_update


def get_swa_multi_avg_fn():
    """In-place equal-weight mean over lists: ``avg <- lerp(avg, cur, 1 / (n + 1))``."""

    def swa_update(avg_list, cur_list, num_averaged):
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


def get_ema_avg_fn(decay=0.999):
    """Per-array EMA returning the new average: ``decay * avg + (1 - decay) * cur``."""
    _check_decay(decay)

    def ema_update(avg, cur, num_averaged):
        return decay * avg + (1 - decay) * cur

    return ema_update


def get_swa_avg_fn():
    """Per-array SWA mean returning the new average: ``avg + (cur - avg) / (n + 1)``."""

    def swa_update(avg, cur, num_averaged):
        return avg + (cur - avg) / (num_averaged + 1)

    return swa_update


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


class AveragedModel:
    """Running average of a model's parameters (SWA by default, or EMA).

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

    def __init__(self, model, avg_fn=None, multi_avg_fn=None, use_buffers=False):
        if avg_fn is not None and multi_avg_fn is not None:
            raise _AssertionValueError("Only one of avg_fn and multi_avg_fn may be given")
        self.params = [np.array(p, copy=True, order="C") for p in _arrays(model, "parameters")]
        self.buffers = [np.array(b, copy=True, order="C") for b in _arrays(model, "buffers")]
        self.n_averaged = 0
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers

    def parameters(self):
        """The averaged parameter arrays (updated in place)."""
        return list(self.params)

    def update_parameters(self, model):
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

    def state_dict(self):
        """Copies of the averages and the update count."""
        return {
            "params": [p.copy() for p in self.params],
            "buffers": [b.copy() for b in self.buffers],
            "n_averaged": self.n_averaged,
        }

    def load_state_dict(self, state_dict):
        """Restore from ``state_dict()``; checks everything before changing anything.

        ``params`` and ``buffers`` must be lists holding one array (or tensor, or nested
        list of numbers) per average, of its shape and of a dtype that casts to the
        average's (``same_kind``: float64 into float32, not floats into an integer buffer);
        ``n_averaged`` an int >= 0. Anything else raises TypeError or ValueError naming the
        entry, and the average is left as it was.
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
        value = value.detach().cpu().numpy()
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

    def __init__(self, optimizer, swa_lr, anneal_epochs=10, anneal_strategy="cos",
                 last_epoch=-1):
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

    def anneal_func(self, t):
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
