"""Data-parallel steps on torch.distributed (gloo, CPU) with fastopt.torch's Adam: per-rank
optimizer state and step time, split into communication and update, for 1, 2 and 3 processes.

    python benchmarks/bench_distributed_torch.py [--sizes 1e6,1e7] [--ranks 1,2,3] [--steps 5]

It starts itself under torchrun once per process count. Per size, the parameters are 10
float32 tensors of size/10 elements with fixed gradients, and each process times:

* ``allreduce``: averaging the gradients (one ``all_reduce`` of all of them as one flat
  buffer, what DDP's buckets do in backward);
* ``adam``: ``fastopt.torch.Adam.step()`` over all parameters (plain data parallelism: every
  process holds the full state);
* ``zero``: ``ZeroRedundancyOptimizer(optimizer_class=fastopt.torch.Adam).step()``, which
  steps the local shard and then broadcasts every shard's parameters; ``zero update`` is the
  local shard's step alone and ``zero comm`` the rest;
* the bytes of optimizer state on the process, for both.

Times are medians over ``--steps`` steps (after 2 warm-up steps), the slowest process's median.
On this 2-core machine 3 processes share 2 cores: their times show oversubscription, not
scaling; the state bytes are what scales.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _sizes(text):
    return [int(float(x)) for x in text.split(",") if x]


def worker(sizes, steps, out):
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import fastopt.torch

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    fastopt.set_num_threads(1)
    # the optimizers and tensors are freed (measure returns) before the group is destroyed:
    # gloo's group destroyed by the last ZeroRedundancyOptimizer holding it can hang (it joins
    # its worker threads holding the GIL, which a thread releasing a tensor may wait for)
    rows = measure(torch, dist, ZeroRedundancyOptimizer, sizes, steps)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(torch, dist, ZeroRedundancyOptimizer, sizes, steps):
    import fastopt.torch

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []

    def median_time(fn):
        for _ in range(2):
            fn()
        ts = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def state_bytes(opt):
        return sum(v.numel() * v.element_size() for st in opt.state.values()
                   for v in st.values() if isinstance(v, torch.Tensor))

    for n in sizes:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n // 10, generator=g)) for _ in range(10)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 0.01
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        t_allreduce = median_time(lambda: dist.all_reduce(flat))
        adam = fastopt.torch.Adam(params, lr=1e-3)
        t_adam = median_time(adam.step)
        zero = ZeroRedundancyOptimizer(params, optimizer_class=fastopt.torch.Adam, lr=1e-3)
        t_zero = median_time(zero.step)
        t_zero_update = median_time(zero.optim.step)
        rows.append({"size": n, "world": world, "rank": rank, "allreduce_s": t_allreduce,
                     "adam_s": t_adam, "zero_s": t_zero, "zero_update_s": t_zero_update,
                     "adam_state_bytes": state_bytes(adam),
                     "zero_state_bytes": state_bytes(zero.optim)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_sizes, default=[1_000_000, 10_000_000])
    ap.add_argument("--ranks", type=_sizes, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.sizes, args.steps, args.worker)
    print(f"{'size':>9s} {'ranks':>5s} {'state MB/rank':>14s} {'ZeRO state MB':>14s} "
          f"{'allreduce ms':>13s} {'Adam ms':>8s} {'ZeRO ms':>8s} {'ZeRO update':>12s} "
          f"{'ZeRO comm':>10s}")
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={world}", os.path.abspath(__file__),
                   "--sizes", ",".join(map(str, args.sizes)), "--steps", str(args.steps),
                   "--worker", out]
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1200)
            ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
        for i, n in enumerate(args.sizes):
            rs = [r[i] for r in ranks]
            slow = {k: max(r[k] for r in rs) for k in rs[0] if k.endswith("_s")}
            mb = max(r["adam_state_bytes"] for r in rs) / 1e6
            zmb = max(r["zero_state_bytes"] for r in rs) / 1e6
            print(f"{n:9.0e} {world:5d} {mb:14.1f} {zmb:14.1f} {slow['allreduce_s'] * 1e3:13.2f} "
                  f"{slow['adam_s'] * 1e3:8.2f} {slow['zero_s'] * 1e3:8.2f} "
                  f"{slow['zero_update_s'] * 1e3:12.2f} "
                  f"{(slow['zero_s'] - slow['zero_update_s']) * 1e3:10.2f}")


if __name__ == "__main__":
    main()
