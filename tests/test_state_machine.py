"""Random interleavings of everything a training loop does to a per-element optimizer, against
the NumPy reference (tests/reference.py), bit for bit.

A Hypothesis state machine per optimizer of ``fastopt.OPTIMIZERS`` runs, in any order: steps
with fresh float32 gradients (some parameters without one, which skip the step as in torch),
``add_param_group`` with a valid configuration of the database (tests/optim_db.py) as the
group's overrides, ``state_dict`` / ``load_state_dict`` into the same optimizer and into a fresh
one that replaces it, ``fastopt.save`` and a later ``fastopt.load`` that rolls the run back to
the checkpoint, and lr scheduler steps. The reference keeps its own parameters, its own state
and its own model of the schedule: it reads nothing from the optimizer under test, and every
group's lr is checked against the schedule's closed form before the reference uses it. After
every rule every parameter and every state entry equal the reference's to the last bit, and
every group's hyperparameters equal the expected ones.
"""
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

import fastopt
import reference as R
from fastopt.checkpoint import CheckpointMismatchError
from helpers import _freeze, assert_bits
from optim_db import DB, names

MAX_PARAMS = 10
MAX_GROUPS = 4
#: StepLR's settings: gamma a power of two, so the chained products equal the closed form
STEP_SIZE, GAMMA = 2, 0.5

#: optimizers whose constructor creates the state of its parameters (torch's Adagrad); the state
#: of any parameter, also of one added later, starts from the constructor's value of these
EAGER_STATE = {"Adagrad": {"initial_accumulator_value": 0.0}}

#: the optimizer's default schedule warnings (a scheduler stepped before the optimizer)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")

SHAPES = st.one_of(st.tuples(st.integers(1, 40)),
                   st.tuples(st.integers(1, 6), st.integers(1, 6)))


def lr_lambda(epoch):
    """LambdaLR's factor (a plain function: ``state_dict`` stores it as None)."""
    return 1.0 / (1.0 + epoch)


def expected_lr(model, g):
    """Group ``g``'s lr by the closed form of the schedule, from the test's own model
    ``{"kind": scheduler class, "epoch": its last_epoch, "base": [lr at epoch 0, per group]}``
    (StepLR: ``base * gamma ** (epoch // step_size)``, LambdaLR: ``base * lr_lambda(epoch)``;
    both exact here, so they equal the chained products bit for bit)."""
    base, e = model["base"][g], model["epoch"]
    if model["kind"] == "StepLR":
        return base * GAMMA ** (e // STEP_SIZE)
    return base * lr_lambda(e)


def make_scheduler(kind, opt):
    if kind == "StepLR":
        return fastopt.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)
    return fastopt.lr_scheduler.LambdaLR(opt, lr_lambda)


def check_state(ours, state, where):
    """fastopt's state of one parameter equals the reference's: the same keys, ``step`` equal
    (a 0-d float32 array), every other entry bit for bit."""
    assert set(ours) == {k for k, v in state.items() if v is not None}, (where, set(ours))
    for key, value in state.items():
        if key == "step":
            step = np.asarray(ours["step"])
            assert step.shape == () and step.dtype == np.float32, (where, step)
            assert float(step) == value, (where, float(step), value)
        elif value is not None:
            assert_bits(ours[key], np.asarray(value), f"{where}[{key!r}]")


