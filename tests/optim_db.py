"""The optimizer database the tests parametrise over, one :class:`OptimizerInfo` per optimizer.

Shaped like torch's ``optim_db``: each entry holds the optimizer's valid configurations
(:class:`OptimizerInput`), its invalid ones with the error they raise and when
(:class:`ErrorOptimizerInput`), its torch twin, and the per-optimizer facts the tests need
(bitwise equality with torch, tuned settings for the convergence tests, supported flags, ...).

A new optimizer needs a row here: ``test_optim_db.py`` fails for any optimizer of
``fastopt.OPTIMIZERS`` or ``fastopt.OTHER_OPTIMIZERS`` without one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
from hypothesis import strategies as st

import fastopt

CONSTRUCTION = "construction"
STEP = "step"


@dataclass(frozen=True)
class OptimizerInput:
    """A valid configuration: constructor keyword arguments and a short description.

    ``setup`` holds what a test needs beyond the kwargs for this configuration (LBFGS's start
    point, dtype and number of closure steps)."""

    kwargs: dict
    desc: str = ""
    setup: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorOptimizerInput:
    """An invalid configuration and the error it raises.

    ``phase`` is :data:`CONSTRUCTION` (the constructor raises) or :data:`STEP` (construction
    succeeds and the first ``step()`` raises, before the closure is evaluated).
    ``torch_agrees`` is False where torch 2.13 accepts what fastopt refuses."""

    kwargs: dict
    error_type: type
    error_regex: str
    phase: str = CONSTRUCTION
    torch_agrees: bool = True


@dataclass(frozen=True)
class Convergence:
    """Tuned settings that reach ``loss`` within ``steps`` steps."""

    kwargs: dict
    steps: int
    loss: float


@dataclass(frozen=True)
class ScheduledRun:
    """A training run with an lr scheduler: ``scheduler(lr_scheduler_module, optimizer)``."""

    desc: str
    kwargs: dict
    scheduler: Callable[[Any, Any], Any]


@dataclass(frozen=True)
class OptimizerInfo:
    """Everything the tests know about one optimizer.

    Attributes
    ----------
    name : str
        The class name in fastopt.
    inputs : tuple of OptimizerInput
        Valid configurations: a grid over the optimizer's flags.
    error_inputs : tuple of ErrorOptimizerInput
        Invalid configurations.
    per_element : bool
        True for the optimizers of ``fastopt.OPTIMIZERS`` (a C kernel updating each element
        from its gradient: generic loops and the NumPy reference drive them).
    torch_name : str or None
        The torch.optim twin, None where torch has none.
    torch_kwargs : callable
        Turns fastopt kwargs into the twin's (the identity for every optimizer today).
    bitwise_vs_torch : bool
        Equal to torch bit for bit (no square root: torch's CPU sqrt is not correctly
        rounded, so the others agree within torch's float32 tolerance).
    flags : frozenset of str
        The boolean options the update implements (the grid of ``inputs`` covers each).
    param_shape : tuple
        A parameter shape the optimizer accepts.
    lr_scales_update : bool
        lr 0 leaves the parameters unchanged (Rprop's lr only seeds its step sizes).
    scalar_state : tuple of str
        State entries kept as 0-d float32 arrays besides ``step``.
    quadratic, rosenbrock : Convergence or None
        Tuned settings for the convergence tests.
    interop_kwargs : dict
        Settings for moving a training run between fastopt and torch.
    scheduled_runs : tuple of ScheduledRun
        MLP training runs compared with torch step by step.
    hyperparameters : callable or None
        ``hyperparameters(draw)`` draws random valid kwargs for the property tests.
    """

    name: str
    inputs: tuple = ()
    error_inputs: tuple = ()
    per_element: bool = True
    torch_name: Optional[str] = None
    torch_kwargs: Callable[[dict], dict] = dict
    bitwise_vs_torch: bool = False
    flags: frozenset = frozenset({"maximize"})
    param_shape: tuple = (3,)
    lr_scales_update: bool = True
    scalar_state: tuple = ()
    quadratic: Optional[Convergence] = None
    rosenbrock: Optional[Convergence] = None
    interop_kwargs: dict = field(default_factory=dict)
    scheduled_runs: tuple = ()
    hyperparameters: Optional[Callable] = None

    @property
    def cls(self):
        return getattr(fastopt, self.name)

    def torch_cls(self, torch):
        return getattr(torch.optim, self.torch_name)


def _inputs(*kwargs_list):
    return tuple(OptimizerInput(kw) for kw in kwargs_list)


def _errors(*rows):
    return tuple(ErrorOptimizerInput(*row) for row in rows)


# ---- random valid hyperparameters for the property tests ----------------------------------------

_unit = st.floats(0.0, 0.999)
_small = st.floats(0.0, 0.5)


def _sgd_hyper(draw):
    kw = {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans())}
    kw["momentum"] = draw(st.sampled_from([0.0, draw(_unit)]))
    kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
    kw["dampening"] = 0.0 if kw["nesterov"] else draw(_small)
    kw["weight_decay"] = draw(_small)
    return kw


def _adagrad_hyper(draw):
    return {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans()),
            "lr_decay": draw(_small), "weight_decay": draw(_small),
            "eps": draw(st.floats(1e-10, 1e-2))}


def _rmsprop_hyper(draw):
    return {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans()),
            "alpha": draw(_unit), "momentum": draw(st.sampled_from([0.0, 0.9])),
            "centered": draw(st.booleans()), "weight_decay": draw(_small),
            "eps": draw(st.floats(1e-8, 1e-2))}


def _adam_hyper(draw):
    return {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans()),
            "betas": (draw(_unit), draw(_unit)), "weight_decay": draw(_small),
            "amsgrad": draw(st.booleans()), "eps": draw(st.floats(0.0, 1e-2))}


def _adadelta_hyper(draw):
    return {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans()),
            "rho": draw(_unit), "eps": draw(st.floats(1e-10, 1e-2)),
            "weight_decay": draw(_small)}


def _adamax_hyper(draw):
    return {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans()),
            "betas": (draw(_unit), draw(_unit)), "eps": draw(st.floats(0.0, 1e-2)),
            "weight_decay": draw(_small)}


def _nadam_hyper(draw):
    return {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans()),
            "betas": (draw(_unit), draw(_unit)), "eps": draw(st.floats(1e-10, 1e-2)),
            "weight_decay": draw(_small), "momentum_decay": draw(st.floats(0.0, 0.1)),
            "decoupled_weight_decay": draw(st.booleans())}


def _radam_hyper(draw):
    return {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans()),
            "betas": (draw(_unit), draw(_unit)), "eps": draw(st.floats(1e-10, 1e-2)),
            "weight_decay": draw(_small), "decoupled_weight_decay": draw(st.booleans())}


def _asgd_hyper(draw):
    return {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans()),
            "lambd": draw(_small), "alpha": draw(st.floats(0.0, 1.0)),
            "t0": draw(st.sampled_from([0.0, 1.0, 2.0, 1e6])), "weight_decay": draw(_small)}


def _rprop_hyper(draw):
    low = draw(st.floats(0.0, 1e-3))
    return {"lr": draw(st.floats(1e-6, 1.0)), "maximize": draw(st.booleans()),
            "etas": (draw(st.floats(0.01, 0.99)), draw(st.floats(1.01, 3.0))),
            "step_sizes": (low, draw(st.floats(max(low, 1e-6), 50.0)))}


def _lion_hyper(draw):
    return {"lr": draw(st.floats(0.0, 1.0)), "maximize": draw(st.booleans()),
            "betas": (draw(_unit), draw(_unit)), "weight_decay": draw(_small)}


# ---- the database -------------------------------------------------------------------------------

OPTIM_DB = [
    OptimizerInfo(
        "SGD",
        inputs=_inputs(
            dict(lr=0.1),
            dict(lr=0.1, weight_decay=0.05, maximize=True),
            dict(lr=0.05, momentum=0.9),
            dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
            dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02, maximize=True),
        ),
        error_inputs=_errors(
            (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
            (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan", CONSTRUCTION,
             False),
            (dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
            (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
            (dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum"),
            (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
             "Nesterov momentum requires a momentum and zero dampening"),
            (dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
        ),
        torch_name="SGD", bitwise_vs_torch=True, flags=frozenset({"maximize", "nesterov"}),
        quadratic=Convergence(dict(lr=0.5), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=1e-3, momentum=0.9), 8000, 1e-8),
        interop_kwargs={"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3},
        scheduled_runs=(ScheduledRun(
            "momentum", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
            lambda S, o: S.OneCycleLR(o, max_lr=0.2, total_steps=50)),),
        hyperparameters=_sgd_hyper,
    ),
    OptimizerInfo(
        "Adagrad",
        inputs=_inputs(
            dict(lr=0.1),
            dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.5),
            dict(lr=0.05, eps=1e-6, maximize=True),
        ),
        error_inputs=_errors(
            (dict(lr=-1.0), ValueError, "Invalid learning rate"),
            (dict(lr_decay=-1.0), ValueError, "Invalid lr_decay value"),
            (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value"),
            (dict(initial_accumulator_value=-1.0), ValueError,
             "Invalid initial_accumulator_value value"),
            (dict(eps=-1.0), ValueError, "Invalid epsilon value"),
        ),
        torch_name="Adagrad",
        quadratic=Convergence(dict(lr=0.5), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=0.5), 8000, 1e-3),
        interop_kwargs={"lr": 0.05, "lr_decay": 1e-3, "initial_accumulator_value": 0.1},
        hyperparameters=_adagrad_hyper,
    ),
    OptimizerInfo(
        "RMSprop",
        inputs=_inputs(
            dict(lr=0.01),
            dict(lr=0.01, alpha=0.9, weight_decay=0.1, maximize=True),
            dict(lr=0.01, momentum=0.9),
            dict(lr=0.01, centered=True),
            dict(lr=0.005, momentum=0.5, centered=True, weight_decay=0.05, eps=1e-6),
        ),
        error_inputs=_errors(
            (dict(lr=-1.0), ValueError, "Invalid learning rate"),
            (dict(eps=-1.0), ValueError, "Invalid epsilon value"),
            (dict(momentum=-1.0), ValueError, "Invalid momentum value"),
            (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value"),
            (dict(alpha=-1.0), ValueError, "Invalid alpha value"),
        ),
        torch_name="RMSprop", flags=frozenset({"maximize", "centered"}),
        quadratic=Convergence(dict(lr=0.01), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=1e-3), 8000, 1e-3),
        interop_kwargs={"lr": 1e-2, "momentum": 0.9, "centered": True, "weight_decay": 1e-3},
        scheduled_runs=(ScheduledRun(
            "centered", {"lr": 1e-3, "momentum": 0.5, "centered": True},
            lambda S, o: S.StepLR(o, step_size=10, gamma=0.5)),),
        hyperparameters=_rmsprop_hyper,
    ),
    OptimizerInfo(
        "Adam",
        inputs=_inputs(
            dict(lr=0.01),
            dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
            dict(lr=0.01, amsgrad=True, maximize=True),
            dict(lr=0.01, betas=(0.3, 0.9), amsgrad=True, weight_decay=0.05),
            dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        ),
        error_inputs=_errors(
            (dict(lr=-1.0), ValueError, "Invalid learning rate"),
            (dict(eps=-1.0), ValueError, "Invalid epsilon value"),
            (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0"),
            (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1"),
            (dict(betas=(0, 0.99)), ValueError, "betas must be either both floats"),
            (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value"),
            (dict(fused=True, differentiable=True), RuntimeError,
             "`fused` does not support `differentiable`"),
        ),
        torch_name="Adam", flags=frozenset({"maximize", "amsgrad", "decoupled_weight_decay"}),
        quadratic=Convergence(dict(lr=0.05), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=0.01), 8000, 1e-6),
        interop_kwargs={"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-3},
        scheduled_runs=(ScheduledRun(
            "cosine", {"lr": 3e-3, "weight_decay": 1e-4},
            lambda S, o: S.CosineAnnealingLR(o, T_max=50, eta_min=1e-4)),),
        hyperparameters=_adam_hyper,
    ),
    OptimizerInfo(
        "AdamW",
        inputs=_inputs(
            dict(lr=0.01),
            dict(lr=0.01, weight_decay=0.2, amsgrad=True, maximize=True),
            dict(lr=0.01, betas=(0.6, 0.95), eps=1e-6),
        ),
        error_inputs=_errors(
            (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1"),
            (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
        ),
        torch_name="AdamW", flags=frozenset({"maximize", "amsgrad"}),
        quadratic=Convergence(dict(lr=0.05), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=0.01, weight_decay=0.0), 8000, 1e-6),
        interop_kwargs={"lr": 1e-2},
        scheduled_runs=(ScheduledRun(
            "amsgrad", {"lr": 3e-3, "weight_decay": 0.05, "amsgrad": True},
            lambda S, o: S.SequentialLR(o, [S.LinearLR(o, 0.1, total_iters=10),
                                            S.ExponentialLR(o, 0.97)], milestones=[10])),),
        hyperparameters=_adam_hyper,
    ),
    OptimizerInfo(
        "Adadelta",
        inputs=_inputs(
            dict(lr=1.0),
            dict(lr=0.5, rho=0.3, eps=1e-4, weight_decay=0.1, maximize=True),
        ),
        error_inputs=_errors(
            (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
            (dict(rho=1.5), ValueError, "Invalid rho value: 1.5"),
            (dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
            (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
        ),
        torch_name="Adadelta",
        quadratic=Convergence(dict(lr=1.0, rho=0.9, eps=1e-4), 500, 1e-3),
        # Adadelta's unit-free steps crawl along the valley (it oscillates around loss ~1 for
        # any rho/eps/lr tried), so it is only required to make a 10x progress
        rosenbrock=Convergence(dict(lr=1.0, rho=0.95, eps=1e-5), 2000, 1.25),
        interop_kwargs={"lr": 1.0},
        hyperparameters=_adadelta_hyper,
    ),
    OptimizerInfo(
        "Adamax",
        inputs=_inputs(
            dict(lr=2e-2),
            dict(lr=1e-2, betas=(0.3, 0.9), weight_decay=0.1, maximize=True),
            dict(lr=1e-2, betas=(0.8, 0.99), eps=0.0),
        ),
        error_inputs=_errors(
            (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
            (dict(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0: 1.0"),
            (dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
        ),
        torch_name="Adamax", bitwise_vs_torch=True,
        quadratic=Convergence(dict(lr=0.05), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=0.02), 8000, 1e-8),
        interop_kwargs={"lr": 1e-2},
        hyperparameters=_adamax_hyper,
    ),
    OptimizerInfo(
        "NAdam",
        inputs=_inputs(
            dict(lr=1e-2),
            dict(lr=1e-2, betas=(0.4, 0.99), weight_decay=0.1),
            dict(lr=1e-2, weight_decay=0.2, decoupled_weight_decay=True, maximize=True,
                 momentum_decay=1e-2),
        ),
        error_inputs=_errors(
            (dict(momentum_decay=-1.0), ValueError, "Invalid momentum_decay value: -1.0"),
            (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
            (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
        ),
        torch_name="NAdam", flags=frozenset({"maximize", "decoupled_weight_decay"}),
        scalar_state=("mu_product",),
        quadratic=Convergence(dict(lr=0.05), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=0.005), 8000, 1e-5),
        interop_kwargs={"lr": 1e-2},
        hyperparameters=_nadam_hyper,
    ),
    OptimizerInfo(
        "RAdam",
        inputs=_inputs(
            dict(lr=1e-2),
            dict(lr=1e-2, betas=(0.3, 0.9), weight_decay=0.1),
            dict(lr=1e-2, weight_decay=0.2, decoupled_weight_decay=True, maximize=True),
            dict(lr=1e-3),
        ),
        error_inputs=_errors(
            (dict(lr=-1e-3), ValueError, "Invalid learning rate"),
            (dict(betas=(-0.1, 0.9)), ValueError, "Invalid beta parameter at index 0"),
        ),
        torch_name="RAdam", flags=frozenset({"maximize", "decoupled_weight_decay"}),
        quadratic=Convergence(dict(lr=0.05), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=0.01), 8000, 1e-6),
        interop_kwargs={"lr": 1e-2},
        hyperparameters=_radam_hyper,
    ),
    OptimizerInfo(
        "ASGD",
        inputs=_inputs(
            dict(lr=1e-2, t0=3),
            dict(lr=5e-2, lambd=0.1, alpha=0.5, t0=0, weight_decay=0.1, maximize=True),
            dict(lr=1e-2),
            dict(lr=1e-2, t0=50, lambd=1e-3),
        ),
        error_inputs=_errors(
            (dict(lr=-1.0), ValueError, "Invalid learning rate"),
            (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value"),
        ),
        torch_name="ASGD", bitwise_vs_torch=True, scalar_state=("eta", "mu"),
        quadratic=Convergence(dict(lr=0.05, t0=100), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=1e-3, t0=1e9), 8000, 1e-3),
        interop_kwargs={"lr": 1e-2, "t0": 2},
        hyperparameters=_asgd_hyper,
    ),
    OptimizerInfo(
        "Rprop",
        inputs=_inputs(
            dict(lr=1e-2),
            dict(lr=1e-3, etas=(0.3, 1.5), step_sizes=(1e-4, 0.02), maximize=True),
            dict(lr=0.05, step_sizes=(1e-3, 0.1)),
        ),
        error_inputs=_errors(
            (dict(etas=(1.0, 1.2)), ValueError, r"Invalid eta values: 1.0, 1.2"),
            (dict(etas=(0.5, 1.0)), ValueError, r"Invalid eta values: 0.5, 1.0"),
            (dict(lr=-1.0), ValueError, "Invalid learning rate"),
        ),
        torch_name="Rprop", bitwise_vs_torch=True, lr_scales_update=False,
        quadratic=Convergence(dict(lr=0.01), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=1e-3, step_sizes=(1e-9, 0.1)), 8000, 1e-8),
        interop_kwargs={"lr": 1e-2},
        hyperparameters=_rprop_hyper,
    ),
    OptimizerInfo(
        "Lion",
        inputs=_inputs(
            dict(lr=1e-2),
            dict(lr=1e-2, betas=(0.2, 0.4), weight_decay=0.5, maximize=True),
        ),
        error_inputs=_errors(
            (dict(lr=-1.0), ValueError, "Invalid learning rate"),
            (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1"),
            (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value"),
        ),
        quadratic=Convergence(dict(lr=0.01), 500, 1e-3),
        rosenbrock=Convergence(dict(lr=1e-3), 8000, 1e-8),
        hyperparameters=_lion_hyper,
    ),
    # ---- not per-element: each has its own test file -------------------------------------------
    OptimizerInfo(
        "SparseAdam", per_element=False,
        inputs=_inputs(
            dict(),
            dict(lr=0.05, betas=(0.5, 0.9), eps=1e-4, maximize=True),
            dict(lr=0.05),
        ),
        error_inputs=_errors(
            (dict(lr=0.0), ValueError, "Invalid learning rate"),
            (dict(eps=0.0), ValueError, "Invalid epsilon value"),
            (dict(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0"),
        ),
        torch_name="SparseAdam", param_shape=(3, 2),
        interop_kwargs={"lr": 1e-2},
    ),
    OptimizerInfo(
        "LBFGS", per_element=False,
        inputs=(
            OptimizerInput(dict(lr=1, max_iter=10, history_size=5,
                                line_search_fn="strong_wolfe"), "strong Wolfe",
                           dict(dtype="float64", x0=[-1.5, 2.0], calls=12)),
            OptimizerInput(dict(lr=1e-3, max_iter=10, history_size=5), "small lr",
                           dict(dtype="float64", x0=[-1.5, 2.0], calls=12)),
            OptimizerInput(dict(lr=0.05, history_size=7), "5-D",
                           dict(dtype="float64", x0=[-1.5, 2.0, -0.5, 1.2, 0.3], calls=8)),
            OptimizerInput(dict(line_search_fn="strong_wolfe"), "5-D strong Wolfe",
                           dict(dtype="float64", x0=[-1.5, 2.0, -0.5, 1.2, 0.3], calls=6)),
            OptimizerInput(dict(lr=1, max_iter=20, max_eval=15, tolerance_grad=1e-5,
                                tolerance_change=1e-7, history_size=2,
                                line_search_fn="strong_wolfe"), "tolerances",
                           dict(dtype="float64", x0=[0.3, -0.2], calls=6)),
            OptimizerInput(dict(lr=0.05, history_size=7), "5-D float32",
                           dict(dtype="float32", x0=[-1.5, 2.0, -0.5, 1.2, 0.3], calls=4)),
        ),
        error_inputs=_errors(
            (dict(lr=-1), ValueError, "Invalid learning rate"),
            (dict(line_search_fn="armijo"), RuntimeError, "only 'strong_wolfe' is supported",
             STEP),
        ),
        torch_name="LBFGS", flags=frozenset(), param_shape=(2,),
        # not chaotic at these settings: see the moves test in test_torch_interop.py
        interop_kwargs={"lr": 0.2, "max_iter": 3, "history_size": 3},
    ),
    OptimizerInfo(
        "Adafactor", per_element=False,
        inputs=_inputs(
            dict(),
            dict(lr=0.05, weight_decay=0.1),
            dict(lr=0.02, beta2_decay=-0.5, eps=(1e-20, 1e-2), d=2.0, maximize=True),
        ),
        error_inputs=_errors(
            (dict(lr=-1), ValueError, "Learning rate should be >= 0"),
            (dict(beta2_decay=0.5), ValueError, "beta2_decay should be <= 0"),
            (dict(eps=(-1, 1e-3)), ValueError, "epsilon1 should be >= 0"),
            (dict(eps=(None, -1)), ValueError, "epsilon2 should be >= 0"),
            (dict(d=0.5), ValueError, "Clipping threshold d should be >= 1"),
            (dict(weight_decay=-1), ValueError, "weight_decay should be >= 0"),
        ),
        torch_name="Adafactor",
        interop_kwargs={"lr": 1e-2},
    ),
    OptimizerInfo(
        "Muon", per_element=False,
        inputs=_inputs(
            dict(lr=0.02),
            dict(lr=0.02, nesterov=False, weight_decay=0.0, momentum=0.9),
            dict(lr=0.02, adjust_lr_fn="match_rms_adamw"),
            dict(lr=0.02, adjust_lr_fn="original", ns_steps=3),
        ),
        error_inputs=_errors(
            (dict(lr=-1), ValueError, "Learning rate should be >= 0"),
            (dict(momentum=-1), ValueError, "momentum should be >= 0"),
            (dict(weight_decay=-1), ValueError, "weight decay should be >= 0"),
            (dict(adjust_lr_fn="x"), ValueError, "Adjust learning rate function x"),
        ),
        torch_name="Muon", flags=frozenset({"nesterov"}), param_shape=(2, 2),
        interop_kwargs={"lr": 1e-2},
    ),
]

DB = {info.name: info for info in OPTIM_DB}
PER_ELEMENT = [info for info in OPTIM_DB if info.per_element]
WITH_TWIN = [info for info in OPTIM_DB if info.torch_name is not None]


# ---- parametrisation helpers --------------------------------------------------------------------

def configs(infos=None, where=None):
    """pytest params ``(name, kwargs)``, one per valid configuration, with ids ``Name-i``.

    ``infos`` defaults to the per-element optimizers; ``where(info)`` filters them."""
    out = []
    for info in PER_ELEMENT if infos is None else infos:
        if where is None or where(info):
            out += [pytest.param(info.name, inp.kwargs, id=f"{info.name}-{i}")
                    for i, inp in enumerate(info.inputs)]
    return out


def names(infos=None, where=None):
    """Optimizer names (per-element ones by default), filtered by ``where(info)``."""
    return [info.name for info in (PER_ELEMENT if infos is None else infos)
            if where is None or where(info)]


def inputs_of(name):
    """pytest params, one per valid configuration of optimizer ``name``."""
    return [pytest.param(inp, id=inp.desc or f"{name}-{i}")
            for i, inp in enumerate(DB[name].inputs)]


def error_configs(where=None):
    """pytest params ``(info, error input)`` over every invalid configuration."""
    return [pytest.param(info, err, id=f"{info.name}-{i}")
            for info in OPTIM_DB if where is None or where(info)
            for i, err in enumerate(info.error_inputs)]
