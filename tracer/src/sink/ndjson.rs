//! One JSON object per line. Field names are a stable interface, documented in
//! docs/ndjson-schema.md: change both together.

use std::{borrow::Cow, io, net::IpAddr, sync::Arc};

// Keyed by pointer, hit once or twice per event: FxHash, not SipHash.
use rustc_hash::FxHashMap as HashMap;

use bindtrace_common::{sock_flags, AF_INET, AF_INET6};
use bytes::BufMut as _;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{Output, Sink};
use crate::{
    clock::Rfc3339,
    decode::{family_name, BindEventExt as _},
    errno,
    host::identity::Identity,
    model::Diagnosis,
    model::{Enriched, Explained, FollowUp},
    summary::Report,
};

#[derive(Serialize)]
struct EventRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    /// 1 for the run's first event; a later `diagnosis` record names its event by it.
    seq: u64,
    time: &'a str,
    /// `bind`, or `listen` for a listen() that failed.
    op: &'static str,
    pid: u32,
    tid: u32,
    /// With `-- CMD` or `--tree`: the process that started this one (kept when it was
    /// re-parented) and its depth below the traced root (0: the root).
    #[serde(skip_serializing_if = "Option::is_none")]
    ppid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    depth: Option<u16>,
    comm: Cow<'a, str>,
    uid: u32,
    gid: u32,
    family: Option<&'static str>,
    family_num: u16,
    addr: Option<IpAddr>,
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope_id: Option<u32>,
    /// AF_UNIX: the path asked for, or `@name` for an abstract name.
    #[serde(skip_serializing_if = "Option::is_none")]
    unix_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unix_abstract: Option<bool>,
    /// The socket's own family, when the socket was read (it may differ from `family`).
    socket_family: Option<&'static str>,
    proto: Option<&'static str>,
    ok: bool,
    ret: i32,
    errno: i32,
    errno_name: Option<&'static str>,
    message: Option<&'static str>,
    reuseaddr: Option<bool>,
    reuseport: Option<bool>,
    v6only: Option<bool>,
    freebind: Option<bool>,
    transparent: Option<bool>,
    bind_address_no_port: Option<bool>,
    bound_dev_if: Option<u32>,
    bound_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_addr: Option<IpAddr>,
    fd: i32,
    addrlen: u32,
    /// null when the probe did not see the bind's entry.
    duration_ns: Option<u64>,
    netns: u32,
    cgroup_id: u64,
    /// The cgroup path, and who runs there (`container`, `pod`, `unit`); absent when the
    /// lookups are off. Encoded once per identity (see `encoded_identity`).
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_unresolved: Option<&'a RawValue>,
    backend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    diagnosis: Option<&'a RawValue>,
    /// The diagnosis comes later, in a `diagnosis` record with this event's `seq`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    diagnosis_follows: bool,
    /// Why this failure has no diagnosis (overload, diagnoses stopped).
    #[serde(skip_serializing_if = "Option::is_none")]
    diagnosis_shed: Option<&'static str>,
}

/// The diagnosis of an event written earlier with `diagnosis_follows`, with enough of the
/// event to read on its own.
#[derive(Serialize)]
struct DiagnosisRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    /// The event's time.
    time: &'a str,
    pid: u32,
    comm: Cow<'a, str>,
    addr: Option<IpAddr>,
    port: Option<u16>,
    proto: Option<&'static str>,
    errno_name: Option<&'static str>,
    diagnosis: &'a RawValue,
}

#[derive(Serialize)]
struct SummaryRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    report: &'a Report,
}

pub(crate) struct NdjsonSink {
    output: Output,
    time: Rfc3339,
    scratch: Vec<u8>,
    /// Diagnoses already encoded, by identity: identical failures share one `Arc<Diagnosis>`
    /// (see enrich), and encoding a diagnosis with its holders was a third of the output
    /// stage's CPU under a failure storm (`perf record`); each is encoded once.
    encoded: HashMap<usize, (Arc<Diagnosis>, Box<RawValue>)>,
    /// Identities already encoded, likewise: every event of a cgroup shares one `Arc`, and
    /// encoding it field by field for each event cost the storm benchmarks throughput.
    identities: HashMap<usize, (Arc<Identity>, EncodedIdentity)>,
}

