//! The facts a diagnosis needs, gathered from the kernel and /proc. Everything here may take
//! milliseconds, so it runs on the attribution worker thread, never on the event path.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::Instant,
};

use nix::ifaddrs::getifaddrs;
use serde::Serialize;

use crate::decode::UnixPath;
use crate::host::{
    identity::{Forwarding, Identities, Identity, Publishing},
    nat::NatRules,
    netns::{read_port_range, read_sysctl, Netns},
    owners::{find_owners, in_own_pid_namespace, Blind, ProcessInfo, SharedOwnerIndex},
    policy::{bind_policy, BindPolicy},
    sockdiag::{collect_sockets, DiagSocket, Proto, SocketSink, TCP_BOUND, TCP_CLOSE, TCP_LISTEN, TCP_TIME_WAIT},
    unixdiag::{bound_sockets, bound_sockets_from_proc, kernel_dev_to_user, UnixSocket},
};

/// What to look up. Equal keys share one lookup and one cache entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LookupKey {
    /// Every socket of a protocol in a namespace (EADDRINUSE): one sock_diag dump serves the
    /// failures on every port, so its cost does not grow with the number of failing ports.
    Sockets { netns: u32, proto: Proto },
    /// A namespace's sysctls and addresses (EACCES, EADDRNOTAVAIL).
    Netns { netns: u32 },
    /// A process's capabilities (EACCES).
    Process { pid: u32 },
    /// An AF_UNIX name (EADDRINUSE): the file at the path as the failing process sees it, and
    /// the sockets bound to it. `name` is a hash of the `sun_path` asked for (the path itself
    /// travels with the job); `pid` resolves a relative path and the process's mount view.
    /// `mnt_ns` (0: not recorded) finds the process's view of the path after it has exited.
    UnixName { netns: u32, pid: u32, mnt_ns: u32, name: u64 },
    /// Who runs in a cgroup (the id the probe records): container, pod or unit. It does not
    /// change while the cgroup exists, so any answer serves.
    /// `pid` is set when the id does not name one group of processes (a hierarchy's root,
    /// a host without cgroup v2): the identity is then that process's, and `comm` (a hash of
    /// its name) keeps a pid reused by another program from being served the old process's
    /// answer.
    Cgroup { id: u64, pid: u32, comm: u32 },
    /// The container a runtime's port publisher (docker-proxy, dockerd) was starting when its
    /// bind failed: the other side of a `docker run -p` conflict.
    Publisher { port: u16, proto: Proto },
    /// The socket unit a systemd manager (`pid`) was starting when its bind to `addr`:`port`
    /// failed: the other side of a socket-activation conflict.
    UnitStarting { pid: u32, addr: std::net::IpAddr, port: u16, proto: Proto },
    /// The NAT rules of a namespace (DNAT, REDIRECT): a port they claim sends its traffic
    /// elsewhere before any socket sees it.
    Nat { netns: u32 },
}

/// The hash that names a unix path in a [`LookupKey::UnixName`].
pub(crate) fn unix_name_key(path: &UnixPath) -> u64 {
    use std::hash::BuildHasher as _;
    rustc_hash::FxBuildHasher.hash_one(path)
}

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

/// A socket on the port and the processes that have it open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Holder {
    pub socket: DiagSocket,
    pub processes: Vec<ProcessInfo>,
    /// What an empty `processes` means.
    #[serde(skip)]
    pub owners: OwnersSeen,
}

/// How far a holder's list of processes can be trusted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum OwnersSeen {
    /// No /proc search newer than the socket dump could be made: an empty list means "not
    /// known", never "no process".
    #[default]
    NotResolved,
    /// A scan that saw every process: an empty list means no process has the socket open.
    Complete,
    /// A scan that could not see every process: an empty list means "not visible".
    Partial(Blind),
}

impl Holder {
    /// Why the holder's process may be missing, when the lookup could not see every process.
    pub(crate) fn blind_reason(&self) -> Option<String> {
        match self.owners {
            OwnersSeen::Partial(blind) => blind.reason(),
            OwnersSeen::NotResolved | OwnersSeen::Complete => None,
        }
    }
}

/// Connections (accepted or outgoing) kept per (port, state, local address): the first few
/// show which connection blocks a bind; the rest are counted, never listed (a busy :443 has
/// tens of thousands, and listing them made one NDJSON line of 7 MB).
const CONNECTIONS_KEPT: usize = 4;
/// Sockets that are not connections (listeners, bound-only, UDP) kept per port; counted beyond.
const UNCONNECTED_KEPT: usize = 256;
/// Distinct peer addresses counted per port; past this the count reads "at least".
const PEERS_COUNTED_MAX: usize = 65_536;
/// Up to this many failing ports get a dump each, filtered by port in the kernel; more share
/// one dump of the whole table, filtered here.
const FILTERED_DUMPS_MAX: usize = 8;

/// A socket that belongs to a connection: a peer, not a bind, is what it stands for.
pub(crate) fn is_connection(state: u8) -> bool {
    !matches!(state, TCP_LISTEN | TCP_CLOSE | TCP_BOUND)
}

