/*
 * radam.c - RAdam in torch 2.13's single-tensor order:
 *   g = maximize ? -grad : grad
 *   decoupled: p = p * (1 - lr * wd)      else g = fma(p, wd, g)       (when wd != 0)
 *   m = lerp(m, g, 1 - beta1);  v = fma((1 - beta2) * g, g, v * beta2)
 *   mh = m / bc1
 *   rho_t > 5 (scalar[3] = 1):  a = (1 / (sqrt(v) + eps)) * bc2_sqrt
 *                                 p = p - ((mh * lr) * a) * rect
 *   otherwise:                    p = p - mh * lr
 * bc1, bc2_sqrt and rect come from radam_prepare (scalar[0..3]); each product is rounded as
 * torch's chain of tensor-scalar multiplications is.
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of RAdam._hyperparameters. state[0] = exp_avg, state[1] = exp_avg_sq.
 * scalar[0] = 1 - beta1^t, scalar[1] = (1 - beta2^t)^0.5, scalar[2] = rectification term,
 * scalar[3] = 1 when rho_t > 5 (take the rectified adaptive step), else 0. */
typedef struct fo_radam_hyper {
    double lr, beta1, beta2, eps, weight_decay, decoupled, maximize, lr_tensor;
} fo_radam_hyper;

static void radam_prepare(const double *hyper, fo_tensor *t, double step)
{
    const fo_radam_hyper *h = (const fo_radam_hyper *)hyper;
    double rho_inf = 2.0 / (1.0 - h->beta2) - 1.0;
    double bc1 = 1.0 - pow(h->beta1, step);
    double bc2 = 1.0 - pow(h->beta2, step);
    double rho_t = rho_inf - 2.0 * step * pow(h->beta2, step) / bc2;
    t->scalar[0] = bc1;
    t->scalar[1] = pow(bc2, 0.5);
    t->scalar[2] = 0.0;
    t->scalar[3] = 0.0;
    if (rho_t > 5.0) {
        t->scalar[2] = pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                           / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5);
        t->scalar[3] = 1.0;
    }
}

#define FO_BODY "radam.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(radam, fo_radam_hyper, radam_prepare, 1);
#else

static inline __attribute__((always_inline)) void
FO_FN(radam_loop)(const fo_radam_hyper *h, const fo_tensor *t, int64_t begin, int64_t end,
                  const int l2, const int decoupled, const int small, const int rect)
{
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict m = (FO_T *)t->state[0];
    FO_T *restrict v = (FO_T *)t->state[1];
    const FO_T bc1 = (FO_T)t->scalar[0];
    const FO_T bc2_sqrt = (FO_T)t->scalar[1];
    const FO_T rect_v = (FO_T)t->scalar[2];
    const FO_T lr = (FO_T)h->lr;
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
        FO_T upd = (mi / bc1) * lr;
        if (rect) {
            FO_T a = ((FO_T)1 / (FO_SQRT(vi) + eps)) * bc2_sqrt;
            upd = (upd * a) * rect_v;
        }
        p[i] = pi - upd;
    }
}

void FO_FN(radam)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_radam_hyper *h = (const fo_radam_hyper *)hyper;
    const int has_wd = h->weight_decay != 0.0;
    const int l2 = has_wd && !FO_FLAG(h->decoupled), dec = has_wd && FO_FLAG(h->decoupled);
    const int small = fabs((double)(FO_T)(1.0 - h->beta1)) < 0.5;
    const int rect = t->scalar[3] != 0.0;
#define FO_CASE(L, D, S, R) \
    if (l2 == L && dec == D && small == S && rect == R) { \
        FO_FN(radam_loop)(h, t, begin, end, L, D, S, R); return; }
    FO_CASE(0, 0, 1, 1) FO_CASE(1, 0, 1, 1) FO_CASE(0, 1, 1, 1)
    FO_CASE(0, 0, 0, 1) FO_CASE(1, 0, 0, 1) FO_CASE(0, 1, 0, 1)
    FO_CASE(0, 0, 1, 0) FO_CASE(1, 0, 1, 0) FO_CASE(0, 1, 1, 0)
    FO_CASE(0, 0, 0, 0) FO_CASE(1, 0, 0, 0) FO_CASE(0, 1, 0, 0)
#undef FO_CASE
}

#endif
