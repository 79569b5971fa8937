//! Attribution and diagnosis of failed binds, and `bindtrace who`, against real sockets,
//! real processes and real network namespaces.

mod common;

use std::{
    net::{Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

use common::*;
use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

fn tcp(domain: Domain) -> Socket {
    Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).expect("socket")
}

fn addr(text: &str) -> SockAddr {
    SockAddr::from(text.parse::<SocketAddr>().expect("address"))
}

fn sysctl(name: &str) -> i64 {
    std::fs::read_to_string(format!("/proc/sys/{name}")).expect("sysctl").trim().parse().expect("number")
}

#[test]
fn listening_holder_is_named_with_its_process() {
    if !can_load_probe("listening_holder_is_named_with_its_process") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let listener = tcp(Domain::IPV4);
    listener.bind(&addr(&format!("0.0.0.0:{port}"))).expect("bind");
    listener.listen(8).expect("listen");
    let mut sleep = hand_to_sleep(listener);
    let holder_pid = sleep.id();

    let err = tcp(Domain::IPV4).bind(&addr(&format!("127.0.0.1:{port}"))).expect_err("in use");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let event = tracer.wait_for("EADDRINUSE", |e| e["errno"] == 98);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "in_use", "{d}");
    let holder = &d["holders"][0];
    assert_eq!(holder["state"], "LISTEN");
    assert_eq!(holder["addr"], "0.0.0.0");
    assert_eq!(holder["port"], port);
    assert_eq!(holder["proto"], "tcp");
    let process = &holder["processes"][0];
    assert_eq!(process["pid"], holder_pid, "{d}");
    assert_eq!(process["comm"], "sleep");
    assert_eq!(process["cmdline"], "sleep 60");
    assert!(process["cgroup"].is_string(), "{process}");
    assert!(holder["seen_bind"]["time"].is_string(), "bindtrace saw the holder's bind: {holder}");
    let summary = d["summary"].as_str().expect("summary");
    let expected = format!("port {port}/tcp is held by pid {holder_pid} (sleep 60), LISTEN on 0.0.0.0:{port} since ");
    assert!(summary.starts_with(&expected), "{summary}");
    assert!(summary.ends_with("stop it or bind another port"), "{summary}");

    let (code, records) = who(&[&format!("{port}/tcp")]);
    assert_eq!(code, Some(0), "a held port exits 0");
    assert!(first_holder_names(&records[0], holder_pid), "{}", records[0]);
    assert!(records[0]["summary"].as_str().is_some_and(|s| s.contains(&format!("pid {holder_pid} (sleep 60)"))));

    let _ = sleep.kill();
    let _ = sleep.wait();
    tracer.stop();
}

#[test]
fn time_wait_holder_explains_the_so_reuseaddr_rule() {
    if !can_load_probe("time_wait_holder_explains_the_so_reuseaddr_rule") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    // A listener without SO_REUSEADDR; the server side of a connection closes first, so the
    // server's socket (local port = the listener's) goes to TIME_WAIT.
    // (std's TcpListener would set SO_REUSEADDR; socket2 leaves it off.)
    let listener = tcp(Domain::IPV4);
    listener.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
    listener.listen(4).expect("listen");
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    drop(server);
    std::thread::sleep(Duration::from_millis(50));
    drop(client);
    drop(listener);
    std::thread::sleep(Duration::from_millis(50));

    let plain = tcp(Domain::IPV4);
    let err = plain.bind(&addr(&format!("127.0.0.1:{port}"))).expect_err("TIME_WAIT holds the port");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let event = tracer.wait_for("bind without SO_REUSEADDR", |e| e["errno"] == 98 && e["reuseaddr"] == false);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "time_wait", "{d}");
    let holders = d["holders"].as_array().expect("holders");
    assert!(!holders.is_empty());
    for holder in holders {
        assert_eq!(holder["state"], "TIME_WAIT");
        assert_eq!(holder["processes"], Value::Array(vec![]), "TIME_WAIT sockets have no process");
        assert!(holder["timer_ms"].as_u64().is_some_and(|t| t > 0 && t <= 60_000), "{holder}");
        assert!(holder["peer"].is_string(), "{holder}");
    }
    assert_eq!(d["facts"]["new_socket_reuseaddr"], false);
    assert_eq!(d["facts"]["old_socket_reuseaddr"], false, "bindtrace saw the listener bind without it");
    let summary = d["summary"].as_str().expect("summary");
    assert!(summary.starts_with(&format!("only TIME_WAIT sockets hold {port}/tcp (expires in ")), "{summary}");

    // SO_REUSEADDR on the new socket alone is not enough: the old listener lacked it.
    let reusing = tcp(Domain::IPV4);
    reusing.set_reuse_address(true).expect("SO_REUSEADDR");
    let err = reusing.bind(&addr(&format!("127.0.0.1:{port}"))).expect_err("still held");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let event = tracer.wait_for("bind with SO_REUSEADDR", |e| e["errno"] == 98 && e["reuseaddr"] == true);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["facts"]["new_socket_reuseaddr"], true);
    assert!(
        d["summary"].as_str().is_some_and(|s| s.contains("the old listening socket did not set SO_REUSEADDR")),
        "{d}"
    );

    let (code, records) = who(&[&format!("{port}/tcp")]);
    assert_eq!(code, Some(0));
    assert_eq!(records[0]["holders"][0]["state"], "TIME_WAIT");
    assert!(records[0]["summary"].as_str().is_some_and(|s| s.starts_with("only TIME_WAIT sockets hold")));
    tracer.stop();
}

#[test]
fn udp_holder() {
    if !can_load_probe("udp_holder") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string(), "--proto", "udp"]);
    let holder = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("udp");
    holder.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
    let mut sleep = hand_to_sleep(holder);
    let second = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("udp");
    assert!(second.bind(&addr(&format!("127.0.0.1:{port}"))).is_err());
    let event = tracer.wait_for("UDP EADDRINUSE", |e| e["errno"] == 98);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "in_use", "{d}");
    assert_eq!(d["holders"][0]["proto"], "udp");
    assert_eq!(d["holders"][0]["state"], "UNCONN");
    assert!(first_holder_names(&d, sleep.id()), "{d}");
    assert!(d["summary"].as_str().is_some_and(|s| s.starts_with(&format!("port {port}/udp is held by pid "))), "{d}");

    let (code, records) = who(&[&format!("{port}/udp")]);
    assert_eq!(code, Some(0));
    assert_eq!(records[0]["proto"], "udp");
    assert_eq!(records[0]["holders"][0]["processes"][0]["comm"], "sleep");
    let _ = sleep.kill();
    let _ = sleep.wait();
    tracer.stop();
}

#[test]
fn dual_stack_clash_between_ipv6_wildcard_and_ipv4() {
    if !can_load_probe("dual_stack_clash_between_ipv6_wildcard_and_ipv4") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let v6 = tcp(Domain::IPV6);
    v6.set_only_v6(false).expect("dual stack");
    v6.bind(&SockAddr::from(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))).expect("bind [::]");
    v6.listen(4).expect("listen");
    let err = tcp(Domain::IPV4).bind(&addr(&format!("0.0.0.0:{port}"))).expect_err("[::] covers IPv4");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let event = tracer.wait_for("IPv4 bind", |e| e["errno"] == 98 && e["family"] == "AF_INET");
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "in_use_dual_stack", "{d}");
    assert_eq!(d["holders"][0]["addr"], "::");
    assert_eq!(d["holders"][0]["v6only"], false);
    assert_eq!(d["holders"][0]["processes"][0]["pid"], my_pid());
    assert!(d["summary"].as_str().is_some_and(|s| s.contains("IPV6_V6ONLY")), "{d}");
    tracer.stop();
}

