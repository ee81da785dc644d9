"""torch.optim's Optimizer contract: construction, groups, zero_grad, closures, threads, hooks,
state_dict / load_state_dict, repr and pickling. (Bad input is in test_invalid_input.py.)"""
import copy
import pickle

import numpy as np
import pytest

import fastopt
from fastopt.optimizer import (register_optimizer_step_post_hook,
                               register_optimizer_step_pre_hook)
from helpers import P, assert_bits, snapshot
from optim_db import DB, configs


# ---- construction and groups --------------------------------------------------------------------
def test_params_must_be_an_iterable_of_parameters():
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        fastopt.SGD(P(3))
    with pytest.raises(ValueError, match="empty parameter list"):
        fastopt.SGD([])
    with pytest.raises(TypeError, match=r"wrap it: fastopt.Parameter\(x\)"):
        fastopt.SGD([np.zeros(3, np.float32)])
    with pytest.raises(TypeError, match="can only optimize Tensors"):
        fastopt.SGD([[1.0, 2.0]])
    with pytest.raises(TypeError, match="ordered collections"):
        fastopt.SGD([{"params": {P(2)}}])
    with pytest.raises(KeyError):
        fastopt.SGD([{"lr": 0.1}])


def test_parameter_wraps_without_copy_and_rejects_other_dtypes():
    x = np.zeros((2, 3), np.float32)
    p = fastopt.Parameter(x)
    assert np.shares_memory(np.asarray(p), x)
    assert p.grad is None and hash(p) == object.__hash__(p)
    opt = fastopt.SGD([p], lr=1.0)
    p.grad = np.ones((2, 3), np.float32)
    opt.step()
    assert (x == -1).all()  # the update is seen through the original array
    for bad in (np.zeros(3, np.int64), np.zeros(3, np.int16), np.zeros(3, np.complex64),
                np.zeros(3, ">f4"), np.zeros(3, ">f2")):
        with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
            fastopt.Parameter(bad)
    with pytest.raises(ValueError, match="C-contiguous"):
        fastopt.Parameter(np.zeros((4, 4), np.float32)[:, ::2])
    assert type(p * 2) is np.ndarray and type(p[0]) is np.ndarray


def test_groups_defaults_and_extra_keys():
    a, b = P(3), P(2, 2)
    opt = fastopt.SGD([{"params": [a]}, {"params": b, "lr": 0.5, "note": "head"}],
                      lr=0.1, momentum=0.9)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[1]["note"] == "head"
    assert opt.param_groups[1]["params"] == [b] or opt.param_groups[1]["params"][0] is b
    assert opt.param_groups[1]["momentum"] == 0.9
    c = P(4)
    opt.add_param_group({"params": [c], "momentum": 0.5})
    assert opt.param_groups[2]["momentum"] == 0.5 and opt.param_groups[2]["lr"] == 0.1
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})
    assert len(opt.param_groups) == 3
    with pytest.raises(TypeError, match="param_group must be a dict"):
        opt.add_param_group([c])


