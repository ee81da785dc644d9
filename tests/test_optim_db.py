"""The optimizer database (tests/optim_db.py) is complete and says true things about each
optimizer: a new optimizer without a row, or a row that disagrees with the class, fails here."""
import inspect

import numpy as np
import pytest

import fastopt
import reference as R
from helpers import P
from optim_db import CONSTRUCTION, DB, OPTIM_DB, STEP

#: boolean options that choose no update rule (torch's compile/autograd switches)
NOT_FLAGS = {"capturable", "differentiable", "master_weights", "stochastic_rounding"}


def test_every_optimizer_has_one_entry():
    listed = [info.name for info in OPTIM_DB]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(fastopt.OPTIMIZERS) | set(fastopt.OTHER_OPTIMIZERS)
    for info in OPTIM_DB:
        assert info.per_element == (info.name in fastopt.OPTIMIZERS), info.name


@pytest.mark.parametrize("name", list(DB))
def test_entry_matches_the_class(name):
    info = DB[name]
    assert info.cls is {**fastopt.OPTIMIZERS, **fastopt.OTHER_OPTIMIZERS}[name]
    signature = inspect.signature(info.cls.__init__).parameters
    bools = {k for k, v in signature.items() if isinstance(v.default, bool)}
    assert set(info.flags) == bools - NOT_FLAGS
    assert info.inputs and info.error_inputs
    for inp in info.inputs:
        assert set(inp.kwargs) <= set(signature), inp
        info.cls([P(*info.param_shape)], **inp.kwargs)  # valid: constructs
    for flag in info.flags:  # the grid of valid configurations sets each flag both ways
        values = {bool(inp.kwargs.get(flag, signature[flag].default)) for inp in info.inputs}
        assert values == {False, True}, flag
    for err in info.error_inputs:
        assert err.phase in (CONSTRUCTION, STEP)
        assert set(err.kwargs) <= set(signature), err


@pytest.mark.parametrize("name", list(DB))
def test_torch_twin_is_recorded(name):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    info = DB[name]
    assert (info.torch_name is not None) == hasattr(torch.optim, name)
    if info.torch_name is not None:
        assert info.torch_name == name and info.torch_cls(torch) is getattr(torch.optim, name)


@pytest.mark.parametrize("name", [info.name for info in OPTIM_DB if info.per_element])
def test_per_element_entry_has_what_the_generic_tests_need(name):
    info = DB[name]
    assert name in R.RULES
    assert info.quadratic is not None and info.rosenbrock is not None
    assert info.hyperparameters is not None
    assert info.param_shape == (3,)
    for inp in info.inputs:  # the reference knows every configuration
        x = np.ones(3, np.float32)
        R.step(name, x, x, R.new_state(name, x, inp.kwargs), inp.kwargs)
