/*
 * frame_fuzz.c - frame.h (the native frame scanner, header parser and encoder) under
 * AddressSanitizer and UBSan, checked against a simple reference written here.
 *
 * One input = a frame format (its first 6 bytes: length width, byte order, whether the
 * length counts the header, up to 3 extra fields before and after it with their widths
 * and signedness, max_body), a seed for the way the stream is cut into reads, and the
 * stream (the rest).  For each input:
 *
 * - msf_format_init/msf_format_add_field accept exactly the formats the reference says
 *   can exist (an including length must be able to count the header);
 * - msf_scan over the whole stream equals the reference scan (count, used, error,
 *   partial, length, size) and msf_need equals the reference's exact need (in 128 bits);
 *   msgsock_frame_scan says the same;
 * - every complete frame's header parses (msf_parse_header) to the reference values,
 *   and msf_encode_header of those values gives back the very header bytes;
 * - the stream cut into reads and decoded as msgsock.framing.FrameDecoder does (frames
 *   scanned where they lie, the unfinished rest held) gives the same frames and stops
 *   at the same bad header;
 * - msf_encode_header refuses exactly the sizes and values the reference refuses, and
 *   what it writes decodes back.
 * The input lives in a malloc block of exactly its size, so any read past it is an ASan
 * report.  Any failed check or sanitizer report aborts (non-zero exit).
 *
 * Without libFuzzer (gcc has ASan but not libFuzzer): every FILE given, then random
 * inputs -- structured streams (frames with edge lengths, garbage, truncation) and
 * mutations of a pool of earlier inputs -- from -seed, until -runs inputs or -seconds
 * have passed.  With clang, -DMSF_LIBFUZZER -fsanitize=fuzzer uses the same
 * LLVMFuzzerTestOneInput for a coverage-guided run.  See the Makefile.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "frame.h"

typedef unsigned __int128 u128;

static const uint8_t *current_input;
static size_t current_size;

static void fail(const char *what, int line) {
    fprintf(stderr, "frame_fuzz: check failed at line %d: %s\ninput (%zu bytes):", line, what, current_size);
    for (size_t i = 0; i < current_size && i < 512; i++) fprintf(stderr, "%s%02x", i % 32 ? "" : "\n  ", current_input[i]);
    fprintf(stderr, "\n");
    FILE *fp = fopen("crash-frame_fuzz", "wb");
    if (fp) {
        fwrite(current_input, 1, current_size, fp);
        fclose(fp);
        fprintf(stderr, "written to crash-frame_fuzz\n");
    }
    abort();
}
#define CHECK(cond)                          \
    do {                                     \
        if (!(cond)) fail(#cond, __LINE__);  \
    } while (0)

/* -- the reference: obvious code, 128-bit sums --------------------------------------- */

typedef struct {
    unsigned length_size, nfields;
    int big, includes;
    size_t length_offset, hsize;
    uint64_t max_body;
    unsigned fsize[8];
    int fsigned[8];
    size_t foffset[8];
} ref_format;

static u128 ref_read(const uint8_t *p, unsigned size, int big) {
    u128 v = 0;
    for (unsigned i = 0; i < size; i++) {
        unsigned shift = big ? 8 * (size - 1 - i) : 8 * i;
        v += (u128)p[i] << shift;
    }
    return v;
}

/* A field's value as a signed 128-bit number. */
static __int128 ref_field(const ref_format *rf, unsigned i, const uint8_t *hdr) {
    u128 raw = ref_read(hdr + rf->foffset[i], rf->fsize[i], rf->big);
    __int128 v = (__int128)raw;
    if (rf->fsigned[i] && raw >= ((u128)1 << (8 * rf->fsize[i] - 1))) v -= (__int128)((u128)1 << (8 * rf->fsize[i]));
    return v;
}

typedef struct {
    size_t count, used;
    int error, partial;
    uint64_t length, size;
    u128 need;
} ref_result;

