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
import re
import secrets
import sys
import traceback
import zlib
from typing import Any, Iterator, List, Union

import numpy as np

from fastopt._kernels import storage_shortfall
from fastopt.checkpoint import (CheckpointError, CheckpointMismatchError, CorruptCheckpointError,
                                NotACheckpointError, TruncatedCheckpointError)

__all__ = ["average_gradients", "plan_buckets", "ZeroOptimizer", "abort_on_error",
           "GradientMismatchError", "DEFAULT_BUCKET_BYTES", "save", "load",
           "IncompleteCheckpointError", "shard_file_name", "SHARD_LAYOUT_KEY"]

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
    short = storage_shortfall(t) if t.layout is torch.strided and t.device.type == "cpu" else None
    if short is not None:
        return f"is a tensor whose {short}"
    try:
        return t.numpy()        # a dense CPU tensor that needs no grad: the usual gradient
    except (RuntimeError, TypeError):
        pass
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
        dtype = _TORCH_DTYPES.get(x.dtype)
        if dtype is None:
            name = str(x.dtype).replace("torch.", "")
            try:
                dtype = np.dtype(name)
            except TypeError:
                dtype = name
            _TORCH_DTYPES[x.dtype] = dtype
        return dtype
    return getattr(x, "dtype", None)


_TORCH_DTYPES: dict = {}        # torch dtype -> NumPy dtype (its name where NumPy has none)


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
        if not isinstance(g, np.ndarray) and _torch_tensor(g):
            g = _tensor_view(g)         # a str when unusable: then _grad_view says why
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
        # a bucket carries about bucket_bytes: `piece` elements of every rank's slice (no
        # more than the largest slice)
        self.piece = max(1, min(bucket_bytes // (self.dtype.itemsize * size),
                                max(self.counts)))
        self.rounds = -(-max(self.counts) // self.piece) if self.numel else 0
        self._buffers = None

    def buffers(self):
        """``(send, receive, mean)``: the two bucket buffers and the shard's gradient, made
        at the first step and kept (new buffers at every step would fault their pages in
        every time)."""
        if self._buffers is None:
            size = len(self.counts)
            self._buffers = (np.empty(self.piece * size, dtype=self.dtype),
                             np.empty(self.piece * size, dtype=self.dtype),
                             np.empty(self.n, dtype=self.dtype))
        return self._buffers

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
    every rank sends and receives in every round, the buffers are two of a bucket's size
    (per group, made at the first step and kept, with the shard's gradient), and a group of
    ``E`` elements takes about ``E * itemsize / bucket_bytes`` rounds (at least one per
    group: put parameters of one dtype in one group to share buckets). The sums, and so the
    bits, do not depend on ``bucket_bytes``. On one rank the step copies instead of calling
    the collectives.

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
        state; :func:`save` and :func:`load` checkpoint it, on any number of ranks.
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
                elif _torch_tensor(p):
                    from fastopt._adapters import TORCH_ADAPTER
                    TORCH_ADAPTER.zero_grad(p, False)    # as torch.optim does it
                elif p.grad is not None:
                    p.grad[...] = 0

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
            send, recv, mean = group.buffers()
            if size == 1:       # the mean of one rank: its gradients (x / 1 is x)
                _gather_range(flat, group.offsets, 0, mean)
                group.shard.grad = mean
                views = [_param_view(p, n) for p, n in zip(group.members, group.names)]
                _gather_range(_flat_views(views), group.offsets, 0, group.shard)
                continue
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
                if size == 1:
                    total[...] = parts[0]
                else:       # ((g_0 + g_1) + ...) / N, as _ordered_reduce_scatter sums
                    np.add(parts[0], parts[1], out=total)
                    for s in range(2, size):
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
            recv = group.buffers()[1]
            shard = np.asarray(group.shard)
            if size == 1:
                _scatter_range(targets, group.offsets, 0, shard)
            for j in range(group.rounds if size > 1 else 0):
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


# ---- sharded checkpoints -----------------------------------------------------------------

#: The key of a shard file's ``extra`` that holds its layout (see :func:`save`).
SHARD_LAYOUT_KEY = "fastopt.distributed"
_SHARD_FORMAT = 1
_SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})\.safetensors\Z")