/// Sockets on one port with the same local address, IPV6_V6ONLY and state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CensusGroup {
    pub local: IpAddr,
    pub v6only: Option<bool>,
    pub state: u8,
    pub count: u32,
}

/// Every socket on a port, counted, whether it was kept or not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PortCensus {
    pub groups: Vec<CensusGroup>,
    /// Distinct peer addresses of the port's connections.
    pub distinct_peers: usize,
    /// More peers than [`PEERS_COUNTED_MAX`]: `distinct_peers` is a lower bound.
    pub peers_capped: bool,
}

impl PortCensus {
    pub(crate) fn total(&self) -> usize {
        self.groups.iter().map(|g| g.count as usize).sum()
    }
}

/// A socket of the ephemeral range, as much as counting taken ports needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RangeSocket {
    port: u16,
    local: IpAddr,
    v6only: Option<bool>,
    time_wait: bool,
}

/// Takes a dump one socket at a time and keeps what a diagnosis uses: the sockets on the
/// asked ports (connections only a few per state and address), counts of all of them, and,
/// when a bind to port 0 failed, a compact list of the ephemeral range.
struct TableBuilder<'a> {
    /// `None`: every socket delivered is on an asked port (the kernel filtered the dump).
    ports: Option<&'a HashSet<u16>>,
    range: Option<(u16, u16)>,
    kept: Vec<DiagSocket>,
    kept_per_group: HashMap<(u16, u8, IpAddr), usize>,
    unconnected_per_port: HashMap<u16, usize>,
    census: HashMap<u16, (PortCensus, HashSet<IpAddr>)>,
    range_sockets: Vec<RangeSocket>,
    total: usize,
    /// The port whose dump is being read, when each port has a dump of its own.
    dumping: Option<u16>,
    every_socket: bool,
}

impl<'a> TableBuilder<'a> {
    fn new(ports: Option<&'a HashSet<u16>>, range: Option<(u16, u16)>) -> Self {
        Self {
            ports,
            range,
            kept: Vec::new(),
            kept_per_group: HashMap::new(),
            unconnected_per_port: HashMap::new(),
            census: HashMap::new(),
            range_sockets: Vec::new(),
            total: 0,
            dumping: None,
            every_socket: false,
        }
    }
}

impl SocketSink for TableBuilder<'_> {
    fn add(&mut self, socket: DiagSocket) {
        self.total += 1;
        let port = socket.local.port();
        if self.range.is_some_and(|(lo, hi)| (lo..=hi).contains(&port)) {
            self.range_sockets.push(RangeSocket {
                port,
                local: socket.local.ip(),
                v6only: socket.v6only,
                time_wait: socket.state == TCP_TIME_WAIT,
            });
        }
        if self.ports.is_some_and(|ports| !ports.contains(&port)) {
            return;
        }
        let (census, peers) = self.census.entry(port).or_default();
        let local = socket.local.ip();
        // The first socket of each (address, IPV6_V6ONLY, state) is kept past every cap: the
        // one that blocks a bind is never only a count.
        let first_of_group = match census
            .groups
            .iter_mut()
            .find(|g| g.local == local && g.v6only == socket.v6only && g.state == socket.state)
        {
            Some(group) => {
                group.count = group.count.saturating_add(1);
                false
            }
            None => {
                census.groups.push(CensusGroup { local, v6only: socket.v6only, state: socket.state, count: 1 });
                true
            }
        };
        let keep = if is_connection(socket.state) {
            if peers.len() < PEERS_COUNTED_MAX {
                peers.insert(socket.peer.ip());
            } else if !peers.contains(&socket.peer.ip()) {
                census.peers_capped = true;
            }
            let kept = self.kept_per_group.entry((port, socket.state, local)).or_default();
            *kept += 1;
            self.every_socket || *kept <= CONNECTIONS_KEPT
        } else {
            let kept = self.unconnected_per_port.entry(port).or_default();
            *kept += 1;
            self.every_socket || *kept <= UNCONNECTED_KEPT
        };
        if keep || first_of_group {
            self.kept.push(socket);
        }
    }

    fn reset(&mut self) {
        match self.dumping {
            // Only what this port's dump delivered goes: the other ports' dumps stand.
            Some(port) => {
                self.kept.retain(|s| s.local.port() != port);
                self.kept_per_group.retain(|(p, _, _), _| *p != port);
                self.unconnected_per_port.remove(&port);
                self.census.remove(&port);
            }
            None => {
                let every_socket = self.every_socket;
                *self = Self::new(self.ports, self.range);
                self.every_socket = every_socket;
            }
        }
    }
}

impl TableBuilder<'_> {
    /// The dump that comes next is of this port alone (`None`: of every port).
    fn now_dumping(&mut self, port: Option<u16>) {
        self.dumping = port;
    }

    /// Keeps every socket, connections too (`who --all`).
    fn keep_every_socket(&mut self) {
        self.every_socket = true;
    }

    fn finish(self) -> SocketTable {
        let mut by_port = self.kept;
        by_port.sort_by_key(|s| s.local.port());
        let mut range = self.range_sockets;
        range.sort_by_key(|s| s.port);
        SocketTable {
            by_port,
            census: self
                .census
                .into_iter()
                .map(|(port, (mut census, peers))| {
                    census.distinct_peers = peers.len();
                    (port, census)
                })
                .collect(),
            range,
            sockets: self.total,
            ..SocketTable::default()
        }
    }
}

