/*
 * cref_drain - reads its stdin to the end in 1 MiB reads and discards it: the "other
 * process" on the far side of a pipe sink, lighter than `cat > /dev/null` (128 KiB reads
 * plus a write per read).  Prints the byte count as JSON on stdout.
 */
#include "cref_common.h"

#define CREF_DRAIN_BUF (1u << 20)

int main(void)
{
    int rc = 1;
    unsigned long long total = 0;
    unsigned char *buf = malloc(CREF_DRAIN_BUF);

    if (!buf)
        goto out;
    for (;;) {
        ssize_t n = read(0, buf, CREF_DRAIN_BUF);
        if (n == 0)
            break;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            perror("cref_drain: read");
            goto out;
        }
        total += (unsigned long long)n;
    }
    printf("{\"tool\": \"cref_drain\", \"bytes\": %llu}\n", total);
    rc = 0;
out:
    free(buf);
    return rc;
}
