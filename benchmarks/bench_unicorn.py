"""Benchmark of sppkit's Unicorn engine against bare Unicorn on the same guest.

Prints figures; asserts nothing (benchmarks are never timed asserts).

(a) Guest speed when few stores hit protected pages, on a stress loop.  A loop guest
    (built here with iced-x86) makes K = 100 stores per iteration into an unprotected
    buffer and, every M-th iteration, one store into a page holding a protected
    sub-page (to a writable sub-page of it, so every such store faults into the
    write-protect hook and is handed to ``vm.write``).  M = 1 is "1 store in 101 hits
    a protected page" (0.99 %).  Nearly every instruction is a store: the worst case
    for the hook.  Contenders: ``UnicornEngine.run()`` with that policy, and a bare
    ``unicorn.Uc`` running the very same code and memory image with the same long-mode
    set-up and **no hooks at all** (it stops at the exit ``out`` by address).  Target: the engine runs the guest at >= 0.8x bare
    speed when <= 1 % of the stores hit protected pages.
(a3) The same on the loop platform-notes §2 measured Unicorn's speed with (5
    instructions, 1 store: a store density closer to real code): K iterations into
    BUF, then one store to the protected page, 1 store in 101.
(a2) The same on compiled code: the bundled ``workload`` guest (gcc -O2: hashing, a
    hash-table insert, a histogram, a ring log; about 9 stores in 60 instructions a
    record) updates a counter next to a protected structure every N-th record.  The
    fraction of its stores that hit the protected page is counted with a write hook on
    a short run first.
(b) Cost per protected write.  A guest storing N times to a protected page: to a
    writable sub-page (allowed: after the first stores, made by the C trampoline's
    permit mirror, which copies the processor's cached permission) and to a protected
    one (denied, SKIP, decided by ``vm.write``); as shipped, with the permit mirror off
    (every store to ``vm.write``), and through the ctypes callback used where the C
    trampoline cannot be built.
    Per-write cost = (engine time - bare time for the same guest) / N.  For scale, the
    cost of ``Vm.write`` alone for the same write, called from Python.

Each figure is the best of ``--reps`` runs, interleaved across contenders; times are
the process's CPU time (all threads) for the run only, set-up excluded on both sides.

(c) With --breakdown: the stress loop at 1 in 101 with the engine's store hook (the permit
    mirror off) replaced by less and less work (a no-op, a raw commit, vm.write alone),
    then the engine with the mirror off and as shipped, to show what each layer costs
    in the running engine.

Usage: .venv/bin/python benchmarks/bench_unicorn.py [--iterations N] [--writes N] [--records N] [--reps R]
       [--breakdown]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import time

import iced_x86
from iced_x86 import Code, MemoryOperand, Register
from iced_x86 import Instruction as Ins
from rich.console import Console
from rich.table import Table
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import __version__ as unicorn_version
from unicorn.x86_const import UC_X86_REG_RAX

from sppkit.engines.unicorn import UnicornEngine, native_status, setup_cpu
from sppkit.engines.x86 import plan_long_mode
from sppkit.guests import flat_image
from sppkit.policy import Policy
from sppkit.vmm import Decision, Vm

CODE = 0x400000
BUF = 0x600000  # the unprotected buffer of (a)
# The page holding a protected sub-page.  Not 0x700000: QEMU's softmmu TLB is indexed by
# (address >> 12) % 256, and a page sharing BUF's index would make even bare Unicorn
# thrash its TLB on this loop.
PROT = 0x683000
ALLOWED = PROT + 0x800  # a writable sub-page of it
DENIED = PROT + 0x10  # the protected sub-page (sub-page 0)
RAM = 64 << 20
K = 100  # unprotected stores per iteration in (a)
TARGET_RATIO = 0.8
ENGINE_TIMEOUT = 60.0  # the engine's default

console = Console()
#: Times are CPU time of the whole process (every thread, Unicorn's included), so that
#: other load on the machine does not count; the run is single-threaded Python + TCG.
clock = time.process_time


# ------------------------------------------------------------------ guests
class _Code:
    """Instructions with labels: every instruction's ``ip`` is its label, so branches
    to a label are resolved by ``BlockEncoder``."""

    def __init__(self) -> None:
        self.ins: list[Ins] = []

    def add(self, ins: Ins) -> int:
        ins.ip = len(self.ins) + 1
        self.ins.append(ins)
        return ins.ip

    def encode(self) -> tuple[bytes, list[int]]:
        enc = iced_x86.BlockEncoder(64)
        enc.add_many(self.ins)
        code = enc.encode(CODE)
        return code, [i.ip for i in iced_x86.Decoder(64, code, ip=CODE)]


def _mov(reg, value: int) -> Ins:
    return Ins.create_reg_u64(Code.MOV_R64_IMM64, reg, value)


def _exit_and_encode(c: _Code) -> tuple[bytes, int]:
    """End ``c`` with the exit port write (exit code 0); the code and the ``out``'s address."""
    c.add(_mov(Register.RAX, 0))
    out = c.add(Ins.create_u32_reg(Code.OUT_IMM8_EAX, 0xF4, Register.EAX))
    code, ips = c.encode()
    return code, ips[out - 1]


