//! Per-CPU descriptor tables, stacks and interrupt bookkeeping.
//!
//! Every gate uses an IST stack (IST1; IST2 for NMI and #DF): the precompiled
//! `core` uses the red zone, so an interrupt must never push below the
//! interrupted RSP. Handlers run with interrupts disabled and must not nest,
//! except that a vector moved to the nesting stack (IST3, [`allow_nesting`])
//! may interrupt a handler that enabled interrupts.
//!
//! [`try_rdmsr`] and [`try_wrmsr`] report a fault of the MSR access itself
//! (#GP) instead of ending the guest.

use crate::arch::{cli, wrmsr};
use crate::boot::isr_stub;
use crate::lapic;
use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Most CPUs a guest brings up.
pub const MAX_CPUS: usize = 8;

/// GDT selectors (the same layout as the boot and trampoline GDTs).
pub const KERNEL_CS: u16 = 0x08;
/// Data segment selector.
pub const KERNEL_DS: u16 = 0x10;
/// TSS selector.
pub const TSS_SEL: u16 = 0x20;

const MAIN_STACK: usize = 32 * 1024;
const IST1_STACK: usize = 16 * 1024;
const IST2_STACK: usize = 4 * 1024;
const IST3_STACK: usize = 8 * 1024;
const IA32_GS_BASE: u32 = 0xC000_0101;

/// The 64-bit task-state segment (only the stack pointers matter here).
#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

/// Per-CPU data; GS base points here, so `gs:0` is the CPU index.
#[repr(C, align(64))]
struct PerCpu {
    index: u64,
    apic_id: u64,
    gdt: [u64; 7],
    tss: Tss,
}

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            index: 0,
            apic_id: 0,
            gdt: [0; 7],
            tss: Tss {
                _reserved0: 0,
                rsp: [0; 3],
                _reserved1: 0,
                ist: [0; 7],
                _reserved2: 0,
                _reserved3: 0,
                iomap_base: 0,
            },
        }
    }
}

#[repr(C, align(16))]
struct CpuStacks {
    main: [u8; MAIN_STACK],
    ist1: [u8; IST1_STACK],
    ist2: [u8; IST2_STACK],
    ist3: [u8; IST3_STACK],
}

static mut CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];

#[link_section = ".bss.stacks"]
static mut STACKS: [CpuStacks; MAX_CPUS] = [const {
    CpuStacks {
        main: [0; MAIN_STACK],
        ist1: [0; IST1_STACK],
        ist2: [0; IST2_STACK],
        ist3: [0; IST3_STACK],
    }
}; MAX_CPUS];

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

// One IDT shared by all CPUs: its contents are identical everywhere; the
// per-CPU part (the IST stacks) lives in each CPU's TSS.
static mut IDT: Idt = Idt([[0; 2]; 256]);

/// Interrupts taken, per CPU and vector (counted before any handler runs).
static COUNTS: [[AtomicU32; 256]; MAX_CPUS] =
    [const { [const { AtomicU32::new(0) }; 256] }; MAX_CPUS];

/// Registered handlers (`fn(&mut InterruptFrame)` as usize; 0 = none).
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Per CPU: the address of an instruction allowed to fault, and where to
/// resume if it does (0 = none armed).
static FIXUP: [[AtomicU64; 2]; MAX_CPUS] = [const { [const { AtomicU64::new(0) }; 2] }; MAX_CPUS];
/// Per CPU: 1 + the vector of the fault the fixup caught (0 = none).
static FIXUP_FAULT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// What the entry stub saved, in stack order.
#[repr(C)]
#[derive(Debug)]
pub struct InterruptFrame {
    /// Saved caller-saved registers.
    pub r11: u64,
    /// Saved r10.
    pub r10: u64,
    /// Saved r9.
    pub r9: u64,
    /// Saved r8.
    pub r8: u64,
    /// Saved rdi.
    pub rdi: u64,
    /// Saved rsi.
    pub rsi: u64,
    /// Saved rdx.
    pub rdx: u64,
    /// Saved rcx.
    pub rcx: u64,
    /// Saved rax.
    pub rax: u64,
    /// Vector number.
    pub vector: u64,
    /// Error code (0 when the CPU pushes none).
    pub error: u64,
    /// Interrupted RIP.
    pub rip: u64,
    /// Interrupted CS.
    pub cs: u64,
    /// Interrupted RFLAGS.
    pub rflags: u64,
    /// Interrupted RSP.
    pub rsp: u64,
    /// Interrupted SS.
    pub ss: u64,
}

/// An interrupt handler. It runs with interrupts off and must not print.
pub type Handler = fn(&mut InterruptFrame);

/// Vectors whose automatic EOI is left out (bit n of word n / 64).
static NO_AUTO_EOI: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Whether the dispatcher EOIs `vector` after its handler (the default), or
/// leaves it in service: a guest that never EOIs, on purpose.
pub fn set_auto_eoi(vector: u8, on: bool) {
    let (word, bit) = (usize::from(vector) / 64, 1u64 << (vector % 64));
    if on {
        NO_AUTO_EOI[word].fetch_and(!bit, Ordering::AcqRel);
    } else {
        NO_AUTO_EOI[word].fetch_or(bit, Ordering::AcqRel);
    }
}

