"""fastopt.torch beyond contiguous real tensors with dense gradients, against torch.optim.

Dense tensors in another axis order (channels_last convolution weights, a transposed matrix)
step through their memory block, complex parameters through their ``view_as_real`` view with
complex state, sparse COO gradients (``Embedding(sparse=True)``) in SGD, Adagrad and
SparseAdam with torch's rules; every case runs in lockstep with torch.optim, state dicts move
both ways, and what fastopt.torch refuses names the parameter and changes nothing.
"""
import copy
import io

import pytest

from helpers import F32_TRAINED
from optim_db import DB, configs

torch = pytest.importorskip("torch", reason="fastopt.torch needs torch")
import fastopt.torch as ft  # noqa: E402

F32 = {"rtol": 1.3e-6, "atol": 1e-5}  # torch.testing's float32 defaults
LOOSE = {"rtol": 1e-4, "atol": 1e-4}  # maximizing runs grow and amplify last-bit differences

TWINNED = configs(where=lambda info: info.torch_name is not None)

# torch.optim.Adagrad builds sparse tensors without saying whether to check them
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")


def _tol(kwargs):
    return LOOSE if kwargs.get("maximize") else F32_TRAINED


def _torch_class(name):
    return getattr(torch.optim, DB[name].torch_name or name)


def _dense(value):
    return value.to_dense() if isinstance(value, torch.Tensor) and value.is_sparse else value


def _assert_same_state(mine, theirs, tol=F32):
    """Two state dicts with the same keys, tensors of the same dtype, shape and layout."""
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys()
    for i, st in theirs["state"].items():
        assert mine["state"][i].keys() == st.keys()
        for key, value in st.items():
            ours = mine["state"][i][key]
            assert type(ours) is type(value), key
            if isinstance(value, torch.Tensor):
                assert (ours.dtype, ours.shape, ours.layout) == (value.dtype, value.shape,
                                                                 value.layout), key
                torch.testing.assert_close(_dense(ours), _dense(value), **tol)
            else:
                assert ours == value, key


def _snapshot(opt, params):
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                     for k, v in opt.state.get(p, {}).items()} for p in params}
    return [p.detach().clone() for p in params], state


def _assert_unchanged(opt, params, snap):
    values, state = snap
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    for p in params:
        now = opt.state.get(p, {})
        assert now.keys() == state[id(p)].keys()
        for k, v in state[id(p)].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(_dense(now[k]), _dense(v)), k
            else:
                assert now[k] == v, k


# --------------------------------------------------------------------------- channels_last


def _conv(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(),
                                torch.nn.Conv2d(4, 2, 3))
    return model.to(dtype=dtype, memory_format=torch.channels_last)


def _images(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 8, 8, generator=g, dtype=dtype)
    return x.to(memory_format=torch.channels_last), torch.randn(5, 2, 4, 4, generator=g,
                                                                 dtype=dtype)


def _conv_step(model, opt, x, y, contiguous_grads=False):
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    if contiguous_grads:
        for p in model.parameters():
            p.grad = p.grad.contiguous()
    opt.step()


@pytest.mark.parametrize("name,kwargs", TWINNED)
def test_channels_last_conv_in_lockstep_with_torch(name, kwargs):
    model = _conv()
    ref = copy.deepcopy(model)
    weight = model[0].weight
    assert not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    topt = _torch_class(name)(ref.parameters(), **kwargs)
    x, y = _images()
    for step in range(6):
        _conv_step(model, opt, x, y)
        _conv_step(ref, topt, x, y)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **_tol(kwargs),
                                       msg=lambda m, s=step: f"step {s}: {m}")
    # the state is laid out as the parameter (torch: zeros_like, preserve_format)
    for key, value in opt.state.get(weight, {}).items():
        if value.dim():
            assert value.stride() == weight.stride(), key
    _assert_same_state(opt.state_dict(), topt.state_dict(), _tol(kwargs))


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "maximize": True}])
def test_lion_on_channels_last_is_lion_on_the_contiguous_model(kwargs):
    model = _conv()
    flat = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert flat[0].weight.is_contiguous()
    opt, fopt = ft.Lion(model.parameters(), **kwargs), ft.Lion(flat.parameters(), **kwargs)
    x, y = _images()
    for _ in range(5):
        _conv_step(model, opt, x, y)
        _conv_step(flat, fopt, x.contiguous(), y)
    for p, q in zip(model.parameters(), flat.parameters()):
        torch.testing.assert_close(p, q, **F32)


