"""float16 and bfloat16 parameters: NumPy arrays (``np.float16``, ``ml_dtypes.bfloat16``)
and torch tensors (``torch.float16``, ``torch.bfloat16``), stepped by the per-element
kernels in float32 arithmetic with their state in the parameter's dtype, as torch.optim
keeps it.

What the kernels compute is exact by construction: each element of the parameter, its
gradient and its state is widened to float32 (exactly), the float32 loop updates it, and the
results are stored rounded to nearest, ties to even. So a 16-bit step equals, bit for bit, a
float32 step of the same values followed by rounding the parameter and every state array to
the dtype (``test_numpy_path_is_the_float32_step_rounded``), on every ISA level and thread
count, and the torch classes give the NumPy path's numbers. The conversions are torch's
(``test_conversions_are_torch_roundings``).

torch.optim's single-tensor step rounds every intermediate to the dtype (each in-place op:
``mul_`` then ``addcmul_`` of ``exp_avg_sq``, the ``sqrt`` and ``add_`` of the denominator,
...), fastopt only what it stores, so the two differ by more than a rounding:
``test_lockstep_with_torch`` compares the parameters after every step within
``rtol = 4 eps`` (the parameters' own rounding, a few ulps) plus ``atol = 32 t eps u``: up to
32 ulps of the largest single update ``u`` seen so far per rounded intermediate and step,
added over the ``t`` steps taken. With decoupled weight decay torch also rounds ``p * (1 - lr
* wd)`` to the dtype at every step, half an ulp of the parameter each time: ``rtol`` grows by
``eps / 2`` per step taken.
"""
import copy
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _kernels

from optim_db import DB, configs

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
import fastopt.torch as ft  # noqa: E402

# torch.sparse_coo_tensor builds sparse tensors without saying whether to check them
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")

STEPS = 20
SHAPE = (7, 9)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NUMPY_DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16}
TWINNED = configs(where=lambda info: info.torch_name is not None)
ALL = configs()


