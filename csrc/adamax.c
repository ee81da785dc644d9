/*
 * adamax.c - Adamax (the infinity-norm Adam variant) in torch 2.13's single-tensor order:
 *   g = maximize ? -grad : grad;  g = fma(p, wd, g)                     (when wd != 0)
 *   m = lerp(m, g, 1 - beta1)
 *   u = maximum(u * beta2, |g| + eps)          (eps inside the max; NaN propagates)
 *   p = p + (-clr * m) / u
 * with clr = lr / (1 - beta1^t) from adamax_prepare (scalar[0]). No square root: bit-exact with
 * torch.
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of Adamax._hyperparameters. state[0] = exp_avg, state[1] = exp_inf.
 * scalar[0] = lr / (1 - beta1^t). */
typedef struct fo_adamax_hyper {
    double lr, beta1, beta2, eps, weight_decay, maximize, lr_tensor;
} fo_adamax_hyper;

static void adamax_prepare(const double *hyper, fo_tensor *t, double step)
{
    const fo_adamax_hyper *h = (const fo_adamax_hyper *)hyper;
    /* as torch: clr = lr / (1 - beta1**t) */
    t->scalar[0] = fo_lr_div(h->lr, 1.0 - pow(h->beta1, step), h->lr_tensor);
}

#define FO_BODY "adamax.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(adamax, fo_adamax_hyper, adamax_prepare, 1);
#else

static inline __attribute__((always_inline)) void
FO_FN(adamax_loop)(const fo_adamax_hyper *h, const fo_tensor *t, int64_t begin, int64_t end,
                   const int has_wd, const int small)
{
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict m = (FO_T *)t->state[0];
    FO_T *restrict u = (FO_T *)t->state[1];
    const FO_T neg_clr = (FO_T)(-t->scalar[0]);
    const FO_T w = (FO_T)(1.0 - h->beta1), wm1 = w - (FO_T)1;
    const FO_T beta2 = (FO_T)h->beta2;
    const FO_T eps = (FO_T)h->eps;
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;

    for (int64_t i = begin; i < end; i++) {
        FO_T gi = sign * g[i];
        FO_T pi = p[i];
        if (has_wd) gi = FO_FMA(pi, wd, gi);
        FO_T mi = FO_LERP(m[i], gi, w, wm1, small);
        m[i] = mi;
        FO_T a = u[i] * beta2;
        FO_T b = FO_ABS(gi) + eps;
        FO_T ui = FO_MAXIMUM(a, b);
        u[i] = ui;
        p[i] = pi + (neg_clr * mi) / ui;
    }
}

void FO_FN(adamax)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_adamax_hyper *h = (const fo_adamax_hyper *)hyper;
    const int has_wd = h->weight_decay != 0.0;
    const int small = fabs((double)(FO_T)(1.0 - h->beta1)) < 0.5;
#define FO_CASE(W, S) \
    if (has_wd == W && small == S) { FO_FN(adamax_loop)(h, t, begin, end, W, S); return; }
    FO_CASE(0, 1) FO_CASE(1, 1) FO_CASE(0, 0) FO_CASE(1, 0)
#undef FO_CASE
}

#endif
