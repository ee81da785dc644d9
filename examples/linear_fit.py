"""Minibatch linear regression with six optimizers, loss per iteration and per epoch.

1000 samples with 2 features, y = 3 x1 - 2 x2 + 0.5 + noise (sd 0.1); batch 64, 30 epochs,
the mean squared error and its gradient written out in NumPy. SGD, Momentum, Nesterov,
Adagrad, RMSprop and Adam start from the same zero weights and see the same batches.

    python examples/linear_fit.py [--out DIR] [--epochs N] [--quick] [--no-plot]

prints the loss per epoch and the fitted weights, and writes ``linear_fit.png``: the loss
after every iteration (left, log scale) and the full-data loss after every epoch (right),
each optimizer labelled with its hyperparameters (RMSprop's small learning rate is why it is
the slowest here).
"""
import argparse
import os
import time

import numpy as np

import fastopt

TRUE_W = np.array([3.0, -2.0])
TRUE_B = 0.5
NOISE = 0.1

OPTIMIZERS = {
    "SGD": (fastopt.SGD, {"lr": 0.05}),
    "Momentum": (fastopt.SGD, {"lr": 0.05, "momentum": 0.9}),
    "Nesterov": (fastopt.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "Adagrad": (fastopt.Adagrad, {"lr": 0.5}),
    "RMSprop": (fastopt.RMSprop, {"lr": 0.01}),
    "Adam": (fastopt.Adam, {"lr": 0.05}),
}


def describe(name):
    """``"Momentum (lr=0.05, momentum=0.9)"``: the name and the hyperparameters it runs with."""
    args = ", ".join(f"{k}={v}" for k, v in OPTIMIZERS[name][1].items() if k != "nesterov")
    return f"{name} ({args})"


def make_data(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    y = X @ TRUE_W + TRUE_B + NOISE * rng.normal(size=n)
    return X, y


def mse_and_grads(w, b, X, y):
    """Loss mean((Xw + b - y)^2) and its gradients with respect to w and b."""
    r = X @ w + b - y
    n = len(y)
    return float(r @ r / n), 2.0 / n * (X.T @ r), np.array([2.0 / n * r.sum()])


def fit(name, X, y, epochs=30, batch=64, seed=1):
    """Train one optimizer; per-iteration and per-epoch losses, final (w, b), s per step."""
    cls, kwargs = OPTIMIZERS[name]
    w = fastopt.Parameter(np.zeros(2))
    b = fastopt.Parameter(np.zeros(1))
    opt = cls([w, b], **kwargs)
    rng = np.random.default_rng(seed)  # same batches for every optimizer
    iters, epoch_loss, spent, steps = [], [], 0.0, 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            loss, w.grad, b.grad = mse_and_grads(w, b, X[idx], y[idx])
            iters.append(loss)
            t0 = time.perf_counter()
            opt.step()
            spent += time.perf_counter() - t0
            steps += 1
        epoch_loss.append(mse_and_grads(w, b, X, y)[0])
    return {"iter_loss": np.array(iters), "epoch_loss": np.array(epoch_loss),
                "w": np.array(w), "b": float(b[0]), "sec_per_step": spent / steps}


def run_all(epochs=30, batch=64):
    X, y = make_data()
    return {name: fit(name, X, y, epochs, batch) for name in OPTIMIZERS}


def plot(results, path, size=(1400, 550), dpi=100):
    """Write ``linear_fit.png`` (or any file name) to ``path``; return it."""
    fig = figure(results, size, dpi)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def figure(results, size=(1400, 550), dpi=100):
    """The matplotlib Figure of the two loss panels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    left, right = fig.subplots(1, 2)
    for name, r in results.items():
        left.plot(np.arange(1, len(r["iter_loss"]) + 1), r["iter_loss"], lw=0.9,
                  label=describe(name))
        right.plot(np.arange(1, len(r["epoch_loss"]) + 1), r["epoch_loss"], "o-", ms=3,
                   label=describe(name))
    for ax, what in ((left, "iteration (batch of 64)"), (right, "epoch")):
        ax.set_yscale("log")
        ax.set_xlabel(what)
        ax.set_ylabel("mean squared error")
        ax.axhline(NOISE ** 2, color="k", ls=":", lw=1, label="noise variance")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small" if size[0] < 1200 else "small")
    left.set_title("loss of each minibatch")
    right.set_title("loss on all 1000 samples after each epoch")
    fig.tight_layout()
    return fig


def table(results):
    epochs = len(next(iter(results.values()))["epoch_loss"])
    shown = sorted({1, 2, 5, 10, epochs} & set(range(1, epochs + 1)))
    head = f"{'epoch':<8}" + "".join(f"{name:>17}" for name in results)
    lines = [head]
    for e in shown:
        lines.append(f"{e:<8}" + "".join(f"{r['epoch_loss'][e - 1]:>17.4g}"
                                         for r in results.values()))
    lines.append(f"{'w1 w2 b':<8}" + "".join(
        f"{'{:.2f} {:.2f} {:.2f}'.format(*r['w'], r['b']):>17}" for r in results.values()))
    lines.append(f"{'us/step':<8}" + "".join(f"{1e6 * r['sec_per_step']:>17.1f}"
                                          for r in results.values()))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".", help="directory for linear_fit.png")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="smaller figure (for CI)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    results = run_all(args.epochs)
    print(table(results))
    files = []
    if not args.no_plot:
        size = (900, 360) if args.quick else (1400, 550)
        files = [plot(results, os.path.join(args.out, "linear_fit.png"), size=size)]
        print("wrote", files[0])
    return {"results": results, "files": files}


if __name__ == "__main__":
    main()
