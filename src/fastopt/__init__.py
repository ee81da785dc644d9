"""fastopt: torch.optim for NumPy arrays, with hand-tuned C kernels.

>>> import numpy as np, fastopt
>>> w = fastopt.Parameter(np.zeros(3, dtype=np.float32))
>>> opt = fastopt.Adam([w], lr=1e-3)
>>> w.grad = np.ones(3, dtype=np.float32)
>>> opt.step()
"""
from importlib.metadata import version as _version

from fastopt.parameter import Parameter, SparseGrad
from fastopt._config import get_num_threads, set_num_threads, show_config
from fastopt.optimizer import Optimizer, kernel_optimizers, other_optimizers
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
from fastopt.sparse_adam import SparseAdam
from fastopt.lbfgs import LBFGS
from fastopt.adafactor import Adafactor
from fastopt.muon import Muon
from fastopt import lr_scheduler, schedules, swa_utils
from fastopt import interop
from fastopt.checkpoint import save, load
from fastopt._minimize import minimize
from fastopt import functional
from fastopt._compressed import dequantize_blockwise, quantize_blockwise

__version__ = _version("fastopt")  # pyproject.toml's version

#: Every per-element optimizer by name, in the order of their C kernels (csrc/kernels.def), so
#: tests and benchmarks cover a new one automatically.
OPTIMIZERS = kernel_optimizers()

#: The optimizers that are not per-element updates of dense gradients, so generic loops over
#: ``OPTIMIZERS`` cannot drive them: LBFGS needs a closure, SparseAdam a ``SparseGrad``,
#: Muon 2-D parameters; Adafactor keeps factored (differently shaped) state.
OTHER_OPTIMIZERS = other_optimizers()

__all__ = ["Parameter", "Optimizer", *OPTIMIZERS, "SparseAdam", "SparseGrad", "LBFGS",
           "Adafactor", "Muon", "OTHER_OPTIMIZERS", "OPTIMIZERS", "show_config",
           "set_num_threads", "get_num_threads", "interop", "lr_scheduler", "schedules",
           "swa_utils", "save", "load", "minimize", "functional", "quantize_blockwise",
           "dequantize_blockwise"]


def __getattr__(name: str) -> object:
    # fastopt.torch imports torch, so it is loaded on first use (``import fastopt`` alone
    # never imports torch)
    if name == "torch":
        import importlib
        return importlib.import_module("fastopt.torch")
    raise AttributeError(f"module 'fastopt' has no attribute {name!r}")
