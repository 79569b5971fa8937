//! What a guest's runs must show beyond single scenarios (`--check`, `--attach auto`, the
//! refused backends, `--cgroup`, `-- CMD`, per-thread state, the ring's page size), tallied.

use anyhow::{bail, Result};
use serde_json::Value;

use super::{
    check::check,
    console::{GuestChecks, GuestRun},
    matrix::BACKENDS,
};

/// Scenario checks that passed, and what failed, in words.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) passed: usize,
    pub(super) failed: usize,
    pub(super) failures: Vec<String>,
    /// Guests that failed once and were booted again, with that first failure.
    pub(super) retried: Vec<String>,
}

impl Tally {
    pub(super) fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.failures.extend(other.failures);
        self.retried.extend(other.retried);
    }
}

/// A backend the kernel is known not to offer must be refused cleanly, and `--check` must
/// say so: reported, never skipped.
pub(super) fn report_lacking(label: &str, run: Option<&GuestRun>, checks: &GuestChecks, why: &str, tally: &mut Tally) {
    let Some(run) = run else {
        tally.failed += 1;
        tally.failures.push(format!("{label}: the guest printed no result"));
        return;
    };
    let backend = &run.backend;
    let refusal = run.stderr.iter().find(|l| l.starts_with("bindtrace: ")).cloned().unwrap_or_default();
    let mut problems = Vec::new();
    if run.exit == "exit=0" || run.stderr.iter().any(|l| l.contains("attached")) {
        problems.push(format!(
            "{backend} attached, but the matrix says this kernel lacks it ({why}): update vm::MATRIX and the README"
        ));
    }
    if run.stderr.len() != 1 || refusal.is_empty() {
        problems.push(format!("{backend}'s refusal is not one line: {:?}", run.stderr));
    }
    if !matches!(checks.hook(backend), Some(Err(_))) {
        problems.push(format!("--check does not say `hook {backend}: no: ...`"));
    }
    if problems.is_empty() {
        tally.passed += 1;
        eprintln!("xtask: vm {label} {backend}: NOT OFFERED, as expected ({why}); bindtrace said: {refusal}");
    } else {
        tally.failed += 1;
        tally.failures.extend(problems.into_iter().map(|p| format!("{label} {backend}: {p}")));
    }
}

/// `--check` must pass (some hook works) and name every backend; `--attach auto` must take
/// the first of fexit, kprobe, tracepoint that `--check` found working.
pub(super) fn report_checks(label: &str, checks: &GuestChecks, tally: &mut Tally) {
    let mut problems = Vec::new();
    if checks.check_exit != "0" {
        problems.push(format!("bindtrace --check exited {}: {:?}", checks.check_exit, checks.check_lines));
    }
    // In the order --check says auto tries (the tracepoints first on PREEMPT_RT).
    let order: Vec<&str> = checks
        .check_lines
        .iter()
        .find_map(|l| l.strip_prefix("attach auto tries: "))
        .map(|rest| rest.split(" (").next().unwrap_or(rest).split(", ").collect())
        .unwrap_or_else(|| BACKENDS.to_vec());
    let first_working = order.iter().find(|b| matches!(checks.hook(b), Some(Ok(()))));
    if BACKENDS.iter().any(|b| checks.hook(b).is_none()) {
        problems.push(format!("bindtrace --check does not name every hook: {:?}", checks.check_lines));
    }
    for backend in BACKENDS.iter().filter(|b| matches!(checks.hook(b), Some(Ok(())))) {
        problems.extend(exercise_problem(&checks.check_lines, backend));
    }
    if checks.auto_exit != "exit=0" || checks.auto_backend.as_deref() != first_working.copied() {
        problems.push(format!(
            "--attach auto took {:?} ({}), --check's first working hook is {first_working:?}: {:?}",
            checks.auto_backend, checks.auto_exit, checks.auto_output
        ));
    }
    if problems.is_empty() {
        tally.passed += 1;
        eprintln!("xtask: vm {label}: --check passes; auto attached {}", first_working.unwrap_or(&"?"));
    } else {
        tally.failed += 1;
        tally.failures.extend(problems.into_iter().map(|p| format!("{label}: {p}")));
    }
}

