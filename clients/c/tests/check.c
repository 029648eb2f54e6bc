/*
 * khod-c-check SOCKET CASE [ARG]: libkhodclient against a real daemon, one
 * case per run (tests/test_c_client.py starts the daemon and picks the case).
 * Prints "FAIL file:line: what" for each failed check and exits 1 if any.
 *
 *   api              every call once, results and errors as docs/protocol.md says
 *   wrong-session    requests for a session the connection does not speak for
 *   frozen           EBUSY while finalized; alloc still works; unfreeze lifts it
 *   veto             a subscriber vetoes a finalize with a reason, then lets it pass
 *   eperm PHYS UID   as uid UID (dropped here): another user's memory, root-only calls
 *   oversized        requests too large for the daemon or the client
 *   handover-prep    before a handover: memory written and preserved three ways
 *   handover-check   in the successor: restored three ways, bytes and tree intact
 *   gone             the daemon is killed while a call waits ("in-call" on stdout);
 *                    the test writes "dead" to stdin once it has reaped it
 */
#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "check.h"
#include "khodclient.h"

/* A call that must succeed. */
#define OK(c, call)                                                                        \
    do {                                                                                   \
        int s_ = (call);                                                                   \
        CHECK(s_ >= 0, "%s -> %d %s: %s", #call, s_, khod_errcode(c), khod_errmsg(c));      \
    } while (0)

/* A call that must fail with -err, its message containing `part`. */
#define ERR(c, err, part, call)                                                           \
    do {                                                                                  \
        int s_ = (call);                                                                  \
        CHECK(s_ == -(err) && strstr(khod_errmsg(c), part) != NULL,                      \
              "%s -> %d (want %d) %s: %s (want '%s')", #call, s_, -(err), khod_errcode(c), \
              khod_errmsg(c), part);                                                      \
    } while (0)

static khod_client *open_client(const char *sock, const char *session)
{
    khod_client *c;
    int s = khod_connect(sock, &c);
    if (s < 0) {
        printf("FAIL connect %s: %s\n", sock, strerror(-s));
        exit(1);
    }
    if (session)
        OK(c, khod_hello(c, session, false, NULL));
    return c;
}

static void case_api(const char *sock)
{
    khod_client *c = open_client(sock, NULL);
    khod_hello_info h;
    OK(c, khod_hello(c, "capi", true, &h));
    CHECK(h.created && h.persistent && !h.incoming && h.uid == getuid() &&
              !strcmp(h.session, "capi"),
          "hello info");
    OK(c, khod_hello(c, "capi", false, &h));
    CHECK(!h.created && h.persistent, "reattach keeps persistent");
    ERR(c, EINVAL, "", khod_hello(c, "other", false, NULL));
    OK(c, khod_ping(c));

    khod_region_info g;
    OK(c, khod_region(c, &g));
    CHECK(g.fd >= 0 && !strcmp(g.backend, "file") && g.map_offset == 0 && g.size > 0,
          "region %s fd %d", g.backend, g.fd);

    khod_folio f;
    OK(c, khod_alloc_folio(c, 2, &f));
    CHECK(f.order == 2 && f.phys >= g.base && f.phys % KHOD_FOLIO_SIZE(2) == 0, "alloc");
    unsigned char *m;
    OK(c, khod_map(c, f.phys, KHOD_FOLIO_SIZE(2), (void **)&m));
    memset(m, 0xa5, KHOD_FOLIO_SIZE(2));
    unsigned o = 99;
    OK(c, khod_preserve_folio(c, f.phys, -1, &o));
    CHECK(o == 2, "preserved order %u", o);
    ERR(c, EEXIST, "already preserved", khod_preserve_folio(c, f.phys, -1, NULL));
    CHECK(!strcmp(khod_errcode(c), "EEXIST"), "errcode %s", khod_errcode(c));
    OK(c, khod_unpreserve_folio(c, f.phys, 2, &o));
    ERR(c, ENOENT, "", khod_unpreserve_folio(c, f.phys, -1, NULL));
    ERR(c, EINVAL, "order 19", khod_preserve_folio(c, f.phys, 19, NULL));
    ERR(c, EINVAL, "", khod_preserve_folio(c, f.phys + 1, -1, NULL));
    void *outside = (void *)1;
    ERR(c, EINVAL, "outside the region", khod_map(c, g.base + g.size, 4096, &outside));
    CHECK(outside == NULL, "a failed map gives NULL");

    /* ranges: the order-2 folio is 16 KiB */
    khod_folio *list = NULL;
    size_t n = 0;
    OK(c, khod_preserve_phys(c, f.phys, KHOD_FOLIO_SIZE(2), &list, &n));
    CHECK(n == 1 && list && list[0].phys == f.phys && list[0].order == 2, "preserve_phys %zu",
          n);
    free(list);
    OK(c, khod_unpreserve_phys(c, f.phys, KHOD_FOLIO_SIZE(2), NULL, &n));
    uint64_t rp[2] = {f.phys, f.phys + 8192}, rs[2] = {4096, 8192}, nf = 0;
    OK(c, khod_preserve_phys_ranges(c, rp, rs, 2, &nf));
    CHECK(nf == 2, "preserve_phys_ranges %llu", (unsigned long long)nf);
    OK(c, khod_unpreserve_phys_ranges(c, rp, rs, 2, &nf));
    CHECK(nf == 2, "unpreserve_phys_ranges");

    /* batches */
    uint64_t phys[16];
    uint8_t orders[16];
    OK(c, khod_alloc_folios(c, 0, 16, phys));
    for (int i = 0; i < 16; i++)
        orders[i] = 0;
    OK(c, khod_preserve_folios(c, phys, 16, orders, -1));
    ERR(c, EEXIST, "", khod_preserve_folios(c, phys, 16, NULL, 0));
    OK(c, khod_unpreserve_folios(c, phys, 16, NULL, 0));
    OK(c, khod_preserve_folios(c, phys, 16, NULL, -1));
    ERR(c, EBUSY, "preserved", khod_free_folios(c, phys, 16));
    OK(c, khod_unpreserve_folios(c, phys, 16, NULL, -1));
    OK(c, khod_free_folios(c, phys, 16));
    ERR(c, ENOENT, "", khod_free_folios(c, phys, 16));
    ERR(c, EINVAL, "count", khod_alloc_folios(c, 0, 0, phys));

    /* the tree */
    bool yes = false;
    OK(c, khod_add_node(c, "/a", &yes));
    CHECK(yes, "add_node created");
    OK(c, khod_add_node(c, "/a", &yes));
    CHECK(!yes, "add_node again");
    ERR(c, ENOENT, "", khod_add_node(c, "/x/y", NULL));
    const char val[] = {1, 2, 0, 3};
    OK(c, khod_add_prop(c, "/a", "v", val, sizeof val, &yes));
    CHECK(yes, "add_prop added");
    OK(c, khod_add_prop(c, "/a", "v", val, sizeof val, &yes));
    CHECK(!yes, "add_prop same bytes is a no-op");
    ERR(c, EEXIST, "", khod_add_prop(c, "/a", "v", "x", 1, NULL));
    OK(c, khod_add_string_prop(c, "/a", "s", "hello", NULL));
    OK(c, khod_add_node(c, "/a/kid", NULL));
    khod_node *node = NULL;
    OK(c, khod_get_node(c, "/a", "out", &node));
    CHECK(node && node->nprops == 2 && !strcmp(node->props[0], "s") &&
              !strcmp(node->props[1], "v") && node->nchildren == 1 &&
              !strcmp(node->children[0], "kid"),
          "get_node /a: %zu props, %zu children", node ? node->nprops : 0,
          node ? node->nchildren : 0);
    free(node);
    node = (khod_node *)1;
    ERR(c, ENOENT, "", khod_get_node(c, "/nope", "out", &node));
    CHECK(node == NULL, "a failed get_node gives NULL");
    ERR(c, ENOENT, "", khod_get_node(c, "/a", NULL, &node)); /* nothing incoming */
    ERR(c, EINVAL, "", khod_get_node(c, "/a", "sideways", &node));
    OK(c, khod_remove_node(c, "/a/kid"));
    void *got = NULL;
    size_t len = 0;
    OK(c, khod_get_prop(c, "/a", "s", "out", &got, &len));
    CHECK(len == 6 && got && !memcmp(got, "hello", 6), "string prop");
    free(got);
    OK(c, khod_remove_prop(c, "/a", "v", &got, &len));
    CHECK(len == sizeof val && !memcmp(got, val, len), "removed bytes");
    free(got);
    ERR(c, ENOENT, "", khod_get_prop(c, "/a", "v", "out", &got, &len));
    ERR(c, ENOENT, "", khod_get_prop(c, "/a", "s", NULL, &got, &len)); /* nothing incoming */
    OK(c, khod_remove_node(c, "/a"));
    ERR(c, EINVAL, "", khod_remove_node(c, "/"));

    /* restore without a handover; status */
    khod_folio r;
    ERR(c, ENOENT, "", khod_restore_folio(c, f.phys, &r));
    ERR(c, ENOENT, "", khod_restore_folios(c, phys, 2, orders));
    khod_status_info st;
    OK(c, khod_status(c, &st));
    CHECK(!strcmp(st.state, "active") && st.sessions >= 1 && st.pid > 0 && !st.frozen &&
              st.region_allocated >= KHOD_FOLIO_SIZE(2),
          "status %s sessions %zu", st.state, st.sessions);
    OK(c, khod_free_folio(c, f.phys));
    CHECK(m[0] == 0, "a freed folio is punched out of the memory file");
    munmap(m, KHOD_FOLIO_SIZE(2));
    OK(c, khod_subscribe(c, NULL, NULL, NULL));
    CHECK(khod_dispatch(c, 0) == 0, "nothing to dispatch");

    /* operator calls (this test runs as root) */
    void *dtb = (void *)1;
    ERR(c, ENOENT, "", khod_fdt(c, "out", &dtb, &len)); /* not finalized */
    ERR(c, ENOENT, "", khod_fdt(c, "in", &dtb, &len));  /* not started from a handover */
    ERR(c, EINVAL, "", khod_fdt(c, "up", &dtb, &len));
    uint64_t released = 99;
    OK(c, khod_release_unclaimed(c, NULL, -1, &released));
    CHECK(released == 0, "nothing incoming to release: %llu", (unsigned long long)released);
    ERR(c, ENOENT, "no incoming session", khod_release_unclaimed(c, "nope", -1, NULL));
    ERR(c, EINVAL, "uid", khod_release_unclaimed(c, NULL, (int64_t)1 << 33, NULL));
    khod_client *victim = open_client(sock, "victim");
    khod_folio vf;
    OK(victim, khod_alloc_folio(victim, 1, &vf));
    khod_drop_info d = {0};
    OK(c, khod_drop_session(c, "victim", -1, &d));
    CHECK(d.freed_bytes == KHOD_FOLIO_SIZE(1) && d.released_bytes == 0 &&
              d.connections_closed == 1,
          "drop_session: freed %llu released %llu closed %llu",
          (unsigned long long)d.freed_bytes, (unsigned long long)d.released_bytes,
          (unsigned long long)d.connections_closed);
    ERR(victim, EPROTO, "", khod_ping(victim)); /* its connection was cut off */
    khod_close(victim);
    ERR(c, ENOENT, "no session", khod_drop_session(c, "victim", getuid(), NULL));
    OK(c, khod_ping(c));
    khod_close(c);
}

static void case_wrong_session(const char *sock)
{
    khod_client *none = open_client(sock, NULL);
    ERR(none, EINVAL, "send hello first", khod_alloc_folio(none, 0, NULL));
    ERR(none, EINVAL, "send hello first", khod_region(none, NULL));
    ERR(none, EINVAL, "", khod_hello(none, "bad name!", false, NULL));
    ERR(none, EINVAL, "", khod_hello(none, "khod", false, NULL));
    OK(none, khod_ping(none)); /* errors leave the connection usable */
    khod_close(none);

    khod_client *a = open_client(sock, "wa"), *b = open_client(sock, "wb");
    ERR(a, EINVAL, "", khod_hello(a, "wb", false, NULL)); /* a speaks for wa */
    khod_folio f;
    OK(a, khod_alloc_folio(a, 0, &f));
    ERR(b, EPERM, "", khod_preserve_folio(b, f.phys, 0, NULL));
    ERR(b, ENOENT, "", khod_free_folio(b, f.phys));
    ERR(b, ENOENT, "", khod_unpreserve_folio(b, f.phys, 0, NULL));
    OK(a, khod_preserve_folio(a, f.phys, -1, NULL));
    ERR(b, ENOENT, "", khod_unpreserve_folio(b, f.phys, 0, NULL));
    OK(a, khod_unpreserve_folio(a, f.phys, -1, NULL));
    OK(a, khod_free_folio(a, f.phys));
    khod_close(a);
    khod_close(b);
}

static void case_frozen(const char *sock)
{
    khod_client *c = open_client(sock, "fz"), *op = open_client(sock, NULL);
    khod_folio f, g;
    OK(c, khod_alloc_folio(c, 0, &f));
    OK(c, khod_alloc_folio(c, 0, &g));
    OK(c, khod_preserve_folio(c, f.phys, -1, NULL));
    uint64_t gen = 99;
    khod_status_info st;
    OK(c, khod_status(c, &st));
    OK(op, khod_finalize(op, &gen));
    CHECK(gen == st.generation + 1, "finalize carries generation %llu", (unsigned long long)gen);
    ERR(op, EEXIST, "", khod_finalize(op, NULL));
    ERR(c, EBUSY, "frozen", khod_preserve_folio(c, g.phys, -1, NULL));
    ERR(c, EBUSY, "frozen", khod_unpreserve_folio(c, f.phys, -1, NULL));
    ERR(c, EBUSY, "frozen", khod_preserve_folios(c, &g.phys, 1, NULL, 0));
    ERR(c, EBUSY, "frozen", khod_add_node(c, "/n", NULL));
    OK(c, khod_status(c, &st));
    CHECK(!strcmp(st.state, "finalized") && st.frozen, "state %s", st.state);
    khod_folio h;
    OK(c, khod_alloc_folio(c, 0, &h)); /* allocation is not frozen */
    OK(op, khod_unfreeze(op));
    OK(c, khod_preserve_folio(c, g.phys, -1, NULL));
    OK(c, khod_add_node(c, "/n", NULL));
    ERR(op, ENOENT, "", khod_unfreeze(op));
    ERR(op, EBUSY, "", khod_handover(op, NULL));
    khod_close(c);
    khod_close(op);
}

typedef struct {
    const char *sock;
    atomic_int veto; /* 1: veto, 0: ok */
    atomic_int finalizes, unfreezes;
    atomic_bool subscribed, stop;
} veto_state;

static int veto_finalize(khod_client *c, const khod_event *ev, char *reason, size_t size,
                         void *arg)
{
    veto_state *v = arg;
    (void)c, (void)ev;
    atomic_fetch_add(&v->finalizes, 1);
    if (atomic_load(&v->veto)) {
        snprintf(reason, size, "table is being rebuilt");
        return KHOD_VETO;
    }
    return 0;
}

static int veto_unfreeze(khod_client *c, const khod_event *ev, char *reason, size_t size,
                         void *arg)
{
    (void)c, (void)ev, (void)reason, (void)size;
    atomic_fetch_add(&((veto_state *)arg)->unfreezes, 1);
    return 0;
}

static void *subscriber(void *arg)
{
    veto_state *v = arg;
    khod_client *s = open_client(v->sock, "sub");
    OK(s, khod_subscribe(s, veto_finalize, veto_unfreeze, v));
    atomic_store(&v->subscribed, true);
    while (!atomic_load(&v->stop)) {
        int r = khod_dispatch(s, 50);
        CHECK(r >= 0, "dispatch %d: %s", r, khod_errmsg(s));
        if (r < 0)
            break;
    }
    khod_close(s);
    return NULL;
}

static void case_veto(const char *sock)
{
    veto_state v = {.sock = sock, .veto = 1};
    pthread_t t;
    pthread_create(&t, NULL, subscriber, &v);
    while (!atomic_load(&v.subscribed))
        usleep(1000);
    khod_client *op = open_client(sock, NULL);
    ERR(op, EBUSY, "table is being rebuilt", khod_finalize(op, NULL));
    CHECK(atomic_load(&v.finalizes) == 1, "finalize callback ran %d times",
          atomic_load(&v.finalizes));
    CHECK(atomic_load(&v.unfreezes) == 1, "an aborted finalize runs the UNFREEZE round");
    atomic_store(&v.veto, 0);
    OK(op, khod_finalize(op, NULL));
    OK(op, khod_unfreeze(op));
    CHECK(atomic_load(&v.finalizes) == 2 && atomic_load(&v.unfreezes) == 2, "rounds %d %d",
          atomic_load(&v.finalizes), atomic_load(&v.unfreezes));
    atomic_store(&v.stop, true);
    pthread_join(t, NULL);
    khod_close(op);
}

static void case_eperm(const char *sock, uint64_t victim, uid_t uid)
{
    if (setgroups(0, NULL) < 0 || setgid(uid) < 0 || setuid(uid) < 0) {
        printf("FAIL cannot become uid %u: %s\n", (unsigned)uid, strerror(errno));
        exit(1);
    }
    khod_client *c = open_client(sock, NULL);
    ERR(c, EPERM, "only root may open a session of another user",
        khod_hello_uid(c, "vmm", false, 0, NULL));
    khod_hello_info h;
    OK(c, khod_hello(c, "vmm", false, &h)); /* its own "vmm", not root's */
    CHECK(h.created && h.uid == uid, "own session created %d uid %u", h.created, h.uid);
    ERR(c, EPERM, "", khod_preserve_folio(c, victim, 0, NULL));
    ERR(c, ENOENT, "", khod_free_folio(c, victim));
    ERR(c, ENOENT, "", khod_unpreserve_folio(c, victim, 0, NULL));
    ERR(c, ENOENT, "", khod_restore_folio(c, victim, NULL));
    ERR(c, EPERM, "operator", khod_finalize(c, NULL));
    ERR(c, EPERM, "operator", khod_handover(c, NULL));
    khod_status_info st;
    OK(c, khod_status(c, &st));
    CHECK(st.sessions == 1, "a user sees only its own sessions (%zu)", st.sessions);
    /* what its fd reaches: its own memory file, which holds nothing of root's */
    khod_region_info g;
    OK(c, khod_region(c, &g));
    unsigned char *m;
    OK(c, khod_map(c, victim, 4096, (void **)&m));
    if (m) {
        for (int i = 0; i < 4096; i++)
            if (m[i]) {
                CHECK(0, "another user's bytes are visible at 0x%llx",
                      (unsigned long long)victim);
                break;
            }
        munmap(m, 4096);
    }
    khod_close(c);
}

static void case_oversized(const char *sock)
{
    khod_client *c = open_client(sock, "big");
    OK(c, khod_add_node(c, "/n", NULL));
    size_t big = (size_t)17 << 20;
    char *v = calloc(1, big);
    ERR(c, EINVAL, "", khod_add_prop(c, "/n", "p", v, (size_t)2 << 20, NULL)); /* > bin(1 MiB) */
    OK(c, khod_ping(c));
    ERR(c, EINVAL, "khod_set_max_request", khod_add_prop(c, "/n", "p", v, big, NULL));
    OK(c, khod_ping(c)); /* nothing was sent */
    uint64_t *many = calloc((1 << 20) + 1, sizeof *many);
    ERR(c, EINVAL, "", khod_preserve_folios(c, many, (1 << 20) + 1, NULL, 0)); /* > max_batch */
    OK(c, khod_ping(c));
    khod_set_max_request(c, (size_t)64 << 20);
    ERR(c, EPROTO, "connection", khod_add_prop(c, "/n", "p", v, big, NULL)); /* > max_frame */
    ERR(c, EPROTO, "connection", khod_ping(c)); /* and it stays failed */
    ERR(c, EPROTO, "connection", khod_dispatch(c, 0));
    free(v);
    free(many);
    khod_close(c);
    khod_client *d = open_client(sock, "big"); /* the daemon is fine */
    OK(d, khod_ping(d));
    khod_close(d);
}

/* Busy polling: bad budgets refused (argument and environment), every budget serves calls. */
static void case_busy_poll(const char *sock)
{
    khod_client *c = open_client(sock, "spin");
    ERR(c, EINVAL, "busy poll", khod_set_busy_poll(c, -1));
    ERR(c, EINVAL, "busy poll", khod_set_busy_poll(c, 1000001));
    int budgets[] = {0, 1, 100, 1000000};
    for (size_t i = 0; i < sizeof budgets / sizeof budgets[0]; i++) {
        OK(c, khod_set_busy_poll(c, budgets[i]));
        khod_folio f;
        OK(c, khod_alloc_folio(c, 0, &f));
        for (int k = 0; k < 50; k++) { /* the budget's hits and misses, and the backoff */
            OK(c, khod_preserve_folio(c, f.phys, -1, NULL));
            OK(c, khod_unpreserve_folio(c, f.phys, -1, NULL));
        }
        OK(c, khod_free_folio(c, f.phys));
    }
    khod_close(c);
    const char *bad[] = {"fast", "-1", "1000001", "1.5", "12x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        setenv("KHOCLIENT_BUSY_POLL_US", bad[i], 1);
        khod_client *d = NULL;
        int s = khod_connect(sock, &d);
        CHECK(s == -EINVAL && d == NULL, "KHOCLIENT_BUSY_POLL_US=%s: connect -> %d", bad[i], s);
        khod_close(d);
    }
    setenv("KHOCLIENT_BUSY_POLL_US", "0", 1);
    khod_client *e = open_client(sock, NULL);
    OK(e, khod_ping(e));
    khod_close(e);
    unsetenv("KHOCLIENT_BUSY_POLL_US");
}

typedef struct {
    khod_client *sub;
} gone_state;

/* Says "in-call" once the finalize is waiting on the notifier round (its event arrived). */
static void *announce(void *arg)
{
    gone_state *g = arg;
    struct pollfd p = {.fd = khod_fd(g->sub), .events = POLLIN};
    while (poll(&p, 1, -1) < 0 && errno == EINTR)
        ;
    printf("in-call\n");
    fflush(stdout);
    return NULL;
}

static void case_gone(const char *sock)
{
    gone_state g = {.sub = open_client(sock, "deaf")};
    veto_state v = {.veto = 1};
    OK(g.sub, khod_subscribe(g.sub, veto_finalize, NULL, &v)); /* and never answers */
    khod_client *op = open_client(sock, NULL);
    khod_set_timeout(op, 60000);
    pthread_t t;
    pthread_create(&t, NULL, announce, &g);
    int s = khod_finalize(op, NULL); /* the test kills the daemon meanwhile */
    CHECK(s == -EPROTO && strstr(khod_errmsg(op), "connection closed"), "finalize -> %d %s", s,
          khod_errmsg(op));
    pthread_join(t, NULL);
    /* a dying process closes its sockets one by one: wait until the test has reaped it */
    char line[16];
    if (!fgets(line, sizeof line, stdin) || strcmp(line, "dead\n")) {
        printf("FAIL the test did not say the daemon is dead\n");
        exit(1);
    }
    ERR(op, EPROTO, "connection", khod_ping(op));
    ERR(g.sub, EPROTO, "connection", khod_dispatch(g.sub, 1000));
    CHECK(atomic_load(&v.finalizes) == 0, "no callback runs for a connection that is gone");
    CHECK(!khod_handed_over(g.sub, NULL), "no handover happened");
    khod_close(op);
    khod_close(g.sub);
    khod_client *c;
    CHECK(khod_connect(sock, &c) < 0, "nobody listens any more");
}

/* Fill len bytes at p with a pattern of `seed` (and check it back). */
static void stamp(unsigned char *p, size_t len, uint64_t seed)
{
    for (size_t i = 0; i < len; i++)
        p[i] = (unsigned char)((seed * 0x9e3779b97f4a7c15ULL + i * 131) >> 24);
}

static bool stamped(const unsigned char *p, size_t len, uint64_t seed)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != (unsigned char)((seed * 0x9e3779b97f4a7c15ULL + i * 131) >> 24))
            return false;
    return true;
}

