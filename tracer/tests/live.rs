//! The real probe on this kernel, driven by real binds. Each test asks for its own ports and
//! matches events by port, since the tests of this file run in parallel in one process.

mod common;

use std::net::{Ipv6Addr, SocketAddr};

use common::*;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

fn socket(domain: Domain, ty: Type) -> Socket {
    let protocol = if ty == Type::STREAM { Protocol::TCP } else { Protocol::UDP };
    Socket::new(domain, ty, Some(protocol)).expect("socket")
}

fn addr(text: &str) -> SockAddr {
    SockAddr::from(text.parse::<SocketAddr>().expect("address"))
}

/// Under every backend this kernel offers, and under the tracepoint backend as kernels
/// without `bpf_task_pt_regs` (5.11-5.14) and without `bpf_get_current_task_btf` (5.10) run
/// it, with those helpers hidden from bindtrace; and as a kernel whose BTF lacks the
/// `pt_regs` members of the syscall's argument registers runs it (the same path as without
/// `bpf_task_pt_regs`: the arguments saved at entry).
#[test]
fn successes_tcp_udp_ipv4_ipv6_carry_every_field() {
    if !can_load_probe("successes_tcp_udp_ipv4_ipv6_carry_every_field") {
        return;
    }
    let argument_register = if cfg!(target_arch = "aarch64") { "pt_regs.orig_x0" } else { "pt_regs.di" };
    let mut runs: Vec<(&str, (&str, &str))> =
        offered_backends().into_iter().map(|backend| (backend, ("BINDTRACE_HIDE_HELPERS", ""))).collect();
    runs.push(("tracepoint", ("BINDTRACE_HIDE_HELPERS", "task_pt_regs")));
    runs.push(("tracepoint", ("BINDTRACE_HIDE_HELPERS", "task_pt_regs,get_current_task_btf")));
    runs.push(("tracepoint", ("BINDTRACE_HIDE_MEMBERS", argument_register)));
    for (backend, hidden) in runs {
        eprintln!("backend {backend}, hidden: {hidden:?}");
        let tracer =
            Tracer::start_with_env(&["-o", "ndjson", "-p", &my_pid().to_string(), "--attach", backend], &[hidden]);
        assert_eq!(tracer.backend, backend);
        successes_carry_every_field(tracer);
    }
}

/// `--check --verbose` makes two test binds under each hook that attaches and shows the
/// kernel's own counters of its programs: the return hooks ran for both.
#[test]
fn check_verbose_shows_each_program_running_for_the_test_binds() {
    if !can_load_probe("check_verbose_shows_each_program_running_for_the_test_binds") {
        return;
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bindtrace"))
        .args(["--check", "--verbose"])
        .output()
        .expect("bindtrace --check --verbose runs");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{said}");
    for backend in offered_backends() {
        let binds = said
            .lines()
            .find(|l| l.starts_with(&format!("hook {backend} test binds (127.0.0.1:")))
            .unwrap_or_else(|| panic!("no test-binds line for {backend}: {said}"));
        let number_after = |word: &str| -> u64 {
            let rest = &binds[binds.find(word).unwrap_or_else(|| panic!("{word:?} in {binds}")) + word.len()..];
            rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{binds}"))
        };
        assert!(number_after("saw ") >= 2 && number_after("emitted ") >= 2, "{binds}");
        assert!(
            !said.contains(&format!("hook {backend} run statistics: not counted")),
            "BPF_ENABLE_STATS works on every kernel bindtrace tests on: {said}"
        );
        let return_runs: u64 = said
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("hook {backend} program ")))
            .filter(|l| l.contains("exit") || l.contains("kretprobe"))
            .filter(|l| !l.contains("backstop"))
            .filter_map(|l| l.split_once(": ")?.1.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        assert!(return_runs >= 2, "the return hooks ran for both test binds: {said}");
    }
}

/// A kernel whose BTF lacks a member of the walk from a bind(2)'s fd to its socket: only the
/// hooks that take that walk are off, and `--check` says which member.
#[test]
fn a_missing_struct_member_disables_only_the_hooks_that_read_it() {
    if !can_load_probe("a_missing_struct_member_disables_only_the_hooks_that_read_it") {
        return;
    }
    let hidden = [("BINDTRACE_HIDE_MEMBERS", "fdtable.fd")];
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bindtrace"))
        .arg("--check")
        .envs(hidden)
        .output()
        .expect("bindtrace --check runs");
    let said = String::from_utf8_lossy(&output.stdout);
    let line = |prefix: &str| {
        said.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} line: {said}")).to_owned()
    };
    assert!(line("BTF ").contains("struct fdtable has no member fd"), "{said}");
    let tracepoint = line("hook tracepoint:");
    assert!(
        tracepoint.starts_with("hook tracepoint: no:") && tracepoint.contains("fdtable has no member fd"),
        "{said}"
    );
    for backend in offered_backends().into_iter().filter(|b| *b != "tracepoint") {
        assert_eq!(line(&format!("hook {backend}:")), format!("hook {backend}: yes"), "{said}");
        assert!(line(&format!("hook {backend} sees:")).contains("inet binds only"), "{said}");
    }

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bindtrace"))
        .args(["--attach", "tracepoint", "-o", "none"])
        .envs(hidden)
        .output()
        .expect("bindtrace runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("fdtable has no member fd") && stderr.lines().count() == 1, "one line: {stderr}");
}