@pytest.mark.parametrize("name,kwargs", [("Adam", {}), ("SGD", {"momentum": 0.9}),
                                         ("RMSprop", {"centered": True})])
def test_a_gradient_in_another_layout_is_copied_for_the_step_and_left_alone(name, kwargs):
    model = _conv()
    ref = copy.deepcopy(model)
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    topt = _torch_class(name)(ref.parameters(), **kwargs)
    x, y = _images()
    weight = model[0].weight
    for _ in range(4):
        _conv_step(model, opt, x, y, contiguous_grads=True)
        _conv_step(ref, topt, x, y, contiguous_grads=True)
        grad = weight.grad.clone()
        assert weight.grad.is_contiguous() and not weight.is_contiguous()
    assert torch.equal(weight.grad, grad) and weight.grad.is_contiguous()
    for key, value in opt.state.get(weight, {}).items():
        if value.dim():
            assert value.stride() == weight.stride(), key  # made in the parameter's layout
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32)


def test_a_transposed_matrix_steps_as_torch():
    torch.manual_seed(0)
    w = torch.randn(4, 3).t().requires_grad_()  # dense, column-major
    v = w.detach().clone().t().contiguous().t().requires_grad_()
    assert not w.is_contiguous() and v.stride() == w.stride()
    opt, topt = ft.Adam([w], lr=0.1), torch.optim.Adam([v], lr=0.1)
    target = torch.randn(3, 4)
    for _ in range(5):
        for p, o in ((w, opt), (v, topt)):
            o.zero_grad()
            (p - target).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(w, v, **F32)


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("name,kwargs", [("Adam", {"amsgrad": True}), ("SGD", {"momentum": 0.9}),
                                         ("Adagrad", {}), ("Rprop", {}), ("ASGD", {})])
def test_channels_last_state_dicts_move_between_torch_and_fastopt_torch(name, kwargs,
                                                                       direction):
    first, second = ((_torch_class(name), getattr(ft, name)) if direction == "torch->fastopt"
                     else (getattr(ft, name), _torch_class(name)))
    model = _conv()
    ref = copy.deepcopy(model)
    x, y = _images()
    opt = first(model.parameters(), **kwargs)
    topt = _torch_class(name)(ref.parameters(), **kwargs)
    for _ in range(3):
        _conv_step(model, opt, x, y)
        _conv_step(ref, topt, x, y)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    moved = second(model.parameters(), **kwargs)
    moved.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        _conv_step(model, moved, x, y)
        _conv_step(ref, topt, x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32)


def test_contiguous_saved_state_loads_in_the_parameters_layout():
    # a run saved from a contiguous model continues on the channels_last one
    flat = _conv().to(memory_format=torch.contiguous_format)
    x, y = _images()
    topt = torch.optim.Adam(flat.parameters(), lr=0.01)
    for _ in range(3):
        _conv_step(flat, topt, x, y)
    model = copy.deepcopy(flat).to(memory_format=torch.channels_last)
    opt = ft.Adam(model.parameters(), lr=0.01)
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))  # torch's loader shares tensors
    weight = model[0].weight
    assert opt.state[weight]["exp_avg"].stride() == weight.stride()
    for _ in range(3):
        _conv_step(model, opt, x, y)
        _conv_step(flat, topt, x, y)
    for p, q in zip(model.parameters(), flat.parameters()):
        torch.testing.assert_close(p, q, **F32)


