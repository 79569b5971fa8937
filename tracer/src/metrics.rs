//! `--metrics ADDR`: counts of what the pipeline wrote, served as OpenMetrics text at
//! `/metrics` (prometheus-client for the registry and encoding, hyper for HTTP).
//!
//! Label cardinality is bounded by design: `result` is `ok` or an errno name (at most the
//! kernel's errnos), `proto` and `op` are small fixed sets, `container`/`pod`/`namespace`
//! take at most [`CONTAINER_LABELS_MAX`] distinct values (later ones count under
//! `container="other"`), and `port` is set only for the ports given with
//! `--metrics-port` (every other port counts as `port="other"`).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bindtrace_common::AF_UNIX;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, info::Info},
    registry::Registry,
};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::{
    decode::BindEventExt as _,
    errno,
    host::identity::Identity,
    model::{EnrichCounters, Enriched},
    probe::{KernelCounters, ProgramStats},
};

/// Distinct (container, pod, namespace) label values at once; past this, the set used least
/// recently is removed from the registry (its series end), so that pods that come and go
/// over months never freeze the labels nor grow the registry.
pub(crate) const CONTAINER_LABELS_MAX: usize = 256;
/// Ports `--metrics-port` may name.
pub(crate) const PORT_LABELS_MAX: usize = 64;
/// Counter handles remembered per distinct event shape; cleared when full (the counters
/// themselves live on in the registry).
const HANDLES_MAX: usize = 4_096;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BindLabels {
    op: &'static str,
    /// `ok`, or the errno's name (`EADDRINUSE`).
    result: String,
    /// `tcp`, `udp`, `unix`, or `other`.
    proto: &'static str,
    /// A `--metrics-port`, or `other`.
    port: String,
    /// The container's name (or short id); empty on the host; `unknown` when not resolved.
    container: String,
    pod: String,
    namespace: String,
}

