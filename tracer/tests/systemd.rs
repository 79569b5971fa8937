//! A real systemd as PID 1: `systemd-nspawn -b` of a debootstrapped Debian (made by `cargo
//! xtask test`, `BINDTRACE_NSPAWN_ROOT`) on the host's network, in the cgroup systemd-machined
//! would give it (`machine.slice/machine-NAME.scope`; there is no machined on these hosts).
//! The sockets it holds for its socket units are named by their unit and `Listen*=` line, and
//! the advice is to stop the unit, never "stop it" (PID 1); its processes are named as the
//! machine's, and a service of its holding a port as that service, stopped in the machine.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// The root filesystem, once whole; `None` (said) when the tests run without it.
fn rootfs() -> Option<PathBuf> {
    let required = std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some();
    let Some(root) = std::env::var_os("BINDTRACE_NSPAWN_ROOT").map(PathBuf::from) else {
        assert!(!required, "BINDTRACE_NSPAWN_ROOT is not set: cargo xtask test makes the systemd root filesystem");
        eprintln!("SKIPPED: BINDTRACE_NSPAWN_ROOT names no systemd root filesystem (cargo xtask test makes one)");
        return None;
    };
    // xtask makes it while the tests build; it may still be downloading.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !root.join(".complete").exists() {
        assert!(Instant::now() < deadline, "the root filesystem at {} was not made in 10 minutes", root.display());
        std::thread::sleep(Duration::from_secs(1));
    }
    Some(root)
}

/// The cgroup v2 hierarchy's mount point.
fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        fs.starts_with("cgroup2 ").then(|| mount.split(' ').nth(4).map(PathBuf::from)).flatten()
    })
}

/// A booted systemd-nspawn machine, powered off when dropped, and its cgroup removed.
struct Machine {
    nspawn: Child,
    cgroup: PathBuf,
}

impl Machine {
    /// Boots `root` in `machine.slice/machine-NAME.scope` (nspawn with `--keep-unit` stays
    /// in the cgroup it is started in).
    fn boot(root: &Path, name: &str) -> Machine {
        use std::os::unix::process::CommandExt as _;
        let mount = cgroup2_mount().expect("a cgroup v2 hierarchy (the machine's cgroup names it)");
        let cgroup = mount.join("machine.slice").join(format!("machine-{name}.scope"));
        std::fs::create_dir_all(&cgroup).expect("the machine's cgroup");
        let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").display().to_string()).expect("path");
        let mut command = Command::new("systemd-nspawn");
        command
            .args(["--register=no", "--keep-unit", "--console=pipe", "-q", "-b", "-D"])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: open and write are async-signal-safe; "0" moves the writing process.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        let nspawn = command.spawn().expect("systemd-nspawn (apt-get install systemd-container)");
        Machine { nspawn, cgroup }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // nspawn turns SIGTERM into an orderly shutdown of the machine.
        // SAFETY: kill has no memory preconditions; the pid is a process this code started.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.nspawn.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        // The machine's systemd made groups below its own: removed deepest first.
        let _ =
            Command::new("find").arg(&self.cgroup).args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"]).status();
    }
}

/// A service of the machine listening on `port` (the host's static busybox, copied in).
fn install_service(root: &Path, name: &str, port: u16) {
    let units = root.join("etc/systemd/system");
    let wants = units.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants).expect("unit directories");
    let busybox = run_ok("sh", &["-c", "command -v busybox"]);
    std::fs::copy(busybox, root.join("usr/local/bin/busybox")).expect("busybox into the machine");
    std::fs::write(
        units.join(format!("{name}.service")),
        format!("[Service]\nExecStart=/usr/local/bin/busybox nc -ll -p {port} -e /bin/true\n\n[Install]\nWantedBy=multi-user.target\n"),
    )
    .expect("service unit");
    let link = wants.join(format!("{name}.service"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("/etc/systemd/system/{name}.service"), link).expect("enable");
}

