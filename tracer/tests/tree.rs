//! `bindtrace -- CMD` and `--tree PID` with the real probe: the command's whole process tree
//! (children, grandchildren, a daemon left behind, an exec chain, threads) and nothing else,
//! CMD's exit status and signals, the terminal's Ctrl-C, the sudo user, and a running
//! process's tree. Each test runs under every backend `bindtrace --check` offers.

mod common;

use std::{
    io::Read as _,
    os::{
        fd::FromRawFd as _,
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// `python3 bind.py PORT [--thread] [--hold SECONDS]`: one TCP bind of 127.0.0.1:PORT with
/// SO_REUSEADDR (so that the unrelated binder's binds of the same port succeed too), in a
/// thread of its own with `--thread`; with `--hold`, listening that long first.
const BIND_PY: &str = r#"import socket, sys, threading, time
def bind(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        print(f"bind {port}: {e}", file=sys.stderr)
        sys.exit(1)
    return s
port = int(sys.argv[1])
if "--thread" in sys.argv:
    t = threading.Thread(target=bind, args=(port,))
    t.start()
    t.join()
elif "--hold" in sys.argv:
    s = bind(port)
    s.listen()
    time.sleep(float(sys.argv[sys.argv.index("--hold") + 1]))
else:
    bind(port)
"#;

/// The tree: $1 a child, $2 a grandchild, $3 a daemon (double fork; its parent is gone when
/// it binds), $4 an exec chain, $5 a thread of a child. Exits 3 once the daemon is done.
const TREE_SH: &str = r#"#!/bin/sh
dir=$(dirname "$0")
python3 "$dir/bind.py" "$1"
sh -c 'python3 "$0/bind.py" "$1"; true' "$dir" "$2"
sh -c '(sleep 0.3; python3 "$0/bind.py" "$1"; touch "$0/daemon-done") &' "$dir" "$3"
sh -c 'exec sh -c "exec python3 \"\$0/bind.py\" \"\$1\"" "$0" "$1"' "$dir" "$4"
python3 "$dir/bind.py" "$5" --thread
while [ ! -e "$dir/daemon-done" ]; do sleep 0.05; done
exit 3
"#;

struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bindtrace-tree-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::write(dir.join("bind.py"), BIND_PY).expect("bind.py");
        Self(dir)
    }

    fn script(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("script");
        std::process::Command::new("chmod").arg("755").arg(&path).status().expect("chmod");
        path
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn records(file: &str) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn binds(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["type"] == "bind").collect()
}

fn summary(records: &[Value]) -> &Value {
    let last = records.last().expect("records");
    assert_eq!(last["type"], "summary", "the summary is the last record");
    last
}

/// Binds `ports` with SO_REUSEADDR from this process (outside any traced tree) until
/// stopped: each is seen by the probe and dropped by its tree filter.
struct UnrelatedBinder {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UnrelatedBinder {
    fn start(ports: Vec<u16>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicU64::new(0));
        let (stop2, made2) = (stop.clone(), made.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                for &port in &ports {
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
                    socket.set_reuse_address(true).expect("SO_REUSEADDR");
                    if socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).is_ok() {
                        made2.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { stop, made, thread: Some(thread) }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.made.load(Ordering::Relaxed)
    }
}

impl Drop for UnrelatedBinder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_command_tree_is_traced_and_nothing_else() {
    if !can_load_probe("a_command_tree_is_traced_and_nothing_else") {
        return;
    }
    for backend in offered_backends() {
        let scratch = Scratch::new("whole");
        let script = scratch.script("tree.sh", TREE_SH);
        let file = scratch.path("events.ndjson");
        let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
        let port_args: Vec<String> = ports.iter().map(u16::to_string).collect();
        let unrelated = UnrelatedBinder::start(ports.clone());
        let mut args = vec!["--attach", backend, "--no-diagnosis", "--file", &file, "--"];
        let script_arg = script.display().to_string();
        args.push(&script_arg);
        args.extend(port_args.iter().map(String::as_str));
        let finished = Tracer::start(&args).wait();
        let unrelated_binds = unrelated.stop();
        assert_eq!(
            finished.status.code(),
            Some(3),
            "{backend}: bindtrace exits with CMD's status; {}",
            finished.stderr
        );
        let records = records(&file);
        let binds = binds(&records);
        assert!(unrelated_binds > 0, "the unrelated binder made no bind");
        let me = my_pid();
        assert!(binds.iter().all(|b| b["pid"] != me), "{backend}: a bind outside the tree was reported: {binds:?}");
        // (port, the depths it may have: `sh -c` may exec its last command itself).
        let expected: [(u16, &[u64]); 5] =
            [(ports[0], &[1]), (ports[1], &[2]), (ports[2], &[3]), (ports[3], &[1]), (ports[4], &[1])];
        for (port, depths) in expected {
            let found: Vec<&&Value> = binds.iter().filter(|b| b["port"] == port).collect();
            assert_eq!(found.len(), 1, "{backend}: one event for the tree's bind of {port}: {binds:?}");
            let bind = found[0];
            assert_eq!(bind["ok"], true, "{bind}");
            assert!(bind["depth"].as_u64().is_some_and(|d| depths.contains(&d)), "{backend}: depth {depths:?}: {bind}");
            assert!(bind["ppid"].as_u64().is_some_and(|p| p > 0), "{bind}");
        }
        let thread_bind = binds.iter().find(|b| b["port"] == ports[4]).expect("the thread's bind");
        assert_ne!(thread_bind["tid"], thread_bind["pid"], "the bind came from a thread: {thread_bind}");
        let daemon = binds.iter().find(|b| b["port"] == ports[2]).expect("the daemon's bind");
        let daemon_parent = daemon["ppid"].as_u64().expect("ppid") as u32;
        assert!(
            !Path::new(&format!("/proc/{daemon_parent}")).exists()
                || std::fs::read_to_string(format!("/proc/{daemon_parent}/comm")).is_ok_and(|c| c.trim() != "sh"),
            "the daemon's recorded parent (the subshell that forked it) is gone"
        );
        let summary = summary(&records);
        assert_eq!(summary["tree"]["exit_status"], 3, "{summary}");
        assert_eq!(summary["tree"]["ended"], "exited with status 3", "{summary}");
        assert_eq!(summary["tree"]["failed_processes"], serde_json::json!([]), "{summary}");
        // In the kernel: what was written is what the tree bound; the rest was filtered there.
        assert_eq!(summary["kernel"]["emitted"], binds.len() as u64, "{backend}: {summary}");
        assert!(
            summary["kernel"]["filtered"].as_u64().is_some_and(|f| f >= unrelated_binds / 2),
            "{backend}: the unrelated binds ({unrelated_binds}) were dropped in the kernel: {summary}"
        );
    }
}

#[test]
fn failed_and_port_filters_combine_with_the_tree() {
    if !can_load_probe("failed_and_port_filters_combine_with_the_tree") {
        return;
    }
    for backend in offered_backends() {
        let scratch = Scratch::new("filters");
        let (watched, other) = (free_port(), free_port());
        // A holder of `watched` (ok: filtered by -x), a second bind of it (EADDRINUSE: reported),
        // a failure on another port (filtered by -P).
        let script = scratch.script(
            "filters.sh",
            &format!(
                "#!/bin/sh\ndir=$(dirname \"$0\")\npython3 \"$dir/bind.py\" {watched} --hold 2 &\nsleep 0.5\n\
                 python3 \"$dir/bind.py\" {watched}\npython3 \"$dir/bind.py\" {other} --hold 2 &\nsleep 0.5\n\
                 python3 \"$dir/bind.py\" {other}\nwait\n"
            ),
        );
        let file = scratch.path("events.ndjson");
        let script_arg = script.display().to_string();
        let port_arg = watched.to_string();
        let finished = Tracer::start(&[
            "--attach",
            backend,
            "-x",
            "-P",
            &port_arg,
            "--no-diagnosis",
            "--file",
            &file,
            "--",
            &script_arg,
        ])
        .wait();
        assert_eq!(finished.status.code(), Some(0), "{}", finished.stderr);
        let records = records(&file);
        let binds = binds(&records);
        assert_eq!(binds.len(), 1, "{backend}: only the failure on {watched}: {binds:?}");
        assert_eq!(
            (binds[0]["port"].as_u64(), binds[0]["errno_name"].as_str()),
            (Some(u64::from(watched)), Some("EADDRINUSE"))
        );
        assert_eq!(binds[0]["depth"], 1);
        let failed = &summary(&records)["tree"]["failed_processes"];
        assert_eq!(failed.as_array().map(Vec::len), Some(1), "{failed}");
        assert_eq!(failed[0]["pid"], binds[0]["pid"]);
        assert_eq!(failed[0]["first_errno"], "EADDRINUSE");
        assert_eq!(failed[0]["first_address"], format!("127.0.0.1:{watched}"));
    }
}

#[test]
fn cmd_ends_the_trace_with_its_status_and_gets_the_signals() {
    if !can_load_probe("cmd_ends_the_trace_with_its_status_and_gets_the_signals") {
        return;
    }
    for backend in offered_backends() {
        // Killed by a signal: 128+N, as a shell says it.
        // bindtrace ends the same way after its summary: a shell sees 143, and a loop around it
        // stops as it would around CMD.
        let finished = Tracer::start(&["--attach", backend, "-o", "ndjson", "--", "sh", "-c", "kill -TERM $$"]).wait();
        assert_eq!(finished.status.signal(), Some(libc::SIGTERM), "{}", finished.stderr);
        assert!(finished.stderr.contains("\"exit_status\":143"), "{}", finished.stderr);
        // SIGTERM sent to bindtrace is CMD's: passed on, and the trace ends when CMD does.
        let scratch = Scratch::new("signals");
        let marker = scratch.path("got-term");
        let script = scratch.script(
            "trap.sh",
            &format!("#!/bin/sh\ntrap 'echo > {marker}; exit 7' TERM\nwhile true; do sleep 0.05; done\n"),
        );
        let script_arg = script.display().to_string();
        // In a session of its own: the SIGTERM comes from another process group, as a CI
        // runner's or another terminal's (one from bindtrace's own group is taken for a group
        // signal, which reached CMD already: sudo's rule).
        let tracer = Tracer::start_under(&["setsid"], &["--attach", backend, "-o", "ndjson", "--", &script_arg], &[]);
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: a signal to the child we started.
        unsafe { libc::kill(tracer.pid() as i32, libc::SIGTERM) };
        let finished = tracer.wait();
        assert_eq!(
            finished.status.code(),
            Some(7),
            "CMD's trap ran and its status is bindtrace's: {}",
            finished.stderr
        );
        assert!(Path::new(&marker).exists(), "CMD got the SIGTERM");
        assert!(finished.stderr.contains("\"type\":\"summary\""), "the summary was written: {}", finished.stderr);
        assert!(finished.lines.is_empty(), "nothing of bindtrace on stdout (CMD's): {:?}", finished.lines);
    }
}

/// A sudoers drop-in that lets uid 65534 run bindtrace as root, removed when dropped.
struct SudoRule(PathBuf);

impl SudoRule {
    fn allow_nobody() -> Self {
        let path = PathBuf::from(format!("/etc/sudoers.d/bindtrace-test-{}", std::process::id()));
        std::fs::write(&path, format!("nobody ALL=(root) NOPASSWD: {BINDTRACE}\n")).expect("sudoers drop-in");
        Command::new("chmod").arg("0440").arg(&path).status().expect("chmod");
        Self(path)
    }
}

impl Drop for SudoRule {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn cmd_runs_as_the_sudo_user_and_owns_stdout() {
    if !can_load_probe("cmd_runs_as_the_sudo_user_and_owns_stdout") {
        return;
    }
    if !answers("sudo", &["-V"]) {
        assert!(
            std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_none(),
            "sudo is not installed (cargo xtask test installs it)"
        );
        eprintln!("SKIPPED cmd_runs_as_the_sudo_user_and_owns_stdout: sudo is not installed");
        return;
    }
    for backend in offered_backends() {
        let scratch = Scratch::new("sudo");
        // The scratch dir must be readable by nobody for bind.py.
        Command::new("chmod").arg("755").arg(&scratch.0).status().expect("chmod");
        let script = scratch.script(
            "as-user.sh",
            "#!/bin/sh\nid -u\nid -g\necho \"$USER $HOME\"\npython3 \"$(dirname \"$0\")/bind.py\" 81\n",
        );
        let script_arg = script.display().to_string();
        let args = ["--attach", backend, "-o", "ndjson", "--no-diagnosis", "--", &script_arg];
        // Real sudo, run by uid 65534: it sets SUDO_UID and SUDO_GID and starts bindtrace.
        let rule = SudoRule::allow_nobody();
        let sudo = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sudo", "-n"];
        let finished = Tracer::start_under(&sudo, &args, &[]).wait();
        drop(rule);
        assert_eq!(finished.status.code(), Some(1), "the bind of port 81 failed as nobody: {}", finished.stderr);
        let home = nix_home_of_nobody();
        assert_eq!(
            finished.lines,
            vec!["65534".to_owned(), "65534".to_owned(), format!("nobody {home}")],
            "stdout is CMD's alone"
        );
        let events: Vec<Value> = finished
            .stderr
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        let bind = events.iter().find(|e| e["type"] == "bind" && e["port"] == 81).expect("the bind of port 81");
        assert_eq!((bind["uid"].as_u64(), bind["errno_name"].as_str()), (Some(65534), Some("EACCES")), "{bind}");
        assert!(finished.stderr.contains("as nobody (uid 65534)"), "{}", finished.stderr);

        // The same variables in a root shell (`sudo -i` passes them on): CMD stays root, said.
        let finished = Tracer::start_with_env(&args, &[("SUDO_UID", "65534"), ("SUDO_GID", "65534")]).wait();
        assert_eq!(finished.status.code(), Some(0), "root binds port 81: {}", finished.stderr);
        assert_eq!(finished.lines.first().map(String::as_str), Some("0"), "CMD ran as root");
        assert!(finished.stderr.contains("sudo did not start bindtrace"), "{}", finished.stderr);
    }
}

/// nobody's home in the user database (Debian: /nonexistent).
fn nix_home_of_nobody() -> String {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .and_then(|l| l.split(':').nth(5))
        .unwrap_or("")
        .to_owned()
}

#[test]
fn ctrl_c_from_the_terminal_is_cmds() {
    if !can_load_probe("ctrl_c_from_the_terminal_is_cmds") {
        return;
    }
    for backend in offered_backends() {
        let scratch = Scratch::new("ctrlc");
        let port = free_port();
        let ready = scratch.path("ready");
        // On SIGINT CMD binds once more and exits 0: the trace must still be running then.
        let script = scratch.script(
            "ctrlc.sh",
            &format!(
                "#!/bin/sh\ntrap 'python3 \"$(dirname \"$0\")/bind.py\" {port}; exit 0' INT\necho > {ready}\n\
                 while true; do sleep 0.05; done\n"
            ),
        );
        let file = scratch.path("events.ndjson");
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty fills two fds.
        let opened =
            unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
        assert_eq!(opened, 0, "openpty");
        let mut command = Command::new(BINDTRACE);
        command.args(["--attach", backend, "--no-diagnosis", "--file", &file, "--"]).arg(&script);
        // SAFETY: the slave fd is valid; each Stdio owns a dup of it.
        unsafe {
            command
                .stdin(Stdio::from_raw_fd(libc::dup(slave)))
                .stdout(Stdio::from_raw_fd(libc::dup(slave)))
                .stderr(Stdio::from_raw_fd(libc::dup(slave)))
                .pre_exec(|| {
                    // A session of its own, the pty its controlling terminal: the foreground
                    // process group gets the terminal's signals, as in a shell.
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // As a terminal's shell has them: a test run started in the background
                    // by a non-interactive shell inherits SIGINT ignored, and a shell cannot
                    // trap a signal ignored on entry (CI found it).
                    libc::signal(libc::SIGINT, libc::SIG_DFL);
                    libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                    Ok(())
                });
        }
        let mut child = command.spawn().expect("spawn bindtrace on a pty");
        // Its copies of the slave go too: the master reads EOF once bindtrace's are closed.
        drop(command);
        // SAFETY: our copy of the slave is no longer needed; the master is read below.
        unsafe { libc::close(slave) };
        // SAFETY: an fd opened here, owned by nothing else.
        let mut terminal = unsafe { std::fs::File::from_raw_fd(master) };
        let mut reader = terminal.try_clone().expect("master");
        let output = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = reader.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Path::new(&ready).exists() {
            assert!(Instant::now() < deadline, "CMD did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        std::io::Write::write_all(&mut terminal, b"\x03").expect("Ctrl-C");
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "bindtrace did not end after CMD did");
            std::thread::sleep(Duration::from_millis(20));
        };
        drop(terminal);
        let said = output.join().unwrap_or_default();
        assert_eq!(status.code(), Some(0), "CMD handled Ctrl-C and exited 0; bindtrace said: {said}");
        assert!(!said.contains("waiting for"), "Ctrl-C did not end the trace before CMD: {said}");
        let records = records(&file);
        assert!(
            binds(&records).iter().any(|b| b["port"] == port && b["ok"] == true),
            "{backend}: the bind CMD made on Ctrl-C was traced: {records:?}; {said}"
        );
        assert_eq!(summary(&records)["tree"]["exit_status"], 0);
    }
}

#[test]
fn tree_follows_a_running_process_and_what_it_starts() {
    if !can_load_probe("tree_follows_a_running_process_and_what_it_starts") {
        return;
    }
    for backend in offered_backends() {
        let scratch = Scratch::new("running");
        let go = scratch.path("go");
        let (early, late, own) = (free_port(), free_port(), free_port());
        // A child that exists before bindtrace (adopted from /proc), then on `go` a child
        // started afterwards and a bind of the root's own.
        let script = scratch.script(
            "running.sh",
            &format!(
                "#!/bin/sh\ndir=$(dirname \"$0\")\ngo={go}\n\
                 sh -c 'while [ ! -e \"$0\" ]; do sleep 0.05; done; python3 \"$1/bind.py\" {early}' \"$go\" \"$dir\" &\n\
                 while [ ! -e \"$go\" ]; do sleep 0.05; done\npython3 \"$dir/bind.py\" {late}\nwait\n\
                 exec python3 \"$dir/bind.py\" {own}\n"
            ),
        );
        let mut root = Command::new(&script).spawn().expect("the running process");
        std::thread::sleep(Duration::from_millis(300));
        let unrelated = UnrelatedBinder::start(vec![early, late, own]);
        let file = scratch.path("events.ndjson");
        let root_pid = root.id().to_string();
        let tracer = Tracer::start(&["--attach", backend, "--no-diagnosis", "--file", &file, "--tree", &root_pid]);
        std::fs::write(&go, "").expect("go");
        let finished = tracer.wait();
        let _ = root.wait();
        unrelated.stop();
        assert_eq!(finished.status.code(), Some(0), "the trace ends when the root exits: {}", finished.stderr);
        // The waiting child, and the `sleep`s of the moment.
        let adopted = finished
            .stderr
            .split_once(&format!("process {}, the ", root.id()))
            .and_then(|(_, rest)| rest.split_once(' '))
            .and_then(|(n, _)| n.parse::<u32>().ok());
        assert!(adopted.is_some_and(|n| n >= 1), "the child it had was adopted: {}", finished.stderr);
        let records = records(&file);
        let binds = binds(&records);
        assert!(binds.iter().all(|b| b["pid"] != my_pid()), "{backend}: a bind outside the tree: {binds:?}");
        for (port, depth) in [(early, 2), (late, 1), (own, 0)] {
            let bind =
                binds.iter().find(|b| b["port"] == port).unwrap_or_else(|| panic!("{backend}: {port}: {binds:?}"));
            assert_eq!(bind["depth"], depth, "{bind}");
        }
        let tree = &summary(&records)["tree"];
        assert_eq!(tree["root_pid"], root.id(), "{tree}");
        assert_eq!(tree["ended"], "exited", "{tree}");
        assert!(tree.get("exit_status").is_none(), "--tree's process is not bindtrace's to report on: {tree}");
    }
}
