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
#include "vfiomig_reorder.h"
#include "vfiomig_writer.h"

static PyObject *g_need_data, *g_hello, *g_header, *g_ram, *g_end, *g_decode_handshake;
static PyObject *g_vfio_error, *g_packet_error, *g_incomplete_error, *g_config_error;
static PyObject *g_ready, *g_statistics, *g_check_config_blob;
static PyObject *g_str_channel_id, *g_str_idstr, *g_str_instance, *g_str_version, *g_str_idx,
    *g_str_flags, *g_str_size, *g_str_uuid, *g_str_channels, *g_str_device;

/* -- Budget ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    long long limit, queued, peak;
} Budget;

static int budget_init(Budget *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"limit", NULL};
    long long limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "L", kwlist, &limit))
        return -1;
    self->limit = limit;
    self->queued = self->peak = 0;
    return 0;
}

static void budget_add(Budget *b, long long n)
{
    b->queued += n;
    if (b->queued > b->peak)
        b->peak = b->queued;
}

static int budget_release(Budget *b, long long n)
{
    b->queued -= n;
    if (b->queued < 0) {
        PyErr_SetString(PyExc_AssertionError, "budget released more than it held");
        return -1;
    }
    return 0;
}

static PyObject *Budget_add(Budget *self, PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    budget_add(self, n);
    Py_RETURN_NONE;
}

static PyObject *Budget_release(Budget *self, PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if ((n == -1 && PyErr_Occurred()) || budget_release(self, n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMemberDef Budget_members[] = {
    {"limit", T_LONGLONG, offsetof(Budget, limit), 0, NULL},
    {"queued", T_LONGLONG, offsetof(Budget, queued), 0, NULL},
    {"peak", T_LONGLONG, offsetof(Budget, peak), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Budget_methods[] = {
    {"add", (PyCFunction)Budget_add, METH_O, NULL},
    {"release", (PyCFunction)Budget_release, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BudgetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.Budget",
    .tp_doc = "Queued-bytes accounting shared by the devices of one session.",
    .tp_basicsize = sizeof(Budget),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)budget_init,
    .tp_members = Budget_members,
    .tp_methods = Budget_methods,
};

/* -- ReorderBuffer ------------------------------------------------------------------ */

#define MAX_BATCH_CHUNKS 1024
#define MAX_BATCH_BYTES (16ll * 1024 * 1024)

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
    long long queued_packets, queued_bytes, peak_queued, received, written_bytes,
        written_packets, precopy_bytes, unwritten;
} Reorder;

static PyTypeObject ReorderType;

static void reorder_drop_slots(Reorder *self)
{
    for (size_t i = 0; i < self->r.cap; i++)
        if (self->r.tab[i].used)
            Py_CLEAR(self->r.tab[i].data);
    vfm_reorder_free(&self->r);
}

static int reorder_traverse(Reorder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->name);
    Py_VISIT(self->budget);
    Py_VISIT(self->config);
    Py_VISIT(self->precopy);
    Py_VISIT(self->error);
    for (size_t i = 0; i < self->r.cap; i++)
        if (self->r.tab[i].used && self->r.tab[i].data)
            Py_VISIT((PyObject *)self->r.tab[i].data);
    return 0;
}

static int reorder_clear(Reorder *self)
{
    Py_CLEAR(self->name);
    Py_CLEAR(self->budget);
    Py_CLEAR(self->config);
    Py_CLEAR(self->precopy);
    Py_CLEAR(self->error);
    reorder_drop_slots(self);
    return 0;
}

static void reorder_dealloc(Reorder *self)
{
    PyObject_GC_UnTrack(self);
    reorder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int reorder_init(Reorder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "budget", NULL};
    PyObject *name, *budget;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UO!", kwlist, &name, &BudgetType, &budget))
        return -1;
    reorder_clear(self);
    vfm_reorder_init(&self->r);
    self->name = Py_NewRef(name);
    self->budget = (Budget *)Py_NewRef(budget);
    self->precopy = PyList_New(0);
    self->gate_open = self->loaded = self->multifd_taken = 0;
    self->starved_seconds = 0.0;
    self->queued_packets = self->queued_bytes = self->peak_queued = self->received = 0;
    self->written_bytes = self->written_packets = self->precopy_bytes = self->unwritten = 0;
    return self->precopy ? 0 : -1;
}

/* Raise cls(msg, device=name, idx=idx) and poison the buffer with it.  Steals msg. */
static int reorder_raise(Reorder *self, PyObject *cls, PyObject *msg, long long idx)
{
    PyObject *idxo = msg ? PyLong_FromLongLong(idx) : NULL;
    PyObject *args = idxo ? PyTuple_Pack(1, msg) : NULL;
    PyObject *kw = args ? Py_BuildValue("{OOOO}", g_str_device, self->name, g_str_idx, idxo)
                        : NULL;
    PyObject *exc = kw ? PyObject_Call(cls, args, kw) : NULL;
    if (exc) {
        if (!self->error)
            self->error = Py_NewRef(exc);
        PyErr_SetObject(cls, exc);
        Py_DECREF(exc);
    }
    Py_XDECREF(msg);
    Py_XDECREF(idxo);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    return -1;
}

