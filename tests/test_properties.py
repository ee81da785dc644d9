"""Properties of the kernels, found by Hypothesis for every per-element optimizer: random
hyperparameters (drawn as tests/optim_db.py says) still match the reference bit for bit;
updating pieces of an array equals updating the whole (catches tail and thread-chunk bugs);
state_dict round trips are invisible."""
import copy

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastopt
import reference as R
from optim_db import DB, names

WITH_STRATEGY = names(where=lambda info: info.hyperparameters is not None)


def hyperparameters(name):
    """Random valid constructor kwargs of optimizer ``name`` (drawn as the database says)."""
    return st.composite(lambda draw: DB[name].hyperparameters(draw))()


@pytest.mark.parametrize("name", WITH_STRATEGY)
@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(0, 70), seed=st.integers(0, 2**32 - 1))
def test_any_hyperparameters_match_reference(name, data, n, seed):
    kw = data.draw(hyperparameters(name), label="kwargs")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    p = fastopt.Parameter(x.copy())
    opt = fastopt.OPTIMIZERS[name]([p], **kw)
    ref = x.copy()
    state = R.new_state(name, ref, kw)
    for _ in range(3):
        g = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 3)).astype(np.float32)
        p.grad = g
        opt.step()
        with np.errstate(all="ignore"):
            ref = R.step(name, ref, g, state, kw)
    np.testing.assert_array_equal(np.asarray(p), ref)


@pytest.mark.parametrize("name", WITH_STRATEGY)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), cuts=st.lists(st.integers(0, 300), max_size=5),
       seed=st.integers(0, 2**32 - 1))
def test_updating_pieces_equals_updating_the_whole(name, data, cuts, seed):
    kw = data.draw(hyperparameters(name), label="kwargs")
    rng = np.random.default_rng(seed)
    n = 300
    x = rng.standard_normal(n).astype(np.float32)
    whole = fastopt.Parameter(x.copy())
    bounds = sorted(set([0, n] + cuts))
    pieces = [fastopt.Parameter(x[a:b].copy()) for a, b in zip(bounds, bounds[1:])]
    o1 = fastopt.OPTIMIZERS[name]([whole], **kw)
    o2 = fastopt.OPTIMIZERS[name](pieces, **kw)
    for _ in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        whole.grad = g
        for piece, (a, b) in zip(pieces, zip(bounds, bounds[1:])):
            piece.grad = g[a:b].copy()
        o1.step()
        o2.step()
    np.testing.assert_array_equal(np.asarray(whole),
                                  np.concatenate([np.asarray(q) for q in pieces]))


@pytest.mark.parametrize("name", WITH_STRATEGY)
@settings(max_examples=30, deadline=None)
@given(data=st.data(), k=st.integers(0, 4), seed=st.integers(0, 2**32 - 1))
def test_state_dict_round_trip_then_k_steps(name, data, k, seed):
    kw = data.draw(hyperparameters(name), label="kwargs")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(9).astype(np.float32)
    a = fastopt.Parameter(x.copy())
    oa = fastopt.OPTIMIZERS[name]([a], **kw)
    grads = [rng.standard_normal(9).astype(np.float32) for _ in range(k + 3)]
    for g in grads[:3]:
        a.grad = g
        oa.step()
    b = fastopt.Parameter(np.asarray(a).copy())
    ob = fastopt.OPTIMIZERS[name]([b], **kw)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    for g in grads[3:]:
        a.grad, b.grad = g, g.copy()
        oa.step()
        ob.step()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
