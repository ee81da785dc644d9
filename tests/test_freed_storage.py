"""A torch tensor whose storage was freed or shrunk (``untyped_storage().resize_(0)``, as FSDP
frees parameters between uses) gives an array over memory it lacks through ``.numpy()``.
Every entry point that reads user tensors through NumPy refuses one, naming it, and changes
nothing."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.checkpoint as checkpoint  # noqa: E402
import fastopt.functional as F  # noqa: E402
import fastopt.interop as interop  # noqa: E402
import fastopt.swa_utils as swa_utils  # noqa: E402
import fastopt.torch  # noqa: E402


def _freed(n=3):
    t = torch.ones(n)
    t.untyped_storage().resize_(0)
    return t


def test_functional_refuses_a_freed_gradient():
    p = np.zeros(3, np.float32)
    with pytest.raises(RuntimeError, match=r"grads\[0\]: the tensor's storage holds 0 bytes"):
        F.adam([p], [_freed()], [np.zeros(3, np.float32)], [np.zeros(3, np.float32)], [],
               [np.zeros((), np.float32)], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
               weight_decay=0.0, amsgrad=False, maximize=False)
    assert not p.any()


def test_interop_refuses_a_freed_state_tensor():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"].untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match=r"state_dict\['state'\]\[0\]\['exp_avg'\]: the "
                                           r"tensor's storage holds 0 bytes"):
        interop.state_dict_from_torch(sd)


def test_a_checkpoint_of_a_freed_tensor_is_refused_and_not_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = fastopt.torch.Adam(model.parameters(), lr=torch.tensor(0.01))
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    opt.param_groups[0]["lr"].untyped_storage().resize_(0)
    path = tmp_path / "opt.fo"
    with pytest.raises(RuntimeError, match=r"\['param_groups'\]\[0\]\['lr'\]: the tensor's "
                                           r"storage holds 0 bytes"):
        checkpoint.save(path, opt)
    assert os.listdir(tmp_path) == []


def test_an_average_refuses_a_freed_tensor_to_load():
    a = np.full(3, 2.0, np.float32)
    avg = swa_utils.AveragedModel([a])
    before = avg.state_dict()
    with pytest.raises(RuntimeError, match=r"state_dict\['params'\]\[0\]: the tensor's "
                                           r"storage holds 0 bytes"):
        avg.load_state_dict({"params": [_freed()], "buffers": [], "n_averaged": 1})
    after = avg.state_dict()
    assert after["n_averaged"] == before["n_averaged"]
    np.testing.assert_array_equal(after["params"][0], before["params"][0])
