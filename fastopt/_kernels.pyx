# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Bindings between the Python optimizers and the C kernels in csrc/.

A step of one parameter group goes through a ``Plan``: ``collect`` walks the group once,
checks every parameter, gradient and state array it will touch (raising before anything is
modified), and records raw pointers; the ``run_*`` functions then increment step counters,
compute the per-tensor scalars and make one GIL-free call into ``fo_run`` per dtype.
"""
cimport numpy as cnp
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.math cimport pow
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport free, qsort, realloc

import numpy as np

cnp.import_array()

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

# Set by fastopt's Python layer: the Parameter class, and an optional adapter for parameter
# objects that are not ndarrays (callable(obj) -> (array, grad array or None)).
_parameter_type = None
_foreign_param = None


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


def check_param(obj, Py_ssize_t gi, Py_ssize_t pi):
    """Raise unless ``obj`` (an ndarray) can be updated in place by the kernels."""
    _check_param(obj, gi, pi)


cdef inline int _check_param(cnp.ndarray a, Py_ssize_t gi, Py_ssize_t pi) except -1:
    if (cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_ISWRITEABLE(a)
            and (cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT or cnp.PyArray_TYPE(a) == cnp.NPY_DOUBLE)):
        return 0
    cdef int tn = cnp.PyArray_TYPE(a)
    if (tn != cnp.NPY_FLOAT and tn != cnp.NPY_DOUBLE) or not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"{_where(gi, pi)}: fastopt optimizes float32 and float64 arrays "
                        f"in native byte order, got dtype {a.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISALIGNED(a):
        raise ValueError(f"{_where(gi, pi)}: the parameter must be a C-contiguous, aligned "
                         f"array (wrap np.ascontiguousarray(x) instead)")
    if not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{_where(gi, pi)}: the parameter's array is read-only")
    return 0


cdef cnp.ndarray _check_grad(cnp.ndarray p, object g, Py_ssize_t gi, Py_ssize_t pi):
    if not cnp.PyArray_Check(g):
        if type(g).__name__ == "SparseGrad":
            raise RuntimeError(f"{_where(gi, pi)}: this optimizer does not support sparse "
                               f"gradients, please consider SparseAdam instead")
        raise TypeError(f"{_where(gi, pi)}: .grad must be a numpy.ndarray or None, "
                        f"got {type(g).__name__}")
    cdef cnp.ndarray ga = <cnp.ndarray>g
    if cnp.PyArray_TYPE(ga) != cnp.PyArray_TYPE(p) or not cnp.PyArray_ISNOTSWAPPED(ga):
        raise TypeError(f"{_where(gi, pi)}: .grad has dtype {ga.dtype}, the parameter "
                        f"{p.dtype}")
    if not _same_shape(p, ga):
        raise ValueError(f"{_where(gi, pi)}: .grad has shape {(<object>ga).shape}, the parameter "
                         f"{(<object>p).shape}")
    if not (cnp.PyArray_IS_C_CONTIGUOUS(ga) and cnp.PyArray_ISALIGNED(ga)):
        ga = np.array(ga, order="C", copy=True)
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


cdef class Plan:
    """Pointers to every tensor of one dtype that one step of one group updates."""
    cdef fo_tensor *ts
    cdef float **steps
    cdef double *stepval
    cdef Py_ssize_t n, cap
    cdef list keep
    cdef list states  # the state dict bound to each slot (None until bound)
    cdef readonly int typenum

    def __cinit__(self, int typenum):
        self.typenum = typenum
        self.keep = []
        self.states = []
        self.ts = NULL
        self.steps = NULL
        self.stepval = NULL
        self.n = 0
        self.cap = 0

    def __dealloc__(self):
        free(self.ts)
        free(self.steps)
        free(self.stepval)

    cdef Py_ssize_t _add(self, cnp.ndarray p, cnp.ndarray g) except -1:
        cdef Py_ssize_t cap
        cdef void *mem
        if self.n == self.cap:
            cap = 16 if self.cap == 0 else 2 * self.cap
            mem = realloc(self.ts, cap * sizeof(fo_tensor))
            if mem == NULL:
                raise MemoryError()
            self.ts = <fo_tensor *>mem
            mem = realloc(self.steps, cap * sizeof(float *))
            if mem == NULL:
                raise MemoryError()
            self.steps = <float **>mem
            mem = realloc(self.stepval, cap * sizeof(double))
            if mem == NULL:
                raise MemoryError()
            self.stepval = <double *>mem
            self.cap = cap
        cdef fo_tensor *t = &self.ts[self.n]
        t.param = cnp.PyArray_DATA(p)
        t.grad = cnp.PyArray_DATA(g)
        t.state[0] = NULL
        t.state[1] = NULL
        t.state[2] = NULL
        t.numel = cnp.PyArray_SIZE(p)
        t.scalar[0] = 0.0
        t.scalar[1] = 0.0
        t.scalar[2] = 0.0
        t.scalar[3] = 0.0
        t.flags = 0
        self.steps[self.n] = NULL
        self.keep.append(p)
        self.keep.append(g)
        self.states.append(None)
        self.n += 1
        return self.n - 1

    cdef int _bind(self, Py_ssize_t slot, object st, tuple keys, bint has_step,
                   cnp.ndarray p, Py_ssize_t gi, Py_ssize_t pi) except -1:
        cdef PyObject *item
        cdef cnp.ndarray a
        cdef Py_ssize_t j
        cdef uintptr_t los[3]
        cdef uintptr_t his[3]
        cdef uintptr_t lo, hi
        cdef int k, nb = 0  # memory spans of the state arrays bound so far
        if not isinstance(st, dict):
            raise TypeError(f"{_where(gi, pi)}: optimizer.state entry must be a dict, "
                            f"got {type(st).__name__}")
        for j in range(len(keys)):
            key = keys[j]
            if key is None:
                continue
            item = PyDict_GetItem(st, key)
            if item == NULL or (<object>item) is None:
                raise KeyError(f"{_where(gi, pi)}: state has no {key!r} (was a flag such as "
                               f"amsgrad, momentum or centered switched on after the first "
                               f"step?)")
            obj = <object>item
            if not cnp.PyArray_Check(obj):
                raise TypeError(f"{_where(gi, pi)}: state[{key!r}] must be a numpy.ndarray, "
                                f"got {type(obj).__name__}")
            a = <cnp.ndarray>obj
            if cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(p) or not _same_shape(a, p):
                raise ValueError(f"{_where(gi, pi)}: state[{key!r}] has dtype {a.dtype} and "
                                 f"shape {(<object>a).shape}; the parameter has {p.dtype} {(<object>p).shape}")
            if not _usable(a):
                raise ValueError(f"{_where(gi, pi)}: state[{key!r}] must be a writable, "
                                 f"C-contiguous, aligned array")
            if _overlap(a, p, False):
                raise ValueError(f"{_where(gi, pi)}: state[{key!r}] shares memory with the "
                                 f"parameter")
            lo = <uintptr_t>cnp.PyArray_DATA(a)
            hi = lo + <uintptr_t>cnp.PyArray_NBYTES(a)
            for k in range(nb):
                if lo < his[k] and los[k] < hi:
                    raise ValueError(f"{_where(gi, pi)}: state[{key!r}] shares memory with "
                                     f"another state array of the parameter")
            if lo < hi and nb < 3:
                los[nb] = lo
                his[nb] = hi
                nb += 1
            self.ts[slot].state[j] = cnp.PyArray_DATA(a)
            self.keep.append(a)
        self.states[slot] = st
        if has_step:
            item = PyDict_GetItem(st, "step")
            if item == NULL:
                raise KeyError(f"{_where(gi, pi)}: state has no 'step'")
            obj = <object>item
            if (not cnp.PyArray_Check(obj) or cnp.PyArray_TYPE(<cnp.ndarray>obj) != cnp.NPY_FLOAT
                    or cnp.PyArray_SIZE(<cnp.ndarray>obj) != 1
                    or not _usable(<cnp.ndarray>obj)):
                raise TypeError(f"{_where(gi, pi)}: state['step'] must be a writable 0-d "
                                f"float32 array, got {obj!r}")
            self.steps[slot] = <float *>cnp.PyArray_DATA(<cnp.ndarray>obj)
            self.keep.append(obj)
        return 0

    def bind(self, Py_ssize_t slot, st, tuple keys, bint has_step, bint first,
             cnp.ndarray p, Py_ssize_t gi, Py_ssize_t pi):
        """Point slot at the state dict ``st`` (used after creating new state)."""
        self._bind(slot, st, keys, has_step, p, gi, pi)
        if first:
            self.ts[slot].flags |= FO_FIRST_STEP

    cdef int _serial(self) noexcept:
        """1 when two tensors share memory (a parameter listed twice, or overlapping views)
        and the work would be split over threads: then one thread updates them in list
        order, as torch does."""
        cdef Py_ssize_t k
        cdef int64_t total = 0
        cdef uintptr_t hi = 0
        cdef _span *spans
        cdef size_t itemsize = 4 if self.typenum == cnp.NPY_FLOAT else 8
        if self.n < 2 or fo_get_num_threads() < 2:
            return 0
        for k in range(self.n):
            total += self.ts[k].numel
        if total < 2 * FO_GRAIN:
            return 0
        spans = <_span *>realloc(NULL, self.n * sizeof(_span))
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

    cdef void _advance_steps(self) noexcept:
        """Add 1 to every step counter (float32, as torch's step tensor) and record in
        stepval[k] the value slot k sees. A parameter listed twice shares one counter and
        sees it once per occurrence, in list order, as in torch."""
        cdef Py_ssize_t k
        for k in range(self.n):
            self.steps[k][0] = self.steps[k][0] + <float>1.0
            self.stepval[k] = self.steps[k][0]

    cdef void _go(self, fo_kernel_fn fn, const void *hyper) noexcept:
        cdef int serial = self._serial()
        with nogil:
            fo_run(fn, hyper, self.ts, self.n, serial)


def collect(Py_ssize_t gi, list params, state, tuple keys, bint has_step, int init_mode,
            list missing):
    """Check group ``gi`` and return plans (p32, p64) of the parameters that have a
    gradient, by dtype (None for a dtype with none).

    init_mode 0: a parameter with empty state needs new state; 1: one whose state lacks
    ``keys[0]`` (SGD's momentum buffer) does; 2: no state at all. Parameters that need new
    state are appended to ``missing`` as (plan, slot, param, array, gi, pi) and left unbound.
    """
    cdef Py_ssize_t i, slot, n = len(params)
    cdef cnp.ndarray arr, g
    cdef Plan plan, p32 = None, p64 = None
    cdef PyObject *item
    cdef bint need
    ptype = _parameter_type
    for i in range(n):
        obj = params[i]
        if type(obj) is ptype or isinstance(obj, ptype):
            gobj = obj.grad
            if gobj is None:
                continue
            arr = <cnp.ndarray>obj
        elif _foreign_param is not None and not cnp.PyArray_Check(obj):
            a_obj, gobj = _foreign_param(obj, gi, i)
            if gobj is None:
                continue
            arr = <cnp.ndarray>a_obj
        else:
            raise TypeError(f"{_where(gi, i)}: expected a fastopt.Parameter, got "
                            f"{type(obj).__name__}; wrap arrays as fastopt.Parameter(x)")
        _check_param(arr, gi, i)
        g = _check_grad(arr, gobj, gi, i)
        if _overlap(g, arr, True):
            raise ValueError(f"{_where(gi, i)}: .grad partly overlaps the parameter's memory "
                             f"(torch: 'some elements refer to a single memory location')")
        if cnp.PyArray_TYPE(arr) == cnp.NPY_FLOAT:
            if p32 is None:
                p32 = Plan.__new__(Plan, cnp.NPY_FLOAT)
            plan = p32
        else:
            if p64 is None:
                p64 = Plan.__new__(Plan, cnp.NPY_DOUBLE)
            plan = p64
        slot = plan._add(arr, g)
        if init_mode == 2:
            continue
        item = PyDict_GetItem(state, obj)
        if init_mode == 0:
            need = item == NULL or len(<object>item) == 0
        else:
            need = (item == NULL or not isinstance(<object>item, dict)
                    or (<object>item).get(keys[0]) is None)
        if need:
            missing.append((plan, slot, obj, arr, gi, i))
        else:
            plan._bind(slot, <object>item, keys, has_step, arr, gi, i)
    return p32, p64


cdef inline fo_kernel_fn _pick(Plan plan, fo_kernel_fn f32, fo_kernel_fn f64) noexcept:
    return f32 if plan.typenum == cnp.NPY_FLOAT else f64


def run_sgd(Plan plan, double lr, double momentum, double dampening, double weight_decay,
            bint nesterov, bint maximize):
    if plan.n == 0:
        return
    cdef fo_sgd_hyper h
    h.lr = lr
    h.momentum = momentum
    h.dampening = dampening
    h.weight_decay = weight_decay
    h.nesterov = nesterov
    h.maximize = maximize
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.sgd_f32, k.sgd_f64), &h)


def run_adagrad(Plan plan, double lr, double lr_decay, double weight_decay, double eps,
                bint maximize):
    if plan.n == 0:
        return
    cdef fo_adagrad_hyper h
    cdef Py_ssize_t j
    cdef double step
    h.weight_decay = weight_decay
    h.eps = eps
    h.maximize = maximize
    plan._advance_steps()
    for j in range(plan.n):
        step = plan.stepval[j]
        plan.ts[j].scalar[0] = lr / (1.0 + (step - 1.0) * lr_decay)
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.adagrad_f32, k.adagrad_f64), &h)


def run_rmsprop(Plan plan, double lr, double alpha, double eps, double weight_decay,
                double momentum, bint centered, bint maximize):
    if plan.n == 0:
        return
    cdef fo_rmsprop_hyper h
    h.lr = lr
    h.alpha = alpha
    h.eps = eps
    h.weight_decay = weight_decay
    h.momentum = momentum
    h.centered = centered
    h.maximize = maximize
    plan._advance_steps()
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.rmsprop_f32, k.rmsprop_f64), &h)


def run_adam(Plan plan, double lr, double beta1, double beta2, double eps, double weight_decay,
             bint amsgrad, bint maximize, bint decoupled):
    if plan.n == 0:
        return
    cdef fo_adam_hyper h
    cdef Py_ssize_t j
    cdef double step
    h.lr = lr
    h.beta1 = beta1
    h.beta2 = beta2
    h.eps = eps
    h.weight_decay = weight_decay
    h.amsgrad = amsgrad
    h.maximize = maximize
    h.decoupled = decoupled
    plan._advance_steps()
    for j in range(plan.n):
        step = plan.stepval[j]
        if j > 0 and step == plan.stepval[j - 1]:  # the usual case: same step as the last
            plan.ts[j].scalar[0] = plan.ts[j - 1].scalar[0]
            plan.ts[j].scalar[1] = plan.ts[j - 1].scalar[1]
            continue
        # as torch: step_size = lr / (1 - beta1**t), bias_correction2_sqrt = (1 - beta2**t)**0.5
        plan.ts[j].scalar[0] = lr / (1.0 - pow(beta1, step))
        plan.ts[j].scalar[1] = pow(1.0 - pow(beta2, step), 0.5)
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.adam_f32, k.adam_f64), &h)


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
            raise ValueError(f"array {i}: current value has dtype {s.dtype} shape {(<object>s).shape}, "
                             f"the average {a.dtype} {(<object>a).shape}")
        if not (cnp.PyArray_IS_C_CONTIGUOUS(s) and cnp.PyArray_ISALIGNED(s)
                and cnp.PyArray_ISNOTSWAPPED(s)):
            s = np.array(s, order="C", copy=True)
        (p32 if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT else p64)._add(a, s)
    cdef fo_average_hyper h
    h.weight = weight
    h.mode = FO_AVG_LERP if lerp else FO_AVG_DIV
    cdef const fo_kernel_table *k = fo_kernels()
    if p32.n:
        p32._go(k.average_f32, &h)
    if p64.n:
        p64._go(k.average_f64, &h)


# ---- run functions of issue 4 (Adadelta, Adamax, NAdam, RAdam, ASGD, Rprop, Lion, SparseAdam)

def run_adadelta(Plan plan, double lr, double rho, double eps, double weight_decay,
                 bint maximize):
    if plan.n == 0:
        return
    cdef fo_adadelta_hyper h
    h.lr = lr
    h.rho = rho
    h.eps = eps
    h.weight_decay = weight_decay
    h.maximize = maximize
    plan._advance_steps()
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.adadelta_f32, k.adadelta_f64), &h)


def run_adamax(Plan plan, double lr, double beta1, double beta2, double eps,
               double weight_decay, bint maximize):
    if plan.n == 0:
        return
    cdef fo_adamax_hyper h
    cdef Py_ssize_t j
    cdef double step
    h.beta1 = beta1
    h.beta2 = beta2
    h.eps = eps
    h.weight_decay = weight_decay
    h.maximize = maximize
    plan._advance_steps()
    for j in range(plan.n):
        step = plan.stepval[j]
        # as torch: clr = lr / (1 - beta1**t)
        plan.ts[j].scalar[0] = lr / (1.0 - pow(beta1, step))
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.adamax_f32, k.adamax_f64), &h)


cdef inline float *_scalar_state(Plan plan, Py_ssize_t j, str key) except NULL:
    # a 0-d float32 state entry (NAdam's mu_product, ASGD's eta and mu); the optimizer checks
    # them all before the step (check_scalar_state), this only guards against misuse
    obj = plan.states[j][key]
    if (not cnp.PyArray_Check(obj) or cnp.PyArray_TYPE(<cnp.ndarray>obj) != cnp.NPY_FLOAT
            or cnp.PyArray_SIZE(<cnp.ndarray>obj) != 1 or not _usable(<cnp.ndarray>obj)):
        raise TypeError(f"state[{key!r}] must be a writable 0-d float32 array")
    plan.keep.append(obj)
    return <float *>cnp.PyArray_DATA(<cnp.ndarray>obj)


cdef float **_scalar_ptrs(Plan plan, str key) except NULL:
    """Pointers to state[key] of every slot (freed by the caller)."""
    cdef float **ptrs = <float **>realloc(NULL, (plan.n + 1) * sizeof(float *))
    cdef Py_ssize_t j
    if ptrs == NULL:
        raise MemoryError()
    try:
        for j in range(plan.n):
            ptrs[j] = _scalar_state(plan, j, key)
    except BaseException:
        free(ptrs)
        raise
    return ptrs


def check_scalar_state(list groups, state, tuple keys):
    """Raise TypeError naming group and parameter if a parameter that has a gradient and
    state lacks a writable 0-d float32 array under one of ``keys``; run before a step
    changes anything."""
    cdef Py_ssize_t gi, pi
    cdef PyObject *item
    cdef PyObject *value
    for gi in range(len(groups)):
        params = groups[gi]["params"]
        for pi in range(len(params)):
            p = params[pi]
            item = PyDict_GetItem(state, p)
            if item == NULL or not isinstance(<object>item, dict) or len(<object>item) == 0:
                continue
            if getattr(p, "grad", None) is None:
                continue
            for key in keys:
                value = PyDict_GetItem(<object>item, key)
                obj = None if value == NULL else <object>value
                if (obj is None or not cnp.PyArray_Check(obj)
                        or cnp.PyArray_TYPE(<cnp.ndarray>obj) != cnp.NPY_FLOAT
                        or cnp.PyArray_SIZE(<cnp.ndarray>obj) != 1
                        or not _usable(<cnp.ndarray>obj)):
                    raise TypeError(f"{_where(gi, pi)}: state[{key!r}] must be a writable "
                                    f"0-d float32 array, got {obj!r}")


def run_nadam(Plan plan, double lr, double beta1, double beta2, double eps,
              double weight_decay, double momentum_decay, bint decoupled, bint maximize):
    if plan.n == 0:
        return
    cdef fo_nadam_hyper h
    cdef Py_ssize_t j
    cdef double step, mu, mu_next, prod
    h.lr = lr
    h.beta1 = beta1
    h.beta2 = beta2
    h.eps = eps
    h.weight_decay = weight_decay
    h.decoupled = decoupled
    h.maximize = maximize
    cdef float **mu_product = _scalar_ptrs(plan, "mu_product")
    plan._advance_steps()
    for j in range(plan.n):
        step = plan.stepval[j]
        mu = beta1 * (1.0 - 0.5 * pow(0.96, step * momentum_decay))
        mu_next = beta1 * (1.0 - 0.5 * pow(0.96, (step + 1.0) * momentum_decay))
        # torch's mu_product is a float32 tensor: mu is rounded to float32, so is the product
        mu_product[j][0] = mu_product[j][0] * <float>mu
        prod = mu_product[j][0]
        plan.ts[j].scalar[0] = 1.0 - pow(beta2, step)
        plan.ts[j].scalar[1] = (-lr * (1.0 - mu)) / (1.0 - prod)
        plan.ts[j].scalar[2] = (-lr * mu_next) / (1.0 - prod * mu_next)
    free(mu_product)
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.nadam_f32, k.nadam_f64), &h)


def run_radam(Plan plan, double lr, double beta1, double beta2, double eps,
              double weight_decay, bint decoupled, bint maximize):
    if plan.n == 0:
        return
    cdef fo_radam_hyper h
    cdef Py_ssize_t j
    cdef double step, bc1, bc2, rho_inf, rho_t
    h.lr = lr
    h.beta1 = beta1
    h.beta2 = beta2
    h.eps = eps
    h.weight_decay = weight_decay
    h.decoupled = decoupled
    h.maximize = maximize
    plan._advance_steps()
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    for j in range(plan.n):
        step = plan.stepval[j]
        bc1 = 1.0 - pow(beta1, step)
        bc2 = 1.0 - pow(beta2, step)
        rho_t = rho_inf - 2.0 * step * pow(beta2, step) / bc2
        plan.ts[j].scalar[0] = bc1
        plan.ts[j].scalar[1] = pow(bc2, 0.5)
        plan.ts[j].flags &= ~(<int64_t>FO_RECTIFY)
        if rho_t > 5.0:
            plan.ts[j].scalar[2] = pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                                       / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5)
            plan.ts[j].flags |= FO_RECTIFY
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.radam_f32, k.radam_f64), &h)


def run_asgd(Plan plan, double lr, double lambd, double alpha, double t0,
             double weight_decay, bint maximize):
    if plan.n == 0:
        return
    cdef fo_asgd_hyper h
    cdef Py_ssize_t j
    cdef double step
    h.lambd = lambd
    h.weight_decay = weight_decay
    h.maximize = maximize
    cdef float **eta = _scalar_ptrs(plan, "eta")
    cdef float **mu
    try:
        mu = _scalar_ptrs(plan, "mu")
    except BaseException:
        free(eta)
        raise
    plan._advance_steps()
    for j in range(plan.n):
        # this step uses the current values; then, as torch (in double, stored as float32):
        # eta = lr / (1 + lambd lr t)^alpha, mu = 1 / max(1, t - t0). A parameter listed
        # twice sees the values its first occurrence left, as in torch's loop.
        plan.ts[j].scalar[0] = eta[j][0]
        plan.ts[j].scalar[1] = mu[j][0]
        step = plan.stepval[j]
        eta[j][0] = <float>(lr / pow(1.0 + lambd * lr * step, alpha))
        mu[j][0] = <float>(1.0 / (step - t0 if step - t0 > 1.0 else 1.0))
    free(eta)
    free(mu)
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.asgd_f32, k.asgd_f64), &h)


def run_rprop(Plan plan, double etaminus, double etaplus, double step_size_min,
              double step_size_max, bint maximize):
    if plan.n == 0:
        return
    cdef fo_rprop_hyper h
    h.etaminus = etaminus
    h.etaplus = etaplus
    h.step_size_min = step_size_min
    h.step_size_max = step_size_max
    h.maximize = maximize
    plan._advance_steps()
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.rprop_f32, k.rprop_f64), &h)


def run_lion(Plan plan, double lr, double beta1, double beta2, double weight_decay,
             bint maximize):
    if plan.n == 0:
        return
    cdef fo_lion_hyper h
    h.lr = lr
    h.beta1 = beta1
    h.beta2 = beta2
    h.weight_decay = weight_decay
    h.maximize = maximize
    cdef const fo_kernel_table *k = fo_kernels()
    plan._go(_pick(plan, k.lion_f32, k.lion_f64), &h)


def run_sparse_adam(list items, double beta1, double beta2, double eps, bint maximize):
    """One SparseAdam step. ``items`` holds (param, rows, values, exp_avg, exp_avg_sq,
    step_size) per parameter, already checked by the caller: rows a unique int64 vector,
    values a C-contiguous (len(rows), width) array of the parameter's dtype, every row index
    in range, the moments shaped and typed as the parameter."""
    cdef Plan p32 = Plan(cnp.NPY_FLOAT), p64 = Plan(cnp.NPY_DOUBLE)
    cdef Plan plan
    cdef cnp.ndarray p, rows, vals, m, v
    cdef Py_ssize_t slot
    cdef int64_t width
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
    cdef fo_sparse_adam_hyper h
    h.beta1 = beta1
    h.beta2 = beta2
    h.eps = eps
    h.maximize = maximize
    cdef const fo_kernel_table *k = fo_kernels()
    if p32.n:
        p32._go(k.sparse_adam_f32, &h)
    if p64.n:
        p64._go(k.sparse_adam_f64, &h)


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


def set_num_threads(int n):
    if n < 1:
        raise ValueError(f"num_threads must be a positive integer, got {n}")
    fo_set_num_threads(n)


def get_num_threads():
    return fo_get_num_threads()


def have_openmp():
    return bool(fo_have_openmp())


def build_info():
    return {"compiler": FO_COMPILER.decode(), "kernel_flags": FO_KERNEL_FLAGS.decode(),
            "grain": FO_GRAIN}


# ---- freezing a parameter group's hyperparameters (see Optimizer._freeze) -------------------

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
        raise TypeError(f"{key} must be a real number, got {value!r}")
    return float(value)


def as_real(value, key):
    """``value`` as a Python float: numbers, NumPy scalars and 1-element arrays."""
    return _as_real(value, key)


def freeze(dict group, tuple numeric, tuple flags, tuple pairs):
    """A copy of ``group`` with the ``numeric`` keys as floats, the ``flags`` as bools and
    the ``pairs`` ((key, length) tuples) as tuples of floats."""
    cdef dict frozen = group.copy()
    cdef Py_ssize_t n, i
    for key in numeric:
        value = group[key]
        if type(value) is not float:
            frozen[key] = _as_real(value, key)
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


def update(opt, tuple kinds):
    """The body of ``Optimizer._update`` for ``opt``, whose hyperparameter kinds are
    ``kinds`` (numeric keys, flag keys, (key, length) pairs): check and freeze every group
    and collect every parameter first (nothing is modified), then create missing state,
    then make one kernel call per group and dtype through ``opt._run_group``."""
    cdef list missing = [], work = []
    cdef Py_ssize_t gi = 0
    cdef tuple numeric = kinds[0], flags = kinds[1], pairs = kinds[2]
    state = opt.state
    check_step = opt._check_step
    state_layout = opt._state_layout
    for group in opt.param_groups:
        try:
            frozen = freeze(group, numeric, flags, pairs)  # = opt._freeze(group)
            check_step(frozen)
        except (ValueError, TypeError, OverflowError) as e:
            raise type(e)(f"param_groups[{gi}]: {e}") from None
        params = group["params"]
        if type(params) is not list:
            params = list(params)
        layout = state_layout(frozen)
        p32, p64 = collect(gi, params, state, layout[0], layout[1], layout[2], missing)
        work.append((frozen, layout, p32, p64))
        gi += 1
    if missing:
        opt._create_state(missing, work)
    run_group = opt._run_group
    for frozen, layout, p32, p64 in work:
        if p32 is not None:
            run_group(p32, frozen)
        if p64 is not None:
            run_group(p64, frozen)
