/*
 * The C side of benchmarks/vfio_user_server.py: a libvfio-user server whose BAR0 answers
 * 4-byte reads, and whose BAR0 write of a u32 K does K DMA reads of 4 KiB at the first
 * DMA region (vfu_sgl_read: DMA_READ messages to the client) before it replies.
 *
 *     bench_server SOCKPATH
 */
#include <err.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "libvfio-user.h"

static uint64_t dma_iova;
static int dma_mapped;

static ssize_t
bar0_access(vfu_ctx_t *ctx, char *const buf, size_t count, loff_t offset, const bool is_write)
{
    (void)offset;
    if (!is_write) {
        memset(buf, 0x5a, count);
        return count;
    }
    uint32_t k = 0;
    memcpy(&k, buf, count < sizeof(k) ? count : sizeof(k));
    dma_sg_t *sg = alloca(dma_sg_size());
    static char data[4096];
    for (uint32_t i = 0; i < k; i++) {
        if (!dma_mapped ||
            vfu_addr_to_sgl(ctx, (vfu_dma_addr_t)(uintptr_t)dma_iova, sizeof(data), sg, 1, PROT_READ) < 0 ||
            vfu_sgl_read(ctx, sg, 1, data) < 0) {
            return -1;
        }
    }
    return count;
}

static void
dma_register(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    (void)ctx;
    dma_iova = (uint64_t)(uintptr_t)info->iova.iov_base;
    dma_mapped = 1;
}

static void
dma_unregister(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    (void)ctx;
    (void)info;
    dma_mapped = 0;
}

int
main(int argc, char *argv[])
{
    if (argc != 2) {
        errx(EXIT_FAILURE, "usage: %s SOCKPATH", argv[0]);
    }
    vfu_ctx_t *ctx = vfu_create_ctx(VFU_TRANS_SOCK, argv[1], 0, NULL, VFU_DEV_TYPE_PCI);
    if (ctx == NULL ||
        vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0) < 0 ||
        vfu_setup_region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, 4096, &bar0_access,
                         VFU_REGION_FLAG_RW, NULL, 0, -1, 0) < 0 ||
        vfu_setup_device_dma(ctx, &dma_register, &dma_unregister) < 0 ||
        vfu_realize_ctx(ctx) < 0 || vfu_attach_ctx(ctx) < 0) {
        err(EXIT_FAILURE, "failed to set up the device");
    }
    int ret;
    do {
        ret = vfu_run_ctx(ctx);
    } while (ret == 0 || (ret == -1 && errno == EINTR));
    vfu_destroy_ctx(ctx);
    return 0;
}
