//! Ring-buffer record → [`Bind`], checked: a record of the wrong size or with an unknown
//! backend is an error, never a panic.
//!
//! Hand-written rather than through a serialization crate: this runs once per event on the
//! hot path, and the records are fixed `#[repr(C)]` structs (`bytemuck::Pod`), so one size
//! check and one unaligned copy is all it takes.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Deref,
    path::PathBuf,
};

use bindtrace_common::{
    sock_flags, Backend, BindEvent, UnixBindEvent, AF_INET, AF_INET6, AF_UNIX, BIND_EVENT_SIZE, UNIX_BIND_EVENT_SIZE,
    UNIX_PATH_MAX,
};

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    WrongSize { got: usize },
    UnknownBackend(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WrongSize { got } => write!(
                f,
                "ring-buffer record of {got} bytes, expected {BIND_EVENT_SIZE} (or {UNIX_BIND_EVENT_SIZE} for AF_UNIX)"
            ),
            Self::UnknownBackend(raw) => write!(f, "ring-buffer record from unknown backend {raw}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The `sun_path` an AF_UNIX bind asked for, as the caller passed it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct UnixPath(Box<[u8]>);

impl UnixPath {
    pub(crate) fn new(sun_path: &[u8]) -> Self {
        Self(sun_path.into())
    }

    /// The name as the kernel keeps it: a path without its trailing NULs, an abstract
    /// name with all its bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        if self.is_abstract() {
            &self.0
        } else {
            self.0.split(|&b| b == 0).next().unwrap_or_default()
        }
    }

    /// An abstract name (Linux): `sun_path` starts with NUL; no file is involved.
    pub(crate) fn is_abstract(&self) -> bool {
        self.0.first() == Some(&0)
    }

    /// No path at all (`addrlen` of 2): the kernel picks an abstract name (autobind).
    pub(crate) fn is_autobind(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes as `ss` shows them: a path up to its first NUL; an abstract name as `@`
    /// followed by the name, its NULs shown as `@`. Not escaped: the sinks escape it.
    pub(crate) fn display_bytes(&self) -> Vec<u8> {
        if self.is_abstract() {
            std::iter::once(b'@').chain(self.0[1..].iter().map(|&b| if b == 0 { b'@' } else { b })).collect()
        } else {
            self.0.split(|&b| b == 0).next().unwrap_or_default().to_vec()
        }
    }

    /// [`Self::display_bytes`] as text, by `text::from_bytes` (bytes that are not UTF-8 as
    /// `\xNN`, a backslash doubled); the table then only makes controls visible.
    pub(crate) fn display_text(&self) -> String {
        let mut text = crate::text::from_bytes(&self.display_bytes());
        if self.is_autobind() {
            text.push_str("(autobind)");
        }
        text
    }

    /// The file a path-named socket is bound at (relative paths are the caller's: resolve
    /// them against its cwd); `None` for abstract names and autobind.
    pub(crate) fn filesystem_path(&self) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt as _;
        if self.is_abstract() || self.is_autobind() {
            return None;
        }
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(&self.display_bytes())))
    }
}

/// A decoded bind: the fixed record, and the path of an AF_UNIX bind. Derefs to the record,
/// which is what nearly every stage reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Bind {
    pub event: BindEvent,
    /// The path asked for, for an AF_UNIX bind whose sockaddr could be read.
    pub unix_path: Option<UnixPath>,
}

impl Deref for Bind {
    type Target = BindEvent;

    fn deref(&self) -> &BindEvent {
        &self.event
    }
}

impl From<BindEvent> for Bind {
    fn from(event: BindEvent) -> Self {
        Self { event, unix_path: None }
    }
}

