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


def _lbfgs(**kwargs):
    p = fastopt.Parameter(np.array([-1.5, 2.0, 0.5]))
    q = fastopt.Parameter(np.array([[0.3, -0.2]]))
    opt = fastopt.LBFGS([p, q], max_iter=5, **kwargs)
    calls = [0, None]  # calls made, the call that raises

    def closure():
        calls[0] += 1
        if calls[0] == calls[1]:
            raise RuntimeError("the model failed")
        x = np.concatenate([np.asarray(p), np.asarray(q).ravel()])
        f, g = rosenbrock(x)
        p.grad, q.grad = g[:3], g[3:].reshape(1, 2)
        return f

    return opt, (p, q), closure, calls


def _history(opt, ps):
    st = opt.state.get(ps[0], {})
    return [np.asarray(p).tobytes() for p in ps], {
        k: [np.asarray(x).tobytes() for x in v] if isinstance(v, list) else np.asarray(v).tobytes()
        for k, v in st.items()}


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_closure_error_restores_parameters_and_history(line_search_fn, first):
    """A closure that raises on its 3rd call of a step (mid-iteration): the parameters and
    the state are put back, and the run then continues bit for bit as one that never had
    the failing step (torch leaves the state half-written: the next step raises)."""
    opt, ps, closure, calls = _lbfgs(line_search_fn=line_search_fn)
    ref, rps, rclosure, _ = _lbfgs(line_search_fn=line_search_fn)
    if not first:
        opt.step(closure)
        ref.step(rclosure)
    before = _history(opt, ps)
    calls[1] = calls[0] + 3
    with pytest.raises(RuntimeError, match="the model failed"):
        opt.step(closure)
    assert _history(opt, ps) == before
    assert first == (ps[0] not in opt.state)
    for _ in range(3):
        opt.step(closure)
        ref.step(rclosure)
        assert _history(opt, ps) == _history(ref, rps)


def test_lbfgs_bad_grad_mid_step_restores_everything():
    opt, ps, closure, _ = _lbfgs()
    opt.step(closure)
    before = _history(opt, ps)
    n = [0]

    def bad():
        n[0] += 1
        f = closure()
        if n[0] == 2:
            ps[1].grad = np.ones(3)
        return f

    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step(bad)
    assert _history(opt, ps) == before


def _saved():
    opt, ps, closure, _ = _lbfgs()
    for _ in range(2):
        opt.step(closure)
    return opt, ps, opt.state_dict()


_VEC = np.zeros(5)


@pytest.mark.parametrize("key, value, exc, match", [
    ("d", np.zeros(4), ValueError, r"state\['d'\] must be a float64 vector of 5 elements"),
    ("d", None, ValueError, r"state\['d'\] must be a float64 vector"),
    ("d", np.zeros(5, np.int64), ValueError, r"state\['d'\] must be a float64 vector"),
    ("prev_flat_grad", "abc", ValueError, r"state\['prev_flat_grad'\]"),
    ("old_dirs", "abc", TypeError, r"state\['old_dirs'\] must be a list"),
    ("old_dirs", None, TypeError, r"state\['old_dirs'\] must be a list"),
    ("old_stps", [_VEC, np.zeros(6)], ValueError, r"state\['old_stps'\]\[1\]"),
    ("old_dirs", [_VEC, _VEC, _VEC], ValueError, "must have one length"),
    ("ro", ["x"], TypeError, r"state\['ro'\]\[0\] must be a real number"),
    ("al", [None, "x"], TypeError, r"state\['al'\]\[1\] must be a real number or None"),
    ("t", None, TypeError, r"state\['t'\] must be a real number"),
    ("H_diag", np.ones(2), TypeError, r"state\['H_diag'\]"),
    ("prev_loss", "0.5", TypeError, r"state\['prev_loss'\]"),
    ("n_iter", "3", TypeError, r"state\['n_iter'\] must be an int >= 0"),
    ("func_evals", -1, TypeError, r"state\['func_evals'\] must be an int >= 0"),
    ("d", KeyError, KeyError, r"n_iter = \d+ but no 'd'")])
def test_lbfgs_load_state_dict_checks_the_history(key, value, exc, match):
    opt, ps, sd = _saved()
    sd["state"][0] = dict(sd["state"][0])
    if value is KeyError:
        del sd["state"][0][key]
    else:
        sd["state"][0][key] = value
    before = _history(opt, ps)
    with pytest.raises(exc, match=r"param_groups\[0\]\['params'\]\[0\].*" + match):
        opt.load_state_dict(sd)
    assert _history(opt, ps) == before


def test_lbfgs_loads_tuples_and_0d_arrays_and_a_shorter_history_size():
    """What a step can use is accepted: tuples become lists, 0-d arrays numbers; a lower
    history_size drops the oldest pairs at the next update."""
    _, ps, sd = _saved()
    st = sd["state"][0]
    assert len(st["old_dirs"]) >= 3
    sd = {"state": {0: dict(st, old_dirs=tuple(st["old_dirs"]), t=np.array(st["t"]))},
          "param_groups": [dict(sd["param_groups"][0], history_size=2)]}
    opt2, ps2, closure2, _ = _lbfgs()
    for a, b in zip(ps2, ps):
        a[...] = b
    opt2.load_state_dict(sd)
    assert isinstance(opt2.state[ps2[0]]["old_dirs"], list)
    opt2.step(closure2)
    assert len(opt2.state[ps2[0]]["old_dirs"]) <= 2
