//! The output types built from the facts: a holder's entry and the bind bindtrace saw.

use super::super::{history::SeenBind, lookup::Holder};
use crate::{
    clock::local_time_of_day,
    host::sockdiag::state_name,
    model::{HolderReport, SeenBindReport, PROCESSES_SHOWN_MAX},
};

pub(crate) fn comm_text(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    crate::text::from_bytes(&comm[..end])
}

pub(crate) fn seen_report(seen: &SeenBind) -> SeenBindReport {
    SeenBindReport {
        time: local_time_of_day(seen.wall_ns),
        pid: seen.pid,
        comm: comm_text(&seen.comm),
        reuseaddr: seen.reuseaddr,
        reuseport: seen.reuseport,
    }
}

pub(crate) fn holder_report(holder: &Holder, seen: Option<&SeenBind>) -> HolderReport {
    let socket = &holder.socket;
    HolderReport {
        proto: socket.proto,
        addr: socket.local.ip(),
        port: socket.local.port(),
        state: state_name(socket.proto, socket.state),
        uid: socket.uid,
        inode: socket.inode,
        peer: (!socket.peer.ip().is_unspecified()).then_some(socket.peer),
        timer_ms: socket.timer_ms,
        v6only: socket.v6only,
        processes: holder.processes.iter().take(PROCESSES_SHOWN_MAX).cloned().collect(),
        processes_total: (holder.processes.len() > PROCESSES_SHOWN_MAX).then_some(holder.processes.len()),
        processes_hidden: holder.blind_reason(),
        seen_bind: seen.map(seen_report),
    }
}