class IncompleteCheckpointError(CheckpointError):
    """A sharded checkpoint that is not whole: a shard file is missing, or the shards come
    from different saves (one that did not finish)."""


def shard_file_name(rank: int, world_size: int) -> str:
    """The name of rank ``rank``'s file in a checkpoint of ``world_size`` ranks.

    >>> shard_file_name(1, 3)
    'shard-00001-of-00003.safetensors'
    """
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


class _Solo:
    """The communicator of a single process that uses no MPI (a plain optimizer)."""

    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0

    def allgather(self, value):
        return [value]

    def bcast(self, value, root=0):
        return value

    def Barrier(self):
        pass


_ERRORS = {cls.__name__: cls for cls in (
    CheckpointError, CorruptCheckpointError, TruncatedCheckpointError, NotACheckpointError,
    CheckpointMismatchError, IncompleteCheckpointError, OSError, FileNotFoundError,
    PermissionError, NotADirectoryError, IsADirectoryError, TypeError, ValueError)}


def _raise_first(errors):
    """Raise the first rank's error of ``errors`` (per rank, ``(class name, message)`` or
    None), saying which rank found it when the others did not find the same."""
    for r, found in enumerate(errors):
        if found is not None:
            message = found[1]
            if any(e != found for e in errors):
                message += f" (found on rank {r} of {len(errors)})"
            raise _ERRORS.get(found[0], CheckpointError)(message)


def _agree_or_raise(comm, error):
    """Gather every rank's ``(class name, message)`` or None; raise the first rank's on all."""
    _raise_first(comm.allgather(error))


def _as_error(exc):
    """``(class name, message)`` of ``exc``, the class being its nearest one in _ERRORS."""
    name = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in _ERRORS)
    return name, str(exc)


