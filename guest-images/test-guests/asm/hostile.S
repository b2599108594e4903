/*
 * The hostile test guest: everything a guest should not do, each phase reported on the serial
 * console, so that host tests can check that the VMM survives it and stops only this guest.
 *
 * Flat 64-bit guest loaded with `vmm --flat hostile.bin --entry 0x100000` (same entry state as
 * the probe: long mode, identity paging over RAM and the 32-bit MMIO gap, interrupts off,
 * rdi = vCPU index, rsi = vCPU count). Position independent. vCPUs other than 0 halt for good.
 *
 * vCPU 0 prints `HOSTILE READY` and waits (halted, woken by the UART's receive interrupt) for
 * one input line, so the host decides when the attack starts. Then, with interrupts off for
 * good:
 *
 *  1. Ports: for every port 0..0xffff except the debug-exit port 0xf4, a byte write of garbage
 *     (port low ^ port high ^ 0xa5) and a byte read; word and dword writes and reads at every
 *     64th port; string I/O (`rep outsb`/`rep insb`/`rep outsw`, 64 bytes) to ports nobody
 *     handles; 4096 i8042 self-test commands whose replies are never read. The UART is set up
 *     again afterwards (the garbage switched it to loopback). Prints `HOSTILE PORTS DONE`.
 *  2. MMIO: byte, word, dword and qword writes and reads at addresses where nothing is mapped,
 *     above RAM (1 GiB) and in the MMIO gap (avoiding the IOAPIC, the LAPIC and KVM's TSS).
 *     Prints `HOSTILE MMIO DONE and=<hex>`: the AND of every qword read (all ones when every
 *     unhandled read returns all ones, as on a PC with nothing there).
 *  3. Faults with an IDT that resumes after them: 10 undefined opcodes (#UD), a non-canonical
 *     access (#GP) and an access past the identity map (#PF). Prints
 *     `HOSTILE FAULTS ud=<hex> gp=<hex> pf=<hex>` (expected a, 1, 1).
 *  4. Prints `HOSTILE TRIPLE FAULT`, loads an empty IDT and executes ud2: #UD, #GP and #DF
 *     cannot be delivered, so the CPU shuts down (KVM_EXIT_SHUTDOWN).
 */
    .intel_syntax noprefix
    .code64

    .set COM1, 0x3f8
    .set COM1_IER, COM1 + 1
    .set COM1_FCR, COM1 + 2
    .set COM1_LCR, COM1 + 3
    .set COM1_MCR, COM1 + 4
    .set COM1_LSR, COM1 + 5
    .set LSR_DATA_READY, 0x01
    .set LSR_THR_EMPTY, 0x20
    .set LCR_8N1, 0x03
    .set MCR_OUT2, 0x08
    .set FCR_RESET_FIFOS, 0x07
    .set IER_RX_DATA, 0x01

    .set DEBUG_EXIT_PORT, 0xf4
    .set UNHANDLED_PORT, 0x510
    .set PCI_DATA_PORT, 0xcfc
    .set I8042_COMMAND, 0x64
    .set I8042_SELF_TEST, 0xaa
    .set SELF_TEST_FLOOD, 4096
    .set GARBAGE, 0xa5
    .set WIDE_PORT_STEP, 0x40
    .set STRING_BYTES, 64

    .set IRQ_BASE, 0x20
    .set IDT_ENTRIES, IRQ_BASE + 16
    .set VECTOR_UD, 6
    .set VECTOR_GP, 13
    .set VECTOR_PF, 14

    /* Non-canonical (#GP) and past the identity map, which ends at 4 GiB or RAM's end (#PF). */
    .set NON_CANONICAL, 0x8000000000000000
    .set UNMAPPED, 0x7000000000

    .include "pic.inc"
    .include "idt.inc"

    .text
    .globl _start
_start:
    test rdi, rdi
    jnz park
    lea rsp, [rip + stack_top]
    call setup_interrupts
    lea rsi, [rip + msg_ready]
    call put_str
    call wait_line
    cli

/* 1. Every port. */
    xor ecx, ecx
1:  cmp ecx, DEBUG_EXIT_PORT
    je 2f
    mov edx, ecx
    mov al, dl
    xor al, dh
    xor al, GARBAGE
    out dx, al
    in al, dx
