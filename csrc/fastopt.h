/*
 * fastopt.h - the public C interface of fastopt's optimizer kernels.
 *
 * A kernel updates one contiguous range [begin, end) of one tensor in place. It never
 * allocates, never fails and never touches Python; everything that depends on the step
 * number is computed once by the caller and passed in fo_tensor.scalar. fo_run() spreads
 * the ranges of a list of tensors over threads and calls the kernel picked by the runtime
 * ISA dispatch (see fo_kernels()).
 */
#ifndef FASTOPT_H
#define FASTOPT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One tensor of an optimizer step: parameter, gradient, state buffers (their meaning is
 * per algorithm, listed at each hyperparameter struct) and per-tensor scalars. */
typedef struct fo_tensor {
    void *param;
    const void *grad;
    void *state[3];
    int64_t numel;
    double scalar[4];
    int64_t flags;
} fo_tensor;

/* fo_tensor.flags bits */
#define FO_FIRST_STEP 1 /* SGD: the momentum buffer is new; it takes the gradient as is */
#define FO_RECTIFY 2    /* RAdam: rho_t > 5, take the rectified adaptive step */

/* SGD. state[0] = momentum_buffer (unused when momentum == 0). */
typedef struct fo_sgd_hyper {
    double lr, momentum, dampening, weight_decay;
    int nesterov, maximize;
} fo_sgd_hyper;

/* Adagrad. state[0] = sum. scalar[0] = clr = lr / (1 + (step - 1) * lr_decay). */
typedef struct fo_adagrad_hyper {
    double weight_decay, eps;
    int maximize;
} fo_adagrad_hyper;

/* RMSprop. state[0] = square_avg, state[1] = momentum_buffer, state[2] = grad_avg. */
typedef struct fo_rmsprop_hyper {
    double lr, alpha, eps, weight_decay, momentum;
    int centered, maximize;
} fo_rmsprop_hyper;

/* Adam and AdamW. state[0] = exp_avg, state[1] = exp_avg_sq, state[2] = max_exp_avg_sq.
 * scalar[0] = lr / (1 - beta1^t), scalar[1] = (1 - beta2^t)^0.5. */
typedef struct fo_adam_hyper {
    double lr, beta1, beta2, eps, weight_decay;
    int amsgrad, maximize, decoupled;
} fo_adam_hyper;

/* Parameter averaging (swa_utils). The tensor's param is the average, grad the current
 * value. lerp: avg += w * (cur - avg) with ATen's lerp rounding; swa: avg += (cur - avg) / d. */
typedef struct fo_average_hyper {
    double weight;
    int mode; /* FO_AVG_LERP or FO_AVG_DIV */
} fo_average_hyper;
#define FO_AVG_LERP 0
#define FO_AVG_DIV 1

/* Adadelta. state[0] = square_avg, state[1] = acc_delta. */
typedef struct fo_adadelta_hyper {
    double lr, rho, eps, weight_decay;
    int maximize;
} fo_adadelta_hyper;

/* Adamax. state[0] = exp_avg, state[1] = exp_inf. scalar[0] = lr / (1 - beta1^t). */
typedef struct fo_adamax_hyper {
    double beta1, beta2, eps, weight_decay;
    int maximize;
} fo_adamax_hyper;

/* NAdam. state[0] = exp_avg, state[1] = exp_avg_sq. scalar[0] = 1 - beta2^t,
 * scalar[1] = -lr (1 - mu_t) / (1 - mu_product), scalar[2] = -lr mu_{t+1} / (1 - mu_product mu_{t+1}). */
typedef struct fo_nadam_hyper {
    double lr, beta1, beta2, eps, weight_decay;
    int decoupled, maximize;
} fo_nadam_hyper;

/* RAdam. state[0] = exp_avg, state[1] = exp_avg_sq. scalar[0] = 1 - beta1^t,
 * scalar[1] = (1 - beta2^t)^0.5, scalar[2] = rectification term; flag FO_RECTIFY when rho_t > 5. */
