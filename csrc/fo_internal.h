/*
 * fo_internal.h - what the kernel files share: symbol naming, the float/double expansion,
 * and element operations whose rounding must match ATen's CPU kernels.
 *
 * Every kernel file is compiled once per ISA level with FO_ISA set to the level's name
 * (baseline, avx2, avx512). It holds one body written in terms of FO_T (the element type),
 * FO_FMA and FO_SQRT, and includes fo_expand.h, which includes the body back twice: once for
 * float (symbols fo_<name>_f32_<isa>) and once for double (fo_<name>_f64_<isa>).
 *
 * The kernels are compiled with -ffp-contract=off: the compiler never fuses a multiply and an
 * add by itself, and FO_FMA is written exactly where ATen rounds once (its vectorised add
 * with alpha, addcmul and lerp), so every ISA level gives the same bits.
 */
#ifndef FO_INTERNAL_H
#define FO_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "fastopt.h"

#ifndef FO_ISA
#define FO_ISA baseline
#endif

/* ---- 16-bit storage ---------------------------------------------------------------------
 * Conversions between float and the 16-bit formats, in portable C (every ISA level gives the
 * same bits): widening is exact; narrowing rounds to nearest, ties to even, as torch's
 * c10::Half and c10::BFloat16 do, NaN included (binary16: sign | 0x7e00; bfloat16: 0x7fc0). */
static inline float fo_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t fo_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float fo_bf16_to_f32(uint16_t h) { return fo_bits_f32((uint32_t)h << 16); }

static inline uint16_t fo_f32_to_bf16(float f)
{
    uint32_t u = fo_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float fo_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return fo_bits_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0) return fo_bits_f32(sign | fo_f32_bits((float)m * 0x1p-24f)); /* exact */
    return fo_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

static inline uint16_t fo_f32_to_f16(float f)
{
    uint32_t u = fo_f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520: to infinity */
    if (a < 0x38800000u) {
        /* below 2^-14: a subnormal half, a multiple of 2^-24, which is the spacing of the
         * floats in [0.5, 1): the float sum rounds |f| to it, ties to even */
        uint32_t s = fo_f32_bits(fo_bits_f32(a) + 0.5f);
        return (uint16_t)(sign | (s - 0x3f000000u));
    }
    a = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u; /* rebias 127 -> 15, round 13 bits */
    return (uint16_t)(sign | (a >> 13));
}

/* ---- stochastic rounding -----------------------------------------------------------------
 * A counter-based generator: 32 random bits for element `i` of a tensor from the tensor's key
 * for this step (fo_tensor.rkey, from its seed and the group's key: fo_round_key), by two rounds
 * of an integer mixing function (xor-shift and multiply, which vectorise). The bits depend on
 * (key, i) only, so every thread count, chunking and ISA level draws the same ones. */
static inline uint32_t fo_mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static inline uint64_t fo_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

static inline uint32_t fo_random_bits(uint64_t key, int64_t i)
{
    uint32_t hi = (uint32_t)((uint64_t)i >> 32) * 0x85ebca6bu;
    return fo_mix32(fo_mix32((uint32_t)i ^ (uint32_t)key ^ hi) ^ (uint32_t)(key >> 32));
}

/* The key of a tensor for one step: its seed (its position) mixed with the group's key for
 * the step (the rounding seed and the step count, mixed by the caller). */
static inline uint64_t fo_round_key(uint64_t seed, uint64_t group_key)
{
    return fo_mix64(fo_mix64(seed + 0x632be59bd9b4e019ull) ^ group_key);
}

/* bfloat16 of f rounded stochastically: up with probability (f - down) / (up - down), by
 * adding 16 random bits below the kept half and truncating; NaN stays NaN. */
static inline uint16_t fo_f32_to_bf16_sr(float f, uint32_t r)
{
    uint32_t u = fo_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + (r & 0xffffu)) >> 16);
}

/* ---- 8-bit block-wise state --------------------------------------------------------------
 * A block of FO_Q8_BLOCK state values is stored as one byte per element and one float32
 * scale: the largest magnitude among its finite elements (0 when that is below 2^-126, and
 * then every finite element is stored as 0). Each value is divided by the scale, and the
 * magnitude y in [0, 1] gets a code c of a small floating-point format with 3 mantissa bits,
 * rounded to nearest:
 *   c = 0: 0;  c in 1..7: c/8 * 2^(1-E);  c = 8e + f (e >= 1): (1 + f/8) * 2^(e-E)
 * A y halfway between two codes gets the even one below 2^(1-E) (the fma's rounding, exact)
 * and the larger one above it (the float's bits plus half a code's step, shifted: ties to
 * even there would take three more integer operations per element, which made Adam's 8-bit
 * loop 6 to 10% slower in cache)
 * up to c = 8E, which is 1.0: the block's largest element is exact, the others carry a
 * relative error of at most 1/16 (2^(-3-E) of the scale, absolute, in the bottom range).
 * Signed state (first moments, momentum): E = 15, byte = sign << 7 | c; unsigned state
 * (second moments and other non-negative accumulators): E = 31, byte = c, twice the range,
 * which is the range of the squares of the signed one. Like bitsandbytes' dynamic code, the
 * code is logarithmic, so small values keep their relative precision; unlike its table, it is
 * computed from the float's bits, so encoding and decoding vectorise without lookups or
 * searches. Non-finite values keep codes of their own: signed 0x7e | sign is +-inf, 0x7f and
 * 0xff NaN; unsigned 0xfe is +inf, 0xff NaN (a negative value in unsigned state, which the
 * kernels never produce, is stored as 0). */
