"""fastopt.swa_utils: AveragedModel (SWA/EMA in C) and SWALR, against torch when installed."""

import copy
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import lr_scheduler as F
from fastopt import swa_utils as FS


class ArrayModel:
    """A minimal 'model' for AveragedModel: parameters() and buffers()."""

    def __init__(self, params, buffers=()):
        self.params = list(params)
        self.bufs = list(buffers)

    def parameters(self):
        return iter(self.params)

    def buffers(self):
        return iter(self.bufs)


def sgd(lrs=(1.0,)):
    groups = [{"params": [fastopt.Parameter(np.zeros(2))], "lr": lr} for lr in lrs]
    return fastopt.SGD(groups, lr=lrs[0])


# ------------------------------------------------------------------ no torch needed


def test_swalr_documented_trace():
    opt = sgd()
    sched = FS.SWALR(opt, swa_lr=0.1, anneal_epochs=4, anneal_strategy="linear")
    seen = [sched.get_last_lr()[0]]
    for _ in range(5):
        opt.step()
        sched.step()
        seen.append(sched.get_last_lr()[0])
    assert seen == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1, 0.1], rel=1e-15)
    assert opt.param_groups[0]["swa_lr"] == 0.1


def test_swalr_state_dict_and_errors():
    opt = sgd((1.0, 0.5))
    sched = FS.SWALR(opt, [0.1, 0.2], anneal_epochs=3)
    opt.step()
    sched.step()
    sd = sched.state_dict()
    assert "anneal_func" not in sd and sd["_anneal_strategy"] == "cos"
    with pytest.raises(ValueError, match="swa_lr"):
        FS.SWALR(opt, [0.1])
    with pytest.raises(ValueError, match="anneal_strategy"):
        FS.SWALR(opt, 0.1, anneal_strategy="exp")
    with pytest.raises(ValueError, match="anneal_epochs"):
        FS.SWALR(opt, 0.1, anneal_epochs=-1)
    with pytest.raises(ValueError, match="anneal_epochs"):
        FS.SWALR(opt, 0.1, anneal_epochs=2.0)
    with pytest.raises(TypeError, match="Optimizer"):
        FS.SWALR(object(), 0.1)
    other = FS.SWALR(sgd((1.0, 0.5)), 0.3, anneal_epochs=9, anneal_strategy="linear")
    other.load_state_dict(sd)
    assert other.anneal_epochs == 3 and other.anneal_func(0.5) == pytest.approx(0.5)
    assert other.state_dict() == sd
    with pytest.raises(ValueError, match="StepLR"):
        other.load_state_dict(F.StepLR(sgd((1.0, 0.5)), 2).state_dict())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_swa_is_the_running_mean(dtype):
    rng = np.random.default_rng(0)
    snaps = [[rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(7).astype(dtype)]
             for _ in range(6)]
    avg = FS.AveragedModel(snaps[0])
    for s in snaps:
        avg.update_parameters(s)
    assert avg.n_averaged == 6
    for i in range(2):
        mean = np.mean([s[i] for s in snaps], axis=0)
        assert avg.params[i].dtype == dtype
        np.testing.assert_allclose(avg.params[i], mean, rtol=1e-5 if dtype == np.float32 else 1e-13)


def test_ema_update_rule_and_copies():
    p = fastopt.Parameter(np.ones(4, dtype=np.float64))
    avg = FS.AveragedModel([p], multi_avg_fn=FS.get_ema_multi_avg_fn(0.9))
    assert avg.params[0] is not p and avg.params[0].base is None
    avg.update_parameters([p])  # first update copies
    p[...] = 2.0
    avg.update_parameters([p])
    np.testing.assert_array_equal(avg.params[0], np.full(4, 1.0 + 0.1 * (2.0 - 1.0)))
    assert np.all(p == 2.0)


def test_buffers_copied_or_averaged():
    w = np.zeros(3, np.float32)
    running = np.zeros(3, np.float32)
    count = np.array(0, dtype=np.int64)
    model = ArrayModel([w], [running, count])
    plain = FS.AveragedModel(model)
    with_buffers = FS.AveragedModel(model, use_buffers=True)
    for k in range(1, 5):
        w[...] = k
        running[...] = 10 * k
        count[...] = k
        plain.update_parameters(model)
        with_buffers.update_parameters(model)
    np.testing.assert_array_equal(plain.params[0], np.full(3, 2.5, np.float32))
    np.testing.assert_array_equal(plain.buffers[0], running)
    assert plain.buffers[1] == 4
    np.testing.assert_array_equal(with_buffers.buffers[0], np.full(3, 25.0, np.float32))
    # integer mean, truncated at every update as torch's copy_ into a long tensor does
    assert with_buffers.buffers[1] == 1