2:  inc ecx
    cmp ecx, 0x10000
    jb 1b

    xor ecx, ecx
3:  mov edx, ecx
    mov eax, 0xdeadbeef
    xor eax, ecx
    out dx, ax
    in ax, dx
    out dx, eax
    in eax, dx
    add ecx, WIDE_PORT_STEP
    cmp ecx, 0x10000
    jb 3b

    cld
    lea rsi, [rip + garbage]
    mov ecx, STRING_BYTES
    mov dx, UNHANDLED_PORT
    rep outsb
    lea rdi, [rip + scratch]
    mov ecx, STRING_BYTES
    rep insb
    lea rsi, [rip + garbage]
    mov ecx, STRING_BYTES / 2
    mov dx, PCI_DATA_PORT
    rep outsw

    mov ecx, SELF_TEST_FLOOD
    mov al, I8042_SELF_TEST
4:  out I8042_COMMAND, al
    dec ecx
    jnz 4b

    call setup_uart
    lea rsi, [rip + msg_ports]
    call put_str

/* 2. Unmapped MMIO: writes of every width, then reads; r15 = AND of the qword reads. */
    mov r15, -1
    lea r12, [rip + mmio_addrs]
5:  mov rbx, [r12]
    test rbx, rbx
    jz 6f
    mov rax, 0x0123456789abcdef
    mov [rbx], al
    mov [rbx + 2], ax
    mov [rbx + 4], eax
    mov [rbx + 8], rax
    movzx eax, byte ptr [rbx]
    movzx eax, word ptr [rbx + 2]
    mov eax, [rbx + 4]
    and r15, [rbx + 8]
    add r12, 8
    jmp 5b
6:  lea rsi, [rip + msg_mmio]
    call put_str
    mov rax, r15
    call put_hex
    call put_newline

/* 3. Faults the IDT's handlers resume after (at the address in `resume`). */
    .macro fault_at bytes:vararg
    lea rax, [rip + .Lresume\@]
    mov [rip + resume], rax
    .byte \bytes
.Lresume\@:
    .endm

    fault_at 0x0f, 0x0b         /* ud2 */
    fault_at 0x06               /* push es: invalid in 64-bit mode, as are the rest */
    fault_at 0x07               /* pop es */
    fault_at 0x0e               /* push cs */
    fault_at 0x16               /* push ss */
    fault_at 0x17               /* pop ss */
    fault_at 0x1e               /* push ds */
    fault_at 0x1f               /* pop ds */
    fault_at 0x2f               /* das */
    fault_at 0x60               /* pusha */

    lea rax, [rip + 7f]
    mov [rip + resume], rax
    mov rbx, NON_CANONICAL
    mov rax, [rbx]
7:  lea rax, [rip + 8f]
    mov [rip + resume], rax
    mov rbx, UNMAPPED
    mov rax, [rbx]
8:
    lea rsi, [rip + msg_faults_ud]
    call put_str
    mov rax, [rip + count_ud]
    call put_hex
    lea rsi, [rip + msg_faults_gp]
    call put_str
    mov rax, [rip + count_gp]
    call put_hex
    lea rsi, [rip + msg_faults_pf]
    call put_str
    mov rax, [rip + count_pf]
    call put_hex
    call put_newline

/* 4. Triple fault. */
    lea rsi, [rip + msg_triple]
    call put_str
    lidt [rip + empty_idtr]
    ud2
park:
    cli
    hlt
    jmp park

/* Exception handlers: count, then resume at `resume`. The frame's RIP is at [rsp] for #UD and
 * past the error code for #GP and #PF. */
handle_ud:
    push rax
    lea rax, [rip + count_ud]
    jmp 1f
handle_gp:
    add rsp, 8
    push rax
    lea rax, [rip + count_gp]
    jmp 1f
handle_pf:
    add rsp, 8
    push rax
    lea rax, [rip + count_pf]
1:  inc qword ptr [rax]
    mov rax, [rip + resume]
    mov [rsp + 8], rax
    pop rax
    iretq

/* Any PIC interrupt: acknowledge it and return; wait_line polls the UART itself. */
handle_irq:
    push rax
    mov al, PIC_EOI
    out PIC1_CMD, al
    pop rax
    iretq

