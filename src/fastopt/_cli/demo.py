"""``python -m fastopt demo [--out DIR] [--quick]``: the classic optimizer comparisons.

Runs two of the example programs, ``examples/trajectories.py`` and ``examples/linear_fit.py``,
and a gallery of learning-rate schedules, and prints one summary table (final loss per
optimizer, time per ``step()``):

* paths of SGD, Momentum, Nesterov, Adagrad, RMSprop and Adam on the quadratics
  f(x, y) = x^2/20 + y^2 from (-7, 2) and f(x1, x2) = 0.2 x1^2 + 2 x2^2 from (3, 4), 30 steps;
* minibatch linear regression (1000 x 2 inputs, batch 64, 30 epochs) with SGD, Momentum,
  Nesterov, Adagrad, RMSprop and Adam;
* a gallery of learning-rate schedules.

The example programs are the one source of these experiments: the wheel installs
``examples/`` as ``fastopt.examples`` (``wheel.packages`` in pyproject.toml), and the demo
calls their functions. With matplotlib (the ``plot`` extra) it writes ``trajectories_f1.png``,
``trajectories_f2.png``, ``trajectories_3d.png``, ``linear_fit.png`` and ``schedules.png``
to DIR; without it, it prints the tables and says how to get the pictures.
"""
import os
import time

import numpy as np

import fastopt
from fastopt import lr_scheduler as S

__all__ = ["DESCRIPTION", "configure", "run", "schedule_gallery"]

DESCRIPTION = ("Optimizer paths on two quadratics, a minibatch linear fit and a schedule "
               "gallery: prints a summary table and writes PNGs.")
PLOT_HINT = ('matplotlib is not installed, so no pictures were drawn; install the plot '
             'extra to get them: pip install "fastopt[plot]"')


def examples():
    """The example programs the demo runs: ``(trajectories, linear_fit)`` modules."""
    from fastopt.examples import linear_fit, trajectories

    return trajectories, linear_fit


# --------------------------------------------------------------------------- schedules


