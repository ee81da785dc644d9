/*
 * rprop.c - Rprop in torch 2.13's single-tensor order:
 *   g = maximize ? -grad : grad
 *   s = sign(g * prev) mapped to etaplus (> 0), etaminus (< 0), 1 (0; also NaN, since
 *       torch.sign(NaN) is 0 on CPU)
 *   step_size = clamp(step_size * s, min, max)      (min then max; NaN propagates)
 *   g = 0 where s == etaminus                        (no step after a sign change)
 *   p = fma(-sign(g), step_size, p);  prev = g
 * No weight decay, no square root: bit-exact with torch.
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of Rprop._hyperparameters. state[0] = prev, state[1] = step_size. */
typedef struct fo_rprop_hyper {
    double etaminus, etaplus, step_size_min, step_size_max, maximize;
} fo_rprop_hyper;

#define FO_BODY "rprop.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(rprop, fo_rprop_hyper, NULL, 1);
#else

void FO_FN(rprop)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_rprop_hyper *h = (const fo_rprop_hyper *)hyper;
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict prev = (FO_T *)t->state[0];
    FO_T *restrict ss = (FO_T *)t->state[1];
    const FO_T etaminus = (FO_T)h->etaminus, etaplus = (FO_T)h->etaplus;
    const FO_T lo = (FO_T)h->step_size_min, hi = (FO_T)h->step_size_max;
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;

    for (int64_t i = begin; i < end; i++) {
        FO_T gi = sign * g[i];
        FO_T prod = gi * prev[i];
        FO_T s = prod > 0 ? etaplus : (prod < 0 ? etaminus : (FO_T)1);
        FO_T si = ss[i] * s;
        si = si < lo ? lo : si;
        si = si > hi ? hi : si;
        ss[i] = si;
        gi = s == etaminus ? (FO_T)0 : gi;
        FO_T sg = (FO_T)(gi > 0) - (FO_T)(gi < 0);
        p[i] = FO_FMA(-sg, si, p[i]);
        prev[i] = gi;
    }
}

#endif
