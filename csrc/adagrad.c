/*
 * adagrad.c - Adagrad in torch 2.13's single-tensor operation order:
 *   g = maximize ? -grad : grad;  g = fma(p, wd, g)       (weight decay)
 *   sum = fma(g, g, sum);  std = sqrt(sum) + eps;  p = p + (-clr * g) / std
 * with clr = lr / (1 + (step - 1) * lr_decay) computed by adagrad_prepare (scalar[0]).
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of Adagrad._hyperparameters. state[0] = sum. scalar[0] = clr = lr / (1 +
 * (step - 1) * lr_decay). */
typedef struct fo_adagrad_hyper {
    double lr, lr_decay, weight_decay, eps, maximize, lr_tensor;
} fo_adagrad_hyper;

static void adagrad_prepare(const double *hyper, fo_tensor *t, double step)
{
    const fo_adagrad_hyper *h = (const fo_adagrad_hyper *)hyper;
    t->scalar[0] = fo_lr_div(h->lr, 1.0 + (step - 1.0) * h->lr_decay, h->lr_tensor);
}

#define FO_BODY "adagrad.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(adagrad, fo_adagrad_hyper, adagrad_prepare, 1);
#else

void FO_FN(adagrad)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_adagrad_hyper *h = (const fo_adagrad_hyper *)hyper;
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict sum = (FO_T *)t->state[0];
    const FO_T neg_clr = (FO_T)(-t->scalar[0]);
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T eps = (FO_T)h->eps;
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;
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
