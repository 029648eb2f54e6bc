/* Internal to libkhodclient: message boundaries and limits (see frame.c). */
#ifndef KHOD_FRAME_H
#define KHOD_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* What the client accepts in one message (the reference client's limits,
 * docs/protocol.md §2), plus a bound on objects so that decoding one message
 * allocates at most a few hundred MiB of msgpack_object. */
#define KHOD_FRAME_MAX ((uint64_t)256 << 20)
#define KHOD_FRAME_MAX_ARRAY ((uint64_t)1 << 22)
#define KHOD_FRAME_MAX_MAP ((uint64_t)1 << 12)
#define KHOD_FRAME_MAX_OBJECTS ((uint64_t)1 << 22)

/*
 * Look for one complete msgpack message at the start of p[0..n).
 * 1: found, its length in *len; 0: incomplete, read more;
 * -1: the bytes break a limit or are not what the daemon sends (*why says which).
 */
int khod_frame_scan(const uint8_t *p, size_t n, size_t *len, const char **why);

#endif
