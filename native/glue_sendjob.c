/*
 * glue_sendjob.c - vfiomig._native.SendJob: the sender's C send path (vfiomig_sendjob.h)
 * for vfiomig/send/_threads.py.  The constructor takes the channel sockets and each
 * device's header fields, source and config blob; start() runs the threads, which never
 * touch a Python object; fileno() is readable once they are all about to exit; cancel()
 * stops them; join() waits for them without the GIL.  A ("push",) device has no reader
 * thread: the caller reads it and hands each packet's data to push() (held, never
 * copied, until a channel's thread sent it), waits while room() is False for
 * room_fileno() to become readable, and ends it with push_end(config)
 * (vfiomig_sendpush.c).  A ("vfio-user", ...) device's reader thread owns the client's
 * socket until join; source_detail(d) then says how its reads ended.  Native core only: the pure core keeps the trio sender.
 * direct=False keeps the reader thread where the job could do without
 * (vfiomig_senddirect.c): comparisons and the tests of both ways.  rates: each channel's
 * pace in wire bytes a second (0 or absent: unpaced).  zerocopy: 0 never, 1 where it
 * pays, 2 always (vfiomig_sendzc.c); zerocopy_bytes counts the data bytes sent with
 * sendfile or splice.
 */
#include "glue.h"

#include "vfiomig_sendjob.h"

#include <errno.h>
#include <string.h>

/* A pushed packet's data: the buffer it lends, pinned (buf.pins) while queued. */
struct push_slot {
    struct vfm_sj_buf buf;
    Py_buffer view;
    int held; /* view is ours; 2: to release (no queued packet uses it any more) */
};

typedef struct {
    PyObject_HEAD
    struct vfm_sendjob job;
    int started, joined, ready; /* ready: vfm_sendjob_init succeeded */
    struct push_slot **slots;   /* never moved: queued packets point into them */
    size_t nslots;
} SendJob;

/* One device: (idstr, instance, endian, source, config); source is ("synth", size, seed,
 * base), ("pattern", size, block), ("fd", fd, poll), ("push",) or ("vfio-user", fd,
 * size, window, timeout_ms): a vfio-user client's socket in STOP_COPY, MIG_DATA_READs
 * of size bytes, window in flight (vfiomig_sendvu.c).  0, or -1 with an error. */
static int parse_device(struct vfm_sj_dev *dev, PyObject *item)
{
    const char *idstr, *endian, *kind;
    Py_ssize_t idlen;
    unsigned long instance;
    PyObject *source;
    Py_buffer config;
    int rc = -1;

    if (!PyArg_ParseTuple(item, "s#ksOy*:SendJob device", &idstr, &idlen, &instance, &endian,
                          &source, &config))
        return -1;
    if ((size_t)idlen >= VFM_IDSTR_SIZE || instance > UINT32_MAX ||
        (strcmp(endian, "be") && strcmp(endian, "host"))) {
        PyErr_SetString(PyExc_ValueError, "bad device header fields");
        goto out;
    }
    vfm_header_prefix(dev->prefix, idstr, (size_t)idlen);
    dev->instance = (uint32_t)instance;
    dev->host = strcmp(endian, "host") == 0;
    dev->config = malloc(config.len ? (size_t)config.len : 1);
    if (!dev->config) {
        PyErr_NoMemory();
        goto out;
    }
    memcpy(dev->config, config.buf, (size_t)config.len);
    dev->config_len = (size_t)config.len;
    if (!PyTuple_Check(source) || PyTuple_GET_SIZE(source) < 1 ||
        !PyUnicode_Check(PyTuple_GET_ITEM(source, 0))) {
        PyErr_SetString(PyExc_TypeError, "a source is a tuple (kind, ...)");
        goto out;
    }
    kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(source, 0));
    if (!kind)
        goto out;
    if (!strcmp(kind, "synth")) {
        unsigned long long size, seed;
        Py_buffer base;
        if (!PyArg_ParseTuple(source, "sKKy*:synth source", &kind, &size, &seed, &base))
            goto out;
        if (base.len != VFM_SYNTH_BLOCK) {
            PyBuffer_Release(&base);
            PyErr_SetString(PyExc_ValueError, "a synth base is one block");
            goto out;
        }
        dev->base = malloc(VFM_SYNTH_BLOCK);
        if (dev->base)
            memcpy(dev->base, base.buf, VFM_SYNTH_BLOCK);
        PyBuffer_Release(&base);
        if (!dev->base) {
            PyErr_NoMemory();
            goto out;
        }
        dev->kind = VFM_SJ_SYNTH;
        dev->size = size;
        dev->seed = seed;
    } else if (!strcmp(kind, "pattern")) {
        unsigned long long size;
        Py_buffer block;
        if (!PyArg_ParseTuple(source, "sKy*:pattern source", &kind, &size, &block))
            goto out;
        dev->pattern = block.len ? malloc((size_t)block.len) : NULL;
        if (dev->pattern)
            memcpy(dev->pattern, block.buf, (size_t)block.len);
        dev->pattern_len = (size_t)block.len;
        PyBuffer_Release(&block);
        if (!dev->pattern) {
            PyErr_SetString(PyExc_ValueError, "a pattern is a non-empty block");
            goto out;
        }
        dev->kind = VFM_SJ_PATTERN;
        dev->size = size;
    } else if (!strcmp(kind, "push")) {
        int err;
        if (!PyArg_ParseTuple(source, "s:push source", &kind))
            goto out;
        dev->kind = VFM_SJ_PUSH;
        err = vfm_sj_push_init(dev);
        if (err) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
    } else if (!strcmp(kind, "vfio-user")) {
        int fd, err, timeout_ms;
        unsigned long size, window;
        if (!PyArg_ParseTuple(source, "sikki:vfio-user source", &kind, &fd, &size, &window,
                              &timeout_ms))
            goto out;
        if (fd < 0 || !size || size > UINT32_MAX - 8 || !window || window > 0x8000 ||
            timeout_ms < 1) {
            PyErr_SetString(PyExc_ValueError, "bad vfio-user source");
            goto out;
        }
        err = vfm_sj_vu_init(dev, fd, (uint32_t)size, (unsigned)window, timeout_ms);
        if (err) {
            PyErr_NoMemory();
            goto out;
        }
    } else if (!strcmp(kind, "fd")) {
        int fd, poll;
        if (!PyArg_ParseTuple(source, "sip:fd source", &kind, &fd, &poll))
            goto out;
        dev->kind = VFM_SJ_FD;
        dev->fd = fd;
        dev->poll = poll;
    } else {
        PyErr_Format(PyExc_ValueError, "unknown source kind %s", kind);
        goto out;
    }
    rc = 0;
