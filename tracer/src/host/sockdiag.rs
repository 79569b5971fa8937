//! "Which sockets use port P?" through sock_diag netlink (inet_diag), in the calling thread's
//! network namespace, for TCP or UDP over IPv4 and IPv6. This is the same source `ss` reads.

use std::{io, net::SocketAddr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub(crate) fn from_ipproto(protocol: u16) -> Option<Self> {
        match protocol {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    /// From a protocol's name as iptables and nft write it (`tcp`, `udp`, or their numbers).
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "tcp" | "6" => Some(Self::Tcp),
            "udp" | "17" => Some(Self::Udp),
            _ => None,
        }
    }
}

/// One socket as inet_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct DiagSocket {
    pub proto: Proto,
    pub local: SocketAddr,
    /// The remote end; unspecified for listening and unconnected sockets.
    pub peer: SocketAddr,
    /// TCP state number (TCP_LISTEN = 10, TCP_TIME_WAIT = 6, ...; TCP_CLOSE = 7 is an
    /// unconnected UDP socket).
    pub state: u8,
    pub uid: u32,
    /// Socket inode, 0 for TIME_WAIT sockets (no file behind them).
    pub inode: u32,
    /// Milliseconds until the socket's timer fires (the TIME_WAIT expiry), if it has one.
    pub timer_ms: Option<u32>,
    /// IPV6_V6ONLY, reported for IPv6 sockets only.
    pub v6only: Option<bool>,
}

pub(crate) const TCP_TIME_WAIT: u8 = 6;
pub(crate) const TCP_CLOSE: u8 = 7;
pub(crate) const TCP_LISTEN: u8 = 10;
/// Bound, neither listening nor connected (sock_diag reports it from 6.8).
pub(crate) const TCP_BOUND: u8 = 13;

/// The state's name as `ss` prints it.
pub(crate) fn state_name(proto: Proto, state: u8) -> &'static str {
    match (proto, state) {
        (Proto::Udp, TCP_CLOSE) => "UNCONN",
        (_, 1) => "ESTABLISHED",
        (_, 2) => "SYN_SENT",
        (_, 3) => "SYN_RECV",
        (_, 4) => "FIN_WAIT1",
        (_, 5) => "FIN_WAIT2",
        (_, TCP_TIME_WAIT) => "TIME_WAIT",
        (_, TCP_CLOSE) => "CLOSE",
        (_, 8) => "CLOSE_WAIT",
        (_, 9) => "LAST_ACK",
        (_, TCP_LISTEN) => "LISTEN",
        (_, 11) => "CLOSING",
        (_, 12) => "NEW_SYN_RECV",
        (_, 13) => "BOUND",
        _ => "UNKNOWN",
    }
}

/// Offset of `idiag_expires` in `struct inet_diag_msg` (UAPI): the crate folds the
/// TIME_WAIT timer into a variant without its duration, so it is read from the raw message.
const EXPIRES_OFFSET: usize = 52;
const NLMSG_HEADER_LEN: usize = 16;

/// Opens a sock_diag netlink socket in the calling thread's namespace and sends `request`
/// as a dump; the replies are read from the returned socket.
pub(crate) fn send_dump(request: SockDiagMessage) -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut message = NetlinkMessage::new(header, request.into());
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    Ok(socket)
}

/// Where a dump's sockets go, one at a time: a busy port has tens of thousands of
/// connections, and a lookup keeps only what a diagnosis can use (see `lookup::TableBuilder`).
pub(crate) trait SocketSink {
    fn add(&mut self, socket: DiagSocket);
    /// Forget what was added: the dump is read again from another source.
    fn reset(&mut self);
}

impl SocketSink for Vec<DiagSocket> {
    fn add(&mut self, socket: DiagSocket) {
        self.push(socket);
    }
    fn reset(&mut self) {
        self.clear();
    }
}

