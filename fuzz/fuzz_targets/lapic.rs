//! Fuzz target: the lapic surface (see virq_surfaces::lapic).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = virq_surfaces::lapic(data);
});
