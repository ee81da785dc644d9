"""Adafactor: lockstep with torch 2.13 (vector, matrix and 3-D parameters) in torch's float32
tolerance, convergence and bad input."""
import numpy as np
import pytest

import fastopt
from helpers import import_torch, rosenbrock, snapshot
from optim_db import inputs_of


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inp", inputs_of("Adafactor"))
def test_adafactor_lockstep_with_torch(inp, dtype):
    """100 steps of vector, matrix and 3-D parameters, in torch's float32 tolerance."""
    kwargs = inp.kwargs
    torch = import_torch(vector_kernels=False)
    rng = np.random.default_rng(5)
    shapes = [(1029,), (7, 5), (3, 4, 6), (1, 9)]
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    ts = [torch.tensor(x.copy(), requires_grad=True) for x in xs]
    opt = fastopt.Adafactor(ps, **kwargs)
    topt = torch.optim.Adafactor(ts, **kwargs)
    rtol, atol = (1.3e-6, 1e-5) if dtype == np.float32 else (1e-12, 1e-12)
    for step in range(100):
        for p, t in zip(ps, ts):
            g = (rng.standard_normal(p.shape) + 0.5 * np.asarray(p)).astype(dtype)
            p.grad = g
            t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        for p, t in zip(ps, ts):
            np.testing.assert_allclose(p, t.detach().numpy(), rtol=rtol, atol=atol,
                                       err_msg=f"step {step}")
    for p, t in zip(ps, ts):
        assert list(opt.state[p]) == list(topt.state[t])
        for key, v in opt.state[p].items():
            tv = topt.state[t][key].numpy()
            assert v.shape == tv.shape and v.dtype == tv.dtype
            np.testing.assert_allclose(v, tv, rtol=1e-4, atol=1e-7)


def test_adafactor_defaults():
    """No weight decay and clipping threshold 1 by default (the rest of the defaults and the
    invalid hyperparameters are checked against torch with the database)."""
    ours = fastopt.Adafactor([fastopt.Parameter(np.zeros(2, np.float32))])
    assert ours.defaults["weight_decay"] == 0.0 and ours.defaults["d"] == 1.0


def test_adafactor_converges():
    a = np.linspace(0.5, 2.0, 24).reshape(4, 6)
    w = fastopt.Parameter(np.ones((4, 6)))
    v = fastopt.Parameter(np.ones(5))
    opt = fastopt.Adafactor([w, v], lr=0.05)
    for _ in range(600):
        w.grad = a * np.asarray(w)
        v.grad = 2 * np.asarray(v)
        opt.step()
    assert np.abs(w).max() < 1e-2 and np.abs(v).max() < 1e-2
    p = fastopt.Parameter(np.array([-1.5, 2.0]))
    opt = fastopt.Adafactor([p], lr=0.01, eps=(None, 0.01))
    for _ in range(5000):
        p.grad = rosenbrock(np.asarray(p))[1]
        opt.step()
    # 12.5 -> ~2e-2: Adafactor's relative, RMS-clipped steps (about lr * RMS(p) per entry
    # once 1/sqrt(t) < lr) keep it oscillating in the valley at that level for any lr/eps
    assert rosenbrock(np.asarray(p))[0] < 0.05


