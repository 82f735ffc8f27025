//! Fuzz target: the routing surface (see virq_surfaces::routing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = virq_surfaces::routing(data);
});
