//! Booting one guest under QEMU (TCG) and taking its serial console.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{
    describe,
    dist::{Arch, AARCH64},
};

/// `costs`: the guest also measures what tracing costs (see the init), which takes a minute
/// or more under TCG, so only the newest kernel of each architecture does.
pub(super) fn boot(arch: Arch, kernel: &Path, initramfs: &Path, costs: bool) -> Result<String> {
    let mut command = Command::new("timeout");
    command.arg("900");
    if arch == AARCH64 {
        command.args(["qemu-system-aarch64", "-M", "virt", "-cpu", "max", "-accel", "tcg"]);
    } else {
        command.args(["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max"]);
    }
    let console = if arch == AARCH64 { "ttyAMA0" } else { "ttyS0" };
    command
        .args(["-m", "1024", "-smp", "2", "-nographic", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &format!("console={console} quiet panic=-1{}", if costs { " bindtrace.costs" } else { "" })])
        .stdin(Stdio::null());
    eprintln!("xtask: $ {}", describe(&command));
    let out = command.output().context("starting qemu")?;
    Ok(String::from_utf8_lossy(&out.stdout).replace('\r', ""))
}