static void ref_scan(const ref_format *rf, const uint8_t *buf, size_t len, ref_result *r) {
    memset(r, 0, sizeof *r);
    size_t pos = 0;
    r->need = rf->hsize;
    while (len - pos >= rf->hsize) {
        u128 length = ref_read(buf + pos + rf->length_offset, rf->length_size, rf->big);
        __int128 size = (__int128)length - (rf->includes ? (__int128)rf->hsize : 0);
        r->length = (uint64_t)length;
        if (size < 0) {
            r->error = MSF_TOO_SHORT;
            break;
        }
        if ((u128)size > rf->max_body) {
            r->error = MSF_TOO_LARGE;
            r->size = (uint64_t)size;
            break;
        }
        if ((u128)pos + rf->hsize + (u128)size > len) {
            r->partial = 1;
            r->size = (uint64_t)size;
            r->need = rf->hsize + (u128)size;
            break;
        }
        pos += rf->hsize + (size_t)size;
        r->count++;
    }
    r->used = pos;
    if (!r->error && !r->partial) r->length = 0;
}

/* -- the format of an input ------------------------------------------------------------ */

#define CONFIG 6

/* Build both descriptions from the first CONFIG bytes.  Returns 1 if frame.h accepted the
 * format (checked against whether it can exist), 0 if not. */
static int pick_format(const uint8_t *c, msf_format *f, ref_format *rf) {
    static const unsigned widths[4] = {1, 2, 4, 8};
    memset(rf, 0, sizeof *rf);
    rf->length_size = widths[c[0] & 3];
    rf->big = (c[0] >> 2) & 1;
    rf->includes = (c[0] >> 3) & 1;
    unsigned before = (c[0] >> 4) & 3, after = (c[0] >> 6) & 3;
    uint32_t bits = (uint32_t)c[1] | ((uint32_t)c[2] << 8) | ((uint32_t)c[3] << 16);
    size_t offset = 0;
    for (unsigned i = 0; i < before + after + 1; i++) {
        if (i == before) {
            rf->length_offset = offset;
            offset += rf->length_size;
            continue;
        }
        unsigned k = rf->nfields++;
        rf->fsize[k] = widths[bits & 3];
        rf->fsigned[k] = (bits >> 2) & 1;
        bits >>= 3;
        rf->foffset[k] = offset;
        offset += rf->fsize[k];
    }
    rf->hsize = offset;
    u128 range = ((u128)1 << (8 * rf->length_size)) - 1;
    int can_exist = !(rf->includes && range < rf->hsize);
    u128 limit = range - (rf->includes && can_exist ? rf->hsize : 0);
    switch (c[4] & 7) {
    case 0: rf->max_body = 0; break;
    case 1: rf->max_body = 1; break;
    case 2: rf->max_body = 5; break;
    case 3: rf->max_body = 300; break;
    case 4: rf->max_body = 65536; break;
    case 5: rf->max_body = (uint64_t)limit; break;           /* max_size None: the field's range */
    case 6: rf->max_body = UINT64_MAX; break;                /* above the range (a careless caller) */
    default: rf->max_body = (uint64_t)c[5] << (c[4] >> 3); break;
    }
    int init = msf_format_init(f, rf->length_size, rf->big, rf->includes, rf->length_offset, rf->hsize, rf->max_body);
    CHECK((init == MSF_OK) == can_exist);
    if (init != MSF_OK) return 0;
    for (unsigned i = 0; i < rf->nfields; i++)
        CHECK(msf_format_add_field(f, rf->foffset[i], rf->fsize[i], rf->fsigned[i]) == MSF_OK);
    /* a field over the length field, outside the header, of a bad width: refused */
    CHECK(msf_format_add_field(f, rf->length_offset, 1, 0) == MSF_BAD_FORMAT);
    CHECK(msf_format_add_field(f, rf->hsize, 1, 0) == MSF_BAD_FORMAT);
    CHECK(msf_format_add_field(f, 0, 3, 0) == MSF_BAD_FORMAT);
    CHECK(f->nfields == rf->nfields && f->header_size == rf->hsize);
    return 1;
}

