"""fastopt.torch.SparseAdam.load_state_dict: checked before it changes anything, as the other
classes' loaders, and still torch's format both ways.

A malformed state (a moment of another shape or a complex dtype, a missing key, a step that
is not an int >= 0, a sparse moment, an id no group lists) raises at the load, naming the key
path, and leaves the parameters, the groups and the state as they were; torch's loader takes
them, and its next step fails or computes wrong numbers. A torch.optim.SparseAdam state dict
loads and the run continues with torch's numbers, and the reverse (the update takes a square
root, so within torch's tolerance for the dtype). fastopt.SparseAdam, on NumPy arrays, checks
a loaded state the same way.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="fastopt.torch needs torch")
import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402

ROWS = [[1, 4, 4, 7], [0, 2, 9], [3, 4, 5, 6, 8]]


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Embedding(10, 3, sparse=True).to(dtype)


def _step(emb, opt, k):
    opt.zero_grad()
    emb(torch.tensor(ROWS[k % len(ROWS)])).pow(2).sum().backward()
    opt.step()


def _trained(cls, dtype=torch.float64, steps=2):
    emb = _model(dtype)
    opt = cls(emb.parameters(), lr=0.05, betas=(0.8, 0.9))
    for k in range(steps):
        _step(emb, opt, k)
    return emb, opt


def _bad(sd, key, value):
    out = copy.deepcopy(sd)
    if value is None:
        del out["state"][0][key]
    else:
        out["state"][0][key] = value
    return out


BAD = [
    ("exp_avg", torch.zeros(10, 4, dtype=torch.float64), ValueError,
     r"state\['exp_avg'\] has shape \(10, 4\), the parameter \(10, 3\)"),
    ("exp_avg_sq", torch.zeros(10, 3, dtype=torch.complex128), TypeError,
     r"state\['exp_avg_sq'\] has dtype complex128"),
    ("exp_avg", None, KeyError, r"state has no 'exp_avg'"),
    ("step", None, KeyError, r"state has no 'step'"),
    ("step", 1.5, TypeError, r"state\['step'\] must be an int >= 0, got 1.5"),
    ("step", -1, ValueError, r"state\[0\]\['step'\]"),
    ("exp_avg", torch.zeros(10, 3, dtype=torch.float64).to_sparse(), TypeError,
     r"state\['exp_avg'\] is a tensor with layout torch.sparse_coo"),
]


@pytest.mark.parametrize("key,value,exc,match", BAD,
                         ids=[f"{k}-{type(v).__name__}" for k, v, _, _ in BAD])
def test_a_malformed_state_raises_at_load_naming_the_key_and_changes_nothing(key, value, exc,
                                                                              match):
    _, source = _trained(ft.SparseAdam)
    bad = _bad(source.state_dict(), key, value)
    emb, opt = _trained(ft.SparseAdam, steps=1)
    before = copy.deepcopy((emb.weight.detach(), opt.state_dict()))
    state, groups = opt.state, opt.param_groups
    with pytest.raises(exc, match=r"param_groups\[0\]\['params'\]\[0\]|state\[0\]") as e:
        opt.load_state_dict(bad)
    assert e.match(match)
    assert opt.state is state and opt.param_groups is groups
    assert torch.equal(emb.weight.detach(), before[0])
    after = opt.state_dict()
    assert after["param_groups"] == before[1]["param_groups"]
    for k, v in before[1]["state"][0].items():
        got = after["state"][0][k]
        assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v
    _step(emb, opt, 1)  # and it steps on


def test_an_unknown_id_raises_at_load():
    _, source = _trained(ft.SparseAdam)
    sd = source.state_dict()
    sd["state"][5] = sd["state"].pop(0)
    emb, opt = _trained(ft.SparseAdam, steps=0)
    with pytest.raises(KeyError, match=r"state\[5\]: no parameter of the saved param_groups "
                                       r"has id 5"):
        opt.load_state_dict(sd)
    assert not opt.state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("first,second", [(torch.optim.SparseAdam, ft.SparseAdam),
                                          (ft.SparseAdam, torch.optim.SparseAdam)],
                         ids=["torch-to-fastopt", "fastopt-to-torch"])
def test_a_state_dict_loads_across_torch_and_fastopt_and_continues(first, second, dtype):
    """Two steps of one, its state dict (through torch.save and torch.load) into the other,
    three more steps: as torch's own five."""
    import io
    ref, ropt = _trained(torch.optim.SparseAdam, dtype)
    emb, opt = _trained(first, dtype)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    cont = second(emb.parameters(), lr=1.0)
    cont.load_state_dict(torch.load(buf, weights_only=True))
    st = cont.state[emb.weight]
    assert type(st["step"]) is int and st["step"] == 2
    assert st["exp_avg"].dtype == dtype and st["exp_avg"].shape == (10, 3)
    assert cont.param_groups[0]["lr"] == 0.05  # the saved groups' values
    for k in range(2, 5):
        _step(emb, cont, k)
        _step(ref, ropt, k)
        torch.testing.assert_close(emb.weight, ref.weight)
    torch.testing.assert_close(cont.state[emb.weight]["exp_avg_sq"],
                               ropt.state[ref.weight]["exp_avg_sq"])
    assert cont.state[emb.weight]["step"] == ropt.state[ref.weight]["step"] == 5


def test_float32_moments_load_into_float64_parameters_cast_as_torch():
    _, source = _trained(ft.SparseAdam, torch.float32)
    emb, opt = _trained(ft.SparseAdam, torch.float64, steps=0)
    opt.load_state_dict(source.state_dict())
    st = opt.state[emb.weight]
    assert st["exp_avg"].dtype == torch.float64
    torch.testing.assert_close(st["exp_avg"], source.state[source.param_groups[0]["params"][0]]
                               ["exp_avg"].double())
    _step(emb, opt, 0)


def test_numpy_sparse_adam_checks_a_loaded_state_too():
    p = fastopt.Parameter(np.zeros((6, 2)))
    opt = fastopt.SparseAdam([p])
    p.grad = fastopt.SparseGrad(np.array([1, 3]), np.ones((2, 2)))
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = np.zeros((6, 3))
    fresh = fastopt.SparseAdam([fastopt.Parameter(np.zeros((6, 2)))])
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] has shape \(6, 3\)"):
        fresh.load_state_dict(sd)
    assert not fresh.state
    del sd["state"][0]["exp_avg"]
    with pytest.raises(KeyError, match=r"state has no 'exp_avg'"):
        fresh.load_state_dict(sd)
