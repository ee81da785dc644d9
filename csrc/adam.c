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
#if defined(__AVX2__)
/* A prefetch of the line `ahead` elements of `size` bytes past x, which may lie past the
 * array's end (so the address is computed as an integer). */
static inline __attribute__((always_inline)) void adam_q8_prefetch(const void *x, int64_t ahead,
                                                                   int size)
{
    _mm_prefetch((const char *)((uintptr_t)x + (uintptr_t)(ahead * size)), _MM_HINT_T0);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && FO_FAST_FMA
#define FO_ADAM_Q8_FAST 1
/* Whole 8-bit blocks at the avx512 and avx2 levels: one loop updates the parameters and
 * writes the new state of a block into two float buffers, tracking the largest and smallest
 * magnitudes (the new scales, and whether any value falls in the codes' linear range), and a
 * second one encodes the buffers. The operations are those of adam_loop and of
 * fo_q8_decode1_finite and fo_q8_encode_block for clean blocks, so the bytes are the same,
 * with three shortcuts:
 *   signed codes are decoded as half-precision numbers: a code byte s|e|f (1, 4 and 3 bits)
 *     is the top byte of the half s|0e|f|0000000 (the linear range, e = 0, is the half's
 *     subnormals), which the hardware widens exactly; (sign-extended byte << 7) & 0xbfff;
 *   unsigned codes below 8 are decoded as 2 * v - 2^(1-E), for v the value the normal
 *     formula gives them (exact), and only in blocks that hold such a code;
 *   a block without values below 2^(1-E) of its scale (the smallest y decides: rounding is
 *     monotonic) is encoded without the linear range's operations.
 * The loop prefetches the arrays FO_Q8_AHEAD elements ahead: on one thread the hardware's
 * prefetching alone leaves it waiting for memory. */
#define FO_Q8_AHEAD 512

typedef struct adam_q8_k {
    __m512 neg_step, bc2_sqrt, rh, rl, w, wm1, beta2, omb2, eps, wd, decay;
} adam_q8_k;

static inline __attribute__((always_inline)) void adam_q8_dec_s32(const uint8_t *q, __m512 sc,
                                                                   __m512 *lo, __m512 *hi)
{
    const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)q));
    const __m512i h = _mm512_and_si512(_mm512_slli_epi16(w, 7),
                                       _mm512_set1_epi16((short)0xbfff));
    *lo = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), sc);
    *hi = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), sc);
}

static inline __attribute__((always_inline)) __m512 adam_q8_dec_u(const uint8_t *q, __m512 sc,
                                                                  const int low)
{
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_add_epi32(c, _mm512_set1_epi32((127 - FO_Q8U_E) << 3)), 20));
    if (low)
        v = _mm512_mask_fmsub_ps(
            v, _mm512_cmplt_epi32_mask(c, _mm512_set1_epi32(8)), _mm512_set1_ps(2.0f),
            _mm512_set1_ps(fo_bits_f32((uint32_t)(127 + 1 - FO_Q8U_E) << 23)));
    return _mm512_mul_ps(v, sc);
}

/* The code of y = |x| / scale (finite, in [0, 1]), without the sign, as an int32; `low`:
 * some y may be in the linear range. */
static inline __attribute__((always_inline)) __m512i adam_q8_code(__m512 y, const int e,
                                                                 const int low)
{
    const __m512i yb = _mm512_castps_si512(y);
    const __m512i c = _mm512_srli_epi32(
        _mm512_sub_epi32(yb, _mm512_set1_epi32((int32_t)((uint32_t)(127 - e) << 23) - 0x80000)),
        20);
    if (!low) return c;
    const __m512 sub_max = _mm512_set1_ps(fo_bits_f32((uint32_t)(127 + 1 - e) << 23));
    const __m512 sub_mul = _mm512_set1_ps(fo_bits_f32((uint32_t)(127 + e + 2) << 23));
    return _mm512_mask_sub_epi32(
        c, _mm512_cmp_ps_mask(y, sub_max, _CMP_LT_OQ),
        _mm512_castps_si512(_mm512_fmadd_ps(y, sub_mul, _mm512_set1_ps(0x1p23f))),
        _mm512_set1_epi32(0x4b000000));
}