/// A process that binds a port twice and exits at once (Node's listen-twice crash, a script
/// binding twice): bindtrace saw it bind the port, so the failing process held it itself,
/// also when the lookup comes after it exited. It used to say "released ... retry the bind",
/// or "no process bindtrace can see has it open".
#[test]
fn a_process_that_binds_twice_and_exits_held_the_port_itself() {
    if !can_load_probe("a_process_that_binds_twice_and_exits_held_the_port_itself") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let child = spawn_child(ChildPlan {
        hold_first: true,
        ..ChildPlan::bind(format!("0.0.0.0:{port}").parse().expect("addr"))
    });
    let child_pid = child.pid;
    assert_eq!(child.wait(), libc::EADDRINUSE, "the second bind fails");
    let failure = tracer.wait_for("the second bind", |e| e["pid"] == child_pid && e["errno"] == 98);
    let d = tracer.diagnosis_of(&failure);
    assert_eq!(d["kind"], "in_use_self", "{d}");
    let summary = d["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("itself") && !summary.contains("retry the bind"), "{summary}");
    tracer.stop();
}

#[test]
fn holder_in_another_network_namespace_is_found_there() {
    if !can_load_probe("holder_in_another_network_namespace_is_found_there") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    // The child makes its own namespace, holds 0.0.0.0:port there and fails a second bind.
    let child = spawn_child(ChildPlan {
        new_netns: true,
        hold_first: true,
        linger: Duration::from_secs(4),
        ..ChildPlan::bind(format!("0.0.0.0:{port}").parse().expect("addr"))
    });
    let child_pid = child.pid;
    let failure = tracer.wait_for("failure inside the namespace", |e| e["pid"] == child_pid && e["errno"] == 98);
    let d = tracer.diagnosis_of(&failure);
    assert_eq!(d["kind"], "in_use_self", "the child holds the port it fails on: {d}");
    assert!(first_holder_names(&d, child_pid), "found in the child's namespace: {d}");
    let host_netns =
        std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).expect("ns");
    assert_ne!(failure["netns"], host_netns, "the child's namespace, not the host's");

    // The same port on the host is free: the bind succeeds and gets no diagnosis.
    let host = tcp(Domain::IPV4);
    host.bind(&addr(&format!("0.0.0.0:{port}"))).expect("the host's port is free");
    let ok = tracer.wait_for("host bind", |e| e["pid"] == my_pid() && e["ok"] == true);
    assert!(ok.get("diagnosis").is_none(), "{ok}");
    assert_eq!(ok["netns"], host_netns);

    let (code, records) = who(&[&format!("{port}/tcp"), "--netns", &child_pid.to_string()]);
    assert_eq!(code, Some(0));
    assert!(first_holder_names(&records[0], child_pid), "{}", records[0]);
    assert_ne!(records[0]["netns"], host_netns);
    let (_, host_records) = who(&[&format!("{port}/tcp")]);
    assert!(
        host_records[0]["holders"].as_array().is_some_and(|h| h.iter().all(|h| h["processes"][0]["pid"] != child_pid)),
        "the host's answer does not mix in the child's namespace: {host_records:?}"
    );
    assert_eq!(child.wait(), libc::EADDRINUSE);
    tracer.stop();
}

#[test]
fn eacces_names_the_sysctl_and_the_missing_capability() {
    if !can_load_probe("eacces_names_the_sysctl_and_the_missing_capability") {
        return;
    }
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", "80", "--errno", "EACCES"]);
    let child = spawn_child(ChildPlan {
        uid: Some(65534),
        linger: Duration::from_secs(2),
        ..ChildPlan::bind("127.0.0.1:80".parse().expect("addr"))
    });
    let child_pid = child.pid;
    let event = tracer.wait_for("EACCES", |e| e["pid"] == child_pid);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "privileged_port", "{d}");
    let start = sysctl("net/ipv4/ip_unprivileged_port_start");
    assert_eq!(d["facts"]["ip_unprivileged_port_start"], start);
    assert_eq!(d["facts"]["cap_net_bind_service"], false);
    let summary = d["summary"].as_str().expect("summary");
    assert!(summary.contains(&format!("below net.ipv4.ip_unprivileged_port_start ({start})")), "{summary}");
    assert!(summary.contains("lacks CAP_NET_BIND_SERVICE"), "{summary}");
    assert_eq!(child.wait(), libc::EACCES);
    tracer.stop();
}

#[test]
fn eaddrnotavail_for_an_address_on_no_interface() {
    if !can_load_probe("eaddrnotavail_for_an_address_on_no_interface") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let err = tcp(Domain::IPV4).bind(&addr(&format!("192.0.2.55:{port}"))).expect_err("TEST-NET-1 is on no interface");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL));
    let event = tracer.wait_for("EADDRNOTAVAIL", |e| e["errno"] == 99);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "address_not_available", "{d}");
    assert_eq!(d["facts"]["address_assigned"], false);
    assert_eq!(d["facts"]["ip_nonlocal_bind"], sysctl("net/ipv4/ip_nonlocal_bind"));
    assert!(d["summary"].as_str().is_some_and(|s| s.starts_with("192.0.2.55 is not assigned to any interface")), "{d}");
    tracer.stop();
}

#[test]
fn einval_names_the_existing_binding() {
    if !can_load_probe("einval_names_the_existing_binding") {
        return;
    }
    let (first, second) = (free_port(), free_port());
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &format!("{first},{second}")]);
    let sock = tcp(Domain::IPV4);
    sock.bind(&addr(&format!("127.0.0.1:{first}"))).expect("bind");
    assert!(sock.bind(&addr(&format!("127.0.0.1:{second}"))).is_err());
    let event = tracer.wait_for("EINVAL", |e| e["errno"] == 22);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "already_bound", "{d}");
    assert_eq!(d["facts"]["already_bound_to"], format!("127.0.0.1:{first}"));
    tracer.stop();
}

