/*
 * khod-c-fuzz [SEED] [CASES]: libkhodclient against hostile replies.
 *
 * The fake server is the other end of a socketpair: before each call it
 * writes what a broken or malicious daemon could send (truncated frames,
 * wrong types, huge declared lengths, stray or excess fds, event floods,
 * mutations of valid replies), then shuts its writing side. The client must
 * return 0 or a negative errno for every call, never crash, leak memory
 * (run under ASan/LSan) or leak a file descriptor (counted in /proc/self/fd).
 * The named cases check the exact outcome; the random ones are seeded.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "khodclient.h"

static int open_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint64_t next(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return rng;
}

/* ------------------------------------------------------------------ building replies */

typedef struct {
    msgpack_sbuffer sb;
    msgpack_packer pk;
} buf;

static void b_init(buf *b)
{
    msgpack_sbuffer_init(&b->sb);
    msgpack_packer_init(&b->pk, &b->sb, msgpack_sbuffer_write);
}

static void s(buf *b, const char *str)
{
    msgpack_pack_str(&b->pk, strlen(str));
    msgpack_pack_str_body(&b->pk, str, strlen(str));
}


/* {"id": 1, "result": {<k>: <v>...}} with values chosen by `kind` */
enum { OK_VALUES, WRONG_TYPES };

static void value(buf *b, int kind, const char *key)
{
    if (kind == WRONG_TYPES) {
        switch (next() % 7) {
        case 0: s(b, "0x1000"); return;
        case 1: msgpack_pack_int64(&b->pk, -5); return;
        case 2: msgpack_pack_nil(&b->pk); return;
        case 3: msgpack_pack_double(&b->pk, 1.5); return;
        case 4: msgpack_pack_array(&b->pk, 1); msgpack_pack_map(&b->pk, 0); return;
        case 5: msgpack_pack_bin(&b->pk, 3); msgpack_pack_bin_body(&b->pk, "abc", 3); return;
        default: msgpack_pack_true(&b->pk); return;
        }
    }
    if (!strcmp(key, "phys") || !strcmp(key, "base"))
        msgpack_pack_uint64(&b->pk, 0x100400000ULL);
    else if (!strcmp(key, "size"))
        msgpack_pack_uint64(&b->pk, 256 << 20);
    else if (!strcmp(key, "backend") || !strcmp(key, "session") || !strcmp(key, "state"))
        s(b, "file");
    else if (!strcmp(key, "created") || !strcmp(key, "persistent") ||
             !strcmp(key, "incoming") || !strcmp(key, "frozen") || !strcmp(key, "added"))
        msgpack_pack_true(&b->pk);
    else if (!strcmp(key, "value")) {
        msgpack_pack_bin(&b->pk, 8);
        msgpack_pack_bin_body(&b->pk, "12345678", 8);
    } else if (!strcmp(key, "fdt")) {
        msgpack_pack_bin(&b->pk, 4);
        msgpack_pack_bin_body(&b->pk, "\xd0\x0d\xfe\xed", 4);
    } else if (!strcmp(key, "props") || !strcmp(key, "children")) {
        msgpack_pack_array(&b->pk, 2);
        s(b, "a");
        s(b, next() % 2 ? "b" : "");
    } else if (!strcmp(key, "folios")) {
        msgpack_pack_array(&b->pk, 2);
        for (int i = 0; i < 2; i++) {
            msgpack_pack_array(&b->pk, 2);
            msgpack_pack_uint64(&b->pk, 0x100400000ULL + 4096 * (uint64_t)i);
            msgpack_pack_uint8(&b->pk, 0);
        }
    } else
        msgpack_pack_uint8(&b->pk, 0);
}

static const char *const KEYS[][8] = {
    /* per call below: the result keys a valid reply has */
    {"session", "created", "uid", "persistent", "generation", "incoming", "incoming_bytes", 0},
    {"base", "size", "map_offset", "backend", 0},
    {"phys", "order", 0},
    {"order", 0},
    {"folios", 0},
    {"value", 0},
    {"state", "generation", "pid", "connections", "frozen", 0},
    {"count", 0},
    {"props", "children", 0},
    {"fdt", 0},
    {"freed_bytes", "released_bytes", "connections_closed", 0},
    {"released_bytes", 0},
};
#define NCALLS 14

/* The KEYS row of a call's valid reply (alloc_folios and restore_folios get others'). */
static int keys_of(int call) { return call < 8 ? call : call < 10 ? call - 8 : call - 2; }

