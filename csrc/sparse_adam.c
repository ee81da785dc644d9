/*
 * sparse_adam.c - SparseAdam on a row-sparse gradient, in torch 2.13's order. For each
 * touched row r and column j, with g the (maximize-negated) value and m0, v0 the old moments:
 *   dm = (g - m0) * (1 - beta1);  m = m0 + dm
 *   dv = (g * g - v0) * (1 - beta2);  v = v0 + dv
 *   p = p + -step_size * ((dm + m0) / (sqrt(dv + v0) + eps))
 * eps is added to the uncorrected sqrt(v); step_size = lr sqrt(1 - beta2^t) / (1 - beta1^t)
 * comes from the caller. Rows must be unique (the caller coalesces), so ranges of the values
 * can be updated by different threads.
 */
#ifndef FO_T
#include "fo_internal.h"

/* SparseAdam on row-sparse gradients: hyperparameters beta1, beta2, eps, maximize.
 * grad = the values (rows x width, row-major, unique rows), state[0] = exp_avg,
 * state[1] = exp_avg_sq, state[2] = the int64 row indices; numel = rows * width;
 * scalar[0] = lr (1 - beta2^t)^0.5 / (1 - beta1^t), scalar[1] = width (set by the caller). */
typedef struct fo_sparse_adam_hyper {
    double beta1, beta2, eps, maximize;
} fo_sparse_adam_hyper;

#define FO_BODY "sparse_adam.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(sparse_adam, fo_sparse_adam_hyper, NULL, 1);
#else

void FO_FN(sparse_adam)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_sparse_adam_hyper *h = (const fo_sparse_adam_hyper *)hyper;
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict vals = (const FO_T *)t->grad;
    FO_T *restrict m = (FO_T *)t->state[0];
    FO_T *restrict v = (FO_T *)t->state[1];
    const int64_t *restrict rows = (const int64_t *)t->state[2];
    const int64_t width = (int64_t)t->scalar[1];
    const FO_T neg_step = (FO_T)(-t->scalar[0]);
    const FO_T w1 = (FO_T)(1.0 - h->beta1), w2 = (FO_T)(1.0 - h->beta2);
    const FO_T eps = (FO_T)h->eps;
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;
    if (width <= 0) return;

    for (int64_t k = begin / width; k * width < end; k++) {
        const int64_t j0 = k * width < begin ? begin - k * width : 0;
        const int64_t j1 = (k + 1) * width > end ? end - k * width : width;
        const FO_T *restrict gr = vals + k * width;
        const int64_t base = rows[k] * width;
        FO_T *restrict pr = p + base;
        FO_T *restrict mr = m + base;
        FO_T *restrict vr = v + base;
        for (int64_t j = j0; j < j1; j++) {
            FO_T gi = sign * gr[j];
            FO_T m0 = mr[j], v0 = vr[j];
            FO_T dm = (gi - m0) * w1;
            FO_T dv = (gi * gi - v0) * w2;
            mr[j] = m0 + dm;
            vr[j] = v0 + dv;
            FO_T denom = FO_SQRT(dv + v0) + eps;
            pr[j] = pr[j] + neg_step * ((dm + m0) / denom);
        }
    }
}

#endif
