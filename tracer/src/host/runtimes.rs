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
    path::Path,
    time::{Duration, Instant},
};

use serde::Serialize;

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

/// Runtimes resting after a timeout, by socket. Process-wide: a lookup worker replaced because
/// a call hung must not ask the same daemon again at once.
static RESTING: std::sync::Mutex<Option<HashMap<String, Instant>>> = std::sync::Mutex::new(None);

fn rest(socket: &str) {
    if let Ok(mut resting) = RESTING.lock() {
        resting.get_or_insert_with(HashMap::new).insert(socket.to_owned(), Instant::now() + QUIET_AFTER_TIMEOUT);
    }
}

fn resting(socket: &str) -> bool {
    RESTING
        .lock()
        .is_ok_and(|resting| resting.as_ref().and_then(|r| r.get(socket)).is_some_and(|until| Instant::now() < *until))
}

/// A Docker-API runtime (Docker, podman): its socket and its last list of containers.
struct DockerApi {
    runtime: Runtime,
    socket: String,
    listed: Option<(Instant, Vec<Container>)>,
    /// When the last list was asked for, as CLOCK_BOOTTIME ns (the clock of a process's start
    /// time): see [`Freshness::MadeAfter`].
    listed_boot_ns: u64,
}

/// How recent a list of containers must be.
#[derive(Clone, Copy)]
enum Freshness<'a> {
    /// The usual [`LIST_MAX_AGE`].
    Recent,
    /// Recent, and listing this id unless asked again within [`LIST_MIN_AGE`] (a container
    /// started since).
    Listing(&'a str),
    /// Asked for after this moment (CLOCK_BOOTTIME ns): a list made before a docker-proxy
    /// started can miss its container, or name one that had its address before.
    MadeAfter(u64),
}

/// CLOCK_BOOTTIME now, in ns.
pub(crate) fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0))
        .unwrap_or(0)
}

impl DockerApi {
    fn new(runtime: Runtime, socket: String) -> Self {
        Self { runtime, socket, listed: None, listed_boot_ns: 0 }
    }

    /// A call timed out: say so, and rest this runtime for a while.
    fn mark_unresponsive(&mut self) -> String {
        rest(&self.socket);
        format!(
            "{} API at {} did not answer in time (not asked again for {} s)",
            self.runtime.name(),
            self.socket,
            QUIET_AFTER_TIMEOUT.as_secs()
        )
    }

    fn present(&self) -> bool {
        Path::new(&self.socket).exists()
    }

    /// The running containers, from the last list when it is fresh enough.
    async fn containers(&mut self, fresh: Freshness<'_>) -> Result<&[Container], String> {
        let age = self.listed.as_ref().map(|(at, _)| at.elapsed());
        let missing = |id: &str| self.listed.as_ref().is_some_and(|(_, list)| !list.iter().any(|c| c.id == id));
        let stale = match (age, fresh) {
            (None, _) => true,
            (Some(age), _) if age > LIST_MAX_AGE => true,
            (Some(age), Freshness::Listing(id)) => missing(id) && age > LIST_MIN_AGE,
            (Some(_), Freshness::MadeAfter(boot_ns)) => self.listed_boot_ns <= boot_ns,
            (Some(_), Freshness::Recent) => false,
        };
        if stale {
            let asked_at = boottime_ns();
            let listed: Vec<ListedContainer> = self.get_json("/containers/json").await?.unwrap_or_default();
            let containers = listed.into_iter().filter_map(|summary| self.summary_to_container(summary)).collect();
            self.listed = Some((Instant::now(), containers));
            self.listed_boot_ns = asked_at;
        }
        Ok(self.listed.as_ref().map(|(_, list)| list.as_slice()).unwrap_or_default())
    }