fn successes_carry_every_field(mut tracer: Tracer) {
    let cases = [
        (Domain::IPV4, Type::STREAM, "127.0.0.1", "tcp", "AF_INET"),
        (Domain::IPV4, Type::DGRAM, "127.0.0.1", "udp", "AF_INET"),
        (Domain::IPV6, Type::STREAM, "::1", "tcp", "AF_INET6"),
        (Domain::IPV6, Type::DGRAM, "::1", "udp", "AF_INET6"),
    ];
    let mut sockets = Vec::new();
    for (domain, ty, ip, proto, family) in cases {
        let port = free_port();
        let sock = socket(domain, ty);
        let text = if domain == Domain::IPV6 { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") };
        sock.bind(&addr(&text)).expect("bind succeeds");
        // This thread's bind: another test may have drawn the same ephemeral port number.
        let event = tracer.wait_for(&text, |e| e["port"] == port && e["proto"] == proto && e["tid"] == my_tid());
        assert_eq!(event["ok"], true, "{event}");
        assert_eq!(event["ret"], 0);
        assert_eq!(event["errno"], 0);
        assert_eq!(event["addr"], ip);
        assert_eq!(event["family"], family);
        assert_eq!(event["pid"], my_pid());
        assert_eq!(event["tid"], my_tid());
        assert_eq!(event["comm"], my_comm());
        assert_eq!(event["uid"], 0);
        assert_eq!(event["fd"], tracer.event_fd(raw_fd(&sock)));
        assert_eq!(event["reuseaddr"], false);
        assert_eq!(event["backend"], tracer.backend);
        assert!(event["duration_ns"].as_u64().is_some_and(|d| d > 0), "{event}");
        assert!(event["netns"].as_u64().is_some_and(|n| n > 0), "{event}");
        let own_netns = std::fs::read_link("/proc/self/ns/net").expect("netns link");
        assert_eq!(own_netns.to_string_lossy(), format!("net:[{}]", event["netns"]));
        sockets.push(sock);
    }
    let finished = tracer.stop();
    assert!(finished.status.success(), "exit status {:?}: {}", finished.status, finished.stderr);
}

#[test]
fn eaddrinuse_keeps_the_requested_port_pid_and_comm() {
    if !can_load_probe("eaddrinuse_keeps_the_requested_port_pid_and_comm") {
        return;
    }
    let port = free_port();
    let pid = my_pid().to_string();
    let mut tracer = Tracer::start(&["-o", "ndjson", "--errno", "EADDRINUSE", "-p", &pid, "-P", &port.to_string()]);
    let holder = socket(Domain::IPV4, Type::STREAM);
    holder.set_reuse_address(true).expect("SO_REUSEADDR");
    holder.bind(&addr(&format!("127.0.0.1:{port}"))).expect("first bind");
    holder.listen(16).expect("listen");
    let second = socket(Domain::IPV4, Type::STREAM);
    let err = second.bind(&addr(&format!("127.0.0.1:{port}"))).expect_err("port is taken");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));

    let event = tracer.wait_for("EADDRINUSE", |e| e["port"] == port);
    assert_eq!(event["ok"], false);
    assert_eq!(event["errno"], 98);
    assert_eq!(event["errno_name"], "EADDRINUSE");
    assert_eq!(event["message"], "Address already in use");
    assert_eq!(event["addr"], "127.0.0.1");
    assert_eq!(event["port"], port, "the requested port, not 0");
    assert_eq!(event["pid"], my_pid());
    assert_eq!(event["comm"], my_comm());
    assert_eq!(event["fd"], tracer.event_fd(raw_fd(&second)));
    assert_eq!(event["reuseaddr"], false, "the failing socket did not set SO_REUSEADDR");

    let finished = tracer.stop();
    assert!(finished.status.success(), "{:?}", finished.status);
    let binds = finished.binds();
    assert!(binds.iter().all(|e| e["errno"] == 98), "the successful first bind was filtered out: {binds:#?}");
    let summary = finished.summary();
    assert!(summary["kernel"]["filtered"].as_u64().is_some_and(|n| n >= 1), "{summary}");
}

