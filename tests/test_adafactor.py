"""Adafactor: lockstep with torch 2.13 (vector, matrix and 3-D parameters) in torch's float32
tolerance, convergence and bad input."""
import numpy as np
import pytest

import fastopt
from helpers import import_torch, rosenbrock
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
