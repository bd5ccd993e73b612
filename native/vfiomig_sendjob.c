/* vfiomig_sendjob.c - the sender's C send path: reader and channel threads and the job
 * (see vfiomig_sendjob.h); the sources' reads are in vfiomig_sendsrc.c (a vfio-user
 * device's replies in vfiomig_sendvu.c), what the threads
 * share in vfiomig_sendthreads.c, the channels that need no reader in
 * vfiomig_senddirect.c. */
#define _GNU_SOURCE
#include "vfiomig_sendjob.h"
#include "vfiomig_wait.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

/* -- channels fed by a reader ---------------------------------------------------------- */

static void *chan_main(void *arg)
{
    struct vfm_sendjob *job = ((struct vfm_sj_thread_arg *)arg)->job;
    unsigned id = ((struct vfm_sj_thread_arg *)arg)->id;
    struct vfm_sj_chan *ch = &job->chans[id];
    struct vfm_sj_entry batch[VFM_SJ_BATCH];
    unsigned char (*hdrs)[VFM_PACKET_HEADER_SIZE] = malloc(VFM_SJ_BATCH * sizeof(*hdrs));
    struct iovec iov[2 * VFM_SJ_BATCH];
    /* synthetic data is made here, right before it is sent: still in this core's cache */
    unsigned char *scratch = malloc(VFM_SJ_BATCH_BYTES + job->packet_size);
    struct vfm_sj_sock_mode saved;
    int is_blocking = vfm_sj_chan_begin(job, id, &saved);

    free(arg);
    pthread_mutex_lock(&job->lock);
    if (!hdrs || !scratch)
        vfm_sj_fail(job, VFM_SJ_CHANNEL, id, ENOMEM, ch->sent_bytes);
    for (;;) {
        size_t n = 0, cnt = 0, bytes = 0, made = 0;
        uint64_t sent = 0, budget, ended = 0;
        unsigned ended_dev = 0;
        int err;

        while (!job->failed && !ch->count && job->readers_left)
            pthread_cond_wait(&ch->cv, &job->lock);
        if (job->failed || !ch->count)
            break;
        budget = vfm_sj_pace_budget(ch); /* paced: only the packets due now */
        for (size_t k = ch->head; n < ch->count && n < VFM_SJ_BATCH && bytes < VFM_SJ_BATCH_BYTES;
             n++) {
            size_t size = VFM_PACKET_HEADER_SIZE + ch->ring[k].len;
            if (bytes + size > budget)
                break;
            batch[n] = ch->ring[k];
            bytes += size;
            k = k + 1 == ch->cap ? 0 : k + 1;
        }
        if (!n) { /* nothing due yet */
            uint64_t head = VFM_PACKET_HEADER_SIZE + ch->ring[ch->head].len;
            pthread_mutex_unlock(&job->lock);
            err = vfm_sj_pace_wait(job, ch, head);
            pthread_mutex_lock(&job->lock);
            if (err)
                vfm_sj_send_failed(job, id, err, ch->sent_bytes);
            continue;
        }
        ch->paced += bytes;
        pthread_mutex_unlock(&job->lock);
        err = 0;
        for (size_t i = 0; i < n && !err; i++) {
            struct vfm_sj_entry *e = &batch[i];
            vfm_header_build(hdrs[i], e->dev->prefix, e->dev->instance, e->len, e->idx,
                             e->flags, e->dev->host);
            iov[cnt].iov_base = hdrs[i];
            iov[cnt++].iov_len = VFM_PACKET_HEADER_SIZE;
            if (e->len && e->how != VFM_SJ_MEM) {
                /* the header and what precedes it, then the data from the file or the
                 * channel's pipe (vfiomig_sendzc.c) */
                err = vfm_sj_send_all(job, ch->fd, is_blocking, iov, cnt, MSG_MORE, &sent);
                if (!err)
                    err = vfm_zc_send(job, ch, is_blocking, e, scratch, &sent, &ended);
                if (err == VFM_ZC_SHORT)
                    ended_dev = (unsigned)(e->dev - job->devs);
                cnt = made = 0;
            } else if (e->len) {
                const unsigned char *data = e->data;
                if (!data) {
                    vfm_synth_fill(scratch + made, e->dev->base, e->dev->seed, e->src, e->len);
                    data = scratch + made;
                    made += e->len;
                }
                iov[cnt].iov_base = (void *)data;
                iov[cnt++].iov_len = e->len;
            }
        }
        if (!err && cnt)
            err = vfm_sj_send_all(job, ch->fd, is_blocking, iov, cnt, 0, &sent);
        pthread_mutex_lock(&job->lock);
        if (err) {
            if (err == VFM_ZC_SHORT) /* the file ended early: the device's failure */
                vfm_sj_fail(job, VFM_SJ_SHORT, ended_dev, 0, ended);
            else
                vfm_sj_send_failed(job, id, err, ch->sent_bytes + sent);
            ch->sent_bytes += sent;
            break;
        }
        for (size_t i = 0; i < n; i++) {
            if (batch[i].buf)
                batch[i].buf->pins--;
            ch->queued_bytes -= VFM_PACKET_HEADER_SIZE + batch[i].len;
        }
        ch->head = (ch->head + n) % ch->cap;
        ch->count -= n;
        ch->sent_bytes += sent;
        if (job->room_waiters) /* no wakeup of a reader that is busy reading */
            pthread_cond_broadcast(&job->room);
        if (job->pushers_waiting)
            vfm_sj_push_wake(job);
    }
    vfm_sj_chan_end(job, id, is_blocking, &saved);
    pthread_mutex_unlock(&job->lock);
    free(hdrs);
    free(scratch);
    return NULL;
}

