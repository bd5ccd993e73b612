/* glue_compact.c - compaction: the packets that sparse retired receive blocks still hold
 * are copied into bytes of their own, which frees the blocks, so that a straggler cannot
 * hold a block's worth of memory against the budget (ARCHITECTURE.md, Memory). It works
 * over a budget's members (glue_budget.c keeps the list) and their reorder slots
 * (glue_reorder.c fills them; an offer that does not fit asks for a compaction). */
#include "glue.h"

/* Copy the packets of sparse retired blocks (every retired block if all) out of them. */
static int reorder_compact(Reorder *self, int all)
{
    for (size_t i = 0; i < self->r.cap; i++) {
        struct vfm_slot *s = &self->r.tab[i];
        if (!s->used || !s->in_block)
            continue;
        Block *b = (Block *)s->data;
        /* sparse blocks; every retired block when their free parts alone fill the budget */
        if (!b->charged || (2 * b->live > (long long)b->cap && !all))
            continue;
        PyObject *copy =
            PyBytes_FromStringAndSize((const char *)b->data + s->off, (Py_ssize_t)s->size);
        if (!copy)
            return -1;
        slot_drop_data(s); /* the block's live bytes drop; its last holder frees it */
        s->data = copy;
    }
    return 0;
}

int vfiomig_budget_compact(Budget *b)
{
    /* A compaction scans every queued packet: it runs again only once the slack grew by
     * an eighth of the limit since the last one (blocks retired, packets written from
     * them), not on every refused offer of a channel waiting for room. */
    if (b->slack < b->compacted_at)
        b->compacted_at = b->slack;
    if (b->compacted_at >= 0 && b->slack - b->compacted_at < (b->limit + 7) / 8)
        return 0;
    int all = b->slack > b->limit;
    for (Py_ssize_t i = 0; i < b->nmembers; i++)
        if (reorder_compact((Reorder *)b->members[i], all) < 0)
            return -1;
    b->compacted_at = b->slack;
    return 0;
}
