"""Muon: momentum orthogonalised by a Newton-Schulz iteration (NumPy, 2-D parameters)."""
import math
import operator

import numpy as np

from fastopt._numpy_step import check_state_array, lerp_, prepare, signals_deferred
from fastopt.optimizer import Optimizer

__all__ = ["Muon"]

EPS = 1e-7
DEFAULT_A, DEFAULT_B, DEFAULT_C = 3.4445, -4.7750, 2.0315
DEFAULT_NS_STEPS = 5


def newton_schulz(g, coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), steps=DEFAULT_NS_STEPS,
                  eps=EPS):
    """Approximate orthogonalisation of the matrix ``g`` (the U V^T of its SVD, with
    singular values pushed into roughly [0.7, 1.2]) by the quintic iteration
    X <- a X + (b A + c A^2) X, A = X X^T, on the wide orientation of g after scaling it to
    unit Frobenius norm. Computed in float32 (float64 for float64 input)."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if g.ndim != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    dtype = np.float64 if g.dtype == np.float64 else np.float32
    T = np.dtype(dtype).type
    x = np.array(g, dtype=dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(T(np.linalg.norm(x)), T(eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = T(b) * gram + T(c) * (gram @ gram)
        x = T(a) * x + poly @ x
    return np.ascontiguousarray(x.T if tall else x)


def _adjusted_lr(lr, fn, shape):
    rows, cols = shape[:2]
    if fn is None or fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class Muon(Optimizer):
    r"""Muon (Jordan et al. 2024), as ``torch.optim.Muon``.

    .. math::
        B &\leftarrow \mu B + (1 - \mu) G \;(\text{torch's lerp form}), \qquad
        U = \mathrm{lerp}(G, B, \mu) \text{ (nesterov) or } B \\
        O &= \mathrm{NS}^{(a,b,c)}_k(U), \qquad
        \theta \leftarrow \theta (1 - \gamma\lambda) - \mathrm{adjust}(\gamma)\, O

    Parameters
    ----------
    params : iterable
        2-D parameters only (biases, embeddings etc. belong to another optimizer).
    lr : float, default 1e-3
    weight_decay : float, default 0.1
        Decoupled: :math:`\theta \leftarrow \theta(1 - \gamma\lambda)` with the unadjusted lr
        (torch's docstring calls it an L2 penalty; the code decays the weights directly).
    momentum : float, default 0.95
    nesterov : bool, default True
    ns_coefficients : (float, float, float), default (3.4445, -4.775, 2.0315)
    eps : float, default 1e-7
        Lower bound of the norm the update is divided by.
    ns_steps : int, default 5
        Newton-Schulz iterations (< 100).
    adjust_lr_fn : None, "original" or "match_rms_adamw"
        ``original`` (and None): :math:`\gamma\sqrt{\max(1, A/B)}`; ``match_rms_adamw``:
        :math:`0.2\gamma\sqrt{\max(A, B)}` for an A x B parameter.

    Notes
    -----
    torch runs the Newton-Schulz iteration in bfloat16 (8 significant bits); fastopt runs
    it in float32 (float64 for float64 parameters). The orthogonalised update therefore
    differs from torch's by about bfloat16's resolution: on 64 x 32 and 16 x 48 random
    matrices one update differs by at most 1.4-2.1 % of its RMS, and after 100 steps of
    lr 0.02 the parameters agree within about 3e-3. The momentum buffer and the parameter
    arithmetic are float32 as in torch. State: ``momentum_buffer``.

    With ``adjust_lr_fn`` None or ``"original"`` a parameter with no columns raises
    ValueError before anything changes (torch divides by the column count and raises
    ZeroDivisionError after updating the parameters before it).
    """

    _flag_defaults = {}
    _scalar_state_keys = frozenset()

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), eps=EPS,
                 ns_steps=DEFAULT_NS_STEPS, adjust_lr_fn=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_coefficients=ns_coefficients, eps=eps,
                        ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        if not 0.0 <= group["lr"]:
            raise ValueError(f"Learning rate should be >= 0 but is: {group['lr']}")
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"momentum should be >= 0 but is: {group['momentum']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"weight decay should be >= 0 but is: {group['weight_decay']}")
        fn = group["adjust_lr_fn"]
        if fn is not None and fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {fn} is not supported")
        if group["ns_steps"] >= 100:
            raise ValueError("Number of steps must be less than 100 for computational "
                             "efficiency")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        for p in group.get("params", ()):
            if np.ndim(p) != 2:
                raise ValueError("Muon only supports 2D parameters whereas we found a "
                                 f"parameter with size: {np.shape(p)}")

    @staticmethod
    def _check_existing_state(st, arr, where):
        if "momentum_buffer" in st:
            check_state_array(st["momentum_buffer"], arr.shape, arr.dtype, where,
                              "momentum_buffer")

    @staticmethod
    def _check_frozen(frozen, group):
        # what newton_schulz and _adjusted_lr would reject in the middle of a step
        # (_freeze made ns_steps a float)
        try:
            steps = operator.index(group["ns_steps"])
        except TypeError:
            raise TypeError(f"ns_steps must be an int, got {group['ns_steps']!r}") from None
        if steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational "
                             "efficiency")
        frozen["ns_steps"] = steps
        fn = frozen["adjust_lr_fn"]
        if fn is not None and fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {fn} is not supported")

    @staticmethod
    def _check_param(frozen, arr, where):
        if arr.ndim != 2:
            raise ValueError(f"{where}: Muon only supports 2D parameters whereas we found a "
                             f"parameter with size: {arr.shape}")
        if arr.shape[1] == 0 and frozen["adjust_lr_fn"] in (None, "original"):
            raise ValueError(f"{where}: a parameter with no columns (shape {arr.shape}); "
                             f"the learning rate adjustment 'original' divides by their "
                             f"number")

    def _init_state(self, state, array, group):
        state["momentum_buffer"] = np.zeros_like(array)

    def step(self, closure=None):
        """Perform one optimization step; returns ``closure()``'s value when given."""
        loss = None
        if closure is not None:
            loss = closure()
        frozen, groups = prepare(self, "Muon", self._check_existing_state,
                                 lambda st: "momentum_buffer" not in st, self._check_frozen,
                                 self._check_param)
        with signals_deferred():  # every group is updated, or (the checks failed) none
            for group, items in zip(frozen, groups):
                lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
                for _, p, arr, g in items:
                    T = arr.dtype.type
                    buf = self.state[p]["momentum_buffer"]
                    lerp_(buf, g, T(1 - mu))
                    if group["nesterov"]:
                        upd = g.copy()
                        lerp_(upd, buf, T(mu))
                    else:
                        upd = buf
                    o = newton_schulz(upd, group["ns_coefficients"], group["ns_steps"],
                                      group["eps"])
                    arr *= T(1 - lr * wd)
                    arr += T(-_adjusted_lr(lr, group["adjust_lr_fn"], arr.shape)) * o.astype(
                        arr.dtype, copy=False)
        return loss
