//! "Which AF_UNIX sockets are bound, to what?" through sock_diag netlink (unix_diag), in the
//! calling thread's network namespace: each bound socket's inode, type, state, name and,
//! for a path-named socket, the inode and device of its socket file. This is what `ss -x`
//! reads; /proc/net/unix is the fallback on kernels without unix_diag.
//!
//! The reply is parsed here rather than by netlink-packet-sock-diag: its `Vfs` attribute
//! keeps the inode and device private, and they are what ties a socket to a file (a name
//! alone may be relative to the binder's directory at the time).

use std::io;

use netlink_packet_sock_diag::{
    unix::{ShowFlags, StateFlags, UnixRequest},
    SockDiagMessage,
};

use super::sockdiag::send_dump;

/// One bound AF_UNIX socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UnixSocket {
    pub inode: u32,
    /// SOCK_STREAM (1), SOCK_DGRAM (2), SOCK_SEQPACKET (5).
    pub sock_type: u8,
    /// TCP_LISTEN (10) for a listening socket, TCP_CLOSE (7) for an unconnected one.
    pub state: u8,
    /// `sun_path` as bound: an abstract name starts with NUL.
    pub name: Vec<u8>,
    /// The socket file's (inode, device as the kernel encodes it) for a path-named socket.
    pub file: Option<(u32, u32)>,
}

impl UnixSocket {
    pub(crate) fn type_name(&self) -> &'static str {
        match self.sock_type {
            1 => "stream",
            2 => "dgram",
            5 => "seqpacket",
            _ => "unix",
        }
    }

    pub(crate) fn state_name(&self) -> &'static str {
        match self.state {
            10 => "LISTEN",
            1 => "ESTAB",
            _ => "UNCONN",
        }
    }
}

/// The kernel's `dev_t` (major << 20 | minor), as unix_diag reports it, in the encoding
/// stat(2) returns (`st_dev`).
pub(crate) fn kernel_dev_to_user(dev: u32) -> u64 {
    libc::makedev(dev >> 20, dev & 0xf_ffff)
}

const NLMSG_HEADER_LEN: usize = 16;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
/// `struct unix_diag_msg`: family, type, state, pad (1 byte each), ino, cookie[2].
const UNIX_DIAG_MSG_LEN: usize = 16;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;

/// One `unix_diag_msg` and its attributes.
fn parse_message(body: &[u8]) -> Option<UnixSocket> {
    let header = body.get(..UNIX_DIAG_MSG_LEN)?;
    let mut socket = UnixSocket {
        sock_type: header[1],
        state: header[2],
        inode: u32::from_ne_bytes(header[4..8].try_into().ok()?),
        name: Vec::new(),
        file: None,
    };
    let mut attrs = &body[UNIX_DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let data = &attrs[4..len];
        match kind {
            // A path comes NUL-terminated; an abstract name is all its bytes.
            UNIX_DIAG_NAME if data.first() == Some(&0) => socket.name = data.to_vec(),
            UNIX_DIAG_NAME => socket.name = data.split(|&b| b == 0).next().unwrap_or_default().to_vec(),
            UNIX_DIAG_VFS if data.len() >= 8 => {
                let ino = u32::from_ne_bytes(data[0..4].try_into().ok()?);
                let dev = u32::from_ne_bytes(data[4..8].try_into().ok()?);
                socket.file = Some((ino, dev));
            }
            _ => {}
        }
        attrs = attrs.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Some(socket)
}

/// Every AF_UNIX socket with a name (bound), in the calling thread's network namespace.
pub(crate) fn bound_sockets() -> io::Result<Vec<UnixSocket>> {
    let socket = send_dump(SockDiagMessage::UnixRequest(UnixRequest {
        // Every state: listening, connected and unconnected (datagram) sockets.
        state_flags: StateFlags::from_bits_retain(u32::MAX),
        inode: 0,
        show_flags: ShowFlags::NAME | ShowFlags::VFS,
        cookie: [0; 8],
    }))?;

    let mut out = Vec::new();
    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut messages = &receive[..size];
        if messages.is_empty() {
            return Ok(out);
        }
        while messages.len() >= NLMSG_HEADER_LEN {
            let len = u32::from_ne_bytes(messages[0..4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes([messages[4], messages[5]]);
            if len < NLMSG_HEADER_LEN || len > messages.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "unix_diag: truncated reply"));
            }
            let body = &messages[NLMSG_HEADER_LEN..len];
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = body.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                }
                _ => {
                    if let Some(parsed) = parse_message(body).filter(|s| !s.name.is_empty()) {
                        out.push(parsed);
                    }
                }
            }
            messages = messages.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
    }
}

