//! Socket inode → the processes holding it, through /proc/*/fd (as `ss -p`, `lsof` and
//! `fuser` do). The whole-/proc scan is cached and rebuilt only when an inode is missing and
//! the last scan is older than [`MIN_RESCAN`], so a storm of failures costs one scan.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use procfs::process::{all_processes, FDTarget, Process};
use serde::Serialize;

/// Rescans closer together than this reuse the last index (a miss then stays a miss).
const MIN_RESCAN: Duration = Duration::from_millis(250);
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
}

impl ProcessInfo {
    /// Reads a process from /proc; `None` when it has exited.
    pub fn read(pid: u32) -> Option<Self> {
        let process = Process::new(pid as i32).ok()?;
        let stat = process.stat().ok()?;
        let mut cmdline = process.cmdline().map(|args| args.join(" ")).unwrap_or_default();
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
        Some(Self { pid, comm: stat.comm, cmdline, cgroup, uid: process.uid().ok() })
    }
}

#[derive(Default)]
pub struct SocketOwners {
    by_inode: HashMap<u64, Vec<u32>>,
    scanned_at: Option<Instant>,
    scans: u64,
}

impl SocketOwners {
    fn rescan(&mut self) {
        self.by_inode.clear();
        if let Ok(processes) = all_processes() {
            for process in processes.flatten() {
                let Ok(fds) = process.fd() else { continue };
                for fd in fds.flatten() {
                    if let FDTarget::Socket(inode) = fd.target {
                        let owners = self.by_inode.entry(inode).or_default();
                        let pid = process.pid as u32;
                        if !owners.contains(&pid) {
                            owners.push(pid);
                        }
                    }
                }
            }
        }
        self.scanned_at = Some(Instant::now());
        self.scans += 1;
    }

    /// The pids with `inode` open, rescanning /proc when it is not indexed yet.
    pub fn owners(&mut self, inode: u64) -> Vec<u32> {
        if inode == 0 {
            return Vec::new();
        }
        let stale = self.scanned_at.is_none_or(|at| at.elapsed() >= MIN_RESCAN);
        if !self.by_inode.contains_key(&inode) && stale {
            self.rescan();
        }
        self.by_inode.get(&inode).cloned().unwrap_or_default()
    }

    /// How many times /proc was scanned (for tests and benchmarks).
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
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd())).expect("fd").ino();
        let mut owners = SocketOwners::default();
        assert_eq!(owners.owners(inode), vec![std::process::id()]);
        assert_eq!(owners.owners(inode), vec![std::process::id()]);
        assert_eq!(owners.scans(), 1, "a hit does not rescan");
        assert!(owners.owners(u64::MAX).is_empty());
        assert_eq!(owners.scans(), 1, "a miss right after a scan does not rescan");
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
