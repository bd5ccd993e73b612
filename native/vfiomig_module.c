/*
 * vfiomig_module.c - the only CPython glue: vfiomig._native.Framer over vfiomig_core.
 *
 * Same constructor, methods, properties, events and error text as the pure-Python
 * reference vfiomig._core._framer.Framer (the typed contract is vfiomig/_native.pyi).
 * Event classes, NEED_DATA, the error classes and the handshake check are the reference's
 * own objects, imported at module init, so both implementations return the same types and
 * the handshake errors are literally the same code.  Only the framing hot path is C.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "vfiomig_core.h"

static PyObject *g_need_data, *g_hello, *g_header, *g_ram, *g_end, *g_decode_handshake;
static PyObject *g_vfio_error, *g_packet_error, *g_incomplete_error;
static PyObject *g_str_channel_id, *g_str_idstr, *g_str_instance, *g_str_version, *g_str_idx,
    *g_str_flags, *g_str_size, *g_str_uuid, *g_str_channels, *g_str_device;

typedef struct {
    PyObject_HEAD
    struct vfm_framer f;
    PyObject *buf;        /* bytearray: the receive buffer */
    PyObject *uuid;
    PyObject *channels;
    PyObject *label;
    PyObject *channel_id; /* None until the handshake */
    PyObject *current;    /* PacketHeader of the packet being read, or NULL */
    PyObject *error;      /* the poisoning exception, or NULL */
    PyObject *idstr;      /* the last idstr decoded, reused while the bytes repeat */
    char idstr_raw[VFM_IDSTR_SIZE];
    size_t idstr_len;
} Framer;

static uint8_t *framer_data(Framer *self) { return (uint8_t *)PyByteArray_AS_STRING(self->buf); }

static int framer_traverse(Framer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->buf);
    Py_VISIT(self->uuid);
    Py_VISIT(self->channels);
    Py_VISIT(self->label);
    Py_VISIT(self->channel_id);
    Py_VISIT(self->current);
    Py_VISIT(self->error);
    Py_VISIT(self->idstr);
    return 0;
}

static int framer_clear(Framer *self)
{
    Py_CLEAR(self->buf);
    Py_CLEAR(self->uuid);
    Py_CLEAR(self->channels);
    Py_CLEAR(self->label);
    Py_CLEAR(self->channel_id);
    Py_CLEAR(self->current);
    Py_CLEAR(self->error);
    Py_CLEAR(self->idstr);
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
    Py_ssize_t buffer_size = 256 * 1024;
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
    self->buf = PyByteArray_FromStringAndSize(NULL, buffer_size);
    if (!self->buf)
        return -1;
    self->uuid = Py_NewRef(uuid);
    self->channels = Py_NewRef(channels);
    self->label = label ? Py_NewRef(label) : PyUnicode_FromString("channel");
    self->channel_id = Py_NewRef(Py_None);
    return self->label ? 0 : -1;
}

/* -- errors ------------------------------------------------------------------------- */

static PyObject *framer_name(Framer *self)
{
    if (self->channel_id != Py_None)
        return PyUnicode_FromFormat("channel %S", self->channel_id);
    return Py_NewRef(self->label);
}

/* Raise cls(message, device=..., idx=...) and poison the framer with it.  Steals msg. */
static PyObject *framer_raise(Framer *self, PyObject *cls, PyObject *msg, PyObject *device,
                              PyObject *idx)
{
    PyObject *args = NULL, *kw = NULL, *exc = NULL;
    if (!msg)
        goto out;
    args = PyTuple_Pack(1, msg);
    kw = PyDict_New();
    if (!args || !kw)
        goto out;
    if (device && (PyDict_SetItem(kw, g_str_device, device) < 0 ||
                   PyDict_SetItem(kw, g_str_idx, idx) < 0))
        goto out;
    exc = PyObject_Call(cls, args, kw);
    if (exc) {
        Py_XSETREF(self->error, Py_NewRef(exc));
        PyErr_SetObject(cls, exc);
    }
out:
    Py_XDECREF(msg);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    Py_XDECREF(exc);
    return NULL;
}

static PyObject *framer_reraise(Framer *self)
{
    PyErr_SetObject((PyObject *)Py_TYPE(self->error), self->error);
    return NULL;
}

