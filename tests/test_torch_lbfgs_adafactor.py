"""fastopt.torch.LBFGS and fastopt.torch.Adafactor: torch.optim's classes stepping with
fastopt's NumPy code.

Lockstep with torch.optim in float32 and float64 (the database's configurations, and a small
model), a state of torch's keys and types, state dicts that move both ways and through
torch.save / torch.load(weights_only=True), LBFGS with a tensor lr, bad state refused naming
the key with nothing changed, LBFGS closure errors undone, and autograd version counters that
move with a successful step only (for fastopt's NumPy optimizers given tensors too).
"""
import copy
import io

import numpy as np
import pytest

import fastopt
from helpers import F32_TRAINED, rosenbrock, torch_batch, torch_mlp
from optim_db import CONSTRUCTION, error_configs, inputs_of

torch = pytest.importorskip("torch", reason="fastopt.torch needs torch")
import fastopt.torch as ft  # noqa: E402

F32 = {"rtol": 1.3e-6, "atol": 1e-5}  # torch.testing's float32 defaults
F64 = {"rtol": 1e-7, "atol": 1e-7}
#: LBFGS's history, ro = 1 / (y . s) above all, takes the relative error of a difference of
#: gradients: compared relatively (in float32 after three strong-Wolfe steps on torch's
#: reductions, whose CPU-dependent order moves the coefficients al by up to 0.2 %)
HISTORY = {torch.float32: {"rtol": 5e-3, "atol": 1e-5}, torch.float64: {"rtol": 1e-5,
                                                                        "atol": 1e-9}}
NAMES = ["LBFGS", "Adafactor"]


_model = torch_mlp
_data = torch_batch


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss
    return closure


def _step(model, opt, x, y):
    """One step on the model's loss (the closure is what LBFGS needs; Adafactor takes it too)."""
    return opt.step(_closure(model, opt, x, y)).item()


def _rosen(params):
    """A closure of the Rosenbrock function of the parameters' elements, written as numbers
    into their ``.grad``."""
    def closure():
        x = np.concatenate([p.detach().numpy().ravel() for p in params])
        f, g = rosenbrock(x)
        off = 0
        for p in params:
            p.grad = torch.from_numpy(g[off:off + p.numel()].reshape(p.shape).copy())
            off += p.numel()
        return torch.tensor(f)
    return closure


