"""fastopt.torch.Muon: torch.optim.Muon stepping with fastopt.Muon's NumPy code.

Lockstep with torch.optim.Muon in float32 and float64 (the database's configurations, and a
model with a scheduler) within the tolerance of its bfloat16 Newton-Schulz iteration (see
tests/test_muon.py), the same bits as fastopt.Muon over the same tensors, a state of torch's
``momentum_buffer`` tensors updated in place, state dicts that move both ways and through
torch.save / torch.load(weights_only=True), bad state refused naming the key with nothing
changed, autograd version counters that move with a successful step only, ``ns_dtype`` on
the torch class, and torch's construction, errors, hooks and repr.
"""
import copy
import io
import pickle

import numpy as np
import pytest

import fastopt
from helpers import torch_batch, torch_mlp
from optim_db import CONSTRUCTION, error_configs, inputs_of

torch = pytest.importorskip("torch", reason="fastopt.torch needs torch")
import fastopt.torch as ft  # noqa: E402

#: as tests/test_muon.py: one step's update within 3 % of the RMS of torch's, the parameters
#: within 1.2e-3 after 100 steps (fastopt's bfloat16 matrix products sum in another order
#: than torch's and round differently for a few elements in ten thousand)
UPDATE_TOL = 0.03
PARAM_ATOL = 1.2e-3
SHAPES = ((64, 32), (16, 48), (5, 9))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """torch's bfloat16 matrix products sum in an order that may depend on its threads: one
    thread, as in tests/test_muon.py's runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tensors(dtype=torch.float32, shapes=SHAPES, seed=4):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(s) for s in shapes]
    return ([torch.tensor(x, dtype=dtype, requires_grad=True) for x in xs],
            [torch.tensor(x, dtype=dtype, requires_grad=True) for x in xs])


def _groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.01}]


def _grads(runs, k):
    """The same gradients, made from the first run's parameters, for every run's."""
    rng = np.random.default_rng(100 + k)
    for ps in runs[1:]:
        assert len(ps) == len(runs[0])
    for i, p in enumerate(runs[0]):
        g = torch.from_numpy(rng.standard_normal(tuple(p.shape))).to(p.dtype) + p.detach()
        for ps in runs:
            ps[i].grad = g.clone()


def _model(dtype=torch.float32):
    return torch_mlp(dtype, bias=False)  # Muon takes matrices only


_data = torch_batch


def _loss_step(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss
    return opt.step(closure).item()


def _snapshot(opt, params, exact=True):
    """The parameters, their state and the groups' values, bit for bit; with ``exact`` also
    the version counters and the identity of every state tensor."""
    def frozen(v):
        if isinstance(v, torch.Tensor):
            plain = v.device.type == "cpu" and v.layout is torch.strided
            out = (v.dtype, tuple(v.shape), v.layout, v.device,
                   v.detach().numpy().tobytes() if plain else None)
            return out + (id(v),) if exact else out
        return v
    return ([p.detach().numpy().tobytes() for p in params],
            [p._version for p in params] if exact else None,
            {i: {k: frozen(v) for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if p in opt.state},
            repr([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))


def _assert_close_updates(ps, ts, before, tbefore, k):
    for i, (p, t, b, tb) in enumerate(zip(ps, ts, before, tbefore)):
        du, dt = (p - b).detach(), (t - tb).detach()
        rms = dt.pow(2).mean().sqrt()
        assert (du - dt).pow(2).mean().sqrt() <= UPDATE_TOL * rms, (k, i)


# ---- lockstep with torch ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("inp", inputs_of("Muon"))
def test_lockstep_with_torch(inp, dtype):
    """Two groups (the second with its own lr), 100 steps on the same gradients: each update
    within 3 % of torch's, the parameters within 1.2e-3 at the end, the momentum buffers
    torch's bit for bit (one rounding per lerp, as torch's), the state of torch's keys,
    dtypes and shapes, and the groups torch's."""
    ps, ts = _tensors(dtype)
    opt = ft.Muon(_groups(ps), **inp.kwargs)
    topt = torch.optim.Muon(_groups(ts), **inp.kwargs)
    for k in range(100):
        _grads([ps, ts], k)
        before = [p.detach().clone() for p in ps]
        tbefore = [t.detach().clone() for t in ts]
        opt.step()
        topt.step()
        _assert_close_updates(ps, ts, before, tbefore, k)
    for p, t in zip(ps, ts):
        torch.testing.assert_close(p, t, rtol=0, atol=PARAM_ATOL)
        assert list(opt.state[p]) == list(topt.state[t]) == ["momentum_buffer"]
        mine, theirs = opt.state[p]["momentum_buffer"], topt.state[t]["momentum_buffer"]
        assert isinstance(mine, torch.Tensor) and mine.dtype == theirs.dtype == dtype
        assert torch.equal(mine, theirs)
    assert opt.state_dict()["param_groups"] == topt.state_dict()["param_groups"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lockstep_with_torch_on_a_model_and_a_scheduler(dtype):
    """An MLP's weights, their autograd gradients, torch's StepLR on both: 30 steps, the
    parameters within 1.2e-3 of torch's after every step."""
    model = _model(dtype)
    ref = copy.deepcopy(model)
    opt = ft.Muon(model.parameters(), lr=0.02)
    topt = torch.optim.Muon(ref.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=5, gamma=0.5)
    x, y = _data(dtype)
    for k in range(30):
        assert _loss_step(model, opt, x, y) == pytest.approx(_loss_step(ref, topt, x, y),
                                                             rel=1e-3)
        sched.step()
        tsched.step()
        assert sched.get_last_lr() == tsched.get_last_lr()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=PARAM_ATOL,
                                       msg=lambda m, k=k: f"step {k}: {m}")


