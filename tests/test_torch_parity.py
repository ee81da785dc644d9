"""Parity with torch.optim 2.13 (CPU) for every optimizer of the database with a torch twin.

Lockstep: 100 steps on random data for every valid configuration of every per-element
optimizer. The optimizers without a square root (``bitwise_vs_torch`` in the database: SGD,
Adamax, ASGD, Rprop) are compared bit for bit, special values and duplicate parameters
included. torch's CPU sqrt is MKL's, not the correctly rounded IEEE one the kernels use (about
18% of float32 inputs differ by one ulp), so the others are compared within torch's own
float32 tolerance (rtol 1.3e-6, atol 1e-5) at every step, and within 1e-12 in float64.

Every optimizer with a twin has torch's defaults, param_group keys and order, repr and
constructor signature.
"""
import inspect
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import _compressed
from helpers import F32, bits, grads, import_torch, same_bits
from optim_db import DB, WITH_TWIN, configs, names

STEPS = 100
N = 1029
TWINS = configs(where=lambda info: info.torch_name is not None)
EXACT = configs(where=lambda info: info.bitwise_vs_torch)


def _params(info):
    shape = info.param_shape
    return fastopt.Parameter(np.zeros(shape, np.float32)), shape


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,kwargs", TWINS)
def test_lockstep_with_torch(name, kwargs, dtype):
    torch = import_torch()
    info = DB[name]
    rng = np.random.default_rng(2024)
    shapes = [(N,), (7, 5)]
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    ts = [torch.tensor(x.copy(), requires_grad=True) for x in xs]
    opt = info.cls(ps, **kwargs)
    topt = info.torch_cls(torch)(ts, **info.torch_kwargs(kwargs))
    exact = info.bitwise_vs_torch
    rtol, atol = (F32["rtol"], F32["atol"]) if dtype == np.float32 else (1e-12, 1e-12)
    for step in range(STEPS):
        for p, t in zip(ps, ts):
            g = grads(rng, p.shape, dtype, step) + 0.3 * np.asarray(p)
            p.grad = g
            t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        for p, t in zip(ps, ts):
            ours, theirs = np.asarray(p), t.detach().numpy()
            if exact:
                assert np.array_equal(bits(ours), bits(theirs)), f"step {step}"
            else:
                np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol,
                                           err_msg=f"step {step}")
    # the same state keys in the same order, dtypes and shapes; scalars (step counters,
    # NAdam's mu_product, ASGD's eta and mu) bit for bit
    for p, t in zip(ps, ts):
        ours, theirs = opt.state.get(p, {}), topt.state.get(t, {})
        assert list(ours) == list(theirs)
        for key in ours:
            tv = theirs[key].detach().numpy()
            ov = np.asarray(ours[key])
            assert ov.dtype == tv.dtype and ov.shape == tv.shape, key
            if exact or ov.ndim == 0:
                assert np.array_equal(bits(ov), bits(tv)), key
            else:
                np.testing.assert_allclose(ov, tv, rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", names(WITH_TWIN))
def test_defaults_match_torch(name):
    torch = import_torch(vector_kernels=False)
    info = DB[name]
    p, shape = _params(info)
    ours = info.cls([p])
    theirs = info.torch_cls(torch)([torch.zeros(shape, requires_grad=True)])
    assert ours.defaults == theirs.defaults
    g_ours = {k: v for k, v in ours.param_groups[0].items() if k != "params"}
    g_theirs = {k: v for k, v in theirs.param_groups[0].items() if k != "params"}
    assert g_ours == g_theirs
    assert list(g_ours) == list(g_theirs)
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("name", names(WITH_TWIN))
def test_constructor_signature_matches_torch(name):
    """Same parameter names, order, kinds (positional / keyword-only) and defaults."""
    torch = import_torch(vector_kernels=False)
    info = DB[name]
    ours = dict(inspect.signature(info.cls.__init__).parameters)
    theirs = inspect.signature(info.torch_cls(torch).__init__).parameters
    # then fastopt's own keyword-only options of compressed state, where they apply
    own = [k for k in ours if k not in theirs]
    assert own in ([], list(_compressed.OPTIONS))
    for key in own:
        assert ours.pop(key).kind is inspect.Parameter.KEYWORD_ONLY
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].kind == theirs[key].kind, key
        assert ours[key].default == theirs[key].default, key


