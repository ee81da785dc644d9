"""16-bit parameters and state outside the step: checkpoints (``fastopt.save`` /
``fastopt.load``), the functional optimizers (``fastopt.functional``) and the conversions to
and from torch.optim (``fastopt.interop``).

float16 arrays, ``ml_dtypes.bfloat16`` arrays and 16-bit torch tensors are saved and loaded
bit for bit in the safetensors dtypes F16 and BF16; the functions step 16-bit arrays and
tensors to the classes' bits; a torch.optim state dict of a 16-bit model moves into fastopt's
NumPy classes and back, and the run continues with torch's numbers (within the tolerance of
``tests/test_low_precision.py``, whose docstring derives it).
"""
import copy
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

import fastopt
import fastopt.functional as F
from fastopt import interop
from helpers import LISTS
from optim_db import DB, configs

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
import fastopt.torch as ft  # noqa: E402

BF16 = ml_dtypes.bfloat16
NUMPY_DTYPES = {"bf16": BF16, "fp16": np.float16}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CODES = {"bf16": "BF16", "fp16": "F16"}
SHAPES = [(7, 9), (5,)]


def _bits(a):
    """The uint16 bits of a 16-bit array or tensor."""
    if isinstance(a, torch.Tensor):
        a = a.detach().view(torch.int16).numpy()
    return np.ascontiguousarray(a).view(np.uint16)


def _np(t):
    """The NumPy array of the 16-bit tensor ``t`` (ml_dtypes.bfloat16 for bfloat16)."""
    if t.dtype is torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(BF16).copy()
    return t.detach().numpy().copy()


def _tensor(a):
    """The tensor of the 16-bit array ``a`` (a copy)."""
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _start(key, seed=99, shape=SHAPES[0]):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x.astype(NUMPY_DTYPES[key])


def _grad(key, step, shape=SHAPES[0]):
    """Gradients of random sign and magnitudes in [0.1, 1.1) (see test_low_precision)."""
    rng = np.random.default_rng(1000 + step)
    x = np.sign(rng.standard_normal(shape)) * (0.1 + rng.random(shape))
    return x.astype(np.float32).astype(NUMPY_DTYPES[key])


def _assert_same_state(a, b, where):
    """Two state dicts' ``state`` with the same keys, dtypes and bits."""
    assert a.keys() == b.keys(), where
    for i in a:
        assert a[i].keys() == b[i].keys(), (where, i)
        for k, v in a[i].items():
            w = b[i][k]
            if isinstance(v, torch.Tensor):
                assert isinstance(w, torch.Tensor) and v.dtype == w.dtype, (where, i, k)
                v, w = _np(v) if v.dtype is torch.bfloat16 else v.numpy(), \
                    _np(w) if w.dtype is torch.bfloat16 else w.numpy()
            assert v.dtype == w.dtype and v.shape == w.shape, (where, i, k, v.dtype, w.dtype)
            np.testing.assert_array_equal(np.ascontiguousarray(v).view(np.uint8),
                                          np.ascontiguousarray(w).view(np.uint8),
                                          err_msg=f"{where}: state[{i}][{k!r}]")


