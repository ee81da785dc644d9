"""A signal handler that raises during a multi-group step never leaves some groups stepped and
others not: the kernels of all groups run in one call into C with the GIL released, and
nothing before that call changes a parameter."""
import signal

import numpy as np
import pytest

import fastopt

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")


class _Interrupt(Exception):
    pass


# ticks to let pass before raising; 0: disarmed. Raising once per arming keeps the test's own
# bookkeeping uninterrupted, and letting a varying number of ticks pass first spreads the
# interrupts over the whole step, not just its start.
_armed = [0]


def _raise(signum, frame):
    if _armed[0]:
        _armed[0] -= 1
        if _armed[0] == 0:
            raise _Interrupt()


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "ASGD", "Rprop", "Lion"])
def test_an_interrupt_during_a_multi_group_step_steps_all_groups_or_none(name):
    n, groups, steps = 40_000, 4, 300
    rng = np.random.default_rng(0)
    ps = [fastopt.Parameter(rng.standard_normal(n).astype(np.float32)) for _ in range(groups)]
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(groups)]
    kwargs = {"lr": 1e-3, **({"momentum": 0.9} if name == "SGD" else {})}
    opt = fastopt.OPTIMIZERS[name]([{"params": [p]} for p in ps], **kwargs)
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()  # state made: the interrupts fall in steps of the same length
    done = [0] * groups
    interrupted = completed = 0
    before = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, 1e-4, 1e-4)
    try:
        for i in range(steps):
            old = [np.array(p) for p in ps]
            for p, g in zip(ps, grads):
                p.grad = g
            try:
                _armed[0] = 1 + i % 8
                opt.step()
                _armed[0] = 0
                completed += 1
            except _Interrupt:
                interrupted += 1
            changed = [not np.array_equal(o, p) for o, p in zip(old, ps)]
            assert len(set(changed)) == 1, f"groups {changed} changed: half a step"
            done = [d + c for d, c in zip(done, changed)]
    finally:
        _armed[0] = 0
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    assert interrupted > 0 and completed > 0  # the handler did fire during steps
    assert len(set(done)) == 1


def test_an_interrupt_during_a_sparse_adam_step_steps_all_groups_or_none():
    rows, width, groups, steps = 2000, 256, 8, 120
    rng = np.random.default_rng(1)
    ps = [fastopt.Parameter(rng.standard_normal((rows, width)).astype(np.float32))
          for _ in range(groups)]
    idx = np.arange(0, rows, 2)
    vals = rng.standard_normal((len(idx), width)).astype(np.float32)
    opt = fastopt.SparseAdam([{"params": [p]} for p in ps], lr=1e-3)
    for p in ps:
        p.grad = fastopt.SparseGrad(idx, vals)
    opt.step()  # state made: the interrupts fall in steps of the same length
    interrupted = completed = 0
    before = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, 5e-4, 5e-4)  # a tick per group or so
    try:
        for i in range(steps):
            old = [np.array(p) for p in ps]
            for p in ps:
                p.grad = fastopt.SparseGrad(idx, vals)
            try:
                _armed[0] = 1 + i % 8
                opt.step()
                _armed[0] = 0
                completed += 1
            except _Interrupt:
                interrupted += 1
            changed = [not np.array_equal(o, p) for o, p in zip(old, ps)]
            assert len(set(changed)) == 1, f"groups {changed} changed: half a step"
            counts = {opt.state[p]["step"] if opt.state.get(p) else 0 for p in ps}
            assert len(counts) == 1, f"step counters {counts} differ"
    finally:
        _armed[0] = 0
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    assert interrupted > 0 and completed > 0


@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
def test_an_interrupt_during_a_numpy_written_step_steps_all_groups_or_none(name):
    """Adafactor and Muon update in NumPy, group after group: the handlers' exceptions wait
    until every group is done, and are raised then."""
    shape, groups, steps = (64, 64), 4, 80
    rng = np.random.default_rng(2)
    ps = [fastopt.Parameter(rng.standard_normal(shape).astype(np.float32))
          for _ in range(groups)]
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(groups)]
    opt = getattr(fastopt, name)([{"params": [p]} for p in ps], lr=1e-2)
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
    interrupted = completed = 0
    before = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, 2e-4, 2e-4)
    try:
        for i in range(steps):
            old = [np.array(p) for p in ps]
            try:
                _armed[0] = 1 + i % 8
                opt.step()
                _armed[0] = 0
                completed += 1
            except _Interrupt:
                interrupted += 1
            changed = [not np.array_equal(o, p) for o, p in zip(old, ps)]
            assert len(set(changed)) == 1, f"groups {changed} changed: half a step"
            assert signal.getsignal(signal.SIGALRM) is _raise  # the step put it back
    finally:
        _armed[0] = 0
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    assert interrupted > 0 and completed > 0
