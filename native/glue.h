/*
 * glue.h - what the CPython glue files (glue_*.c, module.c) share: the object structs of
 * vfiomig._native's types, their type objects, the reference's Python objects imported at
 * module init, and the functions one type's glue calls in another's.
 *
 * Same constructors, methods, properties, events and error text as the pure-Python
 * reference vfiomig._core (the typed contract is vfiomig/_native.pyi).  Event classes,
 * NEED_DATA, the error classes and the handshake check are the reference's own objects,
 * imported at module init, so both implementations return the same types and the handshake
 * errors are literally the same code.  Only the hot paths are C.
 *
 * Every name defined in one glue file and used in another starts with vfiomig_; the rest
 * is static.  The plain-C core (vfiomig_core, vfiomig_reorder: vfm_ names) has no Python.
 */
#ifndef VFIOMIG_GLUE_H
#define VFIOMIG_GLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <sys/uio.h>

#include "vfiomig_core.h"
#include "vfiomig_outbox.h"
#include "vfiomig_reorder.h"

/* -- the reference's objects and interned names (set by glue_py.c at import) ---------- */

struct vfiomig_py {
    PyObject *need_data, *hello, *header, *ram, *end, *decode_handshake;
    PyObject *vfio_error, *packet_error, *incomplete_error, *config_error;
    PyObject *ready, *statistics, *check_config_blob;
    PyObject *str_channel_id, *str_idstr, *str_instance, *str_version, *str_idx, *str_flags,
        *str_size, *str_uuid, *str_channels, *str_device;
};
extern struct vfiomig_py vfiomig_py;
/* glue_py.c: fill vfiomig_py (module init, before anything uses it); 0, or -1 with an
 * error. */
int vfiomig_py_import(void);

/* -- the types (module.c readies them and adds them to the module) -------------------- */

extern PyTypeObject vfiomig_BudgetType;     /* glue_budget.c */
extern PyTypeObject vfiomig_ReorderType;    /* glue_reorder.c */
extern PyTypeObject vfiomig_FramerType;     /* glue_framer.c */
extern PyTypeObject vfiomig_PipeWriterType; /* glue_pipe_writer.c */
extern PyTypeObject vfiomig_BlockType;      /* glue_block.c */
extern PyTypeObject vfiomig_RunType;        /* glue_run.c */
extern PyTypeObject vfiomig_SendBufferType; /* glue_send_buffer.c */
extern PyTypeObject vfiomig_HeadersType;    /* glue_send_buffer.c: PacketHeaders */
extern PyTypeObject vfiomig_OutboxType;     /* glue_outbox.c */
extern PyTypeObject vfiomig_SendJobType;    /* glue_sendjob.c */

/* -- Budget ------------------------------------------------------------------------- */

/* queued: payload bytes of the packets accepted and not yet written; slack: the rest of
 * the receive blocks that those packets pin (see Block); peak: of queued (the report's,
 * SPEC §2's rule), peak_pinned: of queued + slack (the memory).  members:
 * the ReorderBuffers on this budget (borrowed; each removes itself), for compaction. */
typedef struct {
    PyObject_HEAD
    long long limit, queued, slack, peak, peak_pinned;
    long long compacted_at; /* slack after the last compaction, -1 before the first */
    PyObject **members;
    Py_ssize_t nmembers, members_cap;
} Budget;

static inline void budget_peak(Budget *b)
{
    if (b->queued + b->slack > b->peak_pinned)
        b->peak_pinned = b->queued + b->slack;
}

static inline void budget_add(Budget *b, long long n)
{
    b->queued += n;
    if (b->queued > b->peak)
        b->peak = b->queued;
    budget_peak(b);
}

/* Whether n more bytes fit: the budget counts the memory pinned, not just the payload. */
static inline int budget_fits(const Budget *b, long long n)
{
    return b->queued + b->slack + n <= b->limit;
}

static inline int budget_release(Budget *b, long long n)
{
    b->queued -= n;
    if (b->queued < 0) {
        PyErr_SetString(PyExc_AssertionError, "budget released more than it held");
        return -1;
    }
    return 0;
}

/* glue_budget.c: add or remove a ReorderBuffer from the members (0, or -1 with an error). */
int vfiomig_budget_join(Budget *b, PyObject *reorder);
void vfiomig_budget_leave(Budget *b, PyObject *reorder);
/* glue_compact.c: copy the packets out of the members' sparse retired blocks, or out of all
 * retired blocks when their free parts alone exceed the limit (0, or -1 with an error). */
int vfiomig_budget_compact(Budget *b);

