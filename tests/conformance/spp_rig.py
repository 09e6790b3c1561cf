"""Hand-built EPT and SPPT paths for the conformance tests.

Every table entry is written as a raw u64 with ``HostMemory.write_u64``.  The
builders of ``sppkit.arch.builders`` are deliberately not used, and the bit constants
below are spelled from the spec (docs/spp-rules.md) rather than
imported from sppkit, so a wrong constant in sppkit cannot hide in both places.

The style follows volatility3's ``test_intel_large_pages.py``: tables built by hand,
one test class per hardware rule, the rule in the class docstring.
"""

from __future__ import annotations

from typing import NamedTuple

from sppkit.arch import HostMemory, Processor, VmExit
from sppkit.arch.memory import ZERO_WORDS

# -- exit reasons (spec §4) ------------------------------------------------------
EPT_VIOLATION = 48
EPT_MISCONFIG = 49
SPP_EVENT = 66

# -- EPT entry bits (spec §2; SDM EPT entry tables) ------------------------------
R, W, X = 1 << 0, 1 << 1, 1 << 2
RWX = R | W | X
WB = 6 << 3  # memory type WB in bits 5:3 of a leaf
LARGE = 1 << 7  # bit 7 of a PDPTE/PDE: the entry maps a 1-GiB / 2-MiB page
ACCESSED = 1 << 8
DIRTY = 1 << 9
SPP = 1 << 61  # sub-page write permissions (4-KiB PTE only)

# -- EPTP: memory type WB (6), walk length 4 (bits 5:3 = 3), A/D enable bit 6 ------
EPTP_WB_4LEVEL = 6 | (3 << 3)
EPTP_AD = 1 << 6

# -- secondary processor-based VM-execution controls (spec §1) ----------------------
ENABLE_EPT = 1 << 1
ENABLE_SPP = 1 << 23

# -- exit-qualification bits (spec §4) ------------------------------------------------
Q_READ, Q_WRITE, Q_FETCH = 1 << 0, 1 << 1, 1 << 2
Q_R, Q_W, Q_X = 1 << 3, 1 << 4, 1 << 5  # AND of bits 0/1/2 over the EPT entries used
Q_GLA_VALID = 1 << 7
Q_LINEAR = 1 << 8  # access to the translation of a linear address
Q_SPP_MISS = 1 << 11  # exit 66 only: 1 = miss, 0 = misconfiguration
Q_NMI = 1 << 12

#: The qualification of an SPP-denied (or any EPT-denied) linear write to a page whose
#: accumulated permissions are R only: bits 1, 3, 7, 8.
Q_WRITE_DENIED_R = Q_WRITE | Q_R | Q_GLA_VALID | Q_LINEAR
assert Q_WRITE_DENIED_R == 0x18A

ALL_WRITABLE = sum(1 << (2 * i) for i in range(32))  # every even bit
ODD_BITS = sum(1 << (2 * i + 1) for i in range(32))
assert ALL_WRITABLE == 0x5555_5555_5555_5555 and ODD_BITS == 0xAAAA_AAAA_AAAA_AAAA


def vector(*subpages: int) -> int:
    """An SPP vector (L1E) with the write bit (2i) of each listed sub-page set."""
    return sum(1 << (2 * i) for i in set(subpages))


#: A guest-physical page with a different, non-zero index at every level
#: (47:39 = 0x0A5, 38:30 = 0x13C, 29:21 = 0x1F7, 20:12 = 0x0C3).
G = (0x0A5 << 39) | (0x13C << 30) | (0x1F7 << 21) | (0x0C3 << 12)
GLA = 0x7FFF_1234_5000

#: Lowest GPA bit of each level's 9-bit index.
EPT_SHIFT = {"PML4E": 39, "PDPTE": 30, "PDE": 21, "PTE": 12}
SPPT_SHIFT = {"L4E": 39, "L3E": 30, "L2E": 21, "L1E": 12}
EPT_LEVELS = tuple(EPT_SHIFT)
SPPT_NONLEAF = ("L4E", "L3E", "L2E")

#: Host frames of large leaves (aligned to 1 GiB, below 2**36).
LARGE_HPA = {"PDE": 0x2_0000_0000, "PDPTE": 0x4_0000_0000}


class Exit(NamedTuple):
    """The VMCS fields of a VM exit: reason, exit qualification, GPA and GLA fields."""

    reason: int
    qualification: int
    gpa: int
    gla: int | None


class Mapping(NamedTuple):
    entry: dict  # level name -> HPA of the entry used for the GPA
    hpa: int  # host frame of the leaf


class _RecordingFrames(dict):
    """A frame dictionary of a RecordingMemory: remembers every frame number looked up
    (in ``looked_up``, which the memory's two dictionaries share)."""

    def __init__(self, frames: dict, looked_up: set[int]) -> None:
        super().__init__(frames)
        self.looked_up = looked_up

    def get(self, pfn, default=None):
        self.looked_up.add(pfn)
        return super().get(pfn, default)

    def __getitem__(self, pfn):
        self.looked_up.add(pfn)
        return super().__getitem__(pfn)

    def __contains__(self, pfn):
        self.looked_up.add(pfn)
        return super().__contains__(pfn)


class _RecordingWords(_RecordingFrames):
    """The u64-word dictionary of a RecordingMemory: as the memory's own, a frame not in
    it reads as its backing's words or zeros (``__missing__``)."""

    def __init__(self, words: dict, looked_up: set[int], memory: HostMemory) -> None:
        super().__init__(words, looked_up)
        self.memory = memory

    def __missing__(self, pfn):
        f = self.memory._backed_frame(pfn)
        return ZERO_WORDS if f is None else dict.__getitem__(self, pfn)