out:
    PyBuffer_Release(&config);
    return rc;
}

static int SendJob_init(SendJob *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fds", "packet_size", "chunk", "limit", "devices", "direct",
                             "rates", "zerocopy", NULL};
    PyObject *fds, *devices, *fdseq = NULL, *devseq = NULL, *rates = Py_None, *rateseq = NULL;
    Py_ssize_t packet_size, chunk, limit;
    int rc = -1, err, direct = 1, zerocopy = VFM_ZC_AUTO;

    if (self->ready || self->started) {
        PyErr_SetString(PyExc_RuntimeError, "SendJob is already set up");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnnnO|$pOi:SendJob", kwlist, &fds,
                                     &packet_size, &chunk, &limit, &devices, &direct, &rates,
                                     &zerocopy))
        return -1;
    if (zerocopy < VFM_ZC_NEVER || zerocopy > VFM_ZC_ALWAYS) {
        PyErr_SetString(PyExc_ValueError, "zerocopy is 0 (never), 1 (auto) or 2 (always)");
        return -1;
    }
    fdseq = PySequence_Fast(fds, "fds must be a sequence");
    devseq = fdseq ? PySequence_Fast(devices, "devices must be a sequence") : NULL;
    if (!devseq)
        goto out;
    if (packet_size < 1 || chunk < packet_size || limit < 0) {
        PyErr_SetString(PyExc_ValueError, "bad packet size, chunk or limit");
        goto out;
    }
    err = vfm_sendjob_init(&self->job, (unsigned)PySequence_Fast_GET_SIZE(fdseq),
                           (unsigned)PySequence_Fast_GET_SIZE(devseq), (size_t)packet_size,
                           (size_t)chunk, (size_t)limit);
    self->ready = 1; /* what init allocated is freed at dealloc, whatever happened */
    if (err) {
        errno = err;
        PyErr_SetFromErrno(err == EINVAL ? PyExc_ValueError : PyExc_OSError);
        goto out;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fdseq); i++) {
        int fd = PyObject_AsFileDescriptor(PySequence_Fast_GET_ITEM(fdseq, i));
        if (fd < 0)
            goto out;
        self->job.chans[i].fd = fd;
    }
    self->job.zerocopy = (enum vfm_zc_mode)zerocopy;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(devseq); i++)
        if (parse_device(&self->job.devs[i], PySequence_Fast_GET_ITEM(devseq, i)) < 0)
            goto out;
    self->job.direct = direct && vfm_sj_direct_ok(&self->job);
    if (rates != Py_None) { /* each channel's pace in wire bytes a second, 0 unpaced */
        rateseq = PySequence_Fast(rates, "rates must be a sequence");
        if (!rateseq)
            goto out;
        if (PySequence_Fast_GET_SIZE(rateseq) != PySequence_Fast_GET_SIZE(fdseq)) {
            PyErr_SetString(PyExc_ValueError, "one rate per channel");
            goto out;
        }
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(rateseq); i++) {
            double rate = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(rateseq, i));
            if (rate == -1.0 && PyErr_Occurred())
                goto out;
            if (!(rate >= 0)) { /* NaN too */
                PyErr_SetString(PyExc_ValueError, "a rate is 0 (unpaced) or more");
                goto out;
            }
            self->job.chans[i].rate = rate;
        }
    }
    rc = 0;
