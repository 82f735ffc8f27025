//! What the VMM's integration tests share.

/// True if /dev/kvm can be opened. Otherwise panics when VIRQ_REQUIRE_KVM=1
/// (CI and the project's machines, where KVM must be there), or prints a
/// loud skip notice and returns false.
pub fn kvm_or_skip() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("VIRQ_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("/dev/kvm not available but VIRQ_REQUIRE_KVM=1");
        }
        eprintln!("SKIPPED: /dev/kvm not available");
    }
    ok
}
