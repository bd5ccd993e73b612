/*
 * cref_send - the C load generator: plays a QEMU source's multifd channels carrying VFIO
 * device state, fast enough that the receiver under test, not the sender, is the limit.
 *
 * Usage: cref_send ADDR CHANNELS UUID [--idstr S] [--instance I] [--devices D]
 *                  [--size BYTES] [--packet-size BYTES] [--order ORDER] [--seed N]
 *                  [--rate BYTES_PER_S] [--data hot|synth|file:PATH|fd:N]
 *   --size         state bytes per device (default 1G; K/M/G suffixes are binary)
 *   --packet-size  data bytes per packet, after the 12-byte VFIO header (default 1M)
 *   --order        roundrobin (default) | random (seeded permutation) | reverse | idx0-last
 *   --devices      D devices, instances I .. I+D-1, same idstr; their packets interleave
 *   --rate         pacing per channel in bytes/s, 0 = as fast as possible (default)
 *   --data         hot (default): one block, see below; synth: distinct bytes made per
 *                  packet right before its send, the way vfiomig's synth: makes them (a
 *                  1 MiB base XORed with a key per 1 MiB block, 16-byte vectors); file:PATH:
 *                  the packet's bytes pread from PATH at its offset (the page cache); fd:N:
 *                  a stream read in order from descriptor N (a pipe: one device, round
 *                  robin; each thread takes the next packet and reads its bytes under one
 *                  lock, so a channel carries the packets it took, not k % CHANNELS).  What
 *                  a plain C sender pays to send the bytes vfiomig send's sources carry:
 *                  the fair yardstick for them (benchmarks/compare_send.py, cref-same).
 *
 * Stream layout: device d's packet sequence is its data idx 0..P-1 in ORDER, then the
 * config packet idx P.  The global sequence takes one packet of each device in turn, and
 * global packet k travels on channel k % CHANNELS, so each channel carries its share in
 * sequence order, as QEMU's multifd threads do.  The data pattern is cref_fill_base() in
 * cref_common.h (a shared splitmix64 block whose first 8 bytes carry BE64((d<<32)|idx)),
 * so nothing but one packet-sized block is held in memory, whatever the state size.
 * Config blob of device d: BE64 DEV_CONFIG_STATE, BE32 d, BE32 P, BE64 END_OF_STATE.
 *
 * One blocking thread per channel, each sending batches of packets with one sendmsg.
 * Prints one JSON line on stdout; exit 0 on success, 1 on error, 2 on usage.
 */
#include "cref_common.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <sys/uio.h>

#define CREF_BATCH_PACKETS 256     /* 2 iovecs each: fits IOV_MAX */
#define CREF_BATCH_BYTES (1u << 20) /* stop adding packets to a sendmsg past this */
#define CREF_PREFIX (CREF_HDR_SIZE + CREF_VFIO_HDR_SIZE + 8) /* headers + tag word */
#define CREF_CONFIG_LEN 24u

struct cref_tx {
    struct sockaddr_storage addr;
    socklen_t addrlen;
    unsigned nchan, ndev;
    unsigned char uuid[16];
    char idstr[CREF_IDSTR_SIZE];
    uint32_t instance;
    uint64_t size, packet_size, rate, seed;
    uint32_t npackets; /* data packets per device */
    enum { CREF_RR, CREF_RANDOM, CREF_REVERSE, CREF_IDX0_LAST } order;
    uint32_t **perm; /* CREF_RANDOM: per device */
    unsigned char *base;
    enum { CREF_HOT, CREF_SYNTH, CREF_FILE, CREF_STREAM } data;
    uint64_t *synth_base; /* CREF_SYNTH: one 1 MiB block */
    int file_fd;          /* CREF_FILE, CREF_STREAM */
    uint64_t next;        /* CREF_STREAM: the next packet to take (under lock) */
    pthread_mutex_t lock;
    char error[256];
    bool failed;
    uint64_t bytes, wire_bytes, packets;
};

