"""Checkpoints (``fastopt.save`` / ``fastopt.load``): a loaded run continues bit for bit for
every optimizer of the database (NumPy and torch parameters, with schedulers), files interoperate
with the ``safetensors`` package, truncated, corrupted and foreign files are refused with the
optimizer and scheduler unchanged, and a writer killed at random never leaves a broken file."""
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fastopt
from fastopt import checkpoint as C
from fastopt import lr_scheduler as L
from fastopt import swa_utils
from helpers import assert_bits, grads, rosenbrock, snapshot
from optim_db import DB, OPTIM_DB, configs

safetensors_numpy = pytest.importorskip("safetensors.numpy",
                                        reason="safetensors is the reference reader")
from safetensors import safe_open  # noqa: E402

N_BEFORE, N_AFTER = 4, 3


# ---- runs: an optimizer, its parameters, a scheduler and a deterministic step k -----------------

class Run:
    """One training run of optimizer ``name``: ``step(k)`` applies gradient number ``k`` (the
    same in every run of the same configuration) and steps the optimizer and the scheduler."""

    def __init__(self, name, kwargs, setup=None, torch=None, start=None, scheduler=True):
        self.name, self.torch = name, torch
        setup = setup or {}
        info = DB[name]
        if name == "LBFGS":
            shapes = [(len(setup["x0"]),)]
            dtype = np.dtype(setup["dtype"])
            values = [np.array(setup["x0"], dtype=dtype)]
        else:
            shapes = {"SparseAdam": [(6, 4), (4, 6)], "Muon": [(6, 4), (4, 6)],
                      "Adafactor": [(6, 4), (5,), (2, 3, 4)]}.get(name, [(5,), (3, 4)])
            dtype = np.dtype(np.float32)
            rng = np.random.default_rng(3)
            values = [rng.standard_normal(s).astype(dtype) for s in shapes]
        if start is not None:
            values = [np.array(v) for v in start]
        if torch is not None:
            self.params = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in values]
        else:
            self.params = [fastopt.Parameter(v.copy()) for v in values]
        if info.per_element and len(self.params) > 1:
            groups = [{"params": self.params[:1]}, {"params": self.params[1:], "lr": 0.03}]
        else:
            groups = self.params
        self.opt = info.cls(groups, **kwargs)
        self.sched = None
        if scheduler:
            self.sched = (info.scheduled_runs[0].scheduler(L, self.opt) if info.scheduled_runs
                          else L.StepLR(self.opt, step_size=2, gamma=0.5))

    def arrays(self):
        return [p.detach().numpy() if self.torch is not None else np.asarray(p)
                for p in self.params]

    def _set_grad(self, p, g):
        if self.name == "SparseAdam":
            rows = np.array([0, 2, 3]) if len(g) > 3 else np.array([1])
            g = fastopt.SparseGrad(rows, g[rows])
        elif self.torch is not None:
            g = self.torch.from_numpy(g)
        p.grad = g

    def step(self, k):
        if self.name == "LBFGS":
            p = self.params[0]

            def closure():
                f, g = rosenbrock(np.asarray(p, dtype=np.float64))
                p.grad = g.astype(p.dtype)
                return f
            self.opt.step(closure)
        else:
            rng = np.random.default_rng(100 + k)
            for p, a in zip(self.params, self.arrays()):
                self._set_grad(p, grads(rng, a.shape, a.dtype, k))
            self.opt.step()
        if self.sched is not None:
            self.sched_step(k)

    def sched_step(self, k):
        self.sched.step()