/* 64 codes in the bytes of four int32 vectors (each in 0..255) stored in order: two
 * saturating packs interleave the four vectors by 4 elements within each 128-bit lane,
 * which one permutation of 32-bit groups undoes. */
static inline __attribute__((always_inline)) void adam_q8_put64(uint8_t *q, __m512i c0,
                                                                __m512i c1, __m512i c2,
                                                                __m512i c3)
{
    const __m512i b = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1),
                                          _mm512_packus_epi32(c2, c3));
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    _mm512_storeu_si512((void *)q, _mm512_permutexvar_epi32(idx, b));
}

static inline __attribute__((always_inline)) __m512i adam_q8_code_s(const float *x, __m512 inv,
                                                                   const int low)
{
    const __m512i u = _mm512_loadu_si512((const void *)x);
    const __m512 y = _mm512_mul_ps(
        _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff))), inv);
    return _mm512_ternarylogic_epi32(adam_q8_code(y, FO_Q8S_E, low), _mm512_srli_epi32(u, 24),
                                     _mm512_set1_epi32(0x80), 0xf8);
}

static inline __attribute__((always_inline)) __m512i adam_q8_code_u(const float *x, __m512 inv,
                                                                   const int low)
{
    return adam_q8_code(_mm512_mul_ps(_mm512_loadu_ps(x), inv), FO_Q8U_E, low);
}

static inline __attribute__((always_inline)) void
adam_q8_encode_as(const float *mb, const float *vb, uint8_t *qm, uint8_t *qv, float ims,
                  float ivs, const int mlow, const int vlow)
{
    const __m512 im = _mm512_set1_ps(ims), iv = _mm512_set1_ps(ivs);
    for (int j = 0; j < FO_Q8_BLOCK; j += 64) {
        adam_q8_put64(qm + j, adam_q8_code_s(mb + j, im, mlow),
                      adam_q8_code_s(mb + j + 16, im, mlow),
                      adam_q8_code_s(mb + j + 32, im, mlow),
                      adam_q8_code_s(mb + j + 48, im, mlow));
        adam_q8_put64(qv + j, adam_q8_code_u(vb + j, iv, vlow),
                      adam_q8_code_u(vb + j + 16, iv, vlow),
                      adam_q8_code_u(vb + j + 32, iv, vlow),
                      adam_q8_code_u(vb + j + 48, iv, vlow));
    }
}

/* A block's codes: 0 if one is non-finite (a signed code's magnitude 0x7e or 0x7f, an
 * unsigned code 0xfe or 0xff: with the signed codes' sign bits set, both at least 0xfe), else
 * 1, or 2 when some unsigned code is below 8 (the linear range). */
static inline __attribute__((always_inline)) int adam_q8_codes_scan(const uint8_t *qm,
                                                                   const uint8_t *qv)
{
    const __m512i sbit = _mm512_set1_epi8((char)0x80);
    __m512i mx = _mm512_setzero_si512(), mn = _mm512_set1_epi8((char)0xff);
    for (int j = 0; j < FO_Q8_BLOCK; j += 64) {
        const __m512i b = _mm512_loadu_si512((const void *)(qv + j));
        mx = _mm512_max_epu8(mx, _mm512_max_epu8(
            _mm512_or_si512(_mm512_loadu_si512((const void *)(qm + j)), sbit), b));
        mn = _mm512_min_epu8(mn, b);
    }
    if (_mm512_cmpge_epu8_mask(mx, _mm512_set1_epi8((char)0xfe)))
        return 0;
    return _mm512_cmplt_epu8_mask(mn, _mm512_set1_epi8(8)) ? 2 : 1;
}

