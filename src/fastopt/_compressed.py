"""Compressed optimizer state and 16-bit parameters: the options shared by the optimizers
whose kernels run per element, how new state is stored, and the 8-bit block-wise code.

The options (keyword-only arguments of Adam, AdamW, SGD, Lion, RMSprop, Adagrad, Adamax,
NAdam, RAdam and Adadelta, in ``fastopt`` and ``fastopt.torch``; they become group keys, and
are absent from groups that leave them at their defaults, so such groups are torch's):

``state_dtype``
    ``None`` (torch's behaviour: the state has the parameter's dtype), ``"float32"``,
    ``"bfloat16"`` or ``"int8"`` (8-bit block-wise, below). float64 parameters keep float64
    state: any other value is a TypeError at their step.
``master_weights``
    For float16 and bfloat16 parameters: a float32 copy, ``state["master_param"]``, is what
    the kernel updates, and the 16-bit parameter is written from it (rounded to nearest) in
    the same pass; the state is then float32 unless ``state_dtype`` says otherwise.
``stochastic_rounding``
    bfloat16 values the step stores (a bfloat16 parameter without master weights, and
    bfloat16 state) are rounded up with probability equal to their distance from the lower
    neighbour, from a counter-based generator keyed by ``rounding_seed``, the group's
    ``rounding_step`` (counted by the optimizer), the parameter's position and the element's
    index: the same bits for every thread count and ISA level, and an unbiased rounding, so
    that updates far below a weight's spacing accumulate in expectation instead of being lost.
``min_8bit_size``
    With ``state_dtype="int8"``, tensors of fewer elements keep float32 state (4096 by
    default, as bitsandbytes): their state is small, and small tensors (biases, norms) are
    where quantization error costs most.

8-bit state. Every state array ``K`` of a tensor is stored as ``state[K]``, a uint8 array of
the parameter's shape (one code per element, in the parameter's memory order), and
``state[K + "_absmax"]``, a float32 vector of one scale per block of 256 elements: block b
holds elements [256 b, 256 b + 256) in memory order. The scale is the largest magnitude among
the block's finite values, and each value is coded relative to it with a logarithmic 8-bit
code (see :func:`quantize_blockwise`): first moments and momentum with a sign, second
moments and other non-negative state (``exp_avg_sq``, ``max_exp_avg_sq``, ``square_avg``,
``sum``, ``exp_inf``, ``acc_delta``) without, over twice the range. A step decodes a block,
updates it in float32 and encodes it again, in one pass in C with no temporary arrays: 2.03
bytes of state per element and moment pair instead of 8.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Tuple

import numpy as np

from fastopt import _kernels

__all__ = ["quantize_blockwise", "dequantize_blockwise"]

SCALE_SUFFIX = _kernels.SCALE_SUFFIX
MASTER_KEY = _kernels.MASTER_KEY
UNSIGNED_STATE = _kernels.UNSIGNED_STATE
BLOCK = 256

#: the option names, in signature order, and their defaults
OPTIONS = {"state_dtype": None, "master_weights": False, "stochastic_rounding": False,
           "rounding_seed": 0, "min_8bit_size": 4096}
#: group keys that are no hyperparameters of the kernels (not frozen at a step)
GROUP_KEYS = frozenset(OPTIONS) | {"rounding_step"}


def quantize_blockwise(x: Any, signed: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """The 8-bit block-wise code of ``x``, as fastopt stores ``state_dtype="int8"`` state.

    Parameters
    ----------
    x : array_like
        Real values, read in C order as float32.
    signed : bool, default True
        The signed code (first moments, momentum) or the unsigned one (non-negative state).

    Returns
    -------
    codes : ndarray of uint8
        One code per element, of ``x``'s shape.
    absmax : ndarray of float32
        One scale per block of 256 elements: the largest magnitude among the block's finite
        values, or 0 when that is below 2**-126.

    Notes
    -----
    Each value is divided by its block's scale and the magnitude y in [0, 1] gets the code
    c of a floating-point format with 3 mantissa bits, rounded to nearest:
    c = 0 is 0, c in 1..7 is c/8 * 2**(1-E), and c = 8e + f (e >= 1) is
    (1 + f/8) * 2**(e-E), up to c = 8E, which is 1.0 (the block's largest value is exact).
    A y halfway between two codes takes the even code below 2**(1-E) and the larger one
    above (the mantissa rounds half up: one integer addition, where ties to even would cost
    three operations more per element).
    Signed: E = 15 and the byte is ``sign << 7 | c``; unsigned: E = 31 and the byte is c.
    A value keeps a relative error of at most 1/16, or an absolute one of at most
    2**(-3-E) of the scale in the bottom range. Like bitsandbytes' dynamic code it is
    logarithmic, so small values keep their relative precision; unlike its table it is
    computed from the float's bits, so coding vectorises without lookups. NaN and
    infinities keep codes of their own (signed: ``0x7e | sign`` is +-inf, ``0x7f`` and
    ``0xff`` NaN; unsigned: ``0xfe`` is +inf, ``0xff`` NaN); a negative value given to the
    unsigned code is stored as 0.
    """
    return _kernels.quantize_blockwise(x, bool(signed))


def dequantize_blockwise(codes: Any, absmax: Any, signed: bool = True) -> np.ndarray:
    """The float32 values of ``codes`` (uint8, of any shape, read in C order) with their
    block scales ``absmax``, as :func:`quantize_blockwise` made them."""
    return _kernels.dequantize_blockwise(codes, absmax, bool(signed))


def check_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The options that differ from their defaults, checked (ValueError, TypeError)."""
    sd = options["state_dtype"]
    if sd not in _kernels.STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {_kernels.STATE_DTYPES}, got {sd!r}")
    for key in ("master_weights", "stochastic_rounding"):
        if not isinstance(options[key], (bool, np.bool_)):
            raise TypeError(f"{key} must be a bool, got {options[key]!r}")
    if options["master_weights"] and options["stochastic_rounding"]:
        raise ValueError("stochastic_rounding applies to bfloat16 values stored without "
                         "master weights: set master_weights=False or stochastic_rounding=False")
    seed = options["rounding_seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"rounding_seed must be an int, got {seed!r}")
    m8 = options["min_8bit_size"]
    if isinstance(m8, bool) or not isinstance(m8, (int, np.integer)) or m8 < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {m8!r}")
    out = {k: (bool(v) if k in ("master_weights", "stochastic_rounding") else
               int(v) if k in ("rounding_seed", "min_8bit_size") else v)
           for k, v in options.items()}
    if all(out[k] == OPTIONS[k] for k in OPTIONS):
        return {}
    return out


def apply_options(opt: Any, options: Dict[str, Any]) -> None:
    """Put the (non-default) options into the optimizer's defaults and its groups (a
    group's own value, given in its dict, stays)."""
    if not options:
        return
    opt.defaults.update(options)
    for group in opt.param_groups:
        for k, v in options.items():
            group.setdefault(k, v)
    opt.__dict__.pop("_kinds", None)


def set_options(opt: Any, **options: Any) -> None:
    """Check the options given to an optimizer's constructor and put those that differ
    from their defaults into its defaults and groups (see :func:`apply_options`); state
    the constructor made (Adagrad's) is stored as they say."""
    options = check_options(options)
    apply_options(opt, options)
    if options and len(opt.state):
        store_existing(opt)


def with_options(init):
    """``init`` (an optimizer's ``__init__``, fastopt.torch's wrapper of torch's) taking the
    options as keyword-only arguments too, with a signature that shows them."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, state_dtype=None, master_weights=False,
                 stochastic_rounding=False, rounding_seed=0, min_8bit_size=4096, **kwargs):
        options = dict(state_dtype=state_dtype, master_weights=master_weights,
                       stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed,
                       min_8bit_size=min_8bit_size)
        check_options(options)  # before the optimizer is made
        init(self, *args, **kwargs)
        set_options(self, **options)

    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
             for k, v in OPTIONS.items()]
    tail = [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    setattr(__init__, "__signature__", sig.replace(parameters=params + extra + tail))
    setattr(__init__, "_fastopt_options", True)
    return __init__


def param_format(param: Any) -> str:
    """The storage format name of a parameter (an array or a tensor): its dtype's name."""
    name = str(param.dtype).replace("torch.", "")
    return name if name in ("float32", "float16", "bfloat16") else "native"


def formats(group: Dict[str, Any], fmt: str, numel: int, keys: Any) -> Tuple[bool, Any]:
    """(master weights?, {state key: format name}) of a parameter of format ``fmt``
    (:func:`param_format`) and ``numel`` elements in ``group``, whose state arrays are
    ``keys`` (None for one that is off); (False, None) when the state keeps the parameter's
    dtype. The same choice as the step's (``Plan.formats``)."""
    sd = group.get("state_dtype")
    master = bool(group.get("master_weights", False)) and fmt in ("float16", "bfloat16")
    if (sd is None and not master) or fmt == "native":
        return False, None
    out = {}
    for key in keys:
        if key is None:
            continue
        if sd is None:
            out[key] = "float32"
        elif sd == "int8":
            out[key] = (("int8-unsigned" if key in UNSIGNED_STATE else "int8-signed")
                        if numel >= group.get("min_8bit_size", 4096) else "float32")
        else:
            out[key] = sd
    return master, out


def store_existing(opt: Any) -> None:
    """Store the state an optimizer made at its construction (Adagrad's sums, as torch
    makes them) in the formats of its groups' options."""
    for group in opt.param_groups:
        keys = [k for k in opt._spec.layout(opt._freeze(group)) if k is not None]
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            master, fmts = formats(group, param_format(p), int(np.prod(p.shape)), keys)
            if fmts is not None:
                base = p if isinstance(p, np.ndarray) else None
                opt._store_state(st, p, base, master, fmts)


def _numpy(value: Any) -> Any:
    """A tensor as a NumPy array (bfloat16 widened to float32), anything else as it is."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return value


def is_stored(saved: Any) -> bool:
    """Whether a saved state dict holds 8-bit codes or master weights."""
    return isinstance(saved, dict) and any(
        isinstance(k, str) and (k == MASTER_KEY or (k.endswith(SCALE_SUFFIX)
                                                   and k[:-len(SCALE_SUFFIX)] in saved))
        for k in saved)


def decode_codes(codes: Any, scales: Any, key: str, where: str, where_scales: str,
                 shape: Any = None) -> np.ndarray:
    """The float32 values of the saved 8-bit codes of state array ``key`` (arrays or
    tensors), in the codes' layout: the codes and their blocks follow the parameter's memory
    order (a channels_last tensor's too). ``where`` and ``where_scales`` name the two entries
    in errors; ``shape``, when given, is the parameter's shape the codes must have."""
    codes, scales = _numpy(codes), _numpy(scales)
    if not (isinstance(codes, np.ndarray) and codes.dtype == np.uint8
            and (shape is None or codes.shape == tuple(shape))):
        raise ValueError(f"{where} holds 8-bit codes (it has block scales): it must be a "
                         f"uint8 array" + ("" if shape is None else
                                           f" of the parameter's shape {tuple(shape)}")
                         + f", got {getattr(codes, 'dtype', type(codes).__name__)} "
                         f"{getattr(codes, 'shape', '')}")
    nb = -(-codes.size // BLOCK)
    if not (isinstance(scales, np.ndarray) and scales.dtype == np.float32
            and scales.shape == (nb,)):
        raise ValueError(f"{where_scales} must be the float32 block scales of {codes.size} "
                         f"codes, of shape ({nb},), got "
                         f"{getattr(scales, 'dtype', type(scales).__name__)} "
                         f"{getattr(scales, 'shape', '')}")
    flat = _kernels.dequantize_blockwise(memory_flat(codes), scales, key not in UNSIGNED_STATE)
    values = np.empty_like(codes, dtype=np.float32)
    memory_flat(values)[...] = flat
    return values


def decoded(saved: Dict[Any, Any], shape: Tuple[int, ...], where: str):
    """(state, master): the saved state with its 8-bit arrays decoded to float32 (their
    block scales dropped) and its master weights taken out (None when it has none)."""
    out = {}
    for k, v in saved.items():
        if isinstance(k, str) and k.endswith(SCALE_SUFFIX) and k[:-len(SCALE_SUFFIX)] in saved:
            continue
        if k == MASTER_KEY:
            continue
        if isinstance(k, str) and k + SCALE_SUFFIX in saved:
            out[k] = decode_codes(v, saved[k + SCALE_SUFFIX], k, f"{where}: state[{k!r}]",
                                  f"{where}: state[{k + SCALE_SUFFIX!r}]", shape)
        else:
            out[k] = v
    return out, saved.get(MASTER_KEY)


def as_float32(value: Any, like: np.ndarray, key: str, where: str) -> np.ndarray:
    """A saved state array (or tensor) as float32 in the layout of the parameter ``like``."""
    value = _numpy(value)
    if not isinstance(value, np.ndarray) or value.shape != like.shape:
        raise ValueError(f"{where}: state[{key!r}] must be an array of the parameter's shape "
                         f"{like.shape}, got {getattr(value, 'shape', type(value).__name__)}")
    if value.dtype.kind != "f" and not (value.dtype.name == "bfloat16"):
        raise TypeError(f"{where}: state[{key!r}] has dtype {value.dtype}; expected floating "
                        f"point")
    out = np.empty_like(like, dtype=np.float32)
    np.copyto(out, value, casting="unsafe")
    return out


def memory_flat(a: np.ndarray) -> np.ndarray:
    """The elements of the dense array ``a`` in memory order, as a vector (a view)."""
    if a.flags.c_contiguous:
        return a.reshape(-1)
    order = np.argsort([-abs(s) for s in a.strides], kind="stable")
    return np.transpose(a, order).reshape(-1)


def stored(value: np.ndarray, fmt: str, key: str) -> Dict[str, np.ndarray]:
    """The entries that hold the float array ``value`` (a state array ``key``) in format
    ``fmt`` (a name of ``Plan.formats``), in value's memory layout."""
    if fmt == "float32":
        return {key: np.array(value, dtype=np.float32, order="K")}
    if fmt == "float16":
        return {key: np.array(value, dtype=np.float16, order="K")}
    if fmt == "bfloat16":
        return {key: np.array(value, dtype=bfloat16(), order="K")}
    signed = fmt == "int8-signed"
    codes = np.empty_like(value, dtype=np.uint8)
    flat, scales = _kernels.quantize_blockwise(memory_flat(np.asarray(value)), signed)
    memory_flat(codes)[...] = flat
    return {key: codes, key + SCALE_SUFFIX: scales}


def bfloat16():
    """ml_dtypes.bfloat16, the bfloat16 dtype of NumPy arrays, imported when first needed."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bfloat16 NumPy arrays need the ml_dtypes package "
                          "(pip install ml_dtypes)") from None
    return ml_dtypes.bfloat16
