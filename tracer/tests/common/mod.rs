//! Harness for the integration tests: runs the real `bindtrace` binary, which loads the real
//! probe into this kernel, and makes real binds from this process and from forked children.
#![allow(dead_code)]

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

mod tools;
#[allow(unused_imports)] // not every test binary runs these programs
pub(crate) use tools::*;

pub(crate) const BINDTRACE: &str = env!("CARGO_BIN_EXE_bindtrace");
/// Every backend, in the order `--attach auto` tries them.
pub(crate) const BACKENDS: [&str; 3] = ["fexit", "kprobe", "tracepoint"];

/// The backends `bindtrace --check` says this kernel accepts, in auto's order.
pub(crate) fn offered_backends() -> Vec<&'static str> {
    let out = Command::new(BINDTRACE).arg("--check").output().expect("run bindtrace --check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let offered: Vec<&str> =
        BACKENDS.into_iter().filter(|b| text.lines().any(|l| l == format!("hook {b}: yes"))).collect();
    assert!(!offered.is_empty(), "--check found no working hook:\n{text}");
    offered
}
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// True when the probe can be loaded. Otherwise says why on stderr, and fails the test when
/// `BINDTRACE_REQUIRE_ROOT` is set (`cargo xtask test` sets it when run as root, and CI runs
/// as root), so a kernel test never passes without having run.
pub(crate) fn can_load_probe(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some() {
        panic!("{test}: needs root to load the probe, and BINDTRACE_REQUIRE_ROOT is set");
    }
    eprintln!("SKIPPED {test}: needs root (CAP_BPF) to load the probe; run the tests with sudo");
    false
}

pub(crate) struct Tracer {
    pub child: Child,
    /// stdout lines not read yet; dropping it closes the pipe after the next line.
    pub lines: Receiver<String>,
    seen: Vec<String>,
    pub stderr: Receiver<String>,
    /// The backend bindtrace said it attached ("attached (tracepoint); ...").
    pub backend: String,
    /// stderr lines up to and including "attached", kept for [`Finished::stderr`].
    early_stderr: Vec<String>,
}

pub(crate) struct Finished {
    pub status: ExitStatus,
    /// Every stdout line, in order.
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Finished {
    /// The report on a bind event, if any: on the event itself, or in the `diagnosis` record
    /// that followed it (a success's report comes unannounced; all are in once stopped).
    pub(crate) fn report_on(&self, event: &Value) -> Option<Value> {
        if event["diagnosis"].is_object() {
            return Some(event["diagnosis"].clone());
        }
        self.json()
            .into_iter()
            .find(|r| r["type"] == "diagnosis" && r["seq"] == event["seq"])
            .map(|r| r["diagnosis"].clone())
    }

    pub(crate) fn json(&self) -> Vec<Value> {
        self.lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line is not JSON ({e}): {l}")))
            .collect()
    }

    pub(crate) fn binds(&self) -> Vec<Value> {
        self.json().into_iter().filter(|v| v["type"] == "bind").collect()
    }

    pub(crate) fn summary(&self) -> Value {
        let json = self.json();
        let last = json.last().cloned().unwrap_or(Value::Null);
        assert_eq!(last["type"], "summary", "last line is the summary record: {:?}", self.lines.last());
        last
    }
}

/// `bindtrace ARGS` with no stdin and both outputs piped to the test.
fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    spawn_under(&[], args, env)
}

/// `WRAPPER... bindtrace ARGS` (`setpriv ...`, `unshare ...`): bindtrace is the wrapper's
/// last argument before its own.
fn spawn_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = Command::new(program);
            command.args(rest).arg(BINDTRACE);
            command
        }
        None => Command::new(BINDTRACE),
    };
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bindtrace")
}

