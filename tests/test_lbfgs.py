"""LBFGS: lockstep with torch 2.13 on Rosenbrock with and without the strong-Wolfe line
search, convergence, state_dict round trips and bad input."""
import numpy as np
import pytest

import fastopt
from helpers import import_torch, rosenbrock
from optim_db import inputs_of


@pytest.mark.parametrize("inp", inputs_of("LBFGS"))
def test_lbfgs_lockstep_with_torch(inp):
    """Equal ``func_evals`` and ``n_iter`` after every ``step()``, iterates within 1e-9 in
    float64 (the only differences are dot-product summation order and torch's fused
    ``add_(alpha=)``), 1e-5 in float32."""
    kwargs, dtype = inp.kwargs, np.dtype(inp.setup["dtype"]).type
    x0, calls = inp.setup["x0"], inp.setup["calls"]
    torch = import_torch(vector_kernels=False)
    x0 = np.array(x0, dtype)
    p = fastopt.Parameter(x0.copy())
    t = torch.tensor(x0.copy(), requires_grad=True)
    opt = fastopt.LBFGS([p], **kwargs)
    topt = torch.optim.LBFGS([t], **kwargs)

    def ours():
        f, g = rosenbrock(np.asarray(p))
        p.grad = g
        return f

    def theirs():
        f, g = rosenbrock(t.detach().numpy())
        t.grad = torch.from_numpy(g)
        return torch.tensor(f)

    tol = 1e-9 if dtype == np.float64 else 1e-5
    for k in range(calls):
        l1, l2 = opt.step(ours), topt.step(theirs)
        assert float(l1) == pytest.approx(float(l2), rel=tol, abs=tol), k
        s1, s2 = opt.state[p], topt.state[t]
        assert (s1["func_evals"], s1["n_iter"]) == (s2["func_evals"], s2["n_iter"]), k
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=tol, atol=tol, err_msg=str(k))
    assert sorted(s1) == sorted(s2)
    assert len(s1["old_dirs"]) == len(s2["old_dirs"])
    assert float(s1["t"]) == pytest.approx(float(s2["t"]), rel=1e-6)


def test_lbfgs_converges_on_rosenbrock_and_quadratic():
    p = fastopt.Parameter(np.array([-1.5, 2.0]))
    opt = fastopt.LBFGS([p], line_search_fn="strong_wolfe", max_iter=100)

    def closure():
        f, g = rosenbrock(np.asarray(p))
        p.grad = g
        return f

    for _ in range(3):
        opt.step(closure)
    assert closure() < 1e-9  # stops on tolerance_change=1e-9 at ~2e-10
    a = np.linspace(1, 10, 30)
    q = fastopt.Parameter(np.ones(30))
    opt = fastopt.LBFGS([q], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15)

    def quad():
        q.grad = a * np.asarray(q)
        return 0.5 * float(np.sum(a * np.asarray(q) ** 2))

    opt.step(quad)
    assert quad() < 1e-12


def test_lbfgs_state_dict_round_trip_continues_identically():
    def run(split):
        p = fastopt.Parameter(np.array([-1.5, 2.0, 0.5]))
        opt = fastopt.LBFGS([p], max_iter=4, line_search_fn="strong_wolfe")

        def closure():
            f, g = rosenbrock(np.asarray(p))
            p.grad = g
            return f

        for k in range(6):
            if k == split:
                sd = opt.state_dict()
                p2 = fastopt.Parameter(np.asarray(p).copy())
                opt = fastopt.LBFGS([p2], max_iter=4, line_search_fn="strong_wolfe")
                opt.load_state_dict(sd)
                p = p2

                def closure():  # noqa: F811 - rebound to the new parameter
                    f, g = rosenbrock(np.asarray(p))
                    p.grad = g
                    return f
            opt.step(closure)
        return np.asarray(p).copy(), opt.state[p]["func_evals"]

    a, ea = run(None)
    b, eb = run(3)
    assert np.array_equal(a, b) and ea == eb


def test_lbfgs_refuses_groups_and_a_bad_grad_changes_nothing():
    """(Invalid hyperparameters are in the database: tests/optim_db.py.)"""
    p, q = (fastopt.Parameter(np.ones(2)) for _ in range(2))
    with pytest.raises(ValueError, match="doesn't support per-parameter options"):
        fastopt.LBFGS([{"params": [p]}, {"params": [q]}])
    opt = fastopt.LBFGS([p, q])

    def bad():
        p.grad = np.ones(2)
        q.grad = np.ones(3)
        return 1.0

    before = (np.asarray(p).tobytes(), np.asarray(q).tobytes())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step(bad)
    assert (np.asarray(p).tobytes(), np.asarray(q).tobytes()) == before
    assert fastopt.LBFGS([p]).defaults["max_eval"] == 25
