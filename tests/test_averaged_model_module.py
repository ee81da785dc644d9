"""fastopt.swa_utils.AveragedModel and update_bn on a torch.nn.Module: torch's contract and,
in lockstep with torch.optim.swa_utils, torch's numbers bit for bit (the default SWA update
and fastopt's EMA/SWA functions in the C kernel on the tensors' memory)."""
import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from fastopt import _kernels
from fastopt import swa_utils as FS

torch = pytest.importorskip("torch", reason="torch modules are what these tests average")
TS = torch.optim.swa_utils


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7),
                               torch.nn.ReLU(), torch.nn.Linear(7, 3)).to(dtype)


def _train_a_bit(model, k):
    """New parameters and BatchNorm statistics, as a training step would leave them."""
    g = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    model.train()
    model(torch.randn(16, 5, generator=g, dtype=next(model.parameters()).dtype))


def _kwargs(lib, case):
    return {
        "swa": {},
        "swa-buffers": {"use_buffers": True},
        "ema": {"multi_avg_fn": lib.get_ema_multi_avg_fn(0.9)},
        "ema-buffers": {"multi_avg_fn": lib.get_ema_multi_avg_fn(0.75), "use_buffers": True},
        "swa-multi": {"multi_avg_fn": lib.get_swa_multi_avg_fn()},
        "swa-multi-buffers": {"multi_avg_fn": lib.get_swa_multi_avg_fn(), "use_buffers": True},
        "ema-avg": {"avg_fn": lib.get_ema_avg_fn(0.99)},
        "swa-avg": {"avg_fn": lib.get_swa_avg_fn()},
    }[case]


def _assert_same_state(ours, theirs, what=""):
    sd, tsd = ours.state_dict(), theirs.state_dict()
    assert list(sd) == list(tsd)
    for key in sd:
        assert sd[key].dtype == tsd[key].dtype, key
        assert torch.equal(sd[key], tsd[key]), f"{what}: {key}"


CASES = ["swa", "swa-buffers", "ema", "ema-buffers", "swa-multi", "swa-multi-buffers",
         "ema-avg", "swa-avg"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_averaged_module_is_torchs_bit_for_bit(case, dtype):
    """Eight updates of a Linear-BatchNorm-Linear model (a long buffer among the float
    ones): the whole state dict (averages, copied or averaged buffers, n_averaged) equals
    torch's after every update, and so does the forward pass. torch's SWA function fails
    on the long buffer (``addcdiv`` refuses integers) after averaging the float tensors and
    before counting the update: so does fastopt's, which hands integers to torch."""
    model = _model(dtype)
    ours = FS.AveragedModel(model, **_kwargs(FS, case))
    theirs = TS.AveragedModel(model, **_kwargs(TS, case))
    assert isinstance(ours, torch.nn.Module) and isinstance(ours, TS.AveragedModel)
    assert isinstance(ours, FS.AveragedModel)
    x = torch.randn(4, 5, dtype=dtype)
    for k in range(8):
        _train_a_bit(model, k)
        if case == "swa-multi-buffers" and k:
            for avg in (ours, theirs):
                with pytest.raises(RuntimeError, match="Integer division with addcdiv"):
                    avg.update_parameters(model)
        else:
            ours.update_parameters(model)
            theirs.update_parameters(model)
        _assert_same_state(ours, theirs, f"update {k}")
    ours.eval()
    theirs.eval()
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours(x), ours.module(x))