def same(a, b, where="value"):
    """Equal values of equal types, arrays bit for bit, recursively."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, (np.ndarray, np.generic)):
        assert_bits(np.asarray(a), np.asarray(b), where)
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert repr(a) == repr(b), (where, a, b)
    else:
        assert a == b, (where, a, b)


def assert_same_run(a, b):
    for i, (x, y) in enumerate(zip(a.arrays(), b.arrays())):
        assert_bits(x, y, f"parameter {i}")
    for i, (p, q) in enumerate(zip(a.params, b.params)):
        same(dict(a.opt.state.get(p, {})), dict(b.opt.state.get(q, {})), f"state[{i}]")
    strip = [{k: v for k, v in g.items() if k != "params"} for g in a.opt.param_groups]
    same(strip, [{k: v for k, v in g.items() if k != "params"} for g in b.opt.param_groups],
         "param_groups")
    if a.sched is not None:
        same(a.sched.state_dict(), b.sched.state_dict(), "scheduler")


def _every_optimizer():
    out = []
    for info in OPTIM_DB:
        for i, inp in enumerate(info.inputs):
            out.append(pytest.param(info.name, inp.kwargs, inp.setup, id=f"{info.name}-{i}"))
    return out


def _round_trip(tmp_path, name, kwargs, setup, torch=None):
    a = Run(name, kwargs, setup, torch=torch)
    for k in range(N_BEFORE):
        a.step(k)
    path = tmp_path / "run.safetensors"
    fastopt.save(path, a.opt, a.sched, extra={"steps": N_BEFORE, "note": "ok"})
    b = Run(name, kwargs, setup, torch=torch, start=a.arrays())
    assert fastopt.load(path, b.opt, b.sched) == {"steps": N_BEFORE, "note": "ok"}
    assert_same_run(a, b)
    for k in range(N_BEFORE, N_BEFORE + N_AFTER):
        a.step(k)
        b.step(k)
    assert_same_run(a, b)
    return a, b


@pytest.mark.parametrize("name,kwargs,setup", _every_optimizer())
def test_a_loaded_run_continues_bit_for_bit(tmp_path, name, kwargs, setup):
    """Every configuration of every optimizer in the database, with a scheduler: train,
    save, load into a fresh optimizer and scheduler, continue both: parameters, state
    (types included: 0-d float32 counters, SparseAdam's int step, LBFGS's history lists),
    hyperparameters and scheduler state equal bit for bit."""
    _round_trip(tmp_path, name, kwargs, setup)


def test_every_optimizer_is_in_the_round_trip():
    every = {**fastopt.OPTIMIZERS, **fastopt.OTHER_OPTIMIZERS}
    assert {p.values[0] for p in _every_optimizer()} == set(every)


@pytest.mark.parametrize("name,kwargs", configs() + configs([DB["Adafactor"], DB["Muon"]]))
def test_a_run_on_torch_parameters_continues_bit_for_bit(tmp_path, name, kwargs):
    torch = pytest.importorskip("torch")
    _round_trip(tmp_path, name, kwargs, None, torch=torch)


def test_lbfgs_history_is_stored_as_indexed_tensors(tmp_path):
    inp = DB["LBFGS"].inputs[0]
    a = Run("LBFGS", inp.kwargs, inp.setup, scheduler=False)
    for k in range(3):
        a.step(k)
    path = tmp_path / "lbfgs.safetensors"
    fastopt.save(path, a.opt)
    arrays = safetensors_numpy.load_file(str(path))
    state = a.opt.state[a.params[0]]
    assert len(state["old_dirs"]) >= 2
    for key in ("old_dirs", "old_stps"):
        for j, v in enumerate(state[key]):
            assert_bits(arrays[f"optimizer.state.0.{key}.{j}"], v, f"{key}[{j}]")
    for j, v in enumerate(state["ro"]):  # NumPy scalars: 0-d tensors, loaded as scalars
        assert arrays[f"optimizer.state.0.ro.{j}"].shape == ()
    assert_bits(arrays["optimizer.state.0.d"], state["d"])


# ---- schedulers -------------------------------------------------------------------------------

class Scale:
    """A callable object: LambdaLR saves its __dict__."""

    def __init__(self, rate):
        self.rate = rate

    def __call__(self, epoch):
        return self.rate ** epoch


SCHEDULER_FACTORIES = {
    "LambdaLR": lambda o: L.LambdaLR(o, [lambda e: 0.9 ** e, Scale(0.8)]),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o: L.StepLR(o, 2, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, [2, 5, 5], gamma=0.5),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.5, total_iters=5),
    "LinearLR": lambda o: L.LinearLR(o, 0.1, total_iters=6),
    "ExponentialLR": lambda o: L.ExponentialLR(o, 0.9),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=6, power=2.0),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, 5, eta_min=1e-3),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, 3, T_mult=2),
    "CyclicLR": lambda o: L.CyclicLR(o, 0.01, 0.1, 2, scale_fn=Scale(0.5), scale_mode="cycle"),
    "OneCycleLR": lambda o: L.OneCycleLR(o, [0.1, 0.2], total_steps=10),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "SequentialLR": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.5, total_iters=2), L.ExponentialLR(o, 0.9)], milestones=[3]),
    "ChainedScheduler": lambda o: L.ChainedScheduler([L.ConstantLR(o, 0.5, 3),
                                                      L.ExponentialLR(o, 0.9)]),
    "FunctionLR": lambda o: L.FunctionLR(o, fastopt.schedules.exponential_decay(
        0.1, 2, 0.5)),
    "SWALR": lambda o: swa_utils.SWALR(o, swa_lr=0.01, anneal_epochs=3),
}


def test_every_scheduler_has_a_factory():
    assert set(SCHEDULER_FACTORIES) == set(L.SCHEDULERS) | {"SWALR"}


class SchedRun(Run):
    """SGD with momentum driven by scheduler ``sched`` (ReduceLROnPlateau sees a metric that
    stalls every third step)."""

    def __init__(self, sched, start=None):
        super().__init__("SGD", {"lr": 0.1, "momentum": 0.9}, start=start, scheduler=False)
        self.sched = SCHEDULER_FACTORIES[sched](self.opt)

    def sched_step(self, k):
        if isinstance(self.sched, L.ReduceLROnPlateau):
            self.sched.step(1.0 + (k % 3 == 0))
        else:
            self.sched.step()


@pytest.mark.parametrize("sched", sorted(SCHEDULER_FACTORIES))
def test_every_scheduler_continues_after_a_load(tmp_path, sched):
    a = SchedRun(sched)
    for k in range(4):
        a.step(k)
    path = tmp_path / "s.safetensors"
    fastopt.save(path, a.opt, a.sched)
    b = SchedRun(sched, start=a.arrays())
    fastopt.load(path, b.opt, b.sched)
    assert_same_run(a, b)
    for k in range(4, 9):
        a.step(k)
        b.step(k)
        assert a.sched.get_last_lr() == b.sched.get_last_lr()
    assert_same_run(a, b)


def test_lists_and_dicts_of_schedulers(tmp_path):
    def make(start=None):
        r = Run("Adam", {"lr": 0.01}, start=start, scheduler=False)
        return r, [L.ConstantLR(r.opt, 0.5, 3), L.ExponentialLR(r.opt, 0.9)]

    a, sa = make()
    for k in range(3):
        a.step(k)
        for s in sa:
            s.step()
    fastopt.save(tmp_path / "list", a.opt, sa)
    fastopt.save(tmp_path / "dict", a.opt, {"warmup": sa[0], "decay": sa[1]})
    for form in ("list", "dict"):
        b, sb = make(a.arrays())
        given = sb if form == "list" else {"warmup": sb[0], "decay": sb[1]}
        fastopt.load(tmp_path / form, b.opt, given)
        for x, y in zip(sa, sb):
            same(x.state_dict(), y.state_dict(), form)
        assert_same_run(a, b)
    saved = C.read(tmp_path / "dict")["scheduler"]
    assert list(saved) == ["warmup", "decay"]
    assert saved["decay"]["class"] == "fastopt.lr_scheduler.ExponentialLR"


# ---- the safetensors package reads fastopt's files, and fastopt reads its files ---------------

def _saved_run(tmp_path, name="Adam", kwargs=None, steps=N_BEFORE):
    a = Run(name, kwargs if kwargs is not None else {"lr": 0.01, "amsgrad": True})
    for k in range(steps):
        a.step(k)
    path = tmp_path / "run.safetensors"
    fastopt.save(path, a.opt, a.sched, extra={"epoch": 7, "w": np.arange(3.0)})
    return a, path


@pytest.mark.parametrize("name", ["Adam", "NAdam", "ASGD", "SparseAdam", "Adafactor"])
def test_safetensors_reads_the_state_arrays(tmp_path, name):
    a, path = _saved_run(tmp_path, name, DB[name].inputs[0].kwargs)
    arrays = safetensors_numpy.load_file(str(path))
    expected = {}
    for i, p in enumerate(a.params):
        for key, v in a.opt.state[p].items():
            if isinstance(v, np.ndarray):
                expected[f"optimizer.state.{i}.{key}"] = v
    expected["extra.w"] = np.arange(3.0)
    assert set(arrays) == set(expected)
    for k, v in expected.items():
        assert_bits(arrays[k], v, k)  # dtype and shape too: 0-d float32 step counters
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert meta["fastopt.format"] == "fastopt.checkpoint" and meta["fastopt.version"] == "1"
    cls = type(a.opt)
    assert json.loads(meta["fastopt.content"])["optimizer"] == f"{cls.__module__}.{name}"


def documented_sha256(metadata, arrays):
    """The checksum as the module docstring defines it, computed from scratch."""
    codes = {"float32": "F32", "float64": "F64", "int64": "I64"}
    desc = {"metadata": {k: v for k, v in metadata.items() if k != "fastopt.sha256"},
            "tensors": {n: {"dtype": codes[str(a.dtype)], "shape": list(a.shape)}
                        for n, a in arrays.items()}}
    h = hashlib.sha256(json.dumps(desc, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\n")
    for n in sorted(arrays):
        h.update(np.ascontiguousarray(arrays[n]).astype(arrays[n].dtype.newbyteorder("<"))
                 .tobytes())
    return h.hexdigest()


def test_the_checksum_is_the_documented_sha256(tmp_path):
    _, path = _saved_run(tmp_path)
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert meta["fastopt.sha256"] == documented_sha256(meta,
                                                       safetensors_numpy.load_file(str(path)))


def test_a_file_written_by_safetensors_loads(tmp_path):
    a, path = _saved_run(tmp_path)
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    other = tmp_path / "by_safetensors.safetensors"
    safetensors_numpy.save_file(safetensors_numpy.load_file(str(path)), str(other),
                                metadata=meta)
    b = Run("Adam", {"lr": 0.01, "amsgrad": True}, start=a.arrays())
    extra = fastopt.load(other, b.opt, b.sched)
    assert extra["epoch"] == 7
    assert_bits(extra["w"], np.arange(3.0))
    for k in range(N_BEFORE, N_BEFORE + N_AFTER):
        a.step(k)
        b.step(k)
    assert_same_run(a, b)


# ---- refused files: the error says which, nothing changes ------------------------------------

class Target:
    """An optimizer and scheduler in another state than the checkpoint, to load into."""

    def __init__(self, name="Adam", kwargs=None, start=None, setup=None):
        self.run = Run(name, kwargs if kwargs is not None else {"lr": 0.01, "amsgrad": True},
                       setup, start=start)
        self.run.step(50)
        self.before = self.snap()

    def snap(self):
        r = self.run
        return snapshot(r.opt, r.params), repr(r.sched.state_dict() if r.sched else None)

    def refuses(self, path, error, match=None):
        with pytest.raises(error, match=match) as info:
            fastopt.load(path, self.run.opt, self.run.sched)
        assert self.snap() == self.before
        return info.value


def _layout(data):
    """(header length, header dict, start of data): parsed here, independently of fastopt."""
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n]), 8 + n


def _positions(data):
    """One or more byte positions of each kind: the header length, the JSON structure, each
    metadata value, each tensor's name, dtype, shape and offsets, the padding, each tensor's
    data."""
    n, header, start = _layout(data)
    text = bytes(data[8:8 + n])
    out = {"header length": list(range(8)),
           "header start and end": [8, 8 + len(text.rstrip()) - 1]}
    for key, value in header.pop("__metadata__").items():
        enc = json.dumps(value)[1:-1].encode()
        at = 8 + text.index(enc)
        out[f"metadata key {key}"] = [8 + text.index(key.encode())]
        out[f"metadata value {key}"] = sorted({at, at + len(enc) // 2, at + len(enc) - 1})
    for name, info in header.items():
        at = 8 + text.index(json.dumps(name).encode())
        entry = json.dumps(info, separators=(",", ":")).encode()
        e = 8 + text.index(entry, at - 8)
        out[f"tensor name {name}"] = [at + 1]
        out[f"tensor entry {name}"] = [e + entry.index(b'"dtype"') + 10,
                                       e + entry.index(b'"shape"') + 9,
                                       e + entry.index(b'"data_offsets"') + 16]
        b, end = info["data_offsets"]
        if end > b:
            out[f"tensor data {name}"] = sorted({start + b, start + (b + end) // 2,
                                                 start + end - 1})
    pad = len(text) - len(text.rstrip())
    if pad:
        out["padding"] = [8 + n - 1]
    return out


def _write(path, data):
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("name", [info.name for info in OPTIM_DB])
def test_a_flipped_bit_anywhere_is_refused(tmp_path, name):
    """Bit flips at every kind of byte position (header length, header JSON, every metadata
    entry, every tensor's header entry and data, padding): CorruptCheckpointError, and the
    target optimizer and scheduler are unchanged."""
    info = DB[name]
    inp = info.inputs[0]
    a = Run(name, inp.kwargs, inp.setup)
    for k in range(3):
        a.step(k)
    path = tmp_path / "good.safetensors"
    fastopt.save(path, a.opt, a.sched, extra={"epoch": 3})
    data = bytearray(path.read_bytes())
    target = Target(name, inp.kwargs, setup=inp.setup)
    bad = tmp_path / "bad.safetensors"
    kinds = _positions(data)
    assert any(k.startswith("tensor data") for k in kinds)
    for kind, positions in kinds.items():
        for pos in positions:
            for bit in (0, 5, 7):
                flipped = bytearray(data)
                flipped[pos] ^= 1 << bit
                _write(bad, flipped)
                e = target.refuses(bad, C.CorruptCheckpointError)
                assert re.search("checksum mismatch|corrupted|truncated", str(e)), (kind, e)


def test_a_flipped_bit_in_every_byte_of_a_small_checkpoint_is_refused(tmp_path):
    """Every byte of a small checkpoint (with a scheduler), two of its bits (which two varies
    with the position, so every bit position is hit): each flip refused as damaged
    (CorruptCheckpointError, of which TruncatedCheckpointError is a kind)."""
    a = Run("Adam", {"lr": 0.01}, start=[np.arange(2, dtype=np.float32)])
    a.step(0)
    path = tmp_path / "small.safetensors"
    fastopt.save(path, a.opt, a.sched)
    data = path.read_bytes()
    assert len(data) < 2000
    target = Target("Adam", {"lr": 0.01}, start=[np.arange(2, dtype=np.float32)])
    bad = tmp_path / "bad.safetensors"
    for pos in range(len(data)):
        for bit in (pos % 8, 7 - pos % 8):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            _write(bad, flipped)
            try:
                fastopt.load(bad, target.run.opt, target.run.sched)
            except C.CorruptCheckpointError:
                pass
            else:
                raise AssertionError(f"byte {pos} bit {bit} flipped: loaded")
    assert target.snap() == target.before


@pytest.mark.parametrize("name", ["Adam", "LBFGS", "SparseAdam"])
def test_a_truncated_file_is_refused(tmp_path, name):
    inp = DB[name].inputs[0]
    a = Run(name, inp.kwargs, inp.setup)
    for k in range(3):
        a.step(k)
    path = tmp_path / "good.safetensors"
    fastopt.save(path, a.opt, a.sched)
    data = path.read_bytes()
    n, header, start = _layout(data)
    cuts = {0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, start, start + 1, len(data) - 1}
    for name_, info in header.items():
        if name_ != "__metadata__":
            cuts.add(start + sum(info["data_offsets"]) // 2)
    target = Target(name, inp.kwargs, setup=inp.setup)
    bad = tmp_path / "cut.safetensors"
    for cut in sorted(cuts):
        _write(bad, data[:cut])
        target.refuses(bad, C.TruncatedCheckpointError, "truncated")


def test_foreign_files_are_refused(tmp_path):
    target = Target()
    plain = tmp_path / "plain.safetensors"
    safetensors_numpy.save_file({"w": np.ones(3, np.float32)}, str(plain))
    target.refuses(plain, C.NotACheckpointError, "not a fastopt checkpoint")
    safetensors_numpy.save_file({"w": np.ones(3, np.float32)}, str(plain),
                                metadata={"format": "pt"})
    target.refuses(plain, C.NotACheckpointError, "not a fastopt checkpoint")
    npy = tmp_path / "w.npy"
    np.save(npy, np.ones(3))
    target.refuses(npy, C.CorruptCheckpointError)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint at all, but long enough\n")
    target.refuses(text, C.CorruptCheckpointError, "not a safetensors file")


def _rewritten(tmp_path, path, change):
    """``path`` rewritten by safetensors with its metadata changed by ``change`` and the
    checksum recomputed: a file with a valid checksum that fastopt must still refuse."""
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    arrays = safetensors_numpy.load_file(str(path))
    change(meta, arrays)
    meta["fastopt.sha256"] = documented_sha256(meta, arrays)
    out = tmp_path / "rewritten.safetensors"
    safetensors_numpy.save_file(arrays, str(out), metadata=meta)
    return out


def test_valid_files_that_are_not_this_format_are_refused(tmp_path):
    _, path = _saved_run(tmp_path)
    target = Target()

    def version(meta, arrays):
        meta["fastopt.version"] = "2"

    def marker(meta, arrays):
        meta["fastopt.format"] = "something.else"

    def content(meta, arrays):
        meta["fastopt.content"] = meta["fastopt.content"][:-5]

    def unused_tensor(meta, arrays):
        arrays["stray"] = np.zeros(2, np.float32)

    for change, match in [(version, "format version 2"), (marker, "not a fastopt checkpoint"),
                          (content, "malformed"), (unused_tensor, "not part of the content")]:
        target.refuses(_rewritten(tmp_path, path, change), C.NotACheckpointError, match)
    # the rewriting itself keeps a file loadable
    fastopt.load(_rewritten(tmp_path, path, lambda m, a: None), target.run.opt, target.run.sched)


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    _, path = _saved_run(tmp_path)  # Adam, groups of 1 and 1 parameters, a StepLR
    Target("SGD", {"lr": 0.1}).refuses(path, C.CheckpointMismatchError,
                                       "wrong optimizer: .* fastopt.adam.Adam, not .*SGD")
    Target(start=[np.zeros(5, np.float32)]).refuses(path, C.CheckpointMismatchError,
                                                    "2 parameter groups, the optimizer 1")
    Target(start=[np.zeros(5, np.float32), np.zeros((3, 4), np.float32),
                  np.zeros(2, np.float32)]).refuses(
        path, C.CheckpointMismatchError, r"param_groups\[1\] has 1 parameters in the checkpoint")
    Target(start=[np.zeros(5, np.float32), np.zeros((4, 3), np.float32)]).refuses(
        path, C.CheckpointMismatchError, r"\['params'\]\[0\] has shape \(3, 4\) in the checkpoint")

    t = Target()
    t.run.sched = L.ExponentialLR(t.run.opt, 0.9)
    t.before = t.snap()
    t.refuses(path, C.CheckpointMismatchError, "is a fastopt.lr_scheduler.ExponentialLR")
    sched = t.run.sched
    t.run.sched = None
    t.before = t.snap()
    t.refuses(path, C.CheckpointMismatchError, "is nothing, the checkpoint holds one scheduler")
    with pytest.raises(C.CheckpointMismatchError, match="is a list of schedulers"):
        fastopt.load(path, t.run.opt, [sched])
    assert t.snap() == t.before
    fastopt.save(tmp_path / "no_sched", t.run.opt)
    t.run.sched = sched
    t.before = t.snap()
    t.refuses(tmp_path / "no_sched", C.CheckpointMismatchError, "is one scheduler, the "
              "checkpoint holds nothing")


class RefusingScheduler:
    """A scheduler-like object whose load_state_dict refuses what it saved: loading it comes
    after the optimizer's load_state_dict, so load must undo that."""

    def state_dict(self):
        return {"x": 1}

    def load_state_dict(self, state_dict):
        raise ValueError("refused")


def test_a_scheduler_refusing_its_state_undoes_the_whole_load(tmp_path):
    a = Run("Adam", {"lr": 0.01})
    for k in range(3):
        a.step(k)
    fastopt.save(tmp_path / "c", a.opt, [a.sched, RefusingScheduler()])
    t = Target("Adam", {"lr": 0.01})
    scheds = [t.run.sched, RefusingScheduler()]
    state, groups = t.run.opt.state, t.run.opt.param_groups
    with pytest.raises(C.CheckpointMismatchError, match=r"scheduler\[1\]: refused"):
        fastopt.load(tmp_path / "c", t.run.opt, scheds)
    assert t.snap() == t.before
    assert t.run.opt.state is state and t.run.opt.param_groups is groups


def test_unstorable_values_raise_before_anything_is_written(tmp_path):
    a, path = _saved_run(tmp_path)
    data = path.read_bytes()
    with pytest.raises(TypeError, match=r"extra\['bad'\]\[1\]: cannot store a builtins.set"):
        fastopt.save(path, a.opt, a.sched, extra={"bad": [1, {2}]})
    with pytest.raises(TypeError, match="dtype complex128"):
        fastopt.save(path, a.opt, extra=np.zeros(2, complex))
    with pytest.raises(TypeError, match="expected a scheduler"):
        fastopt.save(path, a.opt, scheduler="StepLR")
    assert path.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["run.safetensors"]


def test_file_modes_and_a_failed_write(tmp_path):
    """A new checkpoint gets open()'s mode, a replaced one keeps its own; a write that fails
    (the target is a directory) raises OSError and leaves no temporary file."""
    a = Run("SGD", {"lr": 0.1, "momentum": 0.9}, scheduler=False)
    a.step(0)
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "c.safetensors"
    fastopt.save(path, a.opt)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o600)
    fastopt.save(path, a.opt)
    assert path.stat().st_mode & 0o777 == 0o600
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        fastopt.save(tmp_path / "d", a.opt)
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "d"]
    assert os.listdir(tmp_path / "d") == []


