//! systemd managers as holders: the socket units (socket activation) a manager holds ports
//! for. Asked of systemd itself, over its D-Bus API on the manager's private socket
//! (`/run/systemd/private`, or a user manager's under `/run/user/UID`), reached through
//! `/proc/PID/root` so that a container's or nspawn machine's systemd is asked too.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    time::Duration,
};

use serde::Serialize;
use zbus::zvariant::OwnedObjectPath;

use super::{owners::ProcessInfo, sockdiag::Proto};

/// One call's limit: a manager that does not answer costs at most this, a few times.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// A socket unit and what it listens on, as systemd says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct SocketUnit {
    /// `demo.socket`
    pub name: String,
    /// The `Listen*=` line the held socket comes from: `ListenStream=127.0.0.1:18777`.
    pub listen: String,
    /// The units it starts when a connection comes (`demo.service`).
    pub triggers: Vec<String>,
    /// The manager's pid is 1 in bindtrace's own PID namespace: the host's systemd.
    #[serde(skip)]
    pub host_manager: bool,
    #[serde(skip)]
    pub manager_pid: u32,
}

impl SocketUnit {
    /// ", for demo.socket (ListenStream=127.0.0.1:18777; it starts demo.service on demand)"
    pub(crate) fn describe(&self) -> String {
        let starts = match self.triggers.as_slice() {
            [] => String::new(),
            units => format!("; it starts {} on demand", units.join(", ")),
        };
        format!(" for {} ({}{starts})", self.name, self.listen)
    }

    /// What to run: stop the socket unit (the service it starts does not hold the port).
    pub(crate) fn stop_advice(&self) -> String {
        let services = if self.triggers.is_empty() {
            String::new()
        } else {
            format!(" (stopping {} does not free it)", self.triggers.join(", "))
        };
        if self.host_manager {
            format!("systemctl stop {}{services}, or bind another port", self.name)
        } else {
            format!(
                "stop {} in the machine whose systemd is pid {} (nsenter -t {} -a systemctl stop {}){services}, or \
                 bind another port",
                self.name, self.manager_pid, self.manager_pid, self.name
            )
        }
    }
}

/// Is this process a systemd manager (PID 1 of the host or of a container, or a user
/// manager)? Never to be stopped: it holds ports for its socket units.
pub(crate) fn is_manager(process: &ProcessInfo) -> bool {
    let program = process.cmdline.split(' ').next().unwrap_or("");
    process.comm == "systemd"
        && (program.ends_with("/systemd") || program == "systemd" || program.ends_with("/init") || program.is_empty())
}

/// The socket unit of `manager` whose `Listen*=` is the socket at `local` (`proto`), asked
/// of the manager itself; `Ok(None)` when none of its units listens there.
pub(crate) fn socket_unit_at(
    manager: &ProcessInfo,
    local: SocketAddr,
    proto: Proto,
) -> Result<Option<SocketUnit>, String> {
    let connection = connect(manager)?;
    let manager_proxy = zbus::blocking::Proxy::new(
        &connection,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .map_err(|e| format!("systemd's manager object: {e}"))?;
    type UnitRow = (String, String, String, String, String, String, OwnedObjectPath, u32, String, OwnedObjectPath);
    let units: Vec<UnitRow> = manager_proxy
        .call("ListUnitsByPatterns", &(Vec::<String>::new(), vec!["*.socket"]))
        .map_err(|e| format!("systemd's ListUnitsByPatterns: {e}"))?;
    let wanted_kind = match proto {
        Proto::Tcp => "Stream",
        Proto::Udp => "Datagram",
    };
    for (name, _, _, _, _, _, path, ..) in units {
        let unit = |interface: &'static str| {
            zbus::blocking::Proxy::new(&connection, "org.freedesktop.systemd1", path.clone(), interface)
        };
        let Ok(socket) = unit("org.freedesktop.systemd1.Socket") else { continue };
        let Ok(listens) = socket.get_property::<Vec<(String, String)>>("Listen") else { continue };
        let Some((kind, address)) =
            listens.into_iter().find(|(kind, address)| kind == wanted_kind && listens_at(address, local))
        else {
            continue;
        };
        let triggers = unit("org.freedesktop.systemd1.Unit")
            .ok()
            .and_then(|u| u.get_property::<Vec<String>>("Triggers").ok())
            .unwrap_or_default();
        return Ok(Some(SocketUnit {
            name,
            listen: format!("Listen{kind}={address}"),
            triggers,
            host_manager: manager.pid == 1,
            manager_pid: manager.pid,
        }));
    }
    Ok(None)
}