/* One block: p and g at its start, its codes qm and qv with scales sm and sv; writes the new
 * state to mb and vb and, in r, the bits of the largest |m| and v and of the smallest. */
static inline __attribute__((always_inline)) void
adam_q8_update(const adam_q8_k *K, float *restrict p, const float *restrict g,
               const uint8_t *qm, const uint8_t *qv, float sm_s, float sv_s,
               float *restrict mb, float *restrict vb, uint32_t r[4], const int l2,
               const int dec, const int small, const int maximize, const int vlow)
{
    const __m512 sm = _mm512_set1_ps(sm_s), sv = _mm512_set1_ps(sv_s);
    __m512 mxm = _mm512_setzero_ps(), mnm = _mm512_set1_ps(INFINITY);
    __m512i mxv = _mm512_setzero_si512(), mnv = _mm512_set1_epi32(-1);
    for (int j = 0; j < FO_Q8_BLOCK; j += 32) {
        adam_q8_prefetch(g + j, FO_Q8_AHEAD, sizeof *g);
        adam_q8_prefetch(g + j + 16, FO_Q8_AHEAD, sizeof *g);
        adam_q8_prefetch(p + j, FO_Q8_AHEAD, sizeof *p);
        adam_q8_prefetch(p + j + 16, FO_Q8_AHEAD, sizeof *p);
        if ((j & 63) == 0) {
            adam_q8_prefetch(qm + j, FO_Q8_AHEAD, sizeof *qm);
            adam_q8_prefetch(qv + j, FO_Q8_AHEAD, sizeof *qv);
        }
        __m512 mdec[2];
        adam_q8_dec_s32(qm + j, sm, &mdec[0], &mdec[1]);
        for (int half = 0; half < 2; half++) {
            const int i = j + 16 * half;
            __m512 gi = _mm512_loadu_ps(g + i);
            if (maximize)
                gi = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gi),
                                                          _mm512_set1_epi32(INT32_MIN)));
            __m512 pi = _mm512_loadu_ps(p + i);
            if (dec) pi = _mm512_mul_ps(pi, K->decay);
            if (l2) gi = _mm512_fmadd_ps(pi, K->wd, gi);
            const __m512 m0 = mdec[half];
            const __m512 v0 = adam_q8_dec_u(qv + i, sv, vlow);
            const __m512 d = _mm512_sub_ps(gi, m0);
            const __m512 mi = small ? _mm512_fmadd_ps(K->w, d, m0)
                                    : _mm512_fmadd_ps(K->wm1, d, gi);
            const __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(K->omb2, gi), gi,
                                              _mm512_mul_ps(v0, K->beta2));
            _mm512_store_ps(mb + i, mi);
            _mm512_store_ps(vb + i, vi);
            mxm = _mm512_range_ps(mxm, mi, 0x0b); /* the larger |.|, sign cleared */
            mnm = _mm512_range_ps(mnm, mi, 0x0a); /* the smaller */
            mxv = _mm512_max_epu32(mxv, _mm512_castps_si512(vi));
            mnv = _mm512_min_epu32(mnv, _mm512_castps_si512(vi));
            const __m512 s = _mm512_sqrt_ps(vi);
            const __m512 q0 = _mm512_fmadd_ps(s, K->rh, _mm512_mul_ps(s, K->rl));
            const __m512 q1 = _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, K->bc2_sqrt, s), K->rh, q0);
            const __m512 den = _mm512_add_ps(_mm512_max_ps(q1, s), K->eps);
            _mm512_storeu_ps(p + i, _mm512_add_ps(
                pi, _mm512_div_ps(_mm512_mul_ps(K->neg_step, mi), den)));
        }
    }
    r[0] = (uint32_t)_mm512_reduce_max_epu32(_mm512_castps_si512(mxm));
    r[1] = (uint32_t)_mm512_reduce_max_epu32(mxv);
    r[2] = (uint32_t)_mm512_reduce_min_epu32(_mm512_castps_si512(mnm));
    r[3] = (uint32_t)_mm512_reduce_min_epu32(mnv);
}

