/*
 * stressloop.c - msgsock._stressloop: stream mode's hot loop of `msgsock stress` in C.
 *
 * Theory of operation.  `msgsock stress` in stream mode (TCP, closed loop, echo, one
 * fixed size, no extra header fields; src/msgsock/app/stress/stream.py) checks each
 * connection's replies against a circular *window* of the wire bytes it wrote: message
 * s in slot s mod window, built a block at a time.  The Python round
 * (app/stress/hotloop.py, _StreamLoop._stream_round) reads once per readable
 * connection, compares the read with the window in one memcmp, completes
 * rx // mlen messages, takes their latencies from the write log and writes the
 * replacements in one write.  This module runs exactly that round, in C, for as many
 * polls as fit before a deadline, with the GIL released, on the worker's own epoll
 * descriptor (Python's select.epoll registers data.fd = fd, level-triggered):
 *
 *   run(epfd, deadline, conns, layout, params, counts) -> (results, totals)
 *
 *   epfd      the worker's epoll descriptor (the connections are registered in it).
 *   deadline  monotonic ns (CLOCK_MONOTONIC, as time.monotonic_ns) at which to return;
 *             never more than MAX_CALL_NS after the call.
 *   conns     a sequence of (fd, cid, tx_seq, next_rx, rx, wtop, out, events, wlog,
 *             win): a connection in stream mode, plain TCP; `out` is None or the bytes
 *             written but not yet taken by the socket (always the window's bytes just
 *             before tx_seq * mlen), `events` the epoll bits it is registered with,
 *             `wlog` an iterable of (end seq, time written) and `win` its window, a
 *             writable buffer of exactly window * mlen bytes (a bytearray, held for
 *             the call so it cannot be resized).
 *   layout    (mlen, hlen, block, window, head, pattern): wire bytes of a message, of
 *             its frame header, messages per block and per window, the header bytes,
 *             the payload pattern (stress/payload.py).
 *   params    (depth, t_start, sending, budget, lat_lo, lat_hi): budget -1 for none
 *             (no --messages); lat_lo/lat_hi the ledger's running latency min/max.
 *   counts    the histogram's bucket list (msgsock._histogram; updated in place).
 *
 *   results   one (tx_seq, next_rx, rx, wtop, out, events, wlog, status, detail) per
 *             connection, in order: its new stream state (`out` None or the unsent
 *             bytes, `wlog` a list of (end, t)); `status` 0 when the connection is
 *             still in stream mode, else it needs Python (HANDOFF_*): MISMATCH (detail:
 *             the bytes of the read, already counted in bytes_in; Python's
 *             _stream_mismatch takes it from there), EOF, RECV_ERROR or SEND_ERROR
 *             (detail: errno).  The state is what the Python round would have left:
 *             the read that mismatched changed nothing, a failed write was counted.
 *   totals    (got, measured, lat_sum, lat_lo, lat_hi, last_ok, sent, sent_measured,
 *             bytes_in, budget, foreign, poll_errno, last_round): replies verified, of
 *             them measured and the sum of their latencies, the new running min/max,
 *             the time of the last round that verified any, messages written, of them
 *             written at or after t_start, bytes read, the budget left, whether an
 *             event for a descriptor not in `conns` is waiting (the control pipe, a
 *             connection in the general mode: Python polls for it), an epoll_wait
 *             errno (0: none) and the time of the last round.
 *
 * It returns at the deadline, after a poll interrupted by a signal (so the handler
 * runs), after the round in which any connection needs Python or a foreign event
 * arrived, and after every round when not sending or the budget is spent (Python's
 * loop checks those between polls).  Every round takes one clock reading, the time of
 * every reply read and message written in it, as in Python and in the C load generator.
 * Latency buckets are msgsock._histogram.bucket_index exactly (SUB_BITS 8, MAX_BITS 46).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#define SUB_BITS 8
#define HALF_BITS (SUB_BITS - 1)
#define MAX_BITS 46
#define HIST_SIZE ((((MAX_BITS) - (SUB_BITS) + 1) << (HALF_BITS)) + (1 << (SUB_BITS)))
#define RECV_SIZE (256 * 1024) /* as the Python loop's receive buffer */
#define MAX_EVENTS 512
#define MAX_CALL_NS 50000000LL /* at most 50 ms in C per call (signals, live view) */
#define ID_SIZE 12             /* seq u64 LE, connection id u32 LE */

