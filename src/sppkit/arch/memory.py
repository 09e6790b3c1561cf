"""Host-physical memory: sparse 4-KiB frames addressed by host-physical address (HPA).

EPT and SPPT tables live here as raw little-endian u64 entries, exactly as the
processor reads them; guest RAM frames live here too.  A frame that was never
written reads as zeros.
"""

from __future__ import annotations

import struct
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

PAGE_SIZE = 4096
PAGE_SHIFT = 12
PAGE_MASK = ~(PAGE_SIZE - 1)

#: The most bytes one :meth:`HostMemory.read` returns: 1 GiB.  A read builds its whole
#: result as one ``bytes`` (through a working buffer as large, a frame at a time), so
#: it costs its length whatever the memory holds: about 2 GiB of host memory and 3 s
#: for 1 GiB, while ``read(0, 2**45)`` would run for a day or end in MemoryError.  A
#: longer read is refused (ValueError naming the length and this limit) before anything
#: is allocated; read a larger range in pieces.
MAX_READ = 1 << 30



def check_read_length(n: int) -> None:
    """Refuse a read of more than :data:`MAX_READ` bytes (ValueError naming both), the
    one rule for ``HostMemory.read`` and ``Vm.read``."""
    if n > MAX_READ:
        raise ValueError(f"length n={n:#x} is more than MAX_READ = {MAX_READ:#x} bytes (1 GiB), the most one read "
                         "returns: read a larger range in pieces")


_U64 = struct.Struct("<Q")
_unpack_u64 = _U64.unpack_from  # bound once: read_u64/write_u64 are the hot path
_pack_u64 = _U64.pack_into

#: A frame's backing buffer: a bytearray, or a memoryview of a range's backing (an
#: engine's guest RAM, see :meth:`HostMemory.alloc_range`).
Frame = bytearray | memoryview


class _LittleEndianWords:
    """A frame as a sequence of little-endian u64 words: the portable fallback of
    ``memoryview(frame).cast("Q")`` (whose words are in host byte order)."""

    __slots__ = ("_buf",)

    def __init__(self, buf) -> None:
        self._buf = buf

    def __getitem__(self, i: int) -> int:
        return _U64.unpack_from(self._buf, i << 3)[0]


def _native_words(buf) -> memoryview:
    return memoryview(buf).cast("B").cast("Q")


#: A frame's words: a native-order view on a little-endian host; on a big-endian host
#: such a view would read the entries byte-swapped, so the portable fallback.
_words_of: Callable[[Any], Any] = _native_words if sys.byteorder == "little" else _LittleEndianWords

#: The words of a frame that was never written (all zero): what ``_words.get(pfn, ZERO_WORDS)``
#: gives for a frame not in memory, so that a walk reads such a frame without a test.
ZERO_WORDS = _words_of(bytes(PAGE_SIZE))


def check_maxphyaddr(maxphyaddr: object) -> None:
    """Refuse (ValueError) a MAXPHYADDR outside what the model supports: an int from 32 to 52."""
    if not isinstance(maxphyaddr, int) or isinstance(maxphyaddr, bool) or not 32 <= maxphyaddr <= 52:
        raise ValueError(f"maxphyaddr={maxphyaddr!r}: must be an integer from 32 to 52")


def byte_view(data: object) -> memoryview:
    """``data`` as a view of its bytes: bytes, bytearray, or a memoryview of any format or
    shape (its raw bytes: len() of an 'I' view counts items, and a frame takes only a
    'B' view of its size); anything else is a TypeError naming it."""
    if isinstance(data, memoryview):
        return data.cast("B") if data.c_contiguous else memoryview(data.tobytes())
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    raise TypeError(f"data={data!r:.60}: must be bytes, bytearray or memoryview, not {type(data).__name__}")


class _Words(dict):
    """``HostMemory._words``: pfn -> the frame's u64 words.  A frame not in it reads as
    :data:`ZERO_WORDS`, unless it lies in a range backed by a buffer and not yet touched
    (see :meth:`HostMemory.alloc_range`): then its words are made from the backing.  The
    processor's walks index it (``words[pfn][i]``): a hit costs what ``get`` does."""

    __slots__ = ("_memory",)

    def __init__(self, memory: HostMemory, *args) -> None:
        super().__init__(*args)
        self._memory = weakref.ref(memory)  # (no cycle: the memory, and its backing's views, go when dropped)

    def __missing__(self, pfn: int):
        memory = self._memory()
        f = None if memory is None else memory._backed_frame(pfn)
        return ZERO_WORDS if f is None else self[pfn]

    def __reduce__(self):  # (pickled as a plain dict: HostMemory.__setstate__ rebuilds it)
        return dict, (dict(self),)


