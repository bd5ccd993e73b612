/*
 * glue_send_buffer.c - the sender's pooled buffers and packet headers:
 * vfiomig._native.SendBuffer (a buffer a source reads into, busy while queued packets
 * use it) and vfiomig._native.PacketHeaders (one device's headers: put one packet on an
 * Outbox, or spread a buffer's worth of packets over the channels' Outboxes in one call).
 * Same interface and error text as vfiomig._core._outbox.
 */
#include "glue.h"

#include <stdlib.h>
#include <string.h>

/* -- SendBuffer ----------------------------------------------------------------------- */

static PyObject *SendBuffer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"size", NULL};
    Py_ssize_t size;
    SendBuffer *self;
    void *mem = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:SendBuffer", kwlist, &size))
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    /* Page-aligned, not zero-filled: a source overwrites what it hands out. */
    if (posix_memalign(&mem, 4096, size ? (size_t)size : 1))
        return PyErr_NoMemory();
    self = (SendBuffer *)type->tp_alloc(type, 0);
    if (!self) {
        free(mem);
        return NULL;
    }
    self->mem = mem;
    self->size = size;
    return (PyObject *)self;
}

static void SendBuffer_dealloc(SendBuffer *self)
{
    free(self->mem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int SendBuffer_getbuffer(SendBuffer *self, Py_buffer *view, int flags)
{
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->mem, self->size, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void SendBuffer_releasebuffer(SendBuffer *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
}

static Py_ssize_t SendBuffer_len(SendBuffer *self)
{
    return self->size;
}

static PyObject *SendBuffer_get_busy(SendBuffer *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->pins > 0);
}

static PyObject *SendBuffer_get_pins(SendBuffer *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->pins);
}

static PyBufferProcs SendBuffer_as_buffer = {
    .bf_getbuffer = (getbufferproc)SendBuffer_getbuffer,
    .bf_releasebuffer = (releasebufferproc)SendBuffer_releasebuffer,
};

static PySequenceMethods SendBuffer_as_sequence = {.sq_length = (lenfunc)SendBuffer_len};

static PyGetSetDef SendBuffer_getset[] = {
    {"busy", (getter)SendBuffer_get_busy, NULL, NULL, NULL},
    {"pins", (getter)SendBuffer_get_pins, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject vfiomig_SendBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.SendBuffer",
    .tp_doc = "A buffer a source reads into; busy while queued packets use it.",
    .tp_basicsize = sizeof(SendBuffer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = SendBuffer_new,
    .tp_dealloc = (destructor)SendBuffer_dealloc,
    .tp_as_buffer = &SendBuffer_as_buffer,
    .tp_as_sequence = &SendBuffer_as_sequence,
    .tp_getset = SendBuffer_getset,
};

/* -- PacketHeaders -------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    unsigned char prefix[VFM_HEADER_PREFIX_SIZE];
    uint32_t instance;
    int host;
} Headers;

static int Headers_init(Headers *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"idstr", "instance", "endian", NULL};
    PyObject *idstr, *instance;
    const char *endian = "be", *raw;
    Py_ssize_t len;
    unsigned long long inst;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UO|s:PacketHeaders", kwlist, &idstr,
                                     &instance, &endian))
        return -1;
    raw = PyUnicode_AsUTF8AndSize(idstr, &len);
    if (!raw)
        return -1;
    if ((size_t)len >= VFM_IDSTR_SIZE) {
        PyErr_Format(PyExc_ValueError, "idstr %R is %zd bytes (max %u)", idstr, len,
                     VFM_IDSTR_SIZE - 1);
        return -1;
    }
    inst = PyLong_AsUnsignedLongLong(instance);
    if (inst == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        inst = 1ull << 32;
    }
    if (inst > 0xFFFFFFFFull) {
        PyErr_Format(PyExc_ValueError, "instance %S is out of range", instance);
        return -1;
    }
    if (strcmp(endian, "be") && strcmp(endian, "host")) {
        PyErr_Format(PyExc_KeyError, "%s", endian);
        return -1;
    }
    vfm_header_prefix(self->prefix, raw, (size_t)len);
    self->instance = (uint32_t)inst;
    self->host = strcmp(endian, "host") == 0;
    return 0;
}

static PyObject *Headers_header(Headers *self, PyObject *args)
{
    unsigned int idx, flags;
    Py_ssize_t size;
    unsigned char hdr[VFM_PACKET_HEADER_SIZE];

    if (!PyArg_ParseTuple(args, "IIn:header", &idx, &flags, &size))
        return NULL;
    vfm_header_build(hdr, self->prefix, self->instance, (uint32_t)size, idx, flags, self->host);
    return PyBytes_FromStringAndSize((const char *)hdr, VFM_PACKET_HEADER_SIZE);
}

static Outbox *as_outbox(PyObject *o)
{
    if (!PyObject_TypeCheck(o, &vfiomig_OutboxType)) {
        PyErr_Format(PyExc_TypeError, "expected an Outbox, not %s", Py_TYPE(o)->tp_name);
        return NULL;
    }
    return (Outbox *)o;
}

/* put(outbox, data, idx, flags=0): one packet, data kept (a view of it), not copied. */
static PyObject *Headers_put(Headers *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"outbox", "data", "idx", "flags", NULL};
    PyObject *ob, *data, *mv;
    unsigned int idx, flags = 0;
    struct vfm_out_packet *p;
    Outbox *out;
    Py_buffer *v;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOI|I:put", kwlist, &ob, &data, &idx, &flags))
        return NULL;
    if (!(out = as_outbox(ob)))
        return NULL;
    mv = PyMemoryView_GetContiguous(data, PyBUF_READ, 'C');
    if (mv && (PyMemoryView_GET_BUFFER(mv)->ndim != 1 || PyMemoryView_GET_BUFFER(mv)->itemsize != 1)) {
        PyObject *bytes_view = PyObject_CallMethod(mv, "cast", "s", "B");
        Py_SETREF(mv, bytes_view);
    }
    if (!mv)
        return NULL;
    v = PyMemoryView_GET_BUFFER(mv);
    if (v->len > 0xFFFFFFFFll - 12) {
        Py_DECREF(mv);
        return PyErr_Format(PyExc_ValueError, "packet of %zd bytes is too large", v->len);
    }
    p = vfiomig_outbox_push(out, mv, NULL, v->buf, 0, (size_t)v->len);
    Py_DECREF(mv); /* the queue holds it */
    if (!p)
        return NULL;
    vfm_header_build(p->hdr, self->prefix, self->instance, (uint32_t)p->len, idx, flags,
                     self->host);
    vfiomig_outbox_commit(out);
    return PyLong_FromSize_t(VFM_PACKET_HEADER_SIZE + p->len);
}

/* spread(buf, length, packet_size, idx, outboxes, choices): buf[:length] cut into packets
 * of packet_size (the last one shorter) numbered from idx, packet i queued on
 * outboxes[choices[i]]; the number of packets.  Everything is checked before anything is
 * queued. */
static PyObject *Headers_spread(Headers *self, PyObject *args)
{
    PyObject *bufobj, *outboxes, *seq = NULL, *ret = NULL;
    Py_ssize_t length, packet_size, count, nout;
    unsigned int idx;
    Py_buffer choices = {0};
    SendBuffer *buf;

    if (!PyArg_ParseTuple(args, "O!nnIOy*:spread", &vfiomig_SendBufferType, &bufobj, &length,
                          &packet_size, &idx, &outboxes, &choices))
        return NULL;
    buf = (SendBuffer *)bufobj;
    if (packet_size < 1 || length < 0 || length > buf->size) {
        PyErr_Format(PyExc_ValueError, "spread of %zd bytes in packets of %zd is invalid",
                     length, packet_size);
        goto out;
    }
    count = length / packet_size + (length % packet_size != 0);
    if (choices.len < count) {
        PyErr_Format(PyExc_ValueError, "spread needs %zd choices, got %zd", count, choices.len);
        goto out;
    }
    seq = PySequence_Fast(outboxes, "outboxes must be a sequence");
    if (!seq)
        goto out;
    nout = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < nout; i++)
        if (!as_outbox(PySequence_Fast_GET_ITEM(seq, i)))
            goto out;
    const unsigned char *ch = choices.buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (ch[i] >= nout) {
            PyErr_Format(PyExc_ValueError, "choice %d is out of range (%zd outboxes)", ch[i],
                         nout);
            goto out;
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Outbox *ob = (Outbox *)PySequence_Fast_GET_ITEM(seq, ch[i]);
        size_t off = (size_t)(i * packet_size);
        size_t len = (size_t)(length - i * packet_size < packet_size ? length - i * packet_size
                                                                     : packet_size);
        struct vfm_out_packet *p =
            vfiomig_outbox_push(ob, bufobj, &buf->pins, buf->mem + off, off, len);
        if (!p)
            goto out; /* the packets queued so far stay queued: memory ran out */
        vfm_header_build(p->hdr, self->prefix, self->instance, (uint32_t)len,
                         idx + (uint32_t)i, 0, self->host);
        vfiomig_outbox_commit(ob);
    }
    ret = PyLong_FromSsize_t(count);
out:
    Py_XDECREF(seq);
    PyBuffer_Release(&choices);
    return ret;
}

static PyMethodDef Headers_methods[] = {
    {"header", (PyCFunction)Headers_header, METH_VARARGS, NULL},
    {"put", (PyCFunction)(void (*)(void))Headers_put, METH_VARARGS | METH_KEYWORDS, NULL},
    {"spread", (PyCFunction)Headers_spread, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject vfiomig_HeadersType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.PacketHeaders",
    .tp_doc = "One device's packet headers, put into channels' Outboxes.",
    .tp_basicsize = sizeof(Headers),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Headers_init,
    .tp_methods = Headers_methods,
};
