"""Muon: within a stated tolerance of torch 2.13 (torch's Newton-Schulz iteration runs in
bfloat16), the orthogonalisation itself, convergence and bad input."""
import numpy as np
import pytest

import fastopt
from helpers import import_torch, rosenbrock, snapshot
from optim_db import inputs_of


@pytest.mark.parametrize("inp", inputs_of("Muon"))
def test_muon_within_bfloat16_tolerance_of_torch(inp):
    """torch orthogonalises in bfloat16, fastopt in float32. Measured on these 64x32 and
    16x48 matrices: one update differs from torch's by at most 1.4-2.1% of its RMS (bf16
    keeps 8 significant bits), and after 100 steps of lr 0.02 the parameters agree within
    about 3e-3 absolute. Asserted: 5% per step, 1e-2 after 100 steps."""
    torch = import_torch(vector_kernels=False)
    kwargs = inp.kwargs
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(s).astype(np.float32) for s in [(64, 32), (16, 48)]]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    ts = [torch.tensor(x.copy(), requires_grad=True) for x in xs]
    opt = fastopt.Muon(ps, **kwargs)
    topt = torch.optim.Muon(ts, **kwargs)
    worst_step = 0.0
    for step in range(100):
        for p, t in zip(ps, ts):
            g = (rng.standard_normal(p.shape) + np.asarray(p)).astype(np.float32)
            p.grad = g
            t.grad = torch.from_numpy(g.copy())
        before = [np.asarray(p).copy() for p in ps]
        tbefore = [t.detach().numpy().copy() for t in ts]
        opt.step()
        topt.step()
        for p, t, b, tb in zip(ps, ts, before, tbefore):
            du, dt = np.asarray(p) - b, t.detach().numpy() - tb
            rms = np.sqrt(np.mean(dt ** 2))
            worst_step = max(worst_step, np.sqrt(np.mean((du - dt) ** 2)) / rms)
    assert worst_step < 0.05
    for p, t in zip(ps, ts):
        np.testing.assert_allclose(p, t.detach().numpy(), atol=1e-2, rtol=0)
        np.testing.assert_allclose(opt.state[p]["momentum_buffer"],
                                   topt.state[t]["momentum_buffer"].numpy(), atol=1e-2)


def test_muon_newton_schulz_orthogonalises():
    rng = np.random.default_rng(2)
    for shape in [(30, 10), (10, 30), (16, 16)]:
        g = rng.standard_normal(shape).astype(np.float32)
        o = fastopt.muon.newton_schulz(g)
        assert o.dtype == np.float32 and o.shape == shape
        s = np.linalg.svd(o, compute_uv=False)
        assert 0.5 < s.min() and s.max() < 1.3
        # same singular vectors as g
        u, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
        off = u.T @ o @ vt.T
        assert np.abs(off - np.diag(np.diag(off))).max() < 1e-4


def test_muon_takes_matrices_converges_and_a_bad_grad_changes_nothing():
    """(Invalid hyperparameters are in the database: tests/optim_db.py.)"""
    with pytest.raises(ValueError, match="only supports 2D parameters"):
        fastopt.Muon([fastopt.Parameter(np.ones(3, np.float32))])
    target = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    w = fastopt.Parameter(np.zeros((8, 5), np.float32))
    opt = fastopt.Muon([w], lr=0.02, weight_decay=0.0)
    for _ in range(400):
        w.grad = np.asarray(w) - target
        opt.step()
    assert np.abs(np.asarray(w) - target).max() < 0.05
    w.grad = np.ones((8, 4), np.float32)
    before = np.asarray(w).tobytes()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    assert np.asarray(w).tobytes() == before


def test_muon_converges_on_rosenbrock():
    # Muon on a 1 x 2 matrix: the orthogonalised update is the unit-norm gradient direction
    # (momentum-averaged), so it settles within about lr^2 of the minimum
    w = fastopt.Parameter(np.array([[-1.5, 2.0]]))
    opt = fastopt.Muon([w], lr=1e-3, weight_decay=0.0)
    for _ in range(8000):
        w.grad = rosenbrock(w.ravel())[1].reshape(1, 2)
        opt.step()
    assert rosenbrock(w.ravel())[0] < 1e-4


