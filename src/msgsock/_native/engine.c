/*
 * engine.c - msgsock._engine: the native event loop behind `msgsock serve --engine native`.
 *
 * Theory of operation (SPEC §5.0, §7, §8).  The C side only moves bytes; the Python side
 * (msgsock.native) owns one msgsock.serving.ServerProtocol and a MessageProtocol per
 * connection, and decides everything a connection does once it leaves the hot path.
 *
 * A connection is in one of two modes:
 *
 * - NATIVE (the hot path): every read is framed here (engine_rx.h over frame.h): the
 *   built-in echo sends the complete frames back as one span, reverse reverses each
 *   body, a Python handler is called once per message with its body as bytes.  The
 *   counters (messages and bytes each way) are kept here and written into the
 *   protocol's Statistics at each sweep (so the core's idle timeout sees activity) and
 *   when the connection leaves this mode.  The message-completion timeout is checked
 *   here at each sweep, with the core's semantics (a frame in progress at two sweeps
 *   with no message completed in between); its wording is the core's.
 * - PYTHON: anything else -- the peer's EOF, a bad header, a timeout, the shutdown, a
 *   handler error, a frame format whose messages carry header fields and a Python
 *   handler.  At the switch the counters are synchronised and the unparsed bytes (a
 *   partial frame, or a bad header and what follows) are given to the protocol's
 *   receive_data(); from then on every read goes to Python as bytes and Python tells the
 *   loop what to write, when to pause reading, half-close, close or reset.
 *
 * Callbacks into Python (always with the GIL held, from run() only):
 *   server._accepted(peer, now) -> MessageProtocol, or None to reset the socket (rejected)
 *   server._event(proto, code, partial, arg)   code: EV_* below; partial: bytes when the
 *       connection switches to PYTHON mode with this event, else None.
 * The loop never frees a connection inside a method Python calls: a socket closed there
 * is put on a list and its EV_LOST is delivered from run().
 *
 * The GIL is released around epoll_wait only.  run(timeout) returns after `timeout`
 * seconds (the sweep is due), when the wake-up fd becomes readable (a stop request or
 * a signal: Python runs its handlers as soon as run() returns), or on EINTR.
 *
 * Backends: epoll (engine_epoll in this file) and io_uring (engine_uring.h), chosen at
 * construction; io_uring falls back to epoll when the kernel refuses it.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "engine_rx.h"
#include "engine_uring.h"

enum { MODE_ECHO = 0, MODE_REVERSE = 1, MODE_HANDLER = 2 };
enum { EV_HANDOVER = 1, EV_DATA = 2, EV_EOF = 3, EV_LOST = 4, EV_MSG_TIMEOUT = 5, EV_HANDLER_ERROR = 6 };

#define READ_SIZE (256 * 1024)
#define MAX_EVENTS 256
#define ACCEPT_BATCH 64
#define TAG_WAKE ((uint64_t)-1)
#define TAG_LISTEN_BASE ((uint64_t)-1024)

/* io_uring: the operation in the top byte of user_data, a pointer or an index below */
enum { U_RECV = 1, U_SEND = 2, U_ACCEPT = 3, U_WAKE = 4, U_CANCEL = 5 };
#define UD(op, p) (((uint64_t)(op) << 56) | (uint64_t)(uintptr_t)(p))
#define UD_OP(u) ((int)((u) >> 56))
#define UD_PTR(u) ((void *)(uintptr_t)((u) & ((1ULL << 56) - 1)))
#define URING_ENTRIES 1024
#define URING_BUFS 128
#define URING_BUF_SIZE (32 * 1024)
#define URING_ACCEPTS 8 /* accepts in flight per listening socket, each with its own address */

typedef struct conn {
    int fd;
    uint32_t slot;
    unsigned python : 1;      /* PYTHON mode */
    unsigned eof : 1;         /* the peer's EOF was read */
    unsigned wm_paused : 1;   /* unsent output above the high-water mark */
    unsigned py_paused : 1;   /* Python said: do not read */
    unsigned py_open : 1;     /* Python mode, protocol OPEN: the water marks apply */
    unsigned shut_pending : 1;/* shutdown(SHUT_WR) once the output is written */
    unsigned close_pending : 1;/* close once the output is written */
    unsigned dead : 1;        /* the socket is closed; EV_LOST is due */
    unsigned dirty : 1;       /* counters changed since the last sync */
    uint32_t events;          /* the epoll mask registered */
    int lost_errno;
    ms_rx rx;                 /* the unparsed input (a partial frame) */
    char *out;                /* unsent output: out[out_off:out_len] */
    size_t out_off, out_len, out_cap;
    uint64_t msgs_in, bytes_in, msgs_out, bytes_out;
    int64_t frame_msgs;       /* message timeout bookkeeping (as MessageProtocol.check_timeouts) */
    double frame_since;
    PyObject *proto;          /* the MessageProtocol */
    PyObject *stats;          /* proto.stats */
    struct conn *next_dead;
    /* io_uring: output appended while a send is in flight goes to out2 (out must not move) */
    char *out2;
    size_t out2_len, out2_cap;
    unsigned recv_armed : 1, recv_cancel : 1, send_busy : 1, in_sendq : 1, zombie : 1;
    int inflight;             /* operations whose completion is due (the memory stays till then) */
    struct conn *next_send, *next_zombie;
} conn;

typedef struct {
    PyObject_HEAD
    int ep;
    int wake_fd;
    int nlisten;
    int listen_fds[16];
    int accepting;
    int mode;
    ms_format fmt;
    size_t high_water, low_water;
    PyObject *server;         /* the NativeServer: _accepted and _event */
    PyObject *accepted_cb, *event_cb;
    PyObject *handler;        /* MODE_HANDLER */
    PyObject *check_reply;    /* msgsock.protocol.check_reply: raises the core's TypeError */
    PyObject *oversize;       /* msgsock.exceptions.OversizeMessage */
    conn **slots;
    uint32_t nslots, cap_slots;
    uint32_t *free_slots;
    uint32_t nfree;
    uint32_t nconns;
    conn *dead;               /* sockets closed, EV_LOST due */
    char *rbuf;               /* READ_SIZE scratch for reads */
    char *obuf;               /* scratch for replies built from one read */
    size_t obuf_cap;
    int in_run;
    int python_frames;        /* handler + header fields: every connection in PYTHON mode */
    const char *backend;
    ms_uring *ur;             /* the io_uring backend; NULL: epoll */
    conn *sendq;              /* io_uring: connections with output to submit */
    conn *zombies;            /* io_uring: released connections with operations in flight */
    int closed;               /* release() was called */
    int accept_armed[16 * URING_ACCEPTS];
    struct sockaddr_storage accept_addr[16 * URING_ACCEPTS]; /* each accept's peer address */
    socklen_t accept_len[16 * URING_ACCEPTS];
    int woken;
} Loop;

static PyObject *s_messages_received, *s_bytes_received, *s_messages_sent, *s_bytes_sent;

static double now_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -- connections: table, epoll mask --------------------------------------------------- */

