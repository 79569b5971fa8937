//! The container runtimes' own APIs: what a container id from a cgroup path is called, which
//! image it runs, its Kubernetes pod, its addresses and the host ports it publishes.
//!
//! Docker Engine API (hyper, over the unix socket) on Docker's socket, the same API on podman's socket, and
//! containerd's gRPC API (containerd-client; Kubernetes names from the CRI labels). Every
//! call has a deadline; a runtime that does not answer is said to be unreachable, and its
//! containers are then "not named", never "not a container".

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::Serialize;

mod ask;
mod containerd;
mod docker;
mod resting;

use self::{
    ask::Apis,
    containerd::Containerd,
    docker::{DockerApi, Freshness},
};

/// One call to a runtime may take this long; the lookup as a whole is bounded by the
/// enrich stage's timeout.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// The list of a Docker-API runtime's containers is reused for this long, or until an id is
/// missing from it (then at most every [`LIST_MIN_AGE`]).
const LIST_MAX_AGE: Duration = Duration::from_secs(5);
const LIST_MIN_AGE: Duration = Duration::from_millis(250);
/// A runtime that let a call time out is not asked again for this long: a hung daemon must
/// not hold every lookup behind it (the lookup worker is replaced when one takes 2 s).
const QUIET_AFTER_TIMEOUT: Duration = Duration::from_secs(30);

/// The Kubernetes names a CRI runtime stores on a container.
pub(crate) const POD_NAME: &str = "io.kubernetes.pod.name";
pub(crate) const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub(crate) const POD_CONTAINER: &str = "io.kubernetes.container.name";
pub(crate) const POD_UID: &str = "io.kubernetes.pod.uid";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Runtime {
    Docker,
    Podman,
    Containerd,
    #[serde(rename = "cri-o")]
    CriO,
    /// A Kubernetes pod's container whose runtime could not be asked (the cgroupfs driver's
    /// `kubepods/.../pod<uid>/<id>` names none).
    Cri,
    /// A systemd-machined machine (systemd-nspawn, libvirt), named by its cgroup path.
    Machine,
    /// An LXC container, named by its cgroup path.
    Lxc,
}

impl Runtime {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Cri => "cri",
            Self::Machine => "machine",
            Self::Lxc => "lxc",
        }
    }

    /// A machine named by its cgroup path (nspawn, LXC), not a runtime's container.
    pub(crate) fn is_machine(self) -> bool {
        matches!(self, Self::Machine | Self::Lxc)
    }

    /// The command that stops one of its containers.
    fn stop_command(self) -> &'static str {
        match self {
            Self::Docker => "docker stop",
            Self::Podman => "podman stop",
            Self::Containerd => "ctr task kill",
            Self::CriO | Self::Cri => "crictl stop",
            Self::Machine => "machinectl poweroff",
            Self::Lxc => "lxc-stop -n",
        }
    }
}

/// A Kubernetes pod, from a container's CRI labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Pod {
    pub name: String,
    pub namespace: Option<String>,
    /// The container's name in the pod spec.
    pub container: Option<String>,
    pub uid: Option<String>,
}

/// A host port a container publishes (`-p HOST:CONTAINER`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Publication {
    /// The host address; `None`: every address.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
    /// "tcp", "udp", "sctp".
    pub proto: String,
}

impl Publication {
    /// `0.0.0.0:18500 -> web1:8080/tcp`
    pub(crate) fn mapping(&self, container: &str) -> String {
        let host = match self.host_ip {
            Some(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.host_port),
            Some(ip) => format!("{ip}:{}", self.host_port),
            None => format!("*:{}", self.host_port),
        };
        format!("{host} -> {container}:{}/{}", self.container_port, self.proto)
    }
}

/// A container as its runtime describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Container {
    pub runtime: Runtime,
    pub id: String,
    /// The runtime's name for it (Docker's without the leading `/`); `None` when unnamed or
    /// the runtime could not be asked.
    pub name: Option<String>,
    pub image: Option<String>,
    /// containerd's namespace (`k8s.io`, `moby`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip)]
    pub pod: Option<Pod>,
    #[serde(skip)]
    pub published: Vec<Publication>,
    #[serde(skip)]
    pub addresses: Vec<IpAddr>,
}

