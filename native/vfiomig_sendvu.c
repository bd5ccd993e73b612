/* vfiomig_sendvu.c - a vfio-user device read by the send job's reader thread
 * (VFM_SJ_VFIO_USER, see vfiomig_sendjob.h): the C twin of the Python client's
 * MIG_DATA_READ pipeline (vfiomig/vfio_user/client/_read_pipeline.py), for STOP_COPY.
 *
 * During the job the reader thread owns the client's UNIX socket (the Python client is
 * idle: nothing outstanding, nothing buffered).  It keeps `window` MIG_DATA_READs of
 * `size` bytes in flight (the 24-byte request the Python pipeline sends), parses each
 * reply's header and receives its data straight into the chunk it fills (no copy), and
 * checks what the Python pipeline checks: a reply (not a request of the server's) to
 * MIG_DATA_READ, to a msg_id outstanding (and, unlike the Python one, which keeps early
 * data aside, in request order: the servers answer in order), sizes that add up, no data
 * after the first 0-byte reply, which ends the stream; the replies still owed then are
 * collected before the last bytes are returned.  Its msg_ids count from VFM_VU_FIRST_ID;
 * the Python client has nothing outstanding meanwhile, and nothing is outstanding when
 * the job hands the socket back.
 *
 * Every wait polls the socket with the job's cancel eventfd and is bounded by the
 * client's reply timeout.  After an ERROR reply or a cancel, the replies owed (and the
 * rest of a reply, or of a request, in part) are collected and dropped, all within one
 * reply timeout, so the client can still SET RUNNING (a source's abort).  A failure is
 * recorded in the device's vfm_sj_vu (which, what was outstanding): the Python side
 * words it as the Python client would (vfiomig/vfio_user/client/_native_read.py).
 * Calls no other file of the job (vfiomig_sendsrc.c's reader calls this one).
 */
#define _GNU_SOURCE
#include "vfiomig_sendjob.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define VFM_VU_FIRST_ID 0x8000u /* msg_ids of the reader's requests count from here */
#define VFM_VU_SCRATCH (64u << 10) /* bytes skipped per recv */
#define VFM_VU_HEADER 16u          /* a vfio-user message header */
#define VFM_VU_SIZES 8u            /* a MIG_DATA_READ body: argsz, size */
#define VFM_VU_MIG_DATA_READ 17u
#define VFM_VU_TYPE_MASK 0xfu
#define VFM_VU_TYPE_REPLY 1u
#define VFM_VU_FLAG_ERROR 0x20u

int vfm_sj_vu_init(struct vfm_sj_dev *dev, int fd, uint32_t size, unsigned window,
                   int timeout_ms)
{
    struct vfm_sj_vu *vu = calloc(1, sizeof(*vu));

    if (!vu || !(vu->scratch = malloc(VFM_VU_SCRATCH))) {
        free(vu);
        return ENOMEM;
    }
    vu->fd = fd;
    vu->size = size;
    vu->window = window;
    vu->timeout_ms = timeout_ms;
    vu->first_id = (uint16_t)VFM_VU_FIRST_ID;
    dev->kind = VFM_SJ_VFIO_USER;
    dev->vu = vu;
    return 0;
}

void vfm_sj_vu_free(struct vfm_sj_dev *dev)
{
    if (dev->vu) {
        free(dev->vu->scratch);
        free(dev->vu);
        dev->vu = NULL;
    }
}

int vfm_sj_vu_in_step(const struct vfm_sj_dev *dev)
{
    const struct vfm_sj_vu *vu = dev->vu;

    return !vu->broken && !vu->pending && !vu->left && !vu->extra && !vu->req_off &&
           !vu->hdr_left && !vu->sizes_left;
}

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Record the first failure (what was outstanding then, the reply being received
 * counted, as the Python pipeline counts it); the errno the job reports. */
static int fail(struct vfm_sj_vu *vu, enum vfm_vu_failure what, int err, uint32_t a,
                uint32_t b, uint32_t c)
{
    if (what != VFM_VU_REPLY)
        vu->broken = 1;
    if (vu->failure == VFM_VU_OK) {
        vu->failure = what;
        vu->err = err;
        vu->failed_pending = vu->pending + (vu->left || vu->extra || vu->sizes_left);
        vu->a = a;
        vu->b = b;
        vu->c = c;
    }
    if (what >= VFM_VU_SMALL)
        return EPROTO;
    return err ? err : EIO;
}

/* Wait for events on the socket: 0, ECANCELED (not while draining: then only the
 * collection's bound ends it), ETIMEDOUT, or poll's errno. */
