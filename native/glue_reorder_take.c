/* glue_reorder_take.c - the loader's side of vfiomig._native.ReorderBuffer: whether it has
 * a batch (has_ready), the batch (take_ready: the precopy chunks, or a run of in-order
 * packets moved into a Run, glue_run.c), written and mark_loaded, and finishable. */
#include "glue.h"

#define MAX_BATCH_CHUNKS 1024
#define MAX_BATCH_BYTES (16ll * 1024 * 1024)

int vfiomig_reorder_finishable(Reorder *self)
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
    return (s && s->data) || vfiomig_reorder_finishable(self);
}

PyObject *vfiomig_Reorder_has_ready(Reorder *self, PyObject *Py_UNUSED(ignored))
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
        ready = PyObject_Vectorcall(vfiomig_py.ready, args, 5, NULL);
    for (int i = 1; i < 5; i++)
        Py_XDECREF(args[i]);
    return ready;
}

PyObject *vfiomig_Reorder_take_ready(Reorder *self, PyObject *Py_UNUSED(ignored))
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
    /* The run: at most MAX_BATCH_CHUNKS packets or MAX_BATCH_BYTES (one packet over) */
    long long idx = next, nbytes = 0, npackets = 0, nchunks = 0;
    while (nchunks < MAX_BATCH_CHUNKS && nbytes < MAX_BATCH_BYTES &&
           idx + npackets <= 0xFFFFFFFFll) {
        struct vfm_slot *s = vfm_slot_find(&self->r, (uint32_t)(idx + npackets));
        if (!s || !s->data)
            break;
        nbytes += (long long)s->size;
        nchunks += s->size != 0; /* zero-length packets are skipped, never written */
        npackets++;
    }
    if (!npackets)
        Py_RETURN_NONE;
    Run *run = vfiomig_run_new((Py_ssize_t)nchunks);
    if (!run)
        return NULL;
    for (long long i = 0; i < npackets; i++, idx++) {
        struct vfm_slot *s = vfm_slot_find(&self->r, (uint32_t)idx);
        if (vfiomig_run_take_slot(run, s) < 0) {
            /* only a buffer request can fail: the packets taken are written out of order
             * otherwise, so the device fails here */
            npackets = i;
            break;
        }
        vfm_slot_remove(&self->r, s);
        self->r.delivered--;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(run);
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (!self->error)
            self->error = Py_XNewRef(value);
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    self->multifd_taken = 1;
    self->r.next_idx = idx;
    self->queued_packets -= npackets;
    self->written_packets += npackets;
    self->unwritten += nbytes;
    PyObject *ready = make_ready((PyObject *)run, nbytes, next, idx, 0);
    Py_DECREF(run);
    return ready;
}

PyObject *vfiomig_Reorder_written(Reorder *self, PyObject *arg)
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

PyObject *vfiomig_Reorder_mark_loaded(Reorder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->error) { /* poisoned while the finish step ran: not loaded */
        reorder_reraise(self);
        return NULL;
    }
    if (!vfiomig_reorder_finishable(self)) {
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