impl Container {
    /// The command that stops it: `docker stop web1`, `ctr -n k8s.io task kill <id>`.
    pub(crate) fn stop_command(&self) -> String {
        match (self.runtime, &self.namespace) {
            (Runtime::Containerd, Some(namespace)) => format!("ctr -n {namespace} task kill {}", self.id),
            (Runtime::Containerd, None) => format!("ctr task kill {}", self.id),
            (runtime, _) if self.name.is_some() => format!("{} {}", runtime.stop_command(), self.label()),
            (runtime, _) => format!("{} {}", runtime.stop_command(), self.id),
        }
    }

    /// What to call it in a sentence: its name, else its short id.
    pub(crate) fn label(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => self.id.chars().take(12).collect(),
        }
    }

    /// A machine its cgroup path names (no runtime to ask): its name is its id.
    pub(crate) fn machine(kind: super::cgroup::MachineKind, name: String) -> Self {
        let runtime = match kind {
            super::cgroup::MachineKind::Machined => Runtime::Machine,
            super::cgroup::MachineKind::Lxc => Runtime::Lxc,
        };
        Self::from_labels(runtime, name.clone(), Some(name), None, &HashMap::new())
    }

    /// A container known by its id only (its runtime could not name it).
    pub(crate) fn unnamed(runtime: Runtime, id: String) -> Self {
        Self::from_labels(runtime, id, None, None, &HashMap::new())
    }

    fn from_labels(
        runtime: Runtime,
        id: String,
        name: Option<String>,
        image: Option<String>,
        labels: &HashMap<String, String>,
    ) -> Self {
        let pod = labels.get(POD_NAME).map(|name| Pod {
            name: name.clone(),
            namespace: labels.get(POD_NAMESPACE).cloned(),
            container: labels.get(POD_CONTAINER).cloned(),
            uid: labels.get(POD_UID).cloned(),
        });
        Self { runtime, id, name, image, namespace: None, pod, published: Vec::new(), addresses: Vec::new() }
    }
}

/// What asking a runtime about one id gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Asked {
    Found(Box<Container>),
    /// The runtime answered and has no such container.
    Unknown,
    /// The runtime could not be asked (why): absence is not known.
    Unreachable(String),
}

/// CLOCK_BOOTTIME now, in ns.
pub(crate) fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0))
        .unwrap_or(0)
}

/// Every runtime bindtrace can ask, found by their sockets.
pub(crate) struct Runtimes {
    /// Lookups run on a plain thread; the clients are async, so they get a small runtime of
    /// their own. A field apart from `apis`, so that a panic inside a call (caught by the
    /// worker) cannot leave it taken.
    tokio: Option<tokio::runtime::Runtime>,
    apis: Apis,
    /// When the runtime calls of the lookup under way must have answered, all of them
    /// together: a chain of calls (containerd twice, then Docker, then podman) can take no
    /// longer than this, though no single call timed out.
    deadline: Option<Instant>,
}

/// The time the runtime calls of one lookup get, together.
pub(crate) const LOOKUP_BUDGET: Duration = Duration::from_millis(1_500);

/// Where each runtime listens on a host that runs it (and where a DaemonSet mounts them).
/// `DOCKER_HOST` is followed when it names a unix socket; TCP and SSH endpoints are not
/// asked (the default socket is).
fn docker_socket() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|host| host.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".to_owned())
}
const PODMAN_SOCKET: &str = "/run/podman/podman.sock";
const CONTAINERD_SOCKETS: [&str; 2] = ["/run/containerd/containerd.sock", "/run/k3s/containerd/containerd.sock"];

impl Default for Runtimes {
    fn default() -> Self {
        Self::new()
    }
}

const NO_TOKIO: &str = "no async runtime for the container lookups";

impl Runtimes {
    pub(crate) fn new() -> Self {
        let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
        Self {
            tokio,
            apis: Apis {
                docker: DockerApi::new(Runtime::Docker, docker_socket()),
                podman: DockerApi::new(Runtime::Podman, PODMAN_SOCKET.to_owned()),
                containerd: CONTAINERD_SOCKETS
                    .iter()
                    .map(|socket| Containerd { socket: (*socket).to_owned(), channel: None, namespaces: None })
                    .collect(),
            },
            deadline: None,
        }
    }