static int reorder_reraise(Reorder *self)
{
    PyErr_SetObject((PyObject *)Py_TYPE(self->error), self->error);
    return -1;
}

static void reorder_queue(Reorder *self, long long nbytes, long long npackets)
{
    self->queued_bytes += nbytes;
    self->queued_packets += npackets;
    budget_add(self->budget, nbytes);
    if (self->queued_bytes > self->peak_queued)
        self->peak_queued = self->queued_bytes;
}

/* ReorderBuffer.offer: 1 accepted, 0 refused for budget, -1 error raised. */
static int reorder_offer(Reorder *self, uint32_t version, uint32_t idx, uint32_t flags,
                         uint64_t size)
{
    if (self->error)
        return reorder_reraise(self);
    PyObject *n = self->name, *msg = NULL, *cls = g_packet_error;
    switch (vfm_reorder_check(&self->r, version, idx, flags)) {
    case VFM_R_OK:
        break;
    case VFM_R_VERSION:
        msg = PyUnicode_FromFormat("%U: packet idx %u has unknown version %u (expected 0)", n,
                                   idx, version);
        return reorder_raise(self, cls, msg, idx);
    case VFM_R_INVALID:
        msg = PyUnicode_FromFormat("%U: packet index is invalid (0x%x)", n, idx);
        return reorder_raise(self, cls, msg, idx);
    case VFM_R_WRITTEN:
        msg = PyUnicode_FromFormat("%U: packet idx %u already written", n, idx);
        return reorder_raise(self, cls, msg, idx);
    case VFM_R_RECEIVED:
        msg = PyUnicode_FromFormat("%U: packet idx %u already received", n, idx);
        return reorder_raise(self, cls, msg, idx);
    case VFM_R_SECOND_CONFIG:
        msg = PyUnicode_FromFormat("%U: second config packet idx %u (first was idx %lld)", n,
                                   idx, (long long)self->r.config_idx);
        return reorder_raise(self, g_config_error, msg, idx);
    case VFM_R_CONFIG_BELOW:
        msg = PyUnicode_FromFormat("%U: config packet idx %u is below data idx %lld", n, idx,
                                   (long long)self->r.max_data_idx);
        return reorder_raise(self, cls, msg, idx);
    case VFM_R_DATA_ABOVE:
    default:
        msg = PyUnicode_FromFormat("%U: data packet idx %u is above the config idx %lld", n,
                                   idx, (long long)self->r.config_idx);
        return reorder_raise(self, cls, msg, idx);
    }
    /* Over budget only for the config packet, or the next idx while the loader is idle. */
    if (!((flags & VFM_VFIO_FLAG_CONFIG) ||
          ((int64_t)idx == self->r.next_idx && self->unwritten == 0))) {
        if (self->budget->queued + (long long)size > self->budget->limit)
            return 0;
    }
    if (!vfm_slot_add(&self->r, idx, size)) {
        PyErr_NoMemory();
        return -1;
    }
    reorder_queue(self, (long long)size, 1);
    if (flags & VFM_VFIO_FLAG_CONFIG)
        self->r.config_idx = idx;
    else if ((int64_t)idx > self->r.max_data_idx)
        self->r.max_data_idx = idx;
    return 1;
}

/* ReorderBuffer.deliver: 0, or -1 with an error raised.  Does not steal data. */
static int reorder_deliver(Reorder *self, uint32_t idx, PyObject *data, Py_ssize_t len)
{
    if (self->error)
        return reorder_reraise(self);
    struct vfm_slot *s = vfm_slot_find(&self->r, idx);
    if (!s || s->data) {
        PyErr_SetString(PyExc_AssertionError, "deliver() without an accepted offer");
        return -1;
    }
    if ((uint64_t)len != s->size) {
        PyErr_SetString(PyExc_AssertionError, "delivered size differs from the offer");
        return -1;
    }
    self->received++;
    if ((int64_t)idx == self->r.config_idx) {
        PyObject *r = PyObject_CallFunction(g_check_config_blob, "OIO", self->name, idx, data);
        if (!r) {
            if (PyErr_ExceptionMatches(g_vfio_error) && !self->error) {
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                PyErr_NormalizeException(&type, &value, &tb);
                self->error = Py_XNewRef(value);
                PyErr_Restore(type, value, tb);
            }
            return -1;
        }
        Py_DECREF(r);
        PyObject *blob = PyBytes_CheckExact(data) ? Py_NewRef(data)
                                                  : PyBytes_FromObject(data);
        if (!blob)
            return -1;
        vfm_slot_remove(&self->r, s);
        Py_XSETREF(self->config, blob);
        return 0;
    }
    s->data = Py_NewRef(data);
    self->r.delivered++;
    return 0;
}