fn auto_eoi(vector: usize) -> bool {
    NO_AUTO_EOI[vector / 64].load(Ordering::Acquire) & (1 << (vector % 64)) == 0
}

/// Registers `handler` for `vector` (replacing any earlier one).
pub fn set_handler(vector: u8, handler: Handler) {
    HANDLERS[usize::from(vector)].store(handler as usize, Ordering::Release);
}

/// Interrupts taken on `cpu` for `vector`.
pub fn count(cpu: usize, vector: u8) -> u32 {
    COUNTS
        .get(cpu)
        .map_or(0, |c| c[usize::from(vector)].load(Ordering::Acquire))
}

/// Interrupts taken for `vector`, summed over all CPUs.
pub fn total_count(vector: u8) -> u32 {
    (0..MAX_CPUS).map(|cpu| count(cpu, vector)).sum()
}

/// Index of the running CPU (0 = BSP).
pub fn index() -> usize {
    let v: u64;
    // SAFETY: GS base points at this CPU's PerCpu, whose first field is the index.
    unsafe { asm!("mov {}, gs:[0]", out(reg) v, options(nostack, readonly, preserves_flags)) }
    (v as usize).min(MAX_CPUS - 1)
}

/// APIC ID recorded for CPU `cpu`.
pub fn apic_id_of(cpu: usize) -> u32 {
    if cpu >= MAX_CPUS {
        return 0;
    }
    // SAFETY: written once before that CPU starts, read-only afterwards.
    unsafe { (*addr_of!(CPUS))[cpu].apic_id as u32 }
}

/// Records the APIC ID of CPU `cpu` (before it is started).
pub fn set_apic_id(cpu: usize, apic_id: u32) {
    if cpu < MAX_CPUS {
        // SAFETY: done by the BSP before the AP runs.
        unsafe { (*addr_of_mut!(CPUS))[cpu].apic_id = u64::from(apic_id) }
    }
}

/// Top of CPU `cpu`'s main stack (16-byte aligned).
pub fn main_stack_top(cpu: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of!((*addr_of!(STACKS))[cpu].main) as u64 + MAIN_STACK as u64 }
}

fn gate(handler: u64, ist: u64) -> [u64; 2] {
    let low = (handler & 0xFFFF)
        | (u64::from(KERNEL_CS) << 16)
        | (ist << 32)
        | (0x8E << 40) // present, DPL 0, 64-bit interrupt gate
        | (((handler >> 16) & 0xFFFF) << 48);
    [low, handler >> 32]
}

/// Moves `vector`'s gate to the nesting stack (IST3) so it can interrupt a
/// handler running on IST1 that re-enabled interrupts. Its own handler must
/// keep interrupts disabled (a second level would reuse IST3).
pub fn allow_nesting(vector: u8) {
    // SAFETY: a single 16-byte gate is rewritten by the BSP while nothing can
    // deliver `vector` (the caller has not sent it yet).
    unsafe { (*addr_of_mut!(IDT)).0[usize::from(vector)] = gate(isr_stub(vector.into()), 3) }
}

