//! `cargo xtask bench --parts hosts`: bindtrace on the hosts where deploys fail. A port with
//! 18,000 connections, and hosts with 100k, 500k and 1M open fds (eventfds spread over
//! processes of 16,700 each: the hard fd limit here is 20,000). For each: the time from a
//! failed bind to its diagnosis naming the holder (one that bound before bindtrace started,
//! and one that bound while it runs), bindtrace's peak RSS, and its longest NDJSON line.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

const RAISE_LIMIT: &str = "import resource\nsoft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\nresource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n";
const FDS_PER_PROCESS: usize = 16_700;

struct Helpers(Vec<Child>);

impl Drop for Helpers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn python(script: &str, args: &[String]) -> Result<Child> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(format!("{RAISE_LIMIT}{script}"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("python3")?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("a helper did not start");
    }
    Ok(child)
}

fn listener(port: u16) -> Result<Child> {
    python(
        "import socket, sys, time\ns = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\nprint('ready', flush=True)\ntime.sleep(3600)\n",
        &[port.to_string()],
    )
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// bindtrace writing NDJSON to a pipe this process reads, each line with its arrival time.
struct Traced {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    longest_line: usize,
}

impl Traced {
    fn start(bindtrace: &Path) -> Result<Self> {
        let mut child = Command::new(bindtrace)
            .args(["-o", "ndjson"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("bindtrace")?;
        let stderr = child.stderr.take().context("stderr")?;
        let rest = super::tracer::wait_attached(stderr)?;
        std::thread::spawn(move || rest.for_each(drop));
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines, longest_line: 0 })
    }

    /// Fails a bind on `port` and waits for its diagnosis: how long it took from the
    /// failure, and the pid it names (or what it says instead).
    fn clash(&mut self, port: u16) -> Result<(f64, Value)> {
        let failed_at = Instant::now();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            bail!("port {port} was free");
        }
        let deadline = failed_at + Duration::from_secs(20);
        let mut seq = None;
        loop {
            let (at, line) = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .context("no diagnosis within 20 s")?;
            self.longest_line = self.longest_line.max(line.len());
            let Ok(record) = serde_json::from_str::<Value>(&line) else { continue };
            let diagnosis = match record["type"].as_str() {
                Some("bind") if record["port"] == port && record["ok"] == false => {
                    seq = Some(record["seq"].clone());
                    record["diagnosis"].clone()
                }
                Some("diagnosis") if Some(&record["seq"]) == seq.as_ref() => record["diagnosis"].clone(),
                _ => continue,
            };
            if diagnosis.is_object() {
                return Ok(((at - failed_at).as_secs_f64(), diagnosis));
            }
        }
    }

    fn peak_rss_kb(&self) -> u64 {
        super::tracer::peak_rss_kb(self.child.id()).unwrap_or(0)
    }

    fn stop(mut self) -> Result<usize> {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        while let Ok((_, line)) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.longest_line = self.longest_line.max(line.len());
        }
        Ok(self.longest_line)
    }
}

fn named(diagnosis: &Value) -> String {
    match diagnosis["holders"][0]["processes"][0]["pid"].as_u64() {
        Some(pid) => format!("pid {pid}"),
        None => diagnosis["holders"][0]["processes_hidden"]
            .as_str()
            .or(diagnosis["summary"].as_str())
            .unwrap_or("?")
            .to_owned(),
    }
}