/* Before a handover: a folio, a folio restored as a batch, a range; written and described. */
static void case_handover_prep(const char *sock)
{
    khod_client *c = open_client(sock, NULL);
    OK(c, khod_hello(c, "rs", true, NULL));
    khod_folio a, b, r;
    OK(c, khod_alloc_folio(c, 0, &a));
    OK(c, khod_alloc_folio(c, 2, &b));
    OK(c, khod_alloc_folio(c, 3, &r));
    uint64_t where[3] = {a.phys, b.phys, r.phys};
    size_t sizes[3] = {KHOD_FOLIO_SIZE(0), KHOD_FOLIO_SIZE(2), KHOD_FOLIO_SIZE(3)};
    for (int i = 0; i < 3; i++) {
        void *m;
        OK(c, khod_map(c, where[i], sizes[i], &m));
        if (m) {
            stamp(m, sizes[i], where[i]);
            munmap(m, sizes[i]);
        }
    }
    OK(c, khod_preserve_folio(c, a.phys, -1, NULL));
    OK(c, khod_preserve_folios(c, &b.phys, 1, NULL, -1));
    size_t n = 0;
    OK(c, khod_preserve_phys(c, r.phys, KHOD_FOLIO_SIZE(3), NULL, &n));
    OK(c, khod_add_node(c, "/where", NULL));
    OK(c, khod_add_prop(c, "/where", "phys", where, sizeof where, NULL));
    OK(c, khod_add_string_prop(c, "/where", "note", "three pieces", NULL));
    khod_close(c);
    khod_client *u = open_client(sock, NULL); /* a session nobody will come back for */
    OK(u, khod_hello(u, "unclaimed", true, NULL));
    khod_folio x;
    OK(u, khod_alloc_folio(u, 1, &x));
    OK(u, khod_preserve_folio(u, x.phys, -1, NULL));
    khod_close(u);
}

