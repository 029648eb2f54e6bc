/*
 * khod-counters: a C workload that keeps a hash table of counters in khod
 * memory and carries it across a handover with libkhodclient alone.
 *
 *   khod-counters run    [-s SOCKET] [-n SESSION] [-m MIB] [-w WRITERS] [-d DUMP]
 *   khod-counters verify [-s SOCKET] [-n SESSION] [-d DUMP] [--run]
 *
 * run: allocate MIB MiB of 2 MiB folios, map them, preserve them and describe
 * them in the session's KHO tree (/table: layout and folio list). WRITERS
 * threads then count random keys into the open-addressing table (atomic
 * increments, keys claimed by compare-and-swap). On FINALIZE the main thread
 * pauses the writers, waits until every one has stopped, and records the
 * table's checksum and the sum of all counters in the tree before answering
 * ok; on UNFREEZE (finalize undone) the writers resume; on the handover
 * event the process exits, as a kexec would end it.
 *
 * verify: in the successor, reattach the session, read the layout, checksum
 * and total from the incoming tree, restore the folios, map them and check
 * that the table is byte for byte what was there at FINALIZE. With --run it
 * then preserves the table again and carries on counting (ready for the
 * next handover).
 *
 * DUMP: the table's bytes are written there at FINALIZE (run) and after
 * restoring (verify), so a test can compare them. Progress goes to stdout
 * as "report {json}" lines. Exit status: 0 done, 1 verification failed,
 * 2 a khod call failed, 64 usage.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "khodclient.h"

#define ORDER 9 /* 2 MiB folios */
#define FOLIO ((size_t)KHOD_FOLIO_SIZE(ORDER))
#define MAGIC 0x31746e636f686bULL /* "khocnt1" */

typedef struct {
    _Atomic uint64_t key; /* 0: free */
    _Atomic uint64_t count;
} bucket;

#define PER_FOLIO (FOLIO / sizeof(bucket))

typedef struct {
    uint64_t magic, nbuckets, order, nfolios;
} layout;

typedef struct {
    khod_client *c;
    const char *dump;
    size_t nfolios;
    uint64_t *phys;
    bucket **folio; /* mapping of each folio */
    uint64_t nbuckets;

    int writers;
    pthread_t *threads;
    atomic_bool stop, pause;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int paused;                   /* writers parked */
    _Atomic uint64_t increments;  /* done by all writers (only read while paused) */
    uint64_t finalizes;
} table;

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

static int die(khod_client *c, const char *what, int err)
{
    fprintf(stderr, "khod-counters: %s: %s (%s: %s)\n", what, strerror(-err),
            c ? khod_errcode(c) : "", c ? khod_errmsg(c) : "");
    return 2;
}

static bucket *at(table *t, uint64_t i) { return &t->folio[i / PER_FOLIO][i % PER_FOLIO]; }

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

/* Count key k: find its bucket (or claim a free one) by linear probing. */
static void count(table *t, uint64_t k)
{
    for (uint64_t i = mix(k) % t->nbuckets;; i = (i + 1) % t->nbuckets) {
        bucket *b = at(t, i);
        uint64_t seen = atomic_load_explicit(&b->key, memory_order_acquire);
        if (seen == 0) {
            uint64_t expect = 0;
            if (atomic_compare_exchange_strong(&b->key, &expect, k))
                seen = k;
            else
                seen = expect;
        }
        if (seen == k) {
            atomic_fetch_add_explicit(&b->count, 1, memory_order_relaxed);
            return;
        }
    }
}

static void *writer(void *arg)
{
    table *t = arg;
    uint64_t x = mix((uint64_t)(uintptr_t)&x ^ (uint64_t)pthread_self());
    uint64_t keys = t->nbuckets / 2; /* load factor at most 1/2 */
    while (!atomic_load(&t->stop)) {
        if (atomic_load(&t->pause)) {
            pthread_mutex_lock(&t->mu);
            t->paused++;
            pthread_cond_broadcast(&t->cv);
            while (atomic_load(&t->pause) && !atomic_load(&t->stop))
                pthread_cond_wait(&t->cv, &t->mu);
            t->paused--;
            pthread_mutex_unlock(&t->mu);
            continue;
        }
        for (int i = 0; i < 256; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            count(t, 1 + x % keys);
        }
        atomic_fetch_add_explicit(&t->increments, 256, memory_order_relaxed);
    }
    return NULL;
}