/* -- the checks ----------------------------------------------------------------------- */

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void check_frames(const msf_format *f, const ref_format *rf, const uint8_t *buf, size_t used, size_t count) {
    size_t pos = 0, seen = 0;
    while (pos < used) {
        const uint8_t *p = buf + pos;
        msf_header h;
        CHECK(msf_parse_header(f, p, &h) == MSF_OK);
        CHECK(h.size == msf_body_size(f, p) && h.size <= f->max_body);
        CHECK(h.length == (uint64_t)ref_read(p + rf->length_offset, rf->length_size, rf->big));
        for (unsigned i = 0; i < rf->nfields; i++) {
            __int128 v = rf->fsigned[i] ? (__int128)(int64_t)h.values[i] : (__int128)h.values[i];
            CHECK(v == ref_field(rf, i, p));
        }
        uint8_t out[MSF_MAX_HEADER];
        CHECK(msf_encode_header(f, h.size, h.values, out) == MSF_OK);
        CHECK(memcmp(out, p, f->header_size) == 0);
        pos += f->header_size + (size_t)h.size;
        seen++;
    }
    CHECK(pos == used && seen == count);
}

/* Decode the stream cut into reads, as FrameDecoder.feed_span does; compare with whole. */
static void check_splits(const msf_format *f, const uint8_t *stream, size_t len, const ref_result *whole,
                         uint64_t seed) {
    uint8_t *held = NULL;
    size_t nheld = 0, delivered = 0, frames = 0, pos = 0;
    u128 need = f->header_size;
    int error = 0;
    uint64_t saved = rng;
    rng = seed | 1;
    while (pos < len && !error) {
        size_t n = 1 + (size_t)(next() % (next() % 4 ? 16 : len - pos + 1));
        if (n > len - pos) n = len - pos;
        uint8_t *read = malloc(n); /* exact size */
        memcpy(read, stream + pos, n);
        pos += n;
        const uint8_t *at;
        size_t avail;
        if (nheld) {
            held = realloc(held, nheld + n);
            memcpy(held + nheld, read, n);
            nheld += n;
            free(read);
            read = NULL;
            if ((u128)nheld < need) continue;
            at = held;
            avail = nheld;
        } else {
            at = read;
            avail = n;
        }
        msf_scan_result r;
        msf_scan(f, at, avail, &r);
        CHECK(memcmp(at, stream + delivered, r.used) == 0);
        delivered += r.used;
        frames += r.count;
        if (r.error) {
            error = r.error;
        } else {
            uint64_t n64;
            int fits = msf_need(f, &r, &n64) == 0;
            need = fits ? n64 : (u128)r.size + f->header_size;
            CHECK(fits || n64 == UINT64_MAX);
        }
        size_t rest = avail - r.used;
        uint8_t *keep = rest ? malloc(rest) : NULL;
        if (rest) memcpy(keep, at + r.used, rest);
        free(held);
        free(read);
        held = keep;
        nheld = rest;
    }
    CHECK(frames == whole->count && delivered == whole->used && error == whole->error);
    if (!error) {
        CHECK(nheld == len - whole->used && need == whole->need);
        CHECK(nheld == 0 || memcmp(held, stream + whole->used, nheld) == 0);
    }
    free(held);
    rng = saved;
}

