//! Socket inode → the processes holding it, through /proc/*/fd (as `ss -p`, `lsof` and
//! `fuser` do), at a cost that does not follow the host's size.
//!
//! The index is one entry per process (its start time and the socket inodes among its fds),
//! shared by every lookup worker, so a replaced worker does not start cold, and updated one
//! process at a time, never rebuilt. A search asks first the processes most likely to hold
//! the sockets (the ones bindtrace saw bind the port, the failing process), then the rest,
//! those of the sockets' owner uid first; it stops once every socket has an owner, or at its
//! deadline, saying how far it got ("searched 412 of 530 processes in 1500 ms").
use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use procfs::process::Process;
use serde::Serialize;

/// How long an inode no process had in a whole search is not searched for again (a storm of
/// failures on a port a kernel socket holds costs one search in this time, not one each).
/// Not longer: a socket in flight between processes finds a holder, and inode numbers wrap.
const ORPHAN_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// How often entries of processes that are gone are dropped from the index.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// Inodes remembered as held by no process (see `OwnerIndex::orphans`).
const ORPHANS_MAX: usize = 65_536;
/// Longest command line kept for display.
const CMDLINE_MAX: usize = 512;

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct ProcessInfo {
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
    /// The socket unit it holds this socket for, when it is a systemd manager.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) socket_unit: Option<super::systemd::SocketUnit>,
    /// Its start time (clock ticks after boot): with the pid, which process this is.
    #[serde(skip)]
    pub(crate) start_time: u64,
    /// Its session (`setsid`): workers forked by one server share it, a copy started from
    /// another shell does not.
    #[serde(skip)]
    pub(crate) session: u32,
}

/// The cgroup a process is shown in: the unified (v2) hierarchy's path (number 0), or on
/// v1-only hosts the first hierarchy's. One choice for every reader, so that two processes'
/// paths compare.
pub(crate) fn cgroup_of(process: &Process) -> Option<String> {
    let groups: Vec<_> = process.cgroups().ok()?.into_iter().collect();
    groups.iter().find(|g| g.hierarchy == 0).or(groups.first()).map(|g| g.pathname.clone())
}

impl ProcessInfo {
    /// Reads a process from /proc; `None` when it has exited.
    pub(crate) fn read(pid: u32) -> Option<Self> {
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
            // Said as cut: "bind(('0.0.0.0',18" must not read as port 18.
            cmdline.push('…');
        }
        let cgroup = cgroup_of(&process);
        Some(Self {
            pid,
            // As the probe's names are shown (procfs has made it UTF-8 already).
            comm: crate::text::from_bytes(stat.comm.as_bytes()),
            cmdline,
            cgroup,
            uid: process.uid().ok(),
            identity: None,
            forwards: None,
            socket_unit: None,
            start_time: stat.starttime,
            session: u32::try_from(stat.session).unwrap_or(0),
        })
    }
}

impl ProcessInfo {
    /// When it started, as CLOCK_BOOTTIME ns, rounded up to the next clock tick (the kernel
    /// keeps whole ticks): no earlier than the real start.
    pub(crate) fn started_boot_ns(&self) -> u64 {
        // SAFETY: sysconf takes no pointer.
        let ticks_per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
        self.start_time.saturating_add(1).saturating_mul(1_000_000_000) / ticks_per_second
    }
}

/// `/proc/PID/cmdline` (NUL-separated arguments) as `ps` shows it, with bytes that are not
/// UTF-8 written as `\xNN`.
fn cmdline_text(raw: &[u8]) -> String {
    let mut text = String::with_capacity(raw.len());
    // A process that rewrote its title in place (redis, nginx, postgres) leaves the rest of
    // the old argv as NULs or spaces: trailing ones are padding, not arguments.
    let end = raw.iter().rposition(|&b| b != 0 && b != b' ').map_or(0, |last| last + 1);
    for (i, arg) in raw[..end].split(|&b| b == 0).enumerate() {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(&crate::text::from_bytes(arg));
    }
    text
}

