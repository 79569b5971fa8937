//! The binds bindtrace itself saw succeed, so a diagnosis can say when a holder bound its port
//! and with which options (inet_diag reports neither).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use bindtrace_common::{sock_flags, BindEvent, COMM_LEN};

use crate::decode::BindEventExt as _;

/// Most binds remembered; past it the oldest is forgotten, one for each new one, so memory
/// stays flat on a host that binds new ports all day (about 130 bytes a bind) and a storm of
/// short-lived binds never wipes the whole history at once.
const CAPACITY: usize = 16_384;

/// (netns inode, IP protocol, port)
pub(crate) type PortKey = (u32, u16, u16);

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SeenBind {
    pub wall_ns: i128,
    pub pid: u32,
    pub comm: [u8; COMM_LEN],
    pub uid: u32,
    pub addr: Option<IpAddr>,
    pub reuseaddr: bool,
    pub reuseport: bool,
}

#[derive(Default)]
pub(crate) struct BindHistory {
    /// Per port, oldest first.
    seen: HashMap<PortKey, Vec<SeenBind>>,
    /// The port of every remembered bind, oldest first.
    order: VecDeque<PortKey>,
}

/// The port a successful bind ended up on (the kernel's pick for port 0).
pub(crate) fn effective_port(event: &BindEvent) -> u16 {
    if event.port == 0 && event.bound_port != 0 {
        event.bound_port
    } else {
        event.port
    }
}

impl BindHistory {
    pub(crate) fn record(&mut self, event: &BindEvent, wall_ns: i128) {
        if event.ret != 0 || !event.has(sock_flags::SOCK_INFO) || event.requested_ip().is_none() {
            return;
        }
        let port = effective_port(event);
        if port == 0 {
            return;
        }
        if self.order.len() >= CAPACITY {
            self.forget_oldest();
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
        let key = (event.netns_ino, event.protocol, port);
        self.seen.entry(key).or_default().push(seen);
        self.order.push_back(key);
    }

    fn forget_oldest(&mut self) {
        let Some(key) = self.order.pop_front() else { return };
        if let Some(binds) = self.seen.get_mut(&key) {
            if !binds.is_empty() {
                binds.remove(0);
            }
            if binds.is_empty() {
                self.seen.remove(&key);
            }
        }
    }

    /// The processes seen binding this port, latest first.
    pub(crate) fn binders(&self, key: PortKey) -> impl Iterator<Item = u32> + '_ {
        self.seen.get(&key).into_iter().flat_map(|binds| binds.iter().rev().map(|b| b.pid))
    }

    /// The latest bind seen on this port by `pid` (when given) or by anyone.
    pub(crate) fn latest(&self, key: PortKey, pid: Option<u32>) -> Option<&SeenBind> {
        let binds = self.seen.get(&key)?;
        binds.iter().rev().find(|b| pid.is_none_or(|p| p == b.pid))
    }

    /// [`Self::latest`] for the socket bound to `addr`: a process holding 0.0.0.0:P and
    /// [::]:P made two binds, and only the blocking socket's tells when it began.
    pub(crate) fn latest_at(&self, key: PortKey, pid: Option<u32>, addr: IpAddr) -> Option<&SeenBind> {
        let binds = self.seen.get(&key)?;
        binds.iter().rev().find(|b| pid.is_none_or(|p| p == b.pid) && b.addr == Some(addr))
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

    /// Full, it forgets the oldest bind for each new one: never everything at once.
    #[test]
    fn a_full_history_forgets_the_oldest_first() {
        let mut history = BindHistory::default();
        let mut ok = sample_event();
        ok.ret = 0;
        ok.port = 1;
        history.record(&ok, 1);
        for i in 0..CAPACITY as u16 {
            ok.port = 10_000 + (i % 40_000);
            history.record(&ok, 2);
        }
        assert!(history.latest((ok.netns_ino, 6, 1), None).is_none(), "the oldest is forgotten");
        assert!(history.latest((ok.netns_ino, 6, 10_000 + CAPACITY as u16 - 1), None).is_some(), "the newest stays");
        assert_eq!(history.order.len(), CAPACITY);
        assert!(history.seen.len() <= CAPACITY);
    }

    #[test]
    fn the_bind_of_the_socket_at_an_address_is_found_among_the_ports_binds() {
        let mut history = BindHistory::default();
        let mut v4 = sample_event();
        v4.ret = 0;
        v4.addr = [0; 16];
        history.record(&v4, 100);
        let mut v6 = v4;
        v6.family = bindtrace_common::AF_INET6;
        history.record(&v6, 200);
        let key = (v4.netns_ino, 6, 8080);
        let any_v4: IpAddr = std::net::Ipv4Addr::UNSPECIFIED.into();
        assert_eq!(history.latest(key, Some(4242)).map(|b| b.wall_ns), Some(200), "the latest of the two");
        assert_eq!(history.latest_at(key, Some(4242), any_v4).map(|b| b.wall_ns), Some(100), "0.0.0.0's own");
        assert!(history.latest_at(key, Some(4242), "127.0.0.1".parse().expect("ip")).is_none());
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
