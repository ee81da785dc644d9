"""Scheduler state dicts with bad values are refused before anything changes, and a step
that raises changes nothing: every class of fastopt.lr_scheduler and swa_utils.SWALR."""
import copy
import math
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import lr_scheduler as L
from fastopt import swa_utils

FACTORIES = {
    "LambdaLR": lambda o: L.LambdaLR(o, lambda e: 0.9 ** e),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda e: 0.9),
    "StepLR": lambda o: L.StepLR(o, 2, 0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, [2, 4], 0.5),
    "ConstantLR": lambda o: L.ConstantLR(o, 0.5, 3),
    "LinearLR": lambda o: L.LinearLR(o, 0.5, 1.0, 4),
    "ExponentialLR": lambda o: L.ExponentialLR(o, 0.9),
    "PolynomialLR": lambda o: L.PolynomialLR(o, 6, 2.0),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, 5, 0.001),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, 3, 2),
    "CyclicLR": lambda o: L.CyclicLR(o, 0.01, 0.1, 2),
    "OneCycleLR": lambda o: L.OneCycleLR(o, 0.1, total_steps=20),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=1),
    "SequentialLR": lambda o: L.SequentialLR(o, [L.ConstantLR(o, 0.5, 2),
                                                 L.ExponentialLR(o, 0.9)], [2]),
    "ChainedScheduler": lambda o: L.ChainedScheduler([L.ConstantLR(o, 0.5, 2),
                                                      L.ExponentialLR(o, 0.9)]),
    "FunctionLR": lambda o: L.FunctionLR(o, lambda e: 0.1 / (1 + e)),
    "SWALR": lambda o: swa_utils.SWALR(o, 0.05, anneal_epochs=3),
}


def test_every_scheduler_class_has_a_factory():
    assert set(FACTORIES) == set(L.SCHEDULERS) | {"SWALR"}


def _opt(groups=2):
    return fastopt.SGD([{"params": [fastopt.Parameter(np.zeros(2))], "lr": 0.1 * (i + 1)}
                        for i in range(groups)], lr=0.1, momentum=0.9)


def _step(sched, k=0):
    sched.optimizer.step()
    if isinstance(sched, L.ReduceLROnPlateau):
        sched.step(1.0 + k % 2)
    else:
        sched.step()


def _trained(name, steps=3):
    opt = _opt()
    sched = FACTORIES[name](opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(steps):
            _step(sched, k)
    return sched


def _lrs(opt):
    return [(g["lr"], g.get("momentum")) for g in opt.param_groups]


def _refused(name, mutate, error, match):
    """Load a mutated copy of a trained state into a trained scheduler: it must raise and
    leave the scheduler and the optimizer's groups as they were."""
    saved = _trained(name, 5).state_dict()
    sched = _trained(name, 2)
    before, lrs = sched.state_dict(), _lrs(sched.optimizer)
    bad = copy.deepcopy(saved)
    mutate(bad)
    with pytest.raises(error, match=match):
        sched.load_state_dict(bad)
    assert sched.state_dict() == before and _lrs(sched.optimizer) == lrs


WITH_LAST_EPOCH = [n for n in FACTORIES if n != "ChainedScheduler"]
WITH_BASE_LRS = [n for n in FACTORIES if n not in ("ChainedScheduler", "SequentialLR",
                                                   "ReduceLROnPlateau")]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "3", None, True, [3]], ids=repr)
@pytest.mark.parametrize("name", WITH_LAST_EPOCH)
def test_a_last_epoch_that_is_no_finite_number_is_refused(name, value):
    """torch loads NaN (and its next step writes lr = nan), "3" and None (its next step
    fails after the counters moved)."""
    _refused(name, lambda sd: sd.__setitem__("last_epoch", value), (TypeError, ValueError),
             r"state_dict\['last_epoch'\] must be (a real number|finite)")


@pytest.mark.parametrize("name", WITH_BASE_LRS)
def test_base_lrs_must_hold_one_finite_number_per_group(name):
    _refused(name, lambda sd: sd["base_lrs"].append(0.5), ValueError,
             r"state_dict\['base_lrs'\] has 3 values, the scheduler holds 2")
    _refused(name, lambda sd: sd.__setitem__("base_lrs", sd["base_lrs"][:1]), ValueError,
             r"state_dict\['base_lrs'\] has 1 values")
    _refused(name, lambda sd: sd["base_lrs"].__setitem__(1, float("nan")), ValueError,
             r"state_dict\['base_lrs'\]\[1\] must be finite, got nan")
    _refused(name, lambda sd: sd["base_lrs"].__setitem__(0, "0.1"), TypeError,
             r"state_dict\['base_lrs'\]\[0\] must be a real number, got str")
    _refused(name, lambda sd: sd.__setitem__("base_lrs", 0.1), TypeError,
             r"state_dict\['base_lrs'\] must be a list with one value per param group")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_last_lr_must_hold_one_number_per_group(name):
    _refused(name, lambda sd: sd.__setitem__("_last_lr", [0.1]), ValueError,
             r"state_dict\['_last_lr'\] has 1 values, the scheduler holds 2")


