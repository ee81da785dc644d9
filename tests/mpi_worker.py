"""One rank of the MPI tests of fastopt.distributed (tests/test_distributed_mpi.py).

    mpiexec -n N python tests/mpi_worker.py check DIR  # averaging, steps, mismatch errors
    mpiexec -n N python tests/mpi_worker.py abort    # rank 1 raises inside a step
    mpiexec -n N python tests/mpi_worker.py torch DIR  # torch tensors and torch.optim
    mpiexec -n N python tests/mpi_worker.py ckpt SOURCE TARGET START STOP ...  # checkpoints

``check`` asserts on every rank and ends by writing ``DIR/rank<r>.json`` with the error
messages the rank saw, which the test compares across ranks. Every rank can rebuild
every other rank's gradients from their seeds, so the single-process reference is computed
locally on each rank.
"""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

import fastopt
from fastopt import distributed

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


class Holder(np.ndarray):
    """A complex parameter stand-in: an array with a ``.grad`` (Parameter is real only)."""


def holder(a):
    h = np.asarray(a).view(Holder)
    h.grad = None
    return h


SHAPES = [((3, 4), np.float32), ((5,), np.float32), ((1000,), np.float32), ((), np.float32),
          ((7, 7), np.float64), ((0,), np.float32), ((64,), np.float64), ((2, 3), np.float32)]


def grads_of(r, shapes=SHAPES):
    """Rank r's gradients: magnitudes over six decades, so the summation order shows."""
    rng = np.random.default_rng(100 + r)
    return [np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 3, s), dtype=dt)
            for s, dt in shapes]


def ordered_mean(per_rank):
    """The documented average: ((g_0 + g_1) + ...) / N, rounded in the dtype."""
    out = []
    for parts in zip(*per_rank):
        total = parts[0].copy()
        for g in parts[1:]:
            total += g
        out.append(np.divide(total, len(per_rank), out=total))
    return out


def params_of(shapes=SHAPES, seed=7):
    rng = np.random.default_rng(seed)            # the same on every rank
    return [fastopt.Parameter(rng.standard_normal(s).astype(dt)) for s, dt in shapes]


def same_on_all_ranks(arrays):
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return len(set(comm.allgather(mine))) == 1


def check_average():
    per_rank = [grads_of(r) for r in range(size)]
    want = ordered_mean(per_rank)
    # from 3 ranks on the grouping of the sum matters: another order gives other bits here
    if size >= 3:
        rev = ordered_mean(per_rank[::-1])
        assert any(not np.array_equal(a, b) for a, b in zip(rev, want)), "order-insensitive"
    for bucket_bytes in (distributed.DEFAULT_BUCKET_BYTES, 64, 1):
        params = params_of()
        for p, g in zip(params, grads_of(rank)):
            p.grad = g
        grads = [p.grad for p in params]
        n = distributed.average_gradients(params, bucket_bytes=bucket_bytes)
        assert n == len(distributed.plan_buckets(params, bucket_bytes)), (n, bucket_bytes)
        for i, (p, g, w) in enumerate(zip(params, grads, want)):
            assert p.grad is g, "not in place"
            assert g.dtype == w.dtype and np.array_equal(g, w), (bucket_bytes, i)
    # the same bits from a non-contiguous gradient and from complex gradients
    params = params_of()
    for p, g in zip(params, grads_of(rank)):
        p.grad = g
    wide = np.zeros((3, 8), dtype=np.float32)
    wide[:, ::2] = params[0].grad
    params[0].grad = wide[:, ::2]
    distributed.average_gradients(params, bucket_bytes=100)
    assert np.array_equal(params[0].grad, want[0]) and not wide[:, 1::2].any()
    cshapes = [((4,), np.complex64), ((3,), np.complex128)]
    cper = [[a + 1j * b for a, b in zip(grads_of(r, [(s, np.float32) for s, _ in cshapes]),
                                           grads_of(r + 50, [(s, np.float32) for s, _ in
                                                             cshapes]))]
            for r in range(size)]
    cper = [[g.astype(dt) for g, (_, dt) in zip(gs, cshapes)] for gs in cper]
    cparams = [holder(np.zeros(s, dtype=dt)) for s, dt in cshapes]
    for p, g in zip(cparams, cper[rank]):
        p.grad = g.copy()
    distributed.average_gradients(cparams)
    for p, w in zip(cparams, ordered_mean(cper)):
        assert np.array_equal(p.grad, w)