def _header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", configs())
def test_checkpoint_of_16bit_numpy_state_round_trips_bit_for_bit(tmp_path, name, kwargs, key):
    """A run on 16-bit NumPy parameters, saved and loaded into a fresh optimizer of copies of
    the parameters: the same state (dtype and bits), and the two continue identically."""
    cls = getattr(fastopt, name)
    starts = [_start(key, 99 + i, s) for i, s in enumerate(SHAPES)]
    a = [fastopt.Parameter(s.copy()) for s in starts]
    opt_a = cls(a, **kwargs)
    for step in range(3):
        for p, s in zip(a, SHAPES):
            p.grad = _grad(key, step, s)
        opt_a.step()
    path = tmp_path / "run.safetensors"
    fastopt.save(path, opt_a)
    header = _header(path)
    for name_, info in header.items():
        if name_.endswith(".step") or name_ == "__metadata__":
            continue
        if info["shape"] in ([7, 9], [5]):
            assert info["dtype"] == CODES[key], name_
    b = [fastopt.Parameter(np.array(p)) for p in a]
    opt_b = cls(b, **kwargs)
    fastopt.load(path, opt_b)
    _assert_same_state(opt_a.state_dict()["state"], opt_b.state_dict()["state"], name)
    for step in range(3, 5):
        for pa, pb, s in zip(a, b, SHAPES):
            pa.grad = _grad(key, step, s)
            pb.grad = _grad(key, step, s)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(_bits(pa), _bits(pb))
    _assert_same_state(opt_a.state_dict()["state"], opt_b.state_dict()["state"], name)


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", configs())
def test_checkpoint_of_16bit_torch_state_round_trips_bit_for_bit(tmp_path, name, kwargs, key):
    """The same with fastopt.torch on torch.bfloat16 / torch.float16 tensors: the loaded
    state is tensors of the same dtype and bits."""
    cls = getattr(ft, name)
    a = _tensor(_start(key)).requires_grad_()
    opt_a = cls([a], **kwargs)
    for step in range(3):
        a.grad = _tensor(_grad(key, step))
        opt_a.step()
    path = tmp_path / "run.safetensors"
    fastopt.save(path, opt_a)
    b = a.detach().clone().requires_grad_()
    opt_b = cls([b], **kwargs)
    fastopt.load(path, opt_b)
    _assert_same_state(opt_a.state_dict()["state"], opt_b.state_dict()["state"], name)
    for step in range(3, 5):
        a.grad = _tensor(_grad(key, step))
        b.grad = _tensor(_grad(key, step))
        opt_a.step()
        opt_b.step()
    np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_16bit_tensors_are_read_by_safetensors_itself(tmp_path, key):
    """The file's F16 / BF16 tensors, read by the safetensors package (torch's reader for
    BF16, which NumPy lacks), hold the saved bits; also in ``extra``."""
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file
    p = fastopt.Parameter(_start(key))
    opt = fastopt.Adam([p], lr=1e-2)
    p.grad = _grad(key, 0)
    opt.step()
    t = _tensor(_start(key, 5))
    path = tmp_path / "run.safetensors"
    fastopt.save(path, opt, extra={"array": _start(key, 4), "tensor": t})
    loaded = load_file(str(path))
    assert safetensors is not None
    for k in ("exp_avg", "exp_avg_sq"):
        mine = loaded[f"optimizer.state.0.{k}"]
        assert mine.dtype is TORCH_DTYPES[key]
        np.testing.assert_array_equal(_bits(mine), _bits(opt.state[p][k]))
    assert torch.equal(loaded["extra.tensor"].view(torch.int16), t.view(torch.int16))
    np.testing.assert_array_equal(_bits(loaded["extra.array"]), _bits(_start(key, 4)))
    # and fastopt reads them back as arrays of the dtype
    extra = fastopt.load(path, fastopt.Adam([fastopt.Parameter(_start(key))]))
    assert extra["array"].dtype == NUMPY_DTYPES[key]
    assert extra["tensor"].dtype == NUMPY_DTYPES[key]
    np.testing.assert_array_equal(_bits(extra["tensor"]), _bits(t))
    if key == "fp16":  # NumPy's own reader has float16
        from safetensors.numpy import load_file as load_numpy
        arrays = load_numpy(str(path))
        assert arrays["optimizer.state.0.exp_avg"].dtype == np.float16


def test_bf16_scalars_and_odd_values_round_trip(tmp_path):
    """Every bfloat16 bit pattern (NaNs, infinities, subnormals, -0) and a 0-d array and a
    scalar keep their bits."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(BF16)
    zero_d = np.array(1.5, dtype=BF16)
    path = tmp_path / "x.safetensors"
    opt = fastopt.SGD([fastopt.Parameter(np.zeros(2, np.float32))])
    fastopt.save(path, opt, extra=[every, zero_d, BF16(-2.25), np.float16(3.5)])
    out = fastopt.load(path, fastopt.SGD([fastopt.Parameter(np.zeros(2, np.float32))]))
    np.testing.assert_array_equal(out[0].view(np.uint16), every.view(np.uint16))
    assert out[1].dtype == BF16 and out[1].shape == () and float(out[1]) == 1.5
    assert type(out[2]) is type(BF16(0)) and float(out[2]) == -2.25
    assert type(out[3]) is np.float16 and out[3] == 3.5
    assert _header(path)["extra.0"]["dtype"] == "BF16"


def test_8bit_codes_and_their_scales_round_trip(tmp_path):
    """uint8 code arrays and their float32 block scales (the layout of 8-bit state) keep
    dtype, shape and bits, as U8 and F32 tensors."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (33, 17), dtype=np.uint8)
    absmax = rng.random(3).astype(np.float32) * np.float32(1e-30)
    path = tmp_path / "x.safetensors"
    opt = fastopt.SGD([fastopt.Parameter(np.zeros(2, np.float32))])
    fastopt.save(path, opt, extra={"exp_avg": codes, "exp_avg_absmax": absmax})
    header = _header(path)
    assert header["extra.exp_avg"]["dtype"] == "U8"
    assert header["extra.exp_avg_absmax"]["dtype"] == "F32"
    out = fastopt.load(path, fastopt.SGD([fastopt.Parameter(np.zeros(2, np.float32))]))
    assert out["exp_avg"].dtype == np.uint8 and out["exp_avg"].shape == (33, 17)
    np.testing.assert_array_equal(out["exp_avg"], codes)
    assert out["exp_avg_absmax"].dtype == np.float32
    np.testing.assert_array_equal(out["exp_avg_absmax"].view(np.uint32), absmax.view(np.uint32))


