//! Result lines on the serial port:
//! `PASS <name>`, `FAIL <name>: expected X, got Y` (or another reason),
//! `SKIP <name>: <reason>`; lines starting with `# ` are informational.

use crate::serial::Line;
use core::sync::atomic::{AtomicBool, Ordering};

static FAILED: AtomicBool = AtomicBool::new(false);

/// Reports a passed check.
pub fn pass(name: &str) {
    Line::new().s("PASS ").s(name).print();
}

/// Starts a `FAIL <name>: ` line for the caller to finish and print.
pub fn fail_line(name: &str) -> Line {
    FAILED.store(true, Ordering::Relaxed);
    let mut l = Line::new();
    l.s("FAIL ").s(name).s(": ");
    l
}

/// Reports a failed check with a reason.
pub fn fail(name: &str, reason: &str) {
    fail_line(name).s(reason).print();
}

/// Reports a skipped check.
pub fn skip(name: &str, reason: &str) {
    Line::new().s("SKIP ").s(name).s(": ").s(reason).print();
}

/// Passes if `got == expected`.
pub fn check_eq(name: &str, expected: u64, got: u64) -> bool {
    let ok = got == expected;
    if ok {
        pass(name);
    } else {
        fail_line(name)
            .s("expected ")
            .u(expected)
            .s(", got ")
            .u(got)
            .print();
    }
    ok
}

/// Passes if `got >= min`.
pub fn check_at_least(name: &str, min: u64, got: u64) -> bool {
    let ok = got >= min;
    if ok {
        pass(name);
    } else {
        fail_line(name)
            .s("expected >= ")
            .u(min)
            .s(", got ")
            .u(got)
            .print();
    }
    ok
}

/// Passes if `got` equals `expected` element by element (a sequence of
/// observations, e.g. counts after each step); the failure line shows both
/// lists in hex.
pub fn check_list(name: &str, expected: &[u64], got: &[u64]) -> bool {
    let ok = got == expected;
    if ok {
        pass(name);
    } else {
        let mut l = fail_line(name);
        l.s("expected [");
        for (i, v) in expected.iter().enumerate() {
            l.s(if i == 0 { "" } else { " " }).x(*v);
        }
        l.s("], got [");
        for (i, v) in got.iter().enumerate() {
            l.s(if i == 0 { "" } else { " " }).x(*v);
        }
        l.s("]").print();
    }
    ok
}

/// Passes if `got == expected` (booleans).
pub fn check_bool(name: &str, expected: bool, got: bool) -> bool {
    let ok = got == expected;
    if ok {
        pass(name);
    } else {
        fail_line(name)
            .s("expected ")
            .b(expected)
            .s(", got ")
            .b(got)
            .print();
    }
    ok
}

/// Whether any check failed so far.
pub fn any_failed() -> bool {
    FAILED.load(Ordering::Relaxed)
}

/// Exits with 0 if every check passed, 1 otherwise.
pub fn finish() -> ! {
    crate::exit(u32::from(any_failed()))
}
