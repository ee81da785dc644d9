"""Per-element kernels against the NumPy reference (tests/reference.py), to the last bit.

Every valid configuration of every per-element optimizer (tests/optim_db.py) runs at sizes
that cover every vector tail (0, 1, 7, 15, 16, 17, 1029) and a large size (100003, where two
threads split the work), on each ISA level this CPU supports, with 1 and 2 threads, alone and
as one of many tensors of mixed shapes in one optimizer. Parameters and state are compared
bit for bit. The float64 reference computes fma with exact rationals, which is slow: at the
large sizes it checks a sample of elements (start, end, the thread split point and random
ones), enough since every element is updated independently.

Closed forms complete the picture: NaN and infinite gradients, Lion against the paper's
algorithm, and the division by Adam's bias correction for every float32 significand.
"""
import numpy as np
import pytest

import fastopt
import reference as R
from fastopt import _kernels
from helpers import assert_bits, grads, same_bits
from optim_db import configs

CONFIGS = configs()
SMALL = [0, 1, 7, 15, 16, 17, 1029]
SMALL64 = [0, 1, 7, 15, 16, 17, 67]
LARGE = 100003
STEPS = 4


def run_both(name, kwargs, shape, dtype, rng, steps=STEPS):
    """The kernel and the reference side by side on one parameter of ``shape``."""
    x = rng.standard_normal(shape).astype(dtype)
    p = fastopt.Parameter(x.copy())
    opt = fastopt.OPTIMIZERS[name]([p], **kwargs)
    ref_p = x.copy()
    state = R.new_state(name, ref_p, kwargs)
    for k in range(steps):
        g = grads(rng, shape, dtype, k)
        p.grad = g
        opt.step()
        with np.errstate(all="ignore"):
            ref_p = R.step(name, ref_p, g, state, kwargs)
    return p, opt, ref_p, state


def check_state(ours, state, msg="", index=None):
    """fastopt's state equals the reference's: the same entries, ``step`` equal, every
    array and scalar bit for bit (``index`` selects the sampled elements)."""
    assert set(ours) == {k for k, v in state.items() if v is not None}, msg
    for key, value in state.items():
        if key == "step":
            assert float(ours["step"]) == value, msg
        elif value is not None:
            mine = np.asarray(ours[key])
            if index is not None and mine.ndim:
                mine = mine[index]
            assert_bits(mine, np.asarray(value), f"{msg} state[{key!r}]")


@pytest.mark.parametrize("name,kwargs", CONFIGS)
@pytest.mark.parametrize("n", SMALL)
def test_float32_matches_reference(name, kwargs, n, isa, rng):
    p, opt, ref_p, state = run_both(name, kwargs, (n,), np.float32, rng)
    assert_bits(p, ref_p)
    check_state(opt.state.get(p, {}), state)


@pytest.mark.parametrize("name,kwargs", CONFIGS)
@pytest.mark.parametrize("n", SMALL64)
def test_float64_matches_reference(name, kwargs, n, isa, rng):
    p, opt, ref_p, state = run_both(name, kwargs, (n,), np.float64, rng)
    assert_bits(p, ref_p)
    check_state(opt.state.get(p, {}), state)


@pytest.mark.parametrize("name,kwargs", CONFIGS)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_large_float32_any_thread_count(name, kwargs, nthreads, isa, threads, rng):
    threads(nthreads)
    p, opt, ref_p, state = run_both(name, kwargs, (LARGE,), np.float32, rng)
    assert_bits(p, ref_p)
    check_state(opt.state.get(p, {}), state)