/// The sockets of a protocol in a namespace on the ports a lookup was asked about, with the
/// owners of those it kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SocketTable {
    /// Sorted by local port: one allocation per dump. A map of per-port vectors cost ~10,000
    /// allocations per dump of 10,000 sockets, and malloc/free led the profile of a failure
    /// storm (`perf record`, `cargo xtask bench --parts storms`).
    by_port: Vec<DiagSocket>,
    /// Every socket on each asked port, counted (`by_port` keeps only some connections).
    census: HashMap<u16, PortCensus>,
    /// With a bind to port 0 among the failures: the sockets of the ephemeral range, sorted by
    /// port, to count the ports taken.
    range: Vec<RangeSocket>,
    /// Socket inode → pids, for the sockets on the ports asked about.
    owners: HashMap<u32, Vec<u32>>,
    processes: HashMap<u32, ProcessInfo>,
    /// The ports whose owners were looked for after the dump.
    resolved_ports: HashSet<u16>,
    /// Sockets a container runtime's daemon holds for a published port, by inode: the
    /// container and mapping, from the runtime's API.
    published: HashMap<u32, Forwarding>,
    /// Sockets a systemd manager holds for a socket unit, by inode: the unit, from systemd.
    socket_units: HashMap<u32, crate::host::systemd::SocketUnit>,
    /// How far the search for owners got.
    seen: OwnersSeen,
    /// Sockets whose processes were found but could not be read after (they exited, or the
    /// pid is another process's now): not known, never "no process".
    unread_owners: HashSet<u32>,
    sockets: usize,
    /// The list is sock_diag's; `false`: /proc/net's, which lacks TCP sockets that are only
    /// bound, and IPV6_V6ONLY.
    pub from_sock_diag: bool,
    /// net.ipv4.ip_local_port_range of the namespace, read with the dump: where bind(port 0)
    /// and connect() take ports from (it applies to IPv6 too).
    pub local_port_range: Option<(u16, u16)>,
}

impl SocketTable {
    /// The sockets kept on `port` (every one that is not a connection, the first few
    /// connections of each state and address), each with its processes.
    pub(crate) fn holders(&self, port: u16) -> Vec<Holder> {
        let resolved = self.resolved_ports.contains(&port);
        let seen = if resolved { self.seen } else { OwnersSeen::NotResolved };
        self.on_port(port)
            .iter()
            .map(|socket| Holder {
                socket: socket.clone(),
                processes: self
                    .owners
                    .get(&socket.inode)
                    .into_iter()
                    .flatten()
                    .filter_map(|pid| self.processes.get(pid).cloned())
                    .map(|mut process| {
                        // dockerd holds the ports it publishes itself (userland proxy off):
                        // what it publishes depends on the socket, not the process.
                        if process.forwards.is_none() {
                            process.forwards = self.published.get(&socket.inode).cloned();
                        }
                        // A manager holds many sockets: which unit depends on the socket.
                        if crate::host::systemd::is_manager(&process) {
                            process.socket_unit = self.socket_units.get(&socket.inode).cloned();
                        }
                        process
                    })
                    .collect(),
                // Sockets without an inode (TIME_WAIT) have no process to find.
                owners: match socket.inode {
                    0 => OwnersSeen::Complete,
                    inode if self.unread_owners.contains(&inode) => OwnersSeen::NotResolved,
                    _ => seen,
                },
            })
            .collect()
    }

    /// Every socket on `port`, counted by address and state.
    pub(crate) fn census(&self, port: u16) -> Option<&PortCensus> {
        self.census.get(&port)
    }

    fn on_port(&self, port: u16) -> &[DiagSocket] {
        let start = self.by_port.partition_point(|s| s.local.port() < port);
        let end = self.by_port.partition_point(|s| s.local.port() <= port);
        &self.by_port[start..end]
    }

    /// The distinct ports in `lo..=hi` that a socket `blocks` (by its local address and
    /// IPV6_V6ONLY) is on, and of those, how many only TIME_WAIT sockets block (for an
    /// exhausted ephemeral range). Counted from the range kept for a bind to port 0.
    pub(crate) fn ports_taken(
        &self,
        lo: u16,
        hi: u16,
        blocks: impl Fn(IpAddr, Option<bool>) -> bool,
    ) -> (usize, usize) {
        let start = self.range.partition_point(|s| s.port < lo);
        let end = self.range.partition_point(|s| s.port <= hi);
        let (mut taken, mut time_wait_only) = (0, 0);
        let mut sockets = self.range[start..end].iter().peekable();
        while let Some(first) = sockets.next() {
            let port = first.port;
            let b = blocks(first.local, first.v6only);
            let (mut blocked, mut live) = (b, b && !first.time_wait);
            while let Some(next) = sockets.next_if(|s| s.port == port) {
                let b = blocks(next.local, next.v6only);
                blocked |= b;
                live |= b && !next.time_wait;
            }
            taken += usize::from(blocked);
            time_wait_only += usize::from(blocked && !live);
        }
        (taken, time_wait_only)
    }