static PyObject *Reorder_offer(Reorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "offer() takes version, idx, flags, size");
        return NULL;
    }
    unsigned long v[4];
    for (int i = 0; i < 4; i++) {
        v[i] = PyLong_AsUnsignedLong(args[i]);
        if (v[i] == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        if (v[i] > (i == 3 ? 0xFFFFFFFFul * 2 : 0xFFFFFFFFul)) {
            PyErr_SetString(PyExc_OverflowError, "offer() argument out of range");
            return NULL;
        }
    }
    int r = reorder_offer(self, (uint32_t)v[0], (uint32_t)v[1], (uint32_t)v[2], v[3]);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *Reorder_deliver(Reorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "deliver() takes idx, data");
        return NULL;
    }
    unsigned long idx = PyLong_AsUnsignedLong(args[0]);
    if (idx == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t len = PyObject_Length(args[1]);
    if (len < 0)
        return NULL;
    if (idx > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_AssertionError, "deliver() without an accepted offer");
        return NULL;
    }
    if (reorder_deliver(self, (uint32_t)idx, args[1], len) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Reorder_add_precopy(Reorder *self, PyObject *data)
{
    if (self->error)
        return reorder_reraise(self), NULL;
    if (self->multifd_taken) {
        long long last = (long long)self->r.next_idx - 1;
        PyObject *msg = PyUnicode_FromFormat(
            "%U: precopy data after multifd data idx %lld was written", self->name, last);
        return reorder_raise(self, g_packet_error, msg, last), NULL;
    }
    Py_ssize_t n = PyObject_Length(data);
    if (n < 0)
        return NULL;
    if (n) {
        if (PyList_Append(self->precopy, data) < 0)
            return NULL;
        reorder_queue(self, n, 1);
    }
    Py_RETURN_NONE;
}

static PyObject *Reorder_open_gate(Reorder *self, PyObject *Py_UNUSED(ignored))
{
    self->gate_open = 1;
    Py_RETURN_NONE;
}

static PyObject *Reorder_fail(Reorder *self, PyObject *error)
{
    if (!self->error)
        self->error = Py_NewRef(error);
    Py_RETURN_NONE;
}

static int reorder_finishable(Reorder *self)
{
    return self->gate_open && self->config && self->r.next_idx == self->r.config_idx &&
           PyList_GET_SIZE(self->precopy) == 0 && self->unwritten == 0 && !self->error &&
           !self->loaded;
}

static int reorder_has_ready(Reorder *self)
{
    if (PyList_GET_SIZE(self->precopy))
        return 1;
    if (!self->gate_open)
        return 0;
    struct vfm_slot *s = self->r.next_idx <= 0xFFFFFFFFll
                             ? vfm_slot_find(&self->r, (uint32_t)self->r.next_idx)
                             : NULL;
    return (s && s->data) || reorder_finishable(self);
}

static PyObject *Reorder_has_ready(Reorder *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(reorder_has_ready(self));
}

static PyObject *make_ready(PyObject *chunks, long long nbytes, long long first, long long end,
                            int precopy)
{
    PyObject *args[] = {chunks,
                        PyLong_FromLongLong(nbytes),
                        PyLong_FromLongLong(first),
                        PyLong_FromLongLong(end),
                        PyBool_FromLong(precopy)};
    PyObject *ready = NULL;
    if (args[1] && args[2] && args[3])
        ready = PyObject_Vectorcall(g_ready, args, 5, NULL);
    for (int i = 1; i < 5; i++)
        Py_XDECREF(args[i]);
    return ready;
}

static PyObject *Reorder_take_ready(Reorder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->error)
        return reorder_reraise(self), NULL;
    long long next = (long long)self->r.next_idx;
    Py_ssize_t npre = PyList_GET_SIZE(self->precopy);
    if (npre) {
        PyObject *chunks = self->precopy;
        long long nbytes = 0;
        for (Py_ssize_t i = 0; i < npre; i++) {
            Py_ssize_t n = PyObject_Length(PyList_GET_ITEM(chunks, i));
            if (n < 0)
                return NULL;
            nbytes += n;
        }
        PyObject *fresh = PyList_New(0);
        if (!fresh)
            return NULL;
        PyObject *ready = make_ready(chunks, nbytes, next, next, 1);
        if (!ready) {
            Py_DECREF(fresh);
            return NULL;
        }
        Py_SETREF(self->precopy, fresh);
        self->precopy_bytes += nbytes;
        self->unwritten += nbytes;
        self->queued_packets -= npre;
        return ready;
    }
    if (!self->gate_open)
        Py_RETURN_NONE;
    PyObject *chunks = PyList_New(0);
    if (!chunks)
        return NULL;
    long long idx = next, nbytes = 0, npackets = 0;
    while (PyList_GET_SIZE(chunks) < MAX_BATCH_CHUNKS && nbytes < MAX_BATCH_BYTES &&
           idx <= 0xFFFFFFFFll) {
        struct vfm_slot *s = vfm_slot_find(&self->r, (uint32_t)idx);
        if (!s || !s->data)
            break;
        PyObject *data = s->data;
        long long n = (long long)s->size;
        if (n && PyList_Append(chunks, data) < 0) {
            Py_DECREF(chunks);
            return NULL; /* nothing was taken out of the slot: the buffer is unchanged */
        }
        s->data = NULL;
        vfm_slot_remove(&self->r, s);
        self->r.delivered--;
        Py_DECREF(data);
        nbytes += n;
        npackets++;
        idx++;
    }
    if (!npackets) {
        Py_DECREF(chunks);
        Py_RETURN_NONE;
    }
    self->multifd_taken = 1;
    self->r.next_idx = idx;
    self->queued_packets -= npackets;
    self->written_packets += npackets;
    self->unwritten += nbytes;
    PyObject *ready = make_ready(chunks, nbytes, next, idx, 0);
    Py_DECREF(chunks);
    return ready;
}

