"""Issue 4's per-element optimizers: Adadelta, Adamax, NAdam, RAdam, ASGD, Rprop, Lion.

* kernels vs the NumPy reference (reference_extra.py) to the last bit, float32 at every
  tail size and float64 at small sizes, on every ISA level, with 1 and 2 threads;
* lockstep with torch.optim 2.13 for 100 steps over a grid of flags: bit for bit for the
  optimizers without a square root (Adamax, ASGD, Rprop); within torch's float32 tolerance
  (rtol 1.3e-6, atol 1e-5) for the others, because torch's CPU sqrt is MKL's and not the
  correctly rounded one (see TORCH_SEMANTICS.md, headline 3);
* Lion (absent from torch) against the paper's Algorithm 2 written in float64;
* convergence on a quadratic and on Rosenbrock with tuned settings;
* bad input: a clear error naming group and parameter, and nothing changed.
"""
import os

import numpy as np
import pytest

import fastopt
import reference_extra as ref

NAMES = ["Adadelta", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop", "Lion"]

#: (name, constructor kwargs): a grid over each optimizer's flags (the reference gets the same)
CASES = [
    ("Adadelta", dict(lr=1.0)),
    ("Adadelta", dict(lr=0.5, rho=0.3, eps=1e-4, weight_decay=0.1, maximize=True)),
    ("Adamax", dict(lr=2e-2)),
    ("Adamax", dict(lr=1e-2, betas=(0.3, 0.9), weight_decay=0.1, maximize=True)),
    ("Adamax", dict(lr=1e-2, betas=(0.8, 0.99), eps=0.0)),
    ("NAdam", dict(lr=1e-2)),
    ("NAdam", dict(lr=1e-2, betas=(0.4, 0.99), weight_decay=0.1)),
    ("NAdam", dict(lr=1e-2, weight_decay=0.2, decoupled_weight_decay=True, maximize=True,
                   momentum_decay=1e-2)),
    ("RAdam", dict(lr=1e-2)),
    ("RAdam", dict(lr=1e-2, betas=(0.3, 0.9), weight_decay=0.1)),
    ("RAdam", dict(lr=1e-2, weight_decay=0.2, decoupled_weight_decay=True, maximize=True)),
    ("ASGD", dict(lr=1e-2, t0=3)),
    ("ASGD", dict(lr=5e-2, lambd=0.1, alpha=0.5, t0=0, weight_decay=0.1, maximize=True)),
    ("ASGD", dict(lr=1e-2)),
    ("Rprop", dict(lr=1e-2)),
    ("Rprop", dict(lr=1e-3, etas=(0.3, 1.5), step_sizes=(1e-4, 0.02), maximize=True)),
    ("Lion", dict(lr=1e-2)),
    ("Lion", dict(lr=1e-2, betas=(0.2, 0.4), weight_decay=0.5, maximize=True)),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]
SIZES32 = [0, 1, 7, 15, 16, 17, 1029, 100003]
SIZES64 = [0, 1, 7, 15, 16, 17]


def _grads(rng, shape, dtype, k):
    """Random gradients with exact zeros, sign flips and repeated values (Rprop's cases)."""
    g = rng.standard_normal(shape).astype(dtype)
    if g.size:
        g.flat[:: 5] = 0
        if k % 2:
            g.flat[1:: 3] *= -1
    return g


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def _same(a, b):
    """Bit-identical, except that any two NaNs are equal (their sign and payload are not
    specified: C and NumPy may produce different NaN bit patterns for the same operation)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b))
                and np.array_equal(_bits(a)[~nan], _bits(b)[~nan]))


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_kernel_matches_reference_bitwise(name, kwargs, dtype, nthreads, isa, threads):
    threads(nthreads)
    rng = np.random.default_rng(7)
    sizes = SIZES32 if dtype == np.float32 else SIZES64
    xs = [rng.standard_normal(n).astype(dtype) for n in sizes]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    opt = fastopt.OPTIMIZERS[name](ps, **kwargs)
    refs = [x.copy() for x in xs]
    states = [ref.init_state(name, x, kwargs) for x in xs]
    for k in range(4):
        for i, p in enumerate(ps):
            g = _grads(rng, p.shape, dtype, k)
            p.grad = g
            with np.errstate(all="ignore"):
                refs[i] = ref.step(name, refs[i], g, states[i], kwargs)
        opt.step()
        for i, p in enumerate(ps):
            assert np.array_equal(_bits(p), _bits(refs[i])), (
                f"size {sizes[i]} step {k}: {np.flatnonzero(_bits(p) != _bits(refs[i]))[:5]}")
            for key, value in states[i].items():
                ours = opt.state[p][key]
                if key == "step":
                    assert float(ours) == value
                else:
                    assert np.array_equal(_bits(np.asarray(ours, dtype=np.asarray(value).dtype)),
                                          _bits(np.asarray(value))), (key, sizes[i], k)


def test_nan_and_inf_follow_the_reference():
    """Special values go through the same operations as in the reference (and torch)."""
    vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3e38, -1.0], np.float32)
    for name, kwargs in CASES:
        p = fastopt.Parameter(np.ones(8, np.float32))
        opt = fastopt.OPTIMIZERS[name]([p], **kwargs)
        r = np.ones(8, np.float32)
        st = ref.init_state(name, r, kwargs)
        for g in (vals, vals[::-1].copy(), np.ones(8, np.float32)):
            p.grad = g
            opt.step()
            with np.errstate(all="ignore"):
                r = ref.step(name, r, g, st, kwargs)
            assert _same(p.view(np.ndarray), r), name


def test_lion_sign_of_zero_is_zero():
    p = fastopt.Parameter(np.array([1.0, 2.0, 3.0], np.float32))
    opt = fastopt.Lion([p], lr=0.1)
    p.grad = np.array([0.0, -1.0, 1.0], np.float32)
    opt.step()
    assert p.tolist() == [1.0, np.float32(2.1), np.float32(2.9)]


def test_lion_matches_paper_algorithm_float64():
    """Lion against the paper's Algorithm 2, written independently in float64. The kernel
    regroups theta - lr (sign(c) + wd theta) as theta (1 - lr wd) - lr sign(c), so the two
    differ by rounding only (a few ulps per step)."""
    rng = np.random.default_rng(3)
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.3)
    x = rng.standard_normal(1029)
    p = fastopt.Parameter(x.copy())
    opt = fastopt.Lion([p], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                       weight_decay=hyper["weight_decay"])
    q, m = x.copy(), np.zeros_like(x)
    for _ in range(100):
        g = rng.standard_normal(x.shape)
        p.grad = g
        opt.step()
        q, m = ref.lion_paper(q, g, m, **hyper)
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-13)
        np.testing.assert_allclose(opt.state[p]["exp_avg"], m, rtol=0, atol=1e-14)


# ---- torch lockstep ------------------------------------------------------------------------

TORCH_CASES = [c for c in CASES if c[0] != "Lion"] + [
    ("ASGD", dict(lr=1e-2, t0=50, lambd=1e-3)),
    ("RAdam", dict(lr=1e-3)),
    ("Rprop", dict(lr=0.05, step_sizes=(1e-3, 0.1))),
]
EXACT = {"Adamax", "ASGD", "Rprop"}


def _torch():
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    torch = pytest.importorskip("torch", reason="torch is not installed: parity tests need it")
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        pytest.skip(f"torch runs its {cap} kernels (unfused); fastopt follows the AVX2 ones")
    return torch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,kwargs", TORCH_CASES,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(TORCH_CASES)])
def test_lockstep_with_torch(name, kwargs, dtype):
    torch = _torch()
    rng = np.random.default_rng(2024)
    shapes = [(1029,), (7, 5)]
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    ts = [torch.tensor(x.copy(), requires_grad=True) for x in xs]
    opt = fastopt.OPTIMIZERS[name](ps, **kwargs)
    topt = getattr(torch.optim, name)(ts, **kwargs)
    exact = name in EXACT
    rtol, atol = (1.3e-6, 1e-5) if dtype == np.float32 else (1e-12, 1e-12)
    for step in range(100):
        for p, t in zip(ps, ts):
            g = _grads(rng, p.shape, dtype, step) + 0.3 * np.asarray(p)
            p.grad = g
            t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        for p, t in zip(ps, ts):
            ours, theirs = np.asarray(p), t.detach().numpy()
            if exact:
                assert np.array_equal(_bits(ours), _bits(theirs)), f"step {step}"
            else:
                np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol,
                                           err_msg=f"step {step}")
    for p, t in zip(ps, ts):
        ours, theirs = opt.state[p], topt.state[t]
        assert list(ours) == list(theirs)
        for key in ours:
            tv = theirs[key].detach().numpy()
            ov = np.asarray(ours[key])
            assert ov.dtype == tv.dtype and ov.shape == tv.shape, key
            if exact or ov.ndim == 0:
                assert np.array_equal(_bits(ov), _bits(tv)), key
            else:
                np.testing.assert_allclose(ov, tv, rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "Lion"])
def test_defaults_match_torch(name):
    torch = _torch()
    t = getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)])
    ours = fastopt.OPTIMIZERS[name]([fastopt.Parameter(np.zeros(2, np.float32))])
    assert ours.defaults == t.defaults


INVALID = [
    ("Adadelta", dict(lr=-1.0), "Invalid learning rate: -1.0"),
    ("Adadelta", dict(rho=1.5), "Invalid rho value: 1.5"),
    ("Adadelta", dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    ("Adadelta", dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    ("Adamax", dict(lr=float("nan")), "Invalid learning rate: nan"),
    ("Adamax", dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
    ("Adamax", dict(eps=-1e-8), "Invalid epsilon value"),
    ("NAdam", dict(momentum_decay=-1.0), "Invalid momentum_decay value: -1.0"),
    ("NAdam", dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    ("NAdam", dict(weight_decay=-0.1), "Invalid weight_decay value"),
    ("RAdam", dict(lr=-1e-3), "Invalid learning rate"),
    ("RAdam", dict(betas=(-0.1, 0.9)), "Invalid beta parameter at index 0"),
    ("ASGD", dict(lr=-1.0), "Invalid learning rate"),
    ("ASGD", dict(weight_decay=-1.0), "Invalid weight_decay value"),
    ("Rprop", dict(etas=(1.0, 1.2)), r"Invalid eta values: 1.0, 1.2"),
    ("Rprop", dict(etas=(0.5, 1.0)), r"Invalid eta values: 0.5, 1.0"),
    ("Rprop", dict(lr=-1.0), "Invalid learning rate"),
    ("Lion", dict(lr=-1.0), "Invalid learning rate"),
    ("Lion", dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1"),
    ("Lion", dict(weight_decay=-1.0), "Invalid weight_decay value"),
]


@pytest.mark.parametrize("name,kwargs,match", INVALID)
def test_invalid_hyperparameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.OPTIMIZERS[name]([fastopt.Parameter(np.zeros(2, np.float32))], **kwargs)
    if name != "Lion":
        torch = pytest.importorskip("torch")
        with pytest.raises(ValueError, match=match):
            getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **kwargs)


# ---- bad input -------------------------------------------------------------------------------

def _snapshot(opt, params):
    out = [np.asarray(p).tobytes() for p in params]
    for p in params:
        for k, v in opt.state.get(p, {}).items():
            out.append((k, np.asarray(v).tobytes()))
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["shape", "dtype", "type", "state"])
def test_bad_input_changes_nothing(name, bad):
    rng = np.random.default_rng(0)
    ps = [fastopt.Parameter(rng.standard_normal(n).astype(np.float32)) for n in (5, 3, 4)]
    opt = fastopt.OPTIMIZERS[name]([{"params": ps[:1]}, {"params": ps[1:]}])
    for p in ps:
        p.grad = np.ones_like(p)
    opt.step()
    opt.step()
    for p in ps:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    target = ps[2]
    if bad == "shape":
        target.grad = np.ones(7, np.float32)
    elif bad == "dtype":
        target.grad = np.ones(4, np.float64)
    elif bad == "type":
        target.grad = [1.0, 2.0, 3.0, 4.0]
    else:
        key = [k for k in opt.state[target] if np.ndim(opt.state[target][k]) > 0][0]
        opt.state[target][key] = np.zeros(9, np.float32)
    before = _snapshot(opt, ps)
    with pytest.raises((ValueError, TypeError), match=r"param_groups\[1\]\['params'\]\[1\]"):
        opt.step()
    assert _snapshot(opt, ps) == before


@pytest.mark.parametrize("name,key", [("NAdam", "mu_product"), ("ASGD", "eta"), ("ASGD", "mu")])
def test_bad_scalar_state_changes_nothing(name, key):
    ps = [fastopt.Parameter(np.ones(3, np.float32)) for _ in range(2)]
    opt = fastopt.OPTIMIZERS[name]([{"params": ps[:1]}, {"params": ps[1:]}])
    for p in ps:
        p.grad = np.ones_like(p)
    opt.step()
    opt.state[ps[1]][key] = 0.5  # a Python float instead of a 0-d float32 array
    before = _snapshot(opt, ps[:1]) + [np.asarray(ps[1]).tobytes()]
    with pytest.raises(TypeError, match=rf"param_groups\[1\]\['params'\]\[0\].*{key}"):
        opt.step()
    assert _snapshot(opt, ps[:1]) + [np.asarray(ps[1]).tobytes()] == before


# ---- convergence ---------------------------------------------------------------------------

TUNED = {
    "Adadelta": dict(lr=1.0, rho=0.9, eps=1e-4),
    "Adamax": dict(lr=0.05),
    "NAdam": dict(lr=0.05),
    "RAdam": dict(lr=0.05),
    "ASGD": dict(lr=0.05, t0=100),
    "Rprop": dict(lr=0.01),
    "Lion": dict(lr=0.01),
}
#: Rosenbrock from (-1.5, 2), loss 12.5 at the start: (settings, steps, loss to reach).
#: Adadelta's unit-free steps crawl along the valley (it oscillates around loss ~1 for any
#: rho/eps/lr we tried), so it is only required to make a 10x progress.
ROSEN = {
    "Adadelta": (dict(lr=1.0, rho=0.95, eps=1e-5), 2000, 1.25),
    "Adamax": (dict(lr=0.02), 8000, 1e-8),
    "NAdam": (dict(lr=0.005), 8000, 1e-5),
    "RAdam": (dict(lr=0.01), 8000, 1e-6),
    "ASGD": (dict(lr=1e-3, t0=1e9), 8000, 1e-3),
    "Rprop": (dict(lr=1e-3, step_sizes=(1e-9, 0.1)), 8000, 1e-8),
    "Lion": (dict(lr=1e-3), 8000, 1e-8),
}


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_quadratic(name):
    a = np.linspace(0.5, 2.0, 20)
    p = fastopt.Parameter(np.ones(20))
    opt = fastopt.OPTIMIZERS[name]([p], **TUNED[name])
    for _ in range(500):
        p.grad = a * np.asarray(p)
        opt.step()
    assert 0.5 * np.sum(a * np.asarray(p) ** 2) < 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_rosenbrock(name):
    kwargs, steps, tol = ROSEN[name]
    p = fastopt.Parameter(np.array([-1.5, 2.0]))
    opt = fastopt.OPTIMIZERS[name]([p], **kwargs)
    for _ in range(steps):
        x, y = p
        p.grad = np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])
        opt.step()
    x, y = p
    assert (1 - x) ** 2 + 100 * (y - x * x) ** 2 < tol, (x, y)


@pytest.mark.parametrize("name,kwargs", [c for c in CASES if c[0] in EXACT],
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES) if n in EXACT])
def test_special_values_bitwise_with_torch(name, kwargs):
    """NaN, infinities, signed zeros and denormals go through the same operations as in
    torch (NaNs compared as NaNs: their sign bit is not specified)."""
    torch = _torch()
    vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3e38, -1.0, 2.0, -3e-39,
                     5.0, -5.0, 1e-20, 0.5, -0.25, 7.0, 1.0], np.float32)
    p = fastopt.Parameter(np.linspace(-2, 2, vals.size).astype(np.float32))
    t = torch.tensor(np.asarray(p).copy(), requires_grad=True)
    opt = fastopt.OPTIMIZERS[name]([p], **kwargs)
    topt = getattr(torch.optim, name)([t], **kwargs)
    rng = np.random.default_rng(1)
    for k in range(6):
        g = rng.permutation(vals) if k % 2 else -vals
        p.grad = g
        t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        assert _same(p.view(np.ndarray), t.detach().numpy()), k
        for key, v in opt.state[p].items():
            assert _same(np.asarray(v), topt.state[t][key].numpy()), (k, key)


@pytest.mark.parametrize("name,kwargs", [c for c in TORCH_CASES if c[0] in EXACT],
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(TORCH_CASES) if n in EXACT])
def test_duplicate_parameter_steps_twice_as_torch(name, kwargs):
    """A parameter listed twice in a group is updated twice per step (torch warns and does
    the same): the second occurrence sees the step counter, eta and mu the first left."""
    torch = _torch()
    x = np.random.default_rng(8).standard_normal(40).astype(np.float32)
    p = fastopt.Parameter(x.copy())
    t = torch.tensor(x.copy(), requires_grad=True)
    with pytest.warns(UserWarning, match="40967"):
        opt = fastopt.OPTIMIZERS[name]([p, p], **kwargs)
    with pytest.warns(UserWarning):
        topt = getattr(torch.optim, name)([t, t], **kwargs)
    rng = np.random.default_rng(3)
    for k in range(8):
        g = rng.standard_normal(40).astype(np.float32)
        p.grad = g
        t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        assert np.array_equal(_bits(p), _bits(t.detach().numpy())), k
    for key, v in opt.state[p].items():
        assert np.array_equal(_bits(np.asarray(v)), _bits(topt.state[t][key].numpy())), key


def test_state_dict_round_trip_continues_identically():
    for name, kwargs in CASES:
        rng = np.random.default_rng(6)
        grads = [rng.standard_normal(33).astype(np.float32) for _ in range(10)]
        x = rng.standard_normal(33).astype(np.float32)
        a = fastopt.Parameter(x.copy())
        oa = fastopt.OPTIMIZERS[name]([a], **kwargs)
        b = fastopt.Parameter(x.copy())
        ob = fastopt.OPTIMIZERS[name]([b], **kwargs)
        for k, g in enumerate(grads):
            if k == 5:
                sd = ob.state_dict()
                b2 = fastopt.Parameter(np.asarray(b).copy())
                ob = fastopt.OPTIMIZERS[name]([b2], **kwargs)
                ob.load_state_dict(sd)
                b = b2
            a.grad = g
            b.grad = g
            oa.step()
            ob.step()
        assert np.array_equal(_bits(a), _bits(b)), name


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_maximize_equals_minimizing_the_negated_gradient(name, kwargs):
    rng = np.random.default_rng(12)
    x = rng.standard_normal(37).astype(np.float32)
    a, b = fastopt.Parameter(x.copy()), fastopt.Parameter(x.copy())
    oa = fastopt.OPTIMIZERS[name]([a], **dict(kwargs, maximize=True))
    ob = fastopt.OPTIMIZERS[name]([b], **dict(kwargs, maximize=False))
    for _ in range(5):
        g = rng.standard_normal(37).astype(np.float32)
        a.grad, b.grad = g, -g
        oa.step()
        ob.step()
    assert np.array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("name", ["Adadelta", "Adamax", "NAdam", "RAdam", "ASGD", "Lion"])
def test_zero_lr_leaves_parameters_unchanged(name):
    x = np.random.default_rng(13).standard_normal(21).astype(np.float32)
    p = fastopt.Parameter(x.copy())
    opt = fastopt.OPTIMIZERS[name]([p], lr=0.0)
    for _ in range(3):
        p.grad = np.ones_like(x)
        opt.step()
    assert np.array_equal(_bits(p), _bits(x))
