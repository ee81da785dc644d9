"""Scheduler state dicts with bad values are refused before anything changes, a state that
torch 2.13 steps on with loads and steps as torch's, and a step that raises changes nothing:
every class of fastopt.lr_scheduler and swa_utils.SWALR."""
import copy
import math
import types
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import lr_scheduler as L
from fastopt import swa_utils
from helpers import import_torch

#: per class: a factory taking the schedulers' module (fastopt's or torch's) and an optimizer
FACTORIES = {
    "LambdaLR": lambda L, o: L.LambdaLR(o, lambda e: 0.9 ** e),
    "MultiplicativeLR": lambda L, o: L.MultiplicativeLR(o, lambda e: 0.9),
    "StepLR": lambda L, o: L.StepLR(o, 2, 0.5),
    "MultiStepLR": lambda L, o: L.MultiStepLR(o, [2, 4], 0.5),
    "ConstantLR": lambda L, o: L.ConstantLR(o, 0.5, 3),
    "LinearLR": lambda L, o: L.LinearLR(o, 0.5, 1.0, 4),
    "ExponentialLR": lambda L, o: L.ExponentialLR(o, 0.9),
    "PolynomialLR": lambda L, o: L.PolynomialLR(o, 6, 2.0),
    "CosineAnnealingLR": lambda L, o: L.CosineAnnealingLR(o, 5, 0.001),
    "CosineAnnealingWarmRestarts": lambda L, o: L.CosineAnnealingWarmRestarts(o, 3, 2),
    "CyclicLR": lambda L, o: L.CyclicLR(o, 0.01, 0.1, 2),
    "OneCycleLR": lambda L, o: L.OneCycleLR(o, 0.1, total_steps=20),
    "ReduceLROnPlateau": lambda L, o: L.ReduceLROnPlateau(o, patience=1),
    "SequentialLR": lambda L, o: L.SequentialLR(o, [L.ConstantLR(o, 0.5, 2),
                                                    L.ExponentialLR(o, 0.9)], [2]),
    "ChainedScheduler": lambda L, o: L.ChainedScheduler([L.ConstantLR(o, 0.5, 2),
                                                         L.ExponentialLR(o, 0.9)]),
    "FunctionLR": lambda L, o: L.FunctionLR(o, lambda e: 0.1 / (1 + e)),
    "SWALR": lambda L, o: L.SWALR(o, 0.05, anneal_epochs=3),
}
#: more configurations, by name: factories as those of FACTORIES
VARIANTS = {
    "ReduceLROnPlateau-min_lr-list": lambda L, o: L.ReduceLROnPlateau(o, patience=1,
                                                                      min_lr=[0.0, 0.0]),
}
#: fastopt's schedulers, SWALR with them
FAST = types.SimpleNamespace(**vars(L), SWALR=swa_utils.SWALR)


def test_every_scheduler_class_has_a_factory():
    assert set(FACTORIES) == set(L.SCHEDULERS) | {"SWALR"}


def _opt(groups=2, lib=fastopt):
    """SGD with momentum over ``groups`` groups of lrs 0.1, 0.2, ... (``lib``: fastopt, or
    torch for its twin)."""
    if lib is fastopt:
        params = [fastopt.Parameter(np.zeros(2)) for _ in range(groups)]
    else:
        params = [lib.zeros(2, dtype=lib.float64, requires_grad=True) for _ in range(groups)]
    cls = fastopt.SGD if lib is fastopt else lib.optim.SGD
    return cls([{"params": [p], "lr": 0.1 * (i + 1)} for i, p in enumerate(params)],
               lr=0.1, momentum=0.9)


def _step(sched, k=0):
    sched.optimizer.step()
    if type(sched).__name__ == "ReduceLROnPlateau":
        sched.step(1.0 + k % 2)
    else:
        sched.step()