enum { HANDOFF_NONE, HANDOFF_MISMATCH, HANDOFF_EOF, HANDOFF_RECV_ERROR, HANDOFF_SEND_ERROR };

typedef struct {
    uint64_t end; /* the write's messages end before this seq */
    int64_t t;    /* when it was written (monotonic ns) */
} wentry;

typedef struct {
    int fd;
    uint32_t cid;
    uint32_t events;
    uint64_t tx_seq, next_rx, rx, wtop;
    uint64_t unsent; /* bytes before tx_seq * mlen the socket has not taken yet */
    Py_buffer win;
    int has_win;
    wentry *log; /* circular: cap entries from head */
    size_t cap, head, len;
    int status, err;
    uint8_t *data; /* HANDOFF_MISMATCH: a copy of the read */
    size_t dlen;
} sconn;

typedef struct {
    int epfd;
    uint64_t ml, hlen, block, window, wbytes, depth, k;
    const uint8_t *head, *pattern;
    int64_t t_start, budget;
    int sending;
    uint64_t *hist;
    uint8_t *buf;
    /* totals */
    uint64_t got, measured, sent, sent_measured, bytes_in;
    int64_t lsum, lo, hi, last_ok, last_round;
    int handoffs, foreign, poll_errno;
} loop;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* msgsock._histogram.bucket_index (a latency is never negative: one clock, later). */
static inline size_t bucket(int64_t lat) {
    if (lat <= 0) return 0;
    int shift = (64 - __builtin_clzll((uint64_t)lat)) - SUB_BITS;
    if (shift <= 0) return (size_t)lat;
    size_t idx = ((size_t)shift << HALF_BITS) + (size_t)((uint64_t)lat >> shift);
    return idx < HIST_SIZE ? idx : HIST_SIZE - 1;
}

/* _StreamLayout.extend: build blocks until the window holds message s1 - 1.  Message s
 * is head, s (u64 LE), cid (u32 LE), pattern[(s*167 + cid*29) % 256 :][:k]; slots of a
 * block held messages a whole window earlier, whose replies were verified. */
static void extend(loop *L, sconn *c, uint64_t s1) {
    uint8_t *win = c->win.buf;
    while (c->wtop < s1) {
        uint64_t b = c->wtop;
        for (uint64_t s = b; s < b + L->block; s++) {
            uint8_t *p = win + (s % L->window) * L->ml;
            memcpy(p, L->head, L->hlen);
            p += L->hlen;
            for (int i = 0; i < 8; i++) p[i] = (uint8_t)(s >> (8 * i));
            for (int i = 0; i < 4; i++) p[8 + i] = (uint8_t)(c->cid >> (8 * i));
            uint64_t off = (s * 167 + (uint64_t)c->cid * 29) & 255;
            memcpy(p + ID_SIZE, L->pattern + off, L->k);
        }
        c->wtop = b + L->block;
    }
}

static void handoff(loop *L, sconn *c, int status, int err) {
    c->status = status;
    c->err = err;
    L->handoffs++;
}

