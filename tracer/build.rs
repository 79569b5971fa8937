//! Builds the eBPF probe (nightly, `-Z build-std=core`, bpfel-unknown-none, bpf-linker, debug
//! info and BTF kept) and leaves it in OUT_DIR, where `src/probe/mod.rs` embeds it: the
//! `bindtrace` binary is the only file a user copies to a host.
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

const PROBE_PACKAGE: &str = "bindtrace-probe";
const SETUP_HINT: &str = "run `cargo xtask setup` (installs rust-src for nightly, LLVM and bpf-linker)";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let probe_dir = manifest_dir.join("..").join("probe-ebpf");
    let common_dir = manifest_dir.join("..").join("common");
    println!("cargo:rerun-if-changed={}", probe_dir.display());
    println!("cargo:rerun-if-changed={}", common_dir.display());

    check_toolchain()?;
    let root_dir = probe_dir.to_str().context("probe path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: PROBE_PACKAGE, root_dir, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .with_context(|| format!("building the eBPF probe failed; if a tool is missing, {SETUP_HINT}"))
}

/// Fails with one line naming what to install, instead of a page of nested cargo output.
fn check_toolchain() -> anyhow::Result<()> {
    let has =
        |program: &str, args: &[&str]| Command::new(program).args(args).output().is_ok_and(|out| out.status.success());
    if !has("bpf-linker", &["--version"]) {
        bail!("bpf-linker is not installed: {SETUP_HINT}");
    }
    let rust_src = Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]).output();
    match rust_src {
        Ok(out) if out.status.success() => {
            if !String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")) {
                bail!("the nightly toolchain has no rust-src: {SETUP_HINT}");
            }
        }
        _ => bail!("no nightly Rust toolchain: {SETUP_HINT}"),
    }
    Ok(())
}
