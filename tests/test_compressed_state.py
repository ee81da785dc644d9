"""Compressed optimizer state (state_dtype="bfloat16" and "int8"), float32 master weights,
stochastic rounding and float32 gradients of 16-bit parameters, against a NumPy reference of
the same rule: the reference update of tests/reference.py in float32 on the decoded state,
then the state stored as the optimizer stores it (rounded to bfloat16, or coded with
fastopt.quantize_blockwise, whose code tests/test_quantize.py checks against the spec)."""
import copy

import numpy as np
import pytest

import fastopt
from fastopt import _compressed, _kernels

import optim_db
import reference

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16

COMPRESSIBLE = ("Adam", "AdamW", "SGD", "Lion", "RMSprop", "Adagrad", "Adamax", "NAdam",
                "RAdam", "Adadelta")
UNSIGNED = _kernels.UNSIGNED_STATE
SIZES = (0, 1, 255, 256, 257, 1029)


def _configs():
    return optim_db.configs(where=lambda info: info.name in COMPRESSIBLE)


def _moment_keys(opt, p):
    return [k for k, v in opt.state[p].items()
            if isinstance(v, np.ndarray) and v.shape == p.shape and k != "master_param"
            and not k.endswith("_absmax")]


def _decoded(opt, p):
    """The optimizer's state of ``p`` as float32 arrays (8-bit and bfloat16 decoded)."""
    out = {}
    st = opt.state[p]
    for k, v in st.items():
        if k.endswith("_absmax"):
            continue
        if k + "_absmax" in st:
            out[k] = fastopt.dequantize_blockwise(v, st[k + "_absmax"],
                                                  signed=k not in UNSIGNED).reshape(p.shape)
        elif k == "master_param" or v.ndim == 0:
            out[k] = v.copy()
        else:
            out[k] = v.astype(np.float32)
    return out


def _store_ref(st, state_dtype, min8, numel):
    """Round the reference state ``st`` (float32) as the optimizer stores it."""
    for k, v in list(st.items()):
        if not isinstance(v, np.ndarray) or v.ndim == 0:
            continue
        if state_dtype == "bfloat16":
            st[k] = v.astype(BF16).astype(np.float32)
        elif state_dtype == "int8" and numel >= min8:
            codes, scales = fastopt.quantize_blockwise(v, signed=k not in UNSIGNED)
            st[k] = fastopt.dequantize_blockwise(codes, scales,
                                                 signed=k not in UNSIGNED).reshape(v.shape)


