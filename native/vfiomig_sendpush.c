/* vfiomig_sendpush.c - the C send path's push devices (VFM_SJ_PUSH, see vfiomig_sendjob.h).
 *
 * A device whose reads only the caller can make (a vfio-user client's MIG_DATA_READ
 * replies, a source read through Python) has no reader thread: the caller reads a chunk
 * of whole packets and pushes it (cut into packets queued in the same round robin as the
 * readers' packets, its data pinned until the channels' threads sent them, never
 * copied), and before its next read asks whether every channel it used holds no more
 * than the job's limit, as a reader thread waits.  When not, the caller waits for the device's
 * room eventfd, which a channel's thread writes once it sent a batch (and a failure or a
 * cancel at once): an event loop waits on it, never on a lock or a condition variable.
 * The last push is followed by the config blob (vfm_sj_push_end), which ends the device
 * as a reader thread's end does.  (The room wakeups are vfiomig_sendthreads.c's,
 * vfm_sj_push_wake: this file calls the others, never the other way round.)
 */
#define _GNU_SOURCE
#include "vfiomig_sendjob.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int vfm_sj_push_init(struct vfm_sj_dev *dev)
{
    dev->room_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return dev->room_fd < 0 ? errno : 0;
}

int vfm_sj_push(struct vfm_sendjob *job, unsigned d, struct vfm_sj_buf *buf,
                const unsigned char *data, size_t len)
{
    struct vfm_sj_dev *dev = &job->devs[d];
    int err = ECANCELED;

    pthread_mutex_lock(&job->lock);
    memset(dev->push_used, 0, sizeof(dev->push_used));
    if (!job->failed) /* (it changes only under the lock) */
        err = vfm_sj_queue_chunk(job, dev, buf, data, 0, len, &dev->push_idx, VFM_SJ_MEM,
                                 dev->push_used);
    vfm_sj_wake_used(job, dev->push_used);
    pthread_mutex_unlock(&job->lock);
    return err;
}

int vfm_sj_push_room(struct vfm_sendjob *job, unsigned d)
{
    struct vfm_sj_dev *dev = &job->devs[d];
    uint64_t count;
    int room = 1;

    pthread_mutex_lock(&job->lock);
    /* drained under the lock the channels' threads write it under: no wakeup is lost */
    if (read(dev->room_fd, &count, sizeof(count)) < 0) {
        /* EAGAIN: nothing written since the last look */
    }
    if (!job->failed)
        room = vfm_sj_room(job, dev->push_used);
    if (!room && !dev->push_waiting) {
        dev->push_waiting = 1;
        job->pushers_waiting++;
    }
    pthread_mutex_unlock(&job->lock);
    return room;
}

int vfm_sj_push_end(struct vfm_sendjob *job, unsigned d, const unsigned char *config,
                    size_t config_len)
{
    struct vfm_sj_dev *dev = &job->devs[d];
    unsigned char *copy = malloc(config_len ? config_len : 1);
    int err = 0;

    if (!copy)
        return ENOMEM;
    memcpy(copy, config, config_len);
    pthread_mutex_lock(&job->lock);
    free(dev->config);
    dev->config = copy;
    dev->config_len = config_len;
    if (job->failed)
        err = ECANCELED;
    else if (!(err = vfm_sj_queue_config(job, dev, dev->push_idx)))
        vfm_sj_reader_done(job);
    pthread_mutex_unlock(&job->lock);
    return err;
}
