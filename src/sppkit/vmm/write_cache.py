"""The Vm's write cache: ``Vm.write``'s first step in C, for engines whose guest stores
reach the VMM in C (the Unicorn engine's write-protect hook).

Each entry is a copy of :meth:`Vm.write_permit` for a page ``Vm.write`` was called for:
the processor's cached write permission.  ``write_cache.c`` makes a store that such an
entry permits — its bytes land and it is counted, which is all ``Vm.write`` does with
it — and refuses anything else, which the engine then hands to ``Vm.write``.  The Vm
keeps the table true: entries are refreshed after ``Vm.write`` (``note``), the whole
table is emptied when :attr:`Vm.permit_epoch` moves (``sync``), and the counts reach
the statistics before anything reads them (``fold``).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .vm import Vm

NPERMIT = 256  # write_cache.c: NPERMIT
_SOURCE = Path(__file__).with_name("write_cache.c")


class _Permit(ctypes.Structure):
    """``struct permit`` of write_cache.c."""

    _fields_ = [
        ("gfn_plus1", ctypes.c_uint64),
        ("host", ctypes.c_uint64),
        ("vector", ctypes.c_uint64),
        ("hits", ctypes.c_uint64),
        ("granular", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _Table(ctypes.Structure):
    """``struct write_cache`` of write_cache.c."""

    _fields_ = [
        ("pending", ctypes.c_uint64),
        ("masks", ctypes.c_uint64 * 1024),
        ("permits", _Permit * NPERMIT),
    ]


_lib_cache: list = []


def _lib():
    if not _lib_cache:
        from .. import _native

        lib = _native.load(_SOURCE)
        if lib is not None:
            lib.sppkit_vm_cached_write.restype = ctypes.c_bool
            lib.sppkit_vm_cached_write.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64]
            lib.sppkit_vm_take_counts.restype = ctypes.c_uint64
            lib.sppkit_vm_take_counts.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64), ctypes.c_int,
                                                  ctypes.POINTER(ctypes.c_int)]
        _lib_cache.append(lib)
    return _lib_cache[0]


def status() -> tuple[bool, str]:
    """``(available, what)`` of the C write cache."""
    from .. import _native

    _lib()
    return _native.status(_SOURCE)


class WriteCache:
    """The table and the Vm's upkeep of it (see the module's docstring)."""

    def __init__(self, vm: Vm, lib) -> None:
        self.vm = vm
        self.lib = lib
        self.table = _Table()
        self.table.masks[:] = vm.processor.spp_write_masks
        #: ``(function, table)`` addresses for C callers:
        #: ``bool function(table, gpa, size, value)`` (value: the bytes, little-endian)
        fn = ctypes.cast(lib.sppkit_vm_cached_write, ctypes.c_void_p).value
        assert fn is not None
        self.entry: tuple[int, int] = (fn, ctypes.addressof(self.table))
        self.epoch: tuple | None = None
        self.slots: dict[int, tuple[int, tuple[int, int, bool]]] = {}  # slot -> (gfn, permit) copied
        self.host: dict[int, int] = {}  # host frame -> its address in this process
        self.out = (ctypes.c_uint64 * (2 * NPERMIT))()
        self.npairs = ctypes.c_int()

    def fold(self) -> int:
        """Count the stores made in C (the Vm's statistics); returns how many."""
        total = self.lib.sppkit_vm_take_counts(ctypes.byref(self.table), self.out, NPERMIT, ctypes.byref(self.npairs))
        if total:
            out = self.out
            self.vm.count_permitted_writes(total, [(out[2 * i], out[2 * i + 1]) for i in range(self.npairs.value)])
        return total

    def sync(self) -> None:
        """Empty the table if the Vm's permits may have changed since it was filled."""
        epoch = self.vm.permit_epoch
        if epoch != self.epoch:
            if self.table.pending:
                self.fold()
            ctypes.memset(ctypes.addressof(self.table.permits), 0, ctypes.sizeof(self.table.permits))
            self.slots.clear()
            self.host.clear()  # (a memslot change may back host frames elsewhere)
            self.epoch = self.vm.permit_epoch

    def note(self, gfn: int, allowed: bool) -> None:
        """Vm.write was just called for page ``gfn`` (and sync() since): copy the page's
        permit into the table, or drop its entry.  (Not ``allowed``: only the page's own
        entry is checked — the cache entry it copies may be gone.)"""
        slot = gfn & (NPERMIT - 1)
        cur = self.slots.get(slot)
        if not allowed and (cur is None or cur[0] != gfn):
            return
        p = self.vm.write_permit(gfn)
        if p is not None and cur is not None and cur == (gfn, p):
            return  # (already there)
        e = self.table.permits[slot]
        if p is None:
            if cur is not None and cur[0] == gfn:
                e.gfn_plus1 = 0
                del self.slots[slot]
            return
        host = self.host.get(p[0] >> 12)
        if host is None:
            host = self.host[p[0] >> 12] = ctypes.addressof(ctypes.c_char.from_buffer(
                self.vm.memory.frame(p[0] >> 12)))
        # (its hits, if another page's, were folded before this Vm.write)
        e.gfn_plus1 = 0
        e.host, e.vector, e.granular, e.hits = host, p[1], p[2], 0
        e.gfn_plus1 = gfn + 1
        self.slots[slot] = (gfn, p)