static void want(loop *L, sconn *c, uint32_t events) {
    if (c->events == events) return;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.fd = c->fd;
    if (epoll_ctl(L->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        handoff(L, c, HANDOFF_SEND_ERROR, errno);
        return;
    }
    c->events = events;
}

/* Write what the socket will take of the unsent bytes (Python's _write_window/_flush). */
static void flush(loop *L, sconn *c) {
    uint8_t *win = c->win.buf;
    while (c->unsent) {
        uint64_t pos = (c->tx_seq * L->ml - c->unsent) % L->wbytes;
        struct iovec iov[2];
        int n = 1;
        uint64_t first = L->wbytes - pos < c->unsent ? L->wbytes - pos : c->unsent;
        iov[0].iov_base = win + pos;
        iov[0].iov_len = first;
        if (first < c->unsent) {
            iov[1].iov_base = win;
            iov[1].iov_len = c->unsent - first;
            n = 2;
        }
        ssize_t w;
        if (n == 1) {
            w = send(c->fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
        } else {
            struct msghdr mh;
            memset(&mh, 0, sizeof mh);
            mh.msg_iov = iov;
            mh.msg_iovlen = 2;
            w = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        }
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            handoff(L, c, HANDOFF_SEND_ERROR, errno);
            return;
        }
        c->unsent -= (uint64_t)w;
    }
    want(L, c, c->unsent ? (EPOLLIN | EPOLLOUT) : EPOLLIN);
}

/* Does the read p[0:n] continue the reply stream at c->rx, byte for byte? */
static int verifies(loop *L, sconn *c, const uint8_t *p, uint64_t n) {
    if (n > c->tx_seq * L->ml - c->rx) return 0; /* more than is owed (a duplicate, say) */
    const uint8_t *win = c->win.buf;
    uint64_t off = c->rx % L->wbytes;
    if (off + n <= L->wbytes) return memcmp(win + off, p, n) == 0;
    uint64_t first = L->wbytes - off;
    return memcmp(win + off, p, first) == 0 && memcmp(win, p + first, n - first) == 0;
}

/* One readable connection: one read, verified, its latencies, then the refill. */
static void on_readable(loop *L, sconn *c, int64_t now) {
    ssize_t r;
    do {
        r = recv(c->fd, L->buf, RECV_SIZE, 0);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) handoff(L, c, HANDOFF_RECV_ERROR, errno);
        return;
    }
    if (r == 0) {
        handoff(L, c, HANDOFF_EOF, 0);
        return;
    }
    uint64_t n = (uint64_t)r;
    L->bytes_in += n;
    if (!verifies(L, c, L->buf, n)) {
        c->data = malloc(n);
        if (c->data == NULL) {
            handoff(L, c, HANDOFF_RECV_ERROR, ENOMEM);
            return;
        }
        memcpy(c->data, L->buf, n);
        c->dlen = n;
        handoff(L, c, HANDOFF_MISMATCH, 0);
        return;
    }
    c->rx += n;
    uint64_t done = c->rx / L->ml, s = c->next_rx;
    if (done == s) return; /* only part of a reply so far */
    c->next_rx = done;
    L->got += done - s;
    while (s < done && c->len) {
        wentry *e = &c->log[c->head];
        uint64_t k;
        int64_t t = e->t;
        if (e->end <= done) {
            k = e->end - s;
            s = e->end;
            c->head = (c->head + 1) % c->cap;
            c->len--;
        } else {
            k = done - s;
            s = done;
        }
        if (t >= L->t_start) {
            /* The messages of one write share one latency: counted with multiplicity. */
            int64_t lat = now - t;
            L->hist[bucket(lat)] += k;
            L->lsum += lat * (int64_t)k;
            L->measured += k;
            if (lat > L->hi) L->hi = lat;
            if (lat < L->lo) L->lo = lat;
        }
    }
    L->last_ok = now;
    if (!L->sending) return;
    uint64_t s0 = c->tx_seq, s1;
    if (L->budget < 0) { /* the replacements of every reply of this read */
        s1 = done + L->depth;
        if (s1 <= s0) return;
    } else { /* --messages: _fill_stream */
        int64_t room = (int64_t)L->depth - (int64_t)(c->tx_seq - c->next_rx);
        if (room <= 0) return;
        if (now >= L->t_start) {
            if (room > L->budget) room = L->budget;
            if (room <= 0) return;
            L->budget -= room;
        }
        s1 = s0 + (uint64_t)room;
    }
    if (s1 > c->wtop) extend(L, c, s1);
    if (c->len == c->cap) { /* never: a write log holds at most depth entries */
        handoff(L, c, HANDOFF_SEND_ERROR, ENOBUFS);
        return;
    }
    c->log[(c->head + c->len) % c->cap] = (wentry){s1, now};
    c->len++;
    c->tx_seq = s1;
    L->sent += s1 - s0;
    if (now >= L->t_start) L->sent_measured += s1 - s0;
    c->unsent += (s1 - s0) * L->ml;
    flush(L, c);
}

