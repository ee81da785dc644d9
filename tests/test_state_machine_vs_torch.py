"""Random interleavings of what a training loop does to the optimizers that write their own
step (SparseAdam, LBFGS, Adafactor, Muon), against torch 2.13.

A Hypothesis state machine per optimizer runs the same operations on a fastopt optimizer and on
torch's, in any order: steps (Adafactor, Muon: dense gradients, Muon on matrices; SparseAdam:
row-sparse gradients with repeated rows, a :class:`fastopt.SparseGrad` and a torch sparse COO
tensor; LBFGS: a closure of a float64 quadratic), ``add_param_group`` with a valid
configuration of the database (tests/optim_db.py) as the group's overrides (not LBFGS, which
has one group), ``state_dict`` / ``load_state_dict`` into the same optimizer and into a fresh
one (torch with its own state_dict), a ``fastopt.save`` / ``fastopt.load`` round trip (fastopt
only: torch's side is left as it is and must still agree), and StepLR steps on both sides.
After every rule the parameters equal torch's within the tolerance of the optimizer's lockstep
test, and so do the state keys, the step counters and every group's lr.
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
from helpers import import_torch
from optim_db import DB

MAX_PARAMS = 6
MAX_GROUPS = 3
STEP_SIZE, GAMMA = 2, 0.5

pytestmark = pytest.mark.filterwarnings("ignore:.*lr_scheduler.step\\(\\).*:UserWarning")

#: per optimizer: (rtol, atol) of the parameters, as in its lockstep test (Muon: its
#: bfloat16 iteration is torch's up to float32 summation order, whose rare differences the
#: iteration amplifies; measured at most 1.5e-4 after 20 steps, see tests/test_muon.py)
TOL = {"SparseAdam": (1.3e-6, 1e-5), "Adafactor": (1.3e-6, 1e-5), "LBFGS": (1e-9, 1e-9),
       "Muon": (0.0, 2e-3)}
#: per optimizer: (rtol, atol) of the state arrays (None: not compared; Muon's momentum
#: buffers, lerps of gradients that do not depend on the parameters here: torch's bits)
STATE_TOL = {"SparseAdam": (1.3e-6, 1e-5), "Adafactor": (1e-4, 1e-7), "LBFGS": None,
             "Muon": (0.0, 0.0)}
DTYPE = {"SparseAdam": np.float32, "Adafactor": np.float32, "LBFGS": np.float64,
         "Muon": np.float32}

VECTOR_OR_MATRIX = st.one_of(st.tuples(st.integers(1, 12)),
                             st.tuples(st.integers(1, 5), st.integers(1, 5)))
#: Muon's matrices: wide ones (a square one has tiny singular values, which the bfloat16
#: Newton-Schulz iteration amplifies any rounding difference of)
MATRIX = st.integers(2, 4).flatmap(lambda r: st.tuples(st.just(r), st.integers(3 * r, 4 * r)))
SHAPES = {"SparseAdam": st.tuples(st.integers(2, 8), st.integers(1, 4)),
          "Adafactor": VECTOR_OR_MATRIX, "Muon": MATRIX,
          "LBFGS": st.tuples(st.integers(1, 5))}


class TorchMachine(RuleBasedStateMachine):
    """One fastopt optimizer and its scheduler beside torch's."""

    NAME = None

    def __init__(self):
        super().__init__()
        self.torch = import_torch(vector_kernels=False)
        self.info = DB[self.NAME]
        self.cls = getattr(fastopt, self.NAME)
        self.tcls = getattr(self.torch.optim, self.NAME)
        self.dtype = DTYPE[self.NAME]
        self.tmp = tempfile.mkdtemp(prefix="fastopt-smt-")
        self.path = os.path.join(self.tmp, "run.safetensors")
        self.params, self.tparams = [], []
        self.groups = []  # per group: (parameter indices, its overrides)

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _config(self, i):
        return dict(self.info.inputs[i % len(self.info.inputs)].kwargs)

    def _new_params(self, shapes, seed):
        rng = np.random.default_rng(seed)
        out = []
        for shape in shapes:
            x = rng.standard_normal(shape).astype(self.dtype)
            self.params.append(fastopt.Parameter(x.copy()))
            self.tparams.append(self.torch.tensor(x.copy(), requires_grad=True))
            out.append(len(self.params) - 1)
        return out

    def _schedulers(self, opt, topt):
        return (fastopt.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA),
                self.torch.optim.lr_scheduler.StepLR(topt, step_size=STEP_SIZE, gamma=GAMMA))

    @initialize(config=st.integers(0, 9), shapes=st.data(), seed=st.integers(0, 2 ** 32 - 1))
    def build(self, config, shapes, seed):
        self.defaults = self._config(config)
        if self.NAME == "LBFGS":
            self.defaults.setdefault("max_iter", 5)
        n = shapes.draw(st.integers(1, 2))
        idx = self._new_params([shapes.draw(SHAPES[self.NAME]) for _ in range(n)], seed)
        self.opt = self.cls([self.params[i] for i in idx], **self.defaults)
        self.topt = self.tcls([self.tparams[i] for i in idx], **self.defaults)
        self.sched, self.tsched = self._schedulers(self.opt, self.topt)
        self.groups = [(idx, {})]
        # LBFGS's quadratic: 0.5 * sum(a * x**2) + b . x per parameter
        rng = np.random.default_rng(seed ^ 0x5EED)
        self.quad = [(rng.uniform(1, 5, p.shape), rng.standard_normal(p.shape))
                     for p in self.params]

    # ---- the rules --------------------------------------------------------------------------

    @precondition(lambda self: self.NAME != "LBFGS")
    @rule(seed=st.integers(0, 2 ** 32 - 1))
    def step(self, seed):
        torch = self.torch
        rng = np.random.default_rng(seed)
        for p, t in zip(self.params, self.tparams):
            if self.NAME == "SparseAdam":
                rows = rng.integers(0, p.shape[0], rng.integers(1, 2 * p.shape[0] + 1))
                vals = rng.standard_normal((rows.size,) + p.shape[1:]).astype(self.dtype)
                p.grad = fastopt.SparseGrad(rows, vals)
                t.grad = torch.sparse_coo_tensor(torch.from_numpy(rows[None].copy()),
                                                 torch.from_numpy(vals.copy()), p.shape,
                                                 check_invariants=True)
            else:
                g = (rng.standard_normal(p.shape) + 0.5 * np.asarray(p)).astype(self.dtype)
                p.grad = g
                t.grad = torch.from_numpy(g.copy())
        self.opt.step()
        self.topt.step()

    @precondition(lambda self: self.NAME == "LBFGS")
    @rule()
    def closure_step(self):
        torch = self.torch

        def ours():
            f = 0.0
            for p, (a, b) in zip(self.params, self.quad):
                x = np.asarray(p)
                p.grad = a * x + b
                f += float(np.sum(0.5 * a * x * x + b * x))
            return f

        def theirs():
            f = 0.0
            for t, (a, b) in zip(self.tparams, self.quad):
                x = t.detach().numpy()
                t.grad = torch.from_numpy(a * x + b)
                f += float(np.sum(0.5 * a * x * x + b * x))
            return torch.tensor(f, dtype=torch.float64)

        l1, l2 = self.opt.step(ours), self.topt.step(theirs)
        assert float(l1) == pytest.approx(float(l2), rel=1e-9, abs=1e-9)

    @precondition(lambda self: self.NAME != "LBFGS" and len(self.params) < MAX_PARAMS
                  and len(self.groups) < MAX_GROUPS)
    @rule(config=st.integers(0, 9), shapes=st.data(), seed=st.integers(0, 2 ** 32 - 1))
    def add_param_group(self, config, shapes, seed):
        overrides = self._config(config)
        idx = self._new_params([shapes.draw(SHAPES[self.NAME])], seed)
        self.opt.add_param_group({"params": [self.params[i] for i in idx], **overrides})
        self.topt.add_param_group({"params": [self.tparams[i] for i in idx], **overrides})
        self.groups.append((idx, overrides))

    @rule()
    def scheduler_step(self):
        self.sched.step()
        self.tsched.step()

    @rule()
    def reload_state_dict(self):
        self.opt.load_state_dict(self.opt.state_dict())
        self.sched.load_state_dict(self.sched.state_dict())
        self.topt.load_state_dict(self.topt.state_dict())
        self.tsched.load_state_dict(self.tsched.state_dict())

    @rule()
    def load_into_fresh_optimizer(self):
        """Fresh optimizers and schedulers over the same parameters and groups, built as a
        user resuming a run builds them, then loaded from the old ones; they replace them.
        After ``add_param_group`` the old schedulers hold fewer ``base_lrs`` than the fresh
        ones: torch's takes them, and so must fastopt's."""
        def groups(params):
            return [{"params": [params[i] for i in idx], **overrides}
                    for idx, overrides in self.groups]
        opt = self.cls(groups(self.params), **self.defaults)
        topt = self.tcls(groups(self.tparams), **self.defaults)
        sched, tsched = self._schedulers(opt, topt)
        opt.load_state_dict(self.opt.state_dict())
        sched.load_state_dict(self.sched.state_dict())
        topt.load_state_dict(self.topt.state_dict())
        tsched.load_state_dict(self.tsched.state_dict())
        self.opt, self.sched, self.topt, self.tsched = opt, sched, topt, tsched

    @rule()
    def save_and_load(self):
        """A checkpoint round trip on fastopt's side only: torch's must still agree."""
        fastopt.save(self.path, self.opt, self.sched)
        assert fastopt.load(self.path, self.opt, self.sched) is None

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def parameters_match_torch(self):
        rtol, atol = TOL[self.NAME]
        for i, (p, t) in enumerate(zip(self.params, self.tparams)):
            np.testing.assert_allclose(p, t.detach().numpy(), rtol=rtol, atol=atol,
                                       err_msg=f"param {i}")

    @invariant()
    def state_matches_torch(self):
        torch = self.torch
        assert len(self.opt.state) == len(self.topt.state)
        for i, (p, t) in enumerate(zip(self.params, self.tparams)):
            ours, theirs = self.opt.state.get(p, {}), self.topt.state.get(t, {})
            assert sorted(ours) == sorted(theirs), (i, sorted(ours), sorted(theirs))
            for key, tv in theirs.items():
                v = ours[key]
                if key in ("step", "func_evals", "n_iter"):
                    tv = float(tv) if isinstance(tv, torch.Tensor) else tv
                    assert float(np.asarray(v)) == tv, (i, key, v, tv)
                elif key in ("old_dirs", "old_stps", "ro"):
                    assert len(v) == len(tv), (i, key, len(v), len(tv))
                elif STATE_TOL[self.NAME] and isinstance(tv, torch.Tensor):
                    rtol, atol = STATE_TOL[self.NAME]
                    tv = tv.numpy()
                    assert np.shape(v) == tv.shape and np.asarray(v).dtype == tv.dtype, (i, key)
                    np.testing.assert_allclose(v, tv, rtol=rtol, atol=atol,
                                               err_msg=f"state[{i}][{key!r}]")

    @invariant()
    def lrs_match_torch(self):
        assert len(self.opt.param_groups) == len(self.topt.param_groups) == len(self.groups)
        for g, (group, tgroup) in enumerate(zip(self.opt.param_groups, self.topt.param_groups)):
            assert group["lr"] == pytest.approx(tgroup["lr"], rel=1e-15), g
        assert self.sched.last_epoch == self.tsched.last_epoch