class OptimizerMachine(RuleBasedStateMachine):
    """One optimizer (``NAME``), its scheduler and the reference side by side."""

    NAME = None

    def __init__(self):
        super().__init__()
        self.info = DB[self.NAME]
        self.cls = fastopt.OPTIMIZERS[self.NAME]
        self.tmp = tempfile.mkdtemp(prefix="fastopt-sm-")
        self.path = os.path.join(self.tmp, "run.safetensors")
        self.params = []      # the parameters under test
        self.ref_p = []       # the reference's parameters
        self.ref_state = {}   # parameter index -> the reference's state (after its 1st step)
        self.groups = []      # per group: (parameter indices, its full kwargs)
        self.checkpoint = None

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- building ---------------------------------------------------------------------------

    def _new_params(self, shapes, seed):
        rng = np.random.default_rng(seed)
        out = []
        for shape in shapes:
            x = rng.standard_normal(shape).astype(np.float32)
            self.params.append(fastopt.Parameter(x.copy()))
            self.ref_p.append(x)
            out.append(len(self.params) - 1)
        return out

    def _config(self, i):
        return dict(self.info.inputs[i % len(self.info.inputs)].kwargs)

    @initialize(config=st.integers(0, 9), shapes=st.lists(SHAPES, min_size=1, max_size=3),
                kind=st.sampled_from(["StepLR", "LambdaLR"]), seed=st.integers(0, 2 ** 32 - 1))
    def build(self, config, shapes, kind, seed):
        self.defaults = self._config(config)
        idx = self._new_params(shapes, seed)
        self.opt = self.cls([self.params[i] for i in idx], **self.defaults)
        self.sched = make_scheduler(kind, self.opt)
        self.groups = [(idx, dict(self.defaults))]
        if self.NAME in EAGER_STATE:
            for i in idx:
                self.ref_state[i] = R.new_state(self.NAME, self.ref_p[i], self.defaults)
        lr = self.defaults.get("lr", self.opt.defaults["lr"])
        self.model = {"kind": kind, "epoch": 0, "base": [lr]}

    # ---- the rules --------------------------------------------------------------------------

    def _kwargs(self, g):
        """The reference's kwargs for group ``g``: its configuration at the scheduled lr."""
        kwargs = dict(self.groups[g][1])
        kwargs["lr"] = expected_lr(self.model, g)
        return kwargs

    def _state_kwargs(self, kwargs):
        """The kwargs a new state starts from: the group's, except for what only the
        constructor's value sets (``EAGER_STATE``)."""
        fixed = {k: self.defaults.get(k, default)
                 for k, default in EAGER_STATE.get(self.NAME, {}).items()}
        return {**kwargs, **fixed}

    @rule(seed=st.integers(0, 2 ** 32 - 1),
          skip=st.sets(st.integers(0, MAX_PARAMS - 1), max_size=3))
    def step(self, seed, skip):
        rng = np.random.default_rng(seed)
        grads = []
        for i, p in enumerate(self.params):
            if i in skip:
                g = None
            else:
                g = rng.standard_normal(p.shape).astype(np.float32)
                g.flat[rng.integers(0, g.size)] = 0  # an exact zero (Rprop's third case)
            p.grad = g
            grads.append(g)
        self.opt.step()
        for g, (idx, _) in enumerate(self.groups):
            kwargs = self._kwargs(g)
            for i in idx:
                if grads[i] is None:
                    continue
                if i not in self.ref_state:
                    self.ref_state[i] = R.new_state(self.NAME, self.ref_p[i],
                                                    self._state_kwargs(kwargs))
                with np.errstate(all="ignore"):
                    self.ref_p[i] = R.step(self.NAME, self.ref_p[i], grads[i],
                                           self.ref_state[i], kwargs)

    @precondition(lambda self: len(self.params) < MAX_PARAMS and len(self.groups) < MAX_GROUPS)
    @rule(config=st.integers(0, 9), shapes=st.lists(SHAPES, min_size=1, max_size=2),
          seed=st.integers(0, 2 ** 32 - 1))
    def add_param_group(self, config, shapes, seed):
        """A group with a configuration of the database as its overrides; what it leaves out
        comes from the optimizer's defaults (its constructor's), so the merged configuration
        can be invalid (SGD: nesterov=True from the defaults with an override's dampening):
        then ``add_param_group`` raises and changes nothing. StepLR, chainable, goes on and
        steps the added group too (as torch's), so it is kept, as a torch user keeps it; its
        ``base_lrs`` stay one per group it was built for, which a fresh scheduler over all the
        groups still loads (``load_into_fresh_optimizer``). LambdaLR refuses to step a group
        added after it (as torch's), so a new one is built, from each group's
        ``initial_lr``."""
        overrides = self._config(config)
        merged = {**self.defaults, **overrides}
        try:
            self.cls([fastopt.Parameter(np.zeros(1, np.float32))], **merged)
        except ValueError:
            extra = fastopt.Parameter(np.zeros(3, np.float32))
            with pytest.raises(ValueError, match=r"param_groups\[\d+\]"):
                self.opt.add_param_group({"params": [extra], **overrides})
            assert extra not in self.opt.state
            return
        idx = self._new_params(shapes, seed)
        self.opt.add_param_group({"params": [self.params[i] for i in idx], **overrides})
        self.groups.append((idx, merged))
        lr = merged.get("lr", self.opt.defaults["lr"])
        if self.model["kind"] == "StepLR":
            # the model: the added group decays from its lr at the current epoch on, as if
            # it had started at epoch 0 from lr / GAMMA ** (epoch // STEP_SIZE) (exact: GAMMA
            # is a power of two)
            self.model["base"].append(lr / GAMMA ** (self.model["epoch"] // STEP_SIZE))
        else:
            # LambdaLR restarts from each group's initial_lr (which the first scheduler wrote
            # and the new one keeps)
            self.sched = make_scheduler(self.model["kind"], self.opt)
            self.model = {**self.model, "epoch": 0, "base": [*self.model["base"], lr]}

    @rule()
    def scheduler_step(self):
        self.sched.step()
        self.model["epoch"] += 1

    @rule()
    def reload_state_dict(self):
        self.opt.load_state_dict(self.opt.state_dict())
        self.sched.load_state_dict(self.sched.state_dict())

    @rule()
    def load_into_fresh_optimizer(self):
        """A fresh optimizer (and scheduler) over the same parameters and groups, built as a
        user resuming a run builds them, then loaded; it replaces the one under test. (The two
        share their state arrays afterwards, as in torch, whose ``load_state_dict`` keeps
        tensors that already have the parameter's dtype.)"""
        old, old_sched = self.opt, self.sched
        groups = [{"params": [self.params[i] for i in idx], **kwargs}
                  for idx, kwargs in self.groups]
        opt = self.cls(groups, **self.defaults)
        sched = make_scheduler(self.model["kind"], opt)
        opt.load_state_dict(old.state_dict())
        sched.load_state_dict(old_sched.state_dict())
        self.opt, self.sched = opt, sched

    @rule()
    def save(self):
        fastopt.save(self.path, self.opt, self.sched)
        self.checkpoint = {
            "params": [np.asarray(p).copy() for p in self.params],
            "ref_p": [p.copy() for p in self.ref_p],
            "ref_state": {i: {k: (v.copy() if isinstance(v, np.ndarray) else v)
                              for k, v in s.items()} for i, s in self.ref_state.items()},
            "model": {**self.model, "base": list(self.model["base"])},
            "groups": len(self.groups),
        }

    @precondition(lambda self: self.checkpoint is not None
                  and self.checkpoint["groups"] == len(self.groups))
    @rule()
    def load(self):
        """Roll back to the checkpoint: the file restores the optimizer's state, its groups'
        hyperparameters and the scheduler; the parameters (not in the file) are restored
        here."""
        ck = self.checkpoint
        for p, x in zip(self.params, ck["params"]):
            p[...] = x
        assert fastopt.load(self.path, self.opt, self.sched) is None
        self.ref_p = [p.copy() for p in ck["ref_p"]]
        self.ref_state = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v)
                              for k, v in s.items()} for i, s in ck["ref_state"].items()}
        self.model = {**ck["model"], "base": list(ck["model"]["base"])}

    @precondition(lambda self: self.checkpoint is not None
                  and self.checkpoint["groups"] != len(self.groups))
    @rule()
    def load_mismatched(self):
        """A checkpoint saved before a group was added does not fit: refused, nothing
        changed (the invariants check the optimizer; the scheduler is compared here)."""
        before = self.sched.state_dict()
        with pytest.raises(CheckpointMismatchError):
            fastopt.load(self.path, self.opt, self.sched)
        assert _freeze(list(self.sched.state_dict().items())) == \
            _freeze(list(before.items()))

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def parameters_match_reference(self):
        for i, p in enumerate(self.params):
            assert_bits(p, self.ref_p[i], f"param {i}")

    @invariant()
    def state_matches_reference(self):
        assert len(self.opt.param_groups) == len(self.groups)
        for g, (idx, _) in enumerate(self.groups):
            assert [id(p) for p in self.opt.param_groups[g]["params"]] == \
                [id(self.params[i]) for i in idx], g
            for i in idx:
                ours = self.opt.state.get(self.params[i], {})
                if i in self.ref_state:
                    check_state(ours, self.ref_state[i], f"group {g} param {i} state")
                else:
                    assert not ours, (f"param {i} never stepped but has state", ours)

    @invariant()
    def hyperparameters_follow_the_schedule(self):
        for g in range(len(self.groups)):
            group = self.opt.param_groups[g]
            lr = expected_lr(self.model, g)
            assert group["lr"] == lr, (f"param_groups[{g}]['lr']", group["lr"], lr)
            for key, value in self._kwargs(g).items():
                assert group[key] == value, (f"param_groups[{g}][{key!r}]", group[key], value)
        # the lrs of the last scheduler step (groups added since are not in it)
        last = self.sched.get_last_lr()
        assert last == [group["lr"] for group in self.opt.param_groups[:len(last)]]