/// A D-Bus connection to `manager`: its private socket (peer to peer), else the system bus
/// of its machine (a user manager: its user bus). Both through `/proc/PID/root`, so that a
/// container's systemd is reached in its own filesystem. A manager may refuse its private
/// socket to a peer outside its PID namespace (an nspawn machine's does); the bus takes it.
fn connect(manager: &ProcessInfo) -> Result<zbus::blocking::Connection, String> {
    let root = format!("/proc/{}/root", manager.pid);
    let (private, bus) = if manager.cmdline.contains("--user") {
        let run = format!("{root}/run/user/{}", manager.uid.unwrap_or(0));
        (format!("{run}/systemd/private"), format!("{run}/bus"))
    } else {
        (format!("{root}/run/systemd/private"), format!("{root}/run/dbus/system_bus_socket"))
    };
    let open = |path: &str| -> Result<UnixStream, String> {
        let stream = UnixStream::connect(path).map_err(|e| format!("cannot reach {path}: {e}"))?;
        let _ = stream.set_read_timeout(Some(CALL_TIMEOUT));
        let _ = stream.set_write_timeout(Some(CALL_TIMEOUT));
        Ok(stream)
    };
    let peer_to_peer = open(&private).and_then(|stream| {
        zbus::blocking::connection::Builder::async_io_unix_stream(stream)
            .p2p()
            .build()
            .map_err(|e| format!("systemd at {private}: {e}"))
    });
    peer_to_peer.or_else(|private_failed| {
        open(&bus).and_then(|stream| {
            zbus::blocking::connection::Builder::async_io_unix_stream(stream)
                .build()
                .map_err(|e| format!("{private_failed}; the bus at {bus}: {e}"))
        })
    })
}

/// Does systemd's `Listen` address (`127.0.0.1:18777`, `[::]:53`, `8080`) name the socket
/// at `local`? A port alone, or a wildcard address, listens on every address.
fn listens_at(address: &str, local: SocketAddr) -> bool {
    if let Ok(port) = address.parse::<u16>() {
        return port == local.port();
    }
    let Ok(listen) = address.parse::<SocketAddr>() else { return false };
    if listen.port() != local.port() {
        return false;
    }
    let same = |a: IpAddr, b: IpAddr| a == b || a.to_canonical() == b.to_canonical();
    same(listen.ip(), local.ip()) || listen.ip().is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_as_systemd_writes_them() {
        let at = |text: &str| text.parse::<SocketAddr>().expect("addr");
        assert!(listens_at("127.0.0.1:18777", at("127.0.0.1:18777")));
        assert!(!listens_at("127.0.0.1:18777", at("127.0.0.1:18778")));
        assert!(!listens_at("127.0.0.2:18777", at("127.0.0.1:18777")));
        assert!(listens_at("[::]:53", at("[::]:53")));
        assert!(listens_at("8080", at("[::]:8080")), "a port alone");
        assert!(!listens_at("/run/demo.sock", at("127.0.0.1:80")));
    }

    #[test]
    fn the_advice_is_the_socket_unit_never_the_manager() {
        let unit = SocketUnit {
            name: "demo.socket".into(),
            listen: "ListenStream=127.0.0.1:18777".into(),
            triggers: vec!["demo.service".into()],
            host_manager: true,
            manager_pid: 1,
        };
        assert_eq!(
            unit.stop_advice(),
            "systemctl stop demo.socket (stopping demo.service does not free it), or bind another port"
        );
        assert_eq!(
            unit.describe(),
            " for demo.socket (ListenStream=127.0.0.1:18777; it starts demo.service on demand)"
        );
    }
}