def _trained(name, steps=3, lib=fastopt, groups=2, added=0):
    """Scheduler ``name`` of ``lib`` (fastopt, or torch for its twin) over ``groups`` param
    groups, stepped ``steps`` times, and then ``added`` more groups added."""
    opt = _opt(groups, lib)
    sched = {**FACTORIES, **VARIANTS}[name](_module(lib), opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(steps):
            _step(sched, k)
    for i in range(added):
        p = (fastopt.Parameter(np.zeros(2)) if lib is fastopt else
             lib.zeros(2, dtype=lib.float64, requires_grad=True))
        opt.add_param_group({"params": [p], "lr": 0.3 + 0.1 * i})
    return sched


def _module(lib):
    """The schedulers of ``lib``, SWALR with them."""
    if lib is fastopt:
        return FAST
    return types.SimpleNamespace(**vars(lib.optim.lr_scheduler),
                                 SWALR=lib.optim.swa_utils.SWALR)


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
def test_base_lrs_must_hold_finite_numbers_one_to_one_per_group(name):
    """An empty list, or one longer than the optimizer's groups, cannot come from a scheduler
    of this optimizer (torch loads them; its closed form, and the step of the classes in
    ``PAIRED``, fail on them later)."""
    _refused(name, lambda sd: sd["base_lrs"].append(0.5), ValueError,
             r"state_dict\['base_lrs'\] has 3 values, the optimizer has 2 param groups")
    _refused(name, lambda sd: sd.__setitem__("base_lrs", []), ValueError,
             r"state_dict\['base_lrs'\] has 0 values, the optimizer has 2 param groups")
    _refused(name, lambda sd: sd["base_lrs"].__setitem__(1, float("nan")), ValueError,
             r"state_dict\['base_lrs'\]\[1\] must be finite, got nan")
    _refused(name, lambda sd: sd["base_lrs"].__setitem__(0, "0.1"), TypeError,
             r"state_dict\['base_lrs'\]\[0\] must be a real number, got str")
    _refused(name, lambda sd: sd.__setitem__("base_lrs", 0.1), TypeError,
             r"state_dict\['base_lrs'\] must be a list with one value per param group")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_last_lr_empty_or_longer_than_the_groups_is_refused(name):
    for value in ([], [0.1, 0.2, 0.3]):
        _refused(name, lambda sd, value=value: sd.__setitem__("_last_lr", value), ValueError,
                 rf"state_dict\['_last_lr'\] has {len(value)} values, the optimizer has 2 "
                 r"param groups")


# ---- a list shorter than the param groups: a scheduler built before add_param_group ------
# Its base_lrs, _last_lr (and min_lrs, the lists of CyclicLR) hold one value per group it was
# made for. torch 2.13 loads them into a scheduler built over all the groups and zips them
# with the groups (strict=True): such a state loads where torch steps on with it, with
# torch's numbers, and is refused where torch fails at a later step.

def _torch():
    """torch 2.13, the oracle of what such a state does."""
    return import_torch(vector_kernels=False)


def _loaded(name, mutate, lib=fastopt, **built):
    """A scheduler stepped twice, loaded with the state of one stepped five times, changed by
    ``mutate``; and that state."""
    saved = copy.deepcopy(_trained(name, 5, lib).state_dict())
    mutate(saved)
    sched = _trained(name, 2, lib, **built)
    sched.load_state_dict(copy.deepcopy(saved))
    return sched, saved


def _steps_as_torch(name, mutate, steps=12, **built):
    """fastopt's and torch's schedulers, loaded alike with a state changed by ``mutate``,
    report the loaded ``_last_lr`` and then compute the same lrs and momenta, with the same
    warnings and errors, step by step (FunctionLR, which torch lacks: the same as fastopt's
    loaded with the unchanged state, since its steps read none of the lists)."""
    torch = _torch()
    ours, saved = _loaded(name, mutate, **built)
    if name == "FunctionLR":
        theirs, their_saved = _loaded(name, lambda sd: None, **built)
        their_saved["_last_lr"] = theirs.get_last_lr()
    else:
        theirs, their_saved = _loaded(name, mutate, torch, **built)
    assert ours.get_last_lr() == saved["_last_lr"]
    assert theirs.get_last_lr() == their_saved["_last_lr"]
    return _lockstep(ours, theirs, steps)


def _lockstep(ours, theirs, steps):
    """Step both ``steps`` times: the same lrs and momenta, warnings and errors (the error's
    type is returned, None without one)."""
    for k in range(steps):
        outcome = []
        for sched in (ours, theirs):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    _step(sched, k)
                    error = None
                except (ValueError, RuntimeError) as e:
                    error = type(e)
            outcome.append((error, [w.category for w in caught]))
        assert outcome[0] == outcome[1], (k, outcome)
        if outcome[0][0] is not None:
            return outcome[0][0]
        assert ours.get_last_lr() == theirs.get_last_lr(), k
        assert _lrs(ours.optimizer) == _lrs(theirs.optimizer), k
    return None


def _refused_where_torch_fails(name, mutate, match, **built):
    """torch loads the changed state and a later step fails (zip of lists of other
    lengths); fastopt refuses it at load, naming the entry, and changes nothing."""
    torch = _torch()
    theirs, _ = _loaded(name, mutate, torch, **built)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="zip"):
            for k in range(12):
                _step(theirs, k)
    if built:
        sched = _trained(name, 2, **built)
        before, lrs = sched.state_dict(), _lrs(sched.optimizer)
        saved = copy.deepcopy(_trained(name, 5).state_dict())
        mutate(saved)
        with pytest.raises(ValueError, match=match):
            sched.load_state_dict(saved)
        assert sched.state_dict() == before and _lrs(sched.optimizer) == lrs
    else:
        _refused(name, mutate, ValueError, match)


