"""Every per-element optimizer converges with its tuned settings (tests/optim_db.py): on an
ill-conditioned quadratic and on the Rosenbrock function from (-1.5, 2), loss 12.5 at the
start. LBFGS, Adafactor, SparseAdam and Muon have their convergence tests in their own files."""
import numpy as np
import pytest

import fastopt
from optim_db import DB, names


@pytest.mark.parametrize("name", names())
def test_converges_on_quadratic(name):
    run = DB[name].quadratic
    a = np.linspace(0.5, 2.0, 20)
    p = fastopt.Parameter(np.ones(20))
    opt = fastopt.OPTIMIZERS[name]([p], **run.kwargs)
    for _ in range(run.steps):
        p.grad = a * np.asarray(p)
        opt.step()
    assert 0.5 * np.sum(a * np.asarray(p) ** 2) < run.loss


@pytest.mark.parametrize("name", names())
def test_converges_on_rosenbrock(name):
    run = DB[name].rosenbrock
    p = fastopt.Parameter(np.array([-1.5, 2.0]))
    opt = fastopt.OPTIMIZERS[name]([p], **run.kwargs)
    for _ in range(run.steps):
        x, y = p
        p.grad = np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])
        opt.step()
    x, y = p
    assert (1 - x) ** 2 + 100 * (y - x * x) ** 2 < run.loss, (x, y)
