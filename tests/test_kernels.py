"""Kernels against the NumPy reference (tests/reference.py), to the last bit.

Every valid configuration runs at sizes that cover every vector tail (0, 1, 7, 15, 16, 17,
1029) and a large size (100003, where two threads split the work), on each ISA level this
CPU supports, with 1 and 2 threads. The float64 reference computes fma with exact rationals,
which is slow: at the large sizes it checks a sample of elements (start, end, the thread
split point and random ones), enough since every element is updated independently.
"""
import numpy as np
import pytest

import fastopt
import reference as R
from cases import VALID

SMALL = [0, 1, 7, 15, 16, 17, 1029]
STEPS = 3


def run_both(name, kwargs, n, dtype, rng, steps=STEPS, shape=None):
    shape = (n,) if shape is None else shape
    x = rng.standard_normal(shape).astype(dtype)
    p = fastopt.Parameter(x.copy())
    opt = fastopt.OPTIMIZERS[name]([p], **kwargs)
    ref_p = x.copy()
    state = R.new_state(name, ref_p, kwargs)
    for _ in range(steps):
        g = rng.standard_normal(shape).astype(dtype)
        p.grad = g
        opt.step()
        ref_p = R.step(name, ref_p, g, state, kwargs)
    return p, opt, ref_p, state


def assert_bits(actual, expected):
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype
    # equal bit patterns (NaN payloads included) or, for NaN, both NaN
    assert actual.shape == expected.shape
    itype = np.int32 if actual.dtype == np.float32 else np.int64
    same = actual.reshape(-1).view(itype) == expected.reshape(-1).view(itype)
    ok = same | (np.isnan(actual.reshape(-1)) & np.isnan(expected.reshape(-1)))
    assert ok.all(), f"{(~ok).sum()} of {ok.size} elements differ; first at {np.argmin(ok)}"


def check_state(name, opt, p, state):
    st = opt.state[p]
    for key, value in state.items():
        if key == "step":
            assert float(st["step"]) == value
        elif value is not None:
            assert_bits(st[key], value)


@pytest.mark.parametrize("name,kwargs", VALID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VALID)])
@pytest.mark.parametrize("n", SMALL)
def test_float32_matches_reference(name, kwargs, n, isa, rng):
    p, opt, ref_p, state = run_both(name, kwargs, n, np.float32, rng)
    assert_bits(p, ref_p)
    check_state(name, opt, p, state)


@pytest.mark.parametrize("name,kwargs", VALID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VALID)])
@pytest.mark.parametrize("n", [1, 17, 67])
def test_float64_matches_reference(name, kwargs, n, isa, rng):
    p, opt, ref_p, state = run_both(name, kwargs, n, np.float64, rng)
    assert_bits(p, ref_p)
    check_state(name, opt, p, state)


@pytest.mark.parametrize("name,kwargs", VALID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VALID)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_large_float32_any_thread_count(name, kwargs, nthreads, isa, threads, rng):
    threads(nthreads)
    p, opt, ref_p, state = run_both(name, kwargs, 100003, np.float32, rng, steps=2)
    assert_bits(p, ref_p)
    check_state(name, opt, p, state)


def test_isa_levels_give_identical_bits(rng):
    """The same run on every supported level (and thread count) gives the same bits."""
    from fastopt import _kernels
    before, nthr = _kernels.get_isa(), fastopt.get_num_threads()
    results = []
    try:
        for level in [l for l in _kernels.isa_levels() if _kernels.isa_supported(l)]:
            for nthreads in (1, 2):
                _kernels.set_isa(level)
                fastopt.set_num_threads(nthreads)
                out = []
                for name, kwargs in VALID:
                    p, _, _, _ = run_both(name, kwargs, 70001, np.float32,
                                          np.random.default_rng(7), steps=2)
                    out.append(np.asarray(p).copy())
                results.append(out)
    finally:
        _kernels.set_isa(before)
        fastopt.set_num_threads(nthr)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_bits(a, b)


