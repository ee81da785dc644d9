# Declarations of csrc/fastopt.h, the C kernels' public interface.
from libc.stdint cimport int64_t

cdef extern from "fastopt.h" nogil:
    ctypedef struct fo_tensor:
        void *param
        const void *grad
        void *state[3]
        int64_t numel
        double scalar[4]
        int64_t flags

    int FO_FIRST_STEP
    int FO_RECTIFY
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

    ctypedef struct fo_adadelta_hyper:
        double lr, rho, eps, weight_decay
        int maximize

    ctypedef struct fo_adamax_hyper:
        double beta1, beta2, eps, weight_decay
        int maximize

    ctypedef struct fo_nadam_hyper:
        double lr, beta1, beta2, eps, weight_decay
        int decoupled, maximize

    ctypedef struct fo_radam_hyper:
        double lr, beta1, beta2, eps, weight_decay
        int decoupled, maximize

    ctypedef struct fo_asgd_hyper:
        double lambd, weight_decay
        int maximize

    ctypedef struct fo_rprop_hyper:
        double etaminus, etaplus, step_size_min, step_size_max
        int maximize

    ctypedef struct fo_lion_hyper:
        double lr, beta1, beta2, weight_decay
        int maximize

    ctypedef struct fo_sparse_adam_hyper:
        double beta1, beta2, eps
        int maximize

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
        fo_kernel_fn adadelta_f32, adadelta_f64
        fo_kernel_fn adamax_f32, adamax_f64
        fo_kernel_fn nadam_f32, nadam_f64
        fo_kernel_fn radam_f32, radam_f64
        fo_kernel_fn asgd_f32, asgd_f64
        fo_kernel_fn rprop_f32, rprop_f64
        fo_kernel_fn lion_f32, lion_f64
        fo_kernel_fn sparse_adam_f32, sparse_adam_f64

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
