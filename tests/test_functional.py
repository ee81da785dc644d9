"""fastopt.functional: torch's functional optimizers (same signatures; numbers equal to the
classes bit for bit and to torch's functions within torch's tolerance) and the optax-style
init / update with the caller's buffers."""
import importlib
import inspect

import numpy as np
import pytest

import fastopt
import fastopt.functional as F
from helpers import F32, LISTS, assert_bits, grads, import_torch
from optim_db import DB, configs

TORCH_FUNCTIONS = [name for name in LISTS if name != "lion"]
SHAPES = [((3,), np.float32), ((2, 4), np.float64), ((5,), np.float32)]


def _torch_function(torch, name):
    return getattr(importlib.import_module(f"torch.optim.{name}"), name)


@pytest.mark.parametrize("name", TORCH_FUNCTIONS)
def test_signature_is_torchs(name):
    torch = import_torch(vector_kernels=False)
    theirs = inspect.signature(_torch_function(torch, name)).parameters
    mine = inspect.signature(getattr(F, name)).parameters
    assert list(mine) == list(theirs)
    for key in theirs:
        assert mine[key].kind == theirs[key].kind, key
        assert mine[key].default == theirs[key].default, key


def _function_name(name, kwargs):
    return "adamw" if name == "AdamW" else name.lower()


def _hyper(fn, group):
    """The function's hyperparameter arguments from a class's group."""
    values = dict(group)
    if "betas" in group:
        values["beta1"], values["beta2"] = group["betas"]
    if "etas" in group:
        values["etaminus"], values["etaplus"] = group["etas"]
        values["step_size_min"], values["step_size_max"] = group["step_sizes"]
    sig = inspect.signature(fn).parameters
    keep = [k for k, p in sig.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY or k in ("maximize",
                                                               "decoupled_weight_decay")]
    return {k: values[k] for k in keep}


def _setup(name, kwargs, seed=0):
    cls = getattr(fastopt, name)
    rng = np.random.default_rng(seed)
    params = [fastopt.Parameter(rng.standard_normal(s).astype(d)) for s, d in SHAPES]
    return cls, params


def _lists(fname, states, n):
    """The state lists of ``fname`` from per-parameter state dicts; a list whose key no
    parameter has is empty (as torch's classes pass them), except SGD's buffers (None)."""
    out = []
    for key in LISTS[fname]:
        if fname == "sgd":
            out.append([s.get(key) for s in states])
        elif any(key in s for s in states):
            out.append([s[key] for s in states])
        else:
            out.append([])
    return out


@pytest.mark.parametrize("name,kwargs", configs())
def test_torch_shaped_functions_equal_the_classes_bit_for_bit(name, kwargs):
    cls, params = _setup(name, kwargs)
    mine = [np.array(p) for p in params]
    opt = cls(params, **kwargs)
    fname = _function_name(name, kwargs)
    fn = getattr(F, fname)
    hyper = _hyper(fn, opt.param_groups[0])
    states = F.transformation(cls, **kwargs).init(mine).state
    lists = _lists(fname, states, len(mine))
    rng = np.random.default_rng(1)
    for k in range(4):
        gs = [grads(rng, p.shape, p.dtype, k) for p in params]
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        fn(mine, [g.copy() for g in gs], *lists, **hyper)
    for i, (p, m) in enumerate(zip(params, mine)):
        assert_bits(m, p, f"{name} params[{i}]")
        for key, lst in zip(LISTS[fname], lists):
            if key in opt.state[p]:
                assert_bits(lst[i], opt.state[p][key], f"{name} {key}[{i}]")


@pytest.mark.parametrize("name,kwargs", configs(where=lambda info: info.torch_name is not None))
def test_torch_shaped_functions_agree_with_torchs(name, kwargs):
    torch = import_torch()
    cls, params = _setup(name, kwargs)
    params = [p.astype(np.float32) for p in params]
    mine = [np.array(p) for p in params]
    theirs = [torch.tensor(p) for p in params]
    opt = cls([fastopt.Parameter(p) for p in params], **kwargs)
    fname = _function_name(name, kwargs)
    hyper = _hyper(getattr(F, fname), opt.param_groups[0])
    states = F.transformation(cls, **kwargs).init(mine).state
    lists = _lists(fname, states, len(mine))
    tlists = [[None if a is None else torch.tensor(a) for a in lst] for lst in lists]
    rng = np.random.default_rng(1)
    for k in range(5):
        gs = [grads(rng, p.shape, p.dtype, k) for p in mine]
        getattr(F, fname)(mine, gs, *lists, **hyper)
        _torch_function(torch, fname)(theirs, [torch.tensor(g) for g in gs], *tlists, **hyper)
    for m, t in zip(mine, theirs):
        if DB[name].bitwise_vs_torch:
            assert_bits(m, t.numpy(), name)
        else:
            np.testing.assert_allclose(m, t.numpy(), **F32)


