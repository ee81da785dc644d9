"""SparseAdam and the row-sparse gradient type ``SparseGrad``."""
import numpy as np

from fastopt import _kernels
from fastopt._dense import _where, check_state_array
from fastopt._parameter import Parameter
from fastopt.optimizer import Optimizer, _adapter_for, _check_betas

__all__ = ["SparseAdam", "SparseGrad"]


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

    def __init__(self, indices, values):
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
    def from_torch(cls, tensor):
        """From a torch sparse COO tensor with one sparse dimension (an embedding's grad)."""
        t = tensor.coalesce() if not tensor.is_coalesced() else tensor
        return cls(t.indices().numpy().copy(), t.values().numpy().copy())

    def coalesce(self):
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

    def to_dense(self, shape):
        out = np.zeros(shape, dtype=self.values.dtype)
        np.add.at(out, self.indices, self.values)
        return out

    def __neg__(self):
        return SparseGrad(self.indices, -self.values)

    def __repr__(self):
        return f"SparseGrad(indices={self.indices!r}, values=<{self.values.dtype} " \
               f"{self.values.shape}>)"


class SparseAdam(Optimizer):
    r"""Adam for row-sparse gradients, as ``torch.optim.SparseAdam``: only the rows in the
    gradient have their moments and values updated (lazy Adam).

    For each touched row, with :math:`g` the gradient rows (duplicates summed) and
    :math:`t` the number of steps taken:

    .. math::
        m \leftarrow m + (1 - \beta_1)(g - m), \quad
        v \leftarrow v + (1 - \beta_2)(g^2 - v), \quad
        \theta \leftarrow \theta - \gamma \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
            \frac{m}{\sqrt v + \epsilon}

    Parameters
    ----------
    params : iterable
        Dense float32/float64 parameters (at least 1-D); their ``.grad`` must be a
        :class:`SparseGrad` (a dense array raises RuntimeError, as torch).
    lr : float, default 1e-3
        Must be > 0.
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
        Must be > 0; added to the *uncorrected* :math:`\sqrt v` (unlike Adam).
    maximize : bool, default False

    Notes
    -----
    The update runs in C over the touched rows only (threads split the rows). As torch,
    ``state['step']`` is a Python int, incremented for every parameter with a gradient even
    when the gradient has no rows.
    """

    _flag_defaults = {"maximize": False}
    _scalar_state_keys = frozenset()

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        if not 0.0 < group["lr"]:
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        if not 0.0 < group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        _check_betas(group["betas"])

    def _cast_state(self, param, array, value, key, where):
        if key == "step" and not isinstance(value, dict):
            if hasattr(value, "item"):
                value = value.item()
            return int(value)
        return super()._cast_state(param, array, value, key, where)

    def _arrays(self, p, gi, pi):
        if isinstance(p, Parameter):
            return p.view(np.ndarray), p.grad
        adapter = _adapter_for(p)
        if adapter is None:
            raise TypeError(f"{_where(gi, pi)}: expected a fastopt.Parameter, got "
                            f"{type(p).__name__}")
        return adapter.arrays(p, gi, pi)

    def step(self, closure=None):
        """Perform one optimization step; returns ``closure()``'s value when given."""
        loss = None
        if closure is not None:
            loss = closure()
        # phase 1: check everything, coalesce the gradients
        work = []
        for gi, group in enumerate(self.param_groups):
            try:
                self._freeze(group)  # types; ranges are checked when groups are made
            except (ValueError, TypeError, OverflowError) as e:
                raise type(e)(f"param_groups[{gi}]: {e}") from None
            for pi, p in enumerate(group["params"]):
                arr, g = self._arrays(p, gi, pi)
                if g is None:
                    continue
                where = _where(gi, pi)
                if not isinstance(g, SparseGrad):
                    if type(g).__module__.startswith("torch") and getattr(g, "is_sparse", 0):
                        g = SparseGrad.from_torch(g)
                    else:
                        raise RuntimeError(f"{where}: SparseAdam does not support dense "
                                           f"gradients, please consider Adam instead")
                _kernels.check_param(arr, gi, pi)
                if arr.ndim < 1:
                    raise ValueError(f"{where}: SparseAdam needs parameters with at least "
                                     f"one dimension")
                vals = g.values
                if vals.dtype != arr.dtype or vals.shape[1:] != arr.shape[1:]:
                    raise ValueError(f"{where}: sparse gradient values of dtype {vals.dtype} "
                                     f"and shape {vals.shape} do not fit rows of a "
                                     f"{arr.dtype} parameter of shape {arr.shape}")
                if g.indices.size and (g.indices.min() < 0 or g.indices.max() >= arr.shape[0]):
                    raise IndexError(f"{where}: sparse gradient row index out of range "
                                     f"[0, {arr.shape[0]})")
                st = self.state.get(p)
                if st:
                    if not isinstance(st.get("step"), (int, np.integer)):
                        raise TypeError(f"{where}: state['step'] must be an int, got "
                                        f"{st.get('step')!r}")
                    for key in ("exp_avg", "exp_avg_sq"):
                        check_state_array(st.get(key), arr.shape, arr.dtype, where, key)
                        if not st[key].flags.c_contiguous:
                            raise ValueError(f"{where}: state[{key!r}] must be C-contiguous")
                g = g.coalesce()
                work.append((group, p, arr, g))
        # phase 2: state and scalars, then one C call per group
        items_of = {}
        for group, p, arr, g in work:
            st = self.state[p]
            if len(st) == 0:
                st["step"] = 0
                st["exp_avg"] = np.zeros_like(arr)
                st["exp_avg_sq"] = np.zeros_like(arr)
            st["step"] += 1
            t = st["step"]
            beta1, beta2 = group["betas"]
            step_size = group["lr"] * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            vals = np.ascontiguousarray(g.values, dtype=arr.dtype)
            items_of.setdefault(id(group), (group, []))[1].append(
                (arr, np.ascontiguousarray(g.indices), vals, st["exp_avg"], st["exp_avg_sq"],
                 float(step_size)))
        for group, items in items_of.values():
            beta1, beta2 = group["betas"]
            _kernels.run_sparse_adam(items, beta1, beta2, group["eps"], group["maximize"])
        return loss
