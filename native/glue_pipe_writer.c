/*
 * glue_pipe_writer.c - vfiomig._native.PipeWriter: writes an fd sink's batches to a blocking
 * pipe from a thread of its own, so that the event loop keeps receiving during each write.
 *
 * One thread per writer, one batch in flight.  submit() pins every chunk (a Py_buffer,
 * which holds a reference to its exporter) and wakes the thread; the thread writes the
 * batch in order with writev, looping on short writes, without the GIL and without
 * touching any Python object; then it signals done_fd (an eventfd the event loop waits
 * on) and result() releases the chunks and returns the byte count or raises OSError with
 * the errno.  The thread never blocks in a write: it writes at most what the pipe has room
 * for (as FdSink._write_blocking_pipe does) and otherwise polls the pipe together with a
 * stop eventfd, so close() stops and joins it promptly; the caller closes the fd only
 * after that.  The pipe's flags, shared with its other holders, are left alone.
 */
#include "glue.h"
#include "vfiomig_wait.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#define VFM_PAGE 4096L
#define VFM_MIN_LOOP_WRITE (64L * 1024)

typedef struct {
    PyObject_HEAD
    int fd;      /* the pipe (not owned) */
    int done_fd; /* eventfd: a batch finished */
    int stop_fd; /* eventfd: wakes the thread's poll to stop */
    long pipe_size;
    int started, closed;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* Under mu: */
    int pending;  /* a batch submitted, not yet picked up by the thread */
    int finished; /* the thread finished the batch in flight */
    int stop;     /* the thread must exit */
    int err;      /* errno of the batch's failure, 0 on success */
    long long written;
    /* The batch in flight; the Python side touches it only while no batch is running. */
    int busy;
    Py_buffer *bufs;
    Py_ssize_t nbufs;
    Run *run; /* or a Run, written from its iovecs (it stays pinned until result) */
    struct iovec *iov;
    size_t niov;
} PipeWriter;

/* Bytes a write can take without blocking, counted conservatively (see _fd._pipe_room). */
static long pipe_room(const PipeWriter *w)
{
    int unread = 0;
    if (ioctl(w->fd, FIONREAD, &unread) < 0)
        return 0;
    return w->pipe_size - VFM_PAGE * ((unread + VFM_PAGE - 1) / VFM_PAGE + 2);
}

/* Write the whole batch; 0 or an errno.  No GIL, no Python objects. */
static int write_batch(PipeWriter *w, long long *written)
{
    struct iovec *iov = w->iov;
    size_t n = w->niov;
    int must_poll = 0;
    while (n) {
        long room = must_poll ? 0 : pipe_room(w);
        if (room < VFM_MIN_LOOP_WRITE) {
            int err = vfm_wait_fd(w->fd, POLLOUT, w->stop_fd);
            if (err)
                return err;
            /* Writable means a free pipe buffer: PIPE_BUF bytes go through at least. */
            room = pipe_room(w);
            if (room < PIPE_BUF)
                room = PIPE_BUF;
            must_poll = 0;
        }
        /* The first `room` bytes of the batch, at most IOV_MAX entries. */
        size_t k = 0, left = (size_t)room, cut = 0, saved = 0;
        while (k < n && k < IOV_MAX && left) {
            if (iov[k].iov_len > left) {
                cut = 1;
                saved = iov[k].iov_len;
                iov[k].iov_len = left;
                left = 0;
            } else {
                left -= iov[k].iov_len;
            }
            k++;
        }
        ssize_t r = writev(w->fd, iov, (int)k);
        if (cut)
            iov[k - 1].iov_len = saved;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) { /* someone set O_NONBLOCK: wait for room */
                must_poll = 1;
                continue;
            }
            return errno;
        }
        *written += r;
        size_t done = (size_t)r;
        while (n && done >= iov->iov_len) {
            done -= iov->iov_len;
            iov++;
            n--;
        }
        if (done) {
            iov->iov_base = (char *)iov->iov_base + done;
            iov->iov_len -= done;
        }
    }
    return 0;
}