/// Fills the shared IDT (BSP, once).
pub fn build_idt() {
    for v in 0..256 {
        let ist = if v == 2 || v == 8 { 2 } else { 1 };
        // SAFETY: single-threaded boot, before any CPU loads the IDT.
        unsafe { (*addr_of_mut!(IDT)).0[v] = gate(isr_stub(v), ist) }
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Loads this CPU's GDT, TSS, the IDT and GS base. Interrupts stay off.
pub fn init(cpu: usize) {
    cli();
    let cpu = cpu.min(MAX_CPUS - 1);
    // SAFETY: each CPU only touches its own PerCpu and stacks, and does so
    // before anything else can observe them.
    unsafe {
        let c = &mut (*addr_of_mut!(CPUS))[cpu];
        let stacks = addr_of!((*addr_of!(STACKS))[cpu]);
        c.index = cpu as u64;
        c.tss.rsp[0] = addr_of!((*stacks).main) as u64 + MAIN_STACK as u64;
        c.tss.ist[0] = addr_of!((*stacks).ist1) as u64 + IST1_STACK as u64;
        c.tss.ist[1] = addr_of!((*stacks).ist2) as u64 + IST2_STACK as u64;
        c.tss.ist[2] = addr_of!((*stacks).ist3) as u64 + IST3_STACK as u64;
        c.tss.iomap_base = core::mem::size_of::<Tss>() as u16;

        let base = addr_of!(c.tss) as u64;
        let limit = core::mem::size_of::<Tss>() as u64 - 1;
        c.gdt = [
            0,
            0x00AF_9A00_0000_FFFF, // 64-bit code
            0x00CF_9200_0000_FFFF, // data
            0x00CF_9A00_0000_FFFF, // 32-bit code (trampoline layout)
            (limit & 0xFFFF)
                | ((base & 0xFF_FFFF) << 16)
                | (0x89 << 40) // present, available 64-bit TSS
                | (((limit >> 16) & 0xF) << 48)
                | (((base >> 24) & 0xFF) << 56),
            base >> 32,
            0,
        ];
        let gdtr = DescriptorPointer {
            limit: (core::mem::size_of::<[u64; 7]>() - 1) as u16,
            base: addr_of!(c.gdt) as u64,
        };
        let idtr = DescriptorPointer {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: addr_of!(IDT) as u64,
        };
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            "ltr {tss:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cs = in(reg) u64::from(KERNEL_CS),
            ds = in(reg) u32::from(KERNEL_DS),
            tss = in(reg) TSS_SEL,
            tmp = out(reg) _,
        );
        wrmsr(IA32_GS_BASE, c as *const PerCpu as u64);
    }
}

fn fatal_exception(frame: &InterruptFrame) -> ! {
    crate::serial::Line::new()
        .s("\nFAIL exception: vector ")
        .u(frame.vector)
        .s(" error ")
        .x(frame.error)
        .s(" at rip ")
        .x(frame.rip)
        .s(" on cpu ")
        .u(index() as u64)
        .print_unlocked();
    crate::exit(1)
}

/// Called by the common entry stub for every interrupt and exception.
#[no_mangle]
extern "C" fn virq_isr_dispatch(frame: &mut InterruptFrame) {
    let vector = (frame.vector & 0xFF) as usize;
    COUNTS[index()][vector].fetch_add(1, Ordering::AcqRel);
    let handler = HANDLERS[vector].load(Ordering::Acquire);
    if handler != 0 {
        // SAFETY: only `Handler` values are stored in HANDLERS.
        let handler: Handler = unsafe { core::mem::transmute::<usize, Handler>(handler) };
        handler(frame);
    } else if vector < 32 {
        let fixup = &FIXUP[index()];
        let resume = fixup[1].load(Ordering::Acquire);
        if resume != 0 && frame.rip == fixup[0].load(Ordering::Acquire) {
            frame.rip = resume;
            FIXUP_FAULT[index()].store(frame.vector + 1, Ordering::Release);
            return;
        }
        fatal_exception(frame);
    }
    if !auto_eoi(vector) {
        return;
    }
    match vector {
        // Legacy PIC range: acknowledge at the PIC unless spurious.
        0x20..=0x2F => crate::pic::eoi_if_in_service((vector - 0x20) as u8),
        // Spurious LAPIC vector: no EOI.
        0xFF => {}
        // Everything else came through the local APIC.
        0x30.. => lapic::eoi(),
        _ => {}
    }
}

/// A fault raised by an access made through [`try_rdmsr`] / [`try_wrmsr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Exception vector (13 for #GP).
    pub vector: u8,
}

fn fault_taken() -> Result<(), Fault> {
    let cpu = index();
    FIXUP[cpu][1].store(0, Ordering::Release);
    FIXUP[cpu][0].store(0, Ordering::Release);
    match FIXUP_FAULT[cpu].swap(0, Ordering::AcqRel) {
        0 => Ok(()),
        v => Err(Fault {
            vector: (v - 1) as u8,
        }),
    }
}

/// RDMSR that reports a fault (e.g. #GP for an absent register) instead of
/// ending the guest.
pub fn try_rdmsr(msr: u32) -> Result<u64, Fault> {
    let cpu = index();
    FIXUP_FAULT[cpu].store(0, Ordering::Release);
    let (lo, hi): (u32, u32);
    // SAFETY: the fixup slots are this CPU's own; a fault of the RDMSR
    // resumes at the label after it with EAX/EDX zeroed beforehand.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov [{slot}], {t}",
            "lea {t}, [rip + 3f]",
            "mov [{slot} + 8], {t}",
            "xor eax, eax",
            "xor edx, edx",
            "2:",
            "rdmsr",
            "3:",
            slot = in(reg) FIXUP[cpu].as_ptr(),
            t = out(reg) _,
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            options(nostack),
        )
    }
    fault_taken().map(|()| (u64::from(hi) << 32) | u64::from(lo))
}

/// WRMSR that reports a fault (e.g. #GP for a read-only register) instead of
/// ending the guest.
pub fn try_wrmsr(msr: u32, value: u64) -> Result<(), Fault> {
    let cpu = index();
    FIXUP_FAULT[cpu].store(0, Ordering::Release);
    // SAFETY: as for try_rdmsr.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov [{slot}], {t}",
            "lea {t}, [rip + 3f]",
            "mov [{slot} + 8], {t}",
            "2:",
            "wrmsr",
            "3:",
            slot = in(reg) FIXUP[cpu].as_ptr(),
            t = out(reg) _,
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack),
        )
    }
    fault_taken()
}