#[test]
fn reuse_flags_come_from_the_kernel_socket() {
    if !can_load_probe("reuse_flags_come_from_the_kernel_socket") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let sock = socket(Domain::IPV6, Type::DGRAM);
    sock.set_reuse_address(true).expect("SO_REUSEADDR");
    sock.set_reuse_port(true).expect("SO_REUSEPORT");
    sock.set_only_v6(true).expect("IPV6_V6ONLY");
    sock.bind(&SockAddr::from(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))).expect("bind");
    let event = tracer.wait_for("flags", |e| e["port"] == port);
    assert_eq!(event["reuseaddr"], true, "{event}");
    assert_eq!(event["reuseport"], true);
    assert_eq!(event["v6only"], true);
    assert_eq!(event["freebind"], false);
    assert_eq!(event["proto"], "udp");

    tracer.stop();
}

#[test]
fn inet_flags_and_the_port_the_kernel_chose() {
    if !can_load_probe("inet_flags_and_the_port_the_kernel_chose") {
        return;
    }
    let pid = my_pid().to_string();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-p", &pid, "-P", "1-65535"]);
    // The inet_sock flags: bits of inet_flags since 6.6, bitfields before; BTF says which.
    let flagged = socket(Domain::IPV4, Type::STREAM);
    for option in [libc::IP_FREEBIND, libc::IP_TRANSPARENT, libc::IP_BIND_ADDRESS_NO_PORT] {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads an int that is alive for the call.
        let rc = unsafe {
            libc::setsockopt(
                raw_fd(&flagged) as i32,
                libc::IPPROTO_IP,
                option,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(rc, 0, "setsockopt {option}");
    }
    let port = free_port();
    // IP_FREEBIND lets a socket bind an address no interface has (TEST-NET-1 here).
    flagged.bind(&addr(&format!("192.0.2.1:{port}"))).expect("freebind bind");
    let event = tracer.wait_for("inet flags", |e| e["port"] == port);
    assert_eq!(event["freebind"], true, "{event}");
    assert_eq!(event["transparent"], true);
    assert_eq!(event["bind_address_no_port"], true);
    assert_eq!(event["reuseaddr"], false);
    assert_eq!(event["bound_addr"], "192.0.2.1");
    assert_eq!(event["bound_port"], port);

    // Port 0: the event keeps the requested 0 and reports the port the kernel picked.
    let ephemeral = socket(Domain::IPV4, Type::DGRAM);
    ephemeral.bind(&addr("127.0.0.1:0")).expect("bind port 0");
    let picked = ephemeral.local_addr().expect("local").as_socket().expect("inet").port();
    let mut tracer_all = Tracer::start(&["-o", "ndjson", "-p", &pid]);
    let again = socket(Domain::IPV4, Type::DGRAM);
    again.bind(&addr("127.0.0.3:0")).expect("bind port 0");
    let picked_again = again.local_addr().expect("local").as_socket().expect("inet").port();
    let event = tracer_all.wait_for("port 0", |e| e["addr"] == "127.0.0.3" && e["port"] == 0);
    assert_eq!(event["bound_port"], picked_again, "{event}");
    assert_eq!(event["freebind"], false);
    assert_ne!(picked, 0);
    tracer_all.stop();
    tracer.stop();
}

#[test]
fn eacces_for_port_80_from_uid_65534() {
    if !can_load_probe("eacces_for_port_80_from_uid_65534") {
        return;
    }
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", "80", "--errno", "EACCES"]);
    let (child, errno) = bind_in_child("127.0.0.1:80".parse().expect("addr"), Some(65534));
    assert_eq!(errno, libc::EACCES, "unprivileged bind of port 80 fails with EACCES");
    let event = tracer.wait_for("EACCES", |e| e["pid"] == child);
    assert_eq!(event["errno"], 13);
    assert_eq!(event["errno_name"], "EACCES");
    assert_eq!(event["uid"], 65534);
    assert_eq!(event["gid"], 65534);
    assert_eq!(event["port"], 80);
    assert_eq!(event["addr"], "127.0.0.1");
    tracer.stop();
}

#[test]
fn einval_for_a_second_bind_on_a_bound_socket() {
    if !can_load_probe("einval_for_a_second_bind_on_a_bound_socket") {
        return;
    }
    let (first, second) = (free_port(), free_port());
    let ports = format!("{first},{second}");
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &ports]);
    let sock = socket(Domain::IPV4, Type::STREAM);
    sock.bind(&addr(&format!("127.0.0.1:{first}"))).expect("first bind");
    let err = sock.bind(&addr(&format!("127.0.0.1:{second}"))).expect_err("already bound");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    let event = tracer.wait_for("EINVAL", |e| e["port"] == second);
    assert_eq!(event["errno_name"], "EINVAL");
    assert_eq!(event["fd"], tracer.event_fd(raw_fd(&sock)));
    assert_eq!(event["bound_port"], first, "what the socket was already bound to: {event}");
    assert_eq!(event["bound_addr"], "127.0.0.1");
    let ok = tracer.wait_for("first bind", |e| e["port"] == first);
    assert_eq!(ok["ok"], true);
    tracer.stop();
}

