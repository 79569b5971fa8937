//! Who runs in a cgroup, in the operator's terms: the container (runtime, id, name, image),
//! its Kubernetes pod, or the systemd unit. The cgroup path's naming gives the runtime and the
//! id; the runtime's API gives the names. Answers are cached by cgroup path (bounded); a
//! runtime that could not be asked leaves the container "not named" with the reason, never
//! "no container".

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    cgroup::{self, ProcessCgroups},
    owners::ProcessInfo,
    runtimes::{Asked, Container, Pod, Publication, Runtime, Runtimes},
};

/// Cached answers: found ones are kept this long (a container keeps its name; a rename is
/// seen after this), unreachable runtimes are asked again sooner.
const FOUND_TTL: Duration = Duration::from_secs(30);
const UNREACHABLE_TTL: Duration = Duration::from_secs(2);
const CACHE_MAX: usize = 4_096;

/// Who runs in one cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Identity {
    /// The cgroup v2 path (or the v1 `name=systemd` one on hosts without v2); written by the
    /// records themselves (`cgroup`).
    #[serde(skip)]
    pub(crate) cgroup: Option<String>,
    pub(crate) container: Option<Container>,
    pub(crate) pod: Option<Pod>,
    /// The systemd unit (or slice) outside any container.
    pub(crate) unit: Option<String>,
    /// Why the container could not be named (its runtime did not answer), or the cgroup not
    /// found: what is missing is unknown, not absent.
    #[serde(rename = "identity_unresolved", skip_serializing_if = "Option::is_none")]
    pub(crate) unresolved: Option<String>,
}

impl Identity {
    /// A short name for a table cell: the pod (`shop/api-7f9`) or the container (`web1`);
    /// `None` outside containers.
    pub(crate) fn short(&self) -> Option<String> {
        if let Some(pod) = &self.pod {
            return Some(match &pod.namespace {
                Some(namespace) => format!("{namespace}/{}", pod.name),
                None => pod.name.clone(),
            });
        }
        self.container.as_ref().map(Container::label)
    }

    /// Where a process runs, as a phrase: "in docker container web1 (image nginx:1)", "in pod
    /// shop/api-7f9 (container api)", "of nginx.service"; `None` on the host outside a
    /// service or scope.
    pub(crate) fn describe(&self) -> Option<String> {
        if let Some(pod) = &self.pod {
            let namespace = pod.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default();
            let container = pod.container.as_deref().map(|c| format!(" (container {c})")).unwrap_or_default();
            return Some(format!("in pod {namespace}{}{container}", pod.name));
        }
        if let Some(container) = self.container.as_ref().filter(|c| c.runtime.is_machine()) {
            let unit = self.unit.as_deref().map(|u| format!(" (its {u})")).unwrap_or_default();
            return Some(format!("in {} {}{unit}", container.runtime.name(), container.label()));
        }
        if let Some(container) = &self.container {
            let image = container.image.as_deref().map(|i| format!(" (image {i})")).unwrap_or_default();
            let unnamed = if container.name.is_none() { " (not named: its runtime did not answer)" } else { "" };
            return Some(format!("in {} container {}{image}{unnamed}", container.runtime.name(), container.label()));
        }
        self.unit.as_deref().filter(|u| u.ends_with(".service") || u.ends_with(".scope")).map(|u| format!("of {u}"))
    }

    /// What to do about a port this process holds.
    pub(crate) fn stop_advice(&self) -> Option<String> {
        if let Some(pod) = &self.pod {
            let namespace = pod.namespace.as_deref().unwrap_or("default");
            return Some(format!(
                "the port belongs to pod {namespace}/{}: free it there (kubectl -n {namespace} get pod {} -o yaml shows its \
                 hostPort or hostNetwork), or bind another port",
                pod.name, pod.name
            ));
        }
        // A service inside a machine is stopped there, not the whole machine.
        if let (Some(container), Some(unit)) =
            (&self.container, self.unit.as_deref().filter(|u| u.ends_with(".service")))
        {
            match container.runtime {
                Runtime::Machine => {
                    return Some(format!("systemctl -M {} stop {unit}, or bind another port", container.id))
                }
                Runtime::Lxc => {
                    return Some(format!(
                        "lxc-attach -n {} -- systemctl stop {unit}, or bind another port",
                        container.id
                    ))
                }
                _ => {}
            }
        }
        if let Some(container) = &self.container {
            return Some(format!("{}, or bind another port", container.stop_command()));
        }
        self.unit
            .as_deref()
            .filter(|u| u.ends_with(".service"))
            .map(|u| format!("systemctl stop {u}, or bind another port"))
    }

