"""torch.Tensor parameters and fastopt.interop, against torch.optim as the oracle.

The lockstep tests train the same small MLP twice from the same weights and data, once with
torch.optim and once with fastopt updating the tensors in place, and compare the loss at
every step. fastopt's kernels use IEEE sqrt where torch's CPU sqrt is not correctly rounded
(MKL's), so the comparison uses torch's float32 tolerance rather than equality; moving a run
to the other library and back is compared bit for bit. The optimizers, their settings and the
scheduled runs come from the database (tests/optim_db.py).
"""
import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import interop
from fastopt import lr_scheduler as flr
from optim_db import DB, OPTIM_DB, configs, names

try:
    import torch
except ImportError:  # pragma: no cover - exercised on machines without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed: the tensor "
                                 "adapter and interop tests need it")

F32 = {"rtol": 1.3e-6, "atol": 1e-5}  # torch.testing's float32 defaults

# --------------------------------------------------------------------------- torch absent


def _run(code):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, cwd="/", env=env, timeout=120)


def test_import_does_not_import_torch():
    r = _run("import sys, numpy as np, fastopt\n"
             "p = fastopt.Parameter(np.ones(3, np.float32)); p.grad = np.ones(3, np.float32)\n"
             "o = fastopt.Adam([p]); o.step(); o.zero_grad()\n"
             "fastopt.interop.state_dict_from_torch(o.state_dict())\n"
             "print('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("False")


def test_without_torch_interop_says_how_to_get_it():
    r = _run("import sys; sys.modules['torch'] = None\n"
             "import numpy as np, fastopt\n"
             "p = fastopt.Parameter(np.ones(3)); p.grad = np.ones(3)\n"
             "o = fastopt.SGD([p], momentum=0.9); o.step()\n"
             "sd = fastopt.interop.state_dict_from_torch(o.state_dict())\n"
             "assert isinstance(sd['state'][0]['momentum_buffer'], np.ndarray)\n"
             "try:\n"
             "    fastopt.interop.state_dict_to_torch(o.state_dict())\n"
             "except ImportError as e:\n"
             "    print('IMPORTERROR', e)\n")
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "pip install torch" in r.stdout


# --------------------------------------------------------------------------- helpers


def mlp(seed, dtype=None, widths=(10, 32, 32, 4)):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    if dtype is not None:
        model = model.to(dtype)
    return model


def data(seed=0, n=256, d=10, k=4, dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype or torch.float32)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(k): {kk: np.array(vv, copy=True) for kk, vv in v.items()}
             for k, v in opt.state.items()})


def assert_same_snapshot(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert a[1][k].keys() == b[1][k].keys()
        for kk in a[1][k]:
            np.testing.assert_array_equal(a[1][k][kk], b[1][k][kk])


# --------------------------------------------------------------------------- tensors as params


@needs_torch
def test_tensor_params_are_updated_in_place_without_copies():
    model = mlp(0)
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    initial = [p.detach().clone() for p in params]
    ref = copy.deepcopy(model)
    opt = fastopt.Adam(model.parameters(), lr=1e-2)
    topt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    x, y = data()
    for m, o in ((model, opt), (ref, topt)):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    assert [p.data_ptr() for p in params] == ptrs
    for p, q, p0 in zip(params, ref.parameters(), initial):
        torch.testing.assert_close(p, q, **F32)
        assert not torch.equal(p, p0)  # the tensor itself moved
    # state: NumPy arrays keyed by the tensor objects, torch's keys and step type
    st = opt.state[params[0]]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
    assert isinstance(st["exp_avg"], np.ndarray) and st["exp_avg"].dtype == np.float32
    assert st["step"].dtype == np.float32 and st["step"].shape == () and st["step"] == 1
    assert st["exp_avg"].shape == tuple(params[0].shape)


@needs_torch
def test_step_reads_the_new_grad_and_skips_none():
    w = torch.nn.Parameter(torch.zeros(5))
    v = torch.nn.Parameter(torch.zeros(3))
    opt = fastopt.SGD([w, v], lr=0.5)
    w.grad = torch.ones(5)
    opt.step()
    assert torch.equal(w.detach(), torch.full((5,), -0.5))
    assert torch.equal(v.detach(), torch.zeros(3))  # grad None: skipped
    w.grad = torch.full((5,), 2.0)  # a new gradient object, as backward gives
    opt.step()
    assert torch.equal(w.detach(), torch.full((5,), -1.5))
    assert v not in opt.state


@needs_torch
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_follows_torch(set_to_none):
    model = mlp(1)
    ref = copy.deepcopy(model)
    x, y = data()
    opt = fastopt.SGD(model.parameters(), lr=0.1)
    topt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for m, o in ((model, opt), (ref, topt)):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=set_to_none)
    topt.zero_grad(set_to_none=set_to_none)
    for p, q, g in zip(model.parameters(), ref.parameters(), grads):
        if set_to_none:
            assert p.grad is None and q.grad is None
        else:
            assert p.grad is g and torch.equal(p.grad, torch.zeros_like(p))
            assert not p.grad.requires_grad
    opt.zero_grad()  # default: to None, as torch >= 2.0
    assert all(p.grad is None for p in model.parameters())