    fn summary_to_container(&self, summary: ListedContainer) -> Option<Container> {
        let id = summary.id?;
        let name = summary.names.unwrap_or_default().into_iter().next().map(|n| n.trim_start_matches('/').to_owned());
        let labels = summary.labels.unwrap_or_default();
        let mut container = Container::from_labels(self.runtime, id, name, summary.image, &labels);
        container.published = summary
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|port| {
                Some(Publication {
                    // "0.0.0.0" and "::" are kept apart: they are two sockets on the host.
                    host_ip: port.ip.as_deref().and_then(|ip| ip.parse().ok()),
                    host_port: port.public_port?,
                    container_port: port.private_port,
                    proto: port.proto.unwrap_or_else(|| "tcp".to_owned()),
                })
            })
            .collect();
        container.addresses = summary
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .values()
            .flat_map(|endpoint| [endpoint.ip_address.as_deref(), endpoint.global_ipv6_address.as_deref()])
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        Some(container)
    }

    /// GETs `path` of the API and reads its JSON; `None` for a 404. The path carries no API
    /// version: both daemons then answer in their own (a versioned path must be agreed on
    /// first, and podman's `/version` takes half a second; Docker 29 refuses versions before
    /// 1.44), and the fields read here are the same in every version. Made on hyper's client,
    /// not with a Docker client crate's typed calls: their models refuse a whole answer over
    /// one state their enums do not list, and podman reports such states (a container
    /// "stopped" on its way out failed every list while it lasted).
    async fn get_json<T: serde::de::DeserializeOwned>(&mut self, path: &str) -> Result<Option<T>, String> {
        if resting(&self.socket) {
            return Err(format!("{} API at {} did not answer recently", self.runtime.name(), self.socket));
        }
        let uri = path.to_owned();
        let name = self.runtime.name();
        let socket = self.socket.clone();
        let call = async {
            let stream = tokio::net::UnixStream::connect(&socket).await.map_err(|e| e.to_string())?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            let driver = tokio::spawn(connection);
            let request = hyper::Request::get(uri.as_str())
                .header(hyper::header::HOST, "localhost")
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body =
                http_body_util::BodyExt::collect(response.into_body()).await.map_err(|e| e.to_string())?.to_bytes();
            driver.abort();
            Ok::<_, String>((status, body))
        };
        let (status, body) = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Err(_) => return Err(self.mark_unresponsive()),
            Ok(Err(err)) => return Err(format!("{name} API at {socket}: {err}")),
            Ok(Ok(answer)) => answer,
        };
        if status == hyper::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(format!("{name} API at {socket}: {path} answered {status}"));
        }
        serde_json::from_slice(&body).map(Some).map_err(|e| format!("{name} API at {socket}: {path}: {e}"))
    }

    async fn container(&mut self, id: &str) -> Asked {
        match self.containers(Freshness::Listing(id)).await {
            Ok(list) => {
                if let Some(found) = list.iter().find(|c| c.id == id) {
                    return Asked::Found(Box::new(found.clone()));
                }
            }
            Err(why) => return Asked::Unreachable(why),
        }
        // Not running by the list: a container starting (a bind in its entrypoint can come
        // before Docker calls it running) or stopping. Asked for by id, in any state.
        match self.inspect(id).await {
            Ok(Some(inspected)) => Asked::Found(Box::new(self.inspected_to_container(inspected))),
            Ok(None) => Asked::Unknown,
            Err(why) => Asked::Unreachable(why),
        }
    }

    /// One container by name or id, in any state; `None` when the runtime has none.
    async fn inspect(&mut self, name_or_id: &str) -> Result<Option<InspectedContainer>, String> {
        if name_or_id.is_empty() || !name_or_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
            return Ok(None); // not a name or id a runtime gives
        }
        self.get_json(&format!("/containers/{name_or_id}/json")).await
    }

    fn inspected_to_container(&self, inspected: InspectedContainer) -> Container {
        Container::from_labels(
            self.runtime,
            inspected.id.unwrap_or_default(),
            inspected.name.map(|n| n.trim_start_matches('/').to_owned()),
            inspected.config.as_ref().and_then(|c| c.image.clone()),
            &inspected.config.and_then(|c| c.labels).unwrap_or_default(),
        )
    }

    /// Containers created but not running whose `-p` asks for host `port`/`proto`: the one a
    /// failing `docker run -p` was starting (it stays "created" after the failure).
    async fn starting(&mut self, port: u16, proto: &str) -> Result<Vec<(Container, Publication)>, String> {
        /// Created containers inspected at most per lookup, newest first: each is a call.
        const INSPECT_MAX: usize = 4;
        // all=true&filters={"status":["created"]}
        let created: Vec<ListedContainer> = self
            .get_json("/containers/json?all=true&filters=%7B%22status%22%3A%5B%22created%22%5D%7D")
            .await?
            .unwrap_or_default();
        let mut found = Vec::new();
        for summary in created.into_iter().take(INSPECT_MAX) {
            let Some(id) = summary.id.clone() else { continue };
            let Some(inspected) = self.inspect(&id).await? else { continue };
            let bindings = inspected.host_config.and_then(|h| h.port_bindings).unwrap_or_default();
            for (container_port, host) in bindings {
                let Some((number, kind)) = container_port.split_once('/') else { continue };
                let (Ok(container_port), true) = (number.parse::<u16>(), kind == proto) else { continue };
                for binding in host.unwrap_or_default() {
                    if binding.host_port.as_deref().and_then(|p| p.parse::<u16>().ok()) != Some(port) {
                        continue;
                    }
                    let publication = Publication {
                        host_ip: binding.host_ip.as_deref().and_then(|ip| ip.parse().ok()),
                        host_port: port,
                        container_port,
                        proto: proto.to_owned(),
                    };
                    if let Some(container) = self.summary_to_container(summary.clone()) {
                        found.push((container, publication));
                    }
                }
            }
        }
        Ok(found)
    }

    /// The main process of a container, by name or id (or a unique id prefix).
    async fn pid_of(&mut self, name_or_id: &str) -> Result<Option<(Container, u32)>, String> {
        let Some(inspected) = self.inspect(name_or_id).await? else { return Ok(None) };
        let pid = inspected
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|&pid| pid != 0);
        let id = inspected.id.clone().unwrap_or_default();
        let container = match self.container(&id).await {
            Asked::Found(container) => *container,
            _ => self.inspected_to_container(inspected),
        };
        Ok(pid.map(|pid| (container, pid)))
    }
}