def loop_guest(iterations: int, every: int, target: int) -> tuple[bytes, int]:
    """K stores into BUF per iteration; every ``every``-th iteration one more store to
    ``target``.  Returns the code and the address of the final ``out``."""
    c = _Code()
    c.add(_mov(Register.RCX, iterations))
    c.add(_mov(Register.RBX, BUF))
    c.add(_mov(Register.RDX, target))
    c.add(_mov(Register.R8, every))
    top = None
    for k in range(K):
        disp = 8 * k
        mem = MemoryOperand(Register.RBX, displ=disp, displ_size=1 if disp < 128 else 8)
        label = c.add(Ins.create_mem_reg(Code.MOV_RM64_R64, mem, Register.RCX))
        top = top or label
    c.add(Ins.create_reg_i32(Code.SUB_RM64_IMM8, Register.R8, 1))
    jnz_skip = len(c.ins)
    c.add(Ins.create_branch(Code.JNE_REL32_64, 0))  # patched below
    c.add(_mov(Register.R8, every))
    c.add(Ins.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RDX), Register.RCX))
    skip = c.add(Ins.create_reg_i32(Code.SUB_RM64_IMM8, Register.RCX, 1))
    patched = Ins.create_branch(Code.JNE_REL32_64, skip)
    patched.ip = jnz_skip + 1
    c.ins[jnz_skip] = patched
    c.add(Ins.create_branch(Code.JNE_REL32_64, top))
    return _exit_and_encode(c)


def reference_loop_guest(iterations: int, target: int) -> tuple[bytes, int]:
    """The loop of platform-notes §2's Unicorn speed measurement — 5 instructions, 1
    store — run K times into BUF, then one store to ``target``; ``iterations`` times."""
    c = _Code()
    c.add(_mov(Register.R10, iterations))
    c.add(_mov(Register.RDX, target))
    outer = c.add(_mov(Register.RBX, BUF))
    c.add(_mov(Register.RCX, K))
    inner = c.add(Ins.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RBX), Register.RCX))
    c.add(Ins.create_reg_reg(Code.ADD_RM64_R64, Register.RAX, Register.RCX))
    c.add(Ins.create_reg_i32(Code.ADD_RM64_IMM8, Register.RBX, 8))
    c.add(Ins.create_reg_i32(Code.SUB_RM64_IMM8, Register.RCX, 1))
    c.add(Ins.create_branch(Code.JNE_REL32_64, inner))
    c.add(Ins.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RDX), Register.R10))
    c.add(Ins.create_reg_i32(Code.SUB_RM64_IMM8, Register.R10, 1))
    c.add(Ins.create_branch(Code.JNE_REL32_64, outer))
    return _exit_and_encode(c)


