"""Learning-rate schedules as pure functions of the step (TensorFlow / optax style).

Each function here returns a :class:`Schedule`: a small callable object mapping a step
(``int`` or ``float``, counted from 0) to the learning rate at that step, as a Python float.
Schedules hold no optimizer and no state beyond their parameters, so they can be tested,
plotted and composed on their own::

    >>> from fastopt import schedules
    >>> s = schedules.exponential_decay(0.1, decay_steps=10, decay_rate=0.5)
    >>> s(0), s(10), s(20)
    (0.1, 0.05, 0.025)

To drive an optimizer with one, use :class:`fastopt.lr_scheduler.FunctionLR`::

    sched = fastopt.lr_scheduler.FunctionLR(opt, schedules.warmup_cosine(0.0, 1e-3, 100, 1000))

A schedule's parameters live in its ``__dict__``, which is what ``FunctionLR.state_dict()``
saves.  Schedules compare equal when they are of the same kind with the same parameters.
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_left, bisect_right
from typing import Callable, Iterable, List, Sequence, Union

__all__ = [
    "SCHEDULES",
    "Schedule",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "join",
    "linear_warmup",
    "piecewise_constant",
    "polynomial_decay",
    "warmup_cosine",
]


def _real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive(name, value):
    if not _real(value) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name, value):
    if not _real(value) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def _number(name, value):
    if not _real(value) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")


class Schedule:
    """Base of all schedules: ``schedule(step) -> float``.

    Subclasses implement ``_at(step)``.  ``values(steps)`` evaluates a sequence of steps.
    """

    kind = "schedule"

    def __call__(self, step: float) -> float:
        return float(self._at(step))

    def _at(self, step):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def values(self, steps: Union[int, Iterable[float]]) -> List[float]:
        """The schedule at each of ``steps`` (an int means ``range(steps)``), as a list."""
        return [self(s) for s in (range(steps) if isinstance(steps, int) else steps)]

    def __eq__(self, other):
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self):
        return hash((type(self).__name__, repr(self)))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{self.kind}({args})"


class _Constant(Schedule):
    kind = "constant"

    def __init__(self, value):
        _number("value", value)
        self.value = value

    def _at(self, step):
        return self.value


class _ExponentialDecay(Schedule):
    kind = "exponential_decay"

    def __init__(self, initial_lr, decay_steps, decay_rate, staircase):
        _number("initial_lr", initial_lr)
        _positive("decay_steps", decay_steps)
        _number("decay_rate", decay_rate)
        self.initial_lr = initial_lr
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = bool(staircase)

    def _at(self, step):
        p = step / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_lr * self.decay_rate**p


class _PiecewiseConstant(Schedule):
    kind = "piecewise_constant"

    def __init__(self, boundaries, values):
        boundaries = list(boundaries)
        values = list(values)
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"values must have one more element than boundaries: got {len(values)} values "
                f"and {len(boundaries)} boundaries"
            )
        for b in boundaries:
            _number("boundaries", b)
        for v in values:
            _number("values", v)
        if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
            raise ValueError(f"boundaries must be strictly increasing, got {boundaries}")
        self.boundaries = boundaries
        self.values_ = values

    def _at(self, step):
        # TensorFlow's convention: values[i] for boundaries[i-1] < step <= boundaries[i]
        return self.values_[bisect_left(self.boundaries, step)]


class _PolynomialDecay(Schedule):
    kind = "polynomial_decay"

    def __init__(self, initial_lr, decay_steps, end_lr, power, cycle):
        _number("initial_lr", initial_lr)
        _positive("decay_steps", decay_steps)
        _number("end_lr", end_lr)
        _number("power", power)
        self.initial_lr = initial_lr
        self.decay_steps = decay_steps
        self.end_lr = end_lr
        self.power = power
        self.cycle = bool(cycle)

    def _at(self, step):
        span = self.decay_steps
        if self.cycle:
            # restart the decay from initial_lr at every multiple of decay_steps
            span = span * (1 if step == 0 else math.ceil(step / span))
        else:
            step = min(step, span)
        return (self.initial_lr - self.end_lr) * (1 - step / span) ** self.power + self.end_lr


class _CosineDecay(Schedule):
    kind = "cosine_decay"

    def __init__(self, initial_lr, decay_steps, alpha):
        _number("initial_lr", initial_lr)
        _positive("decay_steps", decay_steps)
        _number("alpha", alpha)
        self.initial_lr = initial_lr
        self.decay_steps = decay_steps
        self.alpha = alpha

    def _at(self, step):
        done = min(step, self.decay_steps) / self.decay_steps
        cosine = 0.5 * (1 + math.cos(math.pi * done))
        return self.initial_lr * ((1 - self.alpha) * cosine + self.alpha)


class _LinearWarmup(Schedule):
    kind = "linear_warmup"

    def __init__(self, peak_value, warmup_steps, init_value):
        _number("peak_value", peak_value)
        _non_negative("warmup_steps", warmup_steps)
        _number("init_value", init_value)
        self.peak_value = peak_value
        self.warmup_steps = warmup_steps
        self.init_value = init_value

    def _at(self, step):
        if step >= self.warmup_steps:
            return self.peak_value
        t = max(step, 0) / self.warmup_steps
        return self.init_value + (self.peak_value - self.init_value) * t


class _WarmupCosine(Schedule):
    kind = "warmup_cosine"

    def __init__(self, init_value, peak_value, warmup_steps, decay_steps, end_value):
        _number("init_value", init_value)
        _number("peak_value", peak_value)
        _non_negative("warmup_steps", warmup_steps)
        _positive("decay_steps", decay_steps)
        _number("end_value", end_value)
        if not decay_steps > warmup_steps:
            raise ValueError(
                f"decay_steps (the total length, warmup included) must exceed warmup_steps: "
                f"got decay_steps={decay_steps}, warmup_steps={warmup_steps}"
            )
        self.init_value = init_value
        self.peak_value = peak_value
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.end_value = end_value

    def _at(self, step):
        w = self.warmup_steps
        if step < w:
            return self.init_value + (self.peak_value - self.init_value) * (max(step, 0) / w)
        span = self.decay_steps - w
        done = min(step - w, span) / span
        cosine = 0.5 * (1 + math.cos(math.pi * done))
        return self.end_value + (self.peak_value - self.end_value) * cosine


class _Join(Schedule):
    kind = "join"

    def __init__(self, schedules, boundaries):
        schedules = list(schedules)
        boundaries = list(boundaries)
        if not schedules:
            raise ValueError("schedules must hold at least one schedule")
        for i, s in enumerate(schedules):
            if not callable(s):
                raise TypeError(f"schedules[{i}] is not callable: {s!r}")
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                f"boundaries must have one element fewer than schedules: got "
                f"{len(boundaries)} boundaries for {len(schedules)} schedules"
            )
        for b in boundaries:
            _non_negative("boundaries", b)
        if any(b > c for b, c in zip(boundaries, boundaries[1:])):
            raise ValueError(f"boundaries must be non-decreasing, got {boundaries}")
        self.schedules = schedules
        self.boundaries = boundaries

    def _at(self, step):
        i = bisect_right(self.boundaries, step)
        start = self.boundaries[i - 1] if i > 0 else 0
        return self.schedules[i](step - start)

    def __repr__(self):
        return f"join({self.schedules!r}, boundaries={self.boundaries!r})"


# --------------------------------------------------------------------------- public


def constant(value: float) -> Schedule:
    """``lr(step) = value``."""
    return _Constant(value)


def exponential_decay(initial_lr: float, decay_steps: float, decay_rate: float,
                      staircase: bool = False) -> Schedule:
    """TensorFlow's ``ExponentialDecay``: ``initial_lr * decay_rate ** (step / decay_steps)``.

    With ``staircase=True`` the exponent is the integer division ``floor(step / decay_steps)``,
    so the rate drops in steps every ``decay_steps``.
    """
    return _ExponentialDecay(initial_lr, decay_steps, decay_rate, staircase)


def piecewise_constant(boundaries: Sequence[float], values: Sequence[float]) -> Schedule:
    """TensorFlow's ``PiecewiseConstantDecay``.

    ``values[0]`` while ``step <= boundaries[0]``, ``values[i]`` while
    ``boundaries[i-1] < step <= boundaries[i]``, and ``values[-1]`` after the last boundary.
    ``len(values) == len(boundaries) + 1``.
    """
    return _PiecewiseConstant(boundaries, values)


def polynomial_decay(initial_lr: float, decay_steps: float, end_lr: float = 0.0001,
                     power: float = 1.0, cycle: bool = False) -> Schedule:
    """TensorFlow's ``PolynomialDecay``.

    ``(initial_lr - end_lr) * (1 - min(step, decay_steps) / decay_steps) ** power + end_lr``;
    with ``cycle`` the horizon becomes the next multiple of ``decay_steps`` above ``step``.
    """
    return _PolynomialDecay(initial_lr, decay_steps, end_lr, power, cycle)


def cosine_decay(initial_lr: float, decay_steps: float, alpha: float = 0.0) -> Schedule:
    """TensorFlow's ``CosineDecay`` (Loshchilov & Hutter, without restarts).

    ``initial_lr * ((1 - alpha) * c + alpha)`` with
    ``c = (1 + cos(pi * min(step, decay_steps) / decay_steps)) / 2``; ``alpha`` is the final
    fraction of ``initial_lr``.
    """
    return _CosineDecay(initial_lr, decay_steps, alpha)


def linear_warmup(peak_value: float, warmup_steps: float, init_value: float = 0.0) -> Schedule:
    """Linear ramp from ``init_value`` at step 0 to ``peak_value`` at ``warmup_steps``, then
    flat."""
    return _LinearWarmup(peak_value, warmup_steps, init_value)


def warmup_cosine(init_value: float, peak_value: float, warmup_steps: float, decay_steps: float,
                  end_value: float = 0.0) -> Schedule:
    """optax's ``warmup_cosine_decay_schedule``.

    Linear from ``init_value`` to ``peak_value`` over ``warmup_steps``, then a half cosine from
    ``peak_value`` to ``end_value`` ending at step ``decay_steps`` (the total length, warmup
    included), then ``end_value``.
    """
    return _WarmupCosine(init_value, peak_value, warmup_steps, decay_steps, end_value)


def join(schedules: Sequence[Callable[[float], float]], boundaries: Sequence[float]) -> Schedule:
    """One schedule after another (optax's ``join_schedules``).

    ``schedules[i]`` runs from ``boundaries[i-1]`` (inclusive) to ``boundaries[i]`` and is
    evaluated at the step counted from its own start, ``step - boundaries[i-1]``.
    """
    return _Join(schedules, boundaries)


#: The schedule functions by name (for the ``schedule`` command and tests).
SCHEDULES = {
    f.__name__: f
    for f in (
        constant,
        exponential_decay,
        piecewise_constant,
        polynomial_decay,
        cosine_decay,
        linear_warmup,
        warmup_cosine,
        join,
    )
}
