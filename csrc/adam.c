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
FO_DEFINE_KERNEL_FUSED(adam, fo_adam_hyper, adam_prepare, 1, FO_CAT3(fo_adam_packed, f32, FO_ISA));
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

/* Compressed exp_avg and exp_avg_sq read (and written) by the loop itself, which lets their
 * decoding overlap the square root and the division, with fo_lowp_run's bits:
 *   FO_ADAM_Q8: read from the 8-bit codes qm and qv (block scales sm and sv); state[0] and
 *     state[1] take the new values, for the caller to encode;
 *   FO_ADAM_Q8F: the same for blocks without non-finite codes (the decoding skips them);
 *   FO_ADAM_BF16: read from and written to the bfloat16 arrays hm and hv (rounded to
 *     nearest); state[0] and state[1] are not used. */
#ifndef FO_ADAM_Q8
#define FO_ADAM_Q8 1
#define FO_ADAM_BF16 2
#define FO_ADAM_Q8F 3
#endif
static inline __attribute__((always_inline)) void
FO_FN(adam_loop)(const fo_adam_hyper *h, const fo_tensor *t, int64_t begin, int64_t end,
                 const int l2, const int decoupled, const int amsgrad, const int small,
                 const int by_recip, const int maximize, const int packed,
                 const uint8_t *restrict qm, const uint8_t *restrict qv, float sm, float sv,
                 uint16_t *restrict hm, uint16_t *restrict hv)
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
        FO_T m0 = packed == FO_ADAM_Q8 ? (FO_T)fo_q8_decode1(FO_FMT_Q8S, qm[i], sm)
                  : packed == FO_ADAM_Q8F ? (FO_T)fo_q8_decode1_finite(FO_FMT_Q8S, qm[i], sm)
                  : packed == FO_ADAM_BF16 ? (FO_T)fo_bf16_to_f32(hm[i]) : m[i];
        FO_T v0 = packed == FO_ADAM_Q8 ? (FO_T)fo_q8_decode1(FO_FMT_Q8U, qv[i], sv)
                  : packed == FO_ADAM_Q8F ? (FO_T)fo_q8_decode1_finite(FO_FMT_Q8U, qv[i], sv)
                  : packed == FO_ADAM_BF16 ? (FO_T)fo_bf16_to_f32(hv[i]) : v[i];
        FO_T mi = FO_LERP(m0, gi, w, wm1, small);
        FO_T vi = FO_FMA(one_m_beta2 * gi, gi, v0 * beta2);
        if (packed == FO_ADAM_BF16) {
            hm[i] = fo_f32_to_bf16((float)mi);
            hv[i] = fo_f32_to_bf16((float)vi);
        } else {
            m[i] = mi;
            v[i] = vi;
        }
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
static inline __attribute__((always_inline)) void
FO_FN(adam_cases)(const fo_adam_hyper *h, const fo_tensor *t, int64_t begin, int64_t end,
                  const int packed, const uint8_t *qm, const uint8_t *qv, float sm, float sv,
                  uint16_t *hm, uint16_t *hv)
{
    const int has_wd = h->weight_decay != 0.0;
    const int l2 = has_wd && !FO_FLAG(h->decoupled), dec = has_wd && FO_FLAG(h->decoupled);
    const int ams = FO_FLAG(h->amsgrad);
    const int small = fabs((double)FO_FN(adam_w)(h)) < 0.5;
    const int by_recip = FO_DIV_BY_CONST_OK((FO_T)t->scalar[1]);
    const int maximize = FO_FLAG(h->maximize);
#define FO_LOOP(L, D, A, S, R, M) \
    FO_FN(adam_loop)(h, t, begin, end, L, D, A, S, R, M, packed, qm, qv, sm, sv, hm, hv)
#define FO_CASE(L, D, A, S) \
    if (l2 == L && dec == D && ams == A && small == S) { \
        if (by_recip && !maximize) FO_LOOP(L, D, A, S, 1, 0); \
        else if (by_recip) FO_LOOP(L, D, A, S, 1, 1); \
        else if (!maximize) FO_LOOP(L, D, A, S, 0, 0); \
        else FO_LOOP(L, D, A, S, 0, 1); \
        return; }
    if (!packed) {
        FO_CASE(0, 0, 1, 1) FO_CASE(1, 0, 1, 1) FO_CASE(0, 1, 1, 1)
        FO_CASE(0, 0, 1, 0) FO_CASE(1, 0, 1, 0) FO_CASE(0, 1, 1, 0)
    }
    FO_CASE(0, 0, 0, 1) FO_CASE(1, 0, 0, 1) FO_CASE(0, 1, 0, 1)
    FO_CASE(0, 0, 0, 0) FO_CASE(1, 0, 0, 0) FO_CASE(0, 1, 0, 0)
#undef FO_CASE
#undef FO_LOOP
}

