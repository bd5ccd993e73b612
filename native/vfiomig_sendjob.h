/*
 * vfiomig_sendjob - the sender's C send path: stream sources read and sent by threads,
 * no interpreter in the per-chunk loop (vfiomig/send/_threads.py drives it).
 *
 * One reader thread per device reads its source (synthetic state made here, a block
 * repeated (bench's pattern), or a descriptor: a file, a pipe) into pooled chunk buffers of whole packets, exactly as the
 * trio sender's _produce_chunks does, and queues each packet on its channel in QEMU's
 * round robin (one counter shared by every device); one thread per channel builds the
 * 288-byte headers and writes its queue with sendmsg of up to VFM_SJ_BATCH packets
 * (header and data iovecs, the data never copied).  A reader waits, after queuing a chunk,
 * until no channel it used holds more than `limit` bytes (the trio sender's backpressure),
 * then queues the config packet after its last data packet.
 *
 * Every wait is a condition variable that a failure or cancel broadcasts, or a poll()
 * that also watches cancel_fd: vfm_sendjob_cancel stops every thread promptly.  The first
 * failure (a channel's send error, a source's read error) is recorded and stops the rest;
 * done_fd (an eventfd) becomes readable when the last thread is about to exit.
 */
#ifndef VFIOMIG_SENDJOB_H
#define VFIOMIG_SENDJOB_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "vfiomig_outbox.h"

#define VFM_SYNTH_BLOCK (1u << 20) /* bytes per synthetic block (vfiomig.sources) */
#define VFM_SJ_BATCH 512           /* packets per sendmsg: 2 iovecs each, IOV_MAX */
#define VFM_SJ_BATCH_BYTES (1u << 20) /* and a packet: synthetic data made per batch */

enum vfm_sj_kind { VFM_SJ_SYNTH = 1, VFM_SJ_FD = 2, VFM_SJ_PATTERN = 3 };
enum vfm_sj_error { VFM_SJ_OK, VFM_SJ_CHANNEL, VFM_SJ_SOURCE, VFM_SJ_CANCELLED, VFM_SJ_START };

struct vfm_sj_buf {
    unsigned char *data;
    long pins; /* queued packets whose data is in it */
};

struct vfm_sj_dev {
    unsigned char prefix[VFM_HEADER_PREFIX_SIZE];
    uint32_t instance;
    int host; /* the VFIO header in host order */
    enum vfm_sj_kind kind;
    int fd, poll; /* VFM_SJ_FD: poll for input before each read (a pipe, a socket) */
    uint64_t size, offset, seed; /* VFM_SJ_SYNTH, VFM_SJ_PATTERN (size, offset) */
    uint64_t *base;              /* VFM_SJ_SYNTH: the seed's block, VFM_SYNTH_BLOCK bytes */
    unsigned char *pattern;      /* VFM_SJ_PATTERN: the block the stream repeats */
    size_t pattern_len;
    unsigned char *tiled; /* VFM_SJ_PATTERN: one chunk of it (every chunk's bytes) */
    unsigned char *map;   /* VFM_SJ_FD, a regular file: mapped whole (map_file) */
    size_t map_len;
    uint64_t map_pos;
    unsigned char *config;
    size_t config_len;
    uint64_t bytes;   /* data bytes queued */
    uint32_t packets; /* packets queued, the config packet included once queued */
    struct vfm_sj_buf *bufs;
    size_t nbufs, maxbufs;
    pthread_t thread;
    int started;
};

struct vfm_sj_entry {
    const unsigned char *data; /* NULL: synthetic, made by the channel's thread at src */
    uint64_t src;
    struct vfm_sj_buf *buf; /* NULL: the config blob */
    struct vfm_sj_dev *dev;
    uint32_t len, idx, flags;
};

struct vfm_sj_chan {
    int fd;
    struct vfm_sj_entry *ring;
    size_t cap, head, count;
    uint64_t queued_bytes, sent_bytes;
    pthread_cond_t cv; /* its thread, waiting for packets */
    pthread_t thread;
    int started;
};

struct vfm_sendjob {
    pthread_mutex_t lock;
    pthread_cond_t room; /* readers, waiting for a buffer or for a channel to drain */
    struct vfm_sj_chan *chans;
    struct vfm_sj_dev *devs;
    unsigned nchan, ndev, readers_left, threads_left;
    size_t packet_size, chunk, limit;
    uint64_t next; /* the round robin: packets queued so far, every device */
    int cancel_fd, done_fd;
    int failed;
    enum vfm_sj_error error;
    unsigned error_who; /* the channel or the device */
    int error_errno;
    uint64_t error_sent; /* a channel's bytes sent before it failed */
};

/* A job over nchan channel fds and ndev devices (their fields the caller fills before
 * vfm_sendjob_start: kind, fd/poll or size/seed/base, prefix, instance, host, config);
 * 0, or an errno (the job is then freed with vfm_sendjob_free). */
int vfm_sendjob_init(struct vfm_sendjob *job, unsigned nchan, unsigned ndev,
                     size_t packet_size, size_t chunk, size_t limit);
/* Start every thread; a thread that cannot start fails the job (VFM_SJ_START). */
void vfm_sendjob_start(struct vfm_sendjob *job);
/* Stop every thread soon (VFM_SJ_CANCELLED, unless a failure came first). */
void vfm_sendjob_cancel(struct vfm_sendjob *job);
/* Wait for every started thread (call without any lock; blocks). */
void vfm_sendjob_join(struct vfm_sendjob *job);
/* Free everything (after join; the descriptors given are the caller's). */
void vfm_sendjob_free(struct vfm_sendjob *job);

/* -- vfiomig_sendsrc.c: the sources ------------------------------------------------ */

/* Read a descriptor source until n bytes or its end: the bytes, or -errno. */
ssize_t vfm_sj_read(struct vfm_sendjob *job, struct vfm_sj_dev *dev, unsigned char *out,
                    size_t n);
/* Map a regular file source whole (dev->map stays NULL otherwise: it is read). */
void vfm_sj_map_file(struct vfm_sj_dev *dev);
/* A pattern source's one chunk: 0, or ENOMEM. */
int vfm_sj_tile_pattern(struct vfm_sendjob *job, struct vfm_sj_dev *dev);
/* The next chunk of a mapped file or of a pattern: *data and its bytes. */
ssize_t vfm_sj_next_mapped(struct vfm_sendjob *job, struct vfm_sj_dev *dev,
                           const unsigned char **data);
ssize_t vfm_sj_next_tiled(struct vfm_sendjob *job, struct vfm_sj_dev *dev,
                          const unsigned char **data);

/* Bytes [off, off + n) of the synthetic stream of seed over base (vfiomig.sources'
 * synth_block: each block the base XOR the block's key, word by word). */
void vfm_synth_fill(unsigned char *out, const uint64_t *base, uint64_t seed, uint64_t off,
                    size_t n);

#endif /* VFIOMIG_SENDJOB_H */
