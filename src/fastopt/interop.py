"""Move a training run between fastopt and torch.optim.

fastopt's ``state_dict()`` has torch.optim's layout (same ids, group keys and state keys,
``step`` a 0-d float32 value), with NumPy arrays where torch has tensors. The functions here
convert the values, so a run can stop with one library and continue with the other:

>>> sd = fastopt_opt.state_dict()                        # doctest: +SKIP
>>> torch_opt.load_state_dict(interop.state_dict_to_torch(sd))
>>> fastopt_opt.load_state_dict(interop.state_dict_from_torch(torch_opt.state_dict()))

or build the other library's optimizer in one call:

>>> torch_opt = interop.to_torch(fastopt_opt)            # doctest: +SKIP
>>> fastopt_opt = interop.from_torch(torch_opt)

Conversions copy: the result never shares memory with the optimizer it came from, so both
can keep running side by side. Values are converted exactly (same dtype, same bits); a
converted state loaded into the same library continues with identical numbers. Across
libraries the continuation agrees to rounding (torch's CPU ``sqrt`` is not IEEE-rounded).

16-bit state converts with its bits: ``ml_dtypes.bfloat16`` arrays become ``torch.bfloat16``
tensors and back (``tensor.numpy()`` refuses bfloat16), float16 stays float16. Compressed
state (8-bit block-wise state, bfloat16 state of float32 parameters, master weights) is
fastopt's own: ``full_precision_state_dict`` decodes it into the state torch.optim keeps.

Scheduler state dicts are plain Python values; ``scheduler_state_to_torch`` and
``scheduler_state_from_torch`` translate the few keys that differ.

Importing this module does not import torch; the ``*_to_torch`` functions and ``to_torch``
do.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Dict

import numpy as np

from fastopt import _compressed
from fastopt.optimizer import Optimizer, kernel_optimizers, other_optimizers
from fastopt.parameter import _is_bfloat16

__all__ = [
    "SHARED_OPTIMIZERS",
    "from_torch",
    "full_precision_state_dict",
    "scheduler_state_from_torch",
    "scheduler_state_to_torch",
    "state_dict_from_torch",
    "state_dict_to_torch",
    "to_torch",
]


def _shared():
    """Names of the optimizers both libraries have (fastopt's registry order)."""
    return [name for name in _registry() if name in _TORCH_OPTIMIZERS]


def _registry():
    """Every fastopt optimizer class by name (the per-element ones and the others)."""
    return {**kernel_optimizers(), **other_optimizers()}


# torch.optim's optimizer classes in PyTorch 2.13 (kept here so that listing the shared
# ones needs no torch import; a fastopt optimizer of the same name has the same contract)
_TORCH_OPTIMIZERS = frozenset({
    "ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon",
    "NAdam", "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam"})


class _SharedNames:
    """``SHARED_OPTIMIZERS``: evaluated on use, since the registry grows with fastopt."""

    def __iter__(self):
        return iter(_shared())

    def __contains__(self, name):
        return name in _shared()

    def __len__(self):
        return len(_shared())

    def __repr__(self):
        return repr(_shared())


#: names of the optimizers that ``to_torch``/``from_torch`` can convert
SHARED_OPTIMIZERS = _SharedNames()


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastopt.interop needs PyTorch for this conversion: "
                          "pip install torch") from e
    return torch


def _import_torch_if_loaded():
    return sys.modules.get("torch")


# ------------------------------------------------------------------------ value converters


def _to_tensor(value, torch):
    if isinstance(value, np.ndarray):
        if _is_bfloat16(value.dtype):
            # torch.from_numpy knows no ml_dtypes.bfloat16: the same bits, as int16
            bits = np.array(value, copy=True, order="C").view(np.int16)
            return torch.from_numpy(bits).view(torch.bfloat16)
        # np.array(copy) also turns read-only or non-contiguous arrays into plain ones
        return torch.from_numpy(np.array(value, copy=True, order="C"))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, _to_tensor(v, torch)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_tensor(v, torch) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