def test_custom_avg_fn_and_state_dict():
    calls = []

    def keep_max(avg, cur, n):
        calls.append(n)
        return np.maximum(avg, cur)

    w = np.array([1.0, 5.0])
    avg = FS.AveragedModel([w], avg_fn=keep_max)
    for v in ([1.0, 5.0], [3.0, 2.0], [0.0, 7.0]):
        w[...] = v
        avg.update_parameters([w])
    assert calls == [1, 2]
    np.testing.assert_array_equal(avg.params[0], [3.0, 7.0])
    sd = avg.state_dict()
    fresh = FS.AveragedModel([np.zeros(2)])
    fresh.load_state_dict(sd)
    assert fresh.n_averaged == 3
    np.testing.assert_array_equal(fresh.params[0], [3.0, 7.0])
    before = fresh.state_dict()
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict({"params": [np.zeros(3)], "buffers": [], "n_averaged": 1})
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({"params": [np.zeros(2)]})
    assert fresh.n_averaged == before["n_averaged"]
    np.testing.assert_array_equal(fresh.params[0], before["params"][0])


def test_averaged_model_bad_input():
    with pytest.raises(ValueError, match="Only one"):
        FS.AveragedModel([np.zeros(2)], avg_fn=FS.get_swa_avg_fn(),
                         multi_avg_fn=FS.get_swa_multi_avg_fn())
    with pytest.raises(AssertionError):  # torch raises AssertionError here
        FS.AveragedModel([np.zeros(2)], avg_fn=FS.get_swa_avg_fn(),
                         multi_avg_fn=FS.get_swa_multi_avg_fn())
    with pytest.raises(TypeError, match="array"):
        FS.AveragedModel(np.zeros(3))
    with pytest.raises(TypeError, match="numpy array"):
        FS.AveragedModel([[1.0, 2.0]])
    avg = FS.AveragedModel([np.zeros(2), np.zeros(3)])
    with pytest.raises(ValueError, match="3 arrays"):
        avg.update_parameters([np.zeros(2), np.zeros(3), np.zeros(1)])
    with pytest.raises(ValueError, match="shape"):
        avg.update_parameters([np.zeros(2), np.zeros(4)])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            FS.get_ema_multi_avg_fn(bad)
        with pytest.raises(ValueError, match="decay"):
            FS.get_ema_avg_fn(bad)


def test_non_contiguous_source_and_mixed_dtypes():
    a32 = np.arange(12, dtype=np.float32).reshape(3, 4)
    a64 = np.arange(6, dtype=np.float64)
    avg = FS.AveragedModel([a32, a64], multi_avg_fn=FS.get_ema_multi_avg_fn(0.5))
    avg.update_parameters([a32, a64])
    avg.update_parameters([np.asfortranarray(a32 * 3), a64[::-1].copy()[::-1] * 3])
    np.testing.assert_array_equal(avg.params[0], a32 * 2)
    np.testing.assert_array_equal(avg.params[1], a64 * 2)


# ------------------------------------------------------------------ torch parity


def _torch():
    return pytest.importorskip("torch", reason="torch is the oracle for swa_utils parity")


def _torch_model(torch, dtype):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(17, 9), torch.nn.BatchNorm1d(9)).to(dtype)
    return m


def _as_arrays(torch_model):
    params = [p.detach().numpy().copy() for p in torch_model.parameters()]
    bufs = [b.detach().numpy().copy() for b in torch_model.buffers()]
    return ArrayModel(params, bufs)


def _perturb(torch, torch_model, mine, k):
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for p, a in zip(torch_model.parameters(), mine.params):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 + k))
            a[...] = p.numpy()
        for b, a in zip(torch_model.buffers(), mine.bufs):
            if b.dtype.is_floating_point:
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + k)
            else:
                b.fill_(k * 3 + 1)
            a[...] = b.numpy()


AVG_CASES = ["swa-default", "ema-multi", "swa-multi", "ema-avg", "swa-avg", "swa-buffers",
             "ema-buffers"]


def _kwargs(lib, case):
    if case == "swa-default":
        return {}
    if case == "swa-buffers":
        return {"use_buffers": True}
    if case == "ema-multi":
        return {"multi_avg_fn": lib.get_ema_multi_avg_fn(0.9)}
    if case == "ema-buffers":
        return {"multi_avg_fn": lib.get_ema_multi_avg_fn(0.75), "use_buffers": True}
    if case == "swa-multi":
        return {"multi_avg_fn": lib.get_swa_multi_avg_fn()}
    if case == "ema-avg":
        return {"avg_fn": lib.get_ema_avg_fn(0.99)}
    if case == "swa-avg":
        return {"avg_fn": lib.get_swa_avg_fn()}
    raise AssertionError(case)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", AVG_CASES)
