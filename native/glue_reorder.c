/* glue_reorder.c - vfiomig._native.ReorderBuffer over the plain-C vfiomig_reorder: the
 * twin of vfiomig._core._reorder.ReorderBuffer (same methods, properties, error text):
 * lifecycle, offer/deliver (exported for the framer's pump, glue_framer_pump.c), the gate,
 * properties; the loader's side is glue_reorder_take.c, the reports glue_reorder_report.c. */
#include "glue.h"

static void reorder_drop_slots(Reorder *self)
{
    for (size_t i = 0; i < self->r.cap; i++)
        if (self->r.tab[i].used)
            slot_drop_data(&self->r.tab[i]);
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
    if (self->budget)
        vfiomig_budget_leave(self->budget, (PyObject *)self);
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
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UO!", kwlist, &name, &vfiomig_BudgetType,
                                     &budget))
        return -1;
    reorder_clear(self);
    vfm_reorder_init(&self->r);
    self->name = Py_NewRef(name);
    self->budget = (Budget *)Py_NewRef(budget);
    self->precopy = PyList_New(0);
    self->gate_open = self->loaded = self->multifd_taken = 0;
    self->starved_seconds = 0.0;
    self->backlog_cap = 0;
    self->queued_packets = self->queued_bytes = self->peak_queued = self->received = 0;
    self->written_bytes = self->written_packets = self->precopy_bytes = self->unwritten = 0;
    if (!self->precopy)
        return -1;
    if (vfiomig_budget_join(self->budget, (PyObject *)self) < 0) {
        Py_CLEAR(self->budget);
        return -1;
    }
    return 0;
}

