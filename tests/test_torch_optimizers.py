"""fastopt.torch: fastopt's kernels behind real torch.optim.Optimizer subclasses.

Every valid configuration of the database runs in lockstep with torch.optim on the same
model and data; the state is checked to be torch tensors that the kernels update in place,
state dicts to move between the two libraries and through torch.save / torch.load with
weights_only=True, and torch's own schedulers to drive the optimizers.
"""
import copy
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from helpers import torch_batch, torch_mlp
from optim_db import DB, PER_ELEMENT, configs

torch = pytest.importorskip("torch", reason="fastopt.torch needs torch")
import fastopt.torch as ft  # noqa: E402

F32 = {"rtol": 1.3e-6, "atol": 1e-5}  # torch.testing's float32 defaults
F64 = {"rtol": 1e-7, "atol": 1e-7}


def _model(seed=0, dtype=torch.float32):
    return torch_mlp(dtype, seed)


_data = torch_batch


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    opt.step()
    return loss.item()


def _torch_class(name):
    return getattr(torch.optim, DB[name].torch_name or name, None)


TWINNED = configs(where=lambda info: info.torch_name is not None)


def test_every_per_element_optimizer_has_a_torch_class():
    # the others (LBFGS, Adafactor, SparseAdam) step with fastopt's own code
    assert {info.name for info in PER_ELEMENT} <= set(ft.__all__) <= set(DB)
    for name in ft.__all__:
        cls = getattr(ft, name)
        assert issubclass(cls, torch.optim.Optimizer)
        twin = getattr(torch.optim, name, None)
        if twin is not None:
            assert issubclass(cls, twin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kwargs", TWINNED)
def test_lockstep_with_torch(name, kwargs, dtype):
    model = _model(dtype=dtype)
    ref = copy.deepcopy(model)
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    topt = _torch_class(name)(ref.parameters(), **kwargs)
    x, y = _data(dtype)
    tol = F32 if dtype == torch.float32 else F64
    if kwargs.get("maximize"):
        # a maximizing run grows without bound and amplifies the last-bit differences of
        # torch's CPU sqrt (not IEEE-rounded) step after step
        tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-6,
                                                                          "atol": 1e-6}
    for step in range(20):
        _step(model, opt, x, y)
        _step(ref, topt, x, y)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **tol, msg=lambda m, s=step: f"step {s}: {m}")
    sd, tsd = opt.state_dict(), topt.state_dict()
    assert sd["param_groups"] == tsd["param_groups"]
    assert sd["state"].keys() == tsd["state"].keys()
    for i, st in tsd["state"].items():
        assert sd["state"][i].keys() == st.keys()
        for key, value in st.items():
            mine = sd["state"][i][key]
            assert isinstance(mine, torch.Tensor), key
            assert mine.dtype == value.dtype and mine.shape == value.shape, key
            # the absolute tolerance scaled to the entry's magnitude: torch's CPU sqrt (MKL's,
            # its rounding depends on the CPU) is not IEEE's, and 20 steps of training amplify
            # the last-bit differences of an entry such as RMSprop's momentum buffer (values
            # near 20) past float32's absolute 1e-5
            scale = max(1.0, value.abs().max().item()) if value.numel() else 1.0
            torch.testing.assert_close(mine, value, rtol=tol["rtol"], atol=tol["atol"] * scale)


def test_state_tensors_are_updated_in_place():
    model = _model()
    opt = ft.Adam(model.parameters(), lr=0.01)
    x, y = _data()
    _step(model, opt, x, y)
    p = next(model.parameters())
    st = opt.state[p]
    tensors = {k: (v, v.data_ptr(), v.clone()) for k, v in st.items()}
    _step(model, opt, x, y)
    for key, (t, ptr, before) in tensors.items():
        assert opt.state[p][key] is t and t.data_ptr() == ptr
        assert not torch.equal(t, before), key  # the kernel wrote into this very tensor
    assert st["step"].item() == 2.0 and st["step"].dtype == torch.float32