impl Bind {
    /// The address asked for, as the table and the diagnoses show it: `127.0.0.1:8080`,
    /// `[::1]:8080`, a unix path or `@name`.
    pub(crate) fn endpoint(&self) -> String {
        match &self.unix_path {
            Some(path) => path.display_text(),
            None => requested_endpoint(&self.event),
        }
    }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Bind, DecodeError> {
    let bind = match bytes.len() {
        BIND_EVENT_SIZE => Bind::from(bytemuck::pod_read_unaligned::<BindEvent>(bytes)),
        UNIX_BIND_EVENT_SIZE => {
            let record = bytemuck::pod_read_unaligned::<UnixBindEvent>(bytes);
            let len = (record.path_len as usize).min(UNIX_PATH_MAX);
            let unix_path = (record.event.family == AF_UNIX && record.event.has(sock_flags::ADDR_READ))
                .then(|| UnixPath::new(&record.path[..len]));
            Bind { event: record.event, unix_path }
        }
        got => return Err(DecodeError::WrongSize { got }),
    };
    if Backend::from_raw(bind.event.backend).is_none() {
        return Err(DecodeError::UnknownBackend(bind.event.backend));
    }
    Ok(bind)
}

/// Typed views of the raw fields, shared by the filter, the sinks and the summary.
pub(crate) trait BindEventExt {
    fn requested_ip(&self) -> Option<IpAddr>;
    fn bound_ip(&self) -> Option<IpAddr>;
    fn errno(&self) -> Option<i32>;
    fn comm_bytes(&self) -> &[u8];
    fn has(&self, flag: u32) -> bool;
    fn proto_name(&self) -> Option<&'static str>;
    fn backend_name(&self) -> &'static str;
    /// `bind`, or `listen` for a failed listen() (its address is where the socket is bound).
    fn op_name(&self) -> &'static str;
    fn is_listen(&self) -> bool;
    /// With `-- CMD` or `--tree`: the process that started the caller's, and its depth
    /// below the tree's root.
    fn tree_place(&self) -> Option<(u32, u16)>;
}

impl BindEventExt for BindEvent {
    fn op_name(&self) -> &'static str {
        if self.is_listen() {
            "listen"
        } else {
            "bind"
        }
    }

    fn is_listen(&self) -> bool {
        self.op == bindtrace_common::op::LISTEN
    }

    fn tree_place(&self) -> Option<(u32, u16)> {
        self.has(sock_flags::IN_TREE).then_some((self.tree_parent, self.tree_depth))
    }

    /// The address asked for; `None` for other families or when it could not be read.
    fn requested_ip(&self) -> Option<IpAddr> {
        if !self.has(sock_flags::ADDR_READ) {
            return None;
        }
        match self.family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::new(self.addr[0], self.addr[1], self.addr[2], self.addr[3]))),
            AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(self.addr))),
            _ => None,
        }
    }

    /// The socket's IPv4 local address when bind() returned, when the probe read it.
    fn bound_ip(&self) -> Option<IpAddr> {
        (self.family == AF_INET && self.has(sock_flags::SOCK_INFO))
            .then(|| IpAddr::V4(Ipv4Addr::from(self.bound_addr4)))
    }

    /// The positive errno of a failed bind.
    fn errno(&self) -> Option<i32> {
        (self.ret < 0).then(|| self.ret.saturating_neg())
    }

    fn comm_bytes(&self) -> &[u8] {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(self.comm.len());
        &self.comm[..end]
    }

    fn has(&self, flag: u32) -> bool {
        self.sock_flags & flag != 0
    }

    fn proto_name(&self) -> Option<&'static str> {
        if !self.has(sock_flags::SOCK_INFO) {
            return None;
        }
        // SOCK_RAW first: a raw socket may carry IPPROTO_TCP/UDP as its protocol.
        Some(match (self.sock_type, self.protocol) {
            (3, _) => "raw",
            (_, 6) => "tcp",
            (_, 17) => "udp",
            (_, 136) => "udplite",
            (_, 132) => "sctp",
            (_, 262) => "mptcp",
            (1, _) => "stream",
            (2, _) => "dgram",
            (5, _) => "seqpacket",
            _ => "other",
        })
    }

    fn backend_name(&self) -> &'static str {
        Backend::from_raw(self.backend).map_or("unknown", Backend::name)
    }
}

/// "AF_INET" for 2; the number for families without a name here.
pub(crate) fn family_name(family: u16) -> Option<&'static str> {
    Some(match family {
        0 => "AF_UNSPEC",
        1 => "AF_UNIX",
        2 => "AF_INET",
        10 => "AF_INET6",
        16 => "AF_NETLINK",
        17 => "AF_PACKET",
        40 => "AF_VSOCK",
        _ => return None,
    })
}