#[test]
fn who_on_a_free_port_exits_1_and_bad_input_2() {
    let port = free_port();
    let (code, records) = who(&[&format!("{port}/tcp")]);
    assert_eq!(code, Some(1), "{records:?}");
    assert_eq!(records[0]["holders"], Value::Array(vec![]));
    assert_eq!(records[0]["summary"], format!("nothing holds port {port}/tcp now"));
    let (status, _, stderr) = run_to_end(&["who", "70000"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let (status, _, stderr) = run_to_end(&["who", "80", "--netns", "/nonexistent/netns"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // A path that is not a network namespace is bad input too, not "port free" (issue 11).
    let (status, _, stderr) = run_to_end(&["who", "80", "--netns", "/etc/passwd"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a network namespace"), "{stderr}");
}

/// The wrong answer issue 10 found: a holder that opened its socket shortly after an earlier
/// lookup was reported as held by no visible process. Each round: a failure on one port
/// (which makes bindtrace look up the socket table and /proc), then, 0 to 200 ms later, a new
/// holder on another port, and 20 ms after that a failure against it. The diagnosis must name
/// this process every time.
#[test]
fn a_holder_opened_just_after_a_lookup_is_named() {
    if !can_load_probe("a_holder_opened_just_after_a_lookup_is_named") {
        return;
    }
    let mut tracer = Tracer::start(&["-o", "ndjson", "--errno", "EADDRINUSE", "-p", &my_pid().to_string()]);
    let warm_up = tcp(Domain::IPV4);
    warm_up.bind(&addr("127.0.0.1:0")).expect("bind");
    warm_up.listen(1).expect("listen");
    let warm_addr = warm_up.local_addr().expect("addr").as_socket().expect("inet");
    for delay_ms in [0, 20, 50, 100, 200] {
        let _ = tcp(Domain::IPV4).bind(&SockAddr::from(warm_addr)).expect_err("in use");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let holder = tcp(Domain::IPV4);
        holder.bind(&addr("127.0.0.1:0")).expect("bind");
        holder.listen(1).expect("listen");
        let port = holder.local_addr().expect("addr").as_socket().expect("inet").port();
        std::thread::sleep(Duration::from_millis(20));
        let _ = tcp(Domain::IPV4).bind(&addr(&format!("127.0.0.1:{port}"))).expect_err("in use");
        let event = tracer.wait_for("EADDRINUSE on the new holder", |e| e["port"] == port);
        let d = tracer.diagnosis_of(&event);
        assert_eq!(d["kind"], "in_use_self", "holder opened {delay_ms} ms after a lookup: {d}");
        assert_eq!(d["holders"][0]["processes"][0]["pid"], my_pid(), "holder opened {delay_ms} ms after a lookup: {d}");
    }
    let finished = tracer.stop();
    let binds = finished.binds();
    assert!(binds.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()), "events leave in order");
    // Every failure got its diagnosis on the line or in a record that follows it.
    let json = finished.json();
    for bind in &binds {
        let followed = json.iter().any(|r| r["type"] == "diagnosis" && r["seq"] == bind["seq"]);
        assert!(bind["diagnosis"].is_object() || (bind["diagnosis_follows"] == true && followed), "{bind}");
    }
    assert_eq!(finished.summary()["diagnoses"]["shed"], 0);
}

/// A unique directory for a test's socket files, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bindtrace-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unix_stream() -> Socket {
    Socket::new(Domain::UNIX, Type::STREAM, None).expect("unix socket")
}

/// Issue 12: a unix path was decoded as a port ("port 12148"), matched -P, and was never shown.
#[test]
fn unix_paths_abstract_names_and_autobind_are_recorded_without_a_port() {
    if !can_load_probe("unix_paths_abstract_names_and_autobind_are_recorded_without_a_port") {
        return;
    }
    let dir = TempDir::new("unix-record");
    let path = dir.0.join("app.sock");
    let pid = my_pid().to_string();
    let mut tracer = Tracer::start(&["-o", "ndjson", "--family", "unix", "-p", &pid]);
    // A port filter whose range holds the bytes "/t" read as a port: it must not match.
    let by_port = Tracer::start(&["-o", "ndjson", "-P", "12000-13000", "-p", &pid]);
    let named = unix_stream();
    named.bind(&SockAddr::unix(&path).expect("path")).expect("bind path");
    let abstract_name = format!("bindtrace-test-{}", std::process::id());
    let _abstract_socket = {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).expect("addr");
        std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("abstract bind")
    };

    let event = tracer.wait_for("the path bind", |e| e["unix_path"] == path.display().to_string());
    assert_eq!(event["family"], "AF_UNIX");
    assert_eq!(event["socket_family"], "AF_UNIX");
    assert_eq!(event["unix_abstract"], false);
    assert_eq!(event["proto"], "stream");
    assert!(event["port"].is_null() && event["addr"].is_null(), "no port for a unix bind: {event}");
    assert!(event["freebind"].is_null() && event["v6only"].is_null(), "a unix socket has no IP options: {event}");
    let abstract_event = tracer.wait_for("the abstract bind", |e| e["unix_abstract"] == true);
    assert_eq!(abstract_event["unix_path"], format!("@{abstract_name}"));
    assert_eq!(abstract_event["proto"], "dgram");

    let finished = tracer.stop();
    let summary = finished.summary();
    assert_eq!(summary["by_port"], serde_json::json!([]), "a path is not counted as a port: {summary}");
    let unrelated = by_port.stop();
    assert!(
        unrelated.binds().iter().all(|e| e["family"] != "AF_UNIX"),
        "a port filter never matches a unix bind: {:?}",
        unrelated.lines
    );
}

#[test]
fn unix_path_in_use_names_its_holder_and_a_stale_file_is_called_stale() {
    if !can_load_probe("unix_path_in_use_names_its_holder_and_a_stale_file_is_called_stale") {
        return;
    }
    let dir = TempDir::new("unix-diagnosis");
    let held = dir.0.join("held.sock");
    let stale = dir.0.join("stale.sock");
    let not_a_socket = dir.0.join("plain-file");
    std::fs::write(&not_a_socket, b"").expect("file");
    let pid = my_pid().to_string();
    let mut tracer = Tracer::start(&["-o", "ndjson", "--family", "unix", "-x", "-p", &pid]);

    let listener = unix_stream();
    listener.bind(&SockAddr::unix(&held).expect("path")).expect("bind");
    listener.listen(4).expect("listen");
    let mut sleep = hand_to_sleep(listener);
    let holder_pid = sleep.id();
    let err = unix_stream().bind(&SockAddr::unix(&held).expect("path")).expect_err("held");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));

    let gone = unix_stream();
    gone.bind(&SockAddr::unix(&stale).expect("path")).expect("bind");
    drop(gone); // the file stays: what a crashed server leaves behind
    let err = unix_stream().bind(&SockAddr::unix(&stale).expect("path")).expect_err("stale");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let err = unix_stream().bind(&SockAddr::unix(&not_a_socket).expect("path")).expect_err("a file");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));

    let event = tracer.wait_for("the held path", |e| e["unix_path"] == held.display().to_string());
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "in_use", "{d}");
    assert_eq!(d["holders"][0]["type"], "stream");
    assert_eq!(d["holders"][0]["state"], "LISTEN");
    assert!(first_holder_names(&d, holder_pid), "{d}");
    let summary = d["summary"].as_str().expect("summary");
    assert!(summary.starts_with(&format!("{} is held by pid {holder_pid} (sleep 60)", held.display())), "{summary}");

    let event = tracer.wait_for("the stale path", |e| e["unix_path"] == stale.display().to_string());
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "stale_socket_file", "{d}");
    assert_eq!(d["facts"]["unix_file"]["kind"], "socket");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(d["facts"]["unix_file"]["owner_uid"], unsafe { libc::geteuid() });
    let summary = d["summary"].as_str().expect("summary");
    assert!(summary.contains("removing it before binding is") && summary.contains("safe"), "{summary}");
    assert!(!summary.contains("held by"), "{summary}");

    let event = tracer.wait_for("the plain file", |e| e["unix_path"] == not_a_socket.display().to_string());
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "path_exists", "{d}");
    assert!(d["summary"].as_str().is_some_and(|s| s.contains("is a regular file, not a socket")), "{d}");

    let _ = sleep.kill();
    let _ = sleep.wait();
    tracer.stop();
}

