/* glue_block.c - the receive blocks of the framers (see Block in glue.h): memory, the
 * pool, the views, the live bytes and the budget charge of a retired block, and the room
 * a framer makes in its block (vfiomig_framer_make_room: grown, compacted, or retired).
 *
 * A Block is exported only through vfiomig_block_view (armed for one export); any other
 * request for its buffer (memoryview(view.obj)) is refused, so every packet view is one
 * of ours and its bytes count as live until it is released. */
#include "glue.h"

/* Blocks of the common size freed while their memory is warm: reused by the next block
 * instead of a fresh allocation that the kernel would fault in again page by page. */
#define POOL_MAX 8
#define POOL_CAP (2 * 1024 * 1024)
static uint8_t *pool[POOL_MAX];
static int npool;

Block *vfiomig_block_new(size_t cap)
{
    Block *b = PyObject_New(Block, &vfiomig_BlockType);
    if (!b)
        return NULL;
    if (cap == POOL_CAP && npool)
        b->data = pool[--npool];
    else
        b->data = PyMem_RawMalloc(cap ? cap : 1);
    if (!b->data) {
        PyObject_Free(b);
        PyErr_NoMemory();
        return NULL;
    }
    b->cap = cap;
    b->live = 0;
    b->budget = NULL;
    b->retired = b->charged = 0;
    b->x_off = b->x_len = 0;
    b->x_armed = b->x_packet = 0;
    return b;
}

static void block_dealloc(Block *b)
{
    if (b->charged) { /* no view is left: its whole cap was slack */
        b->budget->slack -= (long long)b->cap;
    }
    Py_CLEAR(b->budget);
    if (b->cap == POOL_CAP && npool < POOL_MAX)
        pool[npool++] = b->data;
    else
        PyMem_RawFree(b->data);
    PyObject_Free(b);
}

/* A retired block's charge is cap - live: it follows every change of live. */
static void block_live(Block *b, uint64_t len)
{
    b->live += (long long)len;
    if (b->charged)
        b->budget->slack -= (long long)len;
}

static int block_getbuffer(Block *b, Py_buffer *view, int flags)
{
    if (!b->x_armed) {
        PyErr_SetString(PyExc_BufferError, "a receive block is exported only by its framer");
        view->obj = NULL;
        return -1;
    }
    int readonly = b->x_packet;
    if (readonly && (flags & PyBUF_WRITABLE) == PyBUF_WRITABLE) {
        PyErr_SetString(PyExc_BufferError, "packet views are read-only");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)b, b->data + b->x_off, (Py_ssize_t)b->x_len,
                          readonly, flags) < 0)
        return -1;
    view->internal = b->x_packet ? (void *)1 : NULL;
    b->x_armed = 0;
    if (b->x_packet)
        block_live(b, b->x_len);
    return 0;
}

static void block_unlive(Block *b, uint64_t len)
{
    b->live -= (long long)len;
    if (b->charged) {
        b->budget->slack += (long long)len;
        budget_peak(b->budget);
    }
}

static void block_releasebuffer(Block *b, Py_buffer *view)
{
    if (view->internal)
        block_unlive(b, (uint64_t)view->len);
}

void vfiomig_block_hold(Block *b, uint64_t len)
{
    Py_INCREF(b);
    block_live(b, len);
}

void vfiomig_block_release(Block *b, uint64_t len)
{
    block_unlive(b, len);
    Py_DECREF(b);
}

PyObject *vfiomig_block_view(Block *b, size_t off, size_t len, int packet)
{
    b->x_off = off;
    b->x_len = len;
    b->x_packet = packet;
    b->x_armed = 1;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)b);
    b->x_armed = 0;
    return mv;
}

void vfiomig_block_retire(Block *b)
{
    b->retired = 1;
    if (b->budget && Py_REFCNT(b) > 1) { /* the caller's reference is about to go */
        b->charged = 1;
        b->budget->slack += (long long)b->cap - b->live;
        budget_peak(b->budget);
    }
}

static PyBufferProcs block_as_buffer = {
    .bf_getbuffer = (getbufferproc)block_getbuffer,
    .bf_releasebuffer = (releasebufferproc)block_releasebuffer,
};

PyTypeObject vfiomig_BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.Block",
    .tp_doc = "A framer's receive block (packet views hold it; not for direct use).",
    .tp_basicsize = sizeof(Block),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)block_dealloc,
    .tp_as_buffer = &block_as_buffer,
};

/* -- a framer's room in its block --------------------------------------------------- */

/* Here rather than in glue_framer.c: the framer's ingress and its pump both ask for room,
 * and this is where a block holding packets is retired and its tail moved to a new one. */
int vfiomig_framer_make_room(Framer *self, size_t n)
{
    Block *b = self->blk;
    if (self->f.end + n <= b->cap)
        return 0;
    size_t live = self->f.end - self->f.pos;
    if (live + n > (size_t)PY_SSIZE_T_MAX) {
        PyErr_NoMemory();
        return -1;
    }
    if (Py_REFCNT(b) > 1) { /* packets of it are held: move the tail to a new block */
        Block *nb = vfiomig_block_new(live + n > self->block_size ? live + n : self->block_size);
        if (!nb)
            return -1;
        memcpy(nb->data, b->data + self->f.pos, live);
        vfiomig_block_retire(b);
        self->blk = nb;
        Py_DECREF(b);
        self->f.pos = 0;
        self->f.end = live;
        return 0;
    }
    if (self->f.pos) {
        memmove(b->data, b->data + self->f.pos, live);
        self->f.pos = 0;
        self->f.end = live;
    }
    if (live + n > b->cap) {
        uint8_t *d = PyMem_RawRealloc(b->data, live + n);
        if (!d) {
            PyErr_NoMemory();
            return -1;
        }
        b->data = d;
        b->cap = live + n;
    }
    return 0;
}
