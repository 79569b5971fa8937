//! cgroups as the identity lookups need them: where the v2 hierarchy is mounted, the path of
//! a cgroup id (what the probe records), a process's cgroup paths, and what a path says about
//! who runs there (a container runtime's id, a Kubernetes pod's uid, a systemd unit).

use std::{
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// Where the unified (v2) cgroup hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts), from this process's mountinfo; read once.
pub(crate) fn v2_mount() -> Option<&'static Path> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            v2_mount_in(&mountinfo)
        })
        .as_deref()
}

fn v2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "id parent major:minor root mount-point options ... - fstype source super-options"
        let (left, right) = line.split_once(" - ")?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        // A mount of a subtree would make paths and depths relative to that subtree.
        (right.split_whitespace().next()? == "cgroup2" && root == "/")
            .then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// Is bindtrace in the initial cgroup namespace? In another one (a container's, by default
/// on cgroup v2), cgroup paths are relative to the namespace's root, while the kernel's
/// ancestor levels count from the real root.
pub(crate) fn in_initial_cgroup_namespace() -> bool {
    /// CGROUP_NS_INIT_INO: the initial cgroup namespace's fixed inode number.
    const CGROUP_NS_INIT_INO: u64 = 0xEFFF_FFFB;
    std::fs::metadata("/proc/self/ns/cgroup").map_or(true, |m| m.ino() == CGROUP_NS_INIT_INO)
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 path (relative to the hierarchy's root, `/docker/<id>`) of a cgroup id as
/// `bpf_get_current_cgroup_id()` returns it. `Ok(None)`: no such cgroup now (removed).
///
/// The id is the cgroup directory's kernfs node id, which is also its file handle: one
/// `open_by_handle_at` finds it (CAP_DAC_READ_SEARCH). Without that capability the hierarchy
/// is walked, comparing inode numbers (the same id on 64-bit kernels).
pub(crate) fn path_of_id(id: u64) -> Result<Option<String>, String> {
    let Some(mount) = v2_mount() else {
        return Err("the cgroup v2 hierarchy is not mounted".to_owned());
    };
    match open_by_id(mount, id) {
        Ok(path) => Ok(Some(path)),
        Err(err) if err.raw_os_error() == Some(libc::ESTALE) || err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(_) => walk_for_id(mount, id),
    }
}

/// FILEID_KERNFS, the handle type kernfs (and so cgroupfs) uses for its node ids.
const FILEID_KERNFS: i32 = 0xfe;

fn open_by_id(mount: &Path, id: u64) -> io::Result<String> {
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: u32,
        handle_type: i32,
        id: u64,
    }
    let root = std::fs::File::open(mount)?;
    let mut handle = KernfsHandle { handle_bytes: 8, handle_type: FILEID_KERNFS, id };
    // SAFETY: `handle` is a valid `struct file_handle` with 8 bytes of f_handle, and the
    // kernel reads only that; the returned fd is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            root.as_raw_fd(),
            std::ptr::from_mut(&mut handle),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel, owned by nobody else.
    let dir = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let target = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    relative_to(mount, &target).ok_or_else(|| io::Error::other("the cgroup is outside the hierarchy's mount"))
}

/// At most this many directories per walk: a host has hundreds to a few thousand cgroups.
const WALK_MAX: usize = 100_000;

fn walk_for_id(mount: &Path, id: u64) -> Result<Option<String>, String> {
    let mut stack = vec![mount.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        seen += 1;
        if seen > WALK_MAX {
            return Err(format!("more than {WALK_MAX} cgroups to search"));
        }
        let Ok(meta) = std::fs::symlink_metadata(&dir) else { continue };
        if meta.ino() == id {
            return Ok(relative_to(mount, &dir));
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed while walking (a transient scope): nothing to find there.
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(format!("cannot list {}: {err}", dir.display())),
        };
        stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
    }
    Ok(None)
}

fn relative_to(mount: &Path, target: &Path) -> Option<String> {
    let rest = target.strip_prefix(mount).ok()?;
    Some(format!("/{}", rest.display()))
}

/// The id of the cgroup at `path` (relative to the v2 hierarchy's root, or absolute under
/// its mount), for the kernel's cgroup filter, and its depth below the root.
pub(crate) fn id_of_path(path: &str) -> Result<(u64, u32), String> {
    let mount = v2_mount().ok_or("the cgroup v2 hierarchy is not mounted (--cgroup needs it)")?;
    if !in_initial_cgroup_namespace() {
        return Err(
            "bindtrace runs in a cgroup namespace of its own, where cgroup paths and depths are not the kernel's: \
                    run it in the host's (docker run --cgroupns=host)"
                .to_owned(),
        );
    }
    let (full, relative) = directory_of(mount, path)?;
    let meta = std::fs::metadata(&full).map_err(|e| format!("no cgroup {}: {e}", full.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a cgroup directory", full.display()));
    }
    let level = Path::new(&relative).components().count() as u32;
    Ok((meta.ino(), level))
}

/// Where a cgroup path (relative to the hierarchy, or under its mount) is: the directory,
/// and the path relative to the mount.
fn directory_of(mount: &Path, path: &str) -> Result<(PathBuf, String), String> {
    if Path::new(path).components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::CurDir))
    {
        return Err(format!("{path}: give the path without . or .. components"));
    }
    let relative = Path::new(path)
        .strip_prefix(mount)
        .map_or_else(|_| path.trim_start_matches('/').to_owned(), |r| r.display().to_string());
    Ok((mount.join(&relative), relative))
}