/* In the successor: each piece back by its own call, bytes intact, exactly once. */
static void case_handover_check(const char *sock)
{
    khod_client *c = open_client(sock, NULL);
    khod_hello_info h;
    OK(c, khod_hello(c, "rs", true, &h));
    uint64_t want = KHOD_FOLIO_SIZE(0) + KHOD_FOLIO_SIZE(2) + KHOD_FOLIO_SIZE(3);
    CHECK(h.incoming && h.created && h.incoming_bytes == want, "hello: incoming %d %llu",
          h.incoming, (unsigned long long)h.incoming_bytes);
    uint64_t *where = NULL;
    size_t len = 0;
    OK(c, khod_get_prop(c, "/where", "phys", "in", (void **)&where, &len));
    if (!where || len != 3 * sizeof *where) {
        CHECK(0, "the incoming tree lost /where/phys (%zu bytes)", len);
        free(where);
        khod_close(c);
        return;
    }
    khod_node *node = NULL;
    OK(c, khod_get_node(c, "/where", NULL, &node));
    CHECK(node && node->nprops == 2 && !strcmp(node->props[0], "note") &&
              !strcmp(node->props[1], "phys") && node->nchildren == 0,
          "incoming /where: %zu props", node ? node->nprops : 0);
    free(node);
    unsigned char *dtb = NULL;
    size_t dtb_len = 0;
    OK(c, khod_fdt(c, "in", (void **)&dtb, &dtb_len));
    CHECK(dtb && dtb_len > 40 && !memcmp(dtb, "\xd0\x0d\xfe\xed", 4), "fdt in: %zu bytes",
          dtb_len);
    free(dtb);
    uint64_t released = 0;
    OK(c, khod_release_unclaimed(c, "unclaimed", getuid(), &released));
    CHECK(released == KHOD_FOLIO_SIZE(1), "released %llu", (unsigned long long)released);
    char *note = NULL;
    OK(c, khod_get_prop(c, "/where", "note", NULL, (void **)&note, &len));
    CHECK(note && len == 13 && !memcmp(note, "three pieces", 13), "string prop");
    free(note);
    khod_folio f;
    OK(c, khod_restore_folio(c, where[0], &f));
    CHECK(f.phys == where[0] && f.order == 0, "restore_folio order %u", f.order);
    ERR(c, ENOENT, "", khod_restore_folio(c, where[0], &f)); /* once */
    uint8_t order = 99;
    OK(c, khod_restore_folios(c, &where[1], 1, &order));
    CHECK(order == 2, "restore_folios order %u", order);
    khod_folio *list = NULL;
    size_t n = 0;
    ERR(c, ENOENT, "", khod_restore_phys(c, where[2], KHOD_FOLIO_SIZE(2), NULL, NULL));
    OK(c, khod_restore_phys(c, where[2], KHOD_FOLIO_SIZE(3), &list, &n));
    CHECK(n == 1 && list && list[0].phys == where[2] && list[0].order == 3, "restore_phys");
    free(list);
    size_t sizes[3] = {KHOD_FOLIO_SIZE(0), KHOD_FOLIO_SIZE(2), KHOD_FOLIO_SIZE(3)};
    for (int i = 0; i < 3; i++) {
        void *m = NULL;
        OK(c, khod_map(c, where[i], sizes[i], &m));
        CHECK(m && stamped(m, sizes[i], where[i]), "piece %d came back changed", i);
        if (m)
            munmap(m, sizes[i]);
    }
    OK(c, khod_hello(c, "rs", true, &h));
    CHECK(h.incoming_bytes == 0, "all restored: %llu left", (unsigned long long)h.incoming_bytes);
    /* restored memory is the session's: it can be preserved again, or freed */
    OK(c, khod_preserve_folio(c, where[0], -1, NULL));
    OK(c, khod_free_folio(c, where[1]));
    free(where);
    khod_close(c);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: khod-c-check SOCKET CASE [ARGS]\n");
        return 64;
    }
    const char *sock = argv[1], *name = argv[2];
    if (!strcmp(name, "api"))
        case_api(sock);
    else if (!strcmp(name, "wrong-session"))
        case_wrong_session(sock);
    else if (!strcmp(name, "frozen"))
        case_frozen(sock);
    else if (!strcmp(name, "veto"))
        case_veto(sock);
    else if (!strcmp(name, "eperm") && argc == 5)
        case_eperm(sock, strtoull(argv[3], NULL, 0), (uid_t)atoi(argv[4]));
    else if (!strcmp(name, "oversized"))
        case_oversized(sock);
    else if (!strcmp(name, "busy-poll"))
        case_busy_poll(sock);
    else if (!strcmp(name, "handover-prep"))
        case_handover_prep(sock);
    else if (!strcmp(name, "handover-check"))
        case_handover_check(sock);
    else if (!strcmp(name, "gone"))
        case_gone(sock);
    else {
        fprintf(stderr, "unknown case %s\n", name);
        return 64;
    }
    printf("%s: %d failures\n", name, failures);
    return failures ? 1 : 0;
}
