//! The hosts where deploys really fail (issue 19): a port with thousands of connections, a
//! host with half a million open fds, an output that blocks or goes away, a closed stderr.
//! Real processes and sockets; the fds are spread over several processes (the hard limit
//! here is 20,000 per process).

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{can_load_probe, free_port, run_to_end, Tracer, BINDTRACE};
use serde_json::Value;

/// These tests run one at a time: each tracer sees every bind on the host, and one test's
/// storm of failures would crowd another's diagnoses.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The longest NDJSON line bindtrace may write (docs/ndjson-schema.md).
const LINE_MAX: usize = 16 * 1024;

/// A Python helper run as its own process; it prints "ready" once its fds are open and keeps
/// them until killed.
fn python(script: &str, args: &[String]) -> Child {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs (Debian's python3)");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ready", "helper did not start");
    child
}

/// Raises the soft fd limit to the hard one (20,000 here) for each helper.
const RAISE_LIMIT: &str = "import resource\nsoft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\nresource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n";

/// Listens on 127.0.0.1:PORT and keeps COUNT accepted connections.
fn server(port: u16, count: usize) -> Child {
    let script = format!(
        "{RAISE_LIMIT}import socket, sys, time\n\
         port, count = int(sys.argv[1]), int(sys.argv[2])\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', port)); s.listen(4096)\n\
         print('ready', flush=True)\n\
         kept = []\n\
         while len(kept) < count:\n    kept.append(s.accept()[0])\n\
         time.sleep(3600)\n"
    );
    python(&script, &[port.to_string(), count.to_string()])
}

/// Opens COUNT connections to 127.0.0.1:PORT and keeps them.
fn clients(port: u16, count: usize) -> Child {
    let script = format!(
        "{RAISE_LIMIT}import socket, sys, time\n\
         port, count = int(sys.argv[1]), int(sys.argv[2])\n\
         kept = [socket.create_connection(('127.0.0.1', port)) for _ in range(count)]\n\
         print('ready', flush=True)\n\
         time.sleep(3600)\n"
    );
    python(&script, &[port.to_string(), count.to_string()])
}

/// Holds COUNT eventfds (no sockets at all), as a proxy or broker node's processes do.
fn eventfds(count: usize) -> Child {
    let script = format!(
        "{RAISE_LIMIT}import os, sys, time\n\
         kept = [os.eventfd(0) for _ in range(int(sys.argv[1]))]\n\
         print('ready', flush=True)\n\
         time.sleep(3600)\n"
    );
    python(&script, &[count.to_string()])
}

/// Listens on 127.0.0.1:PORT and keeps it.
fn listener(port: u16) -> Child {
    let script = "import socket, sys, time\n\
                  s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n\
                  print('ready', flush=True)\n\
                  time.sleep(3600)\n";
    python(script, &[port.to_string()])
}

struct Helpers(Vec<Child>);

impl Drop for Helpers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `bindtrace ARGS` with stdout a pipe this test holds (and may leave unread, or close), once
/// it says it is attached; its stderr, to read the rest from.
fn spawn_attached(args: &[&str]) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(BINDTRACE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("attached") {
        line.clear();
        assert!(stderr.read_line(&mut line).expect("stderr") > 0, "bindtrace ended before attaching");
    }
    (child, stderr)
}

fn failing_bind(port: u16) -> std::io::Error {
    TcpListener::bind(("127.0.0.1", port)).expect_err("the port is held")
}

#[test]
fn a_busy_port_names_its_holder_on_a_short_line() {
    if !can_load_probe("a_busy_port_names_its_holder_on_a_short_line") {
        return;
    }
    let _serial = serial();
    const CONNECTIONS: usize = 15_000;
    let port = free_port();
    let mut helpers = Helpers(vec![server(port, CONNECTIONS)]);
    helpers.0.push(clients(port, CONNECTIONS / 2));
    helpers.0.push(clients(port, CONNECTIONS / 2));
    let server_pid = helpers.0[0].id();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let _ = failing_bind(port);
    let event = tracer.wait_for("the failed bind on the busy port", |e| e["port"] == port && e["ok"] == false);
    let diagnosis = tracer.diagnosis_of(&event);
    let finished = tracer.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert_eq!(diagnosis["kind"], "in_use", "{diagnosis}");
    assert_eq!(diagnosis["holders"][0]["state"], "LISTEN", "{diagnosis}");
    assert_eq!(diagnosis["holders"][0]["processes"][0]["pid"], server_pid, "{diagnosis}");
    let summary = &diagnosis["holders_summary"];
    assert_eq!(summary["by_state"]["ESTABLISHED"], CONNECTIONS, "{summary}");
    assert_eq!(summary["total"], CONNECTIONS + 1, "{summary}");
    assert_eq!(summary["truncated"], true);
    assert!(diagnosis["holders"].as_array().is_some_and(|h| h.len() <= 18), "{diagnosis}");
    let longest = finished.lines.iter().map(String::len).max().unwrap_or(0);
    assert!(longest <= LINE_MAX, "an NDJSON line of {longest} bytes");

    // `who` the same: the listener named, the connections counted, lines under 16 KiB.
    let (status, stdout, stderr) = run_to_end(&["who", &format!("{port}/tcp"), "-o", "ndjson"]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let record: Value = serde_json::from_str(stdout.lines().next().expect("a record")).expect("json");
    assert!(stdout.lines().all(|l| l.len() <= LINE_MAX));
    assert_eq!(record["holders"][0]["state"], "LISTEN");
    assert_eq!(record["holders_summary"]["by_state"]["ESTABLISHED"], CONNECTIONS, "{record}");
    let (_, table, _) = run_to_end(&["who", &format!("{port}/tcp"), "-o", "table"]);
    assert!(table.lines().count() < 10, "the table counts connections, one line per state:\n{table}");
    assert!(table.contains(&format!("({CONNECTIONS} sockets; --all lists them)")), "{table}");
    let (_, every, _) = run_to_end(&["who", &format!("{port}/tcp"), "-o", "table", "--all"]);
    assert!(every.lines().count() > CONNECTIONS, "--all lists every socket");
    let started = Instant::now();
    let (_, every, _) = run_to_end(&["who", &format!("{port}/tcp"), "-o", "ndjson", "--all"]);
    let records: Vec<Value> = every.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert!(every.lines().all(|l| l.len() <= LINE_MAX));
    assert_eq!(records.iter().filter(|r| r["type"] == "who_socket").count(), CONNECTIONS + 1);
    assert_eq!(records[0]["type"], "who", "the record that counts them comes first");
    eprintln!("who --all -o ndjson on {CONNECTIONS} connections: {:?}", started.elapsed());
}

#[test]
fn a_host_with_half_a_million_fds_names_every_holder() {
    if !can_load_probe("a_host_with_half_a_million_fds_names_every_holder") {
        return;
    }
    let _serial = serial();
    // 30 processes of 17,000 eventfds.
    let mut helpers = Helpers((0..30).map(|_| eventfds(17_000)).collect());
    // One holder that bound before bindtrace started: found by searching the host.
    let early_port = free_port();
    helpers.0.push(listener(early_port));
    let early_pid = helpers.0.last().map(Child::id);
    // Every bind is traced: the successes are the history that names the holders.
    let mut tracer = Tracer::start(&["-o", "ndjson"]);
    // Holders that bind while bindtrace runs, each clashed with a second apart: the process
    // bindtrace saw bind the port is asked first.
    let mut expected = vec![(early_port, early_pid)];
    for _ in 0..4 {
        let port = free_port();
        helpers.0.push(listener(port));
        expected.push((port, helpers.0.last().map(Child::id)));
    }
    for (port, pid) in &expected {
        let started = Instant::now();
        let _ = failing_bind(*port);
        let event = tracer.wait_for("a clash", |e| e["port"] == *port && e["ok"] == false);
        let diagnosis = tracer.diagnosis_of(&event);
        let named = diagnosis["holders"][0]["processes"][0]["pid"].as_u64();
        assert_eq!(named.map(|p| p as u32), *pid, "port {port}: {diagnosis}");
        eprintln!("port {port}: holder named {:?} after the failure", started.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    let finished = tracer.stop();
    assert!(!finished.stderr.contains("paused"), "diagnoses were never switched off: {}", finished.stderr);
    assert_eq!(finished.summary()["diagnoses"]["lookup_timeouts"], 0, "{}", finished.stderr);
}

#[test]
fn a_reader_that_goes_away_ends_the_run_within_a_second() {
    if !can_load_probe("a_reader_that_goes_away_ends_the_run_within_a_second") {
        return;
    }
    let _serial = serial();
    let (mut child, _stderr) = spawn_attached(&["-o", "ndjson", "-P", "1"]);
    // The reader goes away; no event comes (port 1): the run must notice on its own.
    drop(child.stdout.take());
    let closed = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if closed.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("bindtrace still runs 10 s after the reader of its stdout went away");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(closed.elapsed() < Duration::from_secs(3), "ended {:?} after its reader", closed.elapsed());
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_blocked_stdout_holds_up_neither_signals_nor_metrics() {
    if !can_load_probe("a_blocked_stdout_holds_up_neither_signals_nor_metrics") {
        return;
    }
    let _serial = serial();
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    // stdout is a pipe nobody reads; stderr is read.
    let (mut child, stderr) = spawn_attached(&["-o", "ndjson", "--metrics", &metrics]);
    let stderr_lines = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());
    // Far more output than the pipe (64 KiB) and the queue (8 MiB) hold: failing binds.
    let port = free_port();
    let _holder = TcpListener::bind(("127.0.0.1", port)).expect("holder");
    for _ in 0..60_000 {
        let _ = TcpListener::bind(("127.0.0.1", port));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // /metrics still answers.
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(&metrics).expect("connect to /metrics");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.200}");
    assert!(started.elapsed() < Duration::from_secs(2), "/metrics took {:?}", started.elapsed());
    // A signal ends the run promptly, though stdout takes nothing.
    let signalled = Instant::now();
    // SAFETY: kill has no memory preconditions; the pid is a process this code started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(5), "SIGTERM ignored while stdout is blocked");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success() || status.code() == Some(0), "{status:?}");
    let stderr = stderr_lines.join().expect("stderr").join("\n");
    assert!(stderr.contains("lines dropped"), "what the output could not take is counted and said: {stderr}");
    drop(child.stdout.take());
}

#[test]
fn a_closed_stderr_is_not_a_crash() {
    if !can_load_probe("a_closed_stderr_is_not_a_crash") {
        return;
    }
    let _serial = serial();
    let output = Command::new("sh")
        .args(["-c", &format!("exec {BINDTRACE} -o ndjson -d 1s -P 1 2>&-")])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(0), "{:?}", output.status);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.lines().any(|l| l.contains("\"type\":\"summary\"")), "{stdout}");
}