def test_averaged_model_matches_torch(case, dtype):
    torch = _torch()
    tmodel = _torch_model(torch, getattr(torch, dtype))
    mine = _as_arrays(tmodel)
    tavg = torch.optim.swa_utils.AveragedModel(tmodel, **_kwargs(torch.optim.swa_utils, case))
    favg = FS.AveragedModel(mine, **_kwargs(FS, case))
    for k in range(12):
        _perturb(torch, tmodel, mine, k)
        tavg.update_parameters(tmodel)
        favg.update_parameters(mine)
        assert favg.n_averaged == int(tavg.n_averaged)
        for t, f in zip(tavg.module.parameters(), favg.params):
            assert f.dtype == t.detach().numpy().dtype
            np.testing.assert_array_equal(f, t.detach().numpy(), err_msg=f"update {k}")
        for t, f in zip(tavg.module.buffers(), favg.buffers):
            np.testing.assert_array_equal(f, t.detach().numpy(), err_msg=f"buffer, update {k}")


SWALR_CASES = [
    (0.05, 4, "linear"),
    (0.01, 10, "cos"),
    ([0.01, 0.02], 0, "cos"),
    (0.5, 3, "linear"),
    (0.2, 1, "cos"),
]


@pytest.mark.parametrize("args", SWALR_CASES, ids=[str(a) for a in SWALR_CASES])
def test_swalr_matches_torch(args):
    torch = _torch()
    import test_lr_scheduler as lockstep_helpers

    topt, fopt = lockstep_helpers.make_pair()
    ts = torch.optim.swa_utils.SWALR(topt, *args)
    fs = FS.SWALR(fopt, *args)
    lockstep_helpers.assert_same(ts, fs, topt, fopt, "init")
    lockstep_helpers.lockstep(topt, fopt, ts, fs, 40)
    assert lockstep_helpers.comparable(fs.state_dict()) == ts.state_dict()


def test_swalr_after_cosine_like_torch_recipe():
    """The documented recipe: cosine annealing, then SWALR from epoch 30 on."""
    torch = _torch()
    import test_lr_scheduler as h

    topt, fopt = h.make_pair()
    tc, fc = torch.optim.lr_scheduler.CosineAnnealingLR(topt, 100), F.CosineAnnealingLR(fopt, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tswa = torch.optim.swa_utils.SWALR(topt, swa_lr=0.005, anneal_epochs=5)
        fswa = FS.SWALR(fopt, swa_lr=0.005, anneal_epochs=5)
    for epoch in range(60):
        topt.step(), fopt.step()
        if epoch >= 30:
            tswa.step(), fswa.step()
            h.assert_same(tswa, fswa, topt, fopt, epoch)
        else:
            tc.step(), fc.step()
            h.assert_same(tc, fc, topt, fopt, epoch)
    saved = copy.deepcopy(fswa.state_dict())
    assert saved == fswa.state_dict()


def test_float_updates_run_in_the_c_kernel(monkeypatch):
    """float32/float64 averages go through fastopt._kernels in one call per dtype group;
    other dtypes (float16 here) take the NumPy path with the same rule."""
    from fastopt import _kernels

    calls = []
    real = _kernels.average

    def spy(dst, src, weight, lerp):
        calls.append(([a.dtype for a in dst], weight, lerp))
        return real(dst, src, weight, lerp)

    monkeypatch.setattr(_kernels, "average", spy)
    arrays = [np.ones(5, np.float32), np.ones(3, np.float64), np.ones(4, np.float32),
              np.ones(2, np.float16)]
    swa = FS.AveragedModel(arrays)
    ema = FS.AveragedModel(arrays, multi_avg_fn=FS.get_ema_multi_avg_fn(0.75))
    for k in range(3):
        cur = [a * (k + 2) for a in arrays]
        swa.update_parameters(cur)
        ema.update_parameters(cur)
    # the first update copies; then one kernel call per float dtype and update
    assert sorted(str(c[0]) for c in calls) == sorted(
        [str([np.dtype(np.float32)] * 2), str([np.dtype(np.float64)])] * 4)
    assert {(c[1], c[2]) for c in calls} == {(2.0, False), (3.0, False), (0.25, True)}
    np.testing.assert_array_equal(swa.params[3], np.full(2, 3.0, np.float16))
    np.testing.assert_allclose(swa.params[0], np.full(5, 3.0))
