"""pytest-benchmark suite: every optimizer in fastopt._cli.cases.CASES at 1e3 to 1e7 float32
elements and 100 tensors of 1000, for fastopt, in-place NumPy and torch (fused=True where
torch has a fused CPU kernel; skipped when torch is absent). One group per optimizer and
size, so the table shows the three side by side.

    pytest benchmarks/bench_optimizers.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
"""
import numpy as np
import pytest

from fastopt._cli.bench import _make_fastopt, _make_numpy, _make_torch, parse_size
from fastopt._cli.cases import CASES

SIZES = ["1e3", "1e4", "1e5", "1e6", "1e7", "100x1000"]
IMPLS = ["fastopt", "numpy", "torch"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_step(benchmark, name, size, impl):
    case = CASES[name]
    shape = parse_size(size)
    rng = np.random.default_rng(0)
    arrays = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in shape]
    grads = [(rng.standard_normal(n) * 0.01).astype(np.float32) for n in shape]
    if impl == "fastopt":
        step = _make_fastopt(name, case, arrays, grads)
    elif impl == "numpy":
        step = _make_numpy(case, arrays, grads)
    else:
        torch = pytest.importorskip("torch", reason="torch is not installed")
        if case.torch[0] is None:
            pytest.skip(f"torch has no {name}")
        step = _make_torch(torch, case, arrays, grads)
    benchmark.group = f"{name} {size}"
    benchmark.extra_info["elements"] = sum(shape)
    benchmark.extra_info["bytes_per_element"] = case.bytes_per_element
    benchmark(step)
