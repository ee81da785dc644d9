/*
 * adagrad.c - Adagrad in torch 2.13's single-tensor operation order:
 *   g = maximize ? -grad : grad;  g = fma(p, wd, g)       (weight decay)
 *   sum = fma(g, g, sum);  std = sqrt(sum) + eps;  p = p + (-clr * g) / std
 * with clr = lr / (1 + (step - 1) * lr_decay) computed by the caller (scalar[0]).
 */
#ifndef FO_T
#include "fo_internal.h"
#define FO_BODY "adagrad.c"
#include "fo_expand.h"
#else

void FO_FN(adagrad)(const void *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_adagrad_hyper *h = (const fo_adagrad_hyper *)hyper;
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict sum = (FO_T *)t->state[0];
    const FO_T neg_clr = (FO_T)(-t->scalar[0]);
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T eps = (FO_T)h->eps;
    const FO_T sign = h->maximize ? (FO_T)-1 : (FO_T)1;
    const int has_wd = h->weight_decay != 0.0;

    for (int64_t i = begin; i < end; i++) {
        FO_T gi = sign * g[i];
        if (has_wd) gi = FO_FMA(p[i], wd, gi);
        FO_T s = FO_FMA(gi, gi, sum[i]);
        sum[i] = s;
        FO_T std = FO_SQRT(s) + eps;
        p[i] = p[i] + (neg_clr * gi) / std;
    }
}

#endif
