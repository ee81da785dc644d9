"""Small helpers shared by the test files: bit-level comparisons, random gradients, snapshots
of everything a step could change, the torch oracle, and the Rosenbrock function."""
import os

import numpy as np
import pytest

import fastopt

#: torch.testing's float32 tolerance
F32 = {"rtol": 1.3e-6, "atol": 1e-5}

#: the float32 tolerance of a model trained in lockstep with torch.optim for many steps: torch's
#: CPU square roots and reductions (MKL's) round differently from one CPU to another (on AMD
#: EPYC its sqrt is not IEEE's), and training amplifies those last-bit differences step after
#: step (up to 2.5e-5 measured over 20 steps); a wrong update is orders of magnitude larger
F32_TRAINED = {"rtol": 1e-5, "atol": 5e-5}


def torch_sqrt_is_ieee(torch):
    """Whether torch's float32 and float64 CPU sqrt on this machine is the correctly rounded
    one (then the kernels that take a square root match torch bit for bit)."""
    x = np.random.default_rng(0).uniform(1e-6, 1e3, 4099)
    return all(torch.equal(torch.from_numpy(x.astype(d)).sqrt(),
                           torch.from_numpy(np.sqrt(x.astype(d))))
               for d in (np.float32, np.float64))


def P(*shape, dtype=np.float32, seed=0):
    """A parameter of random values."""
    return fastopt.Parameter(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def bits(a):
    """The bit patterns of a float32 / float64 array, as unsigned integers."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def same_bits(a, b):
    """Same dtype, shape and bits, except that any two NaNs are equal (their sign and payload
    are not specified: C and NumPy may produce different NaN bit patterns for one operation)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b))
                and np.array_equal(bits(a)[~nan], bits(b)[~nan]))


def assert_bits(actual, expected, msg=""):
    """Assert :func:`same_bits`, saying where the first differences are."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (msg, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    a, e = actual.reshape(-1), expected.reshape(-1)
    ok = (bits(a) == bits(e)) | (np.isnan(a) & np.isnan(e))
    assert ok.all(), (f"{msg}: {(~ok).sum()} of {ok.size} elements differ; "
                      f"first at {np.flatnonzero(~ok)[:5]}")


def grads(rng, shape, dtype, k):
    """Random gradients with exact zeros and, on odd steps ``k``, sign flips (Rprop's
    cases: a gradient whose sign changes, stays, or is zero)."""
    g = rng.standard_normal(shape).astype(dtype)
    if g.size:
        g.flat[:: 5] = 0
        if k % 2:
            g.flat[1:: 3] *= -1
    return g


def _freeze(value):
    if isinstance(value, (np.ndarray, np.generic)):
        value = np.asarray(value)
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    return ("value", type(value).__name__, repr(value))


def snapshot(opt, params):
    """Everything a step could change, bit for bit: the parameters, the state of every
    parameter, and the hyperparameters of every group. Compare two with ``==``."""
    return ([_freeze(np.asarray(p)) for p in params],
            {id(p): {k: _freeze(v) for k, v in s.items()} for p, s in opt.state.items()},
            repr([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))


def import_torch(vector_kernels=True):
    """torch, with its AVX2 kernels when it is imported here first (the ones fastopt's
    operation order follows); skips the test without torch, and with ``vector_kernels`` on a
    CPU where torch runs neither its AVX2 nor its AVX512 kernels."""
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    torch = pytest.importorskip("torch", reason="torch is not installed: parity tests need it")
    cap = torch.backends.cpu.get_cpu_capability()
    if vector_kernels and cap not in ("AVX2", "AVX512"):
        pytest.skip(f"torch runs its {cap} kernels (unfused); fastopt follows the AVX2 ones")
    return torch


def rosenbrock(x):
    """The n-dimensional Rosenbrock function and its gradient."""
    x0, x1 = x[:-1], x[1:]
    f = np.sum(100.0 * (x1 - x0 ** 2) ** 2 + (1 - x0) ** 2)
    g = np.zeros_like(x)
    g[:-1] = -400 * x0 * (x1 - x0 ** 2) - 2 * (1 - x0)
    g[1:] += 200 * (x1 - x0 ** 2)
    return f, g


def torch_mlp(dtype=None, seed=0, bias=True):
    """The small seeded MLP (6 -> 8 -> 3, tanh) the fastopt.torch tests train."""
    import torch
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8, bias=bias), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3, bias=bias))
    return model.to(torch.float32 if dtype is None else dtype)


def torch_batch(dtype=None):
    """A fixed batch (x of 32 x 6, y of 32 x 3) for ``torch_mlp``."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
    g = torch.Generator().manual_seed(1)
    return (torch.randn(32, 6, generator=g, dtype=dtype),
            torch.randn(32, 3, generator=g, dtype=dtype))


#: fastopt.functional, per function: the state key of each list argument after ``grads``,
#: in order
LISTS = {
    "sgd": ("momentum_buffer",),
    "adagrad": ("sum", "step"),
    "rmsprop": ("square_avg", "grad_avg", "momentum_buffer", "step"),
    "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
    "adamw": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
    "adadelta": ("square_avg", "acc_delta", "step"),
    "adamax": ("exp_avg", "exp_inf", "step"),
    "nadam": ("exp_avg", "exp_avg_sq", "mu_product", "step"),
    "radam": ("exp_avg", "exp_avg_sq", "step"),
    "asgd": ("ax", "mu", "eta", "step"),
    "rprop": ("prev", "step_size", "step"),
    "lion": ("exp_avg",),
}