#define FO_Q8_SET1 _mm512_set1_ps
#elif defined(__AVX2__) && defined(__F16C__) && FO_FAST_FMA
#define FO_ADAM_Q8_FAST 1
/* The same at the avx2 level, 8 elements per vector: blends for the masks, integer max and
 * min of the magnitudes' bits. */
#define FO_Q8_AHEAD 512

typedef struct adam_q8_k {
    __m256 neg_step, bc2_sqrt, rh, rl, w, wm1, beta2, omb2, eps, wd, decay;
} adam_q8_k;

static inline __attribute__((always_inline)) void adam_q8_dec_s16(const uint8_t *q, __m256 sc,
                                                                   __m256 *lo, __m256 *hi)
{
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7),
                                       _mm256_set1_epi16((short)0xbfff));
    *lo = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), sc);
    *hi = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), sc);
}

static inline __attribute__((always_inline)) __m256 adam_q8_dec_u(const uint8_t *q, __m256 sc,
                                                                  const int low)
{
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
    __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(c, _mm256_set1_epi32((127 - FO_Q8U_E) << 3)), 20));
    if (low)
        v = _mm256_blendv_ps(
            v, _mm256_fmsub_ps(v, _mm256_set1_ps(2.0f),
                               _mm256_set1_ps(fo_bits_f32((uint32_t)(127 + 1 - FO_Q8U_E) << 23))),
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), c)));
    return _mm256_mul_ps(v, sc);
}

static inline __attribute__((always_inline)) __m256i adam_q8_code(__m256 y, const int e,
                                                                 const int low)
{
    const __m256i c = _mm256_srli_epi32(
        _mm256_sub_epi32(_mm256_castps_si256(y),
                         _mm256_set1_epi32((int32_t)((uint32_t)(127 - e) << 23) - 0x80000)),
        20);
    if (!low) return c;
    const __m256 sub_max = _mm256_set1_ps(fo_bits_f32((uint32_t)(127 + 1 - e) << 23));
    const __m256 sub_mul = _mm256_set1_ps(fo_bits_f32((uint32_t)(127 + e + 2) << 23));
    const __m256i c_sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_fmadd_ps(y, sub_mul, _mm256_set1_ps(0x1p23f))),
        _mm256_set1_epi32(0x4b000000));
    return _mm256_blendv_epi8(c, c_sub, _mm256_castps_si256(_mm256_cmp_ps(y, sub_max,
                                                                          _CMP_LT_OQ)));
}

/* 32 codes from four vectors: the packs interleave them by 4 within each 128-bit lane. */
static inline __attribute__((always_inline)) void adam_q8_put32(uint8_t *q, __m256i c0,
                                                                __m256i c1, __m256i c2,
                                                                __m256i c3)
{
    const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1),
                                          _mm256_packus_epi32(c2, c3));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(
        b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

static inline __attribute__((always_inline)) __m256i adam_q8_code_s(const float *x, __m256 inv,
                                                                   const int low)
{
    const __m256i u = _mm256_loadu_si256((const __m256i *)x);
    const __m256 y = _mm256_mul_ps(
        _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff))), inv);
    return _mm256_or_si256(adam_q8_code(y, FO_Q8S_E, low),
                           _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80)));
}

static inline __attribute__((always_inline)) __m256i adam_q8_code_u(const float *x, __m256 inv,
                                                                   const int low)
{
    return adam_q8_code(_mm256_mul_ps(_mm256_loadu_ps(x), inv), FO_Q8U_E, low);
}

