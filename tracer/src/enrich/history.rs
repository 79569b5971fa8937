//! The binds bindtrace itself saw succeed, so a diagnosis can say when a holder bound its port
//! and with which options (inet_diag reports neither).

use std::{collections::HashMap, net::IpAddr};

use bindtrace_common::{sock_flags, BindEvent, COMM_LEN};

use crate::decode::BindEventExt as _;

/// Most binds remembered; when full, the history starts over (a bounded window, not a leak).
const CAPACITY: usize = 65_536;

/// (netns inode, IP protocol, port)
pub type PortKey = (u32, u16, u16);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenBind {
    pub wall_ns: i128,
    pub pid: u32,
    pub comm: [u8; COMM_LEN],
    pub uid: u32,
    pub addr: Option<IpAddr>,
    pub reuseaddr: bool,
    pub reuseport: bool,
}

#[derive(Default)]
pub struct BindHistory {
    seen: HashMap<PortKey, Vec<SeenBind>>,
    len: usize,
}

/// The port a successful bind ended up on (the kernel's pick for port 0).
fn effective_port(event: &BindEvent) -> u16 {
    if event.port == 0 && event.bound_port != 0 {
        event.bound_port
    } else {
        event.port
    }
}

impl BindHistory {
    pub fn record(&mut self, event: &BindEvent, wall_ns: i128) {
        if event.ret != 0 || !event.has(sock_flags::SOCK_INFO) || event.requested_ip().is_none() {
            return;
        }
        let port = effective_port(event);
        if port == 0 {
            return;
        }
        if self.len >= CAPACITY {
            self.seen.clear();
            self.len = 0;
        }
        let seen = SeenBind {
            wall_ns,
            pid: event.tgid,
            comm: event.comm,
            uid: event.uid,
            addr: event.requested_ip(),
            reuseaddr: event.has(sock_flags::REUSEADDR),
            reuseport: event.has(sock_flags::REUSEPORT),
        };
        self.seen.entry((event.netns_ino, event.protocol, port)).or_default().push(seen);
        self.len += 1;
    }

    /// The processes seen binding this port, latest first.
    pub fn binders(&self, key: PortKey) -> impl Iterator<Item = u32> + '_ {
        self.seen.get(&key).into_iter().flat_map(|binds| binds.iter().rev().map(|b| b.pid))
    }

    /// The latest bind seen on this port by `pid` (when given) or by anyone.
    pub fn latest(&self, key: PortKey, pid: Option<u32>) -> Option<&SeenBind> {
        let binds = self.seen.get(&key)?;
        binds.iter().rev().find(|b| pid.is_none_or(|p| p == b.pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::tests::sample_event;

    #[test]
    fn remembers_successes_by_netns_proto_port() {
        let mut history = BindHistory::default();
        let mut ok = sample_event();
        ok.ret = 0;
        ok.netns_ino = 7;
        history.record(&ok, 100);
        history.record(&sample_event(), 200); // a failure is not a holder
        let seen = history.latest((7, 6, 8080), None).expect("seen");
        assert_eq!((seen.wall_ns, seen.pid, seen.reuseaddr), (100, 4242, true));
        assert!(history.latest((7, 6, 8080), Some(1)).is_none());
        assert!(history.latest((8, 6, 8080), None).is_none(), "other namespace");
        assert!(history.latest((7, 17, 8080), None).is_none(), "other protocol");
    }

    #[test]
    fn port_zero_is_remembered_under_the_picked_port() {
        let mut history = BindHistory::default();
        let mut ok = sample_event();
        ok.ret = 0;
        ok.port = 0;
        ok.bound_port = 41000;
        history.record(&ok, 1);
        assert!(history.latest((ok.netns_ino, 6, 41000), None).is_some());
    }
}
