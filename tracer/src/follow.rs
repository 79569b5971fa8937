//! Follows the cgroups `--container` and `--cgroup` select across restarts. A restarted
//! container or unit runs in a new cgroup: a new id at the same path (Docker, podman, a
//! systemd unit), or a new path in its pod (a Kubernetes container). The probe compared ids
//! only, so the trace went blind after `docker restart`, silently, in the crash loops people
//! trace.
//!
//! A restarted server binds within milliseconds of its new cgroup being made: before any
//! watcher can learn the new id (measured: a busybox `nc` bound 14 ms before inotify's wake on
//! a loaded machine). So the kernel also passes tasks in cgroups made after the selected one
//! in the same parent (ids only grow: `bindtrace_common::CgroupSlot`), and the pipeline keeps
//! only those whose cgroup path is a selected one ([`ScopeGate`]); the others (containers
//! started later beside it) are counted, `outside_scope`. A thread watches the parents
//! (inotify) and moves each slot to its cgroup's new id, so that the kernel again matches it
//! exactly; a container whose path is gone is asked for again by name, at most once a second.
//! Each departure and return is said on stderr.

use std::{
    collections::HashMap,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData};
use bindtrace_common::CgroupSlot;
use nix::{
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};

use crate::{
    filter::{container_cgroup, SelectedCgroup},
    host::{cgroup, identity::Identities},
};

/// How often a selection whose cgroup is gone is looked for again (by name, for a container).
const RECHECK: Duration = Duration::from_secs(1);

/// Cgroup ids the gate remembers the answer for.
const GATE_CACHE_MAX: usize = 4_096;

/// What the pipeline asks of an event: is its cgroup one of the selected ones (or below
/// one)? The kernel passes newer cgroups beside a selected one too (see the module's doc).
#[derive(Default)]
pub(crate) struct ScopeGate {
    /// The selections' cgroup ids and paths now (relative to the hierarchy, `/docker/1f0e...`).
    selected: Mutex<(Vec<u64>, Vec<String>)>,
    /// Answers for other cgroup ids (below a selected one, or beside it): one path lookup per
    /// cgroup, not per event.
    answers: Mutex<HashMap<u64, bool>>,
}

impl ScopeGate {
    /// Does an event of cgroup `id` belong to the selection? At once for a selected cgroup;
    /// else by the cgroup's path, and yes when that cannot be read (a cgroup already gone):
    /// an event is never dropped on a guess.
    pub(crate) fn admits(&self, id: u64) -> bool {
        let selected = self.selected.lock().unwrap_or_else(PoisonError::into_inner);
        if selected.0.contains(&id) {
            return true;
        }
        let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&known) = answers.get(&id) {
            return known;
        }
        let admitted = match cgroup::path_of_id(id) {
            Ok(Some(path)) => selected.1.iter().any(|selected| is_at_or_below(&path, selected)),
            Ok(None) | Err(_) => true,
        };
        if answers.len() >= GATE_CACHE_MAX {
            answers.clear();
        }
        answers.insert(id, admitted);
        admitted
    }

    fn update(&self, followed: &[Followed]) {
        *self.selected.lock().unwrap_or_else(PoisonError::into_inner) =
            (followed.iter().map(|f| f.id).collect(), followed.iter().map(|f| f.path.clone()).collect());
        self.answers.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// Is cgroup `path` the selected one or below it?
fn is_at_or_below(path: &str, selected: &str) -> bool {
    let (path, selected) = (path.trim_end_matches('/'), selected.trim_end_matches('/'));
    path == selected || path.strip_prefix(selected).is_some_and(|rest| rest.starts_with('/'))
}

/// One followed selection: its probe slot, and the cgroup followed now.
struct Followed {
    slot: u32,
    selected: SelectedCgroup,
    /// Its cgroup path now (relative, with a leading `/`), and that directory.
    path: String,
    dir: PathBuf,
    /// The id in the probe's slot: the cgroup's now, or its last one while it is gone.
    id: u64,
    /// Its departure was said (its return is to be).
    gone: bool,
    last_asked: Option<Instant>,
}

/// Starts following `selected` (in the probe's slot order), writing `map`; the gate is for
/// the pipeline.
pub(crate) fn spawn(selected: Vec<SelectedCgroup>, map: Array<MapData, CgroupSlot>) -> Result<Arc<ScopeGate>> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .context("cannot watch the selected cgroups for restarts (inotify)")?;
    let mut followed = Vec::with_capacity(selected.len());
    for (slot, selected) in selected.into_iter().enumerate() {
        let dir = cgroup::directory_of_path(&selected.path)
            .with_context(|| format!("{}: the cgroup v2 hierarchy is not mounted", selected.flag))?;
        let id = std::fs::metadata(&dir).map(|m| m.ino()).unwrap_or(0);
        watch_parent(&inotify, &dir);
        let path = format!("/{}", selected.path.trim_start_matches('/'));
        let path = cgroup::v2_mount()
            .and_then(|mount| dir.strip_prefix(mount).ok())
            .map_or(path, |relative| format!("/{}", relative.display()));
        followed.push(Followed { slot: slot as u32, selected, path, dir, id, gone: false, last_asked: None });
    }
    // The parents, for the kernel's newer-sibling rule.
    let mut map = map;
    for one in &followed {
        write_slot(&mut map, one);
    }
    let gate = Arc::new(ScopeGate::default());
    gate.update(&followed);
    let shared = gate.clone();
    std::thread::Builder::new()
        .name("bindtrace-follow".into())
        .spawn(move || follow(&inotify, &mut followed, map, &shared))
        .context("cannot start the thread that follows the selected cgroups")?;
    Ok(gate)
}

