"""Property tests: Processor.translate against an independent oracle written from the spec.

Random raw EPT entries at all four levels (large leaves, reserved bits, memory types,
W-without-R, bit 61, not-present entries with junk), random raw SPPT entries (present
bits, reserved bits, odd vector bits), random accesses and controls.  The oracle below
is a second formulation of the rules of docs/spp-rules.md (§2–§8 and
the SDM EPT rules it relies on).  It uses no sppkit decoder or constant: only a plain
dict of the raw entries it was given.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sppkit.arch import Access, HostMemory, Processor, VmExit

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# =====================================================================================
# The oracle
# =====================================================================================
ACCESS_NAME = {Access.READ: "r", Access.WRITE: "w", Access.EXECUTE: "x"}
LEVEL_SHIFTS = ((4, 39), (3, 30), (2, 21), (1, 12))


def bits(lo: int, hi: int) -> int:
    """Mask of bits lo..hi inclusive."""
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


class Oracle:
    """Decides one access from a dict ``{hpa: raw u64}`` of table entries (missing = 0)."""

    def __init__(self, entries: dict, n: int, *, eptp: int, ad: bool, spp_on: bool, spptp: int,
                 first_byte: bool, execute_only: bool) -> None:
        self.mem = dict(entries)
        self.n = n
        self.eptp, self.ad, self.spp_on, self.spptp = eptp, ad, spp_on, spptp
        self.first_byte, self.execute_only = first_byte, execute_only

    def addr(self, raw: int) -> int:  # bits N-1:12
        return raw & bits(12, self.n - 1)

    def high_rsv(self) -> int:  # bits 51:N
        return bits(self.n, 51) if self.n < 52 else 0

    # -- one access -------------------------------------------------------------------
    def access(self, gpa, size, kind, gla, paging, linear, nmi):
        """('ok', ((hpa, n), ...)) or ('exit', reason, qualification, gpa, gla)."""
        in_first = 4096 - gpa % 4096
        pieces = [(gpa, min(size, in_first), gla)]
        if size > in_first:
            pieces.append((gpa + in_first, size - in_first, None if gla is None else gla + in_first))
        done = []
        for g, n, l in pieces:
            r = self.page(g, n, kind, l, paging, linear, nmi)
            if r[0] == "exit":
                return r
            done.append(r[1])
        return ("ok", tuple(done))

    def qualification(self, kind, paging, linear, nmi, acc):
        q = {"r": 1, "w": 2, "x": 4}[kind]
        if paging and self.ad:
            q |= 1 | 2  # a paging-structure access with EPT A/D is a write: bits 0 and 1
        if paging:
            q |= 1 << 7  # GLA valid, bit 8 clear: a paging-structure access
        elif linear:
            q |= (1 << 7) | (1 << 8)
        if nmi:
            q |= 1 << 12
        return q | (acc << 3)

    def page(self, g, n, kind, gla, paging, linear, nmi):
        as_write = kind == "w" or (paging and self.ad)
        needed = 2 if as_write else (1 if kind == "r" else 4)
        gla_field = gla if (linear or paging) else None

        def violation(acc):
            return ("exit", 48, self.qualification(kind, paging, linear, nmi, acc), g, gla_field)

        misconfig = ("exit", 49, 0, g, None)

        table = self.addr(self.eptp)
        acc = 7
        used = []
        for level, shift in LEVEL_SHIFTS:
            where = table + 8 * ((g >> shift) & 511)
            e = self.mem.get(where, 0)
            acc &= e & 7
            if e & 7 == 0:
                return violation(acc)
            leaf = level == 1 or (level in (2, 3) and e & (1 << 7))
            if e & 3 == 2:
                return misconfig
            if not self.execute_only and e & 7 == 4:
                return misconfig
            if e & self.high_rsv():
                return misconfig
            if level == 4 and e & bits(3, 7):
                return misconfig
            if level in (2, 3) and not leaf and e & bits(3, 6):
                return misconfig
            if level == 3 and leaf and e & bits(12, 29):
                return misconfig
            if level == 2 and leaf and e & bits(12, 20):
                return misconfig
            if leaf and (e >> 3) & 7 in (2, 3, 7):
                return misconfig
            used.append(where)
            if leaf:
                break
            table = self.addr(e)
        span = 1 << shift
        hpa = (self.addr(e) & ~(span - 1)) | (g & (span - 1))

        if not acc & needed:
            eligible = (
                self.spp_on and kind == "w" and not paging and linear
                and level == 1 and e >> 61 & 1 and acc & 1
            )
            if not eligible:
                return violation(acc)
            verdict = self.sppt(g, n, gla, nmi)
            if verdict is not True:
                return verdict or violation(acc)

        if self.ad:
            for where in used:
                self.mem[where] = self.mem.get(where, 0) | (1 << 8)
            if as_write:
                self.mem[used[-1]] |= 1 << 9
        return ("ok", (hpa, n))

    def sppt(self, g, n, gla, nmi):
        """True (allowed), False (vector bit 0) or an exit-66 tuple."""
        rsv = bits(1, 11) | self.high_rsv() | bits(52, 63)
        table = self.addr(self.spptp)
        for shift in (39, 30, 21):
            e = self.mem.get(table + 8 * ((g >> shift) & 511), 0)
            if not e & 1:
                return ("exit", 66, (1 << 11) | (nmi << 12), g, gla)
            if e & rsv:
                return ("exit", 66, nmi << 12, g, gla)
            table = self.addr(e)
        vec = self.mem.get(table + 8 * ((g >> 12) & 511), 0)
        if any(vec >> (2 * i + 1) & 1 for i in range(32)):
            return ("exit", 66, nmi << 12, g, gla)
        off = g % 4096
        first, last = off // 128, (off + n - 1) // 128
        touched = [first] if self.first_byte else range(first, last + 1)
        return all(vec >> (2 * i) & 1 for i in touched)


# =====================================================================================
# Strategies
# =====================================================================================
MAXPHY = st.sampled_from([36, 39, 46, 52])


@st.composite
def ept_entry(draw, level: int, next_table: int, n: int, noise: int, empty: int, spp_focus: bool):
    """A raw EPT entry for ``level`` (4 = PML4E ... 1 = PTE).

    ``spp_focus`` steers towards SPP-eligible writes: 4-KiB leaves that are readable but
    not writable, with bit 61, under mostly-RWX upper levels (still with some W = 0 above)."""
    if spp_focus:
        clean_perms = [1, 1, 5, 5, 7, 3] if level == 1 else [7, 7, 7, 7, 5, 3]
    else:
        clean_perms = [7, 7, 7, 3, 5, 1, 1]
    perms = draw(st.sampled_from(clean_perms if noise == 0 else clean_perms + [0, 2, 4, 6]))
    large = level in (2, 3) and draw(st.sampled_from([False] * (7 if spp_focus else 2) + [True]))
    leaf = level == 1 or large
    high = draw(st.integers(0, 0xFFF)) << 52 if noise else 0
    if draw(st.sampled_from([True] * (6 if spp_focus else 1) + [False])):
        high |= 1 << 61
    else:
        high &= ~(1 << 61)
    if noise >= 2 and n < 52 and draw(st.integers(0, 5)) == 0:
        high |= 1 << draw(st.one_of(st.sampled_from([n, 51]), st.integers(n, 51)))
    flags = draw(st.integers(0, 15)) << 8  # A, D / ignored, user-X, ignored
    if leaf:
        memtypes = [6, 6, 0, 1, 4, 5] + ([2, 3, 7, 2, 3, 7] if noise else [])
        low = draw(st.sampled_from(memtypes)) << 3 | draw(st.sampled_from([0, 1 << 6]))
        if large:
            low |= 1 << 7
        elif draw(st.booleans()):
            low |= 1 << 7  # ignored in a PTE
        span = 1 << (12 + 9 * (level - 1))
        frame = draw(st.integers(0, (1 << n) - 1)) & ~(span - 1) & ~0xFFF
        if noise and large and draw(st.integers(0, 2)) == 0:
            top = 29 if level == 3 else 20
            frame |= 1 << draw(st.one_of(st.sampled_from([12, top]), st.sampled_from([12, top]), st.integers(12, top)))
        return frame | low | flags | perms | high
    low = 0
    if noise >= 2 and draw(st.integers(0, 4)) == 0:
        low = 1 << draw(st.integers(3, 7 if level == 4 else 6))
    if level == 4 and noise >= 2 and draw(st.integers(0, 6)) == 0:
        low |= 1 << 7  # bit 7 of a PML4E is reserved
    table = empty if (noise and draw(st.integers(0, 9)) == 0) else next_table
    return table | low | flags | perms | high


@st.composite
def sppt_entry(draw, next_table: int, n: int, noise: int, empty: int):
    present = draw(st.sampled_from([1] * 7 + [0])) if noise else 1
    rsv = 0
    if noise >= 1 and draw(st.integers(0, 3)) == 0:
        edges = st.sampled_from(sorted({1, 11, n, 51, 52, 61, 63}))
        pool = st.sampled_from(list(range(1, 12)) + list(range(n, 64)))
        rsv = 1 << draw(st.one_of(edges, edges, pool))
    table = empty if (noise and draw(st.integers(0, 12)) == 0) else next_table
    return table | present | rsv


@st.composite
def spp_vector(draw, noise: int):
    """An L1E: 32 write bits at the even positions (odd bits only as noise)."""
    kind = draw(st.sampled_from(["all", "none", "random", "random", "one", "alternate", "range"]))
    if kind == "all":
        writable = set(range(32))
    elif kind == "none":
        writable = set()
    elif kind == "one":
        writable = {draw(st.integers(0, 31))}
    elif kind == "alternate":  # every other sub-page: any write crossing 128 bytes meets a denied one
        writable = set(range(draw(st.integers(0, 1)), 32, 2))
    elif kind == "range":  # writable run a..b: edges inside the page
        a = draw(st.integers(0, 31))
        writable = set(range(a, draw(st.integers(a, 31)) + 1))
    else:
        flags = draw(st.lists(st.booleans(), min_size=32, max_size=32))
        writable = {i for i, f in enumerate(flags) if f}
    vec = sum(1 << (2 * i) for i in writable)
    if noise and draw(st.integers(0, 4)) == 0:
        vec |= 1 << (2 * draw(st.one_of(st.sampled_from([0, 31]), st.integers(0, 31))) + 1)
    return vec


@st.composite
def scenario(draw, flavour: str = "mixed"):
    """Random tables for up to two consecutive pages, plus controls.

    Flavours: ``"ept"`` — noisy EPT entries (reserved bits, bad memory types, W without
    R, junk in not-present entries); ``"spp"`` — a well-formed EPT that mostly leads to
    an SPP-eligible write, with a noisy SPPT; ``"mixed"`` — either."""
    n = draw(MAXPHY)
    if flavour == "mixed":
        flavour = draw(st.sampled_from(["ept", "spp"]))
    spp_focus = flavour == "spp"
    noise = 0 if spp_focus else draw(st.sampled_from([0, 1, 2, 2]))
    sppt_noise = draw(st.sampled_from([0, 0, 1, 2]))
    mem = HostMemory(n)
    ept = {lvl: mem.alloc_frame() for lvl in (4, 3, 2, 1)}  # one table per level
    sppt = {lvl: mem.alloc_frame() for lvl in (4, 3, 2, 1)}
    empty = mem.alloc_frame()  # a table that stays all-zero
    page0 = draw(st.integers(0, (1 << 36) - 2)) << 12
    if draw(st.booleans()):  # make index carries (2-MiB / 1-GiB / 512-GiB boundaries) likely
        page0 |= bits(12, draw(st.sampled_from([20, 29, 38])))
        page0 = min(page0, (1 << 48) - 0x2000)
    entries: dict[int, int] = {}
    for page in (page0, page0 + 0x1000):
        for lvl, shift in LEVEL_SHIFTS:
            where = ept[lvl] + 8 * ((page >> shift) & 511)
            if where not in entries:
                nxt = ept.get(lvl - 1, 0)
                entries[where] = draw(ept_entry(lvl, nxt, n, noise, empty, spp_focus))
            where = sppt[lvl] + 8 * ((page >> shift) & 511)
            if where not in entries:
                entries[where] = (
                    draw(spp_vector(sppt_noise)) if lvl == 1
                    else draw(sppt_entry(sppt[lvl - 1], n, sppt_noise, empty))
                )
    for where, raw in entries.items():
        mem.write_u64(where, raw)
    controls = dict(
        ad=draw(st.booleans()),
        spp_on=draw(st.sampled_from([True] * (9 if spp_focus else 3) + [False])),
        first_byte=draw(st.booleans()),
        execute_only=draw(st.sampled_from([True, True, True, False])),
    )
    controls["spp_focus"] = spp_focus
    return mem, entries, n, ept[4], sppt[4], page0, controls


@st.composite
def an_access(draw, page0: int, spp_focus: bool = False):
    size = draw(st.integers(1, 16))
    # just below a 128-byte (or the 4-KiB) boundary: the access may cross it
    near_boundary = st.builds(lambda k, d: 128 * k - d, st.integers(1, 63), st.integers(1, 15))
    offset = draw(st.one_of(
        st.integers(0, 0x1FFF),
        st.sampled_from([0, 0x7F, 0x80, 0xF7F, 0xF80, 0xFF8, 0xFFF, 0x1000, 0x107F]),
        near_boundary,
        near_boundary,
    ))
    offset = min(offset, 0x2000 - size)
    kind = draw(st.sampled_from([Access.WRITE] * (6 if spp_focus else 2) + [Access.READ, Access.EXECUTE]))
    how = draw(st.sampled_from(["data"] * (9 if spp_focus else 3) + ["paging", "nonlinear"]))
    if how == "paging" and kind == Access.EXECUTE:
        how = "data"
    paging, linear = how == "paging", how != "nonlinear"
    gla = draw(st.one_of(st.none(), st.integers(0, (1 << 48) - 1))) if linear else None
    nmi = draw(st.booleans())
    return page0 + offset, size, kind, gla, paging, linear, nmi


def make_cpu(mem, n, pml4, spptp, controls, cache=False):
    eptp = pml4 | 6 | (3 << 3) | ((1 << 6) if controls["ad"] else 0)
    sec = (1 << 1) | ((1 << 23) if controls["spp_on"] else 0)
    return Processor(
        mem, eptp, secondary_controls=sec, spptp=spptp, cache=cache,
        spp_write_check="first-byte" if controls["first_byte"] else "all-touched",
        execute_only=controls["execute_only"],
    ), eptp


def model_outcome(cpu, gpa, size, kind, gla, paging, linear, nmi):
    try:
        pieces = cpu.translate(gpa, size, kind, gla=gla, paging_structure=paging, linear=linear, nmi_unblocking=nmi)
    except VmExit as e:
        return ("exit", e.reason, e.qualification, e.gpa, e.gla)
    return ("ok", tuple((p.hpa, p.size) for p in pieces))


# =====================================================================================
# Properties
# =====================================================================================
def check_against_oracle(data, flavour):
    mem, entries, n, pml4, spptp, page0, controls = data.draw(scenario(flavour))
    cpu, eptp = make_cpu(mem, n, pml4, spptp, controls)
    oracle = Oracle(entries, n, eptp=eptp, spptp=spptp, ad=controls["ad"], spp_on=controls["spp_on"],
                    first_byte=controls["first_byte"], execute_only=controls["execute_only"])
    for _ in range(data.draw(st.integers(1, 8))):
        gpa, size, kind, gla, paging, linear, nmi = data.draw(an_access(page0, controls["spp_focus"]))
        want = oracle.access(gpa, size, ACCESS_NAME[kind], gla, paging, linear, nmi)
        got = model_outcome(cpu, gpa, size, kind, gla, paging, linear, nmi)
        assert got == want
        # the accessed/dirty flags the oracle set are exactly what is in memory now
        for where, raw in oracle.mem.items():
            assert mem.read_u64(where) == raw, hex(where)


@SETTINGS
@given(st.data())
def test_ept_walk_agrees_with_oracle(data):
    """Noisy EPT entries at every level: walk, misconfigurations, permissions, A/D."""
    check_against_oracle(data, "ept")


@SETTINGS
@given(st.data())
def test_spp_decision_agrees_with_oracle(data):
    """Well-formed EPT leading to SPP-eligible writes; noisy SPPT and vectors."""
    check_against_oracle(data, "spp")


@SETTINGS
@given(st.data())
def test_cache_changes_nothing_without_table_changes(data):
    """With the tables left alone, cache=True gives the outcomes (and A/D flags) of cache=False."""
    mem_a, entries, n, pml4, spptp, page0, controls = data.draw(scenario("mixed"))
    mem_b = HostMemory(n)
    for where, raw in entries.items():
        mem_b.write_u64(where, raw)
    cached, eptp = make_cpu(mem_a, n, pml4, spptp, controls, cache=True)
    plain, _ = make_cpu(mem_b, n, pml4, spptp, controls, cache=False)
    for _ in range(data.draw(st.integers(2, 12))):
        if data.draw(st.integers(0, 9)) == 0:
            cached.invept(data.draw(st.sampled_from(["single-context", "all-context"])), eptp)
        access = data.draw(an_access(page0, controls["spp_focus"]))
        assert model_outcome(cached, *access) == model_outcome(plain, *access)
        for where in entries:
            assert mem_a.read_u64(where) == mem_b.read_u64(where)