class RecordingMemory(HostMemory):
    """HostMemory that records which 4-KiB frames are looked up (read or written).

    Recording happens at the frame dictionaries, which every reader of host memory
    has to go through: ``_frames`` (``read_u64``, ``read``) and ``_words``, the u64 view
    of the same frames that the processor's table walks read.
    """

    def __init__(self, maxphyaddr: int = 46) -> None:
        super().__init__(maxphyaddr)
        looked_up: set[int] = set()
        self._frames = _RecordingFrames(self._frames, looked_up)
        self._words = _RecordingWords(self._words, looked_up, self)

    @property
    def frames_looked_up(self) -> set[int]:
        return self._frames.looked_up

    def forget(self) -> None:
        self._frames.looked_up.clear()


class Rig:
    """Host memory with a hand-built EPT (root ``pml4``) and SPPT (root ``sppt_root``)."""

    def __init__(self, maxphyaddr: int = 46) -> None:
        self.maxphyaddr = maxphyaddr
        self.mem = RecordingMemory(maxphyaddr)
        self.pml4 = self.mem.alloc_frame()
        self.sppt_root = self.mem.alloc_frame()
        self.sppt_frames = {self.sppt_root}
        self._ept_tables: dict[tuple[str, int], int] = {}
        self._sppt_tables: dict[tuple[str, int], int] = {}

    # -- raw access ------------------------------------------------------------------
    def put(self, hpa: int, raw: int) -> None:
        self.mem.write_u64(hpa, raw)

    def get(self, hpa: int) -> int:
        return self.mem.read_u64(hpa)

    # -- EPT -----------------------------------------------------------------------
    def eptp(self, *, ad: bool = False, pml4: int | None = None) -> int:
        return (self.pml4 if pml4 is None else pml4) | EPTP_WB_4LEVEL | (EPTP_AD if ad else 0)

    def map(
        self,
        gpa: int,
        *,
        leaf: str = "PTE",
        flags: int = RWX | WB,
        hpa: int | None = None,
        pml4e: int = RWX,
        pdpte: int = RWX,
        pde: int = RWX,
        pml4: int | None = None,
    ) -> Mapping:
        """Write the EPT path for ``gpa`` down to a leaf at ``leaf``.

        ``flags`` are the leaf's low/high bits (bit 7 is added for PDE/PDPTE leaves);
        ``pml4e``/``pdpte``/``pde`` the bits of the non-leaf entries above it.
        Tables are shared between GPAs that share an upper entry.
        """
        upper = {"PML4E": pml4e, "PDPTE": pdpte, "PDE": pde}
        if hpa is None:
            hpa = self.mem.alloc_frame() if leaf == "PTE" else LARGE_HPA[leaf]
        table = self.pml4 if pml4 is None else pml4
        entry = {}
        for name in EPT_LEVELS:
            ehpa = table + 8 * ((gpa >> EPT_SHIFT[name]) & 0x1FF)
            entry[name] = ehpa
            if name == leaf:
                self.put(ehpa, hpa | flags | (LARGE if name != "PTE" else 0))
                break
            key = (table, name, gpa >> EPT_SHIFT[name])
            nxt = self._ept_tables.get(key)
            if nxt is None:
                nxt = self._ept_tables[key] = self.mem.alloc_frame()
            self.put(ehpa, nxt | upper[name])
            table = nxt
        return Mapping(entry, hpa)

    # -- SPPT ----------------------------------------------------------------------
    def spp(self, gpa: int, vec: int, *, l4e: int = 1, l3e: int = 1, l2e: int = 1) -> dict:
        """Write the SPPT path for ``gpa``: L4E/L3E/L2E = next table | bits, L1E = ``vec``."""
        bits = {"L4E": l4e, "L3E": l3e, "L2E": l2e}
        table = self.sppt_root
        entry = {}
        for name in SPPT_NONLEAF:
            ehpa = table + 8 * ((gpa >> SPPT_SHIFT[name]) & 0x1FF)
            entry[name] = ehpa
            key = (name, gpa >> SPPT_SHIFT[name])
            nxt = self._sppt_tables.get(key)
            if nxt is None:
                nxt = self._sppt_tables[key] = self.mem.alloc_frame()
                self.sppt_frames.add(nxt)
            self.put(ehpa, nxt | bits[name])
            table = nxt
        entry["L1E"] = table + 8 * ((gpa >> 12) & 0x1FF)
        self.put(entry["L1E"], vec)
        return entry

    # -- processor -------------------------------------------------------------------
    def cpu(self, *, spp: bool = True, ad: bool = False, cache: bool = False, **kw) -> Processor:
        controls = ENABLE_EPT | (ENABLE_SPP if spp else 0)
        return Processor(self.mem, self.eptp(ad=ad), secondary_controls=controls, spptp=self.sppt_root, cache=cache, **kw)

    def run(self, cpu: Processor, gpa: int, size: int, access, **kw):
        """Translate; the result is a tuple of ``(hpa, size)`` pieces or an :class:`Exit`."""
        self.mem.forget()
        return outcome(cpu, gpa, size, access, **kw)

    @property
    def sppt_was_read(self) -> bool:
        """Whether the last :meth:`run` looked at any SPPT frame."""
        return any((pfn << 12) in self.sppt_frames for pfn in self.mem.frames_looked_up)


def outcome(cpu: Processor, gpa: int, size: int, access, **kw):
    try:
        pieces = cpu.translate(gpa, size, access, **kw)
    except VmExit as e:
        return Exit(e.reason, e.qualification, e.gpa, e.gla)
    return tuple((p.hpa, p.size) for p in pieces)