def loop_guest_simple(writes: int, target: int) -> tuple[bytes, int]:
    """``writes`` stores to ``target`` in a 3-instruction loop."""
    c = _Code()
    c.add(_mov(Register.RCX, writes))
    c.add(_mov(Register.RDX, target))
    top = c.add(Ins.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RDX), Register.RCX))
    c.add(Ins.create_reg_i32(Code.SUB_RM64_IMM8, Register.RCX, 1))
    c.add(Ins.create_branch(Code.JNE_REL32_64, top))
    return _exit_and_encode(c)


# ------------------------------------------------------------------ contenders
def run_bare(code: bytes, out_ip: int) -> float:
    """Bare Unicorn, no hooks, on the flat guest ``code`` (see :func:`run_bare_ram`)."""
    layout = plan_long_mode(RAM, CODE, [(CODE, (CODE + len(code) + 0xFFF) & ~0xFFF)], cpl=3)
    ram = mmap.mmap(-1, RAM)
    ram[CODE:CODE + len(code)] = code
    ram[layout.pml4:layout.pml4 + len(layout.tables)] = layout.tables
    try:
        return run_bare_ram(ram, layout, CODE, out_ip)[0]
    finally:
        ram.close()


def run_bare_ram(ram: mmap.mmap, layout, entry: int, out_ip: int) -> tuple[float, int]:
    """Bare Unicorn, no hooks: ``ram`` (image and page tables already in it) mapped with
    mem_map_ptr, the same CPU state as UnicornEngine, stopped by address at the exit
    ``out``.  Returns (CPU seconds, RAX at the exit)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    ptr = ctypes.c_char.from_buffer(ram)
    try:
        uc.mem_map_ptr(0, len(ram), UC_PROT_ALL, ctypes.addressof(ptr))
        setup_cpu(uc, layout, 3)
        t = clock()
        uc.emu_start(entry, out_ip)
        dt = clock() - t
        return dt, uc.reg_read(UC_X86_REG_RAX)
    finally:
        del uc
        del ptr


def run_engine(code: bytes, ranges: list[tuple[int, int]], decision: str = "skip",
               native_hook: bool | None = None, permit_mirror: bool = True) -> tuple[float, dict]:
    eng = UnicornEngine(flat_image(code, CODE), policy=Policy.from_ranges(ranges, decision) if ranges else None,
                        ram_size=RAM, timeout=ENGINE_TIMEOUT, native_hook=native_hook, permit_mirror=permit_mirror)
    try:
        t = clock()
        r = eng.run()
        dt = clock() - t
    finally:
        eng.close()
    if r.stop_reason != "exit" or r.exit_code != 0:
        raise SystemExit(f"bench_unicorn: the guest did not exit cleanly: {r.stop_reason} {r.console[-300:]}")
    return dt, {"writes": r.stats["writes"], "violations": len(r.violations), "exits": dict(r.exits),
                "mirrored": eng.mirrored_writes}


# ------------------------------------------------------------------ the compiled workload (a2)
WORKLOAD_RAM = 16 << 20


def _workload():
    from sppkit.guests import build_guest, load_elf

    image = load_elf(build_guest("workload"))
    start = image.symbols["_start"]
    seg = next(sg for sg in image.segments if sg.gpa <= start.addr < sg.gpa + len(sg.data))
    out_ip = next(i.ip for i in iced_x86.Decoder(64, seg.data[start.addr - seg.gpa:], ip=start.addr)
                  if i.mnemonic == iced_x86.Mnemonic.OUT)
    return image, out_ip


def _workload_engine(image, records: int, every: int, protect: bool) -> UnicornEngine:
    g = image.symbols["guarded"]
    eng = UnicornEngine(image, policy=Policy.from_ranges([(g.addr, g.size)], "skip") if protect else None,
                        ram_size=WORKLOAD_RAM, timeout=ENGINE_TIMEOUT)
    for name, v in (("param_records", records), ("param_stats_every", every)):
        eng.vm.load(image.symbols[name].addr, v.to_bytes(8, "little"))
    return eng


def workload_fraction(image, every: int, records: int = 3000) -> tuple[int, int]:
    """(all stores, stores through the write-protect hook) of a short run."""
    eng = _workload_engine(image, records, every, True)
    n = [0]
    eng.record_writes(lambda gpa, size, rip: n.__setitem__(0, n[0] + 1))
    r = eng.run()
    eng.close()
    return n[0], r.stats["writes"]


def run_workload(image, out_ip: int, records: int, every: int) -> tuple[float, float]:
    """(bare, engine) CPU seconds; the exit codes must agree."""
    bare_eng = _workload_engine(image, records, every, False)
    ram = mmap.mmap(-1, WORKLOAD_RAM)
    ram[:] = bare_eng._ram[:]  # the engine's loaded image, page tables and patched params
    layout = bare_eng.layout
    bare_eng.close()
    try:
        b, rax = run_bare_ram(ram, layout, image.entry, out_ip)
    finally:
        ram.close()
    eng = _workload_engine(image, records, every, True)
    t = clock()
    r = eng.run()
    e = clock() - t
    eng.close()
    if r.stop_reason != "exit" or r.exit_code != rax & 0xFF:
        raise SystemExit(f"bench_unicorn: workload disagrees with bare Unicorn: {r.stop_reason} "
                         f"exit {r.exit_code} vs {rax & 0xFF}")
    return b, e


def vm_write_cost(n: int, gpa: int) -> float:
    """Vm.write alone, from Python, for an 8-byte write at ``gpa`` (µs per write)."""
    vm = Vm()
    vm.add_memslot(0, 0, RAM)
    vm.enable_spp()
    vm.set_subpage_access(PROT >> 12, [0xFFFFFFFE])  # sub-page 0 protected
    vm.on_violation(lambda ev: Decision.SKIP)
    data = b"\x11" * 8
    vm.write(gpa, data)  # warm: SPP miss / tables
    t = clock()
    for _ in range(n):
        vm.write(gpa, data)
    return (clock() - t) / n * 1e6


# ------------------------------------------------------------------ (c) where the time goes
def breakdown(args) -> None:
    """(c) The stress loop at 1 protected store in 101, with the engine's store hook
    (the Python method the C trampoline calls, the permit mirror off) replaced by less
    and less work, to show what each layer costs in the running engine.  Measurement
    only: the stand-ins decide nothing (the first skips every store, the second commits
    every store), so they are not engines.  The last two rows are the engine as shipped,
    with the permit mirror off and on."""
    def noop(self, address, data, rip):  # Unicorn's fault path + trampoline + a Python call
        return True

    def raw(self, address, data, rip):  # ... + committing the bytes, the least a hook must do
        self._ram[address:address + len(data)] = data
        return True

    def vm_write_only(self, address, data, rip):  # ... + vm.write, without the engine's bookkeeping
        self.vm.write(address, data, rip=rip)
        return True

    shipped = UnicornEngine._on_store
    code, out_ip = loop_guest(args.iterations, 1, ALLOWED)
    protected = args.iterations
    stores = args.iterations * (K + 1)
    rows = [("no-op hook (skips the store)", noop, False), ("raw commit into RAM", raw, False),
            ("vm.write only", vm_write_only, False),
            ("the engine, permit mirror off (vm.write + bookkeeping)", shipped, False),
            ("the engine as shipped (permit mirror on)", shipped, True)]
    t = Table(title=f"(c) where a protected store's time goes: stress loop, 1 store in {K + 1} protected",
              caption="stand-ins for the engine's hook, for measurement only; budget = the cost per protected "
                      f"store at which the loop runs at {TARGET_RATIO}x bare")
    for col in ("hook body", "per protected store", "engine speed"):
        t.add_column(col, justify="left" if col == "hook body" else "right")
    budget = None
    try:
        for name, body, mirror in rows:
            UnicornEngine._on_store = body  # type: ignore[method-assign]
            bare_t, eng_t = [], []
            for _ in range(args.reps):
                bare_t.append(run_bare(code, out_ip))
                eng_t.append(run_engine(code, [(DENIED, 0x10)], permit_mirror=mirror)[0])
            b, e = min(bare_t), min(eng_t)
            budget = b * (1 / TARGET_RATIO - 1) / protected
            t.add_row(name, f"{(e - b) / protected * 1e6:.2f} µs", f"{b / e:.2f}x")
    finally:
        UnicornEngine._on_store = shipped  # type: ignore[method-assign]
    console.print(t)
    assert budget is not None
    console.print(f"budget at {TARGET_RATIO}x: {budget * 1e6:.2f} µs per protected store "
                  f"({protected / stores:.2%} of {stores:,} stores)")


# ------------------------------------------------------------------ main
def _verdict(protected_fraction: float, ratio: float) -> str:
    if not protected_fraction or protected_fraction > 0.01:
        return ""
    return "[green]met[/]" if ratio >= TARGET_RATIO else "[red]NOT met[/]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=40_000, help="loop iterations of (a) (K=100 stores each)")
    ap.add_argument("--records", type=int, default=200_000, help="records of the workload guest in (a2)")
    ap.add_argument("--writes", type=int, default=20_000, help="protected writes per run of (b)")
    ap.add_argument("--reps", type=int, default=5, help="runs per figure (best is kept)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also (c): where the time of a protected store goes on the stress loop")
    args = ap.parse_args()
    t0 = time.perf_counter()
    native_ok, native_why = native_status()
    console.print(f"[bold]sppkit Unicorn engine vs bare Unicorn {unicorn_version}[/] "
                  f"(CPL 3, {RAM >> 20} MiB RAM, best of {args.reps})")
    console.print("write-protect hook: " + ("C trampoline -> vm.write" if native_ok else
                                            f"ctypes callback -> vm.write (C trampoline: {native_why})"))

    # ---- (a)
    t = Table(title=f"(a) stress loop, engine vs bare Unicorn (no hooks); {args.iterations:,} iterations "
                    f"x {K} stores to unprotected memory, + the protected ones")
    for col in ("stores to a protected page", "bare", "engine", "engine speed", f">= {TARGET_RATIO}x"):
        t.add_column(col, justify="left" if col.startswith("stores") else "right")
    verdicts = {}
    configs = [  # (label, a protected store every M-th iteration, protected ranges)
        ("none (no protected page)", 1, []),
        ("1 in 101 stores (0.99 %)", 1, [(DENIED, 0x10)]),
        ("1 in 1,001 (0.1 %)", 10, [(DENIED, 0x10)]),
        ("1 in 10,001 (0.01 %)", 100, [(DENIED, 0x10)]),
    ]
    for label, every, ranges in configs:
        code, out_ip = loop_guest(args.iterations, every, ALLOWED)
        bare_t, eng_t, info = [], [], None
        for _ in range(args.reps):  # interleaved
            bare_t.append(run_bare(code, out_ip))
            dt, info = run_engine(code, ranges)
            eng_t.append(dt)
        stores = args.iterations * K + args.iterations // every
        protected = args.iterations // every if ranges else 0
        assert info["writes"] == protected, info  # every protected store reached vm.write exactly once
        b, e = min(bare_t), min(eng_t)
        if protected and protected / stores <= 0.01:
            verdicts.setdefault("stress loop", b / e)
        t.add_row(label, f"{b * 1e3:.0f} ms", f"{e * 1e3:.0f} ms", f"{b / e:.2f}x", _verdict(protected / stores, b / e))
    console.print(t)

    # ---- (a3)
    t = Table(title=f"(a3) platform-notes reference loop (5 instructions, 1 store), {args.iterations:,} x {K} "
                    "iterations + 1 store to a protected page each")
    for col in ("stores to a protected page", "bare", "engine", "engine speed", f">= {TARGET_RATIO}x"):
        t.add_column(col, justify="left" if col.startswith("stores") else "right")
    code, out_ip = reference_loop_guest(args.iterations, ALLOWED)
    for label, ranges in (("none (no protected page)", []), (f"1 in {K + 1} stores (0.99 %)", [(DENIED, 0x10)])):
        bare_t, eng_t, info = [], [], None
        for _ in range(args.reps):
            bare_t.append(run_bare(code, out_ip))
            dt, info = run_engine(code, ranges)
            eng_t.append(dt)
        protected = args.iterations if ranges else 0
        assert info["writes"] == protected, info
        b, e = min(bare_t), min(eng_t)
        frac = protected / (args.iterations * (K + 1))
        if protected:
            verdicts.setdefault("reference loop", b / e)
        t.add_row(label, f"{b * 1e3:.0f} ms", f"{e * 1e3:.0f} ms", f"{b / e:.2f}x", _verdict(frac, b / e))
    console.print(t)

    # ---- (a2)
    image, wl_out = _workload()
    t = Table(title=f"(a2) compiled workload guest, {args.records:,} records, engine vs bare Unicorn")
    for col in ("counter update every", "stores to the protected page", "bare", "engine", "engine speed",
                f">= {TARGET_RATIO}x"):
        t.add_column(col, justify="right")
    for every in (11, 110):
        total, hooked = workload_fraction(image, every)
        runs = [run_workload(image, wl_out, args.records, every) for _ in range(args.reps)]
        b, e = (min(r[i] for r in runs) for i in range(2))
        frac = hooked / total
        if frac <= 0.01:
            verdicts.setdefault("compiled workload", b / e)
        t.add_row(f"{every} records", f"{frac:.3%}", f"{b * 1e3:.0f} ms", f"{e * 1e3:.0f} ms", f"{b / e:.2f}x",
                  _verdict(frac, b / e))
    console.print(t)

    # ---- (b)
    n = args.writes
    cost = {}
    rows = [("allowed (committed)", ALLOWED, 0, None, True), ("denied (SKIP)", DENIED, n, None, True)]
    if native_ok:  # without the permit mirror; and through the fallback used where C cannot be built
        rows += [("allowed, permit mirror off", ALLOWED, 0, None, False),
                 ("denied, permit mirror off", DENIED, n, None, False),
                 ("allowed, ctypes trampoline", ALLOWED, 0, False, False),
                 ("denied, ctypes trampoline", DENIED, n, False, False)]
    for name, target, want_viol, native_hook, mirror in rows:
        code, out_ip = loop_guest_simple(n, target)
        bare_t, eng_t, info = [], [], None
        for _ in range(args.reps):
            bare_t.append(run_bare(code, out_ip))
            dt, info = run_engine(code, [(DENIED, 0x10)], "skip", native_hook, mirror)
            eng_t.append(dt)
        assert info["writes"] == n and info["violations"] == want_viol, info
        assert (info["mirrored"] > 0) == (mirror and native_ok and native_hook is not False and not want_viol), info
        vm_us = min(vm_write_cost(n, target) for _ in range(args.reps))
        b, e = min(bare_t), min(eng_t)
        # (a store the mirror makes does not call Vm.write: no "rest" to compare)
        cost[name] = ((e - b) / n * 1e6, None if info["mirrored"] else vm_us)

    t = Table(title=f"(b) cost per protected write ({n:,} stores to one protected page)",
              caption="rest = the trampoline, the engine's hook, violation records, Unicorn's fault path")
    for col in ("write", "engine - bare", "Vm.write alone", "rest"):
        t.add_column(col, justify="left" if col == "write" else "right")
    for name, (us, vm_us) in cost.items():
        t.add_row(name, f"{us:.1f} µs", "—" if vm_us is None else f"{vm_us:.1f} µs",
                  "—" if vm_us is None else f"{us - vm_us:.1f} µs")
    console.print(t)

    if args.breakdown:
        breakdown(args)

    # ---- verdict
    for what, ratio in verdicts.items():
        met = ratio >= TARGET_RATIO
        console.print(f"Target: engine >= {TARGET_RATIO}x bare Unicorn at <= 1 % of stores on protected pages "
                      f"({what}): " + (f"[green]met[/] ({ratio:.2f}x)" if met else f"[red]NOT met[/] ({ratio:.2f}x)"))
    console.print(f"[dim]total {time.perf_counter() - t0:.1f} s[/]")


if __name__ == "__main__":
    main()