    /// Sockets in the dump, on every port.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.sockets
    }

    /// A table of these holders, their owners resolved (for tests of the wording).
    #[cfg(test)]
    pub(crate) fn from_holders(holders: Vec<Holder>) -> Self {
        let mut table = Self { sockets: holders.len(), from_sock_diag: true, ..Self::default() };
        let mut census = TableBuilder::new(None, Some((1, u16::MAX)));
        for holder in holders {
            census.add(holder.socket.clone());
            let port = holder.socket.local.port();
            let pids = holder.processes.iter().map(|p| p.pid).collect();
            for process in holder.processes {
                table.processes.insert(process.pid, process);
            }
            table.owners.insert(holder.socket.inode, pids);
            table.resolved_ports.insert(port);
            if let OwnersSeen::Partial(_) = holder.owners {
                table.seen = holder.owners;
            }
            table.by_port.push(holder.socket);
        }
        let counted = census.finish();
        table.census = counted.census;
        table.range = counted.range;
        table.by_port.sort_by_key(|s| s.local.port());
        table
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NetnsFacts {
    pub unprivileged_port_start: Option<i64>,
    pub nonlocal_bind_v4: Option<i64>,
    pub nonlocal_bind_v6: Option<i64>,
    /// Addresses on the namespace's interfaces.
    pub addresses: Vec<IpAddr>,
    /// IPv6 addresses with their state flags (IFA_F_*) and interface, from if_inet6.
    pub ipv6_states: Vec<Ipv6State>,
}

/// An IPv6 address's state, as /proc/net/if_inet6 lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ipv6State {
    pub addr: std::net::Ipv6Addr,
    /// IFA_F_* bits: 0x04 optimistic, 0x08 dadfailed, 0x20 deprecated, 0x40 tentative.
    pub flags: u32,
    pub interface: String,
}

pub(crate) const IFA_F_OPTIMISTIC: u32 = 0x04;
pub(crate) const IFA_F_DADFAILED: u32 = 0x08;
pub(crate) const IFA_F_TENTATIVE: u32 = 0x40;

/// The calling thread's namespace's IPv6 addresses and their flags (`/proc/thread-self/net`
/// is the thread's namespace; `/proc/self/net` would be the process's).
fn ipv6_states() -> Vec<Ipv6State> {
    let text = std::fs::read_to_string("/proc/thread-self/net/if_inet6").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let hex = fields.first().filter(|h| h.len() == 32)?;
            let addr = u128::from_str_radix(hex, 16).ok()?;
            Some(Ipv6State {
                addr: std::net::Ipv6Addr::from(addr),
                flags: u32::from_str_radix(fields.get(4)?, 16).ok()?,
                interface: (*fields.get(5)?).to_owned(),
            })
        })
        .collect()
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ProcessFacts {
    /// CapEff from /proc/PID/status.
    pub effective: u64,
    /// What else may refuse its binds: cgroup BPF programs, LSMs.
    pub policy: BindPolicy,
    /// Its session and cgroup, which tell whether another socket on its port belongs to the
    /// same service (see `diagnose::sharing`).
    pub session: Option<u32>,
    pub cgroup: Option<String>,
}

/// Why a process's details could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProcessUnread {
    /// It exited first.
    Exited,
    /// The probe's pid is the host's, and bindtrace's /proc shows another PID namespace.
    OutsidePidNamespace,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Facts {
    Sockets(Result<SocketTable, String>),
    Netns(Result<NetnsFacts, String>),
    Process(Result<ProcessFacts, ProcessUnread>),
    Unix(Result<UnixFacts, String>),
    Identity(std::sync::Arc<Identity>),
    Publisher(Result<Option<Publishing>, String>),
    UnitStarting(Result<Option<crate::host::systemd::SocketUnit>, String>),
    Nat(Result<std::sync::Arc<NatRules>, String>),
}

impl Facts {
    /// The answer of a lookup that failed as a whole (it panicked, or it hung).
    pub(crate) fn failed(key: &LookupKey, why: &str) -> Self {
        match key {
            LookupKey::Sockets { .. } => Self::Sockets(Err(why.to_owned())),
            LookupKey::Netns { .. } => Self::Netns(Err(why.to_owned())),
            LookupKey::Process { .. } => Self::Process(Err(ProcessUnread::Exited)),
            LookupKey::UnixName { .. } => Self::Unix(Err(why.to_owned())),
            LookupKey::Publisher { .. } => Self::Publisher(Err(why.to_owned())),
            LookupKey::UnitStarting { .. } => Self::UnitStarting(Err(why.to_owned())),
            LookupKey::Nat { .. } => Self::Nat(Err(why.to_owned())),
            LookupKey::Cgroup { .. } => Self::Identity(std::sync::Arc::new(Identity {
                unresolved: Some(why.to_owned()),
                ..Identity::default()
            })),
        }
    }
}

