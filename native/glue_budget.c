/* glue_budget.c - vfiomig._native.Budget: queued-bytes accounting shared by a session's
 * devices (twin of vfiomig._core._reorder.Budget; add/release are inline in glue.h). */
#include "glue.h"

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

PyTypeObject vfiomig_BudgetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.Budget",
    .tp_doc = "Queued-bytes accounting shared by the devices of one session.",
    .tp_basicsize = sizeof(Budget),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)budget_init,
    .tp_members = Budget_members,
    .tp_methods = Budget_methods,
};
