//! Idempotent installation of the eBPF toolchain on a Debian machine (as root):
//! rust-src for nightly, then bpf-linker built against the Debian LLVM whose major version
//! equals the one nightly rustc was built with (the linker reads rustc's bitcode, so the
//! two must agree). Each step is skipped when already satisfied.

use std::process::Command;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{describe, run};

const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";

/// Runs a command and returns its stdout; fails with its stderr.
pub(crate) fn output(command: &mut Command) -> Result<String> {
    let out = command.output().with_context(|| format!("cannot run {}", describe(command)))?;
    if !out.status.success() {
        bail!("{} failed: {}", describe(command), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The LLVM major version in `rustc -vV` output ("LLVM version: 22.1.4").
fn llvm_major_of_rustc(verbose_version: &str) -> Option<u32> {
    verbose_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.trim().parse().ok())
}

/// The LLVM major version a dynamically linked bpf-linker loads ("libLLVM.so.22.1" or
/// "libLLVM-22.so" in `ldd` output); `None` when it cannot be told.
fn llvm_major_of_linker(ldd: &str) -> Option<u32> {
    ldd.lines().find_map(|line| {
        let name = line.split_whitespace().next()?;
        let digits = name
            .strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-").and_then(|r| r.strip_suffix(".so")))?;
        digits.split('.').next()?.parse().ok()
    })
}

fn ensure_nightly_with_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF probe")?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])).context(
            "no nightly toolchain and installing one failed: install it with `rustup toolchain install nightly`",
        )?;
    }
    let components = output(Command::new("rustup").args(["component", "list", "--toolchain", NIGHTLY, "--installed"]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    Ok(())
}

fn bpf_linker_llvm_major() -> Option<Option<u32>> {
    let path = output(Command::new("sh").args(["-c", "command -v bpf-linker"])).ok()?;
    let path = path.trim();
    if path.is_empty() || !Command::new(path).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return None;
    }
    Some(output(Command::new("ldd").arg(path)).ok().and_then(|ldd| llvm_major_of_linker(&ldd)))
}

/// Installs the Debian packages that dpkg does not list as installed.
pub(crate) fn apt_install(packages: &[String]) -> Result<()> {
    let missing: Vec<&String> = packages
        .iter()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // Another install may hold dpkg's lock (xtask test installs beside the builds): wait.
    let lock_wait = ["-o", "DPkg::Lock::Timeout=600"];
    run(Command::new("apt-get").args(lock_wait).args(["update", "-qq"]))
        .map_err(|e| anyhow!("{e:#}; install them by hand: apt-get install {}", packages.join(" ")))?;
    run(Command::new("apt-get")
        .args(lock_wait)
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing.iter().map(|s| s.as_str()))
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .map_err(|e| anyhow!("{e:#}; install them by hand: apt-get install {}", packages.join(" ")))
}

fn ensure_bpf_linker() -> Result<()> {
    let version = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let llvm =
        llvm_major_of_rustc(&version).ok_or_else(|| anyhow!("cannot find the LLVM version in `rustc +nightly -vV`"))?;
    match bpf_linker_llvm_major() {
        Some(Some(linked)) if linked == llvm => return Ok(()),
        Some(None) => return Ok(()), // statically linked: trust it; a mismatch fails loudly at link time
        Some(Some(linked)) => {
            eprintln!("xtask: bpf-linker uses LLVM {linked}, nightly rustc LLVM {llvm}: rebuilding it")
        }
        None => eprintln!("xtask: bpf-linker is missing: building it against LLVM {llvm}"),
    }
    apt_install(&[format!("llvm-{llvm}-dev"), format!("libpolly-{llvm}-dev"), "libzstd-dev".to_owned()])?;
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{llvm}"))
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")))
}

/// containerd-client generates its gRPC bindings at build time with protoc.
fn ensure_protoc() -> Result<()> {
    if Command::new("protoc").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    apt_install(&["protobuf-compiler".to_owned()])
}

pub(crate) fn ensure() -> Result<()> {
    ensure_nightly_with_rust_src()?;
    ensure_protoc()?;
    ensure_bpf_linker()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major_of_rustc() {
        let text = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major_of_rustc(text), Some(22));
        assert_eq!(llvm_major_of_rustc("no llvm here"), None);
    }

    #[test]
    fn reads_llvm_major_of_linker() {
        let ldd = "\tlinux-vdso.so.1 (0x0000)\n\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f)\n";
        assert_eq!(llvm_major_of_linker(ldd), Some(22));
        assert_eq!(llvm_major_of_linker("\tlibLLVM-19.so => /usr/lib/x (0x1)\n"), Some(19));
        assert_eq!(llvm_major_of_linker("\tlibc.so.6 => /lib/libc.so.6\n"), None);
    }
}
