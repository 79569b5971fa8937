//! A Debian root filesystem with systemd, for the tests that boot a real systemd as PID 1
//! (`systemd-nspawn -b`): made once with debootstrap from the host's own Debian mirror, under
//! `target/nspawn/`, in the background while the tests build (about a minute and a half of
//! downloads); the tests wait for its `.complete` mark.

use std::{path::PathBuf, process::Command, thread::JoinHandle};

use anyhow::{anyhow, bail, Context as _, Result};

/// Where the root filesystem is, and what the tests read to find it.
pub(crate) const ROOT_ENV: &str = "BINDTRACE_NSPAWN_ROOT";
/// Written last: the tree is whole.
pub(crate) const COMPLETE_MARK: &str = ".complete";

/// The root filesystem's place, and the job making it (none when it is there already).
pub(crate) type Rootfs = (PathBuf, Option<JoinHandle<Result<()>>>);

/// Starts making the root filesystem unless it is there; its path, and the job (`None`:
/// already made).
pub(crate) fn start_rootfs() -> Result<Rootfs> {
    let root = crate::workspace_root().join("target/nspawn/bookworm");
    if root.join(COMPLETE_MARK).exists() {
        return Ok((root, None));
    }
    let (mirror, _) = crate::vm::host_debian_mirrors()?;
    let target = root.clone();
    let job = std::thread::spawn(move || make_rootfs(&target, &mirror));
    Ok((root, Some(job)))
}

fn make_rootfs(root: &std::path::Path, mirror: &str) -> Result<()> {
    let partial = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    if let Some(parent) = partial.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Quiet: it runs beside the tests, whose output matters.
    let made = Command::new("debootstrap")
        .args(["--variant=minbase", "--include=systemd,systemd-sysv,dbus", "bookworm"])
        .arg(&partial)
        .arg(mirror)
        .output()
        .context("running debootstrap (apt-get install debootstrap)")?;
    if !made.status.success() {
        bail!("debootstrap failed: {}", String::from_utf8_lossy(&made.stderr).lines().last().unwrap_or_default());
    }
    let _ = std::fs::remove_dir_all(root);
    std::fs::rename(&partial, root).map_err(|e| anyhow!("moving the root filesystem into place: {e}"))?;
    std::fs::write(root.join(COMPLETE_MARK), "")?;
    Ok(())
}
