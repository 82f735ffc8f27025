//! Fuzz target: the ports surface (see virq_surfaces::ports).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = virq_surfaces::ports(data);
});