static void *writer_main(void *arg)
{
    PipeWriter *w = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals go to the interpreter's threads */
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->pending && !w->stop)
            pthread_cond_wait(&w->cv, &w->mu);
        if (w->stop)
            break;
        w->pending = 0;
        pthread_mutex_unlock(&w->mu);
        long long written = 0;
        int err = write_batch(w, &written);
        pthread_mutex_lock(&w->mu);
        w->written = written;
        w->err = err;
        w->finished = 1;
        uint64_t one = 1;
        while (write(w->done_fd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

static void release_batch(PipeWriter *w)
{
    for (Py_ssize_t i = 0; i < w->nbufs; i++)
        PyBuffer_Release(&w->bufs[i]);
    PyMem_Free(w->bufs);
    PyMem_Free(w->iov);
    if (w->run) {
        vfiomig_run_set_busy(w->run, 0);
        Py_CLEAR(w->run);
    }
    w->bufs = NULL;
    w->iov = NULL;
    w->nbufs = 0;
    w->niov = 0;
    w->busy = 0;
}

/* Stop and join the thread, release the batch, close the eventfds.  Idempotent. */
static void writer_close(PipeWriter *w)
{
    if (w->closed)
        return;
    w->closed = 1;
    if (w->started) {
        pthread_mutex_lock(&w->mu);
        w->stop = 1;
        pthread_cond_signal(&w->cv);
        pthread_mutex_unlock(&w->mu);
        uint64_t one = 1;
        while (write(w->stop_fd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
        Py_BEGIN_ALLOW_THREADS
        pthread_join(w->thread, NULL);
        Py_END_ALLOW_THREADS
        w->started = 0;
    }
    release_batch(w);
    if (w->done_fd >= 0)
        close(w->done_fd);
    if (w->stop_fd >= 0)
        close(w->stop_fd);
    w->done_fd = w->stop_fd = -1;
}

static PyObject *PipeWriter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PipeWriter *w = (PipeWriter *)type->tp_alloc(type, 0);
    if (!w)
        return NULL;
    w->fd = w->done_fd = w->stop_fd = -1;
    w->closed = 1; /* nothing to stop until __init__ succeeds */
    (void)args;
    (void)kwds;
    return (PyObject *)w;
}

static int PipeWriter_init(PipeWriter *w, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", NULL};
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &fd))
        return -1;
    if (!w->closed || w->started) {
        PyErr_SetString(PyExc_RuntimeError, "PipeWriter already initialised");
        return -1;
    }
    int size = fcntl(fd, F_GETPIPE_SZ);
    if (size <= 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    w->fd = fd;
    w->pipe_size = size;
    w->done_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    w->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->done_fd < 0 || w->stop_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        w->closed = 0;
        writer_close(w);
        return -1;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->closed = 0;
    int rc = pthread_create(&w->thread, NULL, writer_main, w);
    if (rc) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        writer_close(w);
        return -1;
    }
    w->started = 1;
    return 0;
}

static void PipeWriter_dealloc(PipeWriter *w)
{
    int had_sync = !w->closed || w->started;
    writer_close(w);
    if (had_sync) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
    }
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *writer_go(PipeWriter *w);

static PyObject *PipeWriter_submit(PipeWriter *w, PyObject *chunks)
{
    if (w->closed) {
        PyErr_SetString(PyExc_ValueError, "PipeWriter is closed");
        return NULL;
    }
    if (w->busy) {
        PyErr_SetString(PyExc_RuntimeError, "submit() while a batch is in flight");
        return NULL;
    }
    if (Py_IS_TYPE(chunks, &vfiomig_RunType)) {
        if (vfiomig_run_iov((Run *)chunks, &w->iov, &w->niov) < 0)
            return NULL;
        w->run = (Run *)Py_NewRef(chunks);
        vfiomig_run_set_busy(w->run, 1);
        return writer_go(w);
    }
    PyObject *seq = PySequence_Fast(chunks, "submit() takes a sequence of chunks");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    w->bufs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    w->iov = PyMem_Calloc((size_t)(n ? n : 1), sizeof(struct iovec));
    if (!w->bufs || !w->iov) {
        Py_DECREF(seq);
        release_batch(w);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer *b = &w->bufs[w->nbufs];
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), b, PyBUF_SIMPLE) < 0) {
            Py_DECREF(seq);
            release_batch(w);
            return NULL;
        }
        w->nbufs++;
        if (b->len) {
            w->iov[w->niov].iov_base = b->buf;
            w->iov[w->niov].iov_len = (size_t)b->len;
            w->niov++;
        }
    }
    Py_DECREF(seq);
    return writer_go(w);
}

/* Hand the batch in w->iov to the thread. */
static PyObject *writer_go(PipeWriter *w)
{
    w->busy = 1;
    pthread_mutex_lock(&w->mu);
    w->finished = 0;
    w->err = 0;
    w->written = 0;
    w->pending = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    Py_RETURN_NONE;
}

static PyObject *PipeWriter_result(PipeWriter *w, PyObject *Py_UNUSED(ignored))
{
    if (w->closed) {
        PyErr_SetString(PyExc_ValueError, "PipeWriter is closed");
        return NULL;
    }
    if (!w->busy) {
        PyErr_SetString(PyExc_RuntimeError, "result() without a batch in flight");
        return NULL;
    }
    uint64_t count;
    while (read(w->done_fd, &count, sizeof(count)) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&w->mu);
    int finished = w->finished, err = w->err;
    long long written = w->written;
    pthread_mutex_unlock(&w->mu);
    if (!finished)
        Py_RETURN_NONE;
    release_batch(w);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(written);
}

static PyObject *PipeWriter_close(PipeWriter *w, PyObject *Py_UNUSED(ignored))
{
    writer_close(w);
    Py_RETURN_NONE;
}

static PyObject *PipeWriter_get_done_fd(PipeWriter *w, void *Py_UNUSED(c))
{
    return PyLong_FromLong(w->done_fd);
}

static PyObject *PipeWriter_get_busy(PipeWriter *w, void *Py_UNUSED(c))
{
    return PyBool_FromLong(w->busy);
}

static PyMethodDef PipeWriter_methods[] = {
    {"submit", (PyCFunction)PipeWriter_submit, METH_O, NULL},
    {"result", (PyCFunction)PipeWriter_result, METH_NOARGS, NULL},
    {"close", (PyCFunction)PipeWriter_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef PipeWriter_getset[] = {
    {"done_fd", (getter)PipeWriter_get_done_fd, NULL, NULL, NULL},
    {"busy", (getter)PipeWriter_get_busy, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject vfiomig_PipeWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vfiomig._native.PipeWriter",
    .tp_basicsize = sizeof(PipeWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PipeWriter_new,
    .tp_init = (initproc)PipeWriter_init,
    .tp_dealloc = (destructor)PipeWriter_dealloc,
    .tp_methods = PipeWriter_methods,
    .tp_getset = PipeWriter_getset,
};