def test_add_param_group_with_bad_values_changes_nothing():
    a = P(3)
    opt = fastopt.Adam([a])
    group = {"params": [P(2)], "lr": -1.0}
    with pytest.raises(ValueError, match=r"param_groups\[1\]: Invalid learning rate"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and group == {"params": group["params"], "lr": -1.0}
    assert "betas" not in group


def test_named_parameters():
    a, b = P(3), P(2)
    opt = fastopt.Adam([("w", a), ("b", b)])
    assert opt.param_groups[0]["param_names"] == ["w", "b"]
    assert opt.param_groups[0]["params"] == [a, b] or opt.param_groups[0]["params"][1] is b
    with pytest.raises(ValueError, match="with/without names"):
        fastopt.Adam([("w", P(3)), P(2)])
    with pytest.raises(ValueError, match="cannot add param group without names"):
        opt.add_param_group({"params": [P(2)]})


def test_duplicate_parameter_warns_and_is_updated_twice():
    p = P(4)
    x = np.asarray(p).copy()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = fastopt.SGD([p, p], lr=0.1)
    p.grad = np.ones(4, np.float32)
    opt.step()
    np.testing.assert_array_equal(np.asarray(p), (x - np.float32(0.1)) - np.float32(0.1))


def test_duplicate_parameter_with_threads_is_updated_in_order(threads):
    """Split over two threads, both occurrences still run one after the other (as torch)."""
    threads(2)
    p = fastopt.Parameter(np.zeros(200000, np.float32))
    with pytest.warns(UserWarning):
        opt = fastopt.Adam([p, p], lr=0.1)
    q = fastopt.Parameter(np.zeros(200000, np.float32))
    ref = fastopt.Adam([q], lr=0.1)
    g = np.random.default_rng(0).standard_normal(200000).astype(np.float32)
    p.grad = g
    q.grad = g
    opt.step()
    ref.step()
    ref.step()
    assert np.array_equal(np.asarray(p), np.asarray(q))
    assert float(opt.state[p]["step"]) == 2.0


# ---- stepping -----------------------------------------------------------------------------------
def test_step_returns_closure_value_and_zero_grad():
    p = P(3)
    opt = fastopt.SGD([p], lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        p.grad = np.ones(3, np.float32)
        return 1.25

    assert opt.step(closure) == 1.25 and calls == [1]
    assert opt.step() is None
    opt.zero_grad()
    assert p.grad is None
    p.grad = np.ones(3, np.float32)
    g = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is g and (g == 0).all()


def test_state_is_created_lazily_except_adagrad():
    p = P(3)
    assert len(fastopt.Adam([p]).state) == 0
    ada = fastopt.Adagrad([p], initial_accumulator_value=0.25)
    assert float(ada.state[p]["step"]) == 0.0
    assert ada.state[p]["step"].dtype == np.float32 and ada.state[p]["step"].shape == ()
    np.testing.assert_array_equal(ada.state[p]["sum"], np.full(3, 0.25, np.float32))
    # a group added later starts from the constructor's value, not the group's (torch)
    q = P(2)
    ada.add_param_group({"params": [q], "initial_accumulator_value": 9.0})
    assert q not in ada.state
    q.grad = np.zeros(2, np.float32)
    ada.step()
    np.testing.assert_array_equal(ada.state[q]["sum"], np.full(2, 0.25, np.float32))


@pytest.mark.parametrize("name,kwargs", configs(where=lambda info: info.lr_scales_update))
def test_lr_zero_leaves_parameters_unchanged(name, kwargs):
    """(Rprop is left out: its lr only seeds the step sizes, which are clamped from below.)"""
    p = P(37)
    x = np.asarray(p).copy()
    opt = fastopt.OPTIMIZERS[name]([p], **dict(kwargs, lr=0.0))
    rng = np.random.default_rng(1)
    for _ in range(3):
        p.grad = rng.standard_normal(37).astype(np.float32)
        opt.step()
    assert_bits(p, x)


@pytest.mark.parametrize("name,kwargs",
                         configs(where=lambda info: "maximize" in info.flags))
def test_maximize_equals_minimizing_the_negated_gradient(name, kwargs):
    a, b = P(50), P(50)
    oa = fastopt.OPTIMIZERS[name]([a], **dict(kwargs, maximize=True))
    ob = fastopt.OPTIMIZERS[name]([b], **dict(kwargs, maximize=False))
    rng = np.random.default_rng(4)
    for _ in range(5):
        g = rng.standard_normal(50).astype(np.float32)
        a.grad, b.grad = g, -g
        oa.step()
        ob.step()
    assert_bits(a, b)


def test_mixed_dtypes_in_one_group():
    a, b = P(5), P(5, dtype=np.float64)
    opt = fastopt.Adam([a, b], lr=0.1)
    a.grad = np.ones(5, np.float32)
    b.grad = np.ones(5, np.float64)
    opt.step()
    assert opt.state[a]["exp_avg"].dtype == np.float32
    assert opt.state[b]["exp_avg"].dtype == np.float64
    # the first Adam step moves every element by lr * g / (|g| + eps)
    np.testing.assert_allclose(np.asarray(a) - np.asarray(P(5)), -0.1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b) - np.asarray(P(5, dtype=np.float64)),
                               -0.1 / (1 + 1e-8), rtol=1e-12)


def test_non_contiguous_grad_is_used_correctly():
    p, q = P(4, 3), P(4, 3)
    o1, o2 = fastopt.Adam([p], lr=0.1), fastopt.Adam([q], lr=0.1)
    g = np.asfortranarray(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    p.grad = g
    q.grad = np.ascontiguousarray(g)
    o1.step()
    o2.step()
    assert np.array_equal(np.asarray(p), np.asarray(q))
    r = P(3)
    o3 = fastopt.SGD([r], lr=1.0)
    r.grad = np.arange(6, dtype=np.float32)[::2]
    before = np.asarray(r).copy()
    o3.step()
    np.testing.assert_array_equal(np.asarray(r), before - np.array([0, 2, 4], np.float32))


def test_a_flag_is_read_once_per_step():
    """The flags that choose state buffers are frozen when the step checks them, so a value
    whose truth changes later cannot send the kernel to a buffer that was never bound."""

    class Flaky:
        calls = 0

        def __bool__(self):
            Flaky.calls += 1
            return Flaky.calls > 1

    p = P(5)
    opt = fastopt.Adam([p])
    p.grad = np.ones(5, np.float32)
    opt.step()
    opt.param_groups[0]["amsgrad"] = Flaky()
    opt.step()  # read once as False: a plain Adam step
    assert "max_exp_avg_sq" not in opt.state[p] and float(opt.state[p]["step"]) == 2.0


def test_one_element_array_hyperparameters_are_accepted():
    a, b = P(3), P(3)
    oa = fastopt.Adam([a], lr=0.1)
    ob = fastopt.Adam([b], lr=0.1)
    oa.param_groups[0]["lr"] = np.array([0.05], np.float64)
    ob.param_groups[0]["lr"] = 0.05
    a.grad, b.grad = np.ones(3, np.float32), np.ones(3, np.float32)
    oa.step()
    ob.step()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- threads and overlapping memory -------------------------------------------------------------
def test_overlapping_parameters_update_in_list_order_with_threads(threads):
    """Two parameters over overlapping memory: with two threads the step still runs them
    one after the other (no lost updates), as torch's loop does."""
    n = 200000
    results = []
    for nthreads in (1, 2):
        threads(nthreads)
        base = np.zeros(n + 16, np.float32)
        p1, p2 = fastopt.Parameter(base[16:]), fastopt.Parameter(base[:n])
        opt = fastopt.SGD([p1, p2], lr=1.0)
        p1.grad = np.ones(n, np.float32)
        p2.grad = np.ones(n, np.float32)
        opt.step()
        results.append(base.copy())
    np.testing.assert_array_equal(results[0], results[1])
    assert (results[0][16:n] == -2).all()


def test_concurrent_steps_from_two_threads_do_not_crash():
    import threading
    ps = [fastopt.Parameter(np.zeros(100000, np.float32)) for _ in range(3)]
    for p in ps:
        p.grad = np.ones(p.shape, np.float32)
    opt = fastopt.Adam(ps)
    opt.step()
    errors = []

    def run():
        try:
            for _ in range(30):
                opt.step()
        except RuntimeError as e:  # overlapping steps are refused, never run
            errors.append(e)

    workers = [threading.Thread(target=run) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all("another thread runs a step" in str(e) for e in errors)
    assert all(np.isfinite(np.asarray(p)).all() for p in ps)


# ---- hooks --------------------------------------------------------------------------------------
def test_step_hooks_run_in_torch_order_and_can_be_removed():
    p = P(2)
    opt = fastopt.SGD([p], lr=0.1)
    order = []
    h1 = register_optimizer_step_pre_hook(lambda o, a, k: order.append("global pre"))
    h2 = register_optimizer_step_post_hook(lambda o, a, k: order.append("global post"))
    h3 = opt.register_step_pre_hook(lambda o, a, k: order.append("pre"))
    h4 = opt.register_step_post_hook(lambda o, a, k: order.append("post"))
    try:
        opt.step(lambda: order.append("closure"))
    finally:
        for h in (h1, h2, h3, h4):
            h.remove()
    assert order == ["global pre", "pre", "closure", "post", "global post"]
    order.clear()
    opt.step()
    assert order == []
    bad = opt.register_step_pre_hook(lambda o, a, k: 42)
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()
    bad.remove()


def test_step_hooks_see_the_optimizer_in_args_and_can_replace_the_closure():
    p = P(2)
    opt = fastopt.SGD([p], lr=0.1)
    seen = []

    def hook(o, args, kwargs):
        seen.append(args)
        self_, closure = args
        return (self_, lambda: closure() * 2), kwargs

    h = opt.register_step_pre_hook(hook)
    assert opt.step(lambda: 1.5) == 3.0
    h.remove()
    assert seen[0][0] is opt and len(seen[0]) == 2


def test_state_dict_hooks():
    p = P(2)
    opt = fastopt.SGD([p], lr=0.1)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: dict(sd, extra=1))
    sd = opt.state_dict()
    assert seen == ["pre"] and sd["extra"] == 1
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items()
                                                         if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
    opt.load_state_dict(sd)
    assert seen[-1] == "loaded"


# ---- state_dict ---------------------------------------------------------------------------------
def test_state_dict_format():
    a, b, c = P(2), P(3), P(4)
    opt = fastopt.Adam([{"params": [a, b]}, {"params": [c], "lr": 0.1}])
    c.grad = np.ones(4, np.float32)
    opt.step()
    a.grad = np.ones(2, np.float32)
    opt.step()
    sd = opt.state_dict()
    assert list(sd["state"]) == [2, 0]  # order in which parameters first got state
    assert sd["param_groups"][0]["params"] == [0, 1]
    assert sd["param_groups"][1]["params"] == [2]
    assert sd["param_groups"][1]["lr"] == 0.1
    assert sd["state"][2]["exp_avg"] is opt.state[c]["exp_avg"]  # live arrays, as torch
    assert float(sd["state"][2]["step"]) == 2.0 and float(sd["state"][0]["step"]) == 1.0


@pytest.mark.parametrize("name,kwargs", configs())
def test_state_dict_round_trip_in_lockstep(name, kwargs):
    """torch's test: run, save, load into a fresh optimizer, step both: identical, and the
    saved dict is unchanged by the later steps of the new optimizer."""
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal(s).astype(np.float32) for s in [(5,), (3, 4)]]
    ps = [fastopt.Parameter(x.copy()) for x in xs]
    opt = fastopt.OPTIMIZERS[name]([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.03}],
                                   **kwargs)

    def grads(params):
        out = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        return out

    for _ in range(5):
        for p, g in zip(ps, grads(ps)):
            p.grad = g
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    qs = [fastopt.Parameter(np.asarray(p).copy()) for p in ps]
    opt2 = fastopt.OPTIMIZERS[name]([{"params": qs[:1]}, {"params": qs[1:]}], **kwargs)
    saved = copy.deepcopy(sd)
    opt2.load_state_dict(sd)
    # loading does not change the dict it was given
    assert saved["param_groups"] == sd["param_groups"]
    for k, v in saved["state"].items():
        for kk, vv in v.items():
            np.testing.assert_array_equal(vv, sd["state"][k][kk])
    assert opt2.param_groups[1]["lr"] == 0.03
    for _ in range(5):
        gs = grads(ps)
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g, g.copy()
        opt.step()
        opt2.step()
        for p, q in zip(ps, qs):
            assert_bits(p, q)
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    assert list(sd1["state"]) == list(sd2["state"])
    for k in sd1["state"]:
        assert list(sd1["state"][k]) == list(sd2["state"][k])
        for kk in sd1["state"][k]:
            assert_bits(sd1["state"][k][kk], sd2["state"][k][kk])
            assert type(sd1["state"][k][kk]) is type(sd2["state"][k][kk]), kk


