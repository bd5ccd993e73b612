/* glue_run.c - vfiomig._native.Run: one take_ready batch of in-order packets, written
 * without a Python object per packet.
 *
 * A Run takes over what the reorder slots held: a packet in a receive block keeps its
 * block pinned (the slot's hold moves to the run: the block's live bytes and so the budget's
 * slack stay exact), any other packet is pinned as a Py_buffer of its object.  The null,
 * fd and pipe sinks write it from C (write_to: one writev of up to IOV_MAX entries from the
 * run's cursor, the GIL released; PipeWriter takes its iovecs); any other sink sees a
 * sequence of chunks, each built when it is asked for (a read-only view of the block, which
 * pins it on its own, or the packet's object).  release() returns every pin at once; the
 * loader calls it once the batch is written, and a run being written cannot be released. */
#include "glue.h"

#include <errno.h>
#include <limits.h>
#include <sys/uio.h>

struct run_entry {
    Py_buffer v; /* block entries: v.obj is the Block (one reference), v.buf its bytes */
    int in_block;
};

struct vfiomig_run {
    PyObject_HEAD
    struct run_entry *e;
    Py_ssize_t n, cap;
    long long nbytes, done; /* done: bytes written through write_to (the cursor) */
    Py_ssize_t cur;         /* the cursor: entry cur, cur_off bytes into it */
    size_t cur_off;
    int busy;               /* write_to is running without the GIL */
    int released;
};

static void run_release_entries(Run *r)
{
    for (Py_ssize_t i = 0; i < r->n; i++) {
        struct run_entry *e = &r->e[i];
        if (e->in_block)
            vfiomig_block_release((Block *)e->v.obj, (uint64_t)e->v.len);
        else
            PyBuffer_Release(&e->v);
    }
    PyMem_Free(r->e);
    r->e = NULL;
    r->n = r->cap = 0;
    r->released = 1;
}

Run *vfiomig_run_new(Py_ssize_t cap)
{
    Run *r = PyObject_New(Run, &vfiomig_RunType);
    if (!r)
        return NULL;
    r->e = PyMem_Malloc((size_t)(cap > 0 ? cap : 1) * sizeof(struct run_entry));
    r->n = 0;
    r->cap = cap > 0 ? cap : 1;
    r->nbytes = r->done = 0;
    r->cur = 0;
    r->cur_off = 0;
    r->busy = r->released = 0;
    if (!r->e) {
        PyObject_Free(r);
        PyErr_NoMemory();
        return NULL;
    }
    return r;
}

/* Take a slot's data: its block (with the slot's reference and live bytes) or a pinned
 * buffer of its object (the slot's reference is dropped: the buffer holds its own); the
 * slot is left empty.  0, or -1 with an error and the slot unchanged. */
int vfiomig_run_take_slot(Run *r, struct vfm_slot *s)
{
    if (!s->size) { /* nothing to write: just let go of the data */
        PyObject *data = (PyObject *)s->data;
        s->data = NULL;
        if (s->in_block)
            vfiomig_block_release((Block *)data, 0);
        else
            Py_XDECREF(data);
        s->in_block = 0;
        return 0;
    }
    struct run_entry *e = &r->e[r->n];
    if (s->in_block) {
        Block *b = (Block *)s->data;
        memset(&e->v, 0, sizeof(e->v));
        e->v.obj = (PyObject *)b;
        e->v.buf = b->data + s->off;
        e->v.len = (Py_ssize_t)s->size;
        e->in_block = 1;
    } else {
        if (PyObject_GetBuffer((PyObject *)s->data, &e->v, PyBUF_SIMPLE) < 0)
            return -1;
        e->in_block = 0;
        Py_DECREF((PyObject *)s->data);
    }
    s->data = NULL;
    s->in_block = 0;
    r->nbytes += (long long)s->size;
    r->n++;
    return 0;
}

int vfiomig_run_iov(Run *r, struct iovec **iov, size_t *niov)
{
    if (r->released) {
        PyErr_SetString(PyExc_ValueError, "the run was released");
        return -1;
    }
    struct iovec *out = PyMem_Calloc((size_t)(r->n ? r->n : 1), sizeof(struct iovec));
    if (!out) {
        PyErr_NoMemory();
        return -1;
    }
    size_t k = 0;
    for (Py_ssize_t i = r->cur; i < r->n; i++) {
        size_t off = i == r->cur ? r->cur_off : 0;
        out[k].iov_base = (char *)r->e[i].v.buf + off;
        out[k].iov_len = (size_t)r->e[i].v.len - off;
        k++;
    }
    *iov = out;
    *niov = k;
    return 0;
}

static void run_dealloc(Run *r)
{
    run_release_entries(r);
    PyObject_Free(r);
}

void vfiomig_run_set_busy(Run *r, int busy)
{
    r->busy = busy;
}

