"""Type aliases of the public signatures (annotations only; nothing here runs at a step)."""
from typing import Any, Callable, Dict, Iterable, Union

#: What an optimizer takes: parameters (fastopt Parameters, or CPU torch tensors) or
#: parameter-group dicts, as torch.optim's ``params``.
ParamsT = Union[Iterable[Any], Iterable[Dict[str, Any]]]

#: ``step(closure)``'s closure: re-evaluates the model and returns the loss.
Closure = Callable[[], Any]

#: A state dict in torch's format: ``{"state": {...}, "param_groups": [...]}``.
StateDict = Dict[str, Any]

#: A hook (step, state-dict and load-state-dict hooks take torch's arguments).
Hook = Callable[..., Any]