    /// Starts a lookup: its runtime calls share [`LOOKUP_BUDGET`] from now.
    pub(crate) fn begin_lookup(&mut self) {
        self.deadline = Some(Instant::now() + LOOKUP_BUDGET);
    }

    /// Runs `call` on the runtime's own executor, within what is left of the lookup's budget;
    /// `over` is the answer when the budget runs out.
    fn within_budget<T>(
        tokio: &tokio::runtime::Runtime,
        deadline: Option<Instant>,
        call: impl std::future::Future<Output = T>,
        over: impl FnOnce(String) -> T,
    ) -> T {
        let deadline = deadline.unwrap_or_else(|| Instant::now() + LOOKUP_BUDGET);
        tokio.block_on(async {
            match tokio::time::timeout_at(deadline.into(), call).await {
                Ok(answer) => answer,
                Err(_) => over(format!(
                    "the container runtimes did not answer within {} ms, all calls together",
                    LOOKUP_BUDGET.as_millis()
                )),
            }
        })
    }

    /// A container by the id its cgroup path names, asking the runtime the path points at
    /// first.
    pub(crate) fn container(&mut self, hint: &super::cgroup::RuntimeHint, id: &str) -> Asked {
        let Some(tokio) = &self.tokio else { return Asked::Unreachable(NO_TOKIO.to_owned()) };
        Self::within_budget(tokio, self.deadline, self.apis.container(hint, id), Asked::Unreachable)
    }

    /// A `ctr`-style `/<namespace>/<id>` cgroup: a container only if containerd has that
    /// namespace and that id.
    pub(crate) fn containerd_pair(&mut self, namespace: &str, id: &str) -> Asked {
        let Some(tokio) = &self.tokio else { return Asked::Unreachable(NO_TOKIO.to_owned()) };
        Self::within_budget(tokio, self.deadline, self.apis.containerd_pair(namespace, id), Asked::Unreachable)
    }

    /// The containers of the Docker-API runtimes that publish `port` on the host, and the
    /// runtimes that could not be asked.
    pub(crate) fn publishing(&mut self, port: u16) -> (Vec<(Container, Publication)>, Vec<String>) {
        let Some(tokio) = &self.tokio else { return (Vec::new(), vec![NO_TOKIO.to_owned()]) };
        Self::within_budget(tokio, self.deadline, self.apis.publishing(port), |why| (Vec::new(), vec![why]))
    }

    /// The container that a failing `docker run -p PORT:...` (or podman's) was starting.
    pub(crate) fn starting(&mut self, port: u16, proto: &str) -> Result<Option<(Container, Publication)>, String> {
        let Some(tokio) = &self.tokio else { return Err(NO_TOKIO.to_owned()) };
        Self::within_budget(tokio, self.deadline, self.apis.starting(port, proto), Err)
    }

    /// The container a docker-proxy forwards to, by its `-container-ip`, from a list asked for
    /// after the proxy started (`proxy_started_boot_ns`, CLOCK_BOOTTIME): an older one may not
    /// have the container yet (it went unnamed for seconds), or have the one that held the
    /// address before it (named wrongly).
    pub(crate) fn with_address(
        &mut self,
        address: IpAddr,
        proxy_started_boot_ns: u64,
    ) -> Result<Option<Container>, String> {
        let Some(tokio) = &self.tokio else { return Err(NO_TOKIO.to_owned()) };
        let apis = &mut self.apis;
        if !apis.docker.present() && !apis.podman.present() {
            return Err(format!(
                "no Docker API socket at {} and no podman API socket at {}",
                apis.docker.socket, apis.podman.socket
            ));
        }
        let find = async {
            let mut errors = Vec::new();
            for api in [&mut apis.docker, &mut apis.podman] {
                if !api.present() {
                    continue;
                }
                match api.containers(Freshness::MadeAfter(proxy_started_boot_ns)).await {
                    Ok(list) => {
                        if let Some(found) = list.iter().find(|c| c.addresses.contains(&address)) {
                            return Ok(Some(found.clone()));
                        }
                    }
                    Err(why) => errors.push(why),
                }
            }
            if errors.is_empty() {
                Ok(None)
            } else {
                Err(errors.join("; "))
            }
        };
        Self::within_budget(tokio, self.deadline, find, Err)
    }