typedef struct fo_radam_hyper {
    double lr, beta1, beta2, eps, weight_decay;
    int decoupled, maximize;
} fo_radam_hyper;

/* ASGD. state[0] = ax. scalar[0] = eta, scalar[1] = mu (the float32 values of torch's state). */
typedef struct fo_asgd_hyper {
    double lambd, weight_decay;
    int maximize;
} fo_asgd_hyper;

/* Rprop. state[0] = prev, state[1] = step_size. */
typedef struct fo_rprop_hyper {
    double etaminus, etaplus, step_size_min, step_size_max;
    int maximize;
} fo_rprop_hyper;

/* Lion (Chen et al. 2023). state[0] = exp_avg. */
typedef struct fo_lion_hyper {
    double lr, beta1, beta2, weight_decay;
    int maximize;
} fo_lion_hyper;

/* SparseAdam on row-sparse gradients. grad = the values (rows x width, row-major, unique rows),
 * state[0] = exp_avg, state[1] = exp_avg_sq, state[2] = the int64 row indices;
 * numel = rows * width; scalar[0] = lr (1 - beta2^t)^0.5 / (1 - beta1^t), scalar[1] = width. */
typedef struct fo_sparse_adam_hyper {
    double beta1, beta2, eps;
    int maximize;
} fo_sparse_adam_hyper;

/* A range kernel: update elements [begin, end) of tensor t. */
typedef void (*fo_kernel_fn)(const void *hyper, const fo_tensor *t, int64_t begin, int64_t end);

/* The kernels of one ISA level, float32 and float64. */
typedef struct fo_kernel_table {
    const char *isa;
    fo_kernel_fn sgd_f32, sgd_f64;
    fo_kernel_fn adagrad_f32, adagrad_f64;
    fo_kernel_fn rmsprop_f32, rmsprop_f64;
    fo_kernel_fn adam_f32, adam_f64;
    fo_kernel_fn average_f32, average_f64;
    fo_kernel_fn adadelta_f32, adadelta_f64;
    fo_kernel_fn adamax_f32, adamax_f64;
    fo_kernel_fn nadam_f32, nadam_f64;
    fo_kernel_fn radam_f32, radam_f64;
    fo_kernel_fn asgd_f32, asgd_f64;
    fo_kernel_fn rprop_f32, rprop_f64;
    fo_kernel_fn lion_f32, lion_f64;
    fo_kernel_fn sparse_adam_f32, sparse_adam_f64;
} fo_kernel_table;

/* ISA levels, best last. */
enum { FO_ISA_BASELINE = 0, FO_ISA_AVX2 = 1, FO_ISA_AVX512 = 2, FO_ISA_COUNT = 3 };

/* The table in use. On first use it picks the best level the CPU supports, or the one
 * named by the environment variable FASTOPT_CPU_CAPABILITY (baseline, avx2, avx512). */
const fo_kernel_table *fo_kernels(void);
/* Name of an ISA level ("baseline", "avx2", "avx512"). */
const char *fo_isa_name(int level);
/* 1 when this build has the level and the CPU runs it. */
int fo_isa_supported(int level);
/* The level in use. */
int fo_isa_current(void);
/* Use this level from now on; returns 0, or -1 when it is not supported (nothing changes). */
int fo_isa_set(int level);

/* Threads: fo_run never uses more than this many. Starts at the OpenMP default. */
void fo_set_num_threads(int n);
int fo_get_num_threads(void);
/* 1 when built with OpenMP. */
int fo_have_openmp(void);
/* Elements per thread below which fo_run stays on the calling thread. */
#define FO_GRAIN 32768

/* Run fn over every element of tensors ts[0..nt). With several threads the concatenated
 * element range is cut into equal, 16-element-aligned pieces; results do not depend on
 * the cut because every element is updated independently. When `serial` is nonzero
 * (a tensor appears twice, so its updates must happen in list order) one thread runs. */
void fo_run(fo_kernel_fn fn, const void *hyper, const fo_tensor *ts, int64_t nt, int serial);

#ifdef __cplusplus
}
#endif
#endif