def _first_of(key):
    return lambda sd: sd.__setitem__(key, sd[key][:1])


#: classes whose step() pairs base_lrs one to one with the param groups (CyclicLR: and with
#: max_lrs and its momenta; LambdaLR: with its lr_lambdas); the others read it only in the
#: closed form of the deprecated step(epoch)
PAIRED = ("LambdaLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR")
#: the classes with a closed form
CLOSED_FORM = ("StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
               "PolynomialLR")


@pytest.mark.parametrize("name", WITH_BASE_LRS)
def test_a_base_lrs_shorter_than_the_groups_loads_where_torch_steps_on_with_it(name):
    if name in PAIRED:
        what = "its 2 lr_lambdas" if name == "LambdaLR" else "the optimizer's 2 param groups"
        _refused_where_torch_fails(name, _first_of("base_lrs"),
                                   rf"state_dict\['base_lrs'\] has 1 values, but {name} pairs "
                                   rf"it one to one with {what}")
    else:
        assert _steps_as_torch(name, _first_of("base_lrs")) is None


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_the_closed_form_with_a_shorter_base_lrs_raises_as_torch_and_changes_nothing(name):
    """torch raises ValueError too, after writing the first group's lr and moving
    last_epoch."""
    torch = _torch()
    theirs, _ = _loaded(name, _first_of("base_lrs"), torch)
    ours, _ = _loaded(name, _first_of("base_lrs"))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="zip"):
        theirs.step(3)
    before = _observed(ours)
    with pytest.warns(UserWarning, match="deprecated"), pytest.raises(
            ValueError, match="computed 1 learning rates for 2 param groups"):
        ours.step(3)
    assert _observed(ours) == before


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_last_lr_shorter_than_the_groups_loads_and_steps_as_torch(name):
    assert _steps_as_torch(name, lambda sd: sd.__setitem__("_last_lr", [0.1])) is None


@pytest.mark.parametrize("key", ["base_lrs", "max_lrs", "base_momentums", "max_momentums"])
def test_cyclic_refuses_a_shorter_list_as_torch_fails_on_it(key):
    """CyclicLR zips base_lrs with max_lrs, its momenta with each other and with the
    groups."""
    _refused_where_torch_fails("CyclicLR", _first_of(key),
                               rf"state_dict\['{key}'\] has 1 values, but CyclicLR pairs it "
                               r"one to one with the optimizer's 2 param groups")


