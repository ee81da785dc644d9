"""fastopt.torch.LBFGS with complex parameters, against torch.optim.LBFGS 2.13 (CPU).

torch's LBFGS flattens a complex parameter as its ``torch.view_as_real`` view (real and
imaginary parts side by side), so its history is real, of the parameters' real dtype.
fastopt.torch's steps the same way: the iterates follow torch's, both with a fixed step and
with the strong Wolfe line search, on a strongly convex loss of a complex and a real
parameter. The dot products sum in another order than torch's, so the runs agree within
torch's tolerance for the dtype (float64's default for complex128 over 5 steps; float32's
for complex64 over 3 steps: after those the loss is flat to float32 precision, and the
line search's stopping tests then see different rounding noise).
"""
import pytest

torch = pytest.importorskip("torch", reason="fastopt.torch needs torch")
import fastopt.torch as ft  # noqa: E402

F32 = {"rtol": 1.3e-6, "atol": 1e-5}  # torch.testing's float32 defaults
#: (dtype, steps, tolerance of the iterates, of the history's gradient differences): the
#: float32 differences y = g - g_prev of gradients as large as 50 (the first steps') carry
#: their absolute rounding, some 1e-5
CASES = [(torch.complex64, 3, F32, {"rtol": 0, "atol": 2e-4}),
         (torch.complex128, 5, {}, {})]


def _start(dtype):
    """A complex (2 x 3) and a real (4,) starting point, as leaf tensors."""
    g = torch.Generator().manual_seed(1)
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    return (torch.randn(2, 3, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(4, generator=g, dtype=real).requires_grad_())


def _loss(z, w):
    """|a z - b|^2 + sum_i i (w_i - 1)^2 + |z|^4 / 20: strongly convex, of z as a complex
    vector and of w."""
    g = torch.Generator().manual_seed(0)
    a = torch.eye(6, dtype=z.dtype) + 0.3 * torch.randn(6, 6, generator=g, dtype=z.dtype) / 6
    b = torch.randn(6, generator=g, dtype=z.dtype)
    r = a @ z.reshape(-1) - b
    scale = torch.arange(1, 5, dtype=w.dtype)
    return (r.abs() ** 2).sum() + (scale * (w - 1) ** 2).sum() + 0.05 * (z.abs() ** 4).sum()


def _closure(opt, z, w):
    def closure():
        opt.zero_grad()
        loss = _loss(z, w)
        loss.backward()
        return loss
    return closure


def _make(cls, params, line_search_fn):
    return cls(params, lr=1, max_iter=4, history_size=5, line_search_fn=line_search_fn)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("dtype,steps,tol,history_tol", CASES,
                         ids=["complex64", "complex128"])
def test_complex_parameters_step_as_torch(dtype, steps, tol, history_tol, line_search_fn):
    ours, theirs = _start(dtype), _start(dtype)
    opt, topt = _make(ft.LBFGS, ours, line_search_fn), _make(torch.optim.LBFGS, theirs,
                                                              line_search_fn)
    closure, tclosure = _closure(opt, *ours), _closure(topt, *theirs)
    first = None
    for step in range(steps):
        loss, tloss = opt.step(closure), topt.step(tclosure)
        torch.testing.assert_close(loss.detach(), tloss.detach(), **tol)
        for p, q in zip(ours, theirs):
            assert p.dtype == q.dtype
            torch.testing.assert_close(p, q, **tol, msg=lambda m, s=step: f"step {s}: {m}")
        first = float(tloss.detach()) if first is None else first
    assert float(tloss.detach()) < first / 10  # the runs went somewhere
    st, tst = opt.state[ours[0]], topt.state[theirs[0]]
    assert st.keys() == tst.keys()
    assert (st["func_evals"], st["n_iter"]) == (tst["func_evals"], tst["n_iter"])
    for key in ("d", "prev_flat_grad"):
        assert st[key].dtype == tst[key].dtype == ours[1].dtype  # real, as torch's
        assert st[key].shape == tst[key].shape == (2 * 6 + 4,)
    assert len(st["old_dirs"]) == len(tst["old_dirs"])
    for y, ty in zip(st["old_dirs"], tst["old_dirs"]):
        torch.testing.assert_close(y, ty, **history_tol)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("first,second", [(torch.optim.LBFGS, ft.LBFGS),
                                          (ft.LBFGS, torch.optim.LBFGS)],
                         ids=["torch-to-fastopt", "fastopt-to-torch"])
def test_a_complex_history_loads_across_torch_and_fastopt(first, second, line_search_fn):
    """Two steps of one, its state dict loaded into the other, two more steps: as torch's
    own four steps (complex128)."""
    ref, params = _start(torch.complex128), _start(torch.complex128)
    ropt, opt = _make(torch.optim.LBFGS, ref, line_search_fn), _make(first, params,
                                                                      line_search_fn)
    for _ in range(2):
        opt.step(_closure(opt, *params))
        ropt.step(_closure(ropt, *ref))
    cont = _make(second, params, line_search_fn)
    cont.load_state_dict(opt.state_dict())
    for _ in range(2):
        cont.step(_closure(cont, *params))
        ropt.step(_closure(ropt, *ref))
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q)
    assert cont.state[params[0]]["n_iter"] == ropt.state[ref[0]]["n_iter"]


def test_complex_parameters_of_another_precision_or_not_contiguous_are_refused():
    z = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    w = torch.zeros(3, dtype=torch.float32, requires_grad=True)
    opt = ft.LBFGS([z, w])
    z.grad, w.grad = torch.ones_like(z), torch.ones_like(w)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\]: LBFGS needs "
                                        r"parameters of one dtype"):
        opt.step(lambda: torch.tensor(1.0))
    assert torch.equal(z, torch.zeros_like(z)) and not opt.state
    gappy = torch.zeros(4, 3, dtype=torch.complex64).t().requires_grad_()  # dense
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: the tensor is "
                                         r"not contiguous"):
        ft.LBFGS([gappy])
