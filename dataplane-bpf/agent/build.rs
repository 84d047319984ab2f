//! Builds the eBPF programs (`dataplane-bpf/ebpf`) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, into OUT_DIR, where `src/loader.rs` embeds them.
//!
//! `sluice serve` needs no eBPF, so a machine without that toolchain still builds everything:
//! the programs are left out with a `cargo:warning`, and `sluice agent` then refuses to start
//! with the same message (`SLUICE_EBPF_MISSING`). `SLUICE_REQUIRE_EBPF=1` (set by `./test`)
//! makes a missing toolchain an error instead.

use std::path::{Path, PathBuf};
use std::process::Command;

/// How to install what is missing; shown by the warning and by `sluice agent`.
const INSTALL: &str = "rustup component add rust-src --toolchain nightly; apt-get install -y llvm-22-dev; \
     LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker@0.13.0 --no-default-features --features llvm-22 \
     (./test installs all of it)";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sluice_ebpf_missing)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=SLUICE_REQUIRE_EBPF");
    // Installing bpf-linker (cargo install) changes this directory: build the programs then.
    if let Some(bin) = cargo_bin() {
        println!("cargo::rerun-if-changed={}", bin.display());
    }
    if let Some(missing) = missing_toolchain() {
        let message =
            format!("eBPF programs not built: {missing}. `sluice serve` works; `sluice agent` needs them: {INSTALL}");
        if std::env::var_os("SLUICE_REQUIRE_EBPF").is_some_and(|v| v == "1") {
            panic!("{message}");
        }
        println!("cargo::warning={message}");
        println!("cargo::rustc-cfg=sluice_ebpf_missing");
        println!("cargo::rustc-env=SLUICE_EBPF_MISSING={message}");
        return;
    }
    let package = aya_build::Package { name: "sluice-ebpf", root_dir: "../ebpf", ..Default::default() };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Nightly) {
        panic!("building the eBPF programs failed: {e:#}\nthe toolchain: {INSTALL}");
    }
}

/// What of the eBPF toolchain is absent, if anything.
fn missing_toolchain() -> Option<String> {
    let mut missing = Vec::new();
    if find_on_path("bpf-linker").is_none() {
        missing.push("bpf-linker is not on PATH");
    }
    let src = Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]).output();
    match src {
        Ok(out) if out.status.success() => {
            if !String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")) {
                missing.push("the nightly toolchain has no rust-src");
            }
        }
        _ => missing.push("rustup has no nightly toolchain"),
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$CARGO_HOME/bin`, where `cargo install` puts bpf-linker.
fn cargo_bin() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin")).filter(|b| b.is_dir())
}
