"""What an optimizer updates: ``Parameter`` (an array with its gradient) and ``SparseGrad``
(a row-sparse gradient)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fastopt import _autograd

__all__ = ["Parameter", "SparseGrad"]


def _is_bfloat16(dtype):
    """Whether ``dtype`` is ml_dtypes' bfloat16 (told by its name: ml_dtypes is not
    imported here; an array of that dtype exists only once it was)."""
    return (dtype.name == "bfloat16" and dtype.itemsize == 2
            and type(dtype).__module__.split(".")[0] != "numpy")


class Parameter(np.ndarray):
    """A float32 or float64 array that carries ``.grad``, as ``torch.nn.Parameter`` does.

    ``Parameter(x)`` wraps an existing array without copying: ``np.asarray(p)`` shares
    ``x``'s memory, so an optimizer's in-place updates are seen through ``x``. ``grad`` is
    None or an array of the same shape and dtype; a parameter whose grad is None is skipped
    by ``step()``. Parameters hash by identity, so they key ``optimizer.state``.

    Arithmetic on a Parameter gives plain ndarrays; slices and views are plain ndarrays too.

    HIPS autograd differentiates a Parameter as the array it wraps (``autograd.grad(f)(p)``,
    also inside dicts, lists and tuples), with a plain ndarray as the gradient. fastopt
    never imports autograd: Parameter is registered with autograd's boxes and vector spaces
    when autograd is imported, before or after fastopt (see ``fastopt._autograd``).

    Parameters
    ----------
    data : array_like
        float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``) data. An ndarray is
        wrapped as is; anything else is converted with ``np.asarray`` (and must already have
        one of these dtypes). The per-element optimizers step float16 and bfloat16
        parameters in float32 arithmetic, their state in the parameter's dtype.
    """

    __slots__ = ("grad",)
    grad: Any  # None, an ndarray of the parameter's shape and dtype, or a SparseGrad
    __hash__ = object.__hash__  # type: ignore[assignment]  # ndarray is unhashable

    def __new__(cls, data: ArrayLike) -> Parameter:
        arr = np.asarray(data)
        if not (arr.dtype in (np.float32, np.float64, np.float16) or _is_bfloat16(arr.dtype)) \
                or not arr.dtype.isnative:
            raise TypeError(f"fastopt.Parameter needs float32, float64, float16 or bfloat16 "
                            f"data in native byte order, got dtype {arr.dtype}")
        if not (arr.flags.c_contiguous and arr.flags.aligned):
            raise ValueError("fastopt.Parameter needs a C-contiguous, aligned array; "
                             "pass np.ascontiguousarray(x) and use the Parameter from then on")
        obj = arr.view(cls)
        obj.grad = None
        return obj

    def __array_finalize__(self, obj):
        self.grad = None

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        # results of ufuncs are plain arrays (an in-place op with out=self returns self)
        if arr is self:
            return self
        if return_scalar and arr.ndim == 0:
            return arr[()]
        return arr.view(np.ndarray)

    def __getitem__(self, key):
        out = np.ndarray.__getitem__(self, key)
        return out.view(np.ndarray) if isinstance(out, Parameter) else out

    def __repr__(self):
        return "Parameter containing:\n" + repr(self.view(np.ndarray))

    def __reduce__(self):
        return (_rebuild, (self.view(np.ndarray).copy(), self.grad))

    def __copy__(self):
        new = Parameter(self.view(np.ndarray).copy())
        new.grad = None if self.grad is None else self.grad.copy()
        return new

    def __deepcopy__(self, memo):
        new = self.__copy__()
        memo[id(self)] = new
        return new

    @property
    def data(self) -> np.ndarray:  # type: ignore[override]  # torch's
        """The wrapped array as a plain ndarray sharing memory."""
        return self.view(np.ndarray)


def _rebuild(arr, grad):
    p = Parameter(arr)
    p.grad = grad
    return p


class SparseGrad:
    """A row-sparse gradient: ``values[k]`` is the gradient of row ``indices[k]`` of the
    parameter (rows along axis 0, as an embedding table's lookups produce), all other rows
    are zero. Repeated indices add up, as in a torch sparse COO tensor.

    Parameters
    ----------
    indices : array_like of int
        Row indices, shape ``(nnz,)`` (or torch's ``(1, nnz)``).
    values : array_like
        Shape ``(nnz,) + param.shape[1:]``, the parameter's dtype.

    Examples
    --------
    >>> emb = fastopt.Parameter(np.zeros((1000, 16), np.float32))
    >>> emb.grad = fastopt.SparseGrad([3, 17, 3], np.ones((3, 16), np.float32))
    >>> fastopt.SparseAdam([emb]).step()       # updates rows 3 and 17 only
    """

    __slots__ = ("indices", "values")

    def __init__(self, indices: ArrayLike, values: ArrayLike) -> None:
        idx = np.asarray(indices)
        if idx.ndim == 2 and idx.shape[0] == 1:
            idx = idx[0]
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise TypeError(f"SparseGrad indices must be a 1-D integer array, got "
                            f"{idx.dtype} of shape {idx.shape}")
        vals = np.asarray(values)
        if vals.ndim < 1 or vals.shape[0] != idx.shape[0]:
            raise ValueError(f"SparseGrad values must have one row per index: "
                             f"{idx.shape[0]} indices, values of shape {vals.shape}")
        self.indices = idx.astype(np.int64, copy=False)
        self.values = vals

    @classmethod
    def from_torch(cls, tensor: Any) -> SparseGrad:
        """From a torch sparse COO tensor with one sparse dimension (an embedding's grad)."""
        t = tensor.coalesce() if not tensor.is_coalesced() else tensor
        return cls(t.indices().numpy().copy(), t.values().numpy().copy())

    def coalesce(self) -> SparseGrad:
        """The same gradient with sorted unique rows (duplicates summed)."""
        idx = self.indices
        if idx.size == 0 or (idx.size == 1 or bool(np.all(idx[1:] > idx[:-1]))):
            return self  # already sorted and unique (the common case for a lookup batch)
        order = np.argsort(self.indices, kind="stable")
        idx = self.indices[order]
        vals = self.values[order]
        starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
        if starts.size == idx.size:
            return SparseGrad(idx, np.ascontiguousarray(vals))
        return SparseGrad(idx[starts], np.add.reduceat(vals, starts, axis=0))

    def to_dense(self, shape: Sequence[int]) -> NDArray[Any]:
        out = np.zeros(shape, dtype=self.values.dtype)
        np.add.at(out, self.indices, self.values)
        return out

    def __neg__(self):
        return SparseGrad(self.indices, -self.values)

    def __repr__(self):
        return f"SparseGrad(indices={self.indices!r}, values=<{self.values.dtype} " \
               f"{self.values.shape}>)"


# registered with HIPS autograd once it is imported (never imports it)
_autograd.install(Parameter)
