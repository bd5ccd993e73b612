/* vfiomig_sendthreads.c - what the send job's threads share (see vfiomig_sendjob.h):
 * recording the first failure, the last thread's exit, the push devices' room wakeups
 * (vfiomig_sendpush.c), and a channel socket's blocking sends.  Used by the reader-fed
 * channel threads (vfiomig_sendjob.c) and the direct ones (vfiomig_senddirect.c); calls
 * none of them. */
#define _GNU_SOURCE
#include "vfiomig_sendjob.h"
#include "vfiomig_wait.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <stdint.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* A blocking send wakes this often (SO_SNDTIMEO) to see whether the job was cancelled. */
#define VFM_SJ_WAKE_US 100000

/* The first failure wins; every thread is told (lock held). */
void vfm_sj_fail(struct vfm_sendjob *job, enum vfm_sj_error what, unsigned who, int err,
                 uint64_t sent)
{
    uint64_t one = 1;

    if (job->failed)
        return;
    __atomic_store_n(&job->failed, 1, __ATOMIC_RELEASE);
    job->error = what;
    job->error_who = who;
    job->error_errno = err;
    job->error_sent = sent;
    if (write(job->cancel_fd, &one, sizeof(one)) < 0) {
        /* an eventfd write fails only at its maximum count: it stays readable */
    }
    pthread_cond_broadcast(&job->room);
    for (unsigned i = 0; i < job->nchan; i++)
        pthread_cond_broadcast(&job->chans[i].cv);
    vfm_sj_push_wake(job);
}

void vfm_sj_push_wake(struct vfm_sendjob *job)
{
    uint64_t one = 1;

    for (unsigned d = 0; d < job->ndev; d++) {
        struct vfm_sj_dev *dev = &job->devs[d];
        if (dev->kind != VFM_SJ_PUSH || dev->room_fd < 0 || !(job->failed || dev->push_waiting))
            continue;
        if (dev->push_waiting) {
            dev->push_waiting = 0;
            job->pushers_waiting--;
        }
        if (write(dev->room_fd, &one, sizeof(one)) < 0) {
            /* only at the eventfd's maximum count: it stays readable */
        }
    }
}

/* A thread is about to exit (lock held): the last one makes done_fd readable. */
void vfm_sj_thread_exit(struct vfm_sendjob *job)
{
    uint64_t one = 1;

    if (--job->threads_left == 0 && write(job->done_fd, &one, sizeof(one)) < 0) {
        /* see vfm_sj_fail() */
    }
}

/* -- channels ------------------------------------------------------------------------ */

int vfm_sj_send_again(struct vfm_sendjob *job, int fd, int blocking, int err)
{
    if (err == EINTR || (blocking && (err == EAGAIN || err == EWOULDBLOCK)))
        return 0; /* interrupted, or a blocking socket's SO_SNDTIMEO: the caller looks at
                   * the failed flag and tries again */
    if (err != EAGAIN && err != EWOULDBLOCK)
        return err;
    return vfm_wait_fd(fd, POLLOUT, job->cancel_fd);
}

/* Send the whole iovec array; *sent counts what the socket took.  0 or an errno.  A
 * blocking socket (see vfm_sj_chan_begin()) sleeps in the kernel, as cref_send's do, and wakes at
 * least every VFM_SJ_WAKE_US to look at the cancel flag; a non-blocking one polls. */
int vfm_sj_send_all(struct vfm_sendjob *job, int fd, int blocking, struct iovec *iov,
                    size_t cnt, int more, uint64_t *sent)
{
    int flags = MSG_NOSIGNAL | more | (blocking ? 0 : MSG_DONTWAIT);

    while (cnt) {
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = cnt};
        ssize_t n;

        if (__atomic_load_n(&job->failed, __ATOMIC_ACQUIRE))
            return ECANCELED;
        n = sendmsg(fd, &mh, flags);
        if (n < 0) {
            int err = vfm_sj_send_again(job, fd, blocking, errno);
            if (err)
                return err;
            continue;
        }
        *sent += (uint64_t)n;
        for (size_t left = (size_t)n; left;) {
            if (left < iov->iov_len) {
                iov->iov_base = (unsigned char *)iov->iov_base + left;
                iov->iov_len -= left;
                break;
            }
            left -= iov->iov_len;
            iov++;
            cnt--;
        }
        while (cnt && !iov->iov_len) {
            iov++;
            cnt--;
        }
    }
    return 0;
}

static int make_blocking(int fd, struct vfm_sj_sock_mode *saved)
{
    struct timeval tv = {.tv_sec = 0, .tv_usec = VFM_SJ_WAKE_US};
    socklen_t len = sizeof(saved->timeout);

    saved->flags = fcntl(fd, F_GETFL);
    if (saved->flags < 0 || getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &saved->timeout, &len) ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)))
        return 0;
    if (fcntl(fd, F_SETFL, saved->flags & ~O_NONBLOCK)) {
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &saved->timeout, sizeof(saved->timeout));
        return 0;
    }
    return 1;
}

int vfm_sj_chan_begin(struct vfm_sendjob *job, unsigned id, struct vfm_sj_sock_mode *saved)
{
    struct vfm_sj_chan *ch = &job->chans[id];
    char name[16];

    snprintf(name, sizeof(name), "vfm-send-%u", id);
    pthread_setname_np(pthread_self(), name);
    vfm_sj_pace_start(ch);
    return make_blocking(ch->fd, saved);
}

void vfm_sj_chan_end(struct vfm_sendjob *job, unsigned id, int blocking,
                     const struct vfm_sj_sock_mode *saved)
{
    int fd = job->chans[id].fd;

    if (blocking) {
        fcntl(fd, F_SETFL, saved->flags);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &saved->timeout, sizeof(saved->timeout));
    }
    vfm_sj_thread_exit(job);
}

void vfm_sj_send_failed(struct vfm_sendjob *job, unsigned id, int err, uint64_t sent)
{
    if (err == ECANCELED)
        vfm_sj_fail(job, VFM_SJ_CANCELLED, id, 0, 0);
    else
        vfm_sj_fail(job, VFM_SJ_CHANNEL, id, err, sent);
}

/* -- pacing ---------------------------------------------------------------------------- */

static double now_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void vfm_sj_pace_start(struct vfm_sj_chan *ch)
{
    ch->start = now_seconds();
}

uint64_t vfm_sj_pace_budget(const struct vfm_sj_chan *ch)
{
    double allowed;

    if (ch->rate <= 0)
        return UINT64_MAX;
    allowed = (now_seconds() - ch->start) * ch->rate - (double)ch->paced;
    return allowed <= 0 ? 0 : (uint64_t)allowed;
}

int vfm_sj_pace_wait(struct vfm_sendjob *job, const struct vfm_sj_chan *ch, uint64_t head)
{
    double wake = ch->start + (double)(ch->paced + head) / ch->rate + VFM_SJ_PACE_QUANTUM;
    struct pollfd p = {.fd = job->cancel_fd, .events = POLLIN};

    for (;;) {
        double left = wake - now_seconds();
        struct timespec ts;
        int n;

        if (__atomic_load_n(&job->failed, __ATOMIC_ACQUIRE))
            return ECANCELED;
        if (left <= 0)
            return 0;
        ts.tv_sec = (time_t)left;
        ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
        n = ppoll(&p, 1, &ts, NULL);
        if (n > 0)
            return ECANCELED;
        if (n < 0 && errno != EINTR)
            return errno;
    }
}