class _Layout:
    """What a checkpoint of an optimizer records and checks: its class, and per group the
    parameter shapes, the dtype, the element count and this process's range."""

    def __init__(self, optimizer):
        from fastopt.checkpoint import _qualname
        from fastopt.optimizer import Optimizer, kernel_optimizers

        self.zero = isinstance(optimizer, ZeroOptimizer)
        if self.zero:
            self.comm = optimizer.comm
            self.inner = optimizer.optimizer
            self.groups = [(g.shapes, g.dtype, g.numel, g.lo, g.n) for g in optimizer._groups]
            self.members = [g.members for g in optimizer._groups]
        else:
            if not (isinstance(optimizer, Optimizer) and any(
                    isinstance(optimizer, k) for k in kernel_optimizers().values())):
                raise TypeError(f"a sharded checkpoint is of a ZeroOptimizer or of a "
                                f"per-element fastopt optimizer (one of fastopt.OPTIMIZERS), "
                                f"got {type(optimizer).__name__}")
            self.comm = _Solo()
            self.inner = optimizer
            self.groups, self.members = [], []
            for g, group in enumerate(optimizer.param_groups):
                members = list(group["params"])
                views = [_param_view(p, f"param_groups[{g}]['params'][{i}]")
                         for i, p in enumerate(members)]
                dtypes = sorted({str(v.dtype) for v in views})
                if len(dtypes) > 1:
                    raise ValueError(f"param_groups[{g}] mixes dtypes {dtypes}; a sharded "
                                     f"checkpoint keeps each group's state as one array: "
                                     f"put each dtype in its own group")
                numel = sum(v.size for v in views)
                dtype = views[0].dtype if views else np.dtype(np.float32)
                self.groups.append(([v.shape for v in views], dtype, numel, 0, numel))
                self.members.append(members)
        self.size, self.rank = self.comm.Get_size(), self.comm.Get_rank()
        self.cls = type(self.inner)
        self.name = _qualname(self.inner)
        self.scalars = frozenset(self.cls._scalar_state_keys) | {"step"}

    def describe(self):
        """The layout entry of this process's shard file (JSON values)."""
        return [{"numel": numel, "begin": lo, "end": lo + n, "dtype": str(dtype),
                 "shapes": [list(map(int, s)) for s in shapes]}
                for shapes, dtype, numel, lo, n in self.groups]

    def flat_state(self):
        """A plain optimizer's state as a ZeroOptimizer shard holds it: per group one dict
        of flat arrays (None for a group without state); ValueError naming the parameter
        and key where the group's parameters cannot share one state."""
        out = []
        opt = self.inner
        for g, (members, group) in enumerate(zip(self.members, opt.param_groups)):
            states = [opt.state.get(p) or {} for p in members]
            first = next((i for i, st in enumerate(states) if st), None)
            if first is None:
                out.append(None)
                continue
            where0 = f"param_groups[{g}]['params'][{first}]"
            keys = list(states[first])
            merged = {}
            for i, st in enumerate(states):
                where = f"param_groups[{g}]['params'][{i}]"
                if sorted(st) != sorted(keys):
                    raise ValueError(
                        f"{where} has state {sorted(st)}, {where0} {sorted(keys)}; a sharded "
                        f"checkpoint keeps one state per group: its parameters must all have "
                        f"stepped together")
                for key in keys:
                    value = st[key]
                    if not isinstance(value, np.ndarray):
                        raise ValueError(f"{where}: state[{key!r}] is a "
                                         f"{type(value).__name__}, not an array")
                    if key in self.scalars:
                        ref = states[first][key]
                        if value.tobytes() != np.asarray(ref).tobytes():
                            raise ValueError(
                                f"{where}: state[{key!r}] is {value!r}, at {where0} {ref!r}; a "
                                f"sharded checkpoint keeps one {key!r} per group")
            for key in keys:
                if key in self.scalars:
                    merged[key] = states[first][key]
                else:
                    merged[key] = np.concatenate([np.asarray(st[key]).reshape(-1)
                                                  for st in states])
            out.append(merged)
        return out


