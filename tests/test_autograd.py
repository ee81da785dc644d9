"""HIPS autograd and fastopt: Parameters differentiate as arrays (registered without
fastopt ever importing autograd), and ``fastopt.minimize`` runs autograd-style loops."""
import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt
from helpers import assert_bits

autograd = pytest.importorskip("autograd")
anp = pytest.importorskip("autograd.numpy")
optimizers = pytest.importorskip("autograd.misc.optimizers")


def _run(code):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # the last line: an editable install may print its rebuild first
    return out.stdout.strip().splitlines()[-1]


def test_import_fastopt_never_imports_autograd_and_registers_when_it_is_imported():
    out = _run("""
        import sys
        import numpy as np
        import fastopt
        assert "autograd" not in sys.modules, "fastopt imported autograd"
        p = fastopt.Parameter(np.arange(3.0))
        finders = lambda: [f for f in sys.meta_path if type(f).__name__ == "_AutogradFinder"]
        assert len(finders()) == 1
        import importlib.util
        assert importlib.util.find_spec("autograd") is not None  # a look-up imports nothing
        assert "autograd" not in sys.modules and len(finders()) == 1
        import autograd, autograd.numpy as anp
        assert finders() == []   # done: the finder is gone
        # the package's loader is the real one again
        assert type(autograd.__spec__.loader).__module__.startswith("_frozen_importlib")
        assert type(autograd.__loader__).__module__.startswith("_frozen_importlib")
        g = autograd.grad(lambda x: anp.sum(x ** 2))(p)
        print(type(g).__name__, g.tolist())
    """)
    assert out.split() == ["ndarray", "[0.0,", "2.0,", "4.0]"]


def test_autograd_imported_first():
    out = _run("""
        import autograd, autograd.numpy as anp
        import numpy as np
        import fastopt
        p = fastopt.Parameter(np.ones(2, np.float32))
        print(autograd.grad(lambda x: anp.sum(3 * x))(p).tolist())
    """)
    assert out.strip() == "[3.0, 3.0]"


def test_gradient_of_a_parameter_is_the_arrays():
    x = np.linspace(-1, 2, 7)
    p = fastopt.Parameter(x.copy())
    f = lambda v: anp.sum(anp.sin(v) * v ** 2)  # noqa: E731
    g = autograd.grad(f)(p)
    assert type(g) is np.ndarray
    assert_bits(g, autograd.grad(f)(x))
    np.testing.assert_allclose(g, np.cos(x) * x ** 2 + 2 * x * np.sin(x), rtol=1e-14)


def test_gradient_through_containers_of_parameters():
    w = fastopt.Parameter(np.array([1.0, 2.0]))
    b = fastopt.Parameter(np.array(0.5))
    tree = {"w": w, "rest": [b, (fastopt.Parameter(np.ones(2, np.float32)),)]}
    f = lambda t: anp.sum(t["w"] ** 3) + t["rest"][0] * anp.sum(t["rest"][1][0])  # noqa: E731
    g = autograd.grad(f)(tree)
    np.testing.assert_array_equal(g["w"], 3 * np.array([1.0, 4.0]))
    assert float(g["rest"][0]) == 2.0
    np.testing.assert_array_equal(g["rest"][1][0], [0.5, 0.5])
    assert g["rest"][1][0].dtype == np.float32


def _objective(x, i):
    return (anp.sum((x["w"] - 3.0) ** 2) + x["b"] ** 2
            + anp.sum(anp.sin(x["layers"][0]) * (1 + 0.01 * i)))


def _x0():
    return {"w": np.array([0.0, -1.0]), "b": 1.0, "layers": [np.arange(3.0)]}