#define FO_Q8S_E 15
#define FO_Q8U_E 31

static inline float fo_q8_scale_scalar(int fmt, const float *restrict x, int64_t n)
{
    /* the largest bits, as int32, among the finite non-negative floats (|x| for the signed
     * code): a negative value's bits are a negative int32, NaN's and infinity's are at least
     * 0x7f800000 (in int32, as the vectoriser handles the max) */
    const uint32_t mask = fmt == FO_FMT_Q8S ? 0x7fffffffu : 0xffffffffu;
    int32_t mx = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t a = (int32_t)(fo_f32_bits(x[i]) & mask);
        a = a < 0x7f800000 ? a : 0;
        mx = a > mx ? a : mx;
    }
    return mx < 0x00800000 ? 0.0f : fo_bits_f32((uint32_t)mx);
}

static inline void fo_q8_encode_scalar(int fmt, const float *restrict x, uint8_t *restrict q,
                                       int64_t n, float scale)
{
    const int e = fmt == FO_FMT_Q8S ? FO_Q8S_E : FO_Q8U_E;
    const uint32_t cmax = (uint32_t)e << 3;
    const uint32_t rebias = (uint32_t)(127 - e) << 23;
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    const float sub_mul = fo_bits_f32((uint32_t)(127 + e + 2) << 23); /* 2^(E+2) */
    const float sub_max = fo_bits_f32((uint32_t)(127 + 1 - e) << 23); /* 2^(1-E) */
    const uint32_t inf_code = fmt == FO_FMT_Q8S ? 0x7eu : 0xfeu;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = fo_f32_bits(x[i]);
        uint32_t sign = fmt == FO_FMT_Q8S ? (u >> 24) & 0x80u : 0u;
        uint32_t a = u & 0x7fffffffu;
        float y = fo_bits_f32(a) * inv;
        uint32_t yb = fo_f32_bits(y);
        uint32_t c_sub = fo_f32_bits(y * sub_mul + 0x1p23f) - 0x4b000000u;
        uint32_t c_norm = (yb - rebias + 0x80000u) >> 20;
        uint32_t c = y < sub_max ? c_sub : c_norm;
        c = c < cmax ? c : cmax;
        c = a == 0x7f800000u ? inf_code : c;
        c = fmt == FO_FMT_Q8U && (int32_t)u < 0 ? 0u : c;
        c = a > 0x7f800000u ? 0x7fu | (fmt == FO_FMT_Q8U ? 0x80u : 0u) : c | sign;
        q[i] = (uint8_t)c;
    }
}

/* The value of one code b of format fmt in a block of scale `scale`, for a code known not
 * to be one of the non-finite codes. */
static inline __attribute__((always_inline)) float fo_q8_decode1_finite(int fmt, uint32_t b,
                                                                        float scale)
{
    const int e = fmt == FO_FMT_Q8S ? FO_Q8S_E : FO_Q8U_E;
    const uint32_t rebias = (uint32_t)(127 - e) << 3;
    const float sub_step = fo_bits_f32((uint32_t)(127 - 2 - e) << 23); /* 2^(-2-E) */
    uint32_t c = b & (fmt == FO_FMT_Q8S ? 0x7fu : 0xffu);
    uint32_t sign = fmt == FO_FMT_Q8S ? (b & 0x80u) << 24 : 0u;
    float v = c < 8u ? (float)(int32_t)c * sub_step : fo_bits_f32((c + rebias) << 20);
    return fo_bits_f32(fo_f32_bits(v * scale) | sign);
}

/* The value of any code b. */
static inline __attribute__((always_inline)) float fo_q8_decode1(int fmt, uint32_t b,
                                                                 float scale)
{
    const uint32_t mag = fmt == FO_FMT_Q8S ? 0x7fu : 0xffu;
    const uint32_t c = b & mag;
    const uint32_t sign = fmt == FO_FMT_Q8S ? (b & 0x80u) << 24 : 0u;
    uint32_t r = fo_f32_bits(fo_q8_decode1_finite(fmt, b, scale));
    r = c == mag - 1 ? 0x7f800000u | sign : r; /* +-inf */
    r = c == mag ? 0x7fc00000u : r;             /* NaN */
    return fo_bits_f32(r);
}

