"""The cached step: after a step that creates no state, the next steps of an optimizer run
from what that step collected, checking per tensor that nothing it relies on changed.

Every test here warms two identical optimizers until the first one steps from its cache,
changes both in the same way (a new gradient, a replaced or reshaped array, new
hyperparameters, ...), drops the second one's cache, and steps both: the outcome must be the
same, bit for bit (the same numbers, or the same exception with the same message and nothing
changed). So whatever the cached step accepts, the full path accepts with the same result,
and whatever the full path refuses, the cached step refuses.
"""
import copy
import gc
import weakref

import numpy as np
import pytest

import fastopt
from fastopt import _kernels

from helpers import grads

# one configuration per state layout: plain SGD (no state), a lazy momentum buffer, one and
# two and three state arrays with a step counter, 0-d scalar state entries (NAdam, ASGD)
CONFIGS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("Adagrad", {"lr": 0.1}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01, "amsgrad": True}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("NAdam", {"lr": 0.01}),
    ("ASGD", {"lr": 0.01}),
    ("Rprop", {"lr": 0.01}),
    ("Lion", {"lr": 0.01}),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)]
SHAPES = [(3, 4), (5,), (2, 2, 2), (1,)]


def _frozen(value):
    a = np.asarray(value)
    return (a.dtype.str, a.shape, a.tobytes())


