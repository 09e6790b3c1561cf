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
 * The Vm's write cache (Vm.native_write_cache, vmm/write_cache.c), when the engine
 * turns it on (fast_ok): a store is first offered to it — it makes the stores
 * Vm.write would allow at its first step, with the same effect — and handed to Python
 * only when it refuses.  Offered only: stores of 1 to 8 bytes away from running code,
 * and 8-byte ones only from an instruction known to store 8 bytes at once (the engine
 * lists them: a vector store arrives in 8-byte pieces and is decided whole).
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

#define NPLAIN 256 /* direct-mapped on RIP */

typedef bool (*cached_write_fn)(void *cache, uint64_t gpa, int size, int64_t value);

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
    /* the Vm's write cache */
    volatile int32_t fast_ok;  /* cleared by the engine, also from another thread */
    int32_t pad;
    uint64_t code_lo, code_hi; /* stores into [code_lo, code_hi) go to Python */
    uint64_t fast_count;       /* stores the write cache made (the engine resets it) */
    uint64_t plain_rip[NPLAIN];/* RIP + 1 of instructions storing 8 bytes at once */
    cached_write_fn cached_write;
    void *cache;
};

/* Offer a store to the Vm's write cache: true when it was made. */
static inline bool cached(struct hook *h, uint64_t address, int size, int64_t value, uint64_t rip)
{
    if (size < 1 || size > 8 || (address >= h->code_lo && address < h->code_hi))
        return false;
    int64_t d = (int64_t)(address >> 12) - (int64_t)(rip >> 12);
    if ((d >= 0 && d <= 1) || ((address + 31) >> 12) == (rip >> 12))
        return false; /* near the running code: the engine's own check decides */
    if (size == 8 && h->plain_rip[rip & (NPLAIN - 1)] != rip + 1)
        return false;
    if (!h->cached_write(h->cache, address, size, value))
        return false;
    h->fast_count++;
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
    if (rip_ok && h->fast_ok && cached(h, address, size, value, rip)) {
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