/* Whether none of the n codes q[0..n) is a non-finite code (+-inf or NaN). */
static inline int fo_q8_codes_finite(int fmt, const uint8_t *restrict q, int64_t n)
{
    const uint8_t mask = fmt == FO_FMT_Q8S ? 0x7f : 0xff; /* the non-finite: mask - 1, mask */
    uint8_t mx = 0;
    for (int64_t i = 0; i < n; i++) {
        uint8_t c = q[i] & mask;
        mx = c > mx ? c : mx;
    }
    return mx < mask - 1;
}

static inline void fo_q8_decode_scalar(int fmt, const uint8_t *restrict q, float scale,
                                       float *restrict x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) x[i] = fo_q8_decode1(fmt, q[i], scale);
}

/* The largest of `best` and the bits of x[0..n) as unsigned ints (of |x| for the signed
 * code): at least 0x7f800000 when one is NaN, infinite or (unsigned code) negative. */
static inline uint32_t fo_q8_max_bits(int fmt, const float *restrict x, int64_t n,
                                      uint32_t best)
{
    const uint32_t m = fmt == FO_FMT_Q8S ? 0x7fffffffu : 0xffffffffu;
    for (int64_t i = 0; i < n; i++) {
        uint32_t a = fo_f32_bits(x[i]) & m;
        best = a > best ? a : best;
    }
    return best;
}

/* The same three loops with AVX2 (the avx2 and avx512 levels), 8 elements at a time and the
 * scalar loops for the tail: the same integer operations and float32 multiplies, so the same
 * bits. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

static inline float fo_q8_scale(int fmt, const float *restrict x, int64_t n)
{
    const __m512i mask = _mm512_set1_epi32(fmt == FO_FMT_Q8S ? 0x7fffffff : -1);
    const __m512i inf = _mm512_set1_epi32(0x7f800000);
    __m512i mx = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i a = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), mask);
        mx = _mm512_mask_max_epi32(mx, _mm512_cmplt_epi32_mask(a, inf), mx, a);
    }
    int32_t best = _mm512_reduce_max_epi32(mx);
    int32_t t = (int32_t)fo_f32_bits(fo_q8_scale_scalar(fmt, x + i, n - i));
    best = t > best ? t : best;
    return best < 0x00800000 ? 0.0f : fo_bits_f32((uint32_t)best);
}

/* `clean`: x is a block without NaN, infinities or (unsigned code) negative values, which
 * needs neither the clamp nor the special codes (see fo_q8_scale_clean). y * 2^(E+2) + 2^23
 * is one fma, exact as the two operations are (y * 2^(E+2) is exact). */
static inline __attribute__((always_inline)) void
fo_q8_encode_block(int fmt, const float *restrict x, uint8_t *restrict q, int64_t n,
                   float scale, const int clean)
{
    const int e = fmt == FO_FMT_Q8S ? FO_Q8S_E : FO_Q8U_E;
    const __m512 inv = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    const __m512 sub_mul = _mm512_set1_ps(fo_bits_f32((uint32_t)(127 + e + 2) << 23));
    const __m512 sub_max = _mm512_set1_ps(fo_bits_f32((uint32_t)(127 + 1 - e) << 23));
    const __m512 magic = _mm512_set1_ps(0x1p23f);
    const __m512i magic_bits = _mm512_set1_epi32(0x4b000000);
    const __m512i rebias = _mm512_set1_epi32((int32_t)((uint32_t)(127 - e) << 23) - 0x80000);
    const __m512i cmax = _mm512_set1_epi32(e << 3);
    const __m512i absm = _mm512_set1_epi32(0x7fffffff);
    const __m512i inf = _mm512_set1_epi32(0x7f800000);
    const __m512i inf_code = _mm512_set1_epi32(fmt == FO_FMT_Q8S ? 0x7e : 0xfe);
    const __m512i nan_code = _mm512_set1_epi32(fmt == FO_FMT_Q8S ? 0x7f : 0xff);
    const __m512i sbit = _mm512_set1_epi32(0x80);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_loadu_si512((const void *)(x + i));
        __m512i a = _mm512_and_si512(u, absm);
        __m512 y = _mm512_mul_ps(_mm512_castsi512_ps(a), inv);
        __m512i yb = _mm512_castps_si512(y);
        __m512i c = _mm512_srli_epi32(_mm512_sub_epi32(yb, rebias), 20);
        c = _mm512_mask_sub_epi32(c, _mm512_cmp_ps_mask(y, sub_max, _CMP_LT_OQ),
                                  _mm512_castps_si512(_mm512_fmadd_ps(y, sub_mul, magic)),
                                  magic_bits);
        if (!clean) {
            c = _mm512_min_epu32(c, cmax);
            c = _mm512_mask_mov_epi32(c, _mm512_cmpeq_epi32_mask(a, inf), inf_code);
        }
        if (fmt == FO_FMT_Q8S) /* c | ((u >> 24) & 0x80) */
            c = _mm512_ternarylogic_epi32(c, _mm512_srli_epi32(u, 24), sbit, 0xf8);
        else if (!clean)
            c = _mm512_maskz_mov_epi32(_mm512_cmpge_epi32_mask(u, _mm512_setzero_si512()), c);
        if (!clean)
            c = _mm512_mask_mov_epi32(c, _mm512_cmpgt_epi32_mask(a, inf), nan_code);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(c));
    }
    fo_q8_encode_scalar(fmt, x + i, q + i, n - i, scale);
}