static PyObject *Reorder_written(Reorder *self, PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > self->unwritten) {
        PyErr_SetString(PyExc_AssertionError, "written more than was taken");
        return NULL;
    }
    self->unwritten -= n;
    self->written_bytes += n;
    self->queued_bytes -= n;
    if (budget_release(self->budget, n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Reorder_mark_loaded(Reorder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->error) { /* poisoned while the finish step ran: not loaded */
        reorder_reraise(self);
        return NULL;
    }
    if (!reorder_finishable(self)) {
        PyErr_SetString(PyExc_AssertionError, "mark_loaded() before the device could finish");
        return NULL;
    }
    long long n = (long long)PyBytes_GET_SIZE(self->config);
    self->queued_bytes -= n;
    self->queued_packets -= 1;
    if (n == 0)
        budget_add(self->budget, 0);
    else if (budget_release(self->budget, n) < 0)
        return NULL;
    self->loaded = 1;
    Py_RETURN_NONE;
}

/* The end of the known stream and the missing idx below it (see ReorderBuffer.missing). */
static long long reorder_end(Reorder *self)
{
    return self->r.config_idx >= 0 ? (long long)self->r.config_idx
                                   : (long long)self->r.max_data_idx + 1;
}

static PyObject *reorder_missing(Reorder *self, long long limit, long long *count)
{
    long long end = reorder_end(self), next = (long long)self->r.next_idx;
    /* Every slot holding data is a data idx in [next_idx, end): count without a scan. */
    *count = end > next ? end - next - (long long)self->r.delivered : 0;
    PyObject *first = PyList_New(0);
    if (!first)
        return NULL;
    for (long long i = next, found = 0; i < end && found < limit && found < *count; i++) {
        struct vfm_slot *s = vfm_slot_find(&self->r, (uint32_t)i);
        if (s && s->data)
            continue;
        found++;
        PyObject *v = PyLong_FromLongLong(i);
        if (!v || PyList_Append(first, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(first);
            return NULL;
        }
        Py_DECREF(v);
    }
    return first;
}

static PyObject *Reorder_missing(Reorder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"limit", NULL};
    long long limit = 8, count;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|L", kwlist, &limit))
        return NULL;
    PyObject *first = reorder_missing(self, limit, &count);
    if (!first)
        return NULL;
    return Py_BuildValue("(NLO)", first, count, self->config ? Py_False : Py_True);
}

static PyObject *Reorder_incomplete_error(Reorder *self, PyObject *why)
{
    if (!PyUnicode_Check(why)) {
        PyErr_SetString(PyExc_TypeError, "incomplete_error() takes a str");
        return NULL;
    }
    long long count;
    PyObject *first = reorder_missing(self, 8, &count);
    if (!first)
        return NULL;
    PyObject *parts = PyList_New(0), *what = NULL, *msg = NULL, *exc = NULL, *args = NULL,
             *kw = NULL, *idx = NULL;
    if (!parts)
        goto out;
    if (count) {
        PyObject *sep = PyUnicode_FromString(", ");
        PyObject *strs = sep ? PyList_New(0) : NULL;
        PyObject *listed = NULL, *part = NULL;
        for (Py_ssize_t i = 0; strs && i < PyList_GET_SIZE(first); i++) {
            PyObject *s = PyObject_Str(PyList_GET_ITEM(first, i));
            if (!s || PyList_Append(strs, s) < 0) {
                Py_XDECREF(s);
                Py_CLEAR(strs);
                break;
            }
            Py_DECREF(s);
        }
        listed = strs ? PyUnicode_Join(sep, strs) : NULL;
        long long shown = (long long)PyList_GET_SIZE(first);
        if (listed) {
            if (count > shown)
                part = PyUnicode_FromFormat("missing idx %U and %lld more (%lld packets)",
                                            listed, count - shown, count);
            else
                part = PyUnicode_FromFormat("missing idx %U (%lld packets)", listed, count);
        }
        int bad = !part || PyList_Append(parts, part) < 0;
        Py_XDECREF(sep);
        Py_XDECREF(strs);
        Py_XDECREF(listed);
        Py_XDECREF(part);
        if (bad)
            goto out;
    }
    if (!self->config) {
        PyObject *part = PyUnicode_FromString("config packet not received");
        int bad = !part || PyList_Append(parts, part) < 0;
        Py_XDECREF(part);
        if (bad)
            goto out;
    }
    if (PyList_GET_SIZE(parts)) {
        PyObject *sep = PyUnicode_FromString("; ");
        what = sep ? PyUnicode_Join(sep, parts) : NULL;
        Py_XDECREF(sep);
    } else {
        what = PyUnicode_FromString("nothing missing");
    }
    if (!what)
        goto out;
    msg = PyUnicode_FromFormat("%U: %U: %U", self->name, why, what);
    idx = PyList_GET_SIZE(first) ? Py_NewRef(PyList_GET_ITEM(first, 0)) : Py_NewRef(Py_None);
    args = msg ? PyTuple_Pack(1, msg) : NULL;
    kw = args ? Py_BuildValue("{OOOO}", g_str_device, self->name, g_str_idx, idx) : NULL;
    if (kw)
        exc = PyObject_Call(g_incomplete_error, args, kw);
out:
    Py_DECREF(first);
    Py_XDECREF(parts);
    Py_XDECREF(what);
    Py_XDECREF(msg);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    Py_XDECREF(idx);
    return exc;
}

static PyObject *Reorder_statistics(Reorder *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *args[] = {
        Py_NewRef(self->name),
        PyLong_FromLongLong((long long)self->r.next_idx),
        self->r.config_idx >= 0 ? PyLong_FromLongLong((long long)self->r.config_idx)
                                : Py_NewRef(Py_None),
        PyLong_FromLongLong(self->queued_bytes),
        PyLong_FromLongLong(self->queued_packets),
        PyLong_FromLongLong(self->peak_queued),
        PyLong_FromLongLong(self->received),
        PyLong_FromLongLong(self->written_bytes),
        PyLong_FromLongLong(self->written_packets),
        PyLong_FromLongLong(self->precopy_bytes),
        PyFloat_FromDouble(self->starved_seconds),
        PyBool_FromLong(self->gate_open),
        PyBool_FromLong(self->loaded),
    };
    enum { N = sizeof(args) / sizeof(args[0]) };
    PyObject *st = NULL;
    int ok = 1;
    for (int i = 0; i < N; i++)
        ok = ok && args[i];
    if (ok)
        st = PyObject_Vectorcall(g_statistics, args, N, NULL);
    for (int i = 0; i < N; i++)
        Py_XDECREF(args[i]);
    return st;
}

static PyObject *Reorder_get_next_idx(Reorder *self, void *Py_UNUSED(c))
{
    return PyLong_FromLongLong((long long)self->r.next_idx);
}

static PyObject *Reorder_get_config_idx(Reorder *self, void *Py_UNUSED(c))
{
    if (self->r.config_idx < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong((long long)self->r.config_idx);
}

static PyObject *Reorder_get_obj(Reorder *self, void *c)
{
    PyObject *v = *(PyObject **)((char *)self + (size_t)c);
    return Py_NewRef(v ? v : Py_None);
}

static PyObject *Reorder_get_gate_open(Reorder *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->gate_open);
}

static PyObject *Reorder_get_loaded(Reorder *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->loaded);
}

