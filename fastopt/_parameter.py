"""``fastopt.Parameter``: an array an optimizer updates in place, with its gradient."""
import numpy as np

__all__ = ["Parameter"]


class Parameter(np.ndarray):
    """A float32 or float64 array that carries ``.grad``, as ``torch.nn.Parameter`` does.

    ``Parameter(x)`` wraps an existing array without copying: ``np.asarray(p)`` shares
    ``x``'s memory, so an optimizer's in-place updates are seen through ``x``. ``grad`` is
    None or an array of the same shape and dtype; a parameter whose grad is None is skipped
    by ``step()``. Parameters hash by identity, so they key ``optimizer.state``.

    Arithmetic on a Parameter gives plain ndarrays; slices and views are plain ndarrays too.

    Parameters
    ----------
    data : array_like
        float32 or float64 data. An ndarray is wrapped as is; anything else is converted
        with ``np.asarray`` (and must already have a float32 or float64 dtype).
    """

    __slots__ = ("grad",)
    __hash__ = object.__hash__

    def __new__(cls, data):
        arr = np.asarray(data)
        if arr.dtype not in (np.float32, np.float64) or not arr.dtype.isnative:
            raise TypeError(f"fastopt.Parameter needs float32 or float64 data in native "
                            f"byte order, got dtype {arr.dtype}")
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
    def data(self):
        """The wrapped array as a plain ndarray sharing memory."""
        return self.view(np.ndarray)


def _rebuild(arr, grad):
    p = Parameter(arr)
    p.grad = grad
    return p