def _ref_kwargs(kwargs):
    return {k: v for k, v in kwargs.items() if k not in ("foreach", "fused", "capturable",
                                                        "differentiable")}


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name,kwargs", _configs())
def test_compressed_state_matches_reference(name, kwargs, n, state_dtype):
    rng = np.random.default_rng(n)
    p = fastopt.Parameter(rng.standard_normal(n).astype(np.float32))
    opt = getattr(fastopt, name)([p], state_dtype=state_dtype, min_8bit_size=0, **kwargs)
    ref_p = np.array(p)
    ref_st = reference.new_state(name, ref_p, _ref_kwargs(kwargs))
    _store_ref(ref_st, state_dtype, 0, n)
    for step in range(5):
        g = rng.standard_normal(n).astype(np.float32)
        p.grad = g
        opt.step()
        ref_p = reference.step(name, ref_p, g.copy(), ref_st, _ref_kwargs(kwargs))
        _store_ref(ref_st, state_dtype, 0, n)
        np.testing.assert_array_equal(np.asarray(p), ref_p, err_msg=f"step {step}")
        got = _decoded(opt, p)
        for k, v in ref_st.items():
            if v is not None:
                np.testing.assert_array_equal(got[k], v, err_msg=f"{k}, step {step}")
    # 8-bit state is 1 byte per element and a float32 per block; bfloat16 is 2 bytes
    for k in _moment_keys(opt, p):
        assert opt.state[p][k].dtype == (np.uint8 if state_dtype == "int8" else BF16)
        if state_dtype == "int8":
            assert opt.state[p][k + "_absmax"].shape == (-(-n // 256),)
            assert opt.state[p][k + "_absmax"].dtype == np.float32


@pytest.mark.parametrize("name", COMPRESSIBLE)
def test_small_tensors_keep_float32_state(name):
    kw = {"momentum": 0.9} if name == "SGD" else {}
    big = fastopt.Parameter(np.ones(300, np.float32))
    small = fastopt.Parameter(np.ones(299, np.float32))
    opt = getattr(fastopt, name)([big, small], state_dtype="int8", min_8bit_size=300, **kw)
    big.grad = np.full(300, 0.5, np.float32)
    small.grad = np.full(299, 0.5, np.float32)
    opt.step()
    keys = _moment_keys(opt, small)
    assert keys and all(opt.state[small][k].dtype == np.float32 for k in keys)
    assert not any(k.endswith("_absmax") for k in opt.state[small])
    assert all(opt.state[big][k].dtype == np.uint8 for k in _moment_keys(opt, big))
    # the default threshold is bitsandbytes' 4096
    assert fastopt.Adam([big], state_dtype="int8").defaults["min_8bit_size"] == 4096


def _levels():
    return [lv for lv in _kernels.isa_levels() if _kernels.isa_supported(lv)]


def _stepped(isa, threads, name, start, grads, kw):
    """The bytes of the parameter and of its state after one step per gradient of
    ``grads``, from ``start``, at ISA level ``isa`` on ``threads`` threads. A parameter
    element that is NaN counts as the one NaN: which NaN an operation on NaNs returns (its
    sign and payload) is the hardware's, and a build that orders the operands otherwise (the
    sanitizers' one) gets another."""
    before_isa, before_thr = _kernels.get_isa(), fastopt.get_num_threads()
    try:
        _kernels.set_isa(isa)
        fastopt.set_num_threads(threads)
        p = fastopt.Parameter(start.copy())
        opt = getattr(fastopt, name)([p], **kw)
        with np.errstate(all="ignore"):
            for g in grads:
                p.grad = g
                opt.step()
        a = np.asarray(p)
        return [np.where(np.isnan(a), np.float32(np.nan), a).tobytes()] + [
            (k, np.asarray(v).tobytes()) for k, v in sorted(opt.state[p].items())]
    finally:
        _kernels.set_isa(before_isa)
        fastopt.set_num_threads(before_thr)


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_compressed_state_is_the_same_for_every_thread_count_and_isa(name, state_dtype,
                                                                      nthreads):
    kw = {"momentum": 0.9} if name == "SGD" else {"centered": True, "momentum": 0.5} \
        if name == "RMSprop" else {}
    n = 3 * 65536 + 1029  # several chunks per thread, cut inside 8-bit blocks
    rng = np.random.default_rng(7)
    start = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]

    kw.update(lr=1e-2, state_dtype=state_dtype, stochastic_rounding=True)
    base = _stepped("baseline", 1, name, start, grads, kw)
    for level in _levels():
        assert _stepped(level, nthreads, name, start, grads, kw) == base, level


@pytest.mark.parametrize("name,kwargs", _configs())
def test_master_weights_match_reference(name, kwargs):
    """A bfloat16 parameter with master weights steps as float32 would, and holds the float32
    result rounded to nearest; its gradients may be bfloat16 or float32."""
    rng = np.random.default_rng(3)
    n = 1029
    start = rng.standard_normal(n).astype(np.float32)
    p = fastopt.Parameter(start.astype(BF16))
    opt = getattr(fastopt, name)([p], master_weights=True, **kwargs)
    master = start.astype(BF16).astype(np.float32)
    ref_st = reference.new_state(name, master, _ref_kwargs(kwargs))
    for step in range(4):
        g = rng.standard_normal(n).astype(np.float32)
        p.grad = g if step % 2 else g.astype(BF16)
        g_ref = g if step % 2 else g.astype(BF16).astype(np.float32)
        opt.step()
        master = reference.step(name, master, g_ref, ref_st, _ref_kwargs(kwargs))
        st = opt.state[p]
        np.testing.assert_array_equal(st["master_param"], master, err_msg=f"step {step}")
        np.testing.assert_array_equal(np.asarray(p).view(np.uint16),
                                      master.astype(BF16).view(np.uint16))
        for k, v in ref_st.items():
            if v is not None:
                np.testing.assert_array_equal(st[k], v, err_msg=k)
                if np.ndim(v):
                    assert st[k].dtype == np.float32, k


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_master_weights_with_compressed_state(state_dtype):
    rng = np.random.default_rng(4)
    n = 1029
    start = rng.standard_normal(n).astype(np.float32)
    p = fastopt.Parameter(start.astype(np.float16))
    opt = fastopt.Adam([p], lr=1e-2, master_weights=True, state_dtype=state_dtype,
                       min_8bit_size=0)
    master = start.astype(np.float16).astype(np.float32)
    ref_st = reference.new_state("Adam", master, {})
    for _ in range(4):
        g = rng.standard_normal(n).astype(np.float16)
        p.grad = g
        opt.step()
        master = reference.step("Adam", master, g.astype(np.float32), ref_st, {"lr": 1e-2})
        _store_ref(ref_st, state_dtype, 0, n)
        np.testing.assert_array_equal(opt.state[p]["master_param"], master)
        np.testing.assert_array_equal(np.asarray(p), master.astype(np.float16))
        got = _decoded(opt, p)
        for k in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(got[k], ref_st[k])


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_float32_gradients_of_16_bit_parameters(name):
    """Without master weights a 16-bit parameter with a float32 gradient steps as with the
    gradient rounded to nothing: the update reads the float32 gradient as it is."""
    rng = np.random.default_rng(5)
    n = 700
    start = rng.standard_normal(n).astype(BF16)
    a, b = fastopt.Parameter(start.copy()), fastopt.Parameter(start.copy())
    kw = {"momentum": 0.9} if name == "SGD" else {}
    oa = getattr(fastopt, name)([a], lr=1e-2, state_dtype="float32", **kw)
    ob = getattr(fastopt, name)([b], lr=1e-2, state_dtype="float32", **kw)
    ref = start.astype(np.float32)
    ref_st = reference.new_state(name, ref, kw)
    for _ in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        a.grad = g
        b.grad = g.astype(BF16)
        oa.step()
        ob.step()
        ref = reference.step(name, ref, g, ref_st, {"lr": 1e-2, **kw}).astype(BF16) \
            .astype(np.float32)
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), ref)
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # the gradients differed


