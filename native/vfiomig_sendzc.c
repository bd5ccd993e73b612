/* vfiomig_sendzc.c - the C send path's zero-copy sends (see vfiomig_sendjob.h).
 *
 * A regular file (file:, or fd: of one): each packet's data goes with sendfile(2) from
 * the file at its offset after its header (sent with MSG_MORE), so the bytes go from the
 * page cache into the socket without being copied by us.  Below VFM_ZC_FILE_MIN it is
 * read into buffers, up to the size it had at the start (vfm_zc_read_file; it was
 * mapped before: a truncated file then faulted, SIGBUS).  Either way a file that ends
 * before that size fails the job with VFM_SJ_SHORT (the device and where it ended),
 * never sends garbage.
 *
 * A pipe (fd:; a socket only when forced, see vfm_zc_setup): the reader splices each
 * packet's bytes, in the round robin's order, from the source into its channel's pipe (page references move, nothing is
 * copied) and queues the packet once it is whole (a source that ends mid-packet makes the
 * last packet short, as read does); the channel's thread sends the header, then splices
 * the bytes from its pipe into the socket.  A reader holds a channel's pipe (zbusy) while
 * it fills it, so a pipe holds whole packets in their queue order.  When a packet does
 * not fit in the pipe (a pipe's slots hold pages, and a source of small writes may fill
 * one slot per write), the part spliced is read back into a pooled buffer and the rest
 * read after it: that packet is sent from memory, the bytes the same.
 *
 * Either is decided once: a source that refuses splice (EINVAL: no splice_read) is read
 * as before from its first packet; a socket that refuses sendfile or splice has its
 * packets copied from then on (vfm_sj_chan.zrefused).  Every wait polls the job's cancel
 * eventfd, and a blocking socket wakes every SO_SNDTIMEO to see the failed flag, as
 * vfm_sj_send_all does.
 */
#define _GNU_SOURCE
#include "vfiomig_sendjob.h"
#include "vfiomig_wait.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* A channel's pipe: as large as an unprivileged process may make it (pipe-max-size,
 * 1 MiB by default), or larger where allowed: room for whole packets. */
#define VFM_ZC_PIPE_WANT (4u << 20)
#define VFM_ZC_PIPE_FLOOR (1u << 20)
/* A reader waiting for room in a channel's pipe looks again this often (ms). */
#define VFM_ZC_RECHECK_MS 100

static int refused(int err)
{
    return err == EINVAL || err == ENOSYS || err == EOPNOTSUPP;
}

void vfm_zc_setup(struct vfm_sendjob *job, struct vfm_sj_dev *dev)
{
    struct stat st;
    off_t pos;

    if (dev->kind != VFM_SJ_FD || fstat(dev->fd, &st))
        return;
    if (S_ISREG(st.st_mode)) {
        /* the stream is the file from the descriptor's offset to its size now */
        pos = lseek(dev->fd, 0, SEEK_CUR);
        if (pos < 0)
            return;
        dev->zc_end = (uint64_t)(st.st_size > pos ? st.st_size : pos);
        dev->zc_pos = (uint64_t)pos;
        if (job->zerocopy == VFM_ZC_NEVER ||
            (job->zerocopy == VFM_ZC_AUTO && job->packet_size < VFM_ZC_FILE_MIN))
            dev->zc_sized = 1; /* read into buffers: cheaper for small packets */
        else
            dev->zc_file = 1;
        return;
    }
    if (job->zerocopy == VFM_ZC_NEVER ||
        (job->zerocopy == VFM_ZC_AUTO && (job->packet_size < VFM_ZC_PIPE_MIN ||
                                          !S_ISFIFO(st.st_mode))))
        return;
    /* A socket source is read, unless zero-copy is forced (VFM_ZC_ALWAYS): spliced from a
     * socket, 1 MiB packets took ~50 ms each (64 MiB from a socket pair in 3.1 s, read
     * 0.04 s; benchmarks/README.md, round 4): a socket's pages come in small pieces that
     * fill a channel pipe's slots, and the reader waits out VFM_ZC_RECHECK_MS for room.
     * SPLICE_F_NONBLOCK makes a pipe's side non-blocking, not a TCP socket's (its file's
     * O_NONBLOCK does): anything but a pipe is polled before each splice, as before
     * each read */
    dev->zc_splice = S_ISFIFO(st.st_mode) ? 1 : 2;
}