@needs_torch
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_grads_are_zeroed_as_torch_does():
    w = torch.nn.Parameter(torch.ones(3))
    (w ** 3).sum().backward(create_graph=True)
    assert w.grad.requires_grad
    opt = fastopt.SGD([w], lr=0.1)
    opt.step()  # a grad that requires grad is read through detach()
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.7))
    opt.zero_grad(set_to_none=False)
    assert not w.grad.requires_grad and w.grad.grad_fn is None
    assert torch.equal(w.grad, torch.zeros(3))


@needs_torch
def test_in_place_update_bumps_autograd_version():
    """An update between forward and backward is caught by autograd, as with torch.optim."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = fastopt.SGD([w], lr=0.1)
    loss = (w * w).sum()  # saves w for backward
    w.grad = torch.ones(4)
    before = w._version
    opt.step()
    assert w._version == before + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_torch
def test_float64_named_and_mixed_params():
    model = mlp(2, dtype=torch.float64)
    ref = copy.deepcopy(model)
    arr = fastopt.Parameter(np.ones(3))
    opt = fastopt.AdamW([{"params": list(model.named_parameters())},
                         {"params": [("extra", arr)], "lr": 0.5}], lr=1e-2)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    assert opt.param_groups[0]["param_names"][0] == "0.weight"
    x, y = data(dtype=torch.float64)
    for _ in range(3):
        for m, o in ((model, opt), (ref, topt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
        arr.grad = np.ones(3)
        opt.step()
        topt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert opt.state[model[0].weight]["exp_avg"].dtype == np.float64
    assert arr[0] < 1.0


@needs_torch
def test_replaced_storage_is_followed():
    """``p.data = ...`` (what Module.to() does) gives the tensor new memory: use it."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = fastopt.SGD([w], lr=1.0)
    w.grad = torch.ones(4)
    opt.step()
    w.data = torch.full((4,), 10.0)
    w.grad = torch.ones(4)
    opt.step()
    assert torch.equal(w.detach(), torch.full((4,), 9.0))
    w.data = torch.zeros(2, 2).t()  # same storage size, no longer contiguous
    w.grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*contiguous"):
        opt.step()


@needs_torch
def test_cached_views_do_not_keep_models_alive():
    import gc
    import weakref

    from fastopt._adapters import TORCH_ADAPTER

    model = mlp(4)
    opt = fastopt.SGD(model.parameters(), lr=0.1)
    x, y = data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    keys = [id(p) for p in model.parameters()]
    assert all(k in TORCH_ADAPTER._views for k in keys)
    ref = weakref.ref(model[0].weight)
    del model, opt
    gc.collect()
    assert ref() is None
    assert not any(k in TORCH_ADAPTER._views for k in keys)


@needs_torch
def test_adapter_data_view_checks_nothing_about_grads():
    from fastopt._adapters import TORCH_ADAPTER

    w = torch.nn.Parameter(torch.arange(3.0))
    w.grad_dtype = None
    w.grad = torch.zeros(3, dtype=torch.float64)  # wrong for a step, irrelevant here
    before = w._version
    view = TORCH_ADAPTER.data(w)
    assert np.shares_memory(view, w.detach().numpy()) and w._version == before


