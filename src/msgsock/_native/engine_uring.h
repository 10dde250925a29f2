/*
 * engine_uring.h - a minimal io_uring over the raw system calls (no liburing) for engine.c.
 *
 * What the native engine needs and nothing more: the submission and completion rings
 * (one mmap each, or one when IORING_FEAT_SINGLE_MMAP), SQE allocation that submits
 * when the ring is full, a wait with a timeout (IORING_ENTER_EXT_ARG), and one ring of
 * provided buffers (IORING_REGISTER_PBUF_RING) that multishot receives pick from.
 * ms_uring_open() fails (returns -1, errno set) when the kernel lacks io_uring or any of
 * these features; the engine then runs on epoll.
 */
#ifndef MSGSOCK_ENGINE_URING_H
#define MSGSOCK_ENGINE_URING_H

#include <errno.h>
#include <linux/io_uring.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#define __NR_io_uring_enter 426
#define __NR_io_uring_register 427
#endif

#define MS_URING_BGID 7

typedef struct {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, sq_entries;
    unsigned *cq_head, *cq_tail, *cq_mask, cq_entries;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    unsigned sq_local; /* SQEs filled and not yet submitted */
    void *sq_ptr, *cq_ptr;
    size_t sq_size, cq_size, sqes_size;
    /* provided buffers */
    struct io_uring_buf_ring *br;
    size_t br_size;
    unsigned br_entries, br_mask;
    uint8_t *bufs;
    size_t buf_size;
    int disabled; /* made with IORING_SETUP_R_DISABLED: ms_uring_enable() from the thread that runs it */
} ms_uring;

static inline int ms_uring_enter(ms_uring *u, unsigned submit, unsigned wait, unsigned flags, void *arg,
                                 size_t argsz) {
    return (int)syscall(__NR_io_uring_enter, u->fd, submit, wait, flags, arg, argsz);
}

static inline void ms_uring_close(ms_uring *u) {
    if (u->br) munmap(u->br, u->br_size);
    free(u->bufs);
    if (u->sqes) munmap(u->sqes, u->sqes_size);
    if (u->cq_ptr && u->cq_ptr != u->sq_ptr) munmap(u->cq_ptr, u->cq_size);
    if (u->sq_ptr) munmap(u->sq_ptr, u->sq_size);
    if (u->fd >= 0) close(u->fd);
    memset(u, 0, sizeof *u);
    u->fd = -1;
}

/* Enable a ring made disabled, from the thread that will submit to it; 0, or -1 (errno). */
static inline int ms_uring_enable(ms_uring *u) {
    if (!u->disabled) return 0;
    if (syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0) return -1;
    u->disabled = 0;
    return 0;
}

static inline void ms_uring_buf_add(ms_uring *u, unsigned bid, unsigned offset) {
    struct io_uring_buf *b = &u->br->bufs[(u->br->tail + offset) & u->br_mask];
    b->addr = (uint64_t)(uintptr_t)(u->bufs + (size_t)bid * u->buf_size);
    b->len = (uint32_t)u->buf_size;
    b->bid = (uint16_t)bid;
}

/* Give buffer `bid` back to the kernel (after its bytes were used). */
static inline void ms_uring_buf_return(ms_uring *u, unsigned bid) {
    ms_uring_buf_add(u, bid, 0);
    __atomic_store_n(&u->br->tail, (uint16_t)(u->br->tail + 1), __ATOMIC_RELEASE);
}

