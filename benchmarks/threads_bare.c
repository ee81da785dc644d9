/*
 * threads_bare.c - fastopt's fo_run against a bare OpenMP loop over the same kernel.
 *
 * A shared library that benchmarks/bench_threads.py compiles (gcc or clang with OpenMP) and
 * calls with ctypes. fo_bare_bench opens fastopt's extension module (already loaded by the
 * caller), takes the float32 loop of a kernel and times, in interleaved rounds:
 *   one   the loop over all elements on the calling thread
 *   bare  one equal static piece per thread, run by helper threads that spin between
 *         repetitions (never asleep, no OpenMP): the least any threading can cost
 *   fo    fo_run with OpenMP set to nthr: fastopt's threads (threshold, shares, chunks)
 *   forced  fo_run_threads on nthr threads: the same without the threshold
 * With gap_us > 0 the calling thread busy-waits that long between repetitions, as a training
 * loop computes between steps (fastopt's workers may fall asleep meanwhile).
 * The step counter stays at 1, so every repetition does the same arithmetic.
 */
#include <dlfcn.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "fastopt.h"

typedef const fo_kernel *(*get_fn)(int);
typedef int (*find_fn)(const char *);
typedef void (*run_fn)(fo_kernel_fn, const double *, const fo_tensor *, int64_t, int);
typedef void (*run_threads_fn)(fo_kernel_fn, const double *, const fo_tensor *, int64_t, int);

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The bare loop: nthr - 1 helper threads that spin on a generation counter (always awake,
 * never sleeping) and one equal static piece of the elements per thread. */
static struct {
    fo_kernel_fn fn;
    const double *hyper;
    const fo_tensor *t;
    int nthr, stop;
    unsigned gen, done, ready;
} bare_job;

static void bare_piece(int id)
{
    int64_t n = bare_job.t->numel;
    bare_job.fn(bare_job.hyper, bare_job.t, n * id / bare_job.nthr, n * (id + 1) / bare_job.nthr);
}

static void *bare_helper(void *arg)
{
    int id = (int)(intptr_t)arg;
    unsigned seen = __atomic_load_n(&bare_job.gen, __ATOMIC_ACQUIRE);
    __atomic_add_fetch(&bare_job.ready, 1, __ATOMIC_ACQ_REL);
    for (;;) {
        unsigned g;
        while ((g = __atomic_load_n(&bare_job.gen, __ATOMIC_ACQUIRE)) == seen)
            __builtin_ia32_pause();
        seen = g;
        if (__atomic_load_n(&bare_job.stop, __ATOMIC_ACQUIRE)) break;
        bare_piece(id);
        __atomic_add_fetch(&bare_job.done, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

static void bare(void)
{
    __atomic_store_n(&bare_job.done, 0, __ATOMIC_RELAXED);
    __atomic_add_fetch(&bare_job.gen, 1, __ATOMIC_ACQ_REL);
    bare_piece(0);
    while (__atomic_load_n(&bare_job.done, __ATOMIC_ACQUIRE) != (unsigned)bare_job.nthr - 1)
        __builtin_ia32_pause();
}

/* Time `rounds` interleaved rounds of the four modes on n elements; out[4 * r + mode] gets
 * round r's median ns per element. Returns 0, or -1 when the extension or kernel is missing. */
int fo_bare_bench(const char *extension, const char *kernel, int nthr, int rounds, int64_t n,
                  const double *hyper, double gap_us, double *out)
{
    void *so = dlopen(extension, RTLD_NOW | RTLD_LOCAL);
    if (so == NULL) return -1;
    get_fn get = (get_fn)dlsym(so, "fo_kernel_get");
    find_fn find = (find_fn)dlsym(so, "fo_kernel_find");
    run_fn run = (run_fn)dlsym(so, "fo_run");
    run_threads_fn forced = (run_threads_fn)dlsym(so, "fo_run_threads");
    if (!get || !find || !run || !forced || find(kernel) < 0 || nthr < 1 || nthr > 64) return -1;
    const fo_kernel *k = get(find(kernel));
    int before = omp_get_max_threads();
    omp_set_num_threads(nthr);

    float *buf[5];
    for (int b = 0; b < 5; b++) {
        buf[b] = aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
        for (int64_t i = 0; i < n; i++) buf[b][i] = b == 1 ? 1e-3f : b == 0 ? 0.1f : 0.0f;
    }
    float step = 1.0f, aux[2] = {1.0f, 1.0f};
    fo_tensor t;
    memset(&t, 0, sizeof t);
    t.param = buf[0];
    t.grad = buf[1];
    for (int b = 0; b < 3; b++) t.state[b] = buf[2 + b];
    t.step = &step;
    t.aux[0] = &aux[0];
    t.aux[1] = &aux[1];
    t.numel = n;
    if (k->prepare) k->prepare(hyper, &t, 1.0);
    bare_job.fn = k->f32;
    bare_job.hyper = hyper;
    bare_job.t = &t;
    bare_job.nthr = nthr;
    pthread_t helpers[64];
    /* repetitions per round and mode: about 10 ms of one-thread work (gaps included) */
    double t0 = now();
    k->f32(hyper, &t, 0, n);
    int reps = (int)(0.01 / (now() - t0 + gap_us * 1e-6 + 1e-9));
    reps = reps < 5 ? 5 : reps > 2000 ? 2000 : reps;
    double *sample = malloc(reps * sizeof(double));
    for (int r = 0; r < rounds; r++) {
        for (int mode = 0; mode < 4; mode++) {
            if (mode == 1) { /* the helpers spin during the bare repetitions only */
                bare_job.stop = 0;
                for (int i = 1; i < nthr; i++)
                    pthread_create(&helpers[i], NULL, bare_helper, (void *)(intptr_t)i);
                while (__atomic_load_n(&bare_job.ready, __ATOMIC_ACQUIRE) != (unsigned)nthr - 1)
                    __builtin_ia32_pause();
                bare_job.ready = 0;
            }
            for (int i = 0; i < reps; i++) {
                if (gap_us > 0)
                    for (double until = now() + gap_us * 1e-6; now() < until;) continue;
                t0 = now();
                if (mode == 0) k->f32(hyper, &t, 0, n);
                else if (mode == 1) bare();
                else if (mode == 2) run(k->f32, hyper, &t, 1, 0);
                else forced(k->f32, hyper, &t, 1, nthr);
                sample[i] = now() - t0;
            }
            if (mode == 1) {
                __atomic_store_n(&bare_job.stop, 1, __ATOMIC_RELEASE);
                __atomic_add_fetch(&bare_job.gen, 1, __ATOMIC_ACQ_REL);
                for (int i = 1; i < nthr; i++) pthread_join(helpers[i], NULL);
            }
            qsort(sample, reps, sizeof(double), cmp);
            out[4 * r + mode] = sample[reps / 2] / n * 1e9;
        }
    }
    free(sample);
    for (int b = 0; b < 5; b++) free(buf[b]);
    omp_set_num_threads(before);
    return 0;
}
