/*
 * libkhodclient: the wire protocol of docs/protocol.md over a blocking Unix socket.
 *
 * One request at a time: a call packs its request (msgpack-c), sends it,
 * then reads and decodes messages until the reply with its id arrives.
 * Events met on the way are queued for khod_dispatch(); fds received with
 * any bytes go to a FIFO and a reply with `nfds` takes that many (§8).
 */
#include "khodclient.h"

#include <errno.h>
#include <msgpack.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "frame.h"

#define READ_CHUNK (256u << 10)
#define FD_FIFO 64      /* fds received and not yet claimed; more are closed */
#define EVENT_QUEUE 64  /* notifier events not yet dispatched; more are dropped */
#define DEFAULT_TIMEOUT_MS 60000
#define DEFAULT_MAX_REQUEST ((size_t)16 << 20)
#define DEFAULT_BUSY_POLL_US 100 /* as khoclient: clients/khoclient/spin.py says why */
#define MAX_BUSY_POLL_US 1000000
#define MAX_BACKOFF 10           /* misses in a row that count: 2**10 calls sleep at once */

typedef struct {
    char name[16];
    uint64_t token, generation;
} queued_event;

struct khod_client {
    int sock;
    int timeout_ms;
    int busy_poll_us;       /* a call polls this long for its reply before it sleeps */
    unsigned spin_misses;   /* busy polls in a row that ran out */
    unsigned spin_skip;     /* calls left that sleep at once (the backoff) */
    size_t max_request;
    uint64_t next_id;
    bool broken;            /* the connection is unusable; broken_why says why */
    int broken_err;         /* what every call returns then: EPROTO, or the refusal's code */
    char broken_why[480];
    char errcode[16];
    char errmsg[600];

    uint8_t *buf;           /* received bytes: [off, len) not yet consumed */
    size_t off, len, cap;

    int fds[FD_FIFO];
    size_t nfds;

    queued_event events[EVENT_QUEUE];
    size_t ev_head, ev_count;
    khod_notify_fn on_finalize, on_unfreeze;
    void *cb_arg;
    bool handed_over;
    uint64_t handover_gen;

    khod_region_info region; /* region.fd < 0 until `region` */

    msgpack_sbuffer out;
    msgpack_packer pk;
    bool pack_failed; /* the request being packed is incomplete (out of memory) */
};

/* A decoded reply, alive until reply_done(). */
typedef struct {
    msgpack_unpacked u;
    const msgpack_object *result; /* a map */
    size_t frame_len;
    int fds[16];
    size_t nfds;
} reply;

/* ------------------------------------------------------------------ errors */

static const struct {
    const char *name;
    int err;
} CODES[] = {
    {"EINVAL", EINVAL}, {"ENOENT", ENOENT}, {"EEXIST", EEXIST},
    {"EPERM", EPERM},   {"EBUSY", EBUSY},   {"ENOMEM", ENOMEM},
    {"EOPNOTSUPP", EOPNOTSUPP}, {"ETIMEDOUT", ETIMEDOUT}, {"EPROTO", EPROTO},
};

static const char *code_name(int err)
{
    for (size_t i = 0; i < sizeof CODES / sizeof CODES[0]; i++)
        if (CODES[i].err == err)
            return CODES[i].name;
    return "EPROTO";
}

__attribute__((format(printf, 3, 4))) static int fail(khod_client *c, int err, const char *fmt,
                                                       ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->errmsg, sizeof c->errmsg, fmt, ap);
    va_end(ap);
    snprintf(c->errcode, sizeof c->errcode, "%s", code_name(err));
    return -err;
}

/* The connection cannot be used any more: every later call fails -EPROTO with `why`. */
static int breakdown(khod_client *c, const char *why)
{
    if (!c->broken) {
        c->broken = true;
        c->broken_err = EPROTO;
        size_t n = strlen(why) < sizeof c->broken_why - 1 ? strlen(why) : sizeof c->broken_why - 1;
        memcpy(c->broken_why, why, n);
        c->broken_why[n] = 0;
    }
    return fail(c, c->broken_err, "%s", c->broken_why);
}

const char *khod_errmsg(const khod_client *c) { return c ? c->errmsg : "no client"; }
const char *khod_errcode(const khod_client *c) { return c ? c->errcode : "EINVAL"; }

/* ------------------------------------------------------------------ lifetime */

/* msgpack-c's writer callback: remember a failed append so no torn request is sent. */
static int pack_write(void *data, const char *buf, size_t len)
{
    khod_client *c = data;
    if (msgpack_sbuffer_write(&c->out, buf, len) != 0)
        c->pack_failed = true;
    return 0;
}

/* $KHOCLIENT_BUSY_POLL_US (the same knob as the Python client's), else the default; -1: bad. */
static int busy_poll_from_env(void)
{
    const char *v = getenv("KHOCLIENT_BUSY_POLL_US");
    if (!v || !*v)
        return DEFAULT_BUSY_POLL_US;
    char *end;
    errno = 0;
    long us = strtol(v, &end, 10);
    if (errno || *end || end == v || us < 0 || us > MAX_BUSY_POLL_US)
        return -1;
    return (int)us;
}

int khod_from_fd(int fd, khod_client **out)
{
    *out = NULL;
    if (fd < 0)
        return -EBADF;
    int busy_poll_us = busy_poll_from_env();
    if (busy_poll_us < 0) {
        close(fd);
        return -EINVAL;
    }
    khod_client *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return -ENOMEM;
    }
    c->sock = fd;
    c->busy_poll_us = busy_poll_us;
    c->timeout_ms = DEFAULT_TIMEOUT_MS;
    c->max_request = DEFAULT_MAX_REQUEST;
    c->next_id = 1;
    c->region.fd = -1;
    msgpack_sbuffer_init(&c->out);
    msgpack_packer_init(&c->pk, c, pack_write);
    *out = c;
    return 0;
}

int khod_connect(const char *path, khod_client **out)
{
    *out = NULL;
    if (!path || !*path)
        path = getenv("KHOD_SOCKET");
    if (!path || !*path)
        path = KHOD_DEFAULT_SOCKET;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path)
        return -ENAMETOOLONG;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    while (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (errno == EINTR)
            continue;
        int err = errno;
        close(fd);
        return -err;
    }
    return khod_from_fd(fd, out);
}

void khod_close(khod_client *c)
{
    if (!c)
        return;
    if (c->sock >= 0)
        close(c->sock);
    for (size_t i = 0; i < c->nfds; i++)
        close(c->fds[i]);
    if (c->region.fd >= 0)
        close(c->region.fd);
    free(c->buf);
    msgpack_sbuffer_destroy(&c->out);
    free(c);
}

