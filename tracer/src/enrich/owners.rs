//! Socket inode → the processes holding it, through /proc/*/fd (as `ss -p`, `lsof` and
//! `fuser` do). The whole-/proc scan is cached, and rebuilt only when a socket asked about
//! is missing from it and the scan is older than the socket dump that named the socket: a
//! storm of failures costs one scan, and a socket opened since the last scan is still found.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use procfs::process::Process;
use serde::Serialize;

/// Two scans are at least this far apart: the worker waits for the rest.
const MIN_RESCAN: Duration = Duration::from_millis(100);
/// Inodes that no process had open in a scan made after they were seen (kernel sockets,
/// sockets in flight between processes): asking about them again does not rescan. Bounded.
const ORPHANS_MAX: usize = 65_536;
/// Longest command line kept for display.
const CMDLINE_MAX: usize = 512;

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    /// Arguments joined by spaces (what `ps` shows), cut at 512 bytes.
    pub cmdline: String,
    /// The cgroup v2 path (`/system.slice/nginx.service`, a container's scope), if any.
    pub cgroup: Option<String>,
    pub uid: Option<u32>,
    /// Its container, pod or unit (absent: not looked up, or the process exited first).
    #[serde(flatten)]
    pub(crate) identity: Option<super::identity::Identity>,
    /// What it forwards, when it is a `docker-proxy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) forwards: Option<super::identity::Forwarding>,
}

impl ProcessInfo {
    /// Reads a process from /proc; `None` when it has exited.
    pub fn read(pid: u32) -> Option<Self> {
        let process = Process::new(pid as i32).ok()?;
        let stat = process.stat().ok()?;
        // Read raw: procfs's cmdline() fails on arguments that are not UTF-8, which left the
        // command line empty; invalid bytes are shown as \xNN instead.
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let mut cmdline = cmdline_text(&raw);
        if cmdline.len() > CMDLINE_MAX {
            let mut cut = CMDLINE_MAX;
            while !cmdline.is_char_boundary(cut) {
                cut -= 1;
            }
            cmdline.truncate(cut);
        }
        let cgroup = process.cgroups().ok().and_then(|groups| {
            let groups: Vec<_> = groups.into_iter().collect();
            // The unified (v2) hierarchy is number 0; on v1-only hosts take the first.
            groups.iter().find(|g| g.hierarchy == 0).or(groups.first()).map(|g| g.pathname.clone())
        });
        Some(Self { pid, comm: stat.comm, cmdline, cgroup, uid: process.uid().ok(), identity: None, forwards: None })
    }
}

/// `/proc/PID/cmdline` (NUL-separated arguments) as `ps` shows it, with bytes that are not
/// UTF-8 written as `\xNN`.
fn cmdline_text(raw: &[u8]) -> String {
    let mut text = String::with_capacity(raw.len());
    for (i, arg) in raw.strip_suffix(b"\0").unwrap_or(raw).split(|&b| b == 0).enumerate() {
        if i > 0 {
            text.push(' ');
        }
        for chunk in arg.utf8_chunks() {
            text.push_str(chunk.valid());
            for byte in chunk.invalid() {
                text.push_str(&format!("\\x{byte:02x}"));
            }
        }
    }
    text
}

/// The inode number of the initial PID namespace, fixed by the kernel (`PROC_PID_INIT_INO`
/// in include/linux/proc_ns.h, unchanged since Linux 3.8).
const INITIAL_PID_NAMESPACE_INODE: u64 = 0xEFFF_FFFC;

/// Does bindtrace run in a PID namespace of its own (a container without `--pid=host`,
/// `unshare --pid`)? The probe reports the host's pids, and /proc shows only the processes
/// of this namespace: holders outside it are invisible, never absent. Read once.
pub(crate) fn in_own_pid_namespace() -> bool {
    static OWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| {
        use std::os::unix::fs::MetadataExt as _;
        // Unreadable: the /proc mount itself belongs to another namespace, so the same holds.
        std::fs::metadata("/proc/self/ns/pid").map_or(true, |ns| ns.ino() != INITIAL_PID_NAMESPACE_INODE)
    })
}

