"""Parameters that are not ``fastopt.Parameter``: the adapter registry, and the adapter
that lets an optimizer update CPU ``torch.Tensor`` objects.

An adapter serves one foreign array type. It has ``accepts(obj)`` (is ``obj`` of that type),
``check(obj, gi, pi, defaults)`` (raise when ``add_param_group`` must refuse ``obj``),
``arrays(obj, gi, pi)`` (at every step: the array to update in place and the gradient array
or None), ``data(obj)`` (the array alone, without the gradient checks) and
``zero_grad(obj, set_to_none)``. ``_ADAPTERS`` lists the adapters; the tensor adapter is the
only one.

Tensors
-------
An optimizer given tensors (``model.parameters()``) updates them in place through NumPy views
of their memory: no copies, no torch operations in the update itself. This module is imported
with fastopt but never imports torch; it looks torch up in ``sys.modules`` and only acts on
objects that are tensors, which cannot exist before torch was imported.

Rules, as torch.optim's where torch has one:

* a parameter must be a dense (strided), contiguous, CPU, float32 or float64 tensor (for
  the per-element optimizers also float16; bfloat16 in ``fastopt.torch``'s), and a leaf
  (or ``retains_grad``) unless the optimizer was built with ``differentiable=True``;
  anything else is refused by ``add_param_group`` with an error naming the parameter. The
  optimizers of ``fastopt.torch`` ask for more (``wide``): a tensor dense in any axis order
  (channels_last), viewed with its own strides, and a complex tensor, viewed as its
  ``torch.view_as_real`` (its gradient and state too);
* every ``step()`` reads ``p.grad`` afresh (backward replaces it); a None grad skips the
  parameter; a gradient must be a dense CPU tensor of the parameter's dtype and shape, or a
  sparse COO tensor (an ``Embedding(sparse=True)`` gradient), handed over as it is: only
  SparseAdam (and ``fastopt.torch``'s SGD and Adagrad) take it;
* after an update, the parameter's autograd version counter is incremented, as an in-place
  torch op would do, so a backward through a graph that saved the old value still fails
  loudly instead of giving wrong gradients;
* ``zero_grad(set_to_none=False)`` detaches and zeroes the gradient in place, as torch does.

NumPy has no bfloat16 dtype of its own, so a bfloat16 tensor (its gradient and its state
too) is viewed as int16 (``_numpy_of``); the kernels read a foreign parameter's int16 view as
bfloat16, and an int16 state tensor is viewed as uint16, which matches no parameter.
"""
import sys
import weakref

import numpy as np

from fastopt.parameter import Parameter

__all__ = ["TORCH_ADAPTER", "TorchAdapter"]


def _where(gi, pi):
    return f"param_groups[{gi}]['params'][{pi}]"


def _adapter_for(obj):
    """The adapter that accepts ``obj``, or None."""
    for a in _ADAPTERS:
        if a.accepts(obj):
            return a
    return None


def _foreign_param(obj, gi, pi, mark=True, wide=False):
    """(array, grad array or None) of a parameter that is not a ``fastopt.Parameter``;
    ``mark=False``: the caller calls ``_foreign_updated`` with it after the update;
    ``wide``: the caller takes the wider set of tensors of ``TorchAdapter.check``."""
    a = _adapter_for(obj)
    if a is None:
        raise TypeError(f"{_where(gi, pi)}: expected a fastopt.Parameter, got "
                        f"{type(obj).__name__}")
    if wide:
        return a.arrays(obj, gi, pi, mark, True)
    return a.arrays(obj, gi, pi, mark)


def _foreign_updated(objs):
    """Tell the adapters that the parameters ``objs`` were updated in place."""
    if len(_ADAPTERS) == 1:
        _ADAPTERS[0].updated(objs)  # every foreign parameter is the one adapter's
        return
    for a in _ADAPTERS:
        mine = [o for o in objs if a.accepts(o)]
        if mine:
            a.updated(mine)


def _param_arrays(p, gi, pi, mark=True):
    """(array, grad or None) of ``param_groups[gi]['params'][pi]``, a ``fastopt.Parameter``
    or an object an adapter accepts; TypeError for anything else. ``mark=False``: a foreign
    parameter is not yet marked as updated; the caller passes it to ``_foreign_updated``
    once its update succeeded (a step that raises leaves version counters as they were)."""
    if isinstance(p, Parameter):
        return p.view(np.ndarray), p.grad
    return _foreign_param(p, gi, pi, mark)


def _foreign_among(params):
    """The parameters of ``params`` that are not ``fastopt.Parameter`` (the ones
    ``_foreign_updated`` must be told about)."""
    return [p for p in params if not isinstance(p, Parameter)]


