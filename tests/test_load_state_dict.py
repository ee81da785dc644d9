"""Optimizer.load_state_dict on bad input: every check runs before anything changes, and each
error names the key path (``state[0]['step']``, ``param_groups[0]['params'][1]``).

Over the optimizers of tests/optim_db.py: negative or non-finite steps, ids that match no
parameter (shifted, out of range, strings after a JSON round trip), malformed dicts, and a
Hypothesis fuzz of mutations of real state dicts."""
import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastopt
from helpers import assert_bits, snapshot
from optim_db import DB, OPTIM_DB

LOAD_ERRORS = (TypeError, ValueError, KeyError)

#: every optimizer whose state holds a step counter (SGD, Lion and Muon keep none, LBFGS
#: counts iterations in its own keys)
WITH_STEP = [info.name for info in OPTIM_DB if info.name not in ("SGD", "Lion", "Muon", "LBFGS")]
#: the optimizers stepped with a gradient (LBFGS needs a closure)
GRADIENT_STEPPED = [info.name for info in OPTIM_DB if info.name != "LBFGS"]


def _make(name, seed):
    """An optimizer of the database's first configuration on two float32 parameters."""
    info = DB[name]
    rng = np.random.default_rng(seed)
    shape = info.param_shape
    ps = [fastopt.Parameter(rng.standard_normal(shape).astype(np.float32)) for _ in range(2)]
    kwargs = dict(info.inputs[0].kwargs)
    if name == "SGD":
        kwargs["momentum"] = 0.9  # so that SGD has state
    return info.cls(ps, **kwargs), ps


def _step(name, opt, ps, seed):
    rng = np.random.default_rng(seed)
    if name == "LBFGS":
        def closure():
            for p in ps:
                p.grad = 2 * np.asarray(p)
            return float(sum((np.asarray(p) ** 2).sum() for p in ps))
        return opt.step(closure)
    for p in ps:
        g = rng.standard_normal(p.shape).astype(np.float32)
        p.grad = fastopt.SparseGrad(np.arange(p.shape[0]), g) if name == "SparseAdam" else g
    return opt.step()


def _trained(name, steps=3):
    opt, ps = _make(name, 0)
    for k in range(steps):
        _step(name, opt, ps, 100 + k)
    return copy.deepcopy(opt.state_dict())


class _Unchanged:
    """Everything a failed load could touch, to compare after it."""

    def __init__(self, opt, ps, sd):
        self.opt, self.ps = opt, ps
        self.snap = snapshot(opt, ps)
        self.state, self.groups = opt.state, opt.param_groups
        self.group_dicts = [dict(g) for g in opt.param_groups]
        self.sd = sd
        self.sd_repr = _repr(sd)

    def check(self):
        assert self.opt.state is self.state and self.opt.param_groups is self.groups
        assert [dict(g) for g in self.opt.param_groups] == self.group_dicts
        assert snapshot(self.opt, self.ps) == self.snap
        assert _repr(self.sd) == self.sd_repr  # the given dict is not modified either


