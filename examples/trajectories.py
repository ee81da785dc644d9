"""Optimizer paths on two ill-conditioned quadratics, drawn over their contour plots.

* f(x, y) = x**2 / 20 + y**2 from (-7, 2): 20 times steeper along y than along x. Plain SGD
  with a large step bounces from one wall of the valley to the other; momentum and the
  adaptive methods head along the valley floor instead.
* f(x1, x2) = 0.2 x1**2 + 2 x2**2 from (3, 4), the same picture at a milder condition number.

Each optimizer takes 30 steps from the same start; the gradients are written out by hand and
handed to fastopt through ``Parameter.grad``, as a training loop would.

    python examples/trajectories.py [--out DIR] [--steps N] [--quick] [--no-plot]

writes ``trajectories_f1.png`` (one contour panel per optimizer), ``trajectories_f2.png``
(all paths on one contour plot) and ``trajectories_3d.png`` (the first surface in 3-D with
the paths lifted onto it) to DIR, and prints the final value of f per optimizer.
"""
import argparse
import os
import time

import numpy as np

import fastopt

PROBLEMS = {
    "f1": {"title": "f(x, y) = x²/20 + y²", "start": (-7.0, 2.0), "scale": (1 / 20, 1.0),
               "box": (-10, 10, -5, 5)},
    "f2": {"title": "f(x₁, x₂) = 0.2 x₁² + 2 x₂²", "start": (3.0, 4.0), "scale": (0.2, 2.0),
               "box": (-4.5, 4.5, -4.5, 4.5)},
}

# name -> (optimizer class, keyword arguments, learning rate per problem); the rates are
# picked per method so that each shows its typical path (f2 is 4x steeper than f1 along its
# second axis, so plain SGD needs a smaller step there to stay stable)
OPTIMIZERS = {
    "SGD": (fastopt.SGD, {}, {"f1": 0.95, "f2": 0.4}),
    "Momentum": (fastopt.SGD, {"momentum": 0.9}, {"f1": 0.1, "f2": 0.05}),
    "Nesterov": (fastopt.SGD, {"momentum": 0.9, "nesterov": True}, {"f1": 0.1, "f2": 0.05}),
    "Adagrad": (fastopt.Adagrad, {}, {"f1": 1.5, "f2": 1.0}),
    "RMSprop": (fastopt.RMSprop, {}, {"f1": 0.15, "f2": 0.1}),
    "Adam": (fastopt.Adam, {}, {"f1": 0.3, "f2": 0.3}),
}


def value(problem, xy):
    a, b = PROBLEMS[problem]["scale"]
    return a * xy[..., 0] ** 2 + b * xy[..., 1] ** 2


def gradient(problem, xy):
    a, b = PROBLEMS[problem]["scale"]
    return np.array([2 * a * xy[0], 2 * b * xy[1]])


def run(problem, name, steps=30):
    """The path (steps + 1 points) of one optimizer, and the mean time of one step in s."""
    cls, kwargs, lrs = OPTIMIZERS[name]
    p = fastopt.Parameter(np.array(PROBLEMS[problem]["start"]))
    opt = cls([p], lr=lrs[problem], **kwargs)
    path = [p.copy()]
    spent = 0.0
    for _ in range(steps):
        p.grad = gradient(problem, p)
        t0 = time.perf_counter()
        opt.step()
        spent += time.perf_counter() - t0
        path.append(p.copy())
    return np.array(path), spent / steps


def run_all(steps=30):
    """{problem: {optimizer: (path, seconds per step)}}."""
    return {prob: {name: run(prob, name, steps) for name in OPTIMIZERS} for prob in PROBLEMS}


def _grid(problem, n=200):
    x0, x1, y0, y1 = PROBLEMS[problem]["box"]
    X, Y = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    return X, Y, value(problem, np.stack([X, Y], axis=-1))


def plot(results, out, size=(1500, 900), dpi=100):
    """Write the three PNGs to ``out``; return their paths."""
    from matplotlib.figure import Figure

    os.makedirs(out, exist_ok=True)
    w, h = size[0] / dpi, size[1] / dpi
    paths = []

    # f1: one panel per optimizer
    fig = Figure(figsize=(w, h), dpi=dpi)
    axes = fig.subplots(2, 3).ravel()
    X, Y, Z = _grid("f1")
    for ax, (name, (path, _)) in zip(axes, results["f1"].items()):
        ax.contour(X, Y, Z, levels=np.geomspace(0.05, 30, 14), cmap="Greys", linewidths=0.8)
        ax.plot(path[:, 0], path[:, 1], "o-", color="tab:red", ms=3, lw=1)
        ax.plot(0, 0, "+", color="k", ms=10)
        ax.set_title(f"{name}: f = {value('f1', path[-1]):.2g} after {len(path) - 1} steps",
                     fontsize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-5, 5)
    fig.suptitle(PROBLEMS["f1"]["title"] + ", start (-7, 2)")
    fig.tight_layout()
    paths.append(os.path.join(out, "trajectories_f1.png"))
    fig.savefig(paths[-1], dpi=dpi)

    # f2: every path on one contour plot
    fig = Figure(figsize=(w, h), dpi=dpi)
    ax = fig.subplots()
    X, Y, Z = _grid("f2")
    cs = ax.contourf(X, Y, Z, levels=20, cmap="Blues", alpha=0.6)
    fig.colorbar(cs, ax=ax, label="f")
    for name, (path, _) in results["f2"].items():
        ax.plot(path[:, 0], path[:, 1], "o-", ms=3, lw=1.2,
                label=f"{name} (f = {value('f2', path[-1]):.2g})")
    ax.plot(0, 0, "*", color="k", ms=12)
    ax.set_aspect("equal")
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(PROBLEMS["f2"]["title"] + ", start (3, 4)")
    fig.tight_layout()
    paths.append(os.path.join(out, "trajectories_f2.png"))
    fig.savefig(paths[-1], dpi=dpi)

    # f1 as a surface, paths lifted onto it
    fig = Figure(figsize=(w, h), dpi=dpi)
    ax = fig.add_subplot(projection="3d")
    X, Y, Z = _grid("f1", n=80)
    ax.plot_surface(X, Y, Z, cmap="viridis", alpha=0.55, linewidth=0)
    for name, (path, _) in results["f1"].items():
        ax.plot(path[:, 0], path[:, 1], value("f1", path), "o-", ms=2, lw=1.2, label=name)
    ax.view_init(elev=35, azim=-60)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("f")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(PROBLEMS["f1"]["title"])
    paths.append(os.path.join(out, "trajectories_3d.png"))
    fig.savefig(paths[-1], dpi=dpi)
    return paths


def table(results):
    lines = [f"{'optimizer':<10}" + "".join(f"{'final ' + p:>14}" for p in PROBLEMS)
             + f"{'us/step':>10}"]
    for name in OPTIMIZERS:
        finals = "".join(f"{value(p, results[p][name][0][-1]):>14.3e}" for p in PROBLEMS)
        us = 1e6 * np.mean([results[p][name][1] for p in PROBLEMS])
        lines.append(f"{name:<10}{finals}{us:>10.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".", help="directory for the PNGs")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="smaller figures (for CI)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    results = run_all(args.steps)
    print(table(results))
    files = []
    if not args.no_plot:
        size = (900, 540) if args.quick else (1500, 900)
        files = plot(results, args.out, size=size)
        for f in files:
            print("wrote", f)
    return {"results": results, "files": files}


if __name__ == "__main__":
    main()
