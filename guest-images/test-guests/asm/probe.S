/*
 * The probe test guest.
 *
 * Flat 64-bit guest loaded with `vmm --flat probe.bin --entry 0x100000`. It takes commands on the
 * serial console (16550 at 0x3f8) and touches the guest-physical addresses the host names, so
 * host-side tests can make the guest itself read, write and checksum chosen pages. The protocol
 * is described in docs/architecture.md and in the `test-guests` crate documentation.
 *
 * Entry state (the VMM's flat boot convention): long mode, identity paging, interrupts off,
 * rdi = vCPU index, rsi = vCPU count, rdx = end of the identity-mapped range. No stack.
 *
 * vCPU 0 runs the command loop. It waits for input with `sti; hlt` and wakes on the UART's
 * receive interrupt (IRQ 4 through the legacy PIC), so an idle probe costs no host CPU. The other
 * vCPUs check in by incrementing `online` (reported in the READY line) and halt.
 *
 * The code is position independent (RIP-relative only), so it runs at any load address.
 */
    .intel_syntax noprefix
    .code64

    .set COM1, 0x3f8
    .set COM1_IER, COM1 + 1
    .set COM1_MCR, COM1 + 4
    .set COM1_LSR, COM1 + 5
    .set LSR_DATA_READY, 0x01
    .set LSR_THR_EMPTY, 0x20
    .set IER_RX_DATA, 0x01
    .set MCR_OUT2, 0x08

    .set DEBUG_EXIT_PORT, 0xf4

    .set IRQ_BASE, 0x20
    .set IDT_ENTRIES, IRQ_BASE + 16

    .set LINE_MAX, 80
    .set PAGE_WORDS, 512
    .set FNV_OFFSET, 0xcbf29ce484222325
    .set FNV_PRIME, 0x100000001b3
    /* Bounded wait for the other vCPUs: about 10 s in KVM's emulator, milliseconds on hardware. */
    .set ONLINE_WAIT_SPINS, 5000000

    .include "pic.inc"
    .include "idt.inc"

    .text
    .globl _start
_start:
    test rdi, rdi
    jnz secondary

    lea rsp, [rip + stack_top]
    mov [rip + map_end], rdx
    mov r12, rsi
    lock inc qword ptr [rip + online]
    call setup_interrupts

    mov ecx, ONLINE_WAIT_SPINS
1:  cmp [rip + online], r12
    jae 2f
    pause
    dec ecx
    jnz 1b
2:  lea rsi, [rip + msg_ready]
    call put_str
    mov rax, [rip + online]
    call put_dec
    call put_newline

main_loop:
    call get_line
    cmp rbx, LINE_MAX
    ja err_too_long
    test rbx, rbx
    jz main_loop
    lea r8, [rip + line_buf]
    lea r9, [r8 + rbx]
    movzx eax, byte ptr [r8]
    inc r8
    cmp al, 'R'
    je cmd_read
    cmp al, 'W'
    je cmd_write
    cmp al, 'C'
    je cmd_checksum
    cmp al, 'F'
    je cmd_fill
    cmp al, 'X'
    je cmd_exit
    lea rsi, [rip + msg_err_unknown]
    jmp reply

/* R gpa -> OK R gpa value */
cmd_read:
    call parse_arg
    test edx, edx
    jnz err_syntax
    cmp r8, r9
    jne err_syntax
    test al, 7
    jnz err_align
    cmp rax, [rip + map_end]
    jae err_range
    mov rbx, rax
    mov r13, [rbx]
    lea rsi, [rip + msg_ok_read]
    jmp reply_gpa_value

/* W gpa value -> OK W gpa */
cmd_write:
    call parse_arg
    test edx, edx
    jnz err_syntax
    mov rbx, rax
    call parse_arg
    test edx, edx
    jnz err_syntax
    cmp r8, r9
    jne err_syntax
    test bl, 7
    jnz err_align
    cmp rbx, [rip + map_end]
    jae err_range
    mov [rbx], rax
    lea rsi, [rip + msg_ok_write]
    jmp reply_gpa

/* C gpa -> OK C gpa sum (FNV-1a over the page's 512 little-endian u64 words) */
cmd_checksum:
    call parse_arg
    test edx, edx
    jnz err_syntax
    cmp r8, r9
    jne err_syntax
    test ax, 0xfff
    jnz err_align
    cmp rax, [rip + map_end]
    jae err_range
    mov rbx, rax
    mov rdi, rax
    mov ecx, PAGE_WORDS
    mov rax, FNV_OFFSET
    mov r10, FNV_PRIME
1:  xor rax, [rdi]
    imul rax, r10
    add rdi, 8
    dec ecx
    jnz 1b
    mov r13, rax
    lea rsi, [rip + msg_ok_checksum]
    jmp reply_gpa_value

/* F gpa value -> OK F gpa */
cmd_fill:
    call parse_arg
    test edx, edx
    jnz err_syntax
    mov rbx, rax
    call parse_arg
    test edx, edx
    jnz err_syntax
    cmp r8, r9
    jne err_syntax
    test bx, 0xfff
    jnz err_align
    cmp rbx, [rip + map_end]
    jae err_range
    mov rdi, rbx
    mov ecx, PAGE_WORDS
1:  mov [rdi], rax
    add rdi, 8
    dec ecx
    jnz 1b
    lea rsi, [rip + msg_ok_fill]
    jmp reply_gpa

