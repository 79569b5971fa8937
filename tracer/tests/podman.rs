//! podman for real: Debian's podman, rootful, with its API service (started here when it is
//! not running), containers on both sides of a conflict, and everything removed at the end.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const SOCKET: &str = "/run/podman/podman.sock";

/// This machine's hard RLIMIT_NOFILE (20,000) and NPROC are below what podman asks the
/// runtime to set by default, and it may not raise them (no CAP_SYS_RESOURCE): containers are
/// given limits under them.
const ULIMITS: [&str; 4] = ["--ulimit", "nofile=1024:4096", "--ulimit", "nproc=4096:4096"];

struct Podman {
    /// The API service, when this test started it.
    service: Option<Child>,
    dir: PathBuf,
    image: String,
    containers: Vec<String>,
}

impl Podman {
    fn start(test: &str) -> Option<Self> {
        if !answers("podman", &["--version"]) {
            let why = "podman is not installed (cargo xtask test installs it)";
            assert!(std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_none(), "{test}: {why}");
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        let tag = std::process::id();
        let dir = std::env::temp_dir().join(format!("bindtrace-podman-{tag}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut this =
            Self { service: None, dir, image: format!("localhost/bindtrace-podman-{tag}:1"), containers: Vec::new() };
        // A socket file left by an earlier run that was killed answers nothing: only one
        // that accepts a connection is a running service.
        if std::os::unix::net::UnixStream::connect(SOCKET).is_err() {
            let _ = std::fs::remove_file(SOCKET);
            std::fs::create_dir_all("/run/podman").expect("/run/podman");
            let log = std::fs::File::create(this.dir.join("service.log")).expect("log");
            let service = Command::new("podman")
                .args(["system", "service", "--time=0", &format!("unix://{SOCKET}")])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("podman system service");
            this.service = Some(service);
            wait_until("podman's API socket", Duration::from_secs(30), || Path::new(SOCKET).exists());
        }
        import_busybox_image_with("podman", &this.dir.join("root"), &this.image, &[]);
        Some(this)
    }

    /// `podman run -d --name NAME ARGS...` (with [`ULIMITS`]), remembered for removal.
    fn run_detached(&mut self, name: &str, args: &[&str]) {
        self.containers.push(name.to_owned());
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(&ULIMITS);
        all.extend_from_slice(args);
        run_ok("podman", &all);
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = run("podman", &["rm", "-f", "-t", "0", name]);
        }
        let _ = run("podman", &["rmi", "-f", &self.image]);
        if let Some(service) = &mut self.service {
            // SAFETY: kill has no memory preconditions; the pid is a process this code started.
            unsafe { libc::kill(service.id() as i32, libc::SIGTERM) };
            let _ = service.wait();
            let _ = std::fs::remove_file(SOCKET);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tcp() -> Socket {
    Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket")
}

/// A port a podman container publishes: conmon holds it (and netavark's DNAT rules forward
/// it); a host process's failure there names the container, through podman's API, with
/// `podman stop` as the advice, and `who` lists it. A podman container whose bind fails on a
/// host process's port is named as the failing side.
#[test]
fn podman_containers_are_named_on_both_sides_of_a_conflict() {
    let test = "podman_containers_are_named_on_both_sides_of_a_conflict";
    if !can_load_probe(test) {
        return;
    }
    let Some(mut podman) = Podman::start(test) else { return };
    let (published, held) = (free_port(), free_port());
    let tag = std::process::id();
    let (web, blocked) = (format!("bindtrace-pm-web-{tag}"), format!("bindtrace-pm-blocked-{tag}"));
    let image = podman.image.clone();
    podman.run_detached(&web, &["-p", &format!("{published}:80"), &image, "sleep", "300"]);
    let mut tracer = Tracer::start_with_env(
        &["-o", "ndjson", "-P", &format!("{published},{held}")],
        &[("RUST_LOG", "bindtrace::enrich=debug")],
    );

    // The host's side: its bind fails on the published port.
    let err = tcp().bind(&SockAddr::from(SocketAddr::from(([0, 0, 0, 0], published)))).expect_err("published");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let event = tracer.wait_for("the host's bind", |e| e["pid"] == my_pid() && e["port"] == published);
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["kind"], "in_use", "{d}");
    let process = &d["holders"][0]["processes"][0];
    assert_eq!(process["comm"], "conmon", "{d}");
    assert_eq!(process["container"]["name"], web.as_str(), "conmon is named as its container's: {d}");
    assert_eq!(process["container"]["runtime"], "podman", "{d}");
    let summary = d["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(&format!("podman container {web}")), "{summary}");
    assert!(summary.contains(&format!("podman stop {web}")), "{summary}");

    // The container's side: its bind fails on a port a host process holds.
    let listener = tcp();
    listener.bind(&SockAddr::from(SocketAddr::from(([0, 0, 0, 0], held)))).expect("bind");
    listener.listen(4).expect("listen");
    let mut sleep = hand_to_sleep(listener);
    let mut args = vec!["run", "--name", &blocked, "--network", "host"];
    args.extend_from_slice(&ULIMITS);
    let held_text = held.to_string();
    args.extend_from_slice(&[&image, "nc", "-l", "-p", &held_text]);
    podman.containers.push(blocked.clone());
    let out = run("podman", &args);
    assert!(!out.status.success(), "nc cannot listen on a held port");
    let event = tracer.wait_for("the container's bind", |e| e["port"] == held && e["comm"] == "nc");
    assert_eq!(event["errno"], libc::EADDRINUSE, "{event}");
    if event["container"].is_null() {
        let finished = tracer.stop();
        panic!("{event}\n{}", finished.stderr.lines().filter(|l| l.contains("lookup")).collect::<Vec<_>>().join("\n"));
    }
    assert_eq!(event["container"]["runtime"], "podman", "{event}");
    assert_eq!(event["container"]["name"], blocked.as_str(), "{event}");
    let d = tracer.diagnosis_of(&event);
    assert!(first_holder_names(&d, sleep.id()), "the host's sleep holds it: {d}");
    let _ = sleep.kill();
    let _ = sleep.wait();
    tracer.stop();

    let (code, records) = who(&[&format!("{published}/tcp")]);
    assert_eq!(code, Some(0));
    let record = &records[0];
    let names: Vec<&Value> =
        record["published_by"].as_array().into_iter().flatten().map(|p| &p["container"]["name"]).collect();
    assert!(names.iter().any(|n| *n == web.as_str()), "published by the container: {record}");
    let forwarded = record["forwarded_by"].as_array().unwrap_or_else(|| panic!("netavark's DNAT rules: {record}"));
    assert!(forwarded.iter().any(|c| c["containers"][0]["name"] == web.as_str()), "{record}");
}
