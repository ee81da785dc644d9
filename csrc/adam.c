/*
 * adam.c - Adam and AdamW in torch 2.13's single-tensor operation order:
 *   g = maximize ? -grad : grad
 *   AdamW: p = p * (1 - lr * wd)        Adam: g = fma(p, wd, g)     (when wd != 0)
 *   m = lerp(m, g, 1 - beta1);  v = fma((1 - beta2) * g, g, v * beta2)
 *   amsgrad: vmax = maximum(vmax, v), used for v below
 *   denom = sqrt(v) / bc2_sqrt + eps;  p = p + (-step_size * m) / denom
 * with step_size = lr / (1 - beta1^t) and bc2_sqrt = (1 - beta2^t)^0.5 computed once per
 * tensor by adam_prepare, in double as torch computes them; with tensor betas or a float32
 * tensor lr, in torch's 0-d tensor arithmetic (betas_tensor, lr_tensor: see adam_prepare).
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
    double lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, lr_tensor,
        betas_tensor;
} fo_adam_hyper;

/* torch's beta ** t of a 0-d tensor beta (ATen's pow by a number: x*x for 2, x*x*x for 3,
 * else the double pow, rounded to the tensor's dtype). */
static float adam_pow_f32(float b, double step)
{
    return step == 1.0 ? b : step == 2.0 ? b * b : step == 3.0 ? b * b * b
                                         : (float)pow((double)b, step);
}

static double adam_pow_f64(double b, double step)
{
    return step == 1.0 ? b : step == 2.0 ? b * b : step == 3.0 ? b * b * b : pow(b, step);
}

/* With tensor betas (betas_tensor 32 or 64: their dtype's bits) torch's bias corrections
 * 1 - beta^t are 0-d tensors of that dtype, and so are step_size = lr / bc1 (for a number lr,
 * number / tensor: reciprocal(bc1) * lr; for a tensor lr, a division in the wider dtype) and
 * bc2 ** 0.5 (ATen's sqrt, which may differ from the correctly rounded one in the last bit). */
static void adam_prepare(const double *hyper, fo_tensor *t, double step)
{
    const fo_adam_hyper *h = (const fo_adam_hyper *)hyper;
    if (h->betas_tensor == 32.0) {
        float bc1 = 1.0f - adam_pow_f32((float)h->beta1, step);
        float bc2 = 1.0f - adam_pow_f32((float)h->beta2, step);
        if (h->lr_tensor == 32.0)
            t->scalar[0] = (double)((float)h->lr / bc1);
        else if (h->lr_tensor == 64.0)
            t->scalar[0] = h->lr / (double)bc1;
        else
            t->scalar[0] = (double)((1.0f / bc1) * (float)h->lr);
        t->scalar[1] = (double)sqrtf(bc2);
        return;
    }
    if (h->betas_tensor == 64.0) {
        double bc1 = 1.0 - adam_pow_f64(h->beta1, step);
        double bc2 = 1.0 - adam_pow_f64(h->beta2, step);
        t->scalar[0] = h->lr_tensor != 0.0 ? h->lr / bc1 : (1.0 / bc1) * h->lr;
        t->scalar[1] = sqrt(bc2);
        return;
    }
    t->scalar[0] = fo_lr_div(h->lr, 1.0 - pow(h->beta1, step), h->lr_tensor);
    t->scalar[1] = pow(1.0 - pow(h->beta2, step), 0.5);
}

#define FO_BODY "adam.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(adam, fo_adam_hyper, adam_prepare, 1);
#else

/* The lerp weight 1 - beta1 and 1 - beta2: torch computes them in double from number betas;
 * from tensor betas, 1 - beta1 in the parameter's dtype (of beta1 cast to it) and 1 - beta2
 * in the betas' dtype. */
static inline __attribute__((always_inline)) FO_T FO_FN(adam_w)(const fo_adam_hyper *h)
{
    return h->betas_tensor != 0.0 ? (FO_T)1 - (FO_T)h->beta1 : (FO_T)(1.0 - h->beta1);
}

static inline __attribute__((always_inline)) FO_T FO_FN(adam_one_m_beta2)(const fo_adam_hyper *h)
{
    return h->betas_tensor == 32.0 ? (FO_T)(1.0f - (float)h->beta2) : (FO_T)(1.0 - h->beta2);
}

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
    const FO_T w = FO_FN(adam_w)(h), wm1 = w - (FO_T)1;
    const FO_T beta2 = (FO_T)h->beta2;
    const FO_T one_m_beta2 = FO_FN(adam_one_m_beta2)(h);
    const FO_T eps = (FO_T)h->eps;
    const FO_T wd = (FO_T)h->weight_decay;
    const FO_T decay = (FO_T)fo_lr_decay(h->lr, h->weight_decay, h->lr_tensor);

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
    const int small = fabs((double)FO_FN(adam_w)(h)) < 0.5;
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