static int wait_for(struct vfm_sendjob *job, struct vfm_sj_vu *vu, short events, int draining)
{
    struct pollfd p[2] = {{.fd = vu->fd, .events = events},
                          {.fd = job->cancel_fd, .events = POLLIN}};
    int timeout = vu->timeout_ms;

    if (draining) {
        uint64_t now = now_ms();
        if (now >= vu->drain_by)
            return ETIMEDOUT;
        if (vu->drain_by - now < (uint64_t)timeout)
            timeout = (int)(vu->drain_by - now);
    }
    for (;;) {
        int r = poll(p, draining ? 1 : 2, timeout);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno;
        if (r == 0)
            return ETIMEDOUT;
        if (!draining && p[1].revents)
            return ECANCELED;
        return 0; /* ready, or an error the next call reports */
    }
}

/* A failed wait as the Python client says it (sending: 1 for a request). */
static int wait_failed(struct vfm_sj_vu *vu, int err, uint32_t sending)
{
    if (err == ECANCELED)
        return ECANCELED;
    if (err == ETIMEDOUT)
        return fail(vu, VFM_VU_TIMEOUT, ETIMEDOUT, sending, 0, 0);
    return fail(vu, VFM_VU_IO, err, sending, 0, 0);
}

/* Receive *n bytes into p (NULL: skipped, into the scratch), counting *n down as they
 * come (what came stays counted after a failure): 0, ECANCELED, or a failure. */
static int receive(struct vfm_sendjob *job, struct vfm_sj_vu *vu, unsigned char *p, uint64_t *n,
                   int draining)
{
    while (*n) {
        size_t want = *n;
        ssize_t r;
        if (!p && want > VFM_VU_SCRATCH)
            want = VFM_VU_SCRATCH;
        r = recv(vu->fd, p ? p : vu->scratch, want, MSG_DONTWAIT);
        if (r > 0) {
            if (p)
                p += r;
            *n -= (uint64_t)r;
            continue;
        }
        if (r == 0)
            return fail(vu, VFM_VU_CLOSED, ECONNRESET, 0, 0, 0);
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return fail(vu, VFM_VU_IO, errno, 0, 0, 0);
        int err = wait_for(job, vu, POLLIN, draining);
        if (err)
            return wait_failed(vu, err, 0);
    }
    return 0;
}

/* Send the requests the window has room for (none once the stream ended or while
 * draining; a request sent in part is always finished: the server would take the next
 * bytes as its rest).  A full socket is waited for only when nothing is in flight or a
 * request is in part; else the replies come first.  0, ECANCELED, or a failure. */
