//! What bindtrace can and cannot see from where it runs: with capabilities short of root, in
//! a PID namespace of its own, on a host without tracefs mounted. A lookup that could not see
//! a process must say so, never that there is none; a run leaves no mount behind.

mod common;

use std::{net::TcpListener, process::Command};

use common::*;
use serde_json::Value;

/// `setpriv` as uid/gid 65534 with exactly these capabilities (inheritable and ambient, so
/// they survive the exec of bindtrace), inside a private mount namespace where tracefs is
/// mounted if the host has not: the test depends neither on the host's mounts nor changes them.
fn as_nobody_with(caps: &str) -> Vec<String> {
    let caps = caps.split(',').map(|c| format!("+{c}")).collect::<Vec<_>>().join(",");
    let mount_tracefs = "mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing; exec \"$@\"";
    let mut wrapper: Vec<String> =
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount_tracefs, "sh", "setpriv"]
            .map(String::from)
            .to_vec();
    wrapper.extend([
        "--reuid=65534".to_owned(),
        "--regid=65534".to_owned(),
        "--clear-groups".to_owned(),
        format!("--inh-caps=-all,{caps}"),
        format!("--ambient-caps={caps}"),
        format!("--bounding-set=-all,{caps}"),
    ]);
    wrapper
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The test's own process holds a port (as root); a forked child fails to bind it.
fn clash(port: u16) -> TcpListener {
    let holder = TcpListener::bind(("127.0.0.1", port)).expect("hold the port");
    let (_, errno) = bind_in_child(format!("127.0.0.1:{port}").parse().expect("addr"), None);
    assert_eq!(errno, libc::EADDRINUSE);
    holder
}

fn assert_not_visible_never_absent(diagnosis: &Value, why: &str) {
    let summary = diagnosis["summary"].as_str().expect("summary");
    assert!(!summary.contains("no process has it open"), "invisibility told as absence: {summary}");
    assert!(summary.contains("cannot see"), "{summary}");
    let holder = &diagnosis["holders"][0];
    assert_eq!(holder["processes"], serde_json::json!([]), "{diagnosis}");
    let hidden = holder["processes_hidden"].as_str().unwrap_or_else(|| panic!("processes_hidden: {diagnosis}"));
    assert!(hidden.contains(why), "{hidden}");
    let unknown = diagnosis["unknown"].to_string();
    assert!(unknown.contains("not visible") && !unknown.contains("exited"), "{unknown}");
}

#[test]
fn with_cap_bpf_and_cap_perfmon_alone_it_attaches_or_names_the_missing_capability() {
    if !can_load_probe("with_cap_bpf_and_cap_perfmon_alone_it_attaches_or_names_the_missing_capability") {
        return;
    }
    let wrapper = as_nobody_with("bpf,perfmon");
    let mut command = Command::new(wrapper[0].as_str());
    command.args(&wrapper[1..]).arg(BINDTRACE).args(["--attach", "tracepoint", "-d", "1s", "-o", "ndjson"]);
    let output = command.output().expect("run bindtrace");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        // A kernel whose tracefs is readable by all: these two capabilities are enough.
        assert!(stderr.contains("attached (tracepoint)"), "{stderr}");
        assert!(stderr.contains("without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"), "{stderr}");
    } else {
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains("needs CAP_DAC_READ_SEARCH besides CAP_BPF and CAP_PERFMON"), "{stderr}");
        assert!(!stderr.contains("mounting it"), "tracefs is mounted: it must not try to mount it: {stderr}");
    }
}

#[test]
fn without_cap_sys_ptrace_a_holder_of_another_user_is_not_visible_never_absent() {
    if !can_load_probe("without_cap_sys_ptrace_a_holder_of_another_user_is_not_visible_never_absent") {
        return;
    }
    let port = free_port();
    let wrapper = as_nobody_with("bpf,perfmon,dac_read_search");
    let port_arg = port.to_string();
    let mut tracer = Tracer::start_under(
        &strs(&wrapper),
        &["-o", "ndjson", "-P", &port_arg, "--errno", "EADDRINUSE", "--no-summary"],
        &[],
    );
    let warning = tracer.stderr.recv_timeout(std::time::Duration::from_secs(5)).expect("a warning line");
    assert!(
        warning.contains("without CAP_SYS_PTRACE, processes of other users that hold a port cannot be named"),
        "{warning}"
    );
    let _holder = clash(port);
    let event = tracer.wait_for("EADDRINUSE", |e| e["port"] == port);
    let diagnosis = tracer.diagnosis_of(&event);
    assert_eq!(diagnosis["kind"], "in_use", "{diagnosis}");
    assert_not_visible_never_absent(&diagnosis, "CAP_SYS_PTRACE");
    tracer.stop();
}

#[test]
fn in_its_own_pid_namespace_holders_outside_are_not_visible_never_absent() {
    if !can_load_probe("in_its_own_pid_namespace_holders_outside_are_not_visible_never_absent") {
        return;
    }
    let port = free_port();
    let port_arg = port.to_string();
    // unshare --fork does not pass signals on: the run ends by itself.
    let mut tracer = Tracer::start_under(
        &["unshare", "--pid", "--fork", "--mount-proc"],
        &["-o", "ndjson", "-P", &port_arg, "--errno", "EADDRINUSE", "-d", "4s"],
        &[],
    );
    let _holder = clash(port);
    let event = tracer.wait_for("EADDRINUSE", |e| e["port"] == port);
    let diagnosis = tracer.diagnosis_of(&event);
    assert_not_visible_never_absent(&diagnosis, "own PID namespace");
    let finished = tracer.wait();
    assert!(finished.status.success(), "{:?} {}", finished.status, finished.stderr);
    let warnings: Vec<&str> = finished.stderr.lines().filter(|l| l.contains("own PID namespace")).collect();
    assert_eq!(warnings.len(), 1, "said once: {}", finished.stderr);
    assert!(warnings[0].contains("--pid=host"), "{}", warnings[0]);
}

#[test]
fn a_tracefs_mounted_to_attach_is_not_left_mounted() {
    if !can_load_probe("a_tracefs_mounted_to_attach_is_not_left_mounted") {
        return;
    }
    if !offered_backends().contains(&"tracepoint") {
        panic!("the syscall tracepoints exist on every supported kernel, yet --check does not offer them");
    }
    let port = free_port();
    // A private mount namespace without tracefs stands in for a host that never mounted it.
    let script = format!(
        "while umount /sys/kernel/tracing 2>/dev/null; do :; done; \
         mountpoint -q /sys/kernel/tracing && {{ echo 'tracefs still mounted'; exit 3; }}; \
         \"$0\" --attach tracepoint -o ndjson -P {port} -n 1 -d 30s || exit $?; \
         mountpoint -q /sys/kernel/tracing && echo LEFT-MOUNTED || echo NOT-MOUNTED"
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script, BINDTRACE])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    // Binds until bindtrace has seen one (-n 1) and the script has ended.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() && std::time::Instant::now() < deadline {
        drop(TcpListener::bind(("127.0.0.1", port)));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("attached (tracepoint)"), "{stderr}");
    let bind = stdout.lines().find(|l| l.contains("\"type\":\"bind\"")).unwrap_or_else(|| panic!("{stdout}"));
    let bind: Value = serde_json::from_str(bind).expect("json");
    assert_eq!(bind["port"], port);
    assert_eq!(stdout.lines().last(), Some("NOT-MOUNTED"), "{stdout}");
}