def _sample(n, rng):
    """Indices covering the start, the end, the two-thread split point and random elements."""
    idx = set(range(min(n, 40))) | set(range(max(0, n - 40), n))
    idx |= set(range(max(0, n // 2 - 24), min(n, n // 2 + 24)))
    idx |= set(rng.integers(0, n, 150).tolist())
    return np.array(sorted(idx))


@pytest.mark.parametrize("name,kwargs", CONFIGS)
@pytest.mark.parametrize("n,nthreads", [(1029, 1), (LARGE, 1), (LARGE, 2)])
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
    for k in range(2):
        g = grads(rng, (n,), np.float64, k)
        p.grad = g
        opt.step()
        with np.errstate(all="ignore"):
            ref = R.step(name, ref, g[idx], state, kwargs)
    assert_bits(np.asarray(p)[idx], ref)
    check_state(opt.state.get(p, {}), state, index=idx)


#: many tensors in one optimizer: mixed shapes, 0-d and empty ones, and every tail size
SHAPES = {np.float32: [(3, 5), (40000,), (), (1,), (17, 33), (30001,), (0,), (2, 2, 2)]
          + [(n,) for n in SMALL + [LARGE]],
          np.float64: [(3, 5), (), (1,), (0,), (2, 2, 2)] + [(n,) for n in SMALL64]}


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_many_tensors_in_one_optimizer_match_reference(name, kwargs, dtype, nthreads, isa,
                                                       threads):
    """Many tensors of mixed sizes and shapes in one group, with the work split over the
    threads, equal the reference tensor by tensor, state included."""
    threads(nthreads)
    rng = np.random.default_rng(7)
    shapes = SHAPES[dtype]
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    opt = fastopt.OPTIMIZERS[name](ps, **kwargs)
    refs = [x.copy() for x in xs]
    states = [R.new_state(name, x, kwargs) for x in xs]
    for k in range(STEPS):
        for i, p in enumerate(ps):
            g = grads(rng, p.shape, dtype, k)
            p.grad = g
            with np.errstate(all="ignore"):
                refs[i] = R.step(name, refs[i], g, states[i], kwargs)
        opt.step()
        for i, p in enumerate(ps):
            assert_bits(p, refs[i], f"shape {shapes[i]} step {k}")
            check_state(opt.state.get(p, {}), states[i], f"shape {shapes[i]} step {k}")


@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_nan_and_inf_follow_the_reference(name, kwargs):
    """Special values go through the same operations as in the reference (and torch)."""
    vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3e38, -1.0], np.float32)
    p = fastopt.Parameter(np.ones(8, np.float32))
    opt = fastopt.OPTIMIZERS[name]([p], **kwargs)
    r = np.ones(8, np.float32)
    st = R.new_state(name, r, kwargs)
    for k, g in enumerate((vals, vals[::-1].copy(), np.ones(8, np.float32))):
        p.grad = g
        opt.step()
        with np.errstate(all="ignore"):
            r = R.step(name, r, g, st, kwargs)
        assert same_bits(p.view(np.ndarray), r), k


def test_isa_levels_give_identical_bits():
    """The same run on every supported level (and thread count) gives the same bits."""
    before, nthr = _kernels.get_isa(), fastopt.get_num_threads()
    results = []
    try:
        for level in [lv for lv in _kernels.isa_levels() if _kernels.isa_supported(lv)]:
            for nthreads in (1, 2):
                _kernels.set_isa(level)
                fastopt.set_num_threads(nthreads)
                out = []
                for param in CONFIGS:
                    name, kwargs = param.values
                    p, _, _, _ = run_both(name, kwargs, (70001,), np.float32,
                                          np.random.default_rng(7), steps=2)
                    out.append(np.asarray(p).copy())
                results.append(out)
    finally:
        _kernels.set_isa(before)
        fastopt.set_num_threads(nthr)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_bits(a, b)


# ---- closed forms -------------------------------------------------------------------------------

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
        q, m = R.lion_paper(q, g, m, **hyper)
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-13)
        np.testing.assert_allclose(opt.state[p]["exp_avg"], m, rtol=0, atol=1e-14)


# ---- Adam's division by the bias correction -----------------------------------------------------

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
    opt.state[p].update(st)  # set, not loaded: load_state_dict refuses a step of -1
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
