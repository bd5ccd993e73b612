/* glue_framer.c - vfiomig._native.Framer: construction, ingress (feed, get_buffer,
 * commit), packet data and properties, and the type object.  next_event and its errors
 * are in glue_framer_events.c, pump/pump_recv in glue_framer_pump.c. */
#include "glue.h"

/* -- lifecycle ---------------------------------------------------------------------- */

static int framer_traverse(Framer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->blk);
    Py_VISIT(self->uuid);
    Py_VISIT(self->channels);
    Py_VISIT(self->label);
    Py_VISIT(self->channel_id);
    Py_VISIT(self->current);
    Py_VISIT(self->error);
    Py_VISIT(self->idstr);
    Py_VISIT(self->routes);
    Py_VISIT(self->route_buf);
    Py_VISIT(self->pending);
    Py_VISIT(self->pending_buf);
    return 0;
}

static int framer_clear(Framer *self)
{
    if (self->blk)
        vfiomig_block_retire(self->blk);
    Py_CLEAR(self->blk);
    Py_CLEAR(self->uuid);
    Py_CLEAR(self->channels);
    Py_CLEAR(self->label);
    Py_CLEAR(self->channel_id);
    Py_CLEAR(self->current);
    Py_CLEAR(self->error);
    Py_CLEAR(self->idstr);
    Py_CLEAR(self->routes);
    Py_CLEAR(self->route_buf);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->pending_buf);
    return 0;
}

static void framer_dealloc(Framer *self)
{
    PyObject_GC_UnTrack(self);
    framer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int framer_init(Framer *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"uuid",  "channels", "packet_cap", "ram_page_count",
                             "endian", "label",   "buffer_size", NULL};
    PyObject *uuid = NULL, *channels = NULL, *ram = Py_None, *label = NULL;
    unsigned long long cap = 64ull * 1024 * 1024;
    const char *endian = "be";
    Py_ssize_t buffer_size = 2 * 1024 * 1024; /* a block: see pump_recv */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$OOKOsUn", kwlist, &uuid, &channels, &cap,
                                     &ram, &endian, &label, &buffer_size))
        return -1;
    if (!uuid || !channels) {
        PyErr_SetString(PyExc_TypeError, "Framer() needs the keyword arguments uuid and channels");
        return -1;
    }
    long long pages = -1;
    if (ram != Py_None) {
        pages = PyLong_AsLongLong(ram);
        if (pages == -1 && PyErr_Occurred())
            return -1;
        if (pages < 0 || pages > (1 << 24)) {
            PyErr_Format(PyExc_ValueError, "ram_page_count %lld is out of range", pages);
            return -1;
        }
    }
    int host;
    if (strcmp(endian, "be") == 0)
        host = 0;
    else if (strcmp(endian, "host") == 0)
        host = 1;
    else {
        PyErr_SetString(PyExc_KeyError, endian);
        return -1;
    }
    if (buffer_size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative buffer_size");
        return -1;
    }
    framer_clear(self);
    vfm_init(&self->f, cap, pages, host);
    self->block_size = (size_t)buffer_size;
    /* as vfiomig._core._framer: min(BIG_PAYLOAD, buffer_size // 4) */
    size_t quarter = (size_t)buffer_size / 4;
    self->big = quarter < 256 * 1024 ? quarter : 256 * 1024;
    /* min(RECV_CHUNK, buffer_size) */
    self->recv_chunk = (size_t)buffer_size < 1024 * 1024 ? (size_t)buffer_size : 1024 * 1024;
    self->blk = vfiomig_block_new(self->block_size);
    if (!self->blk)
        return -1;
    self->pending_in_block = 0;
    self->uuid = Py_NewRef(uuid);
    self->channels = Py_NewRef(channels);
    self->label = label ? Py_NewRef(label) : PyUnicode_FromString("channel");
    self->channel_id = Py_NewRef(Py_None);
    return self->label ? 0 : -1;
}

/* -- ingress ------------------------------------------------------------------------ */

static PyObject *Framer_feed(Framer *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *ret = NULL;
    size_t n = (size_t)view.len;
    if (!n) {
        self->f.eof = 1;
        ret = Py_NewRef(Py_None);
    } else if (self->f.eof) {
        PyErr_SetString(PyExc_RuntimeError, "feed() after end of stream");
    } else if (vfiomig_framer_make_room(self, n) == 0) {
        memcpy(framer_data(self) + self->f.end, view.buf, n);
        self->f.end += n;
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&view);
    return ret;
}

static PyObject *Framer_get_buffer(Framer *self, PyObject *arg)
{
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    if (vfiomig_framer_make_room(self, (size_t)size) < 0)
        return NULL;
    return vfiomig_block_view(self->blk, self->f.end, (size_t)size, 0);
}

static PyObject *Framer_commit(Framer *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || self->f.end + (size_t)n > self->blk->cap) {
        PyErr_SetString(PyExc_ValueError, "commit() of more bytes than the buffer given");
        return NULL;
    }
    if (n == 0)
        self->f.eof = 1;
    self->f.end += (size_t)n;
    Py_RETURN_NONE;
}

/* -- packet data -------------------------------------------------------------------- */

static PyObject *assertion(const char *what)
{
    PyErr_SetString(PyExc_AssertionError, what);
    return NULL;
}