static inline __attribute__((always_inline)) void
adam_q8_encode_as(const float *mb, const float *vb, uint8_t *qm, uint8_t *qv, float im,
                  float iv, const int mlow, const int vlow)
{
    const __m256 imv = _mm256_set1_ps(im), ivv = _mm256_set1_ps(iv);
    for (int j = 0; j < FO_Q8_BLOCK; j += 32) {
        adam_q8_put32(qm + j, adam_q8_code_s(mb + j, imv, mlow),
                      adam_q8_code_s(mb + j + 8, imv, mlow),
                      adam_q8_code_s(mb + j + 16, imv, mlow),
                      adam_q8_code_s(mb + j + 24, imv, mlow));
        adam_q8_put32(qv + j, adam_q8_code_u(vb + j, ivv, vlow),
                      adam_q8_code_u(vb + j + 8, ivv, vlow),
                      adam_q8_code_u(vb + j + 16, ivv, vlow),
                      adam_q8_code_u(vb + j + 24, ivv, vlow));
    }
}

static inline __attribute__((always_inline)) int adam_q8_codes_scan(const uint8_t *qm,
                                                                   const uint8_t *qv)
{
    const __m256i sbit = _mm256_set1_epi8((char)0x80);
    __m256i mx = _mm256_setzero_si256(), mn = _mm256_set1_epi8((char)0xff);
    for (int j = 0; j < FO_Q8_BLOCK; j += 32) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(qv + j));
        mx = _mm256_max_epu8(mx, _mm256_max_epu8(
            _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(qm + j)), sbit), b));
        mn = _mm256_min_epu8(mn, b);
    }
    /* some byte of mx at least 0xfe; some byte of mn at most 7 */
    if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(mx, _mm256_set1_epi8((char)0xfe)),
                                               mx)))
        return 0;
    return _mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_min_epu8(mn, _mm256_set1_epi8(7)), mn))
           ? 2 : 1;
}

static inline __attribute__((always_inline)) uint32_t adam_q8_hmax(__m256i x)
{
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
    return (uint32_t)_mm_cvtsi128_si32(m);
}

static inline __attribute__((always_inline)) uint32_t adam_q8_hmin(__m256i x)
{
    __m128i m = _mm_min_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0xb1));
    return (uint32_t)_mm_cvtsi128_si32(m);
}

static inline __attribute__((always_inline)) void
adam_q8_update(const adam_q8_k *K, float *restrict p, const float *restrict g,
               const uint8_t *qm, const uint8_t *qv, float sm_s, float sv_s,
               float *restrict mb, float *restrict vb, uint32_t r[4], const int l2,
               const int dec, const int small, const int maximize, const int vlow)
{
    const __m256 sm = _mm256_set1_ps(sm_s), sv = _mm256_set1_ps(sv_s);
    const __m256i absm = _mm256_set1_epi32(0x7fffffff);
    __m256i mxm = _mm256_setzero_si256(), mnm = _mm256_set1_epi32(-1);
    __m256i mxv = _mm256_setzero_si256(), mnv = _mm256_set1_epi32(-1);
    for (int j = 0; j < FO_Q8_BLOCK; j += 16) {
        adam_q8_prefetch(g + j, FO_Q8_AHEAD, sizeof *g);
        adam_q8_prefetch(p + j, FO_Q8_AHEAD, sizeof *p);
        if ((j & 63) == 0) {
            adam_q8_prefetch(qm + j, FO_Q8_AHEAD, sizeof *qm);
            adam_q8_prefetch(qv + j, FO_Q8_AHEAD, sizeof *qv);
        }
        __m256 mdec[2];
        adam_q8_dec_s16(qm + j, sm, &mdec[0], &mdec[1]);
        for (int half = 0; half < 2; half++) {
            const int i = j + 8 * half;
            __m256 gi = _mm256_loadu_ps(g + i);
            if (maximize)
                gi = _mm256_xor_ps(gi, _mm256_set1_ps(-0.0f));
            __m256 pi = _mm256_loadu_ps(p + i);
            if (dec) pi = _mm256_mul_ps(pi, K->decay);
            if (l2) gi = _mm256_fmadd_ps(pi, K->wd, gi);
            const __m256 m0 = mdec[half];
            const __m256 v0 = adam_q8_dec_u(qv + i, sv, vlow);
            const __m256 d = _mm256_sub_ps(gi, m0);
            const __m256 mi = small ? _mm256_fmadd_ps(K->w, d, m0)
                                    : _mm256_fmadd_ps(K->wm1, d, gi);
            const __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(K->omb2, gi), gi,
                                              _mm256_mul_ps(v0, K->beta2));
            _mm256_store_ps(mb + i, mi);
            _mm256_store_ps(vb + i, vi);
            const __m256i am = _mm256_and_si256(_mm256_castps_si256(mi), absm);
            mxm = _mm256_max_epu32(mxm, am);
            mnm = _mm256_min_epu32(mnm, am);
            mxv = _mm256_max_epu32(mxv, _mm256_castps_si256(vi));
            mnv = _mm256_min_epu32(mnv, _mm256_castps_si256(vi));
            const __m256 s = _mm256_sqrt_ps(vi);
            const __m256 q0 = _mm256_fmadd_ps(s, K->rh, _mm256_mul_ps(s, K->rl));
            const __m256 q1 = _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, K->bc2_sqrt, s), K->rh, q0);
            const __m256 den = _mm256_add_ps(_mm256_max_ps(q1, s), K->eps);
            _mm256_storeu_ps(p + i, _mm256_add_ps(
                pi, _mm256_div_ps(_mm256_mul_ps(K->neg_step, mi), den)));
        }
    }
    r[0] = adam_q8_hmax(mxm);
    r[1] = adam_q8_hmax(mxv);
    r[2] = adam_q8_hmin(mnm);
    r[3] = adam_q8_hmin(mnv);
}
#define FO_Q8_SET1 _mm256_set1_ps
#endif

