//! The socket table of one (netns, proto) on the failing ports: each socket with its owners,
//! ranked and counted (a census of every socket on the port, kept or not).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use serde::Serialize;

use crate::host::{
    identity::Forwarding,
    owners::{Blind, ProcessInfo},
    sockdiag::{DiagSocket, SocketSink, TCP_BOUND, TCP_CLOSE, TCP_LISTEN, TCP_TIME_WAIT},
};

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
pub(super) const CONNECTIONS_KEPT: usize = 4;
/// Sockets that are not connections (listeners, bound-only, UDP) kept per port; counted beyond.
pub(super) const UNCONNECTED_KEPT: usize = 256;
/// Distinct peer addresses counted per port; past this the count reads "at least".
pub(super) const PEERS_COUNTED_MAX: usize = 65_536;
/// Up to this many failing ports get a dump each, filtered by port in the kernel; more share
/// one dump of the whole table, filtered here.
pub(super) const FILTERED_DUMPS_MAX: usize = 8;

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
pub(super) struct RangeSocket {
    pub(super) port: u16,
    pub(super) local: IpAddr,
    v6only: Option<bool>,
    pub(super) time_wait: bool,
}

/// Takes a dump one socket at a time and keeps what a diagnosis uses: the sockets on the
/// asked ports (connections only a few per state and address), counts of all of them, and,
/// when a bind to port 0 failed, a compact list of the ephemeral range.
pub(super) struct TableBuilder<'a> {
    /// `None`: every socket delivered is on an asked port (the kernel filtered the dump).
    pub(super) ports: Option<&'a HashSet<u16>>,
    pub(super) range: Option<(u16, u16)>,
    pub(super) kept: Vec<DiagSocket>,
    pub(super) kept_per_group: HashMap<(u16, u8, IpAddr), usize>,
    pub(super) unconnected_per_port: HashMap<u16, usize>,
    pub(super) census: HashMap<u16, (PortCensus, HashSet<IpAddr>)>,
    pub(super) range_sockets: Vec<RangeSocket>,
    pub(super) total: usize,
    /// The port whose dump is being read, when each port has a dump of its own.
    pub(super) dumping: Option<u16>,
    pub(super) every_socket: bool,
}

impl<'a> TableBuilder<'a> {
    pub(super) fn new(ports: Option<&'a HashSet<u16>>, range: Option<(u16, u16)>) -> Self {
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
    pub(super) fn now_dumping(&mut self, port: Option<u16>) {
        self.dumping = port;
    }

    /// Keeps every socket, connections too (`who --all`).
    pub(super) fn keep_every_socket(&mut self) {
        self.every_socket = true;
    }

    pub(super) fn finish(self) -> SocketTable {
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
    pub(super) by_port: Vec<DiagSocket>,
    /// Every socket on each asked port, counted (`by_port` keeps only some connections).
    pub(super) census: HashMap<u16, PortCensus>,
    /// With a bind to port 0 among the failures: the sockets of the ephemeral range, sorted by
    /// port, to count the ports taken.
    pub(super) range: Vec<RangeSocket>,
    /// Socket inode → pids, for the sockets on the ports asked about.
    pub(super) owners: HashMap<u32, Vec<u32>>,
    pub(super) processes: HashMap<u32, ProcessInfo>,
    /// The ports whose owners were looked for after the dump.
    pub(super) resolved_ports: HashSet<u16>,
    /// Sockets a container runtime's daemon holds for a published port, by inode: the
    /// container and mapping, from the runtime's API.
    pub(super) published: HashMap<u32, Forwarding>,
    /// Sockets a systemd manager holds for a socket unit, by inode: the unit, from systemd.
    pub(super) socket_units: HashMap<u32, crate::host::systemd::SocketUnit>,
    /// How far the search for owners got.
    pub(super) seen: OwnersSeen,
    /// Sockets whose processes were found but could not be read after (they exited, or the
    /// pid is another process's now): not known, never "no process".
    pub(super) unread_owners: HashSet<u32>,
    pub(super) sockets: usize,
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

    pub(super) fn on_port(&self, port: u16) -> &[DiagSocket] {
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
