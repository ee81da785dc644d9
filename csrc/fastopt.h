/*
 * fastopt.h - the public C interface of fastopt's optimizer kernels.
 *
 * A kernel updates one contiguous range [begin, end) of one tensor in place. It never
 * allocates, never fails and never touches Python. Its hyperparameters are an array of
 * doubles in the order its Python class declares them (flags as 0 or 1); what depends on the
 * step number is computed per tensor by the kernel's prepare function. fo_step() runs a
 * whole optimizer step: for each group it advances the step counters, prepares every tensor
 * and spreads the element ranges over threads, calling the kernels of the ISA level picked
 * at run time (see fo_isa_current()).
 */
#ifndef FASTOPT_H
#define FASTOPT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One tensor of an optimizer step: parameter, gradient, state buffers (their meaning is
 * per kernel, listed at each kernel's hyperparameter struct), its float32 step counter
 * (NULL when the optimizer keeps none), 0-d float32 state entries that prepare reads and
 * updates (aux), and the per-tensor scalars prepare computes for the loop. `storage` says how
 * each array is stored (below); the fields after it serve the compressed formats only. */
typedef struct fo_tensor {
    void *param;
    const void *grad;
    void *state[3];
    float *step;
    float *aux[2];
    int64_t numel;
    double scalar[4];
    int64_t flags;
    int64_t storage;  /* FO_STORAGE(...): how param, grad and state are stored */
    float *scale[3];  /* FO_FMT_Q8*: state[k]'s block scales, one per FO_Q8_BLOCK elements */
    void *copy;       /* master weights: the 16-bit parameter written from param (float32) */
    uint64_t seed;    /* stochastic rounding: this tensor's stream (its position) */
    uint64_t rkey;    /* and this step's key, set by fo_step from seed and the group's key */
} fo_tensor;

/* fo_tensor.storage, for a group of float32 loops (fo_group.f64 == 0): a format per array, 4
 * bits each, plus flags. FO_STORAGE_NATIVE (0) is float32 throughout (float64 in a float64
 * group, which takes no other storage). Every other tensor is updated a block at a time: each
 * array is loaded into float32 (16-bit widening is exact; 8-bit codes are decoded with their
 * block's scale), the kernel's float32 loop computes the block, and the results are stored
 * back: 16-bit rounded to nearest, ties to even (or stochastically, FO_STORAGE_SR, for
 * bfloat16), 8-bit re-encoded with a new scale per block (see fo_internal.h). */
#define FO_FMT_F32 0  /* float32 */
#define FO_FMT_F16 1  /* IEEE binary16 */
#define FO_FMT_BF16 2 /* bfloat16: the upper half of a float32 */
#define FO_FMT_Q8S 3  /* 8-bit block-wise code of signed values (state only) */
#define FO_FMT_Q8U 4  /* 8-bit block-wise code of non-negative values (state only) */
#define FO_STORAGE(param, grad, s0, s1, s2) \
    ((int64_t)(param) | (int64_t)(grad) << 4 | (int64_t)(s0) << 8 | (int64_t)(s1) << 12 | \
     (int64_t)(s2) << 16)
#define FO_STORAGE_NATIVE 0
#define FO_STORAGE_SR ((int64_t)1 << 20) /* bfloat16 stores round stochastically (seed, rkey) */
#define FO_STORAGE_COPY_SHIFT 24         /* FO_FMT_F16/BF16 of fo_tensor.copy, when set */
#define FO_STORAGE_Q8 ((int64_t)1 << 28)  /* some state is 8-bit: ranges start at block edges */
#define FO_FMT_OF(storage, shift) ((int)(((storage) >> (shift)) & 15))
#define FO_Q8_BLOCK 256

/* Encode n float32 values (n <= FO_Q8_BLOCK, one block) as 8-bit codes; returns the block's
 * scale. Decode n codes with their block's scale. `fmt` is FO_FMT_Q8S or FO_FMT_Q8U. */
float fo_q8_encode(int fmt, const float *x, uint8_t *codes, int64_t n);
void fo_q8_decode(int fmt, const uint8_t *codes, float scale, float *x, int64_t n);

/* fo_tensor.flags bits */
#define FO_FIRST_STEP 1 /* SGD: the momentum buffer is new; it takes the gradient as is */

/* The ids of the kernels, in the order of kernels.def: FO_KERNEL_sgd, FO_KERNEL_adam, ... */
enum {
#define FO_KERNEL(name) FO_KERNEL_##name,
#include "kernels.def"
#undef FO_KERNEL
    FO_KERNEL_COUNT
};