/* Queue a packet on channel c, its place in the round robin taken (lock held): 0, or -1
 * when memory ran out. */
static int queue_on(struct vfm_sendjob *job, unsigned c, struct vfm_sj_dev *dev,
                    struct vfm_sj_buf *buf, const unsigned char *data, uint64_t src,
                    uint32_t len, uint32_t idx, uint32_t flags, enum vfm_sj_how how)
{
    struct vfm_sj_chan *ch = &job->chans[c];

    if (ch->count == ch->cap) {
        size_t cap = ch->cap ? 2 * ch->cap : 64;
        struct vfm_sj_entry *ring = malloc(cap * sizeof(*ring));
        if (!ring)
            return -1;
        for (size_t i = 0; i < ch->count; i++)
            ring[i] = ch->ring[(ch->head + i) % ch->cap];
        free(ch->ring);
        ch->ring = ring;
        ch->cap = cap;
        ch->head = 0;
    }
    ch->ring[(ch->head + ch->count) % ch->cap] = (struct vfm_sj_entry){
        .data = data, .src = src, .buf = buf, .dev = dev, .len = len, .idx = idx,
        .flags = flags, .how = how};
    ch->count++;
    ch->queued_bytes += VFM_PACKET_HEADER_SIZE + len;
    if (buf)
        buf->pins++;
    return 0;
}

/* Queue a packet on the next channel of the round robin (lock held); its channel, or -1
 * when memory ran out. */
static int queue_packet(struct vfm_sendjob *job, struct vfm_sj_dev *dev,
                        struct vfm_sj_buf *buf, const unsigned char *data, uint64_t src,
                        uint32_t len, uint32_t idx, uint32_t flags, enum vfm_sj_how how)
{
    unsigned c = (unsigned)(job->next % job->nchan);

    if (queue_on(job, c, dev, buf, data, src, len, idx, flags, how) < 0)
        return -1;
    job->next++; /* its thread is woken once the reader has queued the whole chunk */
    return (int)c;
}

/* see vfiomig_sendjob.h */
int vfm_sj_queue_config(struct vfm_sendjob *job, struct vfm_sj_dev *dev, uint32_t idx)
{
    int c = queue_packet(job, dev, NULL, dev->config, 0, (uint32_t)dev->config_len, idx,
                         VFM_FLAG_CONFIG, VFM_SJ_MEM);

    if (c < 0)
        return ENOMEM;
    dev->packets = idx + 1;
    pthread_cond_signal(&job->chans[c].cv);
    return 0;
}