static PyObject *framer_truncated(Framer *self)
{
    PyObject *cur = self->current;
    PyObject *idstr = PyObject_GetAttr(cur, g_str_idstr);
    PyObject *inst = PyObject_GetAttr(cur, g_str_instance);
    PyObject *idx = PyObject_GetAttr(cur, g_str_idx);
    PyObject *size = PyObject_GetAttr(cur, g_str_size);
    PyObject *device = NULL, *msg = NULL, *exc = NULL, *args = NULL, *kw = NULL;
    if (!idstr || !inst || !idx || !size)
        goto out;
    unsigned long long total = PyLong_AsUnsignedLongLong(size);
    if (PyErr_Occurred())
        goto out;
    device = PyUnicode_FromFormat("%U/%S", idstr, inst);
    if (!device)
        goto out;
    msg = PyUnicode_FromFormat("%U: channel ended inside packet idx %S (%llu of %llu bytes)",
                               device, idx, total - (unsigned long long)self->f.remaining, total);
    args = msg ? PyTuple_Pack(1, msg) : NULL;
    kw = args ? Py_BuildValue("{OOOO}", g_str_device, device, g_str_idx, idx) : NULL;
    if (kw) {
        exc = PyObject_Call(g_incomplete_error, args, kw);
        if (exc)
            Py_XSETREF(self->error, Py_NewRef(exc));
    }
out:
    Py_XDECREF(idstr);
    Py_XDECREF(inst);
    Py_XDECREF(idx);
    Py_XDECREF(size);
    Py_XDECREF(device);
    Py_XDECREF(msg);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    return exc;
}

static PyObject *framer_error(Framer *self, const struct vfm_out *o)
{
    PyObject *name = NULL, *msg = NULL, *cls = g_packet_error;
    const char *raw = (const char *)framer_data(self) + o->offset;
    if (o->error == VFM_E_SIZE_CAP || o->error == VFM_E_SIZE_SHORT) {
        PyObject *idstr = PyUnicode_DecodeUTF8(raw, (Py_ssize_t)o->idstr_len, "backslashreplace");
        if (!idstr)
            return NULL;
        if (o->error == VFM_E_SIZE_CAP)
            msg = PyUnicode_FromFormat("%U/%u: packet size %llu is above the cap (%llu)", idstr,
                                       o->instance, (unsigned long long)o->size,
                                       (unsigned long long)self->f.cap);
        else
            msg = PyUnicode_FromFormat("%U/%u: packet too short at %llu (min is %u)", idstr,
                                       o->instance, (unsigned long long)o->size,
                                       VFM_VFIO_HEADER_SIZE);
        Py_DECREF(idstr);
        return framer_raise(self, cls, msg, NULL, NULL);
    }
    name = framer_name(self);
    if (!name)
        return NULL;
    switch (o->error) {
    case VFM_E_MAGIC:
        msg = PyUnicode_FromFormat("%U: packet magic 0x%x (expected 0x%x)", name, o->value,
                                   VFM_MAGIC);
        break;
    case VFM_E_VERSION:
        msg = PyUnicode_FromFormat("%U: packet version %u (expected %u)", name, o->value,
                                   VFM_VERSION);
        break;
    case VFM_E_IDSTR_NUL:
        msg = PyUnicode_FromFormat("%U: packet idstr is not nul-terminated", name);
        break;
    case VFM_E_RAM_UNEXPECTED:
        msg = PyUnicode_FromFormat("%U: ram packet with flags 0x%x on a device-state channel"
                                   " (pass --ram-page-count to skip ram packets)",
                                   name, o->value);
        break;
    case VFM_E_RAM_CAP:
        msg = PyUnicode_FromFormat("%U: ram packet size %llu is above the cap (%llu)", name,
                                   (unsigned long long)o->size, (unsigned long long)self->f.cap);
        break;
    case VFM_E_EOF_COMMON:
        cls = g_incomplete_error;
        msg = PyUnicode_FromFormat("%U: channel ended inside a packet header (%u of %u bytes)",
                                   name, o->value, VFM_COMMON_SIZE);
        break;
    case VFM_E_EOF_HEADER:
        cls = g_incomplete_error;
        msg = PyUnicode_FromFormat("%U: channel ended inside a packet header (%u bytes)", name,
                                   o->value);
        break;
    case VFM_E_EOF_RAM:
        cls = g_incomplete_error;
        msg = PyUnicode_FromFormat("%U: channel ended inside a ram packet (%llu bytes missing)",
                                   name, (unsigned long long)o->size);
        break;
    case VFM_E_EOF_HANDSHAKE:
        cls = g_incomplete_error;
        msg = PyUnicode_FromFormat("%U: channel ended inside its handshake (%u of %u bytes)",
                                   name, o->value, VFM_HANDSHAKE_SIZE);
        break;
    default:
        PyErr_Format(PyExc_SystemError, "vfiomig_core error %d", (int)o->error);
        break;
    }
    Py_DECREF(name);
    return framer_raise(self, cls, msg, NULL, NULL);
}

/* -- events ------------------------------------------------------------------------- */

