/*
 * engine_rx.h - the native engine's per-connection input state machine (no Python).
 *
 * Theory of operation.  A connection's input is the bytes it has read and not yet framed:
 * nothing at all most of the time (a read that ends at a frame boundary is framed in the
 * loop's read buffer and never copied), else the start of one frame, or a bad header and
 * what followed it (handed to the core to word).  ms_rx_scan() finds the complete frames
 * at the start of a buffer with frame.h's scanner -- the exact semantics of
 * msgsock.framing.FrameDecoder._scan: the declared size is checked against max_body
 * before anything is buffered for it, and a bad header stops the scan after the good
 * frames before it.  The held input only grows by what the peer really sent (never by
 * the size a header claims), geometrically, so a frame of N bytes costs O(N) copies.
 *
 * It is compiled without Python (fuzz/native/engine_fuzz.c drives it under
 * AddressSanitizer) and included by engine.c.
 */
#ifndef MSGSOCK_ENGINE_RX_H
#define MSGSOCK_ENGINE_RX_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"

typedef struct {
    uint8_t *buf;
    size_t len, cap;
} ms_rx;

typedef struct {
    uint64_t count; /* complete frames at the start */
    size_t used;    /* their bytes */
    int error;      /* nonzero: the header at `used` is bad (too large, or shorter than the header) */
} ms_scan_result;

static inline size_t ms_rx_held(const ms_rx *rx) { return rx->len; }
static inline const uint8_t *ms_rx_data(const ms_rx *rx) { return rx->buf; }

static inline void ms_rx_free(ms_rx *rx) {
    free(rx->buf);
    rx->buf = NULL;
    rx->len = rx->cap = 0;
}

/* Append n bytes; -1 when out of memory (nothing changed). */
static inline int ms_rx_append(ms_rx *rx, const uint8_t *data, size_t n) {
    if (n == 0) return 0;
    if (rx->len + n < rx->len) return -1;
    if (rx->len + n > rx->cap) {
        size_t cap = rx->cap ? rx->cap : 256;
        while (cap < rx->len + n) {
            if (cap > SIZE_MAX / 2) {
                cap = rx->len + n;
                break;
            }
            cap *= 2;
        }
        uint8_t *p = (uint8_t *)realloc(rx->buf, cap);
        if (p == NULL) return -1;
        rx->buf = p;
        rx->cap = cap;
    }
    memcpy(rx->buf + rx->len, data, n);
    rx->len += n;
    return 0;
}

/* Drop the first n held bytes (the frames just served). */
static inline void ms_rx_consume(ms_rx *rx, size_t n) {
    if (n >= rx->len) {
        rx->len = 0;
        if (rx->cap > 65536) ms_rx_free(rx); /* a large frame is done: give its memory back */
        return;
    }
    memmove(rx->buf, rx->buf + n, rx->len - n);
    rx->len -= n;
}

/* -- frames (frame.h) ----------------------------------------------------------------- */

typedef msf_format ms_format;
#define MS_MAX_HEADER MSF_MAX_HEADER

/* Describe a format: the length field's width (1, 2, 4, 8), byte order and whether it counts
 * the header; `before` and `after` bytes of other header fields around it; the largest body.
 * Returns -1 for a layout frame.h cannot hold. */
static inline int ms_rx_format_init(ms_format *f, unsigned length_size, int big_endian, int includes_header,
                                    size_t before, size_t after, uint64_t max_body) {
    if (before > MS_MAX_HEADER || after > MS_MAX_HEADER) return -1;
    return msf_format_init(f, length_size, big_endian, includes_header, before, before + length_size + after,
                           max_body) == MSF_OK
               ? 0
               : -1;
}

/* Write the length field of a frame of body_len bytes into the header at `head`. */
static inline void ms_rx_encode_length(const ms_format *f, uint64_t body_len, uint8_t *head) {
    msf_encode_length(f, body_len, head);
}

static inline void ms_rx_scan(const ms_format *f, const uint8_t *buf, size_t len, ms_scan_result *r) {
    msf_scan_result s;
    msf_scan(f, buf, len, &s);
    r->count = s.count;
    r->used = s.used;
    r->error = s.error != MSF_OK;
}

/* The header and body sizes of the complete, already scanned frame at p. */
static inline void ms_rx_frame(const ms_format *f, const uint8_t *p, size_t *hsize, size_t *bsize) {
    *hsize = f->header_size;
    *bsize = (size_t)msf_body_size(f, p);
}

/* Write the header of a reply of body_len bytes to `out`, its fields copied from the
 * request's header `request` (a reply keeps the request's header fields); its size. */
static inline size_t ms_rx_encode_header(const ms_format *f, const uint8_t *request, uint64_t body_len,
                                         uint8_t *out) {
    memcpy(out, request, f->header_size);
    ms_rx_encode_length(f, body_len, out);
    return f->header_size;
}

/* The complete frames of buf[0:used] with every body reversed (headers unchanged) to out. */
static inline void ms_rx_reverse_frames(const ms_format *f, const uint8_t *buf, size_t used, uint8_t *out) {
    size_t pos = 0;
    while (pos < used) {
        size_t h, b;
        ms_rx_frame(f, buf + pos, &h, &b);
        memcpy(out + pos, buf + pos, h);
        const uint8_t *src = buf + pos + h;
        uint8_t *dst = out + pos + h + b;
        for (size_t i = 0; i < b; i++) *--dst = src[i];
        pos += h + b;
    }
}

/* -- one read through the state machine --------------------------------------------------
 *
 *   ms_rx_view v;
 *   if (ms_rx_begin(rx, f, data, n, &v) < 0) ...out of memory...
 *   ...serve the v.sr.count complete frames of v.buf[0:v.sr.used]...
 *   if (ms_rx_end(rx, data, &v) < 0) ...out of memory...
 *   if (v.sr.error) ...the held input starts with a bad header: hand it to the core...
 *
 * A read that ends at a frame boundary with nothing held is framed where it lies (no copy);
 * otherwise the bytes are appended to what is held and framed there.
 */
typedef struct {
    const uint8_t *buf; /* where the frames are: the read itself, or the held input */
    size_t len;
    int in_place;       /* buf is the read (nothing was held) */
    ms_scan_result sr;
} ms_rx_view;

static inline int ms_rx_begin(ms_rx *rx, const ms_format *f, const uint8_t *data, size_t n, ms_rx_view *v) {
    if (rx->len) {
        if (ms_rx_append(rx, data, n) < 0) return -1;
        v->buf = rx->buf;
        v->len = rx->len;
        v->in_place = 0;
    } else {
        v->buf = data;
        v->len = n;
        v->in_place = 1;
    }
    ms_rx_scan(f, v->buf, v->len, &v->sr);
    return 0;
}

/* The frames of the view are served: hold the rest (a partial frame, or a bad header and
 * what follows it).  `data` is the read given to ms_rx_begin. */
static inline int ms_rx_end(ms_rx *rx, const uint8_t *data, const ms_rx_view *v) {
    if (v->in_place) {
        (void)data;
        return ms_rx_append(rx, v->buf + v->sr.used, v->len - v->sr.used);
    }
    ms_rx_consume(rx, v->sr.used);
    return 0;
}

#endif
