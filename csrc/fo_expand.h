/*
 * fo_expand.h - includes the kernel body named by FO_BODY once for float and once for double.
 * See fo_internal.h.
 */
#define FO_T float
#define FO_SFX f32
#define FO_FMA fmaf
#define FO_SQRT sqrtf
/* x / c for a loop-invariant c, correctly rounded, without a float division: with
 * rc = 1.0 / (double)c, (float)((double)x * rc) is within 2^-52 (relative) of x / c, while
 * the quotient of two floats is never a rounding midpoint of float and stays at least 2^-49
 * (relative) away from every one, so the final rounding gives exactly the IEEE quotient
 * (subnormal and overflowing quotients included). It frees the divider, the bottleneck of
 * the in-cache loops, and leaves the results bit for bit unchanged. */
#define FO_DIVC(x, c, rc) ((float)((double)(x) * (rc)))
#include FO_BODY
#undef FO_T
#undef FO_SFX
#undef FO_FMA
#undef FO_SQRT
#undef FO_DIVC

#define FO_T double
#define FO_SFX f64
#define FO_FMA fma
#define FO_SQRT sqrt
#define FO_DIVC(x, c, rc) ((x) / (c))
#include FO_BODY
#undef FO_T
#undef FO_SFX
#undef FO_FMA
#undef FO_SQRT
#undef FO_DIVC
