"""Optimizers given dicts and nested containers of parameters: the flattening order, the
names recorded as torch's ``param_names``, and numbers equal to a plain list's."""
from collections import OrderedDict, namedtuple

import numpy as np
import pytest

import fastopt
from fastopt import _pytree
from helpers import P, assert_bits, grads, import_torch
from optim_db import configs


def _tree():
    return {"enc": {"w": P(3, seed=1), "b": P(2, seed=2)}, "dec": [P(4, seed=3), P(1, seed=4)],
            "a": P(2, 2, dtype=np.float64, seed=5)}


def test_dict_of_parameters_is_named_by_sorted_key_paths():
    tree = _tree()
    opt = fastopt.Adam(tree, lr=0.1)
    group = opt.param_groups[0]
    assert group["param_names"] == ["a", "dec.0", "dec.1", "enc.b", "enc.w"]
    expected = [tree["a"], tree["dec"][0], tree["dec"][1], tree["enc"]["b"], tree["enc"]["w"]]
    assert all(p is q for p, q in zip(group["params"], expected))
    assert len(group["params"]) == 5
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == group["param_names"]
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3, 4]


def test_ordered_dict_keeps_its_order():
    w, b = P(3), P(2)
    opt = fastopt.SGD(OrderedDict([("w", w), ("b", b)]), lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["w", "b"]
    assert opt.param_groups[0]["params"][0] is w


def test_flattening_order_is_autograds():
    """The leaves come in the order of autograd.misc.flatten (dicts by sorted keys)."""
    flatten = pytest.importorskip("autograd.misc").flatten
    tree = {"z": np.arange(2.0), "a": [np.arange(3.0) + 10, (np.arange(1.0) + 20,)],
            "m": {"y": np.arange(2.0) + 30, "b": np.arange(2.0) + 40}}
    leaves, _ = _pytree.flatten(tree)
    flat, _ = flatten(tree)
    np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in leaves]), flat)


def test_unflatten_rebuilds_the_containers():
    Pair = namedtuple("Pair", "x y")
    tree = {"b": [1, (2, 3)], "a": Pair(4, {"q": 5, "p": 6}), "c": OrderedDict(z=7, y=8)}
    leaves, treedef = _pytree.flatten(tree)
    assert leaves == [4, 6, 5, 1, 2, 3, 7, 8]
    back = _pytree.unflatten(treedef, leaves)
    assert back == tree and type(back["a"]) is Pair and type(back["c"]) is OrderedDict
    assert type(back["b"][1]) is tuple


@pytest.mark.parametrize("name,kwargs", configs())
def test_dict_steps_as_the_same_parameters_in_a_list(name, kwargs):
    cls = getattr(fastopt, name)
    tree, twin = _tree(), _tree()
    opt = cls(tree, **kwargs)
    flat = [twin["a"], twin["dec"][0], twin["dec"][1], twin["enc"]["b"], twin["enc"]["w"]]
    ref = cls(flat, **kwargs)
    rng = np.random.default_rng(0)
    for k in range(3):
        for p, q in zip(opt.param_groups[0]["params"], flat):
            p.grad = grads(rng, p.shape, p.dtype, k)
            q.grad = p.grad.copy()
        opt.step()
        ref.step()
    for p, q in zip(opt.param_groups[0]["params"], flat):
        assert_bits(p, q, name)
        for key, value in ref.state[q].items():
            assert_bits(opt.state[p][key], value, f"{name} {key}")


def test_state_dict_names_match_torchs_named_parameters():
    torch = import_torch(vector_kernels=False)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    named = {name: fastopt.Parameter(t.detach().numpy().copy())
             for name, t in model.named_parameters()}
    # torch keeps the module's order; the same names sorted give the dict's order
    topt = torch.optim.Adam(sorted(model.named_parameters()), lr=0.1)
    opt = fastopt.Adam(named, lr=0.1)
    assert (opt.state_dict()["param_groups"][0]["param_names"]
            == topt.state_dict()["param_groups"][0]["param_names"]
            == ["0.bias", "0.weight", "1.bias", "1.weight"])