def _assert_state_like(ours, theirs, tol, path="state"):
    """``ours`` has the structure and types of torch's ``theirs`` (tensors of the same dtype
    and shape, lists, ints, floats, None) and values within ``tol``."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and sorted(ours) == sorted(theirs), path
        for key in theirs:
            _assert_state_like(ours[key], theirs[key], tol, f"{path}[{key!r}]")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_state_like(a, b, tol, f"{path}[{i}]")
    elif isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), (path, type(ours))
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (
            path, ours.dtype, ours.shape, theirs.dtype, theirs.shape)
        torch.testing.assert_close(ours, theirs, **tol, msg=lambda m: f"{path}: {m}")
    elif theirs is None:
        assert ours is None, path
    else:
        assert type(ours) is type(theirs), (path, type(ours), type(theirs))
        if isinstance(theirs, int):
            assert ours == theirs, path
        else:
            assert ours == pytest.approx(theirs, rel=tol["rtol"], abs=tol["atol"]), path


def _frozen(value, ids):
    if isinstance(value, torch.Tensor):
        out = (value.dtype, tuple(value.shape), value.device,
               value.detach().numpy().tobytes() if value.device.type == "cpu" else None)
        return out + (id(value),) if ids else out
    if isinstance(value, list):
        return [_frozen(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _frozen(v, ids) for k, v in value.items()}
    return value


def _snapshot(opt, params, exact=True):
    """Everything a step could change, bit for bit: the parameters, the state and the
    groups' values; with ``exact`` also the parameters' version counters and the identity of
    every state dict and tensor (False: to compare two runs)."""
    state = {i: (_frozen(opt.state[p], exact), id(opt.state[p]) if exact else None)
             for i, p in enumerate(params) if p in opt.state}
    return ([p.detach().numpy().tobytes() for p in params],
            [p._version for p in params] if exact else None,
            state, repr([{k: v for k, v in g.items() if k != "params"}
                         for g in opt.param_groups]))


# ---- lockstep with torch ----------------------------------------------------------------------

@pytest.mark.parametrize("inp", inputs_of("LBFGS"))
def test_lbfgs_lockstep_with_torch_on_rosenbrock(inp):
    """The database's configurations (float64, and one float32): equal ``func_evals`` and
    ``n_iter`` after every step, the iterates and the state within 1e-9 (float64) and
    torch's float32 tolerance, the state of torch's types."""
    dtype = getattr(torch, inp.setup["dtype"])
    x0 = torch.tensor(inp.setup["x0"], dtype=dtype)
    p, t = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    opt, topt = ft.LBFGS([p], **inp.kwargs), torch.optim.LBFGS([t], **inp.kwargs)
    tol = F32 if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    for k in range(inp.setup["calls"]):
        l1, l2 = opt.step(_rosen([p])), topt.step(_rosen([t]))
        assert float(l1) == pytest.approx(float(l2), rel=tol["rtol"], abs=tol["atol"]), k
        s1, s2 = opt.state[p], topt.state[t]
        assert (s1["func_evals"], s1["n_iter"]) == (s2["func_evals"], s2["n_iter"]), k
        torch.testing.assert_close(p, t, **tol, msg=lambda m, k=k: f"step {k}: {m}")
    _assert_state_like(opt.state[p], topt.state[t], HISTORY[dtype])


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lbfgs_lockstep_with_torch_on_a_model(dtype, line_search_fn):
    """Four parameters (an MLP), a real autograd closure; float32 for 3 steps (L-BFGS on a
    non-convex loss amplifies last-bit differences from there on), float64 for 8."""
    model = _model(dtype)
    ref = copy.deepcopy(model)
    kwargs = dict(lr=0.1, max_iter=5, history_size=5, line_search_fn=line_search_fn)
    opt, topt = ft.LBFGS(model.parameters(), **kwargs), torch.optim.LBFGS(ref.parameters(),
                                                                          **kwargs)
    x, y = _data(dtype)
    tol = F32_TRAINED if dtype == torch.float32 else F64
    for k in range(3 if dtype == torch.float32 else 8):
        assert _step(model, opt, x, y) == pytest.approx(_step(ref, topt, x, y), rel=1e-5)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **tol, msg=lambda m, k=k: f"step {k}: {m}")
    first, tfirst = next(model.parameters()), next(ref.parameters())
    _assert_state_like(opt.state[first], topt.state[tfirst], HISTORY[dtype])
    assert opt.state_dict()["param_groups"] == topt.state_dict()["param_groups"]


def _adafactor_tensors(dtype, seed=5):
    rng = np.random.default_rng(seed)
    shapes = [(1029,), (7, 5), (3, 4, 6), (1, 9)]
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return ([torch.tensor(x, requires_grad=True) for x in xs],
            [torch.tensor(x, requires_grad=True) for x in xs])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("inp", inputs_of("Adafactor"))
def test_adafactor_lockstep_with_torch(inp, dtype):
    """Vector, matrix and 3-D parameters in two groups, 40 steps, the parameters within
    torch's float32 tolerance (1e-12 in float64) after every step; the state has torch's
    keys, dtypes and shapes and its values."""
    ps, ts = _adafactor_tensors(dtype)
    groups = lambda xs: [{"params": xs[:2]}, {"params": xs[2:], "lr": 0.03}]  # noqa: E731
    opt = ft.Adafactor(groups(ps), **inp.kwargs)
    topt = torch.optim.Adafactor(groups(ts), **inp.kwargs)
    tol = F32 if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    rng = np.random.default_rng(7)
    for k in range(40):
        for p, t in zip(ps, ts):
            g = (rng.standard_normal(p.shape) + 0.5 * p.detach().numpy()).astype(dtype)
            p.grad, t.grad = torch.from_numpy(g), torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        for p, t in zip(ps, ts):
            torch.testing.assert_close(p, t, **tol, msg=lambda m, k=k: f"step {k}: {m}")
    for p, t in zip(ps, ts):
        assert list(opt.state[p]) == list(topt.state[t])
        _assert_state_like(opt.state[p], topt.state[t], {"rtol": 1e-4, "atol": 1e-7})
    assert opt.state_dict()["param_groups"] == topt.state_dict()["param_groups"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_adafactor_lockstep_with_torch_on_a_model_and_a_scheduler(dtype):
    model = _model(dtype)
    ref = copy.deepcopy(model)
    opt = ft.Adafactor(model.parameters(), lr=0.05, weight_decay=0.1)
    topt = torch.optim.Adafactor(ref.parameters(), lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=5, gamma=0.5)
    x, y = _data(dtype)
    tol = F32 if dtype == torch.float32 else F64
    for k in range(20):
        _step(model, opt, x, y)
        _step(ref, topt, x, y)
        sched.step()
        tsched.step()
        assert sched.get_last_lr() == tsched.get_last_lr()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **tol, msg=lambda m, k=k: f"step {k}: {m}")


def test_state_tensors_are_updated_in_place_or_kept():
    """Adafactor's state tensors are the NumPy code's arrays: the same tensors, written in
    place. LBFGS's history entries a step keeps are the very tensors they were."""
    model = _model()
    opt = ft.Adafactor(model.parameters(), lr=0.05)
    x, y = _data()
    _step(model, opt, x, y)
    p = next(model.parameters())
    tensors = {k: (v, v.data_ptr(), v.clone()) for k, v in opt.state[p].items()}
    _step(model, opt, x, y)
    for key, (t, ptr, before) in tensors.items():
        assert opt.state[p][key] is t and t.data_ptr() == ptr, key
        assert not torch.equal(t, before), key
    assert opt.state[p]["step"].item() == 2.0
    lopt = ft.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    _step(model, lopt, x, y)
    st = lopt.state[p]
    kept = {k: list(st[k]) for k in ("old_dirs", "old_stps", "ro")}
    n = len(kept["old_dirs"])
    assert n >= 1
    _step(model, lopt, x, y)
    for key, items in kept.items():
        assert len(st[key]) > n and all(a is b for a, b in zip(st[key], items)), key


