//! Network namespaces by inode: find one (from the failing process, `ip netns` names, or
//! any process inside it) and run work inside it.
//!
//! Sockets, sysctls under /proc/sys/net and interface addresses are all per network
//! namespace, and the namespace that matters is the failing socket's, not bindtrace's. A
//! thread can switch namespaces with setns(2) without affecting the others, so each foreign
//! lookup runs on a short-lived thread that joins the namespace first.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{anyhow, Context as _, Result};
use nix::sched::{setns, CloneFlags};

use super::owners::{in_own_pid_namespace, Blind};

/// A network namespace bindtrace can enter.
#[derive(Debug)]
pub(crate) enum Netns {
    /// bindtrace's own: work runs on the calling thread.
    Own,
    /// An open `/proc/PID/ns/net` or `/run/netns/NAME`.
    Foreign { inode: u64, file: File, path: PathBuf },
}

fn inode_of(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Is this an nsfs file (`/proc/PID/ns/net`, a `/run/netns` bind mount)? Anything else
/// would only fail later, at setns(2), and look like "nothing holds the port".
fn is_namespace_file(file: &File) -> bool {
    use std::os::fd::AsRawFd as _;
    /// `NSFS_MAGIC` from linux/magic.h.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    // SAFETY: statfs is plain data (integers), for which all zeroes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call, and fstatfs writes only into `stat`.
    (unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) } == 0) && stat.f_type as i64 == NSFS_MAGIC
}

/// Is this namespace file a network namespace's (not a mount or pid namespace's)? Asked with
/// `NS_GET_NSTYPE` (4.11); a kernel without it is trusted, as setns then checks.
fn is_network_namespace(file: &File) -> bool {
    use std::os::fd::AsRawFd as _;
    /// `NS_GET_NSTYPE`, `_IO(0xb7, 0x3)` in linux/nsfs.h.
    const NS_GET_NSTYPE: libc::Ioctl = 0xb703;
    // SAFETY: an ioctl without an argument on an open fd.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    kind < 0 || kind == libc::CLONE_NEWNET
}

/// Inode of bindtrace's own network namespace.
pub(crate) fn own_inode() -> Option<u64> {
    static OWN: OnceLock<Option<u64>> = OnceLock::new();
    *OWN.get_or_init(|| inode_of(Path::new("/proc/self/ns/net")))
}

impl Netns {
    pub(crate) fn inode(&self) -> Option<u64> {
        match self {
            Self::Own => own_inode(),
            Self::Foreign { inode, .. } => Some(*inode),
        }
    }

    /// Opens a namespace file given by the user (`who --netns PATH`).
    /// Opened first, then looked at: the inode is the open file's, so a pid reused between a
    /// check and an open can never lead into another namespace.
    pub(crate) fn open_path(path: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let file = File::open(path).with_context(|| format!("cannot open network namespace {}", path.display()))?;
        let inode = file.metadata().with_context(|| format!("cannot read network namespace {}", path.display()))?.ino();
        if Some(inode) == own_inode() {
            return Ok(Self::Own);
        }
        if !is_namespace_file(&file) || !is_network_namespace(&file) {
            anyhow::bail!(
                "{} is not a network namespace (give a pid, /proc/PID/ns/net or /run/netns/NAME)",
                path.display()
            );
        }
        Ok(Self::Foreign { inode, file, path: path.to_owned() })
    }

    /// The namespace at `path`, if it is the one with this inode once open.
    fn open_if(path: &Path, inode: u64) -> Option<Self> {
        Self::open_path(path).ok().filter(|ns| ns.inode() == Some(inode))
    }

