"""Edge guests the differential tests do not generate: self-modifying code on a page
the Unicorn engine maps read-only, a store running past the end of guest RAM, the
engine's own page tables on a protected page, and KVM's record of a 16-byte vector
store delivered in 8-byte pieces in a guest without symbols.

Each is compared between the engines (the KVM half skipped where KVM is not usable)
and, where one exists, against what the guest must see on a real x86 CPU."""

from __future__ import annotations

import iced_x86
import pytest
from iced_x86 import Code, MemoryOperand, Register
from iced_x86 import Instruction as Ins

from sppkit.engines import EngineError
from sppkit.engines.unicorn import UnicornEngine
from sppkit.engines.x86 import find_writer
from sppkit.guests import GuestImage, Segment
from sppkit.policy import Policy
from engine_helpers import PAGE, RAM, SUB
from test_differential import CODE, DATA, INIT_DATA, _abs, exit_ins, flat, mov_imm, putc, run, skip_without_kvm

ENGINES = ["unicorn", "unicorn-py", "kvm"]


def _run(engine, image, policy, regions, **kw):
    """``test_differential.run`` with the engine's CPL (and the pure-Python Unicorn
    trampoline for "unicorn-py")."""
    if engine == "kvm":
        skip_without_kvm()
        from sppkit.engines.kvm.engine import KvmEngine as cls
    else:
        cls = UnicornEngine
        if engine == "unicorn-py":
            kw["native_hook"] = False
    eng = cls(image, policy=policy, ram_size=RAM, timeout=30, **kw)
    try:
        r = eng.run()
        return r, {g: eng.vm.read(g, n) for g, n in regions}, eng.layout
    finally:
        eng.close()


# ------------------------------------------------------------- self-modifying code
def _patch_next(prot_offset: int | None, decision: str):
    """`mov byte [rbx], 'Z'` patches the immediate of the `mov rax, 'A'` right after
    it (same translated block), then the guest prints al.  The code page holds a
    protected sub-page at ``prot_offset`` (or its neighbour page does: the Unicorn
    engine maps it read-only all the same, as a guard band)."""
    body = [mov_imm(Register.RAX, ord("A")), Ins.create_u32_reg(Code.OUT_IMM8_AL, 0xE9, Register.AL), *exit_ins(9)]
    patch = [mov_imm(Register.RBX, 0), Ins.create_mem_u32(Code.MOV_RM8_IMM8, MemoryOperand(Register.RBX), ord("Z"))]
    _, ips = flat(patch + body)
    target = ips[len(patch)] + 2  # the imm64 of `48 b8 imm64`
    patch[0] = mov_imm(Register.RBX, target)
    image, _ = flat(patch + body)
    return image, target, Policy.from_ranges([(CODE + prot_offset, SUB)], decision)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("prot_offset", "decision"), [
    (0x80, "skip"),  # the patch lands in a writable sub-page of the protected code page
    (0x0, "emulate"),  # the patch lands in the protected sub-page: EMULATE commits it
    (PAGE, "skip"),  # the neighbouring page is protected: the code page is in the guard band
])
def test_self_modifying_code_in_the_same_block_runs_patched(engine, prot_offset, decision):
    """x86 runs the patched instruction.  Unicorn used to run its stale translation
    (console 'A') although memory held the patch: the bytes were committed by
    vm.write behind QEMU's self-modifying-code check."""
    image, target, policy = _patch_next(prot_offset, decision)
    r, mem, _ = _run(engine, image, policy, [(target, 1)], cpl=0)
    assert (r.stop_reason, r.exit_code, r.console) == ("exit", 9, "Z")
    assert mem[target] == b"Z"
    want = [(target, 1, decision)] if prot_offset == 0 else []
    assert [(v.gpa, v.size, v.decision) for v in r.violations] == want