/// An identity's fields as JSON, ready to be written into any number of records.
struct EncodedIdentity {
    cgroup: Option<Box<RawValue>>,
    container: Box<RawValue>,
    pod: Box<RawValue>,
    unit: Box<RawValue>,
    unresolved: Option<Box<RawValue>>,
}

/// Is what the identity says of a container known: resolved, or a container even if unnamed?
fn settled(identity: &EncodedIdentity) -> bool {
    identity.unresolved.is_none() || identity.container.get() != "null"
}

fn raw<T: Serialize>(value: &T) -> io::Result<Box<RawValue>> {
    serde_json::value::to_raw_value(value).map_err(io::Error::other)
}

/// The JSON of `identity`, encoded once per `Arc`.
fn encoded_identity<'c>(
    cache: &'c mut HashMap<usize, (Arc<Identity>, EncodedIdentity)>,
    identity: &Arc<Identity>,
) -> io::Result<&'c EncodedIdentity> {
    let key = Arc::as_ptr(identity) as usize;
    if !cache.contains_key(&key) {
        if cache.len() >= ENCODED_MAX {
            cache.clear();
        }
        let encoded = EncodedIdentity {
            cgroup: identity.cgroup.as_ref().map(raw).transpose()?,
            container: raw(&identity.container)?,
            pod: raw(&identity.pod)?,
            unit: raw(&identity.unit)?,
            unresolved: identity.unresolved.as_ref().map(raw).transpose()?,
        };
        cache.insert(key, (identity.clone(), encoded));
    }
    cache.get(&key).map(|(_, encoded)| encoded).ok_or_else(|| io::Error::other("encoded identity missing"))
}

/// Encoded diagnoses kept; the cache starts over past this (a diagnosis is shared within a
/// lookup window, so old entries are rarely worth keeping).
const ENCODED_MAX: usize = 256;

impl NdjsonSink {
    pub(crate) fn new(output: Output) -> Self {
        Self {
            output,
            time: Rfc3339::default(),
            scratch: Vec::with_capacity(40),
            encoded: HashMap::default(),
            identities: HashMap::default(),
        }
    }
}

/// The JSON of `diagnosis`, encoded once per `Arc` (kept alive by the cache, so its address
/// stays its identity).
fn encoded<'c>(
    cache: &'c mut HashMap<usize, (Arc<Diagnosis>, Box<RawValue>)>,
    diagnosis: &Arc<Diagnosis>,
) -> io::Result<&'c RawValue> {
    let key = Arc::as_ptr(diagnosis) as usize;
    if !cache.contains_key(&key) {
        if cache.len() >= ENCODED_MAX {
            cache.clear();
        }
        let json = serde_json::to_string(&**diagnosis).map_err(io::Error::other)?;
        let raw = RawValue::from_string(json).map_err(io::Error::other)?;
        cache.insert(key, (diagnosis.clone(), raw));
    }
    cache.get(&key).map(|(_, raw)| &**raw).ok_or_else(|| io::Error::other("encoded diagnosis missing"))
}

fn write_line<T: Serialize>(output: &mut Output, value: &T) -> io::Result<()> {
    let buffer = output.buffer();
    serde_json::to_writer(buffer.writer(), value).map_err(io::Error::other)?;
    buffer.put_u8(b'\n');
    output.write_if_full()
}