ssize_t vfm_zc_next_file(struct vfm_sendjob *job, struct vfm_sj_dev *dev, uint64_t *src)
{
    uint64_t left = dev->zc_end - dev->zc_pos;
    size_t n = left < job->chunk ? (size_t)left : job->chunk;

    *src = dev->zc_pos;
    dev->zc_pos += n;
    if (dev->zc_pos == dev->zc_end) /* the offset left at the end, as reading it would */
        lseek(dev->fd, (off_t)dev->zc_end, SEEK_SET);
    return (ssize_t)n;
}

ssize_t vfm_zc_read_file(struct vfm_sendjob *job, struct vfm_sj_dev *dev, unsigned char *out,
                         uint64_t *ended)
{
    uint64_t left = dev->zc_end - dev->zc_pos;
    size_t want = left < job->chunk ? (size_t)left : job->chunk;
    ssize_t n = want ? vfm_sj_read(job, dev, out, want) : 0;

    if (n < 0)
        return n;
    dev->zc_pos += (uint64_t)n;
    if ((size_t)n < want) { /* the file shrank meanwhile: not the stream announced */
        *ended = dev->zc_pos;
        return VFM_ZC_SHORT;
    }
    return n;
}

int vfm_zc_pipes(struct vfm_sendjob *job)
{
    for (unsigned c = 0; c < job->nchan; c++) {
        struct vfm_sj_chan *ch = &job->chans[c];
        if (ch->zpipe[0] >= 0)
            continue;
        if (pipe2(ch->zpipe, O_CLOEXEC | O_NONBLOCK)) {
            ch->zpipe[0] = ch->zpipe[1] = -1;
            return errno;
        }
        if (fcntl(ch->zpipe[1], F_SETPIPE_SZ, VFM_ZC_PIPE_WANT) < 0)
            fcntl(ch->zpipe[1], F_SETPIPE_SZ, VFM_ZC_PIPE_FLOOR); /* or the default: works */
    }
    job->zpipes = 1;
    return 0;
}

