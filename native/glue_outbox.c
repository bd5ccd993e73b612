/*
 * glue_outbox.c - vfiomig._native.Outbox: one channel's packets not yet written, as
 * vfiomig._core._outbox.Outbox, plus send(fd, max_packets): the queue written with one
 * sendmsg per IOV_MAX iovecs, without the GIL, looping until the socket would block or
 * the queue is empty.  No Python object is made per packet.
 */
#include "glue.h"

#include <errno.h>
#include <limits.h>
#include <sys/socket.h>

#define VFM_IOV_MAX 1024

static void release_owner(void *owner)
{
    Py_DECREF((PyObject *)owner);
}

static int check_idle(Outbox *self)
{
    if (self->sending) {
        PyErr_SetString(PyExc_RuntimeError, "outbox is being sent from another thread");
        return -1;
    }
    return 0;
}

struct vfm_out_packet *vfiomig_outbox_push(Outbox *self, PyObject *owner, long *pins,
                                           const unsigned char *data, size_t off, size_t len)
{
    struct vfm_out_packet *p;

    if (check_idle(self) < 0)
        return NULL;
    p = vfm_outbox_push(&self->ob);
    if (!p) {
        PyErr_NoMemory();
        return NULL;
    }
    if (pins)
        (*pins)++; /* given back by the plain outbox when the packet is sent or dropped */
    Py_INCREF(owner);
    p->owner = owner;
    p->pins = pins;
    p->data = data;
    p->off = off;
    p->len = len;
    return p;
}

void vfiomig_outbox_commit(Outbox *self)
{
    vfm_outbox_commit(&self->ob);
}

static int Outbox_init(Outbox *Py_UNUSED(self), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":Outbox", kwlist))
        return -1;
    return 0;
}

static void Outbox_dealloc(Outbox *self)
{
    vfm_outbox_clear(&self->ob, release_owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A view of a queued packet's data, from skip: a slice of a memoryview of its owner. */
static PyObject *data_view(const struct vfm_out_packet *p, size_t skip)
{
    PyObject *mv = PyMemoryView_FromObject(p->owner), *slice;
    if (!mv)
        return NULL;
    slice = PySequence_GetSlice(mv, (Py_ssize_t)(p->off + skip), (Py_ssize_t)(p->off + p->len));
    Py_DECREF(mv);
    return slice;
}

/* A view of a copy of a queued packet's header, from skip (the ring may move). */
static PyObject *header_view(const struct vfm_out_packet *p, size_t skip)
{
    PyObject *b = PyBytes_FromStringAndSize((const char *)p->hdr + skip,
                                            (Py_ssize_t)(VFM_PACKET_HEADER_SIZE - skip));
    PyObject *mv = b ? PyMemoryView_FromObject(b) : NULL;
    Py_XDECREF(b);
    return mv;
}

static PyObject *Outbox_views(Outbox *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_packets", NULL};
    Py_ssize_t max_packets = -1;
    size_t skip = self->ob.done;
    PyObject *out;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n:views", kwlist, &max_packets))
        return NULL;
    out = PyList_New(0);
    for (size_t i = 0; out && i < self->ob.count; i++) {
        struct vfm_out_packet *p = vfm_outbox_at(&self->ob, i);
        PyObject *part = NULL;
        if ((Py_ssize_t)i == max_packets || PyList_GET_SIZE(out) >= VFM_IOV_MAX - 1)
            break;
        if (skip < VFM_PACKET_HEADER_SIZE) {
            part = header_view(p, skip);
            if (!part || PyList_Append(out, part) < 0)
                Py_CLEAR(out);
            Py_XDECREF(part);
            skip = 0;
        } else {
            skip -= VFM_PACKET_HEADER_SIZE;
        }
        if (out && p->len > skip) {
            part = data_view(p, skip);
            if (!part || PyList_Append(out, part) < 0)
                Py_CLEAR(out);
            Py_XDECREF(part);
        }
        skip = 0;
    }
    return out;
}

static PyObject *Outbox_advance(Outbox *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (check_idle(self) < 0)
        return NULL;
    if (n < 0 || (uint64_t)n > self->ob.queued_bytes)
        return PyErr_Format(PyExc_ValueError, "advance %zd is out of range (queued %llu)", n,
                            (unsigned long long)self->ob.queued_bytes);
    return PyLong_FromSize_t(vfm_outbox_advance(&self->ob, (size_t)n, release_owner));
}

/* send(fd, max_packets=-1): write the first max_packets packets (-1: all) to the socket
 * fd with non-blocking sendmsg, up to VFM_IOV_MAX iovecs each, until they are written or
 * the socket would block; the bytes written.  OSError for any other failure. */
static PyObject *Outbox_send(Outbox *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "max_packets", NULL};
    struct iovec iov[VFM_IOV_MAX];
    int fd, err = 0;
    Py_ssize_t max_packets = -1;
    size_t total = 0, completed = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|n:send", kwlist, &fd, &max_packets))
        return NULL;
    if (check_idle(self) < 0)
        return NULL;
    for (;;) {
        size_t want = max_packets < 0 ? 0 : (size_t)max_packets - completed;
        size_t niov;
        ssize_t n;
        if (max_packets >= 0 && want == 0)
            break;
        niov = vfm_outbox_iov(&self->ob, iov, VFM_IOV_MAX, want);
        if (!niov)
            break;
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = niov};
        self->sending = 1;
        Py_BEGIN_ALLOW_THREADS
        n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        err = errno;
        Py_END_ALLOW_THREADS
        self->sending = 0;
        if (n < 0) {
            if (err == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return NULL;
                continue;
            }
            if (err == EAGAIN || err == EWOULDBLOCK)
                break;
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        total += (size_t)n;
        completed += vfm_outbox_advance(&self->ob, (size_t)n, release_owner);
    }
    return PyLong_FromSize_t(total);
}

static PyObject *Outbox_take(Outbox *self, PyObject *arg)
{
    Py_ssize_t max_bytes = PyLong_AsSsize_t(arg);
    size_t total = 0;
    PyObject *out;
    char *w;

    if (max_bytes == -1 && PyErr_Occurred())
        return NULL;
    if (check_idle(self) < 0)
        return NULL;
    /* Whole packets from the head: at least one, then more while under max_bytes. */
    size_t n = 0;
    for (; n < self->ob.count && (n == 0 || total < (size_t)max_bytes); n++)
        total += VFM_PACKET_HEADER_SIZE + vfm_outbox_at(&self->ob, n)->len - (n ? 0 : self->ob.done);
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!out)
        return NULL;
    w = PyBytes_AS_STRING(out);
    size_t skip = self->ob.done;
    for (size_t i = 0; i < n; i++) {
        struct vfm_out_packet *p = vfm_outbox_at(&self->ob, i);
        if (skip < VFM_PACKET_HEADER_SIZE) {
            memcpy(w, p->hdr + skip, VFM_PACKET_HEADER_SIZE - skip);
            w += VFM_PACKET_HEADER_SIZE - skip;
            skip = 0;
        } else {
            skip -= VFM_PACKET_HEADER_SIZE;
        }
        memcpy(w, p->data + skip, p->len - skip);
        w += p->len - skip;
        skip = 0;
    }
    vfm_outbox_advance(&self->ob, total, release_owner);
    return out;
}

