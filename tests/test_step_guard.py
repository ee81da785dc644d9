"""Overlapping steps of one optimizer: a second ``step()`` while one runs, from another
thread, from the running step's closure or from a step hook, raises RuntimeError naming the
optimizer and changes nothing; a subclass's step may still call ``super().step()``."""
import threading

import numpy as np
import pytest

import fastopt
from helpers import P, assert_bits, snapshot
from optim_db import DB, OPTIM_DB

ALL = [info.name for info in OPTIM_DB]


# ---- two steps of one optimizer at once --------------------------------------------------------

def _case(name):
    """(optimizer, params, closure) for optimizer ``name``: a quadratic loss whose closure
    sets every gradient (row-sparse for SparseAdam)."""
    info = DB[name]
    shape = info.param_shape if len(info.param_shape) > 1 else (5,)
    if name == "SparseAdam":
        shape = (4, 3)
    ps = [P(*shape, seed=s) for s in range(2)]
    opt = info.cls(ps, **info.inputs[0].kwargs)

    def closure():
        loss = 0.0
        for k, p in enumerate(ps):
            x = np.asarray(p)
            c = np.float32(k + 1)
            loss += float(0.5 * c * np.sum(x.astype(np.float64) ** 2))
            if name == "SparseAdam":
                p.grad = fastopt.SparseGrad([0, 2], c * x[[0, 2]])
            else:
                p.grad = c * x
        return loss

    return opt, ps, closure


def _state_bits(opt, ps):
    """The parameters and their state, bit for bit, in parameter order."""
    state = snapshot(opt, ps)[1]
    return [np.asarray(p).tobytes() for p in ps], [state.get(id(p)) for p in ps]


@pytest.mark.parametrize("name", ALL)
def test_step_from_another_thread_during_a_step_raises(name):
    """Thread A is inside step() (its closure waits); thread B's step() raises
    RuntimeError naming the optimizer, and A's step ends as a step run alone would."""
    opt, ps, closure = _case(name)
    ref, qs, ref_closure = _case(name)
    inside, release = threading.Barrier(2), threading.Event()
    first = [True]

    def blocking_closure():
        if first[0]:
            first[0] = False
            inside.wait()
            assert release.wait(30)
        return closure()

    errors, results = [], []

    def a():
        try:
            results.append(opt.step(blocking_closure))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    ta = threading.Thread(target=a)
    ta.start()
    inside.wait()
    try:
        with pytest.raises(RuntimeError, match=rf"{name}\.step\(\) was called while another "
                                               rf"thread runs a step of the same {name}"):
            opt.step(closure)
    finally:
        release.set()
        ta.join()
    assert not errors
    assert results[0] == ref.step(ref_closure)
    assert _state_bits(opt, ps) == _state_bits(ref, qs)
    opt.step(closure)  # the guard is released
    ref.step(ref_closure)
    assert _state_bits(opt, ps) == _state_bits(ref, qs)


@pytest.mark.parametrize("name", ALL)
def test_step_from_inside_its_own_closure_raises(name):
    opt, ps, closure = _case(name)
    opt.step(closure)

    def reentrant():
        closure()
        opt.step(closure)

    before = _state_bits(opt, ps)
    with pytest.raises(RuntimeError, match=rf"{name}\.step\(\) was called from inside a step "
                                           rf"of the same {name} optimizer"):
        opt.step(reentrant)
    assert _state_bits(opt, ps) == before
    opt.step(closure)


def test_step_from_a_step_hook_raises_and_hooks_still_work():
    opt, ps, closure = _case("Adam")
    seen = []
    handle = opt.register_step_pre_hook(lambda o, args, kwargs: o.step())
    with pytest.raises(RuntimeError, match="from inside a step of the same Adam"):
        opt.step(closure)
    handle.remove()
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(float(o.state[ps[0]]["step"])))
    opt.step(closure)
    assert seen == [1.0]


def test_subclass_step_may_call_super_step():
    class Traced(fastopt.Adam):
        def step(self, closure=None):
            self.calls = getattr(self, "calls", 0) + 1
            return super().step(closure)

    opt, ps, _ = _case("Adam")
    traced = Traced([P(5, seed=s) for s in range(2)], **DB["Adam"].inputs[0].kwargs)
    for _ in range(3):
        for p, q in zip(ps, traced.param_groups[0]["params"]):
            q.grad = p.grad = np.asarray(p) * 2
        opt.step()
        traced.step()
    assert traced.calls == 3
    for p, q in zip(ps, traced.param_groups[0]["params"]):
        assert_bits(p, q)


def test_one_optimizer_per_thread_runs_concurrently():
    """The guard is per optimizer: threads stepping their own optimizers never see it."""
    n = 100000
    opts = [fastopt.Adam([fastopt.Parameter(np.zeros(n, np.float32))], lr=0.01)
            for _ in range(3)]
    start = threading.Barrier(3)
    errors = []

    def run(opt):
        p = opt.param_groups[0]["params"][0]
        start.wait()
        try:
            for _ in range(20):
                p.grad = np.ones(n, np.float32)
                opt.step()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    ts = [threading.Thread(target=run, args=(o,)) for o in opts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    q = fastopt.Parameter(np.zeros(n, np.float32))
    ref = fastopt.Adam([q], lr=0.01)
    for _ in range(20):
        q.grad = np.ones(n, np.float32)
        ref.step()
    for o in opts:
        assert_bits(o.param_groups[0]["params"][0], q)
