"""A full CPU training step of a torch model with many parameter tensors, with torch.optim or
fastopt updating the same kind of model.

The model is a deep residual MLP (width 256, 24 blocks of Linear + LayerNorm: 98 parameter
tensors, 1.6 M parameters), batch 64, MSE loss. One step is zero_grad, forward, backward and
the optimizer step; the optimizer step alone is measured too (with fixed gradients), since it
is the part that differs. torch.optim runs its CPU default (the single-tensor for-loop
path), with ``foreach=True``, and with ``fused=True`` where torch has a fused CPU kernel.

    pytest benchmarks/bench_training.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
    python benchmarks/bench_training.py [--threads N] [--repeat R]   # a plain table

Both libraries use the same number of threads (1 by default, like the other benchmarks).
"""
import argparse
import time

import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch", reason="the training-step benchmark trains a torch model")

WIDTH, DEPTH, BATCH = 256, 24, 64

OPTIMIZERS = {
    # name: (torch.optim class name, kwargs, torch variants that exist on CPU)
    "Adam": ("Adam", {"lr": 1e-3}, ("default", "foreach", "fused")),
    "AdamW": ("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, ("default", "foreach", "fused")),
    "SGD-momentum": ("SGD", {"lr": 1e-2, "momentum": 0.9}, ("default", "foreach", "fused")),
    "RMSprop": ("RMSprop", {"lr": 1e-3}, ("default", "foreach")),
}
IMPLS = ["fastopt", "torch", "torch-foreach", "torch-fused"]


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x):
        return x + torch.tanh(self.norm(self.lin(x)))


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[Block(WIDTH) for _ in range(DEPTH)],
                               torch.nn.Linear(WIDTH, 1))


def make_optimizer(impl, name, params):
    cls_name, kwargs, variants = OPTIMIZERS[name]
    if impl == "fastopt":
        return fastopt.OPTIMIZERS[cls_name](params, **kwargs)
    variant = {"torch": "default", "torch-foreach": "foreach", "torch-fused": "fused"}[impl]
    if variant not in variants:
        return None
    extra = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[variant]
    return getattr(torch.optim, cls_name)(params, **kwargs, **extra)


def make_step(impl, name, optimizer_only=False):
    model = make_model()
    opt = make_optimizer(impl, name, model.parameters())
    if opt is None:
        return None, None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, WIDTH, generator=g)
    y = torch.randn(BATCH, 1, generator=g)

    def train_step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    train_step()  # warm up: state created, grads allocated
    if not optimizer_only:
        return train_step, model
    return opt.step, model


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("what", ["train-step", "optimizer-step"])
def test_training(benchmark, what, name, impl):
    step, model = make_step(impl, name, optimizer_only=(what == "optimizer-step"))
    if step is None:
        pytest.skip(f"torch has no {impl} variant of {name} on CPU")
    benchmark.group = f"{what} {name}"
    benchmark.extra_info["tensors"] = len(list(model.parameters()))
    benchmark.extra_info["parameters"] = sum(p.numel() for p in model.parameters())
    benchmark(step)


def _median_times(steps, repeat, inner=5):
    """Median seconds per call of each step function, measured round-robin (one batch of
    ``inner`` calls of each in turn, ``repeat`` times) so drift on a shared machine hits all
    of them alike."""
    times = [[] for _ in steps]
    for _ in range(repeat):
        for k, step in enumerate(steps):
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            times[k].append((time.perf_counter() - t0) / inner)
    return [float(np.median(t)) for t in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description="training-step benchmark, plain table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    fastopt.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    model = make_model()
    n_tensors = len(list(model.parameters()))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {DEPTH} x (Linear {WIDTH} + LayerNorm) + head = {n_tensors} tensors, "
          f"{n_params / 1e6:.2f} M parameters, batch {BATCH}, {args.threads} thread(s); "
          f"median of {args.repeat} rounds of 5 steps, round-robin, ms per step")
    head = f"{'':<26}" + "".join(f"{impl:>15}" for impl in IMPLS)
    print(head)
    for what in ("train-step", "optimizer-step"):
        for name in OPTIMIZERS:
            steps = [make_step(impl, name, optimizer_only=(what == "optimizer-step"))[0]
                     for impl in IMPLS]
            timed = iter(_median_times([s for s in steps if s is not None], args.repeat))
            cells = ["-" if s is None else f"{1e3 * next(timed):.3f}" for s in steps]
            print(f"{what + ' ' + name:<26}" + "".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
