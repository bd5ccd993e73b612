/* A minimal C vfio-user client for the migration data path: the ceiling of a client.
 *
 *   vu_client SOCK write SIZE TOTAL WINDOW   RUNNING -> STOP -> RESUMING, TOTAL bytes of
 *                                            MIG_DATA_WRITE of SIZE bytes, WINDOW in flight
 *                                            (one message per sendmsg), then SET STOP
 *   vu_client SOCK read SIZE 0 WINDOW        RUNNING -> STOP -> STOP_COPY, MIG_DATA_READ of
 *                                            SIZE bytes, WINDOW in flight, until a reply
 *                                            carries 0 bytes, then SET STOP
 *
 * Prints {"mib_s": ..., "seconds": ..., "bytes": ...} for the data phase; an ERROR reply
 * exits 1 naming the command and errno.
 */
#include <sys/un.h>

#include "vu_common.h"

static int sock;
static uint16_t next_id;
static char *rbuf;
static size_t rbuf_size;

static uint16_t send_msg(uint16_t cmd, const void *a, size_t alen, const void *b, size_t blen)
{
    struct vu_header h = {next_id++, cmd, (uint32_t)(sizeof(h) + alen + blen), 0, 0};
    struct iovec iov[3] = {{&h, sizeof(h)}, {(void *)a, alen}, {(void *)b, blen}};
    vu_send_iov(sock, iov, blen ? 3 : 2);
    return h.msg_id;
}

/* Receive one reply whole into rbuf; returns its payload size. */
static size_t recv_reply(uint16_t cmd)
{
    struct vu_header h;
    vu_read_all(sock, &h, sizeof(h));
    if ((h.flags & 0xf) != VU_F_REPLY || h.cmd != cmd)
        errx(1, "unexpected message cmd %u flags %#x", h.cmd, h.flags);
    if (h.flags & VU_F_ERROR)
        errx(1, "command %u msg_id %u failed with errno %u", h.cmd, h.msg_id, h.error_no);
    size_t len = h.msg_size - sizeof(h);
    if (len > rbuf_size)
        errx(1, "reply of %zu bytes", len);
    vu_read_all(sock, rbuf, len);
    return len;
}

static void set_state(uint32_t state)
{
    uint32_t body[4] = {16, 0x20002, state, 0xffffffff};
    send_msg(VU_DEVICE_FEATURE, body, sizeof(body), NULL, 0);
    recv_reply(VU_DEVICE_FEATURE);
}

int main(int argc, char **argv)
{
    if (argc != 6)
        errx(2, "usage: vu_client SOCK write|read SIZE TOTAL WINDOW");
    int writing = strcmp(argv[2], "write") == 0;
    size_t size = vu_parse_size(argv[3]), total = vu_parse_size(argv[4]);
    int window = atoi(argv[5]);
    rbuf_size = size + 4096;
    rbuf = malloc(rbuf_size);

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", argv[1]);
    sock = socket(AF_UNIX, SOCK_STREAM, 0);
    int sndbuf = 4 << 20; /* as vfiomig's client: the kernel caps it at wmem_max */
    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        err(1, "connect %s", argv[1]);

    char version[128] = {0};
    int n = snprintf(version + 4, sizeof(version) - 4,
                     "{\"capabilities\":{\"max_msg_fds\":1,\"max_data_xfer_size\":%zu}}",
                     size > 1048576 ? size : 1048576);
    send_msg(VU_VERSION, version, 4 + (size_t)n + 1, NULL, 0);
    recv_reply(VU_VERSION);
    set_state(VU_STOP);
    set_state(writing ? VU_RESUMING : VU_STOP_COPY);

    char *data = malloc(size);
    memset(data, 0x5a, size);
    size_t moved = 0;
    int inflight = 0;
    double t0 = vu_now();
    if (writing) {
        for (size_t sent = 0; sent < total; sent += size) {
            uint32_t head[2] = {(uint32_t)(8 + size), (uint32_t)size};
            send_msg(VU_MIG_DATA_WRITE, head, sizeof(head), data, size);
            if (++inflight == window) {
                recv_reply(VU_MIG_DATA_WRITE);
                inflight--;
            }
        }
        while (inflight > 0) {
            recv_reply(VU_MIG_DATA_WRITE);
            inflight--;
        }
        moved = total;
    } else {
        int ended = 0;
        while (!ended || inflight > 0) {
            while (!ended && inflight < window) {
                uint32_t head[2] = {(uint32_t)(8 + size), (uint32_t)size};
                send_msg(VU_MIG_DATA_READ, head, sizeof(head), NULL, 0);
                inflight++;
            }
            recv_reply(VU_MIG_DATA_READ);
            inflight--;
            uint32_t got = ((uint32_t *)rbuf)[1];
            moved += got;
            if (got == 0)
                ended = 1;
        }
    }
    double dt = vu_now() - t0;
    set_state(VU_STOP);
    printf("{\"mib_s\": %.1f, \"seconds\": %.4f, \"bytes\": %zu}\n", moved / dt / 1048576.0, dt,
           moved);
    return 0;
}