/* -- Block: a receive block whose packets are handed on without a copy ----------------
 *
 * A channel's framer receives into its current block; a packet whose data is whole in it
 * goes to the reorder buffer as a reference to the block and the packet's offset (the
 * slot holds the block), and leaves it as a read-only memoryview of those bytes (the view
 * holds the block).  While anything but the framer holds a block, its bytes never move:
 * when the framer needs room it retires the block and moves the unparsed tail to a fresh
 * one.  A retired block charges its budget with what its live packets do not cover
 * (cap - live, Budget.slack) until the last reference is gone; it is then freed (or kept
 * in a small pool). */
typedef struct {
    PyObject_HEAD
    uint8_t *data;
    size_t cap;
    long long live;       /* bytes of the packets in reorder slots and packet views */
    Budget *budget;       /* where its packets went (the first), charged once retired */
    int retired, charged;
    size_t x_off, x_len;  /* the range the armed export gives */
    int x_armed, x_packet;
} Block;

/* glue_block.c: a new block of cap bytes (contents undefined), or NULL with an error. */
Block *vfiomig_block_new(size_t cap);
/* A memoryview of [off, off + len): read-only and counted as live for a packet view,
 * writable otherwise; or NULL with an error. */
PyObject *vfiomig_block_view(Block *b, size_t off, size_t len, int packet);
/* The framer lets go of b (its reference is dropped by the caller). */
void vfiomig_block_retire(Block *b);
/* A reorder slot takes (hold) or lets go of (release, dropping the reference it held)
 * len bytes of b. */
void vfiomig_block_hold(Block *b, uint64_t len);
void vfiomig_block_release(Block *b, uint64_t len);

/* -- Run: a take_ready batch, its packets pinned in place (glue_run.c) ---------------- */

typedef struct vfiomig_run Run;
/* A run with room for cap packets, or NULL with an error. */
Run *vfiomig_run_new(Py_ssize_t cap);
/* Move a slot's data (block hold or object) into the run; 0, or -1 with an error. */
int vfiomig_run_take_slot(Run *r, struct vfm_slot *s);
/* What is left to write from the run's cursor, as a new PyMem array; 0 or -1. */
int vfiomig_run_iov(Run *r, struct iovec **iov, size_t *niov);
/* A writer thread has the run's iovecs: release() refuses until it is done. */
void vfiomig_run_set_busy(Run *r, int busy);

/* -- the sending side: pooled buffers, packet headers, channel outboxes --------------- */

/* A buffer a source reads into (writable buffer protocol); pins: queued packets whose
 * data is in it (busy while > 0). */
typedef struct {
    PyObject_HEAD
    unsigned char *mem;
    Py_ssize_t size, exports;
    long pins; /* counted by the outbox's packets (vfm_out_packet.pins) */
} SendBuffer;

/* One channel's queue of packets (vfiomig_outbox.h); a packet's owner is a strong
 * reference to its SendBuffer (pinned) or to a memoryview holding its data's export. */
typedef struct {
    PyObject_HEAD
    struct vfm_outbox ob;
    int sending; /* inside send() without the GIL: the queue must not change */
} Outbox;

/* glue_outbox.c: queue a packet of len bytes at data (in owner, at off) with its header
 * built by the caller through the returned slot's hdr; takes a new reference to owner,
 * and one unit of *pins (a SendBuffer's pin count; NULL for none) until the packet is
 * sent or dropped.  The outbox knows no buffer type.  The slot, or NULL with an error. */
struct vfm_out_packet *vfiomig_outbox_push(Outbox *self, PyObject *owner, long *pins,
                                           const unsigned char *data, size_t off, size_t len);
void vfiomig_outbox_commit(Outbox *self);

/* -- ReorderBuffer ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    struct vfm_reorder r;
    PyObject *name;
    Budget *budget;
    PyObject *config;  /* bytes, or NULL */
    PyObject *precopy; /* list of chunks written before any multifd data */
    PyObject *error;   /* the poisoning exception, or NULL */
    int gate_open, loaded, multifd_taken;
    double starved_seconds;
    long long backlog_cap; /* > 0: offers refused past this many queued bytes */
    long long queued_packets, queued_bytes, peak_queued, received, written_bytes,
        written_packets, precopy_bytes, unwritten;
} Reorder;

/* glue_reorder.c: ReorderBuffer.offer: 1 accepted, 0 refused for budget, -1 error raised. */
int vfiomig_reorder_offer(Reorder *self, uint32_t version, uint32_t idx, uint32_t flags,
                          uint64_t size);
/* glue_reorder.c: ReorderBuffer.deliver: 0, or -1 with an error raised.  Does not steal
 * data. */
int vfiomig_reorder_deliver(Reorder *self, uint32_t idx, PyObject *data, Py_ssize_t len);
/* deliver for a packet whose len bytes are at off in block b (the slot holds b). */
int vfiomig_reorder_deliver_block(Reorder *self, uint32_t idx, Block *b, size_t off,
                                  uint64_t len);

