"""fastopt.schedules: pure schedule functions, and FunctionLR driving optimizers with them."""

import math
import pickle
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import schedules as S
from fastopt.lr_scheduler import FunctionLR, LambdaLR


def sgd(lr=0.1, x0=5.0):
    x = fastopt.Parameter(np.array([x0]))
    return x, fastopt.SGD([x], lr=lr)


# ------------------------------------------------------------------ values


def test_constant():
    s = S.constant(0.3)
    assert s.values(4) == [0.3] * 4
    assert s(1e9) == 0.3


def test_exponential_decay_is_tensorflows_formula():
    s = S.exponential_decay(0.1, decay_steps=10, decay_rate=0.5)
    assert s(0) == 0.1
    assert s(10) == 0.05
    assert s(20) == 0.025
    assert s(5) == 0.1 * 0.5**0.5
    for step in range(0, 200, 7):
        assert s(step) == 0.1 * 0.5 ** (step / 10)


def test_exponential_decay_staircase_uses_integer_division():
    s = S.exponential_decay(1.0, 4, 0.1, staircase=True)
    assert s.values(13) == [1.0] * 4 + [0.1] * 4 + [0.1**2] * 4 + [0.1**3]
    assert s(7.9) == 0.1


def test_piecewise_constant_tensorflow_boundaries():
    s = S.piecewise_constant([100, 110], [1.0, 0.5, 0.1])
    assert [s(x) for x in (0, 100, 100.5, 101, 110, 111, 10**6)] == [
        1.0, 1.0, 0.5, 0.5, 0.5, 0.1, 0.1]


def test_polynomial_decay():
    s = S.polynomial_decay(0.1, 100, end_lr=0.01, power=2.0)
    assert s(0) == 0.1
    assert s(50) == (0.1 - 0.01) * 0.5**2 + 0.01
    assert s(100) == s(150) == 0.01
    lin = S.polynomial_decay(1.0, 10)
    assert lin(5) == pytest.approx(0.5 * (1 - 0.0001) + 0.0001, rel=1e-15)


def test_polynomial_decay_cycle_restarts():
    s = S.polynomial_decay(1.0, 10, end_lr=0.0, cycle=True)
    assert s(0) == 1.0
    assert s(5) == 0.5
    assert s(10) == 0.0
    assert s(15) == pytest.approx(0.25)  # horizon 20
    assert s(20) == 0.0


def test_cosine_decay():
    s = S.cosine_decay(2.0, 100, alpha=0.1)
    assert s(0) == 2.0
    assert s(50) == pytest.approx(2.0 * (0.9 * 0.5 + 0.1), rel=1e-15)
    assert s(100) == pytest.approx(0.2, rel=1e-15)
    assert s(1000) == s(100)
    values = s.values(101)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_warmup():
    s = S.linear_warmup(1.0, 4)
    assert s.values(7) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert S.linear_warmup(0.3, 0)(0) == 0.3
    assert S.linear_warmup(1.0, 2, init_value=0.5).values(3) == [0.5, 0.75, 1.0]


def test_warmup_cosine_matches_optax_definition():
    s = S.warmup_cosine(0.0, 1.0, warmup_steps=10, decay_steps=110, end_value=0.1)
    assert s(0) == 0.0
    assert s(5) == 0.5
    assert s(10) == 1.0
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-15)
    assert s(110) == pytest.approx(0.1, rel=1e-15)
    assert s(500) == s(110)


def test_join_counts_steps_from_each_start():
    warm = S.linear_warmup(1.0, 5)
    decay = S.exponential_decay(1.0, 10, 0.5)
    s = S.join([warm, decay], [5])
    assert s.values(5) == warm.values(5)
    assert [s(5 + k) for k in range(30)] == decay.values(30)
    three = S.join([S.constant(1.0), S.constant(2.0), S.constant(3.0)], [2, 2])
    assert three.values(4) == [1.0, 1.0, 3.0, 3.0]
    assert S.join([S.constant(7.0)], [])(123) == 7.0


def test_join_with_plain_functions():
    s = S.join([lambda t: 0.1 * t, lambda t: 1.0 / (1 + t)], [10])
    assert s(9) == pytest.approx(0.9)
    assert s(10) == 1.0
    assert s(13) == 0.25


def test_schedules_are_pickle_and_compare_by_parameters():
    s = S.join([S.linear_warmup(0.1, 5), S.cosine_decay(0.1, 50)], [5])
    t = pickle.loads(pickle.dumps(s))
    assert t == s and t.values(60) == s.values(60)
    assert S.constant(1.0) != S.constant(2.0)
    assert "cosine_decay" in repr(s)


