/*
 * fo_expand.h - includes the kernel body named by FO_BODY once for float and once for double.
 * See fo_internal.h.
 */
#define FO_T float
#define FO_SFX f32
#define FO_FMA fmaf
#define FO_SQRT sqrtf
#define FO_F32 1
#include FO_BODY
#undef FO_T
#undef FO_SFX
#undef FO_FMA
#undef FO_SQRT
#undef FO_F32

#define FO_T double
#define FO_SFX f64
#define FO_FMA fma
#define FO_SQRT sqrt
#define FO_F32 0
#include FO_BODY
#undef FO_T
#undef FO_SFX
#undef FO_FMA
#undef FO_SQRT
#undef FO_F32
