/*
 * frame.h - msgsock's frame header codec in C (no Python): the native twin of
 * msgsock.framing (SPEC §4.1).  Header-only: every function is static inline.
 *
 * Theory of operation.  A frame is a header then a body.  The header is `header_size`
 * bytes: a length field of `length_size` bytes (1, 2, 4 or 8) at `length_offset`, and
 * the other (integer) header fields around it, each (offset, size, signed).  Every field
 * has the format's byte order.  The length counts the body, or the whole frame when
 * `includes_header` is set.  msf_scan() walks the complete frames at the start of a
 * buffer exactly as msgsock.framing.FrameDecoder._scan does:
 *
 *   - a header whose body size is above `max_body` stops the scan (MSF_TOO_LARGE, the
 *     size in r->size) before any of that body is needed;
 *   - with `includes_header`, a length smaller than the header stops it (MSF_TOO_SHORT,
 *     the raw length in r->length);
 *   - the good frames before a bad header are still counted (r->count, r->used);
 *   - else it stops at the first unfinished frame: r->partial says whether that frame's
 *     header is complete (then r->size is its body size, and msf_need() how many bytes
 *     from r->used complete it), or only part of a header is there.
 *
 * Safety: nothing reads at or past `len`; every sum is checked before it is formed (an
 * 8-byte length near 2**64, length + header), so no input can overflow a size_t or a
 * uint64_t.  fuzz/native/ runs these functions under AddressSanitizer and UBSan.
 *
 * The API is stable: the Python glue (speedups.c) and the native engine (engine*.c,
 * engine_rx.h) both use it.  The msf_* names are the API; the msgsock_frame_* functions
 * at the end are the same operations with out-parameters, for callers that prefer them.
 */
#ifndef MSGSOCK_FRAME_H
#define MSGSOCK_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The largest header and the most extra fields a native format holds.  A format beyond
 * them is refused by msf_format_init/msf_format_add_field (the caller then uses the pure
 * Python codec, which has no such limit). */
#define MSF_MAX_HEADER 256
#define MSF_MAX_FIELDS 32

/* Results (msf_scan_result.error, msf_header.error, return values). */
#define MSF_OK 0
#define MSF_TOO_LARGE 1 /* a body size above max_body (peer: MessageTooLarge; encode: OversizeMessage) */
#define MSF_TOO_SHORT 2 /* a length that includes the header is smaller than it (FrameError) */
#define MSF_BAD_VALUE 3 /* encode: a field value its size and signedness cannot hold */
#define MSF_BAD_FORMAT 4 /* a descriptor out of range */

/* An extra header field: where it is in the header, its width (1, 2, 4, 8), signedness. */
typedef struct {
    uint16_t offset;
    uint8_t size;
    uint8_t is_signed;
} msf_field;

/* A frame format.  Zero-initialise, then msf_format_init() (and msf_format_add_field()
 * for each extra field); or fill the first six members by hand (engine_rx.h does), with
 * nfields 0 when the fields' values are not needed -- the scanner reads only the length. */
typedef struct {
    unsigned length_size;   /* 1, 2, 4 or 8 */
    int big_endian;         /* 1: big-endian fields, 0: little-endian */
    int includes_header;    /* the length counts the header too */
    size_t length_offset;   /* bytes of fields before the length field */
    size_t header_size;     /* the whole header */
    uint64_t max_body;      /* the largest body accepted */
    unsigned nfields;       /* extra fields, wire order, the length field not among them */
    msf_field fields[MSF_MAX_FIELDS];
} msf_format;

typedef struct {
    size_t count;    /* complete good frames at the start of the buffer */
    size_t used;     /* their bytes, headers included */
    int error;       /* MSF_OK, or the header at `used` is bad: MSF_TOO_LARGE, MSF_TOO_SHORT */
    int partial;     /* no error: 1 = the header at `used` is complete, its frame is not */
    uint64_t length; /* error or partial: the raw length field at `used` */
    uint64_t size;   /* MSF_TOO_LARGE or partial: the body size it declares */
} msf_scan_result;