def _grads(dtype, seed, shape=SHAPE):
    """Gradients of random sign and magnitudes in [0.1, 1.1): torch's own float16 step
    underflows its squared gradients below that (exp_avg_sq of 0, then a division by eps
    rounded to 0 in float16), which is torch's behaviour, not a comparison of the two."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).sign() * (0.1 + torch.rand(shape, generator=g))
    return x.to(dtype)


def _start(dtype, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(99)).to(dtype)


def _np(t):
    """The NumPy array of the 16-bit tensor ``t`` (ml_dtypes.bfloat16 for bfloat16)."""
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint16)


def test_import_fastopt_does_not_import_ml_dtypes():
    code = ("import sys, fastopt, fastopt.torch; assert 'ml_dtypes' not in sys.modules, "
            "'imported'; import numpy as np; p = fastopt.Parameter(np.ones(3, np.float16)); "
            "p.grad = np.ones(3, np.float16); fastopt.Adam([p]).step(); "
            "assert 'ml_dtypes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_conversions_are_torch_roundings(key):
    """SGD with lr 1 stores p - g, computed in float32 and rounded once to the dtype, as
    torch's 16-bit add does: every finite bit pattern as p, random patterns as g (sums that
    overflow, underflow to subnormals and zero, and ties), bit for bit."""
    dt = TORCH_DTYPES[key]
    p_bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    rng = np.random.default_rng(1)
    g_bits = torch.from_numpy(rng.integers(-32768, 32768, p_bits.numel()).astype(np.int16))
    p, g = p_bits.view(dt).clone(), g_bits.view(dt).clone()
    keep = torch.isfinite(p) & torch.isfinite(g)
    p, g = p[keep].clone(), g[keep].clone()
    expected = p.clone().add_(g, alpha=-1.0)
    mine = p.clone().requires_grad_()
    mine.grad = g.clone()
    ft.SGD([mine], lr=1.0).step()
    assert torch.equal(mine.detach().view(torch.int16), expected.view(torch.int16))
    # and the same for NumPy parameters
    q = fastopt.Parameter(_np(p))
    q.grad = _np(g)
    fastopt.SGD([q], lr=1.0).step()
    np.testing.assert_array_equal(_bits(q), expected.view(torch.int16).numpy().view(np.uint16))


def _rounded(arr, ndt):
    return np.asarray(arr, dtype=ndt).astype(np.float32)


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", ALL)
def test_numpy_path_is_the_float32_step_rounded(name, kwargs, key):
    ndt = NUMPY_DTYPES[key]
    start = _np(_start(TORCH_DTYPES[key]))
    p = fastopt.Parameter(start.copy())
    r = fastopt.Parameter(start.astype(np.float32))
    opt = getattr(fastopt, name)([p], **kwargs)
    ref = getattr(fastopt, name)([r], **kwargs)
    tp = torch.from_numpy(start.view(np.int16)).view(TORCH_DTYPES[key]).clone() \
        if key == "bf16" else torch.from_numpy(start.copy())
    tp.requires_grad_()
    topt = getattr(ft, name)([tp], **kwargs)
    if name in ("Adagrad", "Rprop"):
        # state that starts at a value (the initial sum, lr as the step sizes) starts rounded
        init = {}
        ref._init_state(init, np.asarray(r), ref.param_groups[0])
        ref.state[r] = {k: (_rounded(v, ndt) if v.shape == r.shape else v)
                        for k, v in init.items()}
    for step in range(STEPS):
        g = _np(_grads(TORCH_DTYPES[key], step))
        p.grad = g
        r.grad = g.astype(np.float32)
        tp.grad = _grads(TORCH_DTYPES[key], step)
        opt.step()
        ref.step()
        topt.step()
        # the reference's parameter and state arrays, rounded to the dtype
        r[...] = _rounded(r, ndt)
        for k, v in ref.state[r].items():
            if isinstance(v, np.ndarray) and v.shape == r.shape and v.dtype == np.float32:
                v[...] = _rounded(v, ndt)
        np.testing.assert_array_equal(_bits(p), _bits(np.asarray(r, dtype=ndt)),
                                      err_msg=f"step {step}")
        np.testing.assert_array_equal(_bits(p), _bits(_np(tp.detach())),
                                      err_msg=f"step {step}: fastopt.torch")
    assert opt.state[p].keys() == ref.state[r].keys()
    for k, v in opt.state[p].items():
        w = ref.state[r][k]
        if k == "step" or v.shape != p.shape:
            assert v.dtype == np.float32 and v.dtype == w.dtype, k  # step, 0-d entries
            np.testing.assert_array_equal(v, w)
        else:
            assert v.dtype == np.dtype(ndt), k
            np.testing.assert_array_equal(_bits(v), _bits(np.asarray(w, dtype=ndt)), k)
            t = topt.state[tp][k]
            assert t.dtype is TORCH_DTYPES[key], k
            np.testing.assert_array_equal(_bits(v), _bits(_np(t)), k)


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("isa", _kernels.isa_levels())
def test_every_isa_level_and_thread_count_gives_the_same_bits(isa, key):
    if not _kernels.isa_supported(isa):
        pytest.skip(f"{isa} not supported here")
    n = 2 * 32768 + 1000  # split over two threads, ranges not at block boundaries
    old_isa, old_threads = _kernels.get_isa(), fastopt.get_num_threads()
    out = {}
    try:
        for label, level, threads in (("base", "baseline", 1), ("this", isa, 2)):
            _kernels.set_isa(level)
            fastopt.set_num_threads(threads)
            p = fastopt.Parameter(_np(_start(TORCH_DTYPES[key], (n,))))
            opt = fastopt.Adam([p], lr=1e-2, weight_decay=0.1, amsgrad=True)
            for step in range(3):
                p.grad = _np(_grads(TORCH_DTYPES[key], step, (n,)))
                opt.step()
            out[label] = (_bits(p).copy(), _bits(opt.state[p]["exp_avg_sq"]).copy())
    finally:
        _kernels.set_isa(old_isa)
        fastopt.set_num_threads(old_threads)
    np.testing.assert_array_equal(out["base"][0], out["this"][0])
    np.testing.assert_array_equal(out["base"][1], out["this"][1])


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", TWINNED)
def test_lockstep_with_torch(name, kwargs, key):
    dt = TORCH_DTYPES[key]
    eps = torch.finfo(dt).eps
    mine = _start(dt).requires_grad_()
    theirs = _start(dt).requires_grad_()
    opt = getattr(ft, name)([mine], **kwargs)
    topt = getattr(torch.optim, DB[name].torch_name)([theirs], **kwargs)
    decoupled = kwargs.get("weight_decay", 0.0 if name != "AdamW" else 1e-2) != 0 and (
        name == "AdamW" or kwargs.get("decoupled_weight_decay", False))
    u = 0.0
    for step in range(STEPS):
        mine.grad = _grads(dt, step)
        theirs.grad = _grads(dt, step)
        before = theirs.detach().float()
        opt.step()
        topt.step()
        u = max(u, (theirs.detach().float() - before).abs().max().item())
        rtol = (4 + (step + 1) / 2 * decoupled) * eps
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=rtol,
                                   atol=32 * (step + 1) * eps * u,
                                   msg=lambda m, s=step: f"step {s}: {m}")
    sd, tsd = opt.state_dict(), topt.state_dict()
    assert sd["param_groups"] == tsd["param_groups"]
    for i, st in tsd["state"].items():
        assert sd["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert sd["state"][i][k].dtype == v.dtype and sd["state"][i][k].shape == v.shape, k


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", [c for c in TWINNED if c.values[0] in (
    "SGD", "Adam", "Adagrad", "Rprop", "NAdam", "ASGD", "RMSprop")])
def test_torch_state_dict_loads_and_continues(name, kwargs, key):
    """A torch.optim state dict of a 16-bit model loads into fastopt.torch and continues as
    the uninterrupted fastopt.torch run; fastopt.torch's own state dict round trips."""
    if name == "SGD" and not kwargs.get("momentum"):
        kwargs = dict(kwargs, momentum=0.9)
    dt = TORCH_DTYPES[key]
    a, b, c = (_start(dt).requires_grad_() for _ in range(3))
    opt_a = getattr(ft, name)([a], **kwargs)
    topt = getattr(torch.optim, DB[name].torch_name)([b], **kwargs)
    for step in range(3):
        a.grad = _grads(dt, step)
        b.grad = _grads(dt, step)
        opt_a.step()
        topt.step()
    # fastopt.torch's state dict, into a fresh optimizer of a copy of the parameter
    with torch.no_grad():
        c.copy_(a)
    opt_c = getattr(ft, name)([c], **kwargs)
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for k, v in opt_c.state[c].items():
        assert v.dtype == opt_a.state[a][k].dtype and torch.equal(v, opt_a.state[a][k]), k
    # torch's, into fastopt.torch stepping torch's parameter from here
    opt_b = getattr(ft, name)([b], **kwargs)
    opt_b.load_state_dict(copy.deepcopy(topt.state_dict()))
    for k, v in opt_b.state[b].items():
        assert v.dtype == topt.state[b][k].dtype and torch.equal(v, topt.state[b][k]), k
    ref_b = _start(dt)
    with torch.no_grad():
        ref_b.copy_(b)
    ref_b.requires_grad_()
    ref_opt = getattr(ft, name)([ref_b], **kwargs)
    ref_opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    for step in range(3, 6):
        for t in (a, c, b, ref_b):
            t.grad = _grads(dt, step)
        opt_a.step()
        opt_c.step()
        opt_b.step()
        ref_opt.step()
    assert torch.equal(a.view(torch.int16), c.view(torch.int16))
    assert torch.equal(b.view(torch.int16), ref_b.view(torch.int16))
    if "step" in opt_b.state[b]:
        assert opt_b.state[b]["step"].item() == 6.0


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_numpy_state_dict_round_trip(key):
    ndt = NUMPY_DTYPES[key]
    start = _np(_start(TORCH_DTYPES[key]))
    p, q = fastopt.Parameter(start.copy()), fastopt.Parameter(start.copy())
    opt = fastopt.Adam([p], lr=1e-2, amsgrad=True)
    for step in range(3):
        p.grad = _np(_grads(TORCH_DTYPES[key], step))
        opt.step()
    q[...] = p
    other = fastopt.Adam([q], lr=1e-2, amsgrad=True)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.state[q]["exp_avg"].dtype == np.dtype(ndt)
    assert other.state[q]["step"].dtype == np.float32
    for step in range(3, 6):
        p.grad = _np(_grads(TORCH_DTYPES[key], step))
        q.grad = p.grad.copy()
        opt.step()
        other.step()
    np.testing.assert_array_equal(_bits(p), _bits(q))


