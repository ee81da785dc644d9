"""Lockstep parity of fastopt.lr_scheduler with torch.optim.lr_scheduler (PyTorch 2.13).

Both libraries are driven with the same calls on optimizers with two param groups of
different learning rates; every learning rate (and cycled momentum) must be equal with ``==``
after every step, since scheduler arithmetic is plain doubles in the same order.
"""

import copy
import math
import random
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the oracle for scheduler parity")

import fastopt
from fastopt import lr_scheduler as F

T = torch.optim.lr_scheduler
STEPS = 300


class Scale:
    """A callable object: its __dict__ is saved by LambdaLR.state_dict()."""

    def __init__(self, rate):
        self.rate = rate

    def __call__(self, epoch):
        return self.rate**epoch


class Halve:
    def __init__(self, every):
        self.every = every

    def __call__(self, cycle):
        return 0.5 ** (cycle // self.every)


def make_pair(kind="sgd", lrs=(0.1, 0.05)):
    """The same optimizer in torch and fastopt: two groups with lrs ``lrs``."""
    tp = [torch.zeros(3, dtype=torch.float64, requires_grad=True) for _ in lrs]
    fp = [fastopt.Parameter(np.zeros(3)) for _ in lrs]
    tg = [{"params": [p], "lr": lr} for p, lr in zip(tp, lrs)]
    fg = [{"params": [p], "lr": lr} for p, lr in zip(fp, lrs)]
    if kind == "sgd":
        return torch.optim.SGD(tg, lr=0.1, momentum=0.9), fastopt.SGD(fg, lr=0.1, momentum=0.9)
    if kind == "adam":
        return (
            torch.optim.Adam(tg, lr=0.1, betas=(0.9, 0.99)),
            fastopt.Adam(fg, lr=0.1, betas=(0.9, 0.99)),
        )
    if kind == "adagrad":
        return torch.optim.Adagrad(tg, lr=0.1), fastopt.Adagrad(fg, lr=0.1)
    raise AssertionError(kind)


GROUP_KEYS = ("lr", "initial_lr", "momentum", "betas", "max_momentum", "base_momentum",
              "max_lr", "min_lr", "swa_lr")


def group_values(opt):
    out = []
    for g in opt.param_groups:
        out.append({k: (tuple(g[k]) if k == "betas" else g[k]) for k in GROUP_KEYS if k in g})
    return out


def assert_same(ts, fs, topt, fopt, where):
    assert fs.get_last_lr() == ts.get_last_lr(), where
    assert group_values(fopt) == group_values(topt), where


# (id, optimizer kind, factory taking the lr_scheduler module and the optimizer)
CASES = [
    ("lambda-pow", "sgd", lambda L, o: L.LambdaLR(o, lambda e: 0.95**e)),
    ("lambda-list", "sgd", lambda L, o: L.LambdaLR(o, [lambda e: e // 30, Scale(0.97)])),
    ("multiplicative", "sgd", lambda L, o: L.MultiplicativeLR(o, lambda e: 0.97)),
    ("multiplicative-list", "sgd",
     lambda L, o: L.MultiplicativeLR(o, [lambda e: 0.99, lambda e: 1.0 - 1.0 / (e + 10)])),
    ("step-3", "sgd", lambda L, o: L.StepLR(o, step_size=3, gamma=0.5)),
    ("step-30", "sgd", lambda L, o: L.StepLR(o, 30)),
    ("step-1", "adam", lambda L, o: L.StepLR(o, 1, gamma=0.99)),
    ("multistep", "sgd", lambda L, o: L.MultiStepLR(o, [5, 10, 10, 50], gamma=0.5)),
    ("multistep-unsorted", "sgd", lambda L, o: L.MultiStepLR(o, [80, 30], gamma=0.1)),
    ("constant", "sgd", lambda L, o: L.ConstantLR(o)),
    ("constant-half", "sgd", lambda L, o: L.ConstantLR(o, factor=0.5, total_iters=10)),
    ("constant-one", "sgd", lambda L, o: L.ConstantLR(o, factor=1.0, total_iters=0)),
    ("linear", "sgd", lambda L, o: L.LinearLR(o)),
    ("linear-up", "sgd", lambda L, o: L.LinearLR(o, start_factor=0.1, total_iters=30)),
    ("linear-down", "sgd",
     lambda L, o: L.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=100)),
    ("linear-zero", "sgd",
     lambda L, o: L.LinearLR(o, start_factor=0.25, end_factor=0.0, total_iters=7)),
    ("exponential", "sgd", lambda L, o: L.ExponentialLR(o, gamma=0.99)),
    ("exponential-fast", "adam", lambda L, o: L.ExponentialLR(o, 0.9)),
    ("poly", "sgd", lambda L, o: L.PolynomialLR(o)),
    ("poly-2", "sgd", lambda L, o: L.PolynomialLR(o, total_iters=50, power=2.0)),
    ("poly-sqrt", "sgd", lambda L, o: L.PolynomialLR(o, total_iters=300, power=0.5)),
    ("cosine", "sgd", lambda L, o: L.CosineAnnealingLR(o, T_max=10)),
    ("cosine-eta", "sgd", lambda L, o: L.CosineAnnealingLR(o, 50, eta_min=0.001)),
    ("cosine-7", "adam", lambda L, o: L.CosineAnnealingLR(o, 7, 0.01)),
    ("warm-restarts", "sgd", lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=10)),
    ("warm-restarts-mult", "sgd",
     lambda L, o: L.CosineAnnealingWarmRestarts(o, 5, T_mult=2, eta_min=0.001)),
    ("warm-restarts-3", "adam", lambda L, o: L.CosineAnnealingWarmRestarts(o, 3, 3)),
    ("cyclic", "sgd", lambda L, o: L.CyclicLR(o, 0.01, 0.1, step_size_up=5)),
    ("cyclic-tri2", "sgd",
     lambda L, o: L.CyclicLR(o, [0.01, 0.001], [0.1, 0.02], 4, 6, mode="triangular2")),
    ("cyclic-exp", "adam",
     lambda L, o: L.CyclicLR(o, 0.001, 0.01, 7, mode="exp_range", gamma=0.99)),
    ("cyclic-custom", "sgd",
     lambda L, o: L.CyclicLR(o, 0.01, 0.1, 3, scale_fn=Halve(2), scale_mode="cycle",
                             base_momentum=[0.8, 0.7], max_momentum=[0.9, 0.95])),
    ("cyclic-custom-iter", "adam",
     lambda L, o: L.CyclicLR(o, 0.01, 0.1, 10, 20, scale_fn=lambda x: 1 / (1 + x / 100),
                             scale_mode="iterations")),
    ("cyclic-no-momentum", "adagrad",
     lambda L, o: L.CyclicLR(o, 0.01, 0.1, 8, cycle_momentum=False)),
    ("onecycle", "sgd", lambda L, o: L.OneCycleLR(o, max_lr=0.1, total_steps=STEPS)),
    ("onecycle-linear", "adam",
     lambda L, o: L.OneCycleLR(o, [0.1, 0.5], total_steps=STEPS, anneal_strategy="linear",
                               pct_start=0.25)),
    ("onecycle-3phase", "sgd",
     lambda L, o: L.OneCycleLR(o, 1.0, epochs=30, steps_per_epoch=10, three_phase=True,
                               div_factor=10.0, final_div_factor=100.0)),
    ("onecycle-3phase-linear", "adam",
     lambda L, o: L.OneCycleLR(o, 0.3, total_steps=STEPS, three_phase=True,
                               anneal_strategy="linear", base_momentum=0.8,
                               max_momentum=[0.9, 0.99])),
    ("onecycle-no-momentum", "adagrad",
     lambda L, o: L.OneCycleLR(o, 0.1, total_steps=STEPS, cycle_momentum=False)),
    ("sequential", "sgd",
     lambda L, o: L.SequentialLR(
         o, [L.LinearLR(o, 0.1, 1.0, 3), L.ExponentialLR(o, 0.5)], milestones=[3])),
    ("sequential-3", "sgd",
     lambda L, o: L.SequentialLR(
         o,
         [L.ConstantLR(o, 0.1, 5), L.CosineAnnealingLR(o, 45), L.StepLR(o, 20, 0.5)],
         milestones=[5, 50])),
    ("sequential-warmup-cosine", "adam",
     lambda L, o: L.SequentialLR(
         o, [L.LinearLR(o, 0.01, total_iters=20), L.CosineAnnealingLR(o, 280, 1e-4)], [20])),
    ("chained", "sgd",
     lambda L, o: L.ChainedScheduler([L.ConstantLR(o, 0.1, 4), L.ExponentialLR(o, 0.9)])),
    ("chained-3", "sgd",
     lambda L, o: L.ChainedScheduler(
         [L.LinearLR(o, 0.5, total_iters=10), L.StepLR(o, 7, 0.7),
          L.CosineAnnealingLR(o, 25)], optimizer=o)),
    ("chained-of-sequential", "sgd",
     lambda L, o: L.ChainedScheduler([
         L.SequentialLR(o, [L.ConstantLR(o, 0.5, 3), L.ExponentialLR(o, 0.98)], [3]),
         L.MultiStepLR(o, [40, 90], 0.3)])),
]
IDS = [c[0] for c in CASES]


def build(case):
    _, kind, factory = case
    topt, fopt = make_pair(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = factory(T, topt)
        fs = factory(F, fopt)
    return topt, fopt, ts, fs


def lockstep(topt, fopt, ts, fs, steps, start=0):
    for i in range(start, start + steps):
        topt.step()
        fopt.step()
        ts.step()
        fs.step()
        assert_same(ts, fs, topt, fopt, f"step {i}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lockstep(case):
    topt, fopt, ts, fs = build(case)
    assert_same(ts, fs, topt, fopt, "after construction")
    lockstep(topt, fopt, ts, fs, STEPS)


def comparable(sd):
    """A state dict with torch-incomparable parts removed (class marker, callables)."""
    out = {}
    for k, v in sd.items():
        if k in ("_scheduler_class",):
            continue
        if k == "_schedulers":
            v = [comparable(s) for s in v]
        out[k] = v
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_matches_torch(case):
    topt, fopt, ts, fs = build(case)
    lockstep(topt, fopt, ts, fs, 17)
    assert comparable(fs.state_dict()) == comparable(ts.state_dict())


def fresh_like(case, fopt_old):
    """A new fastopt optimizer + scheduler, groups restored as an optimizer checkpoint would."""
    _, kind, factory = case
    _, fopt = make_pair(kind)
    for new, old in zip(fopt.param_groups, fopt_old.param_groups):
        for k, v in old.items():
            if k != "params":
                new[k] = copy.deepcopy(v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fs = factory(F, fopt)
    return fopt, fs


@pytest.mark.parametrize("split", [1, 13, 150])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_resume_mid_run(case, split):
    topt, fopt, ts, fs = build(case)
    lockstep(topt, fopt, ts, fs, split)
    saved = fs.state_dict()
    kept = copy.deepcopy(saved)
    fopt2, fs2 = fresh_like(case, fopt)
    # restore the group values the scheduler's construction changed
    for new, old in zip(fopt2.param_groups, fopt.param_groups):
        for k, v in old.items():
            if k != "params":
                new[k] = copy.deepcopy(v)
    fs2.load_state_dict(saved)
    assert fs2.state_dict() == kept
    assert_same(ts, fs2, topt, fopt2, "after load")
    lockstep(topt, fopt2, ts, fs2, STEPS - split, start=split)
    assert saved == kept, "the saved dict must not change while the scheduler runs on"


CLOSED_FORM = [c for c in CASES if c[0].split("-")[0] in (
    "step", "multistep", "constant", "linear", "exponential", "poly", "cosine", "lambda",
    "multiplicative", "cyclic", "onecycle")]


@pytest.mark.parametrize("case", CLOSED_FORM, ids=[c[0] for c in CLOSED_FORM])
def test_step_with_epoch(case):
    topt, fopt, ts, fs = build(case)
    rng = random.Random(case[0])
    epochs = [rng.randrange(0, STEPS - 1) for _ in range(40)] + [0, 1, 2, STEPS - 1]
    for e in epochs:
        topt.step()
        fopt.step()
        with warnings.catch_warnings(record=True) as tw:
            warnings.simplefilter("always")
            ts.step(e)
        with warnings.catch_warnings(record=True) as fw:
            warnings.simplefilter("always")
            fs.step(e)
        assert [w.category for w in fw] == [w.category for w in tw]
        assert any("deprecated" in str(w.message) for w in fw)
        assert_same(ts, fs, topt, fopt, f"epoch {e}")
        # chainable steps continue from the jumped-to epoch
        ts.step()
        fs.step()
        assert_same(ts, fs, topt, fopt, f"after epoch {e}")


@pytest.mark.parametrize(
    "args", [(10, 1, 0.0), (5, 2, 0.001), (3, 3, 0.0)], ids=["T10", "T5x2", "T3x3"]
)
def test_warm_restarts_explicit_epochs(args):
    topt, fopt = make_pair()
    ts = T.CosineAnnealingWarmRestarts(topt, *args)
    fs = F.CosineAnnealingWarmRestarts(fopt, *args)
    rng = random.Random(1)
    epochs = [i * 0.37 for i in range(200)] + [rng.uniform(0, 500) for _ in range(50)]
    epochs += [rng.randrange(0, 500) for _ in range(50)]
    for e in epochs:
        with warnings.catch_warnings(record=True) as tw:
            warnings.simplefilter("always")
            ts.step(e)
        with warnings.catch_warnings(record=True) as fw:
            warnings.simplefilter("always")
            fs.step(e)
        assert len(fw) == len(tw) == 0
        assert (fs.T_cur, fs.T_i, fs.last_epoch) == (ts.T_cur, ts.T_i, ts.last_epoch)
        assert_same(ts, fs, topt, fopt, f"epoch {e}")
    for bad in (-1, -0.5):
        with pytest.raises(ValueError):
            ts.step(bad)
        with pytest.raises(ValueError, match="epoch"):
            fs.step(bad)


# ------------------------------------------------------------------ ReduceLROnPlateau

def metric_script(kind, n=STEPS, seed=0):
    rng = random.Random(seed)
    if kind == "flat":
        return [5.0] * n
    if kind == "decreasing-slowly":
        return [10.0 - 1e-5 * i for i in range(n)]
    if kind == "noisy":
        return [1.0 / (1 + i / 30) + rng.gauss(0, 0.05) for i in range(n)]
    if kind == "increasing":
        return [i * 0.01 + rng.random() * 0.02 for i in range(n)]
    if kind == "plateaus":
        return [float(10 - (i // 25)) for i in range(n)]
    raise AssertionError(kind)


PLATEAU_ARGS = [
    {},
    {"patience": 1, "cooldown": 1, "factor": 0.5, "min_lr": 0.2},
    {"patience": 0, "factor": 0.5, "min_lr": [0.001, 0.01]},
    {"mode": "max", "patience": 3, "threshold": 0.01},
    {"mode": "max", "threshold_mode": "abs", "threshold": 0.005, "cooldown": 4},
    {"mode": "min", "threshold_mode": "abs", "threshold": 0.01, "patience": 2},
    {"patience": 2, "factor": 0.9, "eps": 1e-3},
    {"patience": 4, "factor": 0.0},
]


@pytest.mark.parametrize("script", ["flat", "decreasing-slowly", "noisy", "increasing",
                                    "plateaus"])
@pytest.mark.parametrize("kwargs", PLATEAU_ARGS, ids=[str(k) for k in PLATEAU_ARGS])
def test_reduce_on_plateau(kwargs, script):
    topt, fopt = make_pair(lrs=(1.0, 0.3))
    ts = T.ReduceLROnPlateau(topt, **kwargs)
    fs = F.ReduceLROnPlateau(fopt, **kwargs)
    assert fs.get_last_lr() == ts.get_last_lr()
    for i, m in enumerate(metric_script(script)):
        ts.step(m)
        fs.step(np.float64(m) if i % 2 else m)
        for attr in ("best", "num_bad_epochs", "cooldown_counter", "last_epoch"):
            assert getattr(fs, attr) == getattr(ts, attr), (attr, i)
        assert_same(ts, fs, topt, fopt, f"metric {i}")
        if i == 120:
            saved = fs.state_dict()
            assert comparable(saved) == comparable(ts.state_dict())
            fs = F.ReduceLROnPlateau(fopt, **kwargs)
            fs.load_state_dict(saved)


def test_reduce_on_plateau_trace_and_added_group():
    topt, fopt = make_pair(lrs=(1.0, 1.0))
    args = {"patience": 1, "cooldown": 1, "factor": 0.5, "min_lr": 0.2}
    ts = T.ReduceLROnPlateau(topt, **args)
    fs = F.ReduceLROnPlateau(fopt, **args)
    lrs = []
    for i in range(20):
        ts.step(5)
        fs.step(5)
        lrs.append(fs.get_last_lr()[0])
        if i == 3:
            topt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 0.9})
            fopt.add_param_group({"params": [fastopt.Parameter(np.zeros(1))], "lr": 0.9})
        assert_same(ts, fs, topt, fopt, i)
    # the documented trace: 1, 1, 0.5, 0.5, 0.5, ... then the floor min_lr
    assert lrs[:5] == [1.0, 1.0, 0.5, 0.5, 0.5]
    assert lrs[-1] == 0.2 and fs.get_last_lr()[2] == 0.2
    # list min_lr cannot be re-broadcast to the new group
    topt, fopt = make_pair()
    ts = T.ReduceLROnPlateau(topt, patience=0, min_lr=[0.0, 0.0])
    fs = F.ReduceLROnPlateau(fopt, patience=0, min_lr=[0.0, 0.0])
    topt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    fopt.add_param_group({"params": [fastopt.Parameter(np.zeros(1))]})
    ts.step(1.0)
    fs.step(1.0)
    with pytest.raises(RuntimeError):
        ts.step(1.0)
    with pytest.raises(RuntimeError, match="min_lrs"):
        fs.step(1.0)


# ------------------------------------------------------------------ edge behaviour


def test_onecycle_past_total_steps_raises():
    topt, fopt = make_pair()
    ts = T.OneCycleLR(topt, 0.1, total_steps=10)
    fs = F.OneCycleLR(fopt, 0.1, total_steps=10)
    lockstep(topt, fopt, ts, fs, 10)  # step 10 == total_steps still extrapolates
    with pytest.raises(ValueError):
        ts.step()
    with pytest.raises(ValueError, match="Tried to step 11 times"):
        fs.step()


RESUMABLE = ["step-3", "step-30", "step-1", "multistep", "exponential", "cosine",
             "cosine-eta", "linear-up", "poly-2", "constant-half", "lambda-pow",
             "multiplicative"]


@pytest.mark.parametrize("k", [0, 2, 29])
@pytest.mark.parametrize("name", RESUMABLE)
def test_resume_with_last_epoch(name, k):
    topt, fopt = make_pair()
    for opt in (topt, fopt):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"] * 2
    ts = _rebuild_with_last_epoch(T, topt, name, k)
    fs = _rebuild_with_last_epoch(F, fopt, name, k)
    assert fs.last_epoch == ts.last_epoch == k + 1
    assert_same(ts, fs, topt, fopt, name)
    lockstep(topt, fopt, ts, fs, 60)
    for _ in range(3):
        e = random.Random(name).randrange(100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts.step(e), fs.step(e)
        assert_same(ts, fs, topt, fopt, e)


def _rebuild_with_last_epoch(L, o, name, k):
    table = {
        "step-3": lambda: L.StepLR(o, 3, 0.5, last_epoch=k),
        "step-30": lambda: L.StepLR(o, 30, last_epoch=k),
        "step-1": lambda: L.StepLR(o, 1, 0.99, last_epoch=k),
        "multistep": lambda: L.MultiStepLR(o, [5, 30, 30, 50], 0.5, last_epoch=k),
        "exponential": lambda: L.ExponentialLR(o, 0.99, last_epoch=k),
        "cosine": lambda: L.CosineAnnealingLR(o, 10, last_epoch=k),
        "cosine-eta": lambda: L.CosineAnnealingLR(o, 50, 0.001, last_epoch=k),
        "linear-up": lambda: L.LinearLR(o, 0.1, total_iters=40, last_epoch=k),
        "poly-2": lambda: L.PolynomialLR(o, 50, 2.0, last_epoch=k),
        "constant-half": lambda: L.ConstantLR(o, 0.5, 30, last_epoch=k),
        "lambda-pow": lambda: L.LambdaLR(o, lambda e: 0.95**e, last_epoch=k),
        "multiplicative": lambda: L.MultiplicativeLR(o, lambda e: 0.97, last_epoch=k),
    }
    return table[name]()


def test_resume_requires_initial_lr():
    topt, fopt = make_pair()
    with pytest.raises(KeyError):
        T.StepLR(topt, 3, last_epoch=4)
    with pytest.raises(KeyError, match="initial_lr"):
        F.StepLR(fopt, 3, last_epoch=4)


def test_first_scheduler_owns_initial_lr_and_groups_added_later():
    topt, fopt = make_pair()
    ts1, fs1 = T.ExponentialLR(topt, 0.9), F.ExponentialLR(fopt, 0.9)
    for _ in range(3):
        topt.step(), fopt.step(), ts1.step(), fs1.step()
    ts2, fs2 = T.StepLR(topt, 2), F.StepLR(fopt, 2)
    assert fs2.base_lrs == ts2.base_lrs == [0.1, 0.05]
    assert group_values(fopt) == group_values(topt)
    # a group added afterwards: chainable StepLR follows it, LambdaLR cannot
    topt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 0.7})
    fopt.add_param_group({"params": [fastopt.Parameter(np.zeros(1))], "lr": 0.7})
    for _ in range(5):
        ts2.step(), fs2.step()
        assert_same(ts2, fs2, topt, fopt, "added group")
    tl, fl = T.LambdaLR(topt, lambda e: 1.0), F.LambdaLR(fopt, lambda e: 1.0)
    topt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 0.2})
    fopt.add_param_group({"params": [fastopt.Parameter(np.zeros(1))], "lr": 0.2})
    with pytest.raises(ValueError):
        tl.step()
    with pytest.raises(ValueError, match="param groups"):
        fl.step()


def test_sequential_milestone_zero_and_repeated():
    for milestones in ([0, 5], [5, 5], [1, 2]):
        topt, fopt = make_pair()

        def make(L, o, ms=milestones):
            return L.SequentialLR(
                o, [L.ConstantLR(o, 0.5, 2), L.ExponentialLR(o, 0.8), L.StepLR(o, 3)], ms)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts, fs = make(T, topt), make(F, fopt)
        assert_same(ts, fs, topt, fopt, milestones)
        lockstep(topt, fopt, ts, fs, 30)


def test_sequential_documented_values():
    _, fopt = make_pair(lrs=(1.0, 1.0))
    fs = F.SequentialLR(fopt, [F.LinearLR(fopt, 0.1, 1.0, 3), F.ExponentialLR(fopt, 0.5)], [3])
    seen = [fs.get_last_lr()[0]]
    for _ in range(5):
        fopt.step()
        fs.step()
        seen.append(fs.get_last_lr()[0])
    assert seen == pytest.approx([0.1, 0.4, 0.7, 1.0, 0.5, 0.25], rel=1e-15)


# ------------------------------------------------------------------ warnings


def record(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [(x.category, str(x.message)) for x in w]


@pytest.mark.parametrize("case", [CASES[4], CASES[21], CASES[27], CASES[33]],
                         ids=["step", "cosine", "cyclic", "onecycle"])
def test_order_warnings(case):
    # scheduler stepped before the optimizer: warned on the first call only
    topt, fopt, ts, fs = build(case)
    tw, fw = record(ts.step), record(fs.step)
    assert [c for c, _ in fw] == [c for c, _ in tw] == [UserWarning]
    assert "before `optimizer.step()`" in fw[0][1]
    assert record(ts.step) == [] and record(fs.step) == []
    # the right order: no warning
    topt, fopt, ts, fs = build(case)
    topt.step()
    fopt.step()
    assert record(ts.step) == [] and record(fs.step) == []
    # optimizer.step replaced after the scheduler was built
    topt, fopt, ts, fs = build(case)
    topt.step = lambda closure=None: None
    fopt.step = lambda closure=None: None
    tw, fw = record(ts.step), record(fs.step)
    assert [c for c, _ in fw] == [c for c, _ in tw] == [UserWarning]
    assert "has been overridden" in fw[0][1]


def test_optimizer_step_patched_once_and_still_works():
    _, fopt = make_pair()
    original = type(fopt).step
    F.StepLR(fopt, 2)
    wrapper = fopt.step
    assert wrapper._wrapped_by_lr_sched
    assert wrapper.__wrapped__ is original
    F.ExponentialLR(fopt, 0.5)
    assert fopt.step is wrapper
    assert not getattr(fopt, "_opt_called", False)
    p = fopt.param_groups[0]["params"][0]
    p.grad = np.ones(3)
    fopt.step()
    assert fopt._opt_called is True
    assert not np.all(p == 0)


def test_get_lr_outside_step_warns():
    topt, fopt = make_pair()
    ts, fs = T.StepLR(topt, 2), F.StepLR(fopt, 2)
    tw, fw = record(ts.get_lr), record(fs.get_lr)
    assert [c for c, _ in fw] == [c for c, _ in tw] == [UserWarning]
    assert "get_last_lr()" in fw[0][1]


def test_sequential_inner_restart_does_not_warn_deprecation():
    topt, fopt = make_pair()
    topt.step(), fopt.step()
    ts = T.SequentialLR(topt, [T.ConstantLR(topt, 0.5, 2), T.ExponentialLR(topt, 0.8)], [2])
    fs = F.SequentialLR(fopt, [F.ConstantLR(fopt, 0.5, 2), F.ExponentialLR(fopt, 0.8)], [2])
    for _ in range(4):
        topt.step(), fopt.step()
        tw, fw = record(ts.step), record(fs.step)
        assert [c for c, _ in fw] == [c for c, _ in tw]
        assert not any("deprecated" in m for _, m in fw)


# ------------------------------------------------------------------ bad arguments


BAD = [
    ("ConstantLR", lambda L, o: L.ConstantLR(o, factor=1.5), ValueError, "factor"),
    ("ConstantLR", lambda L, o: L.ConstantLR(o, factor=-0.1), ValueError, "factor"),
    ("LinearLR", lambda L, o: L.LinearLR(o, start_factor=0.0), ValueError, "start_factor"),
    ("LinearLR", lambda L, o: L.LinearLR(o, end_factor=1.5), ValueError, "end_factor"),
    ("WarmRestarts", lambda L, o: L.CosineAnnealingWarmRestarts(o, 0), ValueError, "T_0"),
    ("WarmRestarts", lambda L, o: L.CosineAnnealingWarmRestarts(o, 2.0), ValueError, "T_0"),
    ("WarmRestarts", lambda L, o: L.CosineAnnealingWarmRestarts(o, 2, 0), ValueError, "T_mult"),
    ("WarmRestarts", lambda L, o: L.CosineAnnealingWarmRestarts(o, 2, 1.5), ValueError,
     "T_mult"),
    ("WarmRestarts", lambda L, o: L.CosineAnnealingWarmRestarts(o, 2, eta_min="0"), ValueError,
     "eta_min"),
    ("OneCycle", lambda L, o: L.OneCycleLR(o, 0.1), ValueError, "total_steps"),
    ("OneCycle", lambda L, o: L.OneCycleLR(o, 0.1, total_steps=0), ValueError, "total_steps"),
    ("OneCycle", lambda L, o: L.OneCycleLR(o, 0.1, total_steps=5.0), ValueError, "total_steps"),
    ("OneCycle", lambda L, o: L.OneCycleLR(o, 0.1, epochs=0, steps_per_epoch=3), ValueError,
     "epochs"),
    ("OneCycle", lambda L, o: L.OneCycleLR(o, 0.1, epochs=2, steps_per_epoch=-3), ValueError,
     "steps_per_epoch"),
    ("OneCycle", lambda L, o: L.OneCycleLR(o, 0.1, 10, pct_start=1), ValueError, "pct_start"),
    ("OneCycle", lambda L, o: L.OneCycleLR(o, 0.1, 10, pct_start=1.5), ValueError, "pct_start"),
    ("OneCycle", lambda L, o: L.OneCycleLR(o, 0.1, 10, anneal_strategy="exp"), ValueError,
     "anneal_strategy"),
    ("OneCycle", lambda L, o: L.OneCycleLR(o, [0.1], 10), ValueError, "max_lr"),
    ("Cyclic", lambda L, o: L.CyclicLR(o, 0.1, 1.0, mode="square"), ValueError, "mode"),
    ("Cyclic", lambda L, o: L.CyclicLR(o, [0.1, 0.1, 0.1], 1.0), ValueError, "base_lr"),
    ("Cyclic", lambda L, o: L.CyclicLR(o, 0.1, 1.0, base_momentum=[0.1]), ValueError,
     "base_momentum"),
    ("Plateau", lambda L, o: L.ReduceLROnPlateau(o, factor=1.0), ValueError, "factor"),
    ("Plateau", lambda L, o: L.ReduceLROnPlateau(o, mode="mid"), ValueError, "mode"),
    ("Plateau", lambda L, o: L.ReduceLROnPlateau(o, threshold_mode="x"), ValueError,
     "threshold_mode"),
    ("Plateau", lambda L, o: L.ReduceLROnPlateau(o, min_lr=[0.1]), ValueError, "min_lr"),
    ("Lambda", lambda L, o: L.LambdaLR(o, [lambda e: 1.0]), ValueError, "lr_lambdas"),
    ("Multiplicative", lambda L, o: L.MultiplicativeLR(o, 0.5), TypeError, "lr_lambda"),
    ("Sequential", lambda L, o: L.SequentialLR(o, [], []), ValueError, "scheduler"),
    ("Sequential", lambda L, o: L.SequentialLR(o, [L.StepLR(o, 2)], [1]), ValueError,
     "milestone"),
    ("Sequential", lambda L, o: L.SequentialLR(o, [L.ReduceLROnPlateau(o)], []), ValueError,
     "ReduceLROnPlateau"),
    ("Chained", lambda L, o: L.ChainedScheduler([]), ValueError, "scheduler"),
    ("Chained", lambda L, o: L.ChainedScheduler([L.ReduceLROnPlateau(o)]), ValueError,
     "ReduceLROnPlateau"),
    ("NotOptimizer", lambda L, o: L.StepLR(object(), 2), TypeError, "not an Optimizer"),
    ("NotOptimizer", lambda L, o: L.OneCycleLR(object(), 0.1, 3), TypeError,
     "not an Optimizer"),
    ("NotOptimizer", lambda L, o: L.ReduceLROnPlateau(object()), TypeError,
     "not an Optimizer"),
]


@pytest.mark.parametrize("name,factory,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_like_torch(name, factory, exc, match):
    topt, fopt = make_pair()
    with pytest.raises(exc):
        factory(T, topt)
    with pytest.raises(exc, match=match):
        factory(F, fopt)


def test_cycle_momentum_needs_momentum_key():
    topt, fopt = make_pair("adagrad")
    for L, o in ((T, topt), (F, fopt)):
        with pytest.raises(ValueError, match="momentum"):
            L.CyclicLR(o, 0.1, 1.0)
        with pytest.raises(ValueError, match="momentum"):
            L.OneCycleLR(o, 0.1, 10)


def test_cosine_t_max_zero_fails_at_step_like_torch():
    topt, fopt = make_pair()
    ts, fs = T.CosineAnnealingLR(topt, 0), F.CosineAnnealingLR(fopt, 0)
    assert_same(ts, fs, topt, fopt, "initial")
    topt.step(), fopt.step()
    with pytest.raises(ZeroDivisionError):
        ts.step()
    with pytest.raises(ZeroDivisionError):
        fs.step()


def test_constant_factor_zero_divides_at_total_iters():
    topt, fopt = make_pair()
    ts, fs = T.ConstantLR(topt, 0.0, 2), F.ConstantLR(fopt, 0.0, 2)
    topt.step(), fopt.step()
    ts.step(), fs.step()
    with pytest.raises(ZeroDivisionError):
        ts.step()
    with pytest.raises(ZeroDivisionError):
        fs.step()


def test_recursive_and_closed_forms_differ_only_in_rounding():
    _, fopt = make_pair()
    fs = F.CosineAnnealingLR(fopt, 60)
    fopt.step()
    for _ in range(60):
        fs.step()
    closed = fs._get_closed_form_lr()
    assert fs.get_last_lr() == pytest.approx(closed, abs=1e-14)
    assert math.isclose(fs.get_last_lr()[0], 0.0, abs_tol=1e-14)


# ------------------------------------------------------------------ interleavings


INTERLEAVED = [c for c in CASES if c[0] in (
    "step-3", "multistep", "linear-up", "cosine-eta", "poly-2", "exponential", "constant-half",
    "cyclic-tri2", "onecycle-3phase", "sequential-3", "chained-3", "warm-restarts-mult",
    "lambda-list", "multiplicative")]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", INTERLEAVED, ids=[c[0] for c in INTERLEAVED])
def test_random_interleaving(case, seed):
    """Steps, user lr edits, jumps to an epoch, and reloading an earlier state_dict, in a
    random order, applied to both libraries: the lrs stay equal throughout."""
    topt, fopt, ts, fs = build(case)
    rng = random.Random(f"{case[0]}-{seed}")
    snapshots = []
    closed = not isinstance(fs, (F.SequentialLR, F.ChainedScheduler))
    for i in range(150):
        op = rng.random()
        if op < 0.6:
            topt.step(), fopt.step()
            ts.step(), fs.step()
        elif op < 0.7:
            k = rng.randrange(len(topt.param_groups))
            factor = rng.choice([0.5, 2.0, 1.25])
            topt.param_groups[k]["lr"] *= factor
            fopt.param_groups[k]["lr"] *= factor
        elif op < 0.8 and closed:
            e = rng.randrange(0, 250)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ts.step(e), fs.step(e)
        elif op < 0.9:
            groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                    for g in fopt.param_groups])
            snapshots.append((copy.deepcopy(ts.state_dict()), fs.state_dict(), groups))
        elif snapshots:
            tsd, fsd, groups = snapshots[rng.randrange(len(snapshots))]
            ts.load_state_dict(copy.deepcopy(tsd))
            fs.load_state_dict(fsd)
            for tg, fg, saved in zip(topt.param_groups, fopt.param_groups, groups):
                for k, v in saved.items():
                    tg[k] = copy.deepcopy(v)
                    fg[k] = copy.deepcopy(v)
        if isinstance(fs, F.OneCycleLR) and fs.last_epoch >= fs.total_steps:
            break
        assert group_values(fopt) == group_values(topt), i
        if not isinstance(fs, F.ChainedScheduler) or op < 0.6:
            assert fs.get_last_lr() == ts.get_last_lr(), i


@pytest.mark.parametrize("name", ["cyclic-tri2", "cyclic-exp", "onecycle", "onecycle-3phase",
                                  "warm-restarts-mult"])
def test_resume_cyclic_and_onecycle_with_last_epoch(name):
    """Rebuilding with last_epoch=k on an optimizer that already holds the group keys."""
    case = next(c for c in CASES if c[0] == name)
    topt, fopt, ts, fs = build(case)
    lockstep(topt, fopt, ts, fs, 50)
    k = ts.last_epoch
    kwargs = {
        "cyclic-tri2": lambda L, o: L.CyclicLR(o, [0.01, 0.001], [0.1, 0.02], 4, 6,
                                               mode="triangular2", last_epoch=k),
        "cyclic-exp": lambda L, o: L.CyclicLR(o, 0.001, 0.01, 7, mode="exp_range", gamma=0.99,
                                              last_epoch=k),
        "onecycle": lambda L, o: L.OneCycleLR(o, max_lr=0.1, total_steps=STEPS, last_epoch=k),
        "onecycle-3phase": lambda L, o: L.OneCycleLR(o, 1.0, epochs=30, steps_per_epoch=10,
                                                     three_phase=True, div_factor=10.0,
                                                     final_div_factor=100.0, last_epoch=k),
        "warm-restarts-mult": lambda L, o: L.CosineAnnealingWarmRestarts(
            o, 5, T_mult=2, eta_min=0.001, last_epoch=k),
    }[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts2, fs2 = kwargs(T, topt), kwargs(F, fopt)
    assert_same(ts2, fs2, topt, fopt, "resumed")
    lockstep(topt, fopt, ts2, fs2, 100)


def test_schedule_rounding_below_zero_still_steps_like_torch():
    topt, fopt = make_pair(lrs=(1.0, 1.0))
    ts = T.LinearLR(topt, start_factor=0.5433342482598822, end_factor=0.0, total_iters=12)
    fs = F.LinearLR(fopt, start_factor=0.5433342482598822, end_factor=0.0, total_iters=12)
    for _ in range(12):
        topt.step(), fopt.step(), ts.step(), fs.step()
    assert fs.get_last_lr() == ts.get_last_lr() and fs.get_last_lr()[0] < 0
    topt.step()
    fopt.step()  # torch accepts the tiny negative lr here