static conn *conn_get(Loop *lp, PyObject *arg) {
    long slot = PyLong_AsLong(arg);
    if (slot == -1 && PyErr_Occurred()) return NULL;
    if (slot < 0 || (uint32_t)slot >= lp->nslots || lp->slots[slot] == NULL) {
        PyErr_Format(PyExc_ValueError, "no connection %ld", slot);
        return NULL;
    }
    return lp->slots[slot]; /* a dead one (its EV_LOST is due) takes every call as a no-op */
}

static size_t out_pending(const conn *c) { return c->out_len - c->out_off + c->out2_len; }

static void ur_arm_recv(Loop *lp, conn *c) {
    struct io_uring_sqe *sqe = ms_uring_sqe(lp->ur);
    if (sqe == NULL) return; /* the ring is stuck: retried at the next update */
    sqe->opcode = IORING_OP_RECV;
    sqe->fd = c->fd;
    sqe->ioprio = IORING_RECV_MULTISHOT;
    sqe->flags = IOSQE_BUFFER_SELECT;
    sqe->buf_group = MS_URING_BGID;
    sqe->user_data = UD(U_RECV, c);
    c->recv_armed = 1;
    c->inflight++;
}

static void ur_cancel(Loop *lp, uint64_t target) {
    struct io_uring_sqe *sqe = ms_uring_sqe(lp->ur);
    if (sqe == NULL) return;
    sqe->opcode = IORING_OP_ASYNC_CANCEL;
    sqe->addr = target;
    sqe->user_data = UD(U_CANCEL, 0);
}

static void conn_update_events(Loop *lp, conn *c) {
    if (c->dead) return;
    if (c->wm_paused) {
        if (out_pending(c) <= lp->low_water) c->wm_paused = 0;
    } else if (out_pending(c) > lp->high_water) {
        c->wm_paused = 1;
    }
    int wm = c->wm_paused && (!c->python || c->py_open);
    int reading = !c->eof && !c->py_paused && !wm && !c->close_pending;
    if (lp->ur != NULL) { /* a multishot receive is armed while reading, cancelled to pause */
        if (reading && !c->recv_armed) {
            ur_arm_recv(lp, c);
        } else if (!reading && c->recv_armed && !c->recv_cancel) {
            ur_cancel(lp, UD(U_RECV, c));
            c->recv_cancel = 1;
        }
        c->events = reading ? EPOLLIN : 0;
        return;
    }
    uint32_t ev = (reading ? EPOLLIN : 0) | (out_pending(c) ? EPOLLOUT : 0);
    if (ev != c->events) {
        struct epoll_event e = {.events = ev, .data.u64 = c->slot};
        epoll_ctl(lp->ep, EPOLL_CTL_MOD, c->fd, &e);
        c->events = ev;
    }
}

