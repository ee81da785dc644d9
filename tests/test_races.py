"""Steps that would race on memory: arrays of one step that share it.

A step writes every parameter and state array (step counters and 0-d scalar state included)
and reads every gradient. An array it writes may share memory only with itself (a parameter
listed twice) or, for a parameter, with other parameters (overlapping views run in list
order); any other overlap is refused before anything changes, naming both arrays. Two
``step()`` calls at once are tested in test_step_guard.py.
"""
import re
import warnings

import numpy as np
import pytest

import fastopt
from helpers import P, assert_bits, snapshot
from optim_db import DB, names


def _stepped(cls, params, **kwargs):
    """An optimizer over ``params`` after one step with gradients of ones (its state
    exists)."""
    opt = cls(params, **kwargs)
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.grad = np.ones(p.shape, p.dtype)
    opt.step()
    return opt


def _where(gi, pi):
    return re.escape(f"param_groups[{gi}]['params'][{pi}]")


# ---- a gradient sharing memory with an array the step writes ------------------------------------

@pytest.mark.parametrize("name", names())
def test_grad_that_is_another_parameter_is_refused(name):
    a, b = P(6, seed=1), P(6, seed=2)
    opt = _stepped(DB[name].cls, [a, b], **DB[name].inputs[0].kwargs)
    b.grad = a.view(np.ndarray)
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=_where(0, 1) + r"\.grad shares memory with "
                       + _where(0, 0) + "; "):
        opt.step()
    assert snapshot(opt, [a, b]) == before


def test_grad_overlapping_another_parameter_is_refused():
    base = np.zeros(20, np.float32)
    a = fastopt.Parameter(base[:10])
    b = P(10)
    opt = fastopt.Adam([a, b])
    a.grad = np.ones(10, np.float32)
    b.grad = base[5:15]  # half of it is a's memory
    with pytest.raises(ValueError, match=_where(0, 1) + r"\.grad shares memory with "
                       + _where(0, 0) + "; "):
        opt.step()
    assert not base.any() and "step" not in opt.state[a]


def test_grad_that_is_a_parameter_of_another_group_is_refused():
    a, b = P(4, seed=1), P(4, seed=2)
    opt = fastopt.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    a.grad = b.view(np.ndarray)
    b.grad = np.ones(4, np.float32)
    x = np.asarray(b).copy()
    with pytest.raises(ValueError, match=_where(0, 0) + r"\.grad shares memory with "
                       + _where(1, 0) + "; "):
        opt.step()
    np.testing.assert_array_equal(np.asarray(b), x)


def test_grad_that_is_another_parameters_state_is_refused():
    a, b = P(5, seed=1), P(5, seed=2)
    opt = _stepped(fastopt.Adam, [a, b])
    b.grad = opt.state[a]["exp_avg_sq"]
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=_where(0, 1) + r"\.grad shares memory with "
                       + _where(0, 0) + re.escape("'s state['exp_avg_sq']")):
        opt.step()
    assert snapshot(opt, [a, b]) == before


def test_grad_that_is_its_own_state_is_refused():
    """torch reads such a gradient after its first in-place update of the state; the fused
    loop reads it before: refused rather than a different answer."""
    a = P(5)
    opt = _stepped(fastopt.SGD, [a], lr=0.1, momentum=0.9)
    a.grad = opt.state[a]["momentum_buffer"]
    before = snapshot(opt, [a])
    with pytest.raises(ValueError, match=_where(0, 0) + r"\.grad shares memory with "
                       + _where(0, 0) + re.escape("'s state['momentum_buffer']")):
        opt.step()
    assert snapshot(opt, [a]) == before


def test_gradients_may_share_memory():
    """Gradients are only read: one array as the gradient of several parameters, and a
    gradient that is its parameter (as torch allows) step as separate copies would."""
    g = np.linspace(-1, 1, 6).astype(np.float32)
    ps = [P(6, seed=s) for s in range(3)]
    qs = [P(6, seed=s) for s in range(3)]
    opt, ref = fastopt.Adam(ps, lr=0.1), fastopt.Adam(qs, lr=0.1)
    for k in range(3):
        ps[0].grad = ps[1].grad = g
        ps[2].grad = ps[2].view(np.ndarray)
        qs[0].grad, qs[1].grad = g.copy(), g.copy()
        qs[2].grad = np.asarray(qs[2]).copy()
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        assert_bits(p, q)


# ---- state arrays shared between parameters ----------------------------------------------------

