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

/// What glibc's strerror says for 1..=MAX_ERRNO (index 0 is errno 1): the words the user's
/// program printed ("Bad file descriptor", where nix and musl say "Bad file number"). Spelled
/// out because the shipped binary is static musl, whose own strings differ; a test holds the
/// table to glibc's wherever the tests run on glibc.
const GLIBC_MESSAGES: [&str; MAX_ERRNO as usize] = [
    "Operation not permitted",
    "No such file or directory",
    "No such process",
    "Interrupted system call",
    "Input/output error",
    "No such device or address",
    "Argument list too long",
    "Exec format error",
    "Bad file descriptor",
    "No child processes",
    "Resource temporarily unavailable",
    "Cannot allocate memory",
    "Permission denied",
    "Bad address",
    "Block device required",
    "Device or resource busy",
    "File exists",
    "Invalid cross-device link",
    "No such device",
    "Not a directory",
    "Is a directory",
    "Invalid argument",
    "Too many open files in system",
    "Too many open files",
    "Inappropriate ioctl for device",
    "Text file busy",
    "File too large",
    "No space left on device",
    "Illegal seek",
    "Read-only file system",
    "Too many links",
    "Broken pipe",
    "Numerical argument out of domain",
    "Numerical result out of range",
    "Resource deadlock avoided",
    "File name too long",
    "No locks available",
    "Function not implemented",
    "Directory not empty",
    "Too many levels of symbolic links",
    "Unknown error 41",
    "No message of desired type",
    "Identifier removed",
    "Channel number out of range",
    "Level 2 not synchronized",
    "Level 3 halted",
    "Level 3 reset",
    "Link number out of range",
    "Protocol driver not attached",
    "No CSI structure available",
    "Level 2 halted",
    "Invalid exchange",
    "Invalid request descriptor",
    "Exchange full",
    "No anode",
    "Invalid request code",
    "Invalid slot",
    "Unknown error 58",
    "Bad font file format",
    "Device not a stream",
    "No data available",
    "Timer expired",
    "Out of streams resources",
    "Machine is not on the network",
    "Package not installed",
    "Object is remote",
    "Link has been severed",
    "Advertise error",
    "Srmount error",
    "Communication error on send",
    "Protocol error",
    "Multihop attempted",
    "RFS specific error",
    "Bad message",
    "Value too large for defined data type",
    "Name not unique on network",
    "File descriptor in bad state",
    "Remote address changed",
    "Can not access a needed shared library",
    "Accessing a corrupted shared library",
    ".lib section in a.out corrupted",
    "Attempting to link in too many shared libraries",
    "Cannot exec a shared library directly",
    "Invalid or incomplete multibyte or wide character",
    "Interrupted system call should be restarted",
    "Streams pipe error",
    "Too many users",
    "Socket operation on non-socket",
    "Destination address required",
    "Message too long",
    "Protocol wrong type for socket",
    "Protocol not available",
    "Protocol not supported",
    "Socket type not supported",
    "Operation not supported",
    "Protocol family not supported",
    "Address family not supported by protocol",
    "Address already in use",
    "Cannot assign requested address",
    "Network is down",
    "Network is unreachable",
    "Network dropped connection on reset",
    "Software caused connection abort",
    "Connection reset by peer",
    "No buffer space available",
    "Transport endpoint is already connected",
    "Transport endpoint is not connected",
    "Cannot send after transport endpoint shutdown",
    "Too many references: cannot splice",
    "Connection timed out",
    "Connection refused",
    "Host is down",
    "No route to host",
    "Operation already in progress",
    "Operation now in progress",
    "Stale file handle",
    "Structure needs cleaning",
    "Not a XENIX named type file",
    "No XENIX semaphores available",
    "Is a named type file",
    "Remote I/O error",
    "Disk quota exceeded",
    "No medium found",
    "Wrong medium type",
    "Operation canceled",
    "Required key not available",
    "Key has expired",
    "Key has been revoked",
    "Key was rejected by service",
    "Owner died",
    "State not recoverable",
    "Operation not possible due to RF-kill",
    "Memory page has hardware error",
];

fn table() -> &'static [Option<Entry>] {
    static TABLE: OnceLock<Vec<Option<Entry>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=MAX_ERRNO)
            .map(|number| {
                let errno = Errno::from_raw(number);
                let message = usize::try_from(number - 1).ok().and_then(|i| GLIBC_MESSAGES.get(i));
                (number != 0 && errno != Errno::UnknownErrno)
                    .then(|| Entry { name: format!("{errno:?}"), message: message.copied().unwrap_or(errno.desc()) })
            })
            .collect()
    })
}

fn entry(number: i32) -> Option<&'static Entry> {
    table().get(usize::try_from(number).ok()?)?.as_ref()
}

/// "EADDRINUSE" for 98; `None` for numbers Linux does not define.
pub(crate) fn name(number: i32) -> Option<&'static str> {
    entry(number).map(|e| e.name.as_str())
}

/// Every errno name Linux defines, in number order (for shell completion).
pub(crate) fn names() -> impl Iterator<Item = &'static str> {
    (1..=MAX_ERRNO).filter_map(name)
}

/// "Address already in use" for 98.
pub(crate) fn message(number: i32) -> Option<&'static str> {
    entry(number).map(|e| e.message)
}

/// Parses one errno as a name in any case ("EADDRINUSE", "eaddrinuse", "ADDRINUSE") or a
/// number ("98", or "-98" as the kernel returns it and `ret` shows it).
pub(crate) fn parse(text: &str) -> Result<i32, String> {
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
    fn messages_are_glibcs() {
        assert_eq!(message(libc::EBADF), Some("Bad file descriptor"));
        #[cfg(target_env = "gnu")]
        for number in 1..=MAX_ERRNO {
            // SAFETY: strerror returns a pointer to a static (or thread-local) C string.
            let glibc = unsafe { std::ffi::CStr::from_ptr(libc::strerror(number)) }.to_string_lossy().into_owned();
            if name(number).is_some() {
                assert_eq!(message(number), Some(glibc.as_str()), "errno {number}");
            }
        }
    }

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
