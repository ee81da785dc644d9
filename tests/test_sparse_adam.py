"""SparseAdam: the C kernel bit for bit against the NumPy reference on every ISA level and
thread count, 100 steps against torch's sparse embedding gradients, convergence and bad
input."""
import numpy as np
import pytest

import fastopt
import reference as ref
from helpers import import_torch, rosenbrock, snapshot
from optim_db import inputs_of


def _batches(rng, rows, n, k):
    for _ in range(n):
        yield rng.integers(0, rows, size=k)


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_adam_kernel_matches_reference_bitwise(dtype, nthreads, isa, threads):
    threads(nthreads)
    rng = np.random.default_rng(11)
    # 20001 x 7: the two threads split the values in the middle of a row
    shapes = [(20001, 7), (17, 3), (5,), (40, 1)] if dtype == np.float32 else [(17, 3), (5,)]
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    kwargs = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    opt = fastopt.SparseAdam(ps, **kwargs)
    refs = [x.copy() for x in xs]
    states = [{"step": 0, "exp_avg": np.zeros_like(x), "exp_avg_sq": np.zeros_like(x)}
              for x in xs]
    for k in range(4):
        for i, p in enumerate(ps):
            n = p.shape[0]
            idx = np.unique(rng.integers(0, n, size=max(1, (n * 2) // 3)))
            vals = rng.standard_normal((idx.size,) + p.shape[1:]).astype(dtype)
            p.grad = fastopt.SparseGrad(rng.permutation(idx) if k % 2 else idx,
                                        vals if not k % 2 else vals)
            g = p.grad.coalesce()
            refs[i] = ref.sparse_adam(refs[i], g.indices, g.values, states[i], **kwargs)
        opt.step()
        for i, p in enumerate(ps):
            assert np.array_equal(np.asarray(p), refs[i]), (shapes[i], k)
            assert np.array_equal(opt.state[p]["exp_avg"], states[i]["exp_avg"])
            assert np.array_equal(opt.state[p]["exp_avg_sq"], states[i]["exp_avg_sq"])
            assert opt.state[p]["step"] == states[i]["step"] == k + 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inp", inputs_of("SparseAdam"))
def test_sparse_adam_lockstep_with_torch(inp, dtype):
    """100 steps against torch's sparse embedding gradients (repeated rows included)."""
    kwargs = inp.kwargs
    torch = import_torch(vector_kernels=False)
    rng = np.random.default_rng(9)
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    emb = torch.nn.Embedding(50, 8, sparse=True).to(tdtype)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(rng.standard_normal((50, 8)).astype(dtype)))
    p = fastopt.Parameter(emb.weight.detach().numpy().copy())
    opt = fastopt.SparseAdam([p], **kwargs)
    topt = torch.optim.SparseAdam(emb.parameters(), **kwargs)
    rtol, atol = (1.3e-6, 1e-5) if dtype == np.float32 else (1e-12, 1e-12)
    for step, idx in enumerate(_batches(rng, 50, 100, 12)):  # repeated rows included
        topt.zero_grad()
        out = emb(torch.from_numpy(idx))
        w = torch.from_numpy(rng.standard_normal(out.shape).astype(dtype))
        (out * w).sum().backward()
        p.grad = fastopt.SparseGrad.from_torch(emb.weight.grad)
        # the same gradient built from uncoalesced rows, as a user would
        if step % 2:
            p.grad = fastopt.SparseGrad(idx, w.numpy())
        opt.step()
        topt.step()
        np.testing.assert_allclose(p, emb.weight.detach().numpy(), rtol=rtol, atol=atol,
                                   err_msg=f"step {step}")
    st, tst = opt.state[p], topt.state[emb.weight]
    assert list(st) == list(tst) and st["step"] == tst["step"] == 100
    assert isinstance(st["step"], int)


def test_sparse_adam_bad_grads_change_nothing():
    """(Invalid hyperparameters are in the database: tests/optim_db.py.)"""
    p = fastopt.Parameter(np.ones((4, 2), np.float32))
    q = fastopt.Parameter(np.ones((3, 2), np.float32))
    opt = fastopt.SparseAdam([{"params": [p]}, {"params": [q]}])
    p.grad = fastopt.SparseGrad([1], np.ones((1, 2), np.float32))
    q.grad = fastopt.SparseGrad([0, 2], np.ones((2, 2), np.float32))
    opt.step()
    snap = lambda: [np.asarray(x).tobytes() for x in (p, q)] + [  # noqa: E731
        (k, np.asarray(v).tobytes()) for x in (p, q) for k, v in opt.state[x].items()]
    before = snap()
    for bad, exc, match in [
            (np.ones((3, 2), np.float32), RuntimeError, "does not support dense gradients"),
            (fastopt.SparseGrad([5], np.ones((1, 2), np.float32)), IndexError, "out of range"),
            (fastopt.SparseGrad([0], np.ones((1, 3), np.float32)), ValueError, "do not fit"),
            (fastopt.SparseGrad([0], np.ones((1, 2), np.float64)), ValueError, "do not fit")]:
        q.grad = bad
        with pytest.raises(exc, match=r"param_groups\[1\]\['params'\]\[0\]: .*" + match):
            opt.step()
        assert snap() == before
    with pytest.raises(ValueError, match="one row per index"):
        fastopt.SparseGrad([0, 1], np.ones((3, 2)))


def test_sparse_adam_converges_and_touches_only_given_rows():
    target = np.linspace(-1, 1, 40).reshape(10, 4)
    p = fastopt.Parameter(np.zeros((10, 4)))
    opt = fastopt.SparseAdam([p], lr=0.05)
    rng = np.random.default_rng(1)
    for _ in range(1500):
        rows = np.unique(rng.integers(0, 9, size=4))  # row 9 is never touched
        p.grad = fastopt.SparseGrad(rows, np.asarray(p)[rows] - target[rows])
        opt.step()
    np.testing.assert_allclose(p[:9], target[:9], atol=1e-2)
    assert np.all(p[9] == 0) and np.all(opt.state[p]["exp_avg"][9] == 0)


def test_sparse_adam_converges_on_rosenbrock():
    p = fastopt.Parameter(np.array([[-1.5], [2.0]]))
    opt = fastopt.SparseAdam([p], lr=0.01)
    for _ in range(8000):
        p.grad = fastopt.SparseGrad([0, 1], rosenbrock(p.ravel())[1].reshape(2, 1))
        opt.step()
    assert rosenbrock(p.ravel())[0] < 1e-6


def _two_groups():
    """A SparseAdam with one embedding-like parameter per group, stepped once."""
    ps = [fastopt.Parameter(np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)),
          fastopt.Parameter(np.linspace(1, 2, 6, dtype=np.float32).reshape(3, 2))]
    opt = fastopt.SparseAdam([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1)
    for p in ps:
        p.grad = fastopt.SparseGrad([0, 2], np.ones((2, 2), np.float32))
    opt.step()
    return opt, ps


@pytest.mark.parametrize("group1, exc, match", [
    (dict(lr="x"), TypeError, "lr must be a real number"),
    (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1"),
    (dict(betas=(0.9,)), ValueError, "betas must have 2 entries"),
    (dict(eps=np.ones(2)), TypeError, "eps must be a number or a 1-element array")])
def test_sparse_adam_bad_group_1_changes_nothing(group1, exc, match):
    opt, ps = _two_groups()
    opt.param_groups[1].update(group1)
    before = snapshot(opt, ps)
    with pytest.raises(exc, match=r"param_groups\[1\]: " + match):
        opt.step()
    assert snapshot(opt, ps) == before


@pytest.mark.parametrize("key, value, exc, match", [
    ("step", -1, TypeError, r"state\['step'\] must be an int >= 0"),
    ("step", True, TypeError, r"state\['step'\] must be an int >= 0"),
    ("step", 1.0, TypeError, r"state\['step'\] must be an int >= 0"),
    ("exp_avg", np.zeros((2, 3), np.float32), ValueError, r"state\['exp_avg'\]"),
    ("exp_avg_sq", None, ValueError, r"state\['exp_avg_sq'\]")])
def test_sparse_adam_bad_state_in_group_1_changes_nothing(key, value, exc, match):
    """A counter of -1 used to divide by zero (1 - beta1^0) after the counters of group 0
    had moved."""
    opt, ps = _two_groups()
    opt.state[ps[1]][key] = value
    before = snapshot(opt, ps)
    with pytest.raises(exc, match=r"param_groups\[1\]\['params'\]\[0\]: " + match):
        opt.step()
    assert snapshot(opt, ps) == before


def test_sparse_adam_load_checks_the_step_counter():
    opt, ps = _two_groups()
    sd = opt.state_dict()
    before = snapshot(opt, ps)
    for bad in ("x", None, -2, 1.5):
        sd["state"][1] = dict(sd["state"][1], step=bad)
        with pytest.raises((TypeError, ValueError),
                           match=r"param_groups\[1\]\['params'\]\[0\]") as info:
            opt.load_state_dict(sd)
        assert "['step']" in str(info.value)
        assert snapshot(opt, ps) == before
    sd["state"][1] = dict(sd["state"][1], step=np.int64(1))
    opt.load_state_dict(sd)
    assert type(opt.state[ps[1]]["step"]) is int


def test_sparse_adam_empty_parameters_step_as_torch():
    torch = import_torch(vector_kernels=False)
    for shape in [(0, 3), (3, 0)]:
        p, q = fastopt.Parameter(np.ones((3, 2), np.float32)), fastopt.Parameter(
            np.ones(shape, np.float32))
        rows = [0] if shape[0] else []
        p.grad = fastopt.SparseGrad([1], np.ones((1, 2), np.float32))
        q.grad = fastopt.SparseGrad(rows, np.ones((len(rows), shape[1]), np.float32))
        opt = fastopt.SparseAdam([p, q])
        opt.step()
        a, b = torch.ones((3, 2), requires_grad=True), torch.ones(shape, requires_grad=True)
        a.grad = torch.sparse_coo_tensor([[1]], torch.ones((1, 2)), (3, 2),
                                         check_invariants=True)
        b.grad = torch.sparse_coo_tensor([rows], torch.ones((len(rows), shape[1])), shape,
                                         check_invariants=True)
        topt = torch.optim.SparseAdam([a, b])
        topt.step()
        np.testing.assert_allclose(p, a.detach().numpy(), rtol=1.3e-6)
        assert opt.state[q]["step"] == topt.state[b]["step"] == 1
        assert opt.state[q]["exp_avg"].shape == shape


class _FailingInit(fastopt.SparseAdam):
    """SparseAdam whose state creation runs out of memory for a parameter with
    ``fail_rows`` rows (a real failed allocation)."""

    fail_rows = 3

    def _init_state(self, state, array, group):
        super()._init_state(state, array, group)
        if array.shape[0] == self.fail_rows:
            state["exp_avg_sq"] = np.zeros((1 << 40, 1 << 20), np.float32)


def test_sparse_adam_state_is_created_for_all_new_parameters_or_none():
    xs = [np.linspace(-1, 1, 8).reshape(4, 2), np.linspace(1, 2, 6).reshape(3, 2)]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    for p in ps:
        p.grad = fastopt.SparseGrad([0, 2], np.ones((2, 2)))
    opt = _FailingInit(ps)
    with pytest.raises(MemoryError):
        opt.step()
    assert len(opt.state) == 0
    assert all(np.array_equal(p, x) for p, x in zip(ps, xs))
    opt.fail_rows = None
    opt.step()
    assert [opt.state[p]["step"] for p in ps] == [1, 1]
