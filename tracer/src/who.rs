//! `bindtrace who PORT[/tcp|/udp]`: who holds a port right now, with the same lookups and
//! wording as the live diagnosis, for someone who saw the error without bindtrace running.

use std::{
    io::{self, IsTerminal as _, Write as _},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    cli::{self, OutputFormat, WhoArgs},
    enrich::{
        diagnose::{endpoint, holder_rank, holder_report, holders_summary},
        lookup::{is_connection, Holder, Lookups, PortCensus},
    },
    host::{
        nat::NatRules,
        netns::{other_namespaces, Netns},
        owners::ProcessInfo,
        runtimes::{Container, Publication},
        sockdiag::{state_name, Proto},
    },
    model::{shrink_holders, HolderReport, HoldersSummary},
    sink::columns::{Align, Columns},
    text::push_for_terminal,
};

#[derive(Serialize)]
struct WhoRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    port: u16,
    proto: Proto,
    netns: Option<u64>,
    summary: &'a str,
    holders: Vec<HolderReport>,
    /// Every socket on the port, counted, when `holders` lists some of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    holders_summary: Option<HoldersSummary>,
    /// Containers whose runtime publishes this host port (Docker, podman), held by a socket
    /// or only reserved in the runtime's own port table.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    published_by: Vec<PublishedBy>,
    /// NAT rules (DNAT, REDIRECT) that take the port's traffic before any socket sees it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    forwarded_by: Vec<crate::host::nat::NatClaim>,
}

/// One socket on the port (`who --all -o ndjson`).
#[derive(Serialize)]
struct WhoSocket<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    netns: Option<u64>,
    #[serde(flatten)]
    holder: &'a HolderReport,
}

/// The longest NDJSON line bindtrace writes (docs/ndjson-schema.md).
const LINE_BYTES_MAX: usize = 16 * 1024;
/// Connections listed as examples in a `who` record without `--all`.
const CONNECTIONS_LISTED: usize = 2;
/// Sockets that are not connections listed in a `who` record.
const BINDS_LISTED: usize = 64;

/// The holders a record lists: those that bind the port (listeners, bound, UDP) and a few
/// connections; every one with `all`.
fn listed_holders(holders: &[Holder], all: bool) -> Vec<&Holder> {
    if all {
        return holders.iter().collect();
    }
    holders
        .iter()
        .filter(|h| !is_connection(h.socket.state))
        .take(BINDS_LISTED)
        .chain(holders.iter().filter(|h| is_connection(h.socket.state)).take(CONNECTIONS_LISTED))
        .collect()
}

/// The count of every socket on the port by state, when fewer are listed.
fn counted(proto: Proto, census: Option<&PortCensus>, listed: usize, total: usize) -> Option<HoldersSummary> {
    let census = census?;
    let mut by_state = std::collections::BTreeMap::new();
    for group in &census.groups {
        *by_state.entry(state_name(proto, group.state)).or_default() += group.count as usize;
    }
    (total > listed).then(|| HoldersSummary {
        total,
        shown: listed,
        by_state,
        distinct_peers: (census.distinct_peers > 0).then_some(census.distinct_peers),
        truncated: true,
    })
}

#[derive(Clone, Serialize)]
struct PublishedBy {
    container: Container,
    /// `0.0.0.0:18500 -> web1:8080/tcp`
    mapping: String,
    /// A socket holds the published address; `false`: only the runtime's port table does.
    socket: bool,
}

/// How long `who` searches /proc for the owners of one port's sockets before it says how far
/// it got: a person waits for it.
const SEARCH_BUDGET: Duration = Duration::from_secs(5);

/// Whether anything holds the port (exit status 0) or not (1).
pub(crate) enum Verdict {
    Held,
    Free,
}

fn open_netns(spec: Option<&str>) -> Result<Netns> {
    match spec {
        None => Ok(Netns::Own),
        Some(pid) if pid.bytes().all(|b| b.is_ascii_digit()) => {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                anyhow::bail!("--netns {pid}: no such process");
            }
            Netns::open_path(Path::new(&format!("/proc/{pid}/ns/net"))).with_context(|| format!("--netns {pid}"))
        }
        Some(path) => Netns::open_path(Path::new(path)),
    }
}

