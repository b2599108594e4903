/*
 * The triple-fault test guest: prints "FAULTING" on the serial console, loads an empty IDT and
 * executes an undefined instruction. #UD cannot be delivered, nor can the #GP and #DF that
 * follow, so the CPU shuts down (KVM_EXIT_SHUTDOWN). The VMM stops such a guest with status 0.
 */
    .intel_syntax noprefix
    .code64

    .set COM1, 0x3f8

    .include "print.inc"

    .text
    .globl _start
_start:
    test rdi, rdi
    jnz 1f
    print_asciz message
    lidt [rip + empty_idtr]
    ud2
1:  cli
    hlt
    jmp 1b

    .balign 8
    .word 0, 0, 0
empty_idtr:
    .word 0
    .quad 0
message:
    .asciz "FAULTING\n"