    /// A container's main process, by the name or id a user typed, from whichever runtime
    /// knows it.
    pub(crate) fn pid_of(&mut self, name_or_id: &str) -> Result<Option<(Container, u32)>, String> {
        let Some(tokio) = &self.tokio else { return Err(NO_TOKIO.to_owned()) };
        Self::within_budget(tokio, self.deadline, self.apis.pid_of(name_or_id), Err)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_read_like_docker_ps() {
        let publication = Publication {
            host_ip: Some("0.0.0.0".parse().unwrap()),
            host_port: 18500,
            container_port: 8080,
            proto: "tcp".into(),
        };
        assert_eq!(publication.mapping("web1"), "0.0.0.0:18500 -> web1:8080/tcp");
        let v6 = Publication { host_ip: Some("::".parse().unwrap()), ..publication.clone() };
        assert_eq!(v6.mapping("web1"), "[::]:18500 -> web1:8080/tcp");
    }

    /// A daemon that accepts and never answers costs one timeout, then nothing for a while,
    /// and is reported unreachable, never as "no such container".
    /// Runtimes whose Docker socket accepts connections and never answers (for a few
    /// seconds), no podman, no containerd; the directory to remove and the thread holding
    /// the connections.
    fn hung_docker(tag: &str) -> (Runtimes, std::path::PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("bindtrace-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let socket = dir.join("docker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("listen");
        let held = std::thread::spawn(move || {
            let open: Vec<_> = listener.incoming().take(4).flatten().collect();
            std::thread::sleep(Duration::from_secs(3));
            drop(open);
        });
        let mut runtimes = Runtimes::new();
        runtimes.apis.docker = DockerApi::new(Runtime::Docker, socket.display().to_string());
        runtimes.apis.podman = DockerApi::new(Runtime::Podman, dir.join("absent.sock").display().to_string());
        runtimes.apis.containerd.clear();
        (runtimes, dir, held)
    }

    #[test]
    fn a_hung_runtime_is_unreachable_then_rested() {
        let (mut runtimes, dir, held) = hung_docker("hung");
        let id = "a".repeat(64);
        let started = Instant::now();
        let first = runtimes.container(&super::super::cgroup::RuntimeHint::Docker, &id);
        assert!(matches!(&first, Asked::Unreachable(why) if why.contains("did not answer")), "{first:?}");
        assert!(started.elapsed() < CALL_TIMEOUT * 2, "one timeout: {:?}", started.elapsed());
        let again = Instant::now();
        let second = runtimes.container(&super::super::cgroup::RuntimeHint::Docker, &id);
        assert!(matches!(&second, Asked::Unreachable(why) if why.contains("recently")), "{second:?}");
        assert!(again.elapsed() < Duration::from_millis(100), "rested: {:?}", again.elapsed());
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The calls of one lookup share one budget: once it is spent, the next call answers at
    /// once that the runtimes did not answer in time, however many calls a chain has left.
    #[test]
    fn the_calls_of_one_lookup_share_one_budget() {
        let (mut runtimes, dir, held) = hung_docker("budget");
        runtimes.begin_lookup();
        // What is left of the lookup's budget is shorter than one call's own timeout.
        runtimes.deadline = Some(Instant::now() + Duration::from_millis(150));
        let started = Instant::now();
        let asked = runtimes.container(&super::super::cgroup::RuntimeHint::Docker, &"b".repeat(64));
        assert!(started.elapsed() < CALL_TIMEOUT, "{:?}", started.elapsed());
        assert!(matches!(&asked, Asked::Unreachable(why) if why.contains("all calls together")), "{asked:?}");
        // A new lookup has the whole budget again.
        runtimes.begin_lookup();
        assert!(runtimes.deadline.is_some_and(|at| at > Instant::now() + LOOKUP_BUDGET / 2));
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cri_labels_name_the_pod() {
        let labels: HashMap<String, String> = [(POD_NAME, "api-7f9"), (POD_NAMESPACE, "shop"), (POD_CONTAINER, "api")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let container = Container::from_labels(Runtime::Containerd, "abc".into(), None, None, &labels);
        let pod = container.pod.clone().expect("pod");
        assert_eq!(
            (pod.name.as_str(), pod.namespace.as_deref(), pod.container.as_deref()),
            ("api-7f9", Some("shop"), Some("api"))
        );
        assert_eq!(container.label(), "abc");
    }
}