struct ContainerSeries {
    last_used: Arc<AtomicU64>,
    series: Vec<BindLabels>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

/// The kernel's counters of one attached program, as metrics.
#[derive(Default)]
struct ProgramSeries {
    runs: Family<ProgramLabels, Counter>,
    run_seconds: Family<ProgramLabels, Counter<f64>>,
    recursion_misses: Family<ProgramLabels, Counter>,
    /// What was already added, by program.
    last: std::sync::Mutex<FxHashMap<String, ProgramStats>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
    version: &'static str,
}

/// What picks an event's counter, cheap to hash: the identity by address (every event of a
/// cgroup shares one `Arc`).
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct HandleKey {
    op: u8,
    ret: i32,
    proto: u16,
    family: u16,
    port: u16,
    identity: usize,
}

/// The registry and the counters the pipeline updates.
pub(crate) struct Metrics {
    registry: Arc<Registry>,
    binds: Family<BindLabels, Counter>,
    dropped: Counter,
    filter_mismatches: Counter,
    lookups: Counter,
    lookup_timeouts: Counter,
    diagnoses_followed: Counter,
    diagnoses_shed: Counter,
    ports_shared: Counter,
    sharing_unchecked: Counter,
    ports_forwarded: Counter,
    programs: ProgramSeries,
    /// The totals already added, so that each tick adds only what is new.
    last_kernel_dropped: AtomicU64,
    last_enrich: std::sync::Mutex<EnrichCounters>,
    ports: FxHashSet<u16>,
    /// Identities whose labels were settled, by address, and the label values; with the
    /// last-use stamp of their container label set.
    handles: FxHashMap<HandleKey, (Counter, Arc<AtomicU64>)>,
    /// Each (container, pod, namespace) label set: when it was last used, and the label sets
    /// of the series made with it (removed from the registry with it).
    containers_seen: FxHashMap<(String, String, String), ContainerSeries>,
    /// Counts uses, for the least-recently-used order.
    uses: u64,
    /// Keeps the identities of `handles` alive, so that their addresses stay theirs.
    pinned: Vec<Arc<Identity>>,
}

impl Metrics {
    pub(crate) fn new(backend: &str, ports: &[u16]) -> Self {
        let mut registry = Registry::with_prefix("bindtrace");
        let binds = Family::<BindLabels, Counter>::default();
        registry.register(
            "binds",
            "bind() and failed listen() calls seen, by operation, result, protocol, port, container and pod",
            binds.clone(),
        );
        let dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Events lost in the kernel (ring buffer full, entry lost, return hook skipped, kretprobe missed)",
            dropped.clone(),
        );
        let filter_mismatches = Counter::default();
        registry.register(
            "filter_mismatches",
            "Events the kernel passed but userspace filters refused (a bug if not zero)",
            filter_mismatches.clone(),
        );
        let lookups = Counter::default();
        registry.register("lookups", "Lookups started for diagnoses and identities", lookups.clone());
        let lookup_timeouts = Counter::default();
        registry.register(
            "lookup_timeouts",
            "Lookups that did not answer within 5 s of their start",
            lookup_timeouts.clone(),
        );
        let diagnoses_followed = Counter::default();
        registry.register("diagnoses_followed", "Diagnoses written after their event", diagnoses_followed.clone());
        let diagnoses_shed = Counter::default();
        registry.register("diagnoses_shed", "Failures that got no diagnosis (overload)", diagnoses_shed.clone());
        let ports_shared = Counter::default();
        registry.register(
            "ports_shared",
            "Successful binds that joined a port another service, container or process tree holds \
             (SO_REUSEPORT, or SO_REUSEADDR on UDP)",
            ports_shared.clone(),
        );
        let ports_forwarded = Counter::default();
        registry.register(
            "ports_forwarded",
            "Successful binds to a port a NAT rule (DNAT, REDIRECT) takes before any socket",
            ports_forwarded.clone(),
        );
        let sharing_unchecked = Counter::default();
        registry.register(
            "sharing_unchecked",
            "Successful SO_REUSEPORT (or UDP SO_REUSEADDR) binds whose sharing could not be checked (overload)",
            sharing_unchecked.clone(),
        );
        let programs = ProgramSeries::default();
        registry.register(
            "probe_runs",
            "Runs of each attached BPF program (counted while sysctl kernel.bpf_stats_enabled=1)",
            programs.runs.clone(),
        );
        registry.register(
            "probe_run_seconds",
            "Time spent in each attached BPF program (counted while sysctl kernel.bpf_stats_enabled=1)",
            programs.run_seconds.clone(),
        );
        registry.register(
            "probe_recursion_misses",
            "Runs of each attached BPF program the kernel skipped (another program was running on that CPU)",
            programs.recursion_misses.clone(),
        );
        registry.register(
            "backend",
            "The kernel hook bindtrace attached with",
            Info::new(BackendLabels { backend: backend.to_owned(), version: env!("CARGO_PKG_VERSION") }),
        );
        Self {
            registry: Arc::new(registry),
            binds,
            dropped,
            filter_mismatches,
            lookups,
            lookup_timeouts,
            diagnoses_followed,
            diagnoses_shed,
            ports_shared,
            sharing_unchecked,
            ports_forwarded,
            programs,
            last_kernel_dropped: AtomicU64::new(0),
            last_enrich: std::sync::Mutex::new(EnrichCounters::default()),
            ports: ports.iter().copied().collect(),
            handles: FxHashMap::default(),
            containers_seen: FxHashMap::default(),
            uses: 0,
            pinned: Vec::new(),
        }
    }

    /// The registry, for the HTTP server.
    pub(crate) fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Counts one written event.
    pub(crate) fn observe(&mut self, enriched: &Enriched) {
        let event = &enriched.event;
        let key = HandleKey {
            op: event.op,
            ret: event.ret,
            proto: event.protocol,
            family: event.family,
            port: if self.ports.contains(&event.port) { event.port } else { 0 },
            identity: enriched.identity.as_ref().map_or(0, |i| Arc::as_ptr(i) as usize),
        };
        self.uses += 1;
        if let Some((counter, last_used)) = self.handles.get(&key) {
            counter.inc();
            last_used.store(self.uses, Ordering::Relaxed);
            return;
        }
        if self.handles.len() >= HANDLES_MAX {
            self.handles.clear();
            self.pinned.clear();
        }
        let labels = self.labels(enriched, key.port);
        let counter = self.binds.get_or_create(&labels).clone();
        counter.inc();
        let set = (labels.container.clone(), labels.pod.clone(), labels.namespace.clone());
        let Some(seen) = self.containers_seen.get_mut(&set) else { return };
        seen.last_used.store(self.uses, Ordering::Relaxed);
        if !seen.series.contains(&labels) {
            seen.series.push(labels);
        }
        self.handles.insert(key, (counter, seen.last_used.clone()));
        if let Some(identity) = &enriched.identity {
            self.pinned.push(identity.clone());
        }
    }