#[test]
fn port_and_pid_filters_drop_events_in_the_kernel() {
    if !can_load_probe("port_and_pid_filters_drop_events_in_the_kernel") {
        return;
    }
    let (wanted, other_port, child_port) = (free_port(), free_port(), free_port());
    let pid = my_pid().to_string();
    let ports = format!("{wanted},{child_port}");
    let mut tracer = Tracer::start(&["-o", "ndjson", "-p", &pid, "-P", &ports]);
    let outside_ports = socket(Domain::IPV4, Type::DGRAM);
    outside_ports.bind(&addr(&format!("127.0.0.1:{other_port}"))).expect("bind");
    let (child, errno) = bind_in_child(format!("127.0.0.1:{child_port}").parse().expect("addr"), None);
    assert_eq!(errno, 0);
    let kept = socket(Domain::IPV4, Type::DGRAM);
    kept.bind(&addr(&format!("127.0.0.1:{wanted}"))).expect("bind");
    tracer.wait_for("wanted port", |e| e["port"] == wanted);
    let finished = tracer.stop();
    let binds = finished.binds();
    assert!(binds.iter().all(|e| e["port"] != other_port), "port filter: {binds:#?}");
    assert!(binds.iter().all(|e| e["pid"] != child), "pid filter: {binds:#?}");
    assert!(binds.iter().all(|e| e["pid"] == my_pid()), "{binds:#?}");
    let kernel = &finished.summary()["kernel"];
    let count = |name: &str| kernel[name].as_u64().unwrap_or_else(|| panic!("kernel.{name} in {kernel}"));
    assert!(count("filtered") >= 2, "both foreign binds were rejected in the kernel: {kernel}");
    assert_eq!(count("emitted"), binds.len() as u64, "every emitted event was printed: {kernel}");
    assert_eq!(finished.summary()["filter_mismatches"], 0, "the kernel and user space filter alike");
    assert_eq!(
        count("seen"),
        count("filtered")
            + count("emitted")
            + count("dropped_ring_buffer_full")
            + count("dropped_entry_lost")
            + count("in_progress_at_attach"),
        "every bind the probe saw is accounted for: {kernel}"
    );
    assert_eq!(count("dropped_recursion"), 0, "no return hook was skipped: {kernel}");
    assert_eq!(count("returns_backstopped"), 0, "only the kprobe backend has backstops: {kernel}");
    let programs = finished.summary()["programs"].as_array().cloned().unwrap_or_default();
    assert!(
        programs.iter().any(|p| p["name"] == "bindtrace_sys_exit_bind" && p["recursion_misses"] == 0),
        "the summary names the attached programs with the kernel's counters: {programs:?}"
    );
}