static int ask(struct vfm_sendjob *job, struct vfm_sj_vu *vu, int draining)
{
    for (;;) {
        ssize_t r;
        if (!vu->req_off) {
            uint16_t id = (uint16_t)(vu->first_id + vu->pending);
            uint16_t cmd = VFM_VU_MIG_DATA_READ;
            uint32_t words[5] = {VFM_VU_HEADER + VFM_VU_SIZES, 0, 0, VFM_VU_SIZES + vu->size,
                                 vu->size};
            if (draining || vu->ended || vu->pending >= vu->window)
                return 0;
            memcpy(vu->req, &id, 2);
            memcpy(vu->req + 2, &cmd, 2);
            memcpy(vu->req + 4, words, sizeof(words));
        }
        r = send(vu->fd, vu->req + vu->req_off, sizeof(vu->req) - vu->req_off,
                 MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r > 0) {
            vu->req_off += (size_t)r;
            if (vu->req_off == sizeof(vu->req)) {
                vu->req_off = 0;
                vu->pending++;
            }
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return fail(vu, VFM_VU_IO, errno, 1, 0, 0);
        if (!vu->req_off && vu->pending)
            return 0;
        int err = wait_for(job, vu, POLLOUT, draining);
        if (err)
            return wait_failed(vu, err, 1);
    }
}

/* Take the next reply: its header checked (received across calls: a cancel may come
 * inside it), its data left to the caller (vu->left, then vu->extra bytes to skip); while
 * draining whatever it says is skipped.  0, ECANCELED, or a failure (an ERROR reply:
 * VFM_VU_REPLY, its payload in vu->extra). */
static int take_reply(struct vfm_sendjob *job, struct vfm_sj_vu *vu, int draining)
{
    uint16_t id, cmd;
    uint32_t size, flags, error_no, sizes[2], payload;
    int err;

    if (!draining && __atomic_load_n(&job->failed, __ATOMIC_ACQUIRE))
        return ECANCELED; /* the replies keep coming: a cancel is seen here too */
    if (!vu->hdr_left)
        vu->hdr_left = sizeof(vu->hdr);
    err = receive(job, vu, vu->hdr + sizeof(vu->hdr) - vu->hdr_left, &vu->hdr_left, draining);
    if (err)
        return err;
    memcpy(&id, vu->hdr, 2);
    memcpy(&cmd, vu->hdr + 2, 2);
    memcpy(&size, vu->hdr + 4, 4);
    memcpy(&flags, vu->hdr + 8, 4);
    memcpy(&error_no, vu->hdr + 12, 4);
    if (size < VFM_VU_HEADER)
        return fail(vu, VFM_VU_SMALL, EPROTO, size, 0, 0);
    if ((flags & VFM_VU_TYPE_MASK) != VFM_VU_TYPE_REPLY || cmd != VFM_VU_MIG_DATA_READ)
        return fail(vu, VFM_VU_UNEXPECTED, EPROTO, cmd, id, flags);
    if ((uint16_t)(id - vu->first_id) >= vu->pending)
        return fail(vu, VFM_VU_STRAY, EPROTO, id, 0, 0);
    if (id != vu->first_id)
        return fail(vu, VFM_VU_ORDER, EPROTO, id, vu->first_id, 0);
    vu->first_id++;
    vu->pending--;
    payload = size - VFM_VU_HEADER;
    if (draining) {
        vu->extra = payload;
        return 0;
    }
    if (flags & VFM_VU_FLAG_ERROR) {
        vu->extra = payload;
        return fail(vu, VFM_VU_REPLY, (int)error_no, 0, 0, 0);
    }
    if (payload < VFM_VU_SIZES)
        return fail(vu, VFM_VU_SHORT, EPROTO, payload, 0, 0);
    vu->extra = payload - VFM_VU_SIZES; /* what follows the sizes, skipped if they fail */
    vu->sizes_left = VFM_VU_SIZES;
    err = receive(job, vu, (unsigned char *)sizes, &vu->sizes_left, 0);
    if (err)
        return err;
    payload -= VFM_VU_SIZES;
    if (sizes[1] > vu->size || sizes[1] > payload)
        return fail(vu, VFM_VU_TOO_MUCH, EPROTO, sizes[1], vu->size, payload);
    if (sizes[1] && vu->ended)
        return fail(vu, VFM_VU_AFTER_END, EPROTO, sizes[1], 0, 0);
    if (!sizes[1])
        vu->ended = 1;
    vu->left = sizes[1];
    vu->extra = payload - sizes[1];
    return 0;
}

/* Skip what is left of the reply being received (draining: its data too). */
static int skip_rest(struct vfm_sendjob *job, struct vfm_sj_vu *vu, int draining)
{
    int err = receive(job, vu, NULL, &vu->sizes_left, draining);

    if (!err)
        err = receive(job, vu, NULL, &vu->extra, draining);
    if (!err && draining)
        err = receive(job, vu, NULL, &vu->left, draining);
    return err;
}

/* After an ERROR reply or a cancel: collect what is owed, within one reply timeout;
 * what fails here leaves the client out of step (broken). */
static void drain(struct vfm_sendjob *job, struct vfm_sj_vu *vu)
{
    int err;

    vu->drain_by = now_ms() + (uint64_t)vu->timeout_ms;
    err = ask(job, vu, 1);
    if (!err)
        err = skip_rest(job, vu, 1);
    while (!err && vu->pending) {
        err = take_reply(job, vu, 1);
        if (!err)
            err = skip_rest(job, vu, 1);
    }
    if (err)
        vu->broken = 1;
}

ssize_t vfm_sj_vu_read(struct vfm_sendjob *job, struct vfm_sj_dev *dev, unsigned char *out,
                       size_t n)
{
    struct vfm_sj_vu *vu = dev->vu;
    size_t done = 0;
    int err = 0;

    if (vu->failure != VFM_VU_OK)
        return -EIO; /* failed before: never read again */
    while (done < n && !err) {
        if (vu->left) { /* the data of the reply being received, into the chunk */
            uint64_t want = vu->left < n - done ? vu->left : n - done, rest = want;
            err = receive(job, vu, out + done, &rest, 0);
            done += (size_t)(want - rest);
            vu->left -= want - rest;
            dev->read_bytes += want - rest;
            if (!err && !vu->left)
                err = skip_rest(job, vu, 0);
        } else if (vu->ended && !vu->pending) {
            break; /* the end, every reply owed collected */
        } else {
            err = ask(job, vu, 0);
            if (!err)
                err = take_reply(job, vu, 0);
            if (!err && !vu->left)
                err = skip_rest(job, vu, 0); /* a 0-byte reply's rest */
        }
    }
    if (!err)
        return (ssize_t)done;
    if (err == ECANCELED || vu->failure == VFM_VU_REPLY)
        drain(job, vu);
    return -err;
}

void vfm_sj_vu_settle(struct vfm_sendjob *job, struct vfm_sj_dev *dev)
{
    if (!dev->vu->broken && !vfm_sj_vu_in_step(dev))
        drain(job, dev->vu);
}