def _call_patch_call(fpos: int = 0x800) -> tuple[GuestImage, int]:
    """call f (prints 'A'); patch f's immediate to 'Z'; call f again; exit."""
    f = [Ins.create_reg_u32(Code.MOV_R8_IMM8, Register.AL, ord("A")),
         Ins.create_u32_reg(Code.OUT_IMM8_AL, 0xE9, Register.AL), Ins.create(Code.RETNQ)]
    main = [mov_imm(Register.RSP, DATA + 0x5000), Ins.create_branch(Code.CALL_REL32_64, CODE + fpos),
            mov_imm(Register.RBX, CODE + fpos + 1),
            Ins.create_mem_u32(Code.MOV_RM8_IMM8, MemoryOperand(Register.RBX), ord("Z")),
            Ins.create_branch(Code.CALL_REL32_64, CODE + fpos), *exit_ins(9)]
    enc = iced_x86.BlockEncoder(64)
    enc.add_many(main)
    code = enc.encode(CODE)
    enc = iced_x86.BlockEncoder(64)
    enc.add_many(f)
    code = code.ljust(fpos, b"\xcc") + enc.encode(CODE + fpos)
    return GuestImage(segments=[Segment(CODE, code, len(code), "r-x"),
                                Segment(DATA, INIT_DATA, len(INIT_DATA), "rw-")], entry=CODE), CODE + fpos + 1


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("prot", [(CODE + 0x800, "emulate"), (CODE + PAGE, "skip")])
def test_self_modifying_code_in_another_block_runs_patched(engine, prot):
    """A function already run (and translated) is patched, then called again."""
    image, target = _call_patch_call()
    r, mem, _ = _run(engine, image, Policy.from_ranges([(prot[0], SUB)], prot[1]), [(target, 1)], cpl=0)
    assert (r.stop_reason, r.exit_code, r.console) == ("exit", 9, "AZ")
    assert mem[target] == b"Z"


@pytest.mark.parametrize("engine", ["unicorn", "kvm"])
def test_self_modifying_loop_still_times_out(engine):
    """A guest storing into its own code page forever (each store held back and run
    alone under Unicorn) still ends at the timeout, with every store decided."""
    loop = [mov_imm(Register.RAX, 0x1122334455667788),
            Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(CODE + 0xF80), Register.RAX),
            Ins.create_branch(Code.JMP_REL32_64, CODE)]
    image, _ = flat(loop)
    if engine == "kvm":
        skip_without_kvm()
        from sppkit.engines.kvm.engine import KvmEngine as cls
    else:
        cls = UnicornEngine
    eng = cls(image, policy=Policy.from_ranges([(CODE + 0xF80, SUB)], "emulate"), ram_size=RAM, timeout=1, cpl=0)
    try:
        r = eng.run()
        assert r.stop_reason == "timeout"
        assert r.violations and {(v.gpa, v.size, v.decision) for v in r.violations} == {(CODE + 0xF80, 8, "emulate")}
        assert eng.vm.read(CODE + 0xF80, 8) == (0x1122334455667788).to_bytes(8, "little")
    finally:
        eng.close()


# ------------------------------------------------------------- the end of guest RAM
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("protected", [RAM - SUB, RAM - PAGE, None])
def test_store_past_the_end_of_ram_is_a_guest_fault(engine, protected):
    """An 8-byte store at RAM-4: its second half is on no page the guest's tables map,
    so the CPU faults (a triple fault: no IDT) before anything is written.  Unicorn
    used to raise EngineError ("outside guest RAM") from run() when the last page
    was write-protected; KVM and unprotected Unicorn report a shutdown."""
    ins = [mov_imm(Register.RAX, 0x1122334455667788),
           Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(RAM - 4), Register.RAX), *putc("x"), *exit_ins(7)]
    image, ips = flat(ins)
    policy = Policy.from_ranges([(protected, SUB)]) if protected is not None else None
    r, mem, _ = _run(engine, image, policy, [(RAM - 8, 8)])
    assert r.stop_reason == "shutdown" and r.rip_at == ips[1]
    assert (r.console, r.exit_code, r.violations) == ("", None, [])
    assert mem[RAM - 8] == bytes(8)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cpl", [0, 3])
def test_hlt_agrees(engine, cpl):
    """`hlt` is privileged: at CPL 3 it raises #GP, with no IDT a triple fault — KVM
    reports a shutdown at the hlt.  Unicorn halts there instead (it does not model the
    #GP) and used to report "halt ... the instruction limit was reached"; at CPL 0 both
    halt with RIP after the instruction."""
    image, ips = flat([*putc("h"), Ins.create(Code.HLT), *exit_ins(7)])
    r, _, _ = _run(engine, image, None, [], cpl=cpl)
    hlt = ips[len(putc("h"))]
    if cpl == 3:
        assert (r.stop_reason, r.rip_at, r.rip_after) == ("shutdown", hlt, None), r
        assert f"guest fault at rip={hlt:#x} (triple fault: no IDT)" in r.detail and "hlt" in r.detail
    else:
        assert (r.stop_reason, r.rip_at, r.rip_after, r.detail) == ("halt", None, hlt + 1, ""), r
    assert (r.console, r.exit_code) == ("h", None)