@pytest.mark.parametrize("ns_dtype", [None, "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_same_bits_as_fastopt_muon_over_the_same_tensors(dtype, ns_dtype):
    """fastopt.torch.Muon runs fastopt.Muon's code: the same bits in the parameters and the
    momentum buffers, with each ``ns_dtype`` set on both (None: the default, bfloat16)."""
    ps, qs = _tensors(dtype)
    kwargs = {"lr": 0.02, "weight_decay": 0.05}
    opt, nopt = ft.Muon(_groups(ps), **kwargs), fastopt.Muon(_groups(qs), **kwargs)
    if ns_dtype is not None:
        opt.ns_dtype = nopt.ns_dtype = ns_dtype
    assert opt.ns_dtype == nopt.ns_dtype == (ns_dtype or "bfloat16")
    for k in range(5):
        _grads([ps, qs], k)
        opt.step()
        nopt.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert (opt.state[p]["momentum_buffer"].numpy().tobytes()
                == np.asarray(nopt.state[q]["momentum_buffer"]).tobytes())


def test_ns_dtype_is_the_iterations_precision_checked_and_kept_by_copies():
    """``ns_dtype`` is an attribute, not a group key or a constructor argument (torch's
    signature, defaults, groups and state dicts): "float32" steps otherwise than the
    default, a bad value is refused by the step before anything changes, and deepcopy and
    pickling keep it; a copy then steps as the original."""
    ps, qs = _tensors()
    opt, other = ft.Muon(ps, lr=0.02), ft.Muon(qs, lr=0.02)
    assert opt.ns_dtype == "bfloat16"
    other.ns_dtype = "float32"
    _grads([ps, qs], 0)
    opt.step()
    other.step()
    assert not torch.equal(ps[0], qs[0])
    assert "ns_dtype" not in other.defaults and "ns_dtype" not in other.param_groups[0]
    assert "ns_dtype" not in other.state_dict()["param_groups"][0]
    other.ns_dtype = "float16"
    _grads([qs], 1)
    before = _snapshot(other, qs)
    with pytest.raises(ValueError, match="ns_dtype must be one of"):
        other.step()
    assert _snapshot(other, qs) == before
    other.ns_dtype = "float32"
    for copied in (copy.deepcopy(other), pickle.loads(pickle.dumps(other))):
        assert type(copied) is ft.Muon and copied.ns_dtype == "float32"
        cps = [p for g in copied.param_groups for p in g["params"]]
        twin = copy.deepcopy(other)
        tps = [p for g in twin.param_groups for p in g["params"]]
        for a, b in zip(cps, tps):
            a.grad = torch.ones_like(a)
            b.grad = torch.ones_like(b)
        copied.step()
        twin.step()
        assert all(torch.equal(a, b) for a, b in zip(cps, tps))


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_a_copy_made_before_any_step_steps(name):
    """torch's ``__setstate__`` adds ``differentiable=False`` to the defaults of a copy or an
    unpickled optimizer; the groups of these classes have no such key, and their step must
    not look for it (it raised KeyError)."""
    p = torch.randn(4, 3, requires_grad=True)
    opt = getattr(ft, name)([p], lr=0.02)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        q = copied.param_groups[0]["params"][0]
        q.grad = torch.ones_like(q)
        r = p.detach().clone().requires_grad_()
        ref = getattr(ft, name)([r], lr=0.02)
        r.grad = torch.ones_like(r)
        copied.step()
        ref.step()
        assert torch.equal(q, r)
        assert copied.defaults["differentiable"] is False  # torch's, as on torch's classes


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_a_complex_parameter_without_a_gradient_is_left_alone_as_torch(name):
    """torch's step skips a parameter without a gradient, a complex one included (its step
    refuses complex parameters that have one); the step used to read every parameter's
    tensor first and refused the complex one."""
    x = torch.randn(3, 4)
    runs = []
    for cls in (getattr(ft, name), getattr(torch.optim, name)):
        ps = [x.clone().requires_grad_(),
              torch.ones(3, 4, dtype=torch.complex64, requires_grad=True)]
        opt = cls(ps, lr=0.02)
        for k in range(3):
            ps[0].grad = torch.full((3, 4), 0.5) + k
            opt.step()
        runs.append((opt, ps))
    (opt, ps), (topt, ts) = runs
    torch.testing.assert_close(ps[0], ts[0], rtol=0, atol=PARAM_ATOL)
    assert torch.equal(ps[1], ts[1]) and ps[1]._version == 0
    assert ps[1] not in opt.state and list(opt.state[ps[0]]) == list(topt.state[ts[0]])


def test_momentum_buffers_are_updated_in_place():
    ps, _ = _tensors()
    opt = ft.Muon(ps, lr=0.02)
    _grads([ps], 0)
    opt.step()
    tensors = {i: (opt.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"].data_ptr(),
                   opt.state[p]["momentum_buffer"].clone()) for i, p in enumerate(ps)}
    _grads([ps], 1)
    opt.step()
    for i, p in enumerate(ps):
        buf, ptr, before = tensors[i]
        assert opt.state[p]["momentum_buffer"] is buf and buf.data_ptr() == ptr
        assert not torch.equal(buf, before)


# ---- state dicts ----------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
def test_state_dict_moves_between_torch_and_fastopt_torch(direction):
    """A run started by one library continues in the other, in lockstep with torch alone:
    the moved momentum buffers are torch's bit for bit, and stay so (the same gradients)."""
    first, second = ((torch.optim.Muon, ft.Muon) if direction == "torch->fastopt"
                     else (ft.Muon, torch.optim.Muon))
    ps, ts = _tensors()
    opt, topt = first(_groups(ps), lr=0.02), torch.optim.Muon(_groups(ts), lr=0.02)
    for k in range(4):
        _grads([ps, ts], k)
        opt.step()
        topt.step()
    qs = [p.detach().clone().requires_grad_() for p in ps]
    moved = second(_groups(qs), lr=0.02)
    moved.load_state_dict(opt.state_dict())
    for q, t in zip(qs, ts):
        assert torch.equal(moved.state[q]["momentum_buffer"], topt.state[t]["momentum_buffer"])
    for k in range(4, 8):
        _grads([qs, ts], k)
        moved.step()
        topt.step()
    for q, t in zip(qs, ts):
        torch.testing.assert_close(q, t, rtol=0, atol=PARAM_ATOL)
        assert torch.equal(moved.state[q]["momentum_buffer"], topt.state[t]["momentum_buffer"])
    assert moved.state_dict()["param_groups"] == topt.state_dict()["param_groups"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_torch_save_and_weights_only_load_round_trip(dtype):
    """The state dict goes through torch.save and torch.load(weights_only=True); the loaded
    optimizer has the same state (types and bits) and continues bit for bit."""
    ps, _ = _tensors(dtype)
    opt = ft.Muon(_groups(ps), lr=0.02)
    for k in range(3):
        _grads([ps], k)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    other = ft.Muon(_groups(qs), lr=0.02)
    other.load_state_dict(loaded)
    assert _snapshot(other, qs, exact=False) == _snapshot(opt, ps, exact=False)
    for k in range(3, 6):
        _grads([ps, qs], k)
        opt.step()
        other.step()
    assert _snapshot(other, qs, exact=False) == _snapshot(opt, ps, exact=False)


def test_numpy_fastopt_state_dicts_load_both_ways():
    """A state dict of fastopt.Muon (arrays) loads as tensors, and one of fastopt.torch.Muon
    loads into fastopt.Muon; both continue bit for bit as the run that never moved."""
    ps, rs = _tensors()
    nopt = fastopt.Muon(_groups(ps), lr=0.02)
    ropt = ft.Muon(_groups(rs), lr=0.02)
    for k in range(2):
        _grads([ps, rs], k)
        nopt.step()
        ropt.step()
    assert isinstance(nopt.state_dict()["state"][0]["momentum_buffer"], np.ndarray)
    opt = ft.Muon(_groups(ps), lr=0.02)
    opt.load_state_dict(nopt.state_dict())
    assert all(isinstance(st["momentum_buffer"], torch.Tensor) for st in opt.state.values())
    for k in range(2, 4):
        _grads([ps, rs], k)
        opt.step()
        ropt.step()
    back = fastopt.Muon(_groups(ps), lr=0.02)
    back.load_state_dict(opt.state_dict())
    for k in range(4, 6):
        _grads([ps, rs], k)
        back.step()
        ropt.step()
    assert all(torch.equal(p, r) for p, r in zip(ps, rs))


def test_a_state_without_momentum_buffer_loads_and_steps_as_torch():
    """torch makes a missing buffer at the next step: so does fastopt.torch."""
    ps, ts = _tensors()
    opt, topt = ft.Muon(_groups(ps), lr=0.02), torch.optim.Muon(_groups(ts), lr=0.02)
    _grads([ps, ts], 0)
    opt.step()
    topt.step()
    sd, tsd = copy.deepcopy(opt.state_dict()), copy.deepcopy(topt.state_dict())
    del sd["state"][1]["momentum_buffer"], tsd["state"][1]["momentum_buffer"]
    opt.load_state_dict(sd)
    topt.load_state_dict(tsd)
    _grads([ps, ts], 1)
    opt.step()
    topt.step()
    for p, t in zip(ps, ts):
        assert torch.equal(opt.state[p]["momentum_buffer"], topt.state[t]["momentum_buffer"])


def _saved():
    ps, _ = _tensors()
    opt = ft.Muon(_groups(ps), lr=0.02)
    _grads([ps], 0)
    opt.step()
    return opt, ps


@pytest.mark.parametrize("index, value, exc, match", [
    (1, torch.zeros(48, 16), ValueError, r"state\['momentum_buffer'\] has shape \(48, 16\)"),
    (2, torch.zeros(5, 9, dtype=torch.complex64), TypeError,
     r"state\['momentum_buffer'\] has dtype complex64"),
    (0, "x", ValueError, r"state\['momentum_buffer'\] must be a writable float32 array"),
    (2, None, ValueError, r"state\['momentum_buffer'\] must be a writable float32 array"),
    (1, torch.zeros(16, 48).to_sparse(), TypeError,
     r"state\['momentum_buffer'\] is a tensor with layout torch.sparse_coo"),
    (2, torch.zeros(5, 9, device="meta"), TypeError,
     r"state\['momentum_buffer'\] is a tensor on the meta device")])
def test_bad_state_dict_is_refused_naming_the_key_and_changes_nothing(index, value, exc, match):
    opt, ps = _saved()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][index]["momentum_buffer"] = value
    before = _snapshot(opt, ps)
    with pytest.raises(exc, match=match) as info:
        opt.load_state_dict(sd)
    assert f"param_groups[{index // 2}]['params'][{index % 2}] (saved id {index})" in str(
        info.value)
    assert _snapshot(opt, ps) == before


@pytest.mark.parametrize("key, value, exc, match", [
    ("lr", "x", TypeError, r"loaded param_groups\[1\]: lr must be a real number"),
    ("ns_coefficients", (1.0, "b", 2.0), TypeError,
     r"loaded param_groups\[1\]: ns_coefficients\[1\]"),
    ("momentum", float("nan"), ValueError, r"param_groups\[1\].*momentum")])
def test_bad_group_in_a_state_dict_is_refused_and_changes_nothing(key, value, exc, match):
    opt, ps = _saved()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][1][key] = value
    before = _snapshot(opt, ps)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert _snapshot(opt, ps) == before


@pytest.mark.parametrize("value, exc, match", [
    (torch.zeros(9, 5), ValueError,
     r"state\['momentum_buffer'\] must be a writable float32 array of shape \(5, 9\)"),
    (torch.zeros(5, 9, dtype=torch.float64), ValueError,
     r"state\['momentum_buffer'\] must be a writable float32"),
    (torch.zeros(5, 9, device="meta"), TypeError,
     r"state\['momentum_buffer'\]: expected a dense CPU tensor"),
    (torch.zeros(5, 9).to_sparse(), TypeError,
     r"state\['momentum_buffer'\]: expected a dense CPU tensor")])
def test_bad_state_at_a_step_is_refused_naming_the_key_and_changes_nothing(value, exc, match):
    """The last parameter's state is bad: the step raises naming it before the first
    parameter changes (its version counter included)."""
    opt, ps = _saved()
    opt.state[ps[-1]]["momentum_buffer"] = value
    _grads([ps], 1)
    before = _snapshot(opt, ps)
    with pytest.raises(exc, match=r"param_groups\[1\]\['params'\]\[0\]: " + match):
        opt.step()
    assert _snapshot(opt, ps) == before


def test_a_transposed_momentum_buffer_steps_in_place_as_a_contiguous_one():
    """A buffer set by hand in another layout (a transposed view) is updated in place with
    the same numbers."""
    ps, qs = _tensors(shapes=((6, 4),))
    opt, ref = ft.Muon(ps, lr=0.02), ft.Muon(qs, lr=0.02)
    _grads([ps, qs], 0)
    opt.step()
    ref.step()
    buf = opt.state[ps[0]]["momentum_buffer"].t().contiguous().t()
    assert not buf.is_contiguous() and torch.equal(buf, ref.state[qs[0]]["momentum_buffer"])
    opt.state[ps[0]]["momentum_buffer"] = buf
    _grads([ps, qs], 1)
    opt.step()
    ref.step()
    assert opt.state[ps[0]]["momentum_buffer"] is buf
    assert torch.equal(buf, ref.state[qs[0]]["momentum_buffer"])
    assert torch.equal(ps[0], qs[0])


# ---- version counters ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["shape", "sparse", "complex", "ns_dtype", "no columns"])
def test_version_counters_move_with_a_successful_step_only(bad):
    """A step that raises on the last parameter (its gradient, its dtype, the iteration's
    precision, an empty matrix) leaves every parameter, its version counter and the state as
    they were (and creates no state); a successful step bumps each updated parameter's
    counter once."""
    ps = [torch.linspace(-1, 1, 12).reshape(3, 4).requires_grad_() for _ in range(2)]
    last = {"complex": torch.ones(3, 4, dtype=torch.complex64, requires_grad=True),
            "no columns": torch.ones(3, 0, requires_grad=True)}.get(
                bad, torch.linspace(-1, 1, 12).reshape(3, 4).requires_grad_())
    opt = ft.Muon([{"params": ps}, {"params": [last]}], lr=0.05)

    def grads(broken):
        for p in ps + [last]:
            p.grad = torch.full(p.shape, 0.5, dtype=p.dtype)
        if broken and bad == "shape":  # torch checks only an assignment to .grad
            last.grad.data = torch.ones(4, 3)
        if broken and bad == "sparse":
            last.grad = torch.ones(3, 4).to_sparse()
        opt.ns_dtype = "half" if broken and bad == "ns_dtype" else "bfloat16"

    grads(True)
    versions = [p._version for p in ps + [last]]
    values = [p.detach().clone() for p in ps + [last]]
    match = ("ns_dtype must be one of" if bad == "ns_dtype"
             else r"param_groups\[1\]\['params'\]\[0\]")
    with pytest.raises((ValueError, RuntimeError), match=match):
        opt.step()
    assert [p._version for p in ps + [last]] == versions and len(opt.state) == 0
    assert all(torch.equal(p, v) for p, v in zip(ps + [last], values))
    if bad in ("complex", "no columns"):
        last.grad = None  # steps without it
        for p in ps:
            p.grad = torch.full(p.shape, 0.5)
    else:
        grads(False)
    opt.step()
    moved = ps if bad in ("complex", "no columns") else ps + [last]
    assert [p._version for p in moved] == [v + 1 for v in versions[:len(moved)]]
    assert not any(torch.equal(p, v) for p, v in zip(moved, values))


def test_a_graph_saved_before_a_step_fails_loudly_after_it():
    model = _model()
    x, y = _data()
    opt = ft.Muon(model.parameters(), lr=0.02)
    stale = (model(x) - y).pow(2).mean()
    _loss_step(model, opt, x, y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


@pytest.mark.parametrize("fn, works", [(None, False), ("original", False),
                                       ("match_rms_adamw", True)])
def test_a_matrix_without_columns_steps_as_torch_or_raises_first(fn, works):
    """torch steps a matrix with no columns unless its lr adjustment divides by the column
    count (ZeroDivisionError, after updating the parameters before it): there fastopt.torch
    raises ValueError naming it before anything changes."""
    x = torch.randn(3, 4)
    ps = [x.clone().requires_grad_(), torch.ones(4, 0, requires_grad=True)]
    ts = [x.clone().requires_grad_(), torch.ones(4, 0, requires_grad=True)]
    for p in ps + ts:
        p.grad = torch.ones_like(p)
    opt = ft.Muon(ps, lr=0.02, adjust_lr_fn=fn)
    topt = torch.optim.Muon(ts, lr=0.02, adjust_lr_fn=fn)
    if works:
        opt.step()
        topt.step()
        torch.testing.assert_close(ps[0], ts[0], rtol=0, atol=PARAM_ATOL)
        assert opt.state[ps[1]]["momentum_buffer"].shape == (4, 0)
        return
    with pytest.raises(ZeroDivisionError):
        topt.step()
    before = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]: .*no columns"):
        opt.step()
    assert _snapshot(opt, ps) == before


# ---- torch's own parts ------------------------------------------------------------------------

def test_hooks_repr_defaults_zero_grad_and_class_are_torchs():
    model = _model()
    opt = ft.Muon(model.parameters(), lr=0.02, adjust_lr_fn="match_rms_adamw")
    twin = torch.optim.Muon(copy.deepcopy(model).parameters(), lr=0.02,
                            adjust_lr_fn="match_rms_adamw")
    assert isinstance(opt, torch.optim.Muon) and "Muon" in ft.__all__
    assert repr(opt) == repr(twin)
    assert opt.defaults == twin.defaults
    assert opt.state_dict() == twin.state_dict()
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load"))
    x, y = _data()
    _loss_step(model, opt, x, y)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd", "load"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("info,err", error_configs(where=lambda info: info.name == "Muon"))
def test_invalid_configurations_raise_as_torch(info, err):
    assert err.phase == CONSTRUCTION
    p = torch.zeros(info.param_shape, requires_grad=True)
    with pytest.raises(err.error_type, match=err.error_regex):
        torch.optim.Muon([p], **err.kwargs)
    with pytest.raises(err.error_type, match=err.error_regex):
        ft.Muon([p], **err.kwargs)


def test_construction_refuses_what_torch_and_fastopt_torch_refuse():
    """torch's: parameters that are not matrices (its text); fastopt.torch's: dtypes and
    layouts its NumPy code does not step, naming the parameter, with no group added."""
    vector = torch.zeros(3, requires_grad=True)
    for cls in (torch.optim.Muon, ft.Muon):
        with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
            cls([torch.zeros(2, 2, requires_grad=True), vector])
    half = torch.zeros(2, 2, dtype=torch.float16, requires_grad=True)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\].*float16"):
        ft.Muon([torch.zeros(2, 2, requires_grad=True), half])
    opt = ft.Muon([torch.zeros(2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*contiguous"):
        opt.add_param_group({"params": [torch.zeros(4, 3)[:, ::2].requires_grad_()]})
    assert len(opt.param_groups) == 1


def test_a_second_concurrent_step_raises():
    p = torch.randn(3, 4, requires_grad=True)
    opt = ft.Muon([p], lr=0.02)
    seen = []

    def closure():
        try:
            opt.step()
        except RuntimeError as e:
            seen.append(str(e))
        p.grad = torch.ones_like(p)
        return torch.tensor(1.0)

    opt.step(closure)
    assert seen and "another step" in seen[0]
    p.grad = torch.ones_like(p)
    opt.step()  # the guard was released
