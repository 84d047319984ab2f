//! Builds the eBPF programs (`dataplane-bpf/ebpf`) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, into OUT_DIR, where `src/loader.rs` embeds them.

fn main() {
    let package = aya_build::Package { name: "sluice-ebpf", root_dir: "../ebpf", ..Default::default() };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Nightly) {
        panic!(
            "building the eBPF programs failed: {e:#}\n\
             needs: rustup toolchain nightly with rust-src, and bpf-linker \
             (LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker@0.13.0 --no-default-features --features llvm-22); \
             .ci/run installs both"
        );
    }
}