static void conn_kill(Loop *lp, conn *c, int err, int reset) {
    if (c->dead) return;
    if (reset) {
        struct linger lg = {1, 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    if (lp->ur != NULL) {
        if (c->recv_armed && !c->recv_cancel) {
            ur_cancel(lp, UD(U_RECV, c));
            c->recv_cancel = 1;
        }
        if (c->send_busy) ur_cancel(lp, UD(U_SEND, c));
    } else {
        epoll_ctl(lp->ep, EPOLL_CTL_DEL, c->fd, NULL);
    }
    close(c->fd); /* io_uring holds the file until its operations end: the reset goes out then */
    c->fd = -1;
    c->dead = 1;
    c->lost_errno = err;
    c->out_off = c->out_len = c->out2_len = 0;
    c->next_dead = lp->dead;
    lp->dead = c;
}

static void conn_memfree(conn *c) {
    free(c->out);
    free(c->out2);
    free(c);
}

/* After EV_LOST: the slot and the Python objects go now, the memory once no operation is due. */
static void conn_free(Loop *lp, conn *c) {
    lp->slots[c->slot] = NULL;
    lp->free_slots[lp->nfree++] = c->slot;
    lp->nconns--;
    ms_rx_free(&c->rx);
    Py_CLEAR(c->proto);
    Py_CLEAR(c->stats);
    if (c->inflight > 0) {
        c->zombie = 1;
        c->next_zombie = lp->zombies;
        lp->zombies = c;
        return;
    }
    conn_memfree(c);
}

static void ur_done(Loop *lp, conn *c) {
    /* one operation of c completed; a released connection is freed with its last one */
    if (--c->inflight > 0 || !c->zombie) return;
    for (conn **pp = &lp->zombies; *pp; pp = &(*pp)->next_zombie) {
        if (*pp == c) {
            *pp = c->next_zombie;
            break;
        }
    }
    conn_memfree(c);
}

/* -- output ---------------------------------------------------------------------------- */

static int out_reserve(conn *c, size_t extra) {
    if (c->out_off && c->out_off == c->out_len) c->out_off = c->out_len = 0;
    if (c->out_len + extra <= c->out_cap) return 0;
    if (c->out_off) { /* compact first */
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
        if (c->out_len + extra <= c->out_cap) return 0;
    }
    size_t cap = c->out_cap ? c->out_cap : 4096;
    while (cap < c->out_len + extra) cap *= 2;
    char *p = realloc(c->out, cap);
    if (p == NULL) return -1;
    c->out = p;
    c->out_cap = cap;
    return 0;
}

/* Everything is written: the close actions that waited for it. */
static void conn_output_done(Loop *lp, conn *c) {
    c->out_off = c->out_len = 0;
    if (c->out_cap > 1024 * 1024) { /* a burst is over: give the memory back */
        free(c->out);
        c->out = NULL;
        c->out_cap = 0;
    }
    if (c->close_pending) {
        conn_kill(lp, c, 0, 0);
        return;
    }
    if (c->shut_pending) {
        c->shut_pending = 0;
        shutdown(c->fd, SHUT_WR);
    }
}

static void ur_queue_send(Loop *lp, conn *c) {
    if (c->in_sendq || c->send_busy) return;
    c->in_sendq = 1;
    c->next_send = lp->sendq;
    lp->sendq = c;
}

/* io_uring: one SEND per connection with output, all submitted with the next wait (batched). */
static void ur_flush_sends(Loop *lp) {
    while (lp->sendq) {
        conn *c = lp->sendq;
        lp->sendq = c->next_send;
        c->in_sendq = 0;
        if (c->dead || c->send_busy || c->out_len == c->out_off) continue;
        struct io_uring_sqe *sqe = ms_uring_sqe(lp->ur);
        if (sqe == NULL) {
            ur_queue_send(lp, c);
            return;
        }
        sqe->opcode = IORING_OP_SEND;
        sqe->fd = c->fd;
        sqe->addr = (uint64_t)(uintptr_t)(c->out + c->out_off);
        sqe->len = (uint32_t)((c->out_len - c->out_off) > (1u << 30) ? (1u << 30) : (c->out_len - c->out_off));
        sqe->msg_flags = MSG_NOSIGNAL;
        sqe->user_data = UD(U_SEND, c);
        c->send_busy = 1;
        c->inflight++;
    }
}

static int buf_append(char **buf, size_t *len, size_t *cap, const char *data, size_t n) {
    if (*len + n > *cap) {
        size_t nc = *cap ? *cap : 4096;
        while (nc < *len + n) nc *= 2;
        char *p = realloc(*buf, nc);
        if (p == NULL) return -1;
        *buf = p;
        *cap = nc;
    }
    memcpy(*buf + *len, data, n);
    *len += n;
    return 0;
}

static void ur_write(Loop *lp, conn *c, const char *data, size_t n) {
    int r;
    if (c->send_busy) {
        r = buf_append(&c->out2, &c->out2_len, &c->out2_cap, data, n);
    } else {
        if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
        r = buf_append(&c->out, &c->out_len, &c->out_cap, data, n);
        ur_queue_send(lp, c);
    }
    if (r < 0) {
        conn_kill(lp, c, ENOMEM, 1);
        return;
    }
    if (out_pending(c) > lp->high_water && !c->wm_paused) conn_update_events(lp, c);
}

/* Write what is pending; on a socket error the connection is killed.  Then the close
 * actions that wait for the output. */
static void conn_flush(Loop *lp, conn *c) {
    if (lp->ur != NULL) {
        if (!out_pending(c)) conn_output_done(lp, c);
        if (!c->dead) conn_update_events(lp, c);
        return;
    }
    while (out_pending(c)) {
        ssize_t w = send(c->fd, c->out + c->out_off, out_pending(c), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            conn_kill(lp, c, errno, 0);
            return;
        }
        c->out_off += (size_t)w;
    }
    if (!out_pending(c)) {
        conn_output_done(lp, c);
        if (c->dead) return;
    }
    conn_update_events(lp, c);
}

/* Send `n` bytes after what is pending: straight to the socket when nothing is. */
static void conn_write(Loop *lp, conn *c, const char *data, size_t n) {
    if (c->dead || n == 0) return;
    if (lp->ur != NULL) {
        ur_write(lp, c, data, n);
        return;
    }
    if (!out_pending(c)) {
        while (n) {
            ssize_t w = send(c->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                conn_kill(lp, c, errno, 0);
                return;
            }
            data += w;
            n -= (size_t)w;
        }
        if (n == 0) return;
    }
    if (out_reserve(c, n) < 0) {
        conn_kill(lp, c, ENOMEM, 1);
        return;
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
    conn_update_events(lp, c);
}

/* -- Python side ------------------------------------------------------------------------- */

static int set_u64(PyObject *obj, PyObject *name, uint64_t v) {
    PyObject *x = PyLong_FromUnsignedLongLong(v);
    if (x == NULL) return -1;
    int r = PyObject_SetAttr(obj, name, x);
    Py_DECREF(x);
    return r;
}

/* Write the counters into proto.stats; `held` bytes of input are not yet counted as received. */
static int conn_sync(conn *c, size_t held) {
    if (c->python) return 0;
    c->dirty = 0;
    if (set_u64(c->stats, s_messages_received, c->msgs_in) < 0 ||
        set_u64(c->stats, s_bytes_received, c->bytes_in - held) < 0 ||
        set_u64(c->stats, s_messages_sent, c->msgs_out) < 0 ||
        set_u64(c->stats, s_bytes_sent, c->bytes_out) < 0)
        return -1;
    return 0;
}

static void report_unraisable(const char *where) {
    PyErr_WriteUnraisable(PyUnicode_FromString(where));
}

/* Call server._event(proto, code, partial, arg).  A native connection switches to PYTHON
 * mode first (its unparsed input becomes `partial`).  Returns -1 when Python raised a
 * BaseException that must stop run() (KeyboardInterrupt); other exceptions are reported. */
static int conn_event(Loop *lp, conn *c, int code, PyObject *arg) {
    PyObject *partial = NULL;
    if (!c->python) {
        size_t held = ms_rx_held(&c->rx);
        if (conn_sync(c, held) < 0) goto failed;
        partial = PyBytes_FromStringAndSize((const char *)ms_rx_data(&c->rx), (Py_ssize_t)held);
        if (partial == NULL) goto failed;
        ms_rx_free(&c->rx);
        c->python = 1;
        c->py_open = 1;
    }
    PyObject *proto = c->proto;
    Py_INCREF(proto);
    PyObject *pcode = PyLong_FromLong(code);
    PyObject *r = pcode == NULL ? NULL
                                : PyObject_CallFunctionObjArgs(lp->event_cb, proto, pcode,
                                                               partial ? partial : Py_None,
                                                               arg ? arg : Py_None, NULL);
    Py_XDECREF(pcode);
    Py_DECREF(proto);
    Py_XDECREF(partial);
    if (r == NULL) goto failed;
    Py_DECREF(r);
    return 0;
failed:
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        report_unraisable("msgsock native engine: event handler");
        if (!c->dead) conn_kill(lp, c, 0, 1);
        return 0;
    }
    return -1;
}

static int deliver_dead(Loop *lp) {
    while (lp->dead) {
        conn *c = lp->dead;
        lp->dead = c->next_dead;
        PyObject *err = c->lost_errno ? PyLong_FromLong(c->lost_errno) : NULL;
        int r = conn_event(lp, c, EV_LOST, err);
        Py_XDECREF(err);
        conn_free(lp, c);
        if (r < 0) return -1;
    }
    return 0;
}

/* -- the hot path: one read of a NATIVE connection ---------------------------------------- */

static char *obuf_reserve(Loop *lp, size_t need) {
    if (need > lp->obuf_cap) {
        size_t cap = lp->obuf_cap ? lp->obuf_cap : 65536;
        while (cap < need) cap *= 2;
        char *p = realloc(lp->obuf, cap);
        if (p == NULL) return NULL;
        lp->obuf = p;
        lp->obuf_cap = cap;
    }
    return lp->obuf;
}

/* Call the handler on each complete frame of buf[0:used] (`count` of them); append the
 * replies to the loop's scratch.  Returns the reply bytes, or -1 with the handler's
 * exception set (the replies before it are kept in *done_bytes). */
static Py_ssize_t run_handler(Loop *lp, conn *c, const uint8_t *buf, size_t used, uint64_t *replies,
                              size_t *done_bytes) {
    const ms_format *f = &lp->fmt;
    size_t pos = 0, total = 0;
    *replies = 0;
    while (pos < used) {
        size_t hsize, bsize;
        ms_rx_frame(f, buf + pos, &hsize, &bsize);
        PyObject *msg = PyBytes_FromStringAndSize((const char *)buf + pos + hsize, (Py_ssize_t)bsize);
        if (msg == NULL) goto error;
        PyObject *reply = PyObject_CallOneArg(lp->handler, msg);
        Py_DECREF(msg);
        pos += hsize + bsize;
        if (reply == NULL) goto error;
        if (reply == Py_None) {
            Py_DECREF(reply);
            continue;
        }
        Py_buffer view;
        int got;
        if (PyBytes_CheckExact(reply) || PyByteArray_Check(reply) || PyMemoryView_Check(reply) ||
            PyBytes_Check(reply)) {
            got = PyObject_GetBuffer(reply, &view, PyBUF_SIMPLE);
        } else {
            PyObject *r = PyObject_CallOneArg(lp->check_reply, reply); /* raises, naming the type */
            Py_XDECREF(r);
            Py_DECREF(reply);
            if (r != NULL) continue; /* cannot happen: only bytes-like or None pass */
            goto error;
        }
        if (got < 0) {
            Py_DECREF(reply);
            goto error;
        }
        if ((uint64_t)view.len > f->max_body) {
            PyObject *exc = PyObject_CallFunction(lp->oversize, "nK", view.len, (unsigned long long)f->max_body);
            PyBuffer_Release(&view);
            Py_DECREF(reply);
            if (exc != NULL) {
                PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
                Py_DECREF(exc);
            }
            goto error;
        }
        char *o = obuf_reserve(lp, total + MS_MAX_HEADER + (size_t)view.len);
        if (o == NULL) {
            PyBuffer_Release(&view);
            Py_DECREF(reply);
            PyErr_NoMemory();
            goto error;
        }
        size_t h = ms_rx_encode_header(f, buf + pos - hsize - bsize, (uint64_t)view.len, (uint8_t *)o + total);
        memcpy(o + total + h, view.buf, (size_t)view.len);
        total += h + (size_t)view.len;
        (*replies)++;
        PyBuffer_Release(&view);
        Py_DECREF(reply);
    }
    *done_bytes = total;
    return (Py_ssize_t)total;
error:
    *done_bytes = total;
    return -1;
}

/* Returns -1 when run() must stop (a BaseException from Python). */
static int conn_native_input(Loop *lp, conn *c, const char *data, size_t n) {
    const ms_format *f = &lp->fmt;
    c->bytes_in += n;
    c->dirty = 1;
    ms_rx_view v;
    if (ms_rx_begin(&c->rx, f, (const uint8_t *)data, n, &v) < 0) {
        conn_kill(lp, c, ENOMEM, 1);
        return 0;
    }
    const ms_scan_result sr = v.sr;
    const uint8_t *buf = v.buf;
    PyObject *hexc = NULL; /* the handler's exception */
    if (sr.count) {
        c->msgs_in += sr.count;
        if (lp->mode == MODE_ECHO) {
            c->msgs_out += sr.count;
            c->bytes_out += sr.used;
            if (lp->ur != NULL && !v.in_place && !c->send_busy && c->out_len == c->out_off && !c->dead) {
                /* io_uring, frames assembled in the held input: that buffer becomes the
                 * output as it is (no copy of a large frame), the old output buffer the input */
                char *spare = c->out;
                size_t spare_cap = c->out_cap;
                c->out = (char *)c->rx.buf;
                c->out_cap = c->rx.cap;
                c->out_off = 0;
                c->out_len = sr.used;
                c->rx.buf = (uint8_t *)spare;
                c->rx.cap = spare_cap;
                c->rx.len = 0;
                if (ms_rx_append(&c->rx, (const uint8_t *)c->out + sr.used, v.len - sr.used) < 0) {
                    conn_kill(lp, c, ENOMEM, 1);
                    return 0;
                }
                ur_queue_send(lp, c);
                if (out_pending(c) > lp->high_water && !c->wm_paused) conn_update_events(lp, c);
                if (sr.error) return conn_event(lp, c, EV_HANDOVER, NULL);
                return 0;
            }
            conn_write(lp, c, (const char *)buf, sr.used);
        } else if (lp->mode == MODE_REVERSE) {
            char *o = obuf_reserve(lp, sr.used);
            if (o == NULL) {
                conn_kill(lp, c, ENOMEM, 1);
                return 0;
            }
            ms_rx_reverse_frames(f, buf, sr.used, (uint8_t *)o);
            c->msgs_out += sr.count;
            c->bytes_out += sr.used;
            conn_write(lp, c, o, sr.used);
        } else {
            uint64_t replies;
            size_t done;
            Py_ssize_t r = run_handler(lp, c, buf, sr.used, &replies, &done);
            c->msgs_out += replies;
            c->bytes_out += done;
            conn_write(lp, c, lp->obuf, done);
            if (r < 0) {
                if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
                PyObject *type, *tb;
                PyErr_Fetch(&type, &hexc, &tb);
                PyErr_NormalizeException(&type, &hexc, &tb);
                if (tb != NULL) PyException_SetTraceback(hexc, tb);
                Py_XDECREF(type);
                Py_XDECREF(tb);
            }
        }
        if (c->dead) {
            Py_XDECREF(hexc);
            return 0;
        }
    }
    /* keep the rest: a partial frame, or a bad header the core will word */
    if (ms_rx_end(&c->rx, (const uint8_t *)data, &v) < 0) {
        Py_XDECREF(hexc);
        conn_kill(lp, c, ENOMEM, 1);
        return 0;
    }
    if (hexc != NULL) {
        int r = conn_event(lp, c, EV_HANDLER_ERROR, hexc);
        Py_DECREF(hexc);
        return r;
    }
    if (sr.error) return conn_event(lp, c, EV_HANDOVER, NULL);
    return 0;
}

/* -- events -------------------------------------------------------------------------------- */

static int conn_readable(Loop *lp, conn *c) {
    for (int round = 0; round < 4; round++) {
        ssize_t n = recv(c->fd, lp->rbuf, READ_SIZE, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            if (!c->python) {
                conn_kill(lp, c, errno, 0); /* EV_LOST switches it to Python with its counters */
                return 0;
            }
            conn_kill(lp, c, errno, 0);
            return 0;
        }
        if (n == 0) {
            c->eof = 1;
            conn_update_events(lp, c);
            return conn_event(lp, c, EV_EOF, NULL);
        }
        if (c->python) {
            PyObject *data = PyBytes_FromStringAndSize(lp->rbuf, n);
            if (data == NULL) return -1;
            int r = conn_event(lp, c, EV_DATA, data);
            Py_DECREF(data);
            return r;
        }
        if (conn_native_input(lp, c, lp->rbuf, (size_t)n) < 0) return -1;
        if (c->dead || c->python || n < READ_SIZE || !(c->events & EPOLLIN)) return 0;
    }
    return 0;
}

static PyObject *peer_tuple(const struct sockaddr_storage *ss) {
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo), a->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

static int loop_add_conn(Loop *lp, int fd, PyObject *proto) {
    conn *c = calloc(1, sizeof *c);
    if (c == NULL) return -1;
    if (lp->nfree == 0) {
        uint32_t cap = lp->cap_slots ? lp->cap_slots * 2 : 1024;
        conn **s = realloc(lp->slots, cap * sizeof *s);
        if (s == NULL) { free(c); return -1; }
        lp->slots = s;
        uint32_t *fs = realloc(lp->free_slots, cap * sizeof *fs);
        if (fs == NULL) { free(c); return -1; }
        lp->free_slots = fs;
        for (uint32_t i = lp->cap_slots; i < cap; i++) {
            lp->slots[i] = NULL;
            lp->free_slots[lp->nfree++] = cap - 1 - (i - lp->cap_slots);
        }
        lp->cap_slots = cap;
        if (lp->nslots < cap) lp->nslots = cap;
    }
    c->slot = lp->free_slots[--lp->nfree];
    c->fd = fd;
    c->frame_msgs = -1;
    c->python = lp->python_frames;
    c->py_open = 1;
    c->proto = proto;
    Py_INCREF(proto);
    c->stats = PyObject_GetAttrString(proto, "stats");
    if (c->stats == NULL) {
        Py_DECREF(proto);
        lp->free_slots[lp->nfree++] = c->slot;
        free(c);
        return -1;
    }
    lp->slots[c->slot] = c;
    lp->nconns++;
    PyObject *slot = PyLong_FromUnsignedLong(c->slot);
    int r = slot ? PyObject_SetAttrString(proto, "pump", slot) : -1;
    Py_XDECREF(slot);
    c->events = EPOLLIN;
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = c->slot};
    if (r == 0 && lp->ur != NULL) {
        c->events = 0;
        conn_update_events(lp, c); /* arms the multishot receive */
        return 0;
    }
    if (r < 0 || epoll_ctl(lp->ep, EPOLL_CTL_ADD, fd, &e) < 0) {
        if (r == 0) PyErr_SetFromErrno(PyExc_OSError);
        lp->slots[c->slot] = NULL;
        lp->free_slots[lp->nfree++] = c->slot;
        lp->nconns--;
        Py_DECREF(c->stats);
        Py_DECREF(proto);
        free(c);
        return -1;
    }
    return 0;
}

static void reset_fd(int fd) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* A socket was accepted from `ss` (NULL: unknown): the core admits it or not. */
static int accept_one(Loop *lp, int fd, const struct sockaddr_storage *ss) {
    static const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    PyObject *peer = ss ? peer_tuple(ss) : (Py_INCREF(Py_None), Py_None);
    PyObject *now = PyFloat_FromDouble(now_monotonic());
    PyObject *proto = (peer && now) ? PyObject_CallFunctionObjArgs(lp->accepted_cb, peer, now, NULL) : NULL;
    Py_XDECREF(peer);
    Py_XDECREF(now);
    if (proto == NULL) {
        reset_fd(fd);
        if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
        report_unraisable("msgsock native engine: accept");
        return 0;
    }
    if (proto == Py_None) { /* rejected: the core has logged and counted it */
        Py_DECREF(proto);
        reset_fd(fd);
        return 0;
    }
    int r = loop_add_conn(lp, fd, proto);
    Py_DECREF(proto);
    if (r < 0) {
        reset_fd(fd);
        report_unraisable("msgsock native engine: new connection");
    }
    return 0;
}

static void listen_unregister(Loop *lp);

static int loop_accept(Loop *lp, int lfd) {
    for (int i = 0; i < ACCEPT_BATCH && lp->accepting == 1; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept4(lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* out of descriptors: stop accepting until the next sweep, as asyncio does */
                listen_unregister(lp);
                lp->accepting = 2;
            }
            return 0;
        }
        if (accept_one(lp, fd, &ss) < 0) return -1;
    }
    return 0;
}

