"""The cached step (see test_step_cache.py) over torch tensors: fastopt.torch's optimizers and
fastopt's NumPy optimizers given a model's parameters.

As there, two identical optimizers are warmed until the first steps from its cache, changed in
the same way, the second one's cache dropped, and both stepped: the outcome must be the same,
bit for bit. The changes here are the ones torch users make between steps: ``p.data = ...``,
a storage freed and reallocated, in-place updates, gradients of another layout or dtype, state
tensors replaced or re-pointed, parameters laid out anew over their memory. The same runs
over a convolution in channels_last, whose dense but not contiguous tensors step from the cache
too.
"""
import gc
import json
import os
import platform
import subprocess
import sys
import weakref

import numpy as np
import pytest

import fastopt
from fastopt import _kernels

from helpers import import_torch, torch_batch, torch_mlp

torch = import_torch(vector_kernels=False)
import fastopt.torch  # noqa: E402  (needs torch)

MAKERS = {
    "fastopt.torch.Adam": lambda ps: fastopt.torch.Adam(ps, lr=0.01, weight_decay=0.1),
    "fastopt.torch.SGD": lambda ps: fastopt.torch.SGD(ps, lr=0.1, momentum=0.9),
    "fastopt.torch.ASGD": lambda ps: fastopt.torch.ASGD(ps, lr=0.01),
    "fastopt.Adam": lambda ps: fastopt.Adam(ps, lr=0.01),
    "fastopt.SGD": lambda ps: fastopt.SGD(ps, lr=0.1),
}