/// What a /proc scan could not see. A socket whose process was not found is then "not
/// visible", never "held by no process".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Blind {
    /// bindtrace runs in its own PID namespace.
    pub own_pid_namespace: bool,
    /// Processes whose /proc entries (open files, namespaces) could not be read (EACCES:
    /// another user's process, without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH).
    pub unreadable_processes: u32,
}

impl Blind {
    /// Why a process holding a socket may be missing from the scan; `None` when the scan
    /// saw every process on the host.
    pub(crate) fn reason(&self) -> Option<String> {
        match (self.own_pid_namespace, self.unreadable_processes) {
            (false, 0) => None,
            (true, _) => Some("bindtrace runs in its own PID namespace and cannot see processes outside it".to_owned()),
            (false, n) => {
                use crate::privileges::{has, Capability};
                let plural = if n == 1 { "" } else { "es" };
                let missing: Vec<&str> = [Capability::SysPtrace, Capability::DacReadSearch]
                    .into_iter()
                    .filter(|&cap| has(cap) != Some(true))
                    .map(Capability::name)
                    .collect();
                Some(if missing.is_empty() {
                    format!("the kernel refused bindtrace access to the open files of {n} process{plural}")
                } else {
                    format!(
                        "bindtrace could not inspect {n} process{plural} of other users (it needs {})",
                        missing.join(" and ")
                    )
                })
            }
        }
    }
}

/// How reading one process's open files went.
enum FdScan {
    Read,
    /// Some or all of them could not be read (EACCES): another user's process.
    Denied,
    /// It exited during the scan.
    Gone,
}

/// Calls `found` with the inode of each socket `pid` has open. Written with std::fs rather
/// than procfs's fd iterator, which skips the entries it cannot read: a scan must tell "no
/// socket here" from "not allowed to look" (and one readlink per fd is all it needs).
fn socket_inodes(pid: u32, mut found: impl FnMut(u64)) -> FdScan {
    let dir = format!("/proc/{pid}/fd");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => return FdScan::Denied,
        Err(_) => return FdScan::Gone,
    };
    let mut denied = false;
    for entry in entries.flatten() {
        match std::fs::read_link(entry.path()) {
            Ok(target) => {
                let inode = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse().ok());
                if let Some(inode) = inode {
                    found(inode);
                }
            }
            // The directory was listed (CAP_DAC_READ_SEARCH) but its links are not readable
            // (no CAP_SYS_PTRACE).
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => denied = true,
            // That fd was closed since the listing.
            Err(_) => {}
        }
    }
    if denied {
        FdScan::Denied
    } else {
        FdScan::Read
    }
}

#[derive(Default)]
pub(crate) struct SocketOwners {
    by_inode: HashMap<u64, Vec<u32>>,
    orphans: HashSet<u32>,
    scanned_at: Option<Instant>,
    /// What the last scan could not see.
    blind: Blind,
    scans: u64,
}