static inline void fo_q8_decode_block(int fmt, const uint8_t *restrict q, float scale,
                                      float *restrict x, int64_t n)
{
    const int e = fmt == FO_FMT_Q8S ? FO_Q8S_E : FO_Q8U_E;
    const __m512i mag = _mm512_set1_epi32(fmt == FO_FMT_Q8S ? 0x7f : 0xff);
    const __m512i rebias = _mm512_set1_epi32((127 - e) << 3);
    const __m512 sub_step = _mm512_set1_ps(fo_bits_f32((uint32_t)(127 - 2 - e) << 23));
    const __m512 sc = _mm512_set1_ps(scale);
    const __m512i eight = _mm512_set1_epi32(8);
    const __m512i inf_code = _mm512_set1_epi32(fmt == FO_FMT_Q8S ? 0x7e : 0xfe);
    const __m512i inf = _mm512_set1_epi32(0x7f800000);
    const __m512i nan = _mm512_set1_epi32(0x7fc00000);
    const __m512i sbit = _mm512_set1_epi32(0x80);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i)));
        __m512i c = _mm512_and_si512(b, mag);
        __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(c, rebias), 20));
        v = _mm512_mask_mul_ps(v, _mm512_cmplt_epi32_mask(c, eight), _mm512_cvtepi32_ps(c),
                               sub_step);
        __m512i r = _mm512_castps_si512(_mm512_mul_ps(v, sc));
        r = _mm512_mask_mov_epi32(r, _mm512_cmpeq_epi32_mask(c, inf_code), inf);
        if (fmt == FO_FMT_Q8S)
            r = _mm512_or_si512(r, _mm512_slli_epi32(_mm512_and_si512(b, sbit), 24));
        r = _mm512_mask_mov_epi32(r, _mm512_cmpeq_epi32_mask(c, mag), nan);
        _mm512_storeu_si512((void *)(x + i), r);
    }
    fo_q8_decode_scalar(fmt, q + i, scale, x + i, n - i);
}

/* A block without NaN, infinities or (in unsigned state) negative values, which is every
 * block the kernels write from finite state: its scale is the largest bits, and the encoding
 * needs neither the clamp nor the special codes. *clean says whether x is such a block (its
 * scale is then returned; else fo_q8_scale's). */
static inline float fo_q8_scale_clean(int fmt, const float *restrict x, int64_t n, int *clean)
{
    const __m512i mask = _mm512_set1_epi32(fmt == FO_FMT_Q8S ? 0x7fffffff : -1);
    __m512i mx = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)),
                                                   mask));
    uint32_t best = (uint32_t)_mm512_reduce_max_epu32(mx);
    best = fo_q8_max_bits(fmt, x + i, n - i, best);
    *clean = best < 0x7f800000u;
    if (!*clean) return fo_q8_scale(fmt, x, n);
    return best < 0x00800000u ? 0.0f : fo_bits_f32(best);
}

#elif defined(__AVX2__)
#include <immintrin.h>

static inline float fo_q8_scale(int fmt, const float *restrict x, int64_t n)
{
    const __m256i mask = _mm256_set1_epi32(fmt == FO_FMT_Q8S ? 0x7fffffff : -1);
    const __m256i inf = _mm256_set1_epi32(0x7f800000);
    __m256i mx = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), mask);
        a = _mm256_andnot_si256(_mm256_cmpgt_epi32(a, _mm256_sub_epi32(inf, _mm256_set1_epi32(1))),
                                a);
        mx = _mm256_max_epi32(mx, a);
    }
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
    int32_t best = _mm_cvtsi128_si32(m);
    float tail = fo_q8_scale_scalar(fmt, x + i, n - i);
    int32_t t = (int32_t)fo_f32_bits(tail);
    best = t > best ? t : best;
    return best < 0x00800000 ? 0.0f : fo_bits_f32((uint32_t)best);
}