def _sparse_or_dense(name, p, g):
    if name == "SparseAdam":
        return fastopt.SparseGrad(np.arange(p.shape[0]), g)
    return g


@pytest.mark.parametrize("name,kwargs", configs([DB["SparseAdam"], DB["Adafactor"], DB["Muon"]]))
def test_state_dict_round_trip_sparse_factored_and_matrix_optimizers(name, kwargs):
    """The same for SparseAdam (sparse gradients), Adafactor (factored state of vectors,
    matrices and 3-D tensors) and Muon (matrices): the continuation is identical and the
    loaded state entries keep their types (SparseAdam's step stays an int)."""
    rng = np.random.default_rng(14)
    shapes = [(6, 4), (4, 6)] if name != "Adafactor" else [(6, 4), (5,), (2, 3, 4)]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(8)]
    xs = [rng.standard_normal(s) for s in shapes]
    a = [fastopt.Parameter(x.copy()) for x in xs]
    b = [fastopt.Parameter(x.copy()) for x in xs]
    cls = DB[name].cls
    oa, ob = cls(a, **kwargs), cls(b, **kwargs)
    for k, gs in enumerate(grads):
        if k == 4:
            sd = ob.state_dict()
            b = [fastopt.Parameter(np.asarray(p).copy()) for p in b]
            ob = cls(b, **kwargs)
            ob.load_state_dict(sd)
        for p, q, g in zip(a, b, gs):
            p.grad = _sparse_or_dense(name, p, g)
            q.grad = _sparse_or_dense(name, q, g)
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert_bits(p, q)
        for key in oa.state[p]:
            assert np.array_equal(np.asarray(oa.state[p][key]), np.asarray(ob.state[q][key]))
            assert type(oa.state[p][key]) is type(ob.state[q][key]), key