/// Resolves the namespace; an unknown one is bad input (exit 2), so this runs first.
pub(crate) fn prepare(args: &WhoArgs) -> Result<Netns> {
    open_netns(args.netns.as_deref())
}

/// Every network namespace for `--all-netns`: bindtrace's own first, then those of the
/// processes it can see and the named ones in /run/netns; and how many processes' namespaces
/// could not be read.
fn every_namespace() -> (Vec<Netns>, usize) {
    let own = Netns::Own.inode().unwrap_or(0);
    let (mut paths, unreadable) = other_namespaces(own);
    paths.extend(std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.path()));
    let mut seen = std::collections::HashSet::from([own]);
    let mut namespaces = vec![Netns::Own];
    for path in paths {
        if let Ok(netns) = Netns::open_path(&path) {
            if netns.inode().is_some_and(|inode| seen.insert(inode)) {
                namespaces.push(netns);
            }
        }
    }
    (namespaces, unreadable)
}

pub(crate) fn run(args: &WhoArgs, netns: &Netns) -> Result<Verdict> {
    let protos: &[Proto] = match args.target.proto {
        Some(cli::Proto::Tcp) => &[Proto::Tcp],
        Some(cli::Proto::Udp) => &[Proto::Udp],
        None => &[Proto::Tcp, Proto::Udp],
    };
    let port = args.target.port;
    let format =
        args.output.unwrap_or(if io::stdout().is_terminal() { OutputFormat::Table } else { OutputFormat::Ndjson });
    let table = format == OutputFormat::Table;
    let mut lookups = Lookups::default();
    let mut out = String::new();
    let mut held = false;
    let mut blind_said = false;
    let every;
    let (namespaces, unreadable): (&[Netns], usize) = if args.all_netns {
        every = every_namespace();
        (&every.0, every.1)
    } else {
        (std::slice::from_ref(netns), 0)
    };
    if unreadable > 0 {
        crate::say::line(&format!("the network namespaces of {unreadable} process{} could not be read or were past the 256 searched: holders there are not shown",
            if unreadable == 1 { "" } else { "es" }
        ));
    }
    // Host ports that container runtimes publish: they belong to the host's namespace.
    let (published, unreachable) = lookups.identities.publishing(port);
    for why in &unreachable {
        crate::say::line(&format!("containers that publish port {port} could not be listed: {why}"));
    }
    for namespace in namespaces {
        let on_host = matches!(namespace, Netns::Own);
        // A port may be claimed by a NAT rule with no socket on it at all.
        let nat = match namespace.run(NatRules::read) {
            Ok(mut rules) => {
                lookups.identities.name_nat_destinations(&mut rules);
                for why in &rules.unread {
                    crate::say::line(&format!("{why}: a NAT rule there that claims port {port} is not shown"));
                }
                rules
            }
            Err(err) => {
                crate::say::line(&format!("the NAT rules could not be read: {err:#}"));
                NatRules::default()
            }
        };
        for &proto in protos {
            let forwarded_by: Vec<_> = nat.on_port(proto, port, None, false).into_iter().cloned().collect();
            let found = lookups
                .port_table(namespace, proto, port, Instant::now() + SEARCH_BUDGET, args.all)
                .map_err(anyhow::Error::msg)?;
            let mut holders = found.holders(port);
            holders.sort_by_key(|h| holder_rank(&h.socket));
            let total = found.census(port).map_or(holders.len(), PortCensus::total);
            let published_by: Vec<PublishedBy> = published
                .iter()
                .filter(|(_, p)| on_host && p.proto == proto.name())
                .map(|(container, publication)| PublishedBy {
                    container: container.clone(),
                    mapping: publication.mapping(&container.label()),
                    socket: has_socket(&holders, publication),
                })
                .collect();
            let quiet = args.target.proto.is_none() || args.all_netns;
            if holders.is_empty() && published_by.is_empty() && forwarded_by.is_empty() && quiet && table {
                continue;
            }
            held |= !holders.is_empty() || !published_by.is_empty() || !forwarded_by.is_empty();
            if let Some(why) = holders.iter().filter(|h| h.processes.is_empty()).find_map(|h| h.blind_reason()) {
                if !blind_said {
                    crate::say::line(&format!("{why}: a socket shown without a process may still have one"));
                    blind_said = true;
                }
            }
            let mut summary = if holders.is_empty() && !published_by.is_empty() {
                allocator_only(proto, port, &published_by)
            } else if holders.is_empty() && !forwarded_by.is_empty() {
                format!("no socket holds port {port}/{}, but NAT takes its traffic", proto.name())
            } else {
                holders_summary(proto, port, &holders, None, total)
            };
            if let Some(first) = forwarded_by.first() {
                let joint = if holders.is_empty() && published_by.is_empty() { ":" } else { "; also," };
                summary = format!("{summary}{joint} {}", first.describe());
                let more = forwarded_by.len() - 1;
                if more > 0 {
                    summary.push_str(&format!(" (+{more} more rule{})", if more == 1 { "" } else { "s" }));
                }
            }
            if table {
                if args.all_netns {
                    out.push_str(&format!("network namespace {}:\n", namespace.inode().unwrap_or(0)));
                }
                render_table(&mut out, &holders, found.census(port), args.all, &summary);
                for publisher in &published_by {
                    let container = &publisher.container;
                    let line = format!(
                        "published by {} container {}: {}{}",
                        container.runtime.name(),
                        container.label(),
                        publisher.mapping,
                        if publisher.socket { "" } else { " (no socket: only the runtime's port table holds it)" }
                    );
                    out.push_str("  └ ");
                    push_for_terminal(&mut out, &line);
                    out.push('\n');
                }
                for claim in &forwarded_by {
                    out.push_str("  └ ");
                    push_for_terminal(&mut out, &claim.describe());
                    out.push('\n');
                }
            } else {
                // With --all every socket has a line of its own below; the record lists those
                // that bind the port and counts the rest, as without it.
                let listed = listed_holders(&holders, false);
                let mut record = WhoRecord {
                    kind: "who",
                    port,
                    proto,
                    netns: namespace.inode(),
                    summary: &summary,
                    holders: listed.iter().map(|h| holder_report(h, None)).collect(),
                    holders_summary: counted(proto, found.census(port), listed.len(), total),
                    published_by,
                    forwarded_by,
                };
                // Every line under 16 KiB (docs/ndjson-schema.md): the list is cut, and said so.
                let mut line = serde_json::to_string(&record)?;
                while line.len() > LINE_BYTES_MAX && shrink_holders(&mut record.holders) {
                    let summary = record
                        .holders_summary
                        .get_or_insert_with(|| HoldersSummary { total, ..HoldersSummary::default() });
                    summary.shown = record.holders.len();
                    summary.truncated = true;
                    line = serde_json::to_string(&record)?;
                }
                out.push_str(&line);
                out.push('\n');
                if args.all {
                    // Every socket, one line each.
                    for holder in &holders {
                        let mut reports = vec![holder_report(holder, None)];
                        let encode = |reports: &[HolderReport]| {
                            let holder = &reports[0];
                            serde_json::to_string(&WhoSocket { kind: "who_socket", netns: namespace.inode(), holder })
                        };
                        let mut line = encode(&reports)?;
                        while line.len() > LINE_BYTES_MAX && shrink_holders(&mut reports) {
                            line = encode(&reports)?;
                        }
                        out.push_str(&line);
                        out.push('\n');
                    }
                }
            }
        }
    }
    if !held && table {
        let place = if args.all_netns { "any network namespace bindtrace can see" } else { "this network namespace" };
        out.push_str(&format!("nothing holds port {port} in {place}\n"));
    }
    if format == OutputFormat::None {
        // The exit status alone.
        out.clear();
    }
    let mut stdout = io::stdout().lock();
    match stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => return Err(err).context("writing the answer"),
        _ => {}
    }
    Ok(if held { Verdict::Held } else { Verdict::Free })
}