static inline __attribute__((always_inline)) void
fo_q8_encode_block(int fmt, const float *restrict x, uint8_t *restrict q, int64_t n,
                   float scale, const int clean)
{
    const int e = fmt == FO_FMT_Q8S ? FO_Q8S_E : FO_Q8U_E;
    const __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    const __m256 sub_mul = _mm256_set1_ps(fo_bits_f32((uint32_t)(127 + e + 2) << 23));
    const __m256 sub_max = _mm256_set1_ps(fo_bits_f32((uint32_t)(127 + 1 - e) << 23));
    const __m256 magic = _mm256_set1_ps(0x1p23f);
    const __m256i magic_bits = _mm256_set1_epi32(0x4b000000);
    const __m256i rebias = _mm256_set1_epi32((int32_t)((uint32_t)(127 - e) << 23) - 0x80000);
    const __m256i cmax = _mm256_set1_epi32(e << 3);
    const __m256i absm = _mm256_set1_epi32(0x7fffffff);
    const __m256i inf = _mm256_set1_epi32(0x7f800000);
    const __m256i inf_code = _mm256_set1_epi32(fmt == FO_FMT_Q8S ? 0x7e : 0xfe);
    const __m256i nan_code = _mm256_set1_epi32(fmt == FO_FMT_Q8S ? 0x7f : 0xff);
    const __m256i sbit = _mm256_set1_epi32(0x80);
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                          -1, -1, -1, -1);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(x + i));
        __m256i a = _mm256_and_si256(u, absm);
        __m256 y = _mm256_mul_ps(_mm256_castsi256_ps(a), inv);
        __m256i yb = _mm256_castps_si256(y);
        __m256i c_sub = _mm256_sub_epi32(
            _mm256_castps_si256(_mm256_fmadd_ps(y, sub_mul, magic)), magic_bits);
        __m256i c_norm = _mm256_srli_epi32(_mm256_sub_epi32(yb, rebias), 20);
        __m256i c = _mm256_blendv_epi8(c_norm, c_sub,
                                       _mm256_castps_si256(_mm256_cmp_ps(y, sub_max, _CMP_LT_OQ)));
        if (!clean) {
            c = _mm256_min_epu32(c, cmax);
            c = _mm256_blendv_epi8(c, inf_code, _mm256_cmpeq_epi32(a, inf));
        }
        if (fmt == FO_FMT_Q8S)
            c = _mm256_or_si256(c, _mm256_and_si256(_mm256_srli_epi32(u, 24), sbit));
        else if (!clean)
            c = _mm256_andnot_si256(_mm256_srai_epi32(u, 31), c);
        if (!clean)
            c = _mm256_blendv_epi8(c, nan_code, _mm256_cmpgt_epi32(a, inf));
        __m256i t = _mm256_shuffle_epi8(c, pick);
        __m128i lo = _mm256_castsi256_si128(t), hi = _mm256_extracti128_si256(t, 1);
        _mm_storel_epi64((__m128i *)(q + i), _mm_unpacklo_epi32(lo, hi));
    }
    fo_q8_encode_scalar(fmt, x + i, q + i, n - i, scale);
}

static inline void fo_q8_decode_block(int fmt, const uint8_t *restrict q, float scale,
                                      float *restrict x, int64_t n)
{
    const int e = fmt == FO_FMT_Q8S ? FO_Q8S_E : FO_Q8U_E;
    const __m256i mag = _mm256_set1_epi32(fmt == FO_FMT_Q8S ? 0x7f : 0xff);
    const __m256i rebias = _mm256_set1_epi32((127 - e) << 3);
    const __m256 sub_step = _mm256_set1_ps(fo_bits_f32((uint32_t)(127 - 2 - e) << 23));
    const __m256 sc = _mm256_set1_ps(scale);
    const __m256i eight = _mm256_set1_epi32(8);
    const __m256i inf_code = _mm256_set1_epi32(fmt == FO_FMT_Q8S ? 0x7e : 0xfe);
    const __m256i inf = _mm256_set1_epi32(0x7f800000);
    const __m256i nan = _mm256_set1_epi32(0x7fc00000);
    const __m256i sbit = _mm256_set1_epi32(0x80);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
        __m256i c = _mm256_and_si256(b, mag);
        __m256 normal = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(c, rebias), 20));
        __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(c), sub_step);
        __m256 v = _mm256_blendv_ps(normal, sub, _mm256_castsi256_ps(_mm256_cmpgt_epi32(eight, c)));
        __m256i r = _mm256_castps_si256(_mm256_mul_ps(v, sc));
        r = _mm256_blendv_epi8(r, inf, _mm256_cmpeq_epi32(c, inf_code));
        if (fmt == FO_FMT_Q8S)
            r = _mm256_or_si256(r, _mm256_slli_epi32(_mm256_and_si256(b, sbit), 24));
        r = _mm256_blendv_epi8(r, nan, _mm256_cmpeq_epi32(c, mag));
        _mm256_storeu_si256((__m256i *)(x + i), r);
    }
    fo_q8_decode_scalar(fmt, q + i, scale, x + i, n - i);
}