/// Cgroups are made and removed in their parent directory: watching it sees both.
fn watch_parent(inotify: &Inotify, dir: &Path) {
    if let Some(parent) = dir.parent() {
        let flags = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_ONLYDIR;
        if let Err(err) = inotify.add_watch(parent, flags) {
            log::debug!("cannot watch {} for restarts ({err}): checked once a second instead", parent.display());
        }
    }
}

fn follow(inotify: &Inotify, followed: &mut [Followed], mut map: Array<MapData, CgroupSlot>, gate: &ScopeGate) {
    let mut identities = Identities::default();
    loop {
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(RECHECK).unwrap_or(PollTimeout::NONE);
        if matches!(poll(&mut fds, timeout), Ok(n) if n > 0) {
            // Which directory changed does not matter: every followed one is looked at (a
            // stat each).
            let _ = inotify.read_events();
        }
        let mut changed = false;
        for one in followed.iter_mut() {
            changed |= check(one, inotify, &mut map, &mut identities);
        }
        if changed {
            gate.update(followed);
        }
    }
}

/// The probe slot of one selection: its cgroup now (or last), and its parent's id.
fn write_slot(map: &mut Array<MapData, CgroupSlot>, one: &Followed) -> bool {
    let parent_id = one.dir.parent().and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.ino());
    let slot = CgroupSlot { id: one.id, parent_id, level: one.selected.level, _pad: 0 };
    match map.set(one.slot, slot, 0) {
        Ok(()) => true,
        Err(err) => {
            crate::say::line(&format!(
                "{}: cannot follow its cgroup ({err}): binds after a restart may be missed",
                one.selected.flag
            ));
            false
        }
    }
}

/// Brings one selection's slot up to date with its cgroup now, saying when it went away and
/// when it came back; whether the slot changed.
fn check(
    one: &mut Followed,
    inotify: &Inotify,
    map: &mut Array<MapData, CgroupSlot>,
    identities: &mut Identities,
) -> bool {
    let mut id = std::fs::metadata(&one.dir).map(|m| m.ino()).unwrap_or(0);
    if id == 0 {
        if let Some(name) = one.selected.container.clone() {
            if one.last_asked.is_none_or(|at| at.elapsed() >= RECHECK) {
                one.last_asked = Some(Instant::now());
                if let Some((path, dir)) = moved_container(identities, &name, one.selected.level) {
                    watch_parent(inotify, &dir);
                    id = std::fs::metadata(&dir).map(|m| m.ino()).unwrap_or(0);
                    one.path = path;
                    one.dir = dir;
                }
            }
        }
    }
    let flag = &one.selected.flag;
    if id == 0 {
        if !one.gone {
            one.gone = true;
            crate::say::line(&format!(
                "{flag}: its cgroup {} is gone (stopped or restarting); traced again when it comes back",
                one.path
            ));
        }
        return false;
    }
    if id == one.id {
        return false;
    }
    // A restart seen only as a new id (gone and back between two looks) is said too.
    one.gone = false;
    one.id = id;
    if !write_slot(map, one) {
        return false;
    }
    crate::say::line(&format!("{flag}: back in a new cgroup ({}); traced again", one.path));
    true
}

/// A container's cgroup at a new path (a Kubernetes container restarted in its pod gets a
/// new id), found by name: its path and directory; only at the depth the probe compares.
fn moved_container(identities: &mut Identities, name: &str, level: u32) -> Option<(String, PathBuf)> {
    identities.begin_lookup();
    let (_, path) = container_cgroup(identities, name).ok().flatten()?;
    let depth = path.split('/').filter(|part| !part.is_empty()).count() as u32;
    if depth != level {
        log::debug!("--container {name}: now at {path}, another depth than at start: not followed");
        return None;
    }
    let dir = cgroup::directory_of_path(&path)?;
    Some((path, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_is_in_scope_at_or_below_a_selected_path() {
        assert!(is_at_or_below("/docker/abc", "/docker/abc"));
        assert!(is_at_or_below("/docker/abc/init", "/docker/abc"));
        assert!(!is_at_or_below("/docker/abcd", "/docker/abc"), "a sibling whose name starts the same");
        assert!(!is_at_or_below("/docker", "/docker/abc"));
        assert!(is_at_or_below("/system.slice/nginx.service", "/system.slice/nginx.service/"));
    }

    #[test]
    fn the_gate_admits_the_selected_ids_and_keeps_what_it_cannot_read() {
        let gate = ScopeGate::default();
        *gate.selected.lock().expect("lock") = (vec![4242], vec!["/docker/abc".to_owned()]);
        assert!(gate.admits(4242), "a selected cgroup");
        // A cgroup id no cgroup has: its path cannot be read, and it is kept, not guessed away.
        assert!(gate.admits(u64::MAX - 3));
    }
}