/* A frozen slotted dataclass instance without running its __init__: the fields are set
 * through their slot descriptors, as dataclasses' own __init__ does with object.__setattr__. */
static PyObject *make_event(PyObject *cls, PyObject *const *names, PyObject *const *values,
                            int n)
{
    PyTypeObject *type = (PyTypeObject *)cls;
    PyObject *obj = type->tp_alloc(type, 0);
    if (!obj)
        return NULL;
    for (int i = 0; i < n; i++) {
        if (!values[i] || PyObject_GenericSetAttr(obj, names[i], values[i]) < 0) {
            Py_DECREF(obj);
            return NULL;
        }
    }
    return obj;
}

static PyObject *framer_idstr(Framer *self, const struct vfm_out *o)
{
    const char *raw = (const char *)framer_data(self) + o->offset;
    if (self->idstr && self->idstr_len == o->idstr_len &&
        memcmp(self->idstr_raw, raw, o->idstr_len) == 0)
        return Py_NewRef(self->idstr);
    PyObject *s = PyUnicode_DecodeUTF8(raw, (Py_ssize_t)o->idstr_len, "backslashreplace");
    if (!s)
        return NULL;
    memcpy(self->idstr_raw, raw, o->idstr_len);
    self->idstr_len = o->idstr_len;
    Py_XSETREF(self->idstr, Py_NewRef(s));
    return s;
}

static PyObject *framer_packet(Framer *self, const struct vfm_out *o)
{
    PyObject *names[] = {g_str_idstr, g_str_instance, g_str_version,
                         g_str_idx,   g_str_flags,    g_str_size};
    PyObject *values[6] = {
        framer_idstr(self, o),          PyLong_FromUnsignedLong(o->instance),
        PyLong_FromUnsignedLong(o->version), PyLong_FromUnsignedLong(o->idx),
        PyLong_FromUnsignedLong(o->flags),   PyLong_FromUnsignedLongLong(o->size),
    };
    PyObject *ev = make_event(g_header, names, values, 6);
    for (int i = 0; i < 6; i++)
        Py_XDECREF(values[i]);
    if (ev)
        Py_XSETREF(self->current, Py_NewRef(ev));
    return ev;
}

static PyObject *framer_handshake(Framer *self, const struct vfm_out *o)
{
    PyObject *data = PyBytes_FromStringAndSize((const char *)framer_data(self) + o->offset,
                                               VFM_HANDSHAKE_SIZE);
    if (!data)
        return NULL;
    PyObject *args[] = {data, self->uuid, self->channels};
    PyObject *kwnames = PyTuple_Pack(2, g_str_uuid, g_str_channels);
    PyObject *cid = kwnames ? PyObject_Vectorcall(g_decode_handshake, args, 1, kwnames) : NULL;
    Py_DECREF(data);
    Py_XDECREF(kwnames);
    if (!cid) {
        if (PyErr_ExceptionMatches(g_vfio_error)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            Py_XSETREF(self->error, Py_XNewRef(value));
            PyErr_Restore(type, value, tb);
        }
        return NULL;
    }
    vfm_handshake_done(&self->f);
    Py_SETREF(self->channel_id, cid);
    PyObject *names[] = {g_str_channel_id};
    return make_event(g_hello, names, &self->channel_id, 1);
}

static PyObject *Framer_next_event(Framer *self, PyObject *Py_UNUSED(ignored))
{
    if (self->error)
        return framer_reraise(self);
    if (self->f.state == VFM_S_PAYLOAD) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the current packet's data must be read before the next event");
        return NULL;
    }
    struct vfm_out o;
    switch (vfm_next(&self->f, framer_data(self), &o)) {
    case VFM_EV_NEED_DATA:
        return Py_NewRef(g_need_data);
    case VFM_EV_HANDSHAKE:
        return framer_handshake(self, &o);
    case VFM_EV_PACKET:
        return framer_packet(self, &o);
    case VFM_EV_RAM: {
        PyObject *names[] = {g_str_flags, g_str_size};
        PyObject *values[] = {PyLong_FromUnsignedLong(o.flags),
                              PyLong_FromUnsignedLongLong(o.size)};
        PyObject *ev = make_event(g_ram, names, values, 2);
        Py_XDECREF(values[0]);
        Py_XDECREF(values[1]);
        return ev;
    }
    case VFM_EV_END:
        return PyObject_CallNoArgs(g_end);
    case VFM_EV_ERROR:
    default:
        return framer_error(self, &o);
    }
}

/* -- ingress ------------------------------------------------------------------------ */

