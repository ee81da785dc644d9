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
    same bits for any thread count. Groups of fewer elements than
    ``show_config()["parallel_threshold"]`` always run on one thread.

    The count is OpenMP's own setting for the calling thread: this calls
    ``omp_set_num_threads(n)``, and every step reads ``omp_get_max_threads()``. So
    ``OMP_NUM_THREADS``, ``threadpoolctl.threadpool_limits`` and ``omp_set_num_threads`` set
    it as well, and other OpenMP code of the calling thread that uses the same runtime (torch's
    CPU operations, where torch loads the same libgomp) follows this setting too. As with
    OpenMP, a Python thread that never set a count uses the process default
    (``OMP_NUM_THREADS``, else the number of CPUs).

    Parameters
    ----------
    n : int
        A positive integer: a Python or NumPy int (anything with ``__index__``), not a bool,
        at most ``show_config()["max_threads"]``.

    Raises
    ------
    TypeError
        For a float, a string, a bool or None (torch.set_num_threads raises RuntimeError for
        these: the error raised is both a TypeError and a RuntimeError).
    ValueError
        For ``n < 1`` or ``n`` above the maximum; the setting stays as it was.
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
    """The most threads the kernels use now in the calling thread: OpenMP's setting
    (``omp_get_max_threads()``), or 1 when fastopt was built without OpenMP."""
    return _kernels.get_num_threads()


def show_config(print_: bool = True) -> Dict[str, Any]:
    """Return (and print unless ``print_`` is False) how fastopt was built and what it runs.

    Keys: ``isa`` (the kernels in use: baseline, avx2 or avx512), ``isa_supported`` (levels
    this CPU and build can run), ``num_threads``, ``openmp``, ``compiler``,
    ``kernel_flags``, ``parallel_grain`` (elements per thread below which a step stays on
    one thread), ``parallel_threshold`` (elements of a group below which it runs on one
    thread: twice the grain), ``parallel_chunk`` (the elements a thread takes at a time) and
    ``max_threads`` (the largest count ``set_num_threads`` takes). The environment variable
    ``FASTOPT_CPU_CAPABILITY`` (read at import) picks a lower level.
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
        "parallel_threshold": 2 * info["grain"],
        "parallel_chunk": info["chunk"],
        "max_threads": info["max_threads"],
    }
    if print_:
        width = max(map(len, cfg))
        for key, value in cfg.items():
            print(f"{key:<{width}} : {value}")
    return cfg