#ifdef FO_ADAM_Q8_FAST
/* The new state of a clean block (mb, vb: FO_Q8_BLOCK values) encoded with scales sm and sv;
 * nm and nv are the smallest |m| and v. */
static void adam_q8_encode(const float *mb, const float *vb, uint8_t *qm, uint8_t *qv,
                           float sm, float sv, float nm, float nv)
{
    const float im = sm > 0.0f ? 1.0f / sm : 0.0f, iv = sv > 0.0f ? 1.0f / sv : 0.0f;
    const int mlow = !(nm * im >= fo_bits_f32((uint32_t)(127 + 1 - FO_Q8S_E) << 23));
    const int vlow = !(nv * iv >= fo_bits_f32((uint32_t)(127 + 1 - FO_Q8U_E) << 23));
    if (mlow && vlow) adam_q8_encode_as(mb, vb, qm, qv, im, iv, 1, 1);
    else if (mlow) adam_q8_encode_as(mb, vb, qm, qv, im, iv, 1, 0);
    else if (vlow) adam_q8_encode_as(mb, vb, qm, qv, im, iv, 0, 1);
    else adam_q8_encode_as(mb, vb, qm, qv, im, iv, 0, 0);
}

/* Blocks [lo, hi) of FO_Q8_BLOCK elements each; returns where it stopped: hi, or the first
 * block with a non-finite code, which it leaves to the general loop. A block whose new state
 * is not clean is encoded by fo_q8_store. */