int vfm_sj_queue_chunk(struct vfm_sendjob *job, struct vfm_sj_dev *dev, struct vfm_sj_buf *buf,
                       const unsigned char *data, uint64_t src, size_t n, uint32_t *idx,
                       enum vfm_sj_how how, unsigned char *used)
{
    for (size_t off = 0; off < n; off += job->packet_size) {
        size_t len = n - off < job->packet_size ? n - off : job->packet_size;
        int c = queue_packet(job, dev, buf, data ? data + off : NULL, src + off, (uint32_t)len,
                             *idx, 0, how);
        if (c < 0)
            return ENOMEM;
        (*idx)++;
        used[c] = 1;
        dev->bytes += len;
    }
    return 0;
}

void vfm_sj_wake_used(struct vfm_sendjob *job, const unsigned char *used)
{
    for (unsigned c = 0; c < job->nchan; c++)
        if (used[c]) /* one wakeup per channel and chunk, not per packet */
            pthread_cond_signal(&job->chans[c].cv);
}

int vfm_sj_room(const struct vfm_sendjob *job, const unsigned char *used)
{
    for (unsigned c = 0; c < job->nchan; c++)
        if (used[c] && job->chans[c].queued_bytes > job->limit)
            return 0;
    return 1;
}

/* -- readers ------------------------------------------------------------------------- */

/* Wait for a channel to take packets (lock held); the channels broadcast only while a
 * reader waits. */
static void room_wait(struct vfm_sendjob *job)
{
    job->room_waiters++;
    pthread_cond_wait(&job->room, &job->lock);
    job->room_waiters--;
}

/* A free buffer of the device's pool, or NULL once the job failed (lock held; waits). */
static struct vfm_sj_buf *get_buffer(struct vfm_sendjob *job, struct vfm_sj_dev *dev,
                                     unsigned id)
{
    for (;;) {
        if (job->failed)
            return NULL;
        for (size_t i = 0; i < dev->nbufs; i++)
            if (!dev->bufs[i].pins)
                return &dev->bufs[i];
        if (dev->nbufs < dev->maxbufs) {
            struct vfm_sj_buf *b = &dev->bufs[dev->nbufs];
            if (posix_memalign((void **)&b->data, 4096, job->chunk)) {
                vfm_sj_fail(job, VFM_SJ_SOURCE, id, ENOMEM, 0);
                return NULL;
            }
            b->pins = 0;
            dev->nbufs++;
            return b;
        }
        room_wait(job);
    }
}

/* Splice the next chunk of a splice device (vfiomig_sendzc.c) into its packets'
 * channels' pipes and queue each packet once whole (lock held, released while
 * splicing); used[c] set for each channel used, *eof once the source ended.  The bytes,
 * or -errno; 0 and dev->zc_splice cleared: read it from now on. */
