/*
 * libkhodclient -- the C client of khod, the Kexec HandOver daemon.
 *
 * It speaks the wire protocol of docs/protocol.md (msgpack maps over a Unix
 * stream socket, fds over SCM_RIGHTS) so that programs written in C (VMMs,
 * databases) can allocate memory from khod, map it, preserve it across a
 * handover and restore it in the successor.
 *
 *     khod_client *c;
 *     if (khod_connect(NULL, &c) < 0) ...;             // $KHOD_SOCKET or the default
 *     khod_hello(c, "vmm", true, NULL);                // persistent session "vmm"
 *     khod_folio f;
 *     khod_alloc_folio(c, 9, &f);                      // 2 MiB
 *     void *mem;
 *     khod_map(c, f.phys, KHOD_FOLIO_SIZE(f.order), &mem);
 *     ... write the memory ...
 *     khod_preserve_folio(c, f.phys, -1, NULL);
 *     khod_close(c);
 *
 * ERRORS. Every function returning int returns 0 (or a documented
 * non-negative value) on success and a negative errno value on failure. A
 * daemon error reply {code, message} (docs/protocol.md §4) maps its code to
 * the errno of the same name (EINVAL, ENOENT, EEXIST, EPERM, EBUSY, ENOMEM,
 * EOPNOTSUPP, ETIMEDOUT, EPROTO); khod_errmsg() returns its message, and
 * khod_errcode() the code as sent. The library's own failures use the same
 * codes: -EINVAL for bad arguments (nothing is sent), -ETIMEDOUT when no
 * reply came within the call timeout, -EPROTO when the connection is lost
 * (the daemon closed it, exited or sent bytes that are not the protocol):
 * after that every call fails -EPROTO at once, as the Python client does.
 * A connection the daemon refuses at accept (too many connections, §1)
 * fails every call with the refusal's code (-EBUSY) and message instead.
 *
 * BLOCKING. Every call sends one request and blocks until its reply has
 * arrived or the timeout (khod_set_timeout, default 60 s) has passed; the
 * timeout bounds the wait for the reply, not the sending of the request (the
 * daemon reads requests as they come). After -ETIMEDOUT the connection stays
 * usable: a late reply is recognised by its id and dropped. The socket is
 * blocking and owned by the client; do not read or write it. Events that
 * arrive meanwhile are queued, not run (see khod_dispatch). `finalize` and
 * `unfreeze` wait for the notifier round (up to server.notifier_timeout_s).
 * Before it sleeps, a call polls the socket for its reply for up to 100 µs
 * (adaptive; khod_set_busy_poll, $KHOCLIENT_BUSY_POLL_US).
 *
 * LIMITS. The client decodes a message only once all of it has arrived and
 * refuses (-EPROTO, connection closed) one of more than 256 MiB, an array of
 * more than 2^22 entries, a map of more than 4096, more than 2^22 objects in
 * all, or ext types: what a broken or hostile peer sends cannot make it
 * allocate more than a bounded multiple of the bytes it really sent.
 *
 * THREAD-SAFETY. A khod_client is not thread-safe: use it from one thread
 * at a time (or guard it with a mutex of your own). Different clients are
 * independent; the library keeps no global state. Notifier callbacks run
 * on the thread that calls khod_dispatch(), and may call the same client
 * (but not khod_close it).
 *
 * FILE DESCRIPTORS. The socket and the region fd (passed by the daemon with
 * `region`) belong to the client: khod_close() closes both. khod_region()
 * returns the region fd for mmap; do not close it; a later khod_region()
 * replaces it. Mappings made with khod_map() belong to the caller and stay
 * valid after khod_close() (munmap them yourself). Any other fd the daemon
 * sends is closed. All fds the library creates are close-on-exec.
 *
 * MEMORY. Results that are arrays (khod_folio lists, property values, FDT
 * blobs, a khod_node with its names) are allocated with malloc() and owned
 * by the caller (free() them, a khod_node in one free()). Nothing
 * else needs freeing but the client itself.
 *
 * SIGNALS. Sends use MSG_NOSIGNAL: a closed socket gives -EPROTO, never
 * SIGPIPE. Calls interrupted by a signal are resumed.
 */
#ifndef KHODCLIENT_H
#define KHODCLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KHOD_DEFAULT_SOCKET "/run/khod/khod.sock"
#define KHOD_PAGE_SIZE 4096u
#define KHOD_MAX_ORDER 18
#define KHOD_FOLIO_SIZE(order) ((uint64_t)KHOD_PAGE_SIZE << (order))

/* Returned by a notifier callback to veto a finalize (with the reason it wrote). */
#define KHOD_VETO 1

typedef struct khod_client khod_client;

typedef struct {
    uint64_t phys;   /* first byte */
    unsigned order;  /* 2^order pages */
} khod_folio;

typedef struct {
    char session[32];
    bool created;        /* false: reattached */
    uint32_t uid;        /* the session's owner */
    bool persistent;     /* the flag now in effect */
    uint64_t generation;
    bool incoming;       /* the predecessor handed memory or a tree over under this name */
    uint64_t incoming_bytes;
} khod_hello_info;

