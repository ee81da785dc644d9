"""pytest-benchmark suite for SparseAdam: fastopt's C row kernel against torch's sparse path
and a NumPy fancy-indexing version on an embedding table. Its gradients are row-sparse, so it
has no case in fastopt._cli.cases.CASES, whose optimizers bench_optimizers.py times on dense
gradients.

    pytest benchmarks/bench_sparse_adam.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
"""
import numpy as np
import pytest

import fastopt


def _numpy_sparse_adam(table, m, v, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    t = [0]

    def step(rows, vals):
        t[0] += 1
        m0, v0 = m[rows], v[rows]
        dm = (vals - m0) * (1 - b1)
        dv = (vals * vals - v0) * (1 - b2)
        m[rows] = m0 + dm
        v[rows] = v0 + dv
        ss = lr * np.sqrt(1 - b2 ** t[0]) / (1 - b1 ** t[0])
        table[rows] -= ss * (m[rows] / (np.sqrt(v[rows]) + eps))
    return step


@pytest.mark.parametrize("impl", ["fastopt", "numpy", "torch"])
@pytest.mark.parametrize("rows_touched", [256, 4096])
def test_sparse_adam_embedding(benchmark, rows_touched, impl):
    """A 100000 x 64 float32 table, one batch of unique rows per step."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((100_000, 64)) * 0.1).astype(np.float32)
    rows = np.sort(rng.choice(100_000, size=rows_touched, replace=False)).astype(np.int64)
    vals = (rng.standard_normal((rows_touched, 64)) * 0.01).astype(np.float32)
    if impl == "fastopt":
        p = fastopt.Parameter(table)
        p.grad = fastopt.SparseGrad(rows, vals)
        step = fastopt.SparseAdam([p]).step
    elif impl == "numpy":
        f = _numpy_sparse_adam(table, np.zeros_like(table), np.zeros_like(table))

        def step():
            f(rows, vals)
    else:
        torch = pytest.importorskip("torch", reason="torch is not installed")
        w = torch.from_numpy(table).requires_grad_()
        w.grad = torch.sparse_coo_tensor(torch.from_numpy(rows)[None], torch.from_numpy(vals),
                                         table.shape).coalesce()
        step = torch.optim.SparseAdam([w]).step
    benchmark.group = f"SparseAdam 100000x64, {rows_touched} rows"
    benchmark.extra_info["elements"] = rows_touched * 64
    benchmark(step)