def test_instruction_limit_is_named():
    """A Unicorn run that ends at ``max_instructions`` says so (it is not a `hlt`)."""
    image, _ = flat([*putc("a"), *putc("b"), *exit_ins(7)])
    eng = UnicornEngine(image, ram_size=RAM, timeout=30, max_instructions=2)
    try:
        r = eng.run()
    finally:
        eng.close()
    assert r.stop_reason == "halt" and r.detail == "the instruction limit (2) was reached", r
    # an instruction ending in byte f4 (`add al,0F4h`: 04 f4) is not a `hlt`
    image, _ = flat([Ins.create_reg_u32(Code.ADD_AL_IMM8, Register.AL, 0xF4), Ins.create(Code.NOPD),
                     *exit_ins(7)])
    for cpl in (0, 3):
        eng = UnicornEngine(image, ram_size=RAM, timeout=30, max_instructions=1, cpl=cpl)
        try:
            r = eng.run()
        finally:
            eng.close()
        assert (r.stop_reason, r.detail) == ("halt", "the instruction limit (1) was reached"), r


@pytest.mark.parametrize("decision", ["skip", "emulate", "stop"])
def test_stores_at_the_end_of_ram_agree(decision):
    """1-, 8- and 16-byte stores ending exactly at the end of RAM, in a protected
    sub-page: the engines agree (a 16-byte store is one record under Unicorn, two
    8-byte pieces under KVM, both naming the movdqu)."""
    ins = [mov_imm(Register.RAX, 0x1122334455667788),
           Ins.create_mem_reg(Code.MOV_RM8_R8, _abs(RAM - 1), Register.AL),
           Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(RAM - 8), Register.RAX),
           Ins.create_reg_mem(Code.MOVDQU_XMM_XMMM128, Register.XMM0, _abs(DATA)),
           Ins.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _abs(RAM - 16), Register.XMM0), *putc("x"), *exit_ins(7)]
    image, ips = flat(ins)
    policy = Policy.from_ranges([(RAM - SUB, SUB)], decision)
    u = run("unicorn", image, policy, [(RAM - PAGE, PAGE)])
    k = run("kvm", image, policy, [(RAM - PAGE, PAGE)])
    assert (k.stop_reason, k.exit_code, k.console) == (u.stop_reason, u.exit_code, u.console)
    assert k.memory == u.memory
    if decision == "stop":
        assert [(v.gpa, v.size, v.rip_at) for v in u.violations] == [(RAM - 1, 1, ips[1])]
        assert [(v.gpa, v.size, v.rip_at) for v in k.violations] == [(RAM - 1, 1, ips[1])]
        return
    assert [(v.gpa, v.size, v.rip_at) for v in u.violations] == [
        (RAM - 1, 1, ips[1]), (RAM - 8, 8, ips[2]), (RAM - 16, 16, ips[4])]
    assert [(v.gpa, v.size, v.rip_at) for v in k.violations] == [
        (RAM - 1, 1, ips[1]), (RAM - 8, 8, ips[2]), (RAM - 16, 8, ips[4]), (RAM - 8, 8, ips[4])]


# ------------------------------------------- KVM: the writer of a vector store's pieces
def test_find_writer_prefers_the_vector_store_over_its_mmx_suffix():
    """`f3 0f 7f 04 25 disp32` (movdqu [m], xmm0) also decodes, one byte later, as
    `0f 7f 04 25 disp32` (movq [m], mm0): 8 bytes, ending at the same RIP.  KVM's
    first 8-byte piece of the movdqu used to be attributed to that movq, an
    instruction starting inside the movdqu."""
    addr = DATA + 0x100
    ins = [Ins.create_reg_mem(Code.MOVDQU_XMM_XMMM128, Register.XMM0, _abs(DATA)),
           Ins.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _abs(addr), Register.XMM0), *exit_ins(0)]
    image, ips = flat(ins)
    code = image.segments[0].data

    def read(gpa, n):
        return code[gpa - CODE:gpa - CODE + n].ljust(n, b"\0")

    for gpa in (addr, addr + 8):
        d = find_writer(read, ips[2], gpa, 8, {})
        assert d is not None and d.rip == ips[1] and d.text.startswith("movdqu"), d