/* One parsed header (msf_parse_header). */
typedef struct {
    int error;       /* MSF_OK, MSF_TOO_LARGE, MSF_TOO_SHORT */
    uint64_t length; /* the raw length field */
    uint64_t size;   /* the body size (valid unless MSF_TOO_SHORT) */
    uint64_t values[MSF_MAX_FIELDS]; /* each extra field; a signed one as int64_t bits */
} msf_header;

/* -- integers on the wire ----------------------------------------------------------- */

static inline uint64_t msf_read_uint(const uint8_t *p, unsigned size, int big_endian) {
    uint64_t v = 0;
    if (big_endian) {
        for (unsigned i = 0; i < size; i++) v = (v << 8) | p[i];
    } else {
        for (unsigned i = size; i > 0; i--) v = (v << 8) | p[i - 1];
    }
    return v;
}

static inline void msf_write_uint(uint8_t *p, unsigned size, int big_endian, uint64_t v) {
    if (big_endian) {
        for (unsigned i = size; i > 0; i--) {
            p[i - 1] = (uint8_t)v;
            v >>= 8;
        }
    } else {
        for (unsigned i = 0; i < size; i++) {
            p[i] = (uint8_t)v;
            v >>= 8;
        }
    }
}

/* The largest value a field of `size` bytes holds, unsigned. */
static inline uint64_t msf_uint_max(unsigned size) {
    return size >= 8 ? UINT64_MAX : (((uint64_t)1 << (8 * size)) - 1);
}

/* A signed field's raw bits, sign-extended, as int64_t. */
static inline int64_t msf_sign_extend(uint64_t raw, unsigned size) {
    if (size >= 8) return (int64_t)raw;
    uint64_t sign = (uint64_t)1 << (8 * size - 1);
    if (raw & sign) return (int64_t)(raw | ~(sign | (sign - 1))); /* negative: set the high bits */
    return (int64_t)raw;
}

/* -- describing a format ------------------------------------------------------------ */

/* The largest body the length field can express (before max_body): its range, less the
 * header when the length counts it; 0 with *ok = 0 when it cannot even count the header. */
static inline uint64_t msf_length_limit(const msf_format *f, int *ok) {
    uint64_t limit = msf_uint_max(f->length_size);
    *ok = 1;
    if (f->includes_header) {
        if (limit < f->header_size) {
            *ok = 0;
            return 0;
        }
        limit -= f->header_size;
    }
    return limit;
}

/* Describe a format (no extra fields yet).  MSF_OK, or MSF_BAD_FORMAT (nothing valid
 * left in *f) for a width not 1, 2, 4, 8, a length field outside the header, a header
 * above MSF_MAX_HEADER, or an including length that cannot count the header. */
static inline int msf_format_init(msf_format *f, unsigned length_size, int big_endian, int includes_header,
                                  size_t length_offset, size_t header_size, uint64_t max_body) {
    int ok;
    memset(f, 0, sizeof *f);
    if (length_size != 1 && length_size != 2 && length_size != 4 && length_size != 8) return MSF_BAD_FORMAT;
    if (header_size > MSF_MAX_HEADER || length_offset > header_size || header_size - length_offset < length_size)
        return MSF_BAD_FORMAT;
    f->length_size = length_size;
    f->big_endian = big_endian ? 1 : 0;
    f->includes_header = includes_header ? 1 : 0;
    f->length_offset = length_offset;
    f->header_size = header_size;
    f->max_body = max_body;
    (void)msf_length_limit(f, &ok);
    if (!ok) {
        memset(f, 0, sizeof *f);
        return MSF_BAD_FORMAT;
    }
    return MSF_OK;
}

/* Add the next extra field (wire order).  MSF_OK, or MSF_BAD_FORMAT for a width not 1,
 * 2, 4, 8, a field outside the header or over the length field, or too many fields. */