static void listen_register(Loop *lp) {
    for (int k = 0; k < lp->nlisten; k++) {
        if (lp->ur != NULL) {
            for (int j = k * URING_ACCEPTS; j < (k + 1) * URING_ACCEPTS; j++) {
                if (lp->accept_armed[j]) continue;
                struct io_uring_sqe *sqe = ms_uring_sqe(lp->ur);
                if (sqe == NULL) return;
                lp->accept_len[j] = sizeof lp->accept_addr[j];
                sqe->opcode = IORING_OP_ACCEPT;
                sqe->fd = lp->listen_fds[k];
                sqe->addr = (uint64_t)(uintptr_t)&lp->accept_addr[j];
                sqe->addr2 = (uint64_t)(uintptr_t)&lp->accept_len[j];
                sqe->accept_flags = SOCK_CLOEXEC; /* blocking: io_uring waits for us */
                sqe->user_data = UD(U_ACCEPT, (uintptr_t)j);
                lp->accept_armed[j] = 1;
            }
            continue;
        }
        struct epoll_event e = {.events = EPOLLIN, .data.u64 = TAG_LISTEN_BASE + (uint64_t)k};
        epoll_ctl(lp->ep, EPOLL_CTL_ADD, lp->listen_fds[k], &e);
    }
}

