//! Builds the bare-metal guests (their own cargo workspace under `guests/`)
//! and leaves every guest image at `$OUT_DIR/<name>-guest.elf` in ELF32 form,
//! the very bytes QEMU's multiboot loader runs too. A guest is a directory of
//! guests/ with a `src/main.rs`; the binary embedded by `virq demo` is
//! `demo-guest.elf`, and the tests run the others from the same place.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Variables the outer cargo sets that would reconfigure the nested build
/// (flags for the host crates, a wrapper such as clippy-driver, another
/// target directory or target, the outer jobserver).
const CLEARED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guests = manifest_dir.join("../../guests");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("guests-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));

    // Run from guests/ so its .cargo/config.toml (target, rustflags) applies.
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guests)
        .args(["build", "--release", "--offline", "--manifest-path"])
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for var in CLEARED_ENV {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PROFILE_") || key.starts_with("CARGO_TARGET_") {
            cmd.env_remove(key.as_ref());
        }
    }
    run(&mut cmd, "building the guests");

    let objcopy = env::var_os("OBJCOPY").unwrap_or_else(|| OsString::from("objcopy"));
    for name in guest_binaries(&guests) {
        let elf64 = target_dir
            .join("x86_64-unknown-linux-gnu/release")
            .join(&name);
        let mut cmd = Command::new(&objcopy);
        cmd.args(["-O", "elf32-i386"])
            .arg(&elf64)
            .arg(out_dir.join(format!("{name}-guest.elf")));
        run(&mut cmd, "converting a guest to ELF32");
    }

    println!("cargo:rerun-if-env-changed=OBJCOPY");
    rerun_if_guests_change(&guests);
}

/// The guest programs: directories of guests/ with a `src/main.rs`.
fn guest_binaries(guests: &Path) -> Vec<String> {
    let entries = match std::fs::read_dir(guests) {
        Ok(entries) => entries,
        Err(e) => fail(format_args!("reading {}: {e}", guests.display())),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join("src/main.rs").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Runs `cmd`; on failure stops the build with its full output.
fn run(cmd: &mut Command, what: &str) {
    let output = match cmd.output() {
        Ok(output) => output,
        Err(e) => fail(format_args!("{what}: could not run {cmd:?}: {e}")),
    };
    if !output.status.success() {
        fail(format_args!(
            "{what} failed ({}): {cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
}

/// Ends the build script with `message` (cargo shows it and stops the build).
fn fail(message: std::fmt::Arguments) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

/// Watches the guest sources, leaving out build outputs (guests/target,
/// guests/out) so building the guests by hand does not rerun this script.
fn rerun_if_guests_change(guests: &Path) {
    let entries = match std::fs::read_dir(guests) {
        Ok(entries) => entries,
        Err(e) => fail(format_args!("reading {}: {e}", guests.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name == "target" || name == "out" {
            continue;
        }
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}