def test_stochastic_rounding_is_unbiased_and_does_not_stall():
    """Tiny updates to large bfloat16 weights: round to nearest loses every one of them
    (the weight never moves), stochastic rounding moves the weights by the right amount on
    average: the mean error after many steps is within a few standard errors of zero."""
    n, steps, lr = 4096, 200, 1e-3
    w0 = np.full(n, 1.0, np.float32)  # bfloat16 spacing at 1 is 2**-7: lr is 0.128 of it
    p_rn = fastopt.Parameter(w0.astype(BF16))
    p_sr = fastopt.Parameter(w0.astype(BF16))
    o_rn = fastopt.SGD([p_rn], lr=lr)
    o_sr = fastopt.SGD([p_sr], lr=lr, stochastic_rounding=True, rounding_seed=11)
    for _ in range(steps):
        p_rn.grad = np.full(n, -1.0, BF16)
        p_sr.grad = np.full(n, -1.0, BF16)
        o_rn.step()
        o_sr.step()
    exact = 1.0 + steps * lr
    assert np.all(np.asarray(p_rn).astype(np.float32) == 1.0)  # stalled
    got = np.asarray(p_sr).astype(np.float32)
    # each step adds a rounding error of mean 0 and variance at most (2**-7)**2 / 4
    se = (2.0 ** -7) / 2 * np.sqrt(steps) / np.sqrt(n)
    assert abs(got.mean() - exact) < 5 * se, (got.mean(), exact, se)
    assert o_sr.param_groups[0]["rounding_step"] == steps


def test_stochastic_rounding_mean_error_is_zero_for_one_step():
    rng = np.random.default_rng(6)
    n = 1 << 16
    start = rng.standard_normal(n).astype(np.float32).astype(BF16)
    g = rng.standard_normal(n).astype(np.float32)
    p = fastopt.Parameter(start.copy())
    opt = fastopt.SGD([p], lr=1e-3, stochastic_rounding=True)
    p.grad = g
    opt.step()
    exact = start.astype(np.float32) - np.float32(1e-3) * g
    got = np.asarray(p).astype(np.float32)
    lo = exact.astype(BF16).astype(np.float32)  # nearest; the neighbours bracket exact
    spacing = np.abs(np.spacing(np.abs(got).astype(BF16))).astype(np.float32)
    assert np.all(np.abs(got - exact) <= spacing)
    err = (got - exact) / spacing
    assert abs(err.mean()) < 5 * err.std() / np.sqrt(n)
    assert np.mean(got != lo) > 0.1  # it does not just round to nearest


def test_stochastic_rounding_is_reproducible_and_keyed_by_seed_and_step():
    def run(seed, steps=3):
        p = fastopt.Parameter(np.linspace(-1, 1, 5000, dtype=np.float32).astype(BF16))
        opt = fastopt.SGD([p], lr=1e-3, stochastic_rounding=True, rounding_seed=seed)
        for _ in range(steps):
            p.grad = np.ones(5000, BF16)
            opt.step()
        return np.asarray(p).view(np.uint16).copy(), opt

    a, oa = run(1)
    b, _ = run(1)
    c, _ = run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the step count is in the group and its state dict: a loaded run continues the same
    p = fastopt.Parameter(np.asarray(oa.param_groups[0]["params"][0]).copy())
    opt = fastopt.SGD([p], lr=1e-3, stochastic_rounding=True, rounding_seed=1)
    opt.load_state_dict(oa.state_dict())
    assert opt.param_groups[0]["rounding_step"] == 3
    for o, q in ((oa, oa.param_groups[0]["params"][0]), (opt, p)):
        q.grad = np.ones(5000, BF16)
        o.step()
    np.testing.assert_array_equal(np.asarray(p).view(np.uint16),
                                  np.asarray(oa.param_groups[0]["params"][0]).view(np.uint16))


def test_options_are_checked_and_absent_at_their_defaults():
    p = fastopt.Parameter(np.ones(3, np.float32))
    assert "state_dtype" not in fastopt.Adam([p]).param_groups[0]
    for kw, err in (({"state_dtype": "int4"}, ValueError), ({"master_weights": 1}, TypeError),
                    ({"min_8bit_size": -1}, ValueError), ({"rounding_seed": 1.5}, TypeError),
                    ({"master_weights": True, "stochastic_rounding": True}, ValueError)):
        with pytest.raises(err, match=next(iter(kw))):
            fastopt.Adam([p], **kw)
    opt = fastopt.Adam([p], state_dtype="int8")
    opt.param_groups[0]["state_dtype"] = "int4"
    p.grad = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: state_dtype"):
        opt.step()
    assert opt.state[p] == {} and np.all(np.asarray(p) == 1)
    # float64 parameters keep float64 state
    q = fastopt.Parameter(np.ones(3))
    q.grad = np.ones(3)
    opt = fastopt.Adam([q], state_dtype="bfloat16")
    with pytest.raises(TypeError, match=r"params'\]\[0\]: state_dtype='bfloat16' applies"):
        opt.step()
    assert np.all(np.asarray(q) == 1)