/// A host port that a runtime publishes with no socket on it: the conflict a `docker run -p`
/// reports ("port is already allocated") is the runtime's own table, not the kernel's.
fn allocator_only(proto: Proto, port: u16, published_by: &[PublishedBy]) -> String {
    // One entry per container, with all its mappings of the port.
    let mut containers: Vec<(&Container, Vec<&str>)> = Vec::new();
    for publisher in published_by {
        match containers.iter_mut().find(|(c, _)| c.id == publisher.container.id) {
            Some((_, mappings)) => mappings.push(&publisher.mapping),
            None => containers.push((&publisher.container, vec![&publisher.mapping])),
        }
    }
    let names: Vec<String> =
        containers.iter().map(|(c, mappings)| format!("container {} ({})", c.label(), mappings.join(", "))).collect();
    let stop: Vec<String> = containers.iter().map(|(c, _)| c.stop_command()).collect();
    let runtime = containers.first().map_or("the runtime", |(c, _)| c.runtime.name());
    format!(
        "no socket holds port {port}/{} in the kernel, but {runtime} reserves it for {}: a new -p {port}:... fails with \
         \"port is already allocated\" in {runtime}'s own port table, not in the kernel; {} frees it",
        proto.name(),
        names.join(", "),
        stop.join(" or ")
    )
}