static ssize_t splice_chunk(struct vfm_sendjob *job, struct vfm_sj_dev *dev, unsigned id,
                            uint32_t *idx, unsigned char *used, int *eof)
{
    size_t total = 0;

    if (!job->zpipes && vfm_zc_pipes(job)) {
        dev->zc_splice = 0;
        return 0;
    }
    while (total < job->chunk && !*eof && dev->zc_splice) {
        size_t want = job->chunk - total < job->packet_size ? job->chunk - total
                                                            : job->packet_size;
        uint64_t place = job->next++; /* its place in the round robin */
        unsigned c = (unsigned)(place % job->nchan);
        struct vfm_sj_chan *ch = &job->chans[c];
        struct vfm_sj_buf *buf = NULL;
        size_t done = 0;
        ssize_t n;

        while (ch->zbusy && !job->failed) /* another device's packet going in */
            room_wait(job);
        if (job->failed)
            return -ECANCELED;
        ch->zbusy = 1;
        pthread_mutex_unlock(&job->lock);
        n = vfm_zc_fill(job, dev, ch, want, &done);
        pthread_mutex_lock(&job->lock);
        if (n == VFM_ZC_REFUSED)
            dev->zc_splice = 0; /* this packet and the rest: read */
        if (n == VFM_ZC_NOFIT || n == VFM_ZC_REFUSED) { /* this one from memory */
            buf = get_buffer(job, dev, id);
            if (!buf) {
                n = -ECANCELED;
            } else {
                buf->pins++; /* ours while we fill it */
                pthread_mutex_unlock(&job->lock);
                n = vfm_zc_readback(job, dev, ch, buf->data, want, done);
                pthread_mutex_lock(&job->lock);
                buf->pins--;
            }
        }
        ch->zbusy = 0;
        pthread_cond_broadcast(&job->room);
        if (n < 0)
            return n;
        *eof = (size_t)n < want;
        if (!n) { /* the end, after whole packets: its place in the round robin unused */
            if (job->next == place + 1)
                job->next--; /* (no other device took one meanwhile) */
            break;
        }
        if (queue_on(job, c, dev, buf, buf ? buf->data : NULL, 0, (uint32_t)n, (*idx)++, 0,
                     buf ? VFM_SJ_MEM : VFM_SJ_SPLICE) < 0)
            return -ENOMEM;
        if (!buf)
            __atomic_add_fetch(&ch->zqueued, 1, __ATOMIC_RELEASE);
        pthread_cond_signal(&ch->cv); /* at once: its pipe must drain for the next ones */
        used[c] = 1;
        total += (size_t)n;
    }
    return (ssize_t)total;
}

static void *reader_main(void *arg)
{
    struct vfm_sendjob *job = ((struct vfm_sj_thread_arg *)arg)->job;
    unsigned id = ((struct vfm_sj_thread_arg *)arg)->id;
    struct vfm_sj_dev *dev = &job->devs[id];
    uint32_t idx = 0;
    unsigned char used[256];
    char name[16];

    free(arg);
    snprintf(name, sizeof(name), "vfm-read-%u", id);
    pthread_setname_np(pthread_self(), name);
    vfm_zc_setup(job, dev); /* sendfile or splice (vfiomig_sendzc.c), or read */
    int err = vfm_sj_tile_pattern(job, dev);
    pthread_mutex_lock(&job->lock);
    if (err)
        vfm_sj_fail(job, VFM_SJ_SOURCE, id, err, 0);
    while (!job->failed) {
        struct vfm_sj_buf *buf = NULL;
        const unsigned char *data = NULL;
        uint64_t src = 0;
        ssize_t n;
        int more, eof = 0, queued = 0;
        enum vfm_sj_how how = VFM_SJ_MEM;

        memset(used, 0, sizeof(used));
        if (dev->zc_splice) { /* spliced into the channels' pipes, and queued */
            n = splice_chunk(job, dev, id, &idx, used, &eof);
            queued = 1;
            if (n == 0 && !eof && !dev->zc_splice)
                continue; /* refused before a byte: read from now on */
        } else if (dev->kind == VFM_SJ_SYNTH) { /* the channels' threads make it */
            uint64_t left = dev->size - dev->offset;
            n = (ssize_t)(left < job->chunk ? left : job->chunk);
            src = dev->offset;
            dev->offset += (uint64_t)n;
        } else if (dev->zc_file) { /* the channels' threads sendfile it */
            n = vfm_zc_next_file(job, dev, &src);
            how = VFM_SJ_SENDFILE;
        } else if (dev->tiled) {
            n = vfm_sj_next_tiled(job, dev, &data);
        } else {
            buf = get_buffer(job, dev, id);
            if (!buf)
                break;
            buf->pins++; /* ours while we read into it */
            pthread_mutex_unlock(&job->lock);
            if (dev->zc_sized)
                n = vfm_zc_read_file(job, dev, buf->data, &src);
            else if (dev->kind == VFM_SJ_VFIO_USER) /* replies received into the chunk */
                n = vfm_sj_vu_read(job, dev, buf->data, job->chunk);
            else
                n = vfm_sj_read(job, dev, buf->data, job->chunk);
            pthread_mutex_lock(&job->lock);
            buf->pins--;
            data = buf->data;
        }
        if (n == VFM_ZC_SHORT) { /* the file shrank: src is where it ended */
            vfm_sj_fail(job, VFM_SJ_SHORT, id, 0, src);
            break;
        }
        if (n < 0) {
            if (n == -ECANCELED)
                vfm_sj_fail(job, VFM_SJ_CANCELLED, id, 0, 0);
            else
                vfm_sj_fail(job, VFM_SJ_SOURCE, id, (int)-n, dev->read_bytes); /* where */
            break;
        }
        if (job->failed)
            break;
        if (queued)
            dev->bytes += (uint64_t)n; /* splice_chunk queued them */
        else if (vfm_sj_queue_chunk(job, dev, buf, data, src, (size_t)n, &idx, how, used))
            vfm_sj_fail(job, VFM_SJ_SOURCE, id, ENOMEM, 0);
        vfm_sj_wake_used(job, used);
        more = queued ? !eof : (size_t)n == job->chunk;
        while (!job->failed && !vfm_sj_room(job, used))
            room_wait(job);
        if (job->failed || !more)
            break;
    }
    if (!job->failed && vfm_sj_queue_config(job, dev, idx))
        vfm_sj_fail(job, VFM_SJ_SOURCE, id, ENOMEM, 0);
    if (dev->kind == VFM_SJ_VFIO_USER && job->failed) {
        /* its client's socket is handed back in step: the replies still owed collected */
        pthread_mutex_unlock(&job->lock);
        vfm_sj_vu_settle(job, dev);
        pthread_mutex_lock(&job->lock);
    }
    vfm_sj_reader_done(job);
    vfm_sj_thread_exit(job);
    pthread_mutex_unlock(&job->lock);
    return NULL;
}

