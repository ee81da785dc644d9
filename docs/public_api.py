"""fastopt's public modules, for the documentation build (docs/conf.py) and its test
(tests/test_docs.py): what the API reference must cover."""
import importlib
import importlib.util
import pkgutil
import types


def public_modules():
    """``{module name: module}``: fastopt, the modules named in its ``__all__``, and every
    other non-private module of the package whose ``__all__`` holds a name that
    ``fastopt.__all__`` does not (an optimizer's module re-exported whole is not one)."""
    import fastopt

    found = {"fastopt": fastopt}
    for name in fastopt.__all__:
        value = getattr(fastopt, name)
        if isinstance(value, types.ModuleType):
            found[value.__name__] = value
    for info in pkgutil.iter_modules(fastopt.__path__):
        if info.name.startswith("_") or f"fastopt.{info.name}" in found:
            continue
        if info.name == "torch" and importlib.util.find_spec("torch") is None:
            continue
        module = importlib.import_module(f"fastopt.{info.name}")
        if set(getattr(module, "__all__", ())) - set(fastopt.__all__):
            found[module.__name__] = module
    return found