static void free_conns(sconn *cs, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (cs[i].has_win) PyBuffer_Release(&cs[i].win);
        free(cs[i].log);
        free(cs[i].data);
    }
    free(cs);
}

/* Parse one (fd, cid, tx_seq, next_rx, rx, wtop, out, events, wlog, win). */
static int parse_conn(loop *L, PyObject *item, sconn *c) {
    PyObject *out, *wlog, *win;
    unsigned long long tx, nrx, rx, wtop;
    unsigned int cid, events;
    if (!PyTuple_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "each connection must be a tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(item, "iIKKKKOIOO:connection", &c->fd, &cid, &tx, &nrx, &rx, &wtop, &out, &events,
                          &wlog, &win))
        return -1;
    c->cid = cid;
    c->tx_seq = tx;
    c->next_rx = nrx;
    c->rx = rx;
    c->wtop = wtop;
    c->events = events;
    if (c->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "a connection's descriptor is negative");
        return -1;
    }
    if (rx > tx * L->ml || nrx != rx / L->ml || wtop % L->block || wtop > tx + L->window || tx > nrx + L->depth) {
        PyErr_Format(PyExc_ValueError, "connection %u: inconsistent stream state", cid);
        return -1;
    }
    if (PyObject_GetBuffer(win, &c->win, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    c->has_win = 1;
    if ((uint64_t)c->win.len != L->wbytes) {
        PyErr_Format(PyExc_ValueError, "connection %u: window of %zd bytes, expected %llu", cid, c->win.len,
                     (unsigned long long)L->wbytes);
        return -1;
    }
    if (out != Py_None) {
        char *ob;
        Py_ssize_t olen;
        if (PyBytes_AsStringAndSize(out, &ob, &olen) < 0) return -1;
        /* The unsent bytes must be the window's just before tx_seq (never otherwise in
         * plain stream mode): then the window alone says what is still to be written. */
        uint64_t end = tx * L->ml;
        int ok = (uint64_t)olen <= end - rx;
        for (uint64_t i = 0; ok && i < (uint64_t)olen; i++)
            ok = ((const uint8_t *)c->win.buf)[(end - (uint64_t)olen + i) % L->wbytes] == (uint8_t)ob[i];
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "connection %u: unsent bytes are not the window's", cid);
            return -1;
        }
        c->unsent = (uint64_t)olen;
    }
    PyObject *seq = PySequence_Fast(wlog, "wlog must be iterable");
    if (seq == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    c->cap = (size_t)n + L->depth + 2;
    c->log = calloc(c->cap, sizeof(wentry));
    if (c->log == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long end;
        long long t;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KL:wlog entry", &end, &t)) {
            Py_DECREF(seq);
            return -1;
        }
        c->log[i] = (wentry){end, t};
    }
    c->len = (size_t)n;
    Py_DECREF(seq);
    return 0;
}

static PyObject *conn_result(loop *L, sconn *c) {
    PyObject *wlog = PyList_New((Py_ssize_t)c->len);
    if (wlog == NULL) return NULL;
    for (size_t i = 0; i < c->len; i++) {
        wentry *e = &c->log[(c->head + i) % c->cap];
        PyObject *pair = Py_BuildValue("(KL)", (unsigned long long)e->end, (long long)e->t);
        if (pair == NULL) {
            Py_DECREF(wlog);
            return NULL;
        }
        PyList_SET_ITEM(wlog, (Py_ssize_t)i, pair);
    }
    PyObject *out;
    if (c->unsent) { /* the window's bytes before tx_seq * mlen, as Python's c.out */
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)c->unsent);
        if (out == NULL) {
            Py_DECREF(wlog);
            return NULL;
        }
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
        uint64_t start = c->tx_seq * L->ml - c->unsent;
        for (uint64_t i = 0; i < c->unsent; i++) o[i] = ((const uint8_t *)c->win.buf)[(start + i) % L->wbytes];
    } else {
        out = Py_NewRef(Py_None);
    }
    PyObject *detail;
    if (c->status == HANDOFF_MISMATCH)
        detail = PyBytes_FromStringAndSize((const char *)c->data, (Py_ssize_t)c->dlen);
    else if (c->status != HANDOFF_NONE)
        detail = PyLong_FromLong(c->err);
    else
        detail = Py_NewRef(Py_None);
    if (detail == NULL) {
        Py_DECREF(wlog);
        Py_DECREF(out);
        return NULL;
    }
    return Py_BuildValue("(KKKKNINiN)", (unsigned long long)c->tx_seq, (unsigned long long)c->next_rx,
                         (unsigned long long)c->rx, (unsigned long long)c->wtop, out, (unsigned int)c->events,
                         wlog, c->status, detail);
}