def test_find_writer_prefers_the_page_crossing_store_over_its_rex_less_suffix():
    """`48 89 04 25 disp32` (mov [m], rax) at 4 bytes before a page end: KVM's first
    piece is 4 bytes, and `89 04 25 disp32` (mov [m], eax), one byte later, ends at
    the same RIP with exactly that size.  The piece used to be attributed to it."""
    addr = DATA + PAGE - 4
    ins = [mov_imm(Register.RAX, 0x1122334455667788),
           Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(addr), Register.RAX), *exit_ins(0)]
    image, ips = flat(ins)
    code = image.segments[0].data

    def read(gpa, n):
        return code[gpa - CODE:gpa - CODE + n].ljust(n, b"\0")

    d = find_writer(read, ips[2], addr, 4, {})
    assert d is not None and d.rip == ips[1] and "rax" in d.text, d
    # A genuine 4-byte store is still found as itself.
    ins = [mov_imm(Register.RAX, 0x1122334455667788),
           Ins.create_mem_reg(Code.MOV_RM32_R32, _abs(addr), Register.EAX), *exit_ins(0)]
    image, ips = flat(ins)
    code = image.segments[0].data
    d = find_writer(read, ips[2], addr, 4, {})
    assert d is not None and d.rip == ips[1] and "eax" in d.text, d


@pytest.mark.parametrize("decision", ["skip", "emulate"])
def test_kvm_page_crossing_pieces_name_the_store(decision):
    """Both pieces of a page-crossing 8-byte store into two protected sub-pages, in
    a guest without symbols, are recorded at the store's RIP, as under Unicorn."""
    addr = DATA + PAGE - 4
    ins = [mov_imm(Register.RAX, 0x1122334455667788),
           Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(addr), Register.RAX), *putc("x"), *exit_ins(0)]
    image, ips = flat(ins)
    policy = Policy.from_ranges([(DATA + PAGE - SUB, 2 * SUB)], decision)
    u = run("unicorn", image, policy, [(addr, 8)])
    k = run("kvm", image, policy, [(addr, 8)])
    assert {v.rip_at for v in u.violations} == {ips[1]}
    assert [(v.gpa, v.size, v.rip_at) for v in k.violations] == [(addr, 4, ips[1]), (addr + 4, 4, ips[1])]
    assert k.memory == u.memory


def test_kvm_vector_store_pieces_name_the_movdqu():
    """Both 8-byte pieces of a 16-byte store to a protected sub-page, in a guest
    without symbols, are recorded at the movdqu's RIP, as Unicorn records it."""
    ins = [Ins.create_reg_mem(Code.MOVDQU_XMM_XMMM128, Register.XMM0, _abs(DATA + PAGE)),
           Ins.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _abs(DATA + 0x40), Register.XMM0), *exit_ins(0)]
    image, ips = flat(ins)
    policy = Policy.from_ranges([(DATA, SUB)])
    u = run("unicorn", image, policy, [])
    k = run("kvm", image, policy, [])
    assert [(v.gpa, v.size, v.rip_at) for v in u.violations] == [(DATA + 0x40, 16, ips[1])]
    assert [(v.gpa, v.size, v.rip_at) for v in k.violations] == [(DATA + 0x40, 8, ips[1]), (DATA + 0x48, 8, ips[1])]
    assert all(v.instruction.startswith("movdqu") for v in k.violations)


# ------------------------------------------------------------- the engine's page tables
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("table", [0, 1, 2])  # PML4, PDPT, first PD
def test_page_tables_on_a_protected_page_are_not_written(engine, table):
    """The engine's identity tables on a page holding a protected sub-page: the
    guest's page walks must not write them.  Unicorn's page walker used to set
    accessed flags in them behind vm.write (into the protected sub-page itself),
    while KVM dropped those updates: the engines' memory differed."""
    ins = [mov_imm(Register.RAX, 0x1122334455667788),
           Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(DATA + 8), Register.RAX), *putc("a"), *exit_ins(3)]
    image, _ = flat(ins)
    probe = UnicornEngine(image, ram_size=RAM)
    layout = probe.layout
    probe.close()
    pt = layout.pml4 + table * PAGE
    r, mem, lay = _run(engine, image, Policy.from_ranges([(pt, SUB)]), [(layout.pml4, len(layout.tables))])
    assert lay == layout
    assert (r.stop_reason, r.exit_code, r.console, r.violations) == ("exit", 3, "a", [])
    assert mem[layout.pml4] == layout.tables


