//! The guest's initramfs: busybox, the static binaries and `init.sh`, the script that runs
//! bindtrace against the scenarios and prints each result between `@@` markers.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use super::matrix::BACKENDS;
use crate::{dist::Arch, run, workspace_root};

/// Binds each of the two colliding threads makes in a guest (bind-scenarios' default, which
/// `cargo xtask vm --host` uses, is 20,000). Under TCG 20,000 took 60-80 s a backend on
/// arm64, a third of the guest's time; at 5,000 the two threads still bind at the same time
/// thousands of times, where the old per-slot state lost or doubled a bind at once.
const GUEST_COLLIDE_BINDS: u32 = 5_000;

/// The guest's /init (busybox sh).
const INIT: &str = include_str!("init.sh");

pub(super) fn build_initramfs(
    arch: Arch,
    busybox: &Path,
    bindtrace: &Path,
    scenarios: &Path,
    compat: Option<&Path>,
    loads: [&Path; 2],
) -> Result<PathBuf> {
    let dir = workspace_root().join("target/vm");
    let root = dir.join(format!("initramfs-{}", arch.name));
    let _ = std::fs::remove_dir_all(&root);
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox")).context("copying busybox")?;
    for applet in
        ["sh", "mount", "mkdir", "ip", "cat", "sleep", "kill", "grep", "rm", "poweroff", "echo", "uname", "nc"]
    {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    // Static binaries: nothing else to copy.
    std::fs::copy(bindtrace, root.join("bindtrace")).with_context(|| format!("copying {}", bindtrace.display()))?;
    std::fs::copy(scenarios, root.join("bind-scenarios"))
        .with_context(|| format!("copying {}", scenarios.display()))?;
    if let Some(compat) = compat {
        std::fs::copy(compat, root.join("bind-scenarios-i386"))
            .with_context(|| format!("copying {}", compat.display()))?;
    }
    for (load, name) in loads.into_iter().zip(["syscall-loop", "bind-storm"]) {
        std::fs::copy(load, root.join(name)).with_context(|| format!("copying {}", load.display()))?;
    }
    let init = INIT
        .replace("$BACKENDS", &BACKENDS.join(" "))
        .replace("$PER_THREAD_TRACER_ARGS", &PER_THREAD_TRACER_ARGS.join(" "))
        .replace("$COLLIDE_BINDS", &GUEST_COLLIDE_BINDS.to_string());
    std::fs::write(root.join("init"), init)?;
    std::fs::set_permissions(root.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let image = dir.join(format!("initramfs-{}.cpio", arch.name));
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
        root.display(),
        image.display()
    )))?;
    Ok(image)
}

/// How the colliding threads are traced, here and in the guests.
pub(super) const PER_THREAD_TRACER_ARGS: [&str; 7] =
    ["--no-diagnosis", "--comm", "bind-scenarios", "--ring-buffer-size", "16M", "-o", "ndjson"];