static PyObject *Reorder_get_finishable(Reorder *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(reorder_finishable(self));
}

static PyObject *Reorder_get_complete(Reorder *self, void *Py_UNUSED(c))
{
    /* Every data slot lies in [next_idx, config_idx): complete when all of them hold data. */
    if (!self->config || self->r.config_idx < 0)
        Py_RETURN_FALSE;
    long long want = (long long)self->r.config_idx - (long long)self->r.next_idx;
    return PyBool_FromLong(want <= 0 || (long long)self->r.delivered == want);
}

static PyObject *Reorder_get_starved(Reorder *self, void *Py_UNUSED(c))
{
    return PyFloat_FromDouble(self->starved_seconds);
}

static int Reorder_set_starved(Reorder *self, PyObject *value, void *Py_UNUSED(c))
{
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete this attribute");
        return -1;
    }
    double v = PyFloat_AsDouble(value);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    self->starved_seconds = v;
    return 0;
}

static PyGetSetDef Reorder_getset[] = {
    {"name", (getter)Reorder_get_obj, NULL, NULL, (void *)offsetof(Reorder, name)},
    {"budget", (getter)Reorder_get_obj, NULL, NULL, (void *)offsetof(Reorder, budget)},
    {"config", (getter)Reorder_get_obj, NULL, NULL, (void *)offsetof(Reorder, config)},
    {"error", (getter)Reorder_get_obj, NULL, NULL, (void *)offsetof(Reorder, error)},
    {"next_idx", (getter)Reorder_get_next_idx, NULL, NULL, NULL},
    {"config_idx", (getter)Reorder_get_config_idx, NULL, NULL, NULL},
    {"gate_open", (getter)Reorder_get_gate_open, NULL, NULL, NULL},
    {"loaded", (getter)Reorder_get_loaded, NULL, NULL, NULL},
    {"finishable", (getter)Reorder_get_finishable, NULL, NULL, NULL},
    {"complete", (getter)Reorder_get_complete, NULL, NULL, NULL},
    {"starved_seconds", (getter)Reorder_get_starved, (setter)Reorder_set_starved, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Reorder_methods[] = {
    {"offer", (PyCFunction)(void (*)(void))Reorder_offer, METH_FASTCALL, NULL},
    {"deliver", (PyCFunction)(void (*)(void))Reorder_deliver, METH_FASTCALL, NULL},
    {"add_precopy", (PyCFunction)Reorder_add_precopy, METH_O, NULL},
    {"open_gate", (PyCFunction)Reorder_open_gate, METH_NOARGS, NULL},
    {"fail", (PyCFunction)Reorder_fail, METH_O, NULL},
    {"has_ready", (PyCFunction)Reorder_has_ready, METH_NOARGS, NULL},
    {"take_ready", (PyCFunction)Reorder_take_ready, METH_NOARGS, NULL},
    {"written", (PyCFunction)Reorder_written, METH_O, NULL},
    {"mark_loaded", (PyCFunction)Reorder_mark_loaded, METH_NOARGS, NULL},
    {"missing", (PyCFunction)(void (*)(void))Reorder_missing, METH_VARARGS | METH_KEYWORDS,
     NULL},
    {"incomplete_error", (PyCFunction)Reorder_incomplete_error, METH_O, NULL},
    {"statistics", (PyCFunction)Reorder_statistics, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReorderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.ReorderBuffer",
    .tp_doc = "Reassembles one device's packets (C twin of vfiomig._core._reorder).",
    .tp_basicsize = sizeof(Reorder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reorder_init,
    .tp_dealloc = (destructor)reorder_dealloc,
    .tp_traverse = (traverseproc)reorder_traverse,
    .tp_clear = (inquiry)reorder_clear,
    .tp_methods = Reorder_methods,
    .tp_getset = Reorder_getset,
};

/* -- Framer ------------------------------------------------------------------------- */

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
    Py_VISIT(self->routes);
    Py_VISIT(self->route_buf);
    Py_VISIT(self->pending);
    Py_VISIT(self->pending_buf);
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

/* -- pump: many packets per call --------------------------------------------------- */

enum { PUMP_NEED_DATA, PUMP_END, PUMP_HEADER, PUMP_ACCEPTED, PUMP_WOULD_BLOCK };

/* (status, packets done, PacketHeader or None).  Steals hdr; NULL hdr with an error set
 * (from framer_packet) passes the error on. */
static PyObject *pump_result(int status, long long done, PyObject *hdr, int want_hdr)
{
    if (want_hdr && !hdr)
        return NULL;
    return Py_BuildValue("(iLN)", status, done, hdr ? hdr : Py_NewRef(Py_None));
}

/* The reorder buffer for the packet in o, or NULL: *err says whether an error was raised.
 * The last hit is cached by its raw idstr bytes, so a run of packets of one device costs a
 * memcmp; routes may only grow (a key, once there, keeps its buffer). */
static Reorder *framer_route(Framer *self, const struct vfm_out *o, PyObject *routes, int *err)
{
    const char *raw = (const char *)framer_data(self) + o->offset;
    *err = 0;
    if (self->route_buf && self->routes == routes && self->route_instance == o->instance &&
        self->route_len == o->idstr_len && memcmp(self->route_raw, raw, o->idstr_len) == 0)
        return self->route_buf;
    PyObject *idstr = framer_idstr(self, o);
    PyObject *inst = idstr ? PyLong_FromUnsignedLong(o->instance) : NULL;
    PyObject *key = inst ? PyTuple_Pack(2, idstr, inst) : NULL;
    PyObject *buf = key ? PyDict_GetItemWithError(routes, key) : NULL; /* borrowed */
    Py_XDECREF(idstr);
    Py_XDECREF(inst);
    Py_XDECREF(key);
    if (!buf) {
        *err = PyErr_Occurred() != NULL;
        return NULL;
    }
    if (!PyObject_TypeCheck(buf, &ReorderType)) {
        PyErr_SetString(PyExc_TypeError, "pump() routes must map to vfiomig._native.ReorderBuffer");
        *err = 1;
        return NULL;
    }
    Py_XSETREF(self->routes, Py_NewRef(routes));
    Py_XSETREF(self->route_buf, (Reorder *)Py_NewRef(buf));
    memcpy(self->route_raw, raw, o->idstr_len);
    self->route_len = o->idstr_len;
    self->route_instance = o->instance;
    return self->route_buf;
}

/* The loop of pump(): returns a PUMP_ status (PUMP_HEADER and PUMP_ACCEPTED with the
 * packet in *o and, for PUMP_ACCEPTED, its buffer in *bufp, borrowed), or -1 with an error
 * set.  *done counts the packets handled completely. */
static int framer_pump_loop(Framer *self, PyObject *routes, long long *done, struct vfm_out *o,
                            Reorder **bufp)
{
    for (;;) {
        if (self->error) {
            framer_reraise(self);
            return -1;
        }
        if (self->f.state == VFM_S_PAYLOAD) {
            PyErr_SetString(PyExc_RuntimeError,
                            "the current packet's data must be read before the next event");
            return -1;
        }
        if (self->f.state == VFM_S_HANDSHAKE) {
            PyErr_SetString(PyExc_RuntimeError, "pump() before the handshake");
            return -1;
        }
        switch (vfm_next(&self->f, framer_data(self), o)) {
        case VFM_EV_NEED_DATA:
            return PUMP_NEED_DATA;
        case VFM_EV_RAM:
            ++*done;
            continue;
        case VFM_EV_END:
            return PUMP_END;
        case VFM_EV_PACKET:
            break;
        case VFM_EV_HANDSHAKE: /* excluded by the state check above */
        case VFM_EV_ERROR:
        default:
            framer_error(self, o);
            return -1;
        }
        int err;
        Reorder *buf = framer_route(self, o, routes, &err);
        if (err)
            return -1;
        int ok = buf ? reorder_offer(buf, o->version, o->idx, o->flags, o->size) : 0;
        if (ok < 0)
            return -1;
        if (!ok) /* unknown or new device, or no budget: the caller takes this packet */
            return PUMP_HEADER;
        PyObject *data;
        if (o->size == 0) {
            data = PyBytes_FromStringAndSize(NULL, 0);
        } else if (self->f.end - self->f.pos >= o->size) {
            data = PyBytes_FromStringAndSize((const char *)framer_data(self) + self->f.pos,
                                             (Py_ssize_t)o->size);
            if (data)
                vfm_advance(&self->f, o->size, 1);
        } else { /* accepted, its data still to receive */
            *bufp = buf;
            return PUMP_ACCEPTED;
        }
        if (!data)
            return -1;
        int r = reorder_deliver(buf, o->idx, data, (Py_ssize_t)o->size);
        Py_DECREF(data);
        if (r < 0)
            return -1;
        ++*done;
    }
}

static PyObject *Framer_pump(Framer *self, PyObject *routes)
{
    if (!PyDict_Check(routes)) {
        PyErr_SetString(PyExc_TypeError, "pump() takes a dict of routes");
        return NULL;
    }
    long long done = 0;
    struct vfm_out o;
    Reorder *buf = NULL;
    int status = framer_pump_loop(self, routes, &done, &o, &buf);
    if (status < 0)
        return NULL;
    if (status == PUMP_HEADER || status == PUMP_ACCEPTED)
        return pump_result(status, done, framer_packet(self, &o), 1);
    return pump_result(status, done, NULL, 0);
}

/* -- pump_recv: the channel's data plane in one call -------------------------------- */

#define RECV_CHUNK (256 * 1024)
#define BIG_PAYLOAD (64 * 1024)
#define PACKET_HEAD (VFM_DEVICE_HEADER_SIZE + VFM_VFIO_HEADER_SIZE)

static int framer_make_room(Framer *self, size_t n);

/* recv_into(memoryview of n bytes at p): the byte count, -2 for BlockingIOError (cleared),
 * -1 with an error set. */
static Py_ssize_t framer_recv(PyObject *recv_into, char *p, Py_ssize_t n)
{
    PyObject *mv = PyMemoryView_FromMemory(p, n, PyBUF_WRITE);
    if (!mv)
        return -1;
    PyObject *r = PyObject_CallOneArg(recv_into, mv);
    Py_DECREF(mv);
    if (!r) {
        if (PyErr_ExceptionMatches(PyExc_BlockingIOError)) {
            PyErr_Clear();
            return -2;
        }
        return -1;
    }
    Py_ssize_t got = PyLong_AsSsize_t(r);
    Py_DECREF(r);
    if (got == -1 && PyErr_Occurred())
        return -1;
    if (got < 0 || got > n) {
        PyErr_Format(PyExc_ValueError, "recv_into() returned %zd for a %zd-byte buffer", got, n);
        return -1;
    }
    return got;
}

static PyObject *framer_raise_truncated(Framer *self)
{
    PyObject *exc = framer_truncated(self);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *Framer_pump_recv(Framer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "pump_recv(recv_into, routes, limit)");
        return NULL;
    }
    PyObject *recv_into = args[0], *routes = args[1];
    if (!PyDict_Check(routes)) {
        PyErr_SetString(PyExc_TypeError, "pump_recv() takes a dict of routes");
        return NULL;
    }
    long long limit = PyLong_AsLongLong(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    long long done = 0, received = 0;
    for (;;) {
        if (self->pending) {
            char *data = PyByteArray_AS_STRING(self->pending);
            Py_ssize_t size = PyByteArray_GET_SIZE(self->pending);
            Py_ssize_t got = self->pending_got;
            size_t have = self->f.end - self->f.pos;
            if (got < size && have) {
                size_t n = (size_t)(size - got) < have ? (size_t)(size - got) : have;
                memcpy(data + got, framer_data(self) + self->f.pos, n);
                vfm_advance(&self->f, n, 1);
                self->pending_got = got += (Py_ssize_t)n;
            }
            while (got < size) {
                if (received >= limit)
                    return pump_result(PUMP_NEED_DATA, done, NULL, 0);
                Py_ssize_t n = framer_recv(recv_into, data + got, size - got);
                if (n == -2)
                    return pump_result(PUMP_WOULD_BLOCK, done, NULL, 0);
                if (n < 0)
                    return NULL;
                if (n == 0) {
                    self->f.eof = 1;
                    return framer_raise_truncated(self);
                }
                vfm_advance(&self->f, (uint64_t)n, 0);
                self->pending_got = got += n;
                received += n;
            }
            PyObject *payload = self->pending;
            Reorder *buf = self->pending_buf;
            self->pending = NULL;
            self->pending_buf = NULL;
            self->last_big = size >= BIG_PAYLOAD;
            int r = reorder_deliver(buf, self->pending_idx, payload, size);
            Py_DECREF(payload);
            Py_DECREF(buf);
            if (r < 0)
                return NULL;
            done++;
            continue;
        }
        struct vfm_out o;
        Reorder *buf = NULL;
        int status = framer_pump_loop(self, routes, &done, &o, &buf);
        if (status < 0)
            return NULL;
        if (status == PUMP_NEED_DATA) {
            if (received >= limit)
                return pump_result(PUMP_NEED_DATA, done, NULL, 0);
            /* After a large packet, receive just the next header: its data then goes
             * straight into its own buffer instead of through this one (a copy). */
            size_t have = self->f.end - self->f.pos, want = RECV_CHUNK;
            if (self->last_big && self->f.state == VFM_S_HEADER && have < PACKET_HEAD)
                want = PACKET_HEAD - have;
            if (framer_make_room(self, want) < 0)
                return NULL;
            Py_ssize_t n = framer_recv(recv_into, (char *)framer_data(self) + self->f.end,
                                       (Py_ssize_t)want);
            if (n == -2)
                return pump_result(PUMP_WOULD_BLOCK, done, NULL, 0);
            if (n < 0)
                return NULL;
            if (n == 0)
                self->f.eof = 1;
            self->f.end += (size_t)n;
            received += n;
        } else if (status == PUMP_ACCEPTED) {
            PyObject *hdr = framer_packet(self, &o); /* `current`, for the errors */
            if (!hdr)
                return NULL;
            Py_DECREF(hdr);
            self->pending = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)o.size);
            if (!self->pending)
                return NULL;
            self->pending_got = 0;
            self->pending_idx = o.idx;
            self->pending_buf = (Reorder *)Py_NewRef(buf);
        } else if (status == PUMP_HEADER) {
            return pump_result(status, done, framer_packet(self, &o), 1);
        } else {
            return pump_result(status, done, NULL, 0);
        }
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
        return framer_raise_truncated(self);
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
    {"pump", (PyCFunction)Framer_pump, METH_O, NULL},
    {"pump_recv", (PyCFunction)(void (*)(void))Framer_pump_recv, METH_FASTCALL, NULL},
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
        {&g_config_error, "vfiomig._core._errors", "ConfigStateError"},
        {&g_ready, "vfiomig._core._reorder", "Ready"},
        {&g_statistics, "vfiomig._core._reorder", "DeviceStatistics"},
        {&g_check_config_blob, "vfiomig._core._wire", "check_config_blob"},
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
    if (import_names() < 0 || PyType_Ready(&FramerType) < 0 || PyType_Ready(&BudgetType) < 0 ||
        PyType_Ready(&ReorderType) < 0 || PyType_Ready(&vfm_PipeWriterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Framer", (PyObject *)&FramerType) < 0 ||
        PyModule_AddObjectRef(m, "Budget", (PyObject *)&BudgetType) < 0 ||
        PyModule_AddObjectRef(m, "ReorderBuffer", (PyObject *)&ReorderType) < 0 ||
        PyModule_AddObjectRef(m, "PipeWriter", (PyObject *)&vfm_PipeWriterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
