"""fastopt: torch.optim for NumPy arrays, with hand-tuned C kernels.

>>> import numpy as np, fastopt
>>> w = fastopt.Parameter(np.zeros(3, dtype=np.float32))
>>> opt = fastopt.Adam([w], lr=1e-3)
>>> w.grad = np.ones(3, dtype=np.float32)
>>> opt.step()
"""
from importlib.metadata import version as _version

from fastopt._parameter import Parameter
from fastopt._config import get_num_threads, set_num_threads, show_config
from fastopt.optimizer import Optimizer
from fastopt.sgd import SGD
from fastopt.adagrad import Adagrad
from fastopt.rmsprop import RMSprop
from fastopt.adam import Adam, AdamW
from fastopt.adadelta import Adadelta
from fastopt.adamax import Adamax
from fastopt.nadam import NAdam
from fastopt.radam import RAdam
from fastopt.asgd import ASGD
from fastopt.rprop import Rprop
from fastopt.lion import Lion
from fastopt.sparse_adam import SparseAdam, SparseGrad
from fastopt.lbfgs import LBFGS
from fastopt.adafactor import Adafactor
from fastopt.muon import Muon
from fastopt import lr_scheduler, schedules, swa_utils
from fastopt import _torch
from fastopt import interop

_torch.register()  # tensors as parameters; imports torch only when given one

__version__ = _version("fastopt")  # pyproject.toml's version

#: Every optimizer by name, so tests and benchmarks cover a new one automatically.
OPTIMIZERS = {
    "SGD": SGD,
    "Adagrad": Adagrad,
    "RMSprop": RMSprop,
    "Adam": Adam,
    "AdamW": AdamW,
    "Adadelta": Adadelta,
    "Adamax": Adamax,
    "NAdam": NAdam,
    "RAdam": RAdam,
    "ASGD": ASGD,
    "Rprop": Rprop,
    "Lion": Lion,
}

#: The optimizers that are not per-element updates of dense gradients, so generic loops over
#: ``OPTIMIZERS`` cannot drive them: LBFGS needs a closure, SparseAdam a ``SparseGrad``,
#: Muon 2-D parameters; Adafactor keeps factored (differently shaped) state.
OTHER_OPTIMIZERS = {
    "SparseAdam": SparseAdam,
    "LBFGS": LBFGS,
    "Adafactor": Adafactor,
    "Muon": Muon,
}

__all__ = ["Parameter", "Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW",
           "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop", "Lion",
           "SparseAdam", "SparseGrad", "LBFGS", "Adafactor", "Muon", "OTHER_OPTIMIZERS",
           "OPTIMIZERS", "show_config", "set_num_threads", "get_num_threads", "interop",
           "lr_scheduler", "schedules", "swa_utils"]