def save(checkpoint_dir: Union[str, "os.PathLike[str]"], optimizer: Any,
         scheduler: Any = None, extra: Any = None) -> None:
    """Write a sharded checkpoint of ``optimizer``: one file per rank, loadable on any number.

    Call it on every rank of a :class:`ZeroOptimizer` (collective), or in one process for a
    plain per-element fastopt optimizer (a checkpoint of one shard; no MPI is used, so in
    plain data parallelism call it on one rank). :func:`load` reads it back on any number of
    ranks, or into a plain optimizer.

    File layout: ``checkpoint_dir/shard-RRRRR-of-NNNNN.safetensors`` (:func:`shard_file_name`),
    one per rank of the ``N`` that saved. Each is a checkpoint of :mod:`fastopt.checkpoint`'s
    format (pickle-free safetensors, checksummed, written atomically; readable with
    :func:`fastopt.checkpoint.read`) of that rank's shard optimizer: its state dict has one
    parameter per group, whose state arrays are 1-d, the rank's contiguous range of the
    group's elements (parameters flattened and concatenated in order), and the 0-d entries
    (``step``, NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) once per group. Its
    ``extra`` is ``{"fastopt.distributed": layout, "extra": ...}``, the layout being
    ``{"format": 1, "id": <hex, the same in every shard of one save>, "rank": r,
    "world_size": N, "groups": [{"numel": E, "begin": b, "end": e, "dtype": "float32",
    "shapes": [[3, 4], ...]}, ...]}`` (rank ``r`` covers elements ``b:e`` of each group, the
    split of :class:`ZeroOptimizer`). Rank 0's file alone carries ``scheduler`` and the
    user's ``extra``; the others hold None there.

    Parameters
    ----------
    checkpoint_dir : str or os.PathLike
        The directory (created if missing), one that every rank sees (a shared file system
        when the ranks run on several machines). Shard files of a checkpoint of another rank
        count in it are removed once every rank has written its file. A save that stops
        midway leaves shards of two saves, which :func:`load` refuses: save to a new
        directory (or alternate two) to keep the previous checkpoint safe.
    optimizer : ZeroOptimizer or Optimizer
        A :class:`ZeroOptimizer` (its shard optimizer's state), or a per-element fastopt
        optimizer whose groups each hold one dtype and whose parameters of a group all have
        state or all have none, with the same 0-d entries.
    scheduler : scheduler, list or dict of schedulers, or None
        As for :func:`fastopt.save` (the schedulers of rank 0 are saved).
    extra : object, optional
        As for :func:`fastopt.save` (rank 0's is saved; :func:`load` returns it on every
        rank). The parameters are not part of the optimizer's state: pass them here
        (``extra={"params": params}``) to resume training from the checkpoint.

    Raises
    ------
    TypeError, ValueError, OSError
        On every rank alike (the first failing rank's error), when something cannot be
        stored or written. The checks of ``extra`` and ``scheduler`` come before any file
        is written.
    """
    from fastopt import checkpoint

    layout = _Layout(optimizer)
    comm, rank, size = layout.comm, layout.rank, layout.size
    directory = os.fspath(checkpoint_dir)
    flat = None if layout.zero else layout.flat_state()
    # 1. rank 0 checks what only it writes, and draws the save's id
    error, save_id = None, None
    if rank == 0:
        save_id = secrets.token_hex(16)
        try:
            encoder = checkpoint._Encoder()
            encoder.encode(extra, ("extra",), "extra")
            checkpoint._scheduler_state(scheduler, ("scheduler",), "scheduler", encoder)
        except (TypeError, ValueError) as e:
            error = _as_error(e)
    _agree_or_raise(comm, error)
    save_id = comm.bcast(save_id, root=0)
    # 2. every rank writes its file
    error = None
    try:
        os.makedirs(directory, exist_ok=True)
        content = {SHARD_LAYOUT_KEY: {"format": _SHARD_FORMAT, "id": save_id, "rank": rank,
                                      "world_size": size, "groups": layout.describe()},
                   "extra": extra if rank == 0 else None}
        path = os.path.join(directory, shard_file_name(rank, size))
        shard = layout.inner if layout.zero else _shard_optimizer(layout, flat)
        checkpoint.save(path, shard, scheduler if rank == 0 else None, content)
    except (OSError, TypeError, ValueError) as e:
        error = _as_error(e)
    _agree_or_raise(comm, error)
    # 3. rank 0 removes the shards of checkpoints of other rank counts
    if rank == 0:
        for name in os.listdir(directory):
            match = _SHARD_RE.match(name)
            if match and int(match.group(2)) != size:
                os.unlink(os.path.join(directory, name))
    comm.Barrier()


def _shard_optimizer(layout, flat):
    """A plain optimizer's state as an optimizer of its class over one flat parameter per
    group (the shard of one rank), to write as a shard file."""
    from fastopt.parameter import Parameter

    groups, state = [], {}
    for (shapes, dtype, numel, _, _), group, st in zip(layout.groups,
                                                       layout.inner.param_groups, flat):
        p = Parameter(np.empty(numel, dtype=dtype))    # never written: pages stay unmapped
        groups.append(dict({k: v for k, v in group.items() if k != "params"}, params=[p]))
        if st is not None:
            state[p] = st
    shard = layout.cls(groups)
    shard.state.update(state)
    return shard