impl SocketOwners {
    fn rescan(&mut self) {
        self.by_inode.clear();
        let mut unreadable = 0;
        if let Ok(processes) = std::fs::read_dir("/proc") {
            for entry in processes.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
                    continue;
                };
                match socket_inodes(pid, |inode| {
                    let owners = self.by_inode.entry(inode).or_default();
                    if !owners.contains(&pid) {
                        owners.push(pid);
                    }
                }) {
                    FdScan::Read => {}
                    FdScan::Denied => unreadable += 1,
                    FdScan::Gone => {}
                }
            }
        }
        self.blind = Blind { own_pid_namespace: in_own_pid_namespace(), unreadable_processes: unreadable };
        self.scanned_at = Some(Instant::now());
        self.scans += 1;
    }

    /// What the last scan could not see.
    pub(crate) fn blind(&self) -> Blind {
        self.blind
    }

    /// Makes the index answer for `inodes`, sockets a dump taken at `dumped_at` listed.
    /// Nothing is scanned when every inode is indexed (or known to have no process), or when
    /// the last scan ran after the dump; otherwise /proc is scanned again, waiting first
    /// until [`MIN_RESCAN`] has passed since the last scan. After this, an inode without
    /// owners has no process that /proc shows.
    pub(crate) fn resolve(&mut self, inodes: &[u32], dumped_at: Instant) {
        let unknown = |owners: &Self, inode: &u32| {
            !owners.by_inode.contains_key(&u64::from(*inode)) && !owners.orphans.contains(inode)
        };
        // An indexed owner that has exited makes its entry stale (a daemon that forked and
        // left, a reused pid): rescan rather than name a dead or unrelated process.
        let mut alive: HashMap<u32, bool> = HashMap::new();
        let mut stale = |owners: &Self, inode: &u32| {
            owners.by_inode.get(&u64::from(*inode)).is_some_and(|pids| {
                pids.iter().any(|pid| {
                    !*alive.entry(*pid).or_insert_with(|| std::path::Path::new(&format!("/proc/{pid}")).exists())
                })
            })
        };
        let needs_scan = inodes.iter().any(|inode| unknown(self, inode) || stale(self, inode));
        if !needs_scan || self.scanned_at.is_some_and(|at| at >= dumped_at) {
            return;
        }
        if let Some(wait) = self.scanned_at.and_then(|at| (at + MIN_RESCAN).checked_duration_since(Instant::now())) {
            std::thread::sleep(wait);
        }
        self.rescan();
        if self.orphans.len() >= ORPHANS_MAX {
            self.orphans.clear();
        }
        let missing: Vec<u32> = inodes.iter().copied().filter(|inode| unknown(self, inode)).collect();
        self.orphans.extend(missing);
    }

    /// The pids the index has for `inode` (after [`Self::resolve`]).
    /// Empty means "no process that the scan could see" (see [`Self::blind`]).
    pub(crate) fn cached(&self, inode: u32) -> Vec<u32> {
        self.by_inode.get(&u64::from(inode)).cloned().unwrap_or_default()
    }

    /// How many times /proc was scanned (for tests and benchmarks).
    #[cfg(test)]
    pub fn scans(&self) -> u64 {
        self.scans
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::AsRawFd as _, os::unix::fs::MetadataExt as _};

    use super::*;

    #[test]
    fn finds_this_process_as_owner_and_caches_the_scan() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd())).expect("fd").ino() as u32;
        let mut owners = SocketOwners::default();
        owners.resolve(&[inode], Instant::now());
        assert_eq!(owners.cached(inode), vec![std::process::id()]);
        owners.resolve(&[inode], Instant::now());
        assert_eq!(owners.scans(), 1, "an indexed inode does not rescan");
        let before = Instant::now();
        owners.resolve(&[u32::MAX], before);
        assert_eq!(owners.scans(), 2, "an unknown inode from a newer dump rescans");
        assert!(owners.cached(u32::MAX).is_empty());
        owners.resolve(&[u32::MAX], Instant::now());
        assert_eq!(owners.scans(), 2, "an inode no process had after a newer scan does not rescan again");
    }

    #[test]
    fn command_lines_that_are_not_utf8_are_shown_escaped() {
        assert_eq!(cmdline_text(b"sleep\x0060\x00"), "sleep 60");
        assert_eq!(cmdline_text(b"srv\x00--name=\xff\xfeok\x00"), "srv --name=\\xff\\xfeok");
        assert_eq!(cmdline_text(b""), "");
        // A live process whose argv is not UTF-8 (issue 11: its command line came out empty).
        use std::os::unix::ffi::OsStrExt as _;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30"])
            .arg(std::ffi::OsStr::from_bytes(b"name-\xff"))
            .spawn()
            .expect("spawn sh");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let info = ProcessInfo::read(child.id()).expect("running");
        let _ = child.kill();
        let _ = child.wait();
        assert!(info.cmdline.contains("name-\\xff"), "{info:?}");
    }

    #[test]
    fn reads_process_details() {
        let me = ProcessInfo::read(std::process::id()).expect("this process");
        assert_eq!(me.pid, std::process::id());
        assert!(!me.comm.is_empty());
        assert!(!me.cmdline.is_empty());
        assert!(me.cgroup.is_some());
        assert!(ProcessInfo::read(u32::MAX / 2).is_none());
    }
}
