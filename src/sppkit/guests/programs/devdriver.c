/*
 * devdriver - the guest driver of sppkit's toy "ring console" device
 * (sppkit.usecases.device.RingConsole), whose registers share one page with
 * ordinary RAM: only the register sub-page is trapped, the ring is plain memory.
 *
 *   devpage  0x000-0x07F  registers (sub-page 0, write-protected: every write traps)
 *                         0x00 MAGIC 'SPPC' (ro)   0x04 VERSION (ro)   0x08 CONTROL (rw)
 *                         0x0C STATUS (ro)         0x10 DOORBELL (wo)  0x14 COMPLETED (ro)
 *                         0x18 CHECKSUM (ro)       0x1C BYTES (ro)
 *            0x080-0x0FF  ring header: avail_idx (driver), used_idx (device)   RAM
 *            0x100-0x1FF  16 descriptors {u64 addr; u32 len; u32 flags}        RAM
 *            0x200-0xFFF  16 data buffers of 224 bytes                         RAM
 *
 * The driver checks MAGIC, resets and enables the device, tries to clear the
 * read-only STATUS (the device ignores it), then sends `message` line by line: it
 * copies each line into a buffer, fills a descriptor, bumps avail_idx, and every
 * BATCH lines writes avail_idx to DOORBELL and polls COMPLETED until the device has
 * consumed the ring.  Finally it compares the device's CHECKSUM and BYTES with its
 * own FNV-1a of the text, disables the device and returns 0 if everything matched
 * (1 checksum/bytes mismatch, 2 device not found, 3 not ready, 4 completion timeout).
 *
 * The driver counts its own stores: drv_ring_writes (to the RAM part of the page)
 * and drv_reg_writes / drv_doorbells (to the register sub-page), for the host.
 */
#include "sppkit_rt.h"

#define DEV_MAGIC       0x43505053u   /* "SPPC" */
#define CTRL_ENABLE     0x1u
#define CTRL_RESET      0x2u
#define STATUS_READY    0x1u
#define STATUS_ERROR    0x2u
#define RING_SIZE       16
#define BUF_SIZE        224
#define BATCH           3
#define POLL_LIMIT      1000000

struct desc {
    u64 addr;
    u32 len;
    u32 flags;
};

struct devpage {
    /* sub-page 0: registers */
    u32 magic;          /* 0x00 */
    u32 version;        /* 0x04 */
    u32 control;        /* 0x08 */
    u32 status;         /* 0x0C */
    u32 doorbell;       /* 0x10 */
    u32 completed;      /* 0x14 */
    u32 checksum;       /* 0x18 */
    u32 bytes;          /* 0x1C */
    u8 reg_reserved[0x60];
    /* sub-page 1: ring header */
    u32 avail_idx;      /* 0x80 */
    u32 used_idx;       /* 0x84 */
    u8 hdr_reserved[0x78];
    /* sub-pages 2-3: descriptors */
    struct desc ring[RING_SIZE];            /* 0x100 */
    /* sub-pages 4-31: buffers */
    u8 buf[RING_SIZE][BUF_SIZE];            /* 0x200 */
};

_Static_assert(sizeof(struct desc) == 16, "desc size");
_Static_assert(sizeof(struct devpage) == SPPKIT_PAGE_SIZE, "devpage is one page");
_Static_assert(offsetof(struct devpage, doorbell) == 0x10, "doorbell");
_Static_assert(offsetof(struct devpage, bytes) == 0x1C, "bytes");
_Static_assert(offsetof(struct devpage, avail_idx) == 0x80, "avail_idx");
_Static_assert(offsetof(struct devpage, ring) == 0x100, "ring");
_Static_assert(offsetof(struct devpage, buf) == 0x200, "buf");

SPPKIT_PAGE_ALIGNED struct devpage devpage;

SPPKIT_EXPORT_FIELD(dev_registers, devpage, 0x000, 0x80);
SPPKIT_EXPORT_FIELD(dev_ring_header, devpage, 0x080, 0x80);
SPPKIT_EXPORT_FIELD(dev_descriptors, devpage, 0x100, 0x100);
SPPKIT_EXPORT_FIELD(dev_buffers, devpage, 0x200, 0xE00);

const char message[] =
    "Sub-page write protection, seen from a device driver:\n"
    "the descriptors and buffers you are reading went through\n"
    "ordinary RAM in the same 4-KiB page as the device's registers,\n"
    "without a single VM exit.  Only the doorbell and the control\n"
    "register live in the one 128-byte sub-page the hypervisor\n"
    "write-protects, so only writes to them reach the device model.\n"
    "Page-granular trapping would have exited on every byte.\n";