def test_load_state_dict_errors_leave_optimizer_unchanged():
    a, b = P(3), P(2)
    opt = fastopt.Adam([a, b])
    a.grad, b.grad = np.ones(3, np.float32), np.ones(2, np.float32)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    other = fastopt.Adam([P(3), P(2)], lr=0.5)
    before = snapshot(other, other.param_groups[0]["params"])
    state_before = other.state

    bad = copy.deepcopy(sd)
    bad["param_groups"].append(dict(bad["param_groups"][0], params=[7]))
    with pytest.raises(ValueError, match="different number of parameter groups"):
        other.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = [0]
    with pytest.raises(ValueError, match="doesn't match the size"):
        other.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][1]["exp_avg"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] \(saved id 1\): state\['exp_avg'\]"
                                         r" has shape \(5,\)"):
        other.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["lr"] = "fast"
    with pytest.raises(TypeError, match=r"loaded param_groups\[0\]: lr must be a real number"):
        other.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["betas"] = (0.9,)
    with pytest.raises(ValueError, match=r"loaded param_groups\[0\]: betas must have 2"):
        other.load_state_dict(bad)
    assert other.state is state_before and other.param_groups[0]["lr"] == 0.5
    assert snapshot(other, other.param_groups[0]["params"]) == before


def test_load_casts_state_to_parameter_dtype_and_backfills_flags():
    a = P(3)
    opt = fastopt.AdamW([a])
    a.grad = np.ones(3, np.float32)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for key in ("amsgrad", "maximize", "decoupled_weight_decay"):
        del sd["param_groups"][0][key]
    b = P(3, dtype=np.float64)
    opt64 = fastopt.AdamW([b])
    opt64.load_state_dict(sd)
    assert opt64.state[b]["exp_avg"].dtype == np.float64
    assert opt64.state[b]["step"].dtype == np.float32
    g = opt64.param_groups[0]
    assert g["amsgrad"] is False and g["maximize"] is False
    assert g["decoupled_weight_decay"] is True  # AdamW forces it, as torch
    sd["state"][0]["step"] = 7  # an old checkpoint's Python number
    opt.load_state_dict(sd)
    assert opt.state[a]["step"].dtype == np.float32 and float(opt.state[a]["step"]) == 7.0


def test_pickle_and_deepcopy_keep_parameters_and_state_together():
    a = P(3)
    opt = fastopt.Adam([a], lr=0.1)
    a.grad = np.ones(3, np.float32)
    opt.step()
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        (p,) = clone.param_groups[0]["params"]
        assert p is not a and p in clone.state
        np.testing.assert_array_equal(np.asarray(p), np.asarray(a))
        p.grad = np.ones(3, np.float32)
        clone.step()
        assert float(clone.state[p]["step"]) == 2.0


def test_state_arrays_are_plain_arrays_and_repeated_ids_follow_torch():
    a, b, c = P(2), P(3), P(4)
    with pytest.warns(UserWarning):
        opt = fastopt.Adam([{"params": [a]}, {"params": [b, c, b]}])
    for p in (a, b, c):
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    assert type(opt.state[a]["exp_avg"]) is np.ndarray
    sd = opt.state_dict()
    # torch numbers a repeated parameter by its last position in the group: [3, 2, 3]
    assert [g["params"] for g in sd["param_groups"]] == [[0], [3, 2, 3]]


# ---- hyperparameters of any type torch accepts -------------------------------------------------

def _two_steps(cls, **kwargs):
    p = fastopt.Parameter(np.linspace(-1, 1, 7, dtype=np.float32))
    p.grad = np.linspace(1, -2, 7, dtype=np.float32)
    opt = cls([p], **kwargs)
    opt.step()
    opt.step()
    return np.array(p), opt


