"""Property: for any valid arguments, fastopt's schedulers equal torch's step for step (==)."""

import warnings

import pytest

torch = pytest.importorskip("torch", reason="torch is the oracle for scheduler parity")
hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastopt import lr_scheduler as F  # noqa: E402
from test_lr_scheduler import T, assert_same, make_pair  # noqa: E402

STEPS = 80
lrs = st.tuples(st.floats(1e-4, 1.0), st.floats(1e-4, 1.0))
gammas = st.floats(0.01, 1.0)
unit = st.floats(0.0, 1.0)


@st.composite
def scheduler_args(draw):
    """(class name, kwargs, optimizer kind) for one scheduler with random valid arguments."""
    name = draw(st.sampled_from([
        "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
        "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR"]))
    kind = draw(st.sampled_from(["sgd", "adam"]))
    if name == "StepLR":
        kw = {"step_size": draw(st.integers(1, 60)), "gamma": draw(gammas)}
    elif name == "MultiStepLR":
        kw = {"milestones": draw(st.lists(st.integers(0, 100), max_size=6)),
              "gamma": draw(gammas)}
    elif name == "ConstantLR":
        kw = {"factor": draw(st.floats(0.01, 1.0)), "total_iters": draw(st.integers(0, 100))}
    elif name == "LinearLR":
        kw = {"start_factor": draw(st.floats(0.001, 1.0)), "end_factor": draw(unit),
              "total_iters": draw(st.integers(1, 100))}
    elif name == "ExponentialLR":
        kw = {"gamma": draw(st.floats(0.5, 1.0))}
    elif name == "PolynomialLR":
        kw = {"total_iters": draw(st.integers(1, 100)), "power": draw(st.floats(0.1, 3.0))}
    elif name == "CosineAnnealingLR":
        kw = {"T_max": draw(st.integers(1, 100)), "eta_min": draw(st.floats(0.0, 1e-2))}
    elif name == "CosineAnnealingWarmRestarts":
        kw = {"T_0": draw(st.integers(1, 30)), "T_mult": draw(st.integers(1, 3)),
              "eta_min": draw(st.floats(0.0, 1e-2))}
    elif name == "CyclicLR":
        kw = {"base_lr": draw(st.floats(1e-4, 1e-2)), "max_lr": draw(st.floats(1e-2, 1.0)),
              "step_size_up": draw(st.integers(1, 30)),
              "step_size_down": draw(st.none() | st.integers(1, 30)),
              "mode": draw(st.sampled_from(["triangular", "triangular2", "exp_range"])),
              "gamma": draw(st.floats(0.9, 1.0)),
              "base_momentum": draw(st.floats(0.5, 0.85)),
              "max_momentum": draw(st.floats(0.85, 0.99))}
    else:
        kw = {"max_lr": draw(st.floats(0.01, 1.0)), "total_steps": STEPS,
              "pct_start": draw(st.floats(0.05, 0.95)),
              "anneal_strategy": draw(st.sampled_from(["cos", "linear"])),
              "three_phase": draw(st.booleans()),
              "div_factor": draw(st.floats(2.0, 100.0)),
              "final_div_factor": draw(st.floats(10.0, 1e5))}
    return name, kw, kind


def outcome(fn):
    try:
        fn()
    except Exception as exc:  # both libraries must fail the same way
        return type(exc)
    return None


@settings(max_examples=150, deadline=None)
@given(args=scheduler_args(), group_lrs=lrs)
def test_any_arguments_match_torch(args, group_lrs):
    name, kw, kind = args
    topt, fopt = make_pair(kind, group_lrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = getattr(T, name)(topt, **kw)
        fs = getattr(F, name)(fopt, **kw)
        assert_same(ts, fs, topt, fopt, "construction")
        # the optimizers are not stepped: schedules may round to tiny negative lrs (LinearLR
        # to 0, linear three-phase OneCycleLR at total_steps), which torch's step accepts
        for i in range(STEPS):
            t_err, f_err = outcome(ts.step), outcome(fs.step)
            assert f_err == t_err, i
            if t_err is not None:
                break
            assert_same(ts, fs, topt, fopt, i)


@settings(max_examples=60, deadline=None)
@given(args=scheduler_args(), epochs=st.lists(st.integers(0, STEPS - 1), min_size=1,
                                              max_size=20))
def test_any_epoch_jumps_match_torch(args, epochs):
    name, kw, kind = args
    topt, fopt = make_pair(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = getattr(T, name)(topt, **kw)
        fs = getattr(F, name)(fopt, **kw)
        for e in epochs:
            t_err, f_err = outcome(lambda e=e: ts.step(e)), outcome(lambda e=e: fs.step(e))
            assert f_err == t_err
            if t_err is None:
                assert_same(ts, fs, topt, fopt, e)