out:
    Py_XDECREF(fdseq);
    Py_XDECREF(devseq);
    Py_XDECREF(rateseq);
    if (rc < 0 && self->ready) {
        vfm_sendjob_free(&self->job);
        self->ready = 0;
    }
    return rc;
}

static int check_ready(SendJob *self)
{
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "SendJob is not set up");
        return -1;
    }
    return 0;
}

static PyObject *SendJob_start(SendJob *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    if (self->started) {
        PyErr_SetString(PyExc_RuntimeError, "SendJob is already started");
        return NULL;
    }
    self->started = 1;
    vfm_sendjob_start(&self->job);
    Py_RETURN_NONE;
}

static PyObject *SendJob_cancel(SendJob *self, PyObject *Py_UNUSED(ignored))
{
    if (self->ready)
        vfm_sendjob_cancel(&self->job);
    Py_RETURN_NONE;
}

/* Release the pushed buffers no queued packet uses (every one after the join). */
static void release_slots(SendJob *self, int all)
{
    if (!all) {
        pthread_mutex_lock(&self->job.lock);
        for (size_t i = 0; i < self->nslots; i++)
            if (self->slots[i]->held == 1 && !self->slots[i]->buf.pins)
                self->slots[i]->held = 2;
        pthread_mutex_unlock(&self->job.lock);
    }
    for (size_t i = 0; i < self->nslots; i++)
        if (self->slots[i]->held == 2 || (all && self->slots[i]->held)) {
            self->slots[i]->held = 0;
            self->slots[i]->buf.pins = 0;
            PyBuffer_Release(&self->slots[i]->view); /* may run any code: no lock held */
        }
}

static void join(SendJob *self)
{
    if (self->started && !self->joined) {
        Py_BEGIN_ALLOW_THREADS
        vfm_sendjob_join(&self->job);
        Py_END_ALLOW_THREADS
        self->joined = 1;
        release_slots(self, 1);
    }
}

/* A push device's index from the arguments, or -1 with an error. */
static int push_device(SendJob *self, Py_ssize_t d)
{
    if (check_ready(self) < 0)
        return -1;
    if (d < 0 || (size_t)d >= self->job.ndev || self->job.devs[d].kind != VFM_SJ_PUSH) {
        PyErr_SetString(PyExc_ValueError, "not a push device");
        return -1;
    }
    if (!self->started || self->joined) {
        PyErr_SetString(PyExc_RuntimeError, "SendJob is not running");
        return -1;
    }
    return (int)d;
}

/* push(d, data) -> bool: queue data (any buffer, held until sent) as device d's next
 * packets, cut at the packet size (short only at the end of its stream); False: the job
 * failed or was cancelled (stop reading; its error says why). */
