/*
 * vfiomig_core - the channel framer of vfiomig._core._framer in plain C (no Python headers).
 *
 * The state machine mirrors the Python reference step for step: the same states, the same
 * order of checks, the same point at which each error is detected.  It only reports *what*
 * happened (an event or an error code with its values); the CPython glue turns that into
 * the reference's event objects and error text, so both implementations say the same.
 *
 * The caller owns the receive buffer; the framer only keeps offsets into it.
 */
#ifndef VFIOMIG_CORE_H
#define VFIOMIG_CORE_H

#include <stddef.h>
#include <stdint.h>

#define VFM_HANDSHAKE_SIZE 64u
#define VFM_COMMON_SIZE 12u
#define VFM_IDSTR_SIZE 256u
#define VFM_DEVICE_HEADER_SIZE 276u
#define VFM_VFIO_HEADER_SIZE 12u
#define VFM_RAM_HEADER_BASE 320u
#define VFM_RAM_SIZE_OFFSET 20u
#define VFM_MAGIC 0x11223344u
#define VFM_VERSION 1u
#define VFM_FLAG_DEVICE_STATE 0x40u

enum vfm_state { VFM_S_HANDSHAKE, VFM_S_HEADER, VFM_S_PAYLOAD, VFM_S_SKIP, VFM_S_ENDED };

enum vfm_event {
    VFM_EV_NEED_DATA,
    VFM_EV_HANDSHAKE, /* 64 handshake bytes at out->offset: check, then vfm_handshake_done */
    VFM_EV_PACKET,
    VFM_EV_RAM,
    VFM_EV_END,
    VFM_EV_ERROR
};

enum vfm_error {
    VFM_E_NONE,
    VFM_E_MAGIC,          /* value = magic */
    VFM_E_VERSION,        /* value = version */
    VFM_E_IDSTR_NUL,
    VFM_E_SIZE_CAP,       /* size, device named by idstr/instance */
    VFM_E_SIZE_SHORT,     /* size */
    VFM_E_RAM_UNEXPECTED, /* value = flags */
    VFM_E_RAM_CAP,        /* size */
    VFM_E_EOF_COMMON,     /* value = bytes of the 12 */
    VFM_E_EOF_HEADER,     /* value = bytes available */
    VFM_E_EOF_RAM,        /* size = bytes missing */
    VFM_E_EOF_HANDSHAKE   /* value = bytes of the 64 */
};

struct vfm_framer {
    uint64_t cap;       /* largest next_packet_size accepted */
    int64_t ram_pages;  /* -1: a RAM packet is an error */
    int host_endian;    /* VFIO header in host byte order */
    int eof;
    enum vfm_state state;
    size_t pos, end;    /* unconsumed bytes of the caller's buffer */
    uint64_t remaining; /* data bytes left in the current packet or skip */
};

struct vfm_out {
    enum vfm_error error;
    uint32_t value;
    uint64_t size;
    size_t offset;      /* handshake: its bytes; packet: the idstr */
    size_t idstr_len;
    uint32_t instance, version, idx, flags;
};

void vfm_init(struct vfm_framer *f, uint64_t cap, int64_t ram_pages, int host_endian);
enum vfm_event vfm_next(struct vfm_framer *f, const uint8_t *buf, struct vfm_out *out);
void vfm_handshake_done(struct vfm_framer *f);
/* Consume n data bytes of the current packet (n <= remaining); they may be outside buf. */
void vfm_advance(struct vfm_framer *f, uint64_t n, int buffered);

#endif
