/*
 * engine_fuzz.c - the native engine's receive path (engine_rx.h over frame.h) under AddressSanitizer.
 *
 * One input = a frame format, a way to split the stream into reads, and the stream.  The
 * stream goes through the per-connection state machine read by read, exactly as
 * engine.c's conn_native_input drives it (ms_rx_begin, serve the complete frames,
 * ms_rx_end), and the result is checked against one scan of the whole stream:
 *
 * - the frames served, concatenated, are the whole-stream scan's complete frames, byte
 *   for byte, and as many; every one re-parses with its own header;
 * - a bad header is found exactly where the whole scan finds it, and then the held
 *   input starts with it; otherwise the held input is the unfinished rest of the stream;
 * - nothing is ever held for a size a header claims: the held bytes are bytes received.
 *
 * Build and run (no libFuzzer needed: gcc's ASan, a built-in mutator):
 *   gcc -g -O1 -fsanitize=address,undefined -fno-omit-frame-pointer \
 *       -I src/msgsock/_native fuzz/native/engine_fuzz.c -o fuzz/native/engine_fuzz
 *   fuzz/native/engine_fuzz -runs=200000 [-seed=N] [FILE...]
 * With clang: add -DMS_LIBFUZZER -fsanitize=fuzzer for a coverage-guided run.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_rx.h"

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "engine_fuzz: check failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                 \
        }                                                                            \
    } while (0)

/* The format from the first 3 bytes: length size, byte order, header counted, fields, max_body. */
static size_t pick_format(const uint8_t *d, size_t n, ms_format *f) {
    static const unsigned sizes[4] = {1, 2, 4, 8};
    static const uint64_t maxes[6] = {0, 1, 100, 4096, 1u << 20, UINT64_MAX};
    if (n < 3) return 0;
    size_t before = (d[1] & 7), after = (d[1] >> 3) & 7;
    if (ms_rx_format_init(f, sizes[d[0] & 3], (d[0] >> 2) & 1, (d[0] >> 3) & 1, before, after,
                          maxes[d[2] % 6]) < 0)
        return 0;
    return 3;
}

static int one_input(const uint8_t *data, size_t size) {
    ms_format f;
    size_t off = pick_format(data, size, &f);
    if (off == 0 || size - off < 1) return 0;
    uint8_t split_seed = data[off++];
    const uint8_t *stream = data + off;
    size_t n = size - off;

    ms_scan_result whole;
    ms_rx_scan(&f, stream, n, &whole);

    ms_rx rx = {0};
    uint8_t *served = malloc(n ? n : 1);
    CHECK(served != NULL);
    size_t served_len = 0, pos = 0;
    uint64_t count = 0;
    int error = 0;
    unsigned state = split_seed * 2654435761u + 1;
    while (pos < n && !error) {
        state = state * 1103515245u + 12345u;
        size_t chunk = 1 + (state >> 16) % (split_seed & 1 ? 7 : 4096);
        if (chunk > n - pos) chunk = n - pos;
        /* the read comes from its own heap block so ASan sees any read past it */
        uint8_t *read = malloc(chunk);
        CHECK(read != NULL);
        memcpy(read, stream + pos, chunk);
        ms_rx_view v;
        CHECK(ms_rx_begin(&rx, &f, read, chunk, &v) == 0);
        CHECK(v.sr.used <= v.len);
        /* serve: walk the complete frames as the reverse and handler paths do */
        size_t p = 0;
        uint64_t frames = 0;
        while (p < v.sr.used) {
            size_t h, b;
            ms_rx_frame(&f, v.buf + p, &h, &b);
            CHECK(h == f.header_size && b <= f.max_body && p + h + b <= v.sr.used);
            uint8_t head[MS_MAX_HEADER];
            CHECK(ms_rx_encode_header(&f, v.buf + p, b, head) == h);
            CHECK(memcmp(head, v.buf + p, h) == 0); /* the header re-encodes to itself */
            p += h + b;
            frames++;
        }
        CHECK(p == v.sr.used && frames == v.sr.count);
        if (v.sr.used) {
            uint8_t *rev = malloc(v.sr.used);
            CHECK(rev != NULL);
            ms_rx_reverse_frames(&f, v.buf, v.sr.used, rev);
            free(rev);
        }
        CHECK(served_len + v.sr.used <= n);
        memcpy(served + served_len, v.buf, v.sr.used);
        served_len += v.sr.used;
        count += v.sr.count;
        CHECK(ms_rx_end(&rx, read, &v) == 0);
        error = v.sr.error;
        free(read);
        pos += chunk;
        CHECK(served_len + ms_rx_held(&rx) == pos); /* held = received and not served, no more */
    }
    CHECK(count == whole.count && served_len == whole.used);
    CHECK(memcmp(served, stream, served_len) == 0);
    CHECK(error == whole.error);
    if (!error) {
        CHECK(ms_rx_held(&rx) == n - whole.used);
        CHECK(ms_rx_held(&rx) == 0 || memcmp(ms_rx_data(&rx), stream + whole.used, ms_rx_held(&rx)) == 0);
    } else {
        CHECK(ms_rx_held(&rx) >= f.header_size);
        CHECK(memcmp(ms_rx_data(&rx), stream + whole.used, f.header_size) == 0);
    }
    ms_rx_free(&rx);
    free(served);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return one_input(data, size); }

