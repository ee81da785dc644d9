"""The warnings and errors of fastopt.lr_scheduler (and SWALR) are torch 2.13's.

Filters written against torch (``warnings.filterwarnings(message=...)``, ``pytest.raises(
match=...)``) must apply unchanged, so both libraries are driven side by side with the same
inputs: an error must be of torch's type (or a subclass), with torch's message found in
fastopt's (fastopt may append detail after it); a warning must have torch's category and
text, be emitted as many times, and be reported at the same kind of place (the caller's
line, or a line of the scheduler module itself).
"""

import re
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the oracle for the texts")

import fastopt
from fastopt import lr_scheduler as F
from fastopt import swa_utils as FS

#: the scheduler classes of each library, SWALR included
T = types.SimpleNamespace(**vars(torch.optim.lr_scheduler), SWALR=torch.optim.swa_utils.SWALR,
                          MODULES=(torch.optim.lr_scheduler.__file__,
                                   torch.optim.swa_utils.__file__))
L = types.SimpleNamespace(**vars(F), SWALR=FS.SWALR, MODULES=(F.__file__, FS.__file__))


def make_pair(kind="sgd", lrs=(0.1, 0.05)):
    """The same optimizer in torch and fastopt: one group per lr in ``lrs``."""
    tg = [{"params": [torch.zeros(3, dtype=torch.float64, requires_grad=True)], "lr": lr}
          for lr in lrs]
    fg = [{"params": [fastopt.Parameter(np.zeros(3))], "lr": lr} for lr in lrs]
    if kind == "sgd":
        return torch.optim.SGD(tg, lr=0.1, momentum=0.9), fastopt.SGD(fg, lr=0.1, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(tg, lr=0.1), fastopt.Adam(fg, lr=0.1)
    return torch.optim.Adagrad(tg, lr=0.1), fastopt.Adagrad(fg, lr=0.1)


def add_group(opt):
    if isinstance(opt, torch.optim.Optimizer):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5})
    else:
        opt.add_param_group({"params": [fastopt.Parameter(np.zeros(1))], "lr": 0.5})