def state_of(opt):
    """Parameters, state and hyperparameters, by position: comparable between optimizers."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            out.append((_frozen(p), {k: _frozen(v) for k, v in st.items()}))
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return out, repr(hyper)


def numpy_world(name, kwargs, dtype=np.float32):
    rng = np.random.default_rng(0)
    params = [fastopt.Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]
    return getattr(fastopt, name)(params, **kwargs), params


def feed(params, rng, k):
    for p in params:
        p.grad = grads(rng, p.shape, p.dtype, k)


def warm(opt, params, rng, steps=3):
    for k in range(steps):
        feed(params, rng, k)
        opt.step()
    assert _kernels.cached(opt)


def outcome(opt):
    try:
        opt.step()
    except Exception as e:  # the exception itself is compared
        return type(e), str(e)
    return "stepped"


def twins(make, change, then=None, feed_next=True, keeps_cache=True):
    """Warm two optimizers made by ``make()``, apply ``change(opt, params)`` to both, drop
    the cache of the second, step both and compare; with ``then``, apply ``then(opt,
    params)`` to both after that and step both once more from their caches (or not).
    ``keeps_cache=False``: ``change`` drops the cache itself."""
    (a, pa), (b, pb) = make(), make()
    ra, rb = np.random.default_rng(1), np.random.default_rng(1)
    warm(a, pa, ra)
    warm(b, pb, rb)
    if feed_next:
        feed(pa, ra, 3)
        feed(pb, rb, 3)
    change(a, pa)
    change(b, pb)
    assert _kernels.cached(a) == keeps_cache
    _kernels.forget(b)
    assert not _kernels.cached(b)
    before = state_of(a)
    got, want = outcome(a), outcome(b)
    assert got == want
    if got != "stepped":
        assert state_of(a) == before, "a step that raised changed something"
    assert state_of(a) == state_of(b)
    if then is not None:
        then(a, pa)
        then(b, pb)
        assert outcome(a) == outcome(b)
        assert state_of(a) == state_of(b)
    return got


# ---- the cache is used, and gives the full path's numbers ------------------------------------

@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_loop_steps_from_the_cache_with_the_numbers_of_the_full_path(name, kwargs, dtype):
    a, pa = numpy_world(name, kwargs, dtype)
    b, pb = numpy_world(name, kwargs, dtype)
    ra, rb = np.random.default_rng(1), np.random.default_rng(1)
    for k in range(12):
        feed(pa, ra, k)
        feed(pb, rb, k)
        if k % 3 == 2:  # hyperparameters change between steps, as a scheduler changes them
            for opt in (a, b):
                opt.param_groups[0]["lr"] *= 0.5
        a.step()
        _kernels.forget(b)
        b.step()
        # the first step creates the state (plain SGD has none): the next steps are cached
        assert _kernels.cached(a) or k == 0
        assert state_of(a) == state_of(b)


def test_the_first_step_and_a_step_that_creates_state_make_no_cache():
    p, q = fastopt.Parameter(np.ones(3)), fastopt.Parameter(np.ones(2))
    opt = fastopt.Adam([p, q])
    p.grad = np.ones(3)
    opt.step()
    assert not _kernels.cached(opt)  # p's state was created
    opt.step()
    assert _kernels.cached(opt)
    q.grad = np.ones(2)
    opt.step()  # q's state is created: the full path
    assert not _kernels.cached(opt)
    opt.step()
    assert _kernels.cached(opt)


# ---- gradients -------------------------------------------------------------------------------

def _read_only(a):
    a.flags.writeable = False
    return a


def _fresh_parameter_memory(opt, ps):
    return fastopt.Parameter(np.zeros(12, ps[0].dtype)).reshape(3, 4)


def _part_of_itself(opt, ps):
    # a (3, 4) window starting one element into the parameter: shares most of its memory
    flat = ps[0].reshape(-1)
    return np.lib.stride_tricks.as_strided(flat[1:], (3, 4), ps[0].strides)


def _another_parameter(opt, ps):
    # the 8 elements of parameter 2 and 4 more of them again: reads what the step writes
    flat = ps[2].reshape(-1).view(np.ndarray)
    return np.lib.stride_tricks.as_strided(flat, (3, 4), (4 * flat.itemsize, flat.itemsize))


def _a_state_array(opt, ps):
    for v in opt.state.get(ps[0], {}).values():
        if isinstance(v, np.ndarray) and v.shape == ps[0].shape:
            return v
    return np.ones(ps[0].shape, ps[0].dtype)


GRAD_CHANGES = {
    "the same array refilled": lambda opt, ps: np.copyto(ps[0].grad, 0.25) or ps[0].grad,
    "none": lambda opt, ps: None,
    "another shape": lambda opt, ps: np.ones((4, 3), ps[0].dtype),
    "another dtype": lambda opt, ps: np.ones((3, 4), np.float16),
    "byte-swapped": lambda opt, ps: np.ones((3, 4), ps[0].dtype.newbyteorder()),
    "not contiguous": lambda opt, ps: np.ones((3, 8), ps[0].dtype)[:, ::2] * 0.5,
    "Fortran order": lambda opt, ps: np.asfortranarray(
        np.arange(12, dtype=ps[0].dtype).reshape(3, 4)),
    "read-only": lambda opt, ps: _read_only(np.full((3, 4), 0.5, ps[0].dtype)),
    "the parameter itself": lambda opt, ps: ps[0],
    "a list": lambda opt, ps: [[1.0] * 4] * 3,
    "a fresh parameter's memory": _fresh_parameter_memory,
    "a view into another parameter": _another_parameter,
    "part of the parameter itself": _part_of_itself,
    "a state array": _a_state_array,
    "a sparse gradient": lambda opt, ps: fastopt.SparseGrad(np.array([0]),
                                                            np.ones((1, 4), ps[0].dtype)),
}
REFUSED = {"another shape", "another dtype", "byte-swapped", "a list",
           "a view into another parameter", "part of the parameter itself", "a sparse gradient"}
STEPPED = {"the same array refilled", "none", "not contiguous", "Fortran order", "read-only",
           "the parameter itself", "a fresh parameter's memory"}


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("what", list(GRAD_CHANGES))
def test_a_changed_gradient_gives_the_full_paths_outcome(name, kwargs, what):
    def change(opt, ps):
        ps[0].grad = GRAD_CHANGES[what](opt, ps)

    got = twins(lambda: numpy_world(name, kwargs), change)
    if what in REFUSED:
        assert got != "stepped"
    if what in STEPPED:
        assert got == "stepped"
    if what == "a state array":  # refused where the parameter has a state array
        assert (got == "stepped") == (name == "SGD" and "momentum" not in kwargs)


def test_a_gradient_over_a_state_array_is_refused_by_the_cached_step():
    opt, ps = numpy_world("Adam", {})
    warm(opt, ps, np.random.default_rng(1))
    feed(ps, np.random.default_rng(2), 0)
    # a gradient that is another parameter's state: the step would write what it reads
    ps[2].grad = opt.state[ps[0]]["exp_avg"].reshape(-1)[:8].reshape(2, 2, 2)
    assert _kernels.cached(opt)
    before = state_of(opt)
    with pytest.raises(ValueError, match=r"\['params'\]\[2\]\.grad shares memory with "
                                         r"param_groups\[0\]\['params'\]\[0\]'s "
                                         r"state\['exp_avg'\]"):
        opt.step()
    assert state_of(opt) == before


def test_gradients_that_come_and_go():
    # a frozen parameter (no gradient) stays out of the cached step; one that gets a
    # gradient again is stepped through the full path, then cached again
    def change(opt, ps):
        ps[1].grad = None

    def then(opt, ps):
        feed(ps, np.random.default_rng(5), 1)

    twins(lambda: numpy_world("Adam", {"lr": 0.1}), change, then)


# ---- parameters and groups -------------------------------------------------------------------

def _replace_param(opt, ps):
    new = fastopt.Parameter(np.full((3, 4), 0.5, ps[0].dtype))
    new.grad = np.ones((3, 4), ps[0].dtype)
    opt.param_groups[0]["params"][0] = new


def _append_param(opt, ps):
    new = fastopt.Parameter(np.full(7, 0.5, ps[0].dtype))
    new.grad = np.ones(7, ps[0].dtype)
    opt.param_groups[0]["params"].append(new)


def _add_group(opt, ps):
    new = fastopt.Parameter(np.full(2, 0.5, ps[0].dtype))
    new.grad = np.ones(2, ps[0].dtype)
    opt.add_param_group({"params": [new], "lr": 0.5})


def _new_groups_list(opt, ps):
    opt.param_groups = [dict(g) for g in opt.param_groups]


def _list_twice(opt, ps):
    opt.param_groups[0]["params"].append(ps[1])


def _reshape_param(opt, ps):
    ps[0].shape = (4, 3)
    ps[0].grad = np.ones((4, 3), ps[0].dtype)


def _read_only_param(opt, ps):
    ps[3].flags.writeable = False


def _bad_lr(opt, ps):
    opt.param_groups[0]["lr"] = -1.0 if "lr" in opt.param_groups[0] else None


def _other_lr(opt, ps):
    opt.param_groups[0]["lr"] = 0.125


PARAM_CHANGES = {
    "a parameter replaced in its list": _replace_param,
    "a parameter appended": _append_param,
    "a group added": _add_group,
    "a new list of groups": _new_groups_list,
    "a parameter listed twice": _list_twice,
    "a parameter reshaped in place": _reshape_param,
    "a read-only parameter": _read_only_param,
    "another lr": _other_lr,
}


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("what", list(PARAM_CHANGES))
def test_a_changed_parameter_or_group_gives_the_full_paths_outcome(name, kwargs, what):
    got = twins(lambda: numpy_world(name, kwargs), PARAM_CHANGES[what])
    if what == "a read-only parameter":
        assert got[0] is ValueError and "read-only" in got[1]
    if what in ("another lr", "a parameter appended", "a group added",
                "a parameter replaced in its list", "a new list of groups"):
        assert got == "stepped"


@pytest.mark.parametrize("flag", ["amsgrad", "maximize"])
def test_a_flag_switched_on_gives_the_full_paths_outcome(flag):
    def change(opt, ps):
        opt.param_groups[0][flag] = True

    got = twins(lambda: numpy_world("Adam", {"lr": 0.01}), change)
    if flag == "amsgrad":  # the state lacks max_exp_avg_sq, as torch's would
        assert got[0] is KeyError
    else:
        assert got == "stepped"


# ---- group values: the same objects are not checked again, values that change in place are -----

def test_a_group_holding_the_same_values_is_not_checked_again():
    opt, ps = numpy_world("Adam", {"lr": 0.01})
    rng = np.random.default_rng(1)
    warm(opt, ps, rng)
    first = _kernels.cache_info(opt)
    for k in range(3):
        feed(ps, rng, k)
        opt.step()
    info = _kernels.cache_info(opt)
    assert info["served"] - first["served"] == 3
    assert info["groups_same"] - first["groups_same"] == 3
    # a new lr object (as a scheduler writes): the group is checked and packed again, then
    # its values are the same objects once more
    opt.param_groups[0]["lr"] = 0.02
    for k in range(2):
        feed(ps, rng, k)
        opt.step()
    again = _kernels.cache_info(opt)
    assert again["served"] - info["served"] == 2
    assert again["groups_same"] - info["groups_same"] == 1


def _mutable_world(name, key, wrap):
    def make():
        opt, ps = numpy_world(name, {"lr": 0.01})
        group = opt.param_groups[0]
        group[key] = wrap(group[key])
        return opt, ps
    return make


def _set(i, x):
    return lambda v: v.__setitem__(i, x)


# group values that the user can change in place, without a new object in the group
MUTABLE_VALUES = {
    "lr as a 0-d array, refilled": ("Adam", "lr", np.array, lambda v: v.fill(0.5)),
    "lr as a 1-element array, refilled": ("SGD", "lr", lambda x: np.array([x]),
                                          lambda v: v.fill(0.5)),
    "betas as a list, an entry set": ("Adam", "betas", list, _set(0, 0.5)),
    "betas as a list, beta2 set out of range": ("Adam", "betas", list, _set(1, 1.5)),
    "betas as a tuple holding a 0-d array": ("Adam", "betas",
                                             lambda b: (np.array(b[0]), b[1]),
                                             lambda v: v[0].fill(0.5)),
    "Lion's betas as a list, an entry set": ("Lion", "betas", list, _set(1, 0.5)),
}


@pytest.mark.parametrize("what", list(MUTABLE_VALUES))
def test_a_group_value_changed_in_place_gives_the_full_paths_outcome(what):
    name, key, wrap, mutate = MUTABLE_VALUES[what]

    def change(opt, ps):
        mutate(opt.param_groups[0][key])

    got = twins(_mutable_world(name, key, wrap), change)
    if "out of range" in what:
        assert got[0] is ValueError and "Invalid beta parameter at index 1" in got[1]
    else:
        assert got == "stepped"


def test_a_custom_step_check_runs_at_every_step():
    class Strict(fastopt.Adam):
        refuse = False

        def _check_step(self, frozen):
            super()._check_step(frozen)
            if self.refuse:
                raise ValueError("refused by the subclass")

    opt, ps = Strict([fastopt.Parameter(np.ones(3, np.float32))], lr=0.01), None
    ps = opt.param_groups[0]["params"]
    rng = np.random.default_rng(1)
    warm(opt, ps, rng)
    feed(ps, rng, 3)
    before = state_of(opt)
    opt.refuse = True
    with pytest.raises(ValueError, match="refused by the subclass"):
        opt.step()
    assert state_of(opt) == before


# ---- state -----------------------------------------------------------------------------------

def _first_array_key(opt, p):
    return next(k for k, v in opt.state[p].items()
                if isinstance(v, np.ndarray) and v.shape == p.shape)


def _entry(fn):
    def change(opt, ps):
        if not opt.state.get(ps[0]):
            return
        fn(opt, ps[0], opt.state[ps[0]])
    return change


def _has_arrays(opt, p, st):
    return any(isinstance(v, np.ndarray) and v.shape == p.shape for v in st.values())


def _replace_with(make):
    def fn(opt, p, st):
        if _has_arrays(opt, p, st):
            k = _first_array_key(opt, p)
            st[k] = make(st[k])
    return fn


def _step_as(value):
    def fn(opt, p, st):
        if "step" in st:
            st["step"] = value
    return fn


STATE_CHANGES = {
    "an entry replaced by an equal array": _entry(_replace_with(lambda v: v.copy())),
    "an entry of another shape": _entry(_replace_with(lambda v: np.zeros(v.size + 1, v.dtype))),
    "an entry of another dtype": _entry(_replace_with(
        lambda v: v.astype(np.float64 if v.dtype == np.float32 else np.float32))),
    "an entry reshaped in place": _entry(lambda opt, p, st: _has_arrays(opt, p, st) and setattr(
        st[_first_array_key(opt, p)], "shape", (4, 3))),
    "an entry made read-only": _entry(lambda opt, p, st: _has_arrays(opt, p, st) and setattr(
        st[_first_array_key(opt, p)].flags, "writeable", False)),
    "an entry resized in place": _entry(lambda opt, p, st: _has_arrays(opt, p, st) and st[
        _first_array_key(opt, p)].resize(20, refcheck=False)),
    "an entry deleted": _entry(lambda opt, p, st: _has_arrays(opt, p, st) and st.pop(
        _first_array_key(opt, p))),
    "an entry that is a view of the parameter": _entry(
        lambda opt, p, st: _has_arrays(opt, p, st)
        and st.__setitem__(_first_array_key(opt, p), p.view(np.ndarray))),
    "the step counter as float64": _entry(_step_as(np.array(3.0))),
    "the step counter as a Python number": _entry(_step_as(3.0)),
    "the step counter replaced by an equal array": _entry(
        lambda opt, p, st: "step" in st and st.__setitem__("step", st["step"].copy())),
    "the parameter's state emptied": lambda opt, ps: opt.state.__setitem__(ps[0], {}),
    "the parameter's state dict replaced by a copy": lambda opt, ps: opt.state.__setitem__(
        ps[0], dict(opt.state[ps[0]])) if ps[0] in opt.state else None,
    "the state dict replaced": lambda opt, ps: setattr(opt, "state", dict(opt.state)),
    "the state loaded from a state dict": lambda opt, ps: opt.load_state_dict(
        opt.state_dict()),
}


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("what", list(STATE_CHANGES))
def test_changed_state_gives_the_full_paths_outcome(name, kwargs, what):
    got = twins(lambda: numpy_world(name, kwargs), STATE_CHANGES[what],
                keeps_cache=what != "the state loaded from a state dict")
    stateful = not (name == "SGD" and "momentum" not in kwargs)
    if stateful and what in ("an entry of another shape", "an entry of another dtype",
                             "an entry made read-only",
                             "an entry that is a view of the parameter"):
        assert got != "stepped"
    if what in ("an entry replaced by an equal array", "the parameter's state emptied",
                "the state dict replaced", "the state loaded from a state dict"):
        assert got == "stepped"


# ---- what the cache holds on to -------------------------------------------------------------

def test_the_cache_keeps_no_gradient_and_not_the_optimizer_alive():
    p = fastopt.Parameter(np.ones(5, np.float32))
    opt = fastopt.Adam([p])
    for _ in range(3):
        p.grad = np.ones(5, np.float32)
        opt.step()
    assert _kernels.cached(opt)
    g = weakref.ref(p.grad)
    p.grad = None
    gc.collect()
    assert g() is None
    o = weakref.ref(opt)
    del opt
    gc.collect()
    assert o() is None


def test_loading_a_state_dict_lets_go_of_the_old_state():
    p = fastopt.Parameter(np.ones(5, np.float32))
    opt = fastopt.Adam([p])
    for _ in range(3):
        p.grad = np.ones(5, np.float32)
        opt.step()
    old = weakref.ref(opt.state[p]["exp_avg"])
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    del saved
    gc.collect()
    assert old() is None
    assert not _kernels.cached(opt)
