/*
 * kvm_guest.S - the guest code of benchmarks/bench_kvm.py, shared by both sides.
 *
 * Assembled once into a flat binary loaded at LOAD_GPA (0x100000) and run
 *   - by sppkit's KvmEngine (flat_image), and
 *   - by benchmarks/kvm_loop.c (the bare C KVM loop),
 * so the two time exactly the same instructions.  The same file is also linked into
 * kvm_loop's host build, where `spin` is called natively (benchmark part b).
 *
 * The host patches the parameter block (8-byte aligned, right after the first jmp)
 * before the run:
 *   param_mode   0 = protected-write loop, 1 = compute loop
 *   param_count  iterations
 *   param_target gpa the write loop stores to / the compute loop's scratch buffer
 * and reads param_result (the compute loop's final value) afterwards.
 *
 * Position independent (RIP-relative only); 64-bit, general-purpose registers only.
 * Ends with a 32-bit `out` of 0 to port 0xF4 (the isa-debug-exit of sppkit guests).
 */
        .text
        .globl  guest_entry
        .type   guest_entry, @function
guest_entry:
        jmp     1f
        .balign 8
        .globl  param_mode, param_count, param_target, param_result
param_mode:     .quad 0
param_count:    .quad 0
param_target:   .quad 0
param_result:   .quad 0
1:
        movq    param_count(%rip), %rcx
        movq    param_target(%rip), %rdi
        cmpq    $0, param_mode(%rip)
        jne     2f
        /* write loop: one 8-byte store per iteration to the same address */
        .p2align 4
3:      movq    %rcx, (%rdi)
        decq    %rcx
        jnz     3b
        jmp     4f
2:      movq    %rdi, %rsi              /* spin(count, target) */
        movq    %rcx, %rdi
        call    spin
        movq    %rax, param_result(%rip)
4:      xorl    %eax, %eax
        movw    $0xf4, %dx
        outl    %eax, %dx
5:      ud2
        jmp     5b
        .size   guest_entry, . - guest_entry

/*
 * u64 spin(u64 n, u64 *buf): n rounds of xorshift64, each storing the state into
 * buf[i % 512] (a 4-KiB scratch page, unprotected).  Returns the final state.
 * SysV ABI, so the host build calls it as a C function.
 */
        .globl  spin
        .type   spin, @function
        .p2align 4
spin:
        movabsq $0x2545f4914f6cdd1d, %rax
        xorl    %ecx, %ecx
        testq   %rdi, %rdi
        jz      7f
        .p2align 4
6:      movq    %rax, %rdx
        shlq    $13, %rdx
        xorq    %rdx, %rax
        movq    %rax, %rdx
        shrq    $7, %rdx
        xorq    %rdx, %rax
        movq    %rax, %rdx
        shlq    $17, %rdx
        xorq    %rdx, %rax
        movl    %ecx, %edx
        andl    $511, %edx
        movq    %rax, (%rsi,%rdx,8)
        incq    %rcx
        cmpq    %rdi, %rcx
        jne     6b
7:      ret
        .size   spin, . - spin

        .section .note.GNU-stack, "", @progbits