/* X status -> the VMM stops this guest with `status`; no reply */
cmd_exit:
    call parse_arg
    test edx, edx
    jnz err_syntax
    cmp r8, r9
    jne err_syntax
    cmp rax, 0xff
    ja err_range
    out DEBUG_EXIT_PORT, al
1:  cli
    hlt
    jmp 1b

err_syntax:
    lea rsi, [rip + msg_err_syntax]
    jmp reply
err_align:
    lea rsi, [rip + msg_err_align]
    jmp reply
err_range:
    lea rsi, [rip + msg_err_range]
    jmp reply
err_too_long:
    lea rsi, [rip + msg_err_too_long]
reply:
    call put_str
    jmp main_loop

/* The OK replies of R and C: the string at rsi, then "gpa value" with gpa = rbx, value = r13. */
reply_gpa_value:
    call put_str
    mov rax, rbx
    call put_hex
    mov al, ' '
    call put_char
    mov rax, r13
    call put_hex
    call put_newline
    jmp main_loop

/* The OK replies of W and F: the string at rsi, then "gpa" with gpa = rbx. */
reply_gpa:
    call put_str
    mov rax, rbx
    call put_hex
    call put_newline
    jmp main_loop

/* vCPUs other than 0: check in, then halt for good. */
secondary:
    lock inc qword ptr [rip + online]
1:  cli
    hlt
    jmp 1b

/*
 * Parses " HEX" at r8 (end r9): one space, then 1 to 16 hex digits up to a space or the end.
 * Out: rax = value, edx = 0 on success (1 on error), r8 advanced. Clobbers rcx, r10.
 */
parse_arg:
    mov edx, 1
    cmp r8, r9
    jae 9f
    cmp byte ptr [r8], ' '
    jne 9f
    inc r8
    xor eax, eax
    xor ecx, ecx
1:  cmp r8, r9
    jae 5f
    movzx r10d, byte ptr [r8]
    cmp r10d, ' '
    je 5f
    sub r10d, '0'
    cmp r10d, 9
    jbe 3f
    movzx r10d, byte ptr [r8]
    or r10d, 0x20
    sub r10d, 'a'
    cmp r10d, 5
    ja 9f
    add r10d, 10
3:  cmp ecx, 16
    jae 9f
    shl rax, 4
    or rax, r10
    inc ecx
    inc r8
    jmp 1b
5:  test ecx, ecx
    jz 9f
    xor edx, edx
9:  ret

/* Reads one line into line_buf; rbx = its length ('\r' dropped, '\n' not stored). */
get_line:
    xor ebx, ebx
1:  call get_char
    cmp al, '\r'
    je 1b
    cmp al, '\n'
    je 3f
    cmp rbx, LINE_MAX
    ja 1b
    jae 2f
    lea r10, [rip + line_buf]
    mov [r10 + rbx], al
2:  inc rbx
    jmp 1b
3:  ret

    .include "console.inc"

/* Writes rax in decimal. Clobbers rax, rcx, rdx, rsi. */
put_dec:
    lea rsi, [rip + dec_buf_end]
    mov ecx, 10
1:  xor edx, edx
    div rcx
    add dl, '0'
    dec rsi
    mov [rsi], dl
    test rax, rax
    jnz 1b
    jmp put_str

/* IDT gates for IRQs 0-15 at IRQ_BASE (all irq_handler); legacy PIC with IRQ 4 (COM1) unmasked
 * at vector IRQ_BASE + 4; the UART's RX interrupt. Clobbers rax, rcx, rdx, rdi. */
setup_interrupts:
    lea rdi, [rip + idt + IRQ_BASE * 16]
    lea rax, [rip + irq_handler]
    mov ecx, 16
1:  write_gate
    add rdi, 16
    dec ecx
    jnz 1b
    lea rax, [rip + idt]
    mov [rip + idtr_base], rax
    lidt [rip + idtr]

    init_pic

    mov dx, COM1_MCR
    mov al, MCR_OUT2
    out dx, al
    mov dx, COM1_IER
    mov al, IER_RX_DATA
    out dx, al
    ret

/* Any PIC interrupt: acknowledge it and return; the command loop polls the UART itself. */
irq_handler:
    push rax
    mov al, PIC_EOI
    out PIC1_CMD, al
    pop rax
    iretq

hex_digits:
    .ascii "0123456789abcdef"
msg_ready:
    .asciz "PROBE READY vcpus="
msg_ok_read:
    .asciz "OK R "
msg_ok_write:
    .asciz "OK W "
msg_ok_checksum:
    .asciz "OK C "
msg_ok_fill:
    .asciz "OK F "
msg_err_unknown:
    .asciz "ERR unknown command\n"
msg_err_syntax:
    .asciz "ERR syntax\n"
msg_err_align:
    .asciz "ERR align\n"
msg_err_range:
    .asciz "ERR range\n"
msg_err_too_long:
    .asciz "ERR line too long\n"

    .data
    .balign 16
idt:
    .fill IDT_ENTRIES * 16, 1, 0
    .balign 8
online:
    .quad 0
map_end:
    .quad 0
    .balign 8
    .word 0, 0, 0
idtr:
    .word IDT_ENTRIES * 16 - 1
idtr_base:
    .quad 0
line_buf:
    .fill LINE_MAX, 1, 0
dec_buf:
    .fill 24, 1, 0
dec_buf_end:
    .byte 0
    .balign 16
stack:
    .fill 4096, 1, 0
stack_top:
