"""A tensor ``lr`` (and Adam's tensor ``betas``) in fastopt.torch's C-kernel optimizers,
against torch.optim 2.13 (CPU).

torch's single-tensor step keeps a tensor ``lr`` a 0-d tensor, so the step scalars derived
from it come out of 0-d tensor arithmetic in the lr's dtype, each operation rounded: for a
float32 ``lr``, Adam's and Adamax's ``lr / (1 - beta1^t)``, Adagrad's ``lr / (1 + (t - 1)
lr_decay)``, NAdam's two ``-lr (...) / (...)`` step sizes, ASGD's ``eta`` and the decoupled
decay ``1 - lr wd`` (Adam, AdamW, NAdam, RAdam) are float32 numbers, also for float64
parameters. SGD, RMSprop, Adadelta and RAdam's update use ``lr`` itself, and Rprop only
reads it at its state's creation. A float64 ``lr`` gives a float's numbers. Adam's and
AdamW's betas may be tensors too; their bias corrections are then 0-d tensors of the betas'
dtype. fastopt computes those scalars as torch does.

The lockstep runs compare bit for bit (``torch.equal``) wherever the update's square root
can be made exact: the gradients are multiples of 1/8, independent of the parameters, and
``betas[1] = 0`` makes Adam's and NAdam's second moment ``g * g`` with ``sqrt`` exactly
``|g|`` (torch's MKL square root is faithful, so it returns an exact root exactly); RAdam
with ``betas[1] = 0`` never takes its rectified, square-rooting branch. Adagrad, RMSprop and
Adadelta take square roots of sums that are not squares (so do Adam, AdamW, NAdam and RAdam
with their default betas), and torch's root differs from the correctly rounded one in the
last bit for some inputs: they are compared within 1e-13 (float64 parameters; a
double-computed float32-lr scalar is off by up to 3e-8 relative) and torch's float32
tolerance (float32 parameters), and RMSprop's and Adadelta's runs with a tensor ``lr`` are
bit for bit those with ``lr=float(lr)``, in torch as here.
"""
import numpy as np
import pytest

from helpers import F32, import_torch
from optim_db import DB

STEPS = 24
SHAPES = [(67,), (5, 3)]

#: (optimizer, keyword arguments): bit for bit against torch
EXACT = [
    ("SGD", dict()),
    ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(betas=(0.9, 0.0))),
    ("Adam", dict(betas=(0.8, 0.0), weight_decay=0.05, decoupled_weight_decay=True,
                  amsgrad=True)),
    ("AdamW", dict(betas=(0.9, 0.0), weight_decay=0.1)),
    ("AdamW", dict(betas=(0.7, 0.0), weight_decay=0.03, maximize=True)),
    ("Adamax", dict()),
    ("Adamax", dict(betas=(0.6, 0.9), weight_decay=0.01)),
    ("NAdam", dict(betas=(0.9, 0.0))),
    ("NAdam", dict(betas=(0.8, 0.0), momentum_decay=0.01, weight_decay=0.02,
                   decoupled_weight_decay=True)),
    ("RAdam", dict(betas=(0.9, 0.0), weight_decay=0.05, decoupled_weight_decay=True)),
    ("ASGD", dict()),
    ("ASGD", dict(lambd=0.03, alpha=3.0, t0=5.0, weight_decay=0.01)),
    ("ASGD", dict(lambd=0.01, alpha=-2.0)),
    ("Rprop", dict()),
]

#: (optimizer, keyword arguments): within a tolerance (their square roots are not exact)
CLOSE = [
    ("Adagrad", dict(lr_decay=0.05)),
    ("Adagrad", dict(lr_decay=0.3, weight_decay=0.01, initial_accumulator_value=0.1)),
    ("RMSprop", dict(momentum=0.5, centered=True)),
    ("Adadelta", dict(weight_decay=0.01)),
    ("Adam", dict()),
    ("AdamW", dict(weight_decay=0.1, amsgrad=True)),
    ("NAdam", dict(decoupled_weight_decay=True, weight_decay=0.05)),
    ("RAdam", dict(decoupled_weight_decay=True, weight_decay=0.05)),
]

#: a float32 lr with many mantissa bits (the scalars derived from it then round)
LR = 0.0123456789