def test_state_in_another_layout_is_refused_naming_the_key_and_changes_nothing():
    model = _conv()
    opt = ft.Adam(model.parameters(), lr=0.01)
    x, y = _images()
    _conv_step(model, opt, x, y)
    params = list(model.parameters())
    weight = model[2].weight
    opt.state[weight]["exp_avg"] = opt.state[weight]["exp_avg"].contiguous()
    snap = _snapshot(opt, params)
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\]: "
                                         r"state\['exp_avg'\].*layout"):
        opt.step()
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("name", ["Adam", "SGD", "Lion", "Adagrad"])
def test_a_tensor_with_gaps_is_refused_naming_it_and_adds_no_group(name):
    good = torch.zeros(3, requires_grad=True)
    sliced = torch.zeros(4, 6)[:, ::2].requires_grad_()
    assert sliced.is_leaf
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]: the tensor is "
                                         r"not dense"):
        getattr(ft, name)([good, sliced])
    opt = getattr(ft, name)([good])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*not dense"):
        opt.add_param_group({"params": [sliced]})
    assert len(opt.param_groups) == 1


def test_a_parameter_that_lost_its_density_after_add_is_refused_at_the_step():
    w = torch.zeros(4, 6, requires_grad=True)
    opt = ft.SGD([w], lr=0.1)
    w.grad = torch.ones(4, 6)
    opt.step()
    w.data = torch.zeros(4, 12)[:, ::2]
    w.grad = torch.ones(4, 6)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*not dense"):
        opt.step()
    assert torch.equal(w.detach(), torch.zeros(4, 6))


# --------------------------------------------------------------------------- complex


def _complex_run(cls, kwargs, p, steps=6, target_seed=5):
    g = torch.Generator().manual_seed(target_seed)
    target = torch.randn(p.shape, dtype=p.dtype, generator=g)
    opt = cls([p], **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        (p - target).abs().pow(2).sum().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["c64", "c128"])
@pytest.mark.parametrize("name,kwargs", TWINNED)
def test_complex_parameters_in_lockstep_with_torch(name, kwargs, dtype):
    torch.manual_seed(0)
    p = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = _complex_run(getattr(ft, name), kwargs, p)
    topt = _complex_run(_torch_class(name), kwargs, q)
    tol = _tol(kwargs) if dtype == torch.complex64 else {"rtol": 1e-7, "atol": 1e-7}
    torch.testing.assert_close(p, q, **tol)
    _assert_same_state(opt.state_dict(), topt.state_dict(), tol)
    for key, value in opt.state[p].items():
        if value.dim():
            assert value.dtype == dtype, key  # complex, as torch's


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("name,kwargs", [("Adam", {}), ("SGD", {"momentum": 0.9}),
                                         ("Rprop", {}), ("Adagrad", {})])