def conv_model():
    """A small convolution in channels_last: its weights are dense, not contiguous."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(),
                                torch.nn.Conv2d(4, 2, 3))
    return model.to(memory_format=torch.channels_last)


def conv_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
    return x, torch.randn(5, 2, 4, 4, generator=g)


# group values that change in place: tensors, as torch allows for lr and betas
TENSOR_VALUE_MAKERS = {
    "tensor lr": lambda ps: fastopt.torch.Adam(ps, lr=torch.tensor(0.01)),
    "tensor betas": lambda ps: fastopt.torch.Adam(ps, lr=0.01, betas=(torch.tensor(0.9),
                                                                       torch.tensor(0.999))),
}


def world(maker, conv=False):
    model = conv_model() if conv else torch_mlp()
    make = MAKERS[maker] if maker in MAKERS else TENSOR_VALUE_MAKERS[maker]
    return make(list(model.parameters())), model


def backward(opt, model, scale=1.0):
    opt.zero_grad()  # set_to_none: new gradient tensors at every backward
    x, y = conv_batch() if isinstance(model[0], torch.nn.Conv2d) else torch_batch()
    (scale * torch.nn.functional.mse_loss(model(x), y)).backward()


def _bytes(v):
    if isinstance(v, torch.Tensor):
        v = v.detach()
        return ("tensor", str(v.dtype), tuple(v.shape), v.contiguous().numpy().tobytes())
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.str, v.shape, v.tobytes())
    return ("value", repr(v))


def state_of(opt):
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            out.append((_bytes(p), {k: _bytes(v) for k, v in st.items()}))
    return out


def outcome(opt):
    try:
        opt.step()
    except Exception as e:
        return type(e), str(e)
    return "stepped"


def twins(maker, change, keeps_cache=True, conv=False):
    (a, ma), (b, mb) = world(maker, conv), world(maker, conv)
    for opt, model in ((a, ma), (b, mb)):
        for k in range(3):
            backward(opt, model, 1.0 + k)
            opt.step()
        backward(opt, model, 0.5)
    assert _kernels.cached(a) and _kernels.cached(b)
    change(a, ma)
    change(b, mb)
    assert _kernels.cached(a) == keeps_cache
    _kernels.forget(b)
    before = state_of(a)
    got, want = outcome(a), outcome(b)
    assert got == want
    if got != "stepped":
        assert state_of(a) == before, "a step that raised changed something"
    assert state_of(a) == state_of(b)
    # and the step after, from the cache again where the change allows one
    for opt, model in ((a, ma), (b, mb)):
        backward(opt, model, 0.25)
    _kernels.forget(b)
    assert outcome(a) == outcome(b)
    assert state_of(a) == state_of(b)
    return got


def _first(model):
    return model[0].weight


def _entry_key(opt, p):
    keys = [k for k, v in opt.state[p].items()
            if isinstance(v, (torch.Tensor, np.ndarray)) and tuple(v.shape) == tuple(p.shape)]
    return keys[0] if keys else None


def _with_entry(fn):
    def change(opt, model):
        p = _first(model)
        k = _entry_key(opt, p)
        if k is not None:
            fn(opt, p, k)
    return change


def _set_data(opt, p, k):
    v = opt.state[p][k]
    if isinstance(v, torch.Tensor):
        v.data = torch.full_like(v, 0.125)


def _set_data_shape(opt, p, k):
    v = opt.state[p][k]
    if isinstance(v, torch.Tensor):
        v.data = torch.zeros(3)


def _state_transposed_in_place(opt, p, k):
    v = opt.state[p][k]
    if isinstance(v, torch.Tensor) and v.dim() == 2:
        v.t_()  # its data pointer stays


def _state_relaid_in_place(opt, p, k):
    v = opt.state[p][k]
    if isinstance(v, torch.Tensor) and v.dim() == 2:
        v.as_strided_(v.shape, (1, v.shape[0]))  # the same shape and memory, transposed
        assert not v.is_contiguous()


def _inference_state(opt, p, k):
    v = opt.state[p][k]
    if isinstance(v, torch.Tensor):
        with torch.inference_mode():
            opt.state[p][k] = v.clone()


def _set_to_a_copy(opt, model):
    p = _first(model)
    with torch.no_grad():
        p.set_(p.detach().clone() * 0.5)


def _negated_grad(opt, model):
    p = _first(model)
    p.grad = torch._neg_view(-p.grad)


def _non_contiguous_grad(opt, model):
    p = _first(model)
    p.grad = p.grad.t().contiguous().t()
    assert not p.grad.is_contiguous()


def _grad_data_dtype(opt, model):
    _first(model).grad.data = _first(model).grad.double()


def _grad_data_shape(opt, model):
    _first(model).grad.data = torch.zeros(5)


def _sparse_grad(opt, model):
    p = _first(model)
    p.grad = p.grad.to_sparse()


def _grad_requires_grad(opt, model):
    p = _first(model)
    p.grad = p.grad.detach().requires_grad_()


def _grad_over_state(opt, model):
    p = _first(model)
    k = _entry_key(opt, p)
    if k is not None and isinstance(opt.state[p][k], torch.Tensor):
        p.grad = opt.state[p][k]


def _relaid(p, strides):
    """Lay ``p`` out anew over its own memory: the same storage, offset and shape, other
    strides (its data pointer stays)."""
    with torch.no_grad():
        p.set_(p.untyped_storage(), p.storage_offset(), p.shape, strides)


def _relaid_transposed(opt, model):
    p = _first(model)
    _relaid(p, (1, p.shape[0]))
    assert not p.is_contiguous()


def _relaid_contiguous(opt, model):
    p = _first(model)
    _relaid(p, torch.empty(p.shape).stride())
    assert p.is_contiguous()


def _grad_data_transposed_shape(opt, model):
    g = _first(model).grad
    g.data = torch.zeros(tuple(reversed(g.shape)))


def _contiguous_grad(opt, model):
    p = _first(model)
    p.grad = p.grad.contiguous()
    assert not p.grad.is_contiguous(memory_format=torch.channels_last)


def _grad_storage_freed(opt, model):
    _first(model).grad.untyped_storage().resize_(0)  # as FSDP frees memory between uses


def _grad_storage_shrunk(opt, model):
    _first(model).grad.untyped_storage().resize_(8)


def _grad_at_an_offset(opt, model):
    # a view into a flat buffer (as DDP's gradient buckets), at an element offset
    p = _first(model)
    flat = torch.zeros(p.numel() + 7)
    flat[7:] = p.grad.reshape(-1)
    p.grad = flat[7:].view_as(p)


def _grad_lazily_cloned(opt, model):
    p = _first(model)
    p.grad = torch._lazy_clone(p.grad)  # copy-on-write storage


def _state_requires_grad(opt, p, k):
    v = opt.state[p][k]
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        v.requires_grad_()


def _relaid_shape(p, shape):
    with torch.no_grad():
        p.set_(p.untyped_storage(), p.storage_offset(), shape, torch.empty(shape).stride())


def _grad_storage_refuses_access(opt, model):
    torch._C._set_throw_on_mutable_data_ptr(_first(model).grad)


def _listed_twice(opt, model):
    opt.param_groups[0]["params"].append(model[2].bias)


CHANGES = {
    "p.data = a new tensor": lambda opt, m: setattr(_first(m), "data",
                                                    _first(m).data.clone() * 0.5),
    "p updated in place": lambda opt, m: _first(m).data.mul_(0.5),
    "p updated in place under no_grad": lambda opt, m: torch.no_grad()(
        lambda: _first(m).mul_(0.5))(),
    "p.set_(a new tensor)": _set_to_a_copy,
    "a gradient with the negative bit": _negated_grad,
    "a non-contiguous gradient": _non_contiguous_grad,
    "a gradient re-pointed to float64": _grad_data_dtype,
    "a gradient re-pointed to another shape": _grad_data_shape,
    "a gradient re-pointed to the transposed shape": _grad_data_transposed_shape,
    "a sparse gradient": _sparse_grad,
    "a gradient that requires grad": _grad_requires_grad,
    "a gradient that is a state tensor": _grad_over_state,
    "no gradient": lambda opt, m: setattr(_first(m), "grad", None),
    "a gradient whose storage is freed": _grad_storage_freed,
    "a gradient whose storage is shrunk": _grad_storage_shrunk,
    "a gradient at an offset of a flat buffer": _grad_at_an_offset,
    "a gradient of copy-on-write storage": _grad_lazily_cloned,
    "a gradient whose storage refuses access to its data": _grad_storage_refuses_access,
    "a parameter listed twice": _listed_twice,
    "a state entry replaced": _with_entry(
        lambda opt, p, k: opt.state[p].__setitem__(k, torch.full_like(p, 0.25))
        if isinstance(opt.state[p][k], torch.Tensor) else None),
    "a state tensor re-pointed": _with_entry(_set_data),
    "a state tensor re-pointed to another shape": _with_entry(_set_data_shape),
    "a state tensor replaced by an inference tensor": _with_entry(_inference_state),
    "a state tensor transposed in place": _with_entry(_state_transposed_in_place),
    "a state tensor laid out anew in place": _with_entry(_state_relaid_in_place),
    "a state tensor made to require grad": _with_entry(_state_requires_grad),
    "a state tensor changed in place": _with_entry(
        lambda opt, p, k: opt.state[p][k].__imul__(0.5)),
    "the step counter advanced": lambda opt, m: (
        opt.state[_first(m)]["step"].__iadd__(10)
        if "step" in opt.state[_first(m)] else None),
    "another lr": lambda opt, m: opt.param_groups[0].__setitem__("lr", 0.03),
}

# the changes for the channels_last convolution: those of the MLP that apply to 4-d weights,
# and changes of layout
CONV_CHANGES = {k: v for k, v in CHANGES.items() if k != "a non-contiguous gradient"}
CONV_CHANGES.update({
    "a contiguous gradient": _contiguous_grad,
    "p.data = a contiguous copy": lambda opt, m: setattr(_first(m), "data",
                                                         _first(m).data.contiguous()),
    "p laid out contiguous over its memory": _relaid_contiguous,
})
CHANGES["p laid out transposed over its memory"] = _relaid_transposed


@pytest.mark.parametrize("maker, change, steps", [
    ("tensor lr", lambda opt, m: opt.param_groups[0]["lr"].fill_(0.5), True),
    ("tensor betas", lambda opt, m: opt.param_groups[0]["betas"][0].fill_(0.5), True),
    ("tensor betas", lambda opt, m: opt.param_groups[0]["betas"][1].fill_(1.5), False),
], ids=["lr", "beta1", "beta2 out of range"])
def test_a_tensor_group_value_changed_in_place_gives_the_full_paths_outcome(maker, change,
                                                                            steps):
    got = twins(maker, change)
    if steps:
        assert got == "stepped"
    else:
        assert got[0] is ValueError and "Invalid beta parameter at index 1" in got[1]


@pytest.mark.parametrize("maker", list(MAKERS))
@pytest.mark.parametrize("what", list(CHANGES))
def test_a_change_gives_the_full_paths_outcome(maker, what):
    got = twins(maker, CHANGES[what])
    if what in ("p.data = a new tensor", "p updated in place", "p.set_(a new tensor)",
                "a gradient with the negative bit", "a non-contiguous gradient",
                "a gradient that requires grad", "no gradient", "another lr",
                "a state entry replaced", "a state tensor re-pointed"):
        assert got == "stepped"
    if what in ("a gradient re-pointed to float64", "a gradient re-pointed to another shape"):
        assert got != "stepped"
    if what in ("a gradient whose storage is freed", "a gradient whose storage is shrunk"):
        assert got[0] is RuntimeError and "storage holds" in got[1]
    if what == "a gradient whose storage refuses access to its data":
        assert got != "stepped"
    if what in ("a gradient at an offset of a flat buffer", "a gradient of copy-on-write storage",
                "a state tensor made to require grad"):
        assert got == "stepped"
    if what == "a sparse gradient" and "SGD" not in maker:  # SGD takes sparse gradients
        assert got[0] is RuntimeError and "sparse" in got[1]
    if what == "a gradient that is a state tensor" and maker.startswith("fastopt.torch"):
        assert got[0] is ValueError and "shares memory" in got[1]
    if what in ("a gradient re-pointed to the transposed shape",):
        assert got != "stepped"
    if (what in ("a state tensor transposed in place", "a state tensor laid out anew in place")
            and maker.startswith("fastopt.torch")):
        assert got != "stepped"
    if (what == "a state tensor replaced by an inference tensor"
            and maker.startswith("fastopt.torch")):
        # as torch.optim, which cannot update an inference tensor in place
        assert got[0] is TypeError and "inference tensor" in got[1]
    if what == "p laid out transposed over its memory" and maker.startswith("fastopt.torch"):
        # the state keeps the old layout (the full path's refusal)
        assert got[0] is ValueError and "memory layout" in got[1]


@pytest.mark.parametrize("maker", [m for m in MAKERS if m.startswith("fastopt.torch")])
@pytest.mark.parametrize("what", list(CONV_CHANGES))
def test_a_change_of_a_channels_last_model_gives_the_full_paths_outcome(maker, what):
    got = twins(maker, CONV_CHANGES[what], conv=True)
    if what in ("p.data = a new tensor", "p.set_(a new tensor)", "a contiguous gradient",
                "no gradient", "another lr", "a state entry replaced"):
        assert got == "stepped"
    if what in ("p.data = a contiguous copy", "p laid out contiguous over its memory"):
        # the state keeps the old layout (the full path's refusal)
        assert got[0] is ValueError and "memory layout" in got[1]
    if what in ("a gradient re-pointed to float64", "a gradient re-pointed to another shape",
                "a gradient re-pointed to the transposed shape"):
        assert got != "stepped"


def test_channels_last_parameters_step_from_the_cache():
    (opt, model), (twin, twin_model) = (world("fastopt.torch.Adam", conv=True),
                                        world("fastopt.torch.Adam", conv=True))
    for k in range(4):
        for o, m in ((opt, model), (twin, twin_model)):
            backward(o, m, 1.0 + k)
        assert all(not p.grad.is_contiguous() for p in model.parameters() if p.dim() == 4)
        assert _kernels.cached(opt) == (k > 1)  # state made at 0, the cache at 1
        _kernels.forget(twin)
        opt.step()
        twin.step()
        assert state_of(opt) == state_of(twin)


def test_a_gradient_of_a_long_axis_is_compared_by_value():
    # axes longer than 256 are ints of their own in every torch.Size: the cached step
    # compares their values
    def make():
        p = torch.nn.Parameter(torch.linspace(-1, 1, 600).reshape(300, 2))
        return p, fastopt.torch.Adam([p], lr=0.01)

    (p, opt), (q, twin) = make(), make()
    for k in range(4):
        p.grad = torch.full((300, 2), 0.5 + k)
        q.grad = torch.full((300, 2), 0.5 + k)
        assert _kernels.cached(opt) == (k > 1)  # state made at 0, the cache at 1
        _kernels.forget(twin)
        opt.step()
        twin.step()
        assert torch.equal(p, q)
    p.grad = torch.ones(300, 2)
    p.grad.data = torch.ones(2, 300)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    assert torch.equal(p, before)


@pytest.mark.parametrize("maker", ["fastopt.torch.Adam", "fastopt.torch.SGD"])
def test_a_state_dict_of_torch_optim_loaded_between_cached_steps(maker):
    def change(opt, model):
        twin = getattr(torch.optim, maker.split(".")[-1])(model.parameters(), lr=0.01)
        sd = opt.state_dict()
        twin.load_state_dict(sd)
        opt.load_state_dict(twin.state_dict())

    twins(maker, change, keeps_cache=False)


def test_lockstep_with_torch_optim_over_many_cached_steps():
    model, ref = torch_mlp(), torch_mlp()
    opt = fastopt.torch.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    topt = torch.optim.Adam(ref.parameters(), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    tsched = torch.optim.lr_scheduler.StepLR(topt, 3, 0.5)
    for k in range(15):
        for o, m in ((opt, model), (topt, ref)):
            backward(o, m, 1.0 + k % 4)
            o.step()
        sched.step()
        tsched.step()
        assert _kernels.cached(opt) or k == 0
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_each_cached_step_bumps_the_version_counter_once():
    model = torch_mlp()
    opt = fastopt.torch.Adam(model.parameters())
    p = model[0].weight
    for k in range(5):
        backward(opt, model)
        before = p._version
        opt.step()
        assert p._version == before + 1
    assert _kernels.cached(opt)
    x, y = torch_batch()
    loss = torch.nn.functional.mse_loss(model(x), y)
    backward(opt, model)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cached_steps_move_every_version_counter_as_torch_optim_does():
    # in place where the parameter is read in place, through torch's call for a parameter
    # of 6 dimensions (checked by method calls); two views of one tensor share a counter
    # (two bumps a step), a parameter without a gradient keeps its version
    def make():
        torch.manual_seed(5)
        base = torch.randn(8)
        a, b = base[:4].requires_grad_(), base[4:].requires_grad_()
        return [torch.nn.Parameter(torch.randn(2, 1, 3, 1, 2, 2)), a, b,
                torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]

    ps, qs = make(), make()
    opt, twin = fastopt.torch.Adam(ps, lr=0.1), torch.optim.Adam(qs, lr=0.1)
    for k in range(6):
        for o, xs in ((opt, ps), (twin, qs)):
            for x in xs[:-1]:
                x.grad = torch.sin(x.detach() * (k + 2))
            o.step()
        assert [p._version for p in ps] == [q._version for q in qs], k
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert ps[1]._version == ps[2]._version and ps[-1]._version == qs[-1]._version
    info = _kernels.cache_info(opt)
    assert info["served"] == 4
    layout = _kernels.torch_layout()
    if _GLIBC:
        assert layout is not None, _kernels.torch_layout_refusal()
        assert layout["version_counter"] is not None
        assert layout["storage"] <= layout["version_counter"] < layout["end"]
        assert layout["autograd_meta"] is None or (
            layout["storage"] <= layout["autograd_meta"] < layout["end"]
            and layout["autograd_meta"] != layout["version_counter"])
        assert info["raw_params"] == 3  # not the 6-d one, nor the one without a gradient
    # a bump in place is seen by autograd: a graph saved before the step refuses to run
    x = ps[3] * 2.0
    loss = (x * ps[3]).sum()
    for p in ps[:-1]:
        p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_cache_keeps_no_gradient_alive():
    model = torch_mlp()
    opt = fastopt.torch.Adam(model.parameters())
    for _ in range(3):
        backward(opt, model)
        opt.step()
    assert _kernels.cached(opt)
    g = weakref.ref(model[0].weight.grad)
    opt.zero_grad()
    gc.collect()
    assert g() is None


def test_loading_a_state_dict_lets_go_of_the_old_state():
    model = torch_mlp()
    opt = fastopt.torch.Adam(model.parameters())
    for _ in range(3):
        backward(opt, model)
        opt.step()
    old = weakref.ref(opt.state[model[0].weight]["exp_avg"])
    saved = {k: v for k, v in opt.state_dict().items()}
    saved["state"] = {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()}
    opt.load_state_dict(saved)
    gc.collect()
    assert old() is None


_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _GLIBC, reason="the in-place reads of torch's tensors need glibc (its "
                                       "malloc_usable_size bounds the layout probe's reads)")
def test_torch_tensors_are_read_in_place_from_the_cache():
    # every parameter, state tensor and autograd gradient is checked by reading torch's
    # objects, every step after the first two runs from the cache, and the numbers are
    # torch.optim's
    model, ref = torch_mlp(), torch_mlp()
    opt = fastopt.torch.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    topt = torch.optim.Adam(ref.parameters(), lr=0.01, weight_decay=0.1)
    for k in range(8):
        for o, m in ((opt, model), (topt, ref)):
            backward(o, m, 1.0 + k % 3)
            o.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    layout = _kernels.torch_layout()
    assert layout is not None, _kernels.torch_layout_refusal()
    assert layout["max_dims"] == 5 and layout["end"] > layout["numel"] > layout["storage"]
    n = len(list(model.parameters()))
    info = _kernels.cache_info(opt)
    # the gradients made by backward were read without making their tensor objects
    assert info == {"served": 6, "fallbacks": 0, "groups_same": 6, "records": n,
                    "raw_params": n, "raw_state": 3 * n, "raw_grads": n, "bare_reads": 6 * n}
    assert layout["grad"] is not None and layout["tensor_object"] is not None
    assert layout["storage"] <= layout["tensor_object"] < layout["end"]


@pytest.mark.skipif(not _GLIBC, reason="the in-place reads of torch's tensors need glibc")
def test_tensors_of_more_dimensions_than_kept_inline_are_checked_by_calls():
    # sizes and strides of more than 5 dimensions live outside the TensorImpl: such a
    # parameter (and its state and gradient) is checked by method calls, the others in place
    def make():
        torch.manual_seed(3)
        return [torch.nn.Parameter(torch.randn(2, 1, 3, 1, 2, 2)),
                torch.nn.Parameter(torch.randn(())), torch.nn.Parameter(torch.randn(4, 3))]

    ps, qs = make(), make()
    opt, twin = fastopt.torch.Adam(ps, lr=0.1), torch.optim.Adam(qs, lr=0.1)
    for k in range(6):
        for o, xs in ((opt, ps), (twin, qs)):
            for x in xs:
                x.grad = torch.cos(x.detach() * (k + 1))
            o.step()
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if _kernels.torch_layout() is not None:
        info = _kernels.cache_info(opt)
        assert info["served"] == 4 and info["fallbacks"] == 0
        assert info["raw_params"] == 2 and info["raw_grads"] == 2
    # a 6-d gradient re-pointed to another shape of the same size is still caught
    ps[0].grad = torch.ones(2, 1, 3, 1, 2, 2)
    ps[0].grad.data = torch.ones(2, 3, 1, 1, 2, 2)
    before = ps[0].detach().clone()
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    assert torch.equal(ps[0], before)


def test_a_lazy_clone_of_a_parameter_keeps_its_values():
    # a copy-on-write clone shares the parameter's memory until one of them is written:
    # the step must write the parameter's own copy, not the shared one
    model = torch_mlp()
    opt = fastopt.torch.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        backward(opt, model)
        opt.step()
    assert _kernels.cached(opt)
    backward(opt, model)
    p = _first(model)
    clone = torch._lazy_clone(p.detach())
    before = clone.clone()
    opt.step()
    assert torch.equal(clone, before)
    assert not torch.equal(p.detach(), before)


def test_the_in_place_reads_can_be_turned_off():
    code = (
        "import json, torch, fastopt.torch\n"
        "from fastopt import _kernels\n"
        "p = torch.nn.Parameter(torch.zeros(3, 2))\n"
        "opt = fastopt.torch.Adam([p], lr=0.1)\n"
        "for k in range(5):\n"
        "    p.grad = torch.full((3, 2), 1.0 + k)\n"
        "    opt.step()\n"
        "print(json.dumps([_kernels.torch_layout(), _kernels.cache_info(opt),\n"
        "                  p.detach().reshape(-1).tolist()]))\n")
    outs = []
    for value in ("0", "1"):
        env = {**os.environ, "FASTOPT_TORCH_LAYOUT": value}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120, check=True)
        outs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    (layout_off, info_off, p_off), (layout_on, info_on, p_on) = outs
    assert layout_off is None
    assert info_off["served"] == 3 and info_off["raw_params"] == 0 and info_off["raw_grads"] == 0
    assert (layout_on is not None) == _GLIBC
    assert info_on["served"] == 3
    assert p_off == p_on


@pytest.mark.parametrize("maker", [m for m in MAKERS if m.startswith("fastopt.torch")])
def test_a_parameter_laid_out_in_another_shape_over_its_memory(maker):
    # the same memory in another shape (its data pointer and contiguity stay), with a
    # gradient of that shape: the state keeps the old shape, which the full path refuses
    def make():
        torch.manual_seed(5)
        ps = [torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(5))]
        return ps, MAKERS[maker](ps)

    (ps, opt), (qs, twin) = make(), make()
    for k in range(3):
        for xs, o in ((ps, opt), (qs, twin)):
            for x in xs:
                x.grad = torch.cos(x.detach() * (k + 1))
            o.step()
    assert _kernels.cached(opt)
    for xs in (ps, qs):
        _relaid_shape(xs[0], (6, 4))
        xs[0].grad = torch.ones(6, 4)
        xs[1].grad = torch.ones(5)
    _kernels.forget(twin)
    before = state_of(opt)
    got, want = outcome(opt), outcome(twin)
    assert got == want
    assert got[0] is ValueError and "shape" in got[1]
    assert state_of(opt) == before


def _grads_seen(model):
    """Read every .grad from Python: each gradient gets its tensor object."""
    return [p.grad for p in model.parameters()]


@pytest.mark.skipif(not _GLIBC, reason="the in-place reads of torch's tensors need glibc")
@pytest.mark.parametrize("gc_on", [True, False], ids=["gc on", "gc off"])
def test_gradients_made_by_backward_are_read_without_making_tensor_objects(gc_on):
    # the same steps, bit for bit, whether a gradient has its tensor object (read through
    # torch's getter) or not yet (read in place, none made); the collector's setting kept
    model, twin = torch_mlp(), torch_mlp()
    opt, topt = fastopt.torch.Adam(model.parameters(), lr=0.01), \
        fastopt.torch.Adam(twin.parameters(), lr=0.01)
    n = len(list(model.parameters()))
    was = gc.isenabled()
    (gc.enable if gc_on else gc.disable)()
    try:
        for k in range(6):
            backward(opt, model, 1.0 + k % 3)
            opt.step()
            backward(topt, twin, 1.0 + k % 3)
            _grads_seen(twin)
            topt.step()
            assert gc.isenabled() == gc_on
    finally:
        (gc.enable if was else gc.disable)()
    assert _kernels.cache_info(opt)["bare_reads"] == 4 * n
    assert _kernels.cache_info(topt)["bare_reads"] == 0
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], topt.state[q][key])
        assert p._version == q._version


def _grad_over_first_state(opt, model):
    p = _first(model)
    p.grad = opt.state[p]["exp_avg"]


@pytest.mark.skipif(not _GLIBC, reason="the in-place reads of torch's tensors need glibc")
@pytest.mark.parametrize("change, raises", [
    (_non_contiguous_grad, False),
    (_grad_over_first_state, True),
], ids=["a non-contiguous gradient (the full path steps)", "a gradient over the state (it raises)"])
@pytest.mark.parametrize("gc_on", [True, False], ids=["gc on", "gc off"])
def test_the_collector_is_as_it_was_after_a_step_that_left_the_cache(change, raises, gc_on):
    # the first parameter's gradient changed after backward made them all: the others are
    # read in place before the cached step gives up on the first one
    model = torch_mlp()
    opt = fastopt.torch.Adam(list(model.parameters())[::-1], lr=0.01)
    for k in range(3):
        backward(opt, model)
        opt.step()
    before = _kernels.cache_info(opt)["bare_reads"]
    assert before > 0
    backward(opt, model)
    change(opt, model)
    was = gc.isenabled()
    (gc.enable if gc_on else gc.disable)()
    try:
        if raises:
            with pytest.raises(ValueError, match="shares memory"):
                opt.step()
        else:
            opt.step()
        assert gc.isenabled() == gc_on
    finally:
        (gc.enable if was else gc.disable)()


_GRAD_DESCRIPTOR = torch._C.TensorBase.__dict__["grad"]


@pytest.mark.skipif(not _GLIBC, reason="the in-place reads of torch's tensors need glibc")
def test_a_torch_function_mode_sees_every_gradient_read():
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.grads = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.grads += getattr(func, "__self__", None) is _GRAD_DESCRIPTOR
            return func(*args, **(kwargs or {}))

    model = torch_mlp()
    opt = fastopt.torch.Adam(model.parameters(), lr=0.01)
    for k in range(3):
        backward(opt, model)
        opt.step()
    before = _kernels.cache_info(opt)
    backward(opt, model)
    with Seen() as mode:
        opt.step()
    after = _kernels.cache_info(opt)
    n = len(list(model.parameters()))
    assert after["served"] == before["served"] + 1
    assert after["bare_reads"] == before["bare_reads"]
    assert mode.grads >= n


@pytest.mark.skipif(not _GLIBC, reason="the in-place reads of torch's tensors need glibc")
def test_a_large_step_reads_its_gradients_through_torch():
    # a step over more than 4 MiB of parameters runs its kernels with the GIL released: its
    # gradients are read by torch's getter, which keeps them alive
    ps = [torch.nn.Parameter(torch.zeros(1 << 20)), torch.nn.Parameter(torch.zeros(3))]
    opt = fastopt.torch.SGD(ps, lr=0.5)
    for k in range(4):
        opt.zero_grad()
        sum((p * (k + 1.0)).sum() for p in ps).backward()
        opt.step()
    info = _kernels.cache_info(opt)
    assert info["served"] == 2 and info["bare_reads"] == 0
    assert torch.equal(ps[1], torch.full((3,), -0.5 * (1 + 2 + 3 + 4)))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_a_sparse_gradient_made_by_backward_is_refused_as_torch_optim_refuses_it(name):
    def run(module):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 2))
        opt = getattr(module, name)([w], lr=0.1)
        for k in range(3):
            opt.zero_grad()
            (w * (1.0 + k)).pow(2).sum().backward()
            opt.step()
        if module is fastopt.torch and _GLIBC:  # the dense gradient was read in place
            assert _kernels.cache_info(opt)["bare_reads"] == 1
        opt.zero_grad()
        torch.nn.functional.embedding(torch.tensor([1, 4]), w, sparse=True).sum().backward()
        before = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
        with pytest.raises(RuntimeError) as e:
            opt.step()
        assert torch.equal(w, before[0])
        assert all(torch.equal(v, before[1][k]) for k, v in opt.state[w].items())
        return str(e.value), opt

    got, opt = run(fastopt.torch)
    want, _ = run(torch.optim)
    assert got == f"param_groups[0]['params'][0]: {want}"  # torch's text, the tensor named
