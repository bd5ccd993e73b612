/* glue_framer_events.c - what Framer.next_event returns: the reference's event objects
 * (ChannelHello, PacketHeader, RamSkipped, ChannelEnd) and its errors, with the same
 * text; an error poisons the framer, so every later call raises it again. */
#include "glue.h"

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
    if (device && (PyDict_SetItem(kw, vfiomig_py.str_device, device) < 0 ||
                   PyDict_SetItem(kw, vfiomig_py.str_idx, idx) < 0))
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

PyObject *vfiomig_framer_reraise(Framer *self)
{
    PyErr_SetObject((PyObject *)Py_TYPE(self->error), self->error);
    return NULL;
}

PyObject *vfiomig_framer_truncated(Framer *self)
{
    PyObject *cur = self->current;
    PyObject *idstr = PyObject_GetAttr(cur, vfiomig_py.str_idstr);
    PyObject *inst = PyObject_GetAttr(cur, vfiomig_py.str_instance);
    PyObject *idx = PyObject_GetAttr(cur, vfiomig_py.str_idx);
    PyObject *size = PyObject_GetAttr(cur, vfiomig_py.str_size);
    PyObject *device = NULL, *msg = NULL, *exc = NULL, *args = NULL, *kw = NULL;
    if (!idstr || !inst || !idx || !size)
        goto out;
    unsigned long long total = PyLong_AsUnsignedLongLong(size);
    if (PyErr_Occurred())
        goto out;
    device = PyUnicode_FromFormat("%U/%S", idstr, inst);
    if (!device)
        goto out;
    /* data received counts whether read or still buffered (pump_recv keeps a packet
     * smaller than a quarter of its buffer in it until it is whole) */
    uint64_t rem = self->f.remaining, buffered = self->f.end - self->f.pos;
    uint64_t got = total - rem + (buffered < rem ? buffered : rem);
    msg = PyUnicode_FromFormat("%U: channel ended inside packet idx %S (%llu of %llu bytes)",
                               device, idx, (unsigned long long)got, total);
    args = msg ? PyTuple_Pack(1, msg) : NULL;
    kw = args ? Py_BuildValue("{OOOO}", vfiomig_py.str_device, device, vfiomig_py.str_idx, idx)
              : NULL;
    if (kw) {
        exc = PyObject_Call(vfiomig_py.incomplete_error, args, kw);
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

PyObject *vfiomig_framer_error(Framer *self, const struct vfm_out *o)
{
    PyObject *name = NULL, *msg = NULL, *cls = vfiomig_py.packet_error;
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
        cls = vfiomig_py.incomplete_error;
        msg = PyUnicode_FromFormat("%U: channel ended inside a packet header (%u of %u bytes)",
                                   name, o->value, VFM_COMMON_SIZE);
        break;
    case VFM_E_EOF_HEADER:
        cls = vfiomig_py.incomplete_error;
        msg = PyUnicode_FromFormat("%U: channel ended inside a packet header (%u bytes)", name,
                                   o->value);
        break;
    case VFM_E_EOF_RAM:
        cls = vfiomig_py.incomplete_error;
        msg = PyUnicode_FromFormat("%U: channel ended inside a ram packet (%llu bytes missing)",
                                   name, (unsigned long long)o->size);
        break;
    case VFM_E_EOF_HANDSHAKE:
        cls = vfiomig_py.incomplete_error;
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

PyObject *vfiomig_framer_idstr(Framer *self, const struct vfm_out *o)
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

PyObject *vfiomig_framer_packet(Framer *self, const struct vfm_out *o)
{
    PyObject *names[] = {vfiomig_py.str_idstr, vfiomig_py.str_instance, vfiomig_py.str_version,
                         vfiomig_py.str_idx,   vfiomig_py.str_flags,    vfiomig_py.str_size};
    PyObject *values[6] = {
        vfiomig_framer_idstr(self, o),          PyLong_FromUnsignedLong(o->instance),
        PyLong_FromUnsignedLong(o->version), PyLong_FromUnsignedLong(o->idx),
        PyLong_FromUnsignedLong(o->flags),   PyLong_FromUnsignedLongLong(o->size),
    };
    PyObject *ev = make_event(vfiomig_py.header, names, values, 6);
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
    PyObject *kwnames = PyTuple_Pack(2, vfiomig_py.str_uuid, vfiomig_py.str_channels);
    PyObject *cid =
        kwnames ? PyObject_Vectorcall(vfiomig_py.decode_handshake, args, 1, kwnames) : NULL;
    Py_DECREF(data);
    Py_XDECREF(kwnames);
    if (!cid) {
        if (PyErr_ExceptionMatches(vfiomig_py.vfio_error)) {
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
    PyObject *names[] = {vfiomig_py.str_channel_id};
    return make_event(vfiomig_py.hello, names, &self->channel_id, 1);
}

PyObject *vfiomig_Framer_next_event(Framer *self, PyObject *Py_UNUSED(ignored))
{
    if (self->error)
        return vfiomig_framer_reraise(self);
    if (self->f.state == VFM_S_PAYLOAD) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the current packet's data must be read before the next event");
        return NULL;
    }
    struct vfm_out o;
    switch (vfm_next(&self->f, framer_data(self), &o)) {
    case VFM_EV_NEED_DATA:
        return Py_NewRef(vfiomig_py.need_data);
    case VFM_EV_HANDSHAKE:
        return framer_handshake(self, &o);
    case VFM_EV_PACKET:
        return vfiomig_framer_packet(self, &o);
    case VFM_EV_RAM: {
        PyObject *names[] = {vfiomig_py.str_flags, vfiomig_py.str_size};
        PyObject *values[] = {PyLong_FromUnsignedLong(o.flags),
                              PyLong_FromUnsignedLongLong(o.size)};
        PyObject *ev = make_event(vfiomig_py.ram, names, values, 2);
        Py_XDECREF(values[0]);
        Py_XDECREF(values[1]);
        return ev;
    }
    case VFM_EV_END:
        return PyObject_CallNoArgs(vfiomig_py.end);
    case VFM_EV_ERROR:
    default:
        return vfiomig_framer_error(self, &o);
    }
}

PyObject *vfiomig_framer_raise_truncated(Framer *self)
{
    PyObject *exc = vfiomig_framer_truncated(self);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}
