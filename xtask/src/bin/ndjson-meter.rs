//! ndjson-meter: reads bindtrace's NDJSON on stdin as it comes and measures it, for the
//! failure-storm part of `cargo xtask bench` (xtask/src/storm_bench.rs). It is its own
//! release-built process between bindtrace and the bench: the reader must keep up with about
//! 100 MB/s of NDJSON, and a slow one fills the pipe, blocks bindtrace and makes it lose
//! events (the bench itself runs as a debug build).
//!
//! SIGUSR1 marks the end of the storm: the lines read by then are counted. At end of input it
//! prints one JSON object: per-line delays from each bind's `time` to its arrival here, the
//! delay of the `storm-unrelated` bind, (port, second) pairs that failed and that got a
//! diagnosis naming a holder, and bindtrace's summary record.

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader},
    sync::atomic::{AtomicBool, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

fn wall_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

static STORM_ENDED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_storm_end(_: libc::c_int) {
    STORM_ENDED.store(true, Ordering::SeqCst);
}

/// The raw text of `"name":VALUE` in `head` (strings without their quotes). The reader must
/// keep up with bindtrace (about 100 MB/s of NDJSON in these storms; a slower reader fills
/// the pipe, and a blocked bindtrace loses events), so records are searched with memchr's
/// SIMD `memmem`, not parsed, and only in their head, where these fields are.
fn field<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let mut key = Vec::with_capacity(name.len() + 3);
    key.push(b'"');
    key.extend_from_slice(name.as_bytes());
    key.extend_from_slice(b"\":");
    let start = memchr::memmem::find(head, &key)? + key.len();
    let rest = head.get(start..)?;
    let value = match rest.strip_prefix(b"\"") {
        Some(string) => &string[..memchr::memchr(b'"', string)?],
        None => &rest[..memchr::memchr2(b',', b'}', rest).unwrap_or(rest.len())],
    };
    std::str::from_utf8(value).ok()
}

/// A record split where its `diagnosis` object begins (its holders have fields of the same
/// names as the event's).
fn split_head(line: &[u8]) -> (&[u8], &[u8]) {
    let at = memchr::memmem::find(line, b"\"diagnosis\":").unwrap_or(line.len());
    line.split_at(at)
}

fn rfc3339_ns(text: &str) -> Option<i128> {
    let time = humantime::parse_rfc3339(text).ok()?;
    time.duration_since(UNIX_EPOCH).ok().map(|d| d.as_nanos() as i128)
}

/// What the reader saw.
#[derive(Default)]
struct Seen {
    /// Delays of the storm's bind lines, in µs.
    delays_us: Vec<u32>,
    /// Storm bind lines read before SIGUSR1.
    lines_by_storm_end: Option<usize>,
    unrelated_delay_ms: Option<f64>,
    failing: HashSet<(u16, i64)>,
    diagnosed: HashSet<(u16, i64)>,
    summary: Value,
}

fn read_output(stdout: impl std::io::Read) -> Seen {
    let mut seen = Seen::default();
    let mut reader = BufReader::with_capacity(1 << 20, stdout);
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let arrived = wall_ns();
        if seen.lines_by_storm_end.is_none() && STORM_ENDED.load(Ordering::Relaxed) {
            seen.lines_by_storm_end = Some(seen.delays_us.len());
        }
        let (head, diagnosis) = split_head(&line);
        let kind = field(head, "type");
        if kind == Some("summary") {
            seen.summary = serde_json::from_slice(&line).unwrap_or(Value::Null);
            continue;
        }
        let Some(time) = field(head, "time").and_then(rfc3339_ns) else { continue };
        let second = (time / 1_000_000_000) as i64;
        let port: Option<u16> = field(head, "port").and_then(|p| p.parse().ok());
        let names_holder = memchr::memmem::find(diagnosis, b"\"holders\":[{").is_some();
        match (kind, field(head, "comm")) {
            (Some("bind"), Some("fail-storm")) => {
                let delay_us = ((arrived - time).max(0) / 1_000).min(u32::MAX as i128) as u32;
                seen.delays_us.push(delay_us);
                if let (Some(port), Some("EADDRINUSE")) = (port, field(head, "errno_name")) {
                    seen.failing.insert((port, second));
                    if names_holder {
                        seen.diagnosed.insert((port, second));
                    }
                }
            }
            (Some("bind"), Some("storm-unrelated")) => {
                seen.unrelated_delay_ms = Some((arrived - time) as f64 / 1e6);
            }
            (Some("diagnosis"), Some("fail-storm")) => {
                if let (Some(port), true) = (port, names_holder) {
                    seen.diagnosed.insert((port, second));
                }
            }
            _ => {}
        }
    }
    seen
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[index.min(sorted.len() - 1)]) / 1e3
}

fn main() {
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_storm_end as *const () as libc::sighandler_t) };
    let mut seen = read_output(std::io::stdin().lock());
    seen.delays_us.sort_unstable();
    let covered = seen.failing.intersection(&seen.diagnosed).count();
    let report = json!({
        "lines": seen.delays_us.len(),
        "lines_by_storm_end": seen.lines_by_storm_end.unwrap_or(seen.delays_us.len()),
        "delay_ms": {
            "p50": percentile(&seen.delays_us, 0.5),
            "p99": percentile(&seen.delays_us, 0.99),
            "max": percentile(&seen.delays_us, 1.0),
        },
        "unrelated_bind_delay_ms": seen.unrelated_delay_ms,
        "port_seconds_failing": seen.failing.len(),
        "port_seconds_diagnosed_with_holder": covered,
        "summary": seen.summary,
    });
    println!("{report}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_without_parsing() {
        let line = r#"{"type":"bind","seq":7,"time":"2026-11-26T00:26:52.260750107Z","pid":1,"comm":"fail-storm","port":41234,"errno_name":"EADDRINUSE","diagnosis":{"kind":"in_use","holders":[{"proto":"tcp"}]}}"#;
        let (head, diagnosis) = split_head(line.as_bytes());
        assert!(diagnosis.starts_with(b"\"diagnosis\":"));
        assert_eq!(field(head, "type"), Some("bind"));
        assert_eq!(field(head, "port"), Some("41234"));
        assert_eq!(field(head, "comm"), Some("fail-storm"));
        assert_eq!(field(head, "missing"), None);
        assert_eq!(field(diagnosis, "kind"), Some("in_use"));
        let ns = rfc3339_ns(field(head, "time").expect("time")).expect("parses");
        assert_eq!(ns % 1_000_000_000, 260_750_107);
        let seen = read_output(format!("{line}\n{{\"type\":\"summary\",\"dropped\":0}}\n").as_bytes());
        assert_eq!(seen.delays_us.len(), 1);
        assert_eq!(seen.failing.len(), 1);
        assert_eq!(seen.failing, seen.diagnosed);
        assert_eq!(seen.summary["dropped"], 0);
        assert_eq!(percentile(&[1000, 2000, 3000], 0.5), 2.0);
    }
}
