"""``python -m fastopt demo [--out DIR] [--quick]``: the classic optimizer comparisons.

Runs three experiments with fastopt's optimizers and schedulers and prints one summary table
(final loss per optimizer, time per ``step()``):

* paths of SGD, Momentum, Nesterov, Adagrad, RMSprop and Adam on the quadratics
  f(x, y) = x^2/20 + y^2 from (-7, 2) and f(x1, x2) = 0.2 x1^2 + 2 x2^2 from (3, 4), 30 steps;
* minibatch linear regression (1000 x 2 inputs, batch 64, 30 epochs) with SGD, Momentum,
  Adagrad, RMSprop and Adam;
* a gallery of learning-rate schedules.

With matplotlib (the ``plot`` extra) it writes ``trajectories_f1.png``,
``trajectories_f2.png``, ``trajectories_3d.png``, ``linear_fit.png`` and ``schedules.png``
to DIR; without it, it prints the tables and says how to get the pictures.
``examples/trajectories.py`` and ``examples/linear_fit.py`` are the same experiments written
as standalone programs (the tests check that both give the same numbers).
"""
import argparse
import os
import sys
import time

import numpy as np

import fastopt
from fastopt import lr_scheduler as S

__all__ = ["main", "run_linear_fit", "run_trajectories", "schedule_gallery"]

PLOT_HINT = ('matplotlib is not installed, so no pictures were drawn; install the plot '
             'extra to get them: pip install "fastopt[plot]"')

# --------------------------------------------------------------------------- trajectories

QUADRATICS = {
    # name: (label, start, (a, b) of f = a x^2 + b y^2, plotting box)
    "f1": ("f(x, y) = x²/20 + y²", (-7.0, 2.0), (1 / 20, 1.0), (-10, 10, -5, 5)),
    "f2": ("f(x₁, x₂) = 0.2 x₁² + 2 x₂²", (3.0, 4.0), (0.2, 2.0), (-4.5, 4.5, -4.5, 4.5)),
}

# name: (class, keyword arguments, lr per quadratic)
PATH_OPTIMIZERS = {
    "SGD": (fastopt.SGD, {}, {"f1": 0.95, "f2": 0.4}),
    "Momentum": (fastopt.SGD, {"momentum": 0.9}, {"f1": 0.1, "f2": 0.05}),
    "Nesterov": (fastopt.SGD, {"momentum": 0.9, "nesterov": True}, {"f1": 0.1, "f2": 0.05}),
    "Adagrad": (fastopt.Adagrad, {}, {"f1": 1.5, "f2": 1.0}),
    "RMSprop": (fastopt.RMSprop, {}, {"f1": 0.15, "f2": 0.1}),
    "Adam": (fastopt.Adam, {}, {"f1": 0.3, "f2": 0.3}),
}


def _quadratic(problem, xy):
    a, b = QUADRATICS[problem][2]
    return a * xy[..., 0] ** 2 + b * xy[..., 1] ** 2


def run_trajectories(steps=30):
    """``{problem: {optimizer: (path of steps+1 points, seconds per step)}}``."""
    out = {}
    for problem, (_, start, (a, b), _) in QUADRATICS.items():
        out[problem] = {}
        for name, (cls, kwargs, lrs) in PATH_OPTIMIZERS.items():
            p = fastopt.Parameter(np.array(start))
            opt = cls([p], lr=lrs[problem], **kwargs)
            path = [p.copy()]
            spent = 0.0
            for _ in range(steps):
                p.grad = np.array([2 * a * p[0], 2 * b * p[1]])
                t0 = time.perf_counter()
                opt.step()
                spent += time.perf_counter() - t0
                path.append(p.copy())
            out[problem][name] = (np.array(path), spent / steps)
    return out


def _grid(problem, n):
    x0, x1, y0, y1 = QUADRATICS[problem][3]
    X, Y = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    return X, Y, _quadratic(problem, np.stack([X, Y], axis=-1))