static void reply(buf *b, int call, int kind, uint64_t nfds)
{
    msgpack_pack_map(&b->pk, nfds ? 3 : 2);
    s(b, "id");
    msgpack_pack_uint8(&b->pk, 1);
    if (nfds) {
        s(b, "nfds");
        msgpack_pack_uint64(&b->pk, nfds);
    }
    s(b, "result");
    const char *const *keys = KEYS[call];
    int n = 0;
    while (keys[n])
        n++;
    msgpack_pack_map(&b->pk, (size_t)n);
    for (int i = 0; i < n; i++) {
        s(b, keys[i]);
        value(b, kind, keys[i]);
    }
}

/* Run the call the reply was built for (`call` indexes KEYS, plus a few more). */
static int run_call(khod_client *c, int call)
{
    switch (call) {
    case 0: {
        khod_hello_info h;
        return khod_hello(c, "x", true, &h);
    }
    case 1: {
        khod_region_info g;
        return khod_region(c, &g);
    }
    case 2: {
        khod_folio f;
        return khod_alloc_folio(c, 0, &f);
    }
    case 3:
        return khod_preserve_folio(c, 0x100400000ULL, -1, NULL);
    case 4: {
        khod_folio *l = NULL;
        size_t n = 0;
        int r = khod_preserve_phys(c, 0x100400000ULL, 8192, &l, &n);
        free(l);
        return r;
    }
    case 5: {
        void *v = NULL;
        size_t n;
        int r = khod_get_prop(c, "/", "p", NULL, &v, &n);
        free(v);
        return r;
    }
    case 6: {
        khod_status_info st;
        return khod_status(c, &st);
    }
    case 7: {
        uint64_t p[2] = {0x100400000ULL, 0x100401000ULL};
        return khod_preserve_folios(c, p, 2, NULL, 0);
    }
    case 8: {
        uint64_t p[4];
        return khod_alloc_folios(c, 0, 4, p);
    }
    case 9: {
        uint8_t o[3];
        uint64_t p[3] = {1, 2, 3};
        return khod_restore_folios(c, p, 3, o);
    }
    case 10: {
        khod_node *n = NULL;
        int r = khod_get_node(c, "/", NULL, &n);
        if (r >= 0 && n) /* every name readable, as a caller would read them */
            for (size_t i = 0; i < n->nprops + n->nchildren; i++)
                r += (int)(strlen(i < n->nprops ? n->props[i] : n->children[i - n->nprops]) & 0);
        free(n);
        return r;
    }
    case 11: {
        void *v = NULL;
        size_t n;
        int r = khod_fdt(c, "in", &v, &n);
        free(v);
        return r;
    }
    case 12: {
        khod_drop_info d;
        return khod_drop_session(c, "x", 1000, &d);
    }
    default:
        return khod_release_unclaimed(c, NULL, -1, NULL);
    }
}

static int acceptable(int r)
{
    return r >= 0 || r == -EPROTO || r == -ETIMEDOUT || r == -EINVAL || r == -ENOENT ||
           r == -EEXIST || r == -EPERM || r == -EBUSY || r == -ENOMEM || r == -EOPNOTSUPP;
}

static int devnull = -1;
static char last_msg[700]; /* the message of the last exchange's call */

/* Send `fds` copies of /dev/null's fd with the first byte (or alone). */
static void send_with_fds(int sock, const void *p, size_t n, int nfds)
{
    size_t sent = 0;
    if (nfds > 0) {
        int fds[32];
        for (int i = 0; i < nfds && i < 32; i++)
            fds[i] = devnull;
        union {
            char b[CMSG_SPACE(32 * sizeof(int))];
            struct cmsghdr a;
        } ctl;
        memset(&ctl, 0, sizeof ctl);
        struct iovec iov = {.iov_base = (void *)(n ? p : "\xc0"), .iov_len = 1};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
                            .msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int))};
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(cm), fds, (size_t)nfds * sizeof(int));
        if (sendmsg(sock, &mh, 0) == 1 && n)
            sent = 1;
    }
    while (sent < n) {
        ssize_t w = send(sock, (const char *)p + sent, n - sent, 0);
        if (w <= 0)
            break;
        sent += (size_t)w;
    }
}

/*
 * One exchange: the server's bytes (and fds) are queued, its writing side shut,
 * then `call` runs, then a ping and a dispatch. Returns the call's result.
 */
