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

Rank 0 prints a table row per epoch; any rank that raises ends the whole job
(``fastopt.distributed.abort_on_error``) instead of leaving the others waiting.
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


def train(comm, epochs=12, batch=32, max_lr=0.01, seed=0, out=sys.stdout):
    """Train on every rank of ``comm``; returns what ``digits_mlp.train`` returns."""
    rank, size = comm.Get_rank(), comm.Get_size()
    Xtr, ytr, Xte, yte = digits_mlp.load_data(seed)
    params = digits_mlp.init_params(seed)              # the same on every rank
    opt = fastopt.Adam(params, lr=max_lr, weight_decay=1e-4)
    n_batches = -(-len(ytr) // batch)
    sched = OneCycleLR(opt, max_lr=max_lr, epochs=epochs, steps_per_epoch=n_batches)
    rng = np.random.default_rng(seed + 1)              # the same shuffle on every rank
    history = []
    say = (lambda *a, **k: print(*a, **k, file=out, flush=True)) if rank == 0 else \
        (lambda *a, **k: None)
    say(f"{'epoch':>5} {'loss':>8} {'train acc':>9} {'test acc':>8} {'lr':>9} {'time':>6}")
    t_start = time.perf_counter()
    for epoch in range(1, epochs + 1):
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
            distributed.average_gradients(opt, comm)
            opt.step()
            sched.step()
            total += loss * len(mine)
        total = comm.allreduce(total)
        row = {"epoch": epoch, "loss": total / len(ytr),
               "train_acc": digits_mlp.accuracy(params, Xtr, ytr),
               "test_acc": digits_mlp.accuracy(params, Xte, yte),
               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        history.append(row)
        say(f"{epoch:>5} {row['loss']:>8.4f} {row['train_acc']:>9.2%} "
            f"{row['test_acc']:>8.2%} {row['lr']:>9.2e} {row['seconds']:>5.2f}s")
    digest = hashlib.sha256(b"".join(p.tobytes() for p in params)).hexdigest()
    identical = len(set(comm.allgather(digest))) == 1
    return {"history": history, "test_acc": history[-1]["test_acc"],
            "train_acc": history[-1]["train_acc"], "params": params,
            "seconds": time.perf_counter() - t_start, "identical": identical}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="fewer epochs (for CI)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = min(args.epochs, 6) if args.quick else args.epochs
    with distributed.abort_on_error() as comm:
        result = train(comm, epochs=epochs, seed=args.seed)
        if not result["identical"]:
            raise RuntimeError("the ranks' parameters differ")
    size = comm.Get_size()
    if comm.Get_rank() == 0:
        print(f"test accuracy {result['test_acc']:.2%} after {epochs} epochs on {size} "
              f"rank{'s' * (size != 1)} in {result['seconds']:.1f} s; parameters identical "
              f"on all ranks", flush=True)
    return result


if __name__ == "__main__":
    main()