def _repr(value, depth=0):
    """A comparable rendering of a (possibly self-referential) state dict."""
    if depth > 6:
        return "..."
    if isinstance(value, dict):
        return {repr(k): _repr(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__] + [_repr(v, depth + 1) for v in value]
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    return repr(value)


def _refused(name, sd, error, match):
    opt, ps = _make(name, 1)
    kept = _Unchanged(opt, ps, sd)
    with pytest.raises(error, match=match) as info:
        opt.load_state_dict(sd)
    kept.check()
    return info.value


# ---- the step counter ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1.0, -5.5, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", WITH_STEP)
def test_a_negative_or_non_finite_step_is_refused_at_load(name, value):
    """torch 2.13 loads these; its next step raises ZeroDivisionError (-1: a bias correction
    of 0), fails on complex numbers (-5.5) or writes NaN into the parameters."""
    sd = _trained(name)
    given = value if name == "SparseAdam" else np.array(value, np.float32)
    sd["state"][1]["step"] = given
    _refused(name, sd, ValueError, r"state\[1\]\['step'\] \(param_groups\[0\]\['params'\]\[1\]\)"
                                   r" is (nan|-?inf|-[0-9.]+): a step count must be a finite")


@pytest.mark.parametrize("name", WITH_STEP)
def test_a_step_that_is_no_number_is_refused_with_its_path(name):
    sd = _trained(name)
    for bad in ("x", None, [1.0], np.array(["1"]), np.zeros(2, np.float32)):
        sd["state"][0]["step"] = bad
        _refused(name, sd, (TypeError, ValueError), r"state\[0\]\['step'\]")


@pytest.mark.parametrize("name", WITH_STEP)
def test_a_zero_or_large_step_still_loads_and_steps(name):
    for value in (0, 1e6):
        sd = _trained(name)
        for s in sd["state"].values():
            s["step"] = int(value) if name == "SparseAdam" else np.array(value, np.float32)
        opt, ps = _make(name, 1)
        opt.load_state_dict(sd)
        _step(name, opt, ps, 7)
        assert all(np.isfinite(np.asarray(p)).all() for p in ps)
        assert float(opt.state[ps[0]]["step"]) == value + 1


# ---- ids --------------------------------------------------------------------------------------

def _continued(name, sd, steps=2):
    opt, ps = _make(name, 1)
    opt.load_state_dict(copy.deepcopy(sd))  # loaded arrays are the given ones, as in torch
    for k in range(steps):
        _step(name, opt, ps, 200 + k)
    return [np.asarray(p).copy() for p in ps], opt, ps


@pytest.mark.parametrize("name", GRADIENT_STEPPED)
def test_digit_string_ids_from_a_json_round_trip_load_as_the_same_ints(name):
    sd = _trained(name)
    text = json.dumps({str(k): list(v) for k, v in sd["state"].items()})
    keys = json.loads(text)  # JSON writes int keys as strings
    as_strings = dict(sd, state={k: sd["state"][int(k)] for k in keys})
    assert all(type(k) is str for k in as_strings["state"])
    expected, ref, qs = _continued(name, sd)
    got, opt, ps = _continued(name, as_strings)
    for a, b in zip(got, expected):
        assert_bits(a, b)
    for p, q in zip(ps, qs):  # no parameter restarted from empty state
        assert list(opt.state[p]) == list(ref.state[q])
        for key in ref.state[q]:
            assert_bits(np.asarray(opt.state[p][key]), np.asarray(ref.state[q][key]), key)


@pytest.mark.parametrize("name", GRADIENT_STEPPED)
def test_ids_that_match_no_parameter_are_refused(name):
    sd = _trained(name)
    shifted = dict(sd, state={k + 1: v for k, v in sd["state"].items()})
    _refused(name, shifted, KeyError, r"state\[2\]: no parameter of the saved param_groups has "
                                      r"id 2 \(their ids: \[0, 1\]\)")
    far = dict(sd, state={0: sd["state"][0], 99: sd["state"][1]})
    _refused(name, far, KeyError, r"state\[99\]")
    strings = dict(sd, state={"0": sd["state"][0], "7": sd["state"][1]})
    _refused(name, strings, KeyError, r"state\['7'\]: no parameter .* id 7")
    twice = dict(sd, state={0: sd["state"][0], "0": sd["state"][1]})
    _refused(name, twice, KeyError, r"id 0 is given twice")
    for key in (0.0, True):
        _refused(name, dict(sd, state={key: sd["state"][0]}), TypeError, r"state ids must be ints")


def test_group_ids_must_be_ints_and_name_one_parameter_each():
    sd = _trained("Adam")
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = [0, "1"]
    _refused("Adam", bad, TypeError, r"param_groups\[0\]\['params'\]\[1\] must be an int id")
    bad["param_groups"][0]["params"] = [1, 1]  # one id for two different parameters
    _refused("Adam", bad, ValueError, r"param_groups\[0\]\['params'\]\[1\]: id 1 is also at "
                                      r"param_groups\[0\]\['params'\]\[0\]")


@pytest.mark.parametrize("name", GRADIENT_STEPPED)
def test_a_parameter_without_saved_state_loads_and_starts_fresh_as_in_torch(name):
    sd = _trained(name)
    del sd["state"][1]
    opt, ps = _make(name, 1)
    opt.load_state_dict(sd)
    assert ps[0] in opt.state and len(opt.state.get(ps[1], {})) == 0
    _step(name, opt, ps, 5)
    if name != "Adagrad":  # Adagrad's state is made at construction
        fresh, qs = _make(name, 1)
        _step(name, fresh, qs, 5)
        assert_bits(np.asarray(ps[1]), np.asarray(qs[1]))


def test_keys_that_are_no_ids_are_kept_as_torch_keeps_them():
    opt, ps = _make("Adam", 0)
    _step("Adam", opt, ps, 1)
    opt.state["note"] = {"epoch": 3}
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"]["note"] == {"epoch": 3}
    other, qs = _make("Adam", 1)
    other.load_state_dict(sd)
    assert other.state["note"] == {"epoch": 3} and len(other.state[qs[1]]) == 3


# ---- malformed dicts ---------------------------------------------------------------------------

def _self_referential(sd):
    sd["state"][0]["loop"] = sd["state"][0]
    return sd


def _deep(sd):
    nested = []
    inner = nested
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    sd["state"][0]["deep"] = nested
    return sd


MALFORMED = [
    ("not a dict", lambda sd: [("state", {}), ("param_groups", [])], TypeError,
     r"state_dict must be a dict, got list"),
    ("no state", lambda sd: {"param_groups": sd["param_groups"]}, KeyError, r"no 'state' entry"),
    ("state is a list", lambda sd: dict(sd, state=[]), TypeError,
     r"state_dict\['state'\] must be a dict"),
    ("groups is a str", lambda sd: dict(sd, param_groups="abc"), TypeError,
     r"state_dict\['param_groups'\] must be a list of dicts, got str"),
    ("groups is None", lambda sd: dict(sd, param_groups=None), TypeError,
     r"state_dict\['param_groups'\] must be a list"),
    ("group is a list", lambda sd: dict(sd, param_groups=[[0, 1]]), TypeError,
     r"param_groups\[0\] must be a dict"),
    ("group without params", lambda sd: dict(sd, param_groups=[{"lr": 0.1}]), KeyError,
     r"param_groups\[0\] has no 'params'"),
    ("params is None", lambda sd: dict(sd, param_groups=[dict(sd["param_groups"][0],
                                                              params=None)]),
     TypeError, r"param_groups\[0\]\['params'\] must be a list of ids"),
    ("entry is a list", lambda sd: dict(sd, state={0: [1]}), TypeError,
     r"\(saved id 0\): saved state must be a dict, got list"),
    ("array is a str", lambda sd: dict(sd, state={0: dict(sd["state"][0], exp_avg="x")}),
     TypeError, r"\(saved id 0\): state\['exp_avg'\] must be an array, got str"),
    ("array of strings", lambda sd: dict(sd, state={0: dict(sd["state"][0],
                                                            exp_avg=np.array(["x"] * 3))}),
     TypeError, r"state\['exp_avg'\] has dtype <U1"),
    ("complex array", lambda sd: dict(sd, state={0: dict(sd["state"][0],
                                                         exp_avg=np.zeros(3, complex))}),
     TypeError, r"state\['exp_avg'\] has dtype complex128"),
    ("wrong shape", lambda sd: dict(sd, state={0: dict(sd["state"][0],
                                                       exp_avg_sq=np.zeros((3, 1)))}),
     ValueError, r"state\['exp_avg_sq'\] has shape \(3, 1\)"),
    ("missing array", lambda sd: dict(sd, state={0: {"step": sd["state"][0]["step"]}}),
     KeyError, r"\(saved id 0\): state has no 'exp_avg'"),
    ("amsgrad without its array", lambda sd: dict(sd, param_groups=[
        dict(sd["param_groups"][0], amsgrad=True)]),
     KeyError, r"state has no 'max_exp_avg_sq'"),
    ("step is a str", lambda sd: dict(sd, state={0: dict(sd["state"][0], step="x")}),
     TypeError, r"state\[0\]\['step'\] .* must be a number, got str 'x'"),
    ("self-referential", _self_referential, ValueError, r"state\[0\]\['loop'\] contains itself"),
    ("nested 5000 deep", _deep, ValueError, r"state\[0\]\['deep'\](\[0\])+: containers nested"),
    ("lr is nan", lambda sd: dict(sd, param_groups=[dict(sd["param_groups"][0],
                                                         lr=float("nan"))]),
     ValueError, r"loaded param_groups\[0\]\['lr'\] is nan"),
    ("beta is nan", lambda sd: dict(sd, param_groups=[dict(sd["param_groups"][0],
                                                           betas=(0.9, float("nan")))]),
     ValueError, r"loaded param_groups\[0\]: Invalid beta parameter at index 1: nan"),
    ("eps is nan", lambda sd: dict(sd, param_groups=[dict(sd["param_groups"][0],
                                                          eps=float("nan"))]),
     ValueError, r"loaded param_groups\[0\]\['eps'\] is nan"),
    ("lr is missing", lambda sd: dict(sd, param_groups=[{k: v for k, v in
                                                          sd["param_groups"][0].items()
                                                          if k != "lr"}]),
     KeyError, r"loaded param_groups\[0\] has no 'lr' entry, which the optimizer needs"),
    ("lr is a str", lambda sd: dict(sd, param_groups=[dict(sd["param_groups"][0], lr="x")]),
     TypeError, r"loaded param_groups\[0\]: lr must be a real number"),
]


@pytest.mark.parametrize("mutate,error,match", [pytest.param(*row[1:], id=row[0])
                                                for row in MALFORMED])
def test_a_malformed_state_dict_is_refused_with_its_path_and_changes_nothing(mutate, error,
                                                                             match):
    sd = _trained("Adam")
    # a loaded optimizer with state to keep: the failed load must leave it all in place
    opt, ps = _make("Adam", 1)
    opt.load_state_dict(copy.deepcopy(sd))
    kept = _Unchanged(opt, ps, None)
    bad = mutate(copy.deepcopy(sd))
    kept.sd, kept.sd_repr = bad, _repr(bad)
    with pytest.raises(error, match=match):
        opt.load_state_dict(bad)
    kept.check()


def test_an_error_of_a_subclass_cast_without_location_gets_one():
    class Strict(fastopt.Adam):
        def _cast_state(self, param, array, value, key, where):
            if key == "exp_avg":
                value.lerp_  # an attribute an array lacks: a raw AttributeError
            return super()._cast_state(param, array, value, key, where)

    sd = _trained("Adam")
    p = fastopt.Parameter(np.zeros(3, np.float32))
    opt = Strict([p, fastopt.Parameter(np.zeros(3, np.float32))])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] \(saved id 0\): "
                                        r"'numpy.ndarray' object has no attribute 'lerp_'"):
        opt.load_state_dict(sd)
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
def test_optimizers_without_a_kernel_check_their_state_at_load(name):
    sd = _trained(name)
    key = "momentum_buffer" if name == "Muon" else "variance" if "variance" in sd["state"][0] \
        else "row_var"
    sd["state"][0][key] = "x"  # the base cast keeps values it has no rule for
    _refused(name, sd, ValueError, rf"\['params'\]\[0\] \(saved id 0\): state\['{key}'\] must be a "
                                   rf"writable "
                                   rf"float32 array")


