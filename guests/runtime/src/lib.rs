//! Runtime shared by the virq bare-metal test guests: multiboot entry and
//! long mode, descriptor tables and interrupt dispatch, serial output, exit,
//! firmware-table discovery, PIC/PIT/IOAPIC/LAPIC drivers, TSC calibration,
//! SMP start-up and the pc-testdev / isa-debug-exit test devices.
//!
//! A guest binary is `#![no_std] #![no_main]`, depends on this crate and
//! names its entry with [`entry!`]; it receives the [`Boot`] record with
//! interrupts disabled, the BSP's LAPIC enabled, the PIC masked and every
//! IOAPIC pin masked.
#![no_std]
#![deny(missing_docs)]

pub mod arch;
pub mod boot;
pub mod cpu;
pub mod ioapic;
pub mod lapic;
pub mod mem;
pub mod msi;
pub mod multiboot;
pub mod pic;
pub mod pit;
pub mod platform;
pub mod report;
pub mod ring;
pub mod serial;
pub mod smp;
pub mod time;

use core::ptr::{addr_of, addr_of_mut};

/// isa-debug-exit port: the VMM exits with status `(value << 1) | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// First pc-testdev IRQ-line port: a byte write to `0x2000 + n` sets GSI n's level.
pub const TESTDEV_IRQ_PORT: u16 = 0x2000;

/// Exits the VM through isa-debug-exit (0 = all passed); halts forever if
/// the device is missing.
pub fn exit(code: u32) -> ! {
    arch::outl(DEBUG_EXIT_PORT, code);
    loop {
        arch::cli();
        // SAFETY: halting with interrupts off just stops this CPU.
        unsafe { core::arch::asm!("hlt") };
    }
}

/// Sets (true) or clears the level of pc-testdev IRQ line `gsi`.
pub fn testdev_set_irq(gsi: u8, level: bool) {
    arch::outb(TESTDEV_IRQ_PORT + u16::from(gsi), u8::from(level));
}

/// What the runtime found at boot.
#[derive(Clone, Copy, Debug)]
pub struct Boot {
    /// Copied multiboot information (command line).
    pub multiboot: multiboot::MultibootInfo,
    /// Firmware-table view of the machine.
    pub platform: platform::Platform,
    /// The BSP's APIC ID.
    pub bsp_apic_id: u32,
    /// Timer calibration.
    pub calibration: time::Calibration,
    /// The first IOAPIC.
    pub ioapic: ioapic::IoApic,
}

static mut BOOT: Boot = Boot {
    multiboot: multiboot::MultibootInfo::empty(),
    platform: platform::Platform::empty(),
    bsp_apic_id: 0,
    calibration: time::Calibration {
        tsc_per_ms: 0,
        lapic_ticks_per_ms: 0,
        ok: false,
    },
    ioapic: ioapic::IoApic { base: 0xFEC0_0000 },
};

extern "Rust" {
    fn virq_guest_main(boot: &'static Boot) -> !;
}

/// Names the guest's entry function, `fn(&'static Boot) -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        fn virq_guest_main(boot: &'static $crate::Boot) -> ! {
            $main(boot)
        }
    };
}

/// Rust entry of the BSP, called by the 32-bit boot code in long mode.
#[no_mangle]
extern "C" fn virq_rt_bsp_entry(magic: u32, info: u32) -> ! {
    cpu::build_idt();
    cpu::init(0);
    serial::init();
    // Before anything touches low memory.
    let multiboot = multiboot::MultibootInfo::read(magic, info);
    pic::init();
    lapic::set_mode(multiboot.has_option("x2apic") && lapic::x2apic_supported());
    lapic::enable();
    let bsp_apic_id = lapic::id();
    cpu::set_apic_id(0, bsp_apic_id);
    let platform = platform::discover();
    let ioapic = ioapic::IoApic {
        base: platform.ioapic_addr as usize,
    };
    ioapic.mask_all();
    let calibration = time::calibrate();
    // SAFETY: single-threaded; BOOT is only read after this point.
    let boot: &'static Boot = unsafe {
        *addr_of_mut!(BOOT) = Boot {
            multiboot,
            platform,
            bsp_apic_id,
            calibration,
            ioapic,
        };
        &*addr_of!(BOOT)
    };
    // SAFETY: the guest binary defines this symbol through `entry!`.
    unsafe { virq_guest_main(boot) }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = serial::Line::new();
    l.s("\nFAIL panic: ");
    if let Some(msg) = info.message().as_str() {
        l.s(msg);
    }
    if let Some(loc) = info.location() {
        l.s(" at ").s(loc.file()).s(":").u(u64::from(loc.line()));
    }
    l.print_unlocked();
    exit(1)
}
