"""``fastopt.minimize``: autograd-style optimization loops over pytrees, stepping with
fastopt's optimizers."""
import numbers
import sys

import numpy as np

from fastopt import _autograd, _pytree
from fastopt.optimizer import Optimizer, _FASTOPT_OPTIMIZERS
from fastopt.parameter import Parameter

__all__ = ["minimize"]


def _optimizer_class(optimizer):
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        cls = optimizer
    elif isinstance(optimizer, str):
        by_name = {c.__name__.lower(): c for c in _FASTOPT_OPTIMIZERS}
        cls = by_name.get(optimizer.lower())
        if cls is None:
            raise ValueError(f"minimize: unknown optimizer {optimizer!r}; one of "
                             f"{sorted(c.__name__ for c in _FASTOPT_OPTIMIZERS)}")
    else:
        raise TypeError(f"minimize: optimizer must be a name or an Optimizer subclass, got "
                        f"{type(optimizer).__name__}")
    if cls.__name__ in ("LBFGS", "SparseAdam"):
        raise ValueError(f"minimize: {cls.__name__} cannot run a gradient-only loop (LBFGS "
                         f"needs a closure, SparseAdam sparse gradients)")
    return cls


def _start(leaf, where):
    """A fresh Parameter holding a copy of ``leaf`` (x0 is never modified)."""
    arr = np.asarray(leaf)
    if arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    elif arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"minimize: {where} must be a float32 or float64 array or a real "
                        f"number, got {type(leaf).__name__} of dtype {arr.dtype}")
    return Parameter(np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True))


def minimize(grad, x0, optimizer="adam", num_iters=100, callback=None, **hyperparameters):
    """Run ``num_iters`` steps of a fastopt optimizer from ``x0``, autograd-style.

    The loop of ``autograd.misc.optimizers`` (``adam``, ``sgd``, ``rmsprop``) with any
    per-element fastopt optimizer: for ``i`` in ``range(num_iters)``: ``g = grad(x, i)``,
    ``callback(x, i, g)`` when given, then one step of the optimizer. ``x`` and ``g`` are
    pytrees with the structure of ``x0``: nested dicts, lists and tuples of arrays (order
    of ``fastopt._pytree``; dicts by sorted keys, as autograd's ``flatten``).

    Parameters
    ----------
    grad : callable
        ``grad(x, i)`` returns the gradient at ``x`` on iteration ``i``, a pytree with the
        structure of ``x`` (``autograd.grad(objective)`` of an ``objective(x, i)``).
    x0 : pytree
        The starting point: float32 or float64 arrays (integer arrays and Python numbers
        become float64). It is copied, never modified.
    optimizer : str or Optimizer subclass, default "adam"
        A fastopt optimizer, by name in any case (``"adam"``, ``"AdamW"``, ``"sgd"``) or
        class; not LBFGS (it needs a closure) or SparseAdam.
    num_iters : int, default 100
        Steps to run (autograd's default for ``adam``).
    callback : callable, optional
        ``callback(x, i, g)`` before each step, as in autograd.
    **hyperparameters
        The optimizer's arguments with its names and defaults (``lr``, ``betas``, ...).

    Returns
    -------
    pytree
        The final point, structured as ``x0``, of plain ndarrays (a number in ``x0`` comes
        back as a 0-d array, as from autograd's optimizers).

    Notes
    -----
    ``x`` holds the live ``fastopt.Parameter`` arrays that the optimizer updates in place
    (no copy per step): they change after ``callback`` returns, so a callback that keeps
    ``x`` (a trajectory) must keep copies (``copy.deepcopy(x)``). autograd differentiates
    Parameters as plain arrays (see ``fastopt.Parameter``). A gradient leaf whose dtype
    differs from its parameter's is cast to the parameter's dtype; one of another shape, or
    a gradient of another structure, raises ValueError naming its path.

    Where the update rules agree, the numbers are autograd's: autograd's ``adam(grad, x0,
    callback, num_iters, step_size, b1, b2, eps)`` is ``minimize(grad, x0, "adam",
    num_iters, callback, lr=step_size, betas=(b1, b2), eps=eps)`` to rounding (each library
    rounds in its own order; fastopt's is torch's), and autograd's ``sgd`` with
    ``mass=0`` is ``"sgd"`` with the same ``lr``. autograd's ``sgd`` with momentum and
    ``rmsprop`` follow other rules than torch's SGD and RMSprop (a velocity of
    ``(1 - mass)``-scaled gradients from the first step; a second moment starting at 1).

    Examples
    --------
    >>> import autograd, autograd.numpy as anp
    >>> objective = lambda x, i: anp.sum((x["w"] - 3.0) ** 2) + x["b"] ** 2
    >>> x = fastopt.minimize(autograd.grad(objective), {"w": np.zeros(2), "b": 1.0},
    ...                      "adam", num_iters=500, lr=0.1)
    """
    cls = _optimizer_class(optimizer)
    if isinstance(num_iters, bool) or not isinstance(num_iters, numbers.Integral) \
            or num_iters < 0:
        raise ValueError(f"minimize: num_iters must be an int >= 0, got {num_iters!r}")
    if "autograd" in sys.modules:
        _autograd.install()
    paths, leaves, treedef = _pytree.flatten_with_paths(x0, "x0")
    if not leaves:
        raise ValueError("minimize: x0 holds no arrays")
    params = [_start(leaf, _pytree.path_str("x0", path)) for leaf, path in zip(leaves, paths)]
    opt = cls(params, **hyperparameters)
    x = _pytree.unflatten(treedef, params)
    for i in range(int(num_iters)):
        g = grad(x, i)
        if callback is not None:
            callback(x, i, g)
        where = f"grad(x, {i})"
        gleaves = _pytree.flatten_like(treedef, g, where, "x")
        for p, gl, path in zip(params, gleaves, paths):
            arr = np.asarray(gl)
            if arr.shape != p.shape:
                raise ValueError(f"minimize: {_pytree.path_str(where, path)} has shape "
                                 f"{arr.shape}, {_pytree.path_str('x', path)} {p.shape}")
            if arr.dtype != p.dtype:
                arr = arr.astype(p.dtype)
            p.grad = arr
        opt.step()
    for p in params:
        p.grad = None
    return _pytree.unflatten(treedef, [p.view(np.ndarray) for p in params])