#[test]
fn ndjson_lines_are_valid_and_sigint_ends_with_a_summary() {
    if !can_load_probe("ndjson_lines_are_valid_and_sigint_ends_with_a_summary") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-P", &port.to_string()]); // stdout is a pipe: NDJSON by default
    let holder = socket(Domain::IPV4, Type::STREAM);
    holder.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
    holder.listen(1).expect("listen");
    for _ in 0..3 {
        let _ = socket(Domain::IPV4, Type::STREAM).bind(&addr(&format!("127.0.0.1:{port}")));
    }
    tracer.wait_for("third failure", |e| e["errno"] == 98 && e["port"] == port);
    let backend = tracer.backend.clone();
    let finished = tracer.stop();
    assert!(finished.status.success(), "SIGINT ends with status 0: {:?}", finished.status);
    assert!(!finished.stderr.contains("panicked"), "{}", finished.stderr);
    let json = finished.json(); // panics on any invalid line
    for line in &json {
        assert!(matches!(line["type"].as_str(), Some("bind" | "summary")), "{line}");
    }
    let binds = finished.binds();
    assert_eq!(binds.len(), 4, "one success and three failures: {binds:#?}");
    for bind in &binds {
        let time = bind["time"].as_str().expect("time");
        assert!(time.ends_with('Z') && time.len() == 30, "RFC 3339 with nanoseconds: {time}");
    }
    let summary = finished.summary();
    assert_eq!(summary["events"], 4);
    assert_eq!(summary["dropped"], 0);
    assert_eq!(summary["backend"], backend);
    let by_result: Vec<(String, u64)> = summary["by_result"]
        .as_array()
        .expect("by_result")
        .iter()
        .map(|r| (r["result"].as_str().unwrap_or("").to_owned(), r["count"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(by_result, vec![("EADDRINUSE".to_owned(), 3), ("ok".to_owned(), 1)]);
    assert_eq!(summary["by_port"][0]["port"], port);
    assert_eq!(summary["top_processes"][0]["pid"], my_pid());
}

#[test]
fn count_and_duration_end_the_run_by_themselves() {
    if !can_load_probe("count_and_duration_end_the_run_by_themselves") {
        return;
    }
    let port = free_port();
    let tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string(), "-n", "2"]);
    let sockets: Vec<Socket> = (0..3)
        .map(|_| {
            let s = socket(Domain::IPV4, Type::DGRAM);
            let _ = s.bind(&addr(&format!("127.0.0.1:{port}")));
            s
        })
        .collect();
    let finished = tracer.wait();
    assert!(finished.status.success(), "{:?}", finished.status);
    assert_eq!(finished.binds().len(), 2, "--count 2 stops after two events");
    assert_eq!(finished.summary()["events"], 2);
    drop(sockets);

    let tracer = Tracer::start(&["-o", "ndjson", "-P", &free_port().to_string(), "-d", "300ms"]);
    let finished = tracer.wait();
    assert!(finished.status.success(), "{:?}", finished.status);
    assert_eq!(finished.summary()["events"], 0);
    assert!(finished.summary()["duration_s"].as_f64().is_some_and(|d| d >= 0.3));
}

#[test]
fn table_output_aligns_colours_failures_and_escapes_names() {
    if !can_load_probe("table_output_aligns_colours_failures_and_escapes_names") {
        return;
    }
    let port = free_port();
    let tracer = Tracer::start(&["-o", "table", "--color", "always", "-P", &port.to_string()]);
    // A thread whose name would clear the operator's screen if printed raw.
    std::thread::spawn(move || {
        let name = c"evil\x1b[2J";
        // SAFETY: PR_SET_NAME reads a NUL-terminated string that is alive for the call.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
        let holder = socket(Domain::IPV4, Type::STREAM);
        holder.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
        holder.listen(1).expect("listen");
        let _ = socket(Domain::IPV4, Type::STREAM).bind(&addr(&format!("127.0.0.1:{port}")));
    })
    .join()
    .expect("binding thread");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let finished = tracer.stop();
    assert!(finished.status.success());
    let header = finished.lines.first().expect("header");
    assert!(header.starts_with("TIME") && header.ends_with("RESULT"), "{header}");
    // Event rows, not the diagnosis lines under them (`└ ...`), which name the port too.
    let rows: Vec<&String> =
        finished.lines.iter().filter(|l| l.contains(&format!(":{port}")) && !l.trim_start().starts_with('└')).collect();
    assert_eq!(rows.len(), 2, "{:#?}", finished.lines);
    assert!(rows.iter().all(|r| r.contains("evil\\u{1b}[2J")), "name escaped: {rows:?}");
    assert!(rows[0].ends_with(" ok"), "{}", rows[0]);
    assert!(!rows[0].contains('\x1b'), "success rows carry no escape codes: {:?}", rows[0]);
    assert!(rows[1].contains("\x1b[31mEADDRINUSE (Address already in use)"), "failure in red: {:?}", rows[1]);
    let result_col = header.find("RESULT").expect("RESULT");
    assert_eq!(&rows[0][result_col..], "ok", "rows align under the header");
    assert!(finished.stderr.contains("2 bind events"), "summary on stderr: {}", finished.stderr);
}

#[test]
fn closed_pipe_ends_quietly() {
    if !can_load_probe("closed_pipe_ends_quietly") {
        return;
    }
    let port = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let holder = socket(Domain::IPV4, Type::STREAM);
    holder.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
    holder.listen(1).expect("listen");
    tracer.wait_for("first event", |e| e["port"] == port);
    // Like `| head -n 1`: the reader goes away, the tracer must notice on its next write.
    tracer.close_stdout();
    // Keep binding: the first write after the reader left may still land in the pipe, the
    // next one fails with EPIPE.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = tracer.child.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "bindtrace kept running after its reader left");
        let _ = socket(Domain::IPV4, Type::STREAM).bind(&addr(&format!("127.0.0.1:{port}")));
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let messages: Vec<String> = tracer.stderr.iter().collect();
    assert!(status.success(), "{status:?} {messages:?}");
    assert!(!messages.iter().any(|m| m.contains("panicked") || m.contains("Broken pipe")), "{messages:?}");
}

fn assert_one_line_usage_error(args: &[&str], expected: &str) {
    let (status, stdout, stderr) = run_to_end(args);
    assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stdout.is_empty(), "{args:?}: nothing on stdout, got {stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line, got {stderr:?}");
    assert!(lines[0].starts_with("bindtrace: "), "{:?}", lines[0]);
    assert!(lines[0].contains(expected), "{args:?}: {:?} should mention {expected:?}", lines[0]);
    assert!(!stderr.contains("attached"), "nothing attaches on bad input");
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    assert_one_line_usage_error(&["--errno", "EBOGUS"], "unknown errno name 'EBOGUS'");
    assert_one_line_usage_error(&["-P", "0"], "outside 1-65535");
    assert_one_line_usage_error(&["-P", "70000"], "outside 1-65535");
    assert_one_line_usage_error(&["-P", "9000-8000"], "inverted port range");
    assert_one_line_usage_error(&["-o", "xml"], "xml");
    assert_one_line_usage_error(
        &["--file", "/nonexistent-dir/trace.ndjson"],
        "cannot write --file /nonexistent-dir/trace.ndjson",
    );
    // A kernel interface opens for writing (as root) and fails every write: refused before
    // anything attaches (it used to trace, then fail at exit with status 1).
    assert_one_line_usage_error(&["--file", "/proc/version"], "a file of proc");
    assert_one_line_usage_error(&["--bogus-flag"], "--bogus-flag");
    // A namespace file of another kind is bad input, not "port free" (it exited 1).
    assert_one_line_usage_error(&["who", "8080", "--netns", "/proc/self/ns/mnt"], "is not a network namespace");
    // PID 1 exists: whatever keeps bindtrace out of its namespace, it is not "no such process".
    let (status, _, stderr) = run_to_end(&["who", "8080", "--netns", "1", "-o", "none"]);
    if status.code() == Some(2) {
        assert!(!stderr.contains("no such process") && stderr.contains("--netns 1"), "{stderr}");
    }
    // The whole first paragraph of clap's message: what is missing, and the valid values.
    assert_one_line_usage_error(&["who"], "<PORT[/tcp|/udp]>");
    assert_one_line_usage_error(&["-o", "xml"], "possible values: table, ndjson");
}

