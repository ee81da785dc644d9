# Declarations of csrc/fastopt.h, the C kernels' public interface.
from libc.stdint cimport int64_t

cdef extern from "fastopt.h" nogil:
    ctypedef struct fo_tensor:
        void *param
        const void *grad
        void *state[3]
        int64_t numel
        double scalar[2]
        int64_t flags

    int FO_FIRST_STEP
    int FO_AVG_LERP
    int FO_AVG_DIV
    int FO_GRAIN
    int FO_ISA_BASELINE
    int FO_ISA_AVX2
    int FO_ISA_AVX512
    int FO_ISA_COUNT

    ctypedef struct fo_sgd_hyper:
        double lr, momentum, dampening, weight_decay
        int nesterov, maximize

    ctypedef struct fo_adagrad_hyper:
        double weight_decay, eps
        int maximize

    ctypedef struct fo_rmsprop_hyper:
        double lr, alpha, eps, weight_decay, momentum
        int centered, maximize

    ctypedef struct fo_adam_hyper:
        double lr, beta1, beta2, eps, weight_decay
        int amsgrad, maximize, decoupled

    ctypedef struct fo_average_hyper:
        double weight
        int mode

    ctypedef void (*fo_kernel_fn)(const void *hyper, const fo_tensor *t,
                                  int64_t begin, int64_t end) noexcept nogil

    ctypedef struct fo_kernel_table:
        const char *isa
        fo_kernel_fn sgd_f32, sgd_f64
        fo_kernel_fn adagrad_f32, adagrad_f64
        fo_kernel_fn rmsprop_f32, rmsprop_f64
        fo_kernel_fn adam_f32, adam_f64
        fo_kernel_fn average_f32, average_f64

    const fo_kernel_table *fo_kernels() noexcept
    const char *fo_isa_name(int level) noexcept
    int fo_isa_supported(int level) noexcept
    int fo_isa_current() noexcept
    int fo_isa_set(int level) noexcept
    void fo_set_num_threads(int n) noexcept
    int fo_get_num_threads() noexcept
    int fo_have_openmp() noexcept
    void fo_run(fo_kernel_fn fn, const void *hyper, const fo_tensor *ts, int64_t nt,
                int serial) noexcept