typedef struct {
    int fd;              /* owned by the client: do not close */
    uint64_t base;       /* phys of the region's first byte */
    uint64_t size;
    uint64_t map_offset; /* file offset of `base` in fd */
    char backend[16];    /* "file", "devmem" or "dax" */
} khod_region_info;

typedef struct {
    char state[16];      /* active, finalizing, frozen, finalized, handed_over */
    uint64_t generation;
    uint64_t pid;
    uint64_t connections;
    bool frozen;
    uint64_t region_free, region_allocated, region_preserved;
    size_t sessions;     /* sessions this caller may see */
} khod_status_info;

/* A node of the KHO tree (khod_get_node): one malloc'd block, free() it whole. */
typedef struct {
    size_t nprops, nchildren;
    char **props;        /* nprops property names, sorted */
    char **children;     /* nchildren child node names, sorted */
} khod_node;

typedef struct {
    uint64_t freed_bytes;        /* allocated or restored memory given back */
    uint64_t released_bytes;     /* handed-over memory never restored, given back */
    uint64_t connections_closed; /* connections that spoke for it, cut off */
} khod_drop_info;

typedef struct {
    const char *name;    /* "finalize" or "unfreeze" */
    uint64_t token;
    uint64_t generation; /* the daemon's current generation */
} khod_event;

/*
 * A notifier callback. Return 0 to answer ok; KHOD_VETO to veto (a finalize)
 * with the NUL-terminated reason written into `reason` (at most
 * reason_size bytes, "vetoed" if left empty); a negative errno to answer
 * with an error (the reason, or that errno's name, is the message).
 */
typedef int (*khod_notify_fn)(khod_client *c, const khod_event *ev, char *reason,
                              size_t reason_size, void *arg);

/* ------------------------------------------------------------------ connection */

/* Connect to `path` (NULL: $KHOD_SOCKET, else KHOD_DEFAULT_SOCKET). */
int khod_connect(const char *path, khod_client **out);
/* Wrap an already connected socket; the client owns `fd` from now on, also on failure. */
int khod_from_fd(int fd, khod_client **out);
/* Close the socket, the region fd and every queued fd; free the client. NULL is fine. */
void khod_close(khod_client *c);
/* The socket fd (for poll(); owned by the client). */
int khod_fd(const khod_client *c);
/* Per-call timeout in milliseconds; negative: wait for ever. Default 60000. */
void khod_set_timeout(khod_client *c, int timeout_ms);
/* How long a call polls the socket for its reply before it sleeps, in
 * microseconds (0: never). On a VM a sleeping caller or daemon costs tens of
 * microseconds to wake, more than a small request. Adaptive: each time the
 * budget runs out, twice as many calls (up to 1024) sleep at once; a reply
 * within the budget ends that. Default: $KHOCLIENT_BUSY_POLL_US (which
 * khod_connect/khod_from_fd refuse with -EINVAL unless 0..1000000), else 100.
 * -EINVAL for a value outside 0..1000000. */
int khod_set_busy_poll(khod_client *c, int us);
/* Largest request the client sends (default 16 MiB, the daemon's default
 * limits.max_frame); a larger request fails -EINVAL before anything is sent. */
void khod_set_max_request(khod_client *c, size_t bytes);
/* The message and code of the last call's failure ("" after a call that succeeded).
 * Valid until the next call on this client. */
const char *khod_errmsg(const khod_client *c);
const char *khod_errcode(const khod_client *c);

/* ------------------------------------------------------------------ session and region */

int khod_hello(khod_client *c, const char *name, bool persistent, khod_hello_info *info);
/* hello naming the session's owner (another uid than the caller's: root only). */
int khod_hello_uid(khod_client *c, const char *name, bool persistent, uint32_t uid,
                   khod_hello_info *info);
/* Fetch the session's memory fd and the region's geometry (fd kept by the client). */
int khod_region(khod_client *c, khod_region_info *info);
/* mmap [phys, phys+len) read-write shared (calls khod_region first if needed). */
int khod_map(khod_client *c, uint64_t phys, size_t len, void **addr);
int khod_ping(khod_client *c);

/* ------------------------------------------------------------------ memory */

int khod_alloc_folio(khod_client *c, unsigned order, khod_folio *out);
/* `count` folios of one order, all or none; their phys into phys_out[count]. */
int khod_alloc_folios(khod_client *c, unsigned order, size_t count, uint64_t *phys_out);
int khod_free_folio(khod_client *c, uint64_t phys);
int khod_free_folios(khod_client *c, const uint64_t *phys, size_t n);

/* ------------------------------------------------------------------ preservation */

/* order < 0: the order of the allocation at phys. *order_out (may be NULL): recorded. */
int khod_preserve_folio(khod_client *c, uint64_t phys, int order, unsigned *order_out);
int khod_unpreserve_folio(khod_client *c, uint64_t phys, int order, unsigned *order_out);
/*
 * Batches, all or none (sent packed, docs/protocol.md §6.1). Orders: `orders`
 * (n entries) if not NULL, else `order` for every folio if >= 0, else each
 * entry's allocation (or preserved) order.
 */
