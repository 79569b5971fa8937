//! A bindtrace started beside a load: waited for until attached, and its peak memory read.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Runs `load` while `bindtrace ARGS` is attached and idle beside it (no output, no summary),
/// then stops bindtrace: what staying attached costs a load bindtrace does not trace.
pub(super) fn beside<T>(bindtrace: &Path, args: &[&str], load: impl FnOnce() -> Result<T>) -> Result<T> {
    let mut child = std::process::Command::new(bindtrace)
        .args(["--no-diagnosis", "-o", "none", "--no-summary"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    // Kept open until the tracer is stopped: its stderr must not become a closed pipe.
    let _stderr = wait_attached(stderr).map_err(|e| anyhow!("bindtrace {args:?}: {e}"))?;
    let result = load();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait()?;
    result
}

/// Reads bindtrace's stderr until it says it is attached; the rest of its lines follow.
pub(super) fn wait_attached(
    stderr: std::process::ChildStderr,
) -> Result<std::io::Lines<BufReader<std::process::ChildStderr>>> {
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("attached") => return Ok(lines),
            Some(Ok(_)) => {}
            _ => bail!("bindtrace exited before attaching"),
        }
    }
}

/// Peak RSS of a running process (VmHWM). Not wait4's ru_maxrss: that one also counts the
/// forked copy of this (large) process from before exec.
pub(super) fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// CPU time of a child, from wait4(2).
pub(super) fn wait_with_usage(pid: u32) -> Result<f64> {
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, into locals.
    let rc = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    if rc < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

/// `bindtrace -o ndjson`, its stdout and stderr piped: the benches read both.
pub(super) fn spawn_ndjson(bindtrace: &Path) -> Result<std::process::Child> {
    std::process::Command::new(bindtrace)
        .args(["-o", "ndjson"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting bindtrace")
}