# ---- bad input: refused naming the parameter, nothing changed -----------------------------

def _numpy_setup(key):
    p = fastopt.Parameter(_np(_start(TORCH_DTYPES[key])))
    opt = fastopt.Adam([p], lr=1e-2)
    p.grad = _np(_grads(TORCH_DTYPES[key], 0))
    opt.step()
    return p, opt


def _unchanged(p, opt):
    before = (_bits(p).copy(), {k: np.array(v, copy=True) for k, v in opt.state[p].items()})

    def check():
        np.testing.assert_array_equal(_bits(p), before[0])
        for k, v in opt.state[p].items():
            assert np.asarray(v).tobytes() == before[1][k].tobytes(), k
    return check


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("cached", [True, False])
def test_numpy_gradient_of_another_dtype_is_refused(key, cached):
    # float32 gradients are taken (tests/test_compressed_state.py); other dtypes are not
    p, opt = _numpy_setup(key)
    p.grad = _np(_grads(TORCH_DTYPES[key], 1))
    opt.step()  # the next step may run from the cache
    if not cached:
        _kernels.forget(opt)
    check = _unchanged(p, opt)
    for bad in (np.ones(SHAPE, np.float64), np.ones(SHAPE, np.float16 if key == "bf16"
                                                      else np.int16),
                np.ones(SHAPE, np.uint16)):
        p.grad = bad
        with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]: \.grad has "
                                            rf"dtype {bad.dtype}"):
            opt.step()
        check()


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_numpy_state_of_another_dtype_is_refused(key):
    p, opt = _numpy_setup(key)
    check = _unchanged(p, opt)
    good = opt.state[p]["exp_avg"]
    opt.state[p]["exp_avg"] = good.astype(np.float32)
    p.grad = _np(_grads(TORCH_DTYPES[key], 1))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: "
                                         r"state\['exp_avg'\] has dtype float32"):
        opt.step()
    opt.state[p]["exp_avg"] = good
    check()


