//! The facts a diagnosis needs, gathered from the kernel and /proc. Everything here may take
//! milliseconds, so it runs on the attribution worker thread, never on the event path.
mod netns;
mod socket_table;
mod unix;

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use crate::decode::UnixPath;
use crate::host::{
    identity::{Identities, Identity, Publishing},
    nat::NatRules,
    netns::{read_port_range, Netns},
    owners::{find_owners, in_own_pid_namespace, ProcessInfo, SharedOwnerIndex},
    policy::{bind_policy, BindPolicy},
    sockdiag::{collect_sockets, Proto},
    unixdiag::{bound_sockets, bound_sockets_from_proc, kernel_dev_to_user, UnixSocket},
};

#[cfg(test)]
pub(crate) use self::netns::Ipv6State;
use self::{
    netns::netns_facts,
    socket_table::{TableBuilder, FILTERED_DUMPS_MAX},
    unix::unix_file,
};
pub(crate) use self::{
    netns::{NetnsFacts, IFA_F_DADFAILED, IFA_F_OPTIMISTIC, IFA_F_TENTATIVE},
    socket_table::{is_connection, Holder, OwnersSeen, PortCensus, SocketTable},
    unix::{UnixFacts, UnixFile, UnixHolder},
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
#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use std::net::IpAddr;

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
