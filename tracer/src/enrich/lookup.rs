//! The facts a diagnosis needs, gathered from the kernel and /proc. Everything here may take
//! milliseconds, so it runs on the attribution worker thread, never on the event path.

use std::net::IpAddr;

use nix::ifaddrs::getifaddrs;
use serde::Serialize;

use super::{
    netns::{read_sysctl, Netns},
    owners::{ProcessInfo, SocketOwners},
    sockdiag::{sockets_on_port, DiagSocket, Proto},
};

/// What to look up. Equal keys share one lookup and one cache entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LookupKey {
    /// Sockets on a port in a namespace (EADDRINUSE).
    Holders { netns: u32, proto: Proto, port: u16 },
    /// A namespace's sysctls and addresses (EACCES, EADDRNOTAVAIL).
    Netns { netns: u32 },
    /// A process's capabilities (EACCES).
    Process { pid: u32 },
}

/// A socket on the port and the processes that have it open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub socket: DiagSocket,
    pub processes: Vec<ProcessInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsFacts {
    pub unprivileged_port_start: Option<i64>,
    pub nonlocal_bind_v4: Option<i64>,
    pub nonlocal_bind_v6: Option<i64>,
    /// Addresses on the namespace's interfaces.
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessCaps {
    /// CapEff from /proc/PID/status.
    pub effective: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Facts {
    Holders(Result<Vec<Holder>, String>),
    Netns(Result<NetnsFacts, String>),
    /// `None`: the process exited before it could be read.
    Process(Option<ProcessCaps>),
}

/// The attribution worker's state: the /proc socket index lives across lookups.
#[derive(Default)]
pub struct Lookups {
    pub owners: SocketOwners,
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
    }
}

impl Lookups {
    /// Sockets on `port` in the namespace (found through `pid` when it still lives), each
    /// with the processes holding it.
    pub fn holders(&mut self, netns: &Netns, proto: Proto, port: u16) -> Result<Vec<Holder>, String> {
        let sockets = netns
            .run(|| sockets_on_port(proto, Some(port)))
            .map_err(|e| format!("{e:#}"))?
            .map_err(|e| format!("sock_diag query failed: {e}"))?;
        Ok(sockets
            .into_iter()
            .map(|socket| {
                let processes =
                    self.owners.owners(u64::from(socket.inode)).into_iter().filter_map(ProcessInfo::read).collect();
                Holder { socket, processes }
            })
            .collect())
    }

    pub fn run(&mut self, key: &LookupKey, pid_hint: Option<u32>) -> Facts {
        match *key {
            LookupKey::Holders { netns, proto, port } => Facts::Holders(
                Netns::find(u64::from(netns), pid_hint)
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|ns| self.holders(&ns, proto, port)),
            ),
            LookupKey::Netns { netns } => Facts::Netns(
                Netns::find(u64::from(netns), pid_hint)
                    .and_then(|ns| ns.run(netns_facts))
                    .map_err(|e| format!("{e:#}")),
            ),
            LookupKey::Process { pid } => Facts::Process(
                procfs::process::Process::new(pid as i32)
                    .and_then(|p| p.status())
                    .ok()
                    .map(|status| ProcessCaps { effective: status.capeff }),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn holders_of_a_listening_port_name_this_process() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let netns = super::super::netns::own_inode().expect("own netns") as u32;
        let mut lookups = Lookups::default();
        let Facts::Holders(Ok(holders)) = lookups.run(&LookupKey::Holders { netns, proto: Proto::Tcp, port }, None)
        else {
            panic!("holder lookup failed");
        };
        assert_eq!(holders.len(), 1, "{holders:#?}");
        assert_eq!(holders[0].processes.len(), 1);
        assert_eq!(holders[0].processes[0].pid, std::process::id());
    }

    #[test]
    fn namespace_facts_and_capabilities() {
        let netns = super::super::netns::own_inode().expect("own netns") as u32;
        let mut lookups = Lookups::default();
        let Facts::Netns(Ok(facts)) = lookups.run(&LookupKey::Netns { netns }, None) else {
            panic!("netns lookup failed");
        };
        assert!(facts.unprivileged_port_start.is_some());
        assert!(facts.nonlocal_bind_v4.is_some());
        assert!(facts.addresses.contains(&IpAddr::from([127, 0, 0, 1])), "{:?}", facts.addresses);
        let Facts::Process(Some(_)) = lookups.run(&LookupKey::Process { pid: std::process::id() }, None) else {
            panic!("this process has capabilities to read");
        };
        assert_eq!(lookups.run(&LookupKey::Process { pid: u32::MAX / 2 }, None), Facts::Process(None));
    }
}