impl Sink for NdjsonSink {
    fn event(&mut self, enriched: &Enriched) -> io::Result<()> {
        let (event, wall_ns) = (&enriched.event, enriched.wall_ns);
        self.scratch.clear();
        self.time.write(&mut self.scratch, wall_ns);
        let time = std::str::from_utf8(&self.scratch).unwrap_or("");
        let has_sock = event.has(sock_flags::SOCK_INFO);
        let sock_flag = |flag| has_sock.then(|| event.has(flag));
        // IP options exist on inet sockets only: null for a unix socket.
        let inet_socket = has_sock && matches!(event.sock_family, AF_INET | AF_INET6);
        let inet_flag = |flag| inet_socket.then(|| event.has(flag));
        // Nothing was read of a NULL or unreadable sockaddr: its family is unknown, not AF_UNSPEC.
        // (An AF_UNIX path whose copy faulted still had its family read.)
        let nothing_read = event.has(sock_flags::ADDR_NULL) || (event.has(sock_flags::ADDR_FAULT) && event.family == 0);
        let family_known = !nothing_read;
        let addr = event.requested_ip();
        let errno_number = event.errno().unwrap_or(0);
        let identity = match &enriched.identity {
            Some(identity) => Some(encoded_identity(&mut self.identities, identity)?),
            None => None,
        };
        let record = EventRecord {
            kind: "bind",
            seq: enriched.seq,
            time,
            op: event.op_name(),
            pid: event.tgid,
            tid: event.tid,
            ppid: event.tree_place().map(|(ppid, _)| ppid),
            depth: event.tree_place().map(|(_, depth)| depth),
            comm: crate::text::cow_from_bytes(event.comm_bytes()),
            uid: event.uid,
            gid: event.gid,
            family: if family_known { family_name(event.family) } else { None },
            family_num: event.family,
            addr,
            port: addr.map(|_| event.port),
            scope_id: matches!(addr, Some(IpAddr::V6(_))).then_some(event.scope_id).filter(|&s| s != 0),
            unix_path: event.unix_path.as_ref().map(|path| path.display_text()),
            unix_abstract: event.unix_path.as_ref().map(|path| path.is_abstract()),
            socket_family: if has_sock { family_name(event.sock_family) } else { None },
            proto: event.proto_name(),
            ok: event.ret >= 0,
            ret: event.ret,
            errno: errno_number,
            errno_name: errno::name(errno_number),
            message: errno::message(errno_number),
            reuseaddr: sock_flag(sock_flags::REUSEADDR),
            reuseport: sock_flag(sock_flags::REUSEPORT),
            v6only: inet_flag(sock_flags::V6ONLY),
            freebind: inet_flag(sock_flags::FREEBIND),
            transparent: inet_flag(sock_flags::TRANSPARENT),
            bind_address_no_port: inet_flag(sock_flags::BIND_ADDRESS_NO_PORT),
            bound_dev_if: has_sock.then_some(event.bound_dev_if),
            bound_port: inet_socket.then_some(event.bound_port),
            bound_addr: event.bound_ip(),
            fd: event.fd,
            addrlen: event.addrlen,
            duration_ns: (!event.has(sock_flags::NO_ENTRY_TIME)).then_some(event.duration_ns),
            netns: event.netns_ino,
            cgroup_id: event.cgroup_id,
            cgroup: identity.and_then(|i| i.cgroup.as_deref()),
            // Not settled (the lookup did not answer, the cgroup was gone): absent, as the
            // schema says, never null ("not a container"); `identity_unresolved` says why. An
            // unnamed container still is one, and is written.
            container: identity.filter(|i| settled(i)).map(|i| &*i.container),
            pod: identity.filter(|i| settled(i)).map(|i| &*i.pod),
            unit: identity.filter(|i| settled(i)).map(|i| &*i.unit),
            identity_unresolved: identity.and_then(|i| i.unresolved.as_deref()),
            backend: event.backend_name(),
            diagnosis: match &enriched.explained {
                Explained::Now(diagnosis) => Some(encoded(&mut self.encoded, diagnosis)?),
                _ => None,
            },
            diagnosis_follows: enriched.explained == Explained::Follows,
            diagnosis_shed: match enriched.explained {
                Explained::Shed(reason) => Some(reason),
                _ => None,
            },
        };
        write_line(&mut self.output, &record)
    }