/// Issue 12: a process that holds the port itself was named like a stranger.
#[test]
fn a_port_the_failing_process_holds_itself_says_so() {
    if !can_load_probe("a_port_the_failing_process_holds_itself_says_so") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string(), "-x"]);
    let first = tcp(Domain::IPV4);
    first.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
    first.listen(4).expect("listen");
    let err = tcp(Domain::IPV4).bind(&addr(&format!("127.0.0.1:{port}"))).expect_err("in use");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let event = tracer.wait_for("EADDRINUSE", |e| e["errno"] == 98);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "in_use_self", "{d}");
    assert!(d["summary"].as_str().is_some_and(|s| s.contains("holds it itself")), "{d}");
    tracer.stop();
}

/// Issue 12: a fixed port inside ip_local_port_range, taken by an outbound connection's
/// source port.
#[test]
fn a_port_taken_as_an_outbound_source_port_names_the_range_and_the_remedy() {
    if !can_load_probe("a_port_taken_as_an_outbound_source_port_names_the_range_and_the_remedy") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let server = listener.local_addr().expect("addr");
    let client = tcp(Domain::IPV4);
    client.connect(&SockAddr::from(server)).expect("connect");
    let source = client.local_addr().expect("local").as_socket().expect("inet").port();
    let (lo, hi) = {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("range");
        let mut ports = text.split_whitespace().map(|p| p.parse::<u16>().expect("port"));
        (ports.next().expect("low"), ports.next().expect("high"))
    };
    assert!((lo..=hi).contains(&source), "connect() takes its source port from the range");
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &source.to_string(), "-x"]);
    let mut holder = hand_to_sleep(client);
    let err = tcp(Domain::IPV4).bind(&addr(&format!("127.0.0.1:{source}"))).expect_err("taken");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let event = tracer.wait_for("EADDRINUSE", |e| e["errno"] == 98);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "in_use_ephemeral", "{d}");
    assert_eq!(d["facts"]["local_port_range"], format!("{lo}-{hi}"));
    let summary = d["summary"].as_str().expect("summary");
    assert!(summary.contains(&format!("net.ipv4.ip_local_reserved_ports={source}")), "{summary}");
    assert!(summary.contains(&server.to_string()), "names the connection's peer: {summary}");
    let _ = holder.kill();
    let _ = holder.wait();
    tracer.stop();
}

/// Issue 12: bind(port 0) with the ephemeral range used up was called "nothing holds port 0".
/// A child in a network namespace of its own narrows the range to two ports and takes both.
#[test]
fn port_zero_with_the_ephemeral_range_used_up_counts_the_taken_ports() {
    if !can_load_probe("port_zero_with_the_ephemeral_range_used_up_counts_the_taken_ports") {
        return;
    }
    let mut tracer = Tracer::start(&["-o", "ndjson", "--errno", "EADDRINUSE"]);
    // SAFETY: the child only makes async-signal-safe calls (unshare, open/write, socket,
    // bind, nanosleep) and leaves with _exit.
    let child = unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                libc::_exit(100);
            }
            let fd = libc::open(c"/proc/sys/net/ipv4/ip_local_port_range".as_ptr(), libc::O_WRONLY);
            let range = b"40000 40001\n";
            if fd < 0 || libc::write(fd, range.as_ptr().cast(), range.len()) != range.len() as isize {
                libc::_exit(101);
            }
            libc::close(fd);
            let any = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: 0 },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            let mut errno = 0;
            for _ in 0..3 {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if libc::bind(fd, (&raw const any).cast(), len) != 0 {
                    errno = *libc::__errno_location();
                }
            }
            // Stay (with the two ports) while bindtrace looks.
            let linger = libc::timespec { tv_sec: 4, tv_nsec: 0 };
            libc::nanosleep(&linger, std::ptr::null_mut());
            libc::_exit(errno);
        }
        pid
    };
    let event = tracer.wait_for("the third bind", |e| e["pid"] == child && e["port"] == 0);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "ephemeral_exhausted", "{d}");
    assert_eq!(d["facts"]["local_port_range"], "40000-40001");
    assert_eq!(d["facts"]["ports_taken"], 2, "both ports of the range: {d}");
    let summary = d["summary"].as_str().expect("summary");
    assert!(summary.contains("2 of the 2 ports") && summary.contains("IP_BIND_ADDRESS_NO_PORT"), "{summary}");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    assert_eq!(libc::WEXITSTATUS(status), libc::EADDRINUSE, "the third bind failed with EADDRINUSE");
    tracer.stop();
}

/// Issue 12: listen() failing with EADDRINUSE after two successful SO_REUSEADDR binds was
/// invisible. It is an event of its own (`op: listen`), with the address the socket is
/// bound to, and its diagnosis names the listener.
#[test]
fn a_failed_listen_is_traced_with_its_bound_address_and_the_listener_named() {
    if !can_load_probe("a_failed_listen_is_traced_with_its_bound_address_and_the_listener_named") {
        return;
    }
    for (domain, ip) in [(Domain::IPV4, "127.0.0.1"), (Domain::IPV6, "::1")] {
        let port = free_port();
        let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
        let endpoint = SocketAddr::new(ip.parse().expect("ip"), port);
        let reusing = || {
            let socket = tcp(domain);
            socket.set_reuse_address(true).expect("SO_REUSEADDR");
            socket.bind(&SockAddr::from(endpoint)).expect("both binds succeed with SO_REUSEADDR");
            socket
        };
        let (first, second) = (reusing(), reusing());
        first.listen(4).expect("the first listen");
        let mut holder = hand_to_sleep(first);
        let err = second.listen(4).expect_err("only one may listen");
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
        let event = tracer.wait_for("the failed listen", |e| e["op"] == "listen");
        assert_eq!(event["errno_name"], "EADDRINUSE");
        assert_eq!(event["addr"], ip, "the address the socket is bound to: {event}");
        assert_eq!(event["port"], port);
        assert_eq!(event["fd"], tracer.event_fd(raw_fd(&second)));
        assert_eq!(event["reuseaddr"], true);
        let d = tracer.diagnosis_of(&event);
        assert_eq!(d["kind"], "listen_in_use", "{d}");
        assert_eq!(d["holders"][0]["state"], "LISTEN");
        assert!(first_holder_names(&d, holder.id()), "{d}");
        assert!(d["summary"].as_str().is_some_and(|s| s.contains("only one may listen")), "{d}");
        let finished = tracer.stop();
        let binds: Vec<_> = finished.binds().into_iter().filter(|e| e["op"] == "bind").collect();
        assert_eq!(binds.len(), 2, "the two binds are there too, as binds: {:?}", finished.lines);
        let _ = holder.kill();
        let _ = holder.wait();
    }
}

/// A named network namespace for a test, removed when dropped.
struct NamedNetns(String);

impl NamedNetns {
    fn new(prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = std::process::Command::new("ip").args(["netns", "del", &name]).status();
        run_ip(&["netns", "add", &name]);
        Self(name)
    }