static int framer_make_room(Framer *self, size_t n)
{
    size_t size = (size_t)PyByteArray_GET_SIZE(self->buf);
    if (self->f.end + n <= size)
        return 0;
    size_t live = self->f.end - self->f.pos;
    if (self->f.pos) {
        uint8_t *d = framer_data(self);
        memmove(d, d + self->f.pos, live);
        self->f.pos = 0;
        self->f.end = live;
    }
    if (live + n > size) {
        if (live + n > (size_t)PY_SSIZE_T_MAX) {
            PyErr_NoMemory();
            return -1;
        }
        return PyByteArray_Resize(self->buf, (Py_ssize_t)(live + n));
    }
    return 0;
}

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
    } else if (framer_make_room(self, n) == 0) {
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
    if (framer_make_room(self, (size_t)size) < 0)
        return NULL;
    PyObject *mv = PyMemoryView_FromObject(self->buf);
    if (!mv)
        return NULL;
    PyObject *slice = PySlice_New(NULL, NULL, NULL);
    PyObject *start = PyLong_FromSize_t(self->f.end);
    PyObject *stop = PyLong_FromSize_t(self->f.end + (size_t)size);
    PyObject *ret = NULL;
    if (slice && start && stop) {
        Py_SETREF(slice, PySlice_New(start, stop, NULL));
        if (slice)
            ret = PyObject_GetItem(mv, slice);
    }
    Py_XDECREF(slice);
    Py_XDECREF(start);
    Py_XDECREF(stop);
    Py_DECREF(mv);
    return ret;
}

static PyObject *Framer_commit(Framer *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || self->f.end + (size_t)n > (size_t)PyByteArray_GET_SIZE(self->buf)) {
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
        return framer_reraise(self);
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
        PyObject *exc = framer_truncated(self);
        if (!exc)
            return NULL;
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
        return NULL;
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
    return framer_truncated(self);
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
    {"next_event", (PyCFunction)Framer_next_event, METH_NOARGS, NULL},
    {"read_payload_into", (PyCFunction)Framer_read_payload_into, METH_O, NULL},
    {"take_payload", (PyCFunction)Framer_take_payload, METH_NOARGS, NULL},
    {"consume_external", (PyCFunction)Framer_consume_external, METH_O, NULL},
    {"fail_truncated", (PyCFunction)Framer_fail_truncated, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FramerType = {
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

/* new_payload_buffer(size): a bytearray for a payload that will be received whole into it.
 * Unlike bytearray(size) it is not zero-filled: the caller overwrites every byte. */
static PyObject *native_new_payload_buffer(PyObject *Py_UNUSED(m), PyObject *arg)
{
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, size);
}

static PyMethodDef native_methods[] = {
    {"new_payload_buffer", native_new_payload_buffer, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "vfiomig._native", "The C core of vfiomig (see vfiomig._core).", -1,
    native_methods, NULL, NULL, NULL, NULL,
};

static int import_names(void)
{
    struct {
        PyObject **dst;
        const char *module, *name;
    } imports[] = {
        {&g_need_data, "vfiomig._core._framer", "NEED_DATA"},
        {&g_hello, "vfiomig._core._framer", "ChannelHello"},
        {&g_header, "vfiomig._core._framer", "PacketHeader"},
        {&g_ram, "vfiomig._core._framer", "RamSkipped"},
        {&g_end, "vfiomig._core._framer", "ChannelEnd"},
        {&g_decode_handshake, "vfiomig._core._wire", "decode_handshake"},
        {&g_vfio_error, "vfiomig._core._errors", "VfioMigError"},
        {&g_packet_error, "vfiomig._core._errors", "PacketError"},
        {&g_incomplete_error, "vfiomig._core._errors", "StreamIncompleteError"},
    };
    for (size_t i = 0; i < sizeof(imports) / sizeof(imports[0]); i++) {
        PyObject *mod = PyImport_ImportModule(imports[i].module);
        if (!mod)
            return -1;
        *imports[i].dst = PyObject_GetAttrString(mod, imports[i].name);
        Py_DECREF(mod);
        if (!*imports[i].dst)
            return -1;
    }
    struct {
        PyObject **dst;
        const char *s;
    } strs[] = {
        {&g_str_channel_id, "channel_id"}, {&g_str_idstr, "idstr"}, {&g_str_instance, "instance"},
        {&g_str_version, "version"},       {&g_str_idx, "idx"},     {&g_str_flags, "flags"},
        {&g_str_size, "size"},             {&g_str_uuid, "uuid"},   {&g_str_channels, "channels"},
        {&g_str_device, "device"},
    };
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++)
        if (!(*strs[i].dst = PyUnicode_InternFromString(strs[i].s)))
            return -1;
    return 0;
}

PyMODINIT_FUNC PyInit__native(void)
{
    if (import_names() < 0 || PyType_Ready(&FramerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Framer", (PyObject *)&FramerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