def test_loading_bf16_without_ml_dtypes_names_the_tensor(tmp_path):
    """Without ml_dtypes a BF16 tensor cannot become an array: load raises ImportError
    naming it, and the optimizer it was to load into is unchanged. Saving needs no
    ml_dtypes (a torch.bfloat16 tensor is stored by its bits)."""
    path = tmp_path / "run.safetensors"
    code = f"""
import sys
sys.modules["ml_dtypes"] = None  # import ml_dtypes raises ImportError
import numpy as np, torch, fastopt, fastopt.torch as ft
t = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
opt = ft.Adam([t], lr=0.5)
t.grad = torch.full((4,), 0.25, dtype=torch.bfloat16)
opt.step()
fastopt.save({str(path)!r}, opt)
q = fastopt.Parameter(np.zeros(4, np.float32))
mine = fastopt.Adam([q], lr=0.1)
q.grad = np.ones(4, np.float32)
mine.step()
before = {{k: v.copy() for k, v in mine.state[q].items()}}
try:
    fastopt.load({str(path)!r}, mine)
except ImportError as e:
    print("ImportError:", e)
else:
    raise SystemExit("loaded")
assert mine.param_groups[0]["lr"] == 0.1
assert all(np.array_equal(before[k], v) for k, v in mine.state[q].items())
assert "ml_dtypes" not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "optimizer.state.0.exp_avg" in out.stdout
    assert "BF16" in out.stdout and "ml_dtypes" in out.stdout


# ---- fastopt.functional -----------------------------------------------------------------------

def _hyper(fn, group):
    import inspect
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


def _lists(fname, states):
    out = []
    for key in LISTS[fname]:
        if fname == "sgd":
            out.append([s.get(key) for s in states])
        elif any(key in s for s in states):
            out.append([s[key] for s in states])
        else:
            out.append([])
    return out


def test_every_function_is_tested():
    assert set(LISTS) == {n for n in F.__all__ if n.islower()} - {"transformation",
                                                                   "apply_updates"}


@pytest.mark.parametrize("as_tensors", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", configs())
def test_functions_step_16bit_as_the_classes_bit_for_bit(name, kwargs, key, as_tensors):
    """Each torch-shaped function on 16-bit arrays (or 16-bit torch tensors, bfloat16 ones
    included) gives the class's parameters and state, bit for bit, over several steps."""
    cls = getattr(fastopt, name)
    fname = "adamw" if name == "AdamW" else name.lower()
    fn = getattr(F, fname)
    params = [fastopt.Parameter(_start(key, 99 + i, s)) for i, s in enumerate(SHAPES)]
    opt = cls(params, **kwargs)
    hyper = _hyper(fn, opt.param_groups[0])
    states = F.transformation(cls, **kwargs).init([np.array(p) for p in params]).state
    lists = _lists(fname, states)
    if as_tensors:
        mine = [_tensor(np.array(p)) for p in params]
        lists = [[v if v is None or v.shape == () else _tensor(v) for v in lst]
                 for lst in lists]
    else:
        mine = [np.array(p) for p in params]
    for step in range(4):
        gs = [_grad(key, step, s) for s in SHAPES]
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        fn(mine, [_tensor(g) if as_tensors else g.copy() for g in gs], *lists, **hyper)
    for i, (p, m) in enumerate(zip(params, mine)):
        assert isinstance(m, torch.Tensor) == as_tensors
        np.testing.assert_array_equal(_bits(m), _bits(p), err_msg=f"{name} params[{i}]")
        for k, lst in zip(LISTS[fname], lists):
            if k in opt.state[p]:
                v, w = lst[i], opt.state[p][k]
                if isinstance(v, torch.Tensor):
                    assert v.dtype is TORCH_DTYPES[key] or k == "step"
                    v = _np(v) if v.dtype is torch.bfloat16 else v.numpy()
                assert v.dtype == w.dtype, (k, v.dtype, w.dtype)
                np.testing.assert_array_equal(np.ascontiguousarray(v).view(np.uint8),
                                              np.ascontiguousarray(w).view(np.uint8),
                                              err_msg=f"{name} {k}[{i}]")


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", configs())
def test_transformation_updates_16bit_as_the_class(name, kwargs, key):
    """init / update on 16-bit pytrees: the state is of the dtype and the class's bit for
    bit, ``updates`` is the class's new parameter minus the old one rounded to the dtype, and
    ``params + updates`` is the class's step wherever that subtraction is exact."""
    cls = getattr(fastopt, name)
    starts = {"w": _start(key, 1, SHAPES[0]), "b": _start(key, 2, SHAPES[1])}
    params = {k: fastopt.Parameter(v.copy()) for k, v in starts.items()}
    opt = cls([params["b"], params["w"]], **kwargs)  # the pytree order: sorted keys
    tx = F.transformation(cls, **kwargs)
    mine = {k: v.copy() for k, v in starts.items()}
    state = tx.init(mine)
    for entry in state.state:
        for k, v in entry.items():
            if k not in cls._scalar_state_keys and k != "step":
                assert v.dtype == NUMPY_DTYPES[key], k
    out = {k: np.empty_like(v) for k, v in mine.items()}
    for step in range(4):
        grads = {"w": _grad(key, step, SHAPES[0]), "b": _grad(key, step, SHAPES[1])}
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
        before = {k: v.copy() for k, v in mine.items()}
        updates, state = tx.update(grads, state, mine, out=out)
        F.apply_updates(mine, updates)
        for k in mine:
            new, old = np.asarray(params[k]), before[k]
            assert updates[k].dtype == NUMPY_DTYPES[key]
            # new - old, rounded once to the dtype (exact in float32 for these values)
            expected = (new.astype(np.float32) - old.astype(np.float32)).astype(new.dtype)
            np.testing.assert_array_equal(_bits(updates[k]), _bits(expected),
                                          err_msg=f"step {step} {k}")
            # params + updates is the class's step where new and old are within a factor 2
            ratio = new.astype(np.float64) / old.astype(np.float64)
            exact = (ratio >= 0.5) & (ratio <= 2)
            assert exact.mean() > 0.5
            np.testing.assert_array_equal(_bits(mine[k])[exact], _bits(new)[exact])
            mine[k][...] = new  # on from the class's parameters
    for i, k in enumerate(sorted(mine)):
        for sk, v in opt.state[params[k]].items():
            w = state.state[i][sk]
            assert v.dtype == w.dtype, sk
            np.testing.assert_array_equal(np.ascontiguousarray(v).view(np.uint8),
                                          np.ascontiguousarray(w).view(np.uint8))