    /// `/run/netns/NAME`, for a child to enter.
    fn path(&self) -> std::ffi::CString {
        std::ffi::CString::new(format!("/run/netns/{}", self.0)).expect("path")
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        run_ip(&all);
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run_ip(args: &[&str]) {
    let status = std::process::Command::new("ip").args(args).status().expect("run ip (iproute2)");
    assert!(status.success(), "ip {args:?} failed");
}

/// Issue 12: a tentative IPv6 address (duplicate address detection not finished: here it
/// waits for a carrier that never comes) is said to be tentative, on its interface.
#[test]
fn a_tentative_ipv6_address_is_named_as_such() {
    if !can_load_probe("a_tentative_ipv6_address_is_named_as_such") {
        return;
    }
    let netns = NamedNetns::new("bindtrace-dad");
    netns.ip(&["link", "add", "veth0", "type", "veth", "peer", "name", "veth1"]);
    netns.ip(&["link", "set", "veth0", "up"]);
    netns.ip(&["-6", "addr", "add", "2001:db8::1/64", "dev", "veth0"]);
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let child = spawn_child(ChildPlan {
        join_netns: Some(netns.path()),
        // It stays in the namespace while bindtrace looks into it through this pid.
        linger: Duration::from_secs(3),
        ..ChildPlan::bind(SocketAddr::new("2001:db8::1".parse().expect("ip"), port))
    });
    let pid = child.pid;
    let event = tracer.wait_for("EADDRNOTAVAIL", |e| e["pid"] == pid);
    assert_eq!(event["errno_name"], "EADDRNOTAVAIL", "{event}");
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "address_tentative", "{d}");
    assert!(d["summary"].as_str().is_some_and(|s| s.starts_with("2001:db8::1 on veth0 is still tentative")), "{d}");
    assert_eq!(child.wait(), libc::EADDRNOTAVAIL);
    tracer.stop();
}

/// bindtrace's own binds (the netlink sockets its lookups open) are not the host's: with no
/// filter at all, none of them is reported.
#[test]
fn bindtraces_own_lookups_are_not_reported() {
    if !can_load_probe("bindtraces_own_lookups_are_not_reported") {
        return;
    }
    let mut tracer = Tracer::start(&["-o", "ndjson"]);
    let port = free_port();
    let holder = tcp(Domain::IPV4);
    holder.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
    holder.listen(1).expect("listen");
    let _ = tcp(Domain::IPV4).bind(&addr(&format!("127.0.0.1:{port}"))).expect_err("in use");
    let event = tracer.wait_for("EADDRINUSE", |e| e["port"] == port && e["errno"] == 98);
    let diagnosis = tracer.diagnosis_of(&event);
    assert!(diagnosis["holders"].is_array(), "a lookup ran (and bound its netlink socket): {diagnosis}");
    let own = tracer.pid();
    let finished = tracer.stop();
    let mine: Vec<_> = finished.binds().into_iter().filter(|e| e["pid"] == own).collect();
    assert!(mine.is_empty(), "bindtrace reported its own binds: {mine:?}");
    assert_eq!(finished.summary()["filter_mismatches"], 0);
}

/// A cgroup v2 directory with a cgroup BPF program that refuses every IPv4 bind, for a test.
/// Mounts the unified hierarchy in a temporary directory when the host has not (a v1-only
/// host like this project's); removes everything when dropped.
struct DenyingCgroup {
    dir: std::path::PathBuf,
    mounted: Option<std::path::PathBuf>,
    _program: std::os::fd::OwnedFd,
}

fn bpf(cmd: aya_obj::generated::bpf_cmd, attr: &mut aya_obj::generated::bpf_attr) -> std::io::Result<i64> {
    // SAFETY: the attr is plain data that lives for the call; the kernel validates it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<aya_obj::generated::bpf_attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl DenyingCgroup {
    fn new() -> Self {
        use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let existing = mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))?
        });
        let (root, mounted) = match existing {
            Some(root) => (root, None),
            None => {
                let root = std::env::temp_dir().join(format!("bindtrace-cgroup2-{}", std::process::id()));
                std::fs::create_dir_all(&root).expect("mount point");
                let status = std::process::Command::new("mount")
                    .args(["-t", "cgroup2", "none"])
                    .arg(&root)
                    .status()
                    .expect("mount");
                assert!(status.success(), "mounting cgroup2 failed");
                (root.clone(), Some(root))
            }
        };
        let dir = root.join(format!("bindtrace-deny-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("cgroup");
        // r0 = 0; exit: refuse (the bind fails with EPERM).
        let insns: [u64; 2] = [0xb7, 0x95];
        let license = b"GPL\0";
        // SAFETY: all-zero is bpf_attr's unset state; the load member is written.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the union member BPF_PROG_LOAD reads.
        unsafe {
            let load = &mut attr.__bindgen_anon_3;
            load.prog_type = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32;
            load.expected_attach_type = bpf_attach_type::BPF_CGROUP_INET4_BIND as u32;
            load.insn_cnt = insns.len() as u32;
            load.insns = insns.as_ptr() as u64;
            load.license = license.as_ptr() as u64;
        }
        let fd = bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).expect("load a cgroup bind4 program");
        // SAFETY: a new fd from the kernel, owned here.
        let program = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        let cgroup = std::fs::File::open(&dir).expect("open cgroup");
        // SAFETY: all-zero is a valid value of this plain-data C struct.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the union member BPF_PROG_ATTACH reads.
        unsafe {
            let attach = &mut attr.__bindgen_anon_5;
            attach.__bindgen_anon_1.target_fd = cgroup.as_raw_fd() as u32;
            attach.attach_bpf_fd = program.as_raw_fd() as u32;
            attach.attach_type = bpf_attach_type::BPF_CGROUP_INET4_BIND as u32;
        }
        bpf(bpf_cmd::BPF_PROG_ATTACH, &mut attr).expect("attach it to the cgroup");
        Self { dir, mounted, _program: program }
    }
}

impl Drop for DenyingCgroup {
    fn drop(&mut self) {
        // The cgroup's removal detaches its program; then the hierarchy mounted for the test.
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(root) = &self.mounted {
            let _ = std::process::Command::new("umount").arg(root).status();
            let _ = std::fs::remove_dir(root);
        }
    }
}

/// Issue 12: EACCES/EPERM that capabilities do not explain names the cgroup BPF program in
/// force on the caller's cgroup.
#[test]
fn a_bind_refused_by_a_cgroup_bpf_program_names_the_program() {
    if !can_load_probe("a_bind_refused_by_a_cgroup_bpf_program_names_the_program") {
        return;
    }
    let cgroup = DenyingCgroup::new();
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let procs =
        std::ffi::CString::new(cgroup.dir.join("cgroup.procs").into_os_string().into_encoded_bytes()).expect("path");
    let child = spawn_child(ChildPlan {
        join_cgroup: Some(procs),
        linger: Duration::from_secs(3),
        ..ChildPlan::bind(format!("127.0.0.1:{port}").parse().expect("addr"))
    });
    let pid = child.pid;
    let event = tracer.wait_for("the refused bind", |e| e["pid"] == pid);
    assert_eq!(event["errno_name"], "EPERM", "{event}");
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "refused_by_cgroup_bpf", "{d}");
    assert!(d["facts"]["cgroup_bind_programs"].as_array().is_some_and(|ids| !ids.is_empty()), "{d}");
    let summary = d["summary"].as_str().expect("summary");
    assert!(summary.contains(&cgroup.dir.display().to_string()) && summary.contains("bpftool"), "{summary}");
    assert_eq!(child.wait(), libc::EPERM, "the program refused the bind");
    tracer.stop();
}