static void listen_unregister(Loop *lp) {
    for (int k = 0; k < lp->nlisten; k++) {
        if (lp->ur != NULL) {
            for (int j = k * URING_ACCEPTS; j < (k + 1) * URING_ACCEPTS; j++)
                if (lp->accept_armed[j]) ur_cancel(lp, UD(U_ACCEPT, (uintptr_t)j));
        } else {
            epoll_ctl(lp->ep, EPOLL_CTL_DEL, lp->listen_fds[k], NULL);
        }
    }
    if (lp->ur != NULL) ms_uring_submit(lp->ur); /* before Python closes the sockets */
}

static void ur_arm_wake(Loop *lp) {
    struct io_uring_sqe *sqe = ms_uring_sqe(lp->ur);
    if (sqe == NULL) return;
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = lp->wake_fd;
    sqe->poll32_events = POLLIN;
    sqe->len = IORING_POLL_ADD_MULTI;
    sqe->user_data = UD(U_WAKE, 0);
}

/* -- the io_uring completions ---------------------------------------------------------------- */

static int ur_recv_done(Loop *lp, conn *c, int res, unsigned flags) {
    int more = (flags & IORING_CQE_F_MORE) != 0;
    const char *data = NULL;
    unsigned bid = 0;
    if (flags & IORING_CQE_F_BUFFER) {
        bid = flags >> IORING_CQE_BUFFER_SHIFT;
        data = (const char *)lp->ur->bufs + (size_t)bid * lp->ur->buf_size;
    }
    if (!more) {
        c->recv_armed = 0;
        c->recv_cancel = 0;
    }
    int r = 0;
    if (!c->dead) {
        if (res > 0 && data != NULL) {
            if (c->python) {
                PyObject *bytes = PyBytes_FromStringAndSize(data, res);
                r = bytes ? conn_event(lp, c, EV_DATA, bytes) : -1;
                Py_XDECREF(bytes);
            } else {
                r = conn_native_input(lp, c, data, (size_t)res);
            }
        } else if (res == 0) {
            c->eof = 1;
            r = conn_event(lp, c, EV_EOF, NULL);
        } else if (res < 0 && res != -ENOBUFS && res != -ECANCELED) {
            conn_kill(lp, c, -res, 0);
        }
        if (!c->dead) conn_update_events(lp, c); /* re-arms a receive that ended */
    }
    if (flags & IORING_CQE_F_BUFFER) ms_uring_buf_return(lp->ur, bid);
    if (!more) ur_done(lp, c);
    return r;
}

static void ur_send_done(Loop *lp, conn *c, int res) {
    c->send_busy = 0;
    if (!c->dead) {
        if (res < 0) {
            if (res != -ECANCELED) conn_kill(lp, c, -res, 0);
        } else {
            c->out_off += (size_t)res;
            if (c->out_off == c->out_len) { /* what was appended meanwhile goes next */
                char *t = c->out;
                size_t tc = c->out_cap;
                c->out = c->out2;
                c->out_cap = c->out2_cap;
                c->out_len = c->out2_len;
                c->out_off = 0;
                c->out2 = t;
                c->out2_cap = tc;
                c->out2_len = 0;
            }
            if (out_pending(c)) {
                ur_queue_send(lp, c);
            } else {
                conn_output_done(lp, c);
            }
            if (!c->dead) conn_update_events(lp, c);
        }
    }
    ur_done(lp, c);
}

