/*
 * The triple-fault test guest: prints "FAULTING" on the serial console, loads an empty IDT and
 * executes an undefined instruction. #UD cannot be delivered, nor can the #GP and #DF that
 * follow, so the CPU shuts down (KVM_EXIT_SHUTDOWN). The VMM stops such a guest with status 0.
 */
    .intel_syntax noprefix
    .code64

    .set COM1, 0x3f8

    .text
    .globl _start
_start:
    test rdi, rdi
    jnz 3f
    lea rsi, [rip + message]
    mov dx, COM1
1:  mov al, [rsi]
    test al, al
    jz 2f
    out dx, al
    inc rsi
    jmp 1b
2:  lidt [rip + empty_idtr]
    ud2
3:  cli
    hlt
    jmp 3b

    .balign 8
    .word 0, 0, 0
empty_idtr:
    .word 0
    .quad 0
message:
    .asciz "FAULTING\n"