@pytest.mark.parametrize("name, given, same_as", [
    ("NAdam", dict(betas=[0.8, 0.9]), dict(betas=(0.8, 0.9))),
    ("RAdam", dict(betas=[0.8, 0.9]), dict(betas=(0.8, 0.9))),
    ("Adamax", dict(betas=[0.8, 0.9]), dict(betas=(0.8, 0.9))),
    ("Lion", dict(betas=[0.8, 0.9]), dict(betas=(0.8, 0.9))),
    ("Lion", dict(betas=np.array([0.8, 0.9])), dict(betas=(0.8, 0.9))),
    ("Rprop", dict(etas=[0.4, 1.3], step_sizes=[1e-5, 10]),
     dict(etas=(0.4, 1.3), step_sizes=(1e-5, 10))),
    ("Adam", dict(maximize=None, amsgrad=None), dict(maximize=False, amsgrad=False)),
    ("SGD", dict(momentum=0.9, maximize=None), dict(momentum=0.9, maximize=False)),
    ("RMSprop", dict(centered="yes"), dict(centered=True)),
    ("NAdam", dict(decoupled_weight_decay=1, weight_decay=0.1),
     dict(decoupled_weight_decay=True, weight_decay=0.1)),
])
def test_sequences_and_truthy_flags_step_as_torch_reads_them(name, given, same_as):
    cls = fastopt.OPTIMIZERS[name]
    a, _ = _two_steps(cls, **given)
    b, _ = _two_steps(cls, **same_as)
    assert_bits(a, b)


def test_a_bad_hyperparameter_value_is_named():
    p = fastopt.Parameter(np.ones(3, dtype=np.float32))
    p.grad = np.ones(3, dtype=np.float32)
    opt = fastopt.Lion([p], betas=[0.9, 0.99])
    opt.param_groups[0]["betas"] = [0.9, "x"]
    with pytest.raises(TypeError, match=r"param_groups\[0\]: betas\[1\] must be a real number"):
        opt.step()
    np.testing.assert_array_equal(p, 1.0)


def test_rmsprop_keeps_a_momentum_buffer_only_for_positive_momentum_as_torch():
    p = fastopt.Parameter(np.ones(3, dtype=np.float32))
    p.grad = np.ones(3, dtype=np.float32)
    opt = fastopt.RMSprop([p], lr=0.1)
    opt.param_groups[0]["momentum"] = -0.5  # torch tests `momentum > 0`
    opt.step()
    assert list(opt.state[p]) == ["step", "square_avg"]
    opt.param_groups[0]["momentum"] = 0.0
    opt.step()
    opt.param_groups[0]["momentum"] = 0.5  # switched on after the first step: torch's KeyError
    with pytest.raises(KeyError, match="momentum_buffer"):
        opt.step()


def test_a_subclass_check_step_runs_at_every_step():
    class CappedAdam(fastopt.Adam):
        def _check_step(self, frozen):
            super()._check_step(frozen)
            if frozen["lr"] > 1:
                raise ValueError(f"lr {frozen['lr']} is above 1")

    p = fastopt.Parameter(np.ones(3, dtype=np.float32))
    p.grad = np.ones(3, dtype=np.float32)
    opt = CappedAdam([p], lr=0.5)
    opt.step()
    before = np.array(p)
    opt.param_groups[0]["lr"] = 5.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr 5.0 is above 1"):
        opt.step()
    np.testing.assert_array_equal(p, before)