def test_cyclic_refuses_lists_of_two_lengths_it_would_pair():
    """Built over one group, one group added: each list may hold one value (as the
    scheduler) or two (as the groups), but all the same number."""
    _refused_where_torch_fails(
        "CyclicLR", _first_of("max_lrs"),
        r"state_dict\['max_lrs'\] has 1 values and state_dict\['base_lrs'\] 2: CyclicLR "
        r"pairs them one to one", groups=1, added=1)


@pytest.mark.parametrize("name", ["CosineAnnealingLR", "CosineAnnealingWarmRestarts",
                                  "CyclicLR"])
def test_a_paired_list_of_the_groups_length_loads_into_a_scheduler_built_before_a_group(name):
    """Longer than the scheduler's own lists, as long as the groups: torch steps on."""
    assert _steps_as_torch(name, lambda sd: None, groups=1, added=1) is None


def test_lambda_refuses_base_lrs_of_another_length_than_its_lr_lambdas():
    _refused_where_torch_fails("LambdaLR", lambda sd: None,
                               r"state_dict\['base_lrs'\] has 2 values, but LambdaLR pairs it "
                               r"one to one with its 1 lr_lambdas", groups=1, added=1)


#: classes whose step() follows a group added after the scheduler was built (as torch's)
FOLLOW_ADDED = ("StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
                "PolynomialLR", "ReduceLROnPlateau", "SequentialLR", "ChainedScheduler")


@pytest.mark.parametrize("name", FOLLOW_ADDED)
def test_a_resumed_run_loads_the_state_of_a_scheduler_that_outlived_add_param_group(name):
    """The run: a scheduler over one group, a group added, three more steps. Resumed as a
    user does: an optimizer and a scheduler over both groups, loaded from the run's."""
    torch = _torch()
    resumed = []
    for lib in (fastopt, torch):
        old = _trained(name, 2, lib, groups=1, added=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k in range(2, 5):
                _step(old, k)
        sched = _trained(name, 0, lib)
        sched.optimizer.load_state_dict(copy.deepcopy(old.optimizer.state_dict()))
        sched.load_state_dict(copy.deepcopy(old.state_dict()))
        resumed.append(sched)
    ours, theirs = resumed
    if name not in ("ReduceLROnPlateau", "SequentialLR", "ChainedScheduler"):
        assert len(ours.base_lrs) == len(theirs.base_lrs) == 1
    assert ours.get_last_lr() == theirs.get_last_lr()
    assert _lrs(ours.optimizer) == _lrs(theirs.optimizer)
    assert _lockstep(ours, theirs, 12) is None


@pytest.mark.parametrize("name,error", [("ReduceLROnPlateau", None),
                                        ("ReduceLROnPlateau-min_lr-list", RuntimeError)])
def test_plateau_with_a_shorter_min_lrs_steps_as_torch(name, error):
    """With one default min_lr both reset min_lrs to one per group at the next reduction;
    with a list of them (default_min_lr None) both raise RuntimeError there."""
    assert _steps_as_torch(name, _first_of("min_lrs")) is error


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
    ("CyclicLR", "_scale_fn_custom", [1], r"state_dict\['_scale_fn_custom'\] must be None or"),
    ("OneCycleLR", "_anneal_func_type", "exp", r"state_dict\['_anneal_func_type'\] must be one"),
    ("OneCycleLR", "total_steps", 0, r"state_dict\['total_steps'\] must be >= 1"),
    ("ReduceLROnPlateau", "mode", "median",
     r"^mode median is unknown! \(state_dict\['mode'\] must be one of \('min', 'max'\)\)$"),
    ("ReduceLROnPlateau", "threshold_mode", "log",
     r"^threshold mode log is unknown! \(state_dict\['threshold_mode'\] must be one of"),
    ("ReduceLROnPlateau", "min_lrs", [0, 0, 0],
     r"state_dict\['min_lrs'\] has 3 values, the optimizer has 2 param groups"),
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
