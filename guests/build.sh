#!/bin/sh
# Builds every guest image into guests/out/: NAME.elf (ELF64, as linked) and
# NAME.elf32 (the same image as ELF32, which QEMU's multiboot loader needs).
set -eu
cd "$(dirname "$0")"
cargo build --release
mkdir -p out
for dir in */src/main.rs; do
    bin=${dir%%/*}
    cp "target/x86_64-unknown-linux-gnu/release/$bin" "out/$bin.elf"
    "${OBJCOPY:-objcopy}" -O elf32-i386 "out/$bin.elf" "out/$bin.elf32"
    echo "out/$bin.elf32"
done
