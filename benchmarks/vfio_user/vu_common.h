/* Shared helpers of the vfio-user ceiling programs: the 16-byte header, whole-buffer
 * I/O and a monotonic clock. The header is hand-rolled (host byte order, packed), as the
 * vfio-user spec defines it, so that no program needs libvfio-user's headers. */
#ifndef VU_COMMON_H
#define VU_COMMON_H

#include <err.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

struct vu_header {
    uint16_t msg_id;
    uint16_t cmd;
    uint32_t msg_size;
    uint32_t flags;
    uint32_t error_no;
} __attribute__((packed));

enum { VU_VERSION = 1, VU_DEVICE_FEATURE = 16, VU_MIG_DATA_READ = 17, VU_MIG_DATA_WRITE = 18 };
enum { VU_F_REPLY = 1, VU_F_ERROR = 0x20 };
enum { VU_STOP = 1, VU_RUNNING = 2, VU_STOP_COPY = 3, VU_RESUMING = 4 };

static inline double vu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Read exactly len bytes; exits on EOF or error. */
static inline void vu_read_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, MSG_WAITALL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            errx(1, "read: %s", n == 0 ? "peer closed" : strerror(errno));
        p += n;
        len -= (size_t)n;
    }
}

/* Send every byte of iov (modified in place); exits on error. */
static inline void vu_send_iov(int fd, struct iovec *iov, int cnt)
{
    while (cnt > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            err(1, "sendmsg");
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
}

static inline size_t vu_parse_size(const char *s)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    switch (*end) {
    case 'K': v <<= 10; break;
    case 'M': v <<= 20; break;
    case 'G': v <<= 30; break;
    case '\0': break;
    default: errx(2, "bad size %s", s);
    }
    return (size_t)v;
}

#endif
