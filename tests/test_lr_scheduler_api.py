"""fastopt.lr_scheduler without torch: documented examples, state_dict contract, bad input."""

import copy
import math
import pickle
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import lr_scheduler as L


def make_opt(lr=0.05, groups=1, kind="sgd"):
    params = [{"params": [fastopt.Parameter(np.zeros(2))]} for _ in range(groups)]
    if kind == "adam":
        return fastopt.Adam(params, lr=lr)
    return fastopt.SGD(params, lr=lr, momentum=0.9)


def run(opt, sched, epochs):
    """lr used in each epoch 0..epochs-1, stepping as the documentation's training loops do."""
    seen = []
    for _ in range(epochs):
        seen.append(list(sched.get_last_lr()))
        opt.step()
        sched.step()
    return seen


# ------------------------------------------------------------------ documentation examples


def test_steplr_doc_example():
    opt = make_opt(0.05)
    lrs = [v[0] for v in run(opt, L.StepLR(opt, step_size=30, gamma=0.1), 100)]
    for e, lr in enumerate(lrs):
        expected = 0.05 * 0.1 ** (e // 30)
        assert lr == pytest.approx(expected, rel=1e-12), e
    assert lrs[29] == 0.05 and lrs[30] == pytest.approx(0.005) and lrs[60] == pytest.approx(5e-4)


def test_multisteplr_doc_example():
    opt = make_opt(0.05)
    lrs = [v[0] for v in run(opt, L.MultiStepLR(opt, milestones=[30, 80], gamma=0.1), 100)]
    assert set(lrs[:30]) == {0.05}
    assert all(lr == pytest.approx(0.005) for lr in lrs[30:80])
    assert all(lr == pytest.approx(0.0005) for lr in lrs[80:])


def test_exponentiallr_doc_example():
    opt = make_opt(0.05)
    lrs = [v[0] for v in run(opt, L.ExponentialLR(opt, gamma=0.9), 50)]
    for e, lr in enumerate(lrs):
        assert lr == pytest.approx(0.05 * 0.9**e, rel=1e-13)


def test_lambdalr_doc_example_two_groups():
    opt = make_opt(0.05, groups=2)
    sched = L.LambdaLR(opt, lr_lambda=[lambda epoch: epoch // 30, lambda epoch: 0.95**epoch])
    for e, (a, b) in enumerate(run(opt, sched, 100)):
        assert a == 0.05 * (e // 30)
        assert b == 0.05 * 0.95**e


def test_constant_and_linear_doc_examples():
    opt = make_opt(0.05)
    lrs = [v[0] for v in run(opt, L.ConstantLR(opt, factor=0.5, total_iters=4), 7)]
    assert lrs == [0.025] * 4 + [0.05] * 3
    opt = make_opt(0.05)
    lrs = [v[0] for v in run(opt, L.LinearLR(opt, start_factor=0.5, total_iters=4), 7)]
    assert lrs == pytest.approx([0.025, 0.03125, 0.0375, 0.04375, 0.05, 0.05, 0.05], rel=1e-15)


def test_reduce_on_plateau_doc_example():
    opt = make_opt(0.1)
    sched = L.ReduceLROnPlateau(opt, "min")  # patience 10, factor 0.1
    losses = [1.0, 0.9, 0.8] + [0.8] * 30
    lrs = []
    for loss in losses:
        opt.step()
        sched.step(loss)
        lrs.append(sched.get_last_lr()[0])
    # improvement stops at epoch 2; the 11th epoch without improvement (epoch 13) reduces
    assert lrs[:13] == [0.1] * 13
    assert lrs[13] == pytest.approx(0.01)
    assert lrs[24] == pytest.approx(0.001) and lrs[23] == pytest.approx(0.01)
    assert sched.best == 0.8


def test_cosine_closed_form_values():
    opt = make_opt(1.0)
    sched = L.CosineAnnealingLR(opt, T_max=10, eta_min=0.1)
    for e, (lr,) in enumerate(run(opt, sched, 21)):
        # recursive form: equal to the closed form up to rounding
        assert lr == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * e / 10)) / 2, abs=1e-14)


def test_onecycle_shape():
    opt = make_opt(0.1)
    sched = L.OneCycleLR(opt, max_lr=1.0, total_steps=100)
    momenta = []
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        momenta.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0 / 25)
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 29
    assert lrs[-1] == pytest.approx(1.0 / 25 / 1e4)
    assert momenta[0] == 0.95 and momenta[29] == pytest.approx(0.85)
    assert momenta[99] == pytest.approx(0.95)
    assert min(momenta) == momenta[29]