/// The same from /proc/net/unix (kernels built without unix_diag): names and inodes, no
/// socket files.
pub(crate) fn bound_sockets_from_proc() -> io::Result<Vec<UnixSocket>> {
    let text = std::fs::read_to_string("/proc/net/unix")?;
    let mut out = Vec::new();
    // Num RefCount Protocol Flags Type St Inode Path: the path is the rest of the line after
    // the seventh field, and may hold spaces.
    for line in text.lines().skip(1) {
        let mut fields = Vec::with_capacity(7);
        let mut rest = line;
        while fields.len() < 7 {
            rest = rest.trim_start();
            let end = rest.find(' ').unwrap_or(rest.len());
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        let path = rest.strip_prefix(' ').unwrap_or(rest);
        let (Some(kind), Some(state), Some(inode)) = (fields.get(4), fields.get(5), fields.get(6)) else {
            continue;
        };
        if path.is_empty() {
            continue;
        }
        let name = match path.strip_prefix('@') {
            Some(abstract_name) => std::iter::once(0).chain(abstract_name.bytes()).collect(),
            None => path.as_bytes().to_vec(),
        };
        // /proc/net/unix states: 01 unconnected, 02 connecting, 03 connected; listening
        // sockets have the __SO_ACCEPTCON flag (0x10000) instead.
        let listening = fields.get(3).and_then(|f| u32::from_str_radix(f, 16).ok()).is_some_and(|f| f & 0x1_0000 != 0);
        out.push(UnixSocket {
            inode: inode.parse().unwrap_or(0),
            sock_type: u8::from_str_radix(kind, 16).unwrap_or(0),
            state: if listening {
                10
            } else if *state == "03" {
                1
            } else {
                7
            },
            name,
            file: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::{fs::MetadataExt as _, net::UnixListener};

    use super::*;

    #[test]
    fn proc_net_unix_paths_may_hold_spaces() {
        let dir = std::env::temp_dir().join(format!("bindtrace unix spaces {}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("my app.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let from_proc = bound_sockets_from_proc().expect("/proc/net/unix");
        assert!(from_proc.iter().any(|s| s.name == path.as_os_str().as_encoded_bytes()), "{path:?} listed whole");
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn finds_a_bound_path_with_its_file_and_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("bindtrace-unixdiag-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("listener.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let file = std::fs::metadata(&path).expect("socket file");
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&listener)))
            .expect("fd")
            .ino() as u32;
        let abstract_name = format!("bindtrace-unixdiag-{}", std::process::id());
        let abstract_socket = {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).expect("addr");
            UnixListener::bind_addr(&addr).expect("abstract bind")
        };

        let sockets = bound_sockets().expect("unix_diag dump");
        let found = sockets.iter().find(|s| s.inode == inode).expect("the listener is in the dump");
        assert_eq!(found.name, path.as_os_str().as_encoded_bytes());
        assert_eq!((found.type_name(), found.state_name()), ("stream", "LISTEN"));
        let (file_ino, file_dev) = found.file.expect("a path-named socket has its file");
        assert_eq!(u64::from(file_ino), file.ino());
        assert_eq!(kernel_dev_to_user(file_dev), file.dev(), "kernel dev_t converted to st_dev");
        let mut abstract_bytes = vec![0];
        abstract_bytes.extend_from_slice(abstract_name.as_bytes());
        assert!(sockets.iter().any(|s| s.name == abstract_bytes && s.file.is_none()), "abstract name listed");

        let from_proc = bound_sockets_from_proc().expect("/proc/net/unix");
        let listed = from_proc.iter().find(|s| s.inode == inode).expect("listed in /proc/net/unix");
        assert_eq!((listed.name.as_slice(), listed.state), (path.as_os_str().as_encoded_bytes(), 10));
        drop((listener, abstract_socket));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
