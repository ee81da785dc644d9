"""``fastopt.Parameter`` as an array that HIPS autograd differentiates.

autograd finds how to trace and differentiate a value by its exact type (two dicts keyed
by type: boxes and vector spaces), so an ndarray subclass is refused ("Can't differentiate
w.r.t. type fastopt.parameter.Parameter") until it is registered. ``register()`` gives
Parameter the box and vector space of ``numpy.ndarray``: ``autograd.grad(f)(p)`` then
traces ``p`` as the array it wraps and returns a plain ndarray gradient.

fastopt never imports autograd. ``install(Parameter)`` (run when ``fastopt.parameter`` is
imported) registers at once when autograd is already imported; otherwise it puts a finder
at the front of ``sys.meta_path`` that waits for the top-level ``autograd`` package to be
imported, lets the finders after it find and load the package as usual, and registers
right after the package has run (autograd's ``__init__`` imports its NumPy boxes and
vector spaces); then it takes itself off ``sys.meta_path``. Until then its cost is one
string comparison per import of a module not imported yet. The package's ``__loader__``
and ``__spec__.loader`` are the original loader again once it is loaded. Where autograd
was imported in a way the finder missed, ``fastopt.minimize`` registers at its start.
"""
import sys

__all__ = ["install", "register", "registered"]

_done = False
#: the class to register (``install`` receives it: this module imports no fastopt module)
_cls = None


def registered():
    """Whether Parameter has been registered with autograd."""
    return _done


def register():
    """Register the installed class (``fastopt.Parameter``) with the imported autograd
    (idempotent)."""
    global _done
    if _done or _cls is None:
        return
    from autograd.extend import VSpace
    from autograd.numpy.numpy_boxes import ArrayBox
    import numpy as np

    ArrayBox.register(_cls)
    VSpace.mappings[_cls] = VSpace.mappings[np.ndarray]
    _done = True


class _RegisteringLoader:
    """Runs the real loader of the ``autograd`` package, then ``register()``."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        real = self._loader
        module.__loader__ = real
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = real
        real.exec_module(module)
        _uninstall()
        register()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _AutogradFinder:
    """The ``sys.meta_path`` entry that notices the import of ``autograd``."""

    def find_spec(self, name, path=None, target=None):
        if name != "autograd":
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


_finder = _AutogradFinder()


def _uninstall():
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install(cls=None):
    """Register ``cls`` (an ndarray subclass, ``fastopt.Parameter``) now if autograd is
    imported, else when it is (see the module's text)."""
    global _cls
    if cls is not None:
        _cls = cls
    if _done:
        return
    module = sys.modules.get("autograd")
    if module is not None and "autograd.numpy.numpy_boxes" in sys.modules:
        register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
