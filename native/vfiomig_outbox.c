/* vfiomig_outbox.c - the sender's channel queue and packet headers (see vfiomig_outbox.h). */
#include "vfiomig_outbox.h"

#include <stdlib.h>
#include <string.h>

#define VFM_MULTIFD_MAGIC 0x11223344u
#define VFM_MULTIFD_VERSION 1u
#define VFM_FLAG_DEVICE_STATE 0x40u

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

void vfm_header_prefix(unsigned char prefix[VFM_HEADER_PREFIX_SIZE], const char *idstr,
                       size_t len)
{
    put_be32(prefix, VFM_MULTIFD_MAGIC);
    put_be32(prefix + 4, VFM_MULTIFD_VERSION);
    put_be32(prefix + 8, VFM_FLAG_DEVICE_STATE);
    memset(prefix + 12, 0, VFM_IDSTR_SIZE);
    memcpy(prefix + 12, idstr, len);
}

void vfm_header_build(unsigned char hdr[VFM_PACKET_HEADER_SIZE],
                      const unsigned char prefix[VFM_HEADER_PREFIX_SIZE], uint32_t instance,
                      uint32_t size, uint32_t idx, uint32_t flags, int host)
{
    memcpy(hdr, prefix, VFM_HEADER_PREFIX_SIZE);
    put_be32(hdr + 268, instance);
    put_be32(hdr + 272, 12u + size);
    if (host) {
        uint32_t v[3] = {0, idx, flags};
        memcpy(hdr + VFM_DEVICE_HEADER_SIZE, v, sizeof(v));
    } else {
        put_be32(hdr + VFM_DEVICE_HEADER_SIZE, 0);
        put_be32(hdr + VFM_DEVICE_HEADER_SIZE + 4, idx);
        put_be32(hdr + VFM_DEVICE_HEADER_SIZE + 8, flags);
    }
}

struct vfm_out_packet *vfm_outbox_at(const struct vfm_outbox *ob, size_t i)
{
    size_t k = ob->head + i;
    return &ob->ring[k >= ob->cap ? k - ob->cap : k];
}

struct vfm_out_packet *vfm_outbox_push(struct vfm_outbox *ob)
{
    if (ob->count == ob->cap) {
        size_t cap = ob->cap ? 2 * ob->cap : 16;
        struct vfm_out_packet *ring = malloc(cap * sizeof(*ring));
        if (!ring)
            return NULL;
        /* Unwrap into the new ring: the packets keep their order from index 0. */
        for (size_t i = 0; i < ob->count; i++)
            ring[i] = *vfm_outbox_at(ob, i);
        free(ob->ring);
        ob->ring = ring;
        ob->cap = cap;
        ob->head = 0;
    }
    return vfm_outbox_at(ob, ob->count);
}

void vfm_outbox_commit(struct vfm_outbox *ob)
{
    struct vfm_out_packet *p = vfm_outbox_at(ob, ob->count);
    ob->count++;
    ob->queued_bytes += VFM_PACKET_HEADER_SIZE + p->len;
}

size_t vfm_outbox_head_size(const struct vfm_outbox *ob)
{
    if (!ob->count)
        return 0;
    return VFM_PACKET_HEADER_SIZE + vfm_outbox_at(ob, 0)->len - ob->done;
}

size_t vfm_outbox_fits(const struct vfm_outbox *ob, uint64_t max_bytes, uint64_t *bytes)
{
    uint64_t total = 0;
    size_t n = 0;

    for (; n < ob->count; n++) {
        uint64_t size = VFM_PACKET_HEADER_SIZE + vfm_outbox_at(ob, n)->len - (n ? 0 : ob->done);
        if (total + size > max_bytes)
            break;
        total += size;
    }
    *bytes = total;
    return n;
}

size_t vfm_outbox_iov(const struct vfm_outbox *ob, struct iovec *iov, size_t max_iov,
                      size_t max_packets)
{
    size_t n = 0, skip = ob->done;
    size_t packets = max_packets && max_packets < ob->count ? max_packets : ob->count;

    for (size_t i = 0; i < packets && n + 2 <= max_iov; i++) {
        struct vfm_out_packet *p = vfm_outbox_at(ob, i);
        if (skip < VFM_PACKET_HEADER_SIZE) {
            iov[n].iov_base = p->hdr + skip;
            iov[n++].iov_len = VFM_PACKET_HEADER_SIZE - skip;
            skip = 0;
        } else {
            skip -= VFM_PACKET_HEADER_SIZE;
        }
        if (p->len > skip) {
            iov[n].iov_base = (void *)(p->data + skip);
            iov[n++].iov_len = p->len - skip;
        }
        skip = 0;
    }
    return n;
}

size_t vfm_outbox_advance(struct vfm_outbox *ob, size_t n, void (*release)(void *owner))
{
    size_t done = ob->done + n, completed = 0;

    ob->queued_bytes -= n;
    ob->sent_bytes += n;
    while (ob->count) {
        struct vfm_out_packet *p = &ob->ring[ob->head];
        size_t size = VFM_PACKET_HEADER_SIZE + p->len;
        if (done < size)
            break;
        done -= size;
        if (p->pins)
            (*p->pins)--;
        release(p->owner);
        ob->head = ob->head + 1 == ob->cap ? 0 : ob->head + 1;
        ob->count--;
        completed++;
    }
    ob->done = done;
    ob->sent_packets += completed;
    return completed;
}

void vfm_outbox_clear(struct vfm_outbox *ob, void (*release)(void *owner))
{
    while (ob->count) {
        struct vfm_out_packet *p = &ob->ring[ob->head];
        if (p->pins)
            (*p->pins)--;
        release(p->owner);
        ob->head = ob->head + 1 == ob->cap ? 0 : ob->head + 1;
        ob->count--;
    }
    free(ob->ring);
    ob->ring = NULL;
    ob->cap = ob->head = ob->done = 0;
    ob->queued_bytes = 0;
}