def test_complex_state_dicts_move_between_torch_and_fastopt_torch(name, kwargs, direction):
    first, second = ((_torch_class(name), getattr(ft, name)) if direction == "torch->fastopt"
                     else (getattr(ft, name), _torch_class(name)))
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.complex64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = _complex_run(first, kwargs, p, steps=3)
    ref = _complex_run(_torch_class(name), kwargs, q, steps=3)
    moved = second([p], **kwargs)
    moved.load_state_dict(opt.state_dict())
    assert all(v.dtype == torch.complex64 for v in moved.state[p].values() if v.dim())
    target = torch.randn(5, dtype=torch.complex64, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        for x, o in ((p, moved), (q, ref)):
            o.zero_grad()
            (x - target).abs().pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(p, q, **F32)


def test_complex_channels_last_parameter_steps_as_torch():
    torch.manual_seed(0)
    p = torch.randn(2, 3, 4, 5, dtype=torch.complex64).to(
        memory_format=torch.channels_last).requires_grad_()
    q = p.detach().clone().requires_grad_()
    assert q.stride() == p.stride() and not p.is_contiguous()
    opt = _complex_run(ft.Adam, {"lr": 0.1}, p)
    _complex_run(torch.optim.Adam, {"lr": 0.1}, q)
    torch.testing.assert_close(p, q, **F32)
    assert opt.state[p]["exp_avg"].stride() == p.stride()


def test_lion_steps_a_complex_parameter_as_its_real_view():
    torch.manual_seed(0)
    p = torch.randn(6, dtype=torch.complex64, requires_grad=True)
    r = torch.view_as_real(p.detach()).clone().requires_grad_()
    opt, ropt = ft.Lion([p], lr=0.1), ft.Lion([r], lr=0.1)
    for _ in range(4):
        p.grad = torch.randn(6, dtype=torch.complex64)
        r.grad = torch.view_as_real(p.grad).clone()
        opt.step()
        ropt.step()
    assert torch.equal(torch.view_as_real(p.detach()), r.detach())


def test_sparse_adam_refuses_complex_parameters_as_torch():
    p = torch.zeros(3, 2, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        torch.optim.SparseAdam([p])
    with pytest.raises(ValueError) as ours:
        ft.SparseAdam([p])
    assert str(ours.value) == str(theirs.value)


# --------------------------------------------------------------------------- sparse gradients

SPARSE_CONFIGS = [
    ("SGD", {}), ("SGD", {"momentum": 0.9}), ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("SGD", {"momentum": 0.5, "dampening": 0.3, "maximize": True}),
    ("Adagrad", {}), ("Adagrad", {"lr_decay": 0.1, "initial_accumulator_value": 0.2}),
    ("Adagrad", {"maximize": True}),
    ("SparseAdam", {}), ("SparseAdam", {"betas": (0.8, 0.9), "maximize": True}),
]


class _Bag(torch.nn.Module):
    """A sparse embedding, and (but for SparseAdam, which refuses dense gradients) a dense
    layer after it, so that one step updates both kinds."""

    def __init__(self, dense=True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 4, sparse=True)
        self.out = torch.nn.Linear(4, 2) if dense else None

    def forward(self, ids):
        h = self.emb(ids)
        return self.out(h) if self.out is not None else h


def _sparse_step(model, opt, ids):
    opt.zero_grad()
    model(ids).pow(2).mean().backward()
    opt.step()


def _ids(step):
    return torch.randint(0, 20, (9,), generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("name,kwargs", SPARSE_CONFIGS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(SPARSE_CONFIGS)])
def test_sparse_embedding_gradients_in_lockstep_with_torch(name, kwargs):
    model = _Bag(dense=name != "SparseAdam")
    ref = copy.deepcopy(model)
    opt = getattr(ft, name)(model.parameters(), lr=0.1, **kwargs)
    topt = getattr(torch.optim, name)(ref.parameters(), lr=0.1, **kwargs)
    for step in range(6):
        _sparse_step(model, opt, _ids(step))
        _sparse_step(ref, topt, _ids(step))
        assert model.emb.weight.grad.is_sparse
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **_tol(kwargs),
                                       msg=lambda m, s=step: f"step {s}: {m}")
    _assert_same_state(opt.state_dict(), topt.state_dict(), _tol(kwargs))


@pytest.mark.parametrize("shape,sparse_dim", [((10,), 1), ((6, 5), 2), ((6, 5, 2), 1),
                                              ((6, 5, 2), 2)])
@pytest.mark.parametrize("name,kwargs", [("SGD", {"momentum": 0.9}), ("SGD", {}),
                                         ("Adagrad", {}), ("SparseAdam", {})])
def test_uncoalesced_gradients_of_any_sparse_dim(name, kwargs, shape, sparse_dim):
    torch.manual_seed(3)
    p = torch.randn(*shape, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = getattr(ft, name)([p], lr=0.1, **kwargs)
    topt = getattr(torch.optim, name)([q], lr=0.1, **kwargs)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        idx = torch.randint(0, 5, (sparse_dim, 8), generator=g)  # with repeated indices
        grad = torch.sparse_coo_tensor(idx, torch.randn((8,) + shape[sparse_dim:], generator=g),
                                       shape)
        assert not grad.is_coalesced()
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        topt.step()
        torch.testing.assert_close(p, q, **F32)
    _assert_same_state(opt.state_dict(), topt.state_dict())


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("name,kwargs", [("SGD", {"momentum": 0.9}), ("Adagrad", {}),
                                         ("SparseAdam", {})])
def test_sparse_state_dicts_move_between_torch_and_fastopt_torch(name, kwargs, direction):
    first, second = ((getattr(torch.optim, name), getattr(ft, name))
                     if direction == "torch->fastopt"
                     else (getattr(ft, name), getattr(torch.optim, name)))
    model = _Bag(dense=name != "SparseAdam")
    ref = copy.deepcopy(model)
    opt = first(model.parameters(), lr=0.1, **kwargs)
    topt = getattr(torch.optim, name)(ref.parameters(), lr=0.1, **kwargs)
    for step in range(3):
        _sparse_step(model, opt, _ids(step))
        _sparse_step(ref, topt, _ids(step))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    moved = second(model.parameters(), lr=0.1, **kwargs)
    moved.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(3, 6):
        _sparse_step(model, moved, _ids(step))
        _sparse_step(ref, topt, _ids(step))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32)
    _assert_same_state(moved.state_dict(), topt.state_dict())


def _two_groups(cls, kwargs_bad, **kwargs):
    """An optimizer over a dense parameter (group 0) and an embedding (group 1), one step
    taken with good gradients, then fresh gradients set; returns (opt, params, emb)."""
    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(3))
    emb = torch.nn.Embedding(8, 2, sparse=True)
    opt = cls([{"params": [dense]}, {"params": [emb.weight]}], lr=0.1, **kwargs)
    for i in range(2):
        opt.zero_grad()
        (dense.pow(2).sum() + emb(torch.tensor([1, 3, 1])).pow(2).sum()).backward()
        if i == 0:
            opt.step()
    opt.param_groups[1].update(kwargs_bad)
    return opt, [dense, emb.weight]


