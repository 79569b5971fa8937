//! Bytes shown as text, by one rule everywhere: a task name, a command line and a unix
//! socket path (which need not be UTF-8) become a `String` through [`from_bytes`] once, where
//! they are read; the table and bindtrace's own lines put any text on the terminal through
//! [`push_for_terminal`]. The two never escape the same thing twice: `from_bytes` makes the
//! bytes unambiguous (a raw 0xff is `\xff`, a literal `\xff` is `\\xff`), `push_for_terminal`
//! makes what a terminal would act on visible and leaves backslashes alone. NDJSON carries the
//! `from_bytes` text, controls included (JSON escapes those itself).

use std::{borrow::Cow, fmt::Write as _};

/// [`from_bytes`], borrowed when there is nothing to change (valid UTF-8 without a
/// backslash: nearly every task name), so that the NDJSON sink allocates nothing per event.
pub(crate) fn cow_from_bytes(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\\') => Cow::Borrowed(text),
        _ => Cow::Owned(from_bytes(bytes)),
    }
}

/// `bytes` as text, losslessly: valid UTF-8 as it is, a backslash doubled, each byte that is
/// not UTF-8 as `\xNN`.
pub(crate) fn from_bytes(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                text.push_str("\\\\");
            } else {
                text.push(c);
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(text, "\\x{byte:02x}");
        }
    }
    text
}

/// Appends `text` so that it can never drive the operator's terminal: a newline, tab and
/// carriage return as `\n`, `\t`, `\r`, every other control and each bidirectional
/// formatting character as `\u{..}`; everything else as it is.
pub(crate) fn push_for_terminal(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || is_bidi_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// [`push_for_terminal`] into a new string.
pub(crate) fn for_terminal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_for_terminal(&mut out, text);
    out
}

/// Unicode's bidirectional formatting characters: not controls to `char::is_control`, but a
/// process name holding U+202E (right-to-left override) reorders the rest of the line on the
/// terminal, so they are escaped like controls.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(bytes: &[u8]) -> String {
        for_terminal(&from_bytes(bytes))
    }

    #[test]
    fn bytes_become_unambiguous_text() {
        assert_eq!(from_bytes(b"nginx"), "nginx");
        assert_eq!(from_bytes(b"\xff\xfe"), "\\xff\\xfe");
        assert_eq!(from_bytes(b"literal\\xff"), "literal\\\\xff", "a literal \\xff is not a raw byte");
        assert_eq!(from_bytes(b"a\nb"), "a\nb", "controls stay for NDJSON, which escapes them itself");
        assert!(matches!(cow_from_bytes(b"nginx"), Cow::Borrowed("nginx")));
        assert_eq!(cow_from_bytes(b"a\\b\xff"), from_bytes(b"a\\b\xff"));
    }

    #[test]
    fn nothing_reaches_the_terminal_that_it_would_act_on() {
        assert_eq!(shown(b"\x1b[31mred"), "\\u{1b}[31mred");
        assert_eq!(shown(b"a\nb\tc\r\x7f"), "a\\nb\\tc\\r\\u{7f}");
        assert_eq!(shown("é\u{9b}".as_bytes()), "é\\u{9b}", "C1 controls too");
        // Bidi overrides would reorder the terminal line (issue 11).
        assert_eq!(shown("evil\u{202e}gnp.exe".as_bytes()), "evil\\u{202e}gnp.exe");
        assert_eq!(shown("a\u{2066}b\u{200f}".as_bytes()), "a\\u{2066}b\\u{200f}");
    }

    #[test]
    fn a_byte_is_escaped_once_however_many_stages_show_it() {
        // The table used to escape an already escaped command line: `\xff` showed as `\\xff`.
        assert_eq!(shown(b"srv --name=\xff"), "srv --name=\\xff");
        assert_eq!(for_terminal(&for_terminal(&from_bytes(b"\xff\x1b"))), for_terminal(&from_bytes(b"\xff\x1b")));
    }
}
