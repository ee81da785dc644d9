"""Checkpoints without pickle: an optimizer's state, its schedulers' state and any extra data in
one safetensors file, written atomically and checked when loaded.

>>> import os, tempfile, numpy as np, fastopt
>>> w = fastopt.Parameter(np.zeros(3, dtype=np.float32))
>>> opt = fastopt.Adam([w], lr=1e-3)
>>> w.grad = np.ones(3, dtype=np.float32)
>>> opt.step()
>>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
>>> fastopt.save(path, opt, extra={"epoch": 1})
>>> fastopt.load(path, fastopt.Adam([fastopt.Parameter(np.zeros(3, np.float32))]))
{'epoch': 1}

File format
-----------
A checkpoint is a safetensors file: an unsigned 64-bit little-endian header length ``N``, ``N``
bytes of UTF-8 JSON (padded with spaces to a multiple of 8) ::

    {"__metadata__": {str: str, ...},
     "<tensor name>": {"dtype": "F32", "shape": [3], "data_offsets": [begin, end]}, ...}

then the tensors' raw little-endian bytes, ``data_offsets`` counted from the first byte after
the header. Any safetensors reader loads the arrays (``safetensors.numpy.load_file``); fastopt
reads files written by any safetensors writer as long as they carry its metadata. Every array
of the saved state is a tensor, named by its key path (``optimizer.state.0.exp_avg``; lists
of arrays, such as LBFGS's history, get indices: ``optimizer.state.0.old_dirs.3``). 0-d arrays
(the ``step`` counters, NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) are tensors of
shape ``[]`` and load as 0-d arrays of their dtype. NumPy scalars (``np.float32(0.5)``) are
0-d tensors too and load as NumPy scalars of their type.

16-bit floating point arrays are stored in the safetensors dtypes that mean them, so that
other safetensors readers load them too: float16 as ``F16``, bfloat16 (``ml_dtypes.bfloat16``
arrays, ``torch.bfloat16`` tensors) as ``BF16``, the same bits. A ``BF16`` tensor loads as an
``ml_dtypes.bfloat16`` array, so reading one needs ml_dtypes (NumPy has no bfloat16 of its
own): without it :func:`load` and :func:`read` raise ImportError naming the tensor, before
anything changes. Writing one does not need it.

``__metadata__`` holds four entries:

``fastopt.format``
    ``"fastopt.checkpoint"``, the marker of a fastopt checkpoint.
``fastopt.version``
    The format version, ``"1"``.
``fastopt.content``
    A JSON document: ``{"optimizer": "<module>.<class>", "params": [[[shape, dtype], ...]
    per group], "state_dict": ..., "scheduler": ..., "extra": ...}``. Values are JSON
    values; what JSON cannot say is tagged with a one-key object: ``{"tensor": name}`` (an
    array), ``{"scalar": name}`` (a NumPy scalar), ``{"tuple": [...]}``, ``{"dict": [[key,
    value], ...]}`` (a dict, keeping its key types and order; also ``"ordered_dict"`` and
    ``"counter"``) and ``{"float": "inf"}`` (``"-inf"``, ``"nan"``). A scheduler is
    ``{"class": "<module>.<class>", "state_dict": ...}``, a list of them ``{"list": [...]}``,
    a dict of them ``{"dict": [[name, ...], ...]}``, no scheduler ``null``.
``fastopt.sha256``
    The SHA-256 (lowercase hex) of the file's contents, defined without reference to its
    layout: the bytes of the JSON text ``{"metadata": {...}, "tensors": {name: {"dtype":
    ..., "shape": [...]}, ...}}`` (all of ``__metadata__`` except this entry; keys sorted by
    code point, separators ``","`` and ``":"``, non-ASCII characters escaped), a newline,
    then the raw bytes of every tensor in the order of their sorted names. So it covers the
    metadata, and every tensor's name, dtype, shape and data; it does not cover the header's
    layout (key order, padding, the data offsets), which is checked instead: the header must
    parse, have no duplicate keys, and its offsets must tile the data section exactly, with
    no gap, overlap or trailing byte. Together any flipped bit is refused.

Safety
------
:func:`save` writes a temporary file in the target's directory (``.<name>.<random>.tmp``),
flushes it and calls ``os.fsync`` on it, renames it over the target (``os.replace``, atomic)
and calls ``os.fsync`` on the directory: a crash at any point leaves either the previous
checkpoint or the new one, never a mix. A crash before the rename leaves the temporary file
behind (it is never read as the checkpoint, and can be deleted). A new file gets the
permissions of the file it replaces, or those ``open`` gives (0o666 less the umask).

:func:`load` reads and checks the whole file before it changes anything: a truncated file
raises :class:`TruncatedCheckpointError`, a damaged one :class:`CorruptCheckpointError`
(checksum mismatch, invalid header), a valid safetensors file that is no fastopt checkpoint
:class:`NotACheckpointError`, and a checkpoint of another optimizer class, with other group
sizes or parameter shapes, or other schedulers, :class:`CheckpointMismatchError`. In every
case the optimizer and the schedulers are left exactly as they were.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import stat
import sys
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, Dict, Mapping, Sequence, Union

import numpy as np

from fastopt._kernels import check_held
from fastopt.parameter import _is_bfloat16

if TYPE_CHECKING:
    from fastopt.lr_scheduler import LRScheduler
    from fastopt.optimizer import Optimizer

    #: what ``save`` and ``load`` take as ``scheduler``
    Schedulers = Union[LRScheduler, Sequence[LRScheduler], Mapping[str, LRScheduler], None]

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "CorruptCheckpointError",
    "TruncatedCheckpointError",
    "NotACheckpointError",
    "CheckpointMismatchError",
    "save",
    "load",
    "read",
]

#: the value of ``__metadata__["fastopt.format"]``
FORMAT = "fastopt.checkpoint"
#: the format version this module writes and the newest it reads
VERSION = 1

_KEY_FORMAT = "fastopt.format"
_KEY_VERSION = "fastopt.version"
_KEY_CONTENT = "fastopt.content"
_KEY_SHA = "fastopt.sha256"

# safetensors dtype -> NumPy dtype (little-endian), for the dtypes NumPy has
_NUMPY_OF = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
             "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
             "BOOL": "?"}
# item size of every safetensors dtype, to check the layout of files fastopt cannot decode
_ITEMSIZE = {**{code: np.dtype(t).itemsize for code, t in _NUMPY_OF.items()},
             "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}
_CODE_OF = {np.dtype(t).newbyteorder("=").str: code for code, t in _NUMPY_OF.items()}


class CheckpointError(ValueError):
    """A file that :func:`load` refuses (the base of the errors below)."""


class CorruptCheckpointError(CheckpointError):
    """The file is damaged: checksum mismatch, a header that does not parse, or offsets that
    do not match the data."""


class TruncatedCheckpointError(CorruptCheckpointError):
    """The file is shorter than its header says (an incomplete copy or write)."""


class NotACheckpointError(CheckpointError):
    """The file is a valid safetensors file but not a fastopt checkpoint this version reads."""


class CheckpointMismatchError(CheckpointError):
    """A valid checkpoint that does not fit: another optimizer class, other parameter groups
    or shapes, other schedulers, or state that ``load_state_dict`` refuses."""


def _qualname(obj):
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _is_torch_tensor(value):
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


# ---- encoding: Python values <-> JSON values and named arrays ---------------------------------

class _Encoder:
    """Turns a value into a JSON value, collecting its arrays as named tensors."""

    def __init__(self):
        self.tensors = {}  # name -> little-endian C-contiguous array
        self.codes = {}  # name -> safetensors dtype ("BF16" arrays are held as uint16 bits)

    def _add(self, array, path, where, code=None):
        """Name and hold ``array`` (``code`` given: the uint16 bits of a BF16 tensor)."""
        if code is None and _is_bfloat16(array.dtype):
            code, array = "BF16", array.view(np.uint16)  # stored as its bits
        elif code is None:
            code = _CODE_OF.get(array.dtype.newbyteorder("=").str)
        if code is None:
            raise TypeError(f"{where}: cannot store an array of dtype {array.dtype} in a "
                            "checkpoint (floating point, integer and bool arrays only)")
        name = ".".join(str(k) for k in path)
        base, n = name, 1
        while name in self.tensors:
            name, n = f"{base}~{n}", n + 1
        # np.asarray, not np.ascontiguousarray, which makes 0-d arrays 1-d
        self.tensors[name] = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        self.codes[name] = code
        return name

    def encode(self, value, path, where):
        if isinstance(value, np.ndarray):
            return {"tensor": self._add(value, path, where)}
        if isinstance(value, np.generic):  # before float: np.float64 is a float
            return {"scalar": self._add(np.asarray(value), path, where)}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            value = float(value)
            return value if math.isfinite(value) else {"float": repr(value)}
        if _is_torch_tensor(value):
            if value.layout is sys.modules["torch"].strided and value.device.type == "cpu":
                check_held(value, where)  # freed or shrunk: .numpy() would read past it
            try:
                t = value.detach().cpu()
                if str(t.dtype) == "torch.bfloat16":
                    # NumPy has no bfloat16: its bits, stored as BF16 (and loaded as an
                    # ml_dtypes.bfloat16 array)
                    import torch
                    bits = t.contiguous().view(torch.int16).numpy().view(np.uint16)
                    return {"tensor": self._add(bits, path, where, "BF16")}
                array = t.numpy()
            except (TypeError, RuntimeError) as e:
                raise TypeError(f"{where}: cannot store this tensor in a checkpoint: {e}"
                                ) from None
            return {"tensor": self._add(array, path, where)}
        if type(value) is list:
            return [self.encode(v, path + (i,), f"{where}[{i}]") for i, v in enumerate(value)]
        if type(value) is tuple:
            return {"tuple": [self.encode(v, path + (i,), f"{where}[{i}]")
                              for i, v in enumerate(value)]}
        tag = {dict: "dict", OrderedDict: "ordered_dict", Counter: "counter"}.get(type(value))
        if tag is not None:
            pairs = []
            for k, v in value.items():
                pairs.append([self.encode(k, path, f"{where} (a key)"),
                              self.encode(v, path + (k,), f"{where}[{k!r}]")])
            return {tag: pairs}
        raise TypeError(f"{where}: cannot store a {type(value).__module__}."
                        f"{type(value).__qualname__} in a checkpoint (arrays, numbers, "
                        "strings, None, and lists, tuples and dicts of them only)")


class _Malformed(Exception):
    pass


class _Decoder:
    """The inverse of :class:`_Encoder`, given the file's arrays by name."""

    _TAGS = {"tensor", "scalar", "tuple", "dict", "ordered_dict", "counter", "float"}

    def __init__(self, arrays):
        self.arrays = arrays
        self.used = set()

    def _array(self, name):
        if not isinstance(name, str) or name not in self.arrays:
            raise _Malformed(f"a reference to a tensor {name!r} that the file does not hold")
        if name in self.used:
            raise _Malformed(f"tensor {name!r} is referenced twice")
        self.used.add(name)
        return self.arrays[name]

    def decode(self, value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in self._TAGS):
            raise _Malformed(f"an unknown value {str(value)[:80]}")
        (tag, body), = value.items()
        if tag == "tensor":
            return self._array(body)
        if tag == "scalar":
            array = self._array(body)
            if array.ndim != 0:
                raise _Malformed(f"scalar {body!r} has shape {array.shape}")
            return array[()]
        if tag == "float":
            if body not in ("inf", "-inf", "nan"):
                raise _Malformed(f"an unknown float {body!r}")
            return float(body)
        if not isinstance(body, list):
            raise _Malformed(f"a {tag} that is not a list")
        if tag == "tuple":
            return tuple(self.decode(v) for v in body)
        out = {"dict": dict, "ordered_dict": OrderedDict, "counter": Counter}[tag]()
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _Malformed(f"a {tag} entry that is not a [key, value] pair")
            try:
                out[self.decode(pair[0])] = self.decode(pair[1])
            except TypeError as e:  # an unhashable key
                raise _Malformed(f"a {tag} key: {e}") from None
        return out


