/*
 * sgd.c - SGD with momentum, dampening, Nesterov, weight decay and maximize, in torch 2.13's
 * single-tensor operation order:
 *   g = maximize ? -grad : grad;  g = fma(p, wd, g)                     (weight decay)
 *   buf = first ? g : fma(g, 1 - dampening, buf * momentum)            (momentum)
 *   g = nesterov ? fma(buf, momentum, g) : buf
 *   p = fma(g, -lr, p)
 * Dampening is not applied on the step that creates the buffer, as in torch.
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of SGD._hyperparameters. state[0] = momentum_buffer (unused when
 * momentum == 0). */
typedef struct fo_sgd_hyper {
    double lr, momentum, dampening, weight_decay, nesterov, maximize;
} fo_sgd_hyper;

#define FO_BODY "sgd.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(sgd, fo_sgd_hyper, NULL, 1);
#else

void FO_FN(sgd)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_sgd_hyper *h = (const fo_sgd_hyper *)hyper;
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict buf = (FO_T *)t->state[0];
    const FO_T neg_lr = (FO_T)(-h->lr);
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T mu = (FO_T)h->momentum;
    const FO_T damp1 = (FO_T)(1.0 - h->dampening);
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;
    const int has_wd = h->weight_decay != 0.0;
    const int nesterov = FO_FLAG(h->nesterov);

    if (h->momentum == 0.0) {
        for (int64_t i = begin; i < end; i++) {
            FO_T gi = sign * g[i];
            if (has_wd) gi = FO_FMA(p[i], wd, gi);
            p[i] = FO_FMA(gi, neg_lr, p[i]);
        }
    } else if (t->flags & FO_FIRST_STEP) {
        for (int64_t i = begin; i < end; i++) {
            FO_T gi = sign * g[i];
            if (has_wd) gi = FO_FMA(p[i], wd, gi);
            buf[i] = gi;
            FO_T d = nesterov ? FO_FMA(gi, mu, gi) : gi;
            p[i] = FO_FMA(d, neg_lr, p[i]);
        }
    } else {
        for (int64_t i = begin; i < end; i++) {
            FO_T gi = sign * g[i];
            if (has_wd) gi = FO_FMA(p[i], wd, gi);
            FO_T b = FO_FMA(gi, damp1, buf[i] * mu);
            buf[i] = b;
            FO_T d = nesterov ? FO_FMA(b, mu, gi) : b;
            p[i] = FO_FMA(d, neg_lr, p[i]);
        }
    }
}

#endif
