"""The write lane: :meth:`Vm.write`'s fast path, compiled (write_lane.c).

``Vm.write`` first tries the processor's translation cache: a one-page write the cache
permits outright — a writable mapping, or an SPP vector cached with the mapping
(``cache_spp``) that permits every sub-page the write touches — is committed and
counted with no walk.  :class:`WriteLane` is that same step for engines whose guest
writes arrive in native code (the Unicorn engine's write-protect hook): a C table
holding a copy of those cached mappings, and one C function that commits a write the
copy permits and counts it exactly as ``Vm.write`` would (``writes``,
``page_granular`` and its per-page counts).  Everything else goes to ``Vm.write``.

The copy never permits more than the processor's cache:

* an entry is installed only from a mapping the processor cached
  (:meth:`WriteLane.install`, called after ``Vm.write`` committed a write);
* it is dropped when the processor drops that mapping (a violation, a mapping not
  good enough), and the whole table is emptied at every INVEPT and whenever the
  processor changes tags (it listens to the processor's cache);
* it is disabled while a write observer (``Vm.on_write``) is registered, since the
  observer must see every write.

The counts are folded into the Vm's statistics whenever they are read
(``Vm.stats()``) and before the table is emptied.  Without a C compiler (or with
``SPPKIT_NATIVE=0``) :func:`available` says why and engines keep calling ``Vm.write``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import _native
from ..arch.sppt import FULL_ACCESS_MAP, map_from_vector

if TYPE_CHECKING:
    from .vm import Vm

SOURCE = Path(__file__).with_name("write_lane.c")
SLOTS = 4096  # a power of two; the table is emptied when three-quarters full


class _Entry(ctypes.Structure):
    _fields_ = [("key", ctypes.c_uint64), ("host", ctypes.c_uint64), ("mask", ctypes.c_uint32),
                ("granular", ctypes.c_uint32), ("count", ctypes.c_uint64)]


class _Lane(ctypes.Structure):
    """Mirror of ``struct lane`` in write_lane.c."""

    _fields_ = [("slots", ctypes.c_void_p), ("nslots", ctypes.c_uint32), ("used", ctypes.c_uint32),
                ("first_byte", ctypes.c_int32), ("enabled", ctypes.c_int32),
                ("writes", ctypes.c_uint64), ("granular", ctypes.c_uint64)]


def _lib():
    lib = _native.load(SOURCE)
    if lib is not None and not getattr(lib, "_sppkit_typed", False):
        lib.sppkit_lane_write.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64]
        lib.sppkit_lane_write.restype = ctypes.c_int
        lib.sppkit_lane_put.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32,
                                        ctypes.c_uint32]
        lib.sppkit_lane_put.restype = ctypes.c_int64
        lib.sppkit_lane_drop.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
        lib.sppkit_lane_clear.argtypes = [ctypes.c_void_p]
        lib._sppkit_typed = True
    return lib


def available() -> tuple[bool, str]:
    """``(available, what)``: whether the lane's C code is built here, and how / why not."""
    return _native.status(SOURCE)


class WriteLane:
    """The compiled fast path of one :class:`Vm`'s writes; see the module docstring.
    Get it with :meth:`Vm.write_lane`."""

    def __init__(self, vm: "Vm", lib) -> None:
        p = vm.processor
        if p.cache is None:
            raise ValueError("the write lane copies the processor's translation cache: the Vm needs cache=True")
        self.vm = vm
        self.lib = lib
        self._slots = (_Entry * SLOTS)()
        self.state = _Lane(ctypes.addressof(self._slots), SLOTS, 0, int(p.spp_write_check == "first-byte"),
                           int(vm._observer is None), 0, 0)
        self.address = ctypes.addressof(self.state)  # what native callers pass as `struct lane *`
        #: ``int sppkit_lane_write(struct lane *, uint64_t gpa, uint32_t size, uint64_t value)``
        self.write_function = ctypes.cast(lib.sppkit_lane_write, ctypes.c_void_p).value
        self._granular_slots: dict[int, int] = {}  # slot index -> gfn, of pages that count per page
        self.installs = 0
        self.clears = 0
        p.cache.listeners.append(self)

    # -- the processor's cache tells us ---------------------------------------------------
    def dropped(self, gfn: int) -> None:
        self.lib.sppkit_lane_drop(self.address, gfn)

    def invalidated(self) -> None:
        self.clear()

    # -- the Vm's side ---------------------------------------------------------------
    def write(self, gpa: int, data: bytes) -> bool:
        """Commit ``data`` (1–8 bytes) at ``gpa`` if the lane permits it (True), as the
        native callers do; False: the write is for ``Vm.write``."""
        return bool(self.lib.sppkit_lane_write(self.address, gpa, len(data), int.from_bytes(data, "little")))

    def install(self, gpa: int) -> bool:
        """Copy the processor's cached mapping of ``gpa``'s page, if it permits writes
        outright (as ``Vm.write``'s fast path would find it).  Returns whether an entry
        that permits something is now installed."""
        vm = self.vm
        p = vm.processor
        tlb = p._tlb
        if tlb is None or vm._observer is not None:
            return False
        gfn = gpa >> 12
        hit = tlb.get(gfn)
        if hit is None or not (hit[2] or not p._ad):
            return False
        if hit[1] & 2:
            mask = FULL_ACCESS_MAP
        elif hit[4] is not None and p._spp_on:
            mask = map_from_vector(hit[4])
        else:
            return False
        m = vm.slots.find(gpa)
        if m is None:
            return False
        granular = m.maps is not None and m.maps.item((gpa - m.gpa) >> 12) != FULL_ACCESS_MAP
        frame = vm.memory.frame(hit[0] >> 12)
        host = np.frombuffer(frame, dtype=np.uint8).ctypes.data
        i = self.lib.sppkit_lane_put(self.address, gfn, host, mask, int(granular))
        if i < 0:
            self.clear()
            i = self.lib.sppkit_lane_put(self.address, gfn, host, mask, int(granular))
        if granular:
            self._granular_slots[i] = gfn
        self.installs += 1
        return mask != 0

    def set_enabled(self, on: bool) -> None:
        self.state.enabled = int(on)

    def fold(self) -> None:
        """Add the counts of the writes committed here to the Vm's statistics."""
        st = self.state
        if not st.writes:
            return
        stats = self.vm._stats
        stats.writes += st.writes
        stats.page_granular += st.granular
        slots = self._slots
        for i, gfn in self._granular_slots.items():
            n = slots[i].count
            if n:
                stats.page_granular_by_page.add(gfn, n)
                slots[i].count = 0
        st.writes = st.granular = 0

    def clear(self) -> None:
        """Fold, then empty the table."""
        self.fold()
        if self.state.used:
            self.lib.sppkit_lane_clear(self.address)
            self._granular_slots.clear()
            self.clears += 1

    def close(self) -> None:
        """Fold, empty, and stop listening to the processor."""
        self.clear()
        listeners = self.vm.processor.cache.listeners
        if self in listeners:
            listeners.remove(self)
