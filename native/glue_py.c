/* glue_py.c - what the glue takes from the Python reference, once at module init: its
 * event and error classes (so that both implementations raise and return the same types)
 * and the interned attribute names the glue passes as keywords. Every glue unit reads
 * vfiomig_py; this unit calls no other. */
#include "glue.h"

struct vfiomig_py vfiomig_py;

int vfiomig_py_import(void)
{
    struct {
        PyObject **dst;
        const char *module, *name;
    } imports[] = {
        {&vfiomig_py.need_data, "vfiomig._core._events", "NEED_DATA"},
        {&vfiomig_py.hello, "vfiomig._core._events", "ChannelHello"},
        {&vfiomig_py.header, "vfiomig._core._events", "PacketHeader"},
        {&vfiomig_py.ram, "vfiomig._core._events", "RamSkipped"},
        {&vfiomig_py.end, "vfiomig._core._events", "ChannelEnd"},
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
