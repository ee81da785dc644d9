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
#include "fastopt.h"

#ifndef FO_ISA
#define FO_ISA baseline
#endif

#define FO_CAT3_(a, b, c) a##_##b##_##c
#define FO_CAT3(a, b, c) FO_CAT3_(a, b, c)
#define FO_FN(name) FO_CAT3(fo_##name, FO_SFX, FO_ISA)

/* The table entry of kernel `name` for this ISA level, fo_kernel_<name>_<isa>: hyper is the
 * kernel's struct of doubles (fields in the order its Python class declares them), prepare
 * its prepare function or NULL, pure 1 when prepare reads only hyper and the step. */
#define FO_DEFINE_KERNEL(name, hyper, prepare, pure)                                     \
    _Static_assert(sizeof(hyper) % sizeof(double) == 0, #hyper " must hold doubles only"); \
    const fo_kernel FO_CAT3(fo_kernel, name, FO_ISA) = {                                  \
        #name, FO_CAT3(fo_##name, f32, FO_ISA), FO_CAT3(fo_##name, f64, FO_ISA), prepare, \
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