/* The clean block (see the AVX-512 version above), 8 elements at a time. */
static inline float fo_q8_scale_clean(int fmt, const float *restrict x, int64_t n, int *clean)
{
    const __m256i mask = _mm256_set1_epi32(fmt == FO_FMT_Q8S ? 0x7fffffff : -1);
    __m256i mx = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)),
                                                   mask));
    __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
    m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0x4e));
    m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0xb1));
    uint32_t best = (uint32_t)_mm_cvtsi128_si32(m4);
    best = fo_q8_max_bits(fmt, x + i, n - i, best);
    *clean = best < 0x7f800000u;
    if (!*clean) return fo_q8_scale(fmt, x, n);
    return best < 0x00800000u ? 0.0f : fo_bits_f32(best);
}
#else
#define fo_q8_scale fo_q8_scale_scalar
#define fo_q8_encode_block(fmt, x, q, n, scale, clean) fo_q8_encode_scalar(fmt, x, q, n, scale)
#define fo_q8_decode_block fo_q8_decode_scalar
static inline float fo_q8_scale_clean(int fmt, const float *restrict x, int64_t n, int *clean)
{
    *clean = 0;
    return fo_q8_scale_scalar(fmt, x, n);
}
#endif

/* A block of n <= FO_Q8_BLOCK float32 values encoded into q: returns its scale. */
static inline float fo_q8_store(int fmt, const float *restrict x, uint8_t *restrict q,
                                int64_t n)
{
    int clean;
    float s = fo_q8_scale_clean(fmt, x, n, &clean);
    if (clean)
        fo_q8_encode_block(fmt, x, q, n, s, 1);
    else
        fo_q8_encode_block(fmt, x, q, n, s, 0);
    return s;
}

/* ---- stored formats: loading into float32 and storing back ------------------------------ */
static inline void fo_fmt_load(float *restrict dst, const void *src, int64_t lo, int64_t n,
                               int fmt, const float *scale)
{
    if (fmt == FO_FMT_BF16) {
        const uint16_t *s = (const uint16_t *)src + lo;
        for (int64_t i = 0; i < n; i++) dst[i] = fo_bf16_to_f32(s[i]);
    } else if (fmt == FO_FMT_F16) {
        const uint16_t *s = (const uint16_t *)src + lo;
        for (int64_t i = 0; i < n; i++) dst[i] = fo_f16_to_f32(s[i]);
    } else if (fmt == FO_FMT_F32) {
        memcpy(dst, (const float *)src + lo, (size_t)n * sizeof(float));
    } else {
        const uint8_t *q = (const uint8_t *)src + lo;
        for (int64_t k = 0; k < n; k += FO_Q8_BLOCK) {
            int64_t m = n - k < FO_Q8_BLOCK ? n - k : FO_Q8_BLOCK;
            fo_q8_decode_block(fmt, q + k, scale[(lo + k) / FO_Q8_BLOCK], dst + k, m);
        }
    }
}

static inline void fo_fmt_store(void *dst, const float *restrict src, int64_t lo, int64_t n,
                                int fmt, float *scale, int sr, uint64_t key)
{
    if (fmt == FO_FMT_BF16) {
        uint16_t *d = (uint16_t *)dst + lo;
        if (sr)
            for (int64_t i = 0; i < n; i++)
                d[i] = fo_f32_to_bf16_sr(src[i], fo_random_bits(key, lo + i));
        else
            for (int64_t i = 0; i < n; i++) d[i] = fo_f32_to_bf16(src[i]);
    } else if (fmt == FO_FMT_F16) {
        uint16_t *d = (uint16_t *)dst + lo;
        for (int64_t i = 0; i < n; i++) d[i] = fo_f32_to_f16(src[i]);
    } else if (fmt == FO_FMT_F32) {
        memcpy((float *)dst + lo, src, (size_t)n * sizeof(float));
    } else {
        uint8_t *q = (uint8_t *)dst + lo;
        for (int64_t k = 0; k < n; k += FO_Q8_BLOCK) {
            int64_t m = n - k < FO_Q8_BLOCK ? n - k : FO_Q8_BLOCK;
            scale[(lo + k) / FO_Q8_BLOCK] = fo_q8_store(fmt, src + k, q + k, m);
        }
    }
}

