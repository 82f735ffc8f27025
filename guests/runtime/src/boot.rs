//! Multiboot v1 header, the 32-bit entry that switches to long mode, the AP
//! trampoline and the interrupt entry stubs.
//!
//! Memory used: the image at 1 MiB (page tables and stacks in its .bss), the
//! AP trampoline copied to 0x8000 (SIPI vector 0x08). The first 4 GiB are
//! identity mapped with 2 MiB pages; the top 32 MiB (IOAPIC at 0xFEC00000,
//! LAPIC at 0xFEE00000) are mapped uncached.

use core::arch::global_asm;

/// Physical address the AP trampoline is copied to.
pub const TRAMPOLINE_ADDR: usize = 0x8000;

// Multiboot header and BSP entry. Multiboot enters in 32-bit protected mode
// with paging off, EAX = magic and EBX = physical address of the info block.
global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002
    .long 0x00000002
    .long -(0x1BADB002 + 0x00000002)

    .section .bss.pagetables, "aw", @nobits
    .balign 4096
    .global virq_boot_pml4
virq_boot_pml4:
    .skip 4096
virq_boot_pdpt:
    .skip 4096
virq_boot_pd:
    .skip 4 * 4096

    .section .bss.stacks, "aw", @nobits
    .balign 16
virq_boot_stack:
    .skip 32768
virq_boot_stack_top:

    .section .rodata
    .balign 8
virq_boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00CF9A000000FFFF
virq_boot_gdt_ptr:
    .word 31
    .quad virq_boot_gdt

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    mov %eax, %esi
    mov %ebx, %ebp

    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    mov $virq_boot_pdpt + 3, %eax
    mov %eax, virq_boot_pml4
    mov $virq_boot_pd + 3, %eax
    mov %eax, virq_boot_pdpt
    add $0x1000, %eax
    mov %eax, virq_boot_pdpt + 8
    add $0x1000, %eax
    mov %eax, virq_boot_pdpt + 16
    add $0x1000, %eax
    mov %eax, virq_boot_pdpt + 24

    mov $virq_boot_pd, %edi
    mov $0x83, %eax
    xor %ecx, %ecx
1:
    mov %eax, (%edi,%ecx,8)
    add $0x200000, %eax
    inc %ecx
    cmp $2048, %ecx
    jne 1b
    mov $2032, %ecx
2:
    orl $0x18, (%edi,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 2b

    mov %cr4, %eax
    or $0x620, %eax
    mov %eax, %cr4
    mov $virq_boot_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $0xFFFFFFFB, %eax
    or $0x80000003, %eax
    mov %eax, %cr0
    lgdt virq_boot_gdt_ptr
    ljmp $0x08, $3f

    .code64
3:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $virq_boot_stack_top, %rsp
    mov %esi, %edi
    mov %ebp, %esi
    xor %ebp, %ebp
    call virq_rt_bsp_entry
4:
    cli
    hlt
    jmp 4b
"#,
    options(att_syntax)
);

// AP trampoline: copied to 0x8000 and entered in real mode at 0800:0000 by
// the SIPI. It goes through 32-bit protected mode to long mode using the BSP's
// page tables, then calls virq_rt_ap_entry(cpu) on the stack the BSP left in
// the data words at the end.
global_asm!(
    r#"
    .section .rodata.trampoline, "a"
    .balign 16
    .global virq_trampoline_start
    .global virq_trampoline_end
    .global virq_trampoline_cr3
    .global virq_trampoline_stack
    .global virq_trampoline_cpu
    .code16
virq_trampoline_start:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl 0x8000 + (5f - virq_trampoline_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x18, $(0x8000 + (1f - virq_trampoline_start))

    .code32
1:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x620, %eax
    mov %eax, %cr4
    mov 0x8000 + (virq_trampoline_cr3 - virq_trampoline_start), %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $0xFFFFFFFB, %eax
    or $0x80000003, %eax
    mov %eax, %cr0
    ljmp $0x08, $(0x8000 + (2f - virq_trampoline_start))

    .code64
2:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov 0x8000 + (virq_trampoline_stack - virq_trampoline_start), %rsp
    mov 0x8000 + (virq_trampoline_cpu - virq_trampoline_start), %edi
    movabs $virq_rt_ap_entry, %rax
    call *%rax
3:
    cli
    hlt
    jmp 3b

    .balign 8
4:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00CF9A000000FFFF
5:
    .word 31
    .long 0x8000 + (4b - virq_trampoline_start)
    .balign 8
virq_trampoline_cr3:
    .quad 0
virq_trampoline_stack:
    .quad 0
virq_trampoline_cpu:
    .quad 0
virq_trampoline_end:
"#,
    options(att_syntax)
);

// One 16-byte entry stub per vector: push a dummy error code where the CPU
// does not push one, push the vector, and join the common path, which saves
// the caller-saved and SSE state and calls virq_isr_dispatch(&mut frame).
global_asm!(
    r#"
    .section .text.isr, "ax"
    .code64
    .balign 16
    .global virq_isr_stubs
virq_isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp virq_isr_common
    .set vec, vec + 1
    .endr

virq_isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    mov %rsp, %rdi
    push %rbx
    mov %rsp, %rbx
    and $-16, %rsp
    sub $512, %rsp
    fxsave (%rsp)
    cld
    call virq_isr_dispatch
    fxrstor (%rsp)
    mov %rbx, %rsp
    pop %rbx
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq
"#,
    options(att_syntax)
);

extern "C" {
    static virq_trampoline_start: u8;
    static virq_trampoline_end: u8;
    static virq_trampoline_cr3: u8;
    static virq_trampoline_stack: u8;
    static virq_trampoline_cpu: u8;
    static virq_isr_stubs: u8;
}

/// Address of the entry stub for `vector` (stubs are 16 bytes apart).
pub fn isr_stub(vector: usize) -> u64 {
    // SAFETY: only the address of the assembler symbol is taken.
    let base = core::ptr::addr_of!(virq_isr_stubs) as u64;
    base + 16 * vector as u64
}

/// Copies the AP trampoline to 0x8000 and fills in CR3, the stack top and
/// the CPU index the next AP will use.
pub fn install_trampoline(cr3: u64, stack_top: u64, cpu: u64) {
    // SAFETY: symbols delimit the trampoline bytes in .rodata; 0x8000-0x8FFF
    // is free low memory (identity mapped) that nothing else uses once the
    // multiboot info has been read.
    unsafe {
        let start = core::ptr::addr_of!(virq_trampoline_start);
        let end = core::ptr::addr_of!(virq_trampoline_end);
        let len = end as usize - start as usize;
        let dst = TRAMPOLINE_ADDR as *mut u8;
        for i in 0..len {
            dst.add(i).write_volatile(start.add(i).read());
        }
        let field = |sym: *const u8| dst.add(sym as usize - start as usize) as *mut u64;
        field(core::ptr::addr_of!(virq_trampoline_cr3)).write_volatile(cr3);
        field(core::ptr::addr_of!(virq_trampoline_stack)).write_volatile(stack_top);
        field(core::ptr::addr_of!(virq_trampoline_cpu)).write_volatile(cpu);
    }
}