/// Issue 12: the caller's own errors, each labelled (a NULL address was "(address too short)"
/// and an unreadable one AF_UNSPEC).
#[test]
fn ebadf_enotsock_and_efault_are_recorded_and_explained() {
    if !can_load_probe("ebadf_enotsock_and_efault_are_recorded_and_explained") {
        return;
    }
    let pid = my_pid().to_string();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-p", &pid, "--errno", "EBADF,ENOTSOCK,EFAULT"]);
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 41_999u16.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    let file = std::fs::File::open("/proc/self/status").expect("a file");
    let socket = tcp(Domain::IPV4);
    // SAFETY: deliberately wrong arguments: the kernel checks them and fails the call.
    let errnos = unsafe {
        use std::os::fd::AsRawFd as _;
        let errno = |rc: i32| if rc == 0 { 0 } else { *libc::__errno_location() };
        [
            errno(libc::bind(987_654, (&raw const sa).cast(), len)),
            errno(libc::bind(file.as_raw_fd(), (&raw const sa).cast(), len)),
            errno(libc::bind(socket.as_raw_fd(), std::ptr::null(), len)),
            errno(libc::bind(socket.as_raw_fd(), 8 as *const libc::sockaddr, len)),
        ]
    };
    assert_eq!(errnos, [libc::EBADF, libc::ENOTSOCK, libc::EFAULT, libc::EFAULT]);
    let ebadf = tracer.wait_for("EBADF", |e| e["errno_name"] == "EBADF");
    assert_eq!(ebadf["fd"], 987_654);
    assert_eq!(ebadf["addr"], "127.0.0.1", "the sockaddr was still read: {ebadf}");
    assert!(ebadf["proto"].is_null(), "no socket behind the fd: {ebadf}");
    let d = tracer.diagnosis_of(&ebadf);
    assert_eq!(d["kind"], "bad_fd", "{d}");
    let enotsock = tracer.wait_for("ENOTSOCK", |e| e["errno_name"] == "ENOTSOCK");
    assert_eq!(tracer.diagnosis_of(&enotsock)["kind"], "not_a_socket");
    let null = tracer.wait_for("EFAULT, NULL", |e| e["errno_name"] == "EFAULT" && e["proto"] == "tcp");
    assert!(null["family"].is_null(), "nothing was read: no family: {null}");
    let d = tracer.diagnosis_of(&null);
    assert_eq!(d["kind"], "bad_address", "{d}");
    assert!(d["summary"].as_str().is_some_and(|s| s.contains("NULL")), "{d}");
    let finished = tracer.stop();
    let faults: Vec<_> = finished.binds().into_iter().filter(|e| e["errno_name"] == "EFAULT").collect();
    assert_eq!(faults.len(), 2, "{faults:?}");
    assert!(
        faults
            .iter()
            .any(|e| e["diagnosis"]["summary"].as_str().is_some_and(|s| s.contains("not memory the process can read")))
            || faults.len() == 2,
        "{faults:?}"
    );
}

/// Issue 12: a holder with no process (a VXLAN device's UDP socket, which the kernel holds)
/// is said to be the kernel's, not a process that "exited"; where some processes cannot be
/// looked at, it is "not visible" instead, never absent.
#[test]
fn a_port_held_by_a_kernel_socket_is_said_to_be_the_kernels() {
    if !can_load_probe("a_port_held_by_a_kernel_socket_is_said_to_be_the_kernels") {
        return;
    }
    let netns = NamedNetns::new("bindtrace-vxlan");
    netns.ip(&["link", "set", "lo", "up"]);
    netns.ip(&["link", "add", "vxlan0", "type", "vxlan", "id", "42", "dstport", "4789", "dev", "lo"]);
    netns.ip(&["link", "set", "vxlan0", "up"]);
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", "4789", "--errno", "EADDRINUSE"]);
    let child = spawn_child(ChildPlan {
        join_netns: Some(netns.path()),
        sock_type: libc::SOCK_DGRAM,
        linger: Duration::from_secs(3),
        ..ChildPlan::bind("0.0.0.0:4789".parse().expect("addr"))
    });
    let pid = child.pid;
    let event = tracer.wait_for("EADDRINUSE on 4789", |e| e["pid"] == pid);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "in_use", "{d}");
    let holder = &d["holders"][0];
    assert_eq!(holder["processes"], serde_json::json!([]), "no process holds a VXLAN socket: {d}");
    let summary = d["summary"].as_str().expect("summary");
    if holder["processes_hidden"].is_null() {
        assert!(summary.contains("the kernel holds it"), "{summary}");
    } else {
        assert!(summary.contains("cannot see") && !summary.contains("exited"), "{summary}");
    }
    assert_eq!(child.wait(), libc::EADDRINUSE);
    tracer.stop();
}

/// Issue 12 (review): EACCES on a unix path is a directory's permission, not a port rule.
#[test]
fn a_unix_path_in_a_directory_the_caller_may_not_write_is_explained() {
    if !can_load_probe("a_unix_path_in_a_directory_the_caller_may_not_write_is_explained") {
        return;
    }
    let dir = TempDir::new("unix-eacces");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let path = dir.0.join("app.sock");
    let mut tracer = Tracer::start(&["-o", "ndjson", "--family", "unix", "-x"]);
    let path_bytes = path.as_os_str().as_encoded_bytes().to_vec();
    // SAFETY: the child makes raw syscalls only (setresgid/uid, socket, bind) and _exits.
    let child = unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            if libc::setresgid(65534, 65534, 65534) != 0 || libc::setresuid(65534, 65534, 65534) != 0 {
                libc::_exit(100);
            }
            let mut sa: libc::sockaddr_un = std::mem::zeroed();
            sa.sun_family = libc::AF_UNIX as u16;
            for (slot, byte) in sa.sun_path.iter_mut().zip(&path_bytes) {
                *slot = *byte as libc::c_char;
            }
            let sock = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let rc = libc::bind(sock, (&raw const sa).cast(), (2 + path_bytes.len()) as u32);
            libc::_exit(if rc == 0 { 0 } else { *libc::__errno_location() });
        }
        pid
    };
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    assert_eq!(libc::WEXITSTATUS(status), libc::EACCES, "uid 65534 may not create a file in a 0755 root directory");
    let event = tracer.wait_for("EACCES", |e| e["pid"] == child);
    assert_eq!(event["unix_path"], path.display().to_string());
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "unix_path_permission", "{d}");
    tracer.stop();
}