def test_minimize_adam_matches_autograds_adam():
    grad = autograd.grad(_objective)
    x0 = _x0()
    kept = copy.deepcopy(x0)
    mine = fastopt.minimize(grad, x0, "adam", num_iters=300, lr=0.05, betas=(0.8, 0.99),
                            eps=1e-7)
    theirs = optimizers.adam(grad, x0, num_iters=300, step_size=0.05, b1=0.8, b2=0.99,
                             eps=1e-7)
    for key in ("w", "b"):
        np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(mine["layers"][0], theirs["layers"][0], rtol=1e-12)
    assert isinstance(mine["layers"], list) and type(mine["w"]) is np.ndarray
    assert np.shape(mine["b"]) == ()
    # x0 is not modified
    np.testing.assert_array_equal(x0["w"], kept["w"])
    assert x0["b"] == kept["b"]


def test_minimize_sgd_matches_autograds_sgd_without_momentum():
    grad = autograd.grad(_objective)
    mine = fastopt.minimize(grad, _x0(), "SGD", num_iters=50, lr=0.1)
    theirs = optimizers.sgd(grad, _x0(), num_iters=50, step_size=0.1, mass=0.0)
    for key in ("w", "b"):
        np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-14, atol=1e-15)


def test_minimize_equals_the_class_loop_bit_for_bit():
    grad = autograd.grad(_objective)
    mine = fastopt.minimize(grad, _x0(), fastopt.NAdam, num_iters=20, lr=0.01)
    x = {k: fastopt.Parameter(np.array(v, dtype=np.float64)) if not isinstance(v, list)
         else [fastopt.Parameter(np.array(v[0]))] for k, v in _x0().items()}
    opt = fastopt.NAdam([x["b"], x["layers"][0], x["w"]], lr=0.01)
    for i in range(20):
        g = grad(x, i)
        x["b"].grad, x["layers"][0].grad, x["w"].grad = (np.asarray(g["b"]), g["layers"][0],
                                                         g["w"])
        opt.step()
    assert_bits(mine["w"], x["w"])
    assert_bits(mine["b"], x["b"])
    assert_bits(mine["layers"][0], x["layers"][0])


def test_minimize_callback_and_float32():
    seen = []

    def grad(x, i):
        return {"v": 2 * x["v"]}

    def callback(x, i, g):
        assert isinstance(x["v"], fastopt.Parameter)
        seen.append((i, x["v"].copy(), g["v"].copy()))

    out = fastopt.minimize(grad, {"v": np.ones(2, np.float32)}, "sgd", num_iters=3,
                           callback=callback, lr=0.25)
    assert [i for i, _, _ in seen] == [0, 1, 2]
    np.testing.assert_array_equal(seen[1][1], [0.5, 0.5])
    np.testing.assert_array_equal(seen[1][2], [1.0, 1.0])
    assert out["v"].dtype == np.float32
    np.testing.assert_array_equal(out["v"], [0.125, 0.125])


def test_minimize_bad_input_is_named():
    x0 = {"w": np.zeros(2), "b": np.zeros(1)}
    with pytest.raises(ValueError, match=r"grad\(x, 0\) has other keys than x"):
        fastopt.minimize(lambda x, i: {"w": x["w"]}, x0, num_iters=1)
    with pytest.raises(ValueError, match=r"grad\(x, 0\)\['b'\] has shape \(2,\), x\['b'\] \(1,\)"):
        fastopt.minimize(lambda x, i: {"w": x["w"], "b": np.ones(2)}, x0, num_iters=1)
    with pytest.raises(ValueError, match="unknown optimizer 'adamz'"):
        fastopt.minimize(lambda x, i: x, x0, "adamz")
    with pytest.raises(ValueError, match="LBFGS cannot run"):
        fastopt.minimize(lambda x, i: x, x0, "lbfgs")
    with pytest.raises(TypeError, match=r"x0\['s'\] must be a float32 or float64"):
        fastopt.minimize(lambda x, i: x, {"s": "text"})
    with pytest.raises(ValueError, match="num_iters"):
        fastopt.minimize(lambda x, i: x, x0, num_iters=-1)