#: per optimizer: (max_examples, stateful_step_count), about 2 s each on a CI machine
BUDGET = {}
DEFAULT_BUDGET = (50, 40)


def machine_for(name):
    return type(f"{name}Machine", (OptimizerMachine,), {"NAME": name})


@pytest.mark.parametrize("name", names())
def test_interleaved_operations_match_reference(name):
    examples, steps = BUDGET.get(name, DEFAULT_BUDGET)
    run_state_machine_as_test(
        machine_for(name),
        settings=settings(max_examples=examples, stateful_step_count=steps,
                          suppress_health_check=[HealthCheck.too_slow]))


# ---- a scheduler that outlives add_param_group ---------------------------------------------------
# A chainable scheduler such as StepLR follows a param group added after it (as torch's does),
# while its base_lrs, as torch's, only cover the groups it was built with: its state_dict must
# still load, alone and through a checkpoint, as torch 2.13's does.

def _steplr_with_added_group():
    opt = fastopt.SGD([fastopt.Parameter(np.zeros(2, np.float32))], lr=0.5)
    sched = fastopt.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.add_param_group({"params": [fastopt.Parameter(np.zeros(1, np.float32))], "lr": 0.25})
    opt.step()
    sched.step()
    assert [group["lr"] for group in opt.param_groups] == [0.25, 0.125]  # as torch
    return opt, sched


def test_steplr_reloads_its_state_after_add_param_group():
    opt, sched = _steplr_with_added_group()
    sched.load_state_dict(sched.state_dict())
    sched.step()
    assert [group["lr"] for group in opt.param_groups] == [0.125, 0.0625]


def test_checkpoint_of_steplr_after_add_param_group_loads_back(tmp_path):
    opt, sched = _steplr_with_added_group()
    path = tmp_path / "run.safetensors"
    fastopt.save(path, opt, sched)
    fastopt.load(path, opt, sched)
    assert sched.last_epoch == 1