    fn labels(&mut self, enriched: &Enriched, port: u16) -> BindLabels {
        let event = &enriched.event;
        let result = match event.errno() {
            None => "ok".to_owned(),
            Some(errno) => errno::name(errno).map_or_else(|| format!("errno_{errno}"), str::to_owned),
        };
        let proto = if event.family == AF_UNIX {
            "unix"
        } else {
            match event.proto_name() {
                Some("tcp") => "tcp",
                Some("udp") => "udp",
                _ => "other",
            }
        };
        let (container, pod, namespace) = match enriched.identity.as_deref() {
            None => (String::new(), String::new(), String::new()),
            Some(identity) => match (&identity.container, &identity.pod) {
                (_, Some(p)) => {
                    (p.container.clone().unwrap_or_default(), p.name.clone(), p.namespace.clone().unwrap_or_default())
                }
                (Some(c), None) => (c.label(), String::new(), String::new()),
                (None, None) if identity.unresolved.is_some() => ("unknown".to_owned(), String::new(), String::new()),
                (None, None) => (String::new(), String::new(), String::new()),
            },
        };
        let set = (container.clone(), pod.clone(), namespace.clone());
        if !self.containers_seen.contains_key(&set) {
            if self.containers_seen.len() >= CONTAINER_LABELS_MAX {
                self.forget_least_recent_container();
            }
            self.containers_seen
                .insert(set, ContainerSeries { last_used: Arc::new(AtomicU64::new(self.uses)), series: Vec::new() });
        }
        BindLabels {
            op: event.op_name(),
            result,
            proto,
            port: if port == 0 { "other".to_owned() } else { port.to_string() },
            container,
            pod,
            namespace,
        }
    }

    /// Removes the container label set used least recently, with its series: Prometheus sees
    /// them end, as it does for a pod that is gone.
    fn forget_least_recent_container(&mut self) {
        let Some(oldest) = self
            .containers_seen
            .iter()
            .min_by_key(|(_, seen)| seen.last_used.load(Ordering::Relaxed))
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        if let Some(seen) = self.containers_seen.remove(&oldest) {
            for labels in &seen.series {
                self.binds.remove(labels);
            }
        }
        // Handles may hold the removed counters: they are made again on the next event.
        self.handles.clear();
        self.pinned.clear();
    }

    /// Brings the totals that other stages keep up to date (each tick, and at the end).
    pub(crate) fn update(&self, kernel: &KernelCounters, filter_mismatches: u64, enrich: EnrichCounters) {
        let dropped = kernel.dropped();
        let before = self.last_kernel_dropped.swap(dropped, Ordering::Relaxed);
        self.dropped.inc_by(dropped.saturating_sub(before));
        let mismatches_before = self.filter_mismatches.get();
        self.filter_mismatches.inc_by(filter_mismatches.saturating_sub(mismatches_before));
        if let Ok(mut last) = self.last_enrich.lock() {
            self.lookups.inc_by(enrich.lookups.saturating_sub(last.lookups));
            self.lookup_timeouts.inc_by(enrich.lookup_timeouts.saturating_sub(last.lookup_timeouts));
            self.diagnoses_followed.inc_by(enrich.followed.saturating_sub(last.followed));
            self.diagnoses_shed.inc_by(enrich.shed.saturating_sub(last.shed));
            self.ports_shared.inc_by(enrich.ports_shared.saturating_sub(last.ports_shared));
            self.sharing_unchecked.inc_by(enrich.sharing_unchecked.saturating_sub(last.sharing_unchecked));
            self.ports_forwarded.inc_by(enrich.ports_forwarded.saturating_sub(last.ports_forwarded));
            *last = enrich;
        }
    }
}

impl Metrics {
    /// Adds what the kernel counted for each program since the last call.
    pub(crate) fn update_programs(&self, programs: &[ProgramStats]) {
        let series = &self.programs;
        let Ok(mut last) = series.last.lock() else { return };
        for program in programs {
            let before = last.get(&program.name).cloned().unwrap_or_default();
            let labels = ProgramLabels { program: program.name.clone() };
            series.runs.get_or_create(&labels).inc_by(program.runs.saturating_sub(before.runs));
            let ns = program.run_time_ns.saturating_sub(before.run_time_ns);
            series.run_seconds.get_or_create(&labels).inc_by(ns as f64 / 1e9);
            series
                .recursion_misses
                .get_or_create(&labels)
                .inc_by(program.recursion_misses.saturating_sub(before.recursion_misses));
            last.insert(program.name.clone(), program.clone());
        }
    }
}

