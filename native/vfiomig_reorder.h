/*
 * vfiomig_reorder - the bookkeeping of vfiomig._core._reorder.ReorderBuffer in plain C.
 *
 * Slots are keyed by the peer's idx in an open-addressing table whose size follows the
 * number of packets actually accepted, never an idx value: a peer that sends idx 0 and idx
 * 4e9 costs two slots.  A slot's data is an opaque pointer owned by the caller (the CPython
 * glue keeps a reference there); NULL means the packet was accepted but not delivered yet.
 *
 * vfm_reorder_check mirrors ReorderBuffer._check: same order of checks, and it reports
 * which rule broke; the glue turns that into the reference's error text.
 */
#ifndef VFIOMIG_REORDER_H
#define VFIOMIG_REORDER_H

#include <stddef.h>
#include <stdint.h>

#define VFM_VFIO_FLAG_CONFIG 1u
#define VFM_IDX_INVALID 0xFFFFFFFFu

struct vfm_slot {
    uint32_t idx;
    uint32_t used;
    uint64_t size;
    void *data;       /* NULL while the packet's data is in flight */
    uint64_t off;     /* in_block: the data is at off in the block that data points to */
    uint32_t in_block;
};

struct vfm_reorder {
    int64_t next_idx;     /* next data idx to hand to the loader */
    int64_t config_idx;   /* -1: no config packet accepted yet */
    int64_t max_data_idx; /* -1: no data packet accepted yet */
    uint64_t delivered;   /* slots holding data (always data idx in [next_idx, end)) */
    struct vfm_slot *tab;
    size_t cap;           /* a power of two, 0 before the first insert */
    size_t count;
};

enum vfm_rerr {
    VFM_R_OK,
    VFM_R_VERSION,
    VFM_R_INVALID,
    VFM_R_WRITTEN,
    VFM_R_RECEIVED,
    VFM_R_SECOND_CONFIG,
    VFM_R_CONFIG_BELOW,
    VFM_R_DATA_ABOVE
};

void vfm_reorder_init(struct vfm_reorder *r);
void vfm_reorder_free(struct vfm_reorder *r);
enum vfm_rerr vfm_reorder_check(const struct vfm_reorder *r, uint32_t version, uint32_t idx,
                                uint32_t flags);
struct vfm_slot *vfm_slot_find(const struct vfm_reorder *r, uint32_t idx);
/* Add an in-flight slot for idx (not present); NULL when out of memory. */
struct vfm_slot *vfm_slot_add(struct vfm_reorder *r, uint32_t idx, uint64_t size);
void vfm_slot_remove(struct vfm_reorder *r, struct vfm_slot *s);

#endif
