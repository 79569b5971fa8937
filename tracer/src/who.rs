//! `bindtrace who PORT[/tcp|/udp]`: who holds a port right now, with the same lookups and
//! wording as the live diagnosis, for someone who saw the error without bindtrace running.

use std::{
    io::{self, IsTerminal as _, Write as _},
    path::Path,
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    cli::{self, OutputFormat, WhoArgs},
    enrich::{
        diagnose::{endpoint, holder_report, holders_summary, HolderReport},
        lookup::{Holder, Lookups},
        netns::Netns,
        sockdiag::{state_name, Proto},
    },
    sink::{
        columns::{Align, Columns},
        push_escaped,
    },
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
}

/// Whether anything holds the port (exit status 0) or not (1).
pub enum Verdict {
    Held,
    Free,
}

fn open_netns(spec: Option<&str>) -> Result<Netns> {
    match spec {
        None => Ok(Netns::Own),
        Some(pid) if pid.bytes().all(|b| b.is_ascii_digit()) => {
            Netns::open_path(Path::new(&format!("/proc/{pid}/ns/net")))
                .with_context(|| format!("--netns {pid}: no such process"))
        }
        Some(path) => Netns::open_path(Path::new(path)),
    }
}

/// Resolves the namespace; an unknown one is bad input (exit 2), so this runs first.
pub fn prepare(args: &WhoArgs) -> Result<Netns> {
    open_netns(args.netns.as_deref())
}

pub fn run(args: &WhoArgs, netns: &Netns) -> Result<Verdict> {
    let protos: &[Proto] = match args.target.proto {
        Some(cli::Proto::Tcp) => &[Proto::Tcp],
        Some(cli::Proto::Udp) => &[Proto::Udp],
        None => &[Proto::Tcp, Proto::Udp],
    };
    let port = args.target.port;
    let table =
        args.output.unwrap_or(if io::stdout().is_terminal() { OutputFormat::Table } else { OutputFormat::Ndjson })
            == OutputFormat::Table;
    let mut lookups = Lookups::default();
    let mut out = String::new();
    let mut held = false;
    let mut blind_said = false;
    for &proto in protos {
        let holders = lookups.holders(netns, proto, port).map_err(anyhow::Error::msg)?;
        if holders.is_empty() && args.target.proto.is_none() && table {
            continue;
        }
        held |= !holders.is_empty();
        if let Some(why) = holders.iter().filter(|h| h.processes.is_empty()).find_map(|h| h.blind_reason()) {
            if !blind_said {
                eprintln!("bindtrace: {why}: a socket shown without a process may still have one");
                blind_said = true;
            }
        }
        let summary = holders_summary(proto, port, &holders, None);
        if table {
            render_table(&mut out, &holders, &summary);
        } else {
            let record = WhoRecord {
                kind: "who",
                port,
                proto,
                netns: netns.inode(),
                summary: &summary,
                holders: holders.iter().map(|h| holder_report(h, None)).collect(),
            };
            out.push_str(&serde_json::to_string(&record)?);
            out.push('\n');
        }
    }
    if !held && table {
        out.push_str(&format!("nothing holds port {port} in this network namespace\n"));
    }
    let mut stdout = io::stdout().lock();
    match stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => return Err(err).context("writing the answer"),
        _ => {}
    }
    Ok(if held { Verdict::Held } else { Verdict::Free })
}

fn render_table(out: &mut String, holders: &[Holder], summary: &str) {
    use std::fmt::Write as _;
    if holders.is_empty() {
        let _ = writeln!(out, "{summary}");
        return;
    }
    let escaped = |text: &str| {
        let mut escaped = String::new();
        push_escaped(&mut escaped, text.as_bytes());
        escaped
    };
    let mut table = Columns::new(
        ["PROTO", "STATE", "LOCAL", "PEER", "PID", "COMM", "UID", "CGROUP"],
        [Align::Left, Align::Left, Align::Left, Align::Left, Align::Right, Align::Left, Align::Right, Align::Left],
    );
    for holder in holders {
        let socket = &holder.socket;
        let peer = if socket.peer.ip().is_unspecified() { "-".to_owned() } else { endpoint(socket.peer) };
        let state = state_name(socket.proto, socket.state);
        // One row per process holding the socket; one row saying so when none does.
        let rows: Vec<(String, String, String)> = if holder.processes.is_empty() {
            let note = match (socket.timer_ms, holder.blind_reason()) {
                (_, Some(_)) => "(not visible)".to_owned(),
                (Some(ms), None) => format!("(no process; timer {} s)", ms.div_ceil(1000)),
                (None, None) => "(no process)".to_owned(),
            };
            vec![("-".to_owned(), note, "-".to_owned())]
        } else {
            holder
                .processes
                .iter()
                .map(|process| {
                    (process.pid.to_string(), escaped(&process.comm), escaped(process.cgroup.as_deref().unwrap_or("-")))
                })
                .collect()
        };
        for (pid, comm, cgroup) in rows {
            table.row([
                socket.proto.name().to_owned(),
                state.to_owned(),
                endpoint(socket.local),
                peer.clone(),
                pid,
                comm,
                socket.uid.to_string(),
                cgroup,
            ]);
        }
    }
    table.render(out);
    out.push_str("  └ ");
    push_escaped(out, summary.as_bytes());
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::{lookup::OwnersSeen, owners::ProcessInfo, sockdiag::DiagSocket};

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
        };
        let holders = vec![
            holder("[::]:8080", 10, None, vec![process("名前付きプロセス"), process("a\u{1b}b")]),
            holder("127.0.0.1:8080", 6, Some(59_500), vec![]),
        ];
        let mut out = String::new();
        render_table(&mut out, &holders, "summary");
        let rows: Vec<&str> = out.lines().filter(|l| !l.starts_with("  └")).collect();
        assert_eq!(rows.len(), 4, "{out}");
        let last_column = |row: &str| crate::sink::columns::width(&row[..row.rfind(' ').expect("space") + 1]);
        let at = last_column(rows[0]);
        assert!(rows.iter().all(|row| last_column(row) == at), "{out}");
        assert!(out.contains("(no process; timer 60 s)") && out.contains("a\\u{1b}b"), "{out}");
    }
}