@needs_torch
def test_state_dict_pickles_and_loads_with_tensor_params():
    model = mlp(3)
    opt = fastopt.RMSprop(model.parameters(), lr=1e-2, momentum=0.9, centered=True)
    x, y = data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    clone = copy.deepcopy(model)
    opt2 = fastopt.RMSprop(clone.parameters())
    opt2.load_state_dict(sd)
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- bad input


def _bad_params():
    base = torch.zeros(3, 4)
    leaf = torch.zeros(3, requires_grad=True)
    return {
        "gpu-like (meta)": (torch.zeros(3, device="meta"), ValueError, "on meta"),
        "sparse": (torch.zeros(3, 3).to_sparse(), ValueError, "dense"),
        "non-contiguous": (base.t(), ValueError, "not contiguous"),
        "int": (torch.zeros(3, dtype=torch.int64), TypeError, "torch.int64"),
        "float8": (torch.zeros(3, dtype=torch.float8_e4m3fn), TypeError, "float8_e4m3fn"),
        "bfloat16": (torch.zeros(3, dtype=torch.bfloat16), TypeError, "bfloat16"),
        "complex": (torch.zeros(3, dtype=torch.complex64), TypeError, "complex64"),
        "non-leaf": (leaf * 2, ValueError, "can't optimize a non-leaf Tensor"),
    }


BAD_PARAMS = ["gpu-like (meta)", "sparse", "non-contiguous", "int", "float8", "bfloat16",
              "complex", "non-leaf"]


@needs_torch
@pytest.mark.parametrize("case", BAD_PARAMS)
@pytest.mark.parametrize("name", names())
def test_bad_tensor_params_are_refused_by_name(case, name):
    bad, exc, msg = _bad_params()[case]
    good = torch.nn.Parameter(torch.zeros(3))
    cls = fastopt.OPTIMIZERS[name]
    with pytest.raises(exc, match=r"param_groups\[0\]\['params'\]\[1\]") as info:
        cls([good, bad])
    assert msg in str(info.value)
    # add_param_group: the error names the new group; nothing changes
    opt = cls([good])
    group = {"params": [torch.nn.Parameter(torch.zeros(2)), bad], "lr": 0.5}
    saved = dict(group)
    with pytest.raises(exc, match=r"param_groups\[1\]\['params'\]\[1\]"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and group == saved


@needs_torch
def test_non_leaf_allowed_when_differentiable_as_torch():
    leaf = torch.zeros(3, requires_grad=True)
    nonleaf = leaf * 2
    fastopt.SGD([nonleaf], differentiable=True)  # torch accepts it too
    torch.optim.SGD([nonleaf], differentiable=True)
    kept = leaf * 3
    kept.retain_grad()
    fastopt.SGD([kept])


@needs_torch
def test_a_tensor_as_params_is_a_type_error():
    with pytest.raises(TypeError, match="iterable of Tensors"):
        fastopt.Adam(torch.zeros(3, requires_grad=True))


def _bad_grads():
    return {
        # handed over as a fastopt.SparseGrad, which only SparseAdam takes (as for arrays)
        "sparse": (torch.zeros(3).to_sparse(), RuntimeError, "does not support sparse gradients"),
        "dtype": (torch.zeros(3, dtype=torch.float64), TypeError, "float64"),
        "bfloat16": (torch.zeros(3, dtype=torch.bfloat16), TypeError, "bfloat16"),
        "shape": (torch.zeros(4), ValueError, "shape"),
    }


@needs_torch
@pytest.mark.parametrize("case", ["sparse", "dtype", "bfloat16", "shape"])
@pytest.mark.parametrize("name,kwargs", configs())
def test_bad_grad_fails_the_step_and_changes_nothing(case, name, kwargs):
    bad, exc, msg = _bad_grads()[case]
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = fastopt.OPTIMIZERS[name]([{"params": [a]}, {"params": [b]}], **kwargs)
    a.grad = torch.ones(3)
    b.grad = torch.ones(3)
    opt.step()
    before = snapshot(opt, [a, b])
    a.grad = torch.ones(3)
    if case == "shape":  # torch's setter checks the size; .data swaps bypass it
        b.grad = torch.ones(3)
        b.grad.data = bad
    else:
        b.grad_dtype = None  # torch 2.13 checks the dtype unless told not to
        b.grad = bad
    with pytest.raises(exc, match=r"param_groups\[1\]\['params'\]\[0\]") as info:
        opt.step()
    assert msg in str(info.value)
    assert_same_snapshot(before, snapshot(opt, [a, b]))


# --------------------------------------------------------------------------- MLP lockstep

SCHEDULED = [pytest.param(info.name, run, id=f"{info.name}-{run.desc}")
             for info in OPTIM_DB for run in info.scheduled_runs]


@needs_torch
@pytest.mark.parametrize("name,run", SCHEDULED)
def test_mlp_training_in_lockstep_with_torch(name, run):
    kwargs, make_sched = run.kwargs, run.scheduler
    model = mlp(10)
    ref = copy.deepcopy(model)
    opt = DB[name].cls(model.parameters(), **kwargs)
    topt = getattr(torch.optim, name)(ref.parameters(), **kwargs)
    sched = make_sched(flr, opt)
    tsched = make_sched(torch.optim.lr_scheduler, topt)
    x, y = data(seed=1, n=512)
    batches = torch.randperm(512, generator=torch.Generator().manual_seed(2)).view(-1, 64)
    losses, tlosses = [], []
    for step in range(50):
        idx = batches[step % len(batches)]
        for m, o, s, out in ((model, opt, sched, losses), (ref, topt, tsched, tlosses)):
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x[idx]), y[idx])
            loss.backward()
            o.step()
            s.step()
            out.append(loss.item())
        assert opt.param_groups[0]["lr"] == topt.param_groups[0]["lr"]
        torch.testing.assert_close(losses[-1], tlosses[-1], **F32,
                                   msg=lambda m, step=step: f"step {step}: {m}")
    assert losses[-1] < losses[0]  # it trained
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- interop

