"""fastopt.set_num_threads takes integers only, as torch.set_num_threads."""
import numpy as np
import pytest

import fastopt
from helpers import import_torch

NOT_INTEGERS = [1.5, 2.0, "2", True, False, None, np.float64(2.0), np.True_, [2]]


@pytest.mark.parametrize("value", NOT_INTEGERS, ids=repr)
def test_a_thread_count_that_is_no_integer_is_refused_and_changes_nothing(value, threads):
    threads(1)
    with pytest.raises(TypeError, match="set_num_threads expects an int, but got") as info:
        fastopt.set_num_threads(value)
    assert isinstance(info.value, RuntimeError)  # torch's type for the same error
    assert fastopt.get_num_threads() == 1


@pytest.mark.parametrize("value", [v for v in NOT_INTEGERS if not isinstance(v, np.generic)],
                         ids=repr)
def test_torch_refuses_the_same_thread_counts_with_a_runtime_error(value):
    torch = import_torch(vector_kernels=False)
    before = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="set_num_threads expects an int"):
            torch.set_num_threads(value)
    finally:
        torch.set_num_threads(before)


def test_python_and_numpy_integers_set_the_count(threads):
    for value in (2, np.int64(1), np.int32(2)):
        threads(value)
        assert fastopt.get_num_threads() == int(value)
    with pytest.raises(ValueError, match="positive"):
        fastopt.set_num_threads(np.int64(0))