@pytest.mark.parametrize("name,kwargs", EXACT)
def test_special_values_bitwise_with_torch(name, kwargs):
    """NaN, infinities, signed zeros and denormals go through the same operations as in
    torch (NaNs compared as NaNs: their sign bit is not specified)."""
    torch = import_torch()
    info = DB[name]
    vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3e38, -1.0, 2.0, -3e-39,
                     5.0, -5.0, 1e-20, 0.5, -0.25, 7.0, 1.0], np.float32)
    p = fastopt.Parameter(np.linspace(-2, 2, vals.size).astype(np.float32))
    t = torch.tensor(np.asarray(p).copy(), requires_grad=True)
    opt = info.cls([p], **kwargs)
    topt = info.torch_cls(torch)([t], **info.torch_kwargs(kwargs))
    rng = np.random.default_rng(1)
    for k in range(6):
        g = rng.permutation(vals) if k % 2 else -vals
        p.grad = g
        t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        assert same_bits(p.view(np.ndarray), t.detach().numpy()), k
        for key, v in opt.state[p].items():
            assert same_bits(np.asarray(v), topt.state[t][key].numpy()), (k, key)


@pytest.mark.parametrize("name,kwargs", EXACT)
def test_duplicate_parameter_steps_twice_as_torch(name, kwargs):
    """A parameter listed twice in a group is updated twice per step (torch warns and does
    the same): the second occurrence sees the state the first left. fastopt's warning is
    torch's, with what happens added."""
    torch = import_torch()
    info = DB[name]
    x = np.random.default_rng(8).standard_normal(40).astype(np.float32)
    p = fastopt.Parameter(x.copy())
    t = torch.tensor(x.copy(), requires_grad=True)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        opt = info.cls([p, p], **kwargs)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        topt = info.torch_cls(torch)([t, t], **info.torch_kwargs(kwargs))
    assert [w.category for w in ours] == [UserWarning] == [w.category for w in theirs]
    assert str(ours[0].message).startswith(str(theirs[0].message))
    assert "updated twice" in str(ours[0].message)
    rng = np.random.default_rng(3)
    for k in range(8):
        g = rng.standard_normal(40).astype(np.float32)
        p.grad = g
        t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        assert np.array_equal(bits(p), bits(t.detach().numpy())), k
    for key, v in opt.state[p].items():
        assert np.array_equal(bits(np.asarray(v)), bits(topt.state[t][key].numpy())), key


def test_none_grad_skipped_zero_grad_steps_like_torch():
    """A None grad skips the parameter entirely; a zero grad still decays and moves it."""
    torch = import_torch()
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(5).astype(np.float32) for _ in range(3)]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    ts = [torch.tensor(x.copy(), requires_grad=True) for x in xs]
    opt = fastopt.Adam(ps, lr=0.1, weight_decay=0.1)
    topt = torch.optim.Adam(ts, lr=0.1, weight_decay=0.1)
    for step in range(6):
        for i, (p, t) in enumerate(zip(ps, ts)):
            if (i + step) % 3 == 0:
                p.grad, t.grad = None, None
            elif (i + step) % 3 == 1:
                p.grad, t.grad = np.zeros(5, np.float32), torch.zeros(5)
            else:
                g = rng.standard_normal(5).astype(np.float32)
                p.grad, t.grad = g, torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        for p, t in zip(ps, ts):
            np.testing.assert_allclose(np.asarray(p), t.detach().numpy(), rtol=1.3e-6, atol=1e-6)
    sd, tsd = opt.state_dict(), topt.state_dict()
    assert list(sd["state"]) == list(tsd["state"])  # insertion order of first steps
    for k in sd["state"]:
        assert float(sd["state"][k]["step"]) == float(tsd["state"][k]["step"])


def test_load_state_dict_produced_by_torch():
    """A torch state_dict (tensors turned into arrays) loads and continues in lockstep."""
    torch = import_torch()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    t = torch.tensor(x.copy(), requires_grad=True)
    topt = torch.optim.Adam([t], lr=0.05, amsgrad=True)
    for _ in range(10):
        t.grad = torch.from_numpy(rng.standard_normal((4, 6)).astype(np.float32))
        topt.step()
    tsd = topt.state_dict()
    sd = {"state": {k: {kk: vv.detach().numpy().copy() for kk, vv in v.items()}
                    for k, v in tsd["state"].items()},
          "param_groups": tsd["param_groups"]}
    p = fastopt.Parameter(t.detach().numpy().copy())
    opt = fastopt.Adam([p], lr=1.0)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["amsgrad"] is True
    for _ in range(20):
        g = rng.standard_normal((4, 6)).astype(np.float32)
        p.grad, t.grad = g, torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        np.testing.assert_allclose(np.asarray(p), t.detach().numpy(), rtol=1.3e-6, atol=1e-5)
    assert float(opt.state[p]["step"]) == 30.0
