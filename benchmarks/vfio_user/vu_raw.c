/* The UNIX-socket ceiling: a forked pair moves TOTAL bytes in messages of SIZE bytes
 * (a 16-byte header + body), each answered by a 16-byte reply, WINDOW in flight.
 * The reader takes each message whole (header, then body with MSG_WAITALL) into one
 * buffer, as a server that reads whole messages does.
 *
 *   vu_raw SIZE TOTAL WINDOW   ->  {"mib_s": ..., "seconds": ...}
 */
#include <sys/wait.h>

#include "vu_common.h"

static void serve(int fd, size_t size)
{
    char *buf = malloc(size);
    struct vu_header h;
    for (;;) {
        ssize_t n = recv(fd, &h, sizeof(h), MSG_WAITALL);
        if (n == 0)
            exit(0);
        if (n != sizeof(h))
            errx(1, "server: short header");
        vu_read_all(fd, buf, h.msg_size - sizeof(h));
        h.flags = VU_F_REPLY;
        h.msg_size = sizeof(h);
        struct iovec iov = {&h, sizeof(h)};
        vu_send_iov(fd, &iov, 1);
    }
}

int main(int argc, char **argv)
{
    if (argc != 4)
        errx(2, "usage: vu_raw SIZE TOTAL WINDOW");
    size_t size = vu_parse_size(argv[1]), total = vu_parse_size(argv[2]);
    int window = atoi(argv[3]);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
        err(1, "socketpair");
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        serve(sv[1], size);
    }
    close(sv[1]);
    char *data = malloc(size);
    memset(data, 0x5a, size);
    size_t count = total / size;
    int inflight = 0;
    double t0 = vu_now();
    for (size_t i = 0; i < count; i++) {
        struct vu_header h = {(uint16_t)i, VU_MIG_DATA_WRITE, (uint32_t)(sizeof(h) + size), 0, 0};
        struct iovec iov[2] = {{&h, sizeof(h)}, {data, size}};
        vu_send_iov(sv[0], iov, 2);
        if (++inflight == window) {
            vu_read_all(sv[0], &h, sizeof(h));
            inflight--;
        }
    }
    struct vu_header r;
    while (inflight-- > 0)
        vu_read_all(sv[0], &r, sizeof(r));
    double dt = vu_now() - t0;
    close(sv[0]);
    waitpid(pid, NULL, 0);
    printf("{\"mib_s\": %.1f, \"seconds\": %.4f}\n", count * size / dt / 1048576.0, dt);
    return 0;
}
