/*
 * sppkit guest entry point.
 *
 * The engine enters at _start in 64-bit long mode (identity-mapped paging, CPL 0,
 * or CPL 3 with IOPL=3) with RSP at the top of guest RAM, 16-byte aligned.
 * _start calls main() and reports its return value through the isa-debug-exit
 * port (0xF4, a 32-bit `out`); the engine's exit code is that value.  If the
 * engine ignores the port, `ud2` ends the run with an invalid-opcode fault
 * instead of spinning.
 */
        .section .text.start, "ax", @progbits
        .globl  _start
        .type   _start, @function
_start:
        xorl    %ebp, %ebp              /* end of frame-pointer chain */
        andq    $-16, %rsp              /* SysV: RSP % 16 == 0 before `call` */
        call    main
        movw    $0xf4, %dx              /* isa-debug-exit: exit code = eax */
        outl    %eax, %dx
1:      ud2
        jmp     1b
        .size   _start, . - _start

        /* No executable stack (silences ld's warning; the guest has no loader anyway). */
        .section .note.GNU-stack, "", @progbits