/// With a port, the kernel filters the dump itself: `inet_diag_dump_icsk` (TCP, every table:
/// listeners, established and TIME_WAIT, bound-only since 6.8) and `udp_dump` skip sockets
/// whose local port is not `idiag_sport` when it is set, so a lookup on one port never copies
/// the rest of the host's sockets out of the kernel.
fn dump(proto: Proto, family: u8, port: Option<u16>, out: &mut dyn SocketSink) -> io::Result<usize> {
    let mut socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    socket_id.source_port = port.unwrap_or(0);
    let socket = send_dump(SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: match proto {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        },
        extensions: ExtensionFlags::empty(),
        // Every state, including bit 13: sockets that are bound but neither listening nor
        // connected (kernels from 6.8 report them; older ones ignore the bit).
        states: StateFlags::from_bits_retain(u32::MAX),
        socket_id,
    }))?;
    let mut delivered = 0;

    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let bytes = &receive[offset..size];
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(delivered),
                NetlinkPayload::Error(err) => {
                    return Err(err.to_io());
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let header = &response.header;
                    let id = &header.socket_id;
                    if port.is_none_or(|p| p == id.source_port) {
                        let expires = bytes
                            .get(NLMSG_HEADER_LEN + EXPIRES_OFFSET..NLMSG_HEADER_LEN + EXPIRES_OFFSET + 4)
                            .and_then(|b| b.try_into().ok())
                            .map(u32::from_ne_bytes);
                        let v6only = response.nlas.iter().find_map(|nla| match nla {
                            Nla::SkV6Only(v) => Some(*v),
                            _ => None,
                        });
                        delivered += 1;
                        out.add(DiagSocket {
                            proto,
                            local: SocketAddr::new(id.source_address, id.source_port),
                            peer: SocketAddr::new(id.destination_address, id.destination_port),
                            state: header.state,
                            uid: header.uid,
                            inode: header.inode,
                            timer_ms: header.timer.as_ref().and(expires),
                            v6only,
                        });
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// Every TCP or UDP socket, IPv4 and IPv6, whose local port is `port` (all ports with
/// `None`), in the calling thread's network namespace. Through sock_diag; where the kernel
/// cannot answer it (inet_diag is a module, and a container or a minimal system may not be
/// able to load it: ENOENT), from `/proc/net/{tcp,udp}{,6}` instead, which lists the same
/// sockets without IPV6_V6ONLY.
#[cfg(test)]
pub(crate) fn sockets_on_port(proto: Proto, port: Option<u16>) -> io::Result<Vec<DiagSocket>> {
    let mut out = Vec::new();
    collect_sockets(proto, port, &mut out)?;
    Ok(out)
}

/// [`sockets_on_port`] into `out`, one socket at a time; `true` when the list is sock_diag's.
/// /proc/net/tcp does not list TCP sockets that are only bound (neither listening nor
/// connected), nor IPV6_V6ONLY.
pub(crate) fn collect_sockets(proto: Proto, port: Option<u16>, out: &mut dyn SocketSink) -> io::Result<bool> {
    let netlink = dump(proto, AF_INET, port, out).and_then(|_| dump(proto, AF_INET6, port, out));
    match netlink {
        Ok(_) => Ok(true),
        Err(err) => {
            log::debug!("sock_diag for {}: {err}; reading /proc/net instead", proto.name());
            out.reset();
            for socket in proc_net_sockets(proto, false, port).map_err(|_| err)? {
                out.add(socket);
            }
            for socket in proc_net_sockets(proto, true, port).unwrap_or_default() {
                out.add(socket);
            }
            Ok(false)
        }
    }
}

/// The sockets of `/proc/thread-self/net/{tcp,udp}{,6}` (the calling thread's namespace)
/// whose local port is `port` (all with `None`).
fn proc_net_sockets(proto: Proto, v6: bool, port: Option<u16>) -> io::Result<Vec<DiagSocket>> {
    let file = format!("/proc/thread-self/net/{}{}", proto.name(), if v6 { "6" } else { "" });
    let text = std::fs::read_to_string(file)?;
    // Timers are printed in clock ticks (USER_HZ).
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| parse_proc_net_line(line, proto, ticks_per_second))
        .filter(|s| port.is_none_or(|p| s.local.port() == p))
        .collect())
}

