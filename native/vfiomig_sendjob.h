/*
 * vfiomig_sendjob - the sender's C send path: stream sources read and sent by threads,
 * no interpreter in the per-chunk loop (vfiomig/send/_threads.py drives it).
 *
 * One reader thread per device reads its source (synthetic state made here, a block
 * repeated (bench's pattern), or a descriptor: a file, a pipe) into pooled chunk buffers
 * of whole packets, exactly as the trio sender's _produce_chunks does, and queues each
 * packet on its channel in QEMU's round robin (one counter shared by every device); one
 * thread per channel builds the 288-byte headers and writes its queue with sendmsg of up
 * to VFM_SJ_BATCH packets (header and data iovecs, the data never copied).  Where it
 * pays, a file's or a pipe's bytes never reach user space: sendfile, and splice through a
 * pipe per channel (vfiomig_sendzc.c).  A reader waits, after queuing a chunk,
 * until no channel it used holds more than `limit` bytes (the trio sender's backpressure),
 * then queues the config packet after its last data packet.  One device whose bytes are
 * known by offset (synthetic state, a pattern) needs no reader: each channel's thread
 * makes and sends its own share of the round robin (vfiomig_senddirect.c), as cref_send.
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
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "vfiomig_outbox.h"

#define VFM_SYNTH_BLOCK (1u << 20) /* bytes per synthetic block (vfiomig.sources) */
#define VFM_SJ_BATCH 512           /* packets per sendmsg: 2 iovecs each, IOV_MAX */
#define VFM_SJ_BATCH_BYTES (1u << 20) /* and a packet: synthetic data made per batch */
#define VFM_SJ_PACE_QUANTUM 0.001     /* seconds: the trio sender's PACE_QUANTUM */
#define VFM_FLAG_CONFIG 1u             /* VFIO_DEVICE_STATE_CONFIG_STATE: the config packet */

/* VFM_SJ_PUSH: no reader thread; the caller queues the packets it read itself
 * (vfiomig_sendpush.c: a device read by Python, e.g. a VFIO device through a fake's read).
 * VFM_SJ_VFIO_USER: a vfio-user client's socket in STOP_COPY, its MIG_DATA_READ replies
 * received by the reader thread straight into its chunks (vfiomig_sendvu.c). */
enum vfm_sj_kind {
    VFM_SJ_SYNTH = 1,
    VFM_SJ_FD = 2,
    VFM_SJ_PATTERN = 3,
    VFM_SJ_PUSH = 4,
    VFM_SJ_VFIO_USER = 5,
};
enum vfm_sj_error {
    VFM_SJ_OK,
    VFM_SJ_CHANNEL,
    VFM_SJ_SOURCE,
    VFM_SJ_CANCELLED,
    VFM_SJ_START,
    VFM_SJ_SHORT, /* a file ended before its size at the start: error_sent is where */
};
/* How an entry's data is sent (vfiomig_sendzc.c): from memory (data, or synthetic), with
 * sendfile from its device's file at src, or spliced from its channel's pipe. */
enum vfm_sj_how { VFM_SJ_MEM, VFM_SJ_SENDFILE, VFM_SJ_SPLICE };
/* SendJob's zerocopy: never, where it pays (packets of at least VFM_ZC_*_MIN), always. */
enum vfm_zc_mode { VFM_ZC_NEVER, VFM_ZC_AUTO, VFM_ZC_ALWAYS };

struct vfm_sj_vu; /* vfiomig_sendvu.c's, below */

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
    int zc_file;     /* VFM_SJ_FD, a regular file sent with sendfile */
    int zc_sized;    /* VFM_SJ_FD, a regular file read (packets below VFM_ZC_FILE_MIN) */
    uint64_t zc_pos, zc_end; /* either: the next byte to queue, its size at the start */
    int zc_splice;   /* VFM_SJ_FD, not a regular file: spliced into the channels' pipes
                      * (1 a pipe, 2 a socket or else: polled before each splice) */
    unsigned char *config;
    size_t config_len;
    uint64_t bytes;   /* data bytes queued */
    uint32_t packets; /* packets queued, the config packet included once queued */
    uint64_t read_bytes; /* VFM_SJ_FD: bytes read from the descriptor (a failure's offset) */
    /* VFM_SJ_PUSH (vfiomig_sendpush.c): the next idx, the channels the last push used,
     * whether the pusher waits for room, and the eventfd it waits on */
    uint32_t push_idx;
    unsigned char push_used[256];
    int push_waiting, room_fd;
    struct vfm_sj_vu *vu; /* VFM_SJ_VFIO_USER: the client's side (vfiomig_sendvu.c) */
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
    enum vfm_sj_how how;
};