/* Sets IDT entry ecx to the handler at rax. Clobbers rdx, rdi. */
set_gate:
    mov rdi, rcx
    shl rdi, 4
    lea rdx, [rip + idt]
    add rdi, rdx
    write_gate
    ret

/* IDT with the fault handlers and IRQs 0-15 at IRQ_BASE; PIC with only IRQ 4 (COM1) unmasked;
 * the UART's receive interrupt. */
setup_interrupts:
    mov ecx, IRQ_BASE
    lea rax, [rip + handle_irq]
1:  call set_gate
    inc ecx
    cmp ecx, IDT_ENTRIES
    jb 1b
    mov ecx, VECTOR_UD
    lea rax, [rip + handle_ud]
    call set_gate
    mov ecx, VECTOR_GP
    lea rax, [rip + handle_gp]
    call set_gate
    mov ecx, VECTOR_PF
    lea rax, [rip + handle_pf]
    call set_gate
    lea rax, [rip + idt]
    mov [rip + idtr_base], rax
    lidt [rip + idtr]

    init_pic

    call setup_uart
    mov dx, COM1_IER
    mov al, IER_RX_DATA
    out dx, al
    ret

/* 8N1, no loopback, FIFOs reset, no interrupts. Clobbers rax, rdx. */
setup_uart:
    mov dx, COM1_LCR
    mov al, LCR_8N1
    out dx, al
    mov dx, COM1_MCR
    mov al, MCR_OUT2
    out dx, al
    mov dx, COM1_FCR
    mov al, FCR_RESET_FIFOS
    out dx, al
    mov dx, COM1_IER
    xor eax, eax
    out dx, al
    ret

/* Waits (halted between interrupts) until a newline arrives on the console. Clobbers rax, rdx. */
wait_line:
    call get_char
    cmp al, '\n'
    jne wait_line
    ret

    .include "console.inc"

    .balign 8
mmio_addrs:
    .quad 0x40000000    /* above the RAM of any test guest (at most 1 GiB) */
    .quad 0xc0000000    /* start of the MMIO gap */
    .quad 0xd0000000
    .quad 0xe0001000
    .quad 0xfeb00000    /* below the IOAPIC (0xfec00000) */
    .quad 0xfed00000    /* where a PC has its HPET; KVM has none */
    .quad 0
hex_digits:
    .ascii "0123456789abcdef"
garbage:
    .ascii "\xff\x00\x5a\xa5\x13\x37\xc0\xde"
    .ascii "\x01\x02\x03\x04\x80\x7f\xfe\xef"
    .ascii "\x11\x22\x33\x44\x55\x66\x77\x88"
    .ascii "\x99\xaa\xbb\xcc\xdd\xee\xf0\x0f"
    .ascii "\xff\x00\x5a\xa5\x13\x37\xc0\xde"
    .ascii "\x01\x02\x03\x04\x80\x7f\xfe\xef"
    .ascii "\x11\x22\x33\x44\x55\x66\x77\x88"
    .ascii "\x99\xaa\xbb\xcc\xdd\xee\xf0\x0f"
msg_ready:
    .asciz "HOSTILE READY\n"
msg_ports:
    .asciz "\nHOSTILE PORTS DONE\n"
msg_mmio:
    .asciz "HOSTILE MMIO DONE and="
msg_faults_ud:
    .asciz "HOSTILE FAULTS ud="
msg_faults_gp:
    .asciz " gp="
msg_faults_pf:
    .asciz " pf="
msg_triple:
    .asciz "HOSTILE TRIPLE FAULT\n"

    .data
    .balign 16
idt:
    .fill IDT_ENTRIES * 16, 1, 0
    .balign 8
resume:
    .quad 0
count_ud:
    .quad 0
count_gp:
    .quad 0
count_pf:
    .quad 0
    .balign 8
    .word 0, 0, 0
idtr:
    .word IDT_ENTRIES * 16 - 1
idtr_base:
    .quad 0
    .balign 8
    .word 0, 0, 0
empty_idtr:
    .word 0
    .quad 0
scratch:
    .fill STRING_BYTES, 1, 0
    .balign 16
stack:
    .fill 4096, 1, 0
stack_top:
