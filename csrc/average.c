/*
 * average.c - in-place parameter averaging for swa_utils.AveragedModel.
 * The tensor's param is the running average, its grad the current parameter value:
 *   lerp = 1: avg = lerp(avg, cur, w)    (EMA, and SWA's 1/(n+1) weight), ATen's rounding
 *   lerp = 0: avg = avg + (cur - avg) / d  (torch's default SWA mean on the loop path)
 */
#ifndef FO_T
#include "fo_internal.h"

/* Parameter averaging (swa_utils): hyperparameters weight and lerp (1: avg = lerp(avg, cur,
 * weight) with ATen's rounding; 0: avg = avg + (cur - avg) / weight). The tensor's param is
 * the average, its grad the current value. */
typedef struct fo_average_hyper {
    double weight, lerp;
} fo_average_hyper;

#define FO_BODY "average.c"
#include "fo_expand.h"
FO_DEFINE_KERNEL(average, fo_average_hyper, NULL, 1);
#else

void FO_FN(average)(const double *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_average_hyper *h = (const fo_average_hyper *)hyper;
    FO_T *restrict avg = (FO_T *)t->param;
    const FO_T *restrict cur = (const FO_T *)t->grad;
    const FO_T w = (FO_T)h->weight, wm1 = w - (FO_T)1;
    const int small = fabs((double)w) < 0.5;

    if (FO_FLAG(h->lerp)) {
        for (int64_t i = begin; i < end; i++)
            avg[i] = FO_LERP(avg[i], cur[i], w, wm1, small);
    } else {
        for (int64_t i = begin; i < end; i++)
            avg[i] = avg[i] + (cur[i] - avg[i]) / w;
    }
}

#endif