@pytest.mark.parametrize("cached", [True, False])
def test_bad_compressed_state_is_refused_and_nothing_changes(cached):
    p = fastopt.Parameter(np.ones(1029, np.float32))
    opt = fastopt.Adam([p], state_dtype="int8", min_8bit_size=0)
    p.grad = np.ones(1029, np.float32)
    opt.step()
    if not cached:
        _kernels.forget(opt)
    st = opt.state[p]
    good = {k: v.copy() for k, v in st.items()}
    before = np.asarray(p).copy()
    for key, bad, match in (
            ("exp_avg_absmax", np.zeros(4, np.float32), r"block scales"),
            ("exp_avg_absmax", np.zeros(5, np.float64), r"block scales"),
            ("exp_avg", np.zeros(1029, np.float32), r"uint8"),
            ("exp_avg_sq", np.zeros(1028, np.uint8), r"shape"),
            ("exp_avg_sq_absmax", None, r"state has no 'exp_avg_sq_absmax'")):
        saved = st[key]
        if bad is None:
            del st[key]
        else:
            st[key] = bad
        with pytest.raises((ValueError, KeyError), match=match):
            opt.step()
        st[key] = saved
        np.testing.assert_array_equal(np.asarray(p), before)
        for k, v in good.items():
            np.testing.assert_array_equal(st[k], v)
    st["exp_avg_absmax"] = st["exp_avg_sq_absmax"]
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()


def test_cached_step_equals_the_full_step_with_compressed_state():
    def make():
        ps = [fastopt.Parameter(np.full(n, 0.5, np.float32).astype(BF16)) for n in (300, 5000)]
        ps.append(fastopt.Parameter(np.full(4100, 0.5, np.float32)))
        return ps, fastopt.AdamW(ps, lr=1e-2, state_dtype="int8", min_8bit_size=1000,
                                 master_weights=True)
    (pa, a), (pb, b) = make(), make()
    rng = np.random.default_rng(8)
    for step in range(5):
        for x, y in zip(pa, pb):
            g = rng.standard_normal(x.shape).astype(np.float32)
            x.grad = g.astype(x.dtype) if step % 2 else g
            y.grad = x.grad.copy()
        _kernels.forget(b)
        a.step()
        b.step()
        for x, y in zip(pa, pb):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
            for k in a.state[x]:
                assert np.asarray(a.state[x][k]).tobytes() == np.asarray(b.state[y][k]).tobytes()
    assert _kernels.cached(a)


def _trained(state_dtype, master=False, n=1029, dtype=np.float32, steps=3, **kw):
    rng = np.random.default_rng(9)
    p = fastopt.Parameter(rng.standard_normal(n).astype(dtype))
    opt = fastopt.Adam([p], lr=1e-2, state_dtype=state_dtype, master_weights=master,
                       min_8bit_size=0, **kw)
    for _ in range(steps):
        p.grad = rng.standard_normal(n).astype(dtype)
        opt.step()
    return p, opt


@pytest.mark.parametrize("source", [None, "bfloat16", "int8"])
@pytest.mark.parametrize("target", [None, "float32", "bfloat16", "int8"])
def test_state_dicts_convert_on_load(source, target):
    """A state dict of any state_dtype loads into an optimizer of any other: the values are
    converted to the loading optimizer's formats (which it keeps), as storing the saved
    values would: decoded 8-bit and bfloat16 values are exact in float32."""
    p, opt = _trained(source)
    sd = opt.state_dict()
    q = fastopt.Parameter(np.asarray(p).copy())
    other = fastopt.Adam([q], lr=1e-2, state_dtype=target, min_8bit_size=0)
    other.load_state_dict(sd)
    assert other.param_groups[0].get("state_dtype") == target
    want = {}
    for k, v in _decoded(opt, p).items():
        if v.ndim:
            want[k] = v
            if target in ("bfloat16", "int8"):
                st = {k: v.copy()}
                _store_ref(st, target, 0, v.size)
                want[k] = st[k]
    got = _decoded(other, q)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # and it steps on, as an optimizer of its own kind would from that state
    q.grad = np.ones(q.shape, np.float32)
    other.step()
    assert np.all(np.isfinite(np.asarray(q)))
    # the same state dict again: exact round trip of the stored arrays
    again = fastopt.Adam([fastopt.Parameter(np.asarray(q).copy())], lr=1e-2, state_dtype=target,
                         min_8bit_size=0)
    again.load_state_dict(other.state_dict())
    (qa,) = again.param_groups[0]["params"]
    for k, v in other.state[q].items():
        assert np.asarray(again.state[qa][k]).tobytes() == np.asarray(v).tobytes(), k