/* Add the call's bucket counts into the histogram's list. */
static int add_counts(PyObject *counts, const uint64_t *hist) {
    for (Py_ssize_t i = 0; i < HIST_SIZE; i++) {
        if (!hist[i]) continue;
        PyObject *old = PyList_GET_ITEM(counts, i);
        PyObject *add = PyLong_FromUnsignedLongLong(hist[i]);
        if (add == NULL) return -1;
        PyObject *sum = PyNumber_Add(old, add);
        Py_DECREF(add);
        if (sum == NULL) return -1;
        PyList_SetItem(counts, i, sum); /* steals sum, releases old */
    }
    return 0;
}

static PyObject *stressloop_run(PyObject *module, PyObject *args) {
    loop L;
    memset(&L, 0, sizeof L);
    long long deadline;
    PyObject *conns, *counts;
    unsigned long long ml, hlen, block, window, depth;
    const char *head, *pattern;
    Py_ssize_t head_len, pattern_len;
    int sending;
    long long t_start, budget, lo, hi;
    if (!PyArg_ParseTuple(args, "iLO(KKKKy#y#)(KLpLLL)O!:run", &L.epfd, &deadline, &conns, &ml, &hlen, &block,
                          &window, &head, &head_len, &pattern, &pattern_len, &depth, &t_start, &sending, &budget,
                          &lo, &hi, &PyList_Type, &counts))
        return NULL;
    if (PyList_GET_SIZE(counts) != HIST_SIZE) {
        PyErr_Format(PyExc_ValueError, "counts must have %d buckets", HIST_SIZE);
        return NULL;
    }
    if (block < 1 || window < block || window % block || depth < 1 || window < depth + block ||
        (uint64_t)head_len != hlen || ml <= hlen + ID_SIZE || (uint64_t)pattern_len < 255 + (ml - hlen - ID_SIZE)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent layout");
        return NULL;
    }
    L.ml = ml;
    L.hlen = hlen;
    L.block = block;
    L.window = window;
    L.wbytes = window * ml;
    L.depth = depth;
    L.k = ml - hlen - ID_SIZE;
    L.head = (const uint8_t *)head;
    L.pattern = (const uint8_t *)pattern;
    L.t_start = t_start;
    L.sending = sending;
    L.budget = budget < 0 ? -1 : budget;
    L.lo = lo;
    L.hi = hi;

    PyObject *seq = PySequence_Fast(conns, "conns must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t nc = PySequence_Fast_GET_SIZE(seq);
    sconn *cs = calloc((size_t)(nc ? nc : 1), sizeof(sconn));
    int *table = NULL;
    PyObject *results = NULL, *ret = NULL;
    if (cs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int max_fd = -1;
    for (Py_ssize_t i = 0; i < nc; i++) {
        if (parse_conn(&L, PySequence_Fast_GET_ITEM(seq, i), &cs[i]) < 0) goto done;
        if (cs[i].fd > max_fd) max_fd = cs[i].fd;
    }
    table = malloc(sizeof(int) * (size_t)(max_fd + 1 > 0 ? max_fd + 1 : 1));
    L.hist = calloc(HIST_SIZE, sizeof(uint64_t));
    L.buf = malloc(RECV_SIZE);
    if (table == NULL || L.hist == NULL || L.buf == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (int fd = 0; fd <= max_fd; fd++) table[fd] = -1;
    for (Py_ssize_t i = 0; i < nc; i++) {
        if (table[cs[i].fd] >= 0) {
            PyErr_Format(PyExc_ValueError, "descriptor %d appears twice", cs[i].fd);
            goto done;
        }
        table[cs[i].fd] = (int)i;
    }

    Py_BEGIN_ALLOW_THREADS
    struct epoll_event evs[MAX_EVENTS];
    int64_t cap = now_ns() + MAX_CALL_NS;
    int64_t until = deadline < cap ? deadline : cap;
    for (;;) { /* at least one poll, as Python's loop (timeout 0 past the deadline) */
        int64_t now = now_ns();
        int64_t left = until - now;
        int ms = left <= 0 ? 0 : (int)((left + 999999) / 1000000); /* whole ms, rounded up */
        int n = epoll_wait(L.epfd, evs, MAX_EVENTS, ms);
        if (n < 0) {
            if (errno != EINTR) L.poll_errno = errno;
            break; /* a signal: let its handler run */
        }
        if (n == 0) {
            if (left <= 0) break;
            continue;
        }
        now = now_ns(); /* one clock reading per poll */
        L.last_round = now;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            int j = fd >= 0 && fd <= max_fd ? table[fd] : -1;
            if (j < 0) {
                L.foreign = 1; /* level-triggered: Python's next poll sees it again */
                continue;
            }
            sconn *c = &cs[j];
            if (c->status) continue;
            uint32_t ev = evs[i].events;
            if (ev & EPOLLOUT) flush(&L, c);
            if (c->status || !(ev & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
            on_readable(&L, c, now);
        }
        if (left <= 0 || L.handoffs || L.foreign || !L.sending || L.budget == 0) break;
    }
    Py_END_ALLOW_THREADS

    if (add_counts(counts, L.hist) < 0) goto done;
    results = PyList_New(nc);
    if (results == NULL) goto done;
    for (Py_ssize_t i = 0; i < nc; i++) {
        PyObject *r = conn_result(&L, &cs[i]);
        if (r == NULL) goto done;
        PyList_SET_ITEM(results, i, r);
    }
    ret = Py_BuildValue("(O(KKLLLLKKKLiiL))", results, (unsigned long long)L.got, (unsigned long long)L.measured,
                        (long long)L.lsum, (long long)L.lo, (long long)L.hi, (long long)L.last_ok,
                        (unsigned long long)L.sent, (unsigned long long)L.sent_measured,
                        (unsigned long long)L.bytes_in, (long long)L.budget, L.foreign, L.poll_errno,
                        (long long)L.last_round);
done:
    Py_XDECREF(results);
    Py_DECREF(seq);
    if (cs != NULL) free_conns(cs, nc);
    free(table);
    free(L.hist);
    free(L.buf);
    return ret;
}

static PyObject *stressloop_bucket(PyObject *module, PyObject *arg) {
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "histogram values must be >= 0, not %lld", v);
        return NULL;
    }
    return PyLong_FromSize_t(bucket((int64_t)v));
}

static PyMethodDef methods[] = {
    {"run", stressloop_run, METH_VARARGS,
     "run(epfd, deadline, conns, layout, params, counts) -> (results, totals): stream mode's hot loop "
     "until the deadline (see the module source's theory of operation)."},
    {"bucket", stressloop_bucket, METH_O, "bucket(value) -> the histogram bucket the loop counts value in."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "msgsock._stressloop",
    "Stream mode's hot loop of msgsock stress in C (send, receive, verify, histogram).", -1, methods,
};

PyMODINIT_FUNC PyInit__stressloop(void) {
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "HIST_SIZE", HIST_SIZE) < 0 || PyModule_AddIntConstant(m, "MAX_CALL_MS", (int)(MAX_CALL_NS / 1000000)) < 0 ||
        PyModule_AddIntConstant(m, "HANDOFF_NONE", HANDOFF_NONE) < 0 ||
        PyModule_AddIntConstant(m, "HANDOFF_MISMATCH", HANDOFF_MISMATCH) < 0 ||
        PyModule_AddIntConstant(m, "HANDOFF_EOF", HANDOFF_EOF) < 0 ||
        PyModule_AddIntConstant(m, "HANDOFF_RECV_ERROR", HANDOFF_RECV_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "HANDOFF_SEND_ERROR", HANDOFF_SEND_ERROR) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
