"""See a learning-rate schedule before training with it.

:func:`lr_trace` runs any scheduler or schedule function for a number of steps and returns the
learning rate (and the momentum, where the scheduler cycles it) used at each step; it needs
nothing but fastopt.  :func:`lr_curve` draws one or several traces on one figure with
matplotlib, the optional ``plot`` extra (``pip install "fastopt[plot]"``).

A scheduler is traced from its current state and then put back exactly as it was (its
``state_dict`` and every param group value are restored), so tracing it before training
does not consume any of the schedule.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Union

from fastopt.lr_scheduler import LRScheduler, ReduceLROnPlateau, _set_group_value

__all__ = ["lr_curve", "lr_trace"]

_MISSING_MATPLOTLIB = (
    "fastopt.plot.lr_curve needs matplotlib, which is not installed. Install the optional "
    'extra with: pip install "fastopt[plot]"'
)


def _cycles_momentum(sched):
    if getattr(sched, "cycle_momentum", False):
        return True
    return any(_cycles_momentum(s) for s in getattr(sched, "_schedulers", ()))


def _momenta(groups):
    return [g["betas"][0] if "betas" in g else g.get("momentum") for g in groups]


def _snapshot_groups(optimizer):
    return [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups]


def _restore_groups(optimizer, saved):
    for group, values in zip(optimizer.param_groups, saved):
        for key in [k for k in group if k != "params" and k not in values]:
            del group[key]
        for key, value in values.items():
            if key in group:
                _set_group_value(group, key, value)
            else:
                group[key] = value


def _trace_scheduler(sched, steps, metrics):
    opt = sched.optimizer
    if isinstance(sched, ReduceLROnPlateau):
        if metrics is None:
            raise TypeError("tracing ReduceLROnPlateau needs metrics: one value per step")
        metrics = list(metrics)
        if len(metrics) < steps - 1:
            raise ValueError(
                f"metrics holds {len(metrics)} values; tracing {steps} steps needs {steps - 1}"
            )
    saved_state = sched.state_dict()
    saved_groups = _snapshot_groups(opt)
    with_momentum = _cycles_momentum(sched)
    lrs, moms = [], []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in range(steps):
                lrs.append([float(v) for v in sched.get_last_lr()])
                if with_momentum:
                    moms.append(_momenta(opt.param_groups))
                if t == steps - 1:
                    break
                if isinstance(sched, ReduceLROnPlateau):
                    sched.step(metrics[t])
                else:
                    sched.step()
    finally:
        sched.load_state_dict(saved_state)
        _restore_groups(opt, saved_groups)
    return lrs, (moms if with_momentum else None)


def lr_trace(schedule: Union[LRScheduler, Callable[[int], float]], steps: int,
             metrics: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """The learning rate at each of ``steps`` steps.

    Parameters
    ----------
    schedule : LRScheduler or callable
        A scheduler (traced from its current state, then restored) or a function of the step
        such as those in :mod:`fastopt.schedules`.
    steps : int
        Number of steps to record, step 0 included.
    metrics : sequence of float, optional
        The monitored values fed to a :class:`~fastopt.lr_scheduler.ReduceLROnPlateau`.

    Returns
    -------
    dict
        ``"lr"``: one list per step with one value per param group; ``"momentum"``: the same
        shape for the momentum (or ``betas[0]``) when the scheduler cycles it, else ``None``.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(schedule, LRScheduler):
        lrs, moms = _trace_scheduler(schedule, steps, metrics)
        return {"lr": lrs, "momentum": moms}
    if callable(schedule):
        return {"lr": [[float(schedule(t))] for t in range(steps)], "momentum": None}
    raise TypeError(
        f"expected a learning-rate scheduler or a function of the step, got "
        f"{type(schedule).__name__}"
    )


def _default_label(schedule):
    if isinstance(schedule, LRScheduler):
        return type(schedule).__name__
    kind = getattr(schedule, "kind", None)
    if kind:
        return kind
    return getattr(schedule, "__name__", type(schedule).__name__)


def lr_curve(*schedules: Any, steps: int = 100, labels: Optional[Sequence[str]] = None,
             metrics: Optional[Sequence[float]] = None, momentum: bool = True, ax: Any = None,
             path: Union[str, os.PathLike[str], None] = None, width: int = 800, height: int = 500,
             dpi: int = 100, title: Optional[str] = None, logy: bool = False) -> Any:
    """Draw the learning rate per step of one or several schedulers or schedule functions.

    Parameters
    ----------
    *schedules : LRScheduler or callable (or one list of them)
        What to draw; each param group of a scheduler is its own line.
    steps : int
        Steps to draw, from 0.
    labels : list of str, optional
        One legend label per schedule (default: the class or schedule name).
    metrics : sequence of float, optional
        Metric values for any ReduceLROnPlateau among ``schedules``.
    momentum : bool
        Draw cycled momentum (CyclicLR, OneCycleLR) in a second panel below.
    ax : matplotlib Axes, optional
        Draw into it instead of a new figure (momentum then goes to a twin y-axis).
    path : str or path-like, optional
        Also save the figure there (PNG, or any format matplotlib knows from the suffix).
    width, height, dpi : int
        Size of a new figure, in pixels at ``dpi`` dots per inch.
    title : str, optional
    logy : bool
        Logarithmic lr axis.

    Returns
    -------
    matplotlib.figure.Figure
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_MISSING_MATPLOTLIB) from exc

    if len(schedules) == 1 and isinstance(schedules[0], (list, tuple)):
        schedules = tuple(schedules[0])
    if not schedules:
        raise TypeError("lr_curve needs at least one scheduler or schedule function")
    if labels is not None and len(labels) != len(schedules):
        raise ValueError(f"got {len(labels)} labels for {len(schedules)} schedules")
    for name, value in (("width", width), ("height", height), ("dpi", dpi)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    traces = [lr_trace(s, steps, metrics) for s in schedules]
    names = list(labels) if labels is not None else [_default_label(s) for s in schedules]
    show_momentum = momentum and any(t["momentum"] is not None for t in traces)

    if ax is None:
        fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
        if show_momentum:
            lr_ax, mom_ax = fig.subplots(
                2, 1, sharex=True, gridspec_kw={"height_ratios": (2, 1)}
            )
        else:
            lr_ax, mom_ax = fig.subplots(), None
    else:
        fig = ax.figure
        lr_ax = ax
        mom_ax = ax.twinx() if show_momentum else None

    x = list(range(steps))
    for trace, name in zip(traces, names):
        n_groups = len(trace["lr"][0])
        for g in range(n_groups):
            label = name if n_groups == 1 else f"{name} [group {g}]"
            lr_ax.plot(x, [row[g] for row in trace["lr"]], label=label)
            if mom_ax is not None and trace["momentum"] is not None:
                mom_ax.plot(x, [row[g] for row in trace["momentum"]], linestyle="--",
                            label=f"{label} momentum")
    lr_ax.set_ylabel("learning rate")
    if logy:
        lr_ax.set_yscale("log")
    lr_ax.grid(True, alpha=0.3)
    lr_ax.legend(loc="best", fontsize="small")
    if title:
        lr_ax.set_title(title)
    if mom_ax is not None:
        mom_ax.set_ylabel("momentum")
        if ax is None:
            mom_ax.grid(True, alpha=0.3)
            mom_ax.set_xlabel("step")
            mom_ax.legend(loc="best", fontsize="small")
    else:
        lr_ax.set_xlabel("step")
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