def _scheduler_state(scheduler, path, where, encoder):
    if scheduler is None:
        return None
    if isinstance(scheduler, (list, tuple)):
        return {"list": [_scheduler_state(s, path + (i,), f"{where}[{i}]", encoder)
                         for i, s in enumerate(scheduler)]}
    if isinstance(scheduler, dict):
        for k in scheduler:
            if not isinstance(k, str):
                raise TypeError(f"{where}: a dict of schedulers needs str keys, got {k!r}")
        return {"dict": [[k, _scheduler_state(s, path + (k,), f"{where}[{k!r}]", encoder)]
                         for k, s in scheduler.items()]}
    if not hasattr(scheduler, "state_dict") or not hasattr(scheduler, "load_state_dict"):
        raise TypeError(f"{where}: expected a scheduler (with state_dict and load_state_dict), "
                        f"a list or dict of them, or None; got {type(scheduler).__name__}")
    return {"class": _qualname(scheduler),
            "state_dict": encoder.encode(scheduler.state_dict(), path,
                                         f"{where}.state_dict()")}


def _digest(metadata, tensors):
    """The checksum of a file's contents (see the module docstring): ``metadata`` without
    the checksum entry, ``tensors`` maps each name to (dtype code, shape, raw bytes)."""
    h = hashlib.sha256()
    desc = {"metadata": metadata,
            "tensors": {name: {"dtype": code, "shape": list(shape)}
                        for name, (code, shape, _) in tensors.items()}}
    h.update(json.dumps(desc, sort_keys=True, separators=(",", ":"),
                        ensure_ascii=True).encode("ascii"))
    h.update(b"\n")
    for name in sorted(tensors):
        h.update(tensors[name][2])
    return h.hexdigest()