/// Waits until `who PORT/tcp` finds a holder, and returns its records.
fn wait_held(port: u16) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, records) = who(&[&format!("{port}/tcp")]);
        if code == Some(0) {
            return records;
        }
        assert!(Instant::now() < deadline, "the machine did not listen on {port} in 90 s: {records:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A socket unit (and the service it starts) listening on 127.0.0.1:`port`, enabled.
fn install_socket_unit(root: &Path, name: &str, port: u16) {
    let units = root.join("etc/systemd/system");
    let wants = units.join("sockets.target.wants");
    std::fs::create_dir_all(&wants).expect("unit directories");
    std::fs::write(
        units.join(format!("{name}.socket")),
        format!("[Socket]\nListenStream=127.0.0.1:{port}\n\n[Install]\nWantedBy=sockets.target\n"),
    )
    .expect("socket unit");
    std::fs::write(units.join(format!("{name}.service")), "[Service]\nExecStart=/bin/sleep infinity\n")
        .expect("service unit");
    let link = wants.join(format!("{name}.socket"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("/etc/systemd/system/{name}.socket"), link).expect("enable");
}

/// Both sides: a host process's bind fails against a socket unit's port, and systemd's own
/// bind fails for a socket unit whose port a host process holds.
#[test]
fn a_socket_unit_is_named_and_never_its_manager() {
    if !can_load_probe("a_socket_unit_is_named_and_never_its_manager") {
        return;
    }
    let Some(root) = rootfs() else { return };
    let port = free_port();
    let unit = format!("bt-demo-{}", std::process::id());
    install_socket_unit(&root, &unit, port);
    // A second unit on a port this process holds: systemd's own bind fails at boot.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let held_port = held.local_addr().expect("addr").port();
    let clash = format!("bt-clash-{}", std::process::id());
    install_socket_unit(&root, &clash, held_port);
    // And a service holding a port of its own.
    let (web, web_port) = (format!("bt-web-{}", std::process::id()), free_port());
    install_service(&root, &web, web_port);
    let name = format!("bt{}", std::process::id());
    let mut starting = Tracer::start(&["-o", "ndjson", "-P", &held_port.to_string()]);
    let machine = Machine::boot(&root, &name);
    let failed = starting.wait_for("systemd's failed bind", |e| e["comm"] == "systemd" && e["errno"] == 98);
    let d = starting.diagnosis_of(&failed);
    let summary = d["summary"].as_str().unwrap_or_default();
    assert!(
        summary.starts_with(&format!(
            "systemd could not start {clash}.socket (ListenStream=127.0.0.1:{held_port}: the address is taken): port \
             {held_port}/tcp is held by pid {}",
            my_pid()
        )),
        "the unit being started, and the holder: {summary}"
    );
    assert_eq!(d["facts"]["starting_unit"]["name"], format!("{clash}.socket"), "{d}");
    starting.stop();
    drop(held);
    let records = wait_held(port);
    let summary = records[0]["summary"].as_str().unwrap_or_default().to_owned();
    let named =
        format!("(systemd) for {unit}.socket (ListenStream=127.0.0.1:{port}; it starts {unit}.service on demand)");
    assert!(summary.contains(&named), "who names the unit: {summary}");
    let process = &records[0]["holders"][0]["processes"][0];
    assert_eq!(process["socket_unit"]["name"], format!("{unit}.socket"), "{process}");
    assert_eq!(process["container"]["runtime"], "machine", "the machine's systemd is the machine's: {process}");
    assert_eq!(process["container"]["name"], name.as_str(), "{process}");

    // The machine's service holding a port: named as the service, in the machine.
    let records = wait_held(web_port);
    let process = &records[0]["holders"][0]["processes"][0];
    assert_eq!(process["container"]["name"], name.as_str(), "{process}");
    assert_eq!(process["unit"], format!("{web}.service"), "{process}");
    let summary = records[0]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(&format!("in machine {name} (its {web}.service)")), "{summary}");
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &web_port.to_string()]);
    let failed = std::net::TcpListener::bind(("::", web_port)).expect_err("the service holds the port");
    assert_eq!(failed.raw_os_error(), Some(libc::EADDRINUSE));
    let event = tracer.wait_for("the failed bind", |e| e["pid"] == my_pid() && e["errno"] == 98);
    let d = tracer.diagnosis_of(&event);
    let summary = d["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(&format!("systemctl -M {name} stop {web}.service")), "{summary}");
    tracer.stop();

    // A host process's bind fails there: the advice is the unit, in the machine; never PID 1.
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let failed = std::net::TcpListener::bind(("127.0.0.1", port)).expect_err("systemd holds the port");
    assert_eq!(failed.raw_os_error(), Some(libc::EADDRINUSE));
    let event = tracer.wait_for("the failed bind", |e| e["pid"] == my_pid() && e["errno"] == 98);
    let d = tracer.diagnosis_of(&event);
    let summary = d["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(&format!("systemctl stop {unit}.socket")), "{summary}");
    assert!(summary.contains(&format!("stopping {unit}.service does not free it")), "{summary}");
    assert!(!summary.contains("stop it"), "never the manager: {summary}");
    tracer.stop();
    drop(machine);
    for name in [&unit, &clash] {
        for file in [format!("{name}.socket"), format!("{name}.service"), format!("sockets.target.wants/{name}.socket")]
        {
            let _ = std::fs::remove_file(root.join("etc/systemd/system").join(file));
        }
    }
    for file in [format!("{web}.service"), format!("multi-user.target.wants/{web}.service")] {
        let _ = std::fs::remove_file(root.join("etc/systemd/system").join(file));
    }
    let _ = std::fs::remove_file(root.join("usr/local/bin/busybox"));
}