/// The directory of a cgroup path, whether or not it exists now (see [`id_of_path`]).
pub(crate) fn directory_of_path(path: &str) -> Option<PathBuf> {
    directory_of(v2_mount()?, path).ok().map(|(full, _)| full)
}

/// Does a cgroup id as the probe records it name one group of processes? Not when cgroup v2
/// is not mounted (every task then reports the default hierarchy's root), nor for the root
/// itself (on hybrid hosts, runtimes that manage only v1 leave their processes there).
pub(crate) fn names_one_group(id: u64) -> bool {
    static ROOT: OnceLock<Option<u64>> = OnceLock::new();
    match ROOT.get_or_init(|| v2_mount().and_then(|mount| std::fs::metadata(mount).ok()).map(|m| m.ino())) {
        Some(root) => id != *root,
        None => false,
    }
}

/// A process's cgroup paths: the v2 one (`0::`) and the v1 `name=systemd` one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ProcessCgroups {
    pub v2: Option<String>,
    pub systemd_v1: Option<String>,
}

impl ProcessCgroups {
    pub(crate) fn read(pid: u32) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        Some(Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        let mut groups = Self::default();
        for line in text.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            if controllers.is_empty() {
                groups.v2 = Some(path.to_owned());
            } else if controllers == "name=systemd" {
                groups.systemd_v1 = Some(path.to_owned());
            }
        }
        groups
    }

    /// The path that says the most: the v2 one unless it is the root (a hybrid host whose
    /// runtime manages only v1 hierarchies), then the systemd one.
    pub(crate) fn best(&self) -> Option<&str> {
        let v2 = self.v2.as_deref().filter(|p| *p != "/");
        v2.or(self.systemd_v1.as_deref()).or(self.v2.as_deref())
    }
}

/// Which runtime a cgroup path's naming points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RuntimeHint {
    Docker,
    Podman,
    CriO,
    /// containerd; the namespace when the path names it (`ctr`'s `/<namespace>/<id>`), else
    /// the Kubernetes one (`k8s.io`).
    Containerd {
        namespace: Option<String>,
    },
    /// A Kubernetes pod's container under the cgroupfs driver: any CRI runtime.
    AnyCri,
}