def test_default_and_ema_updates_run_in_the_c_kernel_on_the_tensors_memory(monkeypatch):
    """One kernel call per update for all float32/float64 tensors (the first update is a
    copy); the long buffer takes torch's formula; the parameters stay the same tensors,
    updated in place, with their version counters bumped as an in-place op does."""
    calls = []
    real = _kernels.average

    def spy(dst, src, weight, lerp):
        calls.append((len(dst), weight, lerp))
        return real(dst, src, weight, lerp)

    monkeypatch.setattr(_kernels, "average", spy)
    model = _model()
    swa = FS.AveragedModel(model, use_buffers=True)
    ema = FS.AveragedModel(model, multi_avg_fn=FS.get_ema_multi_avg_fn(0.5))
    weight = swa.module[0].weight
    ptr = weight.data_ptr()
    for k in range(3):
        _train_a_bit(model, k)
        version = weight._version
        swa.update_parameters(model)
        ema.update_parameters(model)
        if k:
            assert weight._version > version
    n_float = sum(1 for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    n_params = len(list(model.parameters()))
    assert calls == [(n_float, 2.0, False), (n_params, 0.5, True),
                     (n_float, 3.0, False), (n_params, 0.5, True)]
    assert swa.module[0].weight is weight and weight.data_ptr() == ptr
    # counts 1, 2, 3: 1 + (2 - 1) / 2 and then 1 + (3 - 1) / 3 truncate to 1 in a long tensor
    assert int(swa.module[1].num_batches_tracked) == 1


def test_fastopt_functions_in_torchs_averaged_model_and_mixed_lists():
    """fastopt's averaging functions take tensor lists as torch's do (in torch's own
    AveragedModel too); pairs the kernel cannot take (float16, non-contiguous averages,
    another dtype) get torch's op, an integer list torch's code."""
    model = _model()
    ours = TS.AveragedModel(model, multi_avg_fn=FS.get_ema_multi_avg_fn(0.8), use_buffers=True)
    theirs = TS.AveragedModel(model, multi_avg_fn=TS.get_ema_multi_avg_fn(0.8),
                              use_buffers=True)
    for k in range(4):
        _train_a_bit(model, k)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    _assert_same_state(ours, theirs)

    def lists():
        g = torch.Generator().manual_seed(3)
        avg = [torch.randn(6, generator=g), torch.randn(6, generator=g).half(),
               torch.randn(4, 3, generator=g).t(), torch.randn(5, generator=g).double()]
        cur = [torch.randn(6, generator=g), torch.randn(6, generator=g).half(),
               torch.randn(3, 4, generator=g), torch.randn(5, generator=g).double()]
        return avg, cur

    for mine, ref in [(FS.get_ema_multi_avg_fn(0.3), TS.get_ema_multi_avg_fn(0.3)),
                      (FS.get_swa_multi_avg_fn(), TS.get_swa_multi_avg_fn())]:
        for n in (torch.tensor(2), 2):
            (a, c), (ta, tc) = lists(), lists()
            mine(a, c, n)
            ref(ta, tc, n)
            for x, y in zip(a, ta):
                assert torch.equal(x, y)
        # integers: torch's EMA truncates its weighted sum, torch's SWA raises
        outcomes = []
        for fn in (mine, ref):
            ints = [torch.arange(5) * 3]
            try:
                fn(ints, [torch.full((5,), 7)], 1)
                outcomes.append(ints[0].tolist())
            except RuntimeError as e:
                outcomes.append((str(e), ints[0].tolist()))
        assert outcomes[0] == outcomes[1]


def test_torch_signature_device_and_mismatched_dtypes():
    """Positional arguments in torch's order (model, device, avg_fn, ...); an average kept in
    float32 of a float64 model takes torch's formula (float64 arithmetic, cast back)."""
    model = _model(torch.float64)
    ours = FS.AveragedModel(_model(), "cpu", None, FS.get_swa_multi_avg_fn())
    assert ours.multi_avg_fn is not None and ours.n_averaged.device.type == "cpu"
    ours = FS.AveragedModel(_model(), torch.device("cpu"))
    theirs = TS.AveragedModel(_model(), torch.device("cpu"))
    for k in range(3):
        _train_a_bit(model, k)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    _assert_same_state(ours, theirs)
    assert ours.module[0].weight.dtype == torch.float32
    with pytest.raises(AssertionError, match="Only one of avg_fn and multi_avg_fn"):
        FS.AveragedModel(model, avg_fn=FS.get_swa_avg_fn(),
                         multi_avg_fn=FS.get_swa_multi_avg_fn())


def test_non_contiguous_parameters_as_torch():
    """A transposed weight in the model (the kernel reads a copy) and in the average (torch's
    formula): the same numbers as torch."""
    model = _model()
    model[0].weight = torch.nn.Parameter(model[0].weight.detach().t().contiguous().t())
    ours, theirs = FS.AveragedModel(model), TS.AveragedModel(model)
    ours.module[3].weight = torch.nn.Parameter(ours.module[3].weight.detach().t().contiguous()
                                               .t())
    theirs.module[3].weight = torch.nn.Parameter(theirs.module[3].weight.detach().t()
                                                 .contiguous().t())
    assert not ours.module[3].weight.is_contiguous()
    for k in range(4):
        _train_a_bit(model, k)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    _assert_same_state(ours, theirs)


def test_state_dict_round_trips_with_torchs_averaged_model():
    """Same keys as torch's (``n_averaged`` a registered buffer); each loads the other's and
    the continuation stays bit for bit."""
    model = _model()
    ours, theirs = FS.AveragedModel(model), TS.AveragedModel(model)
    assert dict(ours.named_buffers())["n_averaged"].dtype == torch.long
    for k in range(3):
        _train_a_bit(model, k)
        ours.update_parameters(model)
    theirs.load_state_dict(ours.state_dict())
    _assert_same_state(ours, theirs)
    again = FS.AveragedModel(_model(seed=5))
    again.load_state_dict(theirs.state_dict())
    assert int(again.n_averaged) == 3
    for k in range(3, 6):
        _train_a_bit(model, k)
        again.update_parameters(model)
        theirs.update_parameters(model)
        ours.update_parameters(model)
    _assert_same_state(again, theirs)
    _assert_same_state(ours, theirs)
    copied = copy.deepcopy(ours)
    _assert_same_state(copied, ours)
    assert type(copied) is type(ours)


@pytest.mark.parametrize("assign", [False, True])
def test_a_refused_state_dict_changes_nothing(assign):
    """Where torch raises after copying the entries that fit (a shape mismatch, a missing key
    with ``strict``), the average is left as it was; the error is torch's."""
    model = _model()
    ours = FS.AveragedModel(model)
    _train_a_bit(model, 0)
    ours.update_parameters(model)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    objects = dict(ours.state_dict(keep_vars=True))
    good = {k: v + 1 for k, v in before.items()}
    bad_shape = dict(good, **{"module.3.bias": torch.zeros(4)})
    missing = {k: v for k, v in good.items() if k != "module.0.bias"}
    for bad, match in [(bad_shape, "size mismatch"), (missing, "Missing key")]:
        with pytest.raises(RuntimeError, match=match):
            ours.load_state_dict(bad, assign=assign)
        after = ours.state_dict(keep_vars=True)
        for key, value in before.items():
            assert torch.equal(after[key], value), key
            assert after[key] is objects[key], key
        theirs = TS.AveragedModel(model)
        theirs.load_state_dict(before)
        with pytest.raises(RuntimeError, match=match):
            theirs.load_state_dict(bad, assign=assign)
        if not assign:  # torch copied the entries that fit before raising
            assert torch.equal(theirs.module[0].weight, good["module.0.weight"])
    result = ours.load_state_dict(missing, strict=False, assign=assign)
    assert result.missing_keys == ["module.0.bias"]
    assert torch.equal(ours.module[0].weight, good["module.0.weight"])


def test_update_bn_is_torchs():
    """update_bn recomputes the BatchNorm statistics of an averaged model as torch's, from
    a loader of (input, target) pairs; momentum and training mode come back."""
    model = _model()
    ours, theirs = FS.AveragedModel(model), TS.AveragedModel(model)
    for k in range(3):
        _train_a_bit(model, k)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    g = torch.Generator().manual_seed(9)
    loader = [(torch.randn(8, 5, generator=g) * 2 + 1, torch.zeros(8)) for _ in range(4)]
    ours.eval()
    theirs.eval()
    FS.update_bn(loader, ours)
    TS.update_bn(loader, theirs)
    _assert_same_state(ours, theirs)
    assert not ours.training and ours.module[1].momentum == 0.1
    FS.update_bn([x for x, _ in loader], ours.module, device="cpu")
    TS.update_bn([x for x, _ in loader], theirs.module, device="cpu")
    _assert_same_state(ours, theirs)
    with pytest.raises(TypeError, match="update_bn needs a torch.nn.Module"):
        FS.update_bn(loader, FS.AveragedModel([np.zeros(3)]))


def test_importing_fastopt_imports_no_torch_and_a_pickled_average_loads_alone():
    """The module class is defined on first use; a pickled averaged module loads in a fresh
    interpreter that imported neither torch nor the class before."""
    model = _model()
    ours = FS.AveragedModel(model)
    _train_a_bit(model, 0)
    ours.update_parameters(model)
    ours.update_parameters(model)
    blob = pickle.dumps(ours)
    code = ("import sys, pickle, fastopt, fastopt.swa_utils\n"
            "assert 'torch' not in sys.modules\n"
            "avg = pickle.loads(sys.stdin.buffer.read())\n"
            "assert isinstance(avg, fastopt.swa_utils.AveragedModel)\n"
            "print(int(avg.n_averaged), avg.module[0].weight.detach().sum().item())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                         env=env, check=True, timeout=120).stdout.decode().splitlines()[-1].split()
    assert int(out[0]) == 2
    assert float(out[1]) == ours.module[0].weight.detach().sum().item()
