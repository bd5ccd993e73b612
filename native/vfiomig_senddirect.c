/* vfiomig_senddirect.c - the C send path without a reader thread (see vfiomig_sendjob.h).
 *
 * When the job has one device whose bytes are known by their offset (synthetic state,
 * bench's pattern), nothing has to be read in order: packet k of QEMU's round robin
 * travels on channel k % nchan, so each channel's thread makes and sends its own packets,
 * k = its number, then k + nchan, ..., the config packet (k = the data packets) last,
 * exactly as cref_send's threads do.  No queue, no lock per chunk, no wakeup between
 * threads: a blocking sendmsg is the only wait (the backpressure: the socket's buffer).
 * The bytes on each channel are those the reader would have queued on it (chunks are
 * whole packets, so every data packet is full but the last).
 *
 * The channels are kept in step, as the reader keeps them (it waits while a channel
 * holds more than the limit): a channel does not begin a packet more than direct_window()
 * packets past the first one some channel has not sent.  Left to themselves on a loaded
 * machine they drifted apart, and the receiver held every packet above its first missing
 * idx: 64 KiB x 4, 2 GiB of synth:, its peak_queued_bytes 215 MB against 5.6 MB fed by a
 * reader, which is why direct mode moved fewer GB/s with less CPU below 1 MiB packets
 * (benchmarks/README.md, rounds 4 and 5).
 *
 * Synthetic bytes are made fill_bytes() at a time right before the sendmsg that sends
 * them, so that the kernel copies them while they are in this core's L2 (1 MiB here,
 * shared with the base block and the kernel's own buffers), and a thread's scratch stays
 * small whatever the packet size (a larger packet is sent in several pieces, its header
 * with the first).
 */
#define _GNU_SOURCE
#include "vfiomig_sendjob.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Synthetic bytes made per sendmsg: a packet, at least VFM_SJ_FILL_MIN (a quarter of a
 * 1 MiB L2, with the kernel's copy), at most VFM_SJ_FILL_MAX.  Quiet A/B (benchmarks/
 * README.md, round 5): a whole 1 MiB packet per sendmsg against 256 KiB pieces, 1 MiB x 1
 * 1.03-1.04x against 0.84-0.91x cref-same and 8-15 % less CPU, x 4 ~9 % less CPU; 1 MiB
 * fills at 64 KiB packets lost (0.81x against 0.89x, 14 % more CPU): smaller packets
 * keep 256 KiB. */
#define VFM_SJ_FILL_MIN (256u << 10)
#define VFM_SJ_FILL_MAX (1u << 20)

static size_t fill_bytes(const struct vfm_sendjob *job)
{
    if (job->packet_size <= VFM_SJ_FILL_MIN)
        return VFM_SJ_FILL_MIN;
    return job->packet_size < VFM_SJ_FILL_MAX ? job->packet_size : VFM_SJ_FILL_MAX;
}

int vfm_sj_direct_ok(const struct vfm_sendjob *job)
{
    const struct vfm_sj_dev *dev = &job->devs[0];

    return job->ndev == 1 && job->chunk % job->packet_size == 0 &&
           (dev->kind == VFM_SJ_SYNTH || dev->kind == VFM_SJ_PATTERN);
}

/* How far past the slowest channel's first unsent packet a channel may begin one: twice
 * the packets the channels' limits hold between them as a reader lets them hold (each at
 * most `limit` bytes queued, at least a packet).  Once the window (4 KiB x 4: a wait per
 * batch or so) cost 13 % more CPU than no window; twice it, none measurable (quiet A/B,
 * benchmarks/README.md round 5). */
static uint64_t direct_window(const struct vfm_sendjob *job)
{
    uint64_t per_channel = (job->limit + job->packet_size - 1) / job->packet_size;

    return 2 * (uint64_t)job->nchan * (per_channel ? per_channel : 1);
}

/* The first packet some channel has not sent (lock held). */
static uint64_t slowest(const struct vfm_sendjob *job)
{
    uint64_t k = UINT64_MAX;

    for (unsigned c = 0; c < job->nchan; c++)
        if (job->chans[c].direct_k < k)
            k = job->chans[c].direct_k;
    return k;
}

/* Channel id has sent every packet of its share before k (UINT64_MAX: all of it): say
 * so (waking the channels waiting, but only when it was the slowest: nobody else's wait
 * can end), then wait while k is direct_window() or more past the slowest channel's
 * first unsent packet (never the slowest itself: no deadlock).  A failure ends the wait
 * (vfm_sj_fail broadcasts room).  Lock held. */
static void keep_in_step(struct vfm_sendjob *job, unsigned id, uint64_t k)
{
    uint64_t window = direct_window(job);
    int was_slowest = job->chans[id].direct_k == slowest(job);

    job->chans[id].direct_k = k;
    if (job->room_waiters && was_slowest)
        pthread_cond_broadcast(&job->room);
    while (!job->failed && k != UINT64_MAX && k - slowest(job) >= window) {
        job->room_waiters++;
        pthread_cond_wait(&job->room, &job->lock);
        job->room_waiters--;
    }
}

/* Where a direct channel is in its share of the stream. */
struct direct_pos {
    uint64_t k;   /* the next packet (global = the device's idx: one device) */
    uint64_t off; /* bytes of packet k's data already sent (a packet cut in fills) */
};

/* A packet's data bytes (k == npackets: the config packet). */
static uint32_t packet_len(const struct vfm_sendjob *job, const struct vfm_sj_dev *dev,
                           uint64_t npackets, uint64_t k)
{
    uint64_t start = k * job->packet_size;

    if (k == npackets)
        return (uint32_t)dev->config_len;
    return (uint32_t)(dev->size - start < job->packet_size ? dev->size - start
                                                            : job->packet_size);
}