fn spawn_line_reader<R: std::io::Read + Send + 'static>(reader: R) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Tracer {
    /// Starts `bindtrace ARGS` and returns once it says it is attached.
    pub(crate) fn start(args: &[&str]) -> Tracer {
        Self::start_with_env(args, &[])
    }

    /// [`Tracer::start`] with extra environment variables.
    pub(crate) fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Tracer {
        Self::start_under(&[], args, env)
    }

    /// [`Tracer::start`] run by a wrapper (see [`spawn_under`]).
    pub(crate) fn start_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Tracer {
        let mut child = spawn_under(wrapper, args, env);
        let lines = spawn_line_reader(child.stdout.take().expect("stdout"));
        let stderr = spawn_line_reader(child.stderr.take().expect("stderr"));
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        let mut early = Vec::new();
        let backend = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stderr.recv_timeout(left) {
                Ok(line) if line.contains("attached") => {
                    let named = line.split_once("attached (").and_then(|(_, rest)| rest.split_once(')'));
                    early.push(line.clone());
                    break named.map(|(backend, _)| backend.to_owned()).unwrap_or_default();
                }
                Ok(line) => early.push(line),
                Err(_) => {
                    let _ = child.kill();
                    panic!("bindtrace did not attach within {ATTACH_TIMEOUT:?}; stderr: {early:?}");
                }
            }
        };
        assert!(BACKENDS.contains(&backend.as_str()), "bindtrace named no known backend: {backend:?}");
        Tracer { child, lines, seen: Vec::new(), stderr, backend, early_stderr: early }
    }

    /// The `fd` an event of a bind(2) on `fd` carries: every backend sees bind(2) with its fd
    /// (the tracepoints, or fexit/kprobe on `__sys_bind`, which every supported kernel has; a
    /// backend without that hook warns "inet binds only", and then these checks fail).
    pub(crate) fn event_fd(&self, fd: i64) -> i64 {
        fd
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a bind event matching `pred` (the events come live, while the tracer runs).
    pub(crate) fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_record(what, |v| v["type"] == "bind" && pred(v))
    }

    /// The diagnosis of a failed bind event: on the event, or, when it says
    /// `diagnosis_follows`, in the `diagnosis` record with its `seq` (waited for). An event
    /// with neither fails the test.
    pub(crate) fn diagnosis_of(&mut self, event: &Value) -> Value {
        if event["diagnosis"].is_object() {
            return event["diagnosis"].clone();
        }
        assert_eq!(event["diagnosis_follows"], true, "a failed bind carries a diagnosis or its promise: {event}");
        let seq = event["seq"].clone();
        let record =
            self.wait_for_record("the diagnosis that follows", |v| v["type"] == "diagnosis" && v["seq"] == seq);
        assert!(record["diagnosis"].is_object(), "{record}");
        record["diagnosis"].clone()
    }

    /// Waits for any NDJSON record matching `pred`.
    pub(crate) fn wait_for_record(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let matches = |line: &String| serde_json::from_str::<Value>(line).ok().filter(&pred);
        if let Some(found) = self.seen.iter().find_map(matches) {
            return found;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = matches(&line);
                    self.seen.push(line);
                    if let Some(found) = found {
                        return found;
                    }
                }
                Err(_) => panic!("no event for {what} within {EVENT_TIMEOUT:?}; got {:#?}", self.seen),
            }
        }
    }

    /// Sends SIGINT and collects everything.
    pub(crate) fn stop(self) -> Finished {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Drops the reader of stdout: like `| head` going away, the pipe closes after the next line.
    pub(crate) fn close_stdout(&mut self) {
        let (_, closed) = mpsc::channel();
        self.lines = closed;
        drop(self.child.stdout.take());
    }

    /// Waits for the tracer to end on its own (--count, --duration).
    pub(crate) fn wait(mut self) -> Finished {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("bindtrace did not exit within {EXIT_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut lines = std::mem::take(&mut self.seen);
        lines.extend(self.lines.iter());
        let mut stderr = std::mem::take(&mut self.early_stderr);
        stderr.extend(self.stderr.iter());
        Finished { status, lines, stderr: stderr.join("\n") }
    }
}

/// A test that fails mid-way must not leave its tracer attached (it would slow everything
/// after it): the tracer is killed when the handle goes away unfinished.
impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs bindtrace to completion with no stdin, returning (status, stdout, stderr).
pub(crate) fn run_to_end(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = spawn(args, &[]);
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read stdout");
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    (child.wait().expect("wait"), stdout, stderr)
}

/// A TCP port that was free a moment ago (the kernel picked it), to request explicitly.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("ephemeral port")
}