def schedule_gallery(steps=100):
    """``[(title, scheduler)]``: one fresh scheduler per panel, on a one-element SGD."""

    def opt(lr=0.1, momentum=0.9):
        return fastopt.SGD([fastopt.Parameter(np.zeros(1))], lr=lr, momentum=momentum)

    warm = max(1, steps // 10)

    def warmup_cosine():
        o = opt()
        return S.SequentialLR(o, [S.LinearLR(o, 0.01, total_iters=warm),
                                  S.CosineAnnealingLR(o, T_max=steps - warm)], [warm])

    milestones = [steps // 2, 3 * steps // 4]
    t0 = steps // 7
    up = steps // 8
    return [
        (f"StepLR(step_size={steps // 4}, gamma=0.5)",
         S.StepLR(opt(), step_size=steps // 4, gamma=0.5)),
        (f"MultiStepLR(milestones={milestones}, gamma=0.1)",
         S.MultiStepLR(opt(), milestones=milestones, gamma=0.1)),
        ("ExponentialLR(gamma=0.97)", S.ExponentialLR(opt(), gamma=0.97)),
        (f"CosineAnnealingLR(T_max={steps})", S.CosineAnnealingLR(opt(), T_max=steps)),
        (f"CosineAnnealingWarmRestarts(T_0={t0}, T_mult=2)",
         S.CosineAnnealingWarmRestarts(opt(), T_0=t0, T_mult=2)),
        (f"PolynomialLR(total_iters={steps}, power=2)",
         S.PolynomialLR(opt(), total_iters=steps, power=2.0)),
        (f"warm-up {warm} steps, then CosineAnnealingLR(T_max={steps - warm})",
         warmup_cosine()),
        (f"CyclicLR(0.01 to 0.1, step_size_up={up}, triangular2)",
         S.CyclicLR(opt(), base_lr=0.01, max_lr=0.1, step_size_up=up, mode="triangular2")),
        (f"OneCycleLR(max_lr=0.1, total_steps={steps + 1})",
         S.OneCycleLR(opt(), max_lr=0.1, total_steps=steps + 1)),
    ]


def _plot_gallery(gallery, path, steps, size, dpi=100):
    _gallery_figure(gallery, steps, size, dpi).savefig(path, dpi=dpi)
    return path


def _gallery_figure(gallery, steps, size, dpi=100):
    from matplotlib.figure import Figure

    from fastopt.plot import lr_curve

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    grid = fig.subplots(3, 3, sharex=True)
    small = size[0] < 1200
    for ax, (title, sched) in zip(grid.ravel(), gallery):
        lr_curve(sched, steps=steps, ax=ax, momentum=False, labels=[title])
        ax.set_title(title, fontsize=7 if small else 9)
        ax.legend().remove()
        ax.set_xlabel("")
        ax.tick_params(labelsize=7 if small else 9)
        ax.yaxis.label.set_fontsize(8 if small else 10)
    for ax in grid[-1]:
        ax.set_xlabel("step (scheduler.step() calls)", fontsize=8 if small else 10)
    fig.suptitle(f"learning-rate schedules over {steps} steps, SGD(lr=0.1, momentum=0.9)")
    fig.tight_layout()
    return fig


def _summary(traj, fit, value):
    names = list(dict.fromkeys([*traj["f1"], *fit]))
    head = (f"{'optimizer':<10} {'final f1':>10} {'final f2':>10} {'fit loss':>10} "
            f"{'us/step':>8}")
    lines = [head, "-" * len(head)]
    for name in names:
        cells, times = [], []
        for problem in traj:
            if name in traj[problem]:
                path, sec = traj[problem][name]
                cells.append(f"{value(problem, path[-1]):>10.3e}")
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


def configure(parser):
    """Add the arguments of ``demo`` to ``parser``; ``run`` is its action."""
    parser.add_argument("--out", default="fastopt-demo", metavar="DIR",
                        help="directory for the PNGs (default: ./fastopt-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="shorter schedules and smaller pictures (for CI)")
    parser.set_defaults(run=run)
    return parser


def run(args):
    """Run the demo from the parsed arguments; returns the exit status."""
    trajectories, linear_fit = examples()
    epochs = 30  # the fit takes well under a second; --quick only shrinks the rest
    gallery_steps = 100 if args.quick else 300
    t0 = time.perf_counter()
    traj = trajectories.run_all(30)
    fit = linear_fit.run_all(epochs=epochs)
    gallery = schedule_gallery(gallery_steps)
    print(f"fastopt {fastopt.__version__} demo: 30 steps on f1 = x²/20 + y² from (-7, 2) and "
          f"f2 = 0.2 x₁² + 2 x₂² from (3, 4); linear fit: 1000 x 2, batch 64, {epochs} "
          f"epochs (loss on all samples after the last epoch)\n")
    print(_summary(traj, fit, trajectories.value))

    from fastopt.plot import lr_trace

    print(f"\nlearning-rate schedules ({gallery_steps} steps, lr 0.1): lr at steps "
          f"0, 1/4, 1/2, 3/4, end")
    marks = [0, gallery_steps // 4, gallery_steps // 2, 3 * gallery_steps // 4,
             gallery_steps - 1]
    width = max(len(title) for title, _ in gallery) + 2
    for title, sched in gallery:
        lrs = lr_trace(sched, gallery_steps)["lr"]
        print(f"  {title:<{width}}" + "".join(f"{lrs[m][0]:>10.2e}" for m in marks))

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("\n" + PLOT_HINT)
        return 0
    os.makedirs(args.out, exist_ok=True)
    files = trajectories.plot(traj, args.out, size=(900, 540) if args.quick else (1500, 900))
    files.append(linear_fit.plot(fit, os.path.join(args.out, "linear_fit.png"),
                                 size=(900, 360) if args.quick else (1400, 550)))
    files.append(_plot_gallery(gallery, os.path.join(args.out, "schedules.png"),
                               gallery_steps, (900, 700) if args.quick else (1400, 1000)))
    print()
    for f in files:
        print("wrote", f)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
