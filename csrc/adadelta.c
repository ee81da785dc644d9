/*
 * adadelta.c - Adadelta in torch 2.13's single-tensor order:
 *   g = maximize ? -grad : grad;  g = fma(p, wd, g)                     (when wd != 0)
 *   sq = fma((1 - rho) * g, g, sq * rho)
 *   std = sqrt(sq + eps);  delta = sqrt(acc + eps) / std * g   (divide, then multiply)
 *   acc = fma((1 - rho) * delta, delta, acc * rho)
 *   p = fma(delta, -lr, p)
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of Adadelta._hyperparameters. state[0] = square_avg, state[1] =
 * acc_delta. */
typedef struct fo_adadelta_hyper {
    double lr, rho, eps, weight_decay, maximize;
} fo_adadelta_hyper;

#define FO_BODY "adadelta.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(adadelta, fo_adadelta_hyper, NULL, 1);
#else

static inline __attribute__((always_inline)) void
FO_FN(adadelta_loop)(const fo_adadelta_hyper *h, const fo_tensor *t, int64_t begin,
                     int64_t end, const int has_wd)
{
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict sq = (FO_T *)t->state[0];
    FO_T *restrict acc = (FO_T *)t->state[1];
    const FO_T neg_lr = (FO_T)(-h->lr);
    const FO_T rho = (FO_T)h->rho;
    const FO_T one_m_rho = (FO_T)(1.0 - h->rho);
    const FO_T eps = (FO_T)h->eps;
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;

    for (int64_t i = begin; i < end; i++) {
        FO_T gi = sign * g[i];
        FO_T pi = p[i];
        if (has_wd) gi = FO_FMA(pi, wd, gi);
        FO_T si = FO_FMA(one_m_rho * gi, gi, sq[i] * rho);
        sq[i] = si;
        FO_T std = FO_SQRT(si + eps);
        FO_T delta = FO_SQRT(acc[i] + eps) / std;
        delta = delta * gi;
        acc[i] = FO_FMA(one_m_rho * delta, delta, acc[i] * rho);
        p[i] = FO_FMA(delta, neg_lr, pi);
    }
}

void FO_FN(adadelta)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_adadelta_hyper *h = (const fo_adadelta_hyper *)hyper;
    if (h->weight_decay != 0.0)
        FO_FN(adadelta_loop)(h, t, begin, end, 1);
    else
        FO_FN(adadelta_loop)(h, t, begin, end, 0);
}

#endif
