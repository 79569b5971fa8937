//! Builds the eBPF probe (nightly, `-Z build-std=core`, bpfel-unknown-none, bpf-linker, debug
//! info and BTF kept) and leaves it in OUT_DIR, where `src/probe/mod.rs` embeds it: the
//! `bindtrace` binary is the only file a user copies to a host.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

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
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    // aya-build builds in a target dir under OUT_DIR, which every build of the tracer has its
    // own of (clippy's, the tests', each release target's): each built the whole probe again,
    // `core` included (23-32 s each in a CI log). Given one directory per architecture in the
    // workspace's target dir instead, its cargo finds the work done (and redoes what changed).
    let shared = shared_probe_dir(&out_dir, &arch);
    std::fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    // One thread here: aya-build reads OUT_DIR once, and it is put back before anything else.
    std::env::set_var("OUT_DIR", &shared);
    let built = aya_build::build_ebpf(
        [aya_build::Package { name: PROBE_PACKAGE, root_dir, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    );
    std::env::set_var("OUT_DIR", &out_dir);
    built.with_context(|| format!("building the eBPF probe failed; if a tool is missing, {SETUP_HINT}"))?;
    let (from, to) = (shared.join(PROBE_PACKAGE), out_dir.join(PROBE_PACKAGE));
    std::fs::copy(&from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// `TARGET/probe/ARCH`: TARGET is the cargo target dir OUT_DIR is in (the ancestor cargo marks
/// with CACHEDIR.TAG); without one, OUT_DIR itself (nothing shared).
fn shared_probe_dir(out_dir: &Path, arch: &str) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map_or_else(|| out_dir.to_path_buf(), |target| target.join("probe").join(arch))
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
