//! Running the real programs the tests drive (Debian's dockerd and docker, nft, ctr).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Debian's docker client, not another one earlier in PATH (a newer client may refuse the
/// daemon's API version).
pub(crate) fn docker_bin() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

pub(crate) fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

pub(crate) fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub(crate) fn answers(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

pub(crate) fn wait_until(what: &str, limit: Duration, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// `docker import`s a root made at `root` of a static busybox and the applets the scenarios
/// run, as `image`; `env` reaches another daemon (`DOCKER_HOST`).
pub(crate) fn import_busybox_image(root: &Path, image: &str, env: &[(&str, &str)]) {
    import_busybox_image_with(docker_bin(), root, image, env);
}

/// [`import_busybox_image`] with another importer (`podman`).
pub(crate) fn import_busybox_image_with(importer: &str, root: &Path, image: &str, env: &[(&str, &str)]) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).expect("image root");
    let busybox = run_ok("sh", &["-c", "command -v busybox"]);
    std::fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
    for applet in ["sh", "nc", "sleep", "timeout", "cat", "true"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
    }
    let mut tar = Command::new("tar")
        .args(["-C", root.to_str().expect("utf-8 path"), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let status = Command::new(importer)
        .args(["import", "-", image])
        .envs(env.iter().copied())
        .stdin(tar.stdout.take().expect("tar stdout"))
        .stdout(Stdio::null())
        .status()
        .expect("docker import");
    assert!(tar.wait().expect("tar").success(), "tar failed");
    assert!(status.success(), "{importer} import failed");
}

/// A plain HTTP/1.0 GET on loopback (test-only: the servers here are local and answer with
/// a body and a close).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_owned()).filter(|_| head.contains(" 200 "))
}

/// The cgroup v2 hierarchy's mount point (its root), if one is mounted.
pub(crate) fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split_whitespace().collect();
        (right.split_whitespace().next()? == "cgroup2" && fields.get(3) == Some(&"/"))
            .then(|| fields.get(4).map(PathBuf::from))
            .flatten()
    })
}

/// A cgroup v2 group of the test's own (at the hierarchy's root), removed on drop.
pub(crate) struct TestCgroup(pub PathBuf);

impl TestCgroup {
    /// `None` (said) without a cgroup v2 hierarchy, unless the tests must run: then a panic.
    pub(crate) fn new(name: &str) -> Option<Self> {
        let Some(root) = cgroup2_root() else {
            assert!(std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_none(), "no cgroup v2 hierarchy is mounted");
            eprintln!("SKIPPED: no cgroup v2 hierarchy is mounted");
            return None;
        };
        let dir = root.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a cgroup");
        Some(Self(dir))
    }

    /// Its `cgroup.procs`, for `ChildPlan::join_cgroup`.
    pub(crate) fn procs(&self) -> std::ffi::CString {
        std::ffi::CString::new(self.0.join("cgroup.procs").into_os_string().into_encoded_bytes()).expect("path")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
