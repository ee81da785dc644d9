"""Invalid input: a clear error that names the group and parameter, and nothing changed.

Invalid hyperparameters come from the database (tests/optim_db.py), each with the phase it
is refused in (construction, or the first step) and, where torch 2.13 refuses it too, the
same error from torch. Bad gradients, bad state and bad hyperparameters set after
construction fail the step before any parameter, state entry or group changes.
"""
import numpy as np
import pytest

import fastopt
import reference as R
from helpers import P, import_torch, snapshot
from optim_db import CONSTRUCTION, DB, configs, error_configs, names


# ---- invalid hyperparameters --------------------------------------------------------------------

def _closure(params, calls, torch=None):
    def closure():
        calls.append(1)
        for p in params:
            p.grad = torch.ones(p.shape) if torch else np.ones(p.shape, np.float32)
        return torch.tensor(0.0) if torch else 0.0
    return closure


@pytest.mark.parametrize("info,err", error_configs())
def test_invalid_hyperparameters(info, err):
    p = P(*info.param_shape)
    if err.phase == CONSTRUCTION:
        with pytest.raises(err.error_type, match=err.error_regex):
            info.cls([p], **err.kwargs)
    else:  # refused by the first step, before the closure runs, changing nothing
        opt = info.cls([p], **err.kwargs)
        calls, before = [], snapshot(opt, [p])
        with pytest.raises(err.error_type, match=err.error_regex):
            opt.step(_closure([p], calls))
        assert calls == []
        assert snapshot(opt, [p]) == before
    if info.torch_name is None or not err.torch_agrees:
        return
    torch = import_torch(vector_kernels=False)
    t = torch.zeros(info.param_shape, requires_grad=True)
    twin, kwargs = info.torch_cls(torch), info.torch_kwargs(err.kwargs)
    if err.phase == CONSTRUCTION:
        with pytest.raises(err.error_type, match=err.error_regex):
            twin([t], **kwargs)
    else:
        topt = twin([t], **kwargs)
        with pytest.raises(err.error_type, match=err.error_regex):
            topt.step(_closure([t], [], torch))


def test_torch_accepts_what_the_database_says_it_accepts():
    torch = import_torch(vector_kernels=False)
    for info, err in (param.values for param in error_configs()):
        if info.torch_name is None or err.torch_agrees:
            continue
        t = torch.zeros(info.param_shape, requires_grad=True)
        topt = info.torch_cls(torch)([t], **info.torch_kwargs(err.kwargs))
        topt.step(_closure([t], [], torch))


# ---- bad gradients and state --------------------------------------------------------------------

#: kind: (make the bad value for the parameter's gradient, error type, message)
BAD = {
    "shape": (lambda p: np.ones(7, np.float32), ValueError, r"\.grad has shape \(7,\)"),
    "dtype": (lambda p: np.ones(p.shape, np.float64), TypeError, r"\.grad has dtype float64"),
    "type": (lambda p: [1.0] * p.size, TypeError, r"\.grad must be a numpy\.ndarray"),
    "byteorder": (lambda p: np.ones(p.shape, ">f4"), TypeError, r"\.grad has dtype >f4"),
    "state": (None, ValueError, r"state\['{key}'\] has dtype float32 and shape \(9,\)"),
}


def _has_state_arrays(name, kwargs):
    x = np.ones(4, np.float32)
    state = R.new_state(name, x, kwargs)
    with np.errstate(all="ignore"):
        R.step(name, x, x, state, kwargs)
    return any(v is not None and np.ndim(v) > 0 for v in state.values())


def _bad_input_cases():
    out = []
    for param in configs():
        name, kwargs = param.values
        for kind in BAD:
            if kind != "state" or _has_state_arrays(name, kwargs):
                out.append(pytest.param(name, kwargs, kind, id=f"{param.id}-{kind}"))
    return out


@pytest.mark.parametrize("name,kwargs,kind", _bad_input_cases())
def test_bad_grad_or_state_in_second_group_changes_nothing(name, kwargs, kind):
    """A bad gradient or state entry of the first parameter of the second group: the step
    fails naming it, and neither the parameters before it nor those after it change."""
    rng = np.random.default_rng(0)
    a, b, c, d = P(6, seed=1), P(5, seed=2), P(3, 2, seed=3), P(4, seed=4)
    opt = fastopt.OPTIMIZERS[name]([{"params": [a, b]}, {"params": [c, d]}], **kwargs)
    for _ in range(2):
        for p in (a, b, c, d):
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
        opt.step()  # state exists for every parameter
    for p in (a, b, c, d):
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    make, exc, match = BAD[kind]
    if kind == "state":
        key = [k for k, v in opt.state[c].items() if np.ndim(v) > 0][0]
        opt.state[c][key] = np.zeros(9, np.float32)
        match = match.format(key=key)
    else:
        c.grad = make(c)
    before = snapshot(opt, [a, b, c, d])
    with pytest.raises(exc, match=r"param_groups\[1\]\['params'\]\[0\]: .*" + match):
        opt.step()
    assert snapshot(opt, [a, b, c, d]) == before