def _foreign_arrays(obj):
    """The data of a parameter accepted by an adapter, as an array (no gradient checks)."""
    return _adapter_for(obj).data(obj)


def _torch():
    return sys.modules.get("torch")


def _numpy_of(t, where="a tensor"):
    """The NumPy view of the detached tensor ``t``: of its int16 bits for bfloat16. Raises
    RuntimeError naming ``where`` when its storage lacks memory for its elements."""
    from fastopt._kernels import check_held

    check_held(t, where)
    if t.dtype is _torch().bfloat16:
        return t.view(_torch().int16).numpy()
    return t.numpy()


def _check_dense_cpu(obj, where):
    """Raise ValueError naming ``where`` unless the tensor ``obj`` is strided and on the CPU."""
    if obj.layout is not _torch().strided:
        raise ValueError(f"{where}: fastopt optimizes dense tensors, got a tensor with "
                         f"layout {obj.layout}")
    if obj.device.type != "cpu":
        raise ValueError(f"{where}: fastopt updates CPU tensors, this one is on "
                         f"{obj.device}; move the model to the CPU or use torch.optim")


class TorchAdapter:
    """The adapter for ``torch.Tensor`` parameters."""

    def __init__(self):
        # id(tensor) -> (weakref, data_ptr, shape, ndarray view); avoids a .numpy() call
        # (~2 us) per parameter per step. Entries are dropped when the tensor dies and
        # rebuilt when the tensor's storage, shape or layout changed (``p.data = ...``).
        self._views = {}
        self._bump = None
        self._tensor_types = set()  # torch.Tensor and the subclasses seen so far

    # -- cheap type test, never imports torch -------------------------------------------

    def accepts(self, obj):
        if type(obj) in self._tensor_types:
            return True
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(obj, torch.Tensor):
            return False
        self._tensor_types.add(type(obj))
        return True

    # -- checks at add_param_group --------------------------------------------------------

    def check(self, obj, gi, pi, defaults, wide=False, low=False):
        """Raise unless ``obj`` can be optimized. ``wide`` (the optimizers of
        ``fastopt.torch``): also a dense tensor in any axis order (channels_last; the
        kernels run over its memory block) and a complex tensor (updated as its
        ``torch.view_as_real`` view, as torch's optimizers do). ``low`` (the per-element
        kernels): also float16, and with ``wide`` bfloat16 (fastopt's own classes keep
        NumPy state, and NumPy has no bfloat16 of its own)."""
        torch = _torch()
        where = _where(gi, pi)
        if wide:
            return self._check_wide(obj, where, defaults, low)
        _check_dense_cpu(obj, where)
        if low and obj.dtype is torch.bfloat16:
            raise TypeError(f"{where}: fastopt's optimizers keep NumPy state, and NumPy has "
                            f"no bfloat16 dtype; step bfloat16 tensors with fastopt.torch's "
                            f"classes, or convert to a fastopt.Parameter of "
                            f"ml_dtypes.bfloat16")
        if obj.dtype not in ((torch.float32, torch.float64, torch.float16) if low
                             else (torch.float32, torch.float64)):
            raise TypeError(f"{where}: fastopt optimizes float32 and float64 tensors"
                            f"{' (and float16)' if low else ''}, got {obj.dtype}")
        if obj.is_conj() or obj.is_neg():
            raise ValueError(f"{where}: a lazily conjugated/negated tensor view cannot be "
                             f"updated in place; pass a materialized tensor")
        if not obj.is_contiguous():
            raise ValueError(f"{where}: the tensor is not contiguous (strides "
                             f"{tuple(obj.stride())} for shape {tuple(obj.shape)}); pass "
                             f"a contiguous tensor (for a module: "
                             f"model.to(memory_format=torch.contiguous_format))")
        if not (obj.is_leaf or obj.retains_grad) and not defaults.get("differentiable"):
            raise ValueError(f"{where}: can't optimize a non-leaf Tensor")

    def _check_wide(self, obj, where, defaults, low=True):
        torch = _torch()
        _check_dense_cpu(obj, where)
        if obj.dtype not in ((torch.float32, torch.float64, torch.complex64, torch.complex128)
                             + ((torch.float16, torch.bfloat16) if low else ())):
            raise TypeError(f"{where}: fastopt optimizes float32, float64, complex64 and "
                            f"complex128 tensors{', float16 and bfloat16' if low else ''}, "
                            f"got {obj.dtype}")
        if obj.is_conj() or obj.is_neg():
            raise ValueError(f"{where}: a lazily conjugated/negated tensor view cannot be "
                             f"updated in place; pass a materialized tensor")
        if not _is_dense(obj):
            raise ValueError(f"{where}: the tensor is not dense (strides "
                             f"{tuple(obj.stride())} for shape {tuple(obj.shape)}: a view "
                             f"such as a slice with gaps between its elements); its memory "
                             f"cannot be updated as one block; pass a dense tensor "
                             f"(x.contiguous())")
        if not (obj.is_leaf or obj.retains_grad) and not defaults.get("differentiable"):
            raise ValueError(f"{where}: can't optimize a non-leaf Tensor")

    # -- every step -------------------------------------------------------------------------
    #
    # A cache entry is (weakref, data pointer, shape, view, strides): strides None for a
    # contiguous float tensor, whose view is the tensor as an array; else (a dense tensor in
    # another axis order, or a complex tensor: only for ``wide`` callers) the tensor's
    # strides, and the view is the array with those strides (of torch.view_as_real for a
    # complex tensor).

    def _view(self, obj, gi, pi, wide=False):
        """NumPy view of the tensor's memory, cached while the storage stays the same."""
        key = id(obj)
        entry = self._views.get(key)
        ptr = obj.data_ptr()
        if (entry is not None and entry[0]() is obj and entry[1] == ptr
                and obj.shape == entry[2]):
            if entry[4] is None and obj.is_contiguous():
                return entry[3]
            if wide and entry[4] is not None and obj.stride() == entry[4]:
                return entry[3]
        return self._new_view(obj, key, ptr, gi, pi, wide)

    def _new_view(self, obj, key, ptr, gi, pi, wide=False):
        torch = _torch()
        if wide:
            try:
                self._check_wide(obj, _where(gi, pi), {"differentiable": True})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{e} (the tensor changed since it was added to the "
                                 f"optimizer)") from None
            plain = (obj.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                     and obj.is_contiguous())
            arr = _numpy_of(torch.view_as_real(obj.detach()) if obj.is_complex()
                            else obj.detach(), _where(gi, pi))
            strides = None if plain else tuple(obj.stride())
        else:
            if (obj.layout is not torch.strided or obj.device.type != "cpu"
                    or obj.dtype not in (torch.float32, torch.float64, torch.float16)
                    or not obj.is_contiguous() or obj.is_conj() or obj.is_neg()):
                raise ValueError(
                    f"{_where(gi, pi)}: the tensor changed since it was added to the "
                    f"optimizer and is no longer a dense, contiguous float32, float64 or "
                    f"float16 CPU tensor (device {obj.device}, dtype {obj.dtype}, layout "
                    f"{obj.layout}, contiguous {obj.is_contiguous()})")
            arr = _numpy_of(obj.detach(), _where(gi, pi))
            strides = None
        views = self._views

        def forget(_ref, key=key, views=views):
            views.pop(key, None)

        views[key] = (weakref.ref(obj, forget), ptr, obj.shape, arr, strides)
        return arr

    def data(self, obj, gi=0, pi=0):
        """The NumPy view of the tensor alone (no gradient checks, no version bump): what
        ``load_state_dict`` needs to cast saved state to the parameter's dtype and shape
        (for a complex tensor, the view of ``torch.view_as_real``)."""
        return self._view(obj, gi, pi, True)

    def arrays(self, obj, gi, pi, mark=True, wide=False):
        entry = self._views.get(id(obj))
        ptr = obj.data_ptr()
        if (entry is not None and entry[1] == ptr and entry[0]() is obj
                and obj.shape == entry[2] and entry[4] is None and obj.is_contiguous()):
            arr = entry[3]  # the cached view (same code as _view, inlined: every step)
        else:
            arr = self._view(obj, gi, pi, wide)
            if wide and obj.is_complex():
                return self._complex_arrays(obj, arr, gi, pi, mark)
        g = obj.grad
        if g is None:
            return arr, None
        try:
            garr = _numpy_of(g, f"{_where(gi, pi)}.grad")
        except (RuntimeError, TypeError, AttributeError):
            garr = self._grad_array(obj, g, gi, pi)
        else:
            if garr.dtype == np.int16:  # not the bits of a bfloat16 gradient: refused
                garr = self._grad_array(obj, g, gi, pi)
        if mark:
            self.updated([obj])
        return arr, garr

    def updated(self, objs):
        """Bump the autograd version counters of the tensors ``objs``, updated in place, as
        torch's in-place ops do (so a backward through a graph that saved the old values
        fails loudly instead of giving wrong gradients)."""
        bump = self._bump
        if bump is None:
            bump = self._bump = _version_bumper()
        bump(objs)

    def _grad_array(self, obj, g, gi, pi):
        """Diagnose a gradient ``.numpy()`` refused (or convert one that needs detaching)."""
        torch = _torch()
        where = _where(gi, pi)
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{where}: .grad must be a tensor or None, got "
                            f"{type(g).__name__}")
        if g.layout is torch.sparse_coo and obj.dtype in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"{where}: fastopt does not support sparse gradients of "
                               f"{obj.dtype} parameters")
        if g.layout is torch.sparse_coo and g.device.type == "cpu" and g.dtype == obj.dtype:
            # an embedding's sparse gradient, as is: SparseAdam takes it (as a SparseGrad),
            # the optimizers with dense kernels refuse it naming the parameter, as torch's do
            # (fastopt.torch's SGD and Adagrad step it themselves)
            return g
        if g.layout is not torch.strided:
            raise RuntimeError(f"{where}: fastopt does not support gradients with layout "
                               f"{g.layout}; use a dense gradient")
        if g.device.type != "cpu":
            raise ValueError(f"{where}: .grad is on {g.device}, the parameter on the CPU")
        if g.dtype != obj.dtype:
            raise TypeError(f"{where}: .grad has dtype {g.dtype}, the parameter {obj.dtype}")
        if g.is_conj() or g.is_neg():
            return _numpy_of(g.resolve_conj().resolve_neg().detach(), f"{where}.grad")
        return _numpy_of(g.detach(), f"{where}.grad")

    def _complex_arrays(self, obj, arr, gi, pi, mark):
        """(real view, real view of the gradient or None) of a complex parameter."""
        torch = _torch()
        g = obj.grad
        if g is None:
            return arr, None
        if isinstance(g, torch.Tensor) and g.layout is torch.strided and g.dtype == obj.dtype:
            if g.is_conj() or g.is_neg():
                g = g.resolve_conj().resolve_neg()
            garr = _numpy_of(torch.view_as_real(g.detach()), f"{_where(gi, pi)}.grad")
        elif isinstance(g, torch.Tensor) and g.layout is torch.sparse_coo:
            raise RuntimeError(f"{_where(gi, pi)}: fastopt does not support sparse gradients "
                               f"of complex parameters")
        else:
            garr = self._grad_array(obj, g, gi, pi)
        if mark:
            self.updated([obj])
        return arr, garr

    def state_view(self, obj):
        """(NumPy view, data pointer, version counter) of a state entry that is a tensor (the
        state of a ``fastopt.torch`` optimizer), or None for any other object. The view
        shares the tensor's memory, so the kernels update the tensor itself."""
        if not self.accepts(obj):
            return None
        torch = _torch()
        if (obj.layout is not torch.strided or obj.device.type != "cpu" or obj.is_conj()
                or obj.is_neg()):
            raise TypeError(f"expected a dense CPU tensor, got one with layout {obj.layout} "
                            f"on {obj.device}")
        if obj.is_inference():
            # as torch.optim: an inference tensor takes no in-place update outside
            # torch.inference_mode (and it has no version counter)
            raise TypeError("expected a tensor that can be updated in place, got an inference "
                            "tensor (made under torch.inference_mode); clone it outside "
                            "inference mode")
        view = torch.view_as_real(obj.detach()) if obj.is_complex() else obj.detach()
        arr = _numpy_of(view, "the state tensor")
        if obj.dtype is torch.int16:
            arr = arr.view(np.uint16)  # int16 bits stand for bfloat16 (see above)
        return arr, obj.data_ptr(), obj._version

    def zero_grad(self, obj, set_to_none):
        g = obj.grad
        if g is None:
            return
        if set_to_none:
            obj.grad = None
        else:
            if g.grad_fn is not None:
                g.detach_()
            else:
                g.requires_grad_(False)
            g.zero_()


def _is_dense(t):
    """torch's "non-overlapping and dense": the elements fill one block of memory, in some
    order of the axes."""
    if any(s == 0 for s in t.shape):
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _version_bumper():
    """``f([tensor])`` that increments the autograd version counter, as in-place ops do.

    torch's private batched ``_increment_version`` costs ~0.3 us a call, the public
    ``torch.autograd.graph.increment_version`` ~0.7 us; use the private one when it exists
    and works as expected (checked once), else the public one.
    """
    torch = _torch()
    public = torch.autograd.graph.increment_version
    bump = getattr(torch._C, "_increment_version", None)
    if bump is None:
        return public
    probe = torch.zeros(1)
    before = probe._version
    try:
        bump([probe])
    except (RuntimeError, TypeError):
        return public
    return bump if probe._version == before + 1 else public


TORCH_ADAPTER = TorchAdapter()
_ADAPTERS = [TORCH_ADAPTER]
