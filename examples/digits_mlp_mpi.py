"""The digits MLP of ``digits_mlp.py`` trained data-parallel over MPI.

Every process (rank) builds the same network, optimizer and schedule, and draws the same
shuffle; each batch of 32 is split between the ranks, each rank computes the gradients of its
share, ``fastopt.distributed.average_gradients`` averages them over the ranks in place, and
every rank steps its own Adam with the same averaged gradients, so the parameters stay
identical everywhere (the program checks that at the end). The gradients of a share are
weighted by its size, so the average is the gradient of the whole batch and the run follows
the single-process one up to the rounding of the sums.

    pip install mpi4py mpich         # or: pip install "fastopt[distributed]"
    mpiexec -n 4 python examples/digits_mlp_mpi.py [--epochs N] [--quick] [--seed S]
                                                   [--zero] [--checkpoint DIR] [--stop-after E]

Rank 0 prints a table row per epoch; any rank that raises ends the whole job
(``fastopt.distributed.abort_on_error``) instead of leaving the others waiting.

``--zero`` trains with ``fastopt.distributed.ZeroOptimizer`` instead: each rank keeps the Adam
state of 1/N of the elements, and its ``step()`` averages the gradients itself.
``--checkpoint DIR`` saves a sharded checkpoint (``fastopt.distributed.save``: the optimizer,
the schedule, the parameters and the epoch) after every epoch, and when DIR already holds one
the run resumes from it, on any number of ranks (``--stop-after E`` ends the run after epoch
E, to resume it later: ``mpiexec -n 2 ... --zero --checkpoint ck --stop-after 3``, then
``mpiexec -n 3 ... --zero --checkpoint ck``).
"""
import argparse
import hashlib
import os
import sys
import time

import numpy as np

# the sibling example provides the data and the network
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_mlp

import fastopt
from fastopt import distributed
from fastopt.lr_scheduler import OneCycleLR


def train(comm, epochs=12, batch=32, max_lr=0.01, seed=0, out=sys.stdout, zero=False,
          checkpoint=None, stop_after=None):
    """Train on every rank of ``comm``; returns what ``digits_mlp.train`` returns, and
    ``"first_epoch"``, the epoch this run started with (after a resumed checkpoint's)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    Xtr, ytr, Xte, yte = digits_mlp.load_data(seed)
    params = digits_mlp.init_params(seed)              # the same on every rank
    if zero:
        opt = distributed.ZeroOptimizer(params, fastopt.Adam, comm=comm, lr=max_lr,
                                        weight_decay=1e-4)
        inner = opt.optimizer                          # the shard's Adam: its lr, its state
    else:
        opt = inner = fastopt.Adam(params, lr=max_lr, weight_decay=1e-4)
    n_batches = -(-len(ytr) // batch)
    sched = OneCycleLR(inner, max_lr=max_lr, epochs=epochs, steps_per_epoch=n_batches)
    rng = np.random.default_rng(seed + 1)              # the same shuffle on every rank
    history = []
    say = (lambda *a, **k: print(*a, **k, file=out, flush=True)) if rank == 0 else \
        (lambda *a, **k: None)
    first = 1
    if checkpoint is not None and os.path.isdir(checkpoint) and os.listdir(checkpoint):
        extra = distributed.load(checkpoint, opt, sched)
        for p, saved in zip(params, extra["params"]):
            p[...] = saved
        first = extra["epoch"] + 1
        for _ in range(1, first):                      # the shuffles of the epochs done
            rng.permutation(len(ytr))
        say(f"resumed from {checkpoint} after epoch {extra['epoch']}")
    say(f"{'epoch':>5} {'loss':>8} {'train acc':>9} {'test acc':>8} {'lr':>9} {'time':>6}")
    t_start = time.perf_counter()
    for epoch in range(first, (stop_after or epochs) + 1):
        t0 = time.perf_counter()
        order = rng.permutation(len(ytr))
        total = 0.0
        for k in range(n_batches):
            idx = order[k * batch:(k + 1) * batch]
            mine = idx[rank::size]                     # this rank's share of the batch
            if len(mine):
                loss, grads = digits_mlp.loss_and_grads(params, Xtr[mine], ytr[mine])
            else:                                      # a last batch smaller than the ranks
                loss, grads = 0.0, [np.zeros_like(p) for p in params]
            weight = len(mine) * size / len(idx)       # mean over ranks = mean over the batch
            for p, g in zip(params, grads):
                p.grad = np.asarray(g * weight, dtype=np.float32)
            if not zero:
                distributed.average_gradients(opt, comm)
            opt.step()                                 # ZeroOptimizer averages them itself
            sched.step()
            total += loss * len(mine)
        total = comm.allreduce(total)
        row = {"epoch": epoch, "loss": total / len(ytr),
               "train_acc": digits_mlp.accuracy(params, Xtr, ytr),
               "test_acc": digits_mlp.accuracy(params, Xte, yte),
               "lr": inner.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        history.append(row)
        say(f"{epoch:>5} {row['loss']:>8.4f} {row['train_acc']:>9.2%} "
            f"{row['test_acc']:>8.2%} {row['lr']:>9.2e} {row['seconds']:>5.2f}s")
        if checkpoint is not None:
            # a ZeroOptimizer saves on every rank (a shard each); a plain optimizer, the same
            # on every rank, is saved by one
            if zero or rank == 0:
                distributed.save(checkpoint, opt, sched, extra={"params": params,
                                                                "epoch": epoch})
            comm.Barrier()
    digest = hashlib.sha256(b"".join(p.tobytes() for p in params)).hexdigest()
    identical = len(set(comm.allgather(digest))) == 1
    return {"history": history, "test_acc": digits_mlp.accuracy(params, Xte, yte),
            "train_acc": digits_mlp.accuracy(params, Xtr, ytr), "params": params,
            "seconds": time.perf_counter() - t_start, "identical": identical,
            "first_epoch": first}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="fewer epochs (for CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero", action="store_true",
                        help="shard the optimizer state over the ranks (ZeroOptimizer)")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="save a sharded checkpoint here after every epoch; resume from "
                             "the one it holds")
    parser.add_argument("--stop-after", type=int, metavar="E",
                        help="end the run after epoch E (to resume it later)")
    args = parser.parse_args(argv)
    epochs = min(args.epochs, 6) if args.quick else args.epochs
    stop = min(args.stop_after, epochs) if args.stop_after else None
    with distributed.abort_on_error() as comm:
        result = train(comm, epochs=epochs, seed=args.seed, zero=args.zero,
                       checkpoint=args.checkpoint, stop_after=stop)
        if not result["identical"]:
            raise RuntimeError("the ranks' parameters differ")
    size = comm.Get_size()
    if comm.Get_rank() == 0:
        done = stop or epochs
        print(f"test accuracy {result['test_acc']:.2%} after {done} epochs on {size} "
              f"rank{'s' * (size != 1)} in {result['seconds']:.1f} s; parameters identical "
              f"on all ranks", flush=True)
    return result


if __name__ == "__main__":
    main()