def _plot_trajectories(results, out, size, dpi=100):
    from matplotlib.figure import Figure

    w, h = size[0] / dpi, size[1] / dpi
    files = []

    fig = Figure(figsize=(w, h), dpi=dpi)
    X, Y, Z = _grid("f1", 200)
    for ax, (name, (path, _)) in zip(fig.subplots(2, 3).ravel(), results["f1"].items()):
        ax.contour(X, Y, Z, levels=np.geomspace(0.05, 30, 14), cmap="Greys", linewidths=0.8)
        ax.plot(path[:, 0], path[:, 1], "o-", color="tab:red", ms=3, lw=1)
        ax.plot(0, 0, "+", color="k", ms=10)
        ax.set_title(f"{name}: f = {_quadratic('f1', path[-1]):.2g}", fontsize=10)
    fig.suptitle(QUADRATICS["f1"][0] + f", start (-7, 2), {len(path) - 1} steps")
    fig.tight_layout()
    files.append(os.path.join(out, "trajectories_f1.png"))
    fig.savefig(files[-1], dpi=dpi)

    fig = Figure(figsize=(w, h), dpi=dpi)
    ax = fig.subplots()
    X, Y, Z = _grid("f2", 200)
    fig.colorbar(ax.contourf(X, Y, Z, levels=20, cmap="Blues", alpha=0.6), ax=ax, label="f")
    for name, (path, _) in results["f2"].items():
        ax.plot(path[:, 0], path[:, 1], "o-", ms=3, lw=1.2,
                label=f"{name} (f = {_quadratic('f2', path[-1]):.2g})")
    ax.plot(0, 0, "*", color="k", ms=12)
    ax.set_aspect("equal")
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(QUADRATICS["f2"][0] + ", start (3, 4)")
    fig.tight_layout()
    files.append(os.path.join(out, "trajectories_f2.png"))
    fig.savefig(files[-1], dpi=dpi)

    fig = Figure(figsize=(w, h), dpi=dpi)
    ax = fig.add_subplot(projection="3d")
    X, Y, Z = _grid("f1", 80)
    ax.plot_surface(X, Y, Z, cmap="viridis", alpha=0.55, linewidth=0)
    for name, (path, _) in results["f1"].items():
        ax.plot(path[:, 0], path[:, 1], _quadratic("f1", path), "o-", ms=2, lw=1.2, label=name)
    ax.view_init(elev=35, azim=-60)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("f")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(QUADRATICS["f1"][0])
    files.append(os.path.join(out, "trajectories_3d.png"))
    fig.savefig(files[-1], dpi=dpi)
    return files


# --------------------------------------------------------------------------- linear fit

FIT_OPTIMIZERS = {
    "SGD": (fastopt.SGD, {"lr": 0.05}),
    "Momentum": (fastopt.SGD, {"lr": 0.05, "momentum": 0.9}),
    "Adagrad": (fastopt.Adagrad, {"lr": 0.5}),
    "RMSprop": (fastopt.RMSprop, {"lr": 0.01}),
    "Adam": (fastopt.Adam, {"lr": 0.05}),
}
TRUE_W, TRUE_B, NOISE = np.array([3.0, -2.0]), 0.5, 0.1