@pytest.mark.parametrize("name", [n for n in WITH_BASE_LRS])
def test_the_step_count_must_be_an_int(name):
    for value in (1.5, "2", None, -1):
        _refused(name, lambda sd: sd.__setitem__("_step_count", value), (TypeError, ValueError),
                 r"state_dict\['_step_count'\] must be (an int|>= 0)")


@pytest.mark.parametrize("name,key,value,match", [
    ("StepLR", "gamma", "0.5", r"state_dict\['gamma'\] must be a real number, got str"),
    ("StepLR", "gamma", float("nan"), r"state_dict\['gamma'\] must be finite, got nan"),
    ("CosineAnnealingLR", "T_max", None, r"state_dict\['T_max'\] must be a real number"),
    ("LinearLR", "_is_initial", "no", r"state_dict\['_is_initial'\] must be a bool"),
    ("MultiStepLR", "milestones", [2, 4], r"state_dict\['milestones'\] must be a dict"),
    ("CosineAnnealingWarmRestarts", "T_cur", float("nan"), r"state_dict\['T_cur'\] must be "
                                                           r"finite"),
    ("CosineAnnealingWarmRestarts", "T_mult", 1.5, r"state_dict\['T_mult'\] must be an int"),
    ("CyclicLR", "mode", "sawtooth", r"state_dict\['mode'\] must be 'triangular'"),
    ("CyclicLR", "scale_mode", "epochs", r"state_dict\['scale_mode'\] must be one of"),
    ("CyclicLR", "max_momentums", [0.9], r"state_dict\['max_momentums'\] has 1 values"),
    ("CyclicLR", "_scale_fn_custom", [1], r"state_dict\['_scale_fn_custom'\] must be None or"),
    ("OneCycleLR", "_anneal_func_type", "exp", r"state_dict\['_anneal_func_type'\] must be one"),
    ("OneCycleLR", "total_steps", 0, r"state_dict\['total_steps'\] must be >= 1"),
    ("ReduceLROnPlateau", "mode", "median", r"state_dict\['mode'\] must be 'min' or 'max'"),
    ("ReduceLROnPlateau", "threshold_mode", "log", r"state_dict\['threshold_mode'\] must be "),
    ("ReduceLROnPlateau", "min_lrs", [0, 0, 0], r"state_dict\['min_lrs'\] has 3 values"),
    ("ReduceLROnPlateau", "best", "low", r"state_dict\['best'\] must be a real number"),
    ("SWALR", "_anneal_strategy", "exp", r"state_dict\['_anneal_strategy'\] must be one of"),
    ("SWALR", "anneal_epochs", -2, r"state_dict\['anneal_epochs'\] must be >= 0"),
    ("LambdaLR", "lr_lambdas", [None, 3], r"state_dict\['lr_lambdas'\]\[1\] must be None or"),
    ("FunctionLR", "schedules", ["x", None], r"state_dict\['schedules'\]\[0\] must be None"),
])
def test_a_value_of_the_wrong_kind_is_refused_with_its_key(name, key, value, match):
    """The mode cases loaded half before (ReduceLROnPlateau raised after applying)."""
    _refused(name, lambda sd: sd.__setitem__(key, value), (TypeError, ValueError), match)