/// The requested address as `127.0.0.1:8080` or `[::1]:8080` (`[fe80::1%2]:80` with a scope),
/// or a description when there is none.
pub(crate) fn requested_endpoint(event: &BindEvent) -> String {
    match event.requested_ip() {
        Some(IpAddr::V4(ip)) => format!("{ip}:{}", event.port),
        Some(IpAddr::V6(ip)) if event.scope_id != 0 => format!("[{ip}%{}]:{}", event.scope_id, event.port),
        Some(IpAddr::V6(ip)) => format!("[{ip}]:{}", event.port),
        None if event.has(bindtrace_common::sock_flags::ADDR_SHORT) => "(address too short)".to_owned(),
        None if event.has(bindtrace_common::sock_flags::ADDR_NULL) => "(NULL address)".to_owned(),
        None if event.has(bindtrace_common::sock_flags::ADDR_FAULT) => "(address unreadable)".to_owned(),
        None => family_name(event.family).map_or_else(|| format!("family {}", event.family), str::to_owned),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_event() -> BindEvent {
        let mut event = BindEvent::zeroed();
        event.backend = Backend::Tracepoint as u8;
        event.family = AF_INET;
        event.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        event.port = 8080;
        event.ret = -98;
        event.tgid = 4242;
        event.sock_family = AF_INET;
        event.tid = 4243;
        event.comm[..7].copy_from_slice(b"python3");
        event.protocol = 6;
        event.sock_type = 1;
        event.sock_flags = sock_flags::ADDR_READ | sock_flags::SOCK_INFO | sock_flags::REUSEADDR;
        event
    }

    fn bytes_of(event: &BindEvent) -> Vec<u8> {
        // SAFETY: BindEvent is plain data of exactly BIND_EVENT_SIZE bytes.
        unsafe { std::slice::from_raw_parts((event as *const BindEvent).cast::<u8>(), BIND_EVENT_SIZE) }.to_vec()
    }

    #[test]
    fn decodes_a_record_from_raw_bytes() {
        let event = sample_event();
        let decoded = decode(&bytes_of(&event)).expect("valid record");
        assert_eq!(decoded, event.into());
        assert_eq!(decoded.requested_ip(), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(decoded.errno(), Some(98));
        assert_eq!(decoded.comm_bytes(), b"python3");
        assert_eq!(decoded.proto_name(), Some("tcp"));
    }

    #[test]
    fn decodes_from_an_unaligned_slice() {
        let mut buffer = [0u8; BIND_EVENT_SIZE + 1];
        buffer[1..].copy_from_slice(&bytes_of(&sample_event()));
        assert_eq!(decode(&buffer[1..]).expect("valid"), sample_event().into());
    }

    #[test]
    fn short_long_and_malformed_records_are_errors() {
        let bytes = bytes_of(&sample_event());
        assert_eq!(decode(&bytes[..10]), Err(DecodeError::WrongSize { got: 10 }));
        assert_eq!(decode(&[]), Err(DecodeError::WrongSize { got: 0 }));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::WrongSize { got: BIND_EVENT_SIZE + 1 }));
        let mut bad_backend = sample_event();
        bad_backend.backend = 200;
        assert_eq!(decode(&bytes_of(&bad_backend)), Err(DecodeError::UnknownBackend(200)));
        // Garbage of the right size decodes to *something* or an error, never a panic.
        for seed in 0u8..=255 {
            let garbage: Vec<u8> = (0..BIND_EVENT_SIZE).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            if let Ok(event) = decode(&garbage) {
                let _ = (event.requested_ip(), event.errno(), event.comm_bytes(), event.proto_name());
            }
        }
    }

    #[test]
    fn ipv6_and_unread_addresses() {
        let mut event = sample_event();
        event.family = AF_INET6;
        event.addr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(event.requested_ip(), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        event.sock_flags &= !sock_flags::ADDR_READ;
        assert_eq!(event.requested_ip(), None);
        event.sock_flags = 0;
        assert_eq!(event.proto_name(), None, "no socket info, no protocol");
        assert_eq!(family_name(10), Some("AF_INET6"));
        assert_eq!(family_name(999), None);
    }

    #[test]
    fn endpoints() {
        let mut event = sample_event();
        assert_eq!(requested_endpoint(&event), "127.0.0.1:8080");
        event.family = bindtrace_common::AF_INET6;
        event.addr = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(requested_endpoint(&event), "[::1]:8080");
        event.scope_id = 2;
        assert_eq!(requested_endpoint(&event), "[::1%2]:8080");
        event.family = 1;
        assert_eq!(requested_endpoint(&event), "AF_UNIX");
        event.family = 99;
        assert_eq!(requested_endpoint(&event), "family 99");
    }
}
