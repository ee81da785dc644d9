/*
 * asgd.c - averaged SGD in torch 2.13's single-tensor order:
 *   g = maximize ? -grad : grad;  g = fma(p, wd, g)                     (when wd != 0)
 *   p = p * (1 - lambd * eta);  p = fma(g, -eta, p)
 *   mu != 1: ax = ax + (p - ax) * mu      else ax = p
 * eta and mu are torch's float32 state values, read by asgd_prepare (scalar[0], scalar[1]),
 * which then advances them.  No square root: bit-exact with torch.
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of ASGD._hyperparameters. state[0] = ax, aux[0] = eta, aux[1] = mu
 * (torch's float32 state). scalar[0] = eta, scalar[1] = mu: the values this step uses. */
typedef struct fo_asgd_hyper {
    double lr, lambd, alpha, t0, weight_decay, maximize, lr_tensor;
} fo_asgd_hyper;

/* torch's eta = lr / (1 + lambd * lr * t) ** alpha for a float32 tensor lr: float32 tensor
 * operations, each rounded, and ATen's pow of a float32 tensor by a number (x*x*x for 3,
 * 1 / (x*x) in double for -2, reciprocal and rsqrt for -1 and -0.5, sqrt for 0.5 (ATen's
 * may differ from sqrtf in the last bit), else the double pow of x rounded). */
static float asgd_eta_f32(float lr, float lambd, float step, double alpha)
{
    float x = 1.0f + lambd * lr * step;
    float y;
    if (alpha == 3.0)
        y = x * x * x;
    else if (alpha == -2.0)
        y = (float)(1.0 / (double)(x * x));
    else if (alpha == -1.0)
        y = 1.0f / x;
    else if (alpha == -0.5)
        y = 1.0f / sqrtf(x);
    else if (alpha == 0.5)
        y = sqrtf(x);
    else if (alpha == 2.0)
        y = x * x;
    else
        y = (float)pow((double)x, alpha);
    return lr / y;
}

/* This step uses the current eta and mu; then, as torch (in double, stored as float32):
 * eta = lr / (1 + lambd lr t)^alpha, mu = 1 / max(1, t - t0). A parameter listed twice
 * sees the values its first occurrence left, as in torch's loop. */
static void asgd_prepare(const double *hyper, fo_tensor *t, double step)
{
    const fo_asgd_hyper *h = (const fo_asgd_hyper *)hyper;
    t->scalar[0] = *t->aux[0];
    t->scalar[1] = *t->aux[1];
    if (FO_LR_F32(h->lr_tensor))
        *t->aux[0] = asgd_eta_f32((float)h->lr, (float)h->lambd, (float)step, h->alpha);
    else
        *t->aux[0] = (float)(h->lr / pow(1.0 + h->lambd * h->lr * step, h->alpha));
    *t->aux[1] = (float)(1.0 / (step - h->t0 > 1.0 ? step - h->t0 : 1.0));
}

#define FO_BODY "asgd.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(asgd, fo_asgd_hyper, asgd_prepare, 0);
#else

static inline __attribute__((always_inline)) void
FO_FN(asgd_loop)(const fo_asgd_hyper *h, const fo_tensor *t, int64_t begin, int64_t end,
                 const int has_wd, const int average)
{
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict ax = (FO_T *)t->state[0];
    const double eta = t->scalar[0];
    const FO_T decay = (FO_T)(1.0 - h->lambd * eta);
    const FO_T neg_eta = (FO_T)(-eta);
    const FO_T mu = (FO_T)t->scalar[1];
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;

    for (int64_t i = begin; i < end; i++) {
        FO_T gi = sign * g[i];
        FO_T pi = p[i];
        if (has_wd) gi = FO_FMA(pi, wd, gi);
        pi = pi * decay;
        pi = FO_FMA(gi, neg_eta, pi);
        p[i] = pi;
        if (average) {
            FO_T a = ax[i];
            ax[i] = a + (pi - a) * mu;
        } else {
            ax[i] = pi;
        }
    }
}

void FO_FN(asgd)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_asgd_hyper *h = (const fo_asgd_hyper *)hyper;
    const int has_wd = h->weight_decay != 0.0;
    const int average = t->scalar[1] != 1.0;
#define FO_CASE(W, A) \
    if (has_wd == W && average == A) { FO_FN(asgd_loop)(h, t, begin, end, W, A); return; }
    FO_CASE(0, 0) FO_CASE(1, 0) FO_CASE(0, 1) FO_CASE(1, 1)
#undef FO_CASE
}

#endif