/// A `--pid` that names no process used to match nothing, silently (issue 11).
#[test]
fn a_pid_that_does_not_exist_is_warned_about() {
    if !can_load_probe("a_pid_that_does_not_exist_is_warned_about") {
        return;
    }
    // Just below pid_max: a process id no process has now (the last ids are handed out last).
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").expect("pid_max").trim().parse().expect("n");
    let unused =
        (1..pid_max).rev().find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()).expect("a free id");
    let (status, _, stderr) = run_to_end(&["-p", &unused.to_string(), "-d", "1s", "-o", "ndjson"]);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains(&format!("--pid {unused}: no such process now")), "{stderr}");
    // At or above pid_max no process can ever have it: bad input (it used to be a warning).
    assert_one_line_usage_error(&["-p", &pid_max.to_string()], "kernel.pid_max");
    let (_, _, stderr) = run_to_end(&["-p", &my_pid().to_string(), "-d", "1s", "-o", "ndjson"]);
    assert!(!stderr.contains("warning"), "a live process id is not warned about: {stderr}");
}

#[test]
fn without_privileges_it_says_to_use_sudo() {
    let mut command = std::process::Command::new(BINDTRACE);
    command.args(["-d", "1s"]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt as _;
        command.uid(65534).gid(65534);
    }
    let output = command.output().expect("run bindtrace");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("run it with sudo"), "{stderr}");
}

#[test]
fn help_shows_examples() {
    let (status, stdout, _) = run_to_end(&["--help"]);
    assert!(status.success());
    assert!(stdout.contains("Examples:") && stdout.contains("--errno EADDRINUSE"), "{stdout}");
}