/// What a lookup is given besides its key.
#[derive(Clone, Copy)]
pub(crate) struct Ask<'a> {
    /// A process of the failure's namespace, to enter it by.
    pub pid_hint: Option<u32>,
    /// The failing ports (socket-table keys).
    pub ports: &'a [u16],
    /// The path of a unix-name key.
    pub unix_path: Option<&'a UnixPath>,
    /// Processes likely to hold the sockets: those bindtrace saw bind the ports, the failing
    /// process. Asked first, each at the cost of its own fds.
    pub hints: &'a [u32],
    /// When the search for owners stops and says how far it got.
    pub deadline: Instant,
}

impl<'a> Ask<'a> {
    /// Nothing but a deadline `budget` from now.
    #[cfg(test)]
    pub(crate) fn within(budget: std::time::Duration) -> Self {
        Self { pid_hint: None, ports: &[], unix_path: None, hints: &[], deadline: Instant::now() + budget }
    }
}

/// A lookup worker's state. The /proc owner index is shared by every worker (a replacement
/// does not start cold); the identities' caches are the worker's.
#[derive(Default)]
pub(crate) struct Lookups {
    owners: SharedOwnerIndex,
    pub(crate) identities: Identities,
    /// NAT rules by namespace, and until when they serve: reading them runs nft and
    /// iptables-save, too much for every successful bind of a busy host.
    nat: HashMap<u32, (Instant, std::sync::Arc<NatRules>)>,
}

/// How long NAT rules read once serve later binds, at least: a rule added or removed since is
/// seen that much later. A ruleset slow to read (kube-proxy's iptables mode on a big cluster)
/// is read at most once per ten times its reading took, so that it never takes more than a
/// tenth of a lookup worker.
pub(crate) const NAT_RULES_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl Lookups {
    /// A worker's lookups over the shared owner index.
    pub(crate) fn sharing(owners: SharedOwnerIndex) -> Self {
        Self { owners, identities: Identities::default(), nat: HashMap::default() }
    }
}

fn netns_facts() -> NetnsFacts {
    let addresses = getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address)
                .filter_map(|a| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    NetnsFacts {
        unprivileged_port_start: read_sysctl("net/ipv4/ip_unprivileged_port_start"),
        nonlocal_bind_v4: read_sysctl("net/ipv4/ip_nonlocal_bind"),
        nonlocal_bind_v6: read_sysctl("net/ipv6/ip_nonlocal_bind"),
        addresses,
        ipv6_states: ipv6_states(),
    }
}

impl Lookups {
    /// The `proto` sockets of the namespace on `ports` (each port filtered in the kernel; one
    /// dump of the whole table for many ports or a bind to port 0), then the processes
    /// holding the sockets kept: `hints` (processes likely to hold them) first, the search
    /// stopping at `deadline`. `every_socket` keeps every connection too (`who --all`).
    pub(crate) fn socket_table(
        &mut self,
        netns: &Netns,
        proto: Proto,
        ports: &[u16],
        hints: &[u32],
        deadline: Instant,
        every_socket: bool,
    ) -> Result<SocketTable, String> {
        let dumped_at = Instant::now();
        let port_set: HashSet<u16> = ports.iter().copied().collect();
        let ephemeral = port_set.contains(&0);
        let filtered = !ephemeral && ports.len() <= FILTERED_DUMPS_MAX;
        let dumped = netns
            .run(|| -> Result<_, std::io::Error> {
                let local_port_range = read_port_range("net/ipv4/ip_local_port_range");
                let mut builder =
                    TableBuilder::new((!filtered).then_some(&port_set), local_port_range.filter(|_| ephemeral));
                if every_socket {
                    builder.keep_every_socket();
                }
                let mut from_sock_diag = true;
                if filtered {
                    for &port in &port_set {
                        builder.now_dumping(Some(port));
                        from_sock_diag &= collect_sockets(proto, Some(port), &mut builder)?;
                    }
                    builder.now_dumping(None);
                } else {
                    from_sock_diag = collect_sockets(proto, None, &mut builder)?;
                }
                Ok((builder.finish(), local_port_range, from_sock_diag))
            })
            .map_err(|e| format!("{e:#}"))?;
        let (mut table, local_port_range, from_sock_diag) =
            dumped.map_err(|e| format!("sock_diag query failed: {e}"))?;
        table.local_port_range = local_port_range;
        table.from_sock_diag = from_sock_diag;
        let wanted: Vec<u32> =
            ports.iter().flat_map(|&port| table.on_port(port)).map(|s| s.inode).filter(|&inode| inode != 0).collect();
        let mut uids: Vec<u32> = ports.iter().flat_map(|&port| table.on_port(port)).map(|s| s.uid).collect();
        uids.sort_unstable();
        uids.dedup();
        let found = find_owners(&self.owners, &wanted, hints, &uids, dumped_at, deadline);
        for (inode, pids) in found.owners {
            let pids: Vec<u32> = pids.into_iter().filter(|&pid| self.read_process(&mut table.processes, pid)).collect();
            if pids.is_empty() {
                table.unread_owners.insert(inode);
            }
            table.owners.insert(inode, pids);
        }
        let held_by_runtime: Vec<(u32, std::net::SocketAddr)> = ports
            .iter()
            .flat_map(|&port| table.on_port(port))
            .filter(|socket| {
                table
                    .owners
                    .get(&socket.inode)
                    .into_iter()
                    .flatten()
                    .any(|pid| table.processes.get(pid).is_some_and(|p| p.comm == "dockerd" || p.comm == "conmon"))
            })
            .map(|socket| (socket.inode, socket.local))
            .collect();
        for (inode, local) in held_by_runtime {
            if let Some(forwarding) = self.identities.published_at(local, proto.name()) {
                table.published.insert(inode, forwarding);
            }
        }
        let held_by_managers: Vec<(u32, u32, std::net::SocketAddr)> = ports
            .iter()
            .flat_map(|&port| table.on_port(port))
            .filter(|socket| !is_connection(socket.state) || proto == Proto::Udp)
            .filter_map(|socket| {
                let pids = table.owners.get(&socket.inode)?;
                let manager =
                    pids.iter().find(|pid| table.processes.get(pid).is_some_and(crate::host::systemd::is_manager))?;
                Some((socket.inode, *manager, socket.local))
            })
            .collect();
        for (inode, manager, local) in held_by_managers {
            let Some(process) = table.processes.get(&manager) else { continue };
            match crate::host::systemd::socket_unit_at(process, local, proto) {
                Ok(Some(unit)) => {
                    table.socket_units.insert(inode, unit);
                }
                Ok(None) => {}
                // The holder is still said to be systemd, for a socket unit (never "stop it").
                Err(why) => log::debug!("the socket unit of pid {manager}'s socket at {local} is not known: {why}"),
            }
        }
        table.resolved_ports.extend(ports.iter().copied());
        table.seen = match found.blind.reason() {
            Some(_) => OwnersSeen::Partial(found.blind),
            None => OwnersSeen::Complete,
        };
        Ok(table)
    }

