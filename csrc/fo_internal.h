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

static inline void fo_lowp_load(float *restrict dst, const uint16_t *restrict src, int64_t n,
                                int64_t storage)
{
    if (storage == FO_STORAGE_BF16)
        for (int64_t i = 0; i < n; i++) dst[i] = fo_bf16_to_f32(src[i]);
    else
        for (int64_t i = 0; i < n; i++) dst[i] = fo_f16_to_f32(src[i]);
}

static inline void fo_lowp_store(uint16_t *restrict dst, const float *restrict src, int64_t n,
                                 int64_t storage)
{
    if (storage == FO_STORAGE_BF16)
        for (int64_t i = 0; i < n; i++) dst[i] = fo_f32_to_bf16(src[i]);
    else
        for (int64_t i = 0; i < n; i++) dst[i] = fo_f32_to_f16(src[i]);
}

#define FO_LOWP_BLOCK 256

/* Elements [begin, end) of the 16-bit tensor t through the float32 loop f32, a block at a
 * time: parameter, gradient and state arrays are loaded into float buffers, f32 updates the
 * block, and the parameter and the state are stored back rounded (a state array the loop
 * only read goes back unchanged: widening and narrowing again is exact). Step counter, aux,
 * scalars and flags are the tensor's own. */
static inline void fo_lowp_run(fo_kernel_fn f32, const double *hyper, const fo_tensor *t,
                               int64_t begin, int64_t end)
{
    float p[FO_LOWP_BLOCK], g[FO_LOWP_BLOCK], s[3][FO_LOWP_BLOCK];
    fo_tensor b = *t;
    b.storage = FO_STORAGE_NATIVE;
    b.param = p;
    b.grad = g;
    for (int k = 0; k < 3; k++) b.state[k] = t->state[k] != NULL ? s[k] : NULL;
    for (int64_t lo = begin; lo < end; lo += FO_LOWP_BLOCK) {
        int64_t n = end - lo < FO_LOWP_BLOCK ? end - lo : FO_LOWP_BLOCK;
        b.numel = n;
        fo_lowp_load(p, (const uint16_t *)t->param + lo, n, t->storage);
        fo_lowp_load(g, (const uint16_t *)t->grad + lo, n, t->storage);
        for (int k = 0; k < 3; k++)
            if (t->state[k] != NULL)
                fo_lowp_load(s[k], (const uint16_t *)t->state[k] + lo, n, t->storage);
        f32(hyper, &b, 0, n);
        fo_lowp_store((uint16_t *)t->param + lo, p, n, t->storage);
        for (int k = 0; k < 3; k++)
            if (t->state[k] != NULL)
                fo_lowp_store((uint16_t *)t->state[k] + lo, s[k], n, t->storage);
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
#define FO_DEFINE_KERNEL(name, hyper, prepare, pure)                                     \
    _Static_assert(sizeof(hyper) % sizeof(double) == 0, #hyper " must hold doubles only"); \
    static void FO_CAT3(fo_##name, f32s, FO_ISA)(const double *h_, const fo_tensor *t_,    \
                                                 int64_t b_, int64_t e_)                  \
    {                                                                                     \
        if (t_->storage == FO_STORAGE_NATIVE) FO_CAT3(fo_##name, f32, FO_ISA)(h_, t_, b_, e_); \
        else fo_lowp_run(FO_CAT3(fo_##name, f32, FO_ISA), h_, t_, b_, e_);                \
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