def _shared_names():
    return list(interop.SHARED_OPTIMIZERS) if torch is not None else ["SGD"]


class _Embedding:
    """SparseAdam's setting: an embedding with sparse gradients, rows picked per batch."""

    def __init__(self, seed):
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(30, 6, sparse=True)

    def parameters(self):
        return self.emb.parameters()

    def loss(self, x, y):
        idx = (x[:, :4].abs() * 7).long() % 30
        return (self.emb(idx).sum(dim=1) - x[:, 4:10]).pow(2).mean()


class _Net:
    """An MLP (2-D weights only for Muon, which takes matrices only) and its loss."""

    def __init__(self, seed, name):
        self.model = mlp(seed, widths=(10, 16, 4))
        if name == "Muon":
            self.model = torch.nn.Sequential(torch.nn.Linear(10, 16, bias=False),
                                             torch.nn.Tanh(),
                                             torch.nn.Linear(16, 4, bias=False))

    def parameters(self):
        return self.model.parameters()

    def loss(self, x, y):
        return torch.nn.functional.cross_entropy(self.model(x), y)


def _train(net, opt, steps, x, y, sched=None):
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = net.loss(x, y)
            loss.backward()
            return loss
        opt.step(closure)
        if sched is not None:
            sched.step()


def _pair(name, seed=20):
    net = _Embedding(seed) if name == "SparseAdam" else _Net(seed, name)
    kwargs = DB[name].interop_kwargs
    return net, kwargs


@needs_torch
def test_every_fastopt_optimizer_with_a_torch_twin_is_shared():
    every = {**fastopt.OPTIMIZERS, **getattr(fastopt, "OTHER_OPTIMIZERS", {})}
    for name in every:
        assert (name in interop.SHARED_OPTIMIZERS) == hasattr(torch.optim, name), name


def assert_converted_exactly(a, v):
    """``a`` (NumPy side) holds exactly the values of ``v`` (torch side), in copies."""
    if isinstance(v, torch.Tensor):
        assert isinstance(a, np.ndarray) and a.dtype == v.numpy().dtype
        np.testing.assert_array_equal(a, v.numpy())
        assert not np.shares_memory(a, v.numpy())
    elif isinstance(v, (list, tuple)):  # LBFGS's histories
        assert type(a) is type(v) and len(a) == len(v)
        for x, y in zip(a, v):
            assert_converted_exactly(x, y)
    else:
        assert type(a) is type(v) and a == v