void vfm_sj_reader_done(struct vfm_sendjob *job)
{
    if (--job->readers_left == 0)
        for (unsigned c = 0; c < job->nchan; c++)
            pthread_cond_broadcast(&job->chans[c].cv);
}

/* -- the job ------------------------------------------------------------------------- */

int vfm_sendjob_init(struct vfm_sendjob *job, unsigned nchan, unsigned ndev,
                     size_t packet_size, size_t chunk, size_t limit)
{
    memset(job, 0, sizeof(*job));
    job->cancel_fd = job->done_fd = -1;
    if (!nchan || nchan > 255 || !ndev || !packet_size || chunk < packet_size ||
        packet_size > UINT32_MAX - 12)
        return EINVAL;
    if (pthread_mutex_init(&job->lock, NULL))
        return ENOMEM;
    pthread_cond_init(&job->room, NULL);
    job->nchan = nchan;
    job->ndev = ndev;
    job->packet_size = packet_size;
    job->chunk = chunk;
    job->limit = limit;
    job->chans = calloc(nchan, sizeof(*job->chans));
    if (!job->chans)
        return ENOMEM;
    for (unsigned c = 0; c < nchan; c++) {
        pthread_cond_init(&job->chans[c].cv, NULL);
        job->chans[c].zpipe[0] = job->chans[c].zpipe[1] = -1;
    }
    job->zerocopy = VFM_ZC_AUTO;
    job->devs = calloc(ndev, sizeof(*job->devs));
    if (!job->devs)
        return ENOMEM;
    for (unsigned d = 0; d < ndev; d++) {
        job->devs[d].fd = job->devs[d].room_fd = -1;
        /* enough to fill every channel to its limit, plus the one being read */
        job->devs[d].maxbufs = nchan * (limit / chunk + 2) + 2;
        job->devs[d].bufs = calloc(job->devs[d].maxbufs, sizeof(struct vfm_sj_buf));
        if (!job->devs[d].bufs)
            return ENOMEM;
    }
    job->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    job->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (job->cancel_fd < 0 || job->done_fd < 0)
        return errno;
    return 0;
}

static int start_thread(struct vfm_sendjob *job, pthread_t *t, void *(*fn)(void *),
                        unsigned id)
{
    struct vfm_sj_thread_arg *arg = malloc(sizeof(*arg));

    if (!arg)
        return ENOMEM;
    arg->job = job;
    arg->id = id;
    int err = pthread_create(t, NULL, fn, arg);
    if (err)
        free(arg);
    return err;
}

