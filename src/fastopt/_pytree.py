"""Nested containers of arrays ("pytrees"): their leaves in a fixed order, and back.

A pytree is a leaf or a container of pytrees. The containers are dicts, lists and tuples
(namedtuples included); everything else (arrays, Parameters, numbers, None) is a leaf. The
leaves come in this order, which is the order of ``autograd.misc.flatten`` and of
``jax.tree_util`` for these containers:

* a dict's values by sorted keys (the keys of one dict must be sortable: all strings, or
  all numbers); an ``OrderedDict``'s in its own order, as jax keeps it;
* a list's or a tuple's items in order.

A leaf's path is the tuple of keys and indices that leads to it from the root. An optimizer
given a dict of parameters names each one by its path joined with dots (``"enc.w"``,
``"layers.0.b"``), as ``torch.nn.Module.named_parameters`` names a module's parameters.
"""
from collections import OrderedDict
from collections.abc import Mapping

__all__ = ["flatten", "flatten_with_paths", "flatten_like", "unflatten", "path_str",
           "dotted", "has_mapping"]

#: containers may nest this deep (deeper is surely a container that holds itself)
_MAX_DEPTH = 100

_LEAF = None


class TreeDef:
    """The structure of a pytree: for a container its kind, type, keys and children's
    structures; ``None`` stands for a leaf."""

    __slots__ = ("kind", "type", "keys", "children", "num_leaves")

    def __init__(self, kind, type_, keys, children):
        self.kind = kind          # "dict" or "seq"
        self.type = type_
        self.keys = keys          # a dict's keys in leaf order; a sequence's length
        self.children = children
        self.num_leaves = sum(1 if c is None else c.num_leaves for c in children)

    def __eq__(self, other):
        return (isinstance(other, TreeDef) and self.kind == other.kind
                and self.keys == other.keys and self.children == other.children)

    def __repr__(self):
        return f"TreeDef({unflatten(self, ['*'] * self.num_leaves)!r})"


def _sorted_keys(tree, path, root):
    if isinstance(tree, OrderedDict):
        return list(tree.keys())
    try:
        return sorted(tree.keys())
    except TypeError:
        raise TypeError(f"{path_str(root, path)}: the keys of a dict of parameters must be "
                        f"sortable (all strings, or all numbers), got "
                        f"{sorted({type(k).__name__ for k in tree})}") from None


def _flatten(tree, path, root, leaves, paths, active):
    if isinstance(tree, Mapping):
        kind, keys = "dict", _sorted_keys(tree, path, root)
        items = [(k, tree[k]) for k in keys]
    elif isinstance(tree, (list, tuple)):
        kind, keys = "seq", len(tree)
        items = list(enumerate(tree))
    else:
        leaves.append(tree)
        if paths is not None:
            paths.append(path)
        return _LEAF
    if id(tree) in active:
        raise ValueError(f"{path_str(root, path)} contains itself")
    if len(active) >= _MAX_DEPTH:
        raise ValueError(f"{path_str(root, path)}: containers nested more than "
                         f"{_MAX_DEPTH} deep")
    active.add(id(tree))
    children = [_flatten(v, path + (k,), root, leaves, paths, active) for k, v in items]
    active.discard(id(tree))
    return TreeDef(kind, type(tree), keys, children)


def flatten(tree, root="params"):
    """``(leaves, treedef)``: the leaves of ``tree`` in the module's order and its
    structure. ``root`` names the tree in error messages."""
    leaves = []
    return leaves, _flatten(tree, (), root, leaves, None, set())


def flatten_with_paths(tree, root="params"):
    """``(paths, leaves, treedef)``: as ``flatten``, with each leaf's path (a tuple)."""
    leaves, paths = [], []
    treedef = _flatten(tree, (), root, leaves, paths, set())
    return paths, leaves, treedef


def flatten_like(treedef, tree, root, reference="params"):
    """The leaves of ``tree``, which must have the structure ``treedef`` (that of
    ``reference``): a container of another kind, other keys or another length is a
    ValueError naming the path where they differ. Lists and tuples stand for each other."""
    leaves = []
    _flatten_like(treedef, tree, (), root, reference, leaves)
    return leaves


def _flatten_like(treedef, tree, path, root, reference, leaves):
    if treedef is None:
        leaves.append(tree)
        return
    where = path_str(root, path)
    if treedef.kind == "dict":
        if not isinstance(tree, Mapping):
            raise ValueError(f"{where} must be a dict with the keys of "
                             f"{path_str(reference, path)} {list(treedef.keys)}, got "
                             f"{type(tree).__name__}")
        if len(tree) != len(treedef.keys) or any(k not in tree for k in treedef.keys):
            missing = [k for k in treedef.keys if k not in tree]
            extra = [k for k in tree if k not in treedef.keys]
            raise ValueError(f"{where} has other keys than {path_str(reference, path)}: "
                             f"missing {missing}, unexpected {extra}")
        for k, child in zip(treedef.keys, treedef.children):
            _flatten_like(child, tree[k], path + (k,), root, reference, leaves)
        return
    if not isinstance(tree, (list, tuple)):
        raise ValueError(f"{where} must be a list or tuple of {treedef.keys} items as "
                         f"{path_str(reference, path)}, got {type(tree).__name__}")
    if len(tree) != treedef.keys:
        raise ValueError(f"{where} has {len(tree)} items, {path_str(reference, path)} "
                         f"{treedef.keys}")
    for i, child in enumerate(treedef.children):
        _flatten_like(child, tree[i], path + (i,), root, reference, leaves)


def unflatten(treedef, leaves):
    """The pytree of structure ``treedef`` with ``leaves`` (in the module's order) as its
    leaves; containers are rebuilt with their original types."""
    it = iter(leaves)
    out = _unflatten(treedef, it)
    return out


def _unflatten(treedef, it):
    if treedef is None:
        return next(it)
    values = [_unflatten(c, it) for c in treedef.children]
    t = treedef.type
    if treedef.kind == "dict":
        pairs = zip(treedef.keys, values)
        if t is dict or t is OrderedDict:
            return t(pairs)
        try:
            out = t()
            out.update(pairs)
            return out
        except Exception:
            return dict(zip(treedef.keys, values))
    if t is list or t is tuple:
        return t(values)
    if issubclass(t, tuple) and hasattr(t, "_fields"):
        return t(*values)
    try:
        return t(values)
    except Exception:
        return list(values) if issubclass(t, list) else tuple(values)


def has_mapping(treedef):
    """Whether a dict appears anywhere in the structure."""
    if treedef is None:
        return False
    return treedef.kind == "dict" or any(has_mapping(c) for c in treedef.children)


def path_str(root, path):
    """``root['enc'][0]``: where a leaf or subtree is, for error messages."""
    return root + "".join(f"[{k!r}]" for k in path)


def dotted(path):
    """``"enc.0.w"``: a leaf's name as torch names a module's parameters."""
    return ".".join(str(k) for k in path)