def test_extra_values_round_trip_with_their_types(tmp_path):
    extra = {"i": 3, "f": 0.1, "inf": float("-inf"), "nan": float("nan"), "s": "é", "n": None,
             "t": (1, (2.5, "x")), 4: [True, np.float32(1.5), np.int64(7), np.float64(2.0)],
             "a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": np.array([True, False]),
             "be": np.arange(3, dtype=">f8"), "0d": np.array(2.5)}
    a = Run("SGD", {"lr": 0.1}, scheduler=False)
    fastopt.save(tmp_path / "x", a.opt, extra=extra)
    got = fastopt.load(tmp_path / "x", Run("SGD", {"lr": 0.1}, scheduler=False).opt)
    expected = dict(extra, be=np.arange(3, dtype=np.float64))  # arrays load in native order
    assert list(got) == list(expected)
    for k in expected:
        if isinstance(expected[k], np.ndarray):
            assert got[k].dtype == expected[k].dtype and np.array_equal(got[k], expected[k])
            assert got[k].flags.writeable and got[k].flags.c_contiguous
        elif k == "nan":
            assert math.isnan(got[k])
        else:
            same(got[k], expected[k], repr(k))


# ---- atomic writes under SIGKILL --------------------------------------------------------------

BUILD = textwrap.dedent("""
    import numpy as np, fastopt

    def build(steps):
        p = fastopt.Parameter(np.linspace(-1, 1, 300_000, dtype=np.float32))
        opt = fastopt.Adam([p], lr=1e-3)
        for k in range(steps):
            p.grad = np.full(p.shape, k + 1.0, np.float32)
            opt.step()
        return p, opt
""")