def test_functions_take_float32_gradients_and_refuse_other_mixes():
    """A float32 gradient of a bfloat16 parameter, which torch's function refuses (lerp of
    tensors of two dtypes), is taken as the classes take it (the same bits); a float64
    gradient or float32 state of a bfloat16 parameter (with torch's state layout) is refused
    before any change, naming the argument."""
    p = _start("bf16")
    q = fastopt.Parameter(p.copy())
    exp_avg, exp_avg_sq = np.zeros_like(p), np.zeros_like(p)
    step = np.array(0.0, np.float32)
    hyper = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8,
                 maximize=False)
    g = np.linspace(-1, 1, p.size, dtype=np.float32).reshape(p.shape)
    tp = _tensor(p)
    with pytest.raises(RuntimeError):
        importlib.import_module("torch.optim.adam").adam(
            [tp], [torch.from_numpy(g)], [_tensor(exp_avg)], [_tensor(exp_avg_sq)], [],
            [torch.tensor(0.0)], **hyper)
    F.adam([p], [g], [exp_avg], [exp_avg_sq], [], [step], **hyper)
    opt = fastopt.Adam([q], lr=1e-2)
    q.grad = g
    opt.step()
    np.testing.assert_array_equal(_bits(p), _bits(q))
    np.testing.assert_array_equal(_bits(exp_avg), _bits(opt.state[q]["exp_avg"]))
    before = p.copy(), exp_avg.copy(), exp_avg_sq.copy()
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        F.adam([p], [g.astype(np.float64)], [exp_avg], [exp_avg_sq], [], [step], **hyper)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]"):
        F.adam([p], [g], [np.zeros(p.shape, np.float32)], [exp_avg_sq], [], [step], **hyper)
    for x, y in zip((p, exp_avg, exp_avg_sq), before):
        np.testing.assert_array_equal(_bits(x), _bits(y))
    assert step == 1


# ---- fastopt.interop --------------------------------------------------------------------------

def _model(key, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3)).to(TORCH_DTYPES[key])


