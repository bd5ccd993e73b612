/* glue_reorder_report.c - what a ReorderBuffer reports about itself: missing(), the
 * StreamIncompleteError of incomplete_error() and statistics(). */
#include "glue.h"

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

PyObject *vfiomig_Reorder_missing(Reorder *self, PyObject *args, PyObject *kwds)
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

PyObject *vfiomig_Reorder_incomplete_error(Reorder *self, PyObject *why)
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
    kw = args ? Py_BuildValue("{OOOO}", vfiomig_py.str_device, self->name, vfiomig_py.str_idx,
                              idx)
              : NULL;
    if (kw)
        exc = PyObject_Call(vfiomig_py.incomplete_error, args, kw);
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

PyObject *vfiomig_Reorder_statistics(Reorder *self, PyObject *Py_UNUSED(ignored))
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
        st = PyObject_Vectorcall(vfiomig_py.statistics, args, N, NULL);
    for (int i = 0; i < N; i++)
        Py_XDECREF(args[i]);
    return st;
}