/* Let go of a slot's data: a packet's own object, or its bytes in a block (glue_reorder.c
 * when it drops its slots, glue_compact.c when it copies a packet out of its block). */
static inline void slot_drop_data(struct vfm_slot *s)
{
    PyObject *data = (PyObject *)s->data;
    if (!data)
        return;
    s->data = NULL;
    if (s->in_block) {
        s->in_block = 0;
        vfiomig_block_release((Block *)data, s->size);
    } else {
        Py_DECREF(data);
    }
}

/* Raise the exception that poisoned the buffer again; -1. */
static inline int reorder_reraise(Reorder *self)
{
    PyErr_SetObject((PyObject *)Py_TYPE(self->error), self->error);
    return -1;
}

/* glue_reorder_take.c: the loader's side (methods has_ready, take_ready, written and
 * mark_loaded) and whether the device can finish (config last, everything written). */
PyObject *vfiomig_Reorder_has_ready(Reorder *self, PyObject *ignored);
PyObject *vfiomig_Reorder_take_ready(Reorder *self, PyObject *ignored);
PyObject *vfiomig_Reorder_written(Reorder *self, PyObject *arg);
PyObject *vfiomig_Reorder_mark_loaded(Reorder *self, PyObject *ignored);
int vfiomig_reorder_finishable(Reorder *self);

/* glue_reorder_report.c: the methods missing, incomplete_error and statistics. */
PyObject *vfiomig_Reorder_missing(Reorder *self, PyObject *args, PyObject *kwds);
PyObject *vfiomig_Reorder_incomplete_error(Reorder *self, PyObject *why);
PyObject *vfiomig_Reorder_statistics(Reorder *self, PyObject *ignored);

/* -- Framer ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    struct vfm_framer f;
    Block *blk;           /* the current receive block */
    size_t block_size;    /* the size of a new block */
    uint64_t big;         /* pump_recv: packets this large get their own buffer */
    size_t recv_chunk;    /* pump_recv: bytes asked of the socket at a time */
    PyObject *uuid;
    PyObject *channels;
    PyObject *label;
    PyObject *channel_id; /* None until the handshake */
    PyObject *current;    /* PacketHeader of the packet being read, or NULL */
    PyObject *error;      /* the poisoning exception, or NULL */
    PyObject *idstr;      /* the last idstr decoded, reused while the bytes repeat */
    char idstr_raw[VFM_IDSTR_SIZE];
    size_t idstr_len;
    PyObject *routes;     /* pump(): the routes dict of the cached route */
    Reorder *route_buf;   /* ... and the buffer of the last (idstr, instance) routed */
    char route_raw[VFM_IDSTR_SIZE];
    size_t route_len;
    uint32_t route_instance;
    PyObject *pending;    /* pump_recv(): bytearray of the accepted packet being received */
    Py_ssize_t pending_got;
    uint32_t pending_idx;
    Reorder *pending_buf; /* ... and the buffer it goes to */
    int last_big;         /* the last packet received that way was large (see pump_recv) */
    int pending_in_block; /* pump_recv(): the accepted packet's data comes into blk */
    uint64_t pending_size;
} Framer;

static inline uint8_t *framer_data(Framer *self)
{
    return self->blk->data;
}

/* glue_block.c: grow or compact the receive buffer so that n more bytes fit (a block whose
 * packets are held is retired and the unread tail moved to a new one); 0 or -1. */
int vfiomig_framer_make_room(Framer *self, size_t n);

/* glue_framer_events.c.  reraise, raise_truncated and error raise (the latter two poison
 * the framer) and return NULL; truncated poisons it and returns the StreamIncompleteError
 * unraised; idstr and packet return a new reference (the PacketHeader), or NULL. */
PyObject *vfiomig_framer_reraise(Framer *self);
PyObject *vfiomig_framer_truncated(Framer *self);
PyObject *vfiomig_framer_raise_truncated(Framer *self);
PyObject *vfiomig_framer_error(Framer *self, const struct vfm_out *o);
PyObject *vfiomig_framer_idstr(Framer *self, const struct vfm_out *o);
PyObject *vfiomig_framer_packet(Framer *self, const struct vfm_out *o);
PyObject *vfiomig_Framer_next_event(Framer *self, PyObject *ignored);

/* glue_framer_pump.c: the methods pump, pump_recv and defer_payload. */
PyObject *vfiomig_Framer_pump(Framer *self, PyObject *routes);
PyObject *vfiomig_Framer_pump_recv(Framer *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *vfiomig_Framer_defer_payload(Framer *self, PyObject *buf);

#endif