static PyObject *Framer_read_payload_into(Framer *self, PyObject *arg)
{
    if (self->error)
        return vfiomig_framer_reraise(self);
    if (self->f.state != VFM_S_PAYLOAD)
        return assertion("no packet data to read");
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    uint64_t n = (uint64_t)view.len;
    if (self->f.remaining < n)
        n = self->f.remaining;
    if (self->f.end - self->f.pos < n)
        n = self->f.end - self->f.pos;
    if (n == 0 && self->f.eof && view.len) {
        PyBuffer_Release(&view);
        return vfiomig_framer_raise_truncated(self);
    }
    memcpy(view.buf, framer_data(self) + self->f.pos, (size_t)n);
    PyBuffer_Release(&view);
    vfm_advance(&self->f, n, 1);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *Framer_take_payload(Framer *self, PyObject *Py_UNUSED(ignored))
{
    if (self->f.state != VFM_S_PAYLOAD)
        return assertion("no packet data to read");
    uint64_t n = self->f.remaining;
    if (self->f.end - self->f.pos < n)
        Py_RETURN_NONE;
    PyObject *data = PyBytes_FromStringAndSize((const char *)framer_data(self) + self->f.pos,
                                               (Py_ssize_t)n);
    if (data)
        vfm_advance(&self->f, n, 1);
    return data;
}

static PyObject *Framer_consume_external(Framer *self, PyObject *arg)
{
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (self->f.state != VFM_S_PAYLOAD || self->f.pos != self->f.end)
        return assertion("framer holds bytes");
    if (n == 0 || n > self->f.remaining)
        return assertion("more data than the packet has");
    vfm_advance(&self->f, n, 0);
    Py_RETURN_NONE;
}

static PyObject *Framer_fail_truncated(Framer *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->current)
        return assertion("no packet is being read");
    return vfiomig_framer_truncated(self);
}

/* -- properties --------------------------------------------------------------------- */

static PyObject *Framer_get_buffered(Framer *self, void *Py_UNUSED(c))
{
    return PyLong_FromSize_t(self->f.end - self->f.pos);
}

static PyObject *Framer_get_payload_remaining(Framer *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->f.state == VFM_S_PAYLOAD ? self->f.remaining : 0);
}

static PyObject *Framer_get_current(Framer *self, void *Py_UNUSED(c))
{
    if (self->f.state == VFM_S_PAYLOAD && self->current)
        return Py_NewRef(self->current);
    Py_RETURN_NONE;
}

static PyObject *Framer_get_obj(Framer *self, void *c)
{
    PyObject *v = *(PyObject **)((char *)self + (size_t)c);
    return Py_NewRef(v ? v : Py_None);
}

static int Framer_set_obj(Framer *self, PyObject *value, void *c)
{
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete this attribute");
        return -1;
    }
    Py_XSETREF(*(PyObject **)((char *)self + (size_t)c), Py_NewRef(value));
    return 0;
}

static PyGetSetDef Framer_getset[] = {
    {"buffered", (getter)Framer_get_buffered, NULL, "Bytes received but not yet consumed.", NULL},
    {"payload_remaining", (getter)Framer_get_payload_remaining, NULL,
     "Data bytes of the current packet not yet read (0 between packets).", NULL},
    {"current", (getter)Framer_get_current, NULL, "The packet whose data is being read.", NULL},
    {"label", (getter)Framer_get_obj, (setter)Framer_set_obj, "How messages name the channel.",
     (void *)offsetof(Framer, label)},
    {"channel_id", (getter)Framer_get_obj, (setter)Framer_set_obj, "The handshake's channel id.",
     (void *)offsetof(Framer, channel_id)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Framer_methods[] = {
    {"feed", (PyCFunction)Framer_feed, METH_O, NULL},
    {"get_buffer", (PyCFunction)Framer_get_buffer, METH_O, NULL},
    {"commit", (PyCFunction)Framer_commit, METH_O, NULL},
    {"next_event", (PyCFunction)vfiomig_Framer_next_event, METH_NOARGS, NULL},
    {"read_payload_into", (PyCFunction)Framer_read_payload_into, METH_O, NULL},
    {"take_payload", (PyCFunction)Framer_take_payload, METH_NOARGS, NULL},
    {"consume_external", (PyCFunction)Framer_consume_external, METH_O, NULL},
    {"fail_truncated", (PyCFunction)Framer_fail_truncated, METH_NOARGS, NULL},
    {"pump", (PyCFunction)vfiomig_Framer_pump, METH_O, NULL},
    {"pump_recv", (PyCFunction)(void (*)(void))vfiomig_Framer_pump_recv, METH_FASTCALL, NULL},
    {"defer_payload", (PyCFunction)vfiomig_Framer_defer_payload, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject vfiomig_FramerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.Framer",
    .tp_doc = "Frames one data channel (C twin of vfiomig._core._framer.Framer).",
    .tp_basicsize = sizeof(Framer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)framer_init,
    .tp_dealloc = (destructor)framer_dealloc,
    .tp_traverse = (traverseproc)framer_traverse,
    .tp_clear = (inquiry)framer_clear,
    .tp_methods = Framer_methods,
    .tp_getset = Framer_getset,
};
