/*
 * dispatch.c - runtime choice of the ISA level, fo_run, which spreads a list of tensors over
 * OpenMP threads, and fo_step, a whole optimizer step. Compiled once, for the baseline ISA.
 */
#include <stdlib.h>
#include <string.h>
#include "fastopt.h"
#ifdef _OPENMP
#include <omp.h>
#endif

typedef const fo_kernel *const fo_table[FO_KERNEL_COUNT];
extern fo_table fo_table_baseline;
#ifdef FO_HAVE_X86_LEVELS
extern fo_table fo_table_avx2;
extern fo_table fo_table_avx512;
#endif

static const char *const fo_names[FO_ISA_COUNT] = {"baseline", "avx2", "avx512"};
static const fo_kernel *const *fo_current = NULL;
static int fo_level = -1;
static int fo_threads = 0;

const char *fo_isa_name(int level)
{
    return (level >= 0 && level < FO_ISA_COUNT) ? fo_names[level] : "unknown";
}

static const fo_kernel *const *fo_table_of(int level)
{
    switch (level) {
    case FO_ISA_BASELINE: return fo_table_baseline;
#ifdef FO_HAVE_X86_LEVELS
    case FO_ISA_AVX2: return fo_table_avx2;
    case FO_ISA_AVX512: return fo_table_avx512;
#endif
    default: return NULL;
    }
}

int fo_isa_supported(int level)
{
    if (fo_table_of(level) == NULL) return 0;
#ifdef FO_HAVE_X86_LEVELS
    __builtin_cpu_init();
    if (level == FO_ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("bmi2");
    if (level == FO_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return level == FO_ISA_BASELINE;
}

int fo_isa_set(int level)
{
    if (!fo_isa_supported(level)) return -1;
    fo_level = level;
    fo_current = fo_table_of(level);
    return 0;
}

static void fo_isa_init(void)
{
    const char *want = getenv("FASTOPT_CPU_CAPABILITY");
    int best = FO_ISA_BASELINE;
    for (int l = FO_ISA_COUNT - 1; l > FO_ISA_BASELINE; l--) {
        if (fo_isa_supported(l)) { best = l; break; }
    }
    if (want != NULL && *want != '\0') {
        for (int l = 0; l < FO_ISA_COUNT; l++) {
            /* a level above what the CPU runs falls back to the best supported one */
            if (strcmp(want, fo_names[l]) == 0) { best = fo_isa_supported(l) ? l : best; break; }
        }
    }
    fo_isa_set(best);
}

const fo_kernel *fo_kernel_get(int id)
{
    if (id < 0 || id >= FO_KERNEL_COUNT) return NULL;
    if (fo_current == NULL) fo_isa_init();
    return fo_current[id];
}

const fo_kernel *fo_kernel_info(int id)
{
    return (id >= 0 && id < FO_KERNEL_COUNT) ? fo_table_baseline[id] : NULL;
}

int fo_kernel_find(const char *name)
{
    for (int id = 0; id < FO_KERNEL_COUNT; id++)
        if (strcmp(fo_table_baseline[id]->name, name) == 0) return id;
    return -1;
}

int fo_isa_current(void)
{
    if (fo_current == NULL) fo_isa_init();
    return fo_level;
}

int fo_have_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

void fo_set_num_threads(int n) { fo_threads = n < 1 ? 1 : n; }

int fo_get_num_threads(void)
{
#ifdef _OPENMP
    if (fo_threads == 0) fo_threads = omp_get_max_threads();
    return fo_threads;
#else
    return 1;
#endif
}

/* Update the elements [lo, hi) of the concatenation of ts[0..nt). */
static void fo_run_range(fo_kernel_fn fn, const double *hyper, const fo_tensor *ts, int64_t nt,
                         int64_t lo, int64_t hi)
{
    int64_t off = 0;
    for (int64_t k = 0; k < nt && off < hi; k++) {
        int64_t n = ts[k].numel;
        int64_t b = lo > off ? lo - off : 0;
        int64_t e = hi < off + n ? hi - off : n;
        if (b < e) fn(hyper, &ts[k], b, e);
        off += n;
    }
}

void fo_run(fo_kernel_fn fn, const double *hyper, const fo_tensor *ts, int64_t nt, int serial)
{
    int64_t total = 0;
    for (int64_t k = 0; k < nt; k++) total += ts[k].numel;
    int nthr = serial ? 1 : fo_get_num_threads();
    if ((int64_t)nthr > total / FO_GRAIN) nthr = (int)(total / FO_GRAIN);
    if (nthr <= 1) {
        for (int64_t k = 0; k < nt; k++)
            if (ts[k].numel > 0) fn(hyper, &ts[k], 0, ts[k].numel);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
    {
        int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int64_t chunk = ((total + nth - 1) / nth + 15) & ~(int64_t)15;
        int64_t lo = tid * chunk, hi = lo + chunk;
        if (hi > total) hi = total;
        if (lo < hi) fo_run_range(fn, hyper, ts, nt, lo, hi);
    }
#else
    fo_run_range(fn, hyper, ts, nt, 0, total);
#endif
}

/* Step counters and per-tensor scalars of one group, in list order. A pure prepare is a
 * function of the step alone, so a tensor at the same step as the one before it (the usual
 * case) copies that tensor's scalars. */
static void fo_prepare_group(const fo_kernel *k, const fo_group *g)
{
    double prev = 0.0;
    for (int64_t i = 0; i < g->nt; i++) {
        fo_tensor *t = &g->ts[i];
        double step = 0.0;
        if (t->step != NULL) {
            *t->step = *t->step + 1.0f;
            step = (double)*t->step;
        }
        if (k->prepare == NULL) continue;
        if (k->pure && i > 0 && step == prev) {
            for (int j = 0; j < 4; j++) t->scalar[j] = g->ts[i - 1].scalar[j];
        } else {
            k->prepare(g->hyper, t, step);
        }
        prev = step;
    }
}

void fo_step(const fo_group *gs, int64_t ng)
{
    for (int64_t i = 0; i < ng; i++) {
        const fo_kernel *k = fo_kernel_get(gs[i].kernel);
        if (k == NULL || gs[i].nt == 0) continue;
        fo_prepare_group(k, &gs[i]);
        fo_run(gs[i].f64 ? k->f64 : k->f32, gs[i].hyper, gs[i].ts, gs[i].nt, gs[i].serial);
    }
}