@pytest.mark.parametrize("name,kwargs", VALID[:: 3])
def test_multi_tensor_group_matches_reference(name, kwargs, rng, threads):
    """Many tensors of mixed sizes and shapes in one group, with the work split over two
    threads, equal the reference tensor by tensor."""
    threads(2)
    shapes = [(3, 5), (40000,), (), (1,), (17, 33), (30001,), (0,), (2, 2, 2)]
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    opt = fastopt.OPTIMIZERS[name](ps, **kwargs)
    refs = [x.copy() for x in xs]
    states = [R.new_state(name, r, kwargs) for r in refs]
    for _ in range(3):
        for i, s in enumerate(shapes):
            g = rng.standard_normal(s).astype(np.float32)
            ps[i].grad = g
            refs[i] = R.step(name, refs[i], g, states[i], kwargs)
        opt.step()
    for p, r in zip(ps, refs):
        assert_bits(p, r)


def test_nan_and_inf_gradients_propagate_as_torch():
    """NaN gradients give NaN parameters; in Adam +inf gives NaN (inf/inf), as in torch."""
    p = fastopt.Parameter(np.zeros(4, np.float32))
    opt = fastopt.Adam([p], lr=0.1)
    p.grad = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    opt.step()
    out = np.asarray(p)
    assert np.isnan(out[:3]).all()
    assert np.isclose(out[3], -0.1, rtol=1e-6)
    q = fastopt.Parameter(np.zeros(3, np.float32))
    sgd = fastopt.SGD([q], lr=0.1)
    q.grad = np.array([np.nan, np.inf, 1.0], np.float32)
    sgd.step()
    assert np.isnan(q[0]) and q[1] == -np.inf and np.isclose(q[2], -0.1)


def _sample(n, rng):
    """Indices covering the start, the end, the two-thread split point and random elements."""
    idx = set(range(min(n, 40))) | set(range(max(0, n - 40), n))
    idx |= set(range(max(0, n // 2 - 24), min(n, n // 2 + 24)))
    idx |= set(rng.integers(0, n, 150).tolist())
    return np.array(sorted(idx))


@pytest.mark.parametrize("name,kwargs", VALID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VALID)])
@pytest.mark.parametrize("n,nthreads", [(1029, 1), (100003, 1), (100003, 2)])
def test_float64_large_matches_reference_on_a_sample(name, kwargs, n, nthreads, isa, threads):
    """float64 at the large sizes: the kernel runs on the whole array, and the exact
    (rational) reference runs on a sample of elements, which is enough because every element
    is updated independently of the others."""
    threads(nthreads)
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n)
    p = fastopt.Parameter(x.copy())
    opt = fastopt.OPTIMIZERS[name]([p], **kwargs)
    idx = _sample(n, rng)
    ref = x[idx].copy()
    state = R.new_state(name, ref, kwargs)
    for _ in range(2):
        g = rng.standard_normal(n)
        p.grad = g
        opt.step()
        ref = R.step(name, ref, g[idx], state, kwargs)
    assert_bits(np.asarray(p)[idx], ref)
    for key, value in state.items():
        if key != "step" and value is not None:
            assert_bits(opt.state[p][key][idx], value)


def _adam_denominator_run(v, beta2, step, dtype, amsgrad=False):
    """One Adam step that shows the kernel's denominator sqrt(v') / c exactly, where v' is
    v * beta2 (exp_avg_sq = v) or, with amsgrad, v itself (max_exp_avg_sq = v, exp_avg_sq = 0)
    and c = sqrt(1 - beta2^t) at t = step + 1. The gradient is 0, so every fma of the update
    is exact and plain NumPy gives torch's values; eps = 0; exp_avg is loaded with torch's
    denominator q (lerp(q, 0, 0.5) halves it) and lr makes step_size exactly 2. The new
    parameter is then -q / (the kernel's denominator): -1 exactly where the two agree, and
    never -1 where they differ by an ulp. Returns (new parameter, torch's value, new v')."""
    T = np.dtype(dtype).type
    n = v.size
    t = float(np.float32(step + 1))
    with np.errstate(all="ignore"):
        c = T((1 - beta2 ** t) ** 0.5)
        lr = 2 * (1 - 0.5 ** t)
        step_size = np.float64(lr) / (1 - 0.5 ** t)  # 2, or NaN at t = 0 as in torch
        v_new = np.maximum(v, 0) if amsgrad else v * T(beta2)
        q = np.sqrt(v_new) / c
        expected = T(0) + (T(-step_size) * (q * T(0.5))) / q
    p = fastopt.Parameter(np.zeros(n, dtype))
    p.grad = np.zeros(n, dtype)
    opt = fastopt.Adam([p], lr=lr, betas=(0.5, beta2), eps=0.0, amsgrad=amsgrad)
    st = {"step": np.array(step, np.float32), "exp_avg": q.copy(),
          "exp_avg_sq": np.zeros(n, dtype) if amsgrad else v.copy()}
    if amsgrad:
        st["max_exp_avg_sq"] = v.copy()
    opt.load_state_dict({"state": {0: st},
                         "param_groups": [dict(opt.state_dict()["param_groups"][0])]})
    opt.step()
    finite = np.isfinite(q) & (q != 0)
    if t >= 1:
        assert (expected[finite] == -1).all()
    return np.asarray(p), expected, opt.state[p]["exp_avg_sq"]