/// A container as `GET /containers/json` lists it (Docker's API, and podman's compatible
/// one): only the fields read here, and no enum that a state unknown to it would break.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct ListedContainer {
    id: Option<String>,
    names: Option<Vec<String>>,
    image: Option<String>,
    labels: Option<HashMap<String, String>>,
    ports: Option<Vec<ListedPort>>,
    network_settings: Option<ListedNetworks>,
}

#[derive(Clone, Default, serde::Deserialize)]
#[serde(default)]
struct ListedPort {
    #[serde(rename = "IP")]
    ip: Option<String>,
    #[serde(rename = "PrivatePort")]
    private_port: u16,
    #[serde(rename = "PublicPort")]
    public_port: Option<u16>,
    #[serde(rename = "Type")]
    proto: Option<String>,
}

#[derive(Clone, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct ListedNetworks {
    networks: Option<HashMap<String, ListedEndpoint>>,
}

#[derive(Clone, Default, serde::Deserialize)]
#[serde(default)]
struct ListedEndpoint {
    #[serde(rename = "IPAddress")]
    ip_address: Option<String>,
    #[serde(rename = "GlobalIPv6Address")]
    global_ipv6_address: Option<String>,
}

/// A container as `GET /containers/{id}/json` describes it, as [`ListedContainer`].
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct InspectedContainer {
    id: Option<String>,
    name: Option<String>,
    config: Option<InspectedConfig>,
    state: Option<InspectedState>,
    host_config: Option<InspectedHostConfig>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct InspectedConfig {
    image: Option<String>,
    labels: Option<HashMap<String, String>>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct InspectedState {
    pid: Option<i64>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct InspectedHostConfig {
    port_bindings: Option<HashMap<String, Option<Vec<PortBinding>>>>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct PortBinding {
    host_ip: Option<String>,
    host_port: Option<String>,
}

/// containerd's gRPC API.
struct Containerd {
    socket: String,
    channel: Option<containerd_client::tonic::transport::Channel>,
    namespaces: Option<(Instant, Vec<String>)>,
}

impl Containerd {
    fn present(&self) -> bool {
        Path::new(&self.socket).exists()
    }

    /// A call timed out: say so, and rest containerd for a while.
    fn mark_unresponsive(&mut self) -> String {
        rest(&self.socket);
        self.channel = None;
        format!(
            "containerd at {} did not answer within {} ms (not asked again for {} s)",
            self.socket,
            CALL_TIMEOUT.as_millis(),
            QUIET_AFTER_TIMEOUT.as_secs()
        )
    }

    async fn channel(&mut self) -> Result<containerd_client::tonic::transport::Channel, String> {
        if resting(&self.socket) {
            return Err(format!("containerd at {} did not answer recently", self.socket));
        }
        if let Some(channel) = &self.channel {
            return Ok(channel.clone());
        }
        let channel = tokio::time::timeout(CALL_TIMEOUT, containerd_client::connect(&self.socket))
            .await
            .map_err(|_| self.mark_unresponsive())?
            .map_err(|e| format!("containerd at {}: {e}", self.socket))?;
        self.channel = Some(channel.clone());
        Ok(channel)
    }

    fn request<T>(message: T, namespace: &str) -> Result<containerd_client::tonic::Request<T>, String> {
        let mut request = containerd_client::tonic::Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        let value =
            namespace.parse().map_err(|_| format!("containerd namespace {namespace:?} is not a valid header"))?;
        request.metadata_mut().insert("containerd-namespace", value);
        Ok(request)
    }

    async fn namespaces(&mut self) -> Result<Vec<String>, String> {
        if let Some((at, list)) = &self.namespaces {
            if at.elapsed() < LIST_MAX_AGE {
                return Ok(list.clone());
            }
        }
        use containerd_client::services::v1::{namespaces_client::NamespacesClient, ListNamespacesRequest};
        let mut client = NamespacesClient::new(self.channel().await?);
        let mut request = containerd_client::tonic::Request::new(ListNamespacesRequest { filter: String::new() });
        request.set_timeout(CALL_TIMEOUT);
        let reply = tokio::time::timeout(CALL_TIMEOUT, client.list(request))
            .await
            .map_err(|_| self.mark_unresponsive())?
            .map_err(|e| {
                self.channel = None;
                format!("containerd at {}: {}", self.socket, e.message())
            })?;
        let list: Vec<String> = reply.into_inner().namespaces.into_iter().map(|n| n.name).collect();
        self.namespaces = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    async fn container(&mut self, namespace: &str, id: &str) -> Asked {
        use containerd_client::services::v1::{containers_client::ContainersClient, GetContainerRequest};
        let channel = match self.channel().await {
            Ok(channel) => channel,
            Err(why) => return Asked::Unreachable(why),
        };
        let request = match Self::request(GetContainerRequest { id: id.to_owned() }, namespace) {
            Ok(request) => request,
            Err(why) => return Asked::Unreachable(why),
        };
        let reply = tokio::time::timeout(CALL_TIMEOUT, ContainersClient::new(channel).get(request)).await;
        match reply {
            Err(_) => Asked::Unreachable(self.mark_unresponsive()),
            Ok(Err(status)) if status.code() == containerd_client::tonic::Code::NotFound => Asked::Unknown,
            Ok(Err(status)) => {
                self.channel = None;
                Asked::Unreachable(format!("containerd at {}: {}", self.socket, status.message()))
            }
            Ok(Ok(reply)) => match reply.into_inner().container {
                Some(c) => {
                    let image = Some(c.image).filter(|i| !i.is_empty());
                    // containerd has no name besides the id; a pod's container name is the
                    // one people know.
                    let name = c.labels.get(POD_CONTAINER).cloned().or_else(|| Some(c.id.clone()));
                    let mut container = Container::from_labels(Runtime::Containerd, c.id, name, image, &c.labels);
                    container.namespace = Some(namespace.to_owned());
                    Asked::Found(Box::new(container))
                }
                None => Asked::Unknown,
            },
        }
    }

    /// The task's main process of a container in any namespace.
    async fn pid_of(&mut self, id: &str) -> Result<Option<(Container, u32)>, String> {
        use containerd_client::services::v1::{tasks_client::TasksClient, GetRequest};
        for namespace in self.namespaces().await? {
            let container = match self.container(&namespace, id).await {
                Asked::Found(container) => container,
                Asked::Unknown => continue,
                Asked::Unreachable(why) => return Err(why),
            };
            let request =
                Self::request(GetRequest { container_id: id.to_owned(), exec_id: String::new() }, &namespace)?;
            let reply = tokio::time::timeout(CALL_TIMEOUT, TasksClient::new(self.channel().await?).get(request))
                .await
                .map_err(|_| self.mark_unresponsive())?;
            let pid = reply.ok().and_then(|r| r.into_inner().process).map(|p| p.pid).filter(|&pid| pid != 0);
            return Ok(pid.map(|pid| (*container, pid)));
        }
        Ok(None)
    }
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

struct Apis {
    docker: DockerApi,
    podman: DockerApi,
    containerd: Vec<Containerd>,
}

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

impl Apis {
    async fn container(&mut self, hint: &super::cgroup::RuntimeHint, id: &str) -> Asked {
        use super::cgroup::RuntimeHint;
        let mut unreachable = Vec::new();
        let order: &[Runtime] = match hint {
            RuntimeHint::Docker => &[Runtime::Docker],
            RuntimeHint::Podman => &[Runtime::Podman, Runtime::Docker],
            RuntimeHint::Containerd { .. } => &[Runtime::Containerd],
            RuntimeHint::CriO | RuntimeHint::AnyCri => &[Runtime::Containerd, Runtime::Docker, Runtime::Podman],
        };
        for runtime in order {
            let asked = match runtime {
                Runtime::Docker | Runtime::Podman => {
                    let api = if *runtime == Runtime::Docker { &mut self.docker } else { &mut self.podman };
                    if api.present() {
                        api.container(id).await
                    } else {
                        Asked::Unreachable(format!("no {} API socket at {}", api.runtime.name(), api.socket))
                    }
                }
                Runtime::Containerd => {
                    let namespace = match hint {
                        RuntimeHint::Containerd { namespace: Some(namespace) } => namespace.as_str(),
                        _ => "k8s.io",
                    };
                    let mut found =
                        Asked::Unreachable(format!("no containerd socket at {}", CONTAINERD_SOCKETS.join(" or ")));
                    for containerd in self.containerd.iter_mut().filter(|c| c.present()) {
                        found = containerd.container(namespace, id).await;
                        if matches!(found, Asked::Found(_)) {
                            break;
                        }
                    }
                    found
                }
                Runtime::CriO | Runtime::Cri | Runtime::Machine | Runtime::Lxc => Asked::Unknown,
            };
            match asked {
                Asked::Found(_) => return asked,
                Asked::Unreachable(why) => unreachable.push(why),
                Asked::Unknown => {}
            }
        }
        if matches!(hint, RuntimeHint::CriO) {
            unreachable.push("CRI-O's own API is not asked".to_owned());
        }
        if unreachable.is_empty() {
            Asked::Unknown
        } else {
            unreachable.dedup();
            Asked::Unreachable(unreachable.join("; "))
        }
    }

    async fn containerd_pair(&mut self, namespace: &str, id: &str) -> Asked {
        let mut last = Asked::Unknown;
        for containerd in self.containerd.iter_mut().filter(|c| c.present()) {
            match containerd.namespaces().await {
                Ok(names) if names.iter().any(|n| n == namespace) => {}
                Ok(_) => continue,
                Err(why) => {
                    last = Asked::Unreachable(why);
                    continue;
                }
            }
            last = containerd.container(namespace, id).await;
            if matches!(last, Asked::Found(_)) {
                break;
            }
        }
        last
    }

    async fn publishing(&mut self, port: u16) -> (Vec<(Container, Publication)>, Vec<String>) {
        let mut found = Vec::new();
        let mut unreachable = Vec::new();
        for api in [&mut self.docker, &mut self.podman] {
            if !api.present() {
                continue;
            }
            match api.containers(Freshness::Recent).await {
                Ok(list) => {
                    for container in list {
                        for publication in container.published.iter().filter(|p| p.host_port == port) {
                            found.push((container.clone(), publication.clone()));
                        }
                    }
                }
                Err(why) => unreachable.push(why),
            }
        }
        (found, unreachable)
    }

    async fn starting(&mut self, port: u16, proto: &str) -> Result<Option<(Container, Publication)>, String> {
        let mut errors = Vec::new();
        for api in [&mut self.docker, &mut self.podman] {
            if !api.present() {
                continue;
            }
            match api.starting(port, proto).await {
                Ok(mut found) if !found.is_empty() => return Ok(Some(found.remove(0))),
                Ok(_) => {}
                Err(why) => errors.push(why),
            }
        }
        if errors.is_empty() {
            Ok(None)
        } else {
            Err(errors.join("; "))
        }
    }

    async fn pid_of(&mut self, name_or_id: &str) -> Result<Option<(Container, u32)>, String> {
        let mut errors = Vec::new();
        for api in [&mut self.docker, &mut self.podman] {
            if !api.present() {
                continue;
            }
            match api.pid_of(name_or_id).await {
                Ok(Some(found)) => return Ok(Some(found)),
                Ok(None) => {}
                Err(why) => errors.push(why),
            }
        }
        for containerd in self.containerd.iter_mut().filter(|c| c.present()) {
            match containerd.pid_of(name_or_id).await {
                Ok(Some(found)) => return Ok(Some(found)),
                Ok(None) => {}
                Err(why) => errors.push(why),
            }
        }
        if errors.is_empty() {
            Ok(None)
        } else {
            Err(errors.join("; "))
        }
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