    /// The NAT rules of a namespace, read at most every [`NAT_RULES_TTL`], with the
    /// containers they forward to named.
    pub(crate) fn nat_rules(&mut self, netns: u32, pid_hint: Option<u32>) -> Result<std::sync::Arc<NatRules>, String> {
        if let Some((until, rules)) = self.nat.get(&netns) {
            if Instant::now() < *until {
                return Ok(rules.clone());
            }
        }
        let started = Instant::now();
        let mut rules = Netns::find(u64::from(netns), pid_hint)
            .and_then(|ns| ns.run(NatRules::read))
            .map_err(|e| format!("{e:#}"))?;
        let until = Instant::now() + NAT_RULES_TTL.max(started.elapsed() * 10);
        if !rules.claims.is_empty() {
            self.identities.name_nat_destinations(&mut rules);
        }
        let rules = std::sync::Arc::new(rules);
        if self.nat.len() >= 64 {
            self.nat.clear();
        }
        self.nat.insert(netns, (until, rules.clone()));
        Ok(rules)
    }

    /// Reads `pid` into `processes` once, if it is still the process the index read its fds
    /// from (a pid reused since is another process: never named).
    fn read_process(&mut self, processes: &mut HashMap<u32, ProcessInfo>, pid: u32) -> bool {
        if processes.contains_key(&pid) {
            return true;
        }
        let Some(mut info) = ProcessInfo::read(pid) else { return false };
        let indexed = self.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner).start_of(pid);
        if indexed.is_some_and(|start| start != info.start_time) {
            return false;
        }
        self.identities.annotate(&mut info);
        processes.insert(pid, info);
        true
    }

    /// The file at a unix socket's path and the sockets bound to it: first in the failing
    /// socket's network namespace; when none is there and the file is a socket, in every
    /// other namespace bindtrace can enter (a socket file on a shared filesystem can be
    /// bound from any of them), before calling the file stale.
    fn unix_facts(
        &mut self,
        netns: u32,
        pid: u32,
        mnt_ns: u32,
        path: &UnixPath,
        deadline: Instant,
    ) -> Result<UnixFacts, String> {
        let dumped_at = Instant::now();
        let (file, looked_at) = unix_file(pid, mnt_ns, path);
        // With /proc/net/unix (no unix_diag) sockets match by name only: a holder that bound
        // another spelling of the path (relative, through a bind mount) is missed.
        let by_name_only = std::sync::atomic::AtomicBool::new(false);
        let dump = |ns: &Netns| -> Result<Vec<UnixSocket>, String> {
            ns.run(|| {
                bound_sockets().or_else(|_| {
                    by_name_only.store(true, std::sync::atomic::Ordering::Relaxed);
                    bound_sockets_from_proc()
                })
            })
            .map_err(|e| format!("{e:#}"))?
            .map_err(|e| format!("unix socket dump failed: {e}"))
        };
        let wanted = |socket: &UnixSocket| match (&file, socket.file) {
            // unix_diag reports the low 32 bits of the file's inode (filesystems with 64-bit
            // inodes: XFS inode64, tmpfs inode64, overlayfs xino).
            (UnixFile::Socket { ino, dev, .. }, Some((socket_ino, socket_dev))) => {
                *ino as u32 == socket_ino && kernel_dev_to_user(socket_dev) == *dev
            }
            // An abstract name, or a dump without socket files (/proc/net/unix): by name.
            _ => socket.name == path.as_bytes(),
        };
        let home = Netns::find(u64::from(netns), Some(pid)).map_err(|e| format!("{e:#}"))?;
        let mut found: Vec<UnixSocket> = dump(&home)?.into_iter().filter(wanted).collect();
        let (mut searched, mut unsearchable) = (1, 0);
        if found.is_empty() && matches!(file, UnixFile::Socket { .. }) {
            let (others, unreadable) = crate::host::netns::other_namespaces(u64::from(netns));
            // In a PID namespace of its own bindtrace sees only that namespace's processes,
            // so namespaces of others may be missing from the list.
            unsearchable += unreadable + usize::from(in_own_pid_namespace());
            for path in others {
                match Netns::open_path(&path).map_err(|e| format!("{e:#}")).and_then(|ns| dump(&ns)) {
                    Ok(sockets) => {
                        searched += 1;
                        found.extend(sockets.into_iter().filter(wanted));
                    }
                    Err(_) => unsearchable += 1,
                }
                if !found.is_empty() {
                    break;
                }
            }
        }
        let inodes: Vec<u32> = found.iter().map(|s| s.inode).collect();
        let owners = find_owners(&self.owners, &inodes, &[pid], &[], dumped_at, deadline);
        let seen = match owners.blind.reason() {
            Some(_) => OwnersSeen::Partial(owners.blind),
            None => OwnersSeen::Complete,
        };
        let mut read = HashMap::new();
        let mut holders = Vec::with_capacity(found.len());
        for socket in found {
            let mut processes = Vec::new();
            for pid in owners.owners.get(&socket.inode).cloned().unwrap_or_default() {
                if self.read_process(&mut read, pid) {
                    processes.extend(read.get(&pid).cloned());
                }
            }
            holders.push(UnixHolder { socket, processes, owners: seen });
        }
        Ok(UnixFacts {
            path: path.clone(),
            looked_at,
            file,
            holders,
            namespaces_searched: searched,
            namespaces_unsearchable: unsearchable
                + usize::from(by_name_only.load(std::sync::atomic::Ordering::Relaxed)),
        })
    }

    /// The sockets on one port now (`bindtrace who`).
    /// The sockets on one port now (`bindtrace who`): the table, to read its holders and
    /// census; every connection too with `every_socket`.
    pub(crate) fn port_table(
        &mut self,
        netns: &Netns,
        proto: Proto,
        port: u16,
        deadline: Instant,
        every_socket: bool,
    ) -> Result<SocketTable, String> {
        self.socket_table(netns, proto, &[port], &[], deadline, every_socket)
    }

    pub(crate) fn run(&mut self, key: &LookupKey, ask: &Ask<'_>) -> Facts {
        let Ask { pid_hint, ports, unix_path, hints, deadline } = *ask;
        self.identities.begin_lookup();
        match *key {
            LookupKey::Cgroup { id, pid: 0, .. } => {
                Facts::Identity(self.identities.of_cgroup_id(id, pid_hint.unwrap_or(0)))
            }
            LookupKey::Cgroup { id, pid, .. } => Facts::Identity(self.identities.of_pid(pid).unwrap_or_else(|| {
                // Exited already. The root of the v2 hierarchy is the host's: runtimes put
                // their containers in groups of their own there, also on hybrid hosts.
                if crate::host::cgroup::v2_mount().is_some() {
                    return self.identities.of_cgroup_id(id, pid);
                }
                std::sync::Arc::new(Identity {
                    unresolved: Some(format!("process {pid} exited before its cgroup was read")),
                    ..Identity::default()
                })
            })),
            LookupKey::Publisher { port, proto } => Facts::Publisher(self.identities.starting(port, proto.name())),
            LookupKey::UnitStarting { pid, addr, port, proto } => Facts::UnitStarting(match ProcessInfo::read(pid) {
                Some(manager) if crate::host::systemd::is_manager(&manager) => {
                    crate::host::systemd::socket_unit_at(&manager, std::net::SocketAddr::new(addr, port), proto)
                }
                Some(_) => Ok(None),
                None => Err(format!("systemd (pid {pid}) exited before it could be asked")),
            }),
            LookupKey::Nat { netns } => Facts::Nat(self.nat_rules(netns, pid_hint)),
            LookupKey::UnixName { netns, pid, mnt_ns, .. } => Facts::Unix(match unix_path {
                Some(path) => self.unix_facts(netns, pid, mnt_ns, path, deadline),
                None => Err("the unix path was not passed to the lookup".to_owned()),
            }),
            LookupKey::Sockets { netns, proto } => Facts::Sockets(
                Netns::find(u64::from(netns), pid_hint)
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|ns| self.socket_table(&ns, proto, ports, hints, deadline, false)),
            ),
            LookupKey::Netns { netns } => Facts::Netns(
                Netns::find(u64::from(netns), pid_hint)
                    .and_then(|ns| ns.run(netns_facts))
                    .map_err(|e| format!("{e:#}")),
            ),
            // In a PID namespace of its own, /proc/PID is another process or none at all.
            LookupKey::Process { .. } if in_own_pid_namespace() => {
                Facts::Process(Err(ProcessUnread::OutsidePidNamespace))
            }
            LookupKey::Process { pid } => Facts::Process(
                procfs::process::Process::new(pid as i32)
                    .and_then(|process| {
                        let cgroup = crate::host::owners::cgroup_of(&process);
                        Ok((process.status()?, process.stat().ok(), cgroup))
                    })
                    .map(|(status, stat, cgroup)| ProcessFacts {
                        effective: status.capeff,
                        policy: bind_policy(pid),
                        session: stat.and_then(|stat| u32::try_from(stat.session).ok()),
                        // Chosen as the holders' are (see `cgroup_of`): the two are compared.
                        cgroup,
                    })
                    .map_err(|_| ProcessUnread::Exited),
            ),
        }
    }
}

