/*
 * The reset test guest: prints "RESETTING" on the serial console, then asks the i8042 keyboard
 * controller to pulse the CPU reset line (command 0xfe on port 0x64), as Linux does with
 * `reboot=k`. The VMM stops a guest that resets with status 0.
 */
    .intel_syntax noprefix
    .code64

    .set COM1, 0x3f8
    .set I8042_COMMAND, 0x64
    .set I8042_RESET_CPU, 0xfe

    .include "print.inc"

    .text
    .globl _start
_start:
    test rdi, rdi
    jnz 1f
    print_asciz message
    mov al, I8042_RESET_CPU
    out I8042_COMMAND, al
1:  cli
    hlt
    jmp 1b

message:
    .asciz "RESETTING\n"
