"""Muon: torch 2.13's numbers (its Newton-Schulz iteration in bfloat16, emulated op by op),
the float32 iteration as an option, the orthogonalisation itself, convergence and bad input."""
import copy
import pickle

import numpy as np
import pytest

import fastopt
from fastopt.muon import newton_schulz
from helpers import import_torch, rosenbrock, snapshot
from optim_db import inputs_of

COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _lockstep(kwargs, steps, dtype=np.float32, shapes=((64, 32), (16, 48)), seed=4):
    """Run fastopt's and torch's Muon side by side on the same gradients (which depend on
    fastopt's parameters); returns (worst per-step difference relative to the RMS of torch's
    update, the optimizers and their parameters)."""
    torch = import_torch(vector_kernels=False)
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    ts = [torch.tensor(x.copy(), requires_grad=True) for x in xs]
    ns_dtype = kwargs.pop("ns_dtype", None)
    opt = fastopt.Muon(ps, **kwargs)
    if ns_dtype is not None:
        opt.ns_dtype = ns_dtype
    topt = torch.optim.Muon(ts, **kwargs)
    worst_step = 0.0
    for _ in range(steps):
        for p, t in zip(ps, ts):
            g = (rng.standard_normal(p.shape) + np.asarray(p)).astype(dtype)
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
    return worst_step, opt, topt, ps, ts


@pytest.mark.parametrize("inp", inputs_of("Muon"))
def test_muon_matches_torch_in_lockstep(inp):
    """The default iteration is torch's bfloat16 one. Its operations agree with torch's bit
    for bit but for a float32 summation order (see the tests of newton_schulz below), whose
    rare differences the iteration amplifies: measured on these 64x32 and 16x48 matrices,
    one update differs from torch's by at most 1.3 % of its RMS and after 100 steps of lr
    0.02 the parameters agree within 4e-4 (the float32 iteration: 2 % and 3.3e-3). Asserted:
    3 % per step, 1.2e-3 after 100 steps. The momentum buffers, which see the same gradients,
    are torch's bit for bit (one rounding per lerp)."""
    worst_step, opt, topt, ps, ts = _lockstep(dict(inp.kwargs), 100)
    assert worst_step < 0.03
    for p, t in zip(ps, ts):
        np.testing.assert_allclose(p, t.detach().numpy(), atol=1.2e-3, rtol=0)
        np.testing.assert_array_equal(opt.state[p]["momentum_buffer"],
                                      topt.state[t]["momentum_buffer"].numpy())


@pytest.mark.parametrize("inp", inputs_of("Muon"))
def test_muon_float32_iteration_within_bfloat16_tolerance_of_torch(inp):
    """``ns_dtype="float32"`` orthogonalises more accurately than torch: one update differs
    from torch's by about bfloat16's resolution (measured at most 2.1 % of its RMS, 3.3e-3
    after 100 steps). Asserted: 5 % per step, 1e-2 after 100 steps."""
    worst_step, opt, _, ps, ts = _lockstep({**inp.kwargs, "ns_dtype": "float32"}, 100)
    assert opt.ns_dtype == "float32" and "ns_dtype" not in opt.param_groups[0]
    assert worst_step < 0.05
    for p, t in zip(ps, ts):
        np.testing.assert_allclose(p, t.detach().numpy(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_muon_step_is_torchs_on_small_matrices(dtype):
    """Where the matrix products are short sums (a few columns), torch's and fastopt's
    bfloat16 iterations round alike (on the machine this was written on, bit for bit); the
    lerps (one rounding) are exactly torch's. The parameters are compared within one
    bfloat16 rounding of the update, since torch's bfloat16 matrix product sums in an order
    that depends on the CPU (oneDNN's AMX or AVX-512 path, or a portable loop)."""
    kwargs = {"lr": 0.02, "weight_decay": 0.1}
    _, opt, topt, ps, ts = _lockstep(kwargs, 3, dtype, shapes=((3, 7), (7, 3), (5, 9), (1, 4)),
                                     seed=11)
    for p, t in zip(ps, ts):
        assert np.asarray(p).dtype == dtype
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=0, atol=3 * 0.02 * 2 ** -7)
        np.testing.assert_array_equal(opt.state[p]["momentum_buffer"],
                                      topt.state[t]["momentum_buffer"].numpy())


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_non_contiguous_momentum_buffer_updates_in_place(nesterov):
    """A momentum buffer set to a Fortran-ordered array (state entries need not be
    C-contiguous) is updated in place with the same numbers as a C-ordered one."""
    x = np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32)
    ps = [fastopt.Parameter(x.copy()) for _ in range(2)]
    opts = [fastopt.Muon([p], lr=0.02, nesterov=nesterov) for p in ps]
    for k in range(3):
        g = np.random.default_rng(k).standard_normal((4, 9)).astype(np.float32)
        for p, opt in zip(ps, opts):
            p.grad = g.copy()
            opt.step()
        if k == 0:
            buf = np.asfortranarray(opts[1].state[ps[1]]["momentum_buffer"])
            opts[1].state[ps[1]]["momentum_buffer"] = buf
    assert opts[1].state[ps[1]]["momentum_buffer"] is buf and not buf.flags.c_contiguous
    np.testing.assert_array_equal(buf, opts[0].state[ps[0]]["momentum_buffer"])
    np.testing.assert_array_equal(ps[1], ps[0])


def _torch_ns(g, steps=5, eps=1e-7):
    torch = import_torch(vector_kernels=False)
    from torch.optim._muon import _zeropower_via_newtonschulz
    return _zeropower_via_newtonschulz(torch.from_numpy(g), COEFFICIENTS, steps,
                                       eps).float().numpy()


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 64), (7, 5), (1, 2), (3, 3)])
def test_newton_schulz_is_torchs_bfloat16_iteration(shape):
    """Five iterations on small matrices: torch's result but for at most 1 % of the elements
    (measured: none, or one of 2048), and every value a bfloat16 one. The float32 iteration
    differs from torch's almost everywhere."""
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    t = _torch_ns(g)
    o = newton_schulz(g)
    assert o.dtype == np.float32 and o.shape == shape
    assert not (o.view(np.uint32) & 0xFFFF).any()
    assert np.mean(o != t) <= 0.01
    np.testing.assert_allclose(o, t, atol=2 ** -8, rtol=0)
    if g.size > 4:
        assert np.mean(newton_schulz(g, dtype="float32") != t) > 0.5


@pytest.mark.parametrize("shape", [(64, 200), (128, 128), (200, 64)])
@pytest.mark.parametrize("steps, share", [(1, 1e-3), (2, 1e-2)])
def test_newton_schulz_operations_round_as_torchs(shape, steps, share):
    """One or two iterations on larger matrices: every operation rounds as torch's, so all
    elements are torch's but those where torch's float32 sums (in another order) round to
    another bfloat16, and what the next iteration spreads from them (measured over 12
    matrices: at most 8e-5 of the elements after one iteration, 0.3 % after two); the
    float32 iteration matches almost none."""
    g = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    t = _torch_ns(g, steps)
    assert np.mean(newton_schulz(g, COEFFICIENTS, steps) != t) < share
    assert np.mean(newton_schulz(g, COEFFICIENTS, steps, dtype="float32") != t) > 0.9


@pytest.mark.parametrize("g", [np.zeros((3, 5)), np.full((3, 5), 1e-9), np.full((2, 3), np.nan),
                               np.array([[np.inf, 1.0]]), np.array([[1.0, np.nan, 2.0]])],
                         ids=["zeros", "tiny", "nan", "inf", "one-nan"])
def test_newton_schulz_edge_values_as_torch(g):
    """A zero matrix stays zero, a norm below eps is clamped to bfloat16's eps, NaN and inf
    give NaN everywhere, without warnings."""
    g = g.astype(np.float32)
    with np.errstate(all="raise"):
        o = newton_schulz(g)
    np.testing.assert_array_equal(o, _torch_ns(g))


def test_newton_schulz_float64_input_rounds_through_float32_as_torch():
    g = np.random.default_rng(5).standard_normal((4, 9)) * (1 + 2 ** -30)
    o, t = newton_schulz(g), _torch_ns(g)
    assert np.mean(o != t) <= 0.03  # short sums: measured bit for bit (CPU-dependent order)
    np.testing.assert_allclose(o, t, atol=2 ** -8, rtol=0)
    assert newton_schulz(g, dtype="float64").dtype == np.float64


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_muon_newton_schulz_orthogonalises(dtype):
    rng = np.random.default_rng(2)
    tol = 1e-4 if dtype == "float32" else 2e-2
    for shape in [(30, 10), (10, 30), (16, 16)]:
        g = rng.standard_normal(shape).astype(np.float32)
        o = newton_schulz(g, dtype=dtype)
        assert o.dtype == np.float32 and o.shape == shape
        s = np.linalg.svd(o, compute_uv=False)
        assert 0.5 < s.min() and s.max() < 1.3
        # same singular vectors as g
        u, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
        off = u.T @ o @ vt.T
        assert np.abs(off - np.diag(np.diag(off))).max() < tol


def test_muon_ns_dtype_is_checked_and_kept_by_copies():
    """``ns_dtype`` is an attribute (torch's signature, groups and state dicts have no such
    key): a bad
    value is refused by ``step`` before anything changes; pickling and deepcopy keep it; a
    torch state dict loads and steps as torch."""
    torch = import_torch(vector_kernels=False)
    opt, ps = _two_groups()
    assert opt.ns_dtype == "bfloat16" and "ns_dtype" not in opt.state_dict()["param_groups"][0]
    opt.ns_dtype = None
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match="ns_dtype must be one of"):
        opt.step()
    assert snapshot(opt, ps) == before
    opt.ns_dtype = "float32"
    assert copy.deepcopy(opt).ns_dtype == pickle.loads(pickle.dumps(opt)).ns_dtype == "float32"
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    t = torch.tensor(x, requires_grad=True)
    topt = torch.optim.Muon([t], lr=0.02)
    t.grad = torch.ones_like(t)
    topt.step()
    p = fastopt.Parameter(t.detach().numpy().copy())
    opt = fastopt.Muon([p], lr=0.02)
    opt.load_state_dict(fastopt.interop.state_dict_from_torch(topt.state_dict()))
    p.grad = np.ones_like(p)
    t.grad = torch.ones_like(t)
    opt.step()
    topt.step()
    np.testing.assert_array_equal(p, t.detach().numpy())


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
