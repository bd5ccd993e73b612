/* A libvfio-user device for the benchmarks: its migration stream has no fixed size.
 *
 *   vu_server SOCK READ_TOTAL
 *
 * write_data copies each MIG_DATA_WRITE into a 4 MiB ring (a device that stores its
 * state) and takes every byte; read_data returns READ_TOTAL bytes in STOP_COPY, then 0.
 * Serves one client and exits when it disconnects (like libvfio-user's samples/server),
 * printing {"written": N, "read": N}.
 */
#include <libvfio-user.h>

#include "vu_common.h"

#define RING (4u << 20)

static char ring[RING];
static uint64_t written, readn, read_total;

static int transition(vfu_ctx_t *ctx, vfu_migr_state_t state)
{
    (void)ctx;
    if (state == VFU_MIGR_STATE_STOP_AND_COPY)
        readn = 0;
    return 0;
}

static ssize_t read_data(vfu_ctx_t *ctx, void *buf, uint64_t size)
{
    (void)ctx;
    uint64_t n = read_total - readn < size ? read_total - readn : size;
    for (uint64_t done = 0; done < n;) {
        uint64_t off = (readn + done) % RING, k = RING - off < n - done ? RING - off : n - done;
        memcpy((char *)buf + done, ring + off, k);
        done += k;
    }
    readn += n;
    return (ssize_t)n;
}

static ssize_t write_data(vfu_ctx_t *ctx, void *buf, uint64_t size)
{
    (void)ctx;
    for (uint64_t done = 0; done < size;) {
        uint64_t off = (written + done) % RING, k = RING - off < size - done ? RING - off : size - done;
        memcpy(ring + off, (char *)buf + done, k);
        done += k;
    }
    written += size;
    return (ssize_t)size;
}

static int reset(vfu_ctx_t *ctx, vfu_reset_type_t type)
{
    (void)ctx;
    (void)type;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        errx(2, "usage: vu_server SOCK READ_TOTAL");
    read_total = vu_parse_size(argv[2]);
    memset(ring, 0xa5, RING);
    const vfu_migration_callbacks_t cbs = {
        .version = VFU_MIGR_CALLBACKS_VERS,
        .transition = transition,
        .read_data = read_data,
        .write_data = write_data,
    };
    vfu_ctx_t *ctx = vfu_create_ctx(VFU_TRANS_SOCK, argv[1], 0, NULL, VFU_DEV_TYPE_PCI);
    if (ctx == NULL)
        err(1, "vfu_create_ctx");
    if (vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0) < 0)
        err(1, "vfu_pci_init");
    if (vfu_setup_device_migration_callbacks(ctx, &cbs) < 0)
        err(1, "migration callbacks");
    if (vfu_setup_device_reset_cb(ctx, reset) < 0)
        err(1, "reset callback");
    if (vfu_realize_ctx(ctx) < 0)
        err(1, "vfu_realize_ctx");
    if (vfu_attach_ctx(ctx) < 0)
        err(1, "vfu_attach_ctx");
    int ret;
    do {
        ret = vfu_run_ctx(ctx);
    } while (ret >= 0 || errno == EINTR);
    int saved = errno;
    printf("{\"written\": %llu, \"read\": %llu}\n", (unsigned long long)written,
           (unsigned long long)readn);
    fflush(stdout);
    vfu_destroy_ctx(ctx);
    return saved == ENOTCONN || saved == ESHUTDOWN ? 0 : 1;
}