def test_group_params_as_a_dict_and_add_param_group():
    w, b, c = P(3), P(2), P(1)
    opt = fastopt.SGD([{"params": {"w": w}, "lr": 0.5}, {"params": {"b": b}}], lr=0.1)
    assert [g["param_names"] for g in opt.param_groups] == [["w"], ["b"]]
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[1]["lr"] == 0.1
    opt.add_param_group({"params": {"head": {"c": c}}, "lr": 0.2})
    assert opt.param_groups[2]["param_names"] == ["head.c"]
    assert opt.param_groups[2]["params"][0] is c
    with pytest.raises(ValueError, match="cannot add param group without names"):
        opt.add_param_group({"params": [P(2)]})


def test_state_dict_round_trip_with_names():
    tree = _tree()
    opt = fastopt.AdamW(tree, lr=0.1)
    for p in opt.param_groups[0]["params"]:
        p.grad = np.ones_like(p)
    opt.step()
    other_tree = _tree()
    other = fastopt.AdamW(other_tree, lr=0.3)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 0.1
    assert other.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]
    for p, q in zip(opt.param_groups[0]["params"], other.param_groups[0]["params"]):
        assert_bits(other.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_nested_lists_and_tuples_without_dicts_have_no_names():
    w1, b1, w2, b2 = P(3), P(2), P(4), P(1)
    opt = fastopt.Adam([(w1, b1), [w2, (b2,)]])
    group = opt.param_groups[0]
    assert "param_names" not in group
    assert all(p is q for p, q in zip(group["params"], [w1, b1, w2, b2]))
    assert len(group["params"]) == 4


def test_a_named_pair_may_hold_a_container():
    w, b, c = P(3), P(2), P(1)
    opt = fastopt.SGD([("enc", {"w": w, "b": b}), ("head", c)], lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["enc.b", "enc.w", "head"]
    assert [p is q for p, q in zip(opt.param_groups[0]["params"], [b, w, c])] == [True] * 3


def test_a_tuple_of_two_parameters_is_not_a_named_pair():
    """(w, b) used to be read as the pair (name w, parameter b): w was lost."""
    w, b = P(3), P(2)
    opt = fastopt.SGD([(w, b)], lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 2 and opt.param_groups[0]["params"][0] is w
    assert "param_names" not in opt.param_groups[0]


def test_list_of_dicts_of_parameters_is_a_pytree():
    """autograd's layer lists: [{'W': ..., 'b': ...}, ...]; no dict has a 'params' entry."""
    layers = [{"W": P(3, 2), "b": P(2)}, {"W": P(2, 1), "b": P(1)}]
    opt = fastopt.Adam(layers)
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["param_names"] == ["0.W", "0.b", "1.W", "1.b"]


def test_group_dicts_keep_torchs_rules():
    # a dict with hyperparameters but no 'params' is a broken group, as in torch
    with pytest.raises(KeyError, match="params"):
        fastopt.Adam([{"lr": 0.1}])
    with pytest.raises(ValueError, match="with/without names"):
        fastopt.Adam([("w", P(3)), [P(2)]])
    with pytest.raises(ValueError, match="empty parameter list"):
        fastopt.Adam({})


def test_bad_leaves_and_keys_are_named():
    with pytest.raises(TypeError, match=r"one of the params is str \(param_names\[1\] 's'\)"):
        fastopt.Adam({"a": P(2), "s": "text"})
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is a numpy"):
        fastopt.Adam({"w": np.zeros(3, np.float32)})
    with pytest.raises(TypeError, match="must be sortable"):
        fastopt.Adam({"w": P(2), 1: P(2)})
    loop = {"w": P(2)}
    loop["self"] = loop
    with pytest.raises(ValueError, match=r"params\['self'\] contains itself"):
        fastopt.Adam(loop)


def test_torch_tensors_in_a_dict():
    torch = import_torch(vector_kernels=False)
    w = torch.nn.Parameter(torch.ones(3))
    opt = fastopt.SGD({"w": w}, lr=0.5)
    w.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["param_names"] == ["w"]
    assert torch.equal(w.detach(), torch.full((3,), 0.5))