/* What the driver did, for the host to compare with the device's view. */
u64 drv_ring_writes;
u64 drv_reg_writes;
u64 drv_doorbells;
u64 drv_descriptors;
u64 drv_bytes;
u64 drv_polls;

static struct devpage *const dev = &devpage;
static u64 ring_w, reg_w;

static inline void ring8(void *p, u8 v) { rt_write8(p, v); ring_w++; }
static inline void ring32(void *p, u32 v) { rt_write32(p, v); ring_w++; }
static inline void ring64(void *p, u64 v) { rt_write64(p, v); ring_w++; }
static inline void reg32(void *p, u32 v) { rt_write32(p, v); reg_w++; }

static void say(const char *s) { rt_puts("devdriver: "); rt_puts(s); }

static u32 fnv1a(const char *s, u64 n)
{
    u32 h = 2166136261u;
    for (u64 i = 0; i < n; i++) {
        h ^= (u8)s[i];
        h *= 16777619u;
    }
    return h;
}

static int kick(u32 avail, u64 *doorbells, u64 *polls)
{
    reg32(&dev->doorbell, avail);
    (*doorbells)++;
    for (u64 spin = 0; spin < POLL_LIMIT; spin++) {
        (*polls)++;
        if (rt_read32(&dev->completed) == avail && rt_read32(&dev->used_idx) == avail)
            return 0;
    }
    return -1;
}

int main(void)
{
    u64 len = sizeof(message) - 1;
    u64 doorbells = 0, polls = 0, descs = 0;
    u32 avail = 0;
    int code = 0;

    if (rt_read32(&dev->magic) != DEV_MAGIC) {
        say("no device at devpage (magic ");
        rt_put_hex(rt_read32(&dev->magic));
        rt_puts(")\n");
        return 2;
    }
    say("found ring console version ");
    rt_put_dec(rt_read32(&dev->version));
    rt_putc('\n');

    reg32(&dev->control, CTRL_RESET);
    reg32(&dev->control, CTRL_ENABLE);
    if (!(rt_read32(&dev->status) & STATUS_READY)) {
        say("device not ready\n");
        return 3;
    }
    reg32(&dev->status, 0);               /* read-only: the device ignores this */
    say(rt_read32(&dev->status) & STATUS_READY ? "status is read-only: still READY\n"
                                               : "status was cleared by a guest write!\n");

    u64 pos = 0;
    while (pos < len) {
        u32 slot = avail % RING_SIZE;
        u64 n = 0;
        while (pos + n < len && n < BUF_SIZE) {
            char c = message[pos + n];
            ring8(&dev->buf[slot][n], (u8)c);
            n++;
            if (c == '\n')
                break;
        }
        ring64(&dev->ring[slot].addr, (u64)(uintptr_t)&dev->buf[slot][0]);
        ring32(&dev->ring[slot].len, (u32)n);
        ring32(&dev->ring[slot].flags, 0);
        avail++;
        ring32(&dev->avail_idx, avail);
        descs++;
        pos += n;
        if (avail % BATCH == 0 || pos == len) {
            if (kick(avail, &doorbells, &polls)) {
                say("timeout waiting for the device\n");
                return 4;
            }
        }
    }

    u32 mine = fnv1a(message, len);
    u32 theirs = rt_read32(&dev->checksum);
    u32 bytes = rt_read32(&dev->bytes);
    reg32(&dev->control, 0);

    rt_write64(&drv_ring_writes, ring_w);
    rt_write64(&drv_reg_writes, reg_w);
    rt_write64(&drv_doorbells, doorbells);
    rt_write64(&drv_descriptors, descs);
    rt_write64(&drv_bytes, len);
    rt_write64(&drv_polls, polls);

    say("sent ");
    rt_put_dec(len);
    rt_puts(" bytes in ");
    rt_put_dec(descs);
    rt_puts(" descriptors, ");
    rt_put_dec(doorbells);
    rt_puts(" doorbells, ");
    rt_put_dec(ring_w);
    rt_puts(" ring writes, ");
    rt_put_dec(reg_w);
    rt_puts(" register writes\n");
    say("checksum: driver ");
    rt_put_hex(mine);
    rt_puts(", device ");
    rt_put_hex(theirs);
    if (mine != theirs || bytes != len) {
        rt_puts(" - MISMATCH\n");
        code = 1;
    } else {
        rt_puts(" - match\n");
    }
    return code;
}