/* Handle every completion ready; -1 when run() must stop. */
static int ur_reap(Loop *lp) {
    ms_uring *u = lp->ur;
    unsigned head = *u->cq_head;
    for (;;) {
        unsigned tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
        if (head == tail) break;
        struct io_uring_cqe cqe = u->cqes[head & *u->cq_mask];
        head++;
        __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
        int op = UD_OP(cqe.user_data);
        int r = 0;
        if (op == U_RECV) {
            r = ur_recv_done(lp, (conn *)UD_PTR(cqe.user_data), cqe.res, cqe.flags);
        } else if (op == U_SEND) {
            ur_send_done(lp, (conn *)UD_PTR(cqe.user_data), cqe.res);
        } else if (op == U_ACCEPT) {
            int j = (int)(uintptr_t)UD_PTR(cqe.user_data);
            lp->accept_armed[j] = 0;
            if (cqe.res >= 0) {
                if (lp->accepting != 1) {
                    reset_fd(cqe.res);
                } else {
                    struct sockaddr_storage ss = lp->accept_addr[j]; /* the slot is re-armed below */
                    r = accept_one(lp, cqe.res, &ss);
                }
            } else if (cqe.res == -EMFILE || cqe.res == -ENFILE || cqe.res == -ENOBUFS || cqe.res == -ENOMEM) {
                if (lp->accepting == 1) lp->accepting = 2; /* re-armed at the next sweep */
            }
            if (lp->accepting == 1) listen_register(lp);
        } else if (op == U_WAKE) {
            char drain[256];
            while (read(lp->wake_fd, drain, sizeof drain) > 0) {
            }
            lp->woken = 1;
            if (!(cqe.flags & IORING_CQE_F_MORE)) ur_arm_wake(lp);
        }
        if (r < 0) return -1;
        if (lp->dead && deliver_dead(lp) < 0) return -1;
    }
    return 0;
}

/* -- the Loop type ---------------------------------------------------------------------------- */

/* Drop every connection (reset), the callbacks (the cycle with the server), the kernel objects. */
static void loop_release(Loop *lp) {
    for (uint32_t i = 0; i < lp->nslots; i++) {
        conn *c = lp->slots[i];
        if (c == NULL) continue;
        if (!c->dead) reset_fd(c->fd);
        lp->slots[i] = NULL;
        ms_rx_free(&c->rx);
        Py_CLEAR(c->proto);
        Py_CLEAR(c->stats);
        if (lp->ur == NULL || c->inflight == 0) {
            conn_memfree(c);
        } else { /* the ring still refers to it: freed after the ring */
            c->zombie = 1;
            c->next_zombie = lp->zombies;
            lp->zombies = c;
        }
    }
    lp->nconns = 0;
    lp->dead = NULL;
    lp->sendq = NULL;
    if (lp->ep >= 0) {
        close(lp->ep);
        lp->ep = -1;
    }
    if (lp->ur != NULL) {
        ms_uring_close(lp->ur);
        free(lp->ur);
        lp->ur = NULL;
    }
    while (lp->zombies) {
        conn *z = lp->zombies;
        lp->zombies = z->next_zombie;
        conn_memfree(z);
    }
    Py_CLEAR(lp->server);
    Py_CLEAR(lp->accepted_cb);
    Py_CLEAR(lp->event_cb);
    Py_CLEAR(lp->handler);
    lp->closed = 1;
}

static int loop_check_open(Loop *lp) {
    if (lp->closed) {
        PyErr_SetString(PyExc_RuntimeError, "the loop is closed");
        return -1;
    }
    return 0;
}

static PyObject *Loop_release(Loop *lp, PyObject *unused) {
    if (lp->in_run) {
        PyErr_SetString(PyExc_RuntimeError, "release() while run() is running");
        return NULL;
    }
    if (!lp->closed) loop_release(lp);
    Py_RETURN_NONE;
}

static void Loop_dealloc(Loop *lp) {
    for (uint32_t i = 0; i < lp->nslots; i++) {
        conn *c = lp->slots[i];
        if (c == NULL) continue;
        if (!c->dead) {
            reset_fd(c->fd);
        }
        ms_rx_free(&c->rx);
        Py_XDECREF(c->proto);
        Py_XDECREF(c->stats);
        conn_memfree(c);
    }
    while (lp->zombies) {
        conn *z = lp->zombies;
        lp->zombies = z->next_zombie;
        conn_memfree(z);
    }
    free(lp->slots);
    free(lp->free_slots);
    free(lp->rbuf);
    free(lp->obuf);
    if (lp->ep >= 0) close(lp->ep);
    if (lp->ur != NULL) { /* closing the ring ends every operation; then the buffers can go */
        ms_uring_close(lp->ur);
        free(lp->ur);
    }
    Py_XDECREF(lp->server);
    Py_XDECREF(lp->accepted_cb);
    Py_XDECREF(lp->event_cb);
    Py_XDECREF(lp->handler);
    Py_XDECREF(lp->check_reply);
    Py_XDECREF(lp->oversize);
    Py_TYPE(lp)->tp_free((PyObject *)lp);
}

/* frame = (length_size, big_endian, length_includes_header, header_size, length_offset, max_body),
 * as msgsock.native builds it from a FrameFormat. */
static int format_from_python(PyObject *frame, ms_format *f) {
    unsigned int length_size;
    int big, incl;
    Py_ssize_t hsize, offset;
    unsigned long long max_body;
    if (!PyArg_ParseTuple(frame, "IppnnK", &length_size, &big, &incl, &hsize, &offset, &max_body)) return -1;
    if (offset < 0 || hsize < offset + (Py_ssize_t)length_size ||
        ms_rx_format_init(f, length_size, big, incl, (size_t)offset, (size_t)(hsize - offset - (Py_ssize_t)length_size),
                          max_body) < 0) {
        PyErr_SetString(PyExc_ValueError, "bad frame descriptor");
        return -1;
    }
    return 0;
}