struct cref_worker {
    struct cref_tx *tx;
    unsigned id;
    int fd;
    pthread_t thread;
    uint64_t bytes, wire_bytes, packets;
    unsigned char (*hdrs)[CREF_PREFIX]; /* per batch slot: multifd hdr, VFIO hdr, tag */
    unsigned char configs[CREF_BATCH_PACKETS][CREF_CONFIG_LEN];
    unsigned char *scratch; /* --data synth|file: a batch's bytes */
};

#define CREF_SYNTH_BLOCK (1u << 20)
typedef uint64_t cref_v2 __attribute__((vector_size(16)));

/* Bytes [off, off + n) of the synthetic stream: each 1 MiB block the base XOR its key
 * (vfiomig's vfm_synth_fill, whole words; packets here are whole words or the tail). */
static void cref_synth_fill(unsigned char *out, const uint64_t *base, uint64_t seed,
                            uint64_t off, size_t n)
{
    while (n) {
        uint64_t block = off / CREF_SYNTH_BLOCK, in = off % CREF_SYNTH_BLOCK;
        size_t k = n < CREF_SYNTH_BLOCK - in ? n : (size_t)(CREF_SYNTH_BLOCK - in);
        uint64_t st = seed * 0x100000001B3ull + block, key = cref_splitmix64(&st);
        const unsigned char *src = (const unsigned char *)base + in;
        cref_v2 kv = {key, key};
        size_t i = 0;

        for (; i + 64 <= k; i += 64) {
            cref_v2 v[4];
            memcpy(v, src + i, sizeof(v));
            v[0] ^= kv;
            v[1] ^= kv;
            v[2] ^= kv;
            v[3] ^= kv;
            memcpy(out + i, v, sizeof(v));
        }
        for (; i < k; i++)
            out[i] = (unsigned char)(src[i] ^ (unsigned char)(key >> (8 * ((in + i) % 8))));
        out += k;
        off += k;
        n -= k;
    }
}

/* A data packet's bytes at [off, off + len) into out (--data synth|file|fd, the last
 * read in order: the caller holds the lock); 0 or -1. */
static int cref_make(struct cref_tx *tx, unsigned char *out, uint64_t off, uint32_t len)
{
    if (tx->data == CREF_SYNTH) {
        cref_synth_fill(out, tx->synth_base, tx->seed, off, len);
        return 0;
    }
    for (uint32_t done = 0; done < len;) {
        ssize_t n = tx->data == CREF_STREAM
                        ? read(tx->file_fd, out + done, len - done)
                        : pread(tx->file_fd, out + done, len - done, (off_t)(off + done));
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            if (n == 0)
                errno = ENODATA; /* the file or stream is shorter than --size */
            return -1;
        }
        done += (uint32_t)n;
    }
    return 0;
}

static void cref_tx_fail(struct cref_tx *tx, const char *what, unsigned chan)
{
    pthread_mutex_lock(&tx->lock);
    if (!tx->failed) {
        tx->failed = true;
        snprintf(tx->error, sizeof(tx->error), "channel %u: %s: %s", chan, what, strerror(errno));
    }
    pthread_mutex_unlock(&tx->lock);
}

/* idx of device d's j-th packet in its sequence (j == npackets is the config packet). */
static uint32_t cref_seq_idx(const struct cref_tx *tx, unsigned d, uint32_t j)
{
    uint32_t p = tx->npackets;

    if (j >= p)
        return p;
    switch (tx->order) {
    case CREF_RANDOM: return tx->perm[d][j];
    case CREF_REVERSE: return p - 1 - j;
    case CREF_IDX0_LAST: return j + 1 < p ? j + 1 : 0;
    default: return j;
    }
}

/* Loop until the whole iovec is sent (sendmsg may stop short on a blocking socket too). */
static int cref_send_all(int fd, struct iovec *iov, int cnt)
{
    int rc = -1;

    while (cnt > 0) {
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            goto out;
        }
        cref_iov_advance(&iov, &cnt, (size_t)n);
    }
    rc = 0;
