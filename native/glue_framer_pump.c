/* glue_framer_pump.c - Framer.pump and Framer.pump_recv: many packets per call, routed
 * straight into their devices' ReorderBuffers (see vfiomig/_native.pyi). */
#include "glue.h"

/* -- pump: many packets per call --------------------------------------------------- */

enum { PUMP_NEED_DATA, PUMP_END, PUMP_HEADER, PUMP_ACCEPTED, PUMP_WOULD_BLOCK };

/* (status, packets done, PacketHeader or None).  Steals hdr; NULL hdr with an error set
 * (from vfiomig_framer_packet) passes the error on. */
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
    PyObject *idstr = vfiomig_framer_idstr(self, o);
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
    if (!PyObject_TypeCheck(buf, &vfiomig_ReorderType)) {
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


/* Deliver the packet idx at f.pos (size bytes, all buffered) to buf and advance past it:
 * it stays in the block until written (the slot, then the loader's Run, holds the block);
 * 0, or -1 with an error set. */
static int framer_deliver_buffered(Framer *self, Reorder *buf, uint32_t idx, uint64_t size)
{
    Block *b = self->blk;
    if (!b->budget)
        b->budget = (Budget *)Py_NewRef(buf->budget);
    int r = vfiomig_reorder_deliver_block(buf, idx, b, self->f.pos, size);
    if (r == 0)
        vfm_advance(&self->f, size, 1);
    return r;
}

/* The loop of pump(): returns a PUMP_ status (PUMP_HEADER and PUMP_ACCEPTED with the
 * packet in *o and, for PUMP_ACCEPTED, its buffer in *bufp, borrowed), or -1 with an error
 * set.  *done counts the packets handled completely. */
static int framer_pump_loop(Framer *self, PyObject *routes, long long *done, struct vfm_out *o,
                            Reorder **bufp)
{
    for (;;) {
        if (self->error) {
            vfiomig_framer_reraise(self);
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
            vfiomig_framer_error(self, o);
            return -1;
        }
        int err;
        Reorder *buf = framer_route(self, o, routes, &err);
        if (err)
            return -1;
        int ok = buf ? vfiomig_reorder_offer(buf, o->version, o->idx, o->flags, o->size) : 0;
        if (ok < 0)
            return -1;
        if (!ok) /* unknown or new device, or no budget: the caller takes this packet */
            return PUMP_HEADER;
        if (self->f.end - self->f.pos < o->size) { /* accepted, its data still to receive */
            *bufp = buf;
            return PUMP_ACCEPTED;
        }
        if (framer_deliver_buffered(self, buf, o->idx, o->size) < 0)
            return -1;
        ++*done;
    }
}

PyObject *vfiomig_Framer_pump(Framer *self, PyObject *routes)
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
        return pump_result(status, done, vfiomig_framer_packet(self, &o), 1);
    return pump_result(status, done, NULL, 0);
}

/* -- pump_recv: the channel's data plane in one call -------------------------------- */

#define PACKET_HEAD (VFM_DEVICE_HEADER_SIZE + VFM_VFIO_HEADER_SIZE)

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

/* Make room in the block for recv_chunk bytes (or need, if more) and receive into it.
 * (Receiving into whatever the block has left instead walks the whole block and costs
 * cache misses: +20 % CPU at 4 KiB packets, benchmarks/README.md.)  The byte count, -2
 * would block, -1 error. */
static Py_ssize_t framer_recv_block(Framer *self, PyObject *recv_into, size_t need)
{
    size_t want = need > self->recv_chunk ? need : self->recv_chunk;
    if (vfiomig_framer_make_room(self, want) < 0)
        return -1;
    Py_ssize_t n = framer_recv(recv_into, (char *)framer_data(self) + self->f.end,
                               (Py_ssize_t)want);
    if (n > 0)
        self->f.end += (size_t)n;
    return n;
}

/* After a receive of n bytes (framer_recv's count) inside a packet's data: 1 with *ret
 * what pump_recv returns when it stops there (would block; an error; the stream ended:
 * the truncation error), 0 to go on. */
static int data_recv_stops(Framer *self, Py_ssize_t n, long long done, PyObject **ret)
{
    if (n > 0)
        return 0;
    if (n == -2) {
        *ret = pump_result(PUMP_WOULD_BLOCK, done, NULL, 0);
    } else if (n < 0) {
        *ret = NULL;
    } else {
        self->f.eof = 1;
        *ret = vfiomig_framer_raise_truncated(self);
    }
    return 1;
}

/* The data of the accepted packet idx (size bytes) is pump_recv's to receive and deliver
 * to buf: into the block if small, else into a buffer of its own; 0, or -1 with an error. */