/* Raise cls(msg, device=name, idx=idx) and poison the buffer with it.  Steals msg. */
static int reorder_raise(Reorder *self, PyObject *cls, PyObject *msg, long long idx)
{
    PyObject *idxo = msg ? PyLong_FromLongLong(idx) : NULL;
    PyObject *args = idxo ? PyTuple_Pack(1, msg) : NULL;
    PyObject *kw = args ? Py_BuildValue("{OOOO}", vfiomig_py.str_device, self->name,
                                        vfiomig_py.str_idx, idxo)
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

static void reorder_queue(Reorder *self, long long nbytes, long long npackets)
{
    self->queued_bytes += nbytes;
    self->queued_packets += npackets;
    budget_add(self->budget, nbytes);
    if (self->queued_bytes > self->peak_queued)
        self->peak_queued = self->queued_bytes;
}

/* ReorderBuffer.offer: 1 accepted, 0 refused for budget, -1 error raised. */
int vfiomig_reorder_offer(Reorder *self, uint32_t version, uint32_t idx, uint32_t flags,
                          uint64_t size)
{
    if (self->error)
        return reorder_reraise(self);
    PyObject *n = self->name, *msg = NULL, *cls = vfiomig_py.packet_error;
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
        return reorder_raise(self, vfiomig_py.config_error, msg, idx);
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
    /* Over budget only for the config packet, or the next idx while the loader is idle.
     * When the blocks that queued packets pin stand in the way, the packets of the sparse
     * ones are copied out first (the blocks are freed), so the budget bounds memory. */
    if (!((flags & VFM_VFIO_FLAG_CONFIG) ||
          ((int64_t)idx == self->r.next_idx && self->unwritten == 0))) {
        Budget *b = self->budget;
        if (!budget_fits(b, (long long)size)) {
            if (b->slack > 0 && vfiomig_budget_compact(b) < 0)
                return -1;
            if (!budget_fits(b, (long long)size))
                return 0;
        }
        if (self->backlog_cap > 0 && self->queued_bytes + (long long)size > self->backlog_cap)
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

/* The slot deliver fills, or NULL with an error raised. */
static struct vfm_slot *deliver_slot(Reorder *self, uint32_t idx, uint64_t len)
{
    if (self->error)
        return reorder_reraise(self), NULL;
    struct vfm_slot *s = vfm_slot_find(&self->r, idx);
    if (!s || s->data) {
        PyErr_SetString(PyExc_AssertionError, "deliver() without an accepted offer");
        return NULL;
    }
    if (len != s->size) {
        PyErr_SetString(PyExc_AssertionError, "delivered size differs from the offer");
        return NULL;
    }
    return s;
}

/* ReorderBuffer.deliver: 0, or -1 with an error raised.  Does not steal data. */
int vfiomig_reorder_deliver(Reorder *self, uint32_t idx, PyObject *data, Py_ssize_t len)
{
    struct vfm_slot *s = deliver_slot(self, idx, (uint64_t)len);
    if (!s)
        return -1;
    self->received++;
    if ((int64_t)idx == self->r.config_idx) {
        PyObject *r =
            PyObject_CallFunction(vfiomig_py.check_config_blob, "OIO", self->name, idx, data);
        if (!r) {
            if (PyErr_ExceptionMatches(vfiomig_py.vfio_error) && !self->error) {
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

int vfiomig_reorder_deliver_block(Reorder *self, uint32_t idx, Block *b, size_t off,
                                  uint64_t len)
{
    if ((int64_t)idx == self->r.config_idx) { /* the config blob is kept as bytes */
        PyObject *data = PyBytes_FromStringAndSize((const char *)b->data + off, (Py_ssize_t)len);
        if (!data)
            return -1;
        int r = vfiomig_reorder_deliver(self, idx, data, (Py_ssize_t)len);
        Py_DECREF(data);
        return r;
    }
    struct vfm_slot *s = deliver_slot(self, idx, len);
    if (!s)
        return -1;
    self->received++;
    vfiomig_block_hold(b, len);
    s->data = b;
    s->off = off;
    s->in_block = 1;
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
    int r = vfiomig_reorder_offer(self, (uint32_t)v[0], (uint32_t)v[1], (uint32_t)v[2], v[3]);
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
    if (!PyObject_CheckBuffer(args[1])) {
        PyErr_SetString(PyExc_TypeError, "deliver() takes a bytes-like object");
        return NULL;
    }
    Py_ssize_t len = PyObject_Length(args[1]);
    if (len < 0)
        return NULL;
    if (idx > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_AssertionError, "deliver() without an accepted offer");
        return NULL;
    }
    if (vfiomig_reorder_deliver(self, (uint32_t)idx, args[1], len) < 0)
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
        return reorder_raise(self, vfiomig_py.packet_error, msg, last), NULL;
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
    return PyBool_FromLong(vfiomig_reorder_finishable(self));
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

static PyMemberDef Reorder_members[] = {
    {"backlog_cap", T_LONGLONG, offsetof(Reorder, backlog_cap), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Reorder_methods[] = {
    {"offer", (PyCFunction)(void (*)(void))Reorder_offer, METH_FASTCALL, NULL},
    {"deliver", (PyCFunction)(void (*)(void))Reorder_deliver, METH_FASTCALL, NULL},
    {"add_precopy", (PyCFunction)Reorder_add_precopy, METH_O, NULL},
    {"open_gate", (PyCFunction)Reorder_open_gate, METH_NOARGS, NULL},
    {"fail", (PyCFunction)Reorder_fail, METH_O, NULL},
    {"has_ready", (PyCFunction)vfiomig_Reorder_has_ready, METH_NOARGS, NULL},
    {"take_ready", (PyCFunction)vfiomig_Reorder_take_ready, METH_NOARGS, NULL},
    {"written", (PyCFunction)vfiomig_Reorder_written, METH_O, NULL},
    {"mark_loaded", (PyCFunction)vfiomig_Reorder_mark_loaded, METH_NOARGS, NULL},
    {"missing", (PyCFunction)(void (*)(void))vfiomig_Reorder_missing, METH_VARARGS | METH_KEYWORDS,
     NULL},
    {"incomplete_error", (PyCFunction)vfiomig_Reorder_incomplete_error, METH_O, NULL},
    {"statistics", (PyCFunction)vfiomig_Reorder_statistics, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject vfiomig_ReorderType = {
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
    .tp_members = Reorder_members,
};
