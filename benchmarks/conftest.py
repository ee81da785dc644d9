"""Shared by the benchmark suites: every benchmark runs fastopt and torch on one thread."""
import pytest

import fastopt


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    try:
        import torch
    except ImportError:
        torch = None
    before = fastopt.get_num_threads(), torch.get_num_threads() if torch else None
    fastopt.set_num_threads(1)
    if torch:
        torch.set_num_threads(1)
    yield
    fastopt.set_num_threads(before[0])
    if torch:
        torch.set_num_threads(before[1])
