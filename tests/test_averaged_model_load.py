"""swa_utils.AveragedModel.load_state_dict checks every entry before copying any."""
import numpy as np
import pytest

from fastopt import swa_utils


def _model():
    avg = swa_utils.AveragedModel([np.array([1.0, 2.0]), np.array(3.0, np.float32)])
    avg.buffers = [np.array([4], np.int64)]
    avg.n_averaged = 2
    return avg


def _good():
    return {"params": [np.array([5.0, 6.0]), np.array(7.0)], "buffers": [np.array([8])],
            "n_averaged": 3}


BAD = [
    ("params", [np.array([5.0, 6.0]), "x"], TypeError,
     r"state_dict\['params'\]\[1\] must be an array, got str"),
    ("params", [np.array([5.0, 6.0]), None], TypeError, r"state_dict\['params'\]\[1\]"),
    ("params", [np.array([5.0, 6.0]), np.array(1j)], TypeError,
     r"state_dict\['params'\]\[1\] has dtype complex128"),
    ("params", [np.array([5.0, 6.0]), np.array(["a"])], TypeError, r"has dtype <U1"),
    ("params", [np.array([5.0, 6.0]), [[1.0], [2.0, 3.0]]], TypeError,
     r"state_dict\['params'\]\[1\] must be an array"),
    ("params", "ab", TypeError, r"state_dict\['params'\] must be a list of arrays, got str"),
    ("params", [np.array([5.0, 6.0])], ValueError, r"holds 1 arrays, expected 2"),
    ("buffers", [np.array([8.5])], TypeError,
     r"state_dict\['buffers'\]\[0\] has dtype float64, which does not cast to the average's "
     r"int64"),
    ("n_averaged", True, ValueError, r"n_averaged must be a non-negative integer"),
    ("n_averaged", 2.0, ValueError, r"n_averaged must be a non-negative integer"),
]


@pytest.mark.parametrize("key,value,error,match", BAD,
                         ids=[f"{row[0]}-{i}" for i, row in enumerate(BAD)])
def test_a_bad_entry_is_refused_before_any_array_is_copied(key, value, error, match):
    avg = _model()
    before = avg.state_dict()
    sd = dict(_good(), **{key: value})
    with pytest.raises(error, match=match):
        avg.load_state_dict(sd)
    after = avg.state_dict()
    assert after["n_averaged"] == before["n_averaged"]
    for name in ("params", "buffers"):
        for a, b in zip(after[name], before[name]):
            np.testing.assert_array_equal(a, b)


def test_a_good_state_loads_with_casts_within_a_kind():
    avg = _model()
    sd = _good()
    sd["params"][1] = np.array(7.0)  # float64 into the float32 average
    sd["buffers"] = [[9]]  # a nested list of numbers
    avg.load_state_dict(sd)
    np.testing.assert_array_equal(avg.params[0], [5.0, 6.0])
    assert avg.params[1].dtype == np.float32 and float(avg.params[1]) == 7.0
    assert avg.buffers[0].tolist() == [9] and avg.n_averaged == 3
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        avg.load_state_dict([("params", [])])