static int exchange(const void *bytes, size_t n, int nfds, int call, bool keep_open)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        perror("socketpair");
        exit(2);
    }
    int size = 4 << 20;
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    send_with_fds(sv[1], bytes, n, nfds);
    if (!keep_open)
        shutdown(sv[1], SHUT_WR);
    khod_client *c;
    if (khod_from_fd(sv[0], &c) < 0)
        exit(2);
    khod_set_timeout(c, 20);
    int r = run_call(c, call);
    snprintf(last_msg, sizeof last_msg, "%s", khod_errmsg(c));
    CHECK(acceptable(r), "call %d returned %d", call, r);
    CHECK(r >= 0 || khod_errmsg(c)[0], "a failure without a message (call %d, %d)", call, r);
    int p = khod_ping(c);
    CHECK(acceptable(p), "ping returned %d", p);
    int d = khod_dispatch(c, 0);
    CHECK(d >= 0 || acceptable(d), "dispatch returned %d", d);
    khod_close(c);
    close(sv[1]);
    return r;
}

static void named(const char *what, const void *bytes, size_t n, int nfds, int call, int want,
                  const char *msg_part)
{
    int before = open_fds();
    int r = exchange(bytes, n, nfds, call, false);
    CHECK(r == want, "%s: got %d, want %d", what, r, want);
    CHECK(strstr(last_msg, msg_part), "%s: message '%s' lacks '%s'", what, last_msg, msg_part);
    CHECK(open_fds() == before, "%s: fds leaked (%d -> %d)", what, before, open_fds());
}

static void named_cases(void)
{
    /* huge declared lengths: refused from the header, nothing allocated */
    named("array32 of 2^32-1", "\xdd\xff\xff\xff\xff", 5, 0, 2, -EPROTO, "array");
    named("map32 of 2^32-1", "\xdf\xff\xff\xff\xff", 5, 0, 2, -EPROTO, "map");
    named("bin32 of 4 GiB", "\xc6\xff\xff\xff\xff", 5, 0, 2, -EPROTO, "string");
    named("str32 of 300 MiB", "\xdb\x12\xc0\x00\x00", 5, 0, 2, -EPROTO, "");
    named("array of 4M then EOF", "\xdd\x00\x40\x00\x00\xc0\xc0", 7, 0, 2, -EPROTO, "closed");
    named("array16 then EOF", "\xdc\x00\x10\x01", 4, 0, 2, -EPROTO, "closed");
    named("ext8", "\xc7\x01\x05\x00", 4, 0, 2, -EPROTO, "ext");
    named("fixext", "\xd4\x01\x00", 3, 0, 2, -EPROTO, "ext");
    named("0xc1", "\xc1", 1, 0, 2, -EPROTO, "");
    named("nothing at all", "", 0, 0, 2, -EPROTO, "closed");
    char deep[200];
    memset(deep, 0x91, sizeof deep);
    deep[sizeof deep - 1] = 0xc0;
    named("nested 199 deep", deep, sizeof deep, 0, 2, -EPROTO, "nested");

    buf b;
    /* a reply that is not a map, then a map without result */
    b_init(&b);
    msgpack_pack_array(&b.pk, 0);
    msgpack_pack_map(&b.pk, 1);
    s(&b, "id");
    msgpack_pack_uint8(&b.pk, 1);
    named("reply without result", b.sb.data, b.sb.size, 0, 2, -EPROTO, "no result");
    msgpack_sbuffer_destroy(&b.sb);

    /* error replies: known code, unknown code, code of the wrong type */
    const char *codes[] = {"EBUSY", "EWHAT", NULL};
    int want[] = {-EBUSY, -EPROTO, -EPROTO};
    for (int i = 0; i < 3; i++) {
        b_init(&b);
        msgpack_pack_map(&b.pk, 2);
        s(&b, "id");
        msgpack_pack_uint8(&b.pk, 1);
        s(&b, "error");
        msgpack_pack_map(&b.pk, 2);
        s(&b, "code");
        codes[i] ? s(&b, codes[i]) : msgpack_pack_int(&b.pk, 7);
        s(&b, "message");
        s(&b, "frozen");
        named("error reply", b.sb.data, b.sb.size, 0, 2, want[i], "");
        msgpack_sbuffer_destroy(&b.sb);
    }

    /* refused at accept: an error for no request, then the end (docs/protocol.md §1) */
    b_init(&b);
    msgpack_pack_map(&b.pk, 2);
    s(&b, "id");
    msgpack_pack_nil(&b.pk);
    s(&b, "error");
    msgpack_pack_map(&b.pk, 2);
    s(&b, "code");
    s(&b, "EBUSY");
    s(&b, "message");
    s(&b, "uid 0 has too many connections (limits.max_connections_per_uid)");
    named("refused at accept", b.sb.data, b.sb.size, 0, 2, -EBUSY, "too many connections");
    msgpack_sbuffer_destroy(&b.sb);

    /* region with its fd, with nfds but no fd, with 20 fds (control buffer truncated) */
    b_init(&b);
    reply(&b, 1, OK_VALUES, 1);
    named("region with an fd", b.sb.data, b.sb.size, 1, 1, 0, "");
    named("region with nfds and no fd", b.sb.data, b.sb.size, 0, 1, -EPROTO, "no file");
    named("region with 20 fds", b.sb.data, b.sb.size, 20, 1, -EPROTO, "truncated");
    named("alloc reply with 3 stray fds", b.sb.data, b.sb.size, 3, 2, -EPROTO, "");
    msgpack_sbuffer_destroy(&b.sb);
    b_init(&b);
    reply(&b, 1, OK_VALUES, 1000000);
    named("region claiming a million fds", b.sb.data, b.sb.size, 2, 1, 0, "");
    msgpack_sbuffer_destroy(&b.sb);

    /* a flood of events before the reply: queued (bounded), answered into a closed pipe */
    b_init(&b);
    for (int i = 0; i < 200; i++) {
        msgpack_pack_map(&b.pk, 3);
        s(&b, "event");
        s(&b, i % 2 ? "finalize" : "unfreeze");
        s(&b, "token");
        msgpack_pack_uint64(&b.pk, (uint64_t)i + 1);
        s(&b, "generation");
        msgpack_pack_int64(&b.pk, -1);
    }
    reply(&b, 2, OK_VALUES, 0);
    named("200 events, then the reply", b.sb.data, b.sb.size, 0, 2, 0, "");
    msgpack_sbuffer_destroy(&b.sb);

    /* the reply comes for another id, never for ours: timeout (the server stays open) */
    b_init(&b);
    reply(&b, 2, OK_VALUES, 0);
    b.sb.data[4] = 2; /* id 2 */
    int before = open_fds();
    int r = exchange(b.sb.data, b.sb.size, 0, 2, true);
    CHECK(r == -ETIMEDOUT, "reply for another id: %d", r);
    CHECK(open_fds() == before, "fds leaked");
    msgpack_sbuffer_destroy(&b.sb);
}

