//! `--metrics`, scraped by a real Prometheus (Debian's), and the daemon's log rotation.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Debian's prometheus, scraping `target` every second, killed and removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    web: SocketAddr,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Option<Self> {
        if !Command::new("sh")
            .args(["-c", "command -v prometheus"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            let why = "prometheus is not installed (cargo xtask test installs Debian's prometheus)";
            if std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some() {
                panic!("{why}");
            }
            eprintln!("SKIPPED metrics: {why}");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("bindtrace-prometheus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: bindtrace\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("config");
        let web = free_addr();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Some(Self { child, dir, web })
    }

    /// The value of an instant query's single series, once there is one.
    fn query(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = http_get(self.web, &format!("/api/v1/query?query={encoded}"))?;
        let json: Value = serde_json::from_str(&body).ok()?;
        let result = json["data"]["result"].as_array()?;
        let [series] = result.as_slice() else { return None };
        series["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrapes_the_failure_counters() {
    if !can_load_probe("prometheus_scrapes_the_failure_counters") {
        return;
    }
    let metrics = free_addr();
    let port = free_port();
    let other = free_port();
    let tracer = Tracer::start(&[
        "-o",
        "none",
        "--metrics",
        &metrics.to_string(),
        "--metrics-port",
        &port.to_string(),
        "-P",
        &format!("{port},{other}"),
    ]);
    let Some(prometheus) = Prometheus::start(metrics) else { return };
    // A listener, then three binds that fail on its port and one that succeeds on another.
    let holder = std::net::TcpListener::bind(("127.0.0.1", port)).expect("holder");
    for _ in 0..3 {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        let err = socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into()).expect_err("in use");
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    }
    let _other = std::net::TcpListener::bind(("127.0.0.1", other)).expect("free port");
    // bindtrace's own endpoint first, then what Prometheus stored from it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let failures = format!(
        r#"bindtrace_binds_total{{op="bind",result="EADDRINUSE",proto="tcp",port="{port}",container="",pod="",namespace=""}} 3"#
    );
    loop {
        let text = http_get(metrics, "/metrics").unwrap_or_default();
        if text.contains(&failures) {
            assert!(text.contains(r#"bindtrace_backend_info{backend=""#), "{text}");
            // The kernel's own counters of the attached programs (runs count only with
            // kernel.bpf_stats_enabled=1; the series exist either way).
            assert!(
                text.contains(r#"bindtrace_probe_recursion_misses_total{program="bindtrace_sys_exit_bind"} 0"#),
                "{text}"
            );
            assert!(text.contains(r#"bindtrace_probe_run_seconds_total{program="#), "{text}");
            assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF: {text}");
            break;
        }
        assert!(Instant::now() < deadline, "no {failures} in:\n{text}");
        thread::sleep(Duration::from_millis(200));
    }
    let wanted = [
        (format!(r#"sum(bindtrace_binds_total{{result="EADDRINUSE",port="{port}"}})"#), 3.0),
        // The successes: the holder's bind on the labelled port, the other on port="other".
        (format!(r#"sum(bindtrace_binds_total{{result="ok",port="{port}"}})"#), 1.0),
        (r#"sum(bindtrace_binds_total{result="ok",port="other"})"#.to_owned(), 1.0),
        ("bindtrace_events_dropped_total".to_owned(), 0.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    for (query, value) in &wanted {
        loop {
            match prometheus.query(query) {
                Some(found) if found == *value => break,
                found => assert!(Instant::now() < deadline, "Prometheus: {query} is {found:?}, expected {value}"),
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
    drop(holder);
    let finished = tracer.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(finished.lines.is_empty(), "-o none writes no events: {:?}", finished.lines);
}

#[test]
fn metrics_on_a_taken_port_is_refused_before_attaching() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = taken.local_addr().expect("addr").to_string();
    let (status, stdout, stderr) = run_to_end(&["--metrics", &addr, "-d", "1s"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("--metrics"), "{stderr}");
    assert!(stdout.is_empty());
}

/// The NDJSON records of a `--file` so far.
fn file_records(path: &PathBuf) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Waits (10 s at most) until a `--file` has an event for `port`.
fn wait_for_port_in(path: &PathBuf, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file_records(path).iter().any(|v| v["port"] == port) {
        assert!(Instant::now() < deadline, "no event for port {port} in {}", path.display());
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_reopens_the_file_for_log_rotation() {
    if !can_load_probe("sighup_reopens_the_file_for_log_rotation") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("bindtrace-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("binds.ndjson");
    let rotated = dir.join("binds.ndjson.1");
    let (first, second) = (free_port(), free_port());
    let tracer = Tracer::start(&["--file", file.to_str().expect("utf-8"), "-P", &format!("{first},{second}")]);
    let _a = std::net::TcpListener::bind(("127.0.0.1", first)).expect("bind");
    wait_for_port_in(&file, first);
    // What logrotate does: move the file away, then signal.
    std::fs::rename(&file, &rotated).expect("rotate");
    // SAFETY: kill has no memory preconditions; the pid is a process this code started.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        assert!(Instant::now() < deadline, "SIGHUP did not reopen {}", file.display());
        thread::sleep(Duration::from_millis(20));
    }
    let _b = std::net::TcpListener::bind(("127.0.0.1", second)).expect("bind");
    wait_for_port_in(&file, second);
    let finished = tracer.stop();
    assert!(finished.status.success(), "SIGHUP with --file does not end the run: {}", finished.stderr);
    let (old, new) = (file_records(&rotated), file_records(&file));
    assert!(old.iter().any(|r| r["port"] == first) && !old.iter().any(|r| r["port"] == second), "{old:?}");
    assert!(new.iter().any(|r| r["port"] == second) && !new.iter().any(|r| r["port"] == first), "{new:?}");
    let summary = new.iter().find(|r| r["type"] == "summary").expect("the summary in the new file");
    assert_eq!(summary["file_reopens"], 1, "{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rotation whose new file cannot be opened (here a directory took its name, which refuses
/// even root): the run goes on writing to the file it had, says so in one line, and ends with
/// its summary and status 0. It used to end at once with status 1 and no summary.
#[test]
fn a_failed_reopen_on_sighup_keeps_writing_where_it_was() {
    if !can_load_probe("a_failed_reopen_on_sighup_keeps_writing_where_it_was") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("bindtrace-rotate-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("binds.ndjson");
    let rotated = dir.join("binds.ndjson.1");
    let (first, second) = (free_port(), free_port());
    let tracer = Tracer::start(&["--file", file.to_str().expect("utf-8"), "-P", &format!("{first},{second}")]);
    let _a = std::net::TcpListener::bind(("127.0.0.1", first)).expect("bind");
    wait_for_port_in(&file, first);
    std::fs::rename(&file, &rotated).expect("rotate");
    std::fs::create_dir(&file).expect("a directory where the new file would go");
    // SAFETY: kill has no memory preconditions; the pid is a process this code started.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGHUP) };
    thread::sleep(Duration::from_millis(300));
    let _b = std::net::TcpListener::bind(("127.0.0.1", second)).expect("bind");
    wait_for_port_in(&rotated, second);
    let finished = tracer.stop();
    assert!(finished.status.success(), "a failed reopen does not end the run: {}", finished.stderr);
    let said: Vec<&str> = finished.stderr.lines().filter(|l| l.contains("SIGHUP")).collect();
    assert_eq!(said.len(), 1, "{}", finished.stderr);
    assert!(said[0].contains("cannot reopen") && said[0].contains("still writing"), "{}", finished.stderr);
    let summary =
        file_records(&rotated).into_iter().find(|r| r["type"] == "summary").expect("the summary in the old file");
    assert_eq!(summary["file_reopens"], 0, "{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}