out:
    return rc;
}

static void *cref_worker_main(void *arg)
{
    struct cref_worker *w = arg;
    struct cref_tx *tx = w->tx;
    struct iovec iov[2 * CREF_BATCH_PACKETS];
    uint64_t total = (uint64_t)tx->ndev * (tx->npackets + 1ull);
    uint64_t k = w->id, paced = 0;
    double t0 = cref_now();

    while ((tx->data == CREF_STREAM || k < total) && !tx->failed) {
        int cnt = 0, np = 0;
        uint64_t batch = 0;
        size_t made = 0;
        bool read_ahead = false; /* CREF_STREAM: this packet's bytes are in scratch */

        for (; np < CREF_BATCH_PACKETS && batch < CREF_BATCH_BYTES; k += tx->nchan) {
            if (tx->data == CREF_STREAM) {
                /* the next packet of the stream, and its bytes, taken in order */
                int bad = 0;
                pthread_mutex_lock(&tx->lock);
                k = tx->next < total ? tx->next++ : total;
                if (k < tx->npackets) {
                    uint64_t off = k * tx->packet_size;
                    uint32_t n = (uint32_t)(tx->size - off < tx->packet_size
                                                ? tx->size - off : tx->packet_size);
                    bad = cref_make(tx, w->scratch + made, off, n);
                }
                pthread_mutex_unlock(&tx->lock);
                if (bad) {
                    cref_tx_fail(tx, "reading the stream", w->id);
                    goto out;
                }
                read_ahead = true;
            }
            if (k >= total)
                break;
            unsigned d = (unsigned)(k % tx->ndev);
            uint32_t j = (uint32_t)(k / tx->ndev), idx = cref_seq_idx(tx, d, j);
            unsigned char *h = w->hdrs[np];
            uint32_t len;
            bool config = idx == tx->npackets;

            if (config) {
                len = CREF_CONFIG_LEN;
            } else {
                uint64_t off = (uint64_t)idx * tx->packet_size;
                len = (uint32_t)(tx->size - off < tx->packet_size ? tx->size - off
                                                                   : tx->packet_size);
            }
            cref_put_be32(h, CREF_MULTIFD_MAGIC);
            cref_put_be32(h + 4, CREF_MULTIFD_VERSION);
            cref_put_be32(h + 8, CREF_FLAG_DEVICE_STATE);
            memset(h + 12, 0, CREF_IDSTR_SIZE);
            memcpy(h + 12, tx->idstr, strlen(tx->idstr));
            cref_put_be32(h + 268, tx->instance + d);
            cref_put_be32(h + 272, CREF_VFIO_HDR_SIZE + len);
            cref_put_be32(h + 276, 0);
            cref_put_be32(h + 280, idx);
            cref_put_be32(h + 284, config ? CREF_VFIO_FLAG_CONFIG : 0);
            if (config) {
                unsigned char *c = w->configs[np];
                cref_put_be64(c, CREF_DEV_CONFIG_STATE);
                cref_put_be32(c + 8, d);
                cref_put_be32(c + 12, tx->npackets);
                cref_put_be64(c + 16, CREF_END_OF_STATE);
                iov[cnt++] = (struct iovec){h, CREF_HDR_SIZE + CREF_VFIO_HDR_SIZE};
                iov[cnt++] = (struct iovec){c, CREF_CONFIG_LEN};
            } else if (tx->data != CREF_HOT) {
                iov[cnt++] = (struct iovec){h, CREF_HDR_SIZE + CREF_VFIO_HDR_SIZE};
                if (!read_ahead &&
                    cref_make(tx, w->scratch + made, (uint64_t)idx * tx->packet_size, len)) {
                    cref_tx_fail(tx, "reading the file", w->id);
                    goto out;
                }
                iov[cnt++] = (struct iovec){w->scratch + made, len};
                made += len;
                w->bytes += len;
            } else {
                /* The tag goes right after the headers so that they share one iovec. */
                unsigned char tag[8];
                uint32_t tl = len < 8 ? len : 8;
                cref_put_be64(tag, cref_tag(d, idx));
                memcpy(h + CREF_HDR_SIZE + CREF_VFIO_HDR_SIZE, tag, tl);
                iov[cnt++] = (struct iovec){h, CREF_HDR_SIZE + CREF_VFIO_HDR_SIZE + tl};
                if (len > tl)
                    iov[cnt++] = (struct iovec){tx->base + tl, len - tl};
                w->bytes += len;
            }
            batch += CREF_HDR_SIZE + CREF_VFIO_HDR_SIZE + len;
            np++;
        }
        if (!cnt)
            break; /* CREF_STREAM: nothing left to take */
        if (cref_send_all(w->fd, iov, cnt)) {
            cref_tx_fail(tx, "send", w->id);
            break;
        }
        w->wire_bytes += batch;
        w->packets += (uint64_t)np;
        if (tx->rate) {
            /* Pace on the total so far, so that sleeping late is made up for next time. */
            double due = t0 + (double)(paced += batch) / (double)tx->rate, now = cref_now();
            if (due > now) {
                struct timespec ts = {(time_t)(due - now),
                                      (long)((due - now - (double)(time_t)(due - now)) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
    }
out:
    /* A FIN after the last byte tells the receiver this channel is complete. */
    shutdown(w->fd, SHUT_WR);
    return NULL;
}

static int cref_connect(struct cref_tx *tx, unsigned id)
{
    int rc = -1, fd = -1, one = 1;
    unsigned char hs[CREF_HANDSHAKE_SIZE] = {0};
    struct iovec iov = {hs, sizeof(hs)};

    /* The receiver may still be starting: retry a refused connect for up to 5 s. */
    for (int attempt = 0; attempt < 500; attempt++) {
        fd = socket(tx->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            goto out;
        if (connect(fd, (struct sockaddr *)&tx->addr, tx->addrlen) == 0)
            break;
        close(fd);
        fd = -1;
        if (errno != ECONNREFUSED && errno != ENOENT)
            goto out;
        usleep(10000);
    }
    if (fd < 0)
        goto out;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)); /* fails on unix: fine */
    cref_put_be32(hs, CREF_MULTIFD_MAGIC);
    cref_put_be32(hs + 4, CREF_MULTIFD_VERSION);
    memcpy(hs + 8, tx->uuid, 16);
    hs[24] = (unsigned char)id;
    if (cref_send_all(fd, &iov, 1))
        goto out;
    rc = fd;
    fd = -1;
out:
    if (fd >= 0)
        close(fd);
    return rc;
}

static void cref_usage(void)
{
    fprintf(stderr,
            "usage: cref_send ADDR CHANNELS UUID [--idstr S] [--instance I] [--devices D]\n"
            "                 [--size BYTES] [--packet-size BYTES] [--seed N]\n"
            "                 [--order roundrobin|random|reverse|idx0-last] [--rate BYTES/S]\n"
            "                 [--data hot|synth|file:PATH|fd:N]\n");
}

static int cref_parse_args(struct cref_tx *tx, int argc, char **argv)
{
    int rc = -1, npos = 0;
    const char *pos[3] = {NULL, NULL, NULL};
    uint64_t v;
    char err[256];

    snprintf(tx->idstr, sizeof(tx->idstr), "0000:00:04.0/vfio");
    tx->size = 1ull << 30;
    tx->packet_size = 1u << 20;
    tx->seed = 1;
    tx->ndev = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-' || a[1] != '-') {
            if (npos == 3)
                goto out;
            pos[npos++] = a;
            continue;
        }
        if (!val)
            goto out;
        i++;
        if (strcmp(a, "--idstr") == 0) {
            if (strlen(val) >= CREF_IDSTR_SIZE)
                goto out;
            snprintf(tx->idstr, sizeof(tx->idstr), "%s", val);
        } else if (strcmp(a, "--order") == 0) {
            if (strcmp(val, "roundrobin") == 0)
                tx->order = CREF_RR;
            else if (strcmp(val, "random") == 0)
                tx->order = CREF_RANDOM;
            else if (strcmp(val, "reverse") == 0)
                tx->order = CREF_REVERSE;
            else if (strcmp(val, "idx0-last") == 0)
                tx->order = CREF_IDX0_LAST;
            else
                goto out;
        } else if (strcmp(a, "--data") == 0) {
            if (strcmp(val, "hot") == 0) {
                tx->data = CREF_HOT;
            } else if (strcmp(val, "synth") == 0) {
                tx->data = CREF_SYNTH;
            } else if (strncmp(val, "file:", 5) == 0) {
                tx->data = CREF_FILE;
                tx->file_fd = open(val + 5, O_RDONLY | O_CLOEXEC);
                if (tx->file_fd < 0) {
                    fprintf(stderr, "cref_send: %s: %s\n", val + 5, strerror(errno));
                    goto out;
                }
            } else if (strncmp(val, "fd:", 3) == 0 && cref_parse_size(val + 3, &v) == 0 &&
                       v <= INT32_MAX) {
                tx->data = CREF_STREAM;
                tx->file_fd = (int)v;
            } else {
                goto out;
            }
        } else if (cref_parse_size(val, &v)) {
            goto out;
        } else if (strcmp(a, "--instance") == 0 && v <= UINT32_MAX) {
            tx->instance = (uint32_t)v;
        } else if (strcmp(a, "--devices") == 0 && v >= 1 && v <= 256) {
            tx->ndev = (unsigned)v;
        } else if (strcmp(a, "--size") == 0) {
            tx->size = v;
        } else if (strcmp(a, "--packet-size") == 0 && v >= 1 &&
                   v <= CREF_PACKET_CAP - CREF_VFIO_HDR_SIZE) {
            tx->packet_size = v;
        } else if (strcmp(a, "--seed") == 0) {
            tx->seed = v;
        } else if (strcmp(a, "--rate") == 0) {
            tx->rate = v;
        } else {
            goto out;
        }
    }
    if (npos != 3 || cref_parse_size(pos[1], &v) || v < 1 || v > 256)
        goto out;
    if (tx->data == CREF_STREAM && (tx->ndev != 1 || tx->order != CREF_RR))
        goto out; /* one stream is one device's, taken in order */
    tx->nchan = (unsigned)v;
    if (cref_parse_uuid(pos[2], tx->uuid))
        goto out;
    if (tx->size / tx->packet_size + 1 >= 0xFFFFFFFEull)
        goto out; /* idx must stay below 0xFFFFFFFF, config included */
    tx->npackets = (uint32_t)((tx->size + tx->packet_size - 1) / tx->packet_size);
    if (cref_resolve(pos[0], &tx->addr, &tx->addrlen, err, sizeof(err))) {
        fprintf(stderr, "cref_send: %s\n", err);
        goto out;
    }
    rc = 0;
out:
    return rc;
}

int main(int argc, char **argv)
{
    int rc = 2;
    struct cref_tx tx;
    struct cref_worker *ws = NULL;
    unsigned started = 0;
    double t0, t1;

    memset(&tx, 0, sizeof(tx));
    pthread_mutex_init(&tx.lock, NULL);
    if (cref_parse_args(&tx, argc, argv)) {
        cref_usage();
        goto out;
    }
    rc = 1;
    tx.base = malloc(tx.packet_size);
    ws = calloc(tx.nchan, sizeof(*ws));
    tx.perm = calloc(tx.ndev, sizeof(*tx.perm));
    if (!tx.base || !ws || !tx.perm) {
        fprintf(stderr, "cref_send: out of memory\n");
        goto out;
    }
    cref_fill_base(tx.base, tx.packet_size, tx.seed);
    if (tx.data == CREF_SYNTH) {
        tx.synth_base = malloc(CREF_SYNTH_BLOCK);
        if (!tx.synth_base) {
            fprintf(stderr, "cref_send: out of memory\n");
            goto out;
        }
        cref_fill_base((unsigned char *)tx.synth_base, CREF_SYNTH_BLOCK, tx.seed);
    }
    for (unsigned d = 0; tx.order == CREF_RANDOM && d < tx.ndev; d++) {
        /* Fisher-Yates with splitmix64: the same seed gives the same arrival order. */
        uint64_t st = tx.seed ^ (0x5EEDull << 32) ^ d;
        tx.perm[d] = malloc((size_t)tx.npackets * sizeof(uint32_t) + 1);
        if (!tx.perm[d]) {
            fprintf(stderr, "cref_send: out of memory\n");
            goto out;
        }
        for (uint32_t i = 0; i < tx.npackets; i++)
            tx.perm[d][i] = i;
        for (uint32_t i = tx.npackets; i > 1; i--) {
            uint32_t r = (uint32_t)(cref_splitmix64(&st) % i), t = tx.perm[d][i - 1];
            tx.perm[d][i - 1] = tx.perm[d][r];
            tx.perm[d][r] = t;
        }
    }
    for (unsigned i = 0; i < tx.nchan; i++)
        ws[i].fd = -1;
    for (unsigned i = 0; i < tx.nchan; i++) {
        ws[i].tx = &tx;
        ws[i].id = i;
        ws[i].hdrs = malloc(CREF_BATCH_PACKETS * sizeof(*ws[i].hdrs));
        if (tx.data != CREF_HOT) /* a batch: up to 1 MiB, then one more packet */
            ws[i].scratch = malloc(CREF_BATCH_BYTES + tx.packet_size);
        ws[i].fd = ws[i].hdrs && (tx.data == CREF_HOT || ws[i].scratch) ? cref_connect(&tx, i) : -1;
        if (ws[i].fd < 0) {
            fprintf(stderr, "cref_send: channel %u: cannot connect: %s\n", i, strerror(errno));
            goto out;
        }
    }
    t0 = cref_now();
    for (; started < tx.nchan; started++) {
        if (pthread_create(&ws[started].thread, NULL, cref_worker_main, &ws[started])) {
            cref_tx_fail(&tx, "pthread_create", started);
            break;
        }
    }
    for (unsigned i = 0; i < started; i++) {
        pthread_join(ws[i].thread, NULL);
        tx.bytes += ws[i].bytes;
        tx.wire_bytes += ws[i].wire_bytes;
        tx.packets += ws[i].packets;
    }
    t1 = cref_now();
    if (tx.failed) {
        fprintf(stderr, "cref_send: %s\n", tx.error);
        goto out;
    }
    printf("{\"tool\": \"cref_send\", \"channels\": %u, \"devices\": %u, \"bytes\": %llu, "
           "\"wire_bytes\": %llu, \"packets\": %llu, \"seconds\": %.6f, \"gbps\": %.3f, "
           "\"cpu_seconds\": %.3f}\n",
           tx.nchan, tx.ndev, (unsigned long long)tx.bytes, (unsigned long long)tx.wire_bytes,
           (unsigned long long)tx.packets, t1 - t0, (double)tx.wire_bytes / (t1 - t0) / 1e9,
           cref_cpu_seconds());
    fflush(stdout);
    rc = 0;
out:
    for (unsigned i = 0; ws && i < tx.nchan; i++) {
        if (ws[i].fd >= 0)
            close(ws[i].fd);
        free(ws[i].hdrs);
        free(ws[i].scratch);
    }
    for (unsigned d = 0; tx.perm && d < tx.ndev; d++)
        free(tx.perm[d]);
    free(tx.perm);
    free(ws);
    free(tx.base);
    free(tx.synth_base);
    if (tx.file_fd > 0)
        close(tx.file_fd);
    return rc;
}
