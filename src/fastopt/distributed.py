"""Data-parallel training over MPI: gradient averaging, ZeRO-1 sharding and a clean abort.

Every process (rank) holds the same parameters and the same optimizer; each computes the
gradients of its own share of the batch, :func:`average_gradients` replaces every gradient by
the mean over the ranks, in place, and each rank then calls ``opt.step()`` as a single process
would. The parameters stay identical on all ranks because every rank steps the same kernels
on the same numbers.

Start such a program with ``mpiexec -n 4 python train.py``. It needs mpi4py and an MPI
library, both on PyPI: ``pip install mpi4py mpich`` (the ``distributed`` extra of fastopt
installs them). ``import fastopt`` never imports mpi4py; this module imports it on first use.

The average is exact and reproducible: for each element it is
``(((g_0 + g_1) + g_2) + ... + g_{N-1}) / N``, every operation rounded to the gradient's
dtype, the ranks' gradients taken in rank order, whatever the number of processes or the
MPI library's reduction algorithms; all ranks get the same bits. This is computed as a
reduce-scatter with a fixed order (an ``Alltoallv`` hands rank ``r`` every rank's
``r``-th slice of the bucket, which it sums in rank order) followed by an ``Allgatherv`` of the
summed slices: the data volume of a ring all-reduce. ``deterministic=False`` uses one
``Allreduce(MPI.SUM)`` per bucket instead, whose summation order is the MPI library's choice
(it changes with the process count, the message size and the library), so its result agrees
with the ordered sum to rounding only.

Gradients are reduced in buckets of about ``bucket_bytes`` (25 MiB by default): the gradients
of one dtype, in parameter order, are packed into one contiguous buffer, reduced with one pair
of collectives (or one ``Allreduce``), and copied back, so a model of many small tensors costs
a few collectives per step rather than one per parameter. :func:`plan_buckets` shows the plan.

:class:`ZeroOptimizer` is ZeRO stage 1: instead of every rank keeping the whole optimizer
state, each rank owns a contiguous 1/N of every group's elements and keeps the state of that
shard only; a step reduce-scatters the gradients (in the same fixed order), steps the shard
with the same C kernels and gathers the updated parameters onto every rank, both collectives
in buckets of about ``bucket_bytes`` (each carries a piece of every rank's slice, so all ranks
send and receive in every round). The result is the same bits as a single process stepping
with the averaged gradients.

Before any data moves, every rank checks its parameters and gradients, and the ranks compare
a digest of what they hold (one ``Allgather`` of 16 bytes per rank). A gradient that is
missing on some ranks only, of the wrong shape or dtype, or parameters that differ between
ranks, make :func:`average_gradients` raise the same :class:`GradientMismatchError` on every
rank, naming the first offending rank and parameter, with no gradient changed, instead of
leaving some ranks waiting in a collective that others never enter.

The parameters and gradients may be NumPy arrays or CPU torch tensors (the parameters of a
``torch.nn.Module``, stepped by a ``fastopt.torch`` optimizer, by a ``torch.optim`` one after
:func:`average_gradients`, or sharded by :class:`ZeroOptimizer`): a tensor is read and written
through a NumPy view of its memory. This module never imports torch; it looks for it in
``sys.modules`` when it meets an object that is not a NumPy array.

A rank that raises anything else (in its forward pass, in ``step()``) would leave the others
blocked in their next collective. Run the training under :func:`abort_on_error` and such an
exception prints its traceback with the rank's number and ends the whole job with
``MPI_Abort``.
"""
import bisect
import contextlib
import importlib
import os
import sys
import traceback
import zlib
from typing import Any, Iterator, List

import numpy as np

__all__ = ["average_gradients", "plan_buckets", "ZeroOptimizer", "abort_on_error",
           "GradientMismatchError", "DEFAULT_BUCKET_BYTES"]

#: The default bucket size of :func:`average_gradients`, in bytes.
DEFAULT_BUCKET_BYTES = 25 << 20

