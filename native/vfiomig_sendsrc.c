/* vfiomig_sendsrc.c - the C send path's sources: synthetic state, a descriptor read
 * (polled with the cancel eventfd), bench's pattern (see vfiomig_sendjob.h); a regular
 * file's bounds are vfiomig_sendzc.c's.  Called by vfiomig_sendjob.c's threads; calls nothing back. */
#define _GNU_SOURCE
#include "vfiomig_sendjob.h"
#include "vfiomig_wait.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef uint64_t vfm_v2 __attribute__((vector_size(16))); /* SSE2 on x86-64 */

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

void vfm_synth_fill(unsigned char *out, const uint64_t *base, uint64_t seed, uint64_t off,
                    size_t n)
{
    size_t done = 0;

    while (done < n) {
        uint64_t block = off / VFM_SYNTH_BLOCK, in = off % VFM_SYNTH_BLOCK;
        size_t k = n - done < VFM_SYNTH_BLOCK - in ? n - done : (size_t)(VFM_SYNTH_BLOCK - in);
        uint64_t key = splitmix64(seed * 0x100000001B3ull + block);
        unsigned char *dst = out + done;

        if (in % 8 == 0 && k % 8 == 0) {
            /* the common case (packets of whole words): 16-byte vectors, four at a time
             * (2.7x the word loop GCC -O2 makes of it) */
            const uint64_t *src = base + in / 8;
            size_t words = k / 8, w = 0;
            vfm_v2 kv = {key, key};
            for (; w + 8 <= words; w += 8) {
                vfm_v2 v[4];
                memcpy(v, src + w, sizeof(v));
                v[0] ^= kv;
                v[1] ^= kv;
                v[2] ^= kv;
                v[3] ^= kv;
                memcpy(dst + 8 * w, v, sizeof(v));
            }
            for (; w < words; w++) {
                uint64_t v = src[w] ^ key;
                memcpy(dst + 8 * w, &v, 8);
            }
        } else {
            for (size_t i = 0; i < k; i++) {
                uint64_t pos = in + i, v = base[pos / 8] ^ key;
                unsigned char word[8];
                memcpy(word, &v, 8);
                dst[i] = word[pos % 8];
            }
        }
        done += k;
        off += k;
    }
}

/* Fill up to n bytes from the device's source; the bytes, or -errno. */
ssize_t vfm_sj_read(struct vfm_sendjob *job, struct vfm_sj_dev *dev, unsigned char *out,
                    size_t n)
{
    size_t done = 0;

    while (done < n) {
        ssize_t r;
        if (__atomic_load_n(&job->failed, __ATOMIC_ACQUIRE))
            return -ECANCELED; /* between two reads of a descriptor that is not polled */
        if (dev->poll) {
            int err = vfm_wait_fd(dev->fd, POLLIN, job->cancel_fd);
            if (err)
                return -err;
        }
        r = read(dev->fd, out + done, n - done);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        done += (size_t)r;
        dev->read_bytes += (uint64_t)r;
    }
    return (ssize_t)done;
}

/* A pattern: every chunk is the block repeated from its start (bench's PatternSource),
 * so one chunk of it is made once and every chunk's packets point into it (no copy at
 * all, as cref_send).  0, or ENOMEM. */
int vfm_sj_tile_pattern(struct vfm_sendjob *job, struct vfm_sj_dev *dev)
{
    if (dev->kind != VFM_SJ_PATTERN)
        return 0;
    dev->tiled = malloc(job->chunk);
    if (!dev->tiled)
        return ENOMEM;
    for (size_t i = 0; i < job->chunk; i += dev->pattern_len) {
        size_t m = job->chunk - i < dev->pattern_len ? job->chunk - i : dev->pattern_len;
        memcpy(dev->tiled + i, dev->pattern, m);
    }
    return 0;
}

ssize_t vfm_sj_next_tiled(struct vfm_sendjob *job, struct vfm_sj_dev *dev,
                          const unsigned char **data)
{
    uint64_t left = dev->size - dev->offset;
    size_t n = left < job->chunk ? (size_t)left : job->chunk;

    *data = dev->tiled;
    dev->offset += n;
    return (ssize_t)n;
}