@pytest.mark.parametrize("name", names(where=lambda info: info.name not in ("SGD",)))
def test_state_shared_by_two_parameters_is_refused(name):
    info = DB[name]
    a, b = P(6, seed=1), P(6, seed=2)
    opt = _stepped(info.cls, [a, b], **info.inputs[0].kwargs)
    key = next(k for k in opt.state[a] if k != "step" and np.ndim(opt.state[a][k]) > 0)
    opt.state[b][key] = opt.state[a][key]
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=_where(0, 1) + re.escape(f": state['{key}']")
                       + " shares memory with " + _where(0, 0)
                       + re.escape(f"'s state['{key}']")):
        opt.step()
    assert snapshot(opt, [a, b]) == before


def test_state_overlapping_across_groups_is_refused():
    ps = [P(8, seed=s) for s in range(4)]
    opt = _stepped(fastopt.Adam, [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.01}])
    buf = np.zeros(12, np.float32)
    opt.state[ps[2]]["exp_avg"] = buf[:8]
    opt.state[ps[3]]["exp_avg"] = buf[4:]
    with pytest.raises(ValueError, match=_where(1, 0) + re.escape(": state['exp_avg']")
                       + " shares memory with " + _where(0, 2)
                       + re.escape("'s state['exp_avg']")):
        opt.step()
    assert not buf.any()


def test_state_that_is_another_parameter_is_refused():
    a, b = P(4, seed=1), P(4, seed=2)
    opt = _stepped(fastopt.SGD, [a, b], lr=0.1, momentum=0.9)
    opt.state[b]["momentum_buffer"] = a.view(np.ndarray)
    x = np.asarray(a).copy()
    with pytest.raises(ValueError, match=_where(0, 1) + re.escape(": state['momentum_buffer']")
                       + " shares memory with " + _where(0, 0) + "; "):
        opt.step()
    np.testing.assert_array_equal(np.asarray(a), x)


def test_step_counter_shared_by_two_parameters_is_refused():
    """torch would add 1 twice to a shared counter; fastopt refuses (a parameter listed
    twice keeps sharing its own counter, as in torch)."""
    a, b = P(4, seed=1), P(4, seed=2)
    opt = _stepped(fastopt.Adam, [a, b])
    opt.state[b]["step"] = opt.state[a]["step"]
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=_where(0, 1) + re.escape(": state['step']")
                       + " shares memory with " + _where(0, 0) + re.escape("'s state['step']")):
        opt.step()
    assert snapshot(opt, [a, b]) == before


def test_scalar_state_shared_by_two_parameters_is_refused():
    a, b = P(4, seed=1), P(4, seed=2)
    opt = _stepped(fastopt.NAdam, [a, b])
    opt.state[b]["mu_product"] = opt.state[a]["mu_product"]
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=_where(0, 1) + re.escape(": state['mu_product']")
                       + " shares memory with " + _where(0, 0)
                       + re.escape("'s state['mu_product']")):
        opt.step()
    assert snapshot(opt, [a, b]) == before


def test_step_counter_inside_a_parameter_is_refused():
    a, b = P(4, seed=1), P(4, seed=2)
    opt = _stepped(fastopt.Adam, [a, b])
    opt.state[b]["step"] = a.view(np.ndarray)[1:2].reshape(())
    with pytest.raises(ValueError, match=_where(0, 1) + re.escape(": state['step']")
                       + " shares memory with " + _where(0, 0) + "; "):
        opt.step()