/// What a cgroup path says by its naming alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PathHints {
    /// The runtime and container id, innermost container first seen from the leaf.
    pub container: Option<(RuntimeHint, String)>,
    /// A Kubernetes pod's uid (`pod<uid>`, `kubepods-besteffort-pod<uid>.slice`).
    pub pod_uid: Option<String>,
    /// The innermost systemd service or scope (`nginx.service`, `session-3.scope`), else the
    /// innermost slice; container scopes are not units here.
    pub unit: Option<String>,
    /// `/<first>/<second>` paths: a `ctr` container's candidate (namespace, id).
    pub two_parts: Option<(String, String)>,
    /// A machine the path names by itself: systemd-machined's (`machine-NAME.scope`: nspawn
    /// containers, VMs) or LXC's (`lxc.payload.NAME`, `/lxc/NAME`), outermost first.
    pub machine: Option<(MachineKind, String)>,
}

/// Who runs a machine a cgroup path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MachineKind {
    /// Registered with systemd-machined (systemd-nspawn, libvirt).
    Machined,
    Lxc,
}

/// The machine a path component names (`parent`: the component above it).
fn machine_in(part: &str, parent: Option<&str>) -> Option<(MachineKind, String)> {
    if let Some(escaped) = part.strip_prefix("machine-").and_then(|rest| rest.strip_suffix(".scope")) {
        // systemd escapes a unit name's dashes and other bytes as \xNN.
        return Some((MachineKind::Machined, unescape_unit_name(escaped)));
    }
    if let Some(name) = part.strip_prefix("lxc.payload.") {
        return Some((MachineKind::Lxc, name.to_owned()));
    }
    (parent == Some("lxc") && !part.is_empty()).then(|| (MachineKind::Lxc, part.to_owned()))
}