@pytest.mark.parametrize("name", NAMES)
def test_same_bits_as_the_numpy_optimizer_over_the_same_tensors(name):
    """fastopt.torch.X runs fastopt.X's code: the same bits, parameters and state."""
    model = _model(torch.float64 if name == "LBFGS" else torch.float32)
    twin = copy.deepcopy(model)
    kwargs = {"lr": 0.2, "max_iter": 4, "history_size": 3,
              "line_search_fn": "strong_wolfe"} if name == "LBFGS" else {"lr": 0.05}
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    nopt = getattr(fastopt, name)(twin.parameters(), **kwargs)
    x, y = _data(next(model.parameters()).dtype)
    for _ in range(5):
        assert _step(model, opt, x, y) == _step(twin, nopt, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert sorted(opt.state.get(p, {})) == sorted(nopt.state.get(q, {}))
        for key, value in nopt.state.get(q, {}).items():
            mine = opt.state[p][key]
            if isinstance(value, list):
                assert [None if v is None else np.asarray(v).tobytes() for v in value] == [
                    None if v is None else v.numpy().tobytes() for v in mine], key
            else:
                assert np.asarray(value).tobytes() == (
                    mine.numpy().tobytes() if isinstance(mine, torch.Tensor)
                    else np.asarray(mine).tobytes()), key


# ---- state dicts ----------------------------------------------------------------------------

def _lbfgs_run(cls, dtype=torch.float64):
    x0 = torch.tensor([-1.5, 2.0, -0.5, 1.2, 0.3], dtype=dtype)
    p = x0.clone().requires_grad_()
    return p, cls([p], lr=0.05, history_size=7, max_iter=6)


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
def test_lbfgs_state_dict_moves_between_torch_and_fastopt_torch(direction):
    """A run started by one library continues in the other, in lockstep with torch alone
    (the history, ``t``, ``H_diag``, ``ro`` and ``al`` of each library work in the other)."""
    first, second = ((torch.optim.LBFGS, ft.LBFGS) if direction == "torch->fastopt"
                     else (ft.LBFGS, torch.optim.LBFGS))
    p, opt = _lbfgs_run(first)
    t, topt = _lbfgs_run(torch.optim.LBFGS)
    for _ in range(3):
        opt.step(_rosen([p]))
        topt.step(_rosen([t]))
    q = p.detach().clone().requires_grad_()
    moved = second([q], lr=0.05, history_size=7, max_iter=6)
    moved.load_state_dict(opt.state_dict())
    _assert_state_like(moved.state[q], topt.state[t], HISTORY[torch.float64])
    for k in range(4):
        moved.step(_rosen([q]))
        topt.step(_rosen([t]))
        torch.testing.assert_close(q, t, rtol=1e-9, atol=1e-9)
        assert moved.state[q]["func_evals"] == topt.state[t]["func_evals"], k
    _assert_state_like(moved.state[q], topt.state[t], HISTORY[torch.float64])


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
def test_adafactor_state_dict_moves_between_torch_and_fastopt_torch(direction):
    first, second = ((torch.optim.Adafactor, ft.Adafactor) if direction == "torch->fastopt"
                     else (ft.Adafactor, torch.optim.Adafactor))
    model = _model()
    ref = copy.deepcopy(model)
    x, y = _data()
    opt = first(model.parameters(), lr=0.05)
    topt = torch.optim.Adafactor(ref.parameters(), lr=0.05)
    for _ in range(4):
        _step(model, opt, x, y)
        _step(ref, topt, x, y)
    moved = second(model.parameters(), lr=0.05)
    moved.load_state_dict(opt.state_dict())
    for _ in range(4):
        _step(model, moved, x, y)
        _step(ref, topt, x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32)
        _assert_state_like(moved.state[p], topt.state[q], {"rtol": 1e-4, "atol": 1e-7})


def _make(name, params):
    if name == "LBFGS":
        return ft.LBFGS(params, lr=0.2, max_iter=4, history_size=3,
                        line_search_fn="strong_wolfe")
    return ft.Adafactor(params, lr=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_torch_save_and_weights_only_load_round_trip(name):
    """The state dict goes through torch.save and torch.load(weights_only=True); the
    loaded optimizer has the same state (types and bits) and continues bit for bit."""
    model = _model(torch.float64)
    opt = _make(name, model.parameters())
    x, y = _data(torch.float64)
    for _ in range(3):
        _step(model, opt, x, y)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    twin = copy.deepcopy(model)
    other = _make(name, twin.parameters())
    other.load_state_dict(loaded)
    params, tparams = list(model.parameters()), list(twin.parameters())
    assert _snapshot(other, tparams, exact=False)[2] == _snapshot(opt, params, exact=False)[2]
    for _ in range(3):
        assert _step(model, opt, x, y) == _step(twin, other, x, y)
    assert _snapshot(other, tparams, exact=False) == _snapshot(opt, params, exact=False)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_fastopt_state_dicts_load_both_ways(name):
    """A state dict of fastopt's NumPy class (arrays, NumPy scalars) loads as tensors, and
    one of fastopt.torch loads into the NumPy class; both continue as the run that never
    moved."""
    model = _model(torch.float64)
    ref = copy.deepcopy(model)
    x, y = _data(torch.float64)
    kwargs = ({"lr": 0.2, "max_iter": 4, "history_size": 3} if name == "LBFGS"
              else {"lr": 0.05})
    nopt = getattr(fastopt, name)(model.parameters(), **kwargs)
    ropt = getattr(ft, name)(ref.parameters(), **kwargs)
    for _ in range(2):
        _step(model, nopt, x, y)
        _step(ref, ropt, x, y)
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    opt.load_state_dict(nopt.state_dict())
    for st in opt.state.values():
        for v in st.values():
            for item in v if isinstance(v, list) else [v]:
                assert item is None or isinstance(item, (torch.Tensor, int, float)), type(item)
    for _ in range(2):
        _step(model, opt, x, y)
        _step(ref, ropt, x, y)
    back = getattr(fastopt, name)(model.parameters(), **kwargs)
    back.load_state_dict(opt.state_dict())
    for _ in range(2):
        _step(model, back, x, y)
        _step(ref, ropt, x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# ---- a tensor lr ----------------------------------------------------------------------------

@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lbfgs_tensor_lr_in_lockstep_with_torch(lr_dtype, line_search_fn):
    """torch allows a tensor lr and computes the step lengths as 0-d tensors with it: the
    same numbers and the same state types here (``t`` a 0-d tensor of the promoted dtype),
    but ``t`` is never the group's lr tensor itself (torch stores that very tensor)."""
    x0 = torch.tensor([-1.5, 2.0, -0.5, 1.2, 0.3], dtype=torch.float64)
    p, t = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    kwargs = dict(max_iter=6, history_size=4, line_search_fn=line_search_fn)
    opt = ft.LBFGS([p], lr=torch.tensor(0.1, dtype=lr_dtype), **kwargs)
    topt = torch.optim.LBFGS([t], lr=torch.tensor(0.1, dtype=lr_dtype), **kwargs)
    for k in range(4):
        opt.step(_rosen([p]))
        topt.step(_rosen([t]))
        torch.testing.assert_close(p, t, rtol=1e-9, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
    _assert_state_like(opt.state[p], topt.state[t], HISTORY[torch.float64])
    assert isinstance(opt.state[p]["t"], torch.Tensor)
    assert opt.state[p]["t"] is not opt.param_groups[0]["lr"]
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == float(torch.tensor(0.1, dtype=lr_dtype))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        ft.LBFGS([p], lr=torch.tensor([0.1, 0.2]))


def test_numpy_lbfgs_takes_a_tensor_lr_too():
    """fastopt.LBFGS given tensors and a tensor lr: the numbers of torch's LBFGS."""
    x0 = torch.tensor([-1.5, 2.0, -0.5], dtype=torch.float64)
    p, t = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    opt = fastopt.LBFGS([p], lr=torch.tensor(0.1), max_iter=5)
    topt = torch.optim.LBFGS([t], lr=torch.tensor(0.1), max_iter=5)
    for _ in range(3):
        opt.step(_rosen([p]))
        topt.step(_rosen([t]))
    torch.testing.assert_close(p, t, rtol=1e-9, atol=1e-9)


# ---- bad state --------------------------------------------------------------------------

def _lbfgs_saved():
    p = torch.tensor([-1.5, 2.0, -0.5], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    opt = ft.LBFGS([p, q], lr=0.2, max_iter=5, history_size=4)
    for _ in range(2):
        opt.step(_rosen([p, q]))
    assert len(opt.state[p]["old_dirs"]) >= 2
    return opt, [p, q]


@pytest.mark.parametrize("key, value, exc, match", [
    ("d", torch.zeros(4, dtype=torch.float64), ValueError,
     r"state\['d'\] must be a float64 vector of 5 elements"),
    ("prev_flat_grad", None, ValueError, r"state\['prev_flat_grad'\]"),
    ("old_dirs", torch.zeros(5), TypeError, r"state\['old_dirs'\] must be a list"),
    ("old_stps", [torch.zeros(5), torch.zeros(6)], ValueError, r"state\['old_stps'\]\[1\]"),
    ("ro", [torch.tensor(1.0), "x"], TypeError, r"state\['ro'\]\[1\] must be a real number"),
    ("al", ["x"], TypeError, r"state\['al'\]\[0\] must be a real number or None"),
    ("H_diag", torch.ones(2), TypeError, r"state\['H_diag'\]"),
    ("n_iter", -1, TypeError, r"state\['n_iter'\] must be an int >= 0"),
    ("d", KeyError, KeyError, r"n_iter = \d+ but no 'd'")])
def test_lbfgs_bad_state_dict_is_refused_naming_the_key_and_changes_nothing(key, value, exc,
                                                                            match):
    opt, params = _lbfgs_saved()
    sd = copy.deepcopy(opt.state_dict())
    if value is KeyError:
        del sd["state"][0][key]
    else:
        sd["state"][0][key] = value
    before = _snapshot(opt, params)
    with pytest.raises(exc, match=r"param_groups\[0\]\['params'\]\[0\].*" + match):
        opt.load_state_dict(sd)
    assert _snapshot(opt, params) == before


@pytest.mark.parametrize("key, value, exc, match", [
    ("d", torch.zeros(4, dtype=torch.float64), ValueError, r"state\['d'\] must be a float64"),
    ("d", torch.zeros(5, dtype=torch.float32), ValueError, r"state\['d'\] must be a float64"),
    ("ro", "abc", TypeError, r"state\['ro'\] must be a list"),
    ("d", torch.zeros(5, dtype=torch.float64, device="meta"), TypeError,
     r"state\['d'\]: expected a dense CPU tensor"),
    ("old_dirs", [torch.zeros(5, dtype=torch.float64),
                  torch.zeros(5, dtype=torch.float64, device="meta")], TypeError,
     r"state\['old_dirs'\]\[1\]: expected a dense CPU tensor")])
def test_lbfgs_bad_state_at_a_step_is_refused_naming_the_key_and_changes_nothing(key, value,
                                                                                 exc, match):
    """The state is checked before the closure runs."""
    opt, params = _lbfgs_saved()
    opt.state[params[0]][key] = value
    before = _snapshot(opt, params)
    calls = []

    def closure():
        calls.append(1)
        return _rosen(params)()

    with pytest.raises(exc, match=r"param_groups\[0\]\['params'\]\[0\]: " + match):
        opt.step(closure)
    assert calls == [] and _snapshot(opt, params) == before


def _adafactor_saved():
    model = _model()
    opt = ft.Adafactor(model.parameters(), lr=0.05)
    x, y = _data()
    _step(model, opt, x, y)
    return opt, list(model.parameters()), (x, y)


@pytest.mark.parametrize("index, key, value, exc, match", [
    (0, "row_var", torch.zeros(8, 2), ValueError, r"state\['row_var'\] has shape \(8, 2\)"),
    (2, "col_var", torch.zeros(1, 3), ValueError, r"state\['col_var'\] has shape \(1, 3\)"),
    (3, "variance", torch.zeros(4), ValueError, r"state\['variance'\]"),
    (1, "step", torch.tensor(-1.0), ValueError, r"state\[1\]\['step'\]"),
    (3, "step", "x", TypeError, r"state\[3\]\['step'\]"),
    (1, "variance", KeyError, ValueError, r"state\['variance'\] must be a writable")])
def test_adafactor_bad_state_dict_is_refused_naming_the_key_and_changes_nothing(index, key,
                                                                                value, exc,
                                                                                match):
    opt, params, _ = _adafactor_saved()
    sd = copy.deepcopy(opt.state_dict())
    if value is KeyError:
        del sd["state"][index][key]
    else:
        sd["state"][index][key] = value
    before = _snapshot(opt, params)
    with pytest.raises(exc, match=match) as info:
        opt.load_state_dict(sd)
    assert f"[{index}]" in str(info.value)
    assert _snapshot(opt, params) == before


@pytest.mark.parametrize("name, index, key", [("LBFGS", 0, "d"), ("LBFGS", 0, "old_dirs"),
                                              ("Adafactor", 0, "row_var"),
                                              ("Adafactor", 3, "variance")])
def test_a_sparse_saved_state_tensor_is_refused_naming_the_key_and_changes_nothing(name, index,
                                                                                   key):
    """torch keeps these tensors dense: a sparse one (in a list too) is refused by name."""
    opt, params = _lbfgs_saved() if name == "LBFGS" else _adafactor_saved()[:2]
    sd = copy.deepcopy(opt.state_dict())
    st = sd["state"][index]
    if isinstance(st[key], list):
        st[key][0] = st[key][0].to_sparse()
    else:
        st[key] = st[key].to_sparse()
    before = _snapshot(opt, params)
    with pytest.raises(TypeError, match=rf"param_groups\[0\]\['params'\]\[{index}\].*"
                                        rf"state\['{key}'\] is a tensor with layout "
                                        rf"torch.sparse_coo"):
        opt.load_state_dict(sd)
    assert _snapshot(opt, params) == before


@pytest.mark.parametrize("key, value, exc, match", [
    ("variance", torch.zeros(2), ValueError, r"state\['variance'\] must be a writable"),
    ("variance", torch.zeros(3, dtype=torch.float64), ValueError,
     r"state\['variance'\] must be a writable float32"),
    ("step", torch.tensor(1.0, dtype=torch.float64), TypeError,
     r"state\['step'\] must be a writable 0-d float32"),
    ("variance", torch.zeros(3, device="meta"), TypeError,
     r"state\['variance'\]: expected a dense CPU tensor")])
def test_adafactor_bad_state_at_a_step_is_refused_naming_the_key_and_changes_nothing(key, value,
                                                                                     exc, match):
    """The last parameter's state is bad: the step raises naming it before the first
    parameter changes (its version counter included)."""
    opt, params, _ = _adafactor_saved()
    opt.state[params[-1]][key] = value
    for p in params:
        p.grad = torch.ones_like(p)
    before = _snapshot(opt, params)
    with pytest.raises(exc, match=r"param_groups\[0\]\['params'\]\[3\]: " + match):
        opt.step()
    assert _snapshot(opt, params) == before


# ---- LBFGS's guarantees -----------------------------------------------------------------------

def _failing_lbfgs(line_search_fn):
    p = torch.tensor([-1.5, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    opt = ft.LBFGS([p, q], max_iter=5, line_search_fn=line_search_fn)
    rosen = _rosen([p, q])
    calls = [0, None]  # calls made, the call that raises

    def closure():
        calls[0] += 1
        if calls[0] == calls[1]:
            raise RuntimeError("the model failed")
        return rosen()

    return opt, [p, q], closure, calls


@pytest.mark.parametrize("first", [False, True], ids=["later step", "first step"])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_closure_error_restores_parameters_and_history(line_search_fn, first):
    """A closure that raises on its 3rd call of a step (mid-iteration, parameters moved):
    the parameters, their version counters and the state are as before, and the run then
    continues bit for bit as one that never had the failing step (torch leaves the
    parameters moved and the state half-written)."""
    opt, ps, closure, calls = _failing_lbfgs(line_search_fn)
    ref, rps, rclosure, _ = _failing_lbfgs(line_search_fn)
    if not first:
        opt.step(closure)
        ref.step(rclosure)
    before = _snapshot(opt, ps)
    calls[1] = calls[0] + 3
    with pytest.raises(RuntimeError, match="the model failed"):
        opt.step(closure)
    assert _snapshot(opt, ps) == before
    assert first == (ps[0] not in opt.state)
    for _ in range(3):
        opt.step(closure)
        ref.step(rclosure)
        assert _snapshot(opt, ps, exact=False) == _snapshot(ref, rps, exact=False)


def test_lbfgs_bad_gradient_mid_step_restores_everything():
    opt, ps, closure, _ = _failing_lbfgs(None)
    opt.step(closure)
    before = _snapshot(opt, ps)
    n = [0]

    def bad():
        n[0] += 1
        loss = closure()
        if n[0] == 2:
            ps[1].grad.data = torch.ones(3, dtype=torch.float64)  # torch checks only .grad
        return loss

    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step(bad)
    assert _snapshot(opt, ps) == before


def test_lbfgs_needs_a_closure_and_one_group():
    p = torch.zeros(2, requires_grad=True)
    opt = ft.LBFGS([p])
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="doesn't support per-parameter options"):
        ft.LBFGS([{"params": [p]}, {"params": [torch.zeros(2, requires_grad=True)]}])


# ---- version counters -------------------------------------------------------------------------

def _versions_case(name, torch_class):
    """(optimizer, its parameters, good step, step failing on the last parameter's grad)."""
    if name == "SparseAdam":
        ps = [torch.ones(4, 3, requires_grad=True) for _ in range(3)]
        opt = fastopt.SparseAdam(ps, lr=0.1)

        def sparse_grads(bad):
            for p in ps:
                p.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (4, 3),
                                                 check_invariants=True)
            if bad:
                ps[-1].grad = torch.ones(4, 3)  # dense: refused
        return opt, ps, lambda bad: (sparse_grads(bad), opt.step())
    shape = (3, 4)
    ps = [torch.linspace(-1, 1, 12).reshape(shape).requires_grad_() for _ in range(3)]
    cls = getattr(ft if torch_class else fastopt, name)
    opt = cls(ps, **({"lr": 0.05} if name != "LBFGS" else {"max_iter": 3}))

    def grads(bad):
        for p in ps:
            p.grad = torch.full(shape, 0.5)
        if bad:  # a wrong shape (torch checks only an assignment to .grad)
            ps[-1].grad.data = torch.ones(4, 3)

    def step(bad):
        if name == "LBFGS":
            return opt.step(lambda: (grads(bad), torch.tensor(1.0))[1])
        grads(bad)
        return opt.step()
    return opt, ps, step


@pytest.mark.parametrize("name,torch_class", [
    ("LBFGS", True), ("Adafactor", True), ("LBFGS", False), ("Adafactor", False),
    ("Muon", False), ("SparseAdam", False)],
    ids=["fastopt.torch.LBFGS", "fastopt.torch.Adafactor", "fastopt.LBFGS",
         "fastopt.Adafactor", "fastopt.Muon", "fastopt.SparseAdam"])
def test_version_counters_move_with_a_successful_step_only(name, torch_class):
    """A step that raises on the last parameter's gradient leaves every parameter and its
    autograd version counter as it was (they used to be bumped when the step read each
    parameter, before it knew it would succeed); a successful step bumps each updated
    parameter's counter once."""
    opt, ps, step = _versions_case(name, torch_class)
    step(False)
    versions = [p._version for p in ps]
    values = [p.detach().clone() for p in ps]
    with pytest.raises((ValueError, RuntimeError), match=r"param_groups\[0\]\['params'\]\[2\]"):
        step(True)
    assert [p._version for p in ps] == versions
    assert all(torch.equal(p, v) for p, v in zip(ps, values))
    step(False)
    assert [p._version for p in ps] == [v + 1 for v in versions]
    assert not any(torch.equal(p, v) for p, v in zip(ps, values))


@pytest.mark.parametrize("cls", [ft.LBFGS, fastopt.LBFGS], ids=["fastopt.torch", "fastopt"])
def test_lbfgs_step_that_does_not_move_keeps_the_version_counters(cls):
    """A zero gradient ends the step before any move, as in torch: no version bump."""
    p = torch.ones(3, requires_grad=True)
    opt = cls([p])

    def closure():
        p.grad = torch.zeros(3)
        return torch.tensor(0.0)

    before = p._version
    opt.step(closure)
    assert p._version == before and opt.state[p]["n_iter"] == 0


def test_a_graph_saved_before_a_step_fails_loudly_after_it():
    model = _model()
    x, y = _data()
    for opt in (ft.LBFGS(model.parameters(), max_iter=2), ft.Adafactor(model.parameters())):
        stale = (model(x) - y).pow(2).mean()
        _step(model, opt, x, y)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            stale.backward()


# ---- torch's own parts ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_hooks_repr_zero_grad_and_class_are_torchs(name):
    model = _model()
    opt = _make(name, model.parameters())
    twin = getattr(torch.optim, name)(copy.deepcopy(model).parameters(),
                                      **{k: v for k, v in opt.defaults.items()})
    assert isinstance(opt, getattr(torch.optim, name))
    assert repr(opt) == repr(twin)
    assert opt.defaults == twin.defaults
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load"))
    x, y = _data()
    _step(model, opt, x, y)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd", "load"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_refused_parameters_name_the_parameter_and_add_no_group(name):
    half = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\].*float16"):
        getattr(ft, name)([torch.zeros(3, requires_grad=True), half])
    if name == "Adafactor":
        opt = ft.Adafactor([torch.zeros(3, requires_grad=True)])
        with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*contiguous"):
            opt.add_param_group({"params": [torch.zeros(4, 3).t().requires_grad_()]})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info,err", error_configs(where=lambda info: info.name in NAMES))
def test_invalid_configurations_raise_as_torch(info, err):
    p = torch.zeros(info.param_shape, requires_grad=True)
    cls = getattr(ft, info.name)
    if err.phase == CONSTRUCTION:
        with pytest.raises(err.error_type, match=err.error_regex):
            cls([p], **err.kwargs)
        return
    opt = cls([p], **err.kwargs)  # refused by the first step, before the closure runs
    calls = []
    with pytest.raises(err.error_type, match=err.error_regex):
        opt.step(lambda: calls.append(1))
    assert calls == [] and len(opt.state) == 0


def test_a_second_concurrent_step_raises():
    p = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = ft.LBFGS([p], max_iter=3)
    rosen, seen = _rosen([p]), []

    def closure():
        try:
            opt.step(rosen)
        except RuntimeError as e:
            seen.append(str(e))
        return rosen()

    opt.step(closure)
    assert seen and "another step" in seen[0]
    opt.step(rosen)  # the guard was released