/// Does a socket hold the host address a publication names?
fn has_socket(holders: &[Holder], publication: &Publication) -> bool {
    holders.iter().any(|h| match publication.host_ip {
        Some(ip) => h.socket.local.ip() == ip,
        None => true,
    })
}

/// The holders as a table: one row per process of each socket that binds the port, and the
/// connections one row per state with their count (each connection with `all`).
fn render_table(out: &mut String, holders: &[Holder], census: Option<&PortCensus>, all: bool, summary: &str) {
    use std::fmt::Write as _;
    if holders.is_empty() {
        let _ = writeln!(out, "{}", crate::text::for_terminal(summary));
        return;
    }
    let escaped = crate::text::for_terminal;
    let mut table = Columns::new(
        ["PROTO", "STATE", "LOCAL", "PEER", "PID", "COMM", "UID", "WHERE"],
        [Align::Left, Align::Left, Align::Left, Align::Left, Align::Right, Align::Left, Align::Right, Align::Left],
    );
    for holder in holders.iter().filter(|h| all || !is_connection(h.socket.state)) {
        let socket = &holder.socket;
        let peer = if socket.peer.ip().is_unspecified() { "-".to_owned() } else { endpoint(socket.peer) };
        let state = state_name(socket.proto, socket.state);
        // One row per process holding the socket, with the process's own uid (a socket made
        // by root and handed to a worker that dropped privileges differ); one row saying so
        // when none does, with the uid of the socket.
        let rows: Vec<(String, String, String, String)> = if holder.processes.is_empty() {
            let note = match (socket.timer_ms, holder.blind_reason()) {
                (_, Some(_)) => "(not visible)".to_owned(),
                (Some(ms), None) => format!("(no process; timer {} s)", ms.div_ceil(1000)),
                (None, None) => "(no process)".to_owned(),
            };
            vec![("-".to_owned(), note, format!("{} (socket)", socket.uid), "-".to_owned())]
        } else {
            holder
                .processes
                .iter()
                .map(|process| {
                    let uid = process.uid.map_or_else(|| "?".to_owned(), |uid| uid.to_string());
                    (process.pid.to_string(), escaped(&process.comm), uid, escaped(&runs_in(process)))
                })
                .collect()
        };
        for (pid, comm, uid, cgroup) in rows {
            table.row([
                socket.proto.name().to_owned(),
                state.to_owned(),
                endpoint(socket.local),
                peer.clone(),
                pid,
                comm,
                uid,
                cgroup,
            ]);
        }
    }
    if !all {
        connection_rows(&mut table, holders, census);
    }
    table.render(out);
    out.push_str("  └ ");
    push_for_terminal(out, summary);
    out.push('\n');
}