def _raw(array):
    """The bytes of a little-endian C-contiguous array, without a copy."""
    return array.reshape(-1).view(np.uint8)


# ---- writing ----------------------------------------------------------------------------------

def save(path: Union[str, os.PathLike[str]], optimizer: Optimizer,
         scheduler: Schedulers = None, extra: Any = None) -> None:
    """Write a checkpoint of ``optimizer`` (and ``scheduler``, and ``extra``) to ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write; an existing file is replaced atomically (see the module
        docstring): a crash leaves the old file or the new one, complete.
    optimizer : fastopt.Optimizer
        Its ``state_dict()`` is saved, with the shape and dtype of each parameter (checked
        by :func:`load`). The parameters themselves are not saved.
    scheduler : scheduler, list or dict of schedulers, or None
        Objects with ``state_dict()`` and ``load_state_dict()``; their state is saved.
    extra : object, optional
        Anything made of None, bools, ints, floats, strings, arrays (NumPy, or torch tensors,
        which load as NumPy arrays), NumPy scalars, and lists, tuples and dicts of those;
        :func:`load` returns it.

    Raises
    ------
    TypeError
        A value that cannot be stored, named by its key path; nothing is written then.
    OSError
        The file cannot be written; the previous file at ``path`` is unchanged.

    Notes
    -----
    Do not step the optimizer from another thread while it is saved: the checksum and the
    written bytes would disagree, and :func:`load` would refuse the file.
    """
    path = os.fspath(path)
    encoder = _Encoder()
    params = [[[list(map(int, p.shape)), str(getattr(p, "dtype", ""))] for p in g["params"]]
              for g in optimizer.param_groups]
    content = {
        "optimizer": _qualname(optimizer),
        "params": params,
        "state_dict": encoder.encode(optimizer.state_dict(), ("optimizer",),
                                     "optimizer.state_dict()"),
        "scheduler": _scheduler_state(scheduler, ("scheduler",), "scheduler", encoder),
        "extra": encoder.encode(extra, ("extra",), "extra"),
    }
    metadata = {
        _KEY_FORMAT: FORMAT,
        _KEY_VERSION: str(VERSION),
        _KEY_CONTENT: json.dumps(content, separators=(",", ":"), allow_nan=False),
    }
    tensors = {name: (encoder.codes[name], a.shape, _raw(a))
               for name, a in encoder.tensors.items()}
    metadata[_KEY_SHA] = _digest(metadata, tensors)

    header: Dict[str, Any] = {"__metadata__": metadata}
    order = sorted(tensors, key=lambda n: (-encoder.tensors[n].dtype.itemsize, n))
    offset = 0
    for name in order:
        code, shape, raw = tensors[name]
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + raw.size]}
        offset += raw.size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    chunks = [len(text).to_bytes(8, "little"), text] + [tensors[n][2] for n in order]
    _write_atomic(path, chunks)


