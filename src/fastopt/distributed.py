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
with the same C kernels and gathers the updated parameters onto every rank. The result is
the same bits as a single process stepping with the averaged gradients.

Before any data moves, every rank checks its parameters and gradients, and the ranks compare
a digest of what they hold (one ``Allgather`` of 16 bytes per rank). A gradient that is
missing on some ranks only, of the wrong shape or dtype, or parameters that differ between
ranks, make :func:`average_gradients` raise the same :class:`GradientMismatchError` on every
rank, naming the first offending rank and parameter, with no gradient changed, instead of
leaving some ranks waiting in a collective that others never enter.

A rank that raises anything else (in its forward pass, in ``step()``) would leave the others
blocked in their next collective. Run the training under :func:`abort_on_error` and such an
exception prints its traceback with the rank's number and ends the whole job with
``MPI_Abort``.
"""
import contextlib
import importlib
import os
import sys
import traceback
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


def _codes(params):
    """The cheap per-step check: per parameter ``(shape, dtype number, has a gradient)``, and
    whether some gradient is unusable (then :func:`_inspect` says why)."""
    codes, bad = [], False
    for p in params:
        shape = p.shape if isinstance(p, np.ndarray) else tuple(np.shape(p))
        num = getattr(getattr(p, "dtype", None), "num", -1)
        g = getattr(p, "grad", None)
        if g is None:
            codes.append((shape, num, 0))
            continue
        if not (isinstance(g, np.ndarray) and g.shape == shape and g.dtype == p.dtype
                and g.dtype in _DTYPE_SET and g.flags.writeable):
            bad = True
        codes.append((shape, num, 1))
    return codes, bad


def _describe(grad):
    return "None" if grad is None else f"shape {tuple(grad.shape)} {grad.dtype}"


def _inspect(named):
    """Per parameter ``(name, shape, dtype, grad description)``, and the first local error.

    The description is that of the gradient when it is usable, else ``None``; a gradient that
    is not None but unusable is a local error.
    """
    signature, error = [], None
    for name, p in named:
        shape, dtype = tuple(np.shape(p)), str(getattr(p, "dtype", type(p).__name__))
        grad = getattr(p, "grad", None)
        problem = None
        if grad is not None:
            if not isinstance(grad, np.ndarray):
                problem = f".grad is a {type(grad).__name__}, not a NumPy array"
            elif tuple(grad.shape) != shape:
                problem = f".grad has shape {tuple(grad.shape)}, the parameter {shape}"
            elif grad.dtype != getattr(p, "dtype", None):
                problem = f".grad has dtype {grad.dtype}, the parameter {dtype}"
            elif grad.dtype not in _DTYPE_SET:
                problem = (f".grad has dtype {grad.dtype}; averaging takes float32, float64, "
                           f"complex64 or complex128")
            elif not grad.flags.writeable:
                problem = ".grad is read-only (it is averaged in place)"
        if problem is not None and error is None:
            error = f"{name}: {problem}"
        signature.append((name, shape, dtype,
                          None if grad is None or problem else _describe(grad)))
    return signature, error


def _agree(params, sizes, comm):
    """Check locally and collectively; raise the same error on every rank on a mismatch.

    Returns the per-parameter codes of :func:`_codes` (the same on every rank).
    """
    codes, bad = _codes(params)
    # The hash of a tuple of ints is the same in every process (no hash randomisation)
    key = hash((sizes, tuple(codes))) & 0xFFFFFFFFFFFFFFFF
    mine = np.array([key, bad], dtype=np.uint64)
    everyone = np.empty((comm.Get_size(), 2), dtype=np.uint64)
    comm.Allgather(mine, everyone)
    if not everyone[:, 1].any() and (everyone[:, 0] == everyone[0, 0]).all():
        return codes
    # Something differs: gather the full descriptions (rare, so pickled) and let every rank
    # derive the same message from the same data.
    gathered = comm.allgather(_inspect(list(zip(_names(sizes, len(params)), params))))
    message = _mismatch_message(gathered)
    if message is None:     # the keys differed, the descriptions agree (another Python?)
        return codes
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
    return _plan([p.grad for p in _flatten(params)[0]], bucket_bytes)


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
    params : Optimizer or iterable of Parameter
        An optimizer (all its groups' parameters, in order) or the parameters; each has a
        ``.grad`` that is None or a NumPy array of the parameter's shape and dtype
        (float32, float64, complex64 or complex128), written in place.
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
    _agree(flat, sizes, comm)
    size = comm.Get_size()
    grads = [p.grad for p in flat]
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


def _copy_range(members, lo, out):
    """Copy elements ``lo:lo + out.size`` of the members' concatenation into ``out``."""
    hi, offset = lo + out.size, 0
    for p in members:
        n = int(np.size(p))
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            out[a - lo:b - lo] = np.asarray(p).reshape(-1)[a - offset:b - offset]
        offset += n


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
    were (not averaged). Each group's gradients travel in one round of collectives, through
    a buffer of the group's size that lives for the step.

    Parameters
    ----------
    params : iterable of Parameter or of dict
        The parameters, or parameter groups (dicts with ``"params"`` and per-group options),
        the same on every rank.
    optimizer_class : type
        A per-element fastopt optimizer (``fastopt.Adam``, ``fastopt.SGD``, ... : one of
        ``fastopt.OPTIMIZERS``).
    comm : mpi4py.MPI.Comm, optional
        The communicator; ``MPI.COMM_WORLD`` by default.
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
                 **defaults: Any) -> None:
        from fastopt.optimizer import kernel_optimizers
        from fastopt.parameter import Parameter

        if not (isinstance(optimizer_class, type) and
                any(issubclass(optimizer_class, k) for k in kernel_optimizers().values())):
            raise TypeError(f"ZeroOptimizer needs a per-element fastopt optimizer class "
                            f"(one of fastopt.OPTIMIZERS), got {optimizer_class!r}")
        self.comm = comm = _world(comm)
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = [dict(g, params=list(g["params"])) for g in params]
        else:
            groups = [{"params": params}]
        size, rank = comm.Get_size(), comm.Get_rank()
        self._groups, shard_groups = [], []
        for g, group in enumerate(groups):
            members = group["params"]
            if not members:
                raise ValueError(f"param_groups[{g}] has no parameters")
            dtypes = {np.dtype(p.dtype) for p in members}
            if len(dtypes) != 1:
                raise ValueError(f"param_groups[{g}] mixes dtypes "
                                 f"{sorted(str(d) for d in dtypes)}; ZeroOptimizer shards "
                                 f"each group as one array: put each dtype in its own group")
            total = sum(int(np.size(p)) for p in members)
            counts, displs = _chunks(total, size)
            lo = displs[rank]
            flat = np.concatenate([np.asarray(p).reshape(-1) for p in members])
            shard = Parameter(np.ascontiguousarray(flat[lo:lo + counts[rank]]))
            self._groups.append((members, counts, displs, shard))
            shard_groups.append(dict({k: v for k, v in group.items() if k != "params"},
                                     params=[shard]))
        self.optimizer = optimizer_class(shard_groups, **defaults)

    @property
    def param_groups(self) -> List[dict]:
        """The shard optimizer's groups (hyperparameters; each holds this rank's shard)."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the parameters (None, or zeros in place)."""
        for members, _, _, _ in self._groups:
            for p in members:
                if set_to_none:
                    p.grad = None
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
        comm = self.comm
        params = [p for members, _, _, _ in self._groups for p in members]
        sizes = tuple(len(members) for members, _, _, _ in self._groups)
        codes = _agree(params, sizes, comm)
        for i, (_, _, has_grad) in enumerate(codes):
            if not has_grad:        # then None on every rank: the codes agree
                raise GradientMismatchError(f"{_names(sizes, len(params))[i]}: .grad is None "
                                            f"on every rank; ZeroOptimizer steps every "
                                            f"parameter")
        rank = comm.Get_rank()
        for members, counts, displs, shard in self._groups:
            grads = np.concatenate([p.grad.reshape(-1) for p in members])
            shard.grad = _ordered_reduce_scatter(grads, comm)
            # the parameters are authoritative (a loaded checkpoint, an edit between steps)
            _copy_range(members, displs[rank], shard)
        try:
            self.optimizer.step()
        finally:
            for _, _, _, shard in self._groups:
                shard.grad = None
        for members, counts, displs, shard in self._groups:
            flat = np.empty(sum(counts), dtype=shard.dtype)
            comm.Allgatherv(np.asarray(shard), [flat, (counts, displs)])
            offset = 0
            for p in members:
                n = int(np.size(p))
                p[...] = flat[offset:offset + n].reshape(np.shape(p))
                offset += n


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