def test_adafactor_bad_input_changes_nothing():
    ps = [fastopt.Parameter(np.ones((3, 4), np.float32)), fastopt.Parameter(np.ones(5, np.float32))]
    opt = fastopt.Adafactor([{"params": ps[:1]}, {"params": ps[1:]}])
    for p in ps:
        p.grad = np.ones_like(p)
    opt.step()
    before = [np.asarray(p).tobytes() for p in ps] + [
        v.tobytes() for p in ps for v in opt.state[p].values()]
    ps[1].grad = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    ps[1].grad = np.ones(5, np.float32)
    opt.state[ps[1]]["variance"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*variance"):
        opt.step()
    opt.state[ps[1]]["variance"] = np.zeros(5, np.float32)
    before[-1] = opt.state[ps[1]]["variance"].tobytes()
    assert [np.asarray(p).tobytes() for p in ps] + [
        v.tobytes() for p in ps for v in opt.state[p].values()] == before
    ps[1].grad = fastopt.SparseGrad([0], np.ones((1,), np.float32))
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def _two_groups(**group1):
    """An Adafactor of a matrix in group 0 and a vector in group 1, stepped once."""
    ps = [fastopt.Parameter(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)),
          fastopt.Parameter(np.linspace(1, 2, 5, dtype=np.float32))]
    opt = fastopt.Adafactor([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.05)
    for p in ps:
        p.grad = np.ones_like(p)
    opt.step()
    opt.param_groups[1].update(group1)
    return opt, ps


@pytest.mark.parametrize("eps, exc", [
    ((None, "x"), TypeError), (("x", 1e-3), TypeError), ((1e-30,), TypeError),
    (None, TypeError), ((None, np.ones(2)), TypeError)])
def test_adafactor_bad_eps_in_a_later_group_changes_nothing(eps, exc):
    """eps holds None, so it is not among the numbers every group's check converts: it is
    checked with every other group value before group 0 is updated."""
    opt, ps = _two_groups(eps=eps)
    before = snapshot(opt, ps)
    with pytest.raises(exc, match=r"param_groups\[1\]: eps"):
        opt.step()
    assert snapshot(opt, ps) == before
    opt.param_groups[1]["eps"] = (None, 1e-3)
    opt.step()
    assert float(opt.state[ps[1]]["step"]) == 2.0


@pytest.mark.parametrize("step", [np.zeros(1, np.float32), np.zeros((1, 1), np.float32),
                                  np.float32(1.0), np.array(1.0), 1.0])
def test_adafactor_step_counter_must_be_a_0d_float32_array(step):
    """A (1,)-shaped counter used to pass the check and fail in the update of a later
    group; any counter but torch's 0-d float32 array is refused before anything changes."""
    opt, ps = _two_groups()
    opt.state[ps[1]]["step"] = step
    before = snapshot(opt, ps)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\]: "
                                        r"state\['step'\] must be a writable 0-d float32"):
        opt.step()
    assert snapshot(opt, ps) == before


def test_adafactor_load_checks_the_step_counter():
    opt, ps = _two_groups()
    sd = opt.state_dict()
    sd["state"][1] = dict(sd["state"][1], step=np.ones(1, np.float32))
    opt.load_state_dict(sd)  # one element: made 0-d as torch's
    assert opt.state[ps[1]]["step"].shape == ()
    before = snapshot(opt, ps)
    for bad in ("x", None, np.ones(2, np.float32)):
        sd["state"][1] = dict(sd["state"][1], step=bad)
        with pytest.raises((TypeError, ValueError),
                           match=r"state\[1\]\['step'\] \(param_groups\[1\]\['params'\]\[0\]\)"):
            opt.load_state_dict(sd)
        assert snapshot(opt, ps) == before


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (2, 0, 3)])
def test_adafactor_empty_parameter_raises_before_anything_changes(shape):
    """torch divides by the parameter's size (ZeroDivisionError after the parameters before
    it were updated); fastopt refuses it first."""
    torch = import_torch(vector_kernels=False)
    ts = [torch.ones(3, requires_grad=True), torch.ones(shape, requires_grad=True)]
    for t in ts:
        t.grad = torch.ones_like(t)
    with pytest.raises(ZeroDivisionError):
        torch.optim.Adafactor(ts).step()
    ps = [fastopt.Parameter(np.ones(3, np.float32)), fastopt.Parameter(np.ones(shape, np.float32))]
    for p in ps:
        p.grad = np.ones_like(p)
    opt = fastopt.Adafactor(ps)
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]: .*no elements"):
        opt.step()
    assert snapshot(opt, ps) == before


class _FailingInit(fastopt.Adafactor):
    """Adafactor whose state creation runs out of memory for the parameter ``fail_at``
    (a real failed allocation, as a huge parameter would cause)."""

    fail_at = 1

    def _init_state(self, state, array, group):
        super()._init_state(state, array, group)
        if array.shape[0] == self.fail_at:
            state["variance"] = np.zeros((1 << 40, 1 << 20), np.float32)


def test_adafactor_state_is_created_for_all_new_parameters_or_none():
    xs = [np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), np.ones(1, np.float32)]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    for p in ps:
        p.grad = np.full_like(p, 0.5)
    opt = _FailingInit(ps)
    with pytest.raises(MemoryError):
        opt.step()
    assert len(opt.state) == 0
    assert all(np.array_equal(p, x) for p, x in zip(ps, xs))
    opt.fail_at = None
    opt.step()
    qs = [fastopt.Parameter(x.copy()) for x in xs]
    for q in qs:
        q.grad = np.full_like(q, 0.5)
    fastopt.Adafactor(qs).step()
    assert all(np.array_equal(p, q) for p, q in zip(ps, qs))
    assert all(float(opt.state[p]["step"]) == 1.0 for p in ps)