/// The mount namespace inode of a process (`/proc/PID/ns/mnt`), if it can be read.
fn mount_namespace_of(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{pid}/ns/mnt")).ok().map(|m| m.ino())
}

/// A live process whose files are seen as in mount namespace `mnt_ns`: bindtrace itself when
/// it shares it (the host's, usually), else the first process found in it.
fn process_in_mount_namespace(mnt_ns: u32) -> Option<String> {
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
fn unix_file(pid: u32, mnt_ns: u32, path: &UnixPath) -> (UnixFile, Option<String>) {
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

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn ask(ports: &[u16]) -> Ask<'_> {
        Ask { ports, ..Ask::within(std::time::Duration::from_secs(10)) }
    }

    #[test]
    fn holders_of_a_listening_port_name_this_process() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let netns = crate::host::netns::own_inode().expect("own netns") as u32;
        let mut lookups = Lookups::default();
        let Facts::Sockets(Ok(table)) = lookups.run(&LookupKey::Sockets { netns, proto: Proto::Tcp }, &ask(&[port]))
        else {
            panic!("holder lookup failed");
        };
        assert!(table.len() >= 1);
        let holders = table.holders(port);
        assert_eq!(holders.len(), 1, "{holders:#?}");
        assert_eq!(holders[0].processes.len(), 1);
        assert_eq!(holders[0].processes[0].pid, std::process::id());
        // Resolved; on hosts where some process is off limits even to root (a supervisor
        // with capabilities bindtrace's bounding set lacks), with that said.
        match holders[0].owners {
            OwnersSeen::Complete => {}
            OwnersSeen::Partial(blind) => assert!(blind.reason().is_some() && !blind.own_pid_namespace),
            OwnersSeen::NotResolved => panic!("a scan after the dump resolves the owners"),
        }
    }

    /// The lookup that used to go wrong: a holder opened after the /proc index was built
    /// must be named, not reported as held by nobody.
    #[test]
    fn a_holder_opened_after_the_last_scan_is_named() {
        let netns = crate::host::netns::own_inode().expect("own netns") as u32;
        let mut lookups = Lookups::default();
        let early = TcpListener::bind("127.0.0.1:0").expect("listen");
        let early_port = early.local_addr().expect("addr").port();
        let key = LookupKey::Sockets { netns, proto: Proto::Tcp };
        let Facts::Sockets(Ok(_)) = lookups.run(&key, &ask(&[early_port])) else { panic!("first lookup") };
        for delay_ms in [0, 20, 100] {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            let late = TcpListener::bind("127.0.0.1:0").expect("listen");
            let port = late.local_addr().expect("addr").port();
            let Facts::Sockets(Ok(table)) = lookups.run(&key, &ask(&[port])) else { panic!("lookup") };
            let holders = table.holders(port);
            assert_eq!(holders.len(), 1, "{holders:#?}");
            assert_eq!(
                holders[0].processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
                vec![std::process::id()],
                "opened {delay_ms} ms after a lookup"
            );
        }
    }

    #[test]
    fn namespace_facts_and_capabilities() {
        let netns = crate::host::netns::own_inode().expect("own netns") as u32;
        let mut lookups = Lookups::default();
        let Facts::Netns(Ok(facts)) = lookups.run(&LookupKey::Netns { netns }, &ask(&[])) else {
            panic!("netns lookup failed");
        };
        assert!(facts.unprivileged_port_start.is_some());
        assert!(facts.nonlocal_bind_v4.is_some());
        assert!(facts.addresses.contains(&IpAddr::from([127, 0, 0, 1])), "{:?}", facts.addresses);
        let Facts::Process(Ok(_)) = lookups.run(&LookupKey::Process { pid: std::process::id() }, &ask(&[])) else {
            panic!("this process has capabilities to read");
        };
        assert_eq!(
            lookups.run(&LookupKey::Process { pid: u32::MAX / 2 }, &ask(&[])),
            Facts::Process(Err(ProcessUnread::Exited))
        );
    }
}
