"""Data-parallel Adam steps over MPI (fastopt.distributed): per-rank optimizer state and step
time, split into communication and update, for plain data parallelism and ZeroOptimizer.

    python -m fastopt bench --distributed [--sizes 1e6,1e7] [--ranks 1,2,3] [--rounds 7]
                                          [--json FILE]
    python benchmarks/bench_distributed_mpi.py [--sizes 1e6,1e7] [--ranks 1,2,3] [--repeats 7]
                                               [--bucket-bytes 26214400] [--json FILE]

It starts itself under ``mpiexec -n k`` once per process count (mpi4py and an ``mpiexec``:
``pip install "fastopt[distributed]"``). Per size, the parameters are 10 float32 tensors of
size/10 elements with fixed gradients, optimized by ``fastopt.Adam`` (lr 1e-3), each rank with
one kernel thread. Each rank times, per step:

* ``dp``: plain data parallelism, every rank holding the whole state:
  ``average_gradients(opt)`` is the communication (the rank-ordered reduce-scatter by
  ``Alltoallv`` and the ``Allgatherv``: an all-reduce), ``opt.step()`` the update;
* ``zero``: ``ZeroOptimizer``, each rank holding 1/k of the state: the communication is the
  agreement check and reduce-scatter of the gradients plus the allgather of the updated
  parameters, the update the shard's ``step()`` (ZeroOptimizer's own phases, timed apart).

Every step starts at a barrier; each phase's time is that of its slowest rank. The table gives
the median and the range (min..max) over ``--repeats`` steps after 2 warm-up steps. On a
machine with fewer cores than ranks the processes are oversubscribed (MPICH busy-waits in
its collectives, so they compete for the cores): the output says so, and its times then
show that contention, not scaling; the state bytes are what scales.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _ints(text):
    return [int(float(x)) for x in text.split(",") if x]


def worker(sizes, repeats, bucket_bytes, out):
    """One rank's measurements (run under mpiexec); rank 0 writes them all to ``out``."""
    import numpy as np
    from mpi4py import MPI

    import fastopt
    from fastopt import distributed

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    fastopt.set_num_threads(1)
    rows = []

    def timed(phases, before=lambda: None):
        """Per step and phase, the slowest rank's seconds (on rank 0); ``before`` runs
        untimed before each step."""
        for _ in range(2):
            before()
            for fn in phases.values():
                fn()
        steps = []
        for _ in range(repeats):
            before()
            comm.Barrier()
            mine = {}
            for name, fn in phases.items():
                t0 = time.perf_counter()
                fn()
                mine[name] = time.perf_counter() - t0
            everyone = comm.gather(mine, root=0)
            if rank == 0:
                steps.append({k: max(e[k] for e in everyone) for k in mine})
        return steps

    def state_bytes(opt):
        return sum(v.nbytes for st in opt.state.values() for v in st.values()
                   if isinstance(v, np.ndarray))

    for n in sizes:
        rng = np.random.default_rng(0)
        params = [fastopt.Parameter(rng.standard_normal(n // 10, dtype=np.float32))
                  for _ in range(10)]
        grads = [rng.standard_normal(n // 10, dtype=np.float32) * 0.01 for _ in params]
        for p, g in zip(params, grads):
            p.grad = g.copy()

        def reset_grads():                  # average_gradients overwrites them
            for p, g in zip(params, grads):
                p.grad[...] = g

        opt = fastopt.Adam(params, lr=1e-3)
        dp = timed({"comm": lambda: distributed.average_gradients(
            opt, bucket_bytes=bucket_bytes), "update": opt.step}, reset_grads)
        dp_state = state_bytes(opt)
        opt.state.clear()                   # its memory back before ZeroOptimizer's turn

        reset_grads()
        zero = distributed.ZeroOptimizer(params, fastopt.Adam, bucket_bytes=bucket_bytes,
                                         lr=1e-3)

        def zero_reduce_scatter():
            zero._reduce_scatter(zero._check())

        def zero_update():
            zero.optimizer.step()
            for group in zero._groups:
                group.shard.grad = None

        zs = timed({"reduce_scatter": zero_reduce_scatter, "update": zero_update,
                    "allgather": zero._allgather})
        for s in zs:
            s["comm"] = s["reduce_scatter"] + s["allgather"]
        rows.append({"size": n, "ranks": world, "dp": dp, "zero": zs,
                     "dp_state": comm.gather(dp_state, root=0),
                     "zero_state": comm.gather(state_bytes(zero.optimizer), root=0)})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


def _stat(values):
    ms = [v * 1e3 for v in values]
    return f"{statistics.median(ms):8.2f} ({min(ms):.2f}..{max(ms):.2f})"


def run(sizes, ranks, repeats, bucket_bytes=25 << 20, json_path=None, log=print):
    """Run the benchmark on each rank count of ``ranks``, print the table with ``log``;
    returns the rows (per size and rank count: the per-step phase times and state bytes)."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.path.exists(beside) else shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("no mpiexec: pip install \"fastopt[distributed]\" (mpi4py and "
                           "MPICH)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    log(f"fastopt.distributed, Adam float32, 10 tensors per size, 1 kernel thread per rank, "
        f"buckets of {bucket_bytes / 2**20:g} MiB; {cores} cores")
    over = [k for k in ranks if k > (cores or 1)]
    if over:
        log(f"oversubscribed: {', '.join(map(str, over))} ranks on {cores} cores share them "
            f"(times show contention, not scaling)")
    log(f"ms per step: median (min..max) of {repeats} steps, each phase the slowest rank's")
    log(f"{'size':>6s} {'ranks':>5s} {'mode':>4s} {'state MB/rank':>13s} "
        f"{'comm ms':>22s} {'update ms':>22s} {'total ms':>22s}")
    everything = []
    for world in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            cmd = [mpiexec, "-n", str(world), sys.executable, "-m", "fastopt._cli.distributed",
                   "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats),
                   "--bucket-bytes", str(bucket_bytes), "--worker", out]
            subprocess.run(cmd, check=True, timeout=1800, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
            with open(out) as f:
                rows = json.load(f)
        everything += rows
        for row in rows:
            for mode, state in (("dp", "dp_state"), ("zero", "zero_state")):
                steps = row[mode]
                log(f"{row['size']:6.0e} {world:5d} {mode:>4s} "
                    f"{max(row[state]) / 1e6:13.1f} "
                    f"{_stat([s['comm'] for s in steps]):>22s} "
                    f"{_stat([s['update'] for s in steps]):>22s} "
                    f"{_stat([s['comm'] + s['update'] for s in steps]):>22s}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(everything, f, indent=1)
    return everything


def main(argv=None):
    """``python benchmarks/bench_distributed_mpi.py``: the arguments, then :func:`run`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_ints, default=[1_000_000, 10_000_000])
    ap.add_argument("--ranks", type=_ints, default=[1, 2, 3])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bucket-bytes", type=int, default=25 << 20)
    ap.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.sizes, args.repeats, args.bucket_bytes, args.worker)
    run(args.sizes, args.ranks, args.repeats, args.bucket_bytes, args.json)
    return 0


if __name__ == "__main__":
    main()