    /// Finds the namespace with this inode: first through `pid` (the process that failed to
    /// bind, if it still lives), then `ip netns` names, then any process inside it.
    pub(crate) fn find(inode: u64, pid: Option<u32>) -> Result<Self> {
        if Some(inode) == own_inode() || inode == 0 {
            return Ok(Self::Own);
        }
        let hinted = pid.map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")));
        let named = std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.path());
        let candidates = hinted.into_iter().chain(named);
        for path in candidates {
            if let Some(found) = Self::open_if(&path, inode) {
                return Ok(found);
            }
        }
        let mut unreadable = 0;
        for entry in std::fs::read_dir("/proc").context("cannot list /proc")?.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let path = entry.path().join("ns/net");
            match std::fs::metadata(&path) {
                Ok(meta) if meta.ino() == inode => {
                    if let Some(found) = Self::open_if(&path, inode) {
                        return Ok(found);
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => unreadable += 1,
                _ => {}
            }
        }
        // Never "no process is in it" when some processes could not be seen.
        let blind =
            Blind { own_pid_namespace: in_own_pid_namespace(), unreadable_processes: unreadable, ..Blind::default() };
        Err(match blind.reason() {
            None => anyhow!("network namespace {inode} has no process left in it"),
            Some(why) => anyhow!("no process visible to bindtrace is in network namespace {inode} ({why})"),
        })
    }

    /// Runs `work` inside this namespace.
    pub(crate) fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        match self {
            Self::Own => Ok(work()),
            Self::Foreign { file, path, .. } => std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        setns(file, CloneFlags::CLONE_NEWNET)
                            .with_context(|| format!("cannot enter network namespace {}", path.display()))?;
                        Ok(work())
                    })
                    .join()
                    .map_err(|_| anyhow!("lookup thread panicked"))?
            }),
        }
    }
}

/// Every network namespace other than `except` that a visible process is in, one path
/// each (`/proc/PID/ns/net`), at most 256; and how many processes' namespaces could not be
/// read (their namespaces may be missing from the list).
pub(crate) fn other_namespaces(except: u64) -> (Vec<PathBuf>, usize) {
    const MAX: usize = 256;
    let mut seen = std::collections::HashMap::new();
    let mut unreadable = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        match std::fs::metadata(&path) {
            Ok(meta) if meta.ino() != except && (seen.len() < MAX || seen.contains_key(&meta.ino())) => {
                seen.entry(meta.ino()).or_insert(path);
            }
            // Past the cap: a namespace not searched counts as one not read.
            Ok(meta) if meta.ino() != except => unreadable += 1,
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => unreadable += 1,
            _ => {}
        }
    }
    (seen.into_values().collect(), unreadable)
}

/// Reads an integer sysctl (`net/ipv4/ip_unprivileged_port_start`) of the calling thread's
/// network namespace: the kernel resolves /proc/sys/net against the reading task's namespace.
pub(crate) fn read_sysctl(name: &str) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/sys/{name}")).ok().and_then(|text| text.trim().parse().ok())
}

/// A sysctl holding two ports (`net/ipv4/ip_local_port_range`: "32768\t60999").
pub(crate) fn read_port_range(name: &str) -> Option<(u16, u16)> {
    let text = std::fs::read_to_string(format!("/proc/sys/{name}")).ok()?;
    let mut ports = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some((ports.next()??, ports.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_runs_inline_and_reads_sysctls() {
        let own = own_inode().expect("/proc/self/ns/net");
        let netns = Netns::find(own, None).expect("own namespace");
        assert!(matches!(netns, Netns::Own));
        let start = netns.run(|| read_sysctl("net/ipv4/ip_unprivileged_port_start")).expect("run");
        let expected: i64 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .expect("sysctl")
            .trim()
            .parse()
            .expect("number");
        assert_eq!(start, Some(expected));
    }

    #[test]
    fn unknown_namespace_is_an_error() {
        let err = Netns::find(1, None).expect_err("no namespace has inode 1");
        let err = err.to_string();
        // Absent only when every process could be looked at; otherwise "not visible", with why.
        assert!(
            err.contains("has no process left in it")
                || err.contains("no process visible to bindtrace is in network namespace 1 ("),
            "{err}"
        );
    }
}