#[test]
fn a_full_ring_buffer_is_counted_and_reported_never_silent() {
    if !can_load_probe("a_full_ring_buffer_is_counted_and_reported_never_silent") {
        return;
    }
    let port = free_port();
    // 4 KiB holds 32 records of 128 bytes.
    let tracer = Tracer::start(&["-o", "ndjson", "--ring-buffer-size", "4K", "-P", &port.to_string()]);
    // Freeze the reader so the ring buffer fills up.
    // SAFETY: kill has no memory preconditions; the pid is a process this code started.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGSTOP) };
    let holder = socket(Domain::IPV4, Type::STREAM);
    holder.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
    holder.listen(1).expect("listen");
    const FAILURES: u64 = 200;
    for _ in 0..FAILURES {
        let _ = socket(Domain::IPV4, Type::STREAM).bind(&addr(&format!("127.0.0.1:{port}")));
    }
    // SAFETY: kill has no memory preconditions; the pid is a process this code started.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGCONT) };
    // Past the next once-a-second drop check.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let finished = tracer.stop();
    let printed = finished.binds().len() as u64;
    let summary = finished.summary();
    let dropped = summary["dropped"].as_u64().expect("dropped");
    assert!(dropped > 0, "a 4K ring buffer cannot hold 201 events: {summary}");
    assert!(printed > 0);
    assert_eq!(printed + dropped, FAILURES + 1, "every bind was printed or counted as dropped: {summary}");
    assert_eq!(summary["kernel"]["dropped_ring_buffer_full"], dropped);
    assert!(
        finished.stderr.contains(&format!("lost {dropped} events")),
        "drops are reported live on stderr: {:?} (summary {summary})",
        finished.stderr
    );
}

#[test]
fn comm_family_and_proto_filters() {
    if !can_load_probe("comm_family_and_proto_filters") {
        return;
    }
    let (named, unnamed) = (free_port(), free_port());
    let ports = format!("{named},{unnamed}");
    let mut by_comm = Tracer::start(&["-o", "ndjson", "--comm", "bt-comm-filter", "-P", &ports]);
    let mut by_family = Tracer::start(&["-o", "ndjson", "--family", "6", "-P", &ports]);
    let mut by_proto = Tracer::start(&["-o", "ndjson", "--proto", "udp", "-P", &ports]);
    std::thread::Builder::new()
        .name("bt-comm-filter".into())
        .spawn(move || {
            let sock = socket(Domain::IPV6, Type::DGRAM);
            sock.bind(&SockAddr::from(SocketAddr::from((Ipv6Addr::LOCALHOST, named)))).expect("bind");
        })
        .expect("spawn")
        .join()
        .expect("join");
    let sock = socket(Domain::IPV4, Type::STREAM);
    sock.bind(&addr(&format!("127.0.0.1:{unnamed}"))).expect("bind");

    for tracer in [&mut by_comm, &mut by_family, &mut by_proto] {
        tracer.wait_for("the IPv6 UDP bind of the named thread", |e| e["port"] == named);
    }
    // Wait until the unnamed thread's bind must have gone through the probe.
    let mut control = Tracer::start(&["-o", "ndjson", "-P", &ports]);
    let again = socket(Domain::IPV4, Type::STREAM);
    let _ = again.bind(&addr(&format!("127.0.0.1:{unnamed}")));
    control.wait_for("control", |e| e["port"] == unnamed);
    control.stop();
    for (name, tracer) in [("--comm", by_comm), ("--family 6", by_family), ("--proto udp", by_proto)] {
        let finished = tracer.stop();
        let binds = finished.binds();
        assert_eq!(binds.len(), 1, "{name} keeps only the IPv6 UDP bind of bt-comm-filter: {binds:#?}");
        assert_eq!(binds[0]["comm"], "bt-comm-filter");
        assert!(finished.summary()["kernel"]["filtered"].as_u64().is_some_and(|n| n >= 2), "{name}");
    }
}

/// SIGTERM, and SIGHUP (the terminal closed; it used to kill bindtrace with no summary and
/// lose queued events, issue 11), end cleanly with every event and the summary written.
#[test]
fn sigterm_and_sighup_end_cleanly_with_a_summary() {
    if !can_load_probe("sigterm_and_sighup_end_cleanly_with_a_summary") {
        return;
    }
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        let port = free_port();
        let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
        let holder = socket(Domain::IPV4, Type::STREAM);
        holder.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind");
        holder.listen(1).expect("listen");
        let _ = socket(Domain::IPV4, Type::STREAM).bind(&addr(&format!("127.0.0.1:{port}"))).expect_err("in use");
        tracer.wait_for("the failure", |e| e["errno"] == 98);
        // SAFETY: kill has no memory preconditions; the pid is a process this code started.
        unsafe { libc::kill(tracer.pid() as i32, signal) };
        let finished = tracer.wait();
        assert!(finished.status.success(), "signal {signal}: {:?}", finished.status);
        assert_eq!(finished.summary()["events"], 2, "signal {signal}");
        assert_eq!(finished.binds().len(), 2, "signal {signal}");
    }
}

