"""Properties of the kernels, found by Hypothesis: random hyperparameters still match the
reference bit for bit; updating pieces of an array equals updating the whole (catches tail
and thread-chunk bugs); state_dict round trips are invisible."""
import copy

import numpy as np
from hypothesis import given, settings, strategies as st

import fastopt
import reference as R

floats01 = st.floats(0.0, 0.999)
small = st.floats(0.0, 0.5)


@st.composite
def configs(draw):
    name = draw(st.sampled_from(["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]))
    kw = {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans())}
    if name == "SGD":
        kw["momentum"] = draw(st.sampled_from([0.0, draw(floats01)]))
        kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
        kw["dampening"] = 0.0 if kw["nesterov"] else draw(small)
        kw["weight_decay"] = draw(small)
    elif name == "Adagrad":
        kw.update(lr_decay=draw(small), weight_decay=draw(small),
                  eps=draw(st.floats(1e-10, 1e-2)))
    elif name == "RMSprop":
        kw.update(alpha=draw(floats01), momentum=draw(st.sampled_from([0.0, 0.9])),
                  centered=draw(st.booleans()), weight_decay=draw(small),
                  eps=draw(st.floats(1e-8, 1e-2)))
    else:
        kw.update(betas=(draw(floats01), draw(floats01)), weight_decay=draw(small),
                  amsgrad=draw(st.booleans()), eps=draw(st.floats(0.0, 1e-2)))
    return name, kw


@settings(max_examples=60, deadline=None)
@given(cfg=configs(), n=st.integers(0, 70), seed=st.integers(0, 2**32 - 1))
def test_any_hyperparameters_match_reference(cfg, n, seed):
    name, kw = cfg
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
        ref = R.step(name, ref, g, state, kw)
    np.testing.assert_array_equal(np.asarray(p), ref)


@settings(max_examples=40, deadline=None)
@given(cfg=configs(), cuts=st.lists(st.integers(0, 300), max_size=5),
       seed=st.integers(0, 2**32 - 1))
def test_updating_pieces_equals_updating_the_whole(cfg, cuts, seed):
    name, kw = cfg
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
    np.testing.assert_array_equal(np.asarray(whole), np.concatenate([np.asarray(q) for q in pieces]))


@settings(max_examples=30, deadline=None)
@given(cfg=configs(), k=st.integers(0, 4), seed=st.integers(0, 2**32 - 1))
def test_state_dict_round_trip_then_k_steps(cfg, k, seed):
    name, kw = cfg
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