class PhysicalAddressError(ValueError):
    """An address outside the host-physical address space (at or above 2**maxphyaddr)."""


class HostMemory:
    """Sparse host-physical memory of ``2**maxphyaddr`` bytes in 4-KiB frames.

    ``alloc_frame()`` hands out zeroed, 4-KiB-aligned frames that are not in use;
    ``free_frame()`` returns one.  ``read``/``write`` work at any address and may
    cross frames; ``read_u64``/``write_u64`` are the fast path for table entries.
    """

    def __init__(self, maxphyaddr: int = 46, *, first_frame: int = 0x100000) -> None:
        check_maxphyaddr(maxphyaddr)
        self.maxphyaddr = maxphyaddr
        self.limit = 1 << maxphyaddr
        if (
            not isinstance(first_frame, int)
            or isinstance(first_frame, bool)
            or first_frame & (PAGE_SIZE - 1)
            or not 0 <= first_frame < self.limit
        ):
            raise ValueError(
                f"first_frame={first_frame!r}: must be a non-negative multiple of 4 KiB "
                f"below 2**maxphyaddr = {self.limit:#x}"
            )
        self._frames: dict[int, Frame] = {}
        # The same frames as sequences of u64 words (``_words[pfn][i]`` is the entry at
        # ``pfn << 12 | i << 3``), sharing their bytes: the processor's table walks read
        # here, faster than struct.  Every method that adds or drops a frame in
        # ``_frames`` does the same here (_add_frame / _drop_frame).
        self._words: _Words = _Words(self)
        # Ranges backed by a buffer (alloc_range(backing=...)): (first pfn, end pfn, a
        # view of the backing).  Their frames enter _frames/_words when first used (a
        # frame apiece made up front cost a second and 130 MB per GiB of guest RAM);
        # every miss path of _frames asks _backed_frame.
        self._backed: list[tuple[int, int, memoryview]] = []
        self._next = first_frame >> PAGE_SHIFT
        self._free: list[int] = []

    # -- checks -----------------------------------------------------------------
    @staticmethod
    def _check_hpa_type(hpa: object) -> None:
        if not isinstance(hpa, int) or isinstance(hpa, bool):
            raise TypeError(f"hpa must be an int, not {type(hpa).__name__} (hpa={hpa!r:.60})")

    def _check(self, hpa: int, n: int) -> None:
        self._check_hpa_type(hpa)
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"length n={n!r:.60} must be an int, not {type(n).__name__}")
        if hpa < 0:
            raise PhysicalAddressError(f"hpa={hpa:#x} is negative")
        if n < 0:
            raise ValueError(f"length n={n} is negative")
        if hpa + n > self.limit:
            raise PhysicalAddressError(
                f"hpa={hpa:#x} (+{n} bytes) is at or above 2**maxphyaddr = {self.limit:#x} "
                f"(maxphyaddr={self.maxphyaddr})"
            )

    # -- frames -----------------------------------------------------------------
    def _add_frame(self, pfn: int, buf) -> None:
        self._frames[pfn] = buf
        self._words[pfn] = _words_of(buf)

    def _drop_frame(self, pfn: int):
        """Forget frame ``pfn``; its buffer, or None if it had none."""
        self._words.pop(pfn, None)
        return self._frames.pop(pfn, None)

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_words"] = None  # memoryviews do not pickle: rebuilt from the frames
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self.__dict__.setdefault("_backed", [])
        self._words = _Words(self, {pfn: _words_of(f) for pfn, f in self._frames.items()})

    def _backed_frame(self, pfn: int):
        """The frame of ``pfn`` when it lies in a backed range (a view of the backing,
        entered in _frames and _words now), else None."""
        f = self._backed_view(pfn)
        if f is not None:
            self._add_frame(pfn, f)
        return f

    def _backed_view(self, pfn: int):
        """A view of the backing of ``pfn`` when it lies in a backed range, else None;
        entered nowhere (reads need no frame of their own)."""
        for lo, hi, mv in self._backed:
            if lo <= pfn < hi:
                k = pfn - lo
                return mv[k << PAGE_SHIFT : (k + 1) << PAGE_SHIFT]
        return None

    def _in_backed(self, pfn: int) -> bool:
        return any(lo <= pfn < hi for lo, hi, _ in self._backed)

    def _unback(self, lo: int, hi: int) -> None:
        """Take frames [lo, hi) out of the backed ranges (they were freed)."""
        kept = []
        for a, b, mv in self._backed:
            if b <= lo or hi <= a:
                kept.append((a, b, mv))
                continue
            if a < lo:
                kept.append((a, lo, mv[: (lo - a) << PAGE_SHIFT]))
            if hi < b:
                kept.append((hi, b, mv[(hi - a) << PAGE_SHIFT :]))
        self._backed = kept

    def frame(self, pfn: int) -> Frame:
        """The backing buffer of page frame ``pfn`` (created zeroed on first use)."""
        try:
            f = self._frames.get(pfn)
            if f is not None:
                return f
        except TypeError:  # unhashable: refused, naming it, on the miss path
            pass
        return self._new_frame(pfn)

    def _new_frame(self, pfn: int) -> Frame:
        """:meth:`frame`'s miss path: check ``pfn``, then create the frame zeroed."""
        if not isinstance(pfn, int) or isinstance(pfn, bool):
            raise TypeError(f"frame number must be an int, not {type(pfn).__name__} (pfn={pfn!r:.60})")
        if not 0 <= pfn < (self.limit >> PAGE_SHIFT):
            raise PhysicalAddressError(
                f"frame number {pfn:#x} is outside 2**maxphyaddr = {self.limit:#x} (maxphyaddr={self.maxphyaddr})"
            )
        pfn = int(pfn)  # an int subclass (an IntEnum) keyed as the plain int it equals
        if self._backed:
            b = self._backed_frame(pfn)
            if b is not None:
                return b
        f = bytearray(PAGE_SIZE)
        self._add_frame(pfn, f)
        return f

    def alloc_frame(self) -> int:
        """Allocate a zeroed 4-KiB frame nobody uses and return its HPA."""
        while self._free:
            pfn = self._free.pop()
            if pfn not in self._frames and not self._in_backed(pfn):
                self._add_frame(pfn, bytearray(PAGE_SIZE))
                return pfn << PAGE_SHIFT
        pfn = self._next
        while pfn in self._frames or self._in_backed(pfn):
            pfn += 1
        if pfn >= self.limit >> PAGE_SHIFT:
            raise MemoryError("host-physical address space exhausted")
        self._next = pfn + 1
        self._add_frame(pfn, bytearray(PAGE_SIZE))
        return pfn << PAGE_SHIFT

    def alloc_range(self, size: int, *, align: int = PAGE_SIZE, offset: int = 0, backing=None) -> int:
        """Reserve ``size`` bytes of contiguous host-physical address space and return its HPA.

        The start is ``offset`` past an ``align``-aligned address (so a guest region
        can share its low address bits with its backing, letting huge EPT leaves map
        it).  Frames are materialised lazily, on first write — unless ``backing`` (a
        writable buffer of ``size`` bytes, e.g. an ``mmap``) is given: then the frames
        *are* that buffer, so what is written here is what a real vCPU reads there, and
        what the vCPU writes there is read here.  A backed frame, too, is entered in the
        frame tables only when first written or walked (reads read the backing), so a
        large backing costs nothing up front.
        """
        if backing is not None:
            mv = memoryview(backing).cast("B")
            if mv.readonly or len(mv) != size:
                raise ValueError(f"backing must be a writable buffer of exactly {size:#x} bytes")
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size={size:#x}: must be a positive multiple of 4 KiB")
        if align < PAGE_SIZE or align & (align - 1):
            raise ValueError(f"align={align:#x}: must be a power of two of at least 4 KiB")
        if offset % PAGE_SIZE or not 0 <= offset < align:
            raise ValueError(f"offset={offset:#x}: must be a 4-KiB multiple below align")
        start = ((self._next << PAGE_SHIFT) + align - 1) & ~(align - 1)
        start += offset
        while any(start >> PAGE_SHIFT <= pfn < (start + size) >> PAGE_SHIFT for pfn in self._frames) \
                or any(lo < (start + size) >> PAGE_SHIFT and start >> PAGE_SHIFT < hi for lo, hi, _ in self._backed):
            start += align  # something was written there directly: keep clear of it
        if start + size > self.limit:
            raise MemoryError(f"host-physical address space exhausted reserving {size:#x} bytes")
        self._next = (start + size) >> PAGE_SHIFT
        if backing is not None:
            base = start >> PAGE_SHIFT
            self._backed.append((base, base + (size >> PAGE_SHIFT), mv))  # frames made on first use
        return start

    def free_range(self, hpa: int, size: int) -> None:
        """Drop the contents of a range obtained from :meth:`alloc_range`.

        ``hpa`` and ``size`` are 4-KiB multiples, the range within ``2**maxphyaddr``;
        a bad one is refused before any frame is dropped."""
        self._check_hpa_type(hpa)
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__} (size={size!r:.60})")
        if hpa < 0:
            raise PhysicalAddressError(f"hpa={hpa:#x} is negative")
        if hpa & (PAGE_SIZE - 1):
            raise ValueError(f"hpa={hpa:#x} is not 4-KiB aligned")
        if size < 0 or size & (PAGE_SIZE - 1):
            raise ValueError(f"size={size:#x}: must be a non-negative multiple of 4 KiB")
        if hpa + size > self.limit:
            raise PhysicalAddressError(
                f"hpa={hpa:#x} (+{size:#x} bytes) is beyond 2**maxphyaddr = {self.limit:#x} "
                f"(maxphyaddr={self.maxphyaddr})"
            )
        lo, hi = hpa >> PAGE_SHIFT, (hpa + size) >> PAGE_SHIFT
        if hi - lo <= len(self._frames):
            pfns: Iterable[int] = range(lo, hi)
        else:  # a range larger than what is in memory: visit only the frames there
            pfns = [pfn for pfn in self._frames if lo <= pfn < hi]
        for pfn in pfns:
            self._drop_frame(pfn)
        if self._backed:
            self._unback(lo, hi)

    def free_frame(self, hpa: int) -> None:
        """Return a frame obtained from :meth:`alloc_frame`; its contents are dropped."""
        self._check_hpa_type(hpa)
        if hpa & (PAGE_SIZE - 1):
            raise ValueError(f"hpa={hpa:#x} is not 4-KiB aligned")
        if not 0 <= hpa < self.limit:
            raise PhysicalAddressError(
                f"hpa={hpa:#x} is not an allocated frame: outside 2**maxphyaddr = {self.limit:#x} "
                f"(maxphyaddr={self.maxphyaddr})"
            )
        pfn = hpa >> PAGE_SHIFT
        backed = self._in_backed(pfn)
        if self._drop_frame(pfn) is None and not backed:
            raise ValueError(f"hpa={hpa:#x} is not an allocated frame")
        if backed:
            self._unback(pfn, pfn + 1)
        self._free.append(pfn)

    @property
    def frames_in_use(self) -> int:
        """Frames with contents: those written or allocated, and every frame of a backed
        range (whether touched yet or not)."""
        if not self._backed:
            return len(self._frames)
        return sum(hi - lo for lo, hi, _ in self._backed) + sum(1 for pfn in self._frames
                                                                if not self._in_backed(pfn))

    # -- access -----------------------------------------------------------------
    # read_u64/write_u64 are the hot path (table walks, A/D flags, builders): the fast
    # path is a plain int (``type(x) is int``: no bool, no float, no NumPy integer) within
    # one frame; everything else -- crossing frames, out of range, or of another type --
    # goes the slow way, which checks it and names what is wrong.
    def read_u64(self, hpa: int) -> int:
        # (literals, not PAGE_SIZE - 8 / PAGE_SHIFT: no global loads on this path)
        if type(hpa) is int and (off := hpa & 0xFFF) <= 4088 and 0 <= hpa < self.limit:
            f = self._frames.get(hpa >> 12)
            if f is None and self._backed:
                f = self._backed_view(hpa >> 12)
            return 0 if f is None else _unpack_u64(f, off)[0]
        return int.from_bytes(self.read(hpa, 8), "little")

    def write_u64(self, hpa: int, value: int) -> None:
        if (
            type(value) is int
            and 0 <= value < 1 << 64
            and type(hpa) is int
            and (off := hpa & 0xFFF) <= 4088
            and 0 <= hpa < self.limit
        ):
            f = self._frames.get(hpa >> 12)
            _pack_u64(self._new_frame(hpa >> 12) if f is None else f, off, value)
            return
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
            raise ValueError(f"value={value!r:.60} is not an unsigned 64-bit integer")
        self.write(hpa, int(value).to_bytes(8, "little"))

    def read(self, hpa: int, n: int) -> bytes:
        """``n`` bytes at ``hpa`` (zeros where nothing was written); ``n`` at most
        :data:`MAX_READ`, the range within ``2**maxphyaddr``."""
        self._check(hpa, n)
        check_read_length(n)
        out = bytearray()
        while n:
            off = hpa & 0xFFF
            take = min(n, PAGE_SIZE - off)
            f = self._frames.get(hpa >> PAGE_SHIFT)
            if f is None and self._backed:
                f = self._backed_view(hpa >> PAGE_SHIFT)
            out += bytes(take) if f is None else f[off : off + take]
            hpa += take
            n -= take
        return bytes(out)

    def write(self, hpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (bytes, bytearray, or a memoryview of any format or shape: its
        raw bytes) at ``hpa``; a bad argument is refused before anything is written."""
        data = byte_view(data)
        n = len(data)
        self._check(hpa, n)
        pos = 0
        while pos < n:
            off = hpa & 0xFFF
            take = min(n - pos, PAGE_SIZE - off)
            self.frame(hpa >> PAGE_SHIFT)[off : off + take] = data[pos : pos + take]
            hpa += take
            pos += take