def test_torch_tensors_are_taken_as_arrays():
    torch = import_torch(vector_kernels=False)
    p = torch.nn.Parameter(torch.ones(3))
    buf = [None]
    F.sgd([p], [torch.full((3,), 2.0)], buf, weight_decay=0.0, momentum=0.9, lr=0.5,
          dampening=0.0, nesterov=False, maximize=False)
    assert torch.equal(p.detach(), torch.zeros(3))
    np.testing.assert_array_equal(buf[0], [2.0, 2.0, 2.0])


def _adam_args():
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(d) for s, d in SHAPES]
    gs = [rng.standard_normal(s).astype(d) for s, d in SHAPES]
    ms = [np.full(s, 0.1, d) for s, d in SHAPES]
    vs = [np.full(s, 0.2, d) for s, d in SHAPES]
    steps = [np.array(3.0, np.float32) for _ in SHAPES]
    return params, gs, ms, vs, [], steps


HYPER = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8,
             maximize=False)


def _bad(index, value):
    def change(args):
        args[index[0]][index[1]] = value(args)
        return args
    return change


@pytest.mark.parametrize("change,error,match", [
    (lambda a: [a[0], a[1][:2]] + a[2:], ValueError, r"grads has 2 entries, params 3"),
    (lambda a: a[:3] + [a[3][:1]] + a[4:], ValueError, r"exp_avg_sqs has 1 entries"),
    (_bad((2, 1), lambda a: None), KeyError, r"exp_avgs\[1\] is None"),
    (_bad((3, 2), lambda a: np.zeros(4, np.float32)), ValueError,
     r"exp_avg_sqs\[2\]: state\['exp_avg_sq'\] has dtype float32 and shape \(4,\)"),
    (_bad((2, 0), lambda a: np.zeros(3)), ValueError, r"exp_avgs\[0\]: state\['exp_avg'\]"),
    (_bad((1, 1), lambda a: np.zeros((2, 4), np.float32)), TypeError,
     r"grads\[1\]: .grad has dtype float32"),
    (_bad((1, 2), lambda a: np.zeros(6, np.float32)), ValueError, r"grads\[2\]: .grad has shape"),
    (_bad((5, 1), lambda a: np.float32(3.0)), TypeError, r"state_steps\[1\] must be a numpy"),
    (_bad((5, 1), lambda a: np.array(3.0)), TypeError,
     r"state_steps\[1\]: state\['step'\] must be a writable 0-d float32"),
    (_bad((0, 2), lambda a: np.zeros(10, np.float32)[::2]), ValueError, r"params\[2\]"),
    (_bad((0, 0), lambda a: [1.0, 2.0, 3.0]), TypeError, r"params\[0\] must be a numpy"),
    (_bad((2, 1), lambda a: a[3][1]), ValueError, r"exp_avg_sqs\[1\].*shares memory"),
])
def test_bad_input_is_named_and_changes_nothing(change, error, match):
    args = list(_adam_args())
    args = change([list(a) for a in args])
    before = [[np.array(x) if isinstance(x, np.ndarray) else x for x in a] for a in args]
    with pytest.raises(error, match=match):
        F.adam(*args, **HYPER)
    for a, b in zip(args, before):
        for x, y in zip(a, b):
            if isinstance(x, np.ndarray):
                assert_bits(x, y)


def test_amsgrad_needs_its_list_and_scaling_is_refused():
    args = _adam_args()
    with pytest.raises(ValueError, match="max_exp_avg_sqs has 0 entries, params 3"):
        F.adam(*args, **{**HYPER, "amsgrad": True})
    with pytest.raises(ValueError, match="grad_scale and found_inf"):
        F.adam(*args, grad_scale=np.ones(()), **HYPER)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        F.adam(*args, **{**HYPER, "lr": -1.0})


