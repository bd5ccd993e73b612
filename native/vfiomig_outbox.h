/*
 * vfiomig_outbox - the sender's channel queue of vfiomig._core._outbox.Outbox in plain C.
 *
 * A ring of packets, each its 288-byte header (multifd device-state header, VFIO packet
 * header) and a pointer to its data, which stays where the caller put it (the CPython glue
 * keeps its owner alive through the opaque owner pointer).  vfm_outbox_iov lays the
 * unwritten bytes of the first packets out as iovecs for one sendmsg; vfm_outbox_advance
 * drops the packets a write completed and hands each owner back to a release callback.
 * Headers are built here too, from a prefix made once per device.
 */
#ifndef VFIOMIG_OUTBOX_H
#define VFIOMIG_OUTBOX_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define VFM_DEVICE_HEADER_SIZE 276u
#define VFM_PACKET_HEADER_SIZE 288u /* + the VFIO header: version, idx, flags */
#define VFM_HEADER_PREFIX_SIZE 268u /* magic, version, flags, idstr[256] */
#define VFM_IDSTR_SIZE 256u

struct vfm_out_packet {
    void *owner;               /* released through vfm_outbox_advance's callback */
    long *pins; /* a count this packet holds one of while queued (its buffer's), or NULL */
    const unsigned char *data; /* len bytes after the header */
    size_t len;
    size_t off; /* where data starts in its owner (for views of it) */
    unsigned char hdr[VFM_PACKET_HEADER_SIZE];
};

struct vfm_outbox {
    struct vfm_out_packet *ring;
    size_t cap, head, count; /* count packets from ring[head], wrapping at cap */
    size_t done;             /* bytes of the head packet already written */
    uint64_t queued_bytes, sent_bytes, sent_packets;
};

/* A device's header prefix: magic, version, the device-state flag, idstr NUL-padded
 * (len < VFM_IDSTR_SIZE, checked by the caller). */
void vfm_header_prefix(unsigned char prefix[VFM_HEADER_PREFIX_SIZE], const char *idstr,
                       size_t len);

/* A whole packet header from the prefix: instance and next_packet_size (12 + size)
 * big-endian, then the VFIO header (version 0, idx, flags) big-endian or, with host, in
 * host order. */
void vfm_header_build(unsigned char hdr[VFM_PACKET_HEADER_SIZE],
                      const unsigned char prefix[VFM_HEADER_PREFIX_SIZE], uint32_t instance,
                      uint32_t size, uint32_t idx, uint32_t flags, int host);

/* The slot of a new packet at the tail (its fields the caller's to fill), or NULL when
 * memory ran out.  The caller then calls vfm_outbox_commit. */
struct vfm_out_packet *vfm_outbox_push(struct vfm_outbox *ob);
void vfm_outbox_commit(struct vfm_outbox *ob);

/* The i-th queued packet (0 = head). */
struct vfm_out_packet *vfm_outbox_at(const struct vfm_outbox *ob, size_t i);

/* Wire bytes of the head packet not yet written (0: empty). */
size_t vfm_outbox_head_size(const struct vfm_outbox *ob);

/* How many whole packets from the head fit in max_bytes of wire bytes (the head's part
 * already written not counted); *bytes gets their wire bytes. */
size_t vfm_outbox_fits(const struct vfm_outbox *ob, uint64_t max_bytes, uint64_t *bytes);

/* Up to max_iov iovecs covering the unwritten bytes of the first max_packets packets
 * (max_packets 0: all); returns how many were filled. */
size_t vfm_outbox_iov(const struct vfm_outbox *ob, struct iovec *iov, size_t max_iov,
                      size_t max_packets);

/* n bytes (at most queued_bytes) were written: drop the completed packets, calling
 * release(owner) for each; returns how many were completed. */
size_t vfm_outbox_advance(struct vfm_outbox *ob, size_t n, void (*release)(void *owner));

/* Drop every packet (release each owner) and free the ring. */
void vfm_outbox_clear(struct vfm_outbox *ob, void (*release)(void *owner));

#endif /* VFIOMIG_OUTBOX_H */
