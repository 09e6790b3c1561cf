/*
 * sppkit: the Unicorn engine's write-protect hook trampoline, in C.
 *
 * Unicorn calls sppkit_uc_write_prot for every guest store to a page mapped
 * read-only (a page whose EPT leaf has W = 0, or a neighbour in the guard band).  It
 * decides nothing: it reads RIP, packs the store's bytes and hands the store to the
 * engine's Python callback, which calls Vm.write — the one write path.  What it saves
 * over a ctypes callback is the argument conversion and a separate RIP read.
 *
 * One thing is the engine's own, exactly as in its pure-Python hook: the cover.
 * Unicorn re-reports an unaligned or page-crossing store byte by byte after the
 * whole access (and a 16-byte vector store as two 8-byte pieces); those re-reports
 * get the answer Vm.write gave the whole access, without a second call.  They come in
 * one order — address ascending, and at one address a smaller size after a larger
 * one — so a report that does not follow the last one in that order starts a new
 * access, even at the same RIP and address (the same store run again in a loop).
 *
 * The permit mirror (fast_ok set by the engine): a store the processor's translation
 * cache permits outright, as Vm.write's own first step would find it, is made here
 * without calling Python.  The mirror decides nothing of its own: each entry is a copy
 * of a cache entry the processor made while Vm.write decided an earlier store to the
 * page (the host frame and the SPP vector, or "writable"), installed by the engine
 * after that call and dropped with the cache (INVEPT) — the engine clears fast_ok and
 * the mirror whenever anything else may differ (a pause, the exit, a write observer,
 * stores into code).  Such a store has exactly the effects Vm.write's fast path has:
 * its bytes land in the frame and it is counted (a write, and a page-granular access
 * on a page holding a protected sub-page); the counts are handed to the engine by
 * sppkit_uc_take_counts before any Python runs.  Only stores of 1 to 8 bytes within
 * one page, away from running code, and 8-byte ones only from an instruction known to
 * store 8 bytes at once (the engine lists them: a vector store arrives in pieces).
 *
 * Callback protocol: callback(address: int, data: bytes | None, rip: int | None)
 *   -> True  (continue; the access [address, address + len(data)) is decided),
 *      int n (continue; [address, address + n) is decided: a whole vector store),
 *      False (stop: the run ends at this instruction).
 * data is None when Unicorn reports a size outside 1..8; rip is None when RIP cannot
 * be read.  An exception escaping the callback is kept (sppkit_uc_take_error) and the
 * emulation stopped, never swallowed.
 *
 * Built on first use by sppkit/_native.py against this interpreter's headers.
 */
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*emu_stop_fn)(void *uc);

#define NPERMIT 256   /* direct-mapped on the guest frame number */
#define NPLAIN 256    /* direct-mapped on RIP */

struct permit {
    uint64_t gfn_plus1;  /* 0: empty */
    uint64_t host;       /* the host address of the frame's first byte */
    uint64_t vector;     /* the SPP vector (W at bit 2*s), or all ones: the page is writable */
    uint64_t hits;       /* stores made here since the last sppkit_uc_take_counts */
    uint32_t granular;   /* the page holds a protected sub-page (counted page-granular) */
    uint32_t pad;
};

struct hook {
    reg_read_fn reg_read;
    emu_stop_fn emu_stop;
    PyObject *callback; /* borrowed: the engine keeps it alive */
    PyObject *error;    /* an exception that escaped the callback (owned), or NULL */
    int32_t rip_reg;
    int32_t cover_valid;
    uint64_t cover_rip, cover_lo, cover_hi;
    uint64_t cover_last;      /* the last report of the covered access: its address */
    int64_t cover_last_size;  /* ... and size */
    /* the permit mirror */
    volatile int32_t fast_ok;  /* cleared by the engine, also from another thread */
    int32_t pad;
    uint64_t code_lo, code_hi; /* stores into [code_lo, code_hi) go to Python */
    uint64_t pending;          /* stores made by the mirror since the last take */
    uint64_t masks[1024];      /* the processor's SPP masks: [first << 5 | last] */
    uint64_t plain_rip[NPLAIN];/* RIP + 1 of instructions storing 8 bytes at once */
    struct permit permits[NPERMIT];
};

/* A store the mirror can make: true when it was made (and counted). */
static inline bool permitted(struct hook *h, uint64_t address, int size, int64_t value, uint64_t rip)
{
    uint64_t off = address & 0xFFF, gfn = address >> 12;
    if (size < 1 || size > 8 || off + (uint64_t)size > 4096)
        return false;
    if (address >= h->code_lo && address < h->code_hi)
        return false;
    int64_t d = (int64_t)gfn - (int64_t)(rip >> 12);
    if ((d >= 0 && d <= 1) || ((address + 31) >> 12) == (rip >> 12))
        return false; /* near the running code: the engine's own check decides */
    struct permit *p = &h->permits[gfn & (NPERMIT - 1)];
    if (p->gfn_plus1 != gfn + 1)
        return false;
    uint64_t mask = h->masks[(off >> 7) << 5 | ((off + size - 1) >> 7)];
    if ((p->vector & mask) != mask)
        return false;
    if (size == 8 && h->plain_rip[rip & (NPLAIN - 1)] != rip + 1)
        return false;
    unsigned char *dst = (unsigned char *)(uintptr_t)(p->host + off);
    uint64_t v = (uint64_t)value;
    for (int i = 0; i < size; i++) /* little-endian, whatever the host */
        dst[i] = (unsigned char)(v >> (8 * i));
    p->hits++;
    h->pending++;
    return true;
}