static PyObject *Outbox_clear(Outbox *self, PyObject *Py_UNUSED(ignored))
{
    if (check_idle(self) < 0)
        return NULL;
    vfm_outbox_clear(&self->ob, release_owner);
    Py_RETURN_NONE;
}

static PyObject *Outbox_get_queued_bytes(Outbox *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->ob.queued_bytes);
}

static PyObject *Outbox_get_queued_packets(Outbox *self, void *Py_UNUSED(c))
{
    return PyLong_FromSize_t(self->ob.count);
}

static PyObject *Outbox_get_sent_packets(Outbox *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->ob.sent_packets);
}

static PyObject *Outbox_get_sent_bytes(Outbox *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->ob.sent_bytes);
}

static PyObject *Outbox_get_head_size(Outbox *self, void *Py_UNUSED(c))
{
    return PyLong_FromSize_t(vfm_outbox_head_size(&self->ob));
}

/* fits(max_bytes) -> (packets, bytes): the whole packets from the head within max_bytes
 * (a paced channel's burst: what its link model lets out now). */
static PyObject *Outbox_fits(Outbox *self, PyObject *arg)
{
    unsigned long long max_bytes = PyLong_AsUnsignedLongLong(arg);
    uint64_t bytes;
    size_t n;

    if (max_bytes == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    n = vfm_outbox_fits(&self->ob, (uint64_t)max_bytes, &bytes);
    return Py_BuildValue("(nK)", (Py_ssize_t)n, (unsigned long long)bytes);
}

static PyMethodDef Outbox_methods[] = {
    {"views", (PyCFunction)(void (*)(void))Outbox_views, METH_VARARGS | METH_KEYWORDS, NULL},
    {"advance", (PyCFunction)Outbox_advance, METH_O, NULL},
    {"send", (PyCFunction)(void (*)(void))Outbox_send, METH_VARARGS | METH_KEYWORDS, NULL},
    {"take", (PyCFunction)Outbox_take, METH_O, NULL},
    {"fits", (PyCFunction)Outbox_fits, METH_O, NULL},
    {"clear", (PyCFunction)Outbox_clear, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Outbox_getset[] = {
    {"queued_bytes", (getter)Outbox_get_queued_bytes, NULL, NULL, NULL},
    {"queued_packets", (getter)Outbox_get_queued_packets, NULL, NULL, NULL},
    {"sent_packets", (getter)Outbox_get_sent_packets, NULL, NULL, NULL},
    {"sent_bytes", (getter)Outbox_get_sent_bytes, NULL, NULL, NULL},
    {"head_size", (getter)Outbox_get_head_size, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject vfiomig_OutboxType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.Outbox",
    .tp_doc = "One channel's packets not yet written, sent in batches.",
    .tp_basicsize = sizeof(Outbox),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Outbox_init,
    .tp_dealloc = (destructor)Outbox_dealloc,
    .tp_methods = Outbox_methods,
    .tp_getset = Outbox_getset,
};