def _loading_into_fastopt(name):
    return list(_shared_names()) if name is None else name


@needs_torch
@pytest.mark.parametrize("name", _shared_names())
def test_torch_state_converts_exactly_and_round_trips_bitwise(name):
    model, kwargs = _pair(name)
    x, y = data(seed=3, n=64)
    topt = getattr(torch.optim, name)(model.parameters(), **kwargs)
    _train(model, topt, 4, x, y)
    tsd = topt.state_dict()
    sd = interop.state_dict_from_torch(tsd)
    # exact values, same dtypes and shapes, NumPy only, no shared memory
    for i, st in tsd["state"].items():
        assert sd["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert_converted_exactly(sd["state"][i][k], v)
    assert [g["params"] for g in sd["param_groups"]] == [g["params"]
                                                          for g in tsd["param_groups"]]
    # torch -> fastopt dict -> torch continues exactly as the uninterrupted torch run
    twin = copy.deepcopy(model)
    topt2 = getattr(torch.optim, name)(twin.parameters(), **kwargs)
    topt2.load_state_dict(interop.state_dict_to_torch(sd))
    _train(model, topt, 4, x, y)
    _train(twin, topt2, 4, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@needs_torch
@pytest.mark.parametrize("name", _loading_into_fastopt(None))
def test_fastopt_state_round_trips_through_torch_bitwise(name):
    model, kwargs = _pair(name)
    x, y = data(seed=4, n=64)
    opt = DB[name].cls(model.parameters(), **kwargs)
    _train(model, opt, 4, x, y)
    tsd = interop.state_dict_to_torch(opt.state_dict())
    for st in tsd["state"].values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                assert not any(np.shares_memory(v.numpy(), a)
                               for s in opt.state.values() for a in s.values()
                               if isinstance(a, np.ndarray))
        if isinstance(st.get("step"), torch.Tensor):  # SparseAdam keeps an int, as torch
            assert st["step"].dtype == torch.float32 and st["step"].dim() == 0
    back = interop.state_dict_from_torch(tsd)
    twin = copy.deepcopy(model)
    opt2 = DB[name].cls(twin.parameters())
    opt2.load_state_dict(back)
    assert opt2.param_groups[0] == {**opt.param_groups[0],
                                    "params": opt2.param_groups[0]["params"]}
    _train(model, opt, 4, x, y)
    _train(twin, opt2, 4, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def _moves():
    out = []
    for direction in ("torch->fastopt", "fastopt->torch"):
        for name in _shared_names():
            out.append(pytest.param(name, direction, id=f"{direction}-{name}"))
    return out


@needs_torch
@pytest.mark.parametrize(("name", "direction"), _moves())
def test_a_run_moves_between_libraries_and_continues(name, direction):
    """Train 5 steps with one library, convert, train 5 more with the other.

    The result must be as close to 10 steps with the first library as 10 steps with the
    second library are: the state carried over, and only the two libraries' rounding
    differences remain (1 ulp-level for most; LBFGS amplifies them, Muon's Newton-Schulz
    iteration runs in bfloat16). A lost or garbled state would be far off."""
    model, kwargs = _pair(name)
    ref = copy.deepcopy(model)
    other = copy.deepcopy(model)
    x, y = data(seed=5, n=64)
    first, second = direction.split("->")
    make = {"torch": lambda m: getattr(torch.optim, name)(m.parameters(), **kwargs),
            "fastopt": lambda m: DB[name].cls(m.parameters(), **kwargs)}
    opt = make[first](model)
    _train(model, opt, 5, x, y)
    moved = interop.from_torch(opt) if second == "fastopt" else interop.to_torch(opt)
    assert type(moved).__name__ == name
    assert isinstance(moved, fastopt.Optimizer if second == "fastopt" else torch.optim.Optimizer)
    assert moved.param_groups[0]["params"][0] is next(model.parameters())
    _train(model, moved, 5, x, y)
    _train(ref, make[first](ref), 10, x, y)
    _train(other, make[second](other), 10, x, y)
    libraries_apart = max((p - q).abs().max().item()
                          for p, q in zip(other.parameters(), ref.parameters()))
    tol = max(1e-6, 2 * libraries_apart)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=tol)


@needs_torch
def test_schedulers_move_with_their_optimizer():
    model, _ = _pair("SGD")
    ref = copy.deepcopy(model)
    x, y = data(seed=6, n=64)
    opt = fastopt.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = flr.OneCycleLR(opt, max_lr=0.5, total_steps=20)
    _train(model, opt, 8, x, y, sched)
    topt = interop.to_torch(opt)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=0.5, total_steps=20)
    # building a scheduler restarts the schedule in the groups: load the optimizer after it
    topt.load_state_dict(interop.state_dict_to_torch(opt.state_dict()))
    tsched.load_state_dict(interop.scheduler_state_to_torch(sched.state_dict()))
    assert "_scheduler_class" not in vars(tsched)
    assert topt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert topt.param_groups[0]["momentum"] == opt.param_groups[0]["momentum"]
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    rsched = torch.optim.lr_scheduler.OneCycleLR(ropt, max_lr=0.5, total_steps=20)
    _train(ref, ropt, 8, x, y, rsched)
    for _ in range(12):
        _train(model, topt, 1, x, y, tsched)
        _train(ref, ropt, 1, x, y, rsched)
        assert tsched.get_last_lr() == rsched.get_last_lr()
    # and back: torch's scheduler state drives a fastopt scheduler
    fopt = interop.from_torch(topt)
    back = flr.OneCycleLR(fopt, max_lr=0.5, total_steps=20)
    fopt.load_state_dict(interop.state_dict_from_torch(topt.state_dict()))
    back.load_state_dict(interop.scheduler_state_from_torch(tsched.state_dict()))
    assert back.get_last_lr() == tsched.get_last_lr() and back.last_epoch == 20
    assert fopt.param_groups[0]["lr"] == topt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32)


