//! AF_UNIX: what is at a path, as the failing process sees it (in its mount namespace, with
//! `openat2(RESOLVE_IN_ROOT)`), and the sockets bound to a name.

use super::OwnersSeen;
use crate::decode::UnixPath;
use crate::host::{
    owners::{in_own_pid_namespace, ProcessInfo},
    unixdiag::UnixSocket,
};

/// What is at a unix socket's path, as the failing process would see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum UnixFile {
    /// An abstract name or autobind: no file is involved.
    NoFile,
    /// Nothing is there now.
    Missing,
    /// Something that is not a socket (`kind`: "regular file", "directory", ...).
    NotSocket { kind: &'static str },
    /// A socket file.
    Socket { ino: u64, dev: u64, uid: u32, mtime_s: i64 },
    /// It could not be looked at (why).
    Unreadable(String),
}

/// A bound AF_UNIX socket and the processes that have it open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UnixHolder {
    pub socket: UnixSocket,
    pub processes: Vec<ProcessInfo>,
    pub owners: OwnersSeen,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UnixFacts {
    /// The path the lookup was for (the key holds only its hash).
    pub path: UnixPath,
    /// Where the file was looked for (`/proc/PID/root/...`, `/proc/PID/cwd/...`).
    pub looked_at: Option<String>,
    pub file: UnixFile,
    /// Sockets bound to that file (or abstract name).
    pub holders: Vec<UnixHolder>,
    /// Network namespaces whose sockets were searched, and those that could not be.
    pub namespaces_searched: usize,
    pub namespaces_unsearchable: usize,
}

pub(super) fn mount_namespace_of(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{pid}/ns/mnt")).ok().map(|m| m.ino())
}

/// A live process whose files are seen as in mount namespace `mnt_ns`: bindtrace itself when
/// it shares it (the host's, usually), else the first process found in it.
pub(super) fn process_in_mount_namespace(mnt_ns: u32) -> Option<String> {
    let wanted = u64::from(mnt_ns);
    if mount_namespace_of("self") == Some(wanted) {
        return Some(std::process::id().to_string());
    }
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .find(|pid| mount_namespace_of(pid) == Some(wanted))
}

/// The file at `path` as process `pid` sees it: resolved inside its root
/// (`/proc/PID/root`, with `openat2(RESOLVE_IN_ROOT)`, so that absolute symlinks on the way
/// such as `/var/run -> /run` stay in the process's view), a relative path from its working
/// directory. The last component is not followed: bind() refuses a symlink as it refuses any
/// existing file. A process that exited at once (a crash at start) is looked through another
/// process of the mount namespace the probe recorded, `mnt_ns`. When no view of its files is
/// left, the file is not called missing.
pub(super) fn unix_file(pid: u32, mnt_ns: u32, path: &UnixPath) -> (UnixFile, Option<String>) {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let Some(file) = path.filesystem_path() else {
        return (UnixFile::NoFile, None);
    };
    if in_own_pid_namespace() {
        return (
            UnixFile::Unreadable(format!(
                "{}: bindtrace runs in its own PID namespace and cannot see the process's files",
                file.display()
            )),
            None,
        );
    }
    let own_pid = pid.to_string();
    // The process itself while it lives (and is still the one that failed: its mount
    // namespace is the recorded one), else a stand-in sharing its mount namespace.
    let alive = match mount_namespace_of(&own_pid) {
        Some(ns) => mnt_ns == 0 || ns == u64::from(mnt_ns),
        None => false,
    };
    let viewer = if alive {
        own_pid.clone()
    } else if mnt_ns == 0 {
        return (
            UnixFile::Unreadable(format!("{}: pid {pid} exited before its files could be looked at", file.display())),
            None,
        );
    } else if !file.is_absolute() {
        return (
            UnixFile::Unreadable(format!(
                "{}: a relative path, and pid {pid} exited: its working directory is not known",
                file.display()
            )),
            None,
        );
    } else {
        match process_in_mount_namespace(mnt_ns) {
            Some(viewer) => viewer,
            None => {
                return (
                    UnixFile::Unreadable(format!(
                        "{}: pid {pid} exited, and no process is left in its mount namespace (mnt:[{mnt_ns}])",
                        file.display()
                    )),
                    None,
                )
            }
        }
    };
    let in_root = if file.is_absolute() {
        file.clone()
    } else {
        match std::fs::read_link(format!("/proc/{viewer}/cwd")) {
            Ok(cwd) => cwd.join(&file),
            Err(err) => {
                return (
                    UnixFile::Unreadable(format!(
                        "{}: a relative path, and the working directory of pid {pid} cannot be read ({err})",
                        file.display()
                    )),
                    None,
                )
            }
        }
    };
    let shown = format!("/proc/{viewer}/root{}", in_root.display());
    let metadata = std::fs::File::open(format!("/proc/{viewer}/root"))
        .and_then(|root| {
            use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT);
            let fd = openat2(&root, in_root.as_path(), how).map_err(std::io::Error::from)?;
            std::fs::File::from(fd).metadata()
        })
        .map_err(|err| (err.kind(), err));
    let state = match metadata {
        Ok(meta) if meta.file_type().is_socket() => {
            UnixFile::Socket { ino: meta.ino(), dev: meta.dev(), uid: meta.uid(), mtime_s: meta.mtime() }
        }
        Ok(meta) => UnixFile::NotSocket {
            kind: match meta.file_type() {
                t if t.is_dir() => "directory",
                t if t.is_symlink() => "symbolic link",
                t if t.is_fifo() => "FIFO",
                t if t.is_block_device() || t.is_char_device() => "device",
                _ => "regular file",
            },
        },
        // Missing only when the process's own root could be entered and the path was not
        // there: a stand-in may see another root (a chroot of the exited process's own).
        Err((std::io::ErrorKind::NotFound, _)) if viewer != own_pid => UnixFile::Unreadable(format!(
            "{shown}: not there for pid {viewer}, which shares the mount namespace of pid {pid} (exited); a root of \
             its own (chroot) would not be seen"
        )),
        Err((std::io::ErrorKind::NotFound, _)) if std::path::Path::new(&format!("/proc/{viewer}")).exists() => {
            UnixFile::Missing
        }
        Err((_, err)) => UnixFile::Unreadable(format!("{shown}: {err}")),
    };
    (state, Some(shown))
}