ssize_t vfm_zc_fill(struct vfm_sendjob *job, struct vfm_sj_dev *dev, struct vfm_sj_chan *ch,
                    size_t want, size_t *done)
{
    while (*done < want) {
        ssize_t r;
        if (__atomic_load_n(&job->failed, __ATOMIC_ACQUIRE))
            return -ECANCELED;
        if (dev->zc_splice == 2) {
            int err = vfm_wait_fd(dev->fd, POLLIN, job->cancel_fd);
            if (err)
                return -err;
        }
        r = splice(dev->fd, NULL, ch->zpipe[1], NULL, want - *done,
                   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (r > 0) {
            *done += (size_t)r;
            continue;
        }
        if (r == 0)
            break; /* the source's end */
        int err = errno;
        if (err == EINTR)
            continue;
        if (refused(err) && !*done)
            return VFM_ZC_REFUSED;
        if (err != EAGAIN)
            return -err;
        /* the source has nothing yet, or the pipe is full */
        struct pollfd p[2] = {{.fd = ch->zpipe[1], .events = POLLOUT},
                              {.fd = job->cancel_fd, .events = POLLIN}};
        if (poll(p, 1, 0) < 0 && errno != EINTR)
            return -errno;
        if (!(p[0].revents & POLLOUT)) { /* full: of earlier packets, or of ours alone */
            if (!__atomic_load_n(&ch->zqueued, __ATOMIC_ACQUIRE))
                return VFM_ZC_NOFIT;
            /* the channel's thread splices the earlier packets out: room comes */
            if (poll(p, 2, VFM_ZC_RECHECK_MS) < 0 && errno != EINTR)
                return -errno;
            if (p[1].revents)
                return -ECANCELED;
            continue;
        }
        err = vfm_wait_fd(dev->fd, POLLIN, job->cancel_fd);
        if (err)
            return -err;
    }
    return (ssize_t)*done;
}

/* The done bytes of a packet that could not be spliced whole, read back from the
 * channel's pipe (the caller holds it, and no spliced packet of it is queued: they are
 * its bytes alone), and the rest of the packet read from the source after them (lock not
 * held).  The packet's bytes (short at the source's end), or -errno. */
ssize_t vfm_zc_readback(struct vfm_sendjob *job, struct vfm_sj_dev *dev,
                        struct vfm_sj_chan *ch, unsigned char *out, size_t want, size_t done)
{
    size_t got = 0;
    ssize_t n;

    while (got < done) { /* in the pipe already: no wait */
        ssize_t r = read(ch->zpipe[0], out + got, done - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : -EIO;
        got += (size_t)r;
    }
    n = vfm_sj_read(job, dev, out + done, want - done);
    return n < 0 ? n : (ssize_t)done + n;
}

/* An entry's data copied through scratch: read back from the channel's pipe, or pread
 * from the file (lock not held).  0, an errno, or VFM_ZC_SHORT (*ended: where). */
static int send_copy(struct vfm_sendjob *job, struct vfm_sj_chan *ch, int blocking,
                     const struct vfm_sj_entry *e, unsigned char *scratch, uint64_t *sent,
                     uint64_t *ended)
{
    struct iovec iov = {.iov_base = scratch, .iov_len = e->len};
    size_t got = 0;

    while (got < e->len) {
        ssize_t r = e->how == VFM_SJ_SPLICE
                        ? read(ch->zpipe[0], scratch + got, e->len - got)
                        : pread(e->dev->fd, scratch + got, e->len - got,
                                (off_t)(e->src + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno;
        if (r == 0) {
            if (e->how == VFM_SJ_SPLICE)
                return EIO; /* cannot be: the packet was whole in the pipe */
            *ended = e->src + got;
            return VFM_ZC_SHORT;
        }
        got += (size_t)r;
    }
    return vfm_sj_send_all(job, ch->fd, blocking, &iov, 1, 0, sent);
}

int vfm_zc_send(struct vfm_sendjob *job, struct vfm_sj_chan *ch, int blocking,
                const struct vfm_sj_entry *e, unsigned char *scratch, uint64_t *sent,
                uint64_t *ended)
{
    off_t off = (off_t)e->src;
    size_t left = e->len;
    int err = 0;

    if (ch->zrefused)
        err = send_copy(job, ch, blocking, e, scratch, sent, ended);
    while (!ch->zrefused && left) {
        ssize_t r;
        if (__atomic_load_n(&job->failed, __ATOMIC_ACQUIRE)) {
            err = ECANCELED;
            break;
        }
        if (e->how == VFM_SJ_SENDFILE) {
            r = sendfile(ch->fd, e->dev->fd, &off, left);
        } else {
            /* never SPLICE_F_MORE: a send that waits for room having queued nothing
             * does not push what MSG_MORE held back, and would sleep its whole
             * SO_SNDTIMEO with the socket idle (measured: 4 KiB packets crawled) */
            unsigned flags = SPLICE_F_MOVE | (blocking ? 0 : SPLICE_F_NONBLOCK);
            r = splice(ch->zpipe[0], NULL, ch->fd, NULL, left, flags);
        }
        if (r > 0) {
            left -= (size_t)r;
            *sent += (uint64_t)r;
            __atomic_add_fetch(&job->zc_bytes, (uint64_t)r, __ATOMIC_RELAXED);
            continue;
        }
        if (r == 0) {
            if (e->how == VFM_SJ_SPLICE) {
                err = EIO; /* cannot be: the packet was whole in the pipe */
                break;
            }
            *ended = (uint64_t)off; /* the file ended before its size at the start */
            err = VFM_ZC_SHORT;
            break;
        }
        err = errno;
        if (refused(err) && left == e->len) { /* decided once: copied from now on */
            ch->zrefused = 1;
            err = send_copy(job, ch, blocking, e, scratch, sent, ended);
            break;
        }
        err = vfm_sj_send_again(job, ch->fd, blocking, err);
        if (err)
            break;
    }
    if (e->how == VFM_SJ_SPLICE)
        __atomic_sub_fetch(&ch->zqueued, 1, __ATOMIC_RELEASE);
    return err;
}

void vfm_zc_free(struct vfm_sendjob *job)
{
    for (unsigned c = 0; c < job->nchan; c++)
        for (int i = 0; i < 2; i++)
            if (job->chans[c].zpipe[i] >= 0) {
                close(job->chans[c].zpipe[i]);
                job->chans[c].zpipe[i] = -1;
            }
}