/// The OpenMetrics text of `registry`.
pub(crate) fn render(registry: &Registry) -> String {
    let mut text = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// Connections to `/metrics` served at once; more are closed at once.
const CONNECTIONS_MAX: usize = 64;
/// A client has this long to send its request headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest a connection (keep-alive included) stays open.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);
/// The pause after a failed accept (out of fds: the next accept would fail at once too).
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Binds the metrics address now (a port in use is said before anything is attached).
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `/metrics` (anything else: 404) on the current runtime until the task is dropped.
pub(crate) async fn serve(listener: std::net::TcpListener, registry: Arc<Registry>) {
    use http_body_util::Full;
    use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        log::warn!("the metrics listener could not join the runtime");
        return;
    };
    // A stranger on the node's network must not wedge or exhaust bindtrace (the DaemonSet
    // serves on the host's network): few connections at once, a deadline to send the
    // request headers, a bounded life for each connection, and no spin on accept errors.
    let connections = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let mut accept_error_said = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE, ENFILE, ENOBUFS: wait for resources rather than spin.
                if !accept_error_said {
                    log::warn!("the metrics endpoint cannot accept connections: {err}");
                    accept_error_said = true;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Over the cap: the connection is closed at once.
            continue;
        };
        let registry = registry.clone();
        let service = service_fn(move |request: Request<hyper::body::Incoming>| {
            let registry = registry.clone();
            async move {
                let response = if request.uri().path() == "/metrics" {
                    Response::builder()
                        .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                        .body(Full::new(Bytes::from(render(&registry))))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                };
                response
            }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(err)) => log::debug!("metrics connection: {err}"),
                Err(_) => log::debug!("metrics connection: closed after {} s", CONNECTION_LIFETIME.as_secs()),
                Ok(Ok(())) => {}
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode::tests::sample_event, host::runtimes::Runtime, model::Explained};

    fn in_container(name: &str) -> Enriched {
        let mut container = crate::host::runtimes::Container::unnamed(Runtime::Docker, format!("{name:0>64}"));
        container.name = Some(name.to_owned());
        Enriched {
            seq: 1,
            event: sample_event().into(),
            wall_ns: 0,
            explained: Explained::Nothing,
            identity: Some(Arc::new(Identity { container: Some(container), ..Identity::default() })),
        }
    }

    /// Pods that come and go over months: label sets age out, least recently used first,
    /// and their series leave the registry (they used to freeze at 256, all later ones
    /// counted as "other").
    #[test]
    fn container_label_sets_age_out_least_recently_used_first() {
        let mut metrics = Metrics::new("tracepoint", &[]);
        metrics.observe(&in_container("kept"));
        for i in 0..CONTAINER_LABELS_MAX + 50 {
            metrics.observe(&in_container(&format!("pod-{i}")));
            // "kept" is used all along: never the least recently used.
            metrics.observe(&in_container("kept"));
        }
        let text = render(&metrics.registry());
        let series: Vec<&str> = text.lines().filter(|l| l.starts_with("bindtrace_binds_total{")).collect();
        assert!(series.len() <= CONTAINER_LABELS_MAX, "{} series", series.len());
        assert!(series.iter().any(|l| l.contains(r#"container="kept""#)), "the one in use stays");
        let newest = format!(r#"container="pod-{}""#, CONTAINER_LABELS_MAX + 49);
        assert!(series.iter().any(|l| l.contains(&newest)), "the newest has its own series");
        assert!(!series.iter().any(|l| l.contains(r#"container="pod-0""#)), "the oldest left the registry");
        assert!(!series.iter().any(|l| l.contains(r#"container="other""#)), "nobody is lumped into other");
        let kept: Vec<&&str> = series.iter().filter(|l| l.contains(r#"container="kept""#)).collect();
        assert!(kept[0].ends_with(&format!(" {}", CONTAINER_LABELS_MAX + 51)), "{kept:?}");
    }
}