/// The inode number of the initial PID namespace, fixed by the kernel (`PROC_PID_INIT_INO`
/// in include/linux/proc_ns.h, unchanged since Linux 3.8).
const INITIAL_PID_NAMESPACE_INODE: u64 = 0xEFFF_FFFC;

/// Does bindtrace run in a PID namespace of its own (a container without `--pid=host`,
/// `unshare --pid`)? The probe reports the host's pids, and /proc shows only the processes
/// of this namespace: holders outside it are invisible, never absent. Read once.
/// The process a task id belongs to (its thread group id, from /proc/PID/status): `pid` itself
/// for a process, another for a thread; `None` when there is no such task now.
pub(crate) fn tgid_of(pid: u32) -> Option<u32> {
    let status = Process::new(i32::try_from(pid).ok()?).and_then(|process| process.status()).ok()?;
    u32::try_from(status.tgid).ok()
}

pub(crate) fn in_own_pid_namespace() -> bool {
    static OWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| {
        use std::os::unix::fs::MetadataExt as _;
        // Unreadable: the /proc mount itself belongs to another namespace, so the same holds.
        std::fs::metadata("/proc/self/ns/pid").map_or(true, |ns| ns.ino() != INITIAL_PID_NAMESPACE_INODE)
    })
}

/// A search for owners that stopped at its deadline before it had asked every process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SearchCut {
    pub searched: u32,
    pub total: u32,
    pub elapsed_ms: u32,
}

/// What a /proc search could not see. A socket whose process was not found is then "not
/// visible", never "held by no process".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Blind {
    /// bindtrace runs in its own PID namespace.
    pub own_pid_namespace: bool,
    /// Processes whose /proc entries (open files, namespaces) could not be read (EACCES:
    /// another user's process, without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH).
    pub unreadable_processes: u32,
    /// The search ran out of time.
    pub cut: Option<SearchCut>,
    /// /proc itself could not be listed (out of fds or memory): no process was searched.
    pub proc_unlisted: bool,
}

impl Blind {
    /// Why a process holding a socket may be missing from the search; `None` when it asked
    /// every process on the host.
    pub(crate) fn reason(&self) -> Option<String> {
        let cut = self.cut.map(|cut| {
            format!(
                "the search for its process stopped at its deadline: searched {} of {} processes in {} ms",
                cut.searched, cut.total, cut.elapsed_ms
            )
        });
        let unreadable = match (self.own_pid_namespace, self.unreadable_processes) {
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
        };
        let unlisted =
            self.proc_unlisted.then(|| "/proc could not be listed, so no other process was searched".to_owned());
        let reasons: Vec<String> = [cut, unreadable, unlisted].into_iter().flatten().collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
}

/// How reading one process's open files went.
enum FdScan {
    /// Its socket inodes, sorted.
    Read(Box<[u32]>),
    /// Some or all of them could not be read (EACCES): another user's process.
    Denied,
    /// It exited during the scan.
    Gone,
}

/// The socket inodes `pid` has open. Written with std::fs rather than procfs's fd iterator,
/// which skips the entries it cannot read: a scan must tell "no socket here" from "not
/// allowed to look" (and one readlink per fd is all it needs). Hand-written for the hot
/// path: at a million fds this loop is the whole cost of a search.
fn socket_inodes(pid: u32) -> FdScan {
    let dir = format!("/proc/{pid}/fd");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => return FdScan::Denied,
        Err(_) => return FdScan::Gone,
    };
    let mut denied = false;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        match std::fs::read_link(entry.path()) {
            Ok(target) => {
                let inode = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok());
                // inet_diag and unix_diag report 32-bit inodes.
                if let Some(inode) = inode {
                    found.push(inode as u32);
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
        return FdScan::Denied;
    }
    found.sort_unstable();
    found.dedup();
    FdScan::Read(found.into_boxed_slice())
}

/// A process's start time (`/proc/PID/stat` field 22, clock ticks since boot) and the uid
/// that owns its /proc directory (its effective uid): with the pid, who a process is, so
/// that a reused pid is never taken for the process that had it.
fn identity_of(pid: u32) -> Option<(u64, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let uid = std::fs::metadata(format!("/proc/{pid}")).ok()?.uid();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything, spaces and ')' included.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let start = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    Some((start, uid))
}

/// A process's effective uid and the size of its fd table (`Uid:` and `FDSize:` of
/// /proc/PID/status); unknown values sort last.
fn uid_and_fd_table(pid: u32) -> (Option<u32>, u64) {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return (None, u64::MAX) };
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::split_whitespace);
    let uid = field("Uid:").and_then(|mut ids| ids.nth(1)).and_then(|id| id.parse().ok());
    let fd_size = field("FDSize:").and_then(|mut n| n.next()).and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
    (uid, fd_size)
}

