/*
 * rmsprop.c - RMSprop (plain, centered, with momentum) in torch 2.13's single-tensor order:
 *   g = maximize ? -grad : grad;  g = fma(p, wd, g)               (weight decay)
 *   sq = fma((1 - alpha) * g, g, sq * alpha)
 *   centered: ga = lerp(ga, g, 1 - alpha);  avg = sqrt(fma(-ga, ga, sq))
 *   else:     avg = sqrt(sq)
 *   avg = avg + eps                                                (eps outside the sqrt)
 *   momentum: buf = buf * momentum + g / avg;  p = fma(buf, -lr, p)
 *   else:     p = p + (-lr * g) / avg
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of RMSprop._hyperparameters. state[0] = square_avg, state[1] =
 * momentum_buffer, state[2] = grad_avg. */
typedef struct fo_rmsprop_hyper {
    double lr, alpha, eps, weight_decay, momentum, centered, maximize;
} fo_rmsprop_hyper;

#define FO_BODY "rmsprop.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(rmsprop, fo_rmsprop_hyper, NULL, 1);
#else

static inline __attribute__((always_inline)) void
FO_FN(rmsprop_loop)(const fo_rmsprop_hyper *h, const fo_tensor *t, int64_t begin, int64_t end,
                    const int has_wd, const int centered, const int has_mom)
{
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict sq = (FO_T *)t->state[0];
    FO_T *restrict buf = (FO_T *)t->state[1];
    FO_T *restrict ga = (FO_T *)t->state[2];
    const FO_T neg_lr = (FO_T)(-h->lr);
    const FO_T alpha = (FO_T)h->alpha;
    const FO_T w = (FO_T)(1.0 - h->alpha), wm1 = w - (FO_T)1;
    const int small = fabs((double)w) < 0.5;
    const FO_T eps = (FO_T)h->eps;
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T mu = (FO_T)h->momentum;
    const FO_T sign = FO_FLAG(h->maximize) ? (FO_T)-1 : (FO_T)1;

    for (int64_t i = begin; i < end; i++) {
        FO_T gi = sign * g[i];
        if (has_wd) gi = FO_FMA(p[i], wd, gi);
        FO_T s = FO_FMA(w * gi, gi, sq[i] * alpha);
        sq[i] = s;
        FO_T avg;
        if (centered) {
            FO_T a = FO_LERP(ga[i], gi, w, wm1, small);
            ga[i] = a;
            avg = FO_SQRT(FO_FMA(-a, a, s));
        } else {
            avg = FO_SQRT(s);
        }
        avg = avg + eps;
        if (has_mom) {
            FO_T b = buf[i] * mu + gi / avg;
            buf[i] = b;
            p[i] = FO_FMA(b, neg_lr, p[i]);
        } else {
            p[i] = p[i] + (neg_lr * gi) / avg;
        }
    }
}

/* The flags are passed as constants so that each combination gets its own vector loop. */
void FO_FN(rmsprop)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_rmsprop_hyper *h = (const fo_rmsprop_hyper *)hyper;
    const int wd = h->weight_decay != 0.0, c = FO_FLAG(h->centered), m = h->momentum > 0.0;
#define FO_CASE(W, C, M) \
    if (wd == W && c == C && m == M) { FO_FN(rmsprop_loop)(h, t, begin, end, W, C, M); return; }
    FO_CASE(0, 0, 0) FO_CASE(0, 0, 1) FO_CASE(0, 1, 0) FO_CASE(0, 1, 1)
    FO_CASE(1, 0, 0) FO_CASE(1, 0, 1) FO_CASE(1, 1, 0) FO_CASE(1, 1, 1)
#undef FO_CASE
}

#endif