# ---- fuzz: mutations of real state dicts -------------------------------------------------------

FUZZED = ["Adam", "SGD", "RMSprop", "NAdam", "ASGD", "Adagrad", "Rprop", "Adafactor",
          "SparseAdam", "Muon", "LBFGS"]
_SAVED = {}


def _saved(name):
    if name not in _SAVED:
        _SAVED[name] = _trained(name)
    return copy.deepcopy(_SAVED[name])


def _paths(name, sd):
    """Key paths of ``sd`` a mutation may target: the two entries, every parameter state
    and its entries, every group and its numeric, pair and id entries."""
    opt, _ = _make(name, 0)
    numeric, _, pairs = opt._hyper_kinds()
    out = [("state",), ("param_groups",)]
    for k, s in sd["state"].items():
        out.append(("state", k))
        out += [("state", k, key) for key in s]
    for gi, g in enumerate(sd["param_groups"]):
        out.append(("param_groups", gi))
        out += [("param_groups", gi, key) for key in ("params",) + numeric
                + tuple(key for key, _ in pairs) if key in g and (name, key) not in _UNCHECKED]
    return out


#: group entries whose type the optimizer checks neither at load nor before its step
#: changes anything: Muon's ns_steps of 1.5 fails in range() after the first parameter's
#: momentum buffer moved
_UNCHECKED = {("Muon", "ns_steps")}