pub(crate) fn my_pid() -> u32 {
    std::process::id()
}

pub(crate) fn my_tid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// The calling thread's name as the kernel has it (the test harness names threads after
/// the tests).
pub(crate) fn my_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm").expect("comm").trim_end().to_owned()
}

/// What a forked child does: optionally enter a new network namespace, optionally drop to
/// `uid`, optionally bind and listen on `addr` first (a holder), then bind `addr` with a new
/// socket, stay alive for `linger` (so its process and namespace can be looked up), and exit
/// with that bind's errno (0 on success).
pub(crate) struct ChildPlan {
    pub addr: SocketAddr,
    /// SOCK_STREAM (the default) or SOCK_DGRAM.
    pub sock_type: i32,
    pub uid: Option<u32>,
    pub new_netns: bool,
    /// A network namespace file to enter first (`/run/netns/NAME`).
    pub join_netns: Option<std::ffi::CString>,
    /// A cgroup's `cgroup.procs` to move into first.
    pub join_cgroup: Option<std::ffi::CString>,
    pub hold_first: bool,
    /// A socket option set on every socket before its bind (`SO_REUSEPORT`, `SO_REUSEADDR`).
    pub reuse: Option<i32>,
    /// `setsid` first: a process started apart, as from another shell.
    pub new_session: bool,
    /// Bind an AF_UNIX stream socket to this path instead of `addr`.
    pub unix_path: Option<std::ffi::CString>,
    pub linger: Duration,
}

impl ChildPlan {
    pub(crate) fn bind(addr: SocketAddr) -> Self {
        ChildPlan {
            addr,
            sock_type: libc::SOCK_STREAM,
            uid: None,
            new_netns: false,
            join_netns: None,
            join_cgroup: None,
            hold_first: false,
            reuse: None,
            new_session: false,
            unix_path: None,
            linger: Duration::ZERO,
        }
    }
}

pub(crate) struct ForkedChild {
    pub pid: u32,
}

impl ForkedChild {
    /// Waits for the child and returns the errno of its bind.
    pub(crate) fn wait(self) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for our own child, into a local.
        unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child did not exit normally");
        let code = libc::WEXITSTATUS(status);
        assert!(code < 200, "child setup failed with {code}");
        code
    }
}

/// `addr` as a sockaddr for bind(2), and its length.
fn raw_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: all-zero is a valid sockaddr_storage; the family's own struct is written over it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sa) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sa) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as u32)
}