@pytest.mark.parametrize("name,key", [(info.name, key) for info in DB.values()
                                      for key in info.scalar_state])
def test_bad_scalar_state_changes_nothing(name, key):
    ps = [fastopt.Parameter(np.ones(3, np.float32)) for _ in range(2)]
    opt = fastopt.OPTIMIZERS[name]([{"params": ps[:1]}, {"params": ps[1:]}])
    for p in ps:
        p.grad = np.ones_like(p)
    opt.step()
    opt.state[ps[1]][key] = 0.5  # a Python float instead of a 0-d float32 array
    before = snapshot(opt, ps)
    with pytest.raises(TypeError, match=rf"param_groups\[1\]\['params'\]\[0\].*{key}"):
        opt.step()
    assert snapshot(opt, ps) == before


@pytest.mark.parametrize("name", names())
def test_scalar_state_is_a_float32_scalar(name):
    """The state entries the database lists as scalars are 0-d float32 arrays, and no other
    entry besides ``step`` is 0-d."""
    p = P(4)
    opt = fastopt.OPTIMIZERS[name]([p], **DB[name].inputs[-1].kwargs)
    p.grad = np.ones(4, np.float32)
    opt.step()
    scalars = {k for k, v in opt.state[p].items() if np.ndim(v) == 0} - {"step"}
    assert scalars == set(DB[name].scalar_state)
    for key in scalars:
        assert np.asarray(opt.state[p][key]).dtype == np.float32, key


# ---- bad input found by the step's checks -------------------------------------------------------

def test_first_step_with_bad_grad_creates_no_state():
    a, b = P(3), P(3)
    opt = fastopt.Adam([a, b])
    a.grad = np.ones(3, np.float32)
    b.grad = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"\[1\]: \.grad has shape \(4,\)"):
        opt.step()
    assert len(opt.state) == 0


def test_read_only_parameter_is_rejected_before_any_change():
    a, b = P(3), P(3)
    opt = fastopt.SGD([a, b], lr=0.1)
    b.flags.writeable = False
    a.grad = np.ones(3, np.float32)
    b.grad = np.ones(3, np.float32)
    before = np.asarray(a).copy()
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]: the parameter's array is read-only"):
        opt.step()
    np.testing.assert_array_equal(np.asarray(a), before)


def test_plain_array_smuggled_into_a_group_is_rejected():
    a = P(3)
    opt = fastopt.SGD([a], lr=0.1)
    opt.param_groups[0]["params"].append(np.zeros(3, np.float32))
    a.grad = np.ones(3, np.float32)
    with pytest.raises(TypeError, match=r"\[1\]: expected a fastopt.Parameter.*wrap"):
        opt.step()
    assert (np.asarray(a) == np.asarray(P(3))).all()


def test_corrupted_state_is_rejected_before_any_change():
    a, b = P(4), P(4)
    opt = fastopt.Adam([a, b])
    a.grad = np.ones(4, np.float32)
    b.grad = np.ones(4, np.float32)
    opt.step()
    opt.state[b]["exp_avg_sq"] = np.zeros(5, np.float32)
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]: state\['exp_avg_sq'\] has"):
        opt.step()
    assert snapshot(opt, [a, b]) == before
    opt.state[b]["exp_avg_sq"] = np.zeros(4, np.float32)
    opt.param_groups[0]["amsgrad"] = True  # switched on after state exists: KeyError (torch)
    with pytest.raises(KeyError, match="max_exp_avg_sq"):
        opt.step()


def test_hyperparameter_broken_after_construction_changes_nothing():
    a = P(3)
    opt = fastopt.Adam([a])
    a.grad = np.ones(3, np.float32)
    opt.step()
    opt.param_groups[0]["betas"] = (1.0, 0.999)  # divides by zero in the bias correction
    before = snapshot(opt, [a])
    with pytest.raises(ZeroDivisionError, match=r"param_groups\[0\]: float division by zero"):
        opt.step()
    assert snapshot(opt, [a]) == before


def test_non_numeric_hyperparameter_is_rejected_before_any_change():
    a, b = P(3), P(3)
    opt = fastopt.SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9)
    a.grad, b.grad = np.ones(3, np.float32), np.ones(3, np.float32)
    opt.step()
    opt.param_groups[1]["momentum"] = "0.9"
    before = snapshot(opt, [a, b])
    with pytest.raises(TypeError, match=r"param_groups\[1\]: momentum must be a real number"):
        opt.step()
    assert snapshot(opt, [a, b]) == before
    # ranges are the constructor's business, as in torch: a schedule may end a hair below 0
    opt.param_groups[1]["momentum"] = 0.9
    opt.param_groups[1]["lr"] = -4e-17
    opt.step()


