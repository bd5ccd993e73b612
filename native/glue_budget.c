/* glue_budget.c - vfiomig._native.Budget: queued-bytes accounting shared by a session's
 * devices (twin of vfiomig._core._reorder.Budget; add/release are inline in glue.h), with
 * the slack of the receive blocks its packets pin, and its members (the reorder buffers
 * that share it) for the compaction that frees that slack (glue_compact.c). */
#include "glue.h"

int vfiomig_budget_join(Budget *b, PyObject *reorder)
{
    if (b->nmembers == b->members_cap) {
        Py_ssize_t cap = b->members_cap ? 2 * b->members_cap : 4;
        PyObject **m = PyMem_Realloc(b->members, (size_t)cap * sizeof(*m));
        if (!m) {
            PyErr_NoMemory();
            return -1;
        }
        b->members = m;
        b->members_cap = cap;
    }
    b->members[b->nmembers++] = reorder;
    return 0;
}

void vfiomig_budget_leave(Budget *b, PyObject *reorder)
{
    for (Py_ssize_t i = 0; i < b->nmembers; i++)
        if (b->members[i] == reorder) {
            b->members[i] = b->members[--b->nmembers];
            return;
        }
}

static void budget_dealloc(Budget *self)
{
    PyMem_Free(self->members); /* every member holds the budget: none is left */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int budget_init(Budget *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"limit", NULL};
    long long limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "L", kwlist, &limit))
        return -1;
    self->limit = limit;
    self->queued = self->slack = self->peak = self->peak_pinned = 0;
    self->compacted_at = -1; /* never */
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
    {"slack", T_LONGLONG, offsetof(Budget, slack), READONLY, NULL},
    {"peak_pinned", T_LONGLONG, offsetof(Budget, peak_pinned), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Budget_methods[] = {
    {"add", (PyCFunction)Budget_add, METH_O, NULL},
    {"release", (PyCFunction)Budget_release, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject vfiomig_BudgetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.Budget",
    .tp_doc = "Queued-bytes accounting shared by the devices of one session.",
    .tp_basicsize = sizeof(Budget),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)budget_init,
    .tp_dealloc = (destructor)budget_dealloc,
    .tp_members = Budget_members,
    .tp_methods = Budget_methods,
};