static inline int msf_format_add_field(msf_format *f, size_t offset, unsigned size, int is_signed) {
    if (f->nfields >= MSF_MAX_FIELDS) return MSF_BAD_FORMAT;
    if (size != 1 && size != 2 && size != 4 && size != 8) return MSF_BAD_FORMAT;
    if (offset > f->header_size || f->header_size - offset < size) return MSF_BAD_FORMAT;
    if (offset < f->length_offset + f->length_size && f->length_offset < offset + size) return MSF_BAD_FORMAT;
    msf_field *fd = &f->fields[f->nfields++];
    fd->offset = (uint16_t)offset;
    fd->size = (uint8_t)size;
    fd->is_signed = is_signed ? 1 : 0;
    return MSF_OK;
}

/* -- decoding ----------------------------------------------------------------------- */

/* The raw length field of the header at p (header_size readable bytes). */
static inline uint64_t msf_length(const msf_format *f, const uint8_t *p) {
    return msf_read_uint(p + f->length_offset, f->length_size, f->big_endian);
}

/* Check one complete header at p (header_size readable bytes): MSF_OK, MSF_TOO_LARGE or
 * MSF_TOO_SHORT; the raw length in *length, the body size in *size (unless TOO_SHORT). */
static inline int msf_check_header(const msf_format *f, const uint8_t *p, uint64_t *length, uint64_t *size) {
    uint64_t n = msf_length(f, p);
    *length = n;
    if (f->includes_header) {
        if (n < f->header_size) {
            *size = 0;
            return MSF_TOO_SHORT;
        }
        n -= f->header_size;
    }
    *size = n;
    return n > f->max_body ? MSF_TOO_LARGE : MSF_OK;
}

/* The body size of a complete header already checked good (msf_scan counted it). */
static inline uint64_t msf_body_size(const msf_format *f, const uint8_t *p) {
    uint64_t n = msf_length(f, p);
    if (f->includes_header) n = n >= f->header_size ? n - f->header_size : 0;
    return n;
}

/* Extra field i of the header at p, raw (a signed field: its int64_t bits). */
static inline uint64_t msf_field_value(const msf_format *f, unsigned i, const uint8_t *p) {
    const msf_field *fd = &f->fields[i];
    uint64_t raw = msf_read_uint(p + fd->offset, fd->size, f->big_endian);
    return fd->is_signed ? (uint64_t)msf_sign_extend(raw, fd->size) : raw;
}

/* Parse the one complete header at p (header_size readable bytes): its check, and the
 * values of its extra fields.  Returns h->error. */
static inline int msf_parse_header(const msf_format *f, const uint8_t *p, msf_header *h) {
    h->error = msf_check_header(f, p, &h->length, &h->size);
    for (unsigned i = 0; i < f->nfields && i < MSF_MAX_FIELDS; i++) h->values[i] = msf_field_value(f, i, p);
    return h->error;
}

/* Walk the complete frames at the start of buf[0:len] (see the theory of operation). */
static inline void msf_scan(const msf_format *f, const uint8_t *buf, size_t len, msf_scan_result *r) {
    const size_t hsize = f->header_size;
    size_t pos = 0;
    r->count = 0;
    r->error = MSF_OK;
    r->partial = 0;
    r->length = 0;
    r->size = 0;
    while (hsize > 0 && len - pos >= hsize) {
        uint64_t length, size;
        int err = msf_check_header(f, buf + pos, &length, &size);
        if (err != MSF_OK) {
            r->error = err;
            r->length = length;
            r->size = size;
            break;
        }
        /* The room after this header; compared as uint64_t, never summed. */
        uint64_t room = (uint64_t)(len - pos - hsize);
        if (size > room) {
            r->partial = 1;
            r->length = length;
            r->size = size;
            break;
        }
        pos += hsize + (size_t)size;
        r->count++;
    }
    r->used = pos;
}

