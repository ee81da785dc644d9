import os

import numpy as np
import pytest

import fastopt
from fastopt import _kernels

if "CI" in os.environ:
    from hypothesis import settings
    settings.load_profile("ci")

ISA_LEVELS = [name for name in _kernels.isa_levels() if _kernels.isa_supported(name)]


@pytest.fixture(params=ISA_LEVELS)
def isa(request):
    """Run the test once per ISA level this CPU and build support, then restore."""
    before = _kernels.get_isa()
    _kernels.set_isa(request.param)
    yield request.param
    _kernels.set_isa(before)


@pytest.fixture
def threads():
    """Set the thread count for a test; restores the previous count afterwards."""
    before = fastopt.get_num_threads()
    yield fastopt.set_num_threads
    fastopt.set_num_threads(before)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