bool sppkit_uc_write_prot(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data)
{
    struct hook *h = user_data;
    uint64_t rip = 0;
    int rip_ok = h->reg_read(uc, h->rip_reg, &rip) == 0;
    if (rip_ok && h->cover_valid && rip == h->cover_rip && address >= h->cover_lo
        && address + (uint64_t)size <= h->cover_hi && (uint64_t)size < h->cover_hi - h->cover_lo
        && (address > h->cover_last || (address == h->cover_last && size < h->cover_last_size))) {
        h->cover_last = address; /* a re-report of a store already allowed whole */
        h->cover_last_size = size;
        return true;
    }
    h->cover_valid = 0;
    if (rip_ok && h->fast_ok && permitted(h, address, size, value, rip)) {
        h->cover_rip = rip; /* its re-reports, as for a store decided in Python */
        h->cover_lo = h->cover_last = address;
        h->cover_hi = address + (uint64_t)size;
        h->cover_last_size = size;
        h->cover_valid = 1;
        return true;
    }

    PyGILState_STATE gil = PyGILState_Ensure();
    bool ret = false;
    PyObject *args[3] = {NULL, NULL, NULL};
    args[0] = PyLong_FromUnsignedLongLong(address);
    if (size >= 1 && size <= 8) {
        unsigned char buf[8];
        uint64_t v = (uint64_t)value;
        for (int i = 0; i < size; i++) /* little-endian, whatever the host */
            buf[i] = (unsigned char)(v >> (8 * i));
        args[1] = PyBytes_FromStringAndSize((const char *)buf, size);
    } else {
        Py_INCREF(Py_None);
        args[1] = Py_None;
    }
    if (rip_ok) {
        args[2] = PyLong_FromUnsignedLongLong(rip);
    } else {
        Py_INCREF(Py_None);
        args[2] = Py_None;
    }
    PyObject *r = NULL;
    if (args[0] && args[1] && args[2])
        r = PyObject_Vectorcall(h->callback, args, 3, NULL);
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    Py_XDECREF(args[2]);
    if (r == NULL) {
        /* keep the first exception for the engine to re-raise; stop the emulation */
        PyObject *type_, *val, *tb;
        PyErr_Fetch(&type_, &val, &tb);
        PyErr_NormalizeException(&type_, &val, &tb);
        if (h->error == NULL && val != NULL) {
            if (tb != NULL)
                PyException_SetTraceback(val, tb);
            h->error = val;
            val = NULL;
        }
        Py_XDECREF(type_);
        Py_XDECREF(val);
        Py_XDECREF(tb);
        h->emu_stop(uc);
    } else {
        uint64_t hi = address + (uint64_t)size;
        if (r == Py_True) {
            ret = true;
        } else if (PyLong_Check(r)) {
            long long n = PyLong_AsLongLong(r);
            if (n > 0) {
                ret = true;
                hi = address + (uint64_t)n;
            } else {
                PyErr_Clear();
            }
        }
        if (ret && rip_ok) {
            h->cover_rip = rip;
            h->cover_lo = address;
            h->cover_hi = hi;
            h->cover_last = address;
            h->cover_last_size = size;
            h->cover_valid = 1;
        }
        Py_DECREF(r);
    }
    PyGILState_Release(gil);
    return ret;
}

/* The exception kept by the trampoline, or None (a new reference); clears it.
   Call with the GIL held (ctypes.PyDLL). */
PyObject *sppkit_uc_take_error(struct hook *h)
{
    PyObject *e = h->error;
    h->error = NULL;
    if (e == NULL) {
        Py_INCREF(Py_None);
        return Py_None;
    }
    return e;
}

/* Forget the last decided access (a new run, or protections changed). */
void sppkit_uc_reset_cover(struct hook *h)
{
    h->cover_valid = 0;
}

/* Hand over the mirror's counts: writes the (gfn, hits) pairs of the entries with
   hits on a page-granular page into out (up to max pairs: the table's size), zeroes
   every entry's hits, and returns the number of stores made by the mirror. */
uint64_t sppkit_uc_take_counts(struct hook *h, uint64_t *out, int max, int *npairs)
{
    uint64_t total = h->pending;
    int n = 0;
    if (total) {
        for (int i = 0; i < NPERMIT; i++) {
            struct permit *p = &h->permits[i];
            if (p->hits) {
                if (p->granular && n < max) {
                    out[2 * n] = p->gfn_plus1 - 1;
                    out[2 * n + 1] = p->hits;
                    n++;
                }
                p->hits = 0;
            }
        }
        h->pending = 0;
    }
    *npairs = n;
    return total;
}
