/*
 * nadam.c - NAdam in torch 2.13's single-tensor order:
 *   g = maximize ? -grad : grad
 *   decoupled: p = p * (1 - lr * wd)      else g = fma(p, wd, g)       (when wd != 0)
 *   m = lerp(m, g, 1 - beta1);  v = fma((1 - beta2) * g, g, v * beta2)
 *   denom = sqrt(v / bc2) + eps                 (bias correction inside the sqrt)
 *   p = p + (c1 * g) / denom;  p = p + (c2 * m) / denom
 * bc2 = 1 - beta2^t, c1 = -lr (1 - mu_t) / (1 - mu_product), c2 = -lr mu_{t+1} /
 * (1 - mu_product mu_{t+1}) come from nadam_prepare (scalar[0..2]); mu_product is torch's float32
 * running product.
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of NAdam._hyperparameters. state[0] = exp_avg, state[1] = exp_avg_sq,
 * aux[0] = mu_product. scalar[0] = 1 - beta2^t, scalar[1] = -lr (1 - mu_t) / (1 - mu_product),
 * scalar[2] = -lr mu_{t+1} / (1 - mu_product mu_{t+1}). */
typedef struct fo_nadam_hyper {
    double lr, beta1, beta2, eps, weight_decay, momentum_decay, decoupled, maximize, lr_tensor;
} fo_nadam_hyper;

static void nadam_prepare(const double *hyper, fo_tensor *t, double step)
{
    const fo_nadam_hyper *h = (const fo_nadam_hyper *)hyper;
    double mu = h->beta1 * (1.0 - 0.5 * pow(0.96, step * h->momentum_decay));
    double mu_next = h->beta1 * (1.0 - 0.5 * pow(0.96, (step + 1.0) * h->momentum_decay));
    /* torch's mu_product is a float32 tensor: mu is rounded to float32, so is the product */
    *t->aux[0] = *t->aux[0] * (float)mu;
    double prod = *t->aux[0];
    t->scalar[0] = 1.0 - pow(h->beta2, step);
    if (FO_LR_F32(h->lr_tensor)) {
        /* a float32 tensor lr: torch's -lr * (1 - mu) / (1 - P) and -lr * mu_next / (1 - P
         * mu_next) are float32 tensor operations, each rounded */
        t->scalar[1] = (double)(((float)-h->lr * (float)(1.0 - mu)) / (float)(1.0 - prod));
        t->scalar[2] = (double)(((float)-h->lr * (float)mu_next) / (float)(1.0 - prod * mu_next));
        return;
    }
    t->scalar[1] = (-h->lr * (1.0 - mu)) / (1.0 - prod);
    t->scalar[2] = (-h->lr * mu_next) / (1.0 - prod * mu_next);
}

#define FO_BODY "nadam.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(nadam, fo_nadam_hyper, nadam_prepare, 0);
#else

static inline __attribute__((always_inline)) void
FO_FN(nadam_loop)(const fo_nadam_hyper *h, const fo_tensor *t, int64_t begin, int64_t end,
                  const int l2, const int decoupled, const int small)
{
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict m = (FO_T *)t->state[0];
    FO_T *restrict v = (FO_T *)t->state[1];
    const FO_T bc2 = (FO_T)t->scalar[0];
    const FO_T c1 = (FO_T)t->scalar[1];
    const FO_T c2 = (FO_T)t->scalar[2];
    const FO_T w = (FO_T)(1.0 - h->beta1), wm1 = w - (FO_T)1;
    const FO_T beta2 = (FO_T)h->beta2;
    const FO_T one_m_beta2 = (FO_T)(1.0 - h->beta2);
    const FO_T eps = (FO_T)h->eps;
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T decay = (FO_T)fo_lr_decay(h->lr, h->weight_decay, h->lr_tensor);
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;

    for (int64_t i = begin; i < end; i++) {
        FO_T gi = sign * g[i];
        FO_T pi = p[i];
        if (decoupled) pi = pi * decay;
        if (l2) gi = FO_FMA(pi, wd, gi);
        FO_T mi = FO_LERP(m[i], gi, w, wm1, small);
        m[i] = mi;
        FO_T vi = FO_FMA(one_m_beta2 * gi, gi, v[i] * beta2);
        v[i] = vi;
        FO_T denom = FO_SQRT(vi / bc2) + eps;
        pi = pi + (c1 * gi) / denom;
        p[i] = pi + (c2 * mi) / denom;
    }
}

void FO_FN(nadam)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_nadam_hyper *h = (const fo_nadam_hyper *)hyper;
    const int has_wd = h->weight_decay != 0.0;
    const int l2 = has_wd && !FO_FLAG(h->decoupled), dec = has_wd && FO_FLAG(h->decoupled);
    const int small = fabs((double)(FO_T)(1.0 - h->beta1)) < 0.5;
#define FO_CASE(L, D, S) \
    if (l2 == L && dec == D && small == S) { FO_FN(nadam_loop)(h, t, begin, end, L, D, S); return; }
    FO_CASE(0, 0, 1) FO_CASE(1, 0, 1) FO_CASE(0, 1, 1)
    FO_CASE(0, 0, 0) FO_CASE(1, 0, 0) FO_CASE(0, 1, 0)
#undef FO_CASE
}

#endif