void FO_FN(adam)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    FO_FN(adam_cases)((const fo_adam_hyper *)hyper, t, begin, end, 0, NULL, NULL, 0.0f, 0.0f,
                      NULL, NULL);
}

#if FO_F32
/* float32 parameters and gradients with 8-bit or bfloat16 exp_avg and exp_avg_sq (no
 * amsgrad; bfloat16 rounded to nearest): the loop above reads the compressed state itself.
 * 8-bit blocks of FO_Q8_BLOCK elements are updated into two float buffers, which are then
 * encoded with their new scales, as fo_lowp_run does; a block whose codes are all finite
 * (every block of finite state) is decoded without the checks for the non-finite codes. */
static int FO_FN(adam_packed)(const double *hyper, const fo_tensor *t, int64_t begin,
                              int64_t end)
{
    const fo_adam_hyper *h = (const fo_adam_hyper *)hyper;
    const int64_t st = t->storage;
    const int f0 = FO_FMT_OF(st, 8), f1 = FO_FMT_OF(st, 12);
    if (FO_FMT_OF(st, 0) != FO_FMT_F32 || FO_FMT_OF(st, 4) != FO_FMT_F32
        || t->state[2] != NULL || t->copy != NULL || FO_FLAG(h->amsgrad))
        return 0;
    fo_tensor b = *t;
    b.storage = FO_STORAGE_NATIVE;
    if (f0 == FO_FMT_BF16 && f1 == FO_FMT_BF16 && !(st & FO_STORAGE_SR)) {
        FO_FN(adam_cases)(h, &b, begin, end, FO_ADAM_BF16, NULL, NULL, 0.0f, 0.0f,
                          (uint16_t *)t->state[0], (uint16_t *)t->state[1]);
        return 1;
    }
    if (f0 != FO_FMT_Q8S || f1 != FO_FMT_Q8U)
        return 0;
    float mb[FO_Q8_BLOCK], vb[FO_Q8_BLOCK];
    uint8_t *qm = (uint8_t *)t->state[0], *qv = (uint8_t *)t->state[1];
    b.state[0] = mb;
    b.state[1] = vb;
    for (int64_t lo = begin; lo < end; lo += FO_Q8_BLOCK) {
        const int64_t n = end - lo < FO_Q8_BLOCK ? end - lo : FO_Q8_BLOCK, k = lo / FO_Q8_BLOCK;
        b.param = (float *)t->param + lo;
        b.grad = (const float *)t->grad + lo;
        if (fo_q8_codes_finite(FO_FMT_Q8S, qm + lo, n)
            && fo_q8_codes_finite(FO_FMT_Q8U, qv + lo, n))
            FO_FN(adam_cases)(h, &b, 0, n, FO_ADAM_Q8F, qm + lo, qv + lo, t->scale[0][k],
                              t->scale[1][k], NULL, NULL);
        else
            FO_FN(adam_cases)(h, &b, 0, n, FO_ADAM_Q8, qm + lo, qv + lo, t->scale[0][k],
                              t->scale[1][k], NULL, NULL);
        t->scale[0][k] = fo_q8_store(FO_FMT_Q8S, mb, qm + lo, n);
        t->scale[1][k] = fo_q8_store(FO_FMT_Q8U, vb, qv + lo, n);
    }
    return 1;
}
#endif

#endif