def test_numpy_16_bit_integers_and_non_kernel_optimizers_refuse_16_bit():
    for bad in (np.zeros(3, np.int16), np.zeros(3, np.uint16)):
        with pytest.raises(TypeError, match="float16 or bfloat16"):
            fastopt.Parameter(bad)
    p = fastopt.Parameter(np.zeros(3, np.float16))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\].*float16"):
        fastopt.LBFGS([p])


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_torch_gradient_of_another_dtype_is_refused(key):
    dt = TORCH_DTYPES[key]
    p = _start(dt).requires_grad_()
    opt = ft.Adam([p], lr=1e-2)
    p.grad = _grads(dt, 0)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    p.grad_dtype = None  # torch lets such gradients be set only then
    for bad in (torch.float64, torch.int16):  # float32: tests/test_compressed_state.py
        p.grad = torch.ones(SHAPE, dtype=bad)
        text = str(bad).replace("torch.", "")
        with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]: \.grad has "
                                            rf"dtype (torch\.)?{text}, the parameter "
                                            rf"(torch\.)?{str(dt).replace('torch.', '')}"):
            opt.step()
        assert torch.equal(p.detach().view(torch.int16), before[0].view(torch.int16))
        for k, v in opt.state[p].items():
            assert torch.equal(v, before[1][k]), k


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_torch_state_of_another_dtype_is_refused(key):
    dt = TORCH_DTYPES[key]
    p = _start(dt).requires_grad_()
    opt = ft.Adam([p], lr=1e-2)
    p.grad = _grads(dt, 0)
    opt.step()
    before = p.detach().clone()
    good = opt.state[p]["exp_avg"]
    for bad in (torch.float32, torch.int16):
        opt.state[p]["exp_avg"] = good.to(bad)
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: "
                                             r"state\['exp_avg'\] has dtype"):
            opt.step()
        assert torch.equal(p.detach().view(torch.int16), before.view(torch.int16))
    opt.state[p]["exp_avg"] = good
    opt.step()


