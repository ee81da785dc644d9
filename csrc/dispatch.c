/*
 * dispatch.c - runtime choice of the ISA level, fo_run, which spreads a list of tensors over
 * fastopt's worker threads, and fo_step, a whole optimizer step. Compiled once, for the
 * baseline ISA.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* sched_getcpu, sched_setaffinity and cpu_set_t */
#endif
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sched.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include "fastopt.h"
#include "fo_internal.h"
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
               __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
    if (level == FO_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
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

/* The thread count is OpenMP's own setting (the nthreads ICV of the calling thread), read at
 * every fo_run: OMP_NUM_THREADS, omp_set_num_threads, threadpoolctl's threadpool_limits and,
 * where torch loads the same libgomp.so.1 (its Linux wheels do), torch.set_num_threads all
 * take effect; fastopt.set_num_threads is omp_set_num_threads. omp_get_max_threads reads one
 * field of the thread's task: nanoseconds. */
int fo_set_num_threads(int n)
{
    if (n < 1 || n > FO_MAX_THREADS) return -1;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    return 0;
}

int fo_get_num_threads(void)
{
#ifdef _OPENMP
    int n = omp_get_max_threads();
    return n < 1 ? 1 : n;
#else
    return 1;
#endif
}

#if defined(_OPENMP) && !defined(_WIN32)
#define FO_POOL 1
#include <pthread.h>
#include <signal.h>
#include <time.h>

/* The first block edge of an 8-bit state at or after element i of a tensor of n elements. */
static inline int64_t fo_block_edge(int64_t i, int64_t n)
{
    int64_t up = (i + FO_Q8_BLOCK - 1) / FO_Q8_BLOCK * FO_Q8_BLOCK;
    return up < n ? up : n;
}

/* A position in the concatenation of a tensor list: tensor k starts at element off. */
typedef struct fo_cursor {
    int64_t k, off;
} fo_cursor;

/* Update the elements [lo, hi) of the concatenation of ts[0..nt), from cursor c on (which
 * moves forward as a thread takes increasing ranges, and starts over when it goes back). */
static void fo_run_range(fo_kernel_fn fn, const double *hyper, const fo_tensor *ts, int64_t nt,
                         fo_cursor *c, int64_t lo, int64_t hi)
{
    if (c->off > lo) c->k = c->off = 0;
    while (c->k < nt && c->off + ts[c->k].numel <= lo) c->off += ts[c->k++].numel;
    for (int64_t k = c->k, off = c->off; k < nt && off < hi; off += ts[k++].numel) {
        int64_t n = ts[k].numel;
        int64_t b = lo > off ? lo - off : 0;
        int64_t e = hi < off + n ? hi - off : n;
        if (ts[k].storage & FO_STORAGE_Q8) {
            /* 8-bit state: cut at block edges, so that every block is encoded by one call
             * (consecutive ranges move their common edge to the same place) */
            b = fo_block_edge(b, n);
            e = fo_block_edge(e, n);
        }
        if (b < e) fn(hyper, &ts[k], b, e);
    }
}

/* One thread's share of the elements, cut in chunks; `next` counts the chunks taken. */
typedef struct fo_share {
    int64_t lo, hi, next;
} __attribute__((aligned(64))) fo_share; /* one cache line each: the counters are hot */
#define FO_MAX_SHARES 64

/* Take the next chunk of share s: 1 and [*lo, *hi), or 0 when the share is done. */
static int fo_take(fo_share *s, int64_t *lo, int64_t *hi)
{
    int64_t i = __atomic_fetch_add(&s->next, 1, __ATOMIC_RELAXED);
    *lo = s->lo + i * FO_CHUNK;
    if (*lo >= s->hi) return 0;
    *hi = *lo + FO_CHUNK < s->hi ? *lo + FO_CHUNK : s->hi;
    return 1;
}

/* One fo_run over several threads: the shares, and what every chunk runs. */
typedef struct fo_job {
    fo_kernel_fn fn;
    const double *hyper;
    const fo_tensor *ts;
    int64_t nt;
    int nthr, nsh;
    fo_share sh[FO_MAX_SHARES];
} fo_job;

/* Work through share `home` and then the chunks left in the others; returns the chunks run. */
static int64_t fo_job_work(fo_job *j, int home)
{
    fo_cursor c = {0, 0};
    int64_t lo, hi, done = 0;
    for (int i = 0; i < j->nsh; i++) {
        fo_share *s = &j->sh[(home + i) % j->nsh];
        for (; fo_take(s, &lo, &hi); done++)
            fo_run_range(j->fn, j->hyper, j->ts, j->nt, &c, lo, hi);
    }
    return done;
}


/* Threads under load, and threads that share the machine.
 *
 * fastopt runs its threads itself rather than in an OpenMP parallel region: a region ends in a
 * barrier that waits for every thread of the team to arrive, and on a machine where another
 * process keeps a core busy the last thread to be woken can wait for that process's time
 * slice, milliseconds, at every step (with a region and chunks taken from a counter, 2 threads
 * were 13 to 210 times slower than 1 for Adam at 1e6 to 1e5 elements, medians). Here the
 * thread that calls fo_run (the master) starts on its share at once, the workers join as
 * they wake, and the master waits only for chunks that a worker has taken: a worker that
 * wakes late finds nothing left and leaves, and one descheduled while it works delays only
 * its chunk. The thread count is still OpenMP's setting (fo_get_num_threads).
 *
 * Waiting: after a job a worker spins for FO_SPIN_NS (so that back-to-back steps, and the
 * groups of one step, find it awake), yielding the core to anyone who wants it, and then
 * sleeps on a condition variable, so between the steps of a training loop it never spins
 * against BLAS or the rest of the program.
 * OMP_WAIT_POLICY=passive (read once, when the first worker starts) turns the spin off.
 * libgomp's own wait policy, which its environment variables set when it loads, is left as
 * the user (or torch, which shares the library) has it.
 *
 * Sharing the master's CPU: Linux wakes a sleeping thread on an idle CPU only when it looks
 * for one, and on a busy machine (both CPUs of a 2-CPU machine busy a moment before) it may
 * not look and queue the worker on the CPU of the master that woke it. The worker then waits
 * there for the master's time slice (milliseconds: the whole job runs on the master alone)
 * while the other CPU idles, and once awake the two take turns on one CPU. So the master,
 * before it wakes the sleeping workers, takes its own CPU out of their affinity masks, so
 * that the kernel wakes them elsewhere, and each puts its mask back as it was once awake (a
 * thread stays where it runs when its mask grows). And a spinning worker that finds itself on
 * the CPU the master posted its last job from moves off it the same way (taking the CPU out of
 * its own mask makes the kernel move it at once), at most once per spin window. Neither
 * happens where a mask allows no other CPU. On a machine whose other CPUs are busy with other
 * processes the worker competes there, as any thread does, and the back-off below keeps the
 * master from waiting for it.
 *
 * The protocol: the master, holding `lock`, fills `job`, sets `active` and bumps `gen`; a
 * worker that sees a new `gen` adds itself to `inflight`, and only then reads `active` and,
 * if set, the job. The master, once every chunk is taken, clears `active` and waits until
 * `inflight` is 0; the sequentially consistent order of those operations means no worker
 * reads the job after it. A Python thread that calls fo_run while another holds the pool runs
 * on its own thread. After fork() the child starts without workers. */
#define FO_SPIN_NS 100000
#define FO_LATE_NS 50000
#define FO_WAKE_MIN (1 << 20)
#define FO_BACKOFF_MAX 1024

static struct {
    pthread_mutex_t lock;   /* held by the master */
    pthread_mutex_t sleep;  /* with `wake`: workers that stopped spinning */
    pthread_cond_t wake;
    int nworkers;           /* started; under `lock` */
    int sleepers;           /* atomic */
    int active;             /* atomic: the job may be worked on */
    int inflight;           /* atomic: workers between joining and leaving a job */
    uint64_t gen;           /* atomic: one more per job */
    long spin_ns;
    int master_cpu;         /* atomic: the CPU the master posted the last job from, or -1 */
    int backoff, skip;      /* under `lock`; see fo_pool_run */
    fo_job job;
} fo_pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .sleep = PTHREAD_MUTEX_INITIALIZER,
             .wake = PTHREAD_COND_INITIALIZER, .master_cpu = -1};