static PyObject *SendJob_push(SendJob *self, PyObject *args)
{
    Py_ssize_t d;
    Py_buffer view;
    struct push_slot *slot = NULL;
    long pinned = 0;
    int err;

    if (!PyArg_ParseTuple(args, "ny*:push", &d, &view))
        return NULL;
    if (push_device(self, d) < 0 || view.len < 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "an empty push");
        PyBuffer_Release(&view);
        return NULL;
    }
    release_slots(self, 0);
    for (size_t i = 0; i < self->nslots && !slot; i++)
        if (!self->slots[i]->held)
            slot = self->slots[i];
    if (!slot) {
        struct push_slot **more = PyMem_Realloc(self->slots, (self->nslots + 1) * sizeof(*more));
        if (more)
            self->slots = more;
        slot = more ? PyMem_Calloc(1, sizeof(*slot)) : NULL;
        if (!slot) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        self->slots[self->nslots++] = slot;
    }
    slot->view = view;
    slot->held = 1;
    err = vfm_sj_push(&self->job, (unsigned)d, &slot->buf, view.buf, (size_t)view.len);
    if (err) {
        pthread_mutex_lock(&self->job.lock);
        pinned = slot->buf.pins; /* a part queued before the failure: held until sent */
        pthread_mutex_unlock(&self->job.lock);
    }
    if (err && !pinned) {
        slot->held = 0;
        PyBuffer_Release(&slot->view);
    }
    if (err) {
        if (err != ECANCELED)
            return PyErr_NoMemory();
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* room(d) -> bool: whether device d may push its next packet now (True too once the job
 * failed: the next push says so); False: wait for room_fileno(d) to be readable. */
static PyObject *SendJob_room(SendJob *self, PyObject *args)
{
    Py_ssize_t d;

    if (!PyArg_ParseTuple(args, "n:room", &d) || push_device(self, d) < 0)
        return NULL;
    return PyBool_FromLong(vfm_sj_push_room(&self->job, (unsigned)d));
}

static PyObject *SendJob_room_fileno(SendJob *self, PyObject *args)
{
    Py_ssize_t d;

    if (!PyArg_ParseTuple(args, "n:room_fileno", &d) || push_device(self, d) < 0)
        return NULL;
    return PyLong_FromLong(self->job.devs[d].room_fd);
}

/* push_end(d, config) -> bool: device d's data is all pushed; its config packet follows.
 * False: the job failed or was cancelled. */
static PyObject *SendJob_push_end(SendJob *self, PyObject *args)
{
    Py_ssize_t d;
    Py_buffer config;
    int err;

    if (!PyArg_ParseTuple(args, "ny*:push_end", &d, &config))
        return NULL;
    if (push_device(self, d) < 0) {
        PyBuffer_Release(&config);
        return NULL;
    }
    err = vfm_sj_push_end(&self->job, (unsigned)d, config.buf, (size_t)config.len);
    PyBuffer_Release(&config);
    if (err && err != ECANCELED)
        return PyErr_NoMemory();
    return PyBool_FromLong(!err);
}

static PyObject *SendJob_join(SendJob *self, PyObject *Py_UNUSED(ignored))
{
    join(self);
    Py_RETURN_NONE;
}

static PyObject *SendJob_fileno(SendJob *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromLong(self->job.done_fd);
}

static void SendJob_dealloc(SendJob *self)
{
    if (self->ready) {
        if (self->started && !self->joined) {
            vfm_sendjob_cancel(&self->job);
            join(self);
        }
        vfm_sendjob_free(&self->job);
    }
    for (size_t i = 0; i < self->nslots; i++) {
        if (self->slots[i]->held)
            PyBuffer_Release(&self->slots[i]->view);
        PyMem_Free(self->slots[i]);
    }
    PyMem_Free(self->slots);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Read fields under the job's lock (the threads change them). */
static PyObject *SendJob_get_finished(SendJob *self, void *Py_UNUSED(closure))
{
    int finished;
    if (check_ready(self) < 0)
        return NULL;
    pthread_mutex_lock(&self->job.lock);
    finished = self->started && self->job.threads_left == 0;
    pthread_mutex_unlock(&self->job.lock);
    return PyBool_FromLong(finished);
}

static PyObject *SendJob_get_channel_bytes(SendJob *self, void *Py_UNUSED(closure))
{
    PyObject *out;
    if (check_ready(self) < 0)
        return NULL;
    out = PyTuple_New(self->job.nchan);
    if (!out)
        return NULL;
    pthread_mutex_lock(&self->job.lock);
    for (unsigned c = 0; c < self->job.nchan; c++) {
        /* PyLong_FromUnsignedLongLong of a small value does not block */
        PyObject *n = PyLong_FromUnsignedLongLong(self->job.chans[c].sent_bytes);
        if (!n) {
            pthread_mutex_unlock(&self->job.lock);
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, c, n);
    }
    pthread_mutex_unlock(&self->job.lock);
    return out;
}

static PyObject *SendJob_get_device_counts(SendJob *self, void *Py_UNUSED(closure))
{
    PyObject *out;
    if (check_ready(self) < 0)
        return NULL;
    out = PyTuple_New(self->job.ndev);
    if (!out)
        return NULL;
    pthread_mutex_lock(&self->job.lock);
    for (unsigned d = 0; d < self->job.ndev; d++) {
        PyObject *t = Py_BuildValue("(KI)", (unsigned long long)self->job.devs[d].bytes,
                                    (unsigned)self->job.devs[d].packets);
        if (!t) {
            pthread_mutex_unlock(&self->job.lock);
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, d, t);
    }
    pthread_mutex_unlock(&self->job.lock);
    return out;
}

static PyObject *SendJob_get_zerocopy_bytes(SendJob *self, void *Py_UNUSED(closure))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(
        __atomic_load_n(&self->job.zc_bytes, __ATOMIC_RELAXED));
}

static PyObject *SendJob_get_error(SendJob *self, void *Py_UNUSED(closure))
{
    static const char *kinds[] = {"", "channel", "source", "cancelled", "start", "short"};
    struct vfm_sendjob *job = &self->job;
    enum vfm_sj_error e;
    unsigned who;
    int err;
    unsigned long long sent;

    if (check_ready(self) < 0)
        return NULL;
    pthread_mutex_lock(&job->lock);
    e = job->error;
    who = job->error_who;
    err = job->error_errno;
    sent = job->error_sent;
    pthread_mutex_unlock(&job->lock);
    if (e == VFM_SJ_OK)
        Py_RETURN_NONE;
    return Py_BuildValue("(sIiK)", kinds[e], who, err, sent);
}

/* source_detail(d) -> None, or for a ("vfio-user", ...) device (after join): (failure,
 * errno, pending, a, b, c, in_step, offset): vfiomig_sendjob.h's enum vfm_vu_failure and
 * its numbers, whether its socket is in step (nothing owed, no broken protocol), and the
 * stream bytes received in order. */
static PyObject *SendJob_source_detail(SendJob *self, PyObject *args)
{
    Py_ssize_t d;
    const struct vfm_sj_vu *vu;

    if (!PyArg_ParseTuple(args, "n:source_detail", &d) || check_ready(self) < 0)
        return NULL;
    if (d < 0 || (size_t)d >= self->job.ndev) {
        PyErr_SetString(PyExc_ValueError, "no such device");
        return NULL;
    }
    if (self->started && !self->joined) {
        PyErr_SetString(PyExc_RuntimeError, "SendJob is running");
        return NULL;
    }
    vu = self->job.devs[d].vu;
    if (!vu)
        Py_RETURN_NONE;
    return Py_BuildValue("(iiIkkkOK)", (int)vu->failure, vu->err, vu->failed_pending,
                         (unsigned long)vu->a, (unsigned long)vu->b, (unsigned long)vu->c,
                         vfm_sj_vu_in_step(&self->job.devs[d]) ? Py_True : Py_False,
                         (unsigned long long)self->job.devs[d].read_bytes);
}

static PyObject *SendJob_get_direct(SendJob *self, void *Py_UNUSED(closure))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyBool_FromLong(self->job.direct);
}