def run_linear_fit(epochs=30, batch=64, n=1000):
    """``{optimizer: dict(iter_loss, epoch_loss, w, b, sec_per_step)}`` for y = Xw + b."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 2))
    y = X @ TRUE_W + TRUE_B + NOISE * rng.normal(size=n)

    def mse_grads(w, b, Xb, yb):
        r = Xb @ w + b - yb
        m = len(yb)
        return float(r @ r / m), 2.0 / m * (Xb.T @ r), np.array([2.0 / m * r.sum()])

    out = {}
    for name, (cls, kwargs) in FIT_OPTIMIZERS.items():
        w, b = fastopt.Parameter(np.zeros(2)), fastopt.Parameter(np.zeros(1))
        opt = cls([w, b], **kwargs)
        order_rng = np.random.default_rng(1)
        iters, epoch_loss, spent = [], [], 0.0
        for _ in range(epochs):
            order = order_rng.permutation(n)
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                loss, w.grad, b.grad = mse_grads(w, b, X[idx], y[idx])
                iters.append(loss)
                t0 = time.perf_counter()
                opt.step()
                spent += time.perf_counter() - t0
            epoch_loss.append(mse_grads(w, b, X, y)[0])
        out[name] = {"iter_loss": np.array(iters), "epoch_loss": np.array(epoch_loss),
                         "w": np.array(w), "b": float(b[0]), "sec_per_step": spent / len(iters)}
    return out


def _plot_linear_fit(results, path, size, dpi=100):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    left, right = fig.subplots(1, 2)
    for name, r in results.items():
        left.plot(np.arange(1, len(r["iter_loss"]) + 1), r["iter_loss"], lw=0.9, label=name)
        right.plot(np.arange(1, len(r["epoch_loss"]) + 1), r["epoch_loss"], "o-", ms=3,
                   label=name)
    for ax, what in ((left, "iteration (batch of 64)"), (right, "epoch")):
        ax.set_yscale("log")
        ax.set_xlabel(what)
        ax.set_ylabel("mean squared error")
        ax.axhline(NOISE ** 2, color="k", ls=":", lw=1, label="noise variance")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    left.set_title("loss of each minibatch")
    right.set_title("loss on all samples after each epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


# --------------------------------------------------------------------------- schedules


def schedule_gallery(steps=100):
    """``[(title, scheduler)]``: one fresh scheduler per panel, on a one-element SGD."""

    def opt(lr=0.1, momentum=0.9):
        return fastopt.SGD([fastopt.Parameter(np.zeros(1))], lr=lr, momentum=momentum)

    def warmup_cosine():
        o = opt()
        warm = max(1, steps // 10)
        return S.SequentialLR(o, [S.LinearLR(o, 0.01, total_iters=warm),
                                  S.CosineAnnealingLR(o, T_max=steps - warm)], [warm])

    return [
        (f"StepLR(step_size={steps // 4}, gamma=0.5)",
         S.StepLR(opt(), step_size=steps // 4, gamma=0.5)),
        ("MultiStepLR", S.MultiStepLR(opt(), milestones=[steps // 2, 3 * steps // 4])),
        ("ExponentialLR(0.97)", S.ExponentialLR(opt(), gamma=0.97)),
        ("CosineAnnealingLR", S.CosineAnnealingLR(opt(), T_max=steps)),
        ("CosineAnnealingWarmRestarts", S.CosineAnnealingWarmRestarts(opt(), T_0=steps // 7,
                                                                      T_mult=2)),
        ("PolynomialLR(power=2)", S.PolynomialLR(opt(), total_iters=steps, power=2.0)),
        ("warm-up then cosine (SequentialLR)", warmup_cosine()),
        ("CyclicLR(triangular2)", S.CyclicLR(opt(), base_lr=0.01, max_lr=0.1,
                                             step_size_up=steps // 8, mode="triangular2")),
        ("OneCycleLR", S.OneCycleLR(opt(), max_lr=0.1, total_steps=steps + 1)),
    ]


def _plot_gallery(gallery, path, steps, size, dpi=100):
    from matplotlib.figure import Figure

    from fastopt.plot import lr_curve

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    axes = fig.subplots(3, 3, sharex=True).ravel()
    for ax, (title, sched) in zip(axes, gallery):
        lr_curve(sched, steps=steps, ax=ax, momentum=False, labels=[title])
        ax.set_title(title, fontsize=9)
        ax.legend().remove()
        ax.set_xlabel("")
    fig.suptitle(f"learning-rate schedules over {steps} steps (lr 0.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


# --------------------------------------------------------------------------- command


def _summary(traj, fit):
    names = list(dict.fromkeys(list(PATH_OPTIMIZERS) + list(FIT_OPTIMIZERS)))
    head = (f"{'optimizer':<10} {'final f1':>10} {'final f2':>10} {'fit loss':>10} "
            f"{'us/step':>8}")
    lines = [head, "-" * len(head)]
    for name in names:
        cells, times = [], []
        for problem in QUADRATICS:
            if name in traj[problem]:
                path, sec = traj[problem][name]
                cells.append(f"{_quadratic(problem, path[-1]):>10.3e}")
                times.append(sec)
            else:
                cells.append(f"{'-':>10}")
        if name in fit:
            cells.append(f"{fit[name]['epoch_loss'][-1]:>10.3e}")
            times.append(fit[name]["sec_per_step"])
        else:
            cells.append(f"{'-':>10}")
        lines.append(f"{name:<10} " + " ".join(cells) + f" {1e6 * np.mean(times):>8.1f}")
    return "\n".join(lines)


def main(argv):
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m fastopt demo",
        description="Optimizer paths on two quadratics, a minibatch linear fit and a "
                    "schedule gallery: prints a summary table and writes PNGs.")
    parser.add_argument("--out", default="fastopt-demo", metavar="DIR",
                        help="directory for the PNGs (default: ./fastopt-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="shorter schedules and smaller pictures (for CI)")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2

    epochs = 30  # the fit takes well under a second; --quick only shrinks the rest
    gallery_steps = 100 if args.quick else 300
    t0 = time.perf_counter()
    traj = run_trajectories(30)
    fit = run_linear_fit(epochs=epochs)
    gallery = schedule_gallery(gallery_steps)
    print(f"fastopt {fastopt.__version__} demo: 30 steps on f1 = x²/20 + y² from (-7, 2) and "
          f"f2 = 0.2 x₁² + 2 x₂² from (3, 4); linear fit: 1000 x 2, batch 64, {epochs} "
          f"epochs (loss on all samples after the last epoch)\n")
    print(_summary(traj, fit))

    from fastopt.plot import lr_trace

    print(f"\nlearning-rate schedules ({gallery_steps} steps, lr 0.1): lr at steps "
          f"0, 1/4, 1/2, 3/4, end")
    marks = [0, gallery_steps // 4, gallery_steps // 2, 3 * gallery_steps // 4,
             gallery_steps - 1]
    for title, sched in gallery:
        lrs = lr_trace(sched, gallery_steps)["lr"]
        print(f"  {title:<36}" + "".join(f"{lrs[m][0]:>10.2e}" for m in marks))

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("\n" + PLOT_HINT)
        return 0
    os.makedirs(args.out, exist_ok=True)
    files = _plot_trajectories(traj, args.out, (900, 540) if args.quick else (1500, 900))
    files.append(_plot_linear_fit(fit, os.path.join(args.out, "linear_fit.png"),
                                  (900, 360) if args.quick else (1400, 550)))
    files.append(_plot_gallery(gallery, os.path.join(args.out, "schedules.png"),
                               gallery_steps, (900, 700) if args.quick else (1400, 1000)))
    print()
    for f in files:
        print("wrote", f)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