BAD = [
    (lambda: S.exponential_decay(0.1, 0, 0.5), ValueError, "decay_steps"),
    (lambda: S.exponential_decay(0.1, -3, 0.5), ValueError, "decay_steps"),
    (lambda: S.exponential_decay("0.1", 10, 0.5), TypeError, "initial_lr"),
    (lambda: S.piecewise_constant([1, 2], [1.0]), ValueError, "values"),
    (lambda: S.piecewise_constant([2, 1], [1.0, 2.0, 3.0]), ValueError, "boundaries"),
    (lambda: S.polynomial_decay(0.1, 0), ValueError, "decay_steps"),
    (lambda: S.cosine_decay(0.1, float("nan")), ValueError, "decay_steps"),
    (lambda: S.linear_warmup(0.1, -1), ValueError, "warmup_steps"),
    (lambda: S.warmup_cosine(0.0, 1.0, 10, 10), ValueError, "decay_steps"),
    (lambda: S.constant(None), TypeError, "value"),
    (lambda: S.join([], []), ValueError, "schedules"),
    (lambda: S.join([S.constant(1.0)], [3]), ValueError, "boundaries"),
    (lambda: S.join([S.constant(1.0), 3], [3]), TypeError, "schedules"),
    (lambda: S.join([S.constant(1.0)] * 3, [5, 2]), ValueError, "boundaries"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_registry_lists_every_function():
    assert set(S.SCHEDULES) == {
        "constant", "exponential_decay", "piecewise_constant", "polynomial_decay",
        "cosine_decay", "linear_warmup", "warmup_cosine", "join"}


# ------------------------------------------------------------------ FunctionLR


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_decay_drives_sgd_on_a_parabola(staircase):
    """y = x^2 from x = 5 with plain SGD: x <- x - lr_t * 2x, lr_t from TF's formula."""
    x, opt = sgd()
    sched = FunctionLR(opt, S.exponential_decay(0.1, 10, 0.5, staircase=staircase))
    expected = 5.0
    for t in range(60):
        lr = 0.1 * 0.5 ** ((t // 10) if staircase else (t / 10))
        assert opt.param_groups[0]["lr"] == lr
        x.grad = 2 * np.asarray(x, dtype=np.float64).copy()
        opt.step()
        sched.step()
        expected = expected - lr * (2 * expected)
        assert x[0] == pytest.approx(expected, rel=1e-13)
    # every step shrinks x towards the minimum (lr < 0.5), ever more slowly as lr decays
    assert 0 < x[0] < 0.25


def test_function_lr_equals_lambda_lr_for_a_scaled_schedule():
    _, opt = sgd(lr=1.0)
    _, opt2 = sgd(lr=1.0)
    s = S.cosine_decay(1.0, 40)
    a = FunctionLR(opt, s)
    b = LambdaLR(opt2, s)
    for _ in range(50):
        opt.step(), opt2.step(), a.step(), b.step()
        assert a.get_last_lr() == b.get_last_lr()


def test_function_lr_per_group_and_closed_form():
    p, q = fastopt.Parameter(np.zeros(2)), fastopt.Parameter(np.zeros(2))
    opt = fastopt.SGD([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=0.1)
    fs = [S.linear_warmup(0.1, 10), S.piecewise_constant([3], [0.5, 0.05])]
    sched = FunctionLR(opt, fs)
    assert sched.base_lrs == [0.1, 0.5]
    assert sched.get_last_lr() == [0.0, 0.5]
    opt.step()
    for t in range(1, 20):
        sched.step()
        assert sched.get_last_lr() == [fs[0](t), fs[1](t)]
    with pytest.warns(UserWarning, match="deprecated"):
        sched.step(5)
    assert sched.get_last_lr() == [fs[0](5), fs[1](5)]
    assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr()


def test_function_lr_state_dict_round_trip():
    _, opt = sgd()
    sched = FunctionLR(opt, S.warmup_cosine(0.0, 0.1, 5, 50))
    opt.step()
    for _ in range(17):
        sched.step()
    sd = sched.state_dict()
    assert sd["schedules"] == [sched.schedules[0].__dict__]
    assert sd["_scheduler_class"] == "FunctionLR"
    # a scheduler built with other parameters takes the saved ones back
    _, opt2 = sgd()
    other = FunctionLR(opt2, S.warmup_cosine(0.0, 0.9, 1, 3))
    other.load_state_dict(sd)
    assert other.schedules[0] == sched.schedules[0]
    assert other.last_epoch == 17
    for _ in range(40):
        sched.step(), other.step()
        assert other.get_last_lr() == sched.get_last_lr()


def test_function_lr_lambda_is_not_saved():
    _, opt = sgd()
    sched = FunctionLR(opt, lambda t: 0.1 / (1 + t))
    assert sched.state_dict()["schedules"] == [None]
    _, opt2 = sgd()
    again = FunctionLR(opt2, lambda t: 0.1 / (1 + t))
    again.load_state_dict(sched.state_dict())
    opt2.step()
    again.step()
    assert again.get_last_lr() == [0.1 / 2]


def test_function_lr_rejects_bad_input():
    _, opt = sgd()
    with pytest.raises(TypeError, match="schedule"):
        FunctionLR(opt, 0.1)
    with pytest.raises(ValueError, match="schedule"):
        FunctionLR(opt, [S.constant(1.0), S.constant(2.0)])
    with pytest.raises(TypeError, match="Optimizer"):
        FunctionLR(object(), S.constant(1.0))
    sched = FunctionLR(opt, S.constant(1.0))
    before = sched.state_dict()
    bad = dict(before)
    bad["schedules"] = [None, None]
    with pytest.raises(ValueError, match="schedules"):
        sched.load_state_dict(bad)
    assert sched.state_dict() == before


def test_a_schedule_needs_no_optimizer_and_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = S.warmup_cosine(0.0, 1.0, 3, 30)
        assert len(s.values(range(0, 40, 2))) == 20
        assert math.isclose(s(30), 0.0, abs_tol=1e-15)