/// "ADDR:PORT" as /proc/net prints it: the address's 32-bit words in host byte order, in hex.
fn proc_net_endpoint(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`
fn parse_proc_net_line(line: &str, proto: Proto, ticks_per_second: u64) -> Option<DiagSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (timer, when) = fields.get(5)?.split_once(':')?;
    let timer_ms = (timer != "00")
        .then(|| u64::from_str_radix(when, 16).ok())
        .flatten()
        .map(|ticks| u32::try_from(ticks * 1000 / ticks_per_second).unwrap_or(u32::MAX));
    Some(DiagSocket {
        proto,
        local: proc_net_endpoint(fields.get(1)?)?,
        peer: proc_net_endpoint(fields.get(2)?)?,
        state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
        uid: fields.get(7)?.parse().ok()?,
        inode: fields.get(9)?.parse().ok()?,
        timer_ms,
        v6only: None,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream, UdpSocket},
        os::unix::fs::MetadataExt as _,
    };

    use super::*;

    fn inode_of_fd(fd: i32) -> u32 {
        std::fs::metadata(format!("/proc/self/fd/{fd}")).map(|m| m.ino() as u32).expect("fd inode")
    }

    /// The /proc/net fallback reads the same sockets as sock_diag.
    #[test]
    fn proc_net_lists_what_sock_diag_lists() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let udp6 = UdpSocket::bind("[::1]:0").expect("udp6");
        let udp_port = udp6.local_addr().expect("addr").port();
        let from_proc = proc_net_sockets(Proto::Tcp, false, Some(port)).expect("/proc/net/tcp");
        let from_diag = sockets_on_port(Proto::Tcp, Some(port)).expect("dump");
        assert_eq!(from_proc.len(), 1, "{from_proc:#?}");
        let diag = from_diag.iter().find(|s| s.state == TCP_LISTEN).expect("listener");
        assert_eq!(
            (from_proc[0].local, from_proc[0].state, from_proc[0].inode, from_proc[0].uid),
            (diag.local, diag.state, diag.inode, diag.uid)
        );
        let v6 = proc_net_sockets(Proto::Udp, true, Some(udp_port)).expect("/proc/net/udp6");
        assert_eq!(v6.len(), 1);
        assert_eq!(v6[0].local, udp6.local_addr().expect("addr"));
        assert_eq!(state_name(Proto::Udp, v6[0].state), "UNCONN");
    }

    #[test]
    fn finds_a_listener_by_port_with_its_inode() {
        use std::os::fd::AsRawFd as _;
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let found = sockets_on_port(Proto::Tcp, Some(port)).expect("sock_diag dump");
        let mine: Vec<_> = found.iter().filter(|s| s.state == TCP_LISTEN).collect();
        assert_eq!(mine.len(), 1, "{found:#?}");
        assert_eq!(mine[0].local, listener.local_addr().expect("addr"));
        assert_eq!(mine[0].inode, inode_of_fd(listener.as_raw_fd()));
        // SAFETY: geteuid has no preconditions.
        assert_eq!(mine[0].uid, unsafe { libc::geteuid() });
        assert_eq!(state_name(Proto::Tcp, mine[0].state), "LISTEN");
    }

    /// The port filter is the kernel's: another port's listener is not in the dump, and a
    /// TCP socket that is only bound is (on kernels that report them, 6.8 on).
    #[test]
    fn a_port_dump_is_filtered_in_the_kernel() {
        let other = TcpListener::bind("127.0.0.1:0").expect("listen");
        let bound = socket2_bound();
        let port = bound.1;
        let found = sockets_on_port(Proto::Tcp, Some(port)).expect("dump");
        assert!(found.iter().all(|s| s.local.port() == port), "{found:#?}");
        let other_port = other.local_addr().expect("addr").port();
        let mut filtered_out = Vec::new();
        let _ = dump(Proto::Tcp, AF_INET, Some(port), &mut filtered_out).expect("dump");
        assert!(filtered_out.iter().all(|s| s.local.port() != other_port));
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let (major, minor) = release
            .split('.')
            .take(2)
            .map(|n| n.parse::<u32>().unwrap_or(0))
            .fold((0, 0), |(a, _), n| if a == 0 { (n, 0) } else { (a, n) });
        if (major, minor) >= (6, 8) {
            // Reported in state CLOSE (7) on 6.18; TCP_BOUND (13) is only the filter's bit.
            assert_eq!(found.iter().filter(|s| matches!(s.state, TCP_CLOSE | TCP_BOUND)).count(), 1, "{found:#?}");
        }
        drop(bound);
    }

    /// A TCP socket bound to a free loopback port, neither listening nor connected.
    fn socket2_bound() -> (std::os::fd::OwnedFd, u16) {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket calls on a fresh fd, owned at once.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0);
            let mut len = len;
            assert_eq!(libc::getsockname(fd, (&raw mut addr).cast(), &mut len), 0);
            (owned, u16::from_be(addr.sin_port))
        }
    }

    #[test]
    fn finds_udp_and_ipv6_with_v6only() {
        let udp = UdpSocket::bind("[::1]:0").expect("udp6");
        let port = udp.local_addr().expect("addr").port();
        let found = sockets_on_port(Proto::Udp, Some(port)).expect("dump");
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].local, udp.local_addr().expect("addr"));
        assert_eq!(state_name(Proto::Udp, found[0].state), "UNCONN");
        assert!(found[0].v6only.is_some(), "IPv6 sockets report IPV6_V6ONLY");
    }

    #[test]
    fn time_wait_has_a_timer_and_no_inode() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (server_side, _) = listener.accept().expect("accept");
        // The side that closes first goes to TIME_WAIT: here the server's.
        drop(server_side);
        drop(listener);
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let found = sockets_on_port(Proto::Tcp, Some(port)).expect("dump");
        let waiting: Vec<_> = found.iter().filter(|s| s.state == TCP_TIME_WAIT).collect();
        assert_eq!(waiting.len(), 1, "{found:#?}");
        assert_eq!(waiting[0].inode, 0);
        let timer = waiting[0].timer_ms.expect("TIME_WAIT timer");
        assert!(timer > 0 && timer <= 60_000, "{timer} ms");
        assert!(!waiting[0].peer.ip().is_unspecified());
    }
}
