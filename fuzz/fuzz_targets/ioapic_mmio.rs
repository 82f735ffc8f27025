//! Fuzz target: the ioapic_mmio surface (see virq_surfaces::ioapic_mmio).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = virq_surfaces::ioapic_mmio(data);
});
