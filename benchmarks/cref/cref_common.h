/*
 * cref_common.h - what the C reference receiver and sender share: the wire constants of
 * SPEC.md section 1, big-endian helpers, address parsing and the data pattern.
 *
 * Everything here is static inline so that each tool stays one translation unit plus this
 * header, with no library to build and no symbols to clash.
 */
#ifndef CREF_COMMON_H
#define CREF_COMMON_H

#define _GNU_SOURCE
#include <sys/uio.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CREF_MULTIFD_MAGIC 0x11223344u
#define CREF_MULTIFD_VERSION 1u
#define CREF_FLAG_DEVICE_STATE 0x40u
#define CREF_HANDSHAKE_SIZE 64u
#define CREF_HDR_SIZE 276u   /* 12 common + idstr[256] + instance u32 + next_packet_size u32 */
#define CREF_IDSTR_SIZE 256u
#define CREF_VFIO_HDR_SIZE 12u /* version, idx, flags */
#define CREF_VFIO_FLAG_CONFIG 0x1u
#define CREF_IDX_INVALID 0xFFFFFFFFu
#define CREF_DEV_CONFIG_STATE 0xFFFFFFFFEF100002ull
#define CREF_END_OF_STATE 0xFFFFFFFFEF100001ull
#define CREF_PACKET_CAP (64u << 20) /* largest next_packet_size accepted (SPEC default) */

static inline uint32_t cref_get_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t cref_get_be64(const unsigned char *p)
{
    return ((uint64_t)cref_get_be32(p) << 32) | cref_get_be32(p + 4);
}

static inline void cref_put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static inline void cref_put_be64(unsigned char *p, uint64_t v)
{
    cref_put_be32(p, (uint32_t)(v >> 32));
    cref_put_be32(p + 4, (uint32_t)v);
}

static inline double cref_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CPU time of the whole process (all threads): a figure that other load cannot inflate. */
static inline double cref_cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

/* splitmix64: tiny, fast, and trivially reproducible in Python for the test's sha256. */
static inline uint64_t cref_splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/*
 * The data pattern.  Device d's state is cut into packets of `packet_size` data bytes (the
 * last one shorter).  Every packet's data is the same base block - the splitmix64 stream
 * seeded with `seed`, each word stored little-endian - except its first min(8, len) bytes,
 * which hold the tag BE64((d << 32) | idx).  A sender thus builds each packet from one
 * precomputed buffer plus 8 bytes, and a misplaced, lost or duplicated packet changes the
 * receiver's sha256.
 */
static inline void cref_fill_base(unsigned char *buf, size_t len, uint64_t seed)
{
    uint64_t st = seed;
    size_t i = 0;

    /* Byte stores keep the layout independent of host order; this runs once per sender. */
    while (i < len) {
        uint64_t w = cref_splitmix64(&st);
        for (size_t k = 0; k < 8 && i < len; k++, i++)
            buf[i] = (unsigned char)(w >> (8 * k));
    }
}

static inline uint64_t cref_tag(uint32_t device, uint32_t idx)
{
    return ((uint64_t)device << 32) | idx;
}

/* Parse a 32-hex-digit uuid (dashes allowed and ignored) into 16 bytes. 0 on success. */
static inline int cref_parse_uuid(const char *s, unsigned char out[16])
{
    int n = 0;

    for (; *s; s++) {
        int v;
        if (*s == '-')
            continue;
        if (*s >= '0' && *s <= '9')
            v = *s - '0';
        else if (*s >= 'a' && *s <= 'f')
            v = *s - 'a' + 10;
        else if (*s >= 'A' && *s <= 'F')
            v = *s - 'A' + 10;
        else
            return -1;
        if (n >= 32)
            return -1;
        if (n % 2 == 0)
            out[n / 2] = (unsigned char)(v << 4);
        else
            out[n / 2] |= (unsigned char)v;
        n++;
    }
    return n == 32 ? 0 : -1;
}

/* Parse a decimal or 0x-prefixed unsigned number with an optional K/M/G (binary) suffix. */
static inline int cref_parse_size(const char *s, uint64_t *out)
{
    char *end = NULL;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s)
        return -1;
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    default: break;
    }
    if (*end == 'i' && end[1] == 'B')
        end += 2;
    else if (*end == 'B')
        end++;
    if (*end)
        return -1;
    *out = v;
    return 0;
}

/*
 * Resolve "tcp:HOST:PORT" or "unix:PATH" into a sockaddr.  The port is after the last ':'
 * so that "tcp:[::1]:0" works; brackets are stripped.  0 on success, -1 with a message in
 * err otherwise.
 */
static inline int cref_resolve(const char *addr, struct sockaddr_storage *ss, socklen_t *len,
                               char *err, size_t errlen)
{
    int rc = -1;
    char host[256];
    struct addrinfo hints, *res = NULL;

    memset(ss, 0, sizeof(*ss));
    if (strncmp(addr, "unix:", 5) == 0) {
        struct sockaddr_un *sun = (struct sockaddr_un *)ss;
        size_t n = strlen(addr + 5);
        if (n == 0 || n >= sizeof(sun->sun_path)) {
            snprintf(err, errlen, "unix socket path length %zu out of range", n);
            goto out;
        }
        sun->sun_family = AF_UNIX;
        memcpy(sun->sun_path, addr + 5, n + 1);
        *len = (socklen_t)sizeof(*sun);
        rc = 0;
        goto out;
    }
    if (strncmp(addr, "tcp:", 4) == 0) {
        const char *h = addr + 4;
        const char *colon = strrchr(h, ':');
        size_t hl;
        int gai;
        if (!colon) {
            snprintf(err, errlen, "address %s has no port", addr);
            goto out;
        }
        hl = (size_t)(colon - h);
        if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
            h++;
            hl -= 2;
        }
        if (hl >= sizeof(host)) {
            snprintf(err, errlen, "host name too long in %s", addr);
            goto out;
        }
        memcpy(host, h, hl);
        host[hl] = 0;
        memset(&hints, 0, sizeof(hints));
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_NUMERICSERV;
        gai = getaddrinfo(hl ? host : NULL, colon + 1, &hints, &res);
        if (gai) {
            snprintf(err, errlen, "cannot resolve %s: %s", addr, gai_strerror(gai));
            goto out;
        }
        memcpy(ss, res->ai_addr, res->ai_addrlen);
        *len = res->ai_addrlen;
        rc = 0;
        goto out;
    }
    snprintf(err, errlen, "address %s is neither tcp:HOST:PORT nor unix:PATH", addr);
out:
    if (res)
        freeaddrinfo(res);
    return rc;
}


/* Drop the first n bytes (a short write's count) from an iovec array in place. */
static inline void cref_iov_advance(struct iovec **iov, int *cnt, size_t n)
{
    while (*cnt > 0 && n >= (*iov)->iov_len) {
        n -= (*iov)->iov_len;
        (*iov)++;
        (*cnt)--;
    }
    if (*cnt > 0) {
        (*iov)->iov_base = (char *)(*iov)->iov_base + n;
        (*iov)->iov_len -= n;
    }
}

#endif /* CREF_COMMON_H */
