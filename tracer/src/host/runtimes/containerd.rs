//! containerd's gRPC API (containerd-client): a container by id in any namespace, with the
//! Kubernetes names from its CRI labels.

use std::{path::Path, time::Instant};

use super::{
    resting::{rest, resting},
    Asked, Container, Runtime, CALL_TIMEOUT, LIST_MAX_AGE, POD_CONTAINER, QUIET_AFTER_TIMEOUT,
};

/// containerd's gRPC API.
pub(super) struct Containerd {
    pub(super) socket: String,
    pub(super) channel: Option<containerd_client::tonic::transport::Channel>,
    pub(super) namespaces: Option<(Instant, Vec<String>)>,
}

impl Containerd {
    pub(super) fn present(&self) -> bool {
        Path::new(&self.socket).exists()
    }

    /// A call timed out: say so, and rest containerd for a while.
    pub(super) fn mark_unresponsive(&mut self) -> String {
        rest(&self.socket);
        self.channel = None;
        format!(
            "containerd at {} did not answer within {} ms (not asked again for {} s)",
            self.socket,
            CALL_TIMEOUT.as_millis(),
            QUIET_AFTER_TIMEOUT.as_secs()
        )
    }

    pub(super) async fn channel(&mut self) -> Result<containerd_client::tonic::transport::Channel, String> {
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

    pub(super) fn request<T>(message: T, namespace: &str) -> Result<containerd_client::tonic::Request<T>, String> {
        let mut request = containerd_client::tonic::Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        let value =
            namespace.parse().map_err(|_| format!("containerd namespace {namespace:?} is not a valid header"))?;
        request.metadata_mut().insert("containerd-namespace", value);
        Ok(request)
    }

    pub(super) async fn namespaces(&mut self) -> Result<Vec<String>, String> {
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

    pub(super) async fn container(&mut self, namespace: &str, id: &str) -> Asked {
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
    pub(super) async fn pid_of(&mut self, id: &str) -> Result<Option<(Container, u32)>, String> {
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
