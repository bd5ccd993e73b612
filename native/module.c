/* module.c - vfiomig._native's module init: imports the reference's event and error
 * classes (so both implementations raise and return the same types), readies the types
 * and adds them to the module. */
#include "glue.h"

struct vfiomig_py vfiomig_py;

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
        {&vfiomig_py.need_data, "vfiomig._core._framer", "NEED_DATA"},
        {&vfiomig_py.hello, "vfiomig._core._framer", "ChannelHello"},
        {&vfiomig_py.header, "vfiomig._core._framer", "PacketHeader"},
        {&vfiomig_py.ram, "vfiomig._core._framer", "RamSkipped"},
        {&vfiomig_py.end, "vfiomig._core._framer", "ChannelEnd"},
        {&vfiomig_py.decode_handshake, "vfiomig._core._wire", "decode_handshake"},
        {&vfiomig_py.vfio_error, "vfiomig._core._errors", "VfioMigError"},
        {&vfiomig_py.packet_error, "vfiomig._core._errors", "PacketError"},
        {&vfiomig_py.incomplete_error, "vfiomig._core._errors", "StreamIncompleteError"},
        {&vfiomig_py.config_error, "vfiomig._core._errors", "ConfigStateError"},
        {&vfiomig_py.ready, "vfiomig._core._reorder", "Ready"},
        {&vfiomig_py.statistics, "vfiomig._core._reorder", "DeviceStatistics"},
        {&vfiomig_py.check_config_blob, "vfiomig._core._wire", "check_config_blob"},
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
        {&vfiomig_py.str_channel_id, "channel_id"},
        {&vfiomig_py.str_idstr, "idstr"},
        {&vfiomig_py.str_instance, "instance"},
        {&vfiomig_py.str_version, "version"},
        {&vfiomig_py.str_idx, "idx"},
        {&vfiomig_py.str_flags, "flags"},
        {&vfiomig_py.str_size, "size"},
        {&vfiomig_py.str_uuid, "uuid"},
        {&vfiomig_py.str_channels, "channels"},
        {&vfiomig_py.str_device, "device"},
    };
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++)
        if (!(*strs[i].dst = PyUnicode_InternFromString(strs[i].s)))
            return -1;
    return 0;
}

PyMODINIT_FUNC PyInit__native(void)
{
    if (import_names() < 0 || PyType_Ready(&vfiomig_FramerType) < 0 ||
        PyType_Ready(&vfiomig_BudgetType) < 0 || PyType_Ready(&vfiomig_ReorderType) < 0 ||
        PyType_Ready(&vfiomig_PipeWriterType) < 0 || PyType_Ready(&vfiomig_BlockType) < 0 ||
        PyType_Ready(&vfiomig_RunType) < 0 || PyType_Ready(&vfiomig_SendBufferType) < 0 ||
        PyType_Ready(&vfiomig_HeadersType) < 0 || PyType_Ready(&vfiomig_OutboxType) < 0)
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
        PyModule_AddObjectRef(m, "Outbox", (PyObject *)&vfiomig_OutboxType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
