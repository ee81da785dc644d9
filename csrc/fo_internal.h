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
#include <stdint.h>
#include "fastopt.h"

#ifndef FO_ISA
#define FO_ISA baseline
#endif

#define FO_CAT3_(a, b, c) a##_##b##_##c
#define FO_CAT3(a, b, c) FO_CAT3_(a, b, c)
#define FO_FN(name) FO_CAT3(fo_##name, FO_SFX, FO_ISA)

/* torch.lerp(s, e, w) as ATen computes it: s + w*(e - s) when |w| < 0.5, else
 * e - (e - s)*(1 - w), each with one rounding. wm1 = w - 1 (exact for w >= 0.5). */
#define FO_LERP(s, e, w, wm1, small) \
    ((small) ? FO_FMA((w), (e) - (s), (s)) : FO_FMA((wm1), (e) - (s), (e)))

/* torch.maximum: NaN if either side is NaN. */
#define FO_MAXIMUM(a, b) \
    (((a) != (a) || (b) != (b)) ? (a) + (b) : ((a) > (b) ? (a) : (b)))

/* |x| of either element type (fabsf or fabs). */
#define FO_ABS(x) _Generic((x), float: fabsf, default: fabs)(x)

#endif /* FO_INTERNAL_H */