# ------------------------------------------------------------- run arguments
@pytest.mark.parametrize("engine", ["unicorn", "kvm"])
@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf"), 2.0 ** 64, 365 * 24 * 3600 + 1, True, "5"],
                         ids=["negative", "nan", "inf", "2**64", "a-year-and-a-second", "bool", "str"])
def test_timeout_out_of_range_is_refused_by_the_engines(engine, timeout):
    """A timeout the engines' timers cannot hold is refused when the engine is made,
    naming it: 2**64 s used to overflow setitimer's time_t under KVM and kill
    Unicorn's timer thread (the run then ended normally, with no limit)."""
    if engine == "kvm":
        skip_without_kvm()
        from sppkit.engines.kvm.engine import KvmEngine as cls
    else:
        cls = UnicornEngine
    image, _ = flat([*exit_ins(0)])
    with pytest.raises(ValueError, match=r"timeout .*from 0 to 31536000"):
        cls(image, ram_size=RAM, timeout=timeout)


@pytest.mark.parametrize("timeout", [0, 0.5, 365 * 24 * 3600])
def test_timeout_in_range_is_taken(timeout):
    image, _ = flat([*exit_ins(4)])
    eng = UnicornEngine(image, ram_size=RAM, timeout=timeout)
    try:
        assert eng.timeout == timeout
        assert eng.run().exit_code == 4
    finally:
        eng.close()


# ------------------------------------------------------------- review fixes
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("decision, protected", [("emulate", True), ("skip", True), ("skip", False)],
                         ids=["denied-emulate", "denied-skip", "allowed"])
def test_a_vector_store_run_again_is_decided_again(engine, decision, protected):
    """A loop storing 16 bytes to one address with `movdqu`: each iteration's store goes
    to vm.write.  Unicorn used to answer the second iteration's first 8-byte piece
    from the "cover" the first iteration's 16-byte decision left (same RIP, inside
    it), so from then on nothing was written or decided — on any page mapped
    read-only, an unprotected neighbour's included."""
    page = DATA + PAGE
    target = page + 0x10 if protected else page + 0x810
    n = 5
    ins = [mov_imm(Register.RCX, n), mov_imm(Register.RAX, 0),
           Ins.create_reg(Code.INC_RM64, Register.RAX), Ins.create_reg_reg(Code.MOVQ_XMM_RM64, Register.XMM0, Register.RAX),
           Ins.create_reg_reg(Code.PUNPCKLQDQ_XMM_XMMM128, Register.XMM0, Register.XMM0),
           Ins.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _abs(target), Register.XMM0),
           Ins.create_reg(Code.DEC_RM64, Register.RCX), Ins.create_branch(Code.JNE_REL32_64, 0), *exit_ins(0)]
    _, ips = flat(ins)
    ins[7] = Ins.create_branch(Code.JNE_REL32_64, ips[2])
    image, _ = flat(ins)
    r, mem, _ = _run(engine, image, Policy.from_ranges([(page, SUB)], decision), [(target, 16)])
    assert r.stop_reason == "exit", r
    want = (n.to_bytes(8, "little") * 2) if decision == "emulate" or not protected else None
    if want is not None:
        assert mem[target] == want
    else:
        assert mem[target] == INIT_DATA[target - DATA:target - DATA + 16]
    assert sum(v.size for v in r.violations) == (16 * n if protected else 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_run_after_a_stop_goes_on_from_the_stopped_store(engine):
    """README: after a STOP, a later run() executes the store again (Unicorn) or goes on
    after it (KVM) — Unicorn used to restart from the entry point (console 'AAB'), and
    kept the STOP so that a later fault was reported as that STOP again."""
    page = DATA + PAGE
    ins = [*putc("A"), mov_imm(Register.RAX, 0x55), Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(page + 0x10), Register.RAX),
           *putc("B"), mov_imm(Register.RAX, 1), Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(RAM - 4), Register.RAX),
           *exit_ins(7)]
    image, _ = flat(ins)
    cls = UnicornEngine if engine != "kvm" else None
    if engine == "kvm":
        skip_without_kvm()
        from sppkit.engines.kvm.engine import KvmEngine as cls
    eng = cls(image, policy=Policy.from_ranges([(page, SUB)], "stop"), ram_size=RAM, timeout=30,
              **({"native_hook": False} if engine == "unicorn-py" else {}))
    try:
        r = eng.run()
        assert (r.stop_reason, r.console) == ("stop-decision", "A")
        eng.vm.set_subpage_access(page >> 12, [0xFFFFFFFF])
        r = eng.run()
        # the store past the end of RAM faults: a shutdown, not the old STOP again
        assert (r.stop_reason, r.console) == ("shutdown", "AB"), r
        if engine != "kvm":
            assert eng.vm.read(page + 0x10, 8) == (0x55).to_bytes(8, "little")  # the stopped store, made now
    finally:
        eng.close()


