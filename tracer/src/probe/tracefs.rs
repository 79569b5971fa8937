//! tracefs for aya's tracepoint attach and for the tree's record offsets: the host's when it is
//! mounted, otherwise a private mount on the attaching thread.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};

const TRACEFS: &str = "/sys/kernel/tracing";

/// Where tracefs is, as aya looks for it.
enum Tracefs {
    /// Mounted and readable: aya finds it.
    Readable,
    /// Mounted, but its mode (0700) keeps bindtrace out.
    Unreadable,
    /// Not mounted anywhere aya looks.
    Missing,
}

fn tracefs_state() -> Tracefs {
    let populated = |path: &str| Path::new(path).read_dir().map(|mut d| d.next().is_some());
    match populated(TRACEFS) {
        Ok(true) => Tracefs::Readable,
        _ if Path::new("/sys/kernel/debug/tracing/events").exists() => Tracefs::Readable,
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => Tracefs::Unreadable,
        _ => Tracefs::Missing,
    }
}

/// Runs `attach` where aya can read tracepoint ids from tracefs. When the host has not
/// mounted it, the work runs on a thread of its own that takes a private mount namespace
/// (`unshare(CLONE_NEWNS)`, this thread only), stops propagation to the host and mounts
/// tracefs there: no other process ever sees the mount, and it is gone when the thread ends,
/// so bindtrace leaves no mount behind and parallel runs cannot unmount each other's.
pub(super) fn with_tracefs<T: Send>(attach: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    use nix::mount::{mount, MsFlags};
    match tracefs_state() {
        Tracefs::Readable => return attach(),
        Tracefs::Unreadable => bail!(
            "tracefs on {TRACEFS} is not readable (mode 0700): the tracepoint backend needs CAP_DAC_READ_SEARCH \
             besides CAP_BPF and CAP_PERFMON (or run it as root)"
        ),
        Tracefs::Missing => {}
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                    .and_then(|()| {
                        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
                    })
                    .and_then(|()| mount(Some("nodev"), TRACEFS, Some("tracefs"), MsFlags::empty(), None::<&str>))
                    .with_context(|| {
                        format!(
                            "tracefs is not mounted and bindtrace cannot mount it (that needs CAP_SYS_ADMIN): \
                             mount it with `mount -t tracefs nodev {TRACEFS}`"
                        )
                    })?;
                log::debug!("tracefs mounted on {TRACEFS} in a mount namespace private to the attaching thread");
                attach()
            })
            .join()
            .map_err(|_| anyhow!("the thread attaching the tracepoints panicked"))?
    })
}

/// A file of tracefs (`events/sched/sched_process_fork/format`), mounted privately for the
/// read when the host has not mounted it (see [`with_tracefs`]).
pub(crate) fn read_tracefs(relative: &str) -> Result<String> {
    with_tracefs(|| {
        let mut last = None;
        for root in [TRACEFS, "/sys/kernel/debug/tracing"] {
            match std::fs::read_to_string(Path::new(root).join(relative)) {
                Ok(text) => return Ok(text),
                Err(err) => last = Some(format!("{root}/{relative}: {err}")),
            }
        }
        bail!("cannot read {}", last.unwrap_or_default())
    })
}