static int64_t fo_last_ns; /* atomic: when the last fo_run that wanted threads ended */

static int64_t fo_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void fo_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* The CPU the calling thread runs on, or -1 where the system does not say. */
static inline int fo_cpu(void)
{
#ifdef __linux__
    return sched_getcpu();
#else
    return -1;
#endif
}

/* Affinity masks: the calling thread's mask; `mask` less `cpu` (0 where `mask` allows no
 * other CPU); the mask of thread `tid` (0: the calling thread) set; a new thread's mask set in
 * its attributes. Each returns 1 when done, 0 where it cannot be (or the system does not
 * have affinity masks). */
#ifdef __linux__
typedef cpu_set_t fo_mask;
static int fo_get_mask(fo_mask *mask)
{
    return sched_getaffinity(0, sizeof *mask, mask) == 0;
}
static int fo_mask_without(const fo_mask *mask, int cpu, fo_mask *out)
{
    if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, mask) || CPU_COUNT(mask) < 2)
        return 0;
    *out = *mask;
    CPU_CLR(cpu, out);
    return 1;
}
static int fo_set_mask(pid_t tid, const fo_mask *mask)
{
    return sched_setaffinity(tid, sizeof *mask, mask) == 0;
}
static int fo_attr_mask(pthread_attr_t *attr, const fo_mask *mask)
{
    return pthread_attr_setaffinity_np(attr, sizeof *mask, mask) == 0;
}
static pid_t fo_tid(void)
{
    return (pid_t)syscall(SYS_gettid);
}
#else
typedef int fo_mask;
static int fo_get_mask(fo_mask *mask)
{
    *mask = 0;
    return 0;
}
static int fo_mask_without(const fo_mask *mask, int cpu, fo_mask *out)
{
    (void)cpu;
    *out = *mask;
    return 0;
}
static int fo_set_mask(pid_t tid, const fo_mask *mask)
{
    (void)tid;
    (void)mask;
    return 0;
}
static int fo_attr_mask(pthread_attr_t *attr, const fo_mask *mask)
{
    (void)attr;
    (void)mask;
    return 0;
}
static pid_t fo_tid(void)
{
    return 0;
}
#endif