@pytest.mark.parametrize("engine", ["unicorn", "unicorn-py"])
@pytest.mark.parametrize("store", ["cmpxchg8b", "fxsave64"])
def test_unicorn_refuses_to_stop_inside_a_helper_store(engine, store):
    """Unicorn makes the stores of some instructions inside a QEMU helper: a hook's
    "stop" does not stop there — the instruction retired (cmpxchg8b loaded edx:eax),
    the block ran on, and the run was reported as ending at the store (fxsave: the
    STOP was lost and the guest exited).  Now run() raises, naming the instruction,
    nothing later lands, and the engine cannot be continued."""
    page = DATA + PAGE
    mem_op = _abs(page + 0x10)
    body = ([mov_imm(Register.RAX, 1), mov_imm(Register.RDX, 2), Ins.create_mem(Code.CMPXCHG8B_M64, mem_op)]
            if store == "cmpxchg8b" else
            [mov_imm(Register.RSI, page), Ins.create_mem(Code.FXSAVE64_M512BYTE, MemoryOperand(Register.RSI))])
    marker = Ins.create_mem_u32(Code.MOV_RM8_IMM8, _abs(DATA + 0x40), 0x77)
    image, _ = flat([*body, marker, *exit_ins(7)])
    eng = UnicornEngine(image, policy=Policy.from_ranges([(page, SUB)], "stop"), ram_size=RAM, timeout=30,
                        **({"native_hook": False} if engine == "unicorn-py" else {}))
    try:
        with pytest.raises(EngineError, match=f"STOP on `{store}.*cannot stop at it"):
            eng.run()
        assert eng.vm.read(DATA + 0x40, 1) != b"\x77"  # nothing after the instruction landed
        with pytest.raises(EngineError, match="cannot be continued"):
            eng.run()
    finally:
        eng.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_self_modifying_code_on_a_data_page_runs_patched(engine):
    """Code run from a page of a non-executable segment that patches its next
    instruction: Unicorn ran the stale translation ('X'; a real CPU prints 'Y') when
    the page holds a protected sub-page, since only executable segments were treated as
    code."""


    x = DATA + 3 * PAGE + 0x100

    def enc(ins):
        e = iced_x86.BlockEncoder(64)
        e.add_many(ins)
        return e.encode(x)

    body = [Ins.create_mem_u32(Code.MOV_RM8_IMM8, _abs(0), ord("Y")), Ins.create_reg_u32(Code.MOV_R8_IMM8, Register.AL, ord("X")),
            Ins.create_u32_reg(Code.OUT_IMM8_AL, 0xE9, Register.AL), *exit_ins(0)]
    ips = [i.ip for i in iced_x86.Decoder(64, enc(body), ip=x)]
    body[0] = Ins.create_mem_u32(Code.MOV_RM8_IMM8, _abs(ips[1] + 1), ord("Y"))
    code = enc(body)
    image, _ = flat([mov_imm(Register.RBX, x), Ins.create_reg(Code.JMP_RM64, Register.RBX)])
    data = bytearray(INIT_DATA)
    data[x - DATA:x - DATA + len(code)] = code
    image = GuestImage(segments=[image.segments[0], Segment(DATA, bytes(data), len(data), "rw-")], entry=CODE)
    r, _, _ = _run(engine, image, Policy.from_ranges([(DATA + 3 * PAGE + 0xF80, SUB)], "skip"), [])
    assert (r.stop_reason, r.console) == ("exit", "Y"), r