_DTYPES = (np.float32, np.float64, np.complex64, np.complex128)
_DTYPE_SET = frozenset(np.dtype(t) for t in _DTYPES)


class GradientMismatchError(ValueError):
    """The ranks' parameters or gradients do not agree; raised on every rank alike."""


def _mpi() -> Any:
    # imported by name: mpi4py is optional (the distributed extra), and MPI starts here
    return importlib.import_module("mpi4py.MPI")


def _world(comm):
    return _mpi().COMM_WORLD if comm is None else comm


def _flatten(params):
    """The parameters of an optimizer (every group, in order) or an iterable, as a list, and
    the optimizer's group sizes (``(-1,)`` for an iterable: they name the parameters)."""
    groups = getattr(params, "param_groups", None)
    if groups is not None:
        members = [list(group["params"]) for group in groups]
        return [p for m in members for p in m], tuple(len(m) for m in members)
    if isinstance(params, np.ndarray):
        raise TypeError("average_gradients takes an optimizer or an iterable of parameters, "
                        "not a single array; pass [p]")
    return list(params), (-1,)


def _names(sizes, n):
    if sizes == (-1,):
        return [f"params[{i}]" for i in range(n)]
    return [f"param_groups[{g}]['params'][{j}]" for g, k in enumerate(sizes) for j in range(k)]