def text(error):
    """An exception's message (a KeyError's without the quotes str() adds)."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    return str(error)


def raised(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (the exception itself is under test)
            return e
    raise AssertionError("did not raise")


def assert_raises_as_torch(run, kind="sgd", same_text=True):
    """``run(L, opt, other_opt)`` raises in both libraries: the same type (fastopt's may be
    a subclass of torch's) and, with ``same_text``, torch's message in fastopt's."""
    (topt, fopt), (topt2, fopt2) = make_pair(kind), make_pair(kind)
    theirs = raised(lambda: run(T, topt, topt2))
    ours = raised(lambda: run(L, fopt, fopt2))
    assert isinstance(ours, type(theirs)), (repr(theirs), repr(ours))
    if same_text:
        # an optimizer's repr is the only part of a text that differs
        expected = text(theirs).replace(str(topt), str(fopt)).replace(str(topt2), str(fopt2))
        assert re.search(re.escape(expected), text(ours)), (text(theirs), text(ours))
    return theirs, ours


def fresh(name):
    """A scheduler of class ``name`` built with defaults that step a while."""
    return {
        "LambdaLR": lambda L, o: L.LambdaLR(o, lambda e: 0.9**e),
        "MultiplicativeLR": lambda L, o: L.MultiplicativeLR(o, lambda e: 0.9),
        "StepLR": lambda L, o: L.StepLR(o, 2),
        "MultiStepLR": lambda L, o: L.MultiStepLR(o, [1, 3]),
        "ConstantLR": lambda L, o: L.ConstantLR(o),
        "LinearLR": lambda L, o: L.LinearLR(o),
        "ExponentialLR": lambda L, o: L.ExponentialLR(o, 0.9),
        "PolynomialLR": lambda L, o: L.PolynomialLR(o),
        "CosineAnnealingLR": lambda L, o: L.CosineAnnealingLR(o, 4),
        "CosineAnnealingWarmRestarts": lambda L, o: L.CosineAnnealingWarmRestarts(o, 3),
        "CyclicLR": lambda L, o: L.CyclicLR(o, 0.01, 0.1, step_size_up=2),
        "OneCycleLR": lambda L, o: L.OneCycleLR(o, 0.1, total_steps=20),
        "ReduceLROnPlateau": lambda L, o: L.ReduceLROnPlateau(o),
        "SequentialLR": lambda L, o: L.SequentialLR(
            o, [L.ConstantLR(o, 0.5, 2), L.ExponentialLR(o, 0.9)], [2]),
        "ChainedScheduler": lambda L, o: L.ChainedScheduler(
            [L.ConstantLR(o, 0.5, 2), L.ExponentialLR(o, 0.9)]),
        "SWALR": lambda L, o: L.SWALR(o, 0.01, anneal_epochs=3),
    }[name]


CLASSES = ["LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
           "ExponentialLR", "PolynomialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts",
           "CyclicLR", "OneCycleLR", "ReduceLROnPlateau", "SequentialLR", "ChainedScheduler",
           "SWALR"]


def test_every_scheduler_class_is_covered():
    assert set(CLASSES) == (set(F.SCHEDULERS) - {"FunctionLR"}) | {"SWALR"}


def test_epoch_deprecation_warning_is_torchs_text():
    assert F.EPOCH_DEPRECATION_WARNING == torch.optim.lr_scheduler.EPOCH_DEPRECATION_WARNING
    assert "EPOCH_DEPRECATION_WARNING" in F.__all__


# ------------------------------------------------------------------ constructor arguments

#: (class, id, run(L, optimizer, another optimizer), the optimizer kind, same text):
#: same_text False where torch's message is Python's own (a failed comparison or call)
BAD = [
    ("LambdaLR", "lr_lambda-length", lambda L, o, _: L.LambdaLR(o, [lambda e: 1.0]), "sgd",
     True),
    ("LambdaLR", "lr_lambda-not-callable", lambda L, o, _: L.LambdaLR(o, 3), "sgd", False),
    ("MultiplicativeLR", "lr_lambda-length",
     lambda L, o, _: L.MultiplicativeLR(o, [lambda e: 1.0] * 3), "sgd", True),
    ("MultiplicativeLR", "lr_lambda-not-callable",
     lambda L, o, _: L.MultiplicativeLR(o, [lambda e: 1.0, "x"]), "sgd", True),
    ("StepLR", "not-an-optimizer", lambda L, o, _: L.StepLR(object(), 2), "sgd", True),
    ("StepLR", "resume-without-initial_lr", lambda L, o, _: L.StepLR(o, 2, last_epoch=3),
     "sgd", True),
    ("MultiStepLR", "not-an-optimizer", lambda L, o, _: L.MultiStepLR([], [2]), "sgd", True),
    ("MultiStepLR", "resume-without-initial_lr",
     lambda L, o, _: L.MultiStepLR(o, [2], last_epoch=0), "sgd", True),
    ("ConstantLR", "factor-above-1", lambda L, o, _: L.ConstantLR(o, factor=1.5), "sgd", True),
    ("ConstantLR", "factor-negative", lambda L, o, _: L.ConstantLR(o, factor=-0.1), "sgd",
     True),
    ("LinearLR", "start_factor-0", lambda L, o, _: L.LinearLR(o, start_factor=0), "sgd",
     True),
    ("LinearLR", "start_factor-above-1", lambda L, o, _: L.LinearLR(o, start_factor=1.5),
     "sgd", True),
    ("LinearLR", "end_factor-negative", lambda L, o, _: L.LinearLR(o, end_factor=-0.5), "sgd",
     True),
    ("LinearLR", "end_factor-above-1", lambda L, o, _: L.LinearLR(o, end_factor=2.0), "sgd",
     True),
    ("ExponentialLR", "not-an-optimizer", lambda L, o, _: L.ExponentialLR("sgd", 0.9), "sgd",
     True),
    ("PolynomialLR", "resume-without-initial_lr",
     lambda L, o, _: L.PolynomialLR(o, last_epoch=2), "sgd", True),
    ("CosineAnnealingLR", "not-an-optimizer", lambda L, o, _: L.CosineAnnealingLR(None, 3),
     "sgd", True),
    ("CosineAnnealingWarmRestarts", "T_0-0", lambda L, o, _: L.CosineAnnealingWarmRestarts(o, 0),
     "sgd", True),
    ("CosineAnnealingWarmRestarts", "T_0-negative",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(o, -2), "sgd", True),
    ("CosineAnnealingWarmRestarts", "T_0-float",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(o, 2.5), "sgd", True),
    ("CosineAnnealingWarmRestarts", "T_0-str",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(o, "3"), "sgd", False),
    ("CosineAnnealingWarmRestarts", "T_0-None",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(o, None), "sgd", False),
    ("CosineAnnealingWarmRestarts", "T_mult-0",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(o, 3, T_mult=0), "sgd", True),
    ("CosineAnnealingWarmRestarts", "T_mult-float",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(o, 3, T_mult=1.5), "sgd", True),
    ("CosineAnnealingWarmRestarts", "T_mult-None",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(o, 3, T_mult=None), "sgd", False),
    ("CosineAnnealingWarmRestarts", "eta_min-str",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(o, 3, eta_min="0"), "sgd", True),
    ("CosineAnnealingWarmRestarts", "eta_min-None",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(o, 3, eta_min=None), "sgd", True),
    ("CosineAnnealingWarmRestarts", "not-an-optimizer",
     lambda L, o, _: L.CosineAnnealingWarmRestarts(object(), 3), "sgd", True),
    ("CyclicLR", "not-an-optimizer", lambda L, o, _: L.CyclicLR(object(), 0.01, 0.1), "sgd",
     True),
    ("CyclicLR", "base_lr-length", lambda L, o, _: L.CyclicLR(o, [0.01], 0.1), "sgd", True),
    ("CyclicLR", "max_lr-length", lambda L, o, _: L.CyclicLR(o, 0.01, (0.1, 0.2, 0.3)), "sgd",
     True),
    ("CyclicLR", "mode", lambda L, o, _: L.CyclicLR(o, 0.01, 0.1, mode="square"), "sgd", True),
    ("CyclicLR", "step_size_up-0", lambda L, o, _: L.CyclicLR(o, 0.01, 0.1, step_size_up=0),
     "sgd", False),
    ("CyclicLR", "no-momentum", lambda L, o, _: L.CyclicLR(o, 0.01, 0.1), "adagrad", True),
    ("CyclicLR", "base_momentum-length",
     lambda L, o, _: L.CyclicLR(o, 0.01, 0.1, base_momentum=[0.8]), "sgd", True),
    ("CyclicLR", "max_momentum-length",
     lambda L, o, _: L.CyclicLR(o, 0.01, 0.1, max_momentum=[0.9] * 3), "adam", True),
    ("OneCycleLR", "not-an-optimizer", lambda L, o, _: L.OneCycleLR(object(), 0.1, 10), "sgd",
     True),
    ("OneCycleLR", "total_steps-0", lambda L, o, _: L.OneCycleLR(o, 0.1, total_steps=0), "sgd",
     True),
    ("OneCycleLR", "total_steps-negative", lambda L, o, _: L.OneCycleLR(o, 0.1, -5), "sgd",
     True),
    ("OneCycleLR", "total_steps-float", lambda L, o, _: L.OneCycleLR(o, 0.1, 10.0), "sgd",
     True),
    ("OneCycleLR", "total_steps-str", lambda L, o, _: L.OneCycleLR(o, 0.1, "10"), "sgd", False),
    ("OneCycleLR", "no-length", lambda L, o, _: L.OneCycleLR(o, 0.1), "sgd", True),
    ("OneCycleLR", "epochs-only", lambda L, o, _: L.OneCycleLR(o, 0.1, epochs=3), "sgd", True),
    ("OneCycleLR", "epochs-0",
     lambda L, o, _: L.OneCycleLR(o, 0.1, epochs=0, steps_per_epoch=4), "sgd", True),
    ("OneCycleLR", "epochs-float",
     lambda L, o, _: L.OneCycleLR(o, 0.1, epochs=2.0, steps_per_epoch=4), "sgd", True),
    ("OneCycleLR", "steps_per_epoch-negative",
     lambda L, o, _: L.OneCycleLR(o, 0.1, epochs=2, steps_per_epoch=-4), "sgd", True),
    ("OneCycleLR", "pct_start-int", lambda L, o, _: L.OneCycleLR(o, 0.1, 10, pct_start=1),
     "sgd", True),
    ("OneCycleLR", "pct_start-above-1",
     lambda L, o, _: L.OneCycleLR(o, 0.1, 10, pct_start=1.5), "sgd", True),
    ("OneCycleLR", "pct_start-negative",
     lambda L, o, _: L.OneCycleLR(o, 0.1, 10, pct_start=-0.1), "sgd", True),
    ("OneCycleLR", "pct_start-None", lambda L, o, _: L.OneCycleLR(o, 0.1, 10, pct_start=None),
     "sgd", False),
    ("OneCycleLR", "anneal_strategy",
     lambda L, o, _: L.OneCycleLR(o, 0.1, 10, anneal_strategy="exp"), "sgd", True),
    ("OneCycleLR", "max_lr-length", lambda L, o, _: L.OneCycleLR(o, [0.1] * 3, 10), "sgd",
     True),
    ("OneCycleLR", "no-momentum", lambda L, o, _: L.OneCycleLR(o, 0.1, 10), "adagrad", True),
    ("OneCycleLR", "max_momentum-length",
     lambda L, o, _: L.OneCycleLR(o, 0.1, 10, max_momentum=[0.95]), "adam", True),
    ("OneCycleLR", "base_momentum-length",
     lambda L, o, _: L.OneCycleLR(o, 0.1, 10, base_momentum=(0.8, 0.8, 0.8)), "sgd", True),
    ("ReduceLROnPlateau", "factor-1", lambda L, o, _: L.ReduceLROnPlateau(o, factor=1.0),
     "sgd", True),
    ("ReduceLROnPlateau", "factor-above-1", lambda L, o, _: L.ReduceLROnPlateau(o, factor=3),
     "sgd", True),
    ("ReduceLROnPlateau", "not-an-optimizer", lambda L, o, _: L.ReduceLROnPlateau(object()),
     "sgd", True),
    ("ReduceLROnPlateau", "min_lr-length",
     lambda L, o, _: L.ReduceLROnPlateau(o, min_lr=[0.0] * 3), "sgd", True),
    ("ReduceLROnPlateau", "mode", lambda L, o, _: L.ReduceLROnPlateau(o, mode="minimum"),
     "sgd", True),
    ("ReduceLROnPlateau", "mode-not-str", lambda L, o, _: L.ReduceLROnPlateau(o, mode=0),
     "sgd", False),
    ("ReduceLROnPlateau", "threshold_mode",
     lambda L, o, _: L.ReduceLROnPlateau(o, threshold_mode="relative"), "sgd", True),
    ("SequentialLR", "no-schedulers", lambda L, o, _: L.SequentialLR(o, [], []), "sgd", True),
    ("SequentialLR", "milestones-count",
     lambda L, o, _: L.SequentialLR(o, [L.StepLR(o, 2), L.StepLR(o, 3)], [2, 4]), "sgd", True),
    ("SequentialLR", "no-milestones",
     lambda L, o, _: L.SequentialLR(o, [L.StepLR(o, 2), L.StepLR(o, 3)], []), "sgd", True),
    ("SequentialLR", "plateau",
     lambda L, o, _: L.SequentialLR(o, [L.StepLR(o, 2), L.ReduceLROnPlateau(o)], [2]), "sgd",
     True),
    ("SequentialLR", "no-optimizer-attribute",
     lambda L, o, _: L.SequentialLR(o, [L.StepLR(o, 2), object()], [2]), "sgd", True),
    ("SequentialLR", "other-optimizer",
     lambda L, o, o2: L.SequentialLR(o, [L.StepLR(o, 2), L.StepLR(o2, 3)], [2]), "sgd", True),
    ("ChainedScheduler", "no-schedulers", lambda L, o, _: L.ChainedScheduler([]), "sgd", True),
    ("ChainedScheduler", "plateau",
     lambda L, o, _: L.ChainedScheduler([L.ReduceLROnPlateau(o)], o), "sgd", True),
    ("ChainedScheduler", "no-optimizer-attribute",
     lambda L, o, _: L.ChainedScheduler([L.StepLR(o, 2), 3]), "sgd", True),
    ("ChainedScheduler", "other-optimizer",
     lambda L, o, o2: L.ChainedScheduler([L.StepLR(o, 2), L.StepLR(o2, 3)]), "sgd", True),
    ("ChainedScheduler", "other-optimizer-given",
     lambda L, o, o2: L.ChainedScheduler([L.StepLR(o, 2)], optimizer=o2), "sgd", True),
    ("SWALR", "swa_lr-length", lambda L, o, _: L.SWALR(o, [0.01]), "sgd", True),
    ("SWALR", "anneal_strategy", lambda L, o, _: L.SWALR(o, 0.01, anneal_strategy="exp"),
     "sgd", True),
    ("SWALR", "anneal_epochs-negative", lambda L, o, _: L.SWALR(o, 0.01, anneal_epochs=-1),
     "sgd", True),
    ("SWALR", "anneal_epochs-float", lambda L, o, _: L.SWALR(o, 0.01, anneal_epochs=2.0),
     "sgd", True),
]


def test_the_table_covers_every_class():
    assert {row[0] for row in BAD} == set(CLASSES)


@pytest.mark.parametrize("name,case,run,kind,same_text", BAD,
                         ids=[f"{row[0]}-{row[1]}" for row in BAD])
def test_constructor_raises_as_torch(name, case, run, kind, same_text):
    assert_raises_as_torch(run, kind, same_text)


def test_a_failed_constructor_changes_no_group():
    """torch writes lr, momentum and swa_lr into the groups before some of its checks; the
    texts are torch's, the groups are left as they were."""
    for run in (lambda o: FS.SWALR(o, 0.01, anneal_epochs=-1),
                lambda o: FS.SWALR(o, 0.01, anneal_strategy="exp"),
                lambda o: F.CyclicLR(o, 0.01, 0.1, mode="square"),
                lambda o: F.CyclicLR(o, 0.01, 0.1, base_momentum=[0.8]),
                lambda o: F.OneCycleLR(o, 0.1, 10, max_momentum=[0.95])):
        _, opt = make_pair()
        before = [dict(g) for g in opt.param_groups]
        with pytest.raises(ValueError):
            run(opt)
        assert [dict(g) for g in opt.param_groups] == before


# ------------------------------------------------------------------ step() and get_lr()


def _stepped(name, steps):
    def run(L, o, _):
        sched = fresh(name)(L, o)
        for _ in range(steps):
            o.step()
            sched.step()
        return sched
    return run


STEP_ERRORS = [
    ("OneCycleLR-past-total_steps", lambda L, o, o2: _stepped("OneCycleLR", 25)(L, o, o2),
     True),
    ("CosineAnnealingWarmRestarts-negative-epoch",
     lambda L, o, o2: _stepped("CosineAnnealingWarmRestarts", 1)(L, o, o2).step(-1), True),
    ("ReduceLROnPlateau-min_lrs-after-add_param_group",
     lambda L, o, _: _plateau_after_add(L, o), True),
    ("ReduceLROnPlateau-metric-not-a-number",
     lambda L, o, o2: _stepped("ReduceLROnPlateau", 0)(L, o, o2).step("low"), True),
    ("StepLR-closed-form-after-add_param_group", lambda L, o, _: _closed_after_add(L, o), True),
]


def _plateau_after_add(L, o):
    sched = L.ReduceLROnPlateau(o, patience=0, min_lr=[0.0, 0.0])
    add_group(o)
    sched.step(1.0)
    sched.step(2.0)


def _closed_after_add(L, o):
    sched = L.StepLR(o, 2)
    add_group(o)
    o.step()
    sched.step(3)


@pytest.mark.parametrize("case,run,same_text", STEP_ERRORS, ids=[r[0] for r in STEP_ERRORS])
def test_step_raises_as_torch(case, run, same_text):
    assert_raises_as_torch(run, same_text=same_text)


@pytest.mark.parametrize("name", ["ReduceLROnPlateau", "SequentialLR", "ChainedScheduler"])
def test_get_lr_of_classes_without_one_raises_as_torch(name):
    assert_raises_as_torch(lambda L, o, _: fresh(name)(L, o).get_lr())


# ------------------------------------------------------------------ load_state_dict()


def _loading(name, change):
    def run(L, o, _):
        sched = fresh(name)(L, o)
        state = sched.state_dict()
        change(state)
        sched.load_state_dict(state)
    return run


def _pop(key):
    return lambda sd: sd.pop(key)


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


LOAD_ERRORS = [
    ("LambdaLR", "no-lr_lambdas", _pop("lr_lambdas"), True),
    ("MultiplicativeLR", "no-lr_lambdas", _pop("lr_lambdas"), True),
    ("LambdaLR", "lr_lambdas-None", _set("lr_lambdas", None), False),
    ("LambdaLR", "lr_lambdas-entry-not-a-dict", _set("lr_lambdas", [None, 3]), False),
    ("SequentialLR", "no-_schedulers", _pop("_schedulers"), True),
    ("SequentialLR", "_schedulers-longer", lambda sd: sd["_schedulers"].append(
        sd["_schedulers"][0]), False),
    ("ChainedScheduler", "no-_schedulers", _pop("_schedulers"), True),
    ("ChainedScheduler", "_schedulers-None", _set("_schedulers", None), False),
    ("CyclicLR", "no-_scale_fn_custom", _pop("_scale_fn_custom"), True),
    ("ReduceLROnPlateau", "mode", _set("mode", "minimum"), True),
    ("ReduceLROnPlateau", "threshold_mode", _set("threshold_mode", "relative"), True),
    ("StepLR", "not-a-dict", lambda sd: None, False),
]


@pytest.mark.parametrize("name,case,change,same_text", LOAD_ERRORS,
                         ids=[f"{r[0]}-{r[1]}" for r in LOAD_ERRORS])
def test_load_state_dict_raises_as_torch(name, case, change, same_text):
    if case == "not-a-dict":
        def run(L, o, _):
            fresh(name)(L, o).load_state_dict(5)
    else:
        run = _loading(name, change)
    assert_raises_as_torch(run, same_text=same_text)


def test_missing_keys_stay_a_value_error_too():
    _, opt = make_pair()
    sched = F.LambdaLR(opt, lambda e: 1.0)
    state = sched.state_dict()
    del state["lr_lambdas"]
    with pytest.raises(ValueError, match=r"missing keys \['lr_lambdas'\]"):
        sched.load_state_dict(state)


# ------------------------------------------------------------------ warnings


def _caught(L, run, opt):
    """The warnings ``run(L, opt)`` emits: category, text, and where they are reported
    ('caller' for a line of this file, 'scheduler' for one of the scheduler modules)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(L, opt)
    out = []
    for w in caught:
        if w.filename == __file__:
            where = "caller"
        elif w.filename in L.MODULES:
            where = "scheduler"
        else:
            where = w.filename
        out.append((w.category, str(w.message), where))
    return out


def assert_warns_as_torch(run, kind="sgd"):
    topt, fopt = make_pair(kind)
    theirs = _caught(T, run, topt)
    ours = _caught(L, run, fopt)
    assert ours == theirs
    return theirs


def _build_then(name, then):
    def run(L, o):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # building is not under test here
            sched = fresh(name)(L, o)
        then(sched, o)
    return run


def _train(sched, o, steps=6):
    for k in range(steps):
        o.step()
        if isinstance(sched, (T.ReduceLROnPlateau, L.ReduceLROnPlateau)):
            sched.step(1.0 + k)
        else:
            sched.step()


@pytest.mark.parametrize("name", CLASSES)
def test_building_and_training_in_order_warns_nothing(name):
    assert assert_warns_as_torch(lambda L, o: _train(fresh(name)(L, o), o)) == []


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "ReduceLROnPlateau"])
def test_step_before_optimizer_step_warns_as_torch(name):
    def then(sched, o):
        sched.step()
        sched.step()
        _train(sched, o, 2)

    caught = assert_warns_as_torch(_build_then(name, then))
    if name == "CosineAnnealingWarmRestarts":  # its own step() checks nothing, in torch too
        assert caught == []
    elif name not in ("SequentialLR", "ChainedScheduler"):
        assert len(caught) == 1 and caught[0][2] == "caller"
    assert all(c[1].startswith("Detected call of `lr_scheduler.step()` before") for c in caught)


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "ReduceLROnPlateau"])
def test_optimizer_step_replaced_after_building_warns_as_torch(name):
    def then(sched, o):
        o.step = lambda closure=None: None
        _train(sched, o, 3)

    caught = assert_warns_as_torch(_build_then(name, then))
    assert (caught == []) == (name == "CosineAnnealingWarmRestarts")
    assert all(c[1].startswith("Seems like `optimizer.step()` has been overridden")
               for c in caught)


CLOSED = ["LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
          "ExponentialLR", "PolynomialLR", "CosineAnnealingLR", "CyclicLR", "OneCycleLR",
          "SWALR"]


@pytest.mark.parametrize("name", CLOSED)
def test_step_with_an_epoch_warns_the_deprecation_as_torch(name):
    def then(sched, o):
        for epoch in (1, 2, 4):
            o.step()
            sched.step(epoch)

    caught = assert_warns_as_torch(_build_then(name, then))
    assert caught == [(UserWarning, F.EPOCH_DEPRECATION_WARNING, "caller")] * 3


def test_plateau_step_with_an_epoch_warns_the_deprecation_as_torch():
    def then(sched, o):
        sched.step(1.0, 3)
        sched.step(0.5, epoch=4)
        sched.step(0.2)

    caught = assert_warns_as_torch(_build_then("ReduceLROnPlateau", then))
    assert caught == [(UserWarning, F.EPOCH_DEPRECATION_WARNING, "caller")] * 2


def test_warm_restarts_take_fractional_epochs_without_a_warning_as_torch():
    def then(sched, o):
        for epoch in (0.5, 1.25, 7, 2):
            o.step()
            sched.step(epoch)

    assert assert_warns_as_torch(_build_then("CosineAnnealingWarmRestarts", then)) == []


@pytest.mark.parametrize("name", [n for n in CLASSES if n not in
                                  ("ReduceLROnPlateau", "SequentialLR", "ChainedScheduler")])
def test_get_lr_outside_step_warns_as_torch(name):
    def then(sched, o):
        o.step()
        sched.step()
        sched.get_lr()
        sched.get_lr()

    caught = assert_warns_as_torch(_build_then(name, then))
    # torch reports it in its scheduler module, except SWALR's at the caller
    where = "caller" if name == "SWALR" else "scheduler"
    message = ("To get the last learning rate computed by the scheduler, please use "
               "`get_last_lr()`.")
    assert caught == [(UserWarning, message, where)] * 2


def test_a_filter_written_for_torchs_text_silences_fastopt():
    _, opt = make_pair()
    sched = F.StepLR(opt, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        warnings.filterwarnings("ignore", message="The epoch parameter in `scheduler.step\\(\\)`")
        sched.step()
        sched.step(3)
    assert caught == []
    with pytest.warns(UserWarning, match=re.escape(F.EPOCH_DEPRECATION_WARNING)):
        sched.step(4)


def test_deliberate_difference_a_non_optimizer_is_a_type_error():
    """torch's LambdaLR, MultiplicativeLR and SWALR read ``optimizer.param_groups`` before
    checking the type and raise AttributeError; fastopt raises torch's TypeError of the other
    classes."""
    for build in (lambda: F.LambdaLR(object(), lambda e: 1.0),
                  lambda: F.MultiplicativeLR(object(), lambda e: 1.0),
                  lambda: FS.SWALR(object(), 0.1)):
        with pytest.raises(TypeError, match="^object is not an Optimizer$"):
            build()