def _replacement(kind, old, container):
    if kind == "float64 copy":
        return np.asarray(old, np.float64) if isinstance(old, np.ndarray) else old
    return {
        "None": None, "str": "x", "float": 1.5, "nan": float("nan"), "negative": -1,
        "list": [1, 2], "empty dict": {}, "dict": {"a": 1}, "array 7": np.zeros(7, np.float32),
        "complex": np.zeros(np.shape(old), np.complex64), "strings": np.full(np.shape(old), "x"),
        "itself": container,
    }[kind]


MUTATIONS = ["delete", "None", "str", "float", "nan", "negative", "list", "empty dict", "dict",
             "array 7", "complex", "strings", "itself", "float64 copy"]


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(FUZZED), data=st.data())
def test_fuzzed_state_dicts_are_refused_cleanly_or_load_and_step_cleanly(name, data):
    """About 2500 (optimizer, path, mutation) cases in all: 3000 examples cover them."""
    sd = _saved(name)
    path = data.draw(st.sampled_from(_paths(name, sd)), label="path")
    kind = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    parent = sd
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    else:
        parent[path[-1]] = _replacement(kind, parent[path[-1]], parent)
    opt, ps = _make(name, 1)
    kept = _Unchanged(opt, ps, sd)
    try:
        opt.load_state_dict(sd)
    except LOAD_ERRORS as e:
        text = str(e)
        assert "state" in text or "param_groups" in text, text
        kept.check()
        event("refused at load")
        return
    # the mutation was accepted: the next step runs, or refuses with nothing changed
    if name == "LBFGS":
        return  # its step counts evaluations before it checks its state
    before = snapshot(opt, ps)
    try:
        _step(name, opt, ps, 300)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        assert snapshot(opt, ps) == before, e
        event("loaded, refused at step")
        return
    event("loaded and stepped")
    if kind == "float64 copy":  # cast back to float32 exactly: the same continuation
        ref, qs = _make(name, 1)
        ref.load_state_dict(_saved(name))
        _step(name, ref, qs, 300)
        for p, q in zip(ps, qs):
            assert_bits(np.asarray(p), np.asarray(q))