@pytest.mark.parametrize("name,bad,exc,message", [
    ("Adagrad", {"weight_decay": 0.1}, RuntimeError,
     "weight_decay option is not compatible with sparse gradients"),
    ("SGD", {"weight_decay": 0.1}, RuntimeError, r"add\(sparse, dense\) is not supported"),
])
def test_sparse_gradients_where_torch_raises_raise_and_change_nothing(name, bad, exc, message):
    opt, params = _two_groups(getattr(ft, name), bad)
    snap = _snapshot(opt, params)
    with pytest.raises(exc, match=r"param_groups\[1\]\['params'\]\[0\]: " + message):
        opt.step()
    _assert_unchanged(opt, params, snap)  # group 0 and the step counters too
    # torch raises the same error (and, for Adagrad, has counted the step: not so here)
    topt, _ = _two_groups(getattr(torch.optim, name), bad)
    with pytest.raises(exc, match=message):
        topt.step()


def test_sgd_sparse_gradient_after_dense_momentum_with_nesterov_raises_as_torch():
    p = torch.zeros(4, 2, requires_grad=True)
    opt = ft.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    p.grad = torch.ones(4, 2)
    opt.step()
    p.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2))
    snap = _snapshot(opt, [p])
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*add\(sparse, "
                                           r"dense\)"):
        opt.step()
    _assert_unchanged(opt, [p], snap)
    q = torch.zeros(4, 2, requires_grad=True)
    topt = torch.optim.SGD([q], lr=0.1, momentum=0.9, nesterov=True)
    q.grad = torch.ones(4, 2)
    topt.step()
    q.grad = p.grad.clone()
    with pytest.raises(RuntimeError, match=r"add\(sparse, dense\)"):
        topt.step()