@pytest.mark.parametrize("engine", ENGINES)
def test_a_fault_after_two_pauses_is_a_shutdown(engine):
    """After two pauses in one run Unicorn stops at a faulting instruction with no error
    (measured: `ud2` after two port-handler pauses); it was reported as "halt: the
    instruction limit was reached" with no limit set, and a checkpoint set recorded
    that wrong end.  Both engines report the fault."""
    def sig(v):  # signal v, then a jump to the next instruction (ending the translated block)
        return [mov_imm(Register.RAX, v), Ins.create_u32_reg(Code.OUT_IMM8_AL, 0xF5, Register.AL),
                Ins.create_branch(Code.JMP_REL32_64, CODE)]

    body = [*sig(1), *putc("a"), *sig(2), *putc("b"), *sig(3), Ins.create(Code.UD2), *exit_ins(7)]
    _, ips = flat(body)
    for i, ins in enumerate(body):
        if ins.code == Code.JMP_REL32_64:
            body[i] = Ins.create_branch(Code.JMP_REL32_64, ips[i + 1])
    image, ips = flat(body)
    if engine == "kvm":
        skip_without_kvm()
        from sppkit.engines.kvm.engine import KvmEngine as cls
    else:
        cls = UnicornEngine
    eng = cls(image, ram_size=RAM, timeout=30, **({"native_hook": False} if engine == "unicorn-py" else {}))
    try:
        eng.add_port_handler(0xF5, lambda e, v: "pause" if v in (1, 2) else None)
        reasons = []
        r = eng.run()
        while r.stop_reason == "paused":
            reasons.append(r.stop_reason)
            r = eng.run()
        ud2 = ips[3 * 3 + len(putc("a")) * 2]
        assert (reasons, r.stop_reason, r.rip_at, r.console) == (["paused", "paused"], "shutdown", ud2, "ab"), r
        assert f"guest fault at rip={ud2:#x}" in r.detail and "ud2" in r.detail
    finally:
        eng.close()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("store", ["cmpxchg8b", "fnstenv"])
@pytest.mark.parametrize("decision", ["emulate", "stop"])
def test_nothing_after_the_exit_is_made(engine, store, decision):
    """A store Unicorn makes inside a helper, in the same translated block as the exit
    port write: it was decided, recorded and written after the guest had exited (a
    STOP even turned the clean exit into an error).  KVM ends at the exit."""
    target = DATA + 0x100
    mem = MemoryOperand(Register.RSI)
    op = (Ins.create_mem(Code.CMPXCHG8B_M64, mem) if store == "cmpxchg8b"
          else Ins.create_mem(Code.FNSTENV_M28BYTE, mem))
    image, _ = flat([mov_imm(Register.RSI, target), *exit_ins(7), op, Ins.create(Code.HLT)])
    r, mem_after, _ = _run(engine, image, Policy.from_ranges([(target, SUB)], decision), [(target, 32)])
    assert (r.stop_reason, r.exit_code, r.violations) == ("exit", 7, []), r
    assert mem_after[target] == INIT_DATA[0x100:0x120]


@pytest.mark.parametrize("engine", ["unicorn", "unicorn-py"])
def test_stop_at_enter_is_exact(engine):
    """`enter` with a nesting level is translated inline by Unicorn: a STOP at its store
    stops cleanly at it (it was refused as a helper store, and the guest could not be
    continued).  (KVM's emulator refuses `enter` on a protected page: README.)"""
    stack = DATA + PAGE
    ins = [mov_imm(Register.RSP, stack + 0x140), mov_imm(Register.RBP, stack + 0x178),
           Ins.create_u32_u32(Code.ENTERQ_IMM16_IMM8, 0x10, 1), *exit_ins(7)]
    image, ips = flat(ins)
    r, _, _ = _run(engine, image, Policy.from_ranges([(stack + 0x100, SUB)], "stop"), [])
    assert (r.stop_reason, r.rip_at) == ("stop-decision", ips[2]), r


@pytest.mark.parametrize("engine", ENGINES)
def test_self_modifying_code_into_the_next_data_page_runs_patched(engine):
    """Code near the end of a non-executable page patching an instruction on the next
    page, which the running block reaches: Unicorn ran the stale code (exit 17; a real
    CPU, 42) when only RIP's own page was checked."""
    p = 0x500000

    def enc(ins, ip):
        e = iced_x86.BlockEncoder(64)
        e.add_many(ins)
        return e.encode(ip)

    body = bytearray(b"\x90" * 0x2000)
    start, tgt = p + 0xFE8, p + 0x1008
    c1 = enc([Ins.create_mem_u32(Code.MOV_RM8_IMM8, MemoryOperand(displ=tgt + 1, displ_size=8), 42)], start)
    body[0xFE8:0xFE8 + len(c1)] = c1
    c2 = enc([Ins.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, 17),
              Ins.create_u32_reg(Code.OUT_IMM8_EAX, 0xF4, Register.EAX)], tgt)
    body[0x1008:0x1008 + len(c2)] = c2
    image = GuestImage(segments=[Segment(p, bytes(body), 0x2000, "rw-"), Segment(DATA, INIT_DATA, len(INIT_DATA), "rw-")],
                       entry=start)
    r, _, _ = _run(engine, image, Policy.from_ranges([(p + 0xF80, SUB)], "skip"), [])
    assert (r.stop_reason, r.exit_code) == ("exit", 42), r