/// A process's start time, for checking that a pid still names the same process.
#[cfg(test)]
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    identity_of(pid).map(|(start, _)| start)
}

struct ProcEntry {
    start: u64,
    sockets: Box<[u32]>,
    scanned_at: Instant,
}

/// The processes found holding each socket asked about, and how far the search got.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// Socket inode → pids (each checked against its start time when read).
    pub owners: HashMap<u32, Vec<u32>>,
    /// What the search could not see; `cut` when it stopped at its deadline.
    pub blind: Blind,
}

/// The index shared by the lookup workers (see the module's documentation).
#[derive(Default)]
pub(crate) struct OwnerIndex {
    procs: HashMap<u32, ProcEntry>,
    /// Inodes that no process had open in a complete search made after they were seen
    /// (kernel sockets, sockets in flight between processes): asking about them again does
    /// not search again. Bounded.
    /// With when the search that found no process for it ended, and how many processes it
    /// could not read: an orphan is "not visible" rather than "held by no process" then.
    orphans: HashMap<u32, (Instant, u32)>,
    last_prune: Option<Instant>,
    /// Processes read, for tests and the benchmark.
    visits: u64,
}

/// The index all workers share: a replaced worker keeps what the others learned. Locked one
/// process at a time, never across a read of /proc, so a worker stuck in the kernel never
/// holds it.
pub(crate) type SharedOwnerIndex = std::sync::Arc<std::sync::Mutex<OwnerIndex>>;

fn lock(index: &SharedOwnerIndex) -> std::sync::MutexGuard<'_, OwnerIndex> {
    index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What asking one process gave.
enum Visit {
    /// Its socket inodes, sorted: read now, or from an entry read after `trusted_after`.
    Sockets(Box<[u32]>),
    /// Its fds could not be read (another user's process).
    Denied,
    /// It is gone.
    Gone,
}

/// A process's sockets: its entry when that was read after `trusted_after`, else read now
/// (and the entry replaced).
fn visit(index: &SharedOwnerIndex, pid: u32, trusted_after: Instant) -> Visit {
    if let Some(entry) = lock(index).procs.get(&pid).filter(|e| e.scanned_at >= trusted_after) {
        return Visit::Sockets(entry.sockets.clone());
    }
    let before = identity_of(pid);
    let scan = socket_inodes(pid);
    let mut index = lock(index);
    index.visits += 1;
    match (scan, before) {
        (FdScan::Read(sockets), Some((start, _))) => {
            index.procs.insert(pid, ProcEntry { start, sockets: sockets.clone(), scanned_at: Instant::now() });
            Visit::Sockets(sockets)
        }
        (FdScan::Denied, Some(_)) => Visit::Denied,
        (FdScan::Gone | FdScan::Read(_) | FdScan::Denied, _) => {
            index.procs.remove(&pid);
            Visit::Gone
        }
    }
}

/// Has `pid` been read after `at`?
fn read_after(index: &SharedOwnerIndex, pid: u32, at: Instant) -> bool {
    lock(index).procs.get(&pid).is_some_and(|e| e.scanned_at >= at)
}