/* What the master knows of a worker, under `sleep`: its thread id, and while it sleeps (or
 * until it starts) its affinity mask (when it could be read) and whether the master
 * narrowed it. */
typedef struct fo_slot {
    pid_t tid;
    int asleep, mask_ok, moved;
    fo_mask mask;
} fo_slot;
#define FO_MAX_SLOTS 256 /* workers beyond are woken as they are */
static fo_slot fo_slots[FO_MAX_SLOTS];

/* A spinning worker on the master's CPU moves off it, at most once every spin window
 * (`*last`: when it last did). */
static void fo_leave_master_cpu(int64_t now, int64_t *last)
{
    int cpu = fo_cpu();
    if (cpu < 0 || cpu != __atomic_load_n(&fo_pool.master_cpu, __ATOMIC_RELAXED)) return;
    if (*last != 0 && now - *last < fo_pool.spin_ns) return;
    *last = now;
    fo_mask mask, other;
    if (fo_get_mask(&mask) && fo_mask_without(&mask, cpu, &other) && fo_set_mask(0, &other))
        fo_set_mask(0, &mask);
}

/* Wait until gen differs from seen: spin for spin_ns, then sleep. Returns the new gen. The
 * spin is polite: after a few microseconds of pause instructions (the groups of one step come
 * that close) it yields the core at every turn, so a thread that shares the core (the master,
 * another process) runs first, and the spin only uses time nobody else wants. */
static uint64_t fo_worker_wait(uint64_t seen, fo_slot *me, int64_t *left)
{
    uint64_t g;
    int64_t until = 0;
    for (unsigned i = 0;; i++) {
        g = __atomic_load_n(&fo_pool.gen, __ATOMIC_SEQ_CST);
        if (g != seen) return g;
        if ((i & 63) == 0) {
            int64_t t = fo_now_ns();
            if (until == 0) until = t + fo_pool.spin_ns;
            else if (t >= until) break;
            fo_leave_master_cpu(t, left);
        }
        if (i < 64) fo_pause();
        else sched_yield();
    }
    pthread_mutex_lock(&fo_pool.sleep);
    if (me) { /* its mask, for the master to take its CPU out of (see above) */
        me->mask_ok = fo_get_mask(&me->mask);
        me->asleep = 1;
    }
    __atomic_add_fetch(&fo_pool.sleepers, 1, __ATOMIC_SEQ_CST);
    while ((g = __atomic_load_n(&fo_pool.gen, __ATOMIC_SEQ_CST)) == seen)
        pthread_cond_wait(&fo_pool.wake, &fo_pool.sleep);
    __atomic_sub_fetch(&fo_pool.sleepers, 1, __ATOMIC_SEQ_CST);
    int moved = 0;
    if (me) {
        moved = me->moved;
        me->asleep = me->moved = 0;
    }
    pthread_mutex_unlock(&fo_pool.sleep);
    if (moved) fo_set_mask(0, &me->mask);
    return g;
}