/// One host of `fds` open eventfds: a holder from before the start and one from after.
fn many_fds(bindtrace: &Path, fds: usize) -> Result<Value> {
    let processes = fds.div_ceil(FDS_PER_PROCESS);
    let mut helpers = Helpers(Vec::new());
    for _ in 0..processes {
        helpers.0.push(python(
            "import os, sys, time\nkept = [os.eventfd(0) for _ in range(int(sys.argv[1]))]\nprint('ready', flush=True)\ntime.sleep(3600)\n",
            &[(fds / processes).to_string()],
        )?);
    }
    let early = free_port()?;
    helpers.0.push(listener(early)?);
    let early_pid = helpers.0.last().map(Child::id);
    let started = Instant::now();
    let mut traced = Traced::start(bindtrace)?;
    let attach_s = started.elapsed().as_secs_f64();
    let late = free_port()?;
    helpers.0.push(listener(late)?);
    let late_pid = helpers.0.last().map(Child::id);
    std::thread::sleep(Duration::from_millis(300));
    let (late_s, late_diagnosis) = traced.clash(late)?;
    std::thread::sleep(Duration::from_millis(300));
    let (early_s, early_diagnosis) = traced.clash(early)?;
    let rss = traced.peak_rss_kb();
    let longest = traced.stop()?;
    Ok(json!({
        "fds": fds, "processes": processes, "attach_s": attach_s,
        "bound_while_running": {"seconds": late_s, "named": named(&late_diagnosis), "expected": late_pid},
        "bound_before": {"seconds": early_s, "named": named(&early_diagnosis), "expected": early_pid},
        "peak_rss_kb": rss, "longest_line": longest,
    }))
}

/// A listener with `connections` accepted connections, clashed with.
fn busy_port(bindtrace: &Path, connections: usize) -> Result<Value> {
    let port = free_port()?;
    let mut helpers = Helpers(vec![python(
        "import socket, sys, time\nport, count = int(sys.argv[1]), int(sys.argv[2])\ns = socket.socket(); s.bind(('127.0.0.1', port)); s.listen(4096)\nprint('ready', flush=True)\nkept = []\nwhile len(kept) < count:\n    kept.append(s.accept()[0])\ntime.sleep(3600)\n",
        &[port.to_string(), connections.to_string()],
    )?]);
    let server = helpers.0[0].id();
    for _ in 0..2 {
        helpers.0.push(python(
            "import socket, sys, time\nkept = [socket.create_connection(('127.0.0.1', int(sys.argv[1]))) for _ in range(int(sys.argv[2]))]\nprint('ready', flush=True)\ntime.sleep(3600)\n",
            &[port.to_string(), (connections / 2).to_string()],
        )?);
    }
    let mut traced = Traced::start(bindtrace)?;
    let (seconds, diagnosis) = traced.clash(port)?;
    let rss = traced.peak_rss_kb();
    let longest = traced.stop()?;
    Ok(json!({
        "connections": connections, "seconds": seconds, "named": named(&diagnosis), "expected": server,
        "holders_listed": diagnosis["holders"].as_array().map_or(0, Vec::len),
        "holders_summary": diagnosis["holders_summary"], "peak_rss_kb": rss, "longest_line": longest,
    }))
}

/// The part's markdown table and JSON.
pub(super) fn hosts(bindtrace: &Path) -> Result<(String, Value)> {
    let mut markdown = String::from(
        "\n### Production hosts (issue 19)\n\n| host | holder | time to its diagnosis | named | peak RSS | longest line |\n|---|---|---|---|---|---|\n",
    );
    let busy = busy_port(bindtrace, 18_000)?;
    markdown.push_str(&format!(
        "| port with {} connections | listener (pid {}) | {:.3} s | {} | {} kB | {} B |\n",
        busy["connections"],
        busy["expected"],
        busy["seconds"].as_f64().unwrap_or(0.0),
        busy["named"],
        busy["peak_rss_kb"],
        busy["longest_line"]
    ));
    let mut hosts = vec![busy];
    for fds in [100_000, 500_000, 1_000_000] {
        let host = many_fds(bindtrace, fds)?;
        for (which, label) in
            [("bound_while_running", "bound while running"), ("bound_before", "bound before the start")]
        {
            markdown.push_str(&format!(
                "| {fds} fds in {} processes | {label} (pid {}) | {:.3} s | {} | {} kB | {} B |\n",
                host["processes"],
                host[which]["expected"],
                host[which]["seconds"].as_f64().unwrap_or(0.0),
                host[which]["named"],
                host["peak_rss_kb"],
                host["longest_line"]
            ));
        }
        hosts.push(host);
    }
    Ok((markdown, Value::Array(hosts)))
}
