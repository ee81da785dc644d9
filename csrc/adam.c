/*
 * adam.c - Adam and AdamW in torch 2.13's single-tensor operation order:
 *   g = maximize ? -grad : grad
 *   AdamW: p = p * (1 - lr * wd)        Adam: g = fma(p, wd, g)     (when wd != 0)
 *   m = lerp(m, g, 1 - beta1);  v = fma((1 - beta2) * g, g, v * beta2)
 *   amsgrad: vmax = maximum(vmax, v), used for v below
 *   denom = sqrt(v) / bc2_sqrt + eps;  p = p + (-step_size * m) / denom
 * with step_size = lr / (1 - beta1^t) and bc2_sqrt = (1 - beta2^t)^0.5 computed once per
 * tensor by adam_prepare, in double as torch computes them (step_size and 1 - lr * wd in
 * float32 for a float32 tensor lr, as torch: lr_f32, see fo_lr_div).
 * eps is added after the bias correction of sqrt(v), as torch does (not the paper's form).
 *
 * Where the ISA has a hardware fma, the division sqrt(v) / bc2_sqrt leaves the vector divider
 * (the bottleneck in cache: a sqrt and two divides per element) and becomes a multiply and
 * three fmas that give the same correctly rounded quotient (div_by_const below).
 */
#ifndef FO_T
#include "fo_internal.h"

/* Fields in the order of Adam._hyperparameters. state[0] = exp_avg, state[1] = exp_avg_sq,
 * state[2] = max_exp_avg_sq. scalar[0] = lr / (1 - beta1^t), scalar[1] = (1 - beta2^t)^0.5. */
typedef struct fo_adam_hyper {
    double lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, lr_f32;
} fo_adam_hyper;

static void adam_prepare(const double *hyper, fo_tensor *t, double step)
{
    const fo_adam_hyper *h = (const fo_adam_hyper *)hyper;
    t->scalar[0] = fo_lr_div(h->lr, 1.0 - pow(h->beta1, step), h->lr_f32);
    t->scalar[1] = pow(1.0 - pow(h->beta2, step), 0.5);
}

#define FO_BODY "adam.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(adam, fo_adam_hyper, adam_prepare, 1);
#else

/* s / c, correctly rounded, for s a square root and FO_DIV_BY_CONST_OK(c); see fo_internal.h */
static inline __attribute__((always_inline)) FO_T
FO_FN(div_by_const)(FO_T s, FO_T c, FO_T rh, FO_T rl)
{
    FO_T q0 = FO_FMA(s, rh, s * rl);
    FO_T q1 = FO_FMA(FO_FMA(-q0, c, s), rh, q0);
    return q1 > s ? q1 : s;
}

static inline __attribute__((always_inline)) void
FO_FN(adam_loop)(const fo_adam_hyper *h, const fo_tensor *t, int64_t begin, int64_t end,
                 const int l2, const int decoupled, const int amsgrad, const int small,
                 const int by_recip, const int maximize)
{
    FO_T *restrict p = (FO_T *)t->param;
    const FO_T *restrict g = (const FO_T *)t->grad;
    FO_T *restrict m = (FO_T *)t->state[0];
    FO_T *restrict v = (FO_T *)t->state[1];
    FO_T *restrict vmax = (FO_T *)t->state[2];
    const FO_T neg_step = (FO_T)(-t->scalar[0]);
    const FO_T bc2_sqrt = (FO_T)t->scalar[1];
    FO_T rh, rl;
    FO_RECIP2(bc2_sqrt, rh, rl);
    const FO_T w = (FO_T)(1.0 - h->beta1), wm1 = w - (FO_T)1;
    const FO_T beta2 = (FO_T)h->beta2;
    const FO_T one_m_beta2 = (FO_T)(1.0 - h->beta2);
    const FO_T eps = (FO_T)h->eps;
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T decay = (FO_T)fo_lr_decay(h->lr, h->weight_decay, h->lr_f32);

    for (int64_t i = begin; i < end; i++) {
        FO_T gi = maximize ? -g[i] : g[i];
        FO_T pi = p[i];
        if (decoupled) pi = pi * decay;
        if (l2) gi = FO_FMA(pi, wd, gi);
        FO_T mi = FO_LERP(m[i], gi, w, wm1, small);
        m[i] = mi;
        FO_T vi = FO_FMA(one_m_beta2 * gi, gi, v[i] * beta2);
        v[i] = vi;
        if (amsgrad) {
            vi = FO_MAXIMUM(vmax[i], vi);
            vmax[i] = vi;
        }
        FO_T s = FO_SQRT(vi);
        FO_T denom = (by_recip ? FO_FN(div_by_const)(s, bc2_sqrt, rh, rl) : s / bc2_sqrt) + eps;
        p[i] = pi + (neg_step * mi) / denom;
    }
}

/* The flags are passed as constants so that each combination gets its own vector loop. */
void FO_FN(adam)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_adam_hyper *h = (const fo_adam_hyper *)hyper;
    const int has_wd = h->weight_decay != 0.0;
    const int l2 = has_wd && !FO_FLAG(h->decoupled), dec = has_wd && FO_FLAG(h->decoupled);
    const int ams = FO_FLAG(h->amsgrad);
    const int small = fabs((double)(FO_T)(1.0 - h->beta1)) < 0.5;
    const int by_recip = FO_DIV_BY_CONST_OK((FO_T)t->scalar[1]);
    const int maximize = FO_FLAG(h->maximize);
#define FO_CASE(L, D, A, S) \
    if (l2 == L && dec == D && ams == A && small == S) { \
        if (by_recip && !maximize) FO_FN(adam_loop)(h, t, begin, end, L, D, A, S, 1, 0); \
        else if (by_recip) FO_FN(adam_loop)(h, t, begin, end, L, D, A, S, 1, 1); \
        else if (!maximize) FO_FN(adam_loop)(h, t, begin, end, L, D, A, S, 0, 0); \
        else FO_FN(adam_loop)(h, t, begin, end, L, D, A, S, 0, 1); \
        return; }
    FO_CASE(0, 0, 0, 1) FO_CASE(0, 0, 1, 1) FO_CASE(1, 0, 0, 1) FO_CASE(1, 0, 1, 1)
    FO_CASE(0, 1, 0, 1) FO_CASE(0, 1, 1, 1)
    FO_CASE(0, 0, 0, 0) FO_CASE(0, 0, 1, 0) FO_CASE(1, 0, 0, 0) FO_CASE(1, 0, 1, 0)
    FO_CASE(0, 1, 0, 0) FO_CASE(0, 1, 1, 0)
#undef FO_CASE
}

#endif
