//! Kernel timestamps (CLOCK_MONOTONIC, from `bpf_ktime_get_ns`) → wall-clock time, and the
//! two ways bindtrace prints it: RFC 3339 UTC with nanoseconds for NDJSON, local
//! HH:MM:SS.mmm for the table.

use std::io::Write as _;

use chrono::{DateTime, Local, TimeZone as _, Utc};
use nix::time::{clock_gettime, ClockId};

/// Maps monotonic nanoseconds to Unix-epoch nanoseconds. The offset is re-sampled by
/// [`WallClock::resync`] so that NTP steps during a long trace are followed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WallClock {
    offset_ns: i128,
}

fn now_ns(clock: ClockId) -> i128 {
    // clock_gettime cannot fail for these two clocks on Linux; 0 keeps the code total anyway.
    clock_gettime(clock).map_or(0, |ts| ts.tv_sec() as i128 * 1_000_000_000 + ts.tv_nsec() as i128)
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

impl WallClock {
    pub(crate) fn new() -> Self {
        let mut clock = Self { offset_ns: 0 };
        clock.resync();
        clock
    }

    pub(crate) fn resync(&mut self) {
        let mono = now_ns(ClockId::CLOCK_MONOTONIC);
        let real = now_ns(ClockId::CLOCK_REALTIME);
        self.offset_ns = real - mono;
    }

    /// Unix-epoch nanoseconds for a monotonic timestamp.
    pub(crate) fn wall_ns(&self, monotonic_ns: u64) -> i128 {
        self.offset_ns + monotonic_ns as i128
    }

    pub(crate) fn now_wall_ns(&self) -> i128 {
        now_ns(ClockId::CLOCK_REALTIME)
    }
}

fn split(epoch_ns: i128) -> (i64, u32) {
    let secs = epoch_ns.div_euclid(1_000_000_000);
    let nanos = epoch_ns.rem_euclid(1_000_000_000) as u32;
    (i64::try_from(secs).unwrap_or(0), nanos)
}

/// RFC 3339 formatter that formats the date and time of day once per second and only the
/// nanoseconds per event: a chrono format per event would dominate the NDJSON encoder.
#[derive(Default)]
pub(crate) struct Rfc3339 {
    cached_second: Option<i64>,
    prefix: Vec<u8>,
}

impl Rfc3339 {
    /// Appends e.g. `2026-11-25T10:02:11.123456789Z`.
    pub(crate) fn write(&mut self, out: &mut Vec<u8>, epoch_ns: i128) {
        let (secs, nanos) = split(epoch_ns);
        if self.cached_second != Some(secs) {
            self.prefix.clear();
            let time: DateTime<Utc> = Utc.timestamp_opt(secs, 0).single().unwrap_or_default();
            let _ = write!(self.prefix, "{}", time.format("%Y-%m-%dT%H:%M:%S"));
            self.cached_second = Some(secs);
        }
        out.extend_from_slice(&self.prefix);
        out.push(b'.');
        let mut digits = [b'0'; 9];
        let mut rest = nanos;
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out.extend_from_slice(&digits);
        out.push(b'Z');
    }

    pub(crate) fn format(&mut self, epoch_ns: i128) -> String {
        let mut out = Vec::with_capacity(32);
        self.write(&mut out, epoch_ns);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// `10:02:11.123` in the local time zone, for the table.
pub(crate) fn local_time_of_day(epoch_ns: i128) -> String {
    let (secs, nanos) = split(epoch_ns);
    match Local.timestamp_opt(secs, nanos).single() {
        Some(time) => time.format("%H:%M:%S%.3f").to_string(),
        None => "??:??:??.???".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_with_nanoseconds() {
        let mut fmt = Rfc3339::default();
        // 2026-11-25T10:02:11Z
        let secs: i128 = 1_795_600_931;
        assert_eq!(fmt.format(secs * 1_000_000_000 + 7), "2026-11-25T10:02:11.000000007Z");
        assert_eq!(fmt.format(secs * 1_000_000_000 + 123_456_789), "2026-11-25T10:02:11.123456789Z");
        assert_eq!(fmt.format((secs + 1) * 1_000_000_000), "2026-11-25T10:02:12.000000000Z");
        let parsed = DateTime::parse_from_rfc3339(&fmt.format(secs * 1_000_000_000 + 5)).expect("valid RFC 3339");
        assert_eq!(parsed.timestamp(), secs as i64);
    }

    #[test]
    fn monotonic_maps_near_now() {
        let clock = WallClock::new();
        let mono = now_ns(ClockId::CLOCK_MONOTONIC) as u64;
        let diff = (clock.wall_ns(mono) - clock.now_wall_ns()).abs();
        assert!(diff < 1_000_000_000, "{diff} ns apart");
    }

    #[test]
    fn local_time_has_milliseconds() {
        let text = local_time_of_day(1_795_600_931_123_000_000);
        assert_eq!(text.len(), 12, "{text}");
        assert!(text.ends_with(".123"), "{text}");
    }
}
