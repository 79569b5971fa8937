//! `cargo xtask bench --parts soak`: months of uptime, compressed. For `--soak-seconds`
//! (600 by default) bindtrace traces a host that churns: every second new processes bind new
//! ports, each in a new cgroup v2 group (standing for a pod), some binds fail against held
//! ports, and for a minute in the middle the reader of bindtrace's output stalls. bindtrace's
//! RSS is sampled every 10 s; after a warm-up it must stay flat.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

/// Processes started (each in a new group, binding a new port) per second.
const PROCESSES_PER_SECOND: usize = 100;
/// Failing binds per second against held ports.
const FAILURES_PER_SECOND: usize = 20;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples before this are the warm-up: at 100 new processes a second the bounded caches
/// (identities 4,096 paths, per-process counts 4,096, bind history 16,384) are full by then.
const WARM_UP: Duration = Duration::from_secs(200);
/// Growth of peak RSS after the warm-up that still counts as flat.
const FLAT_TOLERANCE: f64 = 0.10;

/// The mount point of the cgroup v2 hierarchy (the unified one on hybrid hosts).
fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        right.starts_with("cgroup2 ").then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Starts `true` in a new group under `parent`, binding 127.0.0.1:0 first (in the child,
/// between fork and exec: a new pid, a new cgroup, a new port each time).
fn churn_once(parent: &Path, n: u64) -> Result<()> {
    let group = parent.join(format!("pod-{n}"));
    std::fs::create_dir(&group).with_context(|| format!("creating {}", group.display()))?;
    let procs = std::ffi::CString::new(group.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
    let mut command = Command::new("true");
    // SAFETY: only async-signal-safe calls (open, write, close, socket, bind) in the child.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            let socket = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            libc::bind(socket, (&raw const addr).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32);
            Ok(())
        });
    }
    let status = command.stdout(Stdio::null()).status()?;
    let _ = status;
    // The group is empty once its process exited.
    let _ = std::fs::remove_dir(&group);
    Ok(())
}

pub(super) fn soak(bindtrace: &Path, seconds: u64, stall_seconds: u64) -> Result<(String, Value)> {
    let mount = cgroup2_mount().context("the soak needs a cgroup v2 hierarchy")?;
    let parent = mount.join(format!("bindtrace-soak-{}", std::process::id()));
    std::fs::create_dir_all(&parent)?;
    let held: Vec<TcpListener> = (0..50).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let ports: Vec<u16> = held.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect();

    let mut tracer = super::tracer::spawn_ndjson(bindtrace)?;
    let stderr = tracer.stderr.take().context("stderr")?;
    let rest = super::tracer::wait_attached(stderr)?;
    let stderr_lines = std::thread::spawn(move || rest.map_while(Result::ok).collect::<Vec<String>>());
    let stdout = tracer.stdout.take().context("stdout")?;
    let stalled = Arc::new(AtomicBool::new(false));
    let lines = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stalled, lines) = (stalled.clone(), lines.clone());
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                while stalled.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => lines.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let stall =
        (started + Duration::from_secs(seconds / 2), started + Duration::from_secs(seconds / 2 + stall_seconds));
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let mut next_sample = started;
    let mut n = 0u64;
    while Instant::now() < end {
        let second = Instant::now();
        stalled.store((stall.0..stall.1).contains(&second), Ordering::Relaxed);
        for _ in 0..PROCESSES_PER_SECOND {
            n += 1;
            churn_once(&parent, n)?;
        }
        for i in 0..FAILURES_PER_SECOND {
            let _ = TcpListener::bind(("127.0.0.1", ports[(n as usize + i) % ports.len()]));
        }
        if Instant::now() >= next_sample {
            samples.push((started.elapsed().as_secs(), rss_kb(tracer.id())));
            next_sample += SAMPLE_EVERY;
        }
        if let Some(left) = Duration::from_secs(1).checked_sub(second.elapsed()) {
            std::thread::sleep(left);
        }
    }
    stalled.store(false, Ordering::Relaxed);
    let peak = super::tracer::peak_rss_kb(tracer.id()).unwrap_or(0);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let _ = tracer.wait();
    let _ = reader.join();
    let stderr = stderr_lines.join().unwrap_or_default();
    let _ = std::fs::remove_dir(&parent);
    drop(held);

    let warm: Vec<u64> = samples.iter().filter(|(t, _)| *t >= WARM_UP.as_secs()).map(|(_, kb)| *kb).collect();
    let half = warm.len() / 2;
    let first_half = warm[..half].iter().copied().max().unwrap_or(0);
    let second_half = warm[half..].iter().copied().max().unwrap_or(0);
    let growth = if first_half > 0 { second_half as f64 / first_half as f64 - 1.0 } else { 0.0 };
    let flat = growth <= FLAT_TOLERANCE;
    let dropped_said = stderr.iter().any(|l| l.contains("lines dropped"));
    let markdown = format!(
        "\n### Soak (issue 19): {seconds} s of churn\n\n{PROCESSES_PER_SECOND} new processes a second, each in a new cgroup binding a new port ({n} in all), {FAILURES_PER_SECOND} failures a second against 50 held ports, the reader stalled for {stall_seconds} s in the middle.\n\n| RSS samples (s: MB) | peak RSS | growth after warm-up (first half vs second half) | flat | lines read | output drops said |\n|---|---|---|---|---|---|\n| {} | {:.1} MB | {:+.1}% | {} | {} | {} |\n",
        samples.iter().map(|(t, kb)| format!("{t}: {:.1}", *kb as f64 / 1024.0)).collect::<Vec<_>>().join(", "),
        peak as f64 / 1024.0,
        growth * 100.0,
        if flat { "yes" } else { "NO" },
        lines.load(Ordering::Relaxed),
        if dropped_said { "yes" } else { "none needed" },
    );
    Ok((
        markdown,
        json!({
            "seconds": seconds, "processes": n, "samples_kb": samples, "peak_rss_kb": peak,
            "growth_after_warm_up": growth, "flat": flat, "lines_read": lines.load(Ordering::Relaxed),
        }),
    ))
}