/* Elements [begin, end) of tensor t in another storage than float32 throughout, through the
 * float32 loop f32, FO_LOWP_BLOCK elements at a time: a float32 array is used in place, any
 * other is loaded into a float buffer, f32 updates the block, and what it wrote is stored
 * back (a state array the loop only read goes back unchanged: widening and narrowing again
 * is exact, and so is decoding and encoding again a block the kernels wrote). With master
 * weights (t->copy), param is the float32 master and the 16-bit parameter is written from it,
 * rounded to nearest. begin is a multiple of FO_Q8_BLOCK when any state is 8-bit (fo_run
 * cuts there), so every block of codes is encoded whole by one call. */
#define FO_LOWP_BLOCK 1024
static inline void fo_lowp_run(fo_kernel_fn f32, const double *hyper, const fo_tensor *t,
                               int64_t begin, int64_t end)
{
    float p[FO_LOWP_BLOCK], g[FO_LOWP_BLOCK], s[3][FO_LOWP_BLOCK];
    const int64_t st = t->storage;
    const int pf = FO_FMT_OF(st, 0), gf = FO_FMT_OF(st, 4);
    const int sf[3] = {FO_FMT_OF(st, 8), FO_FMT_OF(st, 12), FO_FMT_OF(st, 16)};
    const int cf = FO_FMT_OF(st, FO_STORAGE_COPY_SHIFT);
    const int sr = (st & FO_STORAGE_SR) != 0;
    fo_tensor b = *t;
    b.storage = FO_STORAGE_NATIVE;
    b.copy = NULL;
    for (int64_t lo = begin; lo < end; lo += FO_LOWP_BLOCK) {
        int64_t n = end - lo < FO_LOWP_BLOCK ? end - lo : FO_LOWP_BLOCK;
        b.numel = n;
        if (pf == FO_FMT_F32) {
            b.param = (float *)t->param + lo;
        } else {
            fo_fmt_load(p, t->param, lo, n, pf, NULL);
            b.param = p;
        }
        if (gf == FO_FMT_F32) {
            b.grad = (const float *)t->grad + lo;
        } else {
            fo_fmt_load(g, t->grad, lo, n, gf, NULL);
            b.grad = g;
        }
        for (int k = 0; k < 3; k++) {
            if (t->state[k] == NULL) {
                b.state[k] = NULL;
            } else if (sf[k] == FO_FMT_F32) {
                b.state[k] = (float *)t->state[k] + lo;
            } else {
                fo_fmt_load(s[k], t->state[k], lo, n, sf[k], t->scale[k]);
                b.state[k] = s[k];
            }
        }
        f32(hyper, &b, 0, n);
        if (pf != FO_FMT_F32)
            fo_fmt_store(t->param, p, lo, n, pf, NULL, sr, t->rkey);
        if (t->copy != NULL)
            fo_fmt_store(t->copy, (const float *)b.param, lo, n, cf, NULL, 0, 0);
        for (int k = 0; k < 3; k++)
            if (t->state[k] != NULL && sf[k] != FO_FMT_F32)
                fo_fmt_store(t->state[k], s[k], lo, n, sf[k], t->scale[k], sr,
                             t->rkey ^ (0x9e3779b97f4a7c15ull * (uint64_t)(k + 1)));
    }
}


#define FO_CAT3_(a, b, c) a##_##b##_##c
#define FO_CAT3(a, b, c) FO_CAT3_(a, b, c)
#define FO_FN(name) FO_CAT3(fo_##name, FO_SFX, FO_ISA)

/* The table entry of kernel `name` for this ISA level, fo_kernel_<name>_<isa>: hyper is the
 * kernel's struct of doubles (fields in the order its Python class declares them), prepare
 * its prepare function or NULL, pure 1 when prepare reads only hyper and the step. */
/* Its float32 entry runs the float32 loop directly on float32 tensors and through
 * fo_lowp_run on 16-bit ones (fo_tensor.storage). */
#define FO_DEFINE_KERNEL(name, hyper, prepare, pure) \
    FO_DEFINE_KERNEL_FUSED(name, hyper, prepare, pure, NULL)

/* The same, with `fused` (or NULL): a function of the float32 entry's arguments that runs
 * some storages itself, in one pass, and returns 1, or returns 0 (fo_lowp_run runs them). It
 * must give fo_lowp_run's bits. */