def test_fastopt_classes_take_float16_tensors_and_refuse_bfloat16_ones():
    p = _start(torch.float16).requires_grad_()
    q = _start(torch.float16).requires_grad_()
    opt, topt = fastopt.Adam([p], lr=1e-2), ft.Adam([q], lr=1e-2)
    for step in range(3):
        p.grad = _grads(torch.float16, step)
        q.grad = _grads(torch.float16, step)
        opt.step()
        topt.step()
    assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\].*fastopt\.torch"):
        fastopt.Adam([_start(torch.bfloat16).requires_grad_()])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\].*float16"):
        ft.LBFGS([_start(torch.float16).requires_grad_()])


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_gradients_of_16_bit_parameters_are_refused(name, key):
    dt = TORCH_DTYPES[key]
    e = torch.nn.Embedding(5, 3, sparse=True).to(dt)
    opt = getattr(ft, name)(e.parameters(), lr=0.1)
    before = e.weight.detach().clone()
    state = {k: v.clone() for k, v in opt.state[e.weight].items()}  # Adagrad's, made at once
    e.weight.grad = torch.sparse_coo_tensor([[1, 3]], torch.ones(2, 3, dtype=dt), (5, 3))
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\]: fastopt "
                                           rf"does not support sparse gradients of {dt}"):
        opt.step()
    assert torch.equal(e.weight.detach().view(torch.int16), before.view(torch.int16))
    assert opt.state[e.weight].keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in opt.state[e.weight].items())


# ---- the cached step ----------------------------------------------------------------------

@pytest.mark.parametrize("world", ["numpy", "torch"])
@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", [("Adam", {"lr": 1e-2, "amsgrad": True}),
                                         ("SGD", {"lr": 0.1, "momentum": 0.9}),
                                         ("NAdam", {"lr": 1e-2}), ("Rprop", {"lr": 1e-2})])
def test_cached_step_is_the_full_step(name, kwargs, key, world):
    """Two optimizers of two 16-bit and one float32 parameter, one stepping from its cache
    where it can, the other with its cache dropped before every step: the same bits, and the
    same refusal of a float32 gradient for a 16-bit parameter (nothing changed)."""
    dt = TORCH_DTYPES[key]

    def make():
        if world == "numpy":
            ps = [fastopt.Parameter(_np(_start(dt))), fastopt.Parameter(_np(_start(dt, (5,)))),
                  fastopt.Parameter(np.ones(4, np.float32))]
            return getattr(fastopt, name)(ps, **kwargs), ps
        ps = [_start(dt).requires_grad_(), _start(dt, (5,)).requires_grad_(),
              torch.ones(4, requires_grad=True)]
        return getattr(ft, name)(ps, **kwargs), ps

    def grad(p, step):
        g = _grads(dt if p.dtype != np.float32 and p.dtype != torch.float32 else torch.float32,
                   step, tuple(p.shape))
        return _np(g) if world == "numpy" and g.dtype != torch.float32 else (
            g.numpy() if world == "numpy" else g)

    def bits_of(opt, ps):
        out = []
        for p in ps:
            arr = (np.asarray(p) if world == "numpy" else
                   p.detach().view(torch.int16 if p.dtype is torch.bfloat16 else p.dtype).numpy())
            out.append(arr.tobytes())
            for k, v in sorted(opt.state[p].items()):
                if isinstance(v, torch.Tensor):
                    v = v.view(torch.int16) if v.dtype is torch.bfloat16 else v
                    v = v.numpy()
                out.append((k, np.asarray(v).tobytes()))
        return out

    (a, pa), (b, pb) = make(), make()
    for step in range(6):
        for p, q in zip(pa, pb):
            p.grad = grad(p, step)
            q.grad = grad(q, step)
        if step == 4:  # a float32 gradient for the first, 16-bit parameter
            if world == "torch":
                pa[0].grad_dtype = pb[0].grad_dtype = None  # torch allows it only then
            pa[0].grad = grad(pa[2], step)[:1].repeat(SHAPE[0] * SHAPE[1]).reshape(SHAPE) \
                if world == "numpy" else torch.ones(SHAPE)
            pb[0].grad = pa[0].grad.copy() if world == "numpy" else pa[0].grad.clone()
            # taken as it is (float32 gradients of 16-bit parameters), by both paths
            if world == "numpy":
                pa[0].grad = pa[0].grad.astype(np.float32)
                pb[0].grad = pb[0].grad.astype(np.float32)
        _kernels.forget(b)
        a.step()
        b.step()
        assert bits_of(a, pa) == bits_of(b, pb), f"step {step}"
    if world == "numpy" or key == "fp16":
        assert _kernels.cached(a)  # the cache ran these steps