static inline __attribute__((always_inline)) int64_t
adam_q8_blocks(const fo_adam_hyper *h, const fo_tensor *t, int64_t lo, int64_t hi,
               const int l2, const int dec, const int small, const int maximize)
{
    float *p = (float *)t->param;
    const float *g = (const float *)t->grad;
    uint8_t *qm = (uint8_t *)t->state[0], *qv = (uint8_t *)t->state[1];
    const float bc2_sqrt = (float)t->scalar[1];
    float rh, rl;
    FO_RECIP2(bc2_sqrt, rh, rl);
    const float w = FO_FN(adam_w)(h);
    const adam_q8_k K = {
        FO_Q8_SET1((float)(-t->scalar[0])), FO_Q8_SET1(bc2_sqrt), FO_Q8_SET1(rh),
        FO_Q8_SET1(rl), FO_Q8_SET1(w), FO_Q8_SET1(w - 1.0f),
        FO_Q8_SET1((float)h->beta2), FO_Q8_SET1(FO_FN(adam_one_m_beta2)(h)),
        FO_Q8_SET1((float)h->eps), FO_Q8_SET1((float)h->weight_decay),
        FO_Q8_SET1((float)fo_lr_decay(h->lr, h->weight_decay, h->lr_tensor))};
    __attribute__((aligned(64))) float mb[FO_Q8_BLOCK], vb[FO_Q8_BLOCK];
    for (; lo < hi; lo += FO_Q8_BLOCK) {
        const int64_t k = lo / FO_Q8_BLOCK;
        const int scan = adam_q8_codes_scan(qm + lo, qv + lo);
        if (scan == 0) break;
        uint32_t r[4];
        if (scan == 2)
            adam_q8_update(&K, p + lo, g + lo, qm + lo, qv + lo, t->scale[0][k], t->scale[1][k],
                           mb, vb, r, l2, dec, small, maximize, 1);
        else
            adam_q8_update(&K, p + lo, g + lo, qm + lo, qv + lo, t->scale[0][k], t->scale[1][k],
                           mb, vb, r, l2, dec, small, maximize, 0);
        if (r[0] < 0x7f800000u && r[1] < 0x7f800000u) {
            const float scm = r[0] < 0x00800000u ? 0.0f : fo_bits_f32(r[0]);
            const float scv = r[1] < 0x00800000u ? 0.0f : fo_bits_f32(r[1]);
            t->scale[0][k] = scm;
            t->scale[1][k] = scv;
            adam_q8_encode(mb, vb, qm + lo, qv + lo, scm, scv, fo_bits_f32(r[2]),
                           fo_bits_f32(r[3]));
        } else {
            t->scale[0][k] = fo_q8_store(FO_FMT_Q8S, mb, qm + lo, FO_Q8_BLOCK);
            t->scale[1][k] = fo_q8_store(FO_FMT_Q8U, vb, qv + lo, FO_Q8_BLOCK);
        }
    }
    return lo;
}

/* adam_q8_blocks with the flags as constants, as adam_cases does; lo when it does not apply */
static int64_t adam_q8_fast(const fo_adam_hyper *h, const fo_tensor *t, int64_t lo, int64_t hi)
{
    if (!FO_DIV_BY_CONST_OK((float)t->scalar[1])) return lo;
    const int has_wd = h->weight_decay != 0.0;
    const int l2 = has_wd && !FO_FLAG(h->decoupled), dec = has_wd && FO_FLAG(h->decoupled);
    const int small = fabs((double)FO_FN(adam_w)(h)) < 0.5;
    const int mx = FO_FLAG(h->maximize);
#define FO_CASE(L, D, S) \
    if (l2 == L && dec == D && small == S) \
        return mx ? adam_q8_blocks(h, t, lo, hi, L, D, S, 1) \
                  : adam_q8_blocks(h, t, lo, hi, L, D, S, 0);
    FO_CASE(0, 0, 1) FO_CASE(1, 0, 1) FO_CASE(0, 1, 1)
    FO_CASE(0, 0, 0) FO_CASE(1, 0, 0) FO_CASE(0, 1, 0)
#undef FO_CASE
    return lo;
}
#endif

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
#ifdef FO_ADAM_Q8_FAST
    const int64_t full = begin + (end - begin) / FO_Q8_BLOCK * FO_Q8_BLOCK;
#endif
    for (int64_t lo = begin; lo < end; lo += FO_Q8_BLOCK) {
#ifdef FO_ADAM_Q8_FAST
        if (lo < full && (lo = adam_q8_fast(h, t, lo, full)) >= end) break;
#endif
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
