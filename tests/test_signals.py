"""A signal handler that raises during a multi-group step (Ctrl-C's KeyboardInterrupt, or any
exception) never leaves some groups stepped and others not. The per-element kernels of all
groups run in one call into C with the GIL released, SparseAdam's in one compiled call with
its counters, and Adafactor's and Muon's NumPy updates hold the handlers back until every
group is done."""
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


def _interrupted_steps(opt, ps, set_grads, steps, interval):
    """Step ``opt`` ``steps`` times under SIGALRM every ``interval`` seconds whose handler
    raises; after every step, interrupted or not, all of ``ps`` changed or none did (and
    their step counters agree)."""
    set_grads()
    opt.step()  # state made: the interrupts fall in steps of the same length
    interrupted = completed = 0
    before = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        for i in range(steps):
            old = [np.array(p) for p in ps]
            set_grads()
            try:
                # every fifth step runs through, however slow the build (under ASan)
                _armed[0] = 0 if i % 5 == 4 else 1 + i % 8
                opt.step()
                _armed[0] = 0
                completed += 1
            except _Interrupt:
                interrupted += 1
            changed = [not np.array_equal(o, p) for o, p in zip(old, ps)]
            assert len(set(changed)) == 1, f"groups {changed} changed: half a step"
            counts = {float(opt.state[p]["step"]) for p in ps if "step" in opt.state[p]}
            assert len(counts) <= 1, f"step counters {counts} differ"
            assert signal.getsignal(signal.SIGALRM) is _raise  # the step put it back
    finally:
        _armed[0] = 0
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    assert interrupted > 0 and completed > 0  # the handler did fire, and steps did finish


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "ASGD", "Rprop", "Lion"])
def test_an_interrupt_during_a_multi_group_step_steps_all_groups_or_none(name):
    rng = np.random.default_rng(0)
    ps = [fastopt.Parameter(rng.standard_normal(40_000).astype(np.float32)) for _ in range(4)]
    grads = [rng.standard_normal(40_000).astype(np.float32) for _ in ps]

    def set_grads():
        for p, g in zip(ps, grads):
            p.grad = g

    kwargs = {"lr": 1e-3, **({"momentum": 0.9} if name == "SGD" else {})}
    opt = fastopt.OPTIMIZERS[name]([{"params": [p]} for p in ps], **kwargs)
    _interrupted_steps(opt, ps, set_grads, 300, 1e-4)


def test_an_interrupt_during_a_sparse_adam_step_steps_all_groups_or_none():
    rng = np.random.default_rng(1)
    ps = [fastopt.Parameter(rng.standard_normal((2000, 256)).astype(np.float32))
          for _ in range(8)]
    idx = np.arange(0, 2000, 2)
    vals = rng.standard_normal((len(idx), 256)).astype(np.float32)

    def set_grads():
        for p in ps:
            p.grad = fastopt.SparseGrad(idx, vals)

    opt = fastopt.SparseAdam([{"params": [p]} for p in ps], lr=1e-3)
    _interrupted_steps(opt, ps, set_grads, 120, 5e-4)  # a tick per group or so


@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
def test_an_interrupt_during_a_numpy_written_step_steps_all_groups_or_none(name):
    rng = np.random.default_rng(2)
    ps = [fastopt.Parameter(rng.standard_normal((64, 64)).astype(np.float32))
          for _ in range(4)]
    grads = [rng.standard_normal((64, 64)).astype(np.float32) for _ in ps]

    def set_grads():
        for p, g in zip(ps, grads):
            p.grad = g

    opt = getattr(fastopt, name)([{"params": [p]} for p in ps], lr=1e-2)
    _interrupted_steps(opt, ps, set_grads, 80, 2e-4)