/// Forks the child of `plan`. It runs only raw syscalls between fork and _exit: this process
/// has other threads, so nothing that allocates or locks may run there.
pub(crate) fn spawn_child(plan: ChildPlan) -> ForkedChild {
    let (sockaddr, len, family) = match &plan.unix_path {
        Some(path) => {
            // SAFETY: all-zero is a valid sockaddr_storage; sockaddr_un is written over it.
            let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            // SAFETY: all-zero is a valid sockaddr_un.
            let mut un: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            un.sun_family = libc::AF_UNIX as u16;
            let bytes = path.as_bytes();
            assert!(bytes.len() < un.sun_path.len(), "path too long");
            for (to, from) in un.sun_path.iter_mut().zip(bytes) {
                *to = *from as libc::c_char;
            }
            // SAFETY: sockaddr_storage is larger than sockaddr_un and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), un) };
            (storage, (2 + bytes.len() + 1) as u32, libc::AF_UNIX)
        }
        None => {
            let (sockaddr, len) = raw_sockaddr(plan.addr);
            (sockaddr, len, if plan.addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 })
        }
    };
    let linger = libc::timespec { tv_sec: plan.linger.as_secs() as i64, tv_nsec: plan.linger.subsec_nanos() as i64 };
    let one: libc::c_int = 1;
    // SAFETY: the child only makes raw syscalls and `_exit`s (no allocation, no locks): safe
    // after fork in a threaded test binary.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: see the fork; every pointer passed is to a local or to `plan`, alive here.
        unsafe {
            // The fds this test binary had at the fork are other tests' sockets (the tests run
            // in parallel): a child that kept them would be one more holder of a listener
            // another test hands to its own process and expects named (a CI run saw it).
            // The child opens whatever it uses itself.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let set_reuse = |fd: libc::c_int| match plan.reuse {
                Some(option) => {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        option,
                        (&raw const one).cast(),
                        std::mem::size_of::<libc::c_int>() as u32,
                    ) == 0
                }
                None => true,
            };
            if plan.new_session && libc::setsid() < 0 {
                libc::_exit(206);
            }
            if plan.new_netns && libc::unshare(libc::CLONE_NEWNET) != 0 {
                libc::_exit(202);
            }
            if let Some(path) = &plan.join_netns {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    libc::_exit(204);
                }
            }
            if let Some(procs) = &plan.join_cgroup {
                // "0" moves the writing process itself.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(205);
                }
            }
            if let Some(uid) = plan.uid {
                if libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                {
                    libc::_exit(200);
                }
            }
            if plan.hold_first {
                let holder = libc::socket(family, plan.sock_type, 0);
                if holder < 0
                    || !set_reuse(holder)
                    || libc::bind(holder, (&raw const sockaddr).cast(), len) != 0
                    || (plan.sock_type == libc::SOCK_STREAM && libc::listen(holder, 1) != 0)
                {
                    libc::_exit(203);
                }
            }
            let fd = libc::socket(family, plan.sock_type, 0);
            if fd < 0 || !set_reuse(fd) {
                libc::_exit(201);
            }
            let rc = libc::bind(fd, (&raw const sockaddr).cast(), len);
            let errno = if rc == 0 { 0 } else { *libc::__errno_location() };
            libc::nanosleep(&linger, std::ptr::null_mut());
            libc::_exit(errno);
        }
    }
    ForkedChild { pid: pid as u32 }
}

/// Forks a child that (optionally) drops to `uid`, binds a TCP socket to `addr` and exits
/// with the bind's errno. Returns (child pid, errno).
pub(crate) fn bind_in_child(addr: SocketAddr, uid: Option<u32>) -> (u32, i32) {
    let child = spawn_child(ChildPlan { uid, ..ChildPlan::bind(addr) });
    let pid = child.pid;
    (pid, child.wait())
}

/// Starts `sleep 60` holding `socket` as its fd 3 (a holder process with a known comm and
/// command line); the test's own copy is closed.
pub(crate) fn hand_to_sleep(socket: socket2::Socket) -> std::process::Child {
    hand_to_sleep_as(socket, None)
}

/// [`hand_to_sleep`], the sleep running as `uid` (and as that gid) when given.
pub(crate) fn hand_to_sleep_as(socket: socket2::Socket, uid: Option<u32>) -> std::process::Child {
    use std::os::unix::process::CommandExt as _;
    let fd = socket.as_raw_fd();
    let mut command = Command::new("sleep");
    command.arg("60").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    // SAFETY: dup2 and fcntl are async-signal-safe. dup2's copy has no CLOEXEC, so sleep
    // inherits it; when the socket already is fd 3, dup2 is a no-op and the flag is cleared.
    unsafe {
        command.pre_exec(move || {
            let rc = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn sleep");
    drop(socket);
    child
}

/// Runs `bindtrace who ARGS -o ndjson` and returns (exit code, records).
pub(crate) fn who(args: &[&str]) -> (Option<i32>, Vec<Value>) {
    let mut all = vec!["who"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "ndjson"]);
    let (status, stdout, stderr) = run_to_end(&all);
    let records = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("who printed non-JSON ({e}): {l}; stderr {stderr}")))
        .collect();
    (status.code(), records)
}

/// Does a diagnosis name `pid` among its first holder's processes? Every process with the
/// socket open is a holder: a sibling test's fork that inherited the socket while it was open
/// in this process (tests run in parallel threads) is named too, and may come first.
pub(crate) fn first_holder_names(diagnosis: &Value, pid: u32) -> bool {
    diagnosis["holders"][0]["processes"].as_array().is_some_and(|processes| processes.iter().any(|p| p["pid"] == pid))
}

pub(crate) fn raw_fd(socket: &socket2::Socket) -> i64 {
    socket.as_raw_fd() as i64
}