    fn failed(why: String) -> Self {
        Self { unresolved: Some(why), ..Self::default() }
    }
}

impl Forwarding {
    /// ", which publishes 0.0.0.0:18500 -> web1:8080/tcp for docker container web1"
    pub(crate) fn describe(&self) -> String {
        match &self.container {
            Some(c) => format!(", which publishes {} for {} container {}", self.mapping, c.runtime.name(), c.label()),
            None => format!(
                ", which publishes {} (the container at {} could not be named{})",
                self.mapping,
                self.container_ip.map_or_else(|| "that address".to_owned(), |ip| ip.to_string()),
                self.unresolved.as_deref().map(|why| format!(": {why}")).unwrap_or_default()
            ),
        }
    }

    pub(crate) fn stop_advice(&self) -> String {
        match &self.container {
            Some(c) => format!("{}, or publish another host port", c.stop_command()),
            None => "stop the container that publishes it, or publish another host port".to_owned(),
        }
    }
}

/// What a `docker-proxy` holder forwards: the published mapping and its container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Forwarding {
    /// `0.0.0.0:18500 -> web1:8080/tcp`
    pub mapping: String,
    pub publication: Publication,
    pub container: Option<Container>,
    /// The address it forwards to (a docker-proxy's `-container-ip`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_ip: Option<IpAddr>,
    /// Why the container could not be named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<String>,
}

/// A container a runtime was starting, and the host port it asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Publishing {
    pub container: Container,
    /// `0.0.0.0:18700 -> web2:8080/tcp`
    pub mapping: String,
    #[serde(skip)]
    pub publication: Publication,
}

/// The identity of a cgroup path that names no container (a service, a session, a slice),
/// known from the path alone; `None` when the path names a container, or may (two parts
/// that are not systemd units: containerd's `namespace/id`), which only a runtime settles.
pub(crate) fn without_runtime(path: &str) -> Option<Identity> {
    let hints = cgroup::hints(path);
    let systemd = |part: &str| part.ends_with(".slice") || part.ends_with(".scope") || part.ends_with(".service");
    let maybe_containerd = hints.two_parts.as_ref().is_some_and(|(first, second)| !systemd(first) && !systemd(second));
    if hints.container.is_some() || maybe_containerd {
        return None;
    }
    let container = hints.machine.map(|(kind, name)| Container::machine(kind, name));
    Some(Identity { cgroup: Some(path.to_owned()), unit: hints.unit, container, ..Identity::default() })
}

/// The podman container a `conmon` process monitors, from its command line (`-c ID -n NAME`,
/// and the `podman` that its exit command runs); CRI-O's conmon is left to the cgroup.
fn conmon_container(process: &ProcessInfo) -> Option<Container> {
    if process.comm != "conmon" {
        return None;
    }
    // The whole command line: the one kept for display is cut before `--exit-command`.
    let raw = std::fs::read(format!("/proc/{}/cmdline", process.pid)).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let args: Vec<&str> = text.split('\0').collect();
    let flag = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1]);
    if !flag("--exit-command").is_some_and(|command| command.ends_with("/podman") || command == "podman") {
        return None;
    }
    let id = flag("-c").filter(|id| !id.is_empty())?;
    Some(Container {
        runtime: Runtime::Podman,
        id: id.to_owned(),
        name: flag("-n").map(str::to_owned),
        image: None,
        namespace: None,
        pod: None,
        published: Vec::new(),
        addresses: Vec::new(),
    })
}

/// The container a cgroup path names, unnamed (its runtime not asked, or not answering).
fn unnamed_container(hint: &cgroup::RuntimeHint, id: &str) -> Container {
    let (runtime, namespace) = match hint {
        cgroup::RuntimeHint::Docker => (Runtime::Docker, None),
        cgroup::RuntimeHint::Podman => (Runtime::Podman, None),
        cgroup::RuntimeHint::CriO => (Runtime::CriO, None),
        cgroup::RuntimeHint::Containerd { namespace } => (Runtime::Containerd, namespace.clone()),
        cgroup::RuntimeHint::AnyCri => (Runtime::Cri, None),
    };
    let mut container = Container::unnamed(runtime, id.to_owned());
    container.namespace = namespace;
    container
}

