//! The userspace hot path, per event: decode the ring-buffer record, apply the filter, push it
//! through the enrich stage and encode it as NDJSON into the output buffer. One core.
//!
//!     cargo bench -p bindtrace --features bench --bench userspace
//!
//! Successes (no diagnosis) are the common case; failures in a storm reuse one memoized
//! diagnosis after the first lookup, measured by the second group.

use std::{hint::black_box, time::Duration};

use bindtrace::bench_api::Stages;
use bindtrace_common::{sock_flags, Backend, BindEvent, AF_INET, BIND_EVENT_SIZE};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn record(ret: i32) -> Vec<u8> {
    let mut event = BindEvent::zeroed();
    event.backend = Backend::Tracepoint as u8;
    event.family = AF_INET;
    event.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    event.port = 8080;
    event.ret = ret;
    event.tgid = 4242;
    event.tid = 4242;
    event.comm[..10].copy_from_slice(b"bind-storm");
    event.protocol = 6;
    event.sock_type = 1;
    event.sock_flags = sock_flags::ADDR_READ | sock_flags::SOCK_INFO;
    event.timestamp_ns = 1_000_000_000;
    // This process's own cgroup, so that the identity lookup (and its cached answer) is
    // part of what is measured.
    event.cgroup_id = own_cgroup_id();
    // SAFETY: BindEvent is plain data of exactly BIND_EVENT_SIZE bytes.
    unsafe { std::slice::from_raw_parts((&raw const event).cast::<u8>(), BIND_EVENT_SIZE) }.to_vec()
}

/// The cgroup v2 id of this process (the inode of its cgroup directory), 1 without cgroup v2.
fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mount = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
    });
    let path = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned));
    match (mount, path) {
        (Some(mount), Some(path)) => std::fs::metadata(format!("{mount}{path}")).map_or(1, |m| m.ino()),
        _ => 1,
    }
}

fn pipeline(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode+filter+enrich+ndjson");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));

    for (name, ret) in [("success", 0), ("failure_memoized", -98)] {
        let bytes = record(ret);
        // Attribution on, as in `bindtrace` by default: a storm of identical failures costs one
        // lookup (on the worker thread) per cache period, then reuses the diagnosis.
        let mut stages = Stages::new().expect("the stages start");
        // One arrival instant for all: a window's failures share one lookup.
        let arrived = std::time::Instant::now();
        group.bench_function(name, |b| b.iter(|| stages.record(black_box(&bytes), arrived).expect("written")));
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
