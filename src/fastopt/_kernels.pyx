# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Bindings between the Python optimizers and the C kernels in csrc/.

One generic path serves every per-element optimizer; nothing here is written per algorithm.
A class names its kernel (a line of csrc/kernels.def), its hyperparameters in the order of
the kernel's struct of doubles, and its state keys (see ``Optimizer``); ``Spec`` holds that
declaration. ``update`` runs a whole step: it freezes and checks every group, walks every
parameter once (``collect``), checking each parameter, gradient and state array it will
touch and recording raw pointers in one ``Plan`` per group and dtype, then checks with one
sort of their memory spans that no array the step writes shares memory with another array
of the step (``_check_spans``), so that it raises before anything is modified; it calls
back into Python only to create the state of parameters stepping for the first time; then
one GIL-free call to ``fo_step`` advances the step counters, computes the per-tensor scalars
(the kernel's ``prepare``) and runs the loops of all groups.
"""
cimport numpy as cnp
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem, PyDict_Next, PyDict_SetItem, PyDict_Size
from cpython.long cimport PyLong_FromUnsignedLong, PyLong_FromVoidPtr
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memset

import contextlib as _contextlib
import functools as _functools
import os as _os
import sys
import weakref as _weakref

import numpy as np

cnp.import_array()

cdef extern from "Python.h":
    PyObject *PyDict_SetDefault(object d, object key, object default) except NULL

cdef extern from *:
    """
    #ifndef FO_COMPILER
    #define FO_COMPILER "unknown"
    #endif
    #ifndef FO_KERNEL_FLAGS
    #define FO_KERNEL_FLAGS "unknown"
    #endif
    """
    const char *FO_COMPILER
    const char *FO_KERNEL_FLAGS

# Set by fastopt's Python layer: the Parameter class, an optional adapter for parameter
# objects that are not ndarrays (callable(obj) -> (array, grad array or None)), and one for
# state entries that are not ndarrays (callable(obj) -> (array, data pointer, version), or
# None for an object no adapter accepts).
_parameter_type = None
_foreign_param = None
_foreign_state = None
# called with the list of foreign parameters a step updated, after the update (torch: their
# autograd version counters are bumped, as an in-place op does; not before, so that a step
# that raises leaves them as they were)
_foreign_updated = None
# the torch adapter's cache of parameter views (id -> (weakref, data pointer, shape, array,
# strides or None)): the step reads a contiguous tensor's view from it without a call into
# Python, and asks the adapter (_foreign_param) on a miss
_tensor_views = None


cdef object _cached_tensor_view(object obj, bint wide=False):
    """The cached NumPy view of the contiguous tensor ``obj`` while its storage, shape and
    layout are those it was made for (the adapter's own test), else None. ``wide`` (the
    optimizers of fastopt.torch): also of a real tensor dense in another axis order
    (channels_last), viewed with its strides."""
    if _tensor_views is None:
        return None
    cdef PyObject *item = PyDict_GetItem(_tensor_views, PyLong_FromVoidPtr(<void *>obj))
    if item == NULL:
        return None
    cdef tuple e = <tuple>item
    # the shape is compared with the gradient's by the caller (torch keeps a gradient of
    # the parameter's shape), which falls back to the adapter when they differ
    if e[4] is None:
        if e[0]() is obj and obj.data_ptr() == e[1] and obj.is_contiguous():
            return e[3]
    elif (wide and cnp.PyArray_NDIM(<cnp.ndarray>e[3]) == len(<tuple>e[4])  # not complex
          and e[0]() is obj and obj.data_ptr() == e[1] and obj.shape == e[2]
          and obj.stride() == e[4]):
        return e[3]
    return None

# id(state object) -> (weakref, data pointer, version, array): the NumPy view of a state
# entry that is a foreign array (a torch tensor), kept while the object lives and its data
# pointer and version counter stay the same (``set_``, ``.data =`` and a growing ``resize_``
# move the data; ``resize_``, ``as_strided_`` and every in-place op bump the version), so a
# changed tensor is looked at afresh before it is used.
cdef dict _state_views = {}


cdef object _state_array(object obj, Py_ssize_t gi, Py_ssize_t pi, object name):
    """The ndarray of the state entry ``obj`` (``state[name]`` of the parameter): ``obj``
    itself, the cached view of a foreign array, or None when no adapter accepts ``obj``."""
    if cnp.PyArray_Check(obj):
        return obj
    if _foreign_state is None:
        return None
    cdef object key = PyLong_FromVoidPtr(<void *>obj)  # id(obj)
    cdef PyObject *item = PyDict_GetItem(_state_views, key)
    cdef tuple e
    if item != NULL:
        e = <tuple>item
        # the same live tensor over the same memory (set_, .data = and a growing resize_
        # move it) and not changed in place since (resize_, as_strided_ bump the version)
        if e[0]() is obj and obj.data_ptr() == e[1] and obj._version == e[2]:
            return e[3]
    try:
        found = _foreign_state(obj)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{_where(gi, pi)}: state[{name!r}]: {e}") from None
    if found is None:
        return None
    _state_views[key] = (_weakref.ref(obj, _functools.partial(_state_views.pop, key)),
                         found[1], found[2], found[0])
    return found[0]


cdef inline str _where(Py_ssize_t gi, Py_ssize_t pi):
    return f"param_groups[{gi}]['params'][{pi}]"


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b):
    cdef int k, nd = cnp.PyArray_NDIM(a)
    if nd != cnp.PyArray_NDIM(b):
        return False
    for k in range(nd):
        if cnp.PyArray_DIM(a, k) != cnp.PyArray_DIM(b, k):
            return False
    return True


cdef inline bint _usable(cnp.ndarray a):
    # C-contiguous, aligned, native byte order, writable
    return (cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_ISWRITEABLE(a))


cdef bint _dense(cnp.ndarray a):
    """Whether the elements of ``a`` fill one block of memory without gaps or overlaps, in
    some order of the axes (torch's "non-overlapping and dense"; strides >= 0): then the
    kernels can run over the block as over a flat array."""
    cdef int nd = cnp.PyArray_NDIM(a), k, j, m = 0
    cdef cnp.npy_intp dims[64]
    cdef cnp.npy_intp strides[64]
    cdef cnp.npy_intp d, s, expected = cnp.PyArray_ITEMSIZE(a)
    for k in range(nd):
        d = cnp.PyArray_DIM(a, k)
        if d == 0:
            return True
        if d == 1:
            continue
        s = cnp.PyArray_STRIDE(a, k)
        j = m
        while j > 0 and strides[j - 1] > s:  # insertion sort by stride
            strides[j] = strides[j - 1]
            dims[j] = dims[j - 1]
            j -= 1
        strides[j] = s
        dims[j] = d
        m += 1
    for k in range(m):
        if strides[k] != expected:
            return False
        expected *= dims[k]
    return True


cdef inline bint _same_layout(cnp.ndarray a, cnp.ndarray b):
    """Same shape, and the same strides along every axis longer than 1 (element k of the
    memory block of one is element k of the other's)."""
    cdef int k, nd = cnp.PyArray_NDIM(a)
    if not _same_shape(a, b):
        return False
    cdef cnp.npy_intp ia = cnp.PyArray_ITEMSIZE(a), ib = cnp.PyArray_ITEMSIZE(b)
    for k in range(nd):
        # in elements: arrays of different item sizes (8-bit state of a float32 parameter)
        if (cnp.PyArray_DIM(a, k) > 1
                and cnp.PyArray_STRIDE(a, k) * ib != cnp.PyArray_STRIDE(b, k) * ia):
            return False
    return True


# 16-bit parameters: float16 (NPY_FLOAT16), ml_dtypes.bfloat16 (a dtype registered by ml_dtypes,
# whose type number is learnt from the first such array seen: fastopt never imports ml_dtypes
# itself), and a torch bfloat16 tensor, which NumPy cannot hold: the torch adapter views it
# as int16, and only a foreign parameter's int16 view is read as bfloat16. They are stepped by
# the float32 loops (fo_tensor.storage).
cdef int _bf16_typenum = -1


cdef inline int _storage_of(int tn, bint foreign) noexcept:
    """FO_FMT_* of arrays of type number tn (FO_FMT_F32 for float64 too), or -1 for a type
    the kernels do not step."""
    if tn == cnp.NPY_FLOAT or tn == cnp.NPY_DOUBLE:
        return FO_STORAGE_NATIVE
    if tn == cnp.NPY_FLOAT16:
        return FO_FMT_F16
    if tn == _bf16_typenum or (foreign and tn == cnp.NPY_SHORT):
        return FO_FMT_BF16
    return -1


# ---- compressed state ------------------------------------------------------------------------
# A group's state_dtype, master_weights and stochastic_rounding keys (see Optimizer) choose how
# each state array of a float32 or 16-bit parameter is stored (fo_tensor.storage): a state
# array of format FO_FMT_Q8* is a uint8 array of codes with a float32 array of block scales,
# state[key + SCALE_SUFFIX]; master weights are state[MASTER_KEY].
SCALE_SUFFIX = "_absmax"
MASTER_KEY = "master_param"
STATE_DTYPES = (None, "float32", "bfloat16", "int8")
#: state arrays that hold non-negative values (the unsigned 8-bit code); the others are signed
UNSIGNED_STATE = frozenset(("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf",
                            "acc_delta"))
cdef enum:
    _SD_NONE = 0
    _SD_F32 = 1
    _SD_BF16 = 2
    _SD_INT8 = 3


cdef tuple _no_policy = (0, False, False, 0, 0)


cdef tuple _policy(dict group):
    """(state dtype _SD_*, master weights, stochastic rounding, min_8bit_size, rounding
    key) of ``group``; its keys are checked, and a group without them has the default."""
    sd = group.get("state_dtype")
    mw = group.get("master_weights", False)
    sr = group.get("stochastic_rounding", False)
    if sd is None and mw is False and sr is False:
        return _no_policy
    if sd not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {sd!r}")
    if type(mw) is not bool:
        raise TypeError(f"master_weights must be a bool, got {mw!r}")
    if type(sr) is not bool:
        raise TypeError(f"stochastic_rounding must be a bool, got {sr!r}")
    if sr and mw:
        raise ValueError("stochastic_rounding applies to bfloat16 values stored without "
                         "master weights: set master_weights=False or stochastic_rounding=False")
    min8 = group.get("min_8bit_size", 4096)
    if isinstance(min8, bool) or not isinstance(min8, int) or min8 < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {min8!r}")
    cdef uint64_t key = 0
    if sr:
        seed = group.get("rounding_seed", 0)
        count = group.get("rounding_step", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"rounding_seed must be an int, got {seed!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"rounding_step must be an int >= 0, got {count!r}")
        # the key of the step about to run (the count after it)
        key = _mix64(_mix64(<uint64_t>(seed & 0xffffffffffffffff)) ^ <uint64_t>(count + 1))
    return (STATE_DTYPES.index(sd), mw, sr, min8, key)


cdef inline uint64_t _mix64(uint64_t x) noexcept:
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x


cdef inline int _itemsize_fmt(int fmt) noexcept:
    return 1 if fmt == FO_FMT_Q8S or fmt == FO_FMT_Q8U else 4 if fmt == FO_FMT_F32 else 2


cdef str _fmt_text(int fmt):
    return ("float32", "float16", "bfloat16", "uint8 (8-bit codes)", "uint8 (8-bit codes)")[fmt]


cdef bint _fmt_matches(int fmt, cnp.ndarray a, bint tensor) noexcept:
    """Whether the state array ``a`` (the view of a tensor: ``tensor``) holds format fmt."""
    cdef int tn = cnp.PyArray_TYPE(a)
    if fmt == FO_FMT_F32:
        return tn == cnp.NPY_FLOAT
    if fmt == FO_FMT_F16:
        return tn == cnp.NPY_FLOAT16
    if fmt == FO_FMT_BF16:
        return tn == cnp.NPY_SHORT if tensor else (tn == _bf16_typenum and tn >= 0)
    return tn == cnp.NPY_UBYTE


cdef inline int _itemsize_of(int tn) noexcept:
    return 4 if tn == cnp.NPY_FLOAT else 8 if tn == cnp.NPY_DOUBLE else 2


cdef int _learn_bf16(cnp.ndarray a) except -1:
    """Record the type number of ml_dtypes.bfloat16 when ``a`` is such an array."""
    global _bf16_typenum
    dt = (<object>a).dtype
    if (_bf16_typenum < 0 and dt.name == "bfloat16" and dt.itemsize == 2
            and type(dt).__module__.split(".")[0] != "numpy"):
        _bf16_typenum = cnp.PyArray_TYPE(a)
    return 0


cdef str _dtype_text(cnp.ndarray p):
    """The dtype of the parameter array ``p`` in words: an int16 parameter array is the view
    of a torch bfloat16 tensor (no other int16 parameter reaches the kernels)."""
    return "bfloat16" if cnp.PyArray_TYPE(p) == cnp.NPY_SHORT else str((<object>p).dtype)


def check_param(obj, Py_ssize_t gi, Py_ssize_t pi, bint low_precision=False):
    """Raise unless ``obj`` (an ndarray) can be updated in place by the kernels; with
    ``low_precision``, float16 and bfloat16 arrays too (the per-element kernels step them)."""
    if low_precision and cnp.PyArray_Check(obj):
        _learn_bf16(obj)
    if (low_precision and cnp.PyArray_Check(obj)
            and _storage_of(cnp.PyArray_TYPE(<cnp.ndarray>obj), False) > FO_STORAGE_NATIVE):
        _check_param(obj, gi, pi, False, True)
        return
    _check_param(obj, gi, pi, False)


cdef inline int _check_param(cnp.ndarray a, Py_ssize_t gi, Py_ssize_t pi,
                             bint dense_ok, bint low=False, bint foreign=False) except -1:
    # dense_ok: a dense array in any axis order will do (the tensors of fastopt.torch); the
    # kernels then run over its memory block, and the gradient and state must share its
    # layout (see _check_grad and Plan._bind). low: 16-bit arrays too (_storage_of; foreign:
    # the int16 view of a torch bfloat16 tensor)
    if (cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_ISWRITEABLE(a)
            and (cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT or cnp.PyArray_TYPE(a) == cnp.NPY_DOUBLE)):
        return 0
    cdef int tn = cnp.PyArray_TYPE(a)
    if low and _bf16_typenum < 0:
        _learn_bf16(a)
    if not low or _storage_of(tn, foreign) <= FO_STORAGE_NATIVE:
        if (tn != cnp.NPY_FLOAT and tn != cnp.NPY_DOUBLE) or not cnp.PyArray_ISNOTSWAPPED(a):
            raise TypeError(f"{_where(gi, pi)}: fastopt optimizes float32 and float64 arrays "
                            f"in native byte order, got dtype {a.dtype}")
    elif not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"{_where(gi, pi)}: fastopt optimizes arrays in native byte order, "
                        f"got dtype {a.dtype}")
    if (dense_ok and _dense(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_ISWRITEABLE(a)):
        return 0
    if dense_ok and not _dense(a):
        raise ValueError(f"{_where(gi, pi)}: the parameter's memory is not one dense block "
                         f"(strides {(<object>a).strides} bytes for shape {(<object>a).shape})")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISALIGNED(a):
        raise ValueError(f"{_where(gi, pi)}: the parameter must be a C-contiguous, aligned "
                         f"array (wrap np.ascontiguousarray(x) instead)")
    if not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{_where(gi, pi)}: the parameter's array is read-only")
    return 0


cdef cnp.ndarray _check_grad(cnp.ndarray p, object g, Py_ssize_t gi, Py_ssize_t pi):
    if not cnp.PyArray_Check(g):
        if type(g).__name__ == "SparseGrad" or getattr(g, "is_sparse", False) is True:
            raise RuntimeError(f"{_where(gi, pi)}: this optimizer does not support sparse "
                               f"gradients, please consider SparseAdam instead")
        raise TypeError(f"{_where(gi, pi)}: .grad must be a numpy.ndarray or None, "
                        f"got {type(g).__name__}")
    cdef cnp.ndarray ga = <cnp.ndarray>g
    cdef int tn = cnp.PyArray_TYPE(p)
    if ((cnp.PyArray_TYPE(ga) != tn and not (
            # a 16-bit parameter takes float32 gradients too
            cnp.PyArray_TYPE(ga) == cnp.NPY_FLOAT and tn != cnp.NPY_DOUBLE
            and _storage_of(tn, True) > FO_STORAGE_NATIVE))
            or not cnp.PyArray_ISNOTSWAPPED(ga)):
        raise TypeError(f"{_where(gi, pi)}: .grad has dtype {ga.dtype}, the parameter "
                        f"{_dtype_text(p)}")
    if not _same_shape(p, ga):
        raise ValueError(f"{_where(gi, pi)}: .grad has shape {(<object>ga).shape}, the parameter "
                         f"{(<object>p).shape}")
    if cnp.PyArray_IS_C_CONTIGUOUS(p):
        if not (cnp.PyArray_IS_C_CONTIGUOUS(ga) and cnp.PyArray_ISALIGNED(ga)):
            ga = np.array(ga, order="C", copy=True)
    elif not (_same_layout(ga, p) and cnp.PyArray_ISALIGNED(ga)):
        # a dense parameter in another axis order (channels_last): a copy of the gradient
        # in the parameter's layout, so that both memory blocks match element for element
        out = np.empty_like(p, dtype=ga.dtype)
        np.copyto(out, ga)
        ga = out
    return ga


ctypedef struct _span:
    uintptr_t lo
    uintptr_t hi


cdef int _cmp_span(const void *a, const void *b) noexcept nogil:
    cdef uintptr_t x = (<_span *>a).lo, y = (<_span *>b).lo
    return (x > y) - (x < y)


cdef inline bint _overlap(cnp.ndarray a, cnp.ndarray b, bint allow_identical):
    """Whether the memory of two contiguous arrays overlaps (an identical extent counts
    only when allow_identical is false)."""
    cdef uintptr_t a0 = <uintptr_t>cnp.PyArray_DATA(a), b0 = <uintptr_t>cnp.PyArray_DATA(b)
    cdef uintptr_t a1 = a0 + <uintptr_t>cnp.PyArray_NBYTES(a)
    cdef uintptr_t b1 = b0 + <uintptr_t>cnp.PyArray_NBYTES(b)
    if a0 == a1 or b0 == b1:
        return False
    if allow_identical and a0 == b0 and a1 == b1:
        return False
    return a0 < b1 and b0 < a1


# ---- memory shared between the arrays of one step ----------------------------------------
#
# A step writes every parameter, state array, step counter and 0-d scalar state entry, and
# reads every gradient. ``update`` records the memory span of each array it collects and,
# before anything changes, sorts them once and sweeps: an array the step writes may share
# memory only with itself (a parameter listed twice sees its own state twice) or, for a
# parameter, with other parameters (overlapping views: the group then runs on one thread, in
# list order, as torch's loop does). Every other overlap is refused, naming both arrays. A
# gradient that is its own parameter (allowed, as in torch) counts as the parameter.

cdef enum:
    _ROLE_PARAM = 0
    _ROLE_GRAD = 1
    _ROLE_STATE = 2   # 2, 3, 4: the state arrays, in the kernel's order
    _ROLE_STEP = 5
    _ROLE_AUX = 6     # 6, 7: the 0-d scalar state entries
    _ROLE_SCALE = 8   # 8, 9, 10: the block scales of 8-bit state arrays
    _ROLE_MASTER = 11  # the float32 master weights
    _ROLE_BITS = 4    # _sinfo.tag = plan index << _ROLE_BITS | role
    _SORT_SMALL = 32  # below this many spans, insertion sort


ctypedef struct _sinfo:
    uintptr_t owner  # the parameter object: a parameter listed twice gives the same owner
    int32_t pi       # the index in its group
    int32_t tag


cdef class _Spans:
    """The memory spans [lo, hi) of the arrays of one step, what each array is (``info``),
    the plans they belong to, and the least and greatest start and the OR of all starts."""
    cdef uintptr_t *lo
    cdef uintptr_t *hi
    cdef _sinfo *info
    cdef Py_ssize_t n, cap
    cdef uintptr_t lo_min, lo_max, lo_or
    cdef list plans

    def __cinit__(self):
        self.lo = NULL
        self.hi = NULL
        self.info = NULL
        self.n = 0
        self.cap = 0
        self.lo_min = <uintptr_t>-1
        self.lo_max = 0
        self.lo_or = 0
        self.plans = []

    def __dealloc__(self):
        free(self.lo)
        free(self.hi)
        free(self.info)

    cdef int reserve(self, Py_ssize_t more) except -1:
        cdef Py_ssize_t cap = self.cap
        cdef void *mem
        if self.n + more <= cap:
            return 0
        while cap < self.n + more:
            cap = 256 if cap == 0 else 2 * cap
        mem = realloc(self.lo, cap * sizeof(uintptr_t))
        if mem == NULL:
            raise MemoryError()
        self.lo = <uintptr_t *>mem
        mem = realloc(self.hi, cap * sizeof(uintptr_t))
        if mem == NULL:
            raise MemoryError()
        self.hi = <uintptr_t *>mem
        mem = realloc(self.info, cap * sizeof(_sinfo))
        if mem == NULL:
            raise MemoryError()
        self.info = <_sinfo *>mem
        self.cap = cap
        return 0


cdef inline int _push(_Spans sp, void *data, uintptr_t nbytes, object owner, Py_ssize_t pi,
                      int plan, int role) except -1:
    cdef uintptr_t lo = <uintptr_t>data
    cdef Py_ssize_t k = sp.n
    if nbytes == 0:
        return 0
    if k == sp.cap:
        sp.reserve(1)
    sp.lo[k] = lo
    sp.hi[k] = lo + nbytes
    sp.info[k].owner = <uintptr_t><PyObject *>owner
    sp.info[k].pi = <int32_t>pi
    sp.info[k].tag = (plan << _ROLE_BITS) | role
    if lo < sp.lo_min:
        sp.lo_min = lo
    if lo > sp.lo_max:
        sp.lo_max = lo
    sp.lo_or |= lo
    sp.n = k + 1
    return 0


cdef inline int _bit_length(uint64_t x) noexcept nogil:
    cdef int n = 0
    while x:
        x >>= 1
        n += 1
    return n


cdef enum:
    _RADIX_BITS = 11  # the widest digit of the radix sort
    _RADIX_PASSES = 6  # enough passes for 64 bits


cdef inline void _scatter(const uint64_t *a, uint64_t *b, Py_ssize_t n, uint32_t *cnt,
                          int shift, uint64_t dmask) noexcept nogil:
    # one stable pass of the radix sort: a's keys into b by the digit at ``shift``
    cdef Py_ssize_t i, j
    cdef uint32_t pos = 0, c
    for j in range(<Py_ssize_t>dmask + 1):
        c = cnt[j]
        cnt[j] = pos
        pos += c
    for i in range(n):
        j = <Py_ssize_t>((a[i] >> shift) & dmask)
        b[cnt[j]] = a[i]
        cnt[j] += 1


cdef uint64_t *_sorted_by_address(_Spans sp, uint64_t *buf, uint32_t *count) noexcept nogil:
    """The spans' indices in the order of their start address (ties in index order), as the
    low ``ib`` bits of keys ``(lo - min lo) >> shift << ib | index``. ``buf`` holds 2 n keys,
    ``count`` _RADIX_PASSES << _RADIX_BITS counters. An LSD radix sort over the address bits
    that vary, its histograms counted while the keys are made; NULL when the key does not
    fit 64 bits (the caller then sorts another way)."""
    cdef Py_ssize_t i, j, n = sp.n
    cdef const uintptr_t *los = sp.lo
    cdef uintptr_t mn = sp.lo_min
    cdef uint64_t x, dmask
    cdef uint64_t *a = buf
    cdef uint64_t *b = buf + n
    cdef uint64_t *t
    cdef uint32_t *c1
    cdef int shift = 0, ib, ab, passes, width, p
    if sp.lo_or:  # bits below the coarsest alignment of all spans are 0 in every key
        while not (sp.lo_or >> shift) & 1:
            shift += 1
    ib = _bit_length(<uint64_t>(n - 1))
    ab = _bit_length(<uint64_t>((sp.lo_max - mn) >> shift))
    if ib + ab > 64:
        return NULL
    if n < _SORT_SMALL:
        for i in range(n):
            a[i] = (<uint64_t>((los[i] - mn) >> shift) << ib) | <uint64_t>i
        for i in range(1, n):
            x = a[i]
            j = i - 1
            while j >= 0 and a[j] > x:
                a[j + 1] = a[j]
                j -= 1
            a[j + 1] = x
        return a
    passes = (ab + _RADIX_BITS - 1) // _RADIX_BITS
    width = (ab + passes - 1) // passes if passes else 0
    dmask = (<uint64_t>1 << width) - 1
    for j in range(passes << width):
        count[j] = 0
    if passes == 2:  # the usual case: addresses within 2^22 words
        c1 = count + (1 << width)
        for i in range(n):
            x = (<uint64_t>((los[i] - mn) >> shift) << ib) | <uint64_t>i
            a[i] = x
            count[(x >> ib) & dmask] += 1
            c1[(x >> (ib + width)) & dmask] += 1
    else:
        for i in range(n):
            x = (<uint64_t>((los[i] - mn) >> shift) << ib) | <uint64_t>i
            a[i] = x
            x >>= ib
            for p in range(passes):
                count[(p << width) + <Py_ssize_t>(x & dmask)] += 1
                x >>= width
    for p in range(passes):
        _scatter(a, b, n, count + (p << width), ib + p * width, dmask)
        t = a
        a = b
        b = t
    return a


ctypedef struct _skey:
    uintptr_t lo
    uint64_t idx


cdef int _cmp_skey(const void *a, const void *b) noexcept nogil:
    cdef const _skey *x = <const _skey *>a
    cdef const _skey *y = <const _skey *>b
    if x.lo != y.lo:
        return -1 if x.lo < y.lo else 1
    return (x.idx > y.idx) - (x.idx < y.idx)


cdef str _span_name(_Spans sp, Py_ssize_t i, bint lead):
    """Array ``i`` of the step in words: the parameter, its gradient or a state entry
    (``lead``: at the start of a message)."""
    cdef Plan plan = <Plan>sp.plans[sp.info[i].tag >> _ROLE_BITS]
    cdef int role = sp.info[i].tag & ((1 << _ROLE_BITS) - 1)
    where = _where(plan.gi, sp.info[i].pi)
    if role == _ROLE_PARAM:
        return where
    if role == _ROLE_GRAD:
        return where + ".grad"
    if role == _ROLE_STEP:
        key = "step"
    elif role == _ROLE_MASTER:
        key = MASTER_KEY
    elif role >= _ROLE_SCALE:
        key = plan.keys[role - _ROLE_SCALE] + SCALE_SUFFIX
    elif role >= _ROLE_AUX:
        key = plan.scalars[role - _ROLE_AUX]
    else:
        key = plan.keys[role - _ROLE_STATE]
    return f"{where}: state[{key!r}]" if lead else f"{where}'s state[{key!r}]"


cdef tuple _rank(_Spans sp, Py_ssize_t i):
    # a gradient is named first, then a state entry, then a parameter; among equals the one
    # listed later
    cdef int role = sp.info[i].tag & ((1 << _ROLE_BITS) - 1)
    return (2 if role == _ROLE_GRAD else 0 if role == _ROLE_PARAM else 1,
            (<Plan>sp.plans[sp.info[i].tag >> _ROLE_BITS]).gi, sp.info[i].pi, role)


cdef int _shared(_Spans sp, Py_ssize_t a, Py_ssize_t b) except -1:
    if _rank(sp, b) > _rank(sp, a):
        a, b = b, a
    raise ValueError(f"{_span_name(sp, a, True)} shares memory with {_span_name(sp, b, False)}; "
                     f"a step writes every parameter and state array, so none of them may "
                     f"share memory with another array of the step")


cdef int _sweep(_Spans sp, const uint64_t *order, uint64_t mask) except -1:
    """The spans in address order (indices order[k] & mask): raise for the first overlap
    the step cannot run in a defined order; mark plans with overlapping parameters serial."""
    cdef Py_ssize_t k, i, m
    cdef uintptr_t lo, hi, hi_all = 0, hi_write = 0, hi_param = 0, hi_grad = 0
    cdef Py_ssize_t at_all = 0, at_write = 0, at_param = 0, at_grad = 0
    cdef int role
    cdef int rmask = (1 << _ROLE_BITS) - 1
    for k in range(sp.n):
        i = <Py_ssize_t>(order[k] & mask)
        lo = sp.lo[i]
        hi = sp.hi[i]
        role = sp.info[i].tag & rmask
        if role == _ROLE_PARAM:
            if hi_write > lo:
                _shared(sp, i, at_write)
            if hi_grad > lo:
                _shared(sp, i, at_grad)
            if hi_param > lo:
                (<Plan>sp.plans[sp.info[i].tag >> _ROLE_BITS]).serial = 1
            if hi > hi_param:
                hi_param = hi
                at_param = i
        elif role == _ROLE_GRAD:
            if hi_write > lo:
                _shared(sp, i, at_write)
            if hi_param > lo:
                _shared(sp, i, at_param)
            if hi > hi_grad:
                hi_grad = hi
                at_grad = i
        else:
            if hi_all > lo:
                m = at_all
                # the same array of the same parameter (listed twice) is fine
                if not (sp.lo[m] == lo and sp.hi[m] == hi
                        and sp.info[m].owner == sp.info[i].owner
                        and (sp.info[m].tag & rmask) == role):
                    _shared(sp, i, m)
            if hi > hi_write:
                hi_write = hi
                at_write = i
        if hi > hi_all:
            hi_all = hi
            at_all = i
    return 0


cdef int _check_spans(_Spans sp) except -1:
    """Sort the spans of the step by address and sweep (see above); the usual step, where no
    two arrays share memory, takes one pass after the sort."""
    cdef Py_ssize_t n = sp.n, k
    cdef uint64_t *buf
    cdef uint64_t *order
    cdef uint64_t mask
    cdef uintptr_t hi = 0
    cdef const uintptr_t *his = sp.hi
    cdef _skey *keys
    cdef bint overlap = False
    if n < 2:
        return 0
    buf = <uint64_t *>malloc(2 * n * sizeof(uint64_t)
                             + (_RADIX_PASSES << _RADIX_BITS) * sizeof(uint32_t))
    if buf == NULL:
        raise MemoryError()
    try:
        order = _sorted_by_address(sp, buf, <uint32_t *>(buf + 2 * n))
        if order != NULL:
            mask = (<uint64_t>1 << _bit_length(<uint64_t>(n - 1))) - 1
        else:  # addresses too far apart to pack with the index (not on usual systems)
            keys = <_skey *>malloc(n * sizeof(_skey))
            if keys == NULL:
                raise MemoryError()
            for k in range(n):
                keys[k].lo = sp.lo[k]
                keys[k].idx = k
            qsort(keys, n, sizeof(_skey), _cmp_skey)
            for k in range(n):
                buf[k] = keys[k].idx
            free(keys)
            order = buf
            mask = ~(<uint64_t>0)
        for k in range(n):
            if sp.lo[order[k] & mask] < hi:
                overlap = True
                break
            if his[order[k] & mask] > hi:
                hi = his[order[k] & mask]
        if overlap:
            _sweep(sp, order, mask)
    finally:
        free(buf)
    return 0


cdef enum:
    MAX_HYPER = 16  # the most doubles a kernel's hyperparameter struct may hold


def kernel_names():
    """The names of the C kernels, in the order of csrc/kernels.def."""
    return [fo_kernel_info(k).name.decode() for k in range(FO_KERNEL_COUNT)]


cdef int _kernel_id(str name) except -1:
    cdef int k = fo_kernel_find(name.encode())
    if k < 0:
        raise ValueError(f"no C kernel named {name!r}; the kernels are {kernel_names()}")
    return k


cdef class Spec:
    """What the generic step needs to know of an optimizer class: its kernel, the group keys
    packed as the kernel's hyperparameters, and its state.

    Parameters
    ----------
    kernel : str
        A kernel name from csrc/kernels.def.
    hyperparameters : tuple of str
        Group keys in the order of the kernel's struct; a tuple value (betas) gives one
        double per entry, a bool 0 or 1.
    state_keys : tuple
        The per-element state arrays, in the kernel's state[] order: a key, or (key, flag)
        for one that exists only while ``group[flag]`` is true (AMSGrad's max_exp_avg_sq),
        or (key, flag, "positive") for one that exists only while ``group[flag] > 0``
        (RMSprop's momentum_buffer, as torch tests it).
    step_counter : bool
        Whether the state holds torch's float32 ``step`` counter.
    scalars : tuple of str
        0-d float32 state entries the kernel's prepare reads and updates (fo_tensor.aux).
    lazy : bool
        SGD's rule: the single state array is created when missing and takes the gradient
        on that step; without an active state key the parameter has no state at all.
    nonneg_at_step : tuple of str
        Keys that must be >= 0 at every step (beyond ``betas[1]``, always checked).
    beta1_division : bool
        Whether the update divides by :math:`1 - \\beta_1^t` (Adam's bias correction):
        then ``betas[0] == 1`` raises ZeroDivisionError, as torch's step does.
    """
    cdef readonly int kernel
    cdef readonly int nhyper
    cdef readonly tuple hyperparameters, state_keys, scalars, nonneg_at_step
    cdef readonly bint step_counter, lazy, beta1_division
    #: set by Optimizer for a class that overrides _check_step: update then calls it
    cdef public bint custom_check
    #: foreign parameters may be dense in any axis order, and complex (their real view)
    cdef public bint wide
    #: sparse gradients go to ``opt._sparse_step`` instead of raising (see ``update``)
    cdef public bint sparse_ok

    def __init__(self, str kernel, tuple hyperparameters, tuple state_keys, bint step_counter,
                 tuple scalars=(), bint lazy=False, tuple nonneg_at_step=(),
                 bint beta1_division=False):
        self.kernel = _kernel_id(kernel)
        self.nhyper = fo_kernel_info(self.kernel).nhyper
        if self.nhyper > MAX_HYPER:
            raise ValueError(f"kernel {kernel!r} has {self.nhyper} hyperparameters; at most "
                             f"{MAX_HYPER} are supported")
        if len(state_keys) > 3 or len(scalars) > 2:
            raise ValueError("a kernel takes at most 3 state arrays and 2 scalar entries")
        if lazy and len(state_keys) != 1:
            raise ValueError("a lazy state has exactly one state array")
        self.hyperparameters = hyperparameters
        self.state_keys = state_keys
        self.step_counter = step_counter
        self.scalars = scalars
        self.lazy = lazy
        self.nonneg_at_step = nonneg_at_step
        self.beta1_division = beta1_division
        self.custom_check = False
        self.wide = False
        self.sparse_ok = False

    cpdef tuple layout(self, dict group):
        """The state keys in the kernel's order, None for one whose condition is off."""
        cdef list keys = []
        cdef tuple e
        for entry in self.state_keys:
            if type(entry) is tuple:
                e = <tuple>entry
                value = group[e[1]]
                on = value > 0 if len(e) > 2 and e[2] == "positive" else bool(value)
                keys.append(e[0] if on else None)
            else:
                keys.append(entry)
        return tuple(keys)

    cdef int init_mode(self, tuple keys):
        # 0: a parameter with empty state needs new state; 1: one whose state lacks keys[0]
        # does (SGD's momentum buffer); 2: the parameter has no state at all
        if not self.lazy:
            return 0
        return 1 if keys[0] is not None else 2

    cdef int pack(self, dict frozen, double *out) except -1:
        """The frozen group's hyperparameters as the kernel's doubles. Values the freeze did
        not convert (a sequence or array of betas, a number given where the defaults had
        none) are converted here, with the key named when that fails."""
        cdef int n = 0
        cdef Py_ssize_t j
        cdef list values = []
        for key in self.hyperparameters:
            value = frozen[key]
            t = type(value)
            if t is float or t is bool:
                values.append(value)
            elif t is tuple or t is list or (cnp.PyArray_Check(value)
                                             and cnp.PyArray_SIZE(<cnp.ndarray>value) != 1):
                for j, item in enumerate(value):
                    values.append(item if type(item) is float else _as_real(item, f"{key}[{j}]"))
            else:
                values.append(_as_real(value, key))
        n = len(values)
        if n != self.nhyper:
            raise TypeError(f"the hyperparameters {self.hyperparameters} give {n} numbers; "
                            f"the kernel {fo_kernel_info(self.kernel).name.decode()!r} takes "
                            f"{self.nhyper}")
        for j in range(n):
            out[j] = values[j]
        for j in range(n, MAX_HYPER):
            out[j] = 0.0
        return 0


def check_frozen(dict frozen, tuple nonneg_at_step, bint beta1_division=False):
    """The checks of every step (see Optimizer._check_step): ``betas[1]`` in [0, 1) (a
    second-moment decay outside it takes the square root of a negative number),
    ``betas[0]`` not 1 where the update divides by :math:`1 - \\beta_1^t`
    (ZeroDivisionError, as torch), and the keys that must stay >= 0. Any other
    ``betas[0]`` steps, as in torch: a scheduler cycling momentum may write one outside
    [0, 1) (``OneCycleLR(max_momentum=...)``)."""
    betas = frozen.get("betas")
    if betas is not None:
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if beta1_division and betas[0] == 1.0:
            raise ZeroDivisionError(f"float division by zero: betas[0] is 1.0, so the bias "
                                    f"correction 1 - betas[0] ** step is 0")
        if betas[0] != betas[0]:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    for key in nonneg_at_step:
        if not frozen[key] >= 0:
            raise ValueError(f"Invalid {key} value: {frozen[key]}")


cdef inline int _check_scalar(object obj, Py_ssize_t gi, Py_ssize_t pi, object key) except -1:
    if (obj is None or not cnp.PyArray_Check(obj)
            or cnp.PyArray_TYPE(<cnp.ndarray>obj) != cnp.NPY_FLOAT
            or cnp.PyArray_SIZE(<cnp.ndarray>obj) != 1 or not _usable(<cnp.ndarray>obj)):
        raise TypeError(f"{_where(gi, pi)}: state[{key!r}] must be a writable 0-d float32 "
                        f"array, got {obj!r}")
    return 0


cdef extern from "Python.h":
    ctypedef struct PyDictObject:
        void *ma_keys
    Py_hash_t PyObject_Hash(object o) except? -1
    void PyErr_Clear()
    PyObject *PyList_GET_ITEM(object lst, Py_ssize_t i)
    PyObject *PyTuple_GET_ITEM(object t, Py_ssize_t i)
    Py_ssize_t PyTuple_GET_SIZE(object t)
    bint PyTuple_Check(object o)
    bint PyDict_Check(object o)
    Py_ssize_t PyList_GET_SIZE(object lst)

cdef extern from *:
    """
    /* the value of the attribute whose descriptor is d (a getset descriptor of a C type),
       without looking the name up */
    static inline PyObject *fo_descr_get(PyObject *d, PyObject *obj)
    {
        descrgetfunc f = Py_TYPE(d)->tp_descr_get;
        if (f == NULL) { PyErr_SetString(PyExc_TypeError, "not a descriptor"); return NULL; }
        return f(d, obj, (PyObject *)Py_TYPE(obj));
    }
    /* d[key] (borrowed; NULL when missing or on error) where hash(key) is known to be h:
       no call of the key's __hash__ (a Python function for a tensor). The lookup with a
       known hash is private to CPython, so it is used before 3.13 only; from 3.13 on the
       key's hash is computed. */
    /* the version tag of the dict d (PEP 509): CPython gives a dict a new one, unique in
       the process, whenever an item is added, removed or replaced by another object. 0 (no
       tag: the items must be looked up) from 3.14 on, where the field is gone. */
    static inline uint64_t fo_dict_version(PyObject *d)
    {
    #if PY_VERSION_HEX < 0x030E0000
    #if defined(__GNUC__) || defined(__clang__)
    #pragma GCC diagnostic push
    #pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    #endif
        return ((PyDictObject *)d)->ma_version_tag;
    #if defined(__GNUC__) || defined(__clang__)
    #pragma GCC diagnostic pop
    #endif
    #else
        (void)d;
        return 0;
    #endif
    }
    static inline PyObject *fo_dict_get_hashed(PyObject *d, PyObject *key, Py_hash_t h)
    {
    #if PY_VERSION_HEX < 0x030D0000
        return _PyDict_GetItem_KnownHash(d, key, h);
    #else
        (void)h;
        return PyDict_GetItemWithError(d, key);
    #endif
    }
    /* a hint that the memory at a & ~3 is read soon: (a & 3) + 1 lines of 64 bytes from
       there. A prefetch never faults: a stale or wrong address costs only the hint. */
    static inline void fo_prefetch_lines(uintptr_t a)
    {
    #if defined(__GNUC__) || defined(__clang__)
        const char *p = (const char *)(a & ~(uintptr_t)3);
        int k, n = (int)(a & 3);
        for (k = 0; k <= n; k++)
            __builtin_prefetch(p + 64 * k);
    #else
        (void)a;
    #endif
    }
    /* the same hint for the n bytes at p, line by line */
    static inline void fo_prefetch_span(const void *p, size_t n)
    {
    #if defined(__GNUC__) || defined(__clang__)
        const char *c = (const char *)((uintptr_t)p & ~(uintptr_t)63);
        const char *end = (const char *)p + n;
        for (; c < end; c += 64)
            __builtin_prefetch(c);
    #else
        (void)p; (void)n;
    #endif
    }
    """
    void fo_prefetch_lines(uintptr_t a) noexcept nogil
    void fo_prefetch_span(const void *p, size_t n) noexcept nogil

cdef extern from *:
    """
    /* torch's tensor objects read in place. Where the layout probe below has found, for the
       torch that is loaded, where a tensor object keeps its TensorImpl, and where a TensorImpl
       and its StorageImpl keep the fields the checks of the cached step need, those checks
       read the fields instead of calling the tensor's Python methods. A stable tensor (a
       parameter, a state tensor) is compared byte for byte with a snapshot of its TensorImpl
       and StorageImpl fields taken when the full path accepted it; a gradient (new at every
       backward) has its sizes, strides, dtype, device, flags and dispatch keys compared with
       those of the parameter and of the gradient the full path accepted, and its data pointer
       computed as torch's data_ptr() does. A check that does not pass in place falls back to
       the method calls (the bit fields of a TensorImpl share their bytes with bits no
       constructor sets, so a gradient's flags are not compared: its dispatch keys, dtype and
       device decide). Offsets are byte offsets. */
    #if defined(__GLIBC__)
    #include <malloc.h>
    #define FO_USABLE(p) malloc_usable_size((void *)(p))
    #else
    #define FO_USABLE(p) ((size_t)0)
    #endif
    typedef struct {
        int ok;
        size_t po;                 /* tensor object: the TensorImpl pointer */
        size_t storage, ndim, sizes, strides, offset, numel, end;  /* TensorImpl */
        size_t sdata, snbytes, sflags, send;                       /* StorageImpl */
        uintptr_t tmask[4];        /* the bits of the tail [numel + 8, end) compared */
        uintptr_t sthrow;          /* the bits of the storage flags word that make torch
                                      refuse (or warn at) an access to the data */
        int maxdim;                /* dimensions kept inline (sizes and strides) */
        size_t snap;               /* bytes of one snapshot */
        size_t vc, vv;             /* the TensorImpl's version counter pointer (inside
                                      [storage, end), so a snapshot holds it), and the
                                      counter's 32-bit version in the block it points at;
                                      vc 0: bumped by torch's call */
        size_t am;                 /* the TensorImpl's autograd metadata pointer, inside
                                      [storage, end) (0: not found) */
        size_t ag;                 /* the autograd metadata's gradient (a TensorImpl
                                      pointer, gundef when there is none), and the
                                      TensorImpl's tensor object (NULL until Python first
                                      sees it); ag 0: gradients are read by torch's getter */
        uintptr_t gundef;
        size_t pyo;
    } fo_tlayout;
    static fo_tlayout fo_tl;

    static inline uintptr_t fo_word(uintptr_t a) { return *(const uintptr_t *)a; }
    static inline uint32_t fo_u32(uintptr_t a)
    {
        uint32_t v;
        memcpy(&v, (const void *)a, sizeof v);
        return v;
    }
    static inline size_t fo_usable(uintptr_t a) { return FO_USABLE(a); }
    static inline size_t fo_tl_tail(void) { return fo_tl.end - fo_tl.numel - 8; }

    /* A snapshot: the TensorImpl and StorageImpl pointers, then the TensorImpl bytes
       [storage, end), then the StorageImpl bytes [sdata, send). */
    static inline int fo_snap_take(PyObject *obj, unsigned char *s)
    {
        uintptr_t impl = fo_word((uintptr_t)obj + fo_tl.po), si;
        size_t wt = fo_tl.end - fo_tl.storage;
        if (impl == 0 || (si = fo_word(impl + fo_tl.storage)) == 0)
            return 0;
        memcpy(s, &impl, sizeof impl);
        memcpy(s + 8, &si, sizeof si);
        memcpy(s + 16, (const void *)(impl + fo_tl.storage), wt);
        memcpy(s + 16 + wt, (const void *)(si + fo_tl.sdata), fo_tl.send - fo_tl.sdata);
        return 1;
    }
    /* whether the tensor object obj still has the TensorImpl and the fields of snapshot s */
    static inline int fo_snap_same(PyObject *obj, const unsigned char *s)
    {
        uintptr_t impl = fo_word((uintptr_t)obj + fo_tl.po), si;
        size_t wt = fo_tl.end - fo_tl.storage;
        memcpy(&si, s, sizeof si);
        if (impl != si || memcmp((const void *)(impl + fo_tl.storage), s + 16, wt) != 0)
            return 0;
        memcpy(&si, s + 8, sizeof si);  /* the storage_ field, unchanged with the bytes */
        return memcmp((const void *)(si + fo_tl.sdata), s + 16 + wt,
                      fo_tl.send - fo_tl.sdata) == 0;
    }
    /* The version counter block of the tensor of snapshot s (0: it has none, an inference
       tensor's), and the bump of its version as torch's in-place ops make it (an atomic
       increment of a 32-bit counter). */
    static inline uintptr_t fo_snap_counter(const unsigned char *s)
    {
        uintptr_t c;
        memcpy(&c, s + 16 + (fo_tl.vc - fo_tl.storage), sizeof c);
        return c;
    }
    static inline void fo_counter_bump(uintptr_t c)
    {
        __atomic_add_fetch((uint32_t *)(c + fo_tl.vv), 1u, __ATOMIC_SEQ_CST);
    }
    static inline void fo_prefetch_write(uintptr_t a)
    {
    #if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch((const void *)a, 1);
    #else
        (void)a;
    #endif
    }
    /* the data pointer of the tensor of snapshot s, as torch's data_ptr() computes it */
    static inline uintptr_t fo_snap_data(const unsigned char *s, int64_t itemsize)
    {
        const unsigned char *t = s + 16 - fo_tl.storage;  /* TensorImpl offset k at t + k */
        uintptr_t d;
        int64_t off;
        memcpy(&d, s + 16 + (fo_tl.end - fo_tl.storage), sizeof d);
        memcpy(&off, t + fo_tl.offset, sizeof off);
        return d + (uintptr_t)off * (uintptr_t)itemsize;
    }
    /* whether the storage of the tensor t, read in place, holds its numel elements of
       itemsize bytes from its storage offset (a dense tensor: they fill one block) */
    static inline int fo_storage_holds(PyObject *t, int64_t numel, int64_t itemsize)
    {
        uintptr_t impl = fo_word((uintptr_t)t + fo_tl.po), si;
        int64_t off, nb;
        if (impl == 0 || (si = fo_word(impl + fo_tl.storage)) == 0)
            return 0;
        if (numel == 0)
            return 1;
        memcpy(&off, (const void *)(impl + fo_tl.offset), sizeof off);
        memcpy(&nb, (const void *)(si + fo_tl.snbytes), sizeof nb);
        return fo_word(si + fo_tl.sdata) != 0 && off >= 0 && nb >= 0
               && numel <= nb / itemsize && off <= nb / itemsize - numel;
    }
    /* The gradient of the tensor whose TensorImpl is impl, read in place (fo_tl.ag): its
       TensorImpl, 0 when it has none (.grad is None), and in *obj the word where it keeps
       its tensor object: NULL when Python has not seen it yet (a gradient made by
       backward), else the object's address (a word not aligned as an object is, which a
       torch might keep there, is no address: the caller reads it by torch's getter). */
    static inline uintptr_t fo_grad_of(uintptr_t impl, PyObject **obj)
    {
        uintptr_t m = fo_word(impl + fo_tl.am), g;
        *obj = NULL;
        if (m == 0)
            return 0;
        g = fo_word(m + fo_tl.ag);
        if (g == fo_tl.gundef || g == 0)
            return 0;
        *obj = (PyObject *)fo_word(g + fo_tl.pyo);
        return g;
    }
    /* The gradient whose TensorImpl is gi read in place: 1 and its data pointer in *data
       when it has the sizes and strides of the parameter's snapshot ps (ndim of them), numel
       elements of itemsize bytes inside a storage that allows access to them, and the dtype,
       device and dispatch keys of the tail gtail of the gradient the full path accepted; 0
       otherwise. fo_grad_read: the same of the gradient tensor object g. */
    static inline int fo_grad_read_impl(uintptr_t gi, const unsigned char *ps, int64_t ndim,
                                        const unsigned char *gtail, int64_t numel,
                                        int64_t itemsize, uintptr_t *data)
    {
        const unsigned char *pt = ps + 16 - fo_tl.storage;
        uintptr_t si, d, a, b;
        int64_t v, off, nb;
        size_t k;
        if (gi == 0)
            return 0;
        memcpy(&v, (const void *)(gi + fo_tl.ndim), sizeof v);
        if (v != ndim
                || memcmp((const void *)(gi + fo_tl.sizes), pt + fo_tl.sizes,
                          (size_t)ndim * 8) != 0
                || memcmp((const void *)(gi + fo_tl.strides), pt + fo_tl.strides,
                          (size_t)ndim * 8) != 0)
            return 0;
        memcpy(&v, (const void *)(gi + fo_tl.numel), sizeof v);
        if (v != numel)
            return 0;
        for (k = 0; k < fo_tl_tail() / 8; k++) {
            a = fo_word(gi + fo_tl.numel + 8 + 8 * k);
            memcpy(&b, gtail + 8 * k, sizeof b);
            if ((a ^ b) & fo_tl.tmask[k])
                return 0;
        }
        si = fo_word(gi + fo_tl.storage);
        if (si == 0 || (fo_word(si + fo_tl.sflags) & fo_tl.sthrow) != 0)
            return 0;
        memcpy(&off, (const void *)(gi + fo_tl.offset), sizeof off);
        memcpy(&nb, (const void *)(si + fo_tl.snbytes), sizeof nb);
        d = fo_word(si + fo_tl.sdata);
        if (numel == 0) {
            *data = d;
            return 1;
        }
        if (d == 0 || off < 0 || nb < 0 || numel > nb / itemsize
                || off > nb / itemsize - numel)
            return 0;
        *data = d + (uintptr_t)off * (uintptr_t)itemsize;
        return 1;
    }
    static inline int fo_grad_read(PyObject *g, const unsigned char *ps, int64_t ndim,
                                   const unsigned char *gtail, int64_t numel,
                                   int64_t itemsize, uintptr_t *data)
    {
        return fo_grad_read_impl(fo_word((uintptr_t)g + fo_tl.po), ps, ndim, gtail, numel,
                                 itemsize, data);
    }
    """
    ctypedef struct fo_tlayout:
        int ok
        size_t po
        size_t storage, ndim, sizes, strides, offset, numel, end
        size_t sdata, snbytes, sflags, send
        uintptr_t tmask[4]
        uintptr_t sthrow
        int maxdim
        size_t snap
        size_t vc, vv
        size_t am
        size_t ag
        uintptr_t gundef
        size_t pyo
    fo_tlayout fo_tl
    uintptr_t fo_grad_of(uintptr_t impl, PyObject **obj) noexcept nogil
    bint fo_grad_read_impl(uintptr_t gi, const unsigned char *ps, int64_t ndim,
                           const unsigned char *gtail, int64_t numel, int64_t itemsize,
                           uintptr_t *data) noexcept
    uintptr_t fo_snap_counter(const unsigned char *s) noexcept nogil
    void fo_counter_bump(uintptr_t c) noexcept nogil
    void fo_prefetch_write(uintptr_t a) noexcept nogil
    uintptr_t fo_word(uintptr_t a) noexcept nogil
    uint32_t fo_u32(uintptr_t a) noexcept nogil
    size_t fo_usable(uintptr_t a) noexcept nogil
    size_t fo_tl_tail() noexcept nogil
    bint fo_snap_take(PyObject *obj, unsigned char *s) noexcept
    bint fo_storage_holds(PyObject *t, int64_t numel, int64_t itemsize) noexcept
    bint fo_snap_same(PyObject *obj, const unsigned char *s) noexcept
    uintptr_t fo_snap_data(const unsigned char *s, int64_t itemsize) noexcept
    bint fo_grad_read(PyObject *g, const unsigned char *ps, int64_t ndim,
                      const unsigned char *gtail, int64_t numel, int64_t itemsize,
                      uintptr_t *data) noexcept
    PyObject *fo_dict_get_hashed(object d, object key, Py_hash_t h)
    uint64_t fo_dict_version(PyObject *d) noexcept
    object fo_descr_get(object d, object obj)
    object PyObject_CallOneArg(object f, object arg)

# torch.Tensor's attributes the cached step reads, as their descriptors, so that reading one
# is a C call without a name lookup: those of _TENSOR_ATTR_NAMES, or () when torch's tensor
# type does not define them all itself (then the cached step does not serve tensors)
cdef tuple _TENSOR_ATTR_NAMES = ("grad", "dtype", "shape", "data_ptr", "is_contiguous",
                                 "is_neg", "stride", "_version")
cdef tuple _tensor_attrs = None
cdef object _torch_strided = None  # torch.strided
cdef object _T_GRAD, _T_DTYPE, _T_SHAPE, _T_DATA_PTR, _T_IS_CONTIGUOUS, _T_IS_NEG, _T_STRIDE
cdef object _T_VERSION
cdef object _tf_mode_on = None  # torch._C._is_torch_function_mode_enabled


cdef extern from *:
    """
    /* the garbage collector off: 1 when it was on, 0 when it was off already, -1 when this
       Python cannot say (before 3.10); and on again */
    static inline int fo_gc_off(void)
    {
    #if PY_VERSION_HEX >= 0x030A0000
        return PyGC_Disable();
    #else
        return -1;
    #endif
    }
    static inline void fo_gc_on(void)
    {
    #if PY_VERSION_HEX >= 0x030A0000
        PyGC_Enable();
    #endif
    }
    """
    int fo_gc_off() noexcept
    void fo_gc_on() noexcept


cdef int _find_tensor_attrs(object torch) except -1:
    global _tensor_attrs, _T_GRAD, _T_DTYPE, _T_SHAPE, _T_DATA_PTR, _T_IS_CONTIGUOUS, _T_IS_NEG
    global _T_STRIDE, _T_VERSION, _tf_mode_on
    _tf_mode_on = getattr(getattr(torch, "_C", None), "_is_torch_function_mode_enabled", None)
    names = _TENSOR_ATTR_NAMES
    base = getattr(getattr(torch, "_C", None), "TensorBase", None)
    found = tuple([None if base is None else base.__dict__.get(n) for n in names])
    if any(d is None for d in found):
        _tensor_attrs = ()
        return 0
    probe = torch.zeros(2)
    probe.grad = torch.ones(2)
    try:
        ok = (fo_descr_get(found[0], probe) is probe.grad
              and fo_descr_get(found[1], probe) is probe.dtype
              and fo_descr_get(found[2], probe) == probe.shape
              and PyObject_CallOneArg(found[3], probe) == probe.data_ptr()
              and PyObject_CallOneArg(found[4], probe) is True
              and PyObject_CallOneArg(found[5], probe) is False
              and _same_size(PyObject_CallOneArg(found[6], probe), probe.stride())
              and _same_size(fo_descr_get(found[2], probe), probe.shape)
              and fo_descr_get(found[7], probe) == probe._version)
    except Exception:
        ok = False
    if not ok:
        _tensor_attrs = ()
        return 0
    _tensor_attrs = found
    (_T_GRAD, _T_DTYPE, _T_SHAPE, _T_DATA_PTR, _T_IS_CONTIGUOUS, _T_IS_NEG, _T_STRIDE,
     _T_VERSION) = found
    fo_tl.ok = 0
    if _RAW_ALLOWED:
        try:
            with torch.inference_mode(False):
                _probe_tensor_layout(torch)
        except Exception as e:
            _refusal[0] = f"{type(e).__name__}: {e}"
            fo_tl.ok = 0
        fo_tl.vc = fo_tl.vv = fo_tl.am = fo_tl.ag = fo_tl.pyo = fo_tl.gundef = 0
        if fo_tl.ok:
            try:
                with torch.inference_mode(False), torch.no_grad():
                    _probe_version_counter(torch)
                    _probe_autograd_meta(torch)
            except Exception:
                fo_tl.vc = fo_tl.vv = fo_tl.am = 0
        if fo_tl.ok and fo_tl.am:
            try:
                # (its backward unseen by the caller's torch function and dispatch modes)
                no_modes = getattr(getattr(getattr(torch, "utils", None), "_python_dispatch",
                                           None), "_disable_current_modes", None)
                with torch.inference_mode(False), torch._C.DisableTorchFunction(), \
                        (no_modes() if no_modes is not None else _contextlib.nullcontext()):
                    _probe_grad_slot(torch)
            except Exception:
                fo_tl.ag = fo_tl.pyo = fo_tl.gundef = 0
    return 0


cdef int _probe_autograd_meta(object torch) except -1:
    """Find where a TensorImpl keeps its autograd metadata (which holds the gradient), for
    the cached step to prefetch it: the one word inside [storage, end) that is 0 in tensors
    that never required a gradient and not in tensors that do. Only a hint for the memory
    (a prefetch never faults): fo_tl.am stays 0 when no one word fits."""
    plain = [torch.zeros(3), torch.zeros(2, 2)]
    grad = [torch.zeros(3).requires_grad_(), torch.nn.Parameter(torch.zeros(2, 2))]
    lo, hi = fo_tl.storage // 8, fo_tl.end // 8
    words = [_words(<uintptr_t>t._cdata, fo_tl.end) for t in plain + grad]
    found = [k for k in range(lo, hi)
             if all(w[k] == 0 for w in words[:2]) and all(w[k] != 0 for w in words[2:])]
    if len(found) == 1:
        fo_tl.am = 8 * found[0]
    return 0


cdef int _probe_grad_slot(object torch) except -1:
    """Find where the autograd metadata keeps a tensor's gradient, what it holds when there
    is none, and where a TensorImpl keeps its tensor object, so that the cached step reads a
    gradient made by backward without making its tensor object (torch's getter makes one,
    0.2 to 1 us): the one word of the metadata that is every probe's gradient TensorImpl,
    the same value in all of them once their gradients are None (and in a fresh one), and
    the one word of a TensorImpl that is its tensor object's address. Backward must then make
    a gradient whose word is NULL until .grad is read and that tensor object's address after.
    Any doubt leaves fo_tl.ag 0 (torch's getter)."""
    cdef Py_ssize_t k
    cdef uintptr_t u, gi
    if fo_tl.am == 0:
        return 0
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.zeros(2, 2).requires_grad_(),
          torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))]
    gs = [torch.ones(3), torch.ones(2, 2), torch.ones(4, dtype=torch.float64)]
    for p, g in zip(ps, gs):
        p.grad = g
    metas = [fo_word(<uintptr_t>p._cdata + fo_tl.am) for p in ps]
    if 0 in metas:
        return 0
    size = min([fo_usable(<uintptr_t>m) for m in metas])
    if size < 16:
        return 0
    words = [_words(<uintptr_t>m, min(size, 512)) for m in metas]
    found = [k for k in range(len(words[0]))
             if all(w[k] == <uintptr_t>g._cdata for w, g in zip(words, gs))]
    if len(found) != 1:
        return 0
    ag = 8 * found[0]
    for p in ps:
        p.grad = None
    fresh = torch.zeros(5).requires_grad_()
    fm = fo_word(<uintptr_t>fresh._cdata + fo_tl.am)
    if fm == 0:
        return 0
    undefs = {fo_word(<uintptr_t>m + ag) for m in metas + [fm]}
    if len(undefs) != 1:
        return 0
    u = undefs.pop()
    ts = ps + gs + [fresh]
    pyo = _the_offset([_words(<uintptr_t>t._cdata, fo_tl.end) for t in ts],
                      lambda j, w, k: w[k] == id(ts[j]))
    if pyo < 0 or pyo in (fo_tl.storage, fo_tl.am, fo_tl.vc):
        return 0
    p = torch.nn.Parameter(torch.zeros(3))
    with torch.enable_grad():
        (p * 2.0).sum().backward()
    gi = fo_word(fo_word(<uintptr_t>p._cdata + fo_tl.am) + ag)
    if gi == u or gi == 0 or fo_word(gi + pyo) != 0:
        return 0
    g = p.grad
    gid = id(g)
    if <uintptr_t>g._cdata != gi or fo_word(gi + pyo) != <uintptr_t>gid:
        return 0
    # the object let go of by Python while the parameter keeps the gradient: kept, its
    # address untagged (a torch that tags the word there is read through its getter)
    del g
    if fo_word(gi + pyo) != <uintptr_t>gid or id(p.grad) != gid:
        return 0
    p.grad = None
    if fo_word(fo_word(<uintptr_t>p._cdata + fo_tl.am) + ag) != u:
        return 0
    fo_tl.ag, fo_tl.gundef, fo_tl.pyo = ag, u, pyo
    return 0


cdef int _probe_version_counter(object torch) except -1:
    """Find where a TensorImpl keeps its version counter and where the counter keeps its
    32-bit version, so that the cached step bumps versions in place (fo_counter_bump)
    instead of through torch's call: the one pointer inside [storage, end) that a view
    shares with its tensor and another tensor does not (the storage pointer aside), in an
    allocation where one 32-bit word reads every probe's ``_version``; a bump in place must
    then move ``_version`` by one, of the tensor and of its view, and of nothing else. Any
    doubt leaves fo_tl.vc 0."""
    cdef Py_ssize_t j, k, vc, vv
    ts = [torch.zeros(3), torch.zeros(2, 2), torch.nn.Parameter(torch.zeros(4))]
    views = [ts[0][1:], ts[1].t(), ts[2].view(2, 2)]
    others = [torch.zeros(3), torch.zeros(2, 2), torch.nn.Parameter(torch.zeros(4))]
    for j in range(3):  # distinct versions: 3, 4; 5, 6; 7, 8
        for k in range(2 * j + 3):
            ts[j].add_(0)
        for k in range(2 * j + 4):
            others[j].add_(0)
    if [t._version for t in ts + others] != [3, 5, 7, 4, 6, 8]:
        return 0
    lo, hi = fo_tl.storage // 8, fo_tl.end // 8
    words = [[_words(<uintptr_t>t._cdata, fo_tl.end) for t in trio]
             for trio in zip(ts, views, others)]
    found = [k for k in range(lo, hi) if 8 * k != fo_tl.storage
             and all(w[0][k] == w[1][k] != w[2][k] and w[0][k] != 0 and w[2][k] != 0
                     and w[0][k] % 16 == 0 and w[2][k] % 16 == 0 for w in words)]
    if len(found) != 1:
        return 0
    vc = 8 * found[0]
    blocks = [(words[j][0][found[0]], ts[j]._version) for j in range(3)]
    blocks += [(words[j][2][found[0]], others[j]._version) for j in range(3)]
    size = min([fo_usable(<uintptr_t>b) for b, _ in blocks])
    if size < 8:
        return 0
    hits = [o for o in range(0, min(size, 64) - 3, 4)
            if all(fo_u32(<uintptr_t>b + o) == v for b, v in blocks)]
    if len(hits) != 1:
        return 0
    vv = hits[0]
    fo_tl.vc, fo_tl.vv = vc, vv
    for j in range(3):
        before = [t._version for t in ts + views + others]
        fo_counter_bump(<uintptr_t>words[j][0][found[0]])
        want = list(before)
        want[j] += 1
        want[3 + j] += 1
        if [t._version for t in ts + views + others] != want:
            fo_tl.vc = fo_tl.vv = 0
            return 0
    return 0


# FASTOPT_TORCH_LAYOUT=0 turns the in-place reads of torch's tensor objects off (the cached
# step then calls the tensors' methods)
cdef bint _RAW_ALLOWED = _os.environ.get("FASTOPT_TORCH_LAYOUT", "1") != "0"


# the masks of the 8 bytes of a 64-bit word (Python ints)
_BYTE_MASKS = [0xff << (8 * j) for j in range(8)]


cdef list _words(uintptr_t a, Py_ssize_t nbytes):
    return [fo_word(a + 8 * <uintptr_t>k) for k in range(nbytes // 8)]


cdef Py_ssize_t _the_offset(list tables, object want) except -2:
    """The one byte offset 8 k for which want(j, tables[j], k) is true for every table j of
    words, or -1 when there is none or more than one."""
    cdef Py_ssize_t j, k, n = min([len(t) for t in tables]), found = -1
    for k in range(n):
        for j in range(len(tables)):
            if not want(j, tables[j], k):
                break
        else:
            if found >= 0:
                return -1
            found = k
    return -1 if found < 0 else 8 * found


# why the last probe left the method calls in place ("" when it did not)
cdef list _refusal = [""]


cdef int _refuse(str why) except -1:
    _refusal[0] = why
    return 0


cdef int _probe_tensor_layout(object torch) except -1:
    """Find where the loaded torch keeps a CPU tensor's TensorImpl pointer, its storage,
    sizes, strides, storage offset, element count, dtype-to-dispatch-key tail, and its
    storage's data pointer, byte count and flags (see fo_tlayout), by reading tensors of
    known layout: every field must be found at exactly one offset, the same for all of them,
    in torch's order, inside the objects (their allocation's size bounds every read), and the
    data pointers computed from the fields must be data_ptr()'s. Sets fo_tl.ok on success;
    any doubt leaves the method calls in place."""
    cdef Py_ssize_t k, po, storage, ndim, sizes, strides, offset, numel, keys, end
    global _torch_strided
    cdef Py_ssize_t sdata, snbytes, sflags
    cdef uintptr_t si
    _torch_strided = torch.strided

    def z(*shape, dtype=torch.float32, device="cpu"):
        return torch.zeros(*shape, dtype=dtype, device=device)  # whatever the defaults are

    base = z(160)
    probes = [z(2, 3, 5, 7, 11), base[7:7 + 143].view(11, 13),
              z(3, 5, dtype=torch.float64).t(), z(()),
              torch.from_numpy(np.zeros(17, np.float32)), z(19, 23, 2)[:, 1:, :],
              z(4, 29)[1], torch.nn.Parameter(z(3, 2))]
    impls = [<uintptr_t>t._cdata for t in probes]
    sis = [<uintptr_t>t.untyped_storage()._cdata for t in probes]
    if any(fo_usable(a) < 64 for a in impls + sis):
        return _refuse("no allocation sizes to bound the reads (not glibc)")
    objs = [_words(<uintptr_t>id(t), type(t).__basicsize__) for t in probes]
    po = _the_offset(objs, lambda j, w, k: k >= 2 and w[k] == impls[j])
    tis = [_words(a, min(fo_usable(a), 1024)) for a in impls]
    sts = [_words(a, min(fo_usable(a), 512)) for a in sis]
    shapes = [tuple(t.shape) for t in probes]
    strides_ = [tuple(t.stride()) for t in probes]

    def run(w, k, vals):
        return k + len(vals) <= len(w) and all(w[k + i] == v for i, v in enumerate(vals))

    storage = _the_offset(tis, lambda j, w, k: w[k] == sis[j])
    ndim = _the_offset(tis, lambda j, w, k: w[k] == len(shapes[j]))
    sizes = _the_offset([w for j, w in enumerate(tis) if shapes[j]],
                        lambda j, w, k: run(w, k, [s for s in shapes if s][j]))
    strides = _the_offset([w for j, w in enumerate(tis) if shapes[j]],
                          lambda j, w, k: run(w, k, [s for s in strides_ if s][j]))
    offset = _the_offset(tis, lambda j, w, k: w[k] == probes[j].storage_offset())
    numel = _the_offset(tis, lambda j, w, k: w[k] == probes[j].numel())
    sdata = _the_offset(sts, lambda j, w, k: w[k] == probes[j].untyped_storage().data_ptr())
    snbytes = _the_offset(sts, lambda j, w, k: w[k] == probes[j].untyped_storage().nbytes())
    if min(po, storage, ndim, sizes, strides, offset, numel, sdata, snbytes) < 0:
        return _refuse("a field not found at one offset")
    if po != sizeof(PyObject):  # the TensorImpl pointer first (no flag before it)
        return _refuse("the TensorImpl pointer is not the tensor object's first field")
    if not (storage < ndim < sizes < strides < offset < numel and strides - sizes >= 40
            and sdata < snbytes):
        return _refuse("the fields are not in torch's order")
    # the dispatch keys: the one word past numel where every negated view differs from its
    # tensor by the same one bit (a bit field's unset bits, and the bytes past the object,
    # may differ by chance in one pair); nothing of the TensorImpl may follow them
    pairs = [(t, torch._neg_view(t)) for t in
             [z(n, dtype=torch.float32, device="cpu") for n in (6, 7, 8, 9)]]
    found = None
    for plain, negated in pairs:
        a, b = [_words(<uintptr_t>t._cdata, min(fo_usable(<uintptr_t>t._cdata), 1024))
                for t in (plain, negated)]
        bits = {(k, a[k] ^ b[k]) for k in range(numel // 8 + 1, min(len(a), len(b)))
                if a[k] != b[k] and bin(a[k] ^ b[k]).count("1") == 1}
        found = bits if found is None else found & bits
    if len(found) != 1:
        return _refuse("no one word of dispatch keys")
    keys = 8 * next(iter(found))[0]
    end = keys + 8
    # (an allocation may be larger than asked for, by less than 16 bytes when malloc made it
    # for the size; the smallest of the probes' tells)
    sizes_ti = [fo_usable(x) for x in impls]
    sizes_ti += [fo_usable(<uintptr_t>t._cdata) for pair in pairs for t in pair]
    if not end <= min(sizes_ti) < end + 16 or end - numel - 8 > 32:
        return _refuse("fields after the dispatch keys")
    # the storage's flags: the one word past its byte count that a flag of torch's changes
    flagged = z(5)
    si = <uintptr_t>flagged.untyped_storage()._cdata
    before = _words(si, min(fo_usable(si), 512))
    torch._C._set_throw_on_mutable_data_ptr(flagged)
    after = _words(si, min(fo_usable(si), 512))
    changed = [8 * k for k in range(len(before)) if before[k] != after[k]]
    if len(changed) != 1 or changed[0] <= snbytes:
        return _refuse("no one word of storage flags")
    sflags = changed[0]
    if sflags + 8 > min([fo_usable(x) for x in sis]):
        return _refuse("storage flags past the storage object")
    sthrow = before[sflags // 8] ^ after[sflags // 8]
    warned = z(5)
    si = <uintptr_t>warned.untyped_storage()._cdata
    x = fo_word(si + sflags)
    torch._C._set_warn_deprecated_on_mutable_data_ptr(warned)
    sthrow |= x ^ fo_word(si + sflags)
    # the tail bits a gradient's check compares: the bytes in which every pair of tensors of
    # two dtypes, and every pair on two devices, differs (the dtype is the first two bytes:
    # they must be among them; bytes that differ in some pairs only are bits no constructor
    # sets), and the dispatch keys
    ntail = (end - numel - 8) // 8

    def differing(pairs):
        out = [0xffffffffffffffff] * ntail
        for a, b in pairs:
            for k in range(ntail):
                x = (fo_word(<uintptr_t>a._cdata + numel + 8 + 8 * k)
                     ^ fo_word(<uintptr_t>b._cdata + numel + 8 + 8 * k))
                out[k] &= sum([_BYTE_MASKS[j] for j in range(8) if (x >> (8 * j)) & 0xff])
        return out

    dtypes = differing([(z(2), z(2, dtype=d)) for d in
                        (torch.float64, torch.int32, torch.bfloat16, torch.float16)])
    devices = differing([(z(n), z(n, device="meta")) for n in (2, 3, 4, 5)])
    if dtypes[0] & 0xff == 0:
        return _refuse("no dtype where expected")
    mask = [dtypes[k] | devices[k] for k in range(ntail)]
    mask[0] |= 0xffff
    mask[(keys - numel - 8) // 8] = 0xffffffffffffffff
    fo_tl.po, fo_tl.storage, fo_tl.ndim, fo_tl.sizes = po, storage, ndim, sizes
    fo_tl.strides, fo_tl.offset, fo_tl.numel, fo_tl.end = strides, offset, numel, end
    fo_tl.sdata, fo_tl.snbytes, fo_tl.sflags, fo_tl.send = sdata, snbytes, sflags, sflags + 8
    for k in range(4):
        fo_tl.tmask[k] = mask[k] if k < len(mask) else 0
    fo_tl.sthrow = sthrow
    fo_tl.maxdim = 5
    fo_tl.snap = (16 + (end - storage) + (sflags + 8 - sdata) + 7) & ~7
    # the data pointers and element counts, computed from the fields as the cached step will
    for j, t in enumerate(probes):
        w, sw = tis[j], sts[j]
        if (w[storage // 8] != sis[j] or w[numel // 8] != t.numel()
                or sw[sdata // 8] + w[offset // 8] * t.element_size() != t.data_ptr()):
            return _refuse("a computed data pointer is not data_ptr()'s")
    fo_tl.ok = 1
    _refusal[0] = ""
    return 0


def torch_layout_refusal():
    """Why the layout probe left the method calls in place, or "" (see torch_layout)."""
    return _refusal[0]


def storage_holds(t):
    """Whether the storage of the torch tensor ``t`` holds all its elements. One freed with
    ``untyped_storage().resize_(0)`` (as FSDP frees parameters between uses) or shrunk does
    not, and ``t.numpy()`` does not look: it gives an array over memory the tensor lacks."""
    if t.layout is not sys.modules["torch"].strided or t.numel() == 0:
        return True  # (what is not strided is refused elsewhere)
    extent = 1 + sum([(n - 1) * st for n, st in zip(t.shape, t.stride())])
    return (t.storage_offset() + extent) * t.element_size() <= t.untyped_storage().nbytes()


def storage_shortfall(t):
    """None when the storage of the torch tensor ``t`` holds its elements (see
    storage_holds), else what is wrong: "storage holds N bytes, fewer than ...", to follow
    the name of the tensor."""
    if storage_holds(t):
        return None
    return (f"storage holds {t.untyped_storage().nbytes()} bytes, fewer than its "
            f"{t.numel()} elements of {t.element_size()} bytes need (its memory was freed or "
            f"shrunk with untyped_storage().resize_()); give it its memory back first")


def check_held(t, where):
    """Raise RuntimeError naming ``where`` unless the storage of ``t`` holds its elements
    (see storage_holds)."""
    short = storage_shortfall(t)
    if short is not None:
        raise RuntimeError(f"{where}: the tensor's {short}")


def torch_layout():
    """The offsets the in-place reads of torch's tensors use (see fo_tlayout), or None when
    they are off (FASTOPT_TORCH_LAYOUT=0, a torch whose layout the probe did not recognise,
    or no tensor stepped yet; torch_layout_refusal() says why)."""
    if not fo_tl.ok:
        return None
    return {"tensor_impl": fo_tl.po, "storage": fo_tl.storage, "ndim": fo_tl.ndim,
            "sizes": fo_tl.sizes, "strides": fo_tl.strides, "storage_offset": fo_tl.offset,
            "numel": fo_tl.numel, "end": fo_tl.end, "storage_data": fo_tl.sdata,
            "storage_nbytes": fo_tl.snbytes, "storage_flags": fo_tl.sflags,
            "max_dims": fo_tl.maxdim, "snapshot_bytes": fo_tl.snap,
            "version_counter": fo_tl.vc or None, "version": fo_tl.vv if fo_tl.vc else None,
            "autograd_meta": fo_tl.am or None, "grad": fo_tl.ag or None,
            "tensor_object": fo_tl.pyo if fo_tl.ag else None}


cdef inline bint _same_size(object a, object b) except -1:
    """Whether the tuples of ints ``a`` and ``b`` (a torch.Size, a tensor's strides) are
    equal: without the rich comparison, and equal ints are mostly the same object."""
    cdef Py_ssize_t k, n
    if not (PyTuple_Check(a) and PyTuple_Check(b)):
        return a == b
    n = PyTuple_GET_SIZE(a)
    if n != PyTuple_GET_SIZE(b):
        return False
    for k in range(n):
        x = <object>PyTuple_GET_ITEM(a, k)
        y = <object>PyTuple_GET_ITEM(b, k)
        if x is not y and x != y:
            return False
    return True


cdef bint _plain_tensor_type(object cls):
    """Whether instances of ``cls`` read every attribute the cached step reads through
    torch.Tensor's own descriptors (no subclass overrides one)."""
    cdef Py_ssize_t k
    if not _tensor_attrs:
        return False
    for k, name in enumerate(_TENSOR_ATTR_NAMES):
        if getattr(cls, name, None) is not _tensor_attrs[k]:
            return False
    return True


cdef enum:
    _KIND_ARRAY = 0   # a fastopt.Parameter (an ndarray)
    _KIND_TENSOR = 1  # a dense real torch tensor, read through its cached view
    _MAX_ENTRIES = 10  # 3 state arrays, their 3 scales, master weights, step, 2 scalars
    _MAX_PF = 24      # prefetched spans per record: 3 per tensor, 2 for its state dict
    _PF_AHEAD = 2     # records whose objects are prefetched ahead of the one checked
    _REC_AHEAD = 5    # records prefetched ahead (their spans are read _PF_AHEAD ahead)
    _BARE_BYTES = 4 << 20  # parameters of a step whose gradients may be read bare
    _NEED_FLAGS = (cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED | cnp.NPY_ARRAY_WRITEABLE)

ctypedef struct _trec:
    PyObject *param           # borrowed: the cache holds a reference (refs)
    PyObject *arr             # the array the kernel updates (the parameter or its view)
    PyObject *st              # the parameter's state dict (NULL: the group keeps no state)
    PyObject *shape           # a tensor's shape (torch.Size), and its dtype
    PyObject *dtype
    PyObject *entry[10]       # the state entries read, in the order _bind reads them
    PyObject *ekey[10]        # their keys (kept by the cache: refs)
    uintptr_t eptr[10]        # their data pointers
    int64_t ever[10]          # a tensor entry's version counter: torch's in-place ops that
                              # re-lay a tensor out (t_, as_strided_, resize_, set_) keep its
                              # data pointer but move its version
    int32_t etype[10]         # an array's type number and size, and what it must be: 0 an
    int64_t esize[10]         # array of the parameter's shape, 1 a vector (block scales),
    int32_t ekind[10]         # 2 a 0-d float32 array
    PyObject *gdtype          # a tensor's gradient's dtype
    int32_t gtypenum          # the gradient's type number and item size
    int64_t gitemsize
    fo_tensor *t              # the parameter's slot in its plan (NULL: it has no gradient)
    uintptr_t pdata           # the parameter's memory
    int64_t numel
    int64_t itemsize
    uintptr_t glo, ghi        # the memory of the gradient checked last
    Py_hash_t hash
    PyObject *plan            # the plan holding its tensor (NULL: it has no gradient)
    int32_t gi, pi, slot
    int32_t kind
    int32_t nentry
    int32_t tensors           # bit k: entry k is a tensor (else an ndarray)
    int32_t typenum
    # the memory the checks of the record read (its objects and, of a tensor, torch's
    # TensorImpl and StorageImpl), as fo_prefetch_lines takes it: prefetched a few records
    # ahead, so that the reads of many records wait for memory at once, not one by one
    uintptr_t pf[_MAX_PF]
    int32_t npf
    uint64_t stver            # the version tag of st when its entries were found the same
    PyObject *strides         # a tensor dense in another axis order: its strides (a tuple)
    # the in-place reads of torch's tensors (fo_tlayout): the snapshots of the parameter and
    # of each tensor entry (indices in the cache's snapshots, -1: checked by method calls),
    # and whether the gradient is read in place, with the tail (dtype to dispatch keys) of
    # the gradient the full path accepted
    int32_t psnap
    int32_t esnap[10]
    int32_t eitem[10]         # the tensor entries' bytes per element
    int32_t snap_lo, snap_hi  # the record's snapshots, in a row
    int32_t graw
    int64_t ndim
    uint8_t gtail[32]


cdef class _StepCache


cdef class Plan:
    """Pointers to every tensor of one dtype that one step of one group updates, and the
    group's hyperparameters as the kernel's doubles."""
    cdef fo_tensor *ts
    cdef Py_ssize_t n, cap
    cdef list keep
    cdef list gkeep  # the gradients, kept apart: a cached plan lets go of them after a step
    cdef double hyper[MAX_HYPER]
    cdef readonly int typenum
    cdef readonly int itemsize  # bytes per element of every array of the plan
    cdef int storage            # FO_STORAGE_* of its tensors
    cdef tuple keys
    cdef bint has_step
    cdef tuple scalars
    cdef int sid     # index in the step's _Spans.plans, -1 outside update
    cdef Py_ssize_t gi  # the group's index
    cdef int serial  # 1: run on one thread (set by _check_spans), -1: not known yet
    # the group's compressed-state policy (see _policy) and the stochastic rounding key
    cdef int sdtype
    cdef bint master, sr
    cdef int64_t min8
    cdef uint64_t round_key
    cdef tuple unsigned_  # per state slot: the values are non-negative

    def __cinit__(self, int typenum, int storage=FO_STORAGE_NATIVE):
        self.typenum = typenum
        self.itemsize = _itemsize_of(typenum)
        self.storage = storage
        self.sid = -1
        self.serial = -1
        self.keep = []
        self.gkeep = []
        self.ts = NULL
        self.n = 0
        self.cap = 0
        self.keys = ()
        self.scalars = ()
        self.has_step = False
        self.sdtype = _SD_NONE
        self.master = False
        self.sr = False
        self.min8 = 0
        self.round_key = 0
        self.unsigned_ = ()

    def __dealloc__(self):
        free(self.ts)

    cdef int fmts(self, Py_ssize_t slot, int *out) noexcept:
        """The formats of slot's state arrays in out[0..3); returns 1 when the slot keeps
        float32 master weights."""
        cdef int pf = self.storage
        cdef int master = self.master and pf != FO_FMT_F32
        cdef int j, f
        cdef int64_t n = self.ts[slot].numel
        for j in range(3):
            if self.sdtype == _SD_NONE:
                f = FO_FMT_F32 if master else pf
            elif self.sdtype == _SD_F32:
                f = FO_FMT_F32
            elif self.sdtype == _SD_BF16:
                f = FO_FMT_BF16
            elif n >= self.min8:
                f = FO_FMT_Q8U if j < len(self.unsigned_) and self.unsigned_[j] else FO_FMT_Q8S
            else:
                f = FO_FMT_F32
            out[j] = f
        return master

    def formats(self, Py_ssize_t slot):
        """(master weights?, {state key: format name}) of slot's state: the format names are
        "float32", "float16", "bfloat16", "int8-signed" and "int8-unsigned"; (False, None)
        when the state has the parameter's dtype (the group's state_dtype is None and it
        keeps no master weights)."""
        cdef int f[3]
        if not 0 <= slot < self.n:
            raise IndexError(f"slot {slot} out of range for a plan of {self.n} tensors")
        master = self.fmts(slot, f) != 0
        if self.sdtype == _SD_NONE and not master:
            return False, None
        names = ("float32", "float16", "bfloat16", "int8-signed", "int8-unsigned")
        out = {}
        for j in range(len(self.keys)):
            if self.keys[j] is not None:
                out[self.keys[j]] = names[f[j]]
        return master, out

    cdef Py_ssize_t _add(self, cnp.ndarray p, cnp.ndarray g) except -1:
        cdef Py_ssize_t cap
        cdef void *mem
        if self.n == self.cap:
            cap = 16 if self.cap == 0 else 2 * self.cap
            mem = realloc(self.ts, cap * sizeof(fo_tensor))
            if mem == NULL:
                raise MemoryError()
            self.ts = <fo_tensor *>mem
            self.cap = cap
        cdef fo_tensor *t = &self.ts[self.n]
        t.param = cnp.PyArray_DATA(p)
        t.grad = cnp.PyArray_DATA(g)
        t.state[0] = NULL
        t.state[1] = NULL
        t.state[2] = NULL
        t.step = NULL
        t.aux[0] = NULL
        t.aux[1] = NULL
        t.numel = cnp.PyArray_SIZE(p)
        t.scalar[0] = 0.0
        t.scalar[1] = 0.0
        t.scalar[2] = 0.0
        t.scalar[3] = 0.0
        t.flags = 0
        t.storage = FO_STORAGE(self.storage, _storage_of(cnp.PyArray_TYPE(g), True)
                               if cnp.PyArray_TYPE(g) != cnp.PyArray_TYPE(p) else self.storage,
                               0, 0, 0)
        t.scale[0] = NULL
        t.scale[1] = NULL
        t.scale[2] = NULL
        t.copy = NULL
        t.seed = 0
        t.rkey = 0
        self.keep.append(p)
        self.gkeep.append(g)
        self.n += 1
        return self.n - 1

    cdef int _bind(self, Py_ssize_t slot, object st, cnp.ndarray p, Py_ssize_t gi,
                   Py_ssize_t pi, _Spans sp, object owner, _StepCache rec=None) except -1:
        # sp: where to record the memory of the state arrays (None for new state); rec: the
        # cache being built, which records every entry read (see _StepCache)
        cdef PyObject *item
        cdef cnp.ndarray a
        cdef Py_ssize_t j
        cdef uintptr_t los[8]
        cdef uintptr_t his[8]
        cdef uintptr_t lo, hi
        cdef int k, nb = 0  # memory spans of the state arrays bound so far
        cdef tuple keys = self.keys
        cdef fo_tensor *t = &self.ts[slot]
        cdef int fmt[3]
        cdef int master = self.fmts(slot, fmt)
        cdef int64_t storage = t.storage & 0xff  # the parameter's and the gradient's formats
        cdef int64_t nblocks = (t.numel + FO_Q8_BLOCK - 1) // FO_Q8_BLOCK
        cdef bint tensor
        cdef int role
        cdef uintptr_t nbytes = <uintptr_t>t.numel * <uintptr_t>self.itemsize
        cdef uintptr_t p0 = <uintptr_t>cnp.PyArray_DATA(p)
        if not isinstance(st, dict):
            raise TypeError(f"{_where(gi, pi)}: optimizer.state entry must be a dict, "
                            f"got {type(st).__name__}")
        for j in range(len(keys) + 4):
            # the state arrays in the kernel's order, then the block scales of the 8-bit ones,
            # then the master weights
            if j < len(keys):
                key = keys[j]
                if key is None:
                    continue
            elif j < len(keys) + 3:
                k = <int>(j - len(keys))
                if k >= len(keys) or keys[k] is None or (fmt[k] != FO_FMT_Q8S
                                                         and fmt[k] != FO_FMT_Q8U):
                    continue
                key = keys[k] + SCALE_SUFFIX
            else:
                if not master:
                    continue
                key = MASTER_KEY
            item = PyDict_GetItem(st, key)
            if item == NULL or (<object>item) is None:
                if j < len(keys):
                    raise KeyError(f"{_where(gi, pi)}: state has no {key!r} (was a flag such "
                                   f"as amsgrad, momentum or centered switched on after the "
                                   f"first step?)")
                raise KeyError(f"{_where(gi, pi)}: state has no {key!r} (was state_dtype or "
                               f"master_weights changed after the first step?)")
            obj = _state_array(<object>item, gi, pi, key)
            if obj is None:
                raise TypeError(f"{_where(gi, pi)}: state[{key!r}] must be a numpy.ndarray, "
                                f"got {type(<object>item).__name__}")
            a = <cnp.ndarray>obj
            tensor = not cnp.PyArray_Check(<object>item)
            if j < len(keys) and self.sdtype == _SD_NONE and not master:
                # state in the parameter's dtype, as torch keeps it
                if cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(p) or not _same_shape(a, p):
                    raise ValueError(f"{_where(gi, pi)}: state[{key!r}] has dtype {a.dtype} "
                                     f"and shape {(<object>a).shape}; the parameter has "
                                     f"{_dtype_text(p)} "
                                     f"{(<object>p).shape}")
                lo = nbytes
            elif j < len(keys) or j == len(keys) + 3:
                k = fmt[j] if j < len(keys) else FO_FMT_F32
                if k == FO_FMT_BF16 and not tensor and _bf16_typenum < 0:
                    _learn_bf16(a)
                if not _fmt_matches(k, a, tensor) or not _same_shape(a, p):
                    raise ValueError(f"{_where(gi, pi)}: state[{key!r}] has dtype {a.dtype} "
                                     f"and shape {(<object>a).shape}; the group's "
                                     f"state_dtype and master_weights make it {_fmt_text(k)} "
                                     f"of the parameter's shape {(<object>p).shape}")
                lo = <uintptr_t>t.numel * <uintptr_t>_itemsize_fmt(k)
            else:
                if (cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT or cnp.PyArray_NDIM(a) != 1
                        or cnp.PyArray_SIZE(a) != nblocks):
                    raise ValueError(f"{_where(gi, pi)}: state[{key!r}] has dtype {a.dtype} "
                                     f"and shape {(<object>a).shape}; the block scales of "
                                     f"{t.numel} elements are float32 of shape ({nblocks},)")
                lo = <uintptr_t>nblocks * 4
            hi = lo  # the array's size in bytes
            if j >= len(keys) and j < len(keys) + 3:
                if not _usable(a):
                    raise ValueError(f"{_where(gi, pi)}: state[{key!r}] must be a writable, "
                                     f"aligned, C-contiguous array")
            elif not (_usable(a) and cnp.PyArray_IS_C_CONTIGUOUS(p)):
                if not (cnp.PyArray_ISALIGNED(a) and cnp.PyArray_ISWRITEABLE(a)
                        and _same_layout(a, p)):
                    raise ValueError(f"{_where(gi, pi)}: state[{key!r}] must be a writable, "
                                     f"aligned array in the parameter's memory layout "
                                     f"(strides {(<object>a).strides}, the parameter's "
                                     f"{(<object>p).strides})")
            lo = <uintptr_t>cnp.PyArray_DATA(a)
            hi = lo + hi
            if lo < hi and lo < p0 + nbytes and p0 < hi:
                raise ValueError(f"{_where(gi, pi)}: state[{key!r}] shares memory with the "
                                 f"parameter")
            for k in range(nb):
                if lo < his[k] and los[k] < hi:
                    raise ValueError(f"{_where(gi, pi)}: state[{key!r}] shares memory with "
                                     f"another state array of the parameter")
            if lo < hi and nb < 8:
                los[nb] = lo
                his[nb] = hi
                nb += 1
            if j < len(keys):
                t.state[j] = cnp.PyArray_DATA(a)
                role = _ROLE_STATE + <int>j
            elif j < len(keys) + 3:
                t.scale[j - len(keys)] = <float *>cnp.PyArray_DATA(a)
                role = _ROLE_SCALE + <int>(j - len(keys))
            else:
                role = _ROLE_MASTER
            self.keep.append(a)
            if rec is not None:
                rec.entry(item, a, key, 0 if j < len(keys) or j == len(keys) + 3 else 1)
            if sp is not None:
                _push(sp, cnp.PyArray_DATA(a), hi - lo, owner, pi, self.sid, <int>role)
        if master:
            t.param = cnp.PyArray_DATA(<cnp.ndarray>self.keep[len(self.keep) - 1])
            t.copy = cnp.PyArray_DATA(p)
            storage = FO_STORAGE(FO_FMT_F32, (storage >> 4) & 15, 0, 0, 0) | (
                <int64_t>self.storage << FO_STORAGE_COPY_SHIFT)
        for j in range(len(keys)):
            if keys[j] is not None and not (self.sdtype == _SD_NONE and not master):
                storage |= <int64_t>fmt[j] << (8 + 4 * j)
                if fmt[j] == FO_FMT_Q8S or fmt[j] == FO_FMT_Q8U:
                    storage |= FO_STORAGE_Q8
            elif keys[j] is not None:
                storage |= <int64_t>self.storage << (8 + 4 * j)
        if self.sr and storage != FO_STORAGE_NATIVE:
            storage |= FO_STORAGE_SR
            t.seed = (<uint64_t>gi << 32) | <uint64_t>pi
        t.storage = storage
        if self.has_step:
            item = PyDict_GetItem(st, "step")
            if item == NULL:
                raise KeyError(f"{_where(gi, pi)}: state has no 'step'")
            obj = _state_array(<object>item, gi, pi, "step")
            if (obj is None or cnp.PyArray_TYPE(<cnp.ndarray>obj) != cnp.NPY_FLOAT
                    or cnp.PyArray_SIZE(<cnp.ndarray>obj) != 1
                    or not _usable(<cnp.ndarray>obj)):
                raise TypeError(f"{_where(gi, pi)}: state['step'] must be a writable 0-d "
                                f"float32 array, got {(<object>item)!r}")
            self.ts[slot].step = <float *>cnp.PyArray_DATA(<cnp.ndarray>obj)
            self.keep.append(obj)
            if rec is not None:
                rec.entry(item, <cnp.ndarray>obj, "step", 2)
            if sp is not None:
                _push(sp, self.ts[slot].step, 4, owner, pi, self.sid, _ROLE_STEP)
        for j in range(len(self.scalars)):
            key = self.scalars[j]
            item = PyDict_GetItem(st, key)
            obj = None if item == NULL else _state_array(<object>item, gi, pi, key)
            _check_scalar(obj if obj is not None or item == NULL else <object>item, gi, pi, key)
            self.ts[slot].aux[j] = <float *>cnp.PyArray_DATA(<cnp.ndarray>obj)
            self.keep.append(obj)
            if rec is not None:
                rec.entry(item, <cnp.ndarray>obj, key, 2)
            if sp is not None:
                _push(sp, self.ts[slot].aux[j], 4, owner, pi, self.sid, _ROLE_AUX + <int>j)
        return 0

    def bind(self, Py_ssize_t slot, st, bint first, cnp.ndarray p, Py_ssize_t gi,
             Py_ssize_t pi):
        """Point slot at the state dict ``st`` (used after creating new state); ``first``
        marks a lazily created buffer that takes the gradient on this step."""
        if not 0 <= slot < self.n:
            raise IndexError(f"slot {slot} out of range for a plan of {self.n} tensors")
        self._bind(slot, st, p, gi, pi, None, None)
        if first:
            self.ts[slot].flags |= FO_FIRST_STEP

    cdef int _serial(self) noexcept:
        """1 when two tensors share memory (a parameter listed twice, or overlapping views)
        and the work would be split over threads: then one thread updates them in list
        order, as torch does. For the plans of ``update`` _check_spans decides instead."""
        cdef Py_ssize_t k
        cdef int64_t total = 0
        cdef uintptr_t hi = 0
        cdef _span *spans
        cdef size_t itemsize = self.itemsize
        if self.n < 2 or fo_get_num_threads() < 2:
            return 0
        for k in range(self.n):
            total += self.ts[k].numel
        if total < 2 * FO_GRAIN:
            return 0
        spans = <_span *>malloc(self.n * sizeof(_span))
        if spans == NULL:
            return 1
        for k in range(self.n):
            spans[k].lo = <uintptr_t>self.ts[k].param
            spans[k].hi = spans[k].lo + <uintptr_t>(self.ts[k].numel * itemsize)
        qsort(spans, self.n, sizeof(_span), _cmp_span)
        cdef int dup = 0
        for k in range(self.n):
            if spans[k].lo == spans[k].hi:
                continue
            if spans[k].lo < hi:
                dup = 1
                break
            if spans[k].hi > hi:
                hi = spans[k].hi
        free(spans)
        return dup


cdef Plan _new_plan(int typenum, Spec spec, tuple keys, _Spans sp, Py_ssize_t gi,
                    int storage=FO_STORAGE_NATIVE, tuple policy=_no_policy):
    cdef Plan plan = Plan.__new__(Plan, typenum, storage)
    plan.gi = gi
    plan.sdtype = <int>policy[0]
    plan.master = <bint>policy[1]
    plan.sr = <bint>policy[2]
    plan.min8 = <int64_t>policy[3]
    plan.round_key = <uint64_t>policy[4]
    if plan.sdtype == _SD_INT8:
        plan.unsigned_ = tuple([k in UNSIGNED_STATE for k in keys])
    plan.keys = keys
    plan.has_step = spec.step_counter
    plan.scalars = spec.scalars
    plan.sid = len(sp.plans)
    plan.serial = 0
    sp.plans.append(plan)
    return plan


cdef tuple _collect(Py_ssize_t gi, list params, state, Spec spec, tuple keys, int init_mode,
                    list missing, _Spans sp, list foreign, list sparse, _StepCache rec,
                    tuple policy=_no_policy):
    """Check group ``gi`` and return the plans of the parameters that have a gradient, one
    per dtype (float32, float64, then the 16-bit ones in the order met). Parameters that
    need new state (see Spec.init_mode) are appended to ``missing`` as (plan, slot, param,
    array, gi, pi) and left unbound. The memory of every array is recorded in ``sp``; foreign parameters with a
    gradient are appended to ``foreign``. With ``sparse`` (a list, see Spec.sparse_ok),
    foreign parameters with a sparse gradient are appended to it as (gi, pi, param, array,
    grad) and left out of the plans. With ``rec`` (a cache being built), every parameter
    is recorded in it, or the cache is marked unusable (``rec.ok``) when a parameter takes a
    path the cached step does not (see _StepCache)."""
    cdef Py_ssize_t i, slot, n = len(params)
    cdef int kind
    cdef cnp.ndarray arr, g
    cdef Plan plan, p32 = None, p64 = None
    cdef list low = None  # the plans of 16-bit dtypes
    cdef int storage
    cdef PyObject *item
    cdef bint need
    cdef uintptr_t nbytes
    ptype = _parameter_type
    sp.reserve(n * (2 + len(keys) + spec.step_counter + len(spec.scalars)))
    for i in range(n):
        obj = params[i]
        if type(obj) is ptype or isinstance(obj, ptype):
            kind = _KIND_ARRAY
            gobj = obj.grad
            if gobj is None:
                if rec is not None:
                    rec.param(gi, i, obj, kind, None, -1, None)
                continue
            arr = <cnp.ndarray>obj
        elif _foreign_param is not None and not cnp.PyArray_Check(obj):
            kind = _KIND_TENSOR
            a_obj = _cached_tensor_view(obj, spec.wide)
            if a_obj is not None:
                gobj = obj.grad
                if gobj is None:
                    if rec is not None:
                        rec.param(gi, i, obj, kind, None, -1, a_obj)
                    continue
                bf16 = False
                try:
                    check_held(gobj, f"{_where(gi, i)}.grad")
                    if (gobj.dtype is obj.dtype and str(gobj.dtype) == "torch.bfloat16"
                            and type(gobj) is type(obj.data)):
                        # the bits of a dense bfloat16 gradient, as the parameter's view
                        bf16 = (gobj.layout is obj.layout and not gobj.is_neg()
                                and gobj.stride() == obj.stride())
                        gobj = gobj.view(sys.modules["torch"].int16).numpy() if bf16 else \
                            gobj.numpy()
                    else:
                        gobj = gobj.numpy()
                except Exception:
                    a_obj = None  # a sparse, lazily conjugated or graph-holding gradient
                else:
                    if (not _same_shape(<cnp.ndarray>a_obj, <cnp.ndarray>gobj)
                            or (cnp.PyArray_TYPE(<cnp.ndarray>gobj) == cnp.NPY_SHORT
                                and not bf16)):
                        # the tensor was reshaped, or an int16 gradient (the type of a
                        # bfloat16 parameter's view): the adapter looks again
                        a_obj = None
            if a_obj is None:
                kind = -1  # not the path of the cached step
                a_obj, gobj = (_foreign_param(obj, gi, i, False, True) if spec.wide
                               else _foreign_param(obj, gi, i, False))
            if gobj is None:
                if rec is not None:
                    rec.ok = False
                continue
            arr = <cnp.ndarray>a_obj
            foreign.append(obj)
            if sparse is not None and not cnp.PyArray_Check(gobj):
                sparse.append((gi, i, obj, arr, gobj))
                if rec is not None:
                    rec.ok = False
                continue
        else:
            raise TypeError(f"{_where(gi, i)}: expected a fastopt.Parameter, got "
                            f"{type(obj).__name__}; wrap arrays as fastopt.Parameter(x)")
        _check_param(arr, gi, i, spec.wide, True, kind != _KIND_ARRAY)
        g = _check_grad(arr, gobj, gi, i)
        if _overlap(g, arr, True):
            raise ValueError(f"{_where(gi, i)}: .grad partly overlaps the parameter's memory "
                             f"(torch: 'some elements refer to a single memory location')")
        if cnp.PyArray_TYPE(arr) == cnp.NPY_FLOAT:
            if p32 is None:
                p32 = _new_plan(cnp.NPY_FLOAT, spec, keys, sp, gi, FO_STORAGE_NATIVE, policy)
            plan = p32
        elif cnp.PyArray_TYPE(arr) == cnp.NPY_DOUBLE:
            if policy[0] != _SD_NONE:
                raise TypeError(f"{_where(gi, i)}: state_dtype={STATE_DTYPES[policy[0]]!r} "
                                f"applies to float32, float16 and bfloat16 parameters; this "
                                f"one is float64 (its state stays float64 with state_dtype "
                                f"None)")
            if p64 is None:
                p64 = _new_plan(cnp.NPY_DOUBLE, spec, keys, sp, gi)
            plan = p64
        else:
            plan = None
            if low is None:
                low = []
            for x in low:
                if (<Plan>x).typenum == cnp.PyArray_TYPE(arr):
                    plan = <Plan>x
            if plan is None:
                storage = _storage_of(cnp.PyArray_TYPE(arr), kind != _KIND_ARRAY)
                plan = _new_plan(cnp.PyArray_TYPE(arr), spec, keys, sp, gi, storage, policy)
                low.append(plan)
        slot = plan._add(arr, g)
        if plan.sr and plan.storage == FO_FMT_BF16:
            # stochastic rounding of the parameter (and of bfloat16 state: see _bind)
            plan.ts[slot].storage |= FO_STORAGE_SR
            plan.ts[slot].seed = (<uint64_t>gi << 32) | <uint64_t>i
        nbytes = <uintptr_t>plan.ts[slot].numel * <uintptr_t>plan.itemsize
        _push(sp, cnp.PyArray_DATA(arr), nbytes, obj, i, plan.sid, _ROLE_PARAM)
        # a gradient that is the parameter itself (allowed above) is covered by the
        # parameter's span; a contiguous copy made by _check_grad shares nothing
        if g is gobj and cnp.PyArray_DATA(g) != cnp.PyArray_DATA(arr):
            _push(sp, cnp.PyArray_DATA(g), <uintptr_t>plan.ts[slot].numel
                  * <uintptr_t>cnp.PyArray_ITEMSIZE(g), obj, i, plan.sid, _ROLE_GRAD)
        if rec is not None:
            if kind < 0 or g is not gobj:
                rec.ok = False  # the adapter's path, or a gradient copied for the kernel
            else:
                rec.param(gi, i, obj, kind, plan, slot, arr)
                rec.grad(g, obj.grad if kind == _KIND_TENSOR else None)
        # master weights are state even where the optimizer keeps none (SGD without momentum)
        master = plan.master and plan.storage != FO_FMT_F32
        if init_mode == 2 and not master:
            continue
        item = PyDict_GetItem(state, obj)
        if init_mode == 0:
            need = item == NULL or len(<object>item) == 0
        else:
            need = (item == NULL or not isinstance(<object>item, dict)
                    or (init_mode == 1 and (<object>item).get(keys[0]) is None)
                    or (master and (<object>item).get(MASTER_KEY) is None))
        if need:
            missing.append((plan, slot, obj, arr, gi, i))
            if rec is not None:
                rec.ok = False
        else:
            if rec is not None and rec.ok:
                rec.state_dict(<object>item)
            plan._bind(slot, <object>item, arr, gi, i, sp, obj,
                       rec if rec is not None and rec.ok else None)
    out = [x for x in (p32, p64) if x is not None]
    if low is not None:
        out.extend(low)
    return tuple(out)


# ---- the cached step -----------------------------------------------------------------------
#
# A training loop steps the same parameters with the same state arrays over and over; only the
# gradients (new arrays each step, or the same ones refilled) and the hyperparameter values
# change. After a step that created no state, ``update`` keeps what it collected in a
# _StepCache of the optimizer: the plans with their pointers, the memory spans of every array
# the step writes (sorted, for binary search), and per parameter the objects it read. The next
# step checks each group's values as the full path does, then tensor by tensor that the
# parameter, its memory and every state entry are the objects and the memory of the cache
# (identity and pointer tests, no Python call for a NumPy parameter), and reads each gradient
# afresh, checking it as the full path does: dtype, shape, layout, and its memory against the
# spans the step writes. Then it runs the cached plans. Anything else (a parameter added,
# replaced or reshaped, a state entry replaced or moved, a gradient that appears or goes, a
# gradient the kernel cannot read in place, sparse gradients, new state) sends the step down
# the full path, which raises or makes a new cache; the cached step changes nothing before it
# has checked everything.

cdef inline bint _immutable_scalar(object v) noexcept:
    t = type(v)
    return t is float or t is int or t is bool or v is None or t is str


cdef class _GroupSnap:
    """A parameter group's items as a step checked them (its keys and values, in the dict's
    order, held) and the kernel's doubles they packed to. The check of a group's values is a
    pure function of its items, so a later step whose group holds the very same objects
    under the same keys takes the doubles as they are, with no dict copied, no value
    converted and no check run again. Only groups whose values (``params`` aside, which the
    step checks tensor by tensor) are immutable get one: floats, ints, bools, None, strings
    and tuples of those. A list of betas or a tensor lr could change in place unseen."""
    cdef tuple keys, values
    cdef double hyper[MAX_HYPER]

    cdef bint same(self, dict group) noexcept:
        cdef Py_ssize_t pos = 0, i = 0
        cdef PyObject *k
        cdef PyObject *v
        if PyDict_Size(group) != PyTuple_GET_SIZE(self.keys):
            return False
        while PyDict_Next(group, &pos, &k, &v):
            if (k != PyTuple_GET_ITEM(self.keys, i)
                    or v != PyTuple_GET_ITEM(self.values, i)):
                return False
            i += 1
        return True


cdef _GroupSnap _group_snap(dict group, double *hyper):
    """A _GroupSnap of ``group`` (checked, packed to ``hyper``), or None when a value other
    than ``params`` may change in place, or the group is a dict subclass."""
    cdef _GroupSnap snap
    cdef list keys = [], values = []
    if type(group) is not dict:
        return None
    for key, value in group.items():
        if not _immutable_scalar(value) and key != "params":
            if type(value) is not tuple:
                return None
            for item in <tuple>value:
                if not _immutable_scalar(item):
                    return None
        keys.append(key)
        values.append(value)
    snap = _GroupSnap.__new__(_GroupSnap)
    snap.keys = tuple(keys)
    snap.values = tuple(values)
    memcpy(snap.hyper, hyper, MAX_HYPER * sizeof(double))
    return snap


cdef class _StepCache:
    """What a step of one optimizer collected, kept to run the next steps (see above)."""
    cdef _trec *recs
    cdef Py_ssize_t n, cap
    cdef public bint ok       # False once a parameter took a path the cached step cannot
    cdef list refs            # references to everything the records point at
    cdef list groups          # per group: (group, params, len, keys, plans, policy, snap)
    cdef list plans
    cdef list foreign
    cdef object groups_list, state, spec, kinds, owner, tensor_type
    cdef uintptr_t *wlo       # the spans written by the step, sorted by start,
    cdef uintptr_t *whi       # and the greatest end among the first k of them
    cdef Py_ssize_t nw
    cdef unsigned char *snaps  # the tensors' snapshots (fo_snap_take), fo_tl.snap bytes each
    cdef Py_ssize_t nsnap, capsnap
    cdef readonly Py_ssize_t served  # steps run from the cache
    cdef readonly Py_ssize_t fallbacks  # tensors whose in-place check fell back to calls
    cdef readonly Py_ssize_t groups_same  # groups whose items were those checked before
    cdef uint64_t state_ver   # the version tag of the state dict when its items were found
                              # the same (0: never)
    cdef PyObject **gbuf      # room for the gradients a step reads (gcap of them), kept from
    cdef Py_ssize_t gcap      # step to step (NULL while a step uses it)
    cdef bint bump_raw        # the foreign parameters are the records' tensors with a
                              # gradient, in order: their versions are bumped in place
    cdef bint small           # the parameters hold at most _BARE_BYTES (see step)
    cdef readonly Py_ssize_t bare_reads  # gradients read without making a tensor object

    def __cinit__(self):
        self.recs = NULL
        self.n = 0
        self.cap = 0
        self.ok = True
        self.refs = []
        self.groups = []
        self.wlo = NULL
        self.whi = NULL
        self.nw = 0
        self.snaps = NULL
        self.nsnap = 0
        self.capsnap = 0
        self.served = 0
        self.fallbacks = 0
        self.groups_same = 0
        self.state_ver = 0
        self.gbuf = NULL
        self.gcap = 0
        self.bump_raw = False
        self.small = False
        self.bare_reads = 0

    def __dealloc__(self):
        free(self.gbuf)
        free(self.snaps)
        free(self.recs)
        free(self.wlo)
        free(self.whi)

    cdef int param(self, Py_ssize_t gi, Py_ssize_t pi, object obj, int kind, Plan plan,
                   Py_ssize_t slot, object arr) except -1:
        """Record parameter ``pi`` of group ``gi`` (slot -1: it has no gradient; ``arr``
        its array, None for a fastopt.Parameter without a gradient)."""
        cdef void *mem
        cdef _trec *r
        cdef Py_ssize_t cap, k
        if not self.ok:
            return 0
        if self.n == self.cap:
            cap = 64 if self.cap == 0 else 2 * self.cap
            mem = realloc(self.recs, cap * sizeof(_trec))
            if mem == NULL:
                raise MemoryError()
            self.recs = <_trec *>mem
            self.cap = cap
        r = &self.recs[self.n]
        memset(r, 0, sizeof(_trec))
        r.psnap = r.snap_lo = r.snap_hi = -1
        for k in range(_MAX_ENTRIES):
            r.esnap[k] = -1
        self.n += 1
        r.param = <PyObject *>obj
        self.refs.append(obj)
        if arr is None:
            arr = obj
        r.arr = <PyObject *>arr
        self.refs.append(arr)
        r.gi = <int32_t>gi
        r.pi = <int32_t>pi
        r.kind = kind
        if kind == _KIND_TENSOR:
            shape = obj.shape
            dtype = obj.dtype
            self.refs.append(shape)
            self.refs.append(dtype)
            r.shape = <PyObject *>shape
            r.dtype = <PyObject *>dtype
            r.pdata = <uintptr_t>obj.data_ptr()
            if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>arr):  # channels_last and such
                strides = obj.stride()
                self.refs.append(strides)
                r.strides = <PyObject *>strides
            if self.tensor_type is None:
                torch = sys.modules["torch"]
                self.tensor_type = torch.Tensor
                if _tensor_attrs is None:
                    _find_tensor_attrs(torch)
                if not _plain_tensor_type(torch.Tensor):
                    self.ok = False
            if not _plain_tensor_type(type(obj)):
                self.ok = False  # a subclass of its own attributes: the full path
            elif plan is not None:
                r.psnap = self.snapshot(obj, plan.itemsize, r.pdata)
                if r.psnap >= 0:
                    r.ndim = obj.dim()
        else:
            r.pdata = <uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>obj)
        if plan is not None:
            r.plan = <PyObject *>plan  # the plans are kept by the cache (plans)
            r.slot = <int32_t>slot
            r.numel = plan.ts[slot].numel
            r.itemsize = plan.itemsize
            r.typenum = plan.typenum
        self.prefetched_object(r, obj)
        return 0

    cdef int32_t snapshot(self, object obj, int64_t itemsize, uintptr_t data) except -2:
        """Take a snapshot of the tensor ``obj`` of the last record (its data pointer is
        ``data``, its elements ``itemsize`` bytes) for the in-place checks: its index in the
        snapshots, or -1 when the tensor is checked by method calls."""
        cdef void *mem
        cdef Py_ssize_t cap
        cdef unsigned char *sn
        cdef _trec *r = &self.recs[self.n - 1]
        if not fo_tl.ok:
            return -1
        try:
            # a dense CPU tensor whose sizes and strides are kept inline, of the probed
            # object layout (a subclass such as nn.Parameter adds its fields after it)
            if (obj.layout is not _torch_strided or obj.device.type != "cpu" or obj.is_nested
                    or obj.dim() > fo_tl.maxdim
                    or fo_word(<uintptr_t><PyObject *>obj + fo_tl.po)
                    != <uintptr_t>obj._cdata):
                return -1
        except Exception:
            return -1
        if self.nsnap == self.capsnap:
            cap = 64 if self.capsnap == 0 else 2 * self.capsnap
            mem = realloc(self.snaps, cap * fo_tl.snap)
            if mem == NULL:
                raise MemoryError()
            self.snaps = <unsigned char *>mem
            self.capsnap = cap
        sn = self.snaps + self.nsnap * fo_tl.snap
        if not fo_snap_take(<PyObject *>obj, sn) or fo_snap_data(sn, itemsize) != data:
            return -1
        self.nsnap += 1
        if r.snap_lo < 0:
            r.snap_lo = <int32_t>(self.nsnap - 1)
        r.snap_hi = <int32_t>self.nsnap
        return <int32_t>(self.nsnap - 1)

    cdef int32_t resnap(self, int32_t idx, object obj, int64_t itemsize,
                        uintptr_t data) except -2:
        """Take snapshot ``idx`` again, of the tensor ``obj`` that the method calls found
        with its memory (``data``, elements of ``itemsize`` bytes) and layout: ``idx``, or
        -1 when it cannot be read in place any more. Its sizes, strides and element count
        must be the old snapshot's (the method calls of a parameter look at its memory and
        layout, not its shape; its gradient's in-place check takes the sizes from here)."""
        cdef unsigned char *sn = self.snaps + idx * fo_tl.snap
        cdef unsigned char old[256]
        cdef size_t lo = 16 + fo_tl.ndim - fo_tl.storage, n = fo_tl.numel + 8 - fo_tl.ndim
        if n > sizeof(old):
            return -1
        memcpy(old, sn + lo, n)
        if (not fo_snap_take(<PyObject *>obj, sn) or fo_snap_data(sn, itemsize) != data
                or memcmp(old, sn + lo, n) != 0):
            return -1
        return idx

    cdef void prefetched(self, _trec *r, uintptr_t lo, int lines) noexcept:
        """Add ``lines`` lines of 64 bytes from ``lo`` to the prefetched memory of ``r``."""
        if r.npf < _MAX_PF and lo != 0:
            r.pf[r.npf] = (lo & ~(<uintptr_t>3)) | <uintptr_t>(lines - 1)
            r.npf += 1

    cdef void prefetched_bytes(self, _trec *r, uintptr_t lo, uintptr_t hi) noexcept:
        """Add the lines holding the bytes [lo, hi) (at most 4 lines) to those of ``r``."""
        cdef uintptr_t a = lo & ~(<uintptr_t>63)
        cdef int lines = <int>(((hi - 1) >> 6) - (lo >> 6) + 1)
        self.prefetched(r, a, 4 if lines > 4 else lines)

    cdef int prefetched_object(self, _trec *r, object obj) except -1:
        """Add the memory the cached step reads of the ndarray or tensor ``obj``: the object
        (an array's shape too), and a tensor's TensorImpl and StorageImpl, whose addresses
        torch gives as ``_cdata``: where the checks read them in place (fo_tl), the lines of
        the fields they read, else the objects' first lines."""
        cdef uintptr_t o = <uintptr_t><void *>obj
        if cnp.PyArray_Check(obj):
            self.prefetched(r, o, 2)
            self.prefetched(r, <uintptr_t>cnp.PyArray_DIMS(<cnp.ndarray>obj), 1)
            return 0
        cdef uintptr_t impl, storage
        if not self.ok or not _plain_tensor_type(type(obj)):
            self.prefetched(r, o, 2)
            return 0  # the cache will not be used, or the object is not a plain tensor
        try:
            impl = <uintptr_t>obj._cdata
            storage = <uintptr_t>obj.untyped_storage()._cdata
        except Exception:
            return 0  # not a tensor with these: no prefetch (the checks need none)
        if fo_tl.ok:
            # its type and TensorImpl pointer; the TensorImpl and StorageImpl bytes a
            # snapshot holds
            self.prefetched_bytes(r, o + 8, o + fo_tl.po + 8)
            self.prefetched_bytes(r, impl + fo_tl.storage, impl + fo_tl.end)
            self.prefetched_bytes(r, storage + fo_tl.sdata, storage + fo_tl.send)
        else:
            self.prefetched(r, o, 2)
            self.prefetched(r, impl, 4)
            self.prefetched(r, storage, 2)
        return 0

    cdef int grad(self, cnp.ndarray g, object gt) except -1:
        """Record the gradient ``g`` of the last parameter (``gt``: the tensor it views)."""
        if not self.ok:
            return 0
        cdef _trec *r = &self.recs[self.n - 1]
        cdef uintptr_t gimpl, d
        r.gtypenum = cnp.PyArray_TYPE(g)
        r.gitemsize = cnp.PyArray_ITEMSIZE(g)
        if gt is not None:
            gdtype = gt.dtype
            self.refs.append(gdtype)
            r.gdtype = <PyObject *>gdtype
        r.glo = <uintptr_t>cnp.PyArray_DATA(g)
        r.ghi = r.glo + <uintptr_t>(r.numel * r.gitemsize)
        if r.psnap < 0 or type(gt) is not self.tensor_type:
            return 0
        try:
            if (gt.layout is not _torch_strided or gt.device.type != "cpu" or gt.is_nested
                    or fo_word(<uintptr_t><PyObject *>gt + fo_tl.po) != <uintptr_t>gt._cdata):
                return 0
        except Exception:
            return 0
        # read in place from the next step on when this gradient, read so, gives the data
        # pointer the full path checked (its sizes and strides those of the parameter)
        gimpl = fo_word(<uintptr_t><PyObject *>gt + fo_tl.po)
        memcpy(r.gtail, <const void *>(gimpl + fo_tl.numel + 8), fo_tl_tail())
        if (fo_grad_read(<PyObject *>gt, self.snaps + r.psnap * fo_tl.snap, r.ndim, r.gtail,
                         r.numel, r.gitemsize, &d) and d == r.glo):
            r.graw = 1
        return 0

    cdef int state_dict(self, object st) except -1:
        if not self.ok:
            return 0
        cdef _trec *r = &self.recs[self.n - 1]
        r.st = <PyObject *>st
        self.refs.append(st)
        # its version tag (its items are read only when that changed)
        self.prefetched_bytes(r, <uintptr_t><void *>st, <uintptr_t><void *>st + 32)
        r.hash = PyObject_Hash(<object>r.param)
        return 0

    cdef int entry(self, PyObject *item, cnp.ndarray a, object key, int kind) except -1:
        """Record the next state entry ``item``, ``state[key]``, read for the last
        parameter; ``a`` is its array (the entry itself, or the view of a tensor), and kind
        what the full path checked it to be (see _trec.ekind)."""
        if not self.ok:
            return 0
        cdef _trec *r = &self.recs[self.n - 1]
        cdef object obj = <object>item
        cdef int k = r.nentry
        if k >= _MAX_ENTRIES:
            self.ok = False
            return 0
        r.entry[k] = item
        self.refs.append(obj)
        self.refs.append(key)
        r.ekey[k] = <PyObject *>key
        r.ekind[k] = kind
        r.etype[k] = cnp.PyArray_TYPE(a)
        r.esize[k] = cnp.PyArray_SIZE(a)
        self.prefetched_object(r, obj)
        if cnp.PyArray_Check(obj):
            r.eptr[k] = <uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>obj)
        else:
            if type(obj) is not self.tensor_type:
                self.ok = False  # a tensor subclass, or a tensor of a NumPy parameter
            r.eptr[k] = <uintptr_t>obj.data_ptr()
            r.ever[k] = <int64_t>fo_descr_get(_T_VERSION, obj)
            r.tensors |= 1 << k
            if r.eptr[k] != <uintptr_t>cnp.PyArray_DATA(a):
                self.ok = False
            elif self.ok:
                r.eitem[k] = <int32_t>cnp.PyArray_ITEMSIZE(a)
                r.esnap[k] = self.snapshot(obj, r.eitem[k], r.eptr[k])
        r.nentry = k + 1
        return 0

    cdef int finish(self, object opt, list plans, list foreign, _Spans sp, tuple kinds,
                    Spec spec) except -1:
        """Make the cache of ``opt`` from the step just collected (its groups recorded in
        ``groups``)."""
        cdef Py_ssize_t i
        cdef _trec *r
        cdef int64_t nbytes = 0
        for i in range(self.n):
            r = &self.recs[i]
            if r.plan != NULL:  # the plans no longer grow: their slots stay put
                r.t = &(<Plan>r.plan).ts[r.slot]
                nbytes += r.numel * r.itemsize
        self.small = nbytes <= _BARE_BYTES
        self.plans = plans
        self.foreign = foreign
        self.bump_raw = fo_tl.ok and fo_tl.vc != 0 and self.bumps_all(foreign)
        self.written(sp)
        self.groups_list = opt.param_groups
        self.state = opt.state
        self.kinds = kinds
        self.spec = spec
        key = PyLong_FromVoidPtr(<void *>opt)
        self.owner = _weakref.ref(opt, _functools.partial(_forget_key, key))
        _step_caches[key] = self
        return 0

    cdef bint bumps_all(self, list foreign) except -1:
        """Whether ``foreign``, the parameters the step bumps, are the tensors of the records
        with a gradient, in order (then ``bump`` bumps them)."""
        cdef Py_ssize_t i, j = 0
        cdef _trec *r
        for i in range(self.n):
            r = &self.recs[i]
            if r.t == NULL:
                continue
            if (r.kind != _KIND_TENSOR or j >= PyList_GET_SIZE(foreign)
                    or PyList_GET_ITEM(foreign, j) != r.param):
                return False
            j += 1
        return j == PyList_GET_SIZE(foreign)

    cdef int bump(self) except -1:
        """Bump the version counters of the parameters the step updated, as torch's in-place
        ops do: in place where the parameter's snapshot (checked by this step) holds its
        counter, through torch's call for the others (an inference tensor has none: torch
        says what is wrong)."""
        cdef Py_ssize_t i
        cdef _trec *r
        cdef _trec *rn
        cdef uintptr_t c
        cdef list rest = None
        for i in range(self.n):
            if i + 8 < self.n:
                rn = &self.recs[i + 8]
                if rn.t != NULL and rn.psnap >= 0:
                    c = fo_snap_counter(self.snaps + rn.psnap * fo_tl.snap)
                    if c != 0:
                        fo_prefetch_write(c + fo_tl.vv)
            r = &self.recs[i]
            if r.t == NULL:
                continue
            c = fo_snap_counter(self.snaps + r.psnap * fo_tl.snap) if r.psnap >= 0 else 0
            if c != 0:
                fo_counter_bump(c)
            else:
                if rest is None:
                    rest = []
                rest.append(<object>r.param)
        if rest is not None:
            _foreign_updated(rest)
        return 0

    cdef int written(self, _Spans sp) except -1:
        """Keep the spans of ``sp`` the step writes (all but the gradients), sorted."""
        cdef Py_ssize_t k, m = 0
        cdef _skey *keys = <_skey *>malloc((sp.n + 1) * sizeof(_skey))
        cdef uintptr_t hi = 0
        if keys == NULL:
            raise MemoryError()
        for k in range(sp.n):
            if (sp.info[k].tag & ((1 << _ROLE_BITS) - 1)) != _ROLE_GRAD:
                keys[m].lo = sp.lo[k]
                keys[m].idx = <uint64_t>sp.hi[k]
                m += 1
        qsort(keys, m, sizeof(_skey), _cmp_skey)
        self.wlo = <uintptr_t *>malloc((m + 1) * sizeof(uintptr_t))
        self.whi = <uintptr_t *>malloc((m + 1) * sizeof(uintptr_t))
        if self.wlo == NULL or self.whi == NULL:
            free(keys)
            raise MemoryError()
        for k in range(m):
            self.wlo[k] = keys[k].lo
            if <uintptr_t>keys[k].idx > hi:
                hi = <uintptr_t>keys[k].idx
            self.whi[k] = hi
        self.nw = m
        free(keys)
        return 0

    cdef inline bint laid_out(self, _trec *r, object t) except -1:
        """Whether the tensor ``t`` (the parameter of ``r`` or its gradient) has the layout of
        the parameter's cached view: contiguous, or the recorded strides."""
        if r.strides == NULL:
            return PyObject_CallOneArg(_T_IS_CONTIGUOUS, t) is True
        return _same_size(PyObject_CallOneArg(_T_STRIDE, t), <object>r.strides)

    cdef bint clear_of_writes(self, uintptr_t lo, uintptr_t hi) noexcept:
        """Whether [lo, hi) shares no byte with an array the step writes."""
        cdef Py_ssize_t a = 0, b = self.nw, mid
        if lo >= hi:
            return True
        while a < b:  # a = the number of spans that start before hi
            mid = (a + b) >> 1
            if self.wlo[mid] < hi:
                a = mid + 1
            else:
                b = mid
        return a == 0 or self.whi[a - 1] <= lo

    cdef int step(self, object opt, tuple kinds, Spec spec) except -1:
        """Run a step from the cache: 1 when it ran, 0 when something differs from the
        cached step (nothing has changed then; the caller takes the full path)."""
        cdef Py_ssize_t gi, i, ng = len(self.groups)
        cdef double hyper[MAX_HYPER]
        cdef tuple ge
        cdef list rounding = None
        cdef PyObject **gkeep  # the gradients read, kept alive while the kernels run
        cdef Py_ssize_t nkeep = 0, gcap
        cdef int gc_was
        cdef bint bare
        groups = opt.param_groups
        if (groups is not self.groups_list or len(groups) != ng
                or opt.state is not self.state):
            return 0
        state = self.state
        for gi in range(ng):
            ge = <tuple>self.groups[gi]
            group = groups[gi]
            if group is not ge[0]:
                return 0
            snap = ge[6]
            if snap is not None and (<_GroupSnap>snap).same(group):
                # the very items checked before (params included): the same doubles
                if PyList_GET_SIZE(ge[1]) != ge[2]:
                    return 0
                for plan in ge[4]:
                    memcpy((<Plan>plan).hyper, (<_GroupSnap>snap).hyper,
                           MAX_HYPER * sizeof(double))
                    (<Plan>plan).round_key = 0
                self.groups_same += 1
                continue
            try:
                frozen = freeze(group, kinds[0], kinds[1], kinds[2])
                if spec.custom_check:
                    opt._check_step(frozen)
                else:
                    check_frozen(frozen, spec.nonneg_at_step, spec.beta1_division)
                spec.pack(frozen, hyper)
            except (ValueError, TypeError, OverflowError, ZeroDivisionError) as e:
                raise type(e)(f"param_groups[{gi}]: {e}") from None
            if spec.layout(frozen) != ge[3]:
                return 0
            if group["params"] is not ge[1] or PyList_GET_SIZE(ge[1]) != ge[2]:
                return 0
            try:
                policy = _policy(group)
            except (ValueError, TypeError) as e:
                raise type(e)(f"param_groups[{gi}]: {e}") from None
            if policy[:4] != ge[5]:
                return 0
            if policy[2]:
                if rounding is None:
                    rounding = []
                rounding.append(group)
            for plan in ge[4]:
                memcpy((<Plan>plan).hyper, hyper, MAX_HYPER * sizeof(double))
                (<Plan>plan).round_key = <uint64_t>policy[4]
            # stochastic rounding counts its steps in the group: no snapshot then
            self.groups[gi] = ge[:6] + ((_group_snap(group, hyper)
                                         if not policy[2] and not spec.custom_check
                                         else None),)
        # the cache's room for the gradients, taken while this step uses it (a step of
        # the same cache inside this one, from a Python hook of torch's, makes its own)
        gkeep = self.gbuf
        gcap = self.gcap
        self.gbuf = NULL
        if gkeep == NULL or gcap < self.n + 1:
            free(gkeep)
            gcap = self.n + 1
            gkeep = <PyObject **>malloc(gcap * sizeof(PyObject *))
            if gkeep == NULL:
                raise MemoryError()
        # gradients read without tensor objects: a step small enough that holding the GIL
        # through its kernels costs other threads little (about a millisecond at most), no
        # torch function mode (it would see torch's getter), and the garbage collector off
        # while the records are read (see _step)
        bare = (fo_tl.ag != 0 and self.small and _tf_mode_on is not None
                and not _tf_mode_on())
        gc_was = fo_gc_off() if bare else -1
        try:
            return self._step(state, gkeep, &nkeep, spec, rounding, &gc_was)
        finally:
            if gc_was == 1:
                fo_gc_on()
            for i in range(nkeep):
                Py_DECREF(<object>gkeep[i])
            if self.gbuf == NULL:
                self.gbuf = gkeep
                self.gcap = gcap
            else:
                free(gkeep)

    cdef int _step(self, object state, PyObject **gkeep, Py_ssize_t *nkeep,
                   Spec spec, list rounding, int *gc_was) except -1:
        """The per-tensor part of ``step``, once the groups are checked: the gradients read
        go to ``gkeep`` (new references, ``nkeep`` of them, released by the caller);
        the groups of ``rounding`` count the step (their ``rounding_step``) before it runs.
        ``gc_was``: what fo_gc_off() returned (-1: it was not called). With the collector
        off, a gradient that has no tensor object yet (made by backward) is read in place
        without making one (fo_grad_of). Nothing holds a reference to it then: no
        collection runs while the step reads the records (nothing else in it drops the last
        reference to an object), and its kernels run with the GIL held, so that no other
        Python thread can drop it (a backward that another thread runs on the same
        parameters at the same time could: a race that torch.optim's steps do not survive
        either, reading half-accumulated gradients). Without such a read the collector is
        back on (and ``gc_was`` -1) before the kernels run with the GIL released."""
        cdef Py_ssize_t i, k
        cdef tuple ge
        cdef _trec *r
        cdef _trec *rn
        cdef PyObject *item
        cdef cnp.ndarray ga
        cdef uintptr_t gp, ghi
        cdef list params
        cdef uint64_t ver, sver = fo_dict_version(<PyObject *>state)
        cdef bint same, ok, have_cur
        cdef uintptr_t a
        # the gradients of this record and the next two, read ahead (record j's in slot
        # j % 3; got: read without an error), and the next record to read
        cdef list ahead = [None, None, None]
        cdef bint got[3]
        cdef Py_ssize_t fetched = 1
        cdef uintptr_t gahead[3]  # bare: the gradients' TensorImpls read ahead (0: none)
        cdef uintptr_t gimpl
        cdef PyObject *gobj
        cdef bint nobj, held = False, bare = gc_was[0] >= 0
        cdef Py_ssize_t nbare = 0
        got[0] = got[1] = got[2] = False
        gahead[0] = gahead[1] = gahead[2] = 0
        tensor_type = self.tensor_type
        for i in range(self.n):
            r = &self.recs[i]
            if i + _REC_AHEAD < self.n:  # the record itself and its snapshots, further ahead
                rn = &self.recs[i + _REC_AHEAD]
                fo_prefetch_span(rn, sizeof(_trec))
                if rn.snap_lo >= 0:
                    fo_prefetch_span(self.snaps + rn.snap_lo * fo_tl.snap,
                                     (rn.snap_hi - rn.snap_lo) * fo_tl.snap)
            if i + _PF_AHEAD < self.n:
                rn = &self.recs[i + _PF_AHEAD]
                for k in range(rn.npf):
                    fo_prefetch_lines(rn.pf[k])
                if fo_tl.am != 0 and rn.psnap >= 0:  # its autograd metadata: its gradient
                    a = fo_word(<uintptr_t>(self.snaps + rn.psnap * fo_tl.snap + 16
                                            + fo_tl.am - fo_tl.storage))
                    if a != 0:
                        fo_prefetch_span(<void *>a, 64)
            # the gradients up to two records ahead, read now so that the lines of a
            # gradient's TensorImpl come while this record is checked, and those of its
            # storage while the next one is (an error reading it: read again at its turn)
            while bare and fetched <= i + 2 and fetched < self.n:
                # (the live objects: the parameter's TensorImpl, its autograd metadata)
                rn = &self.recs[fetched]
                gimpl = 0
                if rn.kind == _KIND_TENSOR and rn.graw and rn.psnap >= 0:
                    gimpl = fo_grad_of(fo_word(<uintptr_t>rn.param + fo_tl.po), &gobj)
                    if gimpl != 0:
                        fo_prefetch_span(<void *>(gimpl + fo_tl.storage),
                                         fo_tl.end - fo_tl.storage)
                gahead[fetched % 3] = gimpl
                fetched += 1
            if bare and i + 1 < self.n and gahead[(i + 1) % 3] != 0:
                a = fo_word(gahead[(i + 1) % 3] + fo_tl.storage)
                if a != 0:
                    fo_prefetch_span(<void *>(a + fo_tl.sdata), fo_tl.send - fo_tl.sdata)
            while fetched <= i + 2 and fetched < self.n:
                rn = &self.recs[fetched]
                x = None
                ok = False
                if rn.kind == _KIND_TENSOR and rn.graw:
                    try:
                        x = fo_descr_get(_T_GRAD, <object>rn.param)
                        ok = True
                    except Exception:
                        x = None
                    if ok and type(x) is tensor_type:
                        a = fo_word(<uintptr_t><PyObject *>x + fo_tl.po)
                        if a != 0:
                            fo_prefetch_span(<void *>(a + fo_tl.storage),
                                             fo_tl.end - fo_tl.storage)
                ahead[fetched % 3] = x
                got[fetched % 3] = ok
                fetched += 1
            have_cur = got[i % 3]
            cur = ahead[i % 3]
            got[i % 3] = False
            ahead[i % 3] = None
            if i + 1 < self.n and got[(i + 1) % 3]:
                x = ahead[(i + 1) % 3]
                if type(x) is tensor_type:
                    a = fo_word(<uintptr_t><PyObject *>x + fo_tl.po)
                    if a != 0:
                        a = fo_word(a + fo_tl.storage)
                        if a != 0:
                            fo_prefetch_span(<void *>(a + fo_tl.sdata),
                                             fo_tl.send - fo_tl.sdata)
            ge = <tuple>self.groups[r.gi]
            params = <list>ge[1]
            if PyList_GET_ITEM(params, r.pi) != r.param:
                return 0
            obj = <object>r.param
            if r.kind == _KIND_ARRAY:
                if (<uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>obj) != r.pdata
                        or (r.t != NULL and (
                            cnp.PyArray_SIZE(<cnp.ndarray>obj) != r.numel
                            or cnp.PyArray_TYPE(<cnp.ndarray>obj) != r.typenum
                            or (cnp.PyArray_FLAGS(<cnp.ndarray>obj) & _NEED_FLAGS) != _NEED_FLAGS
                            or not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>obj)))):
                    return 0
                g = obj.grad
                if g is None:
                    if r.t != NULL:
                        return 0
                    continue
                if r.t == NULL or not cnp.PyArray_Check(g):
                    return 0
                ga = <cnp.ndarray>g
                if (cnp.PyArray_TYPE(ga) != r.gtypenum or not cnp.PyArray_ISNOTSWAPPED(ga)
                        or not cnp.PyArray_IS_C_CONTIGUOUS(ga) or not cnp.PyArray_ISALIGNED(ga)
                        or not _same_shape(<cnp.ndarray>obj, ga)):
                    return 0
                gp = <uintptr_t>cnp.PyArray_DATA(ga)
            else:
                # the memory and the layout of the cached view: ``.data =`` and ``set_`` move
                # the memory, ``set_`` and ``as_strided_`` can lay it out anew in place; its
                # shape is the gradient's, compared below
                # its TensorImpl and storage fields as in the snapshot, or else its memory and
                # layout by method calls (then a new snapshot)
                if r.psnap < 0 or not fo_snap_same(r.param, self.snaps + r.psnap * fo_tl.snap):
                    self.fallbacks += r.psnap >= 0
                    try:
                        if (<uintptr_t>PyObject_CallOneArg(_T_DATA_PTR, obj) != r.pdata
                                or not self.laid_out(r, obj)):
                            return 0
                    except Exception:
                        return 0
                    if r.psnap >= 0:
                        r.psnap = self.resnap(r.psnap, obj, r.itemsize, r.pdata)
                nobj = False
                if bare and r.graw and r.psnap >= 0:
                    gimpl = fo_grad_of(fo_word(<uintptr_t>r.param + fo_tl.po), &gobj)
                    if gimpl == 0:
                        g = None
                    elif (gobj == NULL and r.t != NULL
                          and fo_grad_read_impl(gimpl, self.snaps + r.psnap * fo_tl.snap,
                                                r.ndim, r.gtail, r.numel, r.gitemsize, &gp)):
                        nobj = True  # no tensor object, none made
                    elif gobj != NULL and (<uintptr_t>gobj & 7) == 0:
                        g = <object>gobj  # what torch's getter gives
                    else:
                        g = fo_descr_get(_T_GRAD, obj)
                else:
                    g = cur if have_cur else fo_descr_get(_T_GRAD, obj)
                if nobj:
                    g = None
                elif g is None:
                    if r.t != NULL:
                        return 0
                    continue
                elif r.t == NULL or type(g) is not tensor_type:
                    return 0
                # what .numpy() checks on the full path, without making an array: a dense
                # tensor (a sparse, CSR or MKL-DNN one raises or is not contiguous) of the
                # parameter's dtype, shape and layout, not a lazily negated view; read in
                # place, the same fields and dispatch keys as the gradient the full path
                # accepted
                if nobj:
                    held = True
                    nbare += 1
                elif not (r.graw and r.psnap >= 0
                          and fo_grad_read(<PyObject *>g, self.snaps + r.psnap * fo_tl.snap,
                                           r.ndim, r.gtail, r.numel, r.gitemsize, &gp)):
                    self.fallbacks += r.graw
                    try:
                        if (not self.laid_out(r, g)
                                or fo_descr_get(_T_DTYPE, g) is not <object>r.gdtype
                                or not _same_size(fo_descr_get(_T_SHAPE, g), <object>r.shape)
                                or PyObject_CallOneArg(_T_IS_NEG, g) is not False):
                            return 0
                        gp = <uintptr_t>PyObject_CallOneArg(_T_DATA_PTR, g)
                        # a storage freed or shrunk under the gradient (.numpy() does not
                        # look)
                        if not (fo_storage_holds(<PyObject *>g, r.numel, r.gitemsize)
                                if fo_tl.ok else storage_holds(g)):
                            return 0
                    except Exception:
                        return 0
            if g is not None:
                Py_INCREF(g)
                gkeep[nkeep[0]] = <PyObject *>g
                nkeep[0] += 1
            ghi = gp + <uintptr_t>(r.numel * r.gitemsize)
            if gp != r.glo or ghi != r.ghi:
                # the parameter itself is fine, as in the full path; any other array the
                # step writes is not
                if not (gp == r.pdata or self.clear_of_writes(gp, ghi)):
                    return 0
                r.glo = gp
                r.ghi = ghi
            if r.st != NULL:
                # a dict's version tag is new whenever one of its items changes: a state dict
                # and a parameter's state of the tag found before hold the same objects
                if sver == 0 or sver != self.state_ver:
                    item = fo_dict_get_hashed(state, obj, r.hash)
                    if item != r.st:
                        if item == NULL:
                            PyErr_Clear()
                        return 0
                ver = fo_dict_version(r.st)
                same = ver != 0 and ver == r.stver
                for k in range(r.nentry):
                    if same:
                        item = r.entry[k]
                    else:
                        item = PyDict_GetItem(<object>r.st, <object>r.ekey[k])
                        if item != r.entry[k]:
                            return 0
                    if r.tensors & (1 << k):
                        if (r.esnap[k] < 0
                                or not fo_snap_same(item, self.snaps + r.esnap[k] * fo_tl.snap)):
                            self.fallbacks += r.esnap[k] >= 0
                            try:
                                if (<uintptr_t>PyObject_CallOneArg(_T_DATA_PTR, <object>item)
                                        != r.eptr[k]
                                        or <int64_t>fo_descr_get(_T_VERSION, <object>item)
                                        != r.ever[k]):
                                    return 0
                            except Exception:
                                return 0  # (the full path says what is wrong)
                            if r.esnap[k] >= 0:
                                r.esnap[k] = self.resnap(r.esnap[k], <object>item,
                                                         r.eitem[k], r.eptr[k])
                    elif (<uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>item) != r.eptr[k]
                          or (cnp.PyArray_FLAGS(<cnp.ndarray>item) & _NEED_FLAGS) != _NEED_FLAGS
                          or not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>item)):
                        return 0
                    elif cnp.PyArray_TYPE(<cnp.ndarray>item) != r.etype[k]:
                        return 0
                    elif r.ekind[k] == 0:  # an array of the parameter's shape
                        if not _same_shape(<cnp.ndarray>item, <cnp.ndarray>r.arr):
                            return 0
                    elif (cnp.PyArray_SIZE(<cnp.ndarray>item) != r.esize[k]
                          or (r.ekind[k] == 1 and cnp.PyArray_NDIM(<cnp.ndarray>item) != 1)):
                        return 0
            if r.st != NULL:
                r.stver = fo_dict_version(r.st)
            r.t.grad = <void *>gp
            r.t.flags = 0
        self.state_ver = sver
        if rounding is not None:
            for group in rounding:
                group["rounding_step"] = group.get("rounding_step", 0) + 1
        if not held and gc_was[0] == 1:
            fo_gc_on()
            gc_was[0] = -1
        _run(self.plans, spec.kernel, held)
        self.bare_reads += nbare
        self.served += 1
        if self.foreign:
            if self.bump_raw:
                self.bump()
            else:
                _foreign_updated(self.foreign)
        return 1


# id(optimizer) -> its _StepCache
cdef dict _step_caches = {}


def _forget_key(key, _ref):
    _step_caches.pop(key, None)


cdef _StepCache _cache_of(object opt):
    cdef PyObject *item = PyDict_GetItem(_step_caches, PyLong_FromVoidPtr(<void *>opt))
    if item == NULL:
        return None
    cdef _StepCache c = <_StepCache>item
    if c.owner() is not opt:
        return None
    return c


def forget(opt):
    """Drop the cached step of ``opt`` (its next step takes the full path): called when the
    optimizer's state is replaced, so that the cache holds no reference to the old one."""
    _step_caches.pop(id(opt), None)


def cached(opt):
    """Whether the next step of ``opt`` may run from its cache (for tests)."""
    return _cache_of(opt) is not None


def cache_info(opt):
    """What the cache of ``opt`` holds (for tests and benchmarks), or None: the steps run from
    it, the in-place checks that fell back to method calls, the groups whose items were
    those of the step before (see _GroupSnap), its records, and how many of their tensors it
    checks by reading torch's objects in place (see fo_tlayout): parameters, state tensors,
    gradients."""
    cdef _StepCache c = _cache_of(opt)
    cdef Py_ssize_t i, k, np_ = 0, ns = 0, ng = 0
    cdef _trec *r
    if c is None:
        return None
    for i in range(c.n):
        r = &c.recs[i]
        np_ += r.psnap >= 0
        ng += r.graw
        for k in range(r.nentry):
            ns += r.esnap[k] >= 0
    return {"served": c.served, "fallbacks": c.fallbacks, "groups_same": c.groups_same,
            "records": c.n, "raw_params": np_,
            "raw_state": ns, "raw_grads": ng, "bare_reads": c.bare_reads}


cdef int _run(list plans, int kernel, bint hold_gil=False) except -1:
    """One fo_step call over the non-empty plans, in list order, the GIL released (held with
    ``hold_gil``: the kernels read memory that only the GIL keeps alive)."""
    cdef Py_ssize_t ng = 0
    cdef Plan plan
    cdef fo_group *gs = <fo_group *>malloc((len(plans) + 1) * sizeof(fo_group))
    if gs == NULL:
        raise MemoryError()
    for obj in plans:
        plan = <Plan>obj
        if plan.n == 0:
            continue
        gs[ng].kernel = kernel
        gs[ng].f64 = plan.typenum == cnp.NPY_DOUBLE
        gs[ng].serial = plan.serial if plan.serial >= 0 else plan._serial()
        gs[ng].hyper = plan.hyper
        gs[ng].ts = plan.ts
        gs[ng].nt = plan.n
        gs[ng].round_key = plan.round_key
        ng += 1
    if hold_gil:
        fo_step(gs, ng)
    else:
        with nogil:
            fo_step(gs, ng)
    free(gs)
    return 0


def update(opt, tuple kinds, Spec spec):
    """The body of ``Optimizer._update`` for ``opt``, whose hyperparameter kinds are
    ``kinds`` (numeric keys, flag keys, (key, length) pairs) and whose class is described
    by ``spec``: check and freeze every group, collect every parameter and check the memory
    the step touches first (nothing is modified), then create missing state through
    ``opt._create_state``, then run all groups in one call into C. With ``spec.sparse_ok``
    the parameters with sparse gradients are handed to ``opt._sparse_step(items, work)``
    after the checks, which checks them and returns a function that updates them; it is
    called after the C call."""
    cdef list missing = [], work = [], plans = [], foreign = [], rounding = []
    cdef list sparse = [] if spec.sparse_ok else None
    cdef Py_ssize_t gi = 0
    cdef tuple numeric = kinds[0], flags = kinds[1], pairs = kinds[2]
    cdef tuple nonneg = spec.nonneg_at_step
    cdef tuple keys
    cdef double hyper[MAX_HYPER]
    cdef int mode
    cdef _Spans sp
    cdef _StepCache rec = _cache_of(opt)
    if rec is not None:
        _step_caches.pop(PyLong_FromVoidPtr(<void *>opt), None)
        if rec.spec is spec and (rec.kinds is kinds or rec.kinds == kinds):
            if rec.step(opt, kinds, spec):
                _step_caches[PyLong_FromVoidPtr(<void *>opt)] = rec
                return
    sp = _Spans()
    state = opt.state
    # record this step, to run the next ones from a cache (a dict as state, a list of
    # parameters per group, and no parameter that takes another path: see _StepCache)
    rec = _StepCache() if PyDict_Check(state) else None
    for group in opt.param_groups:
        try:
            frozen = freeze(group, numeric, flags, pairs)
            if spec.custom_check:
                opt._check_step(frozen)
            else:
                check_frozen(frozen, nonneg, spec.beta1_division)
            spec.pack(frozen, hyper)
        except (ValueError, TypeError, OverflowError, ZeroDivisionError) as e:
            raise type(e)(f"param_groups[{gi}]: {e}") from None
        try:
            policy = _policy(group)
        except (ValueError, TypeError) as e:
            raise type(e)(f"param_groups[{gi}]: {e}") from None
        if policy[2]:
            rounding.append(group)
        params = group["params"]
        if type(params) is not list:
            params = list(params)
            rec = None
        keys = spec.layout(frozen)
        mode = spec.init_mode(keys)
        gplans = _collect(gi, params, state, spec, keys, mode, missing, sp, foreign, sparse,
                          rec, policy)
        for plan in gplans:
            memcpy((<Plan>plan).hyper, hyper, MAX_HYPER * sizeof(double))
            plans.append(plan)
        work.append((frozen, keys, mode))
        if rec is not None:
            rec.groups.append((group, params, len(params), keys, gplans, policy[:4],
                               _group_snap(group, hyper)
                               if not policy[2] and not spec.custom_check else None))
        gi += 1
    _check_spans(sp)
    commit = None
    if sparse:
        # checked and computed first, stored after the dense update (cannot fail then)
        commit = opt._sparse_step(sparse, work)
    if missing:
        opt._create_state(missing, work)
    if rec is not None and rec.ok and not missing and not sparse:
        rec.finish(opt, plans, foreign, sp, kinds, spec)
    for group in rounding:
        group["rounding_step"] = group.get("rounding_step", 0) + 1
    _run(plans, spec.kernel)
    if rec is not None and rec.ok:
        for plan in plans:
            (<Plan>plan).gkeep = None
    if commit is not None:
        commit()
    if foreign:
        _foreign_updated(foreign)


def quantize_blockwise(x, bint signed):
    """The 8-bit block-wise code of ``x`` (any real array, read in C order as float32):
    (codes, scales), uint8 codes of x's shape and float32 scales of shape
    (ceil(x.size / 256),). See fastopt.quantize_blockwise."""
    cdef cnp.ndarray a = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    cdef cnp.ndarray codes = np.empty((<object>a).shape, dtype=np.uint8)
    cdef int64_t n = cnp.PyArray_SIZE(a), k, m
    cdef int64_t nb = (n + FO_Q8_BLOCK - 1) // FO_Q8_BLOCK
    cdef cnp.ndarray scales = np.empty(nb, dtype=np.float32)
    cdef const float *src = <const float *>cnp.PyArray_DATA(a)
    cdef uint8_t *dst = <uint8_t *>cnp.PyArray_DATA(codes)
    cdef float *sc = <float *>cnp.PyArray_DATA(scales)
    cdef int fmt = FO_FMT_Q8S if signed else FO_FMT_Q8U
    with nogil:
        for k in range(nb):
            m = n - k * FO_Q8_BLOCK
            if m > FO_Q8_BLOCK:
                m = FO_Q8_BLOCK
            sc[k] = fo_q8_encode(fmt, src + k * FO_Q8_BLOCK, dst + k * FO_Q8_BLOCK, m)
    return codes, scales


def dequantize_blockwise(codes, scales, bint signed):
    """The float32 values of 8-bit block-wise ``codes`` (uint8, any shape, read in C order)
    with their block ``scales``. See fastopt.dequantize_blockwise."""
    cdef cnp.ndarray q = np.asarray(codes)
    if q.dtype != np.uint8:
        raise TypeError(f"codes must be a uint8 array, got dtype {q.dtype}")
    q = np.ascontiguousarray(q)
    cdef int64_t n = cnp.PyArray_SIZE(q), k, m
    cdef int64_t nb = (n + FO_Q8_BLOCK - 1) // FO_Q8_BLOCK
    cdef object sc_obj = np.asarray(scales)
    if sc_obj.dtype != np.float32 or sc_obj.ndim != 1 or sc_obj.shape[0] != nb:
        raise ValueError(f"scales must be a float32 vector of {nb} block scales for "
                         f"{n} codes, got dtype {sc_obj.dtype} shape {sc_obj.shape}")
    cdef cnp.ndarray sc = np.ascontiguousarray(sc_obj)
    cdef cnp.ndarray out = np.empty((<object>q).shape, dtype=np.float32)
    cdef const uint8_t *src = <const uint8_t *>cnp.PyArray_DATA(q)
    cdef const float *s = <const float *>cnp.PyArray_DATA(sc)
    cdef float *dst = <float *>cnp.PyArray_DATA(out)
    cdef int fmt = FO_FMT_Q8S if signed else FO_FMT_Q8U
    with nogil:
        for k in range(nb):
            m = n - k * FO_Q8_BLOCK
            if m > FO_Q8_BLOCK:
                m = FO_Q8_BLOCK
            fo_q8_decode(fmt, src + k * FO_Q8_BLOCK, s[k], dst + k * FO_Q8_BLOCK, m)
    return out


cdef int _average_kernel = _kernel_id("average")
cdef int _sparse_adam_kernel = _kernel_id("sparse_adam")


def average(list dst, list src, double weight, bint lerp):
    """In place for every pair: dst = lerp(dst, src, weight) if lerp else
    dst + (src - dst) / weight. Everything is checked before anything changes."""
    if len(dst) != len(src):
        raise ValueError(f"got {len(dst)} averaged arrays and {len(src)} current ones")
    cdef Plan p32 = Plan(cnp.NPY_FLOAT), p64 = Plan(cnp.NPY_DOUBLE)
    cdef Py_ssize_t i
    cdef cnp.ndarray a, s
    for i in range(len(dst)):
        if not cnp.PyArray_Check(dst[i]) or not cnp.PyArray_Check(src[i]):
            raise TypeError(f"array {i}: expected numpy arrays, got {type(dst[i]).__name__} "
                            f"and {type(src[i]).__name__}")
        a = dst[i]
        if not _usable(a) or cnp.PyArray_TYPE(a) not in (cnp.NPY_FLOAT, cnp.NPY_DOUBLE):
            raise ValueError(f"array {i}: the average must be a writable, C-contiguous "
                             f"float32 or float64 array")
        s = src[i]
        if cnp.PyArray_TYPE(s) != cnp.PyArray_TYPE(a) or not _same_shape(a, s):
            raise ValueError(f"array {i}: current value has dtype {s.dtype} shape "
                             f"{(<object>s).shape}, the average {a.dtype} {(<object>a).shape}")
        if not (cnp.PyArray_IS_C_CONTIGUOUS(s) and cnp.PyArray_ISALIGNED(s)
                and cnp.PyArray_ISNOTSWAPPED(s)):
            s = np.array(s, order="C", copy=True)
        (p32 if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT else p64)._add(a, s)
    for plan in (p32, p64):
        (<Plan>plan).hyper[0] = weight
        (<Plan>plan).hyper[1] = 1.0 if lerp else 0.0
    _run([p32, p64], _average_kernel)


def run_sparse_adam(list groups, list counters):
    """One SparseAdam step of every group in one call into C, after setting
    ``st["step"] = t`` for every (st, t) of ``counters``. ``groups`` holds per group
    (items, beta1, beta2, eps, maximize), ``items`` (param, rows, values, exp_avg,
    exp_avg_sq, step_size) per parameter, already checked by the caller: rows a unique int64
    vector, values a C-contiguous (len(rows), width) array of the parameter's dtype, every
    row index in range, the moments shaped and typed as the parameter."""
    cdef list plans = []
    cdef Plan plan, p32, p64
    cdef cnp.ndarray p, rows, vals, m, v
    cdef Py_ssize_t slot
    cdef int64_t width
    for items, beta1, beta2, eps, maximize in groups:
        p32 = Plan(cnp.NPY_FLOAT)
        p64 = Plan(cnp.NPY_DOUBLE)
        for item in items:
            p, rows, vals, m, v, step_size = item
            if cnp.PyArray_SIZE(vals) == 0:
                continue
            plan = p32 if cnp.PyArray_TYPE(p) == cnp.NPY_FLOAT else p64
            width = cnp.PyArray_SIZE(vals) // cnp.PyArray_SIZE(rows)
            slot = plan._add(vals, vals)
            plan.ts[slot].param = cnp.PyArray_DATA(p)
            plan.ts[slot].state[0] = cnp.PyArray_DATA(m)
            plan.ts[slot].state[1] = cnp.PyArray_DATA(v)
            plan.ts[slot].state[2] = cnp.PyArray_DATA(rows)
            plan.ts[slot].scalar[0] = step_size
            plan.ts[slot].scalar[1] = <double>width
            plan.keep.extend((p, rows, m, v))
        for plan in (p32, p64):
            plan.hyper[0] = beta1
            plan.hyper[1] = beta2
            plan.hyper[2] = eps
            plan.hyper[3] = 1.0 if maximize else 0.0
            plans.append(plan)
    for st, t in counters:
        PyDict_SetItem(st, "step", t)
    _run(plans, _sparse_adam_kernel)


# ---- one step at a time per optimizer (see optimizer._with_step_hooks) -------------------

# id(optimizer) -> (thread ident, step function) of the step running now
cdef dict _running_steps = {}


def guarded_step(func, tuple args, dict kwargs, run, conflict, global_pre,
                 global_post):
    """``run(func, args, kwargs)`` (the step with its hooks; ``func(*args, **kwargs)`` when
    there is none: neither ``global_pre`` nor ``global_post`` nor the optimizer's own) unless
    another step of the same optimizer runs, in which case ``conflict(optimizer, running,
    func)`` raises. Compiled, so that between taking the optimizer's slot and freeing it no
    Python signal handler can run outside the step itself: an exception it raises cannot
    leave the slot taken."""
    self = args[0]
    key = PyLong_FromVoidPtr(<void *>self)  # id(self)
    token = (PyLong_FromUnsignedLong(PyThread_get_thread_ident()), func)
    # atomic: one call into the dict; borrowed reference, kept alive by the dict or by token
    running = <object>PyDict_SetDefault(_running_steps, key, token)
    try:
        if running is not token:
            conflict(self, running, func)  # raises, except for super().step() in a step
        if (global_pre or global_post or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks):
            return run(func, args, kwargs)
        return func(*args, **kwargs)
    finally:
        # only the step that took the slot frees it (not a super().step() inside it)
        if PyDict_GetItem(_running_steps, key) == <PyObject *>token:
            PyDict_DelItem(_running_steps, key)


cdef int _claim_step(dict d, object opt) except -1:
    token = []  # a new object: nothing else can have put it there
    if <object>PyDict_SetDefault(d, "_fastopt_step", token) is not token:
        raise RuntimeError(f"{type(opt).__name__}.step() was called while another step of "
                           f"this optimizer is running (from another thread, or from its "
                           f"closure or a hook)")
    return 0


def claim_step(opt):
    """Mark ``opt`` as stepping (``opt.__dict__["_fastopt_step"]``), or raise RuntimeError
    when a step of it already runs (from another thread, or from its closure or a hook). The
    step deletes the key when it ends, however it ends."""
    _claim_step(opt.__dict__, opt)


def claimed_update(opt, closure, grad_on, capturable_error, str sparse_generic,
                   sparse_error):
    """The body of fastopt.torch's kernel step, compiled to keep a step's fixed cost low:
    claim ``opt``'s step (``opt.__dict__["_fastopt_step"]``; RuntimeError when a step of
    ``opt`` already runs, from another thread or from its closure or a hook), run
    ``closure()`` inside ``grad_on()`` when given, refuse a group whose ``capturable`` is
    true (AssertionError with ``capturable_error(opt, gi)``), then ``update`` every group;
    a kernel error that ends with ``sparse_generic`` ends with ``sparse_error(opt)``
    instead. The claim is freed however the step ends. Returns the closure's value."""
    cdef dict d = opt.__dict__
    cdef Py_ssize_t gi = 0
    _claim_step(d, opt)
    try:
        loss = None
        if closure is not None:
            with grad_on():
                loss = closure()
        for group in opt.param_groups:
            if group.get("capturable"):
                raise AssertionError(capturable_error(opt, gi))
            gi += 1
        kinds = d.get("_kinds") or opt._hyper_kinds()
        try:
            update(opt, kinds, opt._spec)
        except RuntimeError as e:
            text = str(e)
            if not text.endswith(sparse_generic):
                raise
            raise RuntimeError(text[:len(text) - len(sparse_generic)]
                               + sparse_error(opt)) from None
    finally:
        d.pop("_fastopt_step", None)
    return loss


# ---- configuration -------------------------------------------------------------------------

def isa_levels():
    """Names of all ISA levels, worst first."""
    return [fo_isa_name(l).decode() for l in range(FO_ISA_COUNT)]


def isa_supported(str name):
    cdef int l
    for l in range(FO_ISA_COUNT):
        if fo_isa_name(l).decode() == name:
            return bool(fo_isa_supported(l))
    return False


def get_isa():
    """Name of the ISA level whose kernels run now."""
    return fo_isa_name(fo_isa_current()).decode()


def set_isa(str name):
    """Run the kernels of ISA level ``name`` from now on (for tests and bug reports)."""
    cdef int l
    for l in range(FO_ISA_COUNT):
        if fo_isa_name(l).decode() == name:
            if fo_isa_set(l) != 0:
                raise ValueError(f"ISA level {name!r} is not supported by this CPU or build")
            return
    raise ValueError(f"unknown ISA level {name!r}; expected one of {isa_levels()}")


def set_num_threads(n):
    """omp_set_num_threads(n) for an int ``n`` in [1, FO_MAX_THREADS]; ValueError otherwise."""
    if not 1 <= n <= FO_MAX_THREADS:
        raise ValueError(f"num_threads must be a positive integer no larger than "
                         f"{FO_MAX_THREADS}, got {n}")
    fo_set_num_threads(n)


def get_num_threads():
    return fo_get_num_threads()


def have_openmp():
    return bool(fo_have_openmp())


def build_info():
    return {"compiler": FO_COMPILER.decode(), "kernel_flags": FO_KERNEL_FLAGS.decode(),
            "grain": FO_GRAIN, "chunk": FO_CHUNK, "max_threads": FO_MAX_THREADS}


# ---- freezing a parameter group's hyperparameters (see Optimizer._freeze) -----------------

import numbers as _numbers


cdef object _as_real(object value, object key):
    t = type(value)
    if t is float:
        return value
    if t is int:
        return float(value)
    if cnp.PyArray_Check(value):
        if cnp.PyArray_SIZE(<cnp.ndarray>value) != 1:
            raise TypeError(f"{key} must be a number or a 1-element array, got an array of "
                            f"shape {value.shape}")
        value = value.reshape(())[()]
    if not isinstance(value, _numbers.Real):
        # a 1-element tensor (torch allows a tensor lr or betas): its value, as torch's
        # optimizers read it with .item()
        numel = getattr(value, "numel", None)
        if (numel is None or not callable(numel) or numel() != 1
                or getattr(value, "is_complex", lambda: False)()):
            raise TypeError(f"{key} must be a real number, got {value!r}")
        return float(value)
    return float(value)


cdef double _tensor_bits(object value):
    # 32.0 or 64.0 for a float32 or float64 torch tensor (torch is not imported here: its
    # dtypes print as torch.float32, torch.float64), else 0.0
    if type(value) is float:
        return 0.0
    dtype = getattr(value, "dtype", None)
    if dtype is None or type(dtype).__module__ != "torch":
        return 0.0
    text = str(dtype)
    return 32.0 if text == "torch.float32" else 64.0 if text == "torch.float64" else 0.0


def freeze(dict group, tuple numeric, tuple flags, tuple pairs):
    """A copy of ``group`` with the ``numeric`` keys as floats, the ``flags`` as bools and
    the ``pairs`` ((key, length) tuples) as tuples of floats.

    A group with an ``lr`` also gets ``lr_tensor``, and one with ``betas`` ``betas_tensor``:
    32.0 or 64.0 where they are float32 or float64 torch tensors (both betas of one dtype),
    else 0.0. torch computes the step scalars derived from such tensors in 0-d tensor
    arithmetic of their dtype, and the kernels that list these keys compute them so too."""
    cdef dict frozen = group.copy()
    cdef Py_ssize_t n, i
    for key in numeric:
        value = group[key]
        if type(value) is not float:
            frozen[key] = _as_real(value, key)
    if "lr" in frozen:
        frozen["lr_tensor"] = _tensor_bits(group["lr"])
    if "betas" in frozen:
        value = group["betas"]
        bits = 0.0
        if isinstance(value, (tuple, list)) and len(value) == 2:
            bits = _tensor_bits(value[0])
            if bits != 0.0 and _tensor_bits(value[1]) != bits:
                bits = 0.0
        frozen["betas_tensor"] = bits
    for key in flags:
        value = group[key]
        if type(value) is not bool:
            try:
                frozen[key] = bool(value)
            except Exception as e:
                raise TypeError(f"{key} must be a bool, got {value!r} ({e})") from None
    for key, n in pairs:
        value = group[key]
        if type(value) is tuple and len(value) == n:
            for i in range(n):
                if type((<tuple>value)[i]) is not float:
                    break
            else:
                continue
        try:
            items = tuple(value)
        except TypeError:
            raise TypeError(f"{key} must be a tuple of {n} numbers, got {value!r}") from None
        if len(items) != n:
            raise ValueError(f"{key} must have {n} entries, got {value!r}")
        frozen[key] = tuple([_as_real(items[i], f"{key}[{i}]") for i in range(n)])
    return frozen