/// What a cgroup path says by itself when its lookup did not answer in time (`why`): the
/// container it names (runtime and id, no name) or machine, else its unit; never "none".
pub(crate) fn from_path_alone(path: &str, why: String) -> Identity {
    let hints = cgroup::hints(path);
    let mut identity = Identity { cgroup: Some(path.to_owned()), unresolved: Some(why), ..Identity::default() };
    if let Some((hint, id)) = &hints.container {
        identity.container = Some(unnamed_container(hint, id));
    } else if let Some((kind, name)) = hints.machine {
        identity.container = Some(Container::machine(kind, name));
        identity.unit = hints.unit;
    } else {
        identity.unit = hints.unit;
    }
    identity
}

/// The identity lookups' state, owned by the lookup worker (and by `who`).
#[derive(Default)]
pub(crate) struct Identities {
    runtimes: Runtimes,
    by_path: HashMap<String, (Instant, Arc<Identity>)>,
}

impl Identities {
    /// Starts a lookup: its runtime calls share one budget from now.
    pub(crate) fn begin_lookup(&mut self) {
        self.runtimes.begin_lookup();
    }

    /// The identity of the cgroup an event's process ran in. `pid` is the fallback when the
    /// id cannot be turned into a path (no v2 hierarchy, or the cgroup is gone).
    pub(crate) fn of_cgroup_id(&mut self, id: u64, pid: u32) -> Arc<Identity> {
        let path = match cgroup::path_of_id(id) {
            Ok(Some(path)) => Some(path),
            Ok(None) | Err(_) => ProcessCgroups::read(pid).and_then(|c| c.best().map(str::to_owned)),
        };
        match path {
            Some(path) => self.of_path(&path),
            None => Arc::new(Identity::failed(format!(
                "cgroup {id} is gone and its process exited: where it ran is not known"
            ))),
        }
    }

    /// The identity of a running process.
    pub(crate) fn of_pid(&mut self, pid: u32) -> Option<Arc<Identity>> {
        let groups = ProcessCgroups::read(pid)?;
        Some(self.of_path(groups.best()?))
    }

    pub(crate) fn of_path(&mut self, path: &str) -> Arc<Identity> {
        if let Some((at, identity)) = self.by_path.get(path) {
            let ttl = if identity.unresolved.is_some() { UNREACHABLE_TTL } else { FOUND_TTL };
            if at.elapsed() < ttl {
                return identity.clone();
            }
        }
        let identity = Arc::new(self.resolve(path));
        if self.by_path.len() >= CACHE_MAX {
            self.by_path.clear();
        }
        self.by_path.insert(path.to_owned(), (Instant::now(), identity.clone()));
        identity
    }

    fn resolve(&mut self, path: &str) -> Identity {
        let hints = cgroup::hints(path);
        let mut identity = Identity { cgroup: Some(path.to_owned()), unit: hints.unit.clone(), ..Identity::default() };
        let asked = if let Some((hint, id)) = &hints.container {
            let asked = self.runtimes.container(hint, id);
            let why = match &asked {
                Asked::Found(_) => None,
                Asked::Unreachable(why) => Some(why.clone()),
                Asked::Unknown => Some(format!("its runtime lists no container {id} now (removed since?)")),
            };
            if let Some(why) = why {
                // The path names a container: say which, unnamed, and why; never "none".
                identity.container = Some(unnamed_container(hint, id));
                identity.unit = None;
                identity.unresolved = Some(why);
            }
            asked
        } else if let Some((namespace, id)) = &hints.two_parts {
            let asked = self.runtimes.containerd_pair(namespace, id);
            if let Asked::Unreachable(why) = &asked {
                identity.unresolved = Some(format!("whether {path} is a containerd container is not known: {why}"));
            }
            asked
        } else {
            Asked::Unknown
        };
        // A machine (nspawn, LXC) is named by its path, with no runtime to ask; a runtime's
        // container inside one is the innermost, and named above.
        if let (None, Some((kind, name))) = (&identity.container, &hints.machine) {
            if !matches!(asked, Asked::Found(_)) {
                identity.container = Some(Container::machine(*kind, name.clone()));
                identity.unresolved = None;
            }
        }
        if let Asked::Found(container) = asked {
            identity.pod = container.pod.clone().map(|mut pod| {
                pod.uid = pod.uid.or_else(|| hints.pod_uid.clone());
                pod
            });
            identity.container = Some(*container);
            // Inside a container, the unit is the runtime's scope, not the operator's.
            identity.unit = None;
        }
        identity
    }

