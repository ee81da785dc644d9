"""The digits MLP of digits_mlp.py in PyTorch, trained data-parallel with
``torch.nn.parallel.DistributedDataParallel`` on the gloo backend (CPU) and fastopt.torch's
Adam; with ``--zero``, ``torch.distributed.optim.ZeroRedundancyOptimizer`` shards the Adam
state over the processes (each keeps the state of its share of the parameters).

    torchrun --standalone --nproc-per-node 2 examples/digits_ddp.py [--epochs N] [--zero]

Every process trains on its own slice of each batch (``DistributedSampler`` splits the data);
DDP averages the gradients, so every process steps the same parameters to the same values.
Rank 0 prints one line per epoch (loss, test accuracy) and a last line with the accuracy.
"""
import argparse

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fastopt.torch


def load_data(seed=0):
    """Standardised float32 digits, split 75/25 with every class in both parts."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)
    mean, std = Xtr.mean(axis=0), Xtr.std(axis=0) + 1e-3
    return [torch.from_numpy(a) for a in ((Xtr - mean) / std, ytr, (Xte - mean) / std, yte)]


def train(args):
    rank = dist.get_rank()
    Xtr, ytr, Xte, yte = load_data()
    torch.manual_seed(0)  # the same initial parameters on every process
    net = DDP(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                  torch.nn.Linear(128, 10)))
    if args.zero:
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=fastopt.torch.Adam,
                                      lr=3e-3)
    else:
        opt = fastopt.torch.Adam(net.parameters(), lr=3e-3)
    sampler = DistributedSampler(TensorDataset(Xtr, ytr), shuffle=True, seed=0)
    loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=args.batch, sampler=sampler)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            count += len(y)
        with torch.no_grad():
            acc = (net(Xte).argmax(1) == yte).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {total / count:.4f}  test accuracy {acc:.4f}",
                  flush=True)
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="per process")
    ap.add_argument("--zero", action="store_true", help="shard the Adam state (ZeRO-1)")
    args = ap.parse_args(argv)

    dist.init_process_group("gloo")
    # The model and the optimizer live in train, so they are freed before the group is
    # destroyed. The other order (the group destroyed first, then freed with the last DDP
    # model or ZeroRedundancyOptimizer that holds it, as at exit) can hang: gloo's group joins
    # its worker threads in its destructor, holding the GIL, while one of them may still be
    # releasing the tensors of a finished collective, which needs the GIL.
    acc = train(args)
    if dist.get_rank() == 0:
        print(f"test accuracy {acc:.4f}", flush=True)
    # every process arrives before any leaves: the first to tear down its group (rank 0 also
    # holds the rendezvous store) must not leave another one waiting on it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