/* A range kernel: update elements [begin, end) of tensor t. */
typedef void (*fo_kernel_fn)(const double *hyper, const fo_tensor *t, int64_t begin,
                             int64_t end);
/* Compute t->scalar (and update t->aux) for the step number `step` (t->step after it was
 * advanced, or 0 without a counter). */
typedef void (*fo_prepare_fn)(const double *hyper, fo_tensor *t, double step);

/* One kernel of one ISA level. */
typedef struct fo_kernel {
    const char *name;
    fo_kernel_fn f32, f64;
    fo_prepare_fn prepare; /* NULL: the loop needs no per-tensor scalars */
    int nhyper;            /* doubles in the hyperparameter array */
    int pure;              /* prepare depends on hyper and step only (not on aux) */
} fo_kernel;

/* Kernel `id` (FO_KERNEL_*) of the ISA level in use, or NULL for an unknown id. */
const fo_kernel *fo_kernel_get(int id);
/* The id of the kernel called `name`, or -1. */
int fo_kernel_find(const char *name);
/* Kernel `id` of the baseline level, or NULL: its name and nhyper are those of every level,
 * and asking does not pick the ISA level (fo_kernel_get does). */
const fo_kernel *fo_kernel_info(int id);

/* ISA levels, best last. */
enum { FO_ISA_BASELINE = 0, FO_ISA_AVX2 = 1, FO_ISA_AVX512 = 2, FO_ISA_COUNT = 3 };

/* Name of an ISA level ("baseline", "avx2", "avx512"). */
const char *fo_isa_name(int level);
/* 1 when this build has the level and the CPU runs it. */
int fo_isa_supported(int level);
/* The level in use. On first use it picks the best level the CPU supports, or the one
 * named by the environment variable FASTOPT_CPU_CAPABILITY (baseline, avx2, avx512). */
int fo_isa_current(void);
/* Use this level from now on; returns 0, or -1 when it is not supported (nothing changes). */
int fo_isa_set(int level);

/* Threads: fo_run uses at most fo_get_num_threads() threads, OpenMP's setting for the calling
 * thread (omp_get_max_threads(), read at every call), which fo_set_num_threads sets
 * (omp_set_num_threads). fo_set_num_threads returns 0, or -1 for n < 1 or n > FO_MAX_THREADS
 * (nothing changes). Without OpenMP the kernels run on the calling thread. */
int fo_set_num_threads(int n);
int fo_get_num_threads(void);
#define FO_MAX_THREADS 4096
/* 1 when built with OpenMP. */
int fo_have_openmp(void);
/* fo_run stays on the calling thread for fewer than 2 * FO_GRAIN elements (measured: see
 * dispatch.c), gives every thread at least FO_GRAIN elements, and lets the threads take work
 * from each other in chunks of FO_CHUNK elements (a few microseconds of work each, so a
 * thread that finishes early waits little for the others). */
#define FO_GRAIN 32768
#define FO_CHUNK 32768

/* Run fn over every element of tensors ts[0..nt). With several threads the concatenated
 * element range is cut into one share per thread (16-element aligned) and each share into
 * chunks of FO_CHUNK elements, which the share's thread and then any idle thread take;
 * results do not depend on the cut because every element is updated independently. When
 * `serial` is nonzero (a tensor appears twice, so its updates must happen in list order) one
 * thread runs. Several Python threads may call it at once: one gets the workers, the others
 * run on their own thread. */
void fo_run(fo_kernel_fn fn, const double *hyper, const fo_tensor *ts, int64_t nt,
            int serial);
/* fo_run on up to nthr threads whatever the size (for the benchmark that measures the
 * threshold): the tensors must not share memory. */
void fo_run_threads(fo_kernel_fn fn, const double *hyper, const fo_tensor *ts, int64_t nt,
                    int nthr);

/* The tensors of one dtype of one parameter group, and the kernel that updates them. */
typedef struct fo_group {
    int kernel;           /* FO_KERNEL_* */
    int f64;              /* 0: float32 tensors, 1: float64 */
    int serial;           /* passed to fo_run */
    const double *hyper;  /* the kernel's nhyper doubles */
    fo_tensor *ts;
    int64_t nt;
    uint64_t round_key;   /* stochastic rounding: this step's key (rounding seed and step) */
} fo_group;

/* One optimizer step over groups gs[0..ng), in order: for each group, add 1 to every step
 * counter and prepare every tensor in list order (a tensor listed twice shares its counter
 * and sees it once per occurrence, as in torch), then update all its elements. */
void fo_step(const fo_group *gs, int64_t ng);

#ifdef __cplusplus
}
#endif
#endif