/* Set up a ring of `entries` SQEs and `nbufs` provided buffers of `buf_size` bytes. */
static inline int ms_uring_open(ms_uring *u, unsigned entries, unsigned nbufs, size_t buf_size) {
    memset(u, 0, sizeof *u);
    u->fd = -1;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    /* Completions run only when this thread asks (DEFER_TASKRUN, one issuer); the ring starts
     * disabled so the issuer is the thread that first runs the loop, not the one that made it.
     * Kernels without these flags get the plain ring. */
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER |
              IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED;
    p.cq_entries = entries * 8;
    int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (fd >= 0) {
        u->disabled = 1;
    } else {
        memset(&p, 0, sizeof p);
        p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN;
        p.cq_entries = entries * 8;
        fd = (int)syscall(__NR_io_uring_setup, entries, &p);
        if (fd < 0) return -1;
    }
    u->fd = fd;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_EXT_ARG) ||
        !(p.features & IORING_FEAT_NODROP)) {
        ms_uring_close(u);
        errno = ENOSYS;
        return -1;
    }
    u->sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (u->cq_size > u->sq_size) u->sq_size = u->cq_size;
    u->cq_size = u->sq_size;
    u->sq_ptr = mmap(NULL, u->sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (u->sq_ptr == MAP_FAILED) {
        u->sq_ptr = NULL;
        ms_uring_close(u);
        return -1;
    }
    u->cq_ptr = u->sq_ptr;
    u->sqes_size = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sqes = mmap(NULL, u->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (u->sqes == MAP_FAILED) {
        u->sqes = NULL;
        ms_uring_close(u);
        return -1;
    }
    char *sq = u->sq_ptr, *cq = u->cq_ptr;
    u->sq_head = (unsigned *)(sq + p.sq_off.head);
    u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)(sq + p.sq_off.array);
    u->sq_entries = p.sq_entries;
    u->cq_head = (unsigned *)(cq + p.cq_off.head);
    u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    u->cq_entries = p.cq_entries;
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    /* the provided-buffer ring: nbufs entries (a power of two) */
    u->br_entries = nbufs;
    u->br_mask = nbufs - 1;
    u->buf_size = buf_size;
    u->br_size = nbufs * sizeof(struct io_uring_buf);
    u->br = mmap(NULL, u->br_size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (u->br == MAP_FAILED) {
        u->br = NULL;
        ms_uring_close(u);
        return -1;
    }
    u->bufs = malloc((size_t)nbufs * buf_size);
    if (u->bufs == NULL) {
        ms_uring_close(u);
        errno = ENOMEM;
        return -1;
    }
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (uint64_t)(uintptr_t)u->br;
    reg.ring_entries = nbufs;
    reg.bgid = MS_URING_BGID;
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0) {
        ms_uring_close(u);
        return -1;
    }
    u->br->tail = 0;
    for (unsigned i = 0; i < nbufs; i++) ms_uring_buf_add(u, i, i);
    __atomic_store_n(&u->br->tail, (uint16_t)nbufs, __ATOMIC_RELEASE);
    return 0;
}

/* Submit what is queued without waiting; -1 on error (errno). */
static inline int ms_uring_submit(ms_uring *u) {
    while (u->sq_local && !u->disabled) {
        int r = ms_uring_enter(u, u->sq_local, 0, 0, NULL, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        u->sq_local -= (unsigned)r;
        if (r == 0) break;
    }
    return 0;
}

/* A zeroed SQE, submitting first when the ring is full; NULL when it cannot be had. */
static inline struct io_uring_sqe *ms_uring_sqe(ms_uring *u) {
    unsigned tail = *u->sq_tail;
    unsigned head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
    if (tail - head >= u->sq_entries) {
        if (ms_uring_submit(u) < 0) return NULL;
        head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
        if (tail - head >= u->sq_entries) return NULL;
    }
    unsigned idx = tail & *u->sq_mask;
    struct io_uring_sqe *sqe = &u->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    u->sq_array[idx] = idx;
    __atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
    u->sq_local++;
    return sqe;
}

/* Submit and wait for at least one completion, at most `ms` milliseconds.  0, or -1 (errno:
 * EINTR for a signal; ETIME is not an error). */
static inline int ms_uring_wait(ms_uring *u, int ms) {
    struct __kernel_timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long long)(ms % 1000) * 1000000};
    struct io_uring_getevents_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.ts = (uint64_t)(uintptr_t)&ts;
    /* GETEVENTS always: with DEFER_TASKRUN it is what runs the completions' work */
    unsigned flags = IORING_ENTER_EXT_ARG | IORING_ENTER_GETEVENTS;
    unsigned head = *u->cq_head, tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    unsigned wait = (head == tail && ms > 0) ? 1 : 0;
    int r = ms_uring_enter(u, u->sq_local, wait, flags, &arg, sizeof arg);
    if (r < 0) {
        if (errno == ETIME || errno == EBUSY) return 0;
        return -1;
    }
    u->sq_local -= (unsigned)r > u->sq_local ? u->sq_local : (unsigned)r;
    return 0;
}

#endif