@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad", "Rprop", "ASGD", "Lion"])
def test_torch_save_and_weights_only_load_round_trip(name):
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    model = _model()
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    x, y = _data()
    for _ in range(3):
        _step(model, opt, x, y)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    twin = copy.deepcopy(model)
    other = getattr(ft, name)(twin.parameters(), **kwargs)
    other.load_state_dict(loaded)
    for _ in range(3):
        a, b = _step(model, opt, x, y), _step(twin, other, x, y)
        assert a == b
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "RMSprop", "NAdam", "Adagrad"])
def test_a_run_moves_between_torch_and_fastopt_torch(name, direction):
    kwargs = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
    first, second = ((_torch_class(name), getattr(ft, name)) if direction == "torch->fastopt"
                     else (getattr(ft, name), _torch_class(name)))
    model = _model()
    ref = copy.deepcopy(model)
    x, y = _data()
    opt = first(model.parameters(), **kwargs)
    topt = _torch_class(name)(ref.parameters(), **kwargs)
    for _ in range(4):
        _step(model, opt, x, y)
        _step(ref, topt, x, y)
    moved = second(model.parameters(), **kwargs)
    moved.load_state_dict(opt.state_dict())
    for _ in range(4):
        _step(model, moved, x, y)
        _step(ref, topt, x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32)


def test_numpy_state_dict_of_fastopt_loads_as_tensors():
    model = _model()
    params = [fastopt_param(p) for p in model.parameters()]
    import fastopt
    nopt = fastopt.Adam(params, lr=0.01)
    for p in params:
        p.grad = np.ones_like(p)
    nopt.step()
    opt = ft.Adam(model.parameters(), lr=0.01)
    opt.load_state_dict(nopt.state_dict())
    st = opt.state[next(model.parameters())]
    assert all(isinstance(v, torch.Tensor) for v in st.values())
    assert st["step"].item() == 1.0


def fastopt_param(t):
    import fastopt
    return fastopt.Parameter(t.detach().numpy().copy())


def test_bad_state_dict_is_refused_naming_the_key_and_changes_nothing():
    model = _model()
    opt = ft.Adam(model.parameters())
    x, y = _data()
    _step(model, opt, x, y)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg"] = torch.zeros(5)
    before = {k: v.clone() for k, v in opt.state[list(model.parameters())[1]].items()}
    with pytest.raises(ValueError, match=r"state\[1\]|\['params'\]\[1\]") as info:
        opt.load_state_dict(sd)
    assert "exp_avg" in str(info.value)
    after = opt.state[list(model.parameters())[1]]
    for k, v in before.items():
        assert torch.equal(after[k], v)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12),
    lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.01, anneal_epochs=4),
], ids=["StepLR", "OneCycleLR", "SWALR"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_torch_schedulers_drive_fastopt_torch_in_lockstep(name, make):
    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.05}
    model = _model()
    ref = copy.deepcopy(model)
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    topt = getattr(torch.optim, name)(ref.parameters(), **kwargs)
    sched, tsched = make(opt), make(topt)
    x, y = _data()
    for _ in range(12):
        _step(model, opt, x, y)
        _step(ref, topt, x, y)
        sched.step()
        tsched.step()
        assert sched.get_last_lr() == tsched.get_last_lr()
        assert opt.param_groups[0].get("momentum") == topt.param_groups[0].get("momentum")
        assert opt.param_groups[0].get("betas") == topt.param_groups[0].get("betas")
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32)


def test_reduce_lr_on_plateau_and_a_tensor_lr():
    model = _model()
    ref = copy.deepcopy(model)
    opt = ft.SGD(model.parameters(), lr=torch.tensor(0.1))
    topt = torch.optim.SGD(ref.parameters(), lr=torch.tensor(0.1))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, patience=0, factor=0.5)
    x, y = _data()
    for step in range(6):
        _step(model, opt, x, y)
        _step(ref, topt, x, y)
        sched.step(1.0)  # never improves: the lr halves every step after the first
        tsched.step(1.0)
        assert float(opt.param_groups[0]["lr"]) == float(topt.param_groups[0]["lr"])
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 * 0.5 ** 5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32)


def test_a_tensor_lr_is_copied_at_construction_as_torch_does():
    lr = torch.tensor(0.1)
    model = _model()
    opt = ft.Adam(model.parameters(), lr=lr)
    topt = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=lr)
    lr.fill_(5.0)
    assert float(opt.param_groups[0]["lr"]) == float(topt.param_groups[0]["lr"])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        ft.Adam(model.parameters(), lr=torch.tensor([0.1, 0.2]))


