/* A small pthread pool with static partitioning: thread tid always gets the
 * same contiguous range of a given job, and no job splits a reduction, so the
 * result never depends on scheduling or on the number of threads. */
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "cpu/cpu.h"

struct cpu_pool {
    int n;
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    uint64_t gen;               /* bumped per job; workers wait for a change */
    int pending;                /* workers still running the current job */
    bool quit;
    cpu_task_fn fn;
    void *ctx;
    int64_t n_items;
};

typedef struct { cpu_pool *p; int tid; } worker_arg;

static void run_share(cpu_pool *p, cpu_task_fn fn, void *ctx, int64_t n_items, int tid) {
    int64_t i0 = n_items * tid / p->n, i1 = n_items * (tid + 1) / p->n;
    if (i1 > i0) fn(ctx, i0, i1, tid);
}

static void *worker(void *arg) {
    worker_arg *wa = arg;
    cpu_pool *p = wa->p;
    int tid = wa->tid;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        while (p->gen == seen && !p->quit) pthread_cond_wait(&p->start, &p->mu);
        if (p->quit) { pthread_mutex_unlock(&p->mu); return NULL; }
        seen = p->gen;
        cpu_task_fn fn = p->fn; void *ctx = p->ctx; int64_t n_items = p->n_items;
        pthread_mutex_unlock(&p->mu);
        run_share(p, fn, ctx, n_items, tid);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->mu);
    }
}

int cpu_default_threads(int n_threads) {
    if (n_threads > 0) return n_threads;
    const char *e = getenv("DS4_THREADS");
    if (e && *e) {
        int v = atoi(e);
        if (v > 0) return v;
    }
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c > 0 ? (int)c : 1;
}

cpu_pool *cpu_pool_new(int n_threads) {
    cpu_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n_threads < 1 ? 1 : n_threads > 256 ? 256 : n_threads;
    p->th = calloc((size_t)p->n, sizeof *p->th);
    if (!p->th) { free(p); return NULL; }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int i = 1; i < p->n; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) { p->n = i; cpu_pool_free(p); return NULL; }
        wa->p = p; wa->tid = i;
        if (pthread_create(&p->th[i], NULL, worker, wa) != 0) { free(wa); p->n = i; cpu_pool_free(p); return NULL; }
    }
    return p;
}

void cpu_pool_free(cpu_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->quit = true;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    free(p->th); free(p);
}

int cpu_pool_threads(const cpu_pool *p) { return p->n; }

void cpu_pool_run(cpu_pool *p, int64_t n, cpu_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (p->n == 1 || n == 1) { fn(ctx, 0, n, 0); return; }
    pthread_mutex_lock(&p->mu);
    p->fn = fn; p->ctx = ctx; p->n_items = n;
    p->pending = p->n - 1;
    p->gen++;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    run_share(p, fn, ctx, n, 0);
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
