"""Run by tests/test_distributed_torch.py under ``torchrun --standalone --nproc-per-node N``:
data-parallel training on the gloo backend with fastopt.torch's optimizers, each run next to
the same run with torch.optim, compared on every rank.

    torchrun --standalone --nproc-per-node 2 tests/torch_dist_worker.py ddp|zero OUT_DIR

Writes OUT_DIR/rank<r>.json with what it compared; any mismatch raises (non-zero exit).
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import fastopt.torch

STEPS = 6
HYPER = {"lr": 0.01, "weight_decay": 0.1}


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch(rank, k):
    g = torch.Generator().manual_seed(100 * k + rank)  # every rank its own data
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def train(cls, rank, zero):
    net = DDP(model())
    params = list(net.parameters())
    if zero:  # each rank keeps the state of its shard of the parameters only
        opt = ZeroRedundancyOptimizer(params, optimizer_class=cls, **HYPER)
    else:
        opt = cls(params, **HYPER)
    for k in range(STEPS):
        opt.zero_grad()
        x, y = batch(rank, k)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net, opt


def compare(mode, out):
    rank, world = dist.get_rank(), dist.get_world_size()
    zero = mode == "zero"
    ours, o1 = train(fastopt.torch.Adam, rank, zero)
    ref, o2 = train(torch.optim.Adam, rank, zero)
    worst = 0.0
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1.3e-6, atol=1e-5)
        worst = max(worst, (p - q).abs().max().item())
    # every rank holds the same parameters (the gradients were averaged)
    flat = torch.cat([p.detach().reshape(-1) for p in ours.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    assert same, "the ranks' parameters differ"
    report = {"rank": rank, "world": world, "mode": mode, "max_abs_diff": worst,
              "ranks_equal": same}
    if zero:
        # each rank's local optimizer holds its shard's state only
        local = o1.optim
        report["local_state"] = len(local.state)
        report["local_type"] = type(local).__name__
        assert isinstance(local, fastopt.torch.Adam)
        o1.consolidate_state_dict(to=0)
        o2.consolidate_state_dict(to=0)
        if rank == 0:
            a, b = o1.state_dict(), o2.state_dict()
            assert a["state"].keys() == b["state"].keys()
            for i in a["state"]:
                for key, value in b["state"][i].items():
                    torch.testing.assert_close(a["state"][i][key], value, rtol=1.3e-6,
                                               atol=1e-5)
            report["consolidated_entries"] = len(a["state"])
            # the consolidated state loads into a fresh single-process fastopt optimizer
            single = fastopt.torch.Adam(model().parameters(), lr=0.01)
            single.load_state_dict(a)
            report["loaded_into_one_process"] = True
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def main():
    dist.init_process_group("gloo")
    # The models, optimizers and tensors of the runs are freed when compare returns, while the
    # group is still registered; the group itself goes at destroy_process_group. Freed the
    # other way round (the last DDP or ZeroRedundancyOptimizer holding the group, freed at
    # exit), gloo's group can hang in its destructor: it joins its worker threads holding the
    # GIL while one of them may be releasing a finished collective's tensor, which needs it.
    compare(sys.argv[1], sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