def _ml_bfloat16():
    """``ml_dtypes.bfloat16``, or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def _tensor_to_array(t, torch, where):
    t = t.detach()
    if t.device.type == "cpu" and t.layout is torch.strided:
        from fastopt._kernels import check_held

        check_held(t, where)  # a freed or shrunk storage: t.numpy() would read past it
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_sparse or t.layout is not torch.strided:
        t = t.to_dense()
    if t.dtype is torch.bfloat16:
        bf16 = _ml_bfloat16()
        if bf16 is not None and t.dim():  # the same bits (tensor.numpy() refuses bfloat16)
            return np.array(t.contiguous().view(torch.int16).numpy(), copy=True).view(bf16)
        t = t.float()  # exact: every bfloat16 value is a float32 value
    t = t.resolve_conj().resolve_neg()
    return np.array(t.numpy(), copy=True)


def _from_tensor(value, torch, where):
    if torch is not None and isinstance(value, torch.Tensor):
        return _tensor_to_array(value, torch, where)
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return type(value)((k, _from_tensor(v, torch, f"{where}[{k!r}]"))
                           for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_from_tensor(v, torch, f"{where}[{i}]") for i, v in enumerate(value))
    return copy.deepcopy(value)


def _check_layout(state_dict, what):
    if not isinstance(state_dict, dict):
        raise TypeError(f"{what} must be a dict, got {type(state_dict).__name__}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise KeyError(f"{what} has no {key!r} entry; is it an optimizer state_dict?")


# ------------------------------------------------------------------------ state dicts


def state_dict_to_torch(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """A fastopt optimizer ``state_dict()`` as ``torch.optim`` would have written it.

    Parameters
    ----------
    state_dict : dict
        ``{"state": ..., "param_groups": ...}`` from a fastopt optimizer (or a copy of one,
        for example loaded with ``pickle``).

    Returns
    -------
    dict
        The same structure with every NumPy array replaced by a CPU tensor of the same
        dtype and shape holding a copy of the data (``step`` becomes a 0-d float32 tensor,
        as torch keeps it) and NumPy scalars by Python numbers. Everything else (ids,
        hyperparameters, scheduler keys such as ``initial_lr``) is copied as is. Load it
        with ``torch_optimizer.load_state_dict``. ``ml_dtypes.bfloat16`` arrays become
        ``torch.bfloat16`` tensors of the same bits.

    Notes
    -----
    ``torch.optim``'s ``load_state_dict`` casts every floating-point state tensor except
    ``step`` to its parameter's dtype, 0-d ones included: for 16-bit parameters NAdam's
    ``mu_product`` is rounded to float16 or bfloat16 there (torch's behaviour, kept).
    """
    _check_layout(state_dict, "state_dict")
    torch = _import_torch()
    out = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    out["state"] = {k: _to_tensor(v, torch) for k, v in state_dict["state"].items()}
    out["param_groups"] = [_to_tensor(dict(g), torch) for g in state_dict["param_groups"]]
    for g, src in zip(out["param_groups"], state_dict["param_groups"]):
        g["params"] = list(src["params"])
    return out


def state_dict_from_torch(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """A ``torch.optim`` optimizer's ``state_dict()`` with NumPy arrays instead of tensors.

    Tensors become NumPy copies of the same dtype and shape (a 0-d float32 ``step`` stays a
    0-d float32 array; tensors on another device are copied to the CPU first). bfloat16
    tensors become ``ml_dtypes.bfloat16`` arrays of the same bits when ml_dtypes is
    installed, and are widened to float32 (exactly) when it is not; either loads into a
    fastopt optimizer of bfloat16 or float32 parameters. A 0-d bfloat16 tensor (torch's
    ``load_state_dict`` casts NAdam's ``mu_product`` to the parameter's dtype) becomes a 0-d
    float32 array, the dtype of fastopt's 0-d state. A tensor ``lr`` becomes an array of
    the same shape. The result
    does not need torch to be loaded, pickled or inspected; load it with a fastopt
    optimizer's ``load_state_dict``.
    """
    _check_layout(state_dict, "state_dict")
    torch = _import_torch_if_loaded()
    out = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    out["state"] = {k: _from_tensor(v, torch, f"state_dict['state'][{k!r}]")
                    for k, v in state_dict["state"].items()}
    groups = []
    for gi, src in enumerate(state_dict["param_groups"]):
        g = _from_tensor(dict(src), torch, f"state_dict['param_groups'][{gi}]")
        g["params"] = list(src["params"])
        groups.append(g)
    out["param_groups"] = groups
    return out


# ------------------------------------------------------------------------ compressed state

# the suffix of the block scales' key, the master weights' key and the group keys of the
# compressed-state options
_SCALES = _compressed.SCALE_SUFFIX
_MASTER = _compressed.MASTER_KEY
_OPTION_KEYS = _compressed.GROUP_KEYS

_FULL_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _full_dtype(dtype):
    name = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype), "name", None)
    if name not in _FULL_DTYPES:
        raise ValueError(f"dtype must be one of {list(_FULL_DTYPES)}, got {dtype!r}")
    if name == "bfloat16":
        bf16 = _ml_bfloat16()
        if bf16 is None:
            raise ImportError("dtype='bfloat16' needs ml_dtypes (pip install ml_dtypes)")
        return np.dtype(bf16)
    return np.dtype(name)


def _is_16bit(array):
    return array.dtype == np.float16 or _is_bfloat16(array.dtype)


def full_precision_state_dict(state_dict: Dict[str, Any],
                              dtype: Any = "float32") -> Dict[str, Any]:
    """A state dict of compressed optimizer state as full-precision state that
    ``torch.optim`` (and a fastopt optimizer without ``state_dtype``) loads.

    Compressed state is what fastopt's ``state_dtype`` and ``master_weights`` options make:
    8-bit block-wise state (per moment key ``K`` a uint8 array ``state[K]`` of codes and a
    float32 array ``state[K + "_absmax"]`` of block scales), bfloat16 or float16 state
    arrays, and float32 master copies of 16-bit parameters (``state["master_param"]``).

    Parameters
    ----------
    state_dict : dict
        ``optimizer.state_dict()`` of a fastopt optimizer (NumPy arrays) or of a
        ``fastopt.torch`` one (tensors). It is not changed.
    dtype : {"float32", "float64", "float16", "bfloat16"} or NumPy dtype, default "float32"
        The dtype of the decoded state arrays. ``torch.optim``'s ``load_state_dict`` casts
        state to each parameter's dtype in any case; float32 keeps what the codes hold.

    Returns
    -------
    dict
        A new state dict with NumPy arrays (pass it to :func:`state_dict_to_torch` for
        ``torch.optim``), in which:

        * each 8-bit pair ``K``, ``K + "_absmax"`` becomes one array ``K`` of ``dtype``
          and of the codes' shape, decoded with :func:`fastopt.dequantize_blockwise`
          (signed for first moments and momentum, unsigned for the non-negative state
          ``exp_avg_sq``, ``max_exp_avg_sq``, ``square_avg``, ``acc_delta``, ``sum`` and
          ``exp_inf``);
        * every other float16 or bfloat16 state array with at least one dimension becomes
          an array of ``dtype`` of the same values; float32 and float64 arrays, ``step``
          and other 0-d state are copied as they are;
        * ``master_param`` is dropped: torch.optim has no such state, and the parameters
          hold those weights rounded to their dtype. (For a float32 model on the torch
          side, copy ``state[i]["master_param"]`` into the parameters first.)
        * ``param_groups`` lose the keys of the compressed-state options
          (``state_dtype``, ``master_weights``, ``stochastic_rounding``, ``rounding_seed``,
          ``min_8bit_size``, ``rounding_step``), as groups at their defaults have none: a
          fastopt optimizer loading the result keeps its state as torch keeps it.

    Raises
    ------
    KeyError
        A ``K + "_absmax"`` entry without its codes ``K`` (the message names
        ``state[i]['K_absmax']``).
    TypeError, ValueError
        Codes that are not uint8, or scales that are not a float32 1-D array of
        ``ceil(numel / 256)`` entries (naming the key), or an unknown ``dtype``.

    Examples
    --------
    >>> opt = fastopt.Adam(params, state_dtype="int8")            # doctest: +SKIP
    >>> sd = interop.full_precision_state_dict(opt.state_dict())
    >>> torch_opt.load_state_dict(interop.state_dict_to_torch(sd))
    """
    _check_layout(state_dict, "state_dict")
    out_dtype = _full_dtype(dtype)
    sd = state_dict_from_torch(state_dict)  # copies; tensors become arrays
    state = {}
    for pid, entry in sd["state"].items():
        if not isinstance(entry, dict):
            state[pid] = entry
            continue
        new = {}
        for key, value in entry.items():
            where = f"state[{pid!r}][{key!r}]"
            if key == _MASTER:
                continue
            if isinstance(key, str) and key.endswith(_SCALES):
                if key[:-len(_SCALES)] not in entry:
                    raise KeyError(f"{where}: block scales without their codes "
                                   f"{key[:-len(_SCALES)]!r}")
                continue
            absmax = entry.get(key + _SCALES) if isinstance(key, str) else None
            if absmax is not None:
                new[key] = _compressed.decode_codes(
                    value, absmax, key, where, f"state[{pid!r}][{key + _SCALES!r}]"
                ).astype(out_dtype)
            elif isinstance(value, np.ndarray) and value.ndim and _is_16bit(value):
                new[key] = value.astype(out_dtype)
            else:
                new[key] = value
        state[pid] = new
    sd["state"] = state
    for group in sd["param_groups"]:
        for k in _OPTION_KEYS:
            group.pop(k, None)
    return sd




# ------------------------------------------------------------------------ optimizers


def _group_specs(optimizer, convert_param):
    """Constructor groups mirroring ``optimizer.param_groups`` with converted params."""
    memo = {}
    specs = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            key = id(p)
            if key not in memo:
                memo[key] = convert_param(p)
            params.append(memo[key])
        names = group.get("param_names")
        if names is not None:
            params = list(zip(names, params))
        specs.append({"params": params})
    return specs


def to_torch(optimizer: Optimizer) -> Any:
    """The ``torch.optim`` optimizer equivalent to a fastopt ``optimizer``, state included.

    Parameters
    ----------
    optimizer : fastopt.optimizer.Optimizer
        One of :data:`SHARED_OPTIMIZERS`. Its parameters are used as they are when they are
        torch tensors; ``fastopt.Parameter`` arrays are wrapped with ``torch.from_numpy`` (the
        tensor shares the array's memory and has ``requires_grad=True``; give it gradients
        through autograd or by setting ``.grad``), ``ml_dtypes.bfloat16`` ones as
        ``torch.bfloat16`` tensors on the same memory.

    Returns
    -------
    torch.optim.Optimizer
        Same class name, same param groups and hyperparameters (including scheduler keys),
        and a copy of the state. Step it where the fastopt optimizer left off.
    """
    torch = _import_torch()
    cls = _torch_class(type(optimizer).__name__, torch)

    def convert(p):
        if isinstance(p, torch.Tensor):
            return p
        arr = np.asarray(p)
        if _is_bfloat16(arr.dtype):  # a bfloat16 tensor on the same memory
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).requires_grad_(True)
        t = torch.from_numpy(arr)
        return t.requires_grad_(True)

    new = cls(_group_specs(optimizer, convert))
    new.load_state_dict(state_dict_to_torch(optimizer.state_dict()))
    return new


def from_torch(optimizer: Any) -> Optimizer:
    """The fastopt optimizer equivalent to a ``torch.optim`` ``optimizer``, state included.

    The new optimizer updates the same tensors in place (they must be dense, contiguous
    float32/float64 CPU tensors), with the same param groups, hyperparameters and a copy of
    the state. Step it where the torch optimizer left off.
    """
    name = type(optimizer).__name__
    if name not in SHARED_OPTIMIZERS:
        raise ValueError(f"fastopt has no counterpart of torch.optim.{name}; it converts "
                         f"{list(SHARED_OPTIMIZERS)}")
    cls = _registry()[name]
    new = cls(_group_specs(optimizer, lambda p: p))
    new.load_state_dict(state_dict_from_torch(optimizer.state_dict()))
    return new


def _torch_class(name, torch):
    cls = getattr(torch.optim, name, None)
    if (name not in SHARED_OPTIMIZERS or not isinstance(cls, type)
            or not issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"torch.optim has no counterpart of fastopt.{name}; convertible: "
                         f"{list(SHARED_OPTIMIZERS)}")
    return cls


# ------------------------------------------------------------------------ schedulers

# fastopt's scheduler state_dicts carry this key so a dict from another class is refused;
# torch's schedulers would store it as a stray attribute.
_FASTOPT_ONLY_SCHEDULER_KEYS = ("_scheduler_class",)


def scheduler_state_to_torch(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """A fastopt scheduler's ``state_dict()`` for the torch scheduler of the same class.

    Drops the keys only fastopt uses (also in the nested dicts of SequentialLR and
    ChainedScheduler) and turns NumPy values into Python numbers or tensors.
    """
    torch = _import_torch()

    def clean(sd):
        out = {}
        for k, v in sd.items():
            if k in _FASTOPT_ONLY_SCHEDULER_KEYS:
                continue
            if k == "_schedulers" and isinstance(v, list):
                out[k] = [clean(s) if isinstance(s, dict) else _to_tensor(s, torch) for s in v]
            else:
                out[k] = _to_tensor(v, torch)
        return out

    return clean(state_dict)


def scheduler_state_from_torch(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """A torch scheduler's ``state_dict()`` for the fastopt scheduler of the same class.

    fastopt's schedulers accept torch's dicts as they are; this copies the dict and turns
    tensors (tensor learning rates) into NumPy arrays so the result does not need torch.
    """
    return _from_tensor(dict(state_dict), _import_torch_if_loaded(), "state_dict")
