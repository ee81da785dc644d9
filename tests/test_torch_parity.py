"""Lockstep parity with torch.optim 2.13 (CPU): 100 steps on random data.

SGD takes no square root and is compared bit for bit. torch's CPU sqrt is MKL's, not the
correctly rounded IEEE one the kernels use (about 18% of float32 inputs differ by one ulp),
so the square-root optimizers are compared within torch's own float32 tolerance
(rtol 1.3e-6, atol 1e-5) at every step, and within 1e-12 relative in float64.
"""
import numpy as np
import pytest

import fastopt
from cases import VALID

torch = pytest.importorskip("torch", reason="torch is not installed: parity tests need it")

STEPS = 100
N = 1029


def torch_optimizer(name, params, kwargs):
    return getattr(torch.optim, name)(params, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,kwargs", VALID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VALID)])
def test_lockstep_with_torch(name, kwargs, dtype):
    rng = np.random.default_rng(2024)
    shapes = [(N,), (7, 5)]
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    ts = [torch.tensor(x.copy(), requires_grad=True) for x in xs]
    opt = fastopt.OPTIMIZERS[name](ps, **kwargs)
    topt = torch_optimizer(name, ts, kwargs)
    exact = name == "SGD"
    rtol, atol = (1.3e-6, 1e-5) if dtype == np.float32 else (1e-12, 1e-12)
    for step in range(STEPS):
        for p, t in zip(ps, ts):
            g = rng.standard_normal(p.shape).astype(dtype)
            p.grad = g
            t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        for p, t in zip(ps, ts):
            ours, theirs = np.asarray(p), t.detach().numpy()
            if exact:
                assert np.array_equal(ours, theirs), f"step {step}"
            else:
                np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol,
                                           err_msg=f"step {step}")
    # same state keys, dtypes and shapes; step counters equal
    for p, t in zip(ps, ts):
        ours, theirs = opt.state[p], topt.state[t]
        assert list(ours) == list(theirs)
        for key in ours:
            tv = theirs[key].detach().numpy()
            assert np.asarray(ours[key]).dtype == tv.dtype, key
            assert np.asarray(ours[key]).shape == tv.shape, key
            if key == "step":
                assert float(ours[key]) == float(tv)
            elif exact:
                assert np.array_equal(ours[key], tv)
            else:
                np.testing.assert_allclose(ours[key], tv, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
def test_defaults_match_torch(name):
    p = fastopt.Parameter(np.zeros(2, np.float32))
    t = torch.zeros(2, requires_grad=True)
    ours = fastopt.OPTIMIZERS[name]([p])
    theirs = getattr(torch.optim, name)([t])
    assert ours.defaults == theirs.defaults
    g_ours = {k: v for k, v in ours.param_groups[0].items() if k != "params"}
    g_theirs = {k: v for k, v in theirs.param_groups[0].items() if k != "params"}
    assert g_ours == g_theirs
    assert list(g_ours) == list(g_theirs)
    assert repr(ours) == repr(theirs)


def test_none_grad_skipped_zero_grad_steps_like_torch():
    """A None grad skips the parameter entirely; a zero grad still decays and moves it."""
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
