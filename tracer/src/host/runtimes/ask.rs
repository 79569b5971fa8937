//! Which runtime to ask about an id, and in which order (the cgroup path's hint first), and
//! how their answers combine: "not named" when one could not be asked, never "not a container".

use super::{
    containerd::Containerd,
    docker::{DockerApi, Freshness},
    CONTAINERD_SOCKETS,
};
use super::{Asked, Container, Publication, Runtime};

pub(super) struct Apis {
    pub(super) docker: DockerApi,
    pub(super) podman: DockerApi,
    pub(super) containerd: Vec<Containerd>,
}

impl Apis {
    pub(super) async fn container(&mut self, hint: &crate::host::cgroup::RuntimeHint, id: &str) -> Asked {
        use crate::host::cgroup::RuntimeHint;
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

    pub(super) async fn containerd_pair(&mut self, namespace: &str, id: &str) -> Asked {
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

    pub(super) async fn publishing(&mut self, port: u16) -> (Vec<(Container, Publication)>, Vec<String>) {
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

    pub(super) async fn starting(
        &mut self,
        port: u16,
        proto: &str,
    ) -> Result<Option<(Container, Publication)>, String> {
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

    pub(super) async fn pid_of(&mut self, name_or_id: &str) -> Result<Option<(Container, u32)>, String> {
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
