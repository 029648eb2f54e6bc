/*
 * khod-c-bench: libkhodclient's speed, for bench/c_client.py. One JSON line out.
 *
 *   khod-c-bench ping    SOCKET SECONDS     ping round trips/s (against bench/echo.py: the floor)
 *   khod-c-bench rtt     SOCKET SECONDS     unbatched preserve_folio + unpreserve_folio calls/s
 *   khod-c-bench batch   SOCKET N REPEATS   one preserve_folios call of N order-0 folios:
 *                                           best and median folios/s over REPEATS calls
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "khodclient.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int die(khod_client *c, const char *what, int s)
{
    fprintf(stderr, "khod-c-bench: %s: %d %s\n", what, s, c ? khod_errmsg(c) : "");
    return 2;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: khod-c-bench ping|rtt SOCKET SECONDS | batch SOCKET N REPEATS\n");
        return 64;
    }
    const char *mode = argv[1];
    khod_client *c;
    int s = khod_connect(argv[2], &c);
    if (s < 0)
        return die(NULL, "connect", s);
    khod_set_timeout(c, 600000);
    int rc = 0;
    if (!strcmp(mode, "ping") || !strcmp(mode, "rtt")) {
        double seconds = atof(argv[3]);
        bool ping = !strcmp(mode, "ping");
        khod_folio f = {0};
        if (!ping && ((s = khod_hello(c, "cbench-rtt", false, NULL)) < 0 ||
                      (s = khod_alloc_folio(c, 0, &f)) < 0))
            return die(c, "setup", s);
        long n = 0;
        double t0 = now(), end = t0 + seconds, t;
        do {
            for (int i = 0; i < 100; i++) {
                if (ping)
                    s = khod_ping(c);
                else if (i % 2 == 0)
                    s = khod_preserve_folio(c, f.phys, 0, NULL);
                else
                    s = khod_unpreserve_folio(c, f.phys, 0, NULL);
                if (s < 0)
                    return die(c, mode, s);
            }
            n += 100;
        } while ((t = now()) < end);
        printf("{\"%s_per_s\": %.0f}\n", ping ? "ping_rtt" : "preserve_rtt", (double)n / (t - t0));
    } else if (!strcmp(mode, "batch")) {
        size_t n = strtoull(argv[3], NULL, 0);
        int repeats = atoi(argv[4]);
        size_t per_gib = (size_t)1 << 18; /* order-0 folios in a 1 GiB folio */
        size_t big = (n + per_gib - 1) / per_gib;
        uint64_t *gib = calloc(big, sizeof *gib), *phys = calloc(n, sizeof *phys);
        double *times = calloc((size_t)repeats, sizeof *times);
        if (!gib || !phys || !times || repeats < 1)
            return die(c, "memory", -12);
        if ((s = khod_hello(c, "cbench-batch", false, NULL)) < 0 ||
            (s = khod_alloc_folios(c, 18, big, gib)) < 0)
            return die(c, "setup", s);
        for (size_t i = 0; i < n; i++)
            phys[i] = gib[i / per_gib] + 4096 * (i % per_gib);
        for (int r = 0; r < repeats; r++) {
            double t0 = now();
            if ((s = khod_preserve_folios(c, phys, n, NULL, 0)) < 0)
                return die(c, "preserve_folios", s);
            times[r] = now() - t0;
            if ((s = khod_unpreserve_folios(c, phys, n, NULL, 0)) < 0)
                return die(c, "unpreserve_folios", s);
        }
        qsort(times, (size_t)repeats, sizeof *times, cmp);
        printf("{\"batched_preserve_folios\": %zu, \"batched_preserve_folios_per_s\": %.0f, "
               "\"batched_preserve_folios_per_s_median\": %.0f}\n",
               n, (double)n / times[0], (double)n / times[repeats / 2]);
        free(gib);
        free(phys);
        free(times);
    } else {
        rc = 64;
    }
    khod_close(c);
    return rc;
}