static Py_ssize_t run_length(Run *r)
{
    return r->n;
}

static PyObject *run_item(Run *r, Py_ssize_t i)
{
    if (r->released) {
        PyErr_SetString(PyExc_ValueError, "the run was released");
        return NULL;
    }
    if (i < 0 || i >= r->n) {
        PyErr_SetString(PyExc_IndexError, "run index out of range");
        return NULL;
    }
    struct run_entry *e = &r->e[i];
    if (!e->in_block)
        return Py_NewRef(e->v.obj);
    Block *b = (Block *)e->v.obj;
    return vfiomig_block_view(b, (size_t)((uint8_t *)e->v.buf - b->data), (size_t)e->v.len, 1);
}

static PyObject *run_subscript(Run *r, PyObject *key)
{
    if (!PySlice_Check(key)) {
        Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred())
            return NULL;
        return run_item(r, i < 0 ? i + r->n : i);
    }
    Py_ssize_t start, stop, step;
    if (PySlice_Unpack(key, &start, &stop, &step) < 0)
        return NULL;
    Py_ssize_t len = PySlice_AdjustIndices(r->n, &start, &stop, step);
    PyObject *out = PyList_New(len);
    for (Py_ssize_t k = 0; out && k < len; k++) {
        PyObject *item = run_item(r, start + k * step);
        if (!item)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, k, item);
    }
    return out;
}

/* write_to(fd): one writev of what is left (at most IOV_MAX entries) from the cursor, the
 * GIL released; returns the bytes written and moves the cursor, or raises OSError
 * (BlockingIOError for EAGAIN, nothing written).  EINTR is retried after signal handlers
 * ran. */
static PyObject *Run_write_to(Run *r, PyObject *arg)
{
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0)
        return NULL;
    if (r->released || r->busy) {
        PyErr_SetString(PyExc_ValueError,
                        r->released ? "the run was released" : "the run is being written");
        return NULL;
    }
    struct iovec iov[IOV_MAX];
    int k = 0;
    for (Py_ssize_t i = r->cur; i < r->n && k < IOV_MAX; i++, k++) {
        size_t off = i == r->cur ? r->cur_off : 0;
        iov[k].iov_base = (char *)r->e[i].v.buf + off;
        iov[k].iov_len = (size_t)r->e[i].v.len - off;
    }
    if (!k)
        return PyLong_FromLong(0);
    ssize_t n;
    int err;
    r->busy = 1;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        n = writev(fd, iov, k);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            r->busy = 0;
            return NULL;
        }
    }
    r->busy = 0;
    if (n < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    size_t left = (size_t)n;
    while (left && r->cur < r->n) {
        size_t rest = (size_t)r->e[r->cur].v.len - r->cur_off;
        if (left < rest) {
            r->cur_off += left;
            break;
        }
        left -= rest;
        r->cur++;
        r->cur_off = 0;
    }
    r->done += n;
    return PyLong_FromSsize_t(n);
}

static PyObject *Run_release(Run *r, PyObject *Py_UNUSED(ignored))
{
    if (r->busy) {
        PyErr_SetString(PyExc_ValueError, "the run is being written");
        return NULL;
    }
    if (!r->released)
        run_release_entries(r);
    Py_RETURN_NONE;
}

static PyObject *Run_get_nbytes(Run *r, void *Py_UNUSED(c))
{
    return PyLong_FromLongLong(r->nbytes);
}

static PyObject *Run_get_remaining(Run *r, void *Py_UNUSED(c))
{
    return PyLong_FromLongLong(r->released ? 0 : r->nbytes - r->done);
}

static PyObject *Run_get_released(Run *r, void *Py_UNUSED(c))
{
    return PyBool_FromLong(r->released);
}

static PySequenceMethods run_as_sequence = {
    .sq_length = (lenfunc)run_length,
    .sq_item = (ssizeargfunc)run_item,
};

static PyMappingMethods run_as_mapping = {
    .mp_length = (lenfunc)run_length,
    .mp_subscript = (binaryfunc)run_subscript,
};

static PyMethodDef Run_methods[] = {
    {"write_to", (PyCFunction)Run_write_to, METH_O, NULL},
    {"release", (PyCFunction)Run_release, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Run_getset[] = {
    {"nbytes", (getter)Run_get_nbytes, NULL, NULL, NULL},
    {"remaining", (getter)Run_get_remaining, NULL, NULL, NULL},
    {"released", (getter)Run_get_released, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject vfiomig_RunType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.Run",
    .tp_doc = "A take_ready batch of in-order packets, held in place until released.",
    .tp_basicsize = sizeof(Run),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_SEQUENCE,
    .tp_dealloc = (destructor)run_dealloc,
    .tp_as_sequence = &run_as_sequence,
    .tp_as_mapping = &run_as_mapping,
    .tp_methods = Run_methods,
    .tp_getset = Run_getset,
};