def test_parameter_listed_twice_across_threads_matches_torch_order(threads):
    """The accepted sharing: a parameter listed twice (its state and counter shared by both
    occurrences) next to other parameters, large enough to split over threads, gives the
    same bits for every thread count."""
    n = 70000
    results = []
    for nthreads in (1, 2, 3):
        threads(nthreads)
        rng = np.random.default_rng(4)
        ps = [fastopt.Parameter(rng.standard_normal(n).astype(np.float32)) for _ in range(2)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = fastopt.Adam([ps[0], ps[1], ps[0]], lr=0.01)
        for k in range(3):
            for p in ps:
                p.grad = rng.standard_normal(n).astype(np.float32)
            opt.step()
        assert float(opt.state[ps[0]]["step"]) == 6.0
        results.append([np.asarray(p).copy() for p in ps])
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert_bits(x, y)


def test_overlap_found_among_arrays_far_apart():
    """Small arrays (from the heap) next to a large one (mapped on its own, far away), enough
    of them for the radix sort over many address bits: a state array inside the large
    parameter is found, and without it the step runs."""
    big = fastopt.Parameter(np.zeros(1 << 20, np.float32))
    small = [P(6, seed=s) for s in range(40)]
    opt = _stepped(fastopt.Adam, small + [big])
    opt.state[small[7]]["exp_avg"] = big.view(np.ndarray)[123456:123462]
    with pytest.raises(ValueError, match=_where(0, 7) + re.escape(": state['exp_avg']")
                       + " shares memory with " + _where(0, 40) + "; "):
        opt.step()
    opt.state[small[7]]["exp_avg"] = np.zeros(6, np.float32)
    opt.step()
    assert float(opt.state[big]["step"]) == 2.0


# ---- any arrangement: the step raises exactly when two arrays may not share memory -------------

def _arrays(opt):
    """Every array a step of ``opt`` (Adam) touches, in list order, as (name, lead name,
    array, owner, role); a gradient that is its own parameter counts as the parameter."""
    out = []
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            w = f"param_groups[{gi}]['params'][{pi}]"
            a = p.view(np.ndarray)
            out.append((w, w, a, id(p), "param"))
            g = p.grad
            if not (g.__array_interface__["data"][0] == a.__array_interface__["data"][0]
                    and g.size == a.size):
                out.append((w + ".grad", w + ".grad", g, id(p), "grad"))
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out.append((f"{w}'s state['{key}']", f"{w}: state['{key}']",
                            opt.state[p][key], id(p), key))
    return out


def _forbidden(x, y):
    if not np.shares_memory(x[2], y[2]):
        return False
    # allowed: read / read, overlapping parameters, one parameter listed twice
    return not (x[4] == y[4] and (x[4] in ("grad", "param") or x[3] == y[3]))


@pytest.mark.parametrize("seed", range(6))
def test_any_arrangement_raises_exactly_for_a_forbidden_overlap(seed):
    """Random parameters, gradients and state, some fresh, some views into one buffer, some
    the same objects: the step raises iff two arrays share memory in a way that is not
    allowed (checked pair by pair), names such a pair, and changes nothing when it raises.
    Enough arrays that the sort is the radix one."""
    rng = np.random.default_rng(seed)
    raised = ran = 0
    for case in range(60):
        pool = np.zeros(3000, np.float32)
        share = [0.0, 0.004, 0.01, 0.03][case % 4]

        def fresh(n=6, pool=pool, share=share):
            if rng.random() < share:
                k = int(rng.integers(0, pool.size - n))
                return pool[k:k + n]
            return rng.standard_normal(n).astype(np.float32)

        ps = [fastopt.Parameter(fresh()) for _ in range(int(rng.integers(5, 40)))]
        cut = int(rng.integers(0, len(ps)))
        groups = [{"params": ps[:cut]}, {"params": ps[cut:]}]
        for group in groups:  # some parameters listed twice
            listed = group["params"]
            for _ in range(int(rng.integers(0, 3)) if listed else 0):
                listed.insert(int(rng.integers(0, len(listed))),
                              listed[int(rng.integers(len(listed)))])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = fastopt.Adam([g for g in groups if g["params"]], lr=0.01)
        for p in ps:
            p.grad = np.ones(6, np.float32)
        opt.step()
        for p in ps:
            r = rng.random()
            if r < 0.03:
                p.grad = ps[int(rng.integers(len(ps)))].grad
            elif r < 0.05:
                p.grad = p.view(np.ndarray)
            else:
                p.grad = fresh()
            st = opt.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                r = rng.random()
                if r < 0.02:
                    st[key] = opt.state[ps[int(rng.integers(len(ps)))]][key]
                elif rng.random() < share:
                    st[key] = fresh()
            if rng.random() < 0.02:
                st["step"] = opt.state[ps[int(rng.integers(len(ps)))]]["step"]
        arrays = _arrays(opt)
        bad = {(x[0], y[1]) for x in arrays for y in arrays
               if x is not y and _forbidden(x, y)}
        before = snapshot(opt, ps), pool.copy()
        try:
            opt.step()
        except ValueError as e:
            raised += 1
            assert bad, e
            assert (snapshot(opt, ps), pool.copy())[0] == before[0]
            np.testing.assert_array_equal(pool, before[1])
            m = re.match(r"(.*) shares memory with (.*?); a step writes", str(e))
            if m:  # the whole-step check (the per-parameter ones have their own words)
                assert (m.group(2), m.group(1)) in bad, e
            else:
                assert "partly overlaps" in str(e) or "shares memory with" in str(e), e
        else:
            ran += 1
            assert not bad, sorted(bad)[:3]
    assert raised > 5 and ran > 5
