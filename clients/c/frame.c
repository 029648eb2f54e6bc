/*
 * Finding one msgpack message in the byte stream, with limits, before
 * msgpack-c decodes it (docs/protocol.md §2: no length prefix).
 *
 * Why not hand the stream to msgpack-c's unpacker directly: msgpack-c's C
 * unpacker has no limits; it allocates an array's or map's storage from the
 * length in its header before any element has arrived, so five hostile bytes
 * ("dd ff ff ff ff") would make it allocate ~100 GB. Here a message is only
 * decoded once all of its bytes are in the buffer, so every declared element
 * is backed by at least one received byte, and the limits below bound what
 * the decoder may allocate per message.
 */
#include "frame.h"

#include <string.h>

static uint64_t be(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

int khod_frame_scan(const uint8_t *p, size_t n, size_t *len, const char **why)
{
    uint64_t need = 1;    /* objects still to read */
    uint64_t objects = 0; /* objects seen, for KHOD_FRAME_MAX_OBJECTS */
    size_t pos = 0;

    while (need > 0) {
        if (pos >= n)
            goto more;
        uint8_t b = p[pos];
        unsigned hdr = 1;   /* header bytes */
        uint64_t body = 0;  /* payload bytes after the header */
        uint64_t items = 0; /* child objects */
        bool is_map = false;

        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            /* fixint, nil, bool */
        } else if (b >= 0x80 && b <= 0x8f) {
            items = b & 0x0f;
            is_map = true;
        } else if (b >= 0x90 && b <= 0x9f) {
            items = b & 0x0f;
        } else if (b >= 0xa0 && b <= 0xbf) {
            body = b & 0x1f;
        } else {
            unsigned lenbytes = 0;
            switch (b) {
            case 0xc4: case 0xd9: lenbytes = 1; break;          /* bin8, str8 */
            case 0xc5: case 0xda: lenbytes = 2; break;          /* bin16, str16 */
            case 0xc6: case 0xdb: lenbytes = 4; break;          /* bin32, str32 */
            case 0xca: body = 4; break;                         /* float32 */
            case 0xcb: body = 8; break;                         /* float64 */
            case 0xcc: case 0xd0: body = 1; break;              /* (u)int8 */
            case 0xcd: case 0xd1: body = 2; break;
            case 0xce: case 0xd2: body = 4; break;
            case 0xcf: case 0xd3: body = 8; break;
            case 0xdc: lenbytes = 2; items = 1; break;          /* array16 */
            case 0xdd: lenbytes = 4; items = 1; break;          /* array32 */
            case 0xde: lenbytes = 2; items = 1; is_map = true; break;
            case 0xdf: lenbytes = 4; items = 1; is_map = true; break;
            default:
                *why = "an ext type or the reserved byte 0xc1 (the daemon sends neither)";
                return -1;
            }
            if (lenbytes) {
                hdr += lenbytes;
                if (n - pos < hdr)
                    goto more;
                uint64_t v = be(p + pos + 1, lenbytes);
                if (items)
                    items = v;
                else
                    body = v;
            }
        }
        if (is_map) {
            if (items > KHOD_FRAME_MAX_MAP) {
                *why = "a map longer than the client accepts";
                return -1;
            }
            items *= 2;
        } else if (items > KHOD_FRAME_MAX_ARRAY) {
            *why = "an array longer than the client accepts";
            return -1;
        }
        if (body > KHOD_FRAME_MAX) {
            *why = "a string longer than a message may be";
            return -1;
        }
        objects += 1;
        if (objects > KHOD_FRAME_MAX_OBJECTS) {
            *why = "more objects in one message than the client accepts";
            return -1;
        }
        if ((uint64_t)pos + hdr + body > KHOD_FRAME_MAX) {
            *why = "a message larger than the client accepts";
            return -1;
        }
        if ((uint64_t)(n - pos) < hdr + body)
            return 0; /* the payload is not all here yet */
        pos += hdr + body;
        need = need - 1 + items;
    }
    *len = pos;
    return 1;
more:
    if (n > KHOD_FRAME_MAX) {
        *why = "a message larger than the client accepts";
        return -1;
    }
    return 0;
}