static void random_cases(long cases)
{
    int before = open_fds();
    for (long i = 0; i < cases; i++) {
        int call = (int)(next() % NCALLS);
        int kind = next() % 3 == 0 ? WRONG_TYPES : OK_VALUES;
        buf b;
        b_init(&b);
        if (next() % 4 == 0) { /* an event or two first */
            msgpack_pack_map(&b.pk, 2);
            s(&b, "event");
            s(&b, next() % 2 ? "finalize" : "handover");
            s(&b, next() % 2 ? "token" : "generation");
            value(&b, kind, "phys");
        }
        reply(&b, keys_of(call), kind, next() % 5 == 0 ? next() % 3 : 0);
        size_t n = b.sb.size;
        char *p = malloc(n + 16);
        memcpy(p, b.sb.data, n);
        switch (next() % 5) {
        case 0: /* truncate */
            n = next() % n;
            break;
        case 1: /* flip bytes */
            for (int k = (int)(next() % 4); k >= 0; k--)
                p[next() % n] ^= (char)(1u << (next() % 8));
            break;
        case 2: { /* a hostile header in place of a byte */
            static const char *const hdr[] = {"\xdd\xff\xff\xff\xff", "\xc6\x7f\xff\xff\xff",
                                              "\xdf\x00\x01\x00\x00", "\xc1",
                                              "\xdb\x00\x00\xff\xff", "\xd9\xff"};
            const char *h = hdr[next() % 6];
            size_t at = next() % n, hl = strlen(h) ? strlen(h) : 1;
            if (at + hl <= n)
                memcpy(p + at, h, hl);
            break;
        }
        case 3: /* random bytes appended */
            for (int k = 0; k < 16; k++)
                p[n++] = (char)next();
            break;
        default: /* as built (wrong types, or valid) */
            break;
        }
        int fds = next() % 8 == 0 ? (int)(next() % 20) : 0;
        int r = exchange(p, n, fds, call, false);
        (void)r;
        free(p);
        msgpack_sbuffer_destroy(&b.sb);
        int now = open_fds();
        if (now != before) {
            CHECK(0, "case %ld leaked fds (%d -> %d)", i, before, now);
            before = now;
        }
        if (failures > 20)
            break;
    }
}

int main(int argc, char **argv)
{
    if (argc > 1)
        rng = strtoull(argv[1], NULL, 0) | 1;
    long cases = argc > 2 ? atol(argv[2]) : 20000;
    devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    named_cases();
    random_cases(cases);
    printf("fuzz: seed %s, %ld random cases, %d failures\n", argc > 1 ? argv[1] : "default",
           cases, failures);
    return failures ? 1 : 0;
}
