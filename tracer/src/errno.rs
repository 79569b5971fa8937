//! errno numbers ↔ names ↔ messages, for parsing `--errno` and for printing results.
//!
//! Names come from nix's `Errno` enum (its variant names are the C names) and messages from
//! its `desc()`; the table is built once, so the hot path only indexes an array.

use std::sync::OnceLock;

use nix::errno::Errno;

/// Largest errno Linux defines (EHWPOISON); anything above has no name.
const MAX_ERRNO: i32 = 133;

/// Aliases the enum cannot carry because they share a number with another name.
const ALIASES: [(&str, i32); 3] =
    [("EWOULDBLOCK", libc::EWOULDBLOCK), ("EDEADLOCK", libc::EDEADLOCK), ("ENOTSUP", libc::ENOTSUP)];

struct Entry {
    name: String,
    message: &'static str,
}

fn table() -> &'static [Option<Entry>] {
    static TABLE: OnceLock<Vec<Option<Entry>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=MAX_ERRNO)
            .map(|number| {
                let errno = Errno::from_raw(number);
                (number != 0 && errno != Errno::UnknownErrno)
                    .then(|| Entry { name: format!("{errno:?}"), message: errno.desc() })
            })
            .collect()
    })
}

fn entry(number: i32) -> Option<&'static Entry> {
    table().get(usize::try_from(number).ok()?)?.as_ref()
}

/// "EADDRINUSE" for 98; `None` for numbers Linux does not define.
pub fn name(number: i32) -> Option<&'static str> {
    entry(number).map(|e| e.name.as_str())
}

/// "Address already in use" for 98.
pub fn message(number: i32) -> Option<&'static str> {
    entry(number).map(|e| e.message)
}

/// Parses one errno as a name in any case ("EADDRINUSE", "eaddrinuse", "ADDRINUSE") or a
/// number ("98", or "-98" as the kernel returns it and `ret` shows it).
pub fn parse(text: &str) -> Result<i32, String> {
    let text = text.trim();
    if let Ok(number) = text.parse::<i32>() {
        let number = number.checked_abs().unwrap_or(number);
        return if name(number).is_some() {
            Ok(number)
        } else {
            Err(format!("unknown errno number {number} (Linux defines 1-{MAX_ERRNO})"))
        };
    }
    let upper = text.to_ascii_uppercase();
    let wanted = if upper.starts_with('E') { upper } else { format!("E{upper}") };
    if let Some((_, number)) = ALIASES.iter().find(|(alias, _)| *alias == wanted) {
        return Ok(*number);
    }
    (1..=MAX_ERRNO).find(|&n| name(n) == Some(wanted.as_str())).ok_or_else(|| {
        format!("unknown errno name '{text}' (try EADDRINUSE, EACCES, EADDRNOTAVAIL, EINVAL or a number)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_map_to_names_and_messages() {
        assert_eq!(name(98), Some("EADDRINUSE"));
        assert_eq!(message(98), Some("Address already in use"));
        assert_eq!(name(13), Some("EACCES"));
        assert_eq!(name(99), Some("EADDRNOTAVAIL"));
        assert_eq!(name(22), Some("EINVAL"));
        assert_eq!(name(0), None);
        assert_eq!(name(-1), None);
        assert_eq!(name(4000), None);
    }

    #[test]
    fn names_parse_in_any_case_and_as_numbers() {
        assert_eq!(parse("EADDRINUSE"), Ok(98));
        assert_eq!(parse("eaddrinuse"), Ok(98));
        assert_eq!(parse("AddrInUse"), Ok(98));
        assert_eq!(parse(" 98 "), Ok(98));
        assert_eq!(parse("EWOULDBLOCK"), Ok(libc::EAGAIN));
        assert!(parse("EBOGUS").unwrap_err().contains("unknown errno name 'EBOGUS'"));
        assert!(parse("9999").unwrap_err().contains("unknown errno number 9999"));
    }

    #[test]
    fn every_named_errno_round_trips() {
        for number in 1..=MAX_ERRNO {
            if let Some(n) = name(number) {
                assert_eq!(parse(n), Ok(number), "{n}");
            }
        }
    }
}
