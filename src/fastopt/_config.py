"""Build and runtime configuration: ISA dispatch, threads, compiler flags."""
from __future__ import annotations

import operator
from typing import Any, Dict

from fastopt import _kernels

__all__ = ["show_config", "set_num_threads", "get_num_threads"]


class _ThreadCountTypeError(TypeError, RuntimeError):
    """torch.set_num_threads raises RuntimeError for a count that is no int; a TypeError is
    what Python raises for a wrong type: this is both."""


def set_num_threads(n: int) -> None:
    """Use at most ``n`` threads in the kernels (1 turns threading off). Results are the
    same bits for any thread count. Tensors below a size threshold always run on one.

    Parameters
    ----------
    n : int
        A positive integer: a Python or NumPy int (anything with ``__index__``), not a bool.

    Raises
    ------
    TypeError
        For a float, a string, a bool or None (torch.set_num_threads raises RuntimeError for
        these: the error raised is both a TypeError and a RuntimeError).
    ValueError
        For ``n < 1``.
    """
    try:
        if isinstance(n, bool) or type(n).__name__ == "bool_":
            raise TypeError
        count = operator.index(n)
    except TypeError:
        raise _ThreadCountTypeError(f"set_num_threads expects an int, but got "
                                    f"{type(n).__name__}") from None
    _kernels.set_num_threads(count)


def get_num_threads() -> int:
    """The most threads the kernels use."""
    return _kernels.get_num_threads()


def show_config(print_: bool = True) -> Dict[str, Any]:
    """Return (and print unless ``print_`` is False) how fastopt was built and what it runs.

    Keys: ``isa`` (the kernels in use: baseline, avx2 or avx512), ``isa_supported`` (levels
    this CPU and build can run), ``num_threads``, ``openmp``, ``compiler``,
    ``kernel_flags`` and ``parallel_grain`` (elements per thread below which a step stays on
    one thread). The environment variable ``FASTOPT_CPU_CAPABILITY`` (read at import) picks
    a lower level.
    """
    info = _kernels.build_info()
    cfg = {
        "isa": _kernels.get_isa(),
        "isa_supported": [n for n in _kernels.isa_levels() if _kernels.isa_supported(n)],
        "num_threads": _kernels.get_num_threads(),
        "openmp": _kernels.have_openmp(),
        "compiler": info["compiler"],
        "kernel_flags": info["kernel_flags"],
        "parallel_grain": info["grain"],
    }
    if print_:
        width = max(map(len, cfg))
        for key, value in cfg.items():
            print(f"{key:<{width}} : {value}")
    return cfg
