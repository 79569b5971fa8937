//! Runtimes resting after a timeout: not asked again for a while, process-wide.

use std::{collections::HashMap, time::Instant};

use super::QUIET_AFTER_TIMEOUT;

/// Runtimes resting after a timeout, by socket. Process-wide: a lookup worker replaced because
/// a call hung must not ask the same daemon again at once.
pub(super) static RESTING: std::sync::Mutex<Option<HashMap<String, Instant>>> = std::sync::Mutex::new(None);

pub(super) fn rest(socket: &str) {
    if let Ok(mut resting) = RESTING.lock() {
        resting.get_or_insert_with(HashMap::new).insert(socket.to_owned(), Instant::now() + QUIET_AFTER_TIMEOUT);
    }
}

pub(super) fn resting(socket: &str) -> bool {
    RESTING
        .lock()
        .is_ok_and(|resting| resting.as_ref().and_then(|r| r.get(socket)).is_some_and(|until| Instant::now() < *until))
}