def _two_groups(**group1):
    """A Muon with one matrix per group, stepped once."""
    rng = np.random.default_rng(3)
    ps = [fastopt.Parameter(rng.standard_normal((4, 3)).astype(np.float32)),
          fastopt.Parameter(rng.standard_normal((2, 5)).astype(np.float32))]
    opt = fastopt.Muon([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.02)
    for p in ps:
        p.grad = np.ones_like(p)
    opt.step()
    opt.param_groups[1].update(group1)
    return opt, ps


@pytest.mark.parametrize("group1, exc, match", [
    (dict(ns_steps=2.5), TypeError, "ns_steps must be an int"),
    (dict(ns_steps=100), ValueError, "Number of steps must be less than 100"),
    (dict(ns_coefficients=(1.0, 2.0)), ValueError, "ns_coefficients must have 3 entries"),
    (dict(ns_coefficients=(1.0, "b", 2.0)), TypeError, r"ns_coefficients\[1\]"),
    (dict(eps="x"), TypeError, "eps must be a real number"),
    (dict(adjust_lr_fn="x"), ValueError, "Adjust learning rate function x"),
    (dict(nesterov="maybe", lr=None), TypeError, "lr must be a real number")])
def test_muon_bad_value_in_a_later_group_changes_nothing(group1, exc, match):
    """Every group's values are checked before group 0 is updated (ns_steps=2.5 used to
    fail in group 1's Newton-Schulz loop after group 0 had stepped)."""
    opt, ps = _two_groups(**group1)
    before = snapshot(opt, ps)
    with pytest.raises(exc, match=r"param_groups\[1\]: " + match):
        opt.step()
    assert snapshot(opt, ps) == before


def test_muon_ns_steps_takes_any_integer():
    opt, ps = _two_groups(ns_steps=np.int64(3))
    ref, qs = _two_groups(ns_steps=3)
    opt.step()
    ref.step()
    assert all(np.array_equal(p, q) for p, q in zip(ps, qs))


def test_muon_bad_state_in_a_later_group_changes_nothing():
    opt, ps = _two_groups()
    opt.state[ps[1]]["momentum_buffer"] = np.zeros((5, 2), np.float32)
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]: "
                                         r"state\['momentum_buffer'\]"):
        opt.step()
    assert snapshot(opt, ps) == before


@pytest.mark.parametrize("shape, fn, works", [
    ((0, 4), None, True), ((4, 0), "match_rms_adamw", True), ((0, 0), "match_rms_adamw", True),
    ((4, 0), None, False), ((4, 0), "original", False), ((0, 0), None, False)])
def test_muon_empty_parameter_as_torch_or_raises_first(shape, fn, works):
    """torch steps an empty matrix unless its learning-rate adjustment divides by the
    column count (ZeroDivisionError after the parameters before it were updated); there
    fastopt raises before anything changes."""
    torch = import_torch(vector_kernels=False)
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    ts = [torch.tensor(x.copy(), requires_grad=True), torch.ones(shape, requires_grad=True)]
    ps = [fastopt.Parameter(x.copy()), fastopt.Parameter(np.ones(shape, np.float32))]
    for t, p in zip(ts, ps):
        t.grad = torch.ones_like(t)
        p.grad = np.ones_like(p)
    opt = fastopt.Muon(ps, lr=0.02, adjust_lr_fn=fn)
    topt = torch.optim.Muon(ts, lr=0.02, adjust_lr_fn=fn)
    if works:
        topt.step()
        opt.step()
        np.testing.assert_allclose(ps[0], ts[0].detach().numpy(), atol=1e-3)
        assert opt.state[ps[1]]["momentum_buffer"].shape == shape
        return
    with pytest.raises(ZeroDivisionError):
        topt.step()
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]: .*no columns"):
        opt.step()
    assert snapshot(opt, ps) == before


class _FailingInit(fastopt.Muon):
    """Muon whose state creation runs out of memory for a parameter with ``fail_rows`` rows
    (a real failed allocation, as a huge parameter would cause)."""

    fail_rows = 2

    def _init_state(self, state, array, group):
        super()._init_state(state, array, group)
        if array.shape[0] == self.fail_rows:
            state["momentum_buffer"] = np.zeros((1 << 40, 1 << 20), np.float32)


def test_muon_state_is_created_for_all_new_parameters_or_none():
    rng = np.random.default_rng(8)
    xs = [rng.standard_normal(s).astype(np.float32) for s in [(4, 3), (2, 5)]]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    for p in ps:
        p.grad = np.ones_like(p)
    opt = _FailingInit(ps, lr=0.02)
    with pytest.raises(MemoryError):
        opt.step()
    assert len(opt.state) == 0
    assert all(np.array_equal(p, x) for p, x in zip(ps, xs))
    opt.fail_rows = None
    opt.step()
    qs = [fastopt.Parameter(x.copy()) for x in xs]
    for q in qs:
        q.grad = np.ones_like(q)
    fastopt.Muon(qs, lr=0.02).step()
    assert all(np.array_equal(p, q) for p, q in zip(ps, qs))