    /// Fills in the identity of each process, and what a `docker-proxy` forwards.
    pub(crate) fn annotate(&mut self, process: &mut ProcessInfo) {
        process.identity = self.of_pid(process.pid).map(|i| (*i).clone());
        if process.comm == "docker-proxy" {
            process.forwards = self.forwarding(&process.cmdline, process.started_boot_ns());
        }
        // podman's conmon runs beside its container (its own cgroup), and holds the host
        // ports the container publishes: it is named as that container's.
        if let Some(container) = conmon_container(process) {
            let identity = process.identity.get_or_insert_with(Identity::default);
            identity.container = Some(container);
            identity.unit = None;
        }
    }

    /// A docker-proxy's command line (`-proto tcp -host-ip 0.0.0.0 -host-port 18500
    /// -container-ip 172.17.0.2 -container-port 8080`) and the container at that address.
    fn forwarding(&mut self, cmdline: &str, started_boot_ns: u64) -> Option<Forwarding> {
        let args: Vec<&str> = cmdline.split(' ').collect();
        let flag = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1]);
        let publication = Publication {
            host_ip: flag("-host-ip").and_then(|ip| ip.parse().ok()),
            host_port: flag("-host-port")?.parse().ok()?,
            container_port: flag("-container-port")?.parse().ok()?,
            proto: flag("-proto").unwrap_or("tcp").to_owned(),
        };
        let container_ip: IpAddr = flag("-container-ip")?.parse().ok()?;
        let (container, unresolved) = match self.runtimes.with_address(container_ip, started_boot_ns) {
            Ok(container) => (container, None),
            Err(why) => (None, Some(why)),
        };
        let target = container.as_ref().map_or_else(|| container_ip.to_string(), Container::label);
        Some(Forwarding {
            mapping: publication.mapping(&target),
            publication,
            container,
            container_ip: Some(container_ip),
            unresolved,
        })
    }

    /// Names the containers that NAT rules send traffic to, by their addresses (Docker's API;
    /// a destination no runtime knows stays an address).
    pub(crate) fn name_nat_destinations(&mut self, rules: &mut super::nat::NatRules) {
        for claim in &mut rules.claims {
            for to in &claim.to {
                let Ok(addr) = to.parse::<std::net::SocketAddr>() else { continue };
                if let Ok(Some(container)) = self.runtimes.with_address(addr.ip(), 0) {
                    if !claim.containers.iter().any(|c: &Container| c.id == container.id) {
                        claim.containers.push(container);
                    }
                }
            }
        }
    }

    /// The container whose published port a runtime daemon's socket at `local` serves.
    pub(crate) fn published_at(&mut self, local: std::net::SocketAddr, proto: &str) -> Option<Forwarding> {
        let (found, _) = self.runtimes.publishing(local.port());
        let (container, publication) =
            found.into_iter().find(|(_, p)| p.proto == proto && p.host_ip.is_none_or(|ip| ip == local.ip()))?;
        Some(Forwarding {
            mapping: publication.mapping(&container.label()),
            publication,
            container: Some(container),
            container_ip: None,
            unresolved: None,
        })
    }

    /// Containers that publish `port` on the host (Docker, podman), and runtimes that could
    /// not be asked.
    pub(crate) fn publishing(&mut self, port: u16) -> (Vec<(Container, Publication)>, Vec<String>) {
        self.runtimes.publishing(port)
    }

    /// The container a runtime was starting when its port publisher's bind failed.
    pub(crate) fn starting(&mut self, port: u16, proto: &str) -> Result<Option<Publishing>, String> {
        Ok(self.runtimes.starting(port, proto)?.map(|(container, publication)| Publishing {
            mapping: publication.mapping(&container.label()),
            container,
            publication,
        }))
    }

    /// A container's main process, by the name or id a user typed.
    pub(crate) fn container_pid(&mut self, name_or_id: &str) -> Result<Option<(Container, u32)>, String> {
        self.runtimes.pid_of(name_or_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An nspawn machine or LXC container is named from its cgroup path, with advice for the
    /// service inside it; they used to read as the host ("of nginx.service").
    #[test]
    fn machines_are_named_with_the_service_inside_them() {
        let nspawn = without_runtime("/machine.slice/machine-web\\x2d1.scope/payload/system.slice/nginx.service")
            .expect("known from the path");
        assert_eq!(nspawn.describe().as_deref(), Some("in machine web-1 (its nginx.service)"));
        assert_eq!(
            nspawn.stop_advice().as_deref(),
            Some("systemctl -M web-1 stop nginx.service, or bind another port")
        );
        let lxc = without_runtime("/lxc.payload.db/init.scope").expect("known from the path");
        assert_eq!(lxc.describe().as_deref(), Some("in lxc db (its init.scope)"));
        assert_eq!(lxc.stop_advice().as_deref(), Some("lxc-stop -n db, or bind another port"));
    }

    fn container(name: Option<&str>) -> Container {
        Container {
            runtime: Runtime::Docker,
            id: "5b3a54922118b4553e36cecb3b374bb34f2fb1fbd78c33606fe29f9d9987f56b".into(),
            name: name.map(str::to_owned),
            image: Some("nginx:1".into()),
            namespace: None,
            pod: None,
            published: Vec::new(),
            addresses: Vec::new(),
        }
    }

    #[test]
    fn names_and_advice_in_the_operators_terms() {
        let web = Identity { container: Some(container(Some("web1"))), ..Identity::default() };
        assert_eq!(web.short().as_deref(), Some("web1"));
        assert_eq!(web.describe().as_deref(), Some("in docker container web1 (image nginx:1)"));
        assert_eq!(web.stop_advice().as_deref(), Some("docker stop web1, or bind another port"));
        // A runtime that did not answer: the short id, and why there is no name.
        let unnamed = Identity { container: Some(container(None)), ..Identity::default() };
        assert_eq!(unnamed.short().as_deref(), Some("5b3a54922118"));
        assert!(unnamed.describe().is_some_and(|d| d.contains("not named")));
        let pod = Identity {
            container: Some(container(Some("api"))),
            pod: Some(Pod {
                name: "api-7f9".into(),
                namespace: Some("shop".into()),
                container: Some("api".into()),
                uid: None,
            }),
            ..Identity::default()
        };
        assert_eq!(pod.short().as_deref(), Some("shop/api-7f9"));
        assert_eq!(pod.describe().as_deref(), Some("in pod shop/api-7f9 (container api)"));
        assert!(pod.stop_advice().is_some_and(|a| a.contains("kubectl -n shop get pod api-7f9")));
        let service = Identity { unit: Some("nginx.service".into()), ..Identity::default() };
        assert_eq!(service.short(), None);
        assert_eq!(service.describe().as_deref(), Some("of nginx.service"));
        assert_eq!(service.stop_advice().as_deref(), Some("systemctl stop nginx.service, or bind another port"));
        let slice = Identity { unit: Some("user.slice".into()), ..Identity::default() };
        assert_eq!((slice.describe(), slice.stop_advice()), (None, None));
    }

    #[test]
    fn a_docker_proxy_command_line_gives_its_mapping() {
        let mut identities = Identities::default();
        // No Docker here to name the container: the mapping still reads by address, and the
        // container is "could not be named", not absent.
        let cmdline =
            "/usr/sbin/docker-proxy -proto udp -host-ip :: -host-port 5353 -container-ip 172.17.0.9 -container-port 53";
        let forwarding = identities.forwarding(cmdline, 0).expect("a docker-proxy command line");
        assert_eq!(forwarding.publication.host_port, 5353);
        assert_eq!(forwarding.publication.container_port, 53);
        assert_eq!(forwarding.publication.proto, "udp");
        assert_eq!(forwarding.container_ip, Some("172.17.0.9".parse::<IpAddr>().expect("ip")));
        if forwarding.container.is_none() {
            assert_eq!(forwarding.mapping, "[::]:5353 -> 172.17.0.9:53/udp");
        }
        assert!(identities.forwarding("/usr/sbin/docker-proxy -proto tcp", 0).is_none());
    }
}