_SPECIAL32 = np.array([0.0, np.inf, np.nan, 1e-45, 1e-40, 3.4e38, 2.0 ** -126], np.float32)


def _hard_beta2(c_hex):
    """beta2 for which torch's bias correction at t = 1 is the float32 value c_hex."""
    c = float.fromhex(c_hex)
    beta2 = 1.0 - c * c
    assert np.float32((1 - beta2) ** 0.5) == np.float32(c)
    return beta2


@pytest.mark.parametrize("beta2,step", [(0.5, 0), (0.5, 1), (0.5, 4), (0.5, 40), (0.5, -1)])
def test_adam_bias_correction_divide_every_float32_significand(beta2, step, isa):
    """Where the ISA has an fma, the kernels divide sqrt(v) by the bias correction with a
    multiply and three fmas instead of a divide (csrc/fo_internal.h). Every float32 square
    root in [1, 2), for bias corrections c below 1, equal to 1 (t = 41 rounds it to 1) and 0
    (t = 0, a loaded step of -1: torch's inf and NaN), against IEEE division."""
    v = (np.arange(1 << 24, dtype=np.uint32) + np.float32(2).view(np.uint32)).view(np.float32)
    v = np.concatenate([v, _SPECIAL32])  # v * 0.5 in [1, 4): sqrt covers [1, 2)
    out, expected, v_new = _adam_denominator_run(v, beta2, step, np.float32)
    assert_bits(v_new, v * np.float32(0.5))
    assert_bits(out, expected)


@pytest.mark.parametrize("beta2,step", [
    (0.999, 0), (0.999, 9),
    # bias corrections for which the multiply and first fma alone (without the remainder
    # correction) are wrong for one square root in [1, 2) (found by an exhaustive C sweep)
    (_hard_beta2("0x1.9ac946p-1"), 0), (_hard_beta2("0x1.908ae6p-1"), 0),
    (_hard_beta2("0x1.c42496p-1"), 0)])
def test_adam_bias_correction_divide_float32_amsgrad(beta2, step, isa):
    """The same through amsgrad's running maximum, which lets the test load sqrt's argument
    directly: RN(s * s) for every float32 s in [1, 2), so sqrt gives back every s."""
    s = (np.arange(1 << 23, dtype=np.uint32) + np.float32(1).view(np.uint32)).view(np.float32)
    v = s * s
    assert_bits(np.sqrt(v), s)
    out, expected, _ = _adam_denominator_run(np.concatenate([v, _SPECIAL32]), beta2, step,
                                             np.float32, amsgrad=True)
    assert_bits(out, expected)


@pytest.mark.parametrize("beta2,step,amsgrad", [(0.5, 0, False), (0.5, 60, False),
                                                (0.999, 0, True), (0.999, 99, True)])
def test_adam_bias_correction_divide_float64(beta2, step, amsgrad, isa, rng):
    """The same for float64 on random significands and the values next to powers of two."""
    u = rng.integers(0, 1 << 52, 1 << 20, dtype=np.int64) + np.float64(1).view(np.int64)
    edges = np.concatenate([np.arange(4096), (1 << 52) - np.arange(1, 4097)]) \
        + np.float64(1).view(np.int64)
    v = np.concatenate([u, edges]).view(np.float64) * np.ldexp(1.0, rng.integers(-60, 60, 1))
    v = np.concatenate([v, [0.0, np.inf, np.nan, 5e-324, 1e-310, 1.7e308]])
    out, expected, v_new = _adam_denominator_run(v, beta2, step, np.float64, amsgrad)
    if not amsgrad:
        assert_bits(v_new, v * beta2)
    assert_bits(out, expected)
