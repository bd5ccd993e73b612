/* vfiomig_core.c - see vfiomig_core.h.  Mirrors vfiomig/_core/_framer.py. */
#include "vfiomig_core.h"

#include <string.h>

static uint32_t vfm_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static uint32_t vfm_host32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

void vfm_init(struct vfm_framer *f, uint64_t cap, int64_t ram_pages, int host_endian)
{
    memset(f, 0, sizeof(*f));
    f->cap = cap;
    f->ram_pages = ram_pages;
    f->host_endian = host_endian;
    f->state = VFM_S_HANDSHAKE;
}

void vfm_handshake_done(struct vfm_framer *f)
{
    f->pos += VFM_HANDSHAKE_SIZE;
    f->state = VFM_S_HEADER;
}

void vfm_advance(struct vfm_framer *f, uint64_t n, int buffered)
{
    if (buffered)
        f->pos += (size_t)n;
    f->remaining -= n;
    if (f->remaining == 0)
        f->state = VFM_S_HEADER;
}

static enum vfm_event vfm_fail(struct vfm_out *out, enum vfm_error e, uint32_t value)
{
    out->error = e;
    out->value = value;
    return VFM_EV_ERROR;
}

/* A device-state header: returns NEED_DATA, PACKET or ERROR (never consumes on NEED_DATA). */
static enum vfm_event vfm_device(struct vfm_framer *f, const uint8_t *buf, size_t avail,
                                 struct vfm_out *out)
{
    const uint8_t *p = buf + f->pos;
    if (avail < VFM_DEVICE_HEADER_SIZE)
        return VFM_EV_NEED_DATA;
    out->instance = vfm_be32(p + 268);
    out->size = vfm_be32(p + 272);
    if (p[12 + VFM_IDSTR_SIZE - 1] != 0)
        return vfm_fail(out, VFM_E_IDSTR_NUL, 0);
    out->offset = f->pos + 12;
    out->idstr_len = strlen((const char *)p + 12);
    if (out->size > f->cap)
        return vfm_fail(out, VFM_E_SIZE_CAP, 0);
    if (out->size < VFM_VFIO_HEADER_SIZE)
        return vfm_fail(out, VFM_E_SIZE_SHORT, 0);
    if (avail < VFM_DEVICE_HEADER_SIZE + VFM_VFIO_HEADER_SIZE)
        return VFM_EV_NEED_DATA;
    p += VFM_DEVICE_HEADER_SIZE;
    uint32_t (*get)(const uint8_t *) = f->host_endian ? vfm_host32 : vfm_be32;
    out->version = get(p);
    out->idx = get(p + 4);
    out->flags = get(p + 8);
    out->size -= VFM_VFIO_HEADER_SIZE;
    f->pos += VFM_DEVICE_HEADER_SIZE + VFM_VFIO_HEADER_SIZE;
    f->remaining = out->size;
    f->state = out->size ? VFM_S_PAYLOAD : VFM_S_HEADER;
    return VFM_EV_PACKET;
}

static enum vfm_event vfm_ram(struct vfm_framer *f, const uint8_t *buf, size_t avail,
                              uint32_t flags, struct vfm_out *out)
{
    if (f->ram_pages < 0)
        return vfm_fail(out, VFM_E_RAM_UNEXPECTED, flags);
    /* ram_pages is ours (checked when the framer was made), not the peer's. */
    uint64_t hlen = VFM_RAM_HEADER_BASE + 8u * (uint64_t)f->ram_pages;
    if (avail < hlen)
        return VFM_EV_NEED_DATA;
    out->size = vfm_be32(buf + f->pos + VFM_RAM_SIZE_OFFSET);
    out->flags = flags;
    if (out->size > f->cap)
        return vfm_fail(out, VFM_E_RAM_CAP, flags);
    f->pos += (size_t)hlen;
    f->remaining = out->size;
    f->state = VFM_S_SKIP;
    return VFM_EV_RAM;
}

enum vfm_event vfm_next(struct vfm_framer *f, const uint8_t *buf, struct vfm_out *out)
{
    out->error = VFM_E_NONE;
    for (;;) {
        size_t avail = f->end - f->pos;
        switch (f->state) {
        case VFM_S_HEADER: {
            if (avail < VFM_COMMON_SIZE) {
                if (f->eof) {
                    if (avail)
                        return vfm_fail(out, VFM_E_EOF_COMMON, (uint32_t)avail);
                    f->state = VFM_S_ENDED;
                    return VFM_EV_END;
                }
                return VFM_EV_NEED_DATA;
            }
            const uint8_t *p = buf + f->pos;
            uint32_t magic = vfm_be32(p), version = vfm_be32(p + 4), flags = vfm_be32(p + 8);
            if (magic != VFM_MAGIC)
                return vfm_fail(out, VFM_E_MAGIC, magic);
            if (version != VFM_VERSION)
                return vfm_fail(out, VFM_E_VERSION, version);
            enum vfm_event ev = (flags & VFM_FLAG_DEVICE_STATE) ? vfm_device(f, buf, avail, out)
                                                                : vfm_ram(f, buf, avail, flags, out);
            if (ev == VFM_EV_NEED_DATA && f->eof)
                return vfm_fail(out, VFM_E_EOF_HEADER, (uint32_t)avail);
            return ev;
        }
        case VFM_S_SKIP: {
            uint64_t take = avail < f->remaining ? avail : f->remaining;
            f->pos += (size_t)take;
            f->remaining -= take;
            if (f->remaining == 0) {
                f->state = VFM_S_HEADER;
                continue;
            }
            if (f->eof) {
                out->size = f->remaining;
                return vfm_fail(out, VFM_E_EOF_RAM, 0);
            }
            return VFM_EV_NEED_DATA;
        }
        case VFM_S_HANDSHAKE:
            if (avail < VFM_HANDSHAKE_SIZE) {
                if (f->eof)
                    return vfm_fail(out, VFM_E_EOF_HANDSHAKE, (uint32_t)avail);
                return VFM_EV_NEED_DATA;
            }
            out->offset = f->pos;
            return VFM_EV_HANDSHAKE;
        case VFM_S_PAYLOAD: /* the glue refuses next_event() before the data is read */
        case VFM_S_ENDED:
        default:
            return VFM_EV_END;
        }
    }
}