@pytest.mark.parametrize("engine", ["unicorn", "unicorn-py"])
@pytest.mark.parametrize("flags", ["rw-", "r-x"])
def test_a_helper_store_on_the_running_page_runs_once(engine, flags):
    """`fstp tbyte` (a store Unicorn makes inside a helper) to a protected page that
    is also the page running: the self-modifying-code path held the store back — but a
    helper's instruction goes on without it — then ran the instruction again, popping
    the x87 stack twice (V got 1.0 instead of pi, the next store 0)."""
    p = 0x500000
    v = p + 0x800
    mark = DATA + 0x900

    def m(d):
        return MemoryOperand(displ=d, displ_size=8)

    ins = [Ins.create(Code.FLD1), Ins.create(Code.FLDPI), Ins.create_mem(Code.FSTP_M80FP, m(v)),
           Ins.create_mem(Code.FSTP_M80FP, m(mark)), *exit_ins(7)]
    e = iced_x86.BlockEncoder(64)
    e.add_many(ins)
    code = e.encode(p)
    page = bytearray(0x1000)
    page[:len(code)] = code
    image = GuestImage(segments=[Segment(p, bytes(page), 0x1000, flags), Segment(DATA, INIT_DATA, len(INIT_DATA), "rw-")],
                       entry=p)
    r, mem, _ = _run(engine, image, Policy.from_ranges([(v, SUB)], "emulate"), [(v, 10), (mark, 10)])
    assert (r.stop_reason, r.exit_code) == ("exit", 7), r
    assert mem[v] == bytes.fromhex("35c26821a2da0fc90040")  # pi
    assert mem[mark] == bytes.fromhex("0000000000000080ff3f")  # 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_patched_store_is_named_as_it_now_is(engine):
    """f = `mov qword [D], rax; ret`, D protected (SKIP); the guest calls f, patches
    f's store into `mov dword [D], eax; nop` (through vm.write: the code page holds a
    protected sub-page), and calls f again.  The second violation is a 4-byte store
    named as the new instruction.  Before: the Unicorn engine kept what it had learnt
    of the instruction at that address (its decoding, and whether it stores 8 bytes at
    once), so the record named the old one."""
    d = DATA + 0x10
    f_at = CODE + 0x800
    new = iced_x86.BlockEncoder(64)
    new.add(Ins.create_mem_reg(Code.MOV_RM32_R32, _abs(d), Register.EAX))
    new_bytes = new.encode(f_at) + b"\x90"
    assert len(new_bytes) == 8
    f = [Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(d), Register.RAX), Ins.create(Code.RETNQ)]
    main = [mov_imm(Register.RSP, DATA + 0x3000), mov_imm(Register.RAX, 0x1111),
            Ins.create_branch(Code.CALL_REL32_64, f_at),
            mov_imm(Register.RBX, f_at), mov_imm(Register.RAX, int.from_bytes(new_bytes, "little")),
            Ins.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RBX), Register.RAX),
            mov_imm(Register.RAX, 0x2222), Ins.create_branch(Code.CALL_REL32_64, f_at), *exit_ins(0)]
    enc = iced_x86.BlockEncoder(64)
    enc.add_many(main)
    code = enc.encode(CODE)
    fenc = iced_x86.BlockEncoder(64)
    fenc.add_many(f)
    fcode = fenc.encode(f_at)
    code = code + bytes(0x800 - len(code)) + fcode
    image = GuestImage(segments=[Segment(CODE, code, len(code), "rwx"),
                                 Segment(DATA, INIT_DATA, len(INIT_DATA), "rw-")], entry=CODE)
    policy = Policy.from_ranges([(d & ~(SUB - 1), SUB), (CODE + 0xF80, SUB)], "skip")
    r, mem, _ = _run(engine, image, policy, [(f_at, 8)], cpl=0)
    assert (r.stop_reason, r.exit_code) == ("exit", 0), r
    assert mem[f_at] == new_bytes
    assert [(v.gpa, v.size) for v in r.violations] == [(d, 8), (d, 4)]
    texts = [v.instruction for v in r.violations]
    assert "rax" in texts[0] and "eax" in texts[1], texts