@pytest.mark.parametrize("name", ["SequentialLR", "ChainedScheduler"])
def test_a_bad_value_inside_a_composite_is_named_with_its_position(name):
    _refused(name, lambda sd: sd["_schedulers"][1].__setitem__("last_epoch", float("nan")),
             ValueError, r"state_dict\['_schedulers'\]\[1\]: state_dict\['last_epoch'\] must "
                         r"be finite")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_trained_state_still_loads_and_continues_the_same(name):
    ref = _trained(name, 6)
    src = _trained(name, 3)
    other = _trained(name, 1)
    # chainable schedulers continue from the optimizer's lrs: load the optimizer too
    other.optimizer.load_state_dict(copy.deepcopy(src.optimizer.state_dict()))
    other.load_state_dict(copy.deepcopy(src.state_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(3, 6):
            _step(other, k)
    # the optimizers' own lrs are not in a scheduler state, so compare what it computed
    assert other.state_dict()["_last_lr"] == ref.state_dict()["_last_lr"]


def test_a_saved_nullable_or_numpy_value_loads():
    sched = _trained("ReduceLROnPlateau")
    sd = sched.state_dict()
    sd["default_min_lr"] = None
    sd["best"] = np.float64(0.5)
    sd["last_epoch"] = np.int64(4)
    sched.load_state_dict(sd)
    assert sched.best == 0.5 and sched.last_epoch == 4


# ---- a step that raises changes nothing ---------------------------------------------------

def fails_once(at, value=lambda e: 0.8 ** e):
    """A factor function that raises the first time it sees epoch ``at`` (a plain function:
    scheduler state dicts save nothing of it)."""
    failed = []

    def factor(e):
        if e == at and not failed:
            failed.append(e)
            raise RuntimeError(f"no factor for epoch {e}")
        return value(e)

    return factor


def _observed(sched):
    return (sched.state_dict(), list(sched.get_last_lr()), _lrs(sched.optimizer))


COMPOSED = {
    "LambdaLR": lambda o, f: L.LambdaLR(o, f),
    "MultiplicativeLR": lambda o, f: L.MultiplicativeLR(o, f),
    "ChainedScheduler": lambda o, f: L.ChainedScheduler([L.ExponentialLR(o, 0.9),
                                                         L.LambdaLR(o, f)]),
    "SequentialLR": lambda o, f: L.SequentialLR(o, [L.ConstantLR(o, 0.5, 1),
                                                    L.MultiplicativeLR(o, f)], [1]),
    "FunctionLR": lambda o, f: L.FunctionLR(o, lambda e: 0.1 * f(e)),
}


@pytest.mark.parametrize("name", list(COMPOSED))
def test_a_step_whose_lambda_raises_changes_nothing_and_a_later_step_works(name):
    """torch advances last_epoch (and _step_count) before the lambda raises."""
    opt = _opt()
    # the failing epoch 3 of the run is epoch 2 of SequentialLR's second scheduler
    sched = COMPOSED[name](opt, fails_once(2 if name == "SequentialLR" else 3))
    ref_opt = _opt()
    ref = COMPOSED[name](ref_opt, fails_once(-1))
    for _ in range(2):
        for s in (sched, ref):
            _step(s)
    before = _observed(sched)
    opt.step()
    with pytest.raises(RuntimeError, match="no factor for epoch"):
        sched.step()
    assert _observed(sched) == before
    if "last_epoch" in before[0]:
        assert sched.last_epoch == before[0]["last_epoch"]
    if "_step_count" in before[0]:
        assert sched._step_count == before[0]["_step_count"]
    for _ in range(3):
        for s in (sched, ref):
            _step(s)
        assert sched.get_last_lr() == ref.get_last_lr()
        assert _lrs(opt) == _lrs(ref_opt)
    assert sched.state_dict() == ref.state_dict()


def test_one_cycle_past_its_end_raises_again_and_moves_nothing():
    opt = _opt()
    sched = L.OneCycleLR(opt, 0.1, total_steps=3)
    for _ in range(3):
        _step(sched)
    before = _observed(sched)
    for _ in range(2):  # torch's counter moves: its second message says 5 steps
        with pytest.raises(ValueError, match="Tried to step 4 times"):
            _step(sched)
        assert _observed(sched) == before


def test_plateau_step_that_raises_keeps_its_counters():
    opt = _opt(1)
    sched = L.ReduceLROnPlateau(opt, patience=0, min_lr=[0.0])
    _step(sched, 0)
    opt.add_param_group({"params": [fastopt.Parameter(np.zeros(2))], "lr": 0.3})
    before = (sched.last_epoch, sched.num_bad_epochs, sched.best, _lrs(opt))
    with pytest.raises(RuntimeError, match="min_lrs"):
        sched.step(5.0)
    assert (sched.last_epoch, sched.num_bad_epochs, sched.best, _lrs(opt)) == before


def test_a_raising_step_restores_array_lrs_in_place():
    lr = np.array(0.1)
    opt = fastopt.SGD([fastopt.Parameter(np.zeros(2))], lr=lr, momentum=0.9)
    sched = L.CyclicLR(opt, 0.01, 0.1, 2, scale_fn=fails_once(2, lambda x: 1.0),
                       scale_mode="iterations")
    _step(sched)
    group = opt.param_groups[0]
    held, value, momentum = group["lr"], float(group["lr"]), group["momentum"]
    with pytest.raises(RuntimeError):
        _step(sched)
    assert group["lr"] is held and float(held) == value and group["momentum"] == momentum
    _step(sched)
    assert not math.isclose(float(held), value)