def test_cyclic_momentum_on_adam_betas():
    opt = make_opt(0.1, kind="adam")
    sched = L.CyclicLR(opt, 0.01, 0.1, step_size_up=2, base_momentum=0.8, max_momentum=0.9)
    betas = []
    for _ in range(5):
        betas.append(opt.param_groups[0]["betas"])
        opt.step()
        sched.step()
    assert [b[0] for b in betas] == pytest.approx([0.9, 0.85, 0.8, 0.85, 0.9])
    assert all(b[1] == 0.999 for b in betas)


# ------------------------------------------------------------------ state_dict contract


def make_step(opt):
    return L.StepLR(opt, 3, gamma=0.5)


def test_state_dict_is_a_copy_and_round_trips():
    opt = make_opt()
    sched = L.MultiStepLR(opt, [2, 5], 0.5)
    run(opt, sched, 4)
    sd = sched.state_dict()
    assert sd["_scheduler_class"] == "MultiStepLR"
    sd["base_lrs"].append(99)
    assert sched.base_lrs == [0.05]
    sd = sched.state_dict()
    opt2 = make_opt()
    other = L.MultiStepLR(opt2, [7], 0.1)
    other.load_state_dict(sd)
    assert other.state_dict() == sd
    sd["milestones"][9] = 1
    assert 9 not in other.milestones
    assert pickle.loads(pickle.dumps(sd)) == sd


def test_load_from_another_class_is_refused_and_changes_nothing():
    opt = make_opt()
    lam = L.LambdaLR(opt, lambda e: 0.9**e)
    mul = L.MultiplicativeLR(make_opt(), lambda e: 0.9)  # same keys as LambdaLR
    before = lam.state_dict()
    with pytest.raises(ValueError, match="MultiplicativeLR.*LambdaLR"):
        lam.load_state_dict(mul.state_dict())
    assert lam.state_dict() == before
    step = make_step(make_opt())
    with pytest.raises(ValueError, match="StepLR"):
        L.ExponentialLR(make_opt(), 0.5).load_state_dict(step.state_dict())


def test_load_with_missing_or_unexpected_keys_changes_nothing():
    opt = make_opt()
    sched = make_step(opt)
    run(opt, sched, 5)
    before = sched.state_dict()
    sd = make_step(make_opt()).state_dict()
    del sd["gamma"]
    with pytest.raises(ValueError, match="missing keys \\['gamma'\\]"):
        sched.load_state_dict(sd)
    sd = make_step(make_opt()).state_dict()
    sd["extra"] = 1
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        sched.load_state_dict(sd)
    with pytest.raises(TypeError, match="dict"):
        sched.load_state_dict([("gamma", 0.1)])
    assert sched.state_dict() == before


def test_nested_state_dict_checked_before_anything_changes():
    opt = make_opt()
    seq = L.SequentialLR(opt, [L.ConstantLR(opt, 0.5, 2), L.ExponentialLR(opt, 0.9)], [2])
    run(opt, seq, 6)
    sd = seq.state_dict()
    bad = copy.deepcopy(sd)
    del bad["_schedulers"][1]["gamma"]
    bad["last_epoch"] = 1000
    before = copy.deepcopy(seq.state_dict())
    with pytest.raises(ValueError, match="gamma"):
        seq.load_state_dict(bad)
    assert seq.state_dict() == before
    bad = copy.deepcopy(sd)
    bad["_schedulers"] = bad["_schedulers"][:1]
    with pytest.raises(ValueError, match="_schedulers"):
        seq.load_state_dict(bad)
    assert seq.state_dict() == before