def check_step():
    """average + step equals one process stepping with the averaged gradient, bit for bit."""
    want = ordered_mean([grads_of(r) for r in range(size)])
    for make in (lambda ps: fastopt.Adam(ps, lr=1e-2, weight_decay=1e-3),
                 lambda ps: fastopt.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)):
        params, ref = params_of(), params_of()
        opt, ref_opt = make(params), make(ref)
        for _ in range(3):
            for p, g in zip(params, grads_of(rank)):
                p.grad = g
            distributed.average_gradients(opt)
            opt.step()
            for p, w in zip(ref, want):
                p.grad = w.copy()
            ref_opt.step()
        for p, q in zip(params, ref):
            assert np.array_equal(p, q)
        assert same_on_all_ranks(params)


def check_allreduce():
    """deterministic=False: MPI's order; within the rounding bound of a sum of N terms."""
    per_rank = [grads_of(r) for r in range(size)]
    want = ordered_mean(per_rank)
    params = params_of()
    for p, g in zip(params, grads_of(rank)):
        p.grad = g
    distributed.average_gradients(params, deterministic=False, bucket_bytes=4096)
    for i, (p, w) in enumerate(zip(params, want)):
        # two sums of the same N terms in different orders differ by at most
        # 2 (N - 1) eps sum|g| (each within (N - 1) eps sum|g| of the exact sum), then / N
        eps = np.finfo(w.dtype).eps
        bound = 2 * (size - 1) * eps * sum(np.abs(g[i]) for g in per_rank) / size
        assert np.all(np.abs(p.grad - w) <= bound * (1 + 4 * eps)), i


def expect_error(params_fn, mutate):
    """Run average_gradients on a broken input; the message, and that nothing changed."""
    params = params_fn()
    for p, g in zip(params if not hasattr(params, "param_groups")
                    else [q for grp in params.param_groups for q in grp["params"]],
                    grads_of(rank)):
        p.grad = g
    mutate(params)
    flat = (params if not hasattr(params, "param_groups")
            else [q for grp in params.param_groups for q in grp["params"]])
    before = [None if p.grad is None else p.grad.copy() for p in flat]
    try:
        distributed.average_gradients(params, bucket_bytes=256)
    except distributed.GradientMismatchError as e:
        message = str(e)
    else:
        message = None
    for p, b in zip(flat, before):
        assert (p.grad is None) == (b is None) and (b is None or np.array_equal(p.grad, b))
    return message


def on(r, fn):
    def mutate(params):
        if rank == r:
            fn(params)
    return mutate


def set_grad(i, value):
    def fn(params):
        params[i].grad = value
    return fn


def check_errors():
    last = size - 1
    errors = {
        "missing": expect_error(params_of, on(last, set_grad(1, None))),
        "shape": expect_error(params_of, on(1, set_grad(0, np.zeros((4, 3), np.float32)))),
        "dtype": expect_error(params_of, on(0, set_grad(0, np.zeros((3, 4), np.float64)))),
        "readonly": expect_error(params_of, on(last, lambda ps: ps[2].grad.setflags(
            write=False))),
        "count": expect_error(lambda: params_of()[:3] if rank == 1 else params_of()[:4],
                              lambda ps: None),
        "param_shape": expect_error(
            lambda: params_of() if rank != 1 else params_of()[:1] + [
                fastopt.Parameter(np.zeros(6, np.float32))] + params_of()[2:],
            on(1, set_grad(1, np.zeros(6, np.float32)))),
        "group": expect_error(
            lambda: fastopt.SGD([{"params": params_of()[:4]}, {"params": params_of()[4:]}],
                                lr=0.1),
            on(last, lambda opt: setattr(opt.param_groups[1]["params"][2], "grad",
                                         np.zeros(3, np.float64)))),
        "grouping": expect_error(
            lambda: fastopt.SGD([{"params": params_of()[:4 if rank != 1 else 3]},
                                 {"params": params_of()[4 if rank != 1 else 3:]}], lr=0.1),
            lambda opt: None),
    }
    # a gradient that is None on every rank is skipped, as step() skips it
    params = params_of()
    for p, g in zip(params, grads_of(rank)):
        p.grad = g
    params[1].grad = None
    distributed.average_gradients(params)
    want = ordered_mean([grads_of(r) for r in range(size)])
    assert params[1].grad is None
    assert all(np.array_equal(p.grad, w) for i, (p, w) in enumerate(zip(params, want))
               if i != 1)
    return errors