def _ids(rows):
    return [f"{name}-{i}" for i, (name, _) in enumerate(rows)]


def _grads(dtype, seed=7):
    """The gradients of every step: multiples of 1/8 in [-4, 4] (their squares are exact),
    every fifth one zero, the same for any parameters."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        gs = [(rng.integers(-32, 33, size=s) / 8).astype(dtype) for s in SHAPES]
        for g in gs:
            g.flat[::5] = 0
        out.append(gs)
    return out


def _run(torch, cls, kwargs, dtype, lr, grads):
    """``STEPS`` steps of ``cls`` from fixed parameters; the parameters after each step."""
    rng = np.random.default_rng(3)
    params = [torch.tensor(rng.standard_normal(s), dtype=dtype, requires_grad=True)
              for s in SHAPES]
    opt = cls(params, lr=lr, **kwargs)
    history = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


def _pair(name, kwargs, torch, dtype, lr_dtype):
    import fastopt.torch as ft
    grads = _grads(np.float32 if dtype == torch.float32 else np.float64)
    lr = torch.tensor(LR, dtype=lr_dtype)
    ours, opt = _run(torch, getattr(ft, name), kwargs, dtype, lr, grads)
    theirs, topt = _run(torch, getattr(torch.optim, DB[name].torch_name), kwargs, dtype,
                        lr.clone(), grads)
    return ours, theirs, opt, topt


def _assert_same_state(torch, opt, topt):
    """The same state keys, and every state tensor bit for bit (step counters, ASGD's eta
    and mu, NAdam's mu_product, the moments)."""
    for p, tp in zip(opt.param_groups[0]["params"], topt.param_groups[0]["params"]):
        ours, theirs = opt.state[p], topt.state[tp]
        assert list(ours) == list(theirs)
        for key, value in ours.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("double", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("name,kwargs", EXACT, ids=_ids(EXACT))
def test_float32_tensor_lr_steps_bit_for_bit_as_torch(name, kwargs, double):
    torch = import_torch()
    dtype = torch.float64 if double else torch.float32
    ours, theirs, opt, topt = _pair(name, kwargs, torch, dtype, torch.float32)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for x, y in zip(a, b):
            assert torch.equal(x, y), (f"step {step}: max difference "
                                       f"{(x - y).abs().max().item():.3g}")
    _assert_same_state(torch, opt, topt)
    assert opt.param_groups[0]["lr"].dtype == torch.float32


@pytest.mark.parametrize("double", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("name,kwargs", EXACT, ids=_ids(EXACT))
def test_float64_tensor_lr_steps_as_a_float_lr(name, kwargs, double):
    """A float64 tensor lr gives the numbers of ``lr=float(lr)``, in torch as here."""
    torch = import_torch()
    import fastopt.torch as ft
    dtype = torch.float64 if double else torch.float32
    grads = _grads(np.float32 if not double else np.float64)
    lr = torch.tensor(LR, dtype=torch.float64)
    tensor_lr, _ = _run(torch, getattr(ft, name), kwargs, dtype, lr, grads)
    float_lr, _ = _run(torch, getattr(ft, name), kwargs, dtype, LR, grads)
    theirs, _ = _run(torch, getattr(torch.optim, DB[name].torch_name), kwargs, dtype,
                     lr.clone(), grads)
    for a, b, c in zip(tensor_lr, float_lr, theirs):
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y)
            assert torch.equal(x, z)


@pytest.mark.parametrize("double", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("name,kwargs", CLOSE, ids=_ids(CLOSE))
def test_float32_tensor_lr_steps_as_torch_within_its_square_roots(name, kwargs, double):
    torch = import_torch()
    dtype = torch.float64 if double else torch.float32
    tol = dict(rtol=1e-13, atol=1e-15) if double else F32
    ours, theirs, opt, topt = _pair(name, kwargs, torch, dtype, torch.float32)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("name,kwargs", [row for row in CLOSE
                                         if row[0] in ("RMSprop", "Adadelta")],
                         ids=["RMSprop", "Adadelta"])
def test_rmsprop_and_adadelta_use_a_tensor_lr_as_its_value(name, kwargs):
    torch = import_torch()
    import fastopt.torch as ft
    grads = _grads(np.float64)
    lr = torch.tensor(LR, dtype=torch.float32)
    for cls in (getattr(ft, name), getattr(torch.optim, name)):
        with_tensor, _ = _run(torch, cls, kwargs, torch.float64, lr.clone(), grads)
        with_float, _ = _run(torch, cls, kwargs, torch.float64, lr.item(), grads)
        for a, b in zip(with_tensor, with_float):
            for x, y in zip(a, b):
                assert torch.equal(x, y), cls


BETAS_LRS = [LR, "float32", "float64"]


def _betas_run(torch, cls, dtype, betas_dtype, lr, beta2, **kwargs):
    grads = _grads(np.float64 if dtype == torch.float64 else np.float32)
    betas = (torch.tensor(0.9, dtype=betas_dtype), torch.tensor(beta2, dtype=betas_dtype))
    if lr != LR:
        lr = torch.tensor(LR, dtype=getattr(torch, lr))
    return _run(torch, cls, {**kwargs, "betas": betas}, dtype, lr, grads)


@pytest.mark.parametrize("lr", BETAS_LRS, ids=["float-lr", "float32-lr", "float64-lr"])
@pytest.mark.parametrize("betas_dtype", ["float32", "float64"])
@pytest.mark.parametrize("double", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("name,kwargs", [("Adam", {}), ("AdamW", dict(amsgrad=True))],
                         ids=["Adam", "AdamW"])
def test_tensor_betas_step_as_torch(name, kwargs, double, betas_dtype, lr):
    """Adam's and AdamW's betas may be tensors: torch computes ``1 - beta^t`` (ATen's pow),
    the step size (``reciprocal(bc1) * lr`` for a number lr) and ``bc2 ** 0.5`` as 0-d
    tensors of the betas' dtype, and ``1 - beta2`` too. Bit for bit with ``betas[1] = 0``
    (exact square roots, as above); within 1e-13 (float64) and torch's float32 tolerance with
    ``betas[1] = 0.999`` (torch's square roots of the second moments, and of ``bc2``, may
    differ from the correctly rounded ones in the last bit)."""
    torch = import_torch()
    import fastopt.torch as ft
    dtype = torch.float64 if double else torch.float32
    bdtype = getattr(torch, betas_dtype)
    for beta2 in (0.0, 0.999):
        ours, opt = _betas_run(torch, getattr(ft, name), dtype, bdtype, lr, beta2, **kwargs)
        theirs, topt = _betas_run(torch, getattr(torch.optim, name), dtype, bdtype, lr, beta2,
                                  **kwargs)
        # float64 parameters with float32 betas: the step's scalars are float32 quantities,
        # whose last bits torch's CPU math (MKL's, CPU-dependent) may round otherwise
        tol = (dict(rtol=1e-6, atol=1e-9) if double and betas_dtype == "float32"
               else dict(rtol=1e-13, atol=1e-15) if double else F32)
        for step, (a, b) in enumerate(zip(ours, theirs)):
            for x, y in zip(a, b):
                if beta2 == 0.0:
                    assert torch.equal(x, y), (f"step {step}: max difference "
                                               f"{(x - y).abs().max().item():.3g}")
                else:
                    torch.testing.assert_close(x, y, **tol, msg=lambda m: f"step {step}: {m}")
        assert all(isinstance(b, torch.Tensor) for b in opt.param_groups[0]["betas"])
        if beta2 == 0.0:
            _assert_same_state(torch, opt, topt)


def test_a_scheduler_writing_a_float32_tensor_lr_steps_as_torch():
    """LR schedulers update a tensor lr in place (``fill_``): every step reads its value."""
    torch = import_torch()
    import fastopt.torch as ft
    grads = _grads(np.float64)
    runs = []
    for cls in (ft.AdamW, torch.optim.AdamW):
        p = torch.zeros(SHAPES[0], dtype=torch.float64, requires_grad=True)
        opt = cls([p], lr=torch.tensor(0.01), betas=(0.9, 0.0), weight_decay=0.1)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.93)
        out = []
        for gs in grads:
            p.grad = torch.from_numpy(gs[0].copy())
            opt.step()
            sched.step()
            out.append(p.detach().clone())
        assert opt.param_groups[0]["lr"].dtype == torch.float32
        runs.append(out)
    for x, y in zip(*runs):
        assert torch.equal(x, y)