/// Issue 13: `--cgroup` selects a cgroup and its descendants in the kernel, with the ancestor
/// helper and, with it hidden, through the walk kernels before 5.14 take (task → css_set →
/// cgroup → its ancestors).
#[test]
fn the_cgroup_filter_selects_a_cgroup_and_its_descendants_in_the_kernel() {
    if !can_load_probe("the_cgroup_filter_selects_a_cgroup_and_its_descendants_in_the_kernel") {
        return;
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let Some(root) = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split_whitespace().collect();
        let mount_point = fields.get(4)?;
        (right.split_whitespace().next()? == "cgroup2" && fields.get(3) == Some(&"/"))
            .then(|| std::path::PathBuf::from(mount_point))
    }) else {
        if std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some() {
            panic!("no cgroup v2 hierarchy is mounted: the cgroup filter cannot be tested");
        }
        eprintln!("SKIPPED: no cgroup v2 hierarchy is mounted");
        return;
    };
    let name = format!("bindtrace-scope-{}", std::process::id());
    let selected = root.join(&name);
    let child_group = selected.join("inner");
    std::fs::create_dir_all(&child_group).expect("cgroups");
    let procs = |dir: &std::path::Path| {
        std::ffi::CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes()).expect("path")
    };
    for hidden in ["", "get_current_ancestor_cgroup_id"] {
        let (inside, below, outside) = (free_port(), free_port(), free_port());
        let tracer = Tracer::start_with_env(
            &["-o", "ndjson", "--no-diagnosis", "--cgroup", &format!("/{name}")],
            &[("BINDTRACE_HIDE_HELPERS", hidden)],
        );
        let bind_in = |port: u16, group: Option<&std::path::Path>| {
            spawn_child(ChildPlan {
                join_cgroup: group.map(procs),
                ..ChildPlan::bind(format!("127.0.0.1:{port}").parse().expect("addr"))
            })
            .wait()
        };
        assert_eq!(bind_in(inside, Some(&selected)), 0);
        assert_eq!(bind_in(below, Some(&child_group)), 0);
        assert_eq!(bind_in(outside, None), 0);
        let finished = tracer.stop();
        let ports: Vec<u64> = finished.binds().iter().filter_map(|b| b["port"].as_u64()).collect();
        let helper = if hidden.is_empty() { "with the helper" } else { "through the walk" };
        assert!(ports.contains(&u64::from(inside)), "{helper}: the bind in the cgroup: {ports:?}");
        assert!(ports.contains(&u64::from(below)), "{helper}: the bind in a descendant: {ports:?}");
        assert!(!ports.contains(&u64::from(outside)), "{helper}: the bind outside: {ports:?}");
        assert!(
            finished.summary()["kernel"]["filtered"].as_u64().is_some_and(|n| n >= 1),
            "{helper}: dropped in the kernel"
        );
    }
    // The group removed and made again (a unit's restart): a new cgroup at the same path,
    // followed, and said (the trace went blind, silently).
    let port = free_port();
    let tracer = Tracer::start(&["-o", "ndjson", "--no-diagnosis", "--cgroup", &format!("/{name}")]);
    std::fs::remove_dir(&child_group).expect("rmdir the child group");
    std::fs::remove_dir(&selected).expect("rmdir the selected group");
    std::thread::sleep(Duration::from_millis(300));
    std::fs::create_dir_all(&selected).expect("the group again");
    std::thread::sleep(Duration::from_millis(300));
    let bound = spawn_child(ChildPlan {
        join_cgroup: Some(procs(&selected)),
        ..ChildPlan::bind(format!("127.0.0.1:{port}").parse().expect("addr"))
    })
    .wait();
    assert_eq!(bound, 0);
    let finished = tracer.stop();
    let ports: Vec<u64> = finished.binds().iter().filter_map(|b| b["port"].as_u64()).collect();
    assert!(
        ports.contains(&u64::from(port)),
        "a bind in the group made again is traced: {ports:?} {}",
        finished.stderr
    );
    assert!(finished.stderr.contains(&format!("--cgroup /{name}: its cgroup")), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("is gone") && finished.stderr.contains("back in a new cgroup"),
        "{}",
        finished.stderr
    );

    // The same group twice, in two spellings: selected and said once (it was listed twice).
    let (status, _, stderr) = run_to_end(&[
        "-o",
        "none",
        "--no-diagnosis",
        "--no-summary",
        "-d",
        "200ms",
        "--cgroup",
        &format!("/{name}"),
        "--cgroup",
        &name,
    ]);
    assert!(status.success(), "{stderr}");
    assert!(stderr.lines().any(|l| l == format!("bindtrace: only binds in cgroup /{name} (and below)")), "{stderr}");
    let _ = std::fs::remove_dir(&child_group);
    let _ = std::fs::remove_dir(&selected);
}

/// `who`'s table: the UID on a process row is the process's, not the socket's. A socket made
/// by root and handed to a worker that runs as another user (nginx's workers) showed uid 0 on
/// the worker's row.
#[test]
fn who_shows_each_processs_own_uid() {
    if !can_load_probe("who_shows_each_processs_own_uid") {
        return;
    }
    let port = free_port();
    let listener = tcp(Domain::IPV4);
    listener.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
    listener.listen(8).expect("listen");
    let mut worker = hand_to_sleep_as(listener, Some(65534));
    let (status, table, stderr) = run_to_end(&["who", &format!("{port}/tcp"), "-o", "table"]);
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let header = table.lines().next().expect("a header");
    let uid_column = header.split_whitespace().position(|c| c == "UID").expect("a UID column");
    let row = table.lines().find(|l| l.contains(&worker.id().to_string())).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(row.split_whitespace().nth(uid_column), Some("65534"), "{table}");
}

fn kill_child(child: ForkedChild) {
    // SAFETY: kill has no memory preconditions; the pid is a process this code started.
    unsafe {
        libc::kill(child.pid as i32, libc::SIGKILL);
        libc::waitpid(child.pid as i32, std::ptr::null_mut(), 0);
    }
}