static PyMethodDef SendJob_methods[] = {
    {"start", (PyCFunction)SendJob_start, METH_NOARGS, NULL},
    {"cancel", (PyCFunction)SendJob_cancel, METH_NOARGS, NULL},
    {"join", (PyCFunction)SendJob_join, METH_NOARGS, NULL},
    {"fileno", (PyCFunction)SendJob_fileno, METH_NOARGS, NULL},
    {"push", (PyCFunction)SendJob_push, METH_VARARGS, NULL},
    {"room", (PyCFunction)SendJob_room, METH_VARARGS, NULL},
    {"room_fileno", (PyCFunction)SendJob_room_fileno, METH_VARARGS, NULL},
    {"push_end", (PyCFunction)SendJob_push_end, METH_VARARGS, NULL},
    {"source_detail", (PyCFunction)SendJob_source_detail, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef SendJob_getset[] = {
    {"finished", (getter)SendJob_get_finished, NULL, NULL, NULL},
    {"channel_bytes", (getter)SendJob_get_channel_bytes, NULL, NULL, NULL},
    {"device_counts", (getter)SendJob_get_device_counts, NULL, NULL, NULL},
    {"error", (getter)SendJob_get_error, NULL, NULL, NULL},
    {"direct", (getter)SendJob_get_direct, NULL, NULL, NULL},
    {"zerocopy_bytes", (getter)SendJob_get_zerocopy_bytes, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject vfiomig_SendJobType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.SendJob",
    .tp_basicsize = sizeof(SendJob),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SendJob_init,
    .tp_dealloc = (destructor)SendJob_dealloc,
    .tp_methods = SendJob_methods,
    .tp_getset = SendJob_getset,
};