/// How long a process's sockets, as read, confirm it holds a socket it had then: a storm of
/// failures on one holder's ports costs one read of its fds a second, not one a lookup. (A
/// socket it opened since is not in them: asking about it reads the process again.)
const HIT_TRUST: std::time::Duration = std::time::Duration::from_secs(1);

/// Finds the processes holding `inodes`, sockets a dump taken at `dumped_at` listed: first
/// in `hints` (processes likely to hold them), then in every other process, those running
/// as one of `uids` first. Stops when each inode has an owner, or at `deadline`.
pub(crate) fn find_owners(
    index: &SharedOwnerIndex,
    inodes: &[u32],
    hints: &[u32],
    uids: &[u32],
    dumped_at: Instant,
    deadline: Instant,
) -> Found {
    let started = Instant::now();
    let mut found =
        Found { blind: Blind { own_pid_namespace: in_own_pid_namespace(), ..Blind::default() }, ..Found::default() };
    let mut wanted: HashSet<u32> = inodes.iter().copied().filter(|&i| i != 0).collect();
    if wanted.is_empty() {
        return found;
    }
    let record = |found: &mut Found, wanted: &HashSet<u32>, pid: u32, sockets: &[u32]| {
        for inode in sockets {
            if wanted.contains(inode) {
                let pids = found.owners.entry(*inode).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    };
    // 1. The likely holders: one process's fds each.
    let trusted_after = dumped_at.checked_sub(HIT_TRUST).unwrap_or(dumped_at);
    let mut asked: HashSet<u32> = HashSet::new();
    for &pid in hints {
        if asked.insert(pid) {
            if let Visit::Sockets(sockets) = visit(index, pid, trusted_after) {
                record(&mut found, &wanted, pid, &sockets);
            }
        }
    }
    // 2. What the index already knows from earlier searches; a hit read more than
    //    [`HIT_TRUST`] before the dump is read again to confirm it (the process may have
    //    closed it, its pid may be another process's now).
    let known: Vec<u32> = {
        let index = lock(index);
        index
            .procs
            .iter()
            .filter(|(pid, e)| !asked.contains(pid) && e.sockets.iter().any(|i| wanted.contains(i)))
            .map(|(pid, _)| *pid)
            .collect()
    };
    for pid in known {
        asked.insert(pid);
        if let Visit::Sockets(sockets) = visit(index, pid, trusted_after) {
            record(&mut found, &wanted, pid, &sockets);
        }
    }
    wanted.retain(|inode| !found.owners.contains_key(inode));
    if wanted.is_empty() {
        return found;
    }
    // What a whole search found no process for a moment ago is not searched for again.
    {
        let index = lock(index);
        wanted.retain(|inode| match index.orphans.get(inode) {
            Some((at, unreadable)) if at.elapsed() < ORPHAN_TTL => {
                found.blind.unreadable_processes = found.blind.unreadable_processes.max(*unreadable);
                false
            }
            _ => true,
        });
    }
    if wanted.is_empty() {
        return found;
    }
    // Processes asked above from an entry read before the dump are asked again below: a
    // socket they opened since is not in it.
    asked.retain(|pid| read_after(index, *pid, dumped_at));
    // 3. Everyone else: the sockets' uids first, and the processes with small fd tables
    //    before the big ones (`FDSize` in /proc/PID/status, one cheap read each), so a
    //    search cut at its deadline has asked as many processes as it could; a proxy's
    //    16,000 eventfds are read last.
    let listing = std::fs::read_dir("/proc");
    found.blind.proc_unlisted = listing.is_err();
    let mut rest: Vec<(bool, u64, u32)> = listing
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()))
        .filter(|pid| !asked.contains(pid))
        .map(|pid| {
            let (uid, fd_size) = uid_and_fd_table(pid);
            let likely = uids.is_empty() || uid.is_some_and(|uid| uids.contains(&uid));
            (!likely, fd_size, pid)
        })
        .collect();
    rest.sort_unstable();
    let total = (rest.len() + asked.len()) as u32;
    let mut searched = asked.len() as u32;
    let mut unreadable = 0;
    let (mut timed_out, mut every_owner_found) = (false, false);
    for (_, _, pid) in &rest {
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        searched += 1;
        let sockets = match visit(index, *pid, dumped_at) {
            Visit::Sockets(sockets) => sockets,
            Visit::Denied => {
                unreadable += 1;
                continue;
            }
            Visit::Gone => continue,
        };
        record(&mut found, &wanted, *pid, &sockets);
        wanted.retain(|inode| !found.owners.contains_key(inode));
        if wanted.is_empty() {
            every_owner_found = true;
            break;
        }
    }
    // Every process was asked: what is still wanted has no process that /proc shows.
    let complete = !found.blind.proc_unlisted && !timed_out && !every_owner_found;
    found.blind.unreadable_processes = found.blind.unreadable_processes.max(unreadable);
    if timed_out && !wanted.is_empty() {
        found.blind.cut = Some(SearchCut {
            searched,
            total,
            elapsed_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
        });
    }
    // Forget processes that are gone, and remember what no process had after a whole search.
    let mut index = lock(index);
    if complete {
        let alive: HashSet<u32> = rest.iter().map(|(_, _, pid)| *pid).chain(asked.iter().copied()).collect();
        index.procs.retain(|pid, _| alive.contains(pid));
        index.last_prune = Some(Instant::now());
        if index.orphans.len() + wanted.len() > ORPHANS_MAX {
            index.orphans.retain(|_, (at, _)| at.elapsed() < ORPHAN_TTL);
            if index.orphans.len() + wanted.len() > ORPHANS_MAX {
                index.orphans.clear();
            }
        }
        let now = Instant::now();
        index.orphans.extend(wanted.iter().map(|inode| (*inode, (now, unreadable))));
    } else if index.last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
        // Searches answered by hints never list /proc: the entries of processes that
        // exited are dropped here, one stat each.
        index.procs.retain(|pid, _| std::path::Path::new(&format!("/proc/{pid}")).exists());
        index.last_prune = Some(Instant::now());
    }
    found
}