void vfm_sendjob_start(struct vfm_sendjob *job)
{
    void *(*sender)(void *) = job->direct ? vfm_sj_direct_main : chan_main;
    unsigned readers = job->direct ? 0 : job->ndev;

    pthread_mutex_lock(&job->lock);
    job->threads_left = job->nchan;
    job->readers_left = readers; /* a push device's reader is its caller */
    for (unsigned d = 0; d < readers; d++)
        job->threads_left += job->devs[d].kind != VFM_SJ_PUSH;
    if (job->direct) { /* every packet is as good as queued: the counts are known now */
        struct vfm_sj_dev *dev = &job->devs[0];
        int err = vfm_sj_tile_pattern(job, dev);
        if (err)
            vfm_sj_fail(job, VFM_SJ_SOURCE, 0, err, 0);
        dev->bytes = dev->size;
        dev->packets = (uint32_t)((dev->size + job->packet_size - 1) / job->packet_size + 1);
    }
    for (unsigned c = 0; c < job->nchan; c++) {
        int err = job->failed ? ECANCELED : start_thread(job, &job->chans[c].thread, sender, c);
        if (err) {
            vfm_sj_fail(job, VFM_SJ_START, c, err, 0);
            vfm_sj_thread_exit(job);
        } else {
            job->chans[c].started = 1;
        }
    }
    for (unsigned d = 0; d < readers; d++) {
        if (job->devs[d].kind == VFM_SJ_PUSH)
            continue;
        int err = job->failed ? ECANCELED : start_thread(job, &job->devs[d].thread, reader_main, d);
        if (err) {
            vfm_sj_fail(job, VFM_SJ_START, d, err, 0);
            job->readers_left--;
            vfm_sj_thread_exit(job);
        } else {
            job->devs[d].started = 1;
        }
    }
    pthread_mutex_unlock(&job->lock);
}

void vfm_sendjob_cancel(struct vfm_sendjob *job)
{
    pthread_mutex_lock(&job->lock);
    vfm_sj_fail(job, VFM_SJ_CANCELLED, 0, 0, 0);
    pthread_mutex_unlock(&job->lock);
}

void vfm_sendjob_join(struct vfm_sendjob *job)
{
    for (unsigned c = 0; c < job->nchan; c++)
        if (job->chans[c].started) {
            pthread_join(job->chans[c].thread, NULL);
            job->chans[c].started = 0;
        }
    for (unsigned d = 0; d < job->ndev; d++)
        if (job->devs[d].started) {
            pthread_join(job->devs[d].thread, NULL);
            job->devs[d].started = 0;
        }
    vfm_zc_free(job); /* no thread uses the channels' pipes now: not kept open with it */
}

void vfm_sendjob_free(struct vfm_sendjob *job)
{
    if (job->chans) {
        vfm_zc_free(job);
        for (unsigned c = 0; c < job->nchan; c++) {
            free(job->chans[c].ring);
            pthread_cond_destroy(&job->chans[c].cv);
        }
        free(job->chans);
    }
    if (job->devs) {
        for (unsigned d = 0; d < job->ndev; d++) {
            struct vfm_sj_dev *dev = &job->devs[d];
            for (size_t i = 0; i < dev->nbufs; i++)
                free(dev->bufs[i].data);
            free(dev->bufs);
            free(dev->base);
            free(dev->config);
            free(dev->pattern);
            free(dev->tiled);
            vfm_sj_vu_free(dev);
            if (dev->room_fd >= 0)
                close(dev->room_fd);
        }
        free(job->devs);
    }
    if (job->cancel_fd >= 0)
        close(job->cancel_fd);
    if (job->done_fd >= 0)
        close(job->done_fd);
    if (job->nchan) {
        pthread_cond_destroy(&job->room);
        pthread_mutex_destroy(&job->lock);
    }
    memset(job, 0, sizeof(*job));
}