static void *fo_worker(void *arg)
{
    int index = (int)(intptr_t)arg; /* 1, 2, ...: the master is 0 */
    uint64_t seen = __atomic_load_n(&fo_pool.gen, __ATOMIC_SEQ_CST);
    fo_slot *me = index <= FO_MAX_SLOTS ? &fo_slots[index - 1] : NULL;
    int64_t left = 0; /* when it last left the master's CPU */
#ifdef __linux__
    pthread_setname_np(pthread_self(), "fastopt-worker"); /* as top and /proc show it */
#endif
    if (me) { /* started off the master's CPU (see fo_pool_grow): the mask back */
        pthread_mutex_lock(&fo_pool.sleep);
        me->tid = fo_tid();
        int moved = me->moved;
        me->moved = 0;
        pthread_mutex_unlock(&fo_pool.sleep);
        if (moved) fo_set_mask(0, &me->mask);
    }
    for (;;) {
        seen = fo_worker_wait(seen, me, &left);
        __atomic_add_fetch(&fo_pool.inflight, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&fo_pool.active, __ATOMIC_SEQ_CST) && index < fo_pool.job.nthr)
            fo_job_work(&fo_pool.job, index % fo_pool.job.nsh);
        __atomic_sub_fetch(&fo_pool.inflight, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static void fo_pool_after_fork(void)
{
    pthread_mutex_init(&fo_pool.lock, NULL);
    pthread_mutex_init(&fo_pool.sleep, NULL);
    pthread_cond_init(&fo_pool.wake, NULL);
    fo_pool.nworkers = fo_pool.sleepers = fo_pool.active = fo_pool.inflight = 0;
    fo_pool.backoff = fo_pool.skip = 0;
    fo_pool.master_cpu = -1;
    memset(fo_slots, 0, sizeof fo_slots);
}

/* Start workers until there are `want`; under `lock`. Returns how many there are. */
static int fo_pool_grow(int want)
{
    static int started = 0;
    if (!started) {
        const char *policy = getenv("OMP_WAIT_POLICY");
        fo_pool.spin_ns = (policy && strcasecmp(policy, "passive") == 0) ? 0 : FO_SPIN_NS;
        pthread_atfork(NULL, NULL, fo_pool_after_fork);
        started = 1;
    }
    if (fo_pool.nworkers >= want) return fo_pool.nworkers;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* signals stay with the Python threads */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* the workers start away from the master's CPU, for the reason they are woken away from
     * it (see "Sharing the master's CPU"), and take the master's mask when they start */
    fo_mask mask, other;
    int away = fo_get_mask(&mask) && fo_mask_without(&mask, fo_cpu(), &other) &&
               fo_attr_mask(&attr, &other);
    while (fo_pool.nworkers < want) {
        pthread_t t;
        if (fo_pool.nworkers == FO_MAX_SLOTS && away) { /* no slot to take the mask back */
            if (!fo_attr_mask(&attr, &mask)) break;
            away = 0;
        }
        if (fo_pool.nworkers < FO_MAX_SLOTS) {
            pthread_mutex_lock(&fo_pool.sleep);
            fo_slots[fo_pool.nworkers].mask = mask;
            fo_slots[fo_pool.nworkers].moved = away;
            pthread_mutex_unlock(&fo_pool.sleep);
        }
        if (pthread_create(&t, &attr, fo_worker, (void *)(intptr_t)(fo_pool.nworkers + 1)))
            break;
        fo_pool.nworkers++;
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return fo_pool.nworkers;
}

/* Run fn over ts[0..nt) on up to nthr threads. Returns 0, or -1 when the pool is busy with
 * another thread's job or backing off (nothing was run). */
static int fo_pool_run(fo_kernel_fn fn, const double *hyper, const fo_tensor *ts, int64_t nt,
                       int64_t total, int nthr)
{
    if (pthread_mutex_trylock(&fo_pool.lock) != 0) return -1;
    if (fo_pool.skip > 0) { /* backing off: see below */
        fo_pool.skip--;
        pthread_mutex_unlock(&fo_pool.lock);
        return -1;
    }
    /* Waking a sleeping worker is a system call the master pays (microseconds, more in a
     * VM): worth it when the job is large, or when steps come back to back (the last one
     * ended within a spin window), since the worker then stays awake for the next ones. A
     * job that wakes no one runs with the workers that are awake, or on the master alone. */
    int asleep = __atomic_load_n(&fo_pool.sleepers, __ATOMIC_SEQ_CST);
    int wake = asleep > 0 && (total >= FO_WAKE_MIN ||
                              fo_now_ns() - __atomic_load_n(&fo_last_ns, __ATOMIC_RELAXED) <
                                  fo_pool.spin_ns);
    if (!wake && asleep > 0 && asleep >= fo_pool.nworkers) {
        pthread_mutex_unlock(&fo_pool.lock);
        return -1;
    }
    int have = fo_pool_grow(nthr - 1) + 1;
    if (nthr > have) nthr = have;
    fo_job *job = &fo_pool.job;
    job->fn = fn;
    job->hyper = hyper;
    job->ts = ts;
    job->nt = nt;
    job->nthr = nthr;
    job->nsh = nthr < FO_MAX_SHARES ? nthr : FO_MAX_SHARES;
    for (int s = 0; s < job->nsh; s++) {
        job->sh[s].lo = s == 0 ? 0 : job->sh[s - 1].hi;
        job->sh[s].hi = s == job->nsh - 1 ? total : (total * (s + 1) / job->nsh) & ~(int64_t)15;
        job->sh[s].next = 0;
    }
    __atomic_store_n(&fo_pool.master_cpu, fo_cpu(), __ATOMIC_RELAXED);
    __atomic_store_n(&fo_pool.active, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&fo_pool.gen, 1, __ATOMIC_SEQ_CST);
    if (wake) {
        int cpu = fo_cpu();
        pthread_mutex_lock(&fo_pool.sleep);
        for (int w = 0; w < fo_pool.nworkers && w < FO_MAX_SLOTS; w++) {
            fo_slot *s = &fo_slots[w];
            fo_mask other;
            if (s->asleep && s->mask_ok && !s->moved && fo_mask_without(&s->mask, cpu, &other))
                s->moved = fo_set_mask(s->tid, &other);
        }
        pthread_cond_broadcast(&fo_pool.wake);
        pthread_mutex_unlock(&fo_pool.sleep);
    }
    int64_t t0 = fo_now_ns();
    int64_t chunks = fo_job_work(job, 0);
    __atomic_store_n(&fo_pool.active, 0, __ATOMIC_SEQ_CST);
    int64_t t1 = 0;
    for (unsigned i = 0; __atomic_load_n(&fo_pool.inflight, __ATOMIC_SEQ_CST) != 0; i++) {
        if (i == 0) t1 = fo_now_ns();
        if (i < 256) fo_pause();
        else sched_yield(); /* a worker descheduled in its chunk may need this core */
    }
    /* Back off under load: a wait far longer than one of the master's own chunks means a
     * worker was descheduled inside its chunk (another process took its core). Then the next
     * jobs run on the calling thread alone, 4 of them after the first such wait and twice as
     * many after each further one, up to FO_BACKOFF_MAX; every job without such a wait halves
     * the length again. On a quiet machine this never triggers. */
    if (t1 != 0) {
        int64_t t2 = fo_now_ns(), per_chunk = (t1 - t0) / (chunks > 0 ? chunks : 1);
        if (t2 - t1 > FO_LATE_NS + 2 * per_chunk) {
            fo_pool.backoff = fo_pool.backoff ? 2 * fo_pool.backoff : 4;
            if (fo_pool.backoff > FO_BACKOFF_MAX) fo_pool.backoff = FO_BACKOFF_MAX;
            fo_pool.skip = fo_pool.backoff;
        } else {
            fo_pool.backoff /= 2;
        }
    } else {
        fo_pool.backoff /= 2;
    }
    pthread_mutex_unlock(&fo_pool.lock);
    return 0;
}
#endif

/* Tensors whose first lines are prefetched ahead of the one updated: a step over many small
 * tensors (each in its own allocation, out of the hardware prefetcher's reach) then waits
 * for their memory a few tensors at once, not one array after the other. */
#define FO_TENSOR_AHEAD 4

static inline void fo_prefetch_tensor(const fo_tensor *t)
{
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(t->param, 1);
    __builtin_prefetch(t->grad, 0);
    for (int j = 0; j < 3; j++)
        if (t->state[j] != NULL) __builtin_prefetch(t->state[j], 1);
#else
    (void)t;
#endif
}

void fo_run_threads(fo_kernel_fn fn, const double *hyper, const fo_tensor *ts, int64_t nt,
                    int nthr)
{
    int64_t total = 0;
    for (int64_t k = 0; k < nt; k++) total += ts[k].numel;
    if ((int64_t)nthr > (total + 15) / 16) nthr = (int)((total + 15) / 16);
#ifdef FO_POOL
    if (nthr > 1 && fo_pool_run(fn, hyper, ts, nt, total, nthr) == 0) {
        __atomic_store_n(&fo_last_ns, fo_now_ns(), __ATOMIC_RELAXED);
        return;
    }
#endif
    for (int64_t k = 0; k < nt; k++) {
        if (k + FO_TENSOR_AHEAD < nt) fo_prefetch_tensor(&ts[k + FO_TENSOR_AHEAD]);
        if (ts[k].numel > 0) fn(hyper, &ts[k], 0, ts[k].numel);
    }
#ifdef FO_POOL
    if (nthr > 1) __atomic_store_n(&fo_last_ns, fo_now_ns(), __ATOMIC_RELAXED);
#endif
}

/* The threshold, 2 * FO_GRAIN = 65536 elements, is measured: `python
 * benchmarks/bench_threads.py threshold` times one thread against fo_run_threads forced on 2
 * threads for the cheapest kernel (SGD without momentum, float32, in cache) and for Adam. On
 * the 2-vCPU development machine (shared with other work: rough numbers), 1 thread / 2
 * threads with steps back to back was 0.73 to 0.94 for SGD below 32768 elements, 0.96 at
 * 49152, 1.49 at 65536 and 2.58 at 262144; Adam was even below 65536 and 1.70 to 1.89 from
 * 65536 to 131072. With 500 us of other work between steps it was 1.0 at every size (sleeping
 * workers are not woken for such groups). A bare loop whose helpers never sleep paid from
 * 16384 elements of SGD (1.40). Below 65536 threads lose for cheap kernels and gain little
 * for heavy ones, so one thread runs there. */
void fo_run(fo_kernel_fn fn, const double *hyper, const fo_tensor *ts, int64_t nt, int serial)
{
    int64_t total = 0;
    for (int64_t k = 0; k < nt; k++) total += ts[k].numel;
    int nthr = (serial || total < 2 * (int64_t)FO_GRAIN) ? 1 : fo_get_num_threads();
    if ((int64_t)nthr > total / FO_GRAIN) nthr = (int)(total / FO_GRAIN);
    fo_run_threads(fn, hyper, ts, nt, nthr);
}

/* Step counters and per-tensor scalars of one group, in list order. A pure prepare is a
 * function of the step alone, so a tensor at the same step as the one before it (the usual
 * case) copies that tensor's scalars. */
static void fo_prepare_group(const fo_kernel *k, const fo_group *g)
{
    double prev = 0.0;
    for (int64_t i = 0; i < g->nt; i++) {
        fo_tensor *t = &g->ts[i];
#if defined(__GNUC__) || defined(__clang__)
        if (i + 2 * FO_TENSOR_AHEAD < g->nt && g->ts[i + 2 * FO_TENSOR_AHEAD].step != NULL)
            __builtin_prefetch(g->ts[i + 2 * FO_TENSOR_AHEAD].step, 1);
#endif
        if (t->storage & FO_STORAGE_SR) t->rkey = fo_round_key(t->seed, g->round_key);
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

float fo_q8_encode(int fmt, const float *x, uint8_t *codes, int64_t n)
{
    return fo_q8_store(fmt, x, codes, n);
}

void fo_q8_decode(int fmt, const uint8_t *codes, float scale, float *x, int64_t n)
{
    fo_q8_decode_block(fmt, codes, scale, x, n);
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