    fn follow_up(&mut self, follow_up: &FollowUp) -> io::Result<()> {
        let event = &follow_up.event;
        self.scratch.clear();
        self.time.write(&mut self.scratch, follow_up.wall_ns);
        let time = std::str::from_utf8(&self.scratch).unwrap_or("");
        let addr = event.requested_ip();
        let record = DiagnosisRecord {
            kind: "diagnosis",
            seq: follow_up.seq,
            time,
            pid: event.tgid,
            comm: crate::text::cow_from_bytes(event.comm_bytes()),
            addr,
            port: addr.map(|_| event.port),
            proto: event.proto_name(),
            errno_name: event.errno().and_then(errno::name),
            diagnosis: encoded(&mut self.encoded, &follow_up.diagnosis)?,
        };
        write_line(&mut self.output, &record)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.output.flush()
    }

    fn reopen(&mut self, writer: Box<dyn std::io::Write + Send>) -> io::Result<()> {
        self.output.replace(writer)
    }

    fn report(&mut self, report: &Report) -> io::Result<()> {
        write_line(&mut self.output, &SummaryRecord { kind: "summary", report })?;
        self.output.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode::tests::sample_event, probe::KernelCounters, sink::tests::Shared, summary::Summary};

    fn lines(shared: &Shared) -> Vec<serde_json::Value> {
        shared.text().lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect()
    }

    #[test]
    fn identity_fields_are_written_and_absent_without_lookups() {
        use crate::host::identity::Identity;
        let shared = Shared::default();
        let mut sink = NdjsonSink::new(Output::new(Box::new(shared.clone())));
        let identity = Arc::new(Identity {
            cgroup: Some("/system.slice/nginx.service".into()),
            unit: Some("nginx.service".into()),
            ..Identity::default()
        });
        for identity in [Some(identity.clone()), Some(identity), None] {
            sink.event(&Enriched {
                seq: 1,
                event: sample_event().into(),
                wall_ns: 0,
                explained: Explained::Nothing,
                identity,
            })
            .expect("encode");
        }
        sink.flush().expect("flush");
        let out = lines(&shared);
        for line in &out[..2] {
            assert_eq!(line["cgroup"], "/system.slice/nginx.service");
            assert_eq!(line["unit"], "nginx.service");
            assert!(line["container"].is_null() && line.get("container").is_some(), "null, not absent: {line}");
            assert!(line["pod"].is_null() && line.get("pod").is_some());
            assert!(line.get("identity_unresolved").is_none());
        }
        for field in ["cgroup", "container", "pod", "unit"] {
            assert!(out[2].get(field).is_none(), "absent without lookups: {field}");
        }
    }

    /// An identity not settled (the lookup did not answer) leaves `container` absent, never
    /// null, which reads "not a container"; an unnamed container is still written.
    #[test]
    fn an_unsettled_identity_is_absent_not_null() {
        use crate::host::{identity::Identity, runtimes::Container};
        let shared = Shared::default();
        let mut sink = NdjsonSink::new(Output::new(Box::new(shared.clone())));
        let unresolved =
            Arc::new(Identity { unresolved: Some("not resolved within 100 ms".into()), ..Identity::default() });
        let unnamed = Arc::new(Identity {
            container: Some(Container::unnamed(crate::host::runtimes::Runtime::Docker, "abc123".into())),
            unresolved: Some("the Docker API did not answer".into()),
            ..Identity::default()
        });
        for identity in [unresolved, unnamed] {
            let enriched = Enriched {
                seq: 1,
                event: sample_event().into(),
                wall_ns: 0,
                explained: Explained::Nothing,
                identity: Some(identity),
            };
            sink.event(&enriched).expect("encode");
        }
        sink.flush().expect("flush");
        let out = lines(&shared);
        assert!(out[0].get("container").is_none() && out[0].get("pod").is_none(), "{}", out[0]);
        assert_eq!(out[0]["identity_unresolved"], "not resolved within 100 ms");
        assert_eq!(out[1]["container"]["id"], "abc123", "{}", out[1]);
        assert!(out[1]["identity_unresolved"].is_string());
    }