struct vfm_sj_chan {
    int fd;
    struct vfm_sj_entry *ring;
    size_t cap, head, count;
    uint64_t queued_bytes, sent_bytes;
    double rate;     /* pacing: wire bytes per second, 0 unpaced (vfm_sj_pace_budget) */
    double start;    /* pacing: CLOCK_MONOTONIC seconds when its thread started */
    uint64_t paced;  /* pacing: wire bytes of the packets let out so far */
    int zpipe[2];    /* VFM_SJ_SPLICE entries' bytes, in queue order (-1: none yet) */
    int zbusy;       /* a reader is splicing a packet into zpipe */
    size_t zqueued;  /* VFM_SJ_SPLICE entries queued, not yet spliced out */
    int zrefused;    /* the socket refused splice or sendfile: copied from now on */
    uint64_t direct_k; /* direct (vfiomig_senddirect.c): its first packet not yet sent,
                        * UINT64_MAX once its thread is done (lock held) */
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
    enum vfm_zc_mode zerocopy;
    uint64_t zc_bytes; /* data bytes sent with sendfile or splice (atomic) */
    int zpipes; /* every channel's zpipe is made */
    uint64_t next; /* the round robin: packets queued so far, every device */
    unsigned room_waiters; /* readers (direct: channels ahead) in a wait on room */
    int direct;            /* no reader: each channel's thread makes its packets (senddirect) */
    unsigned pushers_waiting; /* VFM_SJ_PUSH devices waiting for room */
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
/* Start every thread (with job->direct, set by the caller when vfm_sj_direct_ok: the
 * channels' threads alone, no reader); a thread that cannot start fails the job
 * (VFM_SJ_START). */
void vfm_sendjob_start(struct vfm_sendjob *job);
/* Stop every thread soon (VFM_SJ_CANCELLED, unless a failure came first). */
void vfm_sendjob_cancel(struct vfm_sendjob *job);
/* Wait for every started thread (call without any lock; blocks); then close the
 * channels' pipes. */
void vfm_sendjob_join(struct vfm_sendjob *job);
/* Free everything (after join; the descriptors given are the caller's). */
void vfm_sendjob_free(struct vfm_sendjob *job);

/* -- shared by the job's threads (vfiomig_sendthreads.c) ------------------------------ */

/* What a thread is started with: its job and its channel or device number. */
struct vfm_sj_thread_arg {
    struct vfm_sendjob *job;
    unsigned id;
};

/* A channel socket's mode before its thread made it blocking (vfm_sj_chan_begin). */
struct vfm_sj_sock_mode {
    int flags;
    struct timeval timeout;
};

/* Record the first failure and wake every thread (lock held). */
void vfm_sj_fail(struct vfm_sendjob *job, enum vfm_sj_error what, unsigned who, int err,
                 uint64_t sent);
/* A thread is about to exit (lock held): the last one makes done_fd readable. */
void vfm_sj_thread_exit(struct vfm_sendjob *job);
/* Wake the push devices (vfiomig_sendpush.c) waiting for room, or all of them once the
 * job failed: their room eventfd becomes readable (lock held). */
void vfm_sj_push_wake(struct vfm_sendjob *job);
/* A channel thread's first step, for both kinds (vfiomig_sendjob.c's reader-fed ones,
 * vfiomig_senddirect.c's): its name (top -H, the tests' leak check), its pacing clock,
 * and its socket made blocking with SO_SNDTIMEO as the cancel check's period, for the
 * thread's life (*saved keeps what to restore).  1 blocking, 0 left non-blocking. */
int vfm_sj_chan_begin(struct vfm_sendjob *job, unsigned id, struct vfm_sj_sock_mode *saved);
/* Its last (lock held): the socket as it was before the job is done (trio has it back),
 * then vfm_sj_thread_exit. */
void vfm_sj_chan_end(struct vfm_sendjob *job, unsigned id, int blocking,
                     const struct vfm_sj_sock_mode *saved);
/* A channel's send failed with err (lock held; `sent`: the channel's bytes so far): our
 * own cancel (ECANCELED) is the job's, anything else the channel's failure. */
void vfm_sj_send_failed(struct vfm_sendjob *job, unsigned id, int err, uint64_t sent);
/* A send to a channel's socket (sendmsg, sendfile, splice) failed with err: 0 to try
 * again (interrupted; a blocking socket's SO_SNDTIMEO; a non-blocking one that can take
 * more now, after a poll that the cancel eventfd ends), else the errno to fail with
 * (ECANCELED once the job is cancelled). */
int vfm_sj_send_again(struct vfm_sendjob *job, int fd, int blocking, int err);
/* Send the whole iovec array (it is advanced; more: MSG_MORE or 0); *sent counts what
 * the socket took.  0, ECANCELED once the job failed, or the send's errno. */
int vfm_sj_send_all(struct vfm_sendjob *job, int fd, int blocking, struct iovec *iov,
                    size_t cnt, int more, uint64_t *sent);

/* Pacing (a channel's rate, the trio sender's channel_rate): a packet leaves once
 * start + (paced + its wire bytes) / rate is past, those due together in one sendmsg.
 * The wire bytes the channel may let out now (UINT64_MAX when unpaced). */
uint64_t vfm_sj_pace_budget(const struct vfm_sj_chan *ch);
/* The channel's clock starts (its thread's first step). */
void vfm_sj_pace_start(struct vfm_sj_chan *ch);
/* Nothing is due: sleep until a packet of `head` wire bytes is, plus VFM_SJ_PACE_QUANTUM
 * (a burst per wakeup, at most that late, never early).  0, or ECANCELED once the job
 * is cancelled or failed (the cancel eventfd ends the sleep). */
int vfm_sj_pace_wait(struct vfm_sendjob *job, const struct vfm_sj_chan *ch, uint64_t head);

/* -- vfiomig_senddirect.c: one device read by offset, no reader thread -------------- */

/* Whether the job can run without a reader: one device whose bytes each channel's thread
 * can make by offset (synthetic state, a pattern), chunks of whole packets. */
int vfm_sj_direct_ok(const struct vfm_sendjob *job);
/* A channel's thread in a direct job: its share of QEMU's round robin (packets k with
 * k % nchan == its number, the config packet last), made and sent as cref_send does. */
void *vfm_sj_direct_main(void *arg);
/* Queue the device's config packet (dev->config) after its last data packet, idx, on
 * the next channel of the round robin, count it in dev->packets and wake that channel
 * (lock held): a reader's end and a push device's alike.  0, or ENOMEM. */
int vfm_sj_queue_config(struct vfm_sendjob *job, struct vfm_sj_dev *dev, uint32_t idx);
/* Queue n bytes of a device's stream (data, or NULL: synthetic or sendfile'd from src)
 * as its next packets, idx counting from *idx, cut at the packet size, in the round robin
 * (lock held); used[c] set for each channel given one, dev->bytes counted; no channel is
 * woken (vfm_sj_wake_used).  0, or ENOMEM.  A reader's chunks and a push alike. */
int vfm_sj_queue_chunk(struct vfm_sendjob *job, struct vfm_sj_dev *dev, struct vfm_sj_buf *buf,
                       const unsigned char *data, uint64_t src, size_t n, uint32_t *idx,
                       enum vfm_sj_how how, unsigned char *used);
/* Wake each channel with used[c] set, once (lock held). */
void vfm_sj_wake_used(struct vfm_sendjob *job, const unsigned char *used);
/* Whether no channel with used[c] set holds more than the job's limit (lock held): the
 * backpressure a reader waits on before its next chunk, a pusher before its next read. */
int vfm_sj_room(const struct vfm_sendjob *job, const unsigned char *used);
/* A reader is done (lock held): the channels' threads end once their queues are empty. */
void vfm_sj_reader_done(struct vfm_sendjob *job);

/* -- vfiomig_sendpush.c: devices whose packets the caller pushes (VFM_SJ_PUSH) ------ */

/* Set up a push device's room eventfd (at init): 0 or an errno. */
int vfm_sj_push_init(struct vfm_sj_dev *dev);
/* Queue the caller's data (len bytes, pinned in buf until sent) as the device's next
 * packets, cut at the packet size (a short one only at the end of the stream): 0,
 * ECANCELED once the job failed (stop reading), or ENOMEM. */
int vfm_sj_push(struct vfm_sendjob *job, unsigned d, struct vfm_sj_buf *buf,
                const unsigned char *data, size_t len);
/* Whether the device may push again (no channel its last push used holds more than the
 * limit, or the job failed); if not, room_fd becomes readable when that may have
 * changed.  Drains room_fd first. */
int vfm_sj_push_room(struct vfm_sendjob *job, unsigned d);
/* The device's last data packet is pushed: queue the config blob (copied) after it.
 * 0, ECANCELED once the job failed, or ENOMEM. */
int vfm_sj_push_end(struct vfm_sendjob *job, unsigned d, const unsigned char *config,
                    size_t config_len);

/* -- vfiomig_sendzc.c: zero-copy sends (lock not held unless said) ------------------- */

/* Zero-copy sends: packets at least this long are sent with sendfile from a regular
 * file, and spliced from a pipe (VFM_ZC_AUTO; a socket only with VFM_ZC_ALWAYS; measured in
 * benchmarks/README.md, round 4). */
#define VFM_ZC_FILE_MIN (64u << 10)
#define VFM_ZC_PIPE_MIN (128u << 10)
#define VFM_ZC_NOFIT (-100000)   /* vfm_zc_fill: the pipe is full of this packet alone */
#define VFM_ZC_REFUSED (-100001) /* vfm_zc_fill: the source cannot splice; nothing moved */
#define VFM_ZC_SHORT (-100002)   /* vfm_zc_send: the file ended before its size */

/* Decide how a device's source is read (before its first chunk): a regular file for
 * sendfile (dev->zc_file), a pipe or a socket for splice (dev->zc_splice), or neither
 * (read as before). */
void vfm_zc_setup(struct vfm_sendjob *job, struct vfm_sj_dev *dev);
/* The next chunk of a sendfile device: its offset in *src and its bytes. */
ssize_t vfm_zc_next_file(struct vfm_sendjob *job, struct vfm_sj_dev *dev, uint64_t *src);
/* Read the next chunk of a zc_sized file into out (lock not held): its bytes (0 at the
 * size it had at the start), -errno, or VFM_ZC_SHORT (*ended: where the file ended). */
ssize_t vfm_zc_read_file(struct vfm_sendjob *job, struct vfm_sj_dev *dev, unsigned char *out,
                         uint64_t *ended);
/* Every channel's pipe (lock held): 0, or an errno (then nothing is spliced). */
int vfm_zc_pipes(struct vfm_sendjob *job);
/* Splice up to want bytes of the source into the channel's pipe (the caller holds the
 * pipe: zbusy); *done counts what moved.  The bytes (short at the source's end), or
 * -errno, VFM_ZC_NOFIT, VFM_ZC_REFUSED. */
ssize_t vfm_zc_fill(struct vfm_sendjob *job, struct vfm_sj_dev *dev, struct vfm_sj_chan *ch,
                    size_t want, size_t *done);
/* After VFM_ZC_NOFIT or VFM_ZC_REFUSED: the packet's done bytes read back from the pipe
 * into out and the rest read from the source.  Its bytes, or -errno. */
ssize_t vfm_zc_readback(struct vfm_sendjob *job, struct vfm_sj_dev *dev,
                        struct vfm_sj_chan *ch, unsigned char *out, size_t want, size_t done);
/* Send one entry's data that is not in memory (after its header, sent with MSG_MORE):
 * sendfile or splice, or copied through scratch (packet_size bytes) once the socket
 * refused them; never with MSG_MORE (a send waiting for room would not push what it
 * held back).  0, an errno, or VFM_ZC_SHORT (*ended: the file's end).  *sent counts
 * what the socket took. */
int vfm_zc_send(struct vfm_sendjob *job, struct vfm_sj_chan *ch, int blocking,
                const struct vfm_sj_entry *e, unsigned char *scratch, uint64_t *sent,
                uint64_t *ended);
/* Close the channels' pipes (vfm_sendjob_join, vfm_sendjob_free). */
void vfm_zc_free(struct vfm_sendjob *job);

/* -- vfiomig_sendvu.c: a vfio-user device's MIG_DATA_READ replies (VFM_SJ_VFIO_USER) --- */

/* Why a vfio-user read failed (vfm_sj_vu.failure); the numbers a, b, c say what the
 * Python side needs to word it as the Python client would (_native_read.py). */
enum vfm_vu_failure {
    VFM_VU_OK,
    VFM_VU_REPLY,    /* an ERROR reply: err is the server's errno */
    VFM_VU_TIMEOUT,  /* a wait took longer than the reply timeout: a = 1 sending, 0 a reply */
    VFM_VU_CLOSED,   /* the server closed the connection */
    VFM_VU_IO,       /* recv or send failed with err: a = 1 sending, 0 receiving */
    VFM_VU_SMALL,    /* a message size a below the header size */
    VFM_VU_UNEXPECTED, /* not a MIG_DATA_READ reply: command a, msg_id b, flags c */
    VFM_VU_STRAY,    /* a reply to msg_id a, which is not outstanding */
    VFM_VU_ORDER,    /* a reply to msg_id a before the one to msg_id b (out of order) */
    VFM_VU_SHORT,    /* a reply payload of a bytes, below the 8 of its sizes */
    VFM_VU_TOO_MUCH, /* a reply says a bytes: asked b, carried c */
    VFM_VU_AFTER_END, /* a reply of a bytes after the 0-byte one */
};

struct vfm_sj_vu {
    int fd;              /* the client's socket (non-blocking), the client's during the job */
    uint32_t size;       /* data bytes each MIG_DATA_READ asks (the client's data_limit) */
    unsigned window;     /* requests in flight */
    int timeout_ms;      /* each wait's bound (the client's reply timeout) */
    uint16_t first_id;   /* the oldest request whose reply is not taken yet */
    unsigned pending;    /* requests whose reply header is not received yet */
    unsigned char req[24]; /* the request being sent */
    size_t req_off;      /* of it sent so far (0: none in part) */
    unsigned char hdr[16]; /* the header being received */
    uint64_t hdr_left;   /* of it still to come (0: none in part) */
    uint64_t sizes_left; /* of the reply's argsz and size still to come (skipped if failed) */
    uint64_t left;       /* data bytes of the reply being received still to come */
    uint64_t extra;      /* then its payload bytes past the data (skipped) */
    int ended;           /* a reply carried 0 bytes: the stream's end */
    uint64_t drain_by;   /* CLOCK_MONOTONIC ms: the bound of the collection after a failure */
    unsigned char *scratch; /* skipped bytes land here (VFM_VU_SCRATCH) */
    /* the failure: the first one, and what was outstanding then */
    enum vfm_vu_failure failure;
    int broken; /* a failure after which the stream is out of step (all but VFM_VU_REPLY) */
    int err;
    unsigned failed_pending;
    uint32_t a, b, c;
};

/* A vfio-user device's state for the job (owned by dev->vu, freed by vfm_sendjob_free):
 * 0 or ENOMEM.  Its msg_ids start at VFM_VU_FIRST_ID. */
int vfm_sj_vu_init(struct vfm_sj_dev *dev, int fd, uint32_t size, unsigned window,
                   int timeout_ms);
void vfm_sj_vu_free(struct vfm_sj_dev *dev);
/* Fill up to n bytes with the device's STOP_COPY data (window MIG_DATA_READs in flight):
 * n, fewer only at its end (the 0-byte reply, every reply owed collected), or -errno:
 * -ECANCELED, or a failure in dev->vu (after an ERROR reply or a cancel the replies owed
 * are collected first, within one reply timeout, so the client stays in step). */
ssize_t vfm_sj_vu_read(struct vfm_sendjob *job, struct vfm_sj_dev *dev, unsigned char *out,
                       size_t n);
/* The reader is done (the job failed while it waited for room or a buffer, say): what
 * is still owed is collected, as after a cancel (lock not held). */
void vfm_sj_vu_settle(struct vfm_sendjob *job, struct vfm_sj_dev *dev);
/* Whether the client's socket is in step after the job: nothing owed, no failure that
 * breaks the protocol. */
int vfm_sj_vu_in_step(const struct vfm_sj_dev *dev);

/* -- vfiomig_sendsrc.c: the sources ------------------------------------------------ */

/* Read a descriptor source until n bytes or its end: the bytes, or -errno. */
ssize_t vfm_sj_read(struct vfm_sendjob *job, struct vfm_sj_dev *dev, unsigned char *out,
                    size_t n);
/* A pattern source's one chunk: 0, or ENOMEM. */
int vfm_sj_tile_pattern(struct vfm_sendjob *job, struct vfm_sj_dev *dev);
/* The next chunk of a pattern: *data and its bytes. */
ssize_t vfm_sj_next_tiled(struct vfm_sendjob *job, struct vfm_sj_dev *dev,
                          const unsigned char **data);

/* Bytes [off, off + n) of the synthetic stream of seed over base (vfiomig.sources'
 * synth_block: each block the base XOR the block's key, word by word). */
void vfm_synth_fill(unsigned char *out, const uint64_t *base, uint64_t seed, uint64_t off,
                    size_t n);

#endif /* VFIOMIG_SENDJOB_H */