static void pause_writers(table *t)
{
    pthread_mutex_lock(&t->mu);
    atomic_store(&t->pause, true);
    while (t->paused < t->writers)
        pthread_cond_wait(&t->cv, &t->mu);
    pthread_mutex_unlock(&t->mu);
}

static void resume_writers(table *t)
{
    pthread_mutex_lock(&t->mu);
    atomic_store(&t->pause, false);
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

/* FNV-1a over the table's 64-bit words, folio by folio; also the sum of all counters. */
static uint64_t checksum(table *t, uint64_t *total)
{
    uint64_t h = 0xcbf29ce484222325ULL, sum = 0;
    for (size_t f = 0; f < t->nfolios; f++) {
        const uint64_t *w = (const uint64_t *)t->folio[f];
        for (size_t i = 0; i < FOLIO / 8; i++) {
            h = (h ^ w[i]) * 0x100000001b3ULL;
            if (i & 1)
                sum += w[i];
        }
    }
    *total = sum;
    return h;
}

static int dump(table *t)
{
    if (!t->dump)
        return 0;
    FILE *f = fopen(t->dump, "wb");
    if (!f)
        return -errno;
    for (size_t i = 0; i < t->nfolios; i++)
        if (fwrite(t->folio[i], FOLIO, 1, f) != 1) {
            fclose(f);
            return -EIO;
        }
    return fclose(f) ? -errno : 0;
}

static int set_prop(khod_client *c, const char *name, const void *v, size_t n)
{
    int s = khod_remove_prop(c, "/table", name, NULL, NULL);
    if (s < 0 && s != -ENOENT)
        return s;
    return khod_add_prop(c, "/table", name, v, n, NULL);
}

static int on_finalize(khod_client *c, const khod_event *ev, char *reason, size_t size,
                       void *arg)
{
    table *t = arg;
    pause_writers(t); /* the table must not change between checksum and handover */
    uint64_t total, sum = checksum(t, &total);
    uint64_t incr = atomic_load(&t->increments);
    if (total != incr) {
        snprintf(reason, size, "table inconsistent: counters sum to %llu, %llu increments made",
                 (unsigned long long)total, (unsigned long long)incr);
        resume_writers(t);
        return KHOD_VETO;
    }
    int s;
    if ((s = set_prop(c, "checksum", &sum, sizeof sum)) < 0 ||
        (s = set_prop(c, "total", &total, sizeof total)) < 0) {
        snprintf(reason, size, "recording the checksum: %s", khod_errmsg(c));
        resume_writers(t);
        return s;
    }
    if ((s = dump(t)) < 0) {
        snprintf(reason, size, "dumping the table: %s", strerror(-s));
        resume_writers(t);
        return s;
    }
    t->finalizes++;
    printf("report {\"event\": \"finalize\", \"token\": %llu, \"checksum\": \"%016llx\", "
           "\"total\": %llu}\n",
           (unsigned long long)ev->token, (unsigned long long)sum, (unsigned long long)total);
    printf("[counters] FINALIZE: writers paused, checksum %016llx over %llu counts recorded\n",
           (unsigned long long)sum, (unsigned long long)total);
    fflush(stdout);
    return 0; /* writers stay paused: the memory is frozen until unfreeze or handover */
}

static int on_unfreeze(khod_client *c, const khod_event *ev, char *reason, size_t size,
                       void *arg)
{
    (void)c, (void)reason, (void)size;
    resume_writers(arg);
    printf("report {\"event\": \"unfreeze\", \"token\": %llu}\n", (unsigned long long)ev->token);
    fflush(stdout);
    return 0;
}

static int map_all(table *t)
{
    t->folio = calloc(t->nfolios, sizeof *t->folio);
    if (!t->folio)
        return -ENOMEM;
    for (size_t i = 0; i < t->nfolios; i++) {
        void *m;
        int s = khod_map(t->c, t->phys[i], FOLIO, &m);
        if (s < 0)
            return s;
        t->folio[i] = m;
    }
    t->nbuckets = (uint64_t)t->nfolios * PER_FOLIO;
    return 0;
}

/* Preserve the table and describe it in the tree, then count until handover or a signal. */
static int serve(table *t)
{
    khod_client *c = t->c;
    int s;
    layout l = {MAGIC, t->nbuckets, ORDER, t->nfolios};
    if ((s = khod_preserve_folios(c, t->phys, t->nfolios, NULL, ORDER)) < 0)
        return die(c, "preserve_folios", s);
    if ((s = khod_add_node(c, "/table", NULL)) < 0)
        return die(c, "add_node /table", s);
    if ((s = set_prop(c, "layout", &l, sizeof l)) < 0 ||
        (s = set_prop(c, "folios", t->phys, t->nfolios * sizeof *t->phys)) < 0)
        return die(c, "add_prop", s);
    if ((s = khod_subscribe(c, on_finalize, on_unfreeze, t)) < 0)
        return die(c, "subscribe", s);

    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    t->threads = calloc((size_t)t->writers, sizeof *t->threads);
    if (!t->threads)
        return die(c, "threads", -ENOMEM);
    uint64_t from = atomic_load(&t->increments);
    for (int i = 0; i < t->writers; i++)
        pthread_create(&t->threads[i], NULL, writer, t);
    /* ready once the table is live: every writer could have counted a batch */
    while (atomic_load(&t->increments) < from + 256 * (uint64_t)t->writers)
        nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
    printf("report {\"event\": \"ready\", \"folios\": %zu, \"buckets\": %llu, \"writers\": %d}\n",
           t->nfolios, (unsigned long long)t->nbuckets, t->writers);
    fflush(stdout);

    int rc = 0;
    while (!interrupted) {
        s = khod_dispatch(c, 200);
        if (s >= 0)
            continue;
        uint64_t gen;
        if (khod_handed_over(c, &gen)) {
            printf("report {\"event\": \"handover\", \"generation\": %llu, \"finalizes\": %llu}\n",
                   (unsigned long long)gen, (unsigned long long)t->finalizes);
            printf("[counters] the daemon handed over; exiting as a kexec would end this "
                   "process\n");
            fflush(stdout);
        } else {
            rc = die(c, "dispatch", s);
        }
        break;
    }
    atomic_store(&t->stop, true);
    resume_writers(t);
    for (int i = 0; i < t->writers; i++)
        pthread_join(t->threads[i], NULL);
    free(t->threads);
    return rc;
}

static int get_u64_prop(khod_client *c, const char *name, uint64_t *v)
{
    void *p;
    size_t n;
    int s = khod_get_prop(c, "/table", name, "in", &p, &n);
    if (s < 0)
        return s;
    if (n != sizeof *v) {
        free(p);
        return -EINVAL;
    }
    memcpy(v, p, sizeof *v);
    free(p);
    return 0;
}

static int verify(table *t, bool then_run)
{
    khod_client *c = t->c;
    void *p;
    size_t n;
    int s;
    layout l;
    if ((s = khod_get_prop(c, "/table", "layout", "in", &p, &n)) < 0)
        return die(c, "get_prop layout", s);
    bool ok = n == sizeof l;
    if (ok)
        memcpy(&l, p, sizeof l);
    free(p);
    if (!ok || l.magic != MAGIC || l.order != ORDER || l.nbuckets != l.nfolios * PER_FOLIO) {
        fprintf(stderr, "khod-counters: the incoming layout is not this program's\n");
        return 1;
    }
    if ((s = khod_get_prop(c, "/table", "folios", "in", &p, &n)) < 0)
        return die(c, "get_prop folios", s);
    if (n != l.nfolios * sizeof(uint64_t)) {
        free(p);
        fprintf(stderr, "khod-counters: the folio list has %zu bytes\n", n);
        return 1;
    }
    t->nfolios = l.nfolios;
    t->phys = p;
    uint64_t want_sum, want_total;
    if ((s = get_u64_prop(c, "checksum", &want_sum)) < 0 ||
        (s = get_u64_prop(c, "total", &want_total)) < 0)
        return die(c, "get_prop checksum/total", s);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint8_t *orders = malloc(t->nfolios);
    if (!orders)
        return die(c, "restore", -ENOMEM);
    if ((s = khod_restore_folios(c, t->phys, t->nfolios, orders)) < 0) {
        free(orders);
        return die(c, "restore_folios", s);
    }
    for (size_t i = 0; i < t->nfolios; i++)
        if (orders[i] != ORDER) {
            fprintf(stderr, "khod-counters: folio %zu came back with order %u\n", i, orders[i]);
            free(orders);
            return 1;
        }
    free(orders);
    if ((s = map_all(t)) < 0)
        return die(c, "map", s);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double restore_ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    uint64_t total, sum = checksum(t, &total);
    if ((s = dump(t)) < 0)
        fprintf(stderr, "khod-counters: dump: %s\n", strerror(-s));
    bool good = sum == want_sum && total == want_total;
    printf("report {\"event\": \"verified\", \"ok\": %s, \"checksum\": \"%016llx\", "
           "\"expected\": \"%016llx\", \"total\": %llu, \"folios\": %zu, \"bytes\": %zu, "
           "\"restore_ms\": %.2f}\n",
           good ? "true" : "false", (unsigned long long)sum, (unsigned long long)want_sum,
           (unsigned long long)total, t->nfolios, t->nfolios * FOLIO, restore_ms);
    printf("[counters] restored %zu folios in %.2f ms; checksum %s (%016llx, %llu counts)\n",
           t->nfolios, restore_ms, good ? "matches" : "DOES NOT MATCH", (unsigned long long)sum,
           (unsigned long long)total);
    fflush(stdout);
    if (!good)
        return 1;
    if (!then_run)
        return 0;
    atomic_store(&t->increments, total);
    return serve(t);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"socket", required_argument, 0, 's'}, {"session", required_argument, 0, 'n'},
        {"mib", required_argument, 0, 'm'},    {"writers", required_argument, 0, 'w'},
        {"dump", required_argument, 0, 'd'},   {"run", no_argument, 0, 'r'},
        {0, 0, 0, 0},
    };
    const char *sock = NULL, *session = "counters";
    long mib = 8;
    bool then_run = false;
    table t = {.writers = 2};
    int o;
    while ((o = getopt_long(argc, argv, "s:n:m:w:d:r", opts, NULL)) != -1) {
        switch (o) {
        case 's': sock = optarg; break;
        case 'n': session = optarg; break;
        case 'm': mib = strtol(optarg, NULL, 10); break;
        case 'w': t.writers = atoi(optarg); break;
        case 'd': t.dump = optarg; break;
        case 'r': then_run = true; break;
        default: return 64;
        }
    }
    if (optind != argc - 1 || (strcmp(argv[optind], "run") && strcmp(argv[optind], "verify")) ||
        mib < 2 || mib % 2 || t.writers < 1 || t.writers > 64) {
        fprintf(stderr, "usage: khod-counters run|verify [-s SOCKET] [-n SESSION] "
                        "[-m MIB (even)] [-w WRITERS] [-d DUMP] [--run]\n");
        return 64;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    int s = khod_connect(sock, &t.c);
    if (s < 0) {
        fprintf(stderr, "khod-counters: cannot reach khod at %s: %s\n",
                sock ? sock : "$KHOD_SOCKET", strerror(-s));
        return 2;
    }
    khod_hello_info h;
    int rc;
    if ((s = khod_hello(t.c, session, true, &h)) < 0) {
        rc = die(t.c, "hello", s);
    } else if (!strcmp(argv[optind], "verify")) {
        rc = h.incoming ? verify(&t, then_run) : (fprintf(stderr, "khod-counters: nothing "
                                                                  "was handed over to '%s'\n",
                                                          session),
                                                  1);
    } else {
        t.nfolios = (size_t)mib / 2;
        t.phys = calloc(t.nfolios, sizeof *t.phys);
        if (!t.phys)
            rc = die(t.c, "alloc", -ENOMEM);
        else if ((s = khod_alloc_folios(t.c, ORDER, t.nfolios, t.phys)) < 0)
            rc = die(t.c, "alloc_folios", s);
        else if ((s = map_all(&t)) < 0)
            rc = die(t.c, "map", s);
        else
            rc = serve(&t);
    }
    for (size_t i = 0; t.folio && i < t.nfolios; i++)
        if (t.folio[i])
            munmap(t.folio[i], FOLIO);
    free(t.folio);
    free(t.phys);
    khod_close(t.c);
    return rc;
}