/* After a scan without error: the bytes from r->used that complete the unfinished frame
 * (its header alone when r->partial is 0).  Returns 0, or -1 when that count does not fit
 * a uint64_t (a declared body near 2**64 with an unlimited max_body): then *need is
 * UINT64_MAX and the true count is header_size + r->size. */
static inline int msf_need(const msf_format *f, const msf_scan_result *r, uint64_t *need) {
    if (!r->partial) {
        *need = f->header_size;
        return 0;
    }
    if (r->size > UINT64_MAX - f->header_size) {
        *need = UINT64_MAX;
        return -1;
    }
    *need = r->size + f->header_size;
    return 0;
}

/* -- encoding ----------------------------------------------------------------------- */

/* Write the length field for a body of body_len bytes into the header at head.  The
 * caller has checked body_len against the field's range (msf_encode_header does). */
static inline void msf_encode_length(const msf_format *f, uint64_t body_len, uint8_t *head) {
    uint64_t length = f->includes_header ? body_len + f->header_size : body_len;
    msf_write_uint(head + f->length_offset, f->length_size, f->big_endian, length);
}

/* Can extra field i hold `value` (a signed field: int64_t bits)? */
static inline int msf_value_fits(const msf_format *f, unsigned i, uint64_t value) {
    const msf_field *fd = &f->fields[i];
    if (fd->size >= 8) return 1;
    if (fd->is_signed) {
        int64_t v = (int64_t)value;
        int64_t hi = (int64_t)(((uint64_t)1 << (8 * fd->size - 1)) - 1);
        return v >= -hi - 1 && v <= hi;
    }
    return value <= msf_uint_max(fd->size);
}

/* Write the whole header (header_size bytes to out) for a body of body_len bytes, the
 * extra fields from values[0:nfields] (NULL: all 0; a signed field's value as int64_t
 * bits).  Returns MSF_OK; MSF_TOO_LARGE when body_len is above max_body or the length
 * field's range; MSF_BAD_VALUE when a value does not fit its field.  On error nothing
 * is written. */
static inline int msf_encode_header(const msf_format *f, uint64_t body_len, const uint64_t *values,
                                    uint8_t *out) {
    int ok;
    uint64_t limit = msf_length_limit(f, &ok);
    if (!ok || body_len > limit || body_len > f->max_body) return MSF_TOO_LARGE;
    if (values != NULL) {
        for (unsigned i = 0; i < f->nfields; i++)
            if (!msf_value_fits(f, i, values[i])) return MSF_BAD_VALUE;
    }
    memset(out, 0, f->header_size);
    msf_encode_length(f, body_len, out);
    if (values != NULL) {
        for (unsigned i = 0; i < f->nfields; i++) {
            const msf_field *fd = &f->fields[i];
            msf_write_uint(out + fd->offset, fd->size, f->big_endian, values[i]);
        }
    }
    return MSF_OK;
}

/* -- the same, with out-parameters --------------------------------------------------- */

typedef msf_format msgsock_frame_format;

/* msf_scan: *count, *used; *need as msf_need (saturated at UINT64_MAX; meaningless after
 * an error); *error MSF_OK / MSF_TOO_LARGE / MSF_TOO_SHORT.  Returns *error. */
static inline int msgsock_frame_scan(const msgsock_frame_format *desc, const uint8_t *buf, size_t len,
                                     size_t *count, size_t *used, uint64_t *need, int *error) {
    msf_scan_result r;
    msf_scan(desc, buf, len, &r);
    *count = r.count;
    *used = r.used;
    *error = r.error;
    if (r.error == MSF_OK)
        (void)msf_need(desc, &r, need);
    else
        *need = 0;
    return r.error;
}

static inline int msgsock_frame_parse_header(const msgsock_frame_format *desc, const uint8_t *p, msf_header *h) {
    return msf_parse_header(desc, p, h);
}

static inline int msgsock_frame_encode_header(const msgsock_frame_format *desc, uint64_t body_len,
                                              const uint64_t *values, uint8_t *out) {
    return msf_encode_header(desc, body_len, values, out);
}

#endif