@needs_torch
def test_to_torch_wraps_numpy_parameters_sharing_memory():
    w = fastopt.Parameter(np.arange(4.0, dtype=np.float32))
    opt = fastopt.Adam([w], lr=0.1)
    w.grad = np.ones(4, np.float32)
    opt.step()
    topt = interop.to_torch(opt)
    t = topt.param_groups[0]["params"][0]
    assert isinstance(t, torch.Tensor) and t.requires_grad
    assert np.shares_memory(t.detach().numpy(), w)
    t.grad = torch.ones(4)
    topt.step()
    opt.step()  # w was moved by torch's step; fastopt continues from there
    assert topt.state[t]["step"].item() == 2.0 and opt.state[w]["step"] == 2.0


@needs_torch
def test_interop_rejects_what_it_cannot_convert():
    with pytest.raises(KeyError, match="param_groups"):
        interop.state_dict_from_torch({"state": {}})
    with pytest.raises(TypeError):
        interop.state_dict_to_torch([1, 2])
    p = torch.nn.Parameter(torch.zeros(2))

    class MySGD(torch.optim.SGD):
        pass

    with pytest.raises(ValueError, match="no counterpart of torch.optim.MySGD"):
        interop.from_torch(MySGD([p]))
    with pytest.raises(ValueError, match="torch.optim has no counterpart of fastopt.Lion"):
        interop.to_torch(fastopt.Lion([p]))


@needs_torch
def test_sparse_adam_takes_an_embeddings_sparse_grad():
    """Embedding(sparse=True) with fastopt.SparseAdam updating the tensor, vs torch."""
    net = _Embedding(7)
    ref = copy.deepcopy(net)
    x, y = data(seed=8, n=32)
    opt = fastopt.SparseAdam(net.parameters(), lr=0.05)
    topt = torch.optim.SparseAdam(ref.parameters(), lr=0.05)
    for _ in range(5):
        _train(net, opt, 1, x, y)
        _train(ref, topt, 1, x, y)
    assert opt.state[net.emb.weight]["step"] == 5
    torch.testing.assert_close(net.emb.weight, ref.emb.weight, **F32)
    assert not torch.equal(net.emb.weight, _Embedding(7).emb.weight)