/* Random sizes and values through the encoder, against the reference's ranges. */
static void check_encoder(const msf_format *f, const ref_format *rf) {
    static const uint64_t edges[] = {0, 1, 5, 127, 128, 255, 256, 65535, 65536, 0x7fffffff, 0x80000000,
                                     0xffffffff, 0x100000000ull, INT64_MAX, (uint64_t)INT64_MAX + 1, UINT64_MAX};
    u128 range = ((u128)1 << (8 * rf->length_size)) - 1;
    u128 limit = range - (rf->includes ? rf->hsize : 0);
    for (int k = 0; k < 4; k++) {
        uint64_t body = next() % 2 ? edges[next() % 16] - (next() % 2) : next() % 1000;
        if (next() % 3 == 0) body = f->max_body + (next() % 3) - 1;
        uint64_t values[MSF_MAX_FIELDS];
        int fits = 1;
        for (unsigned i = 0; i < rf->nfields; i++) {
            values[i] = next() % 2 ? edges[next() % 16] : (uint64_t)(int64_t)(int8_t)next();
            if (next() % 2) values[i] = 0 - values[i]; /* unsigned: no overflow */
            unsigned bits = 8 * rf->fsize[i];
            __int128 v = rf->fsigned[i] ? (__int128)(int64_t)values[i] : (__int128)values[i];
            __int128 lo = rf->fsigned[i] ? -((__int128)1 << (bits - 1)) : 0;
            __int128 hi = rf->fsigned[i] ? ((__int128)1 << (bits - 1)) - 1 : (__int128)(((u128)1 << bits) - 1);
            if (v < lo || v > hi) fits = 0;
        }
        int too_large = (u128)body > limit || body > rf->max_body;
        uint8_t out[MSF_MAX_HEADER + 1];
        out[rf->hsize] = 0xA5;
        int got = msf_encode_header(f, body, values, out);
        CHECK(got == (too_large ? MSF_TOO_LARGE : fits ? MSF_OK : MSF_BAD_VALUE));
        CHECK(out[rf->hsize] == 0xA5); /* nothing written past the header */
        if (got == MSF_OK) {
            msf_header h;
            CHECK(msf_parse_header(f, out, &h) == MSF_OK && h.size == body);
            for (unsigned i = 0; i < rf->nfields; i++) CHECK(ref_field(rf, i, out) ==
                                                             (rf->fsigned[i] ? (__int128)(int64_t)values[i]
                                                                             : (__int128)values[i]));
        }
    }
}

static int one_input(const uint8_t *data, size_t size) {
    current_input = data;
    current_size = size;
    if (size < CONFIG + 1) return 0;
    msf_format f;
    ref_format rf;
    if (!pick_format(data, &f, &rf)) return 0;
    const uint8_t *stream = data + CONFIG + 1;
    size_t len = size - CONFIG - 1;

    ref_result want;
    ref_scan(&rf, stream, len, &want);
    msf_scan_result got;
    msf_scan(&f, stream, len, &got);
    CHECK(got.count == want.count && got.used == want.used && got.error == want.error);
    CHECK(got.partial == want.partial && got.length == want.length);
    CHECK(got.error == MSF_TOO_SHORT || got.size == want.size);
    if (!got.error) {
        uint64_t need;
        int fits = msf_need(&f, &got, &need) == 0;
        CHECK(fits ? (u128)need == want.need : (need == UINT64_MAX && want.need > UINT64_MAX));
    }
    size_t count, used;
    uint64_t need;
    int error;
    CHECK(msgsock_frame_scan(&f, stream, len, &count, &used, &need, &error) == want.error);
    CHECK(count == want.count && used == want.used && error == want.error);
    if (got.error) {
        uint64_t length, bsize;
        CHECK(msf_check_header(&f, stream + got.used, &length, &bsize) == got.error && length == got.length);
    }
    check_frames(&f, &rf, stream, got.used, got.count);
    check_splits(&f, stream, len, &want, data[CONFIG]);
    check_encoder(&f, &rf);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return one_input(data, size); }

#ifndef MSF_LIBFUZZER
/* -- the driver: random and mutated inputs, bounded by time and count ------------------ */

#define CAP 8192
#define POOL 64