    #[test]
    fn event_line_has_the_documented_fields() {
        let shared = Shared::default();
        let mut sink = NdjsonSink::new(Output::new(Box::new(shared.clone())));
        let mut event = sample_event();
        event.comm[..9].copy_from_slice(b"ev\x1bl\nname");
        sink.event(&Enriched {
            seq: 1,
            event: event.into(),
            wall_ns: 1_795_600_931_000_000_001,
            explained: Explained::Nothing,
            identity: None,
        })
        .expect("encode");
        assert!(lines(&shared).is_empty(), "nothing is written before flush");
        sink.flush().expect("flush");
        let out = lines(&shared);
        assert_eq!(out.len(), 1);
        let line = &out[0];
        assert_eq!(line["type"], "bind");
        assert_eq!(line["time"], "2026-11-25T10:02:11.000000001Z");
        assert_eq!(line["pid"], 4242);
        assert_eq!(line["tid"], 4243);
        assert_eq!(line["comm"], "ev\u{1b}l\nname");
        assert_eq!(line["family"], "AF_INET");
        assert_eq!(line["addr"], "127.0.0.1");
        assert_eq!(line["port"], 8080);
        assert_eq!(line["proto"], "tcp");
        assert_eq!(line["ok"], false);
        assert_eq!(line["ret"], -98);
        assert_eq!(line["errno"], 98);
        assert_eq!(line["errno_name"], "EADDRINUSE");
        assert_eq!(line["message"], "Address already in use");
        assert_eq!(line["reuseaddr"], true);
        assert_eq!(line["reuseport"], false);
        assert_eq!(line["backend"], "tracepoint");
        assert!(line.get("scope_id").is_none());
    }

    #[test]
    fn success_and_unknown_socket_use_nulls() {
        let shared = Shared::default();
        let mut sink = NdjsonSink::new(Output::new(Box::new(shared.clone())));
        let mut event = sample_event();
        event.ret = 0;
        event.sock_flags = 0;
        sink.event(&Enriched {
            seq: 1,
            event: event.into(),
            wall_ns: 0,
            explained: Explained::Nothing,
            identity: None,
        })
        .expect("encode");
        sink.flush().expect("flush");
        let line = &lines(&shared)[0];
        assert_eq!(line["ok"], true);
        assert_eq!(line["errno"], 0);
        assert!(line["errno_name"].is_null());
        assert!(line["addr"].is_null(), "address not read");
        assert!(line["port"].is_null());
        assert!(line["proto"].is_null());
        assert!(line["reuseaddr"].is_null());
        assert!(line["duration_ns"].is_number(), "the entry was seen");
    }

    #[test]
    fn bind_without_a_seen_entry_has_a_null_duration() {
        let shared = Shared::default();
        let mut sink = NdjsonSink::new(Output::new(Box::new(shared.clone())));
        let mut event = sample_event();
        event.sock_flags |= sock_flags::NO_ENTRY_TIME;
        sink.event(&Enriched {
            seq: 1,
            event: event.into(),
            wall_ns: 0,
            explained: Explained::Nothing,
            identity: None,
        })
        .expect("encode");
        sink.flush().expect("flush");
        let line = &lines(&shared)[0];
        assert!(line["duration_ns"].is_null());
        assert_eq!(line["port"], event.port, "the event itself is complete");
    }

    #[test]
    fn summary_record() {
        let shared = Shared::default();
        let mut sink = NdjsonSink::new(Output::new(Box::new(shared.clone())));
        let mut summary = Summary::default();
        summary.record(&sample_event());
        let report = summary.report("tracepoint", "s".into(), "e".into(), 2.5, KernelCounters::default());
        sink.report(&report).expect("report");
        let line = &lines(&shared)[0];
        assert_eq!(line["type"], "summary");
        assert_eq!(line["events"], 1);
        assert_eq!(line["dropped"], 0);
        assert_eq!(line["by_result"][0]["result"], "EADDRINUSE");
        assert_eq!(line["by_port"][0]["port"], 8080);
        assert_eq!(line["top_processes"][0]["comm"], "python3");
        assert_eq!(line["kernel"]["dropped_ring_buffer_full"], 0);
    }
}