int khod_fd(const khod_client *c) { return c->sock; }
void khod_set_timeout(khod_client *c, int timeout_ms) { c->timeout_ms = timeout_ms; }

int khod_set_busy_poll(khod_client *c, int us)
{
    if (us < 0 || us > MAX_BUSY_POLL_US)
        return fail(c, EINVAL, "busy poll of %d us: must be 0 (never) to %d", us, MAX_BUSY_POLL_US);
    c->busy_poll_us = us;
    c->spin_misses = c->spin_skip = 0;
    return 0;
}
void khod_set_max_request(khod_client *c, size_t bytes) { c->max_request = bytes; }

bool khod_handed_over(const khod_client *c, uint64_t *generation)
{
    if (generation && c->handed_over)
        *generation = c->handover_gen;
    return c->handed_over;
}

/* ------------------------------------------------------------------ msgpack helpers */

static const msgpack_object *get(const msgpack_object *map, const char *key)
{
    if (!map || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    size_t klen = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == klen &&
            memcmp(k->via.str.ptr, key, klen) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

static bool as_u64(const msgpack_object *o, uint64_t *v)
{
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return false;
    *v = o->via.u64;
    return true;
}

/* Copy a str object into dst[size] (NUL-terminated, cut to fit). */
static bool as_str(const msgpack_object *o, char *dst, size_t size)
{
    if (!o || o->type != MSGPACK_OBJECT_STR)
        return false;
    size_t n = o->via.str.size < size - 1 ? o->via.str.size : size - 1;
    memcpy(dst, o->via.str.ptr, n);
    dst[n] = 0;
    return true;
}

static void pk_str(khod_client *c, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(&c->pk, n);
    msgpack_pack_str_body(&c->pk, s, n);
}

static void pk_bin(khod_client *c, const void *p, size_t n)
{
    msgpack_pack_bin(&c->pk, n);
    msgpack_pack_bin_body(&c->pk, p, n);
}

/* A packed u64 array (docs/protocol.md §6.1): little-endian values back to back. */
static int pk_u64s(khod_client *c, const uint64_t *v, size_t n)
{
    if (n > SIZE_MAX / 8)
        return -1;
    msgpack_pack_bin(&c->pk, n * 8);
    uint8_t tmp[8 * 512];
    for (size_t at = 0; at < n;) {
        size_t k = n - at < 512 ? n - at : 512;
        for (size_t i = 0; i < k; i++) {
            uint64_t x = v[at + i];
            for (int b = 0; b < 8; b++)
                tmp[8 * i + b] = (uint8_t)(x >> (8 * b));
        }
        msgpack_pack_bin_body(&c->pk, tmp, 8 * k);
        at += k;
    }
    return 0;
}

/* Begin a request map of `nargs` arguments after id and op. */
static uint64_t begin(khod_client *c, const char *op, uint32_t nargs)
{
    if (c->out.alloc > ((size_t)1 << 20)) { /* do not keep a large request's buffer */
        msgpack_sbuffer_destroy(&c->out);
        msgpack_sbuffer_init(&c->out);
    }
    msgpack_sbuffer_clear(&c->out);
    c->pack_failed = false;
    uint64_t id = c->next_id++;
    if (c->next_id > INT64_MAX)
        c->next_id = 1;
    msgpack_pack_map(&c->pk, 2 + nargs);
    pk_str(c, "id");
    msgpack_pack_uint64(&c->pk, id);
    pk_str(c, "op");
    pk_str(c, op);
    return id;
}

/* ------------------------------------------------------------------ I/O */

static int remaining_ms(const khod_client *c, const struct timespec *start)
{
    if (c->timeout_ms < 0)
        return -1;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long spent = (now.tv_sec - start->tv_sec) * 1000LL + (now.tv_nsec - start->tv_nsec) / 1000000;
    return spent >= c->timeout_ms ? 0 : (int)(c->timeout_ms - spent);
}

static void keep_fd(khod_client *c, int fd)
{
    if (c->nfds < FD_FIFO)
        c->fds[c->nfds++] = fd;
    else
        close(fd); /* nobody asked for this many */
}

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Poll without sleeping for up to the call's busy-poll budget: 1 when there is
 * something to read, 0 when the budget ran out (or the backoff skips this call).
 * A reply that finds the caller awake costs the daemon no wake-up, and a
 * caller that is quick to send the next request finds the daemon awake. */
static int spin(khod_client *c)
{
    if (c->busy_poll_us <= 0)
        return 0;
    if (c->spin_skip) {
        c->spin_skip--;
        return 0;
    }
    struct pollfd p = {.fd = c->sock, .events = POLLIN};
    long long end = now_ns() + c->busy_poll_us * 1000LL;
    do {
        if (poll(&p, 1, 0) > 0) {
            c->spin_misses = 0;
            return 1;
        }
    } while (now_ns() < end);
    if (c->spin_misses < MAX_BACKOFF)
        c->spin_misses++;
    c->spin_skip = 1u << c->spin_misses;
    return 0;
}

/* One recvmsg into the buffer, waiting up to wait_ms (after a busy poll, when
 * `first` read of a call). 1: got bytes, 0: timed out, <0: error. */
static int receive(khod_client *c, int wait_ms, bool first)
{
    struct pollfd p = {.fd = c->sock, .events = POLLIN};
    int r = first && spin(c) ? 1 : 0;
    if (!r) {
        do
            r = poll(&p, 1, wait_ms);
        while (r < 0 && errno == EINTR);
    }
    if (r < 0)
        return breakdown(c, "poll on the socket failed");
    if (r == 0)
        return 0;
    if (c->off == c->len && c->cap > 16 * READ_CHUNK) { /* after a large message */
        free(c->buf);
        c->buf = NULL;
        c->off = c->len = c->cap = 0;
    }
    if (c->off > 0 && (c->off == c->len || c->cap - c->len < READ_CHUNK)) {
        memmove(c->buf, c->buf + c->off, c->len - c->off);
        c->len -= c->off;
        c->off = 0;
    }
    if (c->cap - c->len < READ_CHUNK) {
        size_t cap = c->cap ? c->cap : READ_CHUNK;
        while (cap - c->len < READ_CHUNK)
            cap *= 2;
        uint8_t *nb = realloc(c->buf, cap);
        if (!nb)
            return breakdown(c, "out of memory for received bytes");
        c->buf = nb;
        c->cap = cap;
    }
    union {
        char buf[CMSG_SPACE(16 * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {.iov_base = c->buf + c->len, .iov_len = c->cap - c->len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                        .msg_controllen = sizeof ctl.buf};
    ssize_t got;
    do
        got = recvmsg(c->sock, &mh, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got < 0) {
        char why[160];
        snprintf(why, sizeof why, "connection lost: %s", strerror(errno));
        return breakdown(c, why);
    }
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
            keep_fd(c, fd);
        }
    }
    if (mh.msg_flags & MSG_CTRUNC)
        return breakdown(c, "file descriptors were truncated in transit");
    if (got == 0)
        return breakdown(c, c->len > c->off ? "connection closed in the middle of a message"
                                            : "connection closed");
    c->len += (size_t)got;
    return 1;
}

static void queue_event(khod_client *c, const char *name, const msgpack_object *msg)
{
    uint64_t token, gen = 0;
    if (!as_u64(get(msg, "token"), &token))
        return;
    as_u64(get(msg, "generation"), &gen);
    if (c->ev_count == EVENT_QUEUE)
        return; /* a flood: the daemon counts the unanswered round as a timeout */
    queued_event *e = &c->events[(c->ev_head + c->ev_count++) % EVENT_QUEUE];
    snprintf(e->name, sizeof e->name, "%s", name);
    e->token = token;
    e->generation = gen;
}

static void on_event(khod_client *c, const msgpack_object *msg, const msgpack_object *ev)
{
    char name[16];
    if (!as_str(ev, name, sizeof name))
        return;
    if (!strcmp(name, "finalize") || !strcmp(name, "unfreeze")) {
        queue_event(c, name, msg);
    } else if (!strcmp(name, "handover")) {
        c->handed_over = true;
        c->handover_gen = 0;
        as_u64(get(msg, "generation"), &c->handover_gen);
    }
    /* progress events: not reported by this client */
}

/*
 * Decode the next complete message in the buffer. Returns 1 with *r filled
 * when it is the reply to `want` (the caller must reply_done), 0 when the
 * buffer holds no complete message or the message was something else
 * (handled), <0 on a broken stream.
 */
static int next_message(khod_client *c, uint64_t want, bool *progress, reply *r)
{
    size_t flen = 0;
    const char *why = NULL;
    int s = khod_frame_scan(c->buf + c->off, c->len - c->off, &flen, &why);
    if (s < 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "the daemon sent %s", why);
        return breakdown(c, msg);
    }
    if (s == 0)
        return 0;
    *progress = true;
    msgpack_unpacked_init(&r->u);
    size_t used = 0;
    msgpack_unpack_return ur =
        msgpack_unpack_next(&r->u, (const char *)c->buf + c->off, flen, &used);
    if (ur != MSGPACK_UNPACK_SUCCESS || used != flen) {
        msgpack_unpacked_destroy(&r->u);
        return breakdown(c, ur == MSGPACK_UNPACK_NOMEM_ERROR
                                ? "the daemon sent a message nested too deeply"
                                : "the daemon sent bytes that are not msgpack");
    }
    const msgpack_object *msg = &r->u.data;
    r->nfds = 0;
    r->frame_len = flen;
    bool mine = false;
    if (msg->type == MSGPACK_OBJECT_MAP) {
        const msgpack_object *ev = get(msg, "event");
        if (ev) {
            on_event(c, msg, ev);
        } else {
            uint64_t id = 0, nfds = 0;
            bool has_id = as_u64(get(msg, "id"), &id);
            as_u64(get(msg, "nfds"), &nfds);
            /* take this reply's fds off the FIFO (§8) */
            for (uint64_t i = 0; i < nfds && c->nfds > 0; i++) {
                int fd = c->fds[0];
                memmove(c->fds, c->fds + 1, (c->nfds - 1) * sizeof(int));
                c->nfds--;
                if (r->nfds < sizeof r->fds / sizeof r->fds[0])
                    r->fds[r->nfds++] = fd;
                else
                    close(fd);
            }
            mine = has_id && id == want;
            if (!has_id && get(msg, "error")) {
                /* an error for no request (e.g. too many connections, §1): fatal */
                char code[16] = "?", text[400] = "";
                const msgpack_object *e = get(msg, "error");
                as_str(get(e, "code"), code, sizeof code);
                as_str(get(e, "message"), text, sizeof text);
                char refusal[460];
                snprintf(refusal, sizeof refusal, "the daemon refused the connection: %s: %s",
                         code, text);
                breakdown(c, refusal);
                for (size_t i = 0; i < sizeof CODES / sizeof CODES[0]; i++)
                    if (!strcmp(code, CODES[i].name))
                        c->broken_err = CODES[i].err; /* e.g. EBUSY: too many connections */
            }
        }
    }
    if (mine && !c->broken)
        return 1;
    for (size_t i = 0; i < r->nfds; i++)
        close(r->fds[i]);
    msgpack_unpacked_destroy(&r->u);
    c->off += flen;
    return c->broken ? fail(c, c->broken_err, "%s", c->broken_why) : 0;
}

static void reply_done(khod_client *c, reply *r)
{
    for (size_t i = 0; i < r->nfds; i++)
        if (r->fds[i] >= 0)
            close(r->fds[i]);
    msgpack_unpacked_destroy(&r->u);
    c->off += r->frame_len;
}

/* Handle every complete message in the buffer (events only). */
static int drain(khod_client *c)
{
    for (;;) {
        bool progress = false;
        reply r;
        int s = next_message(c, 0, &progress, &r);
        if (s < 0)
            return s;
        if (s == 1)
            reply_done(c, &r); /* id 0 is never ours */
        if (!progress)
            return 0;
    }
}

static int send_all(khod_client *c, const char *op)
{
    if (c->pack_failed)
        return fail(c, ENOMEM, "%s: out of memory packing the request", op);
    if (c->out.size > c->max_request)
        return fail(c, EINVAL, "%s: the request is %zu bytes, more than the %zu the client sends "
                               "(khod_set_max_request; the daemon's limits.max_frame)",
                    op, c->out.size, c->max_request);
    size_t at = 0;
    while (at < c->out.size) {
        ssize_t w = send(c->sock, c->out.data + at, c->out.size - at, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            char why[160];
            snprintf(why, sizeof why, "connection lost sending %s: %s", op, strerror(errno));
            return breakdown(c, why);
        }
        at += (size_t)w;
    }
    return 0;
}

/* Send the packed request and wait for its reply; 0 with *r alive, or <0. */
static int roundtrip(khod_client *c, const char *op, uint64_t id, reply *r)
{
    if (c->broken)
        return fail(c, c->broken_err, "%s", c->broken_why);
    int s = send_all(c, op);
    if (s < 0)
        return s;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    bool first = true;
    for (;;) {
        bool progress = false;
        s = next_message(c, id, &progress, r);
        if (s < 0)
            return s;
        if (s == 1)
            break;
        if (progress)
            continue;
        int left = remaining_ms(c, &start);
        if (left == 0)
            return fail(c, ETIMEDOUT, "no reply to %s within %d ms", op, c->timeout_ms);
        s = receive(c, left, first);
        first = false;
        if (s < 0)
            return s;
    }
    const msgpack_object *msg = &r->u.data;
    const msgpack_object *err = get(msg, "error");
    if (err) {
        char code[16] = "", text[512] = "";
        as_str(get(err, "code"), code, sizeof code);
        as_str(get(err, "message"), text, sizeof text);
        reply_done(c, r);
        for (size_t i = 0; i < sizeof CODES / sizeof CODES[0]; i++)
            if (!strcmp(code, CODES[i].name)) {
                fail(c, CODES[i].err, "%s", text);
                snprintf(c->errcode, sizeof c->errcode, "%s", code);
                return -CODES[i].err;
            }
        return fail(c, EPROTO, "%s: error reply with unknown code '%s': %s", op, code, text);
    }
    r->result = get(msg, "result");
    if (!r->result || r->result->type != MSGPACK_OBJECT_MAP) {
        reply_done(c, r);
        return fail(c, EPROTO, "malformed %s reply: no result map", op);
    }
    c->errmsg[0] = c->errcode[0] = 0;
    return 0;
}

static int malformed(khod_client *c, reply *r, const char *op, const char *key)
{
    reply_done(c, r);
    return fail(c, EPROTO, "malformed %s reply: '%s' missing or of the wrong type", op, key);
}

/* A call whose result is ignored ({} expected). */
static int simple(khod_client *c, const char *op, uint64_t id)
{
    reply r;
    int s = roundtrip(c, op, id, &r);
    if (s < 0)
        return s;
    reply_done(c, &r);
    return 0;
}

/* A call whose result holds one integer under `key`. */
static int one_u64(khod_client *c, const char *op, uint64_t id, const char *key, uint64_t *v)
{
    reply r;
    int s = roundtrip(c, op, id, &r);
    if (s < 0)
        return s;
    uint64_t x;
    if (!as_u64(get(r.result, key), &x))
        return malformed(c, &r, op, key);
    if (v)
        *v = x;
    reply_done(c, &r);
    return 0;
}

static int one_bool(khod_client *c, const char *op, uint64_t id, const char *key, bool *v)
{
    reply r;
    int s = roundtrip(c, op, id, &r);
    if (s < 0)
        return s;
    const msgpack_object *o = get(r.result, key);
    if (!o || o->type != MSGPACK_OBJECT_BOOLEAN)
        return malformed(c, &r, op, key);
    if (v)
        *v = o->via.boolean;
    reply_done(c, &r);
    return 0;
}

/* ------------------------------------------------------------------ session and region */

static int check_name(khod_client *c, const char *what, const char *s, size_t max)
{
    if (!s)
        return fail(c, EINVAL, "%s must not be NULL", what);
    if (strlen(s) > max)
        return fail(c, EINVAL, "%s is longer than %zu bytes", what, max);
    return 0;
}

static int hello(khod_client *c, const char *name, bool persistent, const uint32_t *uid,
                 khod_hello_info *info)
{
    int s = check_name(c, "session name", name, 64);
    if (s < 0)
        return s;
    uint64_t id = begin(c, "hello", uid ? 3 : 2);
    pk_str(c, "name");
    pk_str(c, name);
    pk_str(c, "persistent");
    persistent ? msgpack_pack_true(&c->pk) : msgpack_pack_false(&c->pk);
    if (uid) {
        pk_str(c, "uid");
        msgpack_pack_uint32(&c->pk, *uid);
    }
    reply r;
    if ((s = roundtrip(c, "hello", id, &r)) < 0)
        return s;
    khod_hello_info h = {0};
    uint64_t u;
    const msgpack_object *o;
    if (!as_str(get(r.result, "session"), h.session, sizeof h.session))
        return malformed(c, &r, "hello", "session");
    if (!as_u64(get(r.result, "uid"), &u) || u > UINT32_MAX)
        return malformed(c, &r, "hello", "uid");
    h.uid = (uint32_t)u;
    if (!as_u64(get(r.result, "generation"), &h.generation))
        return malformed(c, &r, "hello", "generation");
    as_u64(get(r.result, "incoming_bytes"), &h.incoming_bytes);
#define FLAG(k)                                                         \
    if (!(o = get(r.result, #k)) || o->type != MSGPACK_OBJECT_BOOLEAN) \
        return malformed(c, &r, "hello", #k);                           \
    h.k = o->via.boolean;
    FLAG(created)
    FLAG(persistent)
    FLAG(incoming)
#undef FLAG
    reply_done(c, &r);
    if (info)
        *info = h;
    return 0;
}

int khod_hello(khod_client *c, const char *name, bool persistent, khod_hello_info *info)
{
    return hello(c, name, persistent, NULL, info);
}

int khod_hello_uid(khod_client *c, const char *name, bool persistent, uint32_t uid,
                   khod_hello_info *info)
{
    return hello(c, name, persistent, &uid, info);
}

int khod_region(khod_client *c, khod_region_info *info)
{
    uint64_t id = begin(c, "region", 0);
    reply r;
    int s = roundtrip(c, "region", id, &r);
    if (s < 0)
        return s;
    khod_region_info g = {.fd = -1};
    if (!as_u64(get(r.result, "base"), &g.base))
        return malformed(c, &r, "region", "base");
    if (!as_u64(get(r.result, "size"), &g.size) || g.size == 0 || g.base + g.size < g.base)
        return malformed(c, &r, "region", "size");
    if (!as_u64(get(r.result, "map_offset"), &g.map_offset))
        return malformed(c, &r, "region", "map_offset");
    if (!as_str(get(r.result, "backend"), g.backend, sizeof g.backend))
        return malformed(c, &r, "region", "backend");
    if (r.nfds < 1) {
        reply_done(c, &r);
        return fail(c, EPROTO, "malformed region reply: no file descriptor came with it");
    }
    g.fd = r.fds[0];
    r.fds[0] = -1; /* ours now; the others are closed */
    reply_done(c, &r);
    if (c->region.fd >= 0)
        close(c->region.fd);
    c->region = g;
    if (info)
        *info = g;
    return 0;
}

int khod_map(khod_client *c, uint64_t phys, size_t len, void **addr)
{
    *addr = NULL;
    if (c->region.fd < 0) {
        int s = khod_region(c, NULL);
        if (s < 0)
            return s;
    }
    const khod_region_info *g = &c->region;
    if (phys % KHOD_PAGE_SIZE || len == 0 || len % KHOD_PAGE_SIZE)
        return fail(c, EINVAL, "range 0x%llx+0x%zx is not whole pages", (unsigned long long)phys,
                    len);
    if (phys < g->base || phys - g->base > g->size || len > g->size - (phys - g->base))
        return fail(c, EINVAL, "range 0x%llx+0x%zx is outside the region",
                    (unsigned long long)phys, len);
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, g->fd,
                   (off_t)(g->map_offset + (phys - g->base)));
    if (m == MAP_FAILED) {
        int err = errno;
        fail(c, err, "mmap of 0x%llx+0x%zx failed: %s", (unsigned long long)phys, len,
             strerror(err));
        return -err;
    }
    *addr = m;
    c->errmsg[0] = c->errcode[0] = 0;
    return 0;
}

int khod_ping(khod_client *c) { return simple(c, "ping", begin(c, "ping", 0)); }

/* ------------------------------------------------------------------ memory */

static int check_order(khod_client *c, const char *op, int order)
{
    if (order > KHOD_MAX_ORDER)
        return fail(c, EINVAL, "%s: order %d is above %d", op, order, KHOD_MAX_ORDER);
    return 0;
}

int khod_alloc_folio(khod_client *c, unsigned order, khod_folio *out)
{
    int s = check_order(c, "alloc_folio", (int)(order > 64 ? 64 : order));
    if (s < 0)
        return s;
    uint64_t id = begin(c, "alloc_folio", 1);
    pk_str(c, "order");
    msgpack_pack_unsigned_int(&c->pk, order);
    reply r;
    if ((s = roundtrip(c, "alloc_folio", id, &r)) < 0)
        return s;
    uint64_t phys, o;
    if (!as_u64(get(r.result, "phys"), &phys))
        return malformed(c, &r, "alloc_folio", "phys");
    if (!as_u64(get(r.result, "order"), &o) || o > KHOD_MAX_ORDER)
        return malformed(c, &r, "alloc_folio", "order");
    reply_done(c, &r);
    if (out)
        *out = (khod_folio){phys, (unsigned)o};
    return 0;
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int b = 7; b >= 0; b--)
        v = (v << 8) | p[b];
    return v;
}

int khod_alloc_folios(khod_client *c, unsigned order, size_t count, uint64_t *phys_out)
{
    int s = check_order(c, "alloc_folios", (int)(order > 64 ? 64 : order));
    if (s < 0)
        return s;
    if (count == 0)
        return fail(c, EINVAL, "alloc_folios: count must be at least 1");
    uint64_t id = begin(c, "alloc_folios", 3);
    pk_str(c, "order");
    msgpack_pack_unsigned_int(&c->pk, order);
    pk_str(c, "count");
    msgpack_pack_uint64(&c->pk, count);
    pk_str(c, "packed");
    msgpack_pack_true(&c->pk);
    reply r;
    if ((s = roundtrip(c, "alloc_folios", id, &r)) < 0)
        return s;
    const msgpack_object *p = get(r.result, "phys");
    if (!p || p->type != MSGPACK_OBJECT_BIN || p->via.bin.size != 8 * (uint64_t)count)
        return malformed(c, &r, "alloc_folios", "phys");
    for (size_t i = 0; i < count; i++)
        phys_out[i] = le64((const uint8_t *)p->via.bin.ptr + 8 * i);
    reply_done(c, &r);
    return 0;
}

int khod_free_folio(khod_client *c, uint64_t phys)
{
    uint64_t id = begin(c, "free_folio", 1);
    pk_str(c, "phys");
    msgpack_pack_uint64(&c->pk, phys);
    return simple(c, "free_folio", id);
}

int khod_free_folios(khod_client *c, const uint64_t *phys, size_t n)
{
    uint64_t id = begin(c, "free_folios", 1);
    pk_str(c, "phys");
    pk_u64s(c, phys, n);
    return one_u64(c, "free_folios", id, "count", NULL);
}

/* ------------------------------------------------------------------ preservation */

static int folio_op(khod_client *c, const char *op, uint64_t phys, int order, unsigned *out)
{
    int s = check_order(c, op, order);
    if (s < 0)
        return s;
    uint64_t id = begin(c, op, order >= 0 ? 2 : 1);
    pk_str(c, "phys");
    msgpack_pack_uint64(&c->pk, phys);
    if (order >= 0) {
        pk_str(c, "order");
        msgpack_pack_int(&c->pk, order);
    }
    uint64_t o;
    if ((s = one_u64(c, op, id, "order", &o)) < 0)
        return s;
    if (out)
        *out = (unsigned)o;
    return 0;
}

int khod_preserve_folio(khod_client *c, uint64_t phys, int order, unsigned *order_out)
{
    return folio_op(c, "preserve_folio", phys, order, order_out);
}

int khod_unpreserve_folio(khod_client *c, uint64_t phys, int order, unsigned *order_out)
{
    return folio_op(c, "unpreserve_folio", phys, order, order_out);
}

static int folios_op(khod_client *c, const char *op, const uint64_t *phys, size_t n,
                     const uint8_t *orders, int order)
{
    int s = check_order(c, op, order);
    if (s < 0)
        return s;
    if (n > 0 && !phys)
        return fail(c, EINVAL, "%s: phys is NULL", op);
    uint64_t id = begin(c, op, orders || order >= 0 ? 2 : 1);
    pk_str(c, "phys");
    pk_u64s(c, phys, n);
    if (orders) {
        pk_str(c, "orders");
        msgpack_pack_bin(&c->pk, n * 8);
        uint8_t tmp[8 * 512] = {0};
        for (size_t at = 0; at < n;) {
            size_t k = n - at < 512 ? n - at : 512;
            for (size_t i = 0; i < k; i++)
                tmp[8 * i] = orders[at + i]; /* u64 LE: low byte first, the rest stay 0 */
            msgpack_pack_bin_body(&c->pk, tmp, 8 * k);
            at += k;
        }
    } else if (order >= 0) {
        pk_str(c, "orders");
        msgpack_pack_int(&c->pk, order);
    }
    uint64_t count;
    if ((s = one_u64(c, op, id, "count", &count)) < 0)
        return s;
    return count > INT32_MAX ? INT32_MAX : (int)count;
}

int khod_preserve_folios(khod_client *c, const uint64_t *phys, size_t n, const uint8_t *orders,
                         int order)
{
    int s = folios_op(c, "preserve_folios", phys, n, orders, order);
    return s < 0 ? s : 0;
}

int khod_unpreserve_folios(khod_client *c, const uint64_t *phys, size_t n,
                           const uint8_t *orders, int order)
{
    int s = folios_op(c, "unpreserve_folios", phys, n, orders, order);
    return s < 0 ? s : 0;
}

/* A result `folios`: [[phys, order], ...] into a malloc'd array. */
static int folio_list(khod_client *c, const char *op, uint64_t id, khod_folio **folios,
                      size_t *n)
{
    reply r;
    int s = roundtrip(c, op, id, &r);
    if (s < 0)
        return s;
    const msgpack_object *a = get(r.result, "folios");
    if (!a || a->type != MSGPACK_OBJECT_ARRAY)
        return malformed(c, &r, op, "folios");
    size_t k = a->via.array.size;
    khod_folio *out = NULL;
    if (folios) {
        out = malloc((k ? k : 1) * sizeof *out);
        if (!out) {
            reply_done(c, &r);
            return fail(c, ENOMEM, "%s: no memory for %zu folios", op, k);
        }
    }
    for (size_t i = 0; i < k; i++) {
        const msgpack_object *e = &a->via.array.ptr[i];
        uint64_t p, o;
        if (e->type != MSGPACK_OBJECT_ARRAY || e->via.array.size != 2 ||
            !as_u64(&e->via.array.ptr[0], &p) || !as_u64(&e->via.array.ptr[1], &o) ||
            o > KHOD_MAX_ORDER) {
            free(out);
            return malformed(c, &r, op, "folios");
        }
        if (out)
            out[i] = (khod_folio){p, (unsigned)o};
    }
    reply_done(c, &r);
    if (folios)
        *folios = out;
    if (n)
        *n = k;
    return 0;
}

static int phys_size(khod_client *c, const char *op, uint64_t phys, uint64_t size,
                     khod_folio **folios, size_t *n)
{
    uint64_t id = begin(c, op, 2);
    pk_str(c, "phys");
    msgpack_pack_uint64(&c->pk, phys);
    pk_str(c, "size");
    msgpack_pack_uint64(&c->pk, size);
    return folio_list(c, op, id, folios, n);
}

int khod_preserve_phys(khod_client *c, uint64_t phys, uint64_t size, khod_folio **folios,
                       size_t *n)
{
    return phys_size(c, "preserve_phys", phys, size, folios, n);
}

int khod_unpreserve_phys(khod_client *c, uint64_t phys, uint64_t size, khod_folio **folios,
                         size_t *n)
{
    return phys_size(c, "unpreserve_phys", phys, size, folios, n);
}

static int ranges_op(khod_client *c, const char *op, const uint64_t *phys,
                     const uint64_t *sizes, size_t n, uint64_t *nfolios)
{
    if (n > 0 && (!phys || !sizes))
        return fail(c, EINVAL, "%s: phys or sizes is NULL", op);
    uint64_t id = begin(c, op, 2);
    pk_str(c, "phys");
    pk_u64s(c, phys, n);
    pk_str(c, "sizes");
    pk_u64s(c, sizes, n);
    return one_u64(c, op, id, "folios", nfolios);
}

int khod_preserve_phys_ranges(khod_client *c, const uint64_t *phys, const uint64_t *sizes,
                              size_t n, uint64_t *nfolios)
{
    return ranges_op(c, "preserve_phys_ranges", phys, sizes, n, nfolios);
}

int khod_unpreserve_phys_ranges(khod_client *c, const uint64_t *phys, const uint64_t *sizes,
                                size_t n, uint64_t *nfolios)
{
    return ranges_op(c, "unpreserve_phys_ranges", phys, sizes, n, nfolios);
}

/* ------------------------------------------------------------------ restore */

int khod_restore_folio(khod_client *c, uint64_t phys, khod_folio *out)
{
    uint64_t id = begin(c, "restore_folio", 1);
    pk_str(c, "phys");
    msgpack_pack_uint64(&c->pk, phys);
    reply r;
    int s = roundtrip(c, "restore_folio", id, &r);
    if (s < 0)
        return s;
    uint64_t p, o;
    if (!as_u64(get(r.result, "phys"), &p))
        return malformed(c, &r, "restore_folio", "phys");
    if (!as_u64(get(r.result, "order"), &o) || o > KHOD_MAX_ORDER)
        return malformed(c, &r, "restore_folio", "order");
    reply_done(c, &r);
    if (out)
        *out = (khod_folio){p, (unsigned)o};
    return 0;
}

int khod_restore_folios(khod_client *c, const uint64_t *phys, size_t n, uint8_t *orders_out)
{
    if (n > 0 && !phys)
        return fail(c, EINVAL, "restore_folios: phys is NULL");
    uint64_t id = begin(c, "restore_folios", 2);
    pk_str(c, "phys");
    pk_u64s(c, phys, n);
    pk_str(c, "packed");
    msgpack_pack_true(&c->pk);
    reply r;
    int s = roundtrip(c, "restore_folios", id, &r);
    if (s < 0)
        return s;
    const msgpack_object *o = get(r.result, "orders");
    if (!o || o->type != MSGPACK_OBJECT_BIN || o->via.bin.size != n)
        return malformed(c, &r, "restore_folios", "orders");
    for (size_t i = 0; i < n; i++)
        if ((uint8_t)o->via.bin.ptr[i] > KHOD_MAX_ORDER)
            return malformed(c, &r, "restore_folios", "orders");
    if (orders_out && n)
        memcpy(orders_out, o->via.bin.ptr, n);
    reply_done(c, &r);
    return 0;
}

int khod_restore_phys(khod_client *c, uint64_t phys, uint64_t size, khod_folio **folios,
                      size_t *n)
{
    return phys_size(c, "restore_phys", phys, size, folios, n);
}

/* ------------------------------------------------------------------ KHO tree */

int khod_add_node(khod_client *c, const char *path, bool *created)
{
    int s = check_name(c, "path", path, 1024);
    if (s < 0)
        return s;
    uint64_t id = begin(c, "add_node", 1);
    pk_str(c, "path");
    pk_str(c, path);
    return one_bool(c, "add_node", id, "created", created);
}

int khod_add_prop(khod_client *c, const char *path, const char *name, const void *value,
                  size_t len, bool *added)
{
    int s;
    if ((s = check_name(c, "path", path, 1024)) < 0 ||
        (s = check_name(c, "property name", name, 64)) < 0)
        return s;
    if (len > 0 && !value)
        return fail(c, EINVAL, "add_prop: value is NULL");
    uint64_t id = begin(c, "add_prop", 3);
    pk_str(c, "path");
    pk_str(c, path);
    pk_str(c, "name");
    pk_str(c, name);
    pk_str(c, "value");
    pk_bin(c, value, len);
    return one_bool(c, "add_prop", id, "added", added);
}

int khod_add_string_prop(khod_client *c, const char *path, const char *name,
                         const char *value, bool *added)
{
    int s;
    if ((s = check_name(c, "path", path, 1024)) < 0 ||
        (s = check_name(c, "property name", name, 64)) < 0 ||
        (s = check_name(c, "value", value, SIZE_MAX - 1)) < 0)
        return s;
    uint64_t id = begin(c, "add_string_prop", 3);
    pk_str(c, "path");
    pk_str(c, path);
    pk_str(c, "name");
    pk_str(c, name);
    pk_str(c, "value");
    pk_str(c, value);
    return one_bool(c, "add_string_prop", id, "added", added);
}

int khod_remove_node(khod_client *c, const char *path)
{
    int s = check_name(c, "path", path, 1024);
    if (s < 0)
        return s;
    uint64_t id = begin(c, "remove_node", 1);
    pk_str(c, "path");
    pk_str(c, path);
    return simple(c, "remove_node", id);
}

/* A result `value` (bin) into a malloc'd copy. */
/* A call whose result holds one bin under `key`: a malloc'd copy into *value. */
static int bin_value(khod_client *c, const char *op, uint64_t id, const char *key, void **value,
                     size_t *len)
{
    reply r;
    int s = roundtrip(c, op, id, &r);
    if (s < 0)
        return s;
    const msgpack_object *v = get(r.result, key);
    if (!v || v->type != MSGPACK_OBJECT_BIN)
        return malformed(c, &r, op, key);
    size_t n = v->via.bin.size;
    if (value) {
        void *copy = malloc(n ? n : 1);
        if (!copy) {
            reply_done(c, &r);
            return fail(c, ENOMEM, "%s: no memory for %zu bytes", op, n);
        }
        if (n)
            memcpy(copy, v->via.bin.ptr, n);
        *value = copy;
    }
    if (len)
        *len = n;
    reply_done(c, &r);
    return 0;
}

int khod_remove_prop(khod_client *c, const char *path, const char *name, void **value,
                     size_t *len)
{
    int s;
    if ((s = check_name(c, "path", path, 1024)) < 0 ||
        (s = check_name(c, "property name", name, 64)) < 0)
        return s;
    uint64_t id = begin(c, "remove_prop", 2);
    pk_str(c, "path");
    pk_str(c, path);
    pk_str(c, "name");
    pk_str(c, name);
    return bin_value(c, "remove_prop", id, "value", value, len);
}

int khod_get_prop(khod_client *c, const char *path, const char *name, const char *tree,
                  void **value, size_t *len)
{
    int s;
    if ((s = check_name(c, "path", path, 1024)) < 0 ||
        (s = check_name(c, "property name", name, 64)) < 0)
        return s;
    uint64_t id = begin(c, "get_prop", 3);
    pk_str(c, "path");
    pk_str(c, path);
    pk_str(c, "name");
    pk_str(c, name);
    pk_str(c, "tree");
    pk_str(c, tree ? tree : "in");
    return bin_value(c, "get_prop", id, "value", value, len);
}

/* An array of str: whether it is one, and the bytes its names take with their NULs. */
static bool str_array(const msgpack_object *o, size_t *bytes)
{
    if (!o || o->type != MSGPACK_OBJECT_ARRAY)
        return false;
    for (uint32_t i = 0; i < o->via.array.size; i++) {
        const msgpack_object *e = &o->via.array.ptr[i];
        if (e->type != MSGPACK_OBJECT_STR || memchr(e->via.str.ptr, 0, e->via.str.size))
            return false;
        *bytes += e->via.str.size + 1;
    }
    return true;
}

/* Copy the names of a checked str array: pointers into `names`, bytes from *text on. */
static void copy_names(const msgpack_object *o, char **names, char **text)
{
    for (uint32_t i = 0; i < o->via.array.size; i++) {
        const msgpack_object *e = &o->via.array.ptr[i];
        memcpy(*text, e->via.str.ptr, e->via.str.size);
        (*text)[e->via.str.size] = 0;
        names[i] = *text;
        *text += e->via.str.size + 1;
    }
}

int khod_get_node(khod_client *c, const char *path, const char *tree, khod_node **node)
{
    int s;
    if (!node)
        return fail(c, EINVAL, "node must not be NULL");
    *node = NULL;
    if ((s = check_name(c, "path", path, 1024)) < 0)
        return s;
    uint64_t id = begin(c, "get_node", 2);
    pk_str(c, "path");
    pk_str(c, path);
    pk_str(c, "tree");
    pk_str(c, tree ? tree : "in");
    reply r;
    if ((s = roundtrip(c, "get_node", id, &r)) < 0)
        return s;
    const msgpack_object *props = get(r.result, "props"), *children = get(r.result, "children");
    size_t text = 0;
    if (!str_array(props, &text))
        return malformed(c, &r, "get_node", "props");
    if (!str_array(children, &text))
        return malformed(c, &r, "get_node", "children");
    size_t np = props->via.array.size, nc = children->via.array.size;
    /* sizes come from a frame the decoder bounded (frame.c), so this cannot overflow */
    khod_node *n = malloc(sizeof *n + (np + nc) * sizeof(char *) + text);
    if (!n) {
        reply_done(c, &r);
        return fail(c, ENOMEM, "get_node: no memory for %zu names", np + nc);
    }
    n->nprops = np;
    n->nchildren = nc;
    n->props = (char **)(n + 1);
    n->children = n->props + np;
    char *at = (char *)(n->children + nc);
    copy_names(props, n->props, &at);
    copy_names(children, n->children, &at);
    reply_done(c, &r);
    *node = n;
    return 0;
}

/* ------------------------------------------------------------------ events */

int khod_subscribe(khod_client *c, khod_notify_fn on_finalize, khod_notify_fn on_unfreeze,
                   void *arg)
{
    uint64_t id = begin(c, "subscribe", 1);
    pk_str(c, "events");
    msgpack_pack_array(&c->pk, (on_finalize != NULL) + (on_unfreeze != NULL));
    if (on_finalize)
        pk_str(c, "finalize");
    if (on_unfreeze)
        pk_str(c, "unfreeze");
    reply r;
    int s = roundtrip(c, "subscribe", id, &r);
    if (s < 0)
        return s;
    const msgpack_object *ev = get(r.result, "events");
    if (!ev || ev->type != MSGPACK_OBJECT_ARRAY)
        return malformed(c, &r, "subscribe", "events");
    reply_done(c, &r);
    c->on_finalize = on_finalize;
    c->on_unfreeze = on_unfreeze;
    c->cb_arg = arg;
    return 0;
}

static int answer(khod_client *c, const queued_event *e)
{
    khod_notify_fn fn = !strcmp(e->name, "finalize") ? c->on_finalize : c->on_unfreeze;
    char reason[513] = "";
    int verdict = 0;
    if (fn) {
        khod_event ev = {.name = e->name, .token = e->token, .generation = e->generation};
        verdict = fn(c, &ev, reason, sizeof reason, c->cb_arg);
        reason[sizeof reason - 1] = 0;
    }
    if (verdict < 0 && !reason[0])
        snprintf(reason, sizeof reason, "%s", strerror(-verdict));
    if (verdict == KHOD_VETO && !reason[0])
        snprintf(reason, sizeof reason, "vetoed");
    uint64_t id = begin(c, "notify_reply", verdict < 0 ? 4 : 3);
    pk_str(c, "token");
    msgpack_pack_uint64(&c->pk, e->token);
    pk_str(c, "ok");
    verdict == 0 ? msgpack_pack_true(&c->pk) : msgpack_pack_false(&c->pk);
    pk_str(c, "reason");
    pk_str(c, reason);
    if (verdict < 0) {
        pk_str(c, "error");
        pk_str(c, reason);
    }
    int s = simple(c, "notify_reply", id);
    return s == -ENOENT ? 0 : s; /* the round ended already: nothing to do */
}

int khod_dispatch(khod_client *c, int timeout_ms)
{
    if (c->broken)
        return fail(c, c->broken_err, "%s", c->broken_why);
    int s = drain(c);
    if (s < 0)
        return s;
    if (c->ev_count == 0) {
        s = receive(c, timeout_ms, false);
        if (s < 0)
            return s;
        if (s > 0) {
            /* take whatever else is already there without waiting */
            while ((s = drain(c)) == 0 && (s = receive(c, 0, false)) > 0)
                ;
        }
    }
    if (c->broken) {
        c->ev_count = 0; /* no answer could reach the daemon: the round is over for us */
        return fail(c, c->broken_err, "%s", c->broken_why);
    }
    int answered = 0;
    while (c->ev_count > 0) {
        queued_event e = c->events[c->ev_head];
        c->ev_head = (c->ev_head + 1) % EVENT_QUEUE;
        c->ev_count--;
        if ((s = answer(c, &e)) < 0)
            return s;
        answered++;
    }
    c->errmsg[0] = c->errcode[0] = 0;
    return answered;
}

/* ------------------------------------------------------------------ status and operator */

int khod_status(khod_client *c, khod_status_info *info)
{
    uint64_t id = begin(c, "status", 0);
    reply r;
    int s = roundtrip(c, "status", id, &r);
    if (s < 0)
        return s;
    khod_status_info st = {0};
    const msgpack_object *o, *region = get(r.result, "region");
    if (!as_str(get(r.result, "state"), st.state, sizeof st.state))
        return malformed(c, &r, "status", "state");
    if (!as_u64(get(r.result, "generation"), &st.generation))
        return malformed(c, &r, "status", "generation");
    if (!as_u64(get(r.result, "pid"), &st.pid))
        return malformed(c, &r, "status", "pid");
    if (!as_u64(get(r.result, "connections"), &st.connections))
        return malformed(c, &r, "status", "connections");
    if (!(o = get(r.result, "frozen")) || o->type != MSGPACK_OBJECT_BOOLEAN)
        return malformed(c, &r, "status", "frozen");
    st.frozen = o->via.boolean;
    if (!as_u64(get(region, "free"), &st.region_free) ||
        !as_u64(get(region, "allocated"), &st.region_allocated) ||
        !as_u64(get(region, "preserved"), &st.region_preserved))
        return malformed(c, &r, "status", "region");
    if (!(o = get(r.result, "sessions")) || o->type != MSGPACK_OBJECT_ARRAY)
        return malformed(c, &r, "status", "sessions");
    st.sessions = o->via.array.size;
    reply_done(c, &r);
    if (info)
        *info = st;
    return 0;
}

int khod_finalize(khod_client *c, uint64_t *generation)
{
    return one_u64(c, "finalize", begin(c, "finalize", 0), "generation", generation);
}

int khod_unfreeze(khod_client *c) { return simple(c, "unfreeze", begin(c, "unfreeze", 0)); }

int khod_handover(khod_client *c, uint64_t *generation)
{
    return one_u64(c, "handover", begin(c, "handover", 0), "generation", generation);
}

int khod_fdt(khod_client *c, const char *which, void **dtb, size_t *len)
{
    int s = check_name(c, "which", which, 3);
    if (s < 0)
        return s;
    uint64_t id = begin(c, "fdt", 1);
    pk_str(c, "which");
    pk_str(c, which);
    return bin_value(c, "fdt", id, "fdt", dtb, len);
}

static int check_uid(khod_client *c, int64_t uid)
{
    if (uid > (int64_t)UINT32_MAX)
        return fail(c, EINVAL, "uid %lld is not in 0..2^32-1", (long long)uid);
    return 0;
}

int khod_release_unclaimed(khod_client *c, const char *session, int64_t uid,
                           uint64_t *released_bytes)
{
    int s;
    if ((session && (s = check_name(c, "session name", session, 64)) < 0) ||
        (s = check_uid(c, uid)) < 0)
        return s;
    uint64_t id = begin(c, "release_unclaimed", (session != NULL) + (uid >= 0));
    if (session) {
        pk_str(c, "session");
        pk_str(c, session);
    }
    if (uid >= 0) {
        pk_str(c, "uid");
        msgpack_pack_uint64(&c->pk, (uint64_t)uid);
    }
    return one_u64(c, "release_unclaimed", id, "released_bytes", released_bytes);
}

int khod_drop_session(khod_client *c, const char *name, int64_t uid, khod_drop_info *info)
{
    int s;
    if ((s = check_name(c, "session name", name, 64)) < 0 || (s = check_uid(c, uid)) < 0)
        return s;
    uint64_t id = begin(c, "drop_session", 1 + (uid >= 0));
    pk_str(c, "session");
    pk_str(c, name);
    if (uid >= 0) {
        pk_str(c, "uid");
        msgpack_pack_uint64(&c->pk, (uint64_t)uid);
    }
    reply r;
    if ((s = roundtrip(c, "drop_session", id, &r)) < 0)
        return s;
    khod_drop_info d;
    if (!as_u64(get(r.result, "freed_bytes"), &d.freed_bytes))
        return malformed(c, &r, "drop_session", "freed_bytes");
    if (!as_u64(get(r.result, "released_bytes"), &d.released_bytes))
        return malformed(c, &r, "drop_session", "released_bytes");
    if (!as_u64(get(r.result, "connections_closed"), &d.connections_closed))
        return malformed(c, &r, "drop_session", "connections_closed");
    reply_done(c, &r);
    if (info)
        *info = d;
    return 0;
}