/// A unit name's `\xNN` escapes, undone (`foo\x2dbar` is `foo-bar`).
fn unescape_unit_name(escaped: &str) -> String {
    let mut bytes = Vec::with_capacity(escaped.len());
    let raw = escaped.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 2..i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (raw[i], raw.get(i + 1), hex) {
            (b'\\', Some(b'x'), Some(byte)) => {
                bytes.push(byte);
                i += 4;
            }
            (byte, ..) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cgroup of a whole container, from the path of one of its processes: the path up to
/// the component that names the container id (systemd in a container, or podman, put the
/// processes in sub-groups of it).
pub(crate) fn container_root(path: &str) -> Option<String> {
    let (_, id) = hints(path).container?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let at = parts.iter().rposition(|part| part.contains(id.as_str()))?;
    Some(format!("/{}", parts[..=at].join("/")))
}

/// Reads the runtime's naming conventions (systemd and cgroupfs drivers) in a cgroup path.
pub(crate) fn hints(path: &str) -> PathHints {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut hints = PathHints::default();
    let in_kubepods = parts.iter().any(|p| p.starts_with("kubepods"));
    for (i, part) in parts.iter().enumerate().rev() {
        let parent = i.checked_sub(1).and_then(|p| parts.get(p)).copied();
        if hints.container.is_none() {
            hints.container = container_in(part, parent, in_kubepods);
        }
        if hints.pod_uid.is_none() {
            hints.pod_uid = pod_uid_in(part);
        }
        let is_unit = part.ends_with(".service") || part.ends_with(".scope");
        let is_container_scope = part.ends_with(".scope") && container_in(part, None, in_kubepods).is_some();
        if hints.unit.is_none() && is_unit && !is_container_scope {
            hints.unit = Some((*part).to_owned());
        }
    }
    if hints.unit.is_none() {
        hints.unit = parts.iter().rev().find(|p| p.ends_with(".slice")).map(|p| (*p).to_owned());
    }
    if let [first, second] = parts.as_slice() {
        hints.two_parts = Some(((*first).to_owned(), (*second).to_owned()));
    }
    hints.machine = parts.iter().enumerate().find_map(|(i, part)| machine_in(part, i.checked_sub(1).map(|p| parts[p])));
    hints
}

fn container_in(part: &str, parent: Option<&str>, in_kubepods: bool) -> Option<(RuntimeHint, String)> {
    // "<prefix><id>.scope" (systemd driver) or "<prefix><id>" (cgroupfs driver).
    let scoped = |prefix: &str| {
        part.strip_prefix(prefix)
            .map(|rest| rest.strip_suffix(".scope").unwrap_or(rest))
            .filter(|id| is_container_id(id))
            .map(str::to_owned)
    };
    if let Some(id) = scoped("docker-") {
        return Some((RuntimeHint::Docker, id));
    }
    if let Some(id) = scoped("libpod-") {
        return Some((RuntimeHint::Podman, id));
    }
    if let Some(id) = scoped("crio-") {
        return Some((RuntimeHint::CriO, id));
    }
    if let Some(id) = scoped("cri-containerd-") {
        return Some((RuntimeHint::Containerd { namespace: Some("k8s.io".to_owned()) }, id));
    }
    if !is_container_id(part) {
        return None;
    }
    let runtime = match parent {
        Some("docker") => RuntimeHint::Docker,
        Some("libpod_parent") => RuntimeHint::Podman,
        _ if in_kubepods => RuntimeHint::AnyCri,
        Some(namespace) => RuntimeHint::Containerd { namespace: Some(namespace.to_owned()) },
        None => RuntimeHint::AnyCri,
    };
    Some((runtime, part.to_owned()))
}

fn pod_uid_in(part: &str) -> Option<String> {
    // cgroupfs driver: "pod<uid>"; systemd driver: "kubepods-burstable-pod<uid_with_underscores>.slice".
    let uid = if let Some(slice) = part.strip_suffix(".slice") {
        slice.rsplit_once("-pod").map(|(_, uid)| uid.replace('_', "-"))?
    } else {
        part.strip_prefix("pod")?.to_owned()
    };
    (uid.len() >= 32 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5b3a54922118b4553e36cecb3b374bb34f2fb1fbd78c33606fe29f9d9987f56b";

    #[test]
    fn machines_are_named_by_their_paths() {
        let nspawn = hints("/machine.slice/machine-web\\x2d1.scope/payload/system.slice/nginx.service");
        assert_eq!(nspawn.machine, Some((MachineKind::Machined, "web-1".to_owned())));
        let lxc = hints("/lxc.payload.db/system.slice/postgresql.service");
        assert_eq!(lxc.machine, Some((MachineKind::Lxc, "db".to_owned())));
        assert_eq!(hints("/lxc/old-style/init.scope").machine, Some((MachineKind::Lxc, "old-style".to_owned())));
        assert_eq!(hints("/system.slice/nginx.service").machine, None);
        assert_eq!(unescape_unit_name("a\\x2db\\x5cc"), "a-b\\c");
    }

    #[test]
    fn runtime_naming_conventions() {
        let docker = hints(&format!("/docker/{ID}"));
        assert_eq!(docker.container, Some((RuntimeHint::Docker, ID.to_owned())));
        assert_eq!(docker.unit, None);
        let systemd = hints(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(systemd.container, Some((RuntimeHint::Docker, ID.to_owned())));
        assert_eq!(systemd.unit.as_deref(), Some("system.slice"));
        let podman =
            hints(&format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"));
        assert_eq!(podman.container, Some((RuntimeHint::Podman, ID.to_owned())));
        assert_eq!(podman.unit.as_deref(), Some("user@1000.service"));
        let kube = hints(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1c4e0b8a_2f0e_4d55_9a65_0d1e3f2a7b90.slice/cri-containerd-{ID}.scope"
        ));
        assert_eq!(kube.container, Some((RuntimeHint::Containerd { namespace: Some("k8s.io".into()) }, ID.to_owned())));
        assert_eq!(kube.pod_uid.as_deref(), Some("1c4e0b8a-2f0e-4d55-9a65-0d1e3f2a7b90"));
        let cgroupfs = hints(&format!("/kubepods/besteffort/pod1c4e0b8a-2f0e-4d55-9a65-0d1e3f2a7b90/{ID}"));
        assert_eq!(cgroupfs.container, Some((RuntimeHint::AnyCri, ID.to_owned())));
        assert_eq!(cgroupfs.pod_uid.as_deref(), Some("1c4e0b8a-2f0e-4d55-9a65-0d1e3f2a7b90"));
        let crio =
            hints(&format!("/kubepods.slice/kubepods-pod1c4e0b8a_2f0e_4d55_9a65_0d1e3f2a7b90.slice/crio-{ID}.scope"));
        assert_eq!(crio.container, Some((RuntimeHint::CriO, ID.to_owned())));
    }

    #[test]
    fn units_and_plain_paths() {
        let nginx = hints("/system.slice/nginx.service");
        assert_eq!((nginx.container, nginx.unit.as_deref()), (None, Some("nginx.service")));
        assert_eq!(hints("/user.slice/user-1000.slice/session-3.scope").unit.as_deref(), Some("session-3.scope"));
        assert_eq!(hints("/").unit, None);
        let ctr = hints("/k8s.io/sidecar");
        assert_eq!(ctr.two_parts, Some(("k8s.io".into(), "sidecar".into())));
        assert_eq!(ctr.container, None);
        assert_eq!(
            container_root(&format!("/system.slice/docker-{ID}.scope/init.scope")).as_deref(),
            Some(format!("/system.slice/docker-{ID}.scope").as_str())
        );
        assert_eq!(container_root(&format!("/docker/{ID}")).as_deref(), Some(format!("/docker/{ID}").as_str()));
        assert_eq!(container_root("/system.slice/nginx.service"), None);
        assert_eq!(hints(&format!("/libpod_parent/libpod-{ID}")).container, Some((RuntimeHint::Podman, ID.to_owned())));
        assert_eq!(
            hints(&format!("/kubepods/pod1c4e0b8a-2f0e-4d55-9a65-0d1e3f2a7b90/crio-{ID}")).container,
            Some((RuntimeHint::CriO, ID.to_owned()))
        );
        // A nested (docker-in-docker) path names the innermost container.
        let inner = "a".repeat(64);
        assert_eq!(hints(&format!("/docker/{ID}/docker/{inner}")).container, Some((RuntimeHint::Docker, inner)));
    }

    #[test]
    fn process_cgroup_lines() {
        let hybrid = ProcessCgroups::parse(&format!("9:name=systemd:/docker/{ID}\n4:memory:/docker/{ID}\n0::/\n"));
        assert_eq!(hybrid.best(), Some(format!("/docker/{ID}").as_str()));
        let v2 = ProcessCgroups::parse("0::/system.slice/nginx.service\n");
        assert_eq!(v2.best(), Some("/system.slice/nginx.service"));
        assert_eq!(ProcessCgroups::parse("garbage\n").best(), None);
    }

    #[test]
    fn mountinfo_cgroup2() {
        let text = "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                    31 25 0:27 / /sys/fs/cgroup/sys\\040tem rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(v2_mount_in(text), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(v2_mount_in("31 25 0:27 / /x rw - cgroup cgroup rw\n"), None);
        // A subtree's mount (a container's view) is not the hierarchy's root.
        assert_eq!(v2_mount_in("40 25 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"), None);
    }

    #[test]
    fn this_process_cgroup_id_round_trips() {
        let Some(path) = ProcessCgroups::read(std::process::id()).and_then(|c| c.v2) else {
            eprintln!("no cgroup v2 line for this process: nothing to check");
            return;
        };
        if v2_mount().is_none() {
            eprintln!("cgroup v2 is not mounted: nothing to check");
            return;
        }
        let (id, _) = id_of_path(&path).expect("own cgroup");
        assert_eq!(path_of_id(id).expect("lookup"), Some(path.clone()));
        assert_eq!(walk_for_id(v2_mount().expect("mounted"), id).expect("walk"), Some(path));
    }
}
