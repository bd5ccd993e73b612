/* vfiomig_wait - see vfiomig_wait.h. */
#include "vfiomig_wait.h"

#include <errno.h>
#include <poll.h>

int vfm_wait_fd(int fd, short events, int cancel_fd)
{
    struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = cancel_fd, .events = POLLIN}};

    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (p[1].revents)
            return ECANCELED;
        return 0;
    }
}