/* Fill iov with the next pieces of this channel's share: whole packets up to
 * VFM_SJ_BATCH of them or VFM_SJ_BATCH_BYTES, synthetic data at most `fill` bytes
 * (a packet may be cut there: its header goes with its first piece), and when paced only
 * the packets due (`budget` wire bytes; *charged gets those begun here).  The iovecs. */
static size_t next_batch(struct vfm_sendjob *job, struct vfm_sj_dev *dev, unsigned nchan,
                         uint64_t npackets, struct direct_pos *pos,
                         unsigned char (*hdrs)[VFM_PACKET_HEADER_SIZE], unsigned char *scratch,
                         struct iovec *iov, uint64_t budget, uint64_t *charged)
{
    size_t cnt = 0, bytes = 0, made = 0, n = 0, fill = fill_bytes(job);

    *charged = 0;
    while (pos->k <= npackets && n < VFM_SJ_BATCH && bytes < VFM_SJ_BATCH_BYTES &&
           made < fill) {
        uint64_t start = pos->k * job->packet_size;
        uint32_t len = packet_len(job, dev, npackets, pos->k);
        size_t take = len - pos->off;

        if (!pos->off) {
            if (*charged + VFM_PACKET_HEADER_SIZE + len > budget)
                break; /* paced: not due yet */
            *charged += VFM_PACKET_HEADER_SIZE + len;
            vfm_header_build(hdrs[n], dev->prefix, dev->instance, len, (uint32_t)pos->k,
                             pos->k == npackets ? VFM_FLAG_CONFIG : 0, dev->host);
            iov[cnt].iov_base = hdrs[n];
            iov[cnt++].iov_len = VFM_PACKET_HEADER_SIZE;
            bytes += VFM_PACKET_HEADER_SIZE;
        }
        if (pos->k == npackets) {
            iov[cnt].iov_base = dev->config;
        } else if (dev->kind == VFM_SJ_SYNTH) {
            if (take > fill - made)
                take = fill - made;
            vfm_synth_fill(scratch + made, dev->base, dev->seed, start + pos->off, take);
            iov[cnt].iov_base = scratch + made;
            made += take;
        } else { /* a pattern: every chunk is the same tiled bytes */
            iov[cnt].iov_base = dev->tiled + start % job->chunk + pos->off;
        }
        iov[cnt++].iov_len = take;
        bytes += take;
        if (!take)
            cnt--; /* an empty config blob: the header alone */
        pos->off += take;
        if (pos->off < len)
            break; /* the scratch is full: the rest of this packet in the next batch */
        pos->off = 0;
        pos->k += nchan;
        n++;
    }
    return cnt;
}

void *vfm_sj_direct_main(void *arg)
{
    struct vfm_sendjob *job = ((struct vfm_sj_thread_arg *)arg)->job;
    unsigned id = ((struct vfm_sj_thread_arg *)arg)->id;
    struct vfm_sj_chan *ch = &job->chans[id];
    struct vfm_sj_dev *dev = &job->devs[0];
    uint64_t npackets = (dev->size + job->packet_size - 1) / job->packet_size;
    struct direct_pos pos = {.k = id, .off = 0};
    unsigned char (*hdrs)[VFM_PACKET_HEADER_SIZE] = malloc(VFM_SJ_BATCH * sizeof(*hdrs));
    struct iovec *iov = malloc(2 * VFM_SJ_BATCH * sizeof(*iov));
    unsigned char *scratch = dev->kind == VFM_SJ_SYNTH ? malloc(fill_bytes(job)) : NULL;
    struct vfm_sj_sock_mode saved;
    int is_blocking = vfm_sj_chan_begin(job, id, &saved);

    free(arg);
    if (!hdrs || !iov || (dev->kind == VFM_SJ_SYNTH && !scratch)) {
        pthread_mutex_lock(&job->lock);
        vfm_sj_fail(job, VFM_SJ_CHANNEL, id, ENOMEM, 0);
        pthread_mutex_unlock(&job->lock);
    }
    while (pos.k <= npackets && !__atomic_load_n(&job->failed, __ATOMIC_ACQUIRE)) {
        uint64_t sent = 0, charged, budget = vfm_sj_pace_budget(ch);
        size_t cnt = next_batch(job, dev, job->nchan, npackets, &pos, hdrs, scratch, iov,
                                budget, &charged);
        int err;

        if (!cnt) { /* paced, nothing due yet */
            err = vfm_sj_pace_wait(job, ch,
                                   VFM_PACKET_HEADER_SIZE + packet_len(job, dev, npackets, pos.k));
            if (err) {
                pthread_mutex_lock(&job->lock);
                vfm_sj_send_failed(job, id, err, ch->sent_bytes);
                pthread_mutex_unlock(&job->lock);
            }
            continue;
        }
        ch->paced += charged;
        err = vfm_sj_send_all(job, ch->fd, is_blocking, iov, cnt, 0, &sent);
        pthread_mutex_lock(&job->lock);
        if (err)
            vfm_sj_send_failed(job, id, err, ch->sent_bytes + sent);
        ch->sent_bytes += sent;
        keep_in_step(job, id, pos.k);
        pthread_mutex_unlock(&job->lock);
    }
    pthread_mutex_lock(&job->lock);
    keep_in_step(job, id, UINT64_MAX); /* done: holds nobody back */
    vfm_sj_chan_end(job, id, is_blocking, &saved);
    pthread_mutex_unlock(&job->lock);
    free(hdrs);
    free(iov);
    free(scratch);
    return NULL;
}