static PyObject *Loop_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"server", "listen_fds", "wake_fd", "mode", "handler", "frame",
                             "high_water", "low_water", "python_frames", "check_reply", "oversize", "backend", NULL};
    PyObject *server, *fds, *handler, *frame, *check_reply, *oversize;
    int wake_fd, mode, python_frames;
    const char *backend = "epoll";
    Py_ssize_t high, low;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOiiOOnnpOO|s", kwlist, &server, &fds, &wake_fd, &mode,
                                     &handler, &frame, &high, &low, &python_frames, &check_reply, &oversize,
                                     &backend))
        return NULL;
    if (mode < MODE_ECHO || mode > MODE_HANDLER) {
        PyErr_SetString(PyExc_ValueError, "mode must be 0 (echo), 1 (reverse) or 2 (handler)");
        return NULL;
    }
    Loop *lp = (Loop *)type->tp_alloc(type, 0);
    if (lp == NULL) return NULL;
    lp->ep = -1;
    if (format_from_python(frame, &lp->fmt) < 0) goto fail;
    PyObject *seq = PySequence_Fast(fds, "listen_fds must be a sequence of ints");
    if (seq == NULL) goto fail;
    Py_ssize_t nf = PySequence_Fast_GET_SIZE(seq);
    if (nf < 1 || nf > 16) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "listen_fds: 1 to 16 sockets");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < nf; i++) {
        lp->listen_fds[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
    }
    Py_DECREF(seq);
    if (PyErr_Occurred()) goto fail;
    lp->nlisten = (int)nf;
    lp->wake_fd = wake_fd;
    lp->mode = mode;
    lp->python_frames = python_frames;
    lp->high_water = (size_t)high;
    lp->low_water = (size_t)low;
    lp->server = server;
    Py_INCREF(server);
    lp->handler = handler;
    Py_INCREF(handler);
    lp->check_reply = check_reply;
    Py_INCREF(check_reply);
    lp->oversize = oversize;
    Py_INCREF(oversize);
    lp->accepted_cb = PyObject_GetAttrString(server, "_accepted");
    lp->event_cb = PyObject_GetAttrString(server, "_event");
    if (lp->accepted_cb == NULL || lp->event_cb == NULL) goto fail;
    lp->rbuf = malloc(READ_SIZE);
    if (lp->rbuf == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    if (strcmp(backend, "io_uring") == 0) {
        lp->ur = malloc(sizeof *lp->ur);
        if (lp->ur != NULL && ms_uring_open(lp->ur, URING_ENTRIES, URING_BUFS, URING_BUF_SIZE) < 0) {
            free(lp->ur); /* the kernel refuses it (or lacks a feature): epoll */
            lp->ur = NULL;
        }
    } else if (strcmp(backend, "epoll") != 0) {
        PyErr_Format(PyExc_ValueError, "unknown backend %s", backend);
        goto fail;
    }
    lp->accepting = 1;
    if (lp->ur != NULL) {
        lp->backend = "io_uring";
        ur_arm_wake(lp);
        listen_register(lp);
        if (ms_uring_submit(lp->ur) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        return (PyObject *)lp;
    }
    lp->ep = epoll_create1(EPOLL_CLOEXEC);
    if (lp->ep < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = TAG_WAKE};
    if (epoll_ctl(lp->ep, EPOLL_CTL_ADD, wake_fd, &e) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    listen_register(lp);
    lp->backend = "epoll";
    return (PyObject *)lp;
fail:
    Py_DECREF(lp);
    return NULL;
}

/* run(timeout) -> 0 (timeout: the sweep is due), 1 (woken), 2 (interrupted by a signal) */
static PyObject *Loop_run(Loop *lp, PyObject *arg) {
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    if (lp->in_run) {
        PyErr_SetString(PyExc_RuntimeError, "run() is already running");
        return NULL;
    }
    if (loop_check_open(lp) < 0) return NULL;
    lp->in_run = 1;
    int result = 0;
    double end = now_monotonic() + (timeout > 0 ? timeout : 0);
    struct epoll_event evs[MAX_EVENTS];
    if (deliver_dead(lp) < 0) goto error;
    if (lp->ur != NULL && lp->ur->disabled) {
        if (ms_uring_enable(lp->ur) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto error;
        }
    }
    while (lp->ur != NULL) {
        ur_flush_sends(lp);
        double left = end - now_monotonic();
        int ms = left <= 0 ? 0 : (int)(left * 1000.0 + 0.999);
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = ms_uring_wait(lp->ur, ms);
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            if (errno == EINTR) {
                result = 2;
                goto done;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            goto error;
        }
        lp->woken = 0;
        if (ur_reap(lp) < 0) goto error;
        if (lp->dead && deliver_dead(lp) < 0) goto error;
        if (lp->woken) {
            result = 1;
            goto done;
        }
        if (now_monotonic() >= end) goto done;
    }
    for (;;) {
        double left = end - now_monotonic();
        int ms = left <= 0 ? 0 : (int)(left * 1000.0 + 0.999);
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(lp->ep, evs, MAX_EVENTS, ms);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) {
                result = 2;
                break;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            goto error;
        }
        int woken = 0;
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            if (tag == TAG_WAKE) {
                char drain[256];
                while (read(lp->wake_fd, drain, sizeof drain) > 0) {
                }
                woken = 1;
                continue;
            }
            if (tag >= TAG_LISTEN_BASE) {
                if (lp->accepting == 1 && loop_accept(lp, lp->listen_fds[tag - TAG_LISTEN_BASE]) < 0) goto error;
                continue;
            }
            if (tag >= lp->nslots) continue;
            conn *c = lp->slots[tag];
            if (c == NULL || c->dead) continue;
            uint32_t ev = evs[i].events;
            if ((ev & EPOLLOUT) && out_pending(c)) conn_flush(lp, c);
            if (!c->dead && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && (c->events & EPOLLIN)) {
                if (conn_readable(lp, c) < 0) goto error;
            } else if (!c->dead && (ev & EPOLLERR)) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                conn_kill(lp, c, err ? err : ECONNRESET, 0);
            } else if (!c->dead && (ev & EPOLLHUP) && !(c->events & EPOLLOUT)) {
                /* nothing to read (paused or after EOF) or write: the peer is gone */
                conn_kill(lp, c, c->eof ? 0 : ECONNRESET, 0);
            }
            if (lp->dead && deliver_dead(lp) < 0) goto error;
        }
        if (lp->dead && deliver_dead(lp) < 0) goto error;
        if (woken) {
            result = 1;
            break;
        }
        if (now_monotonic() >= end) break;
    }
done:
    if (lp->ur != NULL) {
        ur_flush_sends(lp); /* what the last completions wrote goes out now */
        ms_uring_submit(lp->ur);
    }
    lp->in_run = 0;
    return PyLong_FromLong(result);
error:
    lp->in_run = 0;
    return NULL;
}

/* sweep(now, message_timeout): sync the counters that changed (the core's idle timeout reads
 * them), check the message-completion timeout of the native connections, resume accepting
 * after EMFILE.  message_timeout <= 0: off. */
