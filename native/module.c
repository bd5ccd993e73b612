/* module.c - vfiomig._native's module init: takes the reference's classes and names
 * (glue_py.c), readies the types and adds them to the module. */
#include "glue.h"

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

PyMODINIT_FUNC PyInit__native(void)
{
    if (vfiomig_py_import() < 0 || PyType_Ready(&vfiomig_FramerType) < 0 ||
        PyType_Ready(&vfiomig_BudgetType) < 0 || PyType_Ready(&vfiomig_ReorderType) < 0 ||
        PyType_Ready(&vfiomig_PipeWriterType) < 0 || PyType_Ready(&vfiomig_BlockType) < 0 ||
        PyType_Ready(&vfiomig_RunType) < 0 || PyType_Ready(&vfiomig_SendBufferType) < 0 ||
        PyType_Ready(&vfiomig_HeadersType) < 0 || PyType_Ready(&vfiomig_OutboxType) < 0 ||
        PyType_Ready(&vfiomig_SendJobType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Framer", (PyObject *)&vfiomig_FramerType) < 0 ||
        PyModule_AddObjectRef(m, "Budget", (PyObject *)&vfiomig_BudgetType) < 0 ||
        PyModule_AddObjectRef(m, "ReorderBuffer", (PyObject *)&vfiomig_ReorderType) < 0 ||
        PyModule_AddObjectRef(m, "PipeWriter", (PyObject *)&vfiomig_PipeWriterType) < 0 ||
        PyModule_AddObjectRef(m, "Run", (PyObject *)&vfiomig_RunType) < 0 ||
        PyModule_AddObjectRef(m, "SendBuffer", (PyObject *)&vfiomig_SendBufferType) < 0 ||
        PyModule_AddObjectRef(m, "PacketHeaders", (PyObject *)&vfiomig_HeadersType) < 0 ||
        PyModule_AddObjectRef(m, "Outbox", (PyObject *)&vfiomig_OutboxType) < 0 ||
        PyModule_AddObjectRef(m, "SendJob", (PyObject *)&vfiomig_SendJobType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