static size_t make_input(uint8_t *buf) {
    size_t n = 0;
    for (int i = 0; i <= CONFIG; i++) buf[n++] = (uint8_t)next();
    msf_format f;
    ref_format rf;
    /* pick_format checks too; a format that cannot exist gets garbage */
    current_input = buf;
    current_size = n;
    int ok = pick_format(buf, &f, &rf);
    size_t frames = next() % 10;
    for (size_t i = 0; ok && i < frames && n + MSF_MAX_HEADER + 700 < CAP; i++) {
        u128 range = ((u128)1 << (8 * rf.length_size)) - 1;
        uint8_t *head = buf + n;
        for (size_t k = 0; k < rf.hsize; k++) head[k] = (uint8_t)next();
        u128 length;
        uint64_t body = 0;
        switch (next() % 6) {
        case 0: length = range - (next() % 3); break;                       /* near the field's top */
        case 1: length = (next() % (rf.hsize + 2)); break;                   /* around the header */
        case 2: length = (u128)f.max_body + (next() % 3); break;            /* around max_body */
        default:
            body = next() % (next() % 4 ? 40 : 600);
            length = body + (rf.includes ? rf.hsize : 0);
            break;
        }
        if (length > range) length = range;
        for (unsigned k = 0; k < rf.length_size; k++) {
            unsigned shift = rf.big ? 8 * (rf.length_size - 1 - k) : 8 * k;
            head[rf.length_offset + k] = (uint8_t)(length >> shift);
        }
        n += rf.hsize;
        for (uint64_t k = 0; k < body; k++) buf[n++] = (uint8_t)next();
    }
    size_t garbage = next() % 4 == 0 ? next() % 64 : 0;
    while (garbage-- && n < CAP) buf[n++] = (uint8_t)next();
    if (n > CONFIG + 1 && next() % 3 == 0) n = CONFIG + 1 + next() % (n - CONFIG); /* cut anywhere */
    return n;
}

static size_t mutate(uint8_t *buf, size_t n) {
    static const uint8_t interesting[] = {0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff};
    int steps = 1 + (int)(next() % 4);
    while (steps--) {
        size_t at = n ? next() % n : 0;
        switch (next() % 6) {
        case 0: if (n) buf[at] ^= (uint8_t)(1u << (next() % 8)); break;
        case 1: if (n) buf[at] = interesting[next() % 6]; break;
        case 2: /* insert bytes */
            if (n + 8 < CAP) {
                memmove(buf + at + 8, buf + at, n - at);
                for (int k = 0; k < 8; k++) buf[at + k] = (uint8_t)next();
                n += 8;
            }
            break;
        case 3: /* delete bytes */
            if (n > at + 4) {
                memmove(buf + at, buf + at + 4, n - at - 4);
                n -= 4;
            }
            break;
        case 4: n = at; break; /* truncate */
        default: /* a run of 0xff (lengths at the top) */
            for (size_t k = at; k < n && k < at + 8; k++) buf[k] = 0xff;
            break;
        }
    }
    return n;
}

int main(int argc, char **argv) {
    long runs = -1;
    double seconds = 10;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "-runs=", 6) == 0) {
            runs = atol(argv[i] + 6);
        } else if (strncmp(argv[i], "-seconds=", 9) == 0) {
            seconds = atof(argv[i] + 9);
        } else if (strncmp(argv[i], "-seed=", 6) == 0) {
            rng = strtoull(argv[i] + 6, NULL, 10) * 2 + 1;
        } else {
            FILE *fp = fopen(argv[i], "rb");
            if (fp == NULL) {
                perror(argv[i]);
                return 2;
            }
            static uint8_t file[1 << 20];
            size_t n = fread(file, 1, sizeof file, fp);
            fclose(fp);
            uint8_t *copy = malloc(n ? n : 1);
            memcpy(copy, file, n);
            one_input(copy, n);
            free(copy);
        }
    }
    static uint8_t pool[POOL][CAP];
    static size_t pool_len[POOL];
    static uint8_t buf[CAP];
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long done = 0;
    double elapsed = 0;
    for (; runs < 0 || done < runs; done++) {
        if ((done & 255) == 0) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            elapsed = (double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9;
            if (elapsed >= seconds) break;
        }
        size_t n;
        size_t slot = next() % POOL;
        if (done < POOL || next() % 2) {
            n = make_input(buf);
        } else {
            n = pool_len[slot];
            memcpy(buf, pool[slot], n);
            n = mutate(buf, n);
        }
        if (next() % 4 == 0) {
            memcpy(pool[slot], buf, n);
            pool_len[slot] = n;
        }
        uint8_t *copy = malloc(n ? n : 1); /* exact size: ASan catches a read past the input */
        memcpy(copy, buf, n);
        one_input(copy, n);
        free(copy);
    }
    clock_gettime(CLOCK_MONOTONIC, &t);
    elapsed = (double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9;
    printf("frame_fuzz: %ld inputs in %.1f s, no failure\n", done, elapsed);
    return 0;
}
#endif
