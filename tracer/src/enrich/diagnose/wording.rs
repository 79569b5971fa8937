//! The sentences: who holds a port, in words a person acts on. Shared by the live diagnosis
//! and `bindtrace who`.

use std::net::SocketAddr;

use super::{
    super::{
        history::SeenBind,
        lookup::{Holder, OwnersSeen},
    },
    holder_rank,
    report::comm_text,
};
use crate::{
    clock::local_time_of_day,
    host::sockdiag::{state_name, Proto, TCP_TIME_WAIT},
};

/// "pid 4242 (nginx: master process)", or what is known about a socket no process holds
/// (bindtrace may have seen who bound it).
pub(crate) fn who(holder: &Holder, seen: Option<&SeenBind>) -> String {
    let inode = holder.socket.inode;
    match (holder.processes.as_slice(), seen) {
        ([], _) if inode == 0 => "no process".to_owned(),
        ([], Some(seen)) => format!(
            "a socket (inode {inode}) that pid {} ({}) bound at {}; {}",
            seen.pid,
            comm_text(&seen.comm),
            local_time_of_day(seen.wall_ns),
            match holder.owners {
                OwnersSeen::Complete => "no process has it open now",
                OwnersSeen::Partial(_) => "no process bindtrace can see has it open",
                OwnersSeen::NotResolved => "its process now could not be resolved",
            }
        ),
        ([], None) => match holder.owners {
            OwnersSeen::NotResolved => {
                format!("a socket (inode {inode}, uid {}) whose process could not be resolved", holder.socket.uid)
            }
            OwnersSeen::Partial(_) => {
                format!("a socket (inode {inode}, uid {}) whose process bindtrace cannot see", holder.socket.uid)
            }
            OwnersSeen::Complete => {
                format!("a socket (inode {inode}, uid {}) that no process has open", holder.socket.uid)
            }
        },
        ([first, rest @ ..], _) => {
            let name = if first.cmdline.is_empty() { &first.comm } else { &first.cmdline };
            let mut text = format!("pid {} ({})", first.pid, shortened(name, 80));
            if let Some(forwards) = &first.forwards {
                // docker-proxy's own command line is noise next to what it forwards.
                text = format!("pid {} ({}){}", first.pid, first.comm, forwards.describe());
            } else if let Some(unit) = &first.socket_unit {
                text = format!("pid {} (systemd){}", first.pid, unit.describe());
            } else if crate::host::systemd::is_manager(first) {
                text = format!("pid {} (systemd, for one of its socket units)", first.pid);
            } else if let Some(place) = first.identity.as_ref().and_then(|i| i.describe()) {
                text.push(' ');
                text.push_str(&place);
            }
            if !rest.is_empty() {
                text.push_str(&format!(" and {} more process{}", rest.len(), if rest.len() == 1 { "" } else { "es" }));
            }
            text
        }
    }
}

pub(crate) fn endpoint(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}

/// The sentence for sockets holding a port, shared with `bindtrace who`; `total` is how many
/// sockets `holders` stand for (a busy port's connections are counted, not all listed).
pub(crate) fn holders_summary(
    proto: Proto,
    port: u16,
    holders: &[Holder],
    seen: Option<&SeenBind>,
    total: usize,
) -> String {
    let total = total.max(holders.len());
    let Some(first) = holders.iter().min_by_key(|h| holder_rank(&h.socket)) else {
        return format!("nothing holds port {port}/{} now", proto.name());
    };
    if holders.iter().all(|h| h.socket.state == TCP_TIME_WAIT) {
        let expires = holders.iter().filter_map(|h| h.socket.timer_ms).max();
        return format!(
            "only TIME_WAIT sockets hold {port}/{} ({}{}), no process",
            proto.name(),
            total,
            expires.map(|ms| format!(", expires in {} s", ms.div_ceil(1000))).unwrap_or_default()
        );
    }
    let since = seen
        .filter(|_| !first.processes.is_empty())
        .map(|s| format!(" since {}", local_time_of_day(s.wall_ns)))
        .unwrap_or_default();
    let others = total - 1;
    format!(
        "port {port}/{} is held by {}, {} on {}{since}{}",
        proto.name(),
        who(first, seen),
        state_name(proto, first.socket.state),
        endpoint(first.socket.local),
        if others > 0 {
            format!(" (+{others} more socket{})", if others == 1 { "" } else { "s" })
        } else {
            String::new()
        }
    )
}

/// What to do about a holder: stop its container, service or pod by name when it runs in
/// one, else stop the process.
pub(crate) fn stop_advice(holder: &Holder) -> String {
    let Some(first) = holder.processes.first() else { return "stop it or bind another port".to_owned() };
    if let Some(forwards) = first.forwards.as_ref().filter(|f| f.container.is_some()) {
        return forwards.stop_advice();
    }
    // A systemd manager holds ports for its socket units: the unit is what to stop, never
    // the manager (PID 1).
    if let Some(unit) = &first.socket_unit {
        return unit.stop_advice();
    }
    if crate::host::systemd::is_manager(first) {
        return "systemd holds it for a socket unit (systemctl list-sockets names it): stop that socket unit, or bind \
                another port"
            .to_owned();
    }
    // Docker's own processes hold published ports for containers: stopping the daemon is
    // never the advice.
    if matches!(first.comm.as_str(), "dockerd" | "docker-proxy") {
        let port = holder.socket.local.port();
        return format!(
            "Docker holds it for a container that publishes it (docker ps --filter publish={port} names it): stop that \
             container, or bind another port"
        );
    }
    first.identity.as_ref().and_then(|i| i.stop_advice()).unwrap_or_else(|| "stop it or bind another port".to_owned())
}

/// `text` cut to `chars` characters, with an ellipsis when cut: a command line cut after
/// `bind(("0.0.0.0",18` must not read as port 18.
pub(crate) fn shortened(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_text_says_it_was_cut() {
        assert_eq!(shortened("python3 -c import socket", 80), "python3 -c import socket");
        assert_eq!(shortened("a.bind((\"0.0.0.0\",18000))", 20), "a.bind((\"0.0.0.0\",18…");
        assert_eq!(shortened("名前付き", 2), "名前…");
    }
}
