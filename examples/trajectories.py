"""Optimizer paths on two ill-conditioned quadratics, drawn over their contour plots.

* f(x, y) = x**2 / 20 + y**2 from (-7, 2): 20 times steeper along y than along x. Plain SGD
  with a large step bounces from one wall of the valley to the other; momentum and the
  adaptive methods head along the valley floor instead.
* f(x1, x2) = 0.2 x1**2 + 2 x2**2 from (3, 4), the same picture at a milder condition number.

Each optimizer takes 30 steps from the same start; the gradients are written out by hand and
handed to fastopt through ``Parameter.grad``, as a training loop would.

    python examples/trajectories.py [--out DIR] [--steps N] [--quick] [--no-plot]

writes ``trajectories_f1.png`` (one contour panel per optimizer), ``trajectories_f2.png``
(all paths on one contour plot) and ``trajectories_3d.png`` (the first surface in 3-D, each
path drawn above a wireframe of it, next to f against the step on a log scale) to DIR, and
prints the final value of f per optimizer. Every title or legend entry gives the
optimizer's hyperparameters: the learning rates are picked per method, and they explain the
paths (Adam, for one, moves each coordinate by about ``lr`` per step whatever the gradient's
size, so with lr=0.3 it circles the minimum instead of settling in it).
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


def describe(name, problem):
    """``"Momentum (lr=0.1, momentum=0.9)"``: the optimizer's name and the hyperparameters it
    runs with on ``problem`` (the others are the class's defaults)."""
    _, kwargs, lrs = OPTIMIZERS[name]
    args = ", ".join(f"{k}={v}" for k, v in {"lr": lrs[problem], **kwargs}.items()
                     if k != "nesterov")
    return f"{name} ({args})"


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


# one colour, marker and line style per optimizer in the pictures that draw every path, so
# that paths lying on top of each other (Adagrad and RMSprop on f2) stay apart
STYLES = {
    "SGD": dict(color="tab:blue", marker="o", ls="-"),
    "Momentum": dict(color="tab:orange", marker="s", ls="-"),
    "Nesterov": dict(color="tab:green", marker="^", ls="-"),
    "Adagrad": dict(color="tab:red", marker="D", ls="--"),
    "RMSprop": dict(color="tab:purple", marker="v", ls=":"),
    "Adam": dict(color="tab:brown", marker="P", ls="-"),
}


def plot(results, out, size=(1500, 900), dpi=100):
    """Write the three PNGs to ``out``; return their paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, fig in figures(results, size, dpi).items():
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=dpi)
    return paths


def figures(results, size=(1500, 900), dpi=100):
    """``{file name: matplotlib Figure}`` of the three pictures."""
    from matplotlib.figure import Figure

    w, h = size[0] / dpi, size[1] / dpi
    small = size[0] < 1200
    figs = {}

    # f1: one panel per optimizer
    fig = Figure(figsize=(w, h), dpi=dpi)
    axes = fig.subplots(2, 3, sharex=True, sharey=True)
    X, Y, Z = _grid("f1")
    for ax, (name, (path, _)) in zip(axes.ravel(), results["f1"].items()):
        ax.contour(X, Y, Z, levels=np.geomspace(0.05, 30, 14), cmap="Greys", linewidths=0.8)
        ax.plot(path[:, 0], path[:, 1], "o-", color="tab:red", ms=3, lw=1)
        ax.plot(0, 0, "+", color="k", ms=10)
        ax.set_title(f"{describe(name, 'f1')}\nf = {value('f1', path[-1]):.2g} after "
                     f"{len(path) - 1} steps", fontsize=8 if small else 10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-5, 5)
    for ax in axes[-1]:
        ax.set_xlabel("x")
    for ax in axes[:, 0]:
        ax.set_ylabel("y")
    fig.suptitle(PROBLEMS["f1"]["title"] + ", start (-7, 2); other hyperparameters at "
                 "their defaults")
    fig.tight_layout()
    figs["trajectories_f1.png"] = fig

    # f2: every path on one contour plot
    fig = Figure(figsize=(w, h), dpi=dpi)
    ax = fig.subplots()
    X, Y, Z = _grid("f2")
    cs = ax.contourf(X, Y, Z, levels=20, cmap="Blues", alpha=0.6)
    fig.colorbar(cs, ax=ax, label="f")
    for name, (path, _) in results["f2"].items():
        ax.plot(path[:, 0], path[:, 1], ms=4, lw=1.4, mfc="none", **STYLES[name],
                label=f"{describe(name, 'f2')}: f = {value('f2', path[-1]):.2g}")
    ax.plot(0, 0, "*", color="k", ms=12)
    ax.set_aspect("equal")
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    ax.legend(loc="lower left", fontsize="x-small" if small else "small")
    ax.set_title(PROBLEMS["f2"]["title"] + f", start (3, 4), {len(path) - 1} steps")
    fig.tight_layout()
    figs["trajectories_f2.png"] = fig

    # f1 in 3-D, one panel per optimizer (paths on one surface would hide each other): each
    # path above a wireframe of the surface cropped to where the paths run (an opaque surface
    # would hide them); and f along every path, per step, on the right
    fig = Figure(figsize=(w, h), dpi=dpi)
    grid = fig.add_gridspec(2, 4, width_ratios=(1, 1, 1, 1.25))
    n = 31
    X, Y = np.meshgrid(np.linspace(-8, 2, n), np.linspace(-2.5, 2.5, n))
    Z = value("f1", np.stack([X, Y], axis=-1))
    for k, (name, (path, _)) in enumerate(results["f1"].items()):
        ax = fig.add_subplot(grid[k // 3, k % 3], projection="3d")
        ax.plot_wireframe(X, Y, Z, rstride=2, cstride=2, color="0.55", lw=0.4, alpha=0.5)
        ax.plot(path[:, 0], path[:, 1], value("f1", path), lw=1.2 if small else 1.4,
                ms=1.5 if small else 2.5,
                **dict(STYLES[name], ls="-"))
        ax.view_init(elev=38, azim=-68)
        ax.set_title(describe(name, "f1"), fontsize=7 if small else 9,
                     color=STYLES[name]["color"])
        ax.tick_params(labelsize=6 if small else 7, pad=0)
        ax.set_xlabel("x", fontsize=7, labelpad=-4 if small else 0)
        ax.set_ylabel("y", fontsize=7, labelpad=-4 if small else 0)
        ax.set_zlabel("f", fontsize=7, labelpad=-4 if small else 0)
    curve = fig.add_subplot(grid[:, 3])
    for name, (path, _) in results["f1"].items():
        style = dict(STYLES[name], marker=None)
        curve.plot(np.arange(len(path)), value("f1", path), lw=1.6, **style,
                   label=describe(name, "f1"))
    curve.set_yscale("log")
    curve.set_xlabel("step")
    curve.set_ylabel("f")
    curve.yaxis.set_label_position("right")
    curve.yaxis.tick_right()
    curve.grid(True, alpha=0.3)
    curve.legend(loc="lower left", fontsize="x-small" if small else "small")
    curve.set_title("f along each path", fontsize=10)
    fig.suptitle(PROBLEMS["f1"]["title"] + ", start (-7, 2)")
    fig.subplots_adjust(left=0.03, right=0.95, bottom=0.08, top=0.9, wspace=0.2,
                        hspace=0.18)
    figs["trajectories_3d.png"] = fig
    return figs


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
