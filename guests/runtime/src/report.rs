//! Result lines on the serial port:
//! `PASS <name>`, `FAIL <name>: <details>`, `SKIP <name>: <reason>`;
//! lines starting with `# ` are informational.

use crate::println;
use core::fmt::{Debug, Display};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

static FAILED: AtomicBool = AtomicBool::new(false);
static PASSED: AtomicU32 = AtomicU32::new(0);

/// Reports a passed check.
pub fn pass(name: &str) {
    PASSED.fetch_add(1, Ordering::Relaxed);
    println!("PASS {name}");
}

/// Reports a failed check.
pub fn fail(name: &str, details: impl Display) {
    FAILED.store(true, Ordering::Relaxed);
    println!("FAIL {name}: {details}");
}

/// Reports a skipped check.
pub fn skip(name: &str, reason: impl Display) {
    println!("SKIP {name}: {reason}");
}

/// Passes if `cond`, otherwise fails with `expected X, got Y`.
pub fn check(name: &str, cond: bool, expected: impl Debug, got: impl Debug) -> bool {
    if cond {
        pass(name);
    } else {
        fail(name, format_args!("expected {expected:?}, got {got:?}"));
    }
    cond
}

/// Passes if `got == expected`.
pub fn check_eq<T: PartialEq + Debug>(name: &str, expected: T, got: T) -> bool {
    let ok = expected == got;
    check(name, ok, expected, got)
}

/// Whether any check failed so far.
pub fn any_failed() -> bool {
    FAILED.load(Ordering::Relaxed)
}

/// Exits with 0 if every check passed, 1 otherwise.
pub fn finish() -> ! {
    crate::exit(u32::from(any_failed()))
}
