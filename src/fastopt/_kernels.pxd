# Declarations of csrc/fastopt.h, the C kernels' public interface.
from libc.stdint cimport int64_t, uint8_t, uint64_t

cdef extern from "fastopt.h" nogil:
    ctypedef struct fo_tensor:
        void *param
        const void *grad
        void *state[3]
        float *step
        float *aux[2]
        int64_t numel
        double scalar[4]
        int64_t flags
        int64_t storage
        float *scale[3]
        void *copy
        uint64_t seed
        uint64_t rkey

    int FO_FIRST_STEP
    int FO_STORAGE_NATIVE
    int FO_FMT_F32
    int FO_FMT_F16
    int FO_FMT_BF16
    int FO_FMT_Q8S
    int FO_FMT_Q8U
    int64_t FO_STORAGE_SR
    int64_t FO_STORAGE_Q8
    int FO_STORAGE_COPY_SHIFT
    int FO_Q8_BLOCK
    int64_t FO_STORAGE(int param, int grad, int s0, int s1, int s2)
    int FO_GRAIN
    int FO_CHUNK
    int FO_MAX_THREADS
    int FO_ISA_COUNT
    int FO_KERNEL_COUNT

    ctypedef void (*fo_kernel_fn)(const double *hyper, const fo_tensor *t,
                                  int64_t begin, int64_t end) noexcept nogil
    ctypedef void (*fo_prepare_fn)(const double *hyper, fo_tensor *t,
                                   double step) noexcept nogil

    ctypedef struct fo_kernel:
        const char *name
        fo_kernel_fn f32
        fo_kernel_fn f64
        fo_prepare_fn prepare
        int nhyper
        int pure

    ctypedef struct fo_group:
        int kernel
        int f64
        int serial
        const double *hyper
        fo_tensor *ts
        int64_t nt
        uint64_t round_key

    const fo_kernel *fo_kernel_get(int id) noexcept
    int fo_kernel_find(const char *name) noexcept
    const fo_kernel *fo_kernel_info(int id) noexcept
    const char *fo_isa_name(int level) noexcept
    int fo_isa_supported(int level) noexcept
    int fo_isa_current() noexcept
    int fo_isa_set(int level) noexcept
    int fo_set_num_threads(int n) noexcept
    int fo_get_num_threads() noexcept
    int fo_have_openmp() noexcept
    void fo_step(const fo_group *gs, int64_t ng) noexcept
    float fo_q8_encode(int fmt, const float *x, uint8_t *codes, int64_t n) noexcept
    void fo_q8_decode(int fmt, const uint8_t *codes, float scale, float *x,
                      int64_t n) noexcept