def _shard_files(directory):
    """``(world size, {rank: path})`` of the shard files in ``directory``."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no such checkpoint directory") from None
    found = {}
    for name in sorted(names):
        match = _SHARD_RE.match(name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = name
    if not found:
        raise IncompleteCheckpointError(f"{directory}: no shard files "
                                        f"(shard-RRRRR-of-NNNNN.safetensors) in it")
    if len(found) > 1:
        raise IncompleteCheckpointError(
            f"{directory}: holds shard files of checkpoints of {sorted(found)} ranks; a save "
            f"that did not finish? remove the shards of the one to drop")
    (world, files), = found.items()
    for r in range(world):
        if r not in files:
            raise IncompleteCheckpointError(
                f"{os.path.join(directory, shard_file_name(r, world))}: missing (the "
                f"checkpoint was saved by {world} ranks)")
    extra = sorted(r for r in files if r >= world)
    if extra:
        raise IncompleteCheckpointError(
            f"{os.path.join(directory, files[extra[0]])}: rank {extra[0]} of {world} ranks")
    return world, {r: os.path.join(directory, name) for r, name in files.items()}


def _read_shard(path, k, world, layout):
    """Read and check shard file ``k`` of ``world``: ``(content, its groups' state)``."""
    from fastopt.checkpoint import _read

    content = _read(path)

    def mismatch(what):
        return CheckpointMismatchError(f"{path}: {what}")

    def corrupt(what):
        return CorruptCheckpointError(f"{path}: {what}")

    extra = content["extra"]
    info = extra.get(SHARD_LAYOUT_KEY) if isinstance(extra, dict) else None
    if not (isinstance(info, dict) and set(extra) == {SHARD_LAYOUT_KEY, "extra"}):
        raise NotACheckpointError(f"{path}: not a shard of a sharded checkpoint (its extra "
                                  f"has no {SHARD_LAYOUT_KEY!r} layout)")
    if info.get("format") != _SHARD_FORMAT:
        raise NotACheckpointError(f"{path}: sharded checkpoint format {info.get('format')!r}; "
                                  f"this fastopt reads format {_SHARD_FORMAT}")
    if info.get("rank") != k or info.get("world_size") != world:
        raise corrupt(f"the file is named rank {k} of {world}, its layout says rank "
                      f"{info.get('rank')!r} of {info.get('world_size')!r} (a renamed file?)")
    if content["optimizer"] != layout.name:
        raise mismatch(f"the checkpoint holds the state of a {content['optimizer']}, not of "
                       f"a {layout.name}")
    saved = info.get("groups")
    if not isinstance(saved, list) or not all(isinstance(g, dict) for g in saved):
        raise corrupt("the layout's groups are not a list of objects")
    if len(saved) != len(layout.groups):
        raise mismatch(f"the checkpoint has {len(saved)} parameter groups, the optimizer "
                       f"{len(layout.groups)}")
    sd = content["state_dict"]
    if len(sd["param_groups"]) != len(saved):
        raise corrupt(f"the state dict has {len(sd['param_groups'])} groups, the layout "
                      f"{len(saved)}")
    states = []
    for g, (entry, (shapes, _, numel, _, _)) in enumerate(zip(saved, layout.groups)):
        where = f"param_groups[{g}]"
        mine = [list(map(int, s)) for s in shapes]
        theirs = entry.get("shapes")
        if not isinstance(theirs, list):
            raise corrupt(f"{where}: the layout has no parameter shapes")
        if len(theirs) != len(mine):
            raise mismatch(f"{where} has {len(theirs)} parameters in the checkpoint, "
                           f"{len(mine)} in the optimizer")
        for i, (a, b) in enumerate(zip(theirs, mine)):
            if a != b:
                raise mismatch(f"{where}['params'][{i}] has shape {tuple(a)} in the "
                               f"checkpoint, {tuple(b)} in the optimizer")
        counts, displs = _chunks(numel, world)
        expected = [displs[k], displs[k] + counts[k]]
        if entry.get("numel") != numel or [entry.get("begin"), entry.get("end")] != expected:
            raise corrupt(f"{where}: the shard covers elements {entry.get('begin')!r}:"
                          f"{entry.get('end')!r} of {entry.get('numel')!r}; rank {k} of "
                          f"{world} holds {expected[0]}:{expected[1]} of {numel}")
        if sd["param_groups"][g].get("params") != [g]:
            raise corrupt(f"state dict param_groups[{g}] does not hold the one parameter {g}")
        st = sd["state"].get(g, sd["state"].get(str(g)))
        if st is not None and not isinstance(st, dict):
            raise corrupt(f"state[{g}] is not a dict")
        for key, value in (st or {}).items():
            if not isinstance(value, np.ndarray):
                raise corrupt(f"state[{g}][{key!r}] is a {type(value).__name__}, not an array")
            want = () if key in layout.scalars else (counts[k],)
            if value.shape != want:
                raise corrupt(f"state[{g}][{key!r}] has shape {value.shape}; the shard of "
                              f"{where} needs {want}")
        states.append(st or None)
    return content, states


def _facts(content, states, scalars):
    """What every shard of one save holds alike: its id, the groups' hyperparameters, their
    state keys and 0-d state (compared as text)."""
    groups = [{k: v for k, v in g.items() if k != "params"}
              for g in content["state_dict"]["param_groups"]]
    per_group = [None if st is None else
                 sorted((key, repr(value.tolist()) if key in scalars else None)
                        for key, value in st.items())
                 for st in states]
    return (content["extra"][SHARD_LAYOUT_KEY]["id"], repr(groups), repr(per_group))


def load(checkpoint_dir: Union[str, "os.PathLike[str]"], optimizer: Any,
         scheduler: Any = None) -> Any:
    """Load a checkpoint written by :func:`save` on any number of ranks into ``optimizer``.

    A :class:`ZeroOptimizer` on ``M`` ranks (call it on every rank: collective) takes its
    share of every group's state from a checkpoint saved by ``N`` ranks, ``N`` and ``M``
    unrelated; a plain per-element optimizer (one process, no MPI) takes all of it. Each
    rank reads the shard files that overlap its range (and every ``M``-th file besides, so
    that every file is checked by some rank; rank 0's file, which holds the schedulers and
    ``extra``, by every rank). The state is the same numbers as the one saved, element for
    element, so training continues with the bits of a run that never stopped.

    Everything is checked before anything changes: every shard file is present, each file
    is whole (checksum) and of this save (the shards carry the same id), of the same
    optimizer class, number of groups, parameters per group and shapes, its range is the
    expected one (so the shards cover every element once), and the shards agree on the
    hyperparameters, state keys and 0-d state. The ranks then agree, and on an error every
    rank raises the same exception, naming the file (and group or key), with the optimizer
    and the schedulers left as they were; likewise when ``load_state_dict`` refuses the
    state on some rank.

    Parameters
    ----------
    checkpoint_dir : str or os.PathLike
        A directory written by :func:`save`.
    optimizer : ZeroOptimizer or Optimizer
        Of the class that was saved, with the same groups and parameter shapes, on any
        number of ranks (a plain optimizer: each group of one dtype).
    scheduler : scheduler, list or dict of schedulers, or None
        The structure saved (as for :func:`fastopt.load`).

    Returns
    -------
    object
        The ``extra`` saved (rank 0's), on every rank.

    Raises
    ------
    IncompleteCheckpointError
        A shard file is missing, or shards of different saves are mixed.
    TruncatedCheckpointError, CorruptCheckpointError, NotACheckpointError
        A damaged file, or one that is no shard (see :mod:`fastopt.checkpoint`).
    CheckpointMismatchError
        A checkpoint of another optimizer class, other groups or shapes, other schedulers,
        or state that ``load_state_dict`` refuses.
    FileNotFoundError, OSError
        The directory or a file cannot be read.
    """
    from fastopt.checkpoint import _checked_schedulers

    layout = _Layout(optimizer)
    comm, rank, size = layout.comm, layout.rank, layout.size
    directory = os.fspath(checkpoint_dir)
    error, facts, prepared = None, {}, None
    try:
        world, paths = _shard_files(directory)
        wanted = {0} | {k for k in range(world) if k % size == rank}
        for shapes, _, numel, lo, n in layout.groups:
            counts, displs = _chunks(numel, world)
            wanted |= {k for k in range(world)
                       if n and displs[k] < lo + n and lo < displs[k] + counts[k]}
        read = {}
        for k in sorted(wanted):
            content, states = _read_shard(paths[k], k, world, layout)
            read[k] = (content, states)
            facts[k] = _facts(content, states, layout.scalars)
        pairs = _checked_schedulers(paths[0], scheduler, read[0][0]["scheduler"])
        prepared = (world, paths, read, pairs)
    except (CheckpointError, OSError) as e:
        error = _as_error(e)
    everyone = comm.allgather((error, facts))
    _raise_first([found for found, _ in everyone])
    assert prepared is not None
    world, paths, read, pairs = prepared
    merged: dict = {}
    for _, f in everyone:
        merged.update(f)
    ref = merged[0]
    for k in sorted(merged):
        if merged[k][0] != ref[0]:
            raise IncompleteCheckpointError(
                f"{paths[k]} is of another save than {paths[0]} (the shards carry different "
                f"ids: a save that did not finish, or files of two checkpoints)")
        for what, i in (("hyperparameters", 1), ("state keys or 0-d state (step, ...)", 2)):
            if merged[k][i] != ref[i]:
                raise CorruptCheckpointError(
                    f"{paths[k]}: its {what} differ from those of {paths[0]}: "
                    f"{merged[k][i][:200]} vs {ref[i][:200]}")
    state_dict = _assemble(layout, world, read)
    opt = layout.inner
    before = opt.state, opt.param_groups
    error, done = None, []
    try:
        opt.load_state_dict(state_dict)
        for sched, sd, where in pairs:
            previous = sched.state_dict()
            sched.load_state_dict(sd)
            done.append((sched, previous))
    except (ValueError, TypeError, KeyError) as e:
        error = ("CheckpointMismatchError",
                 f"{directory}: the optimizer or a scheduler refuses the saved state: {e}")
    errors = comm.allgather(error)
    if any(e is not None for e in errors):
        for sched, previous in reversed(done):
            sched.load_state_dict(previous)
        opt.state, opt.param_groups = before
        _raise_first(errors)
    return read[0][0]["extra"]["extra"]


def _assemble(layout, world, read):
    """The state dict of ``layout``'s optimizer, cut from the shards in ``read``."""
    ref_groups = read[0][0]["state_dict"]["param_groups"]
    state, groups, index = {}, [], 0
    for g, (shapes, _, numel, lo, n) in enumerate(layout.groups):
        counts, displs = _chunks(numel, world)
        hyper = {k: v for k, v in ref_groups[g].items() if k != "params"}
        some = read[0][1][g]
        merged = None
        if some is not None:
            merged = {}
            for key, value in some.items():
                if key in layout.scalars:
                    merged[key] = np.array(value)
                    continue
                out = np.empty(n, dtype=value.dtype)
                for k in range(world):
                    a, b = max(lo, displs[k]), min(lo + n, displs[k] + counts[k])
                    if a < b:
                        piece = read[k][1][g][key]
                        out[a - lo:b - lo] = piece[a - displs[k]:b - displs[k]]
                merged[key] = out
        if layout.zero:
            groups.append(dict(hyper, params=[g]))
            if merged is not None:
                state[g] = merged
            continue
        ids = list(range(index, index + len(shapes)))
        groups.append(dict(hyper, params=ids))
        offset = 0
        for i, shape in zip(ids, shapes):
            size = int(np.prod(shape))
            if merged is not None:
                state[i] = {key: (np.array(v) if key in layout.scalars
                                  else v[offset:offset + size].reshape(shape).copy())
                            for key, v in merged.items()}
            offset += size
        index += len(shapes)
    return {"state": state, "param_groups": groups}


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