def test_sgd_sparse_gradient_after_dense_momentum_continues_as_torch():
    p = torch.zeros(4, 2, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt, topt = ft.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for grad in (torch.ones(4, 2), torch.sparse_coo_tensor([[1, 3, 1]], torch.ones(3, 2),
                                                            (4, 2))):
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        topt.step()
    torch.testing.assert_close(p, q, **F32)
    assert not opt.state[p]["momentum_buffer"].is_sparse
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], topt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "SparseAdam"])
def test_bad_sparse_gradients_are_refused_naming_the_parameter(name):
    opt, params = _two_groups(getattr(ft, name) if name != "SparseAdam" else ft.Adagrad, {})
    if name == "SparseAdam":
        emb = torch.nn.Parameter(torch.zeros(8, 2))
        opt = ft.SparseAdam([emb])
        params = [emb]
    target = params[-1]
    snap = _snapshot(opt, params)
    target.grad = torch.sparse_coo_tensor([[1, 9]], torch.ones(2, 2), (8, 2),
                                          check_invariants=False)
    with pytest.raises(IndexError, match=r"\['params'\]\[0\]: .*out of range"):
        opt.step()
    _assert_unchanged(opt, params, snap)


def test_sparse_adam_refuses_dense_gradients_as_torch_and_changes_nothing():
    a = torch.nn.Parameter(torch.zeros(4, 2))
    b = torch.nn.Parameter(torch.zeros(4, 2))
    opt = ft.SparseAdam([{"params": [a]}, {"params": [b]}])
    a.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 2), (4, 2))
    b.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\]: SparseAdam "
                                           r"does not support dense gradients"):
        opt.step()
    assert not opt.state and torch.equal(a.detach(), torch.zeros(4, 2))
    assert isinstance(opt, torch.optim.SparseAdam)
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['params'\]\[0\].*not contiguous"):
        opt.add_param_group({"params": [torch.zeros(4, 2).t().requires_grad_()]})
    assert len(opt.param_groups) == 2


def test_sparse_adam_state_is_torchs_and_a_step_without_rows_counts():
    emb = torch.nn.Parameter(torch.zeros(4, 2))
    ref = emb.detach().clone().requires_grad_()
    opt, topt = ft.SparseAdam([emb]), torch.optim.SparseAdam([ref])
    for grad in (torch.sparse_coo_tensor([[0, 2, 0]], torch.ones(3, 2), (4, 2)),
                 torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64),
                                         torch.zeros(0, 2), (4, 2))):
        emb.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        topt.step()
    assert opt.state[emb]["step"] == 2 and type(opt.state[emb]["step"]) is int
    _assert_same_state(opt.state_dict(), topt.state_dict())
    torch.testing.assert_close(emb, ref)


def test_sparse_adam_refuses_a_second_concurrent_step():
    emb = torch.nn.Parameter(torch.zeros(4, 2))
    opt, seen = ft.SparseAdam([emb]), []

    def closure():
        try:
            opt.step()
        except RuntimeError as e:
            seen.append(str(e))
        emb.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2),
                                           check_invariants=True)
        return torch.tensor(0.0)

    opt.step(closure)
    assert seen and "another step" in seen[0]
    assert opt.state[emb]["step"] == 1  # the inner step changed nothing
    opt.step(closure)  # the guard was released
    assert opt.state[emb]["step"] == 2


def test_sparse_gradient_of_a_complex_parameter_is_refused():
    p = torch.zeros(4, dtype=torch.complex64, requires_grad=True)
    opt = ft.SGD([p], lr=0.1)
    p.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, dtype=torch.complex64), (4,))
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*sparse.*"
                                           r"complex"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4, dtype=torch.complex64))


def test_sparse_gradients_to_an_optimizer_without_a_sparse_rule_raise_as_before():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = ft.Adam(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_a_sparse_state_tensor_where_torch_keeps_a_dense_one_is_refused_by_name():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = ft.Adam([p])
    p.grad = torch.ones(4, 2)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to_sparse()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\].*exp_avg"):
        opt.load_state_dict(sd)
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v)