impl OwnerIndex {
    /// The start time the index read for `pid` with its fds.
    pub(crate) fn start_of(&self, pid: u32) -> Option<u64> {
        self.procs.get(&pid).map(|e| e.start)
    }

    /// Processes read from /proc since the start (for tests).
    #[cfg(test)]
    pub(crate) fn visits(&self) -> u64 {
        self.visits
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::AsRawFd as _, os::unix::fs::MetadataExt as _};

    use super::*;

    fn inode_of(fd: i32) -> u32 {
        std::fs::metadata(format!("/proc/self/fd/{fd}")).expect("fd").ino() as u32
    }

    #[test]
    fn a_hinted_process_is_asked_first_and_alone() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let inode = inode_of(listener.as_raw_fd());
        let index = SharedOwnerIndex::default();
        let far = Instant::now() + std::time::Duration::from_secs(10);
        let found = find_owners(&index, &[inode], &[std::process::id()], &[], Instant::now(), far);
        assert_eq!(found.owners.get(&inode), Some(&vec![std::process::id()]));
        assert_eq!(lock(&index).visits(), 1, "the hint held it: no other process was read");
        assert_eq!(found.blind.cut, None);
        assert_eq!(lock(&index).start_of(std::process::id()), start_time(std::process::id()));
    }

    #[test]
    fn without_a_hint_the_search_finds_it_and_remembers_orphans() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let inode = inode_of(listener.as_raw_fd());
        let index = SharedOwnerIndex::default();
        let far = Instant::now() + std::time::Duration::from_secs(10);
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let found = find_owners(&index, &[inode], &[], &[euid], Instant::now(), far);
        assert_eq!(found.owners.get(&inode), Some(&vec![std::process::id()]));
        // Known now: a search within HIT_TRUST takes the entry as it is; a later one confirms
        // it with one read of that process alone.
        let before = lock(&index).visits();
        let found = find_owners(&index, &[inode], &[], &[], Instant::now(), far);
        assert_eq!(found.owners.get(&inode), Some(&vec![std::process::id()]));
        assert_eq!(lock(&index).visits(), before, "a holder read just now is trusted");
        let later = Instant::now() + 2 * HIT_TRUST;
        let found = find_owners(&index, &[inode], &[], &[], later, later + std::time::Duration::from_secs(10));
        assert_eq!(found.owners.get(&inode), Some(&vec![std::process::id()]));
        assert_eq!(lock(&index).visits(), before + 1, "a known holder is read again, alone");
        // An inode nobody holds: a whole search, then it is remembered as an orphan.
        let found = find_owners(&index, &[u32::MAX], &[], &[], Instant::now(), far);
        assert!(found.owners.is_empty() && found.blind.cut.is_none());
        let before = lock(&index).visits();
        let _ = find_owners(&index, &[u32::MAX], &[], &[], Instant::now(), far);
        assert_eq!(lock(&index).visits(), before, "an orphan is not searched again");
    }

    /// An inode remembered as held by nobody (a socket that was in flight) is still found
    /// by asking the process that bound it, and an orphan keeps the blindness of the search
    /// that made it.
    #[test]
    fn orphans_yield_to_hints_and_keep_what_their_search_could_not_see() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let inode = inode_of(listener.as_raw_fd());
        let index = SharedOwnerIndex::default();
        lock(&index).orphans.insert(inode, (Instant::now(), 3));
        let far = Instant::now() + std::time::Duration::from_secs(10);
        let found = find_owners(&index, &[inode], &[std::process::id()], &[], Instant::now(), far);
        assert_eq!(found.owners.get(&inode), Some(&vec![std::process::id()]));
        let fresh = SharedOwnerIndex::default();
        lock(&fresh).orphans.insert(inode, (Instant::now(), 3));
        let found = find_owners(&fresh, &[inode], &[], &[], Instant::now(), far);
        assert!(found.owners.is_empty(), "without a hint the orphan is not searched for");
        assert_eq!(found.blind.unreadable_processes, 3, "and says what its search could not see");
        assert!(found.blind.reason().is_some());
    }

    #[test]
    fn a_search_past_its_deadline_says_how_far_it_got() {
        let index = SharedOwnerIndex::default();
        let found = find_owners(&index, &[u32::MAX - 1], &[], &[], Instant::now(), Instant::now());
        let cut = found.blind.cut.expect("cut at once");
        assert_eq!(cut.searched, 0);
        assert!(cut.total > 1, "{cut:?}");
        let reason = found.blind.reason().expect("a reason");
        assert!(reason.contains(&format!("searched 0 of {} processes", cut.total)), "{reason}");
        // Not an orphan: it was not searched for everywhere.
        assert!(!lock(&index).orphans.contains_key(&(u32::MAX - 1)));
    }

    #[test]
    fn command_lines_that_are_not_utf8_are_shown_escaped() {
        assert_eq!(cmdline_text(b"sleep\x0060\x00"), "sleep 60");
        assert_eq!(cmdline_text(b"srv\x00--name=\xff\xfeok\x00"), "srv --name=\\xff\\xfeok");
        assert_eq!(cmdline_text(b""), "");
        // A literal `\xff` is not the byte 0xff.
        assert_eq!(cmdline_text(b"echo\x00\\xff\x00"), "echo \\\\xff");
        // redis rewrites its title over the old argv: the rest is padding.
        assert_eq!(cmdline_text(b"redis-server *:6379\x00\x00\x00\x00"), "redis-server *:6379");
        assert_eq!(cmdline_text(b"redis-server *:6379                \x00"), "redis-server *:6379");
        assert_eq!(cmdline_text(b"nginx: worker process\x00\x00 \x00"), "nginx: worker process");
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