/// A refused start (here: no privilege) must leave an existing `--file` untouched; it used to
/// be emptied before the privilege check (issue 11).
#[test]
fn a_refused_start_leaves_the_output_file_untouched() {
    let path = std::env::temp_dir().join(format!("bindtrace-keep-{}.ndjson", my_pid()));
    std::fs::write(&path, "earlier trace\n").expect("write");
    // Writable by anyone, so that only the missing privilege stops the unprivileged run.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).expect("chmod");
    let mut command = std::process::Command::new(BINDTRACE);
    command.args(["-d", "1s", "--file"]).arg(&path);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt as _;
        command.uid(65534).gid(65534);
    }
    let output = command.output().expect("run bindtrace");
    assert_eq!(output.status.code(), Some(2), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "earlier trace\n");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn auto_picks_a_backend_this_kernel_accepts_and_check_agrees() {
    if !can_load_probe("auto_picks_a_backend_this_kernel_accepts_and_check_agrees") {
        return;
    }
    let (status, stdout, stderr) = run_to_end(&["--check"]);
    assert!(status.success(), "--check exits 0 when a hook works: {stdout} {stderr}");
    let works = |name: &str| stdout.lines().any(|l| l == format!("hook {name}: yes"));
    for line in ["privileges (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN): yes", "ring buffer: yes"] {
        assert!(stdout.lines().any(|l| l == line), "{line} in {stdout}");
    }
    assert!(stdout.contains("BTF (/sys/kernel/btf/vmlinux): yes"), "{stdout}");
    // auto takes the first of fexit, kprobe, tracepoint that --check found working.
    let expected = ["fexit", "kprobe", "tracepoint"].into_iter().find(|b| works(b)).expect("some hook works");
    let tracer = Tracer::start(&["-o", "ndjson", "-P", &free_port().to_string(), "-d", "200ms"]);
    let finished = tracer.wait();
    assert_eq!(finished.summary()["backend"], expected, "{}", finished.stderr);

    // A hook this kernel refuses, forced: one line naming it and --check, exit 1.
    if let Some(refused) = ["fexit", "kprobe", "tracepoint"].into_iter().find(|b| !works(b)) {
        let (status, _, stderr) = run_to_end(&["--attach", refused, "-d", "1s"]);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(&format!("bindtrace: --attach {refused}")), "{stderr}");
        assert!(stderr.contains("bindtrace --check"), "{stderr}");
    } else {
        eprintln!("every hook works on this kernel: the refusal path is covered by the VM matrix only");
    }
}

/// The verifier sees the filter configuration (it is read-only data) and prunes the code of
/// inactive filters, so every combination is a different program: one once failed to load
/// ("R3 !read_ok") while the others passed. Each filter alone, each left out of all of them,
/// and all together must load, and with all of them a bind that passes them all is printed.
#[test]
fn every_in_kernel_filter_combination_loads_and_passes_a_matching_bind() {
    if !can_load_probe("every_in_kernel_filter_combination_loads_and_passes_a_matching_bind") {
        return;
    }
    let port = free_port();
    let (pid, comm, port_arg) = (my_pid().to_string(), my_comm(), port.to_string());
    let filters: [[&str; 2]; 6] = [
        ["--pid", &pid],
        ["-P", &port_arg],
        ["--comm", &comm],
        ["--family", "4"],
        ["--proto", "tcp"],
        ["--errno", "EADDRINUSE"],
    ];
    let mut combinations: Vec<Vec<usize>> = (0..filters.len()).map(|i| vec![i]).collect();
    combinations.extend((0..filters.len()).map(|left_out| (0..filters.len()).filter(|&i| i != left_out).collect()));
    for combination in &combinations {
        let mut args = vec!["-o", "ndjson"];
        args.extend(combination.iter().flat_map(|&i| filters[i]));
        // Tracer::start fails the test with bindtrace's stderr if the probe does not load.
        Tracer::start(&args).stop();
    }
    let mut args = vec!["-o", "ndjson"];
    args.extend(filters.iter().flatten());
    let mut tracer = Tracer::start(&args);
    let holder = socket(Domain::IPV4, Type::STREAM);
    holder.bind(&addr(&format!("127.0.0.1:{port}"))).expect("bind the holder");
    holder.listen(1).expect("listen");
    let clash = socket(Domain::IPV4, Type::STREAM);
    assert!(clash.bind(&addr(&format!("127.0.0.1:{port}"))).is_err(), "second bind must fail");
    let event = tracer.wait_for("the EADDRINUSE bind that passes every filter", |e| e["port"] == port);
    assert_eq!(event["errno_name"], "EADDRINUSE");
    assert_eq!(event["comm"], comm.as_str());
    let finished = tracer.stop();
    assert_eq!(finished.binds().len(), 1, "the holder's successful bind is filtered: {:#?}", finished.binds());
}