WRITER = BUILD + textwrap.dedent("""
    import sys
    states = [build(1), build(2)]
    print("ready", flush=True)
    while True:
        for which, (p, opt) in enumerate(states):
            fastopt.save(sys.argv[1], opt, extra={"which": which})
""")


def test_a_writer_killed_at_random_leaves_the_old_or_the_new_checkpoint(tmp_path):
    """A subprocess saves two different states in turn, forever; it is killed with SIGKILL
    at random moments. After every kill the checkpoint is absent (only before the first
    complete write) or loads and equals one of the two states exactly; leftover temporary
    files have their own names and never pass for a checkpoint."""
    space = {}
    exec(BUILD, space)
    states = [space["build"](1), space["build"](2)]
    path = tmp_path / "ckpt.safetensors"
    rng = random.Random(1234)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    deadline = time.monotonic() + 15
    kills, loaded, ever = 0, 0, False
    while kills < 30 and time.monotonic() < deadline:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        try:
            for line in proc.stdout:  # (an editable install may print its rebuild first)
                if line.strip() == b"ready":
                    break
            else:
                raise AssertionError("the writer did not start")
            time.sleep(rng.uniform(0, 0.06))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        kills += 1
        if not path.exists():
            assert not ever, "the checkpoint vanished"
            continue
        ever = True
        p, opt = space["build"](0)
        which = fastopt.load(path, opt)["which"]
        ref_p, ref_opt = states[which]
        same(dict(opt.state[p]), dict(ref_opt.state[ref_p]), f"kill {kills}: state")
        loaded += 1
    assert kills >= 5 and loaded >= 1, (kills, loaded)  # 30 kills on an idle machine
    for leftover in os.listdir(tmp_path):
        if leftover == path.name:
            continue
        assert re.fullmatch(r"\.ckpt\.safetensors\..+\.tmp", leftover), leftover
        p, opt = space["build"](0)
        try:
            which = fastopt.load(tmp_path / leftover, opt)["which"]
        except C.CorruptCheckpointError:
            continue  # an incomplete write: refused
        ref_p, ref_opt = states[which]  # complete, killed before the rename
        same(dict(opt.state[p]), dict(ref_opt.state[ref_p]), leftover)
