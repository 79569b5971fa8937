//! The Docker Engine API (hyper over the unix socket), as Docker and podman serve it: the
//! containers listed (reused a few seconds), one inspected, one found by name.

use std::{collections::HashMap, path::Path, time::Instant};

use super::{
    boottime_ns,
    resting::{rest, resting},
    Asked, Container, Publication, Runtime, CALL_TIMEOUT, LIST_MAX_AGE, LIST_MIN_AGE, QUIET_AFTER_TIMEOUT,
};

/// A Docker-API runtime (Docker, podman): its socket and its last list of containers.
pub(super) struct DockerApi {
    pub(super) runtime: Runtime,
    pub(super) socket: String,
    pub(super) listed: Option<(Instant, Vec<Container>)>,
    /// When the last list was asked for, as CLOCK_BOOTTIME ns (the clock of a process's start
    /// time): see [`Freshness::MadeAfter`].
    pub(super) listed_boot_ns: u64,
}

/// How recent a list of containers must be.
#[derive(Clone, Copy)]
pub(super) enum Freshness<'a> {
    /// The usual [`LIST_MAX_AGE`].
    Recent,
    /// Recent, and listing this id unless asked again within [`LIST_MIN_AGE`] (a container
    /// started since).
    Listing(&'a str),
    /// Asked for after this moment (CLOCK_BOOTTIME ns): a list made before a docker-proxy
    /// started can miss its container, or name one that had its address before.
    MadeAfter(u64),
}

impl DockerApi {
    pub(super) fn new(runtime: Runtime, socket: String) -> Self {
        Self { runtime, socket, listed: None, listed_boot_ns: 0 }
    }

    /// A call timed out: say so, and rest this runtime for a while.
    pub(super) fn mark_unresponsive(&mut self) -> String {
        rest(&self.socket);
        format!(
            "{} API at {} did not answer in time (not asked again for {} s)",
            self.runtime.name(),
            self.socket,
            QUIET_AFTER_TIMEOUT.as_secs()
        )
    }

    pub(super) fn present(&self) -> bool {
        Path::new(&self.socket).exists()
    }

    /// The running containers, from the last list when it is fresh enough.
    pub(super) async fn containers(&mut self, fresh: Freshness<'_>) -> Result<&[Container], String> {
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

    pub(super) fn summary_to_container(&self, summary: ListedContainer) -> Option<Container> {
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
    pub(super) async fn get_json<T: serde::de::DeserializeOwned>(&mut self, path: &str) -> Result<Option<T>, String> {
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

    pub(super) async fn container(&mut self, id: &str) -> Asked {
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
    pub(super) async fn inspect(&mut self, name_or_id: &str) -> Result<Option<InspectedContainer>, String> {
        if name_or_id.is_empty() || !name_or_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
            return Ok(None); // not a name or id a runtime gives
        }
        self.get_json(&format!("/containers/{name_or_id}/json")).await
    }

    pub(super) fn inspected_to_container(&self, inspected: InspectedContainer) -> Container {
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
    pub(super) async fn starting(&mut self, port: u16, proto: &str) -> Result<Vec<(Container, Publication)>, String> {
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
    pub(super) async fn pid_of(&mut self, name_or_id: &str) -> Result<Option<(Container, u32)>, String> {
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
pub(super) struct ListedContainer {
    pub(super) id: Option<String>,
    pub(super) names: Option<Vec<String>>,
    pub(super) image: Option<String>,
    pub(super) labels: Option<HashMap<String, String>>,
    pub(super) ports: Option<Vec<ListedPort>>,
    pub(super) network_settings: Option<ListedNetworks>,
}

#[derive(Clone, Default, serde::Deserialize)]
#[serde(default)]
pub(super) struct ListedPort {
    #[serde(rename = "IP")]
    pub(super) ip: Option<String>,
    #[serde(rename = "PrivatePort")]
    pub(super) private_port: u16,
    #[serde(rename = "PublicPort")]
    public_port: Option<u16>,
    #[serde(rename = "Type")]
    pub(super) proto: Option<String>,
}

#[derive(Clone, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct ListedNetworks {
    pub(super) networks: Option<HashMap<String, ListedEndpoint>>,
}

#[derive(Clone, Default, serde::Deserialize)]
#[serde(default)]
pub(super) struct ListedEndpoint {
    #[serde(rename = "IPAddress")]
    pub(super) ip_address: Option<String>,
    #[serde(rename = "GlobalIPv6Address")]
    pub(super) global_ipv6_address: Option<String>,
}

/// A container as `GET /containers/{id}/json` describes it, as [`ListedContainer`].
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct InspectedContainer {
    pub(super) id: Option<String>,
    pub(super) name: Option<String>,
    pub(super) config: Option<InspectedConfig>,
    pub(super) state: Option<InspectedState>,
    pub(super) host_config: Option<InspectedHostConfig>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct InspectedConfig {
    pub(super) image: Option<String>,
    pub(super) labels: Option<HashMap<String, String>>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct InspectedState {
    pub(super) pid: Option<i64>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct InspectedHostConfig {
    pub(super) port_bindings: Option<HashMap<String, Option<Vec<PortBinding>>>>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct PortBinding {
    pub(super) host_ip: Option<String>,
    pub(super) host_port: Option<String>,
}