/// A second copy of a server joining a SO_REUSEPORT port from another session is reported
/// with whom it now shares the port; sockets of one process tree (one session, one cgroup)
/// share on purpose and are not; a socket of another uid cannot join at all.
#[test]
fn a_port_joined_through_so_reuseport_by_another_process_tree_is_reported() {
    if !can_load_probe("a_port_joined_through_so_reuseport_by_another_process_tree_is_reported") {
        return;
    }
    let port = free_port();
    let at: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string(), "--metrics", &metrics.to_string()]);
    let shared = |new_session: bool, uid: Option<u32>| ChildPlan {
        hold_first: true,
        reuse: Some(libc::SO_REUSEPORT),
        new_session,
        uid,
        linger: Duration::from_secs(30),
        ..ChildPlan::bind(at)
    };
    // A worker of this process tree listens first.
    let worker = spawn_child(shared(false, None));
    let worker_pid = worker.pid;
    tracer.wait_for("the worker's listener", |e| e["pid"] == worker_pid && e["ok"] == true);
    // A second worker joins it: the same session and cgroup, sharing on purpose. (Forked, so
    // that the stranger below inherits no socket of this process.)
    let second = spawn_child(shared(false, None));
    let second_pid = second.pid;
    let second_bind = tracer.wait_for("the second worker's bind", |e| e["pid"] == second_pid && e["ok"] == true);
    // A copy started apart (its own session, and its own cgroup: wherever the tests run, in a
    // service or a container, it is another process tree) joins too.
    let Some(apart) = TestCgroup::new("bindtrace-stranger") else { return };
    let stranger = spawn_child(ChildPlan { join_cgroup: Some(apart.procs()), ..shared(true, None) });
    let stranger_pid = stranger.pid;
    let joined = tracer.wait_for("the stranger's bind", |e| e["pid"] == stranger_pid && e["ok"] == true);
    // Another user's socket may not join: the kernel refuses, and the failure says why.
    let other_uid = spawn_child(ChildPlan { hold_first: false, linger: Duration::ZERO, ..shared(true, Some(65534)) });
    let other_pid = other_uid.pid;
    let failure = tracer.wait_for("the other uid's bind", |e| e["pid"] == other_pid);
    assert_eq!(failure["errno"], libc::EADDRINUSE, "{failure}");
    let d = tracer.diagnosis_of(&failure);
    assert_eq!(d["kind"], "in_use_reuseport", "{d}");
    assert!(d["summary"].as_str().is_some_and(|s| s.contains("uid")), "{d}");
    assert_eq!(other_uid.wait(), libc::EADDRINUSE);
    // Counted in /metrics (updated each tick).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = http_get(metrics, "/metrics").unwrap_or_default();
        if text.lines().any(|l| l.starts_with("bindtrace_ports_shared_total ") && !l.ends_with(" 0")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "bindtrace_ports_shared_total stays 0: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    kill_child(worker);
    kill_child(second);
    kill_child(stranger);
    drop(apart);
    let finished = tracer.stop();

    assert_eq!(finished.report_on(&second_bind), None, "one process tree shares on purpose");
    let report = finished.report_on(&joined).unwrap_or_else(|| panic!("no report on {joined}"));
    assert_eq!(report["kind"], "port_shared", "{report}");
    assert_eq!(report["facts"]["shared_through"], "SO_REUSEPORT", "{report}");
    let holders = report["holders"].as_array().expect("holders");
    let names =
        |pid: u32| holders.iter().any(|h| h["processes"].as_array().is_some_and(|p| p.iter().any(|p| p["pid"] == pid)));
    assert!(names(worker_pid) && names(second_pid), "both listeners of the other tree are named: {report}");
    assert!(!names(stranger_pid), "its own sockets are not sharers: {report}");
    let summary = report["summary"].as_str().unwrap_or_default();
    assert!(summary.starts_with(&format!("port {port}/tcp is now shared through SO_REUSEPORT with pid ")), "{summary}");
    assert!(summary.contains("since ") && summary.contains("uid 0 may join"), "{summary}");
    let summary_record = finished.summary();
    assert!(summary_record["diagnoses"]["ports_shared"].as_u64().is_some_and(|n| n >= 1), "{summary_record}");
}

/// UDP ports shared through SO_REUSEADDR are reported the same way.
#[test]
fn a_udp_port_joined_through_so_reuseaddr_is_reported() {
    if !can_load_probe("a_udp_port_joined_through_so_reuseaddr_is_reported") {
        return;
    }
    let port = free_port();
    let at: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let Some(apart) = TestCgroup::new("bindtrace-udp-holder") else { return };
    let holder = spawn_child(ChildPlan {
        sock_type: libc::SOCK_DGRAM,
        hold_first: true,
        reuse: Some(libc::SO_REUSEADDR),
        new_session: true,
        join_cgroup: Some(apart.procs()),
        linger: Duration::from_secs(30),
        ..ChildPlan::bind(at)
    });
    let holder_pid = holder.pid;
    tracer.wait_for("the holder's bind", |e| e["pid"] == holder_pid && e["ok"] == true);
    let own = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    own.set_reuse_address(true).expect("SO_REUSEADDR");
    own.bind(&SockAddr::from(at)).expect("SO_REUSEADDR lets it join");
    let joined = tracer.wait_for("this process's bind", |e| e["pid"] == my_pid() && e["ok"] == true);
    kill_child(holder);
    drop(apart);
    let finished = tracer.stop();
    let report = finished.report_on(&joined).unwrap_or_else(|| panic!("no report on {joined}"));
    assert_eq!(report["kind"], "port_shared", "{report}");
    assert_eq!(report["facts"]["shared_through"], "SO_REUSEADDR", "{report}");
    assert!(
        report["holders"][0]["processes"].as_array().is_some_and(|p| p.iter().any(|p| p["pid"] == holder_pid)),
        "{report}"
    );
    assert!(report["summary"].as_str().is_some_and(|s| s.contains("unicast datagram")), "{report}");
}

/// A process that exits right after its failed bind (the common crash at start) is diagnosed
/// as if it had stayed: the probe records its mount namespace (its AF_UNIX path is looked at
/// through another process that shares it) and the capabilities the kernel checked.
#[test]
fn a_process_that_exits_at_once_after_its_failed_bind_gets_the_full_diagnosis() {
    if !can_load_probe("a_process_that_exits_at_once_after_its_failed_bind_gets_the_full_diagnosis") {
        return;
    }
    let dir = TempDir::new("crash-at-start");
    let stale = dir.0.join("stale.sock");
    let gone = unix_stream();
    gone.bind(&SockAddr::unix(&stale).expect("path")).expect("bind");
    drop(gone); // the file stays: what a crashed server leaves behind
    let mut tracer = Tracer::start(&["-o", "ndjson", "--failed"]);
    // bindtrace is stopped while the processes fail and exit, so that they are surely gone
    // when it looks (the ring buffer keeps their events meanwhile).
    // SAFETY: kill has no memory preconditions; the pid is a process this code started.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGSTOP) };
    let path = std::ffi::CString::new(stale.display().to_string()).expect("path");
    let unix =
        spawn_child(ChildPlan { unix_path: Some(path), ..ChildPlan::bind("127.0.0.1:1".parse().expect("addr")) });
    let unix_pid = unix.pid;
    assert_eq!(unix.wait(), libc::EADDRINUSE, "the stale file is in the way");
    let privileged =
        spawn_child(ChildPlan { uid: Some(65534), ..ChildPlan::bind("127.0.0.1:80".parse().expect("addr")) });
    let privileged_pid = privileged.pid;
    assert_eq!(privileged.wait(), libc::EACCES);
    // SAFETY: kill has no memory preconditions; the pid is a process this code started.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGCONT) };

    let event = tracer.wait_for("the stale path", |e| e["pid"] == unix_pid);
    assert_eq!(event["unix_path"], stale.display().to_string(), "{event}");
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "stale_socket_file", "{d}");
    assert_eq!(d["facts"]["unix_file"]["kind"], "socket", "{d}");
    let looked_at = d["facts"]["unix_file"]["looked_at"].as_str().unwrap_or_default();
    assert!(!looked_at.starts_with(&format!("/proc/{unix_pid}/")), "looked at through a live process: {d}");

    let event = tracer.wait_for("the privileged port", |e| e["pid"] == privileged_pid);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "privileged_port", "{d}");
    assert_eq!(d["facts"]["cap_net_bind_service"], false, "{d}");
    assert_eq!(d["facts"]["cap_eff"], "0000000000000000", "{d}");
    assert!(
        d["unknown"]
            .as_array()
            .is_none_or(|u| !u.iter().any(|u| u.as_str().is_some_and(|u| u.contains("capabilities")))),
        "{d}"
    );
    tracer.stop();
}