def _temporary(path):
    """Create ``.<name>.<random>.tmp`` next to ``path``: (fd, its path). Mode 0o666 less
    the umask, as ``open`` gives; the mode of ``path`` when that exists."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            os.chmod(tmp, mode)
        return fd, tmp


def _write_atomic(path, chunks):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if os.name == "posix":  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# ---- reading ----------------------------------------------------------------------------------

def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _layout(path, data):
    """Parse and check the safetensors structure of ``data``: (metadata, {name: (code,
    shape, begin, end)}, start of the data section)."""
    size = len(data)
    if size < 8:
        raise TruncatedCheckpointError(
            f"{path}: truncated: {size} bytes, less than the 8-byte header length that starts "
            "a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > size - 8:
        raise TruncatedCheckpointError(
            f"{path}: truncated (or not a safetensors file): the header length says {n} "
            f"bytes, the file has {size - 8} after it")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"),
                            object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        raise CorruptCheckpointError(
            f"{path}: corrupted (or not a safetensors file): the header is not valid JSON "
            f"({e})") from None

    def bad(what):
        return CorruptCheckpointError(f"{path}: corrupted (or not a safetensors file): {what}")

    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not (isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ is not an object of strings")
    entries = {}
    for name, info in header.items():
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise bad(f"the header entry of tensor {name!r} is not "
                      "{dtype, shape, data_offsets}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _ITEMSIZE:
            raise bad(f"tensor {name!r} has an unknown dtype {code!r}")
        if not (isinstance(shape, list) and all(map(_is_count, shape))):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _ITEMSIZE[code]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {name!r} of dtype {code} and shape {shape} needs {nbytes} "
                      f"bytes, its data_offsets {offsets} span {offsets[1] - offsets[0]}")
        entries[name] = (code, tuple(shape), offsets[0], offsets[1])
    end = 0
    for name, (_, _, first, stop) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if first != end:
            raise bad(f"tensor {name!r} starts at byte {first} of the data, the previous "
                      f"tensor ends at {end}")
        end = stop
    start = 8 + n
    if start + end > size:
        raise TruncatedCheckpointError(
            f"{path}: truncated: the header describes {end} bytes of tensor data, the file "
            f"holds {size - start}")
    if start + end < size:
        raise bad(f"{size - start - end} bytes follow the last tensor")
    return metadata, entries, start


def read(path: Union[str, os.PathLike[str]]) -> Dict[str, Any]:
    """Read and check a checkpoint without loading it into anything.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save` (or by any safetensors writer, with fastopt's metadata).

    Returns
    -------
    dict
        ``"optimizer"`` (the class, as ``"module.Class"``), ``"params"`` (per group, each
        parameter's ``[shape, dtype]``), ``"state_dict"`` (the optimizer's state dict, with
        NumPy arrays), ``"scheduler"`` (None, ``{"class": ..., "state_dict": ...}``, or a list
        or dict of those, the structure that was saved) and ``"extra"``.

    Raises
    ------
    TruncatedCheckpointError, CorruptCheckpointError, NotACheckpointError
        See the module docstring.
    ImportError
        The file holds a ``BF16`` tensor (named in the message) and ml_dtypes is not
        installed.
    """
    out = _read(os.fspath(path))
    out["scheduler"] = _public_scheduler(out["scheduler"])
    return out


def _read(path):
    """:func:`read`, with the schedulers as :class:`_Saved` objects."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    metadata, entries, start = _layout(path, data)
    if not any(k.startswith("fastopt.") for k in metadata):
        raise NotACheckpointError(
            f"{path}: not a fastopt checkpoint: a safetensors file without fastopt's metadata")
    expected = metadata.get(_KEY_SHA)
    if not (isinstance(expected, str) and len(expected) == 64
            and all(c in "0123456789abcdef" for c in expected)):
        raise CorruptCheckpointError(
            f"{path}: corrupted: the checksum entry {_KEY_SHA!r} of the metadata is missing "
            "or damaged")
    raw = {name: (code, shape, data[start + b:start + e])
           for name, (code, shape, b, e) in entries.items()}
    actual = _digest({k: v for k, v in metadata.items() if k != _KEY_SHA}, raw)
    if actual != expected:
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch: the file is corrupted (its contents hash to "
            f"{actual[:16]}..., the file says {expected[:16]}...)")

    def foreign(what):
        return NotACheckpointError(f"{path}: not a fastopt checkpoint: {what}")

    if metadata.get(_KEY_FORMAT) != FORMAT:
        raise foreign(f"{_KEY_FORMAT} is {metadata.get(_KEY_FORMAT)!r}, not {FORMAT!r}")
    version = metadata.get(_KEY_VERSION, "")
    if not (version.isdigit() and version.isascii()):
        raise foreign(f"{_KEY_VERSION} is {version!r}, not a version number")
    if int(version) > VERSION:
        raise foreign(f"written in format version {version}; this fastopt reads versions up "
                      f"to {VERSION}")
    arrays = {}
    for name, (code, shape, view) in raw.items():
        if code == "BF16":
            arrays[name] = _bfloat16_array(path, name, view, shape)
            continue
        if code not in _NUMPY_OF:
            raise foreign(f"tensor {name!r} has dtype {code}, which fastopt does not write")
        dtype = np.dtype(_NUMPY_OF[code])
        arrays[name] = (np.frombuffer(view, dtype=dtype).reshape(shape)
                        .astype(dtype.newbyteorder("="), copy=True))
    try:
        content = json.loads(metadata.get(_KEY_CONTENT, ""), parse_constant=_no_constants)
        if not (isinstance(content, dict) and set(content) == {
                "optimizer", "params", "state_dict", "scheduler", "extra"}):
            raise _Malformed(f"{_KEY_CONTENT} does not have the keys of version {VERSION}")
        decoder = _Decoder(arrays)
        out = {key: decoder.decode(content[key]) for key in ("state_dict", "extra")}
        out["scheduler"] = _decode_scheduler(content["scheduler"], decoder)
        unused = sorted(set(arrays) - decoder.used)
        if unused:
            raise _Malformed(f"tensors {unused[:5]} are not part of the content")
        out["optimizer"] = content["optimizer"]
        out["params"] = content["params"]
        if not isinstance(out["optimizer"], str):
            raise _Malformed("the optimizer class is not a string")
        if not (isinstance(out["params"], list)
                and all(isinstance(g, list) and all(
                    isinstance(p, list) and len(p) == 2 and isinstance(p[0], list)
                    for p in g) for g in out["params"])):
            raise _Malformed("the parameter shapes are not lists of [shape, dtype]")
        sd = out["state_dict"]
        if not (isinstance(sd, dict) and isinstance(sd.get("param_groups"), list)
                and isinstance(sd.get("state"), dict)):
            raise _Malformed("the optimizer's state dict has no 'state' and 'param_groups'")
    except (ValueError, _Malformed) as e:
        raise foreign(f"its content is malformed: {e}") from None
    return out


def _bfloat16_array(path, name, view, shape):
    """The ml_dtypes.bfloat16 array of a BF16 tensor's little-endian bytes."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(f"{path}: tensor {name!r} has dtype BF16, which NumPy reads only "
                          "with ml_dtypes (pip install ml_dtypes)") from None
    bits = np.frombuffer(view, dtype="<u2").reshape(shape).astype(np.uint16, copy=True)
    return bits.view(ml_dtypes.bfloat16)


class _Saved:
    """One saved scheduler while loading: its class name and state dict."""

    def __init__(self, cls, state_dict):
        self.cls, self.state_dict = cls, state_dict


def _decode_scheduler(value, decoder):
    """The saved scheduler structure: None, a :class:`_Saved`, or a list or dict of them."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"list"} and isinstance(value["list"], list):
        return [_decode_scheduler(v, decoder) for v in value["list"]]
    if isinstance(value, dict) and set(value) == {"dict"} and isinstance(value["dict"], list):
        out = {}
        for pair in value["dict"]:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise _Malformed("a dict of schedulers with an entry that is not [name, ...]")
            out[pair[0]] = _decode_scheduler(pair[1], decoder)
        return out
    if (isinstance(value, dict) and set(value) == {"class", "state_dict"}
            and isinstance(value["class"], str)):
        return _Saved(value["class"], decoder.decode(value["state_dict"]))
    raise _Malformed(f"an unknown scheduler entry {str(value)[:80]}")


def _public_scheduler(saved):
    if isinstance(saved, list):
        return [_public_scheduler(s) for s in saved]
    if isinstance(saved, dict):
        return {k: _public_scheduler(s) for k, s in saved.items()}
    if isinstance(saved, _Saved):
        return {"class": saved.cls, "state_dict": saved.state_dict}
    return None


# ---- loading ----------------------------------------------------------------------------------

def _checked_schedulers(path, given, saved):
    """The (scheduler, state dict, where) triples of ``given`` and the checkpoint's
    ``saved`` schedulers, each state dict checked by its scheduler's ``_check_state_dict``
    (when it has one) before anything is loaded; CheckpointMismatchError naming the
    scheduler otherwise."""
    pairs: list = []
    _pair_schedulers(path, given, saved, "scheduler", pairs)
    for sched, sd, where in pairs:
        check = getattr(sched, "_check_state_dict", None)
        if check is not None:
            try:
                check(sd)
            except (ValueError, TypeError, KeyError) as e:
                raise CheckpointMismatchError(f"{path}: wrong schedulers: {where}: {e}") from None
    return pairs


def _pair_schedulers(path, given, saved, where, out):
    """Match the given scheduler structure with the saved one, collecting (scheduler, state
    dict, where) triples; CheckpointMismatchError where they differ."""
    def mismatch(what):
        return CheckpointMismatchError(f"{path}: wrong schedulers: {where} {what}")

    def kind(x):
        return ("nothing" if x is None else "a list of schedulers" if isinstance(x, (list, tuple))
                else "a dict of schedulers" if isinstance(x, dict) else "one scheduler")

    if kind(given) != kind(saved):
        raise mismatch(f"is {kind(given)}, the checkpoint holds {kind(saved)}")
    if given is None:
        return
    if isinstance(given, (list, tuple)):
        if len(given) != len(saved):
            raise mismatch(f"has {len(given)} schedulers, the checkpoint {len(saved)}")
        for i, (g, s) in enumerate(zip(given, saved)):
            _pair_schedulers(path, g, s, f"{where}[{i}]", out)
    elif isinstance(given, dict):
        if list(given) != list(saved):
            raise mismatch(f"has the names {list(given)}, the checkpoint {list(saved)}")
        for k in given:
            _pair_schedulers(path, given[k], saved[k], f"{where}[{k!r}]", out)
    elif saved.cls != _qualname(given):
        raise mismatch(f"is a {_qualname(given)}, the checkpoint holds a {saved.cls}")
    else:
        out.append((given, saved.state_dict, where))


def load(path: Union[str, os.PathLike[str]], optimizer: Optimizer,
         scheduler: Schedulers = None) -> Any:
    """Load a checkpoint written by :func:`save` into ``optimizer`` (and ``scheduler``).

    The file is read and checked completely, and matched against the optimizer and the
    schedulers, before anything changes; on any error they are left as they were.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint.
    optimizer : fastopt.Optimizer
        Of the class that was saved, with the same number of groups, parameters per group and
        parameter shapes (dtypes may differ: state is cast as ``load_state_dict`` does).
    scheduler : scheduler, list or dict of schedulers, or None
        The same structure and classes that were saved.

    Returns
    -------
    object
        The ``extra`` value that was saved (arrays as NumPy arrays).

    Raises
    ------
    TruncatedCheckpointError
        The file is shorter than its header says.
    CorruptCheckpointError
        The file is damaged (checksum mismatch, invalid header or layout).
    NotACheckpointError
        A valid safetensors file, but not a fastopt checkpoint (or of a newer format).
    CheckpointMismatchError
        A checkpoint of another optimizer class, other groups or shapes, other schedulers, or
        state that ``load_state_dict`` refuses.
    ImportError
        The file holds a ``BF16`` tensor (named in the message) and ml_dtypes is not
        installed.
    OSError
        The file cannot be read.
    """
    path = os.fspath(path)
    content = _read(path)

    def mismatch(what):
        return CheckpointMismatchError(f"{path}: wrong optimizer: {what}")

    name = _qualname(optimizer)
    if content["optimizer"] != name:
        raise mismatch(f"the checkpoint holds the state of a {content['optimizer']}, not of "
                       f"a {name}")
    saved, groups = content["params"], optimizer.param_groups
    if len(saved) != len(groups):
        raise mismatch(f"the checkpoint has {len(saved)} parameter groups, the optimizer "
                       f"{len(groups)}")
    for gi, (s, g) in enumerate(zip(saved, groups)):
        if len(s) != len(g["params"]):
            raise mismatch(f"param_groups[{gi}] has {len(s)} parameters in the checkpoint, "
                           f"{len(g['params'])} in the optimizer")
        for pi, ((shape, _), p) in enumerate(zip(s, g["params"])):
            if tuple(shape) != tuple(p.shape):
                raise mismatch(f"param_groups[{gi}]['params'][{pi}] has shape {tuple(shape)} "
                               f"in the checkpoint, {tuple(p.shape)} in the optimizer")
    pairs = _checked_schedulers(path, scheduler, content["scheduler"])

    before = optimizer.state, optimizer.param_groups
    try:
        optimizer.load_state_dict(content["state_dict"])
    except (ValueError, TypeError, KeyError) as e:
        raise mismatch(f"load_state_dict refuses the saved state: {e}") from None
    done = []
    try:
        for sched, sd, where in pairs:
            previous = sched.state_dict()
            try:
                sched.load_state_dict(sd)
            except (ValueError, TypeError, KeyError) as e:
                raise CheckpointMismatchError(f"{path}: wrong schedulers: {where}: {e}"
                                              ) from None
            done.append((sched, previous))
    except BaseException:
        for sched, previous in reversed(done):
            sched.load_state_dict(previous)
        optimizer.state, optimizer.param_groups = before
        raise
    return content["extra"]
