/* vfiomig_reorder.c - see vfiomig_reorder.h.  Mirrors vfiomig/_core/_reorder.py. */
#include "vfiomig_reorder.h"

#include <stdlib.h>
#include <string.h>

void vfm_reorder_init(struct vfm_reorder *r)
{
    memset(r, 0, sizeof(*r));
    r->config_idx = -1;
    r->max_data_idx = -1;
}

void vfm_reorder_free(struct vfm_reorder *r)
{
    free(r->tab);
    r->tab = NULL;
    r->cap = r->count = 0;
}

enum vfm_rerr vfm_reorder_check(const struct vfm_reorder *r, uint32_t version, uint32_t idx,
                                uint32_t flags)
{
    if (version != 0)
        return VFM_R_VERSION;
    if (idx == VFM_IDX_INVALID)
        return VFM_R_INVALID;
    if ((int64_t)idx < r->next_idx)
        return VFM_R_WRITTEN;
    if (vfm_slot_find(r, idx) || (int64_t)idx == r->config_idx)
        return VFM_R_RECEIVED;
    if (flags & VFM_VFIO_FLAG_CONFIG) {
        if (r->config_idx >= 0)
            return VFM_R_SECOND_CONFIG;
        if ((int64_t)idx < r->max_data_idx)
            return VFM_R_CONFIG_BELOW;
    } else if (r->config_idx >= 0 && (int64_t)idx > r->config_idx) {
        return VFM_R_DATA_ABOVE;
    }
    return VFM_R_OK;
}

static size_t vfm_hash(uint32_t idx, size_t cap)
{
    /* Fibonacci hashing: consecutive idx spread over the table. */
    return (size_t)(((uint64_t)idx * 0x9E3779B97F4A7C15ull) >> 32) & (cap - 1);
}

struct vfm_slot *vfm_slot_find(const struct vfm_reorder *r, uint32_t idx)
{
    if (!r->cap)
        return NULL;
    for (size_t i = vfm_hash(idx, r->cap);; i = (i + 1) & (r->cap - 1)) {
        struct vfm_slot *s = &r->tab[i];
        if (!s->used)
            return NULL;
        if (s->idx == idx)
            return s;
    }
}

static int vfm_grow(struct vfm_reorder *r)
{
    size_t cap = r->cap ? r->cap * 2 : 64;
    if (cap > SIZE_MAX / sizeof(struct vfm_slot))
        return -1;
    struct vfm_slot *tab = calloc(cap, sizeof(struct vfm_slot));
    if (!tab)
        return -1;
    for (size_t i = 0; i < r->cap; i++) {
        if (!r->tab[i].used)
            continue;
        size_t j = vfm_hash(r->tab[i].idx, cap);
        while (tab[j].used)
            j = (j + 1) & (cap - 1);
        tab[j] = r->tab[i];
    }
    free(r->tab);
    r->tab = tab;
    r->cap = cap;
    return 0;
}

struct vfm_slot *vfm_slot_add(struct vfm_reorder *r, uint32_t idx, uint64_t size)
{
    /* Load factor at most 1/2: the table grows with the packets held, not with idx. */
    if ((r->count + 1) * 2 > r->cap && vfm_grow(r) < 0)
        return NULL;
    size_t i = vfm_hash(idx, r->cap);
    while (r->tab[i].used)
        i = (i + 1) & (r->cap - 1);
    struct vfm_slot *s = &r->tab[i];
    s->idx = idx;
    s->used = 1;
    s->size = size;
    s->data = NULL;
    s->off = 0;
    s->in_block = 0;
    r->count++;
    return s;
}

void vfm_slot_remove(struct vfm_reorder *r, struct vfm_slot *s)
{
    /* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
    size_t mask = r->cap - 1, hole = (size_t)(s - r->tab);
    for (size_t j = (hole + 1) & mask; r->tab[j].used; j = (j + 1) & mask) {
        size_t home = vfm_hash(r->tab[j].idx, r->cap);
        /* Move j into the hole unless its home lies cyclically in (hole, j]. */
        int stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            r->tab[hole] = r->tab[j];
            hole = j;
        }
    }
    memset(&r->tab[hole], 0, sizeof(r->tab[hole]));
    r->count--;
}
