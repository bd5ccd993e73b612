/*
 * vfiomig_wait - a C thread's wait for an fd that a cancel eventfd can end (plain C).
 *
 * The C core's threads (the pipe writer, the send job's readers and senders) block in
 * poll(2) on the fd they work on and on an eventfd the Python side writes to stop them.
 */
#ifndef VFIOMIG_WAIT_H
#define VFIOMIG_WAIT_H

/* Wait until fd has one of events, or cancel_fd is readable: 0 (ready, or an error the
 * next call on fd reports), ECANCELED, or poll's errno. EINTR is retried. */
int vfm_wait_fd(int fd, short events, int cancel_fd);

#endif
