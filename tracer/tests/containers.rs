//! Containers on both sides of a conflict, against Debian's real `dockerd` and `containerd`:
//! started here when they are not running, with an image built offline (`docker import` of
//! a busybox-static root; nothing is pulled), and everything they started stopped and
//! removed at the end. One test, because the daemons are shared by its scenarios and started
//! once.

mod common;

use std::{
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// The namespace Kubernetes' CRI plugin uses.
const K8S_NAMESPACE: &str = "k8s.io";

fn docker(args: &[&str]) -> String {
    run_ok(docker_bin(), args)
}

fn ctr(args: &[&str]) -> String {
    let mut all = vec!["-n", K8S_NAMESPACE];
    all.extend_from_slice(args);
    run_ok("ctr", &all)
}

/// The daemons and everything this test made, undone on drop (also when a scenario fails).
struct Containers {
    daemons: Vec<(&'static str, Child)>,
    docker0_was_there: bool,
    dir: PathBuf,
    image: String,
    docker_containers: Vec<String>,
    containerd_containers: Vec<String>,
    containerd_image: Option<String>,
    /// Images built here (the bindtrace image), removed at the end.
    built_images: Vec<String>,
}

impl Containers {
    /// Starts containerd and dockerd unless they answer already, and imports the image.
    fn start() -> Option<Self> {
        let tag = std::process::id();
        let dir = std::env::temp_dir().join(format!("bindtrace-containers-{tag}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut this = Self {
            daemons: Vec::new(),
            docker0_was_there: Path::new("/sys/class/net/docker0").exists(),
            dir,
            image: format!("bindtrace-test-{tag}:1"),
            docker_containers: Vec::new(),
            containerd_containers: Vec::new(),
            containerd_image: None,
            built_images: Vec::new(),
        };
        for program in ["dockerd", "containerd", "ctr", "busybox"] {
            if !answers("sh", &["-c", &format!("command -v {program}")]) {
                let why = format!(
                    "{program} is not installed (cargo xtask test installs docker.io, containerd and busybox-static)"
                );
                if std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some() {
                    panic!("{why}");
                }
                eprintln!("SKIPPED containers: {why}");
                return None;
            }
        }
        if !answers("ctr", &["version"]) {
            this.spawn_daemon("containerd", &[]);
            wait_until("containerd answers", Duration::from_secs(30), || answers("ctr", &["version"]));
        }
        if !answers(docker_bin(), &["info"]) {
            let containerd = format!("--containerd={CONTAINERD_SOCKET}");
            this.spawn_daemon("dockerd", &[&containerd]);
            wait_until("dockerd answers", Duration::from_secs(60), || answers(docker_bin(), &["info"]));
        }
        this.import_image();
        Some(this)
    }

    fn spawn_daemon(&mut self, program: &'static str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.join(format!("{program}.log"))).expect("log file");
        let child = Command::new(program)
            .args(args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        self.daemons.push((program, child));
    }

    /// A root with a static busybox and the applets the scenarios run.
    fn import_image(&mut self) {
        import_busybox_image(&self.dir.join("root"), &self.image, &[]);
    }

    /// `docker run -d --name NAME ARGS...`, remembered for removal.
    fn docker_run(&mut self, name: &str, args: &[&str]) -> std::process::Output {
        self.docker_containers.push(name.to_owned());
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(args);
        run(docker_bin(), &all)
    }

    /// The image in containerd's Kubernetes namespace, as a CRI runtime would have it.
    fn containerd_image(&mut self) -> String {
        if let Some(image) = &self.containerd_image {
            return image.clone();
        }
        let archive = self.dir.join("image.tar");
        docker(&["save", "-o", archive.to_str().expect("utf-8"), &self.image]);
        ctr(&["images", "import", archive.to_str().expect("utf-8")]);
        let image = format!("docker.io/library/{}", self.image);
        self.containerd_image = Some(image.clone());
        image
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.docker_containers {
            let _ = run(docker_bin(), &["rm", "-f", name]);
        }
        let _ = run(docker_bin(), &["rmi", "-f", &self.image]);
        for image in &self.built_images {
            let _ = run(docker_bin(), &["rmi", "-f", image]);
        }
        for id in &self.containerd_containers {
            let _ = run("ctr", &["-n", K8S_NAMESPACE, "task", "kill", "-s", "SIGKILL", id]);
            thread::sleep(Duration::from_millis(300));
            let _ = run("ctr", &["-n", K8S_NAMESPACE, "task", "rm", "-f", id]);
            let _ = run("ctr", &["-n", K8S_NAMESPACE, "containers", "rm", id]);
        }
        if let Some(image) = &self.containerd_image {
            let _ = run("ctr", &["-n", K8S_NAMESPACE, "images", "rm", image]);
        }
        // The daemons this test started, dockerd before its containerd.
        for (_, child) in self.daemons.iter_mut().rev() {
            // SAFETY: signalling a daemon this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.docker0_was_there && self.daemons.iter().any(|(name, _)| *name == "dockerd") {
            let _ = run("ip", &["link", "delete", "docker0"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bind_fails(addr: &str) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let err = socket.bind(&SockAddr::from(addr.parse::<SocketAddr>().expect("addr"))).expect_err("in use");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE), "{addr}");
}

/// Waits until something listens on 127.0.0.1:PORT in this namespace.
fn wait_listening(port: u16) {
    wait_until(&format!("a listener on port {port}"), Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// Does a socket listen on `port` in the network namespace of process `pid`?
fn listens_in(pid: &str, port: u16) -> bool {
    let wanted = format!(":{port:04X} ");
    ["tcp", "tcp6"].iter().any(|file| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{file}"))
            .is_ok_and(|text| text.lines().any(|l| l.contains(&wanted) && l.split_whitespace().nth(3) == Some("0A")))
    })
}

/// The next table line (stdout) that contains `needle`.
fn table_line(tracer: &mut Tracer, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tracer.lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no table line with {needle:?}; got {seen:#?}"),
        }
    }
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value.as_str().unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

/// The pids of the docker-proxy processes publishing `port`.
fn docker_proxies(port: u16) -> Vec<i32> {
    let flag = format!("-host-port\0{port}\0");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let mut cmdline = Vec::new();
            std::fs::File::open(entry.path().join("cmdline")).ok()?.read_to_end(&mut cmdline).ok()?;
            let text = String::from_utf8_lossy(&cmdline);
            (text.contains("docker-proxy") && text.contains(&flag)).then_some(pid)
        })
        .collect()
}

/// bindtrace's own image (deploy/Dockerfile, the static binary alone), run under Docker the way
/// the README says, traces a bind made on the host.
fn the_image_traces_a_host_bind(containers: &mut Containers, binary: &Path) {
    let tag = std::process::id();
    let context = containers.dir.join("image-context");
    std::fs::create_dir_all(&context).expect("context");
    std::fs::copy(binary, context.join("bindtrace")).expect("copy the static binary");
    let image = format!("bindtrace-image-test-{tag}:1");
    containers.built_images.push(image.clone());
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    let built = Command::new(docker_bin())
        .args([
            "build",
            "-q",
            "-f",
            dockerfile.to_str().expect("utf-8"),
            "-t",
            &image,
            context.to_str().expect("utf-8"),
        ])
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build");
    assert!(built.status.success(), "docker build: {}", String::from_utf8_lossy(&built.stderr));
    let name = format!("bt-image-{tag}");
    containers.docker_containers.push(name.clone());
    let port = free_port();
    let mut child = Command::new(docker_bin())
        // The capabilities the README lists (Docker 20.10 knows no CAP_BPF or CAP_PERFMON by
        // name; CAP_SYS_ADMIN covers both), not --privileged: this host's bounding set lacks
        // CAP_SYS_RESOURCE, which --privileged asks for.
        .args(["run", "--rm", "--name", &name, "--pid=host", "--net=host", "--cgroupns=host", "--cap-drop", "ALL"])
        .args([
            "--cap-add",
            "SYS_ADMIN",
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "SYS_PTRACE",
            "--cap-add",
            "DAC_READ_SEARCH",
        ])
        .args(["-v", "/var/run/docker.sock:/var/run/docker.sock:ro", &image])
        .args(["-o", "ndjson", "-P", &port.to_string(), "-d", "6s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker run");
    let stderr = child.stderr.take().expect("stderr");
    let (attached_tx, attached_rx) = std::sync::mpsc::channel();
    let stderr_reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.contains("attached") {
                let _ = attached_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    let attached = attached_rx.recv_timeout(Duration::from_secs(60));
    let _listener = attached.is_ok().then(|| std::net::TcpListener::bind(("127.0.0.1", port)).expect("host bind"));
    let mut stdout = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read");
    let status = child.wait().expect("wait");
    let stderr = stderr_reader.join().unwrap_or_default().join("\n");
    assert!(attached.is_ok() && status.success(), "the image did not trace ({status}): {stderr}");
    let records: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let event = records
        .iter()
        .find(|r| r["type"] == "bind" && r["port"] == port && r["pid"] == my_pid())
        .unwrap_or_else(|| panic!("no event for the host bind on {port}: {stdout}\n{stderr}"));
    assert_eq!(event["ok"], true, "{event}");
    assert!(event["container"].is_null(), "a host process: {event}");
    assert!(records.iter().any(|r| r["type"] == "summary"), "{stdout}");
}

#[test]
fn containers_on_both_sides_of_a_conflict() {
    if !can_load_probe("containers_on_both_sides_of_a_conflict") {
        return;
    }
    let Some(mut containers) = Containers::start() else { return };
    let tag = std::process::id();
    let image = containers.image.clone();

    // 1. A container publishes a port; a host process binds it.
    let web = format!("bt-web-{tag}");
    let published = free_port();
    let out = containers
        .docker_run(&web, &["-p", &format!("{published}:8080"), &image, "nc", "-ll", "-p", "8080", "-e", "cat"]);
    assert!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));
    wait_listening(published);
    let next_published = free_port();
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &format!("{published},{next_published}")]);
    let mut table = Tracer::start(&["-o", "table", "-P", &published.to_string()]);
    bind_fails(&format!("0.0.0.0:{published}"));
    let event = tracer.wait_for("the host bind on the published port", |e| e["errno"] == 98);
    assert!(event["container"].is_null(), "the failing process runs on the host: {event}");
    assert!(event["cgroup"].is_string(), "{event}");
    let d = tracer.diagnosis_of(&event);
    let summary = str_of(&d["summary"], "summary");
    assert!(
        summary.contains(&format!("publishes 0.0.0.0:{published} -> {web}:8080/tcp for docker container {web}")),
        "{summary}"
    );
    assert!(summary.ends_with(&format!("docker stop {web}, or publish another host port")), "{summary}");
    let process = &d["holders"][0]["processes"][0];
    assert_eq!(process["comm"], "docker-proxy", "{d}");
    assert_eq!(process["forwards"]["container"]["name"], web.as_str(), "{d}");
    assert_eq!(process["forwards"]["container"]["runtime"], "docker", "{d}");
    assert_eq!(process["forwards"]["container"]["image"], image.as_str(), "{d}");
    assert_eq!(process["forwards"]["mapping"], format!("0.0.0.0:{published} -> {web}:8080/tcp"), "{d}");
    let line = table_line(&mut table, &format!("docker stop {web}"));
    assert!(line.contains(&format!("for docker container {web}")), "{line}");
    drop(table);
    // A container started just after that diagnosis listed the containers: its proxy is named
    // at once (a list older than the proxy left it unnamed for up to 5 s).
    let listed_at = Instant::now();
    let next = format!("bt-next-{tag}");
    let out = containers
        .docker_run(&next, &["-p", &format!("{next_published}:8080"), &image, "nc", "-ll", "-p", "8080", "-e", "cat"]);
    assert!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));
    wait_listening(next_published);
    bind_fails(&format!("0.0.0.0:{next_published}"));
    let event = tracer.wait_for("the host bind on the new container's port", |e| {
        e["port"] == next_published && e["errno"] == 98 && e["pid"] == my_pid()
    });
    let d = tracer.diagnosis_of(&event);
    eprintln!("the new container's port was diagnosed {:?} after the previous list", listed_at.elapsed());
    assert_eq!(d["holders"][0]["processes"][0]["forwards"]["container"]["name"], next.as_str(), "{d}");
    tracer.stop();
    let (code, records) = who(&[&format!("{published}/tcp")]);
    assert_eq!(code, Some(0), "{records:?}");
    let record = &records[0];
    let names: Vec<&Value> =
        record["published_by"].as_array().expect("published_by").iter().map(|p| &p["container"]["name"]).collect();
    assert!(names.iter().all(|n| *n == web.as_str()) && !names.is_empty(), "{record}");
    assert_eq!(record["holders"][0]["processes"][0]["forwards"]["container"]["name"], web.as_str(), "{record}");

    // 2. The same port when no socket holds it any more: only Docker's allocator does.
    for pid in docker_proxies(published) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_until("the docker-proxy processes are gone", Duration::from_secs(10), || docker_proxies(published).is_empty());
    let (code, records) = who(&[&format!("{published}/tcp")]);
    assert_eq!(code, Some(0), "a published port is taken: {records:?}");
    let record = &records[0];
    assert_eq!(record["holders"], Value::Array(Vec::new()), "{record}");
    let summary = str_of(&record["summary"], "summary");
    assert!(
        summary.contains("port is already allocated") && summary.contains(&format!("reserves it for container {web}")),
        "{summary}"
    );
    assert!(record["published_by"].as_array().expect("published_by").iter().all(|p| p["socket"] == false), "{record}");
    let second = format!("bt-again-{tag}");
    let out = containers.docker_run(&second, &["-p", &format!("{published}:8080"), &image, "sleep", "30"]);
    assert!(!out.status.success(), "Docker refuses the port itself");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("port is already allocated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 3. A host process holds a port that `docker run -p` then asks for.
    let held = free_port();
    let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    listener.bind(&SockAddr::from(SocketAddr::from(([0, 0, 0, 0], held)))).expect("bind");
    listener.listen(4).expect("listen");
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &held.to_string()]);
    let blocked = format!("bt-blocked-{tag}");
    let out = containers.docker_run(&blocked, &["-p", &format!("{held}:8080"), &image, "sleep", "30"]);
    assert!(!out.status.success(), "the host holds the port");
    let event = tracer.wait_for("docker's bind of the held port", |e| e["errno"] == 98);
    assert!(["docker-proxy", "dockerd"].contains(&str_of(&event["comm"], "comm")), "{event}");
    let d = tracer.diagnosis_of(&event);
    assert_eq!(d["holders"][0]["processes"][0]["pid"], my_pid(), "{d}");
    // Both sides: the container Docker was starting, and the host process in its way.
    assert_eq!(d["facts"]["publishing_for"]["container"]["name"], blocked.as_str(), "{d}");
    let summary = str_of(&d["summary"], "summary");
    assert!(
        summary.starts_with(&format!("docker could not publish 0.0.0.0:{held} -> {blocked}:8080/tcp for container {blocked}: port {held}/tcp is held by pid {}", my_pid())),
        "{summary}"
    );
    assert!(d["holders"][0]["processes"][0]["container"].is_null(), "the holder runs on the host: {d}");
    tracer.stop();
    drop(listener);

    // 4. Inside one container: a bind fails against the container's own sidecar process.
    let pod = format!("bt-pod-{tag}");
    let out = containers.docker_run(&pod, &[&image, "nc", "-ll", "-p", "7000", "-e", "cat"]);
    assert!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", "7000"]);
    let mut table = Tracer::start(&["-o", "table", "-P", "7000"]);
    let sidecar_pid = docker(&["inspect", "-f", "{{.State.Pid}}", &pod]);
    wait_until("the sidecar listens", Duration::from_secs(20), || listens_in(&sidecar_pid, 7000));
    let out = run(docker_bin(), &["exec", &pod, "nc", "-l", "-p", "7000"]);
    assert!(!out.status.success(), "the sidecar holds 7000");
    let event = tracer.wait_for("the bind inside the container", |e| e["errno"] == 98);
    assert_eq!(event["container"]["name"], pod.as_str(), "{event}");
    assert_eq!(event["container"]["runtime"], "docker", "{event}");
    let d = tracer.diagnosis_of(&event);
    let holder = &d["holders"][0]["processes"][0];
    assert_eq!(holder["container"]["name"], pod.as_str(), "{d}");
    let summary = str_of(&d["summary"], "summary");
    assert!(summary.contains(&format!("in docker container {pod} (image {image})")), "{summary}");
    assert!(summary.ends_with(&format!("docker stop {pod}, or bind another port")), "{summary}");
    let row = table_line(&mut table, "EADDRINUSE");
    assert!(row.contains(&pod[..pod.len().min(13)]), "the CONTAINER column names it: {row}");
    let line = table_line(&mut table, "held by");
    assert!(line.contains(&format!("in docker container {pod}")), "{line}");
    drop(table);
    let cgroup = str_of(&event["cgroup"], "cgroup").to_owned();
    tracer.stop();
    let (code, records) = who(&["7000/tcp", "--all-netns"]);
    assert_eq!(code, Some(0), "{records:?}");
    let found = records
        .iter()
        .flat_map(|r| r["holders"].as_array().cloned().unwrap_or_default())
        .flat_map(|h| h["processes"].as_array().cloned().unwrap_or_default())
        .any(|p| p["container"]["name"] == pod.as_str());
    assert!(found, "--all-netns finds the sidecar in its container's namespace: {records:?}");

    // 5. The scope filters select exactly one container's binds, in the kernel.
    for scope in [vec!["--container", pod.as_str()], vec!["--cgroup", cgroup.as_str()]] {
        let mut args = vec!["-o", "ndjson"];
        args.extend_from_slice(&scope);
        let tracer = Tracer::start(&args);
        let host_port = free_port();
        let _host = std::net::TcpListener::bind(("127.0.0.1", host_port)).expect("host bind");
        let _ = run(docker_bin(), &["exec", &web, "timeout", "1", "nc", "-l", "-p", "7001"]);
        let _ = run(docker_bin(), &["exec", &pod, "timeout", "1", "nc", "-l", "-p", "7002"]);
        let finished = tracer.stop();
        let binds = finished.binds();
        assert!(binds.iter().any(|b| b["port"] == 7002), "{scope:?}: the container's bind: {binds:?}");
        for bind in &binds {
            assert_eq!(bind["container"]["name"], pod.as_str(), "{scope:?}: only that container: {bind}");
        }
        let kernel = &finished.summary()["kernel"];
        assert!(
            kernel["filtered"].as_u64().expect("filtered") >= 2,
            "{scope:?}: the others were dropped in the kernel: {kernel}"
        );
    }
    // A followed container restarted (a crash loop): its new cgroup is followed at once, the
    // restarted process's bind is traced, and the departure and return are said. It went
    // blind, silently.
    let mut tracer = Tracer::start(&["-o", "ndjson", "--container", pod.as_str()]);
    let restarted = run(docker_bin(), &["restart", "-t", "1", &pod]);
    assert!(restarted.status.success(), "docker restart: {}", String::from_utf8_lossy(&restarted.stderr));
    let again = tracer.wait_for("the restarted container's bind", |e| e["port"] == 7000 && e["ok"] == true);
    assert_eq!(again["container"]["name"], pod.as_str(), "{again}");
    let finished = tracer.stop();
    assert!(
        finished.stderr.contains(&format!("--container {pod}: its cgroup"))
            && finished.stderr.contains(&format!("--container {pod}: back in a new cgroup")),
        "{}",
        finished.stderr
    );

    let (status, _, stderr) = common::run_to_end(&["--container", "bt-no-such-container"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    // 6. A containerd container with the labels Kubernetes' CRI sets holds a host port.
    let containerd_image = containers.containerd_image();
    let port = free_port();
    let id = format!("bt-api-{tag}");
    let mut tracer = Tracer::start(&["-o", "ndjson", "-P", &port.to_string()]);
    let mut table = Tracer::start(&["-o", "table", "-P", &port.to_string()]);
    containers.containerd_containers.push(id.clone());
    let port_text = port.to_string();
    ctr(&[
        "run",
        "-d",
        "--net-host",
        "--label",
        "io.kubernetes.pod.name=api-7f9",
        "--label",
        "io.kubernetes.pod.namespace=shop",
        "--label",
        "io.kubernetes.container.name=api",
        &containerd_image,
        &id,
        "nc",
        "-ll",
        "-p",
        &port_text,
        "-e",
        "cat",
    ]);
    wait_listening(port);
    let bound = tracer.wait_for("the pod's own bind", |e| e["ok"] == true);
    assert_eq!(bound["pod"]["name"], "api-7f9", "{bound}");
    assert_eq!(bound["pod"]["namespace"], "shop", "{bound}");
    assert_eq!(bound["pod"]["container"], "api", "{bound}");
    assert_eq!(bound["container"]["runtime"], "containerd", "{bound}");
    bind_fails(&format!("0.0.0.0:{port}"));
    let event = tracer.wait_for("the host bind against the pod", |e| e["errno"] == 98);
    let d = tracer.diagnosis_of(&event);
    let holder = &d["holders"][0]["processes"][0];
    assert_eq!(holder["pod"]["name"], "api-7f9", "{d}");
    let summary = str_of(&d["summary"], "summary");
    assert!(summary.contains("in pod shop/api-7f9 (container api)"), "{summary}");
    // The table: the pod's own bind names it in the CONTAINER column, the host's failure
    // names it in its diagnosis.
    let row = table_line(&mut table, " ok");
    assert!(row.contains("shop/api-7f9"), "{row}");
    let line = table_line(&mut table, "held by");
    assert!(line.contains("in pod shop/api-7f9"), "{line}");
    drop(table);
    tracer.stop();
    let (code, records) = who(&[&format!("{port}/tcp")]);
    assert_eq!(code, Some(0));
    assert_eq!(records[0]["holders"][0]["processes"][0]["pod"]["namespace"], "shop", "{records:?}");

    // 7. The container image, from the static binary `cargo xtask test` builds.
    match std::env::var_os("BINDTRACE_STATIC_BINARY") {
        Some(binary) => the_image_traces_a_host_bind(&mut containers, Path::new(&binary)),
        None if std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some() => {
            panic!("BINDTRACE_STATIC_BINARY is not set: cargo xtask test builds the static binary the image needs")
        }
        None => eprintln!(
            "SKIPPED the image scenario: BINDTRACE_STATIC_BINARY (set by cargo xtask test) names no static binary"
        ),
    }
}