def _torch_tensor(x):
    """Whether ``x`` is a torch tensor (never imports torch: none exists before it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _tensor_view(t):
    """The NumPy view of the memory of the torch tensor ``t``, or a str saying why there is
    none (the view is written in place, so it must be the tensor's own memory)."""
    torch = sys.modules["torch"]
    if t.layout is not torch.strided:
        return f"is a tensor with layout {t.layout}; fastopt.distributed takes dense tensors"
    if t.device.type != "cpu":
        return f"is on {t.device}; fastopt.distributed takes CPU tensors"
    if t.is_conj() or t.is_neg():
        return "is a lazily conjugated or negated view; pass a materialized tensor"
    try:
        return t.detach().numpy()
    except (TypeError, RuntimeError) as e:
        return f"has dtype {t.dtype}, which NumPy cannot view ({e})"


def _dtype_of(x):
    """The NumPy dtype of an array or tensor (a tensor's dtype name where NumPy has none)."""
    if isinstance(x, np.ndarray):
        return x.dtype
    if _torch_tensor(x):
        name = str(x.dtype).replace("torch.", "")
        try:
            return np.dtype(name)
        except TypeError:
            return name
    return getattr(x, "dtype", None)


def _dtype_code(dtype):
    """A number for a dtype, the same in every process (``hash`` of a str is not)."""
    if isinstance(dtype, np.dtype):
        return dtype.num
    return -1 if dtype is None else zlib.crc32(str(dtype).encode())


def _shape_of(x):
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _grad_view(p):
    """``(gradient as a NumPy array or None, problem or None)`` of the parameter ``p``."""
    g = getattr(p, "grad", None)
    if g is None:
        return None, None
    if isinstance(g, np.ndarray):
        array = g
    elif _torch_tensor(g):
        array = _tensor_view(g)
        if isinstance(array, str):
            return None, f".grad {array}"
    else:
        return None, f".grad is a {type(g).__name__}, not a NumPy array or a torch tensor"
    shape, dtype = _shape_of(p), _dtype_of(p)
    if array.shape != shape:
        return None, f".grad has shape {array.shape}, the parameter {shape}"
    if array.dtype != dtype:
        return None, f".grad has dtype {array.dtype}, the parameter {dtype}"
    if array.dtype not in _DTYPE_SET:
        return None, (f".grad has dtype {array.dtype}; averaging takes float32, float64, "
                      f"complex64 or complex128")
    if not array.flags.writeable:
        return None, ".grad is read-only (it is averaged in place)"
    return array, None


def _param_view(p, where):
    """The parameter ``p`` as a NumPy array sharing its memory; TypeError naming ``where``."""
    if isinstance(p, np.ndarray):
        return p.view(np.ndarray)
    if _torch_tensor(p):
        array = _tensor_view(p)
        if isinstance(array, str):
            raise TypeError(f"{where} {array}")
        return array
    raise TypeError(f"{where}: expected a NumPy array (fastopt.Parameter) or a torch "
                    f"tensor, got {type(p).__name__}")


def _codes(params):
    """The per-step check: per parameter ``(shape, dtype number, has a gradient)``, the
    gradients as NumPy arrays (None where missing or unusable), and whether some gradient
    is unusable (then :func:`_inspect` says why)."""
    codes, arrays, bad = [], [], False
    for p in params:
        if isinstance(p, np.ndarray):
            shape, num = p.shape, p.dtype.num
        else:
            shape, num = _shape_of(p), _dtype_code(_dtype_of(p))
        g = getattr(p, "grad", None)
        if g is None:
            codes.append((shape, num, 0))
            arrays.append(None)
            continue
        if (isinstance(g, np.ndarray) and g.shape == shape and g.dtype.num == num
                and g.dtype in _DTYPE_SET and g.flags.writeable):
            arrays.append(g)
        else:
            array, problem = _grad_view(p)
            bad = bad or problem is not None
            arrays.append(array)
        codes.append((shape, num, 1))
    return codes, arrays, bad


def _describe(grad):
    return "None" if grad is None else f"shape {tuple(grad.shape)} {grad.dtype}"


def _inspect(named):
    """Per parameter ``(name, shape, dtype, grad description)``, and the first local error.

    The description is that of the gradient when it is usable, else ``None``; a gradient that
    is not None but unusable is a local error.
    """
    signature, error = [], None
    for name, p in named:
        shape, dtype = _shape_of(p), str(_dtype_of(p) or type(p).__name__)
        array, problem = _grad_view(p)
        if problem is not None and error is None:
            error = f"{name}: {problem}"
        signature.append((name, shape, dtype, None if array is None else _describe(array)))
    return signature, error


def _agree(params, sizes, comm):
    """Check locally and collectively; raise the same error on every rank on a mismatch.

    Returns the per-parameter codes of :func:`_codes` (the same on every rank) and the
    gradients as NumPy arrays.
    """
    codes, arrays, bad = _codes(params)
    # The hash of a tuple of ints is the same in every process (no hash randomisation)
    key = hash((sizes, tuple(codes))) & 0xFFFFFFFFFFFFFFFF
    mine = np.array([key, bad], dtype=np.uint64)
    everyone = np.empty((comm.Get_size(), 2), dtype=np.uint64)
    comm.Allgather(mine, everyone)
    if not everyone[:, 1].any() and (everyone[:, 0] == everyone[0, 0]).all():
        return codes, arrays
    # Something differs: gather the full descriptions (rare, so pickled) and let every rank
    # derive the same message from the same data.
    gathered = comm.allgather(_inspect(list(zip(_names(sizes, len(params)), params))))
    message = _mismatch_message(gathered)
    if message is None:     # the keys differed, the descriptions agree (another Python?)
        return codes, arrays
    raise GradientMismatchError(message)


def _mismatch_message(gathered):
    size = len(gathered)
    for rank, (_, error) in enumerate(gathered):
        if error is not None:
            return f"rank {rank} of {size}: {error}"
    sigs = [sig for sig, _ in gathered]
    for rank in range(1, size):
        if len(sigs[rank]) != len(sigs[0]):
            return (f"rank {rank} of {size} has {len(sigs[rank])} parameters, rank 0 has "
                    f"{len(sigs[0])}")
    for i, (name, *_) in enumerate(sigs[0]):
        for rank in range(1, size):
            a, b = sigs[0][i], sigs[rank][i]
            if a[0] != b[0]:
                return (f"rank {rank} of {size}: parameter {i} is {b[0]}, on rank 0 {a[0]} "
                        f"(the ranks group their parameters differently)")
            if a[1:3] != b[1:3]:
                return (f"rank {rank} of {size}: {name} has shape {b[1]} {b[2]}, on rank 0 "
                        f"shape {a[1]} {a[2]}")
        have = [rank for rank in range(size) if sigs[rank][i][3] is not None]
        if 0 < len(have) < size:
            missing = min(set(range(size)) - set(have))
            return (f"rank {missing} of {size}: {name}: .grad is None (missing), on rank "
                    f"{have[0]} .grad has {sigs[have[0]][i][3]}")
    return None


def plan_buckets(params: Any, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> List[List[int]]:
    """The buckets :func:`average_gradients` reduces, as lists of parameter positions.

    Parameters whose gradient is None are left out. The gradients of each dtype, in
    parameter order (dtypes in order of first appearance), fill buckets of at most
    ``bucket_bytes``; a gradient larger than that has a bucket of its own.

    Parameters
    ----------
    params : Optimizer or iterable of Parameter
        An optimizer (its groups' parameters, in order) or the parameters.
    bucket_bytes : int
        The most bytes of gradient per bucket (a single larger gradient excepted).

    Returns
    -------
    list of list of int
        Per bucket, the positions of its parameters in the flattened parameter list.
    """
    if not isinstance(bucket_bytes, (int, np.integer)) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    return _plan([_grad_view(p)[0] for p in _flatten(params)[0]], bucket_bytes)


def _plan(grads, bucket_bytes):
    per_dtype = {}                   # dtype -> its buckets; dict order: first appearance
    for i, g in enumerate(grads):
        if g is None:
            continue
        nbytes = g.size * g.itemsize
        buckets = per_dtype.setdefault(g.dtype, [])
        if not buckets or (buckets[-1][1] + nbytes > bucket_bytes and buckets[-1][0]):
            buckets.append([[], 0])
        buckets[-1][0].append(i)
        buckets[-1][1] += nbytes
    return [positions for buckets in per_dtype.values() for positions, _ in buckets]


def _chunks(n, size):
    """Counts and offsets of ``size`` contiguous slices of ``n`` elements (lists of int)."""
    counts = [n // size + (r < n % size) for r in range(size)]
    displs = [0] * size
    for r in range(1, size):
        displs[r] = displs[r - 1] + counts[r - 1]
    return counts, displs


def _ordered_reduce_scatter(buf, comm):
    """This rank's slice of the rank-ordered sum of ``buf`` over the ranks, divided by N.

    Slice ``r`` of ``buf`` (``_chunks``) goes to rank ``r`` from every rank (``Alltoallv``);
    rank ``r`` sums what it received in rank order. Returns a new array.
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    counts, displs = _chunks(buf.size, size)
    mine = counts[rank]
    recv = np.empty(size * mine, dtype=buf.dtype)
    comm.Alltoallv([buf, (counts, displs)],
                   [recv, ([mine] * size, [s * mine for s in range(size)])])
    parts = recv.reshape(size, mine)
    total = parts[0]
    for s in range(1, size):
        np.add(total, parts[s], out=total)
    np.divide(total, size, out=total)
    return total


def _ordered_mean(buf, comm):
    """Replace ``buf`` by the rank-ordered sum over the ranks divided by their number."""
    counts, displs = _chunks(buf.size, comm.Get_size())
    comm.Allgatherv(_ordered_reduce_scatter(buf, comm), [buf, (counts, displs)])


def average_gradients(params: Any, comm: Any = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      *, deterministic: bool = True) -> int:
    """Replace every gradient by its mean over the ranks of ``comm``, in place.

    Call it on every rank after the backward pass and before ``step()``. Every rank must pass
    the same parameters (same number, order, shapes and dtypes). A parameter whose gradient
    is None on every rank is skipped (as ``step()`` skips it); one whose gradient is None on
    some ranks only is an error.

    Parameters
    ----------
    params : Optimizer or iterable of Parameter or torch.Tensor
        An optimizer (all its groups' parameters, in order: a fastopt optimizer, one of
        ``fastopt.torch`` or a ``torch.optim`` one) or the parameters (``model.parameters()``
        of a torch module); each has a ``.grad`` that is None or an array of the parameter's
        shape and dtype (float32, float64, complex64 or complex128), written in place: a
        NumPy array, or a dense CPU torch tensor (averaged through a NumPy view of its
        memory).
    comm : mpi4py.MPI.Comm, optional
        The communicator; ``MPI.COMM_WORLD`` by default.
    bucket_bytes : int
        About how many bytes of gradients one bucket (one round of collectives) carries.
    deterministic : bool
        True (default): the sum runs in rank order, so the result is the same bits for any
        process count and MPI library (see the module docstring). False: one
        ``Allreduce(MPI.SUM)`` per bucket, in the MPI library's order.

    Returns
    -------
    int
        The number of buckets reduced.

    Raises
    ------
    GradientMismatchError
        On every rank alike, before any gradient changes, when some rank's gradient is
        missing (while others have it), not an array, read-only, of a shape or dtype other
        than its parameter's, or when the ranks' parameters differ. The message names the
        first such rank and the parameter.
    """
    if not isinstance(bucket_bytes, (int, np.integer)) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    comm = _world(comm)
    flat, sizes = _flatten(params)
    _, grads = _agree(flat, sizes, comm)
    size = comm.Get_size()
    buckets = _plan(grads, bucket_bytes)
    if size == 1:
        return len(buckets)
    MPI = None if deterministic else _mpi()
    for bucket in buckets:
        members = [grads[i] for i in bucket]
        in_place = len(members) == 1 and members[0].flags.c_contiguous
        if in_place:
            buf = members[0].reshape(-1)            # a view: reduced in place
        else:
            buf = np.empty(sum(g.size for g in members), dtype=members[0].dtype)
            offset = 0
            for g in members:
                buf[offset:offset + g.size] = g.reshape(-1)
                offset += g.size
        if deterministic:
            _ordered_mean(buf, comm)
        else:
            assert MPI is not None
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            np.divide(buf, size, out=buf)
        if not in_place:
            offset = 0
            for g in members:
                g[...] = buf[offset:offset + g.size].reshape(g.shape)
                offset += g.size
    return len(buckets)


def _gather_range(views, offsets, lo, out):
    """Copy elements ``lo:lo + out.size`` of the concatenation of the flat arrays ``views``
    (``offsets``: where each starts, and the total last) into ``out``."""
    hi, done = lo + out.size, 0
    i = max(bisect.bisect_right(offsets, lo) - 1, 0)
    while lo < hi:
        a = offsets[i]
        n = min(hi, offsets[i + 1]) - lo
        if n > 0:
            out[done:done + n] = views[i][lo - a:lo - a + n]
            lo, done = lo + n, done + n
        i += 1


def _scatter_range(views, offsets, lo, src):
    """The inverse of :func:`_gather_range`: write ``src`` into elements ``lo:lo + src.size``
    of the concatenation of ``views``."""
    hi, done = lo + src.size, 0
    i = max(bisect.bisect_right(offsets, lo) - 1, 0)
    while lo < hi:
        a = offsets[i]
        n = min(hi, offsets[i + 1]) - lo
        if n > 0:
            views[i][lo - a:lo - a + n] = src[done:done + n]
            lo, done = lo + n, done + n
        i += 1


def _flat_views(arrays):
    """1-d views of ``arrays`` (a copy only for a non-contiguous one: read, never written)."""
    return [a.reshape(-1) for a in arrays]


class _Shard:
    """One group of a :class:`ZeroOptimizer`: its parameters, their layout, this rank's
    shard, and the plan of its buckets."""

    def __init__(self, members, names, size, rank, bucket_bytes):
        from fastopt.parameter import Parameter

        self.members, self.names = members, names
        self.views = [_param_view(p, name) for p, name in zip(members, names)]
        self.dtype = self.views[0].dtype if self.views else np.dtype(np.float32)
        self.shapes = [v.shape for v in self.views]
        self.offsets = [0]
        for v in self.views:
            self.offsets.append(self.offsets[-1] + v.size)
        self.numel = self.offsets[-1]
        self.counts, self.displs = _chunks(self.numel, size)
        self.lo, self.n = self.displs[rank], self.counts[rank]
        flat = np.empty(self.n, dtype=self.dtype)
        _gather_range(_flat_views(self.views), self.offsets, self.lo, flat)
        self.shard = Parameter(flat)
        # a bucket carries about bucket_bytes: `piece` elements of every rank's slice
        self.piece = max(1, bucket_bytes // (self.dtype.itemsize * size))
        self.rounds = -(-max(self.counts) // self.piece) if self.numel else 0

    def round_counts(self, j):
        """Per rank, the elements of its slice that bucket ``j`` carries."""
        start = j * self.piece
        return [max(0, min(self.piece, c - start)) for c in self.counts]


class ZeroOptimizer:
    """ZeRO stage 1: each rank keeps the optimizer state of 1/N of every group's elements.

    The parameters of each group, flattened and concatenated in order, are cut into N
    contiguous slices; rank ``r`` owns slice ``r`` (the first ``E % N`` ranks one element
    more) and holds an ``optimizer_class`` over that slice only (:attr:`optimizer`, one
    parameter per group), so each rank's optimizer state is 1/N of a single process's. A
    :meth:`step`:

    1. checks, collectively, the parameters and gradients (:func:`average_gradients`'s
       check; every parameter needs a gradient, and every group one dtype);
    2. reduce-scatters each group's gradients: rank ``r`` receives slice ``r`` of every
       rank's gradients (``Alltoallv``) and averages them in rank order, the same bits as
       :func:`average_gradients`;
    3. copies the owned slice of the parameters into the shard and steps the shard with the
       same C kernels;
    4. gathers the updated slices (``Allgatherv``) into every rank's parameters, in place.

    The parameters therefore end every step equal on all ranks and, bit for bit, equal to
    one process stepping ``optimizer_class`` over all of them with the averaged gradients
    (the update of an element depends on that element only). The gradients are left as they
    were (not averaged).

    Both collectives travel in buckets of about ``bucket_bytes``: bucket ``j`` of a group
    carries the ``j``-th piece of every rank's slice (``bucket_bytes / N`` bytes of each), so
    every rank sends and receives in every round, the buffers of a step are two of a
    bucket's size, and a group of ``E`` elements takes about ``E * itemsize / bucket_bytes``
    rounds (at least one per group: put parameters of one dtype in one group to share
    buckets). The sums, and so the bits, do not depend on ``bucket_bytes``.

    The parameters may be NumPy arrays (``fastopt.Parameter``) or CPU torch tensors
    (``model.parameters()``, float32 or float64), updated in place (a tensor's autograd
    version counter is incremented, as by an in-place torch operation); their ``.grad``
    are arrays or tensors alike.

    Parameters
    ----------
    params : iterable of Parameter or torch.Tensor, or of dict
        The parameters, or parameter groups (dicts with ``"params"`` and per-group options),
        the same on every rank.
    optimizer_class : type
        A per-element fastopt optimizer (``fastopt.Adam``, ``fastopt.SGD``, ... : one of
        ``fastopt.OPTIMIZERS``).
    comm : mpi4py.MPI.Comm, optional
        The communicator; ``MPI.COMM_WORLD`` by default.
    bucket_bytes : int
        About how many bytes one round of collectives carries (over all ranks).
    **defaults
        The optimizer's arguments (``lr=...``), as for ``optimizer_class``.

    Attributes
    ----------
    optimizer : Optimizer
        This rank's ``optimizer_class`` over its shards. Its ``param_groups`` carry the
        hyperparameters (a learning-rate scheduler drives it), its ``state`` the shard's
        state, and its ``state_dict()`` is this rank's part of a checkpoint.
    """

    def __init__(self, params: Any, optimizer_class: type, comm: Any = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, **defaults: Any) -> None:
        from fastopt.optimizer import kernel_optimizers

        if not (isinstance(optimizer_class, type) and
                any(issubclass(optimizer_class, k) for k in kernel_optimizers().values())):
            raise TypeError(f"ZeroOptimizer needs a per-element fastopt optimizer class "
                            f"(one of fastopt.OPTIMIZERS), got {optimizer_class!r}")
        if not isinstance(bucket_bytes, (int, np.integer)) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        self.comm = comm = _world(comm)
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = [dict(g, params=list(g["params"])) for g in params]
        else:
            groups = [{"params": params}]
        size, rank = comm.Get_size(), comm.Get_rank()
        self.bucket_bytes = int(bucket_bytes)
        self._groups: List[_Shard] = []
        shard_groups = []
        for g, group in enumerate(groups):
            members = group["params"]
            if not members:
                raise ValueError(f"param_groups[{g}] has no parameters")
            dtypes = {str(_dtype_of(p)) for p in members}
            if len(dtypes) != 1:
                raise ValueError(f"param_groups[{g}] mixes dtypes {sorted(dtypes)}; "
                                 f"ZeroOptimizer shards each group as one array: put each "
                                 f"dtype in its own group")
            names = [f"param_groups[{g}]['params'][{i}]" for i in range(len(members))]
            shard = _Shard(members, names, size, rank, self.bucket_bytes)
            self._groups.append(shard)
            shard_groups.append(dict({k: v for k, v in group.items() if k != "params"},
                                     params=[shard.shard]))
        self.optimizer = optimizer_class(shard_groups, **defaults)

    @property
    def param_groups(self) -> List[dict]:
        """The shard optimizer's groups (hyperparameters; each holds this rank's shard)."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the parameters (None, or zeros in place)."""
        for group in self._groups:
            for p in group.members:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    g = p.grad
                    if _torch_tensor(g):
                        g.detach_()
                        g.zero_()
                    else:
                        g[...] = 0

    def step(self) -> None:
        """Average the gradients over the ranks, step this rank's shards, gather the result.

        Raises
        ------
        GradientMismatchError
            On every rank alike, before anything changes, as :func:`average_gradients`
            raises it, and when a parameter has no gradient on any rank.
        """
        self._reduce_scatter(self._check())
        try:
            self.optimizer.step()
        finally:
            for group in self._groups:
                group.shard.grad = None
        self._allgather()

    def _check(self):
        """The collective check of :meth:`step`: the gradients as arrays, per group."""
        params = [p for group in self._groups for p in group.members]
        sizes = tuple(len(group.members) for group in self._groups)
        codes, arrays = _agree(params, sizes, self.comm)
        for i, (_, _, has_grad) in enumerate(codes):
            if not has_grad:        # then None on every rank: the codes agree
                raise GradientMismatchError(f"{_names(sizes, len(params))[i]}: .grad is None "
                                            f"on every rank; ZeroOptimizer steps every "
                                            f"parameter")
        out, start = [], 0
        for group in self._groups:
            out.append(arrays[start:start + len(group.members)])
            start += len(group.members)
        return out

    def _reduce_scatter(self, grads):
        """Give every shard the rank-ordered mean of its slice of the gradients, bucket by
        bucket, and refresh the shard from the parameters."""
        comm = self.comm
        size, rank = comm.Get_size(), comm.Get_rank()
        for group, arrays in zip(self._groups, grads):
            flat = _flat_views(arrays)
            mean = np.empty(group.n, dtype=group.dtype)
            send = np.empty(group.piece * size, dtype=group.dtype)
            recv = np.empty(group.piece * size, dtype=group.dtype)
            for j in range(group.rounds):
                counts = group.round_counts(j)
                start, offset, displs = j * group.piece, 0, []
                for s, c in enumerate(counts):
                    displs.append(offset)
                    _gather_range(flat, group.offsets, group.displs[s] + start,
                                  send[offset:offset + c])
                    offset += c
                mine = counts[rank]
                comm.Alltoallv([send, (counts, displs)],
                               [recv, ([mine] * size, [s * mine for s in range(size)])])
                parts = recv[:size * mine].reshape(size, mine)
                total = mean[start:start + mine]
                total[...] = parts[0]
                for s in range(1, size):
                    np.add(total, parts[s], out=total)
                np.divide(total, size, out=total)
            group.shard.grad = mean
            # the parameters are authoritative (a loaded checkpoint, an edit between steps)
            views = [_param_view(p, n) for p, n in zip(group.members, group.names)]
            _gather_range(_flat_views(views), group.offsets, group.lo, group.shard)

    def _allgather(self):
        """Write every rank's updated shard into the parameters, bucket by bucket."""
        comm = self.comm
        size, rank = comm.Get_size(), comm.Get_rank()
        foreign = []
        for group in self._groups:
            views = [_param_view(p, n) for p, n in zip(group.members, group.names)]
            targets = [v.reshape(-1) if v.flags.c_contiguous else None for v in views]
            strided = [i for i, t in enumerate(targets) if t is None]
            if strided:         # written whole at the end, through a contiguous copy
                for i in strided:
                    targets[i] = np.empty(views[i].size, dtype=group.dtype)
            recv = np.empty(group.piece * size, dtype=group.dtype)
            shard = np.asarray(group.shard)
            for j in range(group.rounds):
                counts = group.round_counts(j)
                start = j * group.piece
                displs = [0] * size
                for s in range(1, size):
                    displs[s] = displs[s - 1] + counts[s - 1]
                comm.Allgatherv(shard[start:start + counts[rank]],
                                [recv, (counts, displs)])
                for s, c in enumerate(counts):
                    if c:
                        _scatter_range(targets, group.offsets, group.displs[s] + start,
                                       recv[displs[s]:displs[s] + c])
            for i in strided:
                views[i][...] = targets[i].reshape(views[i].shape)
            foreign += [p for p in group.members if not isinstance(p, np.ndarray)]
        if foreign:
            from fastopt._adapters import _foreign_updated
            _foreign_updated(foreign)


@contextlib.contextmanager
def abort_on_error(comm: Any = None, errorcode: int = 1) -> Iterator[Any]:
    """End the whole MPI job when the body raises, instead of leaving other ranks blocked.

    On an exception (KeyboardInterrupt included; ``SystemExit`` with code 0 or None
    excepted) it writes ``fastopt.distributed: rank R of N raised ...`` and the traceback to
    stderr and calls ``comm.Abort(errorcode)``, which ends every process of the job. Use it
    as ``with abort_on_error(): train()`` or as a decorator ``@abort_on_error()``.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The communicator to abort; ``MPI.COMM_WORLD`` by default.
    errorcode : int
        The exit status passed to ``MPI_Abort``.

    Yields
    ------
    mpi4py.MPI.Comm
        The communicator.
    """
    comm = _world(comm)
    try:
        yield comm
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        _abort(comm, errorcode)
    except BaseException:
        _abort(comm, errorcode)


def _abort(comm, errorcode):
    text = traceback.format_exc()
    try:
        sys.stderr.write(f"fastopt.distributed: rank {comm.Get_rank()} of {comm.Get_size()} "
                         f"raised an exception; aborting the MPI job (error code "
                         f"{errorcode})\n{text}")
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        comm.Abort(errorcode)
        # MPI_Abort may return before the process manager ends this process (MPICH does):
        # run no more of the program.
        os._exit(errorcode)