#define FO_DEFINE_KERNEL_FUSED(name, hyper, prepare, pure, fused)                         \
    _Static_assert(sizeof(hyper) % sizeof(double) == 0, #hyper " must hold doubles only"); \
    static void FO_CAT3(fo_##name, f32s, FO_ISA)(const double *h_, const fo_tensor *t_,    \
                                                 int64_t b_, int64_t e_)                  \
    {                                                                                     \
        int (*fused_)(const double *, const fo_tensor *, int64_t, int64_t) = fused;       \
        if (t_->storage == FO_STORAGE_NATIVE) FO_CAT3(fo_##name, f32, FO_ISA)(h_, t_, b_, e_); \
        else if (fused_ == NULL || !fused_(h_, t_, b_, e_))                               \
            fo_lowp_run(FO_CAT3(fo_##name, f32, FO_ISA), h_, t_, b_, e_);                 \
    }                                                                                     \
    const fo_kernel FO_CAT3(fo_kernel, name, FO_ISA) = {                                  \
        #name, FO_CAT3(fo_##name, f32s, FO_ISA), FO_CAT3(fo_##name, f64, FO_ISA), prepare, \
        (int)(sizeof(hyper) / sizeof(double)), pure}

/* A hyperparameter flag (stored as 0.0 or 1.0) as an int, read once before a loop. */
#define FO_FLAG(x) ((x) != 0.0)

/* torch.lerp(s, e, w) as ATen computes it: s + w*(e - s) when |w| < 0.5, else
 * e - (e - s)*(1 - w), each with one rounding. wm1 = w - 1 (exact for w >= 0.5). */
#define FO_LERP(s, e, w, wm1, small) \
    ((small) ? FO_FMA((w), (e) - (s), (s)) : FO_FMA((wm1), (e) - (s), (e)))

/* torch.maximum: NaN if either side is NaN. */
#define FO_MAXIMUM(a, b) \
    (((a) != (a) || (b) != (b)) ? (a) + (b) : ((a) > (b) ? (a) : (b)))

/* Division of a square root s by a constant c in [2^-60, 1] without the vector divider, for
 * sqrt(v) divided by a bias correction (div_by_const in adam.c). s is what sqrt returns: 0,
 * +inf, NaN, or a normal number in [2^-75, 2^64] (float) or [2^-537, 2^512] (double); the
 * sequence is not correct for arbitrary s (near overflow, or tiny non-square-root values).
 * With rh = RN(1/c) and rl = RN(1/c - rh) (FO_RECIP2), q0 = RN(s*rh + RN(s*rl)) is within one
 * ulp of s/c: before the rounding its relative error is below 2^-47. Then r = s - q0*c is
 * exact and RN(q0 + r*rh) is the correctly rounded s/c (Markstein's theorem: rh within half
 * an ulp of 1/c, q0 within one ulp of s/c); for these s and c no step underflows or
 * overflows. c <= 1 makes s/c >= s, so the final max passes s itself through where the
 * sequence cannot: s = +inf (r is NaN), NaN and -0 (it would come out +0). Only worth it
 * with a hardware fma. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define FO_FAST_FMA 1
#else
#define FO_FAST_FMA 0
#endif
#define FO_DIV_BY_CONST_OK(c) (FO_FAST_FMA && (c) >= 0x1p-60 && (c) <= 1)
/* rh and rl in the element type of c. 1 - rh*c is exact in double for either type (for float
 * it is even a float: below 2^-24 in magnitude and a multiple of 2^-47), and the quotient of
 * two floats rounded to double and then to float is still correctly rounded (53 >= 2*24 + 2). */
#define FO_RECIP2(c, rh, rl) do { \
        double c_ = (double)(c); \
        (rh) = FO_FAST_FMA ? (__typeof__(c))(1.0 / c_) : 0; \
        (rl) = FO_FAST_FMA ? (__typeof__(c))(fma(-(double)(rh), c_, 1.0) / c_) : 0; \
    } while (0)

/* |x| of either element type (fabsf or fabs). */
#define FO_ABS(x) _Generic((x), float: fabsf, default: fabs)(x)

/* The lr-derived step scalars as torch computes them. lr_tensor (set by the freeze) is 32 for
 * a float32 tensor lr, 64 for a float64 one, 0 for a number. With a number they are Python
 * doubles; with a float32 tensor torch keeps lr a 0-d float32 tensor, so each operation on it
 * rounds to float32, its Python operands rounded to float32 first (a float64 tensor computes
 * as a double does). fo_lr_div is lr / d, fo_lr_decay the decoupled decay 1 - lr * wd. */
#define FO_LR_F32(lr_tensor) ((lr_tensor) == 32.0)

static inline double fo_lr_div(double lr, double d, double lr_tensor)
{
    return FO_LR_F32(lr_tensor) ? (double)((float)lr / (float)d) : lr / d;
}

static inline double fo_lr_decay(double lr, double wd, double lr_tensor)
{
    return FO_LR_F32(lr_tensor) ? (double)(1.0f - (float)lr * (float)wd) : 1.0 - lr * wd;
}

#endif /* FO_INTERNAL_H */