/// `--check --verbose` under a hook that attached: its two test binds were seen and emitted,
/// none lost, its return hooks ran for both (the kernel's own counters), and under kprobe
/// the backstops for skipped kretprobes attached.
pub(super) fn exercise_problem(lines: &[String], backend: &str) -> Option<String> {
    let prefix = format!("hook {backend} test binds (127.0.0.1:");
    let Some(binds) = lines.iter().find(|l| l.starts_with(&prefix)) else {
        return Some(format!("--check --verbose made no test binds under {backend}: {lines:?}"));
    };
    let number_after = |word: &str| -> Option<u64> {
        binds.split(word).nth(1)?.split_whitespace().next()?.trim_end_matches(';').parse().ok()
    };
    if number_after("saw ").is_none_or(|n| n < 2) || number_after("emitted ").is_none_or(|n| n < 2) {
        return Some(format!("{backend}: the test binds were not both seen and emitted: {binds}"));
    }
    if !binds.ends_with("; 0 lost") {
        return Some(format!("{backend}: test binds lost: {binds}"));
    }
    let program_prefix = format!("hook {backend} program ");
    let return_runs: u64 = lines
        .iter()
        .filter_map(|l| l.strip_prefix(&program_prefix))
        .filter(|l| (l.contains("exit") || l.contains("kretprobe")) && !l.contains("backstop"))
        .filter_map(|l| l.split_once(": ")?.1.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    if return_runs < 2 {
        return Some(format!("{backend}: the return hooks did not run for both test binds: {lines:?}"));
    }
    let backstops = lines.iter().find(|l| l.starts_with("hook kprobe reports bind(2) calls whose kretprobe"));
    (backend == "kprobe" && !backstops.is_some_and(|l| l.ends_with(": yes, from the syscall exit tracepoints")))
        .then(|| format!("kprobe: the backstops for skipped kretprobes did not attach: {backstops:?}"))
}

/// `nc_check`: the guest's init also ran `nc -l` twice (not on the host, which may lack nc).
/// `counted_loss`: backends whose per-thread checks accept a loss that was counted (PREEMPT_RT).
pub(super) fn report(
    label: &str,
    runs: &[GuestRun],
    backends: &[&str],
    nc_check: bool,
    counted_loss: &[&str],
    tally: &mut Tally,
) {
    let failures = &mut tally.failures;
    for backend in backends {
        match runs.iter().find(|r| r.backend == *backend) {
            None => {
                tally.failed += 1;
                failures.push(format!("{label} {backend}: the guest printed no result"));
            }
            Some(run) => {
                let mut problems = check(&run.scenarios, &run.events, backend);
                // `nc -l -p 41100` twice: the second one's failure, with its requested port.
                let nc_failure = run.events.iter().any(|e| {
                    e["comm"] == "nc"
                        && e["port"] == 41100
                        && e["errno_name"] == "EADDRINUSE"
                        && e["backend"] == *backend
                });
                if nc_check && !nc_failure {
                    problems.push("nc_eaddrinuse: no EADDRINUSE event from the second `nc -l -p 41100`".to_owned());
                } else if nc_check {
                    tally.passed += 1;
                }
                if nc_check {
                    match tree_problem(run) {
                        Some(problem) => problems.push(format!("process_tree: {problem}")),
                        None => tally.passed += 1,
                    }
                    match scope_problem(run) {
                        Some(problem) => problems.push(format!("cgroup_scope: {problem}")),
                        None => tally.passed += 1,
                    }
                }
                let exact = !counted_loss.contains(backend);
                match collision_problem(run.collision.as_ref(), exact) {
                    Some(problem) => problems.push(format!("tid_slot_collision: {problem}")),
                    None => tally.passed += 1,
                }
                if let Some(sleepers) = &run.sleepers {
                    let reported: u64 =
                        sleepers["events"].as_array().into_iter().flatten().filter_map(Value::as_u64).sum();
                    let kernel = &sleepers["summary"]["kernel"];
                    eprintln!(
                        "xtask: vm {label} {backend}: sleeping binds: {reported} reported, {} backstopped, {} dropped",
                        kernel["returns_backstopped"], sleepers["summary"]["dropped"]
                    );
                }
                match sleepers_problem(run.sleepers.as_ref(), exact) {
                    Some(problem) => problems.push(format!("sleeping_binds: {problem}")),
                    None => tally.passed += 1,
                }
                // Not `exact`: each run's check lets the summary's `dropped` cover its losses,
                // and the two runs share one bindtrace, so one summary: the binds of both
                // must be reported or counted together too.
                if !exact {
                    if let Some(problem) = shared_loss_problem(run.collision.as_ref(), run.sleepers.as_ref()) {
                        problems.push(format!("tid_slot_collision: {problem}"));
                    }
                }
                let failing: std::collections::HashSet<&str> =
                    problems.iter().filter_map(|p| p.split(':').next()).collect();
                tally.failed += failing.len();
                tally.passed += run.scenarios.len().saturating_sub(failing.len());
                if run.exit != "exit=0" {
                    problems.push(format!("bindtrace ended with {}; stderr: {:?}", run.exit, run.stderr));
                }
                let verdict = if problems.is_empty() { "PASS" } else { "FAIL" };
                eprintln!(
                    "xtask: vm {label} {backend}: {verdict} ({} scenarios, {} events)",
                    run.scenarios.len(),
                    run.events.len()
                );
                failures.extend(problems.into_iter().map(|p| format!("{label} {backend}: {p}")));
            }
        }
    }
}

/// The `--cgroup` run: the listener in the cgroup is reported, the one outside is not (the
/// kernel dropped it), and bindtrace ended cleanly.
pub(super) fn scope_problem(run: &GuestRun) -> Option<String> {
    let binds: Vec<&Value> = run.scope.iter().filter(|r| r["type"] == "bind").collect();
    if run.scope_exit != "exit=0" {
        return Some(format!("bindtrace --cgroup ended with {}: {:?}", run.scope_exit, run.scope_stderr));
    }
    if !binds.iter().any(|b| b["port"] == 41201 && b["ok"] == true) {
        return Some(format!("no event for the listener inside the cgroup: {binds:?}"));
    }
    if binds.iter().any(|b| b["port"] == 41202) {
        return Some(format!("the listener outside the cgroup was reported: {binds:?}"));
    }
    None
}

/// The `-- CMD` run: bindtrace exits with CMD's status (3); each bind of the tree is reported
/// with its depth (the daemon's after its parent exited), the one outside it is not (the
/// kernel dropped it), and the summary names the command's end.
pub(super) fn tree_problem(run: &GuestRun) -> Option<String> {
    if run.tree_exit != "exit=3" {
        return Some(format!("bindtrace -- CMD ended with {} (CMD exits 3): {:?}", run.tree_exit, run.tree_stderr));
    }
    let binds: Vec<&Value> = run.tree.iter().filter(|r| r["type"] == "bind").collect();
    // (port, depths it may have): sh -c runs its last command by exec on some shells.
    let expected: [(u64, &[u64]); 4] = [(41302, &[1]), (41303, &[1, 2]), (41304, &[2, 3]), (41305, &[1])];
    for (port, depths) in expected {
        let Some(bind) = binds.iter().find(|b| b["port"] == port) else {
            return Some(format!("no event for the tree's bind of port {port}: {binds:?}"));
        };
        if bind["ok"] != true || !bind["depth"].as_u64().is_some_and(|d| depths.contains(&d)) || !bind["ppid"].is_u64()
        {
            return Some(format!("the bind of port {port} should be ok at depth {depths:?} with its ppid: {bind}"));
        }
    }
    if binds.iter().any(|b| b["port"] == 41301) {
        return Some(format!("a bind outside the tree was reported: {binds:?}"));
    }
    let summary = run.tree.iter().find(|r| r["type"] == "summary");
    // The bind outside ran while CMD did: the probe saw it and its filter dropped it.
    if summary.and_then(|s| s["kernel"]["filtered"].as_u64()).is_none_or(|f| f == 0) {
        return Some(format!(
            "the kernel filtered no bind: the one outside the tree was not made meanwhile: {summary:?}"
        ));
    }
    match summary.map(|s| &s["tree"]) {
        Some(tree) if tree["exit_status"] == 3 => None,
        other => Some(format!("the summary does not give CMD's exit status 3: {other:?}")),
    }
}

/// What `bind-scenarios --count` printed: the count, the binds each thread made, and the
/// threads; or what is wrong with it.
pub(super) fn counted_plan(counted: Option<&Value>) -> std::result::Result<(&Value, u64, &[Value]), String> {
    let counted = counted.ok_or("no count printed")?;
    let plan = &counted["plan"];
    if let Some(why) = plan["setup_error"].as_str() {
        return Err(format!("its setup failed: {why}"));
    }
    let binds = plan["binds_each"].as_u64().unwrap_or(0);
    let threads = plan["threads"].as_array().map_or(&[][..], Vec::as_slice);
    if binds == 0 || threads.is_empty() {
        return Err(format!("no plan: {counted}"));
    }
    Ok((counted, binds, threads))
}

/// Two threads whose tids once shared an entry slot made N binds each at the same time: each
/// bind is reported exactly once (no loss, no duplicate); or, not `exact`, no bind is reported
/// twice and every one not reported is counted in the summary's `dropped` (which may count
/// more: a skipped inet_bind hook inside bind(2) is counted though it would have stood aside).
pub(super) fn collision_problem(counted: Option<&Value>, exact: bool) -> Option<String> {
    let (counted, binds, threads) = match counted_plan(counted) {
        Ok(plan) => plan,
        Err(problem) => return Some(problem),
    };
    if threads.len() != 2 {
        return Some(format!("not two threads: {counted}"));
    }
    let kernel = &counted["summary"]["kernel"];
    let events: Vec<u64> = counted["events"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
    if !exact {
        let reported: u64 = events.iter().sum();
        let dropped = counted["summary"]["dropped"].as_u64().unwrap_or(0);
        let twice = events.iter().any(|&e| e > binds);
        return (twice || reported + dropped < binds * threads.len() as u64).then(|| {
            format!("events {events:?} for {binds} binds each, {dropped} counted lost; kernel counters {kernel}")
        });
    }
    let wrong: Vec<String> = threads
        .iter()
        .zip(counted["events"].as_array().into_iter().flatten())
        .filter(|(_, events)| events.as_u64() != Some(binds))
        .map(|(thread, events)| format!("tid {} had {events} events for {binds} binds", thread["tid"]))
        .collect();
    (!wrong.is_empty()).then(|| {
        format!("{}; summary dropped {}, kernel counters {kernel}", wrong.join(", "), counted["summary"]["dropped"])
    })
}

/// Many binds sleeping at once: every one reported (the kprobe backend's kretprobes run out
/// of return instances here: its syscall-exit backstops must report what they skip); not
/// `exact` (PREEMPT_RT, where preempted programs are skipped), each reported or counted lost,
/// never both: reported <= made <= reported + the summary's `dropped` (which may count more:
/// a skipped inet_bind hook is counted though it would have stood aside).
pub(super) fn sleepers_problem(counted: Option<&Value>, exact: bool) -> Option<String> {
    let (counted, binds, threads) = match counted_plan(counted) {
        Ok(plan) => plan,
        Err(problem) => return Some(problem),
    };
    let threads = threads.len() as u64;
    let reported: u64 = counted["events"].as_array().into_iter().flatten().filter_map(Value::as_u64).sum();
    let kernel = &counted["summary"]["kernel"];
    let dropped = counted["summary"]["dropped"].as_u64().unwrap_or(0);
    let made = binds * threads;
    let wrong = if exact { reported != made || dropped != 0 } else { reported > made || reported + dropped < made };
    wrong
        .then(|| format!("{reported} reported ({dropped} counted lost) of {made} binds made; kernel counters {kernel}"))
}

/// The per-thread runs share one bindtrace and so one summary: every bind of both is reported
/// or counted in its `dropped`, or the loss went unsaid.
pub(super) fn shared_loss_problem(collision: Option<&Value>, sleepers: Option<&Value>) -> Option<String> {
    let (Ok((collision, c_binds, c_threads)), Ok((sleepers, s_binds, s_threads))) =
        (counted_plan(collision), counted_plan(sleepers))
    else {
        // Said by the runs' own checks.
        return None;
    };
    let reported =
        |counted: &Value| -> u64 { counted["events"].as_array().into_iter().flatten().filter_map(Value::as_u64).sum() };
    let made = c_binds * c_threads.len() as u64 + s_binds * s_threads.len() as u64;
    let reported = reported(collision) + reported(sleepers);
    let dropped = sleepers["summary"]["dropped"].as_u64().unwrap_or(0);
    (reported + dropped < made)
        .then(|| format!("both runs: {reported} reported and {dropped} counted lost of {made} binds made"))
}

/// `--ring-buffer-size 4K`: accepted where a page is 4K, refused with one line naming the
/// page size (exit 2) where it is larger.
pub(super) fn ring_problem(console: &str, page_kib: u32) -> Option<String> {
    let mut lines = console.lines().skip_while(|l| !l.starts_with("@@RING4K "));
    let exit = lines.next()?.trim_start_matches("@@RING4K ").trim().to_owned();
    let said: Vec<&str> = lines.take_while(|l| !l.starts_with("@@")).collect();
    let wanted = if page_kib > 4 { "exit=2" } else { "exit=0" };
    if exit != wanted {
        return Some(format!("ended with {exit}, expected {wanted} ({page_kib}K pages): {said:?}"));
    }
    let names_page = said.len() == 1 && said[0].contains(&format!("page size ({page_kib}K)"));
    (page_kib > 4 && !names_page).then(|| format!("the refusal is not one line naming the page size: {said:?}"))
}

/// The closing line CI reads: scenario checks across kernels, architectures and backends.
pub(super) fn finish(tally: &Tally) -> Result<()> {
    println!("vm: {} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 && tally.failures.is_empty() {
        Ok(())
    } else {
        bail!("{} scenario check(s) failed", tally.failed.max(1))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::vm::console::{parse_checks, parse_console};

    #[test]
    fn check_verbose_must_show_the_test_binds_and_the_backstops() {
        let lines = |saw: u64, exit_runs: u64, backstops: &str| -> Vec<String> {
            [
                format!("hook kprobe reports bind(2) calls whose kretprobe the kernel skips (many sleeping at once): {backstops}"),
                format!("hook kprobe test binds (127.0.0.1:5000 twice, the second refused): the probe saw {saw} bind exits and emitted {saw} (binds elsewhere on this machine meanwhile count too); 0 lost"),
                format!("hook kprobe program bindtrace_kretprobe_sys_bind: {exit_runs} runs, 900 ns in all, 0 recursion misses, 100 instructions verified"),
                "hook kprobe program bindtrace_sys_exit_bind_backstop: 2 runs, 90 ns in all, 0 recursion misses, 10 instructions verified".to_owned(),
            ]
            .to_vec()
        };
        let yes = "yes, from the syscall exit tracepoints";
        assert_eq!(exercise_problem(&lines(2, 2, yes), "kprobe"), None);
        assert!(exercise_problem(&lines(1, 2, yes), "kprobe").is_some(), "one test bind unseen");
        assert!(exercise_problem(&lines(2, 0, yes), "kprobe").is_some(), "the backstop's runs are not the kretprobe's");
        assert!(exercise_problem(&lines(2, 2, "no, they are counted as dropped: x"), "kprobe").is_some());
        assert!(exercise_problem(&lines(2, 2, yes), "fexit").is_some(), "no test binds under fexit");
    }

    #[test]
    fn sleeping_binds_must_be_reported() {
        let counted = |events: [u64; 2], missed: u64| {
            json!({"plan": {"binds_each": 10, "threads": [{"tid": 1, "family": "AF_UNIX"}, {"tid": 2, "family": "AF_UNIX"}]},
                   "events": events, "summary": {"dropped": missed, "kernel": {"dropped_return_missed": missed}}})
        };
        assert_eq!(sleepers_problem(Some(&counted([10, 10], 0)), true), None);
        let counted_only = sleepers_problem(Some(&counted([7, 10], 3)), true).expect("lost, even counted, fails");
        assert!(counted_only.contains("17 reported (3 counted lost) of 20 binds made"), "{counted_only}");
        assert!(sleepers_problem(Some(&counted([7, 10], 0)), true).is_some(), "a silent loss fails");
        assert!(sleepers_problem(Some(&counted([10, 10], 2)), true).is_some(), "counted but reported fails");
        assert_eq!(sleepers_problem(Some(&counted([7, 10], 3)), false), None, "PREEMPT_RT: lost, but counted");
        assert_eq!(sleepers_problem(Some(&counted([7, 10], 5)), false), None, "PREEMPT_RT: over-counted passes");
        assert!(sleepers_problem(Some(&counted([7, 10], 0)), false).is_some(), "PREEMPT_RT: a silent loss fails");
        assert!(sleepers_problem(Some(&counted([11, 10], 0)), false).is_some(), "PREEMPT_RT: reported twice fails");
    }

    #[test]
    fn the_shared_runs_losses_are_counted_together() {
        let counted = |events: [u64; 2], binds: u64, dropped: u64| {
            json!({"plan": {"binds_each": binds, "threads": [{"tid": 1}, {"tid": 2}]},
                   "events": events, "summary": {"dropped": dropped, "kernel": {}}})
        };
        // Each run alone passes (3 lost, 3 counted), both together do not (6 lost).
        let (collision, sleepers) = (counted([7, 10], 10, 3), counted([7, 10], 10, 3));
        assert_eq!(collision_problem(Some(&collision), false), None);
        assert_eq!(sleepers_problem(Some(&sleepers), false), None);
        assert!(shared_loss_problem(Some(&collision), Some(&sleepers)).is_some_and(|p| p.contains("34 reported")));
        let (collision, sleepers) = (counted([7, 10], 10, 6), counted([7, 10], 10, 6));
        assert_eq!(shared_loss_problem(Some(&collision), Some(&sleepers)), None);
    }

    #[test]
    fn a_ring_smaller_than_a_page_must_be_refused_in_one_line() {
        let refused = "@@RING4K exit=2\nbindtrace: ring buffer size 4K is smaller than this kernel's page size (16K): use 16K or more\n@@BACKEND fexit exit=0\n";
        assert_eq!(ring_problem(refused, 16), None);
        assert!(ring_problem(refused, 4).is_some(), "4K pages take a 4K ring");
        assert_eq!(ring_problem("@@RING4K exit=0\n@@BACKEND fexit exit=0\n", 4), None);
        assert!(ring_problem("@@RING4K exit=1\nbindtrace: EINVAL\n", 16).is_some(), "a bare EINVAL fails");
    }

    #[test]
    fn a_collision_must_report_every_bind_once() {
        let counted = |a: u64, b: u64| {
            json!({"plan": {"binds_each": 10, "threads": [{"tid": 1000, "port": 1}, {"tid": 17384, "port": 2}]},
                   "events": [a, b], "summary": {"dropped": 0, "kernel": {}}})
        };
        assert_eq!(collision_problem(Some(&counted(10, 10)), true), None);
        let lost = collision_problem(Some(&counted(7, 10)), true).expect("a loss fails");
        assert!(lost.contains("tid 1000 had 7 events for 10 binds"), "{lost}");
        assert!(collision_problem(Some(&counted(10, 12)), true).is_some(), "a duplicate fails");
        assert!(collision_problem(None, true).is_some(), "no count fails");
        let setup = json!({"plan": {"scenario": "tid_slot_collision", "setup_error": "no root"}});
        assert!(collision_problem(Some(&setup), true).is_some_and(|p| p.contains("no root")));
        // PREEMPT_RT: a loss passes only when counted.
        let mut counted_loss = counted(7, 10);
        counted_loss["summary"]["dropped"] = json!(3);
        assert_eq!(collision_problem(Some(&counted_loss), false), None);
        assert!(collision_problem(Some(&counted(7, 10)), false).is_some(), "a silent loss fails");
        assert!(collision_problem(Some(&counted(10, 12)), false).is_some(), "a duplicate fails");
    }

    #[test]
    fn check_and_auto_sections_are_read() {
        let exercised = |backend: &str, exit: &str| {
            format!(
                "hook {backend} test binds (127.0.0.1:5000 twice, the second refused): the probe saw 2 bind exits and emitted 2 (binds elsewhere on this machine meanwhile count too); 0 lost\n\
                 hook {backend} program {exit}: 2 runs, 900 ns in all (450 ns a run), 0 recursion misses, 100 instructions verified\n"
            )
        };
        let console = format!(
            "@@BEGIN 6.1.0-56-cloud-arm64 aarch64\n@@CHECK\nkernel: 6.1\nhook fexit: no: attaching fexit to inet_bind failed\nhook kprobe: yes\n\
             hook kprobe reports bind(2) calls whose kretprobe the kernel skips (many sleeping at once): yes, from the syscall exit tracepoints\n{}\
             hook tracepoint: yes\n{}@@CHECK_EXIT 0\n@@AUTO exit=0\n{{\"type\":\"summary\",\"backend\":\"kprobe\"}}\n@@BACKEND fexit exit=1\n",
            exercised("kprobe", "bindtrace_kretprobe_sys_bind"),
            exercised("tracepoint", "bindtrace_sys_exit_bind")
        );
        let checks = parse_checks(&console);
        assert_eq!(checks.check_exit, "0");
        assert_eq!(checks.hook("fexit"), Some(Err("attaching fexit to inet_bind failed".to_owned())));
        assert_eq!(checks.hook("kprobe"), Some(Ok(())));
        assert_eq!(checks.auto_backend.as_deref(), Some("kprobe"));
        let mut tally = Tally::default();
        report_checks("arm64 6.1", &checks, &mut tally);
        assert_eq!((tally.passed, tally.failed), (1, 0), "{:?}", tally.failures);
    }

    #[test]
    fn console_sections_are_cut_per_backend() {
        let console = "\x1b[2J@@BEGIN 6.1.0\n@@BACKEND tracepoint exit=0\n@@STDERR\nattached\n@@EVENTS\n{\"type\":\"bind\"}\n@@SCENARIOS\n{\"scenario\":\"x\"}\n@@END\n";
        let runs = parse_console(console);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].backend.as_str(), runs[0].exit.as_str()), ("tracepoint", "exit=0"));
        assert_eq!((runs[0].events.len(), runs[0].scenarios.len(), runs[0].stderr.len()), (1, 1, 1));
        assert!(scope_problem(&runs[0]).is_some(), "no --cgroup run is a failure");
        let scoped = |ports: &str| {
            let console = format!(
                "@@BACKEND kprobe exit=0\n@@SCENARIOS\n@@SCOPE exit=0\nbindtrace: attached (kprobe)\n{ports}@@END\n"
            );
            parse_console(&console).remove(0)
        };
        let inside = "{\"type\":\"bind\",\"port\":41201,\"ok\":true}\n";
        let outside = "{\"type\":\"bind\",\"port\":41202,\"ok\":true}\n";
        let run = scoped(inside);
        assert_eq!((run.scope_exit.as_str(), run.scope.len(), run.scope_stderr.len()), ("exit=0", 1, 1));
        assert_eq!(scope_problem(&run), None);
        assert!(scope_problem(&scoped(&format!("{inside}{outside}"))).is_some_and(|p| p.contains("outside")));
        assert!(scope_problem(&scoped("")).is_some_and(|p| p.contains("inside")));
        let tree = |exit: &str, records: &str| {
            let console =
                format!("@@BACKEND kprobe exit=0\n@@TREE exit={exit}\nbindtrace: attached (kprobe)\n{records}@@END\n");
            parse_console(&console).remove(0)
        };
        let bind = |port: u32, depth: u32| {
            format!("{{\"type\":\"bind\",\"port\":{port},\"ok\":true,\"ppid\":7,\"depth\":{depth}}}\n")
        };
        let all = [bind(41302, 1), bind(41303, 2), bind(41304, 3), bind(41305, 1)].concat();
        let summary = "{\"type\":\"summary\",\"kernel\":{\"filtered\":1},\"tree\":{\"exit_status\":3}}\n";
        assert_eq!(tree_problem(&tree("3", &format!("{all}{summary}"))), None);
        assert!(tree_problem(&tree("0", &format!("{all}{summary}"))).is_some_and(|p| p.contains("exits 3")));
        assert!(tree_problem(&tree("3", &format!("{all}{}{summary}", bind(41301, 1))))
            .is_some_and(|p| p.contains("outside")));
        assert!(tree_problem(&tree("3", &format!("{}{summary}", bind(41302, 1)))).is_some_and(|p| p.contains("41303")));
        assert!(tree_problem(&tree("3", &all)).is_some_and(|p| p.contains("filtered no bind")));
        let unfiltered = "{\"type\":\"summary\",\"kernel\":{\"filtered\":0},\"tree\":{\"exit_status\":3}}\n";
        assert!(tree_problem(&tree("3", &format!("{all}{unfiltered}"))).is_some_and(|p| p.contains("filtered no bind")));
        let no_status = "{\"type\":\"summary\",\"kernel\":{\"filtered\":1},\"tree\":{}}\n";
        assert!(tree_problem(&tree("3", &format!("{all}{no_status}"))).is_some_and(|p| p.contains("exit status 3")));
    }
}
