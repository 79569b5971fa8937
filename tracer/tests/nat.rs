//! Ports claimed by NAT rules, not (only) by sockets: nftables rules this test writes (and
//! removes), and a real dockerd started with `--userland-proxy=false` on a bridge and in
//! directories of its own, stopped and removed at the end.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Output},
    time::Duration,
};

use common::*;
use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The records of `bindtrace who ARGS -o ndjson` with `env`, and its exit code.
fn who_with(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, Vec<Value>, String) {
    let out: Output = Command::new(BINDTRACE)
        .arg("who")
        .args(args)
        .args(["-o", "ndjson"])
        .envs(env.iter().copied())
        .output()
        .expect("run bindtrace who");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let records = stdout.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    (out.status.code(), records, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Is `nft` here? Under `cargo xtask test` (which installs nftables) it must be.
fn nft_installed(test: &str) -> bool {
    if answers("nft", &["--version"]) {
        return true;
    }
    assert!(
        std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_none(),
        "{test}: nft is not installed (cargo xtask test installs nftables)"
    );
    eprintln!("SKIPPED {test}: nft is not installed (apt-get install nftables)");
    false
}

/// An nftables table of this test's, deleted on drop.
struct NftTable(String);

impl NftTable {
    fn add(name: &str, body: &str) -> Self {
        let script = format!("table ip {name} {{\n{body}\n}}\n");
        let mut child = Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().expect("nft");
        use std::io::Write as _;
        child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write the rules");
        assert!(child.wait().expect("nft").success(), "nft refused:\n{script}");
        Self(name.to_owned())
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = run("nft", &["delete", "table", "ip", &self.0]);
    }
}

/// A port that only a DNAT rule claims: `who` names the rule and where it sends the
/// traffic; a bind there succeeds and is told it will never see that traffic; a failure on
/// a port a rule also claims says so.
#[test]
fn a_port_claimed_by_a_dnat_rule_is_named_with_the_rule() {
    if !can_load_probe("a_port_claimed_by_a_dnat_rule_is_named_with_the_rule")
        || !nft_installed("a_port_claimed_by_a_dnat_rule_is_named_with_the_rule")
    {
        return;
    }
    let (port, held) = (free_port(), free_port());
    let table = NftTable::add(
        &format!("bindtrace_nat_{}", std::process::id()),
        &format!(
            "chain pre {{ type nat hook prerouting priority dstnat; policy accept;
               tcp dport {{ {port}, {held} }} dnat to 192.0.2.10:8080 comment \"hostPort web\"; }}
             chain out {{ type nat hook output priority -100; policy accept;
               ip daddr 127.0.0.1 tcp dport {port} dnat to 192.0.2.10:8080; }}"
        ),
    );
    let (code, records, stderr) = who_with(&[&format!("{port}/tcp")], &[]);
    assert_eq!(code, Some(0), "a port NAT claims is taken: {records:?} {stderr}");
    let record = &records[0];
    let summary = record["summary"].as_str().unwrap_or_default();
    assert!(summary.starts_with(&format!("no socket holds port {port}/tcp, but NAT takes its traffic")), "{summary}");
    assert!(summary.contains("\"hostPort web\"") && summary.contains("192.0.2.10:8080"), "{summary}");
    let forwarded = record["forwarded_by"].as_array().expect("forwarded_by");
    assert_eq!(forwarded.len(), 2, "{record}");
    assert!(forwarded.iter().any(|c| c["hook"] == "prerouting" && c["to"][0] == "192.0.2.10:8080"), "{record}");

    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &format!("{port},{held}")]);
    let own = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    own.bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], port)))).expect("nothing holds the port");
    let bound = tracer.wait_for("the bind", |e| e["pid"] == my_pid() && e["port"] == port && e["ok"] == true);
    // A holder of the other port, then a failure there.
    let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    listener.bind(&SockAddr::from(SocketAddr::from(([0, 0, 0, 0], held)))).expect("bind");
    listener.listen(4).expect("listen");
    let mut sleep = hand_to_sleep(listener);
    let failing = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let err = failing.bind(&SockAddr::from(SocketAddr::from(([0, 0, 0, 0], held)))).expect_err("in use");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let failure = tracer.wait_for("the failure", |e| e["port"] == held && e["errno"] == libc::EADDRINUSE);
    let d = tracer.diagnosis_of(&failure);
    let _ = sleep.kill();
    let _ = sleep.wait();
    assert_eq!(d["kind"], "in_use", "{d}");
    assert!(d["summary"].as_str().is_some_and(|s| s.contains("; also, a NAT rule \"hostPort web\"")), "{d}");
    assert_eq!(d["facts"]["forwarded_by"][0]["to"][0], "192.0.2.10:8080", "{d}");
    let finished = tracer.stop();
    drop(table);

    let report = finished.report_on(&bound).unwrap_or_else(|| panic!("no report on {bound}"));
    assert_eq!(report["kind"], "port_forwarded", "{report}");
    let summary = report["summary"].as_str().unwrap_or_default();
    // Bound to 127.0.0.1: only this host's own connections could reach it, and the output
    // chain's rule takes them.
    assert!(summary.contains("from this host never reach this socket"), "{summary}");
    assert_eq!(report["facts"]["forwarded_by"][0]["chains"][0], "out", "{report}");
}