#: per optimizer: (max_examples, stateful_step_count)
BUDGET = {"SparseAdam": (20, 15), "LBFGS": (15, 15), "Adafactor": (20, 15), "Muon": (15, 15)}


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_interleaved_operations_match_torch(name):
    import_torch(vector_kernels=False)
    examples, steps = BUDGET[name]
    run_state_machine_as_test(
        type(f"{name}TorchMachine", (TorchMachine,), {"NAME": name}),
        settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]))


@pytest.mark.parametrize("groups_first", [True, False],
                         ids=["scheduler-after-all-groups", "scheduler-before-the-added-group"])
def test_scheduler_of_a_resumed_run_loads_the_state_of_one_that_added_a_group(groups_first):
    torch = import_torch(vector_kernels=False)

    def run(mod, new):
        a, b = new(), new()
        opt = mod.SGD([a], lr=0.5)
        sched = mod.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        opt.add_param_group({"params": [b], "lr": 0.25})
        opt.step()
        sched.step()
        if groups_first:
            opt2 = mod.SGD([{"params": [a]}, {"params": [b], "lr": 0.25}], lr=0.5)
            sched2 = mod.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
        else:
            opt2 = mod.SGD([a], lr=0.5)
            sched2 = mod.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
            opt2.add_param_group({"params": [b], "lr": 0.25})
        opt2.load_state_dict(opt.state_dict())
        sched2.load_state_dict(sched.state_dict())
        opt2.step()
        sched2.step()
        return [group["lr"] for group in opt2.param_groups]

    theirs = run(torch.optim, lambda: torch.zeros(2, requires_grad=True))
    assert theirs == [0.125, 0.0625]
    assert run(fastopt, lambda: fastopt.Parameter(np.zeros(2, np.float32))) == theirs