def test_version_counter_bumped_by_a_step_and_kept_by_a_failed_one():
    model = _model()
    opt = ft.Adam(model.parameters())
    x, y = _data()
    params = list(model.parameters())
    _step(model, opt, x, y)
    versions = [p._version for p in params]
    _step(model, opt, x, y)
    assert [p._version for p in params] == [v + 1 for v in versions]
    versions = [p._version for p in params]
    snap = [p.detach().clone() for p in params]
    opt.state[params[-1]]["exp_avg"] = torch.zeros(7)  # the last parameter's state is bad
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[3\].*exp_avg"):
        opt.step()
    assert [p._version for p in params] == versions
    for p, s in zip(params, snap):
        assert torch.equal(p, s)


def test_hooks_repr_and_zero_grad_are_torchs():
    model = _model()
    opt = ft.AdamW(model.parameters(), lr=0.01)
    topt = torch.optim.AdamW(copy.deepcopy(model).parameters(), lr=0.01)
    assert repr(opt) == repr(topt)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd"))
    x, y = _data()
    _step(model, opt, x, y)
    opt.state_dict()
    assert calls == ["pre", "post", "sd"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_refused_parameters_name_the_parameter_and_add_no_group():
    model = _model()
    opt = ft.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[1\].*float8"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True),
                                        torch.zeros(3, dtype=torch.float8_e4m3fn,
                                                    requires_grad=True)]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="differentiable"):
        ft.Adam(model.parameters(), differentiable=True)


def test_a_second_concurrent_step_raises():
    model = _model()
    opt = ft.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    seen = []

    def closure():
        try:
            opt.step()
        except RuntimeError as e:
            seen.append(str(e))
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        return loss

    opt.step(closure)
    assert seen and "another step" in seen[0]
    opt.step(closure)  # the guard was released: the optimizer still steps


def test_threads_stepping_their_own_optimizers():
    models = [_model(seed=s) for s in range(2)]
    refs = [copy.deepcopy(m) for m in models]
    x, y = _data()

    def run(model):
        opt = ft.Adam(model.parameters(), lr=0.01)
        for _ in range(20):
            _step(model, opt, x, y)

    threads = [threading.Thread(target=run, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model, ref in zip(models, refs):
        topt = torch.optim.Adam(ref.parameters(), lr=0.01)
        for _ in range(20):
            _step(ref, topt, x, y)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **F32)


def test_import_fastopt_alone_does_not_import_torch():
    code = "import sys, fastopt; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd="/", env=dict(os.environ), timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("False")


def test_step_hooks_run_in_torchs_order_and_a_pre_hook_may_replace_the_args():
    model = _model()
    opt = ft.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    calls = []

    def closure():
        calls.append("closure")
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)
    handles = [
        register_optimizer_step_pre_hook(
            lambda o, a, k: calls.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: (calls.append("pre"), ((o, closure), {}))[1]),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", len(a)))),
        register_optimizer_step_post_hook(
            lambda o, a, k: calls.append("global post")),
    ]
    try:
        loss = opt.step()  # the pre hook hands the closure in
    finally:
        for h in handles:
            h.remove()
    assert isinstance(loss, torch.Tensor)
    assert calls == ["global pre", "pre", "closure", ("post", 2), "global post"]
    opt.register_step_pre_hook(lambda o, a, k: 3)
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()


def test_the_profiler_sees_the_step_as_torchs():
    model = _model()
    opt = ft.Adam(model.parameters())
    x, y = _data()
    _step(model, opt, x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#Adam.step" in {e.name for e in prof.events()}


@pytest.mark.parametrize("name,kwargs", configs())
def test_same_bits_as_the_numpy_optimizer_over_the_same_tensors(name, kwargs):
    """fastopt.torch.X and fastopt.X run the same kernel: equal bits, every optimizer,
    those without a torch twin (Lion) included."""
    import fastopt
    model = _model()
    twin = copy.deepcopy(model)
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    nopt = getattr(fastopt, name)(twin.parameters(), **kwargs)
    x, y = _data()
    for _ in range(10):
        assert _step(model, opt, x, y) == _step(twin, nopt, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in nopt.state[q].items():
            assert np.array_equal(opt.state[p][key].numpy(), value), key


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SGD",
                                  "RMSprop"])