static int framer_pend(Framer *self, Reorder *buf, uint32_t idx, uint64_t size)
{
    if (size < self->big) {
        self->pending_in_block = 1;
        self->pending_size = size;
    } else {
        self->pending = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)size);
        if (!self->pending)
            return -1;
        self->pending_got = 0;
    }
    self->pending_idx = idx;
    self->pending_buf = (Reorder *)Py_NewRef(buf);
    return 0;
}

PyObject *vfiomig_Framer_pump_recv(Framer *self, PyObject *const *args, Py_ssize_t nargs)
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
        if (self->pending_in_block) {
            /* A packet smaller than self->big: its data comes into the block, and goes on
             * to the reorder buffer from there (no copy). */
            uint64_t size = self->pending_size;
            if (self->f.end - self->f.pos < size) {
                if (received >= limit)
                    return pump_result(PUMP_NEED_DATA, done, NULL, 0);
                size_t need = (size_t)(size - (self->f.end - self->f.pos));
                Py_ssize_t n = framer_recv_block(self, recv_into, need);
                PyObject *ret;
                if (data_recv_stops(self, n, done, &ret))
                    return ret;
                received += n;
                continue;
            }
            Reorder *buf = self->pending_buf;
            self->pending_buf = NULL;
            self->pending_in_block = 0;
            self->last_big = 0;
            int r = framer_deliver_buffered(self, buf, self->pending_idx, size);
            Py_DECREF(buf);
            if (r < 0)
                return NULL;
            done++;
            continue;
        }
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
                PyObject *ret;
                if (data_recv_stops(self, n, done, &ret))
                    return ret;
                vfm_advance(&self->f, (uint64_t)n, 0);
                self->pending_got = got += n;
                received += n;
            }
            PyObject *payload = self->pending;
            Reorder *buf = self->pending_buf;
            self->pending = NULL;
            self->pending_buf = NULL;
            self->last_big = (uint64_t)size >= self->big;
            int r = vfiomig_reorder_deliver(buf, self->pending_idx, payload, size);
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
            size_t have = self->f.end - self->f.pos;
            Py_ssize_t n;
            if (self->last_big && self->f.state == VFM_S_HEADER && have < PACKET_HEAD) {
                size_t want = PACKET_HEAD - have;
                if (vfiomig_framer_make_room(self, want) < 0)
                    return NULL;
                n = framer_recv(recv_into, (char *)framer_data(self) + self->f.end,
                                (Py_ssize_t)want);
                if (n > 0)
                    self->f.end += (size_t)n;
            } else {
                n = framer_recv_block(self, recv_into, 1);
            }
            if (n == -2)
                return pump_result(PUMP_WOULD_BLOCK, done, NULL, 0);
            if (n < 0)
                return NULL;
            if (n == 0)
                self->f.eof = 1;
            received += n;
        } else if (status == PUMP_ACCEPTED) {
            PyObject *hdr = vfiomig_framer_packet(self, &o); /* `current`, for the errors */
            if (!hdr)
                return NULL;
            Py_DECREF(hdr);
            if (framer_pend(self, buf, o.idx, o.size) < 0)
                return NULL;
        } else if (status == PUMP_HEADER) {
            return pump_result(status, done, vfiomig_framer_packet(self, &o), 1);
        } else {
            return pump_result(status, done, NULL, 0);
        }
    }
}

/* Framer.defer_payload(buf): the packet pump_recv returned with PUMP_HEADER, accepted by
 * buf since, is received and delivered by the next pump_recv calls. */
PyObject *vfiomig_Framer_defer_payload(Framer *self, PyObject *buf)
{
    if (!PyObject_TypeCheck(buf, &vfiomig_ReorderType)) {
        PyErr_SetString(PyExc_TypeError, "defer_payload() takes a ReorderBuffer");
        return NULL;
    }
    if (self->error)
        return vfiomig_framer_reraise(self);
    if (self->pending || self->pending_in_block) {
        PyErr_SetString(PyExc_AssertionError, "one at a time");
        return NULL;
    }
    if (self->f.state != VFM_S_PAYLOAD || !self->current) {
        PyErr_SetString(PyExc_AssertionError, "no packet data to defer");
        return NULL;
    }
    PyObject *v = PyObject_GetAttrString(self->current, "idx");
    unsigned long idx = v ? PyLong_AsUnsignedLong(v) : 0;
    Py_XDECREF(v);
    if (PyErr_Occurred())
        return NULL;
    v = PyObject_GetAttrString(self->current, "size");
    unsigned long long size = v ? PyLong_AsUnsignedLongLong(v) : 0;
    Py_XDECREF(v);
    if (PyErr_Occurred())
        return NULL;
    if (self->f.remaining != size) {
        PyErr_SetString(PyExc_AssertionError, "the packet's data was read in part");
        return NULL;
    }
    if (framer_pend(self, (Reorder *)buf, (uint32_t)idx, size) < 0)
        return NULL;
    Py_RETURN_NONE;
}