def test_master_weights_survive_a_state_dict_round_trip():
    p, opt = _trained(None, master=True, dtype=BF16)
    sd = opt.state_dict()
    q = fastopt.Parameter(np.asarray(p).copy())
    other = fastopt.Adam([q], lr=1e-2, master_weights=True)
    other.load_state_dict(sd)
    np.testing.assert_array_equal(other.state[q]["master_param"], opt.state[p]["master_param"])
    # into an optimizer without master weights: the 16-bit parameter is all there is
    r = fastopt.Parameter(np.asarray(p).copy())
    plain = fastopt.Adam([r], lr=1e-2)
    plain.load_state_dict(sd)
    assert "master_param" not in plain.state[r]
    assert plain.state[r]["exp_avg"].dtype == BF16


def test_bad_8bit_state_dicts_are_refused_naming_the_key():
    p, opt = _trained("int8")
    sd = opt.state_dict()
    q = fastopt.Parameter(np.asarray(p).copy())
    other = fastopt.Adam([q], lr=1e-2, state_dtype="int8", min_8bit_size=0)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["exp_avg_absmax"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"state\['exp_avg_absmax'\] must be the float32 block"):
        other.load_state_dict(bad)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["exp_avg"] = np.zeros(5, np.uint8)
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] holds 8-bit codes"):
        other.load_state_dict(bad)
    assert other.state == {}
    other.load_state_dict(sd)


# ---- fastopt.torch: the same numbers as the NumPy classes ------------------------------------

TORCH_CASES = [
    ("Adam", {"state_dtype": "int8"}, "float32"),
    ("AdamW", {"state_dtype": "bfloat16", "amsgrad": True}, "float32"),
    ("SGD", {"momentum": 0.9, "state_dtype": "int8"}, "float32"),
    ("RMSprop", {"centered": True, "momentum": 0.5, "state_dtype": "int8"}, "float32"),
    ("Adagrad", {"state_dtype": "int8"}, "float32"),
    ("Lion", {"state_dtype": "bfloat16"}, "float32"),
    ("Adam", {"master_weights": True}, "bfloat16"),
    ("Adam", {"master_weights": True, "state_dtype": "int8"}, "bfloat16"),
    ("SGD", {"stochastic_rounding": True, "momentum": 0.9}, "bfloat16"),
    ("Adam", {"stochastic_rounding": True, "state_dtype": "bfloat16"}, "bfloat16"),
    ("NAdam", {"master_weights": True, "state_dtype": "bfloat16"}, "float16"),
]


def _torch_np(t):
    import torch
    t = t.detach()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name,kwargs,dtype", TORCH_CASES)
