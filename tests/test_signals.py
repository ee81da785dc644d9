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


_armed = [False]


def _raise(signum, frame):
    # raises once per arming, so that the test's own bookkeeping is never interrupted
    if _armed[0]:
        _armed[0] = False
        raise _Interrupt()


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "ASGD", "Rprop", "Lion"])
def test_an_interrupt_during_a_multi_group_step_steps_all_groups_or_none(name):
    n, groups, steps = 40_000, 4, 300
    rng = np.random.default_rng(0)
    ps = [fastopt.Parameter(rng.standard_normal(n).astype(np.float32)) for _ in range(groups)]
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(groups)]
    kwargs = {"lr": 1e-3, **({"momentum": 0.9} if name == "SGD" else {})}
    opt = fastopt.OPTIMIZERS[name]([{"params": [p]} for p in ps], **kwargs)
    done = [0] * groups
    interrupted = 0
    before = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, 1e-4, 1e-4)
    try:
        for _ in range(steps):
            old = [np.array(p) for p in ps]
            for p, g in zip(ps, grads):
                p.grad = g
            try:
                _armed[0] = True
                opt.step()
                _armed[0] = False
            except _Interrupt:
                interrupted += 1
            changed = [not np.array_equal(o, p) for o, p in zip(old, ps)]
            assert len(set(changed)) == 1, f"groups {changed} changed: half a step"
            done = [d + c for d, c in zip(done, changed)]
    finally:
        _armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    assert interrupted > 0  # the handler did fire during steps
    assert len(set(done)) == 1
