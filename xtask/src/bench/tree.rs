//! `cargo xtask bench --parts tree`: what following a process tree (`bindtrace -- CMD`,
//! `--tree PID`) costs a fork storm. A loop of fork, exit and wait runs untraced; with
//! bindtrace attached and idle (the bind hooks only); with `--tree` of an idle process (the
//! fork and exit programs run for every fork on the host, which is not followed: one hash
//! lookup each); and as `bindtrace -- LOOP` (every fork is followed: an insert and a delete).
//! Configurations alternate round by round; medians are reported.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

/// Forks per run.
const FORKS: u64 = 20_000;

fn rate_of(output: &[u8]) -> Result<f64> {
    let text = String::from_utf8_lossy(output);
    let line = text.lines().find(|l| l.starts_with('{')).ok_or_else(|| anyhow!("the fork loop printed nothing"))?;
    let result: Value = serde_json::from_str(line)?;
    result["calls_per_second"].as_f64().ok_or_else(|| anyhow!("the fork loop printed no rate"))
}

fn fork_loop(loop_bin: &Path) -> Result<f64> {
    let out = Command::new(loop_bin).args(["--forks", &FORKS.to_string()]).output()?;
    if !out.status.success() {
        bail!("the fork loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    rate_of(&out.stdout)
}

/// `bindtrace -- LOOP`: the loop's own tree followed; its rate from its stdout.
fn followed(bindtrace: &Path, loop_bin: &Path) -> Result<f64> {
    let out = Command::new(bindtrace)
        .args(["--no-diagnosis", "-o", "none", "--no-summary", "--"])
        .arg(loop_bin)
        .args(["--forks", &FORKS.to_string()])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("bindtrace -- fork loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    rate_of(&out.stdout)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the fork storm; returns its markdown table and JSON.
pub(super) fn tree(bindtrace: &Path, loop_bin: &Path, rounds: usize) -> Result<(String, Value)> {
    // An idle process whose tree is followed: nothing it does forks.
    let mut idle: Child = Command::new("sleep").arg("3600").spawn()?;
    let idle_pid = idle.id().to_string();
    let configs: [(&str, Vec<&str>); 2] = [
        ("bindtrace attached, idle (bind hooks only)", vec!["--errno", "EADDRINUSE"]),
        (
            "bindtrace --tree of an idle process (fork and exit programs, the loop not followed)",
            vec!["--tree", &idle_pid],
        ),
    ];
    let mut untraced = Vec::new();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); configs.len() + 1];
    let result = (|| -> Result<()> {
        for round in 1..=rounds {
            eprintln!("xtask: bench tree round {round}/{rounds}");
            untraced.push(fork_loop(loop_bin)?);
            for (i, (_, args)) in configs.iter().enumerate() {
                rates[i].push(super::tracer::beside(bindtrace, args, || fork_loop(loop_bin))?);
            }
            rates[configs.len()].push(followed(bindtrace, loop_bin)?);
        }
        Ok(())
    })();
    let _ = idle.kill();
    let _ = idle.wait();
    result?;
    let base = median(untraced.clone());
    let mut table = format!(
        "\n### tree: a fork storm (fork, _exit, waitpid), {FORKS} forks per run, median of {rounds} rounds\n\n\
         | configuration | forks/s | ratio to untraced | µs added per fork |\n| --- | ---: | ---: | ---: |\n\
         | untraced | {base:.0} | 1.00 | - |\n"
    );
    let labels = configs.iter().map(|(label, _)| *label).chain(["bindtrace -- LOOP (every fork followed)"]);
    let mut rows = Vec::new();
    for (label, runs) in labels.zip(rates) {
        let rate = median(runs.clone());
        let added_us = (1.0 / rate - 1.0 / base) * 1e6;
        table.push_str(&format!("| {label} | {rate:.0} | {:.2} | {added_us:.2} |\n", rate / base));
        rows.push(json!({"configuration": label, "forks_per_second": runs, "median": rate, "ratio": rate / base, "added_us": added_us}));
    }
    Ok((table, json!({"forks": FORKS, "untraced": untraced, "untraced_median": base, "configurations": rows})))
}
