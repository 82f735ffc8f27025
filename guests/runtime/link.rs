//! Build script shared by every guest binary: link it as a freestanding,
//! statically linked image at 1 MiB with the runtime's linker script.

fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/link.ld");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
        "-Wl,-n",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{script}");
    println!("cargo:rerun-if-changed={script}");
    println!("cargo:rerun-if-changed=../runtime/link.rs");
}