def test_state_dict_without_class_key_accepted():
    """Dicts written by torch carry no class marker; matching keys are enough."""
    opt = make_opt()
    sched = make_step(opt)
    run(opt, sched, 4)
    sd = sched.state_dict()
    del sd["_scheduler_class"]
    other = make_step(make_opt())
    other.load_state_dict(sd)
    assert other.last_epoch == 4 and other._step_count == 5


class Warm:
    def __init__(self, n):
        self.n = n

    def __call__(self, e):
        return min(1.0, (e + 1) / self.n)


def test_lambda_state_dict_saves_callable_objects_only():
    opt = make_opt(groups=2)
    sched = L.LambdaLR(opt, [Warm(5), lambda e: 1.0])
    sd = sched.state_dict()
    assert sd["lr_lambdas"] == [{"n": 5}, None]
    other = L.LambdaLR(make_opt(groups=2), [Warm(50), lambda e: 1.0])
    other.load_state_dict(sd)
    assert other.lr_lambdas[0].n == 5
    with pytest.raises(ValueError, match="lr_lambdas"):
        other.load_state_dict({**sd, "lr_lambdas": [None]})


def test_cyclic_custom_scale_fn_state():
    opt = make_opt()
    fn = Warm(3)
    sched = L.CyclicLR(opt, 0.01, 0.1, 2, scale_fn=fn)
    sd = sched.state_dict()
    assert sd["_scale_fn_custom"] == {"n": 3}
    fn2 = Warm(8)
    other = L.CyclicLR(make_opt(), 0.01, 0.1, 2, scale_fn=fn2)
    other.load_state_dict(sd)
    assert fn2.n == 3
    lam = L.CyclicLR(make_opt(), 0.01, 0.1, 2, scale_fn=lambda x: 1.0)
    assert lam.state_dict()["_scale_fn_custom"] is None


# ------------------------------------------------------------------ other contract points


def test_alias_and_registry():
    assert L._LRScheduler is L.LRScheduler
    assert set(L.SCHEDULERS) >= {"StepLR", "OneCycleLR", "ReduceLROnPlateau", "FunctionLR"}
    for cls in L.SCHEDULERS.values():
        assert issubclass(cls, L.LRScheduler)


def test_initial_lr_and_base_lrs():
    opt = make_opt(0.3, groups=2)
    opt.param_groups[1]["lr"] = 0.7
    sched = L.ExponentialLR(opt, 0.5)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.3, 0.7]
    assert sched.base_lrs == [0.3, 0.7]
    assert sched.last_epoch == 0 and sched._step_count == 1
    second = L.StepLR(opt, 2)
    run(opt, sched, 2)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.3, 0.7]
    assert second.base_lrs == [0.3, 0.7]


def test_array_lr_updated_in_place():
    opt = make_opt()
    lr = np.array(0.05)
    opt.param_groups[0]["lr"] = lr
    sched = L.ExponentialLR(opt, 0.5)
    assert opt.param_groups[0]["initial_lr"] is not lr
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.025
    assert sched.get_last_lr()[0] is not lr and float(sched.get_last_lr()[0]) == 0.025


# optimizers whose step() needs something else than a dense gradient (2-D params suit Muon)
_SPECIAL_STEP = {"SparseAdam", "LBFGS"}


def test_scheduler_on_every_optimizer():
    for name, cls in fastopt.OPTIMIZERS.items():
        if name in _SPECIAL_STEP:
            continue
        opt = cls([fastopt.Parameter(np.ones((3, 3)))], lr=0.1)
        sched = L.CosineAnnealingLR(opt, 4)
        p = opt.param_groups[0]["params"][0]
        for _ in range(4):
            p.grad = np.ones((3, 3))
            opt.step()
            sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-16), name


def test_no_warning_in_the_recommended_loop():
    opt = make_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = L.OneCycleLR(opt, 0.1, total_steps=20)
        for _ in range(20):
            opt.step()
            sched.step()