def state_bytes(opt, scalars):
    """Bytes of the optimizer's per-element state (the 0-d entries ``scalars`` left out)."""
    return sum(v.nbytes for st in opt.state.values() for k, v in st.items()
               if isinstance(v, np.ndarray) and k not in scalars)


def zero_groups(params):
    """Two groups, one per dtype, the second with its own lr."""
    return [{"params": [p for p in params if p.dtype == np.float32]},
            {"params": [p for p in params if p.dtype == np.float64], "lr": 3e-3}]


def check_zero():
    """ZeRO-1 steps equal one process stepping with the averaged gradients, bit for bit."""
    configs = [(fastopt.Adam, dict(lr=1e-2, weight_decay=1e-3, amsgrad=True)),
               (fastopt.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))]
    configs += [(cls, {}) for name, cls in fastopt.OPTIMIZERS.items()
                if name not in ("Adam", "SGD")]
    # the first two also through small buckets: 40 bytes is 10 float32 / 5 float64 elements
    # per round over all ranks, 256 bytes 64 / 32; the same bits as one bucket per group
    runs = [(cls, kwargs, distributed.DEFAULT_BUCKET_BYTES) for cls, kwargs in configs]
    runs[2:2] = [(cls, kwargs, b) for cls, kwargs in configs[:2] for b in (40, 256)]
    for cls, kwargs, bucket_bytes in runs:
        params, ref = params_of(), params_of()
        zero = distributed.ZeroOptimizer(zero_groups(params), cls,
                                         bucket_bytes=bucket_bytes, **kwargs)
        rounds = [g.rounds for g in zero._groups]
        if bucket_bytes == 40:
            # 1024 float32 elements (a slice of ceil(1024 / N), 10 // N of them per round)
            # and 113 float64 (5 // N per round)
            def ceil(a, b):
                return -(-a // b)
            assert rounds == [ceil(ceil(1024, size), max(1, 10 // size)),
                              ceil(ceil(113, size), max(1, 5 // size))], rounds
        ref_opt = cls(zero_groups(ref), **kwargs)
        for t in range(3):
            for p, g in zip(params, grads_of(rank + 1000 * t)):
                p.grad = g
            kept = [p.grad.copy() for p in params]
            zero.step()
            assert all(np.array_equal(p.grad, k) for p, k in zip(params, kept)), cls
            want = ordered_mean([grads_of(r + 1000 * t) for r in range(size)])
            for p, w in zip(ref, want):
                p.grad = w
            ref_opt.step()
            for i, (p, q) in enumerate(zip(params, ref)):
                assert np.array_equal(p, q), (cls.__name__, t, i)
        assert same_on_all_ranks(params), cls
        # each rank holds the state of its 1/N of every group's elements, no more: its
        # arrays have its share of the elements, and the ranks' together the reference's
        shard_state = list(zero.optimizer.state.values())
        scalars = {k for st in shard_state for k, v in st.items() if np.ndim(v) == 0}
        arrays = len(shard_state[0]) - len(scalars) if shard_state else 0
        share = [sum(p.size for p in g["params"]) for g in zero_groups(ref)]
        share = [n // size + (rank < n % size) for n in share]
        mine = state_bytes(zero.optimizer, scalars)
        assert mine == arrays * (share[0] * 4 + share[1] * 8), (cls.__name__, mine)
        assert comm.allreduce(mine) == state_bytes(ref_opt, scalars), cls.__name__
    # errors: the same on every rank, nothing changed
    params = params_of()
    zero = distributed.ZeroOptimizer(zero_groups(params), fastopt.Adam)
    before = [p.copy() for p in params]
    errors = {}
    for key, mutate in (("zero_missing", on(size - 1, set_grad(1, None))),
                        ("zero_none", lambda ps: set_grad(1, None)(ps))):
        for p, g in zip(params, grads_of(rank)):
            p.grad = g
        mutate(params)
        try:
            zero.step()
        except distributed.GradientMismatchError as e:
            errors[key] = str(e)
        assert all(np.array_equal(p, b) for p, b in zip(params, before))
        assert not zero.optimizer.state
    try:
        distributed.ZeroOptimizer([{"params": params}], fastopt.Adam)
    except ValueError as e:
        errors["zero_dtypes"] = str(e)
    try:
        distributed.ZeroOptimizer(params, fastopt.LBFGS)
    except TypeError as e:
        errors["zero_class"] = str(e).split(", got")[0]
    return errors


def check_torch():
    """torch tensors: averaged as arrays are, stepped by fastopt.torch, torch.optim and
    ZeroOptimizer, each equal bit for bit to one process stepping with the averaged
    gradients (computed here from every rank's share of the batch)."""
    import torch

    import fastopt.torch

    torch.manual_seed(0)
    data = torch.randn(24, 8, dtype=torch.float32)
    target = torch.randn(24, 3, dtype=torch.float32)

    def model_of():
        torch.manual_seed(1)                    # the same weights on every rank
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 3))

    def grads_of_rank(model, r):
        model.zero_grad(set_to_none=True)
        share = slice(r, None, size)            # rank r's share of the batch
        loss = torch.nn.functional.mse_loss(model(data[share]), target[share])
        loss.backward()
        return [p.grad.detach().numpy().copy() for p in model.parameters()]

    def averaged(model):
        return ordered_mean([grads_of_rank(model, r) for r in range(size)])

    makers = [("fastopt.torch.Adam", lambda ps: fastopt.torch.Adam(ps, lr=1e-2)),
              ("torch.optim.SGD", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))]
    for name, make in makers:
        model, ref = model_of(), model_of()
        opt, ref_opt = make(model.parameters()), make(ref.parameters())
        for _ in range(3):
            want = averaged(ref)
            grads_of_rank(model, rank)
            kept = [p.grad for p in model.parameters()]
            distributed.average_gradients(opt, bucket_bytes=256)
            for p, k, w in zip(model.parameters(), kept, want):
                assert p.grad is k and np.array_equal(p.grad.numpy(), w), name
            opt.step()
            for p, w in zip(ref.parameters(), want):
                p.grad = torch.from_numpy(w)
            ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q), name
        assert same_on_all_ranks([p.detach().numpy() for p in model.parameters()]), name
    # a module's parameters (an iterable of tensors) through ZeroOptimizer: one process
    # stepping fastopt.Adam over NumPy copies with the averaged gradients
    model, ref_model = model_of(), model_of()
    zero = distributed.ZeroOptimizer(model.parameters(), fastopt.Adam, bucket_bytes=256,
                                     lr=1e-2, weight_decay=1e-2)
    ref = [fastopt.Parameter(p.detach().numpy().copy()) for p in ref_model.parameters()]
    ref_opt = fastopt.Adam(ref, lr=1e-2, weight_decay=1e-2)
    for _ in range(3):
        for p, q in zip(ref_model.parameters(), ref):
            p.data.copy_(torch.from_numpy(np.asarray(q)))
        want = averaged(ref_model)
        grads_of_rank(model, rank)
        versions = [p._version for p in model.parameters()]
        zero.step()
        assert all(p._version > v for p, v in zip(model.parameters(), versions))
        for p, w in zip(ref, want):
            p.grad = w
        ref_opt.step()
        for i, (p, q) in enumerate(zip(model.parameters(), ref)):
            assert np.array_equal(p.detach().numpy(), q), i
    def refused(spoil):
        """The error of a ZeroOptimizer step after ``spoil`` on the last rank (None: none);
        the same on every rank, nothing changed."""
        grads_of_rank(model, rank)
        if rank == size - 1:
            spoil(list(model.parameters()))
        before = [p.detach().clone() for p in model.parameters()]
        try:
            zero.step()
        except distributed.GradientMismatchError as e:
            message = str(e)
        else:
            message = None
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        return message

    def missing(ps):
        ps[1].grad = None

    def freed(ps):  # its memory freed (as FSDP frees it between uses)
        ps[0].grad = torch.zeros_like(ps[0])  # (a gradient read by .numpy() cannot resize)
        ps[0].grad.untyped_storage().resize_(0)

    return {"torch_missing": refused(missing), "torch_freed": refused(freed)}


# ---- sharded checkpoints ---------------------------------------------------------------

def exact_grads(t, r, n):
    """Rank r of n's gradients at step t: G_t + (2r - n + 1) D_t with G_t and D_t multiples
    of 2**-10 below 2**3, so every partial sum is exact and the ordered mean is G_t
    exactly, for every number of ranks: runs on 1, 2 and 3 ranks take the same steps."""
    rng = np.random.default_rng(500 + t)
    out = []
    for shape, dt in SHAPES:
        base = np.round(rng.uniform(-8, 8, shape) * 1024) / 1024
        delta = np.round(rng.uniform(-2, 2, shape) * 1024) / 1024
        out.append(np.asarray(base + (2 * r - n + 1) * delta, dtype=dt))
    return out


CKPT_CONFIGS = [("Adam", dict(lr=1e-2, weight_decay=1e-3, amsgrad=True)), ("NAdam", {}),
                ("ASGD", dict(lr=1e-2)), ("SGD", dict(lr=0.1, momentum=0.9))]


def ckpt_setup(name, kwargs, plain):
    """Fresh parameters, the optimizer (ZeroOptimizer, or plain), its StepLR."""
    from fastopt.lr_scheduler import StepLR

    cls = getattr(fastopt, name)
    params = params_of()
    if plain:
        opt = inner = cls(zero_groups(params), **kwargs)
    else:
        opt = distributed.ZeroOptimizer(zero_groups(params), cls, bucket_bytes=64, **kwargs)
        inner = opt.optimizer
    return params, opt, StepLR(inner, step_size=3, gamma=0.5)


def ckpt_reference(name, kwargs, steps):
    """One process, every step with the mean gradient: the parameters after each step."""
    params, opt, sched = ckpt_setup(name, kwargs, plain=True)
    out = []
    for t in range(steps):
        for p, g in zip(params, exact_grads(t, 0, 1)):
            p.grad = g
        opt.step()
        sched.step()
        out.append([p.copy() for p in params])
    return out


def state_snapshot(opt):
    inner = getattr(opt, "optimizer", opt)
    return repr([(k, sorted((kk, np.asarray(v).tobytes()) for kk, v in st.items()))
                 for k, st in inner.state_dict()["state"].items()]) + repr(
        [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups])


def ckpt_run(source, target, start, stop, plain, extra_dirs=()):
    """Load ``source`` ("-": start afresh), take steps start..stop-1 checking each against
    one process, save to ``target`` (and, one step earlier, to ``extra_dirs``)."""
    for name, kwargs in CKPT_CONFIGS:
        params, opt, sched = ckpt_setup(name, kwargs, plain)
        if source != "-":
            extra = distributed.load(os.path.join(source, name), opt, sched)
            assert extra["step"] == start, (extra["step"], start)
            for p, a in zip(params, extra["params"]):
                p[...] = a
        want = ckpt_reference(name, kwargs, stop)
        for t in range(start, stop):
            if t == stop - 1:
                for d in extra_dirs:
                    distributed.save(os.path.join(d, name), opt, sched,
                                     extra={"params": params, "step": t})
            for p, g in zip(params, exact_grads(t, rank, size)):
                p.grad = g
            opt.step()
            sched.step()
            for i, (p, w) in enumerate(zip(params, want[t])):
                assert np.array_equal(p, w), (name, t, i)
        assert same_on_all_ranks(params), name
        distributed.save(os.path.join(target, name), opt, sched,
                         extra={"params": params, "step": stop})


def ckpt_errors(good, other, scratch):
    """Damaged and mismatched checkpoints: the message on every rank, nothing changed."""
    import shutil

    name, kwargs = CKPT_CONFIGS[0]
    src = os.path.join(good, name)
    world = len([f for f in os.listdir(src) if f.startswith("shard-")])

    def variant(tag, edit):
        d = os.path.join(scratch, tag)
        if rank == 0:
            shutil.copytree(src, d)
            edit(d)
        comm.Barrier()
        return d

    def drop(k):
        return lambda d: os.unlink(os.path.join(d, distributed.shard_file_name(k, world)))

    def flip(k):
        def edit(d):
            path = os.path.join(d, distributed.shard_file_name(k, world))
            with open(path, "r+b") as f:
                f.seek(-3, os.SEEK_END)
                byte = f.read(1)[0]
                f.seek(-3, os.SEEK_END)
                f.write(bytes([byte ^ 0x10]))
        return edit

    def mix(k):
        return lambda d: shutil.copy(os.path.join(other, name,
                                                  distributed.shard_file_name(k, world)), d)

    def stray(d):
        shutil.copy(os.path.join(d, distributed.shard_file_name(0, world)),
                    os.path.join(d, distributed.shard_file_name(0, world + 1)))

    def zero(cls=fastopt.Adam, params=None):
        return distributed.ZeroOptimizer(zero_groups(params or params_of()), cls, **kwargs)

    fewer = params_of()[:1] + params_of()[2:]
    wider = params_of()[:1] + [fastopt.Parameter(np.zeros(6, np.float32))] + params_of()[2:]
    cases = {
        "ckpt_missing": (variant("missing", drop(world - 1)), zero),
        "ckpt_corrupt": (variant("corrupt", flip(1)), zero),
        "ckpt_mixed": (variant("mixed", mix(1)), zero),
        "ckpt_stray": (variant("stray", stray), zero),
        "ckpt_count": (src, lambda: zero(params=fewer)),
        "ckpt_shape": (src, lambda: zero(params=wider)),
        "ckpt_shape_rank1": (src, lambda: zero(params=wider if rank == 1 else None)),
        "ckpt_class": (src, lambda: zero(fastopt.AdamW)),
        "ckpt_nodir": (os.path.join(scratch, "nothing"), zero),
    }
    cases["ckpt_no_scheduler"] = (src, zero)
    errors = {}
    for key, (path, make) in cases.items():
        from fastopt.lr_scheduler import StepLR

        opt = make()
        sched = StepLR(opt.optimizer, step_size=3, gamma=0.5)
        if key != "ckpt_shape_rank1":       # (whose parameters differ between the ranks)
            for group in opt._groups:
                for p in group.members:
                    p.grad = np.ones(p.shape, p.dtype)
            opt.step()
            sched.step()
        before = state_snapshot(opt) + repr(sched.state_dict())
        try:
            distributed.load(path, opt, None if key == "ckpt_no_scheduler" else sched)
        except (fastopt.checkpoint.CheckpointError, OSError) as e:
            errors[key] = f"{type(e).__name__}: {e}".replace(scratch, "SCRATCH").replace(
                good, "GOOD")
        else:
            errors[key] = None
        assert state_snapshot(opt) + repr(sched.state_dict()) == before, key
    # saving what cannot be stored: the same error on every rank, no file written
    opt = zero()
    try:
        distributed.save(os.path.join(scratch, "unsaved"), opt, extra={"f": print})
    except TypeError as e:
        errors["ckpt_save_extra"] = str(e)
    assert not os.path.exists(os.path.join(scratch, "unsaved"))
    return errors


def main(mode):
    if mode == "check":
        with distributed.abort_on_error():      # a failed assertion ends the job at once
            check_average()
            check_step()
            check_allreduce()
            errors = check_errors()
            errors.update(check_zero())
        with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "size": size, "errors": errors}, f)
    elif mode == "torch":
        with distributed.abort_on_error():
            errors = check_torch()
        with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "size": size, "errors": errors}, f)
    elif mode in ("ckpt", "ckpt-plain"):
        # ckpt SOURCE TARGET START STOP [EXTRA_DIR] [ERRORS_OTHER SCRATCH OUT]
        source, target, start, stop = sys.argv[2], sys.argv[3], int(sys.argv[4]), \
            int(sys.argv[5])
        rest = sys.argv[6:]
        with distributed.abort_on_error():
            ckpt_run(source, target, start, stop, mode == "ckpt-plain",
                     extra_dirs=rest[:1] if len(rest) in (1, 4) else ())
            if mode == "ckpt-plain" and size == 1:      # and a ZeroOptimizer of one rank
                ckpt_run(source, target + "-zero1", start, stop, False)
            if len(rest) >= 3:
                errors = ckpt_errors(source, rest[-3], rest[-2])
                with open(os.path.join(rest[-1], f"rank{rank}.json"), "w") as f:
                    json.dump({"rank": rank, "size": size, "errors": errors}, f)
    elif mode == "abort":
        params = params_of()
        opt = fastopt.Adam(params)
        with distributed.abort_on_error():
            for p, g in zip(params, grads_of(rank)):
                p.grad = g
            distributed.average_gradients(opt)
            if rank == 1:
                params[0].grad = np.zeros(2, np.float32)    # step() refuses it, naming it
            opt.step()
            distributed.average_gradients(opt)              # the other ranks wait here
        print(f"rank {rank} finished", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1])