def test_torch_classes_step_as_the_numpy_classes(name, kwargs, dtype, channels_last):
    """Bit for bit, state included. A channels_last tensor is stepped in its memory order
    (8-bit blocks and stochastic rounding follow it), so its twin is the NumPy array of its
    elements in memory order (NHWC)."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    shape = (2, 5, 21, 13)
    g = torch.Generator().manual_seed(1)

    def mem(t):  # the tensor's elements in its memory order, as a contiguous tensor
        return t.permute(0, 2, 3, 1).contiguous() if channels_last else t.contiguous()

    start = torch.randn(shape, generator=g).to(getattr(torch, dtype))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tp = torch.nn.Parameter(start.clone().to(memory_format=fmt))
    np_p = fastopt.Parameter(_torch_np(mem(start)).copy())
    kw = dict(kwargs, min_8bit_size=0) if "state_dtype" in kwargs else dict(kwargs)
    topt = getattr(ft, name)([tp], lr=1e-2, **kw)
    nopt = getattr(fastopt, name)([np_p], lr=1e-2, **kw)
    for step in range(4):
        grad = torch.randn(shape, generator=g).to(getattr(torch, dtype))
        tp.grad = grad.clone().to(memory_format=fmt)
        np_p.grad = _torch_np(mem(grad)).copy()
        topt.step()
        nopt.step()
        assert _torch_np(mem(tp)).tobytes() == np.asarray(np_p).tobytes(), f"step {step}"
        for k, v in nopt.state[np_p].items():
            tv = topt.state[tp][k]
            got = _torch_np(mem(tv) if tv.ndim == 4 else tv)
            assert got.tobytes() == np.asarray(v).tobytes(), (k, step)
    assert _kernels.cached(topt)


def test_torch_state_dicts_convert_on_load():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    p = torch.nn.Parameter(torch.randn(3000))
    opt = ft.Adam([p], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn(3000)
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    small = ft.Adam([q], lr=1e-2, state_dtype="int8", min_8bit_size=0)
    small.load_state_dict(opt.state_dict())
    st = small.state[q]
    assert st["exp_avg"].dtype is torch.uint8 and st["exp_avg_absmax"].dtype is torch.float32
    want = fastopt.quantize_blockwise(opt.state[p]["exp_avg"].numpy(), True)
    assert st["exp_avg"].numpy().tobytes() == want[0].tobytes()
    # and back into torch's own format
    r = torch.nn.Parameter(p.detach().clone())
    full = ft.Adam([r], lr=1e-2)
    full.load_state_dict(small.state_dict())
    assert full.state[r]["exp_avg"].dtype is torch.float32
    np.testing.assert_array_equal(full.state[r]["exp_avg"].numpy(),
                                  fastopt.dequantize_blockwise(*want, True))
    torch.optim.Adam([r.detach().clone().requires_grad_()]).load_state_dict(full.state_dict())


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_nan_and_inf_gradients_stay_in_their_elements(state_dtype):
    """A NaN or infinite gradient makes its own parameter NaN, as in float32 state (the 8-bit
    code keeps NaN and infinity, and a block's scale is its largest finite magnitude), and
    leaves the other elements of its block as they would be without it."""
    n = 1029
    rng = np.random.default_rng(12)
    start = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    bad = grads[1].copy()
    bad[[5, 300]] = [np.nan, np.inf]
    p, q, r = (fastopt.Parameter(start.copy()) for _ in range(3))
    kw = dict(lr=1e-2, state_dtype=state_dtype, min_8bit_size=0)
    oq, or_ = fastopt.Adam([q], **kw), fastopt.Adam([r], **kw)
    ref = fastopt.Adam([p], lr=1e-2)
    for i, g in enumerate(grads):
        p.grad = bad if i == 1 else g
        q.grad = bad.copy() if i == 1 else g.copy()
        r.grad = g.copy()
        ref.step()
        oq.step()
        or_.step()
    assert np.isnan(np.asarray(q)[[5, 300]]).all() and np.isnan(np.asarray(p)[[5, 300]]).all()
    others = np.ones(n, bool)
    others[[5, 300]] = False
    np.testing.assert_array_equal(np.isfinite(np.asarray(q)), others)
    if state_dtype == "int8":
        # the rest of their blocks: as far from the run without them as 8-bit state allows
        np.testing.assert_allclose(np.asarray(q)[others], np.asarray(r)[others], atol=3e-2)
        st = oq.state[q]
        assert np.isnan(fastopt.dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"])[5])
        assert np.all(np.isfinite(st["exp_avg_absmax"]))


@pytest.mark.parametrize("name", ["Adam", "NAdam", "SGD"])
def test_numpy_classes_load_a_torch_state_dict_of_bfloat16_tensors(name):
    """torch.optim's state dict of a bfloat16 model (bfloat16 moments, NAdam's 0-d bfloat16
    mu_product) loads into fastopt's NumPy class over ml_dtypes.bfloat16 arrays, bit for bit."""
    torch = pytest.importorskip("torch")
    kw = {"momentum": 0.9} if name == "SGD" else {}
    t = torch.nn.Parameter(torch.randn(300).to(torch.bfloat16))
    topt = getattr(torch.optim, name)([t], lr=1e-2, **kw)
    for _ in range(3):
        t.grad = torch.randn(300).to(torch.bfloat16)
        topt.step()
    p = fastopt.Parameter(t.detach().view(torch.int16).numpy().view(BF16).copy())
    opt = getattr(fastopt, name)([p], lr=1e-2, **kw)
    opt.load_state_dict(topt.state_dict())
    for k, v in topt.state[t].items():
        got = opt.state[p][k]
        if v.dtype is torch.bfloat16 and v.ndim:
            assert got.dtype == BF16
            assert got.view(np.uint16).tobytes() == v.view(torch.int16).numpy().tobytes(), k
        else:
            assert float(got) == float(v), k


