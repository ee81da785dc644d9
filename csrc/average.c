/*
 * average.c - in-place parameter averaging for swa_utils.AveragedModel.
 * The tensor's param is the running average, its grad the current parameter value:
 *   FO_AVG_LERP: avg = lerp(avg, cur, w)    (EMA, and SWA's 1/(n+1) weight), ATen's rounding
 *   FO_AVG_DIV:  avg = avg + (cur - avg) / d  (torch's default SWA mean on the loop path)
 */
#ifndef FO_T
#include "fo_internal.h"
#define FO_BODY "average.c"
#include "fo_expand.h"
#else

void FO_FN(average)(const void *hyper, const fo_tensor *t, int64_t begin, int64_t end)
{
    const fo_average_hyper *h = (const fo_average_hyper *)hyper;
    FO_T *restrict avg = (FO_T *)t->param;
    const FO_T *restrict cur = (const FO_T *)t->grad;
    const FO_T w = (FO_T)h->weight, wm1 = w - (FO_T)1;
    const int small = fabs((double)w) < 0.5;

    if (h->mode == FO_AVG_LERP) {
        for (int64_t i = begin; i < end; i++)
            avg[i] = FO_LERP(avg[i], cur[i], w, wm1, small);
    } else {
        for (int64_t i = begin; i < end; i++)
            avg[i] = avg[i] + (cur[i] - avg[i]) / w;
    }
}

#endif