def _backward(model, key, step):
    """Gradients of the model's loss on random data, scaled to magnitudes of about 1: torch's
    float16 steps underflow small squared gradients (see _grad)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 9, generator=g).to(TORCH_DTYPES[key])
    model.zero_grad()
    (model(x).float().square().mean() * 64).backward()
    for i, p in enumerate(model.parameters()):
        p.grad += _tensor(_grad(key, 500 + 10 * step + i, tuple(p.shape)))


INTEROP = [c for c in configs(where=lambda info: info.torch_name is not None)
           if c.values[0] in ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "NAdam")]


def _lockstep(key, name, kwargs, fo_params, fopt, t_params, topt, steps, start):
    """Step the fastopt optimizer (NumPy params) and the torch one with the same gradients
    and compare within test_low_precision's tolerance (``u`` the largest update seen)."""
    dt = TORCH_DTYPES[key]
    eps = torch.finfo(dt).eps
    decoupled = kwargs.get("weight_decay", 0.0 if name != "AdamW" else 1e-2) != 0 and (
        name == "AdamW" or kwargs.get("decoupled_weight_decay", False))
    u = 0.0
    for step in range(start, start + steps):
        for i, (p, t) in enumerate(zip(fo_params, t_params)):
            g = _grad(key, 50 + step * 10 + i, tuple(t.shape))
            p.grad = g
            t.grad = _tensor(g)
        before = [t.detach().float() for t in t_params]
        fopt.step()
        topt.step()
        u = max([u] + [(t.detach().float() - b).abs().max().item()
                       for t, b in zip(t_params, before)])
        k = step - start + 1
        for p, t in zip(fo_params, t_params):
            torch.testing.assert_close(_tensor(np.asarray(p)).float(), t.detach().float(),
                                       rtol=(4 + k / 2 * decoupled) * eps,
                                       atol=32 * k * eps * u,
                                       msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", INTEROP)
def test_torch_16bit_state_dict_continues_in_fastopt_numpy(name, kwargs, key):
    """torch.optim on a 16-bit model, its state dict moved with ``state_dict_from_torch``
    into fastopt's NumPy class on 16-bit arrays (same dtype, same bits), then both run on
    in lockstep within torch's tolerance."""
    if name == "SGD" and not kwargs.get("momentum"):
        kwargs = dict(kwargs, momentum=0.9)
    model = _model(key)
    tparams = list(model.parameters())
    topt = getattr(torch.optim, DB[name].torch_name)(tparams, **kwargs)
    for step in range(3):
        _backward(model, key, step)
        topt.step()
    sd = interop.state_dict_from_torch(topt.state_dict())
    for i, st in sd["state"].items():
        for k, v in st.items():
            tv = topt.state_dict()["state"][i][k]
            if tv.ndim == 0:  # step, NAdam's mu_product: float32
                assert v.dtype == np.float32 and tv.dtype is torch.float32 and v == tv.item()
                continue
            assert v.dtype == NUMPY_DTYPES[key], k
            np.testing.assert_array_equal(_bits(v), _bits(tv))
    mine = [fastopt.Parameter(_np(t)) for t in tparams]
    fopt = getattr(fastopt, name)(mine, **kwargs)
    fopt.load_state_dict(sd)
    for p, t in zip(mine, tparams):
        for k, v in fopt.state[p].items():
            if v.ndim:
                assert v.dtype == NUMPY_DTYPES[key]
                np.testing.assert_array_equal(_bits(v), _bits(topt.state[t][k]))
    _lockstep(key, name, kwargs, mine, fopt, tparams, topt, 10, 3)


def _stepped_16bit(key, name, kwargs):
    """(kwargs, params, optimizer): fastopt's NumPy class ``name`` on 16-bit arrays of
    SHAPES after 3 steps (SGD with momentum, so that it keeps state)."""
    if name == "SGD" and not kwargs.get("momentum"):
        kwargs = dict(kwargs, momentum=0.9)
    params = [fastopt.Parameter(_start(key, 99 + i, s)) for i, s in enumerate(SHAPES)]
    opt = getattr(fastopt, name)(params, **kwargs)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = _grad(key, step * 10 + i, p.shape)
        opt.step()
    return kwargs, params, opt


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", INTEROP)
def test_fastopt_16bit_state_dict_continues_in_torch(name, kwargs, key):
    """The reverse: fastopt's NumPy class on 16-bit arrays, its state dict through
    ``state_dict_to_torch`` (16-bit tensors of the same bits) into torch.optim on a copy,
    then both run on in lockstep; and ``to_torch`` gives the same optimizer on tensors
    sharing the arrays' memory."""
    kwargs, mine, fopt = _stepped_16bit(key, name, kwargs)
    tsd = interop.state_dict_to_torch(fopt.state_dict())
    for i, st in tsd["state"].items():
        for k, v in st.items():
            if v.ndim:
                assert v.dtype is TORCH_DTYPES[key], k
                np.testing.assert_array_equal(_bits(v), _bits(fopt.state_dict()["state"][i][k]))
    tparams = [_tensor(np.array(p)).requires_grad_() for p in mine]
    topt = getattr(torch.optim, DB[name].torch_name)(tparams, **kwargs)
    topt.load_state_dict(tsd)
    shared = interop.to_torch(fopt)
    for p, t in zip(mine, shared.param_groups[0]["params"]):
        assert t.dtype is TORCH_DTYPES[key]
        assert t.data_ptr() == np.asarray(p).ctypes.data  # the same memory
    _assert_same_state(shared.state_dict()["state"], topt.state_dict()["state"], name)
    _lockstep(key, name, kwargs, mine, fopt, tparams, topt, 10, 3)


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", INTEROP)
def test_16bit_state_through_torch_and_back_continues_bit_for_bit(name, kwargs, key):
    """fastopt -> torch.optim (load_state_dict, state_dict) -> fastopt: the state comes back
    with its bits (0-d state other than ``step`` rounded to the dtype, as torch casts it),
    and the run continues exactly as the uninterrupted one."""
    kwargs, a, opt_a = _stepped_16bit(key, name, kwargs)
    tparams = [_tensor(np.array(p)).requires_grad_() for p in a]
    topt = getattr(torch.optim, DB[name].torch_name)(tparams, **kwargs)
    topt.load_state_dict(interop.state_dict_to_torch(opt_a.state_dict()))
    b = [fastopt.Parameter(np.array(p)) for p in a]
    opt_b = getattr(fastopt, name)(b, **kwargs)
    opt_b.load_state_dict(interop.state_dict_from_torch(copy.deepcopy(topt.state_dict())))
    # torch's load_state_dict casts all state but step to the parameter's dtype: NAdam's
    # mu_product comes back rounded to it
    for pa, pb in zip(a, b):
        for k, v in opt_a.state[pa].items():
            if k != "step" and v.ndim == 0:
                rounded = np.float32(v.astype(NUMPY_DTYPES[key]))
                assert opt_b.state[pb][k] == rounded and rounded != v, k
                opt_b.state[pb][k][...] = v
    _assert_same_state(opt_a.state_dict()["state"], opt_b.state_dict()["state"], name)
    for step in range(3, 6):
        for i, (pa, pb) in enumerate(zip(a, b)):
            pa.grad = _grad(key, step * 10 + i, pa.shape)
            pb.grad = pa.grad.copy()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(_bits(pa), _bits(pb))


def test_bf16_state_dict_without_ml_dtypes_is_widened_exactly():
    """Without ml_dtypes, ``state_dict_from_torch`` gives bfloat16 tensors as float32 arrays
    of the same values, which a float32 fastopt optimizer loads."""
    code = """
import sys
sys.modules["ml_dtypes"] = None
import numpy as np, torch, fastopt
from fastopt import interop
t = torch.randn(6).to(torch.bfloat16).requires_grad_()
opt = torch.optim.Adam([t])
t.grad = torch.randn(6).to(torch.bfloat16)
opt.step()
sd = interop.state_dict_from_torch(opt.state_dict())
v = sd["state"][0]["exp_avg"]
assert v.dtype == np.float32, v.dtype
assert np.array_equal(v, opt.state[t]["exp_avg"].float().numpy())
p = fastopt.Parameter(t.detach().float().numpy().copy())
mine = fastopt.Adam([p])
mine.load_state_dict(sd)
assert np.array_equal(mine.state[p]["exp_avg_sq"], opt.state[t]["exp_avg_sq"].float().numpy())
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---- compressed state as full-precision state -------------------------------------------------

@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_full_precision_state_dict_widens_16bit_state(key):
    """16-bit state arrays become float32 (or the dtype asked for) of the same values;
    step is kept; the input is not changed; torch.optim on float32 parameters loads the
    result and holds those values."""
    p = fastopt.Parameter(_start(key))
    opt = fastopt.NAdam([p], lr=1e-2)
    for step in range(3):
        p.grad = _grad(key, step)
        opt.step()
    sd = opt.state_dict()
    before = {k: v.copy() for k, v in sd["state"][0].items()}
    out = interop.full_precision_state_dict(sd)
    for k, v in before.items():
        assert sd["state"][0][k] is opt.state[p][k]
        np.testing.assert_array_equal(_bits(sd["state"][0][k]) if v.ndim else v,
                                      _bits(v) if v.ndim else v)
    st = out["state"][0]
    assert st.keys() == before.keys()
    for k in ("exp_avg", "exp_avg_sq"):
        assert st[k].dtype == np.float32
        np.testing.assert_array_equal(st[k], before[k].astype(np.float32))
    assert st["step"].dtype == np.float32 and st["step"] == 3
    assert st["mu_product"] == before["mu_product"]
    f64 = interop.full_precision_state_dict(sd, dtype=np.float64)["state"][0]
    assert f64["exp_avg"].dtype == np.float64
    np.testing.assert_array_equal(f64["exp_avg"], before["exp_avg"].astype(np.float64))
    t = torch.from_numpy(np.asarray(p).astype(np.float32)).requires_grad_()
    topt = torch.optim.NAdam([t], lr=1e-2)
    topt.load_state_dict(interop.state_dict_to_torch(out))
    for k in ("exp_avg", "exp_avg_sq"):
        assert topt.state[t][k].dtype is torch.float32
        np.testing.assert_array_equal(topt.state[t][k].numpy(), st[k])


def test_full_precision_state_dict_drops_master_weights_and_resets_the_group():
    """master_param goes (torch has no such state), float32 state is kept as it is, and the
    groups lose the keys of the compressed-state options (torch's groups have none)."""
    sd = {"state": {0: {"step": np.array(2.0, np.float32),
                        "exp_avg": np.arange(3, dtype=np.float32),
                        "exp_avg_sq": np.ones(3, BF16),
                        "master_param": np.full(3, 0.5, np.float32)}},
          "param_groups": [{"lr": 0.1, "state_dtype": "bfloat16", "master_weights": True,
                            "stochastic_rounding": True, "params": [0]}]}
    out = interop.full_precision_state_dict(sd)
    assert set(out["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert out["state"][0]["exp_avg"] is not sd["state"][0]["exp_avg"]
    np.testing.assert_array_equal(out["state"][0]["exp_avg"], np.arange(3))
    assert out["state"][0]["exp_avg_sq"].dtype == np.float32
    assert out["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert sd["param_groups"][0]["state_dtype"] == "bfloat16"  # the input is untouched
    assert "master_param" in sd["state"][0]


def test_full_precision_state_dict_of_fastopt_torch_tensors():
    """A fastopt.torch state dict (bfloat16 tensors) converts as the NumPy one."""
    t = _tensor(_start("bf16")).requires_grad_()
    opt = ft.Adam([t], lr=1e-2)
    t.grad = _tensor(_grad("bf16", 0))
    opt.step()
    out = interop.full_precision_state_dict(opt.state_dict())
    for k in ("exp_avg", "exp_avg_sq"):
        assert out["state"][0][k].dtype == np.float32
        np.testing.assert_array_equal(out["state"][0][k], opt.state[t][k].float().numpy())


def test_full_precision_state_dict_refuses_bad_input():
    sd = {"state": {3: {"exp_avg_absmax": np.ones(1, np.float32)}}, "param_groups": []}
    with pytest.raises(KeyError, match=r"state\[3\]\['exp_avg_absmax'\].*'exp_avg'"):
        interop.full_precision_state_dict(sd)
    good = {"state": {}, "param_groups": []}
    with pytest.raises(ValueError, match="dtype must be one of"):
        interop.full_precision_state_dict(good, dtype="int8")
    with pytest.raises(TypeError, match="must be a dict"):
        interop.full_precision_state_dict([])
    with pytest.raises(KeyError, match="'state'"):
        interop.full_precision_state_dict({"param_groups": []})


@pytest.mark.parametrize("name,kwargs", [c for c in INTEROP if c.values[0] in ("Adam", "SGD", "RMSprop", "Adagrad")])
def test_full_precision_state_dict_decodes_8bit_state_for_torch(name, kwargs):
    """8-bit state (codes and block scales) becomes float32 arrays of the decoded values
    (fastopt.dequantize_blockwise, signed for first moments, unsigned for second moments),
    which torch.optim loads and continues from."""
    from test_quantize import reference_dequantize
    if name == "SGD" and not kwargs.get("momentum"):
        kwargs = dict(kwargs, momentum=0.9)
    shape = (40, 30)  # 1200 elements: 5 blocks, the last one partial
    p = fastopt.Parameter(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    opt = getattr(fastopt, name)([p], state_dtype="int8", min_8bit_size=0, **kwargs)
    for step in range(3):
        p.grad = np.random.default_rng(step).standard_normal(shape).astype(np.float32)
        opt.step()
    st = opt.state[p]
    eight = [k for k in st if f"{k}_absmax" in st]
    assert eight, st.keys()
    out = interop.full_precision_state_dict(opt.state_dict())
    new = out["state"][0]
    assert not any(k.endswith("_absmax") for k in new)
    for k in eight:
        assert st[k].dtype == np.uint8 and new[k].dtype == np.float32 and new[k].shape == shape
        signed = k not in ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")
        expected = reference_dequantize(st[k], st[f"{k}_absmax"], signed)
        np.testing.assert_array_equal(new[k], expected)
        np.testing.assert_array_equal(new[k], fastopt.dequantize_blockwise(
            st[k], st[f"{k}_absmax"], signed).reshape(shape))
    t = torch.from_numpy(np.array(p)).requires_grad_()
    topt = getattr(torch.optim, DB[name].torch_name)([t], **kwargs)
    topt.load_state_dict(interop.state_dict_to_torch(out))
    for k in eight:
        np.testing.assert_array_equal(topt.state[t][k].numpy(), new[k])
    t.grad = torch.ones(shape)
    topt.step()
    assert torch.isfinite(t).all()
    # and a fastopt optimizer with state as torch keeps it loads it too
    q = fastopt.Parameter(np.array(p))
    plain = getattr(fastopt, name)([q], **kwargs)
    plain.load_state_dict(out)
    for k in eight:
        np.testing.assert_array_equal(plain.state[q][k], new[k])


# ---- compressed state through checkpoints -----------------------------------------------------

COMPRESSING = ("Adam", "AdamW", "SGD", "Lion", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam",
               "Adadelta")
FIRST_CONFIGS = [c for c in configs() if c.values[0] in COMPRESSING and c.id.endswith("-0")]
STATE_OPTIONS = {
    "int8": ("fp32", dict(state_dtype="int8", min_8bit_size=0)),
    "bf16-state": ("fp32", dict(state_dtype="bfloat16")),
    "bf16-sr": ("bf16", dict(stochastic_rounding=True, rounding_seed=7)),
    "master": ("bf16", dict(master_weights=True)),
    "master-int8": ("fp16", dict(master_weights=True, state_dtype="int8", min_8bit_size=0)),
}


@pytest.mark.parametrize("option", list(STATE_OPTIONS))
@pytest.mark.parametrize("name,kwargs", FIRST_CONFIGS)
def test_checkpoint_of_compressed_state_round_trips_bit_for_bit(tmp_path, name, kwargs, option):
    """8-bit codes (U8) and their block scales (F32), bfloat16 state (BF16), master weights
    and the rounding counter save and load with their bits, and the loaded run continues
    exactly as the saved one."""
    key, options = STATE_OPTIONS[option]
    if name == "SGD":
        kwargs = dict(kwargs, momentum=0.9)
    shape = (37, 29)  # 1073 elements: 5 blocks of 256, the last one partial
    dt = np.float32 if key == "fp32" else NUMPY_DTYPES[key]
    start = np.random.default_rng(3).standard_normal(shape).astype(np.float32).astype(dt)
    a = fastopt.Parameter(start.copy())
    opt_a = getattr(fastopt, name)([a], **kwargs, **options)

    def grad(step):
        return _grad("bf16", step, shape).astype(np.float32).astype(dt)

    for step in range(3):
        a.grad = grad(step)
        opt_a.step()
    path = tmp_path / "run.safetensors"
    fastopt.save(path, opt_a)
    header = _header(path)
    state = opt_a.state[a]
    for k, v in state.items():
        info = header[f"optimizer.state.0.{k}"]
        expected = {"uint8": "U8", "float32": "F32", "float16": "F16"}.get(
            v.dtype.name, "BF16" if v.dtype == BF16 else None)
        assert info["dtype"] == expected, k
    if "int8" in option:  # every state array is 8-bit: codes and their scales
        arrays = [k for k, v in state.items() if v.shape == shape and k != "master_param"]
        assert arrays and all(state[k].dtype == np.uint8 and f"{k}_absmax" in state
                              for k in arrays), state.keys()
    b = fastopt.Parameter(np.array(a))
    opt_b = getattr(fastopt, name)([b], **kwargs, **options)
    fastopt.load(path, opt_b)
    assert opt_b.param_groups[0] == {**opt_a.param_groups[0], "params": [b]}
    _assert_same_state(opt_a.state_dict()["state"], opt_b.state_dict()["state"], name)
    for step in range(3, 6):
        a.grad = grad(step)
        b.grad = grad(step)
        opt_a.step()
        opt_b.step()
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    _assert_same_state(opt_a.state_dict()["state"], opt_b.state_dict()["state"], name)


@pytest.mark.parametrize("option", ["int8", "master", "bf16-sr"])
def test_checkpoint_of_compressed_torch_state_round_trips_bit_for_bit(tmp_path, option):
    """The same for fastopt.torch: uint8 code tensors, float32 scales and master weights,
    bfloat16 tensors."""
    key, options = STATE_OPTIONS[option]
    dt = torch.float32 if key == "fp32" else TORCH_DTYPES[key]
    shape = (37, 29)
    a = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dt)
    a.requires_grad_()
    opt_a = ft.Adam([a], lr=1e-2, **options)

    def grad(step):
        return torch.from_numpy(_grad("bf16", step, shape).astype(np.float32)).to(dt)

    for step in range(3):
        a.grad = grad(step)
        opt_a.step()
    path = tmp_path / "run.safetensors"
    fastopt.save(path, opt_a)
    b = a.detach().clone().requires_grad_()
    opt_b = ft.Adam([b], lr=1e-2, **options)
    fastopt.load(path, opt_b)
    _assert_same_state(opt_a.state_dict()["state"], opt_b.state_dict()["state"], option)
    for step in range(3, 6):
        a.grad = grad(step)
        b.grad = grad(step)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a.detach().view(torch.int16 if key != "fp32" else torch.int32),
                       b.detach().view(torch.int16 if key != "fp32" else torch.int32))