def test_full_precision_state_dict_of_channels_last_8bit_state():
    """The 8-bit state of a channels_last tensor is coded in its memory order: the full
    precision state dict decodes it in that order (the values torch.optim then loads)."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    from fastopt import interop
    p = torch.nn.Parameter(torch.randn(2, 5, 21, 13).to(memory_format=torch.channels_last))
    opt = ft.Adam([p], lr=1e-2, state_dtype="int8", min_8bit_size=0)
    q = torch.nn.Parameter(p.detach().clone())
    ref = ft.Adam([q], lr=1e-2, state_dtype="float32")
    for _ in range(1):  # one coding: within the code's error of the float32 value
        g = torch.randn(2, 5, 21, 13).to(memory_format=torch.channels_last)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    full = interop.full_precision_state_dict(opt.state_dict())
    got = torch.as_tensor(np.asarray(full["state"][0]["exp_avg"]))
    want = ref.state[q]["exp_avg"]
    # decoded 8-bit values are within the code's 1/16 relative error of the float32 ones
    # (an absolute error in the bottom range of each block)
    assert torch.allclose(got.float(), want, rtol=1 / 16, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_8bit_state_of_a_wide_range_is_the_same_for_every_isa(name):
    """Blocks whose values span 40 decades (many in the code's bottom, linear range) and
    blocks holding an infinity or a NaN: the vector encodings, which take a shorter path for
    blocks without such values, give the bytes of the scalar one."""
    kw = {"momentum": 0.9} if name == "SGD" else {}
    n = 64 * 256 + 77
    rng = np.random.default_rng(11)
    start = rng.standard_normal(n).astype(np.float32)
    grads = []
    for k in range(3):
        g = (rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-35, 5, n)).astype(np.float32)
        g[rng.integers(0, n, 3)] = [np.inf, -np.inf, np.nan][k]  # a few blocks go non-finite
        grads.append(g)

    kw.update(lr=1e-3, state_dtype="int8")
    base = _stepped("baseline", 1, name, start, grads, kw)
    for level in _levels():
        assert _stepped(level, 1, name, start, grads, kw) == base, level


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("name, kw", [
    ("Adam", {}), ("Adam", {"weight_decay": 0.1}), ("AdamW", {"weight_decay": 0.1}),
    ("Adam", {"maximize": True}), ("Adam", {"betas": (0.3, 0.99)}),
    ("AdamW", {"weight_decay": 0.05, "maximize": True, "betas": (0.2, 0.9)})])
def test_8bit_adam_is_the_same_for_every_isa_with_non_finite_blocks(name, kw, nthreads):
    """8-bit Adam and AdamW in each of their loop variants, on whole blocks and a tail, where
    some blocks turn non-finite: a NaN gradient in one block, a gradient whose square
    overflows in another (its second moment is infinite), then finite steps again that read
    those blocks' special codes. Every ISA level and thread count gives the scalar bytes."""
    n = 40 * 256 + 77
    rng = np.random.default_rng(5)
    start = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    grads[1][5 * 256 + 3] = np.nan
    grads[1][9 * 256 + 100] = 3e22
    grads[2][20 * 256:21 * 256] *= np.float32(1e-30)  # a block of tiny moments
    kw = dict(kw, lr=1e-2, state_dtype="int8")
    base = _stepped("baseline", 1, name, start, grads, kw)
    st = _stepped("baseline", 1, name, start, grads[:2], kw)
    codes = dict(st[1:])["exp_avg_sq"]  # the blocks did turn non-finite
    assert np.frombuffer(codes, np.uint8)[9 * 256 + 100] == 0xFE
    assert np.frombuffer(dict(st[1:])["exp_avg"], np.uint8)[5 * 256 + 3] & 0x7F == 0x7F
    for level in _levels():
        assert _stepped(level, nthreads, name, start, grads, kw) == base, (level, nthreads)
