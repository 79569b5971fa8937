//! `cargo xtask bench --parts collateral`: what staying attached costs processes that never
//! bind. A loop of getppid(2) runs untraced, then with bindtrace attached and idle (a filter
//! nothing in the loop matches, no lookups, no output) on each backend this kernel offers,
//! alternating configurations round by round; medians are reported.

use std::{path::Path, process::Command};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

/// getppid calls per run: ~1 s untraced on the benchmark machine.
const CALLS: u64 = 5_000_000;

fn offered_backends(bindtrace: &Path) -> Result<Vec<String>> {
    let out = Command::new(bindtrace).arg("--check").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(["fexit", "kprobe", "tracepoint"]
        .iter()
        .filter(|b| text.lines().any(|l| l == format!("hook {b}: yes")))
        .map(|b| (*b).to_owned())
        .collect())
}

fn syscall_loop(loop_bin: &Path) -> Result<f64> {
    let out = Command::new(loop_bin).arg(CALLS.to_string()).output()?;
    if !out.status.success() {
        bail!("syscall-loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let result: Value = serde_json::from_slice(&out.stdout)?;
    result["calls_per_second"].as_f64().ok_or_else(|| anyhow!("syscall-loop printed no rate"))
}

/// The loop's rate with bindtrace attached on `backend`, idle (a filter nothing in the loop
/// matches).
fn attached(bindtrace: &Path, backend: &str, loop_bin: &Path) -> Result<f64> {
    super::tracer::beside(bindtrace, &["--attach", backend, "--errno", "EADDRINUSE"], || syscall_loop(loop_bin))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the collateral scenario; returns its markdown table and JSON.
pub(super) fn collateral(bindtrace: &Path, loop_bin: &Path, rounds: usize) -> Result<(String, Value)> {
    let backends = offered_backends(bindtrace)?;
    let mut untraced = Vec::new();
    let mut traced: Vec<Vec<f64>> = vec![Vec::new(); backends.len()];
    for round in 1..=rounds {
        eprintln!("xtask: bench collateral round {round}/{rounds} untraced");
        untraced.push(syscall_loop(loop_bin)?);
        for (i, backend) in backends.iter().enumerate() {
            eprintln!("xtask: bench collateral round {round}/{rounds} attached ({backend})");
            traced[i].push(attached(bindtrace, backend, loop_bin)?);
        }
    }
    let base = median(untraced.clone());
    let mut table = format!(
        "\n### collateral: a getppid(2) loop, {CALLS} calls per run, median of {rounds} rounds\n\n\
         | configuration | calls/s | ratio to untraced | ns added per syscall |\n| --- | ---: | ---: | ---: |\n\
         | untraced | {base:.0} | 1.00 | - |\n"
    );
    let mut rows = Vec::new();
    for (backend, rates) in backends.iter().zip(traced) {
        let rate = median(rates.clone());
        let added_ns = (1.0 / rate - 1.0 / base) * 1e9;
        table.push_str(&format!(
            "| bindtrace attached, idle (--attach {backend}) | {rate:.0} | {:.2} | {added_ns:.0} |\n",
            rate / base
        ));
        rows.push(json!({"backend": backend, "calls_per_second": rates, "median": rate, "ratio": rate / base, "added_ns": added_ns}));
    }
    Ok((table, json!({"calls": CALLS, "untraced": untraced, "untraced_median": base, "attached": rows})))
}