def test_sgd_creates_missing_buffers_into_the_list():
    p = np.ones(3, np.float32)
    buf = [None]
    F.sgd([p], [np.full(3, 2.0, np.float32)], buf, weight_decay=0.0, momentum=0.9, lr=0.5,
          dampening=0.5, nesterov=False, maximize=False)
    # torch: the first buffer is the gradient itself (no dampening), then p -= lr * buf
    np.testing.assert_array_equal(buf[0], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(p, [0.0, 0.0, 0.0])
    first = buf[0]
    F.sgd([p], [np.full(3, 2.0, np.float32)], buf, weight_decay=0.0, momentum=0.9, lr=0.5,
          dampening=0.5, nesterov=False, maximize=False)
    assert buf[0] is first
    np.testing.assert_allclose(buf[0], 0.9 * 2.0 + 0.5 * 2.0)
    with pytest.raises(TypeError, match="momentum_buffer_list must be a list"):
        F.sgd([p], [np.ones(3, np.float32)], (None,), weight_decay=0.0, momentum=0.9, lr=0.5,
              dampening=0.0, nesterov=False, maximize=False)
    np.testing.assert_allclose(p, -0.5 * 2.8)


# optax's shape -------------------------------------------------------------------------------

def _tree(rng):
    return {"w": rng.standard_normal((2, 3)).astype(np.float32),
            "layers": [rng.standard_normal(4), rng.standard_normal(1).astype(np.float32)]}


def _leaves(tree):
    return [tree["layers"][0], tree["layers"][1], tree["w"]]


@pytest.mark.parametrize("name,kwargs", configs())
def test_update_equals_the_class_bit_for_bit(name, kwargs):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    cls = getattr(fastopt, name)
    mirror = [fastopt.Parameter(x.copy()) for x in _leaves(params)]
    opt = cls(mirror, **kwargs)
    tx = F.transformation(name, **kwargs)
    state = tx.init(params)
    out = {"w": np.empty((2, 3), np.float32),
           "layers": [np.empty(4), np.empty(1, np.float32)]}
    for k in range(4):
        g = {"w": grads(rng, (2, 3), np.float32, k),
             "layers": [grads(rng, (4,), np.float64, k), grads(rng, (1,), np.float32, k)]}
        old = [np.array(p) for p in mirror]
        for p, gl in zip(mirror, _leaves(g)):
            p.grad = gl
        opt.step()
        updates, state2 = tx.update(g, state, params, out=out)
        assert updates is out and state2 is state
        for i, (p, u, o) in enumerate(zip(mirror, _leaves(updates), old)):
            assert_bits(u, np.asarray(p) - o, f"{name} update {i} at step {k}")
            for key, value in opt.state[p].items():
                assert_bits(state.state[i][key], value, f"{name} {key}[{i}] at step {k}")
        for x, p in zip(_leaves(params), mirror):
            x[...] = p  # follow the class exactly (params + updates may round)


def test_update_allocates_no_new_out_and_follows_changed_buffers_and_hyperparams():
    params = {"w": np.ones(3, np.float32)}
    tx = F.transformation("sgd", lr=0.5, momentum=0.9)
    state = tx.init(params)
    assert state.state == [{}]           # SGD's buffer is made by the first update
    mirror = fastopt.Parameter(np.ones(3, np.float32))
    opt = fastopt.SGD([mirror], lr=0.5, momentum=0.9)
    buffers = [{"w": np.empty(3, np.float32)}, {"w": np.empty(3, np.float32)}]
    for k in range(6):
        if k == 3:
            state.hyperparams["lr"] = 0.25
            opt.param_groups[0]["lr"] = 0.25
        g = {"w": np.full(3, k + 1.0, np.float32)}
        mirror.grad = g["w"]
        before = np.array(mirror)
        opt.step()
        out = buffers[k % 2]
        updates, state = tx.update(g, state, params, out=out)
        assert updates["w"] is out["w"]
        assert_bits(updates["w"], np.asarray(mirror) - before)
        assert_bits(state.state[0]["momentum_buffer"], opt.state[mirror]["momentum_buffer"])
        params["w"][...] = mirror
    updates, _ = tx.update({"w": np.ones(3, np.float32)}, state, params)
    assert updates["w"].shape == (3,)   # without out, new arrays


def test_apply_updates_adds_in_place():
    params = {"a": np.ones(2), "b": [np.zeros(1, np.float32)]}
    a = params["a"]
    out = F.apply_updates(params, {"a": np.full(2, 0.5), "b": [np.ones(1, np.float32)]})
    assert out is params and params["a"] is a
    np.testing.assert_array_equal(a, [1.5, 1.5])
    np.testing.assert_array_equal(params["b"][0], [1.0])


@pytest.mark.parametrize("make,error,match", [
    (lambda p, g, o: (g, p, {"w": np.empty(3), "layers": o["layers"]}), ValueError,
     r"out\['w'\] has dtype float64 and shape \(3,\); params\['w'\] has float32"),
    (lambda p, g, o: (g, p, {"w": np.empty(4, np.float32), "layers": o["layers"]}),
     ValueError, r"out\['w'\] has dtype float32 and shape \(4,\)"),
    (lambda p, g, o: (g, p, {"w": p["w"], "layers": o["layers"]}), ValueError,
     r"out\['w'\] shares memory with params\['w'\]"),
    (lambda p, g, o: (g, p, {"w": np.empty(6, np.float32)[::2], "layers": o["layers"]}),
     ValueError, r"out\['w'\] must be C-contiguous"),
    (lambda p, g, o: ({"w": g["w"]}, p, o), ValueError,
     r"grads has other keys than params: missing \['layers'\]"),
    (lambda p, g, o: ({"w": g["w"], "layers": g["layers"][:1]}, p, o), ValueError,
     r"grads\['layers'\] has 1 items, params\['layers'\] 2"),
    (lambda p, g, o: ({"w": g["w"].astype(np.float64), "layers": g["layers"]}, p, o),
     ValueError, r"grads\['w'\] has dtype float64"),
    (lambda p, g, o: (g, p, {"w": o["w"], "layers": [o["layers"][0], g["layers"][1]]}),
     ValueError, r"out\['layers'\]\[1\] shares memory with grads\['layers'\]\[1\]"),
    (lambda p, g, o: (g, p, {"w": o["w"], "layers": [o["layers"][0], g["w"][:1]]}),
     ValueError, r"out\['layers'\]\[1\] shares memory with grads\['w'\]"),
    (lambda p, g, o: (g, p, {"w": o["w"], "layers": [o["layers"][0], o["w"][1:2]]}),
     ValueError, r"out\['layers'\]\[1\] shares memory with out\['w'\]"),
])
def test_update_bad_input_is_named_and_changes_nothing(make, error, match):
    params = {"w": np.ones(3, np.float32), "layers": [np.ones(2), np.ones(1, np.float32)]}
    tx = F.transformation("adam", lr=0.1)
    state = tx.init(params)
    g = {"w": np.ones(3, np.float32), "layers": [np.ones(2), np.ones(1, np.float32)]}
    out = {"w": np.full(3, 7, np.float32), "layers": [np.full(2, 7.0), np.full(1, 7, np.float32)]}
    grads_, params_, out_ = make(params, g, out)
    before_state = [{k: np.array(v) for k, v in s.items()} for s in state.state]
    with pytest.raises(error, match=match):
        tx.update(grads_, state, params_, out=out_)
    np.testing.assert_array_equal(params["w"], 1)
    for s, b in zip(state.state, before_state):
        for k in b:
            assert_bits(s[k], b[k])
    np.testing.assert_array_equal(out["w"], 7)
    np.testing.assert_array_equal(g["w"], 1)
    np.testing.assert_array_equal(g["layers"][1], 1)


def test_update_missing_state_and_bad_hyperparams():
    params = {"w": np.ones(3, np.float32)}
    tx = F.transformation(fastopt.Adam, lr=0.1)
    state = tx.init(params)
    del state.state[0]["exp_avg"]
    out = {"w": np.full(3, 7, np.float32)}
    with pytest.raises(KeyError, match=r"state.state\[0\] \(params\['w'\]\) has no 'exp_avg'"):
        tx.update({"w": np.ones(3, np.float32)}, state, params, out=out)
    state = tx.init(params)
    state.hyperparams["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"state.hyperparams: Invalid beta"):
        tx.update({"w": np.ones(3, np.float32)}, state, params, out=out)
    np.testing.assert_array_equal(out["w"], 7)
    assert float(state.state[0]["step"]) == 0
    with pytest.raises(ValueError, match="no per-element kernel"):
        F.transformation(fastopt.LBFGS)
    with pytest.raises(ValueError, match="unknown optimizer"):
        F.transformation("adamz")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        F.transformation("adam", lr=-1)