int khod_preserve_folios(khod_client *c, const uint64_t *phys, size_t n,
                         const uint8_t *orders, int order);
int khod_unpreserve_folios(khod_client *c, const uint64_t *phys, size_t n,
                           const uint8_t *orders, int order);
/* A byte range split into folios (docs/format.md §5): the folios recorded into *folios
 * (malloc'd, *n entries; pass folios == NULL not to get them). */
int khod_preserve_phys(khod_client *c, uint64_t phys, uint64_t size, khod_folio **folios,
                       size_t *n);
int khod_unpreserve_phys(khod_client *c, uint64_t phys, uint64_t size, khod_folio **folios,
                         size_t *n);
/* Several ranges; *nfolios (may be NULL): folios recorded. */
int khod_preserve_phys_ranges(khod_client *c, const uint64_t *phys, const uint64_t *sizes,
                              size_t n, uint64_t *nfolios);
int khod_unpreserve_phys_ranges(khod_client *c, const uint64_t *phys, const uint64_t *sizes,
                                size_t n, uint64_t *nfolios);

/* ------------------------------------------------------------------ restore */

int khod_restore_folio(khod_client *c, uint64_t phys, khod_folio *out);
/* All or none; the order of each into orders_out[n] (may be NULL). */
int khod_restore_folios(khod_client *c, const uint64_t *phys, size_t n, uint8_t *orders_out);
int khod_restore_phys(khod_client *c, uint64_t phys, uint64_t size, khod_folio **folios,
                      size_t *n);

/* ------------------------------------------------------------------ KHO tree */

/* Paths are relative to the session's node ("/", "/a/b"). *created / *added may be NULL. */
int khod_add_node(khod_client *c, const char *path, bool *created);
int khod_add_prop(khod_client *c, const char *path, const char *name, const void *value,
                  size_t len, bool *added);
int khod_add_string_prop(khod_client *c, const char *path, const char *name,
                         const char *value, bool *added);
int khod_remove_node(khod_client *c, const char *path);
/* The removed bytes into *value (malloc'd; pass NULL to drop them). */
int khod_remove_prop(khod_client *c, const char *path, const char *name, void **value,
                     size_t *len);
/* tree: "in" (the incoming tree, also for NULL) or "out". *value is malloc'd. */
int khod_get_prop(khod_client *c, const char *path, const char *name, const char *tree,
                  void **value, size_t *len);
/* The property and child names of the node at `path`; tree as khod_get_prop.
 * *node is one malloc'd block: free(*node). */
int khod_get_node(khod_client *c, const char *path, const char *tree, khod_node **node);

/* ------------------------------------------------------------------ events */

/*
 * Subscribe this connection to FINALIZE and/or UNFREEZE (NULL: not that one;
 * both NULL unsubscribes). The callbacks run inside khod_dispatch().
 */
int khod_subscribe(khod_client *c, khod_notify_fn on_finalize, khod_notify_fn on_unfreeze,
                   void *arg);
/*
 * Read what the daemon sent (waiting up to timeout_ms for something, 0: not
 * at all, negative: for ever), run the callbacks of queued notifier events
 * and answer each with notify_reply. Returns the number of events answered,
 * or a negative errno (-EPROTO: the connection is gone, e.g. after a
 * handover). A subscribed client must call it often enough to answer within
 * the daemon's server.notifier_timeout_s. Events can be queued inside other
 * calls, so poll(khod_fd()) alone may miss them: call khod_dispatch (with
 * timeout 0) after other calls, or use its timeout instead of poll.
 */
int khod_dispatch(khod_client *c, int timeout_ms);
/* True once a `handover` event arrived (its generation into *generation, may be NULL). */
bool khod_handed_over(const khod_client *c, uint64_t *generation);

/* ------------------------------------------------------------------ status and operator */

int khod_status(khod_client *c, khod_status_info *info);
/* Operator operations (root or server.operator_group). *generation may be NULL. */
int khod_finalize(khod_client *c, uint64_t *generation);
int khod_unfreeze(khod_client *c);
int khod_handover(khod_client *c, uint64_t *generation);
/* An FDT blob: which = "out" (the committed handover's) or "in" (the one this daemon
 * took in). *dtb is malloc'd; -ENOENT when there is none. */
int khod_fdt(khod_client *c, const char *which, void **dtb, size_t *len);
/* Give back incoming memory nobody restored: of sessions called `session` (NULL: any
 * name) of `uid` (negative: any uid). *released_bytes may be NULL. */
int khod_release_unclaimed(khod_client *c, const char *session, int64_t uid,
                           uint64_t *released_bytes);
/* Discard session `name` of `uid` (negative: the caller's) for good, live and handed
 * over (only while active). *info may be NULL. */
int khod_drop_session(khod_client *c, const char *name, int64_t uid, khod_drop_info *info);

#ifdef __cplusplus
}
#endif
#endif /* KHODCLIENT_H */
