/*
 * lion.c - Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
 *   g = maximize ? -grad : grad
 *   p = p * (1 - lr * wd)                                (decoupled, when wd != 0)
 *   c = lerp(m, g, 1 - beta1);  p = fma(sign(c), -lr, p)
 *   m = lerp(m, g, 1 - beta2)
 * sign(0) = 0 (a zero interpolant leaves the parameter alone, as jnp.sign in optax) and
 * sign(NaN) = NaN (a NaN is not hidden). The lerps round as torch's lerp_.
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of Lion._hyperparameters. state[0] = exp_avg. */
typedef struct fo_lion_hyper {
    double lr, beta1, beta2, weight_decay, maximize;
} fo_lion_hyper;

#define FO_BODY "lion.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(lion, fo_lion_hyper, NULL, 1);
#else

static inline __attribute__((always_inline)) void
FO_FN(lion_loop)(const fo_lion_hyper *h, const fo_tensor *t, int64_t begin, int64_t end,
                 const int has_wd, const int small1, const int small2)
{
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict m = (FO_T *)t->state[0];
    const FO_T neg_lr = (FO_T)(-h->lr);
    const FO_T w1 = (FO_T)(1.0 - h->beta1), w1m1 = w1 - (FO_T)1;
    const FO_T w2 = (FO_T)(1.0 - h->beta2), w2m1 = w2 - (FO_T)1;
    const FO_T decay = (FO_T)(1.0 - h->lr * h->weight_decay);
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;

    for (int64_t i = begin; i < end; i++) {
        FO_T gi = sign * g[i];
        FO_T pi = p[i];
        FO_T mi = m[i];
        if (has_wd) pi = pi * decay;
        FO_T c = FO_LERP(mi, gi, w1, w1m1, small1);
        FO_T sc = (FO_T)(c > 0) - (FO_T)(c < 0);
        sc = c != c ? c : sc;
        p[i] = FO_FMA(sc, neg_lr, pi);
        m[i] = FO_LERP(mi, gi, w2, w2m1, small2);
    }
}

void FO_FN(lion)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_lion_hyper *h = (const fo_lion_hyper *)hyper;
    const int has_wd = h->weight_decay != 0.0;
    const int s1 = fabs((double)(FO_T)(1.0 - h->beta1)) < 0.5;
    const int s2 = fabs((double)(FO_T)(1.0 - h->beta2)) < 0.5;
#define FO_CASE(W, A, B) \
    if (has_wd == W && s1 == A && s2 == B) { FO_FN(lion_loop)(h, t, begin, end, W, A, B); return; }
    FO_CASE(0, 1, 1) FO_CASE(1, 1, 1) FO_CASE(0, 0, 1) FO_CASE(1, 0, 1)
    FO_CASE(0, 1, 0) FO_CASE(1, 1, 0) FO_CASE(0, 0, 0) FO_CASE(1, 0, 0)
#undef FO_CASE
}

#endif