#ifndef MS_LIBFUZZER
/* Without libFuzzer: every FILE given, then -runs random inputs (bodies of valid frames
 * cut and mutated, and plain garbage) from -seed. */
static uint64_t rng;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static size_t make_input(uint8_t *buf, size_t cap) {
    size_t n = 0;
    buf[n++] = (uint8_t)next();
    buf[n++] = (uint8_t)next();
    buf[n++] = (uint8_t)next();
    buf[n++] = (uint8_t)next();
    ms_format f;
    if (pick_format(buf, 3, &f) == 0) return n;
    size_t frames = next() % 12;
    for (size_t i = 0; i < frames && n + f.header_size + 600 < cap; i++) {
        uint64_t body = next() % (next() % 4 ? 40 : 600);
        uint8_t head[MS_MAX_HEADER];
        for (size_t k = 0; k < f.header_size; k++) head[k] = (uint8_t)next();
        uint64_t limit = f.length_size == 8 ? UINT64_MAX : ((uint64_t)1 << (8 * f.length_size)) - 1;
        if (body + (f.includes_header ? f.header_size : 0) > limit) body = 0;
        ms_rx_encode_length(&f, body, head);
        memcpy(buf + n, head, f.header_size);
        n += f.header_size;
        for (uint64_t k = 0; k < body; k++) buf[n++] = (uint8_t)next();
    }
    size_t garbage = next() % 4 == 0 ? next() % 64 : 0;
    while (garbage-- && n < cap) buf[n++] = (uint8_t)next();
    size_t flips = next() % 3;
    while (flips-- && n > 4) buf[4 + next() % (n - 4)] ^= (uint8_t)(1u << (next() % 8));
    if (n > 4 && next() % 2) n = 4 + next() % (n - 4 + 1); /* cut anywhere */
    return n;
}

int main(int argc, char **argv) {
    long runs = 100000;
    rng = 0x9E3779B97F4A7C15ull;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "-runs=", 6) == 0) {
            runs = atol(argv[i] + 6);
        } else if (strncmp(argv[i], "-seed=", 6) == 0) {
            rng = strtoull(argv[i] + 6, NULL, 10) | 1;
        } else {
            FILE *fp = fopen(argv[i], "rb");
            if (fp == NULL) {
                perror(argv[i]);
                return 2;
            }
            static uint8_t file[1 << 20];
            size_t n = fread(file, 1, sizeof file, fp);
            fclose(fp);
            one_input(file, n);
        }
    }
    static uint8_t buf[16384];
    for (long r = 0; r < runs; r++) {
        size_t n = make_input(buf, sizeof buf);
        uint8_t *copy = malloc(n ? n : 1); /* exact size: ASan catches a read past the input */
        memcpy(copy, buf, n);
        one_input(copy, n);
        free(copy);
    }
    printf("engine_fuzz: %ld inputs, no failure\n", runs);
    return 0;
}
#endif