static PyObject *Loop_sweep(Loop *lp, PyObject *args) {
    double now, mt;
    if (!PyArg_ParseTuple(args, "dd", &now, &mt)) return NULL;
    if (loop_check_open(lp) < 0) return NULL;
    if (lp->accepting == 2) {
        lp->accepting = 1;
        listen_register(lp);
    }
    for (uint32_t i = 0; i < lp->nslots; i++) {
        conn *c = lp->slots[i];
        if (c == NULL || c->dead || c->python) continue;
        size_t held = ms_rx_held(&c->rx);
        if (held && mt > 0) {
            if ((int64_t)c->msgs_in != c->frame_msgs) {
                c->frame_msgs = (int64_t)c->msgs_in;
                c->frame_since = now;
            } else if (now - c->frame_since > mt) {
                PyObject *n = PyLong_FromSize_t(held);
                if (n == NULL) return NULL;
                int r = conn_event(lp, c, EV_MSG_TIMEOUT, n);
                Py_DECREF(n);
                if (r < 0) return NULL;
                continue;
            }
        } else {
            c->frame_msgs = -1;
        }
        if (c->dirty && conn_sync(c, held) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

/* handover_all(): every NATIVE connection switches to PYTHON mode (before the shutdown). */
static PyObject *Loop_handover_all(Loop *lp, PyObject *unused) {
    if (loop_check_open(lp) < 0) return NULL;
    for (uint32_t i = 0; i < lp->nslots; i++) {
        conn *c = lp->slots[i];
        if (c == NULL || c->dead || c->python) continue;
        if (conn_event(lp, c, EV_HANDOVER, NULL) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

/* sync(): write the counters of every native connection into its protocol (statistics()). */
static PyObject *Loop_sync(Loop *lp, PyObject *unused) {
    for (uint32_t i = 0; i < lp->nslots; i++) {
        conn *c = lp->slots[i];
        if (c == NULL || c->dead || c->python || !c->dirty) continue;
        if (conn_sync(c, ms_rx_held(&c->rx)) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Loop_stop_accepting(Loop *lp, PyObject *unused) {
    if (lp->accepting == 1) listen_unregister(lp);
    lp->accepting = 0;
    Py_RETURN_NONE;
}

/* send(slot, data): write bytes after what is pending (PYTHON mode output). */
static PyObject *Loop_send(Loop *lp, PyObject *args) {
    PyObject *slot;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "Oy*", &slot, &buf)) return NULL;
    conn *c = conn_get(lp, slot);
    if (c == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (!c->python) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_RuntimeError, "send() on a connection the loop frames natively");
        return NULL;
    }
    conn_write(lp, c, buf.buf, (size_t)buf.len);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

/* set_reading(slot, paused, open): Python's reading_paused, and whether the protocol is OPEN. */
static PyObject *Loop_set_reading(Loop *lp, PyObject *args) {
    PyObject *slot;
    int paused, open;
    if (!PyArg_ParseTuple(args, "Opp", &slot, &paused, &open)) return NULL;
    conn *c = conn_get(lp, slot);
    if (c == NULL) return NULL;
    if (c->dead) Py_RETURN_NONE;
    c->py_paused = paused;
    c->py_open = open;
    conn_update_events(lp, c);
    Py_RETURN_NONE;
}

/* half_close(slot): shutdown(SHUT_WR) once the pending output is written. */
static PyObject *Loop_half_close(Loop *lp, PyObject *slot) {
    conn *c = conn_get(lp, slot);
    if (c == NULL) return NULL;
    if (c->dead) Py_RETURN_NONE;
    c->shut_pending = 1;
    if (!out_pending(c)) conn_flush(lp, c);
    Py_RETURN_NONE;
}

/* close(slot): close once the pending output is written (EV_LOST then). */
static PyObject *Loop_close(Loop *lp, PyObject *slot) {
    conn *c = conn_get(lp, slot);
    if (c == NULL) return NULL;
    if (c->dead) Py_RETURN_NONE;
    c->close_pending = 1;
    conn_flush(lp, c);
    Py_RETURN_NONE;
}

/* abort(slot): reset now (SO_LINGER 0); EV_LOST follows. */
static PyObject *Loop_abort(Loop *lp, PyObject *slot) {
    conn *c = conn_get(lp, slot);
    if (c == NULL) return NULL;
    conn_kill(lp, c, 0, 1);
    Py_RETURN_NONE;
}

static PyObject *Loop_pending(Loop *lp, PyObject *slot) {
    conn *c = conn_get(lp, slot);
    if (c == NULL) return NULL;
    return PyLong_FromSize_t(out_pending(c));
}

static PyObject *Loop_get_connections(Loop *lp, void *unused) { return PyLong_FromUnsignedLong(lp->nconns); }
static PyObject *Loop_get_backend(Loop *lp, void *unused) { return PyUnicode_FromString(lp->backend); }

static PyMethodDef Loop_methods[] = {
    {"run", (PyCFunction)Loop_run, METH_O, "run(timeout) -> 0 timeout, 1 woken, 2 signal"},
    {"sweep", (PyCFunction)Loop_sweep, METH_VARARGS, "sweep(now, message_timeout)"},
    {"handover_all", (PyCFunction)Loop_handover_all, METH_NOARGS, "every connection to Python mode"},
    {"release", (PyCFunction)Loop_release, METH_NOARGS, "reset what is open, free everything"},
    {"sync", (PyCFunction)Loop_sync, METH_NOARGS, "write the native counters into the protocols"},
    {"stop_accepting", (PyCFunction)Loop_stop_accepting, METH_NOARGS, "stop accepting"},
    {"send", (PyCFunction)Loop_send, METH_VARARGS, "send(slot, data)"},
    {"set_reading", (PyCFunction)Loop_set_reading, METH_VARARGS, "set_reading(slot, paused, open)"},
    {"half_close", (PyCFunction)Loop_half_close, METH_O, "half_close(slot)"},
    {"close", (PyCFunction)Loop_close, METH_O, "close(slot)"},
    {"abort", (PyCFunction)Loop_abort, METH_O, "abort(slot)"},
    {"pending", (PyCFunction)Loop_pending, METH_O, "pending(slot) -> unsent bytes"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Loop_getset[] = {
    {"connections", (getter)Loop_get_connections, NULL, "sockets open", NULL},
    {"backend", (getter)Loop_get_backend, NULL, "epoll or io_uring", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "msgsock._engine.Loop",
    .tp_basicsize = sizeof(Loop),
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The native event loop of one msgsock.native.NativeServer (see msgsock.native).",
    .tp_methods = Loop_methods,
    .tp_getset = Loop_getset,
    .tp_new = Loop_new,
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, "msgsock._engine",
    "The native event loop of msgsock (see msgsock.native).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__engine(void) {
    if (PyType_Ready(&LoopType) < 0) return NULL;
    s_messages_received = PyUnicode_InternFromString("messages_received");
    s_bytes_received = PyUnicode_InternFromString("bytes_received");
    s_messages_sent = PyUnicode_InternFromString("messages_sent");
    s_bytes_sent = PyUnicode_InternFromString("bytes_sent");
    PyObject *m = PyModule_Create(&engine_module);
    if (m == NULL) return NULL;
    Py_INCREF(&LoopType);
    PyModule_AddObject(m, "Loop", (PyObject *)&LoopType);
    PyModule_AddIntConstant(m, "EV_HANDOVER", EV_HANDOVER);
    PyModule_AddIntConstant(m, "EV_DATA", EV_DATA);
    PyModule_AddIntConstant(m, "EV_EOF", EV_EOF);
    PyModule_AddIntConstant(m, "EV_LOST", EV_LOST);
    PyModule_AddIntConstant(m, "EV_MSG_TIMEOUT", EV_MSG_TIMEOUT);
    PyModule_AddIntConstant(m, "EV_HANDLER_ERROR", EV_HANDLER_ERROR);
    PyModule_AddIntConstant(m, "MODE_ECHO", MODE_ECHO);
    PyModule_AddIntConstant(m, "MODE_REVERSE", MODE_REVERSE);
    PyModule_AddIntConstant(m, "MODE_HANDLER", MODE_HANDLER);
    PyModule_AddStringConstant(m, "BACKENDS", "epoll io_uring");
    return m;
}