@pytest.mark.parametrize("key,value,exc", [
    ("lr", np.array([[0.1, 0.2]]), TypeError),
    ("lr", 10 ** 400, OverflowError),
    ("lr", "0.1", TypeError),
    ("betas", (0.9, 0.99, 0.999), ValueError),
    ("betas", (np.array([0.9, 0.8]), 0.999), TypeError),
    ("maximize", np.array([True, False]), TypeError),
])
def test_bad_values_in_a_later_group_change_nothing(key, value, exc):
    a, b = P(3, seed=1), P(3, seed=2)
    opt = fastopt.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = np.ones(3, np.float32), np.ones(3, np.float32)
    opt.step()
    opt.param_groups[1][key] = value
    before = snapshot(opt, [a, b])
    with pytest.raises(exc, match=r"param_groups\[1\]"):
        opt.step()
    assert snapshot(opt, [a, b]) == before


def test_adagrad_negative_lr_decay_at_step_is_refused():
    a = P(3)
    opt = fastopt.Adagrad([a])
    a.grad = np.ones(3, np.float32)
    opt.step()
    opt.param_groups[0]["lr_decay"] = -1.0  # 1 + (2 - 1) * -1 == 0: torch divides by zero
    with pytest.raises(ValueError, match="Invalid lr_decay value"):
        opt.step()


def test_grad_partly_overlapping_its_parameter_is_refused():
    base = np.arange(101, dtype=np.float32)
    p = fastopt.Parameter(base[1:])
    opt = fastopt.SGD([p], lr=0.5)
    p.grad = base[:100]
    with pytest.raises(ValueError, match=r"\['params'\]\[0\]: \.grad partly overlaps"):
        opt.step()
    np.testing.assert_array_equal(base, np.arange(101, dtype=np.float32))
    p.grad = np.asarray(p)  # the grad *is* the parameter: allowed, as in torch
    opt.step()
    np.testing.assert_array_equal(base[1:], np.arange(1, 101, dtype=np.float32) * 0.5)


def test_state_sharing_memory_is_refused():
    a = P(4)
    opt = fastopt.Adam([a])
    a.grad = np.ones(4, np.float32)
    opt.step()
    opt.state[a]["exp_avg_sq"] = opt.state[a]["exp_avg"]
    before = snapshot(opt, [a])
    with pytest.raises(ValueError, match="shares memory with another state array"):
        opt.step()
    assert snapshot(opt, [a]) == before
    opt.state[a]["exp_avg_sq"] = np.asarray(a)
    with pytest.raises(ValueError, match="shares memory with the parameter"):
        opt.step()


def test_sparse_gradient_to_a_dense_optimizer_raises_like_torch():
    a = P(4, 2)
    opt = fastopt.Adam([a])
    a.grad = fastopt.SparseGrad([1], np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"\['params'\]\[0\]: this optimizer does not "
                                           r"support sparse gradients"):
        opt.step()
    assert len(opt.state) == 0


class _FailingAdam(fastopt.Adam):
    """Adam whose state creation runs out of memory (a real failed allocation) for the
    parameter of shape ``fail_shape``."""

    fail_shape = (3,)

    def _init_state(self, state, array, group):
        super()._init_state(state, array, group)
        if array.shape == self.fail_shape:
            state["exp_avg_sq"] = np.zeros((1 << 40, 1 << 20), np.float32)


def test_new_state_is_created_for_all_parameters_or_none():
    """A MemoryError while creating the state of the second new parameter leaves no state
    for the first (and no half-made state for the second); the next step starts both."""
    xs = [np.linspace(-1, 1, 4, dtype=np.float32), np.ones(3, np.float32)]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    for p in ps:
        p.grad = np.full_like(p, 0.5)
    opt = _FailingAdam(ps, lr=0.1)
    with pytest.raises(MemoryError):
        opt.step()
    assert not any(opt.state.get(p) for p in ps)
    assert all(np.array_equal(p, x) for p, x in zip(ps, xs))
    opt.fail_shape = None
    opt.step()
    qs = [fastopt.Parameter(x.copy()) for x in xs]
    for q in qs:
        q.grad = np.full_like(q, 0.5)
    fastopt.Adam(qs, lr=0.1).step()
    assert all(np.array_equal(p, q) for p, q in zip(ps, qs))
    assert [float(opt.state[p]["step"]) for p in ps] == [1.0, 1.0]