/// A dockerd of this test's own: its socket, directories and bridge.
struct PrivateDocker {
    daemon: Child,
    dir: PathBuf,
    bridge: String,
    host: String,
    image: String,
    containers: Vec<String>,
}

impl PrivateDocker {
    fn start(flags: &[&str]) -> Self {
        let tag = std::process::id();
        let dir = std::env::temp_dir().join(format!("bindtrace-nat-docker-{tag}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let bridge = format!("btnat{}", tag % 100_000);
        run_ok("ip", &["link", "add", &bridge, "type", "bridge"]);
        run_ok("ip", &["addr", "add", "10.213.7.1/24", "dev", &bridge]);
        run_ok("ip", &["link", "set", &bridge, "up"]);
        let path = |name: &str| dir.join(name).display().to_string();
        let host = format!("unix://{}", path("docker.sock"));
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("log");
        let daemon = Command::new("dockerd")
            .args(["-H", &host, "--data-root", &path("data"), "--exec-root", &path("exec")])
            .args(["--pidfile", &path("docker.pid"), "--bridge", &bridge])
            .args(flags)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let mut this =
            Self { daemon, dir, bridge, host, image: format!("bindtrace-nat-{tag}:1"), containers: Vec::new() };
        wait_until("dockerd answers", Duration::from_secs(60), || {
            Command::new(docker_bin())
                .args(["info"])
                .env("DOCKER_HOST", &this.host)
                .output()
                .is_ok_and(|o| o.status.success())
        });
        let env = [("DOCKER_HOST", this.host.as_str())];
        import_busybox_image(&this.dir.join("root"), &this.image, &env);
        this.containers.clear();
        this
    }

    fn docker(&self, args: &[&str]) -> String {
        let out = Command::new(docker_bin()).args(args).env("DOCKER_HOST", &self.host).output().expect("docker");
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn run_container(&mut self, name: &str, args: &[&str]) {
        self.containers.push(name.to_owned());
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(args);
        self.docker(&all);
    }
}

impl Drop for PrivateDocker {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = Command::new(docker_bin()).args(["rm", "-f", name]).env("DOCKER_HOST", &self.host).output();
        }
        let _ = Command::new(docker_bin()).args(["rmi", "-f", &self.image]).env("DOCKER_HOST", &self.host).output();
        // SAFETY: kill has no memory preconditions; the pid is a process this code started.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while matches!(self.daemon.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = run("ip", &["link", "delete", &self.bridge]);
        // The daemon's mounts under its data root go with it; what is left is files.
        let _ = run("umount", &["-R", &self.dir.join("exec").display().to_string()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Docker without its userland proxy publishes a port with DNAT rules (iptables): `who`
/// names the rule with the container it forwards to, and so does a host process's failure
/// on that port.
#[test]
fn docker_without_its_userland_proxy_is_named_through_its_nat_rules() {
    let test = "docker_without_its_userland_proxy_is_named_through_its_nat_rules";
    if !can_load_probe(test) {
        return;
    }
    for program in ["dockerd", "busybox", "iptables-save"] {
        if !answers("sh", &["-c", &format!("command -v {program}")]) {
            let why =
                format!("{program} is not installed (cargo xtask test installs docker.io, busybox-static, iptables)");
            assert!(std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_none(), "{test}: {why}");
            eprintln!("SKIPPED {test}: {why}");
            return;
        }
    }
    let mut docker = PrivateDocker::start(&["--userland-proxy=false"]);
    let port = free_port();
    let name = format!("bindtrace-nat-{}", std::process::id());
    let image = docker.image.clone();
    docker.run_container(&name, &["-p", &format!("{port}:80"), &image, "sleep", "300"]);
    let env = [("DOCKER_HOST", docker.host.as_str())];

    let (code, records, stderr) = who_with(&[&format!("{port}/tcp")], &env);
    assert_eq!(code, Some(0), "{records:?} {stderr}");
    let record = &records[0];
    let forwarded = record["forwarded_by"].as_array().unwrap_or_else(|| panic!("no forwarded_by: {record}"));
    let prerouting = forwarded.iter().find(|c| c["hook"] == "prerouting").unwrap_or_else(|| panic!("{record}"));
    assert!(prerouting["table"].as_str().is_some_and(|t| t.starts_with("iptables")), "{prerouting}");
    assert_eq!(prerouting["chains"].as_array().and_then(|c| c.last()).and_then(Value::as_str), Some("DOCKER"));
    assert!(
        prerouting["to"][0].as_str().is_some_and(|t| t.starts_with("10.213.7.") && t.ends_with(":80")),
        "{prerouting}"
    );
    assert_eq!(prerouting["containers"][0]["name"], name.as_str(), "the container is named: {prerouting}");

    let mut tracer = Tracer::start_with_env(&["-o", "ndjson", "-P", &port.to_string()], &env);
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let result = socket.bind(&SockAddr::from(SocketAddr::from(([0, 0, 0, 0], port))));
    let event = tracer.wait_for("the host's bind", |e| e["pid"] == my_pid() && e["port"] == port);
    let d = match result {
        // Debian's dockerd (20.10) reserves a published port with a socket of its own, proxy
        // or not: the failure names the container through that socket, and the rule,
        // forwarding to that same container, is in the facts (the sentence says it once).
        Err(err) => {
            assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
            let d = tracer.diagnosis_of(&event);
            tracer.stop();
            let summary = d["summary"].as_str().unwrap_or_default();
            assert!(summary.contains(&format!("for docker container {name}")), "{d}");
            d
        }
        // A Docker that reserves nothing: the bind succeeds, and is told NAT takes its port.
        Ok(()) => {
            let finished = tracer.stop();
            let d = finished.report_on(&event).unwrap_or_else(|| panic!("no report on {event}"));
            assert_eq!(d["kind"], "port_forwarded", "{d}");
            assert!(d["summary"].as_str().is_some_and(|s| s.contains(&format!("(docker container {name})"))), "{d}");
            d
        }
    };
    let forwarded = d["facts"]["forwarded_by"].as_array().unwrap_or_else(|| panic!("{d}"));
    assert!(forwarded.iter().any(|c| c["containers"][0]["name"] == name.as_str()), "{d}");
    drop(docker);
    // Docker removed its rules with the container: nothing claims the port any more.
    let (_, records, _) = who_with(&[&format!("{port}/tcp")], &[]);
    assert!(records.iter().all(|r| r["forwarded_by"].is_null()), "{records:?}");
}