/// The port's connections, one row per state: how many, from how many peers.
fn connection_rows(table: &mut Columns<8>, holders: &[Holder], census: Option<&PortCensus>) {
    let Some(proto) = holders.first().map(|h| h.socket.proto) else { return };
    let mut by_state: std::collections::BTreeMap<u8, (usize, Vec<std::net::IpAddr>)> = Default::default();
    match census {
        Some(census) => {
            for group in census.groups.iter().filter(|g| is_connection(g.state)) {
                let entry = by_state.entry(group.state).or_default();
                entry.0 += group.count as usize;
                if !entry.1.contains(&group.local) {
                    entry.1.push(group.local);
                }
            }
        }
        None => {
            for holder in holders.iter().filter(|h| is_connection(h.socket.state)) {
                let entry = by_state.entry(holder.socket.state).or_default();
                entry.0 += 1;
                if !entry.1.contains(&holder.socket.local.ip()) {
                    entry.1.push(holder.socket.local.ip());
                }
            }
        }
    }
    let port = holders[0].socket.local.port();
    let peers = census.map(|c| c.distinct_peers).filter(|&n| n > 0);
    for (state, (count, locals)) in by_state {
        let local = match locals.as_slice() {
            [one] => endpoint(std::net::SocketAddr::new(*one, port)),
            _ => format!("{} addresses:{port}", locals.len()),
        };
        table.row([
            proto.name().to_owned(),
            state_name(proto, state).to_owned(),
            local,
            peers.map_or_else(|| "-".to_owned(), |n| format!("{n} peer{}", if n == 1 { "" } else { "s" })),
            "-".to_owned(),
            format!("({count} socket{}; --all lists them)", if count == 1 { "" } else { "s" }),
            "-".to_owned(),
            "-".to_owned(),
        ]);
    }
}

/// The WHERE cell: what a docker-proxy forwards to, the pod or container, else the unit,
/// else the cgroup path.
fn runs_in(process: &ProcessInfo) -> String {
    if let Some(forwards) = &process.forwards {
        return format!("-> {}", forwards.mapping.split_once(" -> ").map_or(forwards.mapping.as_str(), |(_, to)| to));
    }
    let identity = process.identity.as_ref();
    if let Some(name) = identity.and_then(|i| i.short()) {
        let kind = if identity.is_some_and(|i| i.pod.is_some()) { "pod" } else { "container" };
        return format!("{kind} {name}");
    }
    identity.and_then(|i| i.unit.clone()).or_else(|| process.cgroup.clone()).unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{enrich::lookup::OwnersSeen, host::sockdiag::DiagSocket};

    fn holder(local: &str, state: u8, timer_ms: Option<u32>, processes: Vec<ProcessInfo>) -> Holder {
        Holder {
            socket: DiagSocket {
                proto: Proto::Tcp,
                local: local.parse().expect("addr"),
                peer: "[2001:db8:85a3:1234:8a2e:370:7334:abcd]:65535".parse().expect("addr"),
                state,
                uid: 0,
                inode: if timer_ms.is_some() { 0 } else { 7 },
                timer_ms,
                v6only: None,
            },
            processes,
            owners: OwnersSeen::Complete,
        }
    }

    /// Issue 11: `(no process; timer 60 s)`, wide names and long IPv6 addresses shifted the
    /// columns after them.
    #[test]
    fn every_row_starts_its_cgroup_at_the_same_column() {
        let process = |comm: &str| ProcessInfo {
            pid: 4242,
            comm: comm.into(),
            cmdline: String::new(),
            cgroup: Some("/system.slice/x.service".into()),
            uid: Some(0),
            identity: None,
            forwards: None,
            socket_unit: None,
            start_time: 0,
            session: 0,
        };
        let holders = vec![
            holder("[::]:8080", 10, None, vec![process("名前付きプロセス"), process("a\u{1b}b")]),
            holder("127.0.0.1:8080", 6, Some(59_500), vec![]),
        ];
        let mut out = String::new();
        render_table(&mut out, &holders, None, true, "summary");
        let rows: Vec<&str> = out.lines().filter(|l| !l.starts_with("  └")).collect();
        assert_eq!(rows.len(), 4, "{out}");
        let last_column = |row: &str| crate::sink::columns::width(&row[..row.rfind(' ').expect("space") + 1]);
        let at = last_column(rows[0]);
        assert!(rows.iter().all(|row| last_column(row) == at), "{out}");
        assert!(out.contains("(no process; timer 60 s)") && out.contains("a\\u{1b}b"), "{out}");
    }
}