def test_a_scheduler_may_cycle_momentum_beyond_the_constructors_range(name):
    """OneCycleLR(max_momentum=22) writes momentum or betas[0] = 22: torch's step carries
    on, and so do fastopt.torch's and fastopt's NumPy optimizers, with torch's numbers."""
    import fastopt
    from fastopt import lr_scheduler as flr
    kwargs = {"lr": 0.01, "momentum": 0.5} if name in ("SGD", "RMSprop") else {"lr": 0.01}
    model = _model()
    ref, twin = copy.deepcopy(model), copy.deepcopy(model)
    opts = [getattr(ft, name)(model.parameters(), **kwargs),
            getattr(torch.optim, name)(ref.parameters(), **kwargs),
            getattr(fastopt, name)(twin.parameters(), **kwargs)]
    one_cycle = dict(max_lr=0.01, total_steps=10, max_momentum=22.0, base_momentum=0.85)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(opts[0], **one_cycle),
              torch.optim.lr_scheduler.OneCycleLR(opts[1], **one_cycle),
              flr.OneCycleLR(opts[2], **one_cycle)]
    key = "momentum" if "momentum" in kwargs else "betas"
    assert all(o.param_groups[0][key] == opts[1].param_groups[0][key] for o in opts)
    x, y = _data()
    for _ in range(4):
        for m, o, s in zip((model, ref, twin), opts, scheds):
            _step(m, o, x, y)
            s.step()
    for p, q, r in zip(model.parameters(), ref.parameters(), twin.parameters()):
        assert torch.isfinite(q).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
        assert torch.equal(p, r)  # the same kernel on the same numbers


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
def test_a_first_beta_of_one_is_torchs_zero_division_with_nothing_changed(name):
    import fastopt
    model = _model()
    x, y = _data()
    for make in (getattr(ft, name), getattr(fastopt, name), getattr(torch.optim, name)):
        opt = make(model.parameters())
        _step(model, opt, x, y)
        opt.param_groups[0]["betas"] = (1.0, 0.999)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ZeroDivisionError):
            _step(model, opt, x, y)
        if make is not getattr(torch.optim, name):  # torch has updated exp_avg by then
            for p, b in zip(model.parameters(), before):
                assert torch.equal(p, b)
            st = opt.state[next(model.parameters())]
            assert float(st["step"]) == 1.0


def test_fastopt_dot_torch_is_loaded_on_first_use():
    code = ("import sys, fastopt; assert 'torch' not in sys.modules\n"
            "opt = fastopt.torch.SGD([__import__('torch').zeros(2, requires_grad=True)], lr=1)\n"
            "print(type(opt).__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd="/", env=dict(os.environ), timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("fastopt.torch")


@pytest.mark.parametrize("change", ["reshape", "transpose"])
def test_a_parameter_reinterpreted_in_place_is_followed(change):
    """``p.data = p.data.view(...)`` (same memory, another shape) and a transposed square
    matrix (same memory and shape, other strides) step as torch's do: the step looks at the
    tensor afresh instead of reusing the view it cached."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4))
    ref = torch.nn.Parameter(w.detach().clone())
    opt, topt = ft.SGD([w], lr=0.1, momentum=0.9), torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for step in range(3):
        if step == 1:
            for p in (w, ref):
                p.data = p.data.view(2, 8) if change == "reshape" else p.data.t()
                for o in (opt, topt):
                    o.state.clear()
        for p, o in ((w, opt), (ref, topt)):
            p.grad = torch.arange(p.numel(), dtype=torch.float32).view(p.shape) * (step + 1)
            o.step()
        torch.testing.assert_close(w, ref, rtol=0, atol=0)


@pytest.mark.parametrize("change", ["resize", "set", "data"])
def test_a_state_tensor_changed_in_place_is_looked_at_afresh(change):
    """A state tensor resized, re-pointed with set_ or given new data is checked again at
    the next step: a wrong shape is refused naming the key, nothing changed."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    opt = ft.Adam([w], lr=0.1)
    w.grad = torch.ones(6)
    opt.step()
    st = opt.state[w]
    if change == "resize":
        st["exp_avg"].resize_(3)
    elif change == "set":
        st["exp_avg"].set_(torch.zeros(3))
    else:
        st["exp_avg"].data = torch.zeros(3)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"\['params'\]\[0\].*exp_avg"):
        opt.step()
    assert torch.equal(w, before) and float(st["step"]) == 1.0
